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
        assert.same({ { a = "1", b = "2" }, { a = { "1" }, b = { "2" } }, true },
                    { url.parse_query("a=1&&b=2&c=3", 2) })
        assert.same({ { a = "1" }, { a = { "1" } } }, { url.parse_query("&a=1&", 2) })
        local pairs_, want = {}, {}
        for i = 1, 5000 do -- (a tail call per pair: no stack growth)
            pairs_[i] = "k" .. i .. "=" .. i
            want["k" .. i] = tostring(i)
        end
        assert.same(want, (url.parse_query(table.concat(pairs_, "&"))))
        for _ = 1, 200 do -- the same answers once LuaJIT has compiled it
            assert.same({ { q = "x y" }, { q = { "x y" } } }, { url.parse_query("q=x+y") })
        end
    end)

    it("splits a path into segments", function()
        assert.same({}, url.split_path("/"))
        assert.same({ "a", "b" }, url.split_path("/a/b"))
        assert.same({ "a", "" }, url.split_path("/a/"))
        assert.same({ "a", "", "b" }, url.split_path("/a//b"))
        assert.same({ "", "" }, url.split_path("//"))
        local many = {}
        for i = 1, 5000 do many[i] = tostring(i) end -- (a long path splits whole)
        assert.same(many, url.split_path("/" .. table.concat(many, "/")))
        for _ = 1, 200 do -- the same answers once LuaJIT has compiled it
            assert.same({ "users", "42" }, url.split_path("/users/42"))
            assert.same({ "a", "b", "" }, url.split_path("/a/b/"))
        end
    end)

    -- RFC 3986 5.4: every example, normal and abnormal, from the base "http://a/b/c/d;p?q"
    it("resolves references against a base as RFC 3986 5.4's examples do", function()
        local examples = {
            -- 5.4.1 normal
            { "g:h", "g:h" }, { "g", "http://a/b/c/g" }, { "./g", "http://a/b/c/g" },
            { "g/", "http://a/b/c/g/" }, { "/g", "http://a/g" }, { "//g", "http://g" },
            { "?y", "http://a/b/c/d;p?y" }, { "g?y", "http://a/b/c/g?y" },
            { "#s", "http://a/b/c/d;p?q#s" }, { "g#s", "http://a/b/c/g#s" },
            { "g?y#s", "http://a/b/c/g?y#s" }, { ";x", "http://a/b/c/;x" },
            { "g;x", "http://a/b/c/g;x" }, { "g;x?y#s", "http://a/b/c/g;x?y#s" },
            { "", "http://a/b/c/d;p?q" }, { ".", "http://a/b/c/" }, { "./", "http://a/b/c/" },
            { "..", "http://a/b/" }, { "../", "http://a/b/" }, { "../g", "http://a/b/g" },
            { "../..", "http://a/" }, { "../../", "http://a/" }, { "../../g", "http://a/g" },
            -- 5.4.2 abnormal
            { "../../../g", "http://a/g" }, { "../../../../g", "http://a/g" },
            { "/./g", "http://a/g" }, { "/../g", "http://a/g" },
            { "g.", "http://a/b/c/g." }, { ".g", "http://a/b/c/.g" },
            { "g..", "http://a/b/c/g.." }, { "..g", "http://a/b/c/..g" },
            { "./../g", "http://a/b/g" }, { "./g/.", "http://a/b/c/g/" },
            { "g/./h", "http://a/b/c/g/h" }, { "g/../h", "http://a/b/c/h" },
            { "g;x=1/./y", "http://a/b/c/g;x=1/y" }, { "g;x=1/../y", "http://a/b/c/y" },
            { "g?y/./x", "http://a/b/c/g?y/./x" }, { "g?y/../x", "http://a/b/c/g?y/../x" },
            { "g#s/./x", "http://a/b/c/g#s/./x" }, { "g#s/../x", "http://a/b/c/g#s/../x" },
            { "http:g", "http:g" }, -- strict
        }
        local got, want = {}, {}
        for i, e in ipairs(examples) do
            got[i] = e[1] .. " -> " .. url.resolve("http://a/b/c/d;p?q", e[1])
            want[i] = e[1] .. " -> " .. e[2]
        end
        assert.same(want, got)
        -- a base with a fragment of its own, and one with an authority and an empty path
        assert.same("http://a/b?q", url.resolve("http://a/b?q#f", ""))
        assert.same("http://a/b?q#g", url.resolve("http://a/b?q#f", "#g"))
        assert.same("http://a/g", url.resolve("http://a", "g"))
        assert.same("http://a/a/b/c", url.resolve("http://a/x", string.rep("/.", 3) .. "/a/b/c"))
    end)

    it("percent-encodes the bytes a URI may not hold and leaves the rest", function()
        assert.same("/a%20b/%C3%BC?x=%3Cy%3E%7C%22&z=%41#f%5E",
            url.encode_uri("/a b/\195\188?x=<y>|\"&z=%41#f^"))
        local uri = "http://u@h:1/p;q=1/!$&'()*+,=~-._?a[0]=%20#x"
        assert.same(uri, url.encode_uri(uri))
    end)
end)
