-- lua/moonlet/request_id.lua: moonlet.request_id(opts), a middleware that gives every request an id
-- (nginx's $request_id: 32 hex digits of 16 random bytes), so that one request can be followed
-- through the logs and the services it calls:
--   app:use(moonlet.request_id())                                 -- put it first
--   app:use(moonlet.request_id({ header = "X-Request-Id", trust = true }))
-- The id is req.id; the response carries it in the header (X-Request-Id by default); the access
-- log has it (json: "request_id", moonlet: " id=..."); a handler's error in the error log starts
-- with "[id]". trust = true takes the id a client (a proxy or a gateway in front) sent in that
-- header instead, when it is 1 to 200 characters of [A-Za-z0-9._:+/=-]; anything else gets a new
-- one. Pass req.id on in the header of the calls a handler makes to other services.
local crypto = require "moonlet.crypto"

local type, error = type, error

local _M = {}

-- syntax: id = request_id.new() -- 32 hex digits of 16 random bytes
function _M.new()
    return crypto.hex(crypto.random(16))
end

local function acceptable(id)
    return id ~= nil and #id >= 1 and #id <= 200 and id:find("^[%w%._:%+/=%-]+$") ~= nil
end

-- syntax: mw = moonlet.request_id({ header = "X-Request-Id", trust = false })
function _M.middleware(opts)
    opts = opts or {}
    if type(opts) ~= "table" then error("moonlet.request_id: opts is a table", 3) end
    local header = opts.header or "X-Request-Id"
    if type(header) ~= "string" or not header:find("^[%w%-]+$") then
        error("moonlet.request_id: header is a header name", 3)
    end
    local name, trust = header:lower(), opts.trust == true
    return function(req, res, next)
        local id = trust and req:header(name) or nil
        if not acceptable(id) then id = _M.new() end
        req.id = id
        res:header(header, id, true) -- on a 500 or 504 the server makes too
        res._x:set_request_id(id)
        return next()
    end
end

return _M
