-- spec/request_id_spec.lua: moonlet.request_id(), in a server process of its own with its logs in
-- files: a new id per request (32 hex digits, in req.id and the response header), the client's own
-- taken only when trusted and well-formed, the id in the JSON and moonlet access-log lines of the
-- request it belongs to, and at the head of a failing handler's line in the error log.
local test = require "moonlet.test"
local json = require "moonlet.json"
local moonlet = require "moonlet"

local APP = [[
local moonlet = require "moonlet"
local app = moonlet.app()
app:use(moonlet.request_id({ trust = os.getenv("TRUST") == "1" }))
app:get("/", function(req) return req.id end)
app:get("/boom", function() error("kaboom") end)
return app
]]

local read_file = test.read_file

describe("moonlet.request_id", function()
    local dir, app_path
    lazy_setup(function() dir, app_path = test.app_dir(APP) end)
    lazy_teardown(function() test.remove_dir(dir) end)

    local n = 0
    local function start(flags, env)
        n = n + 1
        local log, errlog = ("%s/%d-access.log"):format(dir, n), ("%s/%d-error.log"):format(dir, n)
        local p = test.start_process(("%s --port 0 --access-log=%s --error-log %s %s"):format(
            flags, log, errlog, app_path), env)
        test.defer(function()
            p:signal("KILL")
            p:wait()
        end)
        local port = test.wait_until(function()
            return tonumber((read_file(errlog) or ""):match("on http://[^:]+:(%d+)"))
        end, 10)
        assert(port, (read_file(errlog) or "") .. p:output())
        return port, log, errlog
    end

    local function lines(path, count)
        local got
        test.wait_until(function()
            got = {}
            for line in (read_file(path) or ""):gmatch("[^\n]+") do got[#got + 1] = line end
            return #got >= count
        end)
        return got
    end

    it("gives each request a new id, in req.id, the response and the JSON access log", function()
        local port, log = start("--access-log-format json")
        local a = test.request(port, "GET", "/")
        local b = test.request(port, "GET", "/", { headers = { ["X-Request-Id"] = "from-the-client" } })
        assert.truthy(a.body:match("^%x+$") and #a.body == 32, a.body)
        assert.same(a.body, a.headers["x-request-id"])
        assert.are_not.same(a.body, b.body) -- a new one each time, the client's not trusted
        assert.truthy(#b.body == 32)
        local got = lines(log, 2)
        assert.same({ a.body, b.body }, { json.decode(got[1]).request_id, json.decode(got[2]).request_id })
    end)

    it("takes a trusted client's id when well-formed; writes it in the moonlet line and the error log",
       function()
        local port, log, errlog = start("", "TRUST=1")
        local ok = test.request(port, "GET", "/", { headers = { ["X-Request-Id"] = "gw-42.a:b" } })
        assert.same({ "gw-42.a:b", "gw-42.a:b" }, { ok.body, ok.headers["x-request-id"] })
        local bad = test.request(port, "GET", "/", { headers = { ["X-Request-Id"] = "no spaces \"here\"" } })
        assert.truthy(#bad.body == 32 and bad.body:match("^%x+$"), bad.body)
        local long = test.request(port, "GET", "/", { headers = { ["X-Request-Id"] = string.rep("a", 201) } })
        assert.truthy(#long.body == 32, long.body)
        local boom = test.request(port, "GET", "/boom", { headers = { ["X-Request-Id"] = "trace-7" } })
        assert.same({ 500, "trace-7" }, { boom.status, boom.headers["x-request-id"] })
        local got = lines(log, 4)
        assert.truthy(got[1]:match('"GET / HTTP/1%.1" 200 9 "%-" [%d.]+ms id=gw%-42%.a:b$'), got[1])
        assert.truthy(got[2]:match(" id=" .. bad.body .. "$"), got[2])
        assert.truthy(got[4]:match('"GET /boom HTTP/1%.1" 500 .* id=trace%-7$'), got[4])
        local err
        assert(test.wait_until(function()
            err = read_file(errlog) or ""
            return err:find("[trace-7] GET /boom: ", 1, true)
        end), err)
        assert.truthy(err:find("kaboom", 1, true), err)
    end)

    it("passes the id on to the services a request calls with propagate = true", function()
        -- the service: echoes the id it got (or "none")
        local svc = moonlet.app()
        svc:get("/who", function(req) return req:header("x-trace") or "none" end)
        local up = "http://127.0.0.1:" .. test.serving(svc) .. "/who"
        local function fetch(opts)
            local r, err = moonlet.http.get(up, opts)
            return r and r.body or err
        end
        local front = moonlet.app()
        front:use(moonlet.request_id({ header = "X-Trace", trust = true, propagate = true }))
        front:get("/", function(req)
            local parts = moonlet.gather({
                fetch,
                function() return fetch({ headers = { ["x-TRACE"] = "own" } }) end, -- the call's own
                function() return fetch({ headers = { Accept = "*/*" } }) end,
            })
            -- a task spawned for the request passes it on too
            local ok, bg = moonlet.spawn(fetch):join(5)
            return { id = req.id, direct = fetch(), gathered = parts, spawned = ok and bg }
        end)
        local plain = moonlet.app() -- ids, not passed on
        plain:use(moonlet.request_id({ header = "X-Trace" }))
        plain:get("/", function(req) return { id = req.id, direct = fetch() } end)
        local port, port2 = test.serving(front), test.serving(plain)
        for _, given in ipairs({ "trace-1", false }) do
            local r = test.request(port, "GET", "/", { headers = { ["X-Trace"] = given or nil } })
            local b = json.decode(r.body)
            if given then assert.same(given, b.id) end
            assert.same({ b.id, { b.id, "own", b.id }, b.id }, { b.direct, b.gathered, b.spawned })
        end
        local b = json.decode(test.request(port2, "GET", "/").body)
        assert.same("none", b.direct)
        assert.truthy(#b.id == 32)
        -- outside any request: nothing
        assert.same("none", fetch())
    end)

    it("refuses a bad header name", function()
        assert.has_error(function() moonlet.request_id({ header = "X Bad" }) end,
                         "moonlet.request_id: header is a header name")
    end)
end)
