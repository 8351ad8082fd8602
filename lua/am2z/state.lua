--[[
am2z.state -- app-state helpers and the copy that gives every processor
boundary the semantics of a JSON round trip.

`copy(v)` returns a deep copy of a JSON-representable value, or nil plus a
message naming the path of the first value JSON cannot carry (functions,
userdata, cycles, sparse or mixed arrays, NaN/inf, non-string keys). A
callee therefore never shares a table with its caller, and a state that
could not cross Redis fails locally too.

Must not: talk to the engine, yield, or keep references to what it copies.
]]

local cjson = require("cjson")
local core = require("am2z.core")

local type, next, pairs, tostring, setmetatable = type, next, pairs, tostring, setmetatable
local huge = math.huge
local floor = math.floor
local format = string.format
local json_null = cjson.null

local ok_tnew, tnew = pcall(require, "table.new")
if not ok_tnew then tnew = function() return {} end end
local ok_nkeys, nkeys = pcall(require, "table.nkeys")
if not ok_nkeys then
  nkeys = function(t)
    local n = 0
    for _ in next, t do n = n + 1 end
    return n
  end
end

local M = {}

-- Deeper than this is treated as a probable cycle; the slow path then finds
-- and names the real cycle (keeping a `seen` set on every copy would cost an
-- allocation per step for a case that is almost always a bug).
local MAX_DEPTH = 100

local function key_path(k, sub)
  local head
  if type(k) == "number" then
    head = "[" .. tostring(k) .. "]"
  else
    head = tostring(k)
  end
  if sub == "" then return head end
  if sub:sub(1, 1) == "[" then return head .. sub end
  return head .. "." .. sub
end

local copy_value

-- Returns copy, or nil, path, what
local function copy_table(t, depth)
  if depth > MAX_DEPTH then
    return nil, "", "a cycle or nesting deeper than " .. MAX_DEPTH .. " levels"
  end
  local n = #t
  local total = nkeys(t)
  if total == 0 then
    return {}
  end
  if n > 0 and total == n then
    local out = tnew(n, 0)
    for i = 1, n do
      local v = t[i]
      if v == nil then
        return nil, "[" .. i .. "]", "a hole in an array (sparse arrays cannot be JSON)"
      end
      local tv = type(v)
      if tv == "table" then
        local c, p, w = copy_value(v, depth + 1)
        if c == nil then return nil, key_path(i, p), w end
        out[i] = c
      elseif tv == "string" or tv == "boolean" then
        out[i] = v
      else
        local c, p, w = copy_value(v, depth + 1)
        if c == nil then return nil, key_path(i, p), w end
        out[i] = c
      end
    end
    return out
  end
  local out = tnew(0, total)
  for k, v in next, t do
    if type(k) ~= "string" then
      if type(k) == "number" then
        return nil, key_path(k, ""),
          (k == floor(k) and k > 0) and "an array index mixed with string keys or a sparse array"
          or "a non-integer number key"
      end
      return nil, "[" .. tostring(k) .. "]", "a key of type " .. type(k)
    end
    local tv = type(v)
    if tv == "string" or tv == "boolean" then
      out[k] = v
    elseif tv == "number" then
      if v ~= v or v == huge or v == -huge then
        return nil, k, "the number " .. tostring(v)
      end
      out[k] = v
    else
      local c, p, w = copy_value(v, depth + 1)
      if c == nil then return nil, key_path(k, p), w end
      out[k] = c
    end
  end
  return out
end

copy_value = function(v, depth)
  local tv = type(v)
  if tv == "table" then
    return copy_table(v, depth)
  elseif tv == "string" or tv == "boolean" then
    return v
  elseif tv == "number" then
    if v ~= v or v == huge or v == -huge then
      return nil, "", "the number " .. tostring(v)
    end
    return v
  elseif v == json_null then
    return v
  end
  return nil, "", "a " .. tv
end

-- Validation without the copy: same rules, same messages, no allocation on
-- the success path. Used for outputs, which the runtime takes over as they
-- are (the body that produced them has returned).
local check_value
local function check_table(t, depth)
  if depth > MAX_DEPTH then
    return "", "a cycle or nesting deeper than " .. MAX_DEPTH .. " levels"
  end
  local n = #t
  local total = nkeys(t)
  if total == 0 then return nil end
  if n > 0 and total == n then
    for i = 1, n do
      local v = t[i]
      if v == nil then
        return "[" .. i .. "]", "a hole in an array (sparse arrays cannot be JSON)"
      end
      local tv = type(v)
      if tv ~= "string" and tv ~= "boolean" then
        local p, w = check_value(v, depth + 1)
        if p then return key_path(i, p), w end
      end
    end
    return nil
  end
  for k, v in next, t do
    if type(k) ~= "string" then
      if type(k) == "number" then
        return key_path(k, ""),
          (k == floor(k) and k > 0) and "an array index mixed with string keys or a sparse array"
          or "a non-integer number key"
      end
      return "[" .. tostring(k) .. "]", "a key of type " .. type(k)
    end
    local tv = type(v)
    if tv ~= "string" and tv ~= "boolean" then
      local p, w = check_value(v, depth + 1)
      if p then return key_path(k, p), w end
    end
  end
  return nil
end

check_value = function(v, depth)
  local tv = type(v)
  if tv == "table" then
    return check_table(v, depth)
  elseif tv == "string" or tv == "boolean" then
    return nil
  elseif tv == "number" then
    if v ~= v or v == huge or v == -huge then
      return "", "the number " .. tostring(v)
    end
    return nil
  elseif v == json_null then
    return nil
  end
  return "", "a " .. tv
end

local function find_cycle(v, seen, path)
  if type(v) ~= "table" then return nil end
  if seen[v] then return path end
  seen[v] = true
  for k, c in pairs(v) do
    local p = find_cycle(c, seen, path == "" and key_path(k, "") or (type(k) == "number"
      and (path .. "[" .. tostring(k) .. "]") or (path .. "." .. tostring(k))))
    if p then return p end
  end
  seen[v] = nil
  return nil
end

local function explain(v, path, what)
  if what and what:find("^a cycle") then
    local cp = find_cycle(v, {}, "")
    if cp then
      path, what = cp, "a cycle (this table contains itself)"
    end
  end
  local shown = (path == nil or path == "") and "state" or path
  return format("%s: cannot be represented in JSON (%s)", shown, what), shown
end

--- Deep copy with JSON semantics.
---@param v any
---@return any|nil copy
---@return string|nil message  "<path>: cannot be represented in JSON (<what>)"
---@return string|nil path
function M.copy(v)
  local c, path, what = copy_value(v, 0)
  if c ~= nil then return c end
  local msg, shown = explain(v, path, what)
  return nil, msg, shown
end

--- Checks that v could cross a JSON boundary, without copying it.
---@param v any
---@return boolean ok
---@return string|nil message
---@return string|nil path
function M.check(v)
  local path, what = check_value(v, 0)
  if path == nil then return true end
  local msg, shown = explain(v, path, what)
  return false, msg, shown
end

--- Deep copy without validation, for values already known to be JSON-clean.
---@param v any
function M.clone(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, c in next, v do
    if type(c) == "table" then out[k] = M.clone(c) else out[k] = c end
  end
  return out
end

--- ISO-8601 UTC timestamp with milliseconds.
---@return string
function M.isoNow()
  return core.iso_now()
end

--- A new app state: `extra` plus metadata { version = 1, sessionId, createdAt, lastUpdated }.
---@param sessionId string
---@param extra table|nil
---@return table
function M.createAppState(sessionId, extra)
  if type(sessionId) ~= "string" or sessionId == "" then
    error(format("createAppState: expected sessionId to be a non-empty string, got %s",
      type(sessionId) == "string" and '""' or type(sessionId)), 2)
  end
  if extra ~= nil and type(extra) ~= "table" then
    error("createAppState: expected extra to be a table or nil, got " .. type(extra), 2)
  end
  local s = {}
  if extra then
    for k, v in pairs(extra) do s[k] = v end
  end
  local now = core.iso_now()
  s.metadata = { version = 1, sessionId = sessionId, createdAt = now, lastUpdated = now }
  return s
end

--- A copy of `state` with metadata.version + 1 and a new lastUpdated.
---@param state table
---@return table
function M.updateStateMetadata(state)
  if type(state) ~= "table" then
    error("updateStateMetadata: expected a state table, got " .. type(state), 2)
  end
  local s = {}
  for k, v in pairs(state) do s[k] = v end
  local m = {}
  if type(state.metadata) == "table" then
    for k, v in pairs(state.metadata) do m[k] = v end
  end
  m.version = (tonumber(m.version) or 0) + 1
  m.lastUpdated = core.iso_now()
  s.metadata = m
  return s
end

-- The timestamp string is formatted once per millisecond: a runtime stamps
-- every step, and formatting dominated the bump.
local last_ms, last_iso = -1, nil
local iso_now = core.iso_now

-- In place, on a state the runtime owns: the per-step bump without a copy.
-- wall_ms is the current wall-clock time in ms (the caller has it already).
function M._bump(state, wall_ms)
  local m = state.metadata
  if type(m) == "table" then
    local v = m.version
    m.version = (type(v) == "number" and v or 0) + 1
    local ms = floor(wall_ms)
    if ms ~= last_ms then
      last_ms, last_iso = ms, iso_now(ms)
    end
    m.lastUpdated = last_iso
  end
end

--- Marks a non-empty array; raises ValidationError for an empty one.
---@param t table
---@return table
function M.createNonEmptyArray(t)
  local errors = require("am2z.errors")
  if type(t) ~= "table" or #t == 0 then
    error(errors.ValidationError("array", type(t) == "table" and "empty" or type(t),
      "createNonEmptyArray: expected an array with at least one element"), 2)
  end
  return t
end

--- Brands a state (kept in a JSON-safe field so it survives every boundary).
---@param state table
---@param brand string
---@return table
function M.brand(state, brand)
  if type(state) ~= "table" then
    error("brand: expected a state table, got " .. type(state), 2)
  end
  if type(brand) ~= "string" or brand == "" then
    error("brand: expected brand to be a non-empty string, got " .. type(brand), 2)
  end
  state.__brand = brand
  return state
end

---@param state any
---@param brand string
---@return boolean
function M.isBrandedState(state, brand)
  return type(state) == "table" and state.__brand == brand
end

-- ---------------------------------------------------------------- state managers

---@class MemoryStateManager
local MemoryStateManager = {}
MemoryStateManager.__index = MemoryStateManager

--- In-process state store with the StateManager interface.
---@return MemoryStateManager
function MemoryStateManager.new()
  return setmetatable({ _data = {} }, MemoryStateManager)
end

local function check_session(fname, id)
  if type(id) ~= "string" or id == "" then
    error(format("MemoryStateManager:%s: expected sessionId to be a non-empty string, got %s",
      fname, type(id)), 3)
  end
end

--- @return table|nil { state, version }
function MemoryStateManager:get(sessionId)
  check_session("get", sessionId)
  local e = self._data[sessionId]
  if not e then return nil end
  return { state = M.clone(e.state), version = e.version }
end

function MemoryStateManager:set(sessionId, state)
  check_session("set", sessionId)
  local c, err = M.copy(state)
  if c == nil then
    error(require("am2z.errors").ValidationError("state", nil, err), 2)
  end
  local e = self._data[sessionId]
  self._data[sessionId] = { state = c, version = (e and e.version or 0) + 1 }
  return self._data[sessionId].version
end

--- Optimistic update: fn(currentState) -> newState. In one process nothing
--- can interleave between read and write unless fn yields, so the version is
--- re-checked after fn and the update retried when it moved.
function MemoryStateManager:update(sessionId, fn)
  check_session("update", sessionId)
  if type(fn) ~= "function" then
    error("MemoryStateManager:update: expected fn to be a function, got " .. type(fn), 2)
  end
  for _ = 1, 10 do
    local e = self._data[sessionId]
    local version = e and e.version or 0
    local new = fn(e and M.clone(e.state) or nil)
    local now = self._data[sessionId]
    if (now and now.version or 0) == version then
      self:set(sessionId, new)
      return new
    end
  end
  error(require("am2z.errors").ResourceError("state:" .. sessionId,
    "update: too many concurrent modifications"), 2)
end

function MemoryStateManager:exists(sessionId)
  check_session("exists", sessionId)
  return self._data[sessionId] ~= nil
end

function MemoryStateManager:delete(sessionId)
  check_session("delete", sessionId)
  local had = self._data[sessionId] ~= nil
  self._data[sessionId] = nil
  return had
end

function MemoryStateManager:getVersion(sessionId)
  check_session("getVersion", sessionId)
  local e = self._data[sessionId]
  return e and e.version or nil
end

M.MemoryStateManager = MemoryStateManager

return M
