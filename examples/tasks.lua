-- examples/tasks.lua: tasks and what passes between them, one printed line per idea.
-- Run: moonlet examples/tasks.lua
local moonlet = require "moonlet"

-- spawn and join: two tasks sleep at the same time
local t0 = moonlet.now()
local a = moonlet.spawn(function() moonlet.sleep(0.2); return "a" end)
local b = moonlet.spawn(function() moonlet.sleep(0.2); return "b" end)
local _, ra = a:join()
local _, rb = b:join()
print(("spawn/join: %s %s after %.1f s"):format(ra, rb, moonlet.now() - t0)) -- 0.2 s, not 0.4

-- cancel: the task raises moonlet.CANCELLED where it waits, and join says so
local sleeper = moonlet.spawn(function() moonlet.sleep(10) end)
sleeper:cancel()
print("cancel:", sleeper:join())                                  -- false  cancelled

-- any: the first to return wins, the others are cancelled
print("any:", moonlet.any({
    slow = function() moonlet.sleep(1); return "slow" end,
    fast = function() moonlet.sleep(0.05); return "fast" end,
}))                                                               -- fast  fast

-- timeout: the function's results, or nil, "timeout" (and the function is cancelled)
print("timeout:", moonlet.timeout(0.05, moonlet.sleep, 1))        -- nil  timeout

-- queue: a bounded FIFO; put waits while it is full, get while it is empty
local q = moonlet.queue(2)
moonlet.spawn(function() for i = 1, 5 do q:put(i * i) end end)
local got = {}
for _ = 1, 5 do got[#got + 1] = q:get() end
print("queue:", table.concat(got, " "))                           -- 1 4 9 16 25

-- semaphore: at most 2 tasks inside at once
local s, inside, most = moonlet.semaphore(2), 0, 0
local workers = {}
for i = 1, 5 do
    workers[i] = function()
        s:acquire()
        inside = inside + 1
        most = math.max(most, inside)
        moonlet.sleep(0.02)
        inside = inside - 1
        s:release()
    end
end
moonlet.gather(workers)
print("semaphore: at most", most, "at once")                      -- 2

-- event: set() wakes every task waiting on it
local e, woken = moonlet.event(), 0
local waiters = {}
for i = 1, 3 do
    waiters[i] = moonlet.spawn(function() e:wait(); woken = woken + 1 end)
end
moonlet.sleep(0.01)
e:set()
for i = 1, 3 do waiters[i]:join() end
print("event: woke", woken)                                       -- 3
