-- spec/tcp_spec.lua: moonlet.tcp over real sockets on 127.0.0.1: an echo server made with
-- moonlet.tcp.listen, servers that hang, reset, send garbage or partial lines, large transfers both
-- ways, many clients at once, waits woken by close, timeouts, cancellation, and that 10,000
-- timed-out or cancelled receives and connects leave nothing behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local ffi = require "ffi"

local tcp = moonlet.tcp

local defer = test.defer -- all cleanups of an `it` run (busted keeps only the last finally)

local function serve(handler, opts)
    opts = opts or {}
    opts.host, opts.port = "127.0.0.1", 0
    local server = assert(tcp.listen(opts, handler))
    defer(function() server:close() end)
    return server, server:port()
end

local function connect(port, opts)
    local sock = assert(tcp.connect("127.0.0.1", port, opts or { timeout = 5 }))
    defer(function() sock:close() end)
    return sock
end

-- echoes lines back with a prefix; "quit" closes
local function line_echo(sock)
    while true do
        local line = sock:receive("*l")
        if not line or line == "quit" then return end
        sock:send({ "echo: ", line, "\n" })
    end
end

-- echoes raw bytes as they come until the peer closes
local function byte_echo(sock)
    while true do
        local data = sock:receive_any(65536)
        if not data then return end
        if not sock:send(data) then return end
    end
end

local function settle()
    for _ = 1, 3 do moonlet.sleep(0) end -- close callbacks of the waits just ended run next
    collectgarbage()
    collectgarbage()
end

-- A server that never accepts: a raw listening socket (FFI) with backlog 0. Once one connection
-- fills its queue, the SYNs of the next ones are dropped and their connects hang.
ffi.cdef [[
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned len);
int listen(int fd, int backlog);
int close(int fd);
int getsockname(int fd, void *addr, unsigned *len);
struct moonlet_spec_sin { uint16_t family; uint16_t port; uint32_t addr; uint8_t zero[8]; };
]]
local function hanging_listener()
    local C = ffi.C
    local fd = C.socket(2, 1, 0) -- AF_INET, SOCK_STREAM
    assert(fd >= 0)
    local sin = ffi.new("struct moonlet_spec_sin")
    sin.family = 2
    sin.addr = 0x0100007f -- 127.0.0.1, little endian
    assert(C.bind(fd, sin, 16) == 0 and C.listen(fd, 0) == 0)
    local len = ffi.new("unsigned[1]", 16)
    C.getsockname(fd, sin, len)
    local port = bit.bor(bit.lshift(bit.band(sin.port, 0xff), 8), bit.rshift(sin.port, 8))
    local filler = assert(tcp.connect("127.0.0.1", port, { timeout = 5 }))
    return port, function()
        filler:close()
        C.close(fd)
    end
end

describe("moonlet.tcp.connect", function()
    it("talks to an echo server: send, receive a line, bytes, everything", function()
        local _, port = serve(function(sock)
            line_echo(sock)
            sock:send("bye")
        end)
        local sock = connect(port)
        assert.same({ true }, { sock:send("PING\r\n") })
        assert.same({ "echo: PING" }, { sock:receive("*l") })
        assert.is_true(sock:send({ "a", "b", 1, "\n" }))
        assert.same("echo: ab1", sock:receive())
        assert.is_true(sock:send("xyz\nquit\n"))
        assert.same("echo: x", sock:receive(7))
        assert.same("yz", sock:receive(2))
        assert.same("\nbye", sock:receive("*a"))
        assert.same({ nil, "closed", "" }, { sock:receive("*l") })
    end)

    it("resolves a host name and tells the peer", function()
        local _, port = serve(line_echo)
        local sock = connect(port)
        local ok = assert(tcp.connect("localhost", port, { timeout = 5 }))
        ok:close()
        assert.same({ "127.0.0.1", port }, { sock:getpeername() })
        local host, lport = sock:getsockname()
        assert.same("127.0.0.1", host)
        assert.is_number(lport)
    end)

    it("returns connection refused when nobody listens", function()
        local server, port = serve(line_echo)
        server:close()
        assert.same({ nil, "connection refused" }, { tcp.connect("127.0.0.1", port, { timeout = 5 }) })
    end)

    it("returns not found for a name that does not resolve", function()
        assert.same({ nil, "not found" }, { tcp.connect("no-such-host.invalid", 80, { timeout = 5 }) })
    end)

    it("times out a connect that does not complete", function()
        local port, release = hanging_listener()
        defer(release)
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { tcp.connect("127.0.0.1", port, { timeout = 0.2 }) })
        assert.truthy(moonlet.now() - t0 < 2)
    end)

    it("raises on misuse", function()
        assert.has_error(function() tcp.connect(nil, 80) end)
        assert.has_error(function() tcp.connect("127.0.0.1", "http") end)
        assert.has_error(function() tcp.connect("127.0.0.1", 80, { timeout = "1" }) end)
    end)
end)

describe("moonlet.tcp sockets", function()
    it("times out a receive from a server that hangs, and stays usable", function()
        local release = moonlet.event()
        local _, port = serve(function(sock)
            release:wait(10)
            sock:send("late\n")
        end)
        local sock = connect(port, { timeout = 0.1 })
        assert.same({ nil, "timeout" }, { sock:receive("*l") })
        assert.same({ nil, "timeout" }, { sock:receive_any(10) })
        release:set()
        sock:settimeout(5)
        assert.same("late", sock:receive("*l"))
    end)

    it("returns the partial data with closed when the peer closes mid-line", function()
        local _, port = serve(function(sock) sock:send("no newline") end)
        local sock = connect(port)
        assert.same({ nil, "closed", "no newline" }, { sock:receive("*l") })
    end)

    it("reports closed when the server resets the connection", function()
        local sent = moonlet.event()
        local _, port = serve(function()
            sent:wait(5)
            -- closing with unread bytes in the kernel's buffer makes it answer with a reset
        end)
        local sock = connect(port)
        assert.is_true(sock:send(string.rep("x", 1000)))
        sent:set()
        assert.same({ nil, "closed", "" }, { sock:receive("*a") })
        test.wait_until(function() return not sock:send("more") end, 5)
        assert.same({ nil, "closed" }, { sock:send("more") })
    end)

    it("survives a server that sends garbage", function()
        local garbage = {}
        for i = 0, 4095 do garbage[#garbage + 1] = string.char((i * 7 + 3) % 256) end
        garbage = table.concat(garbage):gsub("\n", "")
        local _, port = serve(function(sock) sock:send(garbage) end)
        local sock = connect(port)
        local data, err, partial = sock:receive("*l")
        assert.same({ nil, "closed" }, { data, err })
        assert.same(garbage, partial)
    end)

    it("assembles lines that arrive in pieces", function()
        local q = moonlet.queue()
        local _, port = serve(function(sock)
            while true do
                local chunk = q:get(5)
                if not chunk then return end
                sock:send(chunk)
            end
        end)
        local sock = connect(port)
        local reader = moonlet.spawn(function() return sock:receive("*l") end)
        q:put("hel")
        q:put("lo\r\nwor")
        assert.same({ true, "hello" }, { reader:join(5) })
        reader = moonlet.spawn(function() return sock:receive("*l") end)
        q:put("ld\nrest")
        assert.same({ true, "world" }, { reader:join(5) })
        assert.same("re", sock:receive(2))
        q:put("!")
        assert.same("st!", sock:receive(3))
    end)

    it("reads up to a pattern with receiveuntil", function()
        local _, port = serve(function(sock) sock:send("a--b----c--") end)
        local sock = connect(port)
        local reader = sock:receiveuntil("--")
        assert.same("a", reader())
        assert.same("b", reader())
        assert.same("", reader())
        assert.same("c", reader())
        assert.same({ nil, "closed", "" }, { reader() })
    end)

    it("moves several megabytes both ways at once", function()
        local _, port = serve(byte_echo)
        local sock = connect(port, { timeout = 10 })
        local parts = {}
        for i = 1, 4096 do parts[i] = string.format("%07d", i) .. string.rep("x", 1017) end
        local payload = table.concat(parts) -- 4 MiB
        local writer = moonlet.spawn(function()
            assert(sock:send(payload))
            assert(sock:send({ payload:sub(1, 1000), payload:sub(1001) }))
            return true
        end)
        local first = assert(sock:receive(#payload))
        local second = assert(sock:receive(#payload))
        assert.same({ true, true }, { writer:join(10) })
        assert.is_true(first == payload)
        assert.is_true(second == payload)
    end)

    it("serves many clients at once", function()
        local _, port = serve(line_echo)
        local fns = {}
        for i = 1, 50 do
            fns[i] = function()
                local sock = assert(tcp.connect("127.0.0.1", port, { timeout = 5 }))
                local out = {}
                for j = 1, 5 do
                    assert(sock:send(i .. ":" .. j .. "\n"))
                    out[j] = assert(sock:receive("*l"))
                end
                sock:close()
                return table.concat(out, ",")
            end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 50 do
            assert.same(("echo: %d:1,echo: %d:2,echo: %d:3,echo: %d:4,echo: %d:5"):format(i, i, i, i, i),
                results[i])
        end
    end)

    it("wakes a waiting reader with closed when the socket is closed", function()
        local _, port = serve(function(sock) sock:receive("*a") end)
        local sock = connect(port)
        local reader = moonlet.spawn(function() return sock:receive("*l") end)
        sock:close()
        assert.same({ true, nil, "closed" }, { reader:join(5) })
        assert.same({ nil, "closed" }, { sock:receive() })
        assert.same({ nil, "closed" }, { sock:send("x") })
    end)

    it("wakes the server's reader with closed when the client leaves", function()
        local got = moonlet.queue()
        local _, port = serve(function(sock) got:put({ sock:receive("*l") }) end)
        local sock = connect(port)
        sock:send("partial")
        sock:close()
        assert.same({ nil, "closed", "partial" }, got:get(5))
    end)

    it("answers socket busy to a second reader", function()
        local _, port = serve(function(sock) sock:receive("*a") end)
        local sock = connect(port)
        local reader = moonlet.spawn(function() return sock:receive("*l") end)
        assert.same({ nil, "socket busy" }, { sock:receive("*l") })
        sock:close()
        reader:join(5)
    end)

    it("reads and writes at once from two tasks", function()
        local _, port = serve(line_echo)
        local sock = connect(port)
        local reader = moonlet.spawn(function() return sock:receive("*l") end)
        assert.is_true(sock:send("duplex\n"))
        assert.same({ true, "echo: duplex" }, { reader:join(5) })
    end)

    it("cancels a waiting reader and keeps the socket usable", function()
        local _, port = serve(line_echo)
        local sock = connect(port)
        local reader = moonlet.spawn(function() return sock:receive("*l") end)
        assert.is_true(reader:cancel())
        assert.same({ false, "cancelled" }, { reader:join(5) })
        assert.is_true(sock:send("again\n"))
        assert.same("echo: again", sock:receive("*l"))
    end)

    it("bounds a wait with moonlet.timeout", function()
        local _, port = serve(function(sock) sock:receive("*a") end)
        local sock = connect(port)
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, function() return sock:receive() end) })
        assert.is_true(sock:send("still open\n"))
    end)

    it("times out a send to a server that does not read, and closes the socket", function()
        local _, port = serve(function(sock) sock:receive_any(1); moonlet.sleep(10) end)
        local sock = connect(port)
        sock:settimeouts(5, 0.2, 5)
        local chunk = string.rep("z", 4 * 1024 * 1024)
        local ok, err
        for _ = 1, 64 do -- the kernel's buffers take a few MB first
            ok, err = sock:send(chunk)
            if not ok then break end
        end
        assert.same({ nil, "timeout" }, { ok, err })
        assert.same({ nil, "closed" }, { sock:receive() })
    end)

    it("closes the socket when a waiting writer is cancelled, waking its reader", function()
        local _, port = serve(function(sock) sock:receive_any(1); moonlet.sleep(10) end)
        local sock = connect(port)
        local reader = moonlet.spawn(function() return sock:receive() end)
        local writer = moonlet.spawn(function()
            local chunk = string.rep("z", 4 * 1024 * 1024)
            for _ = 1, 64 do assert(sock:send(chunk)) end
        end)
        assert.is_true(writer:cancel()) -- true: it is parked in a send the server does not read
        assert.same({ false, "cancelled" }, { writer:join(5) })
        assert.same({ true, nil, "closed" }, { reader:join(5) })
    end)

    it("has separate connect, send and read timeouts", function()
        local _, port = serve(function(sock) sock:receive("*a") end)
        local sock = connect(port)
        sock:settimeouts(1, 1, 0.05)
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { sock:receive(1) })
        assert.truthy(moonlet.now() - t0 < 1)
    end)
end)

describe("moonlet.tcp.listen", function()
    it("greets and closes, the way of the talk's greeting server", function()
        local _, port = serve(function(sock) sock:send("ciao EuroPython\n"); sock:close() end)
        local sock = connect(port)
        assert.same("ciao EuroPython\n", sock:receive("*a"))
    end)

    it("closes the socket when the handler returns or raises", function()
        local _, port = serve(function(sock)
            local line = sock:receive("*l")
            if line == "boom" then error("handler exploded") end
        end)
        local a = connect(port)
        a:send("fine\n")
        assert.same({ nil, "closed", "" }, { a:receive("*l") })
        local b = connect(port)
        b:send("boom\n")
        assert.same({ nil, "closed", "" }, { b:receive("*l") })
    end)

    it("reports an address in use", function()
        local _, port = serve(line_echo)
        assert.same({ nil, "address in use" }, { tcp.listen({ port = port }, line_echo) })
    end)

    it("stops accepting on close and says so", function()
        local server, port = serve(line_echo)
        assert.is_true(server:close())
        assert.same({ nil, "closed" }, { server:port() })
        assert.same({ nil, "connection refused" }, { tcp.connect("127.0.0.1", port, { timeout = 5 }) })
    end)

    it("raises on misuse", function()
        assert.has_error(function() tcp.listen({ port = 0 }) end)
        assert.has_error(function() tcp.listen("7000", line_echo) end)
        assert.has_error(function() tcp.listen({ port = 70000 }, line_echo) end)
    end)
end)

describe("moonlet.tcp waits", function()
    it("leave nothing behind after 10,000 timed-out or cancelled receives and connects", function()
        local _, port = serve(function(sock) sock:receive("*a") end)
        local hport, release = hanging_listener()
        defer(release)
        local sock = connect(port)
        settle()
        local before = core.stats()
        local mem0 = collectgarbage("count")
        for i = 1, 10000 do
            local k = i % 4
            if k == 0 then
                sock:settimeout(0)
                assert.same({ nil, "timeout" }, { sock:receive("*l") })
            elseif k == 1 then
                local t = moonlet.spawn(function() return sock:receive(10) end)
                t:cancel()
            elseif k == 2 then
                assert.same({ nil, "timeout" }, { tcp.connect("127.0.0.1", hport, { timeout = 0 }) })
            else
                local t = moonlet.spawn(tcp.connect, "127.0.0.1", hport, { timeout = 5 })
                t:cancel()
            end
        end
        settle()
        local after = core.stats()
        assert.same(before.handles, after.handles)
        assert.same(before.resources, after.resources)
        assert.same(before.tasks, after.tasks)
        assert.truthy(collectgarbage("count") - mem0 < 256) -- KiB: no growth with the count
        sock:settimeout(5)
        assert.is_true(sock:send("alive\n"))
    end)
end)
