--[[
Batch processing: one processor run once per payload, concurrently.

process-transaction validates and settles one transaction; the batch
"process-transaction-batch" runs it over three payloads, each in its own
session (createAppState per payload), and a mergeFunction collects the
per-transaction results and the total fees. A second batch contains a
transaction with amount 0: it fails with a (non-retryable) ValidationError,
the batch fails and reports which payload broke it.

Run:  ./build/bin/am2z-lua examples/batch_transactions.lua [--redis URL]
(logs go to stderr; AM2Z_LOG_LEVEL=silent hides them)
]]

local am2z = require("am2z")

local Success, Failure = am2z.Success, am2z.Failure
local format, min = string.format, math.min

-- Runtime choice, logger and helpers shared by the examples (examples/common.lua).
local common = dofile((arg and arg[0] or ""):match("^(.-)[^/]*$") .. "common.lua")
local log, createRuntime = common.log, common.createRuntime

-- 1. The processor ---------------------------------------------------------------

local processTransaction = am2z.createProcessor("process-transaction")
  :withDescription("Process individual financial transaction")
  :withTimeout(10000)
  :withRetryPolicy{ maxAttempts = 3, backoffMs = 50 }
  :withQueueConfig{ concurrency = 10 }
  :process(function(state, ctx)
    ctx.log:info("Processing transaction " .. state.transactionId)
    if state.amount <= 0 then
      -- A ValidationError is not retryable: no point trying again.
      return Failure(am2z.ValidationError("amount", state.amount,
        format("Invalid transaction amount %s for %s", tostring(state.amount), state.transactionId)))
    end
    ctx:sleep(min(state.amount / 50, 100)) -- bigger transfers take longer
    state.status = "completed"
    state.fees = state.amount * 0.005
    if state.currency ~= "USD" then state.exchangeRate = 1.1 end
    return Success(state)
  end)

local function transaction(sessionId, id, amount, currency, from, to)
  return am2z.createAppState(sessionId, {
    transactionId = id, amount = amount, currency = currency,
    fromAccount = from, toAccount = to, status = "pending", fees = 0,
  })
end

-- Collects one summary per transaction, in payload order, and the total fees.
local function collectTransactions(states, initial)
  local merged, totalFees, list = {}, 0, {}
  for k, v in pairs(initial) do merged[k] = v end
  for i, s in ipairs(states) do
    list[i] = { id = s.transactionId, status = s.status, amount = s.amount, currency = s.currency,
                fees = s.fees, exchangeRate = s.exchangeRate, sessionId = s.metadata.sessionId }
    totalFees = totalFees + s.fees
  end
  merged.transactions = list
  merged.totalFees = totalFees
  return merged
end

-- 2. Batches -----------------------------------------------------------------------

local transactionBatch = am2z.batchProcessor{
  name = "process-transaction-batch",
  processorName = "process-transaction",
  payloads = {
    transaction("txn-1", "TXN-001", 1000, "USD", "ACC-123", "ACC-456"),
    transaction("txn-2", "TXN-002", 2500, "EUR", "ACC-789", "ACC-012"),
    transaction("txn-3", "TXN-003", 750, "USD", "ACC-345", "ACC-678"),
  },
  mergeFunction = collectTransactions,
}

local invalidBatch = am2z.batchProcessor{
  name = "invalid-transaction-batch",
  processorName = "process-transaction",
  payloads = {
    transaction("txn-4", "TXN-004", 500, "USD", "ACC-111", "ACC-222"),
    transaction("txn-5", "TXN-005", 0, "USD", "ACC-333", "ACC-444"),
  },
  mergeFunction = collectTransactions,
}

-- 3. Runtime and executions ----------------------------------------------------------

local runtime = createRuntime()
runtime:register(processTransaction)
runtime:register(transactionBatch)
runtime:register(invalidBatch)
runtime:start()

local batchResult = runtime:execute("process-transaction-batch", am2z.createAppState("batch-session", {}))

if batchResult.success then
  local s = batchResult.state
  print(format("Processed %d transactions", #s.transactions))
  for _, t in ipairs(s.transactions) do
    print(format("  %s: %s, %.2f %s, fees %.2f%s (session %s)", t.id, t.status, t.amount, t.currency,
      t.fees, t.exchangeRate and format(", rate %.1f", t.exchangeRate) or "", t.sessionId))
  end
  print(format("Total fees: %.2f", s.totalFees))
  print(format("Total execution time: %dms", batchResult.executionTime))
else
  print("Batch failed: " .. batchResult.error.message)
end

local invalid = runtime:execute("invalid-transaction-batch", am2z.createAppState("invalid-batch-session", {}))
if invalid.success then
  print("invalid-transaction-batch unexpectedly succeeded")
else
  local d = invalid.error.details or {}
  local root = am2z.errors.getRootCause(invalid.error)
  print(format("Batch invalid-transaction-batch failed at payload %s (%s): %s",
    tostring(d.failedPayload), tostring(d.failedProcessor), invalid.error.message))
  print(format("Cause: %s, retryable: %s", tostring(root.name), tostring(root.retryable)))
end

runtime:stop()
