--[[
  Takes the next job for a worker (BullMQ 6 semantics): promotes due delayed
  jobs, honours pause, global concurrency and the rate limiter, then takes
  from wait (tail) before prioritized (lowest score), locks it and marks it
  active.
  KEYS: 1 wait, 2 active, 3 prioritized, 4 events, 5 limiter, 6 delayed, 7 meta, 8 pc, 9 marker
  ARGV: 1 key prefix, 2 now (ms), 3 lock token ("0": no lock), 4 lock duration (ms),
        5 limiter max (0: none), 6 limiter duration (ms), 7 worker name or ""
  Returns { job hash as a flat array, id, rate-limit ttl, next delayed ms } or
  { 0, 0, ttl, next }.
]]
local rcall = redis.call
local P, now = ARGV[1], tonumber(ARGV[2])
local meta = rcall("HMGET", KEYS[7], "paused", "concurrency", "max", "duration", "opts.maxLenEvents")
local maxEvents = meta[5] or 10000
local paused = meta[1] and true or false
local maxed = meta[2] and rcall("LLEN", KEYS[2]) >= tonumber(meta[2]) or false

-- Promote delayed jobs that are due.
local due = rcall("ZRANGEBYSCORE", KEYS[6], 0, (now + 1) * 4096 - 1, "LIMIT", 0, 1000)
if #due > 0 then
  for _, jid in ipairs(due) do
    rcall("ZREM", KEYS[6], jid)
    local prio = tonumber(rcall("HGET", P .. jid, "priority")) or 0
    if prio > 0 then
      local c = rcall("INCR", KEYS[8])
      rcall("ZADD", KEYS[3], prio * 4294967296 + (c % 4294967296), jid)
    else
      rcall("LPUSH", KEYS[1], jid)
    end
    rcall("XADD", KEYS[4], "*", "event", "waiting", "jobId", jid, "prev", "delayed")
    rcall("HSET", P .. jid, "delay", 0)
  end
  if not paused and not maxed then rcall("ZADD", KEYS[9], 0, "0") end
end

local maxJobs = tonumber(meta[3]) or tonumber(ARGV[5])
if maxJobs and maxJobs <= 0 then maxJobs = nil end
if maxJobs then
  local current = tonumber(rcall("GET", KEYS[5]) or "0")
  if current >= maxJobs then
    local ttl = rcall("PTTL", KEYS[5])
    if ttl > 0 then return { 0, 0, ttl, 0 } end
    if ttl == 0 then rcall("DEL", KEYS[5]) end
  end
end

local function next_delayed()
  local first = rcall("ZRANGE", KEYS[6], 0, 0, "WITHSCORES")
  if #first > 0 then return math.floor(tonumber(first[2]) / 4096) end
  return 0
end

if paused or maxed then return { 0, 0, 0, next_delayed() } end

local id = rcall("RPOPLPUSH", KEYS[1], KEYS[2])
if id and string.sub(id, 1, 2) == "0:" then
  rcall("LREM", KEYS[2], 1, id)
  id = rcall("RPOPLPUSH", KEYS[1], KEYS[2])
end
if not id then
  local p = rcall("ZPOPMIN", KEYS[3])
  if #p > 0 then
    id = p[1]
    rcall("LPUSH", KEYS[2], id)
  else
    rcall("DEL", KEYS[8])
  end
end
if not id then return { 0, 0, 0, next_delayed() } end

local J = P .. id
if maxJobs then
  local n = rcall("INCR", KEYS[5])
  if n == 1 then
    local d = tonumber(ARGV[6]) or tonumber(meta[4]) or 0
    if d > 0 then rcall("PEXPIRE", KEYS[5], math.floor(d)) end
  end
end
if ARGV[3] ~= "0" then
  rcall("SET", J .. ":lock", ARGV[3], "PX", tonumber(ARGV[4]))
end
rcall("XADD", KEYS[4], "*", "event", "active", "jobId", id, "prev", "waiting")
if ARGV[7] ~= "" then
  rcall("HMSET", J, "processedOn", now, "pb", ARGV[7])
else
  rcall("HSET", J, "processedOn", now)
end
rcall("HINCRBY", J, "ats", 1)
rcall("ZADD", KEYS[9], 0, "0")
return { rcall("HGETALL", J), id, 0, 0 }
