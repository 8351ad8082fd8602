--[[
Image processing pipeline: a chain whose second step is a parallel group.

generate-thumbnails runs first; then apply-watermark, optimize-compression
and extract-metadata run concurrently on its output, and a mergeFunction
combines their states (each branch appended its own processing step). The
whole pipeline takes about as long as the thumbnails plus the slowest
branch, not the sum of all four.

Run:  ./build/bin/am2z-lua examples/image_pipeline.lua [--redis URL]
(logs go to stderr; AM2Z_LOG_LEVEL=silent hides them)
]]

local am2z = require("am2z")

local Success = am2z.Success
local format, concat = string.format, table.concat

-- Runtime choice, logger and helpers shared by the examples (examples/common.lua).
local common = dofile((arg and arg[0] or ""):match("^(.-)[^/]*$") .. "common.lua")
local log, createRuntime = common.log, common.createRuntime
local append = common.append

-- 1. Processors ------------------------------------------------------------

local generateThumbnails = am2z.createProcessor("generate-thumbnails")
  :withDescription("Generate multiple thumbnail sizes")
  :withTimeout(15000)
  :withQueueConfig{ concurrency = 3 }
  :process(function(state, ctx)
    ctx.log:info("Generating thumbnails for " .. state.imageUrl)
    local thumbnails = {}
    for i, size in ipairs({ "150x150", "300x300", "600x600" }) do
      thumbnails[i] = { size = size, url = format("%s_thumb_%s.jpg", state.imageUrl, size) }
    end
    ctx:sleep(60)
    state.thumbnails = thumbnails
    state.processingSteps = append(state.processingSteps, "Thumbnails generated")
    return Success(state)
  end)

local applyWatermark = am2z.createProcessor("apply-watermark")
  :withDescription("Apply watermark to image")
  :withTimeout(10000)
  :process(function(state, ctx)
    ctx.log:info("Applying watermark to " .. state.imageUrl)
    ctx:sleep(50)
    state.watermarkApplied = true
    state.processingSteps = append(state.processingSteps, "Watermark applied")
    return Success(state)
  end)

local optimizeCompression = am2z.createProcessor("optimize-compression")
  :withDescription("Optimize image compression")
  :withTimeout(8000)
  :process(function(state, ctx)
    ctx.log:info("Optimizing compression for " .. state.imageUrl)
    ctx:sleep(40)
    state.compressionLevel = 85
    state.processingSteps = append(state.processingSteps, "Compression optimized")
    return Success(state)
  end)

local extractMetadata = am2z.createProcessor("extract-metadata")
  :withDescription("Extract image metadata")
  :withTimeout(5000)
  :process(function(state, ctx)
    ctx.log:info("Extracting metadata from " .. state.imageUrl)
    ctx:sleep(20)
    state.imageInfo = { format = "JPEG", fileSize = 1024000, processedAt = os.date("!%Y-%m-%dT%H:%M:%SZ") }
    state.processingSteps = append(state.processingSteps, "Metadata extracted")
    return Success(state)
  end)

-- 2. Composition -------------------------------------------------------------

-- Every branch gets the same input and returns a whole state, so "later keys
-- win" would let extract-metadata's untouched watermarkApplied = false undo
-- apply-watermark's work. Take from each branch only the fields it changed,
-- and keep the input's steps once plus what each branch appended, in
-- processor order.
local function mergeImageOps(states, initial)
  local merged = {}
  for k, v in pairs(initial) do merged[k] = v end
  local steps = {}
  for i, s in ipairs(initial.processingSteps) do steps[i] = s end
  for _, s in ipairs(states) do
    for k, v in pairs(s) do
      if k ~= "processingSteps" and v ~= initial[k] then merged[k] = v end
    end
    for i = #initial.processingSteps + 1, #s.processingSteps do
      steps[#steps + 1] = s.processingSteps[i]
    end
  end
  merged.processingSteps = steps
  return merged
end

local parallelImageOps = am2z.parallelProcessors{
  name = "parallel-image-processing",
  processors = { applyWatermark, optimizeCompression, extractMetadata },
  timeout = 20000,
  mergeFunction = mergeImageOps,
}

local imageProcessingPipeline = am2z.chainProcessors{
  name = "image-processing-pipeline",
  processors = { generateThumbnails, parallelImageOps },
  timeout = 45000,
}

-- 3. Runtime and execution -----------------------------------------------------

local runtime = createRuntime()
runtime:register(imageProcessingPipeline)
runtime:start()

local imageState = am2z.createAppState("img-session-456", {
  imageUrl = "https://example.com/uploads/photo123.jpg",
  userId = "user-789",
  originalSize = { width = 1920, height = 1080 },
  thumbnails = {},
  watermarkApplied = false,
  compressionLevel = 0,
  processingSteps = {},
})

local result = runtime:execute("image-processing-pipeline", imageState)

if result.success then
  local s = result.state
  print(format("Image processed in %dms", result.executionTime))
  print(format("Generated %d thumbnails", #s.thumbnails))
  print("Processing steps: " .. concat(s.processingSteps, " -> "))
  print(format("Watermark: %s, compression: %d, format: %s", tostring(s.watermarkApplied),
    s.compressionLevel, s.imageInfo.format))
  print(format("State version: %d", s.metadata.version))
else
  print("Image processing failed: " .. result.error.message)
end

runtime:stop()
