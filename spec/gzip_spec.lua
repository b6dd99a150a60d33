-- spec/gzip_spec.lua: moonlet.gzip (lua/moonlet/compress.lua), the compressing middleware, over real
-- sockets: what is compressed (type, size, Accept-Encoding with q-values), what is left alone
-- (streams, files, HEAD, 204/304, a Content-Encoding of the handler's), Vary, and that a client
-- inflating the body gets the bytes the handler returned.
local moonlet = require "moonlet"
local compress = require "moonlet.compress"
local test = require "moonlet.test"
local zlib = require "moonlet.zlib"

local BIG = ("moonlet compresses this line. "):rep(100)

local function serve()
    local app = moonlet.app()
    app:use(function(req, _, next) -- outside gzip: what it does after next() is compressed too
        local r = next()
        if req.query.deny then moonlet.abort(403, BIG) end
        if req.query.wrap then return "[" .. r .. "]" end
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
    assert(moonlet.fs.write(dir .. "/big.txt", BIG))
    app:static("/assets", dir)
    local server, port = test.serve(app)
    test.defer(function()
        server:close()
        os.remove(dir .. "/big.txt")
        os.remove(dir)
    end)
    return port
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

    it("leaves streams, files, HEAD and 204 alone", function()
        local port = serve()
        local r = get(port, "/stream", "gzip")
        assert.same({ BIG .. BIG, nil }, { r.body, r.headers["content-encoding"] })
        r = get(port, "/assets/big.txt", "gzip") -- sent from the file, as it is
        assert.same({ 200, BIG, nil }, { r.status, r.body, r.headers["content-encoding"] })
        local full = get(port, "/text", "gzip")
        r = get(port, "/text", "gzip", "HEAD") -- the headers GET would get
        assert.same({ 200, "gzip", full.headers["content-length"], "" },
                    { r.status, r.headers["content-encoding"], r.headers["content-length"], r.body })
        r = get(port, "/empty", "gzip")
        assert.same({ 204, nil }, { r.status, r.headers["content-encoding"] })
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

    it("raises on bad options", function()
        assert.has_error(function() moonlet.gzip({ level = 12 }) end)
        assert.has_error(function() moonlet.gzip({ min_length = "1k" }) end)
    end)
end)
