-- lua/moonlet/shutdown.lua: the shutdown hooks (aiohttp's on_shutdown/on_cleanup, nginx's
-- exit_worker_by_lua). moonlet.on_shutdown(fn) and app:on_shutdown(fn) register functions that run
-- when a graceful stop (SIGINT/SIGTERM, moonlet.stop(), an embedding host's moonlet_stop) has
-- drained the servers: no new connection is taken and every request in flight has finished (or the
-- shutdown grace passed), so a hook may close what requests used (a database pool, a file) and
-- flush what they left. The process exits once every hook has returned.
--
-- Invariants: bindings/instance.c runs run_hooks (set with core.on_stop when the first hook is
-- registered or an app starts serving) in a task of its own, once per instance, after the last
-- server is gone; run_hooks always ends with core.halt(), which stops the loop, even when a hook
-- raises or hangs. Each hook
-- runs in a task of its own, all at once, bounded together by LIMIT seconds (then cancelled). The
-- apps whose hooks run are the ones that have served (app:listen adds an app, and it stays even
-- when its server was closed before the stop: what it opened may still want closing; a hot reload
-- swaps the old one for the new one), with the apps they mount.
local core = require "moonlet.core"

local _M = {}

_M.LIMIT = 10 -- seconds the hooks get, together

local hooks = {}   -- moonlet.on_shutdown's made outside a script's load, in order
local serving = {} -- app -> true: apps whose on_shutdown hooks run
local registered = false
-- A script's top level runs again on each hot reload: the hooks it adds belong to that load and
-- replace the previous load's (lua/moonlet/reload.lua), rather than piling up.
local loading = nil -- the list the load running now adds to
local by_host = setmetatable({}, { __mode = "k" }) -- reload host -> its current load's hooks
local pending = setmetatable({}, { __mode = "k" }) -- reload host -> the hooks of a load under way

local function app_hooks(app, out, seen)
    if seen[app] then return end
    seen[app] = true
    for _, fn in ipairs(app.shutdown_hooks or {}) do out[#out + 1] = fn end
    for _, m in pairs(app.mounts or {}) do app_hooks(m.app, out, seen) end
end

local function run_all()
    local fns, seen = {}, {}
    for i = 1, #hooks do fns[i] = hooks[i] end
    for _, t in ipairs({ by_host, pending }) do -- (a script still in its top level has its own)
        for _, list in pairs(t) do
            for i = 1, #list do fns[#fns + 1] = list[i] end
        end
    end
    for app in pairs(serving) do app_hooks(app, fns, seen) end
    for _, list in pairs(pending) do
        for app in pairs(list.apps or {}) do app_hooks(app, fns, seen) end
    end
    if not fns[1] then return end
    local moonlet = require "moonlet"
    local ok, results, errors = pcall(moonlet.timeout, _M.LIMIT, moonlet.gather, fns)
    if not ok then
        core.log(0, "shutdown hooks: " .. tostring(results))
    elseif results == nil and errors == "timeout" then
        core.log(1, "shutdown hooks: not done after " .. _M.LIMIT .. " s; exiting")
    else
        for i, err in pairs(errors) do
            core.log(0, "shutdown hook " .. i .. ": " .. tostring(err))
        end
    end
end

local function run_hooks()
    local ok, err = pcall(run_all) -- whatever happens in there, the loop stops after it
    if not ok then pcall(core.log, 0, "shutdown hooks: " .. tostring(err)) end
    core.halt()
end

local function register()
    if registered then return end
    registered = true
    core.on_stop(run_hooks)
end

-- syntax: moonlet.on_shutdown(fn) -- fn() runs when a graceful stop has drained the servers
function _M.add(fn, level)
    if type(fn) ~= "function" then error("moonlet: a shutdown hook is a function", (level or 1) + 1) end
    local list = loading or hooks
    list[#list + 1] = fn
    register()
end

-- syntax: shutdown.add_lasting(fn) -- as add, but never tied to the script load running now: for
-- a module's own hook (moonlet.ngx's premature timers) that must survive a hot reload
function _M.add_lasting(fn)
    if type(fn) ~= "function" then error("moonlet: a shutdown hook is a function", 2) end
    hooks[#hooks + 1] = fn
    register()
end

-- A reload host runs a script (lua/moonlet/reload.lua build): the hooks its top level adds are
-- collected apart (and run if the stop comes while it still runs); end_load ends the collecting,
-- keep(host) makes them the host's in place of its previous load's, drop(host) forgets them (a
-- load that failed).
function _M.begin_load(host)
    local prev = loading
    loading = {}
    pending[host] = loading
    return prev
end

function _M.end_load(prev)
    loading = prev
end

function _M.keep(host)
    local load = pending[host]
    if load then
        by_host[host] = load
        for app in pairs(load.apps or {}) do serving[app] = true end
        load.apps = nil
    end
    pending[host] = nil
end

function _M.drop(host)
    pending[host] = nil
end

-- An app starts serving (app:listen): its hooks run at shutdown. One of a script's load under way
-- serves once the load does (keep): a load that fails (drop) leaves nothing behind.
function _M.serve(app)
    register()
    if loading then
        loading.apps = loading.apps or {}
        loading.apps[app] = true
    else
        serving[app] = true
    end
end

-- A hot reload put `new` in the place of `old` (lua/moonlet/reload.lua install): if old served,
-- new does now.
function _M.swap(old, new)
    if old == nil or not serving[old] then return end
    serving[old] = nil
    _M.serve(new)
end

return _M
