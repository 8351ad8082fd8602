--[[
  For waitUntilFinished (BullMQ 6 isFinished): -1 no job, 1 completed (with
  its returnvalue), 2 failed (with its failedReason), 0 otherwise.
  KEYS: 1 completed, 2 failed, 3 job hash
  ARGV: 1 id
]]
local rcall, id = redis.call, ARGV[1]
if rcall("EXISTS", KEYS[3]) == 0 then return { -1 } end
if rcall("ZSCORE", KEYS[1], id) then return { 1, rcall("HGET", KEYS[3], "returnvalue") } end
if rcall("ZSCORE", KEYS[2], id) then return { 2, rcall("HGET", KEYS[3], "failedReason") } end
return { 0 }
