-- lua/moonlet/http_client.lua: moonlet.http, the HTTP/1.1 client. Each call reads like blocking
-- code and yields its task while it waits, so many requests run at once on one thread:
--
--   local res, err = moonlet.http.get(url, { timeout = 5 })
--   local res, err = moonlet.http.request{ method = "POST", url = u, body = s, stream = true }
--
-- Connections: one request owns its connection from the moment it takes it (from the pool, or a
-- new one) until its response has been read completely; only then, and only when both sides
-- allow keep-alive and no byte is left over, the connection goes back to the pool of its origin
-- (scheme, host, port and TLS settings), a LIFO stack bounded by pool_size whose entries expire
-- after idle_timeout (checked whenever the pool is used: no timer keeps a script alive). Any
-- failure, timeout or cancellation closes the connection instead, so nothing half-read is ever
-- reused. Every socket wait goes through sock_wait(), which arms the per-wait timeout (bounded by
-- the request's total deadline) and closes the connection when the task is cancelled there.
--
-- Sockets come from moonlet.tcp (DNS, TLS through sock:tls). The response is parsed from a Lua
-- buffer filled by receive_any: usually one C call brings the whole head and a small body, then
-- bindings/http_client.c checks the head and frames the body in one call (core.http_parse_head),
-- decodes a chunked body that is all there in another (core.http_dechunk), and makes res.headers
-- only when it is read (core.http_headers). A body that is not all there yet is read piece by
-- piece here.
local core = require "moonlet.core"
local json = require "moonlet.json"
local multipart = require "moonlet.multipart"
local request_id = require "moonlet.request_id"
local task = require "moonlet.task"
local tcp = require "moonlet.tcp"
local url_mod = require "moonlet.url"

local byte, find, sub, lower, upper, match, gsub, gmatch, format, char =
    string.byte, string.find, string.sub, string.lower, string.upper, string.match,
    string.gsub, string.gmatch, string.format, string.char
local concat, sort = table.concat, table.sort
local tonumber, tostring, type, pairs, ipairs, setmetatable, getmetatable, pcall, error =
    tonumber, tostring, type, pairs, ipairs, setmetatable, getmetatable, pcall, error
local floor = math.floor
local now = core.now
local CANCEL, CANCELLED = core.CANCEL, task.CANCELLED
local parse_head, dechunk = core.http_parse_head, core.http_dechunk
local core_headers, wrap_headers = core.http_headers, require("moonlet.headers").wrap

-- res.headers from the head's bytes: lower-case names, found in any letter case
local function parse_headers(hb, hp)
    local h = core_headers(hb, hp)
    wrap_headers(h)
    return h
end

local _M = { _VERSION = "0.1.0" }

-- Defaults of every request (moonlet.http.configure changes them).
local config = {
    pool_size = 64,          -- idle connections kept per origin
    idle_timeout = 60,       -- seconds an idle connection may wait in the pool
    connect_timeout = 10,    -- seconds for the TCP (and TLS) connection
    read_timeout = 60,       -- seconds a read may wait for the next bytes
    send_timeout = 60,       -- seconds a send may wait
    max_body = nil,          -- response body limit in bytes (nil: none)
    user_agent = "moonlet/" .. tostring(core.version),
    proxy = false,           -- an http:// proxy URL every request goes through (false: none)
    no_proxy = false,        -- "host, .domain, *": hosts reached without the proxy
    jar = false,             -- a cookie jar (moonlet.http.cookie_jar()) every request uses
}

local MAX_LINE = 16384        -- a chunk-size or trailer line (heads: bindings/http_client.c)
local MAX_HEAD = 65536        -- the trailers
local READ_SIZE = 65536       -- bytes asked from the socket at a time
local DRAIN_MAX = 65536       -- a redirect's body is read to reuse the connection up to this
local SMALL_BODY = 65536      -- a body up to this is waited for whole, then taken in one piece
local SMALL_WAITS = 4         -- ... in at most this many more reads

-- -- Sockets ------------------------------------------------------------------------------------

local function close_conn(conn)
    local sock = conn.sock
    if sock then
        conn.sock = nil
        sock:close()
    end
end

-- The C socket methods (bindings/tcp.c, which moonlet.tcp wraps) when the socket is one of theirs:
-- they answer CANCEL instead of raising, so no pcall is needed around each wait.
local raw = core.tcp_raw
local raw_mt = core.tcp_mt
local tcp_connect = tcp.connect

-- Sets the socket's timeout for the next wait: op_timeout (seconds; 0 or nil: none) bounded by
-- the request's deadline. False when the deadline has passed.
local function arm(conn, op_timeout)
    local t = op_timeout or 0
    local dl = conn.deadline
    if dl then
        local left = dl - now()
        if left <= 0 then return false end
        if t <= 0 or left < t then t = left end
    end
    if t > 0 and t < 0.001 then t = 0.001 end
    if t ~= conn.tmo then
        conn.settimeout(conn.sock, t > 0 and t or nil) -- nil: no timeout (0 would expire at once)
        conn.tmo = t
    end
    return true
end

-- Calls fn(sock, arg) (a socket method that waits) after arming the timeout. A cancelled wait
-- (the C methods answer CANCEL, moonlet.tcp's raise moonlet.CANCELLED) closes the connection,
-- then raises CANCELLED on: a cancelled request never leaves a half-read connection behind.
local function sock_wait(conn, fn, arg, op_timeout)
    local sock = conn.sock
    if not sock then return nil, "closed" end
    if not arm(conn, op_timeout) then return nil, "timeout" end
    if conn.raw then
        local a, b, c = fn(sock, arg)
        if a ~= CANCEL then return a, b, c end
        close_conn(conn)
        error(CANCELLED, 0)
    end
    local ok, a, b, c = pcall(fn, sock, arg)
    if ok and a ~= CANCEL then return a, b, c end
    close_conn(conn)
    if ok then error(CANCELLED, 0) end
    error(a, 0)
end

-- -- Reading a response ----------------------------------------------------------------------

-- Buffered sockets (receive_any): more bytes appended to conn.buf; true or nil, err.
local function fill(conn)
    local d, err = sock_wait(conn, conn.receive_any, READ_SIZE, conn.read_timeout)
    if not d then return nil, err end
    conn.got = true
    local buf, pos = conn.buf, conn.pos
    if pos > #buf then
        conn.buf = d
    else
        conn.buf = sub(buf, pos) .. d
    end
    conn.pos = 1
    return true
end

-- One line without its CRLF (or bare LF); nil, err.
local function read_line(conn)
    local buf, pos = conn.buf, conn.pos
    local from = pos
    while true do
        local nl = find(buf, "\n", from, true)
        if nl then
            conn.pos = nl + 1
            local e = nl - 1
            if e >= pos and byte(buf, e) == 13 then e = e - 1 end
            return sub(buf, pos, e)
        end
        if #buf - pos >= MAX_LINE then return nil, "bad response" end
        local ok, err = fill(conn)
        if not ok then return nil, err end
        from = #buf - pos + 2 -- where the new bytes start, now that pos is 1
        buf, pos = conn.buf, 1
    end
end

-- Up to max bytes (at least one), or nil, err ("closed" at the end of the stream).
local function read_some(conn, max)
    local buf, pos = conn.buf, conn.pos
    local avail = #buf - pos + 1
    if avail <= 0 then
        local d, err = sock_wait(conn, conn.receive_any, max, conn.read_timeout)
        if d then conn.got = true end
        return d, err
    end
    if avail <= max then
        conn.buf, conn.pos = "", 1
        return pos == 1 and buf or sub(buf, pos)
    end
    conn.pos = pos + max
    return sub(buf, pos, pos + max - 1)
end

local lower_names, lower_count = {}, 0 -- "Content-Length" -> "content-length", bounded
local function lower_name(name)
    local l = lower_names[name]
    if l then return l end
    l = lower(name)
    if lower_count < 1000 then
        lower_count = lower_count + 1
        lower_names[name] = l
    end
    return l
end

-- The status line and header section, parsed in C (bindings/http_client.c) once the buffer holds
-- all of it: status, reason, version, headers, mode, length, keep (the framing of the body and
-- whether the response lets the connection be reused), the buffer and position of the head, and
-- coded (a gzip or deflate transfer coding wraps the body); or nil, err. headers is false when the
-- table is left to be made if it is asked for.
local function read_head(conn, is_head)
    if conn.pos > #conn.buf then -- nothing buffered (the usual case): wait for the response first
        local ok, err = fill(conn)
        if not ok then return nil, err end
    end
    local buf, pos = conn.buf, conn.pos
    local status, reason, version, h, p, mode, len, keep, coded = parse_head(buf, pos, is_head)
    if status then
        conn.pos = p
        return status, reason, version, h, mode, len, keep, buf, pos, coded
    end
    if status == nil then return nil, reason end
    local ok, err = fill(conn) -- not all there yet
    if not ok then return nil, err end
    return read_head(conn, is_head)
end

-- -- URLs ----------------------------------------------------------------------------------------

local base64 = core.base64_encode

local function unescape(s)
    return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

local function escape(s)
    return (gsub(tostring(s), "[^%w%-%._~]", function(c) return format("%%%02X", byte(c)) end))
end

local encode_query, encode_uri, url_resolve = url_mod.encode_query, url_mod.encode_uri, url_mod.resolve
local url_cache, url_count = {}, 0

-- A parsed URL { scheme, host, port, target, hostport, key, https, auth } or nil, err. Parsed
-- URLs are cached (a bounded table): an app fetches the same few URLs again and again.
local function parse_url(url)
    local u = url_cache[url]
    if u then return u end
    local scheme, rest = match(url, "^(%a[%w+.-]*)://(.*)$")
    if not scheme then return nil, "bad url" end
    scheme = lower(scheme)
    if scheme ~= "http" and scheme ~= "https" then return nil, "unsupported scheme" end
    local ae = find(rest, "[/?#]") or #rest + 1
    local authority, target = sub(rest, 1, ae - 1), sub(rest, ae)
    local hash = find(target, "#", 1, true)
    if hash then target = sub(target, 1, hash - 1) end
    if target == "" then
        target = "/"
    elseif byte(target) == 63 then -- "?"
        target = "/" .. target
    end
    if find(target, "[%z\1-\31\127]") then return nil, "bad url" end
    target = encode_uri(target) -- a space, a non-ASCII byte: percent-encoded
    local auth
    local at = match(authority, "^.*()@")
    if at then
        auth = "Basic " .. base64(unescape(sub(authority, 1, at - 1)))
        authority = sub(authority, at + 1)
    end
    local host, port, v6
    if byte(authority) == 91 then -- "[v6]:port"
        host, port = match(authority, "^%[([%x:.]+)%]:?(%d*)$")
        v6 = true
    else
        host, port = match(authority, "^([%w.%-_]+):?(%d*)$")
    end
    if not host then return nil, "bad url" end
    host = lower(host)
    local https = scheme == "https"
    local default_port = https and 443 or 80
    port = port ~= "" and tonumber(port) or default_port
    if port < 1 or port > 65535 then return nil, "bad url" end
    local hostname = v6 and "[" .. host .. "]" or host
    u = {
        url = url, scheme = scheme, host = host, port = port, target = target, https = https,
        hostport = port == default_port and hostname or hostname .. ":" .. port,
        key = scheme .. "://" .. hostname .. ":" .. port, auth = auth,
    }
    if url_count >= 512 then url_cache, url_count = {}, 0 end
    url_count = url_count + 1
    url_cache[url] = u
    return u
end

-- The absolute URL a Location value points to from the request to u with target (RFC 3986 5.2:
-- "" and "#f" are that URL itself, dot segments are removed), the bytes a URI may not hold
-- percent-encoded first, as browsers and requests do.
local function resolve(u, target, loc)
    return url_resolve(u.scheme .. "://" .. u.hostport .. target, encode_uri(loc))
end

-- -- The pool ------------------------------------------------------------------------------------

local pools = {}          -- origin key -> stack of idle conns (the newest on top)
local last_sweep = 0

local function sweep(t)
    last_sweep = t
    for key, p in pairs(pools) do
        local n, j = #p, 0
        for i = 1, n do
            local c = p[i]
            if c.expires > t then
                j = j + 1
                p[j] = c
            else
                close_conn(c)
            end
        end
        for i = j + 1, n do p[i] = nil end
        if j == 0 then pools[key] = nil end
    end
end

-- An idle connection to origin key that has not expired, or nil. The time of the checkout is kept
-- on the connection (taken_at): its idle time is counted from there when it comes back (one clock
-- read per request; a long request only makes the connection expire earlier).
-- (The hot paths of a request have no loop that runs once per request: LuaJIT aborts the traces
-- of those and ends up interpreting the whole request. Hence tail calls for the rare repeats.)
-- Nothing unread and no close or error seen on conn's socket (it reads ahead while idle): only such
-- a connection is taken from the pool (one with a response's extra bytes, or that the server
-- closed meanwhile, is closed there), else they would reach the next request.
local poolable = raw and raw.poolable
local closed_cleanly = raw and raw.closed_cleanly
local function clean(conn)
    if conn.raw then return poolable(conn.sock) end
    return true
end

local function checkout(key, t)
    if t - last_sweep > 1 then sweep(t) end
    local p = pools[key]
    local n = p and #p or 0
    if n == 0 then return nil end
    local c = p[n]
    p[n] = nil
    if c.expires > t and clean(c) then
        c.taken_at = t
        return c
    end
    close_conn(c)
    return checkout(key, t) -- the next one down
end

-- Gives a connection whose response was read completely back to its pool (or closes it when the
-- pool is full).
local function checkin(conn)
    local key = conn.key
    local p = pools[key]
    if not p then
        p = {}
        pools[key] = p
    end
    local n = #p
    if n >= conn.pool_size or conn.idle_timeout <= 0 then -- checkout looks at clean(conn)
        close_conn(conn)
        return
    end
    conn.expires = conn.taken_at + conn.idle_timeout
    conn.deadline = nil
    p[n + 1] = conn
end

-- syntax: stats = moonlet.http.pool_stats() -- { idle = n, origins = { [origin] = n } }
function _M.pool_stats()
    local origins, idle = {}, 0
    for key, p in pairs(pools) do
        if #p > 0 then
            origins[key] = #p
            idle = idle + #p
        end
    end
    return { idle = idle, origins = origins }
end

-- syntax: moonlet.http.close_idle() -- closes every idle pooled connection now
function _M.close_idle()
    for key, p in pairs(pools) do
        for i = 1, #p do close_conn(p[i]) end
        pools[key] = nil
    end
end

-- -- A caller's headers (names checked by request: strings) -------------------------------------

local BODY_HEADERS = { ["content-type"] = true, ["content-length"] = true, ["transfer-encoding"] = true }
-- not carried to another origin on a redirect: credentials, and a Host the caller set for this one
-- (the next origin gets its own, as curl does)
local ORIGIN_HEADERS = { authorization = true, cookie = true, ["proxy-authorization"] = true, host = true }
local CONTENT_TYPE = { ["content-type"] = true }
local PROXY_AUTHORIZATION = { ["proxy-authorization"] = true }
local AUTHORIZATION = { authorization = true }

-- A copy of headers without the fields whose lower-case names are keys of drop.
local function without(headers, drop)
    local copy = {}
    for k, v in pairs(headers) do
        if not drop[lower(k)] then copy[k] = v end
    end
    return copy
end

-- The value of the header whose lower-case name is lname, under any spelling, or nil (the first in
-- pairs()'s order; bindings/http_client.c, a C call rather than a loop: see build_request).
local c_header_named = core.http_header_named
local function header_named(headers, lname)
    if not headers then return nil end
    return c_header_named(headers, lname)
end

-- -- Proxies ------------------------------------------------------------------------------------
-- A request through an http:// proxy: to an http:// URL it goes to the proxy with its URL as the
-- request target (absolute form) and the proxy's credentials as Proxy-Authorization; to an https://
-- URL a CONNECT makes a tunnel through the proxy first, and TLS runs end to end inside it. Pooled
-- connections are kept per origin and proxy.

-- Raises (at level, counted from here) unless p is an http:// URL (credentials may be in it) and
-- no_proxy a string; "" is none for either (an environment variable set empty).
local function check_proxy(p, no_proxy, who, level)
    if p and p ~= "" then
        local pu = type(p) == "string" and parse_url(p)
        if not pu or pu.https then error(who .. ": proxy must be an http:// URL", level) end
    end
    if no_proxy and type(no_proxy) ~= "string" then
        error(who .. ": no_proxy is a string of host names", level)
    end
end

-- An IPv4 address as a number, or nil.
local function ipv4(s)
    local a, b, c, d = match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then return nil end
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
    return ((a * 256 + b) * 256 + c) * 256 + d
end

-- 16 hex digits of s's SHA-256: credentials in a pool key without showing them
local function short_digest(s)
    return (gsub(sub(core.digest("sha256", s), 1, 8), ".", function(c) return format("%02x", byte(c)) end))
end

-- Whether host is one of no_proxy's entries, as curl reads NO_PROXY: "*" (every host), a name
-- (itself and its subdomains; ".name" and "*.name" alike), an IP address (only itself), an IPv4
-- network "a.b.c.d/n"; a port after an entry, brackets around an IPv6 one and a trailing dot are
-- ignored.
local function bypasses(host, no_proxy)
    if byte(host, -1) == 46 then host = sub(host, 1, -2) end
    local host_ip = ipv4(host) or find(host, ":", 1, true)
    for item in gmatch(no_proxy, "[^,%s]+") do
        item = lower(item)
        if item == "*" then return true end
        local net, bits = match(item, "^([%d.]+)/(%d+)$")
        if net then
            local h, n = ipv4(host), ipv4(net)
            bits = tonumber(bits)
            if h and n and bits <= 32 then
                local size = 2 ^ (32 - bits)
                if floor(h / size) == floor(n / size) then return true end
            end
        else
            item = match(item, "^%[(.*)%]") -- [v6], or a name or IPv4 address with a :port
                or (not find(item, ":.*:") and match(item, "^(.-):%d+$")) or item
            item = match(item, "^%*?%.?(.-)%.?$") -- *.name, .name, name.
            if host == item or (not host_ip and #host > #item
                and sub(host, -#item - 1) == "." .. item) then
                return true
            end
        end
    end
    return false
end

-- The parsed proxy URL a request to u goes through, or nil: the request's proxy (false or "":
-- none), else configure's, unless u's host is in no_proxy (the request's, else configure's).
local function proxy_for(u, o)
    local p = o.proxy
    if p == nil then p = config.proxy end
    if not p or p == "" then return nil end
    local no = o.no_proxy
    if no == nil then no = config.no_proxy end
    if no and bypasses(u.host, no) then return nil end
    local px = parse_url(p)
    if not px.pool_key then -- the pool's name for it: its credentials as a digest, never in clear
        px.pool_key = px.key .. (px.auth and "#" .. short_digest(px.auth) or "")
    end
    return px
end

-- A caller's Proxy-Authorization header is for the proxy, never for an origin: on an http://
-- request through a proxy it goes as it is; for a tunnel it goes on the CONNECT (returned here,
-- and taken out of the headers); without a proxy it is dropped. Returns it and the headers.
local function take_proxy_auth(headers)
    local v = header_named(headers, "proxy-authorization")
    if v == nil then return nil, headers end -- the usual case: no copy
    return v, without(headers, PROXY_AUTHORIZATION)
end

-- Raises (at level, counted from here) unless jar is nil, false or a cookie jar.
local function check_jar(jar, who, level)
    if jar ~= nil and jar ~= false and (type(jar) ~= "table" or type(jar.header) ~= "function"
        or type(jar.store) ~= "function") then
        error(who .. ": jar is a cookie jar (moonlet.http.cookie_jar())", level + 1)
    end
end

-- user_agent: a header value (no CR, LF or NUL), or false for none; nil: the default
local function check_user_agent(ua, who, level)
    if ua ~= nil and ua ~= false and (type(ua) ~= "string" or find(ua, "[%z\r\n]")) then
        error(who .. ": user_agent is a string without CR, LF or NUL, or false", level + 1)
    end
end

-- syntax: moonlet.http.configure{ pool_size =, idle_timeout =, connect_timeout =, read_timeout =,
-- send_timeout =, max_body =, user_agent =, proxy =, no_proxy =, jar = } -- defaults of later
-- requests
function _M.configure(opts)
    if type(opts) ~= "table" then error("moonlet.http.configure: expected a table", 2) end
    check_proxy(opts.proxy, opts.no_proxy, "moonlet.http.configure", 3)
    check_jar(opts.jar, "moonlet.http.configure", 2)
    check_user_agent(opts.user_agent, "moonlet.http.configure", 2)
    for k, v in pairs(opts) do
        if config[k] == nil and k ~= "max_body" then
            error("moonlet.http.configure: unknown option " .. tostring(k), 2)
        end
        config[k] = v
    end
    url_cache, url_count = {}, 0 -- cached request heads carry the user agent
end

-- -- Connecting ------------------------------------------------------------------------------------

local function new_conn(u, tls_key)
    return {
        sock = nil, buf = "", pos = 1, got = false, tmo = nil, reused = 0,
        raw = false, send = nil, receive_any = nil, settimeout = nil, keepalive = true,
        key = tls_key, deadline = nil, expires = 0, taken_at = 0,
        read_timeout = 0, send_timeout = 0, pool_size = 0, idle_timeout = 0, host = u.host,
    }
end

-- A new connection to u (TLS included for https), or nil, err.
-- Makes a tunnel to u through the proxy conn is connected to (CONNECT): true, or nil, err.
local function tunnel(conn, u, px, t, auth)
    local authority = match(u.key, "^%a+://(.*)$") -- host:port, [v6]:port
    auth = auth or px.auth
    local req = "CONNECT " .. authority .. " HTTP/1.1\r\nHost: " .. authority .. "\r\n"
        .. (auth and "Proxy-Authorization: " .. tostring(auth) .. "\r\n" or "") .. "\r\n"
    local ok, err = sock_wait(conn, conn.send, req, t)
    if not ok then return nil, err end
    conn.read_timeout = t
    local status, reason = read_head(conn, false)
    if not status then return nil, reason == "timeout" and reason or "proxy: " .. tostring(reason) end
    if status < 200 or status > 299 then return nil, "proxy: " .. status end
    if conn.pos <= #conn.buf then return nil, "proxy: bytes after its answer to CONNECT" end
    conn.buf, conn.pos = "", 1
    return true
end

local function connect(u, key, o, deadline, px, proxy_auth)
    local conn = new_conn(u, key)
    conn.deadline = deadline
    conn.taken_at = now()
    local t = o.connect_timeout or config.connect_timeout
    if not t or t <= 0 then t = 3600 end
    if deadline then
        local left = deadline - now()
        if left <= 0 then return nil, "timeout" end
        if left < t then t = left end
    end
    local via = px or u -- a proxy: the TCP connection goes to it
    local sock, err
    if o.unix then -- o.unix: the URL names the origin (Host, TLS name), the socket is the path
        sock, err = tcp_connect("unix:" .. o.unix, { timeout = t }) -- raises when cancelled
    else
        sock, err = tcp_connect(via.host, via.port, { timeout = t }) -- raises when cancelled
    end
    if not sock then return nil, px and err ~= "timeout" and "proxy: " .. err or err end
    conn.sock = sock
    if raw and raw_mt and getmetatable(sock) == raw_mt then
        conn.raw = true
        conn.send, conn.receive_any, conn.settimeout = raw.send, raw.receive_any, raw.settimeout
    else
        conn.send, conn.receive_any, conn.settimeout = sock.send, sock.receive_any, sock.settimeout
    end
    if px and u.https then
        if not arm(conn, t) then
            close_conn(conn)
            return nil, "timeout"
        end
        local dl = conn.deadline -- the whole tunnel within the connect timeout, not each read
        local limit = now() + t
        if not dl or limit < dl then conn.deadline = limit end
        local ok, terr = tunnel(conn, u, px, t, proxy_auth)
        conn.deadline = dl
        if not ok then
            close_conn(conn)
            return nil, terr
        end
    end
    if u.https then
        local tls_opts = { server_name = u.host, verify = o.verify ~= false, alpn = "http/1.1" }
        if o.tls then for k, v in pairs(o.tls) do tls_opts[k] = v end end
        -- the handshake is bounded by the connect timeout; moonlet.tcp's tls raises when cancelled
        if not arm(conn, t) then
            close_conn(conn)
            return nil, "timeout"
        end
        local pok, ok, terr = pcall(sock.tls, sock, tls_opts)
        if not pok or ok == CANCEL then
            close_conn(conn)
            error(pok and CANCELLED or ok, 0)
        end
        err = terr
        if not ok then
            close_conn(conn)
            if err and sub(err, 1, 4) ~= "tls:" and err ~= "timeout" and err ~= "closed" then
                err = "tls: " .. err
            end
            return nil, err or "tls: handshake failed"
        end
    end
    return conn
end

-- -- Requests -------------------------------------------------------------------------------------

local IDEMPOTENT = { GET = true, HEAD = true, OPTIONS = true, TRACE = true, PUT = true, DELETE = true }
local WANTS_BODY = { POST = true, PUT = true, PATCH = true }
local REDIRECT = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }

-- A header name is a token (RFC 9110 5.6.2), a value holds no control character but HT (5.5): CR,
-- LF or NUL would split the request, and any other a conforming server refuses with a 400.
local function bad_name(s)
    return not find(s, "^[A-Za-z0-9!#$%%&'*+%-.^_`|~]+$")
end

local function bad_value(s)
    return find(s, "[%z\1-\8\10-\31\127]") ~= nil
end

-- The first field of headers (a table) that may not be sent: 1, name for a name that is not a
-- token (or not a string), 2, name for a value; nothing when all may. core.http_check_headers
-- checks the usual table in one C call (a Lua loop here aborted the JIT trace of every request
-- with headers, which then ran in the interpreter up to its first wait: callgrind, GET /p/b of
-- examples/bench_proxy.lua, 61k -> 50k instructions a request with the formatting below); a value
-- tostring turns into text (a table, a boolean, ...) is checked here.
local c_check_headers = core.http_check_headers
local function check_headers(headers)
    local kind, name = c_check_headers(headers)
    if kind ~= 3 then return kind, name end
    for k, v in pairs(headers) do
        if type(k) ~= "string" or bad_name(k) then return 1, k end
        if type(v) == "table" then
            for _, x in ipairs(v) do
                if bad_value(tostring(x)) then return 2, k end
            end
        elseif bad_value(tostring(v)) then
            return 2, k
        end
    end
end

-- The header lines of headers (a checked table) and what build_request must not add again:
-- core.http_format_headers in one C call (no loop in the trace of the request; see check_headers),
-- or this loop for a table with a value tostring turns into text (the C function declines it).
local format_headers = core.http_format_headers
local function format_headers_lua(headers, id_name)
    local parts, n = {}, 0
    local cl, host, ua, te, ae, conn, auth, pauth, own_id
    for k, v in pairs(headers) do
        local lk = lower_name(k)
        if lk == id_name then own_id = true end
        if lk == "host" then host = true
        elseif lk == "user-agent" then ua = true
        elseif lk == "content-length" then cl = v
        elseif lk == "transfer-encoding" then te = true
        elseif lk == "accept-encoding" then ae = true
        elseif lk == "connection" then conn = true
        elseif lk == "authorization" then auth = true
        elseif lk == "proxy-authorization" then pauth = true
        end
        if type(v) == "table" then
            for _, x in ipairs(v) do
                parts[n + 1], parts[n + 2], parts[n + 3], parts[n + 4] = k, ": ", tostring(x), "\r\n"
                n = n + 4
            end
        else
            parts[n + 1], parts[n + 2], parts[n + 3], parts[n + 4] = k, ": ", tostring(v), "\r\n"
            n = n + 4
        end
    end
    return concat(parts, "", 1, n), cl, host, ua, te, ae, conn, auth, pauth, own_id
end

-- The request head (and a small body appended) as one string; for a body made by a function,
-- whether it is to be sent with chunked framing (it is unless the headers give a Content-Length)
-- and that Content-Length.
local function build_request(method, u, target, headers, body, o, decompress, px)
    local id_header, id -- moonlet.request_id({ propagate = true })'s, for this request's calls
    if request_id.propagating then id_header, id = request_id.outgoing() end
    if not headers and not body and not decompress and not u.auth and o.keepalive ~= false
        and method == "GET" and target == u.target and o.user_agent == nil and not px and not id then
        local r = u.get_request -- the common case, built once per URL
        if not r then
            local ua = config.user_agent
            r = "GET " .. target .. " HTTP/1.1\r\nHost: " .. u.hostport .. "\r\n"
                .. (ua and "User-Agent: " .. ua .. "\r\n" or "") .. "\r\n"
            u.get_request = r
        end
        return r
    end
    -- through a proxy (http:// URLs only: https goes through a tunnel), the URL is the target
    local parts = { method, " ", px and u.scheme .. "://" .. u.hostport .. target or target, " HTTP/1.1\r\n" }
    local n = 4
    local has_host, has_ua, has_cl, has_te, has_ae, has_conn, has_auth, has_pauth
    if headers then
        local lines, cl, own_id
        lines, cl, has_host, has_ua, has_te, has_ae, has_conn, has_auth, has_pauth, own_id =
            format_headers(headers, id and lower_name(id_header))
        if not lines then
            lines, cl, has_host, has_ua, has_te, has_ae, has_conn, has_auth, has_pauth, own_id =
                format_headers_lua(headers, id and lower_name(id_header))
        end
        if own_id then id = nil end -- the call's own
        if cl ~= nil then has_cl = tonumber(type(cl) == "table" and cl[1] or cl) or -1 end
        n = n + 1
        parts[n] = lines
    end
    if not has_host then
        parts[n + 1], parts[n + 2] = "Host: ", u.hostport .. "\r\n"
        n = n + 2
    end
    local ua = o.user_agent
    if ua == nil then ua = config.user_agent end
    if not has_ua and ua then -- (false: none, as nginx's proxy_pass and node's http send none)
        parts[n + 1], parts[n + 2] = "User-Agent: ", ua .. "\r\n"
        n = n + 2
    end
    if id then
        parts[n + 1], parts[n + 2], parts[n + 3], parts[n + 4] = id_header, ": ", id, "\r\n"
        n = n + 4
    end
    if u.auth and not has_auth then
        parts[n + 1], parts[n + 2] = "Authorization: ", u.auth .. "\r\n"
        n = n + 2
    end
    if px and px.auth and not has_pauth then
        parts[n + 1], parts[n + 2] = "Proxy-Authorization: ", px.auth .. "\r\n"
        n = n + 2
    end
    if decompress and not has_ae then
        n = n + 1
        parts[n] = "Accept-Encoding: gzip\r\n"
    end
    local streamed = type(body) == "function"
    if streamed then
        if not has_cl and not has_te then
            n = n + 1
            parts[n] = "Transfer-Encoding: chunked\r\n"
        end
    elseif not has_cl and not has_te and (body or WANTS_BODY[method]) then
        n = n + 1
        parts[n] = "Content-Length: " .. (body and #body or 0) .. "\r\n"
    end
    if o.keepalive == false and not has_conn then
        n = n + 1
        parts[n] = "Connection: close\r\n"
    end
    n = n + 1
    parts[n] = "\r\n"
    if body and not streamed and #body <= 65536 then
        n = n + 1
        parts[n] = body
    end
    if not streamed then return concat(parts, "", 1, n) end
    return concat(parts, "", 1, n), not has_cl, has_cl
end

-- Sends a body made by a function (a request's `body = function`): each call returns the next
-- piece, a string ("" is skipped), or nil at the end; the function may wait (read a file, another
-- response: res:chunks() and req:chunks() are such functions). Chunked framing unless the caller's
-- headers gave a Content-Length (length: the pieces must make exactly that many bytes). True, or
-- nil, err (a send failed). When the function raises, returns something else, or makes more or
-- fewer bytes than the Content-Length said, the connection is closed and an error raised.
local function send_stream(conn, produce, chunked, length)
    local send, timeout = conn.send, conn.send_timeout
    local sent = 0
    while true do
        local ok, piece = pcall(produce)
        if ok and piece ~= nil and type(piece) ~= "string" then
            ok, piece = false, "moonlet.http: a body function returns strings, then nil, not a "
                .. type(piece)
        end
        if ok and length then
            local n = sent + (piece and #piece or 0)
            if n > length or (piece == nil and n < length) then
                ok, piece = false, ("moonlet.http: the body function made %s bytes than the %d of its "
                    .. "Content-Length"):format(n > length and "more" or "fewer", length)
            end
        end
        if not ok then
            close_conn(conn)
            error(piece, 0)
        end
        if piece == nil then break end
        sent = sent + #piece
        if #piece > 0 then
            local data = piece
            if chunked then data = { format("%x\r\n", #piece), piece, "\r\n" } end
            local done, err = sock_wait(conn, send, data, timeout)
            if not done then return nil, err end
        end
    end
    if chunked then return sock_wait(conn, send, "0\r\n\r\n", timeout) end
    return true
end

local res_methods = {}
-- res.headers is made from the head's bytes (res._hb at res._hp) the first time it is read: most
-- callers only want the status and the body.
local res_mt = { __name = "moonlet.http.response", __index = function(res, k)
    if k == "headers" then
        local hb = rawget(res, "_hb")
        if hb then
            local h = parse_headers(hb, res._hp)
            res.headers, res._hb = h, nil
            return h
        end
        return nil
    end
    return res_methods[k]
end }

local NONE, LENGTH, CHUNKED, CLOSE = 0, 1, 2, 3
local MAX_INTERIM = 16 -- 1xx responses skipped before one response; more is "bad response"

-- Ends the body: the connection goes back to the pool when reusable, else it is closed.
local function finish(res)
    local conn = res._conn
    res._conn = nil
    res._done = true
    local z = res._z
    if z then
        res._z = nil
        z:close()
    end
    if conn then
        if res._keep and conn.pos > #conn.buf and conn.sock then
            checkin(conn)
        else
            close_conn(conn)
        end
    end
end

-- Ends the body with an error: the connection is closed; later reads return the same error.
local function fail(res, err)
    res._keep = false
    finish(res)
    res._err = err
    return nil, err
end

-- The next piece of the body as it is on the wire (still encoded), nil at its end, or nil, err.
local function next_raw(res)
    local mode, conn = res._mode, res._conn
    if mode == LENGTH then
        local left = res._left
        if left <= 0 then return nil end
        local d, err = read_some(conn, left < READ_SIZE and left or READ_SIZE)
        if not d then return nil, err end
        res._left = left - #d
        return d
    elseif mode == CHUNKED then
        local left = res._left
        if left <= 0 then
            local line, err
            if res._in_chunk then -- the CRLF after the previous chunk's data
                line, err = read_line(conn)
                if not line then return nil, err end
                if line ~= "" then return nil, "bad response" end
            end
            line, err = read_line(conn)
            if not line then return nil, err end
            -- chunk-size [BWS ";" extension]: anything else after the size is malformed
            local hex, after = match(line, "^(%x+)[ \t]*(.*)$")
            if not hex or #hex > 12 then return nil, "bad response" end
            local c = byte(after)
            if c and c ~= 59 then return nil, "bad response" end -- ";"
            left = tonumber(hex, 16)
            if left == 0 then -- the last chunk: trailers (dropped) until an empty line
                local size = 0
                repeat
                    line, err = read_line(conn)
                    if not line then return nil, err end
                    size = size + #line
                    if size > MAX_HEAD then return nil, "bad response" end
                until line == ""
                res._left, res._in_chunk = 0, false
                res._mode = NONE
                return nil
            end
            res._in_chunk = true
        end
        local d, err = read_some(conn, left < READ_SIZE and left or READ_SIZE)
        if not d then return nil, err end
        res._left = left - #d
        return d
    elseif mode == CLOSE then
        local d, err = read_some(conn, READ_SIZE)
        if not d then
            -- the end of the body is the server's FIN; a reset cuts it ("closed" for both here)
            if err == "closed" and (not conn.raw or closed_cleanly(conn.sock)) then return nil end
            return nil, err
        end
        return d
    end
    return nil
end

-- The next piece of the body (decoded when asked), nil at its end, or nil, err.
local function next_piece(res)
    if res._done then return nil, res._err end
    while true do
        local d, err = next_raw(res)
        if not d then
            if err then return fail(res, err) end
            local z = res._z
            if z and res._total > 0 then -- (an empty body is empty, whatever its encoding says)
                local out, done = z:inflate("", res._max)
                if not out then return fail(res, done == "too large" and done or "bad response") end
                if not done then return fail(res, "bad response") end
                if out ~= "" then -- rare: the last bytes come out only now
                    finish(res)
                    return out
                end
            end
            finish(res)
            return nil
        end
        local total = res._total + #d
        res._total = total
        local max = res._max
        if max and total > max then return fail(res, "too large") end
        local z = res._z
        if z then
            local out, done = z:inflate(d, max)
            if not out then return fail(res, done == "too large" and done or "bad response") end
            if res._mode == LENGTH and res._left <= 0 then
                if not done then return fail(res, "bad response") end
                finish(res)
                if out == "" then return nil end
            end
            if out ~= "" then return out end
        else
            if res._mode == LENGTH and res._left <= 0 then finish(res) end
            return d
        end
    end
end

-- syntax: piece, err = res:read() -- the next piece of a streamed body; nil at its end
function res_methods:read()
    local body = rawget(self, "body")
    if body then
        if self._given then return nil end
        self._given = true
        if body == "" then return nil end
        return body
    end
    return next_piece(self)
end

-- syntax: for chunk in res:chunks() do ... end -- body pieces as they arrive (stream = true); a
-- broken body (timeout, closed, too large) raises, so a truncated body is never taken for whole
function res_methods:chunks()
    return function()
        local piece, err = self:read()
        if err then error("moonlet.http: response body: " .. err, 2) end
        return piece
    end
end

-- syntax: body, err = res:read_body() -- the rest of the body as one string
function res_methods:read_body()
    local body = rawget(self, "body")
    if body then return body end
    local parts, n = {}, 0
    while true do
        local piece, err = next_piece(self)
        if err then return nil, err end
        if not piece then break end
        n = n + 1
        parts[n] = piece
    end
    body = n == 1 and parts[1] or concat(parts, "", 1, n)
    self.body = body
    self._given = true
    return body
end

-- syntax: value, err = res:json() -- the body decoded as JSON (a streamed body is read first); nil,
-- err when it cannot be read or is not JSON (JSON's null is moonlet.json.null)
function res_methods:json()
    local body, err = self:read_body()
    if not body then return nil, err end
    local v
    v, err = json.decode(body)
    if v == nil then return nil, "invalid JSON: " .. tostring(err) end
    return v
end

-- syntax: ok, err = res:send(data) -- a 101 (an Upgrade the request asked for, stream = true):
-- sends bytes of the new protocol to the server, whose bytes res:read() gives; one sender at a
-- time, beside one reader. nil, "closed" once the connection is gone; raises on another response.
function res_methods:send(data)
    if self.status ~= 101 then error("moonlet.http: res:send is for a 101 response", 2) end
    local conn = self._conn
    if not conn then return nil, self._err or "closed" end
    return sock_wait(conn, conn.send, data, conn.send_timeout)
end

-- syntax: old_send, old_read = res:settimeouts(send_timeout, read_timeout) -- a streamed response's
-- (a 101's): the seconds each later res:send or res:read may wait, in place of the request's (0: no
-- limit; nil: unchanged; the request's timeout, its deadline, still bounds both); returns the
-- timeouts it replaced, nothing once the connection is gone. moonlet.proxy's tunnel reads without
-- a limit and watches both directions itself.
function res_methods:settimeouts(send_timeout, read_timeout)
    for _, v in pairs({ send_timeout or 0, read_timeout or 0 }) do
        if type(v) ~= "number" or v ~= v or v < 0 then
            error("moonlet.http: res:settimeouts: a timeout is a number of seconds, 0 or more", 2)
        end
    end
    local conn = self._conn
    if not conn then return end
    local old_send, old_read = conn.send_timeout, conn.read_timeout
    if send_timeout then conn.send_timeout = send_timeout end
    if read_timeout then conn.read_timeout = read_timeout end
    return old_send, old_read
end

-- syntax: res:close() -- drops the rest of a streamed body (its connection is closed, not pooled)
function res_methods:close()
    if not self._done and not rawget(self, "body") then
        self._keep = false
        finish(self)
        self._err = "closed"
    end
end

-- The body on conn when it is all buffered already, or soon (a small one that came in a few
-- pieces): taken in one piece, and the connection pooled or closed. Returns the body; nil, err when
-- it failed (the connection is closed); false when it is to be read piece by piece.
local function take_body(conn, mode, len, max, keep, waits)
    local buf, pos = conn.buf, conn.pos
    local whole, stop = false
    if mode == LENGTH then
        stop = pos + len
        if stop - 1 <= #buf then
            whole = (pos == 1 and stop - 1 == #buf) and buf or sub(buf, pos, stop - 1)
        end
    else
        whole, stop = dechunk(buf, pos)
        if whole == nil or (whole and max and #whole > max) then
            close_conn(conn)
            return nil, whole == nil and "bad response" or "too large"
        end
    end
    if whole then
        if stop > #buf then
            conn.buf, conn.pos = "", 1
            if keep and conn.sock then
                checkin(conn)
                return whole
            end
        else
            conn.pos = stop
        end
        close_conn(conn) -- not reusable, or bytes after the response: never pooled
        return whole
    end
    local have = #buf - pos + 1
    if waits >= SMALL_WAITS or have > SMALL_BODY or (mode == LENGTH and len > SMALL_BODY)
        or (max and have > max) then
        return false
    end
    local more, err = fill(conn)
    if not more then
        close_conn(conn)
        return nil, err
    end
    return take_body(conn, mode, len, max, keep, waits + 1)
end

-- Two inflaters in a row, for a body with a compression transfer coding around a compressed content
-- coding (decompress = true): the outer's output is the inner's input; done once both ended.
local chain_mt = { __index = {
    inflate = function(c, d, max)
        local mid, done = c.outer:inflate(d, max)
        if not mid then return nil, done end
        local out, inner_done = c.inner:inflate(mid, max)
        if not out then return nil, inner_done end
        return out, done and inner_done
    end,
    close = function(c)
        c.outer:close()
        c.inner:close()
    end,
} }

-- The response whose head was read on conn: framed, its body read unless o.stream; or nil, err.
-- The usual response (a small body, all there or soon) is a table of its public fields only; one
-- read piece by piece carries its reading state too (_conn, _mode, _left, ...). coded: a gzip or
-- deflate transfer coding wraps the body, removed whatever o.decompress says (it belongs to the
-- connection, not to the content); o.decompress removes a content coding too.
local function respond(conn, u, target, o, status, reason, version, h, mode, len, keep, hb, hp, coded)
    local max = o.max_body or config.max_body
    local url = target == u.target and u.url or u.scheme .. "://" .. u.hostport .. target
    keep = keep and conn.keepalive
    if status == 101 then mode, keep = CLOSE, false end
    if mode == LENGTH and max and len > max then
        close_conn(conn)
        return nil, "too large"
    end
    local z = coded and mode ~= NONE and core.zlib_inflater()
    if o.decompress and mode ~= NONE then
        if not h then h, hb = parse_headers(hb, hp), false end
        local ce = h["content-encoding"]
        if ce then
            ce = lower(ce)
            if ce == "gzip" or ce == "x-gzip" or ce == "deflate" then
                local cz = core.zlib_inflater()
                z = z and setmetatable({ outer = z, inner = cz }, chain_mt) or cz
            end
        end
    end
    if not o.stream and not z and (mode == LENGTH or mode == CHUNKED) then
        local body, err = take_body(conn, mode, len, max, keep, 0)
        if body then
            -- not `return setmetatable(...)`: a tail call to it ends the caller's JIT trace ("NYI:
            -- return to lower frame"), and the whole fetch ran in the interpreter
            local res = setmetatable({
                status = status, reason = reason, headers = h or nil, http_version = version,
                url = url, body = body, _hb = not h and hb, _hp = hp,
            }, res_mt)
            return res
        end
        if body == nil then return nil, err end
    end
    local res = setmetatable({
        status = status, reason = reason, headers = h or nil, http_version = version, url = url,
        _conn = conn, _total = 0, _max = max, _done = false, _z = z,
        _mode = mode, _left = len, _keep = keep, _hb = not h and hb, _hp = hp,
    }, res_mt)
    if mode == NONE then
        finish(res)
        if not o.stream then res.body = "" end
        return res
    end
    if o.stream then return res end
    local b, err = res:read_body()
    if not b then return nil, err end
    res._given = nil -- res:read() and res:chunks() give the body once
    return res
end

-- One exchange on one connection: the response with its body framed (read when not streamed),
-- or nil, err, retry (true when a reused connection turned out closed before the response started).
local function exchange(u, method, target, headers, body, o, deadline, fresh, t0)
    local key = u.key
    local verify = o.verify ~= false
    if u.https and (not verify or o.tls) then
        key = key .. "|" .. (verify and "v" or "nv")
        if o.tls then
            local t = {}
            for k, v in pairs(o.tls) do t[#t + 1] = tostring(k) .. "=" .. tostring(v) end
            sort(t)
            key = key .. "|" .. concat(t, ",")
        end
    end
    local unix = o.unix
    if unix then key = key .. "|unix:" .. unix end -- a Unix domain socket: one pool per socket
    local px = not unix and proxy_for(u, o) or nil
    local proxy_auth
    if not px or u.https then proxy_auth, headers = take_proxy_auth(headers) end
    if not px then
        proxy_auth = nil
    else -- one pool per proxy and credentials
        key = key .. "|via " .. px.pool_key
        if proxy_auth then key = key .. "#" .. short_digest(tostring(proxy_auth)) end
    end
    local conn = not fresh and o.keepalive ~= false and checkout(key, t0 or now())
    local err
    if conn then
        conn.reused = conn.reused + 1
        conn.deadline = deadline
    else
        conn, err = connect(u, key, o, deadline, px, proxy_auth)
        if not conn then return nil, err end
    end
    conn.got = false
    conn.keepalive = o.keepalive ~= false
    conn.read_timeout = o.read_timeout or config.read_timeout
    conn.send_timeout = o.send_timeout or config.send_timeout
    conn.pool_size = o.pool_size or config.pool_size
    conn.idle_timeout = o.idle_timeout or config.idle_timeout
    local decompress = o.decompress
    local req, chunked, length = build_request(method, u, target, headers, body, o, decompress,
                                               not u.https and px or nil)
    local ok
    ok, err = sock_wait(conn, conn.send, req, conn.send_timeout)
    -- a body made by a function cannot be made again: once it was asked for a piece, a request
    -- that fails is not retried on another connection
    local replayable, asked = type(body) ~= "function", false
    if ok and body then
        if not replayable then
            asked = true
            ok, err = send_stream(conn, body, chunked, length)
        elseif #body > 65536 then
            ok, err = sock_wait(conn, conn.send, body, conn.send_timeout)
        end
    end
    if not ok then
        local retry = err == "closed" and conn.reused > 0 and IDEMPOTENT[method] and not asked
        if err ~= "closed" or retry then
            close_conn(conn)
            return nil, err, retry
        end
        -- the server closed while the request was going out: it may have answered first (a 413
        -- to a large upload), and that answer is the response (else the read says "closed")
        conn.keepalive = false
    end
    local is_head = method == "HEAD"
    local status, reason, version, h, mode, len, keep, hb, hp, coded = read_head(conn, is_head)
    local interim = 0
    while status and status < 200 and status ~= 101 do -- 1xx informational responses are skipped
        interim = interim + 1
        if interim > MAX_INTERIM then
            status, reason = nil, "bad response"
            break
        end
        status, reason, version, h, mode, len, keep, hb, hp, coded = read_head(conn, is_head)
    end
    if status == 101 and header_named(headers, "upgrade") == nil then
        status, reason = nil, "bad response" -- a switch of protocols nobody asked for (RFC 9110 7.8)
    end
    if not status then
        close_conn(conn)
        -- only a connection the server closed is tried again: a timeout is the server's slowness,
        -- and sending the request once more would double the wait and the server's work
        return nil, reason, reason == "closed" and conn.reused > 0 and not conn.got
            and IDEMPOTENT[method] and replayable
    end
    return respond(conn, u, target, o, status, reason, version, h, mode, len, keep, hb, hp, coded)
end

-- Reads what is left of a redirect's body so that its connection can be reused (small bodies),
-- or drops it.
local function discard(res)
    if rawget(res, "body") or res._done then return end
    if res._mode == LENGTH and res._left <= DRAIN_MAX then
        res:read_body()
    else
        res:close()
    end
end

local COOKIE = { cookie = true }

-- headers with the jar's cookies for u added to a Cookie header the caller gave (a copy), or
-- headers as they are when the jar has none for u
local function with_jar_cookies(headers, jar, u)
    local cookies = jar:header(u)
    if not cookies then return headers end
    local own = header_named(headers, "cookie")
    if type(own) == "table" then own = concat(own, "; ") end
    local h = headers and without(headers, COOKIE) or {}
    h.Cookie = own and (tostring(own) .. "; " .. cookies) or cookies
    return h
end

-- Runs the request on u (once more on a new connection when a pooled one turns out to have been
-- closed by the server) and follows up to max_redirects redirects, count of them done already.
-- With a cookie jar, each hop sends the jar's cookies for its URL and stores what it sets.
local function follow(u, method, target, headers, body, o, deadline, t0, max_redirects, count)
    local jar = o.jar
    if jar == nil then jar = config.jar end
    local sent = jar and with_jar_cookies(headers, jar, u) or headers
    local res, err, retry = exchange(u, method, target, sent, body, o, deadline, false, t0)
    if not res and retry then
        res, err = exchange(u, method, target, sent, body, o, deadline, true)
    end
    if not res then return nil, err end
    if jar then
        local set = res.headers["set-cookie"]
        if set then jar:store(u, set) end
    end
    if max_redirects <= 0 or not REDIRECT[res.status] then return res end
    local loc = res.headers.location
    if not loc then return res end
    if count >= max_redirects then
        res:close()
        return nil, "too many redirects"
    end
    local status = res.status
    if status == 303 or ((status == 301 or status == 302) and method == "POST") then
        if method ~= "HEAD" then method = "GET" end
        body = nil
        if headers then headers = without(headers, BODY_HEADERS) end
    end
    if type(body) == "function" then return res end -- a body made by a function is not sent twice
    discard(res)
    local nu = parse_url(resolve(u, target, loc))
    if not nu then return nil, "bad redirect" end
    if nu.key ~= u.key then -- credentials (and a Host given for it) stay with their origin
        if headers then headers = without(headers, ORIGIN_HEADERS) end
    elseif u.auth and not nu.auth and header_named(headers, "authorization") == nil then
        -- the URL's user:password goes on within its origin (a relative Location has none)
        headers = headers and without(headers, AUTHORIZATION) or {}
        headers.Authorization = u.auth
    end
    return follow(nu, method, nu.target, headers, body, o, deadline, nil, max_redirects, count + 1)
end

local known_methods, known_count = {}, 0 -- "get" -> "GET", once checked

-- headers (the caller's table, left as it is) with Content-Type: ctype unless they have one, or
-- (force: a multipart body, whose boundary is ours) in place of theirs
local function with_content_type(headers, ctype, force)
    if not force and header_named(headers, "content-type") ~= nil then return headers end
    local h = headers and without(headers, CONTENT_TYPE) or {}
    h["Content-Type"] = ctype
    return h
end

local function request(method, url, o, body, level)
    if type(url) ~= "string" then error("moonlet.http: url must be a string", level) end
    local bt = type(body)
    if body ~= nil and bt ~= "string" and bt ~= "function" then
        error("moonlet.http: body must be a string or a function (json = a table sends it as JSON)", level)
    end
    method = method or "GET"
    if not known_methods[method] then
        local m = upper(method)
        if not match(m, "^[%u%-_]+$") then error("moonlet.http: bad method " .. method, level) end
        if known_count < 64 then
            known_count = known_count + 1
            known_methods[method] = m
        end
        method = m
    else
        method = known_methods[method]
    end
    local u, err = parse_url(url)
    if not u then error("moonlet.http: " .. err .. ": " .. url, level) end
    check_proxy(o.proxy, o.no_proxy, "moonlet.http", level + 1)
    check_jar(o.jar, "moonlet.http", level + 1)
    check_user_agent(o.user_agent, "moonlet.http", level + 1)
    if o.unix ~= nil and (type(o.unix) ~= "string" or o.unix == "") then
        error("moonlet.http: unix must be a socket path", level)
    end
    local target = u.target
    local query = o.query
    if query then
        if type(query) ~= "table" then error("moonlet.http: query must be a table", level) end
        local qs = encode_query(query)
        if qs ~= "" then target = target .. (find(target, "?", 1, true) and "&" or "?") .. qs end
    end
    local headers = o.headers
    if headers ~= nil and type(headers) ~= "table" then
        error("moonlet.http: headers must be a table", level)
    end
    if headers ~= nil then
        local bad, k = check_headers(headers)
        if bad == 1 then error("moonlet.http: bad header name " .. tostring(k), level) end
        if bad == 2 then error("moonlet.http: bad value of header " .. k, level) end
    end
    local js, form = o.json, o.form
    if js ~= nil or form ~= nil then
        if body ~= nil or (js ~= nil and form ~= nil) then
            error("moonlet.http: give one of body, json and form", level)
        end
        local ctype, force
        if js ~= nil then
            local s, jerr = json.encode(js)
            if not s then error("moonlet.http: json: " .. tostring(jerr), level) end
            body, ctype = s, "application/json"
        else
            if type(form) ~= "table" then error("moonlet.http: form must be a table", level) end
            if multipart.has_file(form) then -- files in it: multipart/form-data
                local ok, b, t = pcall(multipart.encode, form)
                if not ok then error(b, level) end
                body, ctype, force = b, t, true
            else
                body, ctype = encode_query(form), "application/x-www-form-urlencoded"
            end
        end
        headers = with_content_type(headers, ctype, force)
    end
    local deadline, t0 = o.timeout, nil
    if deadline then
        t0 = now()
        deadline = t0 + deadline
    end
    local max_redirects = o.redirects
    if max_redirects == true then max_redirects = 10 end
    if not max_redirects then max_redirects = 0 end
    return follow(u, method, target, headers, body, o, deadline, t0, max_redirects, 0)
end

local EMPTY = {}

_M.parse_url = parse_url -- (lua/moonlet/cookie_jar.lua)

-- syntax: jar = moonlet.http.cookie_jar({ max = 3000 }) -- for `jar =` of a request or configure
-- (lua/moonlet/cookie_jar.lua)
function _M.cookie_jar(opts)
    return require("moonlet.cookie_jar").new(opts)
end

-- syntax: res, err = moonlet.http.request{ method =, url =, headers =, body =, json =, form =,
-- query =, timeout =, connect_timeout =, read_timeout =, send_timeout =, redirects =, decompress =,
-- max_body =, stream =, keepalive =, verify =, tls =, pool_size =, idle_timeout =, proxy =,
-- no_proxy =, jar =, unix = }
-- unix = "/run/app.sock": the connection goes to that Unix domain socket (curl's --unix-socket,
-- aiohttp's UnixConnector); the URL still gives the Host header, the path and the TLS name.
function _M.request(opts, url_opts)
    if type(opts) == "string" then -- request(url, opts)
        local o = url_opts or EMPTY
        return request(o.method, opts, o, o.body, 3)
    end
    if type(opts) ~= "table" then error("moonlet.http.request: expected a table of options", 2) end
    return request(opts.method, opts.url, opts, opts.body, 3)
end

-- syntax: res, err = moonlet.http.get(url, opts) (head, delete, options alike)
for _, m in ipairs({ "get", "head", "delete", "options" }) do
    local method = upper(m)
    _M[m] = function(url, opts)
        opts = opts or EMPTY
        return request(method, url, opts, opts.body, 3)
    end
end

-- syntax: res, err = moonlet.http.post(url, body, opts) (put, patch alike)
for _, m in ipairs({ "post", "put", "patch" }) do
    local method = upper(m)
    _M[m] = function(url, body, opts)
        return request(method, url, opts or EMPTY, body, 3)
    end
end

_M.escape = escape
_M.encode_query = encode_query

return _M
