-- The binding protocol between Lua and the engine (am2z.run, am2z.sleep,
-- am2z.now and the am2z.core primitives that the runtimes are built on):
-- what a caller gets back, and the clear errors that replace hangs when a
-- wait is made from the wrong place. After every test the engine holds no
-- executions, timers, anchored coroutines or stored results.

local am2z = require("am2z")
local core = require("am2z.core")
local errors = am2z.errors

-- Upper bounds of duration windows stretch with AM2Z_TEST_TIMEOUT_MULT
-- (slow runs under ASan/valgrind); lower bounds never do.
local SLOW = TEST_TIMEOUT_MS / 5000

local function run(fn)
  return am2z.run(fn, { timeoutMs = TEST_TIMEOUT_MS })
end

local function assert_engine_idle()
  assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 }, core._debug_counts())
end

local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return err
end

describe("engine protocol", function()
  after_each(function()
    assert_engine_idle()
  end)

  describe("am2z.run", function()
    it("returns every value fn returns, nils included", function()
      local n, a, b, c = (function(...) return select("#", ...), ... end)(
        run(function() return 1, nil, "three" end))
      assert.are.equal(3, n)
      assert.are.equal(1, a)
      assert.is_nil(b)
      assert.are.equal("three", c)
    end)

    it("re-raises a string error from fn with fn's traceback", function()
      local function deep_failure() error("deliberate failure") end
      local err = raised(am2z.run, function() deep_failure() end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.is_string(err)
      assert.matches("deliberate failure", err, 1, true)
      assert.matches("stack traceback", err, 1, true)
      assert.matches("deep_failure", err, 1, true)
    end)

    it("re-raises an error object unchanged", function()
      local e = errors.BusinessError("CODE", "as an object")
      local got = raised(am2z.run, function() error(e) end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.are.equal(e, got)
    end)

    it("raises a clear error when nested inside an engine coroutine", function()
      local msg
      run(function()
        local ok, e = pcall(am2z.run, function() return 1 end)
        assert.is_false(ok)
        msg = tostring(e)
      end)
      assert.matches("already inside an engine coroutine", msg, 1, true)
    end)

    it("raises a clear error when nested inside a processor body", function()
      local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
      local msg
      rt:register(am2z.createProcessor("nests"):process(function(s)
        local ok, e = pcall(am2z.run, function() end)
        msg = not ok and tostring(e) or "no error"
        return am2z.Success(s)
      end))
      run(function()
        rt:start()
        assert.is_true(rt:execute("nests", {}).success)
        rt:stop()
      end)
      assert.matches("already inside an engine coroutine", msg, 1, true)
    end)

    it("fails with 'timed out' when fn outlives timeoutMs", function()
      local err = raised(am2z.run, function() am2z.sleep(5000) end, { timeoutMs = 50 })
      assert.matches("timed out after 50 ms", tostring(err), 1, true)
      -- the abandoned fn was cancelled: its sleep returned, nothing is left
      -- behind once the loop runs again
      run(function() core.yield() end)
    end)

    it("raises 'can never happen' instead of hanging when fn waits on nothing", function()
      -- Run in a child process so that a regression hangs only the child,
      -- which `timeout` then kills; the test stays bounded either way.
      local script = ([[
        package.path = %q
        package.cpath = %q
        local am2z = require("am2z")
        local core = require("am2z.core")
        local after = 0
        local ok, err = pcall(am2z.run, function()
          core.wait_host(424242)   -- nobody will ever complete this token
          after = after + 1
        end)
        io.write("ok=", tostring(ok), "\n", "err=", tostring(err), "\n")
        am2z.run(function() core.yield() end)   -- let the cancelled fn finish
        local c = core._debug_counts()
        io.write(("after=%%d execs=%%d timers=%%d threads=%%d results=%%d\n"):format(
          after, c.execs, c.timers, c.threads, c.results))
      ]]):format(package.path, package.cpath)
      local path = os.tmpname()
      local f = assert(io.open(path, "w"))
      f:write(script)
      f:close()
      local secs = math.max(5, math.ceil(TEST_TIMEOUT_MS / 1000))
      local p = assert(io.popen(("timeout %d luajit %s 2>&1; echo exit=$?"):format(secs, path)))
      local out = p:read("*a")
      p:close()
      os.remove(path)
      assert.matches("exit=0", out, 1, true)
      assert.matches("ok=false", out, 1, true)
      assert.matches("can never happen", out, 1, true)
      assert.matches("after=1 execs=0 timers=0 threads=0 results=0", out, 1, true)
    end)

    it("rejects a non-function and bad options with clear messages", function()
      assert.matches("am2z.run: expected a function, got number", raised(am2z.run, 42), 1, true)
      assert.matches("timeoutMs", tostring(raised(am2z.run, function() end, { timeoutMs = -1 })), 1, true)
    end)
  end)

  describe("am2z.sleep, am2z.now", function()
    it("am2z.sleep outside an engine coroutine raises a clear error", function()
      local err = raised(am2z.sleep, 10)
      assert.matches("am2z.sleep: must be called inside an engine coroutine", tostring(err), 1, true)
    end)

    it("am2z.sleep from a plain coroutine inside am2z.run raises instead of hanging", function()
      local msg
      run(function()
        local co = coroutine.create(function() return am2z.sleep(5) end)
        local ok, e = coroutine.resume(co)
        assert.is_false(ok)
        msg = tostring(e)
      end)
      assert.matches("inside an engine coroutine", msg, 1, true)
    end)

    it("ctx:sleep from a coroutine.wrap created by the processor raises a clear error", function()
      local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
      local msg
      rt:register(am2z.createProcessor("wraps"):process(function(s, ctx)
        local ok, e = pcall(coroutine.wrap(function() return ctx:sleep(5) end))
        msg = not ok and tostring(e) or "no error"
        -- the execution's own coroutine can still wait afterwards
        assert(ctx:sleep(1))
        return am2z.Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("wraps", {})
        rt:stop()
      end)
      assert.is_true(r.success, tostring(r.error))
      assert.matches("coroutine the engine does not run", msg, 1, true)
    end)

    it("am2z.now() is a monotonic clock in milliseconds", function()
      local prev = am2z.now()
      assert.is_number(prev)
      for _ = 1, 1000 do
        local t = am2z.now()
        assert.is_true(t >= prev)
        prev = t
      end
    end)

    it("am2z.sleep(20) takes at least 20 ms and returns true", function()
      local ok, elapsed
      run(function()
        local t0 = am2z.now()
        ok = am2z.sleep(20)
        elapsed = am2z.now() - t0
      end)
      assert.is_true(ok)
      assert.is_true(elapsed >= 20, "slept " .. elapsed .. " ms")
      assert.is_true(elapsed < 1000 * SLOW, "slept " .. elapsed .. " ms")
    end)

    it("am2z.sleep rejects a negative or NaN duration", function()
      run(function()
        assert.matches("milliseconds", tostring(raised(am2z.sleep, -1)), 1, true)
        assert.matches("milliseconds", tostring(raised(am2z.sleep, 0 / 0)), 1, true)
      end)
    end)
  end)

  describe("am2z.core primitives", function()
    it("core.cancel of an unknown id returns false", function()
      assert.is_false(core.cancel(987654321))
      run(function() assert.is_false(core.cancel(987654322)) end)
    end)

    it("a stale core.complete_host (wrong token, or twice) returns false and resumes nothing", function()
      local resumed, id, outcome = 0, nil, nil
      run(function()
        local token = 777001
        id = core.spawn(function()
          local ok, why = core.wait_host(token)
          resumed = resumed + 1
          return { ok = ok, why = why }, true
        end, "child", 0, 0, 1)
        core.yield()                         -- let the child start and suspend
        assert.are.equal("running", core.status(id))
        assert.is_false(core.complete_host(id, token + 1))
        core.yield()
        assert.are.equal(0, resumed)
        assert.are.equal("running", core.status(id))
        assert.is_true(core.complete_host(id, token))
        assert.is_false(core.complete_host(id, token))   -- duplicate
        local cid, status, res = core.wait_child()
        assert.are.equal(id, cid)
        assert.are.equal("OK", status)
        outcome = res
      end)
      assert.are.equal(1, resumed)
      assert.is_true(outcome.ok)
      assert.is_false(core.complete_host(id, 777001))    -- gone
    end)

    it("core.cancel settles a waiting child as ECANCELED and wakes its sleep at once; a second cancel returns false", function()
      local body = {}
      local status
      run(function()
        local id = core.spawn(function()
          local t0 = am2z.now()
          body.ok, body.why = core.sleep(60000)
          body.slept = am2z.now() - t0
          body.runs = (body.runs or 0) + 1
          return true, true
        end, "child", 0, 0, 1)
        core.yield()                         -- the child is now sleeping
        assert.is_true(core.cancel(id))
        assert.is_false(core.cancel(id))
        local _
        _, status = core.wait_child()
        core.yield()                         -- the woken child runs before us
      end)
      assert.are.equal("ECANCELED", status)
      assert.is_nil(body.ok)
      assert.are.equal("ECANCELED", body.why)
      assert.is_true(body.slept < 1000 * SLOW, "slept " .. tostring(body.slept) .. " ms")
      assert.are.equal(1, body.runs)
    end)

    it("a child with a timeout settles with ETIMEDOUT at its deadline", function()
      local status, elapsed
      run(function()
        local t0 = am2z.now()
        core.spawn(function() core.sleep(60000) return true, true end, "child", 40, 0, 1)
        local _
        _, status = core.wait_child()
        elapsed = am2z.now() - t0
      end)
      assert.are.equal("ETIMEDOUT", status)
      assert.is_true(elapsed >= 40 and elapsed < 1000 * SLOW, "settled after " .. elapsed .. " ms")
    end)
  end)
end)
