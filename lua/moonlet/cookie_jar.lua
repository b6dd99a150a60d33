-- lua/moonlet/cookie_jar.lua: a cookie jar for the HTTP client (moonlet.http.cookie_jar(); aiohttp's
-- ClientSession jar, requests.Session): it keeps what servers set with Set-Cookie and sends back
-- what belongs to each request, as a browser does (RFC 6265 section 5, without a public suffix
-- list: a Domain attribute of one label, "com", is refused unless it is the host itself).
--
-- A cookie is kept per (name, domain, path), replaced by a newer one of the same three, dropped
-- when it expires (Max-Age, else Expires; one without either lasts as long as the jar) or when a
-- server sets it already expired. Sent to a request whose host matches its domain (only that host
-- for a cookie set without Domain), whose path is under its path, over https when it is Secure;
-- longer paths first, then older cookies first. A plain-http response can neither set a Secure
-- cookie nor shadow one (RFC 6265bis). At most per_domain cookies (180) are kept for a domain and
-- max (3000) in all, the oldest going first; a cookie of over 4096 bytes, or with a control
-- character in it, is not kept. Nothing here waits.
local type, tonumber, pairs, ipairs, setmetatable, error = type, tonumber, pairs, ipairs, setmetatable,
    error
local find, sub, lower, match, gmatch, byte, gsub = string.find, string.sub, string.lower, string.match,
    string.gmatch, string.byte, string.gsub
local concat, sort = table.concat, table.sort
local trim = require("moonlet.url").trim
local core = require "moonlet.core"

local _M = {}
local methods = {}
local mt = { __name = "moonlet.http.cookie_jar", __index = methods }

local MAX_COOKIE = 4096
local httpdate = require "moonlet.httpdate"
local MONTHS, days_from_civil = httpdate.MONTHS, httpdate.days_from_civil

local DAYS_IN = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function leap(y) return y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) end

-- The time of a cookie date (RFC 6265 5.1.1: tokens in any order, the first hh:mm:ss, day of the
-- month, month name and year; digits may be followed by other text, "9th"), or nil when it is not
-- one (a day the month does not have included).
function _M.parse_date(s)
    local day, month, year, hh, mi, ss
    for tok in gmatch(s, "[^%s,;/%-]+") do
        local h, m, sec = match(tok, "^(%d%d?):(%d%d?):(%d%d?)%f[%D]")
        if h and not hh then
            hh, mi, ss = tonumber(h), tonumber(m), tonumber(sec)
        elseif not day and match(tok, "^%d%d?%f[%D]") then
            day = tonumber(match(tok, "^%d+"))
        elseif not month and MONTHS[lower(sub(tok, 1, 3))] then
            month = MONTHS[lower(sub(tok, 1, 3))]
        elseif not year and match(tok, "^%d%d%d?%d?%f[%D]") then
            year = tonumber(match(tok, "^%d+"))
        end
    end
    if not (day and month and year and hh) then return nil end
    if year < 70 then year = year + 2000 elseif year < 100 then year = year + 1900 end
    if year < 1601 or hh > 23 or mi > 59 or ss > 59 or day < 1 or day > DAYS_IN[month]
        or (month == 2 and day == 29 and not leap(year)) then
        return nil
    end
    return ((days_from_civil(year, month, day) * 24 + hh) * 60 + mi) * 60 + ss
end

local function is_ip(host)
    return match(host, "^%d+%.%d+%.%d+%.%d+$") ~= nil or find(host, ":", 1, true) ~= nil
end

-- whether host is domain or a subdomain of it (RFC 6265 5.1.3), never for an IP address
local function domain_match(host, domain)
    if host == domain then return true end
    if is_ip(host) then return false end
    local n = #domain
    return #host > n and sub(host, -n) == domain and byte(host, -n - 1) == 46 -- "."
end

-- the default path of a request path (RFC 6265 5.1.4): up to its last "/", else "/"
local function default_path(path)
    if sub(path, 1, 1) ~= "/" then return "/" end
    local last = match(path, "^(.*)/")
    if not last or last == "" then return "/" end
    return last
end

local function path_match(req_path, cpath)
    if req_path == cpath then return true end
    local n = #cpath
    if sub(req_path, 1, n) ~= cpath then return false end
    return sub(cpath, -1) == "/" or sub(req_path, n + 1, n + 1) == "/"
end

-- syntax: jar = moonlet.http.cookie_jar({ max = 3000, per_domain = 180 })
function _M.new(opts)
    local max = opts and opts.max or 3000
    local per_domain = opts and opts.per_domain or 180
    if type(max) ~= "number" or max < 1 or type(per_domain) ~= "number" or per_domain < 1 then
        error("moonlet.http.cookie_jar: max and per_domain are counts", 2)
    end
    return setmetatable({ _kept = {}, count = 0, seq = 0, max = max, per = {}, per_domain = per_domain },
                        mt)
end

local function key_of(c)
    return c.name .. "\0" .. c.domain .. "\0" .. c.path
end

-- a host without a trailing dot ("example.com." is "example.com")
local function bare(host)
    return (gsub(host, "%.+$", ""))
end

-- whether a Secure cookie of name is kept that the new one c, from http, would shadow or replace
-- (RFC 6265bis 5.7: a plain-http response leaves Secure cookies alone)
local function shadows_secure(jar, c)
    for _, k in pairs(jar._kept) do
        if k.secure and k.name == c.name
            and (domain_match(k.domain, c.domain) or domain_match(c.domain, k.domain))
            and path_match(c.path, k.path) then
            return true
        end
    end
    return false
end

local function count_domain(jar, domain, delta)
    local n = (jar.per[domain] or 0) + delta
    jar.per[domain] = n > 0 and n or nil
end

local function drop(jar, key, c)
    jar._kept[key] = nil
    jar.count = jar.count - 1
    count_domain(jar, c.domain, -1)
end

-- the oldest cookie (of domain, when given)
local function oldest(jar, domain)
    local found, fkey
    for key, c in pairs(jar._kept) do
        if (not domain or c.domain == domain) and (not found or c.seq < found.seq) then
            found, fkey = c, key
        end
    end
    return fkey, found
end

-- Takes one Set-Cookie line a response to u (the client's parsed URL: host, https, target) sent.
local function take(jar, u, line, now)
    -- too large, or control characters (a CR for a proxy to take as a line end): not kept
    if #line > MAX_COOKIE or find(line, "[%z\1-\8\10-\31\127]") then return end
    local pair, attrs = match(line, "^([^;]*)(.*)$")
    local eq = find(pair, "=", 1, true)
    if not eq then return end -- (a nameless cookie is not kept)
    local name, value = trim(sub(pair, 1, eq - 1)), trim(sub(pair, eq + 1))
    if name == "" then return end
    local host = bare(u.host)
    local c = { name = name, value = value, host_only = true, domain = host,
                path = default_path(match(u.target, "^[^?]*")), secure = false, expires = nil }
    local max_age, domain
    for attr in gmatch(attrs, "[^;]+") do
        local k, v = attr, ""
        local at = find(attr, "=", 1, true)
        if at then k, v = sub(attr, 1, at - 1), trim(sub(attr, at + 1)) end
        k = lower(trim(k))
        if k == "max-age" then
            if match(v, "^%-?%d+$") then max_age = tonumber(v) end
        elseif k == "expires" then
            local t = _M.parse_date(v)
            if t then c.expires = t end
        elseif k == "domain" then
            domain = bare(lower(match(v, "^%.?(.*)$"))) -- the last one counts; "" none
        elseif k == "path" then
            if sub(v, 1, 1) == "/" then c.path = v end
        elseif k == "secure" then
            c.secure = true
        end
    end
    if domain and domain ~= "" then
        if not domain_match(host, domain) then return end -- another site's: refused
        if find(domain, ".", 1, true) then
            c.domain, c.host_only = domain, false
        elseif domain ~= host then -- one label ("com"): a public suffix, unless it is the host
            return
        end
    end
    if max_age then c.expires = max_age <= 0 and 0 or now + max_age end -- Max-Age wins
    if not u.https and (c.secure or shadows_secure(jar, c)) then return end
    local key = key_of(c)
    local old = jar._kept[key]
    if c.expires and c.expires <= now then -- set already expired: a deletion
        if old then drop(jar, key, old) end
        return
    end
    if old then
        c.seq = old.seq -- keeps its place (its creation time) when replaced
        jar._kept[key] = c
        return
    end
    jar.seq = jar.seq + 1
    c.seq = jar.seq
    if (jar.per[c.domain] or 0) >= jar.per_domain then drop(jar, oldest(jar, c.domain)) end
    if jar.count >= jar.max then drop(jar, oldest(jar)) end
    jar._kept[key] = c
    jar.count = jar.count + 1
    count_domain(jar, c.domain, 1)
end

-- syntax: jar:store(u, set_cookie, now) -- from the client: the Set-Cookie lines (joined with
-- newlines, as res.headers gives them) of a response to u
function methods:store(u, set_cookie, now)
    now = now or core.time()
    for line in gmatch(set_cookie, "[^\n]+") do take(self, u, line, now) end
end

-- The cookies for u, in the order they are sent.
local function matching(jar, u, now)
    local path = match(u.target, "^[^?]*")
    if path == "" then path = "/" end
    local host = bare(u.host)
    local list = {}
    for key, c in pairs(jar._kept) do
        if c.expires and c.expires <= now then
            drop(jar, key, c)
        elseif (c.host_only and host == c.domain or not c.host_only and domain_match(host, c.domain))
            and path_match(path, c.path) and (u.https or not c.secure) then
            list[#list + 1] = c
        end
    end
    sort(list, function(a, b)
        if #a.path ~= #b.path then return #a.path > #b.path end
        return a.seq < b.seq
    end)
    return list
end

-- syntax: value = jar:header(u, now) -- the Cookie header for a request to u, or nil
function methods:header(u, now)
    if self.count == 0 then return nil end
    local list = matching(self, u, now or core.time())
    if not list[1] then return nil end
    local parts = {}
    for i, c in ipairs(list) do parts[i] = c.name .. "=" .. c.value end
    return concat(parts, "; ")
end

-- syntax: cookies = jar:cookies(url) -- { name = value } of those a request to url would send
-- (the first of a name: the most specific); jar:all() -- every cookie kept, as tables
function methods:cookies(url)
    local u = require("moonlet.http_client").parse_url(url)
    if not u then error("moonlet.http.cookie_jar: bad url " .. tostring(url), 2) end
    local out = {}
    for _, c in ipairs(matching(self, u, core.time())) do
        if out[c.name] == nil then out[c.name] = c.value end
    end
    return out
end

function methods:all()
    local out = {}
    local now = core.time()
    for key, c in pairs(self._kept) do
        if c.expires and c.expires <= now then drop(self, key, c) end
    end
    for _, c in pairs(self._kept) do
        out[#out + 1] = { name = c.name, value = c.value, domain = c.domain, path = c.path,
                          secure = c.secure, host_only = c.host_only, expires = c.expires }
    end
    sort(out, function(a, b) return a.name < b.name end)
    return out
end

-- syntax: jar:clear()
function methods:clear()
    self._kept, self.count, self.per = {}, 0, {}
end

return _M
