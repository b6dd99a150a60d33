-- apps/chat/app.lua: a chat served by moonlet alone: the page and its script are static files
-- (public/), the conversation goes over a WebSocket per browser tab at /ws/:room?nick=NAME, and
-- each room is a moonlet.channel. A newcomer gets the last 50 messages of the room, then everyone
-- sees "joined" and "left" notices. Run it with `moonlet apps/chat/app.lua` (--port N), then open
-- http://127.0.0.1:8080/ in two tabs. Building the app has no side effects; the module returns it.
--
-- Wire format (JSON text messages), server to browser:
--   { type = "history", room, messages = { {type = "message", nick, text, time}, ... } }
--   { type = "message", nick, text, time }    { type = "join" | "leave", nick, members, time }
--   { type = "error", text }
-- browser to server: { type = "message", text = "..." } (plain text is taken as a message too)
local moonlet = require "moonlet"
local json = require "moonlet.json"
local trim = require("moonlet.url").trim -- linear in the length: the nick comes from a client

local str_sub, str_match, str_gsub = string.sub, string.match, string.gsub
local remove, time = table.remove, os.time

local HISTORY = 50         -- messages replayed to a newcomer
local MAX_TEXT = 2000      -- bytes of one message
local here = str_match(str_sub(debug.getinfo(1, "S").source, 2), "^(.*)/") or "."

local rooms = {}           -- name -> { history = { ... }, members = n }

local function room_state(name)
    local r = rooms[name]
    if not r then
        r = { history = json.array({}), members = 0 }
        rooms[name] = r
    end
    return r
end

local function clean_nick(nick)
    nick = str_gsub(nick or "", "[%c<>&\"']", "")
    nick = trim(nick)
    if nick == "" then return nil end
    return str_sub(nick, 1, 32)
end

local app = moonlet.app()

app:websocket("/ws/:room", function(ws, req)
    local name = str_sub(req.params.room, 1, 64)
    local nick = clean_nick(req.query.nick)
    if not nick then
        ws:send({ type = "error", text = "choose a nickname" })
        return ws:close(4000, "no nickname")
    end
    local state = room_state(name)
    local room = moonlet.channel("chat:" .. name)
    local sub = room:subscribe({ size = 256 })
    ws:send({ type = "history", room = name, messages = state.history })
    -- the room's messages go to this browser from their own task, while this one reads
    local writer = moonlet.spawn(function()
        for m in sub:messages() do
            if not ws:send(m) then break end
        end
    end)
    state.members = state.members + 1
    room:publish(json.encode({ type = "join", nick = nick, members = state.members, time = time() }))
    for msg in ws:messages() do
        local v = json.decode(msg)
        local text = msg -- plain text is a message too
        if type(v) == "table" then text = v.text elseif v ~= nil then text = nil end
        if type(text) == "string" and text ~= "" then
            local m = { type = "message", nick = nick, text = str_sub(text, 1, MAX_TEXT), time = time() }
            local h = state.history
            h[#h + 1] = m
            if #h > HISTORY then remove(h, 1) end
            room:publish(json.encode(m))
        end
    end
    sub:close()
    writer:cancel()
    state.members = state.members - 1
    room:publish(json.encode({ type = "leave", nick = nick, members = state.members, time = time() }))
end, { ping_interval = 30, idle_timeout = 90 })

-- the page, its script and its style
app:static("/", here .. "/public")

return app
