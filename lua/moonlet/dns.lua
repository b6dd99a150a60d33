-- lua/moonlet/dns.lua: moonlet.dns.resolve, name resolution through the loop (bindings/dns.c:
-- getaddrinfo on libuv's thread pool; the task yields meanwhile, the loop keeps serving).
local core = require "moonlet.core"
local task = require "moonlet.task"

local check = task.check
local core_resolve = core.dns_resolve
local type = type

local _M = { _VERSION = "0.1.0" }

local DEFAULT_TIMEOUT = 30
local families = { inet = true, inet6 = true }

-- syntax: addrs, err = moonlet.dns.resolve(name, { family = "inet" | "inet6", timeout = seconds })
-- addrs is an array of address strings ("127.0.0.1", "::1"), in the resolver's order; err is
-- "not found", "timeout" or another short string. An address literal comes back as it is.
function _M.resolve(name, opts)
    if type(name) ~= "string" then error("moonlet.dns.resolve: expected a host name", 2) end
    local family, timeout = nil, DEFAULT_TIMEOUT
    if opts ~= nil then
        if type(opts) ~= "table" then error("moonlet.dns.resolve: opts must be a table", 2) end
        family = opts.family
        if family ~= nil and not families[family] then
            error("moonlet.dns.resolve: family must be \"inet\" or \"inet6\"", 2)
        end
        if opts.timeout ~= nil then
            local t = opts.timeout
            if type(t) ~= "number" or t ~= t or t < 0 then -- a number, not NaN, not negative
                error("moonlet.dns.resolve: timeout must be a number of seconds >= 0", 2)
            end
            timeout = opts.timeout
        end
    end
    return check(core_resolve(name, family, timeout))
end

return _M
