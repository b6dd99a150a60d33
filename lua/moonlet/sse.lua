-- lua/moonlet/sse.lua: Server-Sent Events (the HTML "EventSource" stream) over res:write: the
-- head (text/event-stream, no caching, no proxy buffering) and the framing of each event, so that
-- a handler only sends. Each event is one res:write, so it reaches the browser at once (under
-- moonlet.gzip too: every write is flushed) and the handler yields while the client is slow.
--
--   local events = res:sse({ retry = 5000 })
--   events:send({ price = 42 }, { event = "tick", id = 7 })   -- a table is sent as JSON
--   events:comment("keep-alive")                              -- ignored by EventSource
--
-- The stream ends when the handler returns. A client that goes away cancels the handler where it
-- waits (a sleep, a queue: as any request's), or makes send return nil, "closed" (then return).
-- A client's FIN counts as gone (an EventSource never sends after its request), so a handler
-- parked on a subscription with nothing to send is cancelled at once, not at its next write. The
-- app's deadline does not bound a stream: res:sse lifts it, as a WebSocket session is unbounded.
-- The client's last seen id, on a reconnection, is req:header("Last-Event-ID").
local json = require "moonlet.json"

local app = require "moonlet.app"

local str_find, str_gsub, concat, tostring, type = string.find, string.gsub, table.concat, tostring, type
local huge = math.huge

local _M = {}
local methods = {}
local mt = { __name = "moonlet.sse", __index = methods }

local function field(name, v)
    v = tostring(v)
    if str_find(v, "[\r\n]") then error("moonlet.sse: " .. name .. " cannot hold a line break", 3) end
    -- EventSource ignores an id field that holds a NUL (the HTML standard): refused rather than lost
    if name == "id" and str_find(v, "%z") then error("moonlet.sse: id cannot hold a NUL byte", 3) end
    return v
end

local function check_retry(retry)
    if retry ~= nil and (type(retry) ~= "number" or not (retry >= 0 and retry < huge)) then
        error("moonlet.sse: retry is a number of milliseconds", 3)
    end
    return retry
end

-- syntax: events = res:sse({ retry = milliseconds }) -- starts the stream (its head goes out now)
function _M.open(res, opts)
    if res:started() then error("moonlet.sse: the response has started already", 3) end
    opts = opts or {}
    local retry = check_retry(opts.retry)
    app.lift_deadline(res)
    local x = res._x
    if x then x:cancel_on_hangup() end
    res:type("text/event-stream; charset=utf-8")
    res:header("Cache-Control", "no-cache")
    res:header("X-Accel-Buffering", "no") -- nginx in front: pass each event on at once
    local ok, err = res:write(retry and ("retry: %d\n\n"):format(retry) or ":\n\n")
    local self = setmetatable({ res = res }, mt)
    if not ok then self.closed = err end
    return self
end

-- syntax: ok, err = events:send(data, { event = name, id = id, retry = ms }) -- data: a string (its
-- lines become data: lines) or a table (JSON); nil, "closed" once the client is gone
function methods:send(data, o)
    if self.closed then return nil, self.closed end
    if type(data) == "table" then data = json.encode(data) end
    data = tostring(data == nil and "" or data)
    local parts, n = {}, 0
    if o then
        if o.event ~= nil then n = n + 1; parts[n] = "event: " .. field("event", o.event) .. "\n" end
        if o.id ~= nil then n = n + 1; parts[n] = "id: " .. field("id", o.id) .. "\n" end
        if o.retry ~= nil then n = n + 1; parts[n] = ("retry: %d\n"):format(check_retry(o.retry)) end
    end
    n = n + 1
    parts[n] = "data: " .. str_gsub(str_gsub(data, "\r\n?", "\n"), "\n", "\ndata: ") .. "\n\n"
    local ok, err = self.res:write(concat(parts))
    if not ok then self.closed = err end
    return ok, err
end

-- syntax: ok, err = events:comment(text) -- a comment line (a heartbeat through idle proxies)
function methods:comment(text)
    if self.closed then return nil, self.closed end
    local lines = str_gsub(tostring(text or ""), "\r\n?", "\n")
    local ok, err = self.res:write(": " .. str_gsub(lines, "\n", "\n: ") .. "\n\n")
    if not ok then self.closed = err end
    return ok, err
end

return _M
