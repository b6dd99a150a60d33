-- spec/template_spec.lua: moonlet.template: etlua's tags, HTML escaping, the template's line
-- numbers in errors, renders of one template in flight at once, and a loader over real files
-- (include, a changed file compiled again, names that leave the directory refused), served over
-- real sockets.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local template = moonlet.template

-- a fresh directory with these files in it; removed when the `it` ends
local function views(files)
    local dir = os.tmpname()
    os.remove(dir)
    assert(moonlet.fs.mkdir(dir))
    for name, text in pairs(files) do assert(moonlet.fs.write(dir .. "/" .. name, text)) end
    test.defer(function() os.execute("rm -rf '" .. dir .. "'") end)
    return dir
end

describe("moonlet.template", function()
    it("escapes <%= %>, leaves <%- %> as it is, runs <% %> as Lua", function()
        local t = assert(template.compile([[
<h1><%= title %></h1><%- html %>
<% for i, item in ipairs(items) do %><li><%= i %>. <%= item %></li><% end %>
<%= missing %>|<%= 1 + 1 %>|<%= string.upper("lua") %>]], "page"))
        local out = t({ title = [[<a href="x" onclick='y'>&</a>]], html = "<br>", items = { "a<", "b" } })
        assert.same([[
<h1>&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;</h1><br>
<li>1. a&lt;</li><li>2. b</li>
|2|LUA]], out)
        assert.same("<p>x</p>", template.compile("<p><%= v %></p>")({ v = "x" }))
        assert.same("&lt;&gt;&amp;&quot;&#39;", template.escape([[<>&"']]))
        assert.same("", template.escape(nil))
    end)

    it("-%> eats the newline after a tag (LF or CRLF)", function()
        local t = assert(template.compile("<% if true then -%>\nyes\n<% end -%>\r\nend"))
        assert.same("yes\nend", t())
    end)

    it("says where a template is broken, by its own line numbers", function()
        local f, err = template.compile("line 1\nline 2\n<% if x then %>\nno end", "broken.html")
        assert.is_nil(f)
        assert.truthy(err:find("^broken.html:%d+:"), err)
        f, err = template.compile("a\nb\n<%= x", "open.html")
        assert.same({ nil, "open.html:3: <% without %>" }, { f, err })
        local t = assert(template.compile("1\n2\n3\n<%= nothing.field %>", "runtime.html"))
        local ok, rerr = pcall(t, {})
        assert.is_false(ok)
        assert.truthy(tostring(rerr):find("runtime.html:4:", 1, true), rerr)
        assert.has_error(function() t("not a table") end)
        assert.has_error(function() template.compile(42) end)
    end)

    it("renders one template for two requests at once, each with its own values", function()
        local t = assert(template.compile("<%= who %>:<% wait() %><%= who %>"))
        local function wait() moonlet.sleep(0.02) end
        local results = moonlet.gather({
            function() return t({ who = "a", wait = wait }) end,
            function() return t({ who = "b", wait = wait }) end,
        })
        assert.same({ "a:a", "b:b" }, results)
    end)

    it("loads files by name, includes others, compiles a changed one again", function()
        local dir = views({
            ["page.html"] = "<ul><% for _, u in ipairs(users) do %>"
                .. "<%- include('item.html', { u = u }) %><% end %></ul>",
            ["item.html"] = "<li><%= u %></li>",
            ["outer.html"] = "[<%- include('inner.html') %>]",
            ["inner.html"] = "<%= x %>",
        })
        local v = template.loader(dir, { check = 0 }) -- the files' stat on every render
        assert.same("<ul><li>&lt;a&gt;</li><li>b</li></ul>",
                    v:render("page.html", { users = { "<a>", "b" } }))
        assert.same("[7]", v:render("outer.html", { x = 7 })) -- include takes the includer's values
        assert(moonlet.fs.write(dir .. "/inner.html", "<%= y %>")) -- same size, same second
        assert.same("[8]", v:render("outer.html", { y = 8 }))
        for _, bad in ipairs({ "../x.html", "/etc/passwd", "a/../../b", "", "nope.html" }) do
            assert.has_error(function() v:render(bad) end)
        end
        assert.has_error(function() template.loader(dir .. "/none") end)
        local fixed = template.loader(dir, { check = false }) -- compiled once, never looked at again
        assert.same("[9]", fixed:render("outer.html", { y = 9 }))
        assert(moonlet.fs.write(dir .. "/inner.html", "<%= z %>"))
        assert.same("[9]", fixed:render("outer.html", { y = 9 }))
        assert.has_error(function() template.loader(dir, { check = "often" }) end)
    end)

    it("renders a template into its layout, with the values of both", function()
        local dir = views({
            ["base.html"] = "<title><%= title %></title><main><%- content %></main><%= user %>",
            ["page.html"] = "<% layout('base.html', { title = 'Home & more' }) %><p><%= user %></p>",
            ["plain.html"] = "<p>no layout</p>",
            ["loop.html"] = "<% layout('loop.html') %>x",
        })
        local v = template.loader(dir)
        assert.same("<title>Home &amp; more</title><main><p>&lt;ada&gt;</p></main>&lt;ada&gt;",
                    v:render("page.html", { user = "<ada>" }))
        assert.same("<p>no layout</p>", v:render("plain.html"))
        assert.has_error(function() v:render("loop.html") end)
    end)

    it("refuses a symlink out of its directory, and a template that includes itself", function()
        local outside = views({ ["secret.html"] = "secret" })
        local dir = views({ ["self.html"] = "<%- include('self.html') %>" })
        assert(os.execute("ln -s '" .. outside .. "/secret.html' '" .. dir .. "/link.html'"))
        assert(os.execute("ln -s '" .. outside .. "' '" .. dir .. "/sub'"))
        local v = template.loader(dir)
        assert.has_error(function() v:render("link.html") end)
        assert.has_error(function() v:render("sub/secret.html") end)
        local ok, err = pcall(v.render, v, "self.html")
        assert.is_false(ok)
        assert.truthy(tostring(err):find("includes 50 deep", 1, true), err)
    end)

    it("compiles a template once for renders that come together", function()
        local dir = views({ ["p.html"] = "<%= n %>" })
        local fs = require "moonlet.fs"
        local real_read, reads = fs.read, 0
        fs.read = function(...) reads = reads + 1; return real_read(...) end
        test.defer(function() fs.read = real_read end)
        local v = template.loader(dir)
        local fns = {}
        for i = 1, 10 do fns[i] = function() return v:render("p.html", { n = i }) end end
        assert.same({ "1", "2", "3", "4", "5", "6", "7", "8", "9", "10" }, moonlet.gather(fns))
        assert.same(1, reads)
    end)

    it("keeps its own names apart, takes comments and %> in strings, and counts lines right", function()
        assert.same("3 rows", template.compile("<%= #table %> rows")({ table = { 1, 2, 3 } }))
        assert.same("x", template.compile("<% local _n, _b = 5, 6 %>x")())
        assert.same("a\nb", template.compile("a<% -- a comment %>\nb")())
        assert.same("1", template.compile("<%= x -- the x %>")({ x = 1 }))
        assert.same("%&gt;|]]%>", template.compile([=[<%= "%>" %>|<%- [==[]]%>]==] %>]=])())
        assert.same("it&#39;s", template.compile([[<%= 'it\'s' %>]])())
        local t = assert(template.compile("<% -- one %>\n<% -- two %>\n<%= nothing.here %>", "c.html"))
        local ok, err = pcall(t, {})
        assert.is_false(ok)
        assert.truthy(tostring(err):find("c.html:3:", 1, true), err)
        local f, cerr = template.compile("<% -- x %>\n<% -- y -%>\nok\n<% if %>", "d.html")
        assert.is_nil(f)
        assert.truthy(cerr:find("^d.html:4:"), cerr)
    end)

    it("serves pages from a handler; a broken template is a 500, the server goes on", function()
        local dir = views({ ["hi.html"] = "<p>hi <%= name %></p>", ["bad.html"] = "<% if %>" })
        local app = moonlet.app()
        local v = template.loader(dir)
        app:get("/hi/:name", function(req, res)
            res:type("html")
            return v:render("hi.html", { name = req.params.name })
        end)
        app:get("/bad", function() return v:render("bad.html") end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local r = test.request(port, "GET", "/hi/%3Cb%3E")
        assert.same({ 200, "<p>hi &lt;b&gt;</p>", "text/html; charset=utf-8" },
                    { r.status, r.body, r.headers["content-type"] })
        assert.same(500, test.request(port, "GET", "/bad").status)
        assert.same(200, test.request(port, "GET", "/hi/x").status)
    end)
end)
