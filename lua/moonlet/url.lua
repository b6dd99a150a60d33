-- lua/moonlet/url.lua: percent-decoding, query strings and path segments, shared by the router,
-- requests and static files; and trim, for the header values the Lua parsers read.
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

-- syntax: first, all = url.parse_query(qs) -- first[k] = first value; all[k] = every value, in order
function _M.parse_query(qs)
    local first, all = {}, {}
    if not qs or qs == "" then return first, all end
    local unescape = _M.unescape_form
    local pos, len = 1, #qs
    while pos <= len do
        local amp = str_find(qs, "&", pos, true) or len + 1
        local pair = str_sub(qs, pos, amp - 1)
        if pair ~= "" then
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
        pos = amp + 1
    end
    return first, all
end

-- syntax: segs = url.split_path(path) -- "/a/b/" -> { "a", "b", "" }
function _M.split_path(path)
    local segs, n, pos = {}, 0, 2
    local len = #path
    if len < 2 then return segs end
    while true do
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
    end
end

return _M
