-- Behaviour of am2z.errors that users and the runtime rely on: the class
-- table of API.md, class membership that survives JSON, and the helpers.
local errors = require("am2z.errors")
local cjson = require("cjson")

-- Returns the message of the error `fn` raises (fails if it does not raise).
local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return err
end

local function json_round_trip(e)
  return cjson.decode(cjson.encode(errors.serialize(e)))
end

describe("am2z.errors", function()
  describe("classes", function()
    -- name, code, category, retryable, severity, constructor arguments
    local table_of_api = {
      { "ValidationError", "VALIDATION_FAILED", "validation", false, "low", { "email", "x", "bad email" } },
      { "ProcessorNotFoundError", "PROCESSOR_NOT_FOUND", "execution", false, "high", { "p", { "a" } } },
      { "ProcessorExecutionError", "PROCESSOR_EXECUTION_FAILED", "execution", true, "high", { "p", "id", "boom" } },
      { "CallDepthExceededError", "CALL_DEPTH_EXCEEDED", "execution", false, "high", { "too deep", 10, 11 } },
      { "TimeoutError", "OPERATION_TIMEOUT", "timeout", true, "medium", { "slow", 50 } },
      { "CancelledError", "OPERATION_CANCELLED", "execution", false, "low", { "stopped", "shutdown" } },
      { "ResourceError", "RESOURCE_EXHAUSTED", "resource", true, "high", { "memory", "out of memory" } },
      { "NetworkError", "NETWORK_ERROR", "network", true, "medium", { "conn reset", { host = "h" } } },
      { "ConfigurationError", "INVALID_CONFIGURATION", "configuration", false, "critical", { "port", "bad port" } },
    }

    for _, row in ipairs(table_of_api) do
      local name, code, category, retryable, severity, args = unpack(row)
      it(name .. " has the fields of the API table, on the class and on instances", function()
        local C = errors[name]
        assert.are.equal(name, C.name)
        assert.are.equal(code, C.code)
        assert.are.equal(category, C.category)
        assert.are.equal(retryable, C.retryable)
        assert.are.equal(severity, C.severity)
        assert.are.equal(errors.AM2ZError, C.parent)

        local e = C(unpack(args))
        assert.are.same({ name, code, category, retryable, severity },
          { e.name, e.code, e.category, e.retryable, e.severity })
        assert.is_string(e.message)
        assert.is_table(e.details)
        assert.is_number(e.timestamp)
        assert.is_true(e.timestamp > 1.6e12) -- milliseconds, not seconds
        assert.is_true(errors.is(e, C))
        assert.is_true(e:is(errors.AM2ZError))
      end)

      it(name .. "(...) and " .. name .. ".new(...) build the same error", function()
        local a, b = errors[name](unpack(args)), errors[name].new(unpack(args))
        a.timestamp, b.timestamp = 0, 0
        assert.are.same(a, b)
        assert.are.equal(getmetatable(a), getmetatable(b))
      end)
    end

    it("BusinessError takes its code and severity from the caller", function()
      local e = errors.BusinessError("INSUFFICIENT_FUNDS", "balance too low", "high")
      assert.are.equal("INSUFFICIENT_FUNDS", e.code)
      assert.are.equal("business", e.category)
      assert.are.equal("high", e.severity)
      assert.is_false(e.retryable)
      assert.are.equal("medium", errors.BusinessError("X", "m").severity)
      assert.matches("expected severity low|medium|high|critical, got string \"urgent\"",
        raised(function() errors.BusinessError("X", "m", "urgent") end), 1, true)
    end)

    it("tostring reads as name, code and message, then the cause chain", function()
      local e = errors.TimeoutError("Processor 'x' timed out after 50ms", 50)
      assert.are.equal("TimeoutError [OPERATION_TIMEOUT]: Processor 'x' timed out after 50ms", tostring(e))
      local wrapped = errors.ProcessorExecutionError("x", "exec-1", e)
      assert.are.equal("ProcessorExecutionError [PROCESSOR_EXECUTION_FAILED]: Processor 'x' timed out after 50ms"
        .. "\ncaused by: TimeoutError [OPERATION_TIMEOUT]: Processor 'x' timed out after 50ms", tostring(wrapped))
    end)

    it("tostring survives a cause cycle", function()
      local a, b = errors.NetworkError("a"), errors.NetworkError("b")
      a.cause, b.cause = b, a
      assert.are.equal(2, select(2, tostring(a):gsub("\n", "\n")) + 1)
    end)
  end)

  describe("constructors", function()
    it("ValidationError keeps only JSON-friendly values and has a default message", function()
      local e = errors.ValidationError("age", 42)
      assert.are.equal("Validation failed for field 'age'", e.message)
      assert.are.same({ field = "age", value = 42 }, e.details)
      assert.are.equal("table", errors.ValidationError("user", { 1 }, "m").details.value)
      assert.are.equal("function", errors.ValidationError("cb", print, "m").details.value)
      assert.is_nil(errors.ValidationError("x", nil, "m").details.value)
    end)

    it("ProcessorNotFoundError lists the available processors", function()
      local e = errors.ProcessorNotFoundError("x", { "a", "b" })
      assert.are.equal("Processor 'x' not found. Available processors: a, b", e.message)
      assert.are.same({ processorName = "x", availableProcessors = { "a", "b" } }, e.details)
      assert.are.equal("Processor 'x' not found. Available processors: none",
        errors.ProcessorNotFoundError("x", {}).message)
    end)

    it("ProcessorExecutionError converts its cause and adds ids to the details", function()
      local given = { traceback = "tb" }
      local e = errors.ProcessorExecutionError("pay", "exec-7", "card declined", given)
      assert.are.equal("card declined", e.message)
      assert.are.equal("Error", e.cause.name)
      assert.are.equal("card declined", e.cause.message)
      assert.are.same({ traceback = "tb", processorName = "pay", executionId = "exec-7" }, e.details)
      assert.are.same({ traceback = "tb" }, given) -- the caller's table is not modified
      local bare = errors.ProcessorExecutionError("pay", "exec-7")
      assert.is_nil(bare.cause)
      assert.are.equal("Processor 'pay' execution failed", bare.message)
    end)

    it("carry their arguments in details", function()
      assert.are.same({ maxDepth = 10, currentDepth = 11 }, errors.CallDepthExceededError("deep", 10, 11).details)
      assert.are.equal(50, errors.TimeoutError(nil, 50).details.timeoutMs)
      assert.matches("50ms", errors.TimeoutError(nil, 50).message)
      assert.are.equal("shutdown", errors.CancelledError("stop", "shutdown").details.reason)
      assert.are.same({}, errors.CancelledError("stop").details)
      assert.are.equal("memory", errors.ResourceError("memory", "oom").details.resource)
      assert.are.same({ host = "h" }, errors.NetworkError("down", { host = "h" }).details)
      assert.are.equal("port", errors.ConfigurationError("port", "bad").details.key)
    end)

    it("Error wraps plain values and is itself an am2z error", function()
      local e = errors.Error("plain")
      assert.are.same({ "Error", "ERROR", "unknown", false },
        { e.name, e.code, e.category, e.retryable })
      assert.is_true(errors.is(e, errors.AM2ZError))
      assert.is_false(errors.is(e, errors.TimeoutError))
    end)

    it("withCause attaches a converted cause", function()
      local e = errors.NetworkError("down"):withCause("ECONNRESET")
      assert.are.equal("ECONNRESET", e.cause.message)
    end)
  end)

  describe("is", function()
    local PaymentError = errors.define{ name = "SpecPaymentError", code = "PAYMENT", category = "business" }
    local CardDeclined = errors.define{ name = "SpecCardDeclined", parent = PaymentError, retryable = true }

    it("matches the class and its ancestors, not siblings", function()
      local e = CardDeclined("declined", { last4 = "4242" })
      assert.is_true(errors.is(e, CardDeclined))
      assert.is_true(errors.is(e, PaymentError))
      assert.is_true(errors.is(e, errors.AM2ZError))
      assert.is_false(errors.is(PaymentError("x"), CardDeclined))
      assert.is_false(errors.is(e, errors.ValidationError))
    end)

    it("returns false for values that are not errors", function()
      for _, v in ipairs({ "TimeoutError", 42, true, {}, { name = "Nope" }, errors.TimeoutError }) do
        assert.is_false(errors.is(v, errors.TimeoutError))
      end
      assert.is_false(errors.is(nil, errors.AM2ZError))
    end)

    it("raises when the class argument is not a class (a typo would else read as false)", function()
      assert.matches("errors.is: expected an error class as argument 2, got nil",
        raised(function() errors.is(errors.Error("x"), errors.TimoutError) end), 1, true)
    end)

    it("survives a real JSON round trip, for built-in and defined classes", function()
      local t = json_round_trip(errors.TimeoutError("slow", 50))
      assert.is_nil(getmetatable(t))
      assert.is_true(errors.is(t, errors.TimeoutError))
      assert.is_true(errors.is(t, errors.AM2ZError))
      assert.is_false(errors.is(t, errors.NetworkError))
      local c = json_round_trip(CardDeclined("declined"))
      assert.is_true(errors.is(c, PaymentError))
      assert.is_false(errors.is(c, errors.BusinessError))
    end)

    it("treats a serialized error of a class unknown here as an AM2ZError", function()
      local remote = { name = "RemoteOnlyError", code = "REMOTE", message = "far away" }
      assert.is_true(errors.is(remote, errors.AM2ZError))
      assert.is_false(errors.is(remote, errors.TimeoutError))
    end)
  end)

  describe("define", function()
    it("builds a class with defaults from its parent", function()
      local Quota = errors.define{ name = "SpecQuotaError", parent = errors.ResourceError,
                                   message = "quota exceeded" }
      local e = Quota(nil, { limit = 3 })
      assert.are.equal("SpecQuotaError", e.name)
      assert.are.equal("SPEC_QUOTA_ERROR", e.code)
      assert.are.equal("resource", e.category)
      assert.is_true(e.retryable)
      assert.are.equal("quota exceeded", e.message)
      assert.are.same({ limit = 3 }, e.details)
      assert.are.equal(Quota, errors.getClass("SpecQuotaError"))
      assert.is_true(errors.is(e, errors.ResourceError))
    end)

    it("validates its argument, naming the bad value", function()
      local cases = {
        { nil, "errors.define: expected a table" },
        { { name = "" }, "errors.define: expected a non-empty string name, got string \"\"" },
        { { name = 5 }, "errors.define: expected a non-empty string name, got number 5" },
        { { name = "X1", code = "" }, "expected code to be a non-empty string" },
        { { name = "X1", retryable = "yes" }, "expected retryable to be a boolean, got string \"yes\"" },
        { { name = "X1", severity = "huge" }, "expected severity low|medium|high|critical" },
        { { name = "X1", parent = {} }, "expected parent to be an error class, got table" },
        { { name = "TimeoutError" }, "belongs to a built-in error class" },
      }
      for _, case in ipairs(cases) do
        local msg = raised(function() errors.define(case[1]) end)
        assert.matches(case[2], msg, 1, true)
        assert.matches("errors_spec.lua:%d+:", msg) -- reported at the caller
      end
    end)

    it("may redefine a user class (module reload) and old instances still match", function()
      local Old = errors.define{ name = "SpecReloaded" }
      local e = Old("before reload")
      local New = errors.define{ name = "SpecReloaded" }
      assert.are_not.equal(Old, New)
      assert.is_true(errors.is(e, New))
      assert.are.equal(New, getmetatable(errors.deserialize(errors.serialize(e))))
    end)
  end)

  describe("serialize / deserialize", function()
    it("produces a plain JSON-encodable table even from awkward details", function()
      local cyclic = {}
      cyclic.self = cyclic
      local e = errors.NetworkError("down", {
        fn = print, inf = math.huge, sparse = { [1] = "a", [5] = "b" }, cyclic = cyclic, list = { 1, 2, 3 },
      })
      local t = errors.serialize(e)
      assert.is_nil(getmetatable(t))
      local decoded = cjson.decode(cjson.encode(t))
      assert.are.same({ 1, 2, 3 }, decoded.details.list)
      assert.are.same({ ["1"] = "a", ["5"] = "b" }, decoded.details.sparse)
      assert.is_string(decoded.details.fn)
      assert.are.equal("inf", decoded.details.inf)
      assert.are.equal("NetworkError", decoded.name)
      assert.are.equal(e.timestamp, decoded.timestamp)
    end)

    it("round-trips every field and the cause chain through JSON", function()
      local root = errors.TimeoutError("slow", 50)
      local e = errors.ProcessorExecutionError("p", "exec-1", root, { attempt = 2 })
      local back = errors.deserialize(json_round_trip(e))
      assert.are.equal(errors.ProcessorExecutionError, getmetatable(back))
      for _, k in ipairs({ "name", "code", "message", "category", "severity", "retryable", "timestamp" }) do
        assert.are.equal(e[k], back[k])
      end
      assert.are.same(e.details, back.details)
      assert.is_true(errors.is(back.cause, errors.TimeoutError))
      assert.are.equal(50, back.cause.details.timeoutMs)
      assert.are.equal(tostring(e), tostring(back))
    end)

    it("keeps a BusinessError's own code and severity", function()
      local back = errors.deserialize(json_round_trip(errors.BusinessError("OUT_OF_STOCK", "none left", "low")))
      assert.are.same({ "OUT_OF_STOCK", "low" }, { back.code, back.severity })
    end)

    it("turns an unknown class into an AM2ZError that keeps the sent identity", function()
      local back = errors.deserialize({ name = "RemoteOnlyError", code = "REMOTE", message = "m",
                                        category = "network", retryable = true })
      assert.are.same({ "RemoteOnlyError", "REMOTE", "network", true },
        { back.name, back.code, back.category, back.retryable })
      assert.is_true(errors.is(back, errors.AM2ZError))
      assert.matches("RemoteOnlyError [REMOTE]: m", tostring(back), 1, true)
    end)
  end)

  describe("from", function()
    it("converts any value to an am2z error", function()
      local e = errors.TimeoutError("t", 1)
      assert.are.equal(e, errors.from(e))
      assert.are.equal(errors.TimeoutError, getmetatable(errors.from(json_round_trip(e))))
      local m = errors.from({ message = "boom", code = "E_BOOM" })
      assert.are.same({ "Error", "boom", "E_BOOM" }, { m.name, m.message, m.code })
      assert.are.equal("oops", errors.from("oops").message)
      assert.are.equal("42", errors.from(42).message)
      assert.are.equal("nil", errors.from(nil).message)
      assert.is_true(errors.is(errors.from(false), errors.Error))
    end)
  end)

  describe("helpers", function()
    it("isRetryableError follows the retryable flag only", function()
      assert.is_true(errors.isRetryableError(errors.TimeoutError("t")))
      assert.is_true(errors.isRetryableError(json_round_trip(errors.NetworkError("n"))))
      assert.is_false(errors.isRetryableError(errors.ValidationError("f")))
      assert.is_false(errors.isRetryableError({ retryable = "true" }))
      assert.is_false(errors.isRetryableError("TimeoutError"))
      assert.is_false(errors.isRetryableError(nil))
    end)

    it("extractErrorDetails gives a plain description with the cause", function()
      local e = errors.ProcessorExecutionError("p", "id", errors.TimeoutError("slow", 5))
      local d = errors.extractErrorDetails(e)
      assert.is_nil(getmetatable(d))
      assert.are.equal("ProcessorExecutionError", d.name)
      assert.are.equal("p", d.details.processorName)
      assert.are.equal("TimeoutError", d.cause.name)
      assert.are.equal(5, d.cause.details.timeoutMs)
      assert.are.equal("Error", errors.extractErrorDetails("plain").name)
    end)

    it("wrapAsProcessorError keeps am2z errors and wraps everything else", function()
      local t = errors.TimeoutError("t")
      assert.are.equal(t, errors.wrapAsProcessorError(t, "p", "id"))
      assert.are.equal(errors.TimeoutError, getmetatable(errors.wrapAsProcessorError(json_round_trip(t), "p", "id")))
      for _, raw in ipairs({ "boom", { message = "boom" }, errors.Error("boom") }) do
        local w = errors.wrapAsProcessorError(raw, "p", "id")
        assert.is_true(errors.is(w, errors.ProcessorExecutionError))
        assert.are.equal("boom", w.message)
        assert.are.same({ processorName = "p", executionId = "id" }, w.details)
        assert.are.equal("boom", w.cause.message)
      end
    end)

    it("getRootCause follows the chain to its end", function()
      local root = errors.NetworkError("reset")
      local e = errors.ProcessorExecutionError("a", "1", errors.ProcessorExecutionError("b", "2", root))
      assert.are.equal(root, errors.getRootCause(e))
      assert.are.equal(root, errors.getRootCause(root))
      assert.are.equal("reset", errors.getRootCause(json_round_trip(e)).message)
      local a, b = errors.Error("a"), errors.Error("b")
      a.cause, b.cause = b, a
      assert.is_table(errors.getRootCause(a)) -- a cycle terminates
    end)
  end)

  describe("fromCore", function()
    it("maps C core error names to classes", function()
      local cases = {
        { "ETIMEDOUT", { timeoutMs = 50 }, errors.TimeoutError },
        { "ECANCELED", nil, errors.CancelledError },
        { "ENOMEM", nil, errors.ResourceError },
        { "ECONNREFUSED", { host = "h" }, errors.NetworkError },
        { "ECONNRESET", nil, errors.NetworkError },
        { "ENETWORK", nil, errors.NetworkError },
        { "EIO", nil, errors.NetworkError },
        { "EDEPTH", { maxDepth = 3, currentDepth = 4 }, errors.CallDepthExceededError },
        { "EINVAL", { field = "timeout" }, errors.ValidationError },
        { "ENOTFOUND", { processorName = "x", availableProcessors = { "a" } }, errors.ProcessorNotFoundError },
      }
      for _, case in ipairs(cases) do
        local e = errors.fromCore(case[1], "core says", case[2])
        assert.is_true(errors.is(e, case[3]), case[1])
        assert.are.equal(case[1], e.details.coreCode)
      end
      assert.are.equal(50, errors.fromCore("ETIMEDOUT", "t", { timeoutMs = 50 }).details.timeoutMs)
      assert.are.equal("memory", errors.fromCore("ENOMEM", "oom").details.resource)
      assert.are.equal("h", errors.fromCore("ECONNREFUSED", "r", { host = "h" }).details.host)
      assert.are.equal(3, errors.fromCore("EDEPTH", "d", { maxDepth = 3 }).details.maxDepth)
      assert.are.equal("timeout", errors.fromCore("EINVAL", "bad", { field = "timeout" }).details.field)
      assert.are.equal("argument", errors.fromCore("EINVAL", "bad").details.field)
      assert.matches("Processor 'x' not found", errors.fromCore("ENOTFOUND", nil,
        { processorName = "x", availableProcessors = { "a" } }).message, 1, true)
    end)

    it("keeps unknown codes on a base AM2ZError", function()
      local e = errors.fromCore("EWEIRD", "strange")
      assert.are.equal(errors.AM2ZError, getmetatable(e))
      assert.are.same({ "AM2ZError", "EWEIRD", "strange" }, { e.name, e.code, e.message })
    end)
  end)
end)
