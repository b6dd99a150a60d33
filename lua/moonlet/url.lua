-- lua/moonlet/url.lua: percent-decoding, query strings and path segments, shared by the router,
-- requests and static files; resolving a reference against a base URI (the HTTP client's
-- redirects); and trim, for the header values the Lua parsers read.
local str_find, str_gsub, str_sub, str_char, str_match = string.find, string.gsub, string.sub,
    string.char, string.match
local tonumber = tonumber

local _M = {}

local function hex_char(h)
    return str_char(tonumber(h, 16))
end

-- syntax: s = url.trim(s) -- without leading and trailing white space, in time linear in #s. (A
-- pattern such as "^%s*(.-)%s*$" backtracks over a long run of inner spaces: seconds of CPU for one
-- 32 KiB header a client controls.)
function _M.trim(s)
    local i = str_find(s, "%S")
    if not i then return "" end
    return str_sub(s, i, #str_match(s, ".*%S"))
end

-- syntax: s = url.unescape(s) -- %XX decoded; "+" left alone (paths)
function _M.unescape(s)
    if not str_find(s, "%", 1, true) then return s end
    return (str_gsub(s, "%%(%x%x)", hex_char))
end

-- syntax: s = url.unescape_form(s) -- as unescape, and "+" is a space (query strings, forms)
function _M.unescape_form(s)
    if str_find(s, "+", 1, true) then s = str_gsub(s, "+", " ") end
    return _M.unescape(s)
end

-- syntax: s = url.escape(s) -- everything but unreserved characters percent-encoded
function _M.escape(s)
    return (str_gsub(s, "[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- syntax: s = url.value_string(v) -- a value as it goes into a URL: whole numbers (up to 2^53, and
-- int64 cdata) in full, where tostring would give 1.2345678901234e+14 or 123LL
function _M.value_string(v)
    if type(v) == "number" and v == math.floor(v) and v >= -2 ^ 53 and v <= 2 ^ 53 then
        return ("%d"):format(v)
    elseif type(v) == "cdata" then
        return (tostring(v):gsub("U?LL$", ""))
    end
    return tostring(v)
end

-- syntax: qs = url.encode_query({ q = "a b", tag = { "x", "y" }, flag = true }) -- keys sorted;
-- a list repeats its key, true gives the bare key, false leaves it out ("flag&q=a%20b&tag=x&tag=y")
function _M.encode_query(q)
    local keys = {}
    for k in pairs(q) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    local out = {}
    for _, k in ipairs(keys) do
        local v = q[k]
        if v == nil then v = q[tonumber(k)] end
        if type(v) == "table" then
            for _, x in ipairs(v) do out[#out + 1] = _M.escape(k) .. "=" .. _M.escape(_M.value_string(x)) end
        elseif v == true then
            out[#out + 1] = _M.escape(k)
        elseif v ~= false then
            out[#out + 1] = _M.escape(k) .. "=" .. _M.escape(_M.value_string(v))
        end
    end
    return table.concat(out, "&")
end

-- The pairs of qs from pos on (n read so far) into first and all. A tail call per pair, not a
-- loop, as split_path: a handler's req.query parses inside the dispatcher's trace, and a loop
-- there aborts it (an inner loop in a root trace, or the loop unroll limit). A long query or form
-- body is still compiled: LuaJIT makes a loop of a hot function's tail calls to itself.
local function query_from(qs, pos, len, n, max, first, all)
    if pos > len then return first, all end
    local amp = str_find(qs, "&", pos, true) or len + 1
    local pair = str_sub(qs, pos, amp - 1)
    if pair ~= "" then
        n = n + 1
        if max and n > max then return first, all, true end
        local unescape = _M.unescape_form
        local eq = str_find(pair, "=", 1, true)
        local k, v
        if eq then
            k, v = unescape(str_sub(pair, 1, eq - 1)), unescape(str_sub(pair, eq + 1))
        else
            k, v = unescape(pair), ""
        end
        if first[k] == nil then
            first[k] = v
            all[k] = { v }
        else
            local list = all[k]
            list[#list + 1] = v
        end
    end
    return query_from(qs, amp + 1, len, n, max, first, all)
end

-- syntax: first, all, more = url.parse_query(qs, max) -- first[k] = first value; all[k] = every
-- value, in order. With max, at most max pairs are read and `more` is true when there were others:
-- a body may hold a million tiny pairs, each costing a string and a table (30 times its bytes).
function _M.parse_query(qs, max)
    local first, all = {}, {}
    if not qs or qs == "" then return first, all end
    return query_from(qs, 1, #qs, 0, max, first, all)
end

-- -- References (RFC 3986 section 5) -----------------------------------------------------------

-- The parts of a URI reference (RFC 3986 appendix B): scheme, authority, path, query, fragment;
-- an absent part is nil (an empty one ""), the path is always there.
local function split_ref(s)
    local scheme, rest = str_match(s, "^(%a[%w+.-]*):(.*)$")
    if not scheme then rest = s end
    local authority
    if str_sub(rest, 1, 2) == "//" then
        local e = str_find(rest, "[/?#]", 3) or #rest + 1
        authority, rest = str_sub(rest, 3, e - 1), str_sub(rest, e)
    end
    local fragment, query
    local h = str_find(rest, "#", 1, true)
    if h then rest, fragment = str_sub(rest, 1, h - 1), str_sub(rest, h + 1) end
    local q = str_find(rest, "?", 1, true)
    if q then rest, query = str_sub(rest, 1, q - 1), str_sub(rest, q + 1) end
    return scheme, authority, rest, query, fragment
end

-- path without its "." and ".." segments (RFC 3986 5.2.4), by a cursor over path rather than by
-- cutting the input buffer (that would copy a long path once per segment: a Location is the
-- server's to make long).
local function remove_dot_segments(path)
    if not str_find(path, ".", 1, true) then return path end
    local out, n, pos, len = {}, 0, 1, #path
    while pos <= len do
        if str_find(path, "^%.%./", pos) then         -- A: "../"
            pos = pos + 3
        elseif str_find(path, "^%./", pos) then       -- A: "./"
            pos = pos + 2
        elseif str_find(path, "^/%./", pos) then      -- B: "/./" -> "/"
            pos = pos + 2
        elseif str_find(path, "^/%.$", pos) then      -- B: "/." at the end -> "/"
            n = n + 1
            out[n] = "/"
            break
        elseif str_find(path, "^/%.%./", pos) then    -- C: "/../" -> "/", the last segment dropped
            pos = pos + 3
            if n > 0 then out[n], n = nil, n - 1 end
        elseif str_find(path, "^/%.%.$", pos) then    -- C: "/.." at the end
            if n > 0 then out[n], n = nil, n - 1 end
            n = n + 1
            out[n] = "/"
            break
        elseif str_find(path, "^%.%.?$", pos) then    -- D: "." or ".." alone
            break
        else                                          -- E: the next segment, with its "/"
            local seg = str_match(path, "^/?[^/]*", pos)
            n = n + 1
            out[n] = seg
            pos = pos + #seg
        end
    end
    return table.concat(out, "", 1, n)
end

-- syntax: s = url.resolve(base, ref) -- the target URI of reference ref (a Location, a link) from
-- the absolute URI base, per RFC 3986 5.2 (strict: "http:g" is that URI): "" is base itself and
-- "#f" base with that fragment (base's own fragment is dropped in both), dot segments are removed.
function _M.resolve(base, ref)
    local rs, ra, rp, rq, rf = split_ref(ref)
    local bs, ba, bp, bq = split_ref(base)
    local s, a, p, q = bs, ba
    if rs then
        s, a, p, q = rs, ra, remove_dot_segments(rp), rq
    elseif ra then
        a, p, q = ra, remove_dot_segments(rp), rq
    elseif rp == "" then
        p, q = bp, rq or bq
    else
        if str_sub(rp, 1, 1) ~= "/" then -- merged with base's path (5.2.3)
            if ba and bp == "" then
                rp = "/" .. rp
            else
                rp = (str_match(bp, "^(.*/)") or "") .. rp
            end
        end
        p, q = remove_dot_segments(rp), rq
    end
    local t = { s, ":" }
    if a then t[#t + 1] = "//" .. a end
    t[#t + 1] = p
    if q then t[#t + 1] = "?" .. q end
    if rf then t[#t + 1] = "#" .. rf end
    return table.concat(t)
end

-- syntax: s = url.encode_uri(s) -- the bytes that may not appear in a URI (RFC 3986 2: space,
-- control characters, non-ASCII bytes, "<>\^`{|}\"") percent-encoded, the rest left as it is (so
-- "%" escapes already there stay), as browsers and requests do with a Location before following it
local NOT_URI = "[^A-Za-z0-9%-%._~:/%?#%[%]@!%$&'%(%)%*%+,;=%%]"

function _M.encode_uri(s)
    if not str_find(s, NOT_URI) then return s end
    return (str_gsub(s, NOT_URI, function(c) return ("%%%02X"):format(c:byte()) end))
end

-- The segments of path from pos on, after the n in segs. A tail call per segment, not a loop: the
-- router splits every request's path, and a loop inside the dispatcher's trace aborts it (LuaJIT
-- records no inner loop in a root trace), leaving each request to the interpreter.
local function split_from(path, pos, len, segs, n)
    local slash = str_find(path, "/", pos, true)
    n = n + 1
    if not slash then
        segs[n] = str_sub(path, pos)
        return segs
    end
    segs[n] = str_sub(path, pos, slash - 1)
    pos = slash + 1
    if pos > len then
        segs[n + 1] = ""
        return segs
    end
    return split_from(path, pos, len, segs, n)
end

-- syntax: segs = url.split_path(path) -- "/a/b/" -> { "a", "b", "" }
function _M.split_path(path)
    local len = #path
    if len < 2 then return {} end
    return split_from(path, 2, len, {}, 0)
end

return _M
