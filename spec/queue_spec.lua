-- am2z.queue (Queue, Worker, QueueEvents, Job) against a real redis-server:
-- what the layer writes to Redis is checked against BullMQ 6's data model
-- (shared/design/bullmq-protocol.md §2, 3, 5, 6, 7), read back with a plain
-- am2z.redis connection. Every test uses a queue of its own.
local am2z = require("am2z")
local cjson = require("cjson")
local core = require("am2z.core")
local executor = require("am2z.executor")
local errors = am2z.errors
local Queue, Worker, QueueEvents = am2z.queue.Queue, am2z.queue.Worker, am2z.queue.QueueEvents

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local MULT = tonumber(os.getenv("AM2Z_TEST_TIMEOUT_MULT")) or 1
local silent = am2z.createSilentLogger()
local CONN = { url = URL, logger = silent }
local AM2Z_LUA = os.getenv("AM2Z_BIN") or "./build/bin/am2z-lua"

local function run(fn, ms) return am2z.run(fn, { timeoutMs = (ms or 8000) * MULT }) end

-- Queue names unique across runs and tests.
local run_tag
do
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(3) or tostring(math.random(1e6))
  if f then f:close() end
  run_tag = (b:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end
local seq = 0
local function fresh(tag)
  seq = seq + 1
  return ("qspec-%s-%d-%s-%d"):format(tag or "q", os.time(), run_tag, seq)
end

-- ------------------------------------------------------------ helpers

-- A condition variable on the engine: notify() wakes every waiter, each
-- re-checks its predicate. waitFor is bounded (raises on timeout).
local function newCond()
  local c = { _w = {} }
  function c.notify()
    local ws = c._w
    c._w = {}
    for _, x in ipairs(ws) do core.complete_host(x[1], x[2]) end
  end
  function c.waitFor(pred, ms, what)
    local deadline = am2z.now() + ms * MULT
    while true do
      local v = pred()
      if v then return v end
      local left = deadline - am2z.now()
      if left <= 0 then error(("timed out after %d ms waiting for %s"):format(ms, what or "a condition"), 2) end
      local me, token = (core.current()), executor.newToken()
      c._w[#c._w + 1] = { me, token }
      local timer = core.spawn(function()
        if core.sleep(left) then core.complete_host(me, token) end
        return true
      end, "root", 0, 0, 1)
      core.wait_host(token)
      core.cancel(timer)
    end
  end
  return c
end

-- Objects to close after each test, even when it fails.
local created = {}
local function queue(name, opts)
  opts = opts or {}
  opts.connection = opts.connection or CONN
  opts.logger = silent
  local q = Queue.new(name, opts)
  created[#created + 1] = q
  return q
end
local function worker(name, fn, opts)
  opts = opts or {}
  opts.connection = opts.connection or CONN
  opts.logger = silent
  local w = Worker.new(name, fn, opts)
  created[#created + 1] = w
  return w
end
local function queueEvents(name, opts)
  opts = opts or {}
  opts.connection = opts.connection or CONN
  opts.logger = silent
  local ev = QueueEvents.new(name, opts)
  created[#created + 1] = ev
  return ev
end

-- Records a worker's events and lets the test wait for them.
local function track(w)
  local t = { completed = {}, failed = {}, retrying = {}, active = {}, drained = 0, stalled = {},
              progress = {}, order = {}, cond = newCond() }
  w:on("completed", function(job, rv)
    t.completed[job.id] = { job = job, rv = rv }
    t.order[#t.order + 1] = "completed:" .. job.id
    t.cond.notify()
  end)
  w:on("failed", function(job, err, retrying)
    if retrying then
      t.retrying[#t.retrying + 1] = { id = job.id, err = err }
      t.order[#t.order + 1] = "retrying:" .. job.id
    else
      t.failed[job.id] = { job = job, err = err }
      t.order[#t.order + 1] = "failed:" .. job.id
    end
    t.cond.notify()
  end)
  w:on("active", function(job)
    t.active[#t.active + 1] = job.id
    t.order[#t.order + 1] = "active:" .. job.id
    t.cond.notify()
  end)
  w:on("drained", function()
    t.drained = t.drained + 1
    t.order[#t.order + 1] = "drained"
    t.cond.notify()
  end)
  w:on("stalled", function(id)
    t.stalled[#t.stalled + 1] = id
    t.cond.notify()
  end)
  w:on("progress", function(job, p)
    t.progress[#t.progress + 1] = { id = job.id, p = p }
    t.cond.notify()
  end)
  function t.finished(id) return t.completed[id] ~= nil or t.failed[id] ~= nil end
  function t.waitFinished(ids, ms)
    if type(ids) ~= "table" then ids = { ids } end
    t.cond.waitFor(function()
      for _, id in ipairs(ids) do if not t.finished(id) then return false end end
      return true
    end, ms or 5000, "jobs " .. table.concat(ids, ",") .. " to finish")
  end
  return t
end

local function raises(fn, ...)
  local ok, e = pcall(fn)
  assert.is_false(ok, "expected an error")
  local msg = tostring(type(e) == "table" and (e.message or e) or e)
  for _, s in ipairs({ ... }) do
    assert.is_truthy(msg:find(s, 1, true), ("error %q does not contain %q"):format(msg, s))
  end
  return msg
end

-- Plain Redis readers.
local R -- the inspection connection (opened per test)
local function P(name) return "bull:" .. name .. ":" end
local function hgetall(key)
  local arr = assert(R:call("HGETALL", key))
  local h = {}
  for i = 1, #arr, 2 do h[arr[i]] = arr[i + 1] end
  return h
end
local function lrange(key) return assert(R:call("LRANGE", key, 0, -1)) end
local function zrange(key)
  local arr = assert(R:call("ZRANGE", key, 0, -1, "WITHSCORES"))
  local out = {}
  for i = 1, #arr, 2 do out[#out + 1] = { arr[i], tonumber(arr[i + 1]) } end
  return out
end
local function zmembers(key)
  local out = {}
  for _, e in ipairs(zrange(key)) do out[#out + 1] = e[1] end
  return out
end
local function exists(key) return R:call("EXISTS", key) == 1 end
-- Entries of the events stream: { id =, event =, <field> = value }.
local function events(name, jobId)
  local arr = assert(R:call("XRANGE", P(name) .. "events", "-", "+"))
  local out = {}
  for _, e in ipairs(arr) do
    local f = { id = e[1] }
    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
    if jobId == nil or f.jobId == jobId then out[#out + 1] = f end
  end
  return out
end
local function event_names(name, jobId)
  local out = {}
  for _, e in ipairs(events(name, jobId)) do out[#out + 1] = e.event end
  return out
end
local function find_event(name, ev, jobId)
  for _, e in ipairs(events(name, jobId)) do if e.event == ev then return e end end
  return nil
end
local function count_events(name, ev, jobId)
  local n = 0
  for _, e in ipairs(events(name, jobId)) do if e.event == ev then n = n + 1 end end
  return n
end

describe("am2z.queue #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end

  before_each(function()
    R = run(function() return assert(am2z.redis.connect{ url = URL, logger = silent }) end)
  end)

  after_each(function()
    local list = created
    created = {}
    pcall(run, function()
      for i = #list, 1, -1 do
        local o = list[i]
        if not o._closing then pcall(o.close, o) end
      end
    end, 5000)
    if R then R:close() end
    R = nil
  end)

  -- ------------------------------------------------------------------ add
  describe("Queue:add", function()
    it("writes the standard job hash, pushes to wait, sets the marker and writes added/waiting", function()
      local name = fresh("std")
      run(function()
        local q = queue(name)
        local before = math.floor(core.wall_ms())
        local job = assert(q:add("welcome", { to = "a@b.c", n = 3 }))
        local after = math.floor(core.wall_ms())
        assert.are.equal("1", job.id)
        assert.are.equal("welcome", job.name)
        local h = hgetall(P(name) .. job.id)
        assert.are.equal("welcome", h.name)
        assert.are.same({ to = "a@b.c", n = 3 }, cjson.decode(h.data))
        assert.are.same({ attempts = 0 }, cjson.decode(h.opts))
        local ts = tonumber(h.timestamp)
        assert.is_true(ts >= before and ts <= after, "timestamp " .. h.timestamp)
        assert.are.equal("0", h.delay)
        assert.are.equal("0", h.priority)
        for _, f in ipairs({ "atm", "ats", "processedOn", "finishedOn", "returnvalue", "failedReason" }) do
          assert.is_nil(h[f], f .. " must not be set by add")
        end
        assert.are.same({ job.id }, lrange(P(name) .. "wait"))
        assert.are.same({ { "0", 0 } }, zrange(P(name) .. "marker"))
        assert.are.equal("1", R:call("GET", P(name) .. "id"))
        assert.are.equal("10000", R:call("HGET", P(name) .. "meta", "opts.maxLenEvents"))
        local ev = events(name)
        assert.are.equal(2, #ev)
        assert.are.equal("added", ev[1].event)
        assert.are.equal(job.id, ev[1].jobId)
        assert.are.equal("welcome", ev[1].name)
        assert.are.equal("waiting", ev[2].event)
        assert.are.equal(job.id, ev[2].jobId)
        -- nil data is stored as {}
        local j2 = assert(q:add("empty"))
        assert.are.equal("{}", R:call("HGET", P(name) .. j2.id, "data"))
      end)
    end)

    it("stores the job options in opts JSON (backoff normalised, attempts filled in)", function()
      local name = fresh("opts")
      run(function()
        local q = queue(name)
        local job = assert(q:add("x", {}, { attempts = 3, backoff = 300, removeOnComplete = 10 }))
        local o = cjson.decode(R:call("HGET", P(name) .. job.id, "opts"))
        assert.are.equal(3, o.attempts)
        assert.are.same({ type = "fixed", delay = 300 }, o.backoff)
        assert.are.equal(10, o.removeOnComplete)
        local j2 = assert(q:add("y", {}, { backoff = { type = "exponential", delay = 500 } }))
        o = cjson.decode(R:call("HGET", P(name) .. j2.id, "opts"))
        assert.are.same({ type = "exponential", delay = 500 }, o.backoff)
        assert.are.equal(0, o.attempts)
      end)
    end)

    it("increments the id counter on every add, custom ids included", function()
      local name = fresh("ids")
      run(function()
        local q = queue(name)
        local a = assert(q:add("a", {}))
        local b = assert(q:add("b", {}, { jobId = "custom-b" }))
        local c = assert(q:add("c", {}))
        assert.are.equal("1", a.id)
        assert.are.equal("custom-b", b.id)
        assert.are.equal("3", c.id)
        assert.are.equal("3", R:call("GET", P(name) .. "id"))
        assert.are.equal("b", R:call("HGET", P(name) .. "custom-b", "name"))
        assert.are.same({ "3", "custom-b", "1" }, lrange(P(name) .. "wait"))
      end)
    end)

    it("a duplicate custom id returns the existing id, overwrites nothing and writes `duplicated`", function()
      local name = fresh("dup")
      run(function()
        local q = queue(name)
        local a = assert(q:add("first", { v = 1 }, { jobId = "same" }))
        local b = assert(q:add("second", { v = 2 }, { jobId = "same", priority = 4 }))
        assert.are.equal("same", a.id)
        assert.are.equal("same", b.id)
        local h = hgetall(P(name) .. "same")
        assert.are.equal("first", h.name)
        assert.are.same({ v = 1 }, cjson.decode(h.data))
        assert.are.equal("0", h.priority)
        assert.are.equal("2", R:call("GET", P(name) .. "id"), "the counter grows on duplicates too")
        assert.are.same({ "same" }, lrange(P(name) .. "wait"))
        assert.are.same({}, zrange(P(name) .. "prioritized"))
        assert.are.same({ "added", "waiting", "duplicated" }, event_names(name, "same"))
        assert.are.equal(1, count_events(name, "added"))
      end)
    end)

    it("delayed: score = due*4096 (+seq in the same ms), `delayed` event with the absolute due time, marker \"1\"", function()
      local name = fresh("delayed")
      run(function()
        local q = queue(name)
        local ts = math.floor(core.wall_ms())
        local a = assert(q:add("a", {}, { delay = 5000, timestamp = ts }))
        local b = assert(q:add("b", {}, { delay = 5000, timestamp = ts }))
        local c = assert(q:add("c", {}, { delay = 9000, timestamp = ts }))
        local due = ts + 5000
        assert.are.same({ { a.id, due * 4096 }, { b.id, due * 4096 + 1 }, { c.id, (ts + 9000) * 4096 } },
          zrange(P(name) .. "delayed"))
        local h = hgetall(P(name) .. a.id)
        assert.are.equal("5000", h.delay, "the hash keeps the relative delay")
        assert.are.equal(tostring(ts), h.timestamp)
        local o = cjson.decode(h.opts)
        assert.are.equal(5000, o.delay)
        local ev = find_event(name, "delayed", a.id)
        assert.are.equal(tostring(due), ev.delay)
        assert.are.equal(tostring(ts + 9000), find_event(name, "delayed", c.id).delay)
        assert.is_nil(find_event(name, "waiting", a.id))
        assert.are.same({ { "1", due } }, zrange(P(name) .. "marker"))
        assert.are.same({}, lrange(P(name) .. "wait"))
        assert.are.equal("delayed", q:getJobState(a.id))
      end)
    end)

    it("prioritized: score = priority*2^32 + pc counter; pc grows per insert", function()
      local name = fresh("prio")
      run(function()
        local q = queue(name)
        local a = assert(q:add("a", {}, { priority = 5 }))
        local b = assert(q:add("b", {}, { priority = 1 }))
        local c = assert(q:add("c", {}, { priority = 5 }))
        local z = zrange(P(name) .. "prioritized")
        assert.are.same({ { b.id, 1 * 4294967296 + 2 }, { a.id, 5 * 4294967296 + 1 },
                          { c.id, 5 * 4294967296 + 3 } }, z)
        assert.are.equal("3", R:call("GET", P(name) .. "pc"))
        assert.are.equal("5", R:call("HGET", P(name) .. a.id, "priority"))
        assert.are.same({}, lrange(P(name) .. "wait"))
        assert.are.same({ { "0", 0 } }, zrange(P(name) .. "marker"))
        assert.are.equal("waiting", find_event(name, "waiting", a.id).event)
      end)
    end)

    it("LPUSHes plain jobs and RPUSHes lifo jobs (taken first from the tail)", function()
      local name = fresh("lifo")
      run(function()
        local q = queue(name)
        local a = assert(q:add("a", {}))
        local b = assert(q:add("b", {}))
        local c = assert(q:add("c", {}, { lifo = true }))
        assert.are.same({ b.id, a.id, c.id }, lrange(P(name) .. "wait"))
        assert.is_true(cjson.decode(R:call("HGET", P(name) .. c.id, "opts")).lifo)
        local order, t = {}, nil
        local w = worker(name, function(job) order[#order + 1] = job.name end)
        t = track(w)
        t.waitFinished({ a.id, b.id, c.id })
        w:close()
        assert.are.same({ "c", "a", "b" }, order)
      end)
    end)

    it("rejects invalid options with clear messages and writes nothing", function()
      local name = fresh("invalid")
      run(function()
        local q = queue(name)
        raises(function() q:add("x", {}, { jobId = "a:b" }) end, "queue:add", "jobId")
        raises(function() q:add("x", {}, { jobId = "42" }) end, "queue:add", "jobId", "integer")
        raises(function() q:add("x", {}, { jobId = "0" }) end, "jobId")
        raises(function() q:add("x", {}, { jobId = "" }) end, "jobId")
        raises(function() q:add("x", {}, { jobId = 7 }) end, "jobId")
        raises(function() q:add("x", {}, { delay = -1 }) end, "queue:add", "delay")
        raises(function() q:add("x", {}, { delay = "10" }) end, "delay")
        raises(function() q:add("x", {}, { priority = 1.5 }) end, "priority")
        raises(function() q:add("x", {}, { priority = -1 }) end, "priority")
        raises(function() q:add("x", {}, { priority = 2 ^ 21 }) end, "priority")
        raises(function() q:add("x", {}, { attempts = -2 }) end, "attempts")
        raises(function() q:add("x", {}, { backoff = "fast" }) end, "backoff")
        raises(function() q:add("x", {}, { removeOnComplete = "yes" }) end, "removeOnComplete")
        raises(function() q:add("x", {}, { bogus = 1 }) end, "queue:add", "unknown job option", "bogus")
        raises(function() q:add("x", { f = function() end }) end, "queue:add", "JSON")
        raises(function() q:add(42, {}) end, "queue:add", "job name")
        raises(function() q:add("x", {}, "opts") end, "queue:add", "options")
        raises(function() q:addBulk({ { name = "ok", data = {} }, { name = "bad", opts = { delay = -5 } } }) end,
          "queue:addBulk", "delay")
        raises(function() q:addBulk("nope") end, "queue:addBulk")
        assert.is_nil(R:call("GET", P(name) .. "id"), "no add reached Redis")
        assert.are.same({}, lrange(P(name) .. "wait"))
      end)
    end)

    it("addBulk returns the jobs in order, each written like a single add", function()
      local name = fresh("bulk")
      run(function()
        local q = queue(name)
        local list = {}
        for i = 1, 20 do list[i] = { name = "n" .. i, data = { i = i } } end
        list[21] = { name = "custom", data = { i = 21 }, opts = { jobId = "bulk-custom", priority = 2 } }
        list[22] = { name = "later", data = { i = 22 }, opts = { delay = 60000 } }
        local jobs = assert(q:addBulk(list))
        assert.are.equal(22, #jobs)
        local ids = {}
        for i, j in ipairs(jobs) do
          assert.are.equal(list[i].name, j.name)
          assert.are.same(list[i].data, j.data)
          assert.are.same({ i = i }, cjson.decode(R:call("HGET", P(name) .. j.id, "data")))
          assert.is_nil(ids[j.id], "duplicate id " .. j.id)
          ids[j.id] = true
        end
        assert.are.equal("bulk-custom", jobs[21].id)
        assert.are.equal("22", R:call("GET", P(name) .. "id"))
        assert.are.same({ active = 0, completed = 0, delayed = 1, failed = 0, prioritized = 1,
                          waiting = 20, ["waiting-children"] = 0 }, q:getJobCounts())
      end)
    end)
  end)

  -- ----------------------------------------------------------- reading
  describe("reading jobs", function()
    it("getJobCounts / getJobState / getJob / getJobs for every state", function()
      local name = fresh("states")
      run(function()
        local q = queue(name)
        local gate = newCond()
        local open = false
        local done = assert(q:add("done", { v = 1 }))
        local bad = assert(q:add("bad", {}))
        local hold = assert(q:add("hold", {}))
        local w = worker(name, function(job)
          if job.name == "bad" then error("nope", 0) end
          if job.name == "hold" then gate.waitFor(function() return open end, 5000, "the gate") end
          return { name = job.name }
        end)
        local t = track(w)
        t.cond.waitFor(function()
          return t.active[3] == hold.id
        end, 5000, "hold to be active")
        local waiting = assert(q:add("w", {}))
        local prio = assert(q:add("p", {}, { priority = 3 }))
        local delayed = assert(q:add("d", {}, { delay = 60000 }))
        R:call("ZADD", P(name) .. "waiting-children", 1, "wc") -- a parent, written directly
        R:call("HSET", P(name) .. "wc", "name", "parent", "data", "{}", "opts", "{}", "timestamp", 1,
          "delay", 0, "priority", 0)

        assert.are.same({ active = 1, completed = 1, delayed = 1, failed = 1, prioritized = 1,
                          waiting = 1, ["waiting-children"] = 1 }, q:getJobCounts())
        assert.are.same({ waiting = 1, delayed = 1 }, q:getJobCounts("waiting", "delayed"))
        assert.are.equal("completed", q:getJobState(done.id))
        assert.are.equal("failed", q:getJobState(bad.id))
        assert.are.equal("active", q:getJobState(hold.id))
        assert.are.equal("waiting", q:getJobState(waiting.id))
        assert.are.equal("prioritized", q:getJobState(prio.id))
        assert.are.equal("delayed", q:getJobState(delayed.id))
        assert.are.equal("waiting-children", q:getJobState("wc"))
        assert.are.equal("unknown", q:getJobState("nope"))
        assert.are.equal("prioritized", prio:getState())

        local j = assert(q:getJob(done.id))
        assert.are.equal(done.id, j.id)
        assert.are.equal("done", j.name)
        assert.are.same({ v = 1 }, j.data)
        assert.are.same({ attempts = 0 }, j.opts)
        assert.are.same({ name = "done" }, j.returnvalue)
        assert.are.equal(1, j.attemptsMade)
        assert.are.equal(1, j.attemptsStarted)
        assert.is_number(j.processedOn)
        assert.is_true(j.finishedOn >= j.processedOn)
        assert.is_true(j.processedOn >= j.timestamp)
        local f = assert(q:getJob(bad.id))
        assert.are.equal("nope", f.failedReason)
        assert.are.equal(1, #f.stacktrace)
        assert.is_nil(q:getJob("nope"))
        local d = assert(q:getJob(delayed.id))
        assert.are.equal(60000, d.delay)
        assert.are.equal(3, assert(q:getJob(prio.id)).priority)

        local function ids(list)
          local out = {}
          for _, x in ipairs(list) do out[#out + 1] = x.id end
          return out
        end
        assert.are.same({ done.id }, ids(q:getJobs({ "completed" }, 0, 9)))
        assert.are.same({ bad.id }, ids(q:getJobs("failed")))
        assert.are.same({ hold.id }, ids(q:getJobs({ "active" })))
        assert.are.same({ done.id, bad.id }, ids(q:getJobs({ "completed", "failed" })))
        assert.are.same({ waiting.id, prio.id, delayed.id }, ids(q:getJobs({ "waiting", "prioritized", "delayed" })))
        raises(function() q:getJobs({ "nonsense" }) end, "queue:getJobs", "nonsense")
        raises(function() q:getJobCounts("nonsense") end, "queue:getJobCounts", "nonsense")

        -- let everything that is ready run
        open = true
        gate.notify()
        t.waitFinished({ hold.id, waiting.id, prio.id })
        w:close()
        assert.are.equal("completed", q:getJobState(hold.id))
        assert.are.equal("completed", q:getJobState(prio.id))
        assert.are.equal("delayed", q:getJobState(delayed.id))
      end)
    end)

    it("getJobState never reports `unknown` for an existing job while workers move it", function()
      local name = fresh("staterace")
      run(function()
        local q = queue(name)
        local list = {}
        for i = 1, 200 do list[i] = { name = "j", data = {} } end
        local jobs = assert(q:addBulk(list))
        local w = worker(name, function() return 1 end, { concurrency = 8 })
        local cond, finished = newCond(), 0
        local unknown, checks, states = 0, 0, {}
        local pollers = 4
        for p = 1, pollers do
          local qp = queue(name)
          core.spawn(function()
            for i = p, #jobs, pollers do
              local id = jobs[i].id
              for _ = 1, 10000 do -- bounded: the job completes within a few polls
                local st = qp:getJobState(id)
                checks = checks + 1
                states[st] = (states[st] or 0) + 1
                if st == "unknown" then unknown = unknown + 1 end
                if st == "completed" then break end
              end
            end
            finished = finished + 1
            cond.notify()
            return true
          end, "root", 0, 0, 1)
        end
        cond.waitFor(function() return finished == pollers end, 10000, "the pollers")
        w:close()
        assert.are.equal(200, #zmembers(P(name) .. "completed"))
        assert.are.equal(0, unknown, ("%d of %d getJobState calls said unknown for jobs that exist"):format(unknown,
          checks))
      end, 15000)
    end)

    it("getJobs lists wait newest-first by default and oldest-first with asc", function()
      local name = fresh("listing")
      run(function()
        local q = queue(name)
        local ids = {}
        for i = 1, 5 do ids[i] = assert(q:add("n", { i = i })).id end
        local function idsOf(list)
          local out = {}
          for _, x in ipairs(list) do out[#out + 1] = x.id end
          return out
        end
        assert.are.same({ ids[5], ids[4], ids[3], ids[2], ids[1] }, idsOf(q:getJobs("waiting")))
        assert.are.same({ ids[1], ids[2] }, idsOf(q:getJobs("waiting", 0, 1, true)))
        assert.are.same({ ids[5], ids[4] }, idsOf(q:getJobs("waiting", 0, 1)))
      end)
    end)
  end)

  -- ------------------------------------------------------------- worker
  describe("Worker", function()
    it("takes jobs in BullMQ order: all of wait (FIFO) before prioritized, lower priority number first", function()
      local name = fresh("order")
      run(function()
        local q = queue(name)
        local added = {}
        local function add(n, o) added[#added + 1] = assert(q:add(n, {}, o)).id end
        add("p5a", { priority = 5 })
        add("w1")
        add("p1a", { priority = 1 })
        add("w2")
        add("p5b", { priority = 5 })
        add("p1b", { priority = 1 })
        add("w3")
        local order = {}
        local w = worker(name, function(job) order[#order + 1] = job.name end)
        local t = track(w)
        t.waitFinished(added)
        t.cond.waitFor(function() return t.drained > 0 end, 3000, "the worker to find the queue empty")
        w:close()
        assert.are.same({ "w1", "w2", "w3", "p1a", "p1b", "p5a", "p5b" }, order)
        assert.is_nil(R:call("GET", P(name) .. "pc"), "pc is deleted once prioritized is found empty")
      end)
    end)

    it("concurrency N runs N jobs at once (they overlap), never more", function()
      local name = fresh("conc")
      run(function()
        local q = queue(name)
        local ids = {}
        for i = 1, 3 do ids[i] = assert(q:add("j", { i = i })).id end
        local started, running, maxRunning = 0, 0, 0
        local c = newCond()
        local w = worker(name, function()
          started = started + 1
          running = running + 1
          maxRunning = math.max(maxRunning, running)
          c.notify()
          -- each job waits for the others to have started: only true overlap gets through
          c.waitFor(function() return started >= 3 end, 3000, "all three jobs to start")
          running = running - 1
          return "ok"
        end, { concurrency = 3 })
        local t = track(w)
        t.waitFinished(ids)
        w:close()
        for _, id in ipairs(ids) do assert.is_truthy(t.completed[id], "job " .. id .. " did not complete") end
        assert.are.equal(3, maxRunning)

        -- concurrency 2 with 6 jobs: at most 2 at a time, and 2 are reached
        local name2 = fresh("conc2")
        local q2 = queue(name2)
        local ids2 = {}
        for i = 1, 6 do ids2[i] = assert(q2:add("j", { i = i })).id end
        running, maxRunning = 0, 0
        local w2 = worker(name2, function()
          running = running + 1
          maxRunning = math.max(maxRunning, running)
          am2z.sleep(40) -- the job's work
          running = running - 1
        end, { concurrency = 2 })
        local t2 = track(w2)
        t2.waitFinished(ids2)
        w2:close()
        assert.are.equal(2, maxRunning)
      end)
    end)

    it("stores the return value as JSON, writes completed/active events and the attempt counters", function()
      local name = fresh("complete")
      run(function()
        local q = queue(name)
        local job = assert(q:add("calc", { x = 21 }))
        local nilJob = assert(q:add("nothing", {}))
        local w = worker(name, function(j)
          if j.name == "nothing" then return nil end
          return { doubled = j.data.x * 2, list = { 1, 2 } }
        end)
        local t = track(w)
        t.waitFinished({ job.id, nilJob.id })
        w:close()
        assert.are.same({ doubled = 42, list = { 1, 2 } }, t.completed[job.id].rv)
        local h = hgetall(P(name) .. job.id)
        assert.are.same({ doubled = 42, list = { 1, 2 } }, cjson.decode(h.returnvalue))
        assert.are.equal("1", h.atm)
        assert.are.equal("1", h.ats)
        assert.is_truthy(tonumber(h.processedOn))
        assert.is_true(tonumber(h.finishedOn) >= tonumber(h.processedOn))
        assert.is_nil(h.failedReason)
        assert.is_false(exists(P(name) .. job.id .. ":lock"))
        assert.are.equal("null", R:call("HGET", P(name) .. nilJob.id, "returnvalue"))
        local z = zrange(P(name) .. "completed")
        assert.are.equal(2, #z)
        assert.are.equal(job.id, z[1][1])
        assert.are.equal(tonumber(h.finishedOn), z[1][2], "completed score = finishedOn")
        assert.are.same({}, lrange(P(name) .. "active"))
        assert.are.same({}, lrange(P(name) .. "wait"))
        assert.are.same({ "added", "waiting", "active", "completed" }, event_names(name, job.id))
        local a = find_event(name, "active", job.id)
        assert.are.equal("waiting", a.prev)
        local c = find_event(name, "completed", job.id)
        assert.are.same({ doubled = 42, list = { 1, 2 } }, cjson.decode(c.returnvalue))
        assert.are.equal("active", c.prev)
        assert.is_truthy(find_event(name, "drained"), "a drained event once the queue is empty")
      end)
    end)

    it("a raised error fails the job: failedReason, stacktrace array, failed event, retries-exhausted", function()
      local name = fresh("fail")
      run(function()
        local q = queue(name)
        local job = assert(q:add("bad", {}))
        local w = worker(name, function() error("kaput", 0) end)
        local t = track(w)
        t.waitFinished(job.id)
        w:close()
        assert.is_truthy(t.failed[job.id])
        assert.matches("kaput", t.failed[job.id].err.message)
        local h = hgetall(P(name) .. job.id)
        assert.are.equal("kaput", h.failedReason)
        local st = cjson.decode(h.stacktrace)
        assert.are.equal(1, #st)
        assert.is_string(st[1])
        assert.matches("kaput", st[1])
        assert.matches("traceback", st[1])
        assert.are.equal("1", h.atm)
        assert.are.equal("1", h.ats)
        assert.is_truthy(tonumber(h.finishedOn))
        assert.is_nil(h.returnvalue)
        assert.are.same({ job.id }, zmembers(P(name) .. "failed"))
        assert.are.same({ "added", "waiting", "active", "failed", "retries-exhausted" }, event_names(name, job.id))
        local f = find_event(name, "failed", job.id)
        assert.are.equal("kaput", f.failedReason)
        assert.are.equal("active", f.prev)
        assert.are.equal("1", find_event(name, "retries-exhausted", job.id).attemptsMade)
      end)
    end)

    it("`return nil, err` fails the attempt like a raise (string or am2z error)", function()
      local name = fresh("nilerr")
      run(function()
        local q = queue(name)
        local a = assert(q:add("str", {}))
        local b = assert(q:add("obj", {}))
        local w = worker(name, function(job)
          if job.name == "str" then return nil, "soft failure" end
          return nil, errors.ValidationError("email", "x", "bad email")
        end)
        local t = track(w)
        t.waitFinished({ a.id, b.id })
        w:close()
        assert.is_truthy(t.failed[a.id])
        assert.is_truthy(t.failed[b.id])
        assert.are.equal("soft failure", R:call("HGET", P(name) .. a.id, "failedReason"))
        assert.matches("bad email", R:call("HGET", P(name) .. b.id, "failedReason"))
        assert.are.equal(1, #cjson.decode(R:call("HGET", P(name) .. a.id, "stacktrace")))
        assert.are.same({ a.id, b.id }, zmembers(P(name) .. "failed"))
      end)
    end)

    it("retries with a fixed backoff: spacing >= delay, counters, last failedReason, delayed events", function()
      local name = fresh("fixed")
      run(function()
        local q = queue(name)
        local job = assert(q:add("flaky", {}, { attempts = 3, backoff = 200 }))
        local starts = {}
        local w = worker(name, function(j)
          starts[#starts + 1] = am2z.now()
          assert(j.attemptsMade == #starts - 1, "attemptsMade seen by the processor")
          error("attempt " .. #starts .. " failed", 0)
        end)
        local t = track(w)
        t.waitFinished(job.id, 6000)
        w:close()
        assert.are.equal(3, #starts)
        for i = 2, 3 do
          assert.is_true(starts[i] - starts[i - 1] >= 198, ("gap %d was %.1f ms"):format(i, starts[i] - starts[i - 1]))
        end
        assert.are.equal(2, #t.retrying)
        local h = hgetall(P(name) .. job.id)
        assert.are.equal("3", h.atm)
        assert.are.equal("3", h.ats)
        assert.are.equal("attempt 3 failed", h.failedReason)
        local st = cjson.decode(h.stacktrace)
        assert.are.equal(3, #st)
        assert.matches("attempt 1 failed", st[1])
        assert.matches("attempt 3 failed", st[3])
        assert.are.equal("0", h.delay, "delay is reset to 0 on promotion")
        local ev = events(name, job.id)
        local delayed = {}
        for _, e in ipairs(ev) do if e.event == "delayed" then delayed[#delayed + 1] = tonumber(e.delay) end end
        assert.are.equal(2, #delayed)
        assert.is_true(delayed[1] >= tonumber(h.timestamp) + 200, "delayed.delay is an absolute due time")
        assert.are.equal(1, count_events(name, "failed", job.id), "only the final failure emits `failed`")
        assert.are.equal(2, count_events(name, "waiting", job.id) - 1, "promotions emit waiting prev delayed")
        assert.are.equal("3", find_event(name, "retries-exhausted", job.id).attemptsMade)
        assert.are.same({ job.id }, zmembers(P(name) .. "failed"))
      end)
    end)

    it("retries with an exponential backoff (1x, 2x) and completes, keeping the last failedReason", function()
      local name = fresh("expo")
      run(function()
        local q = queue(name)
        local job = assert(q:add("flaky", {}, { attempts = 3, backoff = { type = "exponential", delay = 120 } }))
        local starts = {}
        local w = worker(name, function()
          starts[#starts + 1] = am2z.now()
          if #starts < 3 then error("try " .. #starts, 0) end
          return "finally"
        end)
        local t = track(w)
        t.waitFinished(job.id, 6000)
        w:close()
        assert.are.equal(3, #starts)
        assert.is_true(starts[2] - starts[1] >= 118, "first gap " .. (starts[2] - starts[1]))
        assert.is_true(starts[3] - starts[2] >= 238, "second gap " .. (starts[3] - starts[2]))
        assert.are.equal("finally", t.completed[job.id].rv)
        local h = hgetall(P(name) .. job.id)
        assert.are.equal("3", h.atm)
        assert.are.equal("3", h.ats)
        assert.are.equal("\"finally\"", h.returnvalue)
        assert.are.equal("try 2", h.failedReason, "a later success keeps the last failedReason")
        assert.are.equal(2, #cjson.decode(h.stacktrace))
        assert.are.same({ job.id }, zmembers(P(name) .. "completed"))
        assert.is_nil(find_event(name, "retries-exhausted", job.id))
      end)
    end)

    it("retries without backoff go straight back to wait (waiting prev active)", function()
      local name = fresh("nobackoff")
      run(function()
        local q = queue(name)
        local job = assert(q:add("flaky", {}, { attempts = 2 }))
        local n = 0
        local w = worker(name, function()
          n = n + 1
          if n == 1 then error("first", 0) end
          return n
        end)
        local t = track(w)
        t.waitFinished(job.id)
        w:close()
        assert.are.equal(2, t.completed[job.id].rv)
        local found = false
        for _, e in ipairs(events(name, job.id)) do
          if e.event == "waiting" and e.prev == "active" then found = true end
        end
        assert.is_true(found, "expected waiting prev=active")
        assert.is_nil(find_event(name, "delayed", job.id))
        assert.are.equal("2", R:call("HGET", P(name) .. job.id, "atm"))
      end)
    end)

    it("removeOnComplete / removeOnFail = true delete the job; events are still written", function()
      local name = fresh("removetrue")
      run(function()
        local q = queue(name)
        local a = assert(q:add("ok", {}, { removeOnComplete = true }))
        local b = assert(q:add("ko", {}, { removeOnFail = true }))
        local w = worker(name, function(job)
          job:log("line")
          if job.name == "ko" then error("no", 0) end
          return 1
        end)
        local t = track(w)
        t.waitFinished({ a.id, b.id })
        w:close()
        assert.is_false(exists(P(name) .. a.id))
        assert.is_false(exists(P(name) .. a.id .. ":logs"))
        assert.is_false(exists(P(name) .. b.id))
        assert.is_false(exists(P(name) .. b.id .. ":logs"))
        assert.are.same({}, zrange(P(name) .. "completed"))
        assert.are.same({}, zrange(P(name) .. "failed"))
        assert.is_truthy(find_event(name, "completed", a.id))
        assert.is_truthy(find_event(name, "failed", b.id))
        assert.are.equal("unknown", q:getJobState(a.id))
      end)
    end)

    it("removeOnComplete / removeOnFail = n keep the n newest (job option and worker option)", function()
      local name = fresh("removecount")
      run(function()
        local q = queue(name)
        local ok, ko = {}, {}
        for i = 1, 4 do ok[i] = assert(q:add("ok", { i = i }, { removeOnComplete = 2 })).id end
        for i = 1, 3 do ko[i] = assert(q:add("ko", { i = i })).id end
        local all = {}
        for _, id in ipairs(ok) do all[#all + 1] = id end
        for _, id in ipairs(ko) do all[#all + 1] = id end
        local w = worker(name, function(job)
          am2z.sleep(2) -- distinct finishedOn
          if job.name == "ko" then error("no", 0) end
        end, { removeOnFail = 1 })
        local t = track(w)
        t.waitFinished(all)
        w:close()
        assert.are.same({ ok[3], ok[4] }, zmembers(P(name) .. "completed"))
        assert.is_false(exists(P(name) .. ok[1]))
        assert.is_false(exists(P(name) .. ok[2]))
        assert.is_true(exists(P(name) .. ok[4]))
        assert.are.same({ ko[3] }, zmembers(P(name) .. "failed"))
        assert.is_false(exists(P(name) .. ko[1]))
        assert.is_true(exists(P(name) .. ko[3]))
      end)
    end)

    it("removeOnComplete = { age } removes finished jobs older than age seconds", function()
      local name = fresh("removeage")
      run(function()
        local q = queue(name)
        local t, w
        local old = assert(q:add("old", {}, { removeOnComplete = { age = 1 } }))
        w = worker(name, function() return 1 end)
        t = track(w)
        t.waitFinished(old.id)
        -- make it look 5 s old (setup written directly)
        local fin = tonumber(R:call("HGET", P(name) .. old.id, "finishedOn"))
        R:call("ZADD", P(name) .. "completed", "XX", fin - 5000, old.id)
        local new = assert(q:add("new", {}, { removeOnComplete = { age = 1 } }))
        t.waitFinished(new.id)
        w:close()
        assert.are.same({ new.id }, zmembers(P(name) .. "completed"))
        assert.is_false(exists(P(name) .. old.id))
        assert.is_true(exists(P(name) .. new.id))
      end)
    end)

    it("job:updateProgress writes the progress field and event; job:log appends to J:logs", function()
      local name = fresh("progress")
      run(function()
        local q = queue(name)
        local ev = queueEvents(name)
        ev:waitUntilReady()
        local seen = {}
        local c = newCond()
        ev:on("progress", function(f) seen[#seen + 1] = f c.notify() end)
        local job = assert(q:add("p", {}))
        local logCounts = {}
        local w = worker(name, function(j)
          assert(j:updateProgress(42))
          logCounts[#logCounts + 1] = j:log("first line")
          assert(j:updateProgress({ step = "two", pct = 50 }))
          logCounts[#logCounts + 1] = j:log("second line")
          return "done"
        end)
        local t = track(w)
        t.waitFinished(job.id)
        c.waitFor(function() return #seen >= 2 end, 3000, "progress events on QueueEvents")
        w:close()
        assert.are.same({ step = "two", pct = 50 }, cjson.decode(R:call("HGET", P(name) .. job.id, "progress")))
        assert.are.same({ "first line", "second line" }, lrange(P(name) .. job.id .. ":logs"))
        assert.are.same({ 1, 2 }, logCounts)
        local pe = {}
        for _, e in ipairs(events(name, job.id)) do if e.event == "progress" then pe[#pe + 1] = e.data end end
        assert.are.equal(2, #pe)
        assert.are.equal("42", pe[1])
        assert.are.same({ step = "two", pct = 50 }, cjson.decode(pe[2]))
        assert.are.same({ "added", "waiting", "active", "progress", "progress", "completed" }, event_names(name, job.id))
        -- worker and QueueEvents listeners
        assert.are.equal(2, #t.progress)
        assert.are.equal(42, t.progress[1].p)
        assert.are.equal(job.id, seen[1].jobId)
        assert.are.equal(42, seen[1].data)
        assert.are.same({ step = "two", pct = 50 }, seen[2].data)
        assert.are.equal(50, assert(q:getJob(job.id)).progress.pct)
        raises(function() job:updateProgress("half") end, "updateProgress")
      end)
    end)

    it("emits active, completed, failed and drained in order", function()
      local name = fresh("wevents")
      run(function()
        local q = queue(name)
        local a = assert(q:add("ok", {}))
        local b = assert(q:add("ko", {}))
        local w = worker(name, function(job)
          if job.name == "ko" then error("bad", 0) end
          return "fine"
        end)
        local t = track(w)
        t.cond.waitFor(function() return t.failed[b.id] and t.drained > 0 end, 5000, "failed + drained")
        w:close()
        assert.are.same({ "active:" .. a.id, "completed:" .. a.id, "active:" .. b.id, "failed:" .. b.id,
                          "drained" }, t.order)
        assert.are.equal("fine", t.completed[a.id].rv)
        assert.are.equal(a.id, t.completed[a.id].job.id)
        assert.are.equal("bad", t.failed[b.id].job.failedReason)
      end)
    end)

    it("a raising processor does not stop the worker (string, table and am2z errors)", function()
      local name = fresh("raises")
      run(function()
        local q = queue(name)
        local ids = {}
        for _, n in ipairs({ "str", "tbl", "am2z", "ok" }) do ids[n] = assert(q:add(n, {})).id end
        local w = worker(name, function(job)
          if job.name == "str" then error("plain string") end
          if job.name == "tbl" then error({ code = 42 }) end
          if job.name == "am2z" then error(errors.ValidationError("f", 1, "typed failure")) end
          return "still here"
        end)
        local t = track(w)
        t.waitFinished({ ids.str, ids.tbl, ids.am2z, ids.ok })
        w:close()
        assert.are.equal("still here", t.completed[ids.ok].rv)
        assert.matches("plain string", R:call("HGET", P(name) .. ids.str, "failedReason"))
        assert.matches("typed failure", R:call("HGET", P(name) .. ids.am2z, "failedReason"))
        local tr = R:call("HGET", P(name) .. ids.tbl, "failedReason")
        assert.is_string(tr)
        assert.is_true(#tr > 0)
        assert.are.equal(3, #zmembers(P(name) .. "failed"))
      end)
    end)

    it("a job whose data is not valid JSON fails with a clear failedReason; the next job runs", function()
      local name = fresh("badjson")
      run(function()
        local q = queue(name)
        local bad = assert(q:add("bad", { x = 1 }))
        R:call("HSET", P(name) .. bad.id, "data", "{not json")
        local good = assert(q:add("good", { x = 2 }))
        local seen = {}
        local w = worker(name, function(job)
          seen[#seen + 1] = job.name
          return job.data.x
        end)
        local t = track(w)
        t.waitFinished({ bad.id, good.id })
        w:close()
        assert.are.equal(2, t.completed[good.id] and t.completed[good.id].rv)
        assert.are.same({ "good" }, seen, "the processor must not run with undecodable data")
        assert.is_truthy(t.failed[bad.id], "the bad job must fail")
        local reason = R:call("HGET", P(name) .. bad.id, "failedReason") or ""
        assert.matches("JSON", reason)
        assert.are.equal("failed", q:getJobState(bad.id))
      end)
    end)
  end)

  -- ------------------------------------------------------- pause/resume
  describe("pause and resume", function()
    it("jobs added while paused stay waiting and are not taken; resume lets them run", function()
      local name = fresh("pause")
      run(function()
        local q = queue(name)
        assert.is_false(q:isPaused())
        q:pause()
        assert.is_true(q:isPaused())
        assert.are.equal("1", R:call("HGET", P(name) .. "meta", "paused"))
        assert.is_truthy(find_event(name, "paused"))
        local ran = 0
        local w = worker(name, function() ran = ran + 1 return "ran" end, { drainDelay = 0.05 })
        local t = track(w)
        t.cond.waitFor(function() return t.drained > 0 end, 3000, "the worker to find nothing")
        local job = assert(q:add("while-paused", {}))
        local prio = assert(q:add("prio", {}, { priority = 2 }))
        assert.is_false(exists(P(name) .. "marker"), "no marker while paused")
        -- Nothing to wait for: give the polling worker (drainDelay 50 ms) a
        -- bounded window in which it must not take the jobs.
        am2z.sleep(400)
        assert.are.equal(0, ran)
        assert.are.same({ job.id }, lrange(P(name) .. "wait"))
        assert.are.same({ prio.id }, zmembers(P(name) .. "prioritized"))
        assert.are.equal("waiting", q:getJobState(job.id))
        assert.are.same({ active = 0, completed = 0, delayed = 0, failed = 0, prioritized = 1, waiting = 1,
                          ["waiting-children"] = 0 }, q:getJobCounts())
        q:resume()
        assert.is_false(q:isPaused())
        assert.is_nil(R:call("HGET", P(name) .. "meta", "paused"))
        assert.is_truthy(find_event(name, "resumed"))
        t.waitFinished({ job.id, prio.id })
        w:close()
        assert.are.equal(2, ran)
      end)
    end)

    it("resume sets the marker when jobs wait", function()
      local name = fresh("resumemarker")
      run(function()
        local q = queue(name)
        q:pause()
        assert(q:add("a", {}))
        assert.is_false(exists(P(name) .. "marker"))
        q:resume()
        assert.are.same({ { "0", 0 } }, zrange(P(name) .. "marker"))
      end)
    end)
  end)

  -- -------------------------------------------------------------- locks
  describe("locks", function()
    it("a running job holds J:lock with the worker's token and PTTL <= lockDuration; released on completion", function()
      local name = fresh("lock")
      run(function()
        local q = queue(name)
        local job = assert(q:add("held", {}))
        local gate, open, inside = newCond(), false, false
        local w = worker(name, function()
          inside = true
          gate.notify()
          gate.waitFor(function() return open end, 5000, "the gate")
          return "ok"
        end, { lockDuration = 2000 })
        local t = track(w)
        gate.waitFor(function() return inside end, 5000, "the job to start")
        local lockKey = P(name) .. job.id .. ":lock"
        local token = R:call("GET", lockKey)
        assert.is_string(token)
        assert.is_truthy(w._active[job.id], "the worker tracks the running job")
        assert.are.equal(w._active[job.id].token, token)
        assert.matches("^" .. w._uuid .. ":%d+$", token)
        local pttl = R:call("PTTL", lockKey)
        assert.is_true(pttl > 0 and pttl <= 2000, "PTTL " .. tostring(pttl))
        assert.are.same({ job.id }, lrange(P(name) .. "active"))
        open = true
        gate.notify()
        t.waitFinished(job.id)
        w:close()
        assert.is_truthy(t.completed[job.id])
        assert.is_false(exists(lockKey))
        assert.are.same({}, lrange(P(name) .. "active"))
      end)
    end)

    it("the lock is renewed while a job runs longer than lockDuration (no stall)", function()
      local name = fresh("renew")
      run(function()
        local q = queue(name)
        local job = assert(q:add("long", {}))
        local pttlAtEnd
        local w = worker(name, function(j)
          am2z.sleep(2000) -- the job's work: 2.5x lockDuration
          pttlAtEnd = R:call("PTTL", P(name) .. j.id .. ":lock")
          return "ok"
        end, { lockDuration = 800, stalledInterval = 400 })
        local t = track(w)
        t.waitFinished(job.id, 8000)
        w:close()
        assert.is_truthy(t.completed[job.id], "completed")
        assert.is_true(pttlAtEnd > 0, "lock still held at the end, PTTL " .. tostring(pttlAtEnd))
        assert.are.equal(0, #t.stalled)
        assert.is_nil(R:call("HGET", P(name) .. job.id, "stc"))
        assert.is_nil(find_event(name, "stalled", job.id))
      end)
    end)
  end)

  -- ---------------------------------------------------- stalled (kill -9)
  describe("stalled jobs", function()
    local child_src = [[
local am2z = require("am2z")
local url, name, ready = arg[1], arg[2], arg[3]
local silent = am2z.createSilentLogger()
am2z.queue.Worker.new(name, function(job)
  local f = io.open(ready, "w")
  f:write("READY " .. job.id .. "\n")
  f:close()
  am2z.sleep(60000)
  return "child finished"
end, { connection = { url = url, logger = silent }, logger = silent,
       lockDuration = 1000, stalledInterval = 500 })
am2z.sleep(60000)
os.exit(0)
]]

    -- Starts a worker process on `name`, waits until it runs job `id`, kills it with -9.
    local function run_and_kill(name, id)
      local script = os.tmpname()
      local ready = os.tmpname()
      local pidfile = os.tmpname()
      local logfile = os.tmpname()
      os.remove(ready)
      local f = assert(io.open(script, "w"))
      f:write(child_src)
      f:close()
      assert(os.execute(("%s %s %s %s %s > %s 2>&1 & echo $! > %s"):format(AM2Z_LUA, script, URL, name, ready,
        logfile, pidfile)))
      local pf = assert(io.open(pidfile))
      local pid = tonumber(pf:read("*a"))
      pf:close()
      assert(pid, "no pid")
      local killed = false
      local function kill()
        if not killed then
          os.execute(("kill -9 %d 2>/dev/null"):format(pid))
          killed = true
        end
      end
      local ok, err = pcall(function()
        -- Another process: poll its READY file and Redis, bounded.
        local deadline = am2z.now() + 10000 * MULT
        local seen = false
        while am2z.now() < deadline do
          local rf = io.open(ready)
          local s = rf and rf:read("*a") or ""
          if rf then rf:close() end
          if s:find("READY " .. id, 1, true) and R:call("LPOS", P(name) .. "active", id) ~= nil
              and exists(P(name) .. id .. ":lock") then
            seen = true
            break
          end
          am2z.sleep(20)
        end
        if not seen then
          local lf = io.open(logfile)
          error("the child worker never ran job " .. id .. ": " .. (lf and lf:read("*a") or ""))
        end
      end)
      kill()
      -- wait (bounded) until the process is gone
      for _ = 1, 200 do
        local sf = io.open("/proc/" .. pid .. "/stat")
        local st = sf and sf:read("*a") or ""
        if sf then sf:close() end
        local state = st:match("%) (%a)")
        if state == nil or state == "Z" then break end -- gone (or a zombie)
        am2z.sleep(10)
      end
      for _, p in ipairs({ script, ready, pidfile, logfile }) do os.remove(p) end
      if not ok then error(err, 0) end
    end

    it("a job whose worker was killed -9 is recovered (stc 1, ats 2, stalled event) and completed", function()
      local name = fresh("stall")
      run(function()
        local q = queue(name)
        local job = assert(q:add("victim", { v = 7 }))
        run_and_kill(name, job.id)
        assert.are.equal("active", q:getJobState(job.id))
        local w = worker(name, function(j) return { recovered = j.data.v } end,
          { stalledInterval = 500, maxStalledCount = 1 })
        local t = track(w)
        t.waitFinished(job.id, 8000)
        w:close()
        assert.is_truthy(t.completed[job.id], "completed")
        assert.are.same({ recovered = 7 }, t.completed[job.id].rv)
        local h = hgetall(P(name) .. job.id)
        assert.are.equal("1", h.stc)
        assert.are.equal("2", h.ats)
        assert.are.equal("1", h.atm)
        assert.is_nil(h.defa)
        assert.is_truthy(find_event(name, "stalled", job.id))
        local back = false
        for _, e in ipairs(events(name, job.id)) do
          if e.event == "waiting" and e.prev == "active" then back = true end
        end
        assert.is_true(back, "waiting prev=active")
        assert.are.same({ job.id }, t.stalled)
        assert.are.same({ job.id }, zmembers(P(name) .. "completed"))
      end, 20000)
    end)

    it("with maxStalledCount = 0 the recovered job is failed unprocessed", function()
      local name = fresh("stall0")
      run(function()
        local q = queue(name)
        local job = assert(q:add("victim", {}))
        run_and_kill(name, job.id)
        local calls = 0
        local w = worker(name, function() calls = calls + 1 return "no" end,
          { stalledInterval = 500, maxStalledCount = 0 })
        local t = track(w)
        t.waitFinished(job.id, 8000)
        w:close()
        assert.are.equal(0, calls, "the processor must not run")
        assert.is_truthy(t.failed[job.id], "failed")
        local h = hgetall(P(name) .. job.id)
        assert.are.equal("job stalled more than allowable limit", h.failedReason)
        assert.are.equal("1", h.stc)
        assert.are.equal("2", h.ats)
        assert.is_nil(h.defa, "defa is removed by the finish")
        assert.are.same({ job.id }, zmembers(P(name) .. "failed"))
        assert.is_truthy(find_event(name, "stalled", job.id))
        assert.are.equal("job stalled more than allowable limit", find_event(name, "failed", job.id).failedReason)
        assert.is_truthy(find_event(name, "retries-exhausted", job.id))
      end, 20000)
    end)
  end)

  -- ------------------------------------------------------------- events
  describe("QueueEvents", function()
    it("delivers the stream's events with parsed fields, also as <event>:<jobId>", function()
      local name = fresh("qe")
      run(function()
        local q = queue(name)
        local ev = queueEvents(name)
        ev:waitUntilReady()
        local got, perJob = {}, {}
        local c = newCond()
        for _, e in ipairs({ "added", "waiting", "active", "completed" }) do
          ev:on(e, function(f, entryId) got[#got + 1] = { e, f, entryId } c.notify() end)
        end
        local job = assert(q:add("x", { v = 1 }))
        ev:on("completed:" .. job.id, function(f) perJob[#perJob + 1] = f c.notify() end)
        local w = worker(name, function() return { ok = true } end)
        c.waitFor(function() return #perJob > 0 end, 5000, "completed:<id>")
        w:close()
        local names = {}
        for _, g in ipairs(got) do names[#names + 1] = g[1] end
        assert.are.same({ "added", "waiting", "active", "completed" }, names)
        assert.are.equal(job.id, got[1][2].jobId)
        assert.are.equal("x", got[1][2].name)
        assert.is_string(got[1][3])
        assert.are.same({ ok = true }, got[4][2].returnvalue)
        assert.are.same({ ok = true }, perJob[1].returnvalue)
      end)
    end)

    it("waitUntilFinished: return value, failure reason, already finished job, timeout", function()
      local name = fresh("wuf")
      run(function()
        local q = queue(name)
        local ev = queueEvents(name)
        local a = assert(q:add("ok", { v = 3 }))
        local b = assert(q:add("ko", {}))
        local w = worker(name, function(job)
          if job.name == "ko" then error("went wrong", 0) end
          return job.data.v * 10
        end)
        assert.are.equal(30, a:waitUntilFinished(ev, 5000))
        local rv, err = b:waitUntilFinished(ev, 5000)
        assert.is_nil(rv)
        assert.matches("went wrong", err.message)
        -- already finished: answered from the job itself
        assert.are.equal(30, a:waitUntilFinished(ev, 1000))
        -- never finishes
        w:close()
        local c = assert(q:add("stuck", {}))
        local t0 = am2z.now()
        local rv2, err2 = c:waitUntilFinished(ev, 200)
        assert.is_nil(rv2)
        assert.is_true(errors.is(err2, errors.TimeoutError), tostring(err2))
        assert.is_true(am2z.now() - t0 >= 190)
      end)
    end)

    it("waitUntilFinished on a job removed after completion fails at once (BullMQ: Missing key)", function()
      local name = fresh("wufgone")
      run(function()
        local q = queue(name)
        local ev = queueEvents(name)
        -- The waiter must come after the events reader has passed the
        -- completion (a waiter already listening when it arrives gets the
        -- value, as in BullMQ): wait until the reader has delivered it.
        local seen, cond = false, newCond()
        ev:on("completed", function() seen = true cond.notify() end)
        ev:waitUntilReady()
        local job = assert(q:add("gone", {}, { removeOnComplete = true }))
        local w = worker(name, function() return 1 end)
        cond.waitFor(function() return seen end, 5000, "the completed event")
        w:close()
        local t0 = am2z.now()
        local rv, err = job:waitUntilFinished(ev, 1500)
        assert.is_nil(rv)
        assert.is_truthy(err)
        assert.is_false(errors.is(err, errors.TimeoutError), "should not wait for the ttl: " .. tostring(err))
        assert.matches("Missing key", err.message)
        assert.is_true(am2z.now() - t0 < 1000)
      end)
    end)

    it("two waiters on the same job both get the result", function()
      local name = fresh("twowaiters")
      run(function()
        local q = queue(name)
        local ev = queueEvents(name)
        ev:waitUntilReady()
        local job = assert(q:add("x", {}))
        local results = {}
        local c = newCond()
        -- Instrument the queue handle QueueEvents uses for its one look at
        -- the job, to know when the first waiter has looked and is waiting.
        local looks = 0
        local qh = queue(name)
        qh._isFinished = function(self, id)
          local st, v = Queue._isFinished(self, id)
          looks = looks + 1
          c.notify()
          return st, v
        end
        ev._queue = qh
        core.spawn(function()
          local rv, err = job:waitUntilFinished(ev, 2000)
          results.first = { rv = rv, err = err }
          c.notify()
          return true
        end, "root", 0, 0, 1)
        c.waitFor(function() return looks >= 1 end, 3000, "the first waiter to look")
        -- The job finishes; the second waiter looks before QueueEvents has
        -- delivered the `completed` entry (written here in the same order a
        -- finish does: state first, then the event).
        R:call("LREM", P(name) .. "wait", 0, job.id)
        R:call("HSET", P(name) .. job.id, "returnvalue", "\"R\"", "finishedOn", 1, "atm", 1)
        R:call("ZADD", P(name) .. "completed", 1, job.id)
        local rv2 = job:waitUntilFinished(ev, 2000)
        results.second = { rv = rv2 }
        R:call("XADD", P(name) .. "events", "*", "event", "completed", "jobId", job.id, "returnvalue", "\"R\"",
          "prev", "active")
        c.waitFor(function() return results.first end, 3000, "the first waiter")
        assert.are.equal("R", results.second.rv)
        assert.is_nil(results.first.err, "first waiter: " .. tostring(results.first.err))
        assert.are.equal("R", results.first.rv)
      end)
    end)
  end)

  -- --------------------------------------------------------------- close
  describe("Worker:close", function()
    it("is graceful: the running job finishes before close returns; no new job is taken after", function()
      local name = fresh("close")
      run(function()
        local q = queue(name)
        local a = assert(q:add("first", {}))
        local gate, open, inside = newCond(), false, false
        local ran = {}
        local w = worker(name, function(job)
          ran[#ran + 1] = job.name
          if job.name == "first" then
            inside = true
            gate.notify()
            gate.waitFor(function() return open end, 5000, "the gate")
            am2z.sleep(50) -- still working when released
          end
          return job.name
        end, { concurrency = 2 })
        local t = track(w)
        local closedEvent = false
        w:on("closed", function() closedEvent = true end)
        gate.waitFor(function() return inside end, 5000, "first to start")
        local closeStarted, closeReturned = false, false
        local stateAtClose
        core.spawn(function()
          closeStarted = true -- w:close() marks the worker closing before its first wait
          gate.notify()
          w:close()
          stateAtClose = q:getJobState(a.id)
          closeReturned = true
          gate.notify()
          return true
        end, "root", 0, 0, 1)
        gate.waitFor(function() return closeStarted end, 5000, "close to start")
        -- added while closing, with a free slot: must not be taken
        local b = assert(q:add("second", {}))
        assert.is_false(closeReturned, "close must wait for the running job")
        open = true
        gate.notify()
        gate.waitFor(function() return closeReturned end, 5000, "close to return")
        assert.are.equal("completed", stateAtClose)
        assert.is_truthy(t.completed[a.id])
        assert.is_true(closedEvent)
        assert.are.same({ "first" }, ran)
        assert.are.equal("waiting", q:getJobState(b.id))
        assert.are.same({ b.id }, lrange(P(name) .. "wait"))
        w:close() -- twice is a no-op
      end)
    end)
  end)

  describe("Worker:close with every slot busy", function()
    it("returns once the running job has finished (concurrency 1)", function()
      local name = fresh("closebusy")
      run(function()
        local q = queue(name)
        local a = assert(q:add("running", {}))
        local b = assert(q:add("next", {}))
        local gate, open, inside = newCond(), false, false
        local ran = {}
        local w = worker(name, function(job)
          ran[#ran + 1] = job.name
          inside = true
          gate.notify()
          gate.waitFor(function() return open end, 5000, "the gate")
          return job.name
        end, { concurrency = 1 })
        local t = track(w)
        gate.waitFor(function() return inside end, 5000, "the first job to start")
        local closeStarted, closeReturned = false, false
        core.spawn(function()
          closeStarted = true
          gate.notify()
          w:close()
          closeReturned = true
          gate.notify()
          return true
        end, "root", 0, 0, 1)
        gate.waitFor(function() return closeStarted end, 5000, "close to start")
        open = true
        gate.notify()
        t.waitFinished(a.id)
        gate.waitFor(function() return closeReturned end, 2000, "close to return after the job finished")
        assert.are.same({ "running" }, ran)
        assert.are.equal("waiting", q:getJobState(b.id))
      end)
    end)
  end)

  -- -------------------------------------------------------- constructors
  describe("constructors", function()
    it("Queue.new rejects bad arguments naming the function and the argument", function()
      raises(function() Queue.new() end, "Queue.new", "queue name")
      raises(function() Queue.new("") end, "Queue.new", "queue name")
      raises(function() Queue.new("a:b") end, "Queue.new", "queue name")
      raises(function() Queue.new(42) end, "Queue.new", "queue name")
      raises(function() Queue.new("q", "opts") end, "Queue.new", "options")
      raises(function() Queue.new("q", { prefix = "" }) end, "Queue.new", "prefix")
      raises(function() Queue.new("q", { prefix = 5 }) end, "Queue.new", "prefix")
    end)

    it("Worker.new rejects bad arguments naming the function and the argument", function()
      local fn = function() end
      raises(function() Worker.new(nil, fn) end, "Worker.new", "queue name")
      raises(function() Worker.new("a:b", fn) end, "Worker.new", "queue name")
      raises(function() Worker.new("q") end, "Worker.new", "processor")
      raises(function() Worker.new("q", "notfn") end, "Worker.new", "processor")
      raises(function() Worker.new("q", fn, 5) end, "Worker.new", "options")
      raises(function() Worker.new("q", fn, { concurrency = 0 }) end, "Worker.new", "concurrency")
      raises(function() Worker.new("q", fn, { concurrency = 1.5 }) end, "Worker.new", "concurrency")
      raises(function() Worker.new("q", fn, { lockDuration = -1 }) end, "Worker.new", "lockDuration")
      raises(function() Worker.new("q", fn, { stalledInterval = "x" }) end, "Worker.new", "stalledInterval")
      raises(function() Worker.new("q", fn, { drainDelay = 0 }) end, "Worker.new", "drainDelay")
      raises(function() Worker.new("q", fn, { limiter = { max = 1 } }) end, "Worker.new", "limiter")
      raises(function() Worker.new("q", fn, { removeOnComplete = "x" }) end, "Worker.new", "removeOnComplete")
      raises(function() Worker.new("q", fn, { bogus = 1 }) end, "Worker.new", "unknown option", "bogus")
    end)

    it("QueueEvents.new rejects bad arguments naming the function and the argument", function()
      raises(function() QueueEvents.new() end, "QueueEvents.new", "queue name")
      raises(function() QueueEvents.new("a:b") end, "QueueEvents.new", "queue name")
      raises(function() QueueEvents.new("q", 5) end, "QueueEvents.new", "options")
      raises(function() QueueEvents.new("q", { prefix = "", autorun = false }) end, "QueueEvents.new", "prefix")
    end)
  end)
end)
