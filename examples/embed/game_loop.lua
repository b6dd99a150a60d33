-- examples/embed/game_loop.lua: the app examples/embed/game_loop.c serves from inside its frame
-- loop. `game` is the host module the C side registers (moonlet_register): it reads the world and
-- queues spawns, which the simulation applies at its next tick. SIGHUP to game_loop reloads this
-- file (moonlet_reload) while the game runs.
local moonlet = require "moonlet"
local game = require "game"

local json = moonlet.json
local type, tonumber = type, tonumber

local app = moonlet.app()

-- syntax: GET /world -- { frame, time, entities = [ { id, x, y, vx, vy }, ... ] }
app:get("/world", function()
    local w = game.world()
    json.array(w.entities)
    return w
end)

-- syntax: POST /spawn {"x": 10, "y": 20, "vx": 5, "vy": -3} -- 201 { id, frame }; the entity
-- appears at the next tick
app:post("/spawn", function(req)
    local body = req:body()
    local p = body == "" and {} or json.decode(body)
    if type(p) ~= "table" then return 400, { error = "the body is a JSON object" } end
    local id, err = game.spawn(tonumber(p.x) or 50, tonumber(p.y) or 50, tonumber(p.vx) or 0,
                               tonumber(p.vy) or 0)
    if not id then return 503, { error = err } end
    return 201, { id = id, frame = game.frame() }
end)

return app
