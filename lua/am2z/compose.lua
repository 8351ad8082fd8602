--[[
am2z.compose -- chain, parallel, route and batch: composite processors.

A composite is an ordinary processor definition whose body calls its
children through the runtime (ctx:call or concurrent branches), so the same
definition runs unchanged on any runtime, nests to any depth, and mixes
plain, composite and native children. Children are listed in `deps` and
registered together with the composite.

Must not: run children inline (every child is its own execution with its
own timeout, retries and events), or hold engine state between executions.
]]

local core = require("am2z.core")
local errors = require("am2z.errors")
local processor = require("am2z.processor")
local executor = require("am2z.executor")

local type, ipairs, pairs, error, tostring, pcall = type, ipairs, pairs, error, tostring, pcall
local format, concat, sort = string.format, table.concat, table.sort
local describe = processor.describe
local Success, Failure

local M = {}

local function results()
  if not Success then
    local r = require("am2z.result")
    Success, Failure = r.Success, r.Failure
  end
end

local function check_opts(fname, opts)
  if type(opts) ~= "table" then
    error(format("%s: expected a table of options, got %s", fname, describe(opts)), 3)
  end
  processor.checkName(fname, opts.name, 3)
  if opts.timeout ~= nil then processor.checkTimeout(fname .. " (timeout)", opts.timeout, 3) end
end

local function check_children(fname, list)
  if type(list) ~= "table" or #list == 0 then
    error(format("%s: expected processors to be a non-empty list of processor definitions, got %s",
      fname, type(list) == "table" and "an empty table" or describe(list)), 3)
  end
  local n = 0
  for _ in pairs(list) do n = n + 1 end
  if n ~= #list then
    error(format("%s: expected processors to be a list (keys 1..n), got a table with other keys", fname), 3)
  end
  for i, p in ipairs(list) do
    if not processor.isDefinition(p) then
      error(format("%s: expected processors[%d] to be a processor definition (from :process(fn) "
        .. "or a composite), got %s", fname, i, describe(p)), 3)
    end
  end
end

-- A composite's failure wraps its child's error; it is retryable exactly
-- when the child's error was, so a retry policy on the composite does not
-- retry a validation or business failure of a step.
local function wrap_failure(name, eid, cause, details)
  local err = errors.ProcessorExecutionError(name, eid, cause, details)
  err.retryable = errors.isRetryableError(err.cause)
  return err
end

local function copy_list(t)
  local out = {}
  for i, v in ipairs(t) do out[i] = v end
  return out
end

local function config_of(opts)
  return { description = opts.description, timeout = opts.timeout, retryPolicy = opts.retryPolicy
           and processor.checkRetryPolicy("retryPolicy", opts.retryPolicy, 3) or nil }
end

-- ------------------------------------------------------------------ chain

--- Runs processors one after the other; each one's output is the next one's input.
---@param opts table { name, processors, timeout?, description? }
function M.chainProcessors(opts)
  check_opts("chainProcessors", opts)
  check_children("chainProcessors", opts.processors)
  results()
  local children = copy_list(opts.processors)
  local name = opts.name
  local function body(state, ctx)
    local cur = state
    for i = 1, #children do
      local child = children[i]
      local r = ctx:call(child.name, cur)
      if not r.success then
        return Failure(wrap_failure(name, ctx._eid, r.error, {
          failedProcessor = child.name, completedSteps = i - 1, partialState = cur,
        }))
      end
      cur = r.state
    end
    return Success(cur)
  end
  local def = processor.definition("chain", name, body, config_of(opts), children)
  def.processors = children
  def._freshOutput = true
  return def
end

-- ------------------------------------------------------------------ fan-out

-- Merges children's states onto the input: later keys win; `messages`
-- arrays are concatenated, each child contributing what it added.
local function default_merge(states, initial)
  local out = {}
  for k, v in pairs(initial) do out[k] = v end
  local base = type(initial.messages) == "table" and initial.messages or nil
  local nbase = base and #base or 0
  local msgs
  if base then
    msgs = {}
    for i = 1, nbase do msgs[i] = base[i] end
  end
  for _, s in ipairs(states) do
    for k, v in pairs(s) do
      if k == "messages" and type(v) == "table" then
        msgs = msgs or {}
        local from = 1
        if base and #v >= nbase then
          from = nbase + 1
          for i = 1, nbase do
            if v[i] ~= base[i] then from = 1 break end
          end
        end
        for i = from, #v do msgs[#msgs + 1] = v[i] end
      else
        out[k] = v
      end
    end
  end
  if msgs then out.messages = msgs end
  return out
end
M.defaultMerge = default_merge

-- Branch driver: one per concurrent child, so the fan-out can wait for
-- whichever finishes first.
local function branch_body(ctx, c, i)
  local r = executor.call(ctx, c.name, c.state, c.sid, i)
  return r, r.success
end

-- Runs `calls` concurrently ({ name, state, sid } each); returns the list of
-- output states in order, or nil + (index, failed result) for the first
-- failure to occur, after cancelling the others.
local function fan_out(ctx, calls)
  local index, pending = {}, #calls
  -- Call positions (which make the children's ids) are the context's, as
  -- if each branch were one ctx:call in turn.
  local base = ctx._ncalls
  ctx[9] = base + #calls
  for i, c in ipairs(calls) do
    local id = core.spawn(branch_body, "child", 0, ctx.callDepth, 1, ctx, c, base + i)
    index[id] = i
  end
  local out = {}
  while pending > 0 do
    local id, status, res = core.wait_child()
    if id == nil then
      -- We are being aborted; our children were cancelled with us.
      return nil, nil, { success = false, error = errors.fromCore(status or "ECANCELED",
        "fan-out interrupted: the composite was aborted") }
    end
    local i = index[id]
    if i then
      pending = pending - 1
      index[id] = nil
      if status ~= "OK" or type(res) ~= "table" or not res.success then
        for other in pairs(index) do core.cancel(other) end
        if type(res) ~= "table" then
          res = { success = false, error = errors.fromCore(status, "branch ended with " .. tostring(status)) }
        end
        return nil, i, res
      end
      out[i] = res.state
    end
  end
  return out
end

local function run_merge(ctx, name, merge, states, initial)
  if merge then
    local ok, merged = pcall(merge, states, initial)
    if not ok then
      return nil, errors.ProcessorExecutionError(name, ctx._eid, merged,
        { reason = "mergeFunction raised an error" })
    end
    if type(merged) ~= "table" then
      return nil, errors.ProcessorExecutionError(name, ctx._eid,
        "mergeFunction returned " .. describe(merged) .. " instead of a state table")
    end
    return merged
  end
  return default_merge(states, initial)
end

--- Runs processors concurrently on the same input and merges their outputs.
---@param opts table { name, processors, timeout?, mergeFunction? }
function M.parallelProcessors(opts)
  check_opts("parallelProcessors", opts)
  check_children("parallelProcessors", opts.processors)
  if opts.mergeFunction ~= nil and type(opts.mergeFunction) ~= "function" then
    error("parallelProcessors: expected mergeFunction to be a function(states, initialState), got "
      .. describe(opts.mergeFunction), 2)
  end
  results()
  local children = copy_list(opts.processors)
  local name, merge = opts.name, opts.mergeFunction
  local function body(state, ctx)
    local calls = {}
    for i, c in ipairs(children) do calls[i] = { name = c.name, state = state, sid = ctx._sid } end
    local states, i, failed = fan_out(ctx, calls)
    if not states then
      if not i then return Failure(failed.error) end
      return Failure(wrap_failure(name, ctx._eid, failed.error, {
        failedProcessor = children[i].name, partialState = state }))
    end
    local merged, err = run_merge(ctx, name, merge, states, state)
    if not merged then return Failure(err) end
    -- Each branch bumped the version from the same base; the merged state
    -- counts every successful step (one per plain processor execution).
    local m0 = type(state.metadata) == "table" and state.metadata.version
    if type(m0) == "number" and type(merged.metadata) == "table" then
      local v = m0
      for _, s in ipairs(states) do
        local sv = type(s.metadata) == "table" and s.metadata.version
        if type(sv) == "number" then v = v + (sv - m0) end
      end
      local m = {}
      for k, x in pairs(merged.metadata) do m[k] = x end
      m.version = v
      merged.metadata = m
    end
    return Success(merged)
  end
  local def = processor.definition("parallel", name, body, config_of(opts), children)
  def.processors = children
  return def
end

--- Runs `processorName` once per payload, concurrently, each in its payload's session.
---@param opts table { name, processorName, payloads, mergeFunction?, timeout? }
function M.batchProcessor(opts)
  check_opts("batchProcessor", opts)
  if type(opts.processorName) ~= "string" or opts.processorName == "" then
    error("batchProcessor: expected processorName to be a non-empty string, got "
      .. describe(opts.processorName), 2)
  end
  if type(opts.payloads) ~= "table" or #opts.payloads == 0 then
    error(errors.ConfigurationError("payloads",
      format("batchProcessor '%s': expected payloads to be a non-empty list of states, got %s",
        tostring(opts.name), type(opts.payloads) == "table" and "an empty list" or describe(opts.payloads))), 2)
  end
  for i, p in ipairs(opts.payloads) do
    if type(p) ~= "table" then
      error(format("batchProcessor: expected payloads[%d] to be a state table, got %s", i, describe(p)), 2)
    end
  end
  if opts.mergeFunction ~= nil and type(opts.mergeFunction) ~= "function" then
    error("batchProcessor: expected mergeFunction to be a function(states, initialState), got "
      .. describe(opts.mergeFunction), 2)
  end
  results()
  local name, target, merge = opts.name, opts.processorName, opts.mergeFunction
  local payloads = copy_list(opts.payloads)
  local function body(state, ctx)
    local calls = {}
    for i, p in ipairs(payloads) do
      local sid = type(p.metadata) == "table" and type(p.metadata.sessionId) == "string"
        and p.metadata.sessionId or (ctx._sid .. "-" .. i)
      calls[i] = { name = target, state = p, sid = sid }
    end
    local states, i, failed = fan_out(ctx, calls)
    if not states then
      if not i then return Failure(failed.error) end
      return Failure(wrap_failure(name, ctx._eid, failed.error, {
        failedProcessor = target, failedPayload = i, partialState = state }))
    end
    local merged, err = run_merge(ctx, name, merge, states, state)
    if not merged then return Failure(err) end
    if not merge and state.metadata ~= nil then
      -- Payloads ran in their own sessions: the batch's own metadata stands.
      merged.metadata = state.metadata
    end
    return Success(merged)
  end
  local def = processor.definition("batch", name, body, config_of(opts), {})
  def.processorName = target
  def.payloads = payloads
  return def
end

--- Picks one processor by a key computed from the state.
---@param name string
---@param selector fun(state: table): string
---@param routes table<string, table> key -> processor definition
---@param fallback table|nil definition used for unknown keys
function M.routeProcessor(name, selector, routes, fallback)
  processor.checkName("routeProcessor", name, 2)
  if type(selector) ~= "function" then
    error("routeProcessor: expected selector to be a function(state) returning a route key, got "
      .. describe(selector), 2)
  end
  if type(routes) ~= "table" or next(routes) == nil then
    error("routeProcessor: expected routes to be a non-empty table of key -> processor definition, got "
      .. (type(routes) == "table" and "an empty table" or describe(routes)), 2)
  end
  local deps, keys = {}, {}
  for k, p in pairs(routes) do
    if not processor.isDefinition(p) then
      error(format("routeProcessor: expected routes[%s] to be a processor definition, got %s",
        describe(k), describe(p)), 2)
    end
    keys[#keys + 1] = tostring(k)
    deps[#deps + 1] = p
  end
  sort(keys)
  if fallback ~= nil then
    if not processor.isDefinition(fallback) then
      error("routeProcessor: expected fallback to be a processor definition or nil, got "
        .. describe(fallback), 2)
    end
    deps[#deps + 1] = fallback
  end
  results()
  local table_routes = {}
  for k, p in pairs(routes) do table_routes[k] = p end
  local known = concat(keys, ", ")
  local function body(state, ctx)
    local ok, key = pcall(selector, state)
    if not ok then
      return Failure(errors.ProcessorExecutionError(name, ctx._eid, key,
        { reason = "route selector raised an error" }))
    end
    local target = table_routes[key] or fallback
    if target == nil then
      return Failure(errors.ValidationError("routeKey", key,
        format("route '%s': no route for key %s and no fallback (known routes: %s)",
          name, describe(key), known)))
    end
    return ctx:call(target.name, state)
  end
  local def = processor.definition("router", name, body, {}, deps)
  def._freshOutput = true
  def.routes = table_routes
  def.fallback = fallback
  return def
end

return M
