-- lua/moonlet/udp.lua: moonlet.udp, UDP sockets (bindings/udp.c). recvfrom yields until a datagram
-- arrives; it goes through task.check so a cancelled task raises moonlet.CANCELLED. Host names
-- (for bind, sendto, setpeername) are resolved with moonlet.dns; address literals are used as is.
local core = require "moonlet.core"
local task = require "moonlet.task"
local dns = require "moonlet.dns"

local check = task.check
local core_bind = core.udp_bind
local type, tonumber, error = type, tonumber, error

local raw = core.udp_raw
local raw_sendto, raw_recvfrom, raw_setpeername = raw.sendto, raw.recvfrom, raw.setpeername

local _M = { _VERSION = "0.1.0" }

local methods = {}
for k, f in pairs(raw) do methods[k] = f end -- the calls that never wait, as they are

local function check_port(port, fname)
    port = tonumber(port)
    if not port or port % 1 ~= 0 or port < 0 or port > 65535 then
        error("moonlet.udp." .. fname .. ": bad port", 3)
    end
    return port
end

-- The first address of host (a literal comes back at once).
local function address(host)
    if type(host) ~= "string" then error("moonlet.udp: expected a host", 3) end
    local addrs, err = dns.resolve(host)
    if not addrs then return nil, err end
    return addrs[1]
end

-- syntax: ok, err = u:sendto(data, host, port) -- one datagram; never waits for the network
function methods:sendto(data, host, port)
    if type(data) ~= "string" then error("moonlet.udp: sendto expects a string", 2) end
    port = check_port(port, "sendto")
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
    port = check_port(port, "setpeername")
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

-- syntax: u, err = moonlet.udp.bind(host, port) -- host "0.0.0.0" and port 0 (a free one) by default
function _M.bind(host, port)
    host = host or "0.0.0.0"
    port = check_port(port or 0, "bind")
    local ip, err = address(host)
    if not ip then return nil, err end
    return core_bind(ip, port)
end

return _M
