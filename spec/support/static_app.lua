-- spec/support/static_app.lua: the app spec/static_build_spec.lua runs under the fully static
-- executable (build/moonlet-static) to prove that every module linked into it works without a
-- shared library: one route per module. Environment: PG_URL (a running PostgreSQL), CERT and KEY
-- (a server certificate for 127.0.0.1), CA (its authority).
local moonlet = require "moonlet"
local json = require "moonlet.json"
local zlib = require "moonlet.zlib"

local app = moonlet.app()

app:get("/", function() return "Hello, World!" end)

-- cjson (preloaded from the static archive), both ways
app:post("/json", function(req)
    local v = assert(json.decode(req:body()))
    v.seen = true
    return v
end)

app:get("/err", function() error("static boom") end)

-- SQLite, linked in
app:get("/sqlite", function()
    local db = assert(moonlet.sqlite.open(":memory:"))
    db:exec("create table t (x integer)")
    db:exec("insert into t values (?), (?)", 20, 22)
    local rows = db:query("select sum(x) as s from t")
    db:close()
    return { sum = rows[1].s, version = moonlet.sqlite.sqlite_version }
end)

-- PostgreSQL: libpq opened with dlopen from the static executable
app:get("/pg", function()
    local pool = moonlet.pg.pool({ url = assert(os.getenv("PG_URL")), size = 1 })
    local rows, err = pool:query("select 6 * $1::int as n", 7)
    pool:close()
    if not rows then return 500, "pg: " .. tostring(err) end
    return { n = rows[1].n }
end)

-- OpenSSL: a TLS listener and a verifying client in the same process
app:get("/tls", function()
    local server = assert(moonlet.tcp.listen({
        host = "127.0.0.1", port = 0, tls = { cert = os.getenv("CERT"), key = os.getenv("KEY") },
    }, function(sock)
        local line = sock:receive("*l")
        sock:send("tls echo: " .. tostring(line) .. "\n")
    end))
    local sock, err = moonlet.tcp.connect("127.0.0.1", server:port(),
                                          { timeout = 5, tls = { cafile = os.getenv("CA") } })
    if not sock then
        server:close()
        return 500, "tls: " .. tostring(err)
    end
    sock:send("hi\n")
    local line = sock:receive("*l")
    sock:close()
    server:close()
    return line
end)

-- the HTTP client (and zlib: the upstream route answers gzip) against this same server
app:get("/gz", function(_, res)
    res:header("Content-Encoding", "gzip")
    return zlib.gzip(string.rep("moonlet ", 100))
end)
app:get("/fetch", function(req)
    local base = "http://127.0.0.1:" .. req.headers["x-port"]
    local function body(res, err)
        assert(res and res.status == 200, err or res and res.status)
        return res.body
    end
    local a, b = moonlet.gather({
        function() return body(moonlet.http.get(base .. "/")) end,
        function() return body(moonlet.http.get(base .. "/gz", { decompress = true })) end,
    })
    return { hello = a[1], gz_len = #a[2], b = b }
end)

-- the thread pool: a worker state with cjson preloaded too
app:get("/work", function()
    return moonlet.work(function(n)
        local cjson = require "cjson"
        local t = {}
        for i = 1, n do t[i] = i * i end
        return cjson.encode(t)
    end, 5)
end)

-- ngx's hashes (OpenSSL calls, no FFI)
app:get("/md5", function(req)
    local ngx = require("moonlet.ngx").install()
    return ngx.md5(req.query.s or "") .. " " .. ngx.encode_base64(ngx.hmac_sha1("k", "v"))
end)

app:get("/dns", function()
    local addrs = assert(moonlet.dns.resolve("localhost"))
    return { first = addrs[1].address or addrs[1] }
end)

app:websocket("/ws", function(ws)
    while true do
        local msg = ws:receive()
        if not msg then return end
        ws:send("echo: " .. msg)
    end
end)

return app
