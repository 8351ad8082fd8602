--[[
Specs for the am2z-lua program (bindings/main.c): options, the script's
arg/..., top-level waits in the main chunk, errors, when the process exits
by itself, and SIGTERM/SIGINT (graceful stop, exit status 128 + signal,
second signal exits at once). Every process is bounded by `timeout`.
]]

local BIN = os.getenv("AM2Z_BIN") or "./build/bin/am2z-lua"
local MULT = (TEST_TIMEOUT_MS or 5000) / 5000
local core = require("am2z.core")
local now = core.now

local function readfile(path)
  local f = assert(io.open(path, "r"))
  local s = f:read("*a")
  f:close()
  return s
end

-- A temporary script file; removed after each test.
local tmpfiles = {}
local function script(src)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(src)
  f:close()
  tmpfiles[#tmpfiles + 1] = path
  return path
end

local function sh_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Runs `am2z-lua <args>` (args already shell-quoted); returns { out, err, code, ms }.
local function run(args, stdin)
  local errf = os.tmpname()
  local cmd = ("%s timeout -s KILL 10 %s %s 2>%s; echo \"EXIT:$?\"")
    :format(stdin and ("printf %s " .. sh_quote(stdin) .. " |") or "", BIN, args, errf)
  local t0 = now()
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("*a")
  p:close()
  local ms = now() - t0
  local err = readfile(errf)
  os.remove(errf)
  local code = tonumber(out:match("EXIT:(%d+)%s*$"))
  out = out:gsub("EXIT:%d+%s*$", "")
  return { out = out, err = err, code = code, ms = ms }
end

local function has(text, needle)
  assert(text:find(needle, 1, true), ("expected to find:\n  %s\nin:\n%s"):format(needle, text))
end

-- Starts `am2z-lua path args` in the background of a shell, waits until the
-- script prints READY (it flushes), sends `signals` ("TERM", "INT"; several
-- are sent 200 ms apart), then reads until the process exits.
-- Returns { out = lines after READY, err, code, ms = exit time after the first signal }.
local function run_signalled(path, args, signals)
  local errf = os.tmpname()
  local cmd = ("timeout -s KILL 20 sh -c '%s %s %s 2>%s & echo \"PID:$!\"; wait $!; echo \"EXIT:$?\"'")
    :format(BIN, path, args or "", errf)
  local p = assert(io.popen(cmd, "r"))
  local pid, ready, code, t0, t1 = nil, false, nil, nil, nil
  local after = {}
  for line in p:lines() do
    if not pid then
      pid = line:match("^PID:(%d+)$")
    elseif line:match("^EXIT:%d+$") then
      code = tonumber(line:match("%d+"))
      t1 = now()
      break
    elseif not ready and line == "READY" then
      ready = true
      t0 = now()
      local kills = {}
      for i, s in ipairs(signals) do
        kills[i] = ("kill -%s %s"):format(s, pid)
      end
      os.execute(table.concat(kills, "; sleep 0.2; "))
    elseif ready then
      after[#after + 1] = line
    end
  end
  p:close()
  local err = readfile(errf)
  os.remove(errf)
  assert(ready, "the script never printed READY; stderr:\n" .. err)
  return { out = table.concat(after, "\n"), err = err, code = code, ms = t1 and t0 and (t1 - t0) }
end

-- A script that runs one execution whose body prints READY, then sleeps
-- arg[1] ms; the main chunk prints the execution's outcome.
local LONG_EXECUTION = [[
local am2z = require("am2z")
local ms = tonumber(arg[1])
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
rt:register(am2z.createProcessor("long-job"):process(function(state, ctx)
  print("READY")
  io.stdout:flush()
  local ok, err = ctx:sleep(ms)
  if not ok then return am2z.Failure(err) end
  state.done = true
  return am2z.Success(state)
end))
rt:start()
local r = rt:execute("long-job", {})
print("RESULT " .. tostring(r.success) .. " " .. tostring(r.error and r.error.name))
]]

after_each(function()
  for _, f in ipairs(tmpfiles) do os.remove(f) end
  tmpfiles = {}
end)

describe("am2z-lua options", function()
  it("--version and -v print the version and exit 0", function()
    for _, opt in ipairs({ "--version", "-v" }) do
      local r = run(opt)
      assert.equal(0, r.code)
      has(r.out, "am2z-lua " .. core.version)
      has(r.out, "LuaJIT")
    end
  end)

  it("--help lists the options and the environment variables on stdout, exit 0", function()
    local r = run("--help")
    assert.equal(0, r.code)
    for _, s in ipairs({ "usage:", "-e chunk", "--version", "--help", "--watch", "AM2Z_REDIS_URL",
                         "AM2Z_LOG_LEVEL", "AM2Z_LOG_FORMAT", "AM2Z_WATCH" }) do
      has(r.out, s)
    end
    assert.equal("", r.err)
  end)

  it("--watch: workflow files loaded with runtime:load are reloaded on change", function()
    local dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p " .. dir)
    local wf = dir .. "/flow.lua"
    local function write(v)
      local f = assert(io.open(wf, "w"))
      f:write(('return require("am2z").createProcessor("v"):process(function(s) s.v = %d '
        .. 'return require("am2z").Success(s) end)'):format(v))
      f:close()
    end
    write(1)
    local path = script(([[
local am2z = require("am2z")
local core = require("am2z.core")
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
local wf = %q
local me, token = core.current(), 424242
rt:on("reload:succeeded", function() core.complete_host(me, token) end)
rt:load(wf)                        -- no watch option: --watch turns it on
rt:start()
print("before", rt:execute("v", {}).state.v)
local f = io.open(wf, "w")
f:write('return require("am2z").createProcessor("v"):process(function(s) s.v = 2 return require("am2z").Success(s) end)')
f:close()
core.wait_host(token)
print("after", rt:execute("v", {}).state.v)
rt:unwatch()
]]):format(wf))
    local r = run("--watch " .. path)
    os.execute("rm -rf " .. dir)
    assert.equal(0, r.code, r.err)
    has(r.out, "before\t1")
    has(r.out, "after\t2")
  end)

  it("an unknown option exits non-zero with the usage on stderr", function()
    local r = run("--bogus")
    assert.is_not.equal(0, r.code)
    assert.equal("", r.out)
    has(r.err, "unknown option '--bogus'")
    has(r.err, "usage:")
  end)

  it("-e runs a chunk; several run in order before the script", function()
    assert.equal("2\n", run("-e " .. sh_quote("print(1+1)")).out)
    local path = script('print("script", X)\n')
    local r = run("-e 'X = 1' -e 'X = X + 1; print(\"chunk\", X)' " .. path)
    assert.equal(0, r.code)
    assert.equal("chunk\t2\nscript\t2\n", r.out)
  end)

  it("-e without a chunk is an error", function()
    local r = run("-e")
    assert.is_not.equal(0, r.code)
    has(r.err, "'-e' needs an argument")
  end)

  it("no script and no -e prints the usage and exits non-zero", function()
    local r = run("")
    assert.is_not.equal(0, r.code)
    has(r.err, "usage:")
  end)
end)

describe("am2z-lua scripts", function()
  it("gets arg like luajit (arg[0] the script, arg[1..] its args) and ...", function()
    local path = script([[
print(arg[0], arg[1], arg[2], #arg)
print(select("#", ...), ...)
print(arg[-1] ~= nil)
]])
    local r = run(path .. " one 'two words'")
    assert.equal(0, r.code)
    assert.equal(path .. "\tone\ttwo words\t2\n2\tone\ttwo words\ntrue\n", r.out)
  end)

  it("runs a script from stdin with -", function()
    local r = run("- x", 'print("from stdin", ...)')
    assert.equal(0, r.code)
    assert.equal("from stdin\tx\n", r.out)
  end)

  it("runs runtime:execute and am2z.sleep at the top level of the main chunk", function()
    local path = script([[
local am2z = require("am2z")
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
rt:register(am2z.createProcessor("double"):process(function(state, ctx)
  ctx:sleep(20)
  state.n = state.n * 2
  return am2z.Success(state)
end))
rt:start()
assert(am2z.sleep(10))
local r = rt:execute("double", { n = 21 })
print(r.success, r.state.n)
rt:stop()
]])
    local r = run(path)
    assert.equal(0, r.code)
    assert.equal("true\t42\n", r.out)
  end)

  it("a runtime error exits non-zero with the Lua traceback on stderr", function()
    local path = script('local function f() error("boom") end\nf()\n')
    local r = run(path)
    assert.is_not.equal(0, r.code)
    has(r.err, path .. ":1: boom")
    has(r.err, "stack traceback")
  end)

  it("a syntax error exits non-zero naming the file and line", function()
    local path = script("local x = = 1\n")
    local r = run(path)
    assert.is_not.equal(0, r.code)
    has(r.err, path .. ":1:")
    assert.equal("", r.out)
  end)

  it("a missing script exits non-zero naming it", function()
    local r = run("/nonexistent/am2z-script.lua")
    assert.is_not.equal(0, r.code)
    has(r.err, "/nonexistent/am2z-script.lua")
  end)

  it("a main chunk waiting for something that can never happen exits with a clear message", function()
    local r = run("-e " .. sh_quote('print("before"); require("am2z.core").wait_host(123); print("after")'))
    assert.is_not.equal(0, r.code)
    assert.is_not.equal(137, r.code) -- not killed by the timeout
    assert.equal("before\n", r.out)
    has(r.err, "can never happen")
  end)

  it("exits by itself when the script is done, even with a runtime left started", function()
    local path = script([[
local am2z = require("am2z")
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
rt:register(am2z.createProcessor("p"):process(function(s) return am2z.Success(s) end))
rt:start()
print(rt:execute("p", {}).success)
]])
    local r = run(path)
    assert.equal(0, r.code)
    assert.equal("true\n", r.out)
    assert(r.ms < 2000 * MULT, "took " .. r.ms .. " ms")
  end)

  it("a metrics:stats listener does not keep it running once the script is done", function()
    local path = script([[
local am2z = require("am2z")
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger(), monitoring = { metricsInterval = 20 } }
local n = 0
-- waits (bounded) until two metrics events have come
rt:register(am2z.createProcessor("p"):process(function(s, ctx)
  for _ = 1, 500 do
    if n >= 2 then break end
    ctx:sleep(10)
  end
  return am2z.Success(s)
end))
rt:on("metrics:stats", function(m) n = n + 1 end)
rt:start()
print(rt:execute("p", {}).success, n >= 2)
]])
    local r = run(path)
    assert.equal(0, r.code)
    assert.equal("true\ttrue\n", r.out)
    assert(r.ms < 2000 * MULT, "took " .. r.ms .. " ms")
  end)

  it("waits for fire-and-forget executions before exiting", function()
    local path = script([[
local am2z = require("am2z")
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
rt:register(am2z.createProcessor("bg"):process(function(s, ctx)
  ctx:sleep(100)
  print("background done")
  return am2z.Success(s)
end))
rt:start()
rt:executeAsync("bg", {})
print("main done")
]])
    local r = run(path)
    assert.equal(0, r.code)
    assert.equal("main done\nbackground done\n", r.out)
  end)
end)

describe("am2z-lua signals", function()
  it("SIGTERM: the running execution finishes, then the program exits with 143", function()
    local r = run_signalled(script(LONG_EXECUTION), "800", { "TERM" })
    assert.equal(143, r.code)
    assert.equal("RESULT true nil", r.out)
    assert(r.ms < 3000 * MULT, "took " .. tostring(r.ms) .. " ms")
  end)

  it("SIGINT: same graceful stop, exit status 130", function()
    local r = run_signalled(script(LONG_EXECUTION), "800", { "INT" })
    assert.equal(130, r.code)
    assert.equal("RESULT true nil", r.out)
  end)

  it("SIGTERM with watched workflow files: the watches close and the program exits", function()
    local wf = os.tmpname() .. ".lua"
    local f = assert(io.open(wf, "w"))
    f:write('return require("am2z").createProcessor("w"):process(function(s) return require("am2z").Success(s) end)')
    f:close()
    local path = script(([[
local am2z = require("am2z")
local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
rt:load(%q, { watch = true })
rt:start()
print("READY") io.stdout:flush()
]]):format(wf))
    local r = run_signalled(path, "", { "TERM" })
    os.remove(wf)
    assert.equal(143, r.code)
    assert(r.ms < 3000 * MULT, "took " .. tostring(r.ms) .. " ms")
  end)

  it("SIGTERM: an execution outlasting the grace period is cancelled at its deadline", function()
    local r = run_signalled(script(LONG_EXECUTION), "60000", { "TERM" })
    assert.equal(143, r.code)
    assert.equal("RESULT false CancelledError", r.out)
    -- LocalRuntime:stop's default grace is 5 s
    assert(r.ms >= 4500 and r.ms < 5000 + 3000 * MULT, "took " .. tostring(r.ms) .. " ms")
  end)

  it("a second signal exits at once", function()
    local r = run_signalled(script(LONG_EXECUTION), "60000", { "TERM", "TERM" })
    assert.equal(143, r.code)
    has(r.err, "second signal, exiting now")
    assert.equal("", r.out)
    assert(r.ms < 2000 * MULT, "took " .. tostring(r.ms) .. " ms")
  end)
end)
