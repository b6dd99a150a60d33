-- examples/embed/game_loop.lua: the app examples/embed/game_loop.c serves from inside its frame
-- loop. `game` is the host module the C side registers (moonlet_register): it reads the world and
-- queues spawns, which the simulation applies at its next tick. SIGHUP to game_loop reloads this
-- file (moonlet_reload) while the game runs.
--
-- The world goes out two ways: GET /world (JSON, once) and the WebSocket /live (JSON, pushed every
-- PUSH_FRAMES frames while the world changes). One broadcaster task encodes each state once and
-- publishes it to a channel; each client has a bounded subscription (QUEUE states) and a writer
-- task. The frame loop never waits for a client: publish never waits, ws:send waits only in the
-- client's own writer (while 256 KiB are unread), and a client that falls QUEUE states behind is
-- closed with 1008 (it reconnects and starts from the latest state), so a slow client costs at most
-- its 256 KiB and QUEUE states of memory. The broadcaster runs while anyone is subscribed.
local moonlet = require "moonlet"
local game = require "game"

local json = moonlet.json
local pairs, type, tonumber, tostring = pairs, type, tonumber, tostring

local PUSH_FRAMES = 6 -- every 6 frames of the 60 Hz simulation: 10 states a second
local TICK_HZ = 60
local QUEUE = 10      -- states a client may fall behind (1 s) before it is closed

local app = moonlet.app()

local function world()
    local w = game.world()
    json.array(w.entities)
    return w
end

-- The spawn command, from POST /spawn or a WebSocket message: status, result.
local function spawn(p)
    if type(p) ~= "table" then return 400, { error = "the body is a JSON object" } end
    local id, err = game.spawn(tonumber(p.x) or 50, tonumber(p.y) or 50, tonumber(p.vx) or 0,
                               tonumber(p.vy) or 0)
    if not id then return 503, { error = err } end
    return 201, { id = id, frame = game.frame() }
end

-- syntax: GET /world -- { frame, time, entities = [ { id, x, y, vx, vy }, ... ] }
app:get("/world", function()
    return world()
end)

-- syntax: POST /spawn {"x": 10, "y": 20, "vx": 5, "vy": -3} -- 201 { id, frame }; the entity
-- appears at the next tick
app:post("/spawn", function(req)
    local body = req:body()
    local ok, p = true, {}
    if body ~= "" then ok, p = pcall(json.decode, body) end
    return spawn(ok and p or nil)
end)

-- -- The live feed ----------------------------------------------------------------------------

-- one channel per app value: after a reload, the clients of the old code keep its broadcaster
local feed = moonlet.channel("game_loop.world " .. tostring(app))
local broadcasting = false
local clients = {} -- ws -> its subscription

local function world_message()
    local w = world()
    w.type = "world"
    return json.encode(w)
end

-- Publishes the world every PUSH_FRAMES frames when it changed, while anyone is subscribed.
local function broadcast()
    local ok, err = pcall(function()
        local last = -1
        while feed:subscribers() > 0 do
            local frame = game.frame()
            if frame ~= last then
                last = frame
                feed:publish(world_message())
                for ws, sub in pairs(clients) do
                    if sub.dropped > 0 then -- its writer still waits in ws:send: QUEUE behind
                        clients[ws] = nil
                        sub:close()
                        moonlet.log("warn", "live: closing a client ", QUEUE, " states behind")
                        ws:close(1008, "too slow: fell behind the world")
                    end
                end
            end
            moonlet.sleep(PUSH_FRAMES / TICK_HZ)
        end
    end)
    broadcasting = false -- the next client starts another one, whatever ended this one
    if not ok then error(err, 0) end
end

-- One client's writer: every state published (the first within PUSH_FRAMES frames), until the
-- client or the subscription closes.
local function writer(ws, sub)
    for msg in sub:messages() do
        if not ws:send(msg) then return end
    end
end

-- syntax: WebSocket /live -- pushes {"type": "world", frame, time, entities} 10 times a second;
-- a text message {"type": "spawn", "x": 10, "y": 20, "vx": 5, "vy": -3} (POST /spawn's body, the
-- type optional) spawns an entity and is answered {"type": "spawned", id, frame} or
-- {"type": "error", status, error}
app:websocket("/live", function(ws)
    local sub = feed:subscribe({ size = QUEUE }) -- drop_oldest: sub.dropped says it fell behind
    clients[ws] = sub
    if not broadcasting then
        broadcasting = true
        moonlet.spawn(broadcast)
    end
    local w = moonlet.spawn(writer, ws, sub)
    local ok, err = pcall(function()
        for msg in ws:messages() do
            local okd, p = pcall(json.decode, msg)
            local status, r
            if not okd or type(p) ~= "table" then
                status, r = 400, { error = "a message is a JSON object" }
            elseif p.type ~= nil and p.type ~= "spawn" then
                status, r = 400, { error = "unknown type: " .. tostring(p.type) }
            else
                status, r = spawn(p)
            end
            r.type = status == 201 and "spawned" or "error"
            if status ~= 201 then r.status = status end
            if not ws:send(r) then break end
        end
    end)
    clients[ws] = nil
    sub:close() -- on every path: it ends the writer
    w:join(1)
    if not ok then error(err, 0) end
end)

return app
