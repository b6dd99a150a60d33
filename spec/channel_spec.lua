-- spec/channel_spec.lua: moonlet.channel: publish and subscribe by name, bounded subscription
-- queues with their slow-consumer policies, close and unsubscribe, garbage-collected subscribers
-- (the names of many channels forgotten too),
-- cancellation, and the layer interface a Redis-backed layer plugs into.
local moonlet = require "moonlet"
local channel = require "moonlet.channel"
local core = require "moonlet.core"
local test = require "moonlet.test"

local function settle()
    moonlet.sleep(0)
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
end

describe("moonlet.channel", function()
    it("delivers a message to every subscription of its name, in order, and to no other", function()
        local a = moonlet.channel("spec:a")
        local s1, s2 = a:subscribe(), a:subscribe()
        local other = moonlet.channel("spec:b"):subscribe()
        finally(function() s1:close(); s2:close(); other:close() end)
        assert.same(2, a:subscribers())
        assert.same(2, a:publish("one"))
        assert.same(2, moonlet.channel("spec:a"):publish("two")) -- same name, same channel
        assert.same({ "one", "two" }, { s1:receive(0), s1:receive(0) })
        assert.same({ "one", "two" }, { s2:receive(0), s2:receive(0) })
        assert.same({ nil, "timeout" }, { other:receive(0) })
        assert.same(0, moonlet.channel("spec:nobody"):publish("lost"))
    end)

    it("wakes a waiting subscriber, and its messages() loop ends on close", function()
        local ch = moonlet.channel("spec:wake")
        local sub = ch:subscribe()
        local got = {}
        local t = moonlet.spawn(function()
            for m in sub:messages() do got[#got + 1] = m end
            return "ended"
        end)
        ch:publish("x")
        ch:publish({ any = "value" }) -- the in-process layer carries any value
        assert.same({ "x", { any = "value" } }, got)
        sub:close()
        assert.same({ true, "ended" }, { t:join(1) })
        assert.same({ nil, "closed" }, { sub:receive(0) })
        assert.same(0, ch:subscribers())
        assert.same(0, ch:publish("after"))
    end)

    it("drops the oldest message of a full queue by default and counts it", function()
        local ch = moonlet.channel("spec:full")
        local sub = ch:subscribe({ size = 3 })
        finally(function() sub:close() end)
        for i = 1, 5 do ch:publish(i) end
        assert.same(2, sub.dropped)
        assert.same(3, sub:len())
        assert.same({ 3, 4, 5 }, { sub:receive(0), sub:receive(0), sub:receive(0) })
    end)

    it("disconnects a slow consumer under the disconnect policy", function()
        local ch = moonlet.channel("spec:strict")
        local sub = ch:subscribe({ size = 2, policy = "disconnect" })
        local fast = ch:subscribe({ size = 100 })
        finally(function() fast:close() end)
        assert.same({ 2, 2, 1 }, { ch:publish(1), ch:publish(2), ch:publish(3) }) -- (the 3rd: fast only)
        assert.same({ nil, "overflow" }, { sub:receive(0) })
        assert.same(1, ch:subscribers())
        assert.same(3, fast:len())
    end)

    it("refuses bad arguments", function()
        assert.has_error(function() moonlet.channel(42) end)
        assert.has_error(function() moonlet.channel("x"):subscribe({ policy = "maybe" }) end)
        assert.has_error(function() moonlet.channel("x"):subscribe({ size = 0 }) end)
        assert.has_error(function() moonlet.channel("x"):publish(nil) end)
        assert.has_error(function() channel.set_layer({ publish = print }) end)
    end)

    it("times out a receive and refuses a second reader", function()
        local sub = moonlet.channel("spec:busy"):subscribe()
        finally(function() sub:close() end)
        local t = moonlet.spawn(function() return sub:receive(1) end)
        assert.same({ nil, "subscription busy reading" }, { sub:receive(0.01) })
        moonlet.channel("spec:busy"):publish("m")
        assert.same({ true, "m" }, { t:join() })
        assert.same({ nil, "timeout" }, { sub:receive(0.01) })
    end)

    it("forgets subscriptions dropped without close, and leaks nothing over many rounds", function()
        local ch = moonlet.channel("spec:gc")
        settle()
        local names0 = channel.layer().names()
        local mem0 = collectgarbage("count")
        local before = test.settled_stats()
        for i = 1, 2000 do
            local sub = ch:subscribe()
            if i % 3 == 0 then
                local t = moonlet.spawn(function() return sub:receive() end)
                t:cancel() -- a cancelled reader leaves the subscription usable
                assert.same({ false, "cancelled" }, { t:join() })
                sub:close()
            elseif i % 3 == 1 then
                ch:publish("m")
                sub:close()
            end -- else: just dropped
        end
        settle()
        assert.same(0, ch:subscribers())
        assert.same(names0, channel.layer().names())
        assert.is_true(collectgarbage("count") - mem0 < 256, "Lua memory grew")
        local s = core.stats()
        assert.is_true(s.tasks <= before.tasks and s.resources <= before.resources)
    end)

    it("forgets the names of many channels whose subscriptions were dropped without close", function()
        -- per-user names, each subscription dropped (its handler cancelled in receive): the
        -- in-process layer must not keep a table per name it has seen
        settle()
        local mem0 = collectgarbage("count")
        for round = 1, 3 do
            for i = 1, 10000 do
                moonlet.channel("spec:user:" .. round .. ":" .. i):subscribe()
                if i % 1000 == 0 then collectgarbage() end
            end
        end
        settle()
        assert.same(0, moonlet.channel("spec:user:3:10000"):subscribers())
        local grew = collectgarbage("count") - mem0
        assert.is_true(grew < 1024, ("Lua memory grew by %d KiB"):format(grew))
    end)

    it("goes through the layer that is set: a stand-in for a Redis layer", function()
        local log = {}
        local inner = channel.local_layer()
        local remote = { -- what a layer across processes does: it transports, subscriptions queue
            subscribe = function(name, sub) log[#log + 1] = "sub " .. name; inner.subscribe(name, sub) end,
            unsubscribe = function(name, sub)
                log[#log + 1] = "unsub " .. name
                inner.unsubscribe(name, sub)
            end,
            publish = function(name, msg) log[#log + 1] = "pub " .. name; return inner.publish(name, msg) end,
        }
        local old = channel.layer()
        channel.set_layer(remote)
        finally(function() channel.set_layer(old) end)
        local ch = moonlet.channel("spec:layer")
        local sub = ch:subscribe()
        assert.same(1, ch:publish("via layer"))
        assert.same("via layer", sub:receive(0))
        sub:close()
        assert.is_nil(ch:subscribers()) -- this layer cannot count
        assert.same({ "sub spec:layer", "pub spec:layer", "unsub spec:layer" }, log)
    end)
end)
