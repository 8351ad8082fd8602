-- State helpers and state managers (API.md "State", Precise rules 13, 18):
-- app-state metadata, branding, the JSON copy every processor boundary
-- uses, and MemoryStateManager's get/set/update semantics.
local am2z = require("am2z")
local statem = require("am2z.state")
local errors = am2z.errors
local core = require("am2z.core")
local cjson = require("cjson")

local ISO_UTC_MS = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"

local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return err
end

local function assert_no_leaks()
  local c = core._debug_counts()
  assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 },
    { execs = c.execs, timers = c.timers, threads = c.threads, results = c.results })
end

describe("am2z state", function()
  describe("createAppState", function()
    it("returns extra plus metadata { version = 1, sessionId, createdAt, lastUpdated }", function()
      local s = am2z.createAppState("session-1", { user = "ada", items = { 1, 2 } })
      assert.are.equal("ada", s.user)
      assert.are.same({ 1, 2 }, s.items)
      local m = s.metadata
      assert.are.equal(1, m.version)
      assert.are.equal("session-1", m.sessionId)
      assert.matches(ISO_UTC_MS, m.createdAt)
      assert.matches(ISO_UTC_MS, m.lastUpdated)
      assert.are.equal(m.createdAt, m.lastUpdated)
    end)

    it("timestamps are the current UTC time", function()
      local s = am2z.createAppState("now")
      local y, mo, d, h, mi, sec = s.metadata.createdAt:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)")
      local now = os.date("!*t")
      local stamp = os.time{ year = tonumber(y), month = tonumber(mo), day = tonumber(d),
        hour = tonumber(h), min = tonumber(mi), sec = tonumber(sec) }
      local ref = os.time{ year = now.year, month = now.month, day = now.day,
        hour = now.hour, min = now.min, sec = now.sec }
      assert.is_true(math.abs(stamp - ref) <= 2, s.metadata.createdAt)
    end)

    it("does not modify the extra table it was given", function()
      local extra = { a = 1 }
      local s = am2z.createAppState("s", extra)
      assert.are_not.equal(extra, s)
      assert.is_nil(extra.metadata)
    end)

    it("works without extra and rejects a bad sessionId", function()
      assert.are.same({ "metadata" }, (function()
        local keys = {}
        for k in pairs(am2z.createAppState("only")) do keys[#keys + 1] = k end
        return keys
      end)())
      assert.matches("createAppState: expected sessionId to be a non-empty string",
        raised(function() am2z.createAppState("") end), 1, true)
      assert.matches("createAppState: expected sessionId",
        raised(function() am2z.createAppState(nil) end), 1, true)
      assert.matches("state_spec%.lua:%d+:", raised(function() am2z.createAppState(42) end))
    end)
  end)

  describe("updateStateMetadata", function()
    it("returns a copy with version + 1 and a new lastUpdated; the original is untouched", function()
      local s = am2z.createAppState("u", { n = 5 })
      s.metadata.lastUpdated = "2000-01-01T00:00:00.000Z"
      local created = s.metadata.createdAt
      local u = am2z.updateStateMetadata(s)
      assert.are_not.equal(s, u)
      assert.are_not.equal(s.metadata, u.metadata)
      assert.are.equal(2, u.metadata.version)
      assert.are.equal(5, u.n)
      assert.are.equal("u", u.metadata.sessionId)
      assert.are.equal(created, u.metadata.createdAt)
      assert.matches(ISO_UTC_MS, u.metadata.lastUpdated)
      assert.are_not.equal("2000-01-01T00:00:00.000Z", u.metadata.lastUpdated)
      -- original
      assert.are.equal(1, s.metadata.version)
      assert.are.equal("2000-01-01T00:00:00.000Z", s.metadata.lastUpdated)
      assert.are.equal(3, am2z.updateStateMetadata(u).metadata.version)
    end)
  end)

  describe("createNonEmptyArray", function()
    it("returns a non-empty array and raises a ValidationError for an empty one", function()
      local t = { "x" }
      assert.are.equal(t, am2z.createNonEmptyArray(t))
      local err = raised(function() am2z.createNonEmptyArray({}) end)
      assert.is_true(errors.is(err, errors.ValidationError), tostring(err))
      assert.is_true(errors.is(raised(function() am2z.createNonEmptyArray("x") end),
        errors.ValidationError))
    end)
  end)

  describe("brand / isBrandedState", function()
    it("marks a state with a brand that survives the JSON copy", function()
      local s = am2z.brand({ id = 1 }, "user")
      assert.is_true(am2z.isBrandedState(s, "user"))
      assert.is_false(am2z.isBrandedState(s, "admin"))
      assert.is_false(am2z.isBrandedState({ id = 1 }, "user"))
      assert.is_false(am2z.isBrandedState(nil, "user"))
      local c = assert(statem.copy(s))
      assert.is_true(am2z.isBrandedState(c, "user"))
      local rt = cjson.decode(cjson.encode(s))
      assert.is_true(am2z.isBrandedState(rt, "user"))
    end)

    it("rejects a non-table state and an empty brand", function()
      assert.matches("brand: expected a state table", raised(function() am2z.brand("s", "user") end), 1, true)
      assert.matches("brand: expected brand to be a non-empty string",
        raised(function() am2z.brand({}, "") end), 1, true)
    end)
  end)

  describe("copy (JSON semantics)", function()
    local copy = statem.copy

    it("returns a deep copy sharing no table with the original", function()
      local orig = { a = { b = { c = { 1, 2, { d = "x" } } } }, flag = true, n = 1.5, s = "str" }
      local c = assert(copy(orig))
      assert.are.same(orig, c)
      assert.are_not.equal(orig.a, c.a)
      assert.are_not.equal(orig.a.b.c, c.a.b.c)
      assert.are_not.equal(orig.a.b.c[3], c.a.b.c[3])
      c.a.b.c[3].d = "changed"
      assert.are.equal("x", orig.a.b.c[3].d)
    end)

    it("copies a table referenced twice (not a cycle) into two tables", function()
      local shared = { v = 1 }
      local c = assert(copy({ x = shared, y = shared }))
      assert.are.same({ v = 1 }, c.x)
      assert.are.same({ v = 1 }, c.y)
      assert.are_not.equal(shared, c.x)
    end)

    it("accepts cjson.null in maps and arrays", function()
      local c = assert(copy({ a = cjson.null, l = { 1, cjson.null, 3 } }))
      assert.are.equal(cjson.null, c.a)
      assert.are.equal(cjson.null, c.l[2])
      assert.are.equal(3, c.l[3])
    end)

    local function rejects(value, path, what)
      local c, msg, p = copy(value)
      assert.is_nil(c)
      assert.is_string(msg)
      assert.are.equal(path, p)
      assert.matches(path .. ": cannot be represented in JSON", msg, 1, true)
      assert.matches(what, msg, 1, true)
    end

    it("rejects functions and userdata, naming the path", function()
      rejects({ cfg = { onDone = print } }, "cfg.onDone", "function")
      rejects({ list = { 1, io.stdout } }, "list[2]", "userdata")
    end)

    it("rejects a cycle, naming where it closes", function()
      local t = { a = { name = "inner" } }
      t.a.parent = t
      rejects(t, "a.parent", "cycle")
    end)

    it("rejects sparse and mixed arrays", function()
      rejects({ items = { 1, nil, 3 } }, "items[1]", "sparse")
      local c, msg = copy({ rows = { 1, 2, extra = true } })
      assert.is_nil(c)
      assert.matches("rows%[%d%]: cannot be represented in JSON", msg)
      assert.matches("mixed", msg, 1, true)
    end)

    it("rejects NaN and infinities", function()
      rejects({ price = 0 / 0 }, "price", "nan")
      rejects({ limits = { max = math.huge } }, "limits.max", "inf")
      rejects({ xs = { 1, -math.huge } }, "xs[2]", "inf")
    end)

    it("rejects non-string keys", function()
      rejects({ m = { [true] = 1 } }, "m[true]", "key of type boolean")
      rejects({ m = { [1.5] = "x" } }, "m[1.5]", "non-integer number key")
    end)
  end)

  describe("MemoryStateManager", function()
    local sm
    before_each(function() sm = am2z.MemoryStateManager.new() end)

    it("get returns nil for an unknown session and { state, version } after set", function()
      assert.is_nil(sm:get("s"))
      assert.is_false(sm:exists("s"))
      assert.is_nil(sm:getVersion("s"))
      sm:set("s", { n = 1 })
      local e = sm:get("s")
      assert.are.same({ state = { n = 1 }, version = 1 }, e)
      assert.is_true(sm:exists("s"))
    end)

    it("get returns a copy: mutating it does not change the store", function()
      local input = { list = { 1 } }
      sm:set("s", input)
      input.list[2] = "caller kept a reference"
      local e = sm:get("s")
      e.state.list[1] = "mutated"
      e.state.added = true
      assert.are.same({ list = { 1 } }, sm:get("s").state)
    end)

    it("increments the version on every set, per session", function()
      assert.are.equal(1, sm:set("a", { v = 1 }))
      assert.are.equal(2, sm:set("a", { v = 2 }))
      sm:set("a", { v = 3 })
      sm:set("b", { v = 1 })
      assert.are.equal(3, sm:getVersion("a"))
      assert.are.equal(1, sm:getVersion("b"))
      assert.are.same({ state = { v = 3 }, version = 3 }, sm:get("a"))
    end)

    it("set rejects a state JSON cannot carry with a ValidationError", function()
      local err = raised(function() sm:set("s", { cb = print }) end)
      assert.is_true(errors.is(err, errors.ValidationError), tostring(err))
      assert.matches("cb", tostring(err), 1, true)
      assert.is_false(sm:exists("s"))
    end)

    it("delete removes the session and reports whether it existed", function()
      sm:set("s", {})
      assert.is_true(sm:delete("s"))
      assert.is_false(sm:exists("s"))
      assert.is_nil(sm:get("s"))
      assert.is_false(sm:delete("s"))
    end)

    it("update passes a copy of the current state and stores fn's result", function()
      sm:set("s", { n = 1 })
      local calls = 0
      local new = sm:update("s", function(cur)
        calls = calls + 1
        cur.n = cur.n + 1
        return cur
      end)
      assert.are.equal(1, calls)
      assert.are.same({ n = 2 }, new)
      assert.are.same({ state = { n = 2 }, version = 2 }, sm:get("s"))
      -- on a missing session fn receives nil
      local got = "unset"
      sm:update("fresh", function(cur) got = cur; return { n = 0 } end)
      assert.is_nil(got)
      assert.are.same({ state = { n = 0 }, version = 1 }, sm:get("fresh"))
    end)

    it("update retries fn when another coroutine changes the session while fn is suspended", function()
      local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
      rt:register(am2z.createProcessor("writer"):process(function(state)
        sm:set("shared", { n = 100, by = "writer" })
        return am2z.Success(state)
      end))
      sm:set("shared", { n = 0 })
      local seen = {}
      local new
      am2z.run(function()
        rt:start()
        new = sm:update("shared", function(cur)
          seen[#seen + 1] = cur.n
          if #seen == 1 then
            -- suspend fn until a concurrent writer has changed the session
            local h = rt:executeAsync("writer", {})
            assert.is_true(h:wait().success)
          end
          return { n = cur.n + 1 }
        end)
        rt:stop()
      end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.are.same({ 0, 100 }, seen)
      assert.are.same({ n = 101 }, new)
      assert.are.same({ state = { n = 101 }, version = 3 }, sm:get("shared"))
      assert_no_leaks()
    end)

    it("update gives up with a ResourceError when the session keeps changing", function()
      sm:set("hot", { n = 0 })
      local calls = 0
      local err = raised(function()
        sm:update("hot", function(cur)
          calls = calls + 1
          sm:set("hot", { n = calls })       -- a competing write during every attempt
          return { n = -1 }
        end)
      end)
      assert.is_true(errors.is(err, errors.ResourceError), tostring(err))
      assert.is_true(calls > 1)
      assert.are_not.equal(-1, sm:get("hot").state.n)
    end)

    it("rejects a missing sessionId naming the method", function()
      assert.matches("MemoryStateManager:get: expected sessionId to be a non-empty string",
        raised(function() sm:get(nil) end), 1, true)
      assert.matches("MemoryStateManager:update: expected fn to be a function",
        raised(function() sm:update("s", "fn") end), 1, true)
    end)
  end)

  describe("processor boundaries", function()
    local rt
    before_each(function()
      rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
    end)
    after_each(function()
      am2z.run(function() rt:stop() end, { timeoutMs = TEST_TIMEOUT_MS })
      assert_no_leaks()
    end)

    it("an input JSON cannot carry fails the execution with a ValidationError naming the path", function()
      local ran = false
      rt:register(am2z.createProcessor("p"):process(function(state)
        ran = true
        return am2z.Success(state)
      end))
      local ok, r = pcall(am2z.run, function()
        rt:start()
        return rt:execute("p", { order = { onPaid = print } })
      end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.is_true(ok, "execute raised: " .. tostring(r))
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.ValidationError), tostring(r.error))
      assert.matches("order.onPaid", tostring(r.error), 1, true)
      assert.is_false(ran)
    end)

    it("the processor gets a copy of the input: the caller's table is never changed", function()
      rt:register(am2z.createProcessor("mutate"):process(function(state)
        state.list[1] = "changed"
        state.added = true
        return am2z.Success(state)
      end))
      local input = am2z.createAppState("copy-in", { list = { "original" } })
      local r = am2z.run(function()
        rt:start()
        return rt:execute("mutate", input)
      end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.is_true(r.success, tostring(r.error))
      assert.are.same({ "original" }, input.list)
      assert.is_nil(input.added)
      assert.are.equal(1, input.metadata.version)
      assert.are.equal(2, r.state.metadata.version)
    end)

    it("a table a processor keeps and returns is not changed by the runtime", function()
      -- e.g. a cached template; each execution must see it as it was
      local template = am2z.createAppState("tpl", { greeting = "hi" })
      rt:register(am2z.createProcessor("from-template"):process(function()
        return am2z.Success(template)
      end))
      local r1, r2 = am2z.run(function()
        rt:start()
        return rt:execute("from-template", {}), rt:execute("from-template", {})
      end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.is_true(r1.success and r2.success)
      assert.are.equal(1, template.metadata.version, "the runtime bumped the processor's own table")
      assert.are.equal(2, r1.state.metadata.version)
      assert.are.equal(2, r2.state.metadata.version)
      assert.are_not.equal(r1.state, r2.state)
    end)
  end)

  describe("runtime:getState", function()
    it("returns { state, version } of the session after an execution, or nil", function()
      local rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
      rt:register(am2z.createProcessor("inc"):process(function(state)
        state.n = (state.n or 0) + 1
        return am2z.Success(state)
      end))
      local r1, r2
      am2z.run(function()
        rt:start()
        r1 = rt:execute("inc", am2z.createAppState("gs", { n = 0 }))
        r2 = rt:execute("inc", r1.state)
        rt:stop()
      end, { timeoutMs = TEST_TIMEOUT_MS })
      assert.is_true(r2.success, tostring(r2.error))
      local e = rt:getState("gs")
      assert.are.equal(2, e.state.n)
      assert.are.equal(3, e.state.metadata.version)
      assert.are.equal(2, e.version)
      assert.is_nil(rt:getState("no-such-session"))
      assert_no_leaks()
    end)
  end)
end)
