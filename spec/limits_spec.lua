-- spec/limits_spec.lua: what the server refuses and when it gives up, over raw sockets: malformed
-- requests (400), request smuggling shapes (400), size limits (414, 431, 413), slow clients (408),
-- idle keep-alive connections, the connection cap; and after each, the server still serves.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local LIMITS = {
    max_uri = 200, max_header_bytes = 2048, max_headers = 20, max_body = 1000,
    header_timeout = 0.3, body_timeout = 0.3, keepalive_timeout = 0.3,
}

local function status_of(data)
    return data and tonumber(data:match("^HTTP/1%.1 (%d%d%d)"))
end

describe("moonlet.http limits", function()
    local server, port
    before_each(function()
        local app = moonlet.app()
        app:get("/", function() return "ok" end)
        app:post("/echo", function(req) return assert(req:body()) end)
        server, port = test.serve(app, LIMITS)
    end)
    after_each(function()
        -- whatever happened, the server still answers
        assert.same("ok", test.request(port, "GET", "/").body)
        server:close()
    end)

    local function refused(raw, status)
        local data, err, partial = test.raw(port, raw)
        data = data or partial
        assert.is_not_nil(data, err)
        assert.same(status, status_of(data))
        assert.truthy(data:find("Connection: close\r\n", 1, true))
    end

    it("answers 400 to a malformed request line", function()
        refused("GARBAGE\r\n\r\n", 400)
        refused("GET / HTTP/9.x\r\nHost: a\r\n\r\n", 400)
        refused("GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400)
        refused("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400)
    end)

    it("answers 501 to a well-formed request with a method it does not know (RFC 9110 9.1)", function()
        refused("BREW /pot HTTP/1.1\r\nHost: a\r\n\r\n", 501)
        refused("PURGEX /x?a=1 HTTP/1.1\r\nHost: a\r\n\r\n", 501) -- past llhttp's PURGE
        refused("X-Y_Z http://h:1/p HTTP/1.0\r\n\r\n", 501)
        -- not well-formed: 400 still
        refused("BR@W /pot HTTP/1.1\r\nHost: a\r\n\r\n", 400)
        refused("BREW /p\"t HTTP/1.1\r\nHost: a\r\n\r\n", 400)
        refused("BREW /pot HTTP/1.1 x\r\nHost: a\r\n\r\n", 400)
        refused("BREW\r\nHost: a\r\n\r\n", 400)
        -- a method llhttp knows and no route takes is the app's: 405 with Allow (or 404)
        local data = assert(test.raw(port, "MKCALENDAR / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
        assert.truthy(status_of(data) == 405 or status_of(data) == 404, data)
    end)

    it("answers 505 to a well-formed HTTP version it does not speak, as nginx does", function()
        refused("GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505)
        refused("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505)
        refused("GET / HTTP/3.1\r\nHost: a\r\n\r\n", 505)
    end)

    it("answers 400 to a header line without a colon", function()
        refused("GET / HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n", 400)
    end)

    it("answers 400 to an HTTP/1.1 request without Host or with two", function()
        refused("GET / HTTP/1.1\r\n\r\n", 400)
        refused("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
    end)

    it("answers 400 to a Host that is no host name (nginx's rules), and takes the ones that are", function()
        for _, host in ipairs({ "a b", "a/b", "..", "a..b", "", "a\\b", "x\x01y", ".", ":80" }) do
            refused("GET / HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n", 400)
        end
        for _, host in ipairs({ "example.com", "example.com.", "Example.COM:8080", "127.0.0.1:1",
                                "[::1]:8080", "[fe80::1%25eth0]", "xn--bcher-kva.example", "a_b-c" }) do
            local r = assert(test.raw(port, "GET / HTTP/1.1\r\nHost: " .. host
                .. "\r\nConnection: close\r\n\r\n"))
            assert.same(200, status_of(r), host)
        end
    end)

    it("refuses Content-Length together with Transfer-Encoding", function()
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)
    end)

    it("refuses duplicate and malformed Content-Length", function()
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400)
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400)
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400)
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400)
    end)

    it("refuses obs-fold continuation lines", function()
        refused("GET / HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\r\n", 400)
    end)

    it("refuses bare LF and bare CR line endings", function()
        refused("GET / HTTP/1.1\nHost: a\n\n", 400)
        refused("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400)
    end)

    it("refuses a Transfer-Encoding other than chunked last", function()
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400)
    end)

    it("answers a bare LF after a HEAD request with a whole 400, body included", function()
        local sock = test.connect(port)
        assert(sock:send("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"))
        assert.same(200, assert(test.read_response(sock, "HEAD")).status)
        assert(sock:send("\n"))
        local r = assert(test.read_response(sock, "GET"))
        assert.same({ 400, "400 Bad Request\n" }, { r.status, r.body })
        sock:close()
    end)

    it("answers 501 to a transfer coding it does not decode before chunked, as nginx", function()
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            .. "0\r\n\r\n", 501)
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x\r\n"
            .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501)
        local r = test.request(port, "POST", "/echo", { headers = { ["Transfer-Encoding"] = "Chunked" },
            body = "3\r\nabc\r\n0\r\n\r\n" })
        assert.same({ 200, "abc" }, { r.status, r.body })
    end)

    it("answers 414 to a request-target over the limit", function()
        refused("GET /" .. string.rep("a", 300) .. " HTTP/1.1\r\nHost: a\r\n\r\n", 414)
    end)

    it("answers 431 to a header section over the limit", function()
        refused("GET / HTTP/1.1\r\nHost: a\r\nX-Big: " .. string.rep("b", 3000) .. "\r\n\r\n", 431)
    end)

    it("answers 431 to too many headers", function()
        local lines = {}
        for i = 1, 25 do lines[i] = "X-H" .. i .. ": v" end
        refused("GET / HTTP/1.1\r\nHost: a\r\n" .. table.concat(lines, "\r\n") .. "\r\n\r\n", 431)
    end)

    it("answers 413 to a Content-Length over the limit, before reading the body", function()
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n", 413)
    end)

    it("takes the limits an app carries (moonlet.app{ max_body = }) unless listen gives its own", function()
        local app = moonlet.app({ max_body = 10, max_headers = 3 })
        app:post("/echo", function(req) return assert(req:body()) end)
        local s1, p1 = test.serve(app)
        test.defer(function() s1:close() end)
        local body11 = "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n" .. ("b"):rep(11)
        assert.same(413, status_of(test.raw(p1, body11)))
        assert.same(431, status_of(test.raw(p1, "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")))
        assert.same(200, test.request(p1, "POST", "/echo", { body = ("b"):rep(10) }).status)
        local s2, p2 = test.serve(app, { max_body = 100 }) -- listen's own wins
        test.defer(function() s2:close() end)
        assert.same(200, test.request(p2, "POST", "/echo", { body = ("b"):rep(11) }).status)
        -- the caller's options table is left as it was: it may serve another app next
        local opts = { host = "127.0.0.1", port = 0 }
        local s3 = assert(app:listen(opts))
        test.defer(function() s3:close() end)
        assert.same({ host = "127.0.0.1", port = 0 }, opts)
    end)

    it("answers 413 when a chunked body grows over the limit", function()
        local chunk = string.rep("z", 600)
        refused("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            .. "258\r\n" .. chunk .. "\r\n258\r\n" .. chunk .. "\r\n0\r\n\r\n", 413)
    end)

    it("answers 408 and closes when the headers come too slowly", function()
        local sock = test.connect(port)
        assert(sock:send("GET / HTTP/1.1\r\nHo"))
        local data = assert(sock:receive("*a"))
        sock:close()
        assert.same(408, status_of(data))
    end)

    it("answers 408 when a slowloris client drips header bytes", function()
        local sock = test.connect(port)
        assert(sock:send("GET / HTTP/1.1\r\n"))
        local closed
        for i = 1, 20 do -- one byte every 50 ms: each read is quick, the whole is too slow
            moonlet.sleep(0.05)
            local ok = sock:send("X-Slow" .. i .. ": a\r\n")
            if not ok then closed = true; break end
        end
        local data, _, partial = sock:receive("*a")
        sock:close()
        assert.same(408, status_of(data or partial) or (closed and 408))
    end)

    it("answers 408 when the body stops coming", function()
        local sock = test.connect(port)
        assert(sock:send("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"))
        local data = assert(sock:receive("*a"))
        sock:close()
        assert.same(408, status_of(data))
    end)

    it("tells a handler reading the body after its 408 that the connection is closed", function()
        local late
        local app = moonlet.app()
        app:post("/late", function(req, res)
            local body, err = req:body()
            late = { body = body, err = err }
            late.ok, late.werr = res:write("too late") -- the server answered 408 already: no raise
            return ""
        end)
        local s2, p2 = test.serve(app, LIMITS)
        local sock = test.connect(p2)
        assert(sock:send("POST /late HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"))
        local data = assert(sock:receive("*a"))
        sock:close()
        assert.same(408, status_of(data))
        assert.truthy(test.wait_until(function() return late and late.werr end, 3))
        assert.is_nil(late.body)
        assert.is_nil(late.ok)
        assert.same("closed", late.werr)
        s2:close()
    end)

    it("closes a new connection that sends nothing at the header timeout, without a response", function()
        local opts = {}
        for k, v in pairs(LIMITS) do opts[k] = v end
        opts.keepalive_timeout = 60 -- not this one: nothing was asked yet
        local app = moonlet.app()
        local s2, p2 = test.serve(app, opts)
        local sock = test.connect(p2)
        local t0 = moonlet.now()
        local data, err = sock:receive("*a")
        sock:close()
        assert.same("", data, err)
        assert.truthy(moonlet.now() - t0 < 10)
        s2:close()
    end)

    it("closes a new silent connection at the keep-alive timeout when the header one is off", function()
        local opts = {}
        for k, v in pairs(LIMITS) do opts[k] = v end
        opts.header_timeout = 0 -- none: the new connection must not be held forever
        local s2, p2 = test.serve(moonlet.app(), opts)
        local sock = test.connect(p2)
        local data, err = sock:receive("*a")
        sock:close()
        assert.same("", data, err)
        s2:close()
    end)

    it("closes an idle keep-alive connection after the timeout", function()
        local sock = test.connect(port)
        assert(sock:send(test.format_request("GET", "/")))
        assert.same(200, assert(test.read_response(sock)).status)
        local t0 = moonlet.now()
        local data, err = sock:receive("*a")
        sock:close()
        assert.same("", data, err)
        assert.truthy(moonlet.now() - t0 < 3)
    end)

    it("keeps serving others while a malformed request is refused", function()
        local sock = test.connect(port)
        assert(sock:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
        refused("NOT HTTP AT ALL\r\n\r\n", 400)
        assert.same("ok", assert(test.read_response(sock)).body)
        sock:close()
    end)
end)

describe("moonlet.http connection cap", function()
    it("refuses connections over max_conns and serves again once one closes", function()
        local app = moonlet.app()
        app:get("/", function() return "ok" end)
        local server, port = test.serve(app, { max_conns = 2 })
        local a, b = test.connect(port), test.connect(port)
        assert(a:send(test.format_request("GET", "/")))
        assert(b:send(test.format_request("GET", "/")))
        assert(test.read_response(a))
        assert(test.read_response(b))
        local c = test.connect(port)
        local data = c:receive("*a")
        assert.same("", data) -- closed without a response
        c:close()
        a:close()
        assert.truthy(test.wait_until(function() return server:connections() < 2 end))
        assert.same("ok", test.request(port, "GET", "/").body)
        b:close()
        server:close()
    end)
end)
