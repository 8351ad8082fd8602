--[[
Documentation coverage (in the spirit of luv's docscov.sh): every public name has
an entry in docs/api.md. A name is documented when some heading line of the
file (a line starting with "#") contains it as a whole word, e.g.
`### runtime:execute` documents "execute", `### core.spawn` documents "spawn".

The names are collected from the live objects, not from a list kept here, so
a new function fails this spec until it is documented:
  * every string key of require("am2z") not starting with "_";
  * every method of a LocalRuntime instance's metatable not starting with "_";
  * every method of a processor builder;
  * every ctx method (read from the ctx metatable's __index upvalue
    `ctx_methods`) plus the documented ctx fields;
  * every function in require("am2z.core") (including _debug_counts);
  * and, beyond the minimum, handle, schema, logger, state manager and error
    instance methods, and am2z.types.
All missing names are reported in one failure message.
]]

local am2z = require("am2z")
local core = require("am2z.core")

-- docs/api.md relative to this spec file, so the spec does not depend on
-- the directory busted was started from.
local function docs_path()
  local src = debug.getinfo(1, "S").source
  local dir = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/spec/[^/]*$") or nil
  return (dir and dir ~= "" and (dir .. "/") or "") .. "docs/api.md"
end

local function read_headings()
  local path = docs_path()
  local f = io.open(path, "r")
  if not f then f = assert(io.open("docs/api.md", "r"), "cannot open " .. path) end
  local heads = {}
  for line in f:lines() do
    if line:match("^%s*#") then heads[#heads + 1] = line end
  end
  f:close()
  return heads
end

local function escape(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

local function documented(heads, name)
  local pat = "%f[%w_]" .. escape(name) .. "%f[^%w_]"
  for _, h in ipairs(heads) do
    if h:find(pat) then return true end
  end
  return false
end

local function sorted_keys(t, filter)
  local out = {}
  for k, v in pairs(t) do
    if type(k) == "string" and (not filter or filter(k, v)) then out[#out + 1] = k end
  end
  table.sort(out)
  return out
end

local function public(k) return k:sub(1, 1) ~= "_" end
local function public_fn(k, v) return public(k) and type(v) == "function" end

-- The ctx metatable's __index closes over `ctx_methods`; reading it from the
-- upvalues keeps this list in step with executor.lua.
local function ctx_method_names()
  local rt = am2z.LocalRuntime.new({ logger = am2z.createSilentLogger() })
  local mt
  rt:register(am2z.createProcessor("docs-probe"):process(function(state, ctx)
    mt = getmetatable(ctx)
    return am2z.Success(state)
  end)):start()
  am2z.run(function()
    local r = rt:execute("docs-probe", {})
    assert(r.success, r.error and tostring(r.error))
  end)
  rt:stop()
  assert(mt and type(mt.__index) == "function", "could not capture the ctx metatable")
  local i = 1
  while true do
    local name, value = debug.getupvalue(mt.__index, i)
    if name == nil then break end
    if name == "ctx_methods" and type(value) == "table" then
      return sorted_keys(value, public_fn)
    end
    i = i + 1
  end
  error("ctx metatable's __index has no ctx_methods upvalue (executor.lua changed?)")
end

local function collect()
  local groups = {}
  local function add(label, names) groups[#groups + 1] = { label = label, names = names } end

  add("am2z", sorted_keys(am2z, public))

  local rt = am2z.LocalRuntime.new({ logger = am2z.createSilentLogger() })
  add("LocalRuntime", sorted_keys(getmetatable(rt), public_fn))

  add("builder", sorted_keys(getmetatable(am2z.createProcessor("docs-builder")), public_fn))

  local ctx_names = ctx_method_names()
  for _, f in ipairs({ "log", "meta", "callDepth", "signal", "onAbort", "progress" }) do
    ctx_names[#ctx_names + 1] = f
  end
  add("ctx", ctx_names)

  add("am2z.core", sorted_keys(core, function(_, v) return type(v) == "function" end))

  -- Beyond the required minimum.
  rt:start()
  local handle = rt:executeAsync("no-such-processor", {}) -- finishes at once, no loop needed
  add("handle", sorted_keys(getmetatable(handle), public_fn))
  rt:stop()
  add("am2z.types", sorted_keys(am2z.types, public))
  add("schema", sorted_keys(getmetatable(am2z.types.string), public_fn))
  add("logger", sorted_keys(am2z.createSilentLogger(), public_fn))
  add("MemoryStateManager", sorted_keys(am2z.MemoryStateManager, public_fn))
  add("error instance", { "is", "withCause" })
  return groups
end

describe("docs/api.md", function()
  local heads = read_headings()
  local groups = collect()

  it("finds the names it checks (the spec is not vacuous)", function()
    local seen = {}
    for _, g in ipairs(groups) do
      assert.is_true(#g.names > 0, "no names collected for " .. g.label)
      for _, n in ipairs(g.names) do seen[g.label .. ":" .. n] = true end
    end
    for _, k in ipairs({ "am2z:createProcessor", "LocalRuntime:execute", "builder:withTimeout",
                         "ctx:call", "ctx:updateProgress", "am2z.core:spawn", "am2z.core:run" }) do
      assert.is_true(seen[k] == true, "expected to collect " .. k)
    end
    assert.is_true(#heads > 50, "docs/api.md has too few headings")
  end)

  it("has a heading for every public name", function()
    local missing = {}
    for _, g in ipairs(groups) do
      for _, n in ipairs(g.names) do
        if not documented(heads, n) then missing[#missing + 1] = g.label .. ": " .. n end
      end
    end
    assert(#missing == 0, #missing .. " public name(s) without an entry in docs/api.md:\n  "
      .. table.concat(missing, "\n  "))
  end)
end)
