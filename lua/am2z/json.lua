--[[
am2z.json -- JSON encoding that keeps every number exact.

lua-cjson does the work, but Debian's 2.1.0 writes numbers with at most 14
significant digits (encode_number_precision refuses more): 123456789012345
would come back as 123456789012340 after a trip through Redis. encode()
checks first whether a value holds such a number (a walk without
allocation); only then it encodes a copy in which those numbers are
placeholders and puts them back with the shortest of %.15g..%.17g that reads back as the same double.
Decoding needs nothing: cjson reads all digits.

Must not: change the caller's tables.
]]

local cjson = require("cjson")

local type, pairs, ipairs, tonumber, setmetatable, getmetatable =
  type, pairs, ipairs, tonumber, setmetatable, getmetatable
local format, gsub = string.format, string.gsub
local huge = math.huge
local cencode = cjson.encode

local M = {}

local function exact14(n)
  return n ~= n or n == huge or n == -huge or tonumber(format("%.14g", n)) == n
end

-- true when some number in v needs more than 14 digits. Each table is seen
-- once (shared subtables, cycles: cjson rejects those itself).
local function needs_more(v, seen)
  seen[v] = true
  for _, x in pairs(v) do
    local t = type(x)
    if t == "number" then
      if not exact14(x) then return true end
    elseif t == "table" and not seen[x] and needs_more(x, seen) then
      return true
    end
  end
  return false
end

-- The shortest of %.15g..%.17g that reads back as the same double.
local function exact(n)
  for _, f in ipairs({ "%.15g", "%.16g" }) do
    local t = format(f, n)
    if tonumber(t) == n then return t end
  end
  return format("%.17g", n)
end

-- A marker no data can guess: random per process.
local MARK
do
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(8)
  if f then f:close() end
  b = b or tostring(os.time()) .. tostring(os.clock())
  MARK = "\1am2z" .. (b:gsub(".", function(c) return format("%02x", c:byte()) end)) .. "#"
end
local MARK_PATTERN = '"\\u0001' .. MARK:sub(2):gsub("%p", "%%%0") .. '(%d+)\\u0001"'

local getmt = debug.getmetatable

local function substitute(v, toks, seen)
  local t = type(v)
  if t == "number" then
    if exact14(v) then return v end
    toks[#toks + 1] = exact(v)
    return MARK .. #toks .. "\1"
  end
  if t ~= "table" then return v end
  local done = seen[v]
  if done then return done end        -- shared (or cyclic) stays shared
  local out = {}
  seen[v] = out
  for k, x in pairs(v) do out[k] = substitute(x, toks, seen) end
  local mt = getmt(v)                 -- cjson's array/object marks
  if mt then setmetatable(out, mt) end
  return out
end

--- cjson.encode with exact numbers; raises as cjson.encode does.
function M.encode(v)
  if type(v) == "number" then
    if exact14(v) then return cencode(v) end
    return exact(v)
  end
  if type(v) ~= "table" or not needs_more(v, {}) then return cencode(v) end
  local toks = {}
  local s = cencode(substitute(v, toks, {}))
  return (gsub(s, MARK_PATTERN, function(i) return toks[tonumber(i)] end))
end

--- Formats one number as encode() would.
function M.number(n)
  if exact14(n) then return cencode(n) end
  return exact(n)
end

M.decode = cjson.decode
M.null = cjson.null

return M
