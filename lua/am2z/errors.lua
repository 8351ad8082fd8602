--[[
am2z.errors: the error classes of am2z-lua and the helpers that move errors
between processes.

Errors here are tables, not strings, because the runtime has to decide on
retries (retryable, category), report them (code, details) and ship them
through Redis as JSON. An error that crossed a process boundary arrives as a
plain table without metatable; `errors.is` and `errors.deserialize` therefore
work by class *name* through a registry, never only by metatable identity.

What this module must not do:
  * require anything (not even cjson): it is loaded by every other module;
  * raise while turning a value into an error (`from`, `serialize`,
    `deserialize`, the constructors of built-in classes): those run on error
    paths, where a second error would hide the first. Only misuse of the API
    itself (`define`, `is` with something that is not a class, an invalid
    severity literal) raises;
  * put anything into a serialized error that cjson cannot encode.
]]

local type, tostring, pairs = type, tostring, pairs
local setmetatable, getmetatable, rawget = setmetatable, getmetatable, rawget
local error = error
local os_time = os.time
local concat = table.concat
local math_huge, math_floor = math.huge, math.floor
local str_format, str_gsub, str_upper = string.format, string.gsub, string.upper

---@alias am2z.Severity "low"|"medium"|"high"|"critical"

---An error instance. Fields are plain data so the table can be logged or
---serialized as is; methods come from the class through the metatable.
---@class am2z.Error
---@field name string
---@field code string
---@field message string
---@field category string
---@field severity am2z.Severity
---@field retryable boolean
---@field details table
---@field cause am2z.Error|nil
---@field timestamp number ms since the epoch

---An error class: callable (`Class(...)`) and with `.new(...)`, same arguments.
---@class am2z.ErrorClass
---@field name string
---@field code string
---@field category string
---@field severity am2z.Severity
---@field retryable boolean
---@field parent am2z.ErrorClass|nil
---@field defaultMessage string|nil
---@field new fun(...): am2z.Error
---@overload fun(...): am2z.Error

local errors = {}

local SEVERITIES = { low = true, medium = true, high = true, critical = true }

-- name -> class. Lookup by name is what lets a JSON-decoded error find its
-- class again in another process.
local registry = {}
-- Set of our class tables. A class is also the metatable of its instances,
-- so `isClass[getmetatable(v)]` is how an instance is recognised.
local isClass = setmetatable({}, { __mode = "k" })
-- Names whose class is built in; define() may not replace those.
local builtin = {}

---Describes a value for argument error messages: `string "5s"`, `number 3`, `nil`.
local function describe(v)
  local t = type(v)
  if t == "string" then return str_format("string %q", v) end
  if t == "number" or t == "boolean" then return t .. " " .. tostring(v) end
  return t
end

local function now_ms()
  return os_time() * 1000
end

local function shallow_copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- Details given by callers may be anything; a non-table is kept under
-- `value` rather than thrown away, since it is usually the only clue.
local function details_of(d)
  if d == nil then return {} end
  if type(d) == "table" then return shallow_copy(d) end
  return { value = d }
end

local function is_instance(v)
  return type(v) == "table" and isClass[getmetatable(v)] == true
end

local function build(cls, message, details, cause)
  if message == nil then message = cls.defaultMessage or cls.name end
  if type(message) ~= "string" then message = tostring(message) end
  return setmetatable({
    name = cls.name,
    code = cls.code,
    message = message,
    category = cls.category,
    severity = cls.severity,
    retryable = cls.retryable,
    details = details or {},
    cause = cause,
    timestamp = now_ms(),
  }, cls)
end

-- One link of a cause chain. Errors from elsewhere may be plain tables, so
-- this reads fields instead of relying on their __tostring.
local function format_one(e)
  if type(e) == "table" and type(e.name) == "string" and e.message ~= nil then
    local code = e.code ~= nil and (" [" .. tostring(e.code) .. "]") or ""
    return e.name .. code .. ": " .. tostring(e.message)
  end
  return tostring(e)
end

-- Iterative with a seen-set: a cause cycle (someone set a.cause = b,
-- b.cause = a) must not turn tostring into a stack overflow.
local function error_tostring(e)
  local parts = { format_one(e) }
  local seen = { [e] = true }
  local c = rawget(e, "cause")
  while c ~= nil and not seen[c] do
    parts[#parts + 1] = "caused by: " .. format_one(c)
    if type(c) ~= "table" then break end
    seen[c] = true
    c = c.cause
  end
  return concat(parts, "\n")
end

local class_mt_tostring = function(cls) return "error class " .. cls.name end
local class_call = function(cls, ...) return cls.new(...) end

-- Creates and registers a class. `spec` is already validated; `ctor` takes
-- the class and the constructor's arguments.
local function new_class(spec, ctor)
  local parent = spec.parent
  local cls = {
    name = spec.name,
    code = spec.code,
    category = spec.category,
    severity = spec.severity,
    retryable = spec.retryable,
    parent = parent,
    defaultMessage = spec.message,
  }
  -- The class doubles as the instance metatable. Metamethods are looked up
  -- raw, so each class needs its own __tostring.
  cls.__index = cls
  cls.__tostring = error_tostring
  cls.new = function(...) return ctor(cls, ...) end
  setmetatable(cls, { __index = parent, __call = class_call, __tostring = class_mt_tostring })
  isClass[cls] = true
  registry[cls.name] = cls
  return cls
end

local function generic_ctor(cls, message, details)
  return build(cls, message, details_of(details))
end

---------------------------------------------------------------------------
-- Class membership
---------------------------------------------------------------------------

-- Something that went through JSON but whose class is unknown here (defined
-- only in another process) still reads as an am2z error: it has the three
-- identifying string fields every serialized error has.
local function looks_like_error(t)
  return type(t.name) == "string" and type(t.code) == "string" and type(t.message) == "string"
end

---True when `err` is an instance of `Class` or of one of its subclasses.
---Works on errors that lost their metatable in a JSON round trip. Never
---raises for odd `err` values (nil, strings, numbers): it returns false.
---@param err any
---@param Class am2z.ErrorClass
---@return boolean
function errors.is(err, Class)
  if not isClass[Class] then
    error("errors.is: expected an error class as argument 2, got " .. describe(Class), 2)
  end
  if type(err) ~= "table" or isClass[err] then return false end
  local cls = isClass[getmetatable(err)] and getmetatable(err) or nil
  -- The name wins over the metatable: an unknown error deserialized in this
  -- process before its class was defined carries the base metatable but its
  -- real name.
  local byName = registry[err.name]
  if byName then cls = byName end
  if cls == nil then
    if looks_like_error(err) then cls = registry.AM2ZError else return false end
  end
  -- Compare names, not identities: a module reloaded by --watch defines its
  -- classes again, and old instances must still match the new class.
  local target = Class.name
  while cls do
    if cls == Class or cls.name == target then return true end
    cls = cls.parent
  end
  return false
end

---------------------------------------------------------------------------
-- Serialization
---------------------------------------------------------------------------

local serialize -- forward: details may hold errors, serialized as such

-- Copies a value keeping only what cjson can encode. Tables become either a
-- dense array (keys 1..n) or an object with string keys, because cjson
-- refuses sparse arrays and mixed tables confuse decoders elsewhere.
local function json_safe(v, seen)
  local t = type(v)
  if t == "string" or t == "boolean" then return v end
  if t == "number" then
    if v ~= v or v == math_huge or v == -math_huge then return tostring(v) end
    return v
  end
  if t == "table" then
    if seen[v] then return nil end
    if is_instance(v) then return serialize(v, seen) end
    seen[v] = true
    local n, count, isArray = #v, 0, true
    for k in pairs(v) do
      count = count + 1
      if type(k) ~= "number" or k < 1 or k > n or k ~= math_floor(k) then isArray = false end
    end
    isArray = isArray and count == n
    local out = {}
    if isArray then
      local j = 0
      for i = 1, n do
        local c = json_safe(v[i], seen)
        if c ~= nil then j = j + 1; out[j] = c end
      end
    else
      for k, val in pairs(v) do
        local tk = type(k)
        if tk == "string" or tk == "number" or tk == "boolean" then
          local c = json_safe(val, seen)
          if c ~= nil then out[tostring(k)] = c end
        end
      end
    end
    seen[v] = nil
    return out
  end
  if t == "userdata" then
    -- cjson.null is a NULL lightuserdata; it is JSON (null), so keep it.
    local s = tostring(v)
    if s == "userdata: NULL" then return v end
    return s
  end
  if t == "nil" then return nil end
  -- functions, threads, cdata: only their printed form survives JSON
  return tostring(v)
end

local function severity_or(s, fallback)
  if SEVERITIES[s] then return s end
  return fallback
end

local function to_plain(err, seen, withTimestamp)
  seen[err] = true
  local out = {
    name = tostring(err.name or "Error"),
    code = tostring(err.code or "ERROR"),
    message = tostring(err.message or ""),
    category = tostring(err.category or "unknown"),
    severity = severity_or(err.severity, "medium"),
    retryable = err.retryable == true,
    details = type(err.details) == "table" and json_safe(err.details, seen) or {},
  }
  if withTimestamp then
    out.timestamp = type(err.timestamp) == "number" and err.timestamp or now_ms()
  end
  local c = err.cause
  if c ~= nil and not seen[c] then
    out.cause = to_plain(errors.from(c), seen, withTimestamp)
  end
  seen[err] = nil
  return out
end

-- `seen` is shared with json_safe so an error nested in its own details
-- (or in a cause's) is not serialized forever.
serialize = function(err, seen)
  return to_plain(errors.from(err), seen or {}, true)
end

---A plain, JSON-encodable table for `err` (any value is accepted and first
---converted with `errors.from`). The cause chain is serialized recursively.
---@param err any
---@return table
function errors.serialize(err)
  return serialize(err)
end

local function deserialize(t, depth)
  if is_instance(t) then return t end
  if type(t) ~= "table" then return errors.from(t) end
  local cls = registry[t.name]
  local e = build(cls or registry.AM2ZError, t.message)
  if not cls then
    -- A class this process does not know: keep its identity as sent.
    if type(t.name) == "string" then e.name = t.name end
  end
  if type(t.code) == "string" then e.code = t.code end
  if type(t.category) == "string" then e.category = t.category end
  if type(t.retryable) == "boolean" then e.retryable = t.retryable end
  e.severity = severity_or(t.severity, e.severity)
  if type(t.details) == "table" then e.details = json_safe(t.details, {}) end
  if type(t.timestamp) == "number" then e.timestamp = t.timestamp end
  -- depth bound instead of a seen-set: input came from JSON, so a cycle is
  -- impossible unless someone built one by hand.
  local c = t.cause
  if (type(c) == "table" or type(c) == "string") and depth < 100 then
    e.cause = deserialize(c, depth + 1)
  end
  return e
end

---Rebuilds an error instance from a serialized (or JSON-decoded) table: the
---registered class for `t.name`, or the base class keeping the given name,
---code, category and retryable flag when the name is unknown here.
---@param t table
---@return am2z.Error
function errors.deserialize(t)
  return deserialize(t, 0)
end

---Turns any value into an am2z error instance. Instances are returned as
---they are; serialized errors are deserialized; anything else becomes the
---generic `Error`.
---@param value any
---@return am2z.Error
function errors.from(value)
  if type(value) == "table" then
    if is_instance(value) then return value end
    if isClass[value] then return errors.Error(tostring(value)) end
    if registry[value.name] or looks_like_error(value) then return deserialize(value, 0) end
    if value.message ~= nil then
      local e = errors.Error(value.message)
      if type(value.code) == "string" then e.code = value.code end
      return e
    end
  elseif type(value) == "string" then
    return errors.Error(value)
  end
  return errors.Error(tostring(value))
end

---------------------------------------------------------------------------
-- Classes
---------------------------------------------------------------------------

local AM2ZError = new_class({
  name = "AM2ZError", code = "AM2Z_ERROR", category = "unknown",
  severity = "medium", retryable = false, message = "Unknown error",
}, generic_ctor)

---Instance method: `err:is(Class)`.
---@param self am2z.Error
---@param Class am2z.ErrorClass
---@return boolean
function AM2ZError.is(self, Class)
  return errors.is(self, Class)
end

---Instance method: sets the cause (converted with `errors.from`) and
---returns the error, for `Failure(NetworkError(msg):withCause(raw))`.
---@param self am2z.Error
---@param cause any
---@return am2z.Error
function AM2ZError.withCause(self, cause)
  if cause == nil then self.cause = nil else self.cause = errors.from(cause) end
  return self
end

local function builtin_class(spec, ctor)
  spec.parent = spec.parent or AM2ZError
  local cls = new_class(spec, ctor or generic_ctor)
  builtin[spec.name] = true
  return cls
end

local Error = builtin_class({
  name = "Error", code = "ERROR", category = "unknown",
  severity = "medium", retryable = false, message = "Error",
}, function(cls, message) return build(cls, message) end)

local function json_scalar(v)
  local t = type(v)
  if t == "string" or t == "boolean" then return v end
  if t == "number" then
    if v ~= v or v == math_huge or v == -math_huge then return tostring(v) end
    return v
  end
  if t == "nil" then return nil end
  return t
end

local ValidationError = builtin_class({
  name = "ValidationError", code = "VALIDATION_FAILED", category = "validation",
  severity = "low", retryable = false,
}, function(cls, field, value, message)
  field = field == nil and "unknown" or tostring(field)
  -- The value is echoed for diagnosis, but a table or function would not
  -- survive JSON; its type name is what a reader can still use.
  return build(cls, message or ("Validation failed for field '" .. field .. "'"),
    { field = field, value = json_scalar(value) })
end)

local ProcessorNotFoundError = builtin_class({
  name = "ProcessorNotFoundError", code = "PROCESSOR_NOT_FOUND", category = "execution",
  severity = "high", retryable = false,
}, function(cls, name, availableNames)
  name = tostring(name)
  local list = {}
  if type(availableNames) == "table" then
    for i = 1, #availableNames do list[i] = tostring(availableNames[i]) end
  end
  local shown = #list > 0 and concat(list, ", ") or "none"
  return build(cls, "Processor '" .. name .. "' not found. Available processors: " .. shown,
    { processorName = name, availableProcessors = list })
end)

local ProcessorExecutionError = builtin_class({
  name = "ProcessorExecutionError", code = "PROCESSOR_EXECUTION_FAILED", category = "execution",
  severity = "high", retryable = true,
}, function(cls, processorName, executionId, cause, details)
  local c = cause ~= nil and errors.from(cause) or nil
  local message
  if c and type(c.message) == "string" and c.message ~= "" then
    message = c.message
  else
    message = "Processor '" .. tostring(processorName) .. "' execution failed"
  end
  local d = details_of(details)
  d.processorName = processorName
  d.executionId = executionId
  return build(cls, message, d, c)
end)

local CallDepthExceededError = builtin_class({
  name = "CallDepthExceededError", code = "CALL_DEPTH_EXCEEDED", category = "execution",
  severity = "high", retryable = false,
}, function(cls, message, maxDepth, currentDepth)
  return build(cls, message or ("Maximum call depth " .. tostring(maxDepth) .. " exceeded (depth "
    .. tostring(currentDepth) .. ")"), { maxDepth = maxDepth, currentDepth = currentDepth })
end)

local TimeoutError = builtin_class({
  name = "TimeoutError", code = "OPERATION_TIMEOUT", category = "timeout",
  severity = "medium", retryable = true,
}, function(cls, message, timeoutMs)
  return build(cls, message or ("Operation timed out after " .. tostring(timeoutMs) .. "ms"),
    { timeoutMs = timeoutMs })
end)

local CancelledError = builtin_class({
  name = "CancelledError", code = "OPERATION_CANCELLED", category = "execution",
  severity = "low", retryable = false,
}, function(cls, message, reason)
  if reason ~= nil and type(reason) ~= "string" then
    reason = type(reason) == "table" and reason.message ~= nil and tostring(reason.message) or tostring(reason)
  end
  return build(cls, message or "Operation was cancelled", { reason = reason })
end)

local ResourceError = builtin_class({
  name = "ResourceError", code = "RESOURCE_EXHAUSTED", category = "resource",
  severity = "high", retryable = true,
}, function(cls, resource, message)
  resource = resource == nil and "unknown" or tostring(resource)
  return build(cls, message or ("Resource exhausted: " .. resource), { resource = resource })
end)

local NetworkError = builtin_class({
  name = "NetworkError", code = "NETWORK_ERROR", category = "network",
  severity = "medium", retryable = true, message = "Network error",
}, generic_ctor)

local ConfigurationError = builtin_class({
  name = "ConfigurationError", code = "INVALID_CONFIGURATION", category = "configuration",
  severity = "critical", retryable = false,
}, function(cls, key, message)
  key = key == nil and "unknown" or tostring(key)
  return build(cls, message or ("Invalid configuration for '" .. key .. "'"), { key = key })
end)

local BusinessError = builtin_class({
  name = "BusinessError", code = "BUSINESS_ERROR", category = "business",
  severity = "medium", retryable = false, message = "Business rule violated",
}, function(cls, code, message, severity)
  -- A misspelt severity is a literal in user code: say so now rather than
  -- report the error at the wrong level forever.
  if severity ~= nil and not SEVERITIES[severity] then
    error("BusinessError: expected severity low|medium|high|critical, got " .. describe(severity), 2)
  end
  local e = build(cls, message)
  if code ~= nil then e.code = tostring(code) end
  e.severity = severity or cls.severity
  return e
end)

errors.AM2ZError = AM2ZError
errors.Error = Error
errors.ValidationError = ValidationError
errors.ProcessorNotFoundError = ProcessorNotFoundError
errors.ProcessorExecutionError = ProcessorExecutionError
errors.CallDepthExceededError = CallDepthExceededError
errors.TimeoutError = TimeoutError
errors.CancelledError = CancelledError
errors.ResourceError = ResourceError
errors.NetworkError = NetworkError
errors.ConfigurationError = ConfigurationError
errors.BusinessError = BusinessError

---------------------------------------------------------------------------
-- User-defined classes
---------------------------------------------------------------------------

---@class am2z.ErrorDefinition
---@field name string class name, unique; also the `name` of its instances
---@field code? string default: the name in UPPER_SNAKE_CASE
---@field category? string default: the parent's
---@field retryable? boolean default: the parent's
---@field severity? am2z.Severity default: the parent's
---@field parent? am2z.ErrorClass default: AM2ZError
---@field message? string default message when the constructor gets none

local function upper_snake(name)
  local s = str_gsub(name, "(%l)(%u)", "%1_%2")
  s = str_gsub(s, "[^%w]+", "_")
  return str_upper(s)
end

---Defines a new error class with constructor `(message, details)`. Defining
---a name again replaces the earlier user class (a module reloaded by
---`--watch` runs its define calls again); built-in names are refused.
---@param def am2z.ErrorDefinition
---@return am2z.ErrorClass
function errors.define(def)
  if type(def) ~= "table" then
    error("errors.define: expected a table { name = ..., code = ... }, got " .. describe(def), 2)
  end
  local name = def.name
  if type(name) ~= "string" or name == "" then
    error("errors.define: expected a non-empty string name, got " .. describe(name), 2)
  end
  if builtin[name] then
    error("errors.define: name '" .. name .. "' belongs to a built-in error class", 2)
  end
  local parent = def.parent
  if parent == nil then parent = AM2ZError end
  if not isClass[parent] then
    error("errors.define: expected parent to be an error class, got " .. describe(parent), 2)
  end
  local code = def.code
  if code ~= nil and (type(code) ~= "string" or code == "") then
    error("errors.define: expected code to be a non-empty string, got " .. describe(code), 2)
  end
  local category = def.category
  if category ~= nil and (type(category) ~= "string" or category == "") then
    error("errors.define: expected category to be a non-empty string, got " .. describe(category), 2)
  end
  if def.retryable ~= nil and type(def.retryable) ~= "boolean" then
    error("errors.define: expected retryable to be a boolean, got " .. describe(def.retryable), 2)
  end
  if def.severity ~= nil and not SEVERITIES[def.severity] then
    error("errors.define: expected severity low|medium|high|critical, got " .. describe(def.severity), 2)
  end
  if def.message ~= nil and type(def.message) ~= "string" then
    error("errors.define: expected message to be a string, got " .. describe(def.message), 2)
  end
  local retryable = def.retryable
  if retryable == nil then retryable = parent.retryable end
  return new_class({
    name = name,
    code = code or upper_snake(name),
    category = category or parent.category,
    severity = def.severity or parent.severity,
    retryable = retryable,
    parent = parent,
    message = def.message or name,
  }, generic_ctor)
end

---The registered class for a name, or nil.
---@param name string
---@return am2z.ErrorClass|nil
function errors.getClass(name)
  return registry[name]
end

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

---True only when the error says it may be retried (`retryable == true`).
---@param err any
---@return boolean
function errors.isRetryableError(err)
  return type(err) == "table" and err.retryable == true
end

---A plain table describing the error and its cause chain, for logs.
---Unlike `serialize` it carries no timestamp.
---@param err any
---@return table
function errors.extractErrorDetails(err)
  return to_plain(errors.from(err), {}, false)
end

---Makes `err` a processor failure: am2z errors (other than the generic
---`Error` wrapper) are kept as they are; anything else becomes a
---ProcessorExecutionError whose cause is `err`.
---@param err any
---@param processorName string
---@param executionId string|nil
---@return am2z.Error
function errors.wrapAsProcessorError(err, processorName, executionId)
  if type(err) == "table" and err.name ~= "Error" and errors.is(err, AM2ZError) then
    -- a JSON-decoded error becomes an instance; an instance stays itself
    return errors.from(err)
  end
  return ProcessorExecutionError(processorName, executionId, err)
end

---The last error of the cause chain (`err` itself when it has no cause).
---@param err any
---@return any
function errors.getRootCause(err)
  local seen = {}
  while type(err) == "table" and err.cause ~= nil and not seen[err] do
    seen[err] = true
    err = err.cause
  end
  return err
end

local NETWORK_CODES = { ECONNREFUSED = true, ECONNRESET = true, ENETWORK = true, EIO = true, ENOTCONN = true }

---Maps an error reported by the C core (errno-style name) to an error class.
---The core's code is kept in `details.coreCode`.
---@param code string e.g. "ETIMEDOUT"
---@param message string|nil
---@param details table|nil
---@return am2z.Error
function errors.fromCore(code, message, details)
  local d = type(details) == "table" and details or {}
  local e
  if code == "ETIMEDOUT" then
    e = TimeoutError(message, d.timeoutMs)
  elseif code == "ECANCELED" then
    e = CancelledError(message, d.reason)
  elseif code == "ENOMEM" then
    e = ResourceError("memory", message)
  elseif NETWORK_CODES[code] then
    e = NetworkError(message, d)
  elseif code == "EDEPTH" then
    e = CallDepthExceededError(message, d.maxDepth, d.currentDepth)
  elseif code == "EINVAL" then
    e = ValidationError(d.field or "argument", nil, message)
  elseif code == "ENOTFOUND" then
    e = ProcessorNotFoundError(d.processorName, d.availableProcessors)
  else
    e = AM2ZError(message, d)
    if code ~= nil then e.code = tostring(code) end
    return e
  end
  e.details.coreCode = code
  return e
end

return errors
