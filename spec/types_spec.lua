--[[
Specs for am2z.types: the messages and paths here are what users see in a
ValidationError from withState, so they are asserted exactly.
]]

local t = require("am2z.types")
local cjson = require("cjson")

-- validate's three results as one table, so a failing assertion shows them all.
local function check(schema, value)
  local ok, msg, path = schema:validate(value)
  return { ok = ok, msg = msg, path = path }
end

local function fails(schema, value, msg, path)
  local r = check(schema, value)
  assert.are.same({ ok = false, msg = msg, path = path }, r)
end

local function passes(schema, value)
  assert.are.same({ ok = true }, check(schema, value))
end

local function raises(fn, text)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  assert.is_truthy(string.find(tostring(err), text, 1, true),
    "expected error containing: " .. text .. "\ngot: " .. tostring(err))
end

describe("am2z.types", function()
  describe("primitives", function()
    it("are schema values, not functions", function()
      for _, name in ipairs({ "string", "number", "integer", "boolean", "any" }) do
        assert.is_true(t.isSchema(t[name]), name)
      end
      raises(function() return t.string() end, "write t.string, not t.string()")
    end)

    it("accept their type and name the Lua type otherwise", function()
      passes(t.string, "")
      passes(t.number, 1.5)
      passes(t.integer, -3)
      passes(t.boolean, false)
      fails(t.string, 5, "state: expected string, got number", "state")
      fails(t.number, "5", "state: expected number, got string", "state")
      fails(t.boolean, nil, "state: expected boolean, got nil", "state")
      fails(t.boolean, 0, "state: expected boolean, got number", "state")
    end)

    it("integer shows the offending number", function()
      fails(t.integer, 1.5, "state: expected integer, got 1.5", "state")
      fails(t.integer, "1", "state: expected integer, got string", "state")
      assert.is_false((t.integer:validate(math.huge)))
      assert.is_false((t.integer:validate(0 / 0)))
    end)

    it("any accepts everything, nil included", function()
      passes(t.any, nil)
      passes(t.any, print)
      passes(t.any, {})
    end)

    it("names JSON null as null", function()
      fails(t.string, cjson.null, "state: expected string, got null", "state")
    end)
  end)

  describe("enum and literal", function()
    local color = t.enum({ "red", "green" })

    it("accepts listed values only", function()
      passes(color, "red")
      fails(color, "blue", 'state: expected one of "red", "green", got "blue"', "state")
      fails(color, 3, 'state: expected one of "red", "green", got 3', "state")
      fails(color, {}, 'state: expected one of "red", "green", got table', "state")
    end)

    it("also takes varargs", function()
      passes(t.enum("a", "b"), "b")
    end)

    it("literal matches one exact value", function()
      passes(t.literal("v1"), "v1")
      passes(t.literal(2), 2)
      fails(t.literal("v1"), "v2", 'state: expected "v1", got "v2"', "state")
      fails(t.literal(2), "2", "state: expected 2, got string", "state")
    end)
  end)

  describe("records", function()
    local user = t.record({
      name = t.string,
      address = t.record({ city = t.string, zip = t.optional(t.string) }),
    })

    it("accept matching values and extra keys (open by default)", function()
      passes(user, { name = "ada", address = { city = "London" }, extra = true })
    end)

    it("report a non-table at the top as state", function()
      fails(user, "ada", "state: expected record, got string", "state")
    end)

    it("report missing required fields as got nil, with dotted paths", function()
      fails(user, { address = { city = "x" } }, "name: expected string, got nil", "name")
      fails(user, { name = "ada", address = {} },
        "address.city: expected string, got nil", "address.city")
      fails(user, { name = "ada", address = { city = "x", zip = 1 } },
        "address.zip: expected string, got number", "address.zip")
    end)

    it("report deep paths through records", function()
      local s = t.record({ user = user })
      fails(s, { user = { name = "a", address = { city = false } } },
        "user.address.city: expected string, got boolean", "user.address.city")
    end)

    it("strict() rejects extra keys and leaves the original open", function()
      local strict = user:strict()
      passes(strict, { name = "a", address = { city = "x", other = 1 } })
      fails(strict, { name = "a", address = { city = "x" }, extra = 1 },
        "extra: unexpected field", "extra")
      passes(user, { name = "a", address = { city = "x" }, extra = 1 })
      local items = t.array(t.record({ id = t.integer }):strict())
      fails(items, { { id = 1, extra = "x" } },
        "state[1].extra: unexpected field", "state[1].extra")
      local s = t.record({ items = items })
      fails(s, { items = { { id = 1 }, { id = 2, b = 1, a = 2 } } },
        "items[2].a: unexpected field", "items[2].a")
    end)

    it("report the first failing field in name order", function()
      local s = t.record({ b = t.string, a = t.string })
      fails(s, {}, "a: expected string, got nil", "a")
    end)
  end)

  describe("arrays", function()
    local order = t.record({
      items = t.array(t.record({ price = t.number, qty = t.integer })),
    })

    it("accept sequences, including the empty table", function()
      passes(order, { items = {} })
      passes(order, { items = { { price = 1, qty = 1 }, { price = 2.5, qty = 3 } } })
    end)

    it("report element paths with 1-based indices", function()
      fails(order, { items = { { price = 1, qty = 1 }, { price = "9", qty = 1 } } },
        "items[2].price: expected number, got string", "items[2].price")
      fails(order, { items = { { price = 1, qty = 1.5 } } },
        "items[1].qty: expected integer, got 1.5", "items[1].qty")
      fails(t.array(t.number), { 1, "x" }, "state[2]: expected number, got string", "state[2]")
    end)

    it("reject tables that are not sequences", function()
      fails(order, { items = { [1] = { price = 1, qty = 1 }, [3] = { price = 1, qty = 1 } } },
        "items: expected array, got table", "items")
      fails(t.array(t.any), { 1, 2, x = 3 }, "state: expected array, got table", "state")
      fails(t.array(t.any), { [0] = 1 }, "state: expected array, got table", "state")
      fails(t.array(t.any), { [1.5] = 1 }, "state: expected array, got table", "state")
      fails(t.array(t.any), "x", "state: expected array, got string", "state")
    end)

    it("nest", function()
      fails(t.array(t.array(t.integer)), { { 1 }, { 2, 3.5 } },
        "state[2][2]: expected integer, got 3.5", "state[2][2]")
    end)
  end)

  describe("optional", function()
    it("allows nil and JSON null, checks anything else", function()
      local s = t.record({ note = t.optional(t.string) })
      passes(s, {})
      passes(s, { note = cjson.null })
      passes(s, { note = "x" })
      fails(s, { note = 1 }, "note: expected string, got number", "note")
    end)
  end)

  describe("maps", function()
    local scores = t.record({ scores = t.map(t.string, t.integer) })

    it("check every key and value", function()
      passes(scores, { scores = {} })
      passes(scores, { scores = { ada = 1, bob = 2 } })
      fails(scores, { scores = { ada = 1, bob = 2.5 } },
        "scores.bob: expected integer, got 2.5", "scores.bob")
      fails(scores, { scores = { ["with space"] = "x" } },
        'scores["with space"]: expected integer, got string', 'scores["with space"]')
      fails(scores, { scores = { [7] = 1 } },
        "scores[7]: expected key string, got number", "scores[7]")
      fails(scores, { scores = 3 }, "scores: expected map, got number", "scores")
    end)

    it("report the smallest failing key whatever the hash order", function()
      local m = t.map(t.string, t.number)
      local v = {}
      for i = 1, 50 do v["k" .. string.format("%02d", i)] = "bad" end
      fails(m, v, "k01: expected number, got string", "k01")
    end)

    it("enum keys", function()
      local m = t.map(t.enum({ "a", "b" }), t.any)
      passes(m, { a = 1 })
      fails(m, { c = 1 }, 'c: expected key one of "a", "b", got "c"', "c")
    end)
  end)

  describe("unions", function()
    it("accept a value matching any option", function()
      local s = t.union(t.string, t.number)
      passes(s, "x")
      passes(s, 1)
      fails(s, true, "state: expected string | number, got boolean", "state")
      passes(t.union({ t.string, t.boolean }), true)
    end)

    it("report the deepest failure of the nearest option", function()
      local s = t.record({
        payment = t.union(t.string, t.record({ amount = t.number })),
      })
      fails(s, { payment = { amount = "10" } },
        "payment.amount: expected number, got string", "payment.amount")
      fails(s, { payment = 5 },
        "payment: expected string | record, got number", "payment")
    end)

    it("work with literals as tagged variants", function()
      local ev = t.union(
        t.record({ type = t.literal("click"), x = t.number }),
        t.record({ type = t.literal("key"), code = t.string })
      )
      passes(ev, { type = "key", code = "Enter" })
      assert.is_false((ev:validate({ type = "scroll" })))
    end)
  end)

  describe("schema construction errors", function()
    it("names the constructor and what it got", function()
      raises(function() t.array(5) end, "types.array: expected a schema, got number")
      raises(function() t.optional(nil) end, "types.optional: expected a schema, got nil")
      raises(function() t.map(t.string, "x") end, "types.map: expected a schema for the value, got string")
      raises(function() t.union(t.string, 3) end, "types.union: expected a schema for option 2, got number")
      raises(function() t.union() end, "types.union: expected at least one schema")
      raises(function() t.literal({}) end, "types.literal: expected a string, number or boolean, got table")
    end)

    it("names the bad record field", function()
      raises(function() t.record({ name = "string" }) end,
        'types.record: expected a schema for field "name", got string')
      raises(function() t.record({ t.string }) end, "types.record: expected field names to be strings")
      raises(function() t.record("x") end, "types.record: expected a table of field schemas, got string")
    end)

    it("rejects an empty or invalid enum", function()
      raises(function() t.enum({}) end, "types.enum: expected a non-empty list of values")
      raises(function() t.enum({ "a", {} }) end, "types.enum: expected value 2 to be a string, number or boolean, got table")
    end)

    it("points the error at the caller (level 2)", function()
      local ok, err = pcall(function() t.array(5) end)
      assert.is_false(ok)
      assert.is_truthy(err:find("types_spec.lua:%d+: types.array"))
    end)

    it("strict() is for records only", function()
      raises(function() t.array(t.string):strict() end, "strict() applies to records only")
    end)
  end)

  describe("isSchema and describe", function()
    it("recognises schemas only", function()
      assert.is_true(t.isSchema(t.record({})))
      assert.is_false(t.isSchema({}))
      assert.is_false(t.isSchema("string"))
      assert.is_false(t.isSchema(nil))
    end)

    it("gives a short one-line description", function()
      local s = t.record({
        name = t.string,
        items = t.array(t.record({ price = t.number })),
        tags = t.optional(t.map(t.string, t.union(t.string, t.integer))),
        mode = t.enum({ "a", "b" }),
      })
      assert.are.equal(
        'record{items: array<record{...}>, mode: enum{"a", "b"}, name: string, tags: map<string, string | integer>?}',
        s:describe())
      assert.are.equal("strict record{id: integer}", t.record({ id = t.integer }):strict():describe())
      assert.are.equal("(string | number)?", t.optional(t.union(t.string, t.number)):describe())
    end)
  end)
end)
