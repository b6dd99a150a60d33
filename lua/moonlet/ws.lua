-- lua/moonlet/ws.lua: WebSockets (RFC 6455) for handlers and clients: the ws object both sides share,
-- moonlet.ws.connect (ws:// and wss://), and the server handshake app:websocket uses (route());
-- ws.accept_raw hands a request's connection over as raw bytes instead (moonlet.proxy's tunnel).
-- The frames, the queue, the waits and the close handshake live in C (bindings/ws.c over
-- core/ws.c); this wraps the C object so that every wait passes through task.check (a cancelled
-- task raises moonlet.CANCELLED) and ws.close_code / ws.close_reason read as fields.
local core = require "moonlet.core"
local check = require("moonlet.task").check
local trim = require("moonlet.url").trim -- linear: these headers come from the peer

local type, tostring, tonumber, pairs, ipairs = type, tostring, tonumber, pairs, ipairs
local setmetatable = setmetatable
local str_find, str_lower, str_match, str_gmatch, str_sub = string.find, string.lower, string.match,
    string.gmatch, string.sub
local concat = table.concat
local traceback = debug.traceback

local _M = { _VERSION = "0.1.0" }
local methods = {}
local mt = {
    __name = "moonlet.websocket",
    __index = function(self, k)
        local m = methods[k]
        if m then return m end
        if k == "close_code" then return (self._ws:close_info()) end
        if k == "close_reason" then
            local _, reason = self._ws:close_info()
            return reason
        end
    end,
    __tostring = function(self) return tostring(self._ws) end,
}

local function wrap(ud, protocol, extensions)
    return setmetatable({ _ws = ud, protocol = protocol, extensions = extensions }, mt)
end

-- syntax: ok, err = ws:send(msg, kind) -- kind "text" (default) or "binary"; a table goes as JSON
-- text; yields while the peer is more than 256 KiB behind; nil, "closed" once closing
function methods:send(msg, kind)
    if type(msg) == "table" then msg = require("moonlet.json").encode(msg) end
    return check(self._ws:send(msg, kind))
end

-- syntax: msg, kind = ws:receive(timeout) -- the next message ("text" or "binary"); nil, "closed"
-- after the close (see ws.close_code); nil, "timeout"; one reader at a time
function methods:receive(timeout)
    return check(self._ws:receive(timeout))
end

-- syntax: for msg, kind in ws:messages() do ... end -- ends when the connection closes
function methods:messages()
    local ud = self._ws
    return function()
        local msg, kind = check(ud:receive())
        if msg == nil then return nil end
        return msg, kind
    end
end

-- syntax: rtt, err = ws:ping(data, timeout) -- sends a ping; with a timeout, waits for the pong and
-- returns the round trip in seconds; without, returns true at once
function methods:ping(data, timeout)
    return check(self._ws:ping(data, timeout))
end

-- syntax: ok = ws:close(code, reason) -- starts the close handshake (1000 by default) and returns;
-- the connection ends when the peer answers (or after close_timeout)
function methods:close(code, reason)
    return self._ws:close(code, reason)
end

-- syntax: state = ws:state() -- "open", "closing" or "closed"
function methods:state()
    return self._ws:state()
end

-- syntax: n, bytes = ws:queued() -- received messages not read yet
function methods:queued()
    return self._ws:queued()
end

local number_opts = { "timeout", "max_message", "ping_interval", "idle_timeout", "close_timeout",
                      "fragment_size" }
local function check_opts(opts, level)
    if opts == nil then return {} end
    if type(opts) ~= "table" then error("moonlet.ws: options are a table", level) end
    for _, k in ipairs(number_opts) do
        if opts[k] ~= nil and type(opts[k]) ~= "number" then
            error("moonlet.ws: option " .. k .. " is a number", level)
        end
    end
    if opts.unix ~= nil and (type(opts.unix) ~= "string" or opts.unix == "" or str_find(opts.unix, "%z")) then
        error("moonlet.ws: option unix is a socket path", level)
    end
    local t = opts.tls -- a boolean is let through and changes nothing: the scheme says TLS or not
    if t ~= nil and type(t) ~= "table" and type(t) ~= "boolean" then
        error("moonlet.ws: option tls is a table", level)
    end
    if type(t) ~= "table" then t = nil end
    for _, k in ipairs({ "cafile", "cert", "key", "server_name" }) do
        if opts[k] ~= nil and type(opts[k]) ~= "string" then
            error("moonlet.ws: option " .. k .. " is a string", level)
        end
        if t and t[k] ~= nil and type(t[k]) ~= "string" then
            error("moonlet.ws: option tls." .. k .. " is a string", level)
        end
    end
    local hs = opts.headers
    if hs ~= nil and type(hs) ~= "table" and type(hs) ~= "function" then
        error("moonlet.ws: option headers is a table or a function", level)
    end
    local d = opts.deflate
    if d ~= nil and type(d) ~= "boolean" and type(d) ~= "table" then
        error("moonlet.ws: option deflate is a boolean or a table", level)
    end
    if type(d) == "table" then
        for _, k in ipairs({ "server_max_window_bits", "client_max_window_bits" }) do
            local b = d[k]
            if b ~= nil and (type(b) ~= "number" or b < 9 or b > 15 or b % 1 ~= 0) then
                error("moonlet.ws: deflate " .. k .. " is an integer 9..15", level)
            end
        end
    end
    return opts
end

local function no_ctl(s, what)
    s = tostring(s)
    if str_find(s, "[\r\n%z]") then error("moonlet.ws: " .. what .. " holds CR, LF or NUL", 3) end
    return s
end

-- syntax: ok = moonlet.ws.valid_utf8(s) -- whether s is well-formed UTF-8, as the text of a text
-- message must be (ws:send refuses anything else with nil, "invalid utf-8"): for text from
-- elsewhere (a URL's percent-decoded bytes, a file) before it goes into one
_M.valid_utf8 = core.utf8_valid

-- syntax: ws, err, answer = moonlet.ws.connect(url, { timeout = 2, headers = {...},
--   protocols = {...}, origin = "...", deflate = true, verify = true, cafile = path, cert = path,
--   key = path, max_message = bytes, unix = "/run/app.sock", ... }) -- verify, cafile, cert, key
--   and server_name may also come in a tls table ({ tls = { cafile = path } }, as moonlet.http
--   takes them); a top-level one wins. unix: over that Unix domain
--   socket (the URL gives the Host); cert, key: a client certificate for wss://. A server that
--   answers the handshake with another status than 101: nil, "handshake failed: status 403" and
--   answer = { status =, headers =, body = } (headers as a 101's; a body of 1 MiB at most)
function _M.connect(url, opts)
    opts = check_opts(opts, 3)
    if type(url) ~= "string" then error("moonlet.ws.connect: expected a URL", 2) end
    local scheme, rest = str_match(url, "^([wW][sS][sS]?)://(.+)$")
    if not scheme then error("moonlet.ws.connect: expected a ws:// or wss:// URL", 2) end
    local tls = str_lower(scheme) == "wss"
    local authority, path = str_match(rest, "^([^/?#]*)([^#]*)")
    if not authority or authority == "" then error("moonlet.ws.connect: no host in " .. url, 2) end
    if str_find(rest, "[%c ]") then -- it goes into the request line and the Host header as it is
        error("moonlet.ws.connect: a space or control character in " .. url, 2)
    end
    if path == "" then path = "/" elseif path:sub(1, 1) == "?" then path = "/" .. path end
    local host, port = str_match(authority, "^%[([^%]]+)%]:?(%d*)$")
    if not host then host, port = str_match(authority, "^([^:]+):?(%d*)$") end
    if not host then error("moonlet.ws.connect: bad host in " .. url, 2) end
    port = tonumber(port) or (tls and 443 or 80)
    local lines = { "GET " .. path .. " HTTP/1.1", "Host: " .. authority, "Upgrade: websocket",
                    "Connection: Upgrade", "Sec-WebSocket-Version: 13" }
    local offered
    if opts.protocols then
        offered = {}
        for i, p in ipairs(opts.protocols) do offered[i] = no_ctl(p, "a subprotocol") end
        if offered[1] then lines[#lines + 1] = "Sec-WebSocket-Protocol: " .. concat(offered, ", ") end
    end
    if opts.origin then lines[#lines + 1] = "Origin: " .. no_ctl(opts.origin, "the origin") end
    if opts.headers then
        for k, v in pairs(opts.headers) do
            local line = no_ctl(k, "a header name") .. ": " .. no_ctl(v, "a header value")
            if str_lower(k) == "host" then lines[2] = line else lines[#lines + 1] = line end
        end
    end
    -- the TLS options top-level or in a tls table, as moonlet.http and moonlet.tcp take them; a
    -- top-level one wins
    local t = type(opts.tls) == "table" and opts.tls or {}
    local function tls_opt(k)
        if opts[k] ~= nil then return opts[k] end
        return t[k]
    end
    local copts = {
        timeout = opts.timeout, tls = tls, verify = tls_opt("verify"), cafile = tls_opt("cafile"),
        cert = tls_opt("cert"), key = tls_opt("key"), server_name = tls_opt("server_name") or host,
        deflate = opts.deflate,
        max_message = opts.max_message, ping_interval = opts.ping_interval,
        idle_timeout = opts.idle_timeout, close_timeout = opts.close_timeout,
        fragment_size = opts.fragment_size, unix = opts.unix,
    }
    local ud, headers, refusal = check(core.ws_connect(host, port, concat(lines, "\r\n") .. "\r\n", copts))
    if not ud then return nil, headers, refusal end
    local proto = headers["sec-websocket-protocol"]
    if proto then
        local ok = false
        for _, p in ipairs(offered or {}) do
            if p == proto then ok = true end
        end
        if not ok then
            ud:close(1002, "subprotocol not offered")
            return nil, "handshake failed: subprotocol not offered"
        end
    end
    return wrap(ud, proto, headers["sec-websocket-extensions"]), headers
end

-- -- Server side ------------------------------------------------------------------------------

local function has_token(value, token)
    if not value then return false end
    for t in value:gmatch("[^,]+") do
        if str_lower(trim(t)) == token then return true end
    end
    return false
end

local UPGRADE_HEADERS = { Upgrade = "websocket", Connection = "Upgrade",
                          ["Sec-WebSocket-Version"] = "13" }

-- A handshake without Origin did not come from a browser (browsers always send one), so the
-- cross-site attack an allow-list guards against cannot come through it: a list or a string lets
-- it in, as Tornado's check_origin does; a function is asked with origin nil and decides.
local function origin_ok(check_origin, origin, req)
    if check_origin == nil then return true end
    local t = type(check_origin)
    if t == "function" then return check_origin(origin, req) end
    if origin == nil then return true end
    if t == "string" then return origin == check_origin end
    for _, o in ipairs(check_origin) do
        if o == origin then return true end
    end
    return false
end

local function choose_protocol(want, offered_header, req)
    if not want or not offered_header then return nil end
    local offered = {}
    for p in offered_header:gmatch("[^,%s]+") do offered[#offered + 1] = p end
    if type(want) == "function" then
        local p = want(offered, req)
        for _, o in ipairs(offered) do
            if o == p then return p end
        end
        return nil
    end
    for _, p in ipairs(want) do
        for _, o in ipairs(offered) do
            if o == p then return p end
        end
    end
    return nil
end

-- After the upgrade the exchange has no request any more: req._x becomes this stand-in, which
-- answers what request.lua asks of it from what was read before (headers and x:info()).
local ok_new, new_tab = pcall(require, "table.new")
if not ok_new then new_tab = nil end
local gone_x = {}
local gone_mt = { __index = gone_x }
function gone_x:info() return self[1], self[2], self[3], self[4] end
function gone_x:headers() return self.h end
function gone_x:header(name) return self.h[name] end
function gone_x:read() return nil, "closed" end
function gone_x:tls() return self.ws:tls() end -- (req.tls: the connection's, while it is open)

-- The headers an open WebSocket keeps for req.headers: all but the handshake's own, in a table of
-- their size (an idle connection then holds a few hundred bytes less).
local HANDSHAKE = { upgrade = true, connection = true, ["sec-websocket-key"] = true,
                    ["sec-websocket-version"] = true, ["sec-websocket-extensions"] = true }
local function kept_headers(h)
    local n = 0
    for k in pairs(h) do
        if not HANDSHAKE[k] then n = n + 1 end
    end
    local kept = new_tab and new_tab(0, n) or {}
    for k, v in pairs(h) do
        if not HANDSHAKE[k] then kept[k] = v end
    end
    return kept
end

-- syntax: status, body, headers = ws.refusal(req) -- nil when req is a well-formed opening
-- handshake (RFC 6455 4.2.1), else the answer it gets (426 or 400); origin and subprotocol apart
function _M.refusal(req)
    local h = req.headers
    local version, _, _, length = req._x:info()
    if not has_token(h.upgrade, "websocket") then -- not a handshake: say what is spoken here
        return 426, "426 Upgrade Required: this is a WebSocket endpoint\n", UPGRADE_HEADERS
    end
    -- a handshake that is not one of RFC 6455's (4.2.1: a GET (the route takes HEAD too), HTTP/1.1
    -- or later, Connection listing Upgrade) is refused with 400, as 4.2.2 says; upgrading would
    -- not make it one
    if req.method ~= "GET" or version ~= "1.1" or not has_token(h.connection, "upgrade") then
        return 400, "400 Bad Request: a WebSocket handshake is an HTTP/1.1 GET with "
            .. "Connection: Upgrade\n"
    end
    if h["sec-websocket-version"] ~= "13" then
        return 426, "426 Upgrade Required: WebSocket version 13 only\n", UPGRADE_HEADERS
    end
    local key = h["sec-websocket-key"]
    if not key or #key ~= 24 or not str_find(key, "^[A-Za-z0-9+/]+==$") then
        return 400, "400 Bad Request: missing or invalid Sec-WebSocket-Key\n"
    end
    if (length or 0) > 0 or h["transfer-encoding"] then
        return 400, "400 Bad Request: a WebSocket handshake has no body\n"
    end
end
local refusal = _M.refusal

-- The headers of a 101 the server writes itself: the handshake's, and those of a framing there is
-- none of (no body follows a 101).
local OWN_101 = { upgrade = true, connection = true, date = true, server = true,
                  ["content-length"] = true, ["transfer-encoding"] = true }

-- opts.headers (a table, or a function of req that gives one) as the 101's extra header lines, each
-- ending in CRLF, or nil; a table value or a value with "\n" in it is one line for each (several
-- Set-Cookie). Raises on a name that is not a token, one of OWN_101 or Sec-WebSocket-*, or a
-- value with a control character.
local function extra_headers(headers, req)
    if type(headers) == "function" then headers = headers(req) end
    if headers == nil then return nil end
    if type(headers) ~= "table" then error("moonlet.ws: headers gave no table", 3) end
    local out = {}
    for name, value in pairs(headers) do
        name = tostring(name)
        local l = str_lower(name)
        if not str_match(name, "^[%w!#$%%&'*+.^_`|~-]+$") then
            error("moonlet.ws: bad header name " .. name, 3)
        end
        if OWN_101[l] or str_sub(l, 1, 14) == "sec-websocket-" then
            error("moonlet.ws: the 101's own header " .. name .. " cannot be set", 3)
        end
        for _, v in ipairs(type(value) == "table" and value or { value }) do
            for line in str_gmatch(tostring(v), "[^\n]+") do
                if str_find(line, "[%z\1-\8\10-\31\127]") then
                    error("moonlet.ws: header " .. name .. " holds a control character", 3)
                end
                out[#out + 1] = name .. ": " .. line .. "\r\n"
            end
        end
    end
    return out[1] and concat(out) or nil
end

-- syntax: ws, status, body, headers = ws.accept(req, opts) -- validates the opening handshake of
-- req and answers 101: the ws, or nil and the response to send instead (426, 400, 403)
function _M.accept(req, opts)
    local x = req._x
    local h = req.headers -- read now: the request is gone once the connection is handed over
    local version, keep_alive, peer, length = x:info()
    local status, body, headers = refusal(req)
    if status then return nil, status, body, headers end
    if not origin_ok(opts.origin, h.origin, req) then
        return nil, 403, "403 Forbidden: origin not allowed\n"
    end
    local protocol = choose_protocol(opts.protocols, h["sec-websocket-protocol"], req)
    if h.cookie then local _ = req.cookies end -- read now, from every Cookie line, while there are lines
    local extra = extra_headers(opts.headers, req)
    local ud, ext = core.ws_accept(x, h["sec-websocket-key"], protocol, h["sec-websocket-extensions"], opts,
                                   extra)
    if not ud then return nil, 500, "500 Internal Server Error\n" end
    req._x = setmetatable({ version, keep_alive, peer, length, h = kept_headers(h), ws = ud }, gone_mt)
    req.headers = nil -- rebuilt from the kept ones on first use
    return wrap(ud, protocol, ext)
end

-- syntax: conn, err = ws.accept_raw(req, header_lines) -- answers req with a 101 of header_lines
-- (each "Name: value\r\n", Upgrade and Connection among them) and takes its connection over as a
-- raw byte stream, for another protocol than WebSocket (moonlet.proxy's upgrade tunnel):
-- conn:receive() gives the bytes as they come (nil, "closed" at the end), conn:send(bytes,
-- "binary") writes them (waiting while 256 KiB are unsent), conn:close() ends the connection once
-- its output is out; no frames, pings or close handshake. nil, err when req cannot be upgraded
-- (a body, a response started, the connection closing).
function _M.accept_raw(req, lines)
    local x = req._x
    local h = req.headers -- read now: the request is gone once the connection is handed over
    local version, keep_alive, peer, length = x:info()
    local ud, err = core.ws_accept_raw(x, lines)
    if not ud then return nil, err end
    req._x = setmetatable({ version, keep_alive, peer, length, h = kept_headers(h), ws = ud }, gone_mt)
    req.headers = nil
    return wrap(ud)
end

local CANCELLED = require("moonlet.task").CANCELLED
local function on_handler_error(e)
    if e == CANCELLED then return e end
    return traceback(tostring(e), 1)
end

-- syntax: handler = ws.route(fn, opts) -- the route handler app:websocket registers: handshake,
-- then fn(ws, req) in the request's task; when fn returns the connection is closed (1000), when it
-- raises, closed with 1011 and the error logged
function _M.route(fn, opts)
    if type(fn) ~= "function" then error("moonlet: a websocket handler is a function", 3) end
    opts = check_opts(opts, 4)
    return function(req, res)
        local ws, status, body, headers = _M.accept(req, opts)
        if not ws then return status, body, headers end
        res._on_send = false -- the 101 went out without the app's headers: res:on_send hooks never run
        -- the exchange is handed over: what the dispatcher sends after us finds it closed
        local ok, err = xpcall(fn, on_handler_error, ws, req)
        if ok then
            ws:close(1000)
        elseif err == CANCELLED then
            ws:close(1001, "going away")
        else
            ws:close(1011, "internal error")
            core.log(0, "websocket " .. req.target .. ": " .. tostring(err))
        end
    end
end

return _M
