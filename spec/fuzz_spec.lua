-- spec/fuzz_spec.lua: requests changed at random, sent to a real app over real sockets: the Lua
-- side of what spec/c/test_fuzz_http.c does for the C core. The app's handlers read everything a
-- request carries (route parameters, query, headers, connection details, form and JSON bodies,
-- static files), so that a request-target, a header or a body no handler expects reaches the
-- router, the percent and query decoding and the request object. Whatever comes in, moonlet must
-- answer with a status of its own (200, 304, 400, 404, 405, 408, 413, 414, 431, ...) and never
-- with a 500 (a Lua error in moonlet's code) nor close a WebSocket with 1011, never hang, and go on
-- serving. A WebSocket handshake with frames behind it is among the seeds. The inputs come from a
-- fixed PRNG seed (env ML_FUZZ_SEED changes it, ML_FUZZ_N their number), 16 connections at a time.
local moonlet = require "moonlet"
local test = require "moonlet.test"
local core = require "moonlet.core"

local N = tonumber(os.getenv("ML_FUZZ_N")) or 400
local SEED = tonumber(os.getenv("ML_FUZZ_SEED")) or 7

local H = "Host: x\r\nConnection: close\r\n" -- a mutation may take it away: keep-alive ends too
local request_seeds = {
    "GET / HTTP/1.1\r\n" .. H .. "\r\n",
    "GET /users/42?q=a%20b&q=c+d&x=%41 HTTP/1.1\r\n" .. H .. "User-Agent: fuzz\r\n\r\n",
    "GET /files/a/b%2Fc/d.txt?=&&a=1&a HTTP/1.1\r\n" .. H .. "\r\n",
    "POST /form HTTP/1.1\r\n" .. H .. "Content-Type: application/x-www-form-urlencoded\r\n"
        .. "Content-Length: 17\r\n\r\na=1&b=%20x&c&=d+e",
    "POST /json HTTP/1.1\r\n" .. H .. "Content-Length: 23\r\n\r\n{\"a\":[1,2,{\"b\":null}]}",
    "PUT /stream HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "GET /assets/hello.txt HTTP/1.1\r\n" .. H .. "If-None-Match: \"x\"\r\nRange: bytes=1-3\r\n\r\n",
    "HEAD /assets/../assets/./hello.txt HTTP/1.1\r\n" .. H .. "\r\n",
    "DELETE /users/1 HTTP/1.1\r\n" .. H .. "\r\n",
    "GET /users/%E2%82%AC/ HTTP/1.0\r\n\r\n",
    "GET /users/up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\129\0",
}
-- multipart/form-data, to req:form() and to req:parts()
local MP = "--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx y\r\n--B  \r\n"
    .. "Content-Disposition: form-data; name=\"f\"; filename=\"a\\\"b.txt\"; filename*=UTF-8''%C3%A9\r\n"
    .. "Content-Type: text/plain\r\n\r\n1\r\n--\r\n-B\r\n--B--\r\nafter"
for _, path in ipairs({ "/form", "/parts" }) do
    request_seeds[#request_seeds + 1] = "POST " .. path .. " HTTP/1.1\r\n" .. H
        .. "Content-Type: multipart/form-data; boundary=B\r\nContent-Length: " .. #MP .. "\r\n\r\n" .. MP
end
-- a client's frame: FIN, the opcode, masked (the key 1 2 3 4) as a client must
local function ws_frame(op, payload)
    local masked = {}
    for i = 1, #payload do
        masked[i] = string.char(bit.bxor(payload:byte(i), (i - 1) % 4 + 1))
    end
    return string.char(0x80 + op, 0x80 + #payload, 1, 2, 3, 4) .. table.concat(masked)
end
request_seeds[#request_seeds + 1] = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    .. "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
    .. "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-other\r\n\r\n"
    .. ws_frame(1, "hello") .. ws_frame(9, "p") .. ws_frame(8, "\3\232bye")

local request_tokens = { "%", "%z", "%00", "%2e%2e/", "%2F", "..", "/", "//", "?", "&", "=", "+", ";",
    "#", ":", "*", "\255", "\0", "%C3%28", "%FF", " ", "\t", "\r\n", "Range: bytes=", "--", "\r\n--B",
    "\r\n\r\n", "Content-Disposition: form-data; name=", "; filename=\"", "boundary=",
    "If-Modified-Since: ", "Content-Length: 0\r\n", "Cookie: a=b; c\r\n", "{", "[", "\"" }

local random = math.random

-- Changes s once: a byte, a token of `tokens` inserted, a range deleted or repeated; with
-- first_line, half of the time in the first line (a request line, which the Lua side decodes).
local function mutate(s, tokens, first_line)
    local line_end = first_line and s:find("\r\n", 1, true) or #s
    local pos = first_line and random(2) == 1 and random(line_end) or random(#s + 1)
    local op = random(4)
    if op == 1 then
        return s:sub(1, pos - 1) .. string.char(random(0, 255)) .. s:sub(pos + 1)
    elseif op == 2 then
        return s:sub(1, pos - 1) .. tokens[random(#tokens)] .. s:sub(pos)
    elseif op == 3 then
        return s:sub(1, pos - 1) .. s:sub(pos + random(8))
    end
    local k = random(16)
    return s:sub(1, pos + k - 1) .. s:sub(pos, pos + k - 1) .. s:sub(pos + k)
end

-- N inputs from the PRNG seeded with `seed`: each a seed changed 1 to 3 times.
local function make_inputs(seed, from, tokens, first_line)
    math.randomseed(seed)
    local inputs = {}
    for i = 1, N do
        local s = from[random(#from)]
        for _ = 1, random(3) do s = mutate(s, tokens, first_line) end
        inputs[i] = s
    end
    return inputs
end

-- Runs fn(i) for every input, 16 at a time.
local function run_all(fn)
    for first = 1, N, 16 do
        local batch = {}
        for i = first, math.min(first + 15, N) do
            batch[#batch + 1] = function() return fn(i) end
        end
        moonlet.gather(batch)
    end
end

local function make_app()
    local app = moonlet.app()
    app:get("/", function() return "ok" end)
    app:get("/users/:id", function(req)
        return { id = req.params.id, q = req.query.q, all = req:args("q"), x = req.query.x,
                 ua = req:header("user-agent"), v = req.http_version, ka = req.keep_alive,
                 peer = req.peer, len = req.content_length, path = req.path }
    end)
    app:delete("/users/:id", function(req) return 204, nil, { ["X-Id"] = #req.params.id } end)
    app:get("/files/*path", function(req)
        return req.params.path .. "|" .. (req.query_string or "")
    end)
    app:post("/form", function(req) return { form = req:form() } end)
    app:post("/parts", function(req)
        local out = {}
        for part in req:parts() do
            out[#out + 1] = { part.name, part.filename or false, part.type or false, #part:body() }
        end
        return out
    end)
    app:post("/json", function(req)
        local v, err = req:json()
        return { ok = v ~= nil, err = err and #err }
    end)
    app:put("/stream", function(req)
        local n = 0
        for chunk in req:chunks() do n = n + #chunk end
        return tostring(n)
    end)
    app:static("/assets", "examples/public")
    app:websocket("/ws", function(ws)
        for msg, kind in ws:messages() do ws:send(msg, kind) end
    end, { deflate = true, protocols = { "chat" }, idle_timeout = 0.3, close_timeout = 0.3,
           max_message = 4096 })
    return app
end

describe("requests changed at random", function()
    lazy_setup(function() core.set_log("warn") end) -- not a line for each 400
    lazy_teardown(function() core.set_log("info") end)

    it("get moonlet's own answers, never a 500 nor a hang, and the app serves on", function()
        local server, port = test.serve(make_app(), { header_timeout = 0.3, body_timeout = 0.3,
                                                         keepalive_timeout = 0.3 })
        local inputs = make_inputs(SEED, request_seeds, request_tokens, true)
        local failures = {}
        run_all(function(i)
            local data, err, partial = test.raw(port, inputs[i], 3)
            data = data or partial or ""
            if err then
                failures[#failures + 1] = ("%q: %s after %q"):format(inputs[i], err, data)
            elseif data:find("^HTTP/1%.1 500") or data:find("\r\n\r\nHTTP/1%.1 500")
                or data:find("500 Internal Server Error", 1, true)
                or data:find("internal error", 1, true) then -- a WebSocket closed with 1011
                failures[#failures + 1] = ("%q: got %q"):format(inputs[i], data)
            elseif data == "" and inputs[i]:find("[^\r\n]") then -- only a request never begun
                -- (nothing but line ends) may be closed without an answer
                failures[#failures + 1] = ("%q: closed without an answer"):format(inputs[i])
            end
        end)
        assert.same({}, failures)
        assert.same("ok", test.request(port, "GET", "/").body)
        assert.truthy(test.wait_until(function() return server:connections() == 0 end, 3))
        server:close()
    end)
end)

-- The HTTP client's side: responses changed at random, from a server of raw bytes (moonlet.tcp)
-- that answers each request with the input its X-Case header names and closes. Whatever comes
-- back, moonlet.http returns a response or nil and an error string: it never raises, never hangs
-- (the server closes, and every request has a timeout), and leaves no handle or task behind.
local gz = require("moonlet.zlib").gzip("compressed body, compressed body, compressed body")
local response_seeds = {
    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n3\r\n, w\r\n0\r\nT: t\r\n\r\n",
    "HTTP/1.0 200 OK\r\nServer: x\r\n\r\na body that ends when the connection does",
    "HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-A: 2\r\nSet-Cookie: a=b\r\nSet-Cookie: c=d\r\n\r\n",
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "HTTP/1.1 302 Found\r\nLocation: /again?x=%20y\r\nContent-Length: 3\r\n\r\nabc",
    "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: " .. #gz .. "\r\n\r\n" .. gz,
    "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. ("%x"):format(#gz) .. "\r\n" .. gz .. "\r\n0\r\n\r\n",
    "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 99\r\n\r\n",
    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
}
local response_tokens = { "\r\n", "\n", "\r", ":", " ", "\t", "0", "-1", "ffffffff", "99999999999",
    "Content-Length: ", "Transfer-Encoding: chunked\r\n", "Connection: close\r\n", "HTTP/1.1 ",
    "Location: ", "//", "\0", "\255", ";", "gzip", "deflate", "Content-Encoding: gzip\r\n" }

describe("responses changed at random", function()
    it("give moonlet.http a response or nil, err: never a raise, a hang or a leak", function()
        local inputs = make_inputs(SEED + 1, response_seeds, response_tokens)
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function(sock)
            sock:settimeout(2000)
            local case
            repeat
                local line = sock:receive("*l")
                if not line then return sock:close() end
                case = case or tonumber(line:match("^[Xx]%-[Cc]ase: (%d+)"))
            until line == ""
            sock:send(inputs[case] or "HTTP/1.1 400 Bad Request\r\n\r\n")
            sock:close()
        end))
        local url = "http://127.0.0.1:" .. server:port() .. "/fuzz"
        local before, mem0 = test.settled_stats(), collectgarbage("count")
        local failures = {}
        local function fetch(i)
            local o = { timeout = 2, headers = { ["X-Case"] = tostring(i) }, max_body = 4096,
                        decompress = i % 2 == 0, redirects = i % 3 == 0 and 2 or nil,
                        stream = i % 5 == 0 }
            local ok, res, err = pcall(moonlet.http.get, url, o)
            if ok and res and o.stream then ok, res, err = pcall(res.read_body, res) end
            local bad = not ok and ("raised " .. tostring(res))
                or (res == nil and type(err) ~= "string") and "nil without an error string"
                or (err == "timeout") and "timeout"
                or (res ~= nil and not o.stream and (type(res.status) ~= "number"
                    or type(res.body) ~= "string")) and "a response without status or body"
            if bad then failures[#failures + 1] = ("%q: %s"):format(inputs[i], bad) end
        end
        run_all(fetch)
        assert.same({}, failures)
        moonlet.http.close_idle()
        server:close()
        moonlet.sleep(0.05)
        test.assert_baseline(before, mem0, 4096)
    end)
end)

-- moonlet.redis's side: replies changed at random, from a server of raw bytes that answers the
-- command GET <case> with that case's input and closes. Whatever comes back, a call returns a value
-- or nil and an error string: it never raises, and never waits for its timeout (the server has
-- closed: "closed" or "protocol error" come at once).
local redis_seeds = { "+OK\r\n", "$5\r\nhello\r\n", "$-1\r\n", ":42\r\n", "-ERR wrong\r\n",
    "*3\r\n$1\r\na\r\n:1\r\n*2\r\n+x\r\n-E\r\n", "*-1\r\n", "*0\r\n", "$0\r\n\r\n" }
local redis_tokens = { "\r\n", "\n", "$", "*", ":", "+", "-", "-1", "0", "9", "99999999999999999999",
    "1e300", "0x10", "1.5", "*1\r\n", "$3\r\n" }

describe("redis replies changed at random", function()
    it("give a call a value or nil, err: never a raise or a wait for its timeout", function()
        local inputs = make_inputs(SEED + 2, redis_seeds, redis_tokens)
        local server = assert(moonlet.tcp.listen({ host = "127.0.0.1", port = 0 }, function(sock)
            sock:settimeout(2000)
            local n = tonumber((sock:receive("*l") or ""):match("^%*(%d+)$")) or 0
            local args = {}
            for k = 1, n do
                local len = tonumber((sock:receive("*l") or ""):match("^%$(%d+)$"))
                if not len then break end
                args[k] = sock:receive(len + 2)
            end
            local case = tonumber(args[2] and args[2]:sub(1, -3))
            sock:send(inputs[case] or "-ERR no case\r\n")
            sock:close()
        end))
        local redis = require "moonlet.redis"
        local failures = {}
        local function call(i)
            local r, cerr = redis.connect({ host = "127.0.0.1", port = server:port(), timeout = 2 })
            if not r then
                failures[#failures + 1] = "connect: " .. tostring(cerr)
                return
            end
            local ok, v, err = pcall(r.call, r, "GET", tostring(i))
            local bad = not ok and ("raised " .. tostring(v))
                or (v == nil and err ~= nil and type(err) ~= "string") and "an error that is no string"
                or err == "timeout" and "timeout"
            if bad then failures[#failures + 1] = ("%q: %s"):format(inputs[i], bad) end
            r:close()
        end
        run_all(call)
        server:close()
        assert.same({}, failures)
    end)
end)
