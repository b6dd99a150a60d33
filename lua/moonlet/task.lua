-- lua/moonlet/task.lua: moonlet.spawn and task objects. A spawned function runs in its own task
-- (bindings/task.c) at once, until it first waits; an error in it is logged with its traceback and
-- never reaches the spawner, who may still read it with t:join(). Joiners park (core.park) and are
-- woken by core.unpark when the task ends.
local core = require "moonlet.core"

local traceback = debug.traceback
local select, unpack = select, unpack
local setmetatable = setmetatable

local _M = {}
local methods = {}
local mt = { __name = "moonlet.task", __index = methods }

local CANCEL = core.CANCEL
-- The error a cancelled task raises at the wait it was parked in. It unwinds the task like any
-- error (pcall sees it); the task ends with false, "cancelled" and nothing is logged.
local CANCELLED = setmetatable({}, { __name = "moonlet.cancelled", __tostring = function()
    return "cancelled"
end })
_M.CANCELLED = CANCELLED

-- syntax: ... = task.check(...) -- passes the results of a waiting core call through, and raises
-- CANCELLED when the wait was cancelled. Every Lua wrapper of a core call that waits uses it.
local function check(first, ...)
    if first == CANCEL then error(CANCELLED, 0) end
    return first, ...
end
_M.check = check

local core_sleep, core_park = core.sleep, core.park

-- syntax: moonlet.sleep(seconds)
function _M.sleep(secs)
    return check(core_sleep(secs))
end

-- syntax: ... = task.park(timeout) -- see bindings/task.c
function _M.park(timeout)
    return check(core_park(timeout))
end

local function pack(...)
    return { n = select("#", ...), ... }
end

-- Spawns fn; `quiet`: its error goes to whoever joins it (gather, timeout, any), not to the log.
local function spawn(quiet, fn, ...)
    if type(fn) ~= "function" then error("moonlet.spawn: expected a function", 3) end
    local t = setmetatable({ done = false, joiners = {}, quiet = quiet }, mt)
    core.spawn(function(...)
        t.co = core.running()
        local r = pack(xpcall(fn, function(err)
            if err == CANCELLED then return err end
            return traceback(tostring(err), 2)
        end, ...))
        if r[1] == false and r[2] == CANCELLED then r[2] = "cancelled" end
        t.done, t.result = true, r
        if not r[1] and r[2] ~= "cancelled" and not t.quiet then
            core.log(0, "spawned task failed: " .. tostring(r[2]))
        end
        local joiners = t.joiners
        t.joiners = nil
        for i = 1, #joiners do core.unpark(joiners[i], true) end
    end, ...)
    return t
end

-- syntax: t = moonlet.spawn(fn, ...)
function _M.spawn(fn, ...)
    return spawn(false, fn, ...)
end

-- syntax: ok, ... = t:join(timeout) -- waits for the end; true and the results, false and the
-- error ("cancelled" when it was), or nil, "timeout" (the task goes on)
function methods:join(timeout)
    if not self.done then
        local co = core.running()
        if not co then error("moonlet: join outside a moonlet task", 2) end
        local joiners = self.joiners
        joiners[#joiners + 1] = co
        local ok, err = check(core_park(timeout))
        if not ok then
            for i = #joiners, 1, -1 do
                if joiners[i] == co then table.remove(joiners, i) end
            end
            return nil, err
        end
    end
    local r = self.result
    return unpack(r, 1, r.n)
end

-- syntax: ok = t:cancel() -- a parked task is resumed with moonlet.CANCELLED at its wait and ends
-- with false, "cancelled"; false when it has ended already or is the one running now
function methods:cancel()
    if self.done or not self.co then return false end
    return core.cancel(self.co)
end

-- syntax: done = t:is_done()
function methods:is_done()
    return self.done
end

-- syntax: results, errors = moonlet.gather({ f1, f2, ... } or { name = f, ... })
-- Runs every function in its own task at once and waits for all. results[k] is the first value
-- function k returned; errors[k] is what went wrong: the error it raised, or the second value when
-- it returned nil, err. The total time is the slowest function's, not the sum.
function _M.gather(fns)
    local tasks = {}
    for k, fn in pairs(fns) do tasks[k] = spawn(true, fn) end
    local results, errors = {}, {}
    for k, t in pairs(tasks) do
        local ok, a, b = t:join()
        if ok then
            results[k] = a
            if a == nil then errors[k] = b end
        else
            errors[k] = a
        end
    end
    return results, errors
end

-- syntax: ... = moonlet.timeout(seconds, fn, ...) -- fn's results, or nil, "timeout" when it takes
-- longer; then the task running fn is cancelled (whatever it waited on is released)
function _M.timeout(secs, fn, ...)
    local t = spawn(true, fn, ...)
    local r = pack(t:join(secs))
    if r[1] == nil then
        t:cancel()
        return nil, "timeout"
    end
    if r[1] == false then error(r[2], 0) end
    return unpack(r, 2, r.n)
end

-- syntax: ... = moonlet.any({ f1, f2, ... }) -- runs them at once; the first to finish wins: its
-- results are returned (with its key last) and the others are cancelled
function _M.any(fns)
    local co = core.running()
    if not co then error("moonlet: any outside a moonlet task", 2) end
    local tasks, winner = {}, nil
    for k, fn in pairs(fns) do
        tasks[k] = spawn(false, function()
            local r = pack(fn())
            if not winner then
                winner = { key = k, r = r }
                core.unpark(co, true)
            end
        end)
        if winner then break end
    end
    if not winner then
        local ok, err = check(core_park())
        if not ok then return nil, err end
    end
    for _, t in pairs(tasks) do
        if not t.done then t:cancel() end
    end
    local r = winner.r
    r[r.n + 1] = winner.key
    return unpack(r, 1, r.n + 1)
end

return _M
