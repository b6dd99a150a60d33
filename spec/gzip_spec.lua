-- spec/gzip_spec.lua: moonlet.gzip (lua/moonlet/compress.lua), the compressing middleware, over real
-- sockets: what is compressed (type, size, Accept-Encoding with q-values; whole bodies and streams,
-- each write of a stream reaching the client at once), what is left alone (files without a `.gz`
-- sibling, HEAD, 204/304, a Content-Encoding of the handler's), precompressed `.gz` siblings of
-- static files, Vary, and that a client inflating the body gets the bytes the handler returned.
local moonlet = require "moonlet"
local compress = require "moonlet.compress"
local test = require "moonlet.test"
local zlib = require "moonlet.zlib"

local BIG = ("moonlet compresses this line. "):rep(100)

local function serve()
    local app = moonlet.app()
    app:use(function(req, res, next) -- outside gzip: what it does after next() is compressed too
        local r = next()
        if req.query.deny then moonlet.abort(403, BIG) end
        if req.query.wrap then return "[" .. r .. "]" end
        if req.query.replace then
            res:header("X-Started", tostring(res:started()))
            return "replaced"
        end
        return r
    end)
    app:use(moonlet.gzip({ min_length = 100 }))
    app:get("/text", function() return BIG end)
    app:get("/small", function() return "tiny" end)
    app:get("/json", function() return { text = BIG, n = 1 } end)
    app:get("/png", function(_, res) res:type("image/png"); return BIG end)
    app:get("/own", function(_, res) res:header("Content-Encoding", "br"); return BIG end)
    app:get("/vary", function(_, res) res:header("vary", "Origin"); return BIG end)
    app:get("/stream", function(_, res) res:write(BIG); res:write(BIG) end)
    app:get("/streamend", function(_, res) res:write(BIG); return "the end" end)
    app:get("/streampng", function(_, res) res:type("image/png"); res:write(BIG) end)
    app:get("/stream206", function(_, res) res:status(206); res:write(BIG) end)
    app:get("/streamclen", function(_, res)
        res:header("Content-Length", #BIG * 2):header("ETag", '"s1"')
        res:write(BIG); res:write(BIG)
    end)
    local step = moonlet.event()
    app:get("/paced", function(req, res) -- the test sets step once it has read the first write
        res:write(BIG)
        assert(step:wait(5))
        if req.query.gone then -- the client went away meanwhile
            app.gone_res = res
            while res:write(BIG) do end
            error("client gone")
        end
        res:write("second")
    end)
    app:get("/missing", function() return 404, BIG end)
    app:get("/empty", function() return 204 end)
    app:get("/clen", function(_, res) res:header("Content-Length", #BIG); return BIG end)
    app:get("/varytab", function(_, res) res:header("Vary", { "Origin", "Cookie" }); return BIG end)
    app:get("/partial", function() return 206, BIG, { ["Content-Range"] = "bytes 0-2999/6000" } end)
    app:get("/etag", function(_, res) res:header("ETag", '"v1"'); return BIG end)
    app:get("/badjson", function() return { f = print } end)
    local dir = os.tmpname()
    os.remove(dir)
    assert(moonlet.fs.mkdir(dir))
    local files = { ["big.txt"] = BIG, ["site.css"] = BIG, ["site.css.gz"] = zlib.gzip(BIG, 9),
                    ["big.png"] = BIG, ["tiny.txt"] = "tiny", ["huge.txt"] = BIG:rep(400) }
    for name, data in pairs(files) do assert(moonlet.fs.write(dir .. "/" .. name, data)) end
    app:static("/assets", dir)
    local server, port = test.serve(app)
    test.defer(function()
        server:close()
        for name in pairs(files) do os.remove(dir .. "/" .. name) end
        os.remove(dir)
    end)
    return port, step, dir, app
end

local function get(port, path, ae, method)
    local headers = {}
    if ae then headers["Accept-Encoding"] = ae end
    return test.request(port, method or "GET", path, { headers = headers })
end

describe("moonlet.gzip", function()
    it("reads Accept-Encoding's q-values", function()
        assert.same(1, compress.gzip_q("gzip"))
        assert.same(1, compress.gzip_q("deflate, GZIP;q=1.0, br"))
        assert.same(0, compress.gzip_q("gzip;q=0, *;q=1"))
        assert.same(0.5, compress.gzip_q("br, *;q=0.5"))
        assert.same(0, compress.gzip_q("identity"))
        assert.same(0, compress.gzip_q(""))
        assert.same(0, compress.gzip_q("gzip;q="))
        assert.same(0, compress.gzip_q("gzip;q=1e-3"))
        assert.same(0.001, compress.gzip_q("gzip;q=0.001"))
        assert.same(1, compress.gzip_q('gzip;foo="q=0"'))
        assert.same(0, compress.gzip_q("gzip;q=0, gzip")) -- its first mention
        assert.same(0, compress.gzip_q("gzip;q=1.5"))
    end)

    it("gzips a large text or JSON body for a client that takes gzip, and says Vary", function()
        local port = serve()
        local r = get(port, "/text", "gzip, deflate")
        assert.same(200, r.status)
        assert.same("gzip", r.headers["content-encoding"])
        assert.same("Accept-Encoding", r.headers["vary"])
        assert.same("text/plain; charset=utf-8", r.headers["content-type"])
        assert.truthy(#r.body < #BIG / 4)
        assert.same(tostring(#r.body), r.headers["content-length"])
        assert.is_true(zlib.inflate(r.body) == BIG)
        r = get(port, "/json", "gzip")
        assert.same("gzip", r.headers["content-encoding"])
        assert.same("application/json", r.headers["content-type"])
        assert.same({ text = BIG, n = 1 }, moonlet.json.decode(zlib.inflate(r.body)))
        r = get(port, "/missing", "gzip") -- an error page too, as nginx
        assert.same({ 404, "gzip" }, { r.status, r.headers["content-encoding"] })
    end)

    it("leaves a body alone for a client without gzip, and what is small, binary or encoded", function()
        local port = serve()
        for _, ae in ipairs({ false, "identity", "gzip;q=0", "br" }) do
            local r = get(port, "/text", ae or nil)
            assert.is_nil(r.headers["content-encoding"])
            assert.same("Accept-Encoding", r.headers["vary"]) -- it could have been
            assert.same(BIG, r.body)
        end
        assert.same("tiny", get(port, "/small", "gzip").body)
        local r = get(port, "/png", "gzip")
        assert.same({ BIG, nil, nil }, { r.body, r.headers["content-encoding"], r.headers["vary"] })
        r = get(port, "/own", "gzip")
        assert.same({ BIG, "br" }, { r.body, r.headers["content-encoding"] })
        r = get(port, "/vary", "gzip")
        assert.same({ "gzip", "Origin, Accept-Encoding" },
                    { r.headers["content-encoding"], r.headers["vary"] })
    end)

    it("leaves binary, small and large files, HEAD and 204 alone", function()
        local port = serve()
        for _, name in ipairs({ "big.png", "tiny.txt", "huge.txt" }) do -- from the file, as it is
            local r = get(port, "/assets/" .. name, "gzip")
            assert.same({ 200, nil, nil, "bytes" }, { r.status, r.headers["content-encoding"],
                                                      r.headers["vary"], r.headers["accept-ranges"] })
            assert.is_true(r.body == (name == "huge.txt" and BIG:rep(400) or name == "tiny.txt" and "tiny"
                                      or BIG))
        end
        local full = get(port, "/text", "gzip")
        local r = get(port, "/text", "gzip", "HEAD") -- the headers GET would get
        assert.same({ 200, "gzip", full.headers["content-length"], "" },
                    { r.status, r.headers["content-encoding"], r.headers["content-length"], r.body })
        r = get(port, "/empty", "gzip")
        assert.same({ 204, nil }, { r.status, r.headers["content-encoding"] })
    end)

    it("gzips a stream chunk by chunk, its last string and gzip trailer included", function()
        local port = serve()
        local r = get(port, "/stream", "gzip")
        assert.same({ 200, "gzip", "Accept-Encoding", "chunked", nil },
                    { r.status, r.headers["content-encoding"], r.headers["vary"],
                      r.headers["transfer-encoding"], r.headers["content-length"] })
        assert.truthy(#r.body < #BIG / 4)
        assert.is_true(zlib.inflate(r.body) == BIG .. BIG) -- complete: a truncated one is an error
        r = get(port, "/streamend", "gzip")
        assert.is_true(zlib.inflate(r.body) == BIG .. "the end")
        r = get(port, "/stream") -- no gzip for this client: as it is, Vary all the same
        assert.same({ BIG .. BIG, nil, "Accept-Encoding" },
                    { r.body, r.headers["content-encoding"], r.headers["vary"] })
        r = get(port, "/stream", "gzip", "HEAD")
        assert.same({ 200, "gzip", "" }, { r.status, r.headers["content-encoding"], r.body })
        for _, path in ipairs({ "/streampng", "/stream206" }) do
            r = get(port, path, "gzip")
            assert.same({ BIG, nil }, { r.body, r.headers["content-encoding"] })
        end
        -- a Content-Length the handler announced is the identity's: the gzip stream is chunked
        r = get(port, "/streamclen", "gzip")
        assert.same({ "gzip", nil, 'W/"s1"' }, { r.headers["content-encoding"],
                                                 r.headers["content-length"], r.headers["etag"] })
        assert.is_true(zlib.inflate(r.body) == BIG .. BIG)
        assert.same(BIG .. BIG, get(port, "/streamclen").body)
    end)

    it("sends each write of a gzip stream at once (flushed), not when the stream ends", function()
        local port, step = serve()
        local sock = test.connect(port)
        test.defer(function() sock:close() end)
        local ae = { ["Accept-Encoding"] = "gzip" }
        assert(sock:send(test.format_request("GET", "/paced", { headers = ae })))
        repeat local line = assert(sock:receive("*l")) until line == ""
        local z = zlib.inflater()
        test.defer(function() z:close() end)
        local got = ""
        while #got < #BIG do -- the handler is waiting for step: only the first write can be here
            local size = tonumber(assert(sock:receive("*l")), 16)
            got = got .. assert(z:inflate(assert(sock:receive(size))))
            assert(sock:receive("*l"))
        end
        assert.is_true(got == BIG)
        step:set()
        local rest = {}
        while true do
            local size = tonumber(assert(sock:receive("*l")), 16)
            if size == 0 then break end
            local out, done = z:inflate(assert(sock:receive(size)))
            rest[#rest + 1] = assert(out)
            assert(sock:receive("*l"))
            if done then rest.done = true end
        end
        assert.same({ "second", true }, { table.concat(rest), rest.done })
    end)

    it("frees a gzip stream's zlib state when its handler fails (a client gone mid-stream)", function()
        local port, step, _, app = serve()
        local sock = test.connect(port)
        local ae = { ["Accept-Encoding"] = "gzip" }
        assert(sock:send(test.format_request("GET", "/paced?gone=1", { headers = ae })))
        repeat local line = assert(sock:receive("*l")) until line == ""
        assert(sock:receive("*l")) -- the first chunk's size: the stream has started
        sock:close()
        step:set()
        assert.is_true(test.wait_until(function() return app.gone_res ~= nil end, 5))
        assert.is_true(test.wait_until(function() return app.gone_res._deflater == nil end, 5))
    end)

    it("serves a static file's .gz sibling to a client that takes gzip (gzip_static)", function()
        local port = serve()
        local gzipped = zlib.gzip(BIG, 9)
        local r = get(port, "/assets/site.css", "gzip")
        assert.same({ 200, "gzip", "Accept-Encoding", "text/css; charset=utf-8" },
                    { r.status, r.headers["content-encoding"], r.headers["vary"], r.headers["content-type"] })
        assert.is_true(r.body == gzipped)
        local plain = get(port, "/assets/site.css")
        assert.same({ 200, BIG, nil, "Accept-Encoding" },
                    { plain.status, plain.body, plain.headers["content-encoding"], plain.headers["vary"] })
        assert.are_not.equal(plain.headers["etag"], r.headers["etag"]) -- two representations
        -- validators and ranges are the sibling's
        local again = test.request(port, "GET", "/assets/site.css", { headers = {
            ["Accept-Encoding"] = "gzip", ["If-None-Match"] = r.headers["etag"] } })
        assert.same({ 304, "Accept-Encoding" }, { again.status, again.headers["vary"] })
        local part = test.request(port, "GET", "/assets/site.css", { headers = {
            ["Accept-Encoding"] = "gzip", Range = "bytes=0-9" } })
        assert.same({ 206, "gzip", gzipped:sub(1, 10) },
                    { part.status, part.headers["content-encoding"], part.body })
        assert.same(304, test.request(port, "GET", "/assets/site.css", { headers = {
            ["If-None-Match"] = plain.headers["etag"] } }).status)
    end)

    it("compresses the response that goes out: an outer middleware's abort or body included", function()
        local port = serve()
        local r = get(port, "/text?deny=1", "gzip")
        assert.same({ 403, "gzip" }, { r.status, r.headers["content-encoding"] })
        assert.is_true(zlib.inflate(r.body) == BIG)
        r = get(port, "/text?wrap=1", "gzip")
        assert.is_true(zlib.inflate(r.body) == "[" .. BIG .. "]")
    end)

    it("drops the handler's Content-Length, adds to a Vary list, weakens an ETag, skips 206", function()
        local port = serve()
        local r = get(port, "/clen", "gzip")
        assert.same(tostring(#r.body), r.headers["content-length"]) -- one Content-Length: the gzip's
        assert.is_true(zlib.inflate(r.body) == BIG)
        local raw = test.raw(port, "GET /varytab HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
            .. "Connection: close\r\n\r\n")
        local vary = {}
        for v in raw:gmatch("\r\nVary: ([^\r]*)") do vary[#vary + 1] = v end
        assert.same({ "Origin", "Cookie", "Accept-Encoding" }, vary)
        r = get(port, "/etag", "gzip")
        assert.same({ "gzip", 'W/"v1"' }, { r.headers["content-encoding"], r.headers["etag"] })
        assert.same('"v1"', get(port, "/etag").headers["etag"]) -- the identity one keeps it
        r = get(port, "/partial", "gzip")
        assert.same({ 206, BIG, nil }, { r.status, r.body, r.headers["content-encoding"] })
    end)

    it("a table body that JSON cannot encode is a 500, with gzip or without", function()
        local port = serve()
        assert.same(500, get(port, "/badjson", "gzip").status)
        assert.same(500, get(port, "/badjson").status)
    end)

    it("moonlet.http's decompress reads what it sends", function()
        local port = serve()
        local res = assert(moonlet.http.get("http://127.0.0.1:" .. port .. "/text", { decompress = true }))
        assert.same("gzip", res.headers["content-encoding"])
        assert.is_true(res.body == BIG)
    end)

    it("gzips a static file of a compressible type on the fly, once per version of the file", function()
        local port, _, dir = serve()
        local plain = get(port, "/assets/big.txt")
        assert.same({ 200, BIG, nil, "Accept-Encoding", "bytes" },
                    { plain.status, plain.body, plain.headers["content-encoding"], plain.headers["vary"],
                      plain.headers["accept-ranges"] })
        local r = get(port, "/assets/big.txt", "gzip")
        assert.same({ 200, "gzip", "Accept-Encoding", "text/plain; charset=utf-8",
                      "W/" .. plain.headers["etag"], plain.headers["last-modified"], nil, tostring(#r.body) },
                    { r.status, r.headers["content-encoding"], r.headers["vary"], r.headers["content-type"],
                      r.headers["etag"], r.headers["last-modified"], r.headers["accept-ranges"],
                      r.headers["content-length"] })
        assert.is_true(zlib.inflate(r.body) == BIG)
        local head = get(port, "/assets/big.txt", "gzip", "HEAD")
        assert.same({ "gzip", r.headers["content-length"], "" },
                    { head.headers["content-encoding"], head.headers["content-length"], head.body })
        local again = test.request(port, "GET", "/assets/big.txt", { headers = {
            ["Accept-Encoding"] = "gzip", ["If-None-Match"] = r.headers["etag"] } })
        assert.same({ 304, r.headers["etag"] }, { again.status, again.headers["etag"] })
        local part = test.request(port, "GET", "/assets/big.txt", { headers = {
            ["Accept-Encoding"] = "gzip", Range = "bytes=0-9" } }) -- a range of the identity bytes
        assert.same({ 206, nil, BIG:sub(1, 10) },
                    { part.status, part.headers["content-encoding"], part.body })
        -- a new version of the file (another size) is compressed anew, not taken from the cache
        assert(moonlet.fs.write(dir .. "/big.txt", BIG .. "v2"))
        r = get(port, "/assets/big.txt", "gzip")
        assert.is_true(zlib.inflate(r.body) == BIG .. "v2")
        -- and so is one of the same size written within the same second (the inode change time)
        assert(moonlet.fs.write(dir .. "/big.txt", BIG .. "v3"))
        r = get(port, "/assets/big.txt", "gzip")
        assert.is_true(zlib.inflate(r.body) == BIG .. "v3")
    end)

    it("a middleware's body in place of a file gzipped on the fly carries none of its headers", function()
        local port = serve()
        local r = get(port, "/assets/big.txt?replace=1", "gzip")
        assert.same({ 200, "replaced", nil, nil, "true" },
                    { r.status, r.body, r.headers["content-encoding"], r.headers["etag"],
                      r.headers["x-started"] })
        r = get(port, "/assets/big.txt?deny=1", "gzip") -- an abort's body is gzipped as any body
        assert.same({ 403, "gzip" }, { r.status, r.headers["content-encoding"] })
        assert.is_true(zlib.inflate(r.body) == BIG)
    end)

    it("compresses a file once for requests that come together", function()
        local port = serve()
        local zl = require "moonlet.zlib"
        local real_gzip, calls = zl.gzip, 0
        zl.gzip = function(...) calls = calls + 1; return real_gzip(...) end
        test.defer(function() zl.gzip = real_gzip end)
        local one = function() return get(port, "/assets/big.txt", "gzip") end
        local results = moonlet.gather({ one, one, one, one, one })
        for i = 1, 5 do assert.is_true(zlib.inflate(results[i].body) == BIG) end
        assert.same(1, calls)
    end)

    it("keeps its cache of gzipped files within its size, first in first out", function()
        local cache = compress.cache(100)
        local st = { mtime = 1, size = 10 }
        cache:put("/a", st, ("a"):rep(40))
        cache:put("/b", st, ("b"):rep(40))
        assert.same({ 80, ("a"):rep(40) }, { cache.bytes, cache:get("/a", st) })
        assert.is_nil(cache:get("/a", { mtime = 2, size = 10 })) -- another version
        cache:put("/a", st, ("A"):rep(30)) -- replaced: its old bytes are not counted twice
        assert.same({ 70, ("A"):rep(30) }, { cache.bytes, cache:get("/a", st) })
        cache:put("/c", st, ("c"):rep(40)) -- 110 > 100: /b, put first, goes
        assert.same({ 70, nil, ("A"):rep(30), ("c"):rep(40) },
                    { cache.bytes, cache:get("/b", st), cache:get("/a", st), cache:get("/c", st) })
        cache:put("/d", st, ("d"):rep(101)) -- larger than the whole cache: not kept
        assert.same({ 70, nil }, { cache.bytes, cache:get("/d", st) })
        cache:put("/e", st, ("e"):rep(60)) -- 130: /a (put again before /c) goes, then 100 fit
        assert.same({ 100, nil, ("c"):rep(40), ("e"):rep(60) },
                    { cache.bytes, cache:get("/a", st), cache:get("/c", st), cache:get("/e", st) })
        -- a file replaced by new versions again and again: its queue of entries stays short
        local c2 = compress.cache(1e6)
        for v = 1, 1000 do c2:put("/f", { mtime = v, size = 1 }, "x") end
        assert.same({ 1, "x" }, { c2.bytes, c2:get("/f", { mtime = 1000, size = 1 }) })
        assert.truthy(c2.tail - c2.head + 1 <= 66)
    end)

    it("moonlet.zlib's deflater: a sync flush gives out all so far, finish ends the stream", function()
        local z = zlib.deflater(6)
        local inf = zlib.inflater()
        test.defer(function() z:close(); inf:close() end)
        assert.same({ "", false }, { inf:inflate(z:deflate("held back", false)) }) -- a header only
        local out = z:deflate(" and flushed", "sync")
        assert.same("\0\0\255\255", out:sub(-4)) -- the empty stored block of a sync flush
        assert.same({ "held back and flushed", false }, { inf:inflate(out) })
        assert.same("", z:deflate("", "sync")) -- nothing new: nothing to flush
        local o2, done = inf:inflate(z:deflate("!", "finish"))
        assert.same({ "!", true }, { o2, done })
        assert.has_error(function() z:deflate("more") end)
        assert.has_error(function() zlib.deflater():deflate("x", "sometimes") end)
    end)

    it("raises on bad options", function()
        assert.has_error(function() moonlet.gzip({ level = 12 }) end)
        assert.has_error(function() moonlet.gzip({ min_length = "1k" }) end)
    end)
end)
