-- lua/moonlet/json.lua: JSON through lua-cjson (Debian lua-cjson): encode, decode, and a null.
-- json.array(t) marks a table to encode as an array even when empty (where cjson supports it).
local cjson = require "cjson.safe"

local _M = { null = cjson.null }

local array_mt = cjson.array_mt or {}

-- syntax: s, err = json.encode(value)
function _M.encode(v)
    return cjson.encode(v)
end

-- syntax: value, err = json.decode(s)
function _M.decode(s)
    return cjson.decode(s)
end

-- syntax: t = json.array(t) -- marks t to encode as [] even when empty
function _M.array(t)
    return setmetatable(t or {}, array_mt)
end


return _M
