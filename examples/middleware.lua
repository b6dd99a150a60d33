-- examples/middleware.lua: middleware wraps every handler (404s too). next() runs the rest of
-- the chain and returns the body; status and headers are already on res.
local moonlet = require "moonlet"
local app = moonlet.app()

app:use(function(req, res, next)                 -- timing
    local t0 = moonlet.now()
    local body = next()
    res:header("Server-Timing", ("app;dur=%.3f"):format((moonlet.now() - t0) * 1000))
    return body
end)

app:use(function(req, res, next)                 -- a toy auth check
    if req.path:sub(1, 7) == "/admin/" and req:header("Authorization") ~= "Bearer letmein" then
        return moonlet.abort(401, "who are you?\n", { ["WWW-Authenticate"] = "Bearer" })
    end
    return next()
end)

app:get("/admin/stats", function() return { requests = 1 } end)
app:get("/", function() return 201, "created nothing\n" end)
return app
