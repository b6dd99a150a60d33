-- examples/mount.lua: a bigger app in parts with app:mount. The API is an app of its own, with
-- its own middleware (a token check that the pages never see), mounted under /api; its version 1
-- is mounted inside it. Each part could sit in its own file and be served alone too. Routes are
-- named ({ name = "book" }) and their paths made by req:url_for / app:url_for, so no part writes
-- down where it is mounted.
--   moonlet examples/mount.lua, then
--   curl localhost:8080/                                        (the page: no token needed)
--   curl localhost:8080/api/v1/books/2                          (401: the API wants a token)
--   curl -H 'Authorization: Bearer let-me-in' localhost:8080/api/v1/books/2
local moonlet = require "moonlet"

local books = { "Programming in Lua", "Lua Quick Start Guide", "Beginning Lua Programming" }

local v1 = moonlet.app()
v1:get("/books", function() return books end, { name = "books" })
v1:get("/books/:n", function(req)
    local title = books[tonumber(req.params.n)]
    if not title then return 404, { error = "no book " .. req.params.n } end
    return { title = title, url = req:url_for("book", { n = req.params.n }) } -- /api/v1/books/n
end, { name = "book" })

local api = moonlet.app()
api:use(function(req, _, next) -- every /api request, its 404s included, and nothing else
    if req:header("Authorization") ~= "Bearer let-me-in" then
        return 401, { error = "token needed" }, { ["WWW-Authenticate"] = "Bearer" }
    end
    return next()
end)
api:mount("/v1", v1)

local app = moonlet.app()
app:use(function(_, res, next) -- the whole app's: pages and API alike
    local r = next()
    res:header("X-Served-By", "moonlet")
    return r
end)
app:mount("/api", api)
app:get("/", function()
    return "Books: GET " .. app:url_for("books") .. " with 'Authorization: Bearer let-me-in'\n"
end)
return app
