-- Workflows of the game-server example (examples/embed/game_server.c).
-- "on-player-joined" mixes a Lua processor with two native C processors
-- registered by the host ("score" completes at once, "db_save" later).
-- The host rewrites this file while it runs: the greeting changes, and
-- executions started after the reload use the new text.
local am2z = require("am2z")
local embed = require("am2z.embed")

local greet = am2z.createProcessor("greet"):process(function(s)
  s.greeting = "Welcome, " .. s.name .. "!"
  return am2z.Success(s)
end)

local joined = am2z.chainProcessors{
  name = "on-player-joined",
  processors = { greet, embed.native("score"), embed.native("db_save") },
}

-- A long matchmaking wait, cancelled by the host when the player leaves.
local matchmaking = am2z.createProcessor("matchmaking"):process(function(s, ctx)
  local r = ctx:call("find_match", s)
  if not r.success then return am2z.Failure(r.error) end
  return am2z.Success(r.state)
end)

return { greet, joined, matchmaking }
