--[[
Dynamic processor registration in a multi-tenant service.

Core processors (send-email, basic-analytics) are registered before the
runtime starts; tenant features (advanced-analytics, send-sms,
webhook-notifications) are registered while it runs, followed by
syncProcessors(). Before running a feature the service checks
isProcessorRegistered; executing a processor that was never registered is
not an exception but a failed result carrying a ProcessorNotFoundError.

Run:  ./build/bin/am2z-lua examples/dynamic_registration.lua [--redis URL]
(logs go to stderr; AM2Z_LOG_LEVEL=silent hides them)
]]

local am2z = require("am2z")

local Success = am2z.Success
local format, concat = string.format, table.concat

-- Runtime choice, logger and helpers shared by the examples (examples/common.lua).
local common = dofile((arg and arg[0] or ""):match("^(.-)[^/]*$") .. "common.lua")
local log, createRuntime = common.log, common.createRuntime

-- Marks the tenant's notifications of one channel as sent.
local function markSent(state, channel)
  local out = {}
  for i, n in ipairs(state.notifications) do
    out[i] = n.type == channel and { type = n.type, status = "sent", recipient = n.recipient } or n
  end
  state.notifications = out
  return state
end

local function statusOf(state, channel)
  for _, n in ipairs(state.notifications) do
    if n.type == channel then return n.status end
  end
  return "none"
end

-- 1. Core processors, available to every tenant --------------------------------

local sendEmail = am2z.createProcessor("send-email")
  :withDescription("Send email notification")
  :withRetryPolicy{ maxAttempts = 3, backoffMs = 50 }
  :process(function(state, ctx)
    ctx.log:info("Sending email for tenant " .. state.tenantId)
    ctx:sleep(20)
    return Success(markSent(state, "email"))
  end)

local basicAnalytics = am2z.createProcessor("basic-analytics")
  :withDescription("Basic analytics processing")
  :process(function(state, ctx)
    ctx.log:info("Processing basic analytics for " .. state.tenantId)
    state.data.analysed = true
    return Success(state)
  end)

local runtime = createRuntime()
runtime:register(sendEmail)
runtime:register(basicAnalytics)
runtime:start()

print("Core processors: " .. concat(runtime:getRegisteredProcessorNames(), ", "))

-- 2. Tenant features, registered after start ------------------------------------

local featureProcessors = {
  ["advanced-analytics"] = function()
    return am2z.createProcessor("advanced-analytics")
      :withDescription("Advanced analytics with ML")
      :withTimeout(30000)
      :withQueueConfig{ concurrency = 2 }
      :process(function(state, ctx)
        ctx.log:info("Running advanced analytics for tenant " .. state.tenantId)
        ctx:sleep(50) -- the model
        state.data.mlInsights = "Generated insights"
        return Success(state)
      end)
  end,
  ["sms-notifications"] = function()
    return am2z.createProcessor("send-sms")
      :withDescription("Send SMS notifications")
      :withRetryPolicy{ maxAttempts = 5, backoffMs = 50 }
      :process(function(state, ctx)
        ctx.log:info("Sending SMS for tenant " .. state.tenantId)
        return Success(markSent(state, "sms"))
      end)
  end,
  ["webhook-integration"] = function()
    return am2z.createProcessor("webhook-notifications")
      :withDescription("Send webhook notifications")
      :withTimeout(10000)
      :process(function(state, ctx)
        ctx.log:info("Sending webhook for tenant " .. state.tenantId)
        ctx:sleep(30)
        return Success(markSent(state, "webhook"))
      end)
  end,
}

local tenantFeatures = {}

local function enableTenantFeatures(tenantId, features)
  local newProcessors = {}
  for _, feature in ipairs(features) do
    local make = featureProcessors[feature]
    if make then newProcessors[#newProcessors + 1] = make() end
  end
  if #newProcessors > 0 then
    -- Registering a name again replaces the definition; runs in flight finish on the old one.
    runtime:registerMany(newProcessors)
    runtime:syncProcessors()
    tenantFeatures[tenantId] = features
    print(format("Enabled features for tenant %s: %s", tenantId, concat(features, ", ")))
  end
end

print("advanced-analytics registered before enabling: "
  .. tostring(runtime:isProcessorRegistered("advanced-analytics")))

enableTenantFeatures("tenant-premium", { "advanced-analytics", "sms-notifications" })
enableTenantFeatures("tenant-enterprise", { "advanced-analytics", "webhook-integration" })

print("Registered processors: " .. concat(runtime:getRegisteredProcessorNames(), ", "))

-- 3. Running tenant work ------------------------------------------------------------

local function tenantState(tenantId, sessionId)
  return am2z.createAppState(sessionId, {
    tenantId = tenantId,
    userId = "user-1",
    action = "report",
    data = {},
    notifications = {
      { type = "email", status = "pending", recipient = "ops@" .. tenantId .. ".example" },
      { type = "sms", status = "pending", recipient = "+15550100" },
      { type = "webhook", status = "pending", recipient = "https://hooks.example/" .. tenantId },
    },
    features = tenantFeatures[tenantId] or {},
  })
end

-- Runs a processor only if it is available; returns the result or nil.
local function runIfAvailable(name, state)
  if not runtime:isProcessorRegistered(name) then
    print(format("%s: %s is not available, skipped", state.tenantId, name))
    return nil
  end
  local r = runtime:execute(name, state)
  if not r.success then
    print(format("%s: %s failed: %s", state.tenantId, name, r.error.message))
    return nil
  end
  return r.state
end

local premium = runIfAvailable("advanced-analytics", tenantState("tenant-premium", "premium-session"))
if premium then
  print(format("tenant-premium advanced-analytics: %s", premium.data.mlInsights))
  premium = runIfAvailable("send-sms", premium)
  if premium then print("tenant-premium sms: " .. statusOf(premium, "sms")) end
end

local enterprise = runIfAvailable("webhook-notifications",
  tenantState("tenant-enterprise", "enterprise-session"))
if enterprise then
  enterprise = runIfAvailable("send-email", enterprise)
  if enterprise then
    print(format("tenant-enterprise webhook: %s, email: %s", statusOf(enterprise, "webhook"),
      statusOf(enterprise, "email")))
  end
end

runIfAvailable("priority-support", tenantState("tenant-premium", "premium-session"))

-- A batch over a core processor, registered after start as well.
local userActionBatch = am2z.batchProcessor{
  name = "process-user-actions",
  processorName = "basic-analytics",
  payloads = {
    am2z.createAppState("action-1", { tenantId = "tenant-123", userId = "user-1", action = "page_view",
      data = { page = "/dashboard" }, notifications = {}, features = {} }),
    am2z.createAppState("action-2", { tenantId = "tenant-123", userId = "user-2", action = "button_click",
      data = { button = "export" }, notifications = {}, features = {} }),
  },
  mergeFunction = function(states, initial)
    local analysed = 0
    for _, s in ipairs(states) do
      if s.data.analysed then analysed = analysed + 1 end
    end
    initial.analysedActions = analysed
    return initial
  end,
}
runtime:register(userActionBatch)
runtime:syncProcessors()

local batch = runtime:execute("process-user-actions", am2z.createAppState("actions-batch", {}))
if batch.success then
  print(format("User actions analysed: %d", batch.state.analysedActions))
else
  print("User action batch failed: " .. batch.error.message)
end

-- 4. A processor nobody registered --------------------------------------------------

local missing = runtime:execute("fraud-detection", tenantState("tenant-premium", "premium-session"))
if missing.success then
  print("fraud-detection unexpectedly succeeded")
else
  print(format("fraud-detection: %s (%s)", missing.error.name, missing.error.code))
  print("  " .. missing.error.message)
end

runtime:stop()
