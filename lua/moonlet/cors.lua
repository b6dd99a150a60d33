-- lua/moonlet/cors.lua: moonlet.cors(opts), a middleware for cross-origin requests from browsers
-- (the Fetch standard's CORS protocol; aiohttp-cors, Flask-CORS). A request without Origin, or from
-- an origin not allowed, goes on untouched (a browser then keeps the answer from the page); one from
-- an allowed origin gets Access-Control-Allow-Origin (and Allow-Credentials, Expose-Headers) on
-- whatever response it gets (the server's own 500 and 504 pages included). A preflight (OPTIONS
-- with Origin and Access-Control-Request-Method) is answered here, 204 with what is allowed, or 403
-- for an origin or method that is not, without reaching the routes. Responses whose headers depend
-- on Origin say `Vary: Origin`. Credentials (cookies) need the origins named: with '*' any site
-- could read what a logged-in user sees, so that raises.
local trim = require("moonlet.url").trim

local type, error, ipairs, tostring, concat = type, error, ipairs, tostring, table.concat
local lower, upper, gmatch, gsub = string.lower, string.upper, string.gmatch, string.gsub

local _M = {}

local SIMPLE_METHODS = { "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE" }

local function set_of(list, fold)
    local set = {}
    for _, v in ipairs(list) do set[fold(v)] = true end
    return set
end

local function list_of(v, what)
    if v == nil then return nil end
    if type(v) == "string" then return { v } end
    if type(v) ~= "table" then error("moonlet.cors: " .. what .. " is a list of strings", 4) end
    for _, s in ipairs(v) do
        if type(s) ~= "string" then error("moonlet.cors: " .. what .. " is a list of strings", 4) end
    end
    return v
end

-- syntax: app:use(moonlet.cors({ origins = "*" | { "https://app.example", ... } | function(origin)
--   -> bool, methods = { "GET", "POST", ... }, headers = { "Content-Type", ... } (the request
--   headers a page may send; default: those the preflight asks for), expose = { "X-Total", ... },
--   credentials = false, max_age = 600 }))
function _M.middleware(opts)
    opts = opts or {}
    local origins = opts.origins or "*"
    local credentials = opts.credentials == true
    if credentials and origins == "*" then -- every site could read what a logged-in user sees
        error("moonlet.cors: credentials need the origins listed (or a function), not '*'", 3)
    end
    local allowed -- origin -> allowed?
    if origins == "*" then
        allowed = function() return true end
    elseif type(origins) == "function" then
        allowed = origins
    else
        -- an origin has no path: "https://a.example/" in the list means "https://a.example"
        local function norm(o) return lower((gsub(o, "/+$", ""))) end
        local set = set_of(list_of(origins, "origins"), norm)
        allowed = function(o) return set[lower(o)] == true end
    end
    local any = origins == "*"
    local methods = list_of(opts.methods, "methods") or SIMPLE_METHODS
    local method_set = set_of(methods, upper)
    local allow_methods = concat(methods, ", ")
    local headers = list_of(opts.headers, "headers")
    local header_set = headers and set_of(headers, lower)
    local allow_headers = headers and concat(headers, ", ")
    local expose = list_of(opts.expose, "expose")
    local expose_headers = expose and expose[1] and concat(expose, ", ")
    local max_age = opts.max_age or 600
    if type(max_age) ~= "number" then error("moonlet.cors: max_age is a number of seconds", 3) end
    max_age = tostring(math.floor(max_age))
    -- "*" only where no credentials go and the answer is the same for every origin
    local echo = not any or credentials

    -- the CORS headers every answer to an allowed origin carries
    -- (`always`: on the server's error pages too, so that a page can read that it got a 500)
    local function allow(res, origin)
        res:header("Access-Control-Allow-Origin", echo and origin or "*", true)
        if credentials then res:header("Access-Control-Allow-Credentials", "true", true) end
        if echo then res:vary("Origin", true) end
    end

    -- whether each header a preflight asks for is allowed (all are, without a `headers` list)
    local function headers_ok(asked)
        if not header_set or not asked then return true end
        for name in gmatch(asked, "[^,%s]+") do
            if not header_set[lower(name)] then return false end
        end
        return true
    end

    return function(req, res, nxt)
        local origin = req:header("origin")
        if not origin then
            if echo then res:vary("Origin") end
            return nxt()
        end
        local ok = allowed(origin) and true or false
        local asked_method = req.method == "OPTIONS" and req:header("access-control-request-method")
        if asked_method then -- a preflight
            if echo then res:vary("Origin") end
            local asked_headers = req:header("access-control-request-headers")
            if not ok or not method_set[upper(trim(asked_method))]
                or not headers_ok(asked_headers) then
                return 403, "403 Forbidden: cross-origin request not allowed\n"
            end
            allow(res, origin)
            res:header("Access-Control-Allow-Methods", allow_methods)
            local hs = allow_headers or asked_headers
            if hs and hs ~= "" then
                res:header("Access-Control-Allow-Headers", hs)
                if not allow_headers then res:vary("Access-Control-Request-Headers") end
            end
            res:header("Access-Control-Max-Age", max_age)
            return 204
        end
        if ok then
            allow(res, origin)
            if expose_headers then res:header("Access-Control-Expose-Headers", expose_headers) end
        elseif echo then
            res:vary("Origin")
        end
        return nxt()
    end
end

return _M
