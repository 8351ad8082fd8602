--[[
am2z.redis_state -- RedisStateManager: session states kept in Redis, with
the StateManager interface of MemoryStateManager (API.md, "State").

One hash per session, `<prefix>:<sessionId>`: `state` (canonical JSON:
object keys sorted, so equal states are equal bytes), `version`, `hash`
(SHA-256 of `state`, OpenSSL through am2z.core) and `updatedAt`. Writes go
through one server-side script that compares the version (optimistic
compare-and-set) and remembers the last 1000 commit ids of the session, so
a commit replayed with the same execution id does not bump the version a
second time. A read whose hash does not match fails with
StateIntegrityError.

Must not: talk to Redis except through am2z.redis; hand out the stored
tables (every read is a fresh decode).
]]

local core = require("am2z.core")
local cjson = require("cjson")
local errors = require("am2z.errors")
local redis = require("am2z.redis")
local statem = require("am2z.state")

local type, pairs, ipairs, tostring, tonumber, error, setmetatable =
  type, pairs, ipairs, tostring, tonumber, error, setmetatable
local format, concat, sort = string.format, table.concat, table.sort
local encode = cjson.encode
local json_number = require("am2z.json").number

local M = {}

M.StateIntegrityError = errors.getClass("StateIntegrityError") or errors.define{
  name = "StateIntegrityError", code = "STATE_INTEGRITY_ERROR", category = "resource",
  retryable = false, severity = "high",
}

-- ------------------------------------------------------------------ canonical JSON

local canon

local function is_array(t)
  local n = #t
  if n == 0 then return false end
  local count = 0
  for _ in pairs(t) do count = count + 1 end
  return count == n
end

canon = function(v, out)
  local tv = type(v)
  if tv == "table" then
    if is_array(v) then
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = "," end
        canon(v[i], out)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = encode(k)
        out[#out + 1] = ":"
        local x = v[k]
        if x == nil then x = v[tonumber(k)] end
        canon(x, out)
      end
      out[#out + 1] = "}"
    end
  elseif type(v) == "number" then
    out[#out + 1] = json_number(v)   -- exact (cjson alone keeps 14 digits)
  else
    out[#out + 1] = encode(v)
  end
end

--- The canonical JSON of a state: object keys sorted, no whitespace.
function M.canonicalJSON(state)
  local out = {}
  canon(state, out)
  return concat(out)
end

--- SHA-256 (hex) of the canonical JSON of a state.
function M.stateHash(state)
  return core.sha256(M.canonicalJSON(state))
end

-- ------------------------------------------------------------------ scripts

-- KEYS: 1 session hash, 2 commit ids (sorted set)
-- ARGV: 1 state JSON, 2 its hash, 3 expected version ("": any), 4 commit id
--       ("": none), 5 now (ms)
-- Returns { 2, new version } written, { 1, version } commit already made,
-- { 0, current version } version conflict.
local SET = redis.script([[
if ARGV[4] ~= "" then
  local done = redis.call("ZSCORE", KEYS[2], ARGV[4])
  if done then return { 1, tonumber(done) } end
end
local cur = tonumber(redis.call("HGET", KEYS[1], "version")) or 0
if ARGV[3] ~= "" and tonumber(ARGV[3]) ~= cur then return { 0, cur } end
local nv = cur + 1
redis.call("HSET", KEYS[1], "state", ARGV[1], "version", nv, "hash", ARGV[2], "updatedAt", ARGV[5])
if ARGV[4] ~= "" then
  redis.call("ZADD", KEYS[2], nv, ARGV[4])
  redis.call("ZREMRANGEBYRANK", KEYS[2], 0, -1001)
end
return { 2, nv }
]])

-- ------------------------------------------------------------------ manager

---@class RedisStateManager
local RedisStateManager = {}
RedisStateManager.__index = RedisStateManager
M.RedisStateManager = RedisStateManager

local function describe(v)
  return require("am2z.processor").describe(v)
end

--- A state store in Redis.
---@param conn table|nil connection options (as am2z.redis.connect) or a connection from it
---@param prefix string|nil key prefix, default "am2z:state"
function RedisStateManager.new(conn, prefix)
  if conn ~= nil and type(conn) ~= "table" then
    error("RedisStateManager.new: expected connection options or a connection, got " .. describe(conn), 2)
  end
  if prefix ~= nil and (type(prefix) ~= "string" or prefix == "") then
    error("RedisStateManager.new: expected prefix to be a non-empty string, got " .. describe(prefix), 2)
  end
  local self = setmetatable({ _prefix = prefix or "am2z:state" }, RedisStateManager)
  if conn and conn._c and type(conn.call) == "function" then
    self._conn = conn
  else
    redis.resolve(conn)        -- raises a clear error for bad options now
    self._opts = conn or {}
    self._own = true
  end
  return self
end

local function check_session(fname, id)
  if type(id) ~= "string" or id == "" then
    error(format("RedisStateManager:%s: expected sessionId to be a non-empty string, got %s",
      fname, describe(id)), 3)
  end
end

-- One connection, however many coroutines ask for it first at once.
function RedisStateManager:_c(fname)
  if self._conn then return self._conn end
  if not core.in_exec() then
    error(format("RedisStateManager:%s: must be called inside an engine coroutine", fname), 3)
  end
  if self._connecting then
    local w = { (core.current()), require("am2z.executor").newToken() }
    self._connWaiters[#self._connWaiters + 1] = w
    core.wait_host(w[2])
    if self._conn then return self._conn end
    error(self._connErr or require("am2z.errors").NetworkError("Redis is not reachable"), 3)
  end
  self._connecting = true
  self._connWaiters = {}
  local c, err = redis.connect(self._opts)
  self._connecting = false
  self._conn, self._connErr = c, err
  local ws = self._connWaiters
  self._connWaiters = {}
  for _, w in ipairs(ws) do core.complete_host(w[1], w[2]) end
  if not c then error(err, 3) end
  return c
end

function RedisStateManager:_key(sid)
  return self._prefix .. ":" .. sid
end

local function raise(err) error(err, 3) end

--- @return table|nil { state, version }
function RedisStateManager:get(sessionId)
  check_session("get", sessionId)
  local r, err = self:_c("get"):call("HMGET", self:_key(sessionId), "state", "version", "hash")
  if r == nil then raise(err) end
  local json = r[1]
  if type(json) ~= "string" then return nil end
  if core.sha256(json) ~= r[3] then
    raise(M.StateIntegrityError(format("session %s: the stored state does not match its hash", sessionId),
      { sessionId = sessionId, version = tonumber(r[2]) }))
  end
  local ok, state = pcall(cjson.decode, json)
  if not ok then
    raise(M.StateIntegrityError(format("session %s: the stored state is not JSON", sessionId),
      { sessionId = sessionId }))
  end
  return { state = state, version = tonumber(r[2]) }
end

-- Writes; returns the new version, or nil + current version on a conflict.
function RedisStateManager:_write(fname, sessionId, state, expected, commitId)
  local c, msg = statem.copy(state)
  if c == nil then raise(errors.ValidationError("state", nil, msg)) end
  local json = M.canonicalJSON(c)
  local r, err = SET:run(self:_c(fname), { self:_key(sessionId), self:_key(sessionId) .. ":commits" },
    { json, core.sha256(json), expected and tostring(expected) or "", commitId or "",
      format("%d", core.wall_ms()) })
  if r == nil then raise(err) end
  if r[1] == 0 then return nil, r[2] end
  return r[2]
end

--- Stores a state; returns its version. With a commit id (an execution id),
--- storing again under the same id changes nothing.
function RedisStateManager:set(sessionId, state, commitId)
  check_session("set", sessionId)
  if commitId ~= nil and (type(commitId) ~= "string" or commitId == "") then
    error("RedisStateManager:set: expected commitId to be a non-empty string or nil, got "
      .. describe(commitId), 2)
  end
  return (self:_write("set", sessionId, state, nil, commitId))
end

--- Optimistic update: fn(currentState or nil) -> newState, written only if
--- nobody wrote in between (else read again and retry, up to 10 times).
function RedisStateManager:update(sessionId, fn)
  check_session("update", sessionId)
  if type(fn) ~= "function" then
    error("RedisStateManager:update: expected fn to be a function, got " .. describe(fn), 2)
  end
  for _ = 1, 10 do
    local cur = self:get(sessionId)
    local new = fn(cur and cur.state or nil)
    if type(new) ~= "table" then
      error("RedisStateManager:update: fn returned " .. describe(new) .. " instead of a state table", 2)
    end
    local v = self:_write("update", sessionId, new, cur and cur.version or 0, nil)
    if v then return new end
  end
  raise(errors.ResourceError("state:" .. sessionId, "update: too many concurrent modifications"))
end

function RedisStateManager:exists(sessionId)
  check_session("exists", sessionId)
  local r, err = self:_c("exists"):call("EXISTS", self:_key(sessionId))
  if r == nil then raise(err) end
  return r == 1
end

function RedisStateManager:delete(sessionId)
  check_session("delete", sessionId)
  local r, err = self:_c("delete"):call("DEL", self:_key(sessionId), self:_key(sessionId) .. ":commits")
  if r == nil then raise(err) end
  return r > 0
end

function RedisStateManager:getVersion(sessionId)
  check_session("getVersion", sessionId)
  local r, err = self:_c("getVersion"):call("HGET", self:_key(sessionId), "version")
  if r == nil and err then raise(err) end
  return tonumber(r)
end

--- Closes the connection it opened itself (not one it was given).
function RedisStateManager:close()
  if self._own and self._conn then
    self._conn:close()
    self._conn = nil
  end
end

return M
