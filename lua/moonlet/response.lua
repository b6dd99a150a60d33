-- lua/moonlet/response.lua: the response object a handler receives, and how a handler's return
-- values become the response. Setters chain: res:status(201):header("X-A", "b"). res:write(chunk)
-- starts a streamed response (chunked on HTTP/1.1) and yields while the client is far behind.
-- A handler returns body | status, body, headers: a string is sent as text/plain, a table as JSON.
local json = require "moonlet.json"
local cookie = require "moonlet.cookie"
local check = require("moonlet.task").check

local type, setmetatable, tostring, pairs = type, setmetatable, tostring, pairs
local str_lower = string.lower
local has_new_tab, new_tab = pcall(require, "table.new") -- LuaJIT: a table made at its size
if not has_new_tab then new_tab = function() return {} end end

local _M = {}
local methods = {}
_M.mt = { __name = "moonlet.response", __index = methods }

local TEXT = "text/plain; charset=utf-8"
local JSON = "application/json"
local short_types = {
    text = TEXT, html = "text/html; charset=utf-8", json = JSON, css = "text/css; charset=utf-8",
    js = "application/javascript; charset=utf-8", xml = "application/xml",
    bin = "application/octet-stream",
}

local abort_mt = { __name = "moonlet.abort", __tostring = function(a)
    return "moonlet.abort(" .. tostring(a.status) .. ")"
end }

-- An error object that ends a request with a given response (see moonlet.abort).
function _M.abort(status, body, headers)
    return setmetatable({ status = status, body = body, headers = headers }, abort_mt)
end

function _M.is_abort(v)
    return getmetatable(v) == abort_mt
end

-- syntax: res:status(code) -> res
function methods:status(code)
    if type(code) ~= "number" then error("moonlet: status is a number", 2) end
    self._status = code
    return self
end

-- syntax: res:header(name, value) -> res -- value nil removes; a table sends the header repeatedly
function methods:header(name, value)
    local h = self._headers
    if not h then h = new_tab(0, 4); self._headers = h end
    if name == "Content-Type" or name == "content-type" then
        self._ctype = value
    else
        h[name] = value
    end
    return self
end

-- syntax: res:cookie(name, value, { max_age =, expires =, path =, domain =, secure =, http_only =,
-- same_site = }) -> res -- a Set-Cookie header (one per call); value nil deletes the cookie
-- (Max-Age=0, and the same path and domain as when it was set). See lua/moonlet/cookie.lua.
function methods:cookie(name, value, opts)
    if value == nil then
        local o = { max_age = 0, expires = 0 }
        if opts then o.path, o.domain = opts.path, opts.domain end
        opts, value = o, ""
    end
    local line = cookie.serialize(name, value, opts)
    local h = self._headers
    if not h then h = new_tab(0, 4); self._headers = h end
    local prev = h["Set-Cookie"]
    if prev == nil then
        h["Set-Cookie"] = { line }
    elseif type(prev) == "table" then
        prev[#prev + 1] = line
    else
        h["Set-Cookie"] = { prev, line }
    end
    return self
end

-- syntax: res:type(t) -> res -- "html", "json", "text", ... or a full media type
function methods:type(t)
    self._ctype = short_types[t] or t
    return self
end

-- syntax: ok, err = res:write(chunk) -- streams; yields while the client is more than 256 KiB behind
function methods:write(chunk)
    local x = self._x
    if not self._streaming then
        self._streaming = true
        local ok, err = x:start(self._status, self._ctype or TEXT, self._headers, self._length)
        if not ok then return nil, err end
    end
    return check(x:write(tostring(chunk)))
end

-- syntax: res:redirect(location, status) -- status 302 by default; the handler then returns
function methods:redirect(location, status)
    self._status = status or 302
    self:header("Location", location)
    return self
end

-- syntax: started = res:started() -- true once the response is on its way, or a file was chosen
-- (static files: sent after the middleware has returned)
function methods:started()
    return self._streaming or (self._file and true) or self._x:started()
end

-- syntax: response.add_missing_headers(res, headers) -- sets each of headers that res has under no
-- spelling of its name yet (static files: the file's validators never override a middleware's)
function _M.add_missing_headers(res, headers)
    local h = res._headers
    for k, v in pairs(headers) do
        local lk, found = str_lower(k), false
        if h then
            for name in pairs(h) do
                if str_lower(name) == lk then found = true; break end
            end
        end
        if not found then res:header(k, v) end
    end
end

-- A file response a handler chose (res._file, set by lua/moonlet/static.lua) is started here, after
-- every middleware has returned, so that the headers they set after next() go out with it; the
-- bytes go from the file to the socket in C (x:send_file), never through Lua. The file's own
-- headers (validators, Content-Range) join res's here, under those the middleware set, and only
-- here: a body a middleware puts in the file's place must not carry the file's ETag.
local function send_file(res, f)
    res._file = false
    _M.add_missing_headers(res, f.headers)
    local x = res._x
    local ok, err = x:start(f.status, f.ctype, res._headers, f.length)
    if not ok then return nil, err end
    res._streaming = true
    if f.length > 0 then check(x:send_file(f.path, f.offset, f.length)) end
    return x:finish() -- a failed transfer already closed the socket
end

-- Sends what the handler returned: body | status, body, headers (see the file head). A file the
-- handler chose is sent unless a middleware returned something else in its place or started a
-- stream of its own (res:write).
function _M.send(res, a, b, c)
    local x = res._x
    local f = res._file
    if f then
        if a == nil and not res._streaming then return send_file(res, f) end
        res._file = false
    end
    if res._streaming then
        if a ~= nil and type(a) ~= "number" then res:write(a) end
        return x:finish()
    end
    local status, body = res._status, a
    if type(a) == "number" then
        status, body = a, b
        if c then
            for k, v in pairs(c) do res:header(k, v) end
        end
    end
    local ctype = res._ctype
    local t = type(body)
    if t == "string" then
        ctype = ctype or TEXT
    elseif t == "table" then
        body = json.encode(body)
        ctype = ctype or JSON
    elseif body == nil then
        body = ""
    else
        body = tostring(body)
        ctype = ctype or TEXT
    end
    return x:respond(status, body, ctype, res._headers)
end

return _M
