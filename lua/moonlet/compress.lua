-- lua/moonlet/compress.lua: moonlet.gzip(opts), a middleware that turns on gzip for the responses
-- of the requests it wraps, as nginx's `gzip on` does. The middleware only notes, before next(),
-- whether the client takes gzip; the body is compressed in response.send, once the whole chain has
-- returned and the response that really goes out is known (an outer middleware's abort or body
-- included). Compressed: a whole body (a string, or a table sent as JSON) of a compressible type,
-- at least min_length bytes, with status 200, 403 or 404 (nginx's), and no Content-Encoding of its
-- own; and a stream (res:write) of such a type and status, chunk by chunk, each write flushed
-- (Z_SYNC_FLUSH) so that what the handler wrote reaches the client at once, as it would without
-- gzip (a countdown, server-sent events). A static file goes as its precompressed `.gz` sibling
-- when it has one (nginx's gzip_static), else, when its type is compressible and its size
-- min_length..static_max, gzipped from a cache kept here (compressed once per version of the file)
-- (lua/moonlet/static.lua); others go as they are. A compressible response
-- says `Vary: Accept-Encoding` (its representation depends on it), loses a Content-Length the
-- handler set (the C side sends the compressed one, or chunks) and has a strong ETag weakened
-- (W/). HEAD gets the headers GET would.
local zlib = require "moonlet.zlib"
local fs = require "moonlet.fs"
local sync = require "moonlet.sync"
local static = require "moonlet.static"
local file_version, same_version = static.version, static.same_version

local type, pairs, tonumber, error = type, pairs, tonumber, error
local find, lower, match, gmatch, sub = string.find, string.lower, string.match, string.gmatch,
    string.sub

local _M = {}

local COMPRESSIBLE = { "^text/", "json", "javascript", "xml", "^image/svg", "^application/wasm" }

-- The q of one Accept-Encoding item's parameters (";q=0.5"): 1 without one, 0 when it is not a
-- qvalue (RFC 9110 12.4.2: "0" to "1" with up to three decimals).
local function qvalue(params)
    for param in gmatch(params, "[^;]+") do
        local name, v = match(param, "^%s*([^=%s]+)%s*=%s*(%S*)%s*$")
        if name and lower(name) == "q" then
            if not (match(v, "^0%.?%d?%d?%d?$") or match(v, "^1%.?0?0?0?$")) then return 0 end
            return tonumber(v) or 0
        end
    end
    return 1
end

-- gzip's q-value in an Accept-Encoding (RFC 9110 12.5.3): that of "gzip" (its first mention), else
-- of "*", else 0
local function gzip_q(ae)
    local q_gzip, q_any
    for item in gmatch(ae, "[^,]+") do
        local coding, params = match(item, "^%s*([^;%s]+)%s*(.*)$")
        if coding then
            coding = lower(coding)
            if (coding == "gzip" or coding == "x-gzip") and not q_gzip then
                q_gzip = qvalue(params)
            elseif coding == "*" and not q_any then
                q_any = qvalue(params)
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

local STATUSES = { [200] = true, [403] = true, [404] = true }

-- A bounded cache of gzipped static files, path -> { version, body }: an entry serves while its
-- file's stat (core.stat) says it is the same version: size, inode, mtime and ctime (nanoseconds:
-- a write within the same second, or one that sets mtime back, changes it). When its bodies pass
-- max bytes, the entries put first go first (FIFO: a file asked for again is compressed again,
-- once). The queue of entries in order is compacted once it holds more replaced entries than live
-- ones.
local cache_mt = {}
cache_mt.__index = cache_mt

-- syntax: cache = compress.cache(max_bytes)
function _M.cache(max)
    return setmetatable({ entries = {}, queue = {}, head = 1, tail = 0, dead = 0, bytes = 0,
                          max = max, pending = {} }, cache_mt)
end

-- syntax: body = cache:get(path, st) -- nil when absent or made from another version of the file
function cache_mt:get(path, st)
    local e = self.entries[path]
    if e and same_version(e.version, st) then return e.body end
    return nil
end

local function drop(c, e)
    c.entries[e.path] = nil
    c.bytes = c.bytes - #e.body
    e.body = "" -- its place in the queue holds nothing any more
end

-- the queue without the places of replaced entries, in the same order
local function compact(c)
    local q, n = {}, 0
    for i = c.head, c.tail do
        local e = c.queue[i]
        if c.entries[e.path] == e then n = n + 1; q[n] = e end
    end
    c.queue, c.head, c.tail, c.dead = q, 1, n, 0
end

-- syntax: cache:put(path, st, body)
function cache_mt:put(path, st, body)
    local old = self.entries[path]
    if old then
        drop(self, old)
        self.dead = self.dead + 1
    end
    if #body <= self.max then
        local e = { path = path, version = file_version(st), body = body }
        self.entries[path] = e
        self.bytes = self.bytes + #body
        self.tail = self.tail + 1
        self.queue[self.tail] = e
    end
    while self.bytes > self.max do
        local first = self.queue[self.head]
        self.queue[self.head] = nil
        self.head = self.head + 1
        if self.entries[first.path] == first then drop(self, first) else self.dead = self.dead - 1 end
    end
    if self.dead > 32 and self.dead > (self.tail - self.head + 1) / 2 then compact(self) end
end

-- syntax: app:use(moonlet.gzip({ min_length = 256, level = 6, types = { "^text/", "json", ... },
--                               static_max = 1048576, cache = 8388608 }))
function _M.gzip(opts)
    opts = opts or {}
    local min_length = opts.min_length or 256
    local level = opts.level or 6
    local types = opts.types or COMPRESSIBLE
    local static_max = opts.static_max or 1048576
    local cache_max = opts.cache or 8388608
    if type(min_length) ~= "number" or type(level) ~= "number" or level < 0 or level > 9
        or type(types) ~= "table" or type(static_max) ~= "number" or type(cache_max) ~= "number" then
        error("moonlet.gzip: min_length, static_max and cache are numbers, level 0 to 9 and types a"
            .. " list of patterns", 2)
    end
    local cache = _M.cache(cache_max)
    -- what response.send and static files need, one table for the clients that take gzip and one
    -- for the others
    local yes = { accept = true, min_length = min_length, level = level, types = types,
                  static_max = static_max, cache = cache }
    local no = { accept = false, min_length = min_length, level = level, types = types,
                 static_max = static_max, cache = cache }
    return function(req, res, next)
        local ae = req:header("accept-encoding")
        res._gzip = ae and gzip_q(ae) > 0 and yes or no
        return next()
    end
end

-- syntax: ok = compress.file_compressible(gz, st, ctype) -- from lua/moonlet/static.lua: whether a
-- file of this stat and type is sent gzipped to a client that takes gzip (min_length..static_max)
function _M.file_compressible(gz, st, ctype)
    return st.size >= gz.min_length and st.size <= gz.static_max and compressible(ctype, gz.types)
end

-- syntax: body = compress.file(gz, path, st) -- the gzip of a file file_compressible accepted:
-- from the cache when it was made from this version of the file, else read (on the thread pool)
-- and compressed now (on the loop: at most static_max bytes, once per version while it stays
-- cached; requests for a file being compressed wait for it rather than compress it too); nil, err
-- when the file cannot be read whole (changed meanwhile: sent as it is)
function _M.file(gz, path, st)
    local cache = gz.cache
    local body = cache:get(path, st)
    if body then return body end
    local busy = cache.pending[path]
    if busy then
        busy:wait()
        body = cache:get(path, st)
        if body then return body end
    end
    local done = sync.event()
    cache.pending[path] = done
    local ok, data, err = pcall(fs.read, path) -- (a cancelled wait raises: pending is cleared)
    if ok and data and #data == st.size then
        body = zlib.gzip(data, gz.level)
        cache:put(path, st, body)
    end
    if cache.pending[path] == done then cache.pending[path] = nil end
    done:set() -- after the put: a waiter finds the body
    if not ok then error(data, 0) end
    if not data then return nil, err end
    if not body then return nil, "changed" end
    return body
end

-- Whether a response of this status and type is compressible: if so it says Vary: Accept-Encoding
-- (whether this client takes gzip or not) and true is returned.
local function negotiate(res, gz, status, ctype)
    if not STATUSES[status] or not ctype or not compressible(ctype, gz.types)
        or header_of(res, "content-encoding") then
        return false
    end
    res:vary("Accept-Encoding")
    return true
end

-- res's headers for its gzipped representation: no Content-Length of the identity one, a weak
-- ETag, Content-Encoding
local function mark_gzipped(res)
    local _, cl = header_of(res, "content-length")
    if cl then res:header(cl, nil) end
    local etag, ek = header_of(res, "etag")
    if type(etag) == "string" and sub(etag, 1, 1) == '"' then res:header(ek, "W/" .. etag) end
    res:header("Content-Encoding", "gzip")
end

-- syntax: body = compress.apply(res, gz, status, body, ctype) -- from response.send: the body that
-- goes out (a string), gzipped when it may be; gz is what the middleware noted
function _M.apply(res, gz, status, body, ctype)
    if not negotiate(res, gz, status, ctype) or not gz.accept or #body < gz.min_length then
        return body
    end
    mark_gzipped(res)
    return zlib.gzip(body, gz.level)
end

-- syntax: z = compress.stream(res, gz, status, ctype) -- from res:write, before the stream starts:
-- a zlib deflater (gzip) that each chunk goes through, with res's headers made to say so, or nil
-- when this stream goes as it is. Its ~260 KiB of zlib state are freed by the stream's last
-- write (response.send) or, for a stream that ends on an error, by the collector.
function _M.stream(res, gz, status, ctype)
    if not negotiate(res, gz, status, ctype) or not gz.accept then return nil end
    mark_gzipped(res)
    return zlib.deflater(gz.level)
end

return _M
