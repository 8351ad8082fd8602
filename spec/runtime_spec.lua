-- LocalRuntime behaviour that users rely on (API.md "Runtimes", "Context",
-- "Precise rules"). Every test builds its own runtime, drives the loop with
-- am2z.run under TEST_TIMEOUT_MS, stops the runtime in after_each and then
-- checks that the engine holds nothing any more (executions, timers,
-- anchored coroutines, stored results): a leak or a late resume shows up
-- there even when the test itself passed.
--
-- Synchronisation between the test and a processor is by events (a signal
-- fired by one coroutine and waited on by another, results, handles), never
-- by sleeping in the test. Durations are asserted as windows with a lower
-- bound.

local am2z = require("am2z")
local factory = require("runtime_factory")
local new_runtime = factory.new
local core = require("am2z.core")
local errors = am2z.errors
local Success, Failure = am2z.Success, am2z.Failure
local P = am2z.createProcessor

-- Upper bounds of duration windows stretch with AM2Z_TEST_TIMEOUT_MULT
-- (slow runs under ASan/valgrind); lower bounds never do.
local SLOW = TEST_TIMEOUT_MS / 5000

local function run(fn)
  return am2z.run(fn, { timeoutMs = TEST_TIMEOUT_MS })
end

local function assert_engine_idle()
  assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 }, core._debug_counts())
end

-- A one-shot event between engine coroutines: wait() suspends the caller
-- (core.wait_host) until some other coroutine calls fire(). `count` tells
-- how often fire() was called, so it doubles as a "ran N times" counter.
local signal_token = 0x100000
local function new_signal()
  local s = { fired = false, count = 0 }
  function s.fire(value)
    s.count = s.count + 1
    if s.fired then return end
    s.fired, s.value = true, value
    local w = s.waiter
    s.waiter = nil
    if w then core.complete_host(w[1], w[2]) end
  end
  function s.wait()
    if not s.fired then
      signal_token = signal_token + 1
      s.waiter = { (core.current()), signal_token }
      local ok, why = core.wait_host(signal_token)
      assert(ok, "waiting for a signal was interrupted: " .. tostring(why))
    end
    return s.value
  end
  return s
end

local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function assert_error_class(r, Class)
  assert.is_false(r.success, "expected a failed result")
  assert.is_true(errors.is(r.error, Class),
    ("expected %s, got %s"):format(Class.name, tostring(r.error)))
end

local function echo(name)
  return P(name):process(function(s) return Success(s) end)
end

describe(factory.name, function()
  local rt

  before_each(function()
    rt = new_runtime{ logger = am2z.createSilentLogger() }
  end)

  after_each(function()
    run(function() rt:stop{ graceMs = 1000 } end)
    rt = nil
    assert_engine_idle()
  end)

  ---------------------------------------------------------------- execute
  describe("execute", function()
    it("returns { success, state, error, executionTime, metadata } for a success", function()
      rt:register(P("work"):process(function(s, ctx)
        assert(ctx:sleep(20))
        s.done = true
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("work", { n = 1 }, "sess-1")
      end)
      assert.is_true(r.success)
      assert.is_nil(r.error)
      assert.are.equal(1, r.state.n)
      assert.is_true(r.state.done)
      assert.is_number(r.executionTime)
      assert.is_true(r.executionTime >= 20, "executionTime " .. r.executionTime)
      assert.is_true(r.executionTime < 1000 * SLOW, "executionTime " .. r.executionTime)
      local m = r.metadata
      assert.are.equal("work", m.processorName)
      assert.are.equal("sess-1", m.sessionId)
      assert.are.equal(1, m.attempt)
      assert.is_string(m.executionId)
      assert.is_nil(m.executionId:find(":", 1, true))
      assert.is_number(m.startedAt)
    end)

    it("gives every execution its own executionId, matching ctx.meta.executionId", function()
      local seen = {}
      rt:register(P("id"):process(function(s, ctx)
        seen[#seen + 1] = ctx.meta.executionId
        return Success(s)
      end))
      local r1, r2
      run(function()
        rt:start()
        r1 = rt:execute("id", {})
        r2 = rt:execute("id", {})
      end)
      assert.are.equal(seen[1], r1.metadata.executionId)
      assert.are.equal(seen[2], r2.metadata.executionId)
      assert.are_not.equal(r1.metadata.executionId, r2.metadata.executionId)
    end)

    it("ctx.meta carries processorName, executionId, sessionId, attempt, startedAt", function()
      local meta
      rt:register(P("meta"):process(function(s, ctx)
        meta = ctx.meta
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("meta", {}, "s-meta")
      end)
      assert.are.equal("meta", meta.processorName)
      assert.are.equal(r.metadata.executionId, meta.executionId)
      assert.are.equal("s-meta", meta.sessionId)
      assert.are.equal(1, meta.attempt)
      assert.is_number(meta.startedAt)
    end)

    it("an unknown processor gives a failed result with ProcessorNotFoundError listing the registered names", function()
      rt:register(echo("alpha")):register(echo("beta"))
      local r
      run(function()
        rt:start()
        r = rt:execute("nope", { x = 1 })
      end)
      assert_error_class(r, errors.ProcessorNotFoundError)
      assert.matches("nope", r.error.message, 1, true)
      assert.matches("alpha", r.error.message, 1, true)
      assert.matches("beta", r.error.message, 1, true)
      assert.are.same({ "alpha", "beta" }, r.error.details.availableProcessors)
      assert.are.same({ x = 1 }, r.state)
      assert.are.equal("nope", r.metadata.processorName)
    end)

    it("raises on misuse with a message naming the problem and the caller's line", function()
      rt:register(echo("p"))
      run(function()
        rt:start()
        local m = raised(function() rt:execute(42, {}) end)
        assert.matches("execute: expected a processor name (string), got number 42", m, 1, true)
        assert.matches("runtime_spec.lua:%d+:", m)
        m = raised(function() rt:execute("p", "not a table") end)
        assert.matches("execute: expected a state table, got string", m, 1, true)
        m = raised(function() rt:execute("p", {}, 12) end)
        assert.matches("sessionId", m, 1, true)
      end)
    end)

    it("raises when the runtime is not started", function()
      rt:register(echo("p"))
      run(function()
        local m = raised(function() rt:execute("p", {}) end)
        assert.matches("not started", m, 1, true)
        m = raised(function() rt:executeAsync("p", {}) end)
        assert.matches("not started", m, 1, true)
        m = raised(function() rt:executeMany("p", { {} }) end)
        assert.matches("not started", m, 1, true)
      end)
    end)

    it("raises when called outside am2z.run or an engine coroutine", function()
      rt:register(echo("p"))
      rt:start()
      local m = raised(function() rt:execute("p", {}) end)
      assert.matches("must be called inside an engine coroutine", m, 1, true)
      m = raised(function() rt:executeMany("p", { {} }) end)
      assert.matches("must be called inside an engine coroutine", m, 1, true)
      -- and from a plain coroutine inside am2z.run: the engine does not run it
      run(function()
        local co = coroutine.wrap(function() return pcall(rt.execute, rt, "p", {}) end)
        local ok, e = co()
        assert.is_false(ok)
        assert.matches("inside an engine coroutine", tostring(e), 1, true)
      end)
    end)
  end)

  ---------------------------------------------------------------- sessions
  describe("sessions (rule 5)", function()
    it("uses an explicit sessionId", function()
      local seen
      rt:register(P("s"):process(function(s, ctx) seen = ctx.meta.sessionId return Success(s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("s", { metadata = { sessionId = "from-state" } }, "explicit")
      end)
      assert.are.equal("explicit", seen)
      assert.are.equal("explicit", r.metadata.sessionId)
    end)

    it("takes state.metadata.sessionId when none is given", function()
      local seen
      rt:register(P("s"):process(function(s, ctx) seen = ctx.meta.sessionId return Success(s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("s", am2z.createAppState("app-session"))
      end)
      assert.are.equal("app-session", seen)
      assert.are.equal("app-session", r.metadata.sessionId)
    end)

    it("generates a distinct session id otherwise", function()
      rt:register(echo("s"))
      local r1, r2
      run(function()
        rt:start()
        r1 = rt:execute("s", {})
        r2 = rt:execute("s", {})
      end)
      assert.is_string(r1.metadata.sessionId)
      assert.is_true(#r1.metadata.sessionId > 0)
      assert.are_not.equal(r1.metadata.sessionId, r2.metadata.sessionId)
    end)

    it("ctx:call runs the callee in the caller's session", function()
      local inner
      rt:register(P("inner"):process(function(s, ctx) inner = ctx.meta.sessionId return Success(s) end))
      rt:register(P("outer"):process(function(s, ctx) return ctx:call("inner", { other = true }) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("outer", {}, "caller-session")
      end)
      assert.is_true(r.success)
      assert.are.equal("caller-session", inner)
    end)

    it("getState(sessionId) returns { state, version } after a success, nil for an unknown session", function()
      rt:register(P("inc"):process(function(s) s.n = (s.n or 0) + 1 return Success(s) end))
      local r1, r2, st1, st2
      run(function()
        rt:start()
        assert.is_nil(rt:getState("never-used"))
        r1 = rt:execute("inc", {}, "counter")
        st1 = rt:getState("counter")
        r2 = rt:execute("inc", st1.state, "counter")
        st2 = rt:getState("counter")
      end)
      assert.are.same(r1.state, st1.state)
      assert.are.equal(1, st1.state.n)
      assert.is_number(st1.version)
      assert.are.equal(2, st2.state.n)
      assert.are.same(r2.state, st2.state)
      assert.are.equal(st1.version + 1, st2.version)
    end)
  end)

  ---------------------------------------------------------------- timeouts
  describe("timeouts", function()
    it("a processor sleeping past withTimeout fails with TimeoutError when the deadline passes", function()
      local body_done = new_signal()
      rt:register(P("slow"):withTimeout(60):process(function(s, ctx)
        ctx:sleep(10000)
        body_done.fire()
        return Success(s)
      end))
      local r, elapsed
      run(function()
        rt:start()
        local t0 = am2z.now()
        r = rt:execute("slow", {})
        elapsed = am2z.now() - t0
        body_done.wait()
      end)
      assert_error_class(r, errors.TimeoutError)
      assert.is_false(errors.is(r.error, errors.CancelledError))
      assert.are.equal(60, r.error.details.timeoutMs)
      assert.is_true(elapsed >= 60, "result came after " .. elapsed .. " ms")
      assert.is_true(elapsed < 1000 * SLOW, "result came after " .. elapsed .. " ms")
      assert.are.equal(1, body_done.count)
    end)

    it("ctx:sleep returns nil, TimeoutError at the deadline and ctx.signal.aborted becomes true", function()
      local body_done = new_signal()
      local before, after, ok, err, reason, slept
      rt:register(P("slow"):withTimeout(200):process(function(s, ctx)
        before = ctx.signal.aborted
        local t0 = am2z.now()
        ok, err = ctx:sleep(10000)
        slept = am2z.now() - t0
        after = ctx.signal.aborted
        reason = ctx.signal.reason
        body_done.fire()
        return Success(s)
      end))
      run(function()
        rt:start()
        rt:execute("slow", {})
        body_done.wait()
      end)
      assert.is_false(before)
      assert.is_nil(ok)
      assert.is_true(errors.is(err, errors.TimeoutError), tostring(err))
      assert.is_true(slept >= 150 and slept < 200 + 1000 * SLOW, "slept " .. slept .. " ms")
      assert.is_true(after)
      assert.is_true(errors.is(reason, errors.TimeoutError), tostring(reason))
    end)

    it("ctx.signal:onAbort callbacks run exactly once, with the TimeoutError", function()
      local body_done = new_signal()
      local calls, args = 0, {}
      rt:register(P("slow"):withTimeout(40):process(function(s, ctx)
        ctx.signal:onAbort(function(e) calls = calls + 1 args[#args + 1] = e end)
        ctx.signal:onAbort(function() calls = calls + 1 end)
        ctx:sleep(10000)
        ctx:sleep(5) -- an aborted body may wait again: no second abort
        body_done.fire()
        return Success(s)
      end))
      run(function()
        rt:start()
        rt:execute("slow", {})
        body_done.wait()
      end)
      assert.are.equal(2, calls)
      assert.are.equal(1, #args)
      assert.is_true(errors.is(args[1], errors.TimeoutError), tostring(args[1]))
    end)

    it("timeouts apply per attempt (rule 7)", function()
      local attempts, zombies = {}, new_signal()
      rt:register(P("slow"):withTimeout(40)
        :withRetryPolicy{ maxAttempts = 2, backoffMs = 0, jitter = false }
        :process(function(s, ctx)
          attempts[#attempts + 1] = ctx.meta.attempt
          ctx:sleep(10000)
          zombies.fire()
          return Success(s)
        end))
      local r, elapsed
      run(function()
        rt:start()
        local t0 = am2z.now()
        r = rt:execute("slow", {})
        elapsed = am2z.now() - t0
        zombies.wait()
      end)
      assert_error_class(r, errors.TimeoutError)
      assert.are.same({ 1, 2 }, attempts)
      assert.are.equal(2, r.metadata.attempt)
      assert.is_true(elapsed >= 80 and elapsed < 1500 * SLOW, "took " .. elapsed .. " ms")
      assert.are.equal(2, zombies.count)
    end)

    it("a processor's timeout cancels the child it is waiting on with ctx:call", function()
      local child_done, parent_done = new_signal(), new_signal()
      local child_ok, child_err, child_woke, call_result, t0
      rt:register(P("child"):withTimeout(10000):process(function(s, ctx)
        child_ok, child_err = ctx:sleep(5000)
        child_woke = am2z.now()
        child_done.fire()
        return Success(s)
      end))
      rt:register(P("parent"):withTimeout(500):process(function(s, ctx)
        call_result = ctx:call("child", s)
        parent_done.fire()
        return Success(s)
      end))
      local r, elapsed
      run(function()
        rt:start()
        t0 = am2z.now()
        r = rt:execute("parent", {})
        elapsed = am2z.now() - t0
        child_done.wait()
        parent_done.wait()
      end)
      assert_error_class(r, errors.TimeoutError)
      assert.is_true(elapsed >= 500 and elapsed < 500 + 1500 * SLOW, "took " .. elapsed .. " ms")
      -- the child's sleep was cut short when the parent timed out
      assert.is_nil(child_ok)
      assert.is_true(errors.is(child_err, errors.CancelledError) or errors.is(child_err, errors.TimeoutError),
        tostring(child_err))
      local woke = child_woke - t0
      assert.is_true(woke >= 495 and woke < 500 + 1500 * SLOW, "child woke after " .. woke .. " ms")
      assert.is_false(call_result.success)
      -- code after the interrupted waits ran once each, never twice
      assert.are.equal(1, child_done.count)
      assert.are.equal(1, parent_done.count)
    end)

    it("a chain's timeout cancels the running step", function()
      local step_done = new_signal()
      local step_err, slept
      local step = P("long-step"):withTimeout(10000):process(function(s, ctx)
        local t0 = am2z.now()
        local _, e = ctx:sleep(5000)
        step_err, slept = e, am2z.now() - t0
        step_done.fire()
        return Success(s)
      end)
      rt:register(am2z.chainProcessors{ name = "chain", processors = { echo("first"), step }, timeout = 500 })
      local r, elapsed
      run(function()
        rt:start()
        local t0 = am2z.now()
        r = rt:execute("chain", {})
        elapsed = am2z.now() - t0
        step_done.wait()
      end)
      assert_error_class(r, errors.TimeoutError)
      assert.is_true(elapsed >= 500 and elapsed < 500 + 1500 * SLOW, "took " .. elapsed .. " ms")
      assert.is_not_nil(step_err)
      assert.is_true(slept < 1500 * SLOW, "step slept " .. slept .. " ms")
      assert.are.equal(1, step_done.count)
    end)

    it("the runtime's defaultTimeout applies to processors without withTimeout", function()
      rt = new_runtime{ logger = am2z.createSilentLogger(), defaultTimeout = 50 }
      local done = new_signal()
      rt:register(P("slow"):process(function(s, ctx) ctx:sleep(10000) done.fire() return Success(s) end))
      local r, elapsed
      run(function()
        rt:start()
        local t0 = am2z.now()
        r = rt:execute("slow", {})
        elapsed = am2z.now() - t0
        done.wait()
      end)
      assert_error_class(r, errors.TimeoutError)
      assert.is_true(elapsed >= 50 and elapsed < 1000 * SLOW, "took " .. elapsed .. " ms")
    end)
  end)

  ---------------------------------------------------------------- cancellation
  describe("cancellation", function()
    local function sleeper(started, done, record)
      return P("sleeper"):process(function(s, ctx)
        local t0 = am2z.now()
        started.fire(ctx.meta.executionId)
        record.ok, record.err = ctx:sleep(60000)
        record.slept = am2z.now() - t0
        done.fire()
        return Success(s)
      end)
    end

    it("runtime:cancel(executionId) fails it with CancelledError; its ctx:sleep returns nil, CancelledError at once", function()
      local started, done, rec = new_signal(), new_signal(), {}
      rt:register(sleeper(started, done, rec))
      local r, cancelled, elapsed
      run(function()
        rt:start()
        local h = rt:executeAsync("sleeper", {})
        assert.are.equal(h.executionId, started.wait())
        local t0 = am2z.now()
        cancelled = rt:cancel(h.executionId)
        r = h:wait()
        elapsed = am2z.now() - t0
        done.wait()
      end)
      assert.is_true(cancelled)
      assert_error_class(r, errors.CancelledError)
      assert.is_false(errors.is(r.error, errors.TimeoutError))
      assert.is_true(elapsed < 500 * SLOW, "result came " .. elapsed .. " ms after cancel")
      assert.is_nil(rec.ok)
      assert.is_true(errors.is(rec.err, errors.CancelledError), tostring(rec.err))
      assert.is_true(rec.slept < 1000 * SLOW, "slept " .. rec.slept .. " ms")
      assert.are.equal(1, done.count) -- no late second resume (and no timer left: after_each)
    end)

    it("handle:cancel() cancels the execution", function()
      local started, done, rec = new_signal(), new_signal(), {}
      rt:register(sleeper(started, done, rec))
      local r, cancelled
      run(function()
        rt:start()
        local h = rt:executeAsync("sleeper", {})
        started.wait()
        cancelled = h:cancel()
        r = h:wait()
        done.wait()
      end)
      assert.is_true(cancelled)
      assert_error_class(r, errors.CancelledError)
      assert.is_true(errors.is(rec.err, errors.CancelledError))
      assert.are.equal(1, done.count)
    end)

    it("handle:cancel() right after executeAsync, before the body started, cancels it", function()
      local ran = 0
      rt:register(P("never"):process(function(s, ctx)
        ran = ran + 1
        ctx:sleep(1500 * SLOW)
        return Success(s)
      end))
      local r, h, cancelled, elapsed
      run(function()
        rt:start()
        h = rt:executeAsync("never", { input = 1 }, "queued-session")
        local t0 = am2z.now()
        cancelled = h:cancel()
        r = h:wait()
        elapsed = am2z.now() - t0
      end)
      assert.is_true(cancelled, "handle:cancel() returned false")
      assert_error_class(r, errors.CancelledError)
      assert.is_true(elapsed < 1000 * SLOW, "result came after " .. elapsed .. " ms")
      assert.are.equal(0, ran)
      -- still a full execution result (API.md "Execution results")
      assert.are.same({ input = 1 }, r.state)
      assert.are.equal(h.executionId, r.metadata.executionId)
      assert.are.equal("never", r.metadata.processorName)
      assert.are.equal("queued-session", r.metadata.sessionId)
    end)

    it("cancel returns false for an unknown or finished execution", function()
      rt:register(echo("quick"))
      run(function()
        rt:start()
        assert.is_false(rt:cancel("no-such-execution"))
        local r = rt:execute("quick", {})
        assert.is_false(rt:cancel(r.metadata.executionId))
      end)
    end)

    it("a cancelled execution is not retried", function()
      local started, attempts = new_signal(), 0
      rt:register(P("retrying"):withRetryPolicy{ maxAttempts = 5, backoffMs = 0, jitter = false }
        :process(function(s, ctx)
          attempts = attempts + 1
          started.fire()
          ctx:sleep(60000)
          return Failure(errors.NetworkError("down"))
        end))
      local r
      run(function()
        rt:start()
        local h = rt:executeAsync("retrying", {})
        started.wait()
        h:cancel()
        r = h:wait()
      end)
      assert_error_class(r, errors.CancelledError)
      assert.are.equal(1, attempts)
    end)

    it("cancelling during the retry backoff ends the execution with CancelledError", function()
      local failed_once, attempts = new_signal(), 0
      rt:on("processor:retrying", function() failed_once.fire() end)
      rt:register(P("flaky"):withRetryPolicy{ maxAttempts = 3, backoffMs = 60000, jitter = false }
        :process(function()
          attempts = attempts + 1
          return Failure(errors.NetworkError("down"))
        end))
      local r, elapsed
      run(function()
        rt:start()
        local h = rt:executeAsync("flaky", {})
        failed_once.wait()
        local t0 = am2z.now()
        assert.is_true(h:cancel())
        r = h:wait()
        elapsed = am2z.now() - t0
      end)
      assert_error_class(r, errors.CancelledError)
      assert.are.equal(1, attempts)
      assert.is_true(elapsed < 500 * SLOW, "took " .. elapsed .. " ms")
    end)
  end)

  ---------------------------------------------------------------- call depth
  describe("call depth (rule 6)", function()
    it("ctx.callDepth is 0 at the top and +1 per ctx:call", function()
      local depths = {}
      rt:register(P("c"):process(function(s, ctx) depths.c = ctx.callDepth return Success(s) end))
      rt:register(P("b"):process(function(s, ctx) depths.b = ctx.callDepth return ctx:call("c", s) end))
      rt:register(P("a"):process(function(s, ctx) depths.a = ctx.callDepth return ctx:call("b", s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("a", {})
      end)
      assert.is_true(r.success)
      assert.are.same({ a = 0, b = 1, c = 2 }, depths)
    end)

    it("with maxCallDepth = 3, the call that would run at depth 4 fails with CallDepthExceededError", function()
      rt = new_runtime{ logger = am2z.createSilentLogger(), maxCallDepth = 3 }
      local depths, innermost = {}, nil
      rt:register(P("recurse"):process(function(s, ctx)
        depths[#depths + 1] = ctx.callDepth
        local r = ctx:call("recurse", s)
        if not r.success then
          innermost = innermost or r.error
          return Failure(r.error)
        end
        return Success(r.state)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("recurse", {})
      end)
      assert.are.same({ 0, 1, 2, 3 }, depths)
      assert.is_true(errors.is(innermost, errors.CallDepthExceededError), tostring(innermost))
      assert.are.equal(3, innermost.details.maxDepth)
      assert.are.equal(4, innermost.details.currentDepth)
      assert_error_class(r, errors.CallDepthExceededError)
    end)

    it("defaults to a maximum depth of 10", function()
      local deepest = -1
      rt:register(P("recurse"):process(function(s, ctx)
        if ctx.callDepth > deepest then deepest = ctx.callDepth end
        local r = ctx:call("recurse", s)
        return r.success and Success(r.state) or Failure(r.error)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("recurse", {})
      end)
      assert.are.equal(10, deepest)
      assert_error_class(r, errors.CallDepthExceededError)
    end)
  end)

  ---------------------------------------------------------------- retries
  describe("retries", function()
    it("runs maxAttempts attempts, numbered in ctx.meta.attempt", function()
      local attempts = {}
      rt:register(P("flaky"):withRetryPolicy{ maxAttempts = 3, backoffMs = 1, jitter = false }
        :process(function(_, ctx)
          attempts[#attempts + 1] = ctx.meta.attempt
          return Failure(errors.NetworkError("down"))
        end))
      local r
      run(function()
        rt:start()
        r = rt:execute("flaky", {})
      end)
      assert.are.same({ 1, 2, 3 }, attempts)
      assert_error_class(r, errors.NetworkError)
      assert.are.equal(3, r.metadata.attempt)
    end)

    it("stops retrying at the first success", function()
      local attempts = 0
      rt:register(P("second-time"):withRetryPolicy{ maxAttempts = 5, backoffMs = 1, jitter = false }
        :process(function(s)
          attempts = attempts + 1
          if attempts < 2 then return Failure(errors.NetworkError("blip")) end
          s.ok = true
          return Success(s)
        end))
      local r
      run(function()
        rt:start()
        r = rt:execute("second-time", {})
      end)
      assert.is_true(r.success)
      assert.is_true(r.state.ok)
      assert.are.equal(2, attempts)
      assert.are.equal(2, r.metadata.attempt)
    end)

    it("gives each attempt a fresh copy of the input state", function()
      local seen = {}
      rt:register(P("mutating"):withRetryPolicy{ maxAttempts = 2, backoffMs = 1, jitter = false }
        :process(function(s)
          seen[#seen + 1] = s.n
          s.n = s.n + 100
          return Failure(errors.NetworkError("down"))
        end))
      run(function()
        rt:start()
        rt:execute("mutating", { n = 1 })
      end)
      assert.are.same({ 1, 1 }, seen)
    end)

    for _, case in ipairs({
      { "ValidationError", function() return errors.ValidationError("f", 1, "bad") end },
      { "BusinessError", function() return errors.BusinessError("RULE", "no") end },
      { "CancelledError", function() return errors.CancelledError("stop") end },
    }) do
      it(case[1] .. " is not retried by default", function()
        local attempts = 0
        rt:register(P("nonretry"):withRetryPolicy{ maxAttempts = 3, backoffMs = 1, jitter = false }
          :process(function()
            attempts = attempts + 1
            return Failure(case[2]())
          end))
        local r
        run(function()
          rt:start()
          r = rt:execute("nonretry", {})
        end)
        assert.are.equal(1, attempts)
        assert_error_class(r, errors[case[1]])
      end)
    end

    it("shouldRetry replaces the category rule (retries a ValidationError, not a NetworkError)", function()
      local calls, attempts = {}, { v = 0, n = 0 }
      local policy = function(err, attempt)
        calls[#calls + 1] = { err.name, attempt }
        return err.name == "ValidationError"
      end
      rt:register(P("v"):withRetryPolicy{ maxAttempts = 3, backoffMs = 1, jitter = false, shouldRetry = policy }
        :process(function()
          attempts.v = attempts.v + 1
          return Failure(errors.ValidationError("f", 1, "bad"))
        end))
      rt:register(P("n"):withRetryPolicy{ maxAttempts = 3, backoffMs = 1, jitter = false, shouldRetry = policy }
        :process(function()
          attempts.n = attempts.n + 1
          return Failure(errors.NetworkError("down"))
        end))
      run(function()
        rt:start()
        rt:execute("v", {})
        rt:execute("n", {})
      end)
      assert.are.same({ v = 3, n = 1 }, attempts)
      assert.are.same({ { "ValidationError", 1 }, { "ValidationError", 2 }, { "NetworkError", 1 } }, calls)
    end)

    it("spaces attempts by at least backoffMs * multiplier^(n-1)", function()
      local starts = {}
      rt:register(P("flaky"):withRetryPolicy{ maxAttempts = 4, backoffMs = 15, backoffMultiplier = 2, jitter = false }
        :process(function()
          starts[#starts + 1] = am2z.now()
          return Failure(errors.NetworkError("down"))
        end))
      run(function()
        rt:start()
        rt:execute("flaky", {})
      end)
      assert.are.equal(4, #starts)
      for n = 1, 3 do
        local gap, want = starts[n + 1] - starts[n], 15 * 2 ^ (n - 1)
        assert.is_true(gap >= want, ("gap %d was %.1f ms, expected >= %d"):format(n, gap, want))
      end
    end)

    it("calls onRetry(err, attempt) per retry and onExhausted(err, attempts) once", function()
      local retries, exhausted = {}, {}
      rt:register(P("flaky"):withRetryPolicy{
        maxAttempts = 3, backoffMs = 1, jitter = false,
        onRetry = function(err, attempt) retries[#retries + 1] = { err.message, attempt } end,
        onExhausted = function(err, attempts) exhausted[#exhausted + 1] = { err.message, attempts } end,
      }:process(function(_, ctx)
        return Failure(errors.NetworkError("fail " .. ctx.meta.attempt))
      end))
      run(function()
        rt:start()
        rt:execute("flaky", {})
      end)
      assert.are.same({ { "fail 1", 1 }, { "fail 2", 2 } }, retries)
      assert.are.same({ { "fail 3", 3 } }, exhausted)
    end)

    it("fires processor:retrying once per scheduled retry, with delayMs", function()
      local events = {}
      rt:on("processor:retrying", function(p) events[#events + 1] = p end)
      rt:register(P("flaky"):withRetryPolicy{ maxAttempts = 3, backoffMs = 5, backoffMultiplier = 3, jitter = false }
        :process(function() return Failure(errors.NetworkError("down")) end))
      run(function()
        rt:start()
        rt:execute("flaky", {})
      end)
      assert.are.equal(2, #events)
      assert.are.equal(5, events[1].delayMs)
      assert.are.equal(15, events[2].delayMs)
      assert.are.equal(1, events[1].attempt)
      assert.are.equal(2, events[2].attempt)
      assert.are.equal("flaky", events[1].processorName)
      assert.is_true(errors.is(events[1].error, errors.NetworkError))
    end)

    it("execute never raises for a retry policy the builder accepted (NaN maxBackoffMs)", function()
      local ok, def = pcall(function()
        return P("nan-policy"):withRetryPolicy{ maxAttempts = 2, backoffMs = 1, maxBackoffMs = 0 / 0, jitter = false }
          :process(function() return Failure(errors.NetworkError("down")) end)
      end)
      if not ok then return end -- rejected where it was written: that is fine too
      rt:register(def)
      local raised_ok, r = true, nil
      run(function()
        rt:start()
        raised_ok, r = pcall(rt.execute, rt, "nan-policy", {})
      end)
      assert.is_true(raised_ok, "execute raised: " .. tostring(r))
      assert.is_false(r.success)
    end)

    it("accepts a retry policy that leaves jitter at its default", function()
      local attempts = 0
      local ok, err = pcall(function()
        rt:register(P("defaults"):withRetryPolicy{ maxAttempts = 2, backoffMs = 1 }
          :process(function()
            attempts = attempts + 1
            return Failure(errors.NetworkError("down"))
          end))
      end)
      assert.is_true(ok, "withRetryPolicy raised: " .. tostring(err))
      run(function()
        rt:start()
        rt:execute("defaults", {})
      end)
      assert.are.equal(2, attempts)
    end)
  end)

  ---------------------------------------------------------------- results
  describe("what a processor returns or raises (rules 2, 3)", function()
    it("a raised Lua error becomes ProcessorExecutionError with the message and a traceback", function()
      rt:register(P("boom"):process(function() error("kaboom happened") end))
      local r
      run(function()
        rt:start()
        r = rt:execute("boom", { keep = 1 })
      end)
      assert_error_class(r, errors.ProcessorExecutionError)
      assert.matches("kaboom happened", r.error.message, 1, true)
      assert.is_string(r.error.details.traceback)
      assert.matches("stack traceback", r.error.details.traceback, 1, true)
      assert.matches("kaboom happened", tostring(r.error.cause and r.error.cause.message), 1, true)
      assert.are.same({ keep = 1 }, r.state)
    end)

    it("a raised non-string value is kept as the cause", function()
      rt:register(P("boom"):process(function() error({ code = 7, message = "table raised" }) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("boom", {})
      end)
      assert_error_class(r, errors.ProcessorExecutionError)
      assert.matches("table raised", r.error.message, 1, true)
      assert.matches("stack traceback", tostring(r.error.details.traceback), 1, true)
    end)

    it("a non-Result return becomes ProcessorExecutionError naming what was returned", function()
      rt:register(P("garbage"):process(function() return 42 end))
      rt:register(P("nothing"):process(function() end))
      local r1, r2
      run(function()
        rt:start()
        r1 = rt:execute("garbage", {})
        r2 = rt:execute("nothing", {})
      end)
      assert_error_class(r1, errors.ProcessorExecutionError)
      assert.matches("42", r1.error.message, 1, true)
      assert_error_class(r2, errors.ProcessorExecutionError)
      assert.matches("nil", r2.error.message, 1, true)
    end)

    it("raising an am2z error is the same as returning Failure(err)", function()
      rt:register(P("raises"):process(function() error(errors.BusinessError("LIMIT", "over the limit")) end))
      rt:register(P("returns"):process(function() return Failure(errors.BusinessError("LIMIT", "over the limit")) end))
      local r1, r2
      run(function()
        rt:start()
        r1 = rt:execute("raises", {})
        r2 = rt:execute("returns", {})
      end)
      assert_error_class(r1, errors.BusinessError)
      assert_error_class(r2, errors.BusinessError)
      assert.are.equal(r2.error.name, r1.error.name)
      assert.are.equal("LIMIT", r1.error.code)
      assert.are.equal(r2.error.code, r1.error.code)
      assert.are.equal(r2.error.message, r1.error.message)
    end)

    it("an execution result returned directly counts as Success(state) / Failure(err)", function()
      rt:register(P("as-success"):process(function(s) s.via = "result" return { success = true, state = s } end))
      rt:register(P("as-failure"):process(function()
        return { success = false, error = errors.ValidationError("x", 1, "nope") }
      end))
      rt:register(P("forward"):process(function(s, ctx) return ctx:call("as-success", s) end))
      local r1, r2, r3
      run(function()
        rt:start()
        r1 = rt:execute("as-success", am2z.createAppState("s"))
        r2 = rt:execute("as-failure", {})
        r3 = rt:execute("forward", {})
      end)
      assert.is_true(r1.success)
      assert.are.equal("result", r1.state.via)
      assert.are.equal(2, r1.state.metadata.version)
      assert_error_class(r2, errors.ValidationError)
      assert.is_true(r3.success)
      assert.are.equal("result", r3.state.via)
    end)
  end)

  ---------------------------------------------------------------- state boundary
  describe("state at the boundary", function()
    local cases = {
      { "a function", function() return { items = { { a = 1 }, { fn = print } } } end, "items[2].fn" },
      { "userdata", function() return { handle = io.stdout } end, "handle" },
      { "a cycle", function() local t = { a = {} } t.a.back = t return t end, "a.back" },
      { "a sparse array", function() return { list = { [1] = 1, [3] = 3 } } end, "list" },
      { "NaN", function() return { x = { y = 0 / 0 } } end, "x.y" },
    }
    for _, c in ipairs(cases) do
      it("input with " .. c[1] .. " fails with ValidationError naming " .. c[3] .. "; the body never runs", function()
        local ran = false
        rt:register(P("p"):process(function(s) ran = true return Success(s) end))
        local r
        run(function()
          rt:start()
          r = rt:execute("p", c[2]())
        end)
        assert_error_class(r, errors.ValidationError)
        assert.matches(c[3], r.error.message, 1, true)
        assert.is_false(ran)
      end)
    end

    it("output with a function fails with ValidationError naming the path", function()
      rt:register(P("p"):process(function(s) s.out = { list = { 1, { cb = print } } } return Success(s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("p", {})
      end)
      assert_error_class(r, errors.ValidationError)
      assert.matches("out.list[2].cb", r.error.message, 1, true)
    end)

    it("ctx:call with a non-JSON state returns a failed result instead of raising", function()
      local inner
      rt:register(echo("callee"))
      rt:register(P("caller"):process(function(s, ctx)
        inner = ctx:call("callee", { f = function() end })
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("caller", {})
      end)
      assert.is_true(r.success)
      assert_error_class(inner, errors.ValidationError)
      assert.matches("f", inner.error.message, 1, true)
    end)

    it("a callee cannot mutate its caller's state", function()
      local before, after
      rt:register(P("mutator"):process(function(s)
        s.n = 99
        s.list[#s.list + 1] = "added"
        s.nested.deep = "changed"
        return Success(s)
      end))
      local callee_out
      rt:register(P("caller"):process(function(s, ctx)
        local mine = { n = 1, list = { "a" }, nested = { deep = "orig" } }
        local r = ctx:call("mutator", mine)
        callee_out = r.state
        after = mine
        return Success(s)
      end))
      run(function()
        rt:start()
        rt:execute("caller", {})
      end)
      assert.are.same({ n = 1, list = { "a" }, nested = { deep = "orig" } }, after)
      assert.are.equal(99, callee_out.n)
      assert.are.same({ "a", "added" }, callee_out.list)
    end)

    it("a callee that keeps its output table cannot change the caller's result later", function()
      local kept
      rt:register(P("keeper"):process(function(s)
        if kept then
          kept.list[1] = "changed by a later run"   -- the table it returned last time
          return Success(s)
        end
        kept = { list = { "original" } }
        return Success(kept)
      end))
      local first
      rt:register(P("caller"):process(function(s, ctx)
        first = ctx:call("keeper", {}).state
        ctx:call("keeper", {})
        return Success(s)
      end))
      run(function()
        rt:start()
        rt:execute("caller", {})
      end)
      assert.are.same({ "original" }, first.list)
    end)

    it("returning a table the processor owns (a constant) never changes that table", function()
      local DEFAULT = am2z.createAppState("const")
      rt:register(P("const"):process(function() return Success(DEFAULT) end))
      local r1, r2
      run(function()
        rt:start()
        r1 = rt:execute("const", {})
        r2 = rt:execute("const", {})
      end)
      assert.are.equal(1, DEFAULT.metadata.version)
      assert.are.equal(2, r1.state.metadata.version)
      assert.are.equal(2, r2.state.metadata.version)
    end)

    it("a processor mutating its input does not change the table passed to execute", function()
      rt:register(P("mutator"):process(function(s) s.n = 2 s.t.x = "new" return Success(s) end))
      local input = { n = 1, t = { x = "old" } }
      local r
      run(function()
        rt:start()
        r = rt:execute("mutator", input)
      end)
      assert.are.same({ n = 1, t = { x = "old" } }, input)
      assert.are.equal(2, r.state.n)
    end)
  end)

  ---------------------------------------------------------------- versions
  describe("metadata.version (rule 9)", function()
    it("grows by exactly 1 per successful plain processor", function()
      rt:register(echo("one"))
      local r
      run(function()
        rt:start()
        r = rt:execute("one", am2z.createAppState("v1"))
      end)
      assert.are.equal(2, r.state.metadata.version)
      assert.is_string(r.state.metadata.lastUpdated)
    end)

    it("a 3-step chain on createAppState ends at version 4", function()
      rt:register(am2z.chainProcessors{ name = "three", processors = { echo("s1"), echo("s2"), echo("s3") } })
      local r
      run(function()
        rt:start()
        r = rt:execute("three", am2z.createAppState("v3"))
      end)
      assert.is_true(r.success)
      assert.are.equal(4, r.state.metadata.version)
    end)

    it("a failed execution leaves the version where it was", function()
      rt:register(P("fails"):process(function() return Failure(errors.BusinessError("X", "no")) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("fails", am2z.createAppState("v0"))
      end)
      assert.is_false(r.success)
      assert.are.equal(1, r.state.metadata.version)
    end)
  end)

  ---------------------------------------------------------------- events
  describe("events (rule 11)", function()
    local function record(names)
      local log = {}
      for _, n in ipairs(names) do
        rt:on(n, function(p) log[#log + 1] = { event = n, payload = p } end)
      end
      return log
    end

    it("processor:started then processor:completed with the payload fields", function()
      local log = record({ "processor:started", "processor:completed", "processor:failed" })
      rt:register(echo("ok"))
      local r
      run(function()
        rt:start()
        r = rt:execute("ok", {}, "ev-session")
      end)
      assert.are.equal(2, #log)
      assert.are.equal("processor:started", log[1].event)
      assert.are.equal("processor:completed", log[2].event)
      for _, e in ipairs(log) do
        assert.are.equal("ok", e.payload.processorName)
        assert.are.equal(r.metadata.executionId, e.payload.executionId)
        assert.are.equal("ev-session", e.payload.sessionId)
        assert.are.equal(1, e.payload.attempt)
      end
      assert.is_number(log[2].payload.executionTime)
    end)

    it("processor:failed fires once per finally failed execution, with the error", function()
      local log = record({ "processor:started", "processor:retrying", "processor:failed", "processor:completed" })
      rt:register(P("bad"):withRetryPolicy{ maxAttempts = 2, backoffMs = 1, jitter = false }
        :process(function() return Failure(errors.NetworkError("down")) end))
      run(function()
        rt:start()
        rt:execute("bad", {})
      end)
      local names = {}
      for i, e in ipairs(log) do names[i] = e.event end
      assert.are.same({ "processor:started", "processor:retrying", "processor:started", "processor:failed" }, names)
      local failed = log[4].payload
      assert.is_true(errors.is(failed.error, errors.NetworkError))
      assert.are.equal(2, failed.attempt)
      assert.is_number(failed.executionTime)
      assert.are.equal(2, log[3].payload.attempt)
    end)

    it("ctx:emit(event, data) reaches runtime:on(event, fn) listeners as fn(data, meta)", function()
      local got = {}
      rt:on("order:shipped", function(data, meta) got[#got + 1] = { data = data, meta = meta } end)
      rt:register(P("shipper"):process(function(s, ctx)
        ctx:emit("order:shipped", { id = 7 })
        ctx:emit("nobody:listens", { id = 8 })
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("shipper", {}, "ship-session")
      end)
      assert.are.equal(1, #got)
      assert.are.same({ id = 7 }, got[1].data)
      assert.are.equal("shipper", got[1].meta.processorName)
      assert.are.equal(r.metadata.executionId, got[1].meta.executionId)
      assert.are.equal("ship-session", got[1].meta.sessionId)
    end)

    it("off(event, fn) removes only that listener", function()
      local a, b = 0, 0
      local fa = function() a = a + 1 end
      local fb = function() b = b + 1 end
      rt:on("processor:completed", fa):on("processor:completed", fb)
      rt:register(echo("ok"))
      run(function()
        rt:start()
        rt:execute("ok", {})
        rt:off("processor:completed", fa)
        rt:execute("ok", {})
      end)
      assert.are.equal(1, a)
      assert.are.equal(2, b)
    end)

    it("a listener that raises does not break the execution or other listeners", function()
      local other = 0
      rt:on("processor:started", function() error("listener exploded") end)
      rt:on("processor:started", function() other = other + 1 end)
      rt:on("custom", function() error("custom listener exploded") end)
      rt:register(P("ok"):process(function(s, ctx) ctx:emit("custom", {}) s.after = true return Success(s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("ok", {})
      end)
      assert.is_true(r.success)
      assert.is_true(r.state.after)
      assert.are.equal(1, other)
    end)
  end)

  ---------------------------------------------------------------- stats
  describe("getStats (rule 12)", function()
    it("lists registered names and counts running, completed and failed jobs", function()
      local running_inside
      rt:register(P("ok"):process(function(s) running_inside = rt:getStats().runningJobs return Success(s) end))
      rt:register(P("bad"):process(function() return Failure(errors.BusinessError("X", "no")) end))
      local before, after
      run(function()
        rt:start()
        before = rt:getStats()
        rt:execute("ok", {})
        rt:execute("ok", {})
        rt:execute("bad", {})
        after = rt:getStats()
      end)
      assert.are.same({ "bad", "ok" }, before.registeredProcessors)
      assert.are.equal(0, before.completedJobs)
      assert.are.equal(0, before.failedJobs)
      assert.are.equal(1, running_inside)
      assert.are.equal(0, after.runningJobs)
      assert.are.equal(2, after.completedJobs)
      assert.are.equal(1, after.failedJobs)
    end)

    it("uptime is in ms and grows", function()
      rt:register(P("nap"):process(function(s, ctx) ctx:sleep(25) return Success(s) end))
      local u1, u2
      run(function()
        rt:start()
        u1 = rt:getStats().uptime
        rt:execute("nap", {})
        u2 = rt:getStats().uptime
      end)
      assert.is_number(u1)
      assert.is_true(u2 - u1 >= 25, ("uptime went from %s to %s"):format(u1, u2))
      assert.is_true(u2 < 5000 * SLOW)
    end)
  end)

  ---------------------------------------------------------------- metrics
  describe("metrics:stats (monitoring)", function()
    it("is emitted every metricsInterval ms with getStats() while started and listened to; stop ends it", function()
      rt = new_runtime{ logger = am2z.createSilentLogger(), monitoring = { metricsInterval = 30 } }
      rt:register(echo("m"))
      local got, second = {}, new_signal()
      local t0, at_stop
      run(function()
        rt:start()
        assert.is_true(rt:execute("m", {}).success)
        -- Listened to from here: every emission has the execution counted.
        t0 = am2z.now()
        rt:on("metrics:stats", function(stats, meta)
          got[#got + 1] = { stats = stats, meta = meta, at = am2z.now() }
          if #got == 2 then second.fire() end
        end)
        second.wait()
        rt:stop()
        at_stop = #got
        am2z.sleep(100)
      end)
      assert.is_true(at_stop >= 2)
      assert.are.equal(at_stop, #got, "emitted after stop")
      for _, g in ipairs(got) do
        assert.is_nil(g.meta)
        assert.are.same({ "m" }, g.stats.registeredProcessors)
        assert.are.equal(1, g.stats.completedJobs)
        assert.are.equal(0, g.stats.failedJobs)
        assert.is_number(g.stats.uptime)
        assert.is_true(math.abs(g.stats.timestamp - os.time() * 1000) < 60000, "timestamp in ms")
        if factory.kind == "queue" then assert.is_table(g.stats.queueStats) end
      end
      assert.is_true(got[1].at - t0 >= 30, "the first came after " .. (got[1].at - t0) .. " ms")
      assert.is_true(got[2].at - got[1].at >= 29, "then after " .. (got[2].at - got[1].at) .. " ms")
    end)

    it("a listener may stop the runtime: the stop still waits for what runs", function()
      rt = new_runtime{ logger = am2z.createSilentLogger(), monitoring = { metricsInterval = 20 } }
      local finished = false
      rt:register(P("slowish"):process(function(s, ctx)
        ctx:sleep(150)
        finished = true
        return Success(s)
      end))
      local stopped, finished_at_stop = new_signal(), nil
      local r
      run(function()
        rt:start()
        local h = rt:executeAsync("slowish", {})
        -- Listened to once the execution is on its way (a stop before that
        -- would refuse it).
        rt:on("metrics:stats", function()
          if stopped.fired then return end
          rt:stop{ graceMs = 5000 }
          finished_at_stop = finished
          stopped.fire()
        end)
        stopped.wait()
        r = h:wait()
      end)
      assert.is_true(finished_at_stop, "stop() returned before the running execution finished")
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(1, stopped.count)
    end)

    it("nothing runs without a listener, nor with enableMetrics = false", function()
      local quiet = new_runtime{ logger = am2z.createSilentLogger(),
                                 monitoring = { metricsInterval = 10, enableMetrics = false } }
      local n = 0
      quiet:on("metrics:stats", function() n = n + 1 end)
      run(function()
        quiet:start()
        rt:start()
        am2z.sleep(60)
        assert.are.equal(0, n)
        -- neither runtime keeps a metrics timer running for nobody
        assert.is_nil(quiet._metricsCo)
        assert.is_nil(rt._metricsCo)
        quiet:stop()
      end)
      -- (the after_each checks the engine holds nothing once rt stops)
    end)

    it("rejects bad monitoring options with a message naming the option", function()
      local msg = raised(function() new_runtime{ monitoring = { metricsInterval = 0 } } end)
      assert.matches("monitoring.metricsInterval", msg, 1, true)
      msg = raised(function() new_runtime{ monitoring = { enableMetrics = "yes" } } end)
      assert.matches("monitoring.enableMetrics to be a boolean", msg, 1, true)
      msg = raised(function() new_runtime{ monitoring = { interval = 5 } } end)
      assert.matches("unknown option monitoring.interval", msg, 1, true)
      msg = raised(function() new_runtime{ monitoring = 5 } end)
      assert.matches("expected monitoring to be a table", msg, 1, true)
    end)
  end)

  ---------------------------------------------------------------- many / async
  describe("executeMany and executeAsync", function()
    it("executeMany runs concurrently and returns results in input order", function()
      -- Each item ends once `after` others have: 2, then 3, then 1. Only
      -- items running at the same time can do that (one after another, item
      -- 1 would give up waiting and end first).
      local finish_order = {}
      rt:register(P("nap"):process(function(s, ctx)
        local deadline = am2z.now() + 2000 * SLOW
        while #finish_order < s.after and am2z.now() < deadline do
          if not ctx:sleep(5) then break end
        end
        finish_order[#finish_order + 1] = s.i
        return Success(s)
      end))
      local rs
      run(function()
        rt:start()
        rs = rt:executeMany("nap", { { i = 1, after = 2 }, { i = 2, after = 0 }, { i = 3, after = 1 } })
      end)
      assert.are.same({ 2, 3, 1 }, finish_order)
      assert.are.equal(3, #rs)
      for i = 1, 3 do
        assert.is_true(rs[i].success)
        assert.are.equal(i, rs[i].state.i)
      end
    end)

    it("executeMany keeps a failure in its slot and does not affect the others", function()
      rt:register(P("maybe"):process(function(s)
        if s.fail then return Failure(errors.BusinessError("X", "no")) end
        return Success(s)
      end))
      local rs
      run(function()
        rt:start()
        rs = rt:executeMany("maybe", { { i = 1 }, { i = 2, fail = true }, { i = 3 } })
      end)
      assert.is_true(rs[1].success)
      assert_error_class(rs[2], errors.BusinessError)
      assert.is_true(rs[3].success)
      assert.are.equal(3, rs[3].state.i)
    end)

    it("executeAsync returns a handle at once; handle:wait() returns the result", function()
      local started = new_signal()
      rt:register(P("nap"):process(function(s, ctx)
        started.fire()
        ctx:sleep(20)
        s.napped = true
        return Success(s)
      end))
      local h, r, r_again, returned_before_start
      run(function()
        rt:start()
        h = rt:executeAsync("nap", { x = 1 })
        returned_before_start = not started.fired
        r = h:wait()
        r_again = h:wait()
      end)
      assert.is_true(returned_before_start)
      assert.is_string(h.executionId)
      assert.is_true(r.success)
      assert.is_true(r.state.napped)
      assert.are.equal(h.executionId, r.metadata.executionId)
      assert.are.equal(r, r_again)
    end)
  end)

  ---------------------------------------------------------------- lifecycle
  describe("lifecycle (rule 14)", function()
    it("stop() lets an execution quicker than graceMs finish", function()
      local started = new_signal()
      rt:register(P("quick"):process(function(s, ctx) started.fire() ctx:sleep(30) s.done = true return Success(s) end))
      local r, stop_took
      run(function()
        rt:start()
        local h = rt:executeAsync("quick", {})
        started.wait()
        local t0 = am2z.now()
        rt:stop{ graceMs = 2000 }
        stop_took = am2z.now() - t0
        r = h:wait()
      end)
      assert.is_true(r.success)
      assert.is_true(r.state.done)
      assert.is_true(stop_took >= 20 and stop_took < 1000 * SLOW, "stop took " .. stop_took .. " ms")
    end)

    it("stop() cancels a longer execution at the grace deadline with CancelledError", function()
      local started, done = new_signal(), new_signal()
      rt:register(P("long"):process(function(s, ctx) started.fire() ctx:sleep(10000) done.fire() return Success(s) end))
      local r, stop_took
      run(function()
        rt:start()
        local h = rt:executeAsync("long", {})
        started.wait()
        local t0 = am2z.now()
        rt:stop{ graceMs = 60 }
        stop_took = am2z.now() - t0
        r = h:wait()
        done.wait()
      end)
      assert_error_class(r, errors.CancelledError)
      assert.is_true(stop_took >= 60 and stop_took < 1000 * SLOW, "stop took " .. stop_took .. " ms")
      assert.are.equal(1, done.count)
    end)

    it("stop() right after executeAsync still bounds that execution by the grace deadline", function()
      local done = new_signal()
      rt:register(P("long"):process(function(s, ctx) ctx:sleep(1500 * SLOW) done.fire() return Success(s) end))
      local r, elapsed
      run(function()
        rt:start()
        local h = rt:executeAsync("long", {})
        local t0 = am2z.now()
        rt:stop{ graceMs = 50 }
        r = h:wait()
        elapsed = am2z.now() - t0
        done.wait()
      end)
      assert.is_false(r.success, "the execution ran to completion after stop()")
      assert.is_true(elapsed < 1000 * SLOW, "result came " .. elapsed .. " ms after stop()")
    end)

    it("execute after stop() raises 'not started'; start after stop works", function()
      rt:register(echo("p"))
      run(function()
        rt:start()
        assert.is_true(rt:execute("p", {}).success)
        rt:stop()
        assert.matches("not started", raised(function() rt:execute("p", {}) end), 1, true)
        rt:start()
        assert.is_true(rt:execute("p", {}).success)
      end)
    end)

    it("start twice is a no-op (returns the runtime, uptime is not reset)", function()
      rt:register(P("nap"):process(function(s, ctx) ctx:sleep(20) return Success(s) end))
      local u1, u2, same
      run(function()
        same = rt:start() == rt
        rt:execute("nap", {})
        u1 = rt:getStats().uptime
        assert.are.equal(rt, rt:start())
        u2 = rt:getStats().uptime
        assert.is_true(rt:execute("nap", {}).success)
      end)
      assert.is_true(same)
      assert.is_true(u1 >= 20)
      assert.is_true(u2 >= u1)
    end)

    it("register of an existing name replaces it; an in-flight execution finishes on the old one", function()
      local started = new_signal()
      rt:register(P("p"):process(function(s, ctx)
        started.fire()
        ctx:sleep(20)
        s.v = 1
        return Success(s)
      end))
      local old, new
      run(function()
        rt:start()
        local h = rt:executeAsync("p", {})
        started.wait()
        rt:register(P("p"):process(function(s) s.v = 2 return Success(s) end))
        old = h:wait()
        new = rt:execute("p", {})
      end)
      assert.are.equal(1, old.state.v)
      assert.are.equal(2, new.state.v)
      assert.are.same({ "p" }, rt:getRegisteredProcessorNames())
    end)

    it("registers composites with their children; unregister removes a name", function()
      rt:register(am2z.chainProcessors{ name = "chain", processors = { echo("a"), echo("b") } })
      assert.are.same({ "a", "b", "chain" }, rt:getRegisteredProcessorNames())
      assert.is_true(rt:isProcessorRegistered("a"))
      assert.is_true(rt:unregister("a"))
      assert.is_false(rt:isProcessorRegistered("a"))
      assert.is_false(rt:unregister("a"))
    end)
  end)

  ---------------------------------------------------------------- robustness
  describe("bad processors do not take the engine down", function()
    it("raising, garbage, never-returning and error-ignoring processors fail alone; good ones succeed", function()
      local looper_done = new_signal()
      local looper_sleeps = 0
      rt:register(P("mixed"):withTimeout(400):process(function(s, ctx)
        if s.kind == "good" then
          ctx:sleep(5)
          return Success(s)
        elseif s.kind == "raise" then
          error("bad processor raised")
        elseif s.kind == "garbage" then
          return function() end
        elseif s.kind == "forever" then
          ctx:sleep(1e9)
          return Success(s)
        elseif s.kind == "loop" then
          -- ignores every error; after the deadline each sleep returns at
          -- once, so the loop runs out quickly instead of blocking the engine
          for _ = 1, 200 do
            ctx:sleep(5)
            looper_sleeps = looper_sleeps + 1
          end
          looper_done.fire()
          return Success(s)
        end
      end))
      local rs, elapsed
      run(function()
        rt:start()
        local t0 = am2z.now()
        rs = rt:executeMany("mixed", {
          { kind = "good" }, { kind = "raise" }, { kind = "garbage" },
          { kind = "forever" }, { kind = "loop" }, { kind = "good" },
        })
        elapsed = am2z.now() - t0
        looper_done.wait()
        -- the engine still works afterwards
        assert.is_true(rt:execute("mixed", { kind = "good" }).success)
      end)
      assert.is_true(rs[1].success)
      assert.is_true(rs[6].success)
      assert.is_true(rs[1].executionTime < 400 and rs[6].executionTime < 400)
      assert_error_class(rs[2], errors.ProcessorExecutionError)
      assert.matches("bad processor raised", rs[2].error.message, 1, true)
      assert_error_class(rs[3], errors.ProcessorExecutionError)
      assert_error_class(rs[4], errors.TimeoutError)
      assert_error_class(rs[5], errors.TimeoutError)
      assert.is_true(elapsed >= 400 and elapsed < 400 + 2000 * SLOW, "took " .. elapsed .. " ms")
      assert.are.equal(200, looper_sleeps)
    end)

    it("coroutine.yield called directly in a body fails that execution with ProcessorExecutionError", function()
      rt:register(P("yielder"):process(function(s)
        coroutine.yield("oops")
        return Success(s)
      end))
      rt:register(echo("fine"))
      local r, ok
      run(function()
        rt:start()
        r = rt:execute("yielder", {})
        ok = rt:execute("fine", {})
      end)
      assert_error_class(r, errors.ProcessorExecutionError)
      assert.matches("coroutine.yield", r.error.message, 1, true)
      assert.is_true(ok.success)
    end)

    it("the engine keeps no reference to a finished execution's state", function()
      local probe = setmetatable({}, { __mode = "v" })
      rt:register(P("big"):process(function(s)
        s.payload = { "marker" }
        probe[1] = s.payload
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("big", {})
      end)
      assert.is_true(r.success)
      probe[2] = r.state.payload
      r = nil
      collectgarbage()
      collectgarbage()
      assert.is_nil(probe[1], "the processor's output state is still reachable after the execution")
      assert.is_nil(probe[2], "the result state is still reachable after the caller dropped it")
    end)

    it("a coroutine created by the body may yield to it freely", function()
      rt:register(P("gen"):process(function(s)
        local co = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
        s.sum = co() + co() + co()
        return Success(s)
      end))
      local r
      run(function()
        rt:start()
        r = rt:execute("gen", {})
      end)
      assert.is_true(r.success)
      assert.are.equal(6, r.state.sum)
    end)
  end)
end)
