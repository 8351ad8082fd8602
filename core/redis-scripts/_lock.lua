-- Shared by the scripts that move a job out of active (pasted where a script
-- says --@include _lock): checks the worker's lock and releases it.
-- Returns nil when released (or token "0": no lock), else -1 (no such
-- job), -2 (lock gone) or -6 (held by another worker). The job's existence
-- is checked only when the lock does not show it (one call less per job).
local function am2z_release_lock(J, token, k_stalled, id)
  if token == "0" then
    if redis.call("EXISTS", J) == 0 then return -1 end
    return nil
  end
  local lock = redis.call("GET", J .. ":lock")
  if not lock then
    if redis.call("EXISTS", J) == 0 then return -1 end
    return -2
  end
  if lock ~= token then return -6 end
  redis.call("DEL", J .. ":lock")
  redis.call("SREM", k_stalled, id)
  return nil
end
