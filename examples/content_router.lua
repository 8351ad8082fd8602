--[[
Content routing: routeProcessor picks a workflow by state.contentType.

  post    -> post-workflow     (ctx:call basic-moderation, then sentiment-analysis)
  article -> article-workflow  (ctx:call basic-moderation, then ai-summarization;
                                returns the nested call's result directly)
  comment -> basic-moderation
  other   -> manual-review     (the fallback)

Every processor appends its name to state.trail, so the output shows which
route ran and the nested calls it made. A router without a fallback rejects
an unknown content type with a message naming the known routes.

Run:  ./build/bin/am2z-lua examples/content_router.lua [--redis URL]
(logs go to stderr; AM2Z_LOG_LEVEL=silent hides them)
]]

local am2z = require("am2z")

local Success = am2z.Success
local format, concat, lower = string.format, table.concat, string.lower

-- Runtime choice, logger and helpers shared by the examples (examples/common.lua).
local common = dofile((arg and arg[0] or ""):match("^(.-)[^/]*$") .. "common.lua")
local log, createRuntime = common.log, common.createRuntime
local append = common.append

-- 1. Building blocks ---------------------------------------------------------------

local basicModeration = am2z.createProcessor("basic-moderation")
  :withDescription("Basic content moderation")
  :process(function(state, ctx)
    ctx.log:info(format("Moderating content %s (call depth %d)", state.contentId, ctx.callDepth))
    local text = lower(state.content)
    local flags = state.moderationFlags
    if text:find("bad", 1, true) or text:find("inappropriate", 1, true) then
      flags = append(flags, "profanity")
    end
    state.moderationFlags = flags
    state.trail = append(state.trail, "basic-moderation")
    return Success(state)
  end)

local sentimentAnalysis = am2z.createProcessor("sentiment-analysis")
  :withDescription("Sentiment analysis (simulated AI call)")
  :withTimeout(15000)
  :process(function(state, ctx)
    ctx.log:info("Analyzing sentiment for " .. state.contentId)
    ctx:sleep(40)
    local text = lower(state.content)
    local sentiment = "neutral"
    if text:find("good") or text:find("great") or text:find("awesome") then sentiment = "positive" end
    if text:find("terrible") or text:find("awful") or text:find("horrible") then sentiment = "negative" end
    state.sentiment = sentiment
    state.trail = append(state.trail, "sentiment-analysis")
    return Success(state)
  end)

local aiSummarization = am2z.createProcessor("ai-summarization")
  :withDescription("Content summarization (simulated AI call)")
  :withTimeout(20000)
  :process(function(state, ctx)
    ctx.log:info("Summarizing content " .. state.contentId)
    ctx:sleep(60)
    local summary = state.content
    if #summary > 40 then summary = summary:sub(1, 40) .. "... [AI Summary]" end
    state.aiSummary = summary
    state.trail = append(state.trail, "ai-summarization")
    return Success(state)
  end)

-- 2. Route workflows ---------------------------------------------------------------------

local postWorkflow = am2z.createProcessor("post-workflow")
  :withDescription("Moderate a post, then analyse its sentiment")
  :process(function(state, ctx)
    state.trail = append(state.trail, "post-workflow")
    local moderated = ctx:call("basic-moderation", state)
    if not moderated.success then return am2z.Failure(moderated.error) end
    local analysed = ctx:call("sentiment-analysis", moderated.state)
    if not analysed.success then return am2z.Failure(analysed.error) end
    return Success(analysed.state)
  end)

local articleWorkflow = am2z.createProcessor("article-workflow")
  :withDescription("Moderate an article, then summarize it")
  :process(function(state, ctx)
    state.trail = append(state.trail, "article-workflow")
    local moderated = ctx:call("basic-moderation", state)
    if not moderated.success then return moderated end
    -- An execution result is a valid return value (success -> Success(state)).
    return ctx:call("ai-summarization", moderated.state)
  end)

local manualReview = am2z.createProcessor("manual-review")
  :withDescription("Fallback: queue unknown content types for a human")
  :process(function(state, ctx)
    ctx.log:warn(format("No automated route for content type %q; queued for manual review",
      tostring(state.contentType)))
    state.moderationFlags = append(state.moderationFlags, "needs-manual-review")
    state.trail = append(state.trail, "manual-review")
    return Success(state)
  end)

local routes = { post = postWorkflow, article = articleWorkflow, comment = basicModeration }

local contentRouter = am2z.routeProcessor("content-router",
  function(state) return state.contentType end, routes, manualReview)

-- The same routes with no fallback: unknown types are rejected.
local strictRouter = am2z.routeProcessor("strict-content-router",
  function(state) return state.contentType end, routes)

-- 3. Runtime and executions -----------------------------------------------------------------

local runtime = createRuntime()
-- Processors reached only through ctx:call are not deps of the router:
-- register them explicitly.
runtime:registerMany{ sentimentAnalysis, aiSummarization }
runtime:register(contentRouter)
runtime:register(strictRouter)
runtime:start()

local function content(id, contentType, text)
  return am2z.createAppState("content-session-" .. id, {
    contentId = id, contentType = contentType, content = text,
    author = "john@example.com", moderationFlags = {}, trail = {},
  })
end

local items = {
  content("POST-1", "post", "Great news: our Lua port is awesome"),
  content("ART-123", "article",
    "This is a great article about distributed systems. It covers many important concepts."),
  content("CMT-7", "comment", "This is a bad and inappropriate comment"),
  content("VID-9", "video", "A cat video"),
}

for _, item in ipairs(items) do
  local r = runtime:execute("content-router", item)
  if r.success then
    local s = r.state
    local flags = #s.moderationFlags > 0 and concat(s.moderationFlags, ", ") or "none"
    local route = routes[s.contentType] and s.trail[1] or s.trail[1] .. " (fallback)"
    local line = format("%s (%s): route %s; steps %s; flags: %s", s.contentId, s.contentType,
      route, concat(s.trail, " > "), flags)
    if s.sentiment then line = line .. "; sentiment: " .. s.sentiment end
    print(line)
    if s.aiSummary then print("  summary: " .. s.aiSummary) end
  else
    print(format("%s (%s): failed: %s", item.contentId, item.contentType, r.error.message))
  end
end

local rejected = runtime:execute("strict-content-router", content("VID-10", "video", "Another cat video"))
if rejected.success then
  print("strict-content-router unexpectedly accepted a video")
else
  print(format("strict-content-router rejected VID-10: %s", rejected.error.message))
end

runtime:stop()
