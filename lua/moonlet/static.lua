-- lua/moonlet/static.lua: static files. The path is decoded once and checked segment by segment
-- ("..", ".", NUL and backslashes refused, encoded or not), then resolved with realpath and kept
-- only if it is still under the root, so symlinks cannot lead out of it. The file is opened when it
-- is chosen and its headers made from that open file's fstat, so a file replaced before it is sent
-- still sends the bytes its headers describe. Responses carry Content-Type, ETag and Last-Modified;
-- the preconditions are evaluated in RFC 9110 13.2.2's order (If-Match, If-Unmodified-Since: 412;
-- If-None-Match, If-Modified-Since: 304; If-Range); a single Range is honoured (206, or 416),
-- several are ignored (200, the whole file: no multipart/byteranges, so no amplification). The
-- handler only chooses the file (res._file): lua/moonlet/response.lua
-- sends it after the middleware has returned, from the file to the socket in C. Under
-- moonlet.gzip, a file with a `.gz` sibling (style.css and style.css.gz, made ahead with `gzip -k`)
-- says Vary: Accept-Encoding, and a client that takes gzip gets the sibling's bytes, validators and
-- ranges, with the original's Content-Type and Content-Encoding: gzip (nginx's gzip_static).
-- Without a sibling, a file of a compressible type and min_length..static_max bytes goes to such a
-- client gzipped on the fly (nginx's `gzip on`), from a cache of gzipped files kept by the
-- middleware (lua/moonlet/compress.lua), with a weak ETag and no ranges (a Range request gets the
-- identity bytes).
local core = require "moonlet.core"
local mime = require "moonlet.mime"
local add_missing_headers = require("moonlet.response").add_missing_headers
local compress -- lua/moonlet/compress.lua, loaded when moonlet.gzip is first used

local str_find, str_sub, str_match, str_gmatch, str_gsub, fmt =
    string.find, string.sub, string.match, string.gmatch, string.gsub, string.format
local os_date, os_time, floor, tonumber = os.date, os.time, math.floor, tonumber

local _M = {}

local function http_date(t)
    return os_date("!%a, %d %b %Y %H:%M:%S GMT", t)
end

local parse_http_date = require("moonlet.httpdate").parse

-- Whether a list of entity tags (If-Match, If-None-Match) names the file's: "*" names any; tag is
-- the file's ETag without W/. The weak comparison (If-None-Match) takes W/"x" for "x"; the strong
-- one (If-Match) never matches a weak tag, neither the client's nor ours (RFC 9110 8.8.3.2).
local function etag_listed(list, tag, weak_comparison, ours_weak)
    if str_match(list, "^%s*%*%s*$") then return true end
    if ours_weak and not weak_comparison then return false end
    for weak, t in str_gmatch(list, '(W?/?)("[^"]*")') do
        if t == tag and (weak_comparison or weak == "") then return true end
    end
    return false
end
_M.parse_http_date = parse_http_date

-- syntax: rel = static.safe_relative(rel) -- rel when it names something below a root (no "..",
-- ".", NUL or backslash segment; lua/moonlet/template.lua too), else nil
local function safe_relative(rel)
    if str_find(rel, "\0", 1, true) or str_find(rel, "\\", 1, true) then return nil end
    for seg in rel:gmatch("[^/]+") do
        if seg == ".." or seg == "." then return nil end
    end
    return rel
end

-- Returns offset, length for a single "bytes=" range, false when unsatisfiable, nil to ignore.
local function parse_range(h, size)
    local a, b = h:match("^%s*bytes%s*=%s*(%d*)%s*%-%s*(%d*)%s*$")
    if not a or (a == "" and b == "") then return nil end
    local first, last
    if a == "" then -- suffix: the last b bytes
        local n = tonumber(b)
        if n == 0 then return false end
        -- satisfiable even for an empty file (RFC 9110 14.1.1), which has no bytes to frame as
        -- a 206: the whole (empty) file, 200, as nginx answers
        if size == 0 then return nil end
        first, last = size - n, size - 1
        if first < 0 then first = 0 end
    else
        first = tonumber(a)
        last = b ~= "" and tonumber(b) or size - 1
        if last >= size then last = size - 1 end
    end
    if first > last or first >= size then return false end
    return first, last - first + 1
end

-- The directory a static root names: dir itself when it exists (a relative one from the current
-- directory), else, for a relative dir, the same path from base (the directory of the script that
-- called app:static: `moonlet path/to/app.lua` finds path/to/public from anywhere); nil, err.
local function find_root(dir, base)
    local root, err = core.realpath(dir)
    if root or not base or str_sub(dir, 1, 1) == "/" then return root, err end
    return core.realpath(base .. "/" .. dir) or nil, err
end

-- syntax: real = static.inside(root, path) -- path resolved (symlinks too) when it exists and
-- stays under root (a realpath), else nil
local function inside(root, path)
    local real = core.realpath(path)
    if not real or (real ~= root and str_sub(real, 1, #root + 1) ~= root .. "/") then return nil end
    return real
end
_M.safe_relative, _M.find_root, _M.inside = safe_relative, find_root, inside

-- syntax: v = static.version(st); same = static.same_version(v, st) -- what a cache of a file's
-- contents keeps (lua/moonlet/compress.lua, lua/moonlet/template.lua) and checks against a new
-- core.stat: size, inode, mtime and the inode change time in ns (a write within the same second,
-- or one that sets mtime back, changes it)
function _M.version(st)
    return { size = st.size, ino = st.ino, mtime = st.mtime, ctime = st.ctime, ctime_nsec = st.ctime_nsec }
end

function _M.same_version(v, st)
    return v.size == st.size and v.mtime == st.mtime and v.ino == st.ino and v.ctime == st.ctime
        and v.ctime_nsec == st.ctime_nsec
end

-- syntax: handler = static.handler(dir, { index = "index.html", max_age = seconds }, base)
-- A root that does not exist yet is logged (a warning) and looked for again on each request,
-- which answers 404 meanwhile, as nginx does with a missing root: the rest of the app serves.
function _M.handler(dir, opts, base)
    opts = opts or {}
    if type(dir) ~= "string" then error("moonlet: static root must be a path", 3) end
    local root, err = find_root(dir, base)
    if not root then
        core.log(1, "static root " .. dir .. ": " .. tostring(err) .. " (answering 404 until it exists)")
    end
    local index = opts.index == nil and "index.html" or opts.index
    local cache_control = opts.max_age and ("public, max-age=" .. floor(opts.max_age)) or nil

    local function resolve(path) return inside(root, path) end

    return function(req, res)
        if not root then
            root = find_root(dir, base)
            if not root then return 404, "404 Not Found\n" end
        end
        local rel = safe_relative(req.params.path or "")
        if not rel then return 404, "404 Not Found\n" end
        local real = resolve(root .. "/" .. rel)
        if not real then return 404, "404 Not Found\n" end
        -- opened now and judged by what fstat says of the open file (no stat before): what is
        -- sent is the version its headers describe, even if the path is renamed over before the
        -- middleware returns
        local fh, st = core.open_file(real)
        if st and st.type == "directory" then
            fh:close()
            -- "/docs/guide" names a directory: 301 to "/docs/guide/" (the query kept), as nginx
            -- does, so that the relative links of its index resolve inside it
            local path, query = str_match(req.target, "^([^?]*)(.*)$")
            if str_sub(path, -1) ~= "/" then
                -- one leading slash: "//docs/" would be a scheme-relative URL, another host's
                -- (http://docs/), where nginx, merging slashes, sends this server's /docs/
                path = str_gsub(path, "^//+", "/")
                res:header("Location", path .. "/" .. query)
                return 301, "301 Moved Permanently\n"
            end
            if not index then return 404, "404 Not Found\n" end
            real = resolve(real .. "/" .. index) -- the index may be a symlink too
            if not real then return 404, "404 Not Found\n" end
            fh, st = core.open_file(real)
        end
        if not fh then return 404, "404 Not Found\n" end
        if st.type ~= "file" then
            fh:close()
            return 404, "404 Not Found\n"
        end
        local ctype = mime.for_path(real)
        local encoding -- "gzip" when the precompressed sibling goes instead (under moonlet.gzip)
        local on_the_fly -- the file goes gzipped, as a body (under moonlet.gzip, no sibling)
        local gz = res._gzip
        if gz then
            compress = compress or require "moonlet.compress"
            local real_gz = resolve(real .. ".gz")
            local st_gz = real_gz and core.stat(real_gz)
            if st_gz and st_gz.type == "file" then
                res:vary("Accept-Encoding")
                if gz.accept then -- the sibling goes instead (opened as the file was)
                    local gfh, gst = core.open_file(real_gz)
                    if gfh and gst.type == "file" then
                        fh:close()
                        fh, st, real, encoding = gfh, gst, real_gz, "gzip"
                    elseif gfh then
                        gfh:close()
                    end
                end
            elseif compress.file_compressible(gz, st, ctype) then
                res:vary("Accept-Encoding")
                on_the_fly = gz.accept and not req:header("range")
            end
        end

        local tag = fmt('"%x-%x"', st.mtime, st.size)
        local etag = tag
        local last_modified = http_date(st.mtime)
        -- the file's headers: on res for a 304 or 416, else sent with the file only (send_file)
        local headers = { ETag = etag, ["Last-Modified"] = last_modified, ["Accept-Ranges"] = "bytes",
                          ["Cache-Control"] = cache_control, ["Content-Encoding"] = encoding }
        if on_the_fly then -- a body, not a file: no ranges; a weak ETag (another representation)
            headers.ETag, headers["Accept-Ranges"], headers["Content-Encoding"] = "W/" .. etag, nil, "gzip"
        end
        -- the preconditions in RFC 9110 13.2.2's order; a date that is no HTTP-date is ignored
        local im = req:header("if-match")
        local failed
        if im then
            failed = not etag_listed(im, tag, false, on_the_fly)
        else
            local since = parse_http_date(req:header("if-unmodified-since") or "")
            failed = since and st.mtime > since
        end
        if failed then
            fh:close()
            return 412, "412 Precondition Failed\n"
        end
        local inm = req:header("if-none-match")
        local not_modified
        if inm then
            not_modified = etag_listed(inm, tag, true)
        else
            -- not modified since: the file's date at or before the client's; a date still to come
            -- is no validator the server gave (a client's clock), so it is ignored (RFC 2616 14.25)
            local since = parse_http_date(req:header("if-modified-since") or "")
            not_modified = since and st.mtime <= since and since <= os_time()
        end
        if not_modified then
            fh:close()
            add_missing_headers(res, headers)
            return 304
        end

        if on_the_fly then
            local body = compress.file(gz, real, st)
            if body then -- sent as a file is, once the middleware has returned
                fh:close()
                res._file = { status = 200, ctype = ctype, body = body, headers = headers }
                return
            end -- unreadable whole (changed meanwhile): the file as it is
            headers.ETag, headers["Accept-Ranges"], headers["Content-Encoding"] = etag, "bytes", nil
        end

        local size = st.size
        local status, offset, length = 200, 0, size
        local range = req:header("range")
        -- If-Range holds the ETag or the Last-Modified date the client's piece came from; either,
        -- matched exactly, lets the range through, as nginx does (RFC 9110 13.1.5)
        local if_range = range and req:header("if-range")
        if range and (not if_range or if_range == etag or if_range == last_modified) then
            local o, l = parse_range(range, size)
            if o == false then
                fh:close()
                add_missing_headers(res, headers)
                res:header("Content-Range", "bytes */" .. size)
                return 416, ""
            elseif o then
                status, offset, length = 206, o, l
                headers["Content-Range"] = fmt("bytes %d-%d/%d", o, o + l - 1, size)
            end
        end
        -- sent by response.send once the middleware around this handler has returned
        res._file = { status = status, ctype = ctype, file = fh, offset = offset,
                      length = length, headers = headers }
    end
end

return _M
