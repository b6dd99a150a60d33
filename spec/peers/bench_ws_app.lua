-- spec/peers/bench_ws_app.lua: the moonlet side of the WebSocket benchmark (scripts/bench.sh):
--   /echo  echoes every message          /sub  subscribes to channel "bench" and forwards it
--   /pub   publishes every message it receives on "bench"
-- A /sub connection gets "ready" once subscribed, so the load generator knows when all are in.
local moonlet = require "moonlet"

local app = moonlet.app()
local opts = { ping_interval = 0, idle_timeout = 0 } -- the benchmark measures idle memory

app:websocket("/echo", function(ws)
    for msg, kind in ws:messages() do ws:send(msg, kind) end
end, opts)

app:websocket("/sub", function(ws)
    local sub = moonlet.channel("bench"):subscribe({ size = 1024 })
    ws:send("ready")
    moonlet.spawn(function() for m in sub:messages() do ws:send(m) end end)
    for _ in ws:messages() do end
    sub:close()
end, opts)

app:websocket("/pub", function(ws)
    local ch = moonlet.channel("bench")
    for msg in ws:messages() do ch:publish(msg) end
end, opts)

return app
