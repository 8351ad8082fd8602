--[[
  Takes the next job for a worker; see _fetch.lua.
  KEYS: 1 wait, 2 active, 3 prioritized, 4 events, 5 limiter, 6 delayed, 7 meta, 8 pc, 9 marker
  ARGV: 1 key prefix, 2 now (ms), 3 lock token ("0": no lock), 4 lock duration (ms),
        5 limiter max (0: none), 6 limiter duration (ms), 7 worker name or ""
]]
--@include _fetch
return am2z_fetch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
  ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
