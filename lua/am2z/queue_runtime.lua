--[[
am2z.queue_runtime -- QueueRuntime: the same processors and semantics as
LocalRuntime, executed by workers over Redis (ARCHITECTURE.md, "Distributed
model"), on the BullMQ-compatible layer (am2z.queue).

- One queue per processor, `<queuePrefix>_<name>`. A job is one execution:
  data { processorName, state, sessionId, executionId, callContext }, job id
  = execution id; its return value is the execution result, a failure
  stores the serialized result (error included) in the job's `am2zError`
  field and in the failed event.
- Attempts, retries and timeouts run inside the worker that took the job
  (am2z.executor, as in LocalRuntime); the job is one BullMQ attempt.
- ctx:call and the composites enqueue a child job with a deterministic id
  (am2z.executor.call) and wait for its completed/failed event. While a job
  waits on children its worker slot is free, so nesting never deadlocks.
  A parent re-run after a crash gets its finished children's stored
  results back from the add itself (addJob's duplicate report); children
  are kept until their parent ends, then removed.
- One blocking reader per runtime (the hub) follows the events streams of
  every processor queue plus a control stream that carries cancellations to
  whichever process runs the job.

Must not: raise for runtime conditions in execute/ctx:call (Redis down,
unknown processor, bad state: failed results), or hold a worker slot while
waiting on a child.
]]

local core = require("am2z.core")
local cjson = require("cjson")
local json = require("am2z.json")
local errors = require("am2z.errors")
local log = require("am2z.log")
local executor = require("am2z.executor")
local statem = require("am2z.state")
local processor = require("am2z.processor")
local queue = require("am2z.queue")
local redis = require("am2z.redis")
local runtime = require("am2z.runtime")

local type, pairs, ipairs, error, setmetatable, tostring, pcall, tonumber =
  type, pairs, ipairs, error, setmetatable, tostring, pcall, tonumber
local format, floor = string.format, math.floor
local describe = processor.describe
local LocalRuntime = runtime.LocalRuntime
local json_null = cjson.null

local M = {}

---@class QueueRuntime : LocalRuntime
local QueueRuntime = setmetatable({}, { __index = LocalRuntime })
QueueRuntime.__index = QueueRuntime
M.QueueRuntime = QueueRuntime

local ERROR_FIELD = "am2zError"
local CHILD_KEEP = { age = 7 * 24 * 3600 }

-- ------------------------------------------------------------ helpers

local function newtoken() return executor.newToken() end

-- A failed result built here (never ran: Redis down, cancelled while queued).
local function fail_result(name, eid, sid, state, err)
  return { success = false, error = err, state = statem.clone(state), executionTime = 0,
           metadata = { processorName = name, executionId = eid, sessionId = sid, attempt = 1 } }
end

-- The result a job's completed event (returnvalue) stands for.
local function completed_result(name, jid, rv)
  local ok, r = pcall(cjson.decode, rv)
  if ok and type(r) == "table" and r.success == true and type(r.state) == "table" then
    if type(r.metadata) ~= "table" then r.metadata = { processorName = name, executionId = jid } end
    r.executionTime = tonumber(r.executionTime) or 0
    return r
  end
  return { success = false, executionTime = 0, metadata = { processorName = name, executionId = jid },
           error = errors.ProcessorExecutionError(name, jid,
             "job " .. jid .. " completed with a return value that is not an am2z execution result") }
end

-- The result a job's failed event (or hash) stands for.
local function failed_result(name, jid, reason, errjson)
  if errjson and errjson ~= "" then
    local ok, t = pcall(cjson.decode, errjson)
    if ok and type(t) == "table" and t.error ~= nil then
      local r = { success = false, error = errors.deserialize(t.error),
                  state = type(t.state) == "table" and t.state or nil,
                  executionTime = tonumber(t.executionTime) or 0,
                  metadata = type(t.metadata) == "table" and t.metadata
                    or { processorName = name, executionId = jid } }
      return r
    end
  end
  return { success = false, executionTime = 0, metadata = { processorName = name, executionId = jid },
           error = errors.ProcessorExecutionError(name, jid, reason or "job failed") }
end

-- Worker hook: the failure value a job handler raised or returned, as the
-- job hash field the producer rebuilds the failed result from.
local function error_field(v)
  if type(v) == "table" and v.am2zResult then
    local r = v.am2zResult
    local ok, j = pcall(json.encode, { success = false, error = errors.serialize(r.error),
      state = r.state, executionTime = r.executionTime, metadata = r.metadata })
    if not ok then
      ok, j = pcall(json.encode, { success = false, error = errors.serialize(r.error),
        executionTime = r.executionTime, metadata = r.metadata })
    end
    if ok then return ERROR_FIELD, j end
    return nil
  end
  local ok, j = pcall(json.encode, { success = false, error = errors.serialize(v) })
  if ok then return ERROR_FIELD, j end
  return nil
end

-- Server-side scripts of this module (defined below, preloaded at connect).
local REMOVE_JOBS, MARK_CANCEL

-- ------------------------------------------------------------ the hub

-- One blocking reader of every processor queue's events stream and of the
-- control stream. Waiters are keyed by job id; a waiter registers before the
-- job is added (or checked), so its event cannot be missed: a stream joins
-- the reader at its last entry as of before any waiter for it exists.
local Hub = {}
Hub.__index = Hub

local function hub_new(rt)
  return setmetatable({ rt = rt, keys = {}, ids = {}, names = {}, waiters = {}, closing = false,
                        downLimit = rt._redisOpts.commandTimeout or 10000 }, Hub)
end

function Hub:register(jid, name)
  local w = { name = name, co = false, token = false, result = false }
  local prev = self.waiters[jid]
  if prev then w.next = prev end
  self.waiters[jid] = w
  return w
end

function Hub:unregister(jid, w)
  local cur = self.waiters[jid]
  if cur == w then
    self.waiters[jid] = w.next
  else
    while cur and cur.next ~= w do cur = cur.next end
    if cur then cur.next = w.next end
  end
end

function Hub:resolve(jid, result)
  local w = self.waiters[jid]
  if not w then return end
  self.waiters[jid] = nil
  while w do
    if not w.result then
      w.result = result
      if w.co then core.complete_host(w.co, w.token) end
    end
    w = w.next
  end
end

-- Waits for w's result (inside an engine coroutine); nil + reason when the
-- waiting coroutine was aborted.
function Hub:await(jid, w)
  if w.result then return w.result end
  w.co, w.token = (core.current()), newtoken()
  local ok, reason = core.wait_host(w.token)
  w.co = false
  -- Aborted, even when a result came in before this coroutine ran again
  -- (stop() cancels, then its closing reader fails every waiter): the
  -- caller must still treat the child as abandoned and cancel it.
  if ok and w.result then return w.result end
  self:unregister(jid, w)
  return nil, ok and "ECANCELED" or reason
end

-- The id a stream joins the reader at: its last entry, or the beginning
-- when it is empty or does not exist yet.
local function stream_tail(conn, key)
  local r = conn:call("XREVRANGE", key, "+", "-", "COUNT", 1)
  if type(r) == "table" and type(r[1]) == "table" then return r[1][1] end
  -- Also when the read failed (Redis loading, a dropped link): reading
  -- from the beginning replays old events to queue:* listeners, but
  -- failing here would fail start() and leave a worker-only process idle.
  return "0-0"
end

function Hub:addStream(key, name)
  if self.ids[key] then return end
  local conn = self.rt._conn
  self.ids[key] = stream_tail(conn, key)
  self.keys[#self.keys + 1] = key
  self.names[key] = name
  -- A reader blocked on the old list of streams returns at once: it always
  -- reads the control stream, from a concrete id, so an entry there wakes
  -- it even when its XREAD reaches Redis only after this.
  if self.co then
    conn:call("XADD", self.rt._prefix .. ":control", "MAXLEN", "~", 1000, "*", "event", "wake")
  end
end

function Hub:_event(key, f)
  local rt = self.rt
  local name = self.names[key]
  local ev, jid = f.event, f.jobId
  if name == false then
    -- control stream
    if ev == "cancel" and jid then rt:_cancelLocal(jid) end
    return
  end
  if ev == "completed" then
    if self.waiters[jid] then self:resolve(jid, completed_result(name, jid, f.returnvalue)) end
  elseif ev == "failed" then
    if self.waiters[jid] then self:resolve(jid, failed_result(name, jid, f.failedReason, f[ERROR_FIELD])) end
  end
  if (ev == "completed" or ev == "failed") and jid and rt._orphans[jid] then
    rt._orphans[jid] = nil
    rt:_removeChildrenLater(name, jid)
  end
  local lname = "queue:" .. tostring(ev)
  if rt._listeners[lname] and rt._monitoring.enableQueueEvents then
    local payload = { queueName = rt._bull .. ":" .. rt._prefix .. "_" .. name, processorName = name,
                      jobId = jid }
    for k, v in pairs(f) do if k ~= "event" and k ~= "jobId" then payload[k] = v end end
    rt:_dispatch(lname, payload)
  end
end

-- One event; a handler that raises is logged, never kills the reader.
function Hub:_handle(key, f)
  local ok, perr = pcall(self._event, self, key, f)
  if not ok then
    self.rt._logger:error("QueueRuntime: handling an event failed", { error = tostring(perr) })
  end
end

local function hub_loop(hub)
  local rt = hub.rt
  local conn, err
  while not hub.closing do
    conn, err = redis.connect(rt:_connOpts("am2z:hub"))
    if conn then break end
    rt._logger:error("QueueRuntime: the events reader could not connect", { error = tostring(err) })
    local t = core.now()
    hub.downSince = hub.downSince or t
    if t - hub.downSince >= hub.downLimit then hub:failAll(err) end
    if not core.sleep(200) then return true, true end
  end
  if not conn then return true, true end
  if hub.closing then
    conn:close()
    return true, true
  end
  hub.conn = conn
  local block = 5000
  while not hub.closing do
    local args = { "XREAD", "COUNT", 1000, "BLOCK", block, "STREAMS" }
    local keys, n = hub.keys, #hub.keys
    for i = 1, n do args[6 + i] = keys[i] end
    for i = 1, n do args[6 + n + i] = hub.ids[keys[i]] end
    -- Without queue:* listeners only results matter: the C side drops the
    -- other events (added, active, waiting, drained, ...) before Lua sees them.
    local filtered = not hub.allEvents
    local r, e
    if filtered then
      r, e = conn:xreadResults(block + 5000, unpack(args))
    else
      r, e = conn:callTimeout(block + 5000, unpack(args))
    end
    if hub.closing then break end
    if r == nil and e then
      if core.aborted() then break end
      if errors.is(e, errors.NetworkError) then
        -- Redis gone: whoever waits gets a NetworkError once it has been
        -- gone for the command timeout, rather than waiting forever.
        local t = core.now()
        hub.downSince = hub.downSince or t
        if t - hub.downSince >= hub.downLimit then hub:failAll(e) end
        if not core.sleep(200) then break end
      elseif not errors.is(e, errors.TimeoutError) then
        -- an error reply that would come back at once: do not spin on it
        rt._logger:warn("QueueRuntime: events reader error", { error = tostring(e) })
        if not core.sleep(200) then break end
      end
    elseif type(r) == "table" or r == nil then
      hub.downSince = nil
    end
    if type(r) == "table" and filtered then
      for _, s in ipairs(r) do
        local key = s[1]
        if s[2] then hub.ids[key] = s[2] end
        for _, f in ipairs(s[3]) do hub:_handle(key, f) end
      end
    elseif type(r) == "table" then
      for _, s in ipairs(r) do
        local key, entries = s[1], s[2]
        for _, ent in ipairs(entries) do
          hub.ids[key] = ent[1]
          local arr, f = ent[2], {}
          for i = 1, #arr, 2 do f[arr[i]] = arr[i + 1] end
          hub:_handle(key, f)
        end
      end
    end
  end
  return true, true
end

-- Every waiter gets a failed result made by make_error(jobId), never a hang.
function Hub:_failWaiters(make_error)
  for jid in pairs(self.waiters) do
    local w = self.waiters[jid]
    self:resolve(jid, { success = false, executionTime = 0,
      metadata = { processorName = w.name, executionId = jid }, error = make_error(jid) })
  end
end

function Hub:failAll(cause)
  local limit = self.downLimit
  self:_failWaiters(function(jid)
    return errors.NetworkError(format("Redis was unreachable for %d ms while waiting for execution %s",
      limit, jid), { cause = tostring(cause) })
  end)
end

function Hub:start()
  self.co = core.spawn(hub_loop, "root", 0, 0, 1, self)
end

function Hub:close()
  self.closing = true
  if self.co then core.cancel(self.co) end
  if self.conn then self.conn:close() end
  self:_failWaiters(function(jid)
    return errors.CancelledError("the runtime was stopped while waiting for execution " .. jid, "stopped")
  end)
end

-- ------------------------------------------------------------ construction

local KNOWN = { queuePrefix = true, redis = true, worker = true, queue = true, monitoring = true,
                runtime = true, logger = true, stateManager = true }

local function check_table(fname, key, v)
  if v ~= nil and type(v) ~= "table" then
    error(format("%s: expected %s to be a table, got %s", fname, key, describe(v)), 3)
  end
  return v or {}
end

local function check_keep(fname, key, v)
  if v == nil or v == true or v == false then return v end
  if type(v) == "number" and v >= 0 and v == floor(v) then return v end
  if type(v) == "table" then return v end
  error(format("%s: expected queue.%s to be a boolean, a count or { count, age }, got %s", fname, key,
    describe(v)), 3)
end

--- Creates a runtime whose executions run on workers over Redis.
---@param config table { queuePrefix, redis, worker = { concurrency, enabled }, queue, monitoring, runtime, logger, stateManager }
---@return QueueRuntime
function QueueRuntime.new(config)
  local fname = "QueueRuntime.new"
  if config ~= nil and type(config) ~= "table" then
    error(fname .. ": expected a table of options or nil, got " .. describe(config), 2)
  end
  config = config or {}
  for k in pairs(config) do
    if not KNOWN[k] then
      error(format("%s: unknown option %s (expected queuePrefix, redis, worker, queue, monitoring, "
        .. "runtime, logger, stateManager)", fname, describe(k)), 2)
    end
  end
  local prefix = config.queuePrefix == nil and "am2z" or config.queuePrefix
  if type(prefix) ~= "string" or prefix == "" or prefix:find(":", 1, true) then
    error(fname .. ": expected queuePrefix to be a non-empty string without ':', got " .. describe(prefix), 2)
  end
  local ropts = check_table(fname, "redis", config.redis)
  redis.resolve(ropts)          -- raises a clear error for bad connection options
  local wopts = check_table(fname, "worker", config.worker)
  local qopts = check_table(fname, "queue", config.queue)
  local mon = runtime._monitoringOf(fname, config.monitoring)
  local rtopts = check_table(fname, "runtime", config.runtime)
  local conc = wopts.concurrency == nil and 5 or wopts.concurrency
  if type(conc) ~= "number" or conc < 1 or conc ~= floor(conc) then
    error(fname .. ": expected worker.concurrency to be a positive integer, got " .. describe(conc), 2)
  end
  if wopts.enabled ~= nil and type(wopts.enabled) ~= "boolean" then
    error(fname .. ": expected worker.enabled to be a boolean, got " .. describe(wopts.enabled), 2)
  end
  for _, k in ipairs({ "lockDuration", "stalledInterval" }) do
    local v = wopts[k]
    if v ~= nil and (type(v) ~= "number" or v <= 0 or v ~= floor(v)) then
      error(format("%s: expected worker.%s to be a positive integer (ms), got %s", fname, k, describe(v)), 2)
    end
  end
  if wopts.maxStalledCount ~= nil and (type(wopts.maxStalledCount) ~= "number"
      or wopts.maxStalledCount < 0 or wopts.maxStalledCount ~= floor(wopts.maxStalledCount)) then
    error(fname .. ": expected worker.maxStalledCount to be an integer >= 0, got "
      .. describe(wopts.maxStalledCount), 2)
  end
  for k in pairs(wopts) do
    if not ({ concurrency = true, enabled = true, lockDuration = true, stalledInterval = true,
              maxStalledCount = true })[k] then
      error(format("%s: unknown option worker.%s (expected concurrency, enabled, lockDuration, "
        .. "stalledInterval, maxStalledCount)", fname, tostring(k)), 2)
    end
  end
  local bull = qopts.prefix == nil and "bull" or qopts.prefix
  if type(bull) ~= "string" or bull == "" then
    error(fname .. ": expected queue.prefix to be a non-empty string, got " .. describe(bull), 2)
  end
  local keepOk = check_keep(fname, "removeOnComplete", qopts.removeOnComplete)
  local keepFail = check_keep(fname, "removeOnFail", qopts.removeOnFail)
  local ok, base = pcall(LocalRuntime.new, { maxCallDepth = rtopts.maxCallDepth,
    defaultTimeout = rtopts.defaultTimeout, logger = config.logger,
    stateManager = config.stateManager })
  if not ok then error((tostring(base):gsub("LocalRuntime%.new", fname .. ": runtime")), 2) end
  local self = setmetatable(base, QueueRuntime)
  self._monitoring = mon
  self._prefix = prefix
  self._bull = bull
  self._redisOpts = ropts
  self._workerEnabled = wopts.enabled ~= false
  self._concurrency = conc
  self._workerOpts = wopts
  self._keepComplete = keepOk == nil and 1000 or keepOk
  self._keepFail = keepFail == nil and 1000 or keepFail
  self._queues = {}
  self._workers = {}
  self._jobs = {}           -- execution id -> job running here { worker, waits, children }
  self._pending = {}        -- execution id -> processor name, top-level waits of this process
  self._optsJson = {}
  self._cancelReq = {}      -- execution id -> when a cancel was asked for
  self._orphans = {}        -- child job id -> processor: abandoned by an aborted parent
  self._idleWaiters = {}
  self._closingWorkers = {}
  self._closingAll = 0
  self._callRemote = QueueRuntime._remoteCall
  -- Registry generations, so a job of an execution that started before a
  -- reload runs the code it started with when this process takes it
  -- (callContext.reg names the runtime and the generation).
  do
    local f = io.open("/dev/urandom", "rb")
    local b = f and f:read(6) or tostring(math.random())
    if f then f:close() end
    self._runtimeId = (b:gsub(".", function(c) return format("%02x", c:byte()) end))
  end
  self._regSeq = 0
  self._regGen = setmetatable({}, { __mode = "k" })
  self._regByGen = {}
  self._regMemo, self._regMemoN = {}, 0
  self:_setRegistry(self._processors)
  if config.stateManager == nil then
    self._stateManager = require("am2z.redis_state").RedisStateManager.new(ropts)
    self._ownState = true
  end
  return self
end

function QueueRuntime:_connOpts(name)
  local o = {}
  for k, v in pairs(self._redisOpts) do o[k] = v end
  o.name = name
  o.logger = o.logger or self._logger
  return o
end

--- The full queue name of a processor.
function QueueRuntime:queueName(name)
  return self._prefix .. "_" .. name
end

-- ------------------------------------------------------------ lifecycle

local function wake_ready(self)
  local w = self._readyWaiters
  self._readyWaiters = {}
  for _, x in ipairs(w or {}) do core.complete_host(x[1], x[2]) end
end

-- Connects and sets everything up; _connecting stays true until done, so
-- stop() can wait for it. Whatever happens, waiters are woken.
function QueueRuntime:_connect()
  self._connecting = true
  local ok, err = pcall(self._connectBody, self)
  if not ok then
    self._connectError = errors.is(err, errors.AM2ZError) and err
      or errors.ConfigurationError("runtime", "QueueRuntime could not start: " .. tostring(err))
    self._logger:error("QueueRuntime: start failed", { error = tostring(err) })
    self._ready = false
  end
  self._connecting = false
  wake_ready(self)
end

-- Loads this module's scripts on a new connection, so that a removal or a
-- cancel sent right behind an add reaches Redis right behind it: loaded on
-- first use, a script's SCRIPT LOAD would go first and its call only after
-- that reply, and meanwhile a worker could take the job. Best effort: a
-- script not loaded now (Redis still loading its data) loads on first use.
local function preload(conn, logger)
  for _, sc in ipairs({ REMOVE_JOBS, MARK_CANCEL, queue._script("addJob") }) do
    local sha, err = sc:load(conn)
    if not sha then
      logger:warn("QueueRuntime: could not load a script ahead of use", { error = tostring(err) })
      return
    end
  end
end

function QueueRuntime:_connectBody()
  local conn, err = redis.connect(self:_connOpts("am2z:runtime"))
  if conn then preload(conn, self._logger) end
  if not conn then
    self._connectError = err
    self._logger:error("QueueRuntime: could not connect to Redis", { error = tostring(err) })
  elseif not self._started then
    conn:close()
  else
    self._conn = conn
    self._connectError = nil
    local hub = hub_new(self)
    hub.allEvents = self._allEvents
    self._hub = hub
    local ctl = self._prefix .. ":control"
    hub.names[ctl] = false
    hub.ids[ctl] = stream_tail(conn, ctl)
    hub.keys[1] = ctl
    hub:start()
    self._ready = true
    self:syncProcessors()
  end
end

-- true once connected; nil + NetworkError when Redis cannot be reached.
function QueueRuntime:_whenReady()
  if self._ready then return true end
  if not self._started then
    return nil, errors.NetworkError("the runtime was stopped before it could reach Redis")
  end
  if not self._connecting then
    if not core.in_exec() then return nil, errors.NetworkError("not connected yet") end
    self:_connect()
  else
    local token = newtoken()
    self._readyWaiters = self._readyWaiters or {}
    self._readyWaiters[#self._readyWaiters + 1] = { (core.current()), token }
    core.wait_host(token)
  end
  if self._ready then return true end
  return nil, self._connectError or errors.NetworkError("Redis is not reachable")
end

--- Connects, creates the queues (and workers, unless worker.enabled =
--- false) of the registered processors. Twice is a no-op; after stop it
--- starts again. Outside an engine coroutine the connection is made by the
--- loop, and executions wait for it.
function QueueRuntime:start()
  if self._started then return self end
  self._started = true
  self._startedAt = core.now()
  self:_metricsCheck()
  self._connecting = true
  if core.in_exec() then
    self:_connect()
  else
    local rt = self
    core.spawn(function() rt:_connect() return true, true end, "root", 0, 0, 1)
  end
  return self
end

-- The job handler every worker of this runtime runs.
local function handle_job(rt, job)
  local d = job.data
  if type(d) ~= "table" or type(d.processorName) ~= "string" or type(d.state) ~= "table" then
    error(errors.ValidationError("job.data", nil, format(
      "job %s is not an am2z job: expected data { processorName, state, sessionId, executionId, "
      .. "callContext }", tostring(job.id))))
  end
  local name = d.processorName
  local eid = type(d.executionId) == "string" and d.executionId or job.id
  local sid = type(d.sessionId) == "string" and d.sessionId ~= "" and d.sessionId or eid
  local cc = type(d.callContext) == "table" and d.callContext or {}
  local depth = tonumber(cc.depth) or 0
  if job._raw and job._raw.am2zCancel then
    local r = fail_result(name, eid, sid, d.state,
      errors.CancelledError(format("Processor '%s' was cancelled before it started", name), "cancelled"))
    return nil, { message = r.error.message, am2zResult = r }
  end
  if rt._cancelReq[eid] then
    rt._cancelReq[eid] = nil
    local r = fail_result(name, eid, sid, d.state,
      errors.CancelledError(format("Processor '%s' was cancelled before it started", name), "cancelled"))
    return nil, { message = r.error.message, am2zResult = r }
  end
  -- The execution this job belongs to (its top-level job's id).
  local root = type(cc.rootExecutionId) == "string" and cc.rootExecutionId or eid
  local j = { worker = job._worker, waits = 0, children = {}, root = root }
  rt._jobs[eid] = j
  local r = executor.invoke(rt, name, d.state, sid, depth, eid, rt:_registryOf(cc.reg))
  -- Cut off by this process's stop(): unless the execution is this
  -- process's own, the job goes back to its queue for another worker,
  -- children included, and keeps its finished children, which the re-run
  -- finds again by their ids.
  local give_back = not r.success and rt._stopping and errors.is(r.error, errors.CancelledError)
    and not rt._pending[root]
  -- From here on the job takes no new children (a body still unwinding
  -- after a timeout may try): _run refuses them.
  j.done = true
  if not give_back then rt:_removeChildren(j.children, true) end
  -- (the same job may run twice here, after a lost lock: leave the other's)
  if rt._jobs[eid] == j then rt._jobs[eid] = nil end
  rt:_notifyIdle()
  if r.success then return r end
  if give_back then return queue.RELEASE end
  local e = r.error
  return nil, { message = (type(e) == "table" and e.message) or tostring(e), am2zResult = r }
end

REMOVE_JOBS = redis.script([[
-- KEYS: per queue: completed, failed, active, wait, prioritized, delayed
-- ARGV: per queue, in the same order: key prefix, number of ids, ids...
-- Returns the ids it left because they are still active.
-- Almost every child has finished: it leaves its finished set (O(log N)).
-- Only one that has not is looked for in the lists (O(N) scans): a child
-- still queued (its parent ended first) goes from its list too, since a
-- dangling id in wait would be handed to a worker without its hash.
local rcall = redis.call
local a, k = 1, 0
local left = {}
while ARGV[a] do
  local P, n = ARGV[a], tonumber(ARGV[a + 1])
  for i = a + 2, a + 1 + n do
    local id = ARGV[i]
    local gone = rcall("ZREM", KEYS[k + 1], id) == 1 or rcall("ZREM", KEYS[k + 2], id) == 1
    if not gone and rcall("LPOS", KEYS[k + 3], id) == false then
      rcall("LREM", KEYS[k + 4], 0, id)
      rcall("ZREM", KEYS[k + 5], id)
      rcall("ZREM", KEYS[k + 6], id)
      gone = true
    end
    if gone then rcall("DEL", P .. id, P .. id .. ":logs") else left[#left + 1] = id end
  end
  a, k = a + 2 + n, k + 6
end
return left
]])

-- Children are kept while their parent runs (a re-run parent reads their
-- results); once it has ended they go, in one round trip for all their
-- queues. One still active (its parent was cancelled or timed out, and so
-- is it) is left, and with track = true becomes an orphan: removed when
-- its end shows on the events stream. It is noted as one before the call,
-- so that an end read meanwhile is not missed, and the rest are un-noted
-- after it.
function QueueRuntime:_removeChildren(children, track)
  if #children == 0 or not self._conn then return end
  local orphans = self._orphans
  local byq, order = {}, {}
  for _, c in ipairs(children) do
    local l = byq[c[1]]
    if not l then
      l = {}
      byq[c[1]] = l
      order[#order + 1] = c[1]
    end
    l[#l + 1] = c[2]
  end
  local keys, args = {}, {}
  for _, name in ipairs(order) do
    local q = self._queues[name]
    if q then
      local k, ids = q.keys, byq[name]
      for _, key in ipairs({ k.completed, k.failed, k.active, k.wait, k.prioritized, k.delayed }) do
        keys[#keys + 1] = key
      end
      args[#args + 1] = k.P
      args[#args + 1] = #ids
      for _, id in ipairs(ids) do
        args[#args + 1] = id
        if track then orphans[id] = name end
      end
    end
  end
  if #keys == 0 then return end
  local left = REMOVE_JOBS:run(self._conn, keys, args)
  -- Failed (Redis unreachable): all stay noted, removed by their end event
  -- or by stop().
  if not track or type(left) ~= "table" then return end
  local keep = {}
  for _, id in ipairs(left) do keep[id] = true end
  for _, c in ipairs(children) do
    if not keep[c[2]] then orphans[c[2]] = nil end
  end
end

-- Removes one child job in the background (see _removeChildren).
function QueueRuntime:_removeChildrenLater(name, jid)
  local rt = self
  core.spawn(function()
    rt:_removeChildren({ { name, jid } })
    return true, true
  end, "root", 0, 0, 1)
end

-- The queue of a processor (and, with workers on, its worker). def: the
-- definition the caller runs on; an execution pinned to an older registry
-- may need a processor since unregistered, whose worker must exist then.
function QueueRuntime:_ensureQueue(name, def)
  local q = self._queues[name]
  def = def or self._processors[name]
  if not q then
    q = queue.Queue.new(self:queueName(name), { prefix = self._bull, connection = self._redisOpts,
      logger = self._logger })
    q._c = self._conn
    q._shared = true
    q.processorName = name
    self._queues[name] = q
    -- Adding the events stream to the reader talks to Redis (yields).
    -- Callers for the same processor meanwhile wait here: one enqueueing
    -- before the reader follows the stream could miss its job's result.
    q._setup = {}
    local hub = self._hub
    local ok, err = pcall(function() hub:addStream(q.keys.events, name) end)
    local ws = q._setup
    q._setup = nil
    for _, x in ipairs(ws) do core.complete_host(x[1], x[2]) end
    if not ok then
      self._queues[name] = nil
      error(err, 0)
    end
  elseif q._setup then
    local token = newtoken()
    q._setup[#q._setup + 1] = { (core.current()), token }
    core.wait_host(token)
    -- The setup failed (and was undone): try it again, or fail the same way.
    if self._queues[name] ~= q then return self:_ensureQueue(name, def) end
  end
  if self._workerEnabled and def and not self._workers[name] then self:_startWorker(name, def) end
  return q
end

function QueueRuntime:_startWorker(name, def)
  -- stop() is closing the workers: one started now (a job still finishing
  -- here enqueues to a processor without a worker yet) would never close.
  if self._closingAll > 0 or self._workers[name] then return end
  local qc = def.config.queueConfig or {}
  local limiter
  if qc.rateLimitRpm then limiter = { max = qc.rateLimitRpm, duration = 60000 } end
  local rt = self
  local wo = self._workerOpts
  local w = queue.Worker.new(self:queueName(name), function(job)
    return handle_job(rt, job)
  end, { connection = self._redisOpts, prefix = self._bull,
         concurrency = qc.concurrency or self._concurrency, limiter = limiter,
         lockDuration = wo.lockDuration, stalledInterval = wo.stalledInterval,
         maxStalledCount = wo.maxStalledCount, logger = self._logger:withSource("worker:" .. name),
         _errorField = error_field })
  w._accept = self._accept          -- set while stop() drains
  self._workers[name] = w
end

-- queue:* listeners need every event of the streams, not only results.
function QueueRuntime:on(event, fn)
  LocalRuntime.on(self, event, fn)
  if type(event) == "string" and event:sub(1, 6) == "queue:" and self._monitoring.enableQueueEvents then
    self._allEvents = true
    if self._hub then self._hub.allEvents = true end
  end
  return self
end

function QueueRuntime:_setRegistry(procs)
  LocalRuntime._setRegistry(self, procs)
  local n = self._regSeq + 1
  self._regSeq = n
  self._regGen[procs] = n
  self._regByGen[n] = procs
  self._regByGen[n - 16] = nil       -- the last 16 generations are enough
end

-- Whether a registry an execution may still be pinned to has `name`.
function QueueRuntime:_pinnedUse(name)
  for _, procs in pairs(self._regByGen) do
    if procs ~= self._processors and procs[name] ~= nil then
      -- only if some execution of this runtime still runs
      return next(self._jobs) ~= nil or self._top > 0
    end
  end
  return false
end

-- The registry a job's callContext.reg names, when it is one of ours.
function QueueRuntime:_registryOf(reg)
  if type(reg) ~= "string" then return nil end
  -- Parsed once per distinct string (one per registry generation), not
  -- once per job.
  local memo = self._regMemo
  local g = memo[reg]
  if g == nil then
    local rid, n = reg:match("^(%x+):(%d+)$")
    g = rid == self._runtimeId and tonumber(n) or false
    if self._regMemoN >= 256 then
      memo = {}
      self._regMemo, self._regMemoN = memo, 0
    end
    memo[reg] = g
    self._regMemoN = self._regMemoN + 1
  end
  return g and self._regByGen[g] or nil
end

-- After a reload: queues and workers for new processors, none for removed.
function QueueRuntime:_afterReload()
  if self._ready and core.in_exec() then self:syncProcessors() end
end

--- Makes processors registered after start runnable (queues, workers);
--- workers of unregistered processors are closed.
function QueueRuntime:syncProcessors()
  if not self._ready then return self end
  for name in pairs(self._processors) do self:_ensureQueue(name) end
  for name, w in pairs(self._workers) do
    if not self._processors[name] and not self:_pinnedUse(name) then
      self._workers[name] = nil
      -- In the background: the close waits for the worker's jobs in flight,
      -- which may wait on children this caller is about to let through.
      local closing = self._closingWorkers
      closing[w] = true
      core.spawn(function() w:close() closing[w] = nil return true, true end, "root", 0, 0, 1)
    end
  end
  return self
end

-- Cancellations asked for before this process runs (or enqueues) the
-- execution: checked when it is enqueued and when a worker takes it.
function QueueRuntime:_noteCancel(eid)
  local req = self._cancelReq
  req[eid] = core.now()
  self._cancelReqN = (self._cancelReqN or 0) + 1
  if self._cancelReqN > (self._cancelReqLimit or 1000) then
    local limit = core.now() - 600000
    local n = 0
    for k, t in pairs(req) do
      if t < limit then req[k] = nil else n = n + 1 end
    end
    self._cancelReqN = n
    -- prune again only after as many new entries as are left (amortized)
    self._cancelReqLimit = math.max(1000, 2 * n)
  end
end

function QueueRuntime:_cancelLocal(eid)
  local cid = self._active[eid]
  if not cid then
    self:_noteCancel(eid)
    return false
  end
  self._cancelled[eid] = true
  core.cancel(cid)
  return true
end

-- Marks a queued job cancelled (a worker fails it when it takes it) and
-- tells every process, one of which may be running it.
MARK_CANCEL = redis.script([[
if redis.call("EXISTS", KEYS[1]) == 1 and not redis.call("HGET", KEYS[1], "finishedOn") then
  redis.call("HSET", KEYS[1], "am2zCancel", "1")
end
redis.call("XADD", KEYS[2], "MAXLEN", "~", 1000, "*", "event", "cancel", "jobId", ARGV[1])
return 0
]])

-- In the background, or (now = true, inside an engine coroutine) before
-- returning.
function QueueRuntime:_broadcastCancel(name, eid, now)
  local q = self._queues[name]
  -- Not enqueued yet: _run sees the request and does not enqueue it.
  if not (q and self._conn) then
    self:_noteCancel(eid)
    return
  end
  local rt = self
  local function send()
    MARK_CANCEL:run(rt._conn, { q.keys.P .. eid, rt._prefix .. ":control" }, { eid })
    return true, true
  end
  if now and core.in_exec() then pcall(send) else core.spawn(send, "root", 0, 0, 1) end
end

--- Cancels an execution by id, wherever it runs; it fails with CancelledError.
---@return boolean known true when this process runs it or waits for it
function QueueRuntime:cancel(executionId)
  if type(executionId) ~= "string" then
    error("cancel: expected an execution id (string), got " .. describe(executionId), 2)
  end
  local here = self:_cancelLocal(executionId)
  local name = self._pending[executionId]
  if name then self:_broadcastCancel(name, executionId) end
  return here or name ~= nil
end

-- ------------------------------------------------------------ calls

-- The slot of the job that makes a call is free while it waits.
local function leave_slot(j)
  j.waits = j.waits + 1
  if j.waits == 1 and j.worker then j.worker:_releaseSlot() end
end
local function back_to_slot(j)
  j.waits = j.waits - 1
  if j.waits == 0 and j.worker then j.worker:_takeSlot() end
end

-- Enqueues execution `eid` of `name` and waits for its result. `parent` is
-- the calling execution's id (nil: top level).
function QueueRuntime:_run(name, state, sid, depth, eid, parent, procs)
  local t0 = core.now()
  procs = procs or self._processors
  -- Checked, not copied: the state is only encoded here.
  local def, input = executor.precheck(self, name, state, sid, depth, eid, t0, t0 + executor.wallOffset,
    procs, true)
  if def == nil then return input end
  local ok, err = self:_whenReady()
  if not ok then
    return fail_result(name, eid, sid, state, errors.NetworkError(
      format("cannot execute '%s': %s", name, tostring(err and err.message or err)),
      { cause = tostring(err) }))
  end
  if self._cancelReq[eid] then
    self._cancelReq[eid] = nil
    return fail_result(name, eid, sid, state,
      errors.CancelledError(format("Execution of '%s' was cancelled before it was enqueued", name),
        "cancelled"))
  end
  local refused = self:_refuse(name, eid, sid, state, parent)
  if refused then return refused end
  local okq, q = pcall(self._ensureQueue, self, name, def)
  -- Setting up the queue may have yielded: look again.
  refused = self:_refuse(name, eid, sid, state, parent)
  if refused then return refused end
  if not okq then
    return fail_result(name, eid, sid, state, errors.is(q, errors.AM2ZError) and q
      or errors.NetworkError(format("could not set up the queue of '%s': %s", name, tostring(q))))
  end
  local hub = self._hub
  local w = hub:register(eid, name)
  local j = parent and self._jobs[parent]
  if j then
    j.children[#j.children + 1] = { name, eid }
    leave_slot(j)
  end
  local keep_c, keep_f = self._keepComplete, self._keepFail
  -- Children are kept while their parent runs (a re-run parent reads their
  -- results) and removed when it ends; a week's age limit is the backstop
  -- for those whose parent never ended here (a stop deadline, a crash).
  if parent then keep_c, keep_f = CHILD_KEEP, CHILD_KEEP end
  local qc = def.config.queueConfig
  local data = { processorName = name, state = input, sessionId = sid, executionId = eid,
                 callContext = { depth = depth, parentExecutionId = parent,
                                 rootExecutionId = j and j.root or (parent == nil and eid or nil),
                                 reg = self._runtimeId .. ":" .. (self._regGen[procs] or 0) } }
  local okj, data_json = pcall(json.encode, data)
  local r, aerr
  if not okj then
    aerr = errors.ValidationError("state", nil, "state cannot be encoded as JSON: " .. tostring(data_json))
  else
    -- One job is one BullMQ attempt (retries run in the worker); the options
    -- differ only by top level/child and priority, so they are encoded once.
    local okey = (parent and "c" or "t") .. (qc and qc.priority or 0)
    local opts_json = self._optsJson[okey]
    if not opts_json then
      opts_json = cjson.encode({ attempts = 1, removeOnComplete = keep_c, removeOnFail = keep_f,
                                 priority = qc and qc.priority or nil })
      self._optsJson[okey] = opts_json
    end
    local k = q.keys
    r, aerr = queue._script("addJob"):run(self._conn,
      { k.wait, k.prioritized, k.delayed, k.meta, k.id, k.events, k.marker, k.pc, k.active },
      { k.P, eid, name, data_json, opts_json, format("%d", floor(core.wall_ms())), 0,
        qc and qc.priority or 0, "0", "1" })
  end
  local result
  if r == nil then
    hub:unregister(eid, w)
    -- Cut off (aborted, timed out, link lost) with the add on its way: the
    -- job may exist all the same, and nobody waits for it. A child is in
    -- its parent's list, removed with the others when the parent ends.
    if not (self:_givenBack(j) or errors.is(aerr, errors.ValidationError)
            or errors.is(aerr, redis.RedisError)) then
      self:_broadcastCancel(name, eid)
    end
    result = fail_result(name, eid, sid, state, errors.is(aerr, errors.AM2ZError) and aerr
      or errors.NetworkError(format("could not enqueue '%s': %s", name, tostring(aerr))))
  else
    if type(r) == "table" and r[2] ~= "" then
      -- A re-run parent: this child had already finished.
      hub:unregister(eid, w)
      if r[3] ~= "" and r[4] == "" then
        result = completed_result(name, eid, r[3])
      else
        result = failed_result(name, eid, r[4], r[5])
      end
    else
      -- A cancel asked for while the add was on its way.
      if self._cancelReq[eid] then
        self._cancelReq[eid] = nil
        self:_broadcastCancel(name, eid)
      end
      local res, reason = hub:await(eid, w)
      if res then
        result = res
      else
        -- We were aborted (cancelled, timed out): so is the child. Its job
        -- is removed with its parent's other children when the parent ends
        -- (once it has ended itself, if it still runs then).
        if not self:_givenBack(j) then self:_broadcastCancel(name, eid) end
        result = fail_result(name, eid, sid, state, errors.fromCore(reason or "ECANCELED",
          format("Execution of '%s' was interrupted: its caller was aborted", name)))
      end
    end
  end
  if j then back_to_slot(j) end
  if result.state == nil then result.state = statem.clone(state) end
  return result
end

-- At a stop deadline, a job running another producer's execution goes back
-- to its queue with its children, to be resumed: an aborted child of it is
-- left alone then (j: the parent's job record here).
function QueueRuntime:_givenBack(j)
  return (self._stopping and j and not self._pending[j.root]) and true or false
end

-- Why an execution may not be enqueued now (a failed result), or nil.
function QueueRuntime:_refuse(name, eid, sid, state, parent)
  local hub = self._hub
  if hub == nil or hub.closing then
    -- stop() has closed the events reader already (its deadline passed)
    return fail_result(name, eid, sid, state, errors.CancelledError(
      format("Execution of '%s' was not started: the runtime is stopping", name), "stopped"))
  end
  local why = core.aborted()
  if why then
    -- The caller was cancelled or timed out (its body still unwinding):
    -- as on LocalRuntime, a call it makes now fails at once.
    return fail_result(name, eid, sid, state, errors.fromCore(why,
      format("Execution of '%s' was not started: its caller was aborted", name)))
  end
  if parent then
    local j = self._jobs[parent]
    if not j or j.done then
      return fail_result(name, eid, sid, state, errors.CancelledError(
        format("Execution of '%s' was not started: its caller's job has ended", name), "cancelled"))
    end
  end
  return nil
end

function QueueRuntime._remoteCall(rt, ctx, name, state, sid, depth, eid)
  return rt:_run(name, state, sid, depth, eid, ctx[4], ctx[11])
end

-- Top-level executions: the producer side of LocalRuntime's execute.
function QueueRuntime:_executeTop(name, state, sid, named, eid, counted, procs)
  if not counted then self._top = self._top + 1 end
  self._pending[eid] = name
  local ok, r = pcall(self._run, self, name, state, sid, 0, eid, nil, procs)
  self._pending[eid] = nil
  if not ok then
    r = fail_result(name, eid, sid, state,
      errors.ProcessorExecutionError(name, eid, r, { reason = "internal error" }))
  end
  self:_record(sid, named, r, eid)
  self:_topDone()
  return r
end

function QueueRuntime:_record(sid, named, r, eid)
  if r.success and named then
    local ok, e = pcall(self._stateManager.set, self._stateManager, sid, r.state, eid)
    if not ok then self._logger:warn("could not store session state", { error = tostring(e) }) end
  end
end

--- Executes in the given session (API.md: QueueRuntime adds it).
function QueueRuntime:executeInSession(name, state, sessionId)
  if type(sessionId) ~= "string" or sessionId == "" then
    error("executeInSession: expected sessionId to be a non-empty string, got " .. describe(sessionId), 2)
  end
  return self:execute(name, state, sessionId)
end

-- executeMany and executeAsync: each execution waits in a coroutine of its
-- own (a job on Redis is no cheaper to wait for without one).
local Handle = {}
Handle.__index = Handle

function Handle:wait()
  if self._result then return self._result end
  if not core.in_exec() then
    error("handle:wait: must be called inside an engine coroutine (am2z.run(fn), a processor, "
      .. "or the main chunk of a script run by am2z-lua)", 2)
  end
  local token = newtoken()
  self._waiters[#self._waiters + 1] = { (core.current()), token }
  local _, reason = core.wait_host(token)
  if self._result then return self._result end
  return { success = false, executionTime = 0, metadata = { executionId = self.executionId },
           error = errors.fromCore(reason or "ECANCELED", "wait interrupted: the waiter was aborted") }
end

function Handle:cancel()
  return self._rt:cancel(self.executionId)
end

local function handle_body(h, a)
  local r = h._rt:_executeTop(a[1], a[2], a[3], a[4], h.executionId, true, a[5])
  h._result = r
  local w = h._waiters
  h._waiters = {}
  for i = 1, #w do core.complete_host(w[i][1], w[i][2]) end
  return true, true
end

-- The same argument rules and session choice as LocalRuntime.
local check_exec_args, session_of = runtime._checkExecArgs, runtime._sessionOf

function QueueRuntime:executeAsync(name, state, sessionId)
  check_exec_args(self, "executeAsync", name, state, sessionId)
  local eid = executor.newExecutionId()
  local sid, named = session_of(state, sessionId)
  -- The caller may change its table once this returns.
  local snapshot = statem.copy(state) or state
  local h = setmetatable({ _rt = self, _waiters = {}, _result = false, executionId = eid }, Handle)
  self._pending[eid] = name
  -- Counted now: a stop() right after this call waits for it too.
  self._top = self._top + 1
  core.spawn(handle_body, "root", 0, 0, 1, h, { name, snapshot, sid or eid, named, self._processors })
  return h
end

function QueueRuntime:executeMany(name, states, sessionId)
  runtime._checkManyArgs(self, name, states, sessionId)
  local hs = {}
  for i, s in ipairs(states) do hs[i] = self:executeAsync(name, s, sessionId) end
  local out = {}
  for i, h in ipairs(hs) do
    out[i] = h:wait()
    if out[i].error and not h._result then
      -- We were aborted: so is everything we started.
      for k = i, #hs do
        hs[k]:cancel()
        out[k] = out[k] or out[i]
      end
      break
    end
  end
  return out
end

local function is_idle(self)
  return self._top == 0 and next(self._jobs) == nil
end

function QueueRuntime:_notifyIdle()
  local ws = self._idleWaiters
  if #ws > 0 and is_idle(self) then
    self._idleWaiters = {}
    for _, x in ipairs(ws) do core.complete_host(x[1], x[2]) end
  end
end

function QueueRuntime:_topDone()
  LocalRuntime._topDone(self)
  self:_notifyIdle()
  if self._stopWhenIdle and self._top == 0 then self:_mainDone() end
end

-- After am2z-lua's main chunk: a producer-only runtime has nothing left to
-- serve once its executions are done; stopping it lets the process exit.
-- One with workers keeps running (it serves other producers).
function QueueRuntime:_mainDone()
  if self._workerEnabled or not self._started then return end
  if self._top > 0 then
    self._stopWhenIdle = true
    return
  end
  self._stopWhenIdle = false
  local rt = self
  core.spawn(function() rt:stop() return true, true end, "root", 0, 0, 1)
end

-- Waits (in an engine coroutine) until nothing of this runtime runs or ms
-- pass. Any number of callers may wait (two stop() calls, stop + disconnect).
local function wait_idle(self, ms)
  if is_idle(self) or not core.in_exec() or ms <= 0 then return end
  local w = { (core.current()), newtoken() }
  local ws = self._idleWaiters
  ws[#ws + 1] = w
  local watchdog = core.spawn(function(x, ms_)
    if core.sleep(ms_) then core.complete_host(x[1], x[2]) end
    return true, true
  end, "watch", 0, 0, 1, w, ms)
  core.wait_host(w[2])
  core.cancel(watchdog)
  for i = #self._idleWaiters, 1, -1 do
    if self._idleWaiters[i] == w then table.remove(self._idleWaiters, i) end
  end
end

--- Stops: new executions are refused; what runs here (top-level waits and
--- jobs its workers took) may finish until the grace deadline, then is
--- cancelled; then workers and connections close. Waits only inside an
--- engine coroutine.
function QueueRuntime:stop(opts)
  local grace = runtime._graceOf(opts)
  if not self._started and not self._conn and not self._connecting then return self end
  self._started = false
  self:_metricsStop()
  -- Draining: workers keep taking what this process still has to run (its
  -- own executions, children of jobs running here) and give the rest back.
  local rt = self
  local function accept(job)
    local d = job.data
    if type(d) ~= "table" then return false end
    local eid = type(d.executionId) == "string" and d.executionId or job.id
    local parent = type(d.callContext) == "table" and d.callContext.parentExecutionId
    return rt._pending[eid] ~= nil or (parent ~= nil and rt._jobs[parent] ~= nil)
  end
  self._accept = accept
  self._stopWhenIdle = false
  for _, w in pairs(self._workers) do w._accept = accept end
  if self._connecting and core.in_exec() then
    -- Let the connect finish; it sees the runtime stopped and closes.
    local token = newtoken()
    self._readyWaiters = self._readyWaiters or {}
    self._readyWaiters[#self._readyWaiters + 1] = { (core.current()), token }
    core.wait_host(token)
  end
  wait_idle(self, grace)
  -- The deadline: cancel what still runs here; whoever still waits on a
  -- job gets a CancelledError result from the closing hub. Jobs of other
  -- producers go back to their queue instead of failing (handle_job).
  self._stopping = true
  for eid, cid in pairs(self._active) do
    self._cancelled[eid] = true
    core.cancel(cid)
  end
  -- Executions this process started that still run (or wait) elsewhere are
  -- cancelled there too; here their waits end with CancelledError when the
  -- reader closes. Sent before that, on the connection that closes last.
  local pend = {}
  for eid, name in pairs(self._pending) do pend[#pend + 1] = { eid, name } end
  for _, p in ipairs(pend) do self:_broadcastCancel(p[2], p[1], true) end
  if self._hub then self._hub:close() end
  self._hub = nil
  -- Cancelled jobs still record their failure through their worker, unless
  -- Redis is gone: then they are abandoned (a stall check recovers them).
  wait_idle(self, 2000)
  self._ready = false
  -- Each close waits; meanwhile no worker may be added (_startWorker) and
  -- the table is not traversed across those waits. A worker being closed
  -- is in _closingWorkers, so that a concurrent stop (stop + disconnect)
  -- waits for it before closing the command connection it shares.
  self._closingAll = self._closingAll + 1
  local closing = self._closingWorkers
  local function close_worker(w)
    closing[w] = true
    w._abandon = true
    local ok, e = pcall(w.close, w)
    closing[w] = nil
    if not ok then self._logger:error("QueueRuntime: closing a worker failed", { error = tostring(e) }) end
  end
  local name, w = next(self._workers)
  while name do
    self._workers[name] = nil
    close_worker(w)
    name, w = next(self._workers)
  end
  -- Workers others are still closing (syncProcessors, another stop): a
  -- second close waits for the first.
  local others = {}
  for cw in pairs(closing) do others[#others + 1] = cw end
  for _, cw in ipairs(others) do
    cw._abandon = true
    pcall(cw.close, cw)
  end
  -- Orphans whose end the closed reader can no longer see: those already
  -- finished or still queued go now; one still running elsewhere ends
  -- there, and the age limit removes it.
  local left = {}
  for id, pname in pairs(self._orphans) do left[#left + 1] = { pname, id } end
  self._orphans = {}
  if #left > 0 then pcall(self._removeChildren, self, left) end
  self._queues = {}
  self._closingAll = self._closingAll - 1
  self._stopping = false
  self._accept = nil
  if self._conn then self._conn:close() end
  self._conn = nil
  -- The default state store's own connection reopens on next use.
  local sm = self._stateManager
  if self._ownState and sm.close then sm:close() end
  return self
end

--- Stops and closes every connection, the state store's too.
function QueueRuntime:disconnect()
  self:stop({ graceMs = 0 })
  local sm = self._stateManager
  if sm and sm.close then sm:close() end
  return self
end

--- Queue handles of the registered processors (name, getJobCounts, pause,
--- resume, getJobs, ...), in processor name order.
function QueueRuntime:getQueues()
  local out = {}
  for _, n in ipairs(self:getRegisteredProcessorNames()) do
    local q = self._queues[n]
    if q then out[#out + 1] = q end
  end
  return out
end

--- Empties every processor queue: waiting, delayed, completed and failed jobs.
function QueueRuntime:cleanAllQueues()
  for _, q in ipairs(self:getQueues()) do
    q:drain(true)
    q:clean(0, 100000, "completed")
    q:clean(0, 100000, "failed")
  end
  return self
end

function QueueRuntime:getStats()
  local s = LocalRuntime.getStats(self)
  local qs = {}
  if self._ready and core.in_exec() then
    for _, q in ipairs(self:getQueues()) do
      local ok, c = pcall(q.getJobCounts, q)
      if ok and type(c) == "table" then qs[q.processorName] = c end
    end
  end
  s.queueStats = qs
  return s
end

-- ------------------------------------------------------------ factories

--- QueueRuntime with defaults: redis options, runtime options, logger.
function M.createQueueRuntimeWithDefaults(redisOpts, runtimeOpts, logger)
  if redisOpts ~= nil and type(redisOpts) ~= "table" then
    error("createQueueRuntimeWithDefaults: expected redis options (a table) or nil, got "
      .. describe(redisOpts), 2)
  end
  if runtimeOpts ~= nil and type(runtimeOpts) ~= "table" then
    error("createQueueRuntimeWithDefaults: expected runtime options (a table) or nil, got "
      .. describe(runtimeOpts), 2)
  end
  return QueueRuntime.new({ redis = redisOpts, runtime = runtimeOpts, logger = logger })
end

function M.createQueueRuntime(config, logger)
  if config ~= nil and type(config) ~= "table" then
    error("createQueueRuntime: expected a config table, got " .. describe(config), 2)
  end
  local c = {}
  for k, v in pairs(config or {}) do c[k] = v end
  if logger ~= nil then c.logger = logger end
  return QueueRuntime.new(c)
end

M._jsonNull = json_null
return M
