-- examples/guestbook.lua: an HTML app with templates (moonlet.template: etlua's <%= %>, escaped),
-- a session in a signed cookie (moonlet.session) and forms protected from cross-site forgery
-- (moonlet.csrf): sign the book, and the page greets you by the name you gave, counting your
-- entries. Entries live in memory.
--   SECRET=$(openssl rand -hex 32) moonlet examples/guestbook.lua   then open http://127.0.0.1:8080/
local moonlet = require "moonlet"

local app = moonlet.app()
local views = moonlet.template.loader("views")   -- examples/views, found from this script's directory
local entries = {}

app:use(moonlet.session({
    secret = os.getenv("SECRET") or moonlet.crypto.hex(moonlet.crypto.random(32)), -- a new one per run
}))
app:use(moonlet.csrf())                           -- a POST must carry req:csrf_token() (403 otherwise)

app:get("/", function(req, res)
    res:type("html")
    return views:render("guestbook.html", {
        entries = entries, name = req.session.name, signed = req.session.signed or 0,
        csrf = req:csrf_token(),
    })
end)

app:post("/sign", function(req, res)
    local form = req:form()
    local name, message = form.name or "", form.message or ""
    if name == "" or message == "" or #name > 100 or #message > 1000 then
        return 400, "a name and a message, please (up to 100 and 1000 bytes)\n"
    end
    entries[#entries + 1] = { name = name, message = message }
    req.session.name = name
    req.session.signed = (req.session.signed or 0) + 1
    return res:redirect("/", 303)
end)

return app
