-- lua/moonlet/crypto.lua: moonlet.crypto, the few cryptographic pieces a web app needs, on OpenSSL
-- (bindings/crypto.c): digests, HMAC, random bytes, hex and base64, a comparison in constant time,
-- and signed values (what moonlet.session keeps in its cookie; Tornado's signed cookies): a value
-- the client may read but not change, with the time it was signed. Nothing here waits.
--
-- A signed value is `<value, base64url>.<unix time>.<HMAC-SHA256, base64url>`; the MAC covers the
-- name it was signed for too, so a value signed as one cookie is refused as another. A list of
-- secrets rotates them: the first signs, any verifies.
local core = require "moonlet.core"

local type, tonumber, error, floor = type, tonumber, error, math.floor
local byte, format, gsub, match = string.byte, string.format, string.gsub, string.match
local core_hmac, core_equal, b64enc, b64dec = core.hmac, core.equal, core.base64_encode,
    core.base64_decode

local _M = {}

-- syntax: raw = crypto.digest("md5" | "sha1" | "sha256" | "sha512", data)
_M.digest = core.digest
-- syntax: raw = crypto.hmac("sha256", key, data)
_M.hmac = core.hmac
-- syntax: bytes = crypto.random(n) -- from OpenSSL's CSPRNG: keys, session ids, tokens
_M.random = core.random_bytes
-- syntax: same = crypto.equal(a, b) -- in a time that does not depend on where they differ
_M.equal = core.equal

-- syntax: s = crypto.base64_encode(data, url) -- url: the URL alphabet (-_), no padding
_M.base64_encode = b64enc
-- syntax: data = crypto.base64_decode(s, url) -- nil when s is not base64 (padding optional)
_M.base64_decode = b64dec

-- syntax: s = crypto.hex(data) -- lower-case hex
function _M.hex(s)
    return (gsub(s, ".", function(ch) return format("%02x", byte(ch)) end))
end

local MIN_SECRET = 16

-- the list of secrets in secret (a string or a list), checked; raises on a short or missing one
local function secrets_of(secret, who, level)
    local list = type(secret) == "table" and secret or { secret }
    if not list[1] then error(who .. ": a secret is needed", level + 1) end
    for i = 1, #list do
        if type(list[i]) ~= "string" or #list[i] < MIN_SECRET then
            error(who .. ": a secret is a string of at least " .. MIN_SECRET
                .. " bytes (moonlet.crypto.hex(moonlet.crypto.random(32)) makes one)", level + 1)
        end
    end
    return list
end
_M.secrets_of = secrets_of

local function mac(secret, name, payload)
    return b64enc(core_hmac("sha256", secret, name .. "=" .. payload), true)
end

-- syntax: token = crypto.sign(secret, name, value, now) -- value (a string) signed for name (a
-- cookie's, say) at time now (seconds, moonlet.time() by default); secret: a string or a list
-- (the first signs)
function _M.sign(secret, name, value, now)
    local list = secrets_of(secret, "moonlet.crypto.sign", 2)
    if type(name) ~= "string" or type(value) ~= "string" then
        error("moonlet.crypto.sign: name and value are strings", 2)
    end
    now = now or core.time()
    if type(now) ~= "number" or not (now >= 0 and now < 1e12) then
        error("moonlet.crypto.sign: now is a time in seconds since the epoch", 2)
    end
    local payload = b64enc(value, true) .. "." .. format("%d", floor(now))
    return payload .. "." .. mac(list[1], name, payload)
end

-- syntax: value, err, signed_at = crypto.unsign(secret, name, token, max_age, now) -- the value
-- token carries, and when it was signed, if one of the secrets signed it for name no more than
-- max_age seconds before now (none: any age); nil, "bad signature" | "expired"
function _M.unsign(secret, name, token, max_age, now)
    local list = secrets_of(secret, "moonlet.crypto.unsign", 2)
    if type(name) ~= "string" then error("moonlet.crypto.unsign: name is a string", 2) end
    if type(token) ~= "string" then return nil, "bad signature" end
    local payload, b64, ts, sig = match(token, "^(([%w_-]*)%.(%d+))%.([%w_-]+)$")
    if not payload then return nil, "bad signature" end
    local good = false
    for i = 1, #list do
        if core_equal(mac(list[i], name, payload), sig) then good = true; break end
    end
    if not good then return nil, "bad signature" end
    now = now or core.time()
    local t = tonumber(ts)
    if t > now + 300 or (max_age and now - t > max_age) then return nil, "expired" end
    return b64dec(b64, true), nil, t
end

return _M
