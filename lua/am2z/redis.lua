--[[
am2z.redis -- Redis connections for Lua code running in the engine.

  local conn = assert(am2z.redis.connect{ url = "redis://127.0.0.1:6379/0" })
  conn:call("SET", "k", "v")              --> "OK"
  local script = am2z.redis.script("return redis.call('GET', KEYS[1])")
  script:run(conn, { "k" }, {})            --> "v"

Every call suspends only the calling coroutine; calls from many coroutines
share (and are pipelined on) one connection. A connection reconnects by
itself with capped backoff when Redis goes away; calls made while it is down
fail at once with a NetworkError.

Must not: block, or talk to libuv/hiredis other than through am2z.core.
]]

local core = require("am2z.core")
local errors = require("am2z.errors")

local type, tostring, tonumber, setmetatable, select, error = type, tostring, tonumber, setmetatable,
  select, error
local format = string.format

local M = {}

--- A reply error from Redis itself (WRONGTYPE, a script error, ...).
M.RedisError = errors.define{ name = "RedisError", code = "REDIS_ERROR", category = "execution",
                              retryable = false }

local DEFAULT_TIMEOUT = 10000

--- Parses redis://[user[:password]@]host[:port][/db] (also rediss:// is refused).
---@param url string
---@return table|nil opts { host, port, username, password, db }
---@return string|nil err
function M.parseUrl(url)
  if type(url) ~= "string" then return nil, "expected a redis:// URL string, got " .. type(url) end
  local scheme, rest = url:match("^(%a+)://(.*)$")
  if scheme ~= "redis" then
    return nil, format("expected a redis:// URL, got %q", url)
  end
  local opts = {}
  local auth, hostpart = rest:match("^(.*)@(.*)$")
  if not auth then hostpart = rest end
  if auth then
    local user, pass = auth:match("^([^:]*):(.*)$")
    if user then
      opts.username = user ~= "" and user or nil
      opts.password = pass ~= "" and pass or nil
    else
      opts.password = auth ~= "" and auth or nil
    end
  end
  local hostport, db = hostpart:match("^([^/]*)/?(%d*)$")
  if not hostport then return nil, format("cannot parse the host part of %q", url) end
  local host, port = hostport:match("^%[(.+)%]:?(%d*)$")
  if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
  opts.host = (host and host ~= "") and host or "127.0.0.1"
  opts.port = (port and port ~= "") and tonumber(port) or 6379
  opts.db = (db and db ~= "") and tonumber(db) or 0
  return opts
end

-- Open connections, so that am2z-lua can close what a script left open
-- after a SIGINT/SIGTERM and exit.
M._open = setmetatable({}, { __mode = "k" })

local Conn = {}
Conn.__index = Conn

local function check_opts(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then
    error("redis.connect: expected a table of options, got " .. type(opts), 3)
  end
  local o = {}
  local url = opts.url or ((opts.host == nil and opts.port == nil) and os.getenv("AM2Z_REDIS_URL") or nil)
  if url then
    local parsed, err = M.parseUrl(url)
    if not parsed then error("redis.connect: " .. err, 3) end
    for k, v in pairs(parsed) do o[k] = v end
  end
  for _, k in ipairs({ "host", "username", "password", "name" }) do
    if opts[k] ~= nil then
      if type(opts[k]) ~= "string" then
        error(format("redis.connect: expected %s to be a string, got %s", k, type(opts[k])), 3)
      end
      o[k] = opts[k]
    end
  end
  for _, k in ipairs({ "port", "db", "connectTimeout", "commandTimeout", "reconnectMax" }) do
    if opts[k] ~= nil then
      if type(opts[k]) ~= "number" or opts[k] < 0 or opts[k] ~= math.floor(opts[k]) then
        error(format("redis.connect: expected %s to be a non-negative integer, got %s", k,
          tostring(opts[k])), 3)
      end
      o[k] = opts[k]
    end
  end
  return o, opts.logger
end

--- The connection settings `connect` would use for these options
--- (url, fields, AM2Z_REDIS_URL): { host, port, username, password, db }.
function M.resolve(opts)
  local o = check_opts(opts)
  return { host = o.host or "127.0.0.1", port = o.port or 6379, username = o.username,
           password = o.password, db = o.db or 0 }
end

local function error_of(code, msg, what)
  if code == "EREPLY" then
    local e = M.RedisError(msg, { command = what })
    return e
  end
  return errors.fromCore(code, (msg or code) .. (what and (" (" .. what .. ")") or ""))
end

--- Opens a connection and waits until it is ready.
---@param opts table|nil { url | host, port, username, password, db, name, connectTimeout, commandTimeout, reconnectMax, logger }
---@return table|nil conn
---@return table|nil err NetworkError or TimeoutError when Redis cannot be reached
function M.connect(opts)
  local o, logger = check_opts(opts)
  if not core.in_exec() then
    error("redis.connect: must be called inside an engine coroutine (am2z.run(fn), a processor, "
      .. "or the main chunk of a script run by am2z-lua)", 2)
  end
  logger = logger or require("am2z.log").createLogger({ source = "redis" })
  o.log = function(level, msg)
    if level >= 40 then logger:error(msg)
    elseif level >= 30 then logger:warn(msg)
    elseif level >= 20 then logger:info(msg)
    else logger:debug(msg) end
  end
  local c, code, msg = core.redis_new(o)
  if not c then return nil, error_of(code, msg) end
  local ok, rcode, rmsg = core.redis_wait_ready(c)
  if not ok then
    core.redis_close(c)
    return nil, error_of(rcode, format("%s (%s:%d)", rmsg or rcode, o.host or "127.0.0.1", o.port or 6379))
  end
  local conn = setmetatable({ _c = c, _timeout = o.commandTimeout or DEFAULT_TIMEOUT,
                              host = o.host or "127.0.0.1", port = o.port or 6379, db = o.db or 0 }, Conn)
  M._open[conn] = true
  return conn
end

--- Runs one command: reply, or nil + error (RedisError for a reply error,
--- NetworkError when the link is down or drops, TimeoutError).
--- A nil reply returns nil alone.
function Conn:call(...)
  if select("#", ...) == 0 then error("conn:call: expected a command name", 2) end
  local r, code, msg = core.redis_call(self._c, self._timeout, ...)
  if r == nil and code then return nil, error_of(code, msg, (...)) end
  return r
end

--- Like call, with a deadline of its own (ms; 0: none), for blocking commands.
function Conn:callTimeout(timeoutMs, ...)
  local r, code, msg = core.redis_call(self._c, timeoutMs, ...)
  if r == nil and code then return nil, error_of(code, msg, (select(1, ...))) end
  return r
end

--- XREAD for QueueRuntime's events reader: only completed/failed/cancel
--- entries, as { { key, lastId, { { event, jobId, returnvalue,
--- failedReason, am2zError }, ... } }, ... } (nil on timeout).
function Conn:xreadResults(timeoutMs, ...)
  local r, code, msg = core.redis_xread_results(self._c, timeoutMs, ...)
  if r == nil and code then return nil, error_of(code, msg, "XREAD") end
  return r
end

function Conn:isReady()
  return core.redis_ready(self._c)
end

--- Closes the connection; calls still waiting fail with a NetworkError.
function Conn:close()
  M._open[self] = nil
  core.redis_close(self._c)
end

-- ----------------------------------------------------------------- scripts

local Script = {}
Script.__index = Script

local function sha1_of(conn, src)
  -- SCRIPT LOAD both caches the script and tells us its SHA1, so the
  -- library needs no hashing code of its own for this.
  return conn:call("SCRIPT", "LOAD", src)
end

--- A server-side Lua script run by SHA (EVALSHA), loaded on first use and
--- reloaded transparently when Redis answers NOSCRIPT (after a restart or
--- SCRIPT FLUSH).
function M.script(src)
  if type(src) ~= "string" or src == "" then
    error("redis.script: expected the script source (a non-empty string), got " .. type(src), 2)
  end
  return setmetatable({ src = src, sha = nil }, Script)
end

local function run_args(keys, args)
  local out, n = {}, 0
  for i = 1, #keys do n = n + 1; out[n] = keys[i] end
  for i = 1, #args do n = n + 1; out[n] = args[i] end
  return out, n
end

--- Loads the script into this connection's server (SCRIPT LOAD), so that
--- its first run is one call: sha, or nil + error.
function Script:load(conn)
  local sha, err = sha1_of(conn, self.src)
  if sha then self.sha = sha end
  return sha, err
end

--- Runs the script: reply, or nil + error.
function Script:run(conn, keys, args)
  keys, args = keys or {}, args or {}
  if not self.sha then
    local sha, err = sha1_of(conn, self.src)
    if not sha then return nil, err end
    self.sha = sha
  end
  local all, n = run_args(keys, args)
  local r, err = conn:call("EVALSHA", self.sha, #keys, unpack(all, 1, n))
  if r == nil and err and err.name == "RedisError" and err.message:find("^NOSCRIPT") then
    local sha, lerr = sha1_of(conn, self.src)
    if not sha then return nil, lerr end
    self.sha = sha
    r, err = conn:call("EVALSHA", self.sha, #keys, unpack(all, 1, n))
  end
  return r, err
end

--- The JSON null Redis arrays carry for nil elements (same as cjson.null).
M.null = require("cjson").null

return M
