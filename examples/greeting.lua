-- examples/greeting.lua: Twisted's greeting protocol, moonlet style. A raw TCP server (no HTTP)
-- whose handler reads like blocking code: greet the client, close. Each connection runs in its own
-- task; SIGTERM or Ctrl-C stops the server.
--   moonlet examples/greeting.lua [port]     (or env PORT; default 7000)
--   nc 127.0.0.1 7000                         → ciao EuroPython
local moonlet = require "moonlet"

local port = tonumber(arg[1] or os.getenv("PORT") or 7000)

local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = port }, function(sock)
    sock:send("ciao EuroPython\n")
    sock:close()
end))
print(("greeting on tcp://127.0.0.1:%d"):format(server:port()))
io.stdout:flush()
