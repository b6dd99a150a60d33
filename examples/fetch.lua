-- examples/fetch.lua: one HTTP request that reads like blocking code. moonlet.http.get yields the
-- script's task while it waits for the network; the loop stays free for anything else.
--   moonlet examples/fetch.lua URL            → 200 1256 bytes
local moonlet = require "moonlet"

local url = arg[1]
if not url then error("usage: moonlet examples/fetch.lua URL", 0) end

local res, err = moonlet.http.get(url, { timeout = 10 })
if not res then error("error: " .. tostring(err), 0) end -- logged; the exit code is 1
print(("%d %d bytes"):format(res.status, #res.body))
