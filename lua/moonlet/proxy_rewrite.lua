-- lua/moonlet/proxy_rewrite.lua: what moonlet.proxy (lua/moonlet/proxy.lua) rewrites in the
-- headers of an upstream's answer before the client sees them, as nginx does:
--   proxy_redirect default | from to   Location, Content-Location and Refresh's url=
--   proxy_cookie_domain from to        the Domain= attribute of each Set-Cookie line
--   proxy_cookie_path from to          the Path= attribute of each Set-Cookie line
-- Pure functions of strings, no state: proxy.lua checks the options once (check_map) and calls
-- these per header. A value that matches nothing comes back as it was, byte for byte.
local lower, sub, match, gsub, gmatch, find = string.lower, string.sub, string.match, string.gsub,
    string.gmatch, string.find
local type, pairs, error, concat = type, pairs, error, table.concat

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

-- The longest key of map that begins s (a plain prefix, as nginx's static `from`), or nil.
local function longest_prefix(map, s)
    local best
    for from in pairs(map) do
        if sub(s, 1, #from) == from and (not best or #from > #best) then best = from end
    end
    return best
end

-- One URL: under the upstream's (at a path boundary: /v2 is not a prefix of /v22) it becomes
-- client .. the rest; else as it was. pairs: the explicit map instead, when given.
local function rewrite_url(url, up, client, pairs_map)
    if pairs_map then
        local from = longest_prefix(pairs_map, url)
        if from then return pairs_map[from] .. sub(url, #from + 1) end
        return url
    end
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

-- syntax: value = rewrite.redirect(name, value, up, client, pairs_map) -- name: "location",
-- "content-location" or "refresh" (its url=, any case, quoted or not); client: the client's view
-- of the upstream's base ("https://front.example/api"); pairs_map: `redirect = { [from] = to }`
function _M.redirect(name, value, up, client, pairs_map)
    if name ~= "refresh" then return rewrite_url(value, up, client, pairs_map) end
    local head, q, url = match(value, "^(.-[Uu][Rr][Ll]%s*=%s*)(['\"]?)(.*)$")
    if not head then return value end
    local tail = ""
    if q ~= "" and sub(url, -1) == q then url, tail = sub(url, 1, -2), q end
    return head .. q .. rewrite_url(url, up, client, pairs_map) .. tail
end

-- The new Domain= value of a cookie, or nil: compared without case and without a leading dot
-- (RFC 6265 5.2.3 ignores it); the dot is kept when the upstream wrote one.
local function new_domain(map, v)
    local dot, bare = match(v, "^(%.?)(.*)$")
    bare = lower(bare)
    for from, to in pairs(map) do
        if lower(match(from, "^%.?(.*)$")) == bare then return dot .. match(to, "^%.?(.*)$") end
    end
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
                local from = longest_prefix(paths, v)
                if from then nv = paths[from] .. sub(v, #from + 1) end
            end
            if nv then return sep .. k .. eq .. nv .. sp end
        end)
    end
    return concat(out, "\n")
end

-- syntax: map = rewrite.check_map(value, what) -- a { [from] = to } table of strings, or raises
-- (at the caller of moonlet.proxy)
function _M.check_map(value, what)
    if type(value) ~= "table" then
        error("moonlet.proxy: " .. what .. " must be a table { [from] = to }", 3)
    end
    for from, to in pairs(value) do
        if type(from) ~= "string" or from == "" or type(to) ~= "string" or find(to, "[%c]") then
            error("moonlet.proxy: " .. what .. " maps strings to strings without control characters", 3)
        end
    end
    return value
end

return _M
