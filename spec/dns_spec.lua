-- spec/dns_spec.lua: moonlet.dns.resolve through the loop (getaddrinfo on the thread pool): names
-- from /etc/hosts only (no network outside this machine), address literals, families, not found,
-- timeouts, cancellation, and that 10,000 timed-out or cancelled lookups leave nothing behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"

local dns = moonlet.dns

local function contains(list, v)
    for i = 1, #list do
        if list[i] == v then return true end
    end
    return false
end

-- waits until the lookups abandoned by a test (timed out or cancelled, still on a worker thread)
-- are over: each is a resource until its thread-pool callback has run
local function lookups_done(resources)
    assert(test.wait_until(function() return core.stats().resources <= resources end, 10))
end

describe("moonlet.dns.resolve", function()
    it("resolves localhost to the loopback address", function()
        local addrs = assert(dns.resolve("localhost"))
        assert.is_true(contains(addrs, "127.0.0.1"))
    end)

    it("takes a huge timeout as none, refuses NaN and negative ones", function()
        local addrs = assert(dns.resolve("localhost", { timeout = math.huge }))
        assert.is_true(contains(addrs, "127.0.0.1"))
        assert.is_true(contains(assert(dns.resolve("localhost", { timeout = 1e300 })), "127.0.0.1"))
        assert.has_error(function() dns.resolve("localhost", { timeout = -1 }) end)
        assert.has_error(function() dns.resolve("localhost", { timeout = 0 / 0 }) end)
    end)

    it("keeps to the family asked for", function()
        local addrs = assert(dns.resolve("localhost", { family = "inet" }))
        assert.is_true(#addrs > 0)
        for _, a in ipairs(addrs) do assert.is_nil(a:find(":", 1, true)) end
    end)

    it("answers an address literal at once", function()
        assert.same({ "192.0.2.7" }, dns.resolve("192.0.2.7"))
        assert.same({ "::1" }, dns.resolve("::1"))
        assert.same({ nil, "not found" }, { dns.resolve("::1", { family = "inet" }) })
    end)

    it("returns not found for a name that does not exist", function()
        assert.same({ nil, "not found" }, { dns.resolve("no-such-host.invalid", { timeout = 5 }) })
    end)

    it("lets the loop serve while it waits", function()
        local ticks = 0
        local ticker = moonlet.spawn(function()
            for _ = 1, 3 do
                moonlet.sleep(0)
                ticks = ticks + 1
            end
        end)
        local results = moonlet.gather({
            function() return dns.resolve("localhost") end,
            function() return dns.resolve("localhost", { family = "inet" }) end,
        })
        ticker:join(5)
        assert.same(3, ticks)
        assert.is_true(contains(results[1], "127.0.0.1") and contains(results[2], "127.0.0.1"))
    end)

    it("times out", function()
        local resources = core.stats().resources
        moonlet.sleep(0) -- from a timer callback: the 0 s timer fires before the pool can answer
        assert.same({ nil, "timeout" }, { dns.resolve("localhost", { timeout = 0 }) })
        lookups_done(resources)
    end)

    it("can be cancelled", function()
        local resources = core.stats().resources
        local t = moonlet.spawn(dns.resolve, "localhost")
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join(5) })
        lookups_done(resources)
    end)

    it("refuses a name with a NUL byte instead of resolving the part before it", function()
        local einval = { nil, "invalid argument" }
        assert.same(einval, { dns.resolve("localhost\0.example.com") })
        assert.same(einval, { dns.resolve("127.0.0.1\0.example.com") }) -- not taken for a literal
        assert.same(einval, { dns.resolve("\0") })
        assert.same(einval, { dns.resolve("localhost\0", { family = "inet" }) })
        assert.truthy(contains(assert(dns.resolve("localhost")), "127.0.0.1"))
    end)

    it("raises on misuse", function()
        assert.has_error(function() dns.resolve(nil) end)
        assert.has_error(function() dns.resolve("localhost", { family = "ipx" }) end)
        assert.has_error(function() dns.resolve("localhost", { timeout = "soon" }) end)
    end)

    it("leaves nothing behind after 10,000 timed-out or cancelled lookups", function()
        local function settle()
            for _ = 1, 3 do moonlet.sleep(0) end
            collectgarbage()
            collectgarbage()
        end
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for i = 1, 10000 do
            if i % 2 == 0 then
                local addrs, err = dns.resolve("localhost", { timeout = 0 })
                assert.is_true(err == "timeout" or contains(addrs, "127.0.0.1"))
            else
                local t = moonlet.spawn(dns.resolve, "localhost")
                t:cancel()
            end
        end
        -- lookups a worker thread had already started finish there, then free themselves
        assert(test.wait_until(function()
            settle()
            local now = core.stats()
            return now.resources == before.resources and now.handles == before.handles
        end, 10))
        assert.same(before.tasks, core.stats().tasks)
        assert.truthy(collectgarbage("count") - mem0 < 256)
    end)
end)
