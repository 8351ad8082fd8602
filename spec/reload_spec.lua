-- Workflow files and hot reload (docs/api.md "runtime:load", docs/cli.md
-- "Hot reload"): rt:load of a file or a directory, the reload of a watched
-- file on an edit, an editor's atomic save, a delete, a half-written file;
-- failed reloads keep the old code; executions already running finish on the
-- registry they started with.
--
-- Every test writes its workflow files into a fresh temporary directory,
-- builds its own LocalRuntime, drives the loop with am2z.run, and in
-- after_each stops watching, stops the runtime, removes the directory and
-- checks that the engine holds nothing any more.
--
-- Synchronisation is by events, never by sleeping in the test: the
-- runtime's `reload:succeeded` / `reload:failed` events (queued by
-- record_reloads and read one by one with a deadline), and signals fired by
-- processors. "Nothing else happened" is checked with a sentinel: a second
-- file of the same directory, written right after the edit under test, so
-- that both land in the same debounce batch, which reloads its files in
-- path order (the sentinel's file sorts last): every event the edit under
-- test causes comes before the sentinel's.

local am2z = require("am2z")
local core = require("am2z.core")
local errors = am2z.errors

local MULT = TEST_TIMEOUT_MS / 5000
-- Deadline of one wait for a reload event or a signal (normally they come
-- within a few tens of ms).
local WAIT_MS = 2500 * MULT

local function run(fn)
  -- Several bounded waits per test: the whole test gets a few of them.
  return am2z.run(fn, { timeoutMs = 3 * TEST_TIMEOUT_MS })
end

local function assert_engine_idle()
  assert.are.same({ execs = 0, timers = 0, threads = 0, results = 0 }, core._debug_counts())
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

-- ------------------------------------------------------------ bounded waits

-- Suspends the current engine coroutine until the function handed to
-- `register` is called, or raises after `ms`. The deadline is a "watch"
-- execution, so it goes away with the waiting coroutine.
local token_seq = 0x200000
local function suspend(ms, what, register)
  token_seq = token_seq + 1
  local me, tok = core.current(), token_seq
  local done = false
  local function wake(status)
    if done then return end
    done = true
    core.complete_host(me, tok, status)
  end
  register(wake)
  local timer = core.spawn(function()
    if core.sleep(ms) then wake("ETIMEDOUT") end
    return true, true
  end, "watch", 0, 0, 1)
  local ok, why = core.wait_host(tok)
  done = true
  core.cancel(timer)
  if not ok then
    error(("timed out after %d ms waiting for %s (%s)"):format(ms, what, tostring(why)), 3)
  end
end

-- A one-shot event between engine coroutines (as runtime_spec's new_signal),
-- whose wait has a deadline.
local function new_signal(what)
  local s = { fired = false, count = 0 }
  local wake
  function s.fire(value)
    s.count = s.count + 1
    if s.fired then return end
    s.fired, s.value = true, value
    local w = wake
    wake = nil
    if w then w() end
  end
  function s.wait(ms)
    if not s.fired then
      suspend(ms or WAIT_MS, what or "a signal", function(w) wake = w end)
      wake = nil
    end
    return s.value
  end
  return s
end

-- Queues every reload event of rt; next() returns the oldest unread one
-- ({ kind = "succeeded" | "failed", payload }), waiting for it with a deadline.
local function record_reloads(rt)
  local q = { list = {}, read = 0 }
  local wake
  local function push(kind, payload)
    q.list[#q.list + 1] = { kind = kind, payload = payload }
    local w = wake
    wake = nil
    if w then w() end
  end
  rt:on("reload:succeeded", function(p) push("succeeded", p) end)
  rt:on("reload:failed", function(p) push("failed", p) end)

  function q.next(what)
    if q.read >= #q.list then
      suspend(WAIT_MS, what or "the next reload event", function(w) wake = w end)
      wake = nil
    end
    q.read = q.read + 1
    return q.list[q.read]
  end

  local function show(e)
    local p = e.payload
    return ("reload:%s { file = %s, line = %s, message = %s, codeHash = %s }"):format(e.kind,
      tostring(p.file), tostring(p.line), tostring(p.message), tostring(p.codeHash))
  end

  -- The next event, which must be of this kind; returns its payload.
  function q.expect(kind)
    local e = q.next("reload:" .. kind)
    assert(e.kind == kind, "expected reload:" .. kind .. ", got " .. show(e))
    return e.payload
  end

  -- Reads events until reload:succeeded with this codeHash; returns the
  -- events read before it, and its payload.
  function q.untilHash(hash)
    local before = {}
    while true do
      local e = q.next("reload:succeeded with codeHash " .. hash)
      if e.kind == "succeeded" and e.payload.codeHash == hash then return before, e.payload end
      before[#before + 1] = e
    end
  end

  q.show = show
  return q
end

-- ------------------------------------------------------------ files

local function write(path, content)
  local f = assert(io.open(path, "wb"))
  assert(f:write(content))
  assert(f:close())
end

local function sha(content) return core.sha256(content) end

local function new_tmpdir()
  local p = io.popen("mktemp -d /tmp/am2z-reload-XXXXXX")
  local dir = p:read("*l")
  p:close()
  assert(dir and dir:match("^/tmp/am2z%-reload%-%w+$"), "mktemp -d failed")
  return dir
end

-- A file defining one plain processor `name` that sets state[name] = value.
local function one(name, value)
  return ([[
local am2z = require("am2z")
return am2z.createProcessor(%q):process(function(s)
  s[%q] = %q
  return am2z.Success(s)
end)
]]):format(name, name, value)
end

-- A file returning a list of plain processors; each sets state[name] = value.
local function many(names, value)
  local out = { 'local am2z = require("am2z")', "return {" }
  for _, n in ipairs(names) do
    out[#out + 1] = ("  am2z.createProcessor(%q):process(function(s) s[%q] = %q return am2z.Success(s) end),")
      :format(n, n, value)
  end
  out[#out + 1] = "}"
  return table.concat(out, "\n") .. "\n"
end

describe("workflow files (rt:load) and hot reload", function()
  local rt, dir

  before_each(function()
    rt = am2z.LocalRuntime.new{ logger = am2z.createSilentLogger() }
    dir = new_tmpdir()
  end)

  after_each(function()
    run(function()
      rt:unwatch()
      rt:stop{ graceMs = 1000 }
    end)
    rt = nil
    _G.RELOAD_SPEC_HOOKS = nil
    os.execute("rm -rf '" .. dir .. "'")
    assert_engine_idle()
  end)

  ---------------------------------------------------------------- initial load
  describe("initial load", function()
    it("of a file registers what it returns; results carry the SHA-256 of the file as codeHash", function()
      local path = dir .. "/flow.lua"
      local src = [[
local am2z = require("am2z")
LEAKED_BY_FLOW = true          -- a global of the file's own environment
return am2z.createProcessor("greet"):process(function(s)
  s.greeting = "hello " .. s.who
  return am2z.Success(s)
end)
]]
      write(path, src)
      local summaries, r
      run(function()
        rt:start()
        summaries = rt:load(path)
        r = rt:execute("greet", { who = "ann" })
      end)
      assert.are.same({ { file = path, codeHash = sha(src), added = { "greet" }, replaced = {}, removed = {} } },
        summaries)
      assert.are.same({ "greet" }, rt:getRegisteredProcessorNames())
      assert.is_true(r.success, tostring(r.error))
      assert.are.equal("hello ann", r.state.greeting)
      assert.are.equal(sha(src), r.metadata.codeHash)
      assert.matches("^%x+$", r.metadata.codeHash)
      assert.are.equal(64, #r.metadata.codeHash)
      assert.is_nil(rawget(_G, "LEAKED_BY_FLOW"))
    end)

    it("of a directory loads every *.lua file in name order: a list, a name -> definition table, composites with their steps", function()
      local orders = [[
local am2z = require("am2z")
local P = am2z.createProcessor
local validate = P("validate"):process(function(s) s.valid = true return am2z.Success(s) end)
local charge = P("charge"):process(function(s) s.charged = s.valid return am2z.Success(s) end)
return { am2z.chainProcessors{ name = "order", processors = { validate, charge } } }
]]
      local users = [[
local am2z = require("am2z")
return { signup = am2z.createProcessor("signup"):process(function(s) s.user = true return am2z.Success(s) end) }
]]
      write(dir .. "/b_users.lua", users)
      write(dir .. "/a_orders.lua", orders)
      write(dir .. "/notes.txt", "not a workflow file")
      local summaries, r_order, r_validate, r_signup
      run(function()
        rt:start()
        summaries = rt:load(dir .. "/")      -- a trailing slash is fine
        r_order = rt:execute("order", {})
        r_validate = rt:execute("validate", {})
        r_signup = rt:execute("signup", {})
      end)
      assert.are.same({
        { file = dir .. "/a_orders.lua", codeHash = sha(orders), added = { "charge", "order", "validate" },
          replaced = {}, removed = {} },
        { file = dir .. "/b_users.lua", codeHash = sha(users), added = { "signup" }, replaced = {}, removed = {} },
      }, summaries)
      assert.are.same({ "charge", "order", "signup", "validate" }, rt:getRegisteredProcessorNames())
      assert.is_true(r_order.success, tostring(r_order.error))
      assert.is_true(r_order.state.valid)
      assert.is_true(r_order.state.charged)
      assert.are.equal(sha(orders), r_order.metadata.codeHash)
      assert.are.equal(sha(orders), r_validate.metadata.codeHash)
      assert.is_true(r_signup.state.user)
      assert.are.equal(sha(users), r_signup.metadata.codeHash)
    end)

    it("processors registered with register() carry no codeHash", function()
      rt:register(am2z.createProcessor("plain"):process(function(s) return am2z.Success(s) end))
      local r
      run(function()
        rt:start()
        r = rt:execute("plain", {})
      end)
      assert.is_true(r.success)
      assert.is_nil(r.metadata.codeHash)
    end)
  end)

  ---------------------------------------------------------------- edits
  describe("editing a watched file", function()
    it("reloads it: reload:succeeded names the replaced processor; new executions run the new code", function()
      local path = dir .. "/flow.lua"
      local v1, v2 = one("p", "v1"), one("p", "v2")
      write(path, v1)
      local ev = record_reloads(rt)
      local r1, r2, p
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        r1 = rt:execute("p", {})
        write(path, v2)
        p = ev.expect("succeeded")
        r2 = rt:execute("p", {})
      end)
      assert.are.same({ file = path, codeHash = sha(v2), added = {}, replaced = { "p" }, removed = {} }, p)
      assert.are.equal("v1", r1.state.p)
      assert.are.equal(sha(v1), r1.metadata.codeHash)
      assert.are.equal("v2", r2.state.p)
      assert.are.equal(sha(v2), r2.metadata.codeHash)
    end)

    it("a file composing a processor from a require()d module reloads (the module's processor is not the file's)", function()
      local path = dir .. "/flow.lua"
      local modname = "reload_spec_shared_" .. tostring(os.time())
      package.loaded[modname] = am2z.createProcessor("shared"):process(function(s)
        s.shared = true
        return am2z.Success(s)
      end)
      local src = ('local am2z = require("am2z")\nreturn { am2z.chainProcessors{ name = "a", processors = { require(%q) } } }\n')
        :format(modname)
      write(path, src)
      local ev = record_reloads(rt)
      local p, r
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        write(path, src .. "-- an edit\n")
        p = ev.expect("succeeded")
        r = rt:execute("a", {})
      end)
      package.loaded[modname] = nil
      assert.are.same({}, p.removed)
      assert.are.same({ "a" }, p.replaced)
      assert.is_true(r.success, tostring(r.error))
      assert.is_true(r.state.shared)
    end)

    it("an execution already running finishes on the old code, later chain steps included; one started after the reload uses the new code", function()
      local path = dir .. "/flow.lua"
      -- hold: v1 waits for the test's "go"; stamp: the step reached after the reload.
      local function src(version, waits)
        return ([[
local am2z = require("am2z")
local P = am2z.createProcessor
local hold = P("hold"):process(function(s)
  s.steps = { "hold-%s" }
  if %s then
    RELOAD_SPEC_HOOKS.started.fire()
    RELOAD_SPEC_HOOKS.go.wait()
  end
  return am2z.Success(s)
end)
local stamp = P("stamp"):process(function(s)
  s.steps[#s.steps + 1] = "stamp-%s"
  return am2z.Success(s)
end)
return am2z.chainProcessors{ name = "pipe", processors = { hold, stamp } }
]]):format(version, tostring(waits), version)
      end
      local v1, v2 = src("v1", true), src("v2", false)
      write(path, v1)
      local hooks = { started = new_signal("the old execution to start"), go = new_signal("go") }
      _G.RELOAD_SPEC_HOOKS = hooks
      local ev = record_reloads(rt)
      local old, new, p
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        local h = rt:executeAsync("pipe", {})
        hooks.started.wait()
        write(path, v2)
        p = ev.expect("succeeded")
        new = rt:execute("pipe", {})          -- v2's hold does not wait
        hooks.go.fire()
        old = h:wait()
      end)
      assert.are.same({ "hold", "pipe", "stamp" }, p.replaced)
      assert.is_true(old.success, tostring(old.error))
      assert.are.same({ "hold-v1", "stamp-v1" }, old.state.steps)
      assert.are.equal(sha(v1), old.metadata.codeHash)
      assert.is_true(new.success, tostring(new.error))
      assert.are.same({ "hold-v2", "stamp-v2" }, new.state.steps)
      assert.are.equal(sha(v2), new.metadata.codeHash)
      assert.are.equal(1, hooks.started.count)     -- the new execution never ran v1's hold
    end)

    it("a new *.lua file in a watched directory is loaded", function()
      write(dir .. "/a.lua", one("a", "v1"))
      local ev = record_reloads(rt)
      local fresh = one("fresh", "v1")
      local p, r
      run(function()
        rt:start()
        rt:load(dir, { watch = true, debounceMs = 20 })
        write(dir .. "/b.lua", fresh)
        p = ev.expect("succeeded")
        r = rt:execute("fresh", {})
      end)
      assert.are.same({ file = dir .. "/b.lua", codeHash = sha(fresh), added = { "fresh" }, replaced = {},
                        removed = {} }, p)
      assert.are.equal("v1", r.state.fresh)
      assert.are.equal(sha(fresh), r.metadata.codeHash)
    end)
  end)

  ---------------------------------------------------------------- failures
  describe("a reload that fails", function()
    it("a syntax error: reload:failed with file, line and message; the old code stays; the next good save loads", function()
      local path = dir .. "/flow.lua"
      local v1 = one("p", "v1")
      local broken = table.concat({
        'local am2z = require("am2z")',                                       -- 1
        'return am2z.createProcessor("p"):process(function(s)',              -- 2
        '  s.p = "broken"',                                                   -- 3
        '  local x = = 1',                                                    -- 4
        '  return am2z.Success(s)',                                           -- 5
        'end)', '' }, "\n")
      local v3 = one("p", "v3")
      write(path, v1)
      local ev = record_reloads(rt)
      local failed, r_after_fail, ok, r3
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        write(path, broken)
        failed = ev.expect("failed")
        r_after_fail = rt:execute("p", {})
        write(path, v3)
        ok = ev.expect("succeeded")
        r3 = rt:execute("p", {})
      end)
      assert.are.equal(path, failed.file)
      assert.are.equal(4, failed.line)
      assert.matches("syntax error", failed.message, 1, true)
      assert.matches("unexpected symbol", failed.message, 1, true)
      assert.are.equal("v1", r_after_fail.state.p)
      assert.are.equal(sha(v1), r_after_fail.metadata.codeHash)
      assert.are.same({ file = path, codeHash = sha(v3), added = {}, replaced = { "p" }, removed = {} }, ok)
      assert.are.equal("v3", r3.state.p)
      assert.are.equal(sha(v3), r3.metadata.codeHash)
    end)

    it("a runtime error while running the file: reload:failed with its line; the old code stays", function()
      local path = dir .. "/flow.lua"
      local v1 = one("p", "v1")
      local boom = table.concat({
        'local am2z = require("am2z")',
        'local p = am2z.createProcessor("p"):process(function(s) s.p = "boom" return am2z.Success(s) end)',
        'error("boom at load time")',
        'return p', '' }, "\n")
      write(path, v1)
      local ev = record_reloads(rt)
      local failed, r
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        write(path, boom)
        failed = ev.expect("failed")
        r = rt:execute("p", {})
      end)
      assert.are.equal(path, failed.file)
      assert.are.equal(3, failed.line)
      assert.matches("runtime error", failed.message, 1, true)
      assert.matches("boom at load time", failed.message, 1, true)
      assert.are.equal("v1", r.state.p)
      assert.are.equal(sha(v1), r.metadata.codeHash)
    end)

    it("a file that does not return processor definitions: reload:failed; the old code stays", function()
      local path = dir .. "/flow.lua"
      local v1 = one("p", "v1")
      write(path, v1)
      local ev = record_reloads(rt)
      local f_number, f_table, f_empty, r
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        write(path, "return 42\n")
        f_number = ev.expect("failed")
        write(path, 'return { p = "not a definition" }\n')
        f_table = ev.expect("failed")
        write(path, "return {}\n")
        f_empty = ev.expect("failed")
        r = rt:execute("p", {})
      end)
      assert.are.equal(path, f_number.file)
      assert.matches("expected the file to return a processor definition", f_number.message, 1, true)
      assert.matches("number 42", f_number.message, 1, true)
      assert.matches("expected [string \"p\"] to be a processor definition", f_table.message, 1, true)
      assert.matches("no processor definitions", f_empty.message, 1, true)
      assert.are.equal("v1", r.state.p)
      assert.are.equal(sha(v1), r.metadata.codeHash)
      assert.are.same({ "p" }, rt:getRegisteredProcessorNames())
    end)
  end)

  ---------------------------------------------------------------- editors
  describe("how editors save", function()
    it("an atomic save (temp file renamed over the watched one) is picked up", function()
      local path = dir .. "/flow.lua"
      local v1, v2 = one("p", "v1"), one("p", "v2")
      write(path, v1)
      local ev = record_reloads(rt)
      local p, r
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        local tmp = dir .. "/.flow.lua.swp"
        write(tmp, v2)
        assert(os.rename(tmp, path))
        p = ev.expect("succeeded")
        r = rt:execute("p", {})
      end)
      assert.are.same({ file = path, codeHash = sha(v2), added = {}, replaced = { "p" }, removed = {} }, p)
      assert.are.equal("v2", r.state.p)
      assert.are.equal(sha(v2), r.metadata.codeHash)
    end)

    it("deleting the file gives reload:failed (cannot read) and keeps the old code; re-creating it loads", function()
      local path = dir .. "/flow.lua"
      local v1, v2 = one("p", "v1"), one("p", "v2")
      write(path, v1)
      local ev = record_reloads(rt)
      local failed, r_gone, ok, r2
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        assert(os.remove(path))
        failed = ev.expect("failed")
        r_gone = rt:execute("p", {})
        write(path, v2)
        ok = ev.expect("succeeded")
        r2 = rt:execute("p", {})
      end)
      assert.are.equal(path, failed.file)
      assert.is_nil(failed.line)
      assert.matches("cannot read", failed.message, 1, true)
      assert.are.equal("v1", r_gone.state.p)
      assert.are.equal(sha(v1), r_gone.metadata.codeHash)
      assert.are.same({ file = path, codeHash = sha(v2), added = {}, replaced = { "p" }, removed = {} }, ok)
      assert.are.equal("v2", r2.state.p)
      assert.are.equal(sha(v2), r2.metadata.codeHash)
    end)

    -- Cut inside the call's argument list: the first half alone is a syntax error.
    local function halves(src)
      local cut = src:find("s[", 1, true)
      return src:sub(1, cut), src:sub(cut + 1)
    end

    it("a file seen half-written (flushed mid-write) fails to reload, then the finished file loads", function()
      local path = dir .. "/flow.lua"
      local v1, v2 = one("p", "v1"), one("p", "v2")
      local first, rest = halves(v2)
      write(path, v1)
      local ev = record_reloads(rt)
      local failed, before, ok, r_half, r2
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        local f = assert(io.open(path, "w"))
        f:write(first)
        f:flush()
        failed = ev.expect("failed")           -- the half file
        r_half = rt:execute("p", {})
        f:write(rest)
        f:close()
        before, ok = ev.untilHash(sha(v2))
        r2 = rt:execute("p", {})
      end)
      assert.are.equal(path, failed.file)
      assert.matches("syntax error", failed.message, 1, true)
      assert.are.equal("v1", r_half.state.p)
      for _, e in ipairs(before) do          -- at most more failures of the half file
        assert.are.equal("failed", e.kind, ev.show(e))
      end
      assert.are.same({ "p" }, ok.replaced)
      assert.are.equal("v2", r2.state.p)
      assert.are.equal(sha(v2), r2.metadata.codeHash)
    end)

    it("a truncate, a partial write and the rest in quick succession end with the new code loaded", function()
      local path = dir .. "/flow.lua"
      local v1, v2 = one("p", "v1"), one("p", "v2")
      local first, rest = halves(v2)
      write(path, v1)
      local ev = record_reloads(rt)
      local before, r2
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        local f = assert(io.open(path, "w"))
        f:write(first)
        f:flush()
        f:write(rest)
        f:close()
        before = ev.untilHash(sha(v2))
        r2 = rt:execute("p", {})
      end)
      for _, e in ipairs(before) do
        assert.are.equal("failed", e.kind, ev.show(e))
      end
      assert.are.equal("v2", r2.state.p)
      assert.are.equal(sha(v2), r2.metadata.codeHash)
    end)
  end)

  ---------------------------------------------------------------- added / removed
  describe("adding and removing processors", function()
    it("adding one gives added; removing one nothing uses gives removed, and executing it ProcessorNotFoundError", function()
      local path = dir .. "/flow.lua"
      local v1, v2, v3 = many({ "a" }, "v1"), many({ "a", "b" }, "v2"), many({ "a" }, "v3")
      write(path, v1)
      local ev = record_reloads(rt)
      local p_add, p_remove, r_b, r_gone, r_a
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        write(path, v2)
        p_add = ev.expect("succeeded")
        r_b = rt:execute("b", {})
        write(path, v3)
        p_remove = ev.expect("succeeded")
        r_gone = rt:execute("b", {})
        r_a = rt:execute("a", {})
      end)
      assert.are.same({ file = path, codeHash = sha(v2), added = { "b" }, replaced = { "a" }, removed = {} }, p_add)
      assert.are.equal("v2", r_b.state.b)
      assert.are.equal(sha(v2), r_b.metadata.codeHash)
      assert.are.same({ file = path, codeHash = sha(v3), added = {}, replaced = { "a" }, removed = { "b" } },
        p_remove)
      assert_error_class(r_gone, errors.ProcessorNotFoundError)
      assert.are.same({ "a" }, rt:getRegisteredProcessorNames())
      assert.are.equal("v3", r_a.state.a)
    end)

    it("removing one that a composite of another loaded file still uses fails and keeps everything", function()
      local a1 = many({ "leaf", "other" }, "v1")
      local a2 = many({ "other" }, "v2")            -- leaf removed
      local b1 = [[
local am2z = require("am2z")
return am2z.batchProcessor{ name = "fan", processorName = "leaf", payloads = { { n = 1 }, { n = 2 } } }
]]
      local b2 = one("solo", "v2")                  -- fan removed
      write(dir .. "/a.lua", a1)
      write(dir .. "/b.lua", b1)
      local ev = record_reloads(rt)
      local failed, r_leaf, r_other, r_fan, p_b, p_a, r_gone
      run(function()
        rt:start()
        rt:load(dir, { watch = true, debounceMs = 20 })
        write(dir .. "/a.lua", a2)
        failed = ev.expect("failed")
        r_leaf = rt:execute("leaf", {})
        r_other = rt:execute("other", {})
        r_fan = rt:execute("fan", {})
        -- once nothing uses it any more, the same edit goes through
        write(dir .. "/b.lua", b2)
        p_b = ev.expect("succeeded")
        write(dir .. "/a.lua", a2)                  -- saved again, unchanged since it failed
        p_a = ev.expect("succeeded")
        r_gone = rt:execute("leaf", {})
      end)
      assert.are.equal(dir .. "/a.lua", failed.file)
      assert.matches("processor 'leaf' is removed but 'fan' still uses it", failed.message, 1, true)
      assert.are.equal("v1", r_leaf.state.leaf)
      assert.are.equal(sha(a1), r_leaf.metadata.codeHash)
      assert.are.equal("v1", r_other.state.other)       -- the rest of the failed edit did not apply either
      assert.are.equal(sha(a1), r_other.metadata.codeHash)
      assert.is_true(r_fan.success, tostring(r_fan.error))
      assert.are.same({ "solo" }, p_b.added)
      assert.are.same({ "fan" }, p_b.removed)
      assert.are.same({ "leaf" }, p_a.removed)
      assert.are.same({ "other" }, p_a.replaced)
      assert_error_class(r_gone, errors.ProcessorNotFoundError)
    end)

    -- "Something that stays uses what goes" is judged on the registry after
    -- the reload: the old version of a composite redefined by the same save
    -- does not count as a user.
    it("shrinking a composite and dropping its old step in the same save reloads", function()
      local path = dir .. "/flow.lua"
      local v1 = [[
local am2z = require("am2z")
local a = am2z.createProcessor("a"):process(function(s) s.a = true return am2z.Success(s) end)
local b = am2z.createProcessor("b"):process(function(s) s.b = true return am2z.Success(s) end)
return am2z.chainProcessors{ name = "pipe", processors = { a, b } }
]]
      local v2 = [[
local am2z = require("am2z")
local a = am2z.createProcessor("a"):process(function(s) s.a = true return am2z.Success(s) end)
return am2z.chainProcessors{ name = "pipe", processors = { a } }
]]
      write(path, v1)
      local ev = record_reloads(rt)
      local e, r
      run(function()
        rt:start()
        rt:load(path, { watch = true, debounceMs = 20 })
        write(path, v2)
        e = ev.next()
        r = rt:execute("pipe", {})
      end)
      assert.are.equal("succeeded", e.kind, ev.show(e))
      assert.are.same({ file = path, codeHash = sha(v2), added = {}, replaced = { "a", "pipe" },
                        removed = { "b" } }, e.payload)
      assert.is_true(r.success, tostring(r.error))
      assert.is_nil(r.state.b)
      assert.are.equal(sha(v2), r.metadata.codeHash)
    end)
  end)

  ---------------------------------------------------------------- debounce
  describe("debounce", function()
    -- a.lua is the file under test, z_sentinel.lua the sentinel (see the top).
    local function setup(debounceMs)
      write(dir .. "/a.lua", one("a", "v0"))
      write(dir .. "/z_sentinel.lua", one("sentinel", "0"))
      rt:load(dir, { watch = true, debounceMs = debounceMs })
    end

    it("several quick writes produce one reload, of the last content", function()
      local DEBOUNCE = 400
      local ev = record_reloads(rt)
      local before, span, sentinel, r
      run(function()
        rt:start()
        setup(DEBOUNCE)
        local t0 = am2z.now()
        for i = 1, 5 do
          write(dir .. "/a.lua", one("a", "v" .. i))
          -- let the loop see each write (an undebounced watcher would reload each)
          if i < 5 then am2z.sleep(5) end
        end
        span = am2z.now() - t0
        sentinel = one("sentinel", "1")
        write(dir .. "/z_sentinel.lua", sentinel)
        before = ev.untilHash(sha(sentinel))
        r = rt:execute("a", {})
      end)
      assert(span < DEBOUNCE, ("inconclusive: the writes took %d ms, more than the debounce"):format(span))
      assert.are.equal(1, #before, "reloads before the sentinel's")
      assert.are.equal("succeeded", before[1].kind, ev.show(before[1]))
      assert.are.equal(sha(one("a", "v5")), before[1].payload.codeHash)
      assert.are.equal("v5", r.state.a)
    end)

    it("a save that does not change the content emits nothing", function()
      local ev = record_reloads(rt)
      local before
      run(function()
        rt:start()
        setup(20)
        write(dir .. "/a.lua", one("a", "v0"))          -- same bytes
        os.execute("touch '" .. dir .. "/a.lua'")
        local sentinel = one("sentinel", "1")
        write(dir .. "/z_sentinel.lua", sentinel)
        before = ev.untilHash(sha(sentinel))
      end)
      assert.are.same({}, before)
    end)

    -- A trailing debounce (docs/api.md: "after debounceMs without more
    -- events"): a file written in pieces is reloaded once, whole.
    it("writes closer together than debounceMs keep postponing the reload (one reload at the end)", function()
      local DEBOUNCE, GAP = 500 * MULT, 40
      local ev = record_reloads(rt)
      local before, max_gap
      run(function()
        rt:start()
        setup(DEBOUNCE)
        max_gap = 0
        local last = am2z.now()
        for i = 1, 8 do
          write(dir .. "/a.lua", one("a", "v" .. i))
          local t = am2z.now()
          if t - last > max_gap and i > 1 then max_gap = t - last end
          last = t
          if i < 8 then am2z.sleep(GAP) end
        end
        local sentinel = one("sentinel", "1")
        write(dir .. "/z_sentinel.lua", sentinel)
        before = ev.untilHash(sha(sentinel))
      end)
      assert(max_gap < DEBOUNCE, ("inconclusive: %d ms between two writes, more than the debounce"):format(max_gap))
      assert.are.equal(1, #before, "reloads before the sentinel's")
      assert.are.equal(sha(one("a", "v8")), before[1].payload.codeHash)
    end)
  end)

  ---------------------------------------------------------------- misuse
  describe("misuse", function()
    it("raises clear errors for a bad path, bad options, a missing path, and a broken file at the initial load", function()
      local broken = dir .. "/broken.lua"
      write(broken, 'local am2z = require("am2z")\nreturn am2z.createProcessor("x"):process(function(s)\n  return = 1\nend)\n')
      local thrower = dir .. "/thrower.lua"
      write(thrower, '\n\nerror("no way")\n')
      local notdef = dir .. "/notdef.lua"
      write(notdef, "return 42\n")
      run(function()
        local m = raised(function() rt:load(42) end)
        assert.matches("load: expected a file or directory path (string), got number 42", m, 1, true)
        m = raised(function() rt:load("") end)
        assert.matches("load: expected a file or directory path (string)", m, 1, true)
        m = raised(function() rt:load("x", "notatable") end)
        assert.matches("load: expected a table of options or nil, got string \"notatable\"", m, 1, true)
        m = raised(function() rt:load(dir .. "/flow.lua", { debounceMs = -1 }) end)
        assert.matches("load: expected debounceMs to be a number >= 0, got number -1", m, 1, true)
        m = raised(function() rt:load(dir .. "/missing.lua") end)
        assert.matches("load: " .. dir .. "/missing.lua: cannot read the file", m, 1, true)
        m = raised(function() rt:load(broken, { watch = true }) end)
        assert.matches("load: " .. broken .. ":3: syntax error", m, 1, true)
        m = raised(function() rt:load(thrower) end)
        assert.matches("load: " .. thrower .. ":3: runtime error: ", m, 1, true)
        assert.matches("no way", m, 1, true)
        m = raised(function() rt:load(notdef) end)
        assert.matches("load: " .. notdef .. ": expected the file to return a processor definition", m, 1, true)
      end)
      assert.are.same({}, rt:getRegisteredProcessorNames())
    end)

    -- Like register() and the other misuse errors, load's name the caller's
    -- line (load must not be a tail call for that).
    it("a misuse error names the line of the rt:load call", function()
      local line
      local ok, m = pcall(function()
        line = debug.getinfo(1, "l").currentline; rt:load(42)
      end)
      assert.is_false(ok)
      assert.matches("reload_spec.lua:" .. line .. ": load: expected a file or directory path", tostring(m), 1, true)
    end)
  end)
end)
