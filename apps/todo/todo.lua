-- apps/todo/todo.lua: the todo app: a store over SQLite or PostgreSQL, an HTML page that works
-- with plain forms (no JavaScript, no build step) and a JSON API:
--   GET    /api/todos          200 [ { id, title, done }, ... ]
--   POST   /api/todos          201 { id, title, done } (JSON or form body) | 422 { error, fields }
--   GET    /api/todos/:id      200 { ... } | 404 { error = "not found" }
--   PATCH  /api/todos/:id      200 { ... } (title and/or done) | 404 | 422
--   DELETE /api/todos/:id      204 | 404
-- Building the app opens nothing: the database is opened (and its table created) on the first
-- request that needs it, so requiring this module has no side effects.
local moonlet = require "moonlet"
local json = require "moonlet.json"

local type, tonumber, tostring, setmetatable = type, tonumber, tostring, setmetatable
local str_gsub, concat = string.gsub, table.concat

local _M = {}

local MAX_TITLE = 200

-- the characters of UTF-8 text: its bytes but the continuation bytes (0x80-0xBF)
local function chars(s)
    local _, n = string.gsub(s, "[^\128-\191]", "")
    return n
end

-- -- The store ------------------------------------------------------------------------------------

-- Both databases take the same SQL, written with $1, $2... (SQLite reads them as ?1, ?2...) and
-- RETURNING; only the table definitions differ.
local SCHEMA = {
    sqlite = [[CREATE TABLE IF NOT EXISTS todo(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
        done INTEGER NOT NULL DEFAULT 0)]],
    pg = [[CREATE TABLE IF NOT EXISTS todo(
        id serial PRIMARY KEY,
        title text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
        done boolean NOT NULL DEFAULT false)]],
}

local store = {}
local store_mt = { __index = store }

-- syntax: s = todo.store{ database_url = "postgresql://..." } or todo.store{ sqlite = "path" }
function _M.store(opts)
    return setmetatable({ opts = opts }, store_mt)
end

-- The database, opened and given its table on first use (once, even with concurrent requests).
function store:db()
    if self.ready then return self.handle end
    if self.opening then
        local ok, err = self.opening:wait(10)
        if not ok then return nil, err end
        if self.ready then return self.handle end
        return nil, self.open_err
    end
    local ev = moonlet.event()
    self.opening = ev
    local handle, err
    if self.opts.database_url then
        self.kind = "pg"
        handle = moonlet.pg.pool({ url = self.opts.database_url, size = self.opts.pool_size or 10 })
    else
        self.kind = "sqlite"
        handle, err = moonlet.sqlite.open(self.opts.sqlite or "todo.db")
    end
    if handle then
        local ok, e = handle:exec(SCHEMA[self.kind])
        if not ok then
            handle:close()
            handle, err = nil, e
        end
    end
    self.opening = nil
    self.handle, self.ready, self.open_err = handle, handle ~= nil, err
    ev:set()
    if not handle then return nil, err end
    return handle
end

function store:sql(s)
    if self.kind == "sqlite" then return (str_gsub(s, "%$(%d+)", "?%1")) end
    return s
end

local function row(r)
    return { id = r.id, title = r.title, done = r.done == true or r.done == 1 }
end

function store:query(sql, ...)
    local db, err = self:db()
    if not db then return nil, err end
    return db:query(self:sql(sql), ...)
end

-- syntax: todos, err = s:list()
function store:list()
    local rows, err = self:query("SELECT id, title, done FROM todo ORDER BY id")
    if not rows then return nil, err end
    local out = {}
    for i = 1, #rows do out[i] = row(rows[i]) end
    return out
end

-- syntax: todo, err = s:get(id) -- false when there is none
function store:get(id)
    local rows, err = self:query("SELECT id, title, done FROM todo WHERE id = $1", id)
    if not rows then return nil, err end
    return rows[1] and row(rows[1]) or false
end

-- syntax: todo, err = s:create(title, done)
function store:create(title, done)
    local rows, err = self:query(
        "INSERT INTO todo(title, done) VALUES ($1, $2) RETURNING id, title, done", title, done)
    if not rows then return nil, err end
    return row(rows[1])
end

-- syntax: todo, err = s:update(id, { title = ..., done = ... }) -- false when there is none
function store:update(id, fields)
    local rows, err = self:query(
        "UPDATE todo SET title = COALESCE($2, title), done = COALESCE($3, done) WHERE id = $1 " ..
        "RETURNING id, title, done", id, fields.title, fields.done)
    if not rows then return nil, err end
    return rows[1] and row(rows[1]) or false
end

-- syntax: found, err = s:delete(id)
function store:delete(id)
    local rows, err = self:query("DELETE FROM todo WHERE id = $1 RETURNING id", id)
    if not rows then return nil, err end
    return rows[1] ~= nil
end

function store:close()
    if self.handle then self.handle:close() end
    self.handle, self.ready = nil, false
end

-- -- Validation -----------------------------------------------------------------------------------

-- linear in #s, whatever a client sends (a "^%s*(.-)%s*$" pattern backtracks: minutes for a
-- 1 MiB run of spaces)
local trim = require("moonlet.url").trim

-- Checks the fields of a create (partial = false) or an update; returns the clean fields, or nil
-- and { field = "what is wrong" }.
local function validate(input, partial)
    local out, errors, bad = {}, {}, false
    if type(input) ~= "table" then return nil, { body = "must be a JSON object" } end
    local title = input.title
    if title == nil or title == json.null then
        if not partial then errors.title, bad = "is required", true end
    elseif type(title) ~= "string" then
        errors.title, bad = "must be a string", true
    else
        title = trim(title)
        if title == "" then
            errors.title, bad = "must not be empty", true
        elseif chars(title) > MAX_TITLE then -- characters, as the table's length() counts them
            errors.title, bad = "must be at most " .. MAX_TITLE .. " characters", true
        else
            out.title = title
        end
    end
    local done = input.done
    if done == "true" or done == "on" or done == "1" then done = true end
    if done == "false" or done == "0" then done = false end
    if done ~= nil and done ~= json.null then
        if type(done) ~= "boolean" then
            errors.done, bad = "must be true or false", true
        else
            out.done = done
        end
    end
    if partial and not bad and out.title == nil and out.done == nil then
        errors.body, bad = "nothing to change (title, done)", true
    end
    if bad then return nil, errors end
    return out
end

-- The body of a request as a table: a form, or JSON (also when a client such as `curl -d` sent
-- JSON labelled as a form).
local function input_of(req)
    local body, err = req:body()
    if not body then return nil, err end
    local ctype = req:header("content-type") or ""
    if ctype:find("application/x-www-form-urlencoded", 1, true) and not body:find("^%s*{") then
        return req:form()
    end
    local v = json.decode(body)
    if v == nil then return nil, "invalid JSON" end
    return v
end

local function id_of(req)
    local id = tonumber(req.params.id)
    if not id or id ~= id or id % 1 ~= 0 or id < 1 or id > 2 ^ 53 then return nil end
    return id
end

-- -- HTML -----------------------------------------------------------------------------------------

local escapes = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                  ["'"] = "&#39;" }
local function esc(s)
    return (str_gsub(tostring(s), "[&<>\"']", escapes))
end

local PAGE_HEAD = [[<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Todo · moonlet</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 36rem; margin: 2rem auto; padding: 0 1rem;
         color: #222; }
  h1 { font-size: 1.6rem; margin-bottom: .2rem; }
  .meta { color: #777; font-size: .85rem; margin-top: 0; }
  form.add { display: flex; gap: .5rem; margin: 1rem 0; }
  form.add input[type=text] { flex: 1; padding: .45rem .6rem; font-size: 1rem; }
  button { padding: .4rem .8rem; font-size: .95rem; cursor: pointer; }
  ul { list-style: none; padding: 0; }
  li { display: flex; align-items: center; gap: .6rem; padding: .4rem 0; border-bottom: 1px solid #eee; }
  li .title { flex: 1; }
  li.done .title { text-decoration: line-through; color: #999; }
  li form { margin: 0; }
  .error { color: #b00020; background: #fdecee; padding: .5rem .7rem; border-radius: 4px; }
  .empty { color: #999; }
</style></head><body>
]]

local function render(todos, opts)
    opts = opts or {}
    local out = { PAGE_HEAD, "<h1>Todo</h1>\n<p class=\"meta\">", esc(opts.backend or ""),
                  " · JSON at <a href=\"/api/todos\">/api/todos</a></p>\n" }
    if opts.error then out[#out + 1] = "<p class=\"error\">" .. esc(opts.error) .. "</p>\n" end
    out[#out + 1] = '<form class="add" method="post" action="/todos">' ..
        '<input type="text" name="title" maxlength="200" placeholder="What needs doing?" ' ..
        'required autofocus value="' .. esc(opts.title or "") .. '">' ..
        '<button type="submit">Add</button></form>\n<ul>\n'
    if #todos == 0 then out[#out + 1] = '<li class="empty">Nothing to do.</li>\n' end
    for i = 1, #todos do
        local t = todos[i]
        out[#out + 1] = ('<li class="%s"><form method="post" action="/todos/%d/toggle">' ..
            '<button type="submit" title="%s">%s</button></form>' ..
            '<span class="title">%s</span>' ..
            '<form method="post" action="/todos/%d/delete"><button type="submit" ' ..
            'title="Delete">✕</button></form></li>\n'):format(
                t.done and "done" or "open", t.id, t.done and "Mark as not done" or "Mark as done",
                t.done and "☑" or "☐", esc(t.title), t.id)
    end
    out[#out + 1] = "</ul>\n</body></html>\n"
    return concat(out)
end

-- -- The app ------------------------------------------------------------------------------------

local function fail(err)
    moonlet.log("error", "todo: database: ", err)
    return 500, { error = "database error" }
end

-- syntax: app = todo.app(opts) -- opts: database_url (PostgreSQL) or sqlite (a file path),
-- pool_size; or store (one made by todo.store)
function _M.app(opts)
    opts = opts or {}
    local s = opts.store or _M.store(opts)
    local backend = opts.database_url and "PostgreSQL" or "SQLite"
    local app = moonlet.app()
    app.store = s

    app:get("/api/todos", function(_, res)
        local todos, err = s:list()
        if not todos then return fail(err) end
        if not todos[1] then -- "[]", not "{}", whatever cjson makes of an empty table
            res:type("json")
            return "[]"
        end
        return todos
    end)

    app:post("/api/todos", function(req, res)
        local input, err = input_of(req)
        if input == nil then return 400, { error = err } end
        local fields, errors = validate(input, false)
        if not fields then return 422, { error = "validation failed", fields = errors } end
        local todo, e = s:create(fields.title, fields.done or false)
        if not todo then return fail(e) end
        res:header("Location", "/api/todos/" .. todo.id)
        return 201, todo
    end)

    app:get("/api/todos/:id", function(req)
        local id = id_of(req)
        if not id then return 404, { error = "not found" } end
        local todo, err = s:get(id)
        if todo == nil then return fail(err) end
        if not todo then return 404, { error = "not found" } end
        return todo
    end)

    app:patch("/api/todos/:id", function(req)
        local id = id_of(req)
        if not id then return 404, { error = "not found" } end
        local input, err = input_of(req)
        if input == nil then return 400, { error = err } end
        local fields, errors = validate(input, true)
        if not fields then return 422, { error = "validation failed", fields = errors } end
        local todo, e = s:update(id, fields)
        if todo == nil then return fail(e) end
        if not todo then return 404, { error = "not found" } end
        return todo
    end)

    app:delete("/api/todos/:id", function(req)
        local id = id_of(req)
        if not id then return 404, { error = "not found" } end
        local found, err = s:delete(id)
        if found == nil then return fail(err) end
        if not found then return 404, { error = "not found" } end
        return 204
    end)

    -- The page: plain forms that POST and are redirected back (303) to the list.
    local function page(res, status, extra)
        local todos, err = s:list()
        if not todos then
            moonlet.log("error", "todo: database: ", err)
            return 500, "database error\n"
        end
        extra = extra or {}
        extra.backend = backend
        res:type("html")
        return status or 200, render(todos, extra)
    end

    app:get("/", function(_, res) return page(res) end)

    app:post("/todos", function(req, res)
        local form = req:form() or {}
        local fields, errors = validate(form, false)
        if not fields then
            return page(res, 422, { error = "Title " .. (errors.title or "is invalid"),
                                    title = form.title })
        end
        local todo, err = s:create(fields.title, false)
        if not todo then return fail(err) end
        res:redirect("/", 303)
    end)

    app:post("/todos/:id/toggle", function(req, res)
        local id = id_of(req)
        local todo, err = false, nil
        if id then todo, err = s:get(id) end
        if todo == nil then return fail(err) end
        if todo then
            local ok, e = s:update(id, { done = not todo.done })
            if ok == nil then return fail(e) end
        end
        res:redirect("/", 303)
    end)

    app:post("/todos/:id/delete", function(req, res)
        local id = id_of(req)
        if id then
            local ok, err = s:delete(id)
            if ok == nil then return fail(err) end
        end
        res:redirect("/", 303)
    end)

    return app
end

_M.validate = validate

return _M
