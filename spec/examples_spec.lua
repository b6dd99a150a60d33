-- spec/examples_spec.lua: the examples of examples/ run as a user runs them (`moonlet
-- examples/X.lua`, a separate process through test.start_process) against local servers only, and
-- what they print or serve is checked. Each `it` kills and waits for what it started.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"

-- runs `moonlet args` to its end and returns its output and exit code
local function run(args, timeout)
    local p = test.start_process(args)
    test.defer(function() p:kill() end)
    local code = p:wait(timeout or 20)
    assert(code, "still running: " .. p:output())
    return p:output(), code
end

-- an upstream app in this process: /delay/<s> answers after s seconds
local function upstream()
    local app = moonlet.app()
    app:get("/delay/:s", function(req)
        moonlet.sleep(tonumber(req.params.s))
        return "slept " .. req.params.s
    end)
    app:get("/", function() return ("x"):rep(1000) end)
    local server, port = test.serve(app)
    test.defer(function() server:close() end)
    return "http://127.0.0.1:" .. port
end

describe("examples", function()
    it("fetch.lua prints the status and the size", function()
        local base = upstream()
        local out, code = run("examples/fetch.lua " .. base .. "/")
        assert.equal(0, code)
        assert.truthy(out:find("200 1000 bytes", 1, true), out)
    end)

    it("fetch.lua reports an error for a refused connection", function()
        local out, code = run("examples/fetch.lua http://127.0.0.1:1/")
        assert.equal(1, code)
        assert.truthy(out:find("error: connection refused", 1, true), out)
    end)

    it("fetch_many.lua fetches in parallel: the total is below the sum", function()
        local base = upstream()
        local urls = {}
        for i = 1, 4 do urls[i] = base .. "/delay/0.3" end
        local out, code = run("examples/fetch_many.lua " .. table.concat(urls, " "))
        assert.equal(0, code, out)
        local _, n = out:gsub("200 9 bytes", "")
        assert.equal(4, n, out)
        local total, sum = out:match("total ([%d.]+) s, sum of the single times ([%d.]+) s")
        total, sum = tonumber(total), tonumber(sum)
        assert.truthy(total and sum, out)
        assert.is_true(sum >= 1.1, out)
        assert.is_true(total < 1.0, out) -- 4 × 0.3 s at once, not one after the other
        assert.is_true(total < sum, out)
    end)

    it("coffee.lua interleaves the two coroutines", function()
        local out, code = run("examples/coffee.lua")
        assert.equal(0, code, out)
        local order = {}
        for who in out:gmatch("%d+%.%d (%a+):") do order[#order + 1] = who end
        assert.same({ "anton", "bea", "bea", "anton", "bea", "anton", "both" }, order)
    end)

    it("greeting.lua greets over TCP and exits on SIGTERM", function()
        local p = test.start_process("examples/greeting.lua 0")
        test.defer(function() p:kill() end)
        local port = test.wait_until(function()
            return tonumber(p:output():match("tcp://[^:]+:(%d+)"))
        end, 10)
        assert.truthy(port, p:output())
        for _ = 1, 3 do
            assert.same({ "ciao EuroPython\n" }, { test.raw(port, "") })
        end
        assert.is_true(p:signal("TERM"))
        assert.equal(0, p:wait(10), p:output())
    end)

    it("upload.lua saves each uploaded file as it arrives, over the 1 MiB default", function()
        local dir = os.tmpname()
        os.remove(dir)
        local p = test.start_process("examples/upload.lua --port 0 --dir " .. dir)
        test.defer(function()
            p:kill()
            os.execute("rm -rf '" .. dir .. "'")
        end)
        local port = p:port()
        local base = "http://127.0.0.1:" .. port
        local page = assert(moonlet.http.get(base .. "/")).body
        assert.truthy(page:find('enctype="multipart/form-data"', 1, true))
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local big = table.concat(bytes):rep(8192) -- 2 MiB of every byte value
        local res = assert(moonlet.http.post(base .. "/upload", nil, { form = {
            note = "hi", file = { filename = "all.bin", type = "application/x-test", body = big } } }))
        assert.same(200, res.status, res.body)
        local doc = assert(res:json())
        assert.same({ note = "hi" }, doc.fields)
        assert.same(1, #doc.files)
        local f = doc.files[1]
        assert.same({ "file", "all.bin", "application/x-test", #big },
                    { f.field, f.filename, f.type, f.size })
        assert.is_true(assert(moonlet.fs.read(f.saved_as)) == big)
        local bad = assert(moonlet.http.post(base .. "/upload", "--x\r\n", { headers = {
            ["Content-Type"] = "multipart/form-data; boundary=x" } }))
        assert.same(400, bad.status)
    end)

    it("guestbook.lua renders its templates escaped and greets a signer by the name in the session",
       function()
        local p = test.start_process("examples/guestbook.lua --port 0")
        test.defer(function() p:kill() end)
        local base = "http://127.0.0.1:" .. p:port()
        local first = assert(moonlet.http.get(base .. "/"))
        assert.same(200, first.status)
        assert.truthy(first.body:find("<h1>Guestbook</h1>", 1, true))
        assert.is_nil(first.body:find("Welcome back", 1, true))
        local cookie = first.headers["set-cookie"]:match("^([^;]*)") -- the session holds the token
        local token = first.body:match('name="_csrf" value="([^"]+)"')
        local forged = assert(moonlet.http.post(base .. "/sign", nil, { headers = { Cookie = cookie },
            form = { name = "Mallory", message = "no token" } }))
        assert.same(403, forged.status)
        local signed = assert(moonlet.http.post(base .. "/sign", nil, { headers = { Cookie = cookie },
            form = { name = "<Ada>", message = 'hi "there"', _csrf = token } }))
        assert.same({ 303, "/" }, { signed.status, signed.headers.location })
        cookie = signed.headers["set-cookie"]:match("^([^;]*)")
        local page = assert(moonlet.http.get(base .. "/", { headers = { Cookie = cookie } })).body
        assert.truthy(page:find("Welcome back, &lt;Ada&gt;. You have signed 1 time.", 1, true), page)
        assert.truthy(page:find("<li><b>&lt;Ada&gt;</b>: hi &quot;there&quot;</li>", 1, true), page)
        local bad = assert(moonlet.http.post(base .. "/sign", nil, { headers = { Cookie = cookie },
            form = { name = "x", _csrf = token } }))
        assert.same(400, bad.status)
    end)

    it("mount.lua serves its API under /api/v1 behind the API's own token check", function()
        local p = test.start_process("examples/mount.lua --port 0")
        test.defer(function() p:kill() end)
        local base = "http://127.0.0.1:" .. p:port()
        local page = assert(moonlet.http.get(base .. "/"))
        assert.same({ 200, "moonlet" }, { page.status, page.headers["x-served-by"] })
        assert.truthy(page.body:find("GET /api/v1/books with", 1, true)) -- app:url_for("books")
        local refused = assert(moonlet.http.get(base .. "/api/v1/books/2"))
        assert.same({ 401, "Bearer", "moonlet" }, { refused.status, refused.headers["www-authenticate"],
                                                    refused.headers["x-served-by"] })
        local auth = { headers = { Authorization = "Bearer let-me-in" } }
        local book = assert(moonlet.http.get(base .. "/api/v1/books/2", auth))
        assert.same({ title = "Lua Quick Start Guide", url = "/api/v1/books/2" },
                    moonlet.json.decode(book.body))
        assert.same(404, assert(moonlet.http.get(base .. "/api/v1/books/9", auth)).status)
        assert.same(401, assert(moonlet.http.get(base .. "/api/nothing")).status)
    end)

    it("behind_proxy.lua serves on a Unix socket and gives the forwarded client back", function()
        local dir = test.make_dir()
        test.defer(function() test.remove_dir(dir) end)
        local path = dir .. "/app.sock"
        local p = test.start_process("examples/behind_proxy.lua --unix " .. path)
        test.defer(function() p:kill() end)
        local res
        assert.truthy(test.wait_until(function()
            res = moonlet.http.get("http://app.test/", { unix = path, headers = {
                ["X-Forwarded-For"] = "203.0.113.9", ["X-Forwarded-Proto"] = "https" } })
            return res
        end, 10), p:output())
        assert.equal("hello 203.0.113.9, you came over https to app.test\n", res.body)
        res = assert(moonlet.http.get("http://app.test/", { unix = path }))
        assert.equal("hello unix:, you came over http to app.test\n", res.body)
    end)

    it("status.lua shows nginx's stub_status to loopback clients, its logs in files", function()
        local dir = test.make_dir()
        test.defer(function() test.remove_dir(dir) end)
        local log = dir .. "/access.log"
        local p = test.start_process(("examples/status.lua --workers 2 --port 0 --access-log=%s "
                                      .. "--access-log-format combined --pid-file %s/m.pid"):format(log, dir))
        test.defer(function() p:kill() end)
        local port = p:port()
        assert.truthy(test.request(port, "GET", "/").body:find("^Hello from worker [01]\n$"))
        local body = test.request(port, "GET", "/status").body
        assert.truthy(body:match("^Active connections: %d+ \nserver accepts handled requests\n %d+ %d+ %d+ \n"
                                 .. "Reading: %d+ Writing: %d+ Waiting: %d+ \n$"), body)
        local got = moonlet.json.decode(test.request(port, "GET", "/status.json").body)
        assert.same(2, got.worker.count)
        assert.truthy(test.wait_until(function()
            local f = io.open(log)
            local text = f and f:read("*a") or ""
            if f then f:close() end
            return select(2, text:gsub('"GET /status', "")) == 2
        end), "no access log lines")
        -- from another address (127.0.0.2: loopback to the kernel, not to the app's list): 403
        local py = ("import socket; s = socket.socket(); s.bind(('127.0.0.2', 0)); "
                    .. "s.connect(('127.0.0.1', %d)); "
                    .. "s.sendall(b'GET /status HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n'); "
                    .. "print(s.recv(100).split(b'\\r\\n')[0].decode())"):format(port)
        local f = io.popen('python3 -c "' .. py .. '" 2>&1')
        local line = f:read("*a")
        f:close()
        assert.same("HTTP/1.1 403 Forbidden\n", line)
    end)

    it("workers.lua answers from two processes, each counting its own requests and all", function()
        local p = test.start_process("--workers 2 examples/workers.lua --port 0")
        test.defer(function() p:kill() end)
        local port, seen = p:port(), {}
        for i = 1, 400 do
            local r = test.request(port, "GET", "/")
            local id, pid, n, all = r.body:match(
                "^worker (%d) of 2 %(pid (%d+)%): request (%d+) of this worker, (%d+) of all\n$")
            assert.truthy(id, r.body)
            assert.same(i, tonumber(all)) -- moonlet.shared: one count for both processes
            seen[id] = seen[id] or { pid = pid, n = 0 }
            assert.same({ seen[id].pid, seen[id].n + 1 }, { pid, tonumber(n) }) -- its own count
            seen[id].n = seen[id].n + 1
            if seen["0"] and seen["1"] then break end
        end
        assert.truthy(seen["0"] and seen["1"])
    end)

    it("sse.lua streams numbered ticks and goes on from the Last-Event-ID a browser sends", function()
        local p = test.start_process("examples/sse.lua --port 0")
        test.defer(function() p:kill() end)
        local base = "http://127.0.0.1:" .. p:port()
        local page = assert(moonlet.http.get(base .. "/"))
        assert.truthy(page.body:find('new EventSource("/events")', 1, true))
        local r = assert(moonlet.http.get(base .. "/events?count=2&every=0.05",
                                          { headers = { ["Last-Event-ID"] = "41" } }))
        assert.same("text/event-stream; charset=utf-8", r.headers["content-type"])
        local ids = {}
        for id in r.body:gmatch("event: tick\nid: (%d+)\ndata: {\"time\":\"%d%d:%d%d:%d%d\"}\n\n") do
            ids[#ids + 1] = tonumber(id)
        end
        assert.same({ 42, 43 }, ids, r.body)
    end)

    it("aggregate.lua answers with a partial document when an upstream is slow", function()
        local p = test.start_process("examples/aggregate.lua --port 0")
        test.defer(function() p:kill() end)
        local port = p:port()
        local t0 = core.now()
        local resp = test.request(port, "GET", "/aggregate")
        local secs = core.now() - t0
        assert.equal(200, resp.status)
        local doc = moonlet.json.decode(resp.body)
        assert.equal(200, doc.upstreams.users.status)
        assert.equal("anton", doc.upstreams.users.body[1].name)
        assert.equal(200, doc.upstreams.orders.status)
        assert.same({ error = "timeout" }, doc.upstreams.slow)
        assert.is_true(secs < 1.8, tostring(secs)) -- the 0.5 s deadline, not the 2 s upstream
    end)

    it("aggregate.lua takes its upstreams from its arguments", function()
        local tasks0 = core.stats().tasks
        local base = upstream()
        local p = test.start_process(("--port 0 examples/aggregate.lua %s/delay/0.1 %s/delay/1")
            :format(base, base))
        test.defer(function() p:kill() end)
        local port = p:port()
        local doc = moonlet.json.decode(test.request(port, "GET", "/aggregate").body)
        assert.equal("slept 0.1", doc.upstreams["0.1"].body)
        assert.same({ error = "timeout" }, doc.upstreams["1"])
        -- the slow handler of this process's upstream ends by itself: nothing outlives the `it`
        assert.truthy(test.wait_until(function() return core.stats().tasks == tasks0 end, 5))
    end)

    it("deadline.lua answers 504 at its route deadline and cancels the fetch still running",
        function()
            local p = test.start_process("examples/deadline.lua --port 0")
            test.defer(function() p:kill() end)
            local port = p:port()
            local resp = test.request(port, "GET", "/report")
            assert.equal(504, resp.status)
            assert.same({ cancelled = 1 }, moonlet.json.decode(test.request(port, "GET", "/cancelled").body))
            resp = test.request(port, "GET", "/report?slow=0")
            assert.equal(200, resp.status)
            local doc = moonlet.json.decode(resp.body)
            assert.same({ 2.5, 12 }, { doc.prices.coffee, doc.stock.coffee })
            assert.truthy(p:output():find("GET /report: the deadline of 0.5 s passed", 1, true))
        end)

    it("cpu.lua answers /ping while /hash runs on the thread pool", function()
        local p = test.start_process("examples/cpu.lua --port 0")
        test.defer(function() p:kill() end)
        local port = p:port()
        local hash
        local t = moonlet.spawn(function()
            hash = test.request(port, "GET", "/hash?n=30000000")
        end)
        test.defer(function() t:cancel() end)
        moonlet.sleep(0.05) -- let /hash start (a concurrency proof, not a synchronisation)
        for _ = 1, 5 do
            local resp = test.request(port, "GET", "/ping")
            assert.same({ 200, "pong" }, { resp.status, resp.body })
        end
        assert.is_nil(hash) -- the pings came back while the hash was still running
        assert.is_true(t:join(30))
        assert.equal(200, hash.status)
        local doc = moonlet.json.decode(hash.body)
        assert.equal(30000000, doc.rounds)
        assert.matches("^%x+$", doc.hash)
    end)

    it("tasks.lua prints one line per idea, each with its expected result", function()
        local out, code = run("examples/tasks.lua")
        assert.equal(0, code, out)
        local secs = tonumber(out:match("spawn/join: a b after ([%d.]+) s"))
        assert.truthy(secs and secs < 0.4, out) -- two 0.2 s sleeps at once, not one after the other
        for _, line in ipairs({ "cancel:\tfalse\tcancelled",
                                "any:\tfast\tfast", "timeout:\tnil\ttimeout",
                                "queue:\t1 4 9 16 25", "semaphore: at most\t2\tat once",
                                "event: woke\t3" }) do
            assert.truthy(out:find(line, 1, true), line .. " in:\n" .. out)
        end
    end)

    it("hello.lua (the README's app) serves each of its routes, its files from examples/public", function()
        -- run from the repository's root, where no ./public exists: the static root is found
        -- next to the script (app:static takes a relative dir from there when it is not in the
        -- current directory)
        local p = test.start_process("examples/hello.lua --port 0")
        test.defer(function() p:kill() end)
        local port = p:port()
        local r = test.request(port, "GET", "/")
        assert.same({ 200, "Hello, World!" }, { r.status, r.body })
        assert.truthy(tonumber(r.headers["x-time"]), "the middleware's X-Time")
        r = test.request(port, "GET", "/users/42?q=hi")
        assert.same({ id = "42", q = "hi" }, moonlet.json.decode(r.body))
        r = test.request(port, "POST", "/echo", { body = "ping" })
        assert.same({ 201, "ping", "yes" }, { r.status, r.body, r.headers["x-echo"] })
        r = test.request(port, "GET", "/countdown")
        assert.same({ "chunked", "3\n2\n1\n" }, { r.headers["transfer-encoding"], r.body })
        r = test.request(port, "GET", "/assets/hello.txt")
        assert.same(200, r.status)
        assert.truthy(r.body:find("examples/public/hello.txt", 1, true), r.body)
        assert.truthy(tonumber(r.headers["x-time"]), "the middleware wraps the static files too")
        assert.same(404, test.request(port, "GET", "/assets/missing.txt").status)
    end)

    it("proxy.lua passes /api/* on to the upstream of its argument, and streams its demo one", function()
        local base = upstream()
        local p = test.start_process("examples/proxy.lua --port 0 " .. base)
        test.defer(function() p:kill() end)
        local port = p:port()
        local r = test.request(port, "GET", "/api/delay/0.1")
        assert.same({ 200, "slept 0.1" }, { r.status, r.body })
        assert.equal(("x"):rep(1000), test.request(port, "GET", "/api").body)
        assert.equal(404, test.request(port, "GET", "/api/missing/x").status) -- the upstream's
        local demo = test.start_process("examples/proxy.lua --port 0")
        test.defer(function() demo:kill() end)
        port = demo:port()
        r = test.request(port, "GET", "/api/count")
        assert.same({ "chunked", "1\n2\n3\n4\n5\n" }, { r.headers["transfer-encoding"], r.body })
        r = moonlet.json.decode(test.request(port, "GET", "/api/hello?name=ada").body)
        assert.same({ hello = "ada", via = "127.0.0.1" }, r)
        local ws = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/api/echo", { timeout = 5 }))
        assert(ws:send("through"))
        assert.equal("through", ws:receive(5))
        ws:close()
    end)
end)

describe("examples and docs", function()
    local fs = moonlet.fs

    it("the README links every page of docs/", function()
        local readme = assert(fs.read("README.md"))
        local missing = {}
        for _, name in ipairs(assert(fs.list("docs"))) do
            if name:match("%.md$") and not readme:find("(docs/" .. name .. ")", 1, true) then
                missing[#missing + 1] = name
            end
        end
        table.sort(missing)
        assert.same({}, missing)
    end)

    it("a snippet of the README or docs/ headed with an example's name is that file's code", function()
        -- the code without comments and blank lines, each line trimmed
        local function code(text)
            local lines = {}
            for line in text:gmatch("[^\n]+") do
                line = line:gsub("%s*%-%-.*$", ""):match("^%s*(.-)%s*$")
                if line ~= "" then lines[#lines + 1] = line end
            end
            return table.concat(lines, "\n")
        end
        local pages, checked = { "README.md" }, 0
        for _, name in ipairs(assert(fs.list("docs"))) do
            if name:match("%.md$") then pages[#pages + 1] = "docs/" .. name end
        end
        for _, page in ipairs(pages) do
            local text = assert(fs.read(page))
            for name, block in text:gmatch("```lua\n%-%- (examples/[%w_/]+%.lua)[^\n]*\n(.-)```") do
                assert.equal(code(assert(fs.read(name))), code(block), page .. ": " .. name)
                checked = checked + 1
            end
        end
        assert.truthy(checked >= 1, "no snippet names its example")
    end)

    it("docs/examples.md names every example of examples/ and examples/embed/", function()
        local page = assert(fs.read("docs/examples.md"))
        local missing = {}
        for _, dir in ipairs({ "examples", "examples/embed" }) do
            for _, name in ipairs(assert(fs.list(dir))) do
                if (dir == "examples" and name:match("%.lua$")) or name:match("%.c$") then
                    if not page:find("`" .. name .. "`", 1, true) then
                        missing[#missing + 1] = dir .. "/" .. name
                    end
                end
            end
        end
        table.sort(missing)
        assert.same({}, missing)
    end)
end)
