-- spec/work_spec.lua: moonlet.work, CPU-bound Lua on the thread pool: values copied both ways,
-- errors, uncopyable values, the module form, the loop serving while a job runs, many jobs at once,
-- cancellation (queued and running jobs) and that nothing is left behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local work = require "moonlet.work"

-- Runs until the pool is idle (no job queued or running) and the resources are back to `n` (or
-- fewer: an earlier spec's pooled client connection may close meanwhile, at its idle timeout).
local function settle(resources)
    assert.truthy(test.wait_until(function()
        local s = work.stats()
        return s.running == 0 and s.queued == 0
            and (resources == nil or core.stats().resources <= resources)
    end, 10))
    collectgarbage()
    collectgarbage()
end

local function tmpname()
    local name = os.tmpname()
    os.remove(name)
    return name
end

-- A job that spins until the file `stop` exists (at most 10 s), after creating `started`.
local function spin_until(started, stop)
    local f = io.open(started, "w")
    f:close()
    local t0 = os.time()
    while os.time() - t0 < 10 do
        local g = io.open(stop)
        if g then
            g:close()
            return "stopped"
        end
    end
    return "gave up"
end

local function exists(path)
    local f = io.open(path)
    if f then f:close() end
    return f ~= nil
end

describe("moonlet.work", function()
    it("runs a function on the thread pool and returns all its results", function()
        assert.same({ 5, "ab", true, false }, { moonlet.work(function(a, b, c, d)
            return a + b, c .. d, true, false
        end, 2, 3, "a", "b") })
        local n = select("#", moonlet.work(function() return 1, nil, nil end))
        assert.same(3, n)
        assert.same({ nil, 2 }, { moonlet.work(function(a, b) return a, b end, nil, 2) })
    end)

    it("returns as many values as the function returned: none, nil holes, trailing nils", function()
        local function count(...) return select("#", ...), { ... } end
        assert.same({ 0, {} }, { count(moonlet.work(function() end)) })
        assert.same({ 0, {} }, { count(moonlet.work(function() return end)) })
        assert.same({ 1, {} }, { count(moonlet.work(function() return nil end)) })
        assert.same({ 2, { nil, 2 } }, { count(moonlet.work(function() return nil, 2 end)) })
        assert.same({ 3, { 1, nil, 3 } }, { count(moonlet.work(function() return 1, nil, 3 end)) })
        assert.same({ 2, { nil, nil } }, { count(moonlet.work(function() return nil, nil end)) })
        -- the module form alike (table.insert returns nothing); an error is still nil, err
        assert.same({ 0, {} }, { count(moonlet.work("table", "insert", {}, 1)) })
        local n, r = count(moonlet.work(function() error("boom", 0) end))
        assert.same({ 2, { nil, "boom" } }, { n, r })
    end)

    it("copies strings byte for byte and numbers exactly", function()
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local s = table.concat(bytes) .. "\0tail"
        local back, len = moonlet.work(function(x) return x, #x end, s)
        assert.same(s, back)
        assert.same(#s, len)
        local nums = { 0, -0.5, 1 / 3, 2 ^ 53, -2 ^ 60, math.huge, -math.huge, 1e-300 }
        assert.same(nums, (moonlet.work(function(t) return t end, nums)))
        local nan = moonlet.work(function() return 0 / 0 end)
        assert.is_true(nan ~= nan)
    end)

    it("copies nested tables both ways, with any copyable keys, as new tables", function()
        local arg = {
            list = { 1, 2, 3, { 4, { 5, { 6 } } } },
            map = { a = "x", [10] = "ten", [1.5] = "one and a half", [true] = "yes" },
            empty = {},
        }
        local back, sum = moonlet.work(function(t)
            local s = 0
            for _, v in ipairs(t.list) do if type(v) == "number" then s = s + v end end
            t.list[5] = "added in the worker"
            t.from_worker = { deep = { deeper = { "ok" } } }
            return t, s
        end, arg)
        assert.same(6, sum)
        assert.are_not.equal(arg, back) -- a copy, not the same table
        assert.is_nil(arg.list[5]) -- the worker changed its own copy only
        assert.same("added in the worker", back.list[5])
        assert.same({ deep = { deeper = { "ok" } } }, back.from_worker)
        back.list[5], back.from_worker = nil, nil
        assert.same(arg, back)
    end)

    it("copies a table reachable twice (no cycle) as two copies", function()
        local shared = { 1, 2 }
        local back = moonlet.work(function(t) return t end, { a = shared, b = shared })
        assert.same({ a = { 1, 2 }, b = { 1, 2 } }, back)
    end)

    it("refuses a copy of more than a million values (a table shared at every level)", function()
        local t = { 1 }
        for _ = 1, 28 do t = { t, t } end -- 2^28 leaves as a copy: refused, the loop not held up
        local ok, err = pcall(moonlet.work, function(x) return x end, t)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("more than 1000000 values", 1, true), tostring(err))
        assert.same({ 3 }, { moonlet.work(function(a, b) return a + b end, 1, 2) })
    end)

    it("carries large strings both ways", function()
        local big = string.rep("0123456789abcdef", 64 * 1024) -- 1 MiB
        local len, made = moonlet.work(function(s) return #s, string.rep("z", 20 * 1024 * 1024) end, big)
        assert.same(#big, len)
        assert.same(20 * 1024 * 1024, #made)
    end)

    it("returns nil and the message when the function raises", function()
        local r, err = moonlet.work(function() error("boom") end)
        assert.is_nil(r)
        assert.truthy(err:find("work_spec.lua:%d+: boom$"), err) -- the position survives the trip
        assert.same({ nil, "plain" }, { moonlet.work(function() error("plain", 0) end) })
        r, err = moonlet.work(function() local t = nil; return t.x end)
        assert.is_nil(r)
        assert.truthy(err:find("attempt to index", 1, true), err)
        assert.same({ nil, "(error object is a table value)" },
            { moonlet.work(function() error({ code = 1 }) end) })
    end)

    it("raises when an argument cannot be copied, before running anything", function()
        local ran = tmpname()
        local function job(path) io.open(path, "w"):close() end
        assert.has_error(function() moonlet.work(job, ran, print) end,
            "moonlet.work: cannot copy a function")
        assert.has_error(function() moonlet.work(job, ran, io.stdout) end,
            "moonlet.work: cannot copy a userdata")
        assert.has_error(function() moonlet.work(job, ran, coroutine.create(print)) end,
            "moonlet.work: cannot copy a thread")
        assert.has_error(function() moonlet.work(job, ran, { 1, { 2, { f = print } } }) end,
            "moonlet.work: cannot copy a function")
        assert.has_error(function() moonlet.work(job, ran, { [print] = 1 }) end,
            "moonlet.work: cannot copy a function")
        local cyclic = { a = { b = {} } }
        cyclic.a.b.c = cyclic
        assert.has_error(function() moonlet.work(job, ran, cyclic) end,
            "moonlet.work: cannot copy a table with a cycle")
        local deep = {}
        for _ = 1, 200 do deep = { deep } end
        assert.has_error(function() moonlet.work(job, ran, deep) end,
            "moonlet.work: cannot copy tables nested that deep")
        assert.is_false(exists(ran))
    end)

    it("returns nil, err when a result cannot be copied", function()
        assert.same({ nil, "moonlet.work: cannot copy a function" },
            { moonlet.work(function() return 1, { f = print } end) })
        assert.same({ nil, "moonlet.work: cannot copy a table with a cycle" },
            { moonlet.work(function() local t = {}; t[1] = t; return t end) })
        assert.same({ nil, "moonlet.work: cannot copy a thread" },
            { moonlet.work(function() return coroutine.create(print) end) })
        assert.same({ nil, "moonlet.work: more than 4000 results" },
            { moonlet.work(function()
                local t = {}
                for i = 1, 5000 do t[i] = i end
                return unpack(t)
            end) })
        assert.same(3000, select("#", moonlet.work(function()
            local t = {}
            for i = 1, 3000 do t[i] = i end
            return unpack(t)
        end)))
    end)

    it("refuses functions that cannot run elsewhere: upvalues, C functions, no function", function()
        local captured = 42
        local ok, err = pcall(moonlet.work, function() return captured end)
        assert.is_false(ok)
        assert.truthy(err:find("upvalue 'captured'", 1, true), err)
        assert.has_error(function() moonlet.work(print) end,
            "moonlet.work: cannot run a C function in a worker")
        assert.has_error(function() moonlet.work(42) end,
            "moonlet.work: expected a function or a module name, got number")
        assert.has_error(function() moonlet.work("string") end,
            "moonlet.work: expected a function name after the module name")
    end)

    it("gives a work function the standard libraries and its own globals", function()
        assert.same({ "function", "function", "function", "function", "function", "function",
            "nil" }, { moonlet.work(function()
            return type(string.format), type(table.concat), type(math.sqrt), type(io.open),
                type(os.clock), type(require), type(rawget(_G, "moonlet"))
        end) })
    end)

    describe("module form", function()
        local dir, saved_path
        before_each(function()
            dir = tmpname()
            assert(os.execute("mkdir -p " .. dir .. "/wk") == 0)
            local f = assert(io.open(dir .. "/wk/hashing.lua", "w"))
            f:write([[
local _M = {}
function _M.checksum(s, rounds)
    local h = 5381
    for _ = 1, rounds do
        for i = 1, #s do h = (h * 33 + s:byte(i)) % 4294967296 end
    end
    return h, #s
end
function _M.fail() error("module failure", 0) end
_M.not_a_function = 1
return _M
]])
            f:close()
            saved_path = package.path
            package.path = dir .. "/?.lua;" .. package.path -- the workers follow the instance's path
        end)
        after_each(function()
            package.path = saved_path
            os.execute("rm -rf " .. dir)
        end)

        it("requires the module in the worker and calls module[fn](...)", function()
            local h, n = moonlet.work("wk.hashing", "checksum", "moonlet", 3)
            assert.same(7, n)
            local expect = 5381
            for _ = 1, 3 do
                for i = 1, 7 do expect = (expect * 33 + ("moonlet"):byte(i)) % 4294967296 end
            end
            assert.same(expect, h)
            assert.same({ nil, "module failure" }, { moonlet.work("wk.hashing", "fail") })
        end)

        it("runs a real module of the framework (moonlet.json) off the loop", function()
            local s = moonlet.work("moonlet.json", "encode", { a = { 1, 2 } })
            assert.same({ a = { 1, 2 } }, require("moonlet.json").decode(s))
        end)

        it("returns nil, err for an unknown module or function", function()
            local r, err = moonlet.work("wk.no_such_module", "f")
            assert.is_nil(r)
            assert.truthy(err:find("module 'wk.no_such_module' not found", 1, true), err)
            assert.same({ nil, "moonlet.work: module 'wk.hashing' has no function 'nope'" },
                { moonlet.work("wk.hashing", "nope") })
            assert.same({ nil, "moonlet.work: module 'wk.hashing' has no function 'not_a_function'" },
                { moonlet.work("wk.hashing", "not_a_function") })
        end)
    end)

    it("keeps the loop serving timers and requests while a 300 ms job runs", function()
        local app = moonlet.app()
        app:get("/ping", function() return "pong" end)
        local server, port = test.serve(app)
        finally(function() server:close() end)
        local ticks = 0
        local ticker = moonlet.spawn(function()
            while true do
                moonlet.sleep(0.01)
                ticks = ticks + 1
            end
        end)
        finally(function() ticker:cancel() end)
        local job_done, answered_before_done = false, nil
        local pinger = moonlet.spawn(function()
            local r = test.request(port, "GET", "/ping")
            answered_before_done = r.body == "pong" and not job_done
        end)
        local t0 = moonlet.now()
        local spins = moonlet.work(function()
            local t = os.clock()
            local n = 0
            while os.clock() - t < 0.3 do n = n + 1 end
            return n
        end)
        job_done = true
        local elapsed = moonlet.now() - t0
        pinger:join()
        assert.truthy(spins > 0)
        assert.truthy(elapsed > 0.15, elapsed) -- it did take time...
        assert.truthy(ticks >= 5, ticks)       -- ...during which the timer kept firing
        assert.is_true(answered_before_done)   -- and a request was answered
    end)

    it("completes 100 jobs started at once, on a bounded pool of reused states", function()
        local fns = {}
        for i = 1, 100 do
            fns[i] = function()
                return moonlet.work(function(n)
                    local s = 0
                    for k = 1, 10000 do s = s + k % (n + 1) end
                    return n * 2, s
                end, i)
            end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 100 do assert.same(i * 2, results[i]) end
        local s = work.stats()
        assert.truthy(s.states >= 1 and s.states <= s.max_states, s.states)
        assert.same(s.states, s.idle)
        assert.same(0, s.running)
        assert.same(0, s.queued)
    end)

    it("reuses worker states: globals set by one job are seen by a later one", function()
        local s = work.stats()
        -- every state gets a mark; then some job sees one
        local fns = {}
        for i = 1, s.max_states * 3 do
            fns[i] = function()
                return moonlet.work(function() rawset(_G, "MOONLET_SPEC_MARK", true); return true end)
            end
        end
        moonlet.gather(fns)
        assert.is_true(moonlet.work(function() return rawget(_G, "MOONLET_SPEC_MARK") == true end))
    end)

    describe("cancellation", function()
        it("cancels a job queued for a state: it never runs", function()
            settle()
            local started, stop, ran = tmpname(), tmpname(), tmpname()
            finally(function()
                io.open(stop, "w"):close()
                settle()
                os.remove(started)
                os.remove(stop)
                os.remove(ran)
            end)
            local max = work.stats().max_states
            local blockers = {}
            for i = 1, max do -- occupy every state
                blockers[i] = moonlet.spawn(moonlet.work, spin_until, started .. i, stop)
            end
            local queued = moonlet.spawn(moonlet.work, function(path)
                io.open(path, "w"):close()
            end, ran)
            assert.same(1, work.stats().queued)
            assert.is_true(queued:cancel())
            assert.same({ false, "cancelled" }, { queued:join() })
            assert.same(0, work.stats().queued)
            io.open(stop, "w"):close()
            for i = 1, max do assert.same({ true, "stopped" }, { blockers[i]:join() }) end
            settle()
            assert.is_false(exists(ran))
            for i = 1, max do os.remove(started .. i) end
        end)

        it("cancels a running job: the caller is released now, the result is dropped later", function()
            settle()
            local resources = core.stats().resources
            local started, stop = tmpname(), tmpname()
            finally(function()
                io.open(stop, "w"):close()
                settle()
                os.remove(started)
                os.remove(stop)
            end)
            local t = moonlet.spawn(moonlet.work, spin_until, started, stop)
            assert.truthy(test.wait_until(function() return exists(started) end))
            assert.is_true(t:cancel())
            assert.same({ false, "cancelled" }, { t:join() })
            assert.same(1, work.stats().running) -- still on its thread
            io.open(stop, "w"):close()
            settle(resources)
            local s = work.stats()
            assert.same(s.states, s.idle) -- its state went back to the pool
            assert.same(42, moonlet.work(function() return 42 end))
        end)

        it("times out a long job through moonlet.timeout", function()
            local stop = tmpname()
            finally(function()
                io.open(stop, "w"):close()
                settle()
                os.remove(stop)
                os.remove(stop .. ".started")
            end)
            assert.same({ nil, "timeout" },
                { moonlet.timeout(0.05, moonlet.work, spin_until, stop .. ".started", stop) })
        end)

        it("leaves no state, job, resource, task or Lua memory behind", function()
            for _ = 1, 20 do moonlet.work(function(x) return x end, { 1 }) end -- warm up
            settle()
            local before = test.settled_stats()
            local mem0 = collectgarbage("count")
            for i = 1, 600 do
                if i % 3 == 0 then
                    local t = moonlet.spawn(moonlet.work, function(x) return x end, { i, "x" })
                    t:cancel()
                elseif i % 3 == 1 then
                    local t = moonlet.spawn(moonlet.work, function()
                        local s = 0
                        for k = 1, 100000 do s = s + k end
                        return s
                    end)
                    moonlet.sleep(0)
                    t:cancel()
                else
                    assert.same({ i, "x" }, moonlet.work(function(x) return x end, { i, "x" }))
                end
            end
            settle(before.resources)
            test.assert_baseline(before)
            local s = work.stats()
            assert.same(s.states, s.idle)
            assert.truthy(s.states <= s.max_states)
            assert.truthy(collectgarbage("count") - mem0 < 256) -- KiB: no growth with the count
        end)
    end)
end)
