-- spec/static_spec.lua: app:static(prefix, dir) over real sockets, on a directory tree built here:
-- content types, lengths and bytes, validators (ETag, Last-Modified, 304), single ranges (206,
-- 416), HEAD, index files, what must never be served (traversal in every spelling, NUL, symlinks
-- out of the root) and a 3 MB file sent whole. Each `it` serves its own app and closes it.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local fmt, rep, char, concat = string.format, string.rep, string.char, table.concat

local MTIME = 1700000000 -- hello.txt's mtime: Tue, 14 Nov 2023 22:13:20 GMT
local HELLO = "hello, static\n"
local DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
local SECRET = "TOP SECRET: never served"

local defer = test.defer -- all cleanups of an `it` run (busted keeps only the last finally)

local function write_file(path, data)
    local f = assert(io.open(path, "wb"))
    assert(f:write(data))
    assert(f:close())
end

local function read_file(path)
    local f = assert(io.open(path, "rb"))
    local data = f:read("*a")
    f:close()
    return data
end

local function sh(cmd)
    local ok = os.execute(cmd)
    assert(ok == 0 or ok == true, "failed: " .. cmd)
end

local function q(path)
    return "'" .. path .. "'"
end

-- every byte value, so that NUL, CR and LF must arrive untouched
local function all_bytes(times)
    local t = {}
    for i = 0, 255 do t[#t + 1] = char(i) end
    return rep(concat(t), times)
end

-- 3 MiB of numbered 8-byte records: a lost, repeated or misplaced piece changes the bytes
local function big_content()
    local t = {}
    for i = 0, 3 * 1024 * 1024 / 8 - 1 do t[#t + 1] = fmt("%07d\n", i) end
    return concat(t)
end

local function first_difference(a, b)
    for i = 1, math.max(#a, #b) do
        if a:byte(i) ~= b:byte(i) then return i end
    end
end

describe("moonlet.static", function()
    local base, root, big

    lazy_setup(function()
        base = os.tmpname()
        os.remove(base)
        root = base .. "/public"
        local dirs = { root .. "/docs", root .. "/empty", root .. "/trap", base .. "/public-private" }
        for _, d in ipairs(dirs) do sh("mkdir -p " .. q(d)) end
        write_file(root .. "/hello.txt", HELLO)
        sh("touch -d @" .. MTIME .. " " .. q(root .. "/hello.txt"))
        write_file(root .. "/digits.txt", DIGITS)
        write_file(root .. "/style.css", "body { color: black }\n")
        write_file(root .. "/app.js", "console.log(1)\n")
        write_file(root .. "/data.json", '{"a":1}\n')
        write_file(root .. "/pixel.png", all_bytes(4))
        write_file(root .. "/LOUD.PNG", all_bytes(1))
        write_file(root .. "/blob.xyz", "?\n")
        write_file(root .. "/empty.txt", "")
        write_file(root .. "/docs/index.html", "<h1>docs</h1>\n")
        write_file(root .. "/with space & 100%.txt", "odd name\n")
        write_file(base .. "/secret.txt", SECRET)
        write_file(base .. "/public-private/sibling.txt", SECRET)
        big = big_content()
        write_file(root .. "/big.bin", big)
        sh("truncate -s 64M " .. q(root .. "/huge.bin")) -- sparse; more than the socket buffers hold
        -- symlinks: one stays inside the root; the others lead out of it, to a file, to a
        -- directory, as a directory's index, and into a sibling whose name starts with the root's
        sh("ln -s hello.txt " .. q(root .. "/alias.txt"))
        sh("ln -s " .. q(base .. "/secret.txt") .. " " .. q(root .. "/escape.txt"))
        sh("ln -s " .. q(base) .. " " .. q(root .. "/outside"))
        sh("ln -s " .. q(base .. "/secret.txt") .. " " .. q(root .. "/trap/index.html"))
        sh("ln -s " .. q(base .. "/public-private/sibling.txt") .. " " .. q(root .. "/sibling.txt"))
    end)

    lazy_teardown(function()
        if base then sh("rm -rf " .. q(base)) end
    end)

    -- serves the tree at /assets for the running `it`, closed when it ends
    local function serve(opts)
        local app = moonlet.app()
        app:static("/assets", root, opts)
        local server, port = test.serve(app)
        defer(function() server:close() end)
        return port
    end

    local function get(port, path, headers)
        return test.request(port, "GET", path, { headers = headers })
    end

    -- the target goes out byte for byte ("..", "%2e" kept); returns everything the server sent
    local function raw(port, method, target, headers)
        headers = headers or {}
        headers.Connection = "close"
        local data, err = test.raw(port, test.format_request(method, target, { headers = headers }))
        assert(data, err)
        return data
    end

    describe("inside middleware", function()
        -- a middleware that times the handler and sets a header after next(), as the README's does;
        -- on request it puts a body of its own in place of the file, or streams one
        local function serve_wrapped(replace)
            local app = moonlet.app()
            app:use(function(req, res, next)
                local r = next()
                res:header("X-After", "set after next()")
                if replace and req:header("x-replace") then return 200, "replaced" end
                if replace and req:header("x-stream") then
                    res:write("streamed")
                    return
                end
                return r
            end)
            app:static("/assets", root)
            local server, port = test.serve(app)
            defer(function() server:close() end)
            return port
        end

        it("sends the headers a middleware sets after next() with the file (200, 206, HEAD)", function()
            local port = serve_wrapped()
            local r = get(port, "/assets/hello.txt")
            assert.same({ 200, HELLO, "set after next()" }, { r.status, r.body, r.headers["x-after"] })
            r = get(port, "/assets/digits.txt", { Range = "bytes=2-4" })
            assert.same({ 206, "234", "set after next()" }, { r.status, r.body, r.headers["x-after"] })
            r = test.request(port, "HEAD", "/assets/hello.txt")
            assert.same({ 200, "", tostring(#HELLO), "set after next()" },
                { r.status, r.body, r.headers["content-length"], r.headers["x-after"] })
            r = get(port, "/assets/hello.txt", { ["If-None-Match"] = r.headers["etag"] })
            assert.same({ 304, "set after next()" }, { r.status, r.headers["x-after"] })
        end)

        it("keeps the headers a middleware set before next() over the file's, on 200 and 304 alike",
            function()
                local app, started = moonlet.app(), {}
                app:use(function(_, res, next)
                    res:header("cache-control", "no-store")
                    local r = next()
                    started[#started + 1] = res:started() -- a chosen file counts as started
                    return r
                end)
                app:static("/assets", root, { max_age = 3600 })
                local server, port = test.serve(app)
                defer(function() server:close() end)
                local r = get(port, "/assets/hello.txt")
                assert.same({ 200, "no-store" }, { r.status, r.headers["cache-control"] })
                r = get(port, "/assets/hello.txt", { ["If-None-Match"] = r.headers["etag"] })
                assert.same({ 304, "no-store" }, { r.status, r.headers["cache-control"] })
                assert.same({ true, false }, started)
            end)

        it("sends what a middleware returns or streams in place of the file, without its validators",
            function()
                local port = serve_wrapped(true)
                for _, how in ipairs({ "X-Replace", "X-Stream" }) do
                    local r = get(port, "/assets/digits.txt", { [how] = "1", Range = "bytes=2-4" })
                    assert.same({ 200, how == "X-Replace" and "replaced" or "streamed", "set after next()" },
                        { r.status, r.body, r.headers["x-after"] })
                    assert.same({}, { r.headers["etag"], r.headers["last-modified"],
                        r.headers["content-range"], r.headers["accept-ranges"] })
                end
                local r = get(port, "/assets/hello.txt")
                assert.same({ HELLO, "bytes" }, { r.body, r.headers["accept-ranges"] })
                assert.truthy(r.headers["etag"] and r.headers["last-modified"])
            end)
    end)

    describe("serving files", function()
        it("answers with the bytes and length of the file", function()
            local port = serve()
            local r = get(port, "/assets/hello.txt")
            assert.same(200, r.status)
            assert.same(HELLO, r.body)
            assert.same(tostring(#HELLO), r.headers["content-length"])
            assert.same("bytes", r.headers["accept-ranges"])
        end)

        it("sends every byte value untouched", function()
            local port = serve()
            local r = get(port, "/assets/pixel.png")
            assert.same(200, r.status)
            assert.same("1024", r.headers["content-length"])
            assert.is_true(r.body == all_bytes(4), "the body differs from the file")
        end)

        it("picks the Content-Type by extension", function()
            local port = serve()
            local want = {
                ["hello.txt"] = "text/plain; charset=utf-8",
                ["style.css"] = "text/css; charset=utf-8",
                ["app.js"] = "application/javascript; charset=utf-8",
                ["data.json"] = "application/json",
                ["pixel.png"] = "image/png",
                ["LOUD.PNG"] = "image/png",
                ["docs/index.html"] = "text/html; charset=utf-8",
                ["blob.xyz"] = "application/octet-stream",
            }
            local got = {}
            for name in pairs(want) do
                got[name] = get(port, "/assets/" .. name).headers["content-type"]
            end
            assert.same(want, got)
        end)

        it("serves an empty file", function()
            local port = serve()
            local r = get(port, "/assets/empty.txt")
            assert.same({ 200, "", "0" }, { r.status, r.body, r.headers["content-length"] })
        end)

        it("serves a dotfile like any other file, as nginx does", function()
            local port = serve()
            local path = root .. "/.well-known"
            defer(function() sh("rm -rf " .. q(path)) end)
            sh("mkdir -p " .. q(path))
            write_file(path .. "/security.txt", "Contact: x\n")
            local r = get(port, "/assets/.well-known/security.txt")
            assert.same({ 200, "Contact: x\n" }, { r.status, r.body })
        end)

        it("serves a symlink that stays inside the root", function()
            local port = serve()
            local r = get(port, "/assets/alias.txt")
            assert.same({ 200, HELLO }, { r.status, r.body })
        end)

        it("serves index.html for a directory", function()
            local port = serve()
            local r = get(port, "/assets/docs/")
            assert.same({ 200, "<h1>docs</h1>\n", "text/html; charset=utf-8" },
                        { r.status, r.body, r.headers["content-type"] })
        end)

        it("redirects a directory named without its slash to it, query kept (301, as nginx)", function()
            local port = serve()
            for path, want in pairs({
                ["/assets/docs"] = "/assets/docs/", ["/assets/docs?v=1"] = "/assets/docs/?v=1",
                ["/assets"] = "/assets/", ["/assets/empty"] = "/assets/empty/",
                ["/assets/%64ocs"] = "/assets/%64ocs/",
            }) do
                local r = get(port, path)
                assert.same({ 301, want }, { r.status, r.headers["location"] }, path)
            end
            assert.same(404, get(port, "/assets/missing").status) -- (only a directory)
            assert.same(200, get(port, "/assets/docs/").status)
        end)

        it("answers 404 for a directory without an index", function()
            local port = serve()
            assert.same(404, get(port, "/assets/empty/").status)
        end)

        it("answers 404 for a directory when the index is turned off", function()
            local port = serve({ index = false })
            assert.same(404, get(port, "/assets/docs/").status)
        end)

        it("answers 404 for a missing file", function()
            local port = serve()
            local r = get(port, "/assets/missing.txt")
            assert.same(404, r.status)
        end)

        it("answers 405 with Allow for a POST", function()
            local port = serve()
            local r = test.request(port, "POST", "/assets/hello.txt", { body = "x" })
            assert.same({ 405, "GET, HEAD" }, { r.status, r.headers["allow"] })
        end)

        it("sends Cache-Control when max_age is given", function()
            local port = serve({ max_age = 3600 })
            assert.same("public, max-age=3600", get(port, "/assets/hello.txt").headers["cache-control"])
        end)

        it("answers HEAD with the headers of GET and no body", function()
            local port = serve()
            local data = raw(port, "HEAD", "/assets/hello.txt")
            local head_end = assert(data:find("\r\n\r\n", 1, true), "no end of head: " .. data)
            assert.same("", data:sub(head_end + 4))
            assert.truthy(data:find("^HTTP/1%.1 200 "))
            assert.truthy(data:find("\r\nContent%-Length: " .. #HELLO .. "\r\n"))
            assert.truthy(data:find("\r\nContent%-Type: text/plain; charset=utf%-8\r\n"))
            assert.truthy(data:find("\r\nETag: \"", 1))
        end)

        it("keeps the connection for the next request after a file", function()
            local port = serve()
            local sock = test.connect(port)
            defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/assets/digits.txt")
                             .. test.format_request("GET", "/assets/hello.txt")))
            local a = assert(test.read_response(sock, "GET"))
            local b = assert(test.read_response(sock, "GET"))
            assert.same({ 200, DIGITS, 200, HELLO }, { a.status, a.body, b.status, b.body })
        end)

        it("sends a 3 MB file complete and byte-identical", function()
            local port = serve()
            local r = test.request(port, "GET", "/assets/big.bin", { timeout = 30 })
            assert.same(200, r.status)
            assert.same(tostring(#big), r.headers["content-length"])
            assert.same(#big, #r.body)
            assert.is_nil(first_difference(big, r.body))
            assert.is_true(r.body == read_file(root .. "/big.bin"))
        end)
    end)

    describe("mounts, names and descriptors", function()
        it("serves a mount at /", function()
            local app = moonlet.app()
            app:static("/", root)
            local server, port = test.serve(app)
            defer(function() server:close() end)
            local r = get(port, "/hello.txt")
            assert.same({ 200, HELLO }, { r.status, r.body })
            local data = raw(port, "GET", "/../secret.txt")
            assert.truthy(data:find("^HTTP/1%.1 404 "), data)
            assert.falsy(data:find("TOP SECRET", 1, true))
        end)

        it("never redirects a directory to another host: //docs goes to /docs/, not //docs/", function()
            -- "//docs/" in Location is a scheme-relative URL: the browser would go to http://docs/
            local app = moonlet.app()
            app:static("/", root)
            local server, port = test.serve(app)
            defer(function() server:close() end)
            for target, want in pairs({ ["//docs"] = "/docs/", ["///docs?v=1"] = "/docs/?v=1" }) do
                local data = raw(port, "GET", target)
                assert.truthy(data:find("^HTTP/1%.1 301 "), data)
                assert.same(want, data:match("\r\nLocation: ([^\r]*)\r\n"), target)
            end
        end)

        it("answers 404 under a root that does not exist yet, and serves it once it does", function()
            local late = base .. "/late-root"
            local app = moonlet.app()
            app:static("/late", late) -- logs a warning, does not fail: the rest of the app serves
            app:get("/", function() return "app up" end)
            local server, port = test.serve(app)
            defer(function() server:close() end)
            assert.same("app up", get(port, "/").body)
            assert.same(404, get(port, "/late/a.txt").status)
            sh("mkdir -p " .. q(late) .. " && printf late > " .. q(late .. "/a.txt"))
            local r = get(port, "/late/a.txt")
            assert.same({ 200, "late" }, { r.status, r.body })
        end)

        it("takes a relative root from the script's directory, even after a tail call", function()
            -- the script is run from the repository's root, where no ./pub exists
            local dir = base .. "/script-dir"
            sh("mkdir -p " .. q(dir .. "/pub") .. " && printf near > " .. q(dir .. "/pub/x.txt"))
            write_file(dir .. "/app.lua", 'local app = require("moonlet").app()\n' ..
                                          'app:get("/", function() return "up" end)\n' ..
                                          'return app:static("/s", "pub")\n')
            local p = test.start_process(q(dir .. "/app.lua") .. " --port 0")
            defer(function() p:kill() end)
            local port = p:port()
            local r = get(port, "/s/x.txt")
            assert.same({ 200, "near" }, { r.status, r.body })
        end)

        it("decodes percent-escapes in the file name", function()
            local port = serve()
            local r = get(port, "/assets/with%20space%20%26%20100%25.txt")
            assert.same({ 200, "odd name\n" }, { r.status, r.body })
        end)

        it("ignores the query string", function()
            local port = serve()
            local r = get(port, "/assets/hello.txt?v=2&x=../secret.txt")
            assert.same({ 200, HELLO }, { r.status, r.body })
        end)

        -- open descriptors of this process (the server runs here) on the named file
        local function fds_on(name)
            local f = assert(io.popen("ls -l /proc/$PPID/fd 2>/dev/null"))
            local n = 0
            for line in f:lines() do
                if line:find(name, 1, true) then n = n + 1 end
            end
            f:close()
            return n
        end

        it("holds the file while sending and releases it when the client leaves", function()
            local port = serve()
            local sock = test.connect(port)
            defer(function() sock:close() end)
            assert(sock:send(test.format_request("GET", "/assets/huge.bin")))
            assert.same("HTTP/1.1 200 OK", sock:receive("*l"))
            assert(test.wait_until(function() return fds_on("huge.bin") == 1 end), "the file is not open")
            sock:close()
            assert(test.wait_until(function() return fds_on("huge.bin") == 0 end), "the file stays open")
            local r = get(port, "/assets/hello.txt")
            assert.same({ 200, HELLO }, { r.status, r.body })
        end)
    end)

    describe("validators", function()
        it("sends ETag and Last-Modified", function()
            local port = serve()
            local r = get(port, "/assets/hello.txt")
            assert.truthy(r.headers["etag"]:find('^"[^"]+"$'), r.headers["etag"])
            assert.same("Tue, 14 Nov 2023 22:13:20 GMT", r.headers["last-modified"])
        end)

        it("answers 304 without a body when If-None-Match holds the ETag", function()
            local port = serve()
            local etag = get(port, "/assets/hello.txt").headers["etag"]
            local data = raw(port, "GET", "/assets/hello.txt", { ["If-None-Match"] = etag })
            local head_end = assert(data:find("\r\n\r\n", 1, true))
            assert.truthy(data:find("^HTTP/1%.1 304 "), data)
            assert.same("", data:sub(head_end + 4))
            assert.truthy(data:find("\r\nETag: " .. etag:gsub("%p", "%%%0") .. "\r\n"), data)
        end)

        it("answers 304 when If-None-Match lists the ETag among others", function()
            local port = serve()
            local etag = get(port, "/assets/hello.txt").headers["etag"]
            local r = get(port, "/assets/hello.txt", { ["If-None-Match"] = '"nope", ' .. etag })
            assert.same({ 304, "" }, { r.status, r.body })
        end)

        it("answers 200 when If-None-Match holds another ETag", function()
            local port = serve()
            local r = get(port, "/assets/hello.txt", { ["If-None-Match"] = '"something-else"' })
            assert.same({ 200, HELLO }, { r.status, r.body })
        end)

        it("answers 304 when If-Modified-Since is the Last-Modified date", function()
            local port = serve()
            local ims = "Tue, 14 Nov 2023 22:13:20 GMT"
            local r = get(port, "/assets/hello.txt", { ["If-Modified-Since"] = ims })
            assert.same({ 304, "" }, { r.status, r.body })
        end)

        it("answers 200 when the file was modified after If-Modified-Since", function()
            local port = serve()
            local ims = "Mon, 13 Nov 2023 22:13:20 GMT"
            local r = get(port, "/assets/hello.txt", { ["If-Modified-Since"] = ims })
            assert.same({ 200, HELLO }, { r.status, r.body })
        end)

        it("answers 200 with a new ETag once the file changed", function()
            local port = serve()
            local path = root .. "/changing.txt"
            defer(function() os.remove(path) end)
            write_file(path, "one")
            sh("touch -d @" .. MTIME .. " " .. q(path))
            local old = get(port, "/assets/changing.txt").headers["etag"]
            write_file(path, "two, longer")
            sh("touch -d @" .. (MTIME + 60) .. " " .. q(path))
            local r = get(port, "/assets/changing.txt", { ["If-None-Match"] = old })
            assert.same({ 200, "two, longer" }, { r.status, r.body })
            assert.are_not.equal(old, r.headers["etag"])
        end)

        it("answers 304 for If-Modified-Since in any HTTP-date form at or after Last-Modified", function()
            local port = serve()
            for _, ims in ipairs({ "Tuesday, 14-Nov-23 22:13:20 GMT", "Tue Nov 14 22:13:20 2023",
                                   "Wed, 15 Nov 2023 08:00:00 GMT" }) do
                local r = get(port, "/assets/hello.txt", { ["If-Modified-Since"] = ims })
                assert.same({ 304, "" }, { r.status, r.body }, ims)
            end
        end)

        it("ignores an If-Modified-Since that is no date or is still to come", function()
            local port = serve()
            for _, ims in ipairs({ "yesterday", "Tue, 14 Nov 2023 22:13:20",
                                   "Fri, 01 Jan 2100 00:00:00 GMT" }) do
                local r = get(port, "/assets/hello.txt", { ["If-Modified-Since"] = ims })
                assert.same({ 200, HELLO }, { r.status, r.body }, ims)
            end
        end)

        it("answers 412 when If-Match does not hold the ETag (strong comparison), else the file", function()
            local port = serve()
            local etag = get(port, "/assets/hello.txt").headers["etag"]
            for _, im in ipairs({ '"nope"', "W/" .. etag }) do
                local r = get(port, "/assets/hello.txt", { ["If-Match"] = im })
                assert.same({ 412, "412 Precondition Failed\n" }, { r.status, r.body }, im)
            end
            for _, im in ipairs({ etag, "*", '"nope", ' .. etag }) do
                local r = get(port, "/assets/hello.txt", { ["If-Match"] = im })
                assert.same({ 200, HELLO }, { r.status, r.body }, im)
            end
        end)

        it("answers 412 when the file changed after If-Unmodified-Since, ignoring a date that is none",
           function()
            local port = serve()
            local before = "Mon, 13 Nov 2023 22:13:20 GMT"
            local r = get(port, "/assets/hello.txt", { ["If-Unmodified-Since"] = before })
            assert.same(412, r.status)
            for _, ius in ipairs({ "Tue, 14 Nov 2023 22:13:20 GMT", "not a date" }) do
                r = get(port, "/assets/hello.txt", { ["If-Unmodified-Since"] = ius })
                assert.same({ 200, HELLO }, { r.status, r.body }, ius)
            end
            -- If-Match decides alone when it is there (RFC 9110 13.2.2)
            local etag = get(port, "/assets/hello.txt").headers["etag"]
            r = get(port, "/assets/hello.txt", { ["If-Match"] = etag, ["If-Unmodified-Since"] = before })
            assert.same(200, r.status)
        end)

        it("sends the version its headers describe when the file is replaced before it goes out", function()
            -- a middleware renames another file over the one chosen, after next() and before the
            -- file is sent: a deploy replacing files while requests are in flight
            local path = root .. "/swapped.txt"
            defer(function() os.remove(path) end)
            local app = moonlet.app()
            app:use(function(req, _, next)
                local r = next()
                local f = assert(io.open(path .. ".new", "wb"))
                assert(f:write(req:header("x-new")))
                assert(f:close())
                assert(os.rename(path .. ".new", path))
                return r
            end)
            app:static("/assets", root)
            local server, port = test.serve(app)
            defer(function() server:close() end)
            for _, new in ipairs({ "longer than the old one", "s" }) do
                write_file(path, "old!")
                local r = get(port, "/assets/swapped.txt", { ["X-New"] = new })
                assert.same({ 200, "old!", "4" }, { r.status, r.body, r.headers["content-length"] }, new)
            end
        end)
    end)

    describe("ranges", function()
        it("answers 206 with Content-Range and exactly bytes=0-9", function()
            local port = serve()
            local r = get(port, "/assets/digits.txt", { Range = "bytes=0-9" })
            assert.same({ 206, "0123456789", "10", "bytes 0-9/36" },
                        { r.status, r.body, r.headers["content-length"], r.headers["content-range"] })
        end)

        it("answers 206 with the last bytes for a suffix range", function()
            local port = serve()
            local r = get(port, "/assets/digits.txt", { Range = "bytes=-5" })
            assert.same({ 206, "vwxyz", "5", "bytes 31-35/36" },
                        { r.status, r.body, r.headers["content-length"], r.headers["content-range"] })
        end)

        it("answers 206 with the whole file for a suffix longer than the file", function()
            local port = serve()
            local r = get(port, "/assets/digits.txt", { Range = "bytes=-1000" })
            assert.same({ 206, DIGITS, "bytes 0-35/36" }, { r.status, r.body, r.headers["content-range"] })
        end)

        it("answers 206 up to the end for an open range", function()
            local port = serve()
            local r = get(port, "/assets/digits.txt", { Range = "bytes=30-" })
            assert.same({ 206, "uvwxyz", "bytes 30-35/36" },
                        { r.status, r.body, r.headers["content-range"] })
        end)

        it("answers 206 with the middle of the large file", function()
            local port = serve()
            local r = get(port, "/assets/big.bin", { Range = "bytes=2000000-2000099" })
            assert.same({ 206, big:sub(2000001, 2000100), "bytes 2000000-2000099/" .. #big },
                        { r.status, r.body, r.headers["content-range"] })
        end)

        it("answers 416 when the range is unsatisfiable", function()
            local port = serve()
            for _, range in ipairs({ "bytes=36-40", "bytes=100-", "bytes=-0" }) do
                local r = get(port, "/assets/digits.txt", { Range = range })
                assert.same({ 416, "bytes */36" }, { r.status, r.headers["content-range"] }, range)
            end
        end)

        it("answers 416 for a range from an offset of an empty file", function()
            local port = serve()
            local r = get(port, "/assets/empty.txt", { Range = "bytes=0-" })
            assert.same({ 416, "bytes */0" }, { r.status, r.headers["content-range"] })
        end)

        it("answers 200 with the empty file for a suffix range of it (satisfiable, RFC 9110 14.1.1)",
           function()
            local port = serve()
            local r = get(port, "/assets/empty.txt", { Range = "bytes=-5" })
            assert.same({ 200, "", "0" }, { r.status, r.body, r.headers["content-length"] })
        end)

        it("answers 200 with the whole file for several ranges", function()
            local port = serve()
            local r = get(port, "/assets/digits.txt", { Range = "bytes=0-1,3-4" })
            assert.same({ 200, DIGITS }, { r.status, r.body })
        end)

        it("sends offsets and lengths past 4 GiB exactly (a sparse 5 GiB file)", function()
            local port = serve()
            local path = root .. "/sparse.bin"
            defer(function() os.remove(path) end)
            local size = 5 * 1024 * 1024 * 1024
            sh("truncate -s " .. size .. " " .. q(path))
            sh("printf tail | dd of=" .. q(path) .. " bs=1 conv=notrunc 2>/dev/null seek=" .. (size - 4))
            local r = test.request(port, "HEAD", "/assets/sparse.bin")
            assert.same({ 200, tostring(size) }, { r.status, r.headers["content-length"] })
            r = get(port, "/assets/sparse.bin", { Range = "bytes=" .. (size - 6) .. "-" })
            assert.same({ 206, "\0\0tail", fmt("bytes %d-%d/%d", size - 6, size - 1, size) },
                        { r.status, r.body, r.headers["content-range"] })
        end)

        it("answers 200 with the whole file when If-Range holds another ETag", function()
            local port = serve()
            local r = get(port, "/assets/digits.txt", { Range = "bytes=0-9", ["If-Range"] = '"old"' })
            assert.same({ 200, DIGITS }, { r.status, r.body })
        end)

        it("answers 206 when If-Range holds the file's ETag or its Last-Modified date", function()
            local port = serve()
            local etag = get(port, "/assets/hello.txt").headers["etag"]
            for _, validator in ipairs({ etag, "Tue, 14 Nov 2023 22:13:20 GMT" }) do
                local r = get(port, "/assets/hello.txt", { Range = "bytes=0-4", ["If-Range"] = validator })
                assert.same({ 206, "hello", "bytes 0-4/14" },
                            { r.status, r.body, r.headers["content-range"] }, validator)
            end
            -- another date: the piece the client holds is of another version, so the whole file
            local r = get(port, "/assets/hello.txt", { Range = "bytes=0-4",
                                                       ["If-Range"] = "Tue, 14 Nov 2023 22:13:21 GMT" })
            assert.same({ 200, HELLO }, { r.status, r.body })
        end)
    end)

    describe("refusals", function()
        local targets = {
            "/assets/../secret.txt",
            "/assets/%2e%2e/secret.txt",
            "/assets/%2e%2e%2fsecret.txt",
            "/assets/%2E%2E%2Fsecret.txt",
            "/assets/..%2fsecret.txt",
            "/assets/..%2f..%2fetc/passwd",
            "/assets/docs/../../secret.txt",
            "/assets/..%5csecret.txt",
            "/assets/hello.txt%00",
            "/assets/hello.txt%00.png",
            "/assets/escape.txt",
            "/assets/outside/secret.txt",
            "/assets/sibling.txt",
            "/assets/trap/",
            "/assets//etc/passwd",
            "/assets/%c0%ae%c0%ae/secret.txt",
        }
        for _, target in ipairs(targets) do
            it("answers 404 and never the file for " .. target, function()
                local port = serve()
                local data = raw(port, "GET", target)
                assert.truthy(data:find("^HTTP/1%.1 404 "), data)
                assert.falsy(data:find("TOP SECRET", 1, true))
                assert.falsy(data:find("root:", 1, true))
            end)
        end

        it("decodes the path once: %252e%252e is a file name, not ..", function()
            local port = serve()
            local data = raw(port, "GET", "/assets/%252e%252e/secret.txt")
            assert.truthy(data:find("^HTTP/1%.1 404 "), data)
            assert.falsy(data:find("TOP SECRET", 1, true))
        end)
    end)
end)
