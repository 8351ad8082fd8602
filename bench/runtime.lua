--[[
bench/runtime.lua -- a 3-step chain executed through am2z's QueueRuntime,
against a Redis given by --url (bench/runtime.sh starts a throwaway one and
runs the same chain on plain BullMQ in Node, bench/runtime_bullmq.js).

  ./build/bin/am2z-lua bench/runtime.lua --url redis://127.0.0.1:PORT/0            # full run
  ./build/bin/am2z-lua bench/runtime.lua --url redis://127.0.0.1:PORT/0 --quick    # smaller counts

The chain: chainProcessors{ s1, s2, s3 }, each step a no-op that adds one
field to the state (s1: a = n + 1, s2: b = a + 1, s3: c = b + 1); every
result is checked (success, c == n + 3). In QueueRuntime each processor has
its own queue and worker, so one chain is 4 jobs (the chain's job, which
enqueues s1, s2, s3 one after the other and waits for each).

Measures, in ONE am2z-lua process (producer and workers, worker.concurrency 50):
  * sequential latency: rt:execute("chain3", ...) one after another
    (2,000; --quick 200; after 50 warm-up chains); p50 / p99 / mean / max ms.
  * throughput: 2,000 chains in flight at once (executeAsync all, then wait
    all), in rounds (5; --quick 1; after one unmeasured warm-up batch of 500);
    chains/s over all rounds (total chains / total time), best and worst round.
    Over these rounds also: redis-server main-thread CPU and commands per
    chain (INFO, before and after), and this process's CPU per chain.
and, unless --no-multi, with the workers in 2 other am2z-lua processes (this
script with --worker, worker.concurrency 50 each) and a producer-only
runtime (worker.enabled = false) here:
  * throughput: 2,000 chains in flight, in rounds (3; --quick 1).

Every phase runs under a deadline (at least 60 s; --phase-limit-ms sets it);
when it passes, the phase prints what it saw (chains finished, queue counts)
and the script exits 3 after printing the results it has. Other options:
--no-multi, --seq N, --batch N, --rounds N, --multi-rounds N, --concurrency C.

Besides the human-readable lines it prints "RESULT <key> <value>" lines that
bench/runtime.sh reads. Needs a redis-server; nothing here is part of the tests.
Internal: `--worker --prefix P --stop-file F [--parent-pid PID]` is a worker process.
]]

local am2z = require("am2z")
local core = require("am2z.core")
local P, Success = am2z.createProcessor, am2z.Success
local now = core.now
io.stdout:setvbuf("line")

-- ------------------------------------------------------------------ options

local opt = {
  quick = false, worker = false, multi = true,
  url = os.getenv("AM2Z_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0",
  prefix = nil, stop_file = nil, concurrency = 50, limit_ms = 120000, phase_limit_ms = nil,
  seq = nil, batch = 2000, rounds = nil, multi_rounds = nil,
}
do
  local i = 1
  while arg and arg[i] do
    local a = arg[i]
    local function val()
      i = i + 1
      if arg[i] == nil then error("bench/runtime.lua: " .. a .. " needs a value") end
      return arg[i]
    end
    if a == "--quick" then opt.quick = true
    elseif a == "--worker" then opt.worker = true
    elseif a == "--no-multi" then opt.multi = false
    elseif a == "--url" then opt.url = val()
    elseif a == "--prefix" then opt.prefix = val()
    elseif a == "--stop-file" then opt.stop_file = val()
    elseif a == "--parent-pid" then opt.parent_pid = tonumber(val())
    elseif a == "--concurrency" then opt.concurrency = tonumber(val())
    elseif a == "--limit-ms" then opt.limit_ms = tonumber(val())
    elseif a == "--phase-limit-ms" then opt.phase_limit_ms = tonumber(val())
    elseif a == "--seq" then opt.seq = tonumber(val())
    elseif a == "--batch" then opt.batch = tonumber(val())
    elseif a == "--rounds" then opt.rounds = tonumber(val())
    elseif a == "--multi-rounds" then opt.multi_rounds = tonumber(val())
    else error("bench/runtime.lua: unknown argument " .. tostring(a)) end
    i = i + 1
  end
end

local N_SEQ = opt.seq or (opt.quick and 200 or 2000)
local WARMUP_SEQ = 50
local WARMUP_BATCH = 500
local BATCH = opt.batch
local ROUNDS = opt.rounds or (opt.quick and 1 or 5)
local MULTI_ROUNDS = opt.multi_rounds or (opt.quick and 1 or 3)
local WORKER_PROCS = 2
local silent = am2z.createSilentLogger()

local function status_kib(field)
  local f = io.open("/proc/self/status")
  if not f then return 0 end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match(field .. ":%s+(%d+)")) or 0
end

-- The chain and its steps (the same definitions in every process).
local function definitions()
  local s1 = P("s1"):process(function(s) s.a = s.n + 1 return Success(s) end)
  local s2 = P("s2"):process(function(s) s.b = s.a + 1 return Success(s) end)
  local s3 = P("s3"):process(function(s) s.c = s.b + 1 return Success(s) end)
  local chain = am2z.chainProcessors{ name = "chain3", processors = { s1, s2, s3 } }
  return { s1, s2, s3, chain }
end

local function new_runtime(prefix, worker_enabled)
  local rt = am2z.QueueRuntime.new{
    redis = { url = opt.url }, queuePrefix = prefix,
    worker = { concurrency = opt.concurrency, enabled = worker_enabled },
    logger = silent,
  }
  rt:registerMany(definitions())
  rt:start()
  return rt
end

local function pid()
  local f = io.open("/proc/self/stat")
  local s = f and f:read("*l") or ""
  if f then f:close() end
  return tonumber(s:match("^(%d+)")) or 0
end

-- ------------------------------------------------------- worker process mode

if opt.worker then
  assert(opt.prefix and opt.stop_file, "--worker needs --prefix and --stop-file")
  local rt = new_runtime(opt.prefix, true)
  rt:syncProcessors()
  print("READY")
  local deadline = now() + opt.limit_ms
  local stopped_by_file = false
  -- bounded: stops at the stop file, when the orchestrator is gone, or at the deadline
  while now() < deadline do
    local f = io.open(opt.stop_file)
    if f then f:close() stopped_by_file = true break end
    if opt.parent_pid then
      local p = io.open("/proc/" .. opt.parent_pid .. "/stat")
      if not p then print("orchestrator process is gone") break end
      p:close()
    end
    am2z.sleep(50)
  end
  local st = rt:getStats()
  rt:stop{ graceMs = 1000 }
  print(string.format("WORKER completedJobs %d failedJobs %d hwm_kib %d", st.completedJobs or -1,
    st.failedJobs or -1, status_kib("VmHWM")))
  if not stopped_by_file then os.exit(2) end
  return
end

-- --------------------------------------------------------- orchestrator mode

local exe, lowest = nil, 0
for k, v in pairs(arg) do
  if type(k) == "number" and k < lowest then lowest, exe = k, v end
end
exe = exe or "am2z-lua"
local script = arg[0]

local run_id = string.format("%x%x", core.wall_ms(), pid())
local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local results = {}
local function result(key, value) results[#results + 1] = { key, value } end
-- Run before a deadline's os.exit (the worker processes' stop file).
local exit_hooks = {}
local function flush_results()
  for _, kv in ipairs(results) do print("RESULT " .. kv[1] .. " " .. kv[2]) end
  results = {}
end

-- Queue counts of a runtime's processor queues, for diagnostics.
local function queue_counts(rt)
  local parts = {}
  local ok, st = pcall(rt.getStats, rt)
  if ok then
    for _, n in ipairs({ "chain3", "s1", "s2", "s3" }) do
      local c = st.queueStats and st.queueStats[n]
      if c then
        parts[#parts + 1] = string.format("%s{wait %s active %s completed %s failed %s}", n,
          tostring(c.waiting or c.wait), tostring(c.active), tostring(c.completed), tostring(c.failed))
      end
    end
    parts[#parts + 1] = string.format("runtime{running %s completed %s failed %s}", tostring(st.runningJobs),
      tostring(st.completedJobs), tostring(st.failedJobs))
  else
    parts[#parts + 1] = "getStats raised: " .. tostring(st)
  end
  return table.concat(parts, " ")
end

-- Runs fn() under a deadline (`ms`, at least 60 s; or --phase-limit-ms).
-- When the deadline passes first: prints `describe()` (progress, no Redis),
-- the results so far, the queue counts (given 3 s: Redis itself may be what hangs), and
-- exits 3 (a hung wait cannot be resumed from here, and the next phase
-- would only pile up on it).
local function with_deadline(ms, what, describe, rt, fn)
  ms = opt.phase_limit_ms or math.max(60000, ms)
  local timer = core.spawn(function()
    if core.sleep(ms) then
      print(string.format("am2z-lua  TIMEOUT: %s did not finish in %.1f s; %s", what, ms / 1000, describe()))
      flush_results()
      io.stdout:flush()
      for _, h in ipairs(exit_hooks) do pcall(h) end
      core.spawn(function()
        core.sleep(3000)
        print("am2z-lua  (queue counts: no answer in 3 s)")
        os.exit(3)
      end, "root", 0, 0, 1)
      print("am2z-lua  queue counts: " .. queue_counts(rt))
      io.stdout:flush()
      os.exit(3)
    end
    return true, true
  end, "root", 0, 0, 1)
  local ok, err = xpcall(fn, function(e) return debug.traceback(tostring(e), 2) end)
  core.cancel(timer)
  if not ok then error(err, 0) end
end

local function check(r, n, bad)
  if r.success and type(r.state) == "table" and r.state.c == n + 3 then return true end
  bad.count = bad.count + 1
  if not bad.first then
    bad.first = r.success and ("wrong state: " .. require("cjson").encode(r.state))
      or tostring(r.error and (r.error.message or r.error))
  end
  return false
end

local function pct(sorted, p) return sorted[math.max(1, math.ceil(#sorted * p))] end

-- n chains one after another with rt:execute.
local function sequential(rt, label, n, key)
  local lat, bad, done = {}, { count = 0 }, 0
  with_deadline(n * 50, label .. " sequential",
    function() return string.format("%d of %d chains done", done, n) end, rt,
    function()
      for i = 1, n do
        local t0 = now()
        local r = rt:execute("chain3", { n = i })
        lat[#lat + 1] = now() - t0
        check(r, i, bad)
        done = i
      end
    end)
  if key then
    table.sort(lat)
    local sum = 0
    for _, v in ipairs(lat) do sum = sum + v end
    print(string.format("am2z-lua  %s: sequential chains (rt:execute, %d one after another): p50 %.3f ms  "
      .. "p99 %.3f ms  mean %.3f ms  max %.3f ms  (%d failed or wrong%s)", label, n, pct(lat, 0.5),
      pct(lat, 0.99), sum / n, lat[#lat], bad.count, bad.first and ("; first: " .. bad.first) or ""))
    result(key .. "_p50_ms", string.format("%.3f", pct(lat, 0.5)))
    result(key .. "_p99_ms", string.format("%.3f", pct(lat, 0.99)))
    result(key .. "_mean_ms", string.format("%.3f", sum / n))
    result(key .. "_max_ms", string.format("%.3f", lat[#lat]))
    result(key .. "_bad", tostring(bad.count))
  end
  return bad.count
end

-- One batch of n chains in flight at once; returns elapsed ms, failures.
local function batch(rt, label, n, base)
  local bad, done = { count = 0 }, 0
  local elapsed
  with_deadline(n * 30, string.format("%s batch of %d", label, n),
    function() return string.format("%d of %d chains done", done, n) end, rt,
    function()
      local t0 = now()
      local hs = {}
      for i = 1, n do hs[i] = rt:executeAsync("chain3", { n = base + i }) end
      for i = 1, n do
        check(hs[i]:wait(), base + i, bad)
        done = i
      end
      elapsed = now() - t0
    end)
  return elapsed, bad
end

-- Redis's own counters (main-thread CPU seconds, commands processed), read
-- with INFO on a connection of this script's; nil when unavailable.
local info_conn
local function redis_counters()
  if not info_conn then
    local c = am2z.redis.connect{ url = opt.url, logger = silent, name = "am2z:bench-info" }
    if not c then return nil end
    info_conn = c
  end
  local s = info_conn:call("INFO", "all")
  if type(s) ~= "string" then return nil end
  local function num(k) return tonumber(s:match(k .. ":([%d%.]+)")) end
  local u, sy = num("used_cpu_user_main_thread") or num("used_cpu_user"),
    num("used_cpu_sys_main_thread") or num("used_cpu_sys")
  return { cpu = (u or 0) + (sy or 0), cmds = num("total_commands_processed") or 0 }
end

local function throughput(rt, label, rounds, key, own_cpu)
  local total_ms, total_bad, per, first = 0, 0, {}, nil
  local r0, c0 = redis_counters(), os.clock()
  for k = 1, rounds do
    local ms, bad = batch(rt, label, BATCH, k * 1000000)
    total_ms = total_ms + ms
    total_bad = total_bad + bad.count
    first = first or bad.first
    per[#per + 1] = BATCH * 1000 / ms
  end
  local r1, c1 = redis_counters(), os.clock()
  local rate = rounds * BATCH * 1000 / total_ms
  local n = rounds * BATCH
  local cost
  if r0 and r1 then
    local cpu = own_cpu and string.format("; this process %.0f us CPU per chain", (c1 - c0) * 1e6 / n) or ""
    cost = (string.format("am2z-lua  %s: per chain, over these rounds: redis-server %.0f us CPU (main thread), "
      .. "%.1f commands%s", label, (r1.cpu - r0.cpu) * 1e6 / n, (r1.cmds - r0.cmds) / n, cpu))
    result(key .. "_redis_us", string.format("%.1f", (r1.cpu - r0.cpu) * 1e6 / n))
    result(key .. "_redis_cmds", string.format("%.1f", (r1.cmds - r0.cmds) / n))
    if own_cpu then result(key .. "_proc_us", string.format("%.1f", (c1 - c0) * 1e6 / n)) end
  end
  local sorted = {}
  for i, v in ipairs(per) do sorted[i] = v end
  table.sort(sorted)
  local rs = {}
  for i, v in ipairs(per) do rs[i] = string.format("%.0f", v) end
  print(string.format("am2z-lua  %s: throughput, %d chains in flight x %d rounds: %.0f chains/s (%.0f jobs/s "
    .. "at 4 jobs per chain; rounds %s chains/s; %d failed or wrong%s)", label, BATCH, rounds, rate, rate * 4,
    table.concat(rs, ", "), total_bad, first and ("; first: " .. first) or ""))
  if cost then print(cost) end
  result(key .. "_chains_s", string.format("%.1f", rate))
  result(key .. "_best_chains_s", string.format("%.1f", sorted[#sorted]))
  result(key .. "_worst_chains_s", string.format("%.1f", sorted[1]))
  result(key .. "_bad", tostring(total_bad))
  return total_bad
end

-- ---------------------------------------------------------------- phases

local function single_process()
  local rt = new_runtime("b" .. run_id .. "s", true)
  local t0 = now()
  local r = rt:execute("chain3", { n = 0 })          -- connects, creates queues and workers
  print(string.format("am2z-lua  first chain (connect + queues + workers): %.1f ms, success %s",
    now() - t0, tostring(r.success)))
  sequential(rt, "1 process", WARMUP_SEQ, nil)
  sequential(rt, "1 process", N_SEQ, "seq")
  batch(rt, "1 process warm-up", WARMUP_BATCH, 0)
  throughput(rt, "1 process", ROUNDS, "tp", true)
  local t1 = now()
  rt:stop()
  print(string.format("am2z-lua  1 process: rt:stop() took %.1f ms; peak RSS (VmHWM) %.1f MiB", now() - t1,
    status_kib("VmHWM") / 1024))
  result("rss_mib", string.format("%.1f", status_kib("VmHWM") / 1024))
end

local tmpdir = os.getenv("TMPDIR") or "/tmp"
local function read_file(path)
  local f = io.open(path)
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

local function multi_process()
  local prefix = "b" .. run_id .. "m"
  local stop_file = string.format("%s/am2z-bench-runtime-%s.stop", tmpdir, run_id)
  os.remove(stop_file)
  local outs = {}
  local wlimit = 300000
  for w = 1, WORKER_PROCS do
    local out = string.format("%s/am2z-bench-runtime-%s-w%d.out", tmpdir, run_id, w)
    outs[w] = out
    os.execute(string.format(
      "(timeout -k 5 %d %s %s --worker --url %s --prefix %s --stop-file %s --parent-pid %d --concurrency %d "
        .. "--limit-ms %d > %s 2>&1; echo \"EXIT:$?\" >> %s) &",
      math.floor(wlimit / 1000) + 15, sh_quote(exe), sh_quote(script), sh_quote(opt.url), sh_quote(prefix),
      sh_quote(stop_file), pid(), opt.concurrency, wlimit, sh_quote(out), sh_quote(out)))
  end
  exit_hooks[#exit_hooks + 1] = function()
    local f = io.open(stop_file, "w")
    if f then f:close() end
  end
  local function stop_workers()
    local f = io.open(stop_file, "w")
    if f then f:close() end
    local deadline = now() + 20000
    local summary = {}
    for w = 1, WORKER_PROCS do
      local s = read_file(outs[w])
      while not s:find("EXIT:%d+") and now() < deadline do
        am2z.sleep(50)
        s = read_file(outs[w])
      end
      local code = s:match("EXIT:(%d+)")
      local line = s:match("WORKER ([^\n]*)")
      summary[#summary + 1] = string.format("worker %d: exit %s, %s", w, tostring(code), tostring(line))
      if code ~= "0" then summary[#summary] = summary[#summary] .. "\n" .. s end
      os.remove(outs[w])
    end
    os.remove(stop_file)
    return table.concat(summary, "; ")
  end
  local ok, err = xpcall(function()
    -- wait until both worker processes have their workers (bounded)
    local deadline = now() + 30000
    for w = 1, WORKER_PROCS do
      while not read_file(outs[w]):find("READY") do
        if now() > deadline or read_file(outs[w]):find("EXIT:") then
          error("worker process " .. w .. " did not start:\n" .. read_file(outs[w]), 0)
        end
        am2z.sleep(20)
      end
    end
    local rt = new_runtime(prefix, false)
    sequential(rt, "2 worker processes warm-up", WARMUP_SEQ, nil)
    batch(rt, "2 worker processes warm-up", WARMUP_BATCH, 0)
    throughput(rt, string.format("producer + %d worker processes", WORKER_PROCS), MULTI_ROUNDS, "tp2")
    rt:stop()
  end, function(e) return debug.traceback(tostring(e), 2) end)
  print("am2z-lua  " .. stop_workers())
  if not ok then error(err, 0) end
end

print(string.format("am2z-lua QueueRuntime 3-step chain benchmark: %d sequential, %d in flight x %d rounds "
  .. "(%s x %d rounds with %d worker processes), worker.concurrency %d, Redis %s%s",
  N_SEQ, BATCH, ROUNDS, opt.multi and tostring(BATCH) or "no run", MULTI_ROUNDS, WORKER_PROCS,
  opt.concurrency, opt.url, opt.quick and " (--quick)" or ""))

local ok, err = xpcall(function()
  single_process()
  if opt.multi then multi_process() end
end, function(e) return debug.traceback(tostring(e), 2) end)
if info_conn then info_conn:close() end
flush_results()
if not ok then
  io.stderr:write("bench/runtime.lua: ", tostring(err), "\n")
  os.exit(1)
end
