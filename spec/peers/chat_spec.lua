-- spec/peers/chat_spec.lua: apps/chat over real sockets: the page and its script are served, two
-- moonlet clients in a room see each other's messages and the join/leave notices, a newcomer gets
-- the last 50 messages; then the browser test: headless Debian chromium, driven by playwright-core
-- (spec/peers/node_modules), opens two chat pages, one sends, the other shows it. The browser test
-- is pending only when node, playwright-core or /usr/bin/chromium is missing.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local json = require "moonlet.json"

local function sh_ok(cmd)
    local ok = os.execute(cmd .. " >/dev/null 2>&1")
    return ok == 0 or ok == true
end

local function serve_chat()
    local app = dofile("apps/chat/app.lua")
    local server, port = test.serve(app)
    finally(function() server:close() end)
    return port
end

local function join(port, room, nick)
    local ws = assert(moonlet.ws.connect(("ws://127.0.0.1:%d/ws/%s?nick=%s"):format(port, room, nick),
                                         { timeout = 5 }))
    finally(function() ws:close() end)
    local hist = json.decode(assert(ws:receive(5)))
    assert.same("history", hist.type)
    return ws, hist
end

-- the next message of one of these types
local function next_of(ws, t)
    while true do
        local m = json.decode(assert(ws:receive(5)))
        if m.type == t then return m end
    end
end

describe("apps/chat", function()
    it("serves the page, its script and its style", function()
        local port = serve_chat()
        local page = test.request(port, "GET", "/")
        assert.same(200, page.status)
        assert.truthy(page.body:find("<script src=\"/chat.js\"></script>", 1, true))
        assert.same(200, test.request(port, "GET", "/chat.js").status)
        assert.same(200, test.request(port, "GET", "/style.css").status)
        assert.same(426, test.request(port, "GET", "/ws/lobby").status)
    end)

    it("relays messages between members, with join and leave notices", function()
        local port = serve_chat()
        local a = join(port, "r1", "alice")
        local j = next_of(a, "join")
        assert.same({ "alice", 1 }, { j.nick, j.members })
        local b = join(port, "r1", "bob")
        assert.same("bob", next_of(a, "join").nick)
        local other = join(port, "r2", "carol")
        assert.same("carol", next_of(other, "join").nick)
        assert(a:send(json.encode({ type = "message", text = "hi bob" })))
        local m = next_of(b, "message")
        assert.same({ "alice", "hi bob" }, { m.nick, m.text })
        assert.same("hi bob", next_of(a, "message").text) -- the sender sees its own message too
        assert(b:send("plain text works too"))
        assert.same("plain text works too", next_of(a, "message").text)
        b:close()
        local left = next_of(a, "leave")
        assert.same({ "bob", 1 }, { left.nick, left.members })
        assert.same({ nil, "timeout" }, { other:receive(0.05) }) -- r2 heard nothing
    end)

    it("replays the last 50 messages to a newcomer and refuses an empty nickname", function()
        local port = serve_chat()
        local a = join(port, "history", "alice")
        for i = 1, 60 do assert(a:send("message " .. i)) end
        for _ = 1, 60 do next_of(a, "message") end
        local _, hist = join(port, "history", "bob")
        assert.same(50, #hist.messages)
        assert.same("message 11", hist.messages[1].text)
        assert.same("message 60", hist.messages[50].text)
        local n = assert(moonlet.ws.connect(("ws://127.0.0.1:%d/ws/x?nick=%%20"):format(port),
                                            { timeout = 5 }))
        assert.same("error", json.decode(n:receive(5)).type)
        assert.same({ nil, "closed" }, { n:receive(5) })
        assert.same(4000, n.close_code)
    end)

    it("keeps a room alive through text cut inside a UTF-8 character or not UTF-8 at all", function()
        local port = serve_chat()
        local a = join(port, "utf8", "alice")
        assert.same("alice", next_of(a, "join").nick)
        local long_nick = ("n"):rep(31) .. "%C3%A9" -- 33 bytes: cut to 32 would split the é
        local b = join(port, "utf8", long_nick)
        assert.same(("n"):rep(31), next_of(a, "join").nick)
        assert(a:send(json.encode({ text = ("a"):rep(1999) .. "\xC3\xA9" }))) -- 2001 bytes
        assert.same(("a"):rep(1999), next_of(b, "message").text)
        assert(a:send("\xFF\xFEnot text", "binary")) -- neither UTF-8 nor JSON: dropped
        assert(a:send('{"text":"\\ud800"}')) -- a lone surrogate: no JSON to cjson, so plain text
        assert(a:send("still talking"))
        assert.same('{"text":"\\ud800"}', next_of(b, "message").text)
        assert.same("still talking", next_of(b, "message").text)
        local _, hist = join(port, "utf8", "carol") -- and the history replays whole
        assert.same({ ("a"):rep(1999), '{"text":"\\ud800"}', "still talking" },
                    { hist.messages[1].text, hist.messages[2].text, hist.messages[3].text })
        local bad = assert(moonlet.ws.connect(("ws://127.0.0.1:%d/ws/%%FF?nick=x"):format(port),
                                              { timeout = 5 }))
        assert.same({ nil, "closed" }, { bad:receive(5) })
        assert.same(4000, bad.close_code)
    end)

    it("works in a real browser: two chromium pages, one sends, the other shows it", function()
        if not sh_ok("command -v node") then return pending("node is not installed") end
        if not sh_ok("test -x /usr/bin/chromium") then
            return pending("/usr/bin/chromium is not installed")
        end
        if not sh_ok("test -f spec/peers/node_modules/playwright-core/package.json") then
            return pending("playwright-core is missing: npm install --prefix spec/peers")
        end
        local port = serve_chat()
        local base = os.tmpname()
        local log, codefile = base .. ".log", base .. ".code"
        finally(function() os.remove(log); os.remove(codefile); os.remove(base) end)
        local shot = os.getenv("CHAT_SCREENSHOT") or ""
        local f = io.popen(("((node spec/peers/chat_browser.js http://127.0.0.1:%d/ %s) >%s 2>&1 </dev/null; "
            .. "echo $? >%s) >/dev/null 2>&1 & echo started"):format(port, shot, log, codefile))
        f:read("*l")
        f:close()
        local code = test.wait_until(function()
            local h = io.open(codefile)
            if not h then return nil end
            local c = tonumber(h:read("*l"))
            h:close()
            return c
        end, 120)
        local h = io.open(log)
        local out = h and h:read("*a") or ""
        if h then h:close() end
        assert.same(0, code, out)
        local r = json.decode(out:match("(%b{})%s*$"))
        assert.is_nil(r.error)
        assert.same("alice: hello from alice", r.bob_sees)
        assert.same("alice: hello from alice", r.alice_sees)
        assert.is_true(r.left_notice)
    end)
end)
