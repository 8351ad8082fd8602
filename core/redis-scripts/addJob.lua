--[[
  Adds one job (BullMQ 6 data model): standard, prioritized or delayed.
  KEYS: 1 wait, 2 prioritized, 3 delayed, 4 meta, 5 id, 6 events, 7 marker, 8 pc, 9 active
  ARGV: 1 key prefix "<prefix>:<queue>:", 2 custom id or "", 3 name, 4 data (JSON),
        5 opts (JSON), 6 timestamp (ms), 7 delay (ms), 8 priority, 9 lifo ("1"/"0"),
        10 "1": for a duplicate, also report how the existing job ended (am2z's
        deterministic child ids: a re-run parent reuses a finished child's result)
  Returns the job id (the existing one for a duplicate custom id); with
  ARGV[10] = "1" a duplicate returns { id, finishedOn, returnvalue,
  failedReason, am2zError } instead.
]]
local rcall = redis.call
local P = ARGV[1]
local counter = rcall("INCR", KEYS[5])
-- One read of meta serves the events limit and the paused/maxed check.
local meta = rcall("HMGET", KEYS[4], "opts.maxLenEvents", "paused", "concurrency")
local maxEvents = meta[1]
if not maxEvents then
  maxEvents = 10000
  rcall("HSET", KEYS[4], "opts.maxLenEvents", maxEvents)
end

local id = ARGV[2]
if id == "" then
  id = string.format("%d", counter)
elseif rcall("EXISTS", P .. id) == 1 then
  rcall("XADD", KEYS[6], "MAXLEN", "~", maxEvents, "*", "event", "duplicated", "jobId", id)
  if ARGV[10] == "1" then
    local f = rcall("HMGET", P .. id, "finishedOn", "returnvalue", "failedReason", "am2zError")
    return { id, f[1] or "", f[2] or "", f[3] or "", f[4] or "" }
  end
  return id
end

local J = P .. id
local timestamp, delay, priority = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
rcall("HMSET", J, "name", ARGV[3], "data", ARGV[4], "opts", ARGV[5], "timestamp", ARGV[6],
  "delay", ARGV[7], "priority", ARGV[8])
rcall("XADD", KEYS[6], "*", "event", "added", "jobId", id, "name", ARGV[3])

local function paused_or_maxed()
  if meta[2] then return true end
  if meta[3] and rcall("LLEN", KEYS[9]) >= tonumber(meta[3]) then return true end
  return false
end

if delay > 0 then
  local due = timestamp + delay
  local base = due * 4096
  local score = base
  local last = rcall("ZREVRANGEBYSCORE", KEYS[3], base + 4095, base, "WITHSCORES", "LIMIT", 0, 1)
  if #last > 0 then
    score = math.min(tonumber(last[2]) + 1, base + 4095)
  end
  rcall("ZADD", KEYS[3], score, id)
  rcall("XADD", KEYS[6], "MAXLEN", "~", maxEvents, "*", "event", "delayed", "jobId", id,
    "delay", due)
  local first = rcall("ZRANGE", KEYS[3], 0, 0, "WITHSCORES")
  if #first > 0 then
    rcall("ZADD", KEYS[7], tonumber(first[2]) / 4096, "1")
  end
elseif priority > 0 then
  local c = rcall("INCR", KEYS[8])
  rcall("ZADD", KEYS[2], priority * 4294967296 + (c % 4294967296), id)
  if not paused_or_maxed() then rcall("ZADD", KEYS[7], 0, "0") end
  rcall("XADD", KEYS[6], "MAXLEN", "~", maxEvents, "*", "event", "waiting", "jobId", id)
else
  if ARGV[9] == "1" then rcall("RPUSH", KEYS[1], id) else rcall("LPUSH", KEYS[1], id) end
  if not paused_or_maxed() then rcall("ZADD", KEYS[7], 0, "0") end
  rcall("XADD", KEYS[6], "MAXLEN", "~", maxEvents, "*", "event", "waiting", "jobId", id)
end
return id
