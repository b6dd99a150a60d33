-- lua/moonlet/session.lua: moonlet.session(opts), a middleware that gives each request a
-- `req.session` table kept in a signed cookie (Flask's default session, Tornado's signed cookies):
-- JSON, signed with HMAC-SHA256 (lua/moonlet/crypto.lua), so the client can read it but not change
-- it; no server-side store, nothing to clean up. Keep secrets and large data out of it: a cookie
-- holds about 4 KB, and a session that does not fit raises (a 500 with the reason in the log). It
-- holds what JSON does: string keys (an integer key comes back as a string), strings, numbers,
-- booleans, nested tables.
--
-- The cookie is read before the handler runs (a missing, forged, expired or unreadable one is an
-- empty session) and written just before the response's head goes out (res:on_send), whatever way
-- the response leaves: a returned body, moonlet.abort, a stream's first write, a static file. It is
-- written only when the session changed, or when it was signed more than half of max_age ago (an
-- active user's session does not expire under them); an emptied session deletes the cookie. A
-- handler error (500) writes nothing: the session stays as the request found it; so does a change
-- made after a stream started (its head is out) or in a WebSocket handler (the 101 carries no
-- cookie). A response that writes the cookie and says `Cache-Control: public` says `private`
-- instead: a shared cache must not hand one user's session to others.
local crypto = require "moonlet.crypto"
local json = require "moonlet.json"
local core = require "moonlet.core"
local cookie = require "moonlet.cookie"

local type, next, error, tostring, pairs = type, next, error, tostring, pairs
local find, gsub, lower = string.find, string.gsub, string.lower

local _M = {}

local MAX_COOKIE = 4096 -- bytes of name=value a browser keeps at least (RFC 6265 6.1)

-- syntax: app:use(moonlet.session({ secret = "at least 16 bytes" | { new, old, ... },
--   name = "session", max_age = 1209600, path = "/", domain =, secure = false, http_only = true,
--   same_site = "Lax" }))
function _M.middleware(opts)
    if type(opts) ~= "table" then error("moonlet.session: options with a secret are needed", 3) end
    local secrets = crypto.secrets_of(opts.secret, "moonlet.session", 3)
    local name = opts.name or "session"
    local max_age = opts.max_age or 14 * 86400
    if type(name) ~= "string" or type(max_age) ~= "number" or max_age <= 0 then
        error("moonlet.session: name is a string and max_age a number of seconds", 3)
    end
    local cookie_opts = {
        max_age = max_age, path = opts.path or "/", domain = opts.domain, secure = opts.secure,
        http_only = opts.http_only ~= false, same_site = opts.same_site or "Lax",
    }
    local deletion = {
        path = cookie_opts.path, domain = cookie_opts.domain, secure = cookie_opts.secure,
        http_only = cookie_opts.http_only, same_site = cookie_opts.same_site,
    }
    local refresh_after = max_age / 2
    cookie.serialize(name, "x", cookie_opts) -- a bad name or same_site raises now, not per request

    -- the session a request's cookie carries: its table, its JSON as the table encodes now (to
    -- see a change), the time it was signed; an empty table when there is none that verifies
    local function load(req)
        local token = req.cookies[name]
        if not token then return {}, nil, nil end
        local text, _, signed_at = crypto.unsign(secrets, name, token, max_age)
        local data = text and json.decode(text)
        if type(data) ~= "table" then return {}, nil, nil end
        return data, json.encode(data), signed_at
    end

    -- a response that sets a session cookie is this user's: not for a shared cache
    local function keep_private(res)
        local h = res._headers
        if not h then return end
        for k, v in pairs(h) do
            if type(v) == "string" and lower(k) == "cache-control" and find(lower(v), "public", 1, true) then
                v = gsub(v, "[Pp][Uu][Bb][Ll][Ii][Cc]", "private")
                res:header(k, (gsub(v, ",?%s*[Ss]%-[Mm][Aa][Xx][Aa][Gg][Ee]=%d+", "")))
            end
        end
    end

    return function(req, res, nxt)
        local data, text, signed_at = load(req)
        req.session = data
        local had_cookie = req.cookies[name] ~= nil
        res:on_send(function()
            local now = req.session
            if type(now) ~= "table" or next(now) == nil then -- emptied or removed
                if had_cookie then
                    res:cookie(name, nil, deletion)
                    keep_private(res)
                end
                return
            end
            local new, err = json.encode(now)
            if not new then
                error("moonlet.session: the session cannot be sent as JSON: " .. tostring(err), 0)
            end
            local t = core.time()
            if new == text and t - signed_at < refresh_after then return end
            local token = crypto.sign(secrets, name, new, t)
            if #name + 1 + #token > MAX_COOKIE then
                error("moonlet.session: the session is " .. tostring(#token) .. " bytes signed, more"
                    .. " than a cookie holds (" .. MAX_COOKIE .. "): keep large data elsewhere", 0)
            end
            res:cookie(name, token, cookie_opts)
            keep_private(res)
        end)
        return nxt()
    end
end

return _M
