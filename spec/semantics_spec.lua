-- Boundary semantics that are easy to break while optimizing the hot path.
local am2z = require("am2z")
local factory = require("runtime_factory")
local new_runtime = factory.new
local errors = am2z.errors
local Success, Failure = am2z.Success, am2z.Failure
local P = am2z.createProcessor

local function counts_zero()
  local c = require("am2z.core")._debug_counts()
  assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 }, c)
end

describe("execution boundaries (" .. factory.name .. ")", function()
  local rt
  before_each(function()
    rt = new_runtime{ logger = am2z.createSilentLogger() }
  end)
  after_each(function()
    am2z.run(function() rt:stop() end, { timeoutMs = TEST_TIMEOUT_MS })
    counts_zero()
  end)

  it("a failed result carries the caller's state, not what the body did to its copy", function()
    rt:register(P("half-done"):process(function(s)
      s.garbage = "half-done"
      error("kaput")
    end)):start()
    local input = { a = 1 }
    local r = am2z.run(function() return rt:execute("half-done", input) end, { timeoutMs = TEST_TIMEOUT_MS })
    assert.is_false(r.success)
    assert.are.same({ a = 1 }, r.state)
    assert.are_not.equal(input, r.state)       -- a copy, as every boundary gives
    assert.are.same({ a = 1 }, input)
  end)

  it("a chain's partialState is the last successful output, untouched by the failing step", function()
    rt:register(am2z.chainProcessors{ name = "c", processors = {
      P("ok"):process(function(s) s.step1 = true return Success(s) end),
      P("bad"):process(function(s) s.garbage = true return Failure("no") end),
    } }):start()
    local r = am2z.run(function() return rt:execute("c", { a = 1 }) end, { timeoutMs = TEST_TIMEOUT_MS })
    assert.is_false(r.success)
    assert.are.same({ a = 1, step1 = true }, r.error.details.partialState)
  end)

  it("a composite with a retry policy does not retry a non-retryable step failure", function()
    local runs = 0
    rt:register(am2z.chainProcessors{ name = "c", retryPolicy = { maxAttempts = 3, backoffMs = 1 },
      processors = { P("validate"):process(function()
        runs = runs + 1
        return Failure(errors.ValidationError("x", 1, "bad x"))
      end) } }):start()
    local r = am2z.run(function() return rt:execute("c", {}) end, { timeoutMs = TEST_TIMEOUT_MS })
    assert.is_false(r.success)
    assert.is_false(errors.isRetryableError(r.error))
    assert.are.equal(1, runs)
  end)

  it("executeAsync retries from the state as it was at the call, not as the caller changed it", function()
    local seen = {}
    rt:register(P("flaky"):withRetryPolicy{ maxAttempts = 2, backoffMs = 1 }:process(function(s, ctx)
      seen[#seen + 1] = s.v
      if ctx.meta.attempt == 1 then return Failure("try again") end
      return Success(s)
    end)):start()
    local r = am2z.run(function()
      local st = { v = "original" }
      local h = rt:executeAsync("flaky", st)
      st.v = "changed by the caller"
      return h:wait()
    end, { timeoutMs = TEST_TIMEOUT_MS })
    assert.is_true(r.success, tostring(r.error))
    assert.are.same({ "original", "original" }, seen)
  end)

  it("ctx:sleep and am2z.sleep reject infinite durations with their own message", function()
    rt:register(P("inf"):process(function(s, ctx) ctx:sleep(math.huge) return Success(s) end)):start()
    local r = am2z.run(function() return rt:execute("inf", {}) end, { timeoutMs = TEST_TIMEOUT_MS })
    assert.is_false(r.success)
    assert.matches("ctx:sleep: expected a finite number", r.error.message, 1, true)
    assert.has_error(function()
      am2z.run(function() am2z.sleep(math.huge) end)
    end)
  end)
end)
