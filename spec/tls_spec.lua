-- spec/tls_spec.lua: TLS on moonlet.tcp sockets (core/tls.c through bindings/tcp.c), against TLS
-- servers made with moonlet.tcp.listen whose certificates the spec creates with the `openssl`
-- command: a CA and a server certificate for localhost and 127.0.0.1. Verification fails against
-- an untrusted certificate and a wrong name, passes with the CA given; verify = false connects.
-- A close says close_notify, also behind data that filled the socket's buffer. A server with
-- client_ca asks for client certificates (required or optional), sock:peer_certificate() tells.
local moonlet = require "moonlet"
local core = require "moonlet.core"

local tcp = moonlet.tcp

local test = require "moonlet.test"
local defer = test.defer -- all cleanups of an `it` run (busted keeps only the last finally)

local ca, cert, key, other_ca

local certs
setup(function()
    certs = test.make_certs()
    ca, cert, key, other_ca = certs.ca, certs.cert, certs.key, certs.other_ca
end)

teardown(function() test.remove_certs(certs) end)

local function line_echo(sock)
    while true do
        local line = sock:receive("*l")
        if not line or line == "quit" then return end
        sock:send({ "echo: ", line, "\n" })
    end
end

local function serve(handler, opts)
    opts = opts or {}
    opts.host, opts.port = "127.0.0.1", 0
    if opts.tls == nil then opts.tls = { cert = cert, key = key } end
    local server = assert(tcp.listen(opts, handler))
    defer(function() server:close() end)
    return server, server:port()
end

local function connect(host, port, tls, timeout)
    local sock, err, detail = tcp.connect(host, port, { timeout = timeout or 5, tls = tls })
    if sock then defer(function() sock:close() end) end
    return sock, err, detail
end

describe("moonlet.tcp TLS client", function()
    it("fails against a certificate the system store does not trust", function()
        local _, port = serve(line_echo)
        local sock, err = connect("localhost", port, true)
        assert.is_nil(sock)
        assert.same("tls: certificate verify failed", err)
    end)

    it("fails against a certificate signed by another CA", function()
        local _, port = serve(line_echo)
        local _, err = connect("localhost", port, { cafile = other_ca })
        assert.same("tls: certificate verify failed", err)
    end)

    it("verifies with the CA given, by name and by IP address", function()
        local _, port = serve(line_echo)
        local sock = assert(connect("localhost", port, { cafile = ca }))
        assert.is_true(sock:send("over tls\n"))
        assert.same("echo: over tls", sock:receive("*l"))
        local ip = assert(connect("127.0.0.1", port, { cafile = ca }))
        assert.is_true(ip:send("by ip\n"))
        assert.same("echo: by ip", ip:receive("*l"))
    end)

    it("fails when the certificate does not name the server", function()
        local _, port = serve(line_echo)
        local sock, err, detail = connect("127.0.0.1", port, { cafile = ca, server_name = "example.test" })
        assert.is_nil(sock)
        assert.same("tls: certificate verify failed", err)
        assert.same("hostname mismatch", detail)
    end)

    it("connects without verification when verify = false", function()
        local _, port = serve(line_echo)
        local sock = assert(connect("127.0.0.1", port, { verify = false, server_name = "example.test" }))
        assert.is_true(sock:send("unverified\n"))
        assert.same("echo: unverified", sock:receive("*l"))
    end)

    it("upgrades a connected socket with sock:tls", function()
        local _, port = serve(line_echo)
        local sock = assert(connect("localhost", port))
        assert.same({ true }, { sock:tls({ cafile = ca }) }) -- checked against "localhost"
        assert.is_true(sock:send({ "a", "b", "\n" }))
        assert.same("echo: ab", sock:receive())
        assert.has_error(function() sock:tls({ cafile = ca }) end)
    end)

    it("fails the handshake with a server that does not speak TLS", function()
        local _, port = serve(function(sock)
            sock:receive(1)
            sock:send("HTTP/1.1 400 Bad Request\r\n\r\nthis is no tls at all\n")
        end, { tls = false })
        local sock, err = connect("127.0.0.1", port, { verify = false })
        assert.is_nil(sock)
        assert.same("tls: handshake failed", err)
    end)

    it("fails the handshake when the server closes", function()
        local _, port = serve(function(sock) sock:receive(1) end, { tls = false })
        assert.same("tls: handshake failed", select(2, connect("127.0.0.1", port, { verify = false })))
    end)

    it("times out a handshake with a server that never answers", function()
        local _, port = serve(function(sock) sock:receive("*a") end, { tls = false })
        local sock = assert(connect("127.0.0.1", port, nil, 0.1))
        assert.same({ nil, "timeout" }, { sock:tls({ verify = false }) })
        assert.same({ nil, "closed" }, { sock:receive() }) -- half a handshake closes the socket
    end)

    it("offers http/1.1 by ALPN from moonlet.http, and reports a body cut without close_notify", function()
        local function origin(mode)
            local p = assert(moonlet.process.spawn({ "/usr/bin/python3", "spec/support/tls_origin.py",
                                                     cert, key, mode }))
            defer(function() p:kill() end)
            return p, tonumber(p:read("*l"))
        end
        local o = { tls = { cafile = ca }, timeout = 5 }
        local p, port = origin("clean")
        local r, err = moonlet.http.get("https://127.0.0.1:" .. port .. "/", o)
        assert.same({ 200, "partial body" }, { r and r.status, r and r.body }, err)
        assert.same("alpn http/1.1", p:read("*l"))
        -- a truncation attack: the TCP FIN alone must not pass for the end of the body
        port = select(2, origin("cut"))
        r, err = moonlet.http.get("https://127.0.0.1:" .. port .. "/", o)
        assert.same({ nil, "closed" }, { r and r.body, err })
    end)

    it("reports a missing CA file", function()
        local _, port = serve(line_echo)
        local _, err = connect("127.0.0.1", port, { cafile = certs.dir .. "/none.pem" })
        assert.same("tls: cannot load CA file", err)
    end)
end)

describe("moonlet.tcp TLS", function()
    it("moves several megabytes both ways", function()
        local _, port = serve(function(sock)
            while true do
                local data = sock:receive_any(65536)
                if not data or not sock:send(data) then return end
            end
        end)
        local sock = assert(connect("localhost", port, { cafile = ca }, 10))
        local parts = {}
        for i = 1, 3072 do parts[i] = string.format("%07d", i) .. string.rep("t", 1017) end
        local payload = table.concat(parts) -- 3 MiB
        local writer = moonlet.spawn(function() return sock:send(payload) end)
        local back = assert(sock:receive(#payload))
        assert.same({ true, true }, { writer:join(10) })
        assert.is_true(back == payload)
    end)

    it("reads until the TLS server closes, and wakes a reader on close", function()
        local _, port = serve(function(sock) sock:send("all of it") end)
        local sock = assert(connect("localhost", port, { cafile = ca }))
        assert.same("all of it", sock:receive("*a"))
        local _, port2 = serve(function(s) s:receive("*a") end)
        local s2 = assert(connect("localhost", port2, { cafile = ca }))
        local reader = moonlet.spawn(function() return s2:receive() end)
        s2:close()
        assert.same({ true, nil, "closed" }, { reader:join(5) })
    end)

    it("says close_notify after data that filled the socket's buffer, once the peer reads", function()
        -- one connection per size across a Unix socket's buffer (spec/support/late_tls_reader.py),
        -- none read until every handler sent its bytes and closed (or gave up after its 0.5 s send
        -- timeout): the close_notify the full buffer did not take at once waits for the reader
        -- (3 s at most) instead of being dropped; a send cut by its timeout ends without one
        local dir = test.make_dir()
        defer(function() test.remove_dir(dir) end)
        local path, done = dir .. "/tls.sock", 0
        local server = assert(tcp.listen({ unix = path, timeout = 0.5, tls = { cert = cert, key = key } },
            function(sock)
                local n = tonumber(sock:receive("*l"))
                sock:send(string.rep("x", n))
                sock:close()
                done = done + 1
            end))
        defer(function() server:close() end)
        local sizes = test.socket_buffer_sizes()
        local c = test.late_tls_reader(path, ca, "line", sizes)
        defer(function() c:kill() end)
        assert.same("sent", c:read("*l"))
        assert.truthy(test.wait_until(function() return done == #sizes end, 10))
        c:write("go\n")
        local _, whole, cut = test.tls_ends(c) -- (each whole one ended with close_notify)
        assert.equal(#sizes, whole + cut)
        assert.is_true(whole > 0 and cut > 0) -- (the sizes crossed the buffer's edge)
    end)

    it("serves many TLS clients at once", function()
        local _, port = serve(line_echo)
        local fns = {}
        for i = 1, 20 do
            fns[i] = function()
                local sock = assert(tcp.connect("localhost", port, { timeout = 10, tls = { cafile = ca } }))
                assert(sock:send(i .. "\n"))
                local line = sock:receive()
                sock:close()
                return line
            end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 20 do assert.same("echo: " .. i, results[i]) end
    end)

    it("starts TLS in the middle of a plain conversation (STARTTLS) on both sides", function()
        local _, port = serve(function(sock)
            assert.same("STARTTLS", sock:receive())
            sock:send("GO\n")
            assert(sock:tls({ cert = cert, key = key }))
            line_echo(sock)
        end, { tls = false })
        local sock = assert(connect("localhost", port))
        sock:send("STARTTLS\n")
        assert.same("GO", sock:receive())
        assert.is_true(sock:tls({ cafile = ca }))
        sock:send("secret\n")
        assert.same("echo: secret", sock:receive())
    end)

    it("refuses to listen with a certificate it cannot load", function()
        assert.same({ nil, "tls: cannot load certificate" },
            { tcp.listen({ port = 0, tls = { cert = certs.dir .. "/none.pem", key = key } }, line_echo) })
        assert.same({ nil, "tls: certificate and key do not match" },
            { tcp.listen({ port = 0, tls = { cert = cert, key = certs.dir .. "/other.key" } }, line_echo) })
    end)

    it("asks clients for a certificate with client_ca, required or optional; peer_certificate tells",
    function()
        local function tell(sock)
            local t = assert(sock:peer_certificate())
            sock:send(("%s %s %s\n"):format(tostring(t.client_verified), tostring(t.client_subject),
                tostring(t.client_issuer)))
        end
        local function ask(port, ccert, ckey)
            local sock, err = connect("localhost", port, { cafile = ca, cert = ccert, key = ckey })
            if not sock then return nil, err end
            local line, rerr = sock:receive() -- (TLS 1.3: a refused client hears it here)
            return line, rerr
        end
        local _, port = serve(tell, { tls = { cert = cert, key = key, client_ca = ca } })
        local ALICE = "true CN=alice,O=moonlet spec CN=moonlet spec CA"
        assert.same(ALICE, ask(port, certs.client_cert, certs.client_key))
        assert.is_nil(ask(port))
        assert.is_nil(ask(port, certs.other_client_cert, certs.other_client_key))
        local _, oport = serve(tell, { tls = { cert = cert, key = key, client_ca = ca,
                                               verify_client = "optional" } })
        assert.same("false nil nil", ask(oport))
        assert.same(ALICE, ask(oport, certs.client_cert, certs.client_key))
        assert.is_nil(ask(oport, certs.other_client_cert, certs.other_client_key))
        -- the client side sees the server's certificate; a plain socket has none
        local sock = assert(connect("localhost", oport, { cafile = ca }))
        local t = assert(sock:peer_certificate())
        assert.same({ true, "CN=localhost", "CN=moonlet spec CA" },
            { t.client_verified, t.client_subject, t.client_issuer })
        assert.same(assert(moonlet.fs.read(cert)), t.client_cert)
        local _, pport = serve(function(s) s:receive() end, { tls = false })
        local plain = assert(connect("127.0.0.1", pport))
        assert.same({ nil, "no tls" }, { plain:peer_certificate() })
        plain:close()
        assert.same({ nil, "closed" }, { plain:peer_certificate() })
        -- errors at listen time, and malformed options
        assert.same({ nil, "tls: cannot load client CA file" }, { tcp.listen({ port = 0,
            tls = { cert = cert, key = key, client_ca = certs.dir .. "/none.pem" } }, tell) })
        assert.has_error(function()
            tcp.listen({ port = 0, tls = { cert = cert, key = key, verify_client = true } }, tell)
        end)
        assert.has_error(function()
            tcp.listen({ port = 0, tls = { cert = cert, key = key, client_ca = ca, verify_client = "yes" } },
                tell)
        end)
    end)

    it("leaves nothing behind after cancelled and timed-out handshakes", function()
        local served = 0
        local _, port = serve(function(sock)
            sock:receive("*a")
            served = served + 1
        end, { tls = false })
        local function settle()
            for _ = 1, 3 do moonlet.sleep(0) end
            collectgarbage()
            collectgarbage()
        end
        tcp.connect("127.0.0.1", port):close() -- loads what loads once
        assert(require("moonlet.test").wait_until(function() return served == 1 end, 5))
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for i = 1, 500 do
            local t = moonlet.spawn(function()
                local sock = assert(tcp.connect("127.0.0.1", port, { timeout = 5 }))
                if i % 2 == 0 then sock:settimeout(0) end
                return sock:tls({ verify = false })
            end)
            if i % 2 == 1 then t:cancel() end
            t:join(5)
        end
        settle()
        assert(require("moonlet.test").wait_until(function()
            settle()
            local now = core.stats()
            return now.handles <= before.handles and now.tasks <= before.tasks -- (as assert_baseline)
        end, 5))
        test.assert_baseline(before)
        assert.truthy(collectgarbage("count") - mem0 < 256)
    end)
end)
