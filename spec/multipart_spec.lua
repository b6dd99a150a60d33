-- spec/multipart_spec.lua: multipart/form-data (lua/moonlet/multipart.lua): the parser over every
-- way a body can be cut into pieces, malformed bodies (400 and the server goes on), req:parts() and
-- req:form() over real sockets, and moonlet.http's `form` with files (string and streamed bodies).
local moonlet = require "moonlet"
local multipart = require "moonlet.multipart"
local response = require "moonlet.response"
local test = require "moonlet.test"

local http = moonlet.http

-- bytes that look like the parts of a delimiter, CRs and LFs, and the rest of 0..255
local function awkward(n, seed)
    local out, state = {}, seed or 7
    local tricky = { "\r", "\n", "\r\n", "-", "--", "\r\n-", "\r\n--", "\r\n--BOUND", "BOUNDARY" }
    local len = 0
    while len < n do
        state = (state * 1103515245 + 12345) % 2147483648
        local piece
        if state % 3 == 0 then
            piece = tricky[state % #tricky + 1]
        else
            piece = string.char(state % 256)
        end
        out[#out + 1] = piece
        len = len + #piece
    end
    return table.concat(out):sub(1, n)
end

local B = "BOUNDARYxyz"
local FILE = awkward(5000)
local BODY = "preamble to ignore\r\n"
    .. "--" .. B .. "\r\n"
    .. 'Content-Disposition: form-data; name="title"\r\n\r\n'
    .. "Hello\r\n"
    .. "--" .. B .. "  \r\n" -- transport padding after the boundary
    .. 'Content-Disposition: form-data; name="upload"; filename="a \\"b\\".bin"\r\n'
    .. "Content-Type: application/octet-stream\r\n\r\n"
    .. FILE .. "\r\n"
    .. "--" .. B .. "\r\n"
    .. 'content-disposition: form-data; name=empty\r\n\r\n'
    .. "\r\n"
    .. "--" .. B .. "--\r\n"
    .. "epilogue to ignore"
local EXPECTED = {
    { name = "title", data = "Hello" },
    { name = "upload", filename = 'a "b".bin', type = "application/octet-stream", data = FILE },
    { name = "empty", data = "" },
}

-- the body of s in pieces of the sizes sizes(i) gives, as req:chunks() would
local function source(s, sizes)
    local pos, i = 1, 0
    return function()
        if pos > #s then return nil end
        i = i + 1
        local n = sizes(i)
        local piece = s:sub(pos, pos + n - 1)
        pos = pos + n
        return piece
    end
end

local function collect(src, boundary)
    local got = {}
    for part in multipart.parts(src, boundary) do
        local pieces = {}
        for piece in part.read, part do pieces[#pieces + 1] = piece end
        got[#got + 1] = { name = part.name, filename = part.filename, type = part.type,
                          data = table.concat(pieces) }
    end
    return got
end

local function abort_of(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok)
    assert.is_true(response.is_abort(err), tostring(err))
    return err
end

describe("multipart: the parser", function()
    it("finds the boundary in a Content-Type, quoted or not, and nothing else", function()
        assert.same("abc", multipart.boundary("multipart/form-data; boundary=abc"))
        assert.same("a b;c", multipart.boundary('Multipart/Form-Data; charset=utf-8; BOUNDARY="a b;c"'))
        assert.same("----WebKitFormBoundaryX1", multipart.boundary(
            "multipart/form-data; boundary=----WebKitFormBoundaryX1"))
        assert.is_nil(multipart.boundary("application/x-www-form-urlencoded"))
        assert.is_nil(multipart.boundary("multipart/mixed; boundary=abc"))
        assert.is_nil(multipart.boundary(nil))
        assert.same("b", multipart.boundary("multipart/form-data; xboundary=zz; boundary=b"))
        assert.same({ false, "no boundary" }, { multipart.boundary("multipart/form-data") })
        assert.same(false, (multipart.boundary("multipart/form-data; boundary=" .. ("x"):rep(71))))
    end)

    it("reads parameters as quoted strings: a ';' inside quotes, quoted pairs", function()
        local function first_part(cd)
            local body = "--b\r\nContent-Disposition: " .. cd .. "\r\n\r\nx\r\n--b--"
            return collect(source(body, function() return #body end), "b")[1]
        end
        local p = first_part('form-data; name="a; filename=x"')
        assert.same({ "a; filename=x", nil }, { p.name, p.filename })
        p = first_part('form-data; name="f"; filename="dir\\\\"')
        assert.same({ "f", "dir\\" }, { p.name, p.filename })
        p = first_part('form-data; name=plain; filename=a.txt ; x')
        assert.same({ "plain", "a.txt" }, { p.name, p.filename })
        local spaces = (" "):rep(3000) -- trimmed in linear time (a backtracking pattern took 0.3 s)
        p = first_part("form-data; name=a" .. spaces .. "b" .. spaces .. "; filename=f")
        assert.same({ "a" .. spaces .. "b", "f" }, { p.name, p.filename })
    end)

    it("gives the same parts or the same 400 for random bodies, however they are cut", function()
        -- bodies made of what the parser looks for; each parsed whole, in 1-6 byte pieces and in
        -- random pieces (0-4 bytes: an empty piece too) must give the same parts, or the same
        -- abort(400); anything else raised is a failure (a 500 in a handler)
        local tokens = { "\r", "\n", "\r\n", "--", "--b", "\r\n--b", "\r\n--b--", "\r\n\r\n", " ", "x",
            "Content-Disposition: form-data; name=\"n\"", "; filename=\"f\"", "Content-Type: t", ":", ";",
            "\"", "\\" }
        local rnd = 12345
        local function random(n)
            rnd = (rnd * 1103515245 + 12345) % 2147483648
            return rnd % n + 1
        end
        local function outcome(body, sizes)
            local ok, got = pcall(collect, source(body, sizes), "b")
            if ok then return got end
            assert.is_true(response.is_abort(got), tostring(got))
            return { aborted = got.status, body = got.body }
        end
        for _ = 1, 400 do
            local parts = { "--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n" }
            for i = 2, random(40) do parts[i] = tokens[random(#tokens)] end
            if random(2) == 1 then parts[#parts + 1] = "\r\n--b--" end
            local body = table.concat(parts)
            local whole = outcome(body, function() return #body end)
            assert.same(whole, outcome(body, function(i) return i % 6 + 1 end), body)
            assert.same(whole, outcome(body, function() return random(5) - 1 end), body)
        end
    end)

    it("reads the same parts however the body is cut: whole, byte by byte, in odd pieces", function()
        assert.same(EXPECTED, collect(source(BODY, function() return #BODY end), B))
        assert.same(EXPECTED, collect(source(BODY, function() return 1 end), B))
        for _, k in ipairs({ 2, 3, 7, 13, 64, 1000 }) do
            assert.same(EXPECTED, collect(source(BODY, function(i) return i % k + 1 end), B))
        end
        -- a cut at every offset: two pieces
        for cut = 1, #BODY - 1 do
            assert.same(EXPECTED, collect(source(BODY, function(i) return i == 1 and cut or #BODY end), B))
        end
    end)

    it("skips what a loop does not read of a part; a part read after the loop moved on is done", function()
        local names, first = {}, nil
        for part in multipart.parts(source(BODY, function() return 100 end), B) do
            names[#names + 1] = part.name
            first = first or part
            if part.name == "upload" then assert.truthy(#part:read() > 0) end
        end
        assert.same({ "title", "upload", "empty" }, names)
        assert.is_nil(first:read())
    end)

    it("takes the first boundary at the very start, with no preamble, and RFC 5987 file names", function()
        local body = "--" .. B .. "\r\n"
            .. "Content-Disposition: form-data; name=\"f\"; filename=\"plain.txt\"; "
            .. "filename*=UTF-8''%C3%A9t%C3%A9.txt\r\n\r\nx\r\n--" .. B .. "--"
        local got = collect(source(body, function() return 5 end), B)
        assert.same({ { name = "f", filename = "\195\169t\195\169.txt", data = "x" } }, got)
    end)

    it("raises moonlet.abort(400) on a malformed body", function()
        local function parse(body) return collect(source(body, function() return 3 end), B) end
        local cases = {
            "--" .. B .. "\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno end", -- ends in a part
            "no boundary at all",
            "--" .. B .. "\r\nContent-Disposition: form-data\r\n\r\nx\r\n--" .. B .. "--", -- no name
            "--" .. B .. "\r\nContent-Type: text/plain\r\n\r\nx\r\n--" .. B .. "--", -- no disposition
            "--" .. B .. "\r\nContent-Disposition: form-data; name=a\r\nX-Big: " .. ("y"):rep(9000)
                .. "\r\n\r\nx\r\n--" .. B .. "--",
            "--" .. B .. "junk\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--" .. B .. "--",
            "--" .. B .. "\r\nno colon here\r\n\r\nx\r\n--" .. B .. "--",
            "--" .. B .. "\r\nContent-Disposition: form-data; name=a\r\n",
        }
        for _, body in ipairs(cases) do
            local err = abort_of(function() parse(body) end)
            assert.same(400, err.status)
            assert.matches("^400 Bad Request: multipart: ", err.body)
        end
    end)

    it("writes what it reads: encode, then parts, give the fields back", function()
        local body, ctype = multipart.encode({ a = "1", list = { "x", "y" }, n = 5, flag = true,
            off = false, f = { filename = "n\"q\r\n.txt", body = FILE } })
        local boundary = multipart.boundary(ctype)
        assert.truthy(boundary and boundary:match("^moonlet%-%x+$"))
        assert.same({
            { name = "a", data = "1" },
            { name = "f", filename = "n%22q%0D%0A.txt", type = "application/octet-stream", data = FILE },
            { name = "flag", data = "" },
            { name = "list", data = "x" }, { name = "list", data = "y" },
            { name = "n", data = "5" },
        }, collect(source(body, function() return 777 end), boundary))
        assert.are_not.equal(boundary, multipart.boundary(select(2, multipart.encode({ a = "1" }))))
        -- a backslash and a quote in a file name come back as they were
        body, ctype = multipart.encode({ f = { filename = 'dir\\ "x"', body = "d" } })
        local got = collect(source(body, function() return 9 end), multipart.boundary(ctype))
        assert.same('dir\\ %22x%22', got[1].filename) -- a quote percent-encoded, as browsers do
        assert.has_error(function() multipart.encode({ a = { print } }) end)
    end)
end)

describe("multipart: requests", function()
    local before

    before_each(function() before = test.settled_stats() end)
    after_each(function()
        http.close_idle()
        test.assert_baseline(before)
    end)

    local function serve()
        local app = moonlet.app()
        app:post("/form", function(req)
            local f, err = req:form()
            if not f then return 400, err end
            local out = {}
            for k, v in pairs(f) do
                out[k] = type(v) == "table" and { filename = v.filename, type = v.type, body = v.body } or v
            end
            return out
        end)
        app:post("/parts", function(req)
            local out = {}
            for part in req:parts() do
                local pieces, n = {}, 0
                for piece in part.read, part do
                    n = n + 1
                    pieces[n] = piece
                end
                out[#out + 1] = { name = part.name, filename = part.filename or false, pieces = n,
                                  body = table.concat(pieces) }
            end
            return out
        end)
        app:post("/first-only", function(req)
            local next_part = req:parts()
            return next_part().name -- the rest of the body is never read
        end)
        local server, port = test.serve(app, { max_body = 4 * 1024 * 1024 })
        test.defer(function() server:close() end)
        return "http://127.0.0.1:" .. port, port
    end

    it("moonlet.http sends a form with files as multipart; req:form() gets every byte", function()
        local base = serve()
        local big = awkward(300000, 11)
        local res = assert(http.post(base .. "/form", nil, { form = {
            title = "a b", n = 7, up = { filename = "big.bin", type = "image/png", body = big } } }))
        assert.same(200, res.status)
        local got = assert(res:json())
        assert.same("a b", got.title)
        assert.same("7", got.n)
        assert.same("big.bin", got.up.filename)
        assert.same("image/png", got.up.type)
        assert.is_true(got.up.body == big)
    end)

    it("req:parts() streams a large file in pieces, and a file body may be a function", function()
        local base = serve()
        local pieces, i = { awkward(100000, 3), awkward(100000, 5), awkward(50000, 9) }, 0
        local res = assert(http.post(base .. "/parts", nil, { form = {
            a = "first", z = { filename = "s.bin", body = function()
                i = i + 1
                moonlet.sleep(0.005)
                return pieces[i]
            end } } }))
        local got = assert(res:json())
        assert.same(2, #got)
        assert.same({ "a", false, "first" }, { got[1].name, got[1].filename, got[1].body })
        assert.same({ "z", "s.bin" }, { got[2].name, got[2].filename })
        assert.is_true(got[2].body == table.concat(pieces))
        assert.truthy(got[2].pieces > 1) -- read as it arrived, not whole
    end)

    it("a handler that stops after the first part answers, and the connection serves the next", function()
        local base = serve()
        local form = { a = "x", b = { filename = "f", body = awkward(200000, 4) } }
        assert.same("a", assert(http.post(base .. "/first-only", nil, { form = form })).body)
        assert.same("x", assert(assert(http.post(base .. "/form", nil, { form = form })):json()).a)
    end)

    it("sends a list of files under one name, whatever Content-Type the caller gave", function()
        local base = serve()
        local res = assert(http.post(base .. "/parts", nil, {
            headers = { ["content-type"] = "multipart/form-data" }, -- no boundary: ours is used
            form = { files = { { filename = "a.txt", body = "1" }, { filename = "b.txt", body = "22" } } } }))
        local got = assert(res:json())
        local seen = {}
        for i, part in ipairs(got) do seen[i] = { part.name, part.filename, part.body } end
        assert.same({ { "files", "a.txt", "1" }, { "files", "b.txt", "22" } }, seen)
    end)

    it("req:form() may be called again, and req:body() after it", function()
        local app = moonlet.app()
        app:post("/twice", function(req)
            local a = assert(req:form())
            local b = assert(req:form())
            return { same = a.f.body == b.f.body and a.n == b.n, body = #assert(req:body()) > 0 }
        end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local res = assert(http.post("http://127.0.0.1:" .. port .. "/twice", nil,
            { form = { n = "1", f = { filename = "f", body = "data" } } }))
        assert.same({ same = true, body = true }, assert(res:json()))
    end)

    it("answers 400 to a malformed form and 415 to parts() of another type; the server goes on", function()
        local base, port = serve()
        local bad = "--XX\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\ncut short"
        local headers = { ["Content-Type"] = "multipart/form-data; boundary=XX" }
        local res = assert(http.post(base .. "/parts", bad, { headers = headers }))
        assert.same(400, res.status)
        assert.same("400 Bad Request: multipart: the body ended inside a part\n", res.body)
        res = assert(http.post(base .. "/form", bad, { headers = headers }))
        assert.same(400, res.status)
        assert.same("400 Bad Request: multipart: the body ended inside a part", res.body)
        res = assert(http.post(base .. "/parts", "a=1", { headers = {
            ["Content-Type"] = "application/x-www-form-urlencoded" } }))
        assert.same(415, res.status)
        headers = { ["Content-Type"] = "multipart/form-data" } -- no boundary
        res = assert(http.post(base .. "/parts", bad, { headers = headers }))
        assert.same({ 400, "400 Bad Request: multipart: no boundary\n" }, { res.status, res.body })
        res = assert(http.post(base .. "/form", bad, { headers = headers }))
        assert.same({ 400, "multipart: no boundary" }, { res.status, res.body })
        -- a browser's form, as Chrome writes it, on a new connection
        local body = "------WebKitFormBoundaryAbC\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n"
            .. "moon\r\n------WebKitFormBoundaryAbC--\r\n"
        local resp = test.request(port, "POST", "/form", { body = body, headers = {
            ["Content-Type"] = "multipart/form-data; boundary=----WebKitFormBoundaryAbC" } })
        assert.same(200, resp.status)
        assert.same('{"q":"moon"}', resp.body)
    end)
end)
