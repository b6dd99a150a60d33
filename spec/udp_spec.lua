-- spec/udp_spec.lua: moonlet.udp over real sockets on 127.0.0.1: datagrams both ways, timeouts,
-- a receiver woken by close, cancellation, connected sockets, and that 10,000 timed-out or
-- cancelled receives leave nothing behind.
local moonlet = require "moonlet"

local udp = moonlet.udp

local test = require "moonlet.test"
local defer = test.defer -- all cleanups of an `it` run (busted keeps only the last finally)

local function bind()
    local u = assert(udp.bind("127.0.0.1", 0))
    defer(function() u:close() end)
    return u
end

describe("moonlet.udp", function()
    it("sends a datagram and tells where one came from", function()
        local a, b = bind(), bind()
        local ahost, aport = a:getsockname()
        local _, bport = b:getsockname()
        assert.same("127.0.0.1", ahost)
        assert.is_true(a:sendto("hello", "127.0.0.1", bport))
        assert.same({ "hello", "127.0.0.1", aport }, { b:recvfrom(5) })
        assert.is_true(b:sendto("back", "localhost", aport))
        assert.same({ "back", "127.0.0.1", bport }, { a:recvfrom(5) })
    end)

    it("keeps datagram boundaries, empty and large ones too", function()
        local a, b = bind(), bind()
        local _, bport = b:getsockname()
        local big = string.rep("0123456789", 6000)
        assert.is_true(a:sendto("one", "127.0.0.1", bport))
        assert.is_true(a:sendto("", "127.0.0.1", bport))
        assert.is_true(a:sendto(big, "127.0.0.1", bport))
        assert.same("one", (b:recvfrom(5)))
        assert.same("", (b:recvfrom(5)))
        assert.is_true(big == b:recvfrom(5))
    end)

    it("serves as an echo server in a task of its own", function()
        local server = bind()
        local _, sport = server:getsockname()
        local echo = moonlet.spawn(function()
            for _ = 1, 3 do
                local data, host, port = server:recvfrom(5)
                if not data then return end
                server:sendto("echo " .. data, host, port)
            end
        end)
        local client = bind()
        for i = 1, 3 do
            assert.is_true(client:sendto("n" .. i, "127.0.0.1", sport))
            assert.same("echo n" .. i, (client:recvfrom(5)))
        end
        echo:join(5)
    end)

    it("times out a receive, with the argument or the socket's timeout", function()
        local u = bind()
        assert.same({ nil, "timeout" }, { u:recvfrom(0.02) })
        u:settimeout(0.02)
        assert.same({ nil, "timeout" }, { u:recvfrom() })
    end)

    it("lets the loop poll at a receive with a timeout of 0: a loop retrying it gets the datagram", function()
        -- a 0 ms timer started in a timer callback ran in the same pass (libuv < 1.45): such a loop
        -- never let the datagram in (bindings/mlua.h, mlua_wait_ms)
        local u, peer = bind(), bind()
        local _, port = u:getsockname()
        moonlet.spawn(function()
            moonlet.sleep(0.02)
            peer:sendto("late", "127.0.0.1", port)
        end)
        local got, err
        local tries = 0
        repeat
            tries = tries + 1
            got, err = u:recvfrom(0)
        until got or tries == 100000
        assert.same({ "late", "127.0.0.1" }, { got, err })
        assert.is_true(tries > 1)
    end)

    it("wakes a waiting receiver with closed", function()
        local u = bind()
        local t = moonlet.spawn(function() return u:recvfrom(5) end)
        u:close()
        assert.same({ true, nil, "closed" }, { t:join(5) })
        assert.same({ nil, "closed" }, { u:sendto("x", "127.0.0.1", 9) })
        assert.same({ nil, "closed" }, { u:recvfrom() })
    end)

    it("answers socket busy to a second receiver and survives a cancel", function()
        local a, b = bind(), bind()
        local _, bport = b:getsockname()
        local t = moonlet.spawn(function() return b:recvfrom(5) end)
        assert.same({ nil, "socket busy" }, { b:recvfrom(5) })
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join(5) })
        a:sendto("after cancel", "127.0.0.1", bport)
        assert.same("after cancel", (b:recvfrom(5)))
    end)

    it("talks to one peer after setpeername", function()
        local a, b = bind(), bind()
        local _, aport = a:getsockname()
        local _, bport = b:getsockname()
        assert.is_true(a:setpeername("127.0.0.1", bport))
        assert.is_true(a:send("connected"))
        assert.same({ "connected", "127.0.0.1", aport }, { b:recvfrom(5) })
        b:sendto("reply", "127.0.0.1", aport)
        assert.same({ "reply" }, { a:receive(5) })
    end)

    it("reports an address in use", function()
        local a = bind()
        local _, port = a:getsockname()
        assert.same({ nil, "address in use" }, { udp.bind("127.0.0.1", port) })
    end)

    it("keeps a socket's port its own when hot reload duplicates it (core.udp_dup)", function()
        local a = bind()
        local _, port = a:getsockname()
        local d = assert(require("moonlet.core").udp_dup(a))
        defer(function() d:close() end)
        -- another process binding the port with SO_REUSEADDR would share it (and its datagrams)
        local p = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ([[
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", %d))
    print("bound")
except OSError:
    print("in use")
]]):format(port) }))
        assert.same("in use\n", p:read("*a"))
        assert.same(0, p:wait())
        -- and both objects receive on it
        local c = bind()
        assert(c:sendto("x", "127.0.0.1", port))
        assert.same("x", (d:recvfrom(5)))
    end)

    it("raises on misuse", function()
        local u = bind()
        assert.has_error(function() u:sendto(nil, "127.0.0.1", 9) end)
        assert.has_error(function() u:sendto("x", "127.0.0.1", "port") end)
        assert.has_error(function() udp.bind("127.0.0.1", -1) end)
    end)

    it("leaves nothing behind after 10,000 timed-out or cancelled receives", function()
        local u = bind()
        for _ = 1, 3 do moonlet.sleep(0) end
        collectgarbage()
        collectgarbage()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for i = 1, 10000 do
            if i % 2 == 0 then
                assert.same({ nil, "timeout" }, { u:recvfrom(0) })
            else
                local t = moonlet.spawn(u.recvfrom, u, 5)
                t:cancel()
            end
        end
        for _ = 1, 3 do moonlet.sleep(0) end
        collectgarbage()
        collectgarbage()
        test.assert_baseline(before, mem0, 256) -- KiB
    end)
end)

describe("moonlet.udp cosocket methods", function()
    local function socket()
        local u = udp.socket()
        defer(function() u:close() end)
        return u
    end

    it("connects an unbound socket object with setpeername and talks to the peer", function()
        local peer = bind()
        local _, pport = peer:getsockname()
        local u = socket()
        assert.same({ nil, "closed" }, { u:send("x") })
        assert.same({ nil, "closed" }, { u:receive() })
        assert.same({ nil, "closed" }, { u:getsockname() })
        u:settimeout(5)
        assert.same({ true }, { u:setpeername("127.0.0.1", pport) })
        assert.is_true(u:send("ping"))
        local data, host, port = peer:recvfrom(5)
        assert.same({ "ping", "127.0.0.1" }, { data, host })
        assert.same({ "127.0.0.1", port }, { u:getsockname() })
        assert.is_true(peer:sendto("pong", "127.0.0.1", port))
        assert.same({ "pong" }, { u:receive() })
        assert.is_true(peer:sendto("truncated", "127.0.0.1", port))
        assert.same({ "trunc" }, { u:receive(5) })
        u:settimeout(0.05)
        assert.same({ nil, "timeout" }, { u:receive() })
        -- setpeername again: a new local socket, the old one is closed
        assert.is_true(u:setpeername("localhost", pport))
        assert.is_true(u:send("again"))
        assert.same("again", (peer:recvfrom(5)))
        assert.same({ true }, { u:close() })
        assert.same({ nil, "closed" }, { u:close() })
        assert.has_error(function() u:setpeername("127.0.0.1", "x") end)
        assert.has_error(function() u:send(42) end)
        assert.has_error(function() u:settimeout("1") end)
    end)

    it("wakes a receive with closed when the object is closed", function()
        local peer = bind()
        local _, pport = peer:getsockname()
        local u = socket()
        assert.is_true(u:setpeername("127.0.0.1", pport))
        local t = moonlet.spawn(function() return u:receive() end)
        moonlet.sleep(0)
        u:close()
        assert.same({ true, nil, "closed" }, { t:join() })
    end)
end)
