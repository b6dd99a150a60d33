-- examples/proxy.lua: a reverse proxy (moonlet.proxy, nginx's proxy_pass). Every request under /api
-- goes on to the upstream with /api taken off, whatever its method, body included; the answer
-- comes back as the upstream sends it, streamed. The rest is served here.
-- The upstream: the script's argument, or env UPSTREAM; without one, a demo upstream in this
-- process (GET /hello, /count: a line every 0.2 s, to watch a stream come through, and /echo: a
-- WebSocket that echoes, which the proxy carries as well).
--   moonlet examples/proxy.lua --port 8080 http://127.0.0.1:9000
--   curl -i 'localhost:8080/api/hello?name=ada'      curl -N localhost:8080/api/count
--   websocat ws://localhost:8080/api/echo (or new WebSocket("ws://localhost:8080/api/echo"))
local moonlet = require "moonlet"

local upstream = os.getenv("UPSTREAM")
for i = 1, #arg do
    if arg[i]:match("^https?://") then upstream = arg[i] end
end

if not upstream then -- the demo upstream, on a free port of this machine
    local demo = moonlet.app()
    demo:get("/hello", function(req)
        return { hello = req.query.name or "world", via = req:header("X-Forwarded-For") }
    end)
    demo:get("/count", function(_, res)
        for i = 1, 5 do
            res:write(i .. "\n")
            moonlet.sleep(0.2)
        end
    end)
    demo:websocket("/echo", function(ws)
        for msg, kind in ws:messages() do ws:send(msg, kind) end
    end)
    local _, port = assert(demo:listen({ host = "127.0.0.1", port = 0 }))
    upstream = "http://127.0.0.1:" .. port
end

local app = moonlet.app()
app:any("/api/*path", moonlet.proxy({ upstream = upstream, strip_prefix = "/api", timeout = 30 }))
app:get("/", function() return "moonlet in front of " .. upstream .. ": try /api/...\n" end)
return app
