-- lua/moonlet/template.lua: moonlet.template, HTML templates in etlua's syntax (the engine of Lapis,
-- so Lua web developers know it): text, with Lua between the tags:
--   <%= expr %>   the value, HTML-escaped (nil is "")      <%- expr %>   the value as it is
--   <% code %>    any Lua statements (loops, ifs, locals)    -%>           also eats the newline after
-- A `%>` inside a Lua string of the code does not close its tag. A template compiles once into a
-- Lua function (loadstring, no interpreter per render); errors, at compile time and at render
-- time, name the template and its own line ("views/index.html:12: ..."). Its globals are the
-- values given to render, then helpers (escape; include and layout in a loader's), then Lua's own.
-- The generated code's own names start with `_tpl_`.
--
-- A render runs in a fresh closure of the compiled chunk with its own environment, so two renders
-- of one template may be in flight at once (a template that waits: include may read a file with
-- moonlet.fs, which yields). Templates are code: load them from files you trust, not from users.
--
-- A loader finds templates in a directory (taken like app:static's: from the current directory,
-- else from the calling script's; names and symlinks that lead out of it are refused), compiles
-- each once, and compiles it again when its file changes: its stat is checked at most once a
-- second (opts.check: seconds, 0 on every render, false never), so edit a template and reload the
-- page. Renders of a template not compiled yet wait for the one compiling it.
local core = require "moonlet.core"
local static = require "moonlet.static"
local same_version = static.same_version

local type, tostring, error, setmetatable, setfenv, loadstring, pcall, select, tonumber = type,
    tostring, error, setmetatable, setfenv, loadstring, pcall, select, tonumber
local find, sub, gsub, format, match, byte = string.find, string.sub, string.gsub, string.format,
    string.match, string.byte
local concat = table.concat

local _M = {}

local ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

-- syntax: s = template.escape(v) -- v as text safe in HTML content and quoted attributes
local function escape(v)
    if v == nil then return "" end
    local t = type(v)
    if t == "number" then return tostring(v) end
    if t ~= "string" then v = tostring(v) end
    if not find(v, "[&<>\"']") then return v end
    return (gsub(v, "[&<>\"']", ESCAPES))
end
_M.escape = escape

local function raw(v)
    if v == nil then return "" end
    return tostring(v)
end

local function count_lines(s)
    return select(2, gsub(s, "\n", ""))
end

-- The position of the `%>` that closes a tag whose code starts at i, skipping Lua strings
-- ('...', "...", [[...]], [==[...]==]) in the code; nil when there is none.
local function find_close(src, i)
    local len = #src
    while i <= len do
        local c = byte(src, i)
        if c == 37 and byte(src, i + 1) == 62 then return i end -- "%>"
        if c == 34 or c == 39 then -- a quoted string: to its unescaped quote (or the line's end)
            local j = i + 1
            while j <= len do
                local d = byte(src, j)
                if d == 92 then j = j + 1 elseif d == c or d == 10 then break end
                j = j + 1
            end
            i = j + 1
        elseif c == 91 and match(src, "^%[=*%[", i) then -- a long string
            local eqs = match(src, "^%[(=*)%[", i)
            local _, stop = find(src, "]" .. eqs .. "]", i + 2 + #eqs, true)
            if not stop then return nil end
            i = stop + 1
        else
            i = i + 1
        end
    end
    return nil
end

-- The Lua source of a template: a function of (_tpl_esc, _tpl_raw, _tpl_concat) whose body appends
-- to _tpl_b, and a table from the source's line numbers to the template's. Text goes in %q strings
-- (a newline becomes backslash-newline: the line count stays the template's); each code part is
-- followed by a newline of its own (a `--` comment in it then ends there), which the table undoes.
local function translate(src, name)
    local out, n = { "local _tpl_esc, _tpl_raw, _tpl_concat = ... local _tpl_b, _tpl_n = {}, 0 " }, 1
    local lines, gen, tpl = { 1 }, 1, 1 -- generated line -> template line; where each one is
    local function advance(text, extra) -- text went out into both; extra newlines into the code only
        local k = count_lines(text)
        for _ = 1, k do gen = gen + 1; tpl = tpl + 1; lines[gen] = tpl end
        for _ = 1, extra do gen = gen + 1; lines[gen] = tpl end
    end
    local pos, len = 1, #src
    while pos <= len do
        local open = find(src, "<%", pos, true)
        local text = sub(src, pos, (open or len + 1) - 1)
        if text ~= "" then
            n = n + 1
            out[n] = "_tpl_n = _tpl_n + 1 _tpl_b[_tpl_n] = " .. format("%q", text) .. " "
            advance(text, 0)
        end
        if not open then break end
        local kind = sub(src, open + 2, open + 2)
        local code_start = open + 2
        if kind == "=" or kind == "-" then code_start = code_start + 1 else kind = "" end
        local close = find_close(src, code_start)
        if not close then error(name .. ":" .. tpl .. ": <% without %>", 0) end
        local code_end, after = close - 1, close + 2
        local trim = close - 1 >= code_start and sub(src, close - 1, close - 1) == "-"
        if trim then code_end = close - 2 end
        local code = sub(src, code_start, code_end)
        n = n + 1
        if kind == "=" then
            out[n] = "_tpl_n = _tpl_n + 1 _tpl_b[_tpl_n] = _tpl_esc(" .. code .. "\n) "
        elseif kind == "-" then
            out[n] = "_tpl_n = _tpl_n + 1 _tpl_b[_tpl_n] = _tpl_raw(" .. code .. "\n) "
        else
            out[n] = code .. "\n "
        end
        advance(code, 1)
        if trim then -- the newline after the tag goes from the output, not from the line count
            local nl = sub(src, after, after + 1) == "\r\n" and 2 or sub(src, after, after) == "\n" and 1
            if nl then
                after = after + nl
                n = n + 1; out[n] = "\n"
                advance("\n", 0)
            end
        end
        pos = after
    end
    n = n + 1
    out[n] = " return _tpl_concat(_tpl_b, '', 1, _tpl_n)"
    return concat(out), lines
end

-- "name:LINE:" of the generated code in a message, as the template's line
local function relined(msg, name, lines)
    if type(msg) ~= "string" then return msg end
    local prefix = name .. ":"
    return (gsub(msg, "([^%s]+):(%d+):", function(chunk, line)
        if chunk .. ":" ~= prefix then return nil end
        return chunk .. ":" .. (lines[tonumber(line)] or line) .. ":"
    end))
end

local function rethrow(name, lines, ok, ...)
    if ok then return ... end
    error(relined((...), name, lines), 0)
end

-- syntax: f, err = template.compile(source, name) -- f(values) renders it to a string; err when
-- the template does not compile ("name:line: reason")
function _M.compile(src, name, helpers)
    if type(src) ~= "string" then error("moonlet.template: a template is a string", 2) end
    name = name or "template"
    local ok, lua, lines = pcall(translate, src, name)
    if not ok then return nil, lua end
    -- a factory: each render takes a new closure (its own environment) of the compiled chunk
    local chunk, err = loadstring("return function(...) " .. lua .. " end", "=" .. name)
    if not chunk then return nil, relined(err, name, lines) end
    return function(values, ctx)
        if values ~= nil and type(values) ~= "table" then
            error("moonlet.template: the values of a render are a table", 2)
        end
        values = values or {}
        local f = chunk()
        setfenv(f, setmetatable({}, { __index = function(_, k)
            local v = values[k]
            if v ~= nil then return v end
            if helpers then
                v = helpers(k, values, ctx)
                if v ~= nil then return v end
            end
            if k == "escape" then return escape end
            return _G[k]
        end }))
        return rethrow(name, lines, pcall(f, escape, raw, concat))
    end
end

local loader_mt = {}
loader_mt.__index = loader_mt

local MAX_DEPTH = 50 -- includes within includes: more is a template that includes itself

-- syntax: views = template.loader(dir, { check = 1 }) -- templates by name under dir (see the head)
function _M.loader(dir, opts, level)
    if type(dir) ~= "string" then error("moonlet.template.loader: a directory is a path", 2) end
    local check = 1
    if opts and opts.check ~= nil then check = opts.check end
    if check ~= false and type(check) ~= "number" then
        error("moonlet.template.loader: check is a number of seconds or false", 2)
    end
    local src = debug.getinfo((level or 1) + 1, "S").source
    local base = require("moonlet.app").script_dir
    if sub(src, 1, 1) == "@" then base = match(src, "^@(.*)/[^/]*$") or "." end
    local root = static.find_root(dir, base)
    if not root then error("moonlet.template.loader: no directory " .. dir, 2) end
    return setmetatable({ root = root, check = check, compiled = {}, pending = {} }, loader_mt)
end

-- the compiled template of name, compiled again when its file changed; raises on a missing or
-- broken one (a handler's error: 500, the reason in the log)
function loader_mt:get(name)
    local rel = type(name) == "string" and name ~= "" and sub(name, 1, 1) ~= "/"
        and static.safe_relative(name)
    if not rel then error("moonlet.template: bad template name " .. tostring(name), 3) end
    local c = self.compiled[rel]
    local now = core.now()
    if c and (self.check == false or now - c.checked < self.check) then return c.fn end
    local path = static.inside(self.root, self.root .. "/" .. rel) -- no way out, by name or symlink
    local st = path and core.stat(path)
    if not st or st.type ~= "file" then error("moonlet.template: no template " .. rel, 3) end
    if c and same_version(c.version, st) then
        c.checked = now
        return c.fn
    end
    local busy = self.pending[rel]
    if busy then -- another render is compiling it: its result, unless the file changed meanwhile
        busy:wait()
        c = self.compiled[rel]
        if c and same_version(c.version, st) then return c.fn end
    end
    local done = require("moonlet.sync").event()
    self.pending[rel] = done
    local ok, text, err = pcall(require("moonlet.fs").read, path)
    local fn, cerr
    if ok and text then
        local loader = self
        local function helpers(k, values, state) -- state: this render's (loader_mt:render)
            if k == "include" then
                return function(other, more) return loader:render(other, more or values, state.depth + 1) end
            elseif k == "layout" then
                return function(outer, more) state.layout, state.layout_values = outer, more end
            end
        end
        fn, cerr = _M.compile(text, rel, helpers)
        if fn then
            self.compiled[rel] = { fn = fn, checked = now, version = static.version(st) }
        end
    end
    if self.pending[rel] == done then self.pending[rel] = nil end
    done:set()
    if not ok then error(text, 0) end -- (cancelled)
    if not text then error("moonlet.template: " .. rel .. ": " .. tostring(err), 3) end
    if not fn then error("moonlet.template: " .. cerr, 3) end
    return fn
end

-- syntax: html = views:render(name, values) -- inside a template, include(name, values) renders
-- another one in place (values: the includer's by default); write it <%- include(...) %>, its text
-- is escaped already. layout(name, values) renders this template's text into another one, as its
-- `content` (write it <%- content %>), with this template's values and those given (a title).
function loader_mt:render(name, values, depth)
    depth = depth or 0
    if depth > MAX_DEPTH then
        error("moonlet.template: includes " .. MAX_DEPTH .. " deep at " .. tostring(name)
            .. " (a template that includes itself?)", 0)
    end
    local st = { depth = depth, layout = nil, layout_values = nil }
    local body = self:get(name)(values, st)
    if not st.layout then return body end
    local more = st.layout_values
    local outer = setmetatable({ content = body }, { __index = function(_, k)
        local v = more and more[k]
        if v ~= nil then return v end
        return values and values[k]
    end })
    return self:render(st.layout, outer, depth + 1)
end

return _M
