-- lua/moonlet/limit.lua: moonlet.limit(opts), a middleware that limits the request rate per client
-- (per key) with a token bucket, as OpenResty's lua-resty-limit-req and nginx's limit_req do: each
-- key may make `burst` requests at once, then `rate` a second; a request over it is answered 429
-- with Retry-After (whole seconds until the next one would pass), and the handler does not run.
--
-- The buckets live in this process (an app's instance), keyed by the client's IP address unless
-- opts.key says otherwise (a function of req: an API key, a user id; nil lets the request through
-- unlimited). They are kept for at most max_keys keys, least recently used first out (a list in
-- the order of use, as nginx's limit_req zone keeps its own): a new key past max_keys takes the
-- place of the key that has waited longest, in O(1). A client that makes new keys faster than the
-- others come back can push them out; size max_keys to the clients of a few minutes.
--
-- With opts.shared (a moonlet.shared dictionary, or its name) the buckets live there instead, one
-- set for all the workers of `moonlet --workers N` (and for every limit given that dictionary):
-- the dictionary's size bounds them, its least recently used going first. Each key holds one
-- number, its bucket's "theoretical arrival time" (GCRA, which is the token bucket told another
-- way): the time at which the bucket is full again, on the monotonic clock every process shares.
-- A request adds 1/rate to it with dict:incr, which is atomic across the workers, and passes when
-- the result is no more than burst/rate ahead of now; a refused one takes its 1/rate back. The
-- entry expires when its time comes, so an existing entry's time is never in the past and the
-- increment is max(tat, now) + 1/rate without a read-modify-write that two workers could race.
local core = require "moonlet.core"

local type, error, tostring = type, error, tostring
local floor, ceil, min = math.floor, math.ceil, math.min

local _M = {}

-- the client's address: req.ip (the peer's, or what moonlet.forwarded put there behind a proxy)
local function client_ip(req)
    return req.ip
end

-- the take() of opts.shared: the same answers, from a dictionary all the workers share
local function shared_take(dict, rate, burst)
    local interval, window = 1 / rate, burst / rate
    return function(key, now)
        key = tostring(key)
        local tat = dict:incr(key, interval, now, window)
        if not tat then return true end -- no room even after evicting: let it through
        local ahead = tat - now
        if ahead <= window + 1e-9 then
            -- expires when the bucket is full again (a racing worker may set it a step early)
            dict:expire(key, ahead)
            return true
        end
        dict:incr(key, -interval)
        return false, ahead - window
    end
end

-- syntax: app:use(moonlet.limit({ rate = 10, burst = 20, key = function(req) return ip end,
--   max_keys = 100000, status = 429, shared = moonlet.shared("limit") | "limit" }))
function _M.middleware(opts)
    if type(opts) ~= "table" then error("moonlet.limit: options with a rate are needed", 3) end
    local rate, burst = opts.rate, opts.burst or opts.rate
    local key_of = opts.key or client_ip
    local max_keys = opts.max_keys or 100000
    local status = opts.status or 429
    if type(rate) ~= "number" or rate <= 0 or type(burst) ~= "number" or burst < 1
        or type(key_of) ~= "function" or type(max_keys) ~= "number" or type(status) ~= "number" then
        error("moonlet.limit: rate (requests a second) > 0, burst >= 1, key a function of req", 3)
    end
    if max_keys < 1 then error("moonlet.limit: max_keys is at least 1", 3) end
    burst = floor(burst)
    local dict = opts.shared
    if type(dict) == "string" then dict = require("moonlet.shared").get(dict) end
    if dict ~= nil and (type(dict) ~= "userdata" or not dict.incr) then
        error("moonlet.limit: shared is a moonlet.shared dictionary or its name", 3)
    end
    -- key -> bucket { tokens, time, key, newer, older }; head: the one used last, tail: first
    local buckets, count, head, tail = {}, 0, nil, nil

    local function unlink(b)
        if b.newer then b.newer.older = b.older else head = b.older end
        if b.older then b.older.newer = b.newer else tail = b.newer end
        b.newer, b.older = nil, nil
    end

    local function push(b) -- as the one used last
        b.older, b.newer = head, nil
        if head then head.newer = b else tail = b end
        head = b
    end

    -- whether the request of key may go now; else the seconds until it could
    local function take(key, now)
        local b = buckets[key]
        if not b then
            if count >= max_keys then -- the least recently used goes
                local old = tail
                unlink(old)
                buckets[old[3]] = nil
                count = count - 1
            end
            b = { burst - 1, now, key }
            buckets[key] = b
            count = count + 1
            push(b)
            return true
        end
        if b ~= head then unlink(b); push(b) end
        local tokens = min(burst, b[1] + (now - b[2]) * rate)
        b[2] = now
        if tokens >= 1 then
            b[1] = tokens - 1
            return true
        end
        b[1] = tokens
        return false, (1 - tokens) / rate
    end
    if dict then take = shared_take(dict, rate, burst) end

    return function(req, res, nxt)
        local key = key_of(req)
        if key == nil then return nxt() end
        local ok, wait = take(key, core.now())
        if ok then return nxt() end
        local after = ceil(wait)
        res:header("Retry-After", after)
        return status, "Too many requests: try again in " .. after .. " s\n"
    end
end

return _M
