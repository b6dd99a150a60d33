-- spec/workers_spec.lua: `moonlet --workers N` over real processes and sockets: N workers share the
-- port (HTTP and moonlet.tcp.listen), --port 0 included; moonlet.worker; a killed worker is started
-- again (with a growing delay when it fails to start again after the app served; a script that
-- listens by itself counts as serving); moonlet.shared is one for all of them (and outlives restarts
-- and reloads); SIGHUP and SIGTERM reach every worker (requests in flight
-- finish, exit 0); a script that cannot start (a syntax error, told once; an error at its top
-- level; a port in use) stops them all with exit 1; bad values of the flag exit 2.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local dir

local function script(name, src)
    local path = dir .. "/" .. name
    assert(moonlet.fs.write(path, src))
    return path
end

local APP = [[
local moonlet = require "moonlet"
local tcp_port = tonumber(arg[1])
if tcp_port then
    moonlet.tcp.listen({ host = "127.0.0.1", port = tcp_port }, function(sock)
        sock:send(moonlet.worker.id() .. "\n")
        sock:close()
    end)
end
local udp_port = tonumber(arg[2])
if udp_port then
    local u = assert(moonlet.udp.bind("127.0.0.1", udp_port))
    moonlet.spawn(function()
        while true do
            local _, host, port = u:recvfrom()
            if host then u:sendto(tostring(moonlet.worker.id()), host, port) end
        end
    end)
end
local app = moonlet.app()
app:get("/", function()
    return moonlet.worker.id() .. " " .. moonlet.worker.count() .. " " .. moonlet.worker.pid()
end)
app:get("/ngx", function()
    local ngx = require("moonlet.ngx").get()
    return ngx.worker.id() .. " " .. ngx.worker.count() .. " " .. ngx.worker.pid()
end)
app:get("/slow", function()
    io.stderr:write("slow started\n")
    moonlet.sleep(0.5)
    return "slow " .. moonlet.worker.pid()
end)
return app
]]

-- GET / on new connections until every worker id in want answered; id -> pid
local function pids_of(port, want)
    local seen, n = {}, 0
    for _ = 1, 400 do
        local r = test.request(port, "GET", "/")
        assert.same(200, r.status)
        local id, count, pid = r.body:match("^(%d+) (%d+) (%d+)$")
        assert.same(tostring(want), count)
        id = tonumber(id)
        if not seen[id] then seen[id] = tonumber(pid); n = n + 1 end
        if n == want then return seen end
    end
    return seen
end

-- the workers' pids once both answer and cond(pids) holds, or nil after 10 s (a connection queued
-- at a worker's socket when that worker died is reset: such a round is tried again)
local function pids_when(port, cond)
    return test.wait_until(function()
        local ok, now = pcall(pids_of, port, 2)
        return ok and now[0] and now[1] and (not cond or cond(now)) and now
    end, 10)
end

local function alive(pid) return os.execute("kill -0 " .. pid .. " 2>/dev/null") == 0 end

local function count(s, plain)
    local n, i = 0, 1
    while true do
        local a, b = s:find(plain, i, true)
        if not a then return n end
        n, i = n + 1, b + 1
    end
end

local function free_port()
    local s = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function() end))
    local port = s:port()
    s:close()
    return port
end

describe("moonlet --workers", function()
    setup(function() dir = test.make_dir() end)
    teardown(function() test.remove_dir(dir) end)

    it("spreads connections over N processes on one port, moonlet.tcp.listen's and UDP's too",
       function()
        local tport = free_port()
        local probe = assert(moonlet.udp.bind("127.0.0.1", 0))
        local _, uport = probe:getsockname()
        probe:close()
        local p = test.start_process(("--workers 2 --port 0 %s %d %d")
            :format(script("app.lua", APP), tport, uport))
        test.defer(function() p:kill() end)
        local port = p:port()
        local pids = pids_of(port, 2)
        assert.is_number(pids[0])
        assert.is_number(pids[1])
        assert.are_not.equal(pids[0], pids[1])
        assert.are_not.equal(p:pid(), pids[0]) -- the supervisor serves nothing itself
        for _ = 1, 20 do -- ngx.worker, for lua-resty code, says the same as moonlet.worker
            local id, n, pid = test.request(port, "GET", "/ngx").body:match("^(%d+) (%d+) (%d+)$")
            assert.same({ "2", tonumber(pid) }, { n, pids[tonumber(id)] })
        end
        local out = p:output()
        assert.truthy(out:find("workers: 2 of 2 started", 1, true))
        assert.same(2, count(out, "on http://127.0.0.1:" .. port))
        local ids = {}
        for _ = 1, 400 do
            local sock = assert(moonlet.tcp.connect("127.0.0.1", tport, { timeout = 5 }))
            ids[assert(sock:receive("*l"))] = true
            sock:close()
            if ids["0"] and ids["1"] then break end
        end
        assert.same({ ["0"] = true, ["1"] = true }, ids)
        ids = {} -- datagrams from many source ports reach both workers
        for _ = 1, 400 do
            local c = assert(moonlet.udp.bind("127.0.0.1", 0))
            assert(c:sendto("which?", "127.0.0.1", uport))
            local id = c:recvfrom(2)
            c:close()
            if id then ids[id] = true end
            if ids["0"] and ids["1"] then break end
        end
        assert.same({ ["0"] = true, ["1"] = true }, ids)
    end)

    it("starts a killed worker again, and passes SIGHUP on to each", function()
        local p = test.start_process("--workers 2 --port 0 " .. script("app.lua", APP))
        test.defer(function() p:kill() end)
        local port = p:port()
        local pids = pids_of(port, 2)
        os.execute("kill -9 " .. pids[0])
        local again = pids_when(port, function(now) return now[0] ~= pids[0] and now[1] == pids[1] end)
        assert.truthy(again, p:output())
        assert.truthy(p:output():find("worker 0 (pid " .. pids[0] .. ") was killed by signal 9; "
                                      .. "starting it again in ", 1, true))
        assert.is_true(p:signal("HUP"))
        assert.truthy(test.wait_until(function() return count(p:output(), "reloaded ") == 2 end, 10),
                      p:output())
        assert.same(again, pids_of(port, 2)) -- a reload is no restart
    end)

    it("stops on SIGTERM: requests in flight finish, every worker exits, exit 0", function()
        local p = test.start_process("--workers 2 --port 0 " .. script("app.lua", APP))
        test.defer(function() p:kill() end)
        local port = p:port()
        local pids = pids_of(port, 2)
        local slow = {}
        for i = 1, 4 do slow[i] = moonlet.spawn(test.request, port, "GET", "/slow") end
        assert.truthy(test.wait_until(function() return count(p:output(), "slow started") == 4 end))
        assert.is_true(p:signal("TERM"))
        for i = 1, 4 do
            local ok, r = slow[i]:join()
            assert.is_true(ok)
            assert.same(200, r.status)
        end
        assert.same(0, p:wait(10))
        assert.is_false(alive(pids[0]) or alive(pids[1]))
        assert.truthy(p:output():find("workers: stopping (signal 15)", 1, true))
        -- a stop while the workers are still starting stops them too (once the supervisor runs:
        -- a process signalled before it set its handlers dies of it, as any would)
        local early = test.start_process("--workers 2 --port 0 " .. script("app.lua", APP))
        test.defer(function() early:kill() end) -- (each defer its own process: kill waits for its exit code)
        assert.truthy(test.wait_until(function() return early:output():find("workers: 2 of 2", 1, true) end))
        assert.is_true(early:signal("TERM"))
        assert.same(0, early:wait(10))
    end)

    it("retries a worker that fails to start again once the app has served, and it comes back",
       function()
        local marker = dir .. "/fail-now"
        local p = test.start_process("--workers 2 --port 0 " .. script("flaky.lua", ([[
local f = io.open(%q)
if f then f:close(); error("the database is down") end
]]):format(marker) .. APP))
        test.defer(function() p:kill() end)
        local port = p:port()
        local pids = pids_of(port, 2)
        assert(moonlet.fs.write(marker, "x"))
        os.execute("kill -9 " .. pids[0])
        assert.truthy(test.wait_until(function() -- (the delay doubles twice: killed within 10 s
            -- of serving, then failing to start: 4 s from its last start)
            return p:output():find("exited with status 1; starting it again in [1-4]%.%d s")
        end, 10), p:output())
        assert.truthy(p:output():find("the database is down", 1, true))
        for _ = 1, 5 do -- worker 1 serves on meanwhile, alone
            assert.same("1 2 " .. pids[1], test.request(port, "GET", "/").body)
        end
        assert(os.remove(marker))
        local back = pids_when(port)
        assert.truthy(back, p:output())
        assert.falsy(p:output():find("before it served", 1, true))
    end)

    it("backs off from a worker that dies soon after it serves, each time twice as long", function()
        local marker = dir .. "/crash-soon"
        assert(moonlet.fs.write(marker, "x"))
        local p = test.start_process("--workers 2 --port 0 " .. script("crashy.lua", ([[
local moonlet = require "moonlet"
local ffi = require "ffi"
ffi.cdef "int getpid(void); int kill(int pid, int sig);"
moonlet.spawn(function() -- (it serves by then: its ready is sent once it listens)
    moonlet.sleep(0.2)
    local f = io.open(%q)
    if f then f:close(); ffi.C.kill(ffi.C.getpid(), 9) end
end)
local app = moonlet.app()
app:get("/", function() return "up" end)
return app
]]):format(marker)))
        test.defer(function() p:kill() end)
        -- worker 0's delays from its last start: 2 s, then 4 s (before: 1 s each time, forever)
        local pattern = "worker 0 %(pid %d+%) was killed by signal 9; starting it again in "
                        .. "%d+%.%d s %((%d+) s after its start%)"
        local delays
        assert.truthy(test.wait_until(function()
            delays = {}
            for d in p:output():gmatch(pattern) do delays[#delays + 1] = tonumber(d) end
            return #delays >= 2
        end, 15), p:output())
        assert.same({ 2, 4 }, { delays[1], delays[2] })
        assert(os.remove(marker)) -- the next starts serve on
        assert.truthy(test.wait_until(function()
            local ok, r = pcall(test.request, p:port(), "GET", "/")
            return ok and r.body == "up"
        end, 15), p:output())
    end)

    it("shares moonlet.shared and ngx.shared between the workers, across restarts and reloads",
       function()
        local p = test.start_process("--workers 2 --port 0 " .. script("counter.lua", [[
local moonlet = require "moonlet"
local hits = moonlet.shared("hits", { size = "64k" })
local app = moonlet.app()
app:get("/", function()
    return moonlet.worker.id() .. " " .. moonlet.worker.count() .. " " .. moonlet.worker.pid()
end)
app:get("/hit", function() -- "worker count"
    return moonlet.worker.id() .. " " .. assert(hits:incr("n", 1, 0))
end)
app:get("/put/:v", function(req)
    local ngx = require("moonlet.ngx").get()
    assert(ngx.shared.hits:set("v", req.params.v))
    return moonlet.worker.id() .. ""
end)
app:get("/v", function() return moonlet.worker.id() .. " " .. tostring(hits:get("v")) end)
return app
]]))
        test.defer(function() p:kill() end)
        local port = p:port()
        -- both workers serving first (p:port() returns at the first one's line; under load the
        -- second may still be starting, and every connection would go to the first)
        assert.truthy(pids_when(port), p:output())
        local by_worker, counts = {}, {}
        local function hit(times)
            for _ = 1, times do
                local id, n = test.request(port, "GET", "/hit").body:match("^(%d) (%d+)$")
                by_worker[id] = true
                counts[#counts + 1] = tonumber(n)
            end
        end
        hit(100)
        assert.same({ ["0"] = true, ["1"] = true }, by_worker) -- (100 connections: both served)
        for i = 1, #counts do assert.same(i, counts[i]) end -- one count, not one per worker
        local writer = test.request(port, "GET", "/put/seen").body
        local readers = {}
        for _ = 1, 100 do
            local id, v = test.request(port, "GET", "/v").body:match("^(%d) (.*)$")
            assert.same("seen", v)
            readers[id] = true
        end
        assert.truthy(readers[writer == "0" and "1" or "0"]) -- the other worker read it
        local pids = pids_of(port, 2)
        os.execute("kill -9 " .. pids[0])
        assert.truthy(pids_when(port, function(now) return now[0] ~= pids[0] end), p:output())
        assert.is_true(p:signal("HUP"))
        assert.truthy(test.wait_until(function() return count(p:output(), "reloaded ") == 2 end, 10))
        local before = #counts
        hit(10) -- a restarted worker and reloaded scripts count on
        for i = before + 1, #counts do assert.same(i, counts[i]) end
    end)

    it("restarts the worker of a script that listens by itself and returns no app", function()
        local port = free_port()
        local p = test.start_process(("--workers 2 %s %d"):format(script("plain.lua", [[
local moonlet = require "moonlet"
local app = moonlet.app():get("/", function()
    return moonlet.worker.id() .. " " .. moonlet.worker.count() .. " " .. moonlet.worker.pid()
end)
assert(app:listen({ host = "127.0.0.1", port = tonumber(arg[1]) }))
]]), port))
        test.defer(function() p:kill() end)
        local pids = pids_when(port)
        assert.truthy(pids, p:output())
        os.execute("kill -9 " .. pids[1])
        assert.truthy(pids_when(port, function(now) return now[1] ~= pids[1] end), p:output())
    end)

    it("tells a syntax error once, before any worker starts, and exits 1", function()
        local p = test.start_process("--workers 3 --port 0 "
            .. script("broken.lua", "local app = require('moonlet').app(\nreturn app\n"))
        test.defer(function() p:kill() end)
        assert.same(1, p:wait(10))
        local out = p:output()
        assert.same(1, count(out, "broken.lua:2:"))
        assert.falsy(out:find("workers:", 1, true))
    end)

    it("stops them all and exits 1 when the app fails to start in a worker", function()
        local p = test.start_process("--workers 2 --port 0 "
            .. script("boom.lua", "error('boom at the top')\n"))
        test.defer(function() p:kill() end)
        assert.same(1, p:wait(10))
        assert.truthy(p:output():find("before it served; stopping", 1, true))
        assert.truthy(p:output():find("boom at the top", 1, true))
        local s = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function() end))
        test.defer(function() s:close() end)
        local port = s:port()
        local taken = test.start_process(("--workers 2 --port %d %s"):format(port, script("app.lua", APP)))
        test.defer(function() taken:kill() end)
        assert.same(1, taken:wait(10))
        assert.truthy(taken:output():find("listen on 127.0.0.1:" .. port .. ": address in use",
                                          1, true), taken:output())
    end)

    it("serves alone with --workers 1 (and without), and refuses a bad count", function()
        assert.same({ 0, 1 }, { moonlet.worker.id(), moonlet.worker.count() })
        assert.is_number(moonlet.worker.pid())
        local p = test.start_process("--workers 1 --port 0 " .. script("app.lua", APP))
        test.defer(function() p:kill() end)
        local r = test.request(p:port(), "GET", "/")
        assert.same("0 1 " .. p:pid(), r.body)
        for _, bad in ipairs({ "0", "x", "256", "1.5" }) do
            local q = test.start_process("--workers " .. bad .. " " .. script("app.lua", APP))
            test.defer(function() q:kill() end)
            assert.same(2, q:wait(10))
            assert.truthy(q:output():find("--workers wants a number from 1 to 255, or auto", 1, true))
        end
    end)
end)
