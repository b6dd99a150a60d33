-- apps/welcome/app.lua: the default app (`make run`): a page at / that says what moonlet is, and the
-- demos it links to, all served by this one process. The code shown next to each demo is cut from
-- this very file at start-up, between a `-- demo:NAME` line and the next `-- end` line, so the page
-- cannot drift from the code. Building the app only reads files (this one, page.html) and builds
-- the page; nothing listens until the app is served (`moonlet apps/welcome/app.lua`, app:listen()).
local moonlet = require "moonlet"

local io_open, error, tostring, pairs = io.open, error, tostring, pairs
local str_find, str_sub, str_gsub, str_match = string.find, string.sub, string.gsub, string.match
local concat = table.concat

-- This file's own path ("@apps/welcome/app.lua" when run or dofile'd) and its directory.
local source = debug.getinfo(1, "S").source
if str_sub(source, 1, 1) ~= "@" then
    error("apps/welcome/app.lua must be loaded from its file (it reads its own source)")
end
source = str_sub(source, 2)
local here = str_match(source, "^(.*)/") or "."

local app = moonlet.app()

-- Every response says "no sniffing": browsers show a text/plain stream as it arrives, and never
-- guess a type the server did not send.
app:use(function(_, res, nxt)
    res:header("X-Content-Type-Options", "nosniff")
    return nxt()
end)

-- demo:hello
app:get("/hello", function()
    -- a string is sent as text/plain
    return "Hello, World!"
end)
-- end

-- demo:json
app:get("/users/:id", function(req)
    -- a table is sent as JSON
    return { id = req.params.id, q = req.query.q }
end)
-- end

-- demo:countdown
app:get("/countdown", function(req, res)
    for i = 5, 1, -1 do
        res:write(i .. "\n")  -- goes out now, one chunk
        moonlet.sleep(0.3)    -- yields; others are served
    end
    res:write("liftoff!\n")
end)
-- end

-- demo:slow
app:get("/slow", function(req)
    local s = tonumber(req.query.s) or 1
    if s ~= s or s < 0 then s = 0 end     -- nan or negative
    if s > 5 then s = 5 end               -- at most 5 seconds
    local started = moonlet.now()
    -- this request waits; the server goes on serving others
    moonlet.sleep(s)
    return ("slept %.3f s\n"):format(moonlet.now() - started)
end)
-- end

-- demo:echo
app:post("/echo", function(req)
    local body, err = req:body()  -- yields until it is all in
    if not body then return 400, err .. "\n" end
    return body
end)
-- end

-- demo:static
-- this page's stylesheet: /assets/style.css
app:static("/assets", here .. "/public")
-- end

-- -- The page --------------------------------------------------------------------------------

local function read_file(path)
    local f, err = io_open(path, "rb")
    if not f then error("welcome: " .. err, 2) end
    local s = f:read("*a")
    f:close()
    return s
end

-- Returns { name = code } for each `-- demo:NAME` ... `-- end` block of src, without the markers.
local function cut_snippets(src)
    local snippets, name, lines = {}, nil, nil
    for line in src:gmatch("([^\n]*)\n?") do
        if name then
            if line == "-- end" then
                snippets[name] = concat(lines, "\n")
                name = nil
            else
                lines[#lines + 1] = line
            end
        else
            name = str_match(line, "^%-%- demo:([%w_-]+)$")
            if name then lines = {} end
        end
    end
    if name then error("welcome: demo:" .. name .. " has no `-- end` line", 2) end
    return snippets
end

local html_entities = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                        ["'"] = "&#39;" }
local function escape_html(s)
    return (str_gsub(s, "[&<>\"']", html_entities))
end

local keywords = {}
for w in ([[and break do else elseif end false for function goto if in local nil not or repeat
            return then true until while]]):gmatch("%a+") do
    keywords[w] = true
end

-- Returns the class and the last index of the token of code that starts at i (class nil: plain).
local function token_at(code, i)
    local c = str_sub(code, i, i)
    if str_find(code, "^%-%-", i) then
        local nl = str_find(code, "\n", i, true)
        return "c", (nl or #code + 1) - 1
    elseif c == '"' or c == "'" then
        local j = i + 1
        while j <= #code do
            local d = str_sub(code, j, j)
            if d == "\\" then
                j = j + 1
            elseif d == c or d == "\n" then
                break
            end
            j = j + 1
        end
        return "s", j
    elseif str_find(c, "[%a_]") then
        local _, e = str_find(code, "^[%w_]+", i)
        return keywords[str_sub(code, i, e)] and "k" or nil, e
    elseif str_find(c, "%d") then
        local _, e = str_find(code, "^[%w.]+", i)
        return "n", e
    end
    return nil, i
end

-- Returns Lua code as HTML: escaped, keywords, strings, numbers and comments in <span>s.
local function highlight(code)
    local out, n, i = {}, 0, 1
    while i <= #code do
        local class, e = token_at(code, i)
        local text = escape_html(str_sub(code, i, e))
        n = n + 1
        out[n] = class and ('<span class="' .. class .. '">' .. text .. "</span>") or text
        i = e + 1
    end
    return concat(out)
end

-- Fills {{name}} in the template: {{version}}, or the highlighted snippet of that demo. A name
-- with no demo, or a demo the page does not show, is an error at start-up: a renamed or a new demo
-- cannot leave a hole in the page, nor go missing from it.
local function render(template, snippets)
    local shown = {}
    local html = str_gsub(template, "{{([%w_-]+)}}", function(name)
        if name == "version" then return escape_html(tostring(moonlet._VERSION)) end
        local code = snippets[name]
        if not code then error("welcome: page.html wants {{" .. name .. "}}, no such demo", 0) end
        shown[name] = true
        return highlight(code)
    end)
    for name in pairs(snippets) do
        if not shown[name] then error("welcome: demo:" .. name .. " is not on page.html", 0) end
    end
    return html
end

local page = render(read_file(here .. "/page.html"), cut_snippets(read_file(source)))

app:get("/", function(_, res)
    res:type("html")
    return page
end)

return app
