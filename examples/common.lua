--[[
What every example shares: the one place that picks the runtime (--redis URL
or AM2Z_REDIS_URL selects the distributed one), the example logger, and a
small list helper. Loaded by each example with dofile, next to itself.
]]

local am2z = require("am2z")

local M = {}

local script = (arg and arg[0] or "example.lua"):match("[^/]*$")

-- --redis URL (or AM2Z_REDIS_URL) selects the distributed runtime.
local function redisUrl(args)
  for i = 1, #args do
    if args[i] == "--redis" then
      if not args[i + 1] then
        io.stderr:write("usage: " .. script .. " [--redis URL]\n")
        os.exit(2)
      end
      return args[i + 1]
    end
  end
  local env = os.getenv("AM2Z_REDIS_URL")
  return env ~= "" and env or nil
end

local REDIS_URL = redisUrl(arg or {})
M.log = am2z.createLogger{ source = "example" }

--- The runtime the example runs on: the one line to switch. With Redis,
--- every process started with the same script and AM2Z_QUEUE_PREFIX shares
--- the work.
function M.createRuntime()
  if REDIS_URL then
    io.stderr:write("running on QueueRuntime (" .. REDIS_URL .. ")\n")
    return am2z.QueueRuntime.new{ redis = { url = REDIS_URL }, logger = M.log,
      queuePrefix = os.getenv("AM2Z_QUEUE_PREFIX") or "am2z" }
  end
  return am2z.LocalRuntime.new{ logger = M.log }
end

--- A copy of `list` with `item` appended (states are treated as values).
function M.append(list, item)
  local out = {}
  for i, v in ipairs(list or {}) do out[i] = v end
  out[#out + 1] = item
  return out
end

return M
