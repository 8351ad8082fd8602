--[[
  Deletes a paused queue entirely, up to `count` jobs per call (BullMQ 6
  obliterate). Returns -1 when the queue is not paused, -2 when it has
  active jobs and force is not set, 1 while jobs remain, 0 when done (then
  the queue-level keys are gone too).
  KEYS: 1 meta, 2 base key prefix "<prefix>:<queue>"
  ARGV: 1 count, 2 "1" to force
]]
local rcall = redis.call
local base = KEYS[2]
local P = base .. ":"
if rcall("HEXISTS", KEYS[1], "paused") == 0 then return -1 end
local count = tonumber(ARGV[1])
local active = rcall("LRANGE", P .. "active", 0, -1)
if #active > 0 and ARGV[2] ~= "1" then return -2 end
-- Removes ids in order while the budget lasts; returns how many it removed.
local function remove_ids(ids)
  local n = 0
  for _, id in ipairs(ids) do
    if count <= 0 then break end
    rcall("DEL", P .. id, P .. id .. ":logs", P .. id .. ":lock", P .. id .. ":dependencies",
      P .. id .. ":processed", P .. id .. ":failed", P .. id .. ":unsuccessful")
    count = count - 1
    n = n + 1
  end
  return n
end
local lists = { "active", "wait", "paused" }
local sets = { "delayed", "completed", "failed", "prioritized", "waiting-children" }
for _, l in ipairs(lists) do
  if count > 0 then
    local n = remove_ids(rcall("LRANGE", P .. l, 0, count - 1))
    if n > 0 then rcall("LTRIM", P .. l, n, -1) end
  end
end
for _, z in ipairs(sets) do
  if count > 0 then
    local ids = rcall("ZRANGE", P .. z, 0, count - 1)
    local n = remove_ids(ids)
    if n > 0 then rcall("ZREM", P .. z, unpack(ids, 1, n)) end
  end
end
if count <= 0 then return 1 end
-- Jobs remain only if a list or set is still non-empty.
for _, l in ipairs(lists) do if rcall("LLEN", P .. l) > 0 then return 1 end end
for _, z in ipairs(sets) do if rcall("ZCARD", P .. z) > 0 then return 1 end end
for _, k in ipairs({ "events", "delay", "stalled-check", "stalled", "id", "pc", "marker", "meta",
                     "metrics:completed", "metrics:completed:data", "metrics:failed",
                     "metrics:failed:data", "limiter", "repeat", "priority" }) do
  rcall("DEL", P .. k)
end
return 0
