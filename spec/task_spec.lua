-- spec/task_spec.lua: tasks and time: moonlet.sleep yields to the loop, moonlet.spawn runs a
-- function in its own task, join waits for it, errors stay inside the task.
local moonlet = require "moonlet"
local mtest = require "moonlet.test"

describe("moonlet.sleep", function()
    it("yields to the loop and resumes after the delay", function()
        local t0 = moonlet.now()
        moonlet.sleep(0.05)
        local dt = moonlet.now() - t0
        assert.truthy(dt >= 0.045)
    end)

    it("lets other tasks run while it waits", function()
        local order = {}
        local t = moonlet.spawn(function()
            order[#order + 1] = "child starts"
            moonlet.sleep(0.01)
            order[#order + 1] = "child ends"
        end)
        order[#order + 1] = "parent goes on"
        t:join()
        assert.same({ "child starts", "parent goes on", "child ends" }, order)
    end)

    it("runs many sleepers at once, not one after the other", function()
        local t0 = moonlet.now()
        local tasks = {}
        for i = 1, 50 do tasks[i] = moonlet.spawn(moonlet.sleep, 0.1) end
        for i = 1, 50 do assert.truthy((tasks[i]:join())) end
        assert.truthy(moonlet.now() - t0 < 1.0) -- 50 x 0.1 s in sequence would be 5 s
    end)

    it("lets the loop poll for I/O at sleep(0) and a wait of 0 s: a task looping on them ends", function()
        local core = require "moonlet.core"
        moonlet.sleep(0)
        local before = core.stats()
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function(sock)
            sock:send("hello\n")
        end))
        local function fetch(q)
            local c = assert(moonlet.tcp.connect("127.0.0.1", server:port(), { timeout = 5 }))
            q:put(c:receive())
            c:close()
        end
        -- sleep(0) in a loop: the reader's connect and receive complete meanwhile
        local q = moonlet.queue()
        local reader = moonlet.spawn(fetch, q)
        local spins = 0
        while not reader:is_done() and spins < 100000 do
            spins = spins + 1
            moonlet.sleep(0)
        end
        assert.is_true(reader:is_done())
        assert.same({ "hello" }, { q:get(0) })
        -- a queue polled with a timeout of 0 (ngx.sleep(0)'s OpenResty idiom alike)
        reader = moonlet.spawn(fetch, q)
        local got, err
        for _ = 1, 100000 do
            got, err = q:get(0)
            if got then break end
        end
        assert.same({ "hello" }, { got, err })
        assert.same({ true }, { reader:join(5) })
        assert.same({ nil, "timeout" }, { q:get(0) })
        server:close()
        moonlet.sleep(0)
        moonlet.sleep(0)
        local after = core.stats()
        assert.same({ before.tasks, before.resources, before.handles },
                    { after.tasks, after.resources, after.handles })
    end)

    it("adds no resource or handle at the instance's first sleep(0): leak baselines hold", function()
        local code, out = mtest.run_script([[
            local moonlet = require "moonlet"
            local core = require "moonlet.core"
            local s0 = core.stats()
            moonlet.sleep(0)
            local s1 = core.stats()
            io.write(s1.resources - s0.resources, " ", s1.handles - s0.handles, "\n")
        ]])
        assert.same({ 0, "0 0\n" }, { code, out })
    end)

    it("raises when called from a coroutine of one's own", function()
        local co = coroutine.create(function() moonlet.sleep(0) end)
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.truthy(err:find("outside a moonlet task", 1, true))
    end)
end)

describe("moonlet.spawn", function()
    it("returns the function's results through join", function()
        local t = moonlet.spawn(function(a, b)
            moonlet.sleep(0)
            return a + b, "sum"
        end, 2, 3)
        assert.same({ true, 5, "sum" }, { t:join() })
        assert.is_true(t:is_done())
    end)

    it("waits as long as it takes for a timeout of math.huge (no timer ends it at once)", function()
        local t = moonlet.spawn(function() moonlet.sleep(0.02); return "done" end)
        assert.same({ true, "done" }, { t:join(math.huge) })
        assert.same({ "late" }, { moonlet.timeout(math.huge, function()
            moonlet.sleep(0.02)
            return "late"
        end) })
        local slept = false
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, function()
            moonlet.sleep(math.huge)
            slept = true
        end) })
        assert.is_false(slept)
    end)

    it("joins a task that already finished", function()
        local t = moonlet.spawn(function() return 42 end)
        assert.same({ true, 42 }, { t:join() })
    end)

    it("keeps an error inside the task and reports it to join", function()
        local t = moonlet.spawn(function() error("task broke") end)
        local ok, err = t:join()
        assert.is_false(ok)
        assert.truthy(err:find("task broke", 1, true))
        assert.truthy(err:find("stack traceback", 1, true))
    end)

    it("lets several tasks join the same task", function()
        local target = moonlet.spawn(function() moonlet.sleep(0.01); return "x" end)
        local a = moonlet.spawn(function() return (select(2, target:join())) end)
        local b = moonlet.spawn(function() return (select(2, target:join())) end)
        assert.same({ true, "x" }, { a:join() })
        assert.same({ true, "x" }, { b:join() })
    end)

    it("stops a task that starts itself without end with an error, not a C stack overflow", function()
        local deepest, msg = 0, nil
        local function dive(depth) -- each spawned task runs at once, nested in its spawner
            deepest = depth
            local ok, err = pcall(moonlet.spawn, dive, depth + 1)
            if not ok then msg = err end
        end
        moonlet.spawn(dive, 1):join()
        assert.truthy(msg and msg:find("tasks started inside each other 200 deep", 1, true), msg)
        assert.truthy(deepest >= 150 and deepest <= 200, deepest)
        assert.same({ true, "still here" }, { moonlet.spawn(function() return "still here" end):join() })
    end)

    it("logs an error nobody waits for; one a joiner or any's winner makes moot is not logged", function()
        local code, out = mtest.run_script([[
local moonlet = require "moonlet"
local t = moonlet.spawn(function() moonlet.sleep(0.01); error("joined failure") end)
assert(t:join(5) == false)
moonlet.spawn(function() moonlet.sleep(0.01); error("background failure") end)
moonlet.sleep(0.05)
local v = moonlet.any({ function() error("loser failure") end,
                        function() moonlet.sleep(0.01); return "won" end })
assert(v == "won")
local ok, err = pcall(moonlet.any, { function() error("first of all") end,
                                     function() moonlet.sleep(0.01); error("last of all") end })
assert(not ok and err:find("last of all"))
print("done")
]])
        assert.same(0, code, out)
        assert.truthy(out:find("done", 1, true), out)
        assert.truthy(out:find("spawned task failed: [^\n]*background failure"), out)
        assert.falsy(out:find("joined failure", 1, true), out)
        assert.falsy(out:find("loser failure", 1, true), out)
        assert.truthy(out:find("moonlet.any: function 1 failed: [^\n]*first of all"), out)
    end)

    it("refuses a non-function", function()
        assert.has_error(function() moonlet.spawn(42) end, "moonlet.spawn: expected a function")
    end)

    it("names itself when gather, any, timeout, queue or semaphore is misused", function()
        local function raises(fn, msg) assert.error_matches(fn, msg, 1, true) end
        raises(function() moonlet.gather() end, "moonlet.gather: expected a table of functions")
        raises(function() moonlet.any("f") end, "moonlet.any: expected a table of functions")
        raises(function() moonlet.timeout(1, 42) end, "moonlet.timeout: expected a function")
        raises(function() moonlet.timeout(nil, print) end, "moonlet.timeout: seconds must be a number")
        raises(function() moonlet.queue(-1) end, "moonlet.queue: the capacity is a number of at least 1")
        raises(function() moonlet.queue("10") end, "moonlet.queue: the capacity is a number of at least 1")
        raises(function() moonlet.semaphore(-1) end, "moonlet.semaphore: n is a number of at least 0")
        assert.same({ nil, "timeout" }, { moonlet.timeout(0, moonlet.sleep, 1) })
        assert.truthy(moonlet.queue():put(1) and moonlet.queue(1):put(1) and moonlet.semaphore(0))
    end)
end)

describe("moonlet.now", function()
    it("is monotonic and moonlet.time is the wall clock", function()
        local a = moonlet.now()
        local b = moonlet.now()
        assert.truthy(b >= a)
        assert.truthy(math.abs(moonlet.time() - os.time()) < 2)
    end)
end)

describe("core.call_unrecorded (how the framework keeps closure-making out of LuaJIT traces)", function()
    local core = require "moonlet.core"

    it("returns every value of the function it calls", function()
        local a, b, c = core.call_unrecorded(function(x, y) return x + y, "two", nil end, 1, 2)
        assert.same({ 3, "two" }, { a, b })
        assert.is_nil(c)
        assert.same(0, select("#", core.call_unrecorded(function() end)))
    end)

    it("passes errors on and refuses a wait inside (it is a C call)", function()
        assert.has_error(function() core.call_unrecorded(error, "boom", 0) end, "boom")
        local ok, err = pcall(core.call_unrecorded, function() moonlet.sleep(0) end)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("cannot wait here", 1, true)) -- rule 7 of bindings/sched.c
        moonlet.sleep(0) -- the task still waits normally afterwards
    end)
end)

describe("the JIT across a wait in a function run by gather, any or spawn", function()
    -- LuaJIT cannot record a return through a pcall that began before the trace, and throws such
    -- a trace away ("NYI: return to lower frame"). The code after a wait runs in a trace that
    -- began at the resume, inside the task's xpcall: task.lua ends that trace with a C call before
    -- the return, so that no trace dies at the function's own return (what ran since the wait
    -- stays compiled; in a fan-out, the HTTP client's whole response handling).
    local vmdef = require "jit.vmdef"
    local jutil = require "jit.util"

    -- Runs `rounds` gathers of three functions that wait and then work; returns the traces thrown
    -- away at a return to a lower frame inside `child` ("line: reason").
    local function aborts_in_child(rounds)
        local mine = debug.getinfo(1, "S").source
        local first_line, last_line
        local function child(i)
            moonlet.sleep(0)
            local s = 0
            for k = 1, 3 do s = s + k * i end -- a loop: the trace after the wait goes through it
            return s % 7 + i
        end
        local info = debug.getinfo(child, "S")
        first_line, last_line = info.linedefined, info.lastlinedefined
        local found = {}
        local function on_trace(what, _, func, pc, otr, oex)
            if what ~= "abort" then return end
            local fmt = vmdef.traceerr[otr]
            if not (fmt and fmt:find("return to lower frame", 1, true)) then return end
            local fi = jutil.funcinfo(func, pc)
            if fi.source == mine and fi.currentline and fi.currentline >= first_line
                and fi.currentline <= last_line then
                found[#found + 1] = fi.currentline .. ": " .. fmt:format(oex)
            end
        end
        jit.attach(on_trace, "trace")
        local ok, err = pcall(function()
            for r = 1, rounds do
                local results = moonlet.gather({
                    function() return child(r) end,
                    function() return child(r + 1) end,
                    function() return child(r + 2) end,
                })
                assert(results[3] == (6 * (r + 2)) % 7 + r + 2)
            end
        end)
        jit.attach(on_trace)
        assert(ok, err)
        return found
    end

    it("throws away no trace at the return of the function that waited", function()
        if not jit.status() then return pending("the JIT is off") end
        assert.same({}, aborts_in_child(400))
    end)

    it("makes no closure for the caller of spawn, timeout or any to lose its trace to", function()
        if not jit.status() then return pending("the JIT is off") end
        local task_src = "@" .. package.searchpath("moonlet.task", package.path)
        local fnew = (vmdef.bcnames:find("FNEW", 1, true) - 1) / 6 -- FNEW's opcode, as LuaJIT numbers it
        local found = {}
        local function on_trace(what, _, func, pc, otr, oex)
            if what ~= "abort" then return end
            local fi = jutil.funcinfo(func, pc)
            if fi.source ~= task_src then return end
            local why = vmdef.traceerr[otr]
            if why == "NYI: bytecode %d" and oex == fnew then
                found[#found + 1] = fi.currentline .. ": closure made"
            elseif why == "inner loop in root trace" then
                found[#found + 1] = fi.currentline .. ": " .. why
            end
        end
        local function work(i) moonlet.sleep(0) return i end
        local function first() return 1 end
        local function later() moonlet.sleep(0) return 2 end
        local function caller(i) -- hot: LuaJIT records it, and timeout, spawn and any with it
            local a = moonlet.timeout(5, work, i)
            local ok, b = moonlet.spawn(work, i):join(5)
            local c, key = moonlet.any({ later, first })
            return ok and c == 1 and key == 2 and a + b
        end
        jit.attach(on_trace, "trace")
        local ok, err = pcall(function()
            for i = 1, 300 do assert(caller(i) == 2 * i) end
        end)
        jit.attach(on_trace)
        assert(ok, err)
        assert.same({}, found)
    end)

    it("does not abort the caller's trace with a loop inside gather (an array of functions)", function()
        if not jit.status() then return pending("the JIT is off") end
        local task_src = "@" .. package.searchpath("moonlet.task", package.path)
        local found = {}
        local function on_trace(what, _, func, pc, otr, oex)
            if what ~= "abort" then return end
            local fi = jutil.funcinfo(func, pc)
            local fmt = vmdef.traceerr[otr]
            if fi.source == task_src and fmt == "inner loop in root trace" then
                found[#found + 1] = fi.currentline .. ": " .. fmt:format(oex)
            end
        end
        local function one() return 1 end
        local function two() moonlet.sleep(0) return 2 end
        local function caller(i) -- hot: LuaJIT records it, and gather with it
            local r = moonlet.gather({ one, two, one })
            return r[1] + r[2] + r[3] + i
        end
        jit.attach(on_trace, "trace")
        local ok, err = pcall(function()
            for i = 1, 300 do assert(caller(i) == 4 + i) end
        end)
        jit.attach(on_trace)
        assert(ok, err)
        assert.same({}, found)
    end)
end)
