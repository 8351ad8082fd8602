--[[
bench/local.lua -- LocalRuntime overhead, against plain LuaJIT doing the same
state updates in the same run.

  ./build/bin/am2z-lua bench/local.lua            # full run
  ./build/bin/am2z-lua bench/local.lua --quick    # smaller counts

Measures: a 3-step chain of no-op processors run sequentially and with 1,000
concurrent executions; a 3-way parallel; 100,000 concurrently sleeping
executions (peak RSS). Prints executions/s, µs per step, the ratio to plain
LuaJIT function calls (and to a coroutine per execution) doing the same
state copies, and peak RSS.
]]

local am2z = require("am2z")
local core = require("am2z.core")
local Success = am2z.Success
local now = core.now

local quick = false
for _, a in ipairs(arg or {}) do
  if a == "--quick" then quick = true end
end

local N_SEQ = quick and 20000 or 200000        -- chains, sequential
local N_CONC = 1000                           -- concurrent executions per round
local ROUNDS = quick and 5 or 40
local N_PAR = quick and 10000 or 100000
local N_SLEEP = quick and 20000 or 100000

local function rss_kib(field)
  local f = io.open("/proc/self/status")
  if not f then return 0 end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match(field .. ":%s+(%d+)")) or 0
end

local function step(s)
  s.n = s.n + 1
  return Success(s)
end

local rt = am2z.LocalRuntime.new { logger = am2z.createSilentLogger() }
local a = am2z.createProcessor("step-a"):process(step)
local b = am2z.createProcessor("step-b"):process(step)
local c = am2z.createProcessor("step-c"):process(step)
rt:register(am2z.chainProcessors { name = "chain3", processors = { a, b, c } })
rt:register(am2z.parallelProcessors { name = "par3", processors = { a, b, c } })
rt:register(am2z.createProcessor("nap"):process(function(s, ctx)
  ctx:sleep(s.ms)
  return Success(s)
end))
rt:start()

local function new_state(i)
  return { n = 0, id = i, metadata = { version = 1, sessionId = "bench" } }
end

-- ---------------------------------------------------------------- baselines
-- What the engine does per step, without the engine: copy the state across
-- the boundary (in and out), update it, bump metadata.
local copy = require("am2z.state").copy
local function plain_step(s)
  local x = copy(s)
  x.n = x.n + 1
  x.metadata.version = x.metadata.version + 1
  return copy(x)
end

local function baseline(n)
  local t0 = now()
  for i = 1, n do
    local s = new_state(i)
    for _ = 1, 3 do s = plain_step(s) end
  end
  return (now() - t0) * 1000 / (n * 3)
end

local function baseline_co(n)
  local t0 = now()
  for i = 1, n do
    local s = new_state(i)
    for _ = 1, 3 do
      local co = coroutine.create(plain_step)
      local _, r = coroutine.resume(co, s)
      s = r
    end
  end
  return (now() - t0) * 1000 / (n * 3)
end

-- ---------------------------------------------------------------- runs

local function report(label, execs, steps, ms, base)
  local us_step = ms * 1000 / steps
  print(string.format("%-34s %9.0f exec/s  %6.2f µs/step  %6.1fx plain LuaJIT",
    label, execs * 1000 / ms, us_step, us_step / base))
end

collectgarbage("collect")
local base = baseline(N_SEQ)
local base_co = baseline_co(N_SEQ)
print(string.format("plain LuaJIT, same state copies    %6.3f µs/step (coroutine per execution: %.3f µs/step)",
  base, base_co))

-- warm-up (JIT traces, pools)
for i = 1, 2000 do rt:execute("chain3", new_state(i)) end

collectgarbage("collect")
local t0 = now()
for i = 1, N_SEQ do
  local r = rt:execute("chain3", new_state(i))
  if not r.success or r.state.n ~= 3 then error("bad result: " .. tostring(r.error)) end
end
local seq_ms = now() - t0
report("3-step chain, sequential", N_SEQ, N_SEQ * 3, seq_ms, base)

collectgarbage("collect")
local states = {}
for i = 1, N_CONC do states[i] = new_state(i) end
t0 = now()
for _ = 1, ROUNDS do
  local rs = rt:executeMany("chain3", states)
  if not rs[N_CONC].success then error(tostring(rs[N_CONC].error)) end
end
local conc_ms = now() - t0
report("3-step chain, 1,000 concurrent", N_CONC * ROUNDS, N_CONC * ROUNDS * 3, conc_ms, base)

collectgarbage("collect")
t0 = now()
for i = 1, N_PAR do
  local r = rt:execute("par3", new_state(i))
  if not r.success then error(tostring(r.error)) end
end
local par_ms = now() - t0
report("3-way parallel, sequential", N_PAR, N_PAR * 3, par_ms, base)

collectgarbage("collect")
local rss_before = rss_kib("VmRSS")
local sleepers = {}
local sleep_ms = 2000
t0 = now()
for i = 1, N_SLEEP do
  sleepers[i] = rt:executeAsync("nap", { ms = sleep_ms })
end
local started_ms = now() - t0
-- Let every body reach its sleep, then read RSS with all of them asleep.
am2z.sleep(sleep_ms / 2)
local asleep = core.stats().timers
local rss_asleep = rss_kib("VmRSS")
local ok = 0
for i = 1, N_SLEEP do
  if sleepers[i]:wait().success then ok = ok + 1 end
  sleepers[i] = nil
end
local total_ms = now() - t0
if ok ~= N_SLEEP then error(("only %d of %d sleepers succeeded"):format(ok, N_SLEEP)) end
print(string.format("%d concurrent sleeping executions: started in %.0f ms, all done in %.0f ms (sleep %d ms)",
  N_SLEEP, started_ms, total_ms, sleep_ms))
print(string.format("RSS with all %d asleep: %.1f MiB (%.2f KiB each; %d timers armed); before: %.1f MiB",
  N_SLEEP, rss_asleep / 1024, (rss_asleep - rss_before) / N_SLEEP, asleep, rss_before / 1024))
print(string.format("peak RSS of the whole run %.1f MiB (includes the finished results held by the handles)",
  rss_kib("VmHWM") / 1024))
rt:stop()
