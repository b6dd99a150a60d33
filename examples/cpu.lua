-- examples/cpu.lua: CPU-bound work off the event loop. GET /hash runs a heavy pure-Lua hash on
-- libuv's thread pool (moonlet.work, in a worker Lua state of its own) while the handler's task
-- yields; GET /ping keeps answering at once meanwhile.
--   moonlet examples/cpu.lua --port 8080
--   curl 'localhost:8080/hash?n=3000000' &  curl localhost:8080/ping   → pong, before the hash
local moonlet = require "moonlet"

-- runs in a worker state: no upvalues, everything it needs comes as arguments
local function slow_hash(s, rounds)
    local h = 5381
    for i = 1, rounds do
        h = (h * 33 + s:byte(i % #s + 1)) % 4294967296
    end
    return ("%08x"):format(h)
end

local app = moonlet.app()

app:get("/ping", function() return "pong" end)

app:get("/hash", function(req)
    local n = tonumber(req.query.n) or 20000000
    local t0 = moonlet.now()
    local digest, err = moonlet.work(slow_hash, req.query.s or "moonlet", n)
    if not digest then return { error = err } end
    return { hash = digest, rounds = n, secs = moonlet.now() - t0 }
end)

return app
