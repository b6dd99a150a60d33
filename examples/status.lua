-- examples/status.lua: an app as it runs in production, watched and logged the way nginx is:
--   /status       nginx's stub_status page (moonlet.status), for nginx-prometheus-exporter & co,
--                 answered to loopback clients only (nginx's `allow 127.0.0.1; deny all;`)
--   /status.json  the same figures and more, as JSON
--   /             the app itself
-- Run it with its logs in files and a pid file for logrotate (docs/deployment.md):
--   moonlet examples/status.lua --workers 2 --access-log=/tmp/access.log \
--       --access-log-format combined --error-log /tmp/error.log --pid-file /tmp/moonlet.pid
--   curl localhost:8080/status
--   mv /tmp/access.log /tmp/access.log.1 && kill -USR1 $(cat /tmp/moonlet.pid)   # logrotate's work
local moonlet = require "moonlet"

local app = moonlet.app()

-- only the machine itself may look (behind a proxy, put moonlet.forwarded first: req.ip is then
-- the client's, and this check sees through the proxy)
local LOCAL = { ["127.0.0.1"] = true, ["::1"] = true, ["unix:"] = true }
local function local_only(handler)
    return function(req, res)
        if not LOCAL[req.ip] then return 403, "403 Forbidden\n" end
        return handler(req, res)
    end
end

app:get("/status", local_only(moonlet.status()))
app:get("/status.json", local_only(moonlet.status({ format = "json" })))

app:get("/", function() return "Hello from worker " .. moonlet.worker.id() .. "\n" end)

return app
