-- spec/sse_spec.lua: res:sse (Server-Sent Events) over real sockets: the head, the framing of
-- events (names, ids, multi-line data, JSON, comments, retry), each event arriving while the
-- handler still runs, under moonlet.gzip too, a client that leaves ending the handler's sends with
-- "closed", and misuse raising.
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
    end)
end)
