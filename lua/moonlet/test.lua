-- lua/moonlet/test.lua: helpers for specs run by `moonlet test`: serve an app on a free port in
-- this process, talk to it over real sockets (raw bytes or parsed HTTP/1.1 responses), wait for a
-- condition with a deadline, and run the `moonlet` binary as a separate process.
local core = require "moonlet.core"
local task = require "moonlet.task"

local str_lower, tonumber = string.lower, tonumber
local concat = table.concat

local _M = {}

-- syntax: test.defer(fn) -- runs fn when the current `it` ends, pass or fail; every deferred
-- function runs, the last deferred first, and the first error among them is raised after all ran.
-- Use it instead of busted's finally(), which keeps only the last function given to it in an `it`.
local deferred
function _M.defer(fn, level) -- (level: of the spec's function, for a helper that defers for it)
    if not deferred then
        deferred = {}
        local list = deferred
        getfenv((level or 1) + 1).finally(function() -- busted's finally: in the spec's environment
            deferred = nil
            local first_err
            for i = #list, 1, -1 do
                local ok, err = pcall(list[i])
                if not ok and not first_err then first_err = err end
            end
            if first_err then error(first_err, 0) end
        end)
    end
    deferred[#deferred + 1] = fn
end

-- syntax: test.assert_baseline(before, mem0, max_kib) -- the leak check of a spec: open handles,
-- resources and live tasks (core.stats()) are back to `before` or below, and Lua memory grew less
-- than max_kib KiB since mem0 (collectgarbage("count")) when both are given. Below, not only equal:
-- the counts are the whole process's, and what an earlier spec left to close on its own time (a
-- peer's WebSocket that its browser closes when it exits, a connection past its linger time) may
-- go meanwhile; what this spec leaks can only add to them.
function _M.assert_baseline(before, mem0, max_kib)
    local luassert = require "luassert"
    local after = core.stats()
    for _, k in ipairs({ "handles", "resources", "tasks" }) do
        luassert.truthy(after[k] <= before[k],
                        ("%s: %d after, %d before (a leak adds to them)"):format(k, after[k], before[k]))
    end
    if mem0 and max_kib then luassert.truthy(collectgarbage("count") - mem0 < max_kib) end
end

-- syntax: server, port = test.serve(app, opts) -- on 127.0.0.1, a free port
function _M.serve(app, opts)
    opts = opts or {}
    opts.host = opts.host or "127.0.0.1"
    opts.port = 0
    local server, port = app:listen(opts)
    assert(server, port)
    return server, port
end

-- syntax: port = test.serving(app, opts) -- test.serve, and the server closes when the `it` ends
function _M.serving(app, opts)
    local server, port = _M.serve(app, opts)
    _M.defer(function() server:close() end, 2)
    return port
end

-- syntax: dir = test.make_dir() -- a new empty directory (os.tmpname's); test.remove_dir(dir)
function _M.make_dir()
    local dir = os.tmpname()
    os.remove(dir)
    assert(require("moonlet.fs").mkdir(dir))
    return dir
end

function _M.remove_dir(dir)
    if dir then os.execute("rm -rf '" .. dir:gsub("'", "'\\''") .. "'") end
end

-- syntax: test.write_file(path, data) -- raises when it cannot
function _M.write_file(path, data)
    local f = assert(io.open(path, "wb"))
    assert(f:write(data))
    assert(f:close())
end

-- syntax: data = test.read_file(path) -- the whole file, or nil when there is none
function _M.read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local data = f:read("*a")
    f:close()
    return data
end

-- syntax: dir, path = test.app_dir(src) -- a new directory holding app.lua with src (its path);
-- test.remove_dir(dir) when done
function _M.app_dir(src)
    local dir = _M.make_dir()
    local path = dir .. "/app.lua"
    _M.write_file(path, src)
    return dir, path
end

-- syntax: sock = test.connect(port, timeout) -- raises when the connection fails
function _M.connect(port, timeout)
    local sock, err = core.tcp_connect("127.0.0.1", port, timeout or 5)
    assert(sock, err)
    sock:settimeout(timeout or 5)
    return sock
end

-- syntax: resp, err = test.read_response(sock, method) -- one response:
-- { status, reason, version, headers (lower-case names; repeats joined by ", "), body, chunked }
function _M.read_response(sock, method)
    local line, err = sock:receive("*l")
    if not line then return nil, err end
    local version, status, reason = line:match("^HTTP/(%d%.%d) (%d%d%d) ?(.*)$")
    if not version then return nil, "bad status line: " .. line end
    local resp = { status = tonumber(status), reason = reason, version = version, headers = {} }
    while true do
        local h
        h, err = sock:receive("*l")
        if not h then return nil, err end
        if h == "" then break end
        local name, value = h:match("^([^:]+):%s*(.-)%s*$")
        if not name then return nil, "bad header line: " .. h end
        name = str_lower(name)
        local old = resp.headers[name]
        resp.headers[name] = old and (old .. ", " .. value) or value
    end
    if resp.status < 200 then return resp end -- 1xx: the caller reads the final response next
    local hs = resp.headers
    if method == "HEAD" or resp.status == 204 or resp.status == 304 then
        resp.body = ""
    elseif hs["transfer-encoding"] == "chunked" then
        resp.chunked = true
        local parts = {}
        while true do
            local size_line
            size_line, err = sock:receive("*l")
            if not size_line then return nil, err end
            local size = tonumber(size_line:match("^(%x+)"), 16)
            if not size then return nil, "bad chunk size: " .. size_line end
            if size == 0 then
                sock:receive("*l")
                break
            end
            local data
            data, err = sock:receive(size)
            if not data then return nil, err end
            parts[#parts + 1] = data
            sock:receive("*l")
        end
        resp.body = concat(parts)
        resp.chunks = parts
    elseif hs["content-length"] then
        local n = tonumber(hs["content-length"])
        if n > 0 then
            resp.body, err = sock:receive(n)
            if not resp.body then return nil, err end
        else
            resp.body = ""
        end
    else
        resp.body, err = sock:receive("*a")
        if not resp.body then return nil, err end
    end
    return resp
end

-- syntax: text = test.format_request(method, path, { headers = {...}, body = "..." })
function _M.format_request(method, path, opts)
    opts = opts or {}
    local lines = { method .. " " .. path .. " HTTP/1.1" }
    local headers = opts.headers or {}
    local has_host = false
    for k, v in pairs(headers) do
        if str_lower(k) == "host" then has_host = true end
        lines[#lines + 1] = k .. ": " .. v
    end
    if not has_host then lines[#lines + 1] = "Host: 127.0.0.1" end
    if opts.body and not headers["Content-Length"] and not headers["Transfer-Encoding"] then
        lines[#lines + 1] = "Content-Length: " .. #opts.body
    end
    return concat(lines, "\r\n") .. "\r\n\r\n" .. (opts.body or "")
end

-- syntax: resp = test.request(port, method, path, opts) -- one request on a new connection
function _M.request(port, method, path, opts)
    local sock = _M.connect(port, opts and opts.timeout)
    assert(sock:send(_M.format_request(method, path, opts)))
    local resp, err = _M.read_response(sock, method)
    sock:close()
    assert(resp, err)
    return resp
end

-- syntax: data, err = test.raw(port, bytes, timeout) -- sends bytes, returns all that comes back
-- until the server closes (or nil, "timeout", partial)
function _M.raw(port, bytes, timeout)
    local sock = _M.connect(port, timeout or 5)
    assert(sock:send(bytes))
    local data, err, partial = sock:receive("*a")
    sock:close()
    return data, err, partial
end

-- syntax: stats = test.settled_stats() -- core.stats() once the handles, resources and tasks left
-- by earlier specs (connections still closing) have stopped changing for 30 ms (at most 2 s): the
-- `before` of assert_baseline
function _M.settled_stats()
    local last, same = core.stats(), 0
    local deadline = core.now() + 2
    while same < 3 and core.now() < deadline do
        task.sleep(0.01)
        local now = core.stats()
        if now.handles == last.handles and now.resources == last.resources
           and now.tasks == last.tasks then
            same = same + 1
        else
            same = 0
        end
        last = now
    end
    return last
end

-- syntax: ok = test.wait_until(fn, timeout) -- polls fn every 10 ms until it is truthy or time is up
function _M.wait_until(fn, timeout)
    local deadline = core.now() + (timeout or 5)
    while core.now() < deadline do
        local v = fn()
        if v then return v end
        task.sleep(0.01)
    end
    return fn()
end

-- syntax: bin = test.binary() -- the moonlet binary under test (env MOONLET_BIN)
function _M.binary()
    return os.getenv("MOONLET_BIN") or "build/moonlet"
end

-- syntax: p = test.half_closing_client(port, bytes, wait) -- a client process (Debian's python3)
-- that connects, sends bytes, shuts its sending side (FIN) -- after a byte on its stdin when wait
-- is true (p:write("x")) -- and reads until the server closes; p:read("*a") is what it read.
function _M.half_closing_client(port, bytes, wait)
    local hex = bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
    return assert(require("moonlet.process").spawn({ "/usr/bin/python3", "-c", ([[
import socket, sys
s = socket.create_connection(("127.0.0.1", %d))
s.sendall(bytes.fromhex("%s"))
if %s:
    sys.stdin.read(1)
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
sys.stdout.buffer.write(data)
]]):format(port, hex, wait and "True" or "False") }))
end

-- syntax: sizes = test.socket_buffer_sizes() -- byte counts across a Unix domain socket's send
-- buffer (net.core.wmem_default: 212992 on Linux; the buffer holds what the peer has not read):
-- from 0.6 to 1.5 times it in 48ths of it, so that some answers fit in it, some fill it to the
-- brim and the rest do not fit
function _M.socket_buffer_sizes()
    local f = io.open("/proc/sys/net/core/wmem_default")
    local wmem = f and tonumber(f:read("*l")) or 212992
    if f then f:close() end
    local sizes = {}
    for n = math.floor(wmem * 0.6), math.floor(wmem * 1.5), math.floor(wmem / 48) do
        sizes[#sizes + 1] = n
    end
    return sizes
end

-- syntax: p = test.late_tls_reader(path, cafile, mode, sizes) -- spec/support/late_tls_reader.py:
-- one TLS connection per size to the Unix socket at path, each asking for that many bytes (mode
-- "http", "http-close" or "line"); it reads none until p:write("go\n") (except "http-close"),
-- then each to its end. p:read("*l") is "sent" once every request is out.
-- syntax: ends, whole, cut = test.tls_ends(p) -- then its verdicts, { { size, "whole"|"cut",
-- "close_notify"|"eof" }, ... }, once it has exited 0, and how many were whole and cut; raises
-- unless every whole one ended with a close_notify and every cut one without (a cut one must not
-- look whole)
function _M.late_tls_reader(path, cafile, mode, sizes)
    return assert(require("moonlet.process").spawn({ "/usr/bin/python3", "spec/support/late_tls_reader.py",
                                                     path, cafile, mode, table.concat(sizes, ",") }))
end

function _M.tls_ends(p)
    local out = p:read("*a")
    assert(p:wait() == 0, out)
    local ends = {}
    local whole, cut = 0, 0
    for n, verdict, e in out:gmatch("(%d+) (%a+) ([%a_]+)\n") do
        ends[#ends + 1] = { tonumber(n), verdict, e }
        local want = verdict == "whole" and "close_notify" or "eof"
        assert(e == want, ("%s bytes %s, ended with %s, not %s"):format(n, verdict, e, want))
        if verdict == "whole" then whole = whole + 1 else cut = cut + 1 end
    end
    return ends, whole, cut
end

local proc_mt = { __index = {} }

-- syntax: p = test.start_process(args_string, env) -- runs `moonlet args` in the background, with
-- env ("NAME=value ...", optional) set for it; p.log is its stderr+stdout file; p:port() waits for
-- its "serving ... on http://host:port" line
function _M.start_process(args, env)
    local dir = os.tmpname()
    os.remove(dir)
    local log, codefile = dir .. ".log", dir .. ".code"
    local cmd = ("(%s%s %s >%s 2>&1; echo $? >%s) & echo $!"):format(env and "env " .. env .. " " or "",
                                                                     _M.binary(), args, log, codefile)
    local f = io.popen(cmd)
    local shell_pid = tonumber(f:read("*l"))
    f:close()
    return setmetatable({ log = log, codefile = codefile, shell_pid = shell_pid }, proc_mt)
end

function proc_mt.__index:output()
    local f = io.open(self.log)
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

function proc_mt.__index:port(timeout)
    local port = _M.wait_until(function()
        return tonumber(self:output():match("on http://[^:]+:(%d+)"))
    end, timeout or 10)
    assert(port, "the server did not start: " .. self:output())
    return port
end

-- the moonlet process itself: the child of the subshell
function proc_mt.__index:pid()
    local f = io.popen("pgrep -P " .. self.shell_pid)
    local pid = tonumber(f:read("*l"))
    f:close()
    return pid
end

function proc_mt.__index:signal(sig)
    local pid = self:pid()
    if pid then os.execute("kill -" .. sig .. " " .. pid) end
    return pid ~= nil
end

-- syntax: code = p:wait(timeout) -- the exit code, or nil if still running at the deadline
function proc_mt.__index:wait(timeout)
    return _M.wait_until(function()
        local f = io.open(self.codefile)
        if not f then return nil end
        local code = tonumber(f:read("*l"))
        f:close()
        return code
    end, timeout or 10)
end

local function sh(cmd)
    local ok = os.execute(cmd .. " >/dev/null 2>&1")
    assert(ok == true or ok == 0, "failed: " .. cmd)
end

-- syntax: c = test.make_certs() -- a temporary CA and a server certificate for localhost and
-- 127.0.0.1 signed by it, made with the `openssl` command, plus a second, unrelated CA, and a
-- client certificate (O=moonlet spec, CN=alice) from each: { dir, ca, cert, key, other_ca,
-- client_cert, client_key, other_client_cert, other_client_key } (paths); remove them with
-- test.remove_certs(c)
function _M.make_certs()
    local dir = _M.make_dir()
    local ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    sh(("cd %s && openssl req -x509 %s -keyout ca.key -out ca.pem -days 2 -subj '/CN=moonlet spec CA'")
        :format(dir, ec))
    sh(("cd %s && openssl req %s -keyout server.key -out server.csr -subj '/CN=localhost'"
        .. " -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1'"):format(dir, ec))
    sh(("cd %s && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
        .. " -out server.pem -days 2 -copy_extensions copy"):format(dir))
    sh(("cd %s && openssl req -x509 %s -keyout other.key -out other.pem -days 2 -subj '/CN=other CA'")
        :format(dir, ec))
    -- client certificates (mutual TLS): one from the CA, one from the other CA
    for _, c in ipairs({ { "client", "ca" }, { "other_client", "other" } }) do
        sh(("cd %s && openssl req %s -keyout %s.key -out %s.csr -subj '/O=moonlet spec/CN=alice'")
            :format(dir, ec, c[1], c[1]))
        sh(("cd %s && openssl x509 -req -in %s.csr -CA %s.pem -CAkey %s.key -CAcreateserial -out %s.pem"
            .. " -days 2"):format(dir, c[1], c[2], c[2], c[1]))
    end
    return { dir = dir, ca = dir .. "/ca.pem", cert = dir .. "/server.pem",
             key = dir .. "/server.key", other_ca = dir .. "/other.pem",
             client_cert = dir .. "/client.pem", client_key = dir .. "/client.key",
             other_client_cert = dir .. "/other_client.pem", other_client_key = dir .. "/other_client.key" }
end

function _M.remove_certs(c)
    if c then _M.remove_dir(c.dir) end
end

-- syntax: code, output = test.run_script(src, timeout) -- runs `moonlet` on a script with that
-- source as a separate process; the exit code (nil if still running at the deadline: then it is
-- killed) and everything it printed. Leaves no file behind.
function _M.run_script(src, timeout)
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write(src)
    f:close()
    local p = _M.start_process(script)
    local code = p:wait(timeout or 10)
    local out = p:output()
    p:kill()
    os.remove(script)
    return code, out
end

-- syntax: p:kill() -- SIGKILL unless it ended already, then its files are removed; it waits for
-- the subshell to record the exit code first, else that late write would leave the file behind.
-- Once only: a second kill returns at once (it would wait 10 s for a code file removed).
function proc_mt.__index:kill()
    if self.killed then return end
    self.killed = true
    self:signal("KILL")
    self:wait()
    os.remove(self.log)
    os.remove(self.codefile)
end

return _M
