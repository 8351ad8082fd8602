--[[
am2z.runtime -- LocalRuntime: processors executed in this process, on the
engine's loop, with the semantics every runtime shares (am2z.executor).

Must not: talk to Redis or libuv directly, or raise for runtime conditions
in execute/executeMany (they return failed results). Misuse (wrong argument
types, not started, waiting outside an engine coroutine) raises.
]]

local core = require("am2z.core")
local errors = require("am2z.errors")
local log = require("am2z.log")
local processor = require("am2z.processor")
local executor = require("am2z.executor")
local statem = require("am2z.state")

local type, pairs, ipairs, error, setmetatable, tostring, pcall =
  type, pairs, ipairs, error, setmetatable, tostring, pcall
local format, sort = string.format, table.sort
local floor, huge = math.floor, math.huge
local describe = processor.describe

local UINT32_MAX = 4294967295

local M = {}

-- Every runtime created, so am2z-lua can stop them all on SIGINT/SIGTERM.
local all_runtimes = setmetatable({}, { __mode = "k" })
M._all = all_runtimes

---@class LocalRuntime
local LocalRuntime = {}
LocalRuntime.__index = LocalRuntime
M.LocalRuntime = LocalRuntime

local function is_posint(v)
  return type(v) == "number" and v > 0 and v == floor(v) and v < huge
end

local function check_logger(fname, l)
  if type(l) ~= "table" or type(l.info) ~= "function" or type(l.error) ~= "function" then
    error(format("%s: expected logger to be a logger (from am2z.createLogger), got %s", fname,
      describe(l)), 3)
  end
end

--- Creates an in-process runtime.
---@param opts table|nil { maxCallDepth = 10, defaultTimeout = 60000, logger, stateManager }
---@return LocalRuntime
function LocalRuntime.new(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("LocalRuntime.new: expected a table of options or nil, got " .. describe(opts), 2)
  end
  opts = opts or {}
  local known = { maxCallDepth = true, defaultTimeout = true, logger = true, stateManager = true,
                  monitoring = true }
  for k in pairs(opts) do
    if not known[k] then
      error(format("LocalRuntime.new: unknown option %s (expected maxCallDepth, defaultTimeout, "
        .. "logger, stateManager, monitoring)", describe(k)), 2)
    end
  end
  local mon = M._monitoringOf("LocalRuntime.new", opts.monitoring)
  local depth = opts.maxCallDepth == nil and 10 or opts.maxCallDepth
  if not is_posint(depth) then
    error("LocalRuntime.new: expected maxCallDepth to be a positive integer, got " .. describe(depth), 2)
  end
  local tmo = opts.defaultTimeout == nil and 60000 or opts.defaultTimeout
  if not is_posint(tmo) or tmo > UINT32_MAX then
    error("LocalRuntime.new: expected defaultTimeout to be a positive integer (ms), got " .. describe(tmo), 2)
  end
  if opts.logger ~= nil then check_logger("LocalRuntime.new", opts.logger) end
  local sm = opts.stateManager
  if sm ~= nil and (type(sm) ~= "table" or type(sm.get) ~= "function" or type(sm.set) ~= "function") then
    error("LocalRuntime.new: expected stateManager to have get/set methods, got " .. describe(sm), 2)
  end
  local self = setmetatable({
    _maxCallDepth = depth,
    _defaultTimeout = tmo,
    _logger = opts.logger or log.createLogger({ source = "am2z" }),
    _loggers = {},
    _stateManager = sm or statem.MemoryStateManager.new(),
    _processors = {},
    _timeouts = {},
    _listeners = {},
    _active = {},
    _cancelled = {},
    _stats = { running = 0, completed = 0, failed = 0 },
    _top = 0,
    _stopWaiters = {},
    _started = false,
    _monitoring = mon,
  }, LocalRuntime)
  all_runtimes[self] = true
  return self
end

-- ------------------------------------------------------------ registration

local function register_one(procs, def, seen)
  if seen[def] then return end
  seen[def] = true
  for _, d in ipairs(def.deps or {}) do register_one(procs, d, seen) end
  procs[def.name] = def
end

-- The registry is copied on every change, never changed in place: an
-- execution keeps the registry it started with (so its nested calls run the
-- code it started on), and a reload swaps in a whole new one at once.
local function copy_registry(self)
  local procs = {}
  for k, v in pairs(self._processors) do procs[k] = v end
  return procs
end

M.registerInto = function(procs, def) register_one(procs, def, {}) end

function LocalRuntime:_setRegistry(procs)
  self._processors = procs
  self._timeouts = {}
end

--- Registers a processor definition and its dependencies; replaces an existing name.
---@param def table
---@return LocalRuntime self
function LocalRuntime:register(def)
  if not processor.isDefinition(def) then
    error("register: expected a processor definition (from createProcessor(...):process(fn) "
      .. "or a composite), got " .. describe(def), 2)
  end
  local procs = copy_registry(self)
  register_one(procs, def, {})
  self:_setRegistry(procs)
  return self
end

---@param list table
function LocalRuntime:registerMany(list)
  if type(list) ~= "table" then
    error("registerMany: expected a list of processor definitions, got " .. describe(list), 2)
  end
  for i, def in ipairs(list) do
    if not processor.isDefinition(def) then
      error(format("registerMany: expected list[%d] to be a processor definition, got %s", i,
        describe(def)), 2)
    end
  end
  local procs = copy_registry(self)
  for _, def in ipairs(list) do register_one(procs, def, {}) end
  self:_setRegistry(procs)
  return self
end

---@param name string
---@return boolean removed
function LocalRuntime:unregister(name)
  if type(name) ~= "string" then
    error("unregister: expected a processor name (string), got " .. describe(name), 2)
  end
  local had = self._processors[name] ~= nil
  if had then
    local procs = copy_registry(self)
    procs[name] = nil
    self:_setRegistry(procs)
  end
  return had
end

function LocalRuntime:isProcessorRegistered(name)
  return self._processors[name] ~= nil
end

function LocalRuntime:getRegisteredProcessorNames()
  local names = {}
  for n in pairs(self._processors) do names[#names + 1] = n end
  sort(names)
  return names
end

function LocalRuntime:getProcessors()
  local out = {}
  for _, n in ipairs(self:getRegisteredProcessorNames()) do out[#out + 1] = self._processors[n] end
  return out
end

--- Local processors are runnable as soon as they are registered; kept for
--- parity with QueueRuntime, where it creates queues and workers.
function LocalRuntime:syncProcessors()
  return self
end

-- Effective timeout: explicit, else derived from the children (chain: sum,
-- parallel/route: max, batch: its target's), else the runtime default.
function LocalRuntime:_timeoutOf(def, depth)
  local t = self._timeouts[def]
  if t then return t end
  depth = (depth or 0) + 1
  t = def.config.timeout
  if not t and depth < 50 then
    local procs = self._processors
    if def.type == "chain" then
      t = 0
      for _, c in ipairs(def.processors) do t = t + self:_timeoutOf(procs[c.name] or c, depth) end
    elseif def.type == "parallel" or def.type == "router" then
      t = 0
      for _, c in ipairs(def.deps) do
        local ct = self:_timeoutOf(procs[c.name] or c, depth)
        if ct > t then t = ct end
      end
    elseif def.type == "batch" then
      local target = procs[def.processorName]
      t = target and self:_timeoutOf(target, depth) or self._defaultTimeout
    end
  end
  if not t or t <= 0 then t = self._defaultTimeout end
  if t > UINT32_MAX then t = UINT32_MAX end
  self._timeouts[def] = t
  return t
end

function LocalRuntime:_loggerFor(name)
  local l = self._loggers[name]
  if not l then
    l = self._logger.withSource and self._logger:withSource(name) or self._logger
    self._loggers[name] = l
  end
  return l
end

-- ------------------------------------------------------------ workflow files

--- Loads a workflow file (or a directory of *.lua files): each returns
--- processor definitions, which are registered. With opts.watch (default
--- AM2Z_WATCH=1, i.e. am2z-lua --watch) they are reloaded on change.
---@param path string
---@param opts table|nil { watch = bool, debounceMs = 50 }
---@return table list of { file, codeHash, added, replaced, removed }
function LocalRuntime:load(path, opts)
  -- not a tail call: load's misuse errors name the caller's line
  local summaries = require("am2z.reload").load(self, path, opts)
  return summaries
end

--- Stops watching the files loaded with load().
function LocalRuntime:unwatch()
  if self._loader then self._loader:close() end
  return self
end

-- ------------------------------------------------------------ lifecycle

--- Starts the runtime (twice is a no-op; after stop it starts again).
function LocalRuntime:start()
  if not self._started then
    self._started = true
    self._startedAt = core.now()
  end
  self:_metricsCheck()
  return self
end

-- ------------------------------------------------------------ metrics

local METRICS_EVENT = "metrics:stats"

-- The monitoring options (both runtimes), checked, with their defaults:
-- { enableMetrics = true, metricsInterval = 10000, enableQueueEvents = true }.
function M._monitoringOf(fname, m)
  if m == nil then m = {} end
  if type(m) ~= "table" then
    error(format("%s: expected monitoring to be a table, got %s", fname, describe(m)), 3)
  end
  for k in pairs(m) do
    if k ~= "enableMetrics" and k ~= "metricsInterval" and k ~= "enableQueueEvents" then
      error(format("%s: unknown option monitoring.%s (expected enableMetrics, metricsInterval, "
        .. "enableQueueEvents)", fname, tostring(k)), 3)
    end
  end
  for _, k in ipairs({ "enableMetrics", "enableQueueEvents" }) do
    if m[k] ~= nil and type(m[k]) ~= "boolean" then
      error(format("%s: expected monitoring.%s to be a boolean, got %s", fname, k, describe(m[k])), 3)
    end
  end
  local iv = m.metricsInterval == nil and 10000 or m.metricsInterval
  if not is_posint(iv) or iv > UINT32_MAX then
    error(format("%s: expected monitoring.metricsInterval to be a positive integer (ms), got %s", fname,
      describe(iv)), 3)
  end
  return { enableMetrics = m.enableMetrics ~= false, metricsInterval = iv,
           enableQueueEvents = m.enableQueueEvents ~= false }
end

-- metrics:stats is emitted every metricsInterval ms with getStats(), while
-- the runtime is started and something listens; nothing runs otherwise (a
-- timer would keep the loop, and am2z-lua, alive for nobody).
function LocalRuntime:_metricsCheck()
  if self._metricsCo or self._metricsOff or not self._started or not self._monitoring.enableMetrics
      or not self._listeners[METRICS_EVENT] then
    return
  end
  local rt = self
  self._metricsCo = core.spawn(function()
    local me = core.current()
    -- Still the metrics of a started runtime (not stopped, by a listener
    -- even, nor replaced by a newer loop after a stop and a start)?
    local function live()
      return rt._metricsCo == me and rt._started and rt._listeners[METRICS_EVENT] ~= nil
        and not core.aborted()
    end
    while core.sleep(rt._monitoring.metricsInterval) and live() do
      local ok, stats = pcall(rt.getStats, rt)
      if not ok then
        rt._logger:error("metrics: getStats failed", { error = tostring(stats) })
      elseif live() then    -- getStats may have waited on Redis
        stats.timestamp = floor(executor.wallOffset + core.now())
        rt:_dispatch(METRICS_EVENT, stats)
        -- a listener may have stopped the runtime or left: no more sleeps
        if not live() then break end
      end
    end
    if rt._metricsCo == me then rt._metricsCo = nil end
    return true, true
  end, "root", 0, 0, 1)
end

function LocalRuntime:_metricsStop()
  local co = self._metricsCo
  self._metricsCo = nil
  -- From a metrics:stats listener, the loop is the caller (a stop() there
  -- must keep its own waits): it ends by itself once the listener returns.
  if co and co ~= core.current() then core.cancel(co) end
end

-- am2z-lua's main chunk has returned: metrics alone must not keep it
-- running, now or after a later start() or on().
function LocalRuntime:_mainDone()
  self._metricsOff = true
  self:_metricsStop()
end

local function cancel_all(self)
  for eid, cid in pairs(self._active) do
    self._cancelled[eid] = true
    core.cancel(cid)
  end
end

-- stop's options (both runtimes): the grace in ms; misuse names the caller.
local function grace_of(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("stop: expected a table of options or nil, got " .. describe(opts), 3)
  end
  local grace = opts and opts.graceMs
  if grace == nil then grace = 5000 end
  if type(grace) ~= "number" or grace < 0 then
    error("stop: expected graceMs to be a number >= 0, got " .. describe(grace), 3)
  end
  return grace
end
M._graceOf = grace_of

--- Stops: new executions are refused; in-flight ones may finish until the
--- grace deadline, then are cancelled. Waits only inside an engine coroutine.
---@param opts table|nil { graceMs = 5000 }
function LocalRuntime:stop(opts)
  local grace = grace_of(opts)
  self._started = false
  self:_metricsStop()
  if self._top == 0 then return self end
  if not core.in_exec() or grace == 0 then
    cancel_all(self)
    return self
  end
  local id = core.current()
  local token = executor.newToken()
  local waiters = self._stopWaiters
  waiters[#waiters + 1] = { id, token }
  local rt = self
  local watchdog = core.spawn(function(ms)
    if core.sleep(ms) then cancel_all(rt) end
    return true
  end, "watch", 0, 0, 1, grace)
  core.wait_host(token)
  core.cancel(watchdog)
  return self
end

function LocalRuntime:_topDone()
  self._top = self._top - 1
  if self._top == 0 and #self._stopWaiters > 0 then
    local w = self._stopWaiters
    self._stopWaiters = {}
    for _, x in ipairs(w) do core.complete_host(x[1], x[2]) end
  end
end

-- ------------------------------------------------------------ execution

-- level: of the user's call, seen from here (3 when called by the API
-- function itself).
local function check_exec_args(self, fname, name, state, sid, level)
  level = level or 3
  if type(name) ~= "string" then
    error(format("%s: expected a processor name (string), got %s", fname, describe(name)), level)
  end
  if type(state) ~= "table" then
    error(format("%s: expected a state table, got %s", fname, describe(state)), level)
  end
  if sid ~= nil and (type(sid) ~= "string" or sid == "") then
    error(format("%s: expected sessionId to be a non-empty string or nil, got %s", fname,
      describe(sid)), level)
  end
  if not self._started then
    error(format("%s: the runtime is not started (call runtime:start() first)", fname), level)
  end
end

-- Returns the session id and whether the caller named it (explicitly or
-- in state.metadata): only named sessions are stored for getState, so
-- anonymous executions do not pile up in memory. An anonymous execution
-- gets nil here and uses its execution id as its session.
local function session_of(state, sid)
  if sid then return sid, true end
  local m = state.metadata
  if type(m) == "table" and type(m.sessionId) == "string" and m.sessionId ~= "" then
    return m.sessionId, true
  end
  return nil, false
end
M._checkExecArgs = check_exec_args
M._sessionOf = session_of

function LocalRuntime:_record(sid, named, r)
  if r.success and named then
    local ok, e = pcall(self._stateManager.set, self._stateManager, sid, r.state)
    if not ok then self._logger:warn("could not store session state", { error = tostring(e) }) end
  end
end

function LocalRuntime:_executeTop(name, state, sid, named, eid)
  self._top = self._top + 1
  -- invoke does not raise for runtime conditions; a raise here is a bug,
  -- and it must not leave stop() waiting for an execution that is gone.
  local ok, r = pcall(executor.invoke, self, name, state, sid, 0, eid)
  if not ok then
    r = { success = false, state = state, executionTime = 0, metadata = { executionId = eid },
          error = errors.ProcessorExecutionError(name, eid, r, { reason = "internal error" }) }
  end
  self:_record(sid, named, r)
  self:_topDone()
  return r
end

local function check_in_exec(fname)
  if not core.in_exec() then
    error(fname .. ": must be called inside an engine coroutine (am2z.run(fn), a processor, "
      .. "or the main chunk of a script run by am2z-lua)", 3)
  end
end

--- Executes a processor and waits for its result.
---@param name string
---@param state table
---@param sessionId string|nil
---@return table result { success, state, error, executionTime, metadata }
function LocalRuntime:execute(name, state, sessionId)
  check_exec_args(self, "execute", name, state, sessionId)
  check_in_exec("execute")
  local sid, named = session_of(state, sessionId)
  local eid = executor.newExecutionId()
  return self:_executeTop(name, state, sid or eid, named, eid)
end

-- executor.start's completion for one execution of executeMany.
local function many_done(b, r)
  local rt = b.rt
  local i = b.index[r.metadata.executionId]
  rt:_record(b.sids[i], b.named[i], r)
  rt:_topDone()
  if b.results[i] then return end      -- already reported as cancelled
  b.results[i] = r
  b.left = b.left - 1
  if b.left == 0 and b.waiter then core.complete_host(b.waiter, b.token) end
end

-- executeMany's arguments (both runtimes); errors name the caller's line.
local function check_many_args(self, name, states, sessionId)
  if type(states) ~= "table" then
    error("executeMany: expected a list of state tables, got " .. describe(states), 3)
  end
  for i, s in ipairs(states) do
    if type(s) ~= "table" then
      error(format("executeMany: expected states[%d] to be a state table, got %s", i, describe(s)), 3)
    end
  end
  check_exec_args(self, "executeMany", name, {}, sessionId, 4)
  if not core.in_exec() then
    error("executeMany: must be called inside an engine coroutine (am2z.run(fn), a processor, "
      .. "or the main chunk of a script run by am2z-lua)", 3)
  end
end
M._checkManyArgs = check_many_args

--- Executes the processor once per state, concurrently; results in order.
function LocalRuntime:executeMany(name, states, sessionId)
  check_many_args(self, name, states, sessionId)
  local n = #states
  -- Each execution runs without a waiting coroutine of its own (as with
  -- executeAsync); this coroutine waits once for all of them.
  local b = { rt = self, results = {}, index = {}, sids = {}, named = {}, left = n }
  for i, s in ipairs(states) do
    local sid, named = session_of(s, sessionId)
    local eid = executor.newExecutionId()
    b.index[eid], b.sids[i], b.named[i] = i, sid or eid, named
    self._top = self._top + 1
    executor.start(self, name, s, sid or eid, eid, many_done, b)
  end
  if b.left > 0 then
    b.waiter, b.token = (core.current()), executor.newToken()
    local ok, reason = core.wait_host(b.token)
    b.waiter = nil
    if not ok then
      -- The caller was aborted: so is everything it started.
      local err = errors.fromCore(reason or "ECANCELED", "executeMany interrupted: the caller was aborted")
      for eid, i in pairs(b.index) do
        if not b.results[i] then
          self:cancel(eid)
          b.results[i] = { success = false, error = err, state = states[i], executionTime = 0,
                           metadata = { processorName = name, executionId = eid } }
        end
      end
    end
  end
  return b.results
end

-- A handle keeps its private fields in the array part: H_RT, H_SID,
-- H_NAMED, H_RESULT, H_WAITERS (100k of them may be alive at once).
local Handle = {}
Handle.__index = Handle
local H_RT, H_SID, H_NAMED, H_RESULT, H_WAITERS = 1, 2, 3, 4, 5

--- Waits for the execution started by executeAsync; returns its result.
function Handle:wait()
  if self[H_RESULT] then return self[H_RESULT] end
  check_in_exec("handle:wait")
  local token = executor.newToken()
  local w = self[H_WAITERS]
  if not w then
    w = {}
    self[H_WAITERS] = w
  end
  w[#w + 1] = { (core.current()), token }
  local _, reason = core.wait_host(token)
  if self[H_RESULT] then return self[H_RESULT] end
  return { success = false, executionTime = 0, metadata = { executionId = self.executionId },
           error = errors.fromCore(reason or "ECANCELED", "wait interrupted: the waiter was aborted") }
end

--- Cancels the execution started by executeAsync.
function Handle:cancel()
  return self[H_RT]:cancel(self.executionId)
end

-- executor.start's completion: record, wake the waiters, count it done.
local function async_finished(h, r)
  local rt = h[H_RT]
  rt:_record(h[H_SID], h[H_NAMED], r)
  h[H_RESULT] = r
  local w = h[H_WAITERS]
  if w then
    h[H_WAITERS] = false
    for i = 1, #w do core.complete_host(w[i][1], w[i][2]) end
  end
  rt:_topDone()
end

--- Starts an execution without waiting; returns a handle { executionId, wait(), cancel() }.
--- Usable anywhere, also outside an engine coroutine (the loop runs it later).
function LocalRuntime:executeAsync(name, state, sessionId)
  check_exec_args(self, "executeAsync", name, state, sessionId)
  local eid = executor.newExecutionId()
  local sid, named = session_of(state, sessionId)
  sid = sid or eid     -- an anonymous execution is its own session
  local h = setmetatable({ self, sid, named, false, false, executionId = eid }, Handle)
  self._top = self._top + 1
  executor.start(self, name, state, sid, eid, async_finished, h)
  return h
end

--- Cancels a running execution by id; it fails with CancelledError.
---@return boolean cancelled false when no such execution is running
function LocalRuntime:cancel(executionId)
  if type(executionId) ~= "string" then
    error("cancel: expected an execution id (string), got " .. describe(executionId), 2)
  end
  local cid = self._active[executionId]
  if not cid then return false end
  self._cancelled[executionId] = true
  return core.cancel(cid)
end

---@return table|nil { state, version }
function LocalRuntime:getState(sessionId)
  if type(sessionId) ~= "string" then
    error("getState: expected a session id (string), got " .. describe(sessionId), 2)
  end
  return self._stateManager:get(sessionId)
end

function LocalRuntime:getStats()
  local s = self._stats
  local e = core.stats()
  return {
    registeredProcessors = self:getRegisteredProcessorNames(),
    runningJobs = s.running,
    completedJobs = s.completed,
    failedJobs = s.failed,
    uptime = self._startedAt and (core.now() - self._startedAt) or 0,
    engine = e,
  }
end

-- ------------------------------------------------------------ events

--- Subscribes fn to an event (processor:started|completed|failed|retrying,
--- processor:progress, or a custom ctx:emit name).
function LocalRuntime:on(event, fn)
  if type(event) ~= "string" or event == "" then
    error("on: expected an event name (non-empty string), got " .. describe(event), 2)
  end
  if type(fn) ~= "function" then
    error("on: expected a listener function, got " .. describe(fn), 2)
  end
  local ls = self._listeners[event]
  if not ls then
    ls = {}
    self._listeners[event] = ls
  end
  ls[#ls + 1] = fn
  if event == METRICS_EVENT then self:_metricsCheck() end
  return self
end

function LocalRuntime:off(event, fn)
  local ls = self._listeners[event]
  if not ls then return self end
  local keep = {}
  for _, f in ipairs(ls) do
    if f ~= fn then keep[#keep + 1] = f end
  end
  self._listeners[event] = #keep > 0 and keep or nil
  if event == METRICS_EVENT and #keep == 0 then self:_metricsStop() end
  return self
end

-- Listeners run synchronously; one that raises is logged and never breaks
-- the execution that emitted the event.
function LocalRuntime:_dispatch(event, payload, meta)
  local ls = self._listeners[event]
  if ls then
    for i = 1, #ls do
      local ok, e = pcall(ls[i], payload, meta)
      if not ok then
        self._logger:error(format("listener for %q raised an error", event), { error = tostring(e) })
      end
    end
  end
  if core.subscribers() > 0 then
    local ok, json = pcall(require("cjson").encode, payload)
    core.emit(event, ok and json or nil)
  end
end

return M
