-- lua/moonlet/forwarded.lua: moonlet.forwarded, the middleware for an app behind a reverse proxy
-- (nginx's realip module with real_ip_recursive, Werkzeug's ProxyFix, Express's "trust proxy").
-- When the connection comes from a trusted proxy, req.ip becomes the client's address taken from
-- X-Forwarded-For (or RFC 7239 Forwarded), req.scheme and req.host what the client asked the proxy
-- for (X-Forwarded-Proto / -Host, or the proto= and host= of the same Forwarded element).
--
-- Trust: the list is read from the right (the entry the nearest proxy added) and every address
-- that is itself a trusted proxy is skipped; the first one that is not is the client (all trusted:
-- the leftmost). A request from an untrusted peer is left as it is, whatever headers it carries:
-- a client cannot claim another address. Addresses are compared as bytes (IPv4, IPv6 with "::",
-- IPv4-mapped IPv6 as IPv4), so "10.0.0.0/8" and "::1" are ranges and addresses alike; "unix:"
-- trusts the peers of a Unix domain socket (nginx's set_real_ip_from unix:), whose req.ip is "unix:".
local str_find, str_sub, str_lower, str_match, str_gmatch, str_char, str_byte =
    string.find, string.sub, string.lower, string.match, string.gmatch, string.char, string.byte
local floor = math.floor

local _M = {}

local function ipv4_bytes(s)
    local a, b, c, d = str_match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then return nil end
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
    return str_char(a, b, c, d)
end

local function groups(part, out)
    if part == "" then return true end
    for g in str_gmatch(part .. ":", "([^:]*):") do
        if not str_find(g, "^%x%x?%x?%x?$") then return false end
        out[#out + 1] = tonumber(g, 16)
    end
    return true
end

-- The address as 4 bytes (IPv4, or IPv6 mapping one) or 16 bytes (IPv6); nil when it is not one.
function _M.ip_bytes(s)
    if type(s) ~= "string" then return nil end
    local v4 = ipv4_bytes(s)
    if v4 then return v4 end
    if not str_find(s, ":", 1, true) or str_find(s, "%%") then return nil end
    local tail4
    local head, last = str_match(s, "^(.*:)(%d+%.%d+%.%d+%.%d+)$")
    if head then -- an embedded IPv4 in the last 32 bits
        tail4 = ipv4_bytes(last)
        if not tail4 then return nil end
        s = head .. "0:0"
    end
    local left, right = s, nil
    local dc = str_find(s, "::", 1, true)
    if dc then
        left, right = str_sub(s, 1, dc - 1), str_sub(s, dc + 2)
        if str_find(right, "::", 1, true) then return nil end
    end
    local l, r = {}, {}
    if not groups(left, l) or (right and not groups(right, r)) then return nil end
    local n = #l + #r
    if (dc and n > 7) or (not dc and n ~= 8) then return nil end
    local words = {}
    for i = 1, #l do words[#words + 1] = l[i] end
    for _ = 1, 8 - n do words[#words + 1] = 0 end
    for i = 1, #r do words[#words + 1] = r[i] end
    local bytes = {}
    for i = 1, 8 do
        bytes[2 * i - 1] = str_char(floor(words[i] / 256))
        bytes[2 * i] = str_char(words[i] % 256)
    end
    local b = table.concat(bytes)
    if tail4 then b = str_sub(b, 1, 12) .. tail4 end
    if str_sub(b, 1, 12) == "\0\0\0\0\0\0\0\0\0\0\255\255" then return str_sub(b, 13) end
    return b
end

-- A trusted entry: "10.0.0.0/8", "::1", "fd00::/8"; { bytes, prefix bits }. Raises when malformed.
local function parse_range(s)
    local addr, bits = str_match(s, "^([^/]+)/(%d+)$")
    addr = addr or s
    local b = _M.ip_bytes(addr)
    if not b then error("moonlet.forwarded: not an address or range: " .. tostring(s), 4) end
    bits = bits and tonumber(bits) or #b * 8
    if bits > #b * 8 then error("moonlet.forwarded: prefix too long: " .. s, 4) end
    return { b, bits }
end

local function in_range(b, range)
    local rb, bits = range[1], range[2]
    if #b ~= #rb then return false end
    local whole = floor(bits / 8)
    if str_sub(b, 1, whole) ~= str_sub(rb, 1, whole) then return false end
    local rest = bits - whole * 8
    if rest == 0 then return true end
    local unit = 2 ^ (8 - rest) -- the byte's low bits outside the prefix
    return floor(str_byte(b, whole + 1) / unit) == floor(str_byte(rb, whole + 1) / unit)
end

-- "1.2.3.4", "[::1]:80", "1.2.3.4:80", "::1", a quoted one: the address alone
local function strip_port(s)
    s = str_match(s, '^%s*"?(.-)"?%s*$')
    local v6 = str_match(s, "^%[(.-)%]")
    if v6 then return v6 end
    local v4 = str_match(s, "^(%d+%.%d+%.%d+%.%d+):%d+$")
    return v4 or s
end

local function split_list(h)
    local out = {}
    for item in str_gmatch(h or "", "[^,]+") do
        item = str_match(item, "^%s*(.-)%s*$")
        if item ~= "" then out[#out + 1] = item end
    end
    return out
end

-- RFC 7239 elements: { { for =, proto =, host = }, ... } in order
local function parse_forwarded(h)
    local out = {}
    for _, element in ipairs(split_list(h)) do
        local e = {}
        for pair in str_gmatch(element, "[^;]+") do
            local k, v = str_match(pair, "^%s*([%w_-]+)%s*=%s*(.-)%s*$")
            if k then e[str_lower(k)] = str_match(v, '^"(.*)"$') or v end
        end
        out[#out + 1] = e
    end
    return out
end

-- syntax: app:use(moonlet.forwarded({ trusted = { "127.0.0.1", "10.0.0.0/8" }, header = "x-forwarded" }))
-- trusted: by default the loopback addresses and "unix:" (a proxy on this machine)
-- header: "x-forwarded" (X-Forwarded-For / -Proto / -Host, the default) or "forwarded" (RFC 7239)
function _M.middleware(opts)
    opts = opts or {}
    local trusted = opts.trusted or { "127.0.0.1", "::1", "unix:" }
    if type(trusted) ~= "table" then error("moonlet.forwarded: trusted is a list of addresses", 3) end
    local ranges, trust_unix = {}, false
    for _, s in ipairs(trusted) do
        if s == "unix:" then
            trust_unix = true
        else
            ranges[#ranges + 1] = parse_range(s)
        end
    end
    local kind = opts.header or "x-forwarded"
    if kind ~= "x-forwarded" and kind ~= "forwarded" then
        error("moonlet.forwarded: header is \"x-forwarded\" or \"forwarded\"", 3)
    end
    local function is_trusted(addr)
        if addr == "unix:" then return trust_unix end
        local b = _M.ip_bytes(addr)
        if not b then return false end
        for i = 1, #ranges do
            if in_range(b, ranges[i]) then return true end
        end
        return false
    end
    -- the index of the client in a list of addresses (right to left, past trusted proxies)
    local function client_of(addrs)
        for i = #addrs, 1, -1 do
            if not is_trusted(addrs[i]) then return i end
        end
        return 1
    end
    return function(req, _, next)
        if not is_trusted(req.ip) then return next() end
        if kind == "forwarded" then
            local elements = parse_forwarded(req:header("forwarded"))
            if elements[1] then
                local addrs = {}
                for i, e in ipairs(elements) do addrs[i] = strip_port(e["for"] or "unknown") end
                local i = client_of(addrs)
                local e = elements[i]
                if _M.ip_bytes(addrs[i]) then req.ip = addrs[i] end
                local proto = e.proto and str_lower(e.proto)
                if proto == "http" or proto == "https" then req.scheme = proto end
                if e.host and e.host ~= "" then req.host = e.host end
            end
            return next()
        end
        local addrs = split_list(req:header("x-forwarded-for"))
        if addrs[1] then
            for i = 1, #addrs do addrs[i] = strip_port(addrs[i]) end
            local a = addrs[client_of(addrs)]
            if _M.ip_bytes(a) then req.ip = a end
        end
        local protos = split_list(req:header("x-forwarded-proto"))
        local proto = protos[#protos] and str_lower(protos[#protos])
        if proto == "http" or proto == "https" then req.scheme = proto end
        local hosts = split_list(req:header("x-forwarded-host"))
        if hosts[#hosts] then req.host = hosts[#hosts] end
        return next()
    end
end

return _M
