-- Redis drops the worker's connections mid-run (CLIENT KILL): the worker
-- reconnects and goes on; no job is lost and none is completed twice.
local am2z = require("am2z")
local core = require("am2z.core")

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local silent = am2z.createSilentLogger()

describe("worker and lost connections #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end

  it("reconnects after its connections are killed and completes every job exactly once", function()
    local name = ("reconnect-%d-%d"):format(os.time(), math.random(1e6))
    local conn = { url = URL, logger = silent, reconnectMax = 100 }
    local N = 120
    am2z.run(function()
      local admin = assert(am2z.redis.connect{ url = URL, logger = silent })
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local list = {}
      for i = 1, N do list[i] = { name = "n", data = { i = i } } end
      assert(q:addBulk(list))
      local done, times, me, token = 0, {}, (core.current()), require("am2z.executor").newToken()
      local killed = false
      local w = am2z.queue.Worker.new(name, function(job)
        am2z.sleep(2)
        return job.data.i
      end, { connection = conn, concurrency = 4, logger = silent,
             -- a fetch whose reply is lost leaves its job active and locked
             -- until a stall check recovers it: keep that short here
             lockDuration = 1000, stalledInterval = 500 })
      w:on("completed", function(job)
        times[job.id] = (times[job.id] or 0) + 1
        done = done + 1
        if done == N / 3 and not killed then
          killed = true
          -- every client but this one: the worker's command, blocking and
          -- lock-keeper connections all drop at once
          core.spawn(function()
            admin:call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            return true
          end, "root", 0, 0, 1)
        end
        if done == N then core.complete_host(me, token) end
      end)
      local timer = core.spawn(function()
        if core.sleep(20000) then core.complete_host(me, token) end
        return true
      end, "root", 0, 0, 1)
      core.wait_host(token)
      core.cancel(timer)
      assert.is_true(killed)
      assert.are.equal(N, done, "completed " .. done .. " of " .. N)
      for id, n in pairs(times) do assert.are.equal(1, n, "job " .. id .. " completed " .. n .. " times") end
      local counts = q:getJobCounts()
      assert.are.equal(N, counts.completed)
      assert.are.equal(0, counts.active)
      assert.are.equal(0, counts.waiting)
      w:close()
      q:close()
      admin:close()
    end, { timeoutMs = 30000 })
  end)
end)
