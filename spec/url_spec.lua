-- spec/url_spec.lua: percent-decoding, query strings and path splitting.
local url = require "moonlet.url"

describe("moonlet.url", function()
    it("decodes %XX and leaves + alone in paths", function()
        assert.same("a b+c/ü", url.unescape("a%20b+c%2F%C3%BC"))
        assert.same("100%", url.unescape("100%"))
    end)

    it("trims white space at both ends only", function()
        assert.same("a b", url.trim("  a b\t "))
        assert.same("", url.trim(" \t "))
        assert.same("", url.trim(""))
        local inner = (" "):rep(30000)
        assert.same("x" .. inner .. "y", url.trim(inner .. "x" .. inner .. "y" .. inner))
    end)

    it("decodes + as a space in form values", function()
        assert.same("a b c", url.unescape_form("a+b%20c"))
    end)

    it("escapes all but unreserved characters", function()
        assert.same("a%20b%2Fc~d", url.escape("a b/c~d"))
    end)

    it("parses a query string keeping every value of a repeated key", function()
        local first, all = url.parse_query("a=1&b=x+y&a=2&flag&=empty&c=%26")
        assert.same({ a = "1", b = "x y", flag = "", [""] = "empty", c = "&" }, first)
        assert.same({ "1", "2" }, all.a)
        assert.same({}, (url.parse_query(nil)))
    end)

    it("splits a path into segments", function()
        assert.same({}, url.split_path("/"))
        assert.same({ "a", "b" }, url.split_path("/a/b"))
        assert.same({ "a", "" }, url.split_path("/a/"))
        assert.same({ "a", "", "b" }, url.split_path("/a//b"))
    end)
end)
