-- spec/cookie_spec.lua: cookies (lua/moonlet/cookie.lua): req.cookies from the Cookie header,
-- res:cookie() as Set-Cookie lines, over real sockets; any value round-trips; misuse raises.
local moonlet = require "moonlet"
local cookie = require "moonlet.cookie"
local test = require "moonlet.test"

-- the Set-Cookie lines of a raw response, in order
local function set_cookies(raw)
    local out = {}
    for line in raw:gmatch("[^\r\n]+") do
        local v = line:match("^[Ss]et%-[Cc]ookie: (.*)$")
        if v then out[#out + 1] = v end
    end
    return out
end

describe("cookies", function()
    it("parses a Cookie header: quotes off, %XX decoded, the first of a name, commas kept", function()
        assert.same({ a = "1", b = "two", c = "A z", json = '{"x":1,"y":2}', e = "" },
            cookie.parse(' a=1; b="two";c=%41%20z; a=2; junk; json={"x":1,"y":2}; e='))
        assert.same({}, cookie.parse(nil))
        assert.same({}, cookie.parse(""))
        assert.same({}, cookie.parse(" ; = ; =x;;"))
        local spaces = (" "):rep(30000) -- trimmed in linear time (a backtracking pattern took seconds)
        assert.same({ a = "x" .. spaces .. "y" }, cookie.parse("a=x" .. spaces .. "y" .. spaces))
    end)

    it("writes Set-Cookie with its attributes, and raises on a bad name or option", function()
        assert.same("sid=abc; Max-Age=60; Expires=Thu, 01 Jan 1970 00:00:10 GMT; Path=/; Domain=example.com; "
            .. "Secure; HttpOnly; SameSite=None",
            cookie.serialize("sid", "abc", { max_age = 60, expires = 10, path = "/", domain = "example.com",
                                             secure = true, http_only = true, same_site = "none" }))
        assert.same("a=x%3By%2Cz%20%22q%22%25", cookie.serialize("a", 'x;y,z "q"%'))
        assert.has_error(function() cookie.serialize("bad name", "x") end)
        assert.has_error(function() cookie.serialize("a;b", "x") end)
        assert.has_error(function() cookie.serialize("a", "x", { same_site = "none" }) end) -- not secure
        assert.has_error(function() cookie.serialize("a", "x", { same_site = "sometimes" }) end)
        assert.has_error(function() cookie.serialize("a", "x", { path = "/;evil" }) end)
        assert.has_error(function() cookie.serialize("a", "x", { max_age = "1h" }) end)
        assert.has_error(function() cookie.serialize("a", "x", { max_age = 0 / 0 }) end)
        assert.has_error(function() cookie.serialize("a", "x", { max_age = math.huge }) end)
        assert.has_error(function() cookie.serialize("a", "x", { expires = 1e18 }) end)
        assert.has_error(function() cookie.serialize("a", "x", { expires = -1 }) end)
        assert.has_error(function() cookie.serialize("a", {}) end)
        assert.same("a=1; Expires=Fri, 31 Dec 9999 23:59:59 GMT",
                    cookie.serialize("a", 1, { expires = 253402300799 }))
    end)

    it("keeps every cookie: set by name, returned, given by an abort; a deletion keeps Secure", function()
        local app = moonlet.app()
        app:use(function(_, res, next)
            res:cookie("sid", "s1", { http_only = true }) -- a session middleware, before the handler
            return next()
        end)
        app:get("/by-name", function(_, res) res:header("set-cookie", "b=1"); return "ok" end)
        app:get("/returned", function() return 200, "ok", { ["Set-Cookie"] = { "c=1", "d=1" } } end)
        app:get("/abort", function() moonlet.abort(401, "no\n", { ["Set-Cookie"] = "e=1" }) end)
        app:get("/delete", function(_, res)
            res:cookie("__Host-s", nil, { path = "/", secure = true, same_site = "Strict" })
            return "ok"
        end)
        app:get("/two-lines", function(req) return req.cookies end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local function lines(path)
            return set_cookies(test.raw(port, "GET " .. path
                .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        end
        assert.same({ "sid=s1; HttpOnly", "b=1" }, lines("/by-name"))
        assert.same({ "sid=s1; HttpOnly", "c=1", "d=1" }, lines("/returned"))
        assert.same({ "sid=s1; HttpOnly", "e=1" }, lines("/abort"))
        assert.same({ "sid=s1; HttpOnly", "__Host-s=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; "
                      .. "Path=/; Secure; SameSite=Strict" }, lines("/delete"))
        -- two Cookie lines (as an HTTP/2 proxy may send them) are both read
        local raw = test.raw(port, "GET /two-lines HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\n"
            .. "Connection: close\r\n\r\n")
        assert.same({ a = "1", b = "2" }, moonlet.json.decode(raw:match("\r\n\r\n(.*)$")))
    end)

    it("reads every Cookie line of a WebSocket handshake (the request is gone once it is open)", function()
        local app = moonlet.app()
        app:websocket("/ws", function(ws, req) ws:send(moonlet.json.encode(req.cookies)) end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local sock = test.connect(port)
        test.defer(function() sock:close() end)
        assert(sock:send("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            .. "Cookie: a=1\r\nCookie: b=2\r\n\r\n"))
        local line = assert(sock:receive("*l"))
        assert.same("HTTP/1.1 101 Switching Protocols", line)
        repeat line = assert(sock:receive("*l")) until line == ""
        local head = assert(sock:receive(2)) -- a text frame, unmasked, under 126 bytes
        assert.same(0x81, head:byte(1))
        local text = assert(sock:receive(head:byte(2)))
        assert.same({ a = "1", b = "2" }, moonlet.json.decode(text))
    end)

    it("serves them: req.cookies in, one Set-Cookie per res:cookie out, and any value round-trips", function()
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local every = table.concat(bytes)
        local app = moonlet.app()
        app:get("/set", function(_, res)
            res:header("Set-Cookie", "first=1") -- a header set by hand stays, the cookies join it
            res:cookie("every", every, { path = "/", http_only = true })
            res:cookie("gone", nil, { path = "/x" })
            return "ok"
        end)
        app:get("/get", function(req) return { every = req.cookies.every == every, n = req.cookies.n } end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local raw = test.raw(port, "GET /set HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        local lines = set_cookies(raw)
        assert.same(3, #lines)
        assert.same("first=1", lines[1])
        assert.same("gone=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/x", lines[3])
        local pair = lines[2]:match("^(every=[^;]*); Path=/; HttpOnly$")
        assert.truthy(pair, lines[2])
        assert.falsy(pair:find("[%s\",;\\%c]")) -- only cookie-octets go on the wire
        -- the browser sends it back
        local resp = test.request(port, "GET", "/get", { headers = { Cookie = pair .. "; n=5" } })
        assert.same({ every = true, n = "5" }, moonlet.json.decode(resp.body))
    end)
end)
