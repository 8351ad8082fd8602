--[[
  Stalled-job recovery (BullMQ 6, two phases): jobs marked as candidates by
  the previous run whose lock has expired go back to the front of wait,
  with stc+1 and, past maxStalledCount, a deferred failure (defa). Then
  every active job becomes a candidate for the next run. Guarded by
  stalled-check so one worker per interval does it.
  KEYS: 1 stalled, 2 wait, 3 active, 4 stalled-check, 5 meta, 6 events, 7 marker
  ARGV: 1 max stalled count, 2 key prefix, 3 now, 4 interval (ms)
  Returns the recovered ids.
]]
local rcall = redis.call
if rcall("EXISTS", KEYS[4]) == 1 then return {} end
rcall("SET", KEYS[4], ARGV[3], "PX", tonumber(ARGV[4]))
local maxEvents = rcall("HGET", KEYS[5], "opts.maxLenEvents") or 10000
rcall("XTRIM", KEYS[6], "MAXLEN", "~", maxEvents)
local P, maxStalled = ARGV[2], tonumber(ARGV[1])
local m = rcall("HMGET", KEYS[5], "paused", "concurrency")
local recovered = {}
local candidates = rcall("SMEMBERS", KEYS[1])
rcall("DEL", KEYS[1])
for _, id in ipairs(candidates) do
  local J = P .. id
  if rcall("EXISTS", J .. ":lock") == 0 and rcall("LREM", KEYS[3], 1, id) > 0 then
    local stc = rcall("HINCRBY", J, "stc", 1)
    if stc > maxStalled then
      rcall("HSET", J, "defa", "job stalled more than allowable limit")
    end
    rcall("RPUSH", KEYS[2], id)
    if not m[1] then rcall("ZADD", KEYS[7], 0, "0") end
    rcall("XADD", KEYS[6], "*", "event", "waiting", "jobId", id, "prev", "active")
    rcall("XADD", KEYS[6], "*", "event", "stalled", "jobId", id)
    recovered[#recovered + 1] = id
  end
end
local active = rcall("LRANGE", KEYS[3], 0, -1)
for i = 1, #active, 7000 do
  rcall("SADD", KEYS[1], unpack(active, i, math.min(i + 6999, #active)))
end
return recovered
