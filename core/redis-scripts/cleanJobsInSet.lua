--[[
  Removes up to `limit` jobs of one state older than `grace` ms (BullMQ 6
  clean): completed/failed by finish time (oldest first); wait/paused/
  active (unlocked only)/delayed/prioritized by the first of finishedOn,
  processedOn, timestamp. Emits `cleaned`.
  KEYS: 1 the state's list or zset, 2 events, 3 meta
  ARGV: 1 key prefix, 2 cutoff (ms: now - grace), 3 limit (0: no limit), 4 state name,
        5 "list" | "zset"
  Returns the removed ids.
]]
local rcall = redis.call
local P, cutoff, limit, state = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local removed = {}
local function full() return limit > 0 and #removed >= limit end
local function remove(id)
  rcall("DEL", P .. id, P .. id .. ":logs")
  removed[#removed + 1] = id
end
if state == "completed" or state == "failed" then
  local ids = rcall("ZRANGEBYSCORE", KEYS[1], 0, cutoff, "LIMIT", 0, limit > 0 and limit or -1)
  for _, id in ipairs(ids) do remove(id) end
  if #ids > 0 then rcall("ZREM", KEYS[1], unpack(ids)) end
else
  local ids = ARGV[5] == "list" and rcall("LRANGE", KEYS[1], 0, -1) or rcall("ZRANGE", KEYS[1], 0, -1)
  for _, id in ipairs(ids) do
    if full() then break end
    local t = rcall("HMGET", P .. id, "finishedOn", "processedOn", "timestamp")
    local ts = tonumber(t[1] or t[2] or t[3])
    local locked = state == "active" and rcall("EXISTS", P .. id .. ":lock") == 1
    if ts and ts <= cutoff and not locked then
      remove(id)
      if ARGV[5] == "list" then rcall("LREM", KEYS[1], 0, id) else rcall("ZREM", KEYS[1], id) end
    end
  end
end
local maxEvents = rcall("HGET", KEYS[3], "opts.maxLenEvents") or 10000
rcall("XADD", KEYS[2], "MAXLEN", "~", maxEvents, "*", "event", "cleaned", "count", #removed)
return removed
