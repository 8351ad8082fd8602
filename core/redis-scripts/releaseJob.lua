--[[
  Puts an active job back at the front of wait, unprocessed (a worker that
  was closing when a fetch handed it the job; BullMQ's
  moveJobFromActiveToWait does the same for rate-limited jobs).
  KEYS: 1 active, 2 wait, 3 stalled, 4 marker, 5 events, 6 meta, 7 prioritized
  ARGV: 1 key prefix, 2 id, 3 token, 4 "back": at the back of wait instead
        (a draining worker giving away jobs it will not run: taking the
        same one again at once would keep it from the others)
  Returns 0, or -1 (no such job), -2/-6 for a lock that is gone or someone
  else's.
]]
--@include _lock
local rcall = redis.call
local P, id, token = ARGV[1], ARGV[2], ARGV[3]
local J = P .. id
local lockErr = am2z_release_lock(J, ARGV[3], KEYS[3], id)
if lockErr then return lockErr end
if rcall("LREM", KEYS[1], -1, id) == 0 then return -3 end
local prio = tonumber(rcall("HGET", J, "priority")) or 0
if prio > 0 then
  rcall("ZADD", KEYS[7], prio * 4294967296, id)
else
  if ARGV[4] == "back" then rcall("LPUSH", KEYS[2], id) else rcall("RPUSH", KEYS[2], id) end
end
if not rcall("HGET", KEYS[6], "paused") then rcall("ZADD", KEYS[4], 0, "0") end
rcall("HINCRBY", J, "ats", -1)
rcall("XADD", KEYS[5], "*", "event", "waiting", "jobId", id, "prev", "active")
return 0
