--[[
  Moves an active job to completed or failed (BullMQ 6 semantics): checks
  and releases the lock, keeps or removes the job by the retention options,
  writes the events, counts the attempt.
  KEYS: 1 wait, 2 active, 3 prioritized, 4 events, 5 stalled, 6 meta, 7 target (completed|failed),
        8 limiter, 9 delayed, 10 pc, 11 marker
  ARGV: 1 key prefix, 2 id, 3 now, 4 field (returnvalue|failedReason), 5 value,
        6 target name, 7 token, 8 keep count (-1: all), 9 keep age (s, 0: none),
        10 keep limit, 11 stacktrace JSON or "", 12 opts.attempts,
        13 "1" to fetch the next job (with token ARGV[7]), 14 lock duration,
        15 limiter max, 16 limiter duration, 17 worker name,
        18 (optional) an extra field stored in the job hash and carried by the
        completed/failed event, 19 its value (am2z: the serialized error)
  Returns 0 (or, fetching, the next job as moveToActive does), or -1 (no
  job), -2 (lock missing), -6 (lock held by another worker), -3 (not active).
]]
--@include _lock
--@include _fetch
local rcall = redis.call
local P, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local J = P .. id
local lockErr = am2z_release_lock(J, ARGV[7], KEYS[5], id)
if lockErr then return lockErr end
if ARGV[11] ~= "" then
  rcall("HMSET", J, "failedReason", ARGV[5], "stacktrace", ARGV[11])
end
if rcall("LREM", KEYS[2], -1, id) == 0 then return -3 end

-- One read of meta serves the events limit here and the fetch below.
local meta = rcall("HMGET", KEYS[6], "paused", "concurrency", "max", "duration", "opts.maxLenEvents")
local maxEvents = meta[5] or 10000
local atm = rcall("HINCRBY", J, "atm", 1)

local function remove_job(jid)
  rcall("DEL", P .. jid, P .. jid .. ":logs", P .. jid .. ":lock")
end

local keepCount, keepAge, keepLimit = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
if keepCount == 0 then
  remove_job(id)
else
  rcall("ZADD", KEYS[7], now, id)
  rcall("HMSET", J, ARGV[4], ARGV[5], "finishedOn", now)
  if ARGV[6] == "failed" then rcall("HDEL", J, "defa") end
  if keepAge > 0 then
    local old = rcall("ZRANGEBYSCORE", KEYS[7], 0, now - keepAge * 1000, "LIMIT", 0, keepLimit)
    for _, jid in ipairs(old) do remove_job(jid) end
    if #old > 0 then rcall("ZREM", KEYS[7], unpack(old)) end
  end
  if keepCount > 0 then
    local extra = rcall("ZREVRANGE", KEYS[7], keepCount, -1)
    for _, jid in ipairs(extra) do remove_job(jid) end
    if #extra > 0 then rcall("ZREMRANGEBYRANK", KEYS[7], 0, #extra - 1) end
  end
end

-- Trimmed with this entry (BullMQ trims first, then adds: the same bound).
local extraField = ARGV[18]
if extraField and extraField ~= "" then
  if keepCount ~= 0 then rcall("HSET", J, extraField, ARGV[19]) end
  rcall("XADD", KEYS[4], "MAXLEN", "~", maxEvents, "*", "event", ARGV[6], "jobId", id, ARGV[4], ARGV[5],
    "prev", "active", extraField, ARGV[19])
else
  rcall("XADD", KEYS[4], "MAXLEN", "~", maxEvents, "*", "event", ARGV[6], "jobId", id, ARGV[4], ARGV[5],
    "prev", "active")
end
if ARGV[6] == "failed" and atm >= (tonumber(ARGV[12]) or 0) then
  rcall("XADD", KEYS[4], "*", "event", "retries-exhausted", "jobId", id, "attemptsMade", atm)
end
-- Fetch-next: hand the worker its next job in the same round trip.
if ARGV[13] == "1" then
  local nxt = am2z_fetch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[8], KEYS[9], KEYS[6], KEYS[10],
    KEYS[11], P, now, ARGV[7], ARGV[14], ARGV[15], ARGV[16], ARGV[17], meta)
  if type(nxt[1]) == "table" or nxt[3] > 0 or nxt[4] > 0 then return nxt end
end
if rcall("LLEN", KEYS[1]) == 0 and rcall("LLEN", KEYS[2]) == 0 and rcall("ZCARD", KEYS[3]) == 0 then
  rcall("XADD", KEYS[4], "*", "event", "drained")
end
return 0
