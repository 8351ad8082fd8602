-- Composite processors (API.md "Composition", Precise rules 5, 8, 9): chain,
-- parallel, route and batch, alone and nested, on a LocalRuntime. Timing
-- assertions are windows and lower bounds; cancellation is checked by what
-- ran after the cancelled call and by the engine counts going back to zero.
local am2z = require("am2z")
local factory = require("runtime_factory")
local new_runtime = factory.new
local errors = am2z.errors
local core = require("am2z.core")

local Success, Failure = am2z.Success, am2z.Failure

-- Slow builds (ASan, valgrind) scale TEST_TIMEOUT_MS; upper bounds that only
-- guard against "it waited for the sentinel sleep" scale with it.
local MULT = TEST_TIMEOUT_MS / 5000
local function slack(ms) return ms * MULT end

local function run(fn)
  return am2z.run(fn, { timeoutMs = TEST_TIMEOUT_MS })
end

local function assert_no_leaks()
  local c = core._debug_counts()
  assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 },
    { execs = c.execs, timers = c.timers, threads = c.threads, results = c.results })
end

local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return err
end

-- Builder misuse: a string naming the function, pointing at this file.
local function assert_misuse(fn, text)
  local msg = raised(fn)
  assert.is_string(msg)
  assert.matches(text, msg, 1, true)
  assert.matches("compose_spec%.lua:%d+:", msg)
end

-- A plain processor: sleeps `ms` (if given) then applies `f` to the state.
local function step(name, f, ms, timeout)
  local b = am2z.createProcessor(name)
  if timeout then b = b:withTimeout(timeout) end
  return b:process(function(state, ctx)
    if ms and ms > 0 then
      local ok, err = ctx:sleep(ms)
      if not ok then return Failure(err) end
    end
    if f then f(state, ctx) end
    return Success(state)
  end)
end

-- Concurrency without a clock: processors meeting at a barrier all arrive
-- only if they run at the same time (one after another, the first gives up
-- after a while and reports false).
local function barrier(n) return { n = n, arrived = 0 } end
local function meet(b, ctx)
  b.arrived = b.arrived + 1
  local deadline = am2z.now() + slack(2000)
  while b.arrived < b.n and am2z.now() < deadline do
    if not ctx:sleep(5) then return false end
  end
  return b.arrived >= b.n
end

-- A processor that must never run: counts its runs in `hits[name]`.
local function sentinel(name, hits)
  return am2z.createProcessor(name):process(function(state)
    hits[name] = (hits[name] or 0) + 1
    return Success(state)
  end)
end

-- Sleeps `ms` then fails with BusinessError(code).
local function failing(name, code, ms)
  return am2z.createProcessor(name):process(function(state, ctx)
    if ms and ms > 0 then
      local ok, err = ctx:sleep(ms)
      if not ok then return Failure(err) end
    end
    return Failure(errors.BusinessError(code, name .. " failed"))
  end)
end

-- Sleeps a long time unless cancelled; records what the sleep returned and
-- how many times the code after it ran.
local function cancellable(name, rec)
  rec[name] = { after = 0 }
  return am2z.createProcessor(name):process(function(state, ctx)
    local ok, err = ctx:sleep(2000)
    local r = rec[name]
    r.after = r.after + 1
    r.ok, r.err, r.aborted = ok, err, ctx.signal.aborted
    return Success(state)
  end)
end

local function timed(fn)
  local t0 = am2z.now()
  local r = fn()
  return r, am2z.now() - t0
end

describe("am2z composition (" .. factory.name .. ")", function()
  local rt

  before_each(function()
    rt = new_runtime{ logger = am2z.createSilentLogger() }
  end)

  after_each(function()
    run(function() rt:stop() end)
    assert_no_leaks()
  end)

  local function execute(name, state, sid)
    return run(function()
      rt:start()
      return rt:execute(name, state, sid)
    end)
  end

  local function execute_timed(name, state)
    return run(function()
      rt:start()
      return timed(function() return rt:execute(name, state) end)
    end)
  end

  -- ------------------------------------------------------------------ chain

  describe("chainProcessors", function()
    it("feeds each step's output to the next step, in order", function()
      local seen = {}
      local function appender(name)
        return step(name, function(s)
          seen[#seen + 1] = s.trail
          s.trail = s.trail .. name
        end)
      end
      rt:register(am2z.chainProcessors{ name = "abc",
        processors = { appender("a"), appender("b"), appender("c") } })
      local r = execute("abc", am2z.createAppState("chain-1", { trail = ">" }))
      assert.is_true(r.success, tostring(r.error))
      assert.are.same({ ">", ">a", ">ab" }, seen)
      assert.are.equal(">abc", r.state.trail)
      -- rule 9: one bump per plain step, none for the chain itself
      assert.are.equal(4, r.state.metadata.version)
    end)

    it("stops at the first failure with ProcessorExecutionError and its details; later steps never run", function()
      local hits = {}
      rt:register(am2z.chainProcessors{ name = "order", processors = {
        step("reserve", function(s) s.reserved = true end),
        failing("charge", "CARD_DECLINED"),
        sentinel("ship", hits),
      } })
      local r = execute("order", { orderId = 7 })
      assert.is_false(r.success)
      local err = r.error
      assert.is_true(errors.is(err, errors.ProcessorExecutionError))
      assert.are.equal("charge", err.details.failedProcessor)
      assert.are.equal(1, err.details.completedSteps)
      assert.are.equal(7, err.details.partialState.orderId)
      assert.is_true(err.details.partialState.reserved)
      assert.is_true(errors.is(err.cause, errors.BusinessError))
      assert.are.equal("CARD_DECLINED", err.cause.code)
      assert.is_nil(hits.ship)
      -- the execution result's state is the partial state
      assert.is_true(r.state.reserved)
    end)

    it("a failing first step reports completedSteps 0 and the input as partialState", function()
      local hits = {}
      rt:register(am2z.chainProcessors{ name = "early", processors = {
        am2z.createProcessor("boom"):process(function() error("kaput") end),
        sentinel("never", hits),
      } })
      local r = execute("early", { n = 1 })
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
      assert.are.equal("boom", r.error.details.failedProcessor)
      assert.are.equal(0, r.error.details.completedSteps)
      assert.are.same({ n = 1 }, r.error.details.partialState)
      assert.matches("kaput", tostring(r.error), 1, true)
      assert.is_nil(hits.never)
    end)

    it("by default allows the sum of its children's timeouts, not their maximum", function()
      -- each step takes ~60 ms against its own 250 ms; together ~300 ms:
      -- over the max (250) but within the sum (1250)
      local names = { "slow-1", "slow-2", "slow-3", "slow-4", "slow-5" }
      local steps = {}
      for i, n in ipairs(names) do steps[i] = step(n, function(s) s[n] = true end, 60, 250) end
      rt:register(am2z.chainProcessors{ name = "five-slow", processors = steps })
      local r, elapsed = execute_timed("five-slow", {})
      assert.is_true(r.success, tostring(r.error))
      for _, n in ipairs(names) do assert.is_true(r.state[n], n) end
      assert.is_true(elapsed >= 295, "elapsed " .. elapsed)
    end)

    it("times out at the sum of its children's timeouts", function()
      -- "flaky" (50 ms per attempt) fails retryably after 30 ms, 20 attempts:
      -- ~600 ms or more if unbounded. The chain's default is 50 + 50 = 100 ms.
      local attempts = 0
      local flaky = am2z.createProcessor("flaky"):withTimeout(50)
        :withRetryPolicy{ maxAttempts = 20, backoffMs = 0, jitter = false }
        :process(function(state, ctx)
          attempts = attempts + 1
          local ok, err = ctx:sleep(30)
          if not ok then return Failure(err) end
          return Failure(errors.NetworkError("upstream down"))
        end)
      local hits = {}
      local tail = sentinel("tail", hits)
      rt:register(am2z.chainProcessors{ name = "bounded", processors = {
        flaky, am2z.createProcessor("tail"):withTimeout(50):process(tail.fn) } })
      local r, elapsed = execute_timed("bounded", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.are.equal(100, r.error.details.timeoutMs)
      -- (through Redis, the child hears of the deadline a little later and
      -- may start another attempt meanwhile)
      assert.is_true(elapsed >= 95 and elapsed < slack(500), "elapsed " .. elapsed)
      assert.is_true(attempts >= 1 and attempts < 20, "attempts " .. attempts)
      assert.is_nil(hits.tail)
    end)

    it("an explicit timeout overrides the sum", function()
      local rec = {}
      rt:register(am2z.chainProcessors{ name = "tight", timeout = 400, processors = {
        step("first", nil, 30),
        cancellable("second", rec),
      } })
      local r, elapsed = execute_timed("tight", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.are.equal(400, r.error.details.timeoutMs)
      assert.is_true(elapsed >= 398 and elapsed < 400 + slack(300), "elapsed " .. elapsed)
      -- the running step was cancelled, and its continuation ran exactly once
      assert.are.equal(1, rec.second.after)
      assert.is_nil(rec.second.ok)
      assert.is_true(rec.second.aborted)
    end)
  end)

  -- --------------------------------------------------------------- parallel

  describe("parallelProcessors", function()
    it("gives every child the same input and runs them concurrently", function()
      local inputs, met, b = {}, {}, barrier(3)
      local function child(name)
        return step(name, function(s, ctx)
          inputs[name] = { input = s.input, a = s.a, b = s.b, c = s.c }
          met[name] = meet(b, ctx)
          s[name] = true
        end)
      end
      rt:register(am2z.parallelProcessors{ name = "fan",
        processors = { child("a"), child("b"), child("c") } })
      local r = execute("fan", { input = "same" })
      assert.is_true(r.success, tostring(r.error))
      for _, n in ipairs({ "a", "b", "c" }) do
        -- no child saw a sibling's output
        assert.are.same({ input = "same" }, inputs[n])
        assert.is_true(r.state[n])
        assert.is_true(met[n], n .. " did not run at the same time as its siblings")
      end
    end)

    it("merges in processor order regardless of finish order (later keys win)", function()
      -- finish order: b, c, a; processor order: a, b, c
      rt:register(am2z.parallelProcessors{ name = "order", processors = {
        step("pa", function(s) s.winner = "a"; s.fromA = 1 end, 40),
        step("pb", function(s) s.winner = "b"; s.fromB = 2 end, 0),
        step("pc", function(s) s.fromC = 3 end, 20),
      } })
      local r = execute("order", { kept = "input" })
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal("b", r.state.winner)
      assert.are.equal(1, r.state.fromA)
      assert.are.equal(2, r.state.fromB)
      assert.are.equal(3, r.state.fromC)
      assert.are.equal("input", r.state.kept)
    end)

    it("concatenates messages without duplicating the input's messages", function()
      local function add(name, ms, ...)
        local extra = { ... }
        return step(name, function(s)
          for _, m in ipairs(extra) do s.messages[#s.messages + 1] = m end
        end, ms)
      end
      rt:register(am2z.parallelProcessors{ name = "chat", processors = {
        add("m1", 20, "from-1"),
        add("m2", 0, "from-2a", "from-2b"),
        add("m3", 10),
      } })
      local r = execute("chat", { messages = { "hello", "world" } })
      assert.is_true(r.success, tostring(r.error))
      assert.are.same({ "hello", "world", "from-1", "from-2a", "from-2b" }, r.state.messages)
    end)

    it("passes the children's states in processor order and the input to mergeFunction", function()
      local got_states, got_initial
      rt:register(am2z.parallelProcessors{ name = "custom",
        processors = {
          step("s1", function(s) s.by = "s1" end, 30),
          step("s2", function(s) s.by = "s2" end, 0),
          step("s3", function(s) s.by = "s3" end, 15),
        },
        mergeFunction = function(states, initial)
          got_states, got_initial = states, initial
          local parts = {}
          for i, s in ipairs(states) do parts[i] = s.by end
          return { combined = table.concat(parts, "+"), from = initial.tag }
        end,
      })
      local r = execute("custom", { tag = "T" })
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(3, #got_states)
      assert.are.equal("T", got_initial.tag)
      assert.is_nil(got_initial.by)
      assert.are.same({ combined = "s1+s2+s3", from = "T" }, r.state)
    end)

    it("a mergeFunction that raises fails the parallel with ProcessorExecutionError", function()
      rt:register(am2z.parallelProcessors{ name = "bad-merge",
        processors = { step("x1"), step("x2") },
        mergeFunction = function() error("cannot merge") end,
      })
      local r = execute("bad-merge", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
      assert.matches("cannot merge", tostring(r.error), 1, true)
    end)

    it("reports the first failure to occur and cancels the other children", function()
      local rec = {}
      rt:register(am2z.parallelProcessors{ name = "race", processors = {
        cancellable("long-1", rec),
        failing("late-fail", "LATE", 300),
        failing("quick-fail", "QUICK", 10),
        cancellable("long-2", rec),
      } })
      local r, elapsed = execute_timed("race", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
      assert.are.equal("quick-fail", r.error.details.failedProcessor)
      assert.is_true(errors.is(r.error.cause, errors.BusinessError))
      assert.are.equal("QUICK", r.error.cause.code)
      assert.is_true(elapsed < slack(250), "elapsed " .. elapsed)
      for _, n in ipairs({ "long-1", "long-2" }) do
        assert.are.equal(1, rec[n].after, n .. " continued more than once (or never)")
        assert.is_nil(rec[n].ok)
        assert.is_true(errors.is(rec[n].err, errors.CancelledError), tostring(rec[n].err))
        assert.is_true(rec[n].aborted)
      end
    end)

    it("a parallel that times out cancels every child it started", function()
      local rec = {}
      rt:register(am2z.parallelProcessors{ name = "slow-fan", timeout = 500, processors = {
        cancellable("w1", rec), cancellable("w2", rec), cancellable("w3", rec),
      } })
      local r, elapsed = execute_timed("slow-fan", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.TimeoutError), tostring(r.error))
      assert.is_true(elapsed >= 498 and elapsed < 500 + slack(300), "elapsed " .. elapsed)
      for _, n in ipairs({ "w1", "w2", "w3" }) do
        assert.are.equal(1, rec[n].after, n)
        assert.is_nil(rec[n].ok)
        assert.is_true(rec[n].aborted)
      end
    end)

    it("counts one version per plain child: 3 children from version 1 give version 4", function()
      rt:register(am2z.parallelProcessors{ name = "v3", processors = {
        step("v-a", function(s) s.a = 1 end, 5),
        step("v-b", function(s) s.b = 1 end),
        step("v-c", function(s) s.c = 1 end, 1),
      } })
      local r = execute("v3", am2z.createAppState("par-version", { x = 0 }))
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(4, r.state.metadata.version)
      assert.are.equal("par-version", r.state.metadata.sessionId)
      assert.is_true(r.state.a == 1 and r.state.b == 1 and r.state.c == 1)
    end)
  end)

  -- ------------------------------------------------------------------ route

  describe("routeProcessor", function()
    local hits

    before_each(function() hits = {} end)

    local function marker(name)
      return step(name, function(s)
        hits[name] = (hits[name] or 0) + 1
        s.handledBy = name
      end)
    end

    it("runs the processor the selector picks, and only that one", function()
      rt:register(am2z.routeProcessor("content", function(s) return s.contentType end,
        { post = marker("post-handler"), article = marker("article-handler") }))
      local r = execute("content", am2z.createAppState("route-1", { contentType = "article" }))
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal("article-handler", r.state.handledBy)
      assert.are.same({ ["article-handler"] = 1 }, hits)
      assert.are.equal(2, r.state.metadata.version)
    end)

    it("uses the fallback for an unknown key", function()
      rt:register(am2z.routeProcessor("content", function(s) return s.contentType end,
        { post = marker("post-handler") }, marker("generic-handler")))
      local r = execute("content", { contentType = "video" })
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal("generic-handler", r.state.handledBy)
      assert.are.same({ ["generic-handler"] = 1 }, hits)
    end)

    it("fails for an unknown key without fallback, naming the key and the known routes", function()
      rt:register(am2z.routeProcessor("content", function(s) return s.contentType end,
        { post = marker("post-handler"), article = marker("article-handler") }))
      local r = execute("content", { contentType = "podcast" })
      assert.is_false(r.success)
      local msg = tostring(r.error)
      assert.matches("podcast", msg, 1, true)
      assert.matches("post", msg, 1, true)
      assert.matches("article", msg, 1, true)
      assert.are.same({}, hits)
    end)

    it("a selector that raises fails with ProcessorExecutionError", function()
      rt:register(am2z.routeProcessor("content", function(s) return s.meta.kind end,
        { post = marker("post-handler") }, marker("generic-handler")))
      local r = execute("content", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
      assert.matches("content", tostring(r.error.details.processorName), 1, true)
      assert.are.same({}, hits)
    end)

    it("the picked processor can ctx:call another one, one level deeper", function()
      local depths = {}
      local enrich = step("enrich", function(s, ctx)
        depths.enrich = ctx.callDepth
        s.enriched = true
      end)
      local article = am2z.createProcessor("article-handler"):process(function(s, ctx)
        depths.article = ctx.callDepth
        local r = ctx:call("enrich", s)
        if not r.success then return Failure(r.error) end
        r.state.handledBy = "article-handler"
        return Success(r.state)
      end)
      rt:register(enrich)
      rt:register(am2z.routeProcessor("content", function(s) return s.contentType end,
        { article = article }))
      local r = execute("content", { contentType = "article" })
      assert.is_true(r.success, tostring(r.error))
      assert.is_true(r.state.enriched)
      assert.are.equal("article-handler", r.state.handledBy)
      assert.are.same({ article = 1, enrich = 2 }, depths)
    end)

    it("returns the child's result; a child's error keeps its class", function()
      rt:register(am2z.routeProcessor("content", function(s) return s.contentType end,
        { post = failing("post-handler", "SPAM_DETECTED") }))
      local r = execute("content", { contentType = "post" })
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.BusinessError), tostring(r.error))
      assert.are.equal("SPAM_DETECTED", r.error.code)
    end)
  end)

  -- ------------------------------------------------------------------ batch

  describe("batchProcessor", function()
    it("runs the target once per payload, concurrently, each in its payload's session", function()
      local seen, b = {}, barrier(3)
      rt:register(am2z.createProcessor("txn"):process(function(state, ctx)
        seen[#seen + 1] = { ctx = ctx.meta.sessionId, state = state.metadata.sessionId }
        seen[#seen].met = meet(b, ctx)
        state.done = true
        return Success(state)
      end))
      rt:register(am2z.batchProcessor{ name = "txn-batch", processorName = "txn", payloads = {
        am2z.createAppState("s1", { n = 1 }),
        am2z.createAppState("s2", { n = 2 }),
        am2z.createAppState("s3", { n = 3 }),
      } })
      local r = execute("txn-batch", am2z.createAppState("batch-session"))
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(3, #seen)
      table.sort(seen, function(x, y) return x.ctx < y.ctx end)
      for i, s in ipairs(seen) do
        assert.are.equal("s" .. i, s.ctx)
        assert.are.equal(s.state, s.ctx)
        assert.is_true(s.met, s.ctx .. " did not run at the same time as the other payloads")
      end
      -- the batch's own session is untouched by the payloads' sessions
      assert.are.equal("batch-session", r.state.metadata.sessionId)
    end)

    it("merges the results in payload order", function()
      local got
      rt:register(am2z.createProcessor("item"):process(function(state, ctx)
        assert(ctx:sleep((4 - state.i) * 15))   -- payload 3 finishes first
        state.last = state.i
        state["p" .. state.i] = true
        return Success(state)
      end))
      rt:register(am2z.batchProcessor{ name = "items", processorName = "item",
        payloads = { { i = 1 }, { i = 2 }, { i = 3 } } })
      rt:register(am2z.batchProcessor{ name = "items-custom", processorName = "item",
        payloads = { { i = 1 }, { i = 2 }, { i = 3 } },
        mergeFunction = function(states)
          got = {}
          for k, s in ipairs(states) do got[k] = s.i end
          return { order = got }
        end })
      local r = execute("items", {})
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal(3, r.state.last)
      assert.is_true(r.state.p1 and r.state.p2 and r.state.p3)
      local rc = execute("items-custom", {})
      assert.is_true(rc.success, tostring(rc.error))
      assert.are.same({ 1, 2, 3 }, rc.state.order)
    end)

    it("raises a ConfigurationError at definition time for empty payloads", function()
      local err = raised(function()
        am2z.batchProcessor{ name = "empty", processorName = "txn", payloads = {} }
      end)
      assert.is_true(errors.is(err, errors.ConfigurationError), tostring(err))
      assert.matches("payloads", tostring(err), 1, true)
    end)

    it("a failing payload fails the batch and cancels the rest", function()
      local rec = { after = 0 }
      rt:register(am2z.createProcessor("charge"):process(function(state, ctx)
        if state.bad then
          assert(ctx:sleep(10))
          return Failure(errors.BusinessError("INSUFFICIENT_FUNDS", "no money"))
        end
        local ok, err = ctx:sleep(2000)
        rec.after = rec.after + 1
        if not ok then rec.err = err end
        return Success(state)
      end))
      rt:register(am2z.batchProcessor{ name = "charges", processorName = "charge",
        payloads = { { id = 1 }, { id = 2, bad = true }, { id = 3 } } })
      local r, elapsed = execute_timed("charges", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
      assert.are.equal("charge", r.error.details.failedProcessor)
      assert.is_true(errors.is(r.error.cause, errors.BusinessError))
      assert.is_true(elapsed < slack(250), "elapsed " .. elapsed)
      assert.are.equal(2, rec.after)
      assert.is_true(errors.is(rec.err, errors.CancelledError), tostring(rec.err))
    end)
  end)

  -- ---------------------------------------------------------------- nesting

  describe("nesting", function()
    local function build_pipeline(log)
      local function tag(name)
        return step(name, function(s) s.path[#s.path + 1] = name; log[#log + 1] = name end)
      end
      -- parallel branches write distinct keys: the default merge is
      -- whole-state, later keys win, so a shared key would be overwritten
      local function prep(name)
        return step(name, function(s, ctx)
          s.prep = (s.prep or "") .. name .. ";"
          log[#log + 1] = name
          log[name .. "-depth"] = ctx.callDepth
        end)
      end
      local inner = am2z.chainProcessors{ name = "inner-chain",
        processors = { prep("validate"), prep("normalize") } }
      local fan = am2z.parallelProcessors{ name = "fan-out", processors = {
        inner,
        step("thumbnail", function(s) s.thumb = true; log[#log + 1] = "thumbnail" end, 5),
      } }
      local router = am2z.routeProcessor("by-kind", function(s) return s.kind end,
        { image = tag("store-image") }, tag("store-other"))
      return am2z.chainProcessors{ name = "pipeline",
        processors = { tag("ingest"), fan, router } }
    end

    it("registering the top composite registers every descendant", function()
      rt:register(build_pipeline({}))
      assert.are.same({ "by-kind", "fan-out", "ingest", "inner-chain", "normalize", "pipeline",
        "store-image", "store-other", "thumbnail", "validate" }, rt:getRegisteredProcessorNames())
    end)

    it("runs chain > parallel > chain and a route inside a chain, to depth 3", function()
      local log = {}
      rt:register(build_pipeline(log))
      local r = execute("pipeline", am2z.createAppState("nested", { kind = "image", path = {} }))
      assert.is_true(r.success, tostring(r.error))
      assert.are.same({ "ingest", "store-image" }, r.state.path)
      assert.are.equal("validate;normalize;", r.state.prep)
      assert.is_true(r.state.thumb)
      assert.are.equal(5, #log)
      -- pipeline (0) > fan-out (1) > inner-chain (2) > validate (3)
      assert.are.equal(3, log["validate-depth"])
      -- ingest, validate, normalize, thumbnail, store-image: 5 plain steps
      assert.are.equal(6, r.state.metadata.version)
    end)

    it("reports a failure deep inside with the chain of causes", function()
      local hits = {}
      local deep = am2z.chainProcessors{ name = "deep-chain", processors = {
        step("ok-step"), failing("deep-fail", "DEEP") } }
      local par = am2z.parallelProcessors{ name = "mid-par", processors = { deep, step("side", nil, 1) } }
      rt:register(am2z.chainProcessors{ name = "outer", processors = { par, sentinel("after-par", hits) } })
      local r = execute("outer", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ProcessorExecutionError))
      assert.are.equal("mid-par", r.error.details.failedProcessor)
      assert.are.equal(0, r.error.details.completedSteps)
      local root = errors.getRootCause(r.error)
      assert.is_true(errors.is(root, errors.BusinessError), tostring(root))
      assert.are.equal("DEEP", root.code)
      assert.is_nil(hits["after-par"])
    end)
  end)

  -- ------------------------------------------------------- definitions/validation

  describe("definitions", function()
    it("expose type, deps and config", function()
      local a, b = step("a", nil, nil, 30), step("b", nil, nil, 40)
      local c = am2z.chainProcessors{ name = "c", processors = { a, b }, description = "two",
        timeout = 1000 }
      assert.are.equal("chain", c.type)
      assert.are.equal("c", c.name)
      assert.are.same({ a, b }, c.deps)
      assert.are.equal(1000, c.config.timeout)
      assert.are.equal("two", c.config.description)
      local p = am2z.parallelProcessors{ name = "p", processors = { a, b } }
      assert.are.equal("parallel", p.type)
      assert.are.same({ a, b }, p.deps)
      local r = am2z.routeProcessor("r", function() return "x" end, { x = a }, b)
      assert.are.equal("router", r.type)
      assert.are.equal(2, #r.deps)
      local bt = am2z.batchProcessor{ name = "bt", processorName = "a", payloads = { {} } }
      assert.are.equal("batch", bt.type)
    end)

    it("chain and parallel reject bad processor lists with clear messages", function()
      local a = step("a")
      for _, f in ipairs({ "chainProcessors", "parallelProcessors" }) do
        assert_misuse(function() am2z[f]{ name = "x", processors = {} } end,
          f .. ": expected processors to be a non-empty list of processor definitions, got an empty table")
        assert_misuse(function() am2z[f]{ name = "x" } end,
          f .. ": expected processors to be a non-empty list of processor definitions, got nil")
        assert_misuse(function() am2z[f]{ name = "x", processors = { a, "b" } } end,
          f .. ': expected processors[2] to be a processor definition (from :process(fn) or a composite), got string "b"')
        -- a builder that was never finished with :process is not a definition
        assert_misuse(function() am2z[f]{ name = "x", processors = { am2z.createProcessor("half") } } end,
          f .. ": expected processors[1] to be a processor definition")
        assert_misuse(function() am2z[f]{ name = "x:y", processors = { a } } end,
          f .. ': expected name to be a non-empty string without ":", got string "x:y"')
        assert_misuse(function() am2z[f]{ name = "x", processors = { a }, timeout = "1m" } end,
          'expected a positive integer (ms), got string "1m"')
        assert_misuse(function() am2z[f]("x") end, f .. ': expected a table of options, got string "x"')
      end
    end)

    it("parallel and batch reject a mergeFunction that is not a function", function()
      assert_misuse(function()
        am2z.parallelProcessors{ name = "x", processors = { step("a") }, mergeFunction = "concat" }
      end, 'parallelProcessors: expected mergeFunction to be a function(states, initialState), got string "concat"')
      assert_misuse(function()
        am2z.batchProcessor{ name = "x", processorName = "a", payloads = { {} }, mergeFunction = 1 }
      end, "batchProcessor: expected mergeFunction to be a function(states, initialState), got number 1")
    end)

    it("route rejects a bad selector, routes or fallback", function()
      local a = step("a")
      assert_misuse(function() am2z.routeProcessor("r", "kind", { x = a }) end,
        'routeProcessor: expected selector to be a function(state) returning a route key, got string "kind"')
      assert_misuse(function() am2z.routeProcessor("r", function() end, {}) end,
        "routeProcessor: expected routes to be a non-empty table of key -> processor definition, got an empty table")
      assert_misuse(function() am2z.routeProcessor("r", function() end, { x = "a" }) end,
        'routeProcessor: expected routes[string "x"] to be a processor definition, got string "a"')
      assert_misuse(function() am2z.routeProcessor("r", function() end, { x = a }, "fallback") end,
        'routeProcessor: expected fallback to be a processor definition or nil, got string "fallback"')
      assert_misuse(function() am2z.routeProcessor("", function() end, { x = a }) end,
        'routeProcessor: expected name to be a non-empty string without ":", got string ""')
    end)

    it("batch rejects a missing processorName and non-table payloads", function()
      assert_misuse(function() am2z.batchProcessor{ name = "b", payloads = { {} } } end,
        "batchProcessor: expected processorName to be a non-empty string, got nil")
      assert_misuse(function() am2z.batchProcessor{ name = "b", processorName = "t", payloads = { {}, 5 } } end,
        "batchProcessor: expected payloads[2] to be a state table, got number 5")
      local err = raised(function() am2z.batchProcessor{ name = "b", processorName = "t" } end)
      assert.is_true(errors.is(err, errors.ConfigurationError), tostring(err))
    end)
  end)
end)
