-- examples/bench_proxy.lua: the app of the proxy section of `make bench` (scripts/bench_proxy.sh).
-- Every GET under /p goes on to the upstream with /p taken off (moonlet.proxy, nginx's
-- `location /p/ { proxy_pass http://up/; }`): GET /p/b answers the upstream's /b as it comes.
--   moonlet examples/bench_proxy.lua --port 8080 --upstream 8081     (or env UPSTREAM=8081)
local moonlet = require "moonlet"

local upstream
for i = 1, #arg do
    local a = arg[i]
    if a == "--upstream" then
        upstream = arg[i + 1]
    elseif a:match("^%-%-upstream=") then
        upstream = a:match("=(.*)$")
    end
end
upstream = tonumber(upstream or os.getenv("UPSTREAM"))
if not upstream then error("usage: moonlet examples/bench_proxy.lua --port N --upstream PORT", 0) end

-- wrk's 64 connections make up to 64 upstream requests at once: keep them all alive (nginx's
-- `keepalive 256`)
moonlet.http.configure({ pool_size = 256 })

local app = moonlet.app()
app:get("/p/*path", moonlet.proxy({ upstream = "http://127.0.0.1:" .. upstream, strip_prefix = "/p" }))
return app
