-- spec/ngx_drivers_spec.lua: lua-resty drivers beyond lua-resty-redis, from Debian's packages and
-- unmodified, on moonlet.ngx: lua-nginx-memcached against a private memcached,
-- lua-nginx-redis-connector (URLs, the pool, a Sentinel) against a private redis, lua-nginx-websocket's
-- client against moonlet's own WebSocket server (ws:// and wss://, the CA given as nginx's
-- lua_ssl_trusted_certificate), lua-nginx-dns against a small authoritative DNS server written
-- here on moonlet.udp and moonlet.tcp (A records, NXDOMAIN, a truncated answer retried over TCP, a
-- silent server), lua-resty-lrucache (both flavours), `require "resty.X"` finding Debian's nginx.X,
-- and the ngx timers' lives: ngx.timer.every, and premature = true at a graceful stop.
-- Each driver's block is pending when its package (or server) is not installed.
-- luacheck: globals ngx
local moonlet = require "moonlet"
local test = require "moonlet.test"
local mngx = require "moonlet.ngx"
local servers = require "support.servers"

local defer = test.defer

mngx.install()

local function installed(mod) return (pcall(require, mod)) end
local function has_command(cmd) return os.execute("command -v " .. cmd .. " >/dev/null 2>&1") == 0 end

local function pending_without(what)
    it("needs " .. what .. " (Debian)", function() pending(what .. " not installed") end)
end

describe("moonlet.ngx: require \"resty.X\"", function()
    it("loads Debian's nginx.X under the OpenResty name, one module under both names", function()
        if not installed("nginx.redis") then return pending("lua-nginx-redis not installed") end
        assert.equal(require("nginx.redis"), require("resty.redis"))
        local ok, err = pcall(require, "resty.no_such_driver")
        assert.is_false(ok)
        assert.truthy(err:find("no Debian module 'nginx.no_such_driver'", 1, true), err)
    end)
end)

describe("moonlet.ngx with lua-resty-memcached", function()
    if not (installed("nginx.memcached") and has_command("memcached")) then
        return pending_without("lua-nginx-memcached and memcached")
    end
    local memcached = require "resty.memcached"
    local proc, port

    setup(function()
        port = servers.free_port()
        local args = { "memcached", "-l", "127.0.0.1", "-p", port, "-U", "0" }
        local f = io.popen("id -u")
        if f:read("*l") == "0" then args[#args + 1] = "-u"; args[#args + 1] = "nobody" end
        f:close()
        args.stdout, args.stderr = "ignore", "ignore"
        proc = assert(moonlet.process.spawn(args))
        assert(test.wait_until(function()
            local s = moonlet.tcp.connect("127.0.0.1", port, { timeout = 1 })
            if s then s:close() end
            return s ~= nil
        end, 5), "memcached did not start")
    end)
    teardown(function()
        mngx.close_idle()
        if proc then
            proc:kill()
            proc:wait(5)
        end
    end)

    local function client()
        local m = assert(memcached:new())
        m:set_timeout(2000)
        assert.same({ 1 }, { m:connect("127.0.0.1", port) })
        return m
    end

    it("stores, reads, counts and deletes, and flags travel with the value", function()
        local m = client()
        defer(function() m:close() end)
        assert.same({ 1 }, { m:set("dog", "an animal", 0, 7) })
        assert.same({ "an animal", "7" }, { m:get("dog") }) -- value, flags (a string, as the driver gives)
        assert.same({ nil, nil, nil }, { m:get("ngx:missing") })
        assert.same({ nil, "NOT_STORED" }, { m:add("dog", "again") })
        assert.same({ 1 }, { m:replace("dog", "a pet") })
        assert.same({ 1 }, { m:append("dog", "!") })
        assert.same({ "a pet!", "0" }, { m:get("dog") })
        assert.same({ 1 }, { m:set("n", 10) })
        assert.same({ "15" }, { m:incr("n", 5) }) -- memcached's reply line, as the driver gives it
        assert.same({ "12" }, { m:decr("n", 3) })
        local many = assert(m:get({ "dog", "n", "ngx:missing" }))
        assert.same({ dog = { "a pet!", "0" }, n = { "12", "0" } }, many)
        assert.same({ 1 }, { m:delete("dog") })
        assert.same({ nil, "NOT_FOUND" }, { m:delete("dog") })
        local big = string.rep("0123456789", 100000) -- 1 MB, under memcached's 1 MiB item limit
        assert.same({ 1 }, { m:set("big", big) })
        assert.equal(big, (m:get("big")))
        assert.same({ 1 }, { m:flush_all() })
        assert.is_nil((m:get("n")))
    end)

    it("goes back to the pool with set_keepalive and is reused by the next connect", function()
        local m = client()
        assert.same({ 0 }, { m:get_reused_times() })
        assert.same({ 1 }, { m:set_keepalive(10000, 10) })
        local again = client()
        defer(function() again:close() end)
        assert.same({ 1 }, { again:get_reused_times() })
        assert.same({ 1 }, { again:set("k", "v") })
        assert.equal("v", (again:get("k")))
    end)

    it("reports a refused connection and times out against a server that never answers", function()
        local m = assert(memcached:new())
        m:set_timeout(200)
        assert.same({ nil, "connection refused" }, { m:connect("127.0.0.1", servers.free_port()) })
        local listener = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function(sock)
            sock:receive("*a") -- reads, never answers
        end))
        defer(function() listener:close() end)
        local silent = assert(memcached:new())
        silent:set_timeout(100)
        assert.same({ 1 }, { silent:connect("127.0.0.1", listener:port()) })
        local t0 = moonlet.now()
        local v, flags, err = silent:get("dog")
        assert.same({ nil, nil, "timeout" }, { v, flags, err })
        assert.truthy(moonlet.now() - t0 < 5)
        silent:close()
    end)
end)

describe("moonlet.ngx with lua-resty-redis-connector", function()
    if not (installed("nginx.redis.connector") and has_command("redis-server")) then
        return pending_without("lua-nginx-redis-connector and redis-server")
    end
    local connector = require "resty.redis.connector"
    local master, sentinel_dir, sentinel_port

    setup(function()
        master = assert(servers.redis())
        -- a Sentinel watching it (redis-server --sentinel rewrites its configuration file)
        local f = io.popen("mktemp -d /tmp/moonlet-sentinel.XXXXXX")
        sentinel_dir = f:read("*l")
        f:close()
        sentinel_port = servers.free_port()
        test.write_file(sentinel_dir .. "/sentinel.conf", table.concat({
            "port " .. sentinel_port, "bind 127.0.0.1", "daemonize yes",
            "pidfile " .. sentinel_dir .. "/sentinel.pid", "logfile " .. sentinel_dir .. "/sentinel.log",
            "dir " .. sentinel_dir, "sentinel monitor mymaster 127.0.0.1 " .. master.port .. " 1", "",
        }, "\n"))
        assert(os.execute("redis-server " .. sentinel_dir .. "/sentinel.conf --sentinel") == 0)
        assert(test.wait_until(function()
            local p = io.popen(("redis-cli -p %d sentinel get-master-addr-by-name mymaster 2>/dev/null")
                :format(sentinel_port))
            local out = p:read("*a")
            p:close()
            return out:find(tostring(master.port), 1, true)
        end, 5), "the sentinel did not start")
    end)
    teardown(function()
        mngx.close_idle()
        if sentinel_dir then
            os.execute("kill $(cat " .. sentinel_dir .. "/sentinel.pid) 2>/dev/null; rm -rf " .. sentinel_dir)
        end
        if master then master:stop() end
    end)

    it("connects by URL to a database, and the connection goes back to the pool", function()
        local rc = connector.new({ connect_timeout = 500, read_timeout = 1000 })
        local r = assert(rc:connect({ url = "redis://127.0.0.1:" .. master.port .. "/2" }))
        assert.same({ "OK" }, { r:set("conn:k", "in db 2") })
        assert.same({ 1 }, { rc:set_keepalive(r) })
        r = assert(rc:connect({ url = "redis://127.0.0.1:" .. master.port .. "/0" }))
        assert.equal(ngx.null, (r:get("conn:k"))) -- another database
        assert.same({ "OK" }, { r:select(2) })
        assert.equal("in db 2", (r:get("conn:k")))
        assert.same({ 1 }, { r:get_reused_times() })
        r:close()
    end)

    it("finds the master through a Sentinel, past a sentinel that is down", function()
        local rc = connector.new({ connect_timeout = 500, read_timeout = 1000 })
        local r = assert(rc:connect({
            url = "sentinel://mymaster:m/3",
            sentinels = { { host = "127.0.0.1", port = servers.free_port() },
                          { host = "127.0.0.1", port = sentinel_port } },
        }))
        assert.same({ "OK" }, { r:set("conn:s", "via sentinel") })
        assert.equal("via sentinel", (r:get("conn:s")))
        r:close()
        local gone = connector.new({ connect_timeout = 200 })
        local none, err = gone:connect({ url = "sentinel://mymaster:m",
                                         sentinels = { { host = "127.0.0.1", port = servers.free_port() } } })
        assert.same({ nil, "no hosts available" }, { none, err })
    end)
end)

describe("moonlet.ngx with lua-resty-websocket's client", function()
    if not installed("nginx.websocket.client") then return pending_without("lua-nginx-websocket") end
    local client = require "resty.websocket.client"

    local app = moonlet.app()
    app:websocket("/echo", function(ws)
        while true do
            local msg, kind = ws:receive()
            if not msg then return end
            ws:send(kind .. ":" .. msg, kind)
        end
    end)

    local certs
    setup(function() certs = test.make_certs() end)
    teardown(function()
        mngx.install({})
        test.remove_certs(certs)
    end)

    local function exchange(wb)
        assert.same({ 2 + 4 + 2, nil }, { wb:send_text("hi") }) -- head, mask, payload
        assert.same({ "text:hi", "text", nil }, { wb:recv_frame() })
        local blob = string.rep("\0\1\2\255", 50000) -- 200 kB: a 64-bit length
        assert.same({ 2 + 8 + 4 + #blob, nil }, { wb:send_binary(blob) })
        assert.same({ "binary:" .. blob, "binary", nil }, { wb:recv_frame() })
        assert(wb:send_ping("are you there"))
        assert.same({ "are you there", "pong", nil }, { wb:recv_frame() })
        assert(wb:send_close(1000, "bye"))
        local data, kind, code = wb:recv_frame()
        assert.same({ "close", 1000 }, { kind, code }, data)
    end

    it("talks to moonlet's WebSocket server: text, binary, ping, close", function()
        local port = test.serving(app)
        local wb = assert(client:new({ timeout = 2000, max_payload_len = 1048576 }))
        assert.same({ 1 }, { wb:connect("ws://127.0.0.1:" .. port .. "/echo") })
        exchange(wb)
        wb:close()
    end)

    it("over wss://, verifying the server against lua_ssl_trusted_certificate", function()
        local port = test.serving(app, { tls = { cert = certs.cert, key = certs.key } })
        local url = "wss://localhost:" .. port .. "/echo"
        -- the system store does not know the spec's CA
        local wb = assert(client:new({ timeout = 2000, max_payload_len = 1048576 }))
        local ok, err = wb:connect(url, { ssl_verify = true })
        assert.is_nil(ok)
        assert.truthy(err:find("certificate verify failed", 1, true), err)
        mngx.install({ lua_ssl_trusted_certificate = certs.ca })
        defer(function() mngx.install({}) end)
        wb = assert(client:new({ timeout = 2000, max_payload_len = 1048576 }))
        assert.same({ 1 }, { wb:connect(url, { ssl_verify = true }) })
        exchange(wb)
        wb:close()
        -- an unrelated CA does not do
        mngx.install({ lua_ssl_trusted_certificate = certs.other_ca })
        wb = assert(client:new({ timeout = 2000 }))
        ok, err = wb:connect(url, { ssl_verify = true })
        assert.is_nil(ok)
        assert.truthy(err:find("certificate verify failed", 1, true), err)
    end)

    it("refuses a bad lua_ssl_trusted_certificate as misuse", function()
        assert.has_error(function() mngx.install({ lua_ssl_trusted_certificate = 1 }) end,
                         "moonlet.ngx: lua_ssl_trusted_certificate must be a file name")
        assert.has_error(function() mngx.install("ca.pem") end,
                         "moonlet.ngx: install expects a table of options")
    end)
end)

-- A small authoritative DNS server: every A question gets 10.1.2.3, except nx.* (NXDOMAIN),
-- big.* (over UDP a truncated, empty answer; over TCP 40 addresses) and silent.* (no answer).
local function dns_answer(q, over_tcp)
    local i = 13
    local labels = {}
    while q:byte(i) ~= 0 do
        local n = q:byte(i)
        labels[#labels + 1] = q:sub(i + 1, i + n)
        i = i + n + 1
    end
    local name = table.concat(labels, ".")
    local question = q:sub(13, i + 4)
    local id = q:sub(1, 2)
    local function reply(flags, addrs)
        local out = { id, flags, "\0\1", string.char(0, #addrs), "\0\0\0\0", question }
        for _, a in ipairs(addrs) do
            out[#out + 1] = "\192\12\0\1\0\1\0\0\0\60\0\4" .. string.char(a[1], a[2], a[3], a[4])
        end
        return table.concat(out)
    end
    if name:match("^silent%.") then return nil end
    if name:match("^nx%.") then return reply("\129\131", {}) end -- rcode 3, name error
    if name:match("^big%.") then
        if not over_tcp then return reply("\131\128", {}) end -- TC set
        local addrs = {}
        for k = 1, 40 do addrs[k] = { 10, 0, 0, k } end
        return reply("\129\128", addrs)
    end
    return reply("\129\128", { { 10, 1, 2, 3 } })
end

describe("moonlet.ngx with lua-resty-dns", function()
    if not installed("nginx.dns.resolver") then return pending_without("lua-nginx-dns") end
    local resolver = require "resty.dns.resolver"

    local udp_server, tcp_server, port, queries
    setup(function()
        queries = { udp = 0, tcp = 0 }
        local function on_tcp(sock)
            local len = sock:receive(2)
            if not len then return end
            local q = sock:receive(len:byte(1) * 256 + len:byte(2))
            queries.tcp = queries.tcp + 1
            local a = dns_answer(q, true)
            sock:send(string.char(math.floor(#a / 256), #a % 256) .. a)
            sock:close()
        end
        for _ = 1, 20 do -- a UDP port whose TCP twin is free too
            udp_server = assert(moonlet.udp.bind("127.0.0.1", 0))
            port = select(2, udp_server:getsockname())
            tcp_server = moonlet.tcp.listen({ host = "127.0.0.1", port = port }, on_tcp)
            if tcp_server then break end
            udp_server:close()
        end
        assert(tcp_server, "no port free for both UDP and TCP")
        moonlet.spawn(function()
            while true do
                local q, host, p = udp_server:recvfrom()
                if not q then return end
                queries.udp = queries.udp + 1
                local a = dns_answer(q, false)
                if a then udp_server:sendto(a, host, p) end
            end
        end)
    end)
    teardown(function()
        udp_server:close()
        tcp_server:close()
    end)

    local function new(timeout)
        return assert(resolver:new({ nameservers = { { "127.0.0.1", port } }, retrans = 2,
                                     timeout = timeout or 2000 }))
    end

    it("resolves an A record over UDP", function()
        local answers = assert(new():query("www.example.test", { qtype = resolver.TYPE_A }))
        assert.equal(1, #answers)
        assert.same({ "www.example.test", "10.1.2.3", 60, resolver.TYPE_A },
                    { answers[1].name, answers[1].address, answers[1].ttl, answers[1].type })
    end)

    it("reports NXDOMAIN as the answer's error code", function()
        local answers = assert(new():query("nx.example.test"))
        assert.same({ 3, "name error" }, { answers.errcode, answers.errstr })
    end)

    it("retries a truncated UDP answer over TCP", function()
        local tcp_before = queries.tcp
        local answers = assert(new():query("big.example.test"))
        assert.equal(40, #answers)
        assert.equal("10.0.0.40", answers[40].address)
        assert.equal(tcp_before + 1, queries.tcp)
    end)

    it("times out against a server that does not answer, after its retries", function()
        local udp_before = queries.udp
        local answers, err = new(100):query("silent.example.test")
        assert.is_nil(answers)
        assert.truthy(err:find("timeout", 1, true), err)
        assert.equal(udp_before + 2, queries.udp) -- retrans = 2
    end)
end)

describe("moonlet.ngx with lua-resty-lrucache", function()
    if not installed("resty.lrucache") then return pending_without("lua-resty-lrucache") end
    for _, name in ipairs({ "resty.lrucache", "resty.lrucache.pureffi" }) do
        it(name .. " evicts the least recently used and expires on ngx.now", function()
            local lrucache = require(name)
            local c = assert(lrucache.new(2))
            c:set("a", 1)
            c:set("b", 2)
            assert.equal(1, c:get("a")) -- a is now the more recent
            c:set("c", 3)               -- b goes
            assert.same({ 1, nil, 3 }, { (c:get("a")), (c:get("b")), (c:get("c")) })
            c:set("d", 4, 0.05)
            moonlet.sleep(0.1)
            local v, stale = c:get("d")
            assert.same({ nil, 4 }, { v, stale }) -- expired: nil and the stale value
        end)
    end
end)

describe("moonlet.ngx timers", function()
    it("runs an every timer again and again; at a graceful stop, pending timers run premature", function()
        local dir = test.make_dir()
        defer(function() test.remove_dir(dir) end)
        local script = dir .. "/timers.lua"
        test.write_file(script, [[
local moonlet = require "moonlet"
local ngx = require("moonlet.ngx").install()
local function say(s) io.stderr:write(s, "\n") end -- unbuffered
local ticks = 0
assert(ngx.timer.every(0.01, function(premature)
    if premature then
        say("every premature after " .. (ticks >= 3 and "3+" or ticks) .. " ticks, exiting: " ..
              tostring(ngx.worker.exiting()))
        say("refused: " .. table.concat({ tostring(ngx.timer.at(1, function() end)) ,
              select(2, ngx.timer.at(1, function() end)) }, " "))
        assert(ngx.timer.at(0, function(p) say("zero-delay premature: " .. tostring(p)) end))
        moonlet.sleep(0.05) -- a callback may still wait: the stop waits for it
        say("every done")
        return
    end
    ticks = ticks + 1
    if ticks == 3 then say("ticked 3") end
end))
assert(ngx.timer.at(3600, function(premature, a, b) say("at premature: " .. tostring(premature) ..
    " " .. a .. " " .. b) end, "x", "y"))
say("pending " .. ngx.timer.pending_count())
local app = moonlet.app()
app:get("/", function() return "ok" end)
return app
]])
        local p = test.start_process("--port 0 " .. script)
        defer(function() p:kill() end)
        p:port()
        assert(test.wait_until(function() return p:output():find("ticked 3", 1, true) end, 5),
               p:output())
        assert.is_true(p:signal("TERM"))
        assert.same(0, p:wait(5))
        local out = p:output()
        assert.truthy(out:find("pending 2", 1, true), out)
        assert.truthy(out:find("every premature after 3+ ticks, exiting: true", 1, true), out)
        assert.truthy(out:find("at premature: true x y", 1, true), out)
        assert.truthy(out:find("refused: nil process exiting", 1, true), out)
        assert.truthy(out:find("zero-delay premature: true", 1, true), out)
        assert.truthy(out:find("every done", 1, true), out)
    end)

    it("refuses a zero or bad every delay and a callback that is not a function", function()
        assert.has_error(function() ngx.timer.every(0, function() end) end,
                         "moonlet.ngx: timer.every: bad delay")
        assert.has_error(function() ngx.timer.at(0 / 0, function() end) end,
                         "moonlet.ngx: timer.at: bad delay")
        assert.has_error(function() ngx.timer.every(1, "f") end,
                         "moonlet.ngx: timer.every expects a function")
    end)
end)
