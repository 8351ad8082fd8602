-- Job locks survive a processor that keeps the loop thread busy: they are
-- renewed by the core's lock-keeper thread, so another worker's stall check
-- does not steal the job.
local am2z = require("am2z")
local core = require("am2z.core")

local URL = os.getenv("AM2Z_TEST_REDIS_URL")
local BIN = os.getenv("AM2Z_BIN") or "./build/bin/am2z-lua"
local silent = am2z.createSilentLogger()

describe("job locks #redis", function()
  if not URL then
    pending("AM2Z_TEST_REDIS_URL is not set (run through scripts/test.sh)")
    return
  end

  -- valgrind runs one thread at a time: the keeper thread cannot run while
  -- the processor spins, which is the very thing this test is about.
  local slow = (tonumber(os.getenv("AM2Z_TEST_TIMEOUT_MULT")) or 1) > 5
  local it_or_pending = slow and pending or it
  it_or_pending("are renewed while the processor runs 1.5 s without yielding (lockDuration 400)", function()
    local name = ("locks-%d-%d"):format(os.time(), math.random(1e6))
    local conn = { url = URL, logger = silent }
    -- A second worker process on the same queue runs stall checks every
    -- 150 ms and writes down any job it gets.
    local dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p " .. dir)
    local script = dir .. "/other.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
local am2z = require("am2z")
local c = assert(am2z.redis.connect{ url = %q, logger = am2z.createSilentLogger() })
local o = io.open(%q, "w") o:write("up") o:close()
-- start working only once the busy worker holds the job (its lock exists)
for _ = 1, 1000 do
  if c:call("EXISTS", %q) == 1 then break end
  am2z.sleep(5)
end
local w = am2z.queue.Worker.new(%q, function(job)
  local o = io.open(%q, "a") o:write(job.id, "\n") o:close()
  return "stolen"
end, { connection = { url = %q, logger = am2z.createSilentLogger() }, stalledInterval = 150,
       lockDuration = 400, logger = am2z.createSilentLogger() })
am2z.sleep(4000)
w:close()
]]):format(URL, dir .. "/ready", "bull:" .. name .. ":busy-job:lock", name, dir .. "/stolen", URL))
    f:close()
    os.execute(("%s %s > %s/log 2>&1 & echo $! > %s/pid"):format(BIN, script, dir, dir))
    finally(function()
      os.execute(("kill -9 $(cat %s/pid) 2>/dev/null; rm -rf %s"):format(dir, dir))
    end)
    am2z.run(function()
      -- another process: its file is the only thing to wait on (bounded)
      for _ = 1, 500 do
        if io.open(dir .. "/ready") then break end
        am2z.sleep(10)
      end
      local q = am2z.queue.Queue.new(name, { connection = conn, logger = silent })
      local ev = am2z.queue.QueueEvents.new(name, { connection = conn, logger = silent })
      ev:waitUntilReady()
      local job = assert(q:add("busy", {}, { jobId = "busy-job" }))
      local busy = am2z.queue.Worker.new(name, function()
        -- wall-clock time (CPU time stretches on a loaded machine)
        local t0 = core.wall_ms()
        local x = 0
        while core.wall_ms() - t0 < 1500 do x = x + 1 end   -- no yield on purpose
        return "kept"
      end, { connection = conn, lockDuration = 400, stalledInterval = 150, logger = silent })
      -- The other process starts its worker only once ours holds the job,
      -- then checks for stalls every 150 ms while ours keeps the loop busy.
      -- Closed whatever happens: a worker left running would fail the
      -- engine-idle checks of every later spec.
      local ok, rv, err = pcall(job.waitUntilFinished, job, ev, 10000)
      local j = ok and q:getJob(job.id)
      busy:close()
      ev:close()
      q:close()
      assert(ok, rv)
      assert.is_nil(err)
      assert.are.equal("kept", rv)
      assert.are.equal(0, j.stalledCounter)
      assert.are.equal(1, j.attemptsStarted)
      assert.is_nil(io.open(dir .. "/stolen"), "the other worker recovered and ran the job")
    end, { timeoutMs = 20000 })
  end)
end)
