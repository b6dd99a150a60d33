-- examples/coffee.lua: two coroutines, one thread. Anton listens to a talk while Bea grabs a coffee;
-- each moonlet.sleep yields, so the other one runs meanwhile. The printed order (interleaved, not
-- one after the other) proves the switching; the total is the longest story, not the sum.
--   moonlet examples/coffee.lua
local moonlet = require "moonlet"

local t0 = moonlet.now()
local function say(who, what)
    print(("%.1f %s: %s"):format(moonlet.now() - t0, who, what))
end

local anton = moonlet.spawn(function()
    say("anton", "Anton's talk starts")
    moonlet.sleep(0.2)
    say("anton", "Anton's talk: the event loop")
    moonlet.sleep(0.2)
    say("anton", "Anton's talk ends")
end)

local bea = moonlet.spawn(function()
    say("bea", "grab a coffee")
    moonlet.sleep(0.1)
    say("bea", "coffee is brewing")
    moonlet.sleep(0.2)
    say("bea", "coffee in hand")
end)

anton:join()
bea:join()
say("both", ("done in %.1f s, not 0.7 s"):format(moonlet.now() - t0))
