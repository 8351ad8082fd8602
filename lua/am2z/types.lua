--[[
am2z.types: runtime-checked shapes for processor state (the "typed layer").

A schema describes a Lua value (t.string, t.record{...}, t.array(T), ...) and
checks it with schema:validate(value), which returns true, or false plus a
message of the form "<path>: expected <what>, got <what>" and the path itself.
processor:withState(schema) calls validate on every step, so the success path
must stay allocation-free: no strings, no tables, no closures are created
unless a mismatch has been found.

This module must not: modify or copy the values it checks, coerce values
(a "5" is not a number), raise from validate (mistakes in *building* a schema
raise; mismatches in *values* are returned), or depend on the rest of am2z.
]]

local type, pairs, tostring, select, error = type, pairs, tostring, select, error
local getmetatable, setmetatable, rawequal = getmetatable, setmetatable, rawequal
local floor, huge = math.floor, math.huge
local sort, concat = table.sort, table.concat
local format, find, gsub, byte = string.format, string.find, string.gsub, string.byte

-- JSON null (as decoded by cjson) is what a nil becomes once state has
-- crossed Redis, so optional() has to treat it as absent too.
local okJson, cjson = pcall(require, "cjson")
local NULL = okJson and cjson.null or setmetatable({}, { __tostring = function() return "null" end })

---@class am2z.types
local M = {}

---@class am2z.Schema
---@field kind string  "string"|"number"|"integer"|"boolean"|"any"|"enum"|"literal"|"array"|"record"|"optional"|"map"|"union"
local Schema = {}
Schema.__index = Schema
-- Marker looked up on the metatable rather than the identity of Schema, so a
-- schema built before a module reload (--watch) is still recognised.
Schema.__am2zSchema = true

local function isSchema(v)
  if type(v) ~= "table" then return false end
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__am2zSchema == true
end

---------------------------------------------------------------------------
-- Failure reporting (only ever runs once a mismatch is found)
---------------------------------------------------------------------------

-- A failure carries the text after "<path>: " and the path segments collected
-- innermost-first while the checks unwind; the path string is only joined in
-- validate(), once.
local function fail(text)
  return { text = text, segs = {}, n = 0 }
end

local function push(f, seg)
  local n = f.n + 1
  f.segs[n] = seg
  f.n = n
  return f
end

local function quote(s)
  return '"' .. gsub(s, '[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\"
    elseif c == "\n" then return "\\n" elseif c == "\t" then return "\\t" end
    return format("\\%03d", byte(c))
  end) .. '"'
end

-- "got" names the Lua type; JSON null gets its own name because "userdata"
-- would send users looking for a C object.
local function typeName(v)
  if rawequal(v, NULL) then return "null" end
  return type(v)
end

local function literalText(v)
  if type(v) == "string" then return quote(v) end
  return tostring(v)
end

local function isIdent(s)
  return find(s, "^[%a_][%w_]*$") ~= nil
end

local function segText(seg, first)
  if type(seg) == "string" and isIdent(seg) then
    return first and seg or ("." .. seg)
  end
  local inner
  if type(seg) == "string" then inner = quote(seg)
  elseif type(seg) == "number" or type(seg) == "boolean" then inner = tostring(seg)
  else inner = "<" .. type(seg) .. ">" end
  return (first and "state" or "") .. "[" .. inner .. "]"
end

local function joinPath(f)
  if f.n == 0 then return "state" end
  local parts = {}
  for i = f.n, 1, -1 do
    parts[#parts + 1] = segText(f.segs[i], i == f.n)
  end
  return concat(parts)
end

local function mismatch(what, v)
  return fail("expected " .. what .. ", got " .. typeName(v))
end

---------------------------------------------------------------------------
-- Construction helpers
---------------------------------------------------------------------------

local function new(kind, check, fields)
  local s = fields or {}
  s.kind = kind
  s.check = check
  return setmetatable(s, Schema)
end

-- Short name of a schema for "expected <what>": the kind, not the whole
-- structure, so messages stay one readable line.
local function shortName(s)
  local k = s.kind
  if k == "enum" then
    local parts = {}
    for i = 1, #s.values do parts[i] = literalText(s.values[i]) end
    return "one of " .. concat(parts, ", ")
  elseif k == "literal" then
    return literalText(s.value)
  elseif k == "optional" then
    return shortName(s.inner)
  elseif k == "union" then
    local parts = {}
    for i = 1, #s.options do parts[i] = shortName(s.options[i]) end
    return concat(parts, " | ")
  end
  return k
end

local function requireSchema(fname, v, what)
  if not isSchema(v) then
    error(format("types.%s: expected a schema%s, got %s", fname, what or "", type(v)), 3)
  end
end

---------------------------------------------------------------------------
-- Primitive schemas (values, not functions)
---------------------------------------------------------------------------

M.string = new("string", function(_, v)
  if type(v) == "string" then return nil end
  return mismatch("string", v)
end)

M.number = new("number", function(_, v)
  if type(v) == "number" then return nil end
  return mismatch("number", v)
end)

M.integer = new("integer", function(_, v)
  if type(v) == "number" and v == floor(v) and v ~= huge and v ~= -huge then return nil end
  if type(v) == "number" then
    return fail("expected integer, got " .. tostring(v))
  end
  return mismatch("integer", v)
end)

M.boolean = new("boolean", function(_, v)
  if type(v) == "boolean" then return nil end
  return mismatch("boolean", v)
end)

-- Accepts nil as well: "any" means no constraint at all (as zod's any()).
M.any = new("any", function() return nil end)

---------------------------------------------------------------------------
-- Composite schemas
---------------------------------------------------------------------------

local function checkEnum(s, v)
  if s.set[v] then return nil end
  local t = type(v)
  local got = (t == "string" or t == "number" or t == "boolean") and literalText(v) or typeName(v)
  return fail("expected " .. shortName(s) .. ", got " .. got)
end

--- A value equal to one of the listed strings, numbers or booleans.
--- Accepts a list (`t.enum{ "a", "b" }`) or varargs (`t.enum("a", "b")`).
---@param values (string|number|boolean)[]|string|number|boolean
---@return am2z.Schema
function M.enum(values, ...)
  local list = values
  if type(values) ~= "table" then list = { values, ... } end
  if #list == 0 then
    error("types.enum: expected a non-empty list of values", 2)
  end
  local copy, set = {}, {}
  for i = 1, #list do
    local v = list[i]
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" and tv ~= "boolean" then
      error(format("types.enum: expected value %d to be a string, number or boolean, got %s", i, tv), 2)
    end
    copy[i] = v
    set[v] = true
  end
  return new("enum", checkEnum, { values = copy, set = set })
end

local function checkLiteral(s, v)
  if rawequal(v, s.value) then return nil end
  local got = type(v) == type(s.value) and literalText(v) or typeName(v)
  return fail("expected " .. literalText(s.value) .. ", got " .. got)
end

--- Exactly this value (string, number or boolean).
---@param value string|number|boolean
---@return am2z.Schema
function M.literal(value)
  local tv = type(value)
  if tv ~= "string" and tv ~= "number" and tv ~= "boolean" then
    error("types.literal: expected a string, number or boolean, got " .. tv, 2)
  end
  return new("literal", checkLiteral, { value = value })
end

local function checkArray(s, v)
  if type(v) ~= "table" then return mismatch("array", v) end
  -- Keys must be exactly 1..n: counting keys and bounding each by #v rules
  -- out holes, string keys and a border that # picked below the real end.
  local n, count = #v, 0
  for k in pairs(v) do
    if type(k) ~= "number" or k < 1 or k > n or k ~= floor(k) then
      return fail("expected array, got table")
    end
    count = count + 1
  end
  if count ~= n then return fail("expected array, got table") end
  local item = s.item
  local check = item.check
  for i = 1, n do
    local f = check(item, v[i])
    if f then return push(f, i) end
  end
  return nil
end

--- A sequence (keys exactly 1..n) whose elements all match `item`.
--- An empty table is a valid empty array.
---@param item am2z.Schema
---@return am2z.Schema
function M.array(item)
  requireSchema("array", item)
  return new("array", checkArray, { item = item })
end

-- Orders keys of mixed types so failure reports do not depend on hash order.
local function keyLess(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == "string" or ta == "number" then return a < b end
  return tostring(a) < tostring(b)
end

local function firstUnexpected(s, v)
  local fields = s.fields
  local extra
  for k in pairs(v) do
    if fields[k] == nil then
      extra = extra or {}
      extra[#extra + 1] = k
    end
  end
  if not extra then return nil end
  -- pairs order is arbitrary; sorting keeps the reported field stable.
  sort(extra, keyLess)
  return push(fail("unexpected field"), extra[1])
end

local function checkRecord(s, v)
  if type(v) ~= "table" then return mismatch("record", v) end
  local names, schemas = s.names, s.schemas
  for i = 1, #names do
    local fs = schemas[i]
    local name = names[i]
    local f = fs.check(fs, v[name])
    if f then return push(f, name) end
  end
  if s.isStrict then return firstUnexpected(s, v) end
  return nil
end

local function buildRecord(fields, isStrict)
  local names = {}
  for name in pairs(fields) do names[#names + 1] = name end
  -- Sorted so the first mismatch reported does not depend on hash order.
  sort(names)
  local schemas = {}
  for i = 1, #names do schemas[i] = fields[names[i]] end
  return new("record", checkRecord, {
    fields = fields, names = names, schemas = schemas, isStrict = isStrict or false,
  })
end

--- A table with the given fields. Open: keys not listed are allowed
--- (use `:strict()` to reject them). Missing fields are nil, so only
--- optional (or any) fields may be absent.
---@param fields table<string, am2z.Schema>
---@return am2z.Schema
function M.record(fields)
  if type(fields) ~= "table" or isSchema(fields) then
    error("types.record: expected a table of field schemas, got " .. (isSchema(fields) and "a schema" or type(fields)), 2)
  end
  local copy = {}
  for name, fs in pairs(fields) do
    if type(name) ~= "string" then
      error(format("types.record: expected field names to be strings, got %s %s", type(name), tostring(name)), 2)
    end
    if not isSchema(fs) then
      error(format("types.record: expected a schema for field %q, got %s", name, type(fs)), 2)
    end
    copy[name] = fs
  end
  return buildRecord(copy, false)
end

local function checkOptional(s, v)
  if v == nil or rawequal(v, NULL) then return nil end
  local inner = s.inner
  return inner.check(inner, v)
end

--- `inner`, or nil (JSON null, as decoded by cjson, counts as nil).
---@param inner am2z.Schema
---@return am2z.Schema
function M.optional(inner)
  requireSchema("optional", inner)
  return new("optional", checkOptional, { inner = inner })
end

local function checkEntry(ks, vs, k, val)
  local f = ks.check(ks, k)
  if f then
    f.text = "expected key " .. gsub(f.text, "^expected ", "", 1)
    f.n, f.segs = 0, {}
    return push(f, k)
  end
  f = vs.check(vs, val)
  if f then return push(f, k) end
  return nil
end

local function checkMap(s, v)
  if type(v) ~= "table" then return mismatch("map", v) end
  local ks, vs = s.key, s.value
  local worst, worstKey
  for k, val in pairs(v) do
    -- Once one entry failed, keep scanning (failure path only) so the entry
    -- reported is the smallest failing key, not whichever pairs met first.
    if not worst or keyLess(k, worstKey) then
      local f = checkEntry(ks, vs, k, val)
      if f then worst, worstKey = f, k end
    end
  end
  return worst
end

--- A table whose keys all match `key` and whose values all match `value`.
---@param key am2z.Schema
---@param value am2z.Schema
---@return am2z.Schema
function M.map(key, value)
  requireSchema("map", key, " for the key")
  requireSchema("map", value, " for the value")
  return new("map", checkMap, { key = key, value = value })
end

local function checkUnion(s, v)
  local options = s.options
  local best
  for i = 1, #options do
    local o = options[i]
    local f = o.check(o, v)
    if not f then return nil end
    -- The deepest failure is the alternative the value most nearly matched
    -- (e.g. the one record among strings), so its message is the useful one.
    if f.n > 0 and (not best or f.n > best.n) then best = f end
  end
  if best then return best end
  return mismatch(shortName(s), v)
end

--- Any one of the given schemas. Also accepts a single list: `t.union{ A, B }`.
---@param ... am2z.Schema
---@return am2z.Schema
function M.union(...)
  local n = select("#", ...)
  local list = { ... }
  if n == 1 and type(list[1]) == "table" and not isSchema(list[1]) then
    list = list[1]
    n = #list
  end
  if n == 0 then error("types.union: expected at least one schema", 2) end
  local options = {}
  for i = 1, n do
    if not isSchema(list[i]) then
      error(format("types.union: expected a schema for option %d, got %s", i, type(list[i])), 2)
    end
    options[i] = list[i]
  end
  return new("union", checkUnion, { options = options })
end

--- True when `v` is a schema built by this module.
---@param v any
---@return boolean
function M.isSchema(v)
  return isSchema(v)
end

---------------------------------------------------------------------------
-- Schema methods
---------------------------------------------------------------------------

--- Check `value` against the schema.
---@param value any
---@return boolean ok
---@return string|nil message  "<path>: expected <what>, got <what>"
---@return string|nil path     e.g. "items[2].price"; "state" for the value itself
function Schema:validate(value)
  local f = self.check(self, value)
  if not f then return true end
  local path = joinPath(f)
  return false, path .. ": " .. f.text, path
end

--- A copy of this record schema that rejects keys it does not list.
---@return am2z.Schema
function Schema:strict()
  if self.kind ~= "record" then
    error("types: strict() applies to records only, got " .. tostring(self.kind), 2)
  end
  return buildRecord(self.fields, true)
end

local function describe(s, depth)
  local k = s.kind
  if k == "record" then
    local prefix = s.isStrict and "strict record" or "record"
    if depth > 0 then return prefix .. "{...}" end
    local parts = {}
    for i = 1, #s.names do
      parts[i] = s.names[i] .. ": " .. describe(s.schemas[i], depth + 1)
    end
    return prefix .. "{" .. concat(parts, ", ") .. "}"
  elseif k == "array" then
    return "array<" .. describe(s.item, depth) .. ">"
  elseif k == "map" then
    return "map<" .. describe(s.key, depth) .. ", " .. describe(s.value, depth) .. ">"
  elseif k == "optional" then
    local inner = describe(s.inner, depth)
    if s.inner.kind == "union" then inner = "(" .. inner .. ")" end
    return inner .. "?"
  elseif k == "union" then
    local parts = {}
    for i = 1, #s.options do parts[i] = describe(s.options[i], depth) end
    return concat(parts, " | ")
  elseif k == "enum" then
    local parts = {}
    for i = 1, #s.values do parts[i] = literalText(s.values[i]) end
    return "enum{" .. concat(parts, ", ") .. "}"
  elseif k == "literal" then
    return literalText(s.value)
  end
  return k
end

--- A short human-readable form, e.g. `record{items: array<record{...}>, name: string}`.
--- Nested records are abbreviated to keep it one line.
---@return string
function Schema:describe()
  return describe(self, 0)
end

Schema.__tostring = function(s) return "schema " .. describe(s, 0) end

-- t.string() is the zod habit; say what to write instead of the bare
-- "attempt to call a table value".
local primitive = { string = true, number = true, integer = true, boolean = true, any = true }
Schema.__call = function(s)
  if primitive[s.kind] then
    error(format("types.%s is a schema, not a constructor: write t.%s, not t.%s()", s.kind, s.kind, s.kind), 2)
  end
  error("types: a schema is not callable (" .. describe(s, 0) .. ")", 2)
end

return M
