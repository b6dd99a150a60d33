-- spec/limit_spec.lua: moonlet.limit over real sockets: a burst passes, the next request is 429 with
-- Retry-After and no handler run, keys are apart, tokens come back with time, and the buckets stay
-- within max_keys.
local moonlet = require "moonlet"
local test = require "moonlet.test"

local function serve(opts)
    local app = moonlet.app()
    local ran = { n = 0 }
    app:use(moonlet.limit(opts))
    app:get("/", function() ran.n = ran.n + 1; return "ok" end)
    local server, port = test.serve(app)
    test.defer(function() server:close() end)
    return function(key)
        return test.request(port, "GET", "/", { headers = { ["X-Key"] = key } })
    end, ran
end

local function by_header(req) return req:header("x-key") end

describe("moonlet.limit", function()
    it("lets a burst through, then answers 429 with Retry-After, per client address", function()
        local get, ran = serve({ rate = 0.5, burst = 3 })
        for _ = 1, 3 do assert.same(200, get().status) end
        local r = get()
        assert.same({ 429, "2" }, { r.status, r.headers["retry-after"] })
        assert.truthy(r.body:find("try again in 2 s", 1, true))
        assert.same(3, ran.n)
    end)

    it("keeps keys apart, lets a request without a key through, gives tokens back with time", function()
        local get = serve({ rate = 20, burst = 1, key = by_header })
        assert.same(200, get("a").status)
        assert.same(429, get("a").status)
        assert.same(200, get("b").status)
        for _ = 1, 3 do assert.same(200, get(nil).status) end -- no key: not limited
        moonlet.sleep(0.1) -- 20 a second: a token back after 0.05 s
        assert.same(200, get("a").status)
    end)

    it("holds at most max_keys buckets, the least recently used going first", function()
        local get = serve({ rate = 0.001, burst = 1, key = by_header, max_keys = 2 })
        assert.same(200, get("a").status)
        assert.same(200, get("b").status)
        assert.same(429, get("a").status) -- a used after b
        assert.same(200, get("c").status) -- a third key: b, used least recently, goes
        assert.same(429, get("a").status) -- a kept its bucket
        assert.same(200, get("b").status) -- b starts afresh (and c goes)
        assert.same(429, get("b").status)
        for i = 1, 100 do get("junk" .. i) end -- a flood of keys pushes out all others, no more
        assert.same(200, get("a").status)
    end)

    it("shares its buckets through a moonlet.shared dictionary, as the workers of --workers do", function()
        -- two servers, each with its own moonlet.limit, stand for two workers: one budget for both
        local name = "limit_spec"
        moonlet.shared(name):flush_all()
        local get1, ran1 = serve({ rate = 0.5, burst = 3, shared = name })
        local get2, ran2 = serve({ rate = 0.5, burst = 3, shared = moonlet.shared(name) })
        assert.same(200, get1().status)
        assert.same(200, get2().status)
        assert.same(200, get1().status)
        local r = get2()
        assert.same({ 429, "2" }, { r.status, r.headers["retry-after"] })
        assert.same(429, get1().status)
        assert.same({ 2, 1 }, { ran1.n, ran2.n })
        -- keys apart; a key's entry goes when its bucket is full again
        local get3 = serve({ rate = 20, burst = 1, key = by_header, shared = name })
        assert.same(200, get3("a").status)
        assert.same(429, get3("a").status)
        assert.same(200, get3("b").status)
        moonlet.sleep(0.1)
        assert.same(nil, moonlet.shared(name):get("a"))
        assert.same(200, get3("a").status)
    end)

    it("raises on bad options", function()
        assert.has_error(function() moonlet.limit({ rate = 1, shared = {} }) end)
        assert.has_error(function() moonlet.limit() end)
        assert.has_error(function() moonlet.limit({ rate = 0 }) end)
        assert.has_error(function() moonlet.limit({ rate = 1, burst = 0.5 }) end)
        assert.has_error(function() moonlet.limit({ rate = 1, key = "ip" }) end)
        assert.has_error(function() moonlet.limit({ rate = 1, max_keys = 0 }) end)
    end)
end)
