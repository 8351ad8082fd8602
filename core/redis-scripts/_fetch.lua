-- Shared by moveToActive and moveToFinished (fetch-next): included by
-- cmake/embed_scripts.cmake where a script says --@include _fetch.
-- Takes the next job for a worker (BullMQ 6 semantics): promotes due
-- delayed jobs, honours pause, global concurrency and the rate limiter,
-- takes from wait (tail) before prioritized (lowest score), locks it, marks
-- it active. Returns { job hash as a flat array, id, 0, 0 } or
-- { 0, 0, rate-limit ttl, next delayed ms }.
local function am2z_fetch(k_wait, k_active, k_prio, k_events, k_limiter, k_delayed, k_meta, k_pc,
                          k_marker, P, now, token, lockDuration, limiterMax, limiterDuration, wname,
                          meta)
  local rcall = redis.call
  -- The caller may pass the meta fields it read already (saves a call).
  meta = meta or rcall("HMGET", k_meta, "paused", "concurrency", "max", "duration")
  local paused = meta[1] and true or false
  local maxed = meta[2] and rcall("LLEN", k_active) >= tonumber(meta[2]) or false

  local due = rcall("ZRANGEBYSCORE", k_delayed, 0, (now + 1) * 4096 - 1, "LIMIT", 0, 1000)
  if #due > 0 then
    for _, jid in ipairs(due) do
      rcall("ZREM", k_delayed, jid)
      local prio = tonumber(rcall("HGET", P .. jid, "priority")) or 0
      if prio > 0 then
        local c = rcall("INCR", k_pc)
        rcall("ZADD", k_prio, prio * 4294967296 + (c % 4294967296), jid)
      else
        rcall("LPUSH", k_wait, jid)
      end
      rcall("XADD", k_events, "*", "event", "waiting", "jobId", jid, "prev", "delayed")
      rcall("HSET", P .. jid, "delay", 0)
    end
    if not paused and not maxed then rcall("ZADD", k_marker, 0, "0") end
  end

  local maxJobs = tonumber(meta[3]) or tonumber(limiterMax)
  if maxJobs and maxJobs <= 0 then maxJobs = nil end
  if maxJobs then
    local current = tonumber(rcall("GET", k_limiter) or "0")
    if current >= maxJobs then
      local ttl = rcall("PTTL", k_limiter)
      if ttl > 0 then return { 0, 0, ttl, 0 } end
      if ttl == 0 then rcall("DEL", k_limiter) end
    end
  end

  local function next_delayed()
    local first = rcall("ZRANGE", k_delayed, 0, 0, "WITHSCORES")
    if #first > 0 then return math.floor(tonumber(first[2]) / 4096) end
    return 0
  end

  if paused or maxed then return { 0, 0, 0, next_delayed() } end

  local id = rcall("RPOPLPUSH", k_wait, k_active)
  if id and string.sub(id, 1, 2) == "0:" then
    rcall("LREM", k_active, 1, id)
    id = rcall("RPOPLPUSH", k_wait, k_active)
  end
  if not id then
    local p = rcall("ZPOPMIN", k_prio)
    if #p > 0 then
      id = p[1]
      rcall("LPUSH", k_active, id)
    else
      rcall("DEL", k_pc)
    end
  end
  if not id then return { 0, 0, 0, next_delayed() } end

  local J = P .. id
  if maxJobs then
    local n = rcall("INCR", k_limiter)
    if n == 1 then
      local d = tonumber(limiterDuration) or tonumber(meta[4]) or 0
      if d <= 0 then d = tonumber(meta[4]) or 0 end
      if d > 0 then rcall("PEXPIRE", k_limiter, math.floor(d)) end
    end
  end
  if token ~= "0" then
    rcall("SET", J .. ":lock", token, "PX", tonumber(lockDuration))
  end
  rcall("XADD", k_events, "*", "event", "active", "jobId", id, "prev", "waiting")
  if wname ~= "" then
    rcall("HMSET", J, "processedOn", now, "pb", wname)
  else
    rcall("HSET", J, "processedOn", now)
  end
  rcall("HINCRBY", J, "ats", 1)
  -- Another blocked worker is woken only when there is more to take: a
  -- marker left for an empty queue makes it fetch for nothing.
  if rcall("LLEN", k_wait) > 0 or rcall("ZCARD", k_prio) > 0 then rcall("ZADD", k_marker, 0, "0") end
  return { rcall("HGETALL", J), id, 0, 0 }
end
