-- spec/http_client_spec.lua: moonlet.http, the HTTP/1.1 client, against local upstreams only:
-- moonlet apps (test.serve) for well-behaved servers, and raw moonlet.tcp servers for what an app
-- cannot do (count connections, hang, reset, send garbage, close-delimited bodies, TLS). Covers
-- bodies (Content-Length, chunked, close-delimited, streamed, gzip), keep-alive reuse and the pool
-- bound, redirects, timeouts, limits, concurrency, and that timed-out and cancelled requests leave
-- no handle, resource, task, pooled connection or Lua memory behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local zlib = require "moonlet.zlib"

local http = moonlet.http

local deferred
local function defer(fn)
    if not deferred then
        local list = {}
        deferred = list
        finally(function()
            deferred = nil
            http.close_idle() -- first: raw servers wait for their clients to go
            local first_err
            for i = #list, 1, -1 do
                local ok, err = pcall(list[i])
                if not ok and not first_err then first_err = err end
            end
            if first_err then error(first_err, 0) end
        end)
    end
    deferred[#deferred + 1] = fn
end

local function settle()
    moonlet.sleep(0) -- close callbacks of what just closed run in the next loop iteration
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
end

-- An app upstream; its handlers must be done before the end of the `it` (the server is closed).
local function serve(build)
    local app = moonlet.app()
    build(app)
    local server, port = test.serve(app)
    defer(function() server:close() end)
    return "http://127.0.0.1:" .. port, port
end

-- A raw upstream: handler(sock, st) runs for each connection; st counts them.
local function raw_server(handler, timeout)
    local st = { accepted = 0, active = 0 }
    local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = timeout or 5 },
        function(sock)
            st.accepted = st.accepted + 1
            st.active = st.active + 1
            local ok, err = pcall(handler, sock, st)
            st.active = st.active - 1
            if not ok and err ~= moonlet.CANCELLED then error(err, 0) end
        end))
    defer(function()
        server:close()
        test.wait_until(function() return st.active == 0 end, 5) -- handlers see the client go
    end)
    return "http://127.0.0.1:" .. server:port(), st
end

-- One request head (and its Content-Length body) from a raw server's socket, or nil at the end.
local function read_request(sock)
    local line = sock:receive("*l")
    if not line then return nil end
    local req = { line = line, headers = {} }
    req.method, req.target = line:match("^(%u+) (%S+) HTTP/1%.1$")
    while true do
        local h = sock:receive("*l")
        if not h then return nil end
        if h == "" then break end
        local k, v = h:match("^([^:]+):%s*(.-)%s*$")
        req.headers[k:lower()] = v
    end
    local n = tonumber(req.headers["content-length"] or 0)
    req.body = n > 0 and sock:receive(n) or ""
    return req
end

local function response(status, body, headers)
    local lines = { "HTTP/1.1 " .. status .. " X" }
    for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
    if not (headers and (headers["Transfer-Encoding"] or headers["Content-Length"])) then
        lines[#lines + 1] = "Content-Length: " .. #body
    end
    return table.concat(lines, "\r\n") .. "\r\n\r\n" .. body
end

-- A keep-alive raw server answering every request on a connection with answer(req, st).
local function keepalive_server(answer)
    return raw_server(function(sock, st)
        while true do
            local req = read_request(sock)
            if not req then return end
            local out, close = answer(req, st)
            sock:send(out)
            if close then return end
        end
    end)
end

-- A forward proxy: CONNECT makes a tunnel; a request with an absolute-form target is passed on to
-- its origin as it came (a moonlet server takes absolute form); then bytes flow both ways until
-- one side closes. st.lines: the first line of each request it got; st.auth: their
-- Proxy-Authorization; st.refuse: answer 407 instead.
local function proxy_server()
    local st
    local base
    base, st = raw_server(function(sock, state)
        local line = sock:receive("*l")
        if not line then return end
        state.lines[#state.lines + 1] = line
        local head = { line }
        while true do
            local h = sock:receive("*l")
            if not h then return end
            local pa = h:match("^[Pp]roxy%-[Aa]uthorization:%s*(.*)$")
            if pa then state.auth[#state.auth + 1] = pa end
            head[#head + 1] = h
            if h == "" then break end
        end
        if state.refuse then
            sock:send("HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        end
        local method, target = line:match("^(%u+) (%S+)")
        local host, port
        if method == "CONNECT" then
            host, port = target:match("^(.+):(%d+)$")
        else
            host, port = target:match("^http://([^/:]+):?(%d*)")
        end
        local up = assert(moonlet.tcp.connect(host, tonumber(port) or 80, { timeout = 5 }))
        if method == "CONNECT" then
            sock:send("HTTP/1.1 200 Connection established\r\n\r\n")
        else
            up:send(table.concat(head, "\r\n") .. "\r\n")
        end
        local back = moonlet.spawn(function()
            while true do
                local d = up:receive_any(65536)
                if not d or not sock:send(d) then break end
            end
            sock:close()
        end)
        while true do
            local d = sock:receive_any(65536)
            if not d or not up:send(d) then break end
        end
        up:close()
        back:join(5)
    end)
    st.lines, st.auth = {}, {}
    return base, st
end

local function stats_now()
    settle()
    local s = core.stats()
    return { handles = s.handles, resources = s.resources, tasks = s.tasks }
end

describe("moonlet.http", function()
    it("GETs a body with status, reason, lower-case headers and the HTTP version", function()
        local base = serve(function(app)
            app:get("/hello", function(_, res)
                res:header("X-Thing", "a")
                return "Hello, World!"
            end)
        end)
        local res, err = http.get(base .. "/hello", { timeout = 5 })
        assert.is_nil(err)
        assert.same(200, res.status)
        assert.same("OK", res.reason)
        assert.same("1.1", res.http_version)
        assert.same("Hello, World!", res.body)
        assert.same("text/plain; charset=utf-8", res.headers["content-type"])
        assert.same("13", res.headers["content-length"])
        assert.same("a", res.headers["x-thing"])
        assert.same({ "13", "a" }, { res.headers["Content-Length"], res.headers["X-Thing"] }) -- any case
        for name in pairs(res.headers) do assert.same(name:lower(), name) end
        assert.same(base .. "/hello", res.url)
    end)

    it("joins repeated headers with a comma and keeps an empty reason", function()
        local base = keepalive_server(function()
            return "HTTP/1.1 299\r\nX-A: 1\r\nx-a:  2 \r\nContent-Length: 2\r\n\r\nok"
        end)
        local res = assert(http.get(base .. "/"))
        assert.same({ 299, "", "1, 2", "ok" }, { res.status, res.reason, res.headers["x-a"], res.body })
    end)

    it("sends the method, headers, query and body, with sugar for each method", function()
        local base = serve(function(app)
            app:any("/echo", function(req)
                return { method = req.method, q = req.query.q, n = req.query.n, x = req.headers["x-a"],
                         ua = req.headers["user-agent"], host = req.headers.host,
                         body = req:body(), ctype = req.headers["content-type"] }
            end)
        end)
        local json = require "moonlet.json"
        local res = assert(http.request({ method = "POST", url = base .. "/echo?n=1",
            headers = { ["X-A"] = "b", ["Content-Type"] = "text/x-y" }, body = "payload",
            query = { q = "a b&c" } }))
        local got = json.decode(res.body)
        assert.same({ "POST", "a b&c", "1", "b", "payload", "text/x-y" },
            { got.method, got.q, got.n, got.x, got.body, got.ctype })
        assert.truthy(got.ua:find("^moonlet/"))
        assert.same(base:match("//(.*)$"), got.host)
        assert.same("PUT", json.decode(assert(http.put(base .. "/echo", "x")).body).method)
        assert.same("PATCH", json.decode(assert(http.patch(base .. "/echo", "x")).body).method)
        assert.same("DELETE", json.decode(assert(http.delete(base .. "/echo")).body).method)
        local posted = json.decode(assert(http.post(base .. "/echo", "a=1", {
            headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } })).body)
        assert.same({ "POST", "a=1" }, { posted.method, posted.body })
        local head = assert(http.head(base .. "/echo"))
        assert.same({ 200, "" }, { head.status, head.body })
    end)

    it("sends its User-Agent unless told another or none (user_agent = false)", function()
        local base = serve(function(app)
            app:get("/ua", function(req) return req.headers["user-agent"] or "(none)" end)
        end)
        assert.truthy(assert(http.get(base .. "/ua")).body:find("^moonlet/%d"))
        assert.same("probe/1", assert(http.get(base .. "/ua", { user_agent = "probe/1" })).body)
        assert.same("(none)", assert(http.get(base .. "/ua", { user_agent = false })).body)
        assert.same("mine", assert(http.get(base .. "/ua", { user_agent = false,
                                                             headers = { ["User-Agent"] = "mine" } })).body)
        http.configure({ user_agent = false })
        local ok, err = pcall(function()
            assert.same("(none)", assert(http.get(base .. "/ua")).body) -- the cached GET head too
            assert.same("(none)", assert(http.get(base .. "/ua?x=1")).body)
            assert.same("probe/2", assert(http.get(base .. "/ua", { user_agent = "probe/2" })).body)
        end)
        http.configure({ user_agent = "moonlet/" .. require("moonlet")._VERSION })
        assert(ok, err)
        assert.truthy(assert(http.get(base .. "/ua")).body:find("^moonlet/%d"))
        for _, bad in ipairs({ true, 7, "a\r\nX-Injected: 1" }) do -- misuse raises
            assert.has_error(function() http.get(base .. "/ua", { user_agent = bad }) end)
            assert.has_error(function() http.configure({ user_agent = bad }) end)
        end
    end)

    it("gives a whole body once through chunks() and read() too", function()
        local base = serve(function(app)
            app:get("/q", function(req) return req.query_string end)
        end)
        local res = assert(http.get(base .. "/q?a=1", { query = { b = { "x", "y z" }, c = true } }))
        assert.same("a=1&b=x&b=y%20z&c", res.body)
        assert.same(base .. "/q?a=1&b=x&b=y%20z&c", res.url)
        local got = {}
        for chunk in res:chunks() do got[#got + 1] = chunk end
        assert.same({ res.body }, got)
        assert.same({ res.body, nil }, { res:read_body(), res:read() })
        res:close() -- nothing left to drop: the body stays
        assert.same({ "a=1&b=x&b=y%20z&c", nil }, { res:read_body(), res:read() })
        assert.same("text/plain; charset=utf-8", res.headers["content-type"])
    end)

    it("reads chunked bodies", function()
        local base = serve(function(app)
            app:get("/countdown", function(_, res)
                for i = 3, 1, -1 do
                    res:write(string.rep(tostring(i), i * 1000))
                    moonlet.sleep(0.01)
                end
            end)
        end)
        local res = assert(http.get(base .. "/countdown"))
        assert.same("chunked", res.headers["transfer-encoding"])
        assert.is_true(string.rep("3", 3000) .. string.rep("2", 2000) .. string.rep("1", 1000) == res.body)
    end)

    it("reads a body delimited by the server closing the connection, and does not pool it", function()
        local base, st = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            moonlet.sleep(0.01)
            sock:send(string.rep("z", 100000))
        end)
        for _ = 1, 2 do
            local res = assert(http.get(base .. "/"))
            assert.same(100000, #res.body)
        end
        assert.same(2, st.accepted)
        assert.same(0, http.pool_stats().idle)
    end)

    it("answers connection refused", function()
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function() end))
        local port = server:port()
        server:close()
        assert.same({ nil, "connection refused" }, { http.get("http://127.0.0.1:" .. port .. "/") })
    end)

    it("times out on a server that never answers, and closes the connection", function()
        local base, st = raw_server(function(sock)
            read_request(sock)
            sock:receive("*a") -- until the client goes away
        end)
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { http.get(base .. "/", { timeout = 0.1 }) })
        assert.truthy(moonlet.now() - t0 < 2)
        assert.same({ nil, "timeout" }, { http.get(base .. "/", { read_timeout = 0.05 }) })
        assert.truthy(test.wait_until(function() return st.active == 0 end, 5)) -- the server saw it close
        assert.same(0, http.pool_stats().idle)
    end)

    it("times out a body that stops halfway (total timeout)", function()
        local base = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            sock:receive("*a")
        end)
        assert.same({ nil, "timeout" }, { http.get(base .. "/", { timeout = 0.1 }) })
        local res = assert(http.request({ url = base .. "/", stream = true, timeout = 0.1 }))
        assert.same(200, res.status)
        assert.same({ nil, "timeout" }, { res:read_body() })
    end)

    it("reports a reset or a close before the response as closed", function()
        local base = raw_server(function(sock)
            moonlet.sleep(0.02) -- the request is in, unread: closing now sends a reset
        end)
        assert.same({ nil, "closed" }, { http.get(base .. "/") })
        local base2 = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        end)
        assert.same({ nil, "closed" }, { http.get(base2 .. "/") })
    end)

    it("returns the answer a server gave before it closed on a request body still going out", function()
        local base = raw_server(function(sock)
            local never
            repeat -- the head only
                local l = sock:receive("*l")
                never = never or l == "X-Never: 1"
            until l == "" or not l
            if never then return end
            sock:send("HTTP/1.1 413 Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig")
        end) -- then closes, the body unread: the client's next sends fail
        local piece, n = string.rep("x", 65536), 0
        local res, err = http.post(base .. "/upload", function()
            n = n + 1
            if n <= 4096 then return piece end -- 256 MiB at most: far more than sockets buffer
        end)
        assert.same({ 413, "big", nil }, { res and res.status, res and res.body, err })
        assert.truthy(n < 4096) -- the sends did fail
        n = 0
        assert.same({ nil, "closed" }, { http.post(base .. "/upload", function() -- no answer: closed
            n = n + 1
            if n <= 4096 then return piece end
        end, { headers = { ["X-Never"] = "1" } }) })
    end)

    it("reports a close-delimited body cut by a reset as closed, not as the whole body", function()
        local base = raw_server(function(sock)
            moonlet.sleep(0.05) -- the request is in; left unread, the close below is a reset
            sock:send("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-body")
            moonlet.sleep(0.1)
        end)
        assert.same({ nil, "closed" }, { http.get(base .. "/") })
        local whole = raw_server(function(sock) -- the same body ended by a FIN is whole
            read_request(sock)
            sock:send("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nwhole-body")
        end)
        assert.same("whole-body", assert(http.get(whole .. "/")).body)
    end)

    it("refuses garbage as a bad response", function()
        local replies = {
            "garbage, not http\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        }
        local base = raw_server(function(sock, st)
            read_request(sock)
            sock:send(replies[st.accepted])
            sock:receive("*a")
        end)
        for i = 1, #replies do
            assert.same({ nil, "bad response" }, { http.get(base .. "/" .. i, { timeout = 2 }) })
        end
    end)

    it("skips 100 Continue and reads LF-only heads", function()
        local base = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\nX-Y: z\n\nbody")
        end)
        local res = assert(http.get(base .. "/"))
        assert.same({ 200, "1.0", "z", "body" },
            { res.status, res.http_version, res.headers["x-y"], res.body })
    end)
end)

describe("moonlet.http response parsing", function()
    -- A keep-alive raw server that answers the requests of a connection in turn with replies[i]
    -- (each a string, or an array of pieces sent one at a time with a yield in between).
    local function scripted_server(replies)
        return raw_server(function(sock, st)
            while true do
                local req = read_request(sock)
                if not req then return end
                st.n = (st.n or 0) + 1
                local r = replies[st.n]
                if type(r) == "string" then r = { r } end
                for _, piece in ipairs(r) do
                    sock:send(piece)
                    moonlet.sleep(0)
                end
            end
        end)
    end

    local function bytes(s)
        local t = {}
        for i = 1, #s do t[i] = s:sub(i, i) end
        return t
    end

    it("reads a response that arrives a byte at a time, head, chunks and trailers alike", function()
        local base, st = scripted_server({
            bytes("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"),
            bytes("HTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\n\r\n"
                .. "3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"),
            bytes("HTTP/1.0 200 OK\nConnection: keep-alive\nContent-Length: 2\n\nok"),
        })
        local res = assert(http.get(base .. "/1"))
        assert.same({ 200, "OK", "hello", "1" }, { res.status, res.reason, res.body, res.headers["x-a"] })
        res = assert(http.get(base .. "/2"))
        assert.same({ 201, "Made", "abcde" }, { res.status, res.reason, res.body })
        assert.is_nil(res.headers["x-trailer"])
        res = assert(http.get(base .. "/3"))
        assert.same({ "1.0", "ok", "keep-alive" }, { res.http_version, res.body, res.headers.connection })
        assert.same(1, st.accepted) -- all three on one connection
        assert.same(1, http.pool_stats().idle)
    end)

    it("answers nil, bad response to a malformed head or chunk and does not reuse the connection",
        function()
            local bad = {
                "HTTP/1.1 200 OK\r\nBad header line\r\nContent-Length: 2\r\n\r\nok",
                "HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok",
                "HTTP/1.1 200 OK\r\n folded-first: 1\r\nContent-Length: 2\r\n\r\nok",
                "HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok", -- bare LF, CRLF head
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1234567890abc\r\n",
                "HTTP/1.1 200 OK\r\n" .. string.rep("X-Many: 1\r\n", 201) .. "Content-Length: 0\r\n\r\n",
                "HTTP/1.1 20x OK\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 1 0\r\n\r\nok", -- blanks only around commas
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 junk\r\nok\r\n0\r\n\r\n",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;" .. string.rep("x", 17000)
                    .. "\r\nok\r\n0\r\n\r\n", -- a chunk-size line over 16 KiB
                "HTTP/1.1 200 OK\r\nX-Big: " .. string.rep("a", 70000) .. "\r\nContent-Length: 0\r\n\r\n",
                string.rep("HTTP/1.1 102 Processing\r\n\r\n", 17) -- more than 16 interim responses
                    .. "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            }
            local replies = {}
            for i, b in ipairs(bad) do
                replies[2 * i - 1] = response(200, "fine")
                replies[2 * i] = b
            end
            local base, st = raw_server(function(sock, s)
                s.n = s.n or 0
                while true do
                    local req = read_request(sock)
                    if not req then return end
                    s.n = s.n + 1
                    sock:send(replies[s.n])
                end
            end)
            for i = 1, #bad do
                assert.same("fine", assert(http.get(base .. "/", { timeout = 2 })).body)
                assert.same({ nil, "bad response" }, { http.get(base .. "/", { timeout = 2 }) }, bad[i])
                assert.same(0, http.pool_stats().idle) -- the connection was closed, not pooled
                assert.same(i, st.accepted)
            end
        end)

    -- RFC 9110 8.6: digits only, one value; and a Lua number holds a length exactly up to 2^53
    it("refuses a Content-Length with a sign, differing values, or over 2^53: bad response", function()
        local bad = { "+2", "-2", "2, 3", "2,,3", "9007199254740993", "18446744073709551618",
                      string.rep("9", 40) }
        local n = 0
        local up = raw_server(function(sock)
            read_request(sock)
            n = n + 1
            local v = bad[n] or "9007199254740992"
            sock:send("HTTP/1.1 200 OK\r\nContent-Length: " .. v .. "\r\n\r\nok")
        end) -- the server closes after "ok": a length taken for more than 2 reads "closed"
        for i = 1, #bad do
            assert.same({ nil, "bad response" }, { http.get(up .. "/", { timeout = 5 }) }, bad[i])
        end
        -- 2^53 is still a length (and over max_body here, so refused before the body is read)
        assert.same({ nil, "too large" }, { http.get(up .. "/", { timeout = 5, max_body = 10 }) })
    end)

    it("refuses a 101 the request did not ask for, and speaks the new protocol of one it did", function()
        local base = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nfoo!")
            local line = sock:receive("*l") -- the switched connection stays open until the client
                                            -- closes it
            if line then sock:send("got " .. line) end
            sock:receive("*l")
        end)
        assert.same({ nil, "bad response" }, { http.get(base .. "/", { read_timeout = 2 }) })
        local res = assert(http.get(base .. "/", { stream = true, headers = { Upgrade = "foo",
                                                                               Connection = "Upgrade" } }))
        assert.same({ 101, "foo!" }, { res.status, res:read() })
        assert.is_true(res:send("bar\n")) -- res:send: bytes of the new protocol to the server
        assert.equal("got bar", res:read())
        res:close()
        assert.same({ nil, "closed" }, { res:send("more") })
        assert.same(0, http.pool_stats().idle)
    end)

    it("lets a 101's reads wait past read_timeout after res:settimeouts(nil, 0)", function()
        local base = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
            moonlet.sleep(0.3) -- (three of the request's read_timeout)
            sock:send("late")
            sock:receive("*l")
        end)
        local res = assert(http.get(base .. "/", { stream = true, read_timeout = 0.1, send_timeout = 2,
                                                   headers = { Upgrade = "foo", Connection = "Upgrade" } }))
        assert.has_error(function() res:settimeouts(-1) end)
        assert.same({ 2, 0.1 }, { res:settimeouts(nil, 0) })
        assert.same({ 101, "late" }, { res.status, res:read() })
        res:close()
        assert.same({}, { res:settimeouts(1, 1) }) -- (the connection is gone)
    end)

    it("joins repeated (Set-Cookie by lines) and folded fields, frames by repeated equal lengths", function()
        local base = scripted_server({
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Fold: a\r\n  b\r\nContent-Length: 3\r\n"
                .. "Set-Cookie: x=1\r\nSET-COOKIE: y=2\r\n\r\nabc",
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n"
                .. "Content-Length: 1\r\n\r\nz",
        })
        local res = assert(http.get(base .. "/"))
        -- (Set-Cookie lines with a newline: a cookie's Expires date holds a comma)
        assert.same({ "abc", "a b", "x=1\ny=2", "3, 3" }, { res.body, res.headers["x-fold"],
            res.headers["set-cookie"], res.headers["content-length"] })
        assert.same(1, http.pool_stats().idle)
        res = assert(http.get(base .. "/"))
        assert.same({ "z", "keep-alive, close" }, { res.body, res.headers.connection })
        assert.same(0, http.pool_stats().idle) -- "close" among the values
    end)

    it("frames by whole tokens, reads long names and folded framing fields, and joins chunks",
        function()
            local long = "X-" .. string.rep("n", 300)
            local base, st = scripted_server({
                -- the last coding is chunked (an empty list element skipped); "closed-door" is not
                -- the token close
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: , Chunked\r\nConnection: closed-door\r\n"
                    .. "\r\n3\r\nabc\r\n2 ;x=y\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
                -- a name over 256 bytes; Transfer-Encoding folded onto a second line
                "HTTP/1.1 200 OK\r\n" .. long .. ": v\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
                    .. "1\r\nz\r\n0\r\n\r\n",
                -- a chunked body in two reads: the rest is decoded from where the first stopped
                { "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
                  "cd\r\n3\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n" },
            })
            local res = assert(http.get(base .. "/1"))
            assert.same({ "abcde", "closed-door" }, { res.body, res.headers.connection })
            res = assert(http.get(base .. "/2"))
            assert.same({ "z", "v" }, { res.body, res.headers[long:lower()] })
            res = assert(http.get(base .. "/3"))
            assert.same("abcdefg", res.body)
            assert.same(1, st.accepted) -- all on one connection: each framing ended where it should
        end)

    it("keeps each response's headers apart when the connection is reused", function()
        local base, st = keepalive_server(function(req)
            return response(200, req.target, { ["X-Target"] = req.target })
        end)
        local list = {}
        for i = 1, 20 do list[i] = assert(http.get(base .. "/" .. i)) end
        for i = 1, 20 do
            assert.same({ "/" .. i, "/" .. i }, { list[i].body, list[i].headers["x-target"] })
        end
        local names = {}
        for k in pairs(list[1].headers) do names[#names + 1] = k end
        table.sort(names)
        assert.same({ "content-length", "x-target" }, names)
        assert.same(1, st.accepted)
    end)

    it("does not pool a connection with bytes after the response, and reuses one after HEAD or 204",
        function()
            local base, st = scripted_server({
                response(200, "one") .. response(200, "unasked"),
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", -- HEAD: no body follows
                "HTTP/1.1 204 No Content\r\n\r\n",
                response(200, "last"),
            })
            assert.same("one", assert(http.get(base .. "/")).body)
            assert.same(0, http.pool_stats().idle)
            local res = assert(http.head(base .. "/"))
            assert.same({ 200, "", "100" }, { res.status, res.body, res.headers["content-length"] })
            assert.same(1, http.pool_stats().idle)
            res = assert(http.get(base .. "/"))
            assert.same({ 204, "" }, { res.status, res.body })
            assert.same("last", assert(http.get(base .. "/")).body)
            assert.same(2, st.accepted)
        end)

    it("waits for the rest of a small body that comes in pieces, and refuses one over max_body at once",
        function()
            local base, st = scripted_server({
                { "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n", "0\r\n\r\n" },
                { "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc", "def" },
                { "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" .. string.rep("x", 1000) },
            })
            assert.same("abcd", assert(http.get(base .. "/")).body)
            assert.same("abcdef", assert(http.get(base .. "/")).body)
            assert.same(1, st.accepted)
            -- half of a 2000-byte chunk, then nothing: over max_body already, no need to wait
            assert.same({ nil, "too large" }, { http.get(base .. "/", { max_body = 100, timeout = 5 }) })
        end)

    it("reads back-to-back responses of many requests on one connection", function()
        local base, st = keepalive_server(function(req, s)
            s.k = (s.k or 0) + 1
            if s.k % 2 == 0 then
                return response(200, req.target)
            end
            return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                .. string.format("%x", #req.target) .. "\r\n" .. req.target .. "\r\n0\r\n\r\n"
        end)
        for i = 1, 200 do assert.same("/" .. i, assert(http.get(base .. "/" .. i)).body) end
        assert.same(1, st.accepted)
    end)
end)

describe("moonlet.http keep-alive pool", function()
    it("never pools a connection with bytes left after the response, nor one the server closed", function()
        local tcp = moonlet.tcp
        local n = 0
        local srv = assert(tcp.listen({ host = "127.0.0.1", port = 0 }, function(sock)
            sock:settimeout(0.2) -- the server's keep-alive timeout
            while true do
                repeat
                    local l = sock:receive("*l")
                    if not l then return end
                until l == ""
                n = n + 1
                if n == 1 then -- a large body, then bytes that belong to no request
                    sock:send({ "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
                                string.rep("a", 100000),
                                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE" })
                else
                    sock:send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nFRESH")
                end
            end
        end))
        finally(function() srv:close(); http.close_idle() end)
        local base = "http://127.0.0.1:" .. srv:port()
        assert.same(100000, #assert(http.get(base .. "/one")).body)
        assert.same("FRESH", assert(http.get(base .. "/two")).body) -- not the stray "STALE"
        assert.same(1, http.pool_stats().idle)
        moonlet.sleep(0.4) -- the server closes the idle connection meanwhile
        local r, err = http.post(base .. "/three", "data") -- a POST is not retried: no stale conn
        assert.same({ "FRESH", nil }, { r and r.body, err })
    end)

    it("reuses one connection for sequential requests", function()
        local base, st = keepalive_server(function(req)
            return response(200, req.target)
        end)
        for i = 1, 5 do assert.same("/" .. i, assert(http.get(base .. "/" .. i)).body) end
        assert.same(1, st.accepted)
        assert.same(1, http.pool_stats().idle)
    end)

    it("opens a new connection when the server says close or keepalive = false", function()
        local base, st = keepalive_server(function(req)
            if req.target == "/close" then return response(200, "bye", { Connection = "close" }), true end
            return response(200, "ok")
        end)
        assert(http.get(base .. "/close"))
        assert(http.get(base .. "/close"))
        assert.same(2, st.accepted)
        assert(http.get(base .. "/", { keepalive = false }))
        assert.same(3, st.accepted)
        assert.same(0, http.pool_stats().idle)
        assert(http.get(base .. "/"))
        assert(http.get(base .. "/"))
        assert.same(4, st.accepted)
    end)

    it("keeps at most pool_size idle connections per origin", function()
        local base, st = keepalive_server(function()
            moonlet.sleep(0.05) -- all five are in flight at once
            return response(200, "ok")
        end)
        local fns = {}
        for i = 1, 5 do fns[i] = function() return http.get(base .. "/", { pool_size = 2 }) end end
        local results = moonlet.gather(fns)
        assert.same(5, #results)
        assert.same(5, st.accepted)
        assert.same(2, http.pool_stats().idle)
        moonlet.gather(fns)
        assert.same(8, st.accepted) -- two reused, three new
        assert.same(2, http.pool_stats().idle)
    end)

    it("drops idle connections after idle_timeout", function()
        local base, st = keepalive_server(function() return response(200, "ok") end)
        assert(http.get(base .. "/", { idle_timeout = 0.05 }))
        assert.same(1, http.pool_stats().idle)
        moonlet.sleep(0.1)
        assert(http.get(base .. "/", { idle_timeout = 0.05 }))
        assert.same(2, st.accepted)
        assert.truthy(test.wait_until(function() return st.active == 1 end, 5)) -- the stale one closed
    end)

    it("retries once on a fresh connection when the server dropped an idle one", function()
        local base, st = raw_server(function(sock)
            read_request(sock)
            sock:send(response(200, "once")) -- keep-alive in words, then gone
        end)
        assert.same("once", assert(http.get(base .. "/")).body)
        test.wait_until(function() return st.active == 0 end, 5)
        assert.same("once", assert(http.get(base .. "/")).body)
        assert.same(2, st.accepted)
    end)

    it("does not send a request again when a reused connection times out", function()
        local base, st = raw_server(function(sock)
            read_request(sock)
            sock:send(response(200, "first"))
            read_request(sock) -- the second request on this connection is never answered
            sock:receive("*l") -- until the client gives up and closes
        end)
        assert.same("first", assert(http.get(base .. "/")).body)
        assert.same({ nil, "timeout" }, { http.get(base .. "/", { read_timeout = 0.2 }) })
        assert.same(1, st.accepted) -- not sent again on a new connection
    end)

    it("pools by origin: another port is another pool", function()
        local a = keepalive_server(function() return response(200, "a") end)
        local b = keepalive_server(function() return response(200, "b") end)
        assert.same("a", assert(http.get(a .. "/")).body)
        assert.same("b", assert(http.get(b .. "/")).body)
        local s = http.pool_stats()
        assert.same(2, s.idle)
        assert.same({ [a] = 1, [b] = 1 }, s.origins)
    end)
end)

describe("moonlet.http redirects", function()
    local base, server
    after_each(function()
        server:close()
        http.close_idle()
    end)
    before_each(function()
        local app = moonlet.app()
        do
            app:get("/start", function(_, res) res:redirect("/middle") end)
            app:get("/middle", function(_, res) res:redirect("end?x=1", 301) end)
            app:get("/end", function(req) return "end " .. req.query.x end)
            app:get("/loop", function(_, res) res:redirect("/loop") end)
            app:post("/see-other", function(_, res) res:redirect("/method", 303) end)
            app:post("/keep", function(_, res) res:redirect("/method", 307) end)
            app:any("/method", function(req) return req.method .. ":" .. (req:body() or "") end)
        end
        local port
        server, port = test.serve(app)
        base = "http://127.0.0.1:" .. port
    end)

    it("returns a redirect as it is unless asked to follow", function()
        local res = assert(http.get(base .. "/start"))
        assert.same({ 302, "/middle" }, { res.status, res.headers.location })
    end)

    it("follows up to `redirects` hops, relative locations included", function()
        local res = assert(http.get(base .. "/start", { redirects = 5 }))
        assert.same({ 200, "end 1", base .. "/end?x=1" }, { res.status, res.body, res.url })
        assert.same({ nil, "too many redirects" }, { http.get(base .. "/start", { redirects = 1 }) })
        assert.same({ nil, "too many redirects" }, { http.get(base .. "/loop", { redirects = 3 }) })
    end)

    it("does not carry Authorization to another origin", function()
        local other = serve(function(app)
            app:get("/who", function(req) return req.headers.authorization or "nobody" end)
        end)
        local here = serve(function(app)
            app:get("/away", function(_, res) res:redirect(other .. "/who") end)
            app:get("/who", function(req) return req.headers.authorization or "nobody" end)
        end)
        local auth = { Authorization = "Bearer t" }
        assert.same("nobody", assert(http.get(here .. "/away", { headers = auth, redirects = 1 })).body)
        assert.same("Bearer t", assert(http.get(here .. "/who", { headers = auth })).body)
        local userinfo = here:gsub("^http://", "http://ann:secret@")
        assert.same("Basic YW5uOnNlY3JldA==", assert(http.get(userinfo .. "/who")).body)
        assert.same("nobody", assert(http.get(userinfo .. "/away", { redirects = 1 })).body)
    end)

    it("sends a Host the caller gave to its origin only, not to the one a redirect goes to", function()
        local other, other_port = serve(function(app)
            app:get("/host", function(req) return req.headers.host end)
        end)
        local here = serve(function(app)
            app:get("/away", function(_, res) res:redirect(other .. "/host") end)
            app:get("/near", function(_, res) res:redirect("/host") end)
            app:get("/host", function(req) return req.headers.host end)
        end)
        local h = { Host = "vhost.example" }
        assert.same("127.0.0.1:" .. other_port,
            assert(http.get(here .. "/away", { headers = h, redirects = 1 })).body)
        assert.same("vhost.example", assert(http.get(here .. "/near", { headers = h, redirects = 1 })).body)
    end)

    it("carries Authorization, and the URL's user:password, to the same origin", function()
        local here = serve(function(app)
            app:get("/dir", function(_, res) res:redirect("/dir/", 301) end)
            app:get("/dir/", function(req) return req.headers.authorization or "nobody" end)
        end)
        local auth = { Authorization = "Bearer t" }
        assert.same("Bearer t", assert(http.get(here .. "/dir", { headers = auth, redirects = 1 })).body)
        local userinfo = here:gsub("^http://", "http://ann:secret@")
        local res = assert(http.get(userinfo .. "/dir", { redirects = 1 }))
        assert.same({ 200, "Basic YW5uOnNlY3JldA==" }, { res.status, res.body })
        res = assert(http.get(userinfo .. "/dir", { headers = auth, redirects = 1 })) -- theirs wins
        assert.same({ 200, "Bearer t" }, { res.status, res.body })
    end)

    it("turns POST into GET on 303 and keeps it on 307", function()
        assert.same("GET:", assert(http.post(base .. "/see-other", "data", { redirects = 1 })).body)
        assert.same("POST:data", assert(http.post(base .. "/keep", "data", { redirects = 1 })).body)
    end)

    -- RFC 3986 5.2: an empty reference is the current URL, "#f" too; dot segments are removed
    it("follows an empty or fragment-only Location to the same URL, and removes dot segments", function()
        local targets = {}
        local up = keepalive_server(function(req)
            targets[#targets + 1] = req.target
            local loc = ({ "", "#frag", "../x/./y/.." })[#targets]
            if loc then return response(302, "", { Location = loc }) end
            return response(200, "done")
        end)
        local res = assert(http.get(up .. "/dir/page?q=1", { redirects = 5 }))
        assert.same({ 200, "done", up .. "/x/" }, { res.status, res.body, res.url })
        assert.same({ "/dir/page?q=1", "/dir/page?q=1", "/dir/page?q=1", "/x/" }, targets)
    end)

    it("percent-encodes spaces and non-ASCII bytes of a Location before following it", function()
        local targets = {}
        local up = keepalive_server(function(req)
            targets[#targets + 1] = req.target
            if #targets == 1 then return response(301, "", { Location = "/caf\195\169 menu?q=a b|c" }) end
            return response(200, "ok")
        end)
        local res = assert(http.get(up .. "/start", { redirects = 1 }))
        local encoded = "/caf%C3%A9%20menu?q=a%20b%7Cc"
        assert.same({ 200, up .. encoded }, { res.status, res.url })
        assert.same({ "/start", encoded }, targets)
        assert(http.get(up .. "/caf\195\169 x")) -- a URL the caller gives is sent encoded too
        assert.same("/caf%C3%A9%20x", targets[3])
    end)
end)

describe("moonlet.http bodies", function()
    local original = string.rep("moonlet gzip body. ", 5000)

    it("inflates gzip when asked (decompress = true), and only then", function()
        local base = serve(function(app)
            app:get("/gz", function(req, res)
                local ae = req.headers["accept-encoding"] or ""
                if ae:find("gzip", 1, true) then
                    res:header("Content-Encoding", "gzip")
                    return zlib.gzip(original)
                end
                return "plain"
            end)
            app:get("/gz-chunked", function(_, res)
                res:header("Content-Encoding", "gzip")
                local gz = zlib.gzip(original)
                for i = 1, #gz, 500 do res:write(gz:sub(i, i + 499)) end
            end)
        end)
        local res = assert(http.get(base .. "/gz", { decompress = true }))
        assert.same("gzip", res.headers["content-encoding"])
        assert.same(#original, #res.body)
        assert.is_true(res.body == original)
        assert.same("plain", assert(http.get(base .. "/gz")).body)
        res = assert(http.request({ url = base .. "/gz-chunked", decompress = true, stream = true }))
        local parts = {}
        for chunk in res:chunks() do parts[#parts + 1] = chunk end
        assert.is_true(table.concat(parts) == original)
        local raw = assert(http.get(base .. "/gz-chunked")).body -- not asked: the bytes as sent
        assert.is_true(zlib.inflate(raw) == original)
    end)

    it("inflates a body made by the gzip command", function()
        local path = os.tmpname()
        local f = assert(io.open(path, "wb"))
        f:write(original)
        f:close()
        local p = assert(io.popen("gzip -c " .. path))
        local gz = p:read("*a")
        p:close()
        os.remove(path)
        assert.truthy(#gz > 10 and #gz < #original)
        local base = keepalive_server(function()
            return response(200, gz, { ["Content-Encoding"] = "gzip" })
        end)
        assert.is_true(assert(http.get(base .. "/", { decompress = true })).body == original)
    end)

    it("takes an empty gzip body as empty, whatever its framing, and a cut one as bad", function()
        local gz = zlib.gzip(original)
        local base = keepalive_server(function(req)
            local head = "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
            if req.target == "/chunked" then
                return head .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            elseif req.target == "/cut" then
                return head .. "Transfer-Encoding: chunked\r\n\r\n10\r\n" .. gz:sub(1, 16) .. "\r\n0\r\n\r\n"
            end
            return head .. "Content-Length: 0\r\n\r\n"
        end)
        for _, path in ipairs({ "/length", "/chunked" }) do
            local res = assert(http.get(base .. path, { decompress = true }))
            assert.same({ 200, "" }, { res.status, res.body })
            res = assert(http.get(base .. path, { decompress = true, stream = true }))
            assert.same({ nil, nil }, { res:read() })
        end
        assert.same({ nil, "bad response" }, { http.get(base .. "/cut", { decompress = true }) })
    end)

    -- RFC 9112 6.1: a transfer coding is the connection's, so the client removes it (gzip, x-gzip
    -- or deflate, then chunked), asked to decompress or not, and refuses one it cannot remove
    it("removes a gzip or deflate transfer coding, and refuses one it does not know", function()
        local function chunked(s)
            local t = {}
            for i = 1, #s, 1000 do
                local piece = s:sub(i, i + 999)
                t[#t + 1] = ("%x\r\n%s\r\n"):format(#piece, piece)
            end
            return table.concat(t) .. "0\r\n\r\n"
        end
        local gz = zlib.gzip(original)
        local d = zlib.deflater(6, 15) -- "deflate" is zlib data (RFC 9110 8.4.1.2)
        local deflated = d:deflate(original, true)
        d:close()
        local gz_gz = zlib.gzip(gz)
        local bodies = {
            ["/gzip"] = { "gzip, chunked", chunked(gz) },
            ["/x-gzip"] = { "X-Gzip,chunked", chunked(gz) },
            ["/deflate"] = { "deflate, chunked", chunked(deflated) },
            ["/both"] = { "gzip, chunked", chunked(gz_gz), "Content-Encoding: gzip\r\n" },
        }
        local base = keepalive_server(function(req)
            local b = bodies[req.target]
            if b then
                return "HTTP/1.1 200 OK\r\nTransfer-Encoding: " .. b[1] .. "\r\n" .. (b[3] or "")
                    .. "\r\n" .. b[2]
            elseif req.target == "/close" then -- gzip alone: the body ends with the connection
                return "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" .. gz, true
            end
            local te = req.target:match("^/te/(.*)$"):gsub("_", " ")
            return "HTTP/1.1 200 OK\r\nTransfer-Encoding: " .. te .. "\r\n\r\n" .. chunked("x"), true
        end)
        for _, path in ipairs({ "/gzip", "/x-gzip", "/deflate", "/close" }) do
            for _, decompress in ipairs({ false, true }) do
                local res = assert(http.get(base .. path, { decompress = decompress }))
                assert.is_true(res.body == original, path)
                res = assert(http.get(base .. path, { decompress = decompress, stream = true }))
                local parts = {}
                for chunk in res:chunks() do parts[#parts + 1] = chunk end
                assert.is_true(table.concat(parts) == original, path)
            end
        end
        -- a gzip content coding inside: kept unless decompress (then both come off)
        assert.is_true(assert(http.get(base .. "/both")).body == gz)
        assert.is_true(assert(http.get(base .. "/both", { decompress = true })).body == original)
        assert.same(1, http.pool_stats().idle) -- chunked framing ended where it should: pooled
        for _, te in ipairs({ "br,_chunked", "compress,_chunked", "gzip,_gzip,_chunked",
                              "chunked,_gzip", "chunked,_chunked", "gzip-not,_chunked", "br" }) do
            assert.same({ nil, "bad response" }, { http.get(base .. "/te/" .. te) }, te)
        end
    end)

    it("refuses a body over max_body: too large", function()
        local big = string.rep("x", 100000)
        local base = serve(function(app)
            app:get("/big", function() return big end)
            app:get("/big-chunked", function(_, res)
                for _ = 1, 10 do res:write(string.rep("y", 10000)) end
            end)
            app:get("/bomb", function(_, res)
                res:header("Content-Encoding", "gzip")
                return zlib.gzip(string.rep("\0", 1000000)) -- 1 MB from about 1 KB
            end)
        end)
        assert.same({ nil, "too large" }, { http.get(base .. "/big", { max_body = 1000 }) })
        assert.same({ nil, "too large" }, { http.get(base .. "/big-chunked", { max_body = 50000 }) })
        assert.same({ nil, "too large" },
            { http.get(base .. "/bomb", { max_body = 50000, decompress = true }) })
        assert.same(100000, #assert(http.get(base .. "/big", { max_body = 100000 })).body)
    end)

    it("streams: headers arrive first, the body later, chunk by chunk", function()
        local go = moonlet.event()
        local base = serve(function(app)
            app:get("/stream", function(_, res)
                res:write("first")
                go:wait(5)
                res:write("second")
            end)
        end)
        local res = assert(http.request({ method = "GET", url = base .. "/stream", stream = true }))
        assert.same(200, res.status)
        assert.is_nil(res.body)
        local chunks = {}
        for chunk in res:chunks() do
            chunks[#chunks + 1] = chunk
            go:set() -- the second chunk exists only once the first was read
        end
        assert.same({ "first", "second" }, chunks)
        assert.same(1, http.pool_stats().idle) -- read to the end: pooled
    end)

    it("streams with read_body() and drops the rest on close()", function()
        local base = serve(function(app)
            app:get("/s", function(_, res)
                for i = 1, 3 do res:write("part" .. i) end
            end)
        end)
        local res = assert(http.request({ url = base .. "/s", stream = true }))
        assert.same("part1part2part3", res:read_body())
        assert.same("part1part2part3", res.body)
        assert.same(1, http.pool_stats().idle) -- read to the end: pooled
        res = assert(http.request({ url = base .. "/s", stream = true })) -- takes it again
        assert.same("part", res:read():sub(1, 4))
        res:close()
        assert.same({ nil, "closed" }, { res:read() })
        assert.same(0, http.pool_stats().idle) -- half read: closed, not pooled
    end)

    it("raises from chunks() when the streamed body breaks", function()
        local base = raw_server(function(sock)
            read_request(sock)
            sock:send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        end)
        local res = assert(http.request({ url = base .. "/", stream = true }))
        assert.has_error(function()
            for _ in res:chunks() do end
        end)
    end)
end)

describe("moonlet.http request bodies: json, form and functions", function()
    local json = require "moonlet.json"

    -- an upstream that tells what it got: method, Content-Type, framing and the body
    local function echo_server()
        return serve(function(app)
            app:any("/echo", function(req)
                return { method = req.method, ctype = req.headers["content-type"] or "",
                         te = req.headers["transfer-encoding"] or "",
                         length = req.headers["content-length"] or "", body = req:body() }
            end)
            app:post("/to-get", function(_, res) return res:redirect("/echo", 303) end)
            app:put("/keep", function(_, res) return res:redirect("/echo", 307) end)
        end)
    end

    it("sends json = value as JSON and form = table as a form, and res:json() decodes", function()
        local base = echo_server()
        local res = assert(http.post(base .. "/echo", nil, { json = { a = 1, list = { 1, 2 } } }))
        local got = assert(res:json())
        assert.same("POST", got.method)
        assert.same("application/json", got.ctype)
        assert.same({ a = 1, list = { 1, 2 } }, json.decode(got.body))
        local headers = { ["content-type"] = "application/vnd.moonlet+json" }
        got = assert(assert(http.request({ method = "PUT", url = base .. "/echo", json = { 1 },
                                          headers = headers })):json())
        assert.same("application/vnd.moonlet+json", got.ctype) -- the caller's own type stays
        assert.same({ ["content-type"] = "application/vnd.moonlet+json" }, headers) -- not changed
        got = assert(assert(http.post(base .. "/echo", nil,
            { form = { q = "a b&c", tag = { "x", "y" } } })):json())
        assert.same("application/x-www-form-urlencoded", got.ctype)
        assert.same("q=a%20b%26c&tag=x&tag=y", got.body)
        -- a streamed response is read first
        res = assert(http.post(base .. "/echo", nil, { json = json.null, stream = true }))
        got = assert(res:json())
        assert.same("null", got.body)
        assert.equal(json.null, json.decode(got.body))
    end)

    it("res:json() on a body that is not JSON: nil, err", function()
        local base = serve(function(app) app:get("/text", function() return "not { json" end) end)
        local res = assert(http.get(base .. "/text"))
        local v, err = res:json()
        assert.is_nil(v)
        assert.matches("^invalid JSON", err)
        assert.same("not { json", res.body) -- the body is still there
    end)

    it("raises on body with json or form, both, or what cannot be sent", function()
        local u = "http://127.0.0.1:1/"
        assert.has_error(function() http.post(u, "x", { json = {} }) end,
                         "moonlet.http: give one of body, json and form")
        assert.has_error(function() http.request({ url = u, json = {}, form = {} }) end)
        assert.has_error(function() http.request({ url = u, form = "a=b" }) end,
                         "moonlet.http: form must be a table")
        assert.has_error(function() http.request({ url = u, json = { f = print } }) end)
        assert.has_error(function() http.post(u, 42) end)
    end)

    it("streams a body made by a function with chunked framing; the function may wait", function()
        local base = echo_server()
        local pieces, i = { "moon", "", "let ", string.rep("x", 100000), "!" }, 0
        local res = assert(http.post(base .. "/echo", function()
            i = i + 1
            moonlet.sleep(0.005) -- other tasks run meanwhile
            return pieces[i]
        end))
        local got = assert(res:json())
        assert.same("chunked", got.te)
        assert.same("", got.length)
        assert.is_true(got.body == table.concat(pieces))
        assert.same(#pieces + 1, i) -- asked until it said nil, once
        -- with a Content-Length of the caller's, the pieces go as they are
        i = 0
        pieces = { "ab", "cd" }
        got = assert(assert(http.request({ method = "PUT", url = base .. "/echo",
            headers = { ["Content-Length"] = 4 },
            body = function() i = i + 1; return pieces[i] end })):json())
        assert.same("", got.te)
        assert.same("4", got.length)
        assert.same("abcd", got.body)
    end)

    it("raises when a body function makes more or fewer bytes than the caller's Content-Length", function()
        local base = echo_server()
        for _, pieces in ipairs({ { "abc", "de" }, { "ab" } }) do
            local i = 0
            assert.has_error(function()
                http.post(base .. "/echo", function() i = i + 1; return pieces[i] end,
                          { headers = { ["Content-Length"] = "4" } })
            end)
        end
        assert.same("ok", assert(assert(http.post(base .. "/echo", "ok")):json()).body) -- serving on
    end)

    it("puts chunked framing on the wire, piece by piece", function()
        local seen = {}
        local base = raw_server(function(sock)
            local line = sock:receive("*l")
            while line and line ~= "" do
                seen[#seen + 1] = line
                line = sock:receive("*l")
            end
            local body = {}
            while true do
                local size = sock:receive("*l")
                seen[#seen + 1] = size
                local n = tonumber(size, 16)
                if not n or n == 0 then break end
                body[#body + 1] = sock:receive(n)
                sock:receive("*l")
            end
            assert.same("", sock:receive("*l")) -- the end: no trailer
            sock:send(response(200, table.concat(body), { Connection = "close" }))
        end)
        local i, pieces = 0, { "hello", string.rep("y", 300) }
        local res = assert(http.post(base .. "/", function() i = i + 1; return pieces[i] end))
        assert.same("hello" .. pieces[2], res.body)
        assert.truthy(#seen >= 4)
        assert.same("POST / HTTP/1.1", seen[1])
        local te
        for _, h in ipairs(seen) do
            if h:lower() == "transfer-encoding: chunked" then te = true end
            assert.falsy(h:lower():find("^content%-length"))
        end
        assert.is_true(te)
        assert.same({ "5", "12c", "0" }, { seen[#seen - 2], seen[#seen - 1], seen[#seen] })
    end)

    it("proxies a request body as it streams in: req:chunks() is such a function", function()
        local up = echo_server()
        local front = serve(function(app)
            app:post("/proxy", function(req)
                local res = assert(http.post(up .. "/echo", req:chunks()))
                return res.body -- the upstream's JSON as it is
            end)
        end)
        local i, pieces = 0, { "first ", "second ", "third" }
        local res = assert(http.post(front .. "/proxy", function()
            i = i + 1
            moonlet.sleep(0.01)
            return pieces[i]
        end))
        local got = assert(res:json())
        assert.same("first second third", got.body)
        assert.same("chunked", got.te)
    end)

    it("a function that raises, or returns what is not a string, raises; the pool stays sound", function()
        local base = echo_server()
        assert.has_error(function()
            http.post(base .. "/echo", function() error("producer broke", 0) end)
        end, "producer broke")
        assert.has_error(function()
            http.post(base .. "/echo", function() return 42 end)
        end, "moonlet.http: a body function returns strings, then nil, not a number")
        local got = assert(assert(http.post(base .. "/echo", "after")):json())
        assert.same("after", got.body) -- no half-sent request was left on a pooled connection
        local before = stats_now()
        assert.has_error(function()
            http.post(base .. "/echo", function() error("again", 0) end)
        end, "again")
        http.close_idle()
        http.close_idle()
        assert.same(before.tasks, stats_now().tasks)
    end)

    it("is not sent twice: a 307 is returned as it is; a 303 turns into a GET without it", function()
        local base = echo_server()
        local calls = 0
        local function once()
            calls = calls + 1
            if calls == 1 then return "payload" end
        end
        local res = assert(http.request({ method = "PUT", url = base .. "/keep", body = once,
                                          redirects = true }))
        assert.same(307, res.status)
        assert.same(2, calls)
        calls = 0
        res = assert(http.request({ method = "POST", url = base .. "/to-get", body = once, redirects = 3 }))
        assert.same(200, res.status)
        local got = assert(res:json())
        assert.same("GET", got.method)
        assert.same("", got.body)
        assert.same(2, calls)
    end)
end)

describe("moonlet.http concurrency", function()
    it("runs 5 fetches of a 0.3 s upstream together, in well under 1 s", function()
        local base = serve(function(app)
            app:get("/delay", function()
                moonlet.sleep(0.3)
                return "late"
            end)
        end)
        local t0 = moonlet.now()
        local fns = {}
        for i = 1, 5 do fns[i] = function() return http.get(base .. "/delay") end end
        local results, errors = moonlet.gather(fns)
        local elapsed = moonlet.now() - t0
        assert.same({}, errors)
        for i = 1, 5 do assert.same("late", results[i].body) end
        assert.truthy(elapsed < 1, "took " .. elapsed)
    end)

    it("serves 200 concurrent requests", function()
        local base = serve(function(app)
            app:get("/n/:i", function(req)
                moonlet.sleep(0.01)
                return req.params.i
            end)
        end)
        local fns = {}
        for i = 1, 200 do fns[i] = function() return http.get(base .. "/n/" .. i, { timeout = 10 }) end end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 200 do assert.same(tostring(i), results[i].body) end
        assert.truthy(http.pool_stats().idle <= 64)
    end)

    it("closes the connection of a cancelled request", function()
        local base, st = raw_server(function(sock)
            read_request(sock)
            sock:receive("*a")
        end)
        local t = moonlet.spawn(http.get, base .. "/")
        assert.truthy(test.wait_until(function() return st.accepted == 1 end, 5))
        moonlet.sleep(0.01)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join() })
        assert.truthy(test.wait_until(function() return st.active == 0 end, 5))
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, http.get, base .. "/") })
        assert.truthy(test.wait_until(function() return st.active == 0 end, 5))
        assert.same(0, http.pool_stats().idle)
    end)

    it("leaves nothing behind after thousands of timed-out and cancelled requests", function()
        local base, st = raw_server(function(sock)
            read_request(sock)
            sock:receive("*a")
        end, 30)
        local url = base .. "/hang"
        http.close_idle()
        local before = stats_now()
        local mem0 = collectgarbage("count")
        local fns = {}
        for i = 1, 100 do
            if i % 2 == 0 then
                fns[i] = function() return http.get(url, { timeout = 0.02 }) end
            else
                fns[i] = function() return moonlet.timeout(0.02, http.get, url) end
            end
        end
        for _ = 1, 20 do
            local _, errors = moonlet.gather(fns)
            for i = 1, 100 do assert.same("timeout", errors[i]) end
        end
        assert.truthy(test.wait_until(function() return st.accepted == 2000 and st.active == 0 end, 10))
        assert.same(0, http.pool_stats().idle)
        local after = stats_now()
        assert.same(before, after)
        assert.truthy(collectgarbage("count") - mem0 < 512, "Lua memory grew") -- KiB
    end)
end)

describe("moonlet.http through a proxy", function()
    local function origin()
        return serve(function(app)
            app:get("/where", function(req)
                return req.method .. " " .. req.path .. "?" .. (req.query_string or "")
            end)
        end)
    end

    it("sends an http:// request to the proxy with its URL as the target, and its credentials", function()
        local base = origin()
        local proxy, st = proxy_server()
        local res = assert(http.get(base .. "/where?a=1", { proxy = proxy }))
        assert.same({ 200, "GET /where?a=1" }, { res.status, res.body })
        assert.same("GET " .. base .. "/where?a=1 HTTP/1.1", st.lines[1])
        assert.same({}, st.auth)
        local authed = proxy:gsub("^http://", "http://user:p%%40ss@")
        assert(http.get(base .. "/where", { proxy = authed }))
        assert.same({ "Basic dXNlcjpwQHNz" }, st.auth) -- user:p@ss, a pool of its own
        assert.same(2, st.accepted)
    end)

    it("takes configure's proxy, skips it for no_proxy hosts and for proxy = false", function()
        local base, port = origin()
        local proxy, st = proxy_server()
        http.configure({ proxy = proxy })
        defer(function() http.configure({ proxy = false, no_proxy = false }) end)
        -- each request on a new connection: the proxy sees the first request of each
        local function via_proxy(url, opts)
            http.close_idle()
            local n = #st.lines
            assert.same("GET /where?", assert(http.get(url, opts)).body)
            return #st.lines > n
        end
        assert.is_true(via_proxy(base .. "/where"))
        assert.is_false(via_proxy(base .. "/where", { proxy = false }))
        assert.is_false(via_proxy(base .. "/where", { proxy = "" })) -- an empty HTTPS_PROXY
        local local_url = "http://localhost:" .. port .. "/where"
        for no_proxy, direct in pairs({ ["example.com, 127.0.0.1:80"] = true, ["127.0.0.0/8"] = true,
                                        ["0.0.1"] = false, [".localhost"] = false, ["*"] = true,
                                        ["[::1], other"] = false }) do
            http.configure({ no_proxy = no_proxy })
            assert.same(not direct, via_proxy(base .. "/where"), no_proxy)
        end
        http.configure({ no_proxy = "*.localhost." })
        assert.is_false(via_proxy(local_url))
        assert.is_true(via_proxy(base .. "/where"))
        assert.has_error(function() http.configure({ no_proxy = { "localhost" } }) end,
                         "moonlet.http.configure: no_proxy is a string of host names")
    end)

    it("sends a caller's Proxy-Authorization to the proxy only", function()
        local base = origin()
        local proxy, st = proxy_server()
        local creds = { ["Proxy-Authorization"] = "Basic eA==" }
        assert(http.get(base .. "/where", { proxy = proxy, headers = creds }))
        assert.same({ "Basic eA==" }, st.auth)
        local app_seen
        local direct = serve(function(app)
            app:get("/h", function(req) app_seen = req.headers["proxy-authorization"] or false; return "" end)
        end)
        assert(http.get(direct .. "/h", { headers = { ["Proxy-Authorization"] = "Basic eA==" } }))
        assert.is_false(app_seen) -- no proxy: not sent at all
    end)

    it("keeps a proxy's credentials out of pool_stats", function()
        local base = origin()
        local proxy = proxy_server()
        assert(http.get(base .. "/where", { proxy = proxy:gsub("^http://", "http://u:secret@") }))
        for origin_key in pairs(http.pool_stats().origins) do
            assert.falsy(origin_key:find("secret", 1, true), origin_key)
        end
    end)

    it("reports a proxy that refuses or is not there; raises on a proxy that is not http://", function()
        local base = origin()
        local proxy, st = proxy_server()
        st.refuse = true
        assert.same(407, assert(http.get(base .. "/where", { proxy = proxy })).status)
        local _, err = http.get("https://127.0.0.1:1/", { proxy = proxy })
        assert.same("proxy: 407", err)
        _, err = http.get(base .. "/where", { proxy = "http://127.0.0.1:1" })
        assert.same("proxy: connection refused", err)
        assert.has_error(function() http.get(base, { proxy = "https://127.0.0.1:1" }) end,
                         "moonlet.http: proxy must be an http:// URL")
        assert.has_error(function() http.configure({ proxy = "nonsense" }) end)
    end)
end)

describe("moonlet.http misuse", function()
    it("raises on an unknown configure option", function()
        assert.has_error(function() http.configure({ pool_sise = 1 }) end)
    end)

    it("raises on a bad url, scheme, header or body", function()
        assert.has_error(function() http.get(nil) end)
        assert.has_error(function() http.get("not a url") end)
        assert.has_error(function() http.get("ftp://127.0.0.1/") end)
        assert.has_error(function()
            http.get("http://127.0.0.1:1/", { headers = { ["X-A"] = "a\r\nB: c" } })
        end)
        assert.has_error(function() http.post("http://127.0.0.1:1/", {}) end)
        assert.has_error(function() http.request("http://127.0.0.1:1/", { method = "GE T" }) end)
    end)

    -- RFC 9110 5.6.2 and 5.5: a name is a token, a value has no control character but HT
    it("raises on a header name that is not a token and a value with a control character", function()
        for _, name in ipairs({ "", "X A", "X:A", "X(A)", "X\1A", "X\128", "X\"A" }) do
            assert.has_error(function()
                http.get("http://127.0.0.1:1/", { headers = { [name] = "v" } })
            end, nil, name)
        end
        for _, value in ipairs({ "a\1b", "a\127", "a\rb", "a\0" }) do
            assert.has_error(function()
                http.get("http://127.0.0.1:1/", { headers = { ["X-A"] = { "ok", value } } })
            end, nil, value)
        end
        -- what may be sent is: tchars in a name, HT, SP and obs-text in a value
        assert.same({ nil, "connection refused" }, { http.get("http://127.0.0.1:1/",
            { headers = { ["X!#$%&'*+-.^_`|~9"] = "a\tb c \195\169" } }) })
    end)

    -- the usual values are checked and formatted in C (bindings/http_client.c), the others in Lua
    it("sends numbers, lists and values tostring makes text of as tostring writes them", function()
        local base = serve(function(app)
            app:get("/h", function(req)
                local h = req.headers
                return { n = h["x-n"], f = h["x-f"], l = h["x-l"], t = h["x-t"], b = h["x-b"],
                         cl = h["content-length"] }
            end)
        end)
        local json = require "moonlet.json"
        local named = setmetatable({}, { __tostring = function() return "named" end })
        local res = assert(http.get(base .. "/h", { headers = { ["X-N"] = 42, ["X-F"] = 0.5,
            ["X-L"] = { "a", 7 }, ["Content-Length"] = 0 } }))
        assert.same({ n = "42", f = "0.5", l = "a, 7", cl = "0" }, json.decode(res.body))
        res = assert(http.get(base .. "/h", { headers = { ["X-B"] = true, ["X-L"] = { named, "b" } } }))
        assert.same({ b = "true", l = "named, b" }, json.decode(res.body))
        local bad = setmetatable({}, { __tostring = function() return "a\r\nB: c" end })
        assert.has_error(function()
            http.get(base .. "/h", { headers = { ["X-T"] = { "ok", bad } } })
        end, "moonlet.http: bad value of header X-T")
    end)
end)

describe("moonlet.http over TLS", function()
    local certs, ca, cert, key
    setup(function()
        certs = test.make_certs()
        ca, cert, key = certs.ca, certs.cert, certs.key
    end)
    teardown(function() test.remove_certs(certs) end)

    local function tls_server()
        local st = { accepted = 0 }
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0, timeout = 5,
            tls = { cert = cert, key = key } }, function(sock)
                st.accepted = st.accepted + 1
                while true do
                    local req = read_request(sock)
                    if not req then return end
                    sock:send(response(200, "secret " .. req.target))
                end
            end))
        defer(function() server:close() end)
        return server:port(), st
    end

    it("verifies the certificate: fails untrusted, passes with the CA, and reuses connections", function()
        local port, st = tls_server()
        local res, err = http.get("https://localhost:" .. port .. "/x")
        assert.is_nil(res)
        assert.same("tls: certificate verify failed", err)
        res = assert(http.get("https://localhost:" .. port .. "/x", { tls = { cafile = ca } }))
        assert.same("secret /x", res.body)
        res = assert(http.get("https://127.0.0.1:" .. port .. "/y", { tls = { cafile = ca } }))
        assert.same("secret /y", res.body)
        assert.same(2, http.pool_stats().idle) -- localhost and 127.0.0.1 are two origins
        assert(http.get("https://127.0.0.1:" .. port .. "/z", { tls = { cafile = ca } }))
        assert.same(2, st.accepted) -- the third request reused the second connection
    end)

    it("makes a tunnel through a proxy (CONNECT) and verifies the origin's certificate in it", function()
        local port, st = tls_server()
        local proxy, pst = proxy_server()
        local res = assert(http.get("https://localhost:" .. port .. "/t",
                                    { proxy = proxy, tls = { cafile = ca } }))
        assert.same("secret /t", res.body)
        assert.same("CONNECT localhost:" .. port .. " HTTP/1.1", pst.lines[1])
        assert(http.get("https://localhost:" .. port .. "/u", { proxy = proxy, tls = { cafile = ca } }))
        assert.same({ 1, 1 }, { pst.accepted, st.accepted }) -- the tunnel is pooled and reused
        local _, err = http.get("https://localhost:" .. port .. "/v", { proxy = proxy, keepalive = false })
        assert.same("tls: certificate verify failed", err) -- end to end: the proxy sees no plain text
    end)

    it("checks the host name, and connects with verify = false", function()
        local port = tls_server()
        local _, err = http.get("https://127.0.0.1:" .. port .. "/", {
            tls = { cafile = ca, server_name = "other.test" } })
        assert.same("tls: certificate verify failed", err)
        local res = assert(http.get("https://127.0.0.1:" .. port .. "/n", { verify = false }))
        assert.same("secret /n", res.body)
    end)
end)

describe("moonlet test and the client's pool", function()
    local server, port -- up across the two tests: the connection stays open in between
    it("leaves a connection idle in the pool at the end of a test", function()
        local app = moonlet.app()
        app:get("/", function() return "ok" end)
        server, port = test.serve(app)
        assert.same("ok", assert(http.get("http://127.0.0.1:" .. port .. "/")).body)
        assert.same(1, http.pool_stats().idle)
    end)

    it("starts the next test with the pool emptied (its server still up)", function()
        test.defer(function() server:close() end)
        assert.same(0, http.pool_stats().idle)
        assert.same("ok", assert(http.get("http://127.0.0.1:" .. port .. "/")).body)
    end)
end)
