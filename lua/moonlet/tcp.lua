-- lua/moonlet/tcp.lua: moonlet.tcp, TCP sockets the cosocket way (client and server) with TLS on
-- any of them. The socket object is bindings/tcp.c's userdata; this module gives it its methods:
-- every C call that waits goes through task.check (a cancelled task raises moonlet.CANCELLED),
-- names are resolved with moonlet.dns and each address is tried in turn, TLS contexts (CA store,
-- certificate, key) are built once per set of options and shared.
local core = require "moonlet.core"
local task = require "moonlet.task"
local dns = require "moonlet.dns"

local check = task.check
local CANCELLED = task.CANCELLED
local now = core.now
local core_connect, core_listen = core.tcp_connect, core.tcp_listen
local core_tls_context = core.tls_context
local type, tostring, tonumber, error, setmetatable = type, tostring, tonumber, error, setmetatable
local xpcall, traceback = xpcall, debug.traceback
local concat = table.concat

local raw = core.tcp_raw
local raw_send, raw_receive, raw_receive_any = raw.send, raw.receive, raw.receive_any
local raw_until, raw_tls, raw_close = raw.receive_until, raw.tls, raw.close
local raw_settimeout = raw.settimeout

local _M = { _VERSION = "0.1.0" }

local DEFAULT_TIMEOUT = 60

-- the host name each client socket connected to: sock:tls() checks the certificate against it
local names = setmetatable({}, { __mode = "k" })
local accepted = setmetatable({}, { __mode = "k" })

local methods = {}
for k, f in pairs(raw) do methods[k] = f end -- the calls that never wait, as they are
methods.receive_until = nil

-- syntax: ok, err = sock:send(data) -- data: a string or an array of strings
function methods:send(data)
    return check(raw_send(self, data))
end

-- syntax: data, err, partial = sock:receive(size | "*l" | "*a")
function methods:receive(pattern)
    return check(raw_receive(self, pattern))
end

-- syntax: data, err = sock:receive_any(max) -- whatever arrived (waits for something), at most max
function methods:receive_any(max)
    return check(raw_receive_any(self, max))
end

-- syntax: reader = sock:receiveuntil(pattern); data, err, partial = reader()
-- Each call of reader returns the data before the next occurrence of pattern (a plain string)
-- and consumes the pattern too.
function methods:receiveuntil(pattern)
    if type(pattern) ~= "string" or pattern == "" then
        error("moonlet.tcp: receiveuntil expects a non-empty string", 2)
    end
    return function()
        return check(raw_until(self, pattern))
    end
end

-- TLS contexts, one per set of options: loading the system CA store costs milliseconds.
local contexts = {}

local function context(server, opts)
    local verify = opts.verify
    if verify == nil then verify = not server end
    local key = concat({ server and "s" or "c", verify and "1" or "0", opts.cafile or "",
        opts.cert or "", opts.key or "" }, "\0")
    local ctx = contexts[key]
    if ctx then return ctx end
    local err
    ctx, err = core_tls_context(server, verify, opts.cafile, opts.cert, opts.key)
    if not ctx then return nil, err end
    contexts[key] = ctx
    return ctx
end

local function check_tls_opts(opts, level)
    if opts == nil or opts == true then return {} end
    if type(opts) ~= "table" then error("moonlet.tcp: tls options must be a table", level + 1) end
    for _, k in ipairs({ "server_name", "cafile", "cert", "key" }) do
        if opts[k] ~= nil and type(opts[k]) ~= "string" then
            error("moonlet.tcp: tls option " .. k .. " must be a string", level + 1)
        end
    end
    return opts
end

-- syntax: ok, err, detail = sock:tls({ server_name =, verify = true, cafile =, cert =, key = })
-- Runs the TLS handshake; afterwards send and receive are encrypted. A client checks the server's
-- certificate against the system CA store (or cafile) and the name (server_name, else the host it
-- connected to) unless verify = false. On a socket of moonlet.tcp.listen the server side runs
-- (cert and key needed). On failure the socket is closed and err is "tls: certificate verify
-- failed", "tls: handshake failed", ..., detail OpenSSL's reason.
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
    return check(raw_tls(self, ctx, name))
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

-- syntax: sock, err = moonlet.tcp.connect(host, port, { timeout = seconds, tls = true | {...} })
-- Resolves host (asynchronously) and tries each address in turn. timeout (60 s) bounds the whole
-- connect and is then the socket's timeout for every later wait (sock:settimeout changes it).
-- err: "connection refused", "timeout", "not found", "tls: ...".
function _M.connect(host, port, opts)
    if type(host) ~= "string" then error("moonlet.tcp.connect: expected a host", 2) end
    port = check_port(port, "connect")
    local timeout, tls = DEFAULT_TIMEOUT, nil
    if opts ~= nil then
        if type(opts) ~= "table" then error("moonlet.tcp.connect: opts must be a table", 2) end
        if opts.timeout ~= nil then
            if type(opts.timeout) ~= "number" then
                error("moonlet.tcp.connect: timeout must be a number", 2)
            end
            timeout = opts.timeout
        end
        if opts.tls then tls = check_tls_opts(opts.tls, 2) end
    end
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
    if not sock then return nil, err end
    raw_settimeout(sock, timeout)
    names[sock] = host
    if tls then
        local ok, detail
        ok, err, detail = sock:tls(tls)
        if not ok then return nil, err, detail end
    end
    return sock
end

local function handler_error(err)
    if err == CANCELLED then return err end
    return traceback(tostring(err), 2)
end

-- syntax: server, err = moonlet.tcp.listen({ host =, port =, backlog =, timeout =,
--                                            tls = { cert =, key = } }, handler)
-- Listens (host 127.0.0.1 by default, port 0 for a free one: server:port() tells which). Each
-- connection runs handler(sock) in its own task; its error is logged; the socket is closed when
-- the handler returns. timeout (60 s) is each socket's timeout. With tls the handshake runs
-- before the handler (a failed one is logged at debug level and closes the connection).
function _M.listen(opts, handler)
    if type(opts) ~= "table" then error("moonlet.tcp.listen: expected an options table", 2) end
    if type(handler) ~= "function" then error("moonlet.tcp.listen: expected a handler", 2) end
    local port = check_port(opts.port or 0, "listen")
    local host = opts.host or "127.0.0.1"
    if type(host) ~= "string" then error("moonlet.tcp.listen: host must be a string", 2) end
    local timeout = opts.timeout
    if timeout == nil then timeout = DEFAULT_TIMEOUT end
    local ctx
    if opts.tls then
        local tls = check_tls_opts(opts.tls, 2)
        local err
        ctx, err = context(true, tls)
        if not ctx then return nil, err end
    end
    local addrs, err = dns.resolve(host)
    if not addrs then return nil, err end
    local function serve(sock)
        accepted[sock] = true
        if ctx then
            local ok, terr, detail = check(raw_tls(sock, ctx))
            if not ok then
                core.log(3, "tcp server: tls handshake failed: " .. tostring(terr) .. " ("
                    .. tostring(detail) .. ")")
                return
            end
        end
        return handler(sock)
    end
    return core_listen(addrs[1], port, opts.backlog, function(sock)
        local ok, herr = xpcall(serve, handler_error, sock)
        if not ok and herr ~= CANCELLED then
            core.log(0, "tcp handler failed: " .. tostring(herr))
        end
        raw_close(sock)
    end, timeout)
end

return _M
