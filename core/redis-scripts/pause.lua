--[[
  Pause or resume a queue (v6: jobs stay where they are).
  KEYS: 1 meta, 2 marker, 3 events, 4 wait, 5 prioritized, 6 delayed
  ARGV: 1 "paused" | "resumed"
]]
local rcall = redis.call
if ARGV[1] == "paused" then
  rcall("HSET", KEYS[1], "paused", 1)
  rcall("DEL", KEYS[2])
else
  rcall("HDEL", KEYS[1], "paused")
  if rcall("LLEN", KEYS[4]) > 0 or rcall("ZCARD", KEYS[5]) > 0 then
    rcall("ZADD", KEYS[2], 0, "0")
  else
    local first = rcall("ZRANGE", KEYS[6], 0, 0, "WITHSCORES")
    if #first > 0 then rcall("ZADD", KEYS[2], tonumber(first[2]) / 4096, "1") end
  end
end
rcall("XADD", KEYS[3], "*", "event", ARGV[1])
return 0
