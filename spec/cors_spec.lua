-- spec/cors_spec.lua: moonlet.cors over real sockets: simple requests from allowed and refused
-- origins, preflights (methods, headers, credentials, max-age), Vary, and res:vary itself.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local function serve(opts)
    local app = moonlet.app()
    app:use(moonlet.cors(opts))
    app:get("/data", function(_, res) res:header("X-Total", "3"); return { 1, 2, 3 } end)
    app:put("/data", function() return "put" end)
    app:get("/boom", function(_, res) res:header("X-Partial", "dropped"); error("boom") end)
    local server, port = test.serve(app)
    test.defer(function() server:close() end)
    return port
end

local function request(port, method, path, headers)
    return test.request(port, method, path, { headers = headers })
end

local function preflight(port, origin, method, headers)
    return request(port, "OPTIONS", "/data", {
        Origin = origin, ["Access-Control-Request-Method"] = method,
        ["Access-Control-Request-Headers"] = headers })
end

describe("moonlet.cors", function()
    it("lets any origin read, with '*' and no Vary, by default", function()
        local port = serve()
        local r = request(port, "GET", "/data", { Origin = "https://a.example" })
        local h = r.headers
        assert.same({ 200, "*", nil, nil }, { r.status, h["access-control-allow-origin"], h["vary"],
                                              h["access-control-allow-credentials"] })
        r = request(port, "GET", "/data") -- not a cross-origin request: as it is
        assert.same({ 200, nil }, { r.status, r.headers["access-control-allow-origin"] })
        local p = preflight(port, "https://a.example", "PUT", "Content-Type, X-Token")
        h = p.headers
        assert.same({ 204, "*", "GET, HEAD, POST, PUT, PATCH, DELETE", "Content-Type, X-Token", "600" },
                    { p.status, h["access-control-allow-origin"], h["access-control-allow-methods"],
                      h["access-control-allow-headers"], h["access-control-max-age"] })
        assert.same("Access-Control-Request-Headers", p.headers["vary"])
    end)

    it("answers only the origins listed, echoing the origin, with Vary: Origin", function()
        local port = serve({ origins = { "https://app.example" }, expose = { "X-Total" } })
        local r = request(port, "GET", "/data", { Origin = "https://app.example" })
        assert.same({ 200, "https://app.example", "Origin", "X-Total" },
                    { r.status, r.headers["access-control-allow-origin"], r.headers["vary"],
                      r.headers["access-control-expose-headers"] })
        r = request(port, "GET", "/data", { Origin = "https://evil.example" }) -- served, without the header
        assert.same({ 200, nil, "Origin" },
                    { r.status, r.headers["access-control-allow-origin"], r.headers["vary"] })
        r = request(port, "GET", "/data") -- cacheable: the answer depends on Origin
        assert.same("Origin", r.headers["vary"])
        local p = preflight(port, "https://evil.example", "PUT")
        assert.same({ 403, nil }, { p.status, p.headers["access-control-allow-origin"] })
        p = preflight(port, "https://app.example", "PUT")
        assert.same({ 204, "https://app.example" }, { p.status, p.headers["access-control-allow-origin"] })
    end)

    it("checks a preflight's method and headers against the lists; credentials echo the origin", function()
        local port = serve({ origins = function(o) return o:find("%.example$") ~= nil end,
                             methods = { "GET", "PUT" }, headers = { "Content-Type" }, credentials = true,
                             max_age = 60 })
        local p = preflight(port, "https://x.example", "PUT", "content-type")
        local h = p.headers
        assert.same({ 204, "https://x.example", "true", "GET, PUT", "Content-Type", "60" },
                    { p.status, h["access-control-allow-origin"], h["access-control-allow-credentials"],
                      h["access-control-allow-methods"], h["access-control-allow-headers"],
                      h["access-control-max-age"] })
        assert.same(403, preflight(port, "https://x.example", "DELETE").status)
        assert.same(403, preflight(port, "https://x.example", "PUT", "X-Other").status)
        assert.same(403, preflight(port, "https://x.other", "PUT").status)
        local r = request(port, "GET", "/data", { Origin = "https://x.example" })
        assert.same({ "https://x.example", "true" },
                    { r.headers["access-control-allow-origin"],
                      r.headers["access-control-allow-credentials"] })
        -- a plain OPTIONS (no Access-Control-Request-Method) is not a preflight: the routes answer
        assert.same(405, request(port, "OPTIONS", "/data", { Origin = "https://x.example" }).status)
    end)

    it("keeps its headers on the server's 500 page, and only those", function()
        local port = serve({ origins = { "https://app.example/" } }) -- (a trailing slash is no path)
        local r = request(port, "GET", "/boom", { Origin = "https://APP.example" })
        assert.same({ 500, "https://APP.example", "Origin", nil },
                    { r.status, r.headers["access-control-allow-origin"], r.headers["vary"],
                      r.headers["x-partial"] })
    end)

    it("takes a truthy answer of an origins function as yes", function()
        local port = serve({ origins = function(o) return o:match("%.example$") end })
        local r = request(port, "GET", "/data", { Origin = "https://a.example" })
        assert.same("https://a.example", r.headers["access-control-allow-origin"])
    end)

    it("raises on bad options", function()
        assert.has_error(function() moonlet.cors({ credentials = true }) end) -- any site, logged in
        assert.has_error(function() moonlet.cors({ origins = 42 }) end)
        assert.has_error(function() moonlet.cors({ methods = { 1 } }) end)
        assert.has_error(function() moonlet.cors({ max_age = "1h" }) end)
    end)
end)

describe("res:vary", function()
    it("adds a name to Vary once, to a string or a list, not past '*'", function()
        local app = moonlet.app()
        app:get("/:case", function(req, res)
            local c = req.params.case
            if c == "string" then res:header("Vary", "Cookie") end
            if c == "list" then res:header("Vary", { "Cookie" }) end
            if c == "star" then res:header("vary", "*") end
            if c == "has" then res:header("Vary", "cookie, ORIGIN") end
            res:vary("Origin"):vary("Origin")
            return "ok"
        end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local function vary(case)
            local raw = test.raw(port, "GET /" .. case .. " HTTP/1.1\r\nHost: x\r\n"
                .. "Connection: close\r\n\r\n")
            local out = {}
            for v in raw:gmatch("\r\n[Vv]ary: ([^\r]*)") do out[#out + 1] = v end
            return out
        end
        assert.same({ "Origin" }, vary("none"))
        assert.same({ "Cookie, Origin" }, vary("string"))
        assert.same({ "Cookie", "Origin" }, vary("list"))
        assert.same({ "*" }, vary("star"))
        assert.same({ "cookie, ORIGIN" }, vary("has"))
    end)
end)
