-- spec/router_spec.lua: route matching (literal, parameters, splats), HEAD through GET, the Allow
-- list for 405, and pattern errors.
local router = require "moonlet.router"

local function h(name) return function() return name end end

describe("moonlet.router", function()
    local r
    before_each(function()
        r = router.new()
        r:add("GET", "/", h("root"))
        r:add("GET", "/users/:id", h("user"))
        r:add("PUT", "/users/:id", h("put user"))
        r:add("GET", "/users/:id/posts/:post", h("post"))
        r:add("GET", "/files/*path", h("files"))
        r:add("*", "/any", h("any"))
        r:add("POST", "/form", h("form"))
    end)

    it("matches literal paths with one lookup", function()
        local f, params = r:match("GET", "/")
        assert.same("root", f())
        assert.is_nil(params)
    end)

    it("binds and decodes named parameters", function()
        local f, params = r:match("GET", "/users/a%20b/posts/7")
        assert.same("post", f())
        assert.same({ id = "a b", post = "7" }, params)
    end)

    it("does not let an encoded slash split a segment", function()
        local f, params = r:match("GET", "/users/a%2Fb")
        assert.same("user", f())
        assert.same({ id = "a/b" }, params)
    end)

    it("matches a literal segment written percent-encoded", function()
        r:add("GET", "/café/:id", h("cafe"))
        local f, params = r:match("GET", "/caf%C3%A9/1")
        assert.same({ "cafe", { id = "1" } }, { f(), params })
        f, params = r:match("GET", "/%75sers/2")
        assert.same({ "user", { id = "2" } }, { f(), params })
        assert.is_nil((r:match("GET", "/users%2F3")))
    end)

    it("does not match an empty parameter or extra segments", function()
        assert.is_nil((r:match("GET", "/users/")))
        assert.is_nil((r:match("GET", "/users/1/extra")))
    end)

    it("gives a splat the rest of the path", function()
        local _, params = r:match("GET", "/files/a/b/c.txt")
        assert.same({ path = "a/b/c.txt" }, params)
        _, params = r:match("GET", "/files/")
        assert.same({ path = "" }, params)
        local deep = ("/x"):rep(3000)
        _, params = r:match("GET", "/files" .. deep)
        assert.same({ path = deep:sub(2) }, params)
    end)

    it("gives the same answers once LuaJIT has compiled the matching", function()
        for i = 1, 300 do
            local name, params = r:match("GET", "/users/" .. i .. "/posts/p" .. i)
            assert.same("post", name())
            assert.same({ id = tostring(i), post = "p" .. i }, params)
            assert.is_nil((r:match("GET", "/users/" .. i .. "/posts")))
            assert.same("user", (r:match("GET", "/users/" .. i))())
        end
    end)

    it("leaves no loop in the caller's trace: matching a parameter, reading a short query", function()
        -- a request's dispatcher runs both in its root trace: a loop there aborts the trace (an
        -- inner loop in a root trace), and the request is interpreted. (The loop unroll limit is
        -- not checked: whether LuaJIT unrolls a tail recursion that far depends on the order in
        -- which it records and on its hot counters, which differ from one process to the next.)
        if not jit.status() then return pending("the JIT is off") end
        local vmdef, jutil = require "jit.vmdef", require "jit.util"
        local url = require "moonlet.url"
        local mine = {
            ["@" .. package.searchpath("moonlet.router", package.path)] = true,
            ["@" .. package.searchpath("moonlet.url", package.path)] = true,
        }
        local found = {}
        local function on_trace(what, _, func, pc, otr, oex)
            if what ~= "abort" then return end
            local fi = jutil.funcinfo(func, pc)
            local fmt = vmdef.traceerr[otr]
            if mine[fi.source] and fmt == "inner loop in root trace" then
                found[#found + 1] = fi.source:match("[^/]*$") .. ":" .. fi.currentline .. ": "
                    .. fmt:format(oex)
            end
        end
        local function caller(i) -- hot: LuaJIT records it, and what it calls with it
            local f, params = r:match("GET", "/users/" .. i .. "/posts/p" .. i)
            local q = url.parse_query("q=" .. i .. "&page=2")
            return f() == "post" and params.id == q.q and q.page == "2"
        end
        jit.attach(on_trace, "trace")
        local ok, err = pcall(function()
            for i = 1, 300 do assert(caller(i)) end
        end)
        jit.attach(on_trace)
        assert(ok, err)
        assert.same({}, found)
    end)

    it("serves HEAD with the GET handler", function()
        assert.same("user", (r:match("HEAD", "/users/1"))())
    end)

    it("matches any method on a * route", function()
        assert.same("any", (r:match("PATCH", "/any"))())
    end)

    it("lists the allowed methods when only the method is wrong", function()
        assert.same({ nil, nil, "GET, HEAD, PUT" }, { r:match("DELETE", "/users/1") })
        assert.same({ nil, nil, "POST" }, { r:match("GET", "/form") })
        assert.same({}, { r:match("GET", "/nowhere") })
    end)

    it("refuses patterns that do not start with / and splats not at the end", function()
        assert.has_error(function() r:add("GET", "users", h("x")) end)
        assert.has_error(function() r:add("GET", "/a/*rest/b", h("x")) end)
    end)
end)
