--[[
Specs for am2z.log: level filtering, the json and pretty line formats, the
immutability of derived loggers, both call forms, environment defaults (via
the log._getenv hook) and argument errors.
]]

local log = require("am2z.log")
local cjson = require("cjson")

-- 2026-11-26T17:00:00.123Z
local FIXED_SEC, FIXED_MS = 1795712400, 123

local function capture(opts)
  local lines = {}
  opts = opts or {}
  opts.sink = function(line) lines[#lines + 1] = line end
  return log.createLogger(opts), lines
end

local function raises(fn, text)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  assert.is_truthy(string.find(tostring(err), text, 1, true),
    "expected error containing: " .. text .. "\ngot: " .. tostring(err))
end

describe("am2z.log", function()
  local realGetenv, realNow
  local env

  before_each(function()
    realGetenv, realNow = log._getenv, log._now
    env = {}
    log._getenv = function(name) return env[name] end
    log._now = function() return FIXED_SEC, FIXED_MS end
  end)

  after_each(function()
    log._getenv, log._now = realGetenv, realNow
  end)

  it("exports level numbers in order", function()
    local l = log.levels
    assert.is_true(l.debug < l.info and l.info < l.warn and l.warn < l.error and l.error < l.silent)
  end)

  describe("levels", function()
    it("drop records below the level", function()
      local logger, lines = capture({ level = "info", format = "json" })
      logger:debug("hidden")
      logger:info("shown")
      logger:warn("shown")
      logger:error("shown")
      assert.are.equal(3, #lines)
      assert.are.equal("info", cjson.decode(lines[1]).level)
    end)

    it("error level keeps only errors; silent keeps nothing", function()
      local logger, lines = capture({ level = "error", format = "json" })
      logger:warn("no")
      logger:error("yes")
      assert.are.equal(1, #lines)
      local quiet, none = capture({ level = "silent", format = "json" })
      quiet:error("no")
      assert.are.equal(0, #none)
    end)

    it("filtered methods do no work", function()
      local logger = capture({ level = "warn", format = "json" })
      local touched = false
      local fields = setmetatable({}, { __pairs = function() touched = true end,
        __index = function() touched = true end })
      logger:debug(setmetatable({}, { __tostring = function() touched = true; return "" end }), fields)
      assert.is_false(touched)
      assert.are.equal(logger.debug, logger.info) -- one shared no-op
    end)

    it("isEnabled tells callers whether to build fields", function()
      local logger = capture({ level = "info" })
      assert.is_false(logger:isEnabled("debug"))
      assert.is_true(logger:isEnabled("warn"))
      assert.is_true(logger.isEnabled("info"))
      assert.is_false(log.createSilentLogger():isEnabled("error"))
    end)
  end)

  describe("json format", function()
    it("writes one decodable line with ts, level, source, msg, context and fields", function()
      local logger, lines = capture({ format = "json", source = "billing", context = { svc = "api" } })
      logger:info("charged", { amount = 12.5, ok = true, tags = { "a", "b" } })
      assert.are.equal(1, #lines)
      assert.is_nil(lines[1]:find("\n"))
      local head = '{"ts":"2026-11-26T17:00:00.123Z","level":"info","source":"billing","msg":"charged",'
      assert.are.equal(head, lines[1]:sub(1, #head))
      assert.are.same({
        ts = "2026-11-26T17:00:00.123Z", level = "info", source = "billing", msg = "charged",
        svc = "api", amount = 12.5, ok = true, tags = { "a", "b" },
      }, cjson.decode(lines[1]))
    end)

    it("lets fields override context keys", function()
      local logger, lines = capture({ format = "json", context = { step = 1 } })
      logger:info("m", { step = 2 })
      assert.are.equal(2, cjson.decode(lines[1]).step)
    end)

    it("keeps user fields named like record keys under an underscore", function()
      local logger, lines = capture({ format = "json" })
      logger:info("real", { msg = "mine", level = 9 })
      local rec = cjson.decode(lines[1])
      assert.are.equal("real", rec.msg)
      assert.are.equal("info", rec.level)
      assert.are.equal("mine", rec._msg)
      assert.are.equal(9, rec._level)
    end)

    it("never crashes on values cjson cannot encode", function()
      local logger, lines = capture({ format = "json" })
      local cyc = {}
      cyc.self = cyc
      logger:error("odd", {
        fn = print, co = coroutine.create(function() end), cyc = cyc,
        nan = 0 / 0, sparse = { [1] = 1, [100] = 2 }, [7] = "numkey", [true] = "boolkey",
      })
      local rec = cjson.decode(lines[1])
      assert.are.equal(tostring(print), rec.fn)
      assert.is_truthy(rec.co:find("^thread"))
      assert.are.equal("[cycle]", rec.cyc.self)
      assert.are.equal(cjson.null, rec.nan)
      assert.are.equal("numkey", rec["7"])
      assert.are.equal("boolkey", rec["true"])
    end)

    it("turns non-string messages into strings", function()
      local logger, lines = capture({ format = "json" })
      logger:info(42)
      logger:info(nil)
      logger:info(setmetatable({}, { __tostring = function() return "an error" end }))
      assert.are.equal("42", cjson.decode(lines[1]).msg)
      assert.are.equal("nil", cjson.decode(lines[2]).msg)
      assert.are.equal("an error", cjson.decode(lines[3]).msg)
    end)

    it("keeps a non-table fields argument", function()
      local logger, lines = capture({ format = "json" })
      logger:info("m", "extra")
      assert.are.equal("extra", cjson.decode(lines[1]).fields)
    end)
  end)

  describe("pretty format", function()
    it("writes time, padded level, source, message and sorted key=value pairs", function()
      local logger, lines = capture({ format = "pretty", source = "pay", context = { req = 7 } })
      logger:info("paid", { user = "bob smith", ok = true, data = { a = 1 }, id = "x1" })
      local clock = os.date("%H:%M:%S", FIXED_SEC) .. ".123"
      assert.are.equal(clock .. ' INFO  [pay] paid data={"a":1} id=x1 ok=true req=7 user="bob smith"',
        lines[1])
      logger:error("bad")
      assert.are.equal(clock .. " ERROR [pay] bad req=7", lines[2])
    end)

    it("quotes values with spaces, quotes, equals signs or newlines", function()
      local logger, lines = capture({ format = "pretty" })
      logger:warn("m", { a = 'say "hi"', b = "x=y", c = "l1\nl2", d = "" })
      assert.is_truthy(lines[1]:find([[a="say \"hi\"" b="x=y" c="l1\nl2" d=""]], 1, true))
      assert.is_nil(lines[1]:find("\n"))
    end)

    it("has no colour with a sink, colour when forced", function()
      local plain, lines = capture({ format = "pretty" })
      plain:warn("m")
      assert.is_nil(lines[1]:find("\27", 1, true))
      local coloured, clines = capture({ format = "pretty", color = true })
      coloured:warn("m")
      assert.is_truthy(clines[1]:find("\27[33mWARN \27[0m", 1, true))
    end)
  end)

  describe("silent", function()
    it("format silent writes nothing at any level", function()
      local logger, lines = capture({ format = "silent", level = "debug" })
      logger:error("x")
      assert.are.equal(0, #lines)
    end)

    it("createSilentLogger ignores the environment and derives silent loggers", function()
      env.AM2Z_LOG_LEVEL = "debug"
      env.AM2Z_LOG_FORMAT = "json"
      local logger = log.createSilentLogger()
      assert.are.equal("silent", logger.format)
      local child = logger:withContext({ a = 1 }):withSource("x")
      assert.are.equal("silent", child.format)
      child:error("nothing") -- must not write to stderr or raise
    end)
  end)

  describe("derived loggers", function()
    it("withContext merges context and leaves the parent unchanged", function()
      local parent, lines = capture({ format = "json", context = { a = 1 } })
      local child = parent:withContext({ b = 2, a = 3 })
      child:info("c")
      parent:info("p")
      assert.are.same({ a = 3, b = 2 }, { a = cjson.decode(lines[1]).a, b = cjson.decode(lines[1]).b })
      local p = cjson.decode(lines[2])
      assert.are.equal(1, p.a)
      assert.is_nil(p.b)
      assert.are.same({ a = 1 }, parent.context)
    end)

    it("copies the context it was given", function()
      local ctx = { a = 1 }
      local logger, lines = capture({ format = "json", context = ctx })
      ctx.a = 2
      logger:info("m")
      assert.are.equal(1, cjson.decode(lines[1]).a)
    end)

    it("withSource changes only the source", function()
      local parent, lines = capture({ format = "json", source = "app", level = "warn", context = { k = 1 } })
      local child = parent:withSource("worker")
      child:info("dropped")
      child:warn("c")
      parent:warn("p")
      assert.are.equal(2, #lines)
      local c, p = cjson.decode(lines[1]), cjson.decode(lines[2])
      assert.are.equal("worker", c.source)
      assert.are.equal(1, c.k)
      assert.are.equal("app", p.source)
      assert.are.equal("app", parent.source)
    end)

    it("reject bad arguments", function()
      local logger = capture({})
      raises(function() logger:withContext("x") end, "withContext: expected fields to be a table, got string")
      raises(function() logger:withSource(5) end, "withSource: expected name to be a string, got number")
    end)
  end)

  describe("call forms", function()
    it("colon and dot forms log the same record", function()
      local logger, lines = capture({ format = "json", level = "debug" })
      logger:info("colon", { a = 1 })
      logger.info("dot", { a = 1 })
      logger.debug("dot debug")
      local c, d = cjson.decode(lines[1]), cjson.decode(lines[2])
      assert.are.equal("colon", c.msg)
      assert.are.equal("dot", d.msg)
      assert.are.equal(1, c.a)
      assert.are.equal(1, d.a)
      assert.are.equal("dot debug", cjson.decode(lines[3]).msg)
    end)

    it("work for withContext and withSource", function()
      local logger, lines = capture({ format = "json" })
      logger.withContext({ a = 1 }).info("m1")
      logger.withSource("s").info("m2")
      assert.are.equal(1, cjson.decode(lines[1]).a)
      assert.are.equal("s", cjson.decode(lines[2]).source)
    end)
  end)

  describe("environment", function()
    it("supplies defaults when options are absent", function()
      env.AM2Z_LOG_LEVEL = "warn"
      env.AM2Z_LOG_FORMAT = "json"
      local logger, lines = capture({})
      logger:info("no")
      logger:warn("yes")
      assert.are.equal(1, #lines)
      assert.are.equal("yes", cjson.decode(lines[1]).msg)
      assert.are.equal("warn", logger.level)
    end)

    it("is overridden by explicit options", function()
      env.AM2Z_LOG_LEVEL = "error"
      env.AM2Z_LOG_FORMAT = "silent"
      local logger, lines = capture({ level = "debug", format = "json" })
      logger:debug("yes")
      assert.are.equal(1, #lines)
    end)

    it("accepts any case and surrounding spaces", function()
      env.AM2Z_LOG_LEVEL = " DEBUG "
      assert.are.equal("debug", capture({}).level)
    end)

    it("defaults to info and pretty", function()
      local logger = capture({})
      assert.are.equal("info", logger.level)
      assert.are.equal("pretty", logger.format)
    end)

    it("rejects unknown values, naming the variable", function()
      env.AM2Z_LOG_LEVEL = "loud"
      raises(function() log.createLogger({}) end,
        'createLogger: expected AM2Z_LOG_LEVEL to be one of debug, info, warn, error, silent, got "loud"')
      env.AM2Z_LOG_LEVEL = nil
      env.AM2Z_LOG_FORMAT = "xml"
      raises(function() log.createLogger() end,
        'createLogger: expected AM2Z_LOG_FORMAT to be one of pretty, json, silent, got "xml"')
    end)

    it("NO_COLOR is read through the hook", function()
      local asked = {}
      log._getenv = function(name) asked[name] = true end
      log.createLogger({ format = "pretty" })
      assert.is_true(asked.NO_COLOR)
    end)
  end)

  describe("argument errors", function()
    it("name the option, the allowed values and the bad value", function()
      raises(function() log.createLogger({ level = "loud" }) end,
        'createLogger: expected level to be one of debug, info, warn, error, silent, got "loud"')
      raises(function() log.createLogger({ level = 3 }) end,
        "createLogger: expected level to be one of debug, info, warn, error, silent, got number")
      raises(function() log.createLogger({ format = "xml" }) end,
        'createLogger: expected format to be one of pretty, json, silent, got "xml"')
      raises(function() log.createLogger({ context = "x" }) end,
        "createLogger: expected context to be a table, got string")
      raises(function() log.createLogger({ source = 1 }) end,
        "createLogger: expected source to be a string, got number")
      raises(function() log.createLogger({ sink = "x" }) end,
        "createLogger: expected sink to be a function, got string")
      raises(function() log.createLogger("info") end,
        "createLogger: expected options to be a table, got string")
    end)

    it("point at the caller (level 2)", function()
      local ok, err = pcall(function() log.createLogger({ level = "loud" }) end)
      assert.is_false(ok)
      assert.is_truthy(err:find("log_spec.lua:%d+: createLogger"))
    end)
  end)

  it("the real clock gives millisecond precision", function()
    local sec, ms = realNow()
    assert.is_true(math.abs(sec - os.time()) <= 1)
    assert.is_true(ms >= 0 and ms <= 999 and ms == math.floor(ms))
  end)
end)
