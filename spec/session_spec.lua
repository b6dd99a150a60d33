-- spec/session_spec.lua: moonlet.crypto (digests, HMAC, random bytes, base64, signed values) against
-- published test vectors, res:on_send, and moonlet.session over real sockets: the cookie it sets,
-- reads back, refuses when forged or expired, deletes, and writes on every way a response leaves
-- (body, abort, stream, file) but not on a handler error.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local crypto = moonlet.crypto

local SECRET = "0123456789abcdef-spec-secret"

describe("moonlet.crypto", function()
    it("digests, HMAC and hex match the published vectors", function()
        assert.same("a9993e364706816aba3e25717850c26c9cd0d89d", crypto.hex(crypto.digest("sha1", "abc")))
        assert.same("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                    crypto.hex(crypto.digest("sha256", "abc")))
        -- RFC 4231, test case 2
        assert.same("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                    crypto.hex(crypto.hmac("sha256", "Jefe", "what do ya want for nothing?")))
        assert.has_error(function() crypto.digest("crc32", "x") end)
    end)

    it("encodes and decodes base64, both alphabets (RFC 4648 vectors)", function()
        local vectors = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==",
                          fooba = "Zm9vYmE=", foobar = "Zm9vYmFy" }
        for raw, enc in pairs(vectors) do
            assert.same(enc, crypto.base64_encode(raw))
            assert.same(raw, crypto.base64_decode(enc))
            assert.same((enc:gsub("=", "")), crypto.base64_encode(raw, true))
            assert.same(raw, crypto.base64_decode((enc:gsub("=", "")))) -- padding optional
        end
        assert.same({ "+/+/", "-_-_" }, { crypto.base64_encode("\251\255\191"),
                                          crypto.base64_encode("\251\255\191", true) })
        assert.same("\251\255\191", crypto.base64_decode("-_-_", true))
        assert.is_nil(crypto.base64_decode("-_-_")) -- not of the standard alphabet
        assert.is_nil(crypto.base64_decode("Zm9v!"))
        assert.is_nil(crypto.base64_decode("Z"))
        assert.is_nil(crypto.base64_decode("Zg==="))
        for _ = 1, 50 do -- round trips of random bytes of every length mod 3
            local s = crypto.random(math.random(0, 40))
            assert.is_true(crypto.base64_decode(crypto.base64_encode(s)) == s)
            assert.is_true(crypto.base64_decode(crypto.base64_encode(s, true), true) == s)
        end
    end)

    it("gives random bytes of the length asked, different each time", function()
        assert.same({ 0, 32, 5000 }, { #crypto.random(0), #crypto.random(32), #crypto.random(5000) })
        assert.are_not.equal(crypto.random(16), crypto.random(16))
        assert.has_error(function() crypto.random(-1) end)
        assert.is_true(crypto.equal("abc", "abc"))
        assert.is_false(crypto.equal("abc", "abd"))
        assert.is_false(crypto.equal("abc", "abcd"))
    end)

    it("signs values for a name; refuses another name, a change, an old or future one", function()
        local t = 1800000000
        local token = crypto.sign(SECRET, "sid", "user=42", t)
        assert.truthy(token:match("^[%w_-]+%.%d+%.[%w_-]+$"))
        assert.same({ "user=42", nil, t }, { crypto.unsign(SECRET, "sid", token, 60, t + 59) })
        assert.same({ nil, "expired" }, { crypto.unsign(SECRET, "sid", token, 60, t + 61) })
        assert.same({ nil, "expired" }, { crypto.unsign(SECRET, "sid", token, 60, t - 400) })
        assert.same("user=42", crypto.unsign(SECRET, "sid", token, nil, t + 1e6)) -- no max_age
        assert.same({ nil, "bad signature" }, { crypto.unsign(SECRET, "other", token, nil, t) })
        local forged = crypto.base64_encode("user=1", true) .. token:match("%..*$")
        assert.same({ nil, "bad signature" }, { crypto.unsign(SECRET, "sid", forged, nil, t) })
        local later = token:gsub("%.(%d+)%.", function(ts) return "." .. (ts + 1000) .. "." end)
        assert.same({ nil, "bad signature" }, { crypto.unsign(SECRET, "sid", later, nil, t) })
        assert.same({ nil, "bad signature" }, { crypto.unsign(SECRET, "sid", "garbage", nil, t) })
        assert.same({ nil, "bad signature" }, { crypto.unsign(SECRET .. "x", "sid", token, nil, t) })
        -- rotation: the first secret signs, any verifies
        local rotated = { "a-brand-new-secret-0001", SECRET }
        assert.same("user=42", crypto.unsign(rotated, "sid", token, nil, t))
        local fresh = crypto.sign(rotated, "sid", "v", t)
        assert.same({ "v", nil, t }, { crypto.unsign("a-brand-new-secret-0001", "sid", fresh, nil, t) })
        assert.same({ nil, "bad signature" }, { crypto.unsign(SECRET, "sid", fresh, nil, t) })
        assert.has_error(function() crypto.sign("short", "sid", "v") end)
        assert.has_error(function() crypto.sign({}, "sid", "v") end)
        assert.has_error(function() crypto.sign(SECRET, "sid", 42) end)
        assert.has_error(function() crypto.sign(SECRET, "sid", "v", 0 / 0) end)
        assert.has_error(function() crypto.sign(SECRET, "sid", "v", 1e15) end)
        assert.has_error(function() crypto.unsign(SECRET, nil, crypto.sign(SECRET, "nil", "v")) end)
        assert.has_error(function() crypto.equal(1, "1") end)
        assert.has_error(function() crypto.random(1.5) end)
    end)
end)

-- the Set-Cookie lines of a raw response, and its status
local function raw_get(port, path, cookie)
    local req = "GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if cookie then req = req .. "Cookie: " .. cookie .. "\r\n" end
    local raw = assert(test.raw(port, req .. "\r\n"))
    local set = {}
    for line in raw:gmatch("\r\nSet%-Cookie: ([^\r]*)") do set[#set + 1] = line end
    local body = raw:match("\r\n\r\n(.*)$")
    return tonumber(raw:match("^HTTP/1%.1 (%d+)")), set, body
end

-- "session=<token>" out of a Set-Cookie line
local function pair_of(line)
    return line:match("^([^;]*)")
end

describe("moonlet.session", function()
    local function serve(opts)
        local app = moonlet.app()
        app:use(moonlet.session(opts or { secret = SECRET }))
        app:get("/login/:user", function(req) req.session.user = req.params.user; return "hi" end)
        app:get("/me", function(req) return { user = req.session.user or false } end)
        app:get("/count", function(req)
            req.session.n = (req.session.n or 0) + 1
            return tostring(req.session.n)
        end)
        app:get("/logout", function(req) req.session = nil; return "bye" end)
        app:get("/abort", function(req)
            req.session.flash = "moved"
            moonlet.abort(302, "", { Location = "/" })
        end)
        app:get("/stream", function(req, res) req.session.s = 1; res:write("a"); res:write("b") end)
        app:get("/fail", function(req) req.session.user = "mallory"; error("boom") end)
        app:get("/big", function(req) req.session.blob = ("x"):rep(5000); return "big" end)
        local dir = os.tmpname()
        os.remove(dir)
        assert(moonlet.fs.mkdir(dir))
        assert(moonlet.fs.write(dir .. "/f.txt", "file"))
        app:websocket("/ws", function(ws, req)
            req.session.in_ws = true -- not saved: the 101 is out
            ws:send("hi")
        end)
        app:use(function(req, _, nxt) -- a static file, with the session changed
            if req.path:find("^/files/") then req.session.file = true end
            return nxt()
        end)
        app:static("/files", dir, { max_age = 3600 })
        local server, port = test.serve(app)
        test.defer(function()
            server:close()
            os.remove(dir .. "/f.txt")
            os.remove(dir)
        end)
        return port
    end

    it("sets a signed, HttpOnly, SameSite=Lax cookie when the session changes, and reads it back", function()
        local port = serve()
        local status, set = raw_get(port, "/login/ada")
        assert.same({ 200, 1 }, { status, #set })
        assert.truthy(set[1]:match("^session=[%w_-]+%.%d+%.[%w_-]+; "))
        assert.truthy(set[1]:find("; Path=/", 1, true))
        assert.truthy(set[1]:find("; Max-Age=1209600", 1, true))
        assert.truthy(set[1]:find("; HttpOnly", 1, true))
        assert.truthy(set[1]:find("; SameSite=Lax", 1, true))
        local cookie = pair_of(set[1])
        local _, set2, body = raw_get(port, "/me", cookie)
        assert.same({ '{"user":"ada"}', {} }, { body, set2 }) -- unchanged: no new cookie
        local _, set3, n = raw_get(port, "/count", cookie)
        assert.same({ "1", 1 }, { n, #set3 })
        local _, _, n2 = raw_get(port, "/count", pair_of(set3[1]))
        assert.same("2", n2)
        local _, _, anon = raw_get(port, "/me")
        assert.same('{"user":false}', anon)
    end)

    it("takes a forged, tampered or foreign cookie for an empty session", function()
        local port = serve()
        local _, set = raw_get(port, "/login/ada")
        local token = pair_of(set[1]):match("^session=(.*)$")
        local forged = crypto.base64_encode('{"user":"admin"}', true) .. token:match("%..*$")
        local foreign = crypto.sign("another-app-secret-xyz", "session", '{"user":"admin"}')
        for _, c in ipairs({ "session=" .. forged, "session=garbage", "session=", "session=" .. foreign }) do
            local _, _, body = raw_get(port, "/me", c)
            assert.same('{"user":false}', body)
        end
    end)

    it("deletes the cookie of a session set to nil", function()
        local port = serve()
        local _, set = raw_get(port, "/login/ada")
        local _, del = raw_get(port, "/logout", pair_of(set[1]))
        assert.same(1, #del)
        assert.truthy(del[1]:match("^session=; Max%-Age=0"))
        local _, none = raw_get(port, "/logout") -- no cookie, nothing to delete
        assert.same({}, none)
    end)

    it("writes the cookie however the response leaves: abort, stream, file; not on an error", function()
        local port = serve()
        local status, set = raw_get(port, "/abort")
        assert.same({ 302, 1 }, { status, #set })
        local _, _, body = raw_get(port, "/me", pair_of(set[1]))
        assert.same('{"user":false}', body)
        status, set, body = raw_get(port, "/stream")
        assert.same({ 200, 1 }, { status, #set })
        assert.truthy(body:find("a", 1, true))
        status, set, body = raw_get(port, "/files/f.txt")
        assert.same({ 200, 1, "file" }, { status, #set, body })
        local file = test.request(port, "GET", "/files/f.txt") -- it sets a cookie: not for a shared cache
        assert.same("private, max-age=3600", file.headers["cache-control"])
        local ws = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/ws"))
        assert.same("hi", ws:receive())
        ws:close()
        local _, login = raw_get(port, "/login/ada")
        status, set = raw_get(port, "/fail", pair_of(login[1]))
        assert.same({ 500, {} }, { status, set }) -- the session stays as the request found it
        local _, _, me = raw_get(port, "/me", pair_of(login[1]))
        assert.same('{"user":"ada"}', me)
        status, set = raw_get(port, "/big")
        assert.same({ 500, {} }, { status, set }) -- too large for a cookie: the reason is in the log
    end)

    it("refuses an expired cookie and re-signs one past half its max_age", function()
        -- (signed times are whole seconds: a cookie is up to 1 s older than it looks at first)
        local port = serve({ secret = SECRET, max_age = 4, name = "s" })
        local _, set = raw_get(port, "/login/ada")
        assert.truthy(set[1]:find("; Max-Age=4", 1, true))
        local cookie = pair_of(set[1])
        moonlet.sleep(2.1)
        local _, again, body = raw_get(port, "/me", cookie) -- past half of 4 s, within 4: signed anew
        assert.same({ '{"user":"ada"}', 1 }, { body, #again })
        local t = moonlet.time()
        local old = crypto.sign(SECRET, "s", '{"user":"ada"}', t - 5)
        local _, _, gone = raw_get(port, "/me", "s=" .. old)
        assert.same('{"user":false}', gone)
    end)

    it("raises on missing or short secrets and bad options", function()
        assert.has_error(function() moonlet.session() end)
        assert.has_error(function() moonlet.session({}) end)
        assert.has_error(function() moonlet.session({ secret = "short" }) end)
        assert.has_error(function() moonlet.session({ secret = SECRET, max_age = "1d" }) end)
        assert.has_error(function() moonlet.session({ secret = SECRET, name = "my session" }) end)
        assert.has_error(function() moonlet.session({ secret = SECRET, same_site = "None" }) end)
    end)
end)

describe("res:on_send", function()
    it("runs hooks once, in order, before the head goes out, with the final status", function()
        local app = moonlet.app()
        app:use(function(_, res, nxt)
            res:on_send(function(r)
                r:header("X-Seen", tostring(r._status))
                r:on_send(function(r2) r2:header("X-Second", "yes") end)
            end)
            return nxt()
        end)
        app:get("/", function() return 201, "made" end)
        app:get("/abort", function() moonlet.abort(403, "no") end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local r = test.request(port, "GET", "/")
        assert.same({ 201, "201", "yes" }, { r.status, r.headers["x-seen"], r.headers["x-second"] })
        r = test.request(port, "GET", "/abort")
        assert.same({ 403, "403" }, { r.status, r.headers["x-seen"] })
        r = test.request(port, "GET", "/nowhere")
        assert.same({ 404, "404" }, { r.status, r.headers["x-seen"] })
        assert.has_error(function() setmetatable({}, require("moonlet.response").mt):on_send(1) end)
    end)

    it("a hook that raised is not run again; the later ones run when the response goes after all", function()
        local app = moonlet.app()
        local runs = { first = 0, second = 0, ws = 0 }
        app:use(function(req, res, nxt)
            res:on_send(function() runs.first = runs.first + 1; error("first hook fails") end)
            res:on_send(function(r) runs.second = runs.second + 1; r:header("X-Second", "yes") end)
            if req.path == "/ws" then res:on_send(function() runs.ws = runs.ws + 1 end) end
            return nxt()
        end)
        app:get("/", function(_, res)
            local ok = pcall(res.write, res, "streamed?") -- the first hook raises: no stream
            return ok and "streamed" or "fallback"
        end)
        app:websocket("/ws", function(ws) ws:send("hi") end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local r = test.request(port, "GET", "/")
        assert.same({ 200, "fallback", "yes" }, { r.status, r.body, r.headers["x-second"] })
        assert.same({ 1, 1 }, { runs.first, runs.second })
        local ws = assert(moonlet.ws.connect("ws://127.0.0.1:" .. port .. "/ws"))
        assert.same("hi", ws:receive())
        ws:close()
        moonlet.sleep(0.05)
        assert.same(0, runs.ws) -- a WebSocket's 101 runs no hook, nor does its end
    end)
end)
