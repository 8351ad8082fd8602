-- am2z.redis against a real redis-server (scripts/test.sh starts one and
-- exports AM2Z_TEST_REDIS_URL; tests that need their own server start one).
local am2z = require("am2z")
local errors = am2z.errors
local core = require("am2z.core")

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local function run(fn) return am2z.run(fn, { timeoutMs = TEST_TIMEOUT_MS }) end
local silent = am2z.createSilentLogger()

local redis_server = require("redis_server")

local free_port = redis_server.free_port

describe("am2z.redis #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end

  local conn
  before_each(function()
    conn = run(function() return assert(am2z.redis.connect{ url = URL, logger = silent }) end)
    run(function() assert(conn:call("FLUSHDB")) end)
  end)
  after_each(function()
    conn:close()
  end)

  it("parses redis:// URLs", function()
    assert.are.same({ host = "h", port = 7000, db = 3, username = "u", password = "p" },
      am2z.redis.parseUrl("redis://u:p@h:7000/3"))
    assert.are.same({ host = "127.0.0.1", port = 6379, db = 0 }, am2z.redis.parseUrl("redis://"))
    local none, err = am2z.redis.parseUrl("http://x")
    assert.is_nil(none)
    assert.matches("expected a redis:// URL", err)
  end)

  it("converts replies: status, bulk, integer, nil, arrays with nil elements", function()
    run(function()
      assert.are.equal("OK", conn:call("SET", "k", 42))
      assert.are.equal("42", conn:call("GET", "k"))
      assert.are.equal(43, conn:call("INCR", "k"))
      assert.is_nil(conn:call("GET", "missing"))
      local r = conn:call("MGET", "k", "missing")
      assert.are.equal("43", r[1])
      assert.are.equal(am2z.redis.null, r[2])
    end)
  end)

  it("a Redis error reply is a RedisError, not a raise", function()
    run(function()
      conn:call("SET", "k", "v")
      local r, err = conn:call("HGET", "k", "f")
      assert.is_nil(r)
      assert.is_true(errors.is(err, am2z.redis.RedisError))
      assert.matches("WRONGTYPE", err.message)
    end)
  end)

  it("commands from many coroutines share the connection and all complete", function()
    run(function()
      local n = 500
      for _ = 1, n do
        core.spawn(function() return conn:call("INCR", "ctr") end, "child", 0, 0, 1)
      end
      local seen = {}
      for _ = 1, n do
        local _, status, v = core.wait_child()
        assert.are.equal("OK", status)
        seen[v] = true
      end
      assert.are.equal(tostring(n), conn:call("GET", "ctr"))
      for i = 1, n do assert.is_true(seen[i], "reply " .. i .. " missing") end
    end)
  end)

  it("a command's own deadline ends the wait with a TimeoutError; the connection stays usable", function()
    run(function()
      local t0 = am2z.now()
      local r, err = conn:callTimeout(60, "BLPOP", "nothing-here", 2)
      local dt = am2z.now() - t0
      assert.is_nil(r)
      assert.is_true(errors.is(err, errors.TimeoutError), tostring(err))
      assert.is_true(dt >= 55 and dt < 1500, "took " .. dt .. " ms")
      -- the late BLPOP reply is dropped; later replies still match their calls
      assert.are.equal("PONG", conn:call("PING"))
      assert.are.equal("OK", conn:call("SET", "a", "1"))
      assert.are.equal("1", conn:call("GET", "a"))
    end)
  end)

  it("a processor waiting on Redis is cancelled like any other wait", function()
    local rt = am2z.LocalRuntime.new{ logger = silent }
    rt:register(am2z.createProcessor("blocked"):withTimeout(80):process(function(s)
      local r, err = conn:callTimeout(0, "BLPOP", "never", 5)
      s.err = err and err.name
      return am2z.Success(s)
    end)):start()
    run(function()
      local t0 = am2z.now()
      local r = rt:execute("blocked", {})
      assert.is_false(r.success)
      assert.is_true(errors.is(r.error, errors.TimeoutError))
      assert.is_true(am2z.now() - t0 < 1500)
      rt:stop()
    end)
  end)

  it("scripts run by SHA and reload themselves after SCRIPT FLUSH", function()
    run(function()
      local s = am2z.redis.script("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])")
      assert.are.equal("x", s:run(conn, { "sk" }, { "x" }))
      assert.is_string(s.sha)
      assert.are.equal("OK", conn:call("SCRIPT", "FLUSH"))
      assert.are.equal("y", s:run(conn, { "sk" }, { "y" }))
      local bad = am2z.redis.script("return redis.call('NOPE')")
      local r, err = bad:run(conn, {}, {})
      assert.is_nil(r)
      assert.is_true(errors.is(err, am2z.redis.RedisError))
    end)
  end)

  it("bad arguments raise with clear messages", function()
    run(function()
      assert.has_error(function() conn:call() end, "conn:call: expected a command name")
      assert.has_error(function() conn:call("SET", "k", {}) end)
    end)
    assert.has_error(function() am2z.redis.connect("nope") end)
  end)
end)

describe("am2z.redis connection loss #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end

  it("Redis down at start: connect returns a NetworkError at once, no hang", function()
    run(function()
      local port = free_port()
      local t0 = am2z.now()
      local c, err = am2z.redis.connect{ host = "127.0.0.1", port = port, logger = silent }
      assert.is_nil(c)
      assert.is_true(errors.is(err, errors.NetworkError), tostring(err))
      assert.matches(tostring(port), err.message)
      assert.is_true(am2z.now() - t0 < 1000)
    end)
  end)

  it("Redis lost mid-run: calls fail with NetworkError, then the connection comes back by itself", function()
    local srv = redis_server.start()
    finally(function() srv:cleanup() end)
    run(function()
      local c = assert(am2z.redis.connect{ host = "127.0.0.1", port = srv.port, logger = silent,
                                           reconnectMax = 200 })
      assert.are.equal("OK", c:call("SET", "k", "1"))
      srv:kill()
      -- the drop is seen by the next call (or already, by the poll)
      local r, err = c:call("GET", "k")
      assert.is_nil(r)
      assert.is_true(errors.is(err, errors.NetworkError), tostring(err))
      srv:restart()
      -- No event announces the reconnection: wait for it, bounded.
      local deadline = am2z.now() + 5000
      while not c:isReady() and am2z.now() < deadline do am2z.sleep(20) end
      assert.is_true(c:isReady(), "did not reconnect")
      assert.are.equal("OK", c:call("SET", "k", "2"))
      assert.are.equal("2", c:call("GET", "k"))
      c:close()
    end)
  end)
end)
