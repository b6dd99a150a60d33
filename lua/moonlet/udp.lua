-- lua/moonlet/udp.lua: moonlet.udp, UDP sockets (bindings/udp.c). recvfrom yields until a datagram
-- arrives; it goes through task.check so a cancelled task raises moonlet.CANCELLED. Host names
-- (for bind, sendto, setpeername) are resolved with moonlet.dns; address literals are used as is.
-- moonlet.udp.socket() is the OpenResty-style unbound object (a Lua table holding the userdata once
-- :setpeername bound it); timeouts are seconds.
-- A host "unix:/path" is a datagram Unix domain socket (syslog's /dev/log, a local statsd): bind
-- makes one there, sendto and setpeername send to one (from a socket bound to "unix:", an abstract
-- name the kernel picks, so that the server can answer); no port goes with it. recvfrom gives the
-- sender as "unix:/path", "unix:@name" (abstract) or "unix:" (unnamed).
local core = require "moonlet.core"
local task = require "moonlet.task"
local dns = require "moonlet.dns"

local check = task.check
local core_bind, core_dup = core.udp_bind, core.udp_dup
local type, tonumber, error, setmetatable, rawget = type, tonumber, error, setmetatable, rawget
local find, sub = string.find, string.sub

local raw = core.udp_raw
local raw_sendto, raw_recvfrom, raw_setpeername = raw.sendto, raw.recvfrom, raw.setpeername

local _M = { _VERSION = "0.1.0" }

local bound = setmetatable({}, { __mode = "k" }) -- a socket of bind -> its "ip:port" (port not 0)

local methods = {}
for k, f in pairs(raw) do methods[k] = f end -- the calls that never wait, as they are

local function check_port(port, fname)
    port = tonumber(port)
    if not port or port % 1 ~= 0 or port < 0 or port > 65535 then
        error("moonlet.udp." .. fname .. ": bad port", 3)
    end
    return port
end

local function is_unix(host)
    return type(host) == "string" and sub(host, 1, 5) == "unix:"
end

-- The first address of host (a literal or a "unix:" address comes back at once).
local function address(host)
    if type(host) ~= "string" then error("moonlet.udp: expected a host", 3) end
    if is_unix(host) then return host end
    local addrs, err = dns.resolve(host)
    if not addrs then return nil, err end
    return addrs[1]
end

-- syntax: ok, err = u:sendto(data, host, port) -- one datagram; never waits for the network
function methods:sendto(data, host, port)
    if type(data) ~= "string" then error("moonlet.udp: sendto expects a string", 2) end
    port = is_unix(host) and 0 or check_port(port, "sendto")
    local ip, err = address(host)
    if not ip then return nil, err end
    return raw_sendto(self, data, ip, port)
end

-- syntax: data, host, port = u:recvfrom(timeout) -- or nil, "timeout" | "closed" | "socket busy"
function methods:recvfrom(timeout)
    return check(raw_recvfrom(self, timeout))
end

-- syntax: ok, err = u:setpeername(host, port) -- send and receive then talk to that peer only
function methods:setpeername(host, port)
    port = is_unix(host) and 0 or check_port(port, "setpeername")
    local ip, err = address(host)
    if not ip then return nil, err end
    return raw_setpeername(self, ip, port)
end

-- syntax: data, err = u:receive(timeout) -- a datagram from the peer of setpeername
function methods:receive(timeout)
    local data, err = check(raw_recvfrom(self, timeout))
    if data then return data end
    return nil, err
end

core.udp_mt.__index = methods

-- syntax: u, err = moonlet.udp.bind(host, port) -- host "0.0.0.0" and port 0 (a free one) by default;
-- moonlet.udp.bind("unix:/path") -- a datagram Unix domain socket ("unix:": an abstract name)
function _M.bind(host, port)
    host = host or "0.0.0.0"
    if is_unix(host) then
        if find(host, "%z") then error("moonlet.udp.bind: a path without NUL", 2) end
        return core_bind(host)
    end
    port = check_port(port or 0, "bind")
    local ip, err = address(host)
    if not ip then return nil, err end
    local key = port ~= 0 and ip .. ":" .. port or nil
    local app_mod = package.loaded["moonlet.app"]
    local load = app_mod and app_mod.loading
    local old = key and load and load.udp_reusable[key]
    local u
    if old then -- a reload's new code binds where the old code's socket is: a second one on it
        load.udp_reusable[key] = nil
        u = core_dup(old)
    end
    if not u then
        u, err = core_bind(ip, port)
        if not u then return nil, err end
    end
    bound[u] = key
    if load then
        load.udp_own[#load.udp_own + 1] = u
        load.opened[#load.opened + 1] = u
    end
    return u
end

-- -- Hot reload (lua/moonlet/reload.lua) ---------------------------------------------------------
-- While a load's top level runs (moonlet.app's loading: see lua/moonlet/tcp.lua), a bind on the
-- address of a socket the old code bound gets a second socket object on the same descriptor
-- (core.udp_dup): no "address in use", and no datagram lost, since a socket object reads only
-- while someone waits on it. The old code's socket closes when the new code serves (the new one
-- closes if the load fails). Unix domain sockets are not handed over.

-- syntax: key = moonlet.udp.bind_key_of(u) -- "ip:port" a socket was bound to, nil for port 0
function _M.bind_key_of(u)
    return bound[u]
end

-- -- moonlet.udp.socket(): the unbound cosocket object -------------------------------------------

local obj_methods = {}
local obj_mt = { __name = "moonlet.udp.socket", __index = obj_methods }

-- syntax: u = moonlet.udp.socket() -- unbound; :setpeername binds it to a free local port
function _M.socket()
    return setmetatable({}, obj_mt)
end

-- syntax: ok, err = u:setpeername(host, port) -- binds (a free port) and talks to that peer only
-- A socket the object held before is closed first.
function obj_methods:setpeername(host, port)
    local unix = is_unix(host)
    port = unix and 0 or check_port(port, "socket:setpeername")
    local ip, err = address(host)
    if not ip then return nil, err end
    local old = rawget(self, "_sock")
    if old then
        self._sock = nil
        old:close()
    end
    local u
    if unix then
        u, err = core_bind("unix:")
    else
        u, err = core_bind(find(ip, ":", 1, true) and "::" or "0.0.0.0", 0)
    end
    if not u then return nil, err end
    local ok
    ok, err = raw_setpeername(u, ip, port)
    if not ok then
        u:close()
        return nil, err
    end
    if rawget(self, "_timeout") then raw.settimeout(u, self._timeout) end
    self._sock = u
    return true
end

-- syntax: ok, err = u:send(data) -- one datagram to the peer
function obj_methods:send(data)
    if type(data) ~= "string" then error("moonlet.udp: send expects a string", 2) end
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    return u:send(data)
end

-- syntax: data, err = u:receive(size) -- a datagram from the peer (cut to size bytes when given);
-- waits at most the settimeout seconds (none by default): nil, "timeout" | "closed"
function obj_methods:receive(size)
    if size ~= nil and (type(size) ~= "number" or size < 0) then
        error("moonlet.udp: receive expects a size", 2)
    end
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    local data, err = u:receive()
    if not data then return nil, err end
    if size and #data > size then data = sub(data, 1, size) end
    return data
end

-- syntax: u:settimeout(seconds) -- receive's timeout; nil: none
function obj_methods:settimeout(t)
    if t ~= nil and type(t) ~= "number" then error("moonlet.udp: timeout must be a number", 2) end
    self._timeout = t
    local u = rawget(self, "_sock")
    if u then raw.settimeout(u, t) end
end

-- syntax: host, port = u:getsockname() -- the local address (nil, "closed" before setpeername)
function obj_methods:getsockname()
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    return u:getsockname()
end

-- syntax: ok, err = u:close()
function obj_methods:close()
    local u = rawget(self, "_sock")
    if not u then return nil, "closed" end
    self._sock = nil
    return u:close()
end

return _M
