-- lua/moonlet/reload.lua: hot reload. An app's code is a replaceable value, not the process: a
-- reload host runs the app's source (a file, or a string for firmware without a file system) into
-- a fresh app, and only when that source loaded and its top level ran without error does the new
-- app replace the old one on every server the host listens with (server:set_handler: requests in
-- flight finish on the code they started with, the next ones get the new code). A failed reload
-- changes nothing and logs the error with its file and line.
--
-- The modules the app required from its own directory (and below) are part of the app: a reload
-- clears them from package.loaded so that the new code requires fresh copies (they come back if the
-- new code fails), and the watcher watches their files too. The framework (moonlet, moonlet.*) is
-- never reloaded. A module the app requires later (in a handler, in a task) is recorded when it is
-- first found: a searcher in package.loaders, just after package.preload's, sees every module
-- require finds in no table (a require of a loaded module stays a table lookup), adds it to the
-- hosts whose directory holds it and grows their watch list. A reload requires such a module again
-- after the new top level ran, so that a broken edit of it fails the reload as one of the app does.
--
-- TLS certificates are read again by each load, as nginx -s reload does: the servers the app
-- takes over (app.lua, tcp.lua) and the host's own (host:listen, the command line's --tls-cert)
-- get a new context made during the load (a file that does not load fails it), swapped in by
-- install when the new app serves; open connections keep the session and context they have. The
-- client side too: the new code starts with an empty cache of client contexts (sock:tls's cert,
-- key and cafile, moonlet.http's, moonlet.proxy's), given back to the old code if the load fails.
--
-- State across a reload: the old app's `app.state` (whatever table the app keeps there) is handed
-- to the new app's app:on_reload(function(old_state) ... end) before the swap; an error there fails
-- the reload like any other.
--
-- One host per instance is "current" (reload.set_current): SIGHUP and moonlet_reload() reload it;
-- the instance_* functions are what bindings/embed.c calls for moonlet_load_*, moonlet_listen(_unix)
-- and moonlet_reload. Module state lives in the instance's own Lua state, so instances share nothing.
local core = require "moonlet.core"
local app_mod = require "moonlet.app"
local task = require "moonlet.task"

local is_app = app_mod.is_app
local now, log = core.now, core.log
local ipairs, pairs, setmetatable = ipairs, pairs, setmetatable
local tonumber, tostring, type = tonumber, tostring, type
local xpcall, traceback, unpack = xpcall, debug.traceback, unpack
local str_sub, str_find, str_format = string.sub, string.find, string.format
local sort, tinsert = table.sort, table.insert
local next = next

local _M = {}
local methods = {}
local mt = { __name = "moonlet.reload", __index = methods }

local current         -- the instance's host (reload.set_current)
local path_users = {} -- package.path entry added for an app directory -> hosts using it
local open_hosts = setmetatable({}, { __mode = "k" }) -- host -> true, until host:close()
local add_searcher    -- (defined with the watcher, below)
local host_tls        -- (defined with build, below)

local function dirname(path)
    return path:match("^(.*)/[^/]*$") or "."
end

local function path_entry(dir)
    return dir .. "/?.lua;" .. dir .. "/?/init.lua"
end

-- The app's directory goes at the end of package.path (it never shadows the framework), so that
-- the app finds the modules next to it wherever moonlet was started.
local function add_path(dir)
    local n = path_users[dir]
    if n then
        path_users[dir] = n + 1
        return
    end
    path_users[dir] = 1
    local entry = path_entry(dir)
    if not str_find(";" .. package.path .. ";", ";" .. entry .. ";", 1, true) then
        package.path = package.path .. ";" .. entry
        path_users[dir] = -1 -- negative: we added the entry (and remove it with the last user)
    end
end

local function drop_path(dir)
    local n = path_users[dir]
    if not n then return end
    if n == 1 or n == -1 then
        path_users[dir] = nil
        if n == -1 then
            local entry = path_entry(dir)
            local s, e = str_find(package.path, ";" .. entry, 1, true)
            if s then package.path = str_sub(package.path, 1, s - 1) .. str_sub(package.path, e + 1) end
        end
    else
        path_users[dir] = n > 0 and n - 1 or n + 1
    end
end

-- syntax: host = reload.new({ path = "app.lua", args = { ... }, debounce = 0.05 })
-- syntax: host = reload.new({ code = "...", name = "firmware" })
function _M.new(opts)
    if type(opts) ~= "table" or (type(opts.path) ~= "string" and type(opts.code) ~= "string") then
        error("moonlet.reload.new: wants { path = file } or { code = string }", 2)
    end
    local self = setmetatable({
        servers = {}, listen_opts = setmetatable({}, { __mode = "k" }), own = {}, tcp_own = {},
        udp_own = {}, modules = {}, lazy = {}, files = {},
        args = opts.args or {},
        debounce = opts.debounce or 0.05, reloads = 0,
    }, mt)
    self:set_source(opts)
    open_hosts[self] = true
    add_searcher()
    return self
end

-- syntax: host:set_source({ path = ... } or { code = ..., name = ... }) -- what the next load runs
function methods:set_source(opts)
    if self.dir then drop_path(self.dir) end
    self.dir, self.realpath = nil, nil
    if opts.path then
        self.path, self.code, self.name = opts.path, nil, nil
        self.dir = core.realpath(dirname(opts.path)) or dirname(opts.path)
        self.realpath = self.dir .. "/" .. opts.path:match("([^/]*)$")
        add_path(self.dir)
    else
        local name = opts.name or "string"
        self.path, self.code = nil, opts.code
        self.name = (str_find(name, "^[=@]") and name) or "=" .. name
    end
    self.files = {}
    self.lazy = {}
end

function methods:label()
    return self.path or str_sub(self.name, 2)
end

-- The real path of module `name` when it is the app's (under the app's directory), else nil.
-- Cached by name: require resolves a name the same way each time.
function methods:module_file(name)
    if not self.dir then return nil end
    local f = self.files[name]
    if f == nil then
        f = false
        if name ~= "moonlet" and str_sub(name, 1, 8) ~= "moonlet." then
            local found = package.searchpath(name, package.path)
            local real = found and core.realpath(found)
            if real and str_sub(real, 1, #self.dir + 1) == self.dir .. "/" then f = real end
        end
        self.files[name] = f
    end
    return f or nil
end

-- The error handler of the app's top level: the traceback stops where the app's code was called,
-- so the log shows the app's frames, not the reloader's.
local function app_traceback(e)
    local tb = traceback(tostring(e), 2) -- (1 would be this function: not a tail call)
    local cut = str_find(tb, "\n\t%[C%]: in function 'xpcall'")
    return cut and str_sub(tb, 1, cut - 1) or tb
end

-- Closes servers (an HTTP server lets the requests it has finish; moonlet.tcp's stops accepting)
-- and UDP sockets.
local function close_servers(list)
    for i = 1, #list do
        local s = list[i]
        if s.shutdown then s:shutdown() else s:close() end
    end
end

local function compile(self)
    if self.path then
        local chunk, err = loadfile(self.path)
        if chunk then return chunk end
        local f = io.open(self.path, "rb")
        if f then f:close() end
        return nil, f and "error" or "notfound", err
    end
    local chunk, err = loadstring(self.code, self.name)
    if chunk then return chunk end
    return nil, "error", err
end

-- The TLS contexts of the servers host:listen opened with tls options (the command line's
-- --tls-cert, --tls-key, --tls-client-ca), made again from their files into out[server] for install
-- to swap in: a reload rotates the certificate as nginx -s reload does. Raises "https on ADDRESS:
-- tls: cannot load certificate (FILE)" when one does not load, which fails the load.
function host_tls(self, out)
    for i = 1, #self.servers do
        local s = self.servers[i]
        local opts = self.listen_opts[s]
        local port = opts and opts.tls and s:port()
        if port then
            local h = tostring(opts.host or "127.0.0.1")
            local where = opts.unix and "https on unix:" .. opts.unix
                or str_find(h, "unix:", 1, true) == 1 and "https on " .. h
                or str_format("https on %s:%d", h, port)
            out[s] = app_mod.server_tls(opts, where)
        end
    end
end

-- Runs the source into a new app. Returns the app, or nil, kind ("notfound", "error", "noapp"),
-- message. package.loaded is left as the old code had it unless an app is returned.
local function build(self)
    self.closed_loading = nil
    local chunk, kind, err = compile(self)
    if not chunk then return nil, kind, err end
    local loaded = package.loaded
    local saved = {}
    for name in pairs(loaded) do
        if self:module_file(name) then saved[name] = loaded[name] end
    end
    for name in pairs(saved) do loaded[name] = nil end
    local args = self.args
    -- the script's directory, for app:static's relative roots while the script runs
    local outer_dir = app_mod.script_dir
    if self.path then app_mod.script_dir = self.path:match("^(.*)/[^/]*$") or "." end
    local shutdown = require "moonlet.shutdown"
    local prev_load = shutdown.begin_load(self) -- its moonlet.on_shutdown's: kept if it serves
    -- the tasks this load starts (its top level's moonlet.spawn, ngx.timer, and what they spawn):
    -- stopped when the next load takes over, or now if this one fails (install, below)
    local tasks = setmetatable({}, { __mode = "k" })
    local co = core.running()
    local prev_owner = co and task.own(co, tasks)
    local missing = {}
    self.missing_now = missing -- (app_searcher: the app modules require finds nowhere)
    -- the servers the app being served listened with itself, for the new code's app:listen on the
    -- same address to take over (lua/moonlet/app.lua listen)
    local outer_reusable = app_mod.reusable
    local reusable = {}
    for i = 1, #self.own do
        local s = self.own[i]
        local key = app_mod.listen_key_of(s)
        if key then reusable[key] = s end
    end
    app_mod.reusable = reusable
    -- and the servers of moonlet.tcp.listen and sockets of moonlet.udp.bind alike (tcp.lua and
    -- udp.lua, "Hot reload"); the servers and sockets this load opens are closed if it fails
    local outer_loading = app_mod.loading
    local loading = { reusable = {}, taken = {}, own = {}, opened = {}, udp_reusable = {},
                      udp_own = {}, tls = {} }
    local tcp, udp = package.loaded["moonlet.tcp"], package.loaded["moonlet.udp"]
    for i = 1, #self.tcp_own do
        local s = self.tcp_own[i]
        local key = tcp and tcp.listen_key_of(s)
        if key then loading.reusable[key] = s end -- (nil for one the old code closed)
    end
    for i = 1, #self.udp_own do
        local u = self.udp_own[i]
        local key = udp and udp.bind_key_of(u)
        if key then loading.udp_reusable[key] = u end
    end
    app_mod.loading = loading
    -- the client TLS contexts: made anew from their files by the new code (tcp.swap_tls_contexts)
    local old_contexts = tcp and tcp.swap_tls_contexts({})
    local ok, app = xpcall(chunk, app_traceback, unpack(args, 1, args.n or #args))
    -- the modules the old code required later (in a handler, a task), which the new top level did
    -- not: required again now, so that a broken edit of one keeps the old code as one of the app
    -- file does (a module whose file is gone is dropped)
    local lazy = {}
    if ok then
        local names = {}
        for name in pairs(self.lazy) do
            if saved[name] ~= nil then names[#names + 1] = name end
        end
        sort(names)
        for i = 1, #names do
            local name = names[i]
            if loaded[name] == nil and package.searchpath(name, package.path) then
                local ok2, e = xpcall(require, app_traceback, name)
                if not ok2 then
                    ok, app = false, e
                    break
                end
            end
            if loaded[name] ~= nil then lazy[name] = true end
        end
    end
    shutdown.end_load(prev_load)
    app_mod.reusable = outer_reusable
    app_mod.loading = outer_loading
    if co then task.own(co, prev_owner) end
    self.missing_now = nil
    self.missing = missing
    app_mod.script_dir = outer_dir
    local old = self.app
    if ok and not is_app(app) then
        if old then
            ok, app = false, self:label() .. ": did not return an app (moonlet.app())"
        else
            kind = "noapp"
        end
    end
    if ok and kind ~= "noapp" and old and app.reload_handler then
        local ok2, e = xpcall(app.reload_handler, app_traceback, old.state)
        if not ok2 then ok, app = false, "on_reload: " .. tostring(e) end
    end
    if ok then -- the host's servers (the command line's --tls-cert): their files read again
        local ok2, e = pcall(host_tls, self, loading.tls)
        if not ok2 then ok, app = false, e end
    end
    if ok and self.closed_loading then -- host:close() came while the top level waited: it undoes
        ok, app = false, self:label() .. ": the host was closed during the load" -- all of the load
    end
    local mods = {}
    for name in pairs(loaded) do
        local f = self:module_file(name)
        if f then mods[name] = f end
    end
    if not ok then
        task.cancel_owned(tasks)
        close_servers(loading.opened)
        if tcp then tcp.swap_tls_contexts(old_contexts) end
        shutdown.drop(self)
        for name in pairs(mods) do loaded[name] = nil end -- what the new code half loaded
        for name, v in pairs(saved) do loaded[name] = v end -- the old code keeps its modules
        return nil, "error", tostring(app)
    end
    self.modules = mods
    self.lazy = lazy
    if kind == "noapp" then
        shutdown.keep(self) -- a plain script: its hooks are those of its one load
        return nil, "noapp", self:label() .. ": returned no app"
    end
    return app, tasks, loading
end

-- The new app takes over every server, between two requests.
-- The old load's tasks are cancelled once the new app serves, except the ones the new app keeps in
-- a field of its app.state (handed over by its on_reload): those are the new load's from then on.
local function install(self, app, tasks, loading)
    local shutdown = require "moonlet.shutdown"
    shutdown.swap(self.app, app)      -- its app:on_shutdown hooks, not the old app's
    shutdown.keep(self)               -- and the moonlet.on_shutdown ones its load added
    self.app = app
    local old_tasks = self.tasks
    self.tasks = tasks
    if old_tasks then
        if type(app.state) == "table" then
            for _, v in pairs(app.state) do
                if old_tasks[v] then
                    old_tasks[v] = nil
                    tasks[v] = true
                    -- (an ended task's coroutine is back in the pool: it must own nothing)
                    if not v.done and v.co then task.own(v.co, tasks) end
                end
            end
        end
        task.cancel_owned(old_tasks)
    end
    -- the servers the new app listened with itself: the ones it took from the old app get its
    -- dispatcher now; the old app's own servers it did not take (a port the edit changed) stop
    -- taking connections, and those they hold finish (server:shutdown)
    local own = {} -- (a copy: host:listen adds the host's servers to app.servers)
    for i, srv in ipairs(app.servers or {}) do own[i] = srv end
    local old_own = self.own
    self.own = own
    local adopted = app.adopted or {}
    app.adopted = nil
    if own[1] then
        local dispatch = app:dispatcher()
        local tls = loading.tls
        for i = 1, #own do
            local s = own[i]
            if adopted[s] then
                if tls[s] ~= nil then s:set_tls(tls[s]) end -- (the certificate read by this load)
                s:set_handler(dispatch)
            end
        end
    end
    for i = 1, #old_own do
        if not adopted[old_own[i]] then old_own[i]:shutdown() end
    end
    -- and the servers of moonlet.tcp.listen: the ones the new code took run its handlers; the
    -- sockets of moonlet.udp.bind (the new code's on the same address have a socket of their own
    -- on the same descriptor); the others close, unless the new app.state keeps them (on_reload)
    local kept = {}
    if type(app.state) == "table" then
        for _, v in pairs(app.state) do kept[v] = true end
    end
    local old_tcp, old_udp = self.tcp_own, self.udp_own
    self.tcp_own, self.udp_own = loading.own, loading.udp_own
    local tcp = package.loaded["moonlet.tcp"]
    for i = 1, #old_tcp do
        local s = old_tcp[i]
        local taken = loading.taken[s]
        if taken then
            tcp.adopt(s, taken)
        elseif kept[s] then
            self.tcp_own[#self.tcp_own + 1] = s
        else
            s:close()
        end
    end
    for i = 1, #old_udp do
        local u = old_udp[i]
        if kept[u] then self.udp_own[#self.udp_own + 1] = u else u:close() end
    end
    local servers = self.servers
    if #servers == 0 then
        app.servers = own[1] and { unpack(own) } or nil -- (not own itself: see above)
        return
    end
    local dispatch = app:dispatcher()
    local alive = {}
    for i = 1, #servers do
        local s = servers[i]
        if loading.tls[s] then s:set_tls(loading.tls[s]) end -- (host_tls)
        if s:set_handler(dispatch) then alive[#alive + 1] = s end
    end
    self.servers = alive
    local all = {}
    for i = 1, #alive do all[i] = alive[i] end
    for i = 1, #own do all[#all + 1] = own[i] end
    app.servers = all
end

-- The files a change of which reloads the app: the script (and, when it is a symlink, the file it
-- points to now: an edit of the target changes no entry of the link's directory), its modules, and
-- where the modules the last load required but found nowhere would be (creating one reloads).
local function watch_list(self)
    local files, seen = {}, {}
    local function add(f)
        if f and not seen[f] then
            seen[f] = true
            files[#files + 1] = f
        end
    end
    add(self.realpath)
    add(core.realpath(self.path))
    for _, f in pairs(self.modules) do add(f) end
    for _, f in pairs(self.missing or {}) do add(f) end
    sort(files)
    return files
end

local function watch_files(self)
    local w = self.watcher
    if not w then return true end
    return w:set(watch_list(self))
end

-- The searcher that records the modules an app requires after its top level ran. require calls
-- it only for a module in no table and not preloaded; it finds nothing itself (package.loaders[3],
-- the Lua file searcher, loads the module), so it returns nothing and require goes on. A module
-- that fails to load is watched all the same: the edit that fixes it reloads the app.
local function app_searcher(name)
    if next(open_hosts) == nil then return end
    for host in pairs(open_hosts) do
        local missing = host.missing_now
        if missing and host.dir and name ~= "moonlet" and str_sub(name, 1, 8) ~= "moonlet."
            and not package.searchpath(name, package.path)
            and not package.searchpath(name, package.cpath) then
            -- a load requires a module that is nowhere (yet): where it would be next to the app
            local f = host.dir .. "/" .. name:gsub("%.", "/") .. ".lua"
            if core.realpath(dirname(f)) then missing[name] = f end
        end
        if not host.loading and host.app and not host.modules[name] then
            local f = host:module_file(name)
            if f then
                host.modules[name] = f
                host.lazy[name] = true
                if host.watcher then
                    local ok, err = watch_files(host)
                    if ok then
                        local n = #host:watched()
                        log(2, str_format("reload: watching %d file%s (%s required)", n,
                                          n == 1 and "" or "s", name))
                    else
                        log(1, "reload: cannot watch every file: " .. tostring(err))
                    end
                end
            end
        end
    end
end

-- Puts app_searcher just after package.preload's searcher, once per Lua state.
function add_searcher()
    local loaders = package.loaders
    for i = 1, #loaders do
        if loaders[i] == app_searcher then return end
    end
    tinsert(loaders, 2, app_searcher)
end

-- syntax: app, kind, err = host:load() -- runs the source (the first load and every reload): the
-- new app, or nil, "noapp" (the first load returned none), "notfound" or "error" (logged when an
-- older app goes on serving) and the message with file and line
function methods:load()
    if self.loading then -- a change during a load whose top level waits: once more after it
        self.again = true
        return nil, "busy", "a load is in progress"
    end
    local app, kind, err
    repeat
        self.again = false
        self.loading = true
        local t0 = now()
        local had = self.app ~= nil
        -- build catches the app's errors; one of its own (memory ran out) must not leave the host
        -- "loading" for good, refusing every later load as busy, nor leave moonlet.app's state of a
        -- load in progress behind (later listens would count as this dead load's)
        local outer_loading, outer_reusable = app_mod.loading, app_mod.reusable
        local ok, a, k, e = pcall(build, self)
        if ok then
            app, kind, err = a, k, e
        else
            app, kind, err = nil, "error", tostring(a)
            app_mod.loading, app_mod.reusable = outer_loading, outer_reusable
        end
        self.loading = false
        if app then
            install(self, app, kind, err)
            kind = nil
            if had then
                self.reloads = self.reloads + 1
                local n = 0
                for _ in pairs(self.modules) do n = n + 1 end
                log(2, str_format("reloaded %s (%d module%s) in %.1f ms", self:label(), n,
                                  n == 1 and "" or "s", (now() - t0) * 1000))
            end
            watch_files(self)
        elseif had and not self.closed_loading then
            log(0, "reload of " .. self:label() .. " failed, the old code goes on serving: " .. err)
            watch_files(self) -- (a module it wanted and did not find: its creation reloads)
        end
    until not self.again
    return app, kind, err
end

-- syntax: ok, err = host:reload() -- host:load() for an app already loaded: true, or nil, err
function methods:reload()
    local app, _, err = self:load()
    if app then return true end
    return nil, err
end

-- syntax: server, port = host:listen(opts) -- serves the current app (app:listen options)
function methods:listen(opts)
    local app = self.app
    if not app then return nil, "no app loaded" end
    local server, port = app:listen(opts)
    if not server then return nil, port end
    self.servers[#self.servers + 1] = server
    self.listen_opts[server] = opts -- (its tls: made again by each reload, host_tls)
    return server, port
end

-- syntax: ok, err = host:watch() -- reloads after each change to the app's file or modules
function methods:watch()
    if not self.path then return nil, "not loaded from a file" end
    if not self.watcher then
        self.watcher = core.fswatch(function() self:load() end, self.debounce)
    end
    return watch_files(self)
end

-- syntax: files = host:watched() -- the paths watched now (sorted), empty when not watching
function methods:watched()
    if not self.watcher then return {} end
    return watch_list(self)
end

-- syntax: host:close() -- stops watching, closes the servers it listens with, cancels the tasks
-- of its load
function methods:close()
    if self.loading then -- (build: the load fails, and none follows it)
        self.closed_loading, self.again = true, false
    end
    if self.tasks then
        task.cancel_owned(self.tasks)
        self.tasks = nil
    end
    if self.watcher then
        self.watcher:close()
        self.watcher = nil
    end
    for i = 1, #self.servers do self.servers[i]:close() end
    self.servers = {}
    close_servers(self.own) -- the app's own (app:listen), the moonlet.tcp and moonlet.udp ones
    self.own = {}
    close_servers(self.tcp_own)
    close_servers(self.udp_own)
    self.tcp_own, self.udp_own = {}, {}
    if self.dir then
        drop_path(self.dir)
        self.dir = nil
    end
    open_hosts[self] = nil
    if current == self then current = nil end
end

-- syntax: reload.set_current(host) -- the host that SIGHUP and moonlet_reload() reload
function _M.set_current(host)
    current = host
end

-- syntax: host = reload.current()
function _M.current()
    return current
end

-- What bindings/embed.c calls. Results: "app" | "noapp" | nil, kind, message.
local function instance_load(source)
    if current then
        current:set_source(source)
    else
        current = _M.new(source)
    end
    local app, kind, err = current:load()
    if app then return "app" end
    if kind == "noapp" then return "noapp" end
    if not current.app then log(0, "cannot load " .. current:label() .. ": " .. tostring(err)) end
    return nil, kind, err
end

function _M.instance_load_file(path)
    return instance_load({ path = path })
end

function _M.instance_load_string(name, code)
    return instance_load({ name = name, code = code })
end

function _M.instance_reload()
    if not current or not current.path then return nil, "notfound", "no app loaded from a file" end
    local app, kind, err = current:load()
    if app then return "app" end
    return nil, kind, err
end

-- Results: port | nil, "noapp" | "error", message. unix_mode: a Unix socket's permissions, octal
-- digits (moonlet_listen_unix), or nil for the umask's.
function _M.instance_listen(host, port, unix_mode)
    if not current or not current.app then return nil, "noapp", "no app loaded" end
    local server, p = current:listen({ host = host, port = tonumber(port), unix_mode = unix_mode })
    if not server then return nil, "error", p end
    if str_find(host, "unix:", 1, true) == 1 then
        log(2, str_format("moonlet %s serving %s on %s (http)", core.version, current:label(), host))
        return p
    end
    local shown = str_find(host, ":", 1, true) and "[" .. host .. "]" or host
    log(2, str_format("moonlet %s serving %s on http://%s:%d", core.version, current:label(), shown, p))
    return p
end

return _M
