--[[
am2z.reload -- workflow files loaded into a runtime, and hot reload.

runtime:load(path, opts) runs a workflow file (or every *.lua file of a
directory) in a fresh environment and registers the processor definitions
it returns: one definition, a list of them, or a table name -> definition.
Each definition is stamped with the SHA-256 of its file's content
(`_codeHash`), which execution results carry as `metadata.codeHash`.

With watching on (opts.watch, or `am2z-lua --watch` / AM2Z_WATCH=1), the
file's directory is watched (libuv fs events, so an editor's atomic save, a
rename or a delete is seen too); changes are debounced, then the file is run
again and its processors replace the old ones in one registry swap:
executions already running keep the registry they started with, new ones
get the new code, nothing restarts. A reload that fails (missing file,
syntax error, runtime error, something that is not a processor definition,
or removing a processor another one still uses) keeps the old code, logs
the error and emits `reload:failed` { file, line, message }; a reload that
works emits `reload:succeeded` { file, codeHash, added, replaced, removed }.

Must not: change the registry in place (copy-on-write through
runtime:_setRegistry), or raise from a watch-triggered reload.
]]

local core = require("am2z.core")
local processor = require("am2z.processor")
local runtime = require("am2z.runtime")

local type, pairs, ipairs, tostring, pcall, setmetatable, error =
  type, pairs, ipairs, tostring, pcall, setmetatable, error
local format, sort = string.format, table.sort
local describe = processor.describe

local M = {}

local DEFAULT_DEBOUNCE = 50

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

local function dirname(path)
  local d = path:match("^(.*)/[^/]*$")
  if d == nil then return "." end
  if d == "" then return "/" end
  return d
end

local function basename(path)
  return path:match("([^/]*)$")
end

-- "path:12: message" -> 12, "message" (for syntax and runtime errors).
local function split_error(path, msg)
  msg = tostring(msg)
  local esc = path:gsub("%p", "%%%0")
  local line, rest = msg:match("^" .. esc .. ":(%d+): (.*)$")
  if not line then
    line, rest = msg:match("^[^:]*:(%d+): (.*)$")
  end
  if line then return tonumber(line), rest end
  return nil, msg
end

-- The definitions a workflow file returned, as a list; nil + message when
-- the value is not made of processor definitions.
local function definitions_of(ret)
  if processor.isDefinition(ret) then return { ret } end
  if type(ret) ~= "table" then
    return nil, "expected the file to return a processor definition, a list of them or a table "
      .. "name -> definition, got " .. describe(ret)
  end
  local list = {}
  local keys = {}
  for k in pairs(ret) do keys[#keys + 1] = k end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    local d = ret[k]
    if not processor.isDefinition(d) then
      return nil, format("expected [%s] to be a processor definition, got %s", describe(k), describe(d))
    end
    list[#list + 1] = d
  end
  if #list == 0 then return nil, "the file returned no processor definitions" end
  return list
end

-- Runs one workflow file; returns { defs, hash } or nil + { line, message }.
local function run_file(path)
  local src, rerr = read_file(path)
  if not src then return nil, { message = "cannot read the file: " .. tostring(rerr) } end
  local hash = core.sha256(src)
  local chunk, serr = loadstring(src, "@" .. path)
  if not chunk then
    local line, msg = split_error(path, serr)
    return nil, { line = line, message = "syntax error: " .. msg, hash = hash }
  end
  -- A fresh environment per run: globals the file sets do not leak into the
  -- next version, reads fall through to the real globals.
  local env = setmetatable({}, { __index = _G })
  setfenv(chunk, env)
  local created = {}
  local prev = processor._collect
  processor._collect = created
  local ok, ret = xpcall(chunk, debug.traceback)
  processor._collect = prev
  if not ok then
    local line, msg = split_error(path, (tostring(ret):match("^[^\n]*")))
    return nil, { line = line, message = "runtime error: " .. msg, traceback = tostring(ret), hash = hash }
  end
  local defs, derr = definitions_of(ret)
  if not defs then return nil, { message = derr, hash = hash } end
  return { defs = defs, hash = hash, created = created }
end

-- Every definition reachable from defs (their deps), by name.
local function closure(defs)
  local all = {}
  local function add(d)
    if all[d.name] == d then return end
    all[d.name] = d
    for _, c in ipairs(d.deps or {}) do add(c) end
  end
  for _, d in ipairs(defs) do add(d) end
  return all
end

-- ------------------------------------------------------------------ loader

local Loader = {}
Loader.__index = Loader

local function loader_of(rt)
  local l = rt._loader
  if not l then
    l = setmetatable({ rt = rt, files = {}, dirs = {}, watchers = {} }, Loader)
    rt._loader = l
  end
  return l
end

-- Applies one file's new definitions; returns the change summary, or nil +
-- a message when the change would break a processor that stays.
function Loader:apply(path, res)
  local rt = self.rt
  local old = self.files[path]
  local reach = closure(res.defs)
  -- What the file owns: the definitions it created (not a host's natives or
  -- definitions registered elsewhere that it only refers to).
  local new_names = {}
  for name, d in pairs(reach) do
    if res.created[d] and not d.native then new_names[name] = d end
  end
  local procs = {}
  for k, v in pairs(rt._processors) do procs[k] = v end
  local removed = {}
  if old then
    for name in pairs(old.names) do
      -- still reachable from what the file returns (e.g. a definition from a
      -- require()d module, created once): not removed
      if not reach[name] and procs[name] == old.names[name] then
        procs[name] = nil
        removed[#removed + 1] = name
      end
    end
  end
  sort(removed)
  local added, replaced = {}, {}
  for name, d in pairs(new_names) do
    local prev = procs[name]
    if prev == nil then
      added[#added + 1] = name
    elseif prev ~= d then
      replaced[#replaced + 1] = name
    end
  end
  for _, d in ipairs(res.defs) do runtime.registerInto(procs, d) end
  -- Something that stays must not depend on what goes (checked on the
  -- registry as it would be, so a composite that drops a step in the same
  -- save is fine).
  for _, gone in ipairs(removed) do
    for name, d in pairs(procs) do
      local uses = d.processorName == gone
      for _, dep in ipairs(d.deps or {}) do
        if dep.name == gone then uses = true end
      end
      if uses then
        return nil, format("processor '%s' is removed but '%s' still uses it", gone, name)
      end
    end
  end
  sort(added)
  sort(replaced)
  for _, d in pairs(new_names) do
    if not d.native and (d._codeHash == nil or d._file == path) then
      d._codeHash = res.hash
      d._file = path
    end
  end
  rt:_setRegistry(procs)
  local watched = self.files[path] and self.files[path].watched
  self.files[path] = { hash = res.hash, names = new_names, watched = watched }
  if rt._afterReload then rt:_afterReload() end
  return { file = path, codeHash = res.hash, added = added, replaced = replaced, removed = removed }
end

function Loader:reload(path)
  local rt = self.rt
  local cur = self.files[path]
  local res, err = run_file(path)
  local summary, aerr
  if res then
    if cur and cur.hash == res.hash then
      -- Touched, not changed; or a broken edit undone: say the good code is
      -- back (nothing changed in the registry).
      if cur.failedHash then
        cur.failedHash = nil
        summary = { file = path, codeHash = res.hash, added = {}, replaced = {}, removed = {} }
        rt:_dispatch("reload:succeeded", summary)
        return summary
      end
      return true
    end
    summary, aerr = self:apply(path, res)
    if not summary then err = { message = aerr } end
  end
  if not summary then
    -- The same broken content reported once, however many events it causes.
    local fh = (res and res.hash) or err.hash or (err.message .. tostring(err.line))
    if cur and cur.failedHash == fh then return nil, cur.lastFailure end
    local payload = { file = path, line = err.line, message = err.message }
    if cur then
      cur.failedHash = fh
      cur.lastFailure = payload
    end
    rt._logger:error(format("reload of %s failed%s: %s (the previous code stays)", path,
      err.line and (" at line " .. err.line) or "", err.message))
    rt:_dispatch("reload:failed", payload)
    return nil, payload
  end
  rt._logger:info(format("reloaded %s: %d added, %d replaced, %d removed", path, #summary.added,
    #summary.replaced, #summary.removed))
  rt:_dispatch("reload:succeeded", summary)
  return summary
end

-- One watcher per directory; events for a loaded file (or any *.lua of a
-- loaded directory) schedule a debounced reload.
local function watch_loop(l, dir, watch)
  while true do
    local ev = core.watch_next(watch)
    if ev == nil then break end
    local name = ev[1]
    local targets = {}
    for path, f in pairs(l.files) do
      if f.watched and dirname(path) == dir and (name == "" or basename(path) == name) then
        targets[#targets + 1] = path
      end
    end
    local dl = l.dirs[dir]
    if dl and name:match("%.lua$") and not l.files[dir .. "/" .. name] then
      -- a new file in a loaded directory
      targets[#targets + 1] = dir .. "/" .. name
    end
    for _, path in ipairs(targets) do l:schedule(path) end
  end
  return true, true
end

-- Trailing debounce: the reload runs once no event came for debounceMs, so
-- a file written in several pieces is read once, whole.
function Loader:schedule(path)
  self.pending = self.pending or {}
  self.pending[path] = true
  self.lastEvent = core.now()
  if self.timer then return end
  local l = self
  self.timer = core.spawn(function()
    local deb = l.debounce or DEFAULT_DEBOUNCE
    local ok = core.sleep(deb)
    while ok do
      local quiet = core.now() - l.lastEvent
      if quiet >= deb then break end
      ok = core.sleep(deb - quiet)
    end
    l.timer = nil
    if not ok then return true, true end
    local todo = l.pending
    l.pending = {}
    local paths = {}
    for p in pairs(todo) do paths[#paths + 1] = p end
    sort(paths)
    for _, p in ipairs(paths) do
      local f = l.files[p]
      if f then f.watched = true end
      local okr, e = pcall(l.reload, l, p)
      if not okr then l.rt._logger:error("reload of " .. p .. " raised: " .. tostring(e)) end
      if l.files[p] then l.files[p].watched = true end
    end
    return true, true
  end, "root", 0, 0, 1)
end

function Loader:watchDir(dir)
  if self.watchers[dir] then return true end
  local w, code, msg = core.watch_new(dir)
  if not w then return nil, format("cannot watch %s: %s", dir, tostring(msg or code)) end
  local co = core.spawn(watch_loop, "root", 0, 0, 1, self, dir, w)
  self.watchers[dir] = { w = w, co = co }
  return true
end

function Loader:close()
  for dir, x in pairs(self.watchers) do
    core.watch_close(x.w)
    self.watchers[dir] = nil
  end
  if self.timer then
    core.cancel(self.timer)
    self.timer = nil
  end
end

local function list_lua_files(dir)
  local p = io.popen("ls -1 '" .. dir:gsub("'", "'\\''") .. "' 2>/dev/null")
  local out = {}
  for line in p:lines() do
    if line:match("%.lua$") then out[#out + 1] = dir .. "/" .. line end
  end
  p:close()
  sort(out)
  return out
end

local function is_dir(path)
  local f = io.open(path .. "/.")
  if f then f:close() return true end
  return false
end

--- Loads a workflow file or a directory of them into `rt`; watches them when
--- opts.watch (default: AM2Z_WATCH=1 / am2z-lua --watch). Raises with the
--- file, line and message when the initial load fails.
function M.load(rt, path, opts)
  if type(path) ~= "string" or path == "" then
    error("load: expected a file or directory path (string), got " .. describe(path), 3)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("load: expected a table of options or nil, got " .. describe(opts), 3)
  end
  opts = opts or {}
  local watch = opts.watch
  if watch == nil then watch = os.getenv("AM2Z_WATCH") == "1" end
  local deb = opts.debounceMs
  if deb ~= nil and (type(deb) ~= "number" or deb < 0) then
    error("load: expected debounceMs to be a number >= 0, got " .. describe(deb), 3)
  end
  path = path:gsub("/+$", "")
  local l = loader_of(rt)
  if deb then l.debounce = deb end
  local files
  if is_dir(path) then
    files = list_lua_files(path)
    l.dirs[path] = true
  else
    files = { path }
  end
  local summaries = {}
  for _, f in ipairs(files) do
    local res, err = run_file(f)
    if not res then
      error(format("load: %s%s: %s", f, err.line and (":" .. err.line) or "", err.message), 3)
    end
    local s, aerr = l:apply(f, res)
    if not s then error(format("load: %s: %s", f, aerr), 3) end
    summaries[#summaries + 1] = s
    l.files[f].watched = watch
  end
  if watch then
    local dir = l.dirs[path] and path or dirname(path)
    local ok, werr = l:watchDir(dir)
    if not ok then error("load: " .. werr, 3) end
  end
  return summaries
end

M._runFile = run_file
return M
