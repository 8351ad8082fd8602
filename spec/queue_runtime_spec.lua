--[[
QueueRuntime across processes, crashes and Redis (issue 4). The behaviour
shared with LocalRuntime is covered by runtime_spec, compose_spec and
semantics_spec, which scripts/test.sh runs a second time against
QueueRuntime; this file covers what only a distributed runtime has:

- several am2z-lua worker processes running spec/fixtures/qr_app.lua share
  the work of a producer-only process;
- a chain whose worker is killed with kill -9 mid-step is recovered by
  another process and completes, without running finished steps again;
- cancellation and a parent's timeout reach a child running in another
  process;
- nesting at concurrency 1, the job data layout, bad input, RedisStateManager.

Other processes are observed through files they write and through Redis,
polled with a bound (there is no event across processes to wait on).
]]

local am2z = require("am2z")
local core = require("am2z.core")
local cjson = require("cjson")
local errors = am2z.errors
local P, Success, Failure = am2z.createProcessor, am2z.Success, am2z.Failure

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local MULT = tonumber(os.getenv("AM2Z_TEST_TIMEOUT_MULT")) or 1
local AM2Z_LUA = os.getenv("AM2Z_BIN") or "./build/bin/am2z-lua"
local APP = "spec/fixtures/qr_app.lua"
local silent = am2z.createSilentLogger()

local function run(fn, ms) return am2z.run(fn, { timeoutMs = (ms or 10000) * MULT }) end

local tag
do
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(3) or tostring(math.random(1e6))
  if f then f:close() end
  tag = (b:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end
local seq = 0
local function fresh()
  seq = seq + 1
  return ("qr%s%d"):format(tag, seq)
end

local function file_exists(p)
  local f = io.open(p)
  if f then f:close() return true end
  return false
end

-- Polls pred every 20 ms until it holds or ms pass (then raises).
local function poll(pred, ms, what)
  local deadline = am2z.now() + ms * MULT
  while not pred() do
    if am2z.now() > deadline then error("timed out waiting for " .. what, 2) end
    if core.in_exec() then am2z.sleep(20) else os.execute("sleep 0.02") end
  end
end

-- ------------------------------------------------------------ processes

local procs = {}

local function start_worker(prefix, dir)
  local pidfile = os.tmpname()
  local logfile = dir .. "/log-" .. (#procs + 1)
  assert(os.execute(("%s %s %s %s worker %s > %s 2>&1 & echo $! > %s"):format(AM2Z_LUA, APP, URL, prefix,
    dir, logfile, pidfile)))
  local f = assert(io.open(pidfile))
  local pid = tonumber(f:read("*a"))
  f:close()
  os.remove(pidfile)
  local p = { pid = pid, log = logfile }
  procs[#procs + 1] = p
  poll(function() return file_exists(dir .. "/ready-" .. pid) end, 10000, "worker process " .. pid)
  return p
end

local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  local st = f and f:read("*a") or ""
  if f then f:close() end
  local state = st:match("%) (%a)")
  return state ~= nil and state ~= "Z"
end

local function stop_proc(p, sig)
  os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", p.pid))
  poll(function() return not alive(p.pid) end, 10000, "process " .. p.pid .. " to exit")
end

local function cleanup_procs()
  for _, p in ipairs(procs) do
    if alive(p.pid) then os.execute(("kill -9 %d 2>/dev/null"):format(p.pid)) end
  end
  procs = {}
  -- A test that failed before its rt:stop() must not leave its runtime
  -- running into the next tests (their engine-idle checks would fail too).
  for rt in pairs(require("am2z.runtime")._all) do
    if rt._started or rt._conn then
      am2z.run(function() rt:stop{ graceMs = 0 } end, { timeoutMs = TEST_TIMEOUT_MS })
    end
  end
end

local function tmpdir()
  local p = io.popen("mktemp -d")
  local d = p:read("*l")
  p:close()
  return d
end

local function producer(prefix, dir, opts)
  opts = opts or {}
  local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
    logger = silent, worker = { enabled = opts.worker or false, concurrency = opts.concurrency } }
  rt:registerMany(loadfile(APP)(URL, prefix, "lib", dir))
  return rt
end

local function connect()
  return assert(am2z.redis.connect{ url = URL, logger = silent })
end

local function runs(R, prefix)
  local arr = R:call("HGETALL", prefix .. ":runs")
  local h = {}
  for i = 1, #arr, 2 do h[arr[i]] = tonumber(arr[i + 1]) end
  return h
end

describe("QueueRuntime", function()
  if not URL then
    it("needs the suite's redis-server", function() pending("AM2Z_TEST_REDIS_URL is not set") end)
    return
  end

  after_each(cleanup_procs)

  -------------------------------------------------------------- processes
  describe("across processes", function()
    it("two worker processes share the work of a producer-only process; every result comes back", function()
      local prefix, dir = fresh(), tmpdir()
      local w1 = start_worker(prefix, dir)
      local w2 = start_worker(prefix, dir)
      local rt = producer(prefix, dir)
      run(function()
        rt:start()
        local states = {}
        for i = 1, 40 do states[i] = { n = i } end
        local rs = rt:executeMany("ch", states)
        for i, r in ipairs(rs) do
          assert.is_true(r.success, tostring(r.error))
          assert.are.equal(i, r.state.n)
          assert.are.same({ "s1", "s2", "s3" }, r.state.trail)
        end
        local R = connect()
        local by = R:call("HGETALL", prefix .. ":by")
        local per = {}
        for i = 1, #by, 2 do per[by[i]] = tonumber(by[i + 1]) end
        assert.is_true((per[tostring(w1.pid)] or 0) > 0, "worker 1 ran nothing: " .. cjson.encode(per))
        assert.is_true((per[tostring(w2.pid)] or 0) > 0, "worker 2 ran nothing: " .. cjson.encode(per))
        assert.are.same({ s1 = 40, s2 = 40, s3 = 40 }, runs(R, prefix))
        -- this process ran nothing: it has no workers
        assert.are.equal(0, rt:getStats().completedJobs)
        R:close()
        rt:stop()
      end, 30000)
      -- SIGTERM: a graceful stop, the process exits
      stop_proc(w1, "TERM")
      stop_proc(w2, "TERM")
    end)

    it("an am2z-lua producer-only script exits by itself once its executions are done (rule 17)", function()
      local prefix, dir = fresh(), tmpdir()
      start_worker(prefix, dir)
      local script = dir .. "/producer.lua"
      local f = assert(io.open(script, "w"))
      f:write(([[
local am2z = require("am2z")
local rt = am2z.QueueRuntime.new{ redis = { url = %q }, queuePrefix = %q, worker = { enabled = false },
  logger = am2z.createSilentLogger() }
rt:registerMany(loadfile(%q)(%q, %q, "lib", %q))
rt:start()
print("sync", rt:execute("ch", { n = 1 }).success)
local h = rt:executeAsync("ch", { n = 2 })
require("am2z.core").spawn(function() print("async", h:wait().success) return true end, "root", 0, 0, 1)
-- the main chunk ends here with an execution still running and no stop()
]]):format(URL, prefix, APP, URL, prefix, dir))
      f:close()
      local p = io.popen(("timeout 20 %s %s 2>&1; echo EXIT:$?"):format(AM2Z_LUA, script))
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find("sync\ttrue", 1, true), out)
      assert.truthy(out:find("async\ttrue", 1, true), out)
      assert.truthy(out:find("EXIT:0", 1, true), out)
    end)

    it("a chain whose worker is killed -9 mid-step is completed by another process; finished steps do not run again", function()
      local prefix, dir = fresh(), tmpdir()
      local a = start_worker(prefix, dir)
      local rt = producer(prefix, dir)
      local r, stc
      run(function()
        rt:start()
        local h = rt:executeAsync("ch", { crash = true })
        poll(function() return file_exists(dir .. "/s2-running") end, 10000, "s2 to start")
        stop_proc(a, "9")
        start_worker(prefix, dir)
        r = h:wait()
        local R = connect()
        assert.are.same({ s1 = 1, s2 = 2, s3 = 1 }, runs(R, prefix))
        stc = tonumber(R:call("HGET", "bull:" .. prefix .. "_ch:" .. h.executionId, "stc"))
        R:close()
        rt:stop()
      end, 30000)
      assert.is_true(r.success, tostring(r.error))
      assert.are.same({ "s1", "s2", "s3" }, r.state.trail)
      assert.are.equal(1, stc, "the chain's job was recovered once")
    end)

    it("runtime:cancel reaches the parent and the child it waits for, in another process", function()
      local prefix, dir = fresh(), tmpdir()
      start_worker(prefix, dir)
      local rt = producer(prefix, dir)
      local r, aborted
      run(function()
        rt:start()
        local h = rt:executeAsync("outer", {})
        poll(function() return file_exists(dir .. "/slow-running") end, 10000, "the child to start")
        assert.is_true(rt:cancel(h.executionId))
        r = h:wait()
        local R = connect()
        poll(function() return R:call("GET", prefix .. ":slow-aborted") ~= nil end, 5000, "the child to be aborted")
        aborted = R:call("GET", prefix .. ":slow-aborted")
        R:close()
        rt:stop()
      end, 20000)
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.CancelledError), tostring(r.error))
      assert.are.equal("CancelledError", aborted)
    end)

    it("stop()'s grace deadline cancels the executions it started that run in another process", function()
      local prefix, dir = fresh(), tmpdir()
      start_worker(prefix, dir)
      local rt = producer(prefix, dir)
      local r, aborted
      run(function()
        rt:start()
        local h = rt:executeAsync("slow", {})
        poll(function() return file_exists(dir .. "/slow-running") end, 10000, "the execution to start")
        rt:stop{ graceMs = 100 }
        r = h:wait()
        local R = connect()
        poll(function() return R:call("GET", prefix .. ":slow-aborted") ~= nil end, 5000, "the job to be aborted")
        aborted = R:call("GET", prefix .. ":slow-aborted")
        R:close()
      end, 20000)
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.CancelledError), tostring(r.error))
      assert.are.equal("CancelledError", aborted)
    end)

    it("a parent's timeout fails it with TimeoutError and aborts its child in another process", function()
      local prefix, dir = fresh(), tmpdir()
      start_worker(prefix, dir)
      local rt = producer(prefix, dir)
      local r, aborted, t0, elapsed
      run(function()
        rt:start()
        t0 = am2z.now()
        r = rt:execute("outer_t", {})
        elapsed = am2z.now() - t0
        local R = connect()
        poll(function() return R:call("GET", prefix .. ":slow-aborted") ~= nil end, 5000, "the child to be aborted")
        aborted = R:call("GET", prefix .. ":slow-aborted")
        R:close()
        rt:stop()
      end, 20000)
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.is_true(elapsed >= 500, "failed after " .. elapsed .. " ms")
      assert.are.equal("CancelledError", aborted)
    end)

    it("an aborted parent's child job is removed once it has ended (nobody reads it)", function()
      local prefix, dir = fresh(), tmpdir()
      local rt = producer(prefix, dir, { worker = true })
      run(function()
        rt:start()
        local r = rt:execute("outer_t", {})
        assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
        local R = connect()
        local child = "bull:" .. prefix .. "_slow:" .. r.metadata.executionId .. ".1"
        poll(function() return R:call("EXISTS", child) == 0 end, 5000, "the child job to be removed")
        assert.are.equal(0, R:call("ZCARD", "bull:" .. prefix .. "_slow:failed"))
        R:close()
        rt:stop()
      end, 20000)
    end)
  end)

  -------------------------------------------------------------- nesting
  describe("nesting", function()
    local rt
    after_each(function()
      if rt then run(function() rt:stop{ graceMs = 1000 } end) end
      rt = nil
    end)

    local function new_rt(conc, depth)
      rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent, worker = { concurrency = conc }, runtime = { maxCallDepth = depth } }
      return rt
    end

    it("a processor calling itself 10 deep completes with worker concurrency 1", function()
      new_rt(1, 15)
      rt:register(P("rec"):process(function(s, ctx)
        if s.d < 10 then
          local r = ctx:call("rec", { d = s.d + 1 })
          if not r.success then return Failure(r.error) end
          s.deepest = r.state.deepest
        else
          s.deepest = ctx.callDepth
        end
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("rec", { d = 0 })
      end)
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(10, r.state.deepest)
    end)

    it("chains nested in chains 10 deep complete at concurrency 1, in order", function()
      new_rt(1, 15)
      local leaf = P("leaf"):process(function(s) s.n = s.n + 1 return Success(s) end)
      local def = leaf
      for i = 1, 10 do
        def = am2z.chainProcessors{ name = "c" .. i, processors = { def, leaf } }
      end
      rt:register(def)
      local r
      run(function()
        rt:start()
        r = rt:execute("c10", { n = 0 })
      end)
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(11, r.state.n)
    end)

    it("withQueueConfig{ concurrency } bounds that processor's jobs running at once", function()
      new_rt(10, 10)
      local now_running, max_running = 0, 0
      rt:register(P("c2"):withQueueConfig{ concurrency = 2 }:process(function(s, ctx)
        now_running = now_running + 1
        if now_running > max_running then max_running = now_running end
        ctx:sleep(30)
        now_running = now_running - 1
        return Success(s)
      end))
      local rs
      run(function()
        rt:start()
        rs = rt:executeMany("c2", { {}, {}, {}, {}, {}, {} })
      end)
      for _, r in ipairs(rs) do assert.is_true(r.success, tostring(r.error)) end
      assert.are.equal(2, max_running)
    end)

    it("a parallel fan-out of 8 children runs at concurrency 1 without deadlock", function()
      new_rt(1, 10)
      local kids = {}
      for i = 1, 8 do
        kids[i] = P("k" .. i):process(function(s) s["k" .. i] = true return Success(s) end)
      end
      rt:register(am2z.parallelProcessors{ name = "fan", processors = kids })
      local r
      run(function()
        rt:start()
        r = rt:execute("fan", {})
      end)
      assert.is_true(r.success, tostring(r.error))
      for i = 1, 8 do assert.is_true(r.state["k" .. i]) end
    end)
  end)

  -------------------------------------------------------------- hot reload
  describe("hot reload", function()
    it("workers take new definitions without dropping the job in flight; new processors get queues", function()
      local dir = tmpdir()
      local wf = dir .. "/flow.lua"
      local function write(v, extra)
        local f = assert(io.open(wf, "w"))
        f:write(([[
local am2z = require("am2z")
local gate = require("qr_reload_gate")
local defs = { am2z.createProcessor("work"):process(function(s, ctx)
  if s.wait then gate.wait() end
  s.v = %d
  return am2z.Success(s)
end) }
%s
return defs
]]):format(v, extra or ""))
        f:close()
      end
      -- a gate the test opens, shared with the workflow file through package.loaded
      local gate = { waiters = {} }
      function gate.wait()
        if gate.open then return end
        local me, token = (core.current()), 0x5150
        gate.waiters[#gate.waiters + 1] = { me, token }
        gate.started = true
        core.wait_host(token)
      end
      function gate.release()
        gate.open = true
        for _, w in ipairs(gate.waiters) do core.complete_host(w[1], w[2]) end
      end
      package.loaded.qr_reload_gate = gate
      write(1)
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local reloaded
      rt:on("reload:succeeded", function(e) reloaded = e end)
      local old, new, added
      run(function()
        rt:load(wf, { watch = true, debounceMs = 20 })
        rt:start()
        local h = rt:executeAsync("work", { wait = true })
        poll(function() return gate.started end, 5000, "the first job to start")
        write(2, [[defs[2] = am2z.createProcessor("extra"):process(function(s) s.extra = true return am2z.Success(s) end)]])
        poll(function() return reloaded ~= nil end, 5000, "the reload")
        new = rt:execute("work", {})
        added = rt:execute("extra", {})
        gate.release()
        old = h:wait()
        rt:unwatch()
        rt:stop()
      end, 15000)
      package.loaded.qr_reload_gate = nil
      os.execute("rm -rf " .. dir)
      assert.are.same({ "extra" }, reloaded.added)
      assert.are.same({ "work" }, reloaded.replaced)
      assert.is_true(old.success, tostring(old.error))
      assert.are.equal(1, old.state.v, "the job in flight finished on the old code")
      assert.are.equal(2, new.state.v)
      assert.are_not.equal(old.metadata.codeHash, new.metadata.codeHash)
      assert.is_true(added.success, tostring(added.error))
      assert.is_true(added.state.extra)
    end)
  end)

  describe("hot reload pinning", function()
    it("a chain running in this process finishes its later steps on the code it started with", function()
      local dir = tmpdir()
      local wf = dir .. "/chain.lua"
      local function write(v)
        local f = assert(io.open(wf, "w"))
        f:write(([[
local am2z = require("am2z")
local gate = require("qr_pin_gate")
local hold = am2z.createProcessor("hold"):process(function(s)
  if s.wait then gate.wait() end
  s.trail = { "hold-v%d" }
  return am2z.Success(s)
end)
local stamp = am2z.createProcessor("stamp"):process(function(s)
  s.trail[#s.trail + 1] = "stamp-v%d"
  return am2z.Success(s)
end)
return { am2z.chainProcessors{ name = "pipe", processors = { hold, stamp } } }
]]):format(v, v))
        f:close()
      end
      local gate = { waiters = {} }
      function gate.wait()
        if gate.open then return end
        local me, token = (core.current()), 0x7505
        gate.waiters[#gate.waiters + 1] = { me, token }
        gate.started = true
        core.wait_host(token)
      end
      package.loaded.qr_pin_gate = gate
      write(1)
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local reloaded
      rt:on("reload:succeeded", function() reloaded = true end)
      local old, new
      run(function()
        rt:load(wf, { watch = true, debounceMs = 20 })
        rt:start()
        local h = rt:executeAsync("pipe", { wait = true })
        poll(function() return gate.started end, 5000, "hold to start")
        write(2)
        poll(function() return reloaded end, 5000, "the reload")
        new = rt:execute("pipe", {})
        gate.open = true
        for _, w in ipairs(gate.waiters) do core.complete_host(w[1], w[2]) end
        old = h:wait()
        rt:unwatch()
        rt:stop()
      end, 15000)
      package.loaded.qr_pin_gate = nil
      os.execute("rm -rf " .. dir)
      assert.is_true(old.success, tostring(old.error))
      assert.are.same({ "hold-v1", "stamp-v1" }, old.state.trail)
      assert.are.same({ "hold-v2", "stamp-v2" }, new.state.trail)
    end)
  end)

  -------------------------------------------------------------- layout
  describe("jobs in Redis", function()
    it("one queue per processor; job id = execution id; data and return value as ARCHITECTURE.md says", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      local seen = {}
      local a = P("a"):process(function(s, ctx)
        seen.id = ctx.meta.executionId
        s.a = true
        return Success(s)
      end)
      rt:register(am2z.chainProcessors{ name = "top", processors = { a } })
      run(function()
        rt:start()
        local r = rt:execute("top", { x = 1 }, "sess-layout-" .. prefix)
        assert.is_true(r.success)
        local eid = r.metadata.executionId
        assert.are.equal(eid .. ".1", seen.id)
        assert.is_nil(eid:find(":", 1, true))
        local names = {}
        for _, q in ipairs(rt:getQueues()) do names[#names + 1] = q.name end
        assert.are.same({ prefix .. "_a", prefix .. "_top" }, names)
        local R = connect()
        local h = {}
        local arr = R:call("HGETALL", "bull:" .. prefix .. "_top:" .. eid)
        for i = 1, #arr, 2 do h[arr[i]] = arr[i + 1] end
        assert.are.equal("top", h.name)
        local data = cjson.decode(h.data)
        assert.are.equal("top", data.processorName)
        assert.are.equal(1, data.state.x)
        assert.are.equal("sess-layout-" .. prefix, data.sessionId)
        assert.are.equal(eid, data.executionId)
        assert.are.equal(0, data.callContext.depth)
        local rv = cjson.decode(h.returnvalue)
        assert.is_true(rv.success)
        assert.is_true(rv.state.a)
        assert.is_number(rv.executionTime)
        assert.are.equal(eid, rv.metadata.executionId)
        -- the child was kept while its parent ran, and removed once it ended
        assert.are.equal(0, R:call("EXISTS", "bull:" .. prefix .. "_a:" .. eid .. ".1"))
        local st = rt:getStats()
        assert.are.equal(1, st.queueStats.top.completed)
        assert.are.equal(0, st.queueStats.a.completed)
        -- the session's state, through the default RedisStateManager
        local s = rt:getState("sess-layout-" .. prefix)
        assert.is_true(s.state.a)
        assert.are.equal(1, s.version)
        rt:cleanAllQueues()
        assert.are.equal(0, rt:getStats().queueStats.top.completed)
        R:close()
        rt:stop()
      end)
    end)

    it("numbers cross Redis exactly (15-17 significant digits, as a JSON round trip keeps them)", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local seen
      rt:register(P("n"):process(function(s) seen = s.big s.sum = s.a + s.b return Success(s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("n", { big = 123456789012345, huge = 2 ^ 53, a = 0.1, b = 0.2, third = 1 / 3 })
        rt:stop()
      end)
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(123456789012345, seen)
      assert.are.equal(123456789012345, r.state.big)
      assert.are.equal(2 ^ 53, r.state.huge)
      assert.are.equal(0.1 + 0.2, r.state.sum)
      assert.are.equal(1 / 3, r.state.third)
    end)

    it("a child job is kept while its parent runs, with a 7-day age limit as the backstop", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local opts, exists_after
      rt:register(P("kid"):process(function(s) return Success(s) end))
      rt:register(P("mom"):process(function(s, ctx)
        local r = ctx:call("kid", s)
        local R = connect()
        opts = R:call("HGET", "bull:" .. rt._prefix .. "_kid:" .. ctx.meta.executionId .. ".1", "opts")
        R:close()
        return r
      end))
      run(function()
        rt:start()
        local r = rt:execute("mom", {})
        assert.is_true(r.success, tostring(r.error))
        local R = connect()
        exists_after = R:call("EXISTS", "bull:" .. rt._prefix .. "_kid:" .. r.metadata.executionId .. ".1")
        R:close()
        rt:stop()
      end)
      local o = cjson.decode(opts)
      assert.are.same({ age = 604800 }, o.removeOnComplete)
      assert.are.same({ age = 604800 }, o.removeOnFail)
      assert.are.equal(0, exists_after)
    end)

    it("a finished parent's children in several queues are all removed: hashes and finished sets", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      rt:register(P("a"):process(function(s) s.a = (s.a or 0) + 1 return Success(s) end))
      rt:register(P("b"):process(function(s) return Success(s) end))
      rt:register(P("f"):process(function() return Failure(errors.BusinessError("NO", "no")) end))
      rt:register(P("top"):process(function(s, ctx)
        s = ctx:call("a", s).state
        s = ctx:call("b", s).state
        s = ctx:call("a", s).state
        assert(not ctx:call("f", s).success)
        return Success(s)
      end))
      local left
      run(function()
        rt:start()
        local r = rt:execute("top", {})
        assert.is_true(r.success, tostring(r.error))
        assert.are.equal(2, r.state.a)
        local R = connect()
        left = {}
        for _, n in ipairs({ "a", "b", "f" }) do
          local q = "bull:" .. rt._prefix .. "_" .. n
          for _, set in ipairs({ "completed", "failed" }) do
            local ids = R:call("ZRANGE", q .. ":" .. set, 0, -1)
            for _, id in ipairs(ids) do left[#left + 1] = n .. " " .. set .. " " .. id end
          end
          for i = 1, 4 do
            if R:call("EXISTS", q .. ":" .. r.metadata.executionId .. "." .. i) == 1 then
              left[#left + 1] = n .. " hash ." .. i
            end
          end
        end
        R:close()
        rt:stop()
      end)
      assert.are.same({}, left)
    end)

    it("a failed execution's error comes back as the same class with its fields", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local Quota = errors.define{ name = "QrQuotaError", code = "QR_QUOTA", category = "business",
        retryable = false }
      rt:register(P("q"):process(function(s)
        local e = Quota("over quota", { limit = 3 })
        return Failure(e)
      end))
      rt:register(am2z.chainProcessors{ name = "qc", processors = { rt._processors.q } })
      run(function()
        rt:start()
        local r = rt:execute("q", { v = 1 })
        assert.is_false(r.success)
        assert.is_true(errors.is(r.error, Quota))
        assert.are.equal("QR_QUOTA", r.error.code)
        assert.are.equal(3, r.error.details.limit)
        assert.are.same({ v = 1 }, r.state)
        -- through a chain: wrapped, with the cause still of its class
        r = rt:execute("qc", { v = 1 })
        assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
        assert.is_true(errors.is(r.error.cause, Quota))
        assert.are.equal("q", r.error.details.failedProcessor)
        rt:stop()
      end)
    end)
  end)

  -------------------------------------------------------------- lifecycle
  describe("lifecycle", function()
    it("executeInSession stores the session; unregister + syncProcessors removes a processor; disconnect", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      rt:register(P("p"):process(function(s) s.ok = true return Success(s) end))
      local sid = "sess-" .. prefix
      run(function()
        rt:start()
        local r = rt:executeInSession("p", { x = 1 }, sid)
        assert.is_true(r.success)
        assert.are.equal(sid, r.metadata.sessionId)
        assert.is_true(rt:getState(sid).state.ok)
        assert.is_true(rt:unregister("p"))
        rt:syncProcessors()
        local r2 = rt:execute("p", {})
        assert.is_true(errors.is(r2.error, errors.ProcessorNotFoundError), tostring(r2.error))
        rt:disconnect()
      end)
      assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 }, core._debug_counts())
    end)

    it("executions racing to a processor registered after start share one queue and one worker; stop leaves nothing", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      rt:register(P("first"):process(function(s) return Success(s) end))
      run(function()
        rt:start()
        assert.is_true(rt:execute("first", {}).success)
        -- registered now, not synced: the first executions set its queue up,
        -- several of them at once
        rt:register(P("late"):process(function(s) s.done = true return Success(s) end))
        local states = {}
        for i = 1, 8 do states[i] = { i = i } end
        local rs = rt:executeMany("late", states)
        for i, r in ipairs(rs) do
          assert.is_true(r.success, tostring(r.error))
          assert.are.equal(i, r.state.i)
        end
        local n = 0
        for _ in pairs(rt._workers) do n = n + 1 end
        assert.are.equal(2, n)
        rt:stop()
      end)
      -- a second worker for "late", orphaned by the race, would still poll
      assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 }, core._debug_counts())
    end)

    it("withQueueConfig{ rateLimitRpm } limits the processor's jobs per minute (the third of 2/min waits)", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { concurrency = 5 } }
      rt:register(P("lim"):withQueueConfig{ rateLimitRpm = 2 }:process(function(s) return Success(s) end))
      local done, counts, ttl = 0, nil, nil
      run(function()
        rt:start()
        local hs = {}
        for i = 1, 3 do hs[i] = rt:executeAsync("lim", { i = i }) end
        local me = core.current()
        for i = 1, 3 do
          core.spawn(function()
            hs[i]:wait()
            done = done + 1
            if done == 2 then core.complete_host(me, 0x7404) end
            return true
          end, "root", 0, 0, 1)
        end
        core.wait_host(0x7404)
        local q = rt:getQueues()[1]
        poll(function() return q:getJobCounts().waiting == 1 end, 5000, "the third job to be queued")
        counts = q:getJobCounts()
        local R = connect()
        ttl = R:call("PTTL", "bull:" .. prefix .. "_lim:limiter")
        R:close()
        rt:stop{ graceMs = 0 }
      end)
      assert.are.equal(2, counts.completed)
      assert.are.equal(1, counts.waiting)
      assert.are.equal(0, counts.active)
      assert.is_true(ttl > 1000 and ttl <= 60000, "limiter PTTL " .. tostring(ttl))
    end)

    it("queue:* listeners get the queues' events (queue:added, queue:completed) with the job id", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      rt:register(P("p"):process(function(s) return Success(s) end))
      local seen = {}
      rt:on("queue:added", function(e) seen[#seen + 1] = "added " .. e.jobId end)
      rt:on("queue:completed", function(e) seen[#seen + 1] = "completed " .. e.jobId end)
      local eid
      run(function()
        rt:start()
        eid = rt:execute("p", {}).metadata.executionId
        poll(function() return #seen >= 2 end, 5000, "the events")
        rt:stop()
      end)
      assert.are.same({ "added " .. eid, "completed " .. eid }, seen)
    end)

    it("monitoring = { enableQueueEvents = false }: queue:* listeners get nothing", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent, monitoring = { enableQueueEvents = false } }
      rt:register(P("p"):process(function(s) return Success(s) end))
      local seen = {}
      rt:on("queue:completed", function(e) seen[#seen + 1] = e.jobId end)
      run(function()
        rt:start()
        assert.is_true(rt:execute("p", {}).success)
        -- the reader dispatches queue:completed while it handles the event
        -- that ends execute(), before execute returns: none came
        assert.are.same({}, seen)
        rt:stop()
      end)
    end)

    -- BullMQ's rule: jobs without a priority come first; among prioritized
    -- ones the lower number first.
    it("withQueueConfig{ priority } is the jobs' BullMQ priority (1 before another producer's 5)", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { concurrency = 1 } }
      local order, gate = {}, { open = false }
      rt:register(P("prio"):withQueueConfig{ priority = 1 }:process(function(s)
        if s.hold and not gate.open then
          gate.w = { (core.current()), 0x7001 }
          core.wait_host(0x7001)
        end
        order[#order + 1] = s.tag
        return Success(s)
      end))
      run(function()
        rt:start()
        local first = rt:executeAsync("prio", { hold = true, tag = "first" })
        poll(function() return gate.w ~= nil end, 5000, "the first job to hold the worker")
        -- a job from another producer, in the same queue, with priority 5
        local q = am2z.queue.Queue.new(prefix .. "_prio", { connection = { url = URL, logger = silent } })
        q:add("prio", { processorName = "prio", state = { tag = "five" }, executionId = "five-1",
                        callContext = { depth = 0 } }, { jobId = "five-1", priority = 5 })
        local urgent = rt:executeAsync("prio", { tag = "urgent" })
        poll(function() return q:getJobCounts().prioritized == 2 end, 5000, "both jobs to be queued")
        gate.open = true
        core.complete_host(gate.w[1], gate.w[2])
        assert.is_true(first:wait().success)
        assert.is_true(urgent:wait().success)
        poll(function() return #order == 3 end, 5000, "the other producer's job")
        q:close()
        rt:stop()
      end)
      assert.are.same({ "first", "urgent", "five" }, order)
    end)
  end)

  -------------------------------------------------------------- races
  describe("races", function()
    it("cancel right after executeAsync (before the job is enqueued) cancels it", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local ran = false
      rt:register(P("p"):process(function(s) ran = true return Success(s) end))
      local r
      run(function()
        rt:start()
        local h = rt:executeAsync("p", {})
        assert.is_true(h:cancel())
        r = h:wait()
        rt:stop()
      end)
      assert.is_true(errors.is(r.error, errors.CancelledError), tostring(r.error))
      assert.is_false(ran)
    end)

    -- The add is cut off by the parent's timeout, but Redis runs it later:
    -- the parent's clean-up, right behind it on the same connection, takes
    -- the child out of its queue before any worker can.
    it("a parent timed out while its child's add is on its way: the child never runs and is removed", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      local gate, kid_ran = {}, false
      local T = math.min(300 * MULT, 2000)
      rt:register(P("kid"):process(function(s) kid_ran = true return Success(s) end))
      rt:register(P("mom"):withTimeout(T):process(function(s, ctx)
        gate.w = { (core.current()), 0x7201 }
        core.wait_host(0x7201)
        return ctx:call("kid", s)
      end))
      local r, h, counts
      run(function()
        -- As after a Redis restart: no script is loaded. One loaded on first
        -- use would reach Redis a round trip late, after a worker took the job.
        local F = connect()
        F:call("SCRIPT", "FLUSH")
        F:close()
        rt:start()
        h = rt:executeAsync("mom", {})
        poll(function() return gate.w ~= nil end, 5000, "the parent to start")
        -- Writes (scripts included) wait until the pause ends, well after
        -- the parent's timeout: the add is in flight when it fires.
        local R = connect()
        assert(R:call("CLIENT", "PAUSE", T + math.min(700 * MULT, 2000), "WRITE"))
        core.complete_host(gate.w[1], gate.w[2])
        r = h:wait()
        local child = "bull:" .. prefix .. "_kid:" .. h.executionId .. ".1"
        poll(function() return R:call("EXISTS", child) == 0 end, 5000 + T, "the child job to be removed")
        counts = R:call("ZCARD", "bull:" .. prefix .. "_kid:completed") + R:call("ZCARD", "bull:" .. prefix .. "_kid:failed")
        R:close()
        rt:stop()
      end, 20000)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.is_false(kid_ran)
      assert.are.equal(0, counts)
    end)

    it("calls an aborted parent makes while it unwinds are not started (as on LocalRuntime)", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      local fb_ran, late = false, nil
      rt:register(P("slow"):process(function(s, ctx)
        if not ctx:sleep(60000) then return Failure(ctx.signal.reason) end
        return Success(s)
      end))
      rt:register(P("fallback"):process(function(s) fb_ran = true return Success(s) end))
      rt:register(P("mom"):withTimeout(100 * MULT):process(function(s, ctx)
        local r = ctx:call("slow", s)
        if not r.success then late = ctx:call("fallback", s) end
        return r
      end))
      local r, left
      run(function()
        rt:start()
        r = rt:execute("mom", {})
        poll(function() return late ~= nil end, 5000, "the parent's body to unwind")
        local R = connect()
        poll(function() return R:call("EXISTS", "bull:" .. prefix .. "_slow:" .. r.metadata.executionId .. ".1") == 0 end,
          5000, "the first child to be removed")
        left = R:call("KEYS", "bull:" .. prefix .. "_fallback:" .. r.metadata.executionId .. "*")
        R:close()
        rt:stop()
      end, 20000)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.is_false(late.success)
      assert.is_false(fb_ran)
      assert.are.same({}, left)
    end)

    it("a parent timed out while its child still waits in the queue: the child is removed, nothing is kept for it", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      local gate, kid_runs = {}, 0
      rt:register(P("kid"):withQueueConfig{ concurrency = 1 }:process(function(s)
        kid_runs = kid_runs + 1
        if s.block then
          gate.w = { (core.current()), 0x7202 }
          core.wait_host(0x7202)
        end
        return Success(s)
      end))
      rt:register(P("mom"):withTimeout(100 * MULT):process(function(s, ctx) return ctx:call("kid", s) end))
      local r, orphans
      run(function()
        rt:start()
        local blocker = rt:executeAsync("kid", { block = true })
        poll(function() return gate.w ~= nil end, 5000, "the blocker to take the only slot")
        r = rt:execute("mom", {})
        local R = connect()
        local child = "bull:" .. prefix .. "_kid:" .. r.metadata.executionId .. ".1"
        poll(function() return R:call("EXISTS", child) == 0 end, 5000, "the queued child to be removed")
        poll(function() return next(rt._orphans) == nil end, 5000, "nothing to be kept for it")
        orphans = next(rt._orphans)
        R:close()
        core.complete_host(gate.w[1], gate.w[2])
        assert.is_true(blocker:wait().success)
        rt:stop()
      end, 20000)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.is_nil(orphans)
      assert.are.equal(1, kid_runs)
    end)

    it("stop() while an execution sets up a processor's queue: the execution ends, nothing hangs", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      rt:register(P("a"):process(function(s) return Success(s) end))
      local ran, r, in_setup = false, nil, false
      run(function()
        rt:start()
        assert.is_true(rt:execute("a", {}).success)
        rt:register(P("late"):process(function(s) ran = true return Success(s) end))
        local h = rt:executeAsync("late", {})
        for _ = 1, 1000 do
          local q = rt._queues.late
          if q and q._setup then in_setup = true break end
          core.yield()
        end
        rt:stop{ graceMs = 0 }
        r = h:wait()
      end, 10000)
      assert.is_true(in_setup, "the execution never reached its queue's set-up")
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.CancelledError), tostring(r.error))
      assert.is_false(ran)
    end)

    it("unregister + syncProcessors while a parent waits on its child: the parent still finishes", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local gate = {}
      rt:register(P("kid"):process(function(s)
        if not gate.open then
          gate.w = { (core.current()), 0x7101 }
          core.wait_host(0x7101)
        end
        s.kid = true
        return Success(s)
      end))
      rt:register(P("mom"):process(function(s, ctx) return ctx:call("kid", s) end))
      local r
      run(function()
        rt:start()
        local h = rt:executeAsync("mom", {})
        poll(function() return gate.w ~= nil end, 5000, "the child to start")
        rt:unregister("mom")
        rt:syncProcessors()      -- closes mom's worker: it must wait for the parent
        gate.open = true
        core.complete_host(gate.w[1], gate.w[2])
        r = h:wait()
        rt:stop()
      end)
      assert.is_true(r.success, tostring(r.error))
      assert.is_true(r.state.kid)
    end)

    it("a worker runtime's stop takes no new jobs during the grace and fails none; another worker finishes them", function()
      local prefix = fresh()
      local w1_started = 0
      local function nap(count)
        return P("nap"):process(function(s, ctx)
          if count then w1_started = w1_started + 1 end
          ctx:sleep(60)
          return Success(s)
        end)
      end
      local producer_rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { enabled = false } }
      producer_rt:register(nap())
      local w1 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { concurrency = 3 } }
      w1:register(nap(true))
      local w2 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { concurrency = 3 } }
      w2:register(nap())
      local results, counts, at_stop, after_stop = {}, nil, nil, nil
      run(function()
        w1:start()
        producer_rt:start()
        local hs = {}
        for i = 1, 30 do hs[i] = producer_rt:executeAsync("nap", { i = i }) end
        local q = producer_rt:getQueues()[1]
        poll(function() return q:getJobCounts().completed >= 3 end, 5000, "some jobs to complete")
        at_stop = w1_started
        w1:stop{ graceMs = 1000 }        -- its 3 in flight finish; it takes no more
        after_stop = w1_started
        counts = q:getJobCounts()
        w2:start()
        for i, h in ipairs(hs) do results[i] = h:wait() end
        w2:stop()
        producer_rt:stop()
      end, 20000)
      assert.are.equal(0, counts.failed)
      assert.are.equal(0, counts.active)
      assert.are.equal(30, counts.completed + counts.waiting)
      -- none started once the stop began (a job its last finishes fetched
      -- went back)
      assert.are.equal(at_stop, after_stop)
      for i = 1, 30 do assert.is_true(results[i].success, tostring(results[i].error)) end
    end)

    it("a job another producer waits for, cut off by a worker's stop deadline, goes back and completes elsewhere", function()
      local prefix = fresh()
      local runs = 0
      local function long()
        return P("long"):process(function(s, ctx)
          runs = runs + 1
          -- the first run lasts until the stop deadline cuts it off
          if not ctx:sleep(runs == 1 and 60000 or 10) then return Failure(ctx.signal.reason) end
          return Success(s)
        end)
      end
      local producer_rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { enabled = false } }
      producer_rt:register(long())
      local w1 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      w1:register(long())
      local w2 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      w2:register(long())
      local r, counts
      run(function()
        w1:start()
        producer_rt:start()
        local h = producer_rt:executeAsync("long", {})
        poll(function() return runs == 1 end, 5000, "the job to start")
        w1:stop{ graceMs = 50 }
        counts = producer_rt:getQueues()[1]:getJobCounts()
        w2:start()
        r = h:wait()
        w2:stop()
        producer_rt:stop()
      end, 20000)
      assert.are.equal(0, counts.failed)
      assert.are.equal(1, counts.waiting)
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(2, runs)
    end)

    it("a draining worker at concurrency 1 still reaches its own child behind another producer's job", function()
      local prefix = fresh()
      local kid_ran = false
      local function defs()
        return {
          P("kid"):process(function(s) kid_ran = true s.kid = true return Success(s) end),
          P("mom"):process(function(s, ctx)
            ctx:sleep(150)
            return ctx:call("kid", s)
          end),
        }
      end
      local w1 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { concurrency = 1 } }
      w1:registerMany(defs())
      local r
      run(function()
        w1:start()
        local h = w1:executeAsync("mom", {})
        poll(function() return next(w1._jobs) ~= nil end, 5000, "mom to start")
        -- another producer's job waits in kid's queue ahead of mom's child
        local q = am2z.queue.Queue.new(prefix .. "_kid", { connection = { url = URL, logger = silent } })
        q:add("kid", { processorName = "kid", state = { foreign = true }, executionId = "foreign-1",
                       callContext = { depth = 0 } }, { jobId = "foreign-1" })
        core.spawn(function() w1:stop{ graceMs = 3000 } return true end, "root", 0, 0, 1)
        r = h:wait()
        q:close()
      end, 15000)
      assert.is_true(r.success, tostring(r.error))
      assert.is_true(kid_ran)
    end)

    it("a job given back at a stop deadline keeps its finished children: they do not run twice", function()
      local prefix = fresh()
      local runs = { kid1 = 0, kid2 = 0, mom = 0 }
      local function defs()
        return {
          P("kid1"):process(function(s) runs.kid1 = runs.kid1 + 1 s.k1 = true return Success(s) end),
          P("kid2"):process(function(s, ctx)
            runs.kid2 = runs.kid2 + 1
            if not ctx:sleep(runs.kid2 == 1 and 60000 or 10) then return Failure(ctx.signal.reason) end
            s.k2 = true
            return Success(s)
          end),
          P("mom"):process(function(s, ctx)
            runs.mom = runs.mom + 1
            local r = ctx:call("kid1", s)
            if not r.success then return Failure(r.error) end
            return ctx:call("kid2", r.state)
          end),
        }
      end
      local producer_rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent, worker = { enabled = false } }
      producer_rt:registerMany(defs())
      local w1 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      w1:registerMany(defs())
      local w2 = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      w2:registerMany(defs())
      local r
      run(function()
        w1:start()
        producer_rt:start()
        local h = producer_rt:executeAsync("mom", {})
        poll(function() return runs.kid2 == 1 end, 5000, "kid2 to start")
        w1:stop{ graceMs = 50 }
        w2:start()
        r = h:wait()
        w2:stop()
        producer_rt:stop()
      end, 20000)
      assert.is_true(r.success, tostring(r.error))
      assert.is_true(r.state.k1 and r.state.k2)
      assert.are.equal(1, runs.kid1, "kid1 ran again")
      assert.are.equal(2, runs.mom)
    end)

    it("an execution pinned to a registry that still has a since-unregistered child gets it run", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      local gate = {}
      rt:register(P("kid"):process(function(s) s.kid = true return Success(s) end))
      rt:register(P("mom"):process(function(s, ctx)
        if not gate.open then
          gate.w = { (core.current()), 0x7606 }
          core.wait_host(0x7606)
        end
        return ctx:call("kid", s)
      end))
      local r
      run(function()
        rt:start()
        local h = rt:executeAsync("mom", {})
        poll(function() return gate.w ~= nil end, 5000, "mom to start")
        rt:unregister("kid")
        rt:syncProcessors()
        gate.open = true
        core.complete_host(gate.w[1], gate.w[2])
        r = h:wait()
        rt:stop()
      end)
      assert.is_true(r.success, tostring(r.error))
      assert.is_true(r.state.kid)
    end)

    it("two stop() calls at once both return", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      rt:register(P("nap"):process(function(s, ctx) ctx:sleep(100) return Success(s) end))
      local done = 0
      run(function()
        rt:start()
        rt:executeAsync("nap", {})
        local me, token = core.current(), 0x7202
        for _ = 1, 2 do
          core.spawn(function()
            rt:stop{ graceMs = 2000 }
            done = done + 1
            if done == 2 then core.complete_host(me, token) end
            return true
          end, "root", 0, 0, 1)
        end
        core.wait_host(token)
      end)
      assert.are.equal(2, done)
    end)

    it("bad worker options raise at new, not later", function()
      local ok, e = pcall(am2z.QueueRuntime.new, { worker = { lockDuration = "30s" } })
      assert.is_false(ok)
      assert.matches("worker.lockDuration", tostring(e), 1, true)
      ok, e = pcall(am2z.QueueRuntime.new, { worker = { bogus = 1 } })
      assert.is_false(ok)
      assert.matches("worker.bogus", tostring(e), 1, true)
    end)

    it("execution ids differ between processes started at the same moment", function()
      local cmd = ("%s -e 'print(require(\"am2z.executor\").newExecutionId())'"):format(AM2Z_LUA)
      local p = io.popen(("(%s & %s & wait) 2>&1"):format(cmd, cmd))
      local out = p:read("*a")
      p:close()
      local a, b = out:match("(%S+)%s+(%S+)")
      assert.is_string(a)
      assert.are_not.equal(a, b)
    end)
  end)

  -------------------------------------------------------------- bad input
  describe("bad input", function()
    it("a state that is not JSON fails with the path, and nothing is enqueued", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = fresh(),
        logger = silent }
      rt:register(P("p"):process(function(s) return Success(s) end))
      run(function()
        rt:start()
        local r = rt:execute("p", { items = { { price = function() end } } })
        assert.is_true(errors.is(r.error, errors.ValidationError), tostring(r.error))
        assert.matches("items[1].price", r.error.message, 1, true)
        local c = rt:getQueues()[1]:getJobCounts()
        assert.are.equal(0, c.waiting + c.active + c.completed + c.failed)
        rt:stop()
      end)
    end)

    it("Redis unreachable: NetworkError results within the connect timeout, never a hang", function()
      local rt = am2z.QueueRuntime.new{ redis = { url = "redis://127.0.0.1:1", connectTimeout = 500,
        logger = silent }, queuePrefix = fresh(), logger = silent }
      rt:register(P("p"):process(function(s) return Success(s) end))
      local r, r2, elapsed
      run(function()
        local t0 = am2z.now()
        rt:start()
        r = rt:execute("p", {})
        r2 = rt:execute("p", {})
        elapsed = am2z.now() - t0
        rt:stop()
      end)
      assert.is_true(errors.is(r.error, errors.NetworkError), tostring(r.error))
      assert.is_true(errors.is(r2.error, errors.NetworkError), tostring(r2.error))
      assert.matches("127.0.0.1:1", r.error.message, 1, true)
      assert.is_true(elapsed < 3000 * MULT, "took " .. elapsed .. " ms")
    end)

    it("Redis killed while an execution waits: a NetworkError result after the command timeout", function()
      -- a redis-server of this test's own, to kill
      local srv = require("redis_server").start()
      local url = srv.url
      local rt = am2z.QueueRuntime.new{ redis = { url = url, commandTimeout = 1000, logger = silent },
        queuePrefix = fresh(), logger = silent }
      local started = false
      rt:register(P("long"):process(function(s, ctx)
        started = true
        ctx:sleep(5000)
        return Success(s)
      end))
      local r, elapsed
      local ok, e = pcall(run, function()
        rt:start()
        local h = rt:executeAsync("long", {})
        poll(function() return started end, 5000, "the execution to start")
        local t0 = am2z.now()
        srv:kill()
        r = h:wait()
        elapsed = am2z.now() - t0
        rt:stop{ graceMs = 0 }
      end, 20000)
      srv:cleanup()
      assert(ok, e)
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.NetworkError), tostring(r.error))
      assert.is_true(elapsed >= 1000, "after " .. elapsed .. " ms")
      assert.is_true(elapsed < 4500 * MULT, "after " .. elapsed .. " ms")
    end)

    it("a malformed job written by another producer fails alone; the next execution works", function()
      local prefix = fresh()
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      rt:register(P("p"):process(function(s) s.ok = true return Success(s) end))
      run(function()
        rt:start()
        assert.is_true(rt:execute("p", {}).success)
        local q = am2z.queue.Queue.new(prefix .. "_p", { connection = { url = URL, logger = silent } })
        local ev = am2z.queue.QueueEvents.new(prefix .. "_p", { connection = { url = URL, logger = silent } })
        ev:waitUntilReady()
        local job = q:add("p", { hello = "world" })
        local v, err = job:waitUntilFinished(ev, 5000 * MULT)
        assert.is_nil(v)
        assert.matches("not an am2z job", tostring(err), 1, true)
        local r = rt:execute("p", { again = true })
        assert.is_true(r.success, tostring(r.error))
        ev:close()
        q:close()
        rt:stop()
      end)
    end)

    it("misuse raises with a message naming the option", function()
      local function raised(fn)
        local ok, e = pcall(fn)
        assert.is_false(ok)
        return tostring(e)
      end
      assert.matches("unknown option", raised(function() am2z.QueueRuntime.new{ bogus = 1 } end), 1, true)
      assert.matches("queuePrefix", raised(function() am2z.QueueRuntime.new{ queuePrefix = "a:b" } end), 1, true)
      assert.matches("worker.concurrency",
        raised(function() am2z.QueueRuntime.new{ worker = { concurrency = 0 } } end), 1, true)
      assert.matches("executeInSession",
        raised(function() am2z.QueueRuntime.new{}:executeInSession("p", {}, 5) end), 1, true)
    end)
  end)

  -------------------------------------------------------------- state
  describe("RedisStateManager", function()
    local function sm()
      return am2z.RedisStateManager.new({ url = URL, logger = silent }, "qrstate:" .. fresh())
    end

    it("set/get/exists/getVersion/delete; get returns a fresh copy", function()
      local m = sm()
      run(function()
        assert.is_nil(m:get("s"))
        assert.is_false(m:exists("s"))
        assert.are.equal(1, m:set("s", { b = 2, a = { 1, 2 } }))
        assert.are.equal(2, m:set("s", { b = 3 }))
        local g = m:get("s")
        assert.are.same({ state = { b = 3 }, version = 2 }, g)
        g.state.b = 99
        assert.are.equal(3, m:get("s").state.b)
        assert.is_true(m:exists("s"))
        assert.are.equal(2, m:getVersion("s"))
        assert.is_true(m:delete("s"))
        assert.is_nil(m:get("s"))
        m:close()
      end)
    end)

    it("concurrent first use opens one connection, which close() closes", function()
      local m = sm()
      local function open_count()
        local n = 0
        for _ in pairs(am2z.redis._open) do n = n + 1 end
        return n
      end
      run(function()
        local before = open_count()
        local left, me = 3, core.current()
        for i = 1, 3 do
          core.spawn(function()
            m:set("s" .. i, { i = i })
            left = left - 1
            if left == 0 then core.complete_host(me, 0x7303) end
            return true
          end, "root", 0, 0, 1)
        end
        core.wait_host(0x7303)
        assert.are.equal(before + 1, open_count())
        m:close()
        assert.are.equal(before, open_count())
      end)
    end)

    it("a commit replayed under the same execution id does not bump the version again", function()
      local m = sm()
      run(function()
        assert.are.equal(1, m:set("s", { v = 1 }, "exec-1"))
        assert.are.equal(1, m:set("s", { v = 1 }, "exec-1"))
        assert.are.equal(2, m:set("s", { v = 2 }, "exec-2"))
        assert.are.equal(2, m:getVersion("s"))
        m:close()
      end)
    end)

    it("update is a compare-and-set: 10 concurrent increments from two connections all count", function()
      local m1 = sm()
      local m2 = am2z.RedisStateManager.new({ url = URL, logger = silent }, m1._prefix)
      local errs = {}
      run(function()
        m1:set("c", { n = 0 })
        m2:get("c")                 -- both connected before the race
        local left = 10
        local waiter
        for i = 1, 10 do
          local m = i % 2 == 0 and m1 or m2
          core.spawn(function()
            local ok, e = pcall(m.update, m, "c", function(s)
              am2z.sleep(1)         -- let the other writers interleave
              s.n = s.n + 1
              return s
            end)
            if not ok then errs[#errs + 1] = tostring(e) end
            left = left - 1
            if left == 0 and waiter then core.complete_host(waiter, 0x7777) end
            return true
          end, "root", 0, 0, 1)
        end
        waiter = core.current()
        core.wait_host(0x7777)
        local g = m1:get("c")
        assert.are.same({}, errs)
        assert.are.equal(10, g.state.n)
        assert.are.equal(11, g.version)
        m1:close()
        m2:close()
      end, 20000)
    end)

    it("a stored state that does not match its hash is an integrity error", function()
      local m = sm()
      run(function()
        m:set("s", { v = 1 })
        local R = connect()
        R:call("HSET", m._prefix .. ":s", "state", '{"v":2}')
        local ok, e = pcall(m.get, m, "s")
        assert.is_false(ok)
        assert.are.equal("StateIntegrityError", e.name)
        assert.matches("does not match its hash", e.message, 1, true)
        R:close()
        m:close()
      end)
    end)

    it("keeps numbers exact", function()
      local m = sm()
      run(function()
        m:set("n", { id = 123456789012345, x = 0.1 + 0.2 })
        local g = m:get("n")
        assert.are.equal(123456789012345, g.state.id)
        assert.are.equal(0.1 + 0.2, g.state.x)
        m:close()
      end)
    end)

    it("the hash is SHA-256 over canonical JSON (sorted keys): equal states, equal hashes", function()
      local rs = require("am2z.redis_state")
      assert.are.equal('{"a":[1,2],"b":{"c":true,"d":"x"}}',
        rs.canonicalJSON({ b = { d = "x", c = true }, a = { 1, 2 } }))
      assert.are.equal(rs.stateHash({ x = 1, y = 2 }), rs.stateHash({ y = 2, x = 1 }))
      assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", core.sha256("abc"))
    end)
  end)
end)
