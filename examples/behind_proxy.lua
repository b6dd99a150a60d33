-- examples/behind_proxy.lua: an app served on a Unix domain socket behind nginx, the way gunicorn
-- or uvicorn apps are deployed: no TCP port open, nginx in front for TLS and static files.
-- moonlet.forwarded makes req.ip, req.scheme and req.host the client's again (it trusts the
-- socket's peer, "unix:", and loopback by default).
--   moonlet examples/behind_proxy.lua --unix /tmp/moonlet.sock      (--workers 4 works too;
--   --unix-mode 660 lets nginx's user connect when it is in this user's group)
--   curl --unix-socket /tmp/moonlet.sock -H 'X-Forwarded-For: 203.0.113.9' http://app/
-- and in nginx:
--   upstream moonlet { server unix:/tmp/moonlet.sock; keepalive 32; }
--   location / {
--       proxy_pass http://moonlet;
--       proxy_http_version 1.1;
--       proxy_set_header Connection "";
--       proxy_set_header Host $host;
--       proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
--       proxy_set_header X-Forwarded-Proto $scheme;
--   }
local moonlet = require "moonlet"

local app = moonlet.app()
app:use(moonlet.forwarded())

app:get("/", function(req)
    return ("hello %s, you came over %s to %s\n"):format(req.ip, req.scheme, req.host or "?")
end)

return app
