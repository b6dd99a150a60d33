-- spec/url_for_spec.lua: named routes and app:url_for: params and splats filled in and encoded so
-- that the server routes the path back to the same values (over a real socket), queries, mounted
-- apps' names with their prefix, and the errors (unknown name, missing parameter, a name taken).
local moonlet = require "moonlet"
local test = require "moonlet.test"

local serve = test.serving

describe("app:url_for", function()
    it("fills params and splats so that the route gets them back, and appends a query", function()
        local app = moonlet.app()
        app:get("/users/:id", function(req) return "user " .. req.params.id end, { name = "user" })
        app:get("/files/*path", function(req) return "file " .. req.params.path end, { name = "file" })
        app:get("/", function() return "home" end, { name = "home" })
        app:get("/go", function(_, res) return res:redirect(app:url_for("user", { id = "a/b c" })) end)
        local port = serve(app)
        assert.same("/", app:url_for("home"))
        assert.same("/users/42", app:url_for("user", { id = 42 }))
        assert.same("/users/a%2Fb%20c", app:url_for("user", { id = "a/b c" }))
        assert.same("/users/7?flag&q=a%20b&tag=x&tag=y", app:url_for("user", { id = 7 },
                    { q = "a b", tag = { "x", "y" }, flag = true, no = false }))
        assert.same("/files/docs/a%20b.txt", app:url_for("file", { path = "docs/a b.txt" }))
        assert.same("/users/123456789012345?n=9007199254740992",
                    app:url_for("user", { id = 123456789012345 }, { n = 2 ^ 53 }))
        assert.same("/users/-7", app:url_for("user", { id = require("ffi").new("int64_t", -7) }))
        assert.has_error(function() app:url_for("file", { path = "a/../b" }) end,
                         'moonlet: url_for("file"): path cannot be "a/../b"')
        assert.same("user a/b c", test.request(port, "GET", app:url_for("user", { id = "a/b c" })).body)
        assert.same("file docs/a b.txt",
                    test.request(port, "GET", app:url_for("file", { path = "docs/a b.txt" })).body)
        local r = test.request(port, "GET", "/go")
        assert.same({ 302, "/users/a%2Fb%20c" }, { r.status, r.headers["location"] })
    end)

    it("names a route for every method of one pattern, and any, route and websocket routes", function()
        local app = moonlet.app()
        app:get("/items/:n", function() return "get" end, { name = "item" })
        app:post("/items/:n", function() return "post" end, { name = "item" })
        app:any("/any/:x", function() return "any" end, { name = "any" })
        app:route({ "PUT", "PATCH" }, "/r/:x", function() return "r" end, { name = "r" })
        app:websocket("/ws/:room", function() end, { name = "room" })
        assert.same({ "/items/1", "/any/2", "/r/3", "/ws/lobby" },
                    { app:url_for("item", { n = 1 }), app:url_for("any", { x = 2 }),
                      app:url_for("r", { x = 3 }), app:url_for("room", { room = "lobby" }) })
    end)

    it("finds a mounted app's names with the mount's prefix; req:url_for in a mounted app's handler",
       function()
        local v1 = moonlet.app()
        v1:get("/things/:id", function(req) return req.prefix end, { name = "thing" })
        local api = moonlet.app()
        api:get("/items/:n", function(req)
            return req:url_for("item", { n = req.params.n + 1 }) .. " " .. req:url_for("thing", { id = 1 })
        end, { name = "item" })
        api:mount("/v1", v1)
        local app = moonlet.app()
        app:get("/", function() return "home" end, { name = "home" })
        app:mount("/api", api)
        local port = serve(app)
        assert.same("/api/items/3", app:url_for("item", { n = 3 }))
        assert.same("/api/v1/things/x", app:url_for("thing", { id = "x" }))
        assert.same("/items/3", api:url_for("item", { n = 3 }))
        assert.same("/api/items/5 /api/v1/things/1",
                    test.request(port, "GET", app:url_for("item", { n = 4 })).body)
        assert.same("/api/v1", test.request(port, "GET", app:url_for("thing", { id = "y" })).body)
    end)

    it("tells two mounted apps' routes of one name apart by the mounts' names (\"admin.index\")",
       function()
        local function sub(tag)
            local a = moonlet.app()
            a:get("/", function(req) return tag .. " " .. req:url_for("index") end, { name = "index" })
            a:get("/p/:id", function() return tag end, { name = "page" })
            return a
        end
        local inner = moonlet.app()
        inner:get("/deep", function() return "deep" end, { name = "index" })
        local blog = sub("blog")
        blog:mount("/inner", inner, { name = "inner" })
        local app = moonlet.app()
        app:get("/", function() return "home" end, { name = "index" })
        app:mount("/admin", sub("admin"), { name = "admin" })
        app:mount("/blog", blog, { name = "blog" })
        local port = serve(app)
        assert.same("/", app:url_for("index")) -- the app's own name first
        assert.same("/admin/", app:url_for("admin.index"))
        assert.same("/blog/", app:url_for("blog.index"))
        assert.same("/blog/p/7", app:url_for("blog.page", { id = 7 }))
        assert.same("/admin/p/7", app:url_for("page", { id = 7 })) -- unqualified: the first mount
        assert.same("/blog/inner/deep", app:url_for("blog.inner.index"))
        assert.same("blog /blog/", test.request(port, "GET", "/blog/").body) -- req:url_for: its app
        assert.same("admin /admin/", test.request(port, "GET", "/admin/").body)
        assert.has_error(function() app:url_for("shop.index") end, 'moonlet: no route is named "shop.index"')
        assert.has_error(function() app:url_for("admin.nothing") end,
                         'moonlet: no route is named "admin.nothing"')
        assert.has_error(function() app:mount("/x", sub("x"), { name = "admin" }) end,
                         'moonlet: the mount name "admin" is taken')
        assert.has_error(function() app:mount("/y", sub("y"), { name = "a.b" }) end,
                         "moonlet: a mount name is a non-empty string without a dot")
    end)

    it("raises for an unknown name, a missing parameter and a name given to two patterns", function()
        local app = moonlet.app()
        app:get("/users/:id", function() end, { name = "user" })
        assert.has_error(function() app:url_for("nobody") end, 'moonlet: no route is named "nobody"')
        assert.has_error(function() app:url_for("user", {}) end,
                         'moonlet: url_for("user") wants a value for id')
        assert.has_error(function() app:get("/people/:id", function() end, { name = "user" }) end,
                         'moonlet: the route name "user" is taken by /users/:id')
        assert.has_error(function() app:get("/x", function() end, { name = 5 }) end,
                         "moonlet: a route name is a non-empty string")
        assert.has_error(function() app:url_for("user", { id = "" }) end,
                         'moonlet: url_for("user"): id cannot be ""')
        assert.has_error(function() app:url_for("user", { id = ".." }) end,
                         'moonlet: url_for("user"): id cannot be ".."')
        assert.has_error(function() app:url_for("user", { id = 1 }, "q=1") end,
                         "moonlet: url_for's query is a table")
        -- a route refused for its pattern leaves its name free
        assert.has_error(function() app:get("no-slash", function() end, { name = "bad" }) end)
        assert.has_error(function() app:url_for("bad") end, 'moonlet: no route is named "bad"')
    end)
end)
