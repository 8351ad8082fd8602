--[[
Specs for examples/: each example is run with the am2z-lua program (as a
user would), and its exit status and key stdout lines are checked. Timing
numbers are not checked, except that each example stays fast. The engine's
logs must go to stderr, never to stdout.
]]

local BIN = os.getenv("AM2Z_BIN") or "./build/bin/am2z-lua"
local MULT = (TEST_TIMEOUT_MS or 5000) / 5000
local now = require("am2z.core").now

-- Runs an example under `timeout`, with a clean am2z environment unless
-- `env` adds to it; returns { out, err, code, ms }.
local function run(example, args, env)
  local errf = os.tmpname()
  local cmd = ("env -u AM2Z_REDIS_URL -u AM2Z_LOG_LEVEL -u AM2Z_LOG_FORMAT %s timeout 10 %s examples/%s.lua %s 2>%s; echo \"EXIT:$?\"")
    :format(env or "", BIN, example, args or "", errf)
  local t0 = now()
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("*a")
  p:close()
  local ms = now() - t0
  local f = assert(io.open(errf, "r"))
  local err = f:read("*a")
  f:close()
  os.remove(errf)
  local code = tonumber(out:match("EXIT:(%d+)%s*$"))
  out = out:gsub("EXIT:%d+%s*$", "")
  return { out = out, err = err, code = code, ms = ms }
end

-- One plain run per example, shared by the tests that only read its output.
local cache = {}
local function example(name)
  if not cache[name] then cache[name] = run(name) end
  return cache[name]
end

local function has(text, needle)
  assert(text:find(needle, 1, true), ("expected output to contain:\n  %s\ngot:\n%s"):format(needle, text))
end

local function succeeded(r)
  assert(r.code == 0, ("expected exit status 0, got %s\nstdout:\n%s\nstderr:\n%s")
    :format(tostring(r.code), r.out, r.err))
end

local EXAMPLES = { "quickstart", "image_pipeline", "dynamic_registration", "batch_transactions",
                   "content_router" }

describe("examples/quickstart.lua", function()
  it("processes ORD-001 through the chain", function()
    local r = example("quickstart")
    succeeded(r)
    has(r.out, "Order ORD-001 processed successfully!")
    has(r.out, "Total: $75.48")
    has(r.out, "Notifications: Order validated, Payment processed successfully, Inventory reserved")
  end)

  it("retries the payment once and reports the attempt that succeeded", function()
    local r = example("quickstart")
    succeeded(r)
    has(r.out, "Retrying process-payment after failed attempt 1")
    has(r.out, "Payment attempts: 2")
  end)

  it("fails an order with no items at validation, with a clear message", function()
    local r = example("quickstart")
    succeeded(r)
    has(r.out, "Order ORD-002 failed at validate-order: Order must contain at least one item")
  end)

  it("logs to stderr, with the processor as source, and keeps stdout clean", function()
    local r = example("quickstart")
    has(r.err, "[process-payment] Processing payment for order ORD-001 (attempt 2)")
    assert.is_nil(r.out:find("INFO", 1, true))
  end)
end)

describe("examples/image_pipeline.lua", function()
  it("runs thumbnails, then the three image operations in parallel, merged", function()
    local r = example("image_pipeline")
    succeeded(r)
    assert.truthy(r.out:match("Image processed in %d+ms"))
    has(r.out, "Generated 3 thumbnails")
    has(r.out, "Processing steps: Thumbnails generated -> Watermark applied -> "
      .. "Compression optimized -> Metadata extracted")
    has(r.out, "Watermark: true, compression: 85, format: JPEG")
  end)

  it("counts one state version per plain processor step", function()
    local r = example("image_pipeline")
    succeeded(r)
    has(r.out, "State version: 5")
  end)
end)

describe("examples/dynamic_registration.lua", function()
  it("registers tenant features after start", function()
    local r = example("dynamic_registration")
    succeeded(r)
    has(r.out, "Core processors: basic-analytics, send-email")
    has(r.out, "advanced-analytics registered before enabling: false")
    has(r.out, "Enabled features for tenant tenant-premium: advanced-analytics, sms-notifications")
    has(r.out, "Enabled features for tenant tenant-enterprise: advanced-analytics, webhook-integration")
    has(r.out, "Registered processors: advanced-analytics, basic-analytics, send-email, send-sms, "
      .. "webhook-notifications")
  end)

  it("runs the dynamically registered processors and skips unavailable ones", function()
    local r = example("dynamic_registration")
    succeeded(r)
    has(r.out, "tenant-premium advanced-analytics: Generated insights")
    has(r.out, "tenant-premium sms: sent")
    has(r.out, "tenant-enterprise webhook: sent, email: sent")
    has(r.out, "tenant-premium: priority-support is not available, skipped")
    has(r.out, "User actions analysed: 2")
  end)

  it("returns a ProcessorNotFoundError result for a never-registered processor", function()
    local r = example("dynamic_registration")
    succeeded(r)
    has(r.out, "fraud-detection: ProcessorNotFoundError (PROCESSOR_NOT_FOUND)")
    has(r.out, "Processor 'fraud-detection' not found. Available processors: advanced-analytics, "
      .. "basic-analytics, process-user-actions")
  end)
end)

describe("examples/batch_transactions.lua", function()
  it("processes the three payloads, each in its own session, and merges them", function()
    local r = example("batch_transactions")
    succeeded(r)
    has(r.out, "Processed 3 transactions")
    has(r.out, "TXN-001: completed, 1000.00 USD, fees 5.00 (session txn-1)")
    has(r.out, "TXN-002: completed, 2500.00 EUR, fees 12.50, rate 1.1 (session txn-2)")
    has(r.out, "TXN-003: completed, 750.00 USD, fees 3.75 (session txn-3)")
    has(r.out, "Total fees: 21.25")
    assert.truthy(r.out:match("Total execution time: %d+ms"))
  end)

  it("fails a batch whose transaction has amount 0, naming the payload", function()
    local r = example("batch_transactions")
    succeeded(r)
    has(r.out, "Batch invalid-transaction-batch failed at payload 2 (process-transaction): "
      .. "Invalid transaction amount 0 for TXN-005")
    has(r.out, "Cause: ValidationError, retryable: false")
  end)
end)

describe("examples/content_router.lua", function()
  it("routes posts and articles to workflows that make nested ctx:call calls", function()
    local r = example("content_router")
    succeeded(r)
    has(r.out, "POST-1 (post): route post-workflow; steps post-workflow > basic-moderation > "
      .. "sentiment-analysis; flags: none; sentiment: positive")
    has(r.out, "ART-123 (article): route article-workflow; steps article-workflow > basic-moderation > "
      .. "ai-summarization; flags: none")
    has(r.out, "summary: This is a great article about distribute... [AI Summary]")
  end)

  it("moderates comments directly and sends unknown types to the fallback", function()
    local r = example("content_router")
    succeeded(r)
    has(r.out, "CMT-7 (comment): route basic-moderation; steps basic-moderation; flags: profanity")
    has(r.out, "VID-9 (video): route manual-review (fallback); steps manual-review; "
      .. "flags: needs-manual-review")
  end)

  it("rejects an unknown type when there is no fallback, naming the known routes", function()
    local r = example("content_router")
    succeeded(r)
    has(r.out, "strict-content-router rejected VID-10:")
    has(r.out, "no fallback (known routes: article, comment, post)")
  end)
end)

describe("every example", function()
  it("finishes well under 2 s", function()
    for _, name in ipairs(EXAMPLES) do
      local r = example(name)
      succeeded(r)
      assert(r.ms < 2000 * MULT, ("%s took %d ms"):format(name, r.ms))
    end
  end)

  local REDIS = os.getenv("AM2Z_TEST_REDIS_URL")
  local seq = 0
  local function prefix()
    seq = seq + 1
    return ("AM2Z_QUEUE_PREFIX=ex%x%d"):format(os.time(), seq)
  end

  -- The same example on QueueRuntime prints what it prints on LocalRuntime
  -- (apart from durations): every processor ran as a job on Redis.
  it("runs on QueueRuntime with --redis URL, with the same output", function()
    if not REDIS then pending("needs the suite's redis-server (AM2Z_TEST_REDIS_URL)") return end
    for _, name in ipairs(EXAMPLES) do
      local r = run(name, "--redis " .. REDIS, prefix())
      succeeded(r)
      has(r.err, "running on QueueRuntime (" .. REDIS .. ")")
      assert.equal(example(name).out:gsub("%d+ms", "Nms"), (r.out:gsub("%d+ms", "Nms")))
    end
  end)

  it("takes the Redis URL from AM2Z_REDIS_URL as well, and its jobs are in Redis", function()
    if not REDIS then pending("needs the suite's redis-server (AM2Z_TEST_REDIS_URL)") return end
    local env = prefix()
    local r = run("quickstart", nil, "AM2Z_REDIS_URL=" .. REDIS .. " " .. env)
    succeeded(r)
    has(r.err, "running on QueueRuntime")
    has(r.out, "Order ORD-001 processed successfully!")
    assert.is_nil(example("quickstart").err:find("QueueRuntime", 1, true))
    -- the chain's top-level job is kept as completed in its processor's queue
    local qp = env:match("=(.*)")
    local redis = require("am2z.redis")
    local url = redis.parseUrl(REDIS)
    local p = io.popen(("redis-cli -h %s -p %d ZCARD bull:%s_process-order:completed")
      :format(url.host, url.port, qp))
    local n = tonumber(p:read("*a"))
    p:close()
    assert.equal(1, n)
  end)

  it("with an unreachable Redis, executions fail with a NetworkError naming it, never hang", function()
    local r = run("quickstart", "--redis redis://127.0.0.1:1")
    assert.are_not.equal(124, r.code, "timed out")
    has(r.out, "Order processing failed: cannot execute 'process-order': could not connect to Redis (127.0.0.1:1)")
    has(r.err, "NETWORK_ERROR")
  end)

  it("rejects --redis without a URL with a usage line", function()
    local r = run("content_router", "--redis")
    assert.equal(2, r.code)
    has(r.err, "usage: content_router.lua [--redis URL]")
  end)
end)
