-- spec/peers/ws_peers_spec.lua: moonlet's WebSockets against strict peers that are not ours, the
-- categories of the Autobahn testsuite: Node's `ws` package (spec/peers/node_modules, installed by
-- scripts/deps.sh with `npm install --prefix spec/peers`) and Python's websockets (Debian
-- python3-websockets, run with /usr/bin/python3). Their clients drive app:websocket (echo of text
-- and binary from 0 B to 1 MiB, fragments, ping/pong, close codes both ways, invalid UTF-8,
-- oversize, permessage-deflate, 200 concurrent clients); moonlet's client talks to their servers
-- (and to Python's over wss://). A peer that is not installed makes its tests pending.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local json = require "moonlet.json"

local PY = "/usr/bin/python3"

local function sh_ok(cmd)
    local ok = os.execute(cmd .. " >/dev/null 2>&1")
    return ok == 0 or ok == true
end

local have_node = sh_ok("command -v node") and sh_ok("test -f spec/peers/node_modules/ws/package.json")
local have_py = sh_ok(PY .. " -c 'import websockets'")
local have_openssl = sh_ok("command -v openssl")

-- Runs cmd in the background; p:wait(timeout) returns its exit code and output.
local function run(cmd)
    local base = os.tmpname()
    local log, codefile = base .. ".log", base .. ".code"
    -- the subshell's own output goes elsewhere too: popen returns at once, the loop never blocks
    local f = io.popen(("((%s) >%s 2>&1 </dev/null; echo $? >%s) >/dev/null 2>&1 & echo started")
        :format(cmd, log, codefile))
    f:read("*l")
    f:close()
    local p = {}
    function p.output()
        local h = io.open(log)
        if not h then return "" end
        local s = h:read("*a")
        h:close()
        return s
    end
    function p.wait(timeout)
        local code = test.wait_until(function()
            local h = io.open(codefile)
            if not h then return nil end
            local c = tonumber(h:read("*l"))
            h:close()
            return c
        end, timeout or 60)
        local out = p.output()
        os.remove(log)
        os.remove(codefile)
        os.remove(base)
        return code, out
    end
    return p
end

-- Starts a peer server (it prints "port N"); returns its port; killed by finally()
local function peer_server(cmd)
    local base = os.tmpname()
    local log = base .. ".log"
    local f = io.popen(("(exec %s >%s 2>&1 </dev/null) >/dev/null 2>&1 & echo $!"):format(cmd, log))
    local pid = tonumber(f:read("*l"))
    f:close()
    finally(function()
        os.execute("kill " .. pid .. " 2>/dev/null")
        os.remove(log)
        os.remove(base)
    end)
    local port = test.wait_until(function()
        local h = io.open(log)
        if not h then return nil end
        local s = h:read("*a")
        h:close()
        return tonumber(s:match("port (%d+)"))
    end, 20)
    assert(port, "the peer server did not start: " .. cmd)
    return port
end

-- The server the peers' clients drive; `seen` records the close codes the handlers saw.
local function moonlet_server()
    local seen = {}
    local app = moonlet.app()
    local function echo(ws)
        for msg, kind in ws:messages() do ws:send(msg, kind) end
        seen[#seen + 1] = { ws.close_code, ws.close_reason }
    end
    app:websocket("/echo", echo)
    app:websocket("/echo-deflate", echo, { deflate = true })
    app:websocket("/close-me", function(ws)
        ws:receive()
        ws:close(4001, "server bye")
    end)
    local server, port = test.serve(app)
    finally(function() server:close() end)
    return port, seen
end

local function check_client_results(r, seen)
    assert.is_nil(r.error)
    assert.is_true(r.echo)
    assert.same("Hello, world", r.fragmented)
    assert.truthy(r.pong)
    assert.same({ code = 4000, reason = "bye" }, r.client_close)
    assert.same({ code = 4001, reason = "server bye" }, r.server_close)
    assert.same(1007, r.bad_utf8.code)
    assert.same(1009, r.oversize.code)
    assert.truthy(json.encode(r.deflate_ext):find("permessage-deflate", 1, true))
    assert.is_true(r.deflate_echo)
    assert.same(200, r.concurrent)
    local found = false
    for _, s in ipairs(seen) do
        if s[1] == 4000 and s[2] == "bye" then found = true end
    end
    assert.is_true(found, "the server never saw the client's 4000 bye")
end

local function drive(cmd, port)
    local p = run(cmd .. " ws://127.0.0.1:" .. port)
    local code, out = p.wait(120)
    local line = out:match("(%b{})%s*$")
    assert(line, "no result from the peer (exit " .. tostring(code) .. "):\n" .. out)
    return json.decode(line), code, out
end

-- moonlet's client against a peer server on port: every category
local function client_against(port, scheme, opts)
    local base = (scheme or "ws") .. "://127.0.0.1:" .. port
    local o = { timeout = 5 }
    for k, v in pairs(opts or {}) do o[k] = v end
    local ws = assert(moonlet.ws.connect(base .. "/echo", o))
    for _, n in ipairs({ 0, 1, 125, 126, 65535, 65536, 1024 * 1024 }) do
        local text = string.rep("ü", math.floor(n / 2)) .. string.rep("b", n % 2)
        assert(ws:send(text))
        assert.is_true(ws:receive(5) == text)
        local bin = string.rep("\0", n)
        assert(ws:send(bin, "binary"))
        local got, kind = ws:receive(5)
        assert.is_true(got == bin)
        assert.same("binary", kind)
    end
    assert.is_true(type(assert(ws:ping("rtt", 5))) == "number")
    assert(ws:close(4000, "bye"))
    assert.same({ nil, "closed" }, { ws:receive(5) })
    assert.same(4000, ws.close_code)
    -- fragments of ours, reassembled by the peer
    local frag = assert(moonlet.ws.connect(base .. "/echo", setmetatable({ fragment_size = 1000 },
        { __index = o })))
    local big = string.rep("0123456789", 10000)
    assert(frag:send(big))
    assert.is_true(frag:receive(5) == big)
    frag:close()
    -- deflate
    local d = assert(moonlet.ws.connect(base .. "/echo", setmetatable({ deflate = true }, { __index = o })))
    assert.truthy(d.extensions and d.extensions:find("permessage-deflate", 1, true))
    local text = string.rep("compressible ", 20000)
    assert(d:send(text))
    assert.is_true(d:receive(5) == text)
    d:close()
    -- the peer closes, sends invalid UTF-8, sends too much
    local c = assert(moonlet.ws.connect(base .. "/close", o))
    assert.same({ nil, "closed" }, { c:receive(5) })
    local b = assert(moonlet.ws.connect(base .. "/bad-utf8", o))
    assert.same({ nil, "closed" }, { b:receive(5) })
    assert.same(1007, b.close_code)
    local g = assert(moonlet.ws.connect(base .. "/big", o))
    assert.same({ nil, "closed" }, { g:receive(5) })
    assert.same(1009, g.close_code)
    return c.close_code, c.close_reason
end

describe("moonlet.ws against Node's ws", function()
    it("serves the ws client: echo, fragments, ping, close codes, UTF-8, oversize, deflate, 200 clients",
        function()
            if not have_node then return pending("node or spec/peers/node_modules/ws is missing") end
            local port, seen = moonlet_server()
            local r, code, out = drive("node spec/peers/node_client.js", port)
            assert(code == 0, out)
            check_client_results(r, seen)
        end)

    it("talks to a ws server with moonlet's client", function()
        if not have_node then return pending("node or spec/peers/node_modules/ws is missing") end
        local port = peer_server("node spec/peers/node_server.js")
        assert.same({ 4002, "node bye" }, { client_against(port) })
    end)
end)

describe("moonlet.ws against Python's websockets", function()
    it("serves the websockets client: echo, fragments, ping, close codes, UTF-8, oversize, deflate, "
        .. "200 clients", function()
        if not have_py then return pending(PY .. " with websockets (python3-websockets) is missing") end
        local port, seen = moonlet_server()
        local r, code, out = drive(PY .. " spec/peers/py_client.py", port)
        assert(code == 0, out)
        check_client_results(r, seen)
    end)

    it("talks to a websockets server with moonlet's client", function()
        if not have_py then return pending(PY .. " with websockets (python3-websockets) is missing") end
        local port = peer_server(PY .. " spec/peers/py_server.py")
        assert.same({ 4003, "py bye" }, { client_against(port) })
    end)

    it("talks to a websockets server over wss:// and checks its certificate", function()
        if not have_py then return pending(PY .. " with websockets (python3-websockets) is missing") end
        if not have_openssl then return pending("the openssl command is missing") end
        local dir = os.tmpname()
        os.remove(dir)
        assert(sh_ok("mkdir -p " .. dir))
        finally(function() os.execute("rm -rf " .. dir) end)
        local cert, key = dir .. "/cert.pem", dir .. "/key.pem"
        local p = run(("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
            .. "-addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout %s -out %s"):format(key, cert))
        assert.same(0, (p.wait(60)))
        local port = peer_server(("%s spec/peers/py_server.py %s %s"):format(PY, cert, key))
        local ws, err = moonlet.ws.connect("wss://127.0.0.1:" .. port .. "/echo", { timeout = 5 })
        assert.is_nil(ws)
        assert.truthy(err:find("certificate", 1, true), err)
        assert.same({ 4003, "py bye" }, { client_against(port, "wss", { cafile = cert }) })
        local w2 = assert(moonlet.ws.connect("wss://localhost:" .. port .. "/echo",
                                             { timeout = 5, cafile = cert }))
        assert(w2:send("over tls"))
        assert.same("over tls", w2:receive(5))
        w2:close()
    end)
end)
