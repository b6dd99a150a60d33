-- spec/ws_spec.lua: WebSockets over real sockets: moonlet's client against app:websocket for every
-- requirement (echo 0 B..1 MiB, fragmentation, ping/pong, keep-alive, close codes both ways,
-- subprotocols, Origin, refused handshakes, permessage-deflate, backpressure, cancellation), and
-- hand-made frames over raw TCP for what a well-behaved client never sends (unmasked frames, bad
-- opcodes, fragmented or long control frames, oversize messages, invalid UTF-8, bad close codes).
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local bit = require "bit"

local band, bor, bxor, rshift = bit.band, bit.bor, bit.bxor, bit.rshift
local char, byte, rep, concat = string.char, string.byte, string.rep, table.concat

-- -- helpers ------------------------------------------------------------------------------------

local function settle()
    moonlet.sleep(0)
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
end

-- serve(build, opts) -> port; the server is closed by finally()
local function serve(build, opts)
    local app = moonlet.app()
    build(app)
    local server, port = test.serve(app, opts)
    finally(function() server:close() end)
    return port, server
end

local function echo_app(opts)
    return function(app)
        app:websocket("/echo", function(ws)
            for msg, kind in ws:messages() do ws:send(msg, kind) end
        end, opts)
    end
end

local function connect(port, path, opts)
    local ws, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. (path or "/echo"),
                                       opts or { timeout = 5 })
    assert(ws, err)
    finally(function() ws:close() end)
    return ws
end

-- A client frame: opcode, payload; o.fin (true), o.rsv (0..7), o.mask (true), o.len (override)
local function frame(opcode, payload, o)
    o = o or {}
    payload = payload or ""
    local fin = o.fin == false and 0 or 0x80
    local b1 = bor(fin, (o.rsv or 0) * 16, opcode)
    local n = o.len or #payload
    local masked = o.mask ~= false
    local mbit = masked and 0x80 or 0
    local head
    if n < 126 then
        head = char(b1, bor(mbit, n))
    elseif n < 65536 then
        head = char(b1, bor(mbit, 126), rshift(n, 8), band(n, 255))
    else
        local t = {}
        for i = 7, 0, -1 do t[#t + 1] = band(math.floor(n / 2 ^ (8 * i)), 255) end
        head = char(b1, bor(mbit, 127), unpack(t))
    end
    if not masked then return head .. payload end
    local key = { 0x12, 0x34, 0x56, 0x78 }
    local out = {}
    for i = 1, #payload do
        out[i] = char(bxor(byte(payload, i), key[(i - 1) % 4 + 1]))
    end
    return head .. char(unpack(key)) .. concat(out)
end

local function close_frame(code, reason, o)
    local p = code and (char(rshift(code, 8), band(code, 255)) .. (reason or "")) or ""
    return frame(8, p, o)
end

-- Opens a raw TCP connection and does the handshake; returns the socket and the 101 response
local function raw_ws(port, path, extra)
    local sock = test.connect(port, 5)
    finally(function() sock:close() end)
    local req = "GET " .. (path or "/echo") .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        .. "Sec-WebSocket-Version: 13\r\n" .. (extra or "") .. "\r\n"
    assert(sock:send(req))
    local resp = assert(test.read_response(sock))
    assert.same(101, resp.status)
    return sock, resp
end

-- Reads one server frame: { fin, rsv, opcode, payload } or nil, err
local function read_frame(sock)
    local h, err = sock:receive(2)
    if not h then return nil, err end
    local b1, b2 = byte(h, 1, 2)
    assert.same(0, band(b2, 0x80), "a server frame is never masked")
    local n = band(b2, 0x7F)
    if n == 126 then
        local e = assert(sock:receive(2))
        n = byte(e, 1) * 256 + byte(e, 2)
    elseif n == 127 then
        local e = assert(sock:receive(8))
        n = 0
        for i = 1, 8 do n = n * 256 + byte(e, i) end
    end
    local payload = n > 0 and assert(sock:receive(n)) or ""
    return { fin = band(b1, 0x80) ~= 0, rsv = rshift(band(b1, 0x70), 4), opcode = band(b1, 0x0F),
             payload = payload }
end

-- Reads frames until a close frame: returns its code (nil when it had none), reason, then expects
-- the server to close the TCP connection
local function expect_close(sock)
    while true do
        local f = assert(read_frame(sock))
        if f.opcode == 8 then
            local code
            if #f.payload >= 2 then code = byte(f.payload, 1) * 256 + byte(f.payload, 2) end
            local data, err = sock:receive(1)
            assert.same({ nil, "closed" }, { data, err })
            return code, f.payload:sub(3)
        end
    end
end

-- -- the handshake ---------------------------------------------------------------------------------

describe("moonlet.ws handshake", function()
    it("answers 101 with the accept key of RFC 6455's example", function()
        local port = serve(echo_app())
        local _, resp = raw_ws(port)
        assert.same("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", resp.headers["sec-websocket-accept"])
        assert.same("websocket", resp.headers["upgrade"])
        assert.same("Upgrade", resp.headers["connection"])
        assert.is_nil(resp.headers["sec-websocket-extensions"]) -- deflate is off by default
    end)

    it("answers 426 to a plain GET of a websocket route, 405 to a POST", function()
        local port = serve(echo_app())
        local r = test.request(port, "GET", "/echo")
        assert.same(426, r.status)
        assert.same("websocket", r.headers["upgrade"])
        assert.same("13", r.headers["sec-websocket-version"])
        assert.same(405, test.request(port, "POST", "/echo", { body = "x" }).status)
    end)

    it("refuses a wrong version with 426; a bad key, no Connection: Upgrade, HTTP/1.0 or HEAD with 400",
       function()
        local port = serve(echo_app())
        local base = { Upgrade = "websocket", Connection = "keep-alive, Upgrade",
                       ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ==" }
        local h = setmetatable({ ["Sec-WebSocket-Version"] = "8" }, { __index = base })
        local function req(hs)
            local all = {}
            for k, v in pairs(base) do all[k] = v end
            for k, v in pairs(hs) do all[k] = v end
            return test.request(port, "GET", "/echo", { headers = all })
        end
        local r = req(h)
        assert.same(426, r.status)
        assert.same("13", r.headers["sec-websocket-version"])
        assert.same(400, req({ ["Sec-WebSocket-Version"] = "13", ["Sec-WebSocket-Key"] = "short" }).status)
        assert.same(400, req({ ["Sec-WebSocket-Version"] = "13", Connection = "close" }).status)
        assert.same(101, req({ ["Sec-WebSocket-Version"] = "13", Connection = "keep-alive, UPGRADE" }).status)
        assert.same(426, req({ ["Sec-WebSocket-Version"] = "13", Upgrade = "h2c" }).status)
        local r10 = test.raw(port, "GET /echo HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\n"
            .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            .. "Sec-WebSocket-Version: 13\r\n\r\n")
        assert.truthy(r10:find("^HTTP/1%.1 400 "), r10)
        local hh = { ["Sec-WebSocket-Version"] = "13" }
        for k, v in pairs(base) do hh[k] = v end
        assert.same(400, test.request(port, "HEAD", "/echo", { headers = hh }).status) -- not a GET
        assert.same(426, test.request(port, "HEAD", "/echo").status) -- as a plain GET
    end)

    it("lets an origin hook refuse with 403 and pass the allowed ones", function()
        local port = serve(echo_app({ origin = function(origin) return origin == "https://ok.test" end }))
        local ws, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/echo",
                                           { timeout = 5, origin = "https://evil.test" })
        assert.same({ nil, "handshake failed: status 403" }, { ws, err })
        ws = connect(port, "/echo", { timeout = 5, origin = "https://ok.test" })
        assert(ws:send("fine"))
        assert.same("fine", ws:receive(5))
        -- the hook decides for a handshake without Origin (it gets nil): refused here
        ws, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/echo", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 403" }, { ws, err })
        -- a list: browsers' origins checked; a client without Origin (no browser) passes, as Tornado's
        local port2 = serve(echo_app({ origin = { "https://ok.test" } }))
        ws, err = moonlet.ws.connect("ws://127.0.0.1:" .. port2 .. "/echo",
                                     { timeout = 5, origin = "https://evil.test" })
        assert.same({ nil, "handshake failed: status 403" }, { ws, err })
        ws = connect(port2, "/echo", { timeout = 5 })
        assert(ws:send("no origin"))
        assert.same("no origin", ws:receive(5))
    end)

    it("negotiates a subprotocol in the server's order of preference", function()
        local port = serve(function(app)
            app:websocket("/p", function(ws) ws:send(ws.protocol or "none") end,
                          { protocols = { "v2.chat", "v1.chat" } })
        end)
        local ws = connect(port, "/p", { timeout = 5, protocols = { "v1.chat", "v2.chat" } })
        assert.same("v2.chat", ws.protocol)
        assert.same("v2.chat", ws:receive(5))
        local ws2 = connect(port, "/p", { timeout = 5, protocols = { "other" } })
        assert.is_nil(ws2.protocol)
        assert.same("none", ws2:receive(5))
    end)

    it("adds the headers option to the 101, and connect gives the 101's headers, repeats joined", function()
        local port = serve(function(app)
            app:websocket("/h", function(ws) ws:send("hi") end, { headers = function(req)
                return { ["Set-Cookie"] = { "a=1; Path=/", "b=" .. req.query.b }, ["X-One"] = "1\n2" }
            end })
            app:websocket("/bad", function() end, { headers = { ["Sec-WebSocket-Accept"] = "x" } })
        end)
        local ws, h = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/h?b=2", { timeout = 5 })
        assert(ws, h)
        finally(function() ws:close() end)
        assert.same({ "a=1; Path=/\nb=2", "1, 2", "websocket" }, { h["set-cookie"], h["x-one"], h.upgrade })
        assert.equal("hi", ws:receive(5))
        local c, err = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/bad", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 500" }, { c, err }) -- the 101's own: misuse
        assert.has_error(function() moonlet.app():websocket("/x", function() end, { headers = "X: 1" }) end)
    end)

    it("gives the whole answer of a server that refuses the handshake: status, headers, body", function()
        local big = ("x"):rep(200 * 1024)
        local port = serve(function(app)
            app:get("/private", function(_, res)
                res:status(401)
                res:header("WWW-Authenticate", 'Bearer realm="ws"')
                return "log in first\n"
            end)
            app:get("/big", function(_, res) -- streamed: a chunked body that comes in pieces
                res:status(403)
                for i = 1, 4 do res:write(big .. i) end
            end)
        end)
        local before = test.settled_stats() -- (the server listening)
        local c, err, answer = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/private", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 401" }, { c, err })
        assert.same({ 401, 'Bearer realm="ws"', "log in first\n" },
                    { answer.status, answer.headers["www-authenticate"], answer.body })
        c, err, answer = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/big", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 403" }, { c, err })
        assert.same({ 403, "chunked" }, { answer.status, answer.headers["transfer-encoding"] })
        assert.is_true(answer.body == big .. 1 .. big .. 2 .. big .. 3 .. big .. 4)
        c, err, answer = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/nowhere", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 404", 404 }, { c, err, answer.status })
        assert.truthy(test.wait_until(function() -- each connection closed, nothing left behind
            local now = core.stats()
            return now.tasks <= before.tasks and now.handles <= before.handles
                and now.resources <= before.resources
        end, 5))
        test.assert_baseline(before)
    end)

    it("passes the request to the handler: params, headers, peer", function()
        local port = serve(function(app)
            app:websocket("/room/:name", function(ws, req)
                ws:send(req.params.name .. " " .. tostring(req:header("X-Token")) .. " "
                        .. tostring(req.peer ~= nil))
            end)
        end)
        local ws = connect(port, "/room/lobby", { timeout = 5, headers = { ["X-Token"] = "t1" } })
        assert.same("lobby t1 true", ws:receive(5))
        assert.same({ nil, "closed" }, { ws:receive(5) }) -- the handler returned: closed with 1000
        assert.same(1000, ws.close_code)
    end)
end)

-- -- messages ----------------------------------------------------------------------------------

describe("moonlet.ws messages", function()
    it("echoes text and binary messages of 0 B to 1 MiB", function()
        local port = serve(echo_app())
        local ws = connect(port)
        for _, n in ipairs({ 0, 1, 125, 126, 127, 65535, 65536, 100000, 1024 * 1024 }) do
            local text = rep("é", math.floor(n / 2)) .. rep("a", n % 2)
            assert(ws:send(text, "text"))
            assert.same({ text, "text" }, { ws:receive(5) })
            local bin = rep("\0\255", math.floor(n / 2)) .. rep("\1", n % 2)
            assert(ws:send(bin, "binary"))
            local got, kind = ws:receive(5)
            assert.same(#bin, #got)
            assert.is_true(got == bin)
            assert.same("binary", kind)
        end
    end)

    it("reassembles fragmented messages, from our client and over raw TCP with pings between", function()
        local port = serve(echo_app())
        local ws = connect(port, "/echo", { timeout = 5, fragment_size = 1000 })
        local big = rep("0123456789", 10000)
        assert(ws:send(big))
        assert.is_true(ws:receive(5) == big)
        local sock = raw_ws(port)
        assert(sock:send(frame(1, "Hel", { fin = false }) .. frame(9, "ping!") .. frame(0, "lo, ",
            { fin = false }) .. frame(0, "", { fin = false }) .. frame(0, "world", { fin = true })))
        local pong = assert(read_frame(sock))
        assert.same({ true, 10, "ping!" }, { pong.fin, pong.opcode, pong.payload })
        local echo = assert(read_frame(sock))
        assert.same({ 1, "Hello, world" }, { echo.opcode, echo.payload })
    end)

    it("keeps the order of many messages sent at once, and of two readers one after the other", function()
        local port = serve(echo_app())
        local ws = connect(port)
        for i = 1, 500 do assert(ws:send(tostring(i))) end
        for i = 1, 500 do assert.same(tostring(i), ws:receive(5)) end
    end)

    it("refuses a second concurrent reader", function()
        local port = serve(echo_app())
        local ws = connect(port)
        local t = moonlet.spawn(function() return ws:receive(5) end)
        assert.same({ nil, "socket busy reading" }, { ws:receive(1) })
        ws:send("x")
        assert.same({ true, "x", "text" }, { t:join() })
    end)

    it("times a receive out and stays usable", function()
        local port = serve(echo_app())
        local ws = connect(port)
        assert.same({ nil, "timeout" }, { ws:receive(0.05) })
        assert(ws:send("after"))
        assert.same("after", ws:receive(5))
        -- math.huge waits as long as it takes (its milliseconds are clamped, bindings/mlua.h mlua_ms)
        assert(ws:send("forever"))
        assert.same("forever", ws:receive(math.huge))
    end)

    it("lets the loop poll at a receive with a timeout under 1 ms: a loop retrying it gets it", function()
        -- (0.0001 s rounds to a 0 ms timer, which libuv < 1.45 ran in the same pass: bindings/mlua.h)
        local port = serve(echo_app())
        local ws = connect(port)
        assert(ws:send("echoed"))
        local msg, err
        local tries = 0
        repeat
            tries = tries + 1
            msg, err = ws:receive(0.0001)
            assert.truthy(msg or err == "timeout", err)
        until msg or tries == 100000
        assert.same("echoed", msg)
    end)

    it("refuses to send invalid UTF-8 as text and an unknown kind", function()
        local port = serve(echo_app())
        local ws = connect(port)
        assert.same({ nil, "invalid utf-8" }, { ws:send("\255") })
        assert.has_error(function() ws:send("x", "blob") end)
        assert(ws:send("\255", "binary"))
        assert.same({ "\255", "binary" }, { ws:receive(5) })
        assert(ws:send({ a = 1 })) -- a table goes as JSON
        assert.same('{"a":1}', ws:receive(5))
    end)

    it("closes with a frame without a code when asked for 1005 (what a proxy passes on)", function()
        local port = serve(echo_app())
        local sock = raw_ws(port)
        assert(sock:send(frame(8, "")))
        local f = assert(read_frame(sock))
        assert.same({ 8, "" }, { f.opcode, f.payload }) -- the server echoes an empty close
        local ws = connect(port)
        assert.has_error(function() ws:close(1005, "a reason") end)
        assert.has_error(function() ws:close(1006) end)
        ws:close(1005)
        assert.same({ nil, "closed" }, { ws:receive(5) })
        assert.equal(1005, ws.close_code) -- the server's echo had no code either
    end)
end)

-- -- control frames and keep-alive ---------------------------------------------------------------

describe("moonlet.ws ping and pong", function()
    it("answers a ping with a pong carrying its payload, and our ping gets a pong", function()
        local port = serve(echo_app())
        local sock = raw_ws(port)
        assert(sock:send(frame(9, "abc")))
        local f = assert(read_frame(sock))
        assert.same({ 10, "abc" }, { f.opcode, f.payload })
        local ws = connect(port)
        local rtt = assert(ws:ping("x", 5))
        assert.is_true(type(rtt) == "number" and rtt >= 0)
        assert.has_error(function() ws:ping(rep("x", 126)) end)
    end)

    it("pings an idle client and closes it (1001) when nothing comes back", function()
        local port = serve(echo_app({ ping_interval = 0.05, idle_timeout = 0.3 }))
        local sock = raw_ws(port)
        local f = assert(read_frame(sock))
        assert.same(9, f.opcode) -- the keep-alive ping
        local code, reason = expect_close(sock)
        assert.same({ 1001, "idle timeout" }, { code, reason })
    end)

    it("keeps a client that answers pings open past the idle timeout", function()
        local done = {}
        local port = serve(function(app)
            app:websocket("/echo", function(ws)
                for msg in ws:messages() do ws:send(msg) end
                done.code = ws.close_code
            end, { ping_interval = 0.05, idle_timeout = 0.2 })
        end)
        local ws = connect(port)
        moonlet.sleep(0.5) -- four idle timeouts: the automatic pongs keep it alive
        assert.same("open", ws:state())
        assert(ws:send("still here"))
        assert.same("still here", ws:receive(5))
        ws:close(1000)
        assert(test.wait_until(function() return done.code end))
        assert.same(1000, done.code)
    end)
end)

describe("moonlet.ws under pressure", function()
    it("answers a ping flood from a client that does not read with fewer pongs, not a queue", function()
        local port = serve(echo_app())
        local sock = raw_ws(port)
        local ping = frame(9, rep("p", 125))
        local chunk = rep(ping, 8000)           -- 1.0 MiB of pings per write
        local sent = 0
        for _ = 1, 24 do                        -- 24 MiB: more than the kernel's buffers hold
            assert(sock:send(chunk))
            sent = sent + 8000
        end
        local pongs = 0
        while true do
            local f = read_frame(sock)
            if not f then break end
            if f.opcode == 10 then pongs = pongs + 1 end
            if pongs == sent then break end
        end
        assert.truthy(pongs > 0)
        assert.truthy(pongs < sent, "every ping was answered: the pongs were queued without bound")
    end)

    -- big_sender(opts) -> port: a route that answers "n" with a binary message of n bytes
    local function big_sender(opts)
        return serve(function(app)
            app:websocket("/big", function(ws)
                local n = tonumber((ws:receive()))
                ws:send(rep("x", n), "binary")
                for _ in ws:messages() do end
            end, opts)
        end)
    end
    local BIG = 32 * 1024 * 1024 -- more than the kernel's buffers hold while the client reads none

    it("answers a ping that came while a long message was going out, between its fragments", function()
        local port = big_sender({ fragment_size = 16384 })
        local sock = raw_ws(port, "/big")
        assert(sock:send(frame(1, tostring(BIG))))
        local f = assert(read_frame(sock))
        assert.same({ 2, false }, { f.opcode, f.fin })
        assert(sock:send(frame(9, "during"))) -- the rest of the message waits in the server
        local got, pong_at = #f.payload, nil
        repeat
            f = assert(read_frame(sock))
            if f.opcode == 10 then
                assert.same("during", f.payload)
                pong_at = got
            else
                assert.same(0, f.opcode)
                got = got + #f.payload
            end
        until f.opcode == 0 and f.fin
        assert.same(BIG, got)
        assert.truthy(pong_at and pong_at < BIG, "the pong waited for the whole message")
    end)

    it("answers the latest ping that came while the output was backed up, once it drains", function()
        local port = big_sender()
        local sock = raw_ws(port, "/big")
        assert(sock:send(frame(1, tostring(BIG))))
        assert(sock:receive(2)) -- the head of one frame of 32 MiB: the server's queue is full
        assert(sock:send(frame(9, "first") .. frame(9, "latest")))
        assert(sock:receive(8)) -- its 64-bit length
        assert.same(BIG, #assert(sock:receive(BIG)))
        local f = assert(read_frame(sock)) -- RFC 6455 5.5.3: the latest ping may be the only one answered
        assert.same({ 10, "latest" }, { f.opcode, f.payload })
    end)

    it("does not count a paused read as silence: a slow reader still gets every message", function()
        local got = {}
        local port = serve(function(app)
            app:websocket("/slow", function(ws)
                moonlet.sleep(1.2) -- reading pauses at 1 MiB queued; the idle timeout is 0.6 s
                for msg in ws:messages() do
                    got[#got + 1] = msg
                    if #got == 5000 then break end
                end
            end, { idle_timeout = 0.6, ping_interval = 0.1 }) -- (0.6: a loaded CI host may stall 0.3 s)
        end)
        local ws = connect(port, "/slow")
        local pad = rep("m", 996) -- 5 MB in all: more than one read, so the server pauses at 1 MiB
        for i = 1, 5000 do assert(ws:send(pad .. string.format("%04d", i % 10000))) end
        assert.truthy(test.wait_until(function() return #got == 5000 end, 10), #got .. " of 5000")
        assert.same(pad .. "5000", got[5000])
    end)

    it("takes only the pong that echoes ws:ping's data as its answer", function()
        local rtt
        local port = serve(function(app)
            app:websocket("/p", function(ws)
                rtt = { ws:ping("abc", 0.3) }
            end)
        end)
        local sock = raw_ws(port, "/p")
        local f = assert(read_frame(sock))
        assert.same({ 9, "abc" }, { f.opcode, f.payload })
        assert(sock:send(frame(10, "zzz"))) -- an unsolicited pong: not the answer
        assert.truthy(test.wait_until(function() return rtt end, 5))
        assert.same({ nil, "timeout" }, rtt)
    end)

    it("refuses a send that would wait outside a task, before sending anything", function()
        local port = serve(function(app)
            app:websocket("/sink", function(ws) moonlet.sleep(2); ws:close() end)
        end)
        local ws = connect(port, "/sink")
        local big = rep("x", 300 * 1024)
        local co = coroutine.create(function() return ws:send(big) end) -- a coroutine of our own
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("outside a moonlet task", 1, true), tostring(err))
    end)
end)

-- -- closing -----------------------------------------------------------------------------------

describe("moonlet.ws close", function()
    local seen
    local function close_app(app)
        app:websocket("/echo", function(ws)
            for msg in ws:messages() do
                if msg == "close me" then ws:close(4001, "as you wish") end
                ws:send(msg)
            end
            seen = { ws.close_code, ws.close_reason }
        end)
    end

    before_each(function() seen = nil end)

    it("tells the server the client's code and reason", function()
        local port = serve(close_app)
        local ws = connect(port)
        assert(ws:close(4000, "bye"))
        assert.same({ nil, "closed" }, { ws:receive(5) })
        assert.same({ 4000, "bye" }, { ws.close_code, ws.close_reason })
        assert(test.wait_until(function() return seen end))
        assert.same({ 4000, "bye" }, seen)
        assert.same({ nil, "closed" }, { ws:send("late") })
        assert(test.wait_until(function() return ws:state() == "closed" end))
    end)

    it("tells the client the server's code and reason", function()
        local port = serve(close_app)
        local ws = connect(port)
        assert(ws:send("close me"))
        assert.same({ nil, "closed" }, { ws:receive(5) })
        assert.same({ 4001, "as you wish" }, { ws.close_code, ws.close_reason })
        assert.is_true(ws:close()) -- closing again is harmless
    end)

    it("drops a peer that reads nothing after close_timeout, not after the send timeout", function()
        local done
        local port = serve(function(app)
            app:websocket("/flood", function(ws)
                local writer = moonlet.spawn(function() -- until the socket and the queue are full
                    local big = string.rep("x", 65536)
                    while ws:send(big, "binary") do end
                end)
                moonlet.sleep(0.3)
                ws:close(1000, "enough") -- queued behind what the peer never reads
                local t0 = moonlet.now()
                ws:receive(30) -- returns when the connection is gone
                done = moonlet.now() - t0
                writer:cancel()
            end, { close_timeout = 0.3 })
        end, { send_timeout = 30 })
        local sock = raw_ws(port, "/flood") -- and then it reads nothing
        assert(test.wait_until(function() return done end, 20))
        assert.truthy(done < 10, done) -- the 0.3 s close timeout, not the 30 s send timeout
        sock:close()
    end)

    it("reports 1005 for a close frame without a code and 1006 for a dropped connection", function()
        local port = serve(close_app)
        local sock = raw_ws(port)
        assert(sock:send(close_frame(nil)))
        local f = assert(read_frame(sock))
        assert.same({ 8, "" }, { f.opcode, f.payload }) -- echoed without a code
        assert(test.wait_until(function() return seen end))
        assert.same({ 1005, "" }, seen)
        seen = nil
        local sock2 = raw_ws(port)
        sock2:close()
        assert(test.wait_until(function() return seen end))
        assert.same(1006, seen[1])
    end)

    it("closes every WebSocket with 1001 when the server shuts down", function()
        local port, server = serve(echo_app())
        local ws = connect(port)
        assert(ws:send("x"))
        assert.same("x", ws:receive(5))
        server:shutdown()
        assert.same({ nil, "closed" }, { ws:receive(5) })
        assert.same({ 1001, "server shutting down" }, { ws.close_code, ws.close_reason })
    end)

    it("closes with 1011 when the handler raises", function()
        local port = serve(function(app)
            app:websocket("/boom", function(ws)
                ws:receive()
                error("boom")
            end)
        end)
        local ws = connect(port, "/boom")
        assert(ws:send("go"))
        assert.same({ nil, "closed" }, { ws:receive(5) })
        assert.same({ 1011, "internal error" }, { ws.close_code, ws.close_reason })
    end)
end)

-- -- protocol errors over raw TCP ----------------------------------------------------------------

describe("moonlet.ws protocol errors", function()
    local port, server
    before_each(function()
        local app = moonlet.app()
        echo_app({ max_message = 1000 })(app)
        server, port = test.serve(app)
    end)
    after_each(function() server:close() end)

    local function expect(bytes, code)
        local sock = raw_ws(port)
        assert(sock:send(bytes))
        local got = expect_close(sock)
        assert.same(code, got)
    end

    it("closes 1002 on an unmasked client frame", function()
        expect(frame(1, "hi", { mask = false }), 1002)
    end)
    it("closes 1002 on an unknown opcode", function()
        expect(frame(3, "x"), 1002)
        expect(frame(11, "x"), 1002)
    end)
    it("closes 1002 on reserved bits without an extension", function()
        expect(frame(1, "x", { rsv = 4 }), 1002)
        expect(frame(1, "x", { rsv = 2 }), 1002)
    end)
    it("closes 1002 on a fragmented control frame and on a control frame over 125 bytes", function()
        expect(frame(9, "x", { fin = false }), 1002)
        expect(frame(9, rep("x", 126)), 1002)
    end)
    it("closes 1002 on a continuation without a message and a new message inside one", function()
        expect(frame(0, "x"), 1002)
        expect(frame(1, "a", { fin = false }) .. frame(1, "b"), 1002)
    end)
    it("closes 1002 on a close frame of one byte or with an invalid code", function()
        expect(frame(8, "x"), 1002)
        expect(close_frame(999), 1002)
        expect(close_frame(1005), 1002)
        expect(close_frame(2999), 1002)
    end)
    it("closes 1007 on invalid UTF-8 in a text message, even split across fragments", function()
        expect(frame(1, "ok \192\128"), 1007) -- an overlong NUL
        expect(frame(1, "\237\160\128"), 1007) -- a surrogate
        expect(frame(1, "\206", { fin = false }) .. frame(0, "\177", { fin = false })
            .. frame(0, "\255"), 1007)
        expect(frame(1, "truncated \226\130"), 1007)
        expect(close_frame(1000, "\255"), 1007)
    end)
    it("accepts UTF-8 split across fragments", function()
        local sock = raw_ws(port)
        assert(sock:send(frame(1, "\226", { fin = false }) .. frame(0, "\130", { fin = false })
            .. frame(0, "\172")))
        assert.same("€", assert(read_frame(sock)).payload)
    end)
    it("closes 1009 on a message over max_message, whole or in fragments", function()
        expect(frame(2, rep("x", 1001)), 1009)
        expect(frame(2, rep("x", 600), { fin = false }) .. frame(0, rep("x", 600)), 1009)
        expect(frame(2, "", { len = 2 ^ 40 }), 1009) -- refused from the head, before any payload
        expect(frame(2, "", { len = 2 ^ 63 }), 1002)
    end)
    it("closes 1009 past the default limit of 1 MiB", function()
        local p2 = serve(echo_app())
        local ws = connect(p2)
        assert(ws:send(rep("x", 1024 * 1024 + 1)))
        assert.same({ nil, "closed" }, { ws:receive(5) })
        assert.same(1009, ws.close_code)
    end)
    it("keeps serving other connections while one misbehaves", function()
        local ws = connect(port)
        local bad = raw_ws(port)
        assert(bad:send(frame(1, "ok", { mask = false }) .. rep("\255", 10000)))
        assert(ws:send("fine"))
        assert.same("fine", ws:receive(5))
        assert.same(1002, (expect_close(bad)))
        assert(ws:send("still fine"))
        assert.same("still fine", ws:receive(5))
    end)
end)

-- -- permessage-deflate --------------------------------------------------------------------------

describe("moonlet.ws permessage-deflate", function()
    it("is negotiated when both sides ask, and compresses on the wire", function()
        local port = serve(echo_app({ deflate = true }))
        local ws = connect(port, "/echo", { timeout = 5, deflate = true })
        assert.truthy(ws.extensions:find("permessage-deflate", 1, true))
        local text = rep("compress me please ", 5000)
        for _ = 1, 3 do -- context takeover: later messages reuse the window
            assert(ws:send(text))
            assert.is_true(ws:receive(5) == text)
        end
        assert(ws:send(""))
        assert.same("", ws:receive(5))
        local sock = raw_ws(port, "/echo", "Sec-WebSocket-Extensions: permessage-deflate; "
                            .. "client_max_window_bits\r\n")
        local text2 = rep("hello ", 100)
        assert(sock:send(frame(1, text2)))
        local f = assert(read_frame(sock))
        assert.same(4, f.rsv) -- RSV1: compressed
        assert.is_true(#f.payload < #text2 / 4)
    end)

    it("is off unless the server asks for it", function()
        local port = serve(echo_app())
        local ws = connect(port, "/echo", { timeout = 5, deflate = true })
        assert.is_nil(ws.extensions)
        assert(ws:send("plain"))
        assert.same("plain", ws:receive(5))
    end)

    it("honours no_context_takeover and window bits", function()
        local port = serve(echo_app({ deflate = { server_no_context_takeover = true } }))
        local _, resp = raw_ws(port, "/echo", "Sec-WebSocket-Extensions: permessage-deflate; "
                               .. "client_no_context_takeover; server_max_window_bits=10\r\n")
        local ext = resp.headers["sec-websocket-extensions"]
        assert.truthy(ext:find("server_no_context_takeover", 1, true))
        assert.truthy(ext:find("client_no_context_takeover", 1, true))
        assert.truthy(ext:find("server_max_window_bits=10", 1, true))
        local ws = connect(port, "/echo", { timeout = 5,
                                            deflate = { client_no_context_takeover = true } })
        local text = rep("abcdefgh", 3000)
        for _ = 1, 3 do
            assert(ws:send(text))
            assert.is_true(ws:receive(5) == text)
        end
    end)

    it("closes 1002 on RSV1 on a ping or continuation and 1009 on a bomb once deflate is on", function()
        local port = serve(echo_app({ deflate = true, max_message = 1000 }))
        local ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        local function expect(bytes, code)
            local sock = raw_ws(port, "/echo", ext)
            assert(sock:send(bytes))
            assert.same(code, (expect_close(sock)))
        end
        expect(frame(9, "x", { rsv = 4 }), 1002) -- control frames are never compressed
        expect(frame(1, "a", { fin = false }) .. frame(0, "b", { rsv = 4 }), 1002) -- RSV1: first frame only
        -- 114 bytes of raw deflate that inflate to 100000 zeros: refused at max_message, not inflated
        local hex = "ecc13101000000c2a0f54f6d0d0fa0" .. rep("00", 96) .. "805703"
        local bomb = hex:gsub("%x%x", function(h) return char(tonumber(h, 16)) end)
        expect(frame(2, bomb, { rsv = 4 }), 1009)
    end)

    it("closes 1002 on a compressed frame when deflate was not agreed", function()
        local port = serve(echo_app({ deflate = true }))
        local sock = raw_ws(port) -- no offer: no deflate
        assert(sock:send(frame(1, "x", { rsv = 4 })))
        assert.same(1002, (expect_close(sock)))
    end)
end)

-- -- backpressure ----------------------------------------------------------------------------------

describe("moonlet.ws backpressure", function()
    it("makes a fast server sender wait for a client that does not read", function()
        local state = { sent = 0 }
        local port = serve(function(app)
            app:websocket("/flood", function(ws)
                local chunk = rep("x", 64 * 1024)
                for i = 1, 160 do -- 10 MiB
                    if not ws:send(chunk, "binary") then break end
                    state.sent = i
                end
                state.done = true
                ws:receive()
            end)
        end)
        local sock = raw_ws(port, "/flood")
        moonlet.sleep(0.2)
        assert.is_true(state.sent < 160, "the sender was not held back: " .. state.sent)
        local total = 0
        while total < 160 * 64 * 1024 do
            local f = assert(read_frame(sock))
            total = total + #f.payload
        end
        assert(test.wait_until(function() return state.done end))
        sock:send(close_frame(1000))
    end)

    it("stops reading from a fast client while the handler reads slowly", function()
        local state = {}
        local port = serve(function(app)
            app:websocket("/slow", function(ws)
                state.ws = ws
                local n = 0
                while true do
                    local m = ws:receive()
                    if not m then break end
                    n = n + 1
                    if n == 1 then moonlet.sleep(0.3) end -- a slow reader at first
                end
                state.n = n
            end)
        end)
        local ws = connect(port, "/slow")
        local chunk = rep("y", 32 * 1024)
        local sender = moonlet.spawn(function()
            for _ = 1, 1024 do assert(ws:send(chunk, "binary")) end -- 32 MiB
            ws:close()
        end)
        moonlet.sleep(0.15)
        local _, bytes = state.ws:queued()
        assert.is_true(bytes <= 1024 * 1024 + 64 * 1024, "queued " .. bytes)
        assert.is_false(sender:is_done())
        assert.same({ true }, { sender:join(10) })
        assert(test.wait_until(function() return state.n end, 10))
        assert.same(1024, state.n)
    end)
end)

-- -- the client --------------------------------------------------------------------------------------

describe("moonlet.ws.connect", function()
    it("reports a refused connection, a non-WebSocket answer and a timeout", function()
        local port = serve(function(app)
            app:get("/plain", function() return "no" end)
            app:get("/slow", function() moonlet.sleep(0.5) return "late" end)
        end)
        local p2 = serve(function() end)
        local ws, err, answer = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/plain", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 200", "no" }, { ws, err, answer.body })
        ws, err, answer = moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/none", { timeout = 5 })
        assert.same({ nil, "handshake failed: status 404", 404 }, { ws, err, answer.status })
        assert.same({ nil, "timeout" },
                    { moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/slow", { timeout = 0.1 }) })
        assert.has_error(function() moonlet.ws.connect("http://x/") end)
        assert.has_error(function() moonlet.ws.connect("ws://x/", { headers = { A = "b\r\nc" } }) end)
        for _, bad in ipairs({ "ws://x/a\r\nX-Injected: yes", "ws://x/a b", "ws://x\n/a" }) do
            assert.has_error(function() moonlet.ws.connect(bad) end) -- nothing goes out
        end
        -- a port nobody listens on: find one by closing a server
        local app = moonlet.app()
        local s3, p3 = test.serve(app)
        s3:close()
        moonlet.sleep(0)
        assert.same({ nil, "connection refused" },
                    { moonlet.ws.connect("ws://127.0.0.1:" .. p3 .. "/", { timeout = 5 }) })
        assert(p2)
    end)

    it("resolves localhost and sends the path with its query string", function()
        local port = serve(function(app)
            app:websocket("/q", function(ws, req) ws:send(req.query.a or "?") end)
        end)
        local ws = connect(port, "/q?a=42", nil)
        assert.same("42", ws:receive(5))
        local ws2, err = moonlet.ws.connect("ws://localhost:" .. port .. "/q?a=7", { timeout = 5 })
        assert(ws2, err)
        assert.same("7", ws2:receive(5))
        ws2:close()
    end)
end)

-- -- channels over WebSockets (the room of docs/websocket.md) -------------------------------------

describe("moonlet.ws rooms", function()
    it("relays a message of one member to the others", function()
        local port = serve(function(app)
            app:websocket("/room/:name", function(ws, req)
                local room = moonlet.channel("room:" .. req.params.name)
                local sub = room:subscribe()
                moonlet.spawn(function() for m in sub:messages() do ws:send(m) end end)
                for msg in ws:messages() do room:publish(msg) end
                sub:close()
            end)
        end)
        local a = connect(port, "/room/r1")
        local b = connect(port, "/room/r1")
        local c = connect(port, "/room/r2")
        assert(test.wait_until(function() return moonlet.channel("room:r1"):subscribers() == 2 end))
        assert(a:send("hello room"))
        assert.same("hello room", b:receive(5))
        assert.same("hello room", a:receive(5))
        assert.same({ nil, "timeout" }, { c:receive(0.1) })
        a:close()
        b:close()
        c:close()
        assert(test.wait_until(function() return moonlet.channel("room:r1"):subscribers() == 0 end))
    end)
end)

-- -- cancellation and leaks ----------------------------------------------------------------------

describe("moonlet.ws resources", function()
    it("keeps serving when a client vanishes while many frames go out", function()
        local result
        local port = serve(function(app)
            app:websocket("/flood", function(ws)
                ws:receive()
                local ok, err
                for _ = 1, 2000 do -- 32 MB: the writes hit the reset the kernel got back
                    ok, err = ws:send(rep("x", 16000))
                    if not ok then break end
                end
                result = { ok, err }
            end, { fragment_size = 4096 })
            echo_app()(app)
        end)
        local sock = raw_ws(port, "/flood")
        assert(sock:send(frame(1, "go")))
        sock:close() -- before anything came: what the server sends next is answered with a reset
        assert.truthy(test.wait_until(function() return result end, 10))
        assert.same({ nil, "closed" }, result)
        settle() -- the staged output of the closed connection must not outlive it
        local ws = connect(port)
        assert(ws:send("still here"))
        assert.same("still here", ws:receive(5))
    end)

    it("cancels a waiting receive and leaves nothing behind after many connections", function()
        local port = serve(echo_app())
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for _ = 1, 200 do
            local ws = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/echo", { timeout = 5 }))
            local t = moonlet.spawn(function() return ws:receive() end)
            assert.is_true(t:cancel())
            assert.same({ false, "cancelled" }, { t:join() })
            assert(ws:send("x"))
            assert.same("x", ws:receive(5))
            ws:close()
            assert.same({ nil, "closed" }, { ws:receive(5) })
        end
        local ok = test.wait_until(function()
            settle()
            local s = core.stats()
            return s.handles <= before.handles and s.resources <= before.resources
                and s.tasks <= before.tasks
        end)
        if not ok then
            local s = core.stats()
            error(("before: %d handles, %d resources, %d tasks; after: %d, %d, %d"):format(
                before.handles, before.resources, before.tasks, s.handles, s.resources, s.tasks))
        end
        settle()
        assert.is_true(collectgarbage("count") - mem0 < 512, "Lua memory grew")
    end)

    it("cancels a connect in progress", function()
        local port = serve(function(app)
            app:get("/slow", function() moonlet.sleep(0.5) return "late" end)
        end)
        settle()
        local before = test.settled_stats()
        for _ = 1, 20 do
            local t = moonlet.spawn(function()
                return moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/slow", { timeout = 5 })
            end)
            moonlet.sleep(0.005)
            assert.is_true(t:cancel())
            assert.same({ false, "cancelled" }, { t:join() })
        end
        assert(test.wait_until(function()
            settle()
            local s = core.stats()
            return s.resources <= before.resources and s.tasks <= before.tasks
                and s.handles <= before.handles
        end, 5))
    end)
end)
