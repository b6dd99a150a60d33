-- spec/https_spec.lua: the HTTP server over TLS (app:listen{ tls = { cert =, key = } }, the
-- --tls-cert/--tls-key flags), against moonlet.http, raw TLS sockets and curl, with a certificate
-- the spec makes with the openssl command: requests and keep-alive, req.scheme, bodies of many TLS
-- records both ways, a static file (the C file path), streaming, pipelining, WebSocket (wss://),
-- the close_notify at every clean close (idle, Connection: close) also behind a response that
-- filled the socket's buffer (spec/support/late_tls_reader.py, over a Unix socket), and the bad
-- paths: a plain-HTTP client (nginx's 400), an untrusted certificate, files that do not load.
-- Client certificates (tls.client_ca, verify_client, --tls-client-ca): required and optional,
-- from the CA, from another CA and none, against moonlet.http and curl; req.tls.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local certs, dir, port, server, big

local function url(path) return "https://127.0.0.1:" .. port .. path end
local function opts(more)
    local o = { tls = { cafile = certs.ca }, timeout = 10 }
    for k, v in pairs(more or {}) do o[k] = v end
    return o
end

describe("HTTPS server", function()
    setup(function()
        certs = test.make_certs()
        dir = certs.dir .. "/public"
        assert(moonlet.fs.mkdir(dir))
        local bytes = {}
        for i = 1, 300000 do bytes[i] = string.char((i * 7919) % 251) end
        big = table.concat(bytes) .. table.concat(bytes) -- 600 000 bytes, ~37 TLS records
        assert(moonlet.fs.write(dir .. "/big.bin", big))
        local app = moonlet.app({ max_body = 4 * 1024 * 1024 })
        app:get("/", function(req) return req.scheme .. " " .. req.http_version end)
        app:post("/echo", function(req) return req:body() end)
        app:get("/stream", function(_, res)
            for i = 1, 3 do res:write("part " .. i .. "\n"); moonlet.sleep(0.01) end
        end)
        app:websocket("/ws", function(ws)
            for msg in ws:messages() do ws:send("echo: " .. msg) end
        end)
        app:static("/files", dir)
        server, port = assert(app:listen({ host = "127.0.0.1", port = 0,
                                           tls = { cert = certs.cert, key = certs.key } }))
    end)
    teardown(function()
        if server then server:close() end
        test.remove_certs(certs)
    end)

    it("answers over TLS with req.scheme https, keep-alive across requests", function()
        for _ = 1, 3 do
            local r = assert(moonlet.http.get(url("/"), opts()))
            assert.same({ 200, "https 1.1" }, { r.status, r.body })
        end
        local r = assert(moonlet.http.get(url("/nope"), opts()))
        assert.same(404, r.status)
    end)

    it("takes and sends bodies of many TLS records, a static file and a range of it", function()
        local r = assert(moonlet.http.post(url("/echo"), big, opts()))
        assert.same({ 200, #big }, { r.status, #r.body })
        assert.is_true(r.body == big)
        r = assert(moonlet.http.get(url("/files/big.bin"), opts()))
        assert.same({ 200, #big }, { r.status, #r.body })
        assert.is_true(r.body == big)
        r = assert(moonlet.http.get(url("/files/big.bin"),
                                    opts({ headers = { Range = "bytes=100000-100009" } })))
        assert.same({ 206, big:sub(100001, 100010) }, { r.status, r.body })
    end)

    it("streams a chunked body", function()
        local r = assert(moonlet.http.get(url("/stream"), opts()))
        assert.same({ 200, "part 1\npart 2\npart 3\n" }, { r.status, r.body })
    end)

    it("answers pipelined requests in order on one TLS connection", function()
        local sock = assert(moonlet.tcp.connect("127.0.0.1", port,
            { timeout = 5, tls = { cafile = certs.ca, server_name = "127.0.0.1" } }))
        local req = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert(sock:send(req .. req .. "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        local all = assert(sock:receive("*a"))
        sock:close()
        local statuses = {}
        for s in all:gmatch("HTTP/1%.1 (%d+)") do statuses[#statuses + 1] = tonumber(s) end
        assert.same({ 200, 200, 404 }, statuses)
    end)

    it("carries a WebSocket session (wss://)", function()
        local ws = assert(moonlet.ws.connect("wss://127.0.0.1:" .. port .. "/ws",
                                             { timeout = 5, cafile = certs.ca }))
        assert(ws:send("hi"))
        assert.same("echo: hi", (ws:receive()))
        ws:close()
    end)

    it("takes moonlet.ws.connect's TLS options in a tls table too, as moonlet.http and tcp do", function()
        local ws = assert(moonlet.ws.connect("wss://127.0.0.1:" .. port .. "/ws",
                                             { timeout = 5, tls = { cafile = certs.ca } }))
        assert(ws:send("hi"))
        assert.same("echo: hi", (ws:receive()))
        ws:close()
        assert.same({ nil, "tls: certificate verify failed" },
                    { moonlet.ws.connect("wss://127.0.0.1:" .. port .. "/ws", { timeout = 5 }) })
        ws = assert(moonlet.ws.connect("wss://127.0.0.1:" .. port .. "/ws",
                                       { timeout = 5, tls = { verify = false } }))
        ws:close()
        ws = assert(moonlet.ws.connect("wss://127.0.0.1:" .. port .. "/ws",
                                       { timeout = 5, cafile = certs.ca, tls = true }))
        ws:close()
        assert.has_error(function() moonlet.ws.connect("wss://127.0.0.1:1/ws", { tls = "yes" }) end,
                         "moonlet.ws: option tls is a table")
    end)

    it("keeps the order of WebSocket frames that came in TLS records behind the upgrade", function()
        local sock = assert(moonlet.tcp.connect("127.0.0.1", port,
            { timeout = 5, tls = { cafile = certs.ca, server_name = "127.0.0.1" } }))
        local function frame(text) return "\129" .. string.char(128 + #text) .. "\0\0\0\0" .. text end
        -- three TLS records sent at once: the server reads them in one go
        assert(sock:send("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .. frame("one")))
        assert(sock:send(frame("two")))
        assert(sock:send(frame("three")))
        local reader = sock:receiveuntil("\r\n\r\n")
        assert.truthy(assert(reader()):find("^HTTP/1.1 101 "))
        local got = {}
        for _ = 1, 3 do
            local head = assert(sock:receive(2))
            got[#got + 1] = assert(sock:receive(head:byte(2)))
        end
        sock:close()
        assert.same({ "echo: one", "echo: two", "echo: three" }, got)
    end)

    it("closes a client that trickles its handshake, at the header timeout", function()
        local s, p = assert(moonlet.app():listen({ host = "127.0.0.1", port = 0, header_timeout = 1,
            keepalive_timeout = 1, tls = { cert = certs.cert, key = certs.key } }))
        test.defer(function() s:close() end)
        local sock = assert(moonlet.tcp.connect("127.0.0.1", p, { timeout = 5 }))
        local t0, closed = moonlet.now(), false
        -- a handshake record's header announcing 512 bytes, then its bytes one every 0.3 s
        assert(sock:send("\22\3\1\2\0"))
        for _ = 1, 20 do
            moonlet.sleep(0.3)
            if not sock:send("\0") then closed = true; break end
        end
        sock:close()
        assert.is_true(closed)
        assert.is_true(moonlet.now() - t0 < 5) -- (20 bytes would have taken 6 s)
    end)

    -- Python's ssl, told not to take a bare FIN for an end (suppress_ragged_eofs=False and not
    -- OpenSSL's OP_IGNORE_UNEXPECTED_EOF, which Debian's Python sets by default), tells a
    -- close_notify (recv gives b"") from a connection dropped without one (SSLEOFError)
    local ragged_client = [[
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))),
                    suppress_ragged_eofs=False)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
got = b""
while b"https 1.1" not in got:
    got += s.recv(4096)
print("answered", flush=True)
s.settimeout(10)
try:
    print("close_notify" if s.recv(4096) == b"" else "data")
except ssl.SSLEOFError:
    print("no close_notify")
]]
    local function idle_client(p)
        local c = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ragged_client,
                                                 tostring(p), certs.ca }))
        test.defer(function() c:kill() end)
        return c
    end

    it("says close_notify to a keep-alive connection it closes idle: timeout or shutdown", function()
        local s, p = assert(moonlet.app():get("/", function(req) return req.scheme .. " 1.1" end)
            :listen({ host = "127.0.0.1", port = 0, keepalive_timeout = 0.3,
                      tls = { cert = certs.cert, key = certs.key } }))
        local c = idle_client(p)
        assert.same("answered\nclose_notify\n", c:read("*a"))
        assert.same(0, c:wait(10))
        s:close()
        s, p = assert(moonlet.app():get("/", function(req) return req.scheme .. " 1.1" end)
            :listen({ host = "127.0.0.1", port = 0, tls = { cert = certs.cert, key = certs.key } }))
        c = idle_client(p)
        assert.same("answered\n", c:read("*l") .. "\n")
        s:shutdown()
        assert.same("close_notify\n", c:read("*a"))
        assert.same(0, c:wait(10))
    end)

    -- One connection per size across a Unix socket's buffer, none read until the server is done:
    -- a whole response ends with a close_notify, also when it filled the buffer and the
    -- close_notify did not fit behind it at once; a response cut by the send timeout without
    -- (test.tls_ends checks each).
    local function assert_ends(c, sizes)
        local ends, whole, cut = test.tls_ends(c)
        assert.equal(#sizes, #ends)
        return whole, cut
    end

    local function bytes_server(path, more)
        local served = 0
        local app = moonlet.app()
        app:get("/bytes", function(req)
            served = served + 1
            return string.rep("x", tonumber(req.query.n))
        end)
        local o = { unix = path, tls = { cert = certs.cert, key = certs.key } }
        for k, v in pairs(more) do o[k] = v end
        local s = assert(app:listen(o))
        test.defer(function() s:close() end)
        return s, function() return served end
    end

    it("says close_notify when it closes idle after a response that filled the socket's buffer", function()
        local path = certs.dir .. "/idle.sock"
        local s, served = bytes_server(path, { send_timeout = 1 })
        local core = require "moonlet.core"
        core.set_log("warn") -- (not a line for each "send timeout: closing")
        test.defer(function() core.set_log("info") end)
        local sizes = test.socket_buffer_sizes()
        local c = test.late_tls_reader(path, certs.ca, "http", sizes)
        test.defer(function() c:kill() end)
        assert.same("sent", c:read("*l"))
        -- every response in the socket (those that do not fit cut by the send timeout): the other
        -- connections are idle, and the graceful stop closes them
        assert.truthy(test.wait_until(function()
            return served() == #sizes and core.server_stats().writing == 0
        end, 10))
        s:shutdown()
        c:write("go\n")
        local whole, cut = assert_ends(c, sizes)
        assert.is_true(whole > 0 and cut > 0) -- (the sizes crossed the buffer's edge)
    end)

    it("says close_notify after a response with Connection: close, behind all of it", function()
        local path = certs.dir .. "/close.sock"
        bytes_server(path, { send_timeout = 10 })
        local sizes = test.socket_buffer_sizes()
        sizes[#sizes + 1] = 4 * 1024 * 1024 -- (the buffer's many times over)
        local c = test.late_tls_reader(path, certs.ca, "http-close", sizes)
        test.defer(function() c:kill() end)
        assert.same("sent", c:read("*l"))
        local whole, cut = assert_ends(c, sizes)
        assert.same({ #sizes, 0 }, { whole, cut })
    end)

    it("selects http/1.1 by ALPN when the client offers it, and nothing for h2 alone", function()
        local function alpn(offer)
            local p = assert(moonlet.process.spawn({ "openssl", "s_client", "-connect", "127.0.0.1:" .. port,
                                                     "-CAfile", certs.ca, "-alpn", offer, stdin = "" }))
            local out = p:read("*a")
            p:wait(10)
            return out:match("ALPN protocol: (%S+)") or out:match("(No ALPN negotiated)")
        end
        assert.same("http/1.1", alpn("h2,http/1.1"))
        assert.same("No ALPN negotiated", alpn("h2"))
    end)

    it("answers a plain-HTTP request with nginx's 400, closes other non-TLS clients and an untrusting one, "
        .. "and goes on serving", function()
        local function plain(bytes)
            local sock = assert(moonlet.tcp.connect("127.0.0.1", port, { timeout = 5 }))
            assert(sock:send(bytes))
            local data, err, partial = sock:receive("*a")
            sock:close()
            return data or partial, err
        end
        local data = plain("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        local head, body = data:match("^(.-\r\n)\r\n(.*)$")
        assert.truthy(head, data)
        assert.truthy(head:find("^HTTP/1.1 400 Bad Request\r\n"), head)
        assert.truthy(head:find("\r\nConnection: close\r\n"), head)
        assert.same("The plain HTTP request was sent to HTTPS port\n", body)
        -- a method llhttp does not know is HTTP all the same; a first read cut inside the method too
        assert.truthy(plain("BREW /pot HTTP/1.1\r\n\r\n"):find("^HTTP/1.1 400 "))
        assert.truthy(plain("PO"):find("was sent to HTTPS port", 1, true))
        -- bytes that are neither TLS nor HTTP are closed without a word, as before
        assert.same("", plain("\1\2\3 hello\r\n\r\n"))
        assert.same("", plain("/ HTTP/1.1\r\n\r\n"))
        local r, err = moonlet.http.get(url("/"), { tls = { cafile = certs.other_ca }, timeout = 5 })
        assert.same({ nil, "tls: certificate verify failed" }, { r, err })
        r = assert(moonlet.http.get(url("/"), opts()))
        assert.same({ 200, "https 1.1" }, { r.status, r.body })
    end)

    it("is reached by curl, HTTP/1.0 included", function()
        local function curl(...) -- a process, read while this loop serves it
            local p = assert(moonlet.process.spawn({ "curl", "-s", "--cacert", certs.ca, ... }))
            local out = p:read("*a")
            assert.same(0, p:wait(10))
            return out
        end
        assert.same("https 1.1", curl(url("/")))
        assert.same("https 1.0", curl("-0", url("/")))
    end)

    it("refuses files that do not load, and a malformed tls option", function()
        local app = moonlet.app():get("/", function() return "x" end)
        local s, err = app:listen({ port = 0, tls = { cert = certs.dir .. "/none.pem", key = certs.key } })
        assert.same({ nil, "tls: cannot load certificate" }, { s, err })
        s, err = app:listen({ port = 0, tls = { cert = certs.cert, key = certs.dir .. "/none.key" } })
        assert.same({ nil, "tls: cannot load key" }, { s, err })
        s, err = app:listen({ port = 0, tls = { cert = certs.cert, key = certs.dir .. "/other.key" } })
        assert.same({ nil, "tls: certificate and key do not match" }, { s, err })
        -- a key under a passphrase: refused at once, never a prompt on the terminal
        local enc = certs.dir .. "/enc.key"
        assert(os.execute(("openssl pkey -in %s -out %s -aes256 -passout pass:secret 2>/dev/null")
            :format(certs.key, enc)))
        local code, out = test.run_script(([[
local app = require("moonlet").app()
print(app:listen({ port = 0, tls = { cert = %q, key = %q } }))
os.exit(0)]]):format(certs.cert, enc), 10)
        assert.same({ 0, "nil\ttls: key needs a passphrase\n" }, { code, out })
        -- client certificates are not checked: asking for it raises rather than being ignored
        assert.has_error(function()
            app:listen({ port = 0, tls = { cert = certs.cert, key = certs.key, verify = true,
                                           cafile = certs.ca } })
        end)
        assert.has_error(function() app:listen({ port = 0, tls = "yes" }) end)
        assert.has_error(function() app:listen({ port = 0, tls = { cert = certs.cert } }) end)
    end)

    it("is served by the moonlet command with --tls-cert and --tls-key", function()
        local script = certs.dir .. "/app.lua"
        assert(moonlet.fs.write(script, [[
local app = require("moonlet").app()
app:get("/", function(req) return "cli " .. req.scheme end)
return app]]))
        local p = test.start_process(("--port 0 --tls-cert %s --tls-key %s %s")
            :format(certs.cert, certs.key, script))
        test.defer(function() p:kill() end)
        local cport = test.wait_until(function()
            return tonumber(p:output():match("on https://[^:]+:(%d+)"))
        end)
        assert(cport, p:output())
        local r = assert(moonlet.http.get("https://127.0.0.1:" .. cport .. "/", opts()))
        assert.same({ 200, "cli https" }, { r.status, r.body })
        local f = io.popen(test.binary() .. " --tls-cert " .. certs.cert .. " " .. script .. " 2>&1; echo $?")
        local out = f:read("*a")
        f:close()
        assert.truthy(out:find("--tls-cert and --tls-key go together", 1, true), out)
        assert.truthy(out:find("\n2\n$"), out)
    end)
end)

describe("HTTPS server with client certificates (mutual TLS)", function()
    local function who(req)
        local t = req.tls
        return ("%s|%s|%s|%s"):format(tostring(t.client_verified), tostring(t.client_subject),
            tostring(t.client_issuer),
            tostring(t.client_cert and t.client_cert:match("^%-%-%-%-%-BEGIN CERTIFICATE")))
    end
    local app = moonlet.app():get("/", who)
    local function listen(tls)
        tls.cert, tls.key = certs.cert, certs.key
        local s, p = assert(app:listen({ host = "127.0.0.1", port = 0, tls = tls }))
        test.defer(function() s:close() end)
        return "https://127.0.0.1:" .. p .. "/"
    end
    local function get(u, cert, key)
        local r, err = moonlet.http.get(u, { tls = { cafile = certs.ca, cert = cert, key = key },
                                             timeout = 5 })
        return r and r.status, r and r.body or err
    end
    local function curl(...)
        local args = { "curl", "-s", "--cacert", certs.ca, ... }
        local p = assert(moonlet.process.spawn(args))
        local out = p:read("*a")
        return p:wait(10), out
    end
    setup(function() certs = test.make_certs() end)
    teardown(function() test.remove_certs(certs) end)

    local ALICE = "true|CN=alice,O=moonlet spec|CN=moonlet spec CA|-----BEGIN CERTIFICATE"

    it("required: serves a client whose certificate the CA signed, refuses one without or from another CA",
        function()
            local u = listen({ client_ca = certs.ca })
            assert.same({ 200, ALICE }, { get(u, certs.client_cert, certs.client_key) })
            assert.same({ nil, "tls: handshake failed" }, { get(u) })
            assert.same({ nil, "tls: handshake failed" },
                { get(u, certs.other_client_cert, certs.other_client_key) })
            assert.same({ 0, ALICE }, { curl("--cert", certs.client_cert, "--key", certs.client_key, u) })
            assert.are_not.equal(0, (curl(u)))
            -- verify_client = true says the same; TLS 1.2 refuses in the handshake itself
            u = listen({ client_ca = certs.ca, verify_client = true })
            assert.same({ 200, ALICE }, { get(u, certs.client_cert, certs.client_key) })
            assert.are_not.equal(0, (curl("--tls-max", "1.2", u)))
            assert.same({ 0, ALICE }, { curl("--tls-max", "1.2", "--cert", certs.client_cert, "--key",
                                             certs.client_key, u) })
        end)

    it("optional: serves a client without a certificate unverified, still refuses a bad one", function()
        local u = listen({ client_ca = certs.ca, verify_client = "optional" })
        assert.same({ 200, "false|nil|nil|nil" }, { get(u) })
        assert.same({ 200, ALICE }, { get(u, certs.client_cert, certs.client_key) })
        assert.same({ nil, "tls: handshake failed" },
            { get(u, certs.other_client_cert, certs.other_client_key) })
        assert.same({ 0, "false|nil|nil|nil" }, { curl(u) })
    end)

    it("tells a WebSocket handler who the client is: req.tls after the upgrade", function()
        local wapp = moonlet.app()
        wapp:websocket("/ws", function(ws, req)
            local t = req.tls
            ws:send(("%s|%s"):format(tostring(t and t.client_verified), tostring(t and t.client_subject)))
        end)
        local s, p = assert(wapp:listen({ host = "127.0.0.1", port = 0,
            tls = { cert = certs.cert, key = certs.key, client_ca = certs.ca, verify_client = "optional" } }))
        test.defer(function() s:close() end)
        local ws = assert(moonlet.ws.connect("wss://127.0.0.1:" .. p .. "/ws",
                                             { timeout = 5, cafile = certs.ca }))
        assert.same("false|nil", (ws:receive()))
        ws:close()
        -- with a certificate (moonlet.ws.connect sends none: the handshake by hand)
        local sock = assert(moonlet.tcp.connect("127.0.0.1", p, { timeout = 5, tls = {
            cafile = certs.ca, server_name = "127.0.0.1", cert = certs.client_cert,
            key = certs.client_key } }))
        assert(sock:send("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"))
        repeat local l = assert(sock:receive("*l")) until l == "" -- the 101's head
        local head = assert(sock:receive(2))
        assert.same("true|CN=alice,O=moonlet spec", (sock:receive(head:byte(2) % 128)))
        sock:close()
    end)

    it("gives the whole certificate as PEM, and nothing without client_ca or over plain HTTP", function()
        local pem = assert(moonlet.fs.read(certs.client_cert))
        local a = moonlet.app():get("/", function(req) return req.tls and req.tls.client_cert or "none" end)
        local s, p = assert(a:listen({ host = "127.0.0.1", port = 0,
                                       tls = { cert = certs.cert, key = certs.key, client_ca = certs.ca } }))
        test.defer(function() s:close() end)
        assert.same({ 200, pem },
            { get("https://127.0.0.1:" .. p .. "/", certs.client_cert, certs.client_key) })
        -- no client_ca: no certificate is asked for, a client's is not even sent
        local u = listen({})
        assert.same({ 200, "false|nil|nil|nil" }, { get(u, certs.client_cert, certs.client_key) })
        local plain, pp = assert(a:listen({ host = "127.0.0.1", port = 0 }))
        test.defer(function() plain:close() end)
        local r = assert(moonlet.http.get("http://127.0.0.1:" .. pp .. "/"))
        assert.same({ 200, "none" }, { r.status, r.body })
    end)

    it("refuses a client_ca that does not load, and malformed options", function()
        local tls = { cert = certs.cert, key = certs.key, client_ca = certs.dir .. "/none.pem" }
        assert.same({ nil, "tls: cannot load client CA file" }, { app:listen({ port = 0, tls = tls }) })
        tls.client_ca = certs.key -- a file, but no certificate in it
        assert.same({ nil, "tls: cannot load client CA file" }, { app:listen({ port = 0, tls = tls }) })
        assert.has_error(function()
            app:listen({ port = 0, tls = { cert = certs.cert, key = certs.key, verify_client = true } })
        end, "moonlet: tls verify_client needs client_ca, the CAs to verify against")
        assert.has_error(function()
            app:listen({ port = 0, tls = { cert = certs.cert, key = certs.key, client_ca = certs.ca,
                                           verify_client = "maybe" } })
        end)
        assert.has_error(function()
            app:listen({ port = 0, tls = { cert = certs.cert, key = certs.key, client_ca = 1 } })
        end)
    end)

    it("is served by the moonlet command with --tls-client-ca and --tls-verify-client", function()
        local script = certs.dir .. "/who.lua"
        assert(moonlet.fs.write(script, [[
local app = require("moonlet").app()
app:get("/", function(req)
    return tostring(req.tls.client_verified) .. " " .. tostring(req.tls.client_subject)
end)
return app]]))
        local function start(more)
            local p = test.start_process(("--port 0 --tls-cert %s --tls-key %s --tls-client-ca %s %s %s")
                :format(certs.cert, certs.key, certs.ca, more, script))
            test.defer(function() p:kill() end)
            local cport = test.wait_until(function()
                return tonumber(p:output():match("on https://[^:]+:(%d+)"))
            end)
            assert(cport, p:output())
            return "https://127.0.0.1:" .. cport .. "/"
        end
        local u = start("")
        assert.same({ 200, "true CN=alice,O=moonlet spec" }, { get(u, certs.client_cert, certs.client_key) })
        assert.same({ nil, "tls: handshake failed" }, { get(u) })
        u = start("--tls-verify-client optional")
        assert.same({ 200, "false nil" }, { get(u) })
        assert.same({ 200, "true CN=alice,O=moonlet spec" }, { get(u, certs.client_cert, certs.client_key) })
        local function fails(args)
            local f = io.popen(test.binary() .. " " .. args .. " " .. script .. " 2>&1; echo $?")
            local out = f:read("*a")
            f:close()
            return out
        end
        local tls = ("--tls-cert %s --tls-key %s "):format(certs.cert, certs.key)
        local out = fails(tls .. "--tls-client-ca " .. certs.ca .. " --tls-verify-client maybe")
        assert.truthy(out:find("--tls-verify-client is on or optional", 1, true), out)
        assert.truthy(out:find("\n2\n$"), out)
        out = fails(tls .. "--tls-verify-client on")
        assert.truthy(out:find("--tls-verify-client needs --tls-client-ca", 1, true), out)
        out = fails("--tls-client-ca " .. certs.ca)
        assert.truthy(out:find("need --tls-cert and --tls-key", 1, true), out)
        out = fails(tls .. "--port 0 --tls-client-ca " .. certs.dir .. "/none.pem")
        assert.truthy(out:find("tls: cannot load client CA file", 1, true), out)
        assert.truthy(out:find("\n1\n$"), out)
    end)
end)
