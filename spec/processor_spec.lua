-- The processor builder (API.md "Processors"): what a user writes when
-- defining a processor. Every bad argument is reported where it was written,
-- naming the method, the value and what was expected; builders are values
-- that can be shared and derived from without leaking configuration.
local am2z = require("am2z")
local types = require("am2z.types")

local function noop(state) return am2z.Success(state) end

local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return err
end

-- A builder error is a string that contains `text` literally and points at
-- this file (error level 2: the caller's line, not processor.lua's).
local function assert_misuse(fn, text)
  local msg = raised(fn)
  assert.is_string(msg)
  assert.matches(text, msg, 1, true)
  assert.matches("processor_spec%.lua:%d+:", msg)
end

describe("am2z.createProcessor", function()
  describe("names", function()
    it("accepts a plain name and exposes it as p.name with p.type 'processor'", function()
      local p = am2z.createProcessor("process-payment"):process(noop)
      assert.are.equal("process-payment", p.name)
      assert.are.equal("processor", p.type)
      assert.are.same({}, p.deps)
    end)

    it("rejects an empty name, a name with ':' and non-strings", function()
      assert_misuse(function() am2z.createProcessor("") end,
        'createProcessor: expected name to be a non-empty string without ":", got string ""')
      assert_misuse(function() am2z.createProcessor("orders:pay") end,
        'createProcessor: expected name to be a non-empty string without ":", got string "orders:pay"')
      assert_misuse(function() am2z.createProcessor(nil) end,
        'createProcessor: expected name to be a non-empty string without ":", got nil')
      assert_misuse(function() am2z.createProcessor(42) end, "got number 42")
    end)
  end)

  describe("withDescription", function()
    it("stores the description in p.config.description", function()
      local p = am2z.createProcessor("d"):withDescription("Process customer payment"):process(noop)
      assert.are.equal("Process customer payment", p.config.description)
    end)

    it("rejects a non-string", function()
      assert_misuse(function() am2z.createProcessor("d"):withDescription(5) end,
        "withDescription: expected a string, got number 5")
      assert_misuse(function() am2z.createProcessor("d"):withDescription(nil) end,
        "withDescription: expected a string, got nil")
    end)
  end)

  describe("withTimeout", function()
    it("stores a positive integer number of ms in p.config.timeout", function()
      local p = am2z.createProcessor("t"):withTimeout(5000):process(noop)
      assert.are.equal(5000, p.config.timeout)
    end)

    it("rejects strings, zero, negatives, fractions, inf and NaN with the API.md message", function()
      assert_misuse(function() am2z.createProcessor("t"):withTimeout("5s") end,
        'withTimeout: expected a positive integer (ms), got string "5s"')
      assert_misuse(function() am2z.createProcessor("t"):withTimeout(0) end,
        "withTimeout: expected a positive integer (ms), got number 0")
      assert_misuse(function() am2z.createProcessor("t"):withTimeout(-10) end,
        "withTimeout: expected a positive integer (ms), got number -10")
      assert_misuse(function() am2z.createProcessor("t"):withTimeout(1.5) end,
        "withTimeout: expected a positive integer (ms), got number 1.5")
      assert_misuse(function() am2z.createProcessor("t"):withTimeout(math.huge) end,
        "withTimeout: expected a positive integer (ms)")
      assert_misuse(function() am2z.createProcessor("t"):withTimeout(0 / 0) end,
        "withTimeout: expected a positive integer (ms)")
      assert_misuse(function() am2z.createProcessor("t"):withTimeout() end,
        "withTimeout: expected a positive integer (ms), got nil")
    end)
  end)

  describe("withRetryPolicy", function()
    it("keeps every documented option in p.config.retryPolicy", function()
      local function sr() return true end
      local function orr() end
      local function oe() end
      local p = am2z.createProcessor("r"):withRetryPolicy{
        maxAttempts = 3, backoffMs = 1000, backoffMultiplier = 2, maxBackoffMs = 30000,
        jitter = false, shouldRetry = sr, onRetry = orr, onExhausted = oe,
      }:process(noop)
      local rp = p.config.retryPolicy
      assert.are.equal(3, rp.maxAttempts)
      assert.are.equal(1000, rp.backoffMs)
      assert.are.equal(2, rp.backoffMultiplier)
      assert.are.equal(30000, rp.maxBackoffMs)
      assert.is_false(rp.jitter)
      assert.are.equal(sr, rp.shouldRetry)
      assert.are.equal(orr, rp.onRetry)
      assert.are.equal(oe, rp.onExhausted)
    end)

    it("rejects a non-table and unknown options, listing the known ones", function()
      assert_misuse(function() am2z.createProcessor("r"):withRetryPolicy(3) end,
        "withRetryPolicy: expected a table of options, got number 3")
      local msg = raised(function() am2z.createProcessor("r"):withRetryPolicy{ maxAttemps = 3 } end)
      assert.matches('withRetryPolicy: unknown option string "maxAttemps"', msg, 1, true)
      assert.matches("maxAttempts", msg, 1, true)
      assert.matches("processor_spec%.lua:%d+:", msg)
    end)

    it("rejects out-of-range and wrongly typed values, naming the option", function()
      -- jitter is given explicitly so each case isolates the option under test
      local function bad(opts, text)
        if opts.jitter == nil then opts.jitter = false end
        assert_misuse(function() am2z.createProcessor("r"):withRetryPolicy(opts) end, text)
      end
      bad({ maxAttempts = 0 }, "withRetryPolicy: expected maxAttempts to be a positive integer, got number 0")
      bad({ maxAttempts = 2.5 }, "expected maxAttempts to be a positive integer, got number 2.5")
      bad({ maxAttempts = "3" }, 'expected maxAttempts to be a positive integer, got string "3"')
      bad({ backoffMs = -1 }, "withRetryPolicy: expected backoffMs to be a number >= 0 (ms), got number -1")
      bad({ backoffMultiplier = 0.5 }, "expected backoffMultiplier to be a number >= 1, got number 0.5")
      bad({ maxBackoffMs = "30s" }, 'expected maxBackoffMs to be a number >= 0 (ms), got string "30s"')
      bad({ jitter = "yes" }, 'expected jitter to be a boolean, got string "yes"')
      bad({ shouldRetry = true }, "expected shouldRetry to be a function, got boolean true")
      bad({ onRetry = "log" }, 'expected onRetry to be a function, got string "log"')
      bad({ onExhausted = 1 }, "expected onExhausted to be a function, got number 1")
    end)

    it("rejects NaN for the backoff numbers", function()
      local nan = 0 / 0
      for _, k in ipairs({ "backoffMs", "backoffMultiplier", "maxBackoffMs" }) do
        local ok, msg = pcall(function()
          am2z.createProcessor("r"):withRetryPolicy{ [k] = nan, jitter = false }
        end)
        assert.is_false(ok, k .. " = NaN was accepted")
        assert.matches("withRetryPolicy: expected " .. k, msg, 1, true)
      end
    end)

    it("every option is optional: { maxAttempts = 3 } alone is a valid policy", function()
      local p = am2z.createProcessor("r"):withRetryPolicy{ maxAttempts = 3 }:process(noop)
      assert.are.equal(3, p.config.retryPolicy.maxAttempts)
      assert.is_false(p.config.retryPolicy.jitter)
      assert.is_table(am2z.createProcessor("r"):withRetryPolicy{}:process(noop).config.retryPolicy)
    end)

    it("copies the policy: changing the caller's table later changes nothing", function()
      local opts = { maxAttempts = 3, jitter = false }
      local p = am2z.createProcessor("r"):withRetryPolicy(opts):process(noop)
      opts.maxAttempts = 99
      assert.are.equal(3, p.config.retryPolicy.maxAttempts)
    end)
  end)

  describe("withQueueConfig", function()
    it("stores concurrency, priority and rateLimitRpm in p.config.queueConfig", function()
      local p = am2z.createProcessor("q")
        :withQueueConfig{ concurrency = 3, priority = 1, rateLimitRpm = 100 }:process(noop)
      assert.are.same({ concurrency = 3, priority = 1, rateLimitRpm = 100 }, p.config.queueConfig)
    end)

    it("rejects a non-table, unknown options and bad values", function()
      local function bad(opts, text)
        assert_misuse(function() am2z.createProcessor("q"):withQueueConfig(opts) end, text)
      end
      bad("fast", 'withQueueConfig: expected a table of options, got string "fast"')
      bad({ concurency = 3 },
        'withQueueConfig: unknown option string "concurency" (expected concurrency, priority, rateLimitRpm)')
      bad({ concurrency = 0 }, "withQueueConfig: expected concurrency to be a positive number, got number 0")
      bad({ concurrency = 2.5 }, "withQueueConfig: expected concurrency to be a positive integer, got number 2.5")
      bad({ priority = -1 }, "withQueueConfig: expected priority to be an integer >= 0, got number -1")
      bad({ rateLimitRpm = "100" }, 'withQueueConfig: expected rateLimitRpm to be a positive number, got string "100"')
    end)

    it("copies the table: changing the caller's table later changes nothing", function()
      local qc = { concurrency = 3 }
      local p = am2z.createProcessor("q"):withQueueConfig(qc):process(noop)
      qc.concurrency = 50
      qc.priority = 7
      assert.are.same({ concurrency = 3 }, p.config.queueConfig)
    end)
  end)

  describe("withState and process", function()
    it("withState rejects something that is not an am2z.types schema", function()
      assert_misuse(function() am2z.createProcessor("s"):withState({ name = "string" }) end,
        "withState: expected a schema from am2z.types, got table")
      -- a real schema is accepted
      am2z.createProcessor("s"):withState(types.record{ n = types.number }):process(noop)
    end)

    it("process rejects a non-function", function()
      assert_misuse(function() am2z.createProcessor("p"):process("noop") end,
        'process: expected a function(state, ctx), got string "noop"')
      assert_misuse(function() am2z.createProcessor("p"):process() end,
        "process: expected a function(state, ctx), got nil")
    end)

    it("a definition has empty config when no with* method was used", function()
      local p = am2z.createProcessor("plain"):process(noop)
      assert.is_nil(p.config.description)
      assert.is_nil(p.config.timeout)
      assert.is_nil(p.config.retryPolicy)
      assert.is_nil(p.config.queueConfig)
    end)
  end)

  describe("immutability", function()
    it("each with* returns a new builder; the base builder is unchanged", function()
      local base = am2z.createProcessor("base"):withTimeout(100)
      local a = base:withDescription("A")
      local b = base:withTimeout(200)
      assert.are_not.equal(base, a)
      assert.are_not.equal(base, b)
      local pb = base:process(noop)
      assert.are.equal(100, pb.config.timeout)
      assert.is_nil(pb.config.description)
    end)

    it("two processors derived from one base builder do not share config", function()
      local base = am2z.createProcessor("shared"):withTimeout(100)
        :withRetryPolicy{ maxAttempts = 2, jitter = false }
      local pa = base:withDescription("A"):withQueueConfig{ concurrency = 1 }:process(noop)
      local pb = base:withTimeout(250):withRetryPolicy{ maxAttempts = 5, jitter = false }:process(noop)
      assert.are.equal(100, pa.config.timeout)
      assert.are.equal(250, pb.config.timeout)
      assert.are.equal("A", pa.config.description)
      assert.is_nil(pb.config.description)
      assert.are.equal(2, pa.config.retryPolicy.maxAttempts)
      assert.are.equal(5, pb.config.retryPolicy.maxAttempts)
      assert.are.same({ concurrency = 1 }, pa.config.queueConfig)
      assert.is_nil(pb.config.queueConfig)
    end)

    it("mutating one definition's config does not affect another from the same builder", function()
      local base = am2z.createProcessor("m"):withTimeout(100)
      local p1 = base:process(noop)
      local p2 = base:process(noop)
      assert.are_not.equal(p1.config, p2.config)
      p1.config.timeout = 999
      p1.config.description = "changed"
      assert.are.equal(100, p2.config.timeout)
      assert.is_nil(p2.config.description)
      assert.are.equal(100, base:process(noop).config.timeout)
    end)

    it("withState on a derived builder does not attach the schema to the base", function()
      local schema = types.record{ n = types.number }
      local base = am2z.createProcessor("typed")
      local typed = base:withState(schema):process(noop)
      local untyped = base:process(noop)
      assert.are.equal(schema, typed.stateSchema)
      assert.is_nil(untyped.stateSchema)
    end)
  end)

  describe("definitions at run time", function()
    local rt
    before_each(function()
      rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
    end)
    after_each(function()
      am2z.run(function() rt:stop() end, { timeoutMs = TEST_TIMEOUT_MS })
      local c = require("am2z.core")._debug_counts()
      assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 },
        { execs = c.execs, timers = c.timers, threads = c.threads, results = c.results })
    end)

    it("a processor built from a shared base runs with its own timeout", function()
      local base = am2z.createProcessor("slow-base"):withTimeout(5000)
      local function body(state, ctx)
        assert(ctx:sleep(60))
        return am2z.Success(state)
      end
      rt:register(base:withTimeout(20):process(body))       -- name "slow-base", 20 ms
      local r = am2z.run(function()
        rt:start()
        return rt:execute("slow-base", {})
      end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.is_false(r.success)
      assert.is_true(am2z.errors.is(r.error, am2z.errors.TimeoutError))
      assert.are.equal(5000, base:process(body).config.timeout)
    end)
  end)
end)
