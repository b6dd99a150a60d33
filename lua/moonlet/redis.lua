-- lua/moonlet/redis.lua: moonlet.redis, a Redis client speaking RESP over moonlet.tcp sockets
-- (docs/data.md says why this beat hiredis here: the measurement is there).
--
-- One client is one connection that many tasks use at once: each call writes its command at
-- once and waits for its own reply, and a reader task (while replies are awaited) hands them out
-- in the order the commands went (Redis answers in order), so concurrent calls pipeline themselves.
-- A call that times out or is cancelled only gives up its place: its reply is read and dropped
-- when it comes, so the connection stays in step. A connection that closes fails every call
-- waiting on it with nil, "closed"; the next call connects again. Blocking commands (BLPOP, ...)
-- hold up the calls queued behind them: give them a client of their own. MULTI/EXEC belongs in
-- a pipeline, whose commands go out in one write and so are never interleaved with others'.
local core = require "moonlet.core"
local json = require "moonlet.json"
local task = require "moonlet.task"
local tcp = require "moonlet.tcp"

local park, spawn = task.park, core.spawn
local running, unpark, now = core.running, core.unpark, core.now
local byte, sub, str_find, concat = string.byte, string.sub, string.find, table.concat
local error, pcall, select, setmetatable, tonumber, tostring, type = error, pcall, select,
    setmetatable, tonumber, tostring, type
local remove, unpack = table.remove, unpack

local _M = { _VERSION = "0.1.0" }

-- syntax: redis.null -- a nil inside an array reply (MGET of a missing key): moonlet.json.null
-- (cjson.null), as OpenResty's ngx.null is, so that a reply encodes to JSON with its nulls
local null = json.null
_M.null = null

local client_methods, pipe_methods, sub_methods, pool_methods = {}, {}, {}, {}
local client_mt = { __name = "moonlet.redis.client", __index = client_methods }
local pipe_mt = { __name = "moonlet.redis.pipeline", __index = pipe_methods }
local sub_mt = { __name = "moonlet.redis.subscription", __index = sub_methods }
local pool_mt = { __name = "moonlet.redis.pool", __index = pool_methods }

local OK, ERR = 1, 2

-- -- RESP ----------------------------------------------------------------------------------------

-- Appends the command (strings, numbers, int64_t/uint64_t cdata) to parts, as a RESP array of bulk strings.
local function encode(parts, n, ...)
    local k = #parts
    k = k + 1
    parts[k] = "*" .. n .. "\r\n"
    for i = 1, n do
        local a = select(i, ...)
        local ta = type(a)
        if ta == "number" then
            a = tostring(a)
        elseif ta == "cdata" and tostring(a):match("^%-?%d+U?LL$") then
            a = tostring(a):match("^(%-?%d+)") -- LuaJIT's 1LL, 2ULL: their digits, exactly
        elseif ta ~= "string" then
            error("moonlet.redis: command arguments are strings or numbers, got " .. ta, 4)
        end
        parts[k + 1] = "$" .. #a .. "\r\n"
        parts[k + 2] = a
        parts[k + 3] = "\r\n"
        k = k + 3
    end
    return parts
end

-- What a reply may announce: Redis's own limits (proto-max-bulk-len 512 MB, arrays of at most
-- 2^32 - 1 elements) and ours (arrays nested at most 64 deep: read_reply recurses). Beyond them,
-- or a length that is no plain integer (-1 alone for nil), the stream is not RESP and the
-- connection is dropped with "protocol error" rather than trusted.
local MAX_BULK, MAX_ARRAY, MAX_DEPTH = 512 * 1024 * 1024, 4294967295, 64

local function length(rest, max)
    if rest == "-1" then return -1 end
    if not str_find(rest, "^%d+$") then return nil end
    local n = tonumber(rest)
    if n > max then return nil end
    return n
end

-- Reads one reply: OK, value | ERR, message | nil, I/O error. Arrays hold null for nil and
-- { err = message } for error replies.
local function read_reply(sock, depth)
    local line, err = sock:receive("*l")
    if not line then return nil, err end
    local t, rest = byte(line, 1), sub(line, 2)
    if t == 43 then -- +
        return OK, rest
    elseif t == 36 then -- $
        local n = length(rest, MAX_BULK)
        if not n then return nil, "protocol error" end
        if n < 0 then return OK, nil end
        local data, e = sock:receive(n + 2)
        if not data then return nil, e end
        return OK, sub(data, 1, n)
    elseif t == 58 then -- :
        return OK, tonumber(rest)
    elseif t == 45 then -- -
        return ERR, rest
    elseif t == 42 then -- *
        local n = length(rest, MAX_ARRAY)
        depth = (depth or 0) + 1
        if not n or depth > MAX_DEPTH then return nil, "protocol error" end
        if n < 0 then return OK, nil end
        local arr = {}
        for i = 1, n do
            local kind, v = read_reply(sock, depth)
            if not kind then return nil, v end
            if kind == ERR then v = { err = v } elseif v == nil then v = null end
            arr[i] = v
        end
        return OK, arr
    end
    return nil, "protocol error"
end

-- -- A connection: { sock, q (replies awaited, in order), qh, qt, out, writing, dead } -----------

-- Every awaited reply gets err; their callers wake.
local function fail_all(c, err)
    c.dead = true
    local q = c.q
    for i = c.qh, c.qt do
        local e = q[i]
        q[i] = nil
        e.value, e.done = err, true
        local co = e.co
        if co then
            e.co = nil
            unpark(co, true)
        end
    end
    c.qh, c.qt = 1, 0
end

-- The reader task, running while replies are awaited (so an idle connection has no read going
-- and does not keep the loop alive): hands each reply to the entry at the head of the queue.
local function reader(c)
    local sock = c.sock
    while c.qh <= c.qt do
        local kind, v = read_reply(sock)
        if not kind then
            sock:close()
            c.reading = false
            return fail_all(c, v == "closed" and "closed" or v)
        end
        local qh = c.qh
        local e = c.q[qh]
        c.q[qh] = nil
        c.qh = qh + 1
        e.kind, e.value, e.done = kind, v, true
        local co = e.co
        if co then
            e.co = nil
            unpark(co, true)
        end
    end
    c.reading = false
end

local function connect(opts)
    local sock, err
    if opts.path then -- a Unix domain socket
        sock, err = tcp.connect("unix:" .. opts.path, { timeout = opts.connect_timeout })
    else
        sock, err = tcp.connect(opts.host, opts.port, { timeout = opts.connect_timeout })
    end
    if not sock then return nil, err end
    sock:settimeouts(opts.connect_timeout, opts.timeout, nil) -- reads wait as long as needed
    return sock
end

-- Waits for entry e (a reply of c) until the client's timeout: OK, value | ERR, msg | nil, err.
local function await(e, timeout)
    if not e.done then
        local ok, r = pcall(park, timeout)
        if not e.done then
            e.co = nil -- the reply will be read and dropped
            if not ok then error(r, 0) end -- cancelled
            return nil, "timeout"
        end
        if not ok then error(r, 0) end
    end
    return e.kind, e.value
end

-- The connection's writer, spawned when commands wait in c.out: on the next turn of the loop it
-- sends all of them in one write (the callers of one turn share the syscall), then again while
-- more came meanwhile.
local function flusher(c)
    while true do
        task.sleep(0)
        if c.dead then break end
        if not c.writing then
            local out = c.out
            c.out = {}
            c.writing = true
            local ok, err = c.sock:send(out)
            c.writing = false
            if not ok then
                c.sock:close() -- the reader fails every waiting call
                c.flushing = false
                return err
            end
            if not c.out[1] then break end
        end
    end
    c.flushing = false
end

-- Queues payload for `n` replies; returns q, the index of the first entry, and the last entry
-- (which carries the caller), or nil, err. With nothing else in flight it is written at once
-- (the lowest latency for a lone caller); otherwise it joins c.out for the writer.
local function submit(c, payload, n)
    local co = running()
    if not co then error("moonlet.redis: I/O outside a moonlet task", 3) end
    if c.dead then return nil, "closed" end
    local q, qt = c.q, c.qt
    local first = qt + 1
    for i = 1, n do q[qt + i] = { done = false } end
    c.qt = qt + n
    local last = q[qt + n]
    last.co = co
    if not c.reading then
        c.reading = true
        spawn(reader, c)
    end
    if c.writing or c.out[1] or qt - c.qh + 1 > 0 then
        local out = c.out
        out[#out + 1] = payload
        if not c.flushing then
            c.flushing = true
            spawn(flusher, c)
        end
        return q, first, last
    end
    c.writing = true
    local ok, sent, err = pcall(c.sock.send, c.sock, payload)
    c.writing = false
    if not ok or not sent then
        last.co = nil
        c.sock:close() -- a write that did not finish leaves the stream out of step
        if not ok then error(sent, 0) end
        return nil, err
    end
    return q, first, last
end

-- -- Client ---------------------------------------------------------------------------------------

local function options(opts, fname)
    if opts ~= nil and type(opts) ~= "table" then
        error("moonlet.redis." .. fname .. ": expected an options table", 3)
    end
    opts = opts or {}
    local path = opts.path
    if type(opts.host) == "string" and opts.host:sub(1, 5) == "unix:" then path = opts.host:sub(6) end
    if path ~= nil and (type(path) ~= "string" or path == "") then
        error("moonlet.redis." .. fname .. ": path must be a socket path", 3)
    end
    return {
        host = opts.host or "127.0.0.1", port = opts.port or 6379, path = path,
        timeout = opts.timeout or 5, connect_timeout = opts.connect_timeout or 5,
        password = opts.password, db = opts.db,
    }
end

-- The client's live connection, connecting (once, others wait for it) when there is none.
local function conn_of(self)
    local c = self.conn
    if c and not c.dead then return c end
    if self.closed then return nil, "closed" end
    local co = running()
    if not co then error("moonlet.redis: I/O outside a moonlet task", 3) end
    if self.connecting then
        local waiters = self.cwaiters
        waiters[#waiters + 1] = co
        local ok, r = pcall(park, self.opts.connect_timeout)
        if not ok or not r then
            for i = #waiters, 1, -1 do
                if waiters[i] == co then remove(waiters, i) break end
            end
            if not ok then error(r, 0) end
            return nil, "timeout"
        end
        c = self.conn
        if c and not c.dead then return c end
        return nil, self.connect_err or "closed"
    end
    self.connecting = true
    local ok, sock, err = pcall(connect, self.opts)
    self.connecting = false
    local waiters = self.cwaiters
    self.cwaiters = {}
    if ok and sock then
        c = { sock = sock, q = {}, qh = 1, qt = 0, writing = false, out = {}, dead = false }
        self.conn = c
        local opts = self.opts
        local setup = {}
        if opts.password then encode(setup, 2, "AUTH", opts.password) end
        if opts.db then encode(setup, 2, "SELECT", opts.db) end
        if setup[1] then
            local n = (opts.password and 1 or 0) + (opts.db and 1 or 0)
            local q, first, last = submit(c, concat(setup), n)
            local kind, v = nil, first
            if q then
                local head = q[first]
                local aok
                aok, kind, v = pcall(await, last, opts.timeout)
                if not aok then -- cancelled while AUTH / SELECT ran: undo, wake the waiters, re-raise
                    sock:close()
                    self.conn = nil
                    self.connect_err = "closed"
                    for i = 1, #waiters do unpark(waiters[i], true) end
                    error(kind, 0)
                end
                if kind == OK and head.kind ~= OK then kind, v = head.kind, head.value end
            end
            if kind ~= OK then
                sock:close()
                self.conn = nil
                sock, err = nil, v
            end
        end
    else
        if not ok then err = sock end
        sock = nil
    end
    self.connect_err = err
    for i = 1, #waiters do unpark(waiters[i], true) end
    if not ok then error(err, 0) end
    if not sock then return nil, err end
    return c
end

-- syntax: r, err = moonlet.redis.connect{ host = "127.0.0.1", port = 6379, timeout = 5,
--                                         connect_timeout = 5, password = nil, db = nil }
-- path = "/run/redis/redis-server.sock" (or host = "unix:/path"): over a Unix domain socket.
-- Connects now (nil, err when it cannot); later calls reconnect by themselves after the
-- connection closes. timeout bounds each call's wait for its reply.
function _M.connect(opts)
    local self = setmetatable({ opts = options(opts, "connect"), cwaiters = {} }, client_mt)
    local c, err = conn_of(self)
    if not c then return nil, err end
    return self
end

-- syntax: value, err = r:call(command, ...) -- "OK", numbers, strings, arrays (tables); a nil
-- reply is nil; an error reply is nil and the server's message ("WRONGTYPE ..."). A call that
-- finds its connection closed by the server while it sat idle (a restart) is sent again, once,
-- on a new connection.
function client_methods:call(...)
    local n = select("#", ...)
    if n == 0 then error("moonlet.redis: call expects a command", 2) end
    local payload = concat(encode({}, n, ...))
    local timeout = self.opts.timeout
    for attempt = 1, 2 do
        local c, err = conn_of(self)
        if not c then return nil, err end
        local idle = c.used and c.qt < c.qh and not c.writing and not c.out[1]
        local q, first, last = submit(c, payload, 1)
        local kind, v
        if q then
            kind, v = await(last, timeout)
            if kind then c.used = true end
        else
            v = first
        end
        if kind == OK then return v end
        if kind or v ~= "closed" or not idle or attempt == 2 or self.closed then return nil, v end
    end
end

-- syntax: results, err = r:pipeline(function(p) p:call("INCR", "a"); p:call("GET", "b") end)
-- The commands go out in one write and their replies come back in one array, in order: each a
-- value (nil as redis.null) or, for an error reply, { err = message }.
function client_methods:pipeline(fn)
    if type(fn) ~= "function" then error("moonlet.redis: pipeline expects a function", 2) end
    local p = setmetatable({ parts = {}, n = 0 }, pipe_mt)
    fn(p)
    p.closed = true
    if p.n == 0 then return {} end
    local c, err = conn_of(self)
    if not c then return nil, err end
    local timeout = self.opts.timeout
    local q, first, last = submit(c, concat(p.parts), p.n)
    if not q then return nil, first end
    local entries = {}
    for i = 1, p.n do entries[i] = q[first + i - 1] end
    local kind, v = await(last, timeout)
    if not kind then return nil, v end
    local results = {}
    for i = 1, p.n do
        local e = entries[i]
        if e.kind == ERR then
            results[i] = { err = e.value }
        elseif e.kind == OK then
            local value = e.value
            if value == nil then value = null end
            results[i] = value
        else
            return nil, e.value
        end
    end
    return results
end

-- syntax: p:call(command, ...) -- inside r:pipeline's function: queues the command
function pipe_methods:call(...)
    if self.closed then error("moonlet.redis: pipeline already sent", 2) end
    local n = select("#", ...)
    if n == 0 then error("moonlet.redis: call expects a command", 2) end
    encode(self.parts, n, ...)
    self.n = self.n + 1
end

-- syntax: r:close() -- calls waiting for replies get nil, "closed"
function client_methods:close()
    self.closed = true
    local c = self.conn
    self.conn = nil
    if c then
        c.sock:close()
        fail_all(c, "closed")
    end
    return true
end

-- -- Pub/sub ------------------------------------------------------------------------------------

local function sub_connect(self)
    local sock, err = connect(self.opts)
    if not sock then return nil, err end
    local parts = {}
    local opts = self.opts
    if opts.password then encode(parts, 2, "AUTH", opts.password) end
    local n = #self.channels
    if n > 0 then encode(parts, n + 1, "SUBSCRIBE", unpack(self.channels)) end
    local np = #self.patterns
    if np > 0 then encode(parts, np + 1, "PSUBSCRIBE", unpack(self.patterns)) end
    local ok, e = sock:send(concat(parts))
    if ok then
        -- the confirmations: one per channel and pattern (and AUTH's OK)
        sock:settimeout(opts.timeout)
        for _ = 1, n + np + (opts.password and 1 or 0) do
            local kind, v = read_reply(sock)
            if kind ~= OK then
                ok, e = nil, v
                break
            end
        end
    end
    if not ok then
        sock:close()
        return nil, e
    end
    self.sock = sock
    return true
end

local function subscribe(self, channels, patterns)
    local s = setmetatable({ opts = self.opts, channels = channels, patterns = patterns }, sub_mt)
    local ok, err = sub_connect(s)
    if not ok then return nil, err end
    return s
end

local function strings(fname, ...)
    local list = { ... }
    if #list == 0 then error("moonlet.redis: " .. fname .. " expects a channel", 3) end
    for i = 1, #list do list[i] = tostring(list[i]) end
    return list
end

-- syntax: sub, err = r:subscribe(channel, ...) -- a connection of its own, subscribed
function client_methods:subscribe(...)
    return subscribe(self, strings("subscribe", ...), {})
end

-- syntax: sub, err = r:psubscribe(pattern, ...)
function client_methods:psubscribe(...)
    return subscribe(self, {}, strings("psubscribe", ...))
end

-- syntax: channel, message, pattern = sub:receive(timeout) -- the next message; nil, "timeout";
-- nil, "closed" after sub:close(). A lost connection is made again (messages sent meanwhile
-- are lost, as Redis pub/sub goes).
function sub_methods:receive(timeout)
    local deadline = timeout and now() + timeout
    while true do
        if self.closed then return nil, "closed" end
        local sock = self.sock
        if not sock then
            local ok, err = sub_connect(self)
            if not ok then
                if self.closed then return nil, "closed" end
                if deadline and now() >= deadline then return nil, err end
                task.sleep(0.1)
            end
        else
            local left = deadline and deadline - now()
            if left and left < 0 then left = 0 end
            sock:settimeout(left)
            local line, err = sock:receive("*l") -- the head of the next push, then the rest
            if line then
                sock:settimeout(self.opts.timeout)
                local parts = {}
                if byte(line, 1) == 42 then
                    for i = 1, tonumber(sub(line, 2)) or 0 do
                        local kind, v = read_reply(sock)
                        if not kind then
                            line = nil
                            break
                        end
                        parts[i] = v
                    end
                end
                if parts[1] == "message" then return parts[2], parts[3] end
                if parts[1] == "pmessage" then return parts[3], parts[4], parts[2] end
            elseif err == "timeout" then
                return nil, "timeout"
            end
            if not line then -- the connection is gone: subscribe again on a new one
                sock:close()
                self.sock = nil
            end
        end
    end
end

-- syntax: for channel, message in sub:messages() do ... end -- ends when sub is closed
function sub_methods:messages(timeout)
    return function()
        local channel, message, pattern = self:receive(timeout)
        if channel then return channel, message, pattern end
        return nil
    end
end

-- syntax: sub:close()
function sub_methods:close()
    self.closed = true
    if self.sock then self.sock:close() end
    self.sock = nil
    return true
end

-- -- Pool -----------------------------------------------------------------------------------------

-- syntax: pool = moonlet.redis.pool{ host, port, size = 4, ... } -- the options of connect; each
-- call goes to the connection with the fewest replies awaited (connected on first use)
function _M.pool(opts)
    local o = options(opts, "pool")
    local size = opts and opts.size or 4
    local clients = {}
    for i = 1, size do
        clients[i] = setmetatable({ opts = o, cwaiters = {} }, client_mt)
    end
    return setmetatable({ clients = clients, opts = o }, pool_mt)
end

local function pick(self)
    local best, load
    for i = 1, #self.clients do
        local cl = self.clients[i]
        local c = cl.conn
        local l = c and not c.dead and (c.qt - c.qh + 1) or (cl.connecting and 1e9 or 1)
        if not best or l < load then best, load = cl, l end
        if l == 0 then break end
    end
    return best
end

-- syntax: value, err = pool:call(...), results = pool:pipeline(fn), sub = pool:subscribe(...)
function pool_methods:call(...)
    return pick(self):call(...)
end

function pool_methods:pipeline(fn)
    return pick(self):pipeline(fn)
end

function pool_methods:subscribe(...)
    return subscribe(self, strings("subscribe", ...), {})
end

function pool_methods:psubscribe(...)
    return subscribe(self, {}, strings("psubscribe", ...))
end

function pool_methods:close()
    for i = 1, #self.clients do self.clients[i]:close() end
    return true
end

return _M
