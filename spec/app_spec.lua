-- spec/app_spec.lua: the app layer: middleware order and what next() returns, middleware around
-- 404s, abort, custom error pages, res helpers, JSON and form bodies, app:listen errors.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local json = require "moonlet.json"

describe("moonlet.app", function()
    local server, port, seen
    before_each(function()
        seen = {}
        local app = moonlet.app()
        app:use(function(req, res, next)
            seen[#seen + 1] = "outer in"
            local body = next()
            seen[#seen + 1] = "outer out"
            res:header("X-Outer", "1")
            return body
        end)
        app:use(function(req, res, next)
            seen[#seen + 1] = "inner in"
            moonlet.sleep(0) -- middleware may wait too
            return next()
        end)
        app:get("/", function() seen[#seen + 1] = "handler"; return 201, "made", { ["X-H"] = "h" } end)
        app:get("/json", function(_, res) res:type("json"); return '{"raw":true}' end)
        app:post("/json", function(req) local v = assert(req:json()); return { got = v.n + 1 } end)
        app:post("/form", function(req) return assert(req:form()) end)
        app:post("/json-or-400", function(req)
            local v = req:json()
            if v == nil then return 400, "bad json" end
            return { v = v }
        end)
        app:post("/form-values", function(req)
            local fields, err = req:form()
            if not fields then return 400, err end
            local files = {}
            for i, f in ipairs(assert(req:form_values("f"))) do files[i] = f.filename .. ":" .. f.body end
            return { first = fields.tag, tags = req:form_values("tag"), none = req:form_values("none"),
                     files = files }
        end)
        app:get("/redirect", function(_, res) res:redirect("/there") end)
        app:get("/teapot", function() moonlet.abort(418, "short and stout", { ["X-Pot"] = "yes" }) end)
        app:get("/multi", function(_, res) res:header("Set-Cookie", { "a=1", "b=2" }); return "" end)
        app:get("/bad-header", function(_, res) res:header("X-Bad", "a\r\nInjected: yes"); return "" end)
        app:on_error(function(_, _, err) return 503, "custom: " .. (err:match("kaput") or "?") end)
        app:get("/kaput", function() error("kaput") end)
        app:get("/chain", function(_, res) return 302, res:header("Location", "/x") end)
        app:get("/abort-bad", function() moonlet.abort(422, { f = print }) end)
        app:get("/stream-table", function(_, res) res:write("a"); return { x = 1 } end)
        app:get("/status/:code", function(req) return tonumber(req.params.code), "" end)
        server, port = test.serve(app)
    end)
    after_each(function() server:close() end)

    it("runs middleware in order around the handler, status and headers kept", function()
        local r = test.request(port, "GET", "/")
        assert.same(201, r.status)
        assert.same("made", r.body)
        assert.same("h", r.headers["x-h"])
        assert.same("1", r.headers["x-outer"])
        assert.same({ "outer in", "inner in", "handler", "outer out" }, seen)
    end)

    it("gives every registered status its reason phrase", function()
        for code, reason in pairs({ [203] = "Non-Authoritative Information", [205] = "Reset Content",
                                    [300] = "Multiple Choices", [402] = "Payment Required",
                                    [407] = "Proxy Authentication Required", [418] = "I'm a teapot",
                                    [451] = "Unavailable For Legal Reasons",
                                    [511] = "Network Authentication Required", [299] = "Unknown" }) do
            local data = assert(test.raw(port, "GET /status/" .. code .. " HTTP/1.0\r\n\r\n"))
            assert.same("HTTP/1.1 " .. code .. " " .. reason, data:match("^[^\r]*"))
        end
    end)

    it("runs middleware around a 404", function()
        local r = test.request(port, "GET", "/missing")
        assert.same(404, r.status)
        assert.same("1", r.headers["x-outer"])
    end)

    it("sends a string as JSON when res:type says so", function()
        local r = test.request(port, "GET", "/json")
        assert.same("application/json", r.headers["content-type"])
        assert.same('{"raw":true}', r.body)
    end)

    it("decodes JSON and form bodies", function()
        local r = test.request(port, "POST", "/json", { body = '{"n":41}' })
        assert.same({ got = 42 }, json.decode(r.body))
        r = test.request(port, "POST", "/form", { body = "a=1&b=x+y" })
        assert.same({ a = "1", b = "x y" }, json.decode(r.body))
    end)

    it("refuses JSON that is no JSON (NaN, Infinity, hex, leading zeros): req:json() is nil, err", function()
        for _, bad in ipairs({ "NaN", '{"n":-Infinity}', "[0x10]", "01", "{bad" }) do
            local r = test.request(port, "POST", "/json-or-400", { body = bad })
            assert.same({ 400, "bad json" }, { r.status, r.body }, bad)
        end
        local r = test.request(port, "POST", "/json-or-400", { body = '[1.5,-0,1e2,"x",null]' })
        assert.same({ 200, '{"v":[1.5,-0,100,"x",null]}' }, { r.status, r.body })
    end)

    it("gives every value of a repeated form field with req:form_values, both kinds of form", function()
        local r = test.request(port, "POST", "/form-values", { body = "tag=a&x=1&tag=b+c&tag=" })
        assert.same({ first = "a", tags = { "a", "b c", "" }, none = {}, files = {} }, json.decode(r.body))
        local body = table.concat({
            "--B", 'Content-Disposition: form-data; name="tag"', "", "a",
            "--B", 'Content-Disposition: form-data; name="f"; filename="1.txt"', "", "one",
            "--B", 'Content-Disposition: form-data; name="tag"', "", "b",
            "--B", 'Content-Disposition: form-data; name="f"; filename="2.txt"', "", "two",
            "--B--", "" }, "\r\n")
        r = test.request(port, "POST", "/form-values",
                         { body = body, headers = { ["Content-Type"] = "multipart/form-data; boundary=B" } })
        assert.same({ first = "a", tags = { "a", "b" }, none = {}, files = { "1.txt:one", "2.txt:two" } },
                    json.decode(r.body))
    end)

    it("refuses a form of more than 1000 fields: nil, err, never a table of them all", function()
        local pairs_ = {}
        for i = 1, 1000 do pairs_[i] = "k" .. i .. "=v" end
        local r = test.request(port, "POST", "/form-values", { body = table.concat(pairs_, "&") })
        assert.same(200, r.status)
        pairs_[1001] = "k1001"
        r = test.request(port, "POST", "/form-values", { body = table.concat(pairs_, "&") })
        assert.same({ 400, "more than 1000 fields" }, { r.status, r.body })
    end)

    it("redirects", function()
        local r = test.request(port, "GET", "/redirect")
        assert.same(302, r.status)
        assert.same("/there", r.headers["location"])
    end)

    it("ends a request with moonlet.abort, headers included", function()
        local r = test.request(port, "GET", "/teapot")
        assert.same(418, r.status)
        assert.same("short and stout", r.body)
        assert.same("yes", r.headers["x-pot"])
    end)

    it("sends a header once per element of a table value", function()
        local sock = test.connect(port)
        assert(sock:send(test.format_request("GET", "/multi")))
        local r = assert(test.read_response(sock))
        sock:close()
        assert.same("a=1, b=2", r.headers["set-cookie"])
    end)

    it("refuses a response header with CR or LF (500, nothing injected)", function()
        local r = test.request(port, "GET", "/bad-header")
        assert.same(503, r.status) -- the app's error page
        assert.is_nil(r.headers["injected"])
    end)

    it("takes a handler's `return 302, res:header(...)` (res itself) as no body", function()
        local r = test.request(port, "GET", "/chain")
        assert.same({ 302, "/x", "" }, { r.status, r.headers["location"], r.body })
    end)

    it("answers an abort whose body JSON cannot encode with the app's error page", function()
        assert.same({ 503, "custom: ?" }, { test.request(port, "GET", "/abort-bad").status,
                                            test.request(port, "GET", "/abort-bad").body })
    end)

    it("closes a stream whose handler returns a table, sending no address of it", function()
        local raw = test.raw(port, "GET /stream-table HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.truthy(raw:find("\r\n\r\n1\r\na\r\n", 1, true), raw)
        assert.falsy(raw:find("table:", 1, true))
        assert.falsy(raw:find("\r\n0\r\n\r\n", 1, true)) -- cut, not ended as if whole
    end)

    it("sends a file when a middleware returns res after next()", function()
        local app = moonlet.app()
        app:use(function(_, res, next)
            next()
            return res:header("X-A", "1")
        end)
        app:static("/assets", "examples/public")
        local s2, p2 = test.serve(app)
        test.defer(function() s2:close() end)
        local r = test.request(p2, "GET", "/assets/hello.txt")
        assert.same({ 200, "1" }, { r.status, r.headers["x-a"] })
        assert.truthy(#r.body > 0 and r.body == assert(io.open("examples/public/hello.txt")):read("*a"))
    end)

    it("uses the app's error page for handler errors", function()
        local r = test.request(port, "GET", "/kaput")
        assert.same(503, r.status)
        assert.same("custom: kaput", r.body)
    end)

    it("reports a port already in use from app:listen", function()
        local other = moonlet.app()
        local s, err = other:listen({ host = "127.0.0.1", port = port })
        assert.is_nil(s)
        assert.truthy(err:find("address in use", 1, true))
    end)

    it("says which app:listen option it does not know, and serves all the same", function()
        local code, out = test.run_script([[
local moonlet = require "moonlet"
local app = moonlet.app():get("/", function() return "ok" end)
local server, port = assert(app:listen({ host = "127.0.0.1", port = 0, max_bdy = 10, max_body = 10 }))
local r = assert(moonlet.http.get("http://127.0.0.1:" .. port .. "/"))
print(r.body)
server:close()
]])
        assert.same(0, code, out)
        assert.truthy(out:find("app:listen: unknown option max_bdy (ignored)", 1, true), out)
        assert.falsy(out:find("unknown option max_body", 1, true), out)
        assert.truthy(out:find("\nok\n") or out:find("^ok\n"), out)
    end)
end)

describe("moonlet.app: header values and next() off the usual path", function()
    local server, port, runs, holds
    local kept = {} -- next() functions a middleware kept, by path
    local numbers = { -- header values that are numbers: C writes most of them itself (core/numfmt.c)
        ["X-N"] = 0.5, ["X-I"] = 42, ["X-Third"] = -1 / 3, ["X-Tie"] = 2 ^ -21, ["X-Time"] = 3.5e-6,
        ["X-Carry"] = 99999999999999.5, ["X-Zero"] = 0, ["X-Negzero"] = -0.0, ["X-Big"] = 1e300,
        ["X-Huge"] = 2 ^ 63, ["X-Tiny"] = 1e-20, ["X-Inf"] = math.huge,
    }
    local values = {
        good_tabs = "a\tb\tc\td\te\tf\tg\th\ti", -- HTAB is the one control a value may hold
        good_utf8 = "caf\195\169 \226\152\149 long enough to take the eight-byte path",
        good_long = string.rep("x", 300),
        bad_cr_7 = "0123456\r89abcdef",      -- in the first eight bytes
        bad_lf_12 = "0123456789ab\ncdefgh",  -- in the second word
        bad_del_15 = "0123456789abcde\127xyz",
        bad_nul_8 = "abcdefgh\0ijk",
        bad_cr_tail = "0123456789abcdefgh\r", -- in the bytes after the last whole word
    }
    before_each(function()
        runs, holds = 0, 0
        local app = moonlet.app()
        app:use(function(req, res, next)
            if req.path == "/keep" or req.path == "/hold" then kept[req.path] = next end
            if req.path == "/timeout" then return moonlet.timeout(1, next) end -- next in a child task
            if req.path == "/twice" then
                local a = next()
                return a .. "+" .. next()
            end
            return next()
        end)
        app:get("/value/:name", function(req, res)
            res:header("X-V", values[req.params.name])
            return "ok"
        end)
        app:get("/name", function(_, res) res:header("Bad Name", "v"); return "ok" end)
        app:get("/big-then-bad", function(_, res) -- the head outgrows its 2 KiB stack buffer first
            res:header("X-Big", { string.rep("b", 3000), "bad\r\nvalue" })
            return "ok"
        end)
        app:get("/number", function(_, res)
            for name, v in pairs(numbers) do res:header(name, v) end
            return "ok"
        end)
        app:get("/timeout", function() moonlet.sleep(0.01); return "in time" end)
        app:get("/twice", function() runs = runs + 1; return "run" .. runs end)
        app:get("/keep", function() return "kept" end)
        app:get("/hold", function() holds = holds + 1; moonlet.sleep(0.2); return "held" end)
        app:get("/call-held", function()
            local ok, err = pcall(kept["/hold"])
            return ok and "ran /hold's chain" or err
        end)
        server, port = test.serve(app)
    end)
    after_each(function() server:close() end)

    it("sends a value with tabs, UTF-8 or 300 bytes as it is", function()
        for _, name in ipairs({ "good_tabs", "good_utf8", "good_long" }) do
            local r = test.request(port, "GET", "/value/" .. name)
            assert.same(200, r.status)
            assert.same(values[name], r.headers["x-v"])
        end
    end)

    it("refuses a control byte wherever it is in the value (500, nothing sent of it)", function()
        for name, v in pairs(values) do
            if name:sub(1, 4) == "bad_" then
                local r = test.request(port, "GET", "/value/" .. name)
                assert.same(500, r.status, name)
                assert.is_nil(r.headers["x-v"], name)
                assert.truthy(#v > 0)
            end
        end
    end)

    it("refuses a header name that is not a token, formats numbers as tostring does", function()
        assert.same(500, test.request(port, "GET", "/name").status)
        assert.same(500, test.request(port, "GET", "/big-then-bad").status) -- and frees (ASan)
        local r = test.request(port, "GET", "/number")
        assert.same("0.5", r.headers["x-n"])
        assert.same("42", r.headers["x-i"])
        for name, v in pairs(numbers) do assert.same(tostring(v), r.headers[name:lower()], name) end
    end)

    it("raises from a next() kept past its request, or called from another request's task", function()
        local r = test.request(port, "GET", "/keep")
        assert.same("kept", r.body)
        local ok, err = pcall(kept["/keep"])                   -- its request has ended
        assert.is_false(ok)
        assert.truthy(err:find("next() called after its request ended", 1, true), err)
        local held = moonlet.spawn(test.request, port, "GET", "/hold") -- /hold waits in its handler
        assert.truthy(test.wait_until(function() return kept["/hold"] end))
        r = test.request(port, "GET", "/call-held")             -- /hold's next, from another task
        assert.same(200, r.status)
        assert.truthy(r.body:find("next() called from outside its request", 1, true), r.body)
        local joined, res = held:join()
        assert.is_true(joined)
        assert.same("held", res.body)
        assert.same(1, holds)                                    -- /hold's handler ran once only
    end)

    it("lets a middleware run next() in a child task, or twice", function()
        local r = test.request(port, "GET", "/timeout")
        assert.same(200, r.status)
        assert.same("in time", r.body)
        r = test.request(port, "GET", "/twice")
        assert.same("run1+run2", r.body)
    end)
end)
