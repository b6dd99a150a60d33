-- spec/sync_spec.lua: cancellation, gather, timeout, any, queue, semaphore, event; and that
-- cancelled and timed-out waits leave no handle, resource, task or Lua memory behind.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local function settle()
    moonlet.sleep(0) -- close callbacks of the waits just ended run in the next loop iteration
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
end

describe("moonlet task cancellation", function()
    it("cancels a sleeping task: it ends with false, cancelled", function()
        local reached = false
        local t = moonlet.spawn(function()
            moonlet.sleep(10)
            reached = true
        end)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join() })
        assert.is_false(reached)
        assert.is_false(t:cancel()) -- already over
    end)

    it("lets a cancelled task clean up with pcall and finally-style code", function()
        local cleaned = false
        local t = moonlet.spawn(function()
            local _, err = pcall(moonlet.sleep, 10)
            cleaned = true
            error(err, 0) -- re-raise: the task still ends cancelled
        end)
        t:cancel()
        assert.same({ false, "cancelled" }, { t:join() })
        assert.is_true(cleaned)
    end)

    it("cancels a task waiting on a queue and drops it from the wait list", function()
        local q = moonlet.queue()
        local t = moonlet.spawn(function() return q:get() end)
        t:cancel()
        assert.same({ false, "cancelled" }, { t:join() })
        q:put("x")
        assert.same("x", q:get(0)) -- the cancelled getter did not take it
    end)

    it("leaves nothing behind after 10,000 timed-out and cancelled waits", function()
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        local q = moonlet.queue(1)
        for i = 1, 10000 do
            if i % 2 == 0 then
                assert.same({ nil, "timeout" }, { q:get(0) })
            else
                local t = moonlet.spawn(moonlet.sleep, 5)
                t:cancel()
            end
        end
        settle()
        test.assert_baseline(before, mem0, 256) -- KiB
    end)
end)

describe("moonlet.gather", function()
    it("runs functions at once and returns their first values in order", function()
        local t0 = moonlet.now()
        local results, errors = moonlet.gather({
            function() moonlet.sleep(0.1); return "a" end,
            function() moonlet.sleep(0.1); return "b" end,
            function() moonlet.sleep(0.1); return nil, "no b" end,
        })
        assert.same({ "a", "b" }, results)
        assert.same({ [3] = "no b" }, errors)
        assert.truthy(moonlet.now() - t0 < 0.25) -- not 0.3
    end)

    it("keeps keys of a keyed table and reports raised errors", function()
        local results, errors = moonlet.gather({
            users = function() return { "ann" } end,
            orders = function() error("db down") end,
        })
        assert.same({ users = { "ann" } }, results)
        assert.truthy(errors.orders:find("db down", 1, true))
    end)

    it("runs every function of a table with holes, or with array and other keys together", function()
        local function f(v) return function() moonlet.sleep(0) return v end end
        local fns = { f(1), nil, f(3) } -- a hole (an optional fetch left out)
        assert.same({ [1] = 1, [3] = 3 }, (moonlet.gather(fns)))
        assert.same({ 1, 2, x = "x" }, (moonlet.gather({ f(1), f(2), x = f("x") })))
        local mixed = { x = f("x") } -- [1] may sit in the hash part, before or after "x"
        mixed[1] = f(1)
        assert.same({ 1, x = "x" }, (moonlet.gather(mixed)))
        assert.same({ [0] = 0, 1 }, (moonlet.gather({ [0] = f(0), f(1) })))
        assert.same({}, (moonlet.gather({})))
        local ok, err = pcall(moonlet.gather, { f(1), 2, f(3) })
        assert.is_false(ok)
        assert.truthy(err:find("the value at 2 is not a function", 1, true))
    end)
end)

describe("moonlet.timeout", function()
    it("returns the function's results when it is in time", function()
        assert.same({ 1, 2 }, { moonlet.timeout(1, function() moonlet.sleep(0.01); return 1, 2 end) })
    end)

    it("returns nil, timeout and cancels the loser", function()
        local finished = false
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, function()
            moonlet.sleep(5)
            finished = true
        end) })
        moonlet.sleep(0.01)
        assert.is_false(finished)
    end)

    it("raises the function's error", function()
        assert.has_error(function() moonlet.timeout(1, function() error("inner", 0) end) end)
    end)
end)

describe("moonlet.any", function()
    it("returns the first to finish with its key and cancels the others", function()
        local slow_done = false
        local v, key = moonlet.any({
            function() moonlet.sleep(5); slow_done = true; return "slow" end,
            function() moonlet.sleep(0.01); return "fast" end,
        })
        assert.same({ "fast", 2 }, { v, key })
        moonlet.sleep(0.02)
        assert.is_false(slow_done)
    end)
end)

describe("moonlet.queue", function()
    it("hands values over in order and blocks a putter while full", function()
        local q = moonlet.queue(2)
        local log = {}
        local producer = moonlet.spawn(function()
            for i = 1, 4 do
                q:put(i)
                log[#log + 1] = "put " .. i
            end
        end)
        assert.same({ "put 1", "put 2" }, log) -- the third put waits for room
        local got = {}
        for _ = 1, 4 do got[#got + 1] = q:get() end
        producer:join()
        assert.same({ 1, 2, 3, 4 }, got)
    end)

    it("times out a get on an empty queue", function()
        assert.same({ nil, "timeout" }, { moonlet.queue():get(0.01) })
    end)
end)

describe("moonlet.semaphore", function()
    it("lets at most n tasks in at once", function()
        local s = moonlet.semaphore(2)
        local inside, peak = 0, 0
        local tasks = {}
        for i = 1, 6 do
            tasks[i] = moonlet.spawn(function()
                s:acquire()
                inside = inside + 1
                if inside > peak then peak = inside end
                moonlet.sleep(0.01)
                inside = inside - 1
                s:release()
            end)
        end
        for i = 1, 6 do tasks[i]:join() end
        assert.same(2, peak)
    end)
end)

describe("moonlet.event", function()
    it("wakes every waiter when set and returns at once after", function()
        local e = moonlet.event()
        local woke = 0
        local tasks = {}
        for i = 1, 3 do tasks[i] = moonlet.spawn(function() e:wait(); woke = woke + 1 end) end
        assert.same(0, woke)
        e:set()
        for i = 1, 3 do tasks[i]:join() end
        assert.same(3, woke)
        assert.is_true(e:wait(0))
        e:clear()
        assert.same({ nil, "timeout" }, { e:wait(0.01) })
    end)
end)
