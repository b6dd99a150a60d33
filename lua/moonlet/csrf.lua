-- lua/moonlet/csrf.lua: moonlet.csrf(opts), protection against cross-site request forgery for apps
-- with sessions (Django's CsrfViewMiddleware, Rails' protect_from_forgery): a request that changes
-- things (any method but GET, HEAD, OPTIONS, TRACE) must carry the session's secret token, which a
-- page of another site cannot read. The token lives in req.session (so moonlet.session comes
-- first in the chain), made on first use by req:csrf_token(), which a page puts in its forms:
--   <input type="hidden" name="_csrf" value="<%= csrf %>">   (values { csrf = req:csrf_token() })
-- and a script sends as the X-CSRF-Token header. It is read from that header, else from the field
-- of an application/x-www-form-urlencoded body (req:form(): the body is kept, the handler reads it
-- again), else from the query string (`?_csrf=`: a multipart upload's form action, whose body is
-- left to the handler to stream). Missing or wrong: 403, and the handler does not run.
local crypto = require "moonlet.crypto"
local abort = require("moonlet.response").abort

local type, error = type, error
local find, lower = string.find, string.lower

local _M = {}

local SAFE = { GET = true, HEAD = true, OPTIONS = true, TRACE = true }
local KEY = "_csrf" -- its name in req.session
local NO_SESSION = "moonlet.csrf: req.session is needed (app:use(moonlet.session{...}) before moonlet.csrf)"

-- syntax: token = req:csrf_token() -- the session's token, made now if it has none
local function csrf_token(req)
    local session = req.session
    if type(session) ~= "table" then
        error(NO_SESSION, 2)
    end
    local t = session[KEY]
    if type(t) ~= "string" then
        t = crypto.base64_encode(crypto.random(32), true)
        session[KEY] = t
    end
    return t
end

-- syntax: app:use(moonlet.csrf({ field = "_csrf", header = "X-CSRF-Token" }))
function _M.middleware(opts)
    opts = opts or {}
    local field = opts.field or "_csrf"
    local header = lower(opts.header or "X-CSRF-Token")
    if type(field) ~= "string" or type(header) ~= "string" then
        error("moonlet.csrf: field and header are names", 3)
    end
    local refused = abort(403, "403 Forbidden: CSRF token missing or incorrect\n")

    -- the token the request carries, or nil
    local function sent_token(req)
        local t = req:header(header)
        if t then return t end
        local ctype = req:header("content-type")
        if ctype and find(lower(ctype), "^%s*application/x%-www%-form%-urlencoded") then
            local form = req:form()
            t = form and form[field]
            if type(t) == "string" then return t end
        end
        return req.query[field]
    end

    return function(req, res, nxt)
        if type(req.session) ~= "table" then
            error(NO_SESSION, 0)
        end
        req.csrf_token = csrf_token
        if not SAFE[req.method] then
            local expected = req.session[KEY]
            local got = sent_token(req)
            if type(expected) ~= "string" or type(got) ~= "string" or not crypto.equal(got, expected) then
                error(refused, 0)
            end
        end
        return nxt()
    end
end

return _M
