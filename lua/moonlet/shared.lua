-- lua/moonlet/shared.lua: moonlet.shared(name, { size = bytes }), a dictionary of strings, numbers
-- and booleans with expiry times, by name, as OpenResty's lua_shared_dict (and ngx.shared.NAME in
-- moonlet.ngx, so that lua-resty libraries that keep counters, locks or caches there run): get,
-- set, add, replace, incr, delete, ttl, expire, get_keys, flush_all, flush_expired, capacity,
-- free_space. Its entries are kept within `size` bytes (1 MiB by default; each entry counts its key,
-- its value and ENTRY_OVERHEAD), the least recently used going first when a set needs room (`set`'s
-- third result, forcible, is then true; `safe_set` and `safe_add` refuse with "no memory").
--
-- One dictionary per name in this process: under `moonlet --workers N` each worker has its own
-- (nginx's are shared by its workers; here, keep what all must see in Redis or a database). The
-- dictionary never waits: every call returns at once. Expired entries are dropped when met
-- (get, set, get_keys) or by flush_expired.
local core = require "moonlet.core"

local type, error, tostring, tonumber, pairs = type, error, tostring, tonumber, pairs
local now = core.now -- monotonic: a clock set back or forward moves no expiry

local _M = {}
_M.ENTRY_OVERHEAD = 64 -- bytes an entry is counted for besides its key and value
_M.DEFAULT_SIZE = 1024 * 1024

local dicts = {} -- name -> dict

local methods = {}
local mt = { __name = "moonlet.shared", __index = methods }

local function check_key(key, level)
    if type(key) == "number" then key = tostring(key) end
    if type(key) ~= "string" then error("moonlet.shared: the key is a string", level + 1) end
    if key == "" then error("moonlet.shared: the key is not empty", level + 1) end
    return key
end

local function check_value(value, level)
    local t = type(value)
    if t ~= "string" and t ~= "number" and t ~= "boolean" and t ~= "nil" then
        error("moonlet.shared: a value is a string, a number, a boolean or nil", level + 1)
    end
end

local function cost(key, value)
    return #key + (type(value) == "string" and #value or 8) + _M.ENTRY_OVERHEAD
end

-- the LRU list: head is the entry used last, tail the one used longest ago
local function unlink(d, e)
    if e.newer then e.newer.older = e.older else d.head = e.older end
    if e.older then e.older.newer = e.newer else d.tail = e.newer end
    e.newer, e.older = nil, nil
end

local function push(d, e)
    e.older, e.newer = d.head, nil
    if d.head then d.head.newer = e else d.tail = e end
    d.head = e
end

local function remove(d, e)
    unlink(d, e)
    d.entries[e.key] = nil
    d.used = d.used - e.cost
end

-- the live entry of key (used now), or nil; an expired one is dropped
local function live(d, key, t)
    local e = d.entries[key]
    if not e then return nil end
    if e.expires and e.expires <= (t or now()) then
        remove(d, e)
        return nil
    end
    return e
end

local function check_exptime(exptime, level)
    if exptime ~= nil and (type(exptime) ~= "number" or exptime < 0) then
        error("moonlet.shared: exptime is a number of seconds >= 0", level + 1)
    end
end

local function check_flags(flags, level)
    if flags ~= nil and type(flags) ~= "number" then
        error("moonlet.shared: flags is a number", level + 1)
    end
    if flags ~= 0 then return flags end -- (0, as none: get returns flags only when set)
end

-- Drops every expired entry: what a store that lacks room does before it evicts a live one.
local function drop_expired(d, max_count)
    local n, t = 0, now()
    for _, e in pairs(d.entries) do
        if e.expires and e.expires <= t then
            remove(d, e)
            n = n + 1
            if max_count and max_count > 0 and n >= max_count then break end
        end
    end
    return n
end

-- Stores value under key (value nil: deletes), exptime and flags checked by the caller. safe:
-- refuses rather than evict a live entry. Returns ok, err, forcible.
local function store(d, key, value, exptime, flags, safe)
    local old = d.entries[key]
    if value == nil then
        if old then remove(d, old) end
        return true, nil, false
    end
    local c = cost(key, value)
    if c > d.size then return false, "no memory", false end
    if old then remove(d, old) end
    if d.used + c > d.size then drop_expired(d) end
    local forcible = false
    while d.used + c > d.size do
        if safe then return false, "no memory", false end
        remove(d, d.tail) -- the least recently used
        forcible = true
    end
    local e = { key = key, value = value, flags = flags, cost = c,
                expires = exptime and exptime > 0 and now() + exptime or nil }
    d.entries[key] = e
    d.used = d.used + c
    push(d, e)
    return true, nil, forcible
end

-- syntax: dict = moonlet.shared(name, { size = bytes }) -- the same dictionary for the same name;
-- size counts when the name is first used (an existing dictionary keeps its own)
function _M.get(name, opts)
    if type(name) ~= "string" or name == "" then error("moonlet.shared: a name is a string", 2) end
    local d = dicts[name]
    if d then return d end
    local size = opts and opts.size or _M.DEFAULT_SIZE
    if type(size) ~= "number" or size < 1 then error("moonlet.shared: size is a number of bytes", 2) end
    d = setmetatable({ name = name, size = size, used = 0, entries = {}, head = nil, tail = nil }, mt)
    dicts[name] = d
    return d
end

-- syntax: value, flags = dict:get(key) -- nil when missing or expired
function methods:get(key)
    local e = live(self, check_key(key, 2))
    if not e then return nil end
    unlink(self, e)
    push(self, e)
    if e.flags then return e.value, e.flags end
    return e.value
end

-- syntax: value, flags, stale = dict:get_stale(key) -- an expired value too (stale true), until
-- something drops it
function methods:get_stale(key)
    local e = self.entries[check_key(key, 2)]
    if not e then return nil end
    return e.value, e.flags, (e.expires and e.expires <= now()) or false
end

local NIL_VALUE = "attempt to add or replace nil values" -- (OpenResty's words)

-- set, safe_set, add, safe_add and replace are one writer: how is "set", "add" (only when absent)
-- or "replace" (only when present); safe refuses rather than evict. The checks raise from here, two
-- levels below the caller (a method calls it without a tail call: LuaJIT keeps no frame for one,
-- and the error would blame the wrong line).
local function write(d, how, safe, key, value, exptime, flags)
    key = check_key(key, 3)
    check_value(value, 3)
    check_exptime(exptime, 3)
    flags = check_flags(flags, 3)
    if how ~= "set" then
        if value == nil then return false, NIL_VALUE, false end
        local present = live(d, key) ~= nil
        if how == "add" and present then return false, "exists", false end
        if how == "replace" and not present then return false, "not found", false end
    end
    return store(d, key, value, exptime, flags, safe)
end

local function writer(how, safe)
    return function(self, key, value, exptime, flags)
        local ok, err, forcible = write(self, how, safe, key, value, exptime, flags)
        return ok, err, forcible
    end
end

-- syntax: ok, err, forcible = dict:set(key, value, exptime, flags) -- exptime seconds (0: never);
-- forcible: other entries were evicted to make room
methods.set = writer("set", false)
-- syntax: ok, err = dict:safe_set(key, value, exptime, flags) -- false, "no memory" rather than evict
methods.safe_set = writer("set", true)
-- syntax: ok, err, forcible = dict:add(key, value, exptime, flags) -- false, "exists" when present
methods.add = writer("add", false)
-- syntax: ok, err = dict:safe_add(key, value, exptime, flags) -- false, "no memory" rather than evict
methods.safe_add = writer("add", true)
-- syntax: ok, err, forcible = dict:replace(key, value, exptime, flags) -- false, "not found" when
-- absent
methods.replace = writer("replace", false)

-- syntax: ok = dict:delete(key) -- true (lua-resty-lock reads it)
function methods:delete(key)
    key = check_key(key, 2)
    local e = self.entries[key]
    if e then remove(self, e) end
    return true, nil, false
end

-- syntax: new, err, forcible = dict:incr(key, step, init, init_ttl) -- nil, "not found" when absent
-- and no init; nil, "not a number" when the value is not one. The expiry of an entry is kept.
function methods:incr(key, step, init, init_ttl)
    key = check_key(key, 2)
    step = tonumber(step)
    if not step then error("moonlet.shared: incr's step is a number", 2) end
    if init ~= nil and not tonumber(init) then error("moonlet.shared: incr's init is a number", 2) end
    if init_ttl ~= nil and init == nil then error("moonlet.shared: incr's init_ttl goes with init", 2) end
    if init_ttl ~= nil and (type(init_ttl) ~= "number" or init_ttl < 0) then
        error("moonlet.shared: init_ttl is a number of seconds >= 0", 2)
    end
    local e = live(self, key)
    if not e then
        if init == nil then return nil, "not found" end
        init = tonumber(init)
        local ok, err, forcible = store(self, key, init + step, init_ttl, nil, false)
        if not ok then return nil, err end
        return init + step, nil, forcible
    end
    if type(e.value) ~= "number" then return nil, "not a number" end
    e.value = e.value + step
    unlink(self, e)
    push(self, e)
    return e.value, nil, false
end

-- syntax: ttl, err = dict:ttl(key) -- seconds left, 0 for an entry that never expires; nil,
-- "not found"
function methods:ttl(key)
    local e = live(self, check_key(key, 2))
    if not e then return nil, "not found" end
    return e.expires and e.expires - now() or 0
end

-- syntax: ok, err = dict:expire(key, exptime) -- a new expiry (0: never); nil, "not found"
function methods:expire(key, exptime)
    key = check_key(key, 2)
    if type(exptime) ~= "number" or exptime < 0 then
        error("moonlet.shared: exptime is a number of seconds >= 0", 2)
    end
    local e = live(self, key)
    if not e then return nil, "not found" end
    e.expires = exptime > 0 and now() + exptime or nil
    return true
end

-- syntax: keys = dict:get_keys(max_count) -- at most max_count (1024 by default; 0: all) live keys
function methods:get_keys(max_count)
    max_count = max_count or 1024
    local keys, t = {}, now()
    for key in pairs(self.entries) do
        if live(self, key, t) then
            keys[#keys + 1] = key
            if #keys == max_count then break end
        end
    end
    return keys
end

-- syntax: dict:flush_all() -- every entry goes
function methods:flush_all()
    self.entries, self.head, self.tail, self.used = {}, nil, nil, 0
end

-- syntax: n = dict:flush_expired(max_count) -- drops expired entries (all, or at most max_count)
function methods:flush_expired(max_count)
    return drop_expired(self, max_count)
end

-- syntax: bytes = dict:capacity(), bytes = dict:free_space()
function methods:capacity() return self.size end
function methods:free_space() return self.size - self.used end

-- ngx.shared for moonlet.ngx: ngx.shared.NAME is moonlet.shared(NAME)
_M.ngx_shared = setmetatable({}, {
    __index = function(_, name)
        if type(name) ~= "string" then return nil end
        return _M.get(name)
    end,
})

return _M
