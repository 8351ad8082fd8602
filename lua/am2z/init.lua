--[[
am2z -- the public Lua API (API.md): processors, composition, results,
errors, state, runtimes, logging and schemas, re-exported from one table.

Must not: hold engine state of its own; everything stateful lives in the
runtimes and in am2z.core.
]]

local core = require("am2z.core")
local errors = require("am2z.errors")
local result = require("am2z.result")
local processor = require("am2z.processor")
local compose = require("am2z.compose")
local statem = require("am2z.state")
local runtime = require("am2z.runtime")
local log = require("am2z.log")
local types = require("am2z.types")

local type, error, pairs, tostring, select = type, error, pairs, tostring, select
local unpack = unpack or table.unpack

local am2z = {
  _VERSION = core.version,
  core = core,
  errors = errors,
  types = types,
}

-- Results
for _, k in pairs({ "Success", "Failure", "isSuccess", "isFailure", "matchResult", "mapResult",
  "mapError", "chainResult", "combineResults", "unwrapResult", "unwrapOr", "safeSync",
  "safeAsync" }) do
  am2z[k] = result[k]
end

-- Errors, also at top level
for k, v in pairs(errors) do
  if type(k) == "string" and k:sub(1, 1) ~= "_" and am2z[k] == nil then am2z[k] = v end
end

-- Processors and composition
am2z.createProcessor = processor.createProcessor
am2z.chainProcessors = compose.chainProcessors
am2z.parallelProcessors = compose.parallelProcessors
am2z.routeProcessor = compose.routeProcessor
am2z.batchProcessor = compose.batchProcessor

-- State
am2z.createAppState = statem.createAppState
am2z.updateStateMetadata = statem.updateStateMetadata
am2z.createNonEmptyArray = statem.createNonEmptyArray
am2z.brand = statem.brand
am2z.isBrandedState = statem.isBrandedState
am2z.MemoryStateManager = statem.MemoryStateManager

-- Runtimes
am2z.LocalRuntime = runtime.LocalRuntime
local queue_runtime = require("am2z.queue_runtime")
am2z.QueueRuntime = queue_runtime.QueueRuntime
am2z.createQueueRuntime = queue_runtime.createQueueRuntime
am2z.createQueueRuntimeWithDefaults = queue_runtime.createQueueRuntimeWithDefaults
am2z.RedisStateManager = require("am2z.redis_state").RedisStateManager

-- Redis connections (the base of the queue layer)
am2z.redis = require("am2z.redis")
-- BullMQ 6 compatible queues (Queue, Worker, QueueEvents, Job)
am2z.queue = require("am2z.queue")

-- Logging
am2z.createLogger = log.createLogger
am2z.createSilentLogger = log.createSilentLogger

--- Monotonic clock in milliseconds.
---@return number
function am2z.now()
  return core.now()
end

--- Suspends the current engine coroutine for ms milliseconds.
---@param ms number
---@return boolean|nil ok
---@return table|nil err CancelledError/TimeoutError when the coroutine was aborted
function am2z.sleep(ms)
  if type(ms) ~= "number" or not (ms >= 0) or ms == math.huge then
    error("am2z.sleep: expected a finite number of milliseconds >= 0, got " .. tostring(ms), 2)
  end
  if not core.in_exec() then
    error("am2z.sleep: must be called inside an engine coroutine (am2z.run(fn), a processor, "
      .. "or the main chunk of a script run by am2z-lua)", 2)
  end
  local ok, reason = core.sleep(ms)
  if ok then return true end
  return nil, errors.fromCore(reason, "sleep interrupted")
end

local function pack(...)
  return { n = select("#", ...), ... }
end

local function traceback_of(e)
  if type(e) == "table" then return e end
  return debug.traceback(tostring(e), 2)
end

--- Runs fn as an engine coroutine and drives the loop until it returns
--- (for plain luajit and busted). Returns fn's results; re-raises its error.
---@param fn function
---@param opts table|nil { timeoutMs = number }
function am2z.run(fn, opts)
  if type(fn) ~= "function" then
    error("am2z.run: expected a function, got " .. type(fn), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("am2z.run: expected a table of options or nil, got " .. type(opts), 2)
  end
  local tmo = opts and opts.timeoutMs or 0
  if type(tmo) ~= "number" or tmo < 0 then
    error("am2z.run: expected timeoutMs to be a number >= 0, got " .. tostring(tmo), 2)
  end
  local status, res = core.run(function()
    return pack(xpcall(fn, traceback_of))
  end, tmo)
  if status == "OK" then
    if res[1] then return unpack(res, 2, res.n) end
    error(res[2], 0)
  elseif status == "ETIMEDOUT" then
    error(("am2z.run: timed out after %d ms"):format(tmo), 2)
  end
  error("am2z.run: " .. tostring(res or status), 2)
end

-- am2z-lua calls this when the script's main chunk has returned: a runtime
-- with nothing to serve (a QueueRuntime without workers) stops once its own
-- executions are done, so the process can exit (API.md rule 17).
function am2z._onMainDone()
  for rt in pairs(runtime._all) do
    if rt._started and rt._mainDone then
      local ok, e = pcall(rt._mainDone, rt)
      if not ok then io.stderr:write("am2z: ", tostring(e), "\n") end
    end
  end
end

-- am2z-lua calls this on SIGINT/SIGTERM: stop every started runtime
-- gracefully, in an engine coroutine of its own (stopping waits).
function am2z._onSignal(name)
  core.spawn(function()
    for rt in pairs(runtime._all) do
      -- watched workflow files would keep the loop alive
      if rt.unwatch then pcall(rt.unwatch, rt) end
      if rt._started then
        local ok, e = pcall(rt.stop, rt)
        if not ok then io.stderr:write("am2z: stopping a runtime failed: ", tostring(e), "\n") end
      end
    end
    -- Workers finish their running jobs; event readers stop.
    for h in pairs(am2z.queue._open) do
      if not h._closed and not h._closing then
        local ok, e = pcall(h.close, h)
        if not ok then io.stderr:write("am2z: closing a queue handle failed: ", tostring(e), "\n") end
      end
    end
    -- Connections the script opened itself would keep the loop alive.
    for c in pairs(am2z.redis._open) do pcall(c.close, c) end
    -- Then the script itself: its pending wait returns a CancelledError.
    core.cancel_main()
    return true
  end, "root", 0, 0, 1)
end

return am2z
