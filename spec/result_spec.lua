-- Behaviour of am2z.result that processors rely on: the shape of results
-- (plain data that survives JSON), the combinators, and protected calls.
local R = require("am2z.result")
local errors = require("am2z.errors")
local cjson = require("cjson")

local Success, Failure = R.Success, R.Failure

local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return err
end

-- Argument errors must name the function and point at the caller's line.
local function assert_misuse(fn, text)
  local msg = raised(fn)
  assert.is_string(msg)
  assert.matches(text, msg, 1, true)
  assert.matches("result_spec.lua:%d+:", msg)
end

describe("am2z.result", function()
  describe("Success / Failure", function()
    it("are plain tables that survive JSON unchanged", function()
      local s, f = Success({ n = 1 }), Failure({ message = "no" })
      assert.are.same({ success = true, data = { n = 1 } }, s)
      assert.are.same({ success = false, error = { message = "no" } }, f)
      assert.is_nil(getmetatable(s))
      assert.are.same(s, cjson.decode(cjson.encode(s)))
      assert.are.same(f, cjson.decode(cjson.encode(f)))
    end)

    it("Failure keeps the error exactly as given", function()
      local e = errors.TimeoutError("t", 1)
      assert.are.equal(e, Failure(e).error)
      assert.are.equal("plain string", Failure("plain string").error)
    end)

    it("isSuccess / isFailure / isResult classify and accept any value", function()
      assert.is_true(R.isSuccess(Success(nil)))
      assert.is_false(R.isSuccess(Failure("x")))
      assert.is_true(R.isFailure(Failure("x")))
      assert.is_false(R.isFailure(Success(1)))
      for _, v in ipairs({ "x", 1, true, {}, { success = "yes" } }) do
        assert.is_false(R.isSuccess(v))
        assert.is_false(R.isFailure(v))
        assert.is_false(R.isResult(v))
      end
      assert.is_false(R.isSuccess(nil))
      assert.is_false(R.isFailure(nil))
      -- a result decoded from JSON is still a result
      assert.is_true(R.isFailure(cjson.decode('{"success":false,"error":"x"}')))
    end)
  end)

  describe("matchResult", function()
    local handlers = {
      success = function(d) return "ok:" .. d end,
      failure = function(e) return "err:" .. e end,
    }

    it("calls the matching handler and returns its value", function()
      assert.are.equal("ok:1", R.matchResult(Success(1), handlers))
      assert.are.equal("err:bad", R.matchResult(Failure("bad"), handlers))
    end)

    it("rejects bad arguments", function()
      assert_misuse(function() R.matchResult(Success(1), "nope") end,
        "matchResult: expected a table { success = function, failure = function } as argument 2, got string \"nope\"")
      assert_misuse(function() R.matchResult(Success(1), { success = print }) end,
        "matchResult: expected a table")
      assert_misuse(function() R.matchResult(42, handlers) end,
        "matchResult: expected a result table { success = boolean, ... } as argument 1, got number 42")
    end)
  end)

  describe("mapResult / mapError", function()
    local function double(x) return x * 2 end
    local function upper(e) return e:upper() end

    it("mapResult transforms data and leaves failures alone", function()
      assert.are.same(Success(4), R.mapResult(Success(2), double))
      local f = Failure("no")
      assert.are.equal(f, R.mapResult(f, double))
    end)

    it("mapError transforms errors and leaves successes alone", function()
      assert.are.same(Failure("NO"), R.mapError(Failure("no"), upper))
      local s = Success(1)
      assert.are.equal(s, R.mapError(s, upper))
    end)

    it("do not modify the given result", function()
      local s = Success(2)
      R.mapResult(s, double)
      assert.are.same(Success(2), s)
    end)

    it("reject bad arguments", function()
      assert_misuse(function() R.mapResult(Success(1)) end, "mapResult: expected a function as argument 2, got nil")
      assert_misuse(function() R.mapResult({}, double) end, "mapResult: expected a result table")
      assert_misuse(function() R.mapError(Failure(1), 7) end, "mapError: expected a function as argument 2, got number 7")
      assert_misuse(function() R.mapError("r", upper) end, "mapError: expected a result table")
    end)
  end)

  describe("chainResult", function()
    local function positive(x)
      if x > 0 then return Success(x) end
      return Failure("not positive")
    end

    it("runs the next step only after a success", function()
      assert.are.same(Success(3), R.chainResult(Success(3), positive))
      assert.are.same(Failure("not positive"), R.chainResult(Success(-1), positive))
      local calls = 0
      local f = Failure("early")
      assert.are.equal(f, R.chainResult(f, function() calls = calls + 1 end))
      assert.are.equal(0, calls)
    end)

    it("raises when the step does not return a result", function()
      assert_misuse(function() R.chainResult(Success(1), function(x) return x end) end,
        "chainResult: expected the function to return a result table, got number 1")
      assert_misuse(function() R.chainResult(Success(1), "f") end, "chainResult: expected a function")
    end)
  end)

  describe("combineResults", function()
    it("collects all data in order", function()
      assert.are.same(Success({ "a", "b", "c" }), R.combineResults({ Success("a"), Success("b"), Success("c") }))
      assert.are.same(Success({}), R.combineResults({}))
    end)

    it("returns the first failure in list order", function()
      local first, second = Failure("first"), Failure("second")
      assert.are.equal(first, R.combineResults({ Success(1), first, Success(2), second }))
    end)

    it("rejects lists with non-results, even after a failure", function()
      assert_misuse(function() R.combineResults({ Failure("x"), "oops" }) end,
        "combineResults: expected a result table at position 2, got string \"oops\"")
      assert_misuse(function() R.combineResults(nil) end, "combineResults: expected a list of result tables")
    end)
  end)

  describe("unwrapResult / unwrapOr", function()
    it("unwrapResult returns data of a success", function()
      assert.are.same({ x = 1 }, R.unwrapResult(Success({ x = 1 })))
    end)

    it("unwrapResult raises the error value itself", function()
      local e = errors.ValidationError("f", 1, "bad")
      assert.are.equal(e, raised(function() R.unwrapResult(Failure(e)) end))
      local s = raised(function() R.unwrapResult(Failure("went wrong")) end)
      assert.is_string(s)
      assert.matches("went wrong$", s)
      assert.matches("result_spec.lua:%d+:", s) -- points at the unwrap call
    end)

    it("unwrapOr falls back to the default on failure only", function()
      assert.are.equal(5, R.unwrapOr(Success(5), 0))
      assert.are.equal(0, R.unwrapOr(Failure("x"), 0))
      assert.is_false(R.unwrapOr(Success(false), true))
    end)

    it("reject non-results", function()
      assert_misuse(function() R.unwrapResult(nil) end, "unwrapResult: expected a result table")
      assert_misuse(function() R.unwrapOr(5, 1) end, "unwrapOr: expected a result table")
    end)
  end)

  describe("safeSync / safeAsync", function()
    for _, name in ipairs({ "safeSync", "safeAsync" }) do
      local safe = R[name]

      it(name .. " wraps the first return value in Success and passes arguments", function()
        assert.are.same(Success(5), safe(function(a, b) return a + b, "ignored" end, 2, 3))
        assert.are.same(Success(nil), safe(function() end))
      end)

      it(name .. " turns a raised string into a Failure with an Error and a traceback", function()
        local r = safe(function() error("kaput") end)
        assert.is_true(R.isFailure(r))
        assert.is_true(errors.is(r.error, errors.Error))
        assert.matches("kaput", r.error.message)
        assert.matches("stack traceback", r.error.details.traceback)
      end)

      it(name .. " keeps a raised am2z error as it is", function()
        local e = errors.TimeoutError("slow", 10)
        local r = safe(function() error(e) end)
        assert.are.equal(e, r.error)
        assert.is_nil(e.details.traceback)
      end)

      it(name .. " converts raised non-string values", function()
        local r = safe(function() error({ message = "table error", code = "E_T" }) end)
        assert.are.same({ "table error", "E_T" }, { r.error.message, r.error.code })
        assert.are.equal("true", safe(function() error(true) end).error.message)
      end)

      it(name .. " passes a returned result through", function()
        local f = Failure("declined")
        assert.are.equal(f, safe(function() return f end))
        local s = Success(nil)
        assert.are.equal(s, safe(function() return s end))
        -- user data that merely has a success field is still data
        assert.are.same(Success({ success = true, count = 3 }),
          safe(function() return { success = true, count = 3 } end))
      end)

      it(name .. " rejects a non-function", function()
        assert_misuse(function() safe("fn") end, name .. ": expected a function as argument 1, got string \"fn\"")
      end)
    end

    it("safeAsync lets the function yield to the coroutine that runs it", function()
      local co = coroutine.create(function()
        return R.safeAsync(function(x)
          local y = coroutine.yield("paused")
          if y < 0 then error("negative") end
          return x + y
        end, 1)
      end)
      local ok, v = coroutine.resume(co)
      assert.are.same({ true, "paused" }, { ok, v })
      local _, r = coroutine.resume(co, 41)
      assert.are.same(Success(42), r)

      co = coroutine.create(function()
        return R.safeAsync(function() coroutine.yield(); error("after yield") end)
      end)
      coroutine.resume(co)
      local _, failed = coroutine.resume(co)
      assert.is_true(R.isFailure(failed))
      assert.matches("after yield", failed.error.message)
    end)
  end)
end)
