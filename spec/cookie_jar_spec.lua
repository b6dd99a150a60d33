-- spec/cookie_jar_spec.lua: moonlet.http.cookie_jar: cookie dates, RFC 6265's domain, path, secure
-- and expiry rules on the jar itself, and over real sockets a login that sets cookies on a redirect,
-- several Set-Cookie lines (an Expires date holds a comma), and a caller's own Cookie header.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local jar_mod = require "moonlet.cookie_jar"
local http = moonlet.http

local function u(url) return assert(http.parse_url(url)) end

describe("moonlet.http.cookie_jar", function()
    it("reads the cookie dates servers send", function()
        local t = 784111777 -- Sun, 06 Nov 1994 08:49:37 GMT
        assert.same(t, jar_mod.parse_date("Sun, 06 Nov 1994 08:49:37 GMT"))
        assert.same(t, jar_mod.parse_date("Sunday, 06-Nov-94 08:49:37 GMT"))
        assert.same(t, jar_mod.parse_date("Sun Nov  6 08:49:37 1994"))
        assert.same(0, jar_mod.parse_date("Thu, 01 Jan 1970 00:00:00 GMT"))
        assert.same(4102444800, jar_mod.parse_date("Fri, 01 Jan 2100 00:00:00 GMT"))
        assert.is_nil(jar_mod.parse_date("tomorrow"))
        assert.is_nil(jar_mod.parse_date("Sun, 06 Nov 1994 25:49:37 GMT"))
        assert.is_nil(jar_mod.parse_date("Sat, 31 Feb 2024 00:00:00 GMT")) -- no such day
        assert.is_nil(jar_mod.parse_date("29 Feb 2023 00:00:00")) -- not a leap year
        assert.same(1709164800, jar_mod.parse_date("29 Feb 2024 00:00:00"))
        assert.same(t, jar_mod.parse_date("6th Nov 1994 08:49:37")) -- a day with text after it
    end)

    it("keeps a cookie for its host, or its domain and subdomains; refuses another site's", function()
        local jar = http.cookie_jar()
        local now = 1e9
        jar:store(u("http://a.example.com/"), "host=1", now)
        jar:store(u("http://a.example.com/"), "dom=2; Domain=.Example.com", now)
        jar:store(u("http://a.example.com/"), "evil=3; Domain=other.com", now)
        jar:store(u("http://a.example.com/"), "tld=4; Domain=com", now)
        jar:store(u("http://10.0.0.1/"), "ip=5; Domain=0.0.1", now)
        assert.same("host=1; dom=2", jar:header(u("http://a.example.com/x"), now))
        assert.same("dom=2", jar:header(u("http://b.a.example.com/"), now))
        assert.same("dom=2", jar:header(u("http://example.com/"), now))
        assert.is_nil(jar:header(u("http://other.com/"), now))
        assert.is_nil(jar:header(u("http://notexample.com/"), now))
        assert.same(2, #jar:all())
        jar:store(u("http://localhost:8080/"), "local=6; Domain=localhost", now) -- the host itself
        assert.same("local=6", jar:header(u("http://localhost:9090/"), now))
    end)

    it("reads the last Domain, takes an empty one for none, and sees through trailing dots", function()
        local jar = http.cookie_jar()
        local now = 1e9
        jar:store(u("http://a.example.com/"), "x=1; Domain=other.com; Domain=example.com", now)
        jar:store(u("http://a.example.com/"), "y=2; Domain=.", now) -- none: this host only
        jar:store(u("http://a.example.com./"), "z=3; Domain=com.", now) -- "com": refused
        assert.same("x=1", jar:header(u("http://b.example.com/"), now))
        assert.same("x=1; y=2", jar:header(u("http://a.example.com/"), now))
        assert.is_nil(jar:header(u("http://victim.com./"), now))
    end)

    it("keeps control characters out, and Secure cookies from plain http", function()
        local jar = http.cookie_jar()
        local now = 1e9
        jar:store(u("http://h.test/"), "a=x\ry\nb=p\1q\nc=tab\tok", now)
        assert.same("c=tab\tok", jar:header(u("http://h.test/"), now))
        jar:store(u("https://h.test/"), "sid=good; Secure; Path=/", now)
        jar:store(u("http://h.test/"), "sid=evil; Path=/", now) -- would shadow the Secure one
        jar:store(u("http://h.test/"), "sid=evil; Secure; Path=/", now) -- http cannot set Secure
        jar:store(u("http://h.test/"), "other=1; Secure", now)
        assert.same("c=tab\tok; sid=good", jar:header(u("https://h.test/"), now))
    end)

    it("bounds the cookies of one domain, so that one site cannot push out another's", function()
        local jar = http.cookie_jar({ max = 100, per_domain = 10 })
        local now = 1e9
        jar:store(u("https://bank.test/"), "sid=1", now)
        local lines = {}
        for i = 1, 200 do lines[i] = "k" .. i .. "=v" end
        jar:store(u("http://evil.test/"), table.concat(lines, "\n"), now)
        assert.same("sid=1", jar:header(u("https://bank.test/"), now))
        assert.same(11, #jar:all())
        assert.truthy(jar:header(u("http://evil.test/"), now):find("^k191=v"))
        local t = moonlet.time()
        jar:store(u("http://h.test/"), "gone=1; Max-Age=1", t - 10) -- expired by now: all() leaves it out
        jar:store(u("http://h.test/"), "live=1; Max-Age=60", t)
        assert.same(12, #jar:all())
        jar:clear()
        assert.same({}, jar:all())
    end)

    it("sends a cookie under its path, Secure ones over https only, longer paths first", function()
        local jar = http.cookie_jar()
        local now = 1e9
        jar:store(u("http://h.test/docs/page"), "deflt=1", now) -- default path /docs
        jar:store(u("http://h.test/"), "root=2; Path=/", now)
        jar:store(u("http://h.test/"), "deep=3; Path=/docs/api", now)
        jar:store(u("https://h.test/"), "sec=4; Secure; Path=/", now)
        assert.same("root=2", jar:header(u("http://h.test/"), now))
        assert.same("root=2", jar:header(u("http://h.test/docsx"), now)) -- not under /docs
        assert.same("deflt=1; root=2", jar:header(u("http://h.test/docs"), now))
        assert.same("deep=3; deflt=1; root=2", jar:header(u("http://h.test/docs/api/v1?q=1"), now))
        assert.same("root=2; sec=4", jar:header(u("https://h.test/"), now))
    end)

    it("expires by Max-Age or Expires, deletes on an expired one, replaces by name, domain, path", function()
        local jar = http.cookie_jar()
        local now = 1e9
        local site = u("http://h.test/")
        jar:store(site, "a=1; Max-Age=60\nb=2; Expires=Sun, 06 Nov 2050 08:49:37 GMT\nc=3", now)
        assert.same("a=1; b=2; c=3", jar:header(site, now))
        assert.same("b=2; c=3", jar:header(site, now + 61))
        jar:store(site, "c=30", now) -- replaced, in its place
        jar:store(site, "b=; Max-Age=0", now) -- deleted
        assert.same("c=30", jar:header(site, now))
        jar:store(site, "c=; Expires=Thu, 01 Jan 1970 00:00:00 GMT", now)
        assert.is_nil(jar:header(site, now))
        jar:store(site, "big=" .. ("x"):rep(5000), now) -- too large to keep
        assert.same(0, #jar:all())
        local small = http.cookie_jar({ max = 2 })
        small:store(site, "x=1\ny=2\nz=3", now) -- the oldest goes
        assert.same("y=2; z=3", small:header(site, now))
        assert.has_error(function() http.cookie_jar({ max = 0 }) end)
    end)

    it("passes an upstream's cookies on: a string of Set-Cookie lines to res:header", function()
        local up = moonlet.app()
        up:get("/", function(_, res)
            res:cookie("a", "1", { expires = moonlet.time() + 60 }):cookie("b", "2")
            return "up"
        end)
        local up_server, up_port = test.serve(up)
        test.defer(function() up_server:close() end)
        local app = moonlet.app()
        app:get("/", function(_, res)
            local r = assert(http.get("http://127.0.0.1:" .. up_port .. "/"))
            res:header("Set-Cookie", r.headers["set-cookie"])
            return "front"
        end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local raw = test.raw(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        local lines = {}
        for v in raw:gmatch("\r\nSet%-Cookie: ([^\r]*)") do lines[#lines + 1] = v end
        assert.same(2, #lines)
        assert.truthy(lines[1]:find("^a=1; Expires="))
        assert.same("b=2", lines[2])
    end)

    it("logs in through a redirect and sends the cookies back, over real sockets", function()
        local app = moonlet.app()
        app:post("/login", function(_, res)
            res:cookie("sid", "s3cret", { path = "/", http_only = true })
            res:cookie("pref", "dark", { path = "/", expires = moonlet.time() + 3600 }) -- Expires: a comma
            return res:redirect("/home", 303)
        end)
        app:get("/home", function(req)
            if req.cookies.sid ~= "s3cret" then return 401, "who are you?" end
            return "home of " .. tostring(req.cookies.pref) .. " " .. tostring(req.cookies.extra)
        end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local base = "http://127.0.0.1:" .. port
        local plain = assert(http.post(base .. "/login", "", { redirects = true }))
        assert.same(401, plain.status) -- no jar: the redirect goes without the cookie
        local jar = http.cookie_jar()
        local res = assert(http.post(base .. "/login", "", { redirects = true, jar = jar }))
        assert.same({ 200, "home of dark nil" }, { res.status, res.body })
        assert.same({ sid = "s3cret", pref = "dark" }, jar:cookies(base .. "/"))
        local raw = assert(http.post(base .. "/login", ""))
        local lines = {}
        for line in raw.headers["set-cookie"]:gmatch("[^\n]+") do lines[#lines + 1] = line end
        assert.same(2, #lines) -- one value per line, the Expires date's comma kept
        res = assert(http.get(base .. "/home", { jar = jar, headers = { Cookie = "extra=1" } }))
        assert.same("home of dark 1", res.body)
        res = assert(http.get(base .. "/home", { jar = jar, headers = { Cookie = { "extra=2" } } }))
        assert.same("home of dark 2", res.body)
        http.configure({ jar = jar }) -- every request's
        test.defer(function() http.configure({ jar = false }) end)
        assert.same(200, assert(http.get(base .. "/home")).status)
        assert.has_error(function() http.get(base .. "/home", { jar = {} }) end)
        assert.has_error(function() http.configure({ jar = "yes" }) end)
    end)
end)
