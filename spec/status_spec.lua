-- spec/status_spec.lua: moonlet.status(), nginx's stub_status for moonlet, in a server process of
-- its own (so that the figures are exactly this test's): the page's layout byte for byte, each
-- connection counted where nginx counts it (reading a head, writing: a handler running, waiting:
-- idle keep-alive), accepts / handled / requests since the start, a connection refused at
-- --max-conns accepted but not handled, the JSON form, and a bad format refused.
local test = require "moonlet.test"
local json = require "moonlet.json"
local moonlet = require "moonlet"

local APP = [[
local moonlet = require "moonlet"
local app = moonlet.app()
app:get("/", function() return "ok" end)
app:get("/slow", function() moonlet.sleep(tonumber(os.getenv("SLOW") or "2")); return "slow" end)
app:get("/status", moonlet.status())
app:get("/status.json", moonlet.status({ format = "json" }))
return app
]]

local defer = test.defer

describe("moonlet.status", function()
    local dir, app_path

    lazy_setup(function() dir, app_path = test.app_dir(APP) end)
    lazy_teardown(function() test.remove_dir(dir) end)

    local function start(flags)
        local p = test.start_process((flags or "") .. " --port 0 " .. app_path)
        defer(function()
            p:signal("KILL")
            p:wait()
        end)
        return p:port(), p
    end

    local function status(port)
        local res = test.request(port, "GET", "/status")
        assert.same(200, res.status)
        return res
    end

    it("writes stub_status's page, counting each connection where nginx does", function()
        local port = start()
        -- connection 1: two requests, then idle (waiting)
        local idle = test.connect(port, 5)
        for _ = 1, 2 do
            assert(idle:send(test.format_request("GET", "/")))
            assert(test.read_response(idle, "GET"))
        end
        -- connection 2: half a request head (reading)
        local partial = test.connect(port, 5)
        assert(partial:send("GET / HTTP/1.1\r\nHost: a\r\n"))
        -- connection 3: a handler that sleeps (writing)
        local slow = test.connect(port, 5)
        assert(slow:send(test.format_request("GET", "/slow")))
        assert(test.wait_until(function() -- until the slow request's head is in: 4 with /status's
            return status(port).body:match("\n %d+ %d+ (%d+) \n") == tostring(3 + 2)
        end))
        -- connection 4 (this request): writing too; 5 connections so far (the wait's included)
        local res = status(port)
        local accepted = res.body:match("\n (%d+) ")
        local requests = res.body:match("\n %d+ %d+ (%d+) \n")
        assert.same("text/plain", res.headers["content-type"]:match("^[^;]+"))
        assert.same(("Active connections: 4 \nserver accepts handled requests\n %s %s %s \n" ..
                     "Reading: 1 Writing: 2 Waiting: 1 \n"):format(accepted, accepted, requests), res.body)
        local n_accepted = tonumber(accepted)
        -- the requests line: 2 on the idle connection, /slow, and one per /status asked so far
        assert.truthy(n_accepted >= 5)
        idle:close()
        partial:close()
        slow:close()
        assert(test.wait_until(function()
            return status(port).body:find("Active connections: 1 \n", 1, true) -- this one only
        end))
        local body = status(port).body
        assert.truthy(body:find("Reading: 0 Writing: 1 Waiting: 0 \n", 1, true), body)
        local a, h, r = body:match("\n (%d+) (%d+) (%d+) \n")
        assert.same(a, h)
        assert.truthy(tonumber(a) > n_accepted) -- each /status came on a new connection
        assert.truthy(tonumber(r) >= tonumber(a)) -- and connection 1 made two
    end)

    it("counts a connection refused at --max-conns as accepted, not handled", function()
        local port = start("--max-conns 2")
        local a = test.connect(port, 5)
        local b = test.connect(port, 5)
        assert(a:send(test.format_request("GET", "/")))
        assert(test.read_response(a, "GET"))
        assert(b:send(test.format_request("GET", "/")))
        assert(test.read_response(b, "GET"))
        -- a third connection is accepted and closed at once
        local c = test.connect(port, 5)
        local data = c:receive("*a")
        assert.same("", data or "")
        c:close()
        b:close() -- room for /status's own connection
        local body
        assert(test.wait_until(function()
            local sock = test.connect(port, 5)
            assert(sock:send(test.format_request("GET", "/status")))
            local res = test.read_response(sock, "GET")
            sock:close()
            body = res and res.status == 200 and res.body
            return body
        end))
        -- connections: a, b, c (refused), then /status's (maybe after refused tries while b closed)
        local accepted, handled, requests = body:match("\n (%d+) (%d+) (%d+) \n")
        accepted, handled, requests = tonumber(accepted), tonumber(handled), tonumber(requests)
        assert.same(3, handled) -- a, b and the one /status came on
        assert.truthy(accepted >= 4, body) -- c refused (and any try before b's close was seen)
        assert.same(3, requests) -- a's, b's and this one
        a:close()
    end)

    it("gives the same figures and more as JSON", function()
        local port = start()
        test.request(port, "GET", "/")
        assert.truthy(test.raw(port, "BAD\r\n\r\n"):find("^HTTP/1.1 400 ")) -- counted, as nginx does
        local res = test.request(port, "GET", "/status.json")
        assert.same(200, res.status)
        assert.same("no-store", res.headers["cache-control"])
        local got = json.decode(res.body)
        assert.same({ active = 1, reading = 0, writing = 1, waiting = 0, accepted = 3, handled = 3 },
                    got.connections)
        assert.same({ total = 3 }, got.requests)
        assert.same({ id = 0, count = 1 }, got.worker)
        assert.same(moonlet._VERSION, got.version)
        assert.is_number(got.pid)
        assert.truthy(got.pid > 1)
        assert.is_number(got.tasks)
        assert.truthy(got.lua_memory_kb > 0)
        assert.truthy(got.uptime >= 0)
    end)

    it("sums the workers of --workers 2, and their counts go on across a worker's restart", function()
        local port, p = start("--workers 2")
        local polls = 0
        -- the totals, once every worker's figures are in: connections and requests so far, each
        -- /status asked (on a connection of its own) included
        local function totals(conns, reqs)
            local got
            assert(test.wait_until(function()
                polls = polls + 1
                local a, h, r = status(port).body:match("\n (%d+) (%d+) (%d+) \n")
                got = { tonumber(a), tonumber(h), tonumber(r) }
                return got[1] == conns + polls and got[2] == conns + polls and got[3] == reqs + polls
            end, 5), ("want %d %d, got %s"):format(conns + polls, reqs + polls, table.concat(got, " ")))
        end
        for i = 1, 40 do assert.same(200, test.request(port, "GET", "/?i=" .. i).status) end
        totals(40, 40)
        local keep = test.connect(port, 5) -- two requests on one connection
        for _ = 1, 2 do
            assert(keep:send(test.format_request("GET", "/")))
            assert(test.read_response(keep, "GET"))
        end
        totals(41, 42)
        keep:close()
        local json_res = json.decode(test.request(port, "GET", "/status.json").body)
        polls = polls + 1
        assert.same(2, json_res.worker.count)
        assert.same(41 + polls, json_res.connections.accepted)
        -- a worker killed right after it answered (and so wrote its figures) comes back and counts on
        -- from there
        local sup_pid = p:pid() -- the supervisor
        local w = io.popen("pgrep -P " .. sup_pid)
        local worker = tonumber(w:read("*l"))
        w:close()
        assert(test.wait_until(function()
            polls = polls + 1
            return json.decode(test.request(port, "GET", "/status.json").body).pid == worker
        end, 10))
        assert(worker and os.execute("kill -KILL " .. worker))
        assert(test.wait_until(function() -- restarted: two workers again, the killed one not among them
            local g = io.popen("pgrep -P " .. sup_pid)
            local n, seen = 0, false
            for line in g:lines() do
                n = n + 1
                if tonumber(line) == worker then seen = true end
            end
            g:close()
            return n == 2 and not seen
        end, 10))
        for i = 1, 10 do assert.same(200, test.request(port, "GET", "/?j=" .. i).status) end
        totals(51, 52)
    end)

    it("refuses a format it does not know", function()
        local ok, err = pcall(moonlet.status, { format = "xml" })
        assert.falsy(ok)
        assert.truthy(err:find('format is "text" or "json"', 1, true), err)
    end)
end)
