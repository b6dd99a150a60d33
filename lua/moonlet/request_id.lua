-- lua/moonlet/request_id.lua: moonlet.request_id(opts), a middleware that gives every request an id
-- (nginx's $request_id: 32 hex digits of 16 random bytes), so that one request can be followed
-- through the logs and the services it calls:
--   app:use(moonlet.request_id())                                 -- put it first
--   app:use(moonlet.request_id({ header = "X-Request-Id", trust = true }))
-- The id is req.id; the response carries it in the header (X-Request-Id by default); the access
-- log has it (json: "request_id", moonlet: " id=..."); a handler's error in the error log starts
-- with "[id]". trust = true takes the id a client (a proxy or a gateway in front) sent in that
-- header instead, when it is 1 to 200 characters of [A-Za-z0-9._:+/=-]; anything else gets a new
-- one. propagate = true passes it on: every moonlet.http request made for this request (by its
-- handler, the tasks of its gathers, a task it spawned) carries it in the same header, unless the
-- call sets that header itself (nginx's `proxy_set_header X-Request-Id $request_id`, done for
-- every call), so that the services it calls log the same id.
local core = require "moonlet.core"
local crypto = require "moonlet.crypto"

local type, error, setmetatable = type, error, setmetatable

local _M = {}

-- The requests whose id is passed on, by their number (core.running_request, which every task
-- started for a request inherits): weak values, so an entry goes with its request's table. The
-- header's name is kept beside, by request (weak keys).
-- running_request[0]: the request the running task works for (bindings/task.c), read in place
local running_request = core.running_request -- (none in a moonlet.work state: no request there)
    and require("ffi").cast("const double *", core.running_request) or { [0] = 0 }
local by_number = setmetatable({}, { __mode = "v" })
local header_of = setmetatable({}, { __mode = "k" })

-- Whether some middleware passes ids on: moonlet.http asks outgoing() only then.
_M.propagating = false

-- syntax: header, id = request_id.outgoing() -- what the running task's request passes on, or nil
function _M.outgoing()
    local n = running_request[0]
    if n == 0 then return nil end
    local req = by_number[n]
    if req then return header_of[req], req.id end
    return nil
end

-- syntax: id = request_id.new() -- 32 hex digits of 16 random bytes
function _M.new()
    return crypto.hex(crypto.random(16))
end

local function acceptable(id)
    return id ~= nil and #id >= 1 and #id <= 200 and id:find("^[%w%._:%+/=%-]+$") ~= nil
end

-- syntax: mw = moonlet.request_id({ header = "X-Request-Id", trust = false, propagate = false })
function _M.middleware(opts)
    opts = opts or {}
    if type(opts) ~= "table" then error("moonlet.request_id: opts is a table", 3) end
    local header = opts.header or "X-Request-Id"
    if type(header) ~= "string" or not header:find("^[%w%-]+$") then
        error("moonlet.request_id: header is a header name", 3)
    end
    local name, trust, propagate = header:lower(), opts.trust == true, opts.propagate == true
    if propagate then _M.propagating = true end
    return function(req, res, next)
        local id = trust and req:header(name) or nil
        if not acceptable(id) then id = _M.new() end
        req.id = id
        res:header(header, id, true) -- on a 500 or 504 the server makes too
        res._x:set_request_id(id)
        if propagate then
            by_number[running_request[0]] = req
            header_of[req] = header
        end
        return next()
    end
end

return _M
