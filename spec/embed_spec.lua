-- spec/embed_spec.lua: the embedding examples (examples/embed/*.c, built by `make examples` into
-- $(BUILD)/examples/ next to the moonlet binary under test) started as processes and queried over
-- HTTP and WebSocket: the game loop (moonlet_step in a 60 Hz frame loop, a host module, SIGHUP
-- reload, the /live WebSocket and a client too slow for it), the IoT device (its own select() loop
-- on moonlet's backend fd, an app compiled in) and two instances in one process. The C API itself
-- is tested by spec/c/test_embed.c. Each `it` kills and waits for the process it started; every
-- wait has a deadline.
local json = require "moonlet.json"
local moonlet = require "moonlet"
local test = require "moonlet.test"

local defer = test.defer

local read_file = test.read_file

local write_file = test.write_file

-- build/examples or build-asan/examples: beside the moonlet binary under test
local function example(name)
    local bin = test.binary()
    return (bin:match("^(.*)/[^/]*$") or ".") .. "/examples/" .. name
end

local proc = {}
proc.__index = proc

-- Starts an example in the background; its stdout and stderr go to p.out. Killed (SIGKILL unless
-- it ended), waited for and its files removed when the running `it` ends.
local function start(name, args)
    local base = os.tmpname()
    local p = setmetatable({ out = base .. ".out", code = base .. ".code", base = base }, proc)
    local cmd = ("(%s %s >%s 2>&1; echo $? >%s) & echo $!"):format(example(name), args or "",
                                                                   p.out, p.code)
    local f = assert(io.popen(cmd))
    p.shell = tonumber(f:read("*l"))
    f:close()
    defer(function()
        p:signal("KILL")
        p:wait()
        for _, path in ipairs({ p.base, p.out, p.code }) do os.remove(path) end
    end)
    return p
end

function proc:output()
    return read_file(self.out) or ""
end

-- the first capture of pattern in the output, once it appears
function proc:wait_for(pattern, timeout)
    local v = test.wait_until(function() return self:output():match(pattern) end, timeout or 10)
    assert(v, "not in the output: " .. pattern .. "\n" .. self:output())
    return v
end

function proc:signal(sig)
    local f = io.popen("pgrep -P " .. self.shell)
    local pid = tonumber(f:read("*l"))
    f:close()
    if pid then os.execute("kill -" .. sig .. " " .. pid) end
    return pid ~= nil
end

-- the exit code, or nil if it still runs at the deadline
function proc:wait(timeout)
    return test.wait_until(function() return tonumber(read_file(self.code) or "") end, timeout or 10)
end

local function request(port, method, path, body)
    local r = test.request(port, method, path, body and { body = body } or nil)
    local data = r.headers["content-type"] and r.headers["content-type"]:find("json", 1, true)
                 and json.decode(r.body)
    return r.status, data or r.body
end

-- cjson encodes an empty list as {}: the entities or readings as a Lua list either way
local function list(t)
    return t or {}
end

describe("examples/embed/game_loop", function()
    it("serves the live world as JSON and moves the entities POST /spawn adds", function()
        local p = start("game_loop", "--port 0")
        local port = tonumber(p:wait_for("world on http://127%.0%.0%.1:(%d+)"))
        local status, w1 = request(port, "GET", "/world")
        assert.same(200, status)
        assert.same(0, #list(w1.entities))
        local spawned
        status, spawned = request(port, "POST", "/spawn", '{"x": 10, "y": 20, "vx": 30, "vy": 0}')
        assert.same(201, status)
        assert.same(1, spawned.id)
        local w2 = test.wait_until(function()
            local _, w = request(port, "GET", "/world")
            local e = list(w.entities)[1]
            return e and e.x > 10 and w
        end, 5)
        assert.truthy(w2, "the entity never moved")
        assert.truthy(w2.frame > w1.frame)
        assert.same({ 1, 20, 30, 0 }, { w2.entities[1].id, w2.entities[1].y, w2.entities[1].vx,
                                        w2.entities[1].vy })
        assert.same(400, (request(port, "POST", "/spawn", "not json")))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
        local out = p:output()
        assert.truthy(out:find("frames at 60 Hz; frame period ms: avg", 1, true), out)
        assert.truthy(out:find("entities: 1\n", 1, true), out)
    end)

    it("pushes the live world over a WebSocket and takes spawn commands from it", function()
        local p = start("game_loop", "--port 0")
        local port = tonumber(p:wait_for("world on http://127%.0%.0%.1:(%d+)"))
        assert.same(201, (request(port, "POST", "/spawn", '{"x": 10, "y": 20, "vx": 30, "vy": 0}')))
        local ws = assert(moonlet.ws.connect(("ws://127.0.0.1:%d/live"):format(port),
                                             { timeout = 5 }))
        defer(function() ws:close() end)
        -- the next message of `kind` ("world", "spawned", "error"), skipping the others
        local function next_of(kind)
            while true do
                local msg, err = ws:receive(5)
                assert(msg, err)
                local m = json.decode(msg)
                if m.type == kind then return m end
            end
        end
        local w1 = next_of("world")
        local w2
        repeat w2 = next_of("world") until list(w2.entities)[1] and w2.frame > w1.frame
        assert.same(1, #w2.entities)
        local e1, e2 = list(w1.entities)[1] or { x = 10 }, w2.entities[1]
        assert.truthy(e2.x ~= e1.x, "the entity did not move between two states")
        assert.same({ 1, 20, 30, 0 }, { e2.id, e2.y, e2.vx, e2.vy })
        -- the same command as POST /spawn's body, as a message
        assert(ws:send({ type = "spawn", x = 50, y = 50, vx = 0, vy = -10 }))
        local spawned = next_of("spawned")
        assert.same(2, spawned.id)
        assert.truthy(spawned.frame >= w2.frame)
        local w3
        repeat w3 = next_of("world") until #list(w3.entities) == 2
        assert.same({ 1, 2 }, { w3.entities[1].id, w3.entities[2].id })
        assert(ws:send("not json"))
        assert.same({ "error", 400, "a message is a JSON object" },
                    (function(m) return { m.type, m.status, m.error } end)(next_of("error")))
        ws:close(1000, "done")
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
        local out = p:output()
        assert.truthy(out:find("frames at 60 Hz; frame period ms: avg", 1, true), out)
        assert.truthy(out:find("entities: 2\n", 1, true), out)
    end)

    it("drops a WebSocket client that reads nothing, while the frames go on", function()
        local p = start("game_loop", "--port 0")
        local port = tonumber(p:wait_for("world on http://127%.0%.0%.1:(%d+)"))
        local n = 0 -- 1000 entities: a state of about 90 KB, so the socket's buffers fill fast
        while n < 1000 do
            local status = request(port, "POST", "/spawn", '{"x": 10, "y": 20, "vx": 30, "vy": 7}')
            if status == 201 then n = n + 1 else moonlet.sleep(0.02) end -- 503: this tick is full
        end
        local sock = test.connect(port, 30)
        defer(function() sock:close() end)
        assert(sock:send("GET /live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         .. "Sec-WebSocket-Version: 13\r\n\r\n"))
        -- it reads nothing until the app gives up on it; meanwhile the world goes on
        local _, w1 = request(port, "GET", "/world")
        p:wait_for("live: closing a client 10 states behind", 60)
        local _, w2 = request(port, "GET", "/world")
        assert.truthy(w2.frame > w1.frame)
        -- what was queued for it ends with the close frame: 1008 and the reason
        local got = {}
        while true do
            local data, err, partial = sock:receive(65536)
            got[#got + 1] = data or partial
            if not data then
                assert.same("closed", err)
                break
            end
        end
        local stream = table.concat(got)
        assert.truthy(stream:find("\x88\x21\x03\xf0too slow: fell behind the world", 1, true))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
        local out = p:output()
        assert.truthy(out:find("frames at 60 Hz; frame period ms: avg", 1, true), out)
        assert.truthy(out:find("entities: 1000\n", 1, true), out)
    end)

    it("runs the number of frames it is given at 60 Hz, then prints its frame statistics", function()
        local t0 = moonlet.now()
        local p = start("game_loop", "--port 0 --frames 30")
        assert.same(0, p:wait())
        assert.truthy(moonlet.now() - t0 >= 0.45) -- 30 frames of 16.7 ms: not faster
        local out = p:output()
        assert.truthy(out:find("game_loop: 30 frames at 60 Hz", 1, true), out)
        assert.truthy(out:match("late frames %(> 2 ms%): %d+"), out)
    end)

    it("reloads its app on SIGHUP while the game runs", function()
        local app = os.tmpname()
        defer(function() os.remove(app) end)
        local src = [[
local moonlet = require "moonlet"
local game = require "game"
local app = moonlet.app()
app:get("/version", function() return "%s " .. (game.frame() > 0 and "running" or "?") end)
return app
]]
        write_file(app, src:format("one"))
        local p = start("game_loop", "--port 0 --app " .. app)
        local port = tonumber(p:wait_for("world on http://127%.0%.0%.1:(%d+)"))
        assert.truthy(test.wait_until(function()
            return select(2, request(port, "GET", "/version")) == "one running"
        end, 5))
        write_file(app, src:format("two"))
        assert.truthy(p:signal("HUP"))
        assert.truthy(test.wait_until(function()
            return select(2, request(port, "GET", "/version")) == "two running"
        end, 5), p:output())
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
    end)
end)

describe("examples/embed/iot_device", function()
    it("serves its sensor's readings and applies PUT /config", function()
        local p = start("iot_device", "--port 0")
        local port = tonumber(p:wait_for("serving on http://127%.0%.0%.1:(%d+)"))
        local r = test.wait_until(function()
            local _, data = request(port, "GET", "/readings")
            return #list(data.readings) >= 3 and data
        end, 5)
        assert.truthy(r, "no readings")
        assert.same({ interval_ms = 100, offset = 0 }, r.config)
        local last = r.readings[#r.readings]
        assert.truthy(last.value > 15 and last.value < 30, last.value)
        assert.truthy(last.seq >= 3)
        local status, cfg = request(port, "PUT", "/config", '{"interval_ms": 20, "offset": 100}')
        assert.same({ 200, { interval_ms = 20, offset = 100 } }, { status, cfg })
        assert.truthy(test.wait_until(function()
            local _, data = request(port, "GET", "/readings")
            local rs = list(data.readings)
            return rs[#rs].value > 100
        end, 5))
        assert.same(400, (request(port, "PUT", "/config", "garbage")))
        status, cfg = request(port, "PUT", "/config", '{"interval_ms": 1}')
        assert.same({ 422, "interval_ms: a number from 10 to 60000" }, { status, cfg.error })
        assert.same({ 200, { interval_ms = 20, offset = 100 } }, { request(port, "GET", "/config") })
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
        assert.truthy(p:output():find("readings, %d+ wake%-ups, RSS now %d+ KiB"), p:output())
    end)
end)

describe("examples/embed/two_instances", function()
    it("answers from two instances whose counters never mix", function()
        local p = start("two_instances")
        local a = tonumber(p:wait_for("A serving on http://127%.0%.0%.1:(%d+)"))
        local b = tonumber(p:wait_for("B serving on http://127%.0%.0%.1:(%d+)"))
        assert.are_not.equal(a, b)
        local function count(port)
            local status, data = request(port, "GET", "/count")
            assert.same(200, status)
            return data.instance .. " " .. data.count
        end
        assert.same("A 1", count(a))
        assert.same("A 2", count(a))
        assert.same("B 1", count(b))
        assert.same("A 3", count(a))
        -- concurrent clients on both: each instance counts its own
        local tasks = {}
        for i = 1, 10 do
            tasks[i] = moonlet.spawn(function() return count(i % 2 == 0 and a or b) end)
        end
        for i = 1, 10 do assert.truthy(tasks[i]:join(10)) end
        assert.same("A 9", count(a))
        assert.same("B 7", count(b))
        assert.truthy(p:signal("TERM"))
        assert.same(0, p:wait())
        assert.truthy(p:output():find("both stopped", 1, true), p:output())
    end)
end)
