-- lua/moonlet/response.lua: the response object a handler receives, and how a handler's return
-- values become the response. Setters chain: res:status(201):header("X-A", "b"). res:write(chunk)
-- starts a streamed response (chunked on HTTP/1.1) and yields while the client is far behind.
-- A handler returns body | status, body, headers: a string is sent as text/plain, a table as JSON.
local json = require "moonlet.json"
local function cookie() return require "moonlet.cookie" end -- on first use
local check = require("moonlet.task").check

local type, setmetatable, tostring, pairs = type, setmetatable, tostring, pairs
local table_remove = table.remove
local str_lower, gmatch, find = string.lower, string.gmatch, string.find
local has_new_tab, new_tab = pcall(require, "table.new") -- LuaJIT: a table made at its size
if not has_new_tab then new_tab = function() return {} end end

local compress -- lua/moonlet/compress.lua, loaded when moonlet.gzip is first used

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

-- Set-Cookie lines add up under one key: a cookie set earlier (res:cookie, a middleware) is not
-- lost when another is set by name, returned in a headers table or given by an abort. A string of
-- several lines (what moonlet.http's res.headers["set-cookie"] holds for several cookies: an app
-- passing an upstream's cookies on) is one cookie a line.
local function add_set_cookie(h, value)
    if value == nil then
        h["Set-Cookie"] = nil
        return
    end
    local list = h["Set-Cookie"] or {}
    if type(value) == "table" then
        for i = 1, #value do list[#list + 1] = value[i] end
    elseif type(value) == "string" and find(value, "\n", 1, true) then
        for line in gmatch(value, "[^\n]+") do list[#list + 1] = line end
    else
        list[#list + 1] = value
    end
    h["Set-Cookie"] = list
end

-- syntax: res:header(name, value, always) -> res -- value nil removes; a table sends the header
-- repeatedly. Content-Type (in any letter case) is res:type's; Set-Cookie (any case) adds to the
-- cookies set. always: the header goes on the error page (500, 504) the server makes if the
-- handler fails too, where the others are dropped (nginx's `add_header ... always`; CORS).
function methods:header(name, value, always)
    local h = self._headers
    if not h then h = new_tab(0, 4); self._headers = h end
    if always then
        local a = self._always
        if not a then a = {}; self._always = a end
        a[name] = true
    end
    local n = type(name) == "string" and #name or 0
    if n == 12 and (name == "Content-Type" or str_lower(name) == "content-type") then
        self._ctype = value
    elseif n == 10 and (name == "Set-Cookie" or str_lower(name) == "set-cookie") then
        add_set_cookie(h, value)
    else
        h[name] = value
    end
    return self
end

-- syntax: res:cookie(name, value, { max_age =, expires =, path =, domain =, secure =, http_only =,
-- same_site = }) -> res -- a Set-Cookie header (one per call); value nil deletes the cookie
-- (Max-Age=0, with the path, domain, secure, http_only and same_site it was set with: a browser
-- ignores a deletion of a __Secure- or __Host- cookie without Secure). See lua/moonlet/cookie.lua.
function methods:cookie(name, value, opts)
    if value == nil then
        local o = { max_age = 0, expires = 0 }
        if opts then
            o.path, o.domain, o.secure = opts.path, opts.domain, opts.secure
            o.http_only, o.same_site = opts.http_only, opts.same_site
        end
        opts, value = o, ""
    end
    local line = cookie().serialize(name, value, opts)
    local h = self._headers
    if not h then h = new_tab(0, 4); self._headers = h end
    add_set_cookie(h, line)
    return self
end

-- syntax: res:vary(name, always) -> res -- the response depends on the request header `name`: it
-- joins the Vary header, one already set (a string or a list: the caller's table is not changed)
-- unless that names it already or is "*"; always as res:header's
function methods:vary(name, always)
    local h = self._headers
    local key, vary
    if h then
        for k, v in pairs(h) do
            if str_lower(k) == "vary" then key, vary = k, v; break end
        end
    end
    if not vary then return self:header("Vary", name, always) end
    local lname = str_lower(name)
    local function names_it(v)
        for tok in gmatch(v, "[^,%s]+") do
            local t = str_lower(tok)
            if t == "*" or t == lname then return true end
        end
        return false
    end
    if type(vary) == "table" then
        local copy = {}
        for i = 1, #vary do
            if names_it(vary[i]) then return self end
            copy[i] = vary[i]
        end
        copy[#copy + 1] = name
        return self:header(key, copy, always)
    end
    if names_it(vary) then return self end
    return self:header(key, vary .. ", " .. name, always)
end

-- syntax: res:type(t) -> res -- "html", "json", "text", ... or a full media type
function methods:type(t)
    self._ctype = short_types[t] or t
    return self
end

-- syntax: res:on_send(fn) -> res -- fn(res) runs once, just before the response's head goes out
-- (a returned body, an abort's, the first res:write of a stream, a static file, after the file's
-- own headers joined res's), so that a middleware can still set headers from what the whole chain
-- did (moonlet.session's cookie; aiohttp's on_response_prepare). Hooks run in the order they were
-- added; a hook added by a hook runs too; one that raises is not run again, and those after it run
-- when the response is sent after all (a handler that caught the error). A response the server
-- makes of a handler's error (500), and a WebSocket's 101, run none.
function methods:on_send(fn)
    if type(fn) ~= "function" then error("moonlet: res:on_send takes a function", 2) end
    local hooks = self._on_send
    if not hooks then hooks = {}; self._on_send = hooks end
    hooks[#hooks + 1] = fn
    return self
end

local function run_on_send(res)
    local hooks = res._on_send
    while hooks[1] do
        local f = table_remove(hooks, 1) -- taken before it runs: once, even if it raises
        f(res)
    end
end

-- syntax: ok, err = res:write(chunk) -- streams; yields while the client is more than 256 KiB behind.
-- Under moonlet.gzip, each chunk goes through the stream's deflater (res._deflater), flushed.
function methods:write(chunk)
    local x = self._x
    if not self._streaming then
        if self._on_send then run_on_send(self) end
        self._streaming = true
        local ctype = self._ctype or TEXT
        local gz = self._gzip
        if gz then
            compress = compress or require "moonlet.compress"
            self._deflater = compress.stream(self, gz, self._status, ctype)
        end
        local ok, err = x:start(self._status, ctype, self._headers, self._length)
        if not ok then return nil, err end
    end
    local z = self._deflater
    if z then return check(x:write(z:deflate(tostring(chunk), "sync"))) end
    return check(x:write(tostring(chunk)))
end

-- syntax: events = res:sse({ retry = ms }) -- a Server-Sent Events stream (lua/moonlet/sse.lua):
-- events:send(data, { event =, id = }), events:comment(text)
function methods:sse(opts)
    return require("moonlet.sse").open(self, opts)
end

-- Ends a stream: the gzip trailer first when it is compressed, then the last chunk.
local function finish_stream(res, x)
    local z = res._deflater
    if z then
        res._deflater = nil
        local tail = z:deflate("", true)
        z:close()
        local ok, err = check(x:write(tail))
        if not ok then return nil, err end
    end
    return x:finish()
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

-- syntax: headers = response.always_headers(res) -- those set with `always` (nil: none), for an
-- error page the server makes
function _M.always_headers(res)
    local a, h = res._always, res._headers
    if not a or not h then return nil end
    local out = {}
    for name in pairs(a) do out[name] = h[name] end
    return out
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

-- A file response a handler chose (res._file, set by lua/moonlet/static.lua: a path, or the body
-- of a file gzipped on the fly) is started here, after every middleware has returned, so that the
-- headers they set after next() go out with it; the bytes go from the file to the socket in C
-- (x:send_file), never through Lua. The file's own headers (validators, Content-Range,
-- Content-Encoding) join res's here, under those the middleware set, and only here: a body a
-- middleware puts in the file's place must not carry the file's ETag or encoding.
local function send_file(res, f)
    res._file = false
    _M.add_missing_headers(res, f.headers)
    if res._on_send then run_on_send(res) end
    local x = res._x
    if f.body then return x:respond(f.status, f.body, f.ctype, res._headers) end -- gzipped on the fly
    local ok, err = x:start(f.status, f.ctype, res._headers, f.length)
    if not ok then
        f.file:close()
        return nil, err
    end
    res._streaming = true
    if f.length > 0 then
        ok, err = x:send_file(f.file, f.offset, f.length) -- the transfer owns and closes f.file
        f.file:close() -- nothing when the transfer took it: a failure before it did
        check(ok, err)
    else
        f.file:close()
    end
    return x:finish() -- a failed transfer already closed the socket
end

-- Sends what the handler returned: body | status, body, headers (see the file head). A file the
-- handler chose is sent unless a middleware returned something else in its place or started a
-- stream of its own (res:write).
function _M.send(res, a, b, c)
    -- `return res:redirect(url)`, `return 302, res:header(...)`: a chain of res's setters returns
    -- res itself, which is no body
    if a == res then a = nil elseif b == res then b = nil end
    local x = res._x
    local f = res._file
    if f then
        if a == nil and not res._streaming then return send_file(res, f) end
        res._file = false
        if f.file then f.file:close() end -- not sent: something else goes in its place
    end
    if res._streaming then
        if type(a) == "table" then
            error("moonlet: a streamed response ends with a string, not a table (res:write it as JSON)", 0)
        end
        if a ~= nil and type(a) ~= "number" then res:write(a) end
        return finish_stream(res, x)
    end
    local status, body = res._status, a
    if type(a) == "number" then
        status, body = a, b
        if c then
            for k, v in pairs(c) do res:header(k, v) end
        end
    end
    if res._on_send then
        res._status = status
        run_on_send(res)
        status = res._status
    end
    local ctype = res._ctype
    local t = type(body)
    if t == "string" then
        ctype = ctype or TEXT
    elseif t == "table" then
        local err
        body, err = json.encode(body)
        if not body then error("moonlet: the response body cannot be sent as JSON: " .. tostring(err), 0) end
        ctype = ctype or JSON
    elseif body == nil then
        body = ""
    elseif t == "function" or t == "thread" or t == "userdata" then -- a slip, not a body to print
        error("moonlet: a handler returned a " .. t .. " as the body (a string, a table sent as JSON, " ..
              "or status, body, headers)", 0)
    else
        body = tostring(body)
        ctype = ctype or TEXT
    end
    local gz = res._gzip -- moonlet.gzip is on for this request (lua/moonlet/compress.lua)
    if gz then
        compress = compress or require "moonlet.compress"
        body = compress.apply(res, gz, status, body, ctype)
    end
    return x:respond(status, body, ctype, res._headers)
end

return _M
