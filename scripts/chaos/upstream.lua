-- scripts/chaos/upstream.lua: the upstream of scripts/chaos.py (for examples/fanout.lua,
-- examples/proxy.lua and waits.lua). /a /b /c answer 64, 1024 and 4096 bytes, one in ten after
-- 0.2 to 1 s; /hello; /count?n= streams a line every 20 ms; /big streams 1 MiB; POST /upload
-- reads its body piece by piece; /echo is a WebSocket that echoes ("bye" ends it from this side);
-- /tunnel answers an "Upgrade: echo/1" with a 101 and echoes raw bytes (moonlet.proxy's upgrade
-- tunnel; "bye" ends it from this side).
-- math.random is seeded from env CHAOS_SEED, so that a run can be repeated.
local moonlet = require "moonlet"

math.randomseed(tonumber(os.getenv("CHAOS_SEED")) or 1)
local random = math.random

local app = moonlet.app()
local sizes = { a = 64, b = 1024, c = 4096 }

app:get("/:name", function(req)
    local n = sizes[req.params.name]
    if not n then
        if req.params.name == "hello" then return { hello = req.query.name or "world" } end
        return 404, "no such thing\n"
    end
    if random() < 0.1 then moonlet.sleep(0.2 + random() * 0.8) end
    return string.rep(req.params.name, n)
end)

app:get("/count", function(req, res)
    for i = 1, tonumber(req.query.n) or 10 do
        if not res:write(i .. "\n") then return end
        moonlet.sleep(0.02)
    end
end)

local chunk = string.rep("x", 16384)
app:get("/big", function(_, res)
    for _ = 1, 64 do
        if not res:write(chunk) then return end
    end
end)

app:post("/upload", function(req)
    local n, pieces = 0, 0
    for piece in req:chunks() do
        n, pieces = n + #piece, pieces + 1
    end
    return { bytes = n, pieces = pieces }
end)

app:websocket("/echo", function(ws)
    for msg, kind in ws:messages() do
        if msg == "bye" then return end
        ws:send(msg, kind)
    end
end)

app:get("/tunnel", function(req, res)
    local conn = require("moonlet.ws").accept_raw(req, "Upgrade: echo/1\r\nConnection: Upgrade\r\n")
    if not conn then return 400, "no upgrade\n" end
    res._on_send = false -- (the 101 went out: as app:websocket's)
    while true do
        local data = conn:receive()
        if not data or data:find("bye", 1, true) then break end
        if not conn:send(data, "binary") then break end
    end
    conn:close()
end)

return app
