-- spec/support/servers.lua: private database servers for specs: a PostgreSQL cluster (initdb into
-- a temporary directory, pg_ctl on a free loopback port, its socket in that directory) and
-- redis-server instances, each stopped and removed by :stop(). Starting blocks the loop for a
-- moment (os.execute): fine for specs. Running as root, PostgreSQL runs as the `postgres` user.
local core = require "moonlet.core"

local _M = {}

local function sh(cmd)
    local ok = os.execute(cmd)
    return ok == 0 or ok == true
end

local function read(cmd)
    local f = io.popen(cmd)
    local s = f:read("*a")
    f:close()
    return s
end

-- syntax: port = servers.free_port() -- a port that was free a moment ago (bound to 0, closed)
function _M.free_port()
    local srv = assert(core.tcp_listen("127.0.0.1", 0, 16, function(sock) sock:close() end))
    local port = srv:port()
    srv:close()
    return port
end

local function tmpdir(prefix)
    local dir = read("mktemp -d /tmp/" .. prefix .. ".XXXXXX"):gsub("%s+$", "")
    assert(dir ~= "", "mktemp failed")
    return dir
end

-- -- PostgreSQL -------------------------------------------------------------------------------

-- syntax: bin = servers.pg_bin() -- the directory of initdb and pg_ctl, or nil
function _M.pg_bin()
    local dir = read("ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1")
        :gsub("%s+$", "")
    if dir == "" or not sh("test -x " .. dir .. "/initdb") then return nil end
    return dir
end

local pg_mt = { __index = {} }
local pg = pg_mt.__index

function pg:run(cmd)
    if self.as_postgres then
        cmd = "runuser -u postgres -- sh -c '" .. cmd:gsub("'", [['\'']]) .. "'"
    end
    return sh(cmd .. " >>" .. self.dir .. "/cmd.log 2>&1")
end

function pg:ctl(args)
    return self:run(("%s/pg_ctl -D %s/data -l %s/server.log -w -t 30 %s"):format(
        self.bin, self.dir, self.dir, args))
end

-- syntax: ok = server:start() / server:stop_server() / server:restart()
function pg:start()
    return self:ctl(("-o \"-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off " ..
                     "-c max_connections=300 -c shared_buffers=16MB\" start"):format(self.port, self.dir))
end

function pg:restart()
    return self:ctl("-m fast restart")
end

function pg:stop_server()
    return self:ctl("-m fast stop")
end

function pg:log()
    local f = io.open(self.dir .. "/server.log")
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

-- syntax: server:stop() -- stops the server and removes its directory
function pg:stop()
    self:ctl("-m immediate stop")
    sh("rm -rf " .. self.dir)
end

-- syntax: server, err = servers.postgres() -- a running cluster: server.url, server.port
function _M.postgres()
    local bin = _M.pg_bin()
    if not bin then return nil, "postgresql server binaries not found" end
    local self = setmetatable({ bin = bin, dir = tmpdir("moonlet-pg") }, pg_mt)
    self.as_postgres = read("id -u"):match("^0") ~= nil
    if self.as_postgres then sh("chown postgres " .. self.dir) end
    if not self:run(("%s/initdb -D %s/data -A trust -U postgres --no-sync -E UTF8"):format(
            bin, self.dir)) then
        local f = io.open(self.dir .. "/cmd.log")
        local log = f and f:read("*a") or ""
        if f then f:close() end
        sh("rm -rf " .. self.dir)
        return nil, "initdb failed: " .. log
    end
    for _ = 1, 5 do -- a port taken between free_port and the start: try another
        self.port = _M.free_port()
        if self:start() then
            self.url = ("postgresql://postgres@127.0.0.1:%d/postgres"):format(self.port)
            return self
        end
    end
    local log = self:log()
    self:stop()
    return nil, "the server did not start: " .. log
end

-- -- Redis -------------------------------------------------------------------------------------

local redis_mt = { __index = {} }
local redis = redis_mt.__index

function redis:start()
    self.socket = self.dir .. "/redis.sock" -- also on a Unix domain socket
    return sh(("redis-server --port %d --bind 127.0.0.1 --dir %s --save '' --appendonly no " ..
               "--unixsocket %s --unixsocketperm 700 " ..
               "--daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log"):format(
                   self.port, self.dir, self.socket, self.dir, self.dir))
end

local function redis_pid(self)
    local f = io.open(self.dir .. "/redis.pid")
    if not f then return nil end
    local pid = tonumber(f:read("*l"))
    f:close()
    return pid
end

-- syntax: server:stop_server() -- kills the server (the directory stays, for a restart)
function redis:stop_server()
    local pid = redis_pid(self)
    if not pid then return false end
    sh("kill " .. pid)
    for _ = 1, 500 do
        if not sh("kill -0 " .. pid .. " 2>/dev/null") then break end
        sh("sleep 0.01")
    end
    os.remove(self.dir .. "/redis.pid")
    return true
end

-- syntax: ok = server:wait_ready() -- until it answers PING (blocking, at most 5 s)
function redis:wait_ready()
    for _ = 1, 500 do
        if read(("redis-cli -p %d ping 2>/dev/null"):format(self.port)):match("PONG") then
            return true
        end
        sh("sleep 0.01")
    end
    return false
end

function redis:restart()
    self:stop_server()
    return self:start() and self:wait_ready()
end

function redis:stop()
    self:stop_server()
    sh("rm -rf " .. self.dir)
end

-- syntax: server, err = servers.redis() -- a running redis-server: server.port
function _M.redis()
    if not sh("command -v redis-server >/dev/null 2>&1") then
        return nil, "redis-server not found"
    end
    local self = setmetatable({ dir = tmpdir("moonlet-redis") }, redis_mt)
    for _ = 1, 5 do
        self.port = _M.free_port()
        if self:start() and self:wait_ready() then return self end
        self:stop_server()
    end
    sh("rm -rf " .. self.dir)
    return nil, "redis-server did not start"
end

return _M
