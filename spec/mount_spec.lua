-- spec/mount_spec.lua: app:mount over real sockets: a sub-app's routes, middleware order, 404 and
-- 405 inside it, params and req.prefix, nested mounts, deadlines, on_error, static files, and the
-- setup errors (bad prefix, not an app, a cycle).
local moonlet = require "moonlet"
local test = require "moonlet.test"

local serve = test.serving

local function get(port, path, method, body)
    return test.request(port, method or "GET", path, { body = body })
end

-- a middleware that adds its name to X-Trace, outermost first
local function tracer(name)
    return function(_, res, next)
        local r = next()
        local t = res._trace or {}
        table.insert(t, 1, name)
        res._trace = t
        res:header("X-Trace", table.concat(t, ","))
        return r
    end
end

describe("app:mount", function()
    it("serves a sub-app's routes under the prefix, the path given whole and the prefix apart", function()
        local api = moonlet.app()
        api:get("/", function(req) return "api root " .. req.path .. " [" .. req.prefix .. "]" end)
        api:get("/users/:id", function(req)
            return { id = req.params.id, path = req.path, prefix = req.prefix, q = req.query.q }
        end)
        api:post("/users", function(req) return 201, "made " .. req:body() end)
        local app = moonlet.app()
        app:get("/", function(req) return "home [" .. req.prefix .. "]" end)
        app:mount("/api/", api) -- a trailing slash is taken off
        local port = serve(app)
        assert.same({ 200, "home []" }, { get(port, "/").status, get(port, "/").body })
        assert.same("api root /api [/api]", get(port, "/api").body)
        assert.same("api root /api/ [/api]", get(port, "/api/").body)
        assert.same("api root /api [/api]", get(port, "/%61pi").body) -- the prefix encoded, whole
        local r = get(port, "/api/users/a%20b?q=1")
        assert.same({ id = "a b", path = "/api/users/a b", prefix = "/api", q = "1" },
                    moonlet.json.decode(r.body))
        r = get(port, "/api/users", "POST", "x")
        assert.same({ 201, "made x" }, { r.status, r.body })
        assert.same(404, get(port, "/apix").status) -- a prefix is whole segments
        assert.same(404, get(port, "/api/nope").status)
        r = get(port, "/api/users/1", "DELETE")
        assert.same({ 405, "GET, HEAD" }, { r.status, r.headers["allow"] })
        r = get(port, "/api/users/1", "HEAD")
        assert.same({ 200, "" }, { r.status, r.body })
    end)

    it("matches literal segments and prefixes a client percent-encoded (/caf%C3%A9/1 for /café/1)",
       function()
        local sub = moonlet.app()
        sub:get("/users/:id", function(req) return req.prefix .. " " .. req.path .. " " .. req.params.id end)
        local app = moonlet.app()
        app:get("/café/:id", function(req) return "café " .. req.params.id end)
        app:mount("/données", sub)
        app:mount("/api", sub)
        local port = serve(app)
        local function answer(path)
            local r = get(port, path)
            return r.status .. " " .. r.body
        end
        assert.same("200 café 1", answer("/caf%C3%A9/1"))
        assert.same("200 café 2", answer("/caf%c3%a9/2"))
        assert.same("200 /données /données/users/7 7", answer("/donn%C3%A9es/users/7"))
        assert.same("200 /api /api/users/8 8", answer("/%61pi/users/8"))
        assert.same("404 404 Not Found\n", answer("/caf%C3%A9%2F1")) -- an encoded / splits nothing
        assert.same("404 404 Not Found\n", answer("/donn%C3%A9es%2Fusers/7"))
    end)

    it("runs the outer app's middleware, then the sub-app's (404s included), and others only theirs",
       function()
        local api = moonlet.app()
        api:use(tracer("api"))
        api:get("/x", function() return "x" end)
        local app = moonlet.app()
        app:use(tracer("outer"))
        app:mount("/api", api)
        app:get("/y", function() return "y" end)
        app:use(tracer("late")) -- used after the mount: in the chain all the same
        local port = serve(app)
        local r = get(port, "/api/x")
        assert.same({ 200, "x", "outer,late,api" }, { r.status, r.body, r.headers["x-trace"] })
        r = get(port, "/api/none")
        assert.same({ 404, "outer,late,api" }, { r.status, r.headers["x-trace"] })
        r = get(port, "/y")
        assert.same({ 200, "outer,late" }, { r.status, r.headers["x-trace"] })
        api:use(tracer("api2")) -- and the sub-app's later ones too
        r = get(port, "/api/x")
        assert.same("outer,late,api,api2", r.headers["x-trace"])
    end)

    it("lets an outer route added first win, and mounts within mounts", function()
        local v1 = moonlet.app()
        v1:get("/items/:n", function(req) return req.prefix .. ":" .. req.params.n end)
        local api = moonlet.app()
        api:mount("/v1", v1)
        api:get("/health", function() return "api health" end)
        local app = moonlet.app()
        app:get("/api/health", function() return "outer health" end)
        app:mount("/api", api)
        local port = serve(app)
        assert.same("outer health", get(port, "/api/health").body)
        assert.same("/api/v1:7", get(port, "/api/v1/items/7").body)
        assert.same(404, get(port, "/api/v2/items/7").status)
        local alone = serve(api) -- a mounted app serves on its own too
        assert.same({ "api health", "/v1:8" }, { get(alone, "/health").body, get(alone, "/v1/items/8").body })
    end)

    it("answers 405 with the methods of the outer routes and the sub-app's for a path both have",
       function()
        local api = moonlet.app()
        api:put("/things", function() return "api put" end)
        api:get("/only-inner", function() return "inner" end)
        local app = moonlet.app()
        app:get("/api/health", function() return "outer health" end)
        app:get("/api/things", function() return "outer things" end)
        app:get("/api/items/:n", function(req) return "item " .. req.params.n end)
        app:mount("/api", api)
        app:get("/api/later/:n", function() return "never: the mount took /api/*" end)
        app:route("*", "/api/any/:n", function() return "never either" end)
        local port = serve(app)
        local r = get(port, "/api/health", "POST", "x")
        assert.same({ 405, "GET, HEAD" }, { r.status, r.headers["allow"] })
        r = get(port, "/api/items/3", "DELETE")
        assert.same({ 405, "GET, HEAD" }, { r.status, r.headers["allow"] })
        r = get(port, "/api/things", "POST", "x") -- GET outside, PUT inside
        assert.same({ 405, "GET, HEAD, PUT" }, { r.status, r.headers["allow"] })
        assert.same("api put", get(port, "/api/things", "PUT", "x").body)
        assert.same("outer things", get(port, "/api/things").body)
        r = get(port, "/api/only-inner", "POST", "x")
        assert.same({ 405, "GET, HEAD" }, { r.status, r.headers["allow"] })
        assert.same(404, get(port, "/api/nothing", "POST", "x").status)
        -- pattern routes added after the mount are behind it: they count for nothing
        assert.same(404, get(port, "/api/later/1").status)
        assert.same(404, get(port, "/api/later/1", "POST", "x").status)
        -- the mount's own path takes every method: a pattern route of the outer app that would
        -- match it is never tried, and its methods are no part of the Allow
        local m2 = moonlet.app()
        m2:get("/", function() return "m2 root" end)
        app:post("/:section", function() return "a section" end)
        app:mount("/m2", m2)
        r = get(port, "/m2", "POST", "x")
        assert.same({ 405, "GET, HEAD" }, { r.status, r.headers["allow"] })
        api:post("/any/:n", function() return "inner post" end)
        r = get(port, "/api/any/1")
        assert.same({ 405, "POST" }, { r.status, r.headers["allow"] })
    end)

    it("takes the sub-app's deadline and on_error, else the outer app's", function()
        local errs = moonlet.app()
        errs:get("/boom", function() error("boom") end)
        local slow = moonlet.app({ deadline = 0.2 })
        slow:get("/wait", function() moonlet.sleep(5); return "late" end)
        slow:get("/quick", function() moonlet.sleep(0.3); return "ok" end, { deadline = 2 })
        local mine = moonlet.app()
        mine:on_error(function() return 503, "sub error page" end)
        mine:get("/boom", function() error("boom") end)
        local app = moonlet.app({ deadline = 3 })
        app:on_error(function() return 500, "outer error page" end)
        app:mount("/errs", errs):mount("/slow", slow):mount("/mine", mine)
        local port = serve(app)
        local t = moonlet.now()
        local r = get(port, "/slow/wait")
        assert.same(504, r.status)
        assert.is_true(moonlet.now() - t < 2)
        assert.same({ 200, "ok" }, { get(port, "/slow/quick").status, get(port, "/slow/quick").body })
        r = get(port, "/errs/boom")
        assert.same({ 500, "outer error page" }, { r.status, r.body })
        r = get(port, "/mine/boom")
        assert.same({ 503, "sub error page" }, { r.status, r.body })
    end)

    it("keeps a mounted WebSocket session alive past the outer app's deadline", function()
        local live = moonlet.app()
        live:websocket("/echo", function(ws, req)
            for msg, kind in ws:messages() do ws:send(msg .. " @" .. req.prefix, kind) end
        end)
        local app = moonlet.app({ deadline = 0.2 })
        app:mount("/live", live)
        local port = serve(app)
        local ws = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/live/echo", { timeout = 5 }))
        test.defer(function() ws:close() end)
        moonlet.sleep(0.4)
        assert(ws:send("hi"))
        assert.same("hi @/live", (ws:receive()))
    end)

    it("serves a sub-app's static files, and an app mounted at the root", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(moonlet.fs.mkdir(dir))
        test.defer(function() os.remove(dir .. "/a.txt"); os.remove(dir) end)
        assert(moonlet.fs.write(dir .. "/a.txt", "static a\n"))
        local files = moonlet.app()
        files:static("/assets", dir)
        local app = moonlet.app()
        app:mount("/site", files)
        app:mount("/", moonlet.app():get("/z", function(req) return "root mount [" .. req.prefix .. "]" end))
        local port = serve(app)
        local r = get(port, "/site/assets/a.txt")
        assert.same({ 200, "static a\n", "text/plain; charset=utf-8" },
                    { r.status, r.body, r.headers["content-type"] })
        assert.same(404, get(port, "/site/assets/nope.txt").status)
        assert.same("root mount []", get(port, "/z").body)
    end)

    it("refuses a bad prefix, a value that is not an app, and a cycle, at setup", function()
        local a, b = moonlet.app(), moonlet.app()
        local function fails(fn, msg) assert.error_matches(fn, "^" .. msg .. "$") end
        fails(function() a:mount("api", b) end, "moonlet: a mount prefix starts with /: api")
        fails(function() a:mount("/users/:id", b) end,
              "moonlet: a mount prefix is a literal path, without :param or %*: /users/:id")
        fails(function() a:mount("/x", {}) end, "moonlet: app:mount wants an app made by moonlet%.app%(%)")
        a:mount("/b", b)
        fails(function() b:mount("/a", a) end, "moonlet: app:mount would make a cycle of apps")
        fails(function() a:mount("/self", a) end, "moonlet: app:mount would make a cycle of apps")
    end)
end)
