-- apps/todo/app.lua: `moonlet apps/todo/app.lua` serves the todo app (apps/todo/todo.lua) on
-- http://127.0.0.1:8080. Zero setup: the todos live in SQLite, in apps/todo/todo.db (or the file
-- given with `--db PATH` after the script, or in env TODO_DB). With env DATABASE_URL set
-- (postgresql://user:password@host:port/db) they live in PostgreSQL instead.
local source = debug.getinfo(1, "S").source
local here = source:sub(1, 1) == "@" and source:sub(2):match("^(.*)/") or "."

local todo = dofile(here .. "/todo.lua")

local db_path = os.getenv("TODO_DB")
local args = _G.arg or {}
for i = 1, #args do
    if args[i] == "--db" and args[i + 1] then db_path = args[i + 1] end
end

local url = os.getenv("DATABASE_URL")
if url == "" then url = nil end

return todo.app({ database_url = url, sqlite = db_path or (here .. "/todo.db") })
