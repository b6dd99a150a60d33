-- spec/deadline_spec.lua: structured concurrency and request deadlines. The functions gather, any
-- and timeout run are children of their caller: cancelling the caller cancels them. A request's
-- deadline (app-wide or per route) cancels whatever its task waits on, the children of its gathers
-- included (sockets, the HTTP client, the thread pool, sleeps), and the client gets 504. A client
-- that resets its connection cancels the handler it was waiting for.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"

local defer = test.defer
local CANCELLED = moonlet.CANCELLED

-- A function that sleeps and records how its sleep ended in rec[name] ("slept" or the error).
local function sleeper(rec, name, secs)
    return function()
        local ok, err = pcall(moonlet.sleep, secs or 10)
        rec[name] = ok and "slept" or err
        if not ok then error(err, 0) end
        return name
    end
end

describe("structured concurrency", function()
    it("cancels the children of a gather when its caller is cancelled, at every depth", function()
        local rec = {}
        local t = moonlet.spawn(function()
            return moonlet.gather({
                a = sleeper(rec, "a"),
                inner = function()
                    return moonlet.gather({ b = sleeper(rec, "b"), c = sleeper(rec, "c") })
                end,
            })
        end)
        moonlet.sleep(0.01)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join() })
        assert.same({ a = CANCELLED, b = CANCELLED, c = CANCELLED }, rec)
    end)

    it("cancels the task of moonlet.timeout when its caller is cancelled", function()
        local rec = {}
        local t = moonlet.spawn(function() return moonlet.timeout(10, sleeper(rec, "x")) end)
        moonlet.sleep(0.01)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join() })
        assert.same({ x = CANCELLED }, rec)
    end)

    it("cancels every function of moonlet.any when its caller is cancelled", function()
        local rec = {}
        local t = moonlet.spawn(function()
            return moonlet.any({ sleeper(rec, "p"), sleeper(rec, "q") })
        end)
        moonlet.sleep(0.01)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join() })
        assert.same({ p = CANCELLED, q = CANCELLED }, rec)
    end)

    it("moonlet.any: a function that raises does not win; when all raise, any raises", function()
        local rec = {}
        assert.same({ "late", 2 }, { moonlet.any({
            function() moonlet.sleep(0.01); error("first fails") end,
            function() moonlet.sleep(0.03); return "late" end,
        }) })
        local ok, err = pcall(moonlet.any, {
            function() moonlet.sleep(0.01); error("one") end,
            function() moonlet.sleep(0.02); error("two") end,
        })
        assert.is_false(ok)
        assert.truthy(tostring(err):find("two", 1, true))
        assert.same({}, rec)
    end)

    it("a stray wake-up does not end a gather or a join early", function()
        local co
        local t = moonlet.spawn(function()
            co = core.running()
            return moonlet.gather({ function() moonlet.sleep(0.05); return 1 end })
        end)
        assert.is_true(core.unpark(co, true)) -- as a late unpark meant for an older wait would
        local ok, results, errors = t:join()
        assert.is_true(ok)
        assert.same({ 1 }, results)
        assert.same({}, errors)

        local slow = moonlet.spawn(function() moonlet.sleep(0.05); return "done" end)
        local joiner = moonlet.spawn(function()
            co = core.running()
            return slow:join()
        end)
        assert.is_true(core.unpark(co, true))
        assert.same({ true, true, "done" }, { joiner:join() })
    end)

    it("unpark wakes a task only in core.park: not in a sleep, not once woken", function()
        local co
        local napper = moonlet.spawn(function()
            co = core.running()
            moonlet.sleep(0.05)
            return "slept"
        end)
        local t0 = moonlet.now()
        assert.is_false(core.unpark(co, "early"))
        assert.same({ true, "slept" }, { napper:join() })
        assert.is_true(moonlet.now() - t0 >= 0.04)

        local parker = moonlet.spawn(function()
            co = core.running()
            return core.park(5) -- a timed park: unpark ends it and its timer
        end)
        assert.is_true(core.unpark(co, "woken", 2))
        assert.is_false(core.unpark(co, "again"))
        assert.same({ true, "woken", 2 }, { parker:join() })

        local nan_sleeper = moonlet.spawn(function() -- a NaN sleep is a sleep of 0, not a park
            co = core.running()
            moonlet.sleep(0 / 0)
            return "slept"
        end)
        assert.is_false(core.unpark(co, "woken"))
        assert.same({ true, "slept" }, { nan_sleeper:join() })
    end)

    it("a wait with a C function between it and its task raises, and leaves nothing armed", function()
        for _, wait in ipairs({ function() moonlet.sleep(0.01) end, function() core.park(5) end,
                                function() core.park() end }) do
            local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b)
                wait()
                return a < b
            end)
            assert.is_false(ok)
            assert.truthy(tostring(err):find("cannot wait here", 1, true))
            assert.is_false(core.unpark(core.running(), "stray")) -- not parked: nothing to wake
        end
        local t0 = moonlet.now()
        moonlet.sleep(0.02) -- the task waits as usual afterwards; no stray timer wakes it early
        assert.is_true(moonlet.now() - t0 >= 0.015)
    end)

    it("gather and any where they cannot wait raise and cancel the children they started", function()
        for _, name in ipairs({ "gather", "any" }) do
            local finished, cancelled = 0, 0
            local function child()
                local ok, err = pcall(moonlet.sleep, 0.02)
                if not ok and err == moonlet.CANCELLED then cancelled = cancelled + 1 end
                if ok then finished = finished + 1 end
            end
            local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b)
                moonlet[name]({ child, child })
                return a < b
            end)
            assert.is_false(ok, name)
            assert.truthy(tostring(err):find("cannot wait here", 1, true), name)
            assert.same(2, cancelled, name)
            moonlet.sleep(0.04)
            assert.same(0, finished, name) -- no orphan went on after the error
        end
    end)

    it("gather checks every value before it starts any, and takes an empty table", function()
        local ran = false
        local ok, err = pcall(moonlet.gather, { function() ran = true end, 42 })
        assert.is_false(ok)
        assert.truthy(err:find("moonlet.gather: the value at 2 is not a function", 1, true))
        assert.is_false(ran)
        assert.same({ {}, {} }, { moonlet.gather({}) })
    end)

    it("leaves nothing behind after 2,000 cancelled gathers", function()
        moonlet.sleep(0)
        collectgarbage()
        local before, mem0 = core.stats(), collectgarbage("count")
        for _ = 1, 2000 do
            local t = moonlet.spawn(moonlet.gather, { function() moonlet.sleep(5) end,
                                                       function() moonlet.sleep(5) end })
            t:cancel()
        end
        moonlet.sleep(0) -- the close callbacks of the cancelled sleeps run in the next iteration
        moonlet.sleep(0)
        collectgarbage()
        collectgarbage()
        test.assert_baseline(before, mem0, 512)
    end)
end)

describe("request deadlines", function()
    local release -- set at the end of each test: the upstream handlers that still wait end
    before_each(function() release = moonlet.event() end)
    after_each(function() release:set() end)

    local function serve(app)
        local server, port = test.serve(app)
        defer(function() server:close() end)
        return port
    end

    it("answers 504 when a route's deadline passes, and cancels every wait of the request", function()
        local rec = {}
        local app = moonlet.app()
        app:get("/hang", function() release:wait(30); return "late" end)
        local port
        app:get("/fanout", function()
            moonlet.gather({
                http = function()
                    local res, err = moonlet.http.get(("http://127.0.0.1:%d/hang"):format(port))
                    rec.http = res and res.status or err
                end,
                sleep = sleeper(rec, "sleep"),
                work = function()
                    local ok, err = pcall(moonlet.work, function()
                        local t = os.clock()
                        while os.clock() - t < 0.5 do end
                        return "worked"
                    end)
                    rec.work = ok and err or err
                    if not ok then error(err, 0) end
                end,
            })
            rec.after_gather = true
            return "not reached"
        end, { deadline = 0.2 })
        port = serve(app)
        local resp = test.request(port, "GET", "/fanout", { timeout = 5 })
        assert.same(504, resp.status)
        assert.same("504 Gateway Timeout\n", resp.body)
        assert.same("close", resp.headers.connection)
        assert.same({ sleep = CANCELLED, work = CANCELLED }, { sleep = rec.sleep, work = rec.work })
        assert.is_nil(rec.http) -- cancelled inside moonlet.http.get: it never returned
        assert.is_nil(rec.after_gather)
    end)

    it("takes an app-wide deadline; a route's own deadline replaces it", function()
        local app = moonlet.app({ deadline = 0.1 })
        app:get("/slow", function() moonlet.sleep(0.3); return "slow" end)
        app:get("/patient", function() moonlet.sleep(0.3); return "patient" end, { deadline = 5 })
        app:get("/quick", function() return "quick" end)
        local port = serve(app)
        assert.same(504, test.request(port, "GET", "/slow").status)
        local resp = test.request(port, "GET", "/patient")
        assert.same({ 200, "patient" }, { resp.status, resp.body })
        resp = test.request(port, "GET", "/quick")
        assert.same({ 200, "quick" }, { resp.status, resp.body })
    end)

    it("bounds the middleware too, and a handler that finishes in time is untouched", function()
        local app = moonlet.app({ deadline = 0.2 })
        app:use(function(_, res, nxt)
            local r = nxt()
            res:header("X-After", "yes")
            return r
        end)
        app:use(function(req, _, nxt)
            if req.path == "/stuck-in-middleware" then release:wait(30) end
            return nxt()
        end)
        app:get("/ok", function() moonlet.sleep(0.01); return "in time" end)
        app:get("/stuck-in-middleware", function() return "never" end)
        local port = serve(app)
        local resp = test.request(port, "GET", "/ok")
        assert.same({ 200, "in time", "yes" }, { resp.status, resp.body, resp.headers["x-after"] })
        assert.same(504, test.request(port, "GET", "/stuck-in-middleware").status)
    end)

    it("closes a streamed response whose deadline passes mid-body", function()
        local app = moonlet.app()
        app:get("/stream", function(_, res)
            res:write("first\n")
            release:wait(30)
            res:write("second\n")
        end, { deadline = 0.2 })
        local port = serve(app)
        local data = test.raw(port, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", 5)
        assert.truthy(data:find("^HTTP/1.1 200"))
        assert.truthy(data:find("first\n", 1, true))
        assert.is_nil(data:find("second", 1, true))
        assert.is_nil(data:find("0\r\n\r\n", 1, true)) -- no last chunk: the client sees a cut body
    end)

    it("never cuts a request under a deadline of math.huge", function()
        local app = moonlet.app({ deadline = math.huge })
        app:get("/", function() moonlet.sleep(0.01); return "in time" end)
        local port = test.serving(app)
        local resp = test.request(port, "GET", "/")
        assert.same({ 200, "in time" }, { resp.status, resp.body })
    end)

    it("refuses a deadline that is not a positive number", function()
        assert.has_error(function() moonlet.app({ deadline = "soon" }) end)
        assert.has_error(function() moonlet.app():get("/", function() end, { deadline = 0 }) end)
        assert.has_error(function() moonlet.app():post("/", function() end, { deadline = -1 }) end)
    end)
end)

describe("a client that goes away", function()
    -- Serves /wait: a gather of two 10 s sleeps (rec: how each ended), started set as it begins.
    -- Returns rec, started, the port.
    local function waiting_server()
        local rec, started = {}, moonlet.event()
        local app = moonlet.app()
        app:get("/wait", function()
            started:set()
            moonlet.gather({ a = sleeper(rec, "a"), b = sleeper(rec, "b") })
            rec.after = true
        end)
        local server, port = test.serve(app)
        defer(function() server:close() end)
        return rec, started, port
    end

    it("cancels the handler it waited for, and the children of its gather", function()
        local rec, started, port = waiting_server()
        -- a client that sends its request and then resets the connection (SO_LINGER 0)
        local p = assert(moonlet.process.spawn({ "/usr/bin/python3", "-c", ([[
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", %d))
s.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
sys.stdin.read(1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
]]):format(port) }))
        defer(function() p:close() end)
        assert.is_true(started:wait(5))
        assert(p:write("x"))
        assert.is_true(test.wait_until(function() return rec.a ~= nil and rec.b ~= nil end, 5))
        assert.same({ a = CANCELLED, b = CANCELLED }, rec)
        assert.same(0, p:wait(5))
    end)

    -- Sends a request for waiting_server's /wait from a client that then closes its socket
    -- (close: a FIN, the socket gone); returns what the sleeps saw and the seconds it took.
    local function closing_client(request)
        local rec, started, port = waiting_server()
        local sock = assert(moonlet.tcp.connect("127.0.0.1", port, { timeout = 5 }))
        assert(sock:send(request))
        assert.is_true(started:wait(5))
        local t0 = core.now()
        sock:close()
        test.wait_until(function() return rec.a ~= nil and rec.b ~= nil end, 3)
        return rec, core.now() - t0
    end

    it("cancels it when the client closed its socket (a FIN): a 100 Continue finds it gone", function()
        local rec, took = closing_client("GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.same({ a = CANCELLED, b = CANCELLED }, rec)
        assert.is_true(took < 3)
    end)

    it("lets an HTTP/1.0 handler finish after a FIN (no interim answer to ask with)", function()
        local rec = closing_client("GET /wait HTTP/1.0\r\n\r\n")
        assert.same({}, rec) -- (3 s of its 10: still sleeping)
    end)

    -- Serves /wait (a gather of one 0.2 s sleep) with app options opts, runs the half-closing
    -- client against it until it exits; returns how the sleep ended and what the client read.
    local function half_close(opts)
        local rec, started = {}, moonlet.event()
        local app = moonlet.app(opts)
        app:get("/wait", function()
            started:set()
            moonlet.gather({ a = sleeper(rec, "a", 0.2) })
            return "answered after the FIN"
        end)
        local server, port = test.serve(app)
        defer(function() server:close() end)
        local p = test.half_closing_client(port, "GET /wait HTTP/1.1\r\nHost: x\r\n\r\n", true)
        defer(function() p:close() end)
        assert.is_true(started:wait(5))
        assert(p:write("x"))
        assert.same(0, p:wait(5))
        return rec.a, p:read("*a")
    end

    it("with check_client_abort, a FIN during the request cancels the handler too", function()
        local how, out = half_close({ check_client_abort = true })
        assert.same(CANCELLED, how)
        assert.same("", out) -- closed without an answer
    end)

    it("without it, a FIN is a half-close: the handler finishes and the client reads the answer",
        function()
            local how, out = half_close()
            assert.same("slept", how)
            -- the 100 Continue that asked whether the client was still there, then the answer
            assert.truthy(out:find("^HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), out)
            assert.truthy(out:find("answered after the FIN", 1, true))
            assert.truthy(out:lower():find("connection: close", 1, true))
        end)
end)
