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

    it("refuses a bad header name", function()
        assert.has_error(function() moonlet.request_id({ header = "X Bad" }) end,
                         "moonlet.request_id: header is a header name")
    end)
end)
