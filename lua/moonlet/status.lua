-- lua/moonlet/status.lua: moonlet.status(opts), a route handler that tells how the server is doing,
-- in the words of nginx's stub_status, so that what watches nginx (nginx-prometheus-exporter,
-- telegraf's nginx input, Datadog's and Zabbix's nginx checks) watches moonlet unchanged:
--   app:get("/status", moonlet.status())                    -- stub_status's four lines, text/plain
--   app:get("/status", moonlet.status({ format = "json" })) -- the same and more, as JSON
-- Active connections are those open now: reading a request head, writing (a request in progress:
-- its handler runs or its response goes out, a WebSocket), waiting (idle keep-alive); accepts,
-- handled and requests count since the server started (handled: accepted and not refused at
-- --max-conns; requests: those whose head was read). Put the route behind an access check (an
-- allow list, a token) as nginx's `allow 127.0.0.1; deny all;`: it tells how loaded the server is.
--
-- Under `moonlet --workers N` the page sums the workers, as nginx's does: each worker writes its
-- figures into the shared dictionary "moonlet.status" (moonlet.shared, one for all workers) once a
-- second, and at once when it answers; the worker that answers adds up the others' last figures
-- (at most a second old) and its own of now. A worker's counts go on from where its earlier
-- incarnation left them (what it had written last: a crashed one's last second is lost), so that
-- the sums never go back, as Prometheus' counters must not.
local core = require "moonlet.core"
local task = require "moonlet.task"

local format = string.format

local _M = {}

local loaded_at = core.now() -- the JSON's uptime: seconds since the first moonlet.status

local FIELDS = { "accepted", "handled", "requests", "active", "reading", "writing", "waiting" }
local COUNTERS = { accepted = true, handled = true, requests = true } -- the others: figures of now
local PUBLISH_EVERY = 1 -- seconds

local dict   -- moonlet.shared("moonlet.status") under --workers N; nil alone
local base   -- this worker's counts of its earlier incarnations
local keys   -- keys[id] = "w<id>": one entry per worker, its 7 figures in one string (one set:
             -- a reader never sees half of a worker's figures)
local warned -- the dictionary refused a set once (logged once)

-- "accepted handled requests active reading writing waiting" -> a table of FIELDS, or nil
local function unpack_figures(v)
    if not v then return nil end
    local t, i = {}, 0
    for n in v:gmatch("%d+") do
        i = i + 1
        t[FIELDS[i]] = tonumber(n)
    end
    return i == #FIELDS and t or nil
end

-- Writes this worker's figures of now; returns them (its counts from its first incarnation on).
local function publish()
    local st = core.server_stats()
    local id = core.worker()
    for f in pairs(COUNTERS) do st[f] = st[f] + base[f] end
    local ok, err = dict:safe_set(keys[id], format("%d %d %d %d %d %d %d", st.accepted, st.handled,
                                  st.requests, st.active, st.reading, st.writing, st.waiting))
    if not ok and not warned then
        warned = true
        core.log(1, "moonlet.status: cannot share this worker's figures: " .. tostring(err))
    end
    return st
end

-- Under --workers N, once per process: the dictionary (room for every worker's entry), the counts
-- an earlier incarnation of this worker left, and a background task that publishes once a second
-- (it ends with the process).
local function setup()
    local id, count = core.worker()
    if count < 2 or dict then return end
    local shared = require "moonlet.shared"
    dict = shared.get("moonlet.status", { size = math.max(64 * 1024, count * (shared.ENTRY_OVERHEAD + 128)) })
    keys = {}
    for w = 0, count - 1 do keys[w] = "w" .. w end
    local before = unpack_figures(dict:get(keys[id]))
    base = {}
    for f in pairs(COUNTERS) do base[f] = before and before[f] or 0 end
    publish()
    task.spawn(function()
        while true do
            task.sleep(PUBLISH_EVERY)
            publish()
        end
    end)
end

-- The figures of this process, or of all the workers summed
local function figures()
    if not dict then return core.server_stats() end
    local mine = publish()
    local id, count = core.worker()
    local sum = {}
    for _, f in ipairs(FIELDS) do sum[f] = mine[f] end
    for w = 0, count - 1 do
        local theirs = w ~= id and unpack_figures(dict:get(keys[w]))
        if theirs then
            for _, f in ipairs(FIELDS) do sum[f] = sum[f] + theirs[f] end
        end
    end
    return sum
end

-- syntax: text = status.stub_status() -- nginx's stub_status page, byte for byte its layout
function _M.stub_status()
    local st = figures()
    return format("Active connections: %d \nserver accepts handled requests\n %d %d %d \n" ..
                  "Reading: %d Writing: %d Waiting: %d \n", st.active, st.accepted, st.handled,
                  st.requests, st.reading, st.writing, st.waiting)
end

-- syntax: t = status.report() -- the JSON's table
function _M.report()
    local st = figures()
    local id, count, pid = core.worker()
    local stats = core.stats()
    return {
        connections = { active = st.active, reading = st.reading, writing = st.writing,
                        waiting = st.waiting, accepted = st.accepted, handled = st.handled },
        requests = { total = st.requests },
        tasks = stats.tasks,
        lua_memory_kb = math.floor(collectgarbage("count")),
        uptime = math.floor((core.now() - loaded_at) * 1000) / 1000,
        pid = pid,
        worker = { id = id, count = count }, -- the one that answered (the figures: all of them)
        version = core.version,
    }
end

-- syntax: handler = moonlet.status({ format = "text" | "json" })
function _M.handler(opts)
    local fmt = opts and opts.format or "text"
    if fmt ~= "text" and fmt ~= "json" then
        error("moonlet.status: format is \"text\" or \"json\"", 3)
    end
    setup()
    if fmt == "json" then
        return function(_, res)
            res:header("Cache-Control", "no-store")
            return _M.report()
        end
    end
    return function(_, res)
        res:type("text/plain")
        res:header("Cache-Control", "no-store")
        return _M.stub_status()
    end
end

return _M
