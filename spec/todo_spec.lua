-- spec/todo_spec.lua: apps/todo over real sockets: the JSON API (validation errors as 422 JSON),
-- the HTML page and its forms, many writers at once, the same API on PostgreSQL, and the app run
-- as `moonlet apps/todo/app.lua`.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local json = require "moonlet.json"
local servers = require "support.servers"

local todo = dofile("apps/todo/todo.lua")

local function tmpfile()
    local path = os.tmpname()
    os.remove(path)
    test.defer(function()
        os.remove(path)
        os.remove(path .. "-wal")
        os.remove(path .. "-shm")
    end)
    return path
end

local function serve(opts)
    local app = todo.app(opts)
    local server, port = test.serve(app)
    test.defer(function()
        server:close()
        app.store:close()
    end)
    return port
end

local function api(port, method, path, body, headers)
    headers = headers or {}
    if body ~= nil and type(body) ~= "string" then
        body = json.encode(body)
        headers["Content-Type"] = "application/json"
    end
    local resp = test.request(port, method, path, { body = body, headers = headers })
    if resp.body ~= "" and (resp.headers["content-type"] or ""):find("json", 1, true) then
        resp.json = json.decode(resp.body)
    end
    return resp
end

-- The API walk both backends must pass.
local function api_walk(port)
    local r = api(port, "GET", "/api/todos")
    assert.same({ 200, "[]" }, { r.status, r.body })
    r = api(port, "POST", "/api/todos", { title = "  buy milk  " })
    assert.equal(201, r.status)
    assert.same({ id = 1, title = "buy milk", done = false }, r.json)
    assert.equal("/api/todos/1", r.headers.location)
    r = api(port, "POST", "/api/todos", { title = "write <docs>", done = true })
    assert.same({ id = 2, title = "write <docs>", done = true }, r.json)
    r = api(port, "GET", "/api/todos")
    assert.same({ { id = 1, title = "buy milk", done = false },
                  { id = 2, title = "write <docs>", done = true } }, r.json)
    r = api(port, "PATCH", "/api/todos/1", { done = true })
    assert.same({ 200, { id = 1, title = "buy milk", done = true } }, { r.status, r.json })
    r = api(port, "PATCH", "/api/todos/1", { title = "buy oat milk" })
    assert.same({ id = 1, title = "buy oat milk", done = true }, r.json)
    r = api(port, "GET", "/api/todos/1")
    assert.same({ 200, { id = 1, title = "buy oat milk", done = true } }, { r.status, r.json })
    -- validation errors: 422 with what is wrong, field by field
    r = api(port, "POST", "/api/todos", {})
    assert.same({ 422, { error = "validation failed", fields = { title = "is required" } } },
                { r.status, r.json })
    r = api(port, "POST", "/api/todos", { title = "   ", done = "maybe" })
    assert.same({ 422, { error = "validation failed",
                         fields = { title = "must not be empty", done = "must be true or false" } } },
                { r.status, r.json })
    r = api(port, "POST", "/api/todos", { title = ("x"):rep(201) })
    assert.same({ title = "must be at most 200 characters" }, r.json.fields)
    -- characters, not bytes: 200 "é" (400 bytes) are fine (the table's CHECK counts them so too)
    r = api(port, "POST", "/api/todos", { title = ("\xC3\xA9"):rep(200) })
    assert.same({ 201, ("\xC3\xA9"):rep(200) }, { r.status, r.json.title })
    assert.same(204, api(port, "DELETE", "/api/todos/" .. r.json.id).status)
    r = api(port, "POST", "/api/todos", { title = ("\xC3\xA9"):rep(201) })
    assert.same({ title = "must be at most 200 characters" }, r.json.fields)
    r = api(port, "POST", "/api/todos", { title = 42 })
    assert.same({ title = "must be a string" }, r.json.fields)
    r = api(port, "PATCH", "/api/todos/1", {})
    assert.same({ 422, { body = "nothing to change (title, done)" } }, { r.status, r.json.fields })
    r = api(port, "POST", "/api/todos", "{not json", { ["Content-Type"] = "application/json" })
    assert.same({ 400, { error = "invalid JSON" } }, { r.status, r.json })
    -- not found
    assert.same({ 404, { error = "not found" } }, { api(port, "GET", "/api/todos/99").status,
                                                    api(port, "GET", "/api/todos/99").json })
    assert.equal(404, api(port, "GET", "/api/todos/abc").status)
    assert.equal(404, api(port, "PATCH", "/api/todos/99", { done = true }).status)
    -- delete
    r = api(port, "DELETE", "/api/todos/2")
    assert.same({ 204, "" }, { r.status, r.body })
    assert.equal(404, api(port, "DELETE", "/api/todos/2").status)
    assert.same({ { id = 1, title = "buy oat milk", done = true } },
                api(port, "GET", "/api/todos").json)
end

describe("apps/todo", function()
    it("serves the JSON API on SQLite with validation errors as 422 JSON", function()
        api_walk(serve({ sqlite = tmpfile() }))
    end)

    it("takes form bodies on the API too", function()
        local port = serve({ sqlite = tmpfile() })
        local r = api(port, "POST", "/api/todos", "title=from+a+form&done=on",
                      { ["Content-Type"] = "application/x-www-form-urlencoded" })
        assert.same({ 201, { id = 1, title = "from a form", done = true } }, { r.status, r.json })
        -- JSON sent with a form's type (what `curl -d` does) is still read as JSON
        r = api(port, "POST", "/api/todos", '{"title": "curl"}',
                { ["Content-Type"] = "application/x-www-form-urlencoded" })
        assert.same({ 201, { id = 2, title = "curl", done = false } }, { r.status, r.json })
    end)

    it("serves an HTML page whose forms add, toggle and delete", function()
        local port = serve({ sqlite = tmpfile() })
        local form = { ["Content-Type"] = "application/x-www-form-urlencoded" }
        local r = test.request(port, "GET", "/")
        assert.equal(200, r.status)
        assert.truthy(r.headers["content-type"]:find("text/html", 1, true))
        assert.truthy(r.body:find('<form class="add" method="post" action="/todos">', 1, true))
        assert.truthy(r.body:find("Nothing to do.", 1, true))
        r = test.request(port, "POST", "/todos", { headers = form,
                                                    body = "title=%3Cb%3Ebold%3C%2Fb%3E+%26+co" })
        assert.same({ 303, "/" }, { r.status, r.headers.location })
        r = test.request(port, "GET", "/")
        assert.truthy(r.body:find("&lt;b&gt;bold&lt;/b&gt; &amp; co", 1, true))
        assert.falsy(r.body:find("<b>bold", 1, true))
        assert.truthy(r.body:find('action="/todos/1/toggle"', 1, true))
        r = test.request(port, "POST", "/todos/1/toggle", { headers = form, body = "" })
        assert.same({ 303, "/" }, { r.status, r.headers.location })
        assert.same({ { id = 1, title = "<b>bold</b> & co", done = true } },
                    api(port, "GET", "/api/todos").json)
        assert.truthy(test.request(port, "GET", "/").body:find('<li class="done">', 1, true))
        -- an empty title: the page again, with the error, as 422
        r = test.request(port, "POST", "/todos", { headers = form, body = "title=+" })
        assert.equal(422, r.status)
        assert.truthy(r.body:find('<p class="error">Title must not be empty</p>', 1, true))
        r = test.request(port, "POST", "/todos/1/delete", { headers = form, body = "" })
        assert.same({ 303, "/" }, { r.status, r.headers.location })
        assert.same("[]", api(port, "GET", "/api/todos").body)
    end)

    it("takes 50 creates at once", function()
        local port = serve({ sqlite = tmpfile() })
        local fns = {}
        for i = 1, 50 do
            fns[i] = function()
                return api(port, "POST", "/api/todos", { title = "task " .. i }).status
            end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 50 do assert.equal(201, results[i]) end
        local list = api(port, "GET", "/api/todos").json
        assert.equal(50, #list)
        local seen = {}
        for _, t in ipairs(list) do seen[t.title] = true end
        for i = 1, 50 do assert.is_true(seen["task " .. i]) end
    end)

    it("serves the same API on PostgreSQL when given a database URL", function()
        if not servers.pg_bin() then
            pending("postgresql server binaries not installed")
            return
        end
        local srv = assert(servers.postgres())
        test.defer(function() srv:stop() end)
        api_walk(serve({ database_url = srv.url }))
    end)

    it("runs as `moonlet apps/todo/app.lua`, on SQLite with no setup", function()
        local db = tmpfile()
        local p = test.start_process("apps/todo/app.lua --port 0 --db " .. db)
        test.defer(function() p:kill() end)
        local port = p:port()
        local r = api(port, "POST", "/api/todos", { title = "from the command" })
        assert.equal(201, r.status, p:output())
        assert.same({ { id = 1, title = "from the command", done = false } },
                    api(port, "GET", "/api/todos").json)
        assert.truthy(io.open(db)):close()
    end)
end)
