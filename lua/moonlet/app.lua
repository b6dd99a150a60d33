-- lua/moonlet/app.lua: the app: routes, middleware, static mounts, and the dispatcher the C server
-- calls for each request. An app is a plain value: building one has no side effects, and
-- app:listen() (or the `moonlet` command, given a script that returns the app) serves it.
--
-- The dispatcher runs inside the request's task (bindings/http_server.c). It builds req and res,
-- routes, runs the middleware chain and the handler under xpcall (LuaJIT lets handlers yield
-- through it), and turns the result into the response: a Lua error becomes a 500 with the
-- traceback in the log, never in the response.
local core = require "moonlet.core"
local task = require "moonlet.task"
local router_mod = require "moonlet.router"
local request = require "moonlet.request"
local response = require "moonlet.response"
local url = require "moonlet.url"

local str_find, str_sub, str_match, str_gsub = string.find, string.sub, string.match, string.gsub
local setmetatable, xpcall, traceback = setmetatable, xpcall, debug.traceback
local req_mt, res_mt = request.mt, response.mt
local send, is_abort, always_headers = response.send, response.is_abort, response.always_headers
local unescape = url.unescape
local CANCELLED, CANCEL = task.CANCELLED, core.CANCEL
local core_spawn, core_sleep, core_cancel, core_running, call_unrecorded =
    core.spawn, core.sleep, core.cancel, core.running, core.call_unrecorded
-- running_request[0]: the request the running task works for (bindings/task.c), read in place
local running_request = require("ffi").cast("const double *", core.running_request)

local _M = {}
local methods = {}
local mt = { __name = "moonlet.app", __index = methods }

local function check_deadline(opts, level)
    local d = opts and opts.deadline
    if d ~= nil and (type(d) ~= "number" or d <= 0) then
        error("moonlet: deadline must be a number of seconds > 0", level + 1)
    end
    return d
end

-- syntax: app = moonlet.app({ deadline = seconds, max_body = bytes, ... }) -- deadline: every
-- request's (see dispatcher); the limits and timeouts of app:listen are the defaults of its servers
function _M.new(opts)
    opts = opts or {}
    check_deadline(opts, 3) -- blames the caller of moonlet.app
    return setmetatable({ router = router_mod.new(), middleware = {}, opts = opts }, mt)
end

function _M.is_app(v)
    return getmetatable(v) == mt
end

-- A route's options: { deadline = seconds } replaces the app's deadline for the requests it
-- serves. The handler is registered through a wrapper of its own, so that the same function can
-- have other deadlines on other routes; the dispatcher finds the deadline by the wrapper.
local function with_opts(app, handler, opts)
    local d = check_deadline(opts, 3)
    if not d then return handler end
    local h = function(req, res) return handler(req, res) end
    app.deadlines = app.deadlines or {}
    app.deadlines[h] = d
    return h
end

-- opts.name names the route for app:url_for (Flask's endpoint, aiohttp's name=); a name is given
-- once per app (the same pattern may be named again under the same name: a route per method)
-- (checked before the route is added, recorded once it was: a refused route leaves no name)
local function check_name(app, pattern, opts, level)
    local name = opts and opts.name
    if name == nil then return nil end
    if type(name) ~= "string" or name == "" then
        error("moonlet: a route name is a non-empty string", level + 1)
    end
    local had = app.names and app.names[name]
    if had and had ~= pattern then
        error(("moonlet: the route name %q is taken by %s"):format(name, had), level + 1)
    end
    return name
end

local function set_name(app, name, pattern)
    if not name then return end
    app.names = app.names or {}
    app.names[name] = pattern
end

-- syntax: app:route(method_or_methods, pattern, handler, opts)
function methods:route(method, pattern, handler, opts)
    local name = check_name(self, pattern, opts, 2)
    handler = with_opts(self, handler, opts)
    if type(method) == "table" then
        for _, m in ipairs(method) do self.router:add(m:upper(), pattern, handler) end
    else
        self.router:add(method == "*" and "*" or method:upper(), pattern, handler)
    end
    set_name(self, name, pattern)
    return self
end

for _, m in ipairs({ "get", "post", "put", "patch", "delete", "head", "options" }) do
    local upper = m:upper()
    -- syntax: app:get(pattern, handler, opts), app:post(...), ... -- opts: { deadline = seconds }
    methods[m] = function(self, pattern, handler, opts)
        local name = check_name(self, pattern, opts, 2)
        self.router:add(upper, pattern, with_opts(self, handler, opts))
        set_name(self, name, pattern)
        return self
    end
end

-- syntax: app:any(pattern, handler, opts) -- every method
function methods:any(pattern, handler, opts)
    local name = check_name(self, pattern, opts, 2)
    self.router:add("*", pattern, with_opts(self, handler, opts))
    set_name(self, name, pattern)
    return self
end

-- syntax: app:websocket(pattern, function(ws, req) ... end, opts) -- a WebSocket endpoint (GET with
-- the upgrade handshake; other GETs get 426); see docs/websocket.md for opts and the ws object
function methods:websocket(pattern, handler, opts)
    local name = check_name(self, pattern, opts, 2)
    local h = require("moonlet.ws").route(handler, opts)
    self.deadlines = self.deadlines or {}
    self.deadlines[h] = false -- a session outlives any request deadline
    self.router:add("GET", pattern, h)
    set_name(self, name, pattern)
    return self
end

-- The pattern a route name stands for, with the prefix of the mounts on the way: this app's own
-- names first, then "mount.rest" (rest looked up in the app mounted under the name mount, as
-- Flask's "blueprint.endpoint"), then its mounted apps' (in the order they were mounted), depth
-- first.
local function find_name(app, name, seen)
    local p = app.names and app.names[name]
    if p then return p end
    local ns, rest = str_match(name, "^([^.]+)%.(.+)$")
    local named = ns and app.mount_names and app.mount_names[ns]
    if named then
        p = find_name(named.app, rest)
        if p then return named.prefix .. p end
    end
    seen = seen or {}
    seen[app] = true
    local list = {}
    for _, m in pairs(app.mounts or {}) do list[#list + 1] = m end
    table.sort(list, function(a, b) return a.order < b.order end)
    for _, m in ipairs(list) do
        if not seen[m.app] then
            p = find_name(m.app, name, seen)
            if p then return m.prefix .. p end
        end
    end
    return nil
end

-- syntax: path = app:url_for(name, params, query) -- the path of the route named name (opts.name),
-- its :params and *splat filled in from params (percent-encoded; a splat keeps its slashes), query
-- (a table) appended as ?k=v&... (keys sorted; a list repeats its key). A name found in a mounted
-- app gets the mount's prefix. A name no route has, or a parameter missing, raises.
function methods:url_for(name, params, query)
    local pattern = find_name(self, name)
    if not pattern then error(("moonlet: no route is named %q"):format(tostring(name)), 2) end
    params = params or {}
    local segs = {}
    for seg in pattern:gmatch("/([^/]*)") do
        local c = str_sub(seg, 1, 1)
        if c == ":" or c == "*" then
            local key = str_sub(seg, 2)
            if c == "*" and key == "" then key = "splat" end
            local v = params[key]
            if v == nil then
                error(("moonlet: url_for(%q) wants a value for %s"):format(name, key), 2)
            end
            v = url.value_string(v)
            -- a segment "." or ".." would be taken out of the path by clients and proxies on the
            -- way, and an empty one matches no :param
            local function bad(part)
                if part == "." or part == ".." or (c == ":" and part == "") then
                    error(("moonlet: url_for(%q): %s cannot be %q"):format(name, key, v), 3)
                end
                return url.escape(part)
            end
            if c == ":" then
                seg = bad(v)
            else
                local parts = {}
                for part in (v .. "/"):gmatch("([^/]*)/") do parts[#parts + 1] = bad(part) end
                seg = table.concat(parts, "/")
            end
        end
        segs[#segs + 1] = seg
    end
    local path = "/" .. table.concat(segs, "/")
    if query ~= nil and type(query) ~= "table" then
        error("moonlet: url_for's query is a table", 2)
    end
    if query and next(query) then
        local qs = url.encode_query(query)
        if qs ~= "" then path = path .. "?" .. qs end
    end
    return path
end

-- syntax: app:use(function(req, res, next) ... return next() end) -- wraps every handler, 404s too;
-- next() runs the rest of the chain and returns the body (its status and headers are already on res)
function methods:use(fn)
    if type(fn) ~= "function" then error("moonlet: middleware is a function", 2) end
    self.middleware[#self.middleware + 1] = fn
    return self
end

-- syntax: app:static(prefix, dir, opts) -- serves files under dir at prefix (GET and HEAD); a
-- relative dir is taken from the current directory, else from the calling script's directory
function methods:static(prefix, dir, opts)
    -- the calling file's directory; after a tail call (`return app:static(...)` ends a script) the
    -- caller's frame is gone, and the script being loaded (reload.lua sets script_dir) stands in
    local src = debug.getinfo(2, "S").source
    local base = _M.script_dir
    if str_sub(src, 1, 1) == "@" then base = src:match("^@(.*)/[^/]*$") or "." end
    local handler = require("moonlet.static").handler(dir, opts, base)
    prefix = prefix:gsub("/+$", "")
    self.router:add("GET", prefix .. "/*path", handler)
    return self
end

-- syntax: app:mount(prefix, sub, { name = "admin" }) -- opts.name: url_for("admin.route") names
-- the route "route" of sub (and of no other mount), whatever this app's other mounts call theirs.
-- syntax: app:mount(prefix, sub) -- serves the app `sub` under prefix (aiohttp's add_subapp, Flask's
-- blueprints, Express's app.use(path, router)): a request for prefix or below runs this app's
-- middleware, then sub's, then the route of sub that matches the path with prefix taken off (404,
-- 405 and static files of sub included); req.path stays whole and req.prefix is the prefix. A
-- literal route of this app under prefix wins over the mount, a pattern route if added before it.
-- Resolved per request by resolve_mounts below; sub may itself mount others and serve on its own.
local mount_handler = function() error("moonlet: a mount is not called", 2) end

function methods:mount(prefix, sub, opts)
    if type(prefix) ~= "string" or str_sub(prefix, 1, 1) ~= "/" then
        error("moonlet: a mount prefix starts with /: " .. tostring(prefix), 2)
    end
    if opts ~= nil and type(opts) ~= "table" then error("moonlet: app:mount's opts is a table", 2) end
    local name = opts and opts.name
    if name ~= nil then
        if type(name) ~= "string" or not str_find(name, "^[^.]+$") then
            error("moonlet: a mount name is a non-empty string without a dot", 2)
        end
        if self.mount_names and self.mount_names[name] then
            error(("moonlet: the mount name %q is taken"):format(name), 2)
        end
    end
    if str_find(prefix, "[:*]") then -- the prefix is taken off the path as it is written
        error("moonlet: a mount prefix is a literal path, without :param or *: " .. prefix, 2)
    end
    if not _M.is_app(sub) then error("moonlet: app:mount wants an app made by moonlet.app()", 2) end
    local function reaches(a) -- whether a is self or mounts it somewhere below: a cycle
        if a == self then return true end
        for _, m in pairs(a.mounts or {}) do if reaches(m.app) then return true end end
        return false
    end
    if reaches(sub) then error("moonlet: app:mount would make a cycle of apps", 2) end
    prefix = prefix:gsub("/+$", "")
    local h = function(...) return mount_handler(...) end -- one per mount: its key in self.mounts
    self.mounts = self.mounts or {}
    self.mount_count = (self.mount_count or 0) + 1
    self.mounts[h] = { prefix = prefix, app = sub, chains = setmetatable({}, { __mode = "k" }),
                       order = self.mount_count }
    if name then
        self.mount_names = self.mount_names or {}
        self.mount_names[name] = self.mounts[h]
    end
    if prefix ~= "" then self.router:add("*", prefix, h) end
    self.router:add("*", prefix .. "/*", h)
    return self
end

-- syntax: app:on_error(function(req, res, err) return status, body end) -- custom 500 page
function methods:on_error(fn)
    self.error_handler = fn
    return self
end

-- syntax: app:on_shutdown(function() ... end) -- runs when a graceful stop has drained this app's
-- servers, if it serves then (lua/moonlet/shutdown.lua); hooks of mounted apps run too
function methods:on_shutdown(fn)
    if type(fn) ~= "function" then error("moonlet: a shutdown hook is a function", 2) end
    self.shutdown_hooks = self.shutdown_hooks or {}
    self.shutdown_hooks[#self.shutdown_hooks + 1] = fn
    return self
end

-- syntax: app:on_reload(function(old_state) ... end) -- when this app replaces an older one (hot
-- reload: lua/moonlet/reload.lua), fn gets the old app's app.state before the swap; an error in fn
-- fails the reload and the old app goes on serving
function methods:on_reload(fn)
    if type(fn) ~= "function" then error("moonlet: on_reload wants a function", 2) end
    self.reload_handler = fn
    return self
end

local function not_found()
    return 404, "404 Not Found\n"
end

-- Folds `status, body, headers` into res and returns the body, so that a middleware's
-- `local r = next() ... return r` passes the whole response on.
local function fold(res, a, b, c)
    if type(a) ~= "number" then return a end
    res._status = a
    if c then
        for k, v in pairs(c) do res:header(k, v) end
    end
    return b
end

local run_chain

-- The middleware chain of a request runs over a chain state st = { middleware, req, res, handler,
-- id = request, nexts = { [i] = the next() of level i } }, one per app and (pooled)
-- task, made on the task's first request and reused by every later one, next() closures included:
-- a request makes nothing for its chain. (LuaJIT does not compile the making of a closure, FNEW: in
-- the dispatcher's own code it aborted the trace on every request until LuaJIT blacklisted it and
-- left the whole request to the interpreter; made per request from C, core.call_unrecorded, it
-- still cost a tenth of a request.) So a next() is the same function in every request of its task,
-- and checks by itself that it may run: only while a request of its task runs, and only from a
-- task that works for that request (the request's own, or one started from it, as in
-- moonlet.timeout(1, next)). Kept and called when its task serves no request, or from a task of
-- another request (or of none), it raises: it never runs another request's chain. What it cannot
-- tell is a later request of its own task: there it is that request's next(), which only that
-- request's own code can reach. (Both checks are loads: no C call, which would end the JIT trace
-- inside the chain.)
local function make_next(st, i)
    return function()
        local res = st[3]
        if not res then error("moonlet: next() called after its request ended", 2) end
        if running_request[0] ~= st.id then
            error("moonlet: next() called from outside its request", 2)
        end
        return fold(res, run_chain(st, i + 1))
    end
end

local function new_next(st, i)
    local f = make_next(st, i)
    st.nexts[i] = f
    return f
end

function run_chain(st, i)
    local f = st[1][i]
    if not f then return st[4](st[2], st[3]) end
    return f(st[2], st[3], st.nexts[i] or call_unrecorded(new_next, st, i))
end

-- (Level 1: this handler tail-calls traceback, so its level 1 is where the error was raised: the
-- function of a runtime error, or error()'s [C] frame above its caller. Level 2 left a runtime
-- error's own function out. The handlers of task.lua, tcp.lua and ws.lua are alike.)
local BODY_GONE = request.BODY_GONE
local function body_gone(err) return type(err) == "string" and str_find(err, BODY_GONE, 1, true) end

local function on_error(err)
    if is_abort(err) or err == CANCELLED or body_gone(err) then return err end
    return traceback(tostring(err), 1)
end

-- The deadline's watchdog: a task that sleeps until the deadline and then cancels the request's
-- task `co` (which raises moonlet.CANCELLED where it waits: a socket, the HTTP client, DNS, the
-- thread pool, a file, a gather whose children are cancelled with it). When the request ends
-- first, the dispatcher cancels the watchdog instead. w.fired tells the two apart. The watchdog
-- only runs while the request's task is parked, so core.cancel(co) always finds it waiting.
local function watch(w, co, secs)
    if core_sleep(secs) == CANCEL then return end
    w.fired = true
    w.co = nil
    core_cancel(co)
end

local function start_watchdog(secs)
    local w = { fired = false, secs = secs }
    w.co = core_spawn(watch, w, core_running(), secs)
    return w
end

local function stop_watchdog(w)
    local co = w.co
    w.co = nil
    if co then core_cancel(co) end
end

-- syntax: app.lift_deadline(res) -- the request of res is no longer bounded by its deadline (res:sse:
-- a stream lives as long as its client, as a WebSocket session does). Its watchdog is stopped;
-- the dispatcher's stop_watchdog at the end then finds nothing to stop.
function _M.lift_deadline(res)
    local w = rawget(res, "_watchdog")
    if w then
        res._watchdog = nil
        stop_watchdog(w)
    end
end

local function fail(app, req, res, err, w)
    local x = res._x
    local z = res._deflater -- a gzip stream's zlib state (~260 KiB outside Lua's heap): freed now,
    if z then               -- not when the collector happens to take its small userdata
        res._deflater = nil
        z:close()
    end
    if err == CANCELLED then -- the deadline passed, or the client went away (bindings/http_server.c)
        if not (w and w.fired) then return x:abort() end
        core.log(1, req.method .. " " .. req.target .. ": the deadline of " .. w.secs ..
                    " s passed; the request was cancelled")
        if res._streaming or x:started() then return x:set_close() end
        x:set_close()
        return x:respond(504, "504 Gateway Timeout\n", "text/plain; charset=utf-8", always_headers(res))
    end
    if body_gone(err) then -- the client's doing: answered (400, 408: that answer still goes out)
        core.log(2, req.method .. " " .. req.target .. ": " .. err) -- or gone already
        if not x:started() then return x:abort() end
        return
    end
    if is_abort(err) then
        if res._streaming then return end
        local ok, e = pcall(send, res, err.status, err.body, err.headers)
        if ok then return e end
        err = tostring(e) -- (a body JSON cannot encode): an error like any other, below
    end
    local id = rawget(req, "id") -- (moonlet.request_id's)
    core.log(0, (id and "[" .. tostring(id) .. "] " or "") .. req.method .. " " .. req.target .. ": " .. err)
    if res._streaming or x:started() then return end -- the C side closes a broken stream
    if app.error_handler then
        local ok, status, body = pcall(app.error_handler, req, res, err)
        if ok and status then
            return x:respond(status, body or "", "text/plain; charset=utf-8", always_headers(res))
        end
    end
    x:set_close()
    return x:respond(500, "500 Internal Server Error\n", "text/plain; charset=utf-8", always_headers(res))
end

-- The middleware of this app and then of the mounted one, as one list; rebuilt when either grew
-- (app:use after app:mount), else the same list for every request through that mount. Kept per
-- outer list: an app mounted in two places reaches its mounts with two.
local function mount_chain(m, outer)
    local inner = m.app.middleware
    local c = m.chains[outer]
    if not c or c.n_outer ~= #outer or c.n_inner ~= #inner then
        local list = {}
        for i = 1, #outer do list[i] = outer[i] end
        for i = 1, #inner do list[#outer + i] = inner[i] end
        c = { n_outer = #outer, n_inner = #inner, list = list }
        m.chains[outer] = c
    end
    return c.list
end

-- A route that is a mount (app:mount) routes again in the mounted app, with the prefix taken off
-- the raw path, down to the app that has the route; returns what the dispatcher needs of it: the
-- handler, params and Allow, the middleware to run, the app whose route it is (for its deadlines),
-- the app whose on_error serves, the deadline and the prefix.
-- (the apps and paths a request went through, for a 404/405's Allow: one list for every request,
-- refilled each time; resolve_mounts never waits, so no two requests use it at once)
local passed = {}

-- The raw path after its first n segments: "/x/y" of "/a/b/x/y" for n = 2, "" when it has no more.
-- (A prefix the client percent-encoded, "/donn%C3%A9es/x" for the mount "/données", is as many
-- segments as the prefix, the router having compared them decoded.)
local function after_segments(path, n)
    local pos = 1
    for _ = 1, n do
        pos = str_find(path, "/", pos + 1, true)
        if not pos then return "" end
    end
    return str_sub(path, pos)
end

local function resolve_mounts(app, method, path, handler, mw, secs)
    local owner, err_app, prefix, params, allow = app, app, "", nil, nil
    local npassed = 0
    while true do
        local m = owner.mounts and owner.mounts[handler]
        if not m then break end
        passed[npassed + 1], passed[npassed + 2] = owner, path
        npassed = npassed + 2
        prefix = prefix .. m.prefix
        -- the rest of the path, raw; the route matched either the prefix as written or, compared
        -- decoded, its segments encoded (then the rest follows as many segments; none when an
        -- exact path encoded the whole prefix, %2F and all: then the rest is "/")
        local n = #m.prefix
        if str_sub(path, 1, n) == m.prefix then
            path = str_sub(path, n + 1)
        else
            local _, nsegs = str_gsub(m.prefix, "/", "/")
            path = after_segments(path, nsegs)
        end
        if path == "" then path = "/" end
        mw = mount_chain(m, mw)
        owner = m.app
        if owner.opts.deadline then secs = owner.opts.deadline end
        if owner.error_handler then err_app = owner end
        handler, params, allow = owner.router:match(method, path)
    end
    if not handler then -- a 404 or 405 inside: the routes outside for the path have their say
        for i = 1, npassed, 2 do
            local a = passed[i]
            allow = a.router:allow(passed[i + 1], a.mounts, allow)
        end
    end
    return handler, params, allow, mw, owner, err_app, secs, prefix
end

-- The function the C server runs for each request: dispatch(exchange, method, target, the
-- request's task's coroutine); core.running_request holds the request's id meanwhile.
-- A deadline (the route's, else the app's) bounds the whole request, middleware included: when it
-- passes, every wait the request's task (and the children of its gathers) is in is cancelled, and
-- the client gets 504 unless the response had started (then the connection is closed).
function methods:dispatcher()
    local router, top_mw = self.router, self.middleware
    local app = self
    local app_deadline = self.opts.deadline
    local chains = setmetatable({}, { __mode = "k" }) -- task coroutine -> its chain state
    return function(x, method, target, co)
        local path, query = target, nil
        local h = str_find(target, "#", 1, true) -- a fragment no client should send: dropped (nginx)
        if h then path = str_sub(target, 1, h - 1) end
        local q = str_find(path, "?", 1, true)
        if q then
            path, query = str_sub(path, 1, q - 1), str_sub(path, q + 1)
        end
        if str_sub(path, 1, 1) ~= "/" then -- absolute-form or "*"
            local p = path:match("^%a[%w+.-]*://[^/]*(/.*)$")
            path = p or "/"
        end
        local handler, params, allow = router:match(method, path)
        local mw, owner, err_app, secs, prefix = top_mw, app, app, app_deadline, ""
        local mounts = app.mounts
        if mounts and mounts[handler] then
            handler, params, allow, mw, owner, err_app, secs, prefix =
                resolve_mounts(app, method, path, handler, mw, secs)
        end
        local decoded = path
        if str_find(path, "%", 1, true) then decoded = unescape(path) end
        local req = setmetatable({ method = method, path = decoded, target = target,
                                   query_string = query, params = params, prefix = prefix,
                                   _x = x, _app = owner }, req_mt)
        -- false, not nil: the table is made with room for the fields res:header() and res:type()
        -- set, so that setting them does not rehash it (the C side takes false as none)
        local res = setmetatable({ _x = x, _status = 200, _headers = false, _ctype = false,
                                   _file = false }, res_mt)
        if not handler then
            if allow then
                handler = function(_, r)
                    r:header("Allow", allow)
                    return 405, "405 Method Not Allowed\n"
                end
            else
                handler = not_found
            end
        end
        local deadlines = owner.deadlines
        if deadlines then
            local d = deadlines[handler]
            if d ~= nil then secs = d end
        end
        local w
        if secs then
            w = start_watchdog(secs)
            res._watchdog = w -- (for lift_deadline)
        end
        local ok, a, b, c
        if mw[1] then
            local st = chains[co]
            if not st or st[3] then -- none yet, or a dispatch inside one of this task's requests
                local first = not st
                st = { mw, false, false, false, id = 0, nexts = {} }
                if first then chains[co] = st end -- (the nested one gets a state of its own)
            end
            st[1], st[2], st[3], st[4], st.id = mw, req, res, handler, running_request[0]
            ok, a, b, c = xpcall(run_chain, on_error, st, 1)
            st[2], st[3], st[4] = false, false, false
        else
            ok, a, b, c = xpcall(handler, on_error, req, res)
        end
        if ok then
            ok, a = xpcall(send, on_error, res, a, b, c)
        end
        if w then stop_watchdog(w) end
        if ok then return end
        return fail(err_app, req, res, a, w)
    end
end

-- syntax: server, port = app:listen({ host = "127.0.0.1", port = 8080, max_body = ..., ... })
--         server = app:listen({ unix = "/run/app.sock" }) -- or host = "unix:/run/app.sock": a Unix
-- domain socket (behind nginx's proxy_pass http://unix:/run/app.sock:); port is then 0. A stale
-- socket file is replaced, a live server's is not ("address in use"); the file goes at close.
-- unix_mode = "660": its permissions (the owner and its group, nginx's user among them, may
-- connect; by default what the umask leaves, usually the owner only).
-- The limits of app:listen an app may carry as its own defaults (moonlet.app{ max_body = ... }).
-- They go to core.listen as opts.defaults, under what listen's own options, the command line and an
-- embedding host's cfg.limits give (bindings/http_server.c read_limits). They are read when a server
-- starts listening: a reloaded app's new limits apply to the next server, not to this one.
local LISTEN_DEFAULTS = {
    "max_body", "max_uri", "max_header_bytes", "max_headers", "max_conns", "keepalive_requests",
    "header_timeout", "body_timeout", "keepalive_timeout", "send_timeout", "shutdown_grace",
}
local LISTEN_DEFAULT_SET = {}
for _, k in ipairs(LISTEN_DEFAULTS) do LISTEN_DEFAULT_SET[k] = true end

local LISTEN_OWN = { host = true, port = true, backlog = true, tls = true, check_client_abort = true,
                     unix = true, unix_mode = true }

-- Hot reload (lua/moonlet/reload.lua): while a reload's top level runs, _M.reusable maps the
-- address of each server the old app listened with itself (app:listen in its top level, a port
-- given) to that server. An app:listen of the new code on the same address takes that server,
-- whose socket stays open (no connection refused, no "address in use"), rather than binding again;
-- the reloader gives it the new app's dispatcher when the new app takes over (app.adopted), and
-- shuts down the old app's servers the new code did not take. The new code's tls options are read
-- again into a new TLS context as it listens (the certificate files too, even at the same paths:
-- a renewed certificate), kept in _M.loading.tls until the new app serves, when it replaces the
-- server's (server:set_tls: the connections open keep theirs). A file that does not load raises,
-- so that the load fails and the old code goes on with the old certificate; tls given or dropped
-- makes the next connections HTTPS or plain HTTP.
_M.reusable = nil
local listen_keys = setmetatable({}, { __mode = "k" }) -- server -> its address, as listened on

-- syntax: ctx = app.server_tls(opts, where, level) -- a new TLS context of app:listen's opts.tls
-- (false without one) for server:set_tls; raises "WHERE: tls: cannot load certificate (FILE)" when
-- a file does not load, at level (nil: no position)
function _M.server_tls(opts, where, level)
    local ctx, err = core.server_tls(opts)
    if ctx == nil then
        error(("%s: %s"):format(where, require("moonlet.tcp").tls_failure(err, opts.tls)),
              level and level + 1 or 0)
    end
    return ctx
end

local function listen_key(opts)
    if opts.unix then return "unix:" .. opts.unix end
    local port = tonumber(opts.port)
    if not port or port == 0 then return nil end -- (port 0: any port, nothing to take over)
    return tostring(opts.host or "") .. ":" .. port
end

-- syntax: key = app.listen_key_of(server) -- the address app:listen opened server on, or nil (and
-- nil once it was closed: the new code's app:listen there opens a server of its own)
function _M.listen_key_of(server)
    return server:port() ~= nil and listen_keys[server] or nil
end

function methods:listen(given)
    local opts = {} -- a copy: the caller's table may serve another app next
    if given then for k, v in pairs(given) do opts[k] = v end end
    for k in pairs(opts) do -- a misspelt option is said, not silently left out
        if not LISTEN_OWN[k] and not LISTEN_DEFAULT_SET[k] then
            core.log(1, "app:listen: unknown option " .. tostring(k) .. " (ignored)")
        end
    end
    local host = opts.host
    if type(host) == "string" and host:sub(1, 5) == "unix:" then -- nginx's listen unix:/path
        opts.unix, opts.host, host = host:sub(6), nil, nil
    end
    if opts.unix ~= nil and (type(opts.unix) ~= "string" or opts.unix == "") then
        error("app:listen: unix must be a socket path", 2)
    end
    if opts.unix_mode ~= nil then -- (moonlet.tcp loaded only then: a server that never opens a socket
        opts.unix_mode = require("moonlet.tcp").unix_mode(opts.unix_mode, 2) -- of its own lacks it)
    end
    if type(host) == "string" and not host:find("^[%d.]+$") and not host:find(":", 1, true) then
        -- a name ("localhost"): its first address, looked up through the loop (moonlet.dns)
        local addrs, err = require("moonlet.dns").resolve(host)
        if not addrs then return nil, ("listen on %s: %s"):format(host, tostring(err)) end
        opts.host = addrs[1]
    end
    local defaults
    for _, k in ipairs(LISTEN_DEFAULTS) do
        local v = self.opts[k]
        if v ~= nil then
            defaults = defaults or {}
            defaults[k] = v
        end
    end
    opts.defaults = defaults
    if opts.check_client_abort == nil then opts.check_client_abort = self.opts.check_client_abort end
    local key = listen_key(opts)
    local reusable = key and _M.reusable
    local server = reusable and reusable[key]
    local port
    if server then
        local ctx = _M.server_tls(opts, "app:listen on " .. key, 2)
        local load = _M.loading
        if load then load.tls[server] = ctx end
        reusable[key] = nil
        self.adopted = self.adopted or {}
        self.adopted[server] = true
        port = server:port()
    else
        server, port = core.listen(opts, self:dispatcher())
        if not server then return nil, port end
        local load = _M.loading -- (a reload's: closed if the load fails)
        if load then load.opened[#load.opened + 1] = server end
    end
    listen_keys[server] = key
    self.servers = self.servers or {}
    self.servers[#self.servers + 1] = server
    require("moonlet.shutdown").serve(self)
    return server, port
end

return _M
