-- lua/moonlet/task.lua: moonlet.spawn and task objects. A spawned function runs in its own task
-- (bindings/task.c) at once, until it first waits; an error in it is logged with its traceback and
-- never reaches the spawner, who may still read it with t:join(). Joiners park (core.park) and are
-- woken by core.unpark when the task ends.
local core = require "moonlet.core"

local traceback = debug.traceback
local select, unpack = select, unpack
local next, setmetatable = next, setmetatable
local has_new_tab, new_tab = pcall(require, "table.new") -- LuaJIT: tables made at their size
if not has_new_tab then new_tab = function() return {} end end

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

local core_sleep, core_park, core_spawn, core_now = core.sleep, core.park, core.spawn, core.now
local max = math.max

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

-- Where a task's function runs under xpcall and waits, the code after each wait runs in a JIT
-- trace that begins at the resume, inside the xpcall. LuaJIT cannot record the return through a
-- pcall that began before its trace ("NYI: return to lower frame") and throws the whole trace
-- away: in a fan-out, everything from the resume to the end of the child (the HTTP client taking
-- the body and making the response) ran in the interpreter. call_packed (spawn's, any's) and
-- gather_call (gather's) end that trace with a C call (LuaJIT starts a new one after it) just
-- before the return, when the function waited: then only the return is left to the interpreter
-- (callgrind, examples/fanout.lua: 46.9k -> 42.4k instructions per fan-out). A function that
-- did not wait is in the same trace as the xpcall, which LuaJIT records whole: no C call there.
-- (The request dispatcher's xpcall has no such wrapper: measured, the extra trace cost more than
-- it saved, since the handler's own code after a wait is short and what it calls is compiled in
-- traces of its own.)
-- runs[0]: tasks run or resumed so far (bindings/sched.c), read in place through the FFI
local runs = require("ffi").cast("const double *", core.runs)
local core_running = core.running

-- r0: runs[0] before the call that may have waited
local function end_trace_if_waited(r0)
    if runs[0] ~= r0 then core_running() end
end

-- fn(...) packed as { n =, true, results... }, under the caller's xpcall
local function call_packed(fn, ...)
    local r0 = runs[0]
    local r = pack(true, fn(...))
    end_trace_if_waited(r0)
    return r
end

-- The error handler of the functions spawn, gather and any run: a traceback, except for
-- cancellation.
local function task_traceback(err)
    if err == CANCELLED then return err end
    return traceback(tostring(err), 1)
end

-- The tasks of a script load (lua/moonlet/reload.lua): the ones its top level spawns, and the ones
-- those spawn in turn (an ngx.timer's loop and callbacks, a timer that re-arms itself), so that a
-- hot reload can stop them rather than let them pile up. owners maps a coroutine (the load's, or an
-- owned task's) to its load's set of tasks (weak keys: a task that ended and nobody holds goes).
local owners = setmetatable({}, { __mode = "k" })

-- syntax: prev = task.own(co, set) -- from now on, the tasks co spawns are added to set (nil: none)
function _M.own(co, set)
    local prev = owners[co]
    owners[co] = set
    return prev
end

-- syntax: task.cancel_owned(set) -- cancels every task of set that has not ended, and empties it
function _M.cancel_owned(set)
    local list = {}
    for t in pairs(set) do list[#list + 1] = t end -- (a cancelled task may spawn: not in this loop)
    for i = 1, #list do
        local t = list[i]
        set[t] = nil
        if not t.done then t:cancel() end
    end
end

-- The body of the task of moonlet.spawn's t. (One function for every spawn, not a closure made
-- per call: LuaJIT does not compile the making of a closure, and the caller of spawn or timeout
-- would lose its trace to it.)
local function run_spawned(t, fn, ...)
    t.co = core.running()
    if t.owner then owners[t.co] = t.owner end -- what this task spawns belongs to its load too
    local ok, r = xpcall(call_packed, task_traceback, fn, ...)
    -- the coroutine goes back to the pool for other tasks and requests: it owns nothing now
    if next(owners) ~= nil then owners[t.co] = nil end
    if not ok then r = { n = 2, false, r == CANCELLED and "cancelled" or r } end
    t.done, t.result = true, r
    local joiners = t.joiners
    -- an error nobody waits for is logged (a background task's); a joiner waiting gets it instead
    if not r[1] and r[2] ~= "cancelled" and not t.quiet and #joiners == 0 then
        core.log(0, "spawned task failed: " .. tostring(r[2]))
    end
    t.joiners = nil
    for i = 1, #joiners do core.unpark(joiners[i], true) end
end

-- Spawns fn; `quiet`: its error goes to whoever joins it (gather, timeout, any), not to the log.
local function spawn(quiet, fn, ...)
    if type(fn) ~= "function" then error("moonlet.spawn: expected a function", 3) end
    local t = setmetatable({ done = false, joiners = {}, quiet = quiet }, mt)
    if next(owners) ~= nil then
        local set = owners[core_running()]
        if set then
            t.owner = set
            set[t] = true
        end
    end
    core.spawn(run_spawned, t, fn, ...)
    return t
end

-- syntax: t = moonlet.spawn(fn, ...)
function _M.spawn(fn, ...)
    return spawn(false, fn, ...)
end

-- Forgets co in list (a joiner that left: timed out or cancelled).
local function remove_co(list, co)
    for i = #list, 1, -1 do
        if list[i] == co then table.remove(list, i) end
    end
end

-- syntax: ok, ... = t:join(timeout) -- waits for the end; true and the results, false and the
-- error ("cancelled" when it was), or nil, "timeout" (the task goes on). A wake-up that is not the
-- task's end (an unpark meant for another wait) parks again for the time left.
function methods:join(timeout)
    if not self.done then
        local co = core.running()
        if not co then error("moonlet: join outside a moonlet task", 2) end
        local joiners = self.joiners
        joiners[#joiners + 1] = co
        local limit = timeout and core_now() + timeout
        repeat
            local ok, err = core_park(limit and max(0, limit - core_now()))
            if ok ~= true then -- cancelled, or timed out
                remove_co(joiners, co)
                if ok == CANCEL then error(CANCELLED, 0) end
                return nil, err
            end
        until self.done
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

-- Structured concurrency: the functions gather, any and timeout run are children of the caller.
-- The caller parks until they end; when it is cancelled there (its own timeout, any, a request
-- deadline, the client gone), it cancels the children still running before it raises, so no
-- child outlives the call that started it. Children hold their coroutine only while they run:
-- an ended task's coroutine is reused, so each child forgets itself as it ends.

-- Starts fn as child k of state s (a gather's or an any's), run by run(s, k, fn): counted in
-- s.left, its coroutine kept in s.cos[k] while it runs (core_spawn returns none when it ended
-- at once).
local function start_child(s, run, k, fn)
    s.left = s.left + 1
    local co = core_spawn(run, s, k, fn)
    if co then s.cos[k] = co end
end

-- Function k of gather g has ended: it forgets its coroutine, and the last one to end returns the
-- gatherer's coroutine when it is parked (to be woken).
local function child_ended(g, k)
    g.cos[k] = nil
    local left = g.left - 1
    g.left = left
    return left == 0 and g.co
end

-- fn, function k of gather g, under gather_one's xpcall. Its results are recorded and the
-- gatherer woken in here, before the xpcall returns, not after it as call_packed's callers do:
-- after a wait, the trace that begins at the resume then compiles that bookkeeping too and ends
-- at a C call (the unpark, else core.running), so that only the returns are left to the
-- interpreter (callgrind, examples/fanout.lua: 36.3k -> 35.5k instructions per fan-out, where
-- gather_one's tail after the xpcall ran interpreted three times a request). The bookkeeping
-- cannot raise (g is a plain table, co a parked coroutine): an error the xpcall catches is
-- always fn's, and then gather_one does the bookkeeping instead.
local function gather_call(g, k, fn)
    local r0 = runs[0]
    local a, b = fn()
    g.results[k] = a
    if a == nil then g.errors[k] = b end
    local co = child_ended(g, k)
    if co then core.unpark(co, true) else end_trace_if_waited(r0) end
end

-- Runs function k of a gather in its own task and records how it ended in g; the last one to end
-- wakes the gatherer when it is parked.
local function gather_one(g, k, fn)
    local ok, err = xpcall(gather_call, task_traceback, g, k, fn)
    if not ok then
        g.errors[k] = err == CANCELLED and "cancelled" or err
        local co = child_ended(g, k)
        if co then core.unpark(co, true) end
    end
end

-- Cancels the tasks whose coroutines are the values of cos (each removes itself as it ends).
local function cancel_all(cos)
    for _, co in pairs(cos) do core.cancel(co) end
end

-- Before gather or any parks to wait for the children it started: where the caller cannot yield
-- (a C function such as table.sort's comparator is between it and its task), the park would raise
-- and leave the children running with nobody to wait for them: they are cancelled first, and the
-- error is sched.c's rule 7's.
local isyieldable = coroutine.isyieldable
local function check_can_wait(cos, level)
    if isyieldable and not isyieldable() then
        cancel_all(cos)
        error(core.NOT_YIELDABLE, level + 1)
    end
end

local function not_function(k, level)
    error("moonlet.gather: the value at " .. tostring(k) .. " is not a function", level + 1)
end

-- An array of functions (up to MAX_UNROLLED) is checked and spawned by tail calls, not loops: a
-- loop LuaJIT has not compiled aborts the trace of whoever reaches it (the request's, which then
-- runs in the interpreter), and a loop around core_spawn, a C call, is never compiled. LuaJIT
-- records tail calls up to its loop-unroll limit (15).
local MAX_UNROLLED = 12

-- The number of keys of t (LuaJIT 2.1 of OpenResty has it compiled as table.nkeys)
local has_nkeys, nkeys = pcall(require, "table.nkeys")
if not has_nkeys then
    local function count_from(t, k, n)
        k = next(t, k)
        if k == nil then return n end
        return count_from(t, k, n + 1)
    end
    nkeys = function(t) return count_from(t, nil, 0) end
end

-- Are fns[i..narr] all there? (then, with as many keys, fns is that array). With check_types, a value
-- that is not a function raises (gather's check; any checks each as it starts it).
local function present_from(fns, i, narr, check_types)
    if i > narr then return true end
    local f = fns[i]
    if f == nil then return false end
    if check_types and type(f) ~= "function" then not_function(i, 3) end
    return present_from(fns, i + 1, narr, check_types)
end

-- Is fns (of length narr) an array of up to MAX_UNROLLED values, no hole, no other key?
local function small_array(fns, narr, check_types)
    if narr < 1 or narr > MAX_UNROLLED or nkeys(fns) ~= narr then return false end
    return present_from(fns, 1, narr, check_types) -- a tail call: not_function's level stays right
end

local function spawn_from(g, fns, i, narr)
    if i > narr then return end
    start_child(g, gather_one, i, fns[i])
    return spawn_from(g, fns, i + 1, narr)
end

-- syntax: results, errors = moonlet.gather({ f1, f2, ... } or { name = f, ... })
-- Runs every function in its own task at once and waits for all. results[k] is the first value
-- function k returned; errors[k] is what went wrong: the error it raised, or the second value when
-- it returned nil, err. The total time is the slowest function's, not the sum. The functions'
-- errors are not logged (they are in errors). Cancelling the caller cancels them.
function _M.gather(fns)
    if type(fns) ~= "table" then error("moonlet.gather: expected a table of functions", 2) end
    local g
    local narr = #fns
    if small_array(fns, narr, true) then
        -- an array (no hole, no other key): no loop
        -- results and cos are made at their final size: growing them costs a rehash per doubling
        g = { results = new_tab(narr, 0), errors = {}, cos = new_tab(narr, 0), left = 1, co = false }
        spawn_from(g, fns, 1, narr)
    else
        local n = 0
        for k, fn in pairs(fns) do
            if type(fn) ~= "function" then not_function(k, 2) end
            n = n + 1
        end
        narr = #fns == n and n or 0
        g = { results = new_tab(narr, n - narr), errors = {}, cos = new_tab(narr, n - narr),
              left = 1, co = false }
        for k, fn in pairs(fns) do start_child(g, gather_one, k, fn) end
    end
    g.left = g.left - 1 -- the spawning is over: from here the last function to end wakes us
    if g.left > 0 then
        local co = core.running()
        if not co then
            cancel_all(g.cos)
            error("moonlet.gather: outside a moonlet task, and the functions wait", 2)
        end
        check_can_wait(g.cos, 2)
        g.co = co
        repeat
            if core_park() == CANCEL then
                g.co = false -- a function that ends now must not wake this task
                cancel_all(g.cos)
                error(CANCELLED, 0)
            end
        until g.left == 0
        g.co = false
    end
    return g.results, g.errors
end

-- syntax: ... = moonlet.timeout(seconds, fn, ...) -- fn's results, or nil, "timeout" when it takes
-- longer; then the task running fn is cancelled (whatever it waited on is released). Cancelling
-- the caller cancels fn's task too.
function _M.timeout(secs, fn, ...)
    if type(secs) ~= "number" or secs ~= secs then error("moonlet.timeout: seconds must be a number", 2) end
    if type(fn) ~= "function" then error("moonlet.timeout: expected a function", 2) end
    local t = spawn(true, fn, ...)
    local r = pack(pcall(t.join, t, secs))
    if not r[1] then -- the caller was cancelled while it waited
        t:cancel()
        error(r[2], 0)
    end
    if r[2] == nil then
        t:cancel()
        return nil, "timeout"
    end
    if r[2] == false then error(r[3], 0) end
    return unpack(r, 3, r.n)
end

-- The task of function k of an any (state a); the first to return wins and wakes the caller.
local function any_one(a, k, fn)
    local ok, r = xpcall(call_packed, task_traceback, fn)
    if not ok then r = { n = 2, false, r } end
    a.cos[k] = nil
    a.left = a.left - 1
    if not r[1] then
        if r[2] ~= CANCELLED then
            if a.last_err ~= nil then -- (kept to be logged should no function win)
                a.failed = a.failed or {}
                a.failed[#a.failed + 1] = "moonlet.any: function " .. tostring(a.last_key)
                    .. " failed: " .. tostring(a.last_err)
            end
            a.last_err, a.last_key = r[2], k
        end
        if a.left == 0 and not a.winner and a.parked then core.unpark(a.co, true) end
        return
    end
    if not a.winner then
        a.winner = { key = k, r = r }
        if a.parked then core.unpark(a.co, true) end
    end
end

local function any_not_function(a, k, level)
    cancel_all(a.cos)
    error("moonlet.any: the value at " .. tostring(k) .. " is not a function", level + 1)
end

-- Cancels the tasks cos[i..narr] (tail calls, not a loop: see MAX_UNROLLED)
local function cancel_from(cos, i, narr)
    if i > narr then return end
    local co = cos[i]
    if co then core.cancel(co) end
    return cancel_from(cos, i + 1, narr)
end

-- Starts fns[i..narr] until one wins (tail calls, not a loop: see MAX_UNROLLED)
local function any_from(a, fns, i, narr)
    if i > narr or a.winner then return end
    local fn = fns[i]
    if type(fn) ~= "function" then any_not_function(a, i, 3) end
    start_child(a, any_one, i, fn)
    return any_from(a, fns, i + 1, narr)
end

-- syntax: ... = moonlet.any({ f1, f2, ... }) -- runs them at once; the first to return wins: its
-- results are returned (with its key last) and the others are cancelled. A function that raises
-- does not win; when every one has raised, any raises the last error and logs the others (when
-- one wins, the errors of those that failed before are of no concern: they are dropped).
-- Cancelling the caller cancels them all.
function _M.any(fns)
    if type(fns) ~= "table" then error("moonlet.any: expected a table of functions", 2) end
    local co = core.running()
    if not co then error("moonlet: any outside a moonlet task", 2) end
    -- the state its tasks share (a table, not upvalues: a closure made per call is not compiled)
    local a = { co = co, cos = {}, winner = nil, left = 0, last_err = nil, last_key = nil,
                failed = nil, parked = false }
    local narr = #fns
    local array = small_array(fns, narr, false)
    if array then
        any_from(a, fns, 1, narr)
    else
        for k, fn in pairs(fns) do
            if type(fn) ~= "function" then any_not_function(a, k, 2) end
            start_child(a, any_one, k, fn)
            if a.winner then break end
        end
    end
    local cos = a.cos
    if not a.winner and a.left > 0 then
        check_can_wait(cos, 2)
        a.parked = true
        repeat
            if core_park() == CANCEL then
                a.parked = false
                cancel_all(cos)
                error(CANCELLED, 0)
            end
        until a.winner or a.left == 0
        a.parked = false
    end
    if array then cancel_from(cos, 1, narr) else cancel_all(cos) end -- the losers
    local winner = a.winner
    if not winner then
        if a.last_err == nil then error("moonlet.any: no function to run", 2) end
        -- every one raised: the last error is raised, the others logged (else they were lost)
        local failed = a.failed
        if failed then for i = 1, #failed do core.log(0, failed[i]) end end
        error(a.last_err, 0)
    end
    local r = winner.r
    r[r.n + 1] = winner.key
    return unpack(r, 2, r.n + 1)
end

return _M
