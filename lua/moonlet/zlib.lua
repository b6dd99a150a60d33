-- lua/moonlet/zlib.lua: gzip and zlib data, whole or incremental (bindings/zlib.c). Used by the HTTP
-- client for `decompress = true`; handy for scripts and specs that make gzip bodies. Nothing here
-- waits: every call runs to completion on the caller's stack.
local core = require "moonlet.core"

local _M = {}

-- syntax: z = zlib.inflater() -- out, done = z:inflate(data, limit) (nil, "bad data" |
-- nil, "too large"); z:close(). Reads gzip or zlib data (the header tells which).
function _M.inflater(window_bits)
    return core.zlib_inflater(window_bits)
end

-- syntax: z = zlib.deflater(level, window_bits) -- out = z:deflate(data, flush); gzip by default.
-- flush: nil keeps back what helps the ratio, "sync" gives out all the data so far (the stream goes
-- on), true or "finish" ends the stream.
function _M.deflater(level, window_bits)
    return core.zlib_deflater(level, window_bits)
end

-- syntax: gz = zlib.gzip(s, level)
function _M.gzip(s, level)
    local z = core.zlib_deflater(level, 31)
    local out = z:deflate(s, true)
    z:close()
    return out
end

-- syntax: s = zlib.deflate(s, level) -- zlib format (RFC 1950)
function _M.deflate(s, level)
    local z = core.zlib_deflater(level, 15)
    local out = z:deflate(s, true)
    z:close()
    return out
end

-- syntax: s, err = zlib.inflate(data, limit) -- gzip or zlib data, whole; nil, "truncated" when the
-- stream does not end within data
function _M.inflate(data, limit)
    local z = core.zlib_inflater()
    local out, done = z:inflate(data, limit)
    z:close()
    if not out then return nil, done end
    if not done then return nil, "truncated" end
    return out
end

_M.gunzip = _M.inflate

return _M
