-- spec/welcome_spec.lua: apps/welcome, the app `make run` serves: every demo answered over real
-- sockets, the page carrying the code of each demo as it is in app.lua, and slow requests served
-- side by side. Run from the repo root: ./build/moonlet test spec/welcome_spec.lua
local moonlet = require "moonlet"
local test = require "moonlet.test"
local json = require "moonlet.json"

local APP = "apps/welcome/app.lua"

local function read_file(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

-- The demos of app.lua, found here independently of the app's own cutter.
local function demos_in(src)
    local found = {}
    for name, code in src:gmatch("\n%-%- demo:([%w_-]+)\n(.-)\n%-%- end\n") do
        found[name] = code
    end
    return found
end

-- The text a browser shows for html: tags dropped, entities decoded.
local entities = { amp = "&", lt = "<", gt = ">", quot = '"', ["#39"] = "'" }
local function text_of(html)
    return (html:gsub("<[^>]*>", ""):gsub("&(#?%w+);", entities))
end

describe("apps/welcome", function()
    local app = dofile(APP)

    -- Serves the app on a free port, closed when the running `it` ends, passed or failed.
    local function serve()
        local server, port = test.serve(app)
        finally(function() server:close() end)
        return port
    end

    it("is a module that returns the app", function()
        assert.is_true(require("moonlet.app").is_app(app))
    end)

    it("answers GET /hello with Hello, World! as text", function()
        local port = serve()
        local r = test.request(port, "GET", "/hello")
        assert.same({ 200, "text/plain; charset=utf-8", "Hello, World!" },
                    { r.status, r.headers["content-type"], r.body })
    end)

    it("answers GET /users/:id with the route param and the query as JSON", function()
        local port = serve()
        local r = test.request(port, "GET", "/users/42?q=moon")
        assert.same({ 200, "application/json" }, { r.status, r.headers["content-type"] })
        assert.same({ id = "42", q = "moon" }, json.decode(r.body))
        r = test.request(port, "GET", "/users/ada%20l")
        assert.same({ 200, { id = "ada l" } }, { r.status, json.decode(r.body) })
    end)

    it("streams the countdown one chunk per line", function()
        local port = serve()
        local r = test.request(port, "GET", "/countdown")
        assert.same({ 200, "text/plain; charset=utf-8", true },
                    { r.status, r.headers["content-type"], r.chunked })
        assert.same({ "5\n", "4\n", "3\n", "2\n", "1\n", "liftoff!\n" }, r.chunks)
    end)

    it("sleeps on GET /slow?s= and reports how long it took", function()
        local port = serve()
        local r = test.request(port, "GET", "/slow?s=0.2")
        assert.same({ 200, "text/plain; charset=utf-8" }, { r.status, r.headers["content-type"] })
        local took = tonumber(r.body:match("^slept (%d+%.%d%d%d) s\n$"))
        assert.is_truthy(took, r.body)
        assert.is_true(took >= 0.19, r.body)
    end)

    it("does not sleep on a negative or non-numeric s", function()
        local port = serve()
        for _, s in ipairs({ "-3", "nan" }) do
            local r = test.request(port, "GET", "/slow?s=" .. s)
            local took = tonumber(r.body:match("^slept (%d+%.%d%d%d) s\n$"))
            assert.same(200, r.status)
            assert.is_true(took < 0.5, s .. ": " .. r.body)
        end
    end)

    it("serves five slow requests at once, not one after the other", function()
        local port = serve()
        local started = moonlet.now()
        local tasks = {}
        for i = 1, 5 do
            tasks[i] = moonlet.spawn(test.request, port, "GET", "/slow?s=0.2")
        end
        for i = 1, 5 do
            local ok, r = tasks[i]:join()
            assert.is_true(ok, r)
            assert.same(200, r.status)
            assert.truthy(r.body:match("^slept 0%.%d+ s\n$"), r.body)
        end
        local total = moonlet.now() - started
        -- one after the other would take 1 s; side by side about 0.2 s
        assert.is_true(total < 0.8, ("5 x 0.2 s took %.3f s"):format(total))
    end)

    it("echoes a POST body, small or large", function()
        local port = serve()
        local r = test.request(port, "POST", "/echo", { body = "hello, moonlet",
                                                        headers = { ["Content-Type"] = "text/plain" } })
        assert.same({ 200, "text/plain; charset=utf-8", "hello, moonlet" },
                    { r.status, r.headers["content-type"], r.body })
        local big = ("0123456789abcdef"):rep(16384) -- 256 KiB: read in many pieces
        r = test.request(port, "POST", "/echo", { body = big })
        assert.same(200, r.status)
        assert.is_true(r.body == big, "the 256 KiB body came back changed")
        r = test.request(port, "POST", "/echo")
        assert.same({ 200, "" }, { r.status, r.body })
    end)

    it("serves its stylesheet under /assets", function()
        local port = serve()
        local r = test.request(port, "GET", "/assets/style.css")
        assert.same({ 200, "text/css; charset=utf-8" }, { r.status, r.headers["content-type"] })
        assert.is_true(r.body == read_file("apps/welcome/public/style.css"), "style.css differs")
        assert.truthy(r.headers.etag)
        r = test.request(port, "GET", "/assets/../app.lua")
        assert.same(404, r.status)
    end)

    it("serves the page with every demo's code as it is in app.lua", function()
        local port = serve()
        local r = test.request(port, "GET", "/")
        assert.same({ 200, "text/html; charset=utf-8" }, { r.status, r.headers["content-type"] })
        local page = r.body
        assert.truthy(page:find('href="/assets/style.css"', 1, true))
        assert.is_nil(page:find("{{", 1, true))

        local demos = demos_in(read_file(APP))
        local names = {}
        for name in pairs(demos) do names[#names + 1] = name end
        table.sort(names)
        assert.same({ "countdown", "echo", "hello", "json", "slow", "static" }, names)

        local shown = text_of(page)
        for name, code in pairs(demos) do
            assert.truthy(shown:find(code, 1, true), "the page lacks the code of demo:" .. name)
        end
        assert.truthy(shown:find('return "Hello, World!"', 1, true))
        assert.truthy(shown:find('app:static("/assets"', 1, true))
        for _, link in ipairs({ "/hello", "/users/42?q=moon", "/countdown", "/slow?s=1",
                                "/assets/style.css" }) do
            assert.truthy(page:find('href="' .. link .. '"', 1, true), "no link to " .. link)
        end
        assert.truthy(page:find('action="/echo" method="post"', 1, true))
    end)

    it("is served as moonlet apps/welcome/app.lua, as make run does", function()
        local p = test.start_process(APP .. " --port 0")
        finally(function() p:kill() end)
        local port = p:port()
        local r = test.request(port, "GET", "/hello")
        assert.same({ 200, "Hello, World!" }, { r.status, r.body })
        assert.is_true(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    -- A reader who reloads the page mid-countdown leaves the server writing to a closed socket.
    -- In its own process, so that if the write raised SIGPIPE it would not kill this runner.
    it("keeps serving after a client leaves in the middle of the countdown", function()
        local p = test.start_process(APP .. " --port 0")
        finally(function() p:kill() end)
        local port = p:port()
        local sock = test.connect(port)
        assert(sock:send(test.format_request("GET", "/countdown")))
        repeat
            local line = assert(sock:receive("*l"))
        until line == "5"
        sock:close()
        -- the countdown writes twice more within 0.6 s; give it a second to (not) die of them
        assert.is_nil(p:wait(1), "the server exited: " .. p:output())
        local r = test.request(port, "GET", "/hello")
        assert.same({ 200, "Hello, World!" }, { r.status, r.body })
        assert.is_true(p:signal("TERM"))
        assert.same(0, p:wait())
    end)
end)
