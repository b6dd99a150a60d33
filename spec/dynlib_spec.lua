-- spec/dynlib_spec.lua: build/moonlet opens OpenSSL, SQLite, PCRE2, zlib and libpq when it first needs each
-- (core/dynlib.h), so a server that never does maps none of them (OpenSSL alone was 1.7 MB of idle
-- RSS). Each route below needs one library; /proc/PID/maps shows what the process has mapped. The
-- framework's own rarer modules (moonlet.tcp, dns, cookie, multipart) load on first use alike.
-- spec/c/test_libs_missing.c covers a machine without them; spec/static_build_spec.lua the static
-- executable, which links them.
local test = require "moonlet.test"
local defer = test.defer

local APP = [=[
local moonlet = require "moonlet"
require "moonlet.ngx"
local app = moonlet.app()
app:get("/", function() return "plain" end)
app:get("/digest", function() return tostring(#moonlet.crypto.digest("sha256", "x")) end)
app:get("/sqlite", function()
    local db = assert(moonlet.sqlite.open(":memory:"))
    local rows = assert(db:query("SELECT 6 * 7 AS n"))
    db:close()
    return tostring(rows[1].n)
end)
app:get("/re", function() return (ngx.re.match("abc123", [[\d+]])[0]) end)
app:get("/gzip", function()
    local zlib = require "moonlet.zlib"
    return zlib.gunzip(zlib.gzip("zipped"))
end)
app:get("/pg", function()
    -- no server there: the connection fails, but libpq had to be opened to try it
    local pool = require("moonlet.pg").pool({ url = "host=/nonexistent-moonlet-dir", connect_timeout = 1 })
    local rows, err = pool:query("SELECT 1")
    return tostring(rows) .. " " .. tostring(err ~= nil)
end)
return app
]=]

-- A moonlet process serving the app `src` (from a file of its own); stopped when the test ends.
local function serve(src)
    local dir = test.make_dir()
    defer(function() test.remove_dir(dir) end)
    local app = dir .. "/app.lua"
    test.write_file(app, src)
    local p = test.start_process("--port 0 " .. app)
    defer(function()
        p:signal("TERM")
        p:wait()
    end)
    return p
end

describe("libraries opened on first use", function()
    it("maps none of OpenSSL, SQLite, PCRE2, zlib and libpq until a handler needs each", function()
        local p = serve(APP)
        local port = p:port()
        local function mapped()
            local f = assert(io.open("/proc/" .. p:pid() .. "/maps"))
            local maps = f:read("*a")
            f:close()
            assert.truthy(maps:find("libuv", 1, true), maps) -- (the right process, linked dynamically)
            local found = {}
            local libs = {
                "libssl.so", "libcrypto.so", "libsqlite3.so", "libpcre2-8.so", "libz.so", "libpq.so",
            }
            for _, lib in ipairs(libs) do
                if maps:find(lib, 1, true) then found[#found + 1] = lib end
            end
            return found
        end
        local function get(path)
            local r = test.request(port, "GET", path)
            return { r.status, r.body }
        end
        assert.same({ 200, "plain" }, get("/"))
        assert.same({}, mapped())
        assert.same({ 200, "42" }, get("/sqlite"))
        assert.same({ "libsqlite3.so" }, mapped())
        assert.same({ 200, "123" }, get("/re"))
        assert.same({ "libsqlite3.so", "libpcre2-8.so" }, mapped())
        assert.same({ 200, "32" }, get("/digest"))
        assert.same({ "libssl.so", "libcrypto.so", "libsqlite3.so", "libpcre2-8.so" }, mapped())
        assert.same({ 200, "zipped" }, get("/gzip"))
        assert.same({ "libssl.so", "libcrypto.so", "libsqlite3.so", "libpcre2-8.so", "libz.so" }, mapped())
        assert.same({ 200, "nil true" }, get("/pg"))
        assert.same({ "libssl.so", "libcrypto.so", "libsqlite3.so", "libpcre2-8.so", "libz.so", "libpq.so" },
            mapped())
        assert.same({ 200, "plain" }, get("/"))
    end)

    it("loads moonlet.tcp, dns, cookie and multipart only when the app uses them (idle memory)", function()
        local p = serve([[
local moonlet = require "moonlet"
local app = moonlet.app()
local NAMES = { "moonlet.tcp", "moonlet.dns", "moonlet.cookie", "moonlet.multipart" }
app:get("/loaded", function()
    local got = {}
    for _, name in ipairs(NAMES) do if package.loaded[name] then got[#got + 1] = name end end
    return table.concat(got, " ")
end)
app:get("/cookie", function(req) return req.cookies.a end)
return app
]])
        local port = p:port()
        local r = test.request(port, "GET", "/loaded")
        assert.same({ 200, "" }, { r.status, r.body })
        r = test.request(port, "GET", "/cookie", { headers = { Cookie = "a=1" } })
        assert.same({ 200, "1" }, { r.status, r.body })
        assert.same("moonlet.cookie", test.request(port, "GET", "/loaded").body)
    end)
end)
