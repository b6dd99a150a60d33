-- lua/moonlet/template.lua: moonlet.template, HTML templates in etlua's syntax (the engine of Lapis,
-- so Lua web developers know it): text, with Lua between the tags:
--   <%= expr %>   the value, HTML-escaped (nil is "")      <%- expr %>   the value as it is
--   <% code %>    any Lua statements (loops, ifs, locals)    -%>           also eats the newline after
-- A template compiles once into a Lua function (loadstring, no interpreter per render) whose
-- chunk keeps the template's line numbers, so an error says "views/index.html:12: ...". Its
-- globals are the values given to render, then helpers (escape, include), then Lua's own.
--
-- A render runs in a fresh closure of the compiled chunk with its own environment, so two renders
-- of one template may be in flight at once (a template that waits: include reads files with
-- moonlet.fs, which yields). Templates are code: load them from files you trust, not from users.
--
-- A loader finds templates in a directory (taken like app:static's: from the current directory,
-- else from the calling script's), compiles each once, and compiles it again when its file changes
-- (its stat checked on each render: edit a template and reload the page).
local core = require "moonlet.core"

local type, tostring, error, setmetatable, setfenv, loadstring, pcall = type, tostring, error,
    setmetatable, setfenv, loadstring, pcall
local find, sub, gsub, format, match = string.find, string.sub, string.gsub, string.format,
    string.match
local concat = table.concat

local _M = {}

local ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

-- syntax: s = template.escape(v) -- v as text safe in HTML content and quoted attributes
local function escape(v)
    if v == nil then return "" end
    return (gsub(tostring(v), "[&<>\"']", ESCAPES))
end
_M.escape = escape

local function raw(v)
    if v == nil then return "" end
    return tostring(v)
end

-- The Lua source of a template: a function of (_esc, _raw) whose body appends to _b. Text goes in
-- %q strings (a newline becomes backslash-newline: the line count stays the template's).
local function translate(src, name)
    local out, n = { "local _esc, _raw = ... local _b, _n = {}, 0 " }, 1
    local pos, len = 1, #src
    while pos <= len do
        local open = find(src, "<%", pos, true)
        local text = sub(src, pos, (open or len + 1) - 1)
        if text ~= "" then
            n = n + 1
            out[n] = "_n = _n + 1 _b[_n] = " .. format("%q", text) .. " "
        end
        if not open then break end
        local kind = sub(src, open + 2, open + 2)
        local code_start = open + 2
        if kind == "=" or kind == "-" then code_start = code_start + 1 else kind = "" end
        local close = find(src, "%>", code_start, true)
        if not close then
            local line = select(2, gsub(sub(src, 1, open), "\n", "")) + 1
            error(name .. ":" .. line .. ": <% without %>", 0)
        end
        local code_end, after = close - 1, close + 2
        local trim = sub(src, close - 1, close - 1) == "-" and close - 1 >= code_start
        if trim then code_end = close - 2 end
        local code = sub(src, code_start, code_end)
        n = n + 1
        if kind == "=" then
            out[n] = "_n = _n + 1 _b[_n] = _esc(" .. code .. ") "
        elseif kind == "-" then
            out[n] = "_n = _n + 1 _b[_n] = _raw(" .. code .. ") "
        else
            out[n] = code .. " "
        end
        if trim then -- the newline after the tag goes, but the chunk keeps its line
            if sub(src, after, after + 1) == "\r\n" then
                after = after + 2; n = n + 1; out[n] = "\n"
            elseif sub(src, after, after) == "\n" then
                after = after + 1; n = n + 1; out[n] = "\n"
            end
        end
        pos = after
    end
    n = n + 1
    out[n] = " return table.concat(_b, '', 1, _n)"
    return concat(out)
end

-- syntax: f, err = template.compile(source, name) -- f(values) renders it to a string; err when
-- the template does not compile ("name:line: reason")
function _M.compile(src, name, helpers)
    if type(src) ~= "string" then error("moonlet.template: a template is a string", 2) end
    name = name or "template"
    local ok, lua = pcall(translate, src, name)
    if not ok then return nil, lua end
    -- a factory: each render takes a new closure (its own environment) of the compiled chunk
    local chunk, err = loadstring("return function(...) " .. lua .. " end", "=" .. name)
    if not chunk then return nil, err end
    return function(values)
        if values ~= nil and type(values) ~= "table" then
            error("moonlet.template: the values of a render are a table", 2)
        end
        values = values or {}
        local f = chunk()
        setfenv(f, setmetatable({}, { __index = function(_, k)
            local v = values[k]
            if v ~= nil then return v end
            if helpers then
                v = helpers(k, values)
                if v ~= nil then return v end
            end
            if k == "escape" then return escape end
            return _G[k]
        end }))
        return f(escape, raw)
    end
end

local function safe_name(name)
    if type(name) ~= "string" or name == "" or find(name, "\0", 1, true) or find(name, "\\", 1, true)
        or sub(name, 1, 1) == "/" then
        return nil
    end
    for seg in name:gmatch("[^/]+") do
        if seg == ".." or seg == "." then return nil end
    end
    return name
end

local loader_mt = {}
loader_mt.__index = loader_mt

-- syntax: views = template.loader(dir) -- templates by name under dir (see the file head)
function _M.loader(dir, level)
    if type(dir) ~= "string" then error("moonlet.template.loader: a directory is a path", 2) end
    local src = debug.getinfo((level or 1) + 1, "S").source
    local base = require("moonlet.app").script_dir
    if sub(src, 1, 1) == "@" then base = match(src, "^@(.*)/[^/]*$") or "." end
    local root = core.realpath(dir)
    if not root and sub(dir, 1, 1) ~= "/" and base then root = core.realpath(base .. "/" .. dir) end
    if not root then error("moonlet.template.loader: no directory " .. dir, 2) end
    return setmetatable({ root = root, compiled = {} }, loader_mt)
end

-- the compiled template of name, compiled again when its file changed; raises on a missing or
-- broken one (a handler's error: 500, the reason in the log)
function loader_mt:get(name)
    local rel = safe_name(name)
    if not rel then error("moonlet.template: bad template name " .. tostring(name), 3) end
    local path = self.root .. "/" .. rel
    local st = core.stat(path)
    if not st or st.type ~= "file" then error("moonlet.template: no template " .. rel, 3) end
    local c = self.compiled[rel]
    if c and c.mtime == st.mtime and c.size == st.size and c.ino == st.ino and c.ctime == st.ctime
        and c.ctime_nsec == st.ctime_nsec then
        return c.fn
    end
    local text, err = require("moonlet.fs").read(path)
    if not text then error("moonlet.template: " .. rel .. ": " .. tostring(err), 3) end
    local loader = self
    local function helpers(k, values)
        if k == "include" then
            return function(other, more) return loader:render(other, more or values) end
        end
    end
    local fn, cerr = _M.compile(text, rel, helpers)
    if not fn then error("moonlet.template: " .. cerr, 3) end
    self.compiled[rel] = { fn = fn, mtime = st.mtime, size = st.size, ino = st.ino, ctime = st.ctime,
                           ctime_nsec = st.ctime_nsec }
    return fn
end

-- syntax: html = views:render(name, values) -- inside a template, include(name, values) renders
-- another one in place (values: the includer's by default); its text is not escaped again
function loader_mt:render(name, values)
    return self:get(name)(values)
end

return _M
