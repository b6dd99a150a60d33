-- lua/moonlet/compress.lua: moonlet.gzip(opts), a middleware that gzips what a handler returns, as
-- nginx's `gzip on` does: only a whole body (a string or a table sent as JSON) of a compressible
-- type, at least min_length bytes, to a client whose Accept-Encoding takes gzip, and only when the
-- response has no Content-Encoding of its own. Streamed responses (res:write) and static files go
-- as they are. Responses that could have been compressed say `Vary: Accept-Encoding`.
local json = require "moonlet.json"
local zlib = require "moonlet.zlib"

local type, pairs, tonumber, tostring, error = type, pairs, tonumber, tostring, error
local find, lower, match, gmatch = string.find, string.lower, string.match, string.gmatch

local _M = {}

local COMPRESSIBLE = { "^text/", "json", "javascript", "xml", "^image/svg", "^application/wasm" }

-- gzip's q-value in an Accept-Encoding (RFC 9110 12.5.3): that of "gzip", else of "*", else 0
local function gzip_q(ae)
    local q_gzip, q_any
    for item in gmatch(ae, "[^,]+") do
        local coding, params = match(item, "^%s*([^;%s]+)%s*(.*)$")
        if coding then
            coding = lower(coding)
            local q = tonumber(match(params, "[qQ]%s*=%s*([%d.]+)")) or 1
            if coding == "gzip" or coding == "x-gzip" then
                q_gzip = q
            elseif coding == "*" then
                q_any = q
            end
        end
    end
    return q_gzip or q_any or 0
end
_M.gzip_q = gzip_q

local function compressible(ctype, types)
    ctype = lower(match(ctype, "^[^;]*"))
    for i = 1, #types do
        if find(ctype, types[i]) then return true end
    end
    return false
end

-- the value of a header res carries under any spelling of its name, and that spelling
local function header_of(res, name)
    local h = res._headers
    if not h then return nil end
    for k, v in pairs(h) do
        if lower(k) == name then return v, k end
    end
    return nil
end

-- syntax: app:use(moonlet.gzip({ min_length = 256, level = 6, types = { "^text/", "json", ... } }))
function _M.gzip(opts)
    opts = opts or {}
    local min_length = opts.min_length or 256
    local level = opts.level or 6
    local types = opts.types or COMPRESSIBLE
    if type(min_length) ~= "number" or type(level) ~= "number" or level < 0 or level > 9 then
        error("moonlet.gzip: min_length is a number and level 0 to 9", 2)
    end
    return function(req, res, next)
        local body = next()
        if res:started() or req.method == "HEAD" then return body end -- a stream or a file
        local status = res._status
        if status == 204 or status == 304 or status < 200 then return body end
        local t = type(body)
        local ctype = res._ctype
        if t == "table" then
            ctype = ctype or "application/json"
        elseif t == "string" then
            ctype = ctype or "text/plain; charset=utf-8"
        else
            return body
        end
        if not compressible(ctype, types) or header_of(res, "content-encoding") then return body end
        local vary, key = header_of(res, "vary")
        if not vary then
            res:header("Vary", "Accept-Encoding")
        elseif type(vary) == "string" and vary ~= "*"
            and not find(lower(vary), "accept-encoding", 1, true) then
            res:header(key, vary .. ", Accept-Encoding")
        end
        local ae = req:header("accept-encoding")
        if not ae or gzip_q(ae) <= 0 then return body end
        if t == "table" then
            local s, err = json.encode(body)
            if not s then error("moonlet.gzip: the body cannot be sent as JSON: " .. tostring(err), 0) end
            body = s
            if not res._ctype then res:type("json") end
        end
        if #body < min_length then return body end
        res:header("Content-Encoding", "gzip")
        return zlib.gzip(body, level)
    end
end

return _M
