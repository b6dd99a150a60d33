-- lua/moonlet/work.lua: moonlet.work, CPU-bound Lua on libuv's thread pool (bindings/work.c).
-- The function runs in a worker Lua state of its own (standard libraries, the instance's
-- package.path and cpath), so it must be self-contained: it gets its inputs as arguments, requires
-- what it needs inside, and a function with upvalues is refused. Arguments and results are copied:
-- nil, booleans, numbers, strings and nested tables of these. The caller's task yields meanwhile.
local core = require "moonlet.core"
local check = require("moonlet.task").check

local error, select = error, select

local core_work, core_work_stats = core.work, core.work_stats
local MISUSE = core.WORK_MISUSE

local _M = { _VERSION = "0.1.0" }

-- fn's results go through as they are, as many as it returned (select("#", ...) counts them:
-- none for a bare return, nil holes kept); check(...) alone would make no results one nil.
local function finish(...)
    if select("#", ...) == 0 then return end
    local first = ...
    if first == MISUSE then error((select(2, ...)), 2) end -- level 2: the tail calls left no frame
    return check(...)
end

-- syntax: ... = work.run(fn, ...) or work.run("module.name", "fn", ...)
-- fn's results (exactly as many as it returned), or nil and the error message when it raised;
-- misuse (an upvalue, an uncopyable argument) raises here; a cancelled caller raises
-- moonlet.CANCELLED.
function _M.run(fn, ...)
    return finish(core_work(fn, ...))
end

-- syntax: s = work.stats() -- { states, idle, running, queued, max_states } of the worker pool
function _M.stats()
    return core_work_stats()
end

return _M
