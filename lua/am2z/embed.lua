--[[
am2z.embed -- the Lua half of the C embedding API (am2z_host_* in am2z.h,
bindings/embed.c). The C side owns the lua_State and calls these functions
with lua_pcall; they answer with plain values and JSON strings, and call back
into C through the functions bindings/embed.c puts in M._c.

Native processors: a C function registered by name becomes a processor
definition whose body hands the state (as JSON) to C and waits for
am2z_call_succeed / am2z_call_fail, synchronously or later; an abort
(timeout, cancel) runs the call's cancellation callback. Lua workflows get
them with require("am2z.embed").native(name) and compose them like any
other definition.

Must not: raise into C (every entry point is called with lua_pcall and
returns nil + message for bad input).
]]

local am2z = require("am2z")
local core = require("am2z.core")
local cjson = require("cjson")
local json = require("am2z.json")
local errors = require("am2z.errors")
local executor = require("am2z.executor")

local type, tostring, pcall, pairs = type, tostring, pcall, pairs
local format = string.format

local M = { _c = {}, natives = {} }

local rt           -- the host's runtime

-- JSON for anything a payload may hold: errors serialized, functions dropped.
local function to_plain(v, depth)
  depth = depth or 0
  if type(v) ~= "table" or depth > 50 then
    if type(v) == "function" or type(v) == "userdata" or type(v) == "thread" then return nil end
    return v
  end
  if errors.is(v, errors.AM2ZError) and getmetatable(v) ~= nil then return errors.serialize(v) end
  local out = {}
  for k, x in pairs(v) do out[k] = to_plain(x, depth + 1) end
  return out
end

local function encode(v)
  local ok, j = pcall(json.encode, to_plain(v))
  if ok then return j end
  return cjson.encode({ encodeError = tostring(j) })
end

--- Creates the host's runtime. cfg: { redisUrl, queuePrefix, maxCallDepth,
--- defaultTimeout, concurrency, logLevel }
function M.init(cfg)
  local logger = am2z.createLogger{ source = "embed", level = cfg.logLevel }
  if cfg.redisUrl then
    rt = am2z.QueueRuntime.new{ redis = { url = cfg.redisUrl }, queuePrefix = cfg.queuePrefix,
      logger = logger, worker = { concurrency = cfg.concurrency },
      runtime = { maxCallDepth = cfg.maxCallDepth, defaultTimeout = cfg.defaultTimeout } }
  else
    rt = am2z.LocalRuntime.new{ logger = logger, maxCallDepth = cfg.maxCallDepth,
      defaultTimeout = cfg.defaultTimeout }
  end
  M.runtime = rt
  return true
end

function M.load(path, watch)
  rt:load(path, { watch = watch })
  return true
end

function M.start()
  rt:start()
  return true
end

-- Runs one execution and reports its result to C: cb(ud, eid, ok, json).
local function deliver_body(h, cbp, udp)
  local r = h:wait()
  M._c.result(cbp, udp, h.executionId, r.success and 1 or 0, encode(r))
  return true, true
end

function M.execute(name, state_json, session, cbp, udp)
  local ok, state = pcall(cjson.decode, state_json)
  if not ok or type(state) ~= "table" then
    return nil, format("state_json is not a JSON object (%s)", ok and type(state) or tostring(state))
  end
  local h = rt:executeAsync(name, state, session)
  core.spawn(deliver_body, "root", 0, 0, 1, h, cbp, udp)
  return h.executionId
end

function M.cancel(eid)
  return rt:cancel(eid)
end

function M.stats()
  local s = rt:getStats()
  return encode(s)
end

function M.on(event, cbp, udp)
  rt:on(event, function(payload)
    M._c.event(cbp, udp, event, encode(payload))
  end)
  return true
end

-- Runs Lua code for the host in an engine coroutine (so it may wait: getState
-- under QueueRuntime, executeMany, cleanAllQueues...), with `am2z` and
-- `runtime` in scope; reports cb(ud, ok, json of its first result or error).
local function eval_body(chunk, cbp, udp)
  local ok, v = xpcall(chunk, debug.traceback)
  local j
  if ok then
    j = encode(v == nil and cjson.null or v)
  else
    j = encode({ error = tostring(v) })
  end
  M._c.eval_result(cbp, udp, ok and 1 or 0, j)
  return true, true
end

function M.eval(code, cbp, udp)
  local chunk, err = loadstring(code, "=am2z_host_eval")
  if not chunk then return nil, "syntax error: " .. tostring(err) end
  setfenv(chunk, setmetatable({ am2z = am2z, runtime = rt }, { __index = _G }))
  core.spawn(eval_body, "root", 0, 0, 1, chunk, cbp, udp)
  return true
end

function M.stop(grace)
  core.spawn(function()
    rt:stop{ graceMs = grace }
    rt:unwatch()
    return true, true
  end, "root", 0, 0, 1)
  return true
end

-- ------------------------------------------------------------ native processors

local C_CODES = { ETIMEDOUT = true, ECANCELED = true, ENOMEM = true, ECONNREFUSED = true,
                  ECONNRESET = true, ENOTCONN = true, EINVAL = true }

local function native_error(name, eid, code, message, retryable)
  local e
  if C_CODES[code] then
    e = errors.fromCore(code, message)
  else
    e = errors.ProcessorExecutionError(name, eid, message)
    if code and code ~= "" then e.code = code end
  end
  if retryable ~= nil then e.retryable = retryable end
  return e
end

-- The body of every native processor.
local function native_body(def, state, ctx)
  local c = M._c
  local ok, sjson = pcall(json.encode, state)
  if not ok then return am2z.Failure(errors.ValidationError("state", nil, tostring(sjson))) end
  local token = executor.newToken()
  local eid = ctx.meta.executionId
  local call = c.call_new(def._fnp, def._udp, sjson, core.current(), token, eid)
  ctx.signal:onAbort(function() c.call_abort(call) end)
  local status, a, b, retryable = c.call_take(call)
  if status == nil then
    local woke, reason = core.wait_host(token)
    if not woke then
      c.call_release(call)
      return am2z.Failure(errors.fromCore(reason or "ECANCELED",
        format("native processor '%s' was interrupted", def.name)))
    end
    status, a, b, retryable = c.call_take(call)
  end
  c.call_release(call)
  if status == "ok" then
    local okd, out = pcall(cjson.decode, a)
    if not okd or type(out) ~= "table" then
      return am2z.Failure(errors.ValidationError("state", nil,
        format("native processor '%s' succeeded with a state that is not a JSON object", def.name)))
    end
    return am2z.Success(out)
  end
  return am2z.Failure(native_error(def.name, eid, a, b, retryable))
end

function M.registerNative(name, fnp, udp, timeout)
  local b = am2z.createProcessor(name)
  if timeout and timeout > 0 then b = b:withTimeout(timeout) end
  local def
  def = b:process(function(state, ctx) return native_body(def, state, ctx) end)
  def._fnp, def._udp, def.native = fnp, udp, true
  M.natives[name] = def
  rt:register(def)
  return true
end

--- The definition of a native processor registered by the host, for
--- composing it in Lua workflows.
function M.native(name)
  local d = M.natives[name]
  if not d then
    error(format("embed.native: no native processor '%s' is registered by the host", tostring(name)), 2)
  end
  return d
end

return M
