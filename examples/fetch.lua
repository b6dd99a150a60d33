-- examples/fetch.lua: one HTTP request that reads like blocking code. moonlet.http.get yields the
-- script's task while it waits for the network; the loop stays free for anything else.
--   moonlet examples/fetch.lua URL            → 200 1256 bytes
local moonlet = require "moonlet"

local function fail(msg) -- a message and exit code 1 (an error() would print its traceback too)
    io.stderr:write(msg, "\n")
    os.exit(1)
end

local url = arg[1]
if not url then fail("usage: moonlet examples/fetch.lua URL") end

local res, err = moonlet.http.get(url, { timeout = 10 })
if not res then fail("error: " .. tostring(err)) end -- nil, "connection refused", "timeout", ...
print(("%d %d bytes"):format(res.status, #res.body))
