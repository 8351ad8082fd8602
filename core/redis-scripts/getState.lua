--[[
  A job's state in one step (a job moving between structures cannot be
  missed). Order as BullMQ 6: completed, failed, delayed, prioritized,
  active, wait, paused, waiting-children.
  KEYS: 1 completed, 2 failed, 3 delayed, 4 prioritized, 5 active, 6 wait, 7 paused,
        8 waiting-children, 9 job hash
  ARGV: 1 id
  Returns the state name, or "unknown".
]]
local rcall, id = redis.call, ARGV[1]
if rcall("ZSCORE", KEYS[1], id) then return "completed" end
if rcall("ZSCORE", KEYS[2], id) then return "failed" end
if rcall("ZSCORE", KEYS[3], id) then return "delayed" end
if rcall("ZSCORE", KEYS[4], id) then return "prioritized" end
if rcall("LPOS", KEYS[5], id) then return "active" end
if rcall("LPOS", KEYS[6], id) then return "waiting" end
if rcall("LPOS", KEYS[7], id) then return "waiting" end
if rcall("ZSCORE", KEYS[8], id) then return "waiting-children" end
return "unknown"
