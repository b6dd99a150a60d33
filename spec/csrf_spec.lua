-- spec/csrf_spec.lua: moonlet.csrf over real sockets: a form page carries the session's token, a
-- POST with it (form field, header, query string) passes and the handler still reads the form, a
-- POST without it or with another session's is 403 before the handler runs; safe methods pass.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local SECRET = "0123456789abcdef-csrf-spec"

local function serve(opts, forwarded)
    local app = moonlet.app()
    local ran = { n = 0 }
    if forwarded then app:use(moonlet.forwarded()) end
    app:use(moonlet.session({ secret = SECRET }))
    app:use(moonlet.csrf(opts))
    app:get("/form", function(req) return req:csrf_token() end)
    app:post("/login", function(req) req:csrf_rotate(); return req:csrf_token() end)
    app:get("/late", function(req, res)
        res:write("<form>")
        local ok, err = pcall(req.csrf_token, req)
        res:write(ok and "made" or tostring(err))
    end)
    app:post("/do", function(req)
        ran.n = ran.n + 1
        local form = req:form() or {}
        return "done " .. tostring(form.x)
    end)
    app:post("/upload", function(req)
        ran.n = ran.n + 1
        local names = {}
        for part in req:parts() do names[#names + 1] = part.name; part:body() end
        return table.concat(names, ",")
    end)
    local server, port = test.serve(app)
    test.defer(function() server:close() end)
    return port, ran
end

-- a session cookie and its token, from GET /form
local function login(port)
    local r = test.request(port, "GET", "/form")
    assert.same(200, r.status)
    return r.headers["set-cookie"]:match("^([^;]*)"), r.body
end

local function post(port, path, cookie, body, headers)
    headers = headers or {}
    headers.Cookie = cookie
    headers["Content-Type"] = headers["Content-Type"] or "application/x-www-form-urlencoded"
    return test.request(port, "POST", path, { headers = headers, body = body })
end

describe("moonlet.csrf", function()
    it("lets a POST with the session's token through, by field, header or query", function()
        local port, ran = serve()
        local cookie, token = login(port)
        assert.truthy(#token >= 40)
        local r = post(port, "/do", cookie, "x=1&_csrf=" .. token)
        assert.same({ 200, "done 1" }, { r.status, r.body }) -- the handler read the form again
        r = post(port, "/do", cookie, "x=2", { ["X-CSRF-Token"] = token })
        assert.same({ 200, "done 2" }, { r.status, r.body })
        r = post(port, "/do?_csrf=" .. token, cookie, "x=3") -- the query: for multipart bodies only
        assert.same(403, r.status)
        r = post(port, "/do?_csrf=" .. token, cookie, '{"x":3}', { ["Content-Type"] = "application/json" })
        assert.same(403, r.status)
        local mp = require "moonlet.multipart"
        local body, ctype = mp.encode({ a = "1", f = { filename = "f.txt", body = "data" } })
        r = post(port, "/upload?_csrf=" .. token, cookie, body, { ["Content-Type"] = ctype })
        assert.same(200, r.status)
        assert.same(3, ran.n)
        local again = test.request(port, "GET", "/form", { headers = { Cookie = cookie } })
        assert.are_not.equal(token, again.body) -- masked anew each time (BREACH)...
        assert.is_nil(again.headers["set-cookie"]) -- ...from the same secret
        r = post(port, "/do", cookie, "x=4&_csrf=" .. again.body)
        assert.same({ 200, "done 4" }, { r.status, r.body })
    end)

    it("reads a multipart form's token field ahead of its files, leaving the body to the handler", function()
        local port, ran = serve()
        local cookie, token = login(port)
        local big = ("0123456789abcdef"):rep(20000) -- 320 KB: many reads
        local function form(fields)
            local out = {}
            for _, f in ipairs(fields) do
                out[#out + 1] = "--B\r\nContent-Disposition: form-data; name=\"" .. f[1] .. "\""
                    .. (f[3] and '; filename="' .. f[3] .. '"' or "") .. "\r\n\r\n" .. f[2] .. "\r\n"
            end
            return table.concat(out) .. "--B--\r\n"
        end
        local ctype = { ["Content-Type"] = "multipart/form-data; boundary=B" }
        local r = post(port, "/upload", cookie, form({ { "_csrf", token }, { "a", "1" },
                                                      { "f", big, "f.bin" } }), ctype)
        assert.same({ 200, "_csrf,a,f" }, { r.status, r.body }) -- the handler streamed it all
        r = post(port, "/upload", cookie, form({ { "a", big }, { "_csrf", token } }), ctype)
        assert.same(403, r.status) -- past the first 64 KiB: not looked for
        r = post(port, "/upload", cookie, form({ { "f", "x", "f.bin" }, { "_csrf", token } }), ctype)
        assert.same(403, r.status) -- after a file: not looked for
        r = post(port, "/upload", cookie, form({ { "_csrf", "nope" }, { "f", big, "f.bin" } }), ctype)
        assert.same(403, r.status)
        assert.same(1, ran.n)
    end)

    it("refuses a POST without the token, a wrong one or another session's: 403, no handler", function()
        local port, ran = serve()
        local cookie, token = login(port)
        local other_cookie, other_token = login(port)
        assert.are_not.equal(token, other_token)
        assert.same(403, post(port, "/do", cookie, "x=1").status)
        assert.same(403, post(port, "/do", cookie, "x=1&_csrf=" .. other_token).status)
        assert.same(403, post(port, "/do", other_cookie, "x=1", { ["X-CSRF-Token"] = token }).status)
        assert.same(403, post(port, "/do", nil, "x=1&_csrf=" .. token).status) -- no session at all
        assert.same(403, post(port, "/do", cookie, "x=1&_csrf=").status)
        assert.same(0, ran.n)
        assert.same(200, test.request(port, "GET", "/form", { headers = { Cookie = cookie } }).status)
    end)

    it("makes a new secret on rotation (login): tokens of the old one are refused", function()
        local port = serve()
        local cookie, token = login(port)
        local r = post(port, "/login", cookie, "_csrf=" .. token)
        assert.same(200, r.status)
        local new_cookie = r.headers["set-cookie"]:match("^([^;]*)")
        assert.same(403, post(port, "/do", new_cookie, "x=1&_csrf=" .. token).status)
        assert.same(200, post(port, "/do", new_cookie, "x=1&_csrf=" .. r.body).status)
    end)

    it("refuses to make a token once a stream started (its cookie could not go out)", function()
        local port = serve()
        local r = test.request(port, "GET", "/late")
        assert.same(200, r.status)
        assert.truthy(r.body:find("after the response started", 1, true), r.body)
        assert.is_nil(r.headers["set-cookie"])
    end)

    it("refuses a POST whose Origin is another site's, token or not, unless trusted", function()
        local port, ran = serve({ trusted_origins = { "https://App.example" } })
        local cookie, token = login(port)
        local body = "x=1&_csrf=" .. token
        local host = "127.0.0.1" -- what test.request sends as Host
        assert.same(200, post(port, "/do", cookie, body, { Origin = "http://" .. host }).status)
        assert.same(200, post(port, "/do", cookie, body, { Origin = "https://app.example" }).status)
        for _, origin in ipairs({ "https://evil.example", "null", "http://" .. host .. ".evil",
                                  "http://" .. host .. "/x", "" }) do
            local r = post(port, "/do", cookie, body, { Origin = origin })
            assert.same(403, r.status, origin)
            assert.truthy(r.body:find("Origin", 1, true), origin)
        end
        assert.same(2, ran.n)
        assert.same(200, post(port, "/do", cookie, body).status) -- no Origin: the token decides
        assert.has_error(function() moonlet.csrf({ trusted_origins = "https://a.example" }) end)
    end)

    it("refuses an http:// Origin of its own host when the request came over https", function()
        local port, ran = serve(nil, true) -- behind a proxy on loopback that says https
        local cookie, token = login(port)
        local body = "x=1&_csrf=" .. token
        local https = { ["X-Forwarded-Proto"] = "https" }
        https.Origin = "http://127.0.0.1"
        local r = post(port, "/do", cookie, body, https)
        assert.same(403, r.status) -- a page on plain http, which a network attacker can forge
        https.Origin = "https://127.0.0.1"
        assert.same(200, post(port, "/do", cookie, body, https).status)
        assert.same(1, ran.n)
    end)

    it("needs moonlet.session before it", function()
        local app = moonlet.app()
        app:use(moonlet.csrf())
        app:get("/", function() return "x" end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        assert.same(500, test.request(port, "GET", "/").status)
    end)
end)
