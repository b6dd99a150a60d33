-- scripts/chaos/waits.lua: an app of scripts/chaos.py whose handlers wait in every kind of wait
-- (sleep, timeout, any, gather, spawn/join, the thread pool through moonlet.work and moonlet.fs,
-- an HTTP fetch, a raw TCP receive, a request body) under route deadlines short enough to cancel
-- them there. The upstream (scripts/chaos/upstream.lua) is env UPSTREAM, a port. GET /ok says "ok".
local moonlet = require "moonlet"
local fs = moonlet.fs

local upstream = tonumber(os.getenv("UPSTREAM")) or 1
local base = "http://127.0.0.1:" .. upstream
local dir = os.getenv("CHAOS_DIR") or "/tmp"

local app = moonlet.app()

-- no upvalues: sent to a worker state
local function spin(ms)
    local t = os.clock()
    local x = 0
    while os.clock() - t < ms / 1000 do x = x + 1 end
    return x
end

local function num(req, name, default)
    return tonumber(req.query[name]) or default
end

local seq = 0
local function tmpname()
    seq = seq + 1
    return dir .. "/f" .. seq % 64
end

local function fs_round(size)
    local path = tmpname()
    assert(fs.write(path, string.rep("z", size)))
    local data = fs.read(path)
    fs.stat(path)
    fs.list(dir)
    fs.append(path, "tail")
    fs.remove(path)
    return data and #data or 0
end

local function fetch(path)
    local res, err = moonlet.http.get(base .. path, { timeout = 2 })
    if not res then return nil, err end
    return #res.body
end

app:get("/ok", function() return "ok" end)

app:get("/sleep", function(req)
    moonlet.sleep(num(req, "t", 0.1))
    return "slept"
end, { deadline = 0.05 })

app:get("/timeout", function(req)
    local r, err = moonlet.timeout(num(req, "t", 0.02), moonlet.sleep, num(req, "s", 0.1))
    return tostring(r) .. " " .. tostring(err)
end, { deadline = 0.05 })

app:get("/any", function(req)
    local r, err = moonlet.any({
        function() moonlet.sleep(num(req, "t", 0.03)) return "sleep" end,
        function() return fetch("/a") end,
        function() return moonlet.work(spin, num(req, "ms", 20)) end,
        function() return fs_round(4096) end,
    })
    return tostring(r) .. " " .. tostring(err)
end, { deadline = 0.05 })

app:get("/gather", function(req)
    local r, errors = moonlet.gather({
        function() moonlet.sleep(num(req, "t", 0.03)) return 1 end,
        function() return fetch("/b") end,
        function() return moonlet.work(spin, num(req, "ms", 20)) end,
        function() return fs_round(65536) end,
        function() return moonlet.timeout(0.01, moonlet.work, spin, 30) end,
    })
    return tostring(#r) .. " " .. tostring(next(errors))
end, { deadline = 0.05 })

app:get("/work", function(req)
    return tostring(moonlet.work(spin, num(req, "ms", 40)))
end, { deadline = 0.05 })

app:get("/fs", function(req)
    return tostring(fs_round(num(req, "size", 1048576)))
end, { deadline = 0.05 })

app:get("/spawn", function(req)
    local t = moonlet.spawn(function() moonlet.sleep(num(req, "t", 0.2)) return 1 end)
    local u = moonlet.spawn(function() return moonlet.work(spin, 10) end)
    if req.query.cancel then t:cancel() end
    return tostring(t:join(0.03)) .. tostring(u:join())
end, { deadline = 0.05 })

app:get("/fetch", function(req)
    return tostring(fetch(req.query.p or "/a"))
end, { deadline = 0.05 })

app:get("/tcp", function()
    local sock, err = moonlet.tcp.connect("127.0.0.1", upstream, { timeout = 1 })
    if not sock then return 502, err end
    sock:send("GET /count?n=10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local data = sock:receive("*a")
    sock:close()
    return tostring(data and #data)
end, { deadline = 0.05 })

app:post("/body", function(req)
    local n = 0
    for piece in req:chunks() do
        n = n + #piece
        if req.query.work then moonlet.work(spin, 5) end
    end
    return tostring(n)
end, { deadline = 0.1 })

-- shared by every request of this load: a semaphore of 2, a queue and a channel
local sem = moonlet.semaphore(2)
local queue = moonlet.queue(4)
local news = moonlet.channel("chaos")

app:get("/sem", function(req)
    local ok, err = sem:acquire(1)
    if not ok then return 503, err end
    local done, e = pcall(moonlet.sleep, num(req, "t", 0.03))
    sem:release()
    if not done then error(e, 0) end
    return "sem"
end, { deadline = 0.05 })

app:get("/queue", function(req)
    if req.query.put then
        return tostring(queue:put(req.query.put, 0.1))
    end
    return tostring(queue:get(0.1))
end, { deadline = 0.05 })

-- A keep-alive comment every 0.5 s without news, as an SSE endpoint should: a client that sent a
-- request pipelined behind this one and then its FIN may still read (a half-close), so the server
-- keeps the stream until a write fails (core/http_conn.c: an EOF behind stashed requests waits).
app:get("/events", function(_, res)
    local sub = news:subscribe({ size = 16 })
    local events = res:sse()
    local ok = events:send("hello")
    while ok do
        local m, err = sub:receive(0.5)
        if m then
            ok = events:send(m)
        elseif err == "timeout" then
            ok = events:comment("")
        else
            break
        end
    end
    sub:close()
end)

app:get("/publish", function(req)
    news:publish(req.query.m or "news")
    return "published"
end)

app:websocket("/ws", function(ws)
    local sub = news:subscribe({ size = 16 })
    local writer = moonlet.spawn(function()
        for m in sub:messages() do
            if not ws:send(m) then break end
        end
    end)
    for msg in ws:messages() do
        news:publish(msg)
        moonlet.work(spin, 1)
    end
    sub:close()
    writer:cancel()
end)

return app
