-- lua/moonlet/cookie.lua: HTTP cookies (RFC 6265): the Cookie header a request carries, read into a
-- table (req.cookies), and the Set-Cookie line of res:cookie(). Values are percent-decoded when
-- read and percent-encoded when set (as Express does), so any string round-trips; a value that was
-- not encoded by us comes through as it was sent, quotes taken off.
local trim = require("moonlet.url").trim

local find, sub, gsub, match, byte, format, char = string.find, string.sub, string.gsub,
    string.match, string.byte, string.format, string.char
local type, tostring, tonumber, ipairs, error = type, tostring, tonumber, ipairs, error
local floor, date = math.floor, os.date
local concat = table.concat

local _M = {}

-- syntax: cookies = cookie.parse(header) -- "a=1; b=2" -> { a = "1", b = "2" }; the first of a name
-- wins (the most specific path comes first, RFC 6265 5.4); pairs without "=" are skipped. Only ";"
-- separates: a comma may be inside a value that another program set without encoding it.
function _M.parse(header)
    local out = {}
    if not header then return out end
    for pair in header:gmatch("[^;]+") do
        local eq = find(pair, "=", 1, true)
        local name = eq and trim(sub(pair, 1, eq - 1))
        if name and name ~= "" and not find(name, "%s") and out[name] == nil then
            local value = trim(sub(pair, eq + 1))
            if #value >= 2 and byte(value, 1) == 34 and byte(value, -1) == 34 then
                value = sub(value, 2, -2)
            end
            if find(value, "%", 1, true) then
                value = gsub(value, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end)
            end
            out[name] = value
        end
    end
    return out
end

-- cookie-octet of RFC 6265 4.1.1, minus "%" (our escape character): everything else is encoded
local function encode(v)
    return (gsub(v, "[^%w!#$&'()*+%-./:<=>?@%[%]^_`{|}~]", function(c)
        return format("%%%02X", byte(c))
    end))
end

local SAME_SITE = { strict = "Strict", lax = "Lax", none = "None" }
local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" }

-- an HTTP date (IMF-fixdate) in English whatever the C locale, as strftime's %a and %b are not
local function http_date(t)
    local d = date("!*t", t)
    return format("%s, %02d %s %04d %02d:%02d:%02d GMT", DAYS[d.wday], d.day, MONTHS[d.month], d.year,
                  d.hour, d.min, d.sec)
end

-- a finite number of whole seconds in [lo, hi], or a raise naming the option
local function seconds(v, what, lo, hi)
    if type(v) ~= "number" or v ~= v or v < lo or v > hi then
        error(format("moonlet: cookie %s is a number of seconds from %d to %d", what, lo, hi), 4)
    end
    return floor(v)
end

-- syntax: line = cookie.serialize(name, value, opts) -- a Set-Cookie value. opts: max_age (seconds;
-- 0 deletes), expires (a Unix time), path, domain, secure, http_only, same_site ("Lax", "Strict",
-- "None": None needs secure). A name that is not a token, or a bad option, raises.
function _M.serialize(name, value, opts)
    if type(name) ~= "string" or not match(name, "^[!#$%%&'*+%-.^_`|~%w]+$") then
        error("moonlet: a cookie name is a token, not " .. tostring(name), 3)
    end
    if type(value) ~= "string" and type(value) ~= "number" then
        error("moonlet: a cookie value is a string or a number, not " .. type(value), 3)
    end
    opts = opts or {}
    local parts = { name .. "=" .. encode(tostring(value)) }
    local function add(s) parts[#parts + 1] = s end
    if opts.max_age ~= nil then
        add(format("Max-Age=%d", seconds(opts.max_age, "max_age", -2 ^ 31, 2 ^ 31)))
    end
    if opts.expires ~= nil then -- a Unix time up to the end of year 9999
        add("Expires=" .. http_date(seconds(opts.expires, "expires", 0, 253402300799)))
    end
    for _, k in ipairs({ "path", "domain" }) do
        local v = opts[k]
        if v ~= nil then
            if type(v) ~= "string" or find(v, "[%c;]") then error("moonlet: bad cookie " .. k, 3) end
            add((k == "path" and "Path=" or "Domain=") .. v)
        end
    end
    if opts.secure then add("Secure") end
    if opts.http_only then add("HttpOnly") end
    if opts.same_site ~= nil then
        local s = SAME_SITE[type(opts.same_site) == "string" and opts.same_site:lower() or ""]
        if not s then error("moonlet: cookie same_site is Lax, Strict or None", 3) end
        if s == "None" and not opts.secure then
            error("moonlet: cookie same_site None needs secure", 3)
        end
        add("SameSite=" .. s)
    end
    return concat(parts, "; ")
end

return _M
