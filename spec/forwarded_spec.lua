-- spec/forwarded_spec.lua: moonlet.forwarded behind a (pretend) reverse proxy, over real sockets:
-- req.ip, req.scheme and req.host from X-Forwarded-* or Forwarded when the peer is trusted, left
-- alone when it is not; trusted hops skipped from the right, forged left entries ignored; the
-- address parser; moonlet.limit and moonlet.csrf seeing the forwarded client.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local forwarded = require "moonlet.forwarded"

local function serve(opts, more)
    local app = moonlet.app()
    app:use(moonlet.forwarded(opts))
    if more then more(app) end
    app:get("/who", function(req) return { ip = req.ip, scheme = req.scheme, host = req.host } end)
    local server, port = test.serve(app)
    test.defer(function() server:close() end)
    return port
end

local function who(port, headers)
    local r = test.request(port, "GET", "/who", { headers = headers })
    assert.same(200, r.status)
    return moonlet.json.decode(r.body)
end

describe("moonlet.forwarded", function()
    it("parses IPv4 and IPv6 addresses, mapped ones as IPv4, and refuses the rest", function()
        local b = forwarded.ip_bytes
        assert.same("\10\0\0\1", b("10.0.0.1"))
        assert.same(string.rep("\0", 15) .. "\1", b("::1"))
        assert.same("\32\1\13\184" .. string.rep("\0", 11) .. "\1", b("2001:db8::1"))
        assert.same("\192\0\2\1", b("::ffff:192.0.2.1"))
        assert.same(16, #b("1:2:3:4:5:6:7:8"))
        for _, bad in ipairs({ "10.0.0.256", "1.2.3", "::1::", "1:2:3:4:5:6:7:8:9", "x", "", "unknown",
                               "_hidden", "fe80::1%eth0", "12345::" }) do
            assert.is_nil(b(bad), bad)
        end
    end)

    it("without a proxy: req.ip is the peer's address, req.scheme http, req.host the Host", function()
        local port = serve({ trusted = { "10.0.0.0/8" } }) -- loopback is not trusted here
        assert.same({ ip = "127.0.0.1", scheme = "http", host = "x:1" },
                    who(port, { Host = "x:1", ["X-Forwarded-For"] = "6.6.6.6",
                                ["X-Forwarded-Proto"] = "https", ["X-Forwarded-Host"] = "evil.example" }))
    end)

    it("from a trusted proxy: the client of X-Forwarded-For past trusted hops, proto and host", function()
        local port = serve({ trusted = { "127.0.0.1", "10.0.0.0/8" } })
        assert.same({ ip = "203.0.113.7", scheme = "https", host = "shop.example" },
                    who(port, { ["X-Forwarded-For"] = "203.0.113.7, 10.1.2.3",
                                ["X-Forwarded-Proto"] = "https", ["X-Forwarded-Host"] = "shop.example" }))
        -- a client's own X-Forwarded-For is kept by the proxy at the left: not believed
        assert.same("203.0.113.7", who(port, { ["X-Forwarded-For"] = "1.1.1.1, 203.0.113.7" }).ip)
        assert.same("2001:db8::5", who(port, { ["X-Forwarded-For"] = "[2001:db8::5]:4711" }).ip)
        assert.same("10.9.9.9", who(port, { ["X-Forwarded-For"] = "10.9.9.9, 10.1.1.1" }).ip) -- all trusted
        assert.same("127.0.0.1", who(port, { ["X-Forwarded-For"] = "garbage" }).ip)
        assert.same("http", who(port, { ["X-Forwarded-Proto"] = "gopher" }).scheme)
    end)

    it("reads RFC 7239 Forwarded when asked, proto and host of the client's element", function()
        local port = serve({ trusted = { "127.0.0.1", "192.0.2.0/24" }, header = "forwarded" })
        local got = who(port, { Forwarded = 'for="[2001:db8::1]:4711";proto=https;host=a.example, '
                                            .. "for=192.0.2.43;proto=http;host=inner" })
        assert.same({ ip = "2001:db8::1", scheme = "https", host = "a.example" }, got)
        got = who(port, { Forwarded = "for=unknown;proto=https", Host = "h" }) -- no address: the peer's
        assert.same({ ip = "127.0.0.1", scheme = "https", host = "h" }, got)
        assert.same("127.0.0.1", who(port, { ["X-Forwarded-For"] = "6.6.6.6" }).ip) -- the other header
    end)

    it("gives moonlet.limit and moonlet.csrf the forwarded client", function()
        local port = serve({}, function(app)
            app:use(moonlet.limit({ rate = 0.001, burst = 1 }))
            app:use(moonlet.session({ secret = string.rep("s", 32) }))
            app:use(moonlet.csrf())
            app:post("/do", function() return "done" end)
        end)
        local a = { ["X-Forwarded-For"] = "198.51.100.1" }
        assert.same(200, test.request(port, "GET", "/who", { headers = a }).status)
        assert.same(429, test.request(port, "GET", "/who", { headers = a }).status)
        local b = { ["X-Forwarded-For"] = "198.51.100.2", Origin = "https://shop.example",
                    Host = "127.0.0.1:8080", ["X-Forwarded-Host"] = "shop.example" }
        -- another client has its own bucket; its Origin matches the forwarded host, so the check
        -- goes on to the token (403 for the missing token, not for the origin)
        local r = test.request(port, "POST", "/do", { headers = b, body = "" })
        assert.same(403, r.status)
        assert.falsy(r.body:find("(Origin)", 1, true), r.body)
        b["X-Forwarded-Host"] = nil
        b["X-Forwarded-For"] = "198.51.100.3"
        r = test.request(port, "POST", "/do", { headers = b, body = "" })
        assert.same(403, r.status)
        assert.truthy(r.body:find("(Origin)", 1, true), r.body)
    end)

    it("refuses bad options at setup", function()
        assert.has_error(function() moonlet.forwarded({ trusted = { "10.0.0.0/33" } }) end)
        assert.has_error(function() moonlet.forwarded({ trusted = { "proxy.example" } }) end)
        assert.has_error(function() moonlet.forwarded({ trusted = "10.0.0.1" }) end)
        assert.has_error(function() moonlet.forwarded({ header = "x-real-ip" }) end)
    end)
end)
