-- spec/ngx_spec.lua: moonlet.ngx, the OpenResty `ngx` layer. Debian's lua-nginx-redis
-- (lua-resty-redis, module nginx.redis in /usr/share/lua/5.1) runs unmodified against a private
-- redis-server: commands, errors, pipelines, keep-alive reuse, timeouts, pub/sub. Then the
-- cosocket object on its own (ms timeouts, the pool's rules, UDP) and the rest of the ngx table
-- (threads, sleep, time, log, ngx.re's basics: spec/ngx_re_spec.lua has OpenResty's regex cases,
-- hashes), and that nothing is left behind.
-- luacheck: globals ngx
local moonlet = require "moonlet"
local test = require "moonlet.test"
local mngx = require "moonlet.ngx"
local servers = require "support.servers"

mngx.install()

local function settle()
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
    moonlet.sleep(0.01)
end

local has_driver = pcall(require, "nginx.redis")
local has_redis = os.execute("command -v redis-server >/dev/null 2>&1") == 0

describe("moonlet.ngx with lua-resty-redis", function()
    if not (has_driver and has_redis) then
        it("needs lua-nginx-redis and redis-server (Debian)", function()
            pending("lua-nginx-redis or redis-server not installed")
        end)
        return
    end
    local redis = require "nginx.redis"

    local srv
    setup(function()
        local err
        srv, err = servers.redis()
        assert(srv, err)
    end)
    teardown(function()
        mngx.close_idle()
        if srv then srv:stop() end
    end)

    local function client()
        local r = assert(redis:new())
        r:set_timeout(2000)
        assert.same({ 1 }, { r:connect("127.0.0.1", srv.port) })
        finally(function() r:close() end)
        return r
    end

    it("runs commands: strings, integers, nulls, arrays, hashes, errors", function()
        local r = client()
        assert.same({ "OK" }, { r:set("ngx:dog", "an animal") })
        assert.same({ "an animal" }, { r:get("ngx:dog") })
        assert.equal(ngx.null, (r:get("ngx:missing")))
        assert.equal(moonlet.redis.null, ngx.null)
        assert.equal(moonlet.json.null, ngx.null) -- cjson.null, as in OpenResty
        assert.same({ "OK" }, { r:set("ngx:n", "0") })
        assert.same({ 1 }, { r:del("ngx:n") })
        assert.same({ 5 }, { r:incrby("ngx:n", 5) })
        assert.same({ "OK" }, { r:hmset("ngx:h", { a = "1", b = "2" }) })
        local h = r:array_to_hash(assert(r:hgetall("ngx:h")))
        assert.same({ a = "1", b = "2" }, h)
        assert.same({ { "an animal", ngx.null } }, { r:mget("ngx:dog", "ngx:missing") })
        assert.same('["an animal",null]', moonlet.json.encode((r:mget("ngx:dog", "ngx:missing"))))
        local ok, err = r:incr("ngx:dog")
        assert.is_false(ok)
        assert.matches("^ERR", err)
        ok, err = r:get("ngx:h") -- a wrong type: the connection stays usable
        assert.is_false(ok)
        assert.matches("^WRONGTYPE", err)
        assert.same({ "PONG" }, { r:ping() })
        local big = string.rep("x", 200000)
        assert.same({ "OK" }, { r:set("ngx:big", big) })
        assert.equal(big, (r:get("ngx:big")))
    end)

    it("runs pipelines, with error replies in place, and cancels them", function()
        local r = client()
        r:init_pipeline()
        r:set("ngx:cat", "Marry")
        r:set("ngx:horse", "Bob")
        r:get("ngx:cat")
        r:incr("ngx:cat")
        r:get("ngx:horse")
        local res = assert(r:commit_pipeline())
        assert.equal(5, #res)
        assert.same({ "OK", "OK", "Marry" }, { res[1], res[2], res[3] })
        assert.is_false(res[4][1])
        assert.matches("^ERR", res[4][2])
        assert.equal("Bob", res[5])
        r:init_pipeline()
        r:set("ngx:cat", "Tom")
        r:cancel_pipeline()
        assert.same({ "Marry" }, { r:get("ngx:cat") })
        assert.same({ nil, "no pipeline" }, { r:commit_pipeline() })
        -- many commands in one write
        r:init_pipeline(1000)
        for i = 1, 1000 do r:set("ngx:k" .. i, i) end
        res = assert(r:commit_pipeline())
        assert.equal(1000, #res)
    end)

    it("puts connections in the pool and reuses them (get_reused_times)", function()
        local r = assert(redis:new())
        assert.same({ 1 }, { r:connect("127.0.0.1", srv.port) })
        assert.same({ 0 }, { r:get_reused_times() })
        assert(r:set("ngx:reuse", "1"))
        assert.same({ 1 }, { r:set_keepalive(10000, 10) })
        assert.same({ nil, "closed" }, { r:get_reused_times() })
        for round = 1, 3 do
            local r2 = assert(redis:new())
            assert.same({ 1 }, { r2:connect("127.0.0.1", srv.port) })
            assert.same({ round }, { r2:get_reused_times() })
            assert.same({ "1" }, { r2:get("ngx:reuse") })
            assert.same({ 1 }, { r2:set_keepalive(10000, 10) })
        end
        assert.equal(1, mngx.pool_stats().pools["127.0.0.1:" .. srv.port])
        -- a named pool is another pool
        local r3 = assert(redis:new())
        assert(r3:connect("127.0.0.1", srv.port, { pool = "other" }))
        assert.same({ 0 }, { r3:get_reused_times() })
        r3:close()
        mngx.close_idle()
        assert.equal(0, mngx.pool_stats().idle)
    end)

    it("connects over redis-server's Unix domain socket, and pools it by path", function()
        for round = 0, 2 do
            local r = assert(redis:new())
            r:set_timeout(2000)
            assert.same({ 1 }, { r:connect("unix:" .. srv.socket) })
            assert.same({ round }, { r:get_reused_times() })
            assert.same({ "OK" }, { r:set("ngx:unix", "via socket " .. round) })
            assert.same({ "via socket " .. round }, { r:get("ngx:unix") })
            assert.same({ 1 }, { r:set_keepalive(10000, 10) })
        end
        assert.equal(1, mngx.pool_stats().pools["unix:" .. srv.socket])
        local r = assert(redis:new()) -- the same data over TCP: one server
        assert.same({ 1 }, { r:connect("127.0.0.1", srv.port) })
        assert.same({ "via socket 2" }, { r:get("ngx:unix") })
        r:close()
        assert.same({ nil, "connection refused" }, { redis:new():connect("unix:" .. srv.dir) })
        mngx.close_idle()
    end)

    it("refuses keep-alive while subscribed, and does pub/sub", function()
        local sub = client()
        local pub = client()
        local res = assert(sub:subscribe("ngx:chan"))
        assert.same({ "subscribe", "ngx:chan", 1 }, res)
        assert.same({ nil, "subscribed state" }, { sub:set_keepalive() })
        local got = moonlet.spawn(function() return sub:read_reply() end)
        assert.same({ 1 }, { pub:publish("ngx:chan", "hello") })
        assert.same({ true, { "message", "ngx:chan", "hello" } }, { got:join(2) })
        -- read_reply times out without closing a subscribed connection
        sub:set_timeout(50)
        assert.same({ nil, "timeout" }, { sub:read_reply() })
        sub:set_timeout(2000)
        assert.same({ 1 }, { pub:publish("ngx:chan", "again") })
        assert.same({ "message", "ngx:chan", "again" }, sub:read_reply())
        res = assert(sub:unsubscribe("ngx:chan"))
        assert.same({ "unsubscribe", "ngx:chan", 0 }, res)
        assert.same({ "PONG" }, { sub:ping() })
    end)

    it("times out in milliseconds and reports a refused connection", function()
        local r = client()
        r:set_timeout(100)
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { r:blpop("ngx:nolist", 5) })
        assert.truthy(moonlet.now() - t0 < 2)
        -- the driver closed the socket after the timeout
        assert.same({ nil, "closed" }, { r:get("ngx:cat") })
        local port = servers.free_port()
        local r2 = assert(redis:new())
        assert.same({ nil, "connection refused" }, { r2:connect("127.0.0.1", port) })
    end)

    it("does not reuse a pooled connection the server closed", function()
        local r = assert(redis:new())
        assert(r:connect("127.0.0.1", srv.port))
        assert.same({ 1 }, { r:set_keepalive(10000, 10) })
        local killer = client()
        -- kills every other client, the pooled one too; its reply comes after the closes
        local n = assert(killer:client("kill", "type", "normal", "skipme", "yes"))
        assert.truthy(n >= 1)
        local r2 = assert(redis:new())
        assert.same({ 1 }, { r2:connect("127.0.0.1", srv.port) })
        assert.same({ 0 }, { r2:get_reused_times() })
        assert.same({ "PONG" }, { r2:ping() })
        r2:close()
    end)

    it("runs many connections at once from ngx.thread", function()
        local ths = {}
        for i = 1, 20 do
            ths[i] = ngx.thread.spawn(function()
                local r = assert(redis:new())
                assert(r:connect("127.0.0.1", srv.port))
                assert(r:set("ngx:t" .. i, i))
                local v = r:get("ngx:t" .. i)
                assert(r:set_keepalive(10000, 50))
                return v
            end)
        end
        for i = 1, 20 do
            assert.same({ true, tostring(i) }, { ngx.thread.wait(ths[i]) })
        end
        assert.truthy(mngx.pool_stats().idle >= 1)
        mngx.close_idle()
    end)

    it("leaves nothing behind after many connect / keep-alive cycles", function()
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for _ = 1, 500 do
            local r = assert(redis:new())
            assert(r:connect("127.0.0.1", srv.port))
            assert(r:get("ngx:cat"))
            assert(r:set_keepalive(10000, 5))
        end
        mngx.close_idle()
        settle()
        test.assert_baseline(before, mem0, 256) -- KiB
    end)
end)

describe("moonlet.ngx cosockets", function()
    after_each(function() mngx.close_idle() end)

    -- a server that answers each line with "echo: line", "silent" with nothing
    local function server()
        local srv = assert(moonlet.tcp.listen({ port = 0 }, function(sock)
            while true do
                local line = sock:receive("*l")
                if not line then return end
                if line == "two" then sock:send("a\nb\n")
                elseif line ~= "silent" then sock:send("echo: " .. line .. "\n") end
            end
        end))
        finally(function() srv:close() end)
        return srv:port()
    end

    it("connects, sends nested arrays, receives lines, sizes and until a pattern", function()
        local port = server()
        local s = ngx.socket.tcp()
        assert.same({ nil, "closed" }, { s:send("x") })
        assert.same({ 1 }, { s:connect("127.0.0.1", port) })
        finally(function() s:close() end)
        assert.same({ 9 }, { s:send({ "he", { "ll", 0 }, "\n", { { "x" }, 1, "\n" } }) })
        assert.same({ "echo: hell0" }, { s:receive() })
        assert.same({ "echo" }, { s:receive(4) })
        assert.same({ ": x1" }, { s:receive("*l") })
        s:send("abc--def\n")
        local reader = s:receiveuntil("--")
        assert.same({ "echo: abc" }, { reader() })
        assert.same({ "def\n" }, { s:receiveuntil("\n", { inclusive = true })() })
        s:send("0123456789--x\n")
        local pieces = {}
        for piece in function() return reader(4) end do pieces[#pieces + 1] = piece end
        assert.same("echo: 0123456789", table.concat(pieces)) -- streamed, then nil at "--"
        assert.same({ "x\n" }, { s:receiveuntil("\n", { inclusive = true })() })
        assert.same({ 1 }, { s:close() })
        assert.same({ nil, "closed" }, { s:close() })
        assert.same({ nil, "closed" }, { s:receive() })
    end)

    it("takes timeouts in milliseconds and stays usable after a read timeout", function()
        local port = server()
        local s = ngx.socket.tcp()
        s:settimeout(50)
        assert(s:connect("127.0.0.1", port))
        finally(function() s:close() end)
        s:send("silent\n")
        local t0 = moonlet.now()
        assert.same({ nil, "timeout", "" }, { s:receive() })
        assert.truthy(moonlet.now() - t0 < 1)
        s:settimeouts(1000, 1000, 1000)
        s:send("after\n")
        assert.same({ "echo: after" }, { s:receive() })
    end)

    it("hands over what arrived of a read that timed out, as OpenResty, and consumes it", function()
        local gate, done = moonlet.event(), moonlet.event()
        local srv = assert(moonlet.tcp.listen({ port = 0 }, function(sock)
            sock:send("part")
            gate:wait(5)
            sock:send("ial\nrest--more")
            done:wait(5)
        end))
        finally(function() done:set() end)
        finally(function() srv:close() end)
        local s = ngx.socket.tcp()
        s:settimeout(50)
        assert(s:connect("127.0.0.1", srv:port()))
        finally(function() s:close() end)
        assert.same({ nil, "timeout", "part" }, { s:receive() })
        assert.same({ nil, "timeout", "" }, { s:receive(3) }) -- it was consumed
        gate:set()
        s:settimeout(1000)
        assert.same({ "ial" }, { s:receive() })
        s:settimeout(50)
        assert.same({ nil, "timeout", "rest--more" }, { s:receiveuntil("\n")() })
        assert.same({ nil, "timeout", "" }, { s:receive(1) })
    end)

    it("keeps only clean sockets: unread data is refused, a full pool drops its oldest", function()
        local port = server()
        local s = ngx.socket.tcp()
        assert(s:connect("127.0.0.1", port))
        s:send("two\n")
        assert.same({ "a" }, { s:receive() })
        assert(test.wait_until(function() return not s._sock:reusable() end, 2))
        assert.same({ nil, "unread data in buffer" }, { s:setkeepalive() })
        assert.same({ nil, "closed" }, { s:getreusedtimes() })
        local socks = {}
        for i = 1, 3 do
            socks[i] = ngx.socket.tcp()
            assert(socks[i]:connect("127.0.0.1", port))
        end
        for i = 1, 3 do assert.same({ 1 }, { socks[i]:setkeepalive(0, 2) }) end
        assert.equal(2, mngx.pool_stats().pools["127.0.0.1:" .. port])
        -- idle timeout: expired connections are closed, not reused
        local e = ngx.socket.tcp()
        assert(e:connect("127.0.0.1", port))
        assert.same({ 1 }, { e:getreusedtimes() })
        assert.same({ 1 }, { e:setkeepalive(1, 2) })
        ngx.sleep(0.02)
        mngx.close_idle()
        local f = ngx.socket.tcp()
        assert(f:connect("127.0.0.1", port))
        assert.same({ 1 }, { f:setkeepalive(1, 2) })
        ngx.sleep(0.02)
        local g = ngx.socket.tcp()
        assert(g:connect("127.0.0.1", port))
        assert.same({ 0 }, { g:getreusedtimes() })
        g:send("hi\n")
        assert.same({ "echo: hi" }, { g:receive() })
        g:close()
    end)

    it("drops a pooled socket whose peer closed", function()
        local go, closed = moonlet.event(), false
        local srv = assert(moonlet.tcp.listen({ port = 0 }, function(sock)
            sock:receive("*l")
            sock:send("bye\n")
            go:wait(5)
            sock:close() -- on loopback the FIN is in the client's queue when close returns
            closed = true
        end))
        finally(function() srv:close() end)
        local s = ngx.socket.tcp()
        assert(s:connect("127.0.0.1", srv:port()))
        s:send("x\n")
        assert.same({ "bye" }, { s:receive() })
        assert.same({ 1 }, { s:setkeepalive() })
        go:set()
        assert(test.wait_until(function() return closed end, 2))
        local s2 = ngx.socket.tcp()
        assert(s2:connect("127.0.0.1", srv:port()))
        assert.same({ 0 }, { s2:getreusedtimes() })
        s2:close()
    end)

    it("reports errors as OpenResty does", function()
        local s = ngx.socket.tcp()
        assert.same({ nil, "connection refused" }, { s:connect("127.0.0.1", servers.free_port()) })
        assert.same({ nil, "not found" }, { s:connect("unix:/tmp/moonlet-no-such.sock") })
        assert.has_error(function() s:connect(42, 1) end)
        assert.same({ nil, "closed" }, { s:sslhandshake() })
    end)

    it("does the TLS handshake with sslhandshake (verification off by default)", function()
        -- a plain server: the handshake fails, and the socket is closed
        local port = server()
        local s = ngx.socket.tcp()
        s:settimeout(1000)
        assert(s:connect("127.0.0.1", port))
        local ok, err = s:sslhandshake(nil, "localhost", true)
        assert.is_nil(ok)
        assert.matches("^tls: ", err)
        assert.same({ nil, "closed" }, { s:send("x") })
    end)

    it("sends and receives UDP datagrams", function()
        local echo = assert(moonlet.udp.bind("127.0.0.1", 0))
        finally(function() echo:close() end)
        local _, port = echo:getsockname()
        moonlet.spawn(function()
            local data, host, p = echo:recvfrom(5)
            if data then echo:sendto(data:upper(), host, p) end
        end)
        local u = ngx.socket.udp()
        assert.same({ nil, "closed" }, { u:send("x") })
        assert.same({ 1 }, { u:setpeername("127.0.0.1", port) })
        finally(function() u:close() end)
        u:settimeout(2000)
        assert.same({ 1 }, { u:send({ "he", "llo" }) })
        assert.same({ "HELLO" }, { u:receive() })
        u:settimeout(20)
        assert.same({ nil, "timeout" }, { u:receive() })
    end)
end)

describe("moonlet.ngx", function()
    it("installs the ngx global when required (a fresh process)", function()
        local code, out = test.run_script([[
            require "moonlet.ngx"
            print("ngx", type(ngx), type(ngx.socket.tcp), ngx.null ~= nil)
            local ok, redis = pcall(require, "resty.redis")
            print("driver", ok and type(redis.new) or "missing")
        ]])
        assert.same(0, code, out)
        assert.truthy(out:find("ngx\ttable\tfunction\ttrue", 1, true), out)
        if has_driver then assert.truthy(out:find("driver\tfunction", 1, true), out) end
    end)

    it("installs one ngx global, lazily reachable as moonlet.ngx", function()
        assert.equal(ngx, mngx.install())
        assert.equal(mngx, moonlet.ngx)
        assert.equal("content", ngx.get_phase())
        assert.is_number(ngx.config.ngx_lua_version)
        assert.same({}, ngx.var)
        if has_driver then -- Debian's nginx.redis answers to its upstream name too
            assert.equal(require("nginx.redis"), require("resty.redis"))
        end
    end)

    it("spawns, waits for and kills threads", function()
        local a = ngx.thread.spawn(function(x) ngx.sleep(0.05) return x, "a" end, 1)
        local b = ngx.thread.spawn(function() ngx.sleep(0.01) return "b" end)
        assert.same({ true, "b" }, { ngx.thread.wait(a, b) })
        assert.same({ true, 1, "a" }, { ngx.thread.wait(a, b) })
        assert.same({ nil, "already waited or killed" }, { ngx.thread.wait(a, b) })
        local c = ngx.thread.spawn(function() error("boom", 0) end)
        assert.same({ false, "boom" }, { ngx.thread.wait(c) })
        local d = ngx.thread.spawn(function() ngx.sleep(10) end)
        assert.same({ true }, { ngx.thread.kill(d) })
        assert.same({ nil, "already waited or killed" }, { ngx.thread.kill(d) })
        local e = ngx.thread.spawn(function() return 1 end)
        assert.same({ nil, "already terminated" }, { ngx.thread.kill(e) })
        assert.has_error(function() ngx.thread.wait({}) end)
    end)

    it("sleeps in seconds, concurrently, and tells the time", function()
        local t0 = ngx.now()
        local ths = {}
        for i = 1, 5 do ths[i] = ngx.thread.spawn(function() ngx.sleep(0.2) return i end) end
        for i = 1, 5 do assert.same({ true, i }, { ngx.thread.wait(ths[i]) }) end
        local dt = ngx.now() - t0
        assert.truthy(dt >= 0.15 and dt < 0.9)
        assert.truthy(math.abs(ngx.time() - os.time()) <= 1)
        assert.equal(ngx.now(), math.floor(ngx.now() * 1000) / 1000)
        ngx.update_time()
    end)

    it("logs at the ngx levels", function()
        ngx.log(ngx.DEBUG, "moonlet.ngx spec: ", 1, nil, true)
        assert.has_error(function() ngx.log(99, "x") end)
        assert.equal(4, ngx.ERR)
        assert.equal(5, ngx.WARN)
    end)

    it("runs timers", function()
        local got
        assert.is_true(ngx.timer.at(0.01, function(premature, v) got = { premature, v } end, 7))
        assert(test.wait_until(function() return got end, 2))
        assert.same({ false, 7 }, got)
    end)

    it("hashes and encodes", function()
        assert.equal("900150983cd24fb0d6963f7d28e17f72", ngx.md5("abc"))
        assert.equal(16, #ngx.md5_bin("abc"))
        assert.equal("qZk+NkcGgWq6PiVxeFDCbJzQ2J0=", ngx.encode_base64(ngx.sha1_bin("abc")))
        assert.equal("YWI", ngx.encode_base64("ab", true))
        assert.equal("YQ==", ngx.encode_base64("a"))
        for _, s in ipairs({ "", "a", "ab", "abc", "abcd", "\0\255\128x" }) do
            assert.equal(s, ngx.decode_base64(ngx.encode_base64(s)))
        end
        assert.is_nil(ngx.decode_base64("a$b="))
        assert.equal("a%20b%2F", ngx.escape_uri("a b/"))
        assert.equal("a b/", ngx.unescape_uri("a%20b%2F"))
        assert.equal(20, #ngx.hmac_sha1("key", "data"))
    end)

    it("encodes and decodes query arguments, CRC-32s and quotes SQL strings", function()
        assert.equal("a=1&b=x%20y&b=z&c&k%26=v%3D",
                     ngx.encode_args({ a = 1, b = { "x y", "z" }, c = true, d = false, ["k&"] = "v=" }))
        assert.equal("", ngx.encode_args({}))
        assert.has_error(function() ngx.encode_args("a=1") end,
                         "moonlet.ngx: ngx.encode_args expects a table")
        assert.has_error(function() ngx.encode_args({ a = {} , b = print }) end)
        assert.same({ a = "1", b = { "x y", "z" }, c = true, ["k&"] = "v=", p = "a b", e = "" },
                    ngx.decode_args("a=1&b=x%20y&b=z&c&k%26=v%3D&p=a+b&e="))
        assert.same({ a = "1", b = "2" }, ngx.decode_args("a=1&b=2&c=3", 2))
        local many = {}
        for i = 1, 150 do many[i] = "k" .. i .. "=v" end
        local n = 0
        for _ in pairs(ngx.decode_args(table.concat(many, "&"))) do n = n + 1 end
        assert.equal(100, n) -- OpenResty's default limit
        n = 0
        for _ in pairs(ngx.decode_args(table.concat(many, "&"), 0)) do n = n + 1 end
        assert.equal(150, n)
        -- zlib's crc32 ("The quick brown fox ...": 0x414FA339)
        assert.equal(0, ngx.crc32_short(""))
        assert.equal(907060870, ngx.crc32_short("hello"))
        assert.equal(0x414FA339, ngx.crc32_long("The quick brown fox jumps over the lazy dog"))
        assert.equal([['it\'s a \"test\"\n\0\\\Z']], ngx.quote_sql_str("it's a \"test\"\n\0\\\26"))
    end)

    describe("ngx.re", function()
        it("matches with captures, ctx.pos and options", function()
            local m = ngx.re.match("hello, 1234 world", "([a-z]+), (\\d+)")
            assert.same({ [0] = "hello, 1234", "hello", "1234" }, m)
            assert.is_nil(ngx.re.match("hello", "\\d+"))
            local ctx = { pos = 3 }
            m = ngx.re.match("ab12cd34", "\\d+", "jo", ctx)
            assert.same({ [0] = "12" }, m)
            assert.equal(5, ctx.pos)
            assert.same({ [0] = "34" }, ngx.re.match("ab12cd34", "\\d+", "jo", ctx))
            assert.is_nil(ngx.re.match("xab", "^ab"))
            assert.same({ [0] = "ab" }, ngx.re.match("xab", "ab$"))
            assert.same({ [0] = "HeLLo" }, ngx.re.match("say HeLLo", "hel+o", "i"))
            assert.same({ [0] = "Q" }, ngx.re.match("Q", "[a-z]", "i"))
            assert.is_nil(ngx.re.match("xab", "ab", "a"))
            assert.same({ [0] = "a.b" }, ngx.re.match("a.b", "a\\.b"))
            assert.is_nil(ngx.re.match("axb", "a\\.b"))
            assert.same({ [0] = "<a>" }, ngx.re.match("<a><b>", "<.*?>"))
            assert.same({ [0] = "foo_1" }, ngx.re.match("  foo_1!", "\\w+"))
            assert.same({ [0] = "a-%]" }, ngx.re.match("xa-%]", "[%\\]a-]+"))
        end)

        it("finds, iterates and substitutes", function()
            assert.same({ 3, 4 }, { ngx.re.find("ab12", "\\d+") })
            assert.is_nil(ngx.re.find("ab", "\\d"))
            local all = {}
            for m in ngx.re.gmatch("a=1, b=2", "(\\w)=(\\d)") do all[#all + 1] = m[1] .. m[2] end
            assert.same({ "a1", "b2" }, all)
            assert.same({ "h-llo", 1 }, { ngx.re.sub("hello", "[aeiou]", "-") })
            assert.same({ "h-ll-", 2 }, { ngx.re.gsub("hello", "[aeiou]", "-") })
            assert.same({ "[b]=a [d]=c", 2 },
                { ngx.re.gsub("a=b c=d", "(\\w)=(\\w)", "[$2]=${1}") })
            assert.same({ "$5", 1 }, { ngx.re.sub("5", "\\d", "$$$0") })
            assert.same({ "-a-b-", 3 }, { ngx.re.gsub("ab", "x*", "-") })
            assert.same({ "A B", 2 },
                { ngx.re.gsub("a b", "[a-z]", function(m) return m[0]:upper() end) })
        end)

        it("takes PCRE syntax beyond Lua patterns (spec/ngx_re_spec.lua has the rest)", function()
            assert.same({ [0] = "b" }, ngx.re.match("xb", "a|b"))
            assert.same({ [0] = "abab", "ab" }, ngx.re.match("xababy", "(ab)+"))
            assert.same({ [0] = "abab" }, ngx.re.match("xababy", "(?:ab)+"))
            assert.same({ [0] = "123" }, ngx.re.match("x12345", "\\d{3}"))
            assert.same({ [0] = "k=v", "k", "v", key = "k" },
                ngx.re.match("k=v", "(?<key>\\w+)=(\\w+)"))
            assert.same({ [0] = "aa", "a" }, ngx.re.match("baab", "(a)\\1"))
            assert.has_error(function() ngx.re.match("a", "a", "X") end)
        end)
    end)
end)
