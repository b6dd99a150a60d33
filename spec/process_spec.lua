-- spec/process_spec.lua: moonlet.process against real children (sh, cat, echo, sleep): pipes both
-- ways, large output read while the child writes, exit codes and signals, env and cwd, the spawn
-- timeout that kills and reaps, cancellation that leaves nothing behind, many children at once.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local process = require "moonlet.process"

-- the state of pid from /proc ("Z" for a zombie), or nil when it is gone (reaped)
local function proc_state(pid)
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return s:match("^%d+ %b() (%a)")
end

local function baseline()
    collectgarbage()
    collectgarbage()
    local s = core.stats()
    return s.handles, s.resources, s.tasks
end

describe("moonlet.process", function()
    it("is reachable as moonlet.process", function()
        assert.equal(process, moonlet.process)
    end)

    it("reads what echo prints and its exit code", function()
        local p = assert(process.spawn{ "echo", "hello", "world" })
        test.defer(function() p:close() end)
        assert.is_number(p.pid)
        assert.same({ "hello world" }, { p.stdout:receive("*l") })
        assert.same({ nil, "closed", "" }, { p.stdout:receive("*l") })
        assert.same({ 0, 0 }, { p:wait() })
        assert.same({ 0, 0 }, { p:wait() }) -- again: the status is kept
    end)

    it("round-trips data through cat with write and close_stdin", function()
        local p = assert(process.spawn{ "cat" })
        test.defer(function() p:close() end)
        assert.is_true(p:write("line one\r\nline two\n"))
        assert.is_true(p.stdin:send("tail"))
        assert.same({ "line one" }, { p:read("*l") })
        assert.same({ "line" }, { p.stdout:receive(4) })
        assert.is_true(p:close_stdin())
        assert.same({ " two\ntail" }, { p.stdout:receive("*a") })
        assert.same({ 0, 0 }, { p:wait(5) })
        assert.same({ nil, "closed" }, { p:write("more") })
    end)

    it("writes the stdin string and closes stdin", function()
        local p = assert(process.spawn{ "cat", stdin = "from a string\n" })
        test.defer(function() p:close() end)
        assert.same({ "from a string\n" }, { p.stdout:receive("*a") })
        assert.same({ 0, 0 }, { p:wait(5) })
    end)

    it("passes a large stdin string and reads several MB while the child writes", function()
        local big = ("0123456789abcdef"):rep(4 * 65536) -- 4 MiB: far above a pipe's buffer
        local p = assert(process.spawn{ "cat", stdin = big })
        test.defer(function() p:close() end)
        local data = p.stdout:receive("*a")
        assert.equal(#big, #data)
        assert.is_true(data == big)
        assert.same({ 0, 0 }, { p:wait(10) })
    end)

    it("gives a last line without its newline, as io.lines does", function()
        local p = assert(process.spawn{ "printf", "a\nb" })
        test.defer(function() p:close() end)
        local lines = {}
        for line in p.stdout:lines() do lines[#lines + 1] = line end
        assert.same({ "a", "b" }, lines)
        p:wait(5)
    end)

    it("reads stderr apart from stdout, line by line", function()
        local p = assert(process.spawn{ "sh", "-c", "echo out; echo err >&2; echo out2" })
        test.defer(function() p:close() end)
        local lines = {}
        for line in p.stdout:lines() do lines[#lines + 1] = line end
        assert.same({ "out", "out2" }, lines)
        assert.same({ "err" }, { p:stderr_read("*l") })
        assert.same({ "" }, { p:stdout_read("*a") })
        p:wait(5)
    end)

    it("reports exit codes and signals", function()
        local p = assert(process.spawn{ "sh", "-c", "exit 3" })
        assert.same({ 3, 0 }, { p:wait(5) })
        p:close()
        p = assert(process.spawn{ "sleep", "10" })
        test.defer(function() p:close() end)
        assert.same({ nil, "timeout" }, { p:wait(0.05) })
        assert.is_true(p:kill("TERM"))
        assert.same({ 128 + 15, 15 }, { p:wait(5) })
        assert.same({ nil, "exited" }, { p:kill() })
        assert.is_nil(proc_state(p.pid))
    end)

    it("answers nil, \"not found\" for a missing command, and raises on misuse", function()
        assert.same({ nil, "not found" }, { process.spawn{ "/nonexistent/moonlet-cmd" } })
        assert.has_error(function() process.spawn("ls") end)
        assert.has_error(function() process.spawn{ "ls", env = 3 } end)
        assert.has_error(function() process.spawn{ "ls", stdout = "bogus" } end)
    end)

    it("raises on read sizes that are NaN or out of range, as sockets do", function()
        local p = assert(process.spawn{ "printf", "abc" })
        test.defer(function() p:close() end)
        for _, size in ipairs({ math.huge, 1e300, 0 / 0, -1 }) do
            assert.has_error(function() p:read(size) end)
            assert.has_error(function() p.stdout:receive_any(size) end)
        end
        assert.same({ "ab" }, { p:read(2) })
        assert.same({ "c" }, { p.stdout:receive_any(1e12) })
    end)

    it("refuses an argument, env value or cwd with a NUL byte instead of cutting it", function()
        assert.same({ nil, "invalid argument" }, { process.spawn{ "echo", "a\0b" } })
        assert.same({ nil, "invalid argument" }, { process.spawn{ "env", env = { X = "a\0b" } } })
        assert.same({ nil, "invalid argument" }, { process.spawn{ "pwd", cwd = "/tmp\0/x" } })
        local p = assert(process.spawn{ "cat", stdin = "a\0b" }) -- data may hold any byte
        test.defer(function() p:close() end)
        assert.same({ "a\0b" }, { p:read("*a") })
    end)

    it("sets env on top of the parent's environment, and cwd", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir " .. dir) == 0)
        test.defer(function() os.execute("rmdir " .. dir) end)
        local p = assert(process.spawn{ "sh", "-c", 'echo "$MOONLET_X:$HOME:$MOONLET_GONE"; pwd',
            env = { MOONLET_X = "v1", MOONLET_GONE = false }, cwd = dir })
        test.defer(function() p:close() end)
        assert.same({ "v1:" .. (os.getenv("HOME") or "") .. ":" }, { p:read("*l") })
        local pwd = p:read("*l")
        assert.equal(dir:match("[^/]+$"), pwd:match("[^/]+$"))
        assert.same({ 0, 0 }, { p:wait(5) })
    end)

    it("kills a child that outlives its timeout and reaps it", function()
        local t0 = core.now()
        local p = assert(process.spawn{ "sleep", "30", timeout = 0.2 })
        test.defer(function() p:close() end)
        local pid = p.pid
        assert.equal("S", proc_state(pid) == "R" and "S" or proc_state(pid))
        assert.same({ 128 + 9, 9 }, { p:wait(10) })
        assert.is_true(core.now() - t0 < 5)
        assert.same({ false, true }, { p:status() })
        assert.is_nil(proc_state(pid)) -- no zombie: reaped
    end)

    it("raises on a negative or NaN spawn timeout; 0 expires at once and kills the child", function()
        for _, t in ipairs({ -1, -0.001, 0 / 0, -math.huge }) do
            assert.has_error(function() process.spawn{ "sleep", "30", timeout = t } end,
                "moonlet.process.spawn: timeout must be a number of seconds >= 0")
        end
        local p = assert(process.spawn{ "sleep", "30", timeout = 0 }) -- as Python's timeout=0
        test.defer(function() p:close() end)
        assert.same({ 128 + 9, 9 }, { p:wait(10) })
        assert.same({ false, true }, { p:status() })
    end)

    it("kills and reaps a running child on close", function()
        local p = assert(process.spawn{ "sleep", "30" })
        local pid = p.pid
        p:close()
        assert.same({ nil, "closed" }, { p:wait() })
        assert.truthy(test.wait_until(function() return proc_state(pid) == nil end, 5))
    end)

    it("wakes a waiting reader with nil, \"closed\" when the process is closed", function()
        local p = assert(process.spawn{ "sleep", "30" })
        local t = moonlet.spawn(function() return p.stdout:receive("*l") end)
        assert.same({ nil, "busy" }, { p.stdout:receive("*l") })
        p:close()
        assert.same({ true, nil, "closed" }, { t:join(5) })
    end)

    it("wakes each waiter once on close, even when the first one woken cancels another", function()
        local p = assert(process.spawn{ "sleep", "30" })
        local waiter, woken = nil, 0
        local reader = moonlet.spawn(function()
            local r = { p.stdout:receive("*a") }
            return r[2], waiter:cancel() -- the waiter is woken by the close, not cancelled
        end)
        waiter = moonlet.spawn(function()
            local r = { p:wait() }
            woken = woken + 1
            return r[1], r[2]
        end)
        moonlet.sleep(0.01)
        p:close()
        assert.same({ true, "closed", false }, { reader:join(5) })
        assert.same({ true, nil, "closed" }, { waiter:join(5) })
        assert.equal(1, woken)
    end)

    it("raises from lines() when a read times out instead of ending as at the end", function()
        local p = assert(process.spawn{ "cat" }) -- prints nothing until it is written to
        test.defer(function() p:close() end)
        p.stdout:settimeout(0)
        local got = {}
        local ok, err = pcall(function()
            for line in p.stdout:lines() do got[#got + 1] = line end
        end)
        assert.same({ false, {} }, { ok, got })
        assert.matches("moonlet.process: stdout: timeout", err, 1, true)
        p.stdout:settimeout(nil) -- nothing was lost: the stream goes on
        p:write("a\nb")
        p:close_stdin()
        for line in p.stdout:lines() do got[#got + 1] = line end
        assert.same({ "a", "b" }, got)
        assert.same({ 0, 0 }, { p:wait(5) })
    end)

    it("times out a read with settimeout and stays usable", function()
        local p = assert(process.spawn{ "sh", "-c", "sleep 0.3; echo late" })
        test.defer(function() p:close() end)
        p.stdout:settimeout(0.05)
        assert.same({ nil, "timeout" }, { p.stdout:receive("*l") })
        p.stdout:settimeout(nil)
        assert.same({ "late" }, { p.stdout:receive("*l") })
        p:wait(5)
    end)

    it("leaves nothing behind after 1,000 spawns with cancelled reads and waits", function()
        local h0, r0, t0 = baseline()
        local mem0 = collectgarbage("count")
        for i = 1, 1000 do
            local p = assert(process.spawn{ "sleep", "30" })
            local reader = moonlet.spawn(function() return p.stdout:receive("*a") end)
            local waiter = moonlet.spawn(function() return p:wait() end)
            if i % 2 == 0 then
                assert.same({ nil, "timeout" }, { moonlet.timeout(0.001, function()
                    return p.stderr:receive("*l")
                end) })
            end
            reader:cancel()
            waiter:cancel()
            assert.same({ false, "cancelled" }, { reader:join() })
            assert.same({ false, "cancelled" }, { waiter:join() })
            p:close()
        end
        assert.truthy(test.wait_until(function()
            local h, r, t = baseline()
            return h == h0 and r == r0 and t == t0
        end, 10))
        collectgarbage()
        assert.is_true(collectgarbage("count") < mem0 + 512)
    end)

    it("runs many children at once", function()
        local h0, r0 = baseline()
        local fns = {}
        for i = 1, 50 do
            fns[i] = function()
                local p = assert(process.spawn{ "sh", "-c", "sleep 0.2; echo " .. i })
                local out = p:read("*a")
                local code = p:wait(10)
                p:close()
                return { out, code }
            end
        end
        local t0 = core.now()
        local results = moonlet.gather(fns)
        assert.is_true(core.now() - t0 < 5) -- 50 × 0.2 s in parallel, not 10 s
        for i = 1, 50 do
            assert.same({ i .. "\n", 0 }, results[i])
        end
        assert.truthy(test.wait_until(function()
            local h, r = baseline()
            return h == h0 and r == r0
        end, 5))
    end)
end)
