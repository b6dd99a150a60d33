-- spec/reload_spec.lua: hot reload (lua/moonlet/reload.lua, core/fswatch.c, bindings/fswatch.c):
-- a reload host in this process (load, reload, keep the old code on errors, requests in flight,
-- state across reloads, modules next to the app, the file watcher, memory after 100 reloads, TLS
-- certificates read again), and
-- the `moonlet` command with --reload under steady load and with SIGHUP, as separate processes.
-- Apps are written to a fresh directory per `it`; servers listen on port 0; every wait has a
-- deadline (test.wait_until) and every `it` closes what it opened.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local reload = require "moonlet.reload"
local test = require "moonlet.test"

local defer = test.defer

local function write_file(path, data)
    local f = assert(io.open(path, "wb"))
    assert(f:write(data))
    assert(f:close())
end

local function plain(s)
    return (s:gsub("%p", "%%%0"))
end

-- a fresh directory, removed when the running `it` ends
local function tmpdir()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p '" .. dir .. "'"))
    defer(function() os.execute("rm -rf '" .. dir .. "'") end)
    return dir
end

-- an app answering GET / with `body`; `extra` goes before `return app`
local function app_src(body, extra)
    return ([[
local moonlet = require "moonlet"
local app = moonlet.app()
app:get("/", function() return %q end)
%s
return app
]]):format(body, extra or "")
end

local BROKEN = 'local moonlet = require "moonlet"\nlocal app = moonlet.app()\nlocal x = = 1\nreturn app\n'
local BROKEN_LINE = 3

-- a reload host on dir/app.lua serving on a free port, closed when the `it` ends
local function serve(dir, src, opts)
    local path = dir .. "/app.lua"
    write_file(path, src)
    opts = opts or {}
    opts.path = path
    local host = reload.new(opts)
    defer(function() host:close() end)
    assert(host:load())
    local server, port = host:listen({ host = "127.0.0.1", port = 0 })
    assert(server, port)
    return host, port, path
end

-- Certificate rotation: renew(certs, org) writes a new key and a certificate for localhost with
-- O=org signed by the spec's CA over certs.key and certs.cert (what certbot renew does to the
-- files a server was started with); subject(port, certs) is the subject of the certificate a new
-- TLS connection to port sees (nil and the error when the handshake fails).
local function renew(certs, org)
    local cmd = ("cd %s && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        .. " -keyout new.key -out new.csr -subj '/O=%s/CN=localhost'"
        .. " -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' && openssl x509 -req -in new.csr"
        .. " -CA ca.pem -CAkey ca.key -CAcreateserial -out new.pem -days 2 -copy_extensions copy"
        .. " && mv new.pem server.pem && mv new.key server.key"):format(certs.dir, org)
    local ok = os.execute("(" .. cmd .. ") >/dev/null 2>&1")
    assert(ok == true or ok == 0, "openssl failed")
end

local function subject(port, certs)
    local sock, err = moonlet.tcp.connect("127.0.0.1", port, { tls = { cafile = certs.ca }, timeout = 5 })
    if not sock then return nil, err end
    local t = sock:peer_certificate()
    sock:close()
    return t and t.client_subject
end

-- GET / on a TLS socket kept open (keep-alive): the body
local function https_get(sock)
    assert(sock:send("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    local body
    repeat
        local line = assert(sock:receive("*l"))
        local n = line:match("^[Cc]ontent%-[Ll]ength: *(%d+)")
        if n then body = tonumber(n) end
    until line == ""
    return assert(sock:receive(body))
end

local function get(port, path)
    local r = test.request(port, "GET", path or "/")
    return r.body, r.status
end

local function settle()
    moonlet.sleep(0)
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
end

describe("moonlet.reload", function()
    -- the hosts of this process log each reload at info level: not in the test output
    lazy_setup(function() core.set_log("warn") end)
    lazy_teardown(function() core.set_log("info") end)

    it("replaces the app between requests when the new code loads", function()
        local host, port, path = serve(tmpdir(), app_src("v1"))
        assert.same("v1", get(port))
        local sock = test.connect(port) -- a keep-alive connection opened before the reload
        defer(function() sock:close() end)
        assert(sock:send(test.format_request("GET", "/")))
        assert.same("v1", assert(test.read_response(sock)).body)
        write_file(path, app_src("v2"))
        assert.same({ true }, { host:reload() })
        assert.same("v2", get(port))
        assert(sock:send(test.format_request("GET", "/")))
        assert.same("v2", assert(test.read_response(sock)).body) -- its next request: the new code
        assert.same(1, host.reloads)
    end)

    it("keeps the old code serving after a syntax error and names the file and line", function()
        local host, port, path = serve(tmpdir(), app_src("v1"))
        write_file(path, BROKEN)
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find(plain(path) .. ":" .. BROKEN_LINE .. ":"), err)
        assert.same("v1", get(port))
        assert.same(0, host.reloads)
    end)

    it("keeps the old code when the top level raises or returns no app", function()
        local host, port, path = serve(tmpdir(), app_src("v1"))
        write_file(path, "local x = 1\n\nerror('top-level failure')\n")
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find(plain(path) .. ":3: top%-level failure"), err)
        write_file(path, "return { not_an_app = true }\n")
        ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("did not return an app", 1, true), err)
        assert.same("v1", get(port))
    end)

    it("lets a request in flight finish on the code it started with", function()
        local dir = tmpdir()
        local gate, started = moonlet.event(), moonlet.event()
        local slow = [[
local gate, started = ...
app:get("/slow", function()
    started:set()
    gate:wait(5)
    return "old slow"
end)]]
        local host, port, path = serve(dir, app_src("v1", slow), { args = { gate, started } })
        local sock = test.connect(port)
        defer(function() sock:close() end)
        assert(sock:send(test.format_request("GET", "/slow")))
        assert.is_true(started:wait(5))
        write_file(path, app_src("v2", 'app:get("/slow", function() return "new slow" end)'))
        assert.is_true(host:reload())
        assert.same("new slow", get(port, "/slow")) -- new requests: the new code
        gate:set()
        assert.same("old slow", assert(test.read_response(sock)).body)
    end)

    it("hands the old app's state to app:on_reload", function()
        local counter = [[
app.state = { hits = 0 }
app:get("/hit", function()
    app.state.hits = app.state.hits + 1
    return VERSION .. " " .. app.state.hits
end)]]
        local carry = "app:on_reload(function(old) app.state = old end)\n"
        local host, port, path = serve(tmpdir(), app_src("v1", "local VERSION = 'v1'\n" .. counter))
        get(port, "/hit")
        get(port, "/hit")
        assert.same("v1 3", get(port, "/hit"))
        write_file(path, app_src("v2", "local VERSION = 'v2'\n" .. counter .. "\n" .. carry))
        assert.is_true(host:reload())
        assert.same("v2 4", get(port, "/hit"))
        -- an on_reload that raises fails the reload: the v2 app and its state go on
        write_file(path, app_src("v3", "local VERSION = 'v3'\n" .. counter
                                       .. "\napp:on_reload(function() error('no state for me') end)"))
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("no state for me", 1, true), err)
        assert.same("v2 5", get(port, "/hit"))
    end)

    it("cancels the old load's tasks once the new app serves, but one app.state hands over",
       function()
        local dir = tmpdir()
        local host = serve(dir, app_src("v1", [[
local function loop() while true do moonlet.sleep(0.01) end end
app.state = { ticker = moonlet.spawn(loop) }
app.other = moonlet.spawn(loop)
app:on_reload(function(old)
    app.state.ticker:cancel()
    app.state.ticker = old.ticker
end)]]))
        local a1 = host.app
        assert.truthy(host:reload())
        local a2 = host.app
        assert.truthy(test.wait_until(function() return a1.other:is_done() end, 5))
        assert.is_false(a1.state.ticker:is_done())
        assert.is_true(a2.state.ticker == a1.state.ticker)
        assert.is_false(a2.other:is_done())
        write_file(dir .. "/app.lua", BROKEN)
        assert.is_nil(host:reload())
        assert.is_false(a2.other:is_done()) -- a failed load changes nothing
        host:close() -- and closing the host stops its tasks
        assert.truthy(test.wait_until(function()
            return a2.other:is_done() and a2.state.ticker:is_done()
        end, 5))
    end)

    it("leaves a request's tasks alone at a reload, on coroutines the load's ended tasks used",
       function()
        -- the load's tasks end at once and their coroutines go back to the pool; requests then run
        -- on them: what a request spawns is no task of the load, and a reload must not cancel it
        local dir = tmpdir()
        local host, port = serve(dir, app_src("v1", [[
for _ = 1, 50 do moonlet.spawn(function() end) end
app.bg = {}
app:get("/bg", function()
    app.bg[#app.bg + 1] = moonlet.spawn(function() moonlet.sleep(0.3) return "finished" end)
    return "spawned"
end)]]))
        moonlet.sleep(0.01)
        local a1 = host.app
        for _ = 1, 10 do assert.same("spawned", get(port, "/bg")) end
        assert.truthy(host:reload())
        for i = 1, #a1.bg do
            assert.same({ true, "finished" }, { a1.bg[i]:join(5) })
        end
    end)

    it("reloads the modules the app required from its directory, and restores them on failure",
       function()
        local dir = tmpdir()
        write_file(dir .. "/reload_helper_mod.lua", 'return { msg = "h1" }\n')
        local uses = 'local helper = require "reload_helper_mod"\n'
                     .. 'app:get("/msg", function() return helper.msg end)'
        local host, port, path = serve(dir, app_src("v1", uses))
        assert.same("h1", get(port, "/msg"))
        local old_mod = package.loaded.reload_helper_mod
        write_file(dir .. "/reload_helper_mod.lua", 'return { msg = "h2" }\n')
        assert.is_true(host:reload())
        assert.same("h2", get(port, "/msg"))
        local new_mod = package.loaded.reload_helper_mod
        assert.are_not.equal(old_mod, new_mod)
        -- a module with a syntax error fails the reload; the module the old code uses stays
        write_file(dir .. "/reload_helper_mod.lua", 'return { msg = = "h3" }\n')
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("reload_helper_mod.lua:1:", 1, true), err)
        assert.equal(new_mod, package.loaded.reload_helper_mod)
        assert.same("h2", get(port, "/msg"))
        assert.same({ true }, { path ~= nil })
        host:close()
        assert.is_nil(package.path:find(dir, 1, true)) -- its directory left package.path
        package.loaded.reload_helper_mod = nil
    end)

    it("never reloads the framework", function()
        local host = serve(tmpdir(), app_src("v1", 'local json = require "moonlet.json"'))
        local json = package.loaded["moonlet.json"]
        assert.is_true(host:reload())
        assert.equal(json, package.loaded["moonlet.json"])
        assert.is_nil(host.modules["moonlet.json"])
    end)

    it("watches the app and its modules: writes, rename-replacement, a module change", function()
        local dir = tmpdir()
        write_file(dir .. "/reload_watch_mod.lua", 'return "m1"\n')
        local uses = 'local m = require "reload_watch_mod"\napp:get("/m", function() return m end)'
        local host, port, path = serve(dir, app_src("v1", uses), { debounce = 0.05 })
        defer(function() package.loaded.reload_watch_mod = nil end)
        assert.is_true(host:watch())
        assert.same(2, #host:watched())
        assert.same({ 2, 1 }, { host.watcher:count() }) -- two files, one directory
        write_file(path, app_src("v2", uses)) -- in place: truncate and write
        assert.truthy(test.wait_until(function() return get(port) == "v2" end, 5))
        local tmp = dir .. "/.app.lua.swp" -- as editors save: a new file renamed over the old
        write_file(tmp, app_src("v3", uses))
        assert(os.rename(tmp, path))
        assert.truthy(test.wait_until(function() return get(port) == "v3" end, 5))
        write_file(dir .. "/reload_watch_mod.lua", 'return "m2"\n')
        assert.truthy(test.wait_until(function() return get(port, "/m") == "m2" end, 5))
        write_file(dir .. "/unrelated.txt", "x") -- another file of the directory: no reload
        local n = host.reloads
        moonlet.sleep(0.2)
        assert.same(n, host.reloads)
        host:close()
        assert.is_nil(host.watcher)
    end)

    it("watches a module a handler requires later, and reloads on its edits as on the app's",
       function()
        local dir = tmpdir()
        write_file(dir .. "/reload_lazy_mod.lua", 'return { v = "l1" }\n')
        local lazy = 'app:get("/lazy", function() return require("reload_lazy_mod").v end)'
        local host, port = serve(dir, app_src("v1", lazy), { debounce = 0.05 })
        defer(function() package.loaded.reload_lazy_mod = nil end)
        assert.is_true(host:watch())
        assert.same(1, #host:watched()) -- the top level required nothing of its directory
        assert.same("l1", get(port, "/lazy"))
        assert.same(2, #host:watched()) -- the watch list grew when the handler required it
        assert.same({ 2, 1 }, { host.watcher:count() })
        write_file(dir .. "/reload_lazy_mod.lua", 'return { v = "l2" }\n')
        assert.truthy(test.wait_until(function() return get(port, "/lazy") == "l2" end, 5))
        assert.same(1, host.reloads)
        assert.same(2, #host:watched()) -- still watched after the reload
        -- a broken edit of it fails the reload: the old code and the module it uses go on
        local mod = package.loaded.reload_lazy_mod
        write_file(dir .. "/reload_lazy_mod.lua", 'return { v = = "l3" }\n')
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("reload_lazy_mod.lua:1:", 1, true), err)
        assert.equal(mod, package.loaded.reload_lazy_mod)
        assert.same("l2", get(port, "/lazy"))
        write_file(dir .. "/reload_lazy_mod.lua", 'return { v = "l4" }\n')
        assert.truthy(test.wait_until(function() return get(port, "/lazy") == "l4" end, 5))
    end)

    it("records a module a task requires, for the host whose directory holds it", function()
        local dir, other = tmpdir(), tmpdir()
        write_file(dir .. "/reload_task_mod.lua", 'return "t1"\n')
        write_file(other .. "/reload_other_mod.lua", 'return "o1"\n')
        local host = serve(dir, app_src("v1"))
        local host2 = serve(other, app_src("w1"))
        defer(function()
            package.loaded.reload_task_mod = nil
            package.loaded.reload_other_mod = nil
        end)
        local function required(name)
            return { moonlet.spawn(function() return require(name) end):join(5) }
        end
        assert.same({ true, "t1" }, required("reload_task_mod"))
        assert.same({ true, "o1" }, required("reload_other_mod"))
        assert.same({ reload_task_mod = dir }, (function()
            local t = {}
            for name, f in pairs(host.modules) do t[name] = f:match("^(.*)/[^/]*$") end
            return t
        end)())
        assert.same({ "reload_other_mod" }, (function()
            local t = {}
            for name in pairs(host2.modules) do t[#t + 1] = name end
            return t
        end)())
    end)

    it("hands moonlet.tcp.listen's servers to the new code; a failed load closes what it opened",
       function()
        local dir = tmpdir()
        local function tcp_src(body, socks, extra)
            local t = {}
            for i = 1, #socks do
                t[i] = ("assert(moonlet.tcp.listen({ unix = %q }, function(s) s:send(%q) end))")
                       :format(dir .. "/" .. socks[i], body .. "\n")
            end
            return app_src(body, table.concat(t, "\n") .. "\n" .. (extra or ""))
        end
        local function line(sock)
            local s, err = moonlet.tcp.connect("unix:" .. dir .. "/" .. sock, nil, { timeout = 2 })
            if not s then return nil, err end
            local l, rerr = s:receive("*l")
            s:close()
            return l, rerr
        end
        local host, port, path = serve(dir, tcp_src("v1", { "a.sock" }))
        assert.same("v1", line("a.sock"))
        local kept = moonlet.tcp.connect("unix:" .. dir .. "/a.sock") -- accepted by v1's code
        -- the same address: the same server (no "address in use"), the new handler
        write_file(path, tcp_src("v2", { "a.sock" }))
        assert.is_true(host:reload())
        assert.same("v2", get(port))
        assert.same("v2", line("a.sock"))
        assert.same("v1", kept:receive("*l"))
        kept:close()
        -- a failing load: its new servers (moonlet.tcp's and app:listen's) close, a.sock stays v2's
        write_file(path, tcp_src("v3", { "a.sock", "b.sock" },
                                 ("assert(app:listen({ unix = %q }))\nerror('boom')\n")
                                 :format(dir .. "/c.sock")))
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("boom", 1, true), err)
        assert.same("v2", line("a.sock"))
        assert.same("v2", get(port))
        assert(test.wait_until(function() return line("b.sock") == nil end, 5))
        assert(test.wait_until(function()
            return moonlet.http.get("http://app/", { unix = dir .. "/c.sock" }) == nil
        end, 5))
        -- moved: the old address closes when the new code serves, the new one serves it
        write_file(path, tcp_src("v4", { "d.sock" }))
        assert.is_true(host:reload())
        assert.same("v4", line("d.sock"))
        assert.is_nil(line("a.sock"))
        -- one the old code closed itself is not handed over: the new code opens its own
        write_file(path, (tcp_src("v5", { "d.sock" }):gsub("assert%(moonlet.tcp.listen",
                                                          "TCP_SERVER = assert(moonlet.tcp.listen")))
        assert.is_true(host:reload())
        assert.same("v5", line("d.sock"))
        TCP_SERVER:close() -- luacheck: ignore 113
        assert.is_nil(line("d.sock"))
        write_file(path, tcp_src("v6", { "d.sock" }, ("assert(app:listen({ unix = %q }))\n")
                                                      :format(dir .. "/e.sock")))
        assert.is_true(host:reload())
        assert.same("v6", line("d.sock"))
        local function app_get()
            local res = moonlet.http.get("http://app/", { unix = dir .. "/e.sock" })
            return res and res.body
        end
        assert.same("v6", app_get())
        host:close() -- closes them all: the app's own server too
        assert.is_nil(line("d.sock"))
        assert(test.wait_until(function() return app_get() == nil end, 5))
    end)

    it("listens anew where the old code closed its moonlet.tcp.listen server", function()
        local dir = tmpdir()
        local sock = dir .. "/a.sock"
        local function tcp_src(body, extra)
            return app_src(body, ("local srv = assert(moonlet.tcp.listen({ unix = %q }, "
                                  .. "function(s) s:send(%q) end))\n%s")
                                 :format(sock, body .. "\n", extra or ""))
        end
        local host, _, path = serve(dir, tcp_src("v1", "srv:close()\n"))
        assert.is_nil((moonlet.tcp.connect("unix:" .. sock)))
        write_file(path, tcp_src("v2", "assert(srv:port())\n")) -- was the closed one: nil, "closed"
        assert.is_true(host:reload())
        local s = assert(moonlet.tcp.connect("unix:" .. sock, nil, { timeout = 2 }))
        assert.same("v2", s:receive("*l"))
        s:close()
        host:close()
    end)

    it("listens anew where the old app closed the server it listened with itself", function()
        local dir = tmpdir()
        local sock = dir .. "/c.sock"
        local function src(body, extra)
            return app_src(body, ("local srv = assert(app:listen({ unix = %q }))\n%s")
                                 :format(sock, extra or ""))
        end
        local host, _, path = serve(dir, src("v1", "srv:close()\n"))
        assert(test.wait_until(function()
            return moonlet.http.get("http://app/", { unix = sock }) == nil
        end, 5))
        write_file(path, src("v2"))
        assert.is_true(host:reload())
        local r = moonlet.http.get("http://app/", { unix = sock, timeout = 2 })
        assert.same("v2", r and r.body)
        host:close()
    end)

    it("leaves the old app's server as it was when a load that took it fails", function()
        local dir = tmpdir()
        local sock = dir .. "/c.sock"
        local function src(body, extra)
            return app_src(body, ("assert(app:listen({ unix = %q }))\n%s"):format(sock, extra or ""))
        end
        local function get_c()
            local r = moonlet.http.get("http://app/", { unix = sock, timeout = 2 })
            return r and r.body
        end
        local host, _, path = serve(dir, src("v1"))
        assert.same("v1", get_c())
        write_file(path, src("v2", "error('boom')\n"))
        assert.is_nil((host:reload()))
        assert.same("v1", get_c())
        write_file(path, src("v3"))
        assert.is_true(host:reload())
        assert.same("v3", get_c())
        host:close()
    end)

    it("closes what a load opens when the host is closed while its top level waits", function()
        local dir = tmpdir()
        local sock = dir .. "/t.sock"
        local host, _, path = serve(dir, app_src("v1"))
        write_file(path, app_src("v2", ("moonlet.sleep(0.05)\n"
            .. "assert(moonlet.tcp.listen({ unix = %q }, function(s) s:send('v2\\n') end))\n"):format(sock)))
        local done, ok = false, nil
        moonlet.spawn(function() ok = host:reload(); done = true end)
        moonlet.sleep(0)
        host:close()
        assert(test.wait_until(function() return done end, 5))
        assert.is_nil(ok)
        assert.is_nil((moonlet.tcp.connect("unix:" .. sock)))
    end)

    -- a free port for a server the app listens with itself
    local function free_tcp_port()
        local probe = assert(moonlet.tcp.listen({ port = 0 }, function() end))
        local p = probe:port()
        probe:close()
        return p
    end

    it("hands an HTTPS server to new code that changes its tls: a client_ca added applies", function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local p = free_tcp_port()
        local function https_src(body, tls)
            return app_src(body, ("assert(app:listen({ host = '127.0.0.1', port = %d, tls = %s }))\n")
                                 :format(p, tls))
        end
        local function get_tls(cert, key)
            local r, err = moonlet.http.get("https://127.0.0.1:" .. p .. "/",
                { tls = { cafile = certs.ca, cert = cert, key = key }, timeout = 5,
                  pool_size = 0 }) -- (a new connection each: an open one keeps its session)
            return r and r.body, err
        end
        local plain_tls = ("{ cert = %q, key = %q }"):format(certs.cert, certs.key)
        local host, _, path = serve(dir, https_src("v1", plain_tls))
        assert.same("v1", get_tls())
        -- the new code requires client certificates: a client without one is refused from now on
        write_file(path, https_src("v2", ("{ cert = %q, key = %q, client_ca = %q }")
                                         :format(certs.cert, certs.key, certs.ca)))
        assert.same({ true }, { host:reload() })
        assert.same({ nil, "tls: handshake failed" }, { get_tls() })
        assert.same("v2", get_tls(certs.client_cert, certs.client_key))
        -- and dropped again: any client
        write_file(path, https_src("v3", plain_tls))
        assert.is_true(host:reload())
        assert.same("v3", get_tls())
        host:close()
    end)

    it("rotates the certificate of an app:listen HTTPS server; one that does not load fails the"
       .. " reload", function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local p = free_tcp_port()
        local src = app_src("v%d", ("assert(app:listen({ host = '127.0.0.1', port = %d,"
            .. " tls = { cert = %q, key = %q } }))\n"):format(p, certs.cert, certs.key))
        local host, _, path = serve(dir, src:format(1))
        assert.same("CN=localhost", subject(p, certs))
        local before = assert(moonlet.tcp.connect("127.0.0.1", p, { tls = { cafile = certs.ca } }))
        defer(function() before:close() end)
        assert.same("v1", https_get(before))
        -- renewed files at the same paths, the same tls options: the reload reads them again
        renew(certs, "renewed")
        write_file(path, src:format(2))
        assert.same({ true }, { host:reload() })
        assert.same("CN=localhost,O=renewed", subject(p, certs))
        -- the connection opened before keeps its session (and certificate), and gets the new code
        assert.same("v2", https_get(before))
        assert.same("CN=localhost", before:peer_certificate().client_subject)
        -- a certificate file that does not load: the reload fails, naming it; the old code and
        -- the old certificate go on
        write_file(certs.cert, "not a certificate\n")
        write_file(path, src:format(3))
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("app:listen on 127.0.0.1:" .. p .. ": tls: cannot load certificate ("
                               .. certs.cert .. ")", 1, true), err)
        assert.same("CN=localhost,O=renewed", subject(p, certs))
        assert.same("v2", https_get(before))
        -- a key that is not the certificate's alike
        renew(certs, "third")
        os.execute(("cp %s/client.key %s"):format(certs.dir, certs.key))
        ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find("tls: certificate and key do not match (" .. certs.cert .. ", "
                               .. certs.key .. ")", 1, true), err)
        assert.same("CN=localhost,O=renewed", subject(p, certs))
        host:close()
    end)

    it("turns a server the app listens with itself from plain HTTP to HTTPS and back", function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local p = free_tcp_port()
        local plain_src = app_src("plain", ("assert(app:listen({ host = '127.0.0.1', port = %d }))\n")
            :format(p))
        local host, _, path = serve(dir, plain_src)
        assert.same("plain", test.request(p, "GET", "/").body)
        write_file(path, app_src("tls", ("assert(app:listen({ host = '127.0.0.1', port = %d,"
            .. " tls = { cert = %q, key = %q } }))\n"):format(p, certs.cert, certs.key)))
        assert.is_true(host:reload())
        local r = assert(moonlet.http.get("https://127.0.0.1:" .. p .. "/", { tls = { cafile = certs.ca } }))
        assert.same("tls", r.body)
        write_file(path, plain_src)
        assert.is_true(host:reload())
        assert.same("plain", test.request(p, "GET", "/").body)
        host:close()
    end)

    it("reads the certificate of the host's own HTTPS servers (host:listen) again on each reload",
       function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local path = dir .. "/app.lua"
        write_file(path, app_src("v1"))
        local host = reload.new({ path = path })
        defer(function() host:close() end)
        assert(host:load())
        local _, p = assert(host:listen({ host = "127.0.0.1", port = 0,
                                          tls = { cert = certs.cert, key = certs.key } }))
        assert.same("CN=localhost", subject(p, certs))
        local before = assert(moonlet.tcp.connect("127.0.0.1", p, { tls = { cafile = certs.ca } }))
        defer(function() before:close() end)
        assert.same("v1", https_get(before))
        renew(certs, "renewed")
        write_file(path, app_src("v2"))
        assert.is_true(host:reload())
        assert.same("CN=localhost,O=renewed", subject(p, certs))
        assert.same("v2", https_get(before))
        -- a key that does not load: the reload fails with the file, the old code and certificate
        -- go on
        write_file(certs.key, "not a key\n")
        write_file(path, app_src("v3"))
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.same(("https on 127.0.0.1:%d: tls: cannot load key (%s)"):format(p, certs.key), err)
        assert.same("CN=localhost,O=renewed", subject(p, certs))
        assert.same("v2", https_get(before))
        host:close()
    end)

    it("reads the certificate of a moonlet.tcp.listen TLS server the new code takes again", function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local p = free_tcp_port()
        local src = app_src("v", ("assert(moonlet.tcp.listen({ port = %d, tls = { cert = %q, key = %q } },"
            .. " function(s) s:send('%%s\\n') end))\n"):format(p, certs.cert, certs.key))
        local host, _, path = serve(dir, src:format("t1"))
        assert.same("CN=localhost", subject(p, certs))
        renew(certs, "renewed")
        write_file(path, src:format("t2"))
        assert.is_true(host:reload())
        assert.same("CN=localhost,O=renewed", subject(p, certs))
        local sock = assert(moonlet.tcp.connect("127.0.0.1", p, { tls = { cafile = certs.ca } }))
        assert.same("t2", sock:receive())
        sock:close()
        write_file(certs.cert, "not a certificate\n")
        write_file(path, src:format("t3"))
        local ok, err = host:reload()
        assert.is_nil(ok)
        assert.truthy(err:find(("moonlet.tcp.listen on 127.0.0.1:%d: tls: cannot load certificate (%s)")
                               :format(p, certs.cert), 1, true), err)
        sock = assert(moonlet.tcp.connect("127.0.0.1", p, { tls = { cafile = certs.ca } }))
        assert.same("CN=localhost,O=renewed", sock:peer_certificate().client_subject)
        assert.same("t2", sock:receive())
        sock:close()
        host:close()
    end)

    it("reads a client certificate (sock:tls's cert and key) again on reload; kept when it fails", function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        -- a client certificate CN=name from the spec's CA at dir/c.pem, dir/c.key
        local function client_cert(name)
            local cmd = ("cd %s && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
                .. " -keyout n.key -out n.csr -subj '/CN=%s' && openssl x509 -req -in n.csr -CA %s"
                .. " -CAkey %s -CAcreateserial -out n.pem -days 2 && mv n.pem c.pem && mv n.key c.key")
                :format(dir, name, certs.ca, certs.dir .. "/ca.key")
            local ok = os.execute("(" .. cmd .. ") >/dev/null 2>&1")
            assert(ok == true or ok == 0, "openssl failed")
        end
        -- a mutual-TLS server that answers with the subject of the client's certificate
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0,
            tls = { cert = certs.cert, key = certs.key, client_ca = certs.ca } }, function(s)
                local t = s:peer_certificate()
                s:send((t and t.client_subject or "none") .. "\n")
            end))
        defer(function() server:close() end)
        client_cert("first")
        local src = app_src("v", ([[
app:get("/who", function()
    local s, err = moonlet.tcp.connect("127.0.0.1", %d, { timeout = 5,
        tls = { cafile = %q, cert = %q, key = %q } })
    if not s then return 502, tostring(err) end
    local line = s:receive()
    s:close()
    return "%%s " .. tostring(line)
end)]]):format(server:port(), certs.ca, dir .. "/c.pem", dir .. "/c.key"))
        local host, port, path = serve(dir, src:format("v1"))
        assert.same("v1 CN=first", get(port, "/who"))
        client_cert("second") -- renewed at the same paths
        assert.same("v1 CN=first", get(port, "/who")) -- (cached until a reload)
        write_file(path, src:format("v2"))
        assert.is_true(host:reload())
        assert.same("v2 CN=second", get(port, "/who"))
        -- a load that fails gives the old code back the contexts it had
        client_cert("third")
        write_file(path, BROKEN)
        assert.is_nil(host:reload())
        assert.same("v2 CN=second", get(port, "/who"))
        host:close()
    end)

    it("hands a socket of moonlet.udp.bind to the new code's bind on its address", function()
        local dir = tmpdir()
        local function free_port()
            local u = assert(moonlet.udp.bind("127.0.0.1", 0))
            local _, p = u:getsockname()
            u:close()
            return p
        end
        local p1, p2 = free_port(), free_port()
        local function udp_src(body, port, extra)
            return app_src(body, ([[
local u = assert(moonlet.udp.bind("127.0.0.1", %d))
moonlet.spawn(function()
    while true do
        local d, h, p = u:recvfrom()
        if d then u:sendto(%q .. d, h, p) end
    end
end)
]]):format(port, body .. ":") .. (extra or ""))
        end
        local client = assert(moonlet.udp.bind("127.0.0.1", 0))
        defer(function() client:close() end)
        client:settimeout(2)
        local function ask(port)
            assert(client:sendto("x", "127.0.0.1", port))
            return client:recvfrom()
        end
        local host, _, path = serve(dir, udp_src("v1", p1))
        assert.same("v1:x", ask(p1))
        write_file(path, udp_src("v2", p1)) -- the same address: was "address in use"
        assert.is_true(host:reload())
        for _ = 1, 3 do assert.same("v2:x", ask(p1)) end
        -- a failing load's socket closes (its port is free again), the old code's stays
        write_file(path, udp_src("v3", p1, ("assert(moonlet.udp.bind('127.0.0.1', %d))\n"
                                            .. "error('boom')\n"):format(p2)))
        assert.is_nil((host:reload()))
        assert.same("v2:x", ask(p1))
        local again = assert(moonlet.udp.bind("127.0.0.1", p2))
        again:close()
        -- moved: the old port is free once the new code serves
        write_file(path, udp_src("v4", p2))
        assert.is_true(host:reload())
        assert.same("v4:x", ask(p2))
        again = assert(moonlet.udp.bind("127.0.0.1", p1))
        again:close()
        host:close()
        again = assert(moonlet.udp.bind("127.0.0.1", p2))
        again:close()
    end)

    it("keeps nothing of 30 failed loads that listened before their error", function()
        local dir = tmpdir()
        local function failing(i)
            return app_src("f" .. i, ('app.state = { big = string.rep("x", 1e5) .. tostring(app) }\n'
                                      .. 'assert(app:listen({ unix = %q }))\nerror("boom")\n')
                                     :format(dir .. "/f.sock"))
        end
        local host, port, path = serve(dir, app_src("v1"))
        for i = 1, 3 do -- warm-up: caches, JIT traces
            write_file(path, failing(i))
            assert.is_nil((host:reload()))
        end
        settle()
        local mem0 = collectgarbage("count")
        for i = 1, 30 do
            write_file(path, failing(i))
            assert.is_nil((host:reload()))
        end
        assert.same("v1", get(port))
        settle()
        local grown = collectgarbage("count") - mem0
        assert.truthy(grown < 256, ("grew by %.0f KiB"):format(grown)) -- 30 apps of 100 KB each: 3 MB
    end)

    it("returns to its memory baseline after 100 reloads", function()
        local dir = tmpdir()
        write_file(dir .. "/reload_mem_mod.lua", 'return { n = 0 }\n')
        local uses = 'local mod = require "reload_mem_mod"\n'
                     .. 'app.state = { big = string.rep("x", 1e5) .. tostring(app) }'
        local host, port, path = serve(dir, app_src("r0", uses))
        defer(function() package.loaded.reload_mem_mod = nil end)
        assert.is_true(host:watch())
        for i = 1, 5 do -- warm-up: caches, JIT traces
            write_file(path, app_src("w" .. i, uses))
            assert.is_true(host:reload())
        end
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for i = 1, 100 do
            write_file(path, app_src("r" .. i, uses))
            assert.is_true(host:reload())
            if i % 25 == 0 then assert.same("r" .. i, get(port)) end
        end
        -- the server closes the connections of the requests above after their lingering close
        assert.truthy(test.wait_until(function() return core.stats().handles == before.handles end))
        settle()
        local after = core.stats()
        assert.same(before.resources, after.resources)
        assert.same(before.tasks, after.tasks)
        local grown = collectgarbage("count") - mem0
        assert.truthy(grown < 256, ("grew by %.0f KiB"):format(grown)) -- 100 apps of 100 KB each: 10 MB
    end)
end)

describe("moonlet --reload", function()
    -- test.start_process, killed and waited for when the running `it` ends
    local function start(args)
        local p = test.start_process(args)
        defer(function() p:kill() end)
        return p
    end

    it("serves steady keep-alive load through three rewrites, one broken: no request fails",
       function()
        local dir = tmpdir()
        local path = dir .. "/app.lua"
        write_file(path, app_src("v1"))
        local p = start("--reload --port 0 " .. path)
        local port = p:port()
        assert(test.wait_until(function() return p:output():find("watching 1 file", 1, true) end),
               p:output())
        local running, total, failures = true, 0, {}
        local seen, since_broken = {}, nil
        local function client()
            local sock = test.connect(port)
            while running do
                local ok = sock:send(test.format_request("GET", "/"))
                local r, err = nil, "send failed"
                if ok then r, err = test.read_response(sock) end
                if not r or r.status ~= 200 then
                    failures[#failures + 1] = r and ("status " .. r.status) or err
                    sock:close()
                    sock = test.connect(port)
                else
                    total = total + 1
                    seen[r.body] = seen[r.body] or core.now()
                    if since_broken then since_broken[r.body] = true end
                end
            end
            sock:close()
        end
        local clients = {}
        for i = 1, 4 do clients[i] = moonlet.spawn(client) end
        defer(function()
            running = false
            for i = 1, #clients do clients[i]:join(5) end
        end)
        assert(test.wait_until(function() return total > 50 end, 10))

        local t = core.now()
        write_file(path, app_src("v2"))
        assert(test.wait_until(function() return seen.v2 end, 5), "v2 never answered")
        assert.truthy(seen.v2 - t < 1, ("v2 after %.3f s"):format(seen.v2 - t))

        write_file(path, BROKEN)
        assert(test.wait_until(function()
            return p:output():find(plain(path) .. ":" .. BROKEN_LINE .. ":")
        end, 5), p:output())
        since_broken = {}
        local n = total
        assert(test.wait_until(function() return total > n + 50 end, 10))
        assert.same({ v2 = true }, since_broken) -- the broken write changed nothing

        t = core.now()
        write_file(path, app_src("v4"))
        assert(test.wait_until(function() return seen.v4 end, 5), "v4 never answered")
        assert.truthy(seen.v4 - t < 1, ("v4 after %.3f s"):format(seen.v4 - t))

        running = false
        for i = 1, #clients do assert.truthy(clients[i]:join(5)) end
        assert.same({}, failures)
        assert.is_nil(seen.broken)
        local log = p:output()
        assert.truthy(log:find("failed, the old code goes on serving", 1, true), log)
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("watches a module a handler requires after the first request (the watch count grows)",
       function()
        local dir = tmpdir()
        local path = dir .. "/app.lua"
        write_file(dir .. "/lazy.lua", 'return { v = "l1" }\n')
        write_file(path, app_src("v1", 'app:get("/lazy", function() return require("lazy").v end)'))
        local p = start("--reload --port 0 " .. path)
        local port = p:port()
        assert(test.wait_until(function() return p:output():find("watching 1 file", 1, true) end),
               p:output())
        assert.same("l1", get(port, "/lazy"))
        assert(test.wait_until(function() return p:output():find("watching 2 files", 1, true) end),
               p:output())
        write_file(dir .. "/lazy.lua", 'return { v = "l2" }\n')
        assert(test.wait_until(function() return get(port, "/lazy") == "l2" end, 5), p:output())
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("reloads on SIGHUP without --reload, and keeps the old code when the new one is broken",
       function()
        local dir = tmpdir()
        local path = dir .. "/app.lua"
        write_file(path, app_src("v1"))
        local p = start("--port 0 " .. path)
        local port = p:port()
        assert.same("v1", get(port))
        write_file(path, app_src("v2"))
        moonlet.sleep(0.1) -- not watched: nothing changes until the signal
        assert.same("v1", get(port))
        assert.truthy(p:signal("HUP"))
        assert(test.wait_until(function() return get(port) == "v2" end, 5), p:output())
        write_file(path, BROKEN)
        assert.truthy(p:signal("HUP"))
        assert(test.wait_until(function()
            return p:output():find(plain(path) .. ":" .. BROKEN_LINE .. ":")
        end, 5), p:output())
        assert.same("v2", get(port))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("reads the --tls-cert and --tls-key files again on SIGHUP; a certificate that does not"
       .. " load keeps the old one", function()
        local dir = tmpdir()
        local certs = test.make_certs()
        defer(function() test.remove_certs(certs) end)
        local path = dir .. "/app.lua"
        write_file(path, app_src("v1"))
        local p = start(("--port 0 --tls-cert %s --tls-key %s %s"):format(certs.cert, certs.key, path))
        local port = test.wait_until(function()
            return tonumber(p:output():match("on https://[^:]+:(%d+)"))
        end, 10)
        assert(port, p:output())
        assert.same("CN=localhost", subject(port, certs))
        local before = assert(moonlet.tcp.connect("127.0.0.1", port, { tls = { cafile = certs.ca } }))
        defer(function() before:close() end)
        assert.same("v1", https_get(before))
        renew(certs, "renewed")
        write_file(path, app_src("v2"))
        assert.truthy(p:signal("HUP"))
        assert(test.wait_until(function() return subject(port, certs) == "CN=localhost,O=renewed" end,
                               5), p:output())
        assert.same("v2", https_get(before)) -- open before: the new code, its old session
        assert.same("CN=localhost", before:peer_certificate().client_subject)
        write_file(certs.cert, "-----BEGIN CERTIFICATE-----\ntruncated\n")
        write_file(path, app_src("v3"))
        assert.truthy(p:signal("HUP"))
        local want = ("the old code goes on serving: https on 127.0.0.1:%d: tls: cannot load"
                      .. " certificate (%s)"):format(port, certs.cert)
        assert(test.wait_until(function() return p:output():find(want, 1, true) end, 5), p:output())
        assert.same("CN=localhost,O=renewed", subject(port, certs))
        assert.same("v2", https_get(before))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    -- how many "reloaded" lines the log has
    local function reloads(p)
        local _, n = p:output():gsub("%] reloaded ", "")
        return n
    end

    it("watches the file a symlinked script points to: an edit of the target reloads", function()
        local dir = tmpdir()
        assert(os.execute("mkdir -p '" .. dir .. "/real'"))
        write_file(dir .. "/real/app.lua", app_src("v1"))
        assert(os.execute("ln -s real/app.lua '" .. dir .. "/link.lua'"))
        local p = start("--reload --port 0 " .. dir .. "/link.lua")
        local port = p:port()
        assert(test.wait_until(function() return p:output():find("reload: watching") end),
               p:output())
        assert.same("v1", get(port))
        write_file(dir .. "/real/app.lua", app_src("v2"))
        assert(test.wait_until(function() return get(port) == "v2" end, 5), p:output())
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("reloads when a module the failed load did not find is created", function()
        local dir = tmpdir()
        local path = dir .. "/app.lua"
        write_file(path, app_src("v1"))
        local p = start("--reload --port 0 " .. path)
        local port = p:port()
        assert(test.wait_until(function() return p:output():find("watching 1 file", 1, true) end),
               p:output())
        write_file(path, app_src("v2", 'local m = require "reload_created_mod"\n'
                                       .. 'app:get("/m", function() return m.v end)'))
        assert(test.wait_until(function()
            return p:output():find("module 'reload_created_mod' not found", 1, true)
        end, 5), p:output())
        assert.same("v1", get(port))
        write_file(dir .. "/reload_created_mod.lua", 'return { v = "created" }\n')
        assert(test.wait_until(function() return get(port, "/m") == "created" end, 5), p:output())
        assert.same("v2", get(port))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("stops the tasks and ngx timers the old load started, rather than piling them up",
       function()
        local dir = tmpdir()
        local path = dir .. "/app.lua"
        -- a top-level task and timers (one re-arming itself from its callback, as OpenResty
        -- code does); "live" counts the loops that run
        write_file(path, app_src("v1", [[
local ngx = require("moonlet.ngx").get()
local d = moonlet.shared("reload_tasks")
moonlet.spawn(function()
    d:incr("live", 1, 0)
    local ok, err = pcall(function() while true do moonlet.sleep(0.01) end end)
    d:incr("live", -1)
    error(err, 0)
end)
ngx.timer.every(0.01, function() end)
local function rearm(premature) if not premature then ngx.timer.at(0.01, rearm) end end
ngx.timer.at(0.01, rearm)
app:get("/live", function()
    return d:get("live") .. " " .. ngx.timer.pending_count()
end)]]))
        local p = start("--port 0 " .. path)
        local port = p:port()
        assert.same("1 2", get(port, "/live"))
        for i = 1, 5 do
            assert.truthy(p:signal("HUP"))
            assert(test.wait_until(function() return reloads(p) == i end, 5), p:output())
        end
        assert(test.wait_until(function() return get(port, "/live") == "1 2" end, 5),
               get(port, "/live"))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("hands the server an app listens with itself to the new code; a moved one closes",
       function()
        local dir = tmpdir()
        local path = dir .. "/app.lua"
        local function own(body, sock)
            return app_src(body, ("assert(app:listen({ unix = %q }))"):format(dir .. "/" .. sock))
        end
        local function uget(sock)
            local res, err = moonlet.http.get("http://app/", { unix = dir .. "/" .. sock })
            return res and res.body, err
        end
        write_file(path, own("v1", "a.sock"))
        local p = start("--port 0 " .. path)
        local port = p:port()
        assert.same("v1", uget("a.sock"))
        write_file(path, own("v2", "a.sock")) -- the same address: the same server, new code
        assert.truthy(p:signal("HUP"))
        assert(test.wait_until(function() return get(port) == "v2" end, 5), p:output())
        assert.same("v2", uget("a.sock"))
        write_file(path, own("v3", "b.sock")) -- moved: the old address closes
        assert.truthy(p:signal("HUP"))
        assert(test.wait_until(function() return get(port) == "v3" end, 5), p:output())
        assert.same("v3", uget("b.sock"))
        assert(test.wait_until(function() return uget("a.sock") == nil end, 5))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)

    it("warns on SIGHUP when a plain script serves nothing to reload", function()
        local dir = tmpdir()
        local path = dir .. "/plain.lua"
        write_file(path, 'local moonlet = require "moonlet"\nio.stderr:write("plain: started\\n")\n'
                         .. "moonlet.sleep(0.5)\n")
        local p = start(path)
        assert(test.wait_until(function() return p:output():find("plain: started", 1, true) end))
        assert.truthy(p:signal("HUP"))
        assert(test.wait_until(function() return p:output():find("nothing to reload", 1, true) end),
               p:output())
        assert.same(0, p:wait())
    end)
end)
