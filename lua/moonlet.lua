-- lua/moonlet.lua: the `moonlet` module, what an app requires. It gathers the public API; each
-- piece lives in its own module under lua/moonlet/. Requiring it has no side effects.
local core = require "moonlet.core"
local task = require "moonlet.task"
local ffi = require "ffi"

-- through the FFI, so that a JIT trace calls the clock in place (a C function would end the trace)
local now_seconds = ffi.cast("double (*)(void)", core.now_fn)

local _M = {
    _VERSION = core.version,
    now = function() return now_seconds() end, -- syntax: t = moonlet.now()  monotonic seconds
    time = core.time,       -- syntax: t = moonlet.time()     wall-clock seconds since the epoch
    sleep = task.sleep,     -- syntax: moonlet.sleep(seconds) yields; others are served meanwhile
    spawn = task.spawn,     -- syntax: t = moonlet.spawn(fn, ...); ok, ... = t:join(); t:cancel()
    CANCELLED = task.CANCELLED, -- the error a cancelled task raises where it waited
    gather = task.gather,   -- syntax: results, errors = moonlet.gather({ f1, f2 } or { a = f })
    timeout = task.timeout, -- syntax: ... = moonlet.timeout(seconds, fn, ...) or nil, "timeout"
    any = task.any,         -- syntax: ... = moonlet.any({ f1, f2 }) -- first wins, others cancelled
}

-- syntax: q = moonlet.queue(n), s = moonlet.semaphore(n), e = moonlet.event()
function _M.queue(n) return require("moonlet.sync").queue(n) end
function _M.semaphore(n) return require("moonlet.sync").semaphore(n) end
function _M.event() return require("moonlet.sync").event() end

-- syntax: ... = moonlet.work(fn, ...) or moonlet.work("module.name", "fn", ...) -- thread pool
function _M.work(...) return require("moonlet.work").run(...) end

-- syntax: ch = moonlet.channel(name) -- pub/sub by name (lua/moonlet/channel.lua)
function _M.channel(name) return require("moonlet.channel").new(name) end

-- syntax: dict = moonlet.shared(name, { size = bytes }) -- a dictionary with expiry, by name, in
-- shared memory (one for every worker of --workers N): OpenResty's lua_shared_dict
-- (lua/moonlet/shared.lua)
function _M.shared(name, opts) return require("moonlet.shared").get(name, opts) end

-- syntax: moonlet.on_shutdown(fn) -- fn() runs once a graceful stop has drained the servers, before
-- the process exits (lua/moonlet/shutdown.lua)
function _M.on_shutdown(fn) return require("moonlet.shutdown").add(fn, 2) end

-- syntax: moonlet.stop() -- a graceful stop, as SIGTERM's: no new connection, requests in flight
-- finish, the shutdown hooks run, the loop ends
function _M.stop() core.stop() end

-- syntax: moonlet.warn_blocking(seconds) -- from now on a task that runs this long without yielding
-- is logged at warn with where it yielded (`moonlet --warn-blocking S`); 0: off
function _M.warn_blocking(seconds)
    if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 then
        error("moonlet.warn_blocking: expected seconds (0 or more)", 2)
    end
    core.set_warn_blocking(seconds)
end

-- syntax: moonlet.worker.id(), moonlet.worker.count(), moonlet.worker.pid() -- this process among
-- the workers of `moonlet --workers N` (0 .. N-1, N; id 0 of 1 when it serves alone): ngx.worker's
_M.worker = {
    id = function() return (core.worker()) end,
    count = function() return (select(2, core.worker())) end,
    pid = function() return (select(3, core.worker())) end,
}

-- syntax: app = moonlet.app()
function _M.app(opts)
    return require("moonlet.app").new(opts)
end

-- syntax: app:use(moonlet.gzip(opts)) -- gzips responses, streams, files (lua/moonlet/compress.lua)
function _M.gzip(opts) return require("moonlet.compress").gzip(opts) end

-- syntax: app:use(moonlet.session({ secret = "..." })) -- req.session in a signed cookie
-- (lua/moonlet/session.lua)
function _M.session(opts) return require("moonlet.session").middleware(opts) end

-- syntax: app:use(moonlet.cors({ origins = { "https://app.example" } })) -- cross-origin requests
-- from browsers, preflights answered (lua/moonlet/cors.lua)
function _M.cors(opts) return require("moonlet.cors").middleware(opts) end

-- syntax: app:use(moonlet.csrf()) -- after moonlet.session: unsafe methods need req:csrf_token()
-- (lua/moonlet/csrf.lua)
function _M.csrf(opts) return require("moonlet.csrf").middleware(opts) end

-- syntax: app:use(moonlet.forwarded({ trusted = { "10.0.0.0/8" } })) -- behind a reverse proxy:
-- req.ip, req.scheme, req.host as the client sent them to it (lua/moonlet/forwarded.lua)
function _M.forwarded(opts) return require("moonlet.forwarded").middleware(opts) end

-- syntax: app:use(moonlet.request_id({ header = "X-Request-Id", trust = false })) -- req.id, in the
-- response header and the logs (lua/moonlet/request_id.lua)
function _M.request_id(opts) return require("moonlet.request_id").middleware(opts) end

-- syntax: app:get("/status", moonlet.status({ format = "text" | "json" })) -- nginx's stub_status
-- (connections now, accepts, handled, requests) for what watches nginx (lua/moonlet/status.lua)
function _M.status(opts) return require("moonlet.status").handler(opts) end

-- syntax: app:any("/api/*path", moonlet.proxy({ upstream = "http://127.0.0.1:9000", strip_prefix =
-- "/api" })) -- a reverse proxy (nginx's proxy_pass): requests passed on, answers streamed back
-- (lua/moonlet/proxy.lua)
function _M.proxy(opts) return require("moonlet.proxy").handler(opts) end

-- syntax: app:use(moonlet.limit({ rate = 10, burst = 20 })) -- requests a second per client, 429
-- past it (lua/moonlet/limit.lua)
function _M.limit(opts) return require("moonlet.limit").middleware(opts) end

-- syntax: error(moonlet.abort(status, body, headers)) or moonlet.abort(...) raises itself:
-- ends the request with that response, from any depth of the handler.
function _M.abort(status, body, headers)
    error(require("moonlet.response").abort(status, body, headers), 2)
end

local log_levels = { error = 0, warn = 1, info = 2, debug = 3 }
-- syntax: moonlet.log("info", "message ", value, ...)
function _M.log(level, ...)
    local n = log_levels[level]
    if not n then error("moonlet.log: unknown level " .. tostring(level), 2) end
    local parts = { ... }
    for i = 1, select("#", ...) do parts[i] = tostring(parts[i]) end
    core.log(n, table.concat(parts))
end

-- Sub-modules load on first use: moonlet.json, moonlet.tcp, ... (one line each here).
local lazy = {
    json = "moonlet.json",
    ws = "moonlet.ws",
    http = "moonlet.http_client",
    tcp = "moonlet.tcp",
    udp = "moonlet.udp",
    dns = "moonlet.dns",
    fs = "moonlet.fs",
    sqlite = "moonlet.sqlite",
    pg = "moonlet.pg",
    redis = "moonlet.redis",
    ngx = "moonlet.ngx",
    process = "moonlet.process",
    crypto = "moonlet.crypto",
    template = "moonlet.template",
}
setmetatable(_M, { __index = function(t, k)
    local name = lazy[k]
    if not name then return nil end
    local mod = require(name)
    rawset(t, k, mod)
    return mod
end })

return _M
