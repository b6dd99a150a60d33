-- lua/moonlet/proxy_rewrite.lua: what moonlet.proxy (lua/moonlet/proxy.lua) rewrites in the
-- headers of an upstream's answer before the client sees them, as nginx does:
--   proxy_redirect default | from to   Location, Content-Location and Refresh's url=
--   proxy_cookie_domain from to        the Domain= attribute of each Set-Cookie line
--   proxy_cookie_path from to          the Path= attribute of each Set-Cookie line
-- Pure functions of strings, no state: proxy.lua makes each option a list of rules once
-- (check_map) and calls these per header. A value that matches nothing comes back as it was, byte
-- for byte. A rule's from is a plain prefix (proxy_cookie_domain: the whole domain), or, written
-- "~re" ("~*re": without case), a PCRE regex as nginx's: the first match anywhere in the value
-- replaces the whole value with to, whose $1, ${1}, $name are the regex's groups.
local core = require "moonlet.core"

local lower, sub, match, gsub, gmatch, find = string.lower, string.sub, string.match, string.gsub,
    string.gmatch, string.find
local type, pairs, error, concat, sort, tostring = type, pairs, error, table.concat, table.sort,
    tostring

local _M = {}

local DEFAULT_PORT = { http = "80", https = "443", ws = "80", wss = "443" }

-- An absolute URL's origin, normalized (lower-case scheme and host, no default port), and the rest
-- (path, query, fragment: "" or starting with /, ? or #); nil for a relative reference.
local function split_url(u)
    local scheme, auth, rest = match(u, "^(%a[%w+.-]*)://([^/?#]*)(.*)$")
    if not scheme then return nil end
    scheme, auth = lower(scheme), lower(auth)
    local host, port = match(auth, "^(.-):(%d*)$")
    if host and (port == "" or DEFAULT_PORT[scheme] == port) then auth = host end
    return scheme .. "://" .. auth, rest
end

-- syntax: up = rewrite.upstream(base) -- what `proxy_redirect default` looks for: base is the
-- upstream URL without a trailing "/" ("http://127.0.0.1:9000/v2")
function _M.upstream(base)
    local origin, path = split_url(base)
    return { origin = origin, path = path }
end

-- s rewritten by the first rule of rules that matches it (a plain from: a prefix of s, replaced;
-- a regex: anywhere in s, the whole of s replaced), or nil when none does. same(from, s): the
-- plain comparison instead of a prefix (cookie domains).
local function first_rule(rules, s, same)
    for i = 1, #rules do
        local r = rules[i]
        local rx = r.rx
        if rx then
            local out, n = rx:gsub(s, r.to, false)
            if n and n > 0 then return out end
        elseif same then
            if same(r.from, s) then return r.to end
        elseif sub(s, 1, #r.from) == r.from then
            return r.to .. sub(s, #r.from + 1)
        end
    end
end

-- One URL: under the upstream's (at a path boundary: /v2 is not a prefix of /v22) it becomes
-- client .. the rest; else as it was. rules: the explicit ones instead, when given.
local function rewrite_url(url, up, client, rules)
    if rules then return first_rule(rules, url) or url end
    local origin, rest = split_url(url)
    if origin ~= up.origin then return url end
    local path = up.path
    if sub(rest, 1, #path) ~= path then return url end
    local tail = sub(rest, #path + 1)
    local c = sub(tail, 1, 1)
    if c ~= "" and c ~= "/" and c ~= "?" and c ~= "#" then return url end
    local out = client .. tail
    if out == "" or find(out, "^[?#]") then out = "/" .. out end -- (no Host: a path alone)
    return out
end

-- syntax: value = rewrite.redirect(name, value, up, client, rules) -- name: "location",
-- "content-location" or "refresh" (its url=, any case, quoted or not); client: the client's view
-- of the upstream's base ("https://front.example/api"); rules: check_map's of `redirect = {...}`
function _M.redirect(name, value, up, client, rules)
    if name ~= "refresh" then return rewrite_url(value, up, client, rules) end
    local head, q, url = match(value, "^(.-[Uu][Rr][Ll]%s*=%s*)(['\"]?)(.*)$")
    if not head then return value end
    local tail = ""
    if q ~= "" and sub(url, -1) == q then url, tail = sub(url, 1, -2), q end
    return head .. q .. rewrite_url(url, up, client, rules) .. tail
end

-- Cookie domains are compared without case and without a leading dot (RFC 6265 5.2.3 ignores it)
local function same_domain(from, bare)
    return lower(match(from, "^%.?(.*)$")) == lower(bare)
end

-- The new Domain= value of a cookie, or nil: the dot is kept when the upstream wrote one (a
-- regex sees the domain without it, as nginx's).
local function new_domain(rules, v)
    local dot, bare = match(v, "^(%.?)(.*)$")
    local to = first_rule(rules, bare, same_domain)
    if to then return dot .. match(to, "^%.?(.*)$") end
end

-- syntax: value = rewrite.cookies(value, domains, paths) -- each line of a Set-Cookie value (the
-- HTTP client joins repeated ones with "\n") with its Domain= and Path= attributes mapped
function _M.cookies(value, domains, paths)
    local out = {}
    for line in gmatch(value, "[^\n]+") do
        out[#out + 1] = gsub(line, "(;%s*)(%a+)(%s*=%s*)([^;]*)", function(sep, k, eq, attr)
            local v, sp = match(attr, "^(.-)(%s*)$")
            local key, nv = lower(k), nil
            if key == "domain" and domains then
                nv = new_domain(domains, v)
            elseif key == "path" and paths then
                nv = first_rule(paths, v)
            end
            if nv then return sep .. k .. eq .. nv .. sp end
        end)
    end
    return concat(out, "\n")
end

-- A rule { from =, to =, rx = (a "~" from: compiled) }; raises at the caller of moonlet.proxy.
local function rule(from, to, what)
    if type(from) ~= "string" or from == "" or type(to) ~= "string" or find(to, "[%c]") then
        error("moonlet.proxy: " .. what .. " maps strings to strings without control characters", 4)
    end
    local r = { from = from, to = to }
    local nocase, re = match(from, "^~(%*?)(.+)$")
    if re then
        -- the value's whole length is matched, so that the whole of it is replaced: the lazy .*?
        -- finds re's first match as an unanchored search does, and (?:) keeps re's groups' numbers
        local rx, err = core.regex("^.*?(?:" .. re .. ").*\\z", nocase == "*" and "is" or "s")
        if not rx then -- (PCRE's message quotes the pattern as wrapped above: the user's instead)
            err = gsub(tostring(err), ' in ".*"$', "")
            error("moonlet.proxy: " .. what .. ": bad regex " .. from .. ": " .. err, 4)
        end
        local _, _, terr = rx:gsub("", to, false)
        if terr then error("moonlet.proxy: " .. what .. ": " .. terr .. ": " .. to, 4) end
        r.rx = rx
    end
    return r
end

-- syntax: rules = rewrite.check_map(value, what) -- value: { [from] = to } (plain prefixes, the
-- longest first, then the "~" regexes in the order of their text) or { { from, to }, ... } (in
-- this order, the first match wins: nginx's order of its directives); raises (at the caller of
-- moonlet.proxy) on anything else
function _M.check_map(value, what)
    if type(value) ~= "table" then
        error("moonlet.proxy: " .. what .. " must be a table { [from] = to } or { { from, to }, ... }", 3)
    end
    local rules = {}
    if value[1] ~= nil then
        -- keys 1..#value and no other: a hole would leave #value short of the rules after it
        local n, ok = 0, true
        for k, pair in pairs(value) do
            n = n + 1
            ok = ok and type(k) == "number" and k % 1 == 0 and k >= 1 and type(pair) == "table"
        end
        if not ok or n ~= #value then
            error("moonlet.proxy: " .. what .. " is either { [from] = to } or { { from, to }, ... }", 3)
        end
        for i = 1, #value do rules[i] = rule(value[i][1], value[i][2], what) end
        return rules
    end
    for from, to in pairs(value) do rules[#rules + 1] = rule(from, to, what) end
    sort(rules, function(a, b)
        if (a.rx == nil) ~= (b.rx == nil) then return a.rx == nil end
        if a.rx or #a.from == #b.from then return a.from < b.from end
        return #a.from > #b.from
    end)
    return rules
end

return _M
