-- examples/script.lua: a script that is not an app runs inside the event loop, so it may wait at
-- its top level. Run: build/moonlet examples/script.lua
local moonlet = require "moonlet"

local ticker = moonlet.spawn(function()
    for i = 1, 3 do
        print("tick", i)
        moonlet.sleep(0.1)
    end
    return "ticked"
end)
print("the script goes on while the ticker sleeps")
print(select(2, ticker:join()))
