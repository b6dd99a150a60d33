-- lua/moonlet/status.lua: moonlet.status(opts), a route handler that tells how the server is doing,
-- in the words of nginx's stub_status, so that what watches nginx (nginx-prometheus-exporter,
-- telegraf's nginx input, Datadog's and Zabbix's nginx checks) watches moonlet unchanged:
--   app:get("/status", moonlet.status())                    -- stub_status's four lines, text/plain
--   app:get("/status", moonlet.status({ format = "json" })) -- the same and more, as JSON
-- Active connections are those open now: reading a request head, writing (a request in progress:
-- its handler runs or its response goes out, a WebSocket), waiting (idle keep-alive); accepts,
-- handled and requests count since the server started (handled: accepted and not refused at
-- --max-conns; requests: those whose head was read). The figures are this process's: under
-- `moonlet --workers N` each worker answers for itself (the JSON says which), where nginx sums its
-- workers in shared memory. Put the route behind an access check (an allow list, a token) as
-- nginx's `allow 127.0.0.1; deny all;`: it tells the world how loaded the server is.
local core = require "moonlet.core"

local format = string.format

local _M = {}

local loaded_at = core.now() -- the JSON's uptime: seconds since the first moonlet.status

-- syntax: text = status.stub_status() -- nginx's stub_status page, byte for byte its layout
function _M.stub_status()
    local st = core.server_stats()
    return format("Active connections: %d \nserver accepts handled requests\n %d %d %d \n" ..
                  "Reading: %d Writing: %d Waiting: %d \n", st.active, st.accepted, st.handled,
                  st.requests, st.reading, st.writing, st.waiting)
end

-- syntax: t = status.report() -- the JSON's table
function _M.report()
    local st = core.server_stats()
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
        worker = { id = id, count = count },
        version = core.version,
    }
end

-- syntax: handler = moonlet.status({ format = "text" | "json" })
function _M.handler(opts)
    local fmt = opts and opts.format or "text"
    if fmt ~= "text" and fmt ~= "json" then
        error("moonlet.status: format is \"text\" or \"json\"", 3)
    end
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
