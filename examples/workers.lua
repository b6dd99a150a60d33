-- examples/workers.lua: one app served by several processes (`moonlet --workers N`). Each worker
-- has its own Lua state: the counter below counts the requests of the worker that answers, not of
-- the whole server (keep what all must see in a database or Redis).
--   moonlet --workers 2 examples/workers.lua, then
--   for i in 1 2 3 4 5 6; do curl -s localhost:8080/; done       (new connections: both answer)
local moonlet = require "moonlet"

local served = 0 -- this worker's requests

local app = moonlet.app()
app:get("/", function()
    served = served + 1
    return ("worker %d of %d (pid %d): request %d of this worker\n"):format(
        moonlet.worker.id(), moonlet.worker.count(), moonlet.worker.pid(), served)
end)
return app
