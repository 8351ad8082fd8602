--[[
am2z.executor -- what happens when a processor is executed, shared by every
runtime: state copy and validation at the boundary, the attempt loop with
retries, the processor context (ctx), result normalization, events.

One *execution* (one executionId) is one or more *attempts*. Each attempt is
its own engine coroutine with its own deadline and cancel token, spawned as
a child of the caller's coroutine, so a caller's cancellation reaches it and
a timed-out attempt that is still running cannot block the next one. The
attempt loop runs in the caller's coroutine.

Must not: talk to Redis or libuv directly (everything goes through
am2z.core), or raise for runtime conditions: execute/ctx:call return failed
results instead.
]]

local core = require("am2z.core")
local errors = require("am2z.errors")
local statem = require("am2z.state")

local type, pairs, tostring, setmetatable, getmetatable, rawset, xpcall, pcall =
  type, pairs, tostring, setmetatable, getmetatable, rawset, xpcall, pcall
local format = string.format
local floor, random = math.floor, math.random
local traceback = debug.traceback

local copy_state = statem.copy
local check_state = statem.check
local bump = statem._bump
local spawn, wait, now = core.spawn, core.wait, core.now
local subscribers = core.subscribers
-- Wall-clock ms derived from the monotonic clock: one clock read per
-- execution instead of two.
local wall_offset = core.wall_ms() - now()

local ProcessorExecutionError = errors.ProcessorExecutionError
local TimeoutError, CancelledError = errors.TimeoutError, errors.CancelledError

local M = {}

-- ------------------------------------------------------------------ ids

local id_seq = 0
-- Unique across processes: QueueRuntime uses execution ids as job ids, so two
-- processes started in the same second must not share a prefix (math.random
-- is not seeded, and the clock alone is not enough).
local id_prefix
do
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(6)
  if f then f:close() end
  if b and #b == 6 then
    id_prefix = (b:gsub(".", function(c) return format("%02x", c:byte()) end))
  else
    id_prefix = format("%x%06x", os.time(), floor((core.now() * 1000) % 0xffffff))
  end
end

--- A new execution id; never contains ":" (BullMQ job ids must not).
function M.newExecutionId()
  id_seq = id_seq + 1
  return "exec-" .. id_prefix .. "-" .. id_seq
end

local token_seq = 0
--- A token for core.wait_host / core.complete_host.
function M.newToken()
  token_seq = token_seq + 1
  return token_seq
end

local session_seq = 0
function M.newSessionId()
  session_seq = session_seq + 1
  return "session-" .. id_prefix .. "-" .. session_seq
end

-- ------------------------------------------------------------------ events

-- Builds the payload only when somebody listens: events are on every step.
local function emit(rt, name, def, eid, sid, attempt, extra)
  local ls = rt._listeners[name]
  if ls == nil and subscribers() == 0 then return end
  local payload = {
    processorName = def and def.name, executionId = eid, sessionId = sid, attempt = attempt,
  }
  if extra then
    for k, v in pairs(extra) do payload[k] = v end
  end
  rt:_dispatch(name, payload)
end
M.emit = emit

-- ------------------------------------------------------------------ context

local Signal = {}
local function reason_error(sig, reason)
  if reason == "ETIMEDOUT" then
    return TimeoutError(format("Processor '%s' timed out after %dms", sig._name, sig._timeout or 0),
      sig._timeout)
  end
  return CancelledError(format("Processor '%s' was cancelled", sig._name), "cancelled")
end
local function signal_onAbort(self, fn)
  if type(fn) ~= "function" then
    error("ctx.signal:onAbort: expected a function, got " .. type(fn), 2)
  end
  local sig = self
  core.on_abort(self._cid, function(reason) fn(reason_error(sig, reason)) end)
end
Signal.__index = function(t, k)
  if k == "aborted" then
    return core.aborted(t._cid) ~= nil
  elseif k == "reason" then
    local r = core.aborted(t._cid)
    return r and reason_error(t, r) or nil
  elseif k == "onAbort" then
    return signal_onAbort
  end
  return nil
end

local Ctx = {}
local ctx_methods = {}

local invoke -- forward

--- Runs another registered processor in this execution's session, one level
--- deeper. Returns its execution result; never raises for its failure.
function ctx_methods.call(self, name, state)
  if type(name) ~= "string" then
    error("ctx:call: expected a processor name (string), got " .. type(name), 2)
  end
  if type(state) ~= "table" then
    error("ctx:call: expected a state table, got " .. type(state), 2)
  end
  local n = self[9] + 1
  self[9] = n
  return M.call(self, name, state, self[5], n)
end

--- The n-th call of an attempt, as ctx:call and the composites make it: run
--- here (LocalRuntime) or through the runtime's queues (QueueRuntime: a
--- runtime with _callRemote). The child's id is deterministic -- the
--- parent's id and the call's position, plus the attempt after the first --
--- so a parent re-run after a crash finds the children it already started.
function M.call(ctx, name, state, sid, n)
  local attempt = ctx[6]
  local eid = attempt == 1 and (ctx[4] .. "." .. n) or (ctx[4] .. "." .. n .. "r" .. attempt)
  local rt = ctx[1]
  local remote = rt._callRemote
  if remote then return remote(rt, ctx, name, state, sid, ctx[10] + 1, eid) end
  -- The registry the top-level execution started with: a reload while it
  -- runs does not change the code of its later steps.
  return invoke(rt, name, state, sid, ctx[10] + 1, eid, ctx[11])
end

--- Suspends for ms; true, or nil + TimeoutError/CancelledError when aborted.
function ctx_methods.sleep(self, ms)
  if type(ms) ~= "number" or not (ms >= 0) or ms == math.huge then
    error("ctx:sleep: expected a finite number of milliseconds >= 0, got " .. tostring(ms), 2)
  end
  local ok, reason = core.sleep(ms)
  if ok then return true end
  return nil, reason_error(self.signal, reason)
end

--- Emits a custom event to the runtime's listeners: fn(data, meta).
function ctx_methods.emit(self, event, data)
  if type(event) ~= "string" or event == "" then
    error("ctx:emit: expected an event name (non-empty string), got " .. type(event), 2)
  end
  local rt = self[1]
  if rt._listeners[event] == nil and core.subscribers() == 0 then return end
  rt:_dispatch(event, data, self.meta)
end

--- Reports progress (0-100 or a table).
function ctx_methods.updateProgress(self, p)
  if not ((type(p) == "number" and p >= 0 and p <= 100) or type(p) == "table") then
    error("ctx:updateProgress: expected a number from 0 to 100 or a table, got " .. tostring(p), 2)
  end
  rawset(self, "progress", p)
  emit(self[1], "processor:progress", self[2], self[4], self[5], self[6],
    { progress = p })
end

-- A context keeps its internals in its array part (slots below), which is
-- a third of the memory of named fields: it is allocated on every step and
-- 100k sleeping executions each hold one. The public fields are built on
-- first use; most steps never touch them.
local CTX_RT, CTX_DEF, CTX_CID, CTX_EID, CTX_SID, CTX_ATTEMPT, CTX_STARTED, CTX_TIMEOUT =
  1, 2, 3, 4, 5, 6, 7, 8
local ctx_private = { _rt = CTX_RT, _def = CTX_DEF, _cid = CTX_CID, _eid = CTX_EID, _sid = CTX_SID,
                      _attempt = CTX_ATTEMPT, _startedAt = CTX_STARTED, _timeout = CTX_TIMEOUT,
                      _ncalls = 9 }
Ctx.__index = function(self, k)
  local m = ctx_methods[k]
  if m then return m end
  if k == "log" then
    local l = self[CTX_RT]:_loggerFor(self[CTX_DEF].name)
    rawset(self, "log", l)
    return l
  elseif k == "meta" then
    local meta = { processorName = self[CTX_DEF].name, executionId = self[CTX_EID],
                   sessionId = self[CTX_SID], attempt = self[CTX_ATTEMPT],
                   startedAt = self[CTX_STARTED] }
    rawset(self, "meta", meta)
    return meta
  elseif k == "signal" then
    local s = setmetatable({ _cid = self[CTX_CID], _name = self[CTX_DEF].name,
                             _timeout = self[CTX_TIMEOUT] }, Signal)
    rawset(self, "signal", s)
    return s
  end
  if k == "callDepth" then return self[10] end
  local slot = ctx_private[k]
  if slot then return self[slot] end
  return nil
end

-- ------------------------------------------------------------------ attempt

local function on_raise(e)
  if errors.is(e, errors.AM2ZError) and type(e) == "table" and getmetatable(e) ~= nil then
    return e
  end
  return { __am2z_raised = true, value = e, traceback = traceback(tostring(e), 2) }
end

local describe = require("am2z.processor").describe

-- `state` nil: the caller fills in its own input state (see with_state),
-- never the attempt's copy, which the body may have changed before failing.
local function failed(err, state)
  local ps = type(err) == "table" and type(err.details) == "table" and err.details.partialState
  return { success = false, error = err, state = ps or state, executionTime = 0, metadata = false }
end

-- Turns whatever the body returned into an attempt result.
local function normalize(def, eid, input, ok, ret)
  local name = def.name
  if not ok then
    if type(ret) == "table" and ret.__am2z_raised then
      return failed(ProcessorExecutionError(name, eid, ret.value,
        { traceback = ret.traceback }), nil), false
    end
    return failed(errors.wrapAsProcessorError(ret, name, eid), nil), false
  end
  if type(ret) ~= "table" or type(ret.success) ~= "boolean" then
    return failed(ProcessorExecutionError(name, eid,
      format("processor '%s' returned %s instead of a Result (Success(state) or Failure(err))",
        name, describe(ret))), nil), false
  end
  if ret.success then
    local out = ret.data
    if out == nil then out = ret.state end
    if type(out) ~= "table" then
      return failed(ProcessorExecutionError(name, eid,
        format("processor '%s' returned Success with %s instead of a state table", name,
          describe(out))), nil), false
    end
    -- Copied, not just checked: the body may keep a reference to what it
    -- returned, and neither the runtime's bump nor the caller may change it.
    -- Composites whose output is a child's fresh output (or built only from
    -- such outputs) mark themselves `_freshOutput`: nobody else holds it.
    local c, msg, path
    if def._freshOutput then
      c = out
    else
      c, msg, path = copy_state(out)
    end
    if c == nil then
      return failed(errors.ValidationError(path, nil,
        format("output of '%s': %s", name, msg)), nil), false
    end
    local schema = def.stateSchema
    if schema then
      local vok, vmsg, vpath = schema:validate(c)
      if not vok then
        return failed(errors.ValidationError(vpath or "state", nil,
          format("output of '%s': %s", name, vmsg)), nil), false
      end
    end
    -- All result fields up front: finish() fills them without a rehash.
    return { success = true, state = c, executionTime = 0, metadata = false }, true
  end
  local err = ret.error
  if err == nil then
    err = ProcessorExecutionError(name, eid, format("processor '%s' returned Failure without an error", name))
  else
    err = errors.wrapAsProcessorError(err, name, eid)
  end
  return failed(err, nil), false
end

-- The body of one attempt: runs in its own engine coroutine.
-- The spawner builds ctx (and fills in its execution id once spawned), so
-- the body's frame stays small: every sleeping execution pays for its
-- coroutine's stack.
local function attempt_body(ctx, input)
  local def = ctx[2]
  return normalize(def, ctx[4], input, xpcall(def.fn, on_raise, input, ctx))
end

-- Array part only: LuaJIT allocates it together with the table header.
local function new_ctx(rt, def, eid, sid, attempt, startedAt, timeout, depth, procs)
  return setmetatable({ rt, def, false, eid, sid, attempt, startedAt, timeout, 0, depth, procs }, Ctx)
end

-- A backoff wait that runtime:cancel can interrupt (it cancels this child).
local function backoff_body(ms)
  local ok = core.sleep(ms)
  return ok and true or false, ok and true or false
end

-- ------------------------------------------------------------------ invoke

local function finish(rt, result, def, name, eid, sid, attempt, t0, startedAt)
  local t1 = now()
  -- Microseconds and whole milliseconds: more digits mean nothing, and they
  -- would make every result take the slow path of am2z.json (QueueRuntime).
  result.executionTime = floor((t1 - t0) * 1000 + 0.5) / 1000
  result.metadata = { processorName = name, executionId = eid, sessionId = sid,
                      attempt = attempt, startedAt = floor(startedAt),
                      codeHash = def and def._codeHash or nil }
  local stats = rt._stats
  if result.success then
    -- One version per successful plain step (composites add none), stamped
    -- with the time read for executionTime anyway.
    if def.type == "processor" then bump(result.state, t1 + wall_offset) end
    stats.completed = stats.completed + 1
    emit(rt, "processor:completed", def or { name = name }, eid, sid, attempt,
      { executionTime = result.executionTime })
  else
    stats.failed = stats.failed + 1
    emit(rt, "processor:failed", def or { name = name }, eid, sid, attempt,
      { executionTime = result.executionTime, error = result.error })
  end
  return result
end

local function call_hook(rt, what, fn, ...)
  local ok, e = pcall(fn, ...)
  if not ok then
    rt._logger:error(what .. " raised an error", { error = tostring(e) })
  end
  return ok, e
end

-- Checks that happen before any attempt. Returns def, input, or nil and a
-- finished failed result.
-- nocopy: the state is only checked, not copied: the caller only encodes it
-- (QueueRuntime's producer side).
local function precheck(rt, name, state, sid, depth, eid, t0, startedAt, procs, nocopy)
  local def = (procs or rt._processors)[name]
  if def == nil then
    return nil, finish(rt, failed(errors.ProcessorNotFoundError(name, rt:getRegisteredProcessorNames()),
      state), nil, name, eid, sid, 1, t0, startedAt)
  end
  if depth > rt._maxCallDepth then
    return nil, finish(rt, failed(errors.CallDepthExceededError(
      format("Call depth %d exceeds the maximum of %d (calling '%s')", depth, rt._maxCallDepth, name),
      rt._maxCallDepth, depth), state), def, name, eid, sid, 1, t0, startedAt)
  end
  local input, msg, path
  if nocopy then
    local ok
    ok, msg, path = check_state(state)
    input = ok and state or nil
  else
    input, msg, path = copy_state(state)
  end
  if input == nil then
    return nil, finish(rt, failed(errors.ValidationError(path, nil, msg), state),
      def, name, eid, sid, 1, t0, startedAt)
  end
  local schema = def.stateSchema
  if schema then
    local vok, vmsg, vpath = schema:validate(input)
    if not vok then
      return nil, finish(rt, failed(errors.ValidationError(vpath or "state", nil,
        format("input of '%s': %s", name, vmsg)), input), def, name, eid, sid, 1, t0, startedAt)
    end
  end
  return def, input
end

-- What one attempt's settlement means as a result.
local function attempt_result(name, eid, status, res, input, timeout)
  if status == "OK" or status == "EFAILED" then
    if type(res) == "table" then return res end
    return failed(ProcessorExecutionError(name, eid, res or "execution body failed"), nil)
  elseif status == "ETIMEDOUT" then
    return failed(TimeoutError(format("Processor '%s' timed out after %dms", name, timeout),
      timeout), nil)
  end
  return failed(CancelledError(format("Processor '%s' was cancelled", name), "cancelled"), nil)
end

-- After a failed attempt: the delay before the next one, or nil when this
-- was the last (runs shouldRetry/onRetry/onExhausted, emits retrying).
local function retry_delay(rt, def, eid, sid, attempt, result)
  local policy = def.config.retryPolicy
  if result.success or policy == nil then return nil end
  local err = result.error
  if attempt >= policy.maxAttempts or rt._cancelled[eid] or errors.is(err, CancelledError) then
    if attempt > 1 and policy.onExhausted and not rt._cancelled[eid] then
      call_hook(rt, "onExhausted", policy.onExhausted, err, attempt)
    end
    return nil
  end
  local retry
  if policy.shouldRetry then
    local ok, r = call_hook(rt, "shouldRetry", policy.shouldRetry, err, attempt)
    retry = ok and r and true or false
  else
    retry = errors.isRetryableError(err)
  end
  if not retry then
    if policy.onExhausted and attempt > 1 then
      call_hook(rt, "onExhausted", policy.onExhausted, err, attempt)
    end
    return nil
  end
  local delay = core.retry_delay(policy.maxAttempts, policy.backoffMs, policy.backoffMultiplier,
    policy.maxBackoffMs or 0, policy.jitter, attempt, random())
  emit(rt, "processor:retrying", def, eid, sid, attempt, { delayMs = delay, error = err })
  if policy.onRetry then call_hook(rt, "onRetry", policy.onRetry, err, attempt) end
  return delay
end

local function cancelled_waiting(name)
  return failed(CancelledError(format("Execution of '%s' was cancelled while waiting to retry",
    name), "cancelled"), nil)
end

-- A failed result carries the partial state its error names, else the state
-- the caller passed in (API.md, execution results), as a copy.
local function with_state(result, state)
  if result.state == nil then result.state = statem.clone(state) end
  return result
end

--- Executes processor `name` on `state` from the current engine coroutine.
--- Returns an execution result; never raises for runtime conditions.
invoke = function(rt, name, state, sid, depth, eid, procs)
  local t0 = now()
  local startedAt = t0 + wall_offset
  procs = procs or rt._processors
  local def, input = precheck(rt, name, state, sid, depth, eid, t0, startedAt, procs)
  if def == nil then return input end

  local timeout = rt:_timeoutOf(def)
  local active = rt._active
  local stats = rt._stats
  stats.running = stats.running + 1
  local attempt, result = 1, nil
  while true do
    emit(rt, "processor:started", def, eid, sid, attempt)
    local ctx = new_ctx(rt, def, eid, sid, attempt,
      attempt == 1 and startedAt or now() + wall_offset, timeout, depth, procs)
    local cid = spawn(attempt_body, "watch", timeout, depth, attempt,
      ctx, attempt == 1 and input or copy_state(state))
    ctx[3] = cid
    active[eid] = cid
    local status, res = wait(cid)
    if status == nil then
      -- Our own wait was cut short: the caller itself is being aborted, and
      -- the attempt (our child) was cancelled with it.
      result = failed(errors.fromCore(res or "ECANCELED",
        format("Execution of '%s' was interrupted: its caller was aborted", name)), nil)
      break
    end
    result = attempt_result(name, eid, status, res, input, timeout)
    local delay = retry_delay(rt, def, eid, sid, attempt, result)
    if delay == nil then break end
    if delay > 0 then
      local bid = spawn(backoff_body, "watch", 0, depth, attempt, delay)
      active[eid] = bid
      local bst, bres = wait(bid)
      if bst ~= "OK" or not bres then
        result = cancelled_waiting(name)
        break
      end
    end
    attempt = attempt + 1
  end
  active[eid] = nil
  if rt._cancelled[eid] then rt._cancelled[eid] = nil end
  stats.running = stats.running - 1
  return finish(rt, with_state(result, state), def, name, eid, sid, attempt, t0, startedAt)
end

-- ------------------------------------------------------------------ async

-- The same execution without a waiting coroutine: each attempt is a root
-- execution and a continuation runs when it settles. A fire-and-forget
-- execution then costs one coroutine (its attempt's) instead of two, which
-- is what 100k concurrently sleeping executions are made of.
local async_settled, async_backoff_done

-- A job is one pending asynchronous execution. Its fields live in the array
-- part (one allocation with the table header): 100k of them may be alive.
local J_RT, J_DEF, J_NAME, J_STATE, J_INPUT, J_SID, J_EID, J_TIMEOUT, J_ATTEMPT, J_T0,
      J_STARTED, J_DONE, J_DONE_ARG, J_PROCS = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14

local function async_attempt(job)
  local rt, def, attempt, eid = job[J_RT], job[J_DEF], job[J_ATTEMPT], job[J_EID]
  emit(rt, "processor:started", def, eid, job[J_SID], attempt)
  local ctx = new_ctx(rt, def, eid, job[J_SID], attempt,
    attempt == 1 and job[J_STARTED] or now() + wall_offset, job[J_TIMEOUT], 0, job[J_PROCS])
  local cid = spawn(attempt_body, "root", job[J_TIMEOUT], 0, attempt,
    ctx, attempt == 1 and job[J_INPUT] or copy_state(job[J_STATE]))
  ctx[3] = cid
  rt._active[eid] = cid
  core.on_settle(cid, async_settled, job)
end

local function async_done(job, result)
  local rt, eid = job[J_RT], job[J_EID]
  rt._active[eid] = nil
  if rt._cancelled[eid] then rt._cancelled[eid] = nil end
  rt._stats.running = rt._stats.running - 1
  job[J_DONE](job[J_DONE_ARG], finish(rt, with_state(result, job[J_STATE]), job[J_DEF], job[J_NAME], eid, job[J_SID],
    job[J_ATTEMPT], job[J_T0], job[J_STARTED]))
  return true, true
end

async_settled = function(job, _, status, res)
  local result = attempt_result(job[J_NAME], job[J_EID], status, res, job[J_INPUT], job[J_TIMEOUT])
  local delay = retry_delay(job[J_RT], job[J_DEF], job[J_EID], job[J_SID], job[J_ATTEMPT], result)
  if delay == nil then return async_done(job, result) end
  if delay > 0 then
    local bid = spawn(backoff_body, "root", 0, 0, job[J_ATTEMPT], delay)
    job[J_RT]._active[job[J_EID]] = bid
    core.on_settle(bid, async_backoff_done, job)
    return true, true
  end
  job[J_ATTEMPT] = job[J_ATTEMPT] + 1
  async_attempt(job)
  return true, true
end

async_backoff_done = function(job, _, status, res)
  if status ~= "OK" or not res then
    return async_done(job, cancelled_waiting(job[J_NAME]))
  end
  job[J_ATTEMPT] = job[J_ATTEMPT] + 1
  async_attempt(job)
  return true, true
end

--- Starts an execution without a waiting coroutine; calls done(arg, result)
--- from an engine coroutine when it has finished (or at once when it fails
--- before any attempt). Usable from anywhere.
function M.start(rt, name, state, sid, eid, done, arg)
  local t0 = now()
  local startedAt = t0 + wall_offset
  local def, input = precheck(rt, name, state, sid, 0, eid, t0, startedAt)
  if def == nil then
    done(arg, input)
    return
  end
  rt._stats.running = rt._stats.running + 1
  -- The caller may change its table after this call returns: retries and a
  -- failed result need the state as it was now.
  local policy = def.config.retryPolicy
  local pristine = (policy and policy.maxAttempts > 1) and statem.clone(input) or state
  async_attempt({ rt, def, name, pristine, input, sid, eid, rt:_timeoutOf(def), 1, t0, startedAt,
                  done, arg, rt._processors })
end

M.invoke = invoke
M.precheck = precheck
M.failed = failed
M.wallOffset = wall_offset

return M
