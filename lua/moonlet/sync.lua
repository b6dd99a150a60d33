-- lua/moonlet/sync.lua: coordination between tasks: queue (bounded, FIFO), semaphore and event.
-- Waiters park (core.park) and are woken in FIFO order by core.unpark; every wait takes an
-- optional timeout and returns nil, "timeout" when it runs out; a cancelled waiter raises
-- moonlet.CANCELLED and is dropped from the wait list.
local core = require "moonlet.core"
local task = require "moonlet.task"

local park = task.park
local remove = table.remove
local setmetatable = setmetatable

local _M = {}

local function running()
    local co = core.running()
    if not co then error("moonlet: waiting outside a moonlet task", 3) end
    return co
end

-- Parks the running task in `list` until woken (true) or the timeout (nil, "timeout").
local function wait_in(list, timeout)
    local co = running()
    list[#list + 1] = co
    local ok, r1, r2 = pcall(park, timeout)
    if not ok or not r1 then
        for i = #list, 1, -1 do
            if list[i] == co then remove(list, i) break end
        end
        if not ok then error(r1, 0) end -- cancelled
        return nil, r2
    end
    return true
end

local function wake_one(list)
    while list[1] do
        local co = remove(list, 1)
        if core.unpark(co, true) then return true end
    end
    return false
end

-- -- Queue ---------------------------------------------------------------------------------

local queue = {}
local queue_mt = { __name = "moonlet.queue", __index = queue }

-- syntax: q = moonlet.queue(capacity) -- capacity nil: unbounded
function _M.queue(capacity)
    if capacity ~= nil and (type(capacity) ~= "number" or capacity ~= capacity or capacity < 1) then
        error("moonlet.queue: the capacity is a number of at least 1 (or nil: no bound)", 2)
    end
    return setmetatable({ items = {}, head = 1, tail = 0, cap = capacity,
                          getters = {}, putters = {} }, queue_mt)
end

function queue:len()
    return self.tail - self.head + 1
end

-- syntax: ok, err = q:put(v, timeout) -- waits while the queue is full
function queue:put(v, timeout)
    while self.cap and self:len() >= self.cap do
        local ok, err = wait_in(self.putters, timeout)
        if not ok then return nil, err end
    end
    self.tail = self.tail + 1
    self.items[self.tail] = v
    wake_one(self.getters)
    return true
end

-- syntax: v, err = q:get(timeout) -- waits while the queue is empty
function queue:get(timeout)
    while self:len() == 0 do
        local ok, err = wait_in(self.getters, timeout)
        if not ok then return nil, err end
    end
    local v = self.items[self.head]
    self.items[self.head] = nil
    self.head = self.head + 1
    wake_one(self.putters)
    return v
end

-- -- Semaphore -----------------------------------------------------------------------------

local sem = {}
local sem_mt = { __name = "moonlet.semaphore", __index = sem }

-- syntax: s = moonlet.semaphore(n)
function _M.semaphore(n)
    if n ~= nil and (type(n) ~= "number" or n ~= n or n < 0) then
        error("moonlet.semaphore: n is a number of at least 0", 2)
    end
    return setmetatable({ count = n or 1, waiters = {} }, sem_mt)
end

-- syntax: ok, err = s:acquire(timeout)
function sem:acquire(timeout)
    while self.count <= 0 do
        local ok, err = wait_in(self.waiters, timeout)
        if not ok then return nil, err end
    end
    self.count = self.count - 1
    return true
end

-- syntax: s:release()
function sem:release()
    self.count = self.count + 1
    wake_one(self.waiters)
end

-- -- Event -----------------------------------------------------------------------------------

local event = {}
local event_mt = { __name = "moonlet.event", __index = event }

-- syntax: e = moonlet.event()
function _M.event()
    return setmetatable({ is_set = false, waiters = {} }, event_mt)
end

-- syntax: ok, err = e:wait(timeout) -- returns at once when set
function event:wait(timeout)
    if self.is_set then return true end
    return wait_in(self.waiters, timeout)
end

-- syntax: e:set() -- wakes every waiter
function event:set()
    self.is_set = true
    local waiters = self.waiters
    self.waiters = {}
    for i = 1, #waiters do core.unpark(waiters[i], true) end
end

function event:clear()
    self.is_set = false
end

return _M
