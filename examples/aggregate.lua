-- examples/aggregate.lua: one request, several upstreams at once. GET /aggregate fetches every
-- upstream in parallel (moonlet.gather) and each within its own deadline (moonlet.timeout): a slow
-- upstream becomes { error = "timeout" } in the JSON answer instead of a hung request.
-- Upstreams: the script's arguments, or env UPSTREAMS (comma-separated URLs); by default three
-- demo routes of this same app, /demo/users, /demo/orders and /demo/slow (2 s), so it works
-- offline. env UPSTREAM_TIMEOUT: the per-upstream deadline in seconds (0.5).
--   moonlet examples/aggregate.lua --port 8080
--   curl localhost:8080/aggregate
--   → {"secs":0.5,"upstreams":{"users":{"status":200,"body":[...]},"orders":{...},
--      "slow":{"error":"timeout"}}}
local moonlet = require "moonlet"
local json = moonlet.json

local per_upstream = tonumber(os.getenv("UPSTREAM_TIMEOUT")) or 0.5

local upstreams = {}
for i = 1, #arg do
    if arg[i]:match("^https?://") then upstreams[#upstreams + 1] = arg[i] end
end
for url in (os.getenv("UPSTREAMS") or ""):gmatch("[^,%s]+") do upstreams[#upstreams + 1] = url end

local app = moonlet.app()

app:get("/demo/users", function() return { { id = 1, name = "anton" }, { id = 2, name = "bea" } } end)
app:get("/demo/orders", function() return { { id = 7, item = "coffee" } } end)
app:get("/demo/slow", function()
    moonlet.sleep(2)
    return { late = true }
end)

-- No upstreams given: the demo routes, served by this same app on a second, free port (the main
-- port is only known once the command line serves the app).
if #upstreams == 0 then
    local _, port = assert(app:listen({ host = "127.0.0.1", port = 0 }))
    local base = "http://127.0.0.1:" .. port
    upstreams = { base .. "/demo/users", base .. "/demo/orders", base .. "/demo/slow" }
end

app:get("/aggregate", function()
    local urls = upstreams
    local fns = {}
    for _, url in ipairs(urls) do
        local name = url:match("([^/]+)/?$") or url
        fns[name] = function()
            local res, err = moonlet.timeout(per_upstream, moonlet.http.get, url)
            if not res then return { error = tostring(err) } end
            local ok, doc = pcall(json.decode, res.body)
            return { status = res.status, body = ok and doc or res.body }
        end
    end
    local t0 = moonlet.now()
    local results = moonlet.gather(fns)
    return { upstreams = results, secs = moonlet.now() - t0 }
end)

return app
