-- lua/moonlet/channel.lua: named pub/sub channels (Django Channels' groups): moonlet.channel(name)
-- with publish and subscribe. A subscription is a bounded queue of messages read by one task at a
-- time; when a slow consumer lets it fill up, the policy decides: "drop_oldest" (the default) drops
-- the oldest queued message and counts it in sub.dropped; "disconnect" closes the subscription
-- (its reader gets nil, "overflow"), so the consumer can close its connection.
--
-- Transport between publishers and subscriptions is a layer: a table of three functions
--   layer.subscribe(name, sub)    from now on call sub:push(msg) for each message published on name
--   layer.unsubscribe(name, sub)  stop
--   layer.publish(name, msg)      deliver msg to every subscription of name; returns how many (when
--                                 the layer knows)
-- The in-process layer is the default; set_layer swaps in another one (Redis pub/sub, across
-- processes and machines) without touching user code. A layer holds subscriptions weakly: a
-- subscription that is dropped without close() vanishes with the garbage collector, and the
-- in-process layer forgets a name once it has no subscription left.
local core = require "moonlet.core"
local task = require "moonlet.task"

local type, setmetatable, next, pairs, error = type, setmetatable, next, pairs, error
local park = task.park

local _M = { _VERSION = "0.1.0" }

-- -- The in-process layer ------------------------------------------------------------------------

local function local_layer()
    local by_name = {} -- name -> weak set of subscriptions
    local weak = { __mode = "k" }
    -- A set whose subscriptions were all collected (dropped without close: a handler cancelled in
    -- receive) is empty but still in by_name until its name is published to. With names made per
    -- user or per document, that is a table per name forever; so each time the sets made since the
    -- last sweep outnumber the live ones then (64 at least), the empty ones are swept: amortised
    -- O(1) per subscribe, and by_name stays within about twice the names in use.
    local nsets, sweep_at = 0, 64
    local function sweep()
        local live = 0
        for name, set in pairs(by_name) do -- (clearing a field while traversing is allowed)
            if next(set) == nil then by_name[name] = nil else live = live + 1 end
        end
        nsets, sweep_at = live, 2 * live + 64
    end
    local layer = {}
    function layer.subscribe(name, sub)
        local set = by_name[name]
        if not set then
            if nsets >= sweep_at then sweep() end
            set = setmetatable({}, weak)
            by_name[name] = set
            nsets = nsets + 1
        end
        set[sub] = true
    end
    function layer.unsubscribe(name, sub)
        local set = by_name[name]
        if not set then return end
        set[sub] = nil
        if next(set) == nil then
            by_name[name] = nil
            nsets = nsets - 1
        end
    end
    function layer.publish(name, msg)
        local set = by_name[name]
        if not set then return 0 end
        local list, n = {}, 0 -- a snapshot: delivering wakes tasks that may (un)subscribe
        for sub in pairs(set) do
            n = n + 1
            list[n] = sub
        end
        if n == 0 then
            by_name[name] = nil
            nsets = nsets - 1
            return 0
        end
        local got = 0 -- the subscriptions that queued it (not one the disconnect policy closed)
        for i = 1, n do
            if list[i]:push(msg) then got = got + 1 end
        end
        return got
    end
    -- names with at least one subscription, and the count of one name (introspection, tests)
    function layer.count(name)
        local set, n = by_name[name], 0
        if set then
            for _ in pairs(set) do n = n + 1 end
        end
        return n
    end
    function layer.names()
        local n = 0
        for _, set in pairs(by_name) do
            if next(set) ~= nil then n = n + 1 end
        end
        return n
    end
    return layer
end

_M.local_layer = local_layer
local layer = local_layer()

-- syntax: channel.set_layer(layer) -- every channel from now on goes through layer (see the head)
function _M.set_layer(l)
    if type(l) ~= "table" or type(l.publish) ~= "function" or type(l.subscribe) ~= "function"
        or type(l.unsubscribe) ~= "function" then
        error("moonlet.channel: a layer has publish, subscribe and unsubscribe functions", 2)
    end
    layer = l
end

-- syntax: l = channel.layer() -- the layer in use
function _M.layer() return layer end

-- -- Subscriptions --------------------------------------------------------------------------------

local sub_methods = {}
local sub_mt = { __name = "moonlet.subscription", __index = sub_methods }

local DEFAULT_SIZE = 256

-- syntax: sub:push(msg) -- how a layer delivers a message (never waits)
-- Queues msg: true when it was queued, false when this subscription is closed or closes now
-- (the "disconnect" policy on a full queue).
function sub_methods:push(msg)
    if self.closed then return false end
    if self.tail - self.head + 1 >= self.size then
        if self.policy == "disconnect" then
            self:close("overflow")
            return false
        end
        self.items[self.head] = nil -- drop_oldest
        self.head = self.head + 1
        self.dropped = self.dropped + 1
    end
    self.tail = self.tail + 1
    self.items[self.tail] = msg
    local co = self.waiter
    if co then
        self.waiter = nil
        core.unpark(co, true)
    end
    return true
end

-- syntax: n = sub:len() -- messages queued
function sub_methods:len()
    return self.tail - self.head + 1
end

-- syntax: msg, err = sub:receive(timeout) -- the oldest queued message; waits while there is none;
-- nil, "closed" (or "overflow") once closed, nil, "timeout"
function sub_methods:receive(timeout)
    while self.tail < self.head do
        if self.closed then return nil, self.closed end
        if self.waiter then return nil, "subscription busy reading" end
        local co = core.running()
        if not co then error("moonlet: waiting outside a moonlet task", 2) end
        self.waiter = co
        local ok, r1, r2 = pcall(park, timeout)
        if self.waiter == co then self.waiter = nil end
        if not ok then error(r1, 0) end -- cancelled
        if not r1 then return nil, r2 end
    end
    local msg = self.items[self.head]
    self.items[self.head] = nil
    self.head = self.head + 1
    return msg
end
sub_methods.get = sub_methods.receive

-- syntax: for msg in sub:messages() do ... end -- ends when the subscription is closed
function sub_methods:messages()
    return function()
        return (self:receive())
    end
end

-- syntax: sub:close() -- unsubscribes; a waiting reader gets nil, "closed"; queued messages are
-- dropped. Idempotent.
function sub_methods:close(why)
    if self.closed then return end
    self.closed = why or "closed"
    layer.unsubscribe(self.name, self)
    self.items = {}
    self.head, self.tail = 1, 0
    local co = self.waiter
    if co then
        self.waiter = nil
        core.unpark(co, true)
    end
end

-- -- Channels ---------------------------------------------------------------------------------------

local ch_methods = {}
local ch_mt = { __name = "moonlet.channel", __index = ch_methods }

-- syntax: ch = moonlet.channel(name)
function _M.new(name)
    if type(name) ~= "string" or name == "" then error("moonlet.channel: a name is a string", 2) end
    return setmetatable({ name = name }, ch_mt)
end

-- syntax: n = ch:publish(msg) -- delivers to every subscription (strings cross any layer; other
-- values only the in-process one); returns how many got it, when the layer knows
function ch_methods:publish(msg)
    if msg == nil then error("moonlet.channel: cannot publish nil", 2) end
    return layer.publish(self.name, msg)
end

-- syntax: sub = ch:subscribe({ size = 256, policy = "drop_oldest" | "disconnect" })
function ch_methods:subscribe(opts)
    opts = opts or {}
    local size = opts.size or DEFAULT_SIZE
    if type(size) ~= "number" or size < 1 then error("moonlet.channel: size is a number >= 1", 2) end
    local policy = opts.policy or "drop_oldest"
    if policy ~= "drop_oldest" and policy ~= "disconnect" then
        error("moonlet.channel: policy is \"drop_oldest\" or \"disconnect\"", 2)
    end
    local sub = setmetatable({ name = self.name, size = size, policy = policy, items = {},
                               head = 1, tail = 0, dropped = 0, closed = false }, sub_mt)
    layer.subscribe(self.name, sub)
    return sub
end

-- syntax: n = ch:subscribers() -- subscriptions of this name in this process (in-process layer)
function ch_methods:subscribers()
    return layer.count and layer.count(self.name) or nil
end

return _M
