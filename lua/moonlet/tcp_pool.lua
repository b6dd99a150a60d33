-- lua/moonlet/tcp_pool.lua: the keep-alive pool of idle moonlet.tcp client sockets, shared by
-- moonlet.tcp (sock:setkeepalive, moonlet.tcp.socket():connect) and moonlet.ngx (ngx.socket.tcp).
-- One pool per key ("host:port" or a name given as opts.pool): a LIFO stack, bounded in size, whose
-- entries expire after their idle timeout (seconds). No timer watches the pool (nothing keeps a
-- script alive): expired entries are closed whenever the pool is used, and a pooled socket whose
-- peer closed or sent something meanwhile is found out by sock:reusable() (a non-blocking peek)
-- and dropped. The pool owns the sockets it holds: it closes them when they expire, when a full
-- pool takes a newer one, or on close_idle().
local core = require "moonlet.core"

local core_time = core.time
local remove = table.remove
local huge = math.huge
local pairs, tonumber, setmetatable = pairs, tonumber, setmetatable

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_TIMEOUT = 60 -- seconds (OpenResty's lua_socket_keepalive_timeout)
_M.DEFAULT_SIZE = 30    -- OpenResty's lua_socket_pool_size

local pools = {} -- key -> stack of { sock =, expires = } (the newest on top)
local idle = setmetatable({}, { __mode = "k" }) -- sock -> true while it sits in a pool

-- Closes every expired entry of every pool.
local function sweep(t)
    for key, p in pairs(pools) do
        local j = 0
        for i = 1, #p do
            local e = p[i]
            if e.expires <= t then
                idle[e.sock] = nil
                e.sock:close()
            else
                j = j + 1
                p[j] = e
            end
        end
        for i = #p, j + 1, -1 do p[i] = nil end
        if j == 0 then pools[key] = nil end
    end
end

-- syntax: sock = pool.checkout(key) -- a live idle socket of pool key (taken out), or nil
function _M.checkout(key)
    sweep(core_time())
    local p = pools[key]
    while p and #p > 0 do
        local e = remove(p)
        if #p == 0 then pools[key] = nil end
        idle[e.sock] = nil
        if e.sock:reusable() then return e.sock end
        e.sock:close()
    end
    return nil
end

-- syntax: ok, err = pool.put(key, sock, timeout, size)
-- Puts sock in pool key: true, or nil, "unread data in buffer" (sock is closed then: it cannot be
-- reused). timeout: idle seconds (0: none; nil: 60); size: the pool's bound (30 by default, the
-- caller checks it is >= 1); a full pool closes its oldest socket.
function _M.put(key, sock, timeout, size)
    timeout = tonumber(timeout) or _M.DEFAULT_TIMEOUT
    size = tonumber(size) or _M.DEFAULT_SIZE
    if idle[sock] then return nil, "closed" end
    if not sock:reusable() then
        sock:close()
        return nil, "unread data in buffer"
    end
    local t = core_time()
    sweep(t)
    local p = pools[key]
    if not p then
        p = {}
        pools[key] = p
    end
    while #p >= size do
        local old = remove(p, 1).sock
        idle[old] = nil
        old:close()
    end
    p[#p + 1] = { sock = sock, expires = timeout > 0 and t + timeout or huge }
    idle[sock] = true
    return true
end

-- syntax: pool.replace(key, old, new) -- the entry of idle socket old in pool key holds new instead
-- (old's connection moved into new: sock:connect on a pooled moonlet.tcp.connect socket)
function _M.replace(key, old, new)
    local p = pools[key]
    for i = 1, p and #p or 0 do
        local e = p[i]
        if e.sock == old then
            e.sock = new
            idle[old], idle[new] = nil, true
            return
        end
    end
end

-- pool.idle: the set of sockets sitting in a pool (weak keys; read it, do not write it)
_M.idle = idle

-- syntax: stats = pool.stats() -- { idle = n, pools = { [key] = n } } (expired entries swept first)
function _M.stats()
    sweep(core_time())
    local out, n = {}, 0
    for key, p in pairs(pools) do
        out[key] = #p
        n = n + #p
    end
    return { idle = n, pools = out }
end

-- syntax: pool.close_idle() -- closes every pooled socket now
function _M.close_idle()
    for key, p in pairs(pools) do
        for i = 1, #p do
            idle[p[i].sock] = nil
            p[i].sock:close()
        end
        pools[key] = nil
    end
end

return _M
