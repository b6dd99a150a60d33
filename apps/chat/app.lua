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

local str_sub, str_match, str_gsub, byte = string.sub, string.match, string.gsub, string.byte
local remove, time = table.remove, os.time
local valid_utf8 = moonlet.ws.valid_utf8

local HISTORY = 50         -- messages replayed to a newcomer
local MAX_TEXT = 2000      -- bytes of one message
local MAX_ROOMS = 1000     -- rooms kept at once: an empty one is forgotten to make room
local here = str_match(str_sub(debug.getinfo(1, "S").source, 2), "^(.*)/") or "."

local rooms, nrooms = {}, 0 -- name -> { history = { ... }, members = n }

-- The room's state, made when new: nil when MAX_ROOMS rooms all have members.
local function room_state(name)
    local r = rooms[name]
    if r then return r end
    if nrooms >= MAX_ROOMS then -- forget an empty room (its history goes with it)
        for k, v in pairs(rooms) do
            if v.members == 0 then
                rooms[k], nrooms = nil, nrooms - 1
                break
            end
        end
        if nrooms >= MAX_ROOMS then return nil end
    end
    r = { history = json.array({}), members = 0 }
    rooms[name], nrooms = r, nrooms + 1
    return r
end

-- s cut to at most n bytes, never inside a UTF-8 sequence: a cut one would make the JSON that
-- carries it invalid UTF-8, which no WebSocket text message may hold (ws:send refuses it)
local function cut(s, n)
    if #s <= n then return s end
    local b = byte(s, n + 1)
    while n > 0 and b >= 0x80 and b < 0xC0 do -- n + 1 continues a sequence: cut before its start
        b = byte(s, n)
        n = n - 1
    end
    return str_sub(s, 1, n)
end

local function clean_nick(nick)
    nick = str_gsub(nick or "", "[%c<>&\"']", "")
    nick = trim(nick)
    if nick == "" or not valid_utf8(nick) then return nil end -- (the URL's bytes may be anything)
    return cut(nick, 32)
end

local app = moonlet.app()

app:websocket("/ws/:room", function(ws, req)
    local name = req.params.room
    if not valid_utf8(name) then return ws:close(4000, "bad room name") end
    name = cut(name, 64)
    local nick = clean_nick(req.query.nick)
    if not nick then
        ws:send({ type = "error", text = "choose a nickname" })
        return ws:close(4000, "no nickname")
    end
    local state = room_state(name)
    if not state then
        ws:send({ type = "error", text = "too many rooms" })
        return ws:close(4001, "too many rooms")
    end
    local room = moonlet.channel("chat:" .. name)
    local sub = room:subscribe({ size = 256 })
    ws:send({ type = "history", room = name, messages = state.history })
    -- the room's messages go to this browser from their own task, while this one reads
    local writer = moonlet.spawn(function()
        for m in sub:messages() do
            local ok, err = ws:send(m)
            if not ok then -- gone; or, should a message ever fail, a closed tab, not a deaf one
                if err ~= "closed" then ws:close(1011, "send failed") end
                break
            end
        end
    end)
    state.members = state.members + 1
    room:publish(json.encode({ type = "join", nick = nick, members = state.members, time = time() }))
    for msg in ws:messages() do
        local v = json.decode(msg)
        local text = msg -- plain text is a message too
        if type(v) == "table" then text = v.text elseif v ~= nil then text = nil end
        -- (a binary frame, or a JSON "\ud800", may hold what no text message can carry)
        if type(text) == "string" and text ~= "" and valid_utf8(text) then
            local m = { type = "message", nick = nick, text = cut(text, MAX_TEXT), time = time() }
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
