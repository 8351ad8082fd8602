--[[
  A failed attempt that will be retried: back to delayed (delay > 0) or
  straight back to wait/prioritized (delay 0), counting the attempt and
  recording failedReason and stacktrace (BullMQ 6 moveToDelayed/retryJob).
  KEYS: 1 wait, 2 active, 3 prioritized, 4 events, 5 stalled, 6 meta, 7 delayed, 8 marker, 9 pc
  ARGV: 1 key prefix, 2 id, 3 now, 4 delay (ms), 5 token, 6 failedReason, 7 stacktrace JSON
  Returns 0 or the negative codes of moveToFinished.
]]
--@include _lock
local rcall = redis.call
local P, id, now, delay = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local J = P .. id
local lockErr = am2z_release_lock(J, ARGV[5], KEYS[5], id)
if lockErr then return lockErr end
rcall("HMSET", J, "failedReason", ARGV[6], "stacktrace", ARGV[7])
if rcall("LREM", KEYS[2], -1, id) == 0 then return -3 end
rcall("HINCRBY", J, "atm", 1)
local maxEvents = rcall("HGET", KEYS[6], "opts.maxLenEvents") or 10000
if delay > 0 then
  local due = now + delay
  local base = due * 4096
  local score = base
  local last = rcall("ZREVRANGEBYSCORE", KEYS[7], base + 4095, base, "WITHSCORES", "LIMIT", 0, 1)
  if #last > 0 then score = math.min(tonumber(last[2]) + 1, base + 4095) end
  rcall("HSET", J, "delay", delay)
  rcall("ZADD", KEYS[7], score, id)
  rcall("XADD", KEYS[4], "MAXLEN", "~", maxEvents, "*", "event", "delayed", "jobId", id, "delay", due)
  local first = rcall("ZRANGE", KEYS[7], 0, 0, "WITHSCORES")
  if #first > 0 then rcall("ZADD", KEYS[8], tonumber(first[2]) / 4096, "1") end
else
  local m = rcall("HMGET", KEYS[6], "paused", "concurrency")
  local pausedOrMaxed = m[1] or (m[2] and rcall("LLEN", KEYS[2]) >= tonumber(m[2]))
  local prio = tonumber(rcall("HGET", J, "priority")) or 0
  if prio > 0 then
    local c = rcall("INCR", KEYS[9])
    rcall("ZADD", KEYS[3], prio * 4294967296 + (c % 4294967296), id)
  else
    rcall("LPUSH", KEYS[1], id)
  end
  if not pausedOrMaxed then rcall("ZADD", KEYS[8], 0, "0") end
  rcall("XADD", KEYS[4], "MAXLEN", "~", maxEvents, "*", "event", "waiting", "jobId", id, "prev", "active")
end
return 0
