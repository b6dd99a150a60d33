-- spec/unix_spec.lua: Unix domain sockets, everywhere a TCP address goes: moonlet.tcp.listen and
-- connect ("unix:/path"), the cosocket object and its keep-alive pool, moonlet.ngx's sockets, TLS
-- on top, the HTTP server (app:listen{ unix = }, `moonlet --unix PATH`, `--host unix:PATH`, shared
-- by `--workers 2`, behind a real nginx), the HTTP client and moonlet.ws.connect (`unix =`), the
-- socket file's permissions, datagram sockets (moonlet.udp, ngx.socket.udp). The socket file's
-- life: a live server's is never taken over, a stale one (its process killed) is replaced (by
-- exactly one of several servers started at one instant), a path that is not a socket is never
-- removed, and the file goes when the server closes. Errors as
-- nil, err; misuse raises; nothing leaks.
-- luacheck: globals ngx
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"

local tcp = moonlet.tcp
local defer = test.defer

local function exists(path) -- (io.open cannot open a socket file)
    return moonlet.fs.stat(path) ~= nil
end

-- Once the handles closed: as many handles, resources and tasks as before, Lua memory within 200 KiB
local function nothing_left(before, mem0)
    test.wait_until(function() return core.stats().handles <= before.handles end, 5)
    collectgarbage()
    collectgarbage()
    test.assert_baseline(before, mem0, 200)
end

local function line_echo(sock)
    while true do
        local line = sock:receive("*l")
        if not line then return end
        sock:send({ "echo: ", line, "\n" })
    end
end

describe("Unix domain sockets", function()
    local dir
    lazy_setup(function() dir = test.make_dir() end)
    lazy_teardown(function() test.remove_dir(dir) end)

    local function listen(name, handler, opts)
        opts = opts or {}
        opts.unix = dir .. "/" .. name
        local server = assert(tcp.listen(opts, handler or line_echo))
        defer(function() server:close() end)
        return server, opts.unix
    end

    it("moonlet.tcp listens and connects; the names say unix:; the file goes at close", function()
        local server, path = listen("echo.sock")
        assert.equal("unix:" .. path, server:port())
        assert.is_true(exists(path))
        local sock = assert(tcp.connect("unix:" .. path, { timeout = 5 }))
        defer(function() sock:close() end)
        assert.equal("unix:" .. path, sock:getpeername())
        assert.same({ true }, { sock:send("hello\n") })
        assert.equal("echo: hello", sock:receive("*l"))
        local big = string.rep("0123456789", 100000) -- 1 MB each way
        assert.truthy(sock:send(big .. "\n"))
        assert.equal("echo: " .. big, sock:receive("*l"))
        sock:close()
        server:close()
        assert.is_false(exists(path))
        assert.same({ nil, "not found" }, { tcp.connect("unix:" .. path, { timeout = 1 }) })
    end)

    it("keeps a live server's socket, replaces a stale one, never removes what is not a socket", function()
        local _, live = listen("live.sock")
        assert.same({ nil, "address in use" }, { tcp.listen({ unix = live }, line_echo) })
        local sock = assert(tcp.connect("unix:" .. live)) -- the first server still answers
        sock:send("still\n")
        assert.equal("echo: still", sock:receive("*l"))
        sock:close()

        local plain = dir .. "/plain.txt"
        local f = assert(io.open(plain, "w"))
        f:write("keep me")
        f:close()
        assert.same({ nil, "file already exists" }, { tcp.listen({ unix = plain }, line_echo) })
        f = assert(io.open(plain))
        assert.equal("keep me", f:read("*a"))
        f:close()

        -- a process killed while it listened leaves its socket file: nobody answers there
        local stale = dir .. "/stale.sock"
        local script = dir .. "/stale.lua"
        f = assert(io.open(script, "w"))
        f:write(("local m = require 'moonlet'\nassert(m.tcp.listen({ unix = %q }, function() end))\n"
            .. "io.stderr:write('listening\\n')\nm.sleep(60)\n"):format(stale))
        f:close()
        local p = test.start_process(script)
        defer(function() p:kill() end)
        assert.truthy(test.wait_until(function() return p:output():find("listening", 1, true) end))
        p:kill()
        assert.is_true(exists(stale))
        assert.same({ nil, "connection refused" }, { tcp.connect("unix:" .. stale, { timeout = 1 }) })
        local _, path = listen("stale.sock")
        assert.equal(stale, path)
        sock = assert(tcp.connect("unix:" .. stale))
        sock:send("new\n")
        assert.equal("echo: new", sock:receive("*l"))
        sock:close()
    end)

    it("removes at close only the socket file it made, not a newer server's at the same path", function()
        local first, path = listen("replaced.sock")
        os.remove(path) -- an operator's rm, then a new server takes the path
        local second = assert(tcp.listen({ unix = path }, line_echo))
        defer(function() second:close() end)
        first:close()
        moonlet.sleep(0.05)
        assert.is_true(exists(path))
        local sock = assert(tcp.connect("unix:" .. path))
        sock:send("second\n")
        assert.equal("echo: second", sock:receive("*l"))
        sock:close()
        second:close()
        moonlet.sleep(0.05)
        assert.is_false(exists(path))
    end)

    it("sets the socket file's permissions: mode, unix_mode, --unix-mode", function()
        local function perms(path) return moonlet.fs.stat(path).mode end
        local _, p1 = listen("mode600.sock", line_echo, { mode = "600" })
        assert.equal(tonumber("600", 8), perms(p1))
        local _, p2 = listen("mode660.sock", line_echo, { mode = tonumber("660", 8) })
        assert.equal(tonumber("660", 8), perms(p2))
        local sock = assert(tcp.connect("unix:" .. p2)) -- (the owner may still connect)
        sock:close()
        local app = moonlet.app()
        app:get("/", function() return "ok" end)
        local server = assert(app:listen({ unix = dir .. "/app640.sock", unix_mode = "0640" }))
        defer(function() server:close() end)
        assert.equal(tonumber("640", 8), perms(dir .. "/app640.sock"))
        assert.has_error(function() listen("bad.sock", line_echo, { mode = "8" }) end,
                         'moonlet: a socket mode is octal digits such as "660": 8')
        assert.has_error(function() app:listen({ unix = dir .. "/bad2.sock", unix_mode = "rw" }) end)
        local path = dir .. "/cli660.sock"
        local p = test.start_process(("examples/hello.lua --unix %s --unix-mode 660"):format(path))
        defer(function() p:kill() end)
        assert.truthy(test.wait_until(function() return exists(path) end), p:output())
        assert.equal(tonumber("660", 8), perms(path))
        p:signal("TERM")
        assert.equal(0, p:wait(10))
        local q = test.start_process(("examples/hello.lua --unix %s --unix-mode 99"):format(path))
        defer(function() q:kill() end)
        assert.equal(2, q:wait(10))
        assert.matches("%-%-unix%-mode wants an octal mode", q:output())
        local w = test.start_process(("examples/hello.lua --unix %s --unix-mode 620 --workers 2")
            :format(path))
        defer(function() w:kill() end)
        assert.truthy(test.wait_until(function() return exists(path) end), w:output())
        assert.equal(tonumber("620", 8), perms(path))
        w:signal("TERM")
        assert.equal(0, w:wait(10))
    end)

    it("says what is wrong with a path; a port beside unix: is a mistake", function()
        local long = "unix:/tmp/" .. string.rep("x", 120)
        assert.same({ nil, "name too long" }, { tcp.connect(long) })
        assert.same({ nil, "name too long" }, { tcp.listen({ host = long }, line_echo) })
        assert.has_error(function() tcp.connect("unix:/tmp/x.sock", 80) end,
                         "moonlet.tcp.connect: a unix: socket has no port")
        assert.has_error(function() tcp.connect("unix:") end, "moonlet.tcp.connect: empty socket path")
        assert.has_error(function() tcp.listen({ unix = "" }, line_echo) end,
                         "moonlet.tcp.listen: unix must be a socket path")
    end)

    it("the cosocket object pools its connections by path", function()
        local accepted = 0
        local _, path = listen("pool.sock", function(sock)
            accepted = accepted + 1
            line_echo(sock)
        end)
        for i = 1, 3 do
            local s = tcp.socket()
            assert.same({ true }, { s:connect("unix:" .. path, { timeout = 2 }) })
            assert.equal(i - 1, s:getreusedtimes())
            s:send("n" .. i .. "\n")
            assert.equal("echo: n" .. i, s:receive("*l"))
            assert.truthy(s:setkeepalive(10))
        end
        assert.equal(1, accepted)
        require("moonlet.tcp_pool").close_idle()
    end)

    it("moonlet.ngx's sockets connect to unix: paths, the options second", function()
        local _, path = listen("ngx.sock")
        local mngx = require "moonlet.ngx"
        mngx.install()
        local s = ngx.socket.tcp()
        s:settimeout(2000)
        assert.same({ 1 }, { s:connect("unix:" .. path, { pool = "unix-spec" }) })
        assert.truthy(s:send("via ngx\n"))
        assert.equal("echo: via ngx", (s:receive("*l")))
        assert.truthy(s:setkeepalive(1000, 5))
        local s2 = ngx.socket.tcp()
        assert.same({ 1 }, { s2:connect("unix:" .. path, { pool = "unix-spec" }) })
        assert.equal(1, s2:getreusedtimes())
        s2:close()
        local s3 = ngx.socket.tcp() -- a port beside unix: is ignored, as OpenResty does
        assert.same({ 1 }, { s3:connect("unix:" .. path, 6379, { pool = "unix-spec-2" }) })
        s3:close()
        mngx.close_idle()
    end)

    it("runs TLS over a Unix socket", function()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local _, path = listen("tls.sock", line_echo, { tls = { cert = certs.cert, key = certs.key } })
        local sock = assert(tcp.connect("unix:" .. path, {
            timeout = 5, tls = { server_name = "localhost", cafile = certs.ca } }))
        sock:send("secret\n")
        assert.equal("echo: secret", sock:receive("*l"))
        sock:close()
        -- no server_name: the chain is checked, no host name (a Unix socket names none)
        sock = assert(tcp.connect("unix:" .. path, { timeout = 5, tls = { cafile = certs.ca } }))
        sock:send("no name\n")
        assert.equal("echo: no name", sock:receive("*l"))
        sock:close()
        local bad, err = tcp.connect("unix:" .. path, {
            timeout = 5, tls = { server_name = "localhost", cafile = certs.other_ca } })
        assert.is_nil(bad)
        assert.equal("tls: certificate verify failed", err)
    end)

    it("serves HTTP on app:listen{ unix = }; moonlet.http reaches it with unix =", function()
        local app = moonlet.app()
        app:use(moonlet.forwarded())
        app:get("/who", function(req)
            return { ip = req.ip, host = req.host, scheme = req.scheme }
        end)
        app:post("/echo", function(req) return req:body() end)
        local big = string.rep("0123456789abcdef", 200000) -- 3.2 MB: the sendfile path
        local f = assert(io.open(dir .. "/big.bin", "wb"))
        f:write(big)
        f:close()
        app:static("/files", dir)
        local path = dir .. "/http.sock"
        local server, port = app:listen({ unix = path })
        assert.truthy(server)
        defer(function() server:close() end)
        assert.equal(0, port)
        local res = assert(moonlet.http.get("http://app.test/who", { unix = path }))
        assert.equal(200, res.status)
        assert.same({ ip = "unix:", host = "app.test", scheme = "http" }, moonlet.json.decode(res.body))
        -- moonlet.forwarded trusts a Unix socket's peer (a proxy on this machine) by default
        local fwd = { ["X-Forwarded-For"] = "203.0.113.9", ["X-Forwarded-Proto"] = "https" }
        res = assert(moonlet.http.get("http://app.test/who", { unix = path, headers = fwd }))
        assert.same({ ip = "203.0.113.9", host = "app.test", scheme = "https" },
                    moonlet.json.decode(res.body))
        res = assert(moonlet.http.get("http://app.test/files/big.bin", { unix = path, max_body = 1e7 }))
        assert.equal(200, res.status)
        assert.equal(#big, #res.body)
        assert.is_true(res.body == big)
        res = assert(moonlet.http.get("http://app.test/files/big.bin", {
            unix = path, headers = { Range = "bytes=16-31" } }))
        assert.same({ 206, "0123456789abcdef" }, { res.status, res.body })
        local body = string.rep("b", 300000)
        res = assert(moonlet.http.post("http://app.test/echo", body, { unix = path, max_body = 1e6 }))
        assert.equal(body, res.body)
        -- many at once over one pool: every answer right
        local fns = {}
        for i = 1, 20 do
            fns[i] = function()
                return assert(moonlet.http.post("http://app.test/echo", "n" .. i, { unix = path })).body
            end
        end
        local results = moonlet.gather(fns)
        for i = 1, 20 do assert.equal("n" .. i, results[i]) end
        assert.same({ nil, "not found" },
                    { moonlet.http.get("http://app.test/", { unix = path .. ".none" }) })
        assert.has_error(function() moonlet.http.get("http://app.test/", { unix = 5 }) end,
                         "moonlet.http: unix must be a socket path")
        server:close()
        assert.truthy(test.wait_until(function() return not exists(path) end, 5))
    end)

    it("carries WebSockets: app:websocket on a Unix socket, moonlet.ws.connect with unix =", function()
        local app = moonlet.app()
        app:websocket("/echo", function(ws, req)
            ws:send("hello " .. req.ip .. " at " .. req.host)
            while true do
                local msg, kind = ws:receive()
                if not msg then return end
                ws:send(msg, kind)
            end
        end)
        local path = dir .. "/ws.sock"
        local server = assert(app:listen({ unix = path }))
        defer(function() server:close() end)
        local ws = assert(moonlet.ws.connect("ws://chat.test/echo", { unix = path, timeout = 5 }))
        defer(function() ws:close() end)
        assert.equal("hello unix: at chat.test", (ws:receive(5)))
        local big = string.rep("w", 200000)
        assert.truthy(ws:send(big, "binary"))
        assert.same({ big, "binary" }, { ws:receive(5) })
        ws:close()
        assert.same({ nil, "not found" },
                    { moonlet.ws.connect("ws://chat.test/echo", { unix = path .. ".none", timeout = 2 }) })
        assert.has_error(function() moonlet.ws.connect("ws://chat.test/", { unix = 7 }) end,
                         "moonlet.ws: option unix is a socket path")
    end)

    it("moonlet --unix PATH serves there, logs unix: as the peer, removes the file at exit", function()
        local path = dir .. "/cli.sock"
        local p = test.start_process(("examples/hello.lua --unix %s --access-log"):format(path))
        defer(function() p:kill() end)
        assert.truthy(test.wait_until(function()
            return p:output():find("serving examples/hello.lua on unix:" .. path .. " (http)", 1, true)
        end), p:output())
        local res = assert(moonlet.http.get("http://x/users/42?q=unix", { unix = path }))
        assert.equal(200, res.status)
        assert.same({ id = "42", q = "unix" }, moonlet.json.decode(res.body))
        assert.truthy(test.wait_until(function()
            return p:output():find('unix: "GET /users/42?q=unix HTTP/1.1" 200', 1, true)
        end), p:output())
        -- a second server on the same path refuses to start, and the first goes on
        local q = test.start_process(("examples/hello.lua --unix %s"):format(path))
        defer(function() q:kill() end)
        assert.equal(1, q:wait(10))
        assert.matches("listen on unix:" .. path:gsub("%p", "%%%0") .. ": address in use", q:output())
        assert.equal(200, assert(moonlet.http.get("http://x/", { unix = path })).status)
        p:signal("TERM")
        assert.equal(0, p:wait(10))
        assert.is_false(exists(path))
    end)

    it("servers started at one instant on a stale socket file: one serves, the others: in use", function()
        -- Each process's app waits at its top level on a FIFO (opened read-write, so the open never
        -- waits), then returns and the CLI listens: one write of N bytes wakes them all at once, so
        -- their stale checks and binds overlap. The rule: exactly one serves, and the file is its
        -- own (it answers with its id); every other one exits 1 with "address in use".
        local path, fifo, script = dir .. "/race.sock", dir .. "/race.fifo", dir .. "/race.lua"
        assert.equal(0, os.execute("mkfifo " .. fifo))
        defer(function() os.remove(fifo) end)
        test.write_file(script, ([[
local moonlet = require "moonlet"
local f = assert(io.open(%q, "r+"))
f:setvbuf("no")
io.stderr:write("ready\n")
f:read(1)
f:close()
local app = moonlet.app()
local id = os.getenv("RACE_ID")
app:get("/", function() return id end)
return app
]]):format(fifo))
        local N, ROUNDS = 8, 10
        for round = 1, ROUNDS do
            local py = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ([[
import socket
socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).bind(%q)
]]):format(path) })) -- bound and gone: a stale file, its connects refused
            assert.same(0, py:wait())
            assert.same({ nil, "connection refused" }, { tcp.connect("unix:" .. path, { timeout = 1 }) })
            local procs = {}
            for i = 1, N do
                local p = test.start_process(("%s --unix %s"):format(script, path), "RACE_ID=" .. i)
                defer(function() p:kill() end)
                procs[i] = p
            end
            for i = 1, N do
                assert.truthy(test.wait_until(function()
                    return procs[i]:output():find("ready", 1, true)
                end, 10), procs[i]:output())
            end
            local go = assert(io.open(fifo, "w"))
            go:write(string.rep("x", N)) -- one write: every process wakes at once
            go:close()
            local serving, refused = {}, 0
            for i = 1, N do
                local p = procs[i]
                assert.truthy(test.wait_until(function()
                    return p:output():find("serving", 1, true) or p:wait(0)
                end, 10), p:output())
                if p:output():find("serving", 1, true) then
                    serving[#serving + 1] = i
                else
                    assert.equal(1, p:wait(0))
                    assert.matches("listen on unix:" .. path:gsub("%p", "%%%0") .. ": address in use",
                                   p:output())
                    refused = refused + 1
                end
            end
            assert.same({ 1, N - 1 }, { #serving, refused }, "round " .. round)
            local res = assert(moonlet.http.get("http://x/", { unix = path, keepalive = false }))
            assert.same({ 200, tostring(serving[1]) }, { res.status, res.body })
            procs[serving[1]]:signal("TERM")
            assert.equal(0, procs[serving[1]]:wait(10))
            assert.is_false(exists(path))
            for i = 1, N do procs[i]:kill() end
        end
    end)

    it("moonlet --host unix:PATH is the same", function()
        local path = dir .. "/host.sock"
        local p = test.start_process(("examples/hello.lua --host unix:%s"):format(path))
        defer(function() p:kill() end)
        assert.truthy(test.wait_until(function() return exists(path) end), p:output())
        assert.truthy(test.wait_until(function()
            local res = moonlet.http.get("http://x/", { unix = path })
            return res and res.body == "Hello, World!"
        end), p:output())
        p:signal("TERM")
        assert.equal(0, p:wait(10))
        assert.is_false(exists(path))
    end)

    it("--unix PATH --workers 2: both workers accept on the one socket, a killed one comes back", function()
        local path = dir .. "/workers.sock"
        local p = test.start_process(("examples/workers.lua --unix %s --workers 2"):format(path))
        defer(function() p:kill() end)
        -- new connections until both workers answered: worker id -> pid
        local function pids()
            local seen, n = {}, 0
            test.wait_until(function()
                local res = moonlet.http.get("http://x/", { unix = path, keepalive = false })
                local id, pid
                if res then id, pid = res.body:match("^worker (%d) of 2 %(pid (%d+)%)") end
                if id and not seen[id] then
                    seen[id], n = pid, n + 1
                end
                return n == 2
            end, 10)
            return seen, n
        end
        local seen, n = pids()
        assert.equal(2, n, p:output())
        local res = assert(moonlet.http.get("http://x/", { unix = path, keepalive = false }))
        local all = tonumber(res.body:match("(%d+) of all"))
        assert.truthy(all and all >= 3) -- one count in shared memory across both
        os.execute("kill -9 " .. seen["0"]) -- the supervisor starts it again, on the same socket
        assert.truthy(test.wait_until(function()
            local again = pids()
            return again["0"] and again["0"] ~= seen["0"] and again["1"] == seen["1"]
        end, 15), p:output())
        assert.is_true(exists(path))
        p:signal("TERM")
        assert.equal(0, p:wait(15))
        assert.is_false(exists(path)) -- the supervisor removed it once the workers were gone
        -- a stop removes the file at once: new clients fail fast while requests in flight finish
        local script = dir .. "/slow.lua"
        local f = assert(io.open(script, "w"))
        f:write([[
local moonlet = require "moonlet"
local app = moonlet.app()
app:get("/slow", function() moonlet.sleep(1); return "slow done" end)
app:get("/fds", function() -- what a child process inherits: no listening socket of ours
    local p = assert(moonlet.process.spawn({ "sh", "-c", "ls -l /proc/$$/fd" }))
    local out = p:read("*a")
    p:wait()
    return out
end)
return app
]])
        f:close()
        local w = test.start_process(("%s --unix %s --workers 2"):format(script, path))
        defer(function() w:kill() end)
        assert.truthy(test.wait_until(function()
            return moonlet.http.get("http://x/fds", { unix = path })
        end))
        local fds = assert(moonlet.http.get("http://x/fds", { unix = path })).body
        for fd, what in fds:gmatch(" (%d+) %-> (%S+)") do -- stdin, stdout, stderr are socketpairs
            if tonumber(fd) > 2 then assert.is_nil(what:find("socket:", 1, true), fds) end
        end
        local slow = moonlet.spawn(function()
            return moonlet.http.get("http://x/slow", { unix = path, keepalive = false })
        end)
        moonlet.sleep(0.2)
        w:signal("TERM")
        assert.truthy(test.wait_until(function() return not exists(path) end, 0.5), w:output())
        local ok, slow_res = slow:join()
        assert.is_true(ok)
        assert.same({ 200, "slow done" }, { slow_res.status, slow_res.body })
        assert.equal(0, w:wait(10))
        -- a live server's path refuses the workers too
        local _, live = listen("taken.sock")
        local q = test.start_process(("examples/workers.lua --unix %s --workers 2"):format(live))
        defer(function() q:kill() end)
        assert.equal(1, q:wait(10))
        assert.matches("address in use", q:output())
    end)

    it("serves behind nginx's proxy_pass http://unix:PATH: with the client's address forwarded", function()
        if os.execute("command -v nginx >/dev/null 2>&1") ~= 0 then
            pending("nginx not installed")
            return
        end
        local app = moonlet.app()
        app:use(moonlet.forwarded())
        app:get("/who", function(req) return { ip = req.ip, host = req.host } end)
        local path = dir .. "/behind.sock"
        local server = assert(app:listen({ unix = path }))
        defer(function() server:close() end)
        local probe = assert(tcp.listen({ port = 0 }, function() end)) -- a free port for nginx
        local port = probe:port()
        probe:close()
        local ngx_dir = dir .. "/nginx"
        assert(moonlet.fs.mkdir(ngx_dir))
        local conf = ngx_dir .. "/nginx.conf"
        local f = assert(io.open(conf, "w"))
        f:write(([[
user root;
daemon off;
worker_processes 1;
pid %s/nginx.pid;
error_log %s/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s;
    uwsgi_temp_path %s; scgi_temp_path %s;
    server {
        listen 127.0.0.1:%d;
        location / {
            proxy_pass http://unix:%s:;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }
    }
}
]]):format(ngx_dir, ngx_dir, ngx_dir, ngx_dir, ngx_dir, ngx_dir, ngx_dir, port, path))
        f:close()
        local proc = moonlet.process.spawn({ "nginx", "-p", ngx_dir, "-c", conf })
        defer(function()
            proc:kill()
            proc:wait()
        end)
        local res
        assert.truthy(test.wait_until(function()
            res = moonlet.http.get(("http://127.0.0.1:%d/who"):format(port),
                                   { headers = { ["X-Forwarded-For"] = "198.51.100.7" } })
            return res and res.status == 200
        end, 10), "nginx did not answer")
        -- nginx appended its peer (127.0.0.1, trusted) and came over the socket (unix:, trusted)
        assert.same({ ip = "198.51.100.7", host = "127.0.0.1" }, moonlet.json.decode(res.body))
    end)

    describe("datagrams (moonlet.udp)", function()
        local udp = moonlet.udp

        local function dgram(name)
            local path = dir .. "/" .. name
            local u = assert(udp.bind("unix:" .. path))
            defer(function() u:close() end)
            return u, path
        end

        -- answers each datagram to its sender, "re:" before it, until "stop"
        local function echo(u)
            return moonlet.spawn(function()
                while true do
                    local data, from = u:recvfrom(5)
                    if not data or data == "stop" then return end
                    if from ~= "unix:" then assert(u:sendto("re:" .. data, from)) end
                end
            end)
        end

        it("bind, sendto and recvfrom; an abstract name for a client; the file goes at close", function()
            local server, path = dgram("echo.dgram")
            assert.equal("unix:" .. path, server:getsockname())
            local t = echo(server)
            local client = assert(udp.bind("unix:"))
            defer(function() client:close() end)
            local name = client:getsockname()
            assert.truthy(name:match("^unix:@%w+$"), name)
            assert.same({ true }, { client:sendto("hello", "unix:" .. path) })
            assert.same({ "re:hello", "unix:" .. path }, { client:recvfrom(5) })
            local big = string.rep("x", 60000) -- one datagram
            assert(client:sendto(big, "unix:" .. path))
            assert.equal("re:" .. big, (client:recvfrom(5)))
            -- connected: send and receive (the OpenResty object, and the raw socket)
            local o = udp.socket()
            assert.is_true(o:setpeername("unix:" .. path))
            o:settimeout(5)
            assert(o:send("peer"))
            assert.equal("re:peer", o:receive())
            o:close()
            assert(client:setpeername("unix:" .. path))
            assert(client:send("raw"))
            assert.equal("re:raw", client:receive(5))
            assert(client:sendto("stop", "unix:" .. path))
            assert.is_true(t:join(5))
            server:close()
            assert.is_false(exists(path))
            assert.same({ nil, "not found" }, { client:sendto("late", "unix:" .. path) })
        end)

        it("speaks to syslog-style servers through moonlet.ngx's ngx.socket.udp", function()
            require("moonlet.ngx").install()
            local server, path = dgram("ngx.dgram")
            local t = echo(server)
            local u = ngx.socket.udp()
            assert.equal(1, u:setpeername("unix:" .. path))
            u:settimeout(5000)
            assert.equal(1, u:send({ "<14>", "app: ", "started" }))
            assert.equal("re:<14>app: started", u:receive())
            assert.equal(1, u:close())
            server:sendto("stop", "unix:" .. path)
            t:join(5)
        end)

        it("names a sender without a name unix: and cannot answer it; a full receiver is an error", function()
            local server, path = dgram("anon.dgram")
            local p = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ([[
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"from python", %q)
]]):format(path) }))
            assert.same({ "from python", "unix:" }, { server:recvfrom(5) })
            assert.same(0, p:wait())
            assert.same({ nil, "invalid argument" }, { server:sendto("x", "unix:") })
            -- nobody reads: the receiver's queue fills, and a send says so at once (never waits)
            local client = assert(udp.bind("unix:"))
            defer(function() client:close() end)
            local ok, err, sent = true, nil, 0
            while ok and sent < 100000 do
                ok, err = client:sendto("fill", "unix:" .. path)
                if ok then sent = sent + 1 end
            end
            assert.equal("resource temporarily unavailable", err)
            assert.truthy(sent > 0)
            assert.equal("fill", (server:recvfrom(1))) -- and what was queued is there
        end)

        it("keeps a live socket's file, replaces a stale one, removes only its own", function()
            local _, live = dgram("live.dgram")
            assert.same({ nil, "address in use" }, { udp.bind("unix:" .. live) })
            local stream = listen("stream.sock") -- a stream socket's file is not a datagram's
            assert.same({ nil, "address in use" }, { udp.bind("unix:" .. stream:port():sub(6)) })
            local plain = dir .. "/plain.dgram"
            test.write_file(plain, "keep me")
            assert.same({ nil, "file already exists" }, { udp.bind("unix:" .. plain) })
            assert.equal("keep me", test.read_file(plain))
            -- a process that exits without closing leaves its file: nobody holds it any more
            local stale = dir .. "/stale.dgram"
            local p = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ([[
import socket
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(%q)
]]):format(stale) }))
            assert.same(0, p:wait())
            assert.is_true(exists(stale))
            local u = dgram("stale.dgram")
            local c = assert(udp.bind("unix:"))
            defer(function() c:close() end)
            assert(c:sendto("new", "unix:" .. stale))
            assert.equal("new", (u:recvfrom(5)))
            -- an operator's rm, then a new socket at the path: the old one's close leaves it be
            os.remove(stale)
            local newer = dgram("stale.dgram")
            u:close()
            assert.is_true(exists(stale))
            newer:close()
            assert.is_false(exists(stale))
        end)

        it("an IP socket cannot send to unix:; misuse raises; a cancelled wait leaves nothing", function()
            local ip = assert(udp.bind("127.0.0.1", 0))
            defer(function() ip:close() end)
            assert.same({ nil, "address family not supported" }, { ip:sendto("x", "unix:" .. dir .. "/x") })
            local u = assert(udp.bind("unix:"))
            defer(function() u:close() end)
            assert.same({ nil, "address family not supported" }, { u:setpeername("127.0.0.1", 9) })
            assert.same({ nil, "name too long" }, { udp.bind("unix:/" .. string.rep("n", 200)) })
            assert.has_error(function() udp.bind("unix:/a\0b") end, "moonlet.udp.bind: a path without NUL")
            local before = core.stats()
            local mem0 = collectgarbage("count")
            local server = dgram("cancel.dgram")
            for _ = 1, 200 do
                assert.same({ nil, "timeout" }, { moonlet.timeout(0.001, server.recvfrom, server) })
            end
            server:close()
            nothing_left(before, mem0)
        end)
    end)

    it("leaves nothing behind: 300 connections, refused connects, a listener closed", function()
        local before = core.stats()
        local mem0 = collectgarbage("count")
        local server, path = listen("leak.sock")
        for i = 1, 300 do
            local sock = assert(tcp.connect("unix:" .. path))
            sock:send(i .. "\n")
            assert.equal("echo: " .. i, sock:receive("*l"))
            sock:close()
            assert.is_nil(tcp.connect("unix:" .. path .. ".none"))
        end
        server:close()
        nothing_left(before, mem0)
    end)
end)
