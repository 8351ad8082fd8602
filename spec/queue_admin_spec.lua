-- Queue administration and the rate limiter, against a real redis-server.
local am2z = require("am2z")
local core = require("am2z.core")

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local silent = am2z.createSilentLogger()
local seq = 0
local function fresh(tag)
  seq = seq + 1
  return ("admin-%s-%d-%d-%d"):format(tag, os.time(), math.random(1e6), seq)
end
local function run(fn) return am2z.run(fn, { timeoutMs = 20000 }) end

describe("queue administration #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end
  local conn = { url = URL, logger = silent }

  it("drain removes waiting and prioritized jobs (and delayed ones when asked), keys and all", function()
    run(function()
      local name = fresh("drain")
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local w1 = q:add("a", {})
      q:add("b", {}, { priority = 3 })
      local d = q:add("c", {}, { delay = 60000 })
      assert.are.equal(2, q:drain())
      local c = q:getJobCounts()
      assert.are.same({ 0, 0, 1 }, { c.waiting, c.prioritized, c.delayed })
      assert.is_nil(q:getJob(w1.id))
      assert.is_not_nil(q:getJob(d.id))
      assert.are.equal(1, q:drain(true))
      assert.are.equal(0, q:getJobCounts().delayed)
      assert.is_nil(q:getJob(d.id))
      q:close()
    end)
  end)

  it("clean removes finished jobs older than the grace period, up to the limit, and emits cleaned", function()
    run(function()
      local name = fresh("clean")
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local ev = am2z.queue.QueueEvents.new(name, { connection = conn, logger = silent })
      ev:waitUntilReady()
      local jobs = {}
      for i = 1, 5 do jobs[i] = q:add("j", { i = i }) end
      local w = am2z.queue.Worker.new(name, function(job) return job.data.i end,
        { connection = conn, logger = silent })
      for i = 1, 5 do assert.are.equal(i, jobs[i]:waitUntilFinished(ev, 5000)) end
      w:close()
      -- nothing is older than an hour
      assert.are.same({}, q:clean(3600000, 0, "completed"))
      local cleaned
      ev:on("cleaned", function(f) cleaned = f end)
      local ids = q:clean(0, 2, "completed")
      assert.are.equal(2, #ids)
      assert.are.equal(3, q:getJobCounts().completed)
      for _, id in ipairs(ids) do assert.is_nil(q:getJob(id)) end
      local r = am2z.redis.connect(conn)
      local evs = r:call("XREVRANGE", "bull:" .. name .. ":events", "+", "-", "COUNT", 1)
      assert.are.equal("cleaned", evs[1][2][2])
      assert.are.equal("2", evs[1][2][4])
      r:close()
      assert.has_error(function() q:clean(-1) end)
      assert.has_error(function() q:clean(0, 0, "nope") end)
      ev:close()
      q:close()
    end)
  end)

  it("obliterate deletes every key of the queue; refuses active jobs unless forced", function()
    run(function()
      local name = fresh("oblit")
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      for i = 1, 30 do q:add("j", { i = i }, i % 3 == 0 and { delay = 60000 } or nil) end
      local r = am2z.redis.connect(conn)
      -- one job made active by hand, with a lock, as a worker would
      local id = r:call("RPOPLPUSH", "bull:" .. name .. ":wait", "bull:" .. name .. ":active")
      r:call("SET", "bull:" .. name .. ":" .. id .. ":lock", "tok", "PX", 60000)
      local ok, err = q:obliterate()
      assert.is_nil(ok)
      assert.matches("active jobs", err.message)
      assert.is_true(q:obliterate({ force = true, count = 7 }))
      local left = r:call("KEYS", "bull:" .. name .. ":*")
      assert.are.same({}, left)
      r:close()
      q:close()
    end)
  end)

  it("the rate limiter spaces job starts: { max = 1, duration = 200 } runs 4 jobs over >= 600 ms", function()
    run(function()
      local name = fresh("limit")
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      for i = 1, 4 do q:add("j", { i = i }) end
      local starts, me, token = {}, (core.current()), require("am2z.executor").newToken()
      local w = am2z.queue.Worker.new(name, function(job)
        starts[#starts + 1] = am2z.now()
        return true
      end, { connection = conn, logger = silent, concurrency = 4, limiter = { max = 1, duration = 200 } })
      local n = 0
      w:on("completed", function() n = n + 1 if n == 4 then core.complete_host(me, token) end end)
      core.wait_host(token)
      w:close()
      table.sort(starts)
      -- Starts are seen after the fetch's reply, so a late one shortens a
      -- gap; without the limiter they would be about 1 ms apart.
      assert.is_true(starts[4] - starts[1] >= 500, "4 starts within " .. (starts[4] - starts[1]) .. " ms")
      for i = 2, 4 do
        assert.is_true(starts[i] - starts[i - 1] >= 100, "starts " .. i - 1 .. " and " .. i .. " too close")
      end
      q:close()
    end)
  end)
end)

describe("malformed jobs from other producers #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end
  local conn = { url = URL, logger = silent }

  it("a job hash missing BullMQ's fields fails alone with a reason naming them; the next job runs", function()
    run(function()
      local name = fresh("malformed")
      local P = "bull:" .. name .. ":"
      local r = assert(am2z.redis.connect(conn))
      -- written by hand, as a buggy producer might: only data, no name/opts/timestamp
      r:call("HSET", P .. "bad1", "data", "{}")
      r:call("LPUSH", P .. "wait", "bad1")
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local good = assert(q:add("fine", { x = 1 }))
      local ev = am2z.queue.QueueEvents.new(name, { connection = conn, logger = silent })
      ev:waitUntilReady()
      local w = am2z.queue.Worker.new(name, function(job) return job.data.x end,
        { connection = conn, logger = silent })
      assert.are.equal(1, good:waitUntilFinished(ev, 5000))
      local bad = q:getJob("bad1")
      assert.are.equal("failed", q:getJobState("bad1"))
      assert.matches("missing field%(s%): name, opts, timestamp", bad.failedReason)
      w:close()
      ev:close()
      q:close()
      r:close()
    end)
  end)
end)

describe("am2z-lua and queue handles #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end
  it("SIGTERM closes open workers and event readers, and the program exits", function()
    local BIN = os.getenv("AM2Z_BIN") or "./build/bin/am2z-lua"
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write(([[
local am2z = require("am2z")
local conn = { url = %q, logger = am2z.createSilentLogger() }
am2z.queue.Worker.new("sigterm-q", function() return 1 end, { connection = conn, logger = am2z.createSilentLogger() })
am2z.queue.QueueEvents.new("sigterm-q", { connection = conn, logger = am2z.createSilentLogger() })
am2z.sleep(100)
print("READY")
io.stdout:flush()
]]):format(URL))
    f:close()
    local out = os.tmpname()
    -- start it, wait for READY (another process: poll its output, bounded), TERM it
    local p = io.popen(("(%s %s > %s 2>&1 & echo $!)"):format(BIN, script, out))
    local pid = tonumber(p:read("*l"))
    p:close()
    for _ = 1, 300 do
      local o = io.open(out)
      local s = o and o:read("*a") or ""
      if o then o:close() end
      if s:find("READY") then break end
      os.execute("sleep 0.02")
    end
    os.execute("kill -TERM " .. pid)
    local gone = false
    for _ = 1, 300 do
      if os.execute("kill -0 " .. pid .. " 2>/dev/null") ~= 0 then gone = true break end
      os.execute("sleep 0.02")
    end
    if not gone then os.execute("kill -9 " .. pid) end
    os.remove(script)
    os.remove(out)
    assert.is_true(gone, "am2z-lua was still running 6 s after SIGTERM")
  end)
end)
