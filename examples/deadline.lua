-- examples/deadline.lua: a request deadline and structured concurrency. GET /report fetches two
-- upstreams at once (moonlet.gather) under a route deadline of 0.5 s. No timeout is passed to
-- the fetches: when the deadline passes, the request is cancelled where it waits, the fetches
-- still running are cancelled with it (their connections closed), and the client gets 504.
-- ?slow=0 makes both upstreams fast, and the report comes back whole. The upstreams are demo
-- routes of this same app, served on a second, free port so that it works offline.
--   moonlet examples/deadline.lua --port 8080
--   curl -i localhost:8080/report           → 504 after 0.5 s (the slow upstream takes 2 s)
--   curl localhost:8080/report?slow=0       → {"prices":{...},"stock":{...}}
--   curl localhost:8080/cancelled           → how many upstream fetches the deadline cancelled
local moonlet = require "moonlet"

local app = moonlet.app()
local cancelled = 0

app:get("/demo/prices", function() return { coffee = 2.5, tea = 2 } end)
app:get("/demo/stock", function(req)
    moonlet.sleep(tonumber(req.query.delay) or 0)
    return { coffee = 12, tea = 0 }
end)

local _, port = assert(app:listen({ host = "127.0.0.1", port = 0 }))
local base = "http://127.0.0.1:" .. port

-- A fetch that counts its own cancellation: moonlet.CANCELLED goes through it, as any error would.
local function fetch(url)
    local ok, res, err = pcall(moonlet.http.get, url)
    if not ok then
        if res == moonlet.CANCELLED then cancelled = cancelled + 1 end
        error(res, 0)
    end
    if not res then return nil, err end
    return moonlet.json.decode(res.body)
end

app:get("/report", function(req)
    local delay = req.query.slow == "0" and 0 or 2
    local r, errors = moonlet.gather({
        prices = function() return fetch(base .. "/demo/prices") end,
        stock = function() return fetch(base .. "/demo/stock?delay=" .. delay) end,
    })
    if next(errors) then return 502, { errors = errors } end
    return { prices = r.prices, stock = r.stock }
end, { deadline = 0.5 })

app:get("/cancelled", function() return { cancelled = cancelled } end)

return app
