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
        sock:settimeout(math.huge) -- as good as none (bindings/mlua.h mlua_ms)
        assert.same("late", sock:receive("*l"))
    end)

    it("lets the loop poll at a receive with a timeout of 0: a loop retrying it gets the data", function()
        -- a 0 ms timer started in a timer callback ran in the same pass (libuv < 1.45): such a loop
        -- never let the data in, nor anything else (bindings/mlua.h, mlua_wait_ms)
        local _, port = serve(function(sock)
            moonlet.sleep(0.02)
            sock:send("late\n")
            sock:receive("*a")
        end)
        local sock = connect(port)
        sock:settimeout(0)
        local line, err
        local tries = 0
        repeat
            tries = tries + 1
            line, err = sock:receive("*l")
            assert.truthy(line or err == "timeout", err)
        until line or tries == 100000
        assert.same("late", line)
        assert.is_true(tries > 1)
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

    it("streams up to a pattern with reader(size), as OpenResty's example reads it", function()
        local input = "hello, world! -agentzh\r\n--abcedhb blah blah"
        local _, port = serve(function(sock)
            for i = 1, #input, 5 do -- in pieces: a piece may end inside the pattern
                sock:send(input:sub(i, i + 4))
                moonlet.sleep(0.002)
            end
        end)
        local sock = connect(port)
        local reader = sock:receiveuntil("\r\n--abcedhb")
        local got = {}
        while true do
            local data, err = reader(4)
            if not data then
                assert.is_nil(err)
                break
            end
            got[#got + 1] = data
        end
        assert.is_true(#got >= 6)
        for _, piece in ipairs(got) do assert.is_true(#piece >= 1 and #piece <= 4) end
        assert.same("hello, world! -agentzh", table.concat(got))
        assert.same({ nil, "closed", " blah blah" }, { reader() })
        assert.has_error(function() reader(0) end)
        assert.has_error(function() reader("4") end)
    end)

    it("gives the pattern with the data when inclusive, whole or streamed", function()
        local _, port = serve(function(sock) sock:send("ab--cd--efgh--") end)
        local sock = connect(port)
        local reader = sock:receiveuntil("--", { inclusive = true })
        assert.same("ab--", reader())
        assert.same({ "cd", "--" }, { reader(10), reader(10) })
        assert.is_nil(reader(10))
        assert.same({ "ef", "gh", "--" }, { reader(2), reader(2), reader(2) })
        assert.same({ nil, nil }, { reader(2) })
        assert.same({ nil, "closed", "" }, { reader() })
        assert.has_error(function() sock:receiveuntil("--", "inclusive") end)
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

    it("times each receive by its own timeout, whatever the one before it had", function()
        -- the read timer is armed lazily (bindings/tcp.c): a shorter timeout after a longer one
        -- must not wait for the longer one, and a timer left from a short one must not cut a
        -- longer one short
        local lines = moonlet.queue()
        local _, port = serve(function(sock)
            while true do
                local line = lines:get()
                if not line then return end
                sock:send(line)
            end
        end)
        test.defer(function() lines:put(false) end)
        local sock = connect(port, { timeout = 5 })
        lines:put("one\n")
        assert.same("one", sock:receive("*l")) -- its wait armed the timer for 5 s
        sock:settimeout(0.05)
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { sock:receive("*l") })
        assert.truthy(moonlet.now() - t0 < 1)
        sock:settimeout(0.25)
        lines:put("two\n")
        assert.same("two", sock:receive("*l")) -- leaves the timer armed to fire 0.25 s from now
        sock:settimeout(3)
        moonlet.spawn(function() moonlet.sleep(0.5) lines:put("three\n") end)
        assert.same("three", sock:receive("*l")) -- outlives the timer left from before
    end)

    it("does not keep a script alive with the read timer of a socket nobody reads", function()
        -- after a receive the read timer stays armed (lazily) for the rest of the timeout
        local done = moonlet.event()
        test.defer(function() done:set() end)
        local _, port = serve(function(sock) -- the connection stays open: no EOF stops the timer
            moonlet.sleep(0.1) -- the script's receive waits (and arms the timer)
            sock:send("hi\n")
            done:wait(30)
        end)
        local t0 = moonlet.now()
        local code, out = test.run_script(([[
            local moonlet = require "moonlet"
            local sock = assert(moonlet.tcp.connect("127.0.0.1", %d, { timeout = 30 }))
            print(sock:receive("*l"))
            KEEP = sock -- neither closed nor collected
        ]]):format(port), 20)
        assert.same({ 0, "hi\n" }, { code, out })
        assert.truthy(moonlet.now() - t0 < 10)
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
        assert.same("moonlet.tcp.server (port " .. port .. ")", tostring(server))
        assert.is_true(server:close())
        assert.same("moonlet.tcp.server (closed)", tostring(server))
        assert.same({ nil, "closed" }, { server:port() })
        assert.same({ nil, "connection refused" }, { tcp.connect("127.0.0.1", port, { timeout = 5 }) })
    end)

    it("keeps serving when its object is collected, and the instance still frees cleanly", function()
        -- the server's C struct pointed at its collected Lua box and wrote through it at exit:
        -- LuaJIT's heap was corrupted (under SANITIZE=1 the Lua heap is malloc's: ASan sees it)
        local code, out = test.run_script([[
            local moonlet = require "moonlet"
            local function start()
                local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 },
                    function(sock) sock:send("still here\n"); sock:close() end))
                return server:port()
            end
            local port = start()
            collectgarbage(); collectgarbage()
            local sock = assert(moonlet.tcp.connect("127.0.0.1", port, { timeout = 5 }))
            print(sock:receive("*l"))
            sock:close()
            require("moonlet.core").halt()
        ]])
        assert.same({ 0, "still here\n" }, { code, out })
    end)

    it("raises on misuse", function()
        assert.has_error(function() tcp.listen({ port = 0 }) end)
        assert.has_error(function() tcp.listen("7000", line_echo) end)
        assert.has_error(function() tcp.listen({ port = 70000 }, line_echo) end)
    end)
end)

describe("moonlet.tcp waits", function()
    it("a writer taken out of its wait by a timeout cannot be cancelled into a second resume", function()
        local done = moonlet.event()
        local server, port = serve(function() done:wait(5) end) -- never reads
        local sock = connect(port)
        sock:settimeouts(5, 0.3, nil) -- send timeout 0.3 s
        local big = string.rep("x", 64 * 1024 * 1024)
        local resumed, cancelled = 0, nil
        local w
        w = moonlet.spawn(function()
            local ok, err = sock:send(big)
            resumed = resumed + 1
            return ok, err
        end)
        local r = moonlet.spawn(function()
            sock:receive(1) -- woken by the close that the write timeout makes
            cancelled = w:cancel() -- runs before the timeout resumes the writer
        end)
        assert.same({ true, nil, "timeout" }, { w:join(5) })
        r:join(5)
        assert.is_false(cancelled)
        assert.same(1, resumed)
        done:set() -- the server's handler ends and closes its side
        server:close()
    end)

    it("a send that cannot wait goes out whole from a coroutine of one's own, not at all where a "
       .. "task cannot yield", function()
        local got = 0
        local _, port = serve(function(sock)
            while true do
                local d = sock:receive_any(65536)
                if not d then return end
                got = got + #d
            end
        end)
        local big = string.rep("z", 8 * 1024 * 1024) -- more than the kernel takes at once
        local sock = connect(port)
        local ok, err = pcall(table.sort, { 2, 1 }, function(a, b)
            sock:send(big) -- a task that cannot yield here: refused before a byte goes out
            return a < b
        end)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("cannot wait here", 1, true))
        local sent = coroutine.wrap(function() return sock:send(big) end)()
        assert.is_true(sent) -- queued behind what the kernel took: nobody waits for it
        assert.truthy(test.wait_until(function() return got >= #big end, 10), got)
        assert.same(#big, got) -- whole, and nothing of the refused send
    end)

    it("refuses a byte count that is not a size", function()
        local _, port = serve(function(s) s:receive("*a") end) -- until the client closes
        local sock = connect(port)
        for _, n in ipairs({ 1e19, -1, 0 / 0 }) do
            assert.has_error(function() sock:receive(n) end)
        end
        assert.has_error(function() sock:receive_any(1e19) end)
    end)

    it("leave nothing behind after 10,000 timed-out or cancelled receives and connects", function()
        local _, port = serve(function(sock) sock:receive("*a") end)
        local hport, release = hanging_listener()
        defer(release)
        local sock = connect(port)
        settle()
        local before = test.settled_stats()
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
        test.assert_baseline(before, mem0, 256) -- KiB
        sock:settimeout(5)
        assert.is_true(sock:send("alive\n"))
    end)
end)

describe("moonlet.tcp cosocket methods", function()
    local certs, ca, cert, key
    setup(function()
        certs = test.make_certs()
        ca, cert, key = certs.ca, certs.cert, certs.key
    end)
    teardown(function() test.remove_certs(certs) end)

    after_each(function() tcp.close_idle() end)

    -- a line echo server counting the connections it accepted
    local function counting(opts)
        local n = { accepted = 0, active = 0 }
        local _, port = serve(function(sock)
            n.accepted, n.active = n.accepted + 1, n.active + 1
            line_echo(sock)
            n.active = n.active - 1
        end, opts)
        return port, n
    end

    local function socket()
        local s = tcp.socket()
        defer(function() s:close() end)
        return s
    end

    it("connects an unconnected socket object and talks over it", function()
        local port = counting()
        local s = socket()
        assert.same({ nil, "closed" }, { s:send("x\n") })
        assert.same({ nil, "closed" }, { s:receive("*l") })
        assert.same({ nil, "closed" }, { s:getreusedtimes() })
        assert.same({ nil, "closed" }, { s:setkeepalive() })
        s:settimeout(5)
        assert.same({ true }, { s:connect("127.0.0.1", port) })
        assert.same({ 0 }, { s:getreusedtimes() })
        assert.is_true(s:send("hello\n"))
        assert.same("echo: hello", s:receive("*l"))
        assert.is_true(s:send({ "a", "b", "\n" }))
        local reader = s:receiveuntil("\n")
        assert.same("echo: ab", reader())
        s:settimeouts(5, 5, 0.05)
        assert.same({ nil, "timeout" }, { s:receive(1) })
        assert.same({ true }, { s:close() })
        assert.same({ nil, "closed" }, { s:close() })
        assert.equal(tcp.socket, tcp.new)
        local n = tcp.new()
        -- a port nobody listens on: a server closed at once
        local srv = assert(tcp.listen({ host = "127.0.0.1", port = 0 }, line_echo))
        local dead = srv:port()
        srv:close()
        assert.same({ nil, "connection refused" }, { n:connect("127.0.0.1", dead, { timeout = 5 }) })
        assert.has_error(function() n:connect("127.0.0.1", "x") end)
        assert.has_error(function() n:connect(nil, 1) end)
        assert.has_error(function() n:settimeout("5") end)
    end)

    it("has the whole cosocket method set on moonlet.tcp.connect's sockets too", function()
        local port = counting()
        local c = connect(port)
        for _, name in ipairs({ "connect", "sslhandshake", "send", "receive", "receiveuntil",
                                "settimeout", "settimeouts", "setkeepalive", "getreusedtimes",
                                "close" }) do
            assert.is_function(c[name], name)
            assert.is_function(tcp.socket()[name], name)
        end
    end)

    it("connects a socket of moonlet.tcp.connect again: the object stays, its connection changes",
       function()
        -- each connection's server tells its number, then echoes
        local accepted, ended = 0, 0
        local _, port = serve(function(sock)
            accepted = accepted + 1
            sock:send("conn " .. accepted .. "\n")
            line_echo(sock)
            ended = ended + 1
        end)
        local _, other = serve(function(sock) sock:send("other\n"); line_echo(sock) end)
        local c = connect(port)
        assert.same("conn 1", c:receive("*l"))
        -- while connected: the old connection is closed first (its server sees the end)
        assert.same({ true }, { c:connect("127.0.0.1", port, { timeout = 5 }) })
        assert.same("conn 2", c:receive("*l"))
        assert.is_true(c:send("x\n"))
        assert.same("echo: x", c:receive("*l"))
        moonlet.sleep(0.05)
        assert.same(1, ended)
        assert.same({ 0 }, { c:getreusedtimes() })
        -- after close
        assert.same({ true }, { c:close() })
        assert.same({ true }, { c:connect("127.0.0.1", port) })
        assert.same("conn 3", c:receive("*l"))
        -- after setkeepalive: the same host takes the pooled connection back (no new accept)
        assert.same({ true }, { c:setkeepalive(10) })
        assert.same({ nil, "closed" }, { c:send("y\n") })
        assert.same({ true }, { c:connect("127.0.0.1", port) })
        assert.same({ 1 }, { c:getreusedtimes() })
        assert.is_true(c:send("y\n"))
        assert.same("echo: y", c:receive("*l"))
        assert.same(3, accepted)
        -- pooled, then another host: the pooled connection stays in the pool for the next one
        assert.same({ true }, { c:setkeepalive(10) })
        assert.same({ true }, { c:connect("127.0.0.1", other) })
        assert.same("other", c:receive("*l"))
        assert.same(1, tcp.pool_stats().pools["127.0.0.1:" .. port])
        local d = socket()
        assert.same({ true }, { d:connect("127.0.0.1", port) })
        assert.same({ 2 }, { d:getreusedtimes() })
        assert.is_true(d:send("z\n"))
        assert.same("echo: z", d:receive("*l"))
        assert.same(3, accepted)
        -- a connect that fails leaves the object closed (its old connection closed first)
        local srv = assert(tcp.listen({ host = "127.0.0.1", port = 0 }, line_echo))
        local dead = srv:port()
        srv:close()
        assert.same({ nil, "connection refused" }, { c:connect("127.0.0.1", dead, { timeout = 5 }) })
        assert.same({ nil, "closed" }, { c:send("w\n") })
        assert.same({ nil, "closed" }, { c:getreusedtimes() })
        assert.same({ true }, { c:connect("127.0.0.1", other) })
        assert.same("other", c:receive("*l"))
        -- misuse raises; a server-side socket cannot connect
        assert.has_error(function() c:connect("127.0.0.1", "x") end)
        local refused
        local _, srv_port = serve(function(sock)
            refused = select(2, pcall(sock.connect, sock, "127.0.0.1", port))
            sock:close()
        end)
        local e = connect(srv_port)
        assert.same({ nil, "closed", "" }, { e:receive("*l") })
        assert.matches("connect on a server%-side socket", refused)
    end)

    it("pools connections with setkeepalive and counts reuses with getreusedtimes", function()
        local port, n = counting()
        local k = "127.0.0.1:" .. port
        local s = socket()
        assert.is_true(s:connect("127.0.0.1", port, { timeout = 5 }))
        assert.is_true(s:send("one\n"))
        assert.same("echo: one", s:receive("*l"))
        assert.same({ true }, { s:setkeepalive(10) })
        assert.same({ nil, "closed" }, { s:send("x\n") }) -- the object let it go
        assert.same(1, tcp.pool_stats().pools[k])
        for round = 1, 3 do
            local s2 = socket()
            assert.is_true(s2:connect("127.0.0.1", port))
            assert.same({ round }, { s2:getreusedtimes() })
            assert.is_true(s2:send("r" .. round .. "\n"))
            assert.same("echo: r" .. round, s2:receive("*l"))
            assert.is_true(s2:setkeepalive(10))
        end
        assert.same(1, n.accepted)
        -- a socket of moonlet.tcp.connect has the methods too, and its pool is host:port
        local c = assert(tcp.connect("127.0.0.1", port, { timeout = 5 }))
        defer(function() c:close() end)
        assert.same(2, n.accepted)
        assert.same({ 0 }, { c:getreusedtimes() })
        assert.same({ true }, { c:setkeepalive(10, 5) })
        assert.same({ nil, "closed" }, { c:receive("*l") }) -- idle in the pool: not the holder's
        assert.same({ nil, "closed" }, { c:getreusedtimes() })
        assert.same({ nil, "closed" }, { c:setkeepalive() })
        assert.same(2, tcp.pool_stats().pools[k])
        -- a named pool is its own
        local p = socket()
        assert.is_true(p:connect("127.0.0.1", port, { pool = "mine" }))
        assert.same({ 0 }, { p:getreusedtimes() })
        assert.same(3, n.accepted)
        assert.is_true(p:setkeepalive(10))
        assert.same(1, tcp.pool_stats().pools.mine)
        -- a size bound closes the oldest
        local a, b = socket(), socket()
        assert.is_true(a:connect("127.0.0.1", port))
        assert.is_true(b:connect("127.0.0.1", port))
        assert.is_true(a:setkeepalive(10, 1))
        assert.same(1, tcp.pool_stats().pools[k])
        assert.has_error(function() b:setkeepalive(10, 0) end)
        assert.has_error(function() b:setkeepalive("10") end)
        assert.is_true(b:close())
    end)

    it("refuses to pool a socket with unread data or a closed one", function()
        local done = moonlet.event()
        local _, port = serve(function(sock)
            local line = sock:receive("*l")
            if line == "two" then
                sock:send("a\nb\n")
            else
                sock:send("ok\n")
            end
            done:wait()
        end)
        defer(function() done:set() end)
        local s = socket()
        assert.is_true(s:connect("127.0.0.1", port, { timeout = 5 }))
        assert.is_true(s:send("two\n"))
        assert.same("a", s:receive("*l"))
        assert.same({ nil, "unread data in buffer" }, { s:setkeepalive(10) })
        assert.same({ nil, "closed" }, { s:getreusedtimes() })
        assert.same({ nil, "closed" }, { s:setkeepalive(10) })
        local c = assert(tcp.connect("127.0.0.1", port, { timeout = 5 }))
        c:close()
        assert.same({ nil, "closed" }, { c:setkeepalive(10) })
        assert.same({ nil, "closed" }, { c:sslhandshake(nil, "localhost", false) })
        assert.same(0, tcp.pool_stats().idle)
        -- a pooled connection whose peer closed meanwhile is dropped, not handed out
        local d = socket()
        assert.is_true(d:connect("127.0.0.1", port))
        assert.is_true(d:send("one\n"))
        assert.same("ok", d:receive("*l"))
        assert.is_true(d:setkeepalive(10))
        done:set() -- the handlers return: the server closes its sides
        local e = socket()
        assert.truthy(test.wait_until(function()
            local ok = e:connect("127.0.0.1", port)
            if not ok then return false end
            local r = e:getreusedtimes()
            e:close()
            return r == 0
        end, 5))
        assert.same(0, tcp.pool_stats().idle)
    end)

    it("runs sslhandshake on connected sockets, pooled ones skip it", function()
        local port, n = counting({ tls = { cert = cert, key = key } })
        local s = socket()
        assert.is_true(s:connect("localhost", port, { timeout = 5 }))
        assert.same({ true }, { s:sslhandshake(nil, "localhost", { cafile = ca }) })
        assert.same({ true }, { s:sslhandshake() }) -- done already
        assert.is_true(s:send("secret\n"))
        assert.same("echo: secret", s:receive("*l"))
        assert.is_true(s:setkeepalive(10))
        local r = socket()
        assert.is_true(r:connect("localhost", port))
        assert.same({ 1 }, { r:getreusedtimes() })
        assert.same({ true }, { r:sslhandshake(nil, "localhost", { cafile = ca }) })
        assert.is_true(r:send("again\n"))
        assert.same("echo: again", r:receive("*l"))
        assert.same(1, n.accepted)
        -- verify off; and a socket of moonlet.tcp.connect
        local c = connect(port)
        assert.same({ true }, { c:sslhandshake(nil, nil, false) })
        assert.is_true(c:send("x\n"))
        assert.same("echo: x", c:receive("*l"))
        -- verification is on by default: the system store does not know the spec's CA
        local v = socket()
        assert.is_true(v:connect("127.0.0.1", port))
        assert.same("tls: certificate verify failed", select(2, v:sslhandshake(nil, "localhost")))
        assert.same({ nil, "closed" }, { v:send("x\n") })
        assert.has_error(function() v:sslhandshake(nil, 42) end)
    end)

    it("answers a connect while another connect of the same socket waits with socket busy connecting",
       function()
        -- (the second one's connection opened beside the first: it moved in over the first's
        -- and raised "moving a connection into an open socket", its connection left to the GC)
        local port, n = counting()
        local c = connect(port)
        local first
        local t = moonlet.spawn(function() first = { c:connect("localhost", port, { timeout = 5 }) } end)
        assert.same({ nil, "socket busy connecting" }, { c:connect("localhost", port, { timeout = 5 }) })
        t:join()
        assert.same({ true }, first)
        assert.is_true(c:send("a\n"))
        assert.same("echo: a", c:receive("*l"))
        assert.truthy(test.wait_until(function() return n.active == 1 end, 5))
        -- a connect cancelled where it waits leaves the object free to connect again
        local cancelled = moonlet.spawn(function() return c:connect("127.0.0.1", port, { timeout = 5 }) end)
        assert.is_true(cancelled:cancel())
        assert.same({ true }, { c:connect("127.0.0.1", port, { timeout = 5 }) })
        assert.is_true(c:send("b\n"))
        assert.same("echo: b", c:receive("*l"))
        c:close()
        -- the same for an object of moonlet.tcp.socket() (the later connect won there, and the
        -- first one's connection was left to the GC)
        local o = socket()
        local got
        t = moonlet.spawn(function() got = { o:connect("localhost", port, { timeout = 5 }) } end)
        assert.same({ nil, "socket busy connecting" }, { o:connect("localhost", port, { timeout = 5 }) })
        t:join()
        assert.same({ true }, got)
        assert.is_true(o:send("c\n"))
        assert.same("echo: c", o:receive("*l"))
        cancelled = moonlet.spawn(function() return o:connect("127.0.0.1", port, { timeout = 5 }) end)
        assert.is_true(cancelled:cancel())
        assert.same({ true }, { o:connect("127.0.0.1", port, { timeout = 5 }) })
        assert.is_true(o:send("d\n"))
        assert.same("echo: d", o:receive("*l"))
    end)

    it("takes the TLS options of a connect beside tls = true too, those in tls first", function()
        local port = counting({ tls = { cert = cert, key = key } })
        local c = connect(port, { timeout = 5, tls = true, cafile = ca, server_name = "localhost" })
        assert.is_true(c:send("top\n"))
        assert.same("echo: top", c:receive("*l"))
        local s = socket()
        assert.same({ true },
                    { s:connect("127.0.0.1", port, { tls = {}, cafile = ca, server_name = "localhost" }) })
        assert.is_true(s:send("obj\n"))
        assert.same("echo: obj", s:receive("*l"))
        -- tls's own win: a wrong name there fails whatever the top level says
        local failed = "tls: certificate verify failed"
        assert.same(failed, select(2, tcp.connect("127.0.0.1", port,
            { timeout = 5, tls = { server_name = "wrong.test", cafile = ca }, server_name = "localhost" })))
        -- and without the CA, the system store does not know the spec's
        assert.same(failed, select(2, tcp.connect("127.0.0.1", port,
            { timeout = 5, tls = true, server_name = "localhost" })))
        assert.has_error(function() tcp.connect("127.0.0.1", port, { tls = true, cafile = 42 }) end)
    end)

    it("leaks nothing over many pooled reuses and cancelled connects", function()
        local port, n = counting()
        -- the connections of the earlier tests wind down first (their handlers see EOF)
        local last = -1
        assert.truthy(test.wait_until(function()
            settle()
            local h = core.stats().handles
            if h == last then return true end
            last = h
        end, 5))
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for i = 1, 2000 do
            if i % 2 == 0 then
                local o = tcp.socket()
                assert.is_true(o:connect("127.0.0.1", port))
                assert.is_true(o:setkeepalive(10))
            else
                local o = tcp.socket()
                local t = moonlet.spawn(o.connect, o, "127.0.0.1", port, { pool = "other" })
                t:cancel()
                o:close()
            end
        end
        tcp.close_idle()
        assert.truthy(test.wait_until(function() return n.active == 0 end, 5))
        settle()
        test.assert_baseline(before, mem0, 256) -- KiB
        assert.truthy(n.accepted >= 1)
    end)

    it("closes pooled connections after their idle timeout", function()
        local port, n = counting()
        local s = socket()
        assert.is_true(s:connect("127.0.0.1", port, { timeout = 5 }))
        assert.is_true(s:setkeepalive(0.05))
        assert.same(1, tcp.pool_stats().idle)
        assert.truthy(test.wait_until(function() return tcp.pool_stats().idle == 0 end, 5))
        assert.is_true(s:connect("127.0.0.1", port))
        assert.same({ 0 }, { s:getreusedtimes() })
        assert.same(2, n.accepted)
        assert.is_true(s:setkeepalive(0)) -- 0: no idle timeout
        local t0 = core.now()
        test.wait_until(function() return core.now() - t0 > 0.1 end, 1)
        assert.same(1, tcp.pool_stats().idle)
    end)
end)
