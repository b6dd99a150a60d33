-- spec/access_log_spec.lua: the `moonlet` command's logs in files, as an nginx user keeps them:
-- --access-log=FILE (and --access-log-file FILE), its formats (moonlet, combined, json) and how they
-- escape what a client sends, a burst of pipelined requests larger than the output's buffer (every
-- line, in order), SIGUSR1 reopening the files after logrotate moved them, --error-log (a handler's
-- traceback goes there), --workers N sharing one file (every line whole, every worker reopening on
-- the supervisor's SIGUSR1), --pid-file (the id a logrotate postrotate signals), and the bad paths
-- and formats refused with a message. The servers are real processes (test.start_process); each
-- `it` kills what it started.
local test = require "moonlet.test"
local json = require "moonlet.json"
local moonlet = require "moonlet"

local APP = [[
local moonlet = require "moonlet"
local app = moonlet.app()
app:get("/", function() return "hello from the app" end)
app:get("/boom", function() error("kaboom") end)
app:get("/later", function() moonlet.sleep(0.05); return "later" end)
app:get("/exit", function() os.exit(0) end)
app:get("/hang", function() moonlet.sleep(30); return "too late" end)
return app
]]
local BODY_LEN = #"hello from the app"

local defer = test.defer

local read_file = test.read_file

local function lines_of(path)
    local lines = {}
    for line in (read_file(path) or ""):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    return lines
end

-- waits until the file at path holds n lines (or more); returns its lines
local function wait_lines(path, n)
    local lines
    test.wait_until(function()
        lines = lines_of(path)
        return #lines >= n
    end)
    return lines
end

describe("the access log, the error log and the pid file of the command", function()
    local dir, app_path

    lazy_setup(function() dir, app_path = test.app_dir(APP) end)
    lazy_teardown(function() test.remove_dir(dir) end)

    local n = 0
    local function fresh(name) -- a path not used by an earlier test
        n = n + 1
        return ("%s/%d-%s"):format(dir, n, name)
    end

    -- `moonlet args --port 0 app.lua`, killed when the `it` ends; its port is read from its output,
    -- or from the file errlog when its stderr goes there (--error-log)
    local function start(args, errlog)
        local p = test.start_process(args .. " --port 0 " .. app_path)
        defer(function()
            p:signal("KILL")
            p:wait()
        end)
        if not errlog then return p, p:port() end
        local port = test.wait_until(function()
            return tonumber((read_file(errlog) or ""):match("on http://[^:]+:(%d+)"))
        end, 10)
        assert(port, "the server did not start: " .. (read_file(errlog) or "") .. p:output())
        return p, port
    end

    it("appends one line a request to --access-log=FILE, written before the server waits", function()
        local log = fresh("access.log")
        local p, port = start("--access-log=" .. log)
        assert.same(200, test.request(port, "GET", "/").status)
        local lines = wait_lines(log, 1)
        assert.same(1, #lines) -- no second request was needed to push the first line out
        assert.truthy(lines[1]:match('^127%.0%.0%.1:%d+ "GET / HTTP/1%.1" 200 ' .. BODY_LEN ..
                                     ' "%-" %d+%.%d%d%dms$'), lines[1])
        assert.same(404, test.request(port, "GET", "/missing").status)
        lines = wait_lines(log, 2)
        assert.truthy(lines[2]:find('"GET /missing HTTP/1.1" 404 ', 1, true), lines[2])
        assert.falsy(p:output():find('HTTP/1.1"', 1, true), p:output()) -- not on stdout
        -- --access-log-file FILE says the same; a file already there is appended to
        local _, port2 = start("--access-log-file " .. log)
        test.request(port2, "GET", "/")
        assert.same(3, #wait_lines(log, 3))
    end)

    it("writes nginx's combined format, escaping what the client sent as nginx does", function()
        local log = fresh("combined.log")
        local p, port = start("--access-log=" .. log .. " --access-log-format combined")
        local ua = 'agent "q" \\ \xC3\xA9\t!'
        assert.same(200, test.request(port, "GET", "/?a=1&b=%22", {
            headers = { ["User-Agent"] = ua, Referer = "http://example.test/from" } }).status)
        assert.truthy(test.raw(port, "BAD\r\n\r\n"):find("^HTTP/1.1 400 "))
        -- a line llhttp refuses is shown as sent (nginx's $request): a TLS hello on the plain port,
        -- an unknown method after empty lines, a bad version behind a pipelined request
        assert.truthy(test.raw(port, "\x16\x03\x01\x02\x00\x01\x00\x01\xFC\x03\x03\r\n\r\n")
                      :find("^HTTP/1.1 400 "))
        assert.truthy(test.raw(port, "\r\n\r\nGEX /q\"x HTTP/1.1\r\nHost: a\r\n\r\n"):find("^HTTP/1.1 400 "))
        assert.truthy(test.raw(port, "GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTX/1.1\r\n\r\n")
                      :find("HTTP/1.1 400 ", 1, true))
        -- refused for its headers: the line was whole, so it is logged whole
        assert.truthy(test.raw(port, "GET /nohost HTTP/1.1\r\n\r\n"):find("^HTTP/1.1 400 "))
        assert.truthy(test.raw(port, "GET /fold HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n")
                      :find("^HTTP/1.1 400 "))
        assert.truthy(test.raw(port, "GET /" .. ("u"):rep(9000) .. " HTTP/1.1\r\nHost: a\r\n\r\n")
                      :find("^HTTP/1.1 414 "))
        local lines = wait_lines(log, 9)
        assert.same(9, #lines)
        local function request_status(i) return lines[i]:match('^[^"]*(".*" %d+) ') end
        assert.same('"\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xFC\\x03\\x03" 400', request_status(3))
        assert.same('"GEX /q\\x22x HTTP/1.1" 400', request_status(4))
        assert.same('"GET /a HTTP/1.1" 404', request_status(5))
        assert.same('"GET /b HTX/1.1" 400', request_status(6))
        assert.same('"GET /nohost HTTP/1.1" 400', request_status(7))
        assert.same('"GET /fold HTTP/1.1" 400', request_status(8))
        assert.same('"GET /' .. ("u"):rep(507) .. '" 414', request_status(9)) -- cut at 512 bytes
        -- the error log names the request the same way (nginx's ", request: ...")
        assert.truthy(p:output():find('400 Bad Request from 127.0.0.1:%d+: HPE_INVALID_METHOD: ' ..
                                      '[^\n]*, request: "GEX /q\\x22x HTTP/1.1"\n'), p:output())
        assert.truthy(p:output():find(': missing Host header, request: "GET /nohost HTTP/1.1"\n', 1, true))
        local stamp = "%[%d%d/%a%a%a/%d%d%d%d:%d%d:%d%d:%d%d [+-]%d%d%d%d%]"
        assert.truthy(lines[1]:match("^127%.0%.0%.1 %- %- " .. stamp ..
                                     ' "GET /%?a=1&b=%%22 HTTP/1%.1" 200 ' .. BODY_LEN ..
                                     ' "http://example%.test/from" ' ..
                                     '"agent \\x22q\\x22 \\x5C \\xC3\\xA9\\x09!"$'), lines[1])
        assert.truthy(lines[2]:match("^127%.0%.0%.1 %- %- " .. stamp .. ' "BAD" 400 %d+ "%-" "%-"$'),
                      lines[2])
    end)

    it("writes one JSON object a line with --access-log-format json", function()
        local log = fresh("access.json")
        local _, port = start("--access-log=" .. log .. " --access-log-format json")
        test.request(port, "GET", "/?x=%22y%22", {
            headers = { ["User-Agent"] = 'say "hi" \\ caf\xC3\xA9 \xFF' } })
        test.request(port, "GET", "/boom")
        assert.truthy(test.raw(port, "BAD\r\n\r\n"):find("^HTTP/1.1 400 "))
        local lines = wait_lines(log, 3)
        assert.same(3, #lines)
        local a = json.decode(lines[1])
        assert.truthy(a.time:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d[+-]%d%d:%d%d$"), a.time)
        assert.is_number(a.request_time)
        assert.truthy(a.request_time >= 0 and a.request_time < 5)
        a.time, a.request_time = nil, nil
        assert.same({
            remote_addr = "127.0.0.1", request = "GET /?x=%22y%22 HTTP/1.1",
            request_method = "GET", request_uri = "/?x=%22y%22",
            server_protocol = "HTTP/1.1", status = 200, body_bytes_sent = BODY_LEN,
            http_referer = "",
            -- kept as UTF-8; a byte that is not UTF-8 becomes U+FFFD, so that the line stays JSON
            http_user_agent = 'say "hi" \\ caf\xC3\xA9 \xEF\xBF\xBD',
            request_id = "", -- (moonlet.request_id's, none here)
        }, a)
        assert.same({ "/boom", 500 }, { json.decode(lines[2]).request_uri, json.decode(lines[2]).status })
        local bad = json.decode(lines[3])
        assert.same({ "BAD", "", "", 400 }, { bad.request, bad.request_method, bad.request_uri, bad.status })
    end)

    it("logs every request of a pipelined burst larger than the buffer, in order", function()
        local log = fresh("burst.log")
        local _, port = start("--access-log=" .. log)
        local reqs = {}
        local N = 1500 -- ~70 KB of lines: the 32 KiB buffer is written when full, mid-iteration
        for i = 1, N do reqs[i] = test.format_request("GET", "/?i=" .. i) end
        local sock = test.connect(port, 10)
        assert(sock:send(table.concat(reqs)))
        for _ = 1, N do assert(test.read_response(sock, "GET")) end
        sock:close()
        local lines = wait_lines(log, N)
        assert.same(N, #lines)
        for i = 1, N do
            if not lines[i]:find('"GET /?i=' .. i .. ' HTTP/1.1" 200 ', 1, true) then
                error("line " .. i .. ": " .. lines[i])
            end
        end
    end)

    it("logs 499 for a request whose client reset the connection while its handler waited", function()
        local log = fresh("reset.log")
        local _, port = start("--access-log=" .. log)
        -- the request, then a reset (SO_LINGER 0) once the handler sleeps: the line used to be lost
        local p = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ([[
import socket, struct, time
s = socket.create_connection(("127.0.0.1", %d))
s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\nUser-Agent: resetter\r\n\r\n")
time.sleep(0.2)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
]]):format(port) }))
        defer(function() p:close() end)
        assert.same(0, p:wait(5))
        local lines = wait_lines(log, 1)
        assert.same(1, #lines)
        -- the peer's address too, though the socket is closed by the time the line is written
        assert.truthy(lines[1]:find('^127%.0%.0%.1:%d+ "GET /hang HTTP/1%.1" 499 0 "resetter"'), lines[1])
    end)

    it("writes the line of a pipelined request run just before the loop waits", function()
        local log = fresh("pipelined.log")
        local _, port = start("--access-log=" .. log)
        local sock = test.connect(port, 5)
        -- one segment, two requests: the second waits for the first, which ends in a timer's callback,
        -- and then runs from the server's ready list, last thing before the loop waits
        assert(sock:send(test.format_request("GET", "/later") .. test.format_request("GET", "/?p=2")))
        assert(test.read_response(sock, "GET"))
        assert(test.read_response(sock, "GET"))
        local lines = wait_lines(log, 2) -- the connection stays open and idle: no later event helps
        sock:close()
        assert.same(2, #lines)
        assert.truthy(lines[2]:find('"GET /?p=2 HTTP/1.1" 200', 1, true), lines[2])
    end)

    it("reopens both files on SIGUSR1 after logrotate moved them; tracebacks go to --error-log", function()
        local log, errlog = fresh("rot.log"), fresh("error.log")
        local p, port = start("--access-log=" .. log .. " --error-log " .. errlog, errlog)
        test.request(port, "GET", "/")
        wait_lines(log, 1)
        assert.same(500, test.request(port, "GET", "/boom").status)
        local err = read_file(errlog)
        assert.truthy(test.wait_until(function()
            err = read_file(errlog)
            return err:find("kaboom", 1, true)
        end), err)
        assert.truthy(err:find("stack traceback", 1, true), err)
        assert.truthy(err:find("app.lua:4:", 1, true), err) -- the file and line of the error
        assert.falsy(p:output():find("kaboom", 1, true), p:output()) -- stderr is the file
        -- logrotate: move the files, then SIGUSR1
        assert(os.rename(log, log .. ".1"))
        assert(os.rename(errlog, errlog .. ".1"))
        assert(p:signal("USR1"))
        assert(test.wait_until(function()
            return (read_file(errlog) or ""):find("log files reopened", 1, true)
        end), "no reopened error log")
        test.request(port, "GET", "/missing")
        assert.same(1, #wait_lines(log, 1))
        assert.truthy(lines_of(log)[1]:find('"GET /missing HTTP/1.1" 404 ', 1, true))
        assert.same(2, #lines_of(log .. ".1")) -- "/" and "/boom", nothing after the move
        assert.truthy(read_file(errlog .. ".1"):find("kaboom", 1, true))
        -- a SIGUSR1 without a log file is harmless: the server goes on
        assert.same(200, test.request(port, "GET", "/").status)
    end)

    it("shares one file between the workers of --workers 2: whole lines, all reopened", function()
        local log, errlog = fresh("workers.log"), fresh("workers-error.log")
        local p, port = start("--workers 2 --access-log=" .. log .. " --error-log " .. errlog, errlog)
        local function burst(count)
            local fns = {}
            for i = 1, count do
                fns[i] = function() return test.request(port, "GET", "/?w=" .. i).status end
            end
            local got = moonlet.gather(fns)
            for i = 1, count do assert.same(200, got[i]) end
        end
        burst(200)
        local lines = wait_lines(log, 200)
        assert.same(200, #lines)
        local seen = {}
        for _, line in ipairs(lines) do
            local i = line:match('^127%.0%.0%.1:%d+ "GET /%?w=(%d+) HTTP/1%.1" 200 %d+ "%-" [%d.]+ms$')
            assert.truthy(i, line)
            seen[tonumber(i)] = true
        end
        for i = 1, 200 do assert.truthy(seen[i], i) end
        assert(os.rename(log, log .. ".1"))
        assert(os.rename(errlog, errlog .. ".1"))
        assert(p:signal("USR1")) -- the supervisor: it reopens its own, then passes it on
        assert(test.wait_until(function()
            local _, k = (read_file(errlog) or ""):gsub("log files reopened", "")
            return k == 3 -- the supervisor and both workers
        end), read_file(errlog) or "")
        burst(100)
        assert.same(100, #wait_lines(log, 100))
        assert.same(200, #lines_of(log .. ".1"))
    end)

    it("writes --pid-file and removes it at exit; with --workers 2 it is the supervisor's", function()
        for _, workers in ipairs({ "", "--workers 2 " }) do
            local pidfile = fresh("moonlet.pid")
            local p, port = start(workers .. "--pid-file " .. pidfile)
            assert.same(200, test.request(port, "GET", "/").status)
            assert.same(tostring(p:pid()) .. "\n", read_file(pidfile))
            if workers ~= "" then -- a worker that ends leaves the supervisor's file alone
                local f = io.popen("pgrep -P " .. p:pid())
                local worker = tonumber(f:read("*l"))
                f:close()
                assert(worker and os.execute("kill -TERM " .. worker))
                assert(test.wait_until(function()
                    local g = io.open("/proc/" .. worker .. "/stat")
                    local st = g and g:read("*a") or ""
                    if g then g:close() end
                    return st == "" or st:match("^%d+ %b() Z") -- gone, or a zombie not yet reaped
                end))
                assert.same(tostring(p:pid()) .. "\n", read_file(pidfile))
            end
            assert(p:signal("TERM"))
            assert.same(0, p:wait())
            assert.is_nil(read_file(pidfile)) -- removed (by the supervisor, not by a worker first)
        end
        -- a file a newer server took over stays
        local pidfile = fresh("taken.pid")
        local p = start("--pid-file " .. pidfile)
        local f = assert(io.open(pidfile, "w"))
        f:write("999999\n")
        f:close()
        assert(p:signal("TERM"))
        assert.same(0, p:wait())
        assert.same("999999\n", read_file(pidfile))
    end)

    it("keeps a running server's pid file from a second one; os.exit removes it too", function()
        local pidfile = fresh("running.pid")
        local p = start("--pid-file " .. pidfile)
        local first = tostring(p:pid()) .. "\n"
        assert.same(first, read_file(pidfile))
        local function second(flags) -- output and exit code of a second command
            local f = io.popen(test.binary() .. " --port 0 " .. flags .. " " .. app_path ..
                               " 2>&1; echo \"exit: $?\"")
            local out = f:read("*a")
            f:close()
            return out
        end
        for _, workers in ipairs({ "", "--workers 2 " }) do
            local out = second(workers .. "--pid-file " .. pidfile)
            local in_use = "--pid-file " .. pidfile .. ": in use by process " .. p:pid()
            assert.truthy(out:find(in_use, 1, true), out)
            assert.truthy(out:find("exit: 2\n", 1, true), out)
            assert.same(first, read_file(pidfile))
        end
        -- --workers: written once the socket is made, before the fork; a file it cannot write
        -- stops it there, and the socket it made goes
        local sock_path = fresh("w.sock")
        local out = second("--workers 2 --unix " .. sock_path .. " --pid-file " .. dir .. "/no/such/dir.pid")
        assert.truthy(out:find("--pid-file " .. dir .. "/no/such/dir.pid: not found", 1, true), out)
        assert.truthy(out:find("exit: 2\n", 1, true), out)
        assert.is_nil(moonlet.fs.stat(sock_path))
        -- a handler that ends the process with os.exit: the pid file goes all the same
        local log, exit_pidfile = fresh("exit.log"), fresh("exit.pid")
        local q, port = start("--pid-file " .. exit_pidfile .. " --access-log=" .. log)
        assert.truthy(read_file(exit_pidfile))
        test.request(port, "GET", "/")
        local sock = test.connect(port, 5)
        sock:send(test.format_request("GET", "/exit"))
        sock:receive("*a")
        sock:close()
        assert.same(0, q:wait())
        assert.is_nil(read_file(exit_pidfile))
        assert.same(1, #lines_of(log))
    end)

    it("writes whole lines to a pipe from --workers 2 (stdout through a slow | cat)", function()
        local out = fresh("piped.log")
        -- a reader that starts late: the pipe fills, and a write longer than PIPE_BUF would be cut
        -- and interleaved with the other worker's
        local cmd = ("(%s --workers 2 --port 0 --access-log %s | (sleep 1; cat) > %s) 2>%s.err & echo $!")
            :format(test.binary(), app_path, out, out)
        local f = io.popen(cmd)
        local shell = tonumber(f:read("*l"))
        f:close()
        defer(function()
            os.execute("pkill -P " .. shell .. "; pkill -f '" .. app_path .. "' 2>/dev/null")
        end)
        local port = test.wait_until(function()
            return tonumber((read_file(out .. ".err") or ""):match("on http://[^:]+:(%d+)"))
        end, 10)
        assert(port, read_file(out .. ".err"))
        local ua = string.rep("u", 190)
        local fns = {}
        for i = 1, 400 do
            fns[i] = function()
                return test.request(port, "GET", "/?n=" .. i, { headers = { ["User-Agent"] = ua } }).status
            end
        end
        for start_i = 1, 400, 50 do -- 50 at a time: both workers busy, their blocks interleaving
            local part = {}
            for i = start_i, start_i + 49 do part[#part + 1] = fns[i] end
            moonlet.gather(part)
        end
        local lines = wait_lines(out, 400)
        assert.same(400, #lines)
        local seen = {}
        for _, line in ipairs(lines) do
            local i = line:match('^127%.0%.0%.1:%d+ "GET /%?n=(%d+) HTTP/1%.1" 200 %d+ "' .. ua
                                 .. '" [%d.]+ms$')
            assert.truthy(i, line)
            seen[tonumber(i)] = true
        end
        for i = 1, 400 do assert.truthy(seen[i], i) end
    end)

    it("refuses a file it cannot open and an unknown format, with a message", function()
        local function run(args)
            local f = io.popen(test.binary() .. " " .. args .. " " .. app_path .. " 2>&1; echo \"exit: $?\"")
            local out = f:read("*a")
            f:close()
            return out
        end
        local out = run("--access-log=" .. dir .. "/no/such/dir/a.log")
        assert.truthy(out:find("--access-log " .. dir .. "/no/such/dir/a.log: not found", 1, true), out)
        assert.truthy(out:find("exit: 2\n", 1, true), out)
        out = run("--access-log-format xml")
        assert.truthy(out:find("--access-log-format is moonlet, combined or json", 1, true), out)
        assert.truthy(out:find("exit: 2\n", 1, true), out)
        out = run("--error-log " .. dir .. "/no/such/dir/e.log")
        assert.truthy(out:find("--error-log " .. dir .. "/no/such/dir/e.log: not found", 1, true), out)
        assert.truthy(out:find("exit: 2\n", 1, true), out)
        out = run("--access-log=")
        assert.truthy(out:find("--access-log= wants a file", 1, true), out)
        out = run("--access-log /tmp/a.log")
        assert.truthy(out:find("--access-log takes its file after '=': --access-log=/tmp/a.log", 1, true),
                      out)
        -- with --error-log, why it could not start is told on the terminal too, not only in the file
        local holder = test.start_process("--port 0 " .. app_path)
        defer(function() holder:signal("KILL"); holder:wait() end)
        local errlog = fresh("start.log")
        out = run("--error-log " .. errlog .. " --port " .. holder:port())
        assert.truthy(out:find("address in use", 1, true), out)
        assert.truthy(out:find("exit: 1\n", 1, true), out)
        assert.truthy(read_file(errlog):find("address in use", 1, true), read_file(errlog))
        out = run("--pid-file " .. dir .. "/no/such/dir/m.pid")
        assert.truthy(out:find("--pid-file " .. dir .. "/no/such/dir/m.pid: not found", 1, true), out)
        assert.truthy(out:find("exit: 2\n", 1, true), out)
    end)
end)
