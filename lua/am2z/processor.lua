--[[
am2z.processor -- the processor builder (createProcessor(...):with...():process(fn)).

Builders validate every argument where the user wrote it and raise with the
method name, the bad value and what was expected. They produce plain,
normalized definition tables; nothing downstream ever walks a builder.

Must not: run anything, touch the engine, or keep global state.
]]

local types = require("am2z.types")

local type, pairs, error, setmetatable, tostring = type, pairs, error, setmetatable, tostring
local floor, huge = math.floor, math.huge
local format = string.format

local M = {}

--- Short description of a bad value for messages: `string "5s"`, `number 1.5`, `nil`.
---@param v any
---@return string
function M.describe(v)
  local t = type(v)
  if t == "string" then
    return format("string %q", v)
  elseif t == "number" or t == "boolean" then
    return t .. " " .. tostring(v)
  end
  return t
end
local describe = M.describe

local function is_posint(v)
  return type(v) == "number" and v > 0 and v == floor(v) and v < huge
end

--- Validates a processor name (non-empty string, no ":": it is part of Redis keys).
function M.checkName(fname, name, level)
  if type(name) ~= "string" or name == "" or name:find(":", 1, true) then
    error(format('%s: expected name to be a non-empty string without ":", got %s',
      fname, describe(name)), (level or 2) + 1)
  end
end

local RETRY_KEYS = {
  maxAttempts = true, backoffMs = true, backoffMultiplier = true, maxBackoffMs = true,
  jitter = true, shouldRetry = true, onRetry = true, onExhausted = true,
}

--- Normalizes and validates a retry policy table (shared with composites).
function M.checkRetryPolicy(fname, p, level)
  level = (level or 2) + 1
  if type(p) ~= "table" then
    error(format("%s: expected a table of options, got %s", fname, describe(p)), level)
  end
  for k in pairs(p) do
    if not RETRY_KEYS[k] then
      error(format("%s: unknown option %s (expected maxAttempts, backoffMs, backoffMultiplier, "
        .. "maxBackoffMs, jitter, shouldRetry, onRetry, onExhausted)", fname, describe(k)), level)
    end
  end
  local out = {
    maxAttempts = p.maxAttempts == nil and 1 or p.maxAttempts,
    backoffMs = p.backoffMs == nil and 1000 or p.backoffMs,
    backoffMultiplier = p.backoffMultiplier == nil and 2 or p.backoffMultiplier,
    maxBackoffMs = p.maxBackoffMs,
    jitter = p.jitter,
    shouldRetry = p.shouldRetry, onRetry = p.onRetry, onExhausted = p.onExhausted,
  }
  if not is_posint(out.maxAttempts) then
    error(format("%s: expected maxAttempts to be a positive integer, got %s", fname,
      describe(p.maxAttempts)), level)
  end
  if type(out.backoffMs) ~= "number" or not (out.backoffMs >= 0) or out.backoffMs == huge then
    error(format("%s: expected backoffMs to be a number >= 0 (ms), got %s", fname,
      describe(p.backoffMs)), level)
  end
  if type(out.backoffMultiplier) ~= "number" or not (out.backoffMultiplier >= 1)
      or out.backoffMultiplier == huge then
    error(format("%s: expected backoffMultiplier to be a number >= 1, got %s", fname,
      describe(p.backoffMultiplier)), level)
  end
  if out.maxBackoffMs ~= nil and (type(out.maxBackoffMs) ~= "number" or not (out.maxBackoffMs >= 0)) then
    error(format("%s: expected maxBackoffMs to be a number >= 0 (ms), got %s", fname,
      describe(p.maxBackoffMs)), level)
  end
  if out.jitter == nil then out.jitter = false end
  if type(out.jitter) ~= "boolean" then
    error(format("%s: expected jitter to be a boolean, got %s", fname, describe(p.jitter)), level)
  end
  for _, k in pairs({ "shouldRetry", "onRetry", "onExhausted" }) do
    if out[k] ~= nil and type(out[k]) ~= "function" then
      error(format("%s: expected %s to be a function, got %s", fname, k, describe(out[k])), level)
    end
  end
  return out
end

function M.checkTimeout(fname, ms, level)
  if not is_posint(ms) then
    error(format("%s: expected a positive integer (ms), got %s", fname, describe(ms)),
      (level or 2) + 1)
  end
  return ms
end

local QUEUE_KEYS = { concurrency = true, priority = true, rateLimitRpm = true }

local Builder = {}
Builder.__index = Builder

local function derive(b, key, value)
  local cfg = {}
  for k, v in pairs(b._config) do cfg[k] = v end
  cfg[key] = value
  return setmetatable({ _name = b._name, _config = cfg, _schema = b._schema }, Builder)
end

---@param description string
function Builder:withDescription(description)
  if type(description) ~= "string" then
    error("withDescription: expected a string, got " .. describe(description), 2)
  end
  return derive(self, "description", description)
end

---@param ms integer timeout in milliseconds
function Builder:withTimeout(ms)
  M.checkTimeout("withTimeout", ms, 2)
  return derive(self, "timeout", ms)
end

---@param policy table { maxAttempts, backoffMs, backoffMultiplier, maxBackoffMs, jitter, shouldRetry, onRetry, onExhausted }
function Builder:withRetryPolicy(policy)
  return derive(self, "retryPolicy", M.checkRetryPolicy("withRetryPolicy", policy, 2))
end

---@param qc table { concurrency, priority, rateLimitRpm }
function Builder:withQueueConfig(qc)
  if type(qc) ~= "table" then
    error("withQueueConfig: expected a table of options, got " .. describe(qc), 2)
  end
  for k, v in pairs(qc) do
    if not QUEUE_KEYS[k] then
      error(format("withQueueConfig: unknown option %s (expected concurrency, priority, rateLimitRpm)",
        describe(k)), 2)
    end
    if k == "priority" then
      if type(v) ~= "number" or v < 0 or v ~= floor(v) then
        error("withQueueConfig: expected priority to be an integer >= 0, got " .. describe(v), 2)
      end
    elseif not (type(v) == "number" and v > 0 and v < huge) then
      error(format("withQueueConfig: expected %s to be a positive number, got %s", k, describe(v)), 2)
    elseif k == "concurrency" and v ~= floor(v) then
      error("withQueueConfig: expected concurrency to be a positive integer, got " .. describe(v), 2)
    end
  end
  local copy = {}
  for k, v in pairs(qc) do copy[k] = v end
  return derive(self, "queueConfig", copy)
end

---@param schema table a schema from am2z.types
function Builder:withState(schema)
  if not types.isSchema(schema) then
    error("withState: expected a schema from am2z.types, got " .. describe(schema), 2)
  end
  local b = derive(self, "description", self._config.description)
  b._schema = schema
  return b
end

---@param fn fun(state: table, ctx: table): table
---@return table definition
function Builder:process(fn)
  if type(fn) ~= "function" then
    error("process: expected a function(state, ctx), got " .. describe(fn), 2)
  end
  local cfg = {}
  for k, v in pairs(self._config) do cfg[k] = v end
  return M.definition("processor", self._name, fn, cfg, {}, self._schema)
end

function M.definition(kind, name, fn, config, deps, schema)
  local def = {
    name = name, type = kind, fn = fn, config = config, deps = deps,
    stateSchema = schema, _am2z_definition = true,
  }
  -- While a workflow file runs (am2z.reload), the definitions it creates are
  -- collected: a reload may only remove what the file itself defined.
  local c = M._collect
  if c then c[def] = true end
  return def
end

function M.isDefinition(v)
  return type(v) == "table" and v._am2z_definition == true
end

--- Starts a processor definition.
---@param name string non-empty, no ":"
function M.createProcessor(name)
  M.checkName("createProcessor", name, 2)
  return setmetatable({ _name = name, _config = {} }, Builder)
end

return M
