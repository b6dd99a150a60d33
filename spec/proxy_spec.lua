-- spec/proxy_spec.lua: moonlet.proxy, the reverse-proxy handler, between a client on a real socket
-- and an upstream in this process (a moonlet app, or a raw moonlet.tcp server for what an app
-- cannot send: hop-by-hop response headers). Covers the URL and headers sent on, bodies streamed
-- both ways, status codes, 502 and 504, and that a client going away closes the upstream request;
-- then WebSockets through it, against an upstream app:websocket (or a raw server that drops):
-- messages, headers, subprotocols, closes both ways, drops, failures, an upstream's refusal of the
-- handshake passed on whole, size and order; other Upgrades through a byte tunnel (both ways,
-- closes, shutdown, a refusal, the idle timeout either way); and https:// upstreams (a CA, a client
-- certificate).
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"

-- An upstream app whose catch-all route echoes what it got as JSON; build(app) adds routes first.
local function upstream(build, opts)
    local app = moonlet.app(opts)
    if build then build(app) end
    app:any("/*", function(req)
        return { method = req.method, target = req.target, headers = req.headers,
                 body = req:body() }
    end)
    local port = test.serving(app, { max_body = 8 * 1024 * 1024 })
    return "http://127.0.0.1:" .. port, port
end

-- A front app that proxies /api/* with opts (a URL or a table); its port.
local function front(opts, pattern)
    local app = moonlet.app()
    app:any(pattern or "/api/*path", moonlet.proxy(opts))
    return test.serving(app, { max_body = 8 * 1024 * 1024 })
end

-- Reads a response head from sock: status and headers (lower-case names, a list of values each).
-- Waits until the tasks and handles are down to before's (test.settled_stats()), then checks the
-- whole baseline.
local function back_to(before)
    assert.truthy(test.wait_until(function()
        local now = core.stats()
        return now.tasks <= before.tasks and now.handles <= before.handles
    end, 5))
    test.assert_baseline(before)
end

local function read_head(sock)
    local line = assert(sock:receive("*l"))
    local head = { status = tonumber(line:match("^HTTP/1%.%d (%d+)")), headers = {} }
    while true do
        local h = assert(sock:receive("*l"))
        if h == "" then return head end
        local k, v = h:match("^([^:]+):%s*(.-)%s*$")
        k = k:lower()
        head.headers[k] = head.headers[k] or {}
        table.insert(head.headers[k], v)
    end
end

-- One chunk of a chunked body (nil at the last one).
local function read_chunk(sock)
    local size = tonumber(assert(sock:receive("*l")):match("^(%x+)"), 16)
    if size == 0 then return nil end
    local data = assert(sock:receive(size))
    assert(sock:receive("*l"))
    return data
end

describe("moonlet.proxy", function()
    it("sends the method, the raw path without the prefix and the query on", function()
        local base = upstream()
        local port = front({ upstream = base, strip_prefix = "/api" })
        local resp = test.request(port, "GET", "/api/items/a%2Fb?q=1&tag=x+y")
        assert.equal(200, resp.status)
        local got = moonlet.json.decode(resp.body)
        assert.same({ "GET", "/items/a%2Fb?q=1&tag=x+y" }, { got.method, got.target })
        resp = test.request(port, "DELETE", "/api")
        assert.same({ "DELETE", "/" }, { moonlet.json.decode(resp.body).method,
                                         moonlet.json.decode(resp.body).target })
    end)

    it("keeps the whole path without strip_prefix, under the upstream URL's own path", function()
        local base = upstream()
        local port = front(base .. "/v2/")
        local got = moonlet.json.decode(test.request(port, "GET", "/api/x?y=1").body)
        assert.equal("/v2/api/x?y=1", got.target)
    end)

    it("sets Host to the upstream's and X-Forwarded-For, -Proto and -Host", function()
        local base, up_port = upstream()
        local port = front({ upstream = base, headers = { ["X-Api-Key"] = "k1", Cookie = false } })
        local resp = test.request(port, "GET", "/api/h", { headers = {
            Host = "front.example:8080", ["X-Forwarded-For"] = "203.0.113.9", Cookie = "sid=1",
            ["X-Forwarded-Proto"] = "gopher", ["User-Agent"] = "curl/8",
        } })
        local h = moonlet.json.decode(resp.body).headers
        assert.equal("127.0.0.1:" .. up_port, h.host)
        assert.equal("203.0.113.9, 127.0.0.1", h["x-forwarded-for"])
        assert.equal("http", h["x-forwarded-proto"])
        assert.equal("front.example:8080", h["x-forwarded-host"])
        assert.equal("k1", h["x-api-key"])
        assert.equal("curl/8", h["user-agent"]) -- the client's, none added
        assert.is_nil(h.cookie)
    end)

    it("passes the client's Host with preserve_host", function()
        local base = upstream()
        local port = front({ upstream = base, preserve_host = true })
        local resp = test.request(port, "GET", "/api/h", { headers = { Host = "front.example:8080" } })
        local h = moonlet.json.decode(resp.body).headers
        assert.equal("front.example:8080", h.host)
        assert.equal("127.0.0.1", h["x-forwarded-for"])
    end)

    it("drops hop-by-hop request headers, those Connection names too", function()
        local base = upstream()
        local port = front(base)
        local resp = test.request(port, "GET", "/api/h", { headers = {
            Connection = "keep-alive, X-Hop", ["X-Hop"] = "1", ["Keep-Alive"] = "timeout=5",
            ["Proxy-Authorization"] = "Basic eDp5", ["Proxy-Connection"] = "keep-alive",
            TE = "trailers", Trailer = "X-T", Upgrade = "h2c", ["X-Kept"] = "yes",
        } })
        local h = moonlet.json.decode(resp.body).headers
        assert.equal("yes", h["x-kept"])
        for _, name in ipairs({ "x-hop", "keep-alive", "proxy-authorization", "proxy-connection",
                                "te", "trailer", "upgrade" }) do
            assert.is_nil(h[name], name)
        end
        assert.is_true(h.connection == nil or h.connection == "keep-alive") -- the client's own
    end)

    -- (the headers as the client sent them are taken in C, x:forward_headers; the Lua loop when a
    -- middleware made req.headers, which it may have changed)
    it("joins repeated request headers and drops what several Connection lines name", function()
        local base = upstream()
        local port = front(base)
        local sock = test.connect(port)
        assert(sock:send("GET /api/h HTTP/1.1\r\nHost: f\r\nX-R: a\r\nX-R: b\r\nCookie: a=1\r\n"
            .. "Cookie: b=2\r\nConnection: x-one\r\nConnection:\tX-Two ,close\r\nX-One: 1\r\n"
            .. "x-two: 2\r\nX-Three: 3\r\nContent-Length: 2\r\n\r\nab"))
        local resp = assert(test.read_response(sock))
        sock:close()
        local got = moonlet.json.decode(resp.body)
        local h = got.headers
        assert.same({ "a, b", "a=1; b=2", "3", "ab" }, { h["x-r"], h.cookie, h["x-three"], got.body })
        assert.is_nil(h["x-one"])
        assert.is_nil(h["x-two"])
    end)

    it("sends the body on when Connection names Content-Length, as when req.headers was made", function()
        local base = upstream()
        local app = moonlet.app()
        app:use(function(req, _, next)
            if req.path == "/lua" then local _ = req.headers end -- (the Lua loop, not x:forward_headers)
            return next()
        end)
        app:any("/*path", moonlet.proxy(base))
        local port = test.serving(app)
        for _, path in ipairs({ "/c", "/lua" }) do
            local sock = test.connect(port)
            assert(sock:send("POST " .. path .. " HTTP/1.1\r\nHost: f\r\nConnection: content-length\r\n"
                .. "Content-Length: 5\r\n\r\nhello"))
            local resp = assert(test.read_response(sock))
            sock:close()
            assert.equal(200, resp.status)
            assert.equal("hello", moonlet.json.decode(resp.body).body, path)
        end
    end)

    it("sends on the request headers a middleware changed", function()
        local base = upstream()
        local app = moonlet.app()
        app:use(function(req, _, next)
            req.headers["x-user"] = "bob"
            req.headers["x-secret"] = nil
            return next()
        end)
        app:any("/api/*path", moonlet.proxy(base))
        local port = test.serving(app)
        local resp = test.request(port, "GET", "/api/h",
            { headers = { ["X-Secret"] = "s", ["X-Kept"] = "k" } })
        local h = moonlet.json.decode(resp.body).headers
        assert.same({ "bob", "k" }, { h["x-user"], h["x-kept"] })
        assert.is_nil(h["x-secret"])
    end)

    it("drops hop-by-hop response headers and keeps every Set-Cookie line", function()
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
            function(sock)
                repeat local line = sock:receive("*l") until not line or line == ""
                sock:send("HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
                    .. "Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\n"
                    .. "Upgrade: h2c\r\nX-Kept: yes\r\nContent-Type: text/html\r\n"
                    .. "Set-Cookie: a=1; Path=/\r\n"
                    .. "Set-Cookie: b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT\r\n"
                    .. "Content-Length: 5\r\n\r\nhello")
                sock:close()
            end))
        test.defer(function() server:close() end)
        local port = front("http://127.0.0.1:" .. server:port())
        local sock = test.connect(port)
        test.defer(function() sock:close() end)
        assert(sock:send(test.format_request("GET", "/api/x")))
        local head = read_head(sock)
        assert.equal(200, head.status)
        local h = head.headers
        assert.same({ "yes" }, h["x-kept"])
        assert.same({ "text/html" }, h["content-type"])
        assert.same({ "a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT" }, h["set-cookie"])
        assert.same({ "5" }, h["content-length"])
        for _, name in ipairs({ "x-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade",
                                "connection", "transfer-encoding" }) do
            assert.is_nil(h[name], name)
        end
        assert.equal("hello", sock:receive(5))
        -- the client's connection stays open: the upstream's Connection: close was its own
        assert(sock:send(test.format_request("GET", "/api/y")))
        assert.equal(200, read_head(sock).status)
    end)

    it("streams a 5 MB request body to the upstream intact", function()
        local got
        local base = upstream(function(app)
            app:post("/upload", function(req)
                local parts, pieces = {}, 0
                for chunk in req:chunks() do
                    pieces = pieces + 1
                    parts[pieces] = chunk
                end
                got = { body = table.concat(parts), pieces = pieces, cl = req:header("content-length") }
                return "ok"
            end)
        end)
        local port = front({ upstream = base, strip_prefix = "/api" })
        local lines = {}
        for i = 1, 5 * 1024 * 1024 / 8 do lines[i] = ("%07x\n"):format(i) end
        local body = table.concat(lines)
        local resp = test.request(port, "POST", "/api/upload", { body = body, timeout = 20 })
        assert.same({ 200, "ok" }, { resp.status, resp.body })
        assert.equal(#body, #got.body)
        assert.is_true(got.body == body)
        assert.equal(tostring(#body), got.cl) -- the client's length, passed on
        assert.is_true(got.pieces > 1)
    end)

    it("passes a chunked request body on while the client still sends it", function()
        local first = moonlet.event()
        local got
        local base = upstream(function(app)
            app:post("/stream", function(req)
                local parts = {}
                for chunk in req:chunks() do
                    parts[#parts + 1] = chunk
                    first:set()
                end
                got = { body = table.concat(parts), te = req:header("transfer-encoding") }
                return "done"
            end)
        end)
        local port = front({ upstream = base, strip_prefix = "/api" })
        local sock = test.connect(port)
        test.defer(function() sock:close() end)
        assert(sock:send("POST /api/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            .. "5\r\nhello\r\n"))
        assert.is_true(first:wait(5)) -- the upstream has the first piece; the body is not over
        assert(sock:send("6\r\n world\r\n0\r\n\r\n"))
        local resp = assert(test.read_response(sock))
        assert.same({ 200, "done" }, { resp.status, resp.body })
        assert.same({ body = "hello world", te = "chunked" }, got)
    end)

    it("streams the upstream's body: the client has the first piece before the upstream ends", function()
        local go = moonlet.event()
        local base = upstream(function(app)
            app:get("/slow", function(_, res)
                res:type("text/event-stream")
                res:write("first\n")
                go:wait(5)
                res:write("second\n")
            end)
        end)
        test.defer(function() go:set() end)
        local port = front({ upstream = base, strip_prefix = "/api" })
        local sock = test.connect(port)
        test.defer(function() sock:close() end)
        assert(sock:send(test.format_request("GET", "/api/slow")))
        local head = read_head(sock)
        assert.same({ 200, { "text/event-stream" }, { "chunked" } },
                    { head.status, head.headers["content-type"], head.headers["transfer-encoding"] })
        assert.equal("first\n", read_chunk(sock)) -- while the upstream waits for `go`
        go:set()
        assert.equal("second\n", read_chunk(sock))
        assert.is_nil(read_chunk(sock))
    end)

    it("passes the upstream's status, body and redirects as they are", function()
        local base = upstream(function(app)
            app:get("/boom", function() return 500, "it broke\n" end)
            app:get("/moved", function(_, res) return res:redirect("/elsewhere", 301) end)
        end)
        local port = front({ upstream = base, strip_prefix = "/api" })
        local resp = test.request(port, "GET", "/api/boom")
        assert.same({ 500, "it broke\n" }, { resp.status, resp.body })
        resp = test.request(port, "GET", "/api/moved")
        assert.same({ 301, "/elsewhere" }, { resp.status, resp.headers.location })
    end)

    describe("redirect", function()
        -- An upstream whose /v2/go answers 302 to ?to= (its own base URL in front of a "@") with
        -- the same in Refresh and Content-Location.
        local function redirecting()
            local base
            base = upstream(function(app)
                app:get("/*any", function(req, res)
                    local to = req.query.to:gsub("^@", base)
                    res:header("Refresh", "3; url=" .. to)
                    res:header("Content-Location", to)
                    return res:redirect(to, 302)
                end)
            end)
            return base
        end
        local function go(port, to, host)
            local resp = test.request(port, "GET", "/api/go?to=" .. require("moonlet.url").escape(to),
                                      { headers = { Host = host or "front.example:8080" } })
            assert.equal(302, resp.status)
            return resp.headers.location, resp.headers.refresh, resp.headers["content-location"]
        end

        it("rewrites its own URLs to the client's (proxy_redirect default), no relative one", function()
            local base = redirecting()
            local port = front(base)
            local there = "http://front.example:8080/api/there?x=1"
            assert.same({ there, "3; url=" .. there, there }, { go(port, "@/api/there?x=1") })
            assert.equal("http://front.example:8080", (go(port, "@")))
            local other = "http://127.0.0.1:1" .. base:match(":(%d+)$") .. "/x" -- another port
            assert.equal(other, (go(port, other)))
            assert.equal("https://elsewhere.example/a", (go(port, "https://elsewhere.example/a")))
            -- a relative one is left alone
            assert.same({ "/elsewhere", "3; url=/elsewhere", "/elsewhere" }, { go(port, "/elsewhere") })
        end)

        it("puts strip_prefix back and takes the upstream's path off", function()
            local base = redirecting()
            local port = front({ upstream = base .. "/v2/", strip_prefix = "/api" })
            assert.equal("http://front.example:8080/api/there", (go(port, "@/v2/there")))
            assert.equal("http://front.example:8080/api", (go(port, "@/v2")))
            assert.equal(base .. "/v22/x", (go(port, "@/v22/x"))) -- not under /v2
            assert.equal(base .. "/x", (go(port, "@/x")))
        end)

        it("passes Location as it is with redirect = false", function()
            local base = redirecting()
            local port = front({ upstream = base, redirect = false })
            assert.equal(base .. "/api/there", (go(port, "@/api/there")))
        end)

        it("maps explicit pairs, the longest prefix first, instead of the default", function()
            local base = redirecting()
            local port = front({ upstream = base, redirect = {
                [base .. "/"] = "https://cdn.example/", [base .. "/api/deep/"] = "/deep/",
            } })
            assert.equal("https://cdn.example/a?b=1", (go(port, "@/a?b=1")))
            assert.equal("/deep/x", (go(port, "@/api/deep/x")))
            assert.same({ base, "3; url=" .. base, base }, { go(port, "@") }) -- no pair matches
        end)

        it("takes nginx's regexes (~, ~* without case): the first match replaces the whole URL",
           function()
            local base = redirecting()
            local port = front({ upstream = base, redirect = {
                ["~^(http://[^:]+):\\d+(/.+)$"] = "$1$2", -- nginx's own example: the port goes
                ["~*/STATIC/(?<rest>.*)"] = "https://cdn.example/${rest}", -- a named group
                [base .. "/plain/"] = "/p/", -- plain prefixes before the regexes
            } })
            local host = base:match("^http://([^:]+)")
            assert.same({ "http://" .. host .. "/a/b?c=1", "3; url=http://" .. host .. "/a/b?c=1",
                          "http://" .. host .. "/a/b?c=1" }, { go(port, "@/a/b?c=1") })
            assert.equal("https://cdn.example/x.css", (go(port, "https://other.example/static/x.css")))
            assert.equal("/p/x", (go(port, "@/plain/x")))
            assert.equal("/relative", (go(port, "/relative"))) -- no match: as it was
            -- in order, the first that matches wins (nginx's order of its directives)
            local ordered = front({ upstream = base, redirect = {
                { "~/first/", "/one" }, { "~/first/(.*)", "/two/$1" }, { base .. "/", "/three/" } } })
            assert.equal("/one", (go(ordered, "@/first/x")))
            assert.equal("/three/second", (go(ordered, "@/second")))
        end)
    end)

    it("rewrites the Domain and Path of Set-Cookie lines only when asked", function()
        local base = upstream(function(app)
            app:get("/c", function(_, res)
                res:header("Set-Cookie", { "a=1; Domain=Upstream.Internal; Path=/v2/app; HttpOnly",
                                           "b=2; path=/v2; domain=.upstream.internal",
                                           "c=3; Path=/other; Domain=elsewhere.example" })
                return "ok"
            end)
        end)
        local cookies = function(port)
            local sock = test.connect(port)
            test.defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/api/c")))
            return read_head(sock).headers["set-cookie"]
        end
        assert.same({ "a=1; Domain=Upstream.Internal; Path=/v2/app; HttpOnly",
                      "b=2; path=/v2; domain=.upstream.internal",
                      "c=3; Path=/other; Domain=elsewhere.example" },
                    cookies(front({ upstream = base, strip_prefix = "/api" })))
        local port = front({ upstream = base, strip_prefix = "/api",
                             cookie_domain = { ["upstream.internal"] = "front.example" },
                             cookie_path = { ["/v2"] = "/api", ["/v2/app"] = "/app" } })
        assert.same({ "a=1; Domain=front.example; Path=/app; HttpOnly",
                      "b=2; path=/api; domain=.front.example",
                      "c=3; Path=/other; Domain=elsewhere.example" }, cookies(port))
        -- nginx's regexes: the whole value replaced (a domain's leading dot kept, unseen)
        port = front({ upstream = base, strip_prefix = "/api",
                       cookie_domain = { ["~\\.(?P<sl>[-0-9a-z]+\\.[a-z]+)$"] = "$sl" },
                       cookie_path = { { "~*^/V2/([^/]+)", "/api/$1" }, { "/", "/all/" } } })
        assert.same({ "a=1; Domain=Upstream.Internal; Path=/api/app; HttpOnly",
                      "b=2; path=/all/v2; domain=.upstream.internal",
                      "c=3; Path=/all/other; Domain=elsewhere.example" }, cookies(port))
    end)

    it("passes a 404 of the upstream", function()
        local app = moonlet.app()
        app:get("/only", function() return "x" end)
        local up = test.serving(app)
        local port = front("http://127.0.0.1:" .. up)
        local resp = test.request(port, "GET", "/api/missing")
        assert.equal(404, resp.status)
    end)

    it("answers HEAD with the upstream's length and no body", function()
        local seen
        local base = upstream(function(app)
            app:get("/file", function(req)
                seen = req.method
                return ("x"):rep(1234)
            end)
        end)
        local port = front({ upstream = base, strip_prefix = "/api" })
        local resp = test.request(port, "HEAD", "/api/file")
        assert.same({ 200, "1234", "", "HEAD" }, { resp.status, resp.headers["content-length"],
                                                   resp.body, seen })
        resp = test.request(port, "GET", "/api/file")
        assert.same({ "1234", 1234 }, { resp.headers["content-length"], #resp.body })
    end)

    it("answers 502 when the upstream refuses the connection", function()
        local port = front("http://127.0.0.1:1")
        local resp = test.request(port, "GET", "/api/x")
        assert.same({ 502, "502 Bad Gateway\n" }, { resp.status, resp.body })
    end)

    it("answers 502 when the upstream's answer is not HTTP", function()
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
            function(sock)
                sock:receive("*l")
                sock:send("SSH-2.0-OpenSSH\r\n\r\n")
                sock:close()
            end))
        test.defer(function() server:close() end)
        local port = front("http://127.0.0.1:" .. server:port())
        local resp = test.request(port, "GET", "/api/x")
        assert.same({ 502, "502 Bad Gateway\n" }, { resp.status, resp.body })
    end)

    it("closes the client's connection when the upstream's body breaks off", function()
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
            function(sock)
                repeat local line = sock:receive("*l") until not line or line == ""
                sock:send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                moonlet.sleep(0.05)
                sock:close() -- no last chunk: the body is cut
            end))
        test.defer(function() server:close() end)
        local port = front("http://127.0.0.1:" .. server:port())
        local sock = test.connect(port)
        test.defer(function() sock:close() end)
        assert(sock:send(test.format_request("GET", "/api/x")))
        assert.equal(200, read_head(sock).status)
        assert.equal("hello", read_chunk(sock))
        -- no last chunk either: the connection closes, so the cut body is not taken for whole
        local line, err = sock:receive("*l")
        assert.same({ nil, "closed" }, { line, err })
    end)

    it("answers 504 when the upstream does not answer within timeout", function()
        local release = moonlet.event()
        local base = upstream(function(app)
            app:get("/slow", function()
                release:wait(5)
                return "late"
            end)
        end)
        test.defer(function() release:set() end)
        local port = front({ upstream = base, strip_prefix = "/api", timeout = 0.2 })
        local resp = test.request(port, "GET", "/api/slow")
        assert.same({ 504, "504 Gateway Timeout\n" }, { resp.status, resp.body })
    end)

    it("closes the upstream request when the client goes away mid-stream", function()
        local st = {}
        local base = upstream(function(app)
            app:get("/ticks", function(_, res)
                -- its client gone, the upstream hears it where it is: a write fails, or the
                -- sleep is cancelled (the server cancels a handler whose connection closed)
                local ok, err = pcall(function()
                    while true do
                        local ok, err = res:write("tick\n")
                        if not ok then return err end
                        moonlet.sleep(0.01)
                    end
                end)
                st.err = ok and err or (err == moonlet.CANCELLED and "cancelled" or tostring(err))
                if not ok then error(err, 0) end
            end)
        end)
        local port = front({ upstream = base, strip_prefix = "/api" })
        local sock = test.connect(port)
        assert(sock:send(test.format_request("GET", "/api/ticks")))
        assert.equal(200, read_head(sock).status)
        assert.truthy(read_chunk(sock))
        sock:close()
        assert.truthy(test.wait_until(function() return st.err end, 5))
        assert.is_true(st.err == "closed" or st.err == "cancelled", st.err)
        assert.equal(0, moonlet.http.pool_stats().origins[base] or 0) -- closed, not pooled
    end)

    it("closes the upstream request when the client goes away before the answer", function()
        local st = {}
        local base = upstream(function(app)
            app:get("/wait", function()
                st.started = true
                local ok, err = pcall(moonlet.sleep, 5)
                st.cancelled = not ok and err == moonlet.CANCELLED
                if not ok then error(err, 0) end
                return "late"
            end)
        end, { check_client_abort = true })
        local port = front({ upstream = base, strip_prefix = "/api" })
        local tasks0 = core.stats().tasks
        local sock = test.connect(port)
        assert(sock:send(test.format_request("GET", "/api/wait")))
        assert.truthy(test.wait_until(function() return st.started end, 5))
        sock:close()
        assert.truthy(test.wait_until(function() return st.cancelled end, 5))
        assert.truthy(test.wait_until(function() return core.stats().tasks <= tasks0 end, 5))
    end)

    describe("WebSocket", function()
        -- An upstream WebSocket app on /ws/*: echoes every message with its kind, records what it
        -- saw in `seen` (headers, target, subprotocol, close code and reason), and on a message
        -- "close me" closes with 4002 "from upstream". A front proxying /api/* to it.
        local function ws_pair(seen, proxy_opts)
            local app = moonlet.app()
            app:websocket("/ws/*rest", function(ws, req)
                seen.headers, seen.target, seen.protocol = req.headers, req.target, ws.protocol
                for msg, kind in ws:messages() do
                    if msg == "close me" then
                        ws:close(4002, "from upstream")
                        break
                    end
                    assert(ws:send(msg, kind))
                end
                seen.code, seen.reason = ws.close_code, ws.close_reason
            end, { protocols = { "v2.chat", "v1.chat" } })
            local up = test.serving(app)
            local opts = { upstream = "http://127.0.0.1:" .. up, strip_prefix = "/api" }
            for k, v in pairs(proxy_opts or {}) do opts[k] = v end
            return front(opts), up
        end

        it("relays text and binary both ways with the client's headers and subprotocol", function()
            local seen = {}
            local port = ws_pair(seen)
            local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws/echo?room=a%2Fb", {
                timeout = 5, protocols = { "v1.chat", "v2.chat" }, origin = "http://front.example",
                headers = { Cookie = "sid=42", Authorization = "Bearer t",
                            ["X-Forwarded-For"] = "203.0.113.9" },
            }))
            assert.equal("v2.chat", c.protocol) -- the upstream's choice, answered to the client
            assert(c:send("héllo"))
            assert.same({ "héllo", "text" }, { c:receive(5) })
            assert(c:send("\0\1\2\255", "binary"))
            assert.same({ "\0\1\2\255", "binary" }, { c:receive(5) })
            local h = seen.headers
            assert.equal("/ws/echo?room=a%2Fb", seen.target)
            assert.equal("v2.chat", seen.protocol)
            assert.same({ "sid=42", "Bearer t", "http://front.example", "203.0.113.9, 127.0.0.1", "http" },
                        { h.cookie, h.authorization, h.origin, h["x-forwarded-for"], h["x-forwarded-proto"] })
            assert.equal("127.0.0.1:" .. port, h["x-forwarded-host"])
            c:close(1000)
        end)

        it("passes the upstream's 101 headers on but the handshake's own, cookies rewritten", function()
            local app = moonlet.app()
            app:websocket("/ws/*rest", function(ws) ws:send("hi") end, { headers = {
                ["Set-Cookie"] = { "sid=1; Path=/ws", "pref=2; Domain=up.internal" },
                ["X-Up"] = "yes", ["Cache-Control"] = "no-store",
            } })
            local up = test.serving(app)
            local port = front({ upstream = "http://127.0.0.1:" .. up, strip_prefix = "/api",
                                 cookie_path = { ["/ws"] = "/api/ws" },
                                 cookie_domain = { ["up.internal"] = "front.example" } })
            local sock = test.connect(port)
            test.defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/api/ws/x", { headers = {
                Upgrade = "websocket", Connection = "Upgrade", ["Sec-WebSocket-Version"] = "13",
                ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ==" } })))
            local head = read_head(sock)
            local h = head.headers
            assert.equal(101, head.status)
            assert.same({ "sid=1; Path=/api/ws", "pref=2; Domain=front.example" }, h["set-cookie"])
            assert.same({ { "yes" }, { "no-store" } }, { h["x-up"], h["cache-control"] })
            assert.same({ { "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" }, { "websocket" }, { "Upgrade" } },
                        { h["sec-websocket-accept"], h.upgrade, h.connection })
            assert.equal(1, #h.date)
            assert.equal(1, #h.server)
        end)

        it("passes the client's Host on with preserve_host", function()
            local seen = {}
            local port, up = ws_pair(seen, { preserve_host = true })
            local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws/h", { timeout = 5 }))
            c:close(1000)
            assert.truthy(test.wait_until(function() return seen.code end, 5))
            assert.equal("127.0.0.1:" .. port, seen.headers.host)
            assert.not_equal(port, up)
        end)

        it("passes a close with its code and reason on, both ways, and leaves nothing open", function()
            local seen = {}
            local port = ws_pair(seen)
            local before = test.settled_stats() -- (the two servers listening)
            local url = "ws://127.0.0.1:" .. port .. "/api/ws/x"
            local c = assert(moonlet.ws.connect(url, { timeout = 5 }))
            assert(c:send("ping"))
            assert.equal("ping", c:receive(5))
            c:close(4001, "from client")
            assert.same({ nil, "closed" }, { c:receive(5) })
            assert.truthy(test.wait_until(function() return seen.code end, 5))
            assert.same({ 4001, "from client" }, { seen.code, seen.reason })
            -- and from the upstream to the client
            seen.code = nil
            c = assert(moonlet.ws.connect(url, { timeout = 5 }))
            assert(c:send("close me"))
            assert.same({ nil, "closed" }, { c:receive(5) })
            assert.same({ 4002, "from upstream" }, { c.close_code, c.close_reason })
            -- a close frame without a code stays one
            seen.code = nil
            c = assert(moonlet.ws.connect(url, { timeout = 5 }))
            c:close(1005)
            assert.truthy(test.wait_until(function() return seen.code end, 5))
            assert.same({ 1005, "" }, { seen.code, seen.reason })
            back_to(before)
        end)

        it("closes the upstream leg with 1001 when the client drops its connection", function()
            local seen = {}
            local port = ws_pair(seen)
            local before = test.settled_stats() -- (the two servers listening)
            local sock = test.connect(port, 5)
            assert(sock:send("GET /api/ws/drop HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                .. "Sec-WebSocket-Version: 13\r\n\r\n"))
            local resp = assert(test.read_response(sock))
            assert.equal(101, resp.status)
            assert.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", resp.headers["sec-websocket-accept"])
            assert.truthy(test.wait_until(function() return seen.target end, 5))
            sock:close() -- no close frame: a drop
            assert.truthy(test.wait_until(function() return seen.code end, 5))
            assert.same({ 1001, "going away" }, { seen.code, seen.reason })
            back_to(before)
        end)

        it("closes the client with 1014 when the upstream drops its connection", function()
            -- an upstream that completes the handshake, then drops the TCP connection at a word
            local drop = moonlet.event()
            local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock)
                    local key
                    repeat
                        local line = sock:receive("*l")
                        key = key or (line and line:match("^[Ss]ec%-[Ww]eb[Ss]ocket%-[Kk]ey:%s*(%S+)"))
                    until not line or line == ""
                    local accept = core.base64_encode(moonlet.crypto.digest("sha1",
                        key .. "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
                    sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        .. "Connection: Upgrade\r\nSec-WebSocket-Accept: " .. accept .. "\r\n\r\n")
                    drop:wait(5)
                    sock:close()
                end))
            test.defer(function() server:close() end)
            local port = front("http://127.0.0.1:" .. server:port())
            local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/x", { timeout = 5 }))
            drop:set()
            assert.same({ nil, "closed" }, { c:receive(5) })
            assert.same({ 1014, "bad gateway" }, { c.close_code, c.close_reason })
            -- an upstream whose 101 is wrong (its accept key): 502 before the client's upgrade
            server:close()
            server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock)
                    repeat local line = sock:receive("*l") until not line or line == ""
                    sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        .. "Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
                    sock:close()
                end))
            port = front("http://127.0.0.1:" .. server:port())
            local err
            c, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/x", { timeout = 5 })
            assert.same({ nil, "handshake failed: status 502" }, { c, err })
        end)

        it("passes the code of an upstream handler that raised (1011) on", function()
            local app = moonlet.app()
            app:websocket("/boom", function(ws)
                ws:receive(5)
                error("boom")
            end)
            local port = front({ upstream = "http://127.0.0.1:" .. test.serving(app), strip_prefix = "/api" })
            local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/boom", { timeout = 5 }))
            assert(c:send("go"))
            assert.same({ nil, "closed" }, { c:receive(5) })
            assert.same({ 1011, "internal error" }, { c.close_code, c.close_reason })
        end)

        it("answers 502 when the upstream refuses the connection, and its 4xx to the handshake", function()
            local c, err = moonlet.ws.connect("ws://127.0.0.1:" .. front("http://127.0.0.1:1") .. "/api/x",
                                              { timeout = 5 })
            assert.same({ nil, "handshake failed: status 502" }, { c, err })
            local app = moonlet.app()
            app:websocket("/ws", function() end, { origin = "http://good.example" })
            local port = front({ upstream = "http://127.0.0.1:" .. test.serving(app), strip_prefix = "/api" })
            c, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws",
                                        { timeout = 5, origin = "http://evil.example" })
            assert.same({ nil, "handshake failed: status 403" }, { c, err })
            -- not a handshake: the route's usual answer, and nothing sent on
            local resp = test.request(port, "GET", "/api/ws", { headers = { Upgrade = "websocket" } })
            assert.equal(400, resp.status)
        end)

        it("passes an upstream's refusal of the handshake on: status, end-to-end headers, body", function()
            -- a raw upstream that answers each handshake otherwise than 101, its body in pieces:
            -- chunked (with a trailer), by Content-Length, and to the close
            local server
            server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock)
                    local target = sock:receive("*l"):match("^GET (%S+)")
                    repeat local line = sock:receive("*l") until not line or line == ""
                    local head = "X-Hop: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1; Path=/\r\n"
                        .. "Set-Cookie: b=2\r\nLocation: http://127.0.0.1:" .. server:port()
                        .. "/login?next=%2Fws\r\nContent-Type: text/plain\r\n"
                        .. "WWW-Authenticate: Bearer realm=\"up\"\r\n"
                    if target == "/chunked" then
                        sock:send("HTTP/1.1 401 Unauthorized\r\nConnection: keep-alive, X-Hop\r\n" .. head
                            .. "Transfer-Encoding: chunked\r\n\r\n6\r\nlog in\r\n")
                        sock:send("7\r\n first\n\r\n0\r\nX-Trailer: t\r\n\r\n")
                        sock:receive("*a") -- (a keep-alive answer: the proxy closes the connection)
                    elseif target == "/length" then
                        sock:send("HTTP/1.1 403 Forbidden\r\nConnection: X-Hop\r\n" .. head
                            .. "Content-Length: 13\r\n\r\nnot ")
                        sock:send("for you\n\n")
                        sock:receive("*a")
                    else
                        sock:send("HTTP/1.1 404 Not Found\r\nConnection: close, X-Hop\r\n" .. head
                            .. "\r\nno such ")
                        sock:send("socket\n")
                    end
                    sock:close()
                end))
            test.defer(function() server:close() end)
            local port = front({ upstream = "http://127.0.0.1:" .. server:port(), strip_prefix = "/api" })
            for _, want in ipairs({ { "chunked", 401, "log in first\n" },
                                    { "length", 403, "not for you\n\n" },
                                    { "close", 404, "no such socket\n" } }) do
                local sock = test.connect(port)
                assert(sock:send(test.format_request("GET", "/api/" .. want[1], { headers = {
                    Host = "front.example", Upgrade = "websocket", Connection = "Upgrade",
                    ["Sec-WebSocket-Version"] = "13", ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ==",
                } })))
                local head = read_head(sock)
                local h = head.headers
                assert.equal(want[2], head.status)
                assert.same({ "a=1; Path=/", "b=2" }, h["set-cookie"]) -- each its own line
                assert.same({ { "http://front.example/api/login?next=%2Fws" }, { 'Bearer realm="up"' },
                              { "text/plain" } }, { h.location, h["www-authenticate"], h["content-type"] })
                for _, name in ipairs({ "x-hop", "keep-alive", "upgrade", "transfer-encoding", "x-trailer",
                                        "sec-websocket-accept" }) do
                    assert.is_nil(h[name], name)
                end
                assert.same({ { tostring(#want[3]) }, 1, 1 }, { h["content-length"], #h.date, #h.server })
                assert.equal(want[3], sock:receive(#want[3]))
                sock:close()
            end
            -- moonlet.ws.connect tells the same answer
            local c, err, answer = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/length",
                                                      { timeout = 5 })
            assert.same({ nil, "handshake failed: status 403" }, { c, err })
            assert.same({ 403, "not for you\n\n", "text/plain", "a=1; Path=/\nb=2" },
                        { answer.status, answer.body, answer.headers["content-type"],
                          answer.headers["set-cookie"] })
        end)

        it("answers 504 when the upstream does not finish the handshake within timeout", function()
            local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock) sock:receive("*a") end))
            test.defer(function() server:close() end)
            local port = front({ upstream = "http://127.0.0.1:" .. server:port(), timeout = 0.2 })
            local c, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/x", { timeout = 5 })
            assert.same({ nil, "handshake failed: status 504" }, { c, err })
        end)

        it("relays a 1 MiB message intact and a burst of messages in order", function()
            local port = ws_pair({})
            local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws/big",
                                                { timeout = 5 }))
            local parts = {}
            for i = 1, 1024 * 1024 / 8 do parts[i] = ("%07x\n"):format(i) end
            local big = table.concat(parts)
            assert(c:send(big, "binary"))
            local got, kind = c:receive(10)
            assert.equal("binary", kind)
            assert.equal(#big, #got)
            assert.is_true(got == big)
            local writer = moonlet.spawn(function()
                for i = 1, 2000 do assert(c:send("m" .. i)) end
            end)
            for i = 1, 2000 do assert.equal("m" .. i, c:receive(10)) end
            assert.is_true(writer:join(5))
            c:close(1000)
        end)

        it("refuses a message over max_message from the client with 1009, passed on", function()
            local seen = {}
            local port = ws_pair(seen, { websocket = { max_message = 1000 } })
            local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws/x",
                                                { timeout = 5 }))
            assert(c:send(("x"):rep(1001)))
            assert.same({ nil, "closed" }, { c:receive(5) })
            assert.equal(1009, c.close_code)
            assert.truthy(test.wait_until(function() return seen.code end, 5))
            assert.equal(1009, seen.code)
        end)

        it("sends an upgrade on as plain HTTP with websocket = false", function()
            local seen = {}
            local port = ws_pair(seen, { websocket = false })
            local c, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws/x", { timeout = 5 })
            assert.same({ nil, "handshake failed: status 426" }, { c, err })
        end)
    end)

    describe("Upgrade tunnel", function()
        -- A raw upstream speaking a line protocol after "Upgrade: foo/1": it greets, answers each
        -- line "up: <line>" ("big N": N bytes, "bye": a last line, then it closes), and records
        -- the request's head and whether the front closed its side. /none answers 404 instead.
        local function foo_upstream(seen)
            local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock)
                    seen.request = sock:receive("*l")
                    seen.headers = {}
                    while true do
                        local line = sock:receive("*l")
                        if not line or line == "" then break end
                        local k, v = line:match("^([^:]+):%s*(.*)$")
                        seen.headers[k:lower()] = v
                    end
                    if seen.request:find("/none", 1, true) then
                        sock:send("HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nX-Up: no\r\n\r\nnope\n")
                        return sock:close()
                    end
                    sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo/1\r\nConnection: Upgrade\r\n"
                        .. "X-Up: yes\r\nSet-Cookie: t=1\r\nSet-Cookie: u=2\r\n\r\nhello from upstream\n")
                    while true do
                        local line = sock:receive("*l")
                        if not line then break end
                        local n = tonumber(line:match("^big (%d+)$"))
                        if n then
                            sock:send(("x"):rep(n))
                        elseif line == "bye" then
                            sock:send("so long\n")
                            break
                        else
                            sock:send("up: " .. (#line > 100 and "#" .. #line or line) .. "\n")
                        end
                    end
                    seen.closed = true
                    sock:close()
                end))
            test.defer(function() server:close() end)
            return "http://127.0.0.1:" .. server:port()
        end

        local function upgrade(port, path, extra)
            local sock = test.connect(port)
            test.defer(function() sock:close() end)
            assert(sock:send("GET " .. path .. " HTTP/1.1\r\nHost: front.example\r\nConnection: Upgrade\r\n"
                .. "Upgrade: foo/1\r\nX-Client: c\r\n\r\n" .. (extra or "")))
            return sock, read_head(sock)
        end

        it("relays the bytes both ways after the upstream's 101, until the client closes", function()
            local seen = {}
            local port = front({ upstream = foo_upstream(seen), strip_prefix = "/api" })
            local before = test.settled_stats()
            local sock, head = upgrade(port, "/api/t?x=1", "early\n") -- (bytes right after the head)
            local h = head.headers
            assert.equal(101, head.status)
            assert.same({ { "foo/1" }, { "Upgrade" }, { "yes" }, { "t=1", "u=2" } },
                        { h.upgrade, h.connection, h["x-up"], h["set-cookie"] })
            assert.same({ "GET /t?x=1 HTTP/1.1", "foo/1", "Upgrade", "c", "127.0.0.1" },
                        { seen.request, seen.headers.upgrade, seen.headers.connection,
                          seen.headers["x-client"], seen.headers["x-forwarded-for"] })
            assert.equal("hello from upstream", sock:receive("*l"))
            assert.equal("up: early", sock:receive("*l"))
            assert(sock:send("ping 1\n"))
            assert.equal("up: ping 1", sock:receive("*l"))
            -- 4 MiB down and 2 MiB up, intact, through the backpressure of both legs
            assert(sock:send("big 4194304\n"))
            local big = assert(sock:receive(4194304))
            assert.is_true(big == ("x"):rep(4194304))
            assert(sock:send(("y"):rep(2 * 1024 * 1024) .. "\n"))
            assert.equal("up: #2097152", sock:receive("*l"))
            sock:close()
            assert.truthy(test.wait_until(function() return seen.closed end, 5))
            back_to(before)
        end)

        it("closes the client's connection after the upstream's last bytes when it closes", function()
            local seen = {}
            local port = front({ upstream = foo_upstream(seen), strip_prefix = "/api" })
            local before = test.settled_stats()
            local sock, head = upgrade(port, "/api/t")
            assert.equal(101, head.status)
            assert.equal("hello from upstream", sock:receive("*l"))
            assert(sock:send("bye\n"))
            assert.equal("so long", sock:receive("*l"))
            assert.same({ nil, "closed", "" }, { sock:receive("*l") }) -- (nothing after the last line)
            sock:close()
            back_to(before)
        end)

        it("ends the tunnel when the server shuts down, leaving nothing open", function()
            local seen = {}
            local app = moonlet.app()
            app:any("/api/*path", moonlet.proxy({ upstream = foo_upstream(seen), strip_prefix = "/api" }))
            local before = test.settled_stats()
            local server, port = test.serve(app)
            local sock, head = upgrade(port, "/api/t")
            assert.equal(101, head.status)
            assert.equal("hello from upstream", sock:receive("*l"))
            server:shutdown()
            assert.same({ nil, "closed", "" }, { sock:receive("*l") }) -- (nothing after the last line)
            sock:close()
            assert.truthy(test.wait_until(function() return seen.closed end, 5))
            sock:close()
            server:close()
            back_to(before)
        end)

        it("passes an answer other than 101 on as any other, and upgrade = false sends no Upgrade", function()
            local seen = {}
            local base = foo_upstream(seen)
            local port = front({ upstream = base, strip_prefix = "/api" })
            local sock, head = upgrade(port, "/api/none")
            assert.same({ 404, { "no" }, "nope\n" }, { head.status, head.headers["x-up"], sock:receive(5) })
            assert.equal("foo/1", seen.headers.upgrade)
            -- upgrade = false: the request goes on as plain HTTP, without its Upgrade
            seen.headers = nil
            port = front({ upstream = base, strip_prefix = "/api", upgrade = false })
            head = select(2, upgrade(port, "/api/none"))
            assert.equal(404, head.status)
            assert.is_nil(seen.headers.upgrade)
        end)

        -- The tunnel's timeout is nginx's for an upgraded connection: it ends only when neither
        -- direction carried a byte for timeout seconds. A raw upstream that answers 101, then on
        -- /tick sends "t" every 0.1 s (seen.ticks of them), on /stall reads nothing until the front
        -- closes, and otherwise counts the bytes it reads (seen.bytes); seen.closed once the front
        -- closed its side.
        local function quiet_upstream(seen)
            local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 10 },
                function(sock)
                    local request = sock:receive("*l")
                    repeat local line = sock:receive("*l") until not line or line == ""
                    sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo/1\r\n"
                        .. "Connection: Upgrade\r\n\r\n")
                    seen.bytes, seen.ticks = 0, 0
                    if request:find("/tick", 1, true) then
                        for _ = 1, 10 do
                            moonlet.sleep(0.1)
                            if not sock:send("t") then break end
                            seen.ticks = seen.ticks + 1
                        end
                    elseif request:find("/stall", 1, true) then
                        -- (the front's sends fill the socket's buffers: its own send waits)
                        while not seen.stop do moonlet.sleep(0.05) end
                    end
                    while sock:receive_any(65536) do seen.bytes = seen.bytes + 1 end
                    seen.closed = true
                    sock:close()
                end))
            test.defer(function() server:close() end)
            return "http://127.0.0.1:" .. server:port()
        end
        -- A front to quiet_upstream(seen) with a timeout of 0.6 s: its port.
        local function quiet_front(seen)
            return front({ upstream = quiet_upstream(seen), strip_prefix = "/api", timeout = 0.6 })
        end

        it("keeps a tunnel open while only the client talks, past timeout", function()
            local seen = {}
            local port = quiet_front(seen)
            local sock, head = upgrade(port, "/api/count")
            assert.equal(101, head.status)
            for i = 1, 10 do -- (1 s: past timeout, the upstream silent all along)
                moonlet.sleep(0.1)
                assert.is_nil(seen.closed)
                assert(sock:send("x"))
                assert.truthy(test.wait_until(function() return seen.bytes == i end, 2))
            end
            assert.is_nil(seen.closed)
        end)

        it("keeps a tunnel open while only the upstream talks, past timeout", function()
            local seen = {}
            local port = quiet_front(seen)
            local sock, head = upgrade(port, "/api/tick")
            assert.equal(101, head.status)
            assert.equal(("t"):rep(10), sock:receive(10)) -- (1 s, the client silent all along)
            assert.same({ 10, nil }, { seen.ticks, seen.closed })
        end)

        it("closes both sides once neither said anything for timeout, leaving nothing open", function()
            local seen = {}
            local port = quiet_front(seen)
            local before = test.settled_stats()
            local sock, head = upgrade(port, "/api/idle")
            assert.equal(101, head.status)
            local t0 = core.now()
            assert.same({ nil, "closed", "" }, { sock:receive(1) }) -- (the client's socket: 5 s)
            assert.is_true(core.now() - t0 < 4)
            assert.truthy(test.wait_until(function() return seen.closed end, 2))
            sock:close()
            back_to(before)
            -- and the next tunnel through the same proxy works as the first did
            seen.closed = nil
            sock, head = upgrade(port, "/api/count")
            assert.equal(101, head.status)
            assert(sock:send("abc"))
            assert.truthy(test.wait_until(function() return seen.bytes > 0 end, 2))
            assert.same({ nil, "closed", "" }, { sock:receive(1) })
            assert.truthy(test.wait_until(function() return seen.closed end, 2))
        end)

        it("ends a tunnel whose send to the upstream waited timeout seconds", function()
            local seen = {}
            local port = quiet_front(seen)
            local before = test.settled_stats()
            local sock, head = upgrade(port, "/api/stall")
            assert.equal(101, head.status)
            local writer = moonlet.spawn(function() -- (until the front stops taking them)
                local chunk = ("z"):rep(65536)
                while sock:send(chunk) do end
            end)
            test.defer(function() writer:cancel() end)
            assert.same({ nil, "closed", "" }, { sock:receive(1) }) -- (the client's socket: 5 s)
            seen.stop = true
            assert.truthy(test.wait_until(function() return seen.closed end, 2))
            sock:close()
            writer:join()
            back_to(before)
        end)
    end)

    it("proxies HTTP and WebSockets to an https:// upstream, checked against tls.cafile", function()
        local certs = test.make_certs()
        test.defer(function() test.remove_certs(certs) end)
        local app = moonlet.app()
        app:websocket("/ws", function(ws) for msg in ws:messages() do ws:send("up: " .. msg) end end)
        app:get("/*any", function(req) return req.scheme .. " " .. req.target end)
        local up = test.serving(app, { tls = { cert = certs.cert, key = certs.key } })
        local base = "https://127.0.0.1:" .. up
        local port = front({ upstream = base, strip_prefix = "/api", tls = { cafile = certs.ca } })
        local resp = test.request(port, "GET", "/api/x?y=1")
        assert.same({ 200, "https /x?y=1" }, { resp.status, resp.body })
        local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws", { timeout = 5 }))
        assert(c:send("hi"))
        assert.equal("up: hi", c:receive(5))
        c:close(1000)
        -- another CA's certificate: 502 both ways, as the certificate was not checked before
        local other = front({ upstream = base, strip_prefix = "/api", tls = { cafile = certs.other_ca } })
        assert.equal(502, test.request(other, "GET", "/api/x").status)
        local none, err = moonlet.ws.connect("ws://127.0.0.1:" .. other .. "/api/ws", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 502" }, { none, err })
        local any = front({ upstream = base, strip_prefix = "/api", tls = { verify = false } })
        assert.equal("https /x", test.request(any, "GET", "/api/x").body)
    end)

    it("presents tls.cert and tls.key to an upstream that requires a client certificate", function()
        local certs = test.make_certs()
        test.defer(function() test.remove_certs(certs) end)
        local app = moonlet.app()
        app:websocket("/ws", function(ws) for msg in ws:messages() do ws:send("up: " .. msg) end end)
        app:get("/*any", function(req) return "client certificate " .. req.target end)
        local up = test.serving(app, { tls = { cert = certs.cert, key = certs.key, client_ca = certs.ca,
                                               verify_client = true } })
        local function through(tls)
            tls.cafile = certs.ca
            local port = front({ upstream = "https://127.0.0.1:" .. up, strip_prefix = "/api", tls = tls })
            local resp = test.request(port, "GET", "/api/x")
            local c, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws", { timeout = 5 })
            local echo = c and c:send("hi") and c:receive(5)
            if c then c:close(1000) end
            return { resp.status, resp.body, echo or err }
        end
        assert.same({ 200, "client certificate /x", "up: hi" },
                    through({ cert = certs.client_cert, key = certs.client_key }))
        -- none, or one of another CA: the upstream refuses the TLS handshake, 502 both ways
        assert.same({ 502, "502 Bad Gateway\n", "handshake failed: status 502" }, through({}))
        assert.same({ 502, "502 Bad Gateway\n", "handshake failed: status 502" },
                    through({ cert = certs.other_client_cert, key = certs.other_client_key }))
        -- a file that does not load: 502, and the log line names it
        local lines, log = {}, core.log
        core.log = function(level, msg) -- luacheck: ignore (the proxy logs through core.log)
            lines[#lines + 1] = msg
            return log(level, msg)
        end
        test.defer(function() core.log = log end) -- luacheck: ignore
        local missing = certs.dir .. "/missing.pem"
        assert.same({ 502, "502 Bad Gateway\n", "handshake failed: status 502" },
                    through({ cert = missing, key = certs.client_key }))
        core.log = log -- luacheck: ignore
        assert.equal(2, #lines)
        for _, line in ipairs(lines) do
            assert.truthy(line:find("tls: cannot load certificate (" .. missing .. ")", 1, true), line)
        end
    end)

    it("sets X-Real-IP to req.ip with real_ip, else passes the client's on", function()
        local base = upstream()
        local port = front({ upstream = base, real_ip = true })
        local h = moonlet.json.decode(test.request(port, "GET", "/api/h", { headers = {
            ["X-Real-IP"] = "203.0.113.9" } }).body).headers
        assert.equal("127.0.0.1", h["x-real-ip"])
        h = moonlet.json.decode(test.request(front(base), "GET", "/api/h", { headers = {
            ["X-Real-IP"] = "203.0.113.9" } }).body).headers
        assert.equal("203.0.113.9", h["x-real-ip"])
    end)

    -- (req.peer and req.scheme are read from the exchange when nothing read them before)
    it("sends the scheme moonlet.forwarded took from a trusted proxy, and the peer's address", function()
        local base = upstream()
        local app = moonlet.app()
        app:use(moonlet.forwarded({ trusted = { "127.0.0.1" } }))
        app:any("/api/*path", moonlet.proxy({ upstream = base, real_ip = true }))
        local port = test.serving(app)
        local h = moonlet.json.decode(test.request(port, "GET", "/api/h", { headers = {
            ["X-Forwarded-For"] = "203.0.113.9", ["X-Forwarded-Proto"] = "https" } }).body).headers
        assert.same({ "https", "203.0.113.9, 127.0.0.1", "203.0.113.9" },
            { h["x-forwarded-proto"], h["x-forwarded-for"], h["x-real-ip"] })
    end)

    describe("several upstreams", function()
        -- An upstream app answering its name to anything, counting the requests it had.
        local function named(name)
            local n = { count = 0 }
            local app = moonlet.app()
            app:any("/*", function()
                n.count = n.count + 1
                return name
            end)
            return "http://127.0.0.1:" .. test.serving(app), n
        end
        -- A raw upstream that counts its connections and closes each without an answer (after the
        -- request head when had_request: it had the request).
        local function closing(had_request)
            local n = { count = 0 }
            local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock)
                    n.count = n.count + 1
                    if had_request then
                        repeat local line = sock:receive("*l") until not line or line == ""
                    end
                    sock:close()
                end))
            test.defer(function() server:close() end)
            return "http://127.0.0.1:" .. server:port(), n
        end
        -- A raw upstream that holds its first connection, after the request head, until release is
        -- set (held is set meanwhile), then closes it unanswered; it closes any later one at once.
        local function holding()
            local release, held, n = moonlet.event(), moonlet.event(), { count = 0 }
            local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5 },
                function(sock)
                    n.count = n.count + 1
                    if n.count == 1 then
                        repeat local line = sock:receive("*l") until not line or line == ""
                        held:set()
                        release:wait(5)
                    end
                    sock:close()
                end))
            test.defer(function() release:set(); server:close() end)
            return "http://127.0.0.1:" .. server:port(), release, held, n
        end
        -- An upstream WebSocket at /ws answering each message with "up: " .. it.
        local function ws_echo()
            local app = moonlet.app()
            app:websocket("/ws", function(ws)
                for msg in ws:messages() do ws:send("up: " .. msg) end
            end)
            return "http://127.0.0.1:" .. test.serving(app)
        end
        local function bodies(port, n, method, body)
            local got = {}
            for i = 1, n do
                local resp = test.request(port, method or "GET", "/api/x", { body = body })
                got[i] = resp.status .. " " .. resp.body
            end
            return got
        end

        it("takes them in turn", function()
            local a = named("a")
            local b = named("b")
            local port = front({ upstream = { a, b }, strip_prefix = "/api" })
            assert.same({ "200 a", "200 b", "200 a", "200 b" }, bodies(port, 4))
        end)

        it("goes on to the next after a failure and leaves the failed one out for fail_timeout", function()
            local dead, seen = closing()
            local b = named("b")
            local port = front({ upstream = { dead, b }, fail_timeout = 0.3 })
            assert.same({ "200 b", "200 b", "200 b", "200 b" }, bodies(port, 4))
            assert.equal(1, seen.count) -- tried once, then left out
            moonlet.sleep(0.35)
            assert.same({ "200 b", "200 b" }, bodies(port, 2))
            assert.equal(2, seen.count) -- tried again once fail_timeout had passed
        end)

        it("leaves one out after max_fails failures", function()
            local dead, seen = closing()
            local b = named("b")
            local port = front({ upstream = { dead, b }, max_fails = 2 })
            assert.same({ "200 b", "200 b", "200 b", "200 b", "200 b" }, bodies(port, 5))
            assert.equal(2, seen.count)
        end)

        it("answers 502 when every one failed, then tries none until fail_timeout has passed", function()
            local d1, s1 = closing()
            local d2, s2 = closing()
            local port = front({ upstream = { d1, d2 }, fail_timeout = 0.3 })
            assert.same({ "502 502 Bad Gateway\n", "502 502 Bad Gateway\n" }, bodies(port, 2))
            assert.same({ 1, 1 }, { s1.count, s2.count })
            moonlet.sleep(0.35)
            assert.same({ "502 502 Bad Gateway\n" }, bodies(port, 1))
            assert.same({ 2, 2 }, { s1.count, s2.count })
        end)

        it("sends a POST that reached an upstream nowhere else; one refused goes on", function()
            local got_it, seen = closing(true)
            local b, nb = named("b")
            local port = front({ upstream = { got_it, b } })
            assert.same({ "502 502 Bad Gateway\n" }, bodies(port, 1, "POST", "data"))
            assert.same({ 1, 0 }, { seen.count, nb.count })
            port = front({ upstream = { "http://127.0.0.1:1", b } })
            assert.same({ "200 b", "200 b" }, bodies(port, 2, "POST", "data"))
            assert.equal(2, nb.count)
        end)

        it("tries each at most once, whatever turns other requests took while it waited", function()
            local a, release, held, na = holding()
            local b = named("b")
            local port = front({ upstream = { a, b }, strip_prefix = "/api", max_fails = 0 })
            local first = moonlet.spawn(function() return test.request(port, "GET", "/api/x") end)
            assert.is_true(held:wait(5)) -- the first request waits on "a"
            local second = test.request(port, "GET", "/api/x") -- "b"'s turn
            assert.same({ 200, "b" }, { second.status, second.body })
            release:set() -- "a" fails the first request: it goes on to "b", not to "a" again
            local ok, resp = first:join()
            assert.same({ true, 200, "b", 1 }, { ok, resp.status, resp.body, na.count })
        end)

        it("tries no other with next_upstream = false", function()
            local dead, seen = closing()
            local b = named("b")
            local port = front({ upstream = { dead, b }, next_upstream = false })
            assert.same({ "502 502 Bad Gateway\n", "200 b", "200 b" }, bodies(port, 3))
            assert.equal(1, seen.count)
        end)

        it("opens a WebSocket on the next upstream when one refuses the connection", function()
            local port = front({ upstream = { "http://127.0.0.1:1", ws_echo() }, strip_prefix = "/api" })
            for _ = 1, 2 do
                local c = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/ws", { timeout = 5 }))
                assert(c:send("hi"))
                assert.equal("up: hi", (c:receive(5)))
                c:close(1000)
            end
        end)

        it("opens a WebSocket on an upstream it has not tried, whatever turns others took", function()
            local a, release, held, na = holding()
            local port = front({ upstream = { a, ws_echo() }, strip_prefix = "/api", max_fails = 0 })
            local url = "ws://127.0.0.1:" .. port .. "/api/ws"
            local first = moonlet.spawn(function()
                local c = assert(moonlet.ws.connect(url, { timeout = 5 }))
                assert(c:send("one"))
                local got = c:receive(5)
                c:close(1000)
                return got
            end)
            assert.is_true(held:wait(5))
            local c = assert(moonlet.ws.connect(url, { timeout = 5 }))
            c:close(1000)
            release:set()
            assert.same({ true, "up: one" }, { first:join() })
            assert.equal(1, na.count)
        end)

        it("raises on a bad list or failure option", function()
            assert.has_error(function() moonlet.proxy({ upstream = {} }) end)
            assert.has_error(function() moonlet.proxy({ upstream = { "http://a", 5 } }) end)
            assert.has_error(function() moonlet.proxy({ upstream = { "http://a", x = "http://b" } }) end)
            assert.has_error(function() moonlet.proxy({ upstream = { "http://a", nil, "http://b" } }) end)
            assert.has_error(function() moonlet.proxy({ upstream = "http://a", max_fails = -1 }) end)
            assert.has_error(function() moonlet.proxy({ upstream = "http://a", max_fails = 1.5 }) end)
            assert.has_error(function() moonlet.proxy({ upstream = "http://a", fail_timeout = 0 }) end)
        end)
    end)

    it("raises on misuse", function()
        assert.has_error(function() moonlet.proxy() end)
        assert.has_error(function() moonlet.proxy("ftp://127.0.0.1/") end)
        assert.has_error(function() moonlet.proxy("http://127.0.0.1:9000/?a=1") end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", retries = 2 }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", strip_prefix = "api" }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", timeout = 0 }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", websocket = "yes" }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", websocket = { deflate = 1 } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", redirect = "default" }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", redirect = { ["/a"] = 1 } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", cookie_path = "/" }) end)
        local x = "http://x"
        assert.has_error(function() moonlet.proxy({ upstream = x, redirect = { ["~("] = "/" } }) end,
            "moonlet.proxy: redirect: bad regex ~(: pcre2_compile() failed: missing closing parenthesis")
        assert.has_error(function() moonlet.proxy({ upstream = x, cookie_path = { ["~(a)"] = "$" } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = x, redirect = { { "/a", "/b" }, c = "/" } })
                         end)
        -- a list with a hole: its rules after the hole were dropped without a word, or an index
        -- error came from inside proxy_rewrite.lua
        local either = "moonlet.proxy: redirect is either { [from] = to } or { { from, to }, ... }"
        assert.has_error(function()
            moonlet.proxy({ upstream = x, redirect = { { "/a", "/b" }, [3] = { "/c", "/d" } } })
        end, either)
        assert.has_error(function()
            moonlet.proxy({ upstream = x, redirect = { { "/a", "/b" }, nil, { "/c", "/d" } } })
        end, either)
        assert.has_error(function() moonlet.proxy({ upstream = x, redirect = { { "/a", "/b" }, [1.5] = {} } })
                         end, either)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", tls = { key = "c.key" } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", tls = { cert = true } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", tls = { alpn = "h2" } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", upgrade = "yes" }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", tls = { verify = "no" } }) end)
        assert.has_error(function() moonlet.proxy({ upstream = "http://x", cookie_domain = { a = 1 } }) end)
    end)
end)
