-- spec/json_spec.lua: JSON encoding and decoding, json.array for empty arrays, null.
local json = require "moonlet.json"

describe("moonlet.json", function()
    it("round-trips nested values", function()
        local v = { a = 1, b = { "x", "y" }, c = { d = true } }
        assert.same(v, json.decode(json.encode(v)))
    end)

    it("encodes a table marked with json.array as [] even when empty, at any depth", function()
        assert.same("[]", json.encode(json.array()))
        assert.same('{"items":[]}', json.encode({ items = json.array() }))
        assert.same('[[],[1]]', json.encode({ json.array(), json.array({ 1 }) }))
    end)

    it("leaves the caller's tables untouched", function()
        local inner = json.array()
        local v = { list = inner }
        json.encode(v)
        assert.equal(inner, v.list)
    end)

    it("returns nil, err for bad input instead of raising", function()
        local v, err = json.decode("{nope")
        assert.is_nil(v)
        assert.is_string(err)
        assert.is_nil((json.encode({ f = print })))
    end)

    it("decodes null as json.null", function()
        assert.equal(json.null, json.decode('{"a":null}').a)
    end)
end)
