-- lua/moonlet/json.lua: JSON through lua-cjson (Debian lua-cjson): encode, decode, and a null.
-- json.array(t) marks a table to encode as an array even when empty. Debian's lua-cjson 2.1.0 has
-- no array_mt, so an empty marked table is swapped for a placeholder string while encoding and
-- the placeholder is turned into [] afterwards; this walk happens only once json.array was used.
local cjson = require "cjson.safe"

local pairs, next, type, getmetatable, setmetatable = pairs, next, type, getmetatable, setmetatable
local str_find, str_gsub = string.find, string.gsub

local _M = { null = cjson.null }

-- The decoder is strict RFC 8259: cjson by default also takes NaN, Infinity, hex (0x10) and leading
-- zeros (01), which no JSON encoder writes and which json.encode refuses in turn; a NaN from a client
-- passes every `v < 0` check a handler makes. Its own instance, so the shared cjson.safe (OpenResty
-- code may set its options) is left as it is. A number too large for a double (1e999) is still inf.
local decoder = cjson.new()
decoder.decode_invalid_numbers(false)

local array_mt = cjson.array_mt or { __name = "moonlet.json.array" }
local native = cjson.array_mt ~= nil
local marked = false -- json.array was called at least once
local EMPTY = "\1moonlet-empty-array\1"
local EMPTY_JSON = '"\\u0001moonlet-empty-array\\u0001"'
local EMPTY_PAT = str_gsub(EMPTY_JSON, "%p", "%%%0")

-- Copies v with every empty marked table replaced by EMPTY; returns v itself when there is none.
local function swap(v, seen)
    if type(v) ~= "table" then return v end
    if next(v) == nil and getmetatable(v) == array_mt then return EMPTY end
    if seen[v] then return v end
    seen[v] = true
    local copy
    for k, x in pairs(v) do
        local y = swap(x, seen)
        if y ~= x then
            copy = copy or {}
            copy[k] = y
        end
    end
    if not copy then return v end
    for k, x in pairs(v) do
        if copy[k] == nil then copy[k] = x end
    end
    return copy
end

-- syntax: s, err = json.encode(value)
function _M.encode(v)
    if native or not marked then return cjson.encode(v) end
    local s, err = cjson.encode(swap(v, {}))
    if s and str_find(s, EMPTY_JSON, 1, true) then s = str_gsub(s, EMPTY_PAT, "[]") end
    return s, err
end

-- syntax: value, err = json.decode(s)
function _M.decode(s)
    return decoder.decode(s)
end

-- syntax: t = json.array(t) -- marks t to encode as [] even when empty
function _M.array(t)
    marked = true
    return setmetatable(t or {}, array_mt)
end

return _M
