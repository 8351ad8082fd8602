--[[
  Renews a job's lock if this worker still holds it.
  KEYS: 1 lock key, 2 stalled
  ARGV: 1 token, 2 duration (ms), 3 id
  Returns 1 when renewed, 0 when the lock is gone or someone else's.
]]
if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("SET", KEYS[1], ARGV[1], "PX", tonumber(ARGV[2]))
  redis.call("SREM", KEYS[2], ARGV[3])
  return 1
end
return 0
