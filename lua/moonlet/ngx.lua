-- lua/moonlet/ngx.lua: moonlet.ngx, a minimal OpenResty `ngx` API on moonlet, so that lua-resty
-- drivers (lua-resty-redis, ...) run unmodified. Unlike moonlet's other modules, requiring this
-- one has a side effect, the one it exists for: it installs the global `ngx` (unless a global
-- `ngx` exists already: inside OpenResty it leaves the real one alone) and lets
-- `require "resty.redis"` find Debian's nginx.redis (any resty.X, nginx.X). install() sets the
-- global in any case (replacing one) and returns the table; get() returns the table.
--
-- ngx.socket.tcp() objects are Lua tables wrapping a moonlet.tcp socket (created by :connect).
-- Timeouts are OpenResty's milliseconds here, converted to moonlet's seconds. :setkeepalive puts
-- the socket in moonlet.tcp_pool (the one keep-alive pool, shared with moonlet.tcp), keyed by
-- "host:port" (or opts.pool).
-- ngx.thread and ngx.timer run on moonlet tasks (a graceful stop runs pending timers premature:
-- see the timer section). ngx.re is OpenResty's API on PCRE2, OpenResty's own regex
-- library, through moonlet.core (bindings/regex.c, which owns the compiled regexes and their
-- per-instance cache); require "ngx.re" gives lua-resty-core's split. Hashes are OpenSSL calls of
-- moonlet.core (core.digest, core.hmac).
local core = require "moonlet.core"
local task = require "moonlet.task"
local tcp = require "moonlet.tcp"
local udp = require "moonlet.udp"
local redis = require "moonlet.redis"
local pool = require "moonlet.tcp_pool"

local check = task.check
local core_time, core_log, core_park, core_unpark, core_running = core.time, core.log, core.park,
    core.unpark, core.running
local byte, char, sub, find, gsub, format = string.byte, string.char, string.sub, string.find,
    string.gsub, string.format
local concat = table.concat
local floor = math.floor
local type, tostring, tonumber, error, setmetatable, getmetatable, select, pcall, pairs, unpack =
    type, tostring, tonumber, error, setmetatable, getmetatable, select, pcall, pairs, unpack
local rawget, rawset = rawget, rawset

local _M = { _VERSION = "0.1.0" }

local DEFAULT_TIMEOUT_MS = 60000 -- lua_socket_{connect,send,read,keepalive}_timeout
local DEFAULT_POOL_SIZE = 30     -- lua_socket_pool_size
-- lua_ssl_trusted_certificate (install's option): the CA file a verifying sslhandshake trusts (nil:
-- the system store)
local trusted_certificate = nil

local function pack(...)
    return { n = select("#", ...), ... }
end

-- ms (nil or <= 0: the default, as in OpenResty) -> seconds
local function secs(ms)
    if ms == nil or ms <= 0 then ms = DEFAULT_TIMEOUT_MS end
    return ms / 1000
end

-- -- The keep-alive pool (moonlet.tcp_pool) ----------------------------------------------------

-- syntax: stats = require("moonlet.ngx").pool_stats() -- { idle = n, pools = { [key] = n } }
_M.pool_stats = pool.stats

-- syntax: require("moonlet.ngx").close_idle() -- closes every pooled connection now
_M.close_idle = pool.close_idle

-- -- ngx.socket.tcp ------------------------------------------------------------------------------

local tcp_methods = {}
local tcp_mt = { __name = "moonlet.ngx.tcp", __index = tcp_methods }

local function new_tcp()
    return setmetatable({ _ct = 0, _st = 0, _rt = 0 }, tcp_mt)
end

local function apply_timeouts(self)
    local s = rawget(self, "_sock")
    if s then s:settimeouts(secs(self._ct), secs(self._st), secs(self._rt)) end
end

-- An I/O error other than a read timeout closes the socket, as in OpenResty.
local function fail(self, err, partial)
    local s = rawget(self, "_sock")
    if s and err ~= "timeout" then
        s:close()
        self._sock = nil
    end
    return nil, err, partial
end

-- syntax: ok, err = sock:connect(host, port, { pool = name, pool_size =, backlog = })
function tcp_methods:connect(host, port, opts)
    if type(host) ~= "string" then error("moonlet.ngx: connect expects a host", 2) end
    local unix = sub(host, 1, 5) == "unix:" -- connect("unix:/path", opts?): no port
    if unix then -- a port given anyway is ignored, as OpenResty does (drivers pass host and port)
        if type(port) == "table" and opts == nil then opts = port end
        port = nil
    else
        if type(port) ~= "number" then port = tonumber(port) end
        if not port then error("moonlet.ngx: connect expects a port", 2) end
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("moonlet.ngx: connect options must be a table", 2)
    end
    local old = rawget(self, "_sock")
    if old then
        old:close()
        self._sock = nil
    end
    local key = opts and opts.pool or (unix and host or host .. ":" .. port)
    if type(key) ~= "string" then error("moonlet.ngx: pool must be a string", 2) end
    local s = tcp.socket()
    s:settimeouts(secs(self._ct), secs(self._st), secs(self._rt))
    local ok, err
    if unix then
        ok, err = s:connect(host, { pool = key })
    else
        ok, err = s:connect(host, port, { pool = key })
    end
    if not ok then return nil, err end
    self._sock = s._sock -- the userdata itself: one indirection less on every call
    return 1
end

-- syntax: session, err = sock:sslhandshake(reused_session, server_name, ssl_verify)
-- ssl_verify defaults to false, as in OpenResty; the session returned is `true` (no resumption).
-- A verifying handshake trusts install's lua_ssl_trusted_certificate, else the system store.
function tcp_methods:sslhandshake(_, server_name, ssl_verify)
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    if server_name ~= nil and type(server_name) ~= "string" then
        error("moonlet.ngx: sslhandshake expects a server name string", 2)
    end
    -- true at once on a pooled connection that did its handshake already
    local verify = ssl_verify and true or false
    if verify and trusted_certificate then verify = { verify = true, cafile = trusted_certificate } end
    local ok, err = s:sslhandshake(nil, server_name, verify)
    if not ok then
        self._sock = nil -- a failed handshake closed it
        return nil, err
    end
    return true
end

-- Flattens nested arrays of strings, numbers and booleans (OpenResty's send accepts them).
local function flatten(t, out, n)
    for i = 1, #t do
        local v = t[i]
        local tv = type(v)
        if tv == "table" then
            n = flatten(v, out, n)
        elseif tv == "string" or tv == "number" then
            n = n + 1
            out[n] = tostring(v)
        elseif tv == "boolean" then
            n = n + 1
            out[n] = v and "true" or "false"
        else
            error("moonlet.ngx: send: bad data in the array: " .. tv, 3)
        end
    end
    return n
end

-- syntax: bytes, err = sock:send(data) -- a string or a (nested) array of strings and numbers
function tcp_methods:send(data)
    local td = type(data)
    local bytes
    if td == "table" then
        local parts = {}
        local n = flatten(data, parts, 0)
        bytes = 0
        for i = 1, n do bytes = bytes + #parts[i] end
        data = parts
    elseif td == "string" or td == "number" then
        data = tostring(data)
        bytes = #data
    elseif td == "boolean" then
        data = data and "true" or "false"
        bytes = #data
    else
        error("moonlet.ngx: send expects a string or an array of strings", 2)
    end
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    local ok, err = s:send(data)
    if not ok then return fail(self, err) end
    return bytes
end

-- A read that timed out: as OpenResty, hand over (and consume) what arrived of it as the partial
-- data; moonlet's own sockets keep it buffered for the next read instead. What is buffered is
-- taken with a read timeout of 0 (at once), then the socket's timeouts are set back.
local PARTIAL_MAX = 1e9

local function read_failed(self, s, err, partial)
    if err ~= "timeout" then return fail(self, err, partial or "") end
    s:settimeouts(secs(self._ct), secs(self._st), 0)
    local got = s:receive_any(PARTIAL_MAX)
    apply_timeouts(self)
    return nil, "timeout", got or ""
end

-- syntax: data, err, partial = sock:receive(size | "*l" | "*a")
function tcp_methods:receive(pattern)
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    if type(pattern) == "string" and find(pattern, "^%d+$") then pattern = tonumber(pattern) end
    local data, err, partial = s:receive(pattern)
    if data then return data end
    return read_failed(self, s, err, partial)
end

-- syntax: data, err = sock:receiveany(max)
function tcp_methods:receiveany(max)
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    max = tonumber(max)
    if not max or max < 1 then error("moonlet.ngx: receiveany expects a positive size", 2) end
    local data, err = s:receive_any(max)
    if data then return data end
    return fail(self, err)
end

-- syntax: reader = sock:receiveuntil(pattern, { inclusive = false }); data, err, partial = reader()
--         data, err, partial = reader(size) -- streaming: nil, nil once the pattern is reached
function tcp_methods:receiveuntil(pattern, opts)
    if type(pattern) ~= "string" or pattern == "" then
        error("moonlet.ngx: receiveuntil expects a non-empty string", 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("moonlet.ngx: receiveuntil's options must be a table", 2)
    end
    local s, reader -- the reader of the connection s
    return function(size)
        local now = rawget(self, "_sock")
        if not now then return nil, "closed" end
        if now ~= s then s, reader = now, now:receiveuntil(pattern, opts) end
        local data, err, partial = reader(size)
        if data or not err then return data end
        return read_failed(self, s, err, partial)
    end
end

-- syntax: sock:settimeout(ms) -- connect, send and read; nil or 0: the default (60 s)
-- Read as OpenResty reads it (lua_tonumber): a value that is not a number counts as 0, the default.
-- lua-resty-redis-connector relies on it (its connect calls r:set_timeout(self, read_timeout)).
function tcp_methods:settimeout(ms)
    ms = tonumber(ms) or 0
    self._ct, self._st, self._rt = ms, ms, ms
    apply_timeouts(self)
end

-- syntax: sock:settimeouts(connect_ms, send_ms, read_ms)
function tcp_methods:settimeouts(c, s, r)
    self._ct, self._st, self._rt = tonumber(c) or 0, tonumber(s) or 0, tonumber(r) or 0
    apply_timeouts(self)
end

-- syntax: ok, err = sock:setkeepalive(timeout_ms, size) -- 1; the object may connect again
-- Only a socket with nothing left to read goes to the pool ("unread data in buffer" otherwise,
-- and it is closed). timeout_ms 0: no idle timeout; nil: 60 s. size: 30 by default; a full pool
-- closes its oldest connection.
function tcp_methods:setkeepalive(timeout, size)
    timeout = tonumber(timeout) or DEFAULT_TIMEOUT_MS
    size = tonumber(size) or DEFAULT_POOL_SIZE
    if size < 1 then error("moonlet.ngx: setkeepalive: bad pool size", 2) end
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    self._sock = nil
    local ok, err = s:setkeepalive(timeout / 1000, size)
    if not ok then return nil, err end
    return 1
end

-- syntax: count, err = sock:getreusedtimes()
function tcp_methods:getreusedtimes()
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    return s:getreusedtimes()
end

-- syntax: ok, err = sock:close()
function tcp_methods:close()
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    self._sock = nil
    s:close()
    return 1
end

-- syntax: host, port = sock:getpeername()
function tcp_methods:getpeername()
    local s = rawget(self, "_sock")
    if not s then return nil, "closed" end
    return s:getpeername()
end

-- syntax: ok = sock:setoption(name, value) -- accepted and ignored
function tcp_methods:setoption()
    return true
end

-- -- ngx.socket.udp ------------------------------------------------------------------------------

local udp_methods = {}
local udp_mt = { __name = "moonlet.ngx.udp", __index = udp_methods }

local function new_udp()
    return setmetatable({ _rt = 0 }, udp_mt)
end

-- syntax: ok, err = u:setpeername(host, port)
function udp_methods:setpeername(host, port)
    if type(host) ~= "string" then error("moonlet.ngx: setpeername expects a host", 2) end
    local old = rawget(self, "_sock")
    if old then old:close() end
    self._sock = nil
    local unix = sub(host, 1, 5) == "unix:" -- a datagram Unix socket: syslog's /dev/log, ...
    local u, err = udp.bind(unix and "unix:" or find(host, ":", 1, true) and "::" or "0.0.0.0", 0)
    if not u then return nil, err end
    local ok
    ok, err = u:setpeername(host, port)
    if not ok then
        u:close()
        return nil, err
    end
    self._sock = u
    return 1
end

-- syntax: ok, err = u:send(data)
function udp_methods:send(data)
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    if type(data) == "table" then
        local parts = {}
        flatten(data, parts, 0)
        data = concat(parts)
    end
    local ok, err = u:send(tostring(data))
    if not ok then return nil, err end
    return 1
end

-- syntax: data, err = u:receive(size) -- a datagram (truncated to size, 8192 by default)
function udp_methods:receive(size)
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    local data, err = u:receive(secs(self._rt))
    if not data then return nil, err end
    size = tonumber(size) or 8192
    if #data > size then data = sub(data, 1, size) end
    return data
end

-- syntax: u:settimeout(ms)
function udp_methods:settimeout(ms)
    self._rt = tonumber(ms) or 0
end

-- syntax: ok, err = u:close()
function udp_methods:close()
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    self._sock = nil
    u:close()
    return 1
end

-- -- ngx.thread ----------------------------------------------------------------------------------

local thread_mt = { __name = "moonlet.ngx.thread" }

local function thread_spawn(fn, ...)
    if type(fn) ~= "function" then error("moonlet.ngx: thread.spawn expects a function", 2) end
    local th = setmetatable({ waiters = {}, done = false }, thread_mt)
    th.task = task.spawn(function(...)
        local r = pack(pcall(fn, ...))
        th.done, th.result = true, r
        local w = th.waiters
        th.waiters = {}
        for co in pairs(w) do core_unpark(co, true) end
        if not r[1] then error(r[2], 0) end -- logged by the task (or it ends cancelled)
    end, ...)
    return th
end

local function check_thread(th, level)
    if getmetatable(th) ~= thread_mt then
        error("moonlet.ngx: expected a thread of ngx.thread.spawn", level + 1)
    end
end

-- syntax: ok, res1, ... = ngx.thread.wait(th1, th2, ...) -- the first to end; false, err when it
-- raised
local function thread_wait(...)
    local n = select("#", ...)
    if n == 0 then error("moonlet.ngx: thread.wait expects threads", 2) end
    local ths = { ... }
    for i = 1, n do check_thread(ths[i], 2) end
    while true do
        local live = 0
        for i = 1, n do
            local th = ths[i]
            if not th.reaped then
                if th.done then
                    th.reaped = true
                    local r = th.result
                    if not r[1] and r[2] == task.CANCELLED then return false, "killed" end
                    return unpack(r, 1, r.n)
                end
                live = live + 1
            end
        end
        if live == 0 then return nil, "already waited or killed" end
        local co = core_running()
        if not co then error("moonlet.ngx: thread.wait outside a moonlet task", 2) end
        for i = 1, n do ths[i].waiters[co] = true end
        local ok, err = pcall(core_park)
        for i = 1, n do ths[i].waiters[co] = nil end
        if not ok then error(err, 0) end
        check(err) -- raises moonlet.CANCELLED when the waiter was cancelled
    end
end

-- syntax: ok, err = ngx.thread.kill(th)
local function thread_kill(th)
    check_thread(th, 2)
    if th.reaped then return nil, "already waited or killed" end
    if th.done then return nil, "already terminated" end
    th.reaped = true
    th.task:cancel()
    return true
end

-- -- ngx.re: PCRE2, through moonlet.core (bindings/regex.c) ----------------------------------
-- OpenResty's API and results over the same library (PCRE2): captures tables with [0] the whole
-- match, false for a group that did not take part, named groups also under their names (arrays
-- of the matches with "D"); nil for no match, nil, err for a bad regex or a failed match. Every
-- compiled regex goes in the instance's cache (1024, least recently used out), "o" or not.

local core_regex, core_regex_match, core_regex_find, core_regex_gsub =
    core.regex, core.regex_match, core.regex_find, core.regex_gsub

local function check_regex(regex)
    if type(regex) ~= "string" then
        error("bad argument #2 to 'ngx.re' (string expected, got " .. type(regex) .. ")", 3)
    end
end

-- ctx.pos (1-based; nil or <= 0: the start) -> the 0-based offset C wants
local function ctx_init(ctx)
    local pos = ctx and ctx.pos
    if not pos or pos <= 0 then return 0 end
    return pos - 1
end

-- syntax: m, err = ngx.re.match(subject, regex, options, ctx, res_table)
local function re_match(subject, regex, options, ctx, res)
    subject = tostring(subject)
    check_regex(regex)
    local m, err, to = core_regex_match(subject, regex, options, ctx_init(ctx), res)
    if not m then
        if err then return nil, err end
        return nil
    end
    if ctx then ctx.pos = to + 1 end
    return m
end

-- syntax: from, to, err = ngx.re.find(subject, regex, options, ctx, nth)
local function re_find(subject, regex, options, ctx, nth)
    subject = tostring(subject)
    check_regex(regex)
    local mend, from, to = core_regex_find(subject, regex, options, ctx_init(ctx), nth)
    if not mend then
        if from then return nil, nil, from end
        return nil
    end
    if ctx then ctx.pos = mend + 1 end
    if from == false then return nil, nil, to end -- "nth out of bound"
    return from, to
end

-- syntax: iterator, err = ngx.re.gmatch(subject, regex, options); m, err = iterator()
-- After an empty match the next one starts a character later, as OpenResty's (one byte, or one
-- UTF-8 character with "u").
local function re_gmatch(subject, regex, options)
    subject = tostring(subject)
    check_regex(regex)
    local rx, err = core_regex(regex, options)
    if not rx then return nil, err end
    local pos, len, checked = 0, #subject, false
    return function()
        if not rx then return nil end
        local m, e, _, nxt = rx:match(subject, pos, nil, checked)
        if not m then
            rx = nil
            if e then return nil, e end
            return nil
        end
        checked = true
        if nxt > len then rx = nil else pos = nxt end
        return m
    end
end

-- gsub with a function: the loop is here, not in C, so that the function may wait (a yield
-- cannot cross a C call).
local function sub_fn(subject, regex, fn, options, global)
    local rx, err = core_regex(regex, options)
    if not rx then return nil, nil, err end
    local out, n, pos, copied, len, checked = {}, 0, 0, 0, #subject, false
    while true do
        local m, from, to, nxt = rx:match(subject, pos, nil, checked)
        if not m then
            if from then return nil, nil, from end
            break
        end
        checked = true
        n = n + 1
        out[#out + 1] = sub(subject, copied + 1, from)
        out[#out + 1] = tostring(fn(m))
        copied = to
        pos = nxt
        if not global or pos > len then break end
    end
    if n == 0 then return subject, 0 end
    out[#out + 1] = sub(subject, copied + 1)
    return concat(out), n
end

local function re_sub_n(subject, regex, replace, options, global)
    subject = tostring(subject)
    check_regex(regex)
    if type(replace) == "function" then return sub_fn(subject, regex, replace, options, global) end
    return core_regex_gsub(subject, regex, options, tostring(replace), global)
end

-- syntax: newstr, n, err = ngx.re.sub(subject, regex, replace, options)
-- replace: a template ("$0", "$1", "${1}", "${name}", "$$") or a function(m) -> string
local function re_sub(subject, regex, replace, options)
    return re_sub_n(subject, regex, replace, options, false)
end

-- syntax: newstr, n, err = ngx.re.gsub(subject, regex, replace, options)
local function re_gsub(subject, regex, replace, options)
    return re_sub_n(subject, regex, replace, options, true)
end

-- syntax: res, err = require("ngx.re").split(subject, regex, options, ctx, max, res)
-- lua-resty-core's ngx.re module, as it does it: the pieces between the matches (and each match's
-- first capture when it took part), at most max of them (max <= 0: all, without the empty ones at
-- the end); ctx.pos (1-based) is where it starts.
local split_ctx = {}

local function re_split(subject, regex, options, ctx, max, res)
    subject = tostring(subject)
    check_regex(regex)
    if not ctx then
        ctx = split_ctx
        ctx.pos = 1
    elseif not ctx.pos then
        ctx.pos = 1
    end
    max = max or 0
    if res == nil then
        res = {}
    elseif type(res) ~= "table" then
        error("res is not a table", 2)
    end
    local len = #subject
    if ctx.pos > len then
        res[1] = nil
        return res
    end
    local rx, err = core_regex(regex, options)
    if not rx then return nil, err end
    local sub_idx, res_idx, count, last_empty, checked = ctx.pos, 0, 1, nil, false
    ctx.pos = sub_idx - 1 -- 0-based from here on, as lua-resty-core leaves it
    while max <= 0 or count < max do
        local m, from, to = rx:match(subject, ctx.pos > 0 and ctx.pos or 0, nil, checked)
        if not m then
            if from then return nil, from end
            break
        end
        checked = true
        ctx.pos = from == to and to + 1 or to
        local capture = m[1]
        from, to = from + 1, to + 1
        if last_empty then sub_idx = last_empty end
        if from == to then last_empty = from end
        if from > sub_idx or not last_empty then
            count = count + 1
            res_idx = res_idx + 1
            res[res_idx] = sub(subject, sub_idx, from - 1)
            if capture then
                res_idx = res_idx + 1
                res[res_idx] = capture
            end
            sub_idx = to
            if sub_idx > len then break end
        end
    end
    if max <= 0 and sub_idx > len then
        for i = res_idx, 1, -1 do
            if res[i] ~= "" then
                res_idx = i
                break
            end
            res[i] = nil
        end
    else
        res_idx = res_idx + 1
        res[res_idx] = sub(subject, sub_idx)
    end
    res[res_idx + 1] = nil
    return res
end

-- require "ngx.re" (lua-resty-core's module, whose own file needs nginx) finds split; install()
-- sets it, so that inside OpenResty the real one stays
local function preload_ngx_re()
    if not package.preload["ngx.re"] then
        package.preload["ngx.re"] = function() return { split = re_split } end
    end
end

-- -- Hashes and base64 (OpenSSL through moonlet.core: no FFI, so the static build has them too) ----

local core_digest, core_hmac = core.digest, core.hmac

local tohex = require("moonlet.crypto").hex

local function str_arg(s, fname)
    if type(s) == "number" then return tostring(s) end
    if s == nil then return "" end
    if type(s) ~= "string" then error("moonlet.ngx: ngx." .. fname .. " expects a string", 3) end
    return s
end

local core_b64enc, core_b64dec = core.base64_encode, core.base64_decode

local function encode_base64(s, no_padding)
    s = core_b64enc(str_arg(s, "encode_base64"))
    if no_padding then s = gsub(s, "=+$", "") end
    return s
end

local function decode_base64(s)
    return core_b64dec(str_arg(s, "decode_base64"))
end

local function escape_uri(s)
    s = str_arg(s, "escape_uri")
    return (gsub(s, "[^%w%-%._~]", function(ch) return format("%%%02X", byte(ch)) end))
end

local function unescape_uri(s)
    s = str_arg(s, "unescape_uri")
    s = gsub(s, "+", " ")
    return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- syntax: s = ngx.encode_args({ a = 1, b = { "x", "y" }, c = true }) -- "a=1&b=x&b=y&c", keys
-- sorted (OpenResty follows the table's order, which Lua does not fix); false values left out
local function encode_args(t)
    if type(t) ~= "table" then error("moonlet.ngx: ngx.encode_args expects a table", 2) end
    local keys = {}
    for k in pairs(t) do
        if type(k) ~= "string" then error("moonlet.ngx: ngx.encode_args: bad key type: " .. type(k), 2) end
        keys[#keys + 1] = k
    end
    table.sort(keys)
    local out = {}
    local function add(k, v)
        local tv = type(v)
        if v == true then
            out[#out + 1] = escape_uri(k)
        elseif tv == "string" or tv == "number" then
            out[#out + 1] = escape_uri(k) .. "=" .. escape_uri(tostring(v))
        elseif v ~= false then
            error("moonlet.ngx: ngx.encode_args: bad argument value type: " .. tv, 4)
        end
    end
    for _, k in ipairs(keys) do
        local v = t[k]
        if type(v) == "table" then
            for i = 1, #v do add(k, v[i]) end
        else
            add(k, v)
        end
    end
    return concat(out, "&")
end

-- syntax: t = ngx.decode_args(s, max_args) -- { a = "1", b = { "x", "y" }, c = true }; at most
-- max_args (100; 0: no limit) arguments, as OpenResty
local function decode_args(s, max_args)
    s = str_arg(s, "decode_args")
    max_args = max_args or 100
    local t, n = {}, 0
    for part in s:gmatch("[^&]+") do
        if max_args > 0 and n >= max_args then break end
        n = n + 1
        local k, v = part:match("^([^=]*)=(.*)$")
        if k then v = unescape_uri(v) else k, v = part, true end
        k = unescape_uri(k)
        local old = t[k]
        if old == nil then
            t[k] = v
        elseif type(old) == "table" then
            old[#old + 1] = v
        else
            t[k] = { old, v }
        end
    end
    return t
end

-- CRC-32 (IEEE, zlib's): ngx.crc32_short and ngx.crc32_long are the same checksum in OpenResty
local crc_table
local function crc32(s)
    s = str_arg(s, "crc32_long")
    local bxor, band, rshift, bnot = bit.bxor, bit.band, bit.rshift, bit.bnot
    if not crc_table then
        crc_table = {}
        for i = 0, 255 do
            local c = i
            for _ = 1, 8 do
                if band(c, 1) == 1 then c = bxor(0xEDB88320, rshift(c, 1)) else c = rshift(c, 1) end
            end
            crc_table[i] = c
        end
    end
    local c = bnot(0)
    for i = 1, #s do c = bxor(crc_table[band(bxor(c, byte(s, i)), 0xFF)], rshift(c, 8)) end
    c = bnot(c)
    if c < 0 then c = c + 4294967296 end
    return c
end

local SQL_ESCAPES = { ["\0"] = "\\0", ["\b"] = "\\b", ["\n"] = "\\n", ["\r"] = "\\r",
                      ["\t"] = "\\t", ["\26"] = "\\Z", ["\\"] = "\\\\", ["'"] = "\\'",
                      ['"'] = '\\"' }

-- syntax: s = ngx.quote_sql_str(raw) -- a MySQL string literal, quotes included
local function quote_sql_str(s)
    s = str_arg(s, "quote_sql_str")
    return "'" .. gsub(s, "[%z\b\n\r\t\26\\'\"]", SQL_ESCAPES) .. "'"
end

-- -- ngx.timer --------------------------------------------------------------------------------
-- A timer is a moonlet task that sleeps, then runs the callback in a task of its own (an every
-- timer's next run does not wait for a slow callback, as in OpenResty). timers_pending holds a
-- timer while it sleeps; timers_running counts callbacks under way. The first timer adds a
-- shutdown hook (one that outlives hot reloads): at a graceful stop ngx.worker.exiting() turns
-- true, each pending timer's sleep is cancelled and its callback runs at once with premature =
-- true (OpenResty's behaviour when a worker exits), and the hook waits for the callbacks (within
-- the shutdown hooks' time). While exiting, a timer with a delay is refused ("process exiting"); a
-- zero-delay one still runs, premature.

local timers_pending = {} -- timer -> true while it sleeps
local timers_running = 0
local exiting = false
local timer_hook_added = false

local function run_callback(fn, premature, args)
    timers_running = timers_running + 1
    local ok, err = pcall(fn, premature, unpack(args, 1, args.n))
    timers_running = timers_running - 1
    if not ok then error(err, 0) end -- logged by the task (or it ends cancelled)
end

-- A timer's loop is a task of the script load that made it (lua/moonlet/task.lua own): a hot reload
-- cancels it at its sleep, and a cancelled timer is pending no more.
local function timer_loop(t)
    repeat
        local ok, err = pcall(task.sleep, t.delay)
        if not ok then
            timers_pending[t] = nil
            error(err, 0)
        end
        if not t.every then timers_pending[t] = nil end
        task.spawn(run_callback, t.fn, false, t.args)
    until not t.every
end

local function fire_premature()
    exiting = true
    local fired = {}
    for t in pairs(timers_pending) do
        timers_pending[t] = nil
        t.task:cancel()
        fired[#fired + 1] = task.spawn(run_callback, t.fn, true, t.args)
    end
    for i = 1, #fired do fired[i]:join() end
end

local function new_timer(name, delay, fn, every, ...)
    if type(delay) ~= "number" or delay < 0 or delay ~= delay or (every and delay == 0) then
        error("moonlet.ngx: timer." .. name .. ": bad delay", 3)
    end
    if type(fn) ~= "function" then error("moonlet.ngx: timer." .. name .. " expects a function", 3) end
    if exiting then
        if delay > 0 then return nil, "process exiting" end
        task.spawn(run_callback, fn, true, pack(...))
        return true
    end
    if not timer_hook_added then
        timer_hook_added = true
        require("moonlet.shutdown").add_lasting(fire_premature)
    end
    local t = { fn = fn, args = pack(...), delay = delay, every = every }
    timers_pending[t] = true
    t.task = task.spawn(timer_loop, t)
    return true
end

-- syntax: ok, err = ngx.timer.at(delay, fn, ...) -- fn(premature, ...) in a task, delay seconds on
local function timer_at(delay, fn, ...) return new_timer("at", delay, fn, false, ...) end

-- syntax: ok, err = ngx.timer.every(delay, fn, ...) -- fn(premature, ...) every delay (> 0) seconds
local function timer_every(delay, fn, ...) return new_timer("every", delay, fn, true, ...) end

local function timer_pending_count()
    local n = 0
    for _ in pairs(timers_pending) do n = n + 1 end
    return n
end

-- -- The ngx table -------------------------------------------------------------------------------

-- ngx.log levels -> moonlet.log levels (0 error, 1 warn, 2 info, 3 debug)
local LEVELS = { [0] = 0, 0, 0, 0, 0, 1, 2, 2, 3 }

local function ngx_log(level, ...)
    local n = LEVELS[level]
    if not n then error("moonlet.ngx: ngx.log: bad log level " .. tostring(level), 2) end
    local parts = { ... }
    for k = 1, select("#", ...) do
        local v = parts[k]
        parts[k] = v == nil and "nil" or tostring(v)
    end
    core_log(n, concat(parts))
end

local ngx_tbl

local function build()
    local ngx = {
        OK = 0, ERROR = -1, AGAIN = -2, DONE = -4, DECLINED = -5,
        STDERR = 0, EMERG = 1, ALERT = 2, CRIT = 3, ERR = 4, WARN = 5, NOTICE = 6, INFO = 7,
        DEBUG = 8,
        HTTP_OK = 200, HTTP_NOT_FOUND = 404, HTTP_INTERNAL_SERVER_ERROR = 500,
        null = redis.null,
        log = ngx_log,
        var = {},
        ctx = {},
        shared = require("moonlet.shared").ngx_shared, -- ngx.shared.NAME: moonlet.shared(NAME)
        header = {},
        socket = {
            tcp = new_tcp, stream = new_tcp, udp = new_udp,
            connect = function(host, port, opts)
                local s = new_tcp()
                local ok, err = s:connect(host, port, opts)
                if not ok then return nil, err end
                return s
            end,
        },
        thread = { spawn = thread_spawn, wait = thread_wait, kill = thread_kill },
        re = { match = re_match, find = re_find, gmatch = re_gmatch, sub = re_sub,
               gsub = re_gsub },
        config = {
            ngx_lua_version = 10026, nginx_version = 1022001, subsystem = "http",
            debug = false,
            prefix = function() return "" end,
            nginx_configure = function() return "" end,
        },
        worker = {
            id = function() return (core.worker()) end,
            count = function() return (select(2, core.worker())) end,
            exiting = function() return exiting end,
            pid = function() return core.getpid() end,
        },
        timer = { at = timer_at, every = timer_every, pending_count = timer_pending_count,
                  running_count = function() return timers_running end },
        md5_bin = function(s) return core_digest("md5", str_arg(s, "md5_bin")) end,
        md5 = function(s) return tohex(core_digest("md5", str_arg(s, "md5"))) end,
        sha1_bin = function(s) return core_digest("sha1", str_arg(s, "sha1_bin")) end,
        hmac_sha1 = function(key, s)
            return core_hmac("sha1", str_arg(key, "hmac_sha1"), str_arg(s, "hmac_sha1"))
        end,
        encode_base64 = encode_base64,
        decode_base64 = decode_base64,
        escape_uri = escape_uri,
        unescape_uri = unescape_uri,
        encode_args = encode_args,
        decode_args = decode_args,
        crc32_short = crc32,
        crc32_long = crc32,
        quote_sql_str = quote_sql_str,
        get_phase = function() return "content" end,
        update_time = function() end,
        -- syntax: ngx.sleep(seconds) -- seconds, as in OpenResty
        sleep = function(s)
            if type(s) ~= "number" or s < 0 then error("moonlet.ngx: ngx.sleep: bad time", 2) end
            task.sleep(s)
        end,
        -- wall-clock seconds with millisecond precision
        now = function() return floor(core_time() * 1000) / 1000 end,
        time = function() return floor(core_time()) end,
        today = function() return os.date("%Y-%m-%d") end,
        localtime = function() return os.date("%Y-%m-%d %H:%M:%S") end,
        utctime = function() return os.date("!%Y-%m-%d %H:%M:%S") end,
    }
    return ngx
end

-- Debian's lua-nginx-* packages install the lua-resty drivers under nginx.* (lua-nginx-redis is
-- nginx.redis, lua-nginx-memcached nginx.memcached, lua-nginx-websocket nginx.websocket.client,
-- lua-nginx-dns nginx.dns.resolver): a searcher, last in package.loaders, makes `require
-- "resty.X"` load nginx.X when no other searcher found resty.X (one module under both names).
local function debian_resty_searcher(name)
    if sub(name, 1, 6) ~= "resty." or not package.searchpath then return nil end
    local alt = "nginx." .. sub(name, 7)
    if not package.searchpath(alt, package.path) then return "\n\tno Debian module '" .. alt .. "'" end
    return function() return require(alt) end
end

local function add_debian_resty_searcher()
    local loaders = package.loaders
    for i = 1, #loaders do
        if loaders[i] == debian_resty_searcher then return end
    end
    loaders[#loaders + 1] = debian_resty_searcher
end

-- syntax: ngx = require("moonlet.ngx").install() -- sets the global ngx (once) and returns it
-- opts.lua_ssl_trusted_certificate = "ca.pem": what nginx's directive of that name is, the CA
-- bundle a verifying sslhandshake trusts (nil: the system store)
function _M.install(opts)
    if opts ~= nil then
        if type(opts) ~= "table" then error("moonlet.ngx: install expects a table of options", 2) end
        local ca = opts.lua_ssl_trusted_certificate
        if ca ~= nil and type(ca) ~= "string" then
            error("moonlet.ngx: lua_ssl_trusted_certificate must be a file name", 2)
        end
        trusted_certificate = ca
    end
    if not ngx_tbl then ngx_tbl = build() end
    rawset(_G, "ngx", ngx_tbl)
    add_debian_resty_searcher()
    preload_ngx_re()
    return ngx_tbl
end

-- syntax: ngx = require("moonlet.ngx").get() -- the ngx table (the one the global is, once installed)
function _M.get()
    if not ngx_tbl then ngx_tbl = build() end
    return ngx_tbl
end

-- the same helpers, for tests and for code that wants them without the global
_M.re = { match = re_match, find = re_find, gmatch = re_gmatch, sub = re_sub, gsub = re_gsub,
          split = re_split }

-- syntax: entries, max, compiles = require("moonlet.ngx").regex_cache(max) -- the compiled regexes
-- the instance keeps (1024 by default, as OpenResty's lua_regex_cache_max_entries); max sets it
_M.regex_cache = core.regex_cache

-- the module is the ngx global: requiring it installs it (and the resty.* searcher), as
-- `require "moonlet.ngx"; local redis = require "resty.redis"` expects
if rawget(_G, "ngx") == nil then _M.install() else add_debian_resty_searcher() end

return _M
