-- lua/moonlet/request.lua: the request object a handler receives. Plain fields are set by the
-- dispatcher (method, path, target, query_string, params); headers, query, cookies and connection
-- details are filled in on first use. The body is pulled from the connection: req:body() (whole) or
-- `for chunk in req:chunks()`, each read yielding until data is there. After the handler returns
-- the request's connection is gone: reads return nil, "closed".
local url = require "moonlet.url"
local wrap_headers = require("moonlet.headers").wrap
-- moonlet.cookie and moonlet.multipart are loaded on first use: a server that never reads a cookie
-- or a form holds neither
local function cookie() return require "moonlet.cookie" end
local function multipart() return require "moonlet.multipart" end
local abort = require("moonlet.response").abort
local check = require("moonlet.task").check

local str_lower, str_match = string.lower, string.match
local concat = table.concat
local rawset = rawset

local _M = {}
local methods = {}

local lazy = {}
function lazy.params()
    return {} -- a literal route has none; the table is made only when asked for
end
function lazy.headers(req) -- lower-case names; any letter case finds them (moonlet.headers)
    return wrap_headers(req._x:headers() or {})
end
function lazy.cookies(req)
    return cookie().parse(req._x:header("cookie")) -- several Cookie lines join with "; "
end
function lazy.query(req)
    local first, all = url.parse_query(req.query_string)
    rawset(req, "_query_all", all)
    return first
end
local function info(req)
    local version, keep_alive, peer, length, scheme = req._x:info()
    if version == nil then -- the connection is gone (nil, err): none of it is known any more
        keep_alive, peer, length, scheme = false, false, false, false
        version = false
    end
    rawset(req, "http_version", version)
    rawset(req, "keep_alive", keep_alive)
    rawset(req, "peer", peer)
    rawset(req, "content_length", length)
    rawset(req, "scheme", scheme)
end
function lazy.http_version(req) info(req); return req.http_version end
function lazy.keep_alive(req) info(req); return req.keep_alive end
function lazy.peer(req) info(req); return req.peer end
function lazy.content_length(req) info(req); return rawget(req, "content_length") end
function lazy.scheme(req) info(req); return req.scheme end
-- HTTPS: { client_verified, client_subject, client_issuer, client_cert } (nginx's
-- $ssl_client_verify, _s_dn, _i_dn, _cert), made on first use; nil on plain HTTP
function lazy.tls(req) return req._x:tls() end
-- the client's address without the port ("1.2.3.4", "::1"); moonlet.forwarded may put the one a
-- trusted proxy forwarded in its place (lua/moonlet/forwarded.lua)
function lazy.ip(req)
    local peer = req.peer
    return peer and (peer:match("^%[(.*)%]:%d+$") or peer:match("^(.*):%d+$")) or peer or nil
end
-- the Host header as sent ("example.com:8080"), or nil; moonlet.forwarded: the forwarded one.
-- An absolute-form target ("GET http://example.com:8080/ HTTP/1.1") names the host itself, and
-- the Host header is then ignored (RFC 9112 3.2.2), as nginx's $host does.
function lazy.host(req)
    local authority = str_match(req.target, "^%a[%w+.-]*://([^/?#]*)")
    if authority then
        authority = str_match(authority, "^[^@]*@(.*)$") or authority -- no userinfo
        if authority ~= "" then return authority end
    end
    return req:header("host")
end

_M.mt = {
    __name = "moonlet.request",
    __index = function(req, k)
        local m = methods[k]
        if m then return m end
        local f = lazy[k]
        if f then
            local v = f(req)
            rawset(req, k, v)
            return v
        end
    end,
}

-- syntax: value = req:header(name) -- case-insensitive; the lines of a repeated header joined with
-- ", " (as in req.headers), Cookie's with "; "
function methods:header(name)
    name = str_lower(name)
    local h = rawget(self, "headers")
    if h then return h[name] end
    return self._x:header(name) -- (several Cookie lines are one list, joined with "; ")
end

-- syntax: values = req:args(name) -- every value of a repeated query parameter, in order
function methods:args(name)
    local _ = self.query
    return self._query_all[name] or {}
end

-- What req:chunks() raises when the body breaks off: the client closed the connection, or the
-- server refused the rest (400 for a malformed chunk, 408 for a slow one) and closed it. The
-- client's doing, not the app's: the dispatcher (app.lua) logs it at info level, no traceback.
_M.BODY_GONE = "moonlet: request body: "

-- syntax: for chunk in req:chunks() do ... end -- body pieces as they arrive; raises on a broken
-- body (client gone, timeout) so a half-read body is never mistaken for a whole one
-- The next piece of the body: one that req:multipart_field read ahead and gave back (in order,
-- then the body's end if it reached it), else the connection's next. nil at the end; nil, err.
local function read_piece(self)
    local unread = rawget(self, "_unread")
    if unread then
        local i = unread.i + 1
        unread.i = i
        if i <= unread.n then return unread[i] end
        self._unread = nil
        if unread.ended then return nil end
    end
    return check(self._x:read())
end

function methods:chunks()
    if self._body_read then error("moonlet: the body was already read", 2) end
    self._body_read = true
    return function()
        local chunk, err = read_piece(self)
        if err then error(_M.BODY_GONE .. err, 2) end
        return chunk
    end
end

-- syntax: body, err = req:body() -- the whole body ("" when none); yields until it is in
function methods:body()
    local body = rawget(self, "_body")
    if body then return body end
    if self._body_read then return nil, "the body was already streamed" end
    self._body_read = true
    local parts, n = {}, 0
    while true do
        local chunk, err = read_piece(self)
        if err then return nil, err end
        if not chunk then break end
        n = n + 1
        parts[n] = chunk
    end
    body = n == 1 and parts[1] or concat(parts)
    self._body = body
    return body
end

-- syntax: value, err = req:json() -- the body decoded as JSON
function methods:json()
    local body, err = self:body()
    if not body then return nil, err end
    return require("moonlet.json").decode(body)
end

-- The body piece by piece: from the connection (req:chunks()), or the whole body once when
-- req:body() read it already.
local function body_pieces(req)
    local body = rawget(req, "_body")
    if body == nil then return req:chunks() end
    return function()
        local b = body
        body = nil
        return b
    end
end

-- The most fields req:form() reads from one body, as multipart.lua's MAX_FORM_PARTS (Starlette's
-- max_fields, PHP's max_input_vars): each costs a string and a table, so a 1 MiB body of a million
-- "a&b&..." pairs would otherwise hold 30 MiB of Lua heap.
local MAX_FORM_FIELDS = 1000

-- syntax: fields, err = req:form() -- an application/x-www-form-urlencoded body as a table; a
-- multipart/form-data one too, where a file is a table { filename =, type =, headers =, body = }
-- (lua/moonlet/multipart.lua); the first value of a repeated name (req:form_values has them all).
-- nil, err when the body cannot be read or is not a well-formed form (more than 1000 fields too).
-- The whole body (req:body(), kept) is parsed, so that form() may be called again (a middleware,
-- then the handler) and body() still answers after it; req:parts() reads without keeping it.
function methods:form()
    local boundary, why = multipart().boundary(self:header("content-type"))
    local body, err = self:body()
    if not body then return nil, err end
    if boundary == nil then
        local fields, all, more = url.parse_query(body, MAX_FORM_FIELDS)
        if more then return nil, "more than " .. MAX_FORM_FIELDS .. " fields" end
        self._form_all = all
        return fields
    end
    if not boundary then return nil, "multipart: " .. why end
    local ok, fields, all = pcall(multipart().read_form, body_pieces(self), boundary)
    if ok then
        self._form_all = all
        return fields
    end
    if type(fields) == "table" and fields.body then fields = (fields.body:gsub("\n$", "")) end
    return nil, tostring(fields)
end

-- syntax: values, err = req:form_values(name) -- every value of a repeated form field, in order
-- ({} when there is none): checkboxes, <select multiple>, <input type=file multiple>; nil, err as
-- req:form()
function methods:form_values(name)
    local all = rawget(self, "_form_all")
    if not all then
        local fields, err = self:form()
        if not fields then return nil, err end
        all = self._form_all
    end
    return all[name] or {}
end

-- syntax: path = req:url_for(name, params, query) -- app:url_for of the app whose route serves this
-- request, with the prefix of the mounts it came through (req.prefix): a mounted app's handler
-- gets whole paths without knowing where it is mounted
function methods:url_for(name, params, query)
    local ok, path = pcall(self._app.url_for, self._app, name, params, query)
    if not ok then error(path, 2) end
    return self.prefix .. path
end

-- The most bytes of a body req:multipart_field reads ahead (and keeps) looking for its field.
local PEEK_MAX = 64 * 1024

-- syntax: value = req:multipart_field(name) -- the value of the plain field name of a
-- multipart/form-data body, when it comes before any file and within its first 64 KiB (a hidden
-- field at the top of the form: moonlet.csrf's token), read without taking the body from the
-- handler: the pieces read ahead are kept and given back, in order, to whatever reads the body
-- next (req:parts(), req:form(), req:body(), req:chunks()), and a body that breaks or is malformed
-- breaks there as it would have. nil when there is no such field, or the body was read already.
function methods:multipart_field(name)
    local body = rawget(self, "_body")
    if body == nil and self._body_read then return nil end
    local boundary = multipart().boundary(self:header("content-type"))
    if not boundary then return nil end
    if body ~= nil then -- kept whole already (req:form()): parse it again
        local fields = self:form()
        return fields and type(fields[name]) == "string" and fields[name] or nil
    end
    local seen, bytes = { n = 0, i = 0 }, 0
    local function source()
        local chunk, err = read_piece(self)
        if err then error(err, 0) end
        if chunk then
            seen.n = seen.n + 1
            seen[seen.n] = chunk
            bytes = bytes + #chunk
            if bytes > PEEK_MAX then error("too far", 0) end
        else
            seen.ended = true
        end
        return chunk
    end
    local ok, value = pcall(function()
        for part in multipart().parts(source, boundary) do
            if part.filename then return nil end
            if part.name == name then return part:body() end
        end
        return nil
    end)
    self._unread = seen -- given back, the pieces read from an earlier _unread among them
    return ok and value or nil
end

-- syntax: for part in req:parts() do ... end -- a multipart/form-data body (file uploads) part by
-- part as it arrives: part.name, part.filename (nil for a plain field), part.type, part.headers,
-- part:read() (the next piece of its data, nil at its end) and part:body() (the rest, whole). A
-- request that is not multipart/form-data is answered 415; a malformed body 400 (moonlet.abort).
function methods:parts()
    local boundary, why = multipart().boundary(self:header("content-type"))
    if boundary == nil then
        error(abort(415, "415 Unsupported Media Type: multipart/form-data expected\n"), 2)
    elseif not boundary then
        error(abort(400, "400 Bad Request: multipart: " .. why .. "\n"), 2)
    end
    return multipart().parts(body_pieces(self), boundary)
end

return _M
