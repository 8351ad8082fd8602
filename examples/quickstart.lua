--[[
Quick start: e-commerce order processing.

Three processors chained as "process-order": validate-order computes the
total, process-payment calls a (simulated) payment gateway that is down on
the first call, so its retry policy retries it, and reserve-inventory
reserves the items. A second order with no items fails validation, and the
chain reports which step failed.

Run:  ./build/bin/am2z-lua examples/quickstart.lua [--redis URL]
(logs go to stderr; AM2Z_LOG_LEVEL=silent hides them)
]]

local am2z = require("am2z")

local Success, Failure = am2z.Success, am2z.Failure
local format, concat = string.format, table.concat

-- Runtime choice, logger and helpers shared by the examples (examples/common.lua).
local common = dofile((arg and arg[0] or ""):match("^(.-)[^/]*$") .. "common.lua")
local log, createRuntime = common.log, common.createRuntime
local append = common.append

-- The simulated payment gateway is unavailable on its first call.
local gatewayCalls = 0

-- 1. Processors ----------------------------------------------------------

local validateOrder = am2z.createProcessor("validate-order")
  :withDescription("Validate order data and compute the total")
  :withTimeout(5000)
  :process(function(state, ctx)
    ctx.log:info("Validating order " .. state.orderId)
    if #state.items == 0 then
      return Failure(am2z.ValidationError("items", state.items, "Order must contain at least one item"))
    end
    local total = 0
    for _, item in ipairs(state.items) do
      total = total + item.price * item.quantity
    end
    state.total = math.floor(total * 100 + 0.5) / 100
    state.notifications = append(state.notifications, "Order validated")
    return Success(state)
  end)

local processPayment = am2z.createProcessor("process-payment")
  :withDescription("Process customer payment")
  :withTimeout(5000)
  :withRetryPolicy{ maxAttempts = 3, backoffMs = 50 }
  :process(function(state, ctx)
    ctx.log:info(format("Processing payment for order %s (attempt %d)", state.orderId, ctx.meta.attempt))
    ctx:sleep(30) -- talking to the gateway
    gatewayCalls = gatewayCalls + 1
    if gatewayCalls == 1 then
      -- NetworkError is retryable: the retry policy runs the processor again.
      return Failure(am2z.NetworkError("Payment gateway unavailable"))
    end
    state.paymentStatus = "completed"
    state.paymentAttempts = ctx.meta.attempt
    state.notifications = append(state.notifications, "Payment processed successfully")
    return Success(state)
  end)

local reserveInventory = am2z.createProcessor("reserve-inventory")
  :withDescription("Reserve inventory for order items")
  :process(function(state, ctx)
    ctx.log:info("Reserving inventory for order " .. state.orderId)
    for _, item in ipairs(state.items) do
      ctx.log:debug(format("Reserving %dx %s", item.quantity, item.productId))
    end
    ctx:sleep(10)
    state.inventoryReserved = true
    state.notifications = append(state.notifications, "Inventory reserved")
    return Success(state)
  end)

-- 2. The workflow ----------------------------------------------------------

local orderWorkflow = am2z.chainProcessors{
  name = "process-order",
  processors = { validateOrder, processPayment, reserveInventory },
  timeout = 30000,
}

-- 3. Runtime and executions -----------------------------------------------

local runtime = createRuntime()
runtime:register(orderWorkflow)
runtime:start()

runtime:on("processor:retrying", function(e)
  print(format("Retrying %s after failed attempt %d", e.processorName, e.attempt))
end)

local function order(orderId, items)
  return am2z.createAppState("order-session-" .. orderId, {
    orderId = orderId,
    customerId = "CUST-456",
    items = items,
    total = 0,
    paymentStatus = "pending",
    inventoryReserved = false,
    notifications = {},
  })
end

local result = runtime:execute("process-order", order("ORD-001", {
  { productId = "PROD-1", quantity = 2, price = 29.99 },
  { productId = "PROD-2", quantity = 1, price = 15.5 },
}))

if result.success then
  print(format("Order %s processed successfully!", result.state.orderId))
  print(format("Total: $%.2f", result.state.total))
  print("Notifications: " .. concat(result.state.notifications, ", "))
  print("Payment attempts: " .. result.state.paymentAttempts)
else
  print("Order processing failed: " .. result.error.message)
end

local empty = runtime:execute("process-order", order("ORD-002", {}))
if empty.success then
  print("Order ORD-002 unexpectedly succeeded")
else
  local details = empty.error.details or {}
  print(format("Order ORD-002 failed at %s: %s", tostring(details.failedProcessor), empty.error.message))
end

runtime:stop()
