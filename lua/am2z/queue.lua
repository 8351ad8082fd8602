--[[
am2z.queue -- BullMQ 6 compatible queues: Queue, Worker, QueueEvents, Job.

Everything written to Redis is what BullMQ 6 writes (keys `<prefix>:<queue>:…`,
job hashes, states, locks, the events stream), so Node producers, workers
and Bull Board interoperate. The server-side scripts are this project's own
(core/redis-scripts), run by SHA.

Workers run jobs as coroutines on the engine loop, up to `concurrency` at a
time; idle workers block on the queue's marker (BZPOPMIN) on a connection of
their own, as BullMQ's do.

Must not: block, or talk to hiredis/libuv other than through am2z.redis.
]]

local core = require("am2z.core")
local cjson = require("cjson")
local json = require("am2z.json")
local errors = require("am2z.errors")
local redis = require("am2z.redis")
local log = require("am2z.log")

local type, pairs, ipairs, tostring, tonumber, setmetatable, error, pcall, xpcall =
  type, pairs, ipairs, tostring, tonumber, setmetatable, error, pcall, xpcall
local format, floor, min, max = string.format, math.floor, math.min, math.max
local json_null = cjson.null

local M = {}

-- Open workers and event readers, so am2z-lua can close them on SIGINT/SIGTERM.
local open_handles = setmetatable({}, { __mode = "k" })
M._open = open_handles

local VERSION = "am2z-lua:" .. tostring(core.version)

local function wall_ms()
  return core.wall_ms()
end

local describe = require("am2z.processor").describe

local function check_queue_name(fname, name)
  if type(name) ~= "string" or name == "" or name:find(":", 1, true) then
    error(format('%s: expected a queue name (non-empty string without ":"), got %s', fname,
      describe(name)), 3)
  end
end

local function keys_for(prefix, name)
  local P = prefix .. ":" .. name .. ":"
  return {
    P = P, wait = P .. "wait", active = P .. "active", prioritized = P .. "prioritized",
    delayed = P .. "delayed", completed = P .. "completed", failed = P .. "failed",
    ["waiting-children"] = P .. "waiting-children", paused = P .. "paused",
    meta = P .. "meta", id = P .. "id", events = P .. "events", marker = P .. "marker",
    pc = P .. "pc", stalled = P .. "stalled", ["stalled-check"] = P .. "stalled-check",
    limiter = P .. "limiter",
  }
end

local scripts = {}
local function script(name)
  local s = scripts[name]
  if not s then
    s = redis.script(assert(core.redis_script(name), "missing server-side script " .. name))
    scripts[name] = s
  end
  return s
end

local function decode(text, fallback)
  if text == nil or text == json_null then return fallback end
  local ok, v = pcall(cjson.decode, text)
  if ok then return v end
  return fallback
end

local function random_id()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(16) or tostring(math.random()) .. tostring(wall_ms())
  if f then f:close() end
  return (bytes:gsub(".", function(c) return format("%02x", c:byte()) end)):sub(1, 32)
end

local function connect(opts, name, logger)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.name = name
  o.logger = o.logger or logger
  local c, err = redis.connect(o)
  if not c then error(err, 0) end
  return c
end

-- --------------------------------------------------------------------- Job

---@class am2z.Job
local Job = {}
Job.__index = Job
M.Job = Job

local function job_from_hash(queue, id, h)
  local j = setmetatable({ id = id, queue = queue }, Job)
  j.name = h.name
  if h.data ~= nil then
    local okd, d = pcall(cjson.decode, h.data)
    if okd then j.data = d else
      j.data = nil
      j._badData = "job data is not valid JSON (" .. tostring(d):gsub("^.-: ", "") .. ")"
    end
  else
    j.data = {}
  end
  j.opts = decode(h.opts, {})
  j.timestamp = tonumber(h.timestamp)
  j.delay = tonumber(h.delay) or 0
  j.priority = tonumber(h.priority) or 0
  j.attemptsMade = tonumber(h.atm or h.attemptsMade) or 0
  j.attemptsStarted = tonumber(h.ats) or 0
  j.stalledCounter = tonumber(h.stc) or 0
  j.processedOn = tonumber(h.processedOn)
  j.finishedOn = tonumber(h.finishedOn)
  j.progress = decode(h.progress, 0)
  j.returnvalue = h.returnvalue and decode(h.returnvalue, h.returnvalue) or nil
  j.failedReason = h.failedReason
  j.stacktrace = decode(h.stacktrace, {})
  j.processedBy = h.pb
  j._defa = h.defa
  -- A job another producer wrote without the fields every BullMQ job has
  -- fails unprocessed, saying which ones.
  local missing = {}
  for _, f in ipairs({ "name", "data", "opts", "timestamp" }) do
    if h[f] == nil then missing[#missing + 1] = f end
  end
  if #missing > 0 and not j._badData then
    j._badData = "job hash is missing field(s): " .. table.concat(missing, ", ")
  end
  j._raw = h
  return j
end

local function flat_to_hash(arr)
  local h = {}
  for i = 1, #arr, 2 do h[arr[i]] = arr[i + 1] end
  return h
end

--- Sets progress (number 0-100 or a table); stored on the job, emitted as `progress`.
function Job:updateProgress(p)
  if type(p) ~= "number" and type(p) ~= "table" then
    error("job:updateProgress: expected a number or a table, got " .. describe(p), 2)
  end
  local q = self.queue
  local r, err = script("updateProgress"):run(q:_conn(), { q.keys.P .. self.id, q.keys.events, q.keys.meta },
    { self.id, json.encode(p) })
  if r == nil then return nil, err end
  if r == -1 then return nil, errors.ValidationError("jobId", self.id, "job " .. self.id .. " does not exist") end
  self.progress = p
  if self._worker then self._worker:_emit("progress", self, p) end
  return true
end

--- Appends a line to the job's log (J:logs, oldest first).
function Job:log(line)
  if type(line) ~= "string" then line = tostring(line) end
  local q = self.queue
  return q:_conn():call("RPUSH", q.keys.P .. self.id .. ":logs", line)
end

--- The job's state as BullMQ reports it.
function Job:getState()
  return self.queue:getJobState(self.id)
end

--- Waits until the job completes (its return value) or fails (nil + error).
function Job:waitUntilFinished(events, ttl)
  return events:_waitFor(self.id, ttl)
end

-- ------------------------------------------------------------------- Queue

---@class am2z.Queue
local Queue = {}
Queue.__index = Queue
M.Queue = Queue

--- A queue handle. Connects on first use (inside an engine coroutine).
---@param name string
---@param opts table|nil { connection = am2z.redis options, prefix = "bull", logger }
function Queue.new(name, opts)
  check_queue_name("Queue.new", name)
  if opts ~= nil and type(opts) ~= "table" then
    error("Queue.new: expected a table of options, got " .. describe(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "connection" and k ~= "prefix" and k ~= "logger" and k ~= "maxLenEvents" then
      error("Queue.new: unknown option " .. describe(k), 2)
    end
  end
  local prefix = opts.prefix or "bull"
  if type(prefix) ~= "string" or prefix == "" then
    error("Queue.new: expected prefix to be a non-empty string, got " .. describe(prefix), 2)
  end
  return setmetatable({ name = name, prefix = prefix, keys = keys_for(prefix, name),
                        _opts = opts, _logger = opts.logger or log.createLogger({ source = "queue" }) },
    Queue)
end

function Queue:_conn()
  if not self._c then
    self._c = connect(self._opts.connection, nil, self._logger)
    self._c:call("HSET", self.keys.meta, "opts.maxLenEvents", self._opts.maxLenEvents or 10000,
      "version", VERSION)
  end
  return self._c
end

local function normalize_keep(v, fname)
  if v == nil then return nil end
  if v == true then return { count = 0 } end
  if v == false then return { count = -1 } end
  if type(v) == "number" then return { count = v } end
  if type(v) == "table" then return v end
  error(format("%s: expected removeOnComplete/removeOnFail to be a boolean, number or { age, count }, got %s",
    fname, describe(v)), 4)
end

local ADD_OPTS = { jobId = true, delay = true, priority = true, attempts = true, backoff = true,
                   removeOnComplete = true, removeOnFail = true, lifo = true, timestamp = true,
                   stackTraceLimit = true }

local function prepare_add(name, data, opts, fname)
  if type(name) ~= "string" then
    error(format("%s: expected a job name (string), got %s", fname, describe(name)), 3)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error(format("%s: expected a table of job options, got %s", fname, describe(opts)), 3)
  end
  opts = opts or {}
  local stored = {}
  for k, v in pairs(opts) do
    if not ADD_OPTS[k] then
      error(format("%s: unknown job option %s", fname, describe(k)), 3)
    end
    stored[k] = v
  end
  local jid = opts.jobId
  if jid ~= nil then
    if type(jid) ~= "string" or jid == "" or jid:find(":", 1, true) or jid == "0"
        or jid:match("^%d+$") then
      error(format('%s: expected jobId to be a non-empty string without ":" that is not an integer, got %s',
        fname, describe(jid)), 3)
    end
  end
  local delay = opts.delay or 0
  local priority = opts.priority or 0
  if type(delay) ~= "number" or delay < 0 then
    error(format("%s: expected delay to be a number of ms >= 0, got %s", fname, describe(delay)), 3)
  end
  if type(priority) ~= "number" or priority < 0 or priority > 2097151 or priority ~= floor(priority) then
    error(format("%s: expected priority to be an integer from 0 to 2097151, got %s", fname,
      describe(priority)), 3)
  end
  stored.attempts = opts.attempts or 0
  if type(stored.attempts) ~= "number" or stored.attempts < 0 then
    error(format("%s: expected attempts to be a number >= 0, got %s", fname, describe(opts.attempts)), 3)
  end
  if type(opts.backoff) == "number" then
    stored.backoff = { type = "fixed", delay = opts.backoff }
  elseif opts.backoff ~= nil and type(opts.backoff) ~= "table" then
    error(format("%s: expected backoff to be a number or { type, delay }, got %s", fname,
      describe(opts.backoff)), 3)
  end
  normalize_keep(opts.removeOnComplete, fname)
  normalize_keep(opts.removeOnFail, fname)
  local okd, data_json = pcall(json.encode, data == nil and {} or data)
  if not okd then
    error(format("%s: job data cannot be encoded as JSON: %s", fname, tostring(data_json)), 3)
  end
  local ts = opts.timestamp or floor(wall_ms())
  return { name = name, data = data, data_json = data_json, opts = stored,
           opts_json = cjson.encode(stored), jobId = jid or "", timestamp = ts,
           delay = floor(delay), priority = priority, lifo = opts.lifo and "1" or "0" }
end

function Queue:_add(a)
  local k = self.keys
  local id, err = script("addJob"):run(self:_conn(),
    { k.wait, k.prioritized, k.delayed, k.meta, k.id, k.events, k.marker, k.pc, k.active },
    { k.P, a.jobId, a.name, a.data_json, a.opts_json, string.format("%d", a.timestamp), a.delay,
      a.priority, a.lifo })
  if not id then return nil, err end
  local j = setmetatable({ id = id, queue = self, name = a.name, data = a.data, opts = a.opts,
                           timestamp = a.timestamp, delay = a.delay, priority = a.priority,
                           attemptsMade = 0, attemptsStarted = 0, progress = 0 }, Job)
  return j
end

--- Adds a job; returns the Job (with its id), or nil + error.
---@param name string
---@param data any JSON-encodable payload
---@param opts table|nil { jobId, delay, priority, attempts, backoff, removeOnComplete, removeOnFail, lifo, timestamp }
function Queue:add(name, data, opts)
  return self:_add(prepare_add(name, data, opts, "queue:add"))
end

--- Adds many jobs (pipelined, not atomic as a whole); returns the list of Jobs.
function Queue:addBulk(list)
  if type(list) ~= "table" then
    error("queue:addBulk: expected a list of { name, data, opts }, got " .. describe(list), 2)
  end
  local prepared = {}
  for i, e in ipairs(list) do
    if type(e) ~= "table" then
      error(format("queue:addBulk: expected list[%d] to be { name, data, opts }, got %s", i, describe(e)), 2)
    end
    prepared[i] = prepare_add(e.name, e.data, e.opts, "queue:addBulk")
  end
  self:_conn()
  local out, index = {}, {}
  for i, a in ipairs(prepared) do
    local id = core.spawn(function(q, x) local j, err = q:_add(x) return { j, err }, true end,
      "child", 0, 0, 1, self, a)
    index[id] = i
  end
  for _ = 1, #prepared do
    local id, _, r = core.wait_child()
    if id == nil then return nil, errors.CancelledError("addBulk interrupted") end
    if not r[1] then return nil, r[2] end
    out[index[id]] = r[1]
  end
  return out
end

--- Job counts per state, as BullMQ 6 reports them.
function Queue:getJobCounts(...)
  local c = self:_conn()
  local k = self.keys
  local types = { ... }
  if #types == 0 then
    types = { "active", "completed", "delayed", "failed", "prioritized", "waiting", "waiting-children" }
  end
  local out = {}
  for _, t in ipairs(types) do
    local n, err
    if t == "waiting" or t == "wait" then
      n, err = c:call("LLEN", k.wait)
    elseif t == "active" or t == "paused" then
      n, err = c:call("LLEN", k[t])
    elseif k[t] then
      n, err = c:call("ZCARD", k[t])
    else
      error("queue:getJobCounts: unknown state " .. describe(t), 2)
    end
    if n == nil then return nil, err end
    out[t == "wait" and "waiting" or t] = n
  end
  return out
end

--- The Job with this id, or nil.
function Queue:getJob(id)
  local arr, err = self:_conn():call("HGETALL", self.keys.P .. tostring(id))
  if arr == nil then return nil, err end
  if #arr == 0 then return nil end
  return job_from_hash(self, tostring(id), flat_to_hash(arr))
end

--- Jobs in the given states, like BullMQ's getJobs(types, start, end, asc).
function Queue:getJobs(types, start, stop, asc)
  if type(types) == "string" then types = { types } end
  types = types or { "waiting", "active", "delayed", "prioritized", "completed", "failed" }
  start, stop = start or 0, stop or -1
  local c, k = self:_conn(), self.keys
  local ids = {}
  for _, t in ipairs(types) do
    local key = t == "waiting" and k.wait or k[t]
    if not key then error("queue:getJobs: unknown state " .. describe(t), 2) end
    local r
    if t == "waiting" or t == "active" or t == "paused" then
      if asc then
        r = c:call("LRANGE", key, -(stop + 1), -(start + 1))
        if r then
          local rev = {}
          for i = #r, 1, -1 do rev[#rev + 1] = r[i] end
          r = rev
        end
      else
        r = c:call("LRANGE", key, start, stop)
      end
    else
      r = c:call(asc and "ZRANGE" or "ZREVRANGE", key, start, stop)
    end
    for _, id in ipairs(r or {}) do ids[#ids + 1] = id end
  end
  local jobs = {}
  for _, id in ipairs(ids) do
    local j = self:getJob(id)
    if j then jobs[#jobs + 1] = j end
  end
  return jobs
end

--- The state of job `id` ("completed", "failed", "delayed", "prioritized",
--- "active", "waiting", "waiting-children" or "unknown").
function Queue:getJobState(id)
  local k = self.keys
  id = tostring(id)
  return script("getState"):run(self:_conn(), { k.completed, k.failed, k.delayed, k.prioritized,
    k.active, k.wait, k.paused, k["waiting-children"], k.P .. id }, { id })
end

--- -1 no such job, 1 completed (+ return value), 2 failed (+ reason), 0 otherwise.
function Queue:_isFinished(id)
  local k = self.keys
  local r, err = script("isFinished"):run(self:_conn(), { k.completed, k.failed, k.P .. id }, { id })
  if not r then return nil, err end
  return r[1], r[2]
end

local function pause_resume(self, what)
  local k = self.keys
  return script("pause"):run(self:_conn(), { k.meta, k.marker, k.events, k.wait, k.prioritized, k.delayed },
    { what })
end

function Queue:pause() return pause_resume(self, "paused") end
function Queue:resume() return pause_resume(self, "resumed") end
function Queue:isPaused()
  return self:_conn():call("HEXISTS", self.keys.meta, "paused") == 1
end

--- Removes every job waiting to run (and the delayed ones when asked).
function Queue:drain(delayed)
  local k = self.keys
  return script("drain"):run(self:_conn(), { k.wait, k.paused, k.prioritized, k.delayed },
    { k.P, delayed and "1" or "0" })
end

local CLEAN_STATES = { completed = "zset", failed = "zset", delayed = "zset", prioritized = "zset",
                       wait = "list", waiting = "list", paused = "list", active = "list" }

--- Removes up to `limit` (0: all) jobs in `state` older than `graceMs`;
--- returns their ids.
function Queue:clean(graceMs, limit, state)
  state = state or "completed"
  local kind = CLEAN_STATES[state]
  if type(graceMs) ~= "number" or graceMs < 0 then
    error("queue:clean: expected graceMs to be a number >= 0, got " .. describe(graceMs), 2)
  end
  if not kind then error("queue:clean: unknown state " .. describe(state), 2) end
  local k = self.keys
  local key = (state == "waiting" or state == "wait") and k.wait or k[state]
  return script("cleanJobsInSet"):run(self:_conn(), { key, k.events, k.meta },
    { k.P, string.format("%d", floor(wall_ms() - graceMs)), limit or 0,
      state == "waiting" and "wait" or state, kind })
end

--- Deletes the queue and all its jobs (pausing it first, as BullMQ does).
--- Refuses while jobs are active unless { force = true }.
function Queue:obliterate(opts)
  opts = opts or {}
  local ok, err = self:pause()
  if not ok then return nil, err end
  local k = self.keys
  while true do
    local r, rerr = script("obliterate"):run(self:_conn(), { k.meta, self.prefix .. ":" .. self.name },
      { opts.count or 1000, opts.force and "1" or "0" })
    if r == nil then return nil, rerr end
    if r == -2 then
      return nil, errors.ValidationError("force", false,
        "queue:obliterate: cannot obliterate a queue with active jobs (pass { force = true })")
    end
    if r == 0 then return true end
  end
end

function Queue:close()
  if self._c then self._c:close() end
  self._c = nil
end

-- ------------------------------------------------------------------ Worker

---@class am2z.Worker
local Worker = {}
Worker.__index = Worker
M.Worker = Worker

local WORKER_OPTS = { connection = true, prefix = true, concurrency = true, lockDuration = true,
                      stalledInterval = true, maxStalledCount = true, drainDelay = true,
                      limiter = true, removeOnComplete = true, removeOnFail = true, name = true,
                      autorun = true, logger = true, _errorField = true }

local function b64(s)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

--- A worker: runs `processor(job)` for the queue's jobs, `concurrency` at a
--- time, each in its own coroutine. The processor returns the job's return
--- value; raising (or returning nil, err) fails the attempt.
function Worker.new(name, processor, opts)
  check_queue_name("Worker.new", name)
  if type(processor) ~= "function" then
    error("Worker.new: expected a processor function(job), got " .. describe(processor), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("Worker.new: expected a table of options, got " .. describe(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not WORKER_OPTS[k] then error("Worker.new: unknown option " .. describe(k), 2) end
  end
  local conc = opts.concurrency or 1
  if type(conc) ~= "number" or conc < 1 or conc ~= floor(conc) then
    error("Worker.new: expected concurrency to be a positive integer, got " .. describe(conc), 2)
  end
  for _, k in ipairs({ "lockDuration", "stalledInterval", "drainDelay" }) do
    if opts[k] ~= nil and (type(opts[k]) ~= "number" or opts[k] <= 0) then
      error(format("Worker.new: expected %s to be a positive number, got %s", k, describe(opts[k])), 2)
    end
  end
  local limiter = opts.limiter
  if limiter ~= nil and (type(limiter) ~= "table" or type(limiter.max) ~= "number"
      or type(limiter.duration) ~= "number") then
    error("Worker.new: expected limiter to be { max = n, duration = ms }, got " .. describe(limiter), 2)
  end
  local prefix = opts.prefix or "bull"
  local w = setmetatable({
    name = name, prefix = prefix, keys = keys_for(prefix, name), processor = processor,
    queue = Queue.new(name, { connection = opts.connection, prefix = prefix, logger = opts.logger }),
    concurrency = conc, lockDuration = opts.lockDuration or 30000,
    stalledInterval = opts.stalledInterval or 30000, maxStalledCount = opts.maxStalledCount or 1,
    drainDelay = opts.drainDelay or 5, limiter = limiter, workerName = opts.name,
    removeOnComplete = normalize_keep(opts.removeOnComplete, "Worker.new"),
    removeOnFail = normalize_keep(opts.removeOnFail, "Worker.new"),
    _opts = opts, _logger = opts.logger or log.createLogger({ source = "worker:" .. name }),
    _errorField = opts._errorField,
    _listeners = {}, _active = {}, _running = 0, _inflight = 0, _closing = false, _uuid = random_id(),
    _seq = 0,
  }, Worker)
  open_handles[w] = true
  if opts.autorun ~= false then w:run() end
  return w
end

function Worker:on(event, fn)
  if type(fn) ~= "function" then error("worker:on: expected a listener function", 2) end
  local ls = self._listeners[event] or {}
  ls[#ls + 1] = fn
  self._listeners[event] = ls
  return self
end

function Worker:off(event, fn)
  local ls = self._listeners[event]
  if not ls then return self end
  for i = #ls, 1, -1 do if ls[i] == fn then table.remove(ls, i) end end
  return self
end

function Worker:_emit(event, ...)
  local ls = self._listeners[event]
  if not ls then return end
  for i = 1, #ls do
    local ok, e = pcall(ls[i], ...)
    if not ok then self._logger:error("worker listener for " .. event .. " failed", { error = tostring(e) }) end
  end
end

local function keep_of(job_opt, worker_opt)
  local k = normalize_keep(job_opt, "job options") or worker_opt or { count = -1 }
  return k.count or -1, k.age or 0, k.limit or 1000
end

local function backoff_delay(opts, attemptsMade)
  local b = opts.backoff
  if type(b) == "number" then b = { type = "fixed", delay = b } end
  if type(b) ~= "table" or not b.delay then return 0 end
  local d = tonumber(b.delay) or 0
  if b.type == "exponential" then
    d = floor(2 ^ attemptsMade * d + 0.5)
  end
  local j = tonumber(b.jitter)
  if j and j > 0 then d = floor(d * (1 - j) + math.random() * d * j) end
  return d
end

-- Runs a finishing script, again and again while the link is down (bounded):
-- a job whose result cannot be recorded would otherwise stay active until
-- a stall check hands it to another worker, to run a second time.
local function finish_call(w, name, keys, args)
  local delay = 50
  local lost = false
  for _ = 1, 12 do
    local r, err = script(name):run(w._conn, keys, args)
    if r ~= nil and r ~= 0 and lost then
      -- An earlier try may have gone through with only its reply lost:
      -- the lock is then released and the job moved. Report what happened.
      return r, err, true
    end
    if r ~= nil or not errors.is(err, errors.NetworkError) then return r, err end
    lost = true
    -- A closing owner that cannot wait any more (QueueRuntime's stop after
    -- its grace): the job stays active and a stall check hands it on.
    if w._abandon then return r, err end
    w._logger:warn("Redis unavailable while finishing a job; retrying", { error = tostring(err) })
    if not core.sleep(delay) then return r, err end
    if w._abandon then return r, err end
    delay = math.min(delay * 2, 2000)
  end
  return nil, errors.NetworkError("gave up finishing the job: Redis stayed unavailable")
end

-- Fetch-next arguments for the finishing scripts: the next job comes back
-- in the same round trip, locked with the same token (as BullMQ does).
local function next_args(w)
  local lim = w.limiter
  return w._closing and "0" or "1", w.lockDuration, lim and lim.max or 0, lim and lim.duration or 0,
    w.workerName or ""
end

local function next_job(w, r)
  if type(r) == "table" and type(r[1]) == "table" then
    local j = job_from_hash(w.queue, r[2], flat_to_hash(r[1]))
    j._worker = w
    return j
  end
  return nil
end

-- Runs one job; returns the next one when the finishing script fetched it.
-- Gives a job back to the front of wait, unprocessed and unlocked.
local function release_job(w, job, token, back)
  local k = w.keys
  script("releaseJob"):run(w._conn, { k.active, k.wait, k.stalled, k.marker, k.events, k.meta,
    k.prioritized }, { k.P, job.id, token, back and "back" or "" })
  -- Back off only once the rejected jobs come round again: until then the
  -- next fetch may well be one this worker still has to run.
  if back then
    local seen = w._rejected
    if not seen then
      seen = {}
      w._rejected = seen
    end
    if seen[job.id] then
      w._releasedAt = core.now()
      w._rejected = {}
    else
      seen[job.id] = true
    end
  else
    w._releasedAt = core.now()
  end
end

--- A processor returning this gives its job back to the queue (for another
--- worker) instead of completing or failing it.
M.RELEASE = setmetatable({}, { __tostring = function() return "am2z.queue.RELEASE" end })

local function run_one(w, job, token)
  local k = w.keys
  local nxt
  -- A worker that is draining (QueueRuntime's stop) takes only the jobs it
  -- still has to run; the others go back for other workers.
  if w._accept and not w._accept(job) then
    release_job(w, job, token, true)
    return nil
  end
  w:_emit("active", job, "waiting")
  local ok, result, perr
  if job._defa or job._badData then
    -- Failed unprocessed and without retry: a deferred failure (stalled
    -- too often) or a payload that is not JSON.
    ok, result = false, job._defa or job._badData
  else
    ok, result, perr = xpcall(w.processor, function(e)
      return { value = e, tb = debug.traceback(tostring(type(e) == "table" and (e.message or e) or e), 2) }
    end, job)
  end
  if ok and result == M.RELEASE then
    release_job(w, job, token)
    return nil
  end
  local failure
  if ok and perr ~= nil then
    failure = { value = perr, tb = nil }
  elseif not ok then
    failure = type(result) == "table" and result.tb and result or { value = result }
  end
  local now = string.format("%d", floor(wall_ms()))
  if not failure then
    local okj, rv = pcall(json.encode, result == nil and json_null or result)
    if not okj then
      failure = { value = "return value cannot be encoded as JSON: " .. tostring(rv) }
    else
      local count, age, limit = keep_of(job.opts.removeOnComplete, w.removeOnComplete)
      local r, err, ambiguous = finish_call(w, "moveToFinished",
        { k.wait, k.active, k.prioritized, k.events, k.stalled, k.meta, k.completed,
          k.limiter, k.delayed, k.pc, k.marker },
        { k.P, job.id, now, "returnvalue", rv, "completed", token, count, age, limit, "",
          job.opts.attempts or 0, next_args(w) })
      if r ~= 0 and type(r) ~= "table" and ambiguous and w.queue:_isFinished(job.id) == 1 then
        r = 0                           -- our first try went through
      end
      nxt = next_job(w, r)
      if r ~= 0 and type(r) ~= "table" then
        w._logger:warn(format("job %s: could not complete (%s)", job.id, tostring(r or err)))
      else
        job.returnvalue = result
        w:_emit("completed", job, result)
      end
    end
  end
  if failure then
    local v = failure.value
    local reason = type(v) == "table" and (v.message or tostring(v)) or tostring(v)
    local stack = job.stacktrace or {}
    stack[#stack + 1] = failure.tb or reason
    local limit = job.opts.stackTraceLimit
    if type(limit) == "number" then
      while #stack > limit do table.remove(stack, 1) end
    end
    local st = cjson.encode(stack)
    local attempts = tonumber(job.opts.attempts) or 0
    local unrecoverable = job._defa ~= nil or job._badData ~= nil
    if not unrecoverable and job.attemptsMade + 1 < attempts then
      local delay = backoff_delay(job.opts, job.attemptsMade)
      local r, err = finish_call(w, "retryJob",
        { k.wait, k.active, k.prioritized, k.events, k.stalled, k.meta, k.delayed, k.marker, k.pc },
        { k.P, job.id, now, delay, token, reason, st })
      if r ~= 0 then w._logger:warn(format("job %s: could not retry (%s)", job.id, tostring(r or err))) end
      job.failedReason = reason
      w:_emit("failed", job, errors.from(v), "retrying")
    else
      local count, age, lim = keep_of(job.opts.removeOnFail, w.removeOnFail)
      local args = { k.P, job.id, now, "failedReason", reason, "failed", token, count, age, lim, st,
                     attempts, next_args(w) }
      if w._errorField then
        -- QueueRuntime: the whole error, so it comes back as the same class.
        local fname, fvalue = w._errorField(v)
        if fname then args[18], args[19] = fname, fvalue end
      end
      local r, err = finish_call(w, "moveToFinished",
        { k.wait, k.active, k.prioritized, k.events, k.stalled, k.meta, k.failed,
          k.limiter, k.delayed, k.pc, k.marker }, args)
      nxt = next_job(w, r)
      if r ~= 0 and type(r) ~= "table" then
        w._logger:warn(format("job %s: could not fail (%s)", job.id, tostring(r or err)))
      end
      job.failedReason = reason
      w:_emit("failed", job, errors.from(v))
    end
  end
  return nxt
end

-- Runs jobs in one concurrency slot: the first one fetched by the main loop,
-- then each next one handed back by the previous job's finishing script.
local function process_job(w, job, token)
  local k = w.keys
  while job do
    local nxt = run_one(w, job, token)
    w._active[job.id] = nil
    if w._keeper then core.lockkeeper_remove(w._keeper, k.P .. job.id .. ":lock") end
    job = nxt
    if job then
      w._active[job.id] = { token = token }
      if w._keeper then core.lockkeeper_add(w._keeper, k.P .. job.id .. ":lock", token, job.id) end
    end
  end
  w._running = w._running - 1
  w._inflight = w._inflight - 1
  if w._wake then
    local x = w._wake
    w._wake = nil
    core.complete_host(x[1], x[2])
  end
  return true, true
end

local function fetch(w)
  local k = w.keys
  w._seq = w._seq + 1
  local token = w._uuid .. ":" .. w._seq
  local lim = w.limiter
  local r, err = script("moveToActive"):run(w._conn,
    { k.wait, k.active, k.prioritized, k.events, k.limiter, k.delayed, k.meta, k.pc, k.marker },
    { k.P, string.format("%d", floor(wall_ms())), token, w.lockDuration, lim and lim.max or 0,
      lim and lim.duration or 0, w.workerName or "" })
  if not r then return nil, nil, nil, nil, err end
  if type(r[1]) == "table" then
    local job = job_from_hash(w.queue, r[2], flat_to_hash(r[1]))
    job._worker = w
    return job, token
  end
  return nil, nil, tonumber(r[3]) or 0, tonumber(r[4]) or 0
end

local function wait_slot(w)
  local token = require("am2z.executor").newToken()
  w._wake = { (core.current()), token }
  core.wait_host(token)
  -- Only our own registration: the closer may have replaced it meanwhile.
  if w._wake and w._wake[2] == token then w._wake = nil end
end

local function main_loop_body(w)
  local ok, err = pcall(function()
    w._conn = connect(w._opts.connection, nil, w._logger)
    w.queue._c = w._conn
    local cname = w.prefix .. ":" .. b64(w.name) .. (w.workerName and (":w:" .. w.workerName) or "")
    w._bconn = connect(w._opts.connection, cname, w._logger)
  end)
  if not ok then
    w:_emit("error", errors.from(err))
    w._logger:error("worker could not connect", { error = tostring(err) })
    w._stopped = true
    return true, true
  end
  w._conn:call("HSETNX", w.keys.meta, "opts.maxLenEvents", 10000)
  -- Locks are renewed by a thread of the C core: a processor that keeps the
  -- loop busy (no yield for a while) must not lose its job to a stall check.
  local ro = redis.resolve(w._opts.connection)
  w._keeper = core.lockkeeper_new({ host = ro.host, port = ro.port, username = ro.username,
    password = ro.password, db = ro.db, stalledKey = w.keys.stalled,
    lockDuration = w.lockDuration, interval = floor(w.lockDuration / 2) })
  -- Stall check and lock renewal run beside the fetch loop.
  w._aux = core.spawn(function()
    local k = w.keys
    local next_stall = 0
    while not w._closing do
      local now = core.now()
      if now >= next_stall then
        next_stall = now + w.stalledInterval
        local ids = script("moveStalledJobsToWait"):run(w._conn,
          { k.stalled, k.wait, k.active, k["stalled-check"], k.meta, k.events, k.marker },
          { w.maxStalledCount, k.P, string.format("%d", floor(wall_ms())), w.stalledInterval })
        for _, id in ipairs(type(ids) == "table" and ids or {}) do w:_emit("stalled", id, "active") end
      end
      if not core.sleep(math.max(10, next_stall - core.now())) then break end
    end
    return true, true
  end, "root", 0, 0, 1)

  local drained_known = false
  while not w._closing do
    if w._running >= w.concurrency then
      wait_slot(w)
    elseif w._releasedAt and core.now() - w._releasedAt < 100 then
      -- just gave a job back: do not take it again at once
      if not core.sleep(100 - (core.now() - w._releasedAt)) then break end
      w._releasedAt = nil
    else
      -- Not cancellable: a fetch cut short after Redis made a job active
      -- would leave that job locked and unprocessed until a stall check.
      w._fetching = true
      local job, token, ttl, next_delayed, ferr = fetch(w)
      w._fetching = false
      if w._closing then
        -- Closed meanwhile (the close could not cut the fetch short). A job
        -- handed over goes back untouched, at the front.
        if job then
          local k = w.keys
          script("releaseJob"):run(w._conn, { k.active, k.wait, k.stalled, k.marker, k.events, k.meta,
            k.prioritized }, { k.P, job.id, token })
        end
        break
      elseif job then
        drained_known = false
        w._running = w._running + 1
        w._inflight = w._inflight + 1
        w._active[job.id] = { token = token }
        if w._keeper then core.lockkeeper_add(w._keeper, w.keys.P .. job.id .. ":lock", token, job.id) end
        core.spawn(process_job, "root", 0, 0, 1, w, job, token)
      elseif ferr then
        -- A Redis error (connection down): back off a little and try again;
        -- the connection reconnects by itself meanwhile.
        if not core.sleep(200) then break end
      elseif ttl and ttl > 0 then
        if not core.sleep(math.min(ttl, 30000)) then break end
      else
        if not drained_known then
          drained_known = true
          w:_emit("drained")
        end
        local timeout = w.drainDelay
        if next_delayed and next_delayed > 0 then
          timeout = math.min(math.max((next_delayed - wall_ms()) / 1000, 0.001), 10)
        end
        w._blocking = true
        local r, berr = w._bconn:callTimeout(floor(timeout * 1000) + 2000, "BZPOPMIN", w.keys.marker,
          string.format("%.3f", timeout))
        w._blocking = false
        if w._closing then break end
        if r == nil and core.aborted() then break end
        if r == nil and berr and not errors.is(berr, errors.TimeoutError) then
          -- The blocking connection is down: never spin on an error that
          -- comes back at once.
          if not core.sleep(200) then break end
        end
      end
    end
  end
  return true, true
end

-- QueueRuntime: a job whose processor waits on child jobs gives its
-- concurrency slot back meanwhile (so nesting cannot deadlock at any
-- concurrency), and takes it again, even beyond the limit for a moment, when
-- it goes on.
function Worker:_releaseSlot()
  self._running = self._running - 1
  if self._wake then
    local x = self._wake
    self._wake = nil
    core.complete_host(x[1], x[2])
  end
end

function Worker:_takeSlot()
  self._running = self._running + 1
end

--- Starts processing (done by Worker.new unless autorun = false).
-- The loop tells a closer waiting for it that it has ended, so close()
-- returns with nothing of the worker left running.
-- (a continuation: it runs even when the loop was cancelled before its
-- body ever started).
local function loop_settled(w)
  w._loopDone = true
  local ws = w._loopWaiters
  w._loopWaiters = nil
  for _, x in ipairs(ws or {}) do core.complete_host(x[1], x[2]) end
  return true, true
end

function Worker:run()
  if self._loop then return self end
  self._loop = core.spawn(main_loop_body, "root", 0, 0, 1, self)
  core.on_settle(self._loop, loop_settled, self)
  return self
end

--- Stops fetching, lets running jobs finish, then closes the connections.
--- Waits inside an engine coroutine; elsewhere it only starts the close.
function Worker:close()
  if self._closed then return end
  if self._closeInProgress then
    -- Another caller is closing: wait for it to finish (one waker per caller).
    if core.in_exec() then
      local token = require("am2z.executor").newToken()
      self._closeWaiters[#self._closeWaiters + 1] = { (core.current()), token }
      core.wait_host(token)
    end
    return
  end
  self._closeInProgress = true
  self._closeWaiters = {}
  self._closing = true
  -- The loop sees _closing after a fetch; only its waits are cut short.
  if self._loop and not self._fetching then core.cancel(self._loop) end
  if self._aux then core.cancel(self._aux) end
  if core.in_exec() then
    if self._loop and not self._loopDone then
      local token = require("am2z.executor").newToken()
      self._loopWaiters = self._loopWaiters or {}
      self._loopWaiters[#self._loopWaiters + 1] = { (core.current()), token }
      core.wait_host(token)
    end
    -- In-flight jobs, not slots: a job waiting on children holds no slot
    -- but still has to finish through this worker's connection.
    while self._inflight > 0 do
      wait_slot(self)
    end
  end
  if self._conn then self._conn:close() end
  if self._bconn then self._bconn:close() end
  if self._keeper then core.lockkeeper_close(self._keeper) end
  self._keeper = nil
  self._closed = true
  for _, x in ipairs(self._closeWaiters) do core.complete_host(x[1], x[2]) end
  self._closeWaiters = {}
  self:_emit("closed")
end

-- ------------------------------------------------------------- QueueEvents

---@class am2z.QueueEvents
local QueueEvents = {}
QueueEvents.__index = QueueEvents
M.QueueEvents = QueueEvents

local function parse_fields(arr)
  local f = {}
  for i = 1, #arr, 2 do f[arr[i]] = arr[i + 1] end
  if f.returnvalue then f.returnvalue = decode(f.returnvalue, f.returnvalue) end
  if f.data and f.event == "progress" then f.data = decode(f.data, f.data) end
  if f.delay and f.event == "delayed" then f.delay = tonumber(f.delay) end
  return f
end

--- Follows a queue's events stream (XREAD BLOCK) on a connection of its own.
local EVENTS_OPTS = { connection = true, prefix = true, lastEventId = true, blockingTimeout = true,
                      autorun = true, logger = true, _errorField = true }

function QueueEvents.new(name, opts)
  check_queue_name("QueueEvents.new", name)
  if opts ~= nil and type(opts) ~= "table" then
    error("QueueEvents.new: expected a table of options, got " .. describe(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not EVENTS_OPTS[k] then error("QueueEvents.new: unknown option " .. describe(k), 2) end
  end
  local prefix = opts.prefix or "bull"
  if type(prefix) ~= "string" or prefix == "" then
    error("QueueEvents.new: expected prefix to be a non-empty string, got " .. describe(prefix), 2)
  end
  local ev = setmetatable({ name = name, prefix = prefix, keys = keys_for(prefix, name),
                            _opts = opts, _listeners = {}, _lastId = opts.lastEventId or "$",
                            _logger = opts.logger or log.createLogger({ source = "events:" .. name }),
                            _waiters = {} }, QueueEvents)
  open_handles[ev] = true
  if opts.autorun ~= false then ev:run() end
  return ev
end

QueueEvents.on = Worker.on
QueueEvents.off = Worker.off

function QueueEvents:_emit(event, ...)
  Worker._emit(self, event, ...)
end

local function events_loop(ev)
  local ok, err = pcall(function()
    ev._conn = connect(ev._opts.connection, ev.prefix .. ":" .. b64(ev.name) .. ":qe", ev._logger)
  end)
  if not ok then
    ev:_emit("error", errors.from(err))
    return true, true
  end
  ev._ready = true
  if ev._readyWaiters then
    for _, x in ipairs(ev._readyWaiters) do core.complete_host(x[1], x[2]) end
    ev._readyWaiters = nil
  end
  local block = ev._opts.blockingTimeout or 10000
  while not ev._closing do
    local r, rerr = ev._conn:callTimeout(block + 5000, "XREAD", "BLOCK", block, "STREAMS",
      ev.keys.events, ev._lastId)
    if ev._closing then break end
    if r == nil and rerr then
      if core.aborted() then break end
      if not core.sleep(200) then break end
    elseif type(r) == "table" then
      for _, stream in ipairs(r) do
        for _, entry in ipairs(stream[2]) do
          ev._lastId = entry[1]
          local f = parse_fields(entry[2])
          local e = f.event
          f.event = nil
          ev:_emit(e, f, entry[1])
          if f.jobId then
            ev:_emit(e .. ":" .. f.jobId, f, entry[1])
            local ws = ev._waiters[f.jobId]
            if ws and (e == "completed" or e == "failed") then
              ev._waiters[f.jobId] = nil
              for _, x in ipairs(ws) do
                x.result = { e, f }
                core.complete_host(x.id, x.token)
              end
            end
          end
        end
      end
    end
  end
  return true, true
end

function QueueEvents:run()
  if self._loop then return self end
  self._loop = core.spawn(events_loop, "root", 0, 0, 1, self)
  return self
end

--- Waits until the events loop is connected and reading.
function QueueEvents:waitUntilReady()
  if self._ready then return true end
  local token = require("am2z.executor").newToken()
  self._readyWaiters = self._readyWaiters or {}
  self._readyWaiters[#self._readyWaiters + 1] = { (core.current()), token }
  return core.wait_host(token)
end

local function drop_waiter(self, id, x)
  local ws = self._waiters[id]
  if not ws then return end
  for i = #ws, 1, -1 do if ws[i] == x then table.remove(ws, i) end end
  if #ws == 0 then self._waiters[id] = nil end
end

function QueueEvents:_waitFor(id, ttl)
  id = tostring(id)
  self:waitUntilReady()
  local x = { id = (core.current()), token = require("am2z.executor").newToken() }
  local ws = self._waiters[id] or {}
  ws[#ws + 1] = x
  self._waiters[id] = ws
  -- It may have finished before we listened: ask once, atomically, on a
  -- connection of its own (the events connection is blocked in XREAD).
  local q = self._queue
  if not q then
    q = Queue.new(self.name, { prefix = self.prefix, connection = self._opts.connection,
                               logger = self._logger })
    self._queue = q
  end
  local st, value = q:_isFinished(id)
  -- The finish event may have arrived while we were asking (its wake-up
  -- was ignored then, we were waiting on Redis): it is in x.result.
  if x.result then
    drop_waiter(self, id, x)
    if x.result[1] == "completed" then return x.result[2].returnvalue end
    return nil, errors.Error(x.result[2].failedReason or "job failed")
  end
  if st == -1 then
    drop_waiter(self, id, x)
    return nil, errors.Error("Missing key for job " .. id .. ". isFinished")
  elseif st == 1 then
    drop_waiter(self, id, x)
    return decode(value, value)
  elseif st == 2 then
    drop_waiter(self, id, x)
    return nil, errors.Error(value or "job failed")
  end
  local timer
  if ttl and ttl > 0 then
    timer = core.spawn(function() if core.sleep(ttl) then core.complete_host(x.id, x.token) end return true end,
      "root", 0, 0, 1)
  end
  core.wait_host(x.token)
  if timer then core.cancel(timer) end
  if not x.result then
    drop_waiter(self, id, x)
    return nil, errors.TimeoutError(format("job %s did not finish within %d ms", id, ttl or 0), ttl)
  end
  if x.result[1] == "completed" then return x.result[2].returnvalue end
  return nil, errors.Error(x.result[2].failedReason or "job failed")
end

function QueueEvents:close()
  self._closing = true
  -- The loop sees _closing after a fetch; only its waits are cut short.
  if self._loop and not self._fetching then core.cancel(self._loop) end
  if self._conn then self._conn:close() end
  if self._queue then self._queue:close() end
end

M._script = script
M._keys = keys_for
M._flatToHash = flat_to_hash

return M
