-- examples/workers.lua: one app served by several processes (`moonlet --workers N`). Each worker
-- has its own Lua state: `served` below counts the requests of the worker that answers. What all
-- workers must see lives in a moonlet.shared dictionary (shared memory, as nginx's
-- lua_shared_dict): `all` counts the requests of the whole server.
--   moonlet --workers 2 examples/workers.lua, then
--   for i in 1 2 3 4 5 6; do curl -s localhost:8080/; done       (new connections: both answer)
local moonlet = require "moonlet"

local served = 0 -- this worker's requests
local counts = moonlet.shared("counts", { size = "64k" }) -- one for all the workers

local app = moonlet.app()
app:get("/", function()
    served = served + 1
    local all = counts:incr("all", 1, 0) -- from 0 the first time, in whichever worker
    return ("worker %d of %d (pid %d): request %d of this worker, %d of all\n"):format(
        moonlet.worker.id(), moonlet.worker.count(), moonlet.worker.pid(), served, all)
end)
return app
