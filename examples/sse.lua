-- examples/sse.lua: Server-Sent Events. The page opens an EventSource on /events, which sends a
-- numbered tick every second; a browser that reconnects (after a network blip, a server restart)
-- says which tick it saw last (Last-Event-ID) and the count goes on from there.
--   moonlet examples/sse.lua, then open http://127.0.0.1:8080/ (or: curl -N localhost:8080/events)
local moonlet = require "moonlet"
local app = moonlet.app()

local PAGE = [[<!doctype html>
<title>moonlet: server-sent events</title>
<h1>Ticks from the server</h1>
<ul id="log"></ul>
<script>
  const source = new EventSource("/events");
  source.addEventListener("tick", (e) => {
    const li = document.createElement("li");
    li.textContent = "tick " + e.lastEventId + ": " + JSON.parse(e.data).time;
    document.getElementById("log").prepend(li);
  });
</script>
]]

app:get("/", function(_, res) res:type("html"); return PAGE end)

app:get("/events", function(req, res)
    local n = tonumber(req:header("Last-Event-ID")) or 0
    local events = res:sse({ retry = 2000 })        -- reconnect 2 s after a drop
    local every = tonumber(req.query.every) or 1
    for _ = 1, tonumber(req.query.count) or math.huge do
        n = n + 1
        local ok = events:send({ time = os.date("!%H:%M:%S") }, { event = "tick", id = n })
        if not ok then return end                   -- the browser went away
        moonlet.sleep(every)                         -- other requests are served meanwhile
    end
end)

return app
