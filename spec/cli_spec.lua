-- spec/cli_spec.lua: the `moonlet` binary as a user runs it: flags, plain scripts, broken scripts,
-- an app served on a port (flag or env PORT), the access log, handler and task errors, and the
-- graceful stop on SIGTERM/SIGINT. Short commands run through io.popen; servers run in the
-- background (test.start_process) and each `it` kills and waits for what it started.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"

local APP = [[
local moonlet = require "moonlet"
local gate = ...
local app = moonlet.app()
app:get("/", function() return "hello from the app" end)
app:get("/boom", function()
    error("kaboom")
end)
app:get("/nil", function()
    local t
    return t.field
end)
app:get("/spawn", function()
    moonlet.spawn(function()
        moonlet.sleep(0.01)
        error("background failure")
    end)
    return "spawned"
end)
app:get("/slow", function()
    io.stderr:write("slow: started\n")
    while true do -- until the spec opens the gate
        local f = io.open(gate)
        if f then f:close(); break end
        moonlet.sleep(0.01)
    end
    return "slow done"
end)
return app
]]

-- the line of APP holding `text`
local function line_of(text)
    local n = 0
    for line in (APP .. "\n"):gmatch("(.-)\n") do
        n = n + 1
        if line:find(text, 1, true) then return n end
    end
    error("not in APP: " .. text)
end

local defer = test.defer -- all cleanups of an `it` run (busted keeps only the last finally)

local write_file = test.write_file

local read_file = test.read_file

local function plain(s)
    return (s:gsub("%p", "%%%0"))
end

describe("moonlet (the command)", function()
    local dir

    lazy_setup(function()
        dir = os.tmpname()
        os.remove(dir)
        local ok = os.execute("mkdir -p '" .. dir .. "'")
        assert(ok == 0 or ok == true)
    end)

    lazy_teardown(function()
        if dir then os.execute("rm -rf '" .. dir .. "'") end
    end)

    local function script(name, src)
        local path = dir .. "/" .. name
        write_file(path, src)
        return path
    end

    -- runs `moonlet args` to its end (the loop stands still meanwhile): stdout, stderr, exit code
    local function run(args, env)
        local errfile = dir .. "/stderr"
        local cmd = ("%s%s %s 2>%s; echo \"exit: $?\""):format(env and env .. " " or "", test.binary(),
                                                            args, errfile)
        local f = assert(io.popen(cmd))
        local out = f:read("*a")
        f:close()
        local stdout, code = out:match("^(.-)exit: (%d+)\n$")
        local stderr = read_file(errfile)
        os.remove(errfile)
        return stdout, stderr, tonumber(code)
    end

    -- test.start_process, killed and waited for when the running `it` ends
    local function start(args)
        local p = test.start_process(args)
        defer(function() p:kill() end)
        return p
    end

    -- As test.start_process, but stdout and stderr go to two files (p.out, p.err) and `env`
    -- ("NAME=value ...") is set for the process: for the checks of which stream a line takes.
    -- Killed and waited for when the running `it` ends.
    local function start_split(args, env)
        local base = os.tmpname()
        local p = { out = base .. ".out", err = base .. ".err", code = base .. ".code" }
        local cmd = ("(%s %s %s >%s 2>%s; echo $? >%s) & echo $!"):format(env or "", test.binary(), args,
                                                                       p.out, p.err, p.code)
        local f = assert(io.popen(cmd))
        local shell = tonumber(f:read("*l"))
        f:close()
        defer(function()
            local g = io.popen("pgrep -P " .. shell)
            local pid = tonumber(g:read("*l"))
            g:close()
            if pid then os.execute("kill -KILL " .. pid) end
            test.wait_until(function() return read_file(p.code) end)
            for _, path in ipairs({ base, p.out, p.err, p.code }) do os.remove(path) end
        end)
        return p
    end

    local function refused(port)
        local sock, err = core.tcp_connect("127.0.0.1", port, 5)
        if sock then sock:close() end
        return err == "connection refused"
    end

    describe("flags", function()
        it("prints the version with --version and exits 0", function()
            assert.same({ "moonlet " .. moonlet._VERSION .. "\n", "", 0 }, { run("--version") })
            assert.same({ "moonlet " .. moonlet._VERSION .. "\n", "", 0 }, { run("-v") })
        end)

        it("prints the usage with --help and exits 0", function()
            local out, err, code = run("--help")
            assert.same({ "", 0 }, { err, code })
            assert.truthy(out:find("^usage: moonlet"), out)
            assert.truthy(out:find("--port N", 1, true), out)
            assert.truthy(out:find("--host HOST", 1, true), out)
        end)

        it("exits non-zero with a message on an unknown flag", function()
            local out, err, code = run("--bogus " .. script("hello.lua", "print('ran')\n"))
            assert.same("", out)
            assert.truthy(err:find("unknown flag --bogus", 1, true), err)
            assert.are_not.equal(0, code)
        end)

        it("says so when `moonlet test` finds no spec directory, with a result line and exit 1", function()
            local empty = dir .. "/empty"
            assert(moonlet.fs.mkdir(empty))
            local bin = test.binary()
            if bin:sub(1, 1) ~= "/" then bin = assert(os.getenv("PWD")) .. "/" .. bin end
            local f = assert(io.popen(("cd %s && %s test 2>&1; echo \"exit: $?\""):format(empty, bin)))
            local out = f:read("*a")
            f:close()
            assert.truthy(out:find("no spec directory here", 1, true), out)
            assert.truthy(out:find("tests: 0 passed, 1 failed\n", 1, true), out)
            assert.truthy(out:find("exit: 1\n$"), out)
        end)

        it("ends `moonlet test` with its result line on a spec that cannot load, a missing path", function()
            local specs = dir .. "/broken_specs"
            assert(moonlet.fs.mkdir(specs))
            test.write_file(specs .. "/ok_spec.lua",
                            "describe('a', function() it('passes', function() end) end)\n")
            test.write_file(specs .. "/bad_spec.lua", "describe('b', function() it('x', function() end\n")
            for _, args in ipairs({ "test " .. specs, "test " .. dir .. "/no_such_dir" }) do
                local out, err, code = run(args, "timeout 60")
                out = out .. err
                assert.same(1, code, out)
                assert.falsy(out:find("attempt to concatenate", 1, true), out)
                assert.truthy(out:find("\ntests: %d passed, [1-9]%d* failed\n$"), out)
            end
            local out, err = run("test " .. specs, "timeout 60")
            assert.truthy((out .. err):find("bad_spec.lua:2:", 1, true), out .. err) -- says where
            assert.truthy(out:find("tests: 1 passed, 1 failed\n", 1, true), out)
        end)

        it("passes busted's flags on to `moonlet test`, --name=value ones too", function()
            local specs = dir .. "/filtered_specs"
            assert(moonlet.fs.mkdir(specs))
            test.write_file(specs .. "/f_spec.lua", "describe('f', function()\n"
                            .. "it('keep me', function() end)\nit('drop me', function() end)\nend)\n")
            for _, flag in ipairs({ "--filter=keep", "--filter keep" }) do
                local out, err, code = run("test " .. specs .. " " .. flag, "timeout 60")
                assert.same(0, code, out .. err)
                assert.truthy(out:find("\ntests: 1 passed, 0 failed\n$"), flag .. ": " .. out .. err)
            end
        end)

        it("exits non-zero with a message when a flag misses its value", function()
            local _, err, code = run("--port")
            assert.truthy(err:find("--port needs a value", 1, true), err)
            assert.are_not.equal(0, code)
        end)

        it("exits non-zero with a message when --port is not a number", function()
            local _, err, code = run("--port abc " .. script("hello.lua", "print('ran')\n"))
            assert.truthy(err:find("--port wants a number", 1, true), err)
            assert.are_not.equal(0, code)
        end)

        it("lists in --help every flag the command takes", function()
            local src = read_file(assert(package.searchpath("moonlet.cli", package.path)))
            local flags = {}
            for flag in src:gmatch('%["(%-%-[%w-]+)"%]') do flags[#flags + 1] = flag end
            for flag in src:gmatch('a == "(%-%-?[%w-]+)"') do flags[#flags + 1] = flag end
            assert.truthy(#flags > 20, #flags)
            local out = run("--help")
            for _, flag in ipairs(flags) do
                if flag ~= "--" then
                    assert.truthy(out:find("%f[%w-]" .. plain(flag) .. "%f[^%w-]"), flag .. " not in --help")
                end
            end
        end)

        it("refuses a number in hex, inf or nan and an unknown log level: one line, exit 2", function()
            local path = script("hello.lua", "print('ran')\n")
            for _, case in ipairs({
                { "--port 0x50", "--port wants a number" }, { "--max-body inf", "--max-body wants a number" },
                { "--max-conns nan", "--max-conns wants a number" },
                { "--header-timeout 1e999", "--header-timeout wants a number" },
                { "--workers 0x2", "--workers wants a number from 1 to 255, or auto" },
                { "--log-level loud", "--log-level is error, warn, info or debug" },
            }) do
                assert.same({ "", "moonlet: " .. case[2] .. "\n", 2 }, { run(case[1] .. " " .. path) })
            end
            assert.same({ "", "moonlet: PORT is not a number\n", 2 }, { run(path, "PORT=0x50") })
        end)

        it("serves with limits beyond what their C types hold, as no limit", function()
            local p = start("--port 0 --max-conns 4294967296 --max-body 1e30 --header-timeout 1e20 "
                            .. script("app.lua", APP))
            local r = test.request(p:port(), "GET", "/")
            assert.same({ 200, "hello from the app" }, { r.status, r.body })
        end)

        it("prints the usage and exits non-zero without a script", function()
            local out, err, code = run("")
            assert.same("", out)
            assert.truthy(err:find("^usage: moonlet"), err)
            assert.are_not.equal(0, code)
        end)
    end)

    describe("scripts", function()
        it("runs a script that returns no app inside the loop and exits 0", function()
            local path = script("sleeper.lua", 'local moonlet = require "moonlet"\n'
                                               .. "moonlet.sleep(0.05)\nprint(\"done\")\n")
            assert.same({ "done\n", "", 0 }, { run(path) })
        end)

        it("waits for the tasks a script spawned before exiting", function()
            local path = script("spawner.lua", [[
local moonlet = require "moonlet"
moonlet.spawn(function()
    moonlet.sleep(0.05)
    print("task done")
end)
print("main done")
]])
            assert.same({ "main done\ntask done\n", "", 0 }, { run(path) })
        end)

        it("passes the script its arguments", function()
            local path = script("args.lua", "print(select('#', ...), table.concat({ ... }, ' '), arg[2])\n")
            assert.same({ "2\tone --two\t--two\n", "", 0 }, { run(path .. " one --two") })
            assert.same({ "2\tone --two=2\t--two=2\n", "", 0 }, { run(path .. " one --two=2") })
        end)

        it("exits 1 naming the file and line on a syntax error", function()
            local path = script("broken.lua", "local x = 1\nlocal y = = 2\n")
            local out, err, code = run(path)
            assert.same({ "", 1 }, { out, code })
            assert.truthy(err:find(plain(path) .. ":2:"), err)
        end)

        it("exits 1 naming the file and line on an error at the top level", function()
            local path = script("raises.lua", "local x = 1\nerror(\"top-level failure\")\n")
            local out, err, code = run(path)
            assert.same({ "", 1 }, { out, code })
            assert.truthy(err:find(plain(path) .. ":2: top%-level failure"), err)
        end)

        it("exits 1 at once on a top-level error, whatever the script opened before it", function()
            local path = script("opened.lua", [[
local moonlet = require "moonlet"
local srv = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function() moonlet.sleep(60) end))
local c = assert(moonlet.tcp.connect("127.0.0.1", srv:port()))
moonlet.spawn(function() moonlet.sleep(60) end)
error("failed after opening things")
]])
            local out, err, code = run(path, "timeout 10") -- (124 when it hangs)
            assert.same({ "", 1 }, { out, code })
            assert.truthy(err:find(plain(path) .. ":5: failed after opening things"), err)
        end)

        it("exits 1 naming a script that does not exist", function()
            local path = dir .. "/missing.lua"
            local out, err, code = run(path)
            assert.same({ "", 1 }, { out, code })
            assert.truthy(err:find(path, 1, true), err)
        end)
    end)

    describe("serving an app", function()
        it("announces the port chosen for --port 0 and answers on it", function()
            local path = script("app.lua", APP)
            local p = start("--port 0 " .. path)
            local port = p:port()
            assert.truthy(p:output():find("serving " .. plain(path) .. " on http://127%.0%.0%.1:" .. port),
                          p:output())
            local r = test.request(port, "GET", "/")
            assert.same({ 200, "hello from the app" }, { r.status, r.body })
        end)

        it("writes the announcement on stderr and nothing on stdout", function()
            local p = start_split("--port 0 " .. script("app.lua", APP))
            local port = test.wait_until(function()
                return tonumber((read_file(p.err) or ""):match("serving .- on http://127%.0%.0%.1:(%d+)"))
            end)
            assert(port, read_file(p.err))
            assert.same(200, test.request(port, "GET", "/").status)
            assert.same("", read_file(p.out))
        end)

        it("escapes control bytes a client sent in a logged message: no forged line", function()
            local p = start("--port 0 " .. script("inject.lua", [[
local moonlet = require "moonlet"
local app = moonlet.app()
app:get("/e/:x", function(req) error("bad item " .. req.params.x) end)
app:get("/l/:x", function(req) moonlet.log("warn", "item ", req.params.x) return "ok" end)
return app
]]))
            local port = p:port()
            local forged = "%0d%0a2001-01-01T00:00:00Z%20%5berror%5d%20FORGED%1b%5b2J"
            assert.same(500, test.request(port, "GET", "/e/a" .. forged).status)
            assert.same(200, test.request(port, "GET", "/l/b" .. forged).status)
            local out = assert(test.wait_until(function()
                local o = p:output()
                return o:find("item b", 1, true) and o:find("in function", 1, true) and o
            end), p:output())
            assert.falsy(out:find("\n2001-01-01T", 1, true), out)
            assert.falsy(out:find("[\r\27]"), out)
            assert.truthy(out:find("bad item a\\x0D\n\t2001-01-01T00:00:00Z [error] FORGED\\x1B[2J", 1, true),
                          out)
            assert.truthy(out:find("item b\\x0D\n\t2001-01-01T", 1, true), out)
            assert.truthy(out:find("\n\tstack traceback:\n\t", 1, true), out) -- a traceback, indented
        end)

        it("listens on the port given by env PORT", function()
            local probe, free = test.serve(moonlet.app())
            probe:close()
            local p = start_split(script("app.lua", APP), "PORT=" .. free)
            local port = test.wait_until(function()
                return tonumber((read_file(p.err) or ""):match("on http://[^ ]-:(%d+)"))
            end)
            assert.same(free, port)
            local r = test.request(free, "GET", "/")
            assert.same({ 200, "hello from the app" }, { r.status, r.body })
        end)

        it("takes flags in the --flag=value form", function()
            local p = start("--host=127.0.0.1 --port=0 " .. script("app.lua", APP))
            local port = p:port()
            assert.truthy(p:output():find("on http://127%.0%.0%.1:" .. port), p:output())
            assert.same(200, test.request(port, "GET", "/").status)
        end)

        it("prefers --port to env PORT", function()
            local holder, taken = test.serve(moonlet.app())
            defer(function() holder:close() end)
            local p = start_split("--port 0 " .. script("app.lua", APP), "PORT=" .. taken)
            local port = test.wait_until(function()
                return tonumber((read_file(p.err) or ""):match("on http://[^ ]-:(%d+)"))
            end)
            assert(port, read_file(p.err))
            assert.are_not.equal(taken, port)
            assert.same(200, test.request(port, "GET", "/").status)
        end)

        it("refuses a port out of range, from --port or PORT, with exit 2", function()
            local _, err, code = run("--port 70000 " .. script("app.lua", APP))
            assert.same(2, code)
            assert.truthy(err:find("the port is a number from 0 to 65535", 1, true), err)
            _, err, code = run(script("app.lua", APP), "PORT=-1")
            assert.same(2, code, err)
        end)

        it("listens on a host given by name (--host localhost)", function()
            local p = start("--host localhost --port 0 " .. script("app.lua", APP))
            local port = p:port()
            assert.same(200, test.request(port, "GET", "/").status)
        end)

        it("exits non-zero with a message when env PORT is not a number", function()
            local _, err, code = run(script("app.lua", APP), "PORT=abc")
            assert.truthy(err:find("PORT is not a number", 1, true), err)
            assert.are_not.equal(0, code)
        end)

        it("exits 1 with a message when the port is taken", function()
            local holder, port = test.serve(moonlet.app())
            defer(function() holder:close() end)
            local out, err, code = run("--port " .. port .. " " .. script("app.lua", APP))
            assert.same({ "", 1 }, { out, code })
            assert.truthy(err:find("address in use", 1, true), err)
        end)

        it("writes one access-log line per request on stdout with --access-log", function()
            local p = start_split("--access-log --port 0 " .. script("app.lua", APP))
            local port = test.wait_until(function()
                return tonumber((read_file(p.err) or ""):match("on http://[^ ]-:(%d+)"))
            end)
            assert(port, read_file(p.err))
            assert.same(200, test.request(port, "GET", "/").status)
            assert.same(404, test.request(port, "GET", "/nowhere").status)
            assert.same(405, test.request(port, "POST", "/", { body = "x" }).status)
            -- requests refused before any handler: logged too, as nginx logs its 400s
            assert.truthy(test.raw(port, "BAD\r\n\r\n"):find("^HTTP/1.1 400 "))
            assert.truthy(test.raw(port, "POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n")
                              :find("^HTTP/1.1 413 "))
            local lines
            assert(test.wait_until(function()
                lines = {}
                for line in (read_file(p.out) or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
                return #lines >= 5
            end), read_file(p.out))
            assert.same(5, #lines)
            assert.truthy(lines[1]:find('"GET / HTTP/1.1" 200 ', 1, true), lines[1])
            assert.truthy(lines[2]:find('"GET /nowhere HTTP/1.1" 404 ', 1, true), lines[2])
            assert.truthy(lines[3]:find('"POST / HTTP/1.1" 405 ', 1, true), lines[3])
            assert.truthy(lines[4]:find('"BAD" 400 ', 1, true), lines[4]) -- the line as sent
            assert.truthy(lines[5]:find('"POST /big HTTP/1.1" 413 ', 1, true), lines[5])
            assert.falsy(read_file(p.err):find('HTTP/1.1" %d%d%d '), read_file(p.err)) -- no access line
        end)

        it("answers 500 without the traceback on a handler error, logs it and goes on", function()
            local path = script("app.lua", APP)
            local p = start("--port 0 " .. path)
            local port = p:port()
            local r = test.request(port, "GET", "/boom")
            assert.same({ 500, "500 Internal Server Error\n" }, { r.status, r.body })
            assert(test.wait_until(function() return p:output():find("kaboom", 1, true) end), p:output())
            local log = p:output()
            assert.truthy(log:find(plain(path) .. ":" .. line_of('error("kaboom")') .. ": kaboom"), log)
            assert.truthy(log:find("stack traceback:", 1, true), log)
            -- the traceback begins where the error was raised, a runtime error's too (its own
            -- function is the first frame: LuaJIT's level 1 in an xpcall handler)
            assert.truthy(log:find(plain(path) .. ":" .. line_of('error("kaboom")') .. ": in function"), log)
            r = test.request(port, "GET", "/nil")
            assert.same(500, r.status)
            local at = plain(path) .. ":" .. line_of("return t.field")
            assert(test.wait_until(function() return p:output():find(at .. ": attempt to index") end))
            assert.truthy(p:output():find("stack traceback:%s+" .. at .. ": in function"), p:output())
            r = test.request(port, "GET", "/")
            assert.same({ 200, "hello from the app" }, { r.status, r.body })
        end)

        it("logs a failing background task and goes on serving", function()
            local path = script("app.lua", APP)
            local p = start("--port 0 " .. path)
            local port = p:port()
            local r = test.request(port, "GET", "/spawn")
            assert.same({ 200, "spawned" }, { r.status, r.body })
            assert(test.wait_until(function() return p:output():find("background failure", 1, true) end),
                   p:output())
            local log = p:output()
            assert.truthy(log:find(plain(path) .. ":" .. line_of('error("background failure")')
                                   .. ": background failure"), log)
            assert.truthy(log:find("stack traceback:", 1, true), log)
            r = test.request(port, "GET", "/")
            assert.same({ 200, "hello from the app" }, { r.status, r.body })
        end)
    end)

    describe("signals", function()
        for _, sig in ipairs({ "TERM", "INT" }) do
            it("finishes the request in flight on SIG" .. sig .. ", refuses new connections, exits 0",
               function()
                local gate = dir .. "/gate-" .. sig
                local p = start("--port 0 " .. script("app.lua", APP) .. " " .. gate)
                local port = p:port()
                local sock = test.connect(port)
                defer(function() sock:close() end)
                assert(sock:send(test.format_request("GET", "/slow")))
                assert(test.wait_until(function() return p:output():find("slow: started", 1, true) end),
                       p:output())
                assert.is_true(p:signal(sig))
                assert(test.wait_until(function() return p:output():find("shutting down", 1, true) end),
                       p:output())
                assert.is_true(test.wait_until(function() return refused(port) end))
                write_file(gate, "open")
                local r = assert(test.read_response(sock, "GET"))
                assert.same({ 200, "slow done", "close" }, { r.status, r.body, r.headers["connection"] })
                sock:close() -- else the server lingers (waits for our FIN) before it exits
                assert.same(0, p:wait())
            end)
        end

        it("exits 0 on SIGTERM when idle", function()
            local p = start("--port 0 " .. script("app.lua", APP))
            local port = p:port()
            assert.same(200, test.request(port, "GET", "/").status)
            assert.is_true(p:signal("TERM"))
            assert.same(0, p:wait())
        end)

        it("closes an idle keep-alive connection at once on SIGTERM, without lingering", function()
            local p = start("--port 0 " .. script("app.lua", APP))
            local sock = test.connect(p:port())
            defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/")))
            assert.same(200, assert(test.read_response(sock, "GET")).status)
            assert.is_true(p:signal("TERM"))
            -- our side stays open: a lingering close would wait 2 s for it before the exit
            assert.same(0, p:wait(1.5))
            local line, err = sock:receive("*l")
            assert.same({ nil, "closed" }, { line, err })
        end)

        it("closes the request in flight at once on a second signal", function()
            local gate = dir .. "/gate-never"
            local p = start("--port 0 " .. script("app.lua", APP) .. " " .. gate)
            local port = p:port()
            local sock = test.connect(port)
            defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/slow")))
            assert(test.wait_until(function() return p:output():find("slow: started", 1, true) end),
                   p:output())
            assert.is_true(p:signal("TERM"))
            assert(test.wait_until(function() return p:output():find("shutting down", 1, true) end),
                   p:output())
            assert.is_true(p:signal("TERM"))
            assert.is_number(p:wait())
            assert.same({ nil, "closed" }, { test.read_response(sock, "GET") })
            assert.truthy(p:output():find("second signal", 1, true), p:output())
        end)

        for _, sig in ipairs({ "INT", "TERM" }) do
            it("ends at a second SIG" .. sig .. " a process whose loop a handler keeps busy", function()
                -- the loop hears no signal while a handler never yields: the first one stays
                -- unheard, and the second ends the process (core/sig_guard.c)
                local p = start("--port 0 " .. script("busy.lua", [[
                    local app = require("moonlet").app()
                    app:get("/spin", function()
                        io.stderr:write("spinning\n")
                        local x = 0
                        while true do x = x + 1 end
                    end)
                    return app
                ]]))
                local sock = test.connect(p:port())
                defer(function() sock:close() end)
                assert(sock:send(test.format_request("GET", "/spin")))
                assert(test.wait_until(function() return p:output():find("spinning", 1, true) end),
                       p:output())
                assert.is_true(p:signal(sig))
                assert.is_nil(p:wait(0.3)) -- the first signal: nothing can hear it
                assert.is_true(p:signal(sig))
                assert.is_number(p:wait(5))
                assert.truthy(p:output():find("a second signal and the loop is busy", 1, true), p:output())
            end)
        end

        it("logs a task that runs past --warn-blocking without yielding, with where it yielded", function()
            local path = script("cpu.lua", [[
                local moonlet = require "moonlet"
                local app = moonlet.app()
                app:get("/crunch", function()
                    local t = os.clock()
                    while os.clock() - t < 0.3 do end -- 0.3 s of CPU, no yield
                    moonlet.sleep(0.001) -- the line the warning names
                    return "crunched"
                end)
                return app
            ]])
            assert.has_error(function() moonlet.warn_blocking(-1) end)
            assert.has_error(function() moonlet.warn_blocking("1") end)
            local p = start("--warn-blocking 0.05 --port 0 " .. path)
            local r = test.request(p:port(), "GET", "/crunch")
            assert.same({ 200, "crunched" }, { r.status, r.body })
            assert(test.wait_until(function() return p:output():find("without yielding", 1, true) end),
                   p:output())
            local out = p:output()
            assert.truthy(out:find("%[warn%] a task ran %d+%.%d+ s without yielding"), out)
            assert.truthy(out:find(plain(path) .. ":6: in function"), out)
            assert.is_true(p:signal("TERM"))
            assert.same(0, p:wait())
        end)

        it("closes the request in flight when the shutdown grace is over", function()
            local gate = dir .. "/gate-never"
            local p = start("--port 0 --shutdown-grace 0.1 " .. script("app.lua", APP) .. " " .. gate)
            local port = p:port()
            local sock = test.connect(port)
            defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/slow")))
            assert(test.wait_until(function() return p:output():find("slow: started", 1, true) end),
                   p:output())
            assert.is_true(p:signal("TERM"))
            assert.is_number(p:wait())
            assert.same({ nil, "closed" }, { test.read_response(sock, "GET") })
            assert.truthy(p:output():find("grace time over", 1, true), p:output())
        end)
    end)
end)
