--[[
bench/queue.lua -- am2z.queue throughput, round-trip latency and worker RSS,
against a Redis given by --url (bench/queue.sh starts a throwaway one and runs
the same measurements with BullMQ's Node Worker, bench/queue_bullmq.js).

  ./build/bin/am2z-lua bench/queue.lua --url redis://127.0.0.1:PORT/0            # full run
  ./build/bin/am2z-lua bench/queue.lua --url redis://127.0.0.1:PORT/0 --quick    # smaller counts

Measures:
  * consume: N no-op jobs (20,000; --quick 2,000) are added in bulk (addBulk,
    chunks of 1,000) to a fresh queue, then ONE worker process (a second
    am2z-lua process running this script with --worker) consumes them at
    concurrency 1, 10 and 100. Timed from Worker.new to the N-th "completed"
    event, in the worker process. jobs/s per concurrency.
  * worker peak RSS: VmHWM of each worker process, read from /proc/self/status
    after its consume phase.
  * round trip: add one job, then job:waitUntilFinished(queueEvents, 1000),
    one job at a time (2,000; --quick 200; after 20 warm-up round trips), with
    the worker (concurrency 1) in its own process. p50 / p99 / mean / max in
    ms; round trips whose wait ran into the 1,000 ms ttl are counted too (a
    finish notification that was missed shows up as exactly that).

Besides the human-readable lines it prints "RESULT <key> <value>" lines that
bench/queue.sh reads. Needs a redis-server; nothing here is part of the tests.
Internal: `--worker --queue NAME --n N --concurrency C` is the worker process.
]]

local am2z = require("am2z")
local core = require("am2z.core")
local cjson = require("cjson")
local newToken = require("am2z.executor").newToken
local Q = am2z.queue

local silent = am2z.createSilentLogger()
local now = core.now
io.stdout:setvbuf("line")

-- ------------------------------------------------------------------ options

local opt = {
  quick = false, worker = false, url = os.getenv("AM2Z_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0",
  queue = nil, n = nil, concurrency = 1, limit_ms = 300000, chunk = 1000,
}
do
  local i = 1
  while arg and arg[i] do
    local a = arg[i]
    local function val()
      i = i + 1
      if arg[i] == nil then error("bench/queue.lua: " .. a .. " needs a value") end
      return arg[i]
    end
    if a == "--quick" then opt.quick = true
    elseif a == "--worker" then opt.worker = true
    elseif a == "--url" then opt.url = val()
    elseif a == "--queue" then opt.queue = val()
    elseif a == "--n" then opt.n = tonumber(val())
    elseif a == "--concurrency" then opt.concurrency = tonumber(val())
    elseif a == "--limit-ms" then opt.limit_ms = tonumber(val())
    else error("bench/queue.lua: unknown argument " .. tostring(a)) end
    i = i + 1
  end
end

local N = opt.n or (opt.quick and 2000 or 20000)
local ROUND_TRIPS = opt.quick and 200 or 2000
local WARMUP = 20
local CONCURRENCIES = { 1, 10, 100 }
local connection = { url = opt.url, logger = silent }

local function status_kib(field)
  local f = io.open("/proc/self/status")
  if not f then return 0 end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match(field .. ":%s+(%d+)")) or 0
end

-- Waits until `done()` is called or `ms` have passed; returns true when done.
local function waiter(ms)
  local me, token = core.current(), newToken()
  local fired = false
  local w = {}
  function w.done()
    if not fired then
      fired = true
      core.complete_host(me, token)
    end
  end
  function w.wait()
    local timer = core.spawn(function()
      if core.sleep(ms) then w.timed_out = true; w.done() end
      return true, true
    end, "root", 0, 0, 1)
    core.wait_host(token)
    core.cancel(timer)
    return not w.timed_out
  end
  return w
end

-- ------------------------------------------------------- worker process mode

if opt.worker then
  assert(opt.queue, "--worker needs --queue")
  local done, t_end = 0, nil
  local w8 = waiter(opt.limit_ms)
  local t0 = now()
  local w = Q.Worker.new(opt.queue, function() return nil end,
    { connection = connection, concurrency = opt.concurrency, logger = silent })
  w:on("completed", function()
    done = done + 1
    if done == N then
      t_end = now()
      w8.done()
    end
  end)
  local failed = 0
  w:on("failed", function() failed = failed + 1 end)
  local ok = w8.wait()
  local elapsed = (t_end or now()) - t0
  w:close()
  local out = { ok = ok, done = done, failed = failed, elapsed_ms = elapsed,
                jobs_per_s = done * 1000 / elapsed, hwm_kib = status_kib("VmHWM"),
                rss_kib = status_kib("VmRSS") }
  io.write("WORKER ", cjson.encode(out), "\n")
  io.stdout:flush()
  if not ok then os.exit(2) end
  return
end

-- --------------------------------------------------------- orchestrator mode

-- The am2z-lua binary running this script (arg's lowest index), and the script.
local exe, lowest = nil, 0
for k, v in pairs(arg) do
  if type(k) == "number" and k < lowest then lowest, exe = k, v end
end
exe = exe or "am2z-lua"
local script = arg[0]

local function pid()
  local f = io.open("/proc/self/stat")
  local s = f and f:read("*l") or ""
  if f then f:close() end
  return tonumber(s:match("^(%d+)")) or 0
end
local run_id = string.format("%d-%d", core.wall_ms(), pid())

local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local tmpdir = os.getenv("TMPDIR") or "/tmp"
local seq = 0
local function tmpname()
  seq = seq + 1
  return string.format("%s/am2z-bench-queue-%s-%d", tmpdir, run_id, seq)
end

-- Starts a worker process in the background; returns a function that waits
-- for its result (polling its output file: a child process has no event the
-- engine could wait on; the timing itself is taken inside the child).
local function start_worker(queue, n, concurrency)
  local out = tmpname()
  local limit_s = math.floor(opt.limit_ms / 1000)
  local cmd = string.format(
    "(timeout -k 5 %d %s %s --worker --url %s --queue %s --n %d --concurrency %d --limit-ms %d > %s 2>&1; "
      .. "echo \"EXIT:$?\" >> %s) &",
    limit_s + 15, sh_quote(exe), sh_quote(script), sh_quote(opt.url), sh_quote(queue), n, concurrency,
    opt.limit_ms, sh_quote(out), sh_quote(out))
  os.execute(cmd)
  return function()
    local deadline = now() + opt.limit_ms + 30000
    while now() < deadline do
      local f = io.open(out)
      local s = f and f:read("*a") or ""
      if f then f:close() end
      local code = s:match("EXIT:(%d+)")
      if code then
        os.remove(out)
        local j = s:match("WORKER (%b{})")
        if code ~= "0" or not j then
          error(string.format("worker process (queue %s, concurrency %d) exited %s:\n%s", queue, concurrency,
            code, s), 0)
        end
        return cjson.decode(j)
      end
      am2z.sleep(20)
    end
    error("worker process did not finish in time (queue " .. queue .. ")", 0)
  end
end

local results = {}
local function result(key, value)
  results[#results + 1] = { key, value }
end

-- Everything opened here, closed on the way out even after an error (an
-- open QueueEvents keeps the loop, and so this process, alive).
local open = {}
local function track(x) open[#open + 1] = x return x end
local function close_all()
  for i = #open, 1, -1 do pcall(open[i].close, open[i]) end
  open = {}
end

local function consume_phase(c)
  local name = string.format("bench-am2z-%s-c%d", run_id, c)
  local q = track(Q.Queue.new(name, { connection = connection, logger = silent }))
  local t0 = now()
  local added = 0
  while added < N do
    local list = {}
    for i = added + 1, math.min(added + opt.chunk, N) do
      list[#list + 1] = { name = "noop", data = { i = i } }
    end
    local jobs, err = q:addBulk(list)
    if not jobs then error("addBulk failed: " .. tostring(err and err.message or err), 0) end
    added = added + #jobs
  end
  local add_ms = now() - t0
  local counts = assert(q:getJobCounts("waiting"))
  if counts.waiting ~= N then error(string.format("expected %d waiting jobs, found %d", N, counts.waiting), 0) end

  local r = start_worker(name, N, c)()
  local after = assert(q:getJobCounts("completed", "waiting", "active", "failed"))
  q:close()
  if after.completed ~= N then
    error(string.format("concurrency %d: %d completed, %d waiting, %d active, %d failed (expected %d completed)",
      c, after.completed, after.waiting, after.active, after.failed, N), 0)
  end
  print(string.format("am2z-lua  concurrency %3d: %8.0f jobs/s  (%d jobs in %.2f s; added at %.0f jobs/s; "
    .. "worker peak RSS %.1f MiB)", c, r.jobs_per_s, N, r.elapsed_ms / 1000, N * 1000 / add_ms,
    r.hwm_kib / 1024))
  result("jobs_s_c" .. c, string.format("%.1f", r.jobs_per_s))
  result("add_s_c" .. c, string.format("%.1f", N * 1000 / add_ms))
  result("rss_mib_c" .. c, string.format("%.1f", r.hwm_kib / 1024))
  return r.hwm_kib
end

-- A finish notification that never arrives shows as a wait of the whole ttl
-- (job:waitUntilFinished returns once its ttl timer fires); such round trips
-- stay in the figures and are counted as "slow".
local RT_TTL = 1000

local function round_trip_phase()
  local name = string.format("bench-am2z-%s-rt", run_id)
  local q = track(Q.Queue.new(name, { connection = connection, logger = silent }))
  local ev = track(Q.QueueEvents.new(name, { connection = connection, logger = silent }))
  ev:waitUntilReady()
  local wait_worker = start_worker(name, WARMUP + ROUND_TRIPS, 1)
  local lat, slow = {}, 0
  for i = 1, WARMUP + ROUND_TRIPS do
    local t0 = now()
    local job, err = q:add("noop", { i = i })
    if not job then error("round trip " .. i .. ": add failed: " .. tostring(err and err.message or err), 0) end
    local t1 = now()
    -- the first wait also covers the worker process starting
    local _, werr = job:waitUntilFinished(ev, i == 1 and 30000 or RT_TTL)
    if werr then error("round trip " .. i .. ": " .. tostring(werr.message or werr), 0) end
    local t2 = now()
    if i > WARMUP then
      lat[#lat + 1] = t2 - t0
      if t2 - t1 >= RT_TTL * 0.9 then slow = slow + 1 end
    end
  end
  wait_worker()
  close_all()
  table.sort(lat)
  local function pct(p) return lat[math.max(1, math.ceil(#lat * p))] end
  local sum = 0
  for _, v in ipairs(lat) do sum = sum + v end
  print(string.format("am2z-lua  round trip (add + waitUntilFinished, %d sequential): p50 %.3f ms  p99 %.3f ms  "
    .. "mean %.3f ms  max %.3f ms  (%d waited out the %d ms ttl)", #lat, pct(0.5), pct(0.99), sum / #lat,
    lat[#lat], slow, RT_TTL))
  result("rt_p50_ms", string.format("%.3f", pct(0.5)))
  result("rt_p99_ms", string.format("%.3f", pct(0.99)))
  result("rt_mean_ms", string.format("%.3f", sum / #lat))
  result("rt_max_ms", string.format("%.3f", lat[#lat]))
  result("rt_slow", tostring(slow))
end

print(string.format("am2z-lua queue benchmark: N = %d no-op jobs, %d round trips, Redis %s%s",
  N, ROUND_TRIPS, opt.url, opt.quick and " (--quick)" or ""))

local ok, err = xpcall(function()
  local max_hwm = 0
  for _, c in ipairs(CONCURRENCIES) do
    max_hwm = math.max(max_hwm, consume_phase(c))
  end
  result("rss_mib", string.format("%.1f", max_hwm / 1024))
  round_trip_phase()
  print(string.format("am2z-lua  worker peak RSS (VmHWM, max over the consume phases): %.1f MiB", max_hwm / 1024))
end, function(e) return debug.traceback(tostring(e), 2) end)
close_all()
for _, kv in ipairs(results) do print("RESULT " .. kv[1] .. " " .. kv[2]) end
if not ok then
  io.stderr:write("bench/queue.lua: ", tostring(err), "\n")
  os.exit(1)
end
