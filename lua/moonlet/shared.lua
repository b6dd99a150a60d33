-- lua/moonlet/shared.lua: moonlet.shared(name, { size = bytes }), a dictionary of strings, numbers
-- and booleans with expiry times, by name, as OpenResty's lua_shared_dict (and ngx.shared.NAME in
-- moonlet.ngx, so that lua-resty libraries that keep counters, locks or caches there run): get,
-- get_stale, set, safe_set, add, safe_add, replace, delete, incr, ttl, expire, get_keys, flush_all,
-- flush_expired, capacity, free_space; and lists of strings and numbers under a key (queues between
-- workers): lpush, rpush, lpop, rpop, llen, with OpenResty's answers (get on a list: nil, "value is
-- a list"; a list method on another value: nil, "value not a list"; a push short of room: false,
-- "no memory", for a push never evicts; a list expires and is evicted whole, as one entry).
--
-- It lives in shared memory (core/shm.c, core/shdict.c, bindings/shared.c): under
-- `moonlet --workers N` every worker sees the same dictionary, as nginx's workers see theirs, and a
-- reload (SIGHUP, a script edited) finds its entries still there. The script's top level runs in
-- every worker, and again in one started anew: initialise with `add` (only when absent), not `set`.
-- Its entries are kept within `size` bytes (1 MiB by default; "10m" and "512k" as nginx writes
-- them), each counting its key, its value (8 for a number or a boolean) and ENTRY_OVERHEAD (a list:
-- its key and ENTRY_OVERHEAD, then each value in it its bytes, 8 for a number, and ENTRY_OVERHEAD); a store
-- short of room drops expired entries among the 64 least recently used, then evicts the least
-- recently used (`set`'s third result, forcible, is then true; `safe_set` and `safe_add` refuse with
-- "no memory"), as OpenResty does. The shared memory that holds all dictionaries is 1 GiB of
-- address space by default (`moonlet --shared-memory SIZE`); a dictionary takes 4 times its size of
-- it, and only the pages its entries touch are memory. A call never yields; it holds the
-- dictionary's lock, which all workers share, for its own work only (get_keys(0) and
-- flush_expired() on a large dictionary hold it longest).
local core = require "moonlet.core"

local type, error, tonumber = type, error, tonumber

local _M = {}
_M.ENTRY_OVERHEAD = 64 -- bytes an entry is counted for besides its key and value
_M.DEFAULT_SIZE = 1024 * 1024

local dicts = {} -- name -> dict: one userdata per name in this Lua state

local UNITS = { [""] = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 }

-- syntax: bytes = shared.parse_size(size) -- 4096, "4096", "512k", "10m", "1g"; nil when not one
function _M.parse_size(size)
    if type(size) == "number" then return size end
    if type(size) ~= "string" then return nil end
    local n, unit = size:lower():match("^%s*(%d+%.?%d*)%s*([kmg]?)b?%s*$")
    if not n then return nil end
    return math.floor(tonumber(n) * UNITS[unit])
end

-- syntax: dict = moonlet.shared(name, { size = bytes }) -- the same dictionary for the same name;
-- size counts when the name is first used, in any worker (an existing dictionary keeps its own)
function _M.get(name, opts)
    if type(name) ~= "string" or name == "" then error("moonlet.shared: a name is a string", 2) end
    local d = dicts[name]
    if d then return d end
    local size = _M.parse_size(opts and opts.size or _M.DEFAULT_SIZE)
    if not size then error("moonlet.shared: size is a number of bytes", 2) end -- (its range: core)
    local ok, got = pcall(core.shared_open, name, size)
    if not ok then error(got:gsub("^[^:]*:%d+: ", ""), 2) end
    dicts[name] = got
    return got
end

-- ngx.shared for moonlet.ngx: ngx.shared.NAME is moonlet.shared(NAME)
_M.ngx_shared = setmetatable({}, {
    __index = function(_, name)
        if type(name) ~= "string" then return nil end
        return _M.get(name)
    end,
})

return _M
