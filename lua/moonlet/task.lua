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

local function pack(...)
    return { n = select("#", ...), ... }
end

-- syntax: t = moonlet.spawn(fn, ...)
function _M.spawn(fn, ...)
    if type(fn) ~= "function" then error("moonlet.spawn: expected a function", 2) end
    local t = setmetatable({ done = false, joiners = {} }, mt)
    core.spawn(function(...)
        local r = pack(xpcall(fn, traceback, ...))
        t.done, t.result = true, r
        if not r[1] and not t.quiet then
            core.log(0, "spawned task failed: " .. tostring(r[2]))
        end
        local joiners = t.joiners
        t.joiners = nil
        for i = 1, #joiners do core.unpark(joiners[i]) end
    end, ...)
    return t
end

-- syntax: ok, ... = t:join() -- waits for the end; true and the results, or false and the error
function methods:join()
    if not self.done then
        local co = core.running()
        if not co then error("moonlet: join outside a moonlet task", 2) end
        self.joiners[#self.joiners + 1] = co
        core.park()
    end
    local r = self.result
    return unpack(r, 1, r.n)
end

-- syntax: done = t:is_done()
function methods:is_done()
    return self.done
end

return _M
