--[[
  Removes every job waiting to run (wait, paused, prioritized, and delayed
  when asked), keys and all. No events (BullMQ 6 drain).
  KEYS: 1 wait, 2 paused, 3 prioritized, 4 delayed
  ARGV: 1 key prefix, 2 "1" to include delayed
  Returns the number of jobs removed.
]]
local rcall = redis.call
local P = ARGV[1]
local n = 0
local function remove_all(ids)
  for _, id in ipairs(ids) do
    rcall("DEL", P .. id, P .. id .. ":logs", P .. id .. ":lock")
    n = n + 1
  end
end
remove_all(rcall("LRANGE", KEYS[1], 0, -1))
remove_all(rcall("LRANGE", KEYS[2], 0, -1))
remove_all(rcall("ZRANGE", KEYS[3], 0, -1))
rcall("DEL", KEYS[1], KEYS[2], KEYS[3])
if ARGV[2] == "1" then
  remove_all(rcall("ZRANGE", KEYS[4], 0, -1))
  rcall("DEL", KEYS[4])
end
return n
