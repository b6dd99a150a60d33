-- lua/moonlet/csrf.lua: moonlet.csrf(opts), protection against cross-site request forgery for apps
-- with sessions (Django's CsrfViewMiddleware, Rails' protect_from_forgery): a request that changes
-- things (any method but GET, HEAD, OPTIONS, TRACE) must carry a token made from the session's CSRF
-- secret, which a page of another site cannot read. The secret lives in req.session (so
-- moonlet.session comes first in the chain), made on first use by req:csrf_token(), which a page
-- puts in its forms:
--   <input type="hidden" name="_csrf" value="<%= csrf %>">   (values { csrf = req:csrf_token() })
-- and a script sends as the X-CSRF-Token header. Each call gives another token (the secret XORed
-- with a fresh random mask, as Django does: a compressed page cannot leak the secret to a BREACH
-- attack); any of them is good for the session. req:csrf_rotate() makes a new secret (call it at
-- login: a token planted before it is worth nothing after). The token is read from the header,
-- else from the field of an application/x-www-form-urlencoded body (req:form(): the body is kept,
-- the handler reads it again), else, for a multipart/form-data body only (an upload whose body is
-- left to the handler to stream), from the query string (`?_csrf=` in the form's action). Missing
-- or wrong: 403, and the handler does not run. A request whose Origin header (browsers send it
-- with unsafe requests) names another site than its Host, and not one of opts.trusted_origins, is
-- refused 403 before the token is looked at (Django's origin check). A token is made before the
-- response starts (the session cookie must go with it): after a stream's first write, making one
-- raises.
local crypto = require "moonlet.crypto"
local abort = require("moonlet.response").abort

local type, error, ipairs = type, error, ipairs
local find, lower, sub, byte, char, match = string.find, string.lower, string.sub, string.byte,
    string.char, string.match
local concat = table.concat
local bxor = require("bit").bxor

local _M = {}

local SAFE = { GET = true, HEAD = true, OPTIONS = true, TRACE = true }
local KEY = "_csrf" -- its name in req.session
local NO_SESSION = "moonlet.csrf: req.session is needed (app:use(moonlet.session{...}) before moonlet.csrf)"

local SECRET_BYTES = 32

local function xor(a, b) -- two strings of one length
    local out = {}
    for i = 1, #a do out[i] = char(bxor(byte(a, i), byte(b, i))) end
    return concat(out)
end

-- the session's secret (raw bytes), made when make is true and there is none
local function secret_of(req, make)
    local session = req.session
    if type(session) ~= "table" then error(NO_SESSION, 3) end
    local s = type(session[KEY]) == "string" and crypto.base64_decode(session[KEY], true)
    if s and #s == SECRET_BYTES then return s end
    if not make then return nil end
    s = crypto.random(SECRET_BYTES)
    session[KEY] = crypto.base64_encode(s, true)
    return s
end

-- whether token (a masked one, as req:csrf_token gives) was made from secret
local function valid(token, secret)
    local raw = type(token) == "string" and crypto.base64_decode(token, true)
    if not raw or #raw ~= 2 * SECRET_BYTES then return false end
    local mask = sub(raw, 1, SECRET_BYTES)
    return crypto.equal(xor(sub(raw, SECRET_BYTES + 1), mask), secret)
end

-- syntax: app:use(moonlet.csrf({ field = "_csrf", header = "X-CSRF-Token",
--   trusted_origins = { "https://app.example" } }))
function _M.middleware(opts)
    opts = opts or {}
    local field = opts.field or "_csrf"
    local header = lower(opts.header or "X-CSRF-Token")
    if type(field) ~= "string" or type(header) ~= "string" then
        error("moonlet.csrf: field and header are names", 3)
    end
    local refused = abort(403, "403 Forbidden: CSRF token missing or incorrect\n")
    local foreign = abort(403, "403 Forbidden: cross-site request (Origin)\n")
    local trusted = {}
    if opts.trusted_origins ~= nil then
        if type(opts.trusted_origins) ~= "table" then
            error("moonlet.csrf: trusted_origins is a list of origins", 3)
        end
        for _, o in ipairs(opts.trusted_origins) do trusted[lower(o)] = true end
    end

    -- whether a request's Origin (sent by browsers with unsafe requests) is this site's (its host
    -- and port those of the Host header) or a trusted one; "null" (a sandboxed page) is neither.
    -- Over https (req.scheme; moonlet.forwarded's X-Forwarded-Proto behind a proxy) a page served
    -- on http:// is another origin, one a network attacker can forge (Django compares the scheme
    -- too); over http the scheme is not known for sure (TLS may end at a proxy that does not say
    -- so), and either goes.
    local function origin_ok(req, origin)
        if trusted[lower(origin)] then return true end
        local scheme, host = match(origin, "^([%a][%w+.-]*)://(.*)$")
        if not host or host == "" or find(host, "/", 1, true) then return false end
        if req.scheme == "https" and lower(scheme) ~= "https" then return false end
        return lower(host) == lower(req.host or "") -- the Host header, or a trusted proxy's
    end

    -- the token the request carries, or nil
    local function sent_token(req)
        local t = req:header(header)
        if t then return t end
        local ctype = lower(req:header("content-type") or "")
        if find(ctype, "^%s*application/x%-www%-form%-urlencoded") then
            local form = req:form()
            t = form and form[field]
            return type(t) == "string" and t or nil
        end
        if find(ctype, "^%s*multipart/form%-data") then
            -- the query's (`?_csrf=` in the form's action), else a field before the files,
            -- read ahead and given back: the handler streams the whole body all the same
            return req.query[field] or req:multipart_field(field)
        end
        return nil
    end

    return function(req, res, nxt)
        if type(req.session) ~= "table" then error(NO_SESSION, 0) end
        -- syntax: token = req:csrf_token() -- a token for this session, its secret made if need be
        req.csrf_token = function()
            local secret = secret_of(req, false)
            if not secret then
                if res:started() then
                    error("moonlet.csrf: req:csrf_token() after the response started: its session"
                        .. " cookie could not go out (make the token before the first res:write)", 2)
                end
                secret = secret_of(req, true)
            end
            local mask = crypto.random(SECRET_BYTES)
            return crypto.base64_encode(mask .. xor(secret, mask), true)
        end
        -- syntax: req:csrf_rotate() -- a new secret: the tokens made before are good no more
        req.csrf_rotate = function()
            req.session[KEY] = nil
            secret_of(req, true)
        end
        if not SAFE[req.method] then
            local origin = req:header("origin")
            if origin and not origin_ok(req, origin) then error(foreign, 0) end
            local secret = secret_of(req, false)
            if not secret or not valid(sent_token(req), secret) then error(refused, 0) end
        end
        return nxt()
    end
end

return _M
