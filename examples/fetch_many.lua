-- examples/fetch_many.lua: concurrency without callbacks. Every URL is fetched in its own task at
-- once (moonlet.gather), so the total time is the slowest fetch, not the sum of them all: the
-- last line shows both.
--   moonlet examples/fetch_many.lua URL URL ...
--   → 200 12345 bytes 0.304 s  http://...      (one line per URL)
--   → total 0.305 s, sum of the single times 1.512 s
local moonlet = require "moonlet"

if #arg == 0 then error("usage: moonlet examples/fetch_many.lua URL...", 0) end

local fns = {}
for i = 1, #arg do
    local url = arg[i]
    fns[i] = function()
        local t0 = moonlet.now()
        local res, err = moonlet.http.get(url, { timeout = 10 })
        return { url = url, res = res, err = err, secs = moonlet.now() - t0 }
    end
end

local t0 = moonlet.now()
local results = moonlet.gather(fns)
local total, sum = moonlet.now() - t0, 0
for i = 1, #arg do
    local r = results[i]
    sum = sum + r.secs
    if r.res then
        print(("%d %d bytes %.3f s  %s"):format(r.res.status, #r.res.body, r.secs, r.url))
    else
        print(("error %s %.3f s  %s"):format(tostring(r.err), r.secs, r.url))
    end
end
print(("total %.3f s, sum of the single times %.3f s"):format(total, sum))
