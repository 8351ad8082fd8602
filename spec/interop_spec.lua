-- BullMQ interop: jobs cross between am2z-lua and the real `bullmq` npm
-- package (pinned in spec/interop/package.json) in both directions, over a
-- real redis-server. Node processes are started for real.
local am2z = require("am2z")
local cjson = require("cjson")
local errors = am2z.errors

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local DIR = "spec/interop"
local have_node = os.execute("command -v node > /dev/null 2>&1") == 0
  and io.open(DIR .. "/node_modules/bullmq/package.json") ~= nil

local function run(fn) return am2z.run(fn, { timeoutMs = 20000 * (tonumber(os.getenv("AM2Z_TEST_TIMEOUT_MULT")) or 1) }) end
local silent = am2z.createSilentLogger()

local function node(script, ...)
  local args = { ... }
  for i, a in ipairs(args) do args[i] = "'" .. tostring(a) .. "'" end
  local p = io.popen(("cd %s && timeout 30 node %s %s 2>/tmp/am2z-interop-node.err; echo \"EXIT:$?\"")
    :format(DIR, script, table.concat(args, " ")))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("EXIT:(%d+)%s*$"))
  out = out:gsub("EXIT:%d+%s*$", "")
  assert(code == 0, script .. " exited " .. tostring(code) .. ": " .. out)
  return cjson.decode(out)
end

-- Starts a node script in the background; returns a function that waits for
-- its JSON output.
local function node_bg(script, ...)
  local args = { ... }
  for i, a in ipairs(args) do args[i] = "'" .. tostring(a) .. "'" end
  local out = os.tmpname()
  os.execute(("cd %s && (timeout 30 node %s %s > %s 2>/tmp/am2z-interop-node-bg.err; echo \"EXIT:$?\" >> %s) &")
    :format(DIR, script, table.concat(args, " "), out, out))
  return function()
    for _ = 1, 3000 do
      local f = io.open(out)
      local s = f and f:read("*a") or ""
      if f then f:close() end
      local code = s:match("EXIT:(%d+)")
      if code then
        os.remove(out)
        assert(code == "0", script .. " exited " .. code .. ": " .. s)
        return cjson.decode((s:gsub("EXIT:%d+%s*$", "")))
      end
      am2z.sleep(10)   -- a child process, no event to wait on: poll its output, bounded
    end
    error(script .. " did not finish")
  end
end

local queue_seq = 0
local function fresh_queue()
  queue_seq = queue_seq + 1
  return ("interop-%d-%d"):format(os.time(), queue_seq)
end

describe("BullMQ interop #redis #interop", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end
  if not have_node then
    pending("node or spec/interop/node_modules missing (scripts/test.sh installs them)")
    return
  end
  local conn = { url = URL, logger = silent }

  it("jobs added by a Node BullMQ producer are processed by an am2z-lua Worker", function()
    local name = fresh_queue()
    local ids = node("producer.js", URL, name)
    local finished, failed = {}, {}
    run(function()
      local n = 0
      local w = am2z.queue.Worker.new(name, function(job)
        job:updateProgress(50)
        job:log("lua saw " .. job.name)
        if job.name == "fail" then error("lua says no (attempt " .. job.attemptsMade + 1 .. ")") end
        return { doubled = job.data.x * 2, by = "lua" }
      end, { connection = conn, concurrency = 3, logger = silent })
      local token = require("am2z.executor").newToken()
      local me = require("am2z.core").current()
      local function bump()
        n = n + 1
        if n == 5 then require("am2z.core").complete_host(me, token) end
      end
      w:on("completed", function(job, rv) finished[job.id] = rv; bump() end)
      w:on("failed", function(job, err, retrying) if not retrying then failed[job.id] = err; bump() end end)
      require("am2z.core").wait_host(token)
      w:close()
    end)
    assert.are.same({ doubled = 42, by = "lua" }, finished[ids.standard])
    assert.are.same({ doubled = 10, by = "lua" }, finished[ids.delayed])
    assert.are.same({ doubled = 14, by = "lua" }, finished[ids.prioritized])
    assert.are.same({ doubled = 2, by = "lua" }, finished[ids.custom])
    assert.matches("lua says no %(attempt 3%)", failed[ids.failing].message)
    -- and BullMQ reads back exactly what it expects
    local seen = node("inspect.js", URL, name, ids.standard, ids.failing, ids.delayed)
    assert.are.same({ active = 0, completed = 4, delayed = 0, failed = 1, prioritized = 0,
                      waiting = 0, ["waiting-children"] = 0 }, seen.counts)
    local std = seen.jobs[ids.standard]
    assert.are.equal("completed", std.state)
    assert.are.same({ doubled = 42, by = "lua" }, std.returnvalue)
    assert.are.equal(1, std.attemptsMade)
    assert.are.equal(50, std.progress)
    assert.are.same({ "lua saw double" }, std.logs)
    local bad = seen.jobs[ids.failing]
    assert.are.equal("failed", bad.state)
    assert.are.equal(3, bad.attemptsMade)
    assert.matches("lua says no", bad.failedReason)
  end)

  it("jobs added by am2z-lua are processed by a Node BullMQ Worker", function()
    local name = fresh_queue()
    local jobs
    local wait_worker = node_bg("worker.js", URL, name, 4)
    run(function()
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      jobs = assert(q:addBulk({
        { name = "double", data = { x = 3 } },
        { name = "double", data = { x = 4 }, opts = { priority = 2 } },
        { name = "double", data = { x = 5 }, opts = { delay = 200, jobId = "lua-custom" } },
        { name = "fail", data = {}, opts = { attempts = 2, backoff = 20 } },
      }))
      local seen = wait_worker()
      local by_id = {}
      for _, s in ipairs(seen) do by_id[s.id] = s end
      assert.are.same({ doubled = 6, by = "node" }, by_id[jobs[1].id].returnvalue)
      assert.are.same({ doubled = 8, by = "node" }, by_id[jobs[2].id].returnvalue)
      assert.are.same({ doubled = 10, by = "node" }, by_id["lua-custom"].returnvalue)
      assert.are.equal("node says no", by_id[jobs[4].id].failedReason)
      -- read back with our own Queue
      local j = q:getJob(jobs[1].id)
      assert.are.equal("completed", j:getState())
      assert.are.same({ doubled = 6, by = "node" }, j.returnvalue)
      local f = q:getJob(jobs[4].id)
      assert.are.equal(2, f.attemptsMade)
      assert.are.equal("node says no", f.failedReason)
      q:close()
    end)
  end)

  it("a Node QueueEvents sees am2z-lua's events and waitUntilFinished resolves", function()
    local name = fresh_queue()
    run(function()
      local w = am2z.queue.Worker.new(name, function(job)
        return { doubled = job.data.x * 2, by = "lua" }
      end, { connection = conn, logger = silent })
      local wait_node = node_bg("wait.js", URL, name, 8)
      local r = wait_node()
      assert.is_true(r.ok, r.error)
      assert.are.same({ doubled = 16, by = "lua" }, r.returnvalue)
      w:close()
    end)
  end)

  it("am2z-lua's QueueEvents and waitUntilFinished see a Node worker's results", function()
    local name = fresh_queue()
    local wait_worker = node_bg("worker.js", URL, name, 1)
    run(function()
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local ev = am2z.queue.QueueEvents.new(name, { connection = conn, logger = silent })
      ev:waitUntilReady()
      local events = {}
      ev:on("completed", function(f) events[#events + 1] = f end)
      local job = assert(q:add("double", { x = 50 }))
      local rv, err = job:waitUntilFinished(ev, 10000)
      assert.is_nil(err)
      assert.are.same({ doubled = 100, by = "node" }, rv)
      wait_worker()
      assert.are.equal(job.id, events[1].jobId)
      ev:close()
      q:close()
    end)
  end)

  it("Bull Board's BullMQ adapter reports the counts, job details and workers of queues am2z-lua wrote", function()
    local name = fresh_queue()
    run(function()
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local ev = am2z.queue.QueueEvents.new(name, { connection = conn, logger = silent })
      ev:waitUntilReady()
      local ok_job = assert(q:add("double", { x = 2 }))
      local bad_job = assert(q:add("fail", { x = 0 }, { attempts = 2 }))
      local w = am2z.queue.Worker.new(name, function(job)
        job:updateProgress(75)
        if job.name == "fail" then error("board sees this") end
        return { doubled = job.data.x * 2 }
      end, { connection = conn, logger = silent, name = "lua-w1" })
      assert.are.same({ doubled = 4 }, ok_job:waitUntilFinished(ev, 10000))
      local _, err = bad_job:waitUntilFinished(ev, 10000)
      assert.matches("board sees this", err.message)
      local later = assert(q:add("double", { x = 9 }, { delay = 60000 }))
      local board = node("board.js", URL, name)
      assert.are.same({ active = 0, completed = 1, delayed = 1, failed = 1, prioritized = 0,
                        waiting = 0, ["waiting-children"] = 0 }, board.counts)
      assert.is_false(board.isPaused)
      local by_id = {}
      for _, j in ipairs(board.jobs) do by_id[j.id] = j end
      local okj = by_id[ok_job.id]
      assert.are.same({ doubled = 4 }, okj.returnValue)
      assert.are.same({ x = 2 }, okj.data)
      assert.are.equal("double", okj.name)
      assert.are.equal(75, okj.progress)
      assert.are.equal(1, okj.attempts)
      assert.are.equal("lua-w1", okj.processedBy)
      assert.is_number(okj.finishedOn)
      local badj = by_id[bad_job.id]
      assert.is_true(badj.isFailed)
      assert.matches("board sees this", badj.failedReason)
      assert.are.equal(2, badj.attempts)
      assert.are.equal(2, #badj.stacktrace)
      assert.are.equal(60000, by_id[later.id].delay)
      -- the worker shows up in Bull Board's worker list while it runs
      local found = false
      for _, wn in ipairs(board.workers) do
        if wn:find(":w:lua-w1", 1, true) then found = true end
      end
      assert.is_true(found, "workers: " .. cjson.encode(board.workers))
      q:pause()
      assert.is_true(node("board.js", URL, name).isPaused)
      w:close()
      ev:close()
      q:close()
    end)
  end)

  -- QueueRuntime's queues are ordinary BullMQ queues: Node's Queue and Bull
  -- Board read an am2z execution's job (data, return value) and a failure.
  describe("QueueRuntime jobs seen from Node", function()
    it("BullMQ's Queue reads an execution's job: data, return value, failedReason", function()
      if not (have_node and URL) then pending("needs node + bullmq and the suite's redis") return end
      local prefix = "irt" .. os.time() .. math.random(1000, 9999)
      local rt = am2z.QueueRuntime.new{ redis = { url = URL, logger = silent }, queuePrefix = prefix,
        logger = silent }
      rt:register(am2z.createProcessor("greet"):process(function(s)
        if s.fail then return am2z.Failure(errors.BusinessError("NOPE", "refused")) end
        s.greeting = "hi " .. s.who
        return am2z.Success(s)
      end))
      local ok_r, bad_r
      run(function()
        rt:start()
        ok_r = rt:execute("greet", { who = "node" })
        bad_r = rt:execute("greet", { who = "x", fail = true })
        rt:stop()
      end)
      local seen = node("inspect.js", URL, prefix .. "_greet", ok_r.metadata.executionId,
        bad_r.metadata.executionId)
      assert.are.equal(1, seen.counts.completed)
      assert.are.equal(1, seen.counts.failed)
      local okj = seen.jobs[ok_r.metadata.executionId]
      assert.are.equal("greet", okj.name)
      assert.are.equal("completed", okj.state)
      assert.are.equal("greet", okj.data.processorName)
      assert.are.equal(ok_r.metadata.executionId, okj.data.executionId)
      assert.is_true(okj.returnvalue.success)
      assert.are.equal("hi node", okj.returnvalue.state.greeting)
      local badj = seen.jobs[bad_r.metadata.executionId]
      assert.are.equal("failed", badj.state)
      assert.are.equal("refused", badj.failedReason)
    end)
  end)
end)
