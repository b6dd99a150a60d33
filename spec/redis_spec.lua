-- spec/redis_spec.lua: moonlet.redis against a private redis-server (a free loopback port, a
-- temporary directory): replies of each type, errors, pipelines, many tasks on one connection,
-- timeouts and cancellation that keep the connection in step, reconnecting after a restart,
-- pub/sub, the pool, and that nothing is left behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local redis = require "moonlet.redis"
local servers = require "support.servers"

local function two(a, b) return { a, b } end

local function settle()
    moonlet.sleep(0)
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
    moonlet.sleep(0.01)
end

describe("moonlet.redis against a server that does not answer AUTH", function()
    -- A fake server: the first connection gets no answer to its AUTH; later ones get +OK to AUTH
    -- and +PONG to PING. A connect cancelled while its AUTH waits must be undone: its connection
    -- closed and forgotten (the next call connects again and authenticates), and a call queued
    -- behind that AUTH answered at once. (The tasks that wait in conn_of for a connect still
    -- under way are woken by the same code; on loopback the TCP connect is over too soon for a
    -- test to catch one there.)
    it("undoes a connect cancelled during AUTH and answers the call queued behind it", function()
        local release = moonlet.event()
        test.defer(function() release:set() end)
        local conns = 0
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function(sock)
            conns = conns + 1
            local mine = conns
            while true do
                local head = sock:receive("*l") -- a command: *N, then N times $len and the bytes
                if not head then return end
                local args = {}
                for i = 1, tonumber(head:sub(2)) do
                    sock:receive("*l")
                    args[i] = sock:receive("*l")
                end
                if mine == 1 then return release:wait(30) end
                if args[1] == "AUTH" then sock:send("+OK\r\n") end
                if args[1] == "PING" then sock:send("+PONG\r\n") end
            end
        end))
        test.defer(function() server:close() end)
        local pool = redis.pool({ port = server:port(), size = 1, password = "pw", timeout = 3,
                                  connect_timeout = 3 })
        test.defer(function() pool:close() end)
        local a = moonlet.spawn(function() return pool:call("PING") end) -- connects; AUTH hangs
        moonlet.sleep(0.05)
        local b = moonlet.spawn(function() return pool:call("PING") end) -- queued behind the AUTH
        moonlet.sleep(0.05)
        local t0 = moonlet.now()
        assert.is_true(a:cancel())
        assert.same({ true, nil, "closed" }, { b:join(5) })
        assert.truthy(moonlet.now() - t0 < 1) -- at once, not at its 3 s timeout
        assert.same("PONG", pool:call("PING")) -- a new connection, authenticated
        assert.same(2, conns)
    end)
end)

describe("moonlet.redis", function()
    if os.execute("command -v redis-server >/dev/null 2>&1") ~= 0 then
        it("needs redis-server (Debian redis-server)", function()
            pending("redis-server not installed")
        end)
        return
    end

    local srv
    setup(function()
        local err
        srv, err = servers.redis()
        assert(srv, err)
    end)
    teardown(function()
        if srv then srv:stop() end
    end)

    local function client(opts)
        opts = opts or {}
        opts.port = opts.port or srv.port
        local r = assert(redis.connect(opts))
        test.defer(function() r:close() end)
        return r
    end

    it("is moonlet.redis and returns each reply type", function()
        assert.equal(redis, moonlet.redis)
        local r = client()
        assert.equal("OK", r:call("FLUSHALL"))
        assert.equal("OK", r:call("SET", "k", "v"))
        assert.equal("v", r:call("GET", "k"))
        assert.same({ nil, nil }, two(r:call("GET", "missing")))
        assert.equal(1, r:call("INCR", "n"))
        assert.equal(3, r:call("INCRBY", "n", 2))
        assert.equal(2, r:call("RPUSH", "l", "a", 7))
        assert.same({ "a", "7" }, r:call("LRANGE", "l", 0, -1))
        assert.same({ "v", redis.null, "3" }, r:call("MGET", "k", "missing", "n"))
        assert.same({}, r:call("LRANGE", "empty", 0, -1))
        local bin = "a\r\nb\0c"
        assert.equal("OK", r:call("SET", "bin", bin))
        assert.equal(bin, r:call("GET", "bin"))
    end)

    it("sends LuaJIT's 64-bit integers (1LL, 2ULL) as their digits; other cdata raise", function()
        local ffi = require "ffi"
        local r = client()
        local above = ffi.new("int64_t", 2 ^ 53) + 1 -- 9007199254740993LL: no double holds it
        assert.equal("OK", r:call("SET", "big", above))
        assert.equal("9007199254740993", r:call("GET", "big"))
        assert.equal("OK", r:call("SET", "ubig", ffi.new("uint64_t", 0) - 1))
        assert.equal("18446744073709551615", r:call("GET", "ubig"))
        assert.equal("-5", (r:call("SET", "neg", -ffi.new("int64_t", 5)) and r:call("GET", "neg")))
        assert.error_matches(function() r:call("SET", "p", ffi.new("int32_t", 3)) end,
                             "command arguments are strings or numbers, got cdata", 1, true)
    end)

    it("connects over the server's Unix domain socket (path =, or host = \"unix:/path\")", function()
        local r = client({ path = srv.socket })
        assert.equal("OK", r:call("SET", "unix:k", "over the socket"))
        local r2 = client({ host = "unix:" .. srv.socket })
        assert.equal("over the socket", r2:call("GET", "unix:k"))
        local r3 = client() -- the same server over TCP
        assert.equal("over the socket", r3:call("GET", "unix:k"))
        local p = redis.pool({ path = srv.socket, size = 2 })
        test.defer(function() p:close() end)
        assert.equal("PONG", p:call("PING"))
        assert.same({ nil, "connection refused" }, { redis.connect({ path = srv.dir }) })
        assert.has_error(function() redis.connect({ path = "" }) end,
                         "moonlet.redis.connect: path must be a socket path")
    end)

    it("returns error replies as nil and the server's message", function()
        local r = client()
        r:call("SET", "str", "x")
        assert.same({ nil, "WRONGTYPE Operation against a key holding the wrong kind of value" },
                    two(r:call("LPUSH", "str", "y")))
        local v, err = r:call("NOSUCHCOMMAND")
        assert.is_nil(v)
        assert.truthy(err:find("^ERR unknown command"), err)
        assert.equal("x", r:call("GET", "str")) -- still in step
        assert.has_error(function() r:call("SET", "k", {}) end,
                         "moonlet.redis: command arguments are strings or numbers, got table")
    end)

    it("sends a pipeline in one go and returns the replies in order", function()
        local r = client()
        r:call("DEL", "a", "b")
        local results = assert(r:pipeline(function(p)
            p:call("INCR", "a")
            p:call("INCR", "b")
            p:call("INCR", "a")
            p:call("GET", "nothing")
            p:call("LPUSH", "a", "x")
        end))
        assert.equal(5, #results)
        assert.same({ 1, 1, 2, redis.null }, { results[1], results[2], results[3], results[4] })
        assert.truthy(results[5].err:find("^WRONGTYPE"))
        assert.same({}, r:pipeline(function() end))
        -- MULTI/EXEC inside a pipeline is never interleaved with other tasks' commands
        local res = assert(r:pipeline(function(p)
            p:call("MULTI")
            p:call("INCR", "a")
            p:call("INCR", "a")
            p:call("EXEC")
        end))
        assert.same({ "OK", "QUEUED", "QUEUED", { 3, 4 } }, res)
    end)

    it("lets 200 tasks share one connection, each getting its own replies", function()
        local r = client()
        r:call("DEL", "counter")
        local fns = {}
        for i = 1, 200 do
            fns[i] = function()
                for j = 1, 10 do
                    assert.equal("OK", r:call("SET", "key:" .. i, i * 100 + j))
                    assert.equal(tostring(i * 100 + j), r:call("GET", "key:" .. i))
                    r:call("INCR", "counter")
                end
                return true
            end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        assert.equal(200, #results)
        assert.equal("2000", r:call("GET", "counter"))
    end)

    it("times out a call and stays in step: the late reply is dropped", function()
        local r = client({ timeout = 0.1 })
        local other = client()
        r:call("DEL", "q")
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, two(r:call("BLPOP", "q", 0)))
        assert.truthy(moonlet.now() - t0 < 1)
        -- calls queue behind the blocked one; once it is answered they are answered in order
        local t = moonlet.spawn(function() return r:call("ECHO", "after") end)
        assert.equal(1, other:call("LPUSH", "q", "late"))
        assert.same({ true, "after" }, { t:join(1) })
        assert.equal("PONG", r:call("PING"))
        assert.equal(0, r:call("LLEN", "q")) -- BLPOP took it, and its reply went nowhere
    end)

    it("cancels a waiting call without putting the connection out of step", function()
        local r = client()
        local other = client()
        r:call("DEL", "cq")
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, function()
            return r:call("BLPOP", "cq", 0)
        end) })
        other:call("RPUSH", "cq", "x")
        assert.equal("PONG", r:call("PING"))
        assert.equal("hello", r:call("ECHO", "hello"))
    end)

    it("reconnects after the server restarts while the client is idle", function()
        local r = client()
        assert.equal("OK", r:call("SET", "r", "1"))
        assert.is_true(srv:restart())
        assert.equal("PONG", r:call("PING"))
        assert.equal("OK", r:call("SET", "r", "2"))
        assert.equal("2", r:call("GET", "r"))
    end)

    it("reports a server it cannot reach", function()
        assert.same({ nil, "connection refused" },
                    two(redis.connect({ port = servers.free_port() })))
    end)

    it("delivers pub/sub messages to a subscription", function()
        local r = client()
        local sub = assert(r:subscribe("news", "sport"))
        test.defer(function() sub:close() end)
        local psub = assert(r:psubscribe("n*"))
        test.defer(function() psub:close() end)
        local got = {}
        local reader = moonlet.spawn(function()
            for channel, msg in sub:messages() do
                got[#got + 1] = channel .. "=" .. msg
                if #got == 3 then break end
            end
        end)
        assert.equal(2, r:call("PUBLISH", "news", "one"))
        assert.equal(1, r:call("PUBLISH", "sport", "two"))
        assert.equal(0, r:call("PUBLISH", "other", "x"))
        assert.equal(2, r:call("PUBLISH", "news", "three"))
        assert.is_true(reader:join(2))
        assert.same({ "news=one", "sport=two", "news=three" }, got)
        assert.same({ "news", "one", "n*" }, { psub:receive(1) })
        assert.same({ "news", "three", "n*" }, { psub:receive(1) })
        assert.same({ nil, "timeout" }, { sub:receive(0.05) })
        local waiting = moonlet.spawn(function() return sub:receive() end)
        sub:close()
        assert.same({ true, nil, "closed" }, { waiting:join(1) })
    end)

    it("spreads calls over a pool of connections", function()
        local pool = redis.pool({ port = srv.port, size = 3 })
        test.defer(function() pool:close() end)
        local fns = {}
        for i = 1, 60 do
            fns[i] = function() return pool:call("ECHO", i) end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 60 do assert.equal(tostring(i), results[i]) end
        local used = 0
        for i = 1, 3 do
            if pool.clients[i].conn then used = used + 1 end
        end
        assert.equal(3, used)
        assert.same({ 1 }, pool:pipeline(function(p) p:call("SADD", "pool:set", "x") end))
        local sub = assert(pool:subscribe("poolnews"))
        test.defer(function() sub:close() end)
        assert.equal(1, pool:call("PUBLISH", "poolnews", "hi"))
        assert.same({ "poolnews", "hi" }, { sub:receive(1) })
    end)


    -- Runs `moonlet script` with the given source; returns its exit code (nil: still running).
    local run_script = test.run_script

    it("does not keep a script alive with an idle client", function()
        assert.same({ 0, "PONG\n" }, { run_script(([[
            local moonlet = require "moonlet"
            local r = assert(moonlet.redis.connect{ port = %d })
            print(r:call("PING"))
        ]]):format(srv.port)) })
    end)

    it("leaves no socket, handle, task or memory behind", function()
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for _ = 1, 20 do
            local r = assert(redis.connect({ port = srv.port, timeout = 1 }))
            for j = 1, 10 do
                if j % 3 == 0 then -- cancelled while its reply is on the way
                    local t = moonlet.spawn(function() return r:call("ECHO", "x") end)
                    assert.is_true(t:cancel())
                else
                    assert.equal(tostring(j), r:call("ECHO", j))
                end
            end
            local sub = assert(r:subscribe("leak"))
            local t = moonlet.spawn(function() return sub:receive() end)
            t:cancel()
            sub:close()
            r:close()
        end
        test.wait_until(function()
            collectgarbage()
            local s = core.stats()
            return s.resources == before.resources and s.handles == before.handles and
                s.tasks == before.tasks
        end, 5)
        settle()
        test.assert_baseline(before, mem0, 512) -- KiB
    end)
end)
