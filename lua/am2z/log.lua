--[[
am2z.log: structured, levelled loggers for the engine and user processors.

createLogger{ level, format, source, context, sink, color } returns a logger
whose debug/info/warn/error(msg, fields) write one line per record to
io.stderr (so a program's stdout stays clean) or to a caller-given sink, as
"pretty" text for people or "json" lines for machines. Loggers are immutable:
withContext/withSource return new loggers.

This module must not: raise while logging (bad field values are stringified,
not fatal; only constructor misuse raises), do any work for a record below the
logger's level (those methods are a shared no-op), write to stdout, change
cjson's global configuration (it uses a private cjson instance), or depend on
the rest of am2z.
]]

local type, pairs, tostring, tonumber, pcall, error, rawequal = type, pairs, tostring, tonumber, pcall, error, rawequal
local getmetatable, next = getmetatable, next
local format, find, gsub, lower, sub = string.format, string.find, string.gsub, string.lower, string.sub
local concat, sort = table.concat, table.sort
local os_date, os_time, os_getenv = os.date, os.time, os.getenv
local io = io
local floor = math.floor

local cjson = require("cjson")

---@class am2z.log
local M = {}

-- Exposed copy; the module keeps its own so a caller mutating log.levels
-- cannot change filtering.
local LEVELS = { debug = 10, info = 20, warn = 30, error = 40, silent = 100 }
M.levels = { debug = 10, info = 20, warn = 30, error = 40, silent = 100 }

local LEVEL_LIST = "debug, info, warn, error, silent"
local FORMATS = { pretty = true, json = true, silent = true }
local FORMAT_LIST = "pretty, json, silent"
local METHODS = { "debug", "info", "warn", "error" }

local LABELS = { debug = "DEBUG", info = "INFO ", warn = "WARN ", error = "ERROR" }
local COLORS = { debug = "\27[90m", info = "\27[32m", warn = "\27[33m", error = "\27[31m" }
local RESET = "\27[0m"

-- Keys the json format owns; a user field of the same name is kept as "_<key>"
-- rather than silently overwriting (or being overwritten by) the record's own.
local RESERVED = { ts = true, level = true, source = true, msg = true }

-- Private instance: sparse arrays become objects and NaN/inf become null
-- instead of raising, and the engine's own cjson settings stay untouched.
local json = cjson.new()
json.encode_sparse_array(true)
pcall(json.encode_invalid_numbers, "null")

local NULL = cjson.null

---------------------------------------------------------------------------
-- Hooks replaceable by tests
---------------------------------------------------------------------------

--- Reads an environment variable. For tests: replace it to simulate
--- AM2Z_LOG_LEVEL / AM2Z_LOG_FORMAT / NO_COLOR without touching the process
--- environment. Read once per createLogger call, never per record.
---@type fun(name: string): string|nil
M._getenv = os_getenv

local ffi_ok, ffi = pcall(require, "ffi")
local clockNow

if ffi_ok then
  -- Each declaration in its own pcall: another module may already have
  -- declared the same struct or function, and a redefinition raises.
  pcall(ffi.cdef, "struct timeval { long tv_sec; long tv_usec; };")
  pcall(ffi.cdef, "int gettimeofday(struct timeval *tv, void *tz);")
  pcall(ffi.cdef, "int isatty(int fd);")
  local ok, tv = pcall(ffi.new, "struct timeval")
  if ok and pcall(function() return ffi.C.gettimeofday(tv, nil) end) then
    local C = ffi.C
    clockNow = function()
      C.gettimeofday(tv, nil)
      return tonumber(tv.tv_sec), floor(tonumber(tv.tv_usec) / 1000)
    end
  end
end

--- Current wall-clock time as whole seconds since the epoch and milliseconds.
--- For tests: replace it to get fixed timestamps.
---@type fun(): integer, integer
M._now = clockNow or function() return os_time(), 0 end

-- fd 2 rather than fileno(stderr): it needs no FILE typedef, which other
-- modules may declare differently; io.stderr is always fd 2 here.
local stderrTTY
local function stderrIsTTY()
  if stderrTTY == nil then
    stderrTTY = false
    if ffi_ok then
      local ok, r = pcall(function() return ffi.C.isatty(2) end)
      stderrTTY = ok and r == 1
    end
  end
  return stderrTTY
end

---------------------------------------------------------------------------
-- Formatting (only reached for records at or above the level)
---------------------------------------------------------------------------

-- os.date is the costly part of a line; a logger writes many lines per second.
local isoSec, isoText, clockSec, clockText

local function isoStamp(sec, ms)
  if sec ~= isoSec then isoSec, isoText = sec, os_date("!%Y-%m-%dT%H:%M:%S", sec) end
  return format("%s.%03dZ", isoText, ms)
end

local function clockStamp(sec, ms)
  if sec ~= clockSec then clockSec, clockText = sec, os_date("%H:%M:%S", sec) end
  return format("%s.%03d", clockText, ms)
end

local function keyString(k)
  if type(k) == "string" then return k end
  return tostring(k)
end

-- Rebuilds a value cjson refused: functions, userdata, cdata and cycles
-- become strings, odd keys become strings. Depth-limited for the same reason.
local function sanitize(v, seen, depth)
  local tv = type(v)
  if tv == "string" or tv == "number" or tv == "boolean" or tv == "nil" or rawequal(v, NULL) then
    return v
  end
  if tv ~= "table" then return tostring(v) end
  if seen[v] then return "[cycle]" end
  if depth > 32 then return "[too deep]" end
  seen[v] = true
  local out, isArray = {}, true
  for k in pairs(v) do
    if type(k) ~= "number" then isArray = false; break end
  end
  for k, val in pairs(v) do
    out[isArray and k or keyString(k)] = sanitize(val, seen, depth + 1)
  end
  seen[v] = nil
  return out
end

local function encode(v)
  local ok, s = pcall(json.encode, v)
  if ok then return s end
  ok, s = pcall(json.encode, sanitize(v, {}, 0))
  if ok then return s end
  return json.encode(tostring(v))
end

-- Merge order: context, then fields (a field overrides a context key).
local function merged(context, fields)
  local rec = {}
  for k, v in pairs(context) do rec[keyString(k)] = v end
  if fields ~= nil then
    if type(fields) == "table" then
      for k, v in pairs(fields) do rec[keyString(k)] = v end
    else
      rec.fields = fields
    end
  end
  return rec
end

local function jsonLine(cfg, level, msg, fields)
  local sec, ms = M._now()
  local rec = merged(cfg.context, fields)
  for key in pairs(RESERVED) do
    if rec[key] ~= nil then
      rec["_" .. key], rec[key] = rec[key], nil
    end
  end
  -- The fixed keys are written by hand so they come first, in a stable order,
  -- which cjson's hash-order output would not give.
  local head = '{"ts":"' .. isoStamp(sec, ms) .. '","level":"' .. level
    .. '","source":' .. json.encode(cfg.source) .. ',"msg":' .. json.encode(msg)
  if next(rec) == nil then return head .. "}" end
  return head .. "," .. sub(encode(rec), 2)
end

local function prettyValue(v)
  local tv = type(v)
  local s
  if tv == "string" then
    s = v
  elseif tv == "table" then
    local mt = getmetatable(v)
    if type(mt) == "table" and mt.__tostring then s = tostring(v) else return encode(v) end
  else
    return tostring(v)
  end
  if s == "" or find(s, '[%s"=%c]') then
    return '"' .. gsub(s, '[%c"\\]', function(c)
      if c == "\n" then return "\\n" elseif c == "\t" then return "\\t"
      elseif c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
      return format("\\%03d", c:byte())
    end) .. '"'
  end
  return s
end

local function prettyLine(cfg, level, msg, fields)
  local sec, ms = M._now()
  local label = LABELS[level]
  if cfg.color then label = COLORS[level] .. label .. RESET end
  local parts = { clockStamp(sec, ms), " ", label, " [", cfg.source, "] ", msg }
  local rec = merged(cfg.context, fields)
  if next(rec) ~= nil then
    local keys = {}
    for k in pairs(rec) do keys[#keys + 1] = k end
    sort(keys)
    for i = 1, #keys do
      local k = keys[i]
      parts[#parts + 1] = " " .. k .. "=" .. prettyValue(rec[k])
    end
  end
  return concat(parts)
end

local function write(line)
  io.stderr:write(line, "\n")
end

---------------------------------------------------------------------------
-- Loggers
---------------------------------------------------------------------------

---@class am2z.Logger
---@field level string      effective level name (read-only)
---@field format string     "pretty"|"json"|"silent" (read-only)
---@field source string     (read-only)
---@field context table     (read-only; a private copy)
---@field debug fun(msg: any, fields?: table)
---@field info fun(msg: any, fields?: table)
---@field warn fun(msg: any, fields?: table)
---@field error fun(msg: any, fields?: table)
---@field withContext fun(fields: table): am2z.Logger
---@field withSource fun(name: string): am2z.Logger
---@field isEnabled fun(level: string): boolean
-- Every method also works with the colon: logger:info(msg, fields).

local function noop() end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local build

local function levelMethod(logger, cfg, level)
  if cfg.format == "silent" or LEVELS[level] < cfg.threshold then
    return noop
  end
  local line = cfg.format == "json" and jsonLine or prettyLine
  local out = cfg.sink or write
  -- Each logger owns its methods so the dot form (logger.info("m")) works;
  -- the colon form is recognised by the first argument being the logger.
  return function(a, b, c)
    local msg, fields
    if rawequal(a, logger) then msg, fields = b, c else msg, fields = a, b end
    if type(msg) ~= "string" then msg = tostring(msg) end
    out(line(cfg, level, msg, fields))
  end
end

build = function(cfg)
  local logger = {
    level = cfg.levelName, format = cfg.format, source = cfg.source, context = copy(cfg.context),
  }
  for i = 1, #METHODS do
    local m = METHODS[i]
    logger[m] = levelMethod(logger, cfg, m)
  end

  --- New logger with `fields` merged over this logger's context.
  ---@param a am2z.Logger|table  the logger (colon form) or the fields
  ---@param b? table             the fields (colon form)
  ---@return am2z.Logger
  function logger.withContext(a, b)
    local fields = a
    if rawequal(a, logger) then fields = b end
    if type(fields) ~= "table" then
      error("withContext: expected fields to be a table, got " .. type(fields), 2)
    end
    local child = copy(cfg)
    child.context = copy(cfg.context)
    for k, v in pairs(fields) do child.context[k] = v end
    return build(child)
  end

  --- New logger identical to this one but for its source.
  ---@param a am2z.Logger|string  the logger (colon form) or the name
  ---@param b? string             the name (colon form)
  ---@return am2z.Logger
  function logger.withSource(a, b)
    local name = a
    if rawequal(a, logger) then name = b end
    if type(name) ~= "string" then
      error("withSource: expected name to be a string, got " .. type(name), 2)
    end
    local child = copy(cfg)
    child.source = name
    return build(child)
  end

  --- True when a record at `level` would be written: lets callers skip
  --- building expensive fields.
  ---@param a am2z.Logger|string  the logger (colon form) or the level name
  ---@param b? string             the level name (colon form)
  ---@return boolean
  function logger.isEnabled(a, b)
    local level = a
    if rawequal(a, logger) then level = b end
    local n = LEVELS[level]
    return cfg.format ~= "silent" and n ~= nil and n >= cfg.threshold and n < LEVELS.silent
  end

  return logger
end

local function envChoice(name, allowed)
  local v = M._getenv(name)
  if v == nil then return nil end
  -- Shell users write INFO or " json "; accept those, report the raw value.
  local norm = lower((gsub(v, "^%s*(.-)%s*$", "%1")))
  if norm == "" then return nil end
  if not allowed[norm] then return nil, v end
  return norm
end

---@class am2z.LoggerOptions
---@field level? "debug"|"info"|"warn"|"error"|"silent"  default: $AM2Z_LOG_LEVEL or "info"
---@field format? "pretty"|"json"|"silent"                default: $AM2Z_LOG_FORMAT or "pretty"
---@field source? string                                  default: "app"
---@field context? table                                  fields added to every record
---@field sink? fun(line: string)                         replaces io.stderr; gets one line, no trailing newline
---@field color? boolean                                  force ANSI colours on/off (pretty); default: stderr is a TTY and NO_COLOR is unset

--- Create a logger. Options given win over the environment
--- (AM2Z_LOG_LEVEL, AM2Z_LOG_FORMAT); invalid options or environment values raise.
---@param opts? am2z.LoggerOptions
---@return am2z.Logger
function M.createLogger(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then
    error("createLogger: expected options to be a table, got " .. type(opts), 2)
  end

  local level = opts.level
  if level == nil then
    local env, bad = envChoice("AM2Z_LOG_LEVEL", LEVELS)
    if bad then
      error(format("createLogger: expected AM2Z_LOG_LEVEL to be one of %s, got %q", LEVEL_LIST, bad), 2)
    end
    level = env or "info"
  elseif type(level) ~= "string" or not LEVELS[level] then
    local got = type(level) == "string" and format("%q", level) or type(level)
    error(format("createLogger: expected level to be one of %s, got %s", LEVEL_LIST, got), 2)
  end

  local fmt = opts.format
  if fmt == nil then
    local env, bad = envChoice("AM2Z_LOG_FORMAT", FORMATS)
    if bad then
      error(format("createLogger: expected AM2Z_LOG_FORMAT to be one of %s, got %q", FORMAT_LIST, bad), 2)
    end
    fmt = env or "pretty"
  elseif type(fmt) ~= "string" or not FORMATS[fmt] then
    local got = type(fmt) == "string" and format("%q", fmt) or type(fmt)
    error(format("createLogger: expected format to be one of %s, got %s", FORMAT_LIST, got), 2)
  end

  local source = opts.source
  if source == nil then source = "app" end
  if type(source) ~= "string" then
    error("createLogger: expected source to be a string, got " .. type(source), 2)
  end

  local context = opts.context
  if context == nil then context = {} end
  if type(context) ~= "table" then
    error("createLogger: expected context to be a table, got " .. type(context), 2)
  end

  local sink = opts.sink
  if sink ~= nil and type(sink) ~= "function" then
    error("createLogger: expected sink to be a function, got " .. type(sink), 2)
  end

  local color = opts.color
  if color ~= nil and type(color) ~= "boolean" then
    error("createLogger: expected color to be a boolean, got " .. type(color), 2)
  end
  if color == nil then
    local noColor = M._getenv("NO_COLOR")
    color = fmt == "pretty" and sink == nil and (noColor == nil or noColor == "") and stderrIsTTY()
  end

  return build({
    levelName = level, threshold = LEVELS[level], format = fmt, source = source,
    context = copy(context), sink = sink, color = color,
  })
end

--- A logger that discards everything (ignores the environment).
---@return am2z.Logger
function M.createSilentLogger()
  return build({
    levelName = "silent", threshold = LEVELS.silent, format = "silent", source = "app",
    context = {}, sink = nil, color = false,
  })
end

return M
