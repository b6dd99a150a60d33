-- lua/moonlet/headers.lua: header tables that answer in any letter case. moonlet keeps header
-- names in lower case (req.headers, moonlet.http's res.headers); this metatable lets
-- headers["Content-Type"] find headers["content-type"], as OpenResty's ngx.req.get_headers() and
-- aiohttp's CIMultiDict do. Only a read that misses pays (one string.lower); pairs() still walks the
-- lower-case names, and a key set in another case stays that case.
local lower, rawget, type, setmetatable = string.lower, rawget, type, setmetatable

local _M = {}

local mt = { __name = "moonlet.headers", __index = function(t, k)
    if type(k) ~= "string" then return nil end
    local l = lower(k)
    if l == k then return nil end
    return rawget(t, l)
end }
_M.mt = mt

-- syntax: t = headers.wrap(t) -- t itself, which now answers in any letter case
function _M.wrap(t)
    setmetatable(t, mt)
    return t
end

return _M
