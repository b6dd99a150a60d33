-- examples/fanout.lua: the app of the benchmark's fan-out scenario (make bench, peers.sh's
-- --extra-fanout). GET /fanout fetches /a, /b and /c from the upstream at the same time with
-- moonlet.http (keep-alive pool) and answers with the three body sizes: "64,1024,4096".
--   moonlet examples/fanout.lua --port 8080 --upstream 8081     (or env UPSTREAM=8081)
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
if not upstream then error("usage: moonlet examples/fanout.lua --port N --upstream PORT", 0) end

local http = moonlet.http
-- wrk's 64 connections make up to 192 upstream requests at once: keep that many alive
http.configure({ pool_size = 256 })

local base = "http://127.0.0.1:" .. upstream
local ua, ub, uc = base .. "/a", base .. "/b", base .. "/c"
local function size(res, err)
    if not res then error("upstream: " .. tostring(err), 0) end
    return #res.body
end

local app = moonlet.app()

-- The three fetches are made once, not as closures in the handler: LuaJIT 2.1 does not compile
-- the making of a closure (bytecode FNEW), and a handler that makes one runs in the interpreter,
-- with everything it calls up to the first wait (callgrind: 42.5k -> 39.1k instructions a fan-out).
local function get_a() return size(http.get(ua)) end
local function get_b() return size(http.get(ub)) end
local function get_c() return size(http.get(uc)) end

app:get("/fanout", function()
    local sizes, errors = moonlet.gather({ get_a, get_b, get_c })
    if next(errors) then
        return 502, "upstream failed: " .. tostring(errors[1] or errors[2] or errors[3]) .. "\n"
    end
    return sizes[1] .. "," .. sizes[2] .. "," .. sizes[3]
end)

app:get("/", function() return "Hello, World!" end)

return app
