-- The runtime the shared runtime specs run against. The same spec files run
-- twice in scripts/test.sh: with LocalRuntime, and with AM2Z_TEST_RUNTIME=queue
-- against QueueRuntime on the suite's throwaway redis-server (issue: "the
-- whole LocalRuntime spec suite runs a second time against QueueRuntime,
-- unchanged apart from the factory"). Each QueueRuntime gets queues of its
-- own (a fresh queuePrefix), so no test sees another one's jobs.
local am2z = require("am2z")

local M = {}
M.kind = os.getenv("AM2Z_TEST_RUNTIME") == "queue" and "queue" or "local"
M.name = M.kind == "queue" and "QueueRuntime" or "LocalRuntime"

local seq = 0
local tag = ("%x%04x"):format(os.time(), math.random(0, 0xffff))

--- A runtime with LocalRuntime.new's options.
function M.new(opts)
  if M.kind == "local" then return am2z.LocalRuntime.new(opts) end
  opts = opts or {}
  seq = seq + 1
  return am2z.QueueRuntime.new{
    redis = { url = assert(os.getenv("AM2Z_TEST_REDIS_URL"), "AM2Z_TEST_REDIS_URL is not set") },
    queuePrefix = "t" .. tag .. "x" .. seq,
    runtime = { maxCallDepth = opts.maxCallDepth, defaultTimeout = opts.defaultTimeout },
    logger = opts.logger, stateManager = opts.stateManager, monitoring = opts.monitoring,
  }
end

return M
