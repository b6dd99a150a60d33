-- spec/sse_spec.lua: res:sse (Server-Sent Events) over real sockets: the head, the framing of
-- events (names, ids, multi-line data, JSON, comments, retry), each event arriving while the
-- handler still runs, under moonlet.gzip too, a client that leaves ending the handler's sends with
-- "closed" (or, parked on a subscription, cancelled at its FIN, leak-free), the app's deadline not
-- cutting a stream, and misuse raising.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local left = moonlet.event() -- set when /forever's send failed
local left_err

local function serve(gzip)
    local app = moonlet.app()
    if gzip then app:use(moonlet.gzip({ min_length = 1 })) end
    app:get("/events", function(req, res)
        local events = res:sse({ retry = 2500 })
        assert(events:send("hello", { event = "greeting", id = 1 }))
        moonlet.sleep(0.2)
        assert(events:send("two\nlines\r\nand a third", { id = req:header("Last-Event-ID") or "none" }))
        assert(events:comment("beat"))
        assert(events:send({ n = 3 }))
    end)
    app:get("/forever", function(_, res)
        local events = res:sse()
        local _, err = pcall(function()
            while true do
                local ok, e = events:send("tick")
                if not ok then error(e, 0) end
                moonlet.sleep(0.02)
            end
        end)
        left_err = err == moonlet.CANCELLED and "cancelled" or err
        left:set()
        if err == moonlet.CANCELLED then error(err, 0) end -- (re-raised, as cleanup code should)
    end)
    app:get("/misuse", function(_, res)
        res:write("started")
        local ok, err = pcall(res.sse, res)
        res:write(ok and "no error" or tostring(err))
    end)
    app:get("/bad-event", function(_, res)
        local events = res:sse()
        local ok, err = pcall(events.send, events, "x", { event = "a\nb" })
        events:send(ok and "no error" or tostring(err))
        ok, err = pcall(events.send, events, "x", { id = "a\0b" }) -- EventSource would ignore it
        events:send(ok and "no error" or tostring(err))
        ok, err = pcall(events.send, events, "x", { retry = math.huge })
        events:send(ok and "no error" or tostring(err))
        events:send("x", { retry = 1500 })
    end)
    local server, port = test.serve(app)
    test.defer(function() server:close() end)
    return "http://127.0.0.1:" .. port
end

describe("res:sse", function()
    it("sends the head and each event as it is sent, framed for EventSource", function()
        local base = serve()
        local res = assert(moonlet.http.request({ url = base .. "/events", stream = true,
                                                   headers = { ["Last-Event-ID"] = "41" } }))
        assert.same({ 200, "text/event-stream; charset=utf-8", "no-cache", "no" },
                    { res.status, res.headers["content-type"], res.headers["cache-control"],
                      res.headers["x-accel-buffering"] })
        local t0 = moonlet.now()
        local got, first_at = {}, nil
        for chunk in res:chunks() do
            got[#got + 1] = chunk
            if not first_at and table.concat(got):find("hello", 1, true) then first_at = moonlet.now() end
        end
        assert.is_true(first_at - t0 < 0.15) -- before the handler's 0.2 s sleep ended: live
        assert.same("retry: 2500\n\n" .. "event: greeting\nid: 1\ndata: hello\n\n"
                    .. "id: 41\ndata: two\ndata: lines\ndata: and a third\n\n"
                    .. ": beat\n\n" .. 'data: {"n":3}\n\n', table.concat(got))
    end)

    it("is gzipped under moonlet.gzip, each event flushed", function()
        local base = serve(true)
        local res = assert(moonlet.http.get(base .. "/events", { decompress = true }))
        assert.same({ 200, "gzip" }, { res.status, res.headers["content-encoding"] })
        assert.truthy(res.body:find("event: greeting\nid: 1\ndata: hello\n\n", 1, true), res.body)
    end)

    it("ends the handler when the client goes away: cancelled where it waits, or send's 'closed'",
       function()
        local base = serve()
        local res = assert(moonlet.http.request({ url = base .. "/forever", stream = true }))
        local it = res:chunks()
        assert.truthy(it():find(":", 1, true))
        res:close()
        assert.is_true(left:wait(5))
        assert.truthy(left_err == "cancelled" or left_err == "closed", tostring(left_err))
    end)

    it("raises on misuse: a started response, a line break in a field", function()
        local base = serve()
        local r = assert(moonlet.http.get(base .. "/misuse"))
        assert.truthy(r.body:find("the response has started already", 1, true), r.body)
        r = assert(moonlet.http.get(base .. "/bad-event"))
        assert.truthy(r.body:find("event cannot hold a line break", 1, true), r.body)
        assert.truthy(r.body:find("id cannot hold a NUL byte", 1, true), r.body)
        assert.truthy(r.body:find("retry is a number of milliseconds", 1, true), r.body)
        assert.truthy(r.body:find("\nretry: 1500\ndata: x\n\n", 1, true), r.body)
    end)

    it("cancels a handler parked on a subscription when its client closes, and leaks nothing",
       function()
        -- The handler never writes while nothing is published: only the client's FIN can tell it
        -- the client has gone. It does not close its subscription (cancelled in receive): the
        -- subscription goes with the garbage collector.
        local ch = moonlet.channel("spec:sse:quiet")
        local app = moonlet.app()
        app:get("/quiet", function(_, res)
            local events = res:sse()
            for msg in ch:subscribe():messages() do
                if not events:send(msg) then return end
            end
        end)
        local port = test.serving(app)
        local url = "http://127.0.0.1:" .. port .. "/quiet"
        local function visit()
            local res = assert(moonlet.http.request({ url = url, stream = true }))
            assert.truthy(res:chunks()():find(":", 1, true))
            res:close()
        end
        local function gone()
            for _ = 1, 500 do
                collectgarbage()
                if ch:subscribers() == 0 then return true end
                moonlet.sleep(0.01)
            end
        end
        visit()
        assert.is_true(gone(), "the handler still waits after its client closed")
        collectgarbage()
        local before, mem0 = test.settled_stats(), collectgarbage("count")
        for _ = 1, 1000 do visit() end
        assert.is_true(gone())
        collectgarbage()
        collectgarbage()
        test.settled_stats()
        test.assert_baseline(before, mem0, 512)
    end)

    it("is not cut by the app's deadline (a stream lives as long as its client)", function()
        local app = moonlet.app({ deadline = 0.05 })
        local go = moonlet.event()
        app:get("/long", function(_, res)
            local events = res:sse()
            assert(events:send("before"))
            go:wait(5) -- past the deadline
            assert(events:send("after"))
        end)
        app:get("/plain", function() go:wait(5); return "late" end)
        local base = "http://127.0.0.1:" .. test.serving(app)
        assert.same(504, assert(moonlet.http.get(base .. "/plain")).status) -- (the deadline works)
        local res = assert(moonlet.http.request({ url = base .. "/long", stream = true }))
        local it, got = res:chunks(), ""
        while not got:find("before", 1, true) do got = got .. assert(it()) end
        moonlet.sleep(0.1)
        go:set()
        for chunk in it do got = got .. chunk end
        assert.same(":\n\ndata: before\n\ndata: after\n\n", got)
    end)
end)
