-- lua/moonlet/tcp.lua: moonlet.tcp, TCP sockets the cosocket way (client and server) with TLS on
-- any of them. The socket object is bindings/tcp.c's userdata; this module gives it its methods:
-- every C call that waits goes through task.check (a cancelled task raises moonlet.CANCELLED),
-- names are resolved with moonlet.dns and each address is tried in turn, TLS contexts (CA store,
-- certificate, key) are built once per set of options and shared. The OpenResty cosocket method
-- set is here too: sock:sslhandshake, sock:setkeepalive (into moonlet.tcp_pool, shared with
-- moonlet.ngx), sock:getreusedtimes, and moonlet.tcp.socket(), an unconnected object (a Lua table
-- holding the userdata once connected) with :connect; the userdata has :connect too (its box is
-- given the new connection: core.tcp_move). Timeouts are seconds throughout.
local core = require "moonlet.core"
local task = require "moonlet.task"
local dns = require "moonlet.dns"
local pool = require "moonlet.tcp_pool"

local check = task.check
local CANCELLED = task.CANCELLED
local now = core.now
local core_connect, core_listen = core.tcp_connect, core.tcp_listen
local core_unix_connect, core_unix_listen = core.unix_connect, core.unix_listen
local core_tls_context = core.tls_context
local type, tostring, tonumber, error, setmetatable = type, tostring, tonumber, error, setmetatable
local xpcall, traceback = xpcall, debug.traceback
local pairs, rawget = pairs, rawget
local concat, sub = table.concat, string.sub

local raw = core.tcp_raw
local raw_send, raw_receive, raw_receive_any = raw.send, raw.receive, raw.receive_any
local raw_until, raw_tls, raw_close = raw.receive_until, raw.tls, raw.close
local raw_settimeout = raw.settimeout

local _M = { _VERSION = "0.1.0" }

local DEFAULT_TIMEOUT = 60

local loading -- (below: the reload in progress, if any)
-- the servers of moonlet.tcp.listen: what each connection runs (see listen)
local boxes = setmetatable({}, { __mode = "k" })

-- the host name each client socket connected to: sock:tls() checks the certificate against it
local names = setmetatable({}, { __mode = "k" })
local accepted = setmetatable({}, { __mode = "k" })
-- client sockets: their pool key, how many times they came out of the pool, TLS done
local keys = setmetatable({}, { __mode = "k" })
local reused = setmetatable({}, { __mode = "k" })
local tls_on = setmetatable({}, { __mode = "k" })
local pooled = pool.idle -- sockets sitting in the pool: their holders' calls say "closed"
local pool_checkout, pool_put = pool.checkout, pool.put

local methods = {}
for k, f in pairs(raw) do methods[k] = f end -- the calls that never wait, as they are
methods.receive_until = nil

-- syntax: ok, err = sock:send(data) -- data: a string or an array of strings
function methods:send(data)
    if pooled[self] then return nil, "closed" end
    return check(raw_send(self, data))
end

-- syntax: data, err, partial = sock:receive(size | "*l" | "*a")
function methods:receive(pattern)
    if pooled[self] then return nil, "closed" end
    return check(raw_receive(self, pattern))
end

-- syntax: data, err = sock:receive_any(max) -- whatever arrived (waits for something), at most max
function methods:receive_any(max)
    if pooled[self] then return nil, "closed" end
    return check(raw_receive_any(self, max))
end

-- Checks receiveuntil's arguments; returns whether the pattern goes with the data.
local function until_args(pattern, opts)
    if type(pattern) ~= "string" or pattern == "" then
        error("moonlet.tcp: receiveuntil expects a non-empty string", 3)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("moonlet.tcp: receiveuntil's options must be a table", 3)
    end
    return opts ~= nil and opts.inclusive and true or false
end

local function check_size(size)
    if size ~= nil and (type(size) ~= "number" or size < 1 or size % 1 ~= 0) then
        error("moonlet.tcp: receiveuntil's reader expects a positive integer size", 3)
    end
end

-- syntax: reader = sock:receiveuntil(pattern, { inclusive = false }); data, err, partial = reader()
--         data = reader(size) -- streaming: at most size bytes of the part; nil once it ended
-- Each call of reader returns the data before the next occurrence of pattern (a plain string)
-- and consumes the pattern too (inclusive: the pattern ends the data). With a size (OpenResty's
-- streaming mode) each call returns at most size bytes of the data before the pattern, then
-- nil without an error once the pattern is reached (inclusive: the pattern comes as the last
-- piece); the next call starts on the next part.
function methods:receiveuntil(pattern, opts)
    local inclusive = until_args(pattern, opts)
    local ended = false -- streaming and inclusive: the pattern was the last piece, nil comes next
    return function(size)
        check_size(size)
        if pooled[self] then return nil, "closed" end
        if ended then
            ended = false
            return nil
        end
        local data, err, partial = check(raw_until(self, pattern, size))
        if data then
            if inclusive and not size then return data .. pattern end
            return data
        end
        if err == nil and inclusive then
            ended = true
            return pattern
        end
        return data, err, partial
    end
end

-- TLS contexts, one per set of options: loading the system CA store costs milliseconds. A reload
-- starts the new code with an empty cache (swap_tls_contexts), so that it reads renewed files.
local contexts = {}

-- A server's client_ca asks each client for a certificate verified against it: verify_client
-- true (the default) requires one, "optional" lets a client without one through.
local VERIFY_CLIENT = { [true] = true, on = true, optional = "optional", [false] = false, off = false }

-- fresh: a context of its own, not the cache's (a server's: its files are read again each time
-- the server listens, so that a hot reload takes a renewed certificate)
local function context(server, opts, fresh)
    local verify = opts.verify
    if verify == nil then verify = not server end
    local client_ca = server and opts.client_ca or nil
    if client_ca then
        verify = VERIFY_CLIENT[opts.verify_client == nil or opts.verify_client]
        if not verify then client_ca = nil end
    end
    local key = concat({ server and "s" or "c", verify == "optional" and "o" or verify and "1" or "0",
        opts.cafile or "", opts.cert or "", opts.key or "", opts.alpn or "", client_ca or "" }, "\0")
    local ctx = not fresh and contexts[key]
    if ctx then return ctx end
    local err
    ctx, err = core_tls_context(server, verify, opts.cafile, opts.cert, opts.key, opts.alpn, client_ca)
    if not ctx then return nil, err end
    if not fresh then contexts[key] = ctx end
    return ctx
end

-- syntax: old = tcp.swap_tls_contexts(cache) -- the cache of client TLS contexts (sock:tls,
-- moonlet.http, moonlet.proxy) becomes `cache`; returns the one it replaces. A reload
-- (lua/moonlet/reload.lua) gives its new code an empty one, so that a renewed client certificate,
-- key or CA file is read again as nginx -s reload does, and puts the old one back if the load fails
-- (the old code goes on with what it had). Connections open or pooled keep the context they have.
function _M.swap_tls_contexts(cache)
    local old = contexts
    contexts = cache
    return old
end

-- syntax: msg = moonlet.tcp.tls_failure(err, tls) -- err ("tls: cannot load certificate") with the
-- file of tls (a server's cert, key, client_ca) it is about, for a log line: "tls: cannot load
-- certificate (/etc/tls/site.pem)"
local FAILED_FILE = {
    ["tls: cannot load certificate"] = { "cert" },
    ["tls: cannot load key"] = { "key" }, ["tls: key needs a passphrase"] = { "key" },
    ["tls: certificate and key do not match"] = { "cert", "key" },
    ["tls: cannot load client CA file"] = { "client_ca" },
}
function _M.tls_failure(err, tls)
    local fields = FAILED_FILE[err]
    if not fields or type(tls) ~= "table" then return tostring(err) end
    local files = {}
    for i = 1, #fields do files[i] = tostring(tls[fields[i]]) end
    return ("%s (%s)"):format(err, concat(files, ", "))
end

local function check_tls_opts(opts, level)
    if opts == nil or opts == true then return {} end
    if type(opts) ~= "table" then error("moonlet.tcp: tls options must be a table", level + 1) end
    for _, k in ipairs({ "server_name", "cafile", "cert", "key", "alpn", "client_ca" }) do
        if opts[k] ~= nil and type(opts[k]) ~= "string" then
            error("moonlet.tcp: tls option " .. k .. " must be a string", level + 1)
        end
    end
    if opts.verify_client ~= nil then
        if VERIFY_CLIENT[opts.verify_client] == nil then
            error("moonlet.tcp: tls option verify_client is true, false or \"optional\"", level + 1)
        end
        if not opts.client_ca then
            error("moonlet.tcp: tls option verify_client needs client_ca", level + 1)
        end
    end
    return opts
end

-- syntax: ok, err, detail = sock:tls({ server_name =, verify = true, cafile =, cert =, key =,
--                                      alpn = "http/1.1", client_ca =, verify_client = })
-- Runs the TLS handshake; afterwards send and receive are encrypted. A client checks the server's
-- certificate against the system CA store (or cafile) and the name (server_name, else the host it
-- connected to) unless verify = false. On a socket of moonlet.tcp.listen the server side runs
-- (cert and key needed; client_ca = "ca.pem" asks the client for a certificate signed by one of
-- those CAs, required unless verify_client = "optional"; sock:peer_certificate() tells what came).
-- On failure the socket is closed and err is "tls: certificate verify failed", "tls: handshake
-- failed", ..., detail OpenSSL's reason.
function methods:tls(opts)
    opts = check_tls_opts(opts, 2)
    local server = accepted[self] or false
    local ctx, err = context(server, opts)
    if not ctx then
        raw_close(self)
        return nil, err
    end
    local name = nil
    if not server then name = opts.server_name or names[self] end
    local ok, terr, detail = check(raw_tls(self, ctx, name))
    if ok then tls_on[self] = true end
    return ok, terr, detail
end

local function is_closed(sock)
    return pooled[sock] or tostring(sock) == "moonlet.tcp (closed)"
end

-- syntax: ok, err, detail = sock:sslhandshake(reused_session, server_name, verify)
-- OpenResty's name for sock:tls({ server_name = server_name, verify = verify }): true on success
-- (OpenResty returns a session object; moonlet does no session resumption, reused_session is
-- ignored). verify nil means moonlet's default (verification on, unlike OpenResty); verify may
-- also be a table of sock:tls options (cafile, ...). On a connection taken from the pool whose
-- handshake was done already it returns true at once.
function methods:sslhandshake(_, server_name, verify)
    if server_name ~= nil and type(server_name) ~= "string" then
        error("moonlet.tcp: sslhandshake expects a server name string", 2)
    end
    if is_closed(self) then return nil, "closed" end
    if tls_on[self] then return true end
    local opts
    if type(verify) == "table" then
        opts = {}
        for k, v in pairs(verify) do opts[k] = v end
        if server_name then opts.server_name = server_name end
    else
        opts = { server_name = server_name, verify = verify }
    end
    local ok, err, detail = self:tls(opts)
    if not ok then return nil, err, detail end
    return true
end

local function check_keepalive(timeout, size, level)
    if timeout ~= nil and type(timeout) ~= "number" then
        error("moonlet.tcp: setkeepalive timeout must be a number of seconds", level + 1)
    end
    if size ~= nil and (type(size) ~= "number" or size < 1) then
        error("moonlet.tcp: setkeepalive: bad pool size", level + 1)
    end
end

-- syntax: ok, err = sock:setkeepalive(timeout, size) -- seconds idle (0: forever; nil: 60), size 30
-- Puts the client socket in the keep-alive pool of the host:port it connected to (or its
-- opts.pool): true; the object must not be used afterwards (its calls say "closed" while the
-- socket is idle). nil, "closed" on a closed socket; nil, "unread data in buffer" when something
-- is left to read (or the peer closed), and the socket is closed. A full pool closes its oldest.
function methods:setkeepalive(timeout, size)
    check_keepalive(timeout, size, 2)
    if accepted[self] then error("moonlet.tcp: setkeepalive on a server-side socket", 2) end
    if is_closed(self) then return nil, "closed" end
    return pool_put(keys[self], self, timeout, size)
end

-- syntax: count, err = sock:getreusedtimes() -- how many times it was taken from the pool
function methods:getreusedtimes()
    if is_closed(self) then return nil, "closed" end
    return reused[self] or 0
end

local mt = core.tcp_mt
mt.__index = methods

local function check_port(port, fname)
    port = tonumber(port)
    if not port or port % 1 ~= 0 or port < 0 or port > 65535 then
        error("moonlet.tcp." .. fname .. ": bad port", 3)
    end
    return port
end

-- The path of a Unix domain socket address "unix:/path", or nil for a host name or address.
local function unix_path(host)
    if sub(host, 1, 5) == "unix:" then return sub(host, 6) end
end

-- syntax: mode = moonlet.tcp.unix_mode(v) -- a Unix socket's permissions: "660" or "0660" (octal,
-- as chmod takes them) or a number (tonumber("660", 8)); nil for nil; raises for anything else
function _M.unix_mode(v, level)
    if v == nil then return nil end
    local n
    if type(v) == "string" and v:find("^[0-7]+$") then
        n = tonumber(v, 8)
    elseif type(v) == "number" then
        n = v
    end
    if not n or n % 1 ~= 0 or n < 0 or n > 4095 then
        error("moonlet: a socket mode is octal digits such as \"660\": " .. tostring(v), (level or 1) + 1)
    end
    return n
end

-- Checks connect's arguments: port, timeout, tls options, pool key. A Unix socket ("unix:/path")
-- takes no port: its options may come second, as in OpenResty's connect("unix:/path", opts).
-- The client TLS options a connect may also give beside `tls` ({ tls = true, cafile = "ca.pem" },
-- as moonlet.ws.connect takes them): they were ignored there, and a certificate the caller
-- trusted failed to verify.
local TOP_LEVEL_TLS = { "server_name", "verify", "cafile", "cert", "key", "alpn" }

-- opts.tls with the TLS options opts gives at its top level (those of tls win), or opts.tls itself
local function with_top_level_tls(opts)
    local t, merged = opts.tls, nil
    if t ~= true and type(t) ~= "table" then return t end -- (check_tls_opts refuses it)
    for _, k in ipairs(TOP_LEVEL_TLS) do
        if opts[k] ~= nil and (t == true or t[k] == nil) then
            if not merged then
                merged = {}
                if t ~= true then for tk, tv in pairs(t) do merged[tk] = tv end end
            end
            merged[k] = opts[k]
        end
    end
    return merged or t
end

local function connect_args(host, port, opts, fname, level)
    if type(host) ~= "string" then error("moonlet.tcp." .. fname .. ": expected a host", level + 1) end
    if unix_path(host) then
        if type(port) == "table" and opts == nil then port, opts = nil, port end
        if port ~= nil then error("moonlet.tcp." .. fname .. ": a unix: socket has no port", level + 1) end
        if unix_path(host) == "" then error("moonlet.tcp." .. fname .. ": empty socket path", level + 1) end
    else
        port = tonumber(port)
        if not port or port % 1 ~= 0 or port < 0 or port > 65535 then
            error("moonlet.tcp." .. fname .. ": bad port", level + 1)
        end
    end
    local timeout, tls, key = nil, nil, nil
    if opts ~= nil then
        if type(opts) ~= "table" then
            error("moonlet.tcp." .. fname .. ": opts must be a table", level + 1)
        end
        if opts.timeout ~= nil then
            if type(opts.timeout) ~= "number" then
                error("moonlet.tcp." .. fname .. ": timeout must be a number", level + 1)
            end
            timeout = opts.timeout
        end
        if opts.tls then tls = check_tls_opts(with_top_level_tls(opts), level + 1) end
        if opts.pool ~= nil then
            if type(opts.pool) ~= "string" then
                error("moonlet.tcp." .. fname .. ": pool must be a string", level + 1)
            end
            key = opts.pool
        end
    end
    return port, timeout, tls, key or (port and host .. ":" .. port or host)
end

-- A connection to host's addresses, each in turn, within timeout: sock or nil, err.
local function connect_addrs(host, port, timeout)
    local deadline = now() + timeout
    local addrs, err = dns.resolve(host, { timeout = timeout })
    if not addrs then return nil, err end
    local sock
    for i = 1, #addrs do
        local left = deadline - now()
        if left <= 0 then
            if i > 1 then
                err = "timeout"
                break
            end
            left = 0 -- the first address is tried even with no time left: it may be ready at once
        end
        sock, err = check(core_connect(addrs[i], port, left))
        if sock or err == "timeout" then break end
    end
    return sock, err
end

-- Opens a new connection (no pool involved).
local function open(host, port, timeout, tls, key)
    local path = unix_path(host)
    local sock, err
    if path then
        sock, err = check(core_unix_connect(path, timeout))
    else
        sock, err = connect_addrs(host, port, timeout)
    end
    if not sock then return nil, err end
    raw_settimeout(sock, timeout)
    names[sock] = not path and host or nil -- (a Unix socket names no host: TLS needs server_name)
    keys[sock] = key
    if tls then
        local ok, detail
        ok, err, detail = sock:tls(tls)
        if not ok then return nil, err, detail end
    end
    return sock
end

-- syntax: sock, err = moonlet.tcp.connect(host, port, { timeout = seconds, tls = true | {...},
--                                                     pool = name })
--         sock, err = moonlet.tcp.connect("unix:/path", { ... }) -- a Unix domain socket
-- Resolves host (asynchronously) and tries each address in turn. timeout (60 s) bounds the whole
-- connect and is then the socket's timeout for every later wait (sock:settimeout changes it).
-- err: "connection refused", "timeout", "not found", "tls: ...". Always a new connection (the
-- pool is used by moonlet.tcp.socket():connect); pool names the pool sock:setkeepalive puts it in
-- ("host:port" by default).
function _M.connect(host, port, opts)
    local timeout, tls, key
    port, timeout, tls, key = connect_args(host, port, opts, "connect", 2)
    return open(host, port, timeout or DEFAULT_TIMEOUT, tls, key)
end

-- -- moonlet.tcp.socket(): the unconnected cosocket object ----------------------------------------

local obj_methods = {}
local obj_mt = { __name = "moonlet.tcp.socket", __index = obj_methods }

-- syntax: sock = moonlet.tcp.socket() -- also moonlet.tcp.new(); unconnected, timeouts 60 s
function _M.socket()
    return setmetatable({ _ct = DEFAULT_TIMEOUT, _st = DEFAULT_TIMEOUT, _rt = DEFAULT_TIMEOUT },
        obj_mt)
end
_M.new = _M.socket

-- The calls that need a connection go to the userdata; without one they say "closed".
for name in pairs(methods) do
    obj_methods[name] = function(self, ...)
        local s = rawget(self, "_sock")
        if not s then return nil, "closed" end
        return s[name](s, ...)
    end
end

-- A connection for sock:connect: a live idle one of pool key when there is one (reused counts
-- it), else a new one as moonlet.tcp.connect opens. s, or nil, err, detail.
local function pooled_or_new(host, port, timeout, tls, key)
    local s = pool_checkout(key)
    if not s then return open(host, port, timeout, tls, key) end
    reused[s] = (reused[s] or 0) + 1
    names[s] = not unix_path(host) and host or nil
    if tls and not tls_on[s] then
        local ok, err, detail = s:tls(tls)
        if not ok then return nil, err, detail end
    end
    return s
end

-- syntax: ok, err = sock:connect(host, port, { timeout =, tls = true | {...}, pool = name })
-- Connects: a live idle connection of pool opts.pool (or "host:port") is taken when there is one
-- (sock:getreusedtimes() counts), else a new one is opened as moonlet.tcp.connect does; timeout
-- (else the connect timeout of settimeout(s)) bounds it. A connection the object held before is
-- closed first. true, or nil, err; nil, "socket busy connecting" while another connect of the
-- object waits (as OpenResty's).
function obj_methods:connect(host, port, opts)
    local timeout, tls, key
    port, timeout, tls, key = connect_args(host, port, opts, "socket:connect", 2)
    if rawget(self, "_connecting") then return nil, "socket busy connecting" end
    local old = rawget(self, "_sock")
    if old then
        self._sock = nil
        old:close()
    end
    self._connecting = true
    local ok, s, err, detail = pcall(pooled_or_new, host, port, timeout or self._ct or DEFAULT_TIMEOUT,
                                     tls, key)
    self._connecting = nil
    if not ok then error(s, 0) end -- (a cancellation: moonlet.CANCELLED goes on)
    if not s then return nil, err, detail end
    raw.settimeouts(s, self._ct, self._st, self._rt)
    self._sock = s
    return true
end

-- The per-socket facts of tcp.lua go with a connection that moves from one object to another.
local function forget(sock)
    names[sock], keys[sock], reused[sock], tls_on[sock] = nil, nil, nil, nil
end
local function carry(to, from)
    names[to], keys[to], reused[to], tls_on[to] = names[from], keys[from], reused[from], tls_on[from]
    forget(from)
end

-- syntax: ok, err = sock:connect(host, port, opts) -- on a socket of moonlet.tcp.connect (the
-- cosocket method set on every client socket): the same as moonlet.tcp.socket()'s :connect, and the
-- object the caller holds stays the same (its connection is replaced: core.tcp_move). The one it
-- held is closed first, or, when sock:setkeepalive put it in the pool, stays there (this object no
-- longer stands for it). The timeouts are the connect's (opts.timeout, else 60 s), as
-- moonlet.tcp.connect's. A server-side socket cannot connect. While a connect waits, another one
-- of the same object answers nil, "socket busy connecting" (as OpenResty's): the connection each
-- opened would otherwise both go into the one object.
local move = core.tcp_move
local connecting = setmetatable({}, { __mode = "k" }) -- sockets whose sock:connect waits
function methods:connect(host, port, opts)
    if accepted[self] then error("moonlet.tcp: connect on a server-side socket", 2) end
    local timeout, tls, key
    port, timeout, tls, key = connect_args(host, port, opts, "sock:connect", 2)
    if connecting[self] then return nil, "socket busy connecting" end
    if pooled[self] then
        local kept = move(nil, self)
        pool.replace(keys[self], self, kept)
        carry(kept, self)
    else
        raw_close(self)
        forget(self)
    end
    timeout = timeout or DEFAULT_TIMEOUT
    connecting[self] = true
    local ok, s, err, detail = pcall(pooled_or_new, host, port, timeout, tls, key)
    connecting[self] = nil
    if not ok then error(s, 0) end -- (a cancellation: moonlet.CANCELLED goes on)
    if not s then return nil, err, detail end
    move(self, s)
    carry(self, s)
    raw_settimeout(self, timeout)
    return true
end

-- syntax: sock:settimeout(seconds) -- connect, send and read (nil: none; a connect: 60 s)
function obj_methods:settimeout(t)
    if t ~= nil and type(t) ~= "number" then error("moonlet.tcp: timeout must be a number", 2) end
    self._ct, self._st, self._rt = t, t, t
    local s = rawget(self, "_sock")
    if s then raw_settimeout(s, t) end
end

-- syntax: sock:settimeouts(connect, send, read) -- seconds each (nil: none; a connect: 60 s)
function obj_methods:settimeouts(c, w, r)
    if (c ~= nil and type(c) ~= "number") or (w ~= nil and type(w) ~= "number")
        or (r ~= nil and type(r) ~= "number") then
        error("moonlet.tcp: timeouts must be numbers", 2)
    end
    self._ct, self._st, self._rt = c, w, r
    local s = rawget(self, "_sock")
    if s then raw.settimeouts(s, c, w, r) end
end

-- syntax: reader = sock:receiveuntil(pattern, { inclusive = false }); data, err, partial = reader(size)
-- As the userdata's, on whatever connection the object holds when the reader is called.
function obj_methods:receiveuntil(pattern, opts)
    until_args(pattern, opts)
    local s, reader -- the reader of the connection s
    return function(size)
        check_size(size)
        local held = rawget(self, "_sock")
        if not held then return nil, "closed" end
        if held ~= s then s, reader = held, held:receiveuntil(pattern, opts) end
        return reader(size)
    end
end

-- syntax: ok, err = sock:setkeepalive(timeout, size) -- as the userdata's; the object may connect
-- again afterwards
function obj_methods:setkeepalive(timeout, size)
    check_keepalive(timeout, size, 2)
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    self._sock = nil
    return s:setkeepalive(timeout, size)
end

-- syntax: ok, err = sock:close()
function obj_methods:close()
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    self._sock = nil
    return s:close()
end

-- syntax: stats = moonlet.tcp.pool_stats() -- { idle = n, pools = { [key] = n } }
_M.pool_stats = pool.stats
-- syntax: moonlet.tcp.close_idle() -- closes every pooled connection now
_M.close_idle = pool.close_idle

local function handler_error(err)
    if err == CANCELLED then return err end
    return traceback(tostring(err), 1)
end

-- syntax: server, err = moonlet.tcp.listen({ host =, port =, backlog =, timeout =,
--                                            tls = { cert =, key =, client_ca =, verify_client = } },
--                                          handler)
--         server, err = moonlet.tcp.listen({ unix = "/path" (or host = "unix:/path"), mode = "660",
--                                            ... }, handler)
-- Listens (host 127.0.0.1 by default, port 0 for a free one: server:port() tells which; on a Unix
-- domain socket server:port() is "unix:/path", a stale socket file there is replaced, a live
-- server's is not: nil, "address already in use"; the file goes when the server closes). Each
-- connection runs handler(sock) in its own task; its error is logged; the socket is closed when
-- the handler returns. timeout (60 s) is each socket's timeout. With tls the handshake runs
-- before the handler (a failed one is logged at debug level and closes the connection).
function _M.listen(opts, handler)
    if type(opts) ~= "table" then error("moonlet.tcp.listen: expected an options table", 2) end
    if type(handler) ~= "function" then error("moonlet.tcp.listen: expected a handler", 2) end
    local host = opts.host or "127.0.0.1"
    if type(host) ~= "string" then error("moonlet.tcp.listen: host must be a string", 2) end
    local path = opts.unix or unix_path(host)
    if path ~= nil and (type(path) ~= "string" or path == "") then
        error("moonlet.tcp.listen: unix must be a socket path", 2)
    end
    local port = not path and check_port(opts.port or 0, "listen")
    local timeout = opts.timeout
    if timeout == nil then timeout = DEFAULT_TIMEOUT end
    local tls = opts.tls and check_tls_opts(opts.tls, 2)
    local addrs, err
    if not path then
        addrs, err = dns.resolve(host)
        if not addrs then return nil, err end
    end
    local key = path and "unix:" .. path or port ~= 0 and addrs[1] .. ":" .. port or nil
    local load = loading()
    local old = key and load and load.reusable[key]
    -- a context of its own: each listen reads the files again (a reload's new code, even with the
    -- same paths, serves a renewed certificate)
    local ctx
    if tls then
        ctx, err = context(true, tls, true)
        if not ctx and old then -- (the old code's server would close: fail the load instead)
            error(("moonlet.tcp.listen on %s: %s"):format(key, _M.tls_failure(err, tls)), 2)
        end
        if not ctx then return nil, err end
    end
    if old then -- a reload's new code listens where the old code did: it takes that server
        load.reusable[key] = nil
        load.taken[old] = { handler = handler, ctx = ctx, timeout = timeout }
        load.own[#load.own + 1] = old
        return old
    end
    -- what each connection runs: replaced in place when a reload's new code takes the server
    local box = { handler = handler, ctx = ctx, timeout = timeout, key = key, first = timeout }
    local function serve(sock)
        accepted[sock] = true
        local b = box
        if b.timeout ~= b.first then raw_settimeout(sock, b.timeout) end
        if b.ctx then
            local ok, terr, detail = check(raw_tls(sock, b.ctx))
            if not ok then
                core.log(3, "tcp server: tls handshake failed: " .. tostring(terr) .. " ("
                    .. tostring(detail) .. ")")
                return
            end
        end
        return b.handler(sock)
    end
    local function run(sock)
        local ok, herr = xpcall(serve, handler_error, sock)
        if not ok and herr ~= CANCELLED then
            core.log(0, "tcp handler failed: " .. tostring(herr))
        end
        raw_close(sock)
    end
    local server, lerr
    if path then
        server, lerr = core_unix_listen(path, opts.backlog, run, timeout, _M.unix_mode(opts.mode, 2))
    else
        server, lerr = core_listen(addrs[1], port, opts.backlog, run, timeout)
    end
    if not server then return nil, lerr end
    boxes[server] = box
    if load then
        load.own[#load.own + 1] = server
        load.opened[#load.opened + 1] = server
    end
    return server
end

-- -- Hot reload (lua/moonlet/reload.lua) ---------------------------------------------------------
-- While a load's top level runs, moonlet.app's loading is { reusable = { address = server of the
-- old code }, taken = {}, own = {}, opened = {}, ... }: a moonlet.tcp.listen on an address the old code
-- listened on takes that server (its socket stays open: no "address in use", no refused
-- connection) and its handler, TLS context (made anew: the certificate files read again; one that
-- does not load raises, failing the load) and timeout wait in taken until the new code serves (adopt);
-- own lists the load's servers (held here: a server whose object the script dropped goes on
-- listening, and must still be found), opened the new ones, closed if the load fails.
function loading()
    local app_mod = package.loaded["moonlet.app"]
    return app_mod and app_mod.loading
end

-- syntax: key = moonlet.tcp.listen_key_of(server) -- the address it listens on ("ip:port",
-- "unix:/path"), nil for port 0 and for a server closed since (server:close(): the new code's
-- listen on its address opens a server of its own rather than take one that accepts nothing)
function _M.listen_key_of(server)
    local b = boxes[server]
    return b and server:port() ~= nil and b.key or nil
end

-- syntax: moonlet.tcp.adopt(server, taken) -- the connections server accepts from now on run the
-- handler, TLS and timeout a reload's new code gave (taken: an entry of loading.taken)
function _M.adopt(server, taken)
    local b = boxes[server]
    if b then b.handler, b.ctx, b.timeout = taken.handler, taken.ctx, taken.timeout end
end

return _M
