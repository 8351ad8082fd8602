-- am2z.json: cjson's encoding with every number exact (Debian's lua-cjson
-- writes 14 significant digits), used wherever a state crosses Redis.
local json = require("am2z.json")
local cjson = require("cjson")

describe("am2z.json", function()
  it("round-trips numbers that need 15-17 digits, and keeps short ones short", function()
    local v = { id = 123456789012345, big = 2 ^ 53, third = 1 / 3, sum = 0.1 + 0.2, tenth = 0.1,
                neg = -0.1 - 0.2, tiny = 5e-324, huge = 1e300, list = { 1, 2.5, 123456789012345678 } }
    local back = cjson.decode(json.encode(v))
    assert.are.same(v, back)
    assert.matches('"tenth":0.1[,}]', json.encode(v))
    assert.are.equal("123456789012345", json.encode(123456789012345))
  end)

  it("leaves the caller's tables alone and keeps shared subtables shared", function()
    local shared = { x = 1 / 3 }
    local v = { a = shared, b = shared }
    local s = json.encode(v)
    assert.are.equal(1 / 3, v.a.x)
    assert.are.equal(shared, v.a)
    local back = cjson.decode(s)
    assert.are.equal(1 / 3, back.a.x)
    assert.are.equal(1 / 3, back.b.x)
  end)

  it("strings that look like its placeholders stay strings", function()
    local v = { s = "\1am2z#1\1", ["\1am2z#2\1"] = 1, n = 0.1 + 0.2 }
    local back = cjson.decode(json.encode(v))
    assert.are.same(v, back)
  end)

  it("a cycle fails at once as cjson fails (no exponential walk)", function()
    local t = {}
    t[1], t[2] = t, t
    local ok, err = pcall(json.encode, t)
    assert.is_false(ok)
    assert.matches("nesting", tostring(err))
  end)

  it("tables with a protected metatable encode", function()
    local p = setmetatable({ 1.0000000000000002 }, { __metatable = "locked" })
    assert.are.equal("[[1.0000000000000002]]", json.encode({ p }))
  end)
end)
