-- examples/hello.lua: the app of the README, one route per idea. Run: moonlet examples/hello.lua
local moonlet = require "moonlet"
local app = moonlet.app()

app:get("/", function(req, res) return "Hello, World!" end)

app:get("/users/:id", function(req, res)
    return { id = req.params.id, q = req.query.q }         -- a table is sent as JSON
end)

app:post("/echo", function(req, res)
    local body = req:body()                                 -- yields until the whole body is in
    res:status(201):header("X-Echo", "yes")
    return body
end)

app:get("/countdown", function(req, res)                  -- streamed with chunked encoding
    for i = 3, 1, -1 do
        res:write(i .. "\n")                                -- yields while the socket is backed up
        moonlet.sleep(0.1)                                  -- yields to the loop; others are served
    end
end)

app:use(function(req, res, next)                          -- middleware wraps every handler
    local t = moonlet.now(); local r = next(); res:header("X-Time", moonlet.now() - t); return r
end)

app:static("/assets", "public")                           -- static files
return app
