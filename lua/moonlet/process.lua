-- lua/moonlet/process.lua: moonlet.process, child processes with pipes (bindings/process.c).
-- spawn{ "cmd", args..., stdin =, env =, cwd =, timeout = } starts the child; the object reads its
-- stdout and stderr and writes its stdin the cosocket way (p.stdout:receive("*l") like
-- sock:receive), and p:wait() yields until it exits. Every C call that waits goes through
-- task.check, so a cancelled task raises moonlet.CANCELLED. The process object owns the C
-- userdata; dropping it (or p:close()) kills a child still running, which is then reaped.
local core = require "moonlet.core"
local task = require "moonlet.task"

local check = task.check
local core_spawn = core.process_spawn
local raw = core.process_raw
local raw_wait, raw_kill, raw_close = raw.wait, raw.kill, raw.close
local raw_receive, raw_receive_any, raw_settimeout = raw.receive, raw.receive_any, raw.settimeout
local raw_write, raw_close_stdin, raw_status = raw.write, raw.close_stdin, raw.status
local type, tostring, error, setmetatable, pairs = type, tostring, error, setmetatable, pairs
local str_find = string.find
local core_environ = core.process_environ

local _M = { _VERSION = "0.1.0" }

-- -- Streams: p.stdin, p.stdout, p.stderr ------------------------------------------------------

local reader = {}
local reader_mt = { __name = "moonlet.process.stream", __index = reader }

-- syntax: data, err, partial = p.stdout:receive(size | "*l" | "*a") -- as sock:receive
function reader:receive(pattern)
    return check(raw_receive(self._ud, self._fd, pattern))
end

-- syntax: data, err = p.stdout:receive_any(max) -- whatever arrived (waits for something)
function reader:receive_any(max)
    return check(raw_receive_any(self._ud, self._fd, max))
end

-- syntax: for line in p.stdout:lines() do ... end -- a last line without its newline comes too,
-- as with io.lines. The loop ends at the end of the output ("closed") only: any other failure
-- (a timeout of settimeout, "busy") raises "moonlet.process: stdout: timeout", as io.lines raises
-- on a read error and res:chunks() on a broken body, so that output cut short is never taken for
-- the whole of it. A timed-out read consumes nothing: the stream stays usable.
function reader:lines()
    local ended = false
    return function()
        if ended then return nil end
        local line, err, partial = check(raw_receive(self._ud, self._fd, "*l"))
        if line then return line end
        if err ~= "closed" then
            error("moonlet.process: " .. (self._fd == 2 and "stderr" or "stdout") .. ": " .. err, 2)
        end
        ended = true
        if partial and partial ~= "" then return partial end -- the end of it
        return nil
    end
end

-- syntax: p.stdout:settimeout(seconds) -- for every later read; nil: none
function reader:settimeout(secs)
    raw_settimeout(self._ud, self._fd, secs)
end

local writer = {}
local writer_mt = { __name = "moonlet.process.stream", __index = writer }

-- syntax: ok, err = p.stdin:send(data)
function writer:send(data)
    return check(raw_write(self._ud, data))
end

-- syntax: ok = p.stdin:close()
function writer:close()
    return raw_close_stdin(self._ud)
end

-- syntax: p.stdin:settimeout(seconds) -- for every later write; nil: none
function writer:settimeout(secs)
    raw_settimeout(self._ud, 0, secs)
end

-- -- The process object ----------------------------------------------------------------------

local methods = {}
local mt = { __name = "moonlet.process", __index = methods }

-- syntax: code, signal = p:wait(timeout) -- or nil, "timeout"; code is 128 + signal when a signal
-- ended the child (signal is 0 otherwise)
function methods:wait(timeout)
    return check(raw_wait(self._ud, timeout))
end

-- syntax: ok, err = p:kill(sig) -- "TERM" (default), "KILL", "INT", ... or a number
function methods:kill(sig)
    return raw_kill(self._ud, sig)
end

-- syntax: ok, err = p:write(data)
function methods:write(data)
    return check(raw_write(self._ud, data))
end

-- syntax: ok = p:close_stdin()
function methods:close_stdin()
    return raw_close_stdin(self._ud)
end

-- syntax: data, err, partial = p:read(size | "*l" | "*a") -- from stdout (p:stdout_read alike)
function methods:read(pattern)
    return check(raw_receive(self._ud, 1, pattern))
end
methods.stdout_read = methods.read

-- syntax: data, err, partial = p:stderr_read(size | "*l" | "*a")
function methods:stderr_read(pattern)
    return check(raw_receive(self._ud, 2, pattern))
end

-- syntax: running, timed_out = p:status()
function methods:status()
    return raw_status(self._ud)
end

-- syntax: ok = p:close() -- kills the child if it still runs, closes the pipes
function methods:close()
    return raw_close(self._ud)
end

function mt.__tostring(p)
    return tostring(p._ud)
end

local function stdio_opt(v, name)
    if v == nil or v == true or v == "pipe" then return "pipe" end
    if v == false or v == "ignore" then return "ignore" end
    if v == "inherit" then return v end
    error("moonlet.process.spawn: " .. name .. " must be \"pipe\", \"inherit\" or \"ignore\"", 3)
end

-- The parent's environment with the keys of env set (a value false removes the key).
local function environment(env)
    local all, order = {}, {}
    local parent = core_environ()
    for i = 1, #parent do
        local kv = parent[i]
        local k = kv:match("^([^=]+)=")
        if k and not all[k] then
            all[k] = kv
            order[#order + 1] = k
        end
    end
    for k, v in pairs(env) do
        if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number" and v ~= false) then
            error("moonlet.process.spawn: env must map names to strings", 3)
        end
        if not all[k] then order[#order + 1] = k end
        all[k] = v and (k .. "=" .. tostring(v)) or false
    end
    local list = {}
    for i = 1, #order do
        local kv = all[order[i]]
        if kv then list[#list + 1] = kv end
    end
    return list
end
_M._environment = environment

-- Does a string of list hold a NUL byte?
local function has_nul(list)
    for i = 1, #list do
        if str_find(list[i], "\0", 1, true) then return true end
    end
    return false
end

-- syntax: p, err = moonlet.process.spawn{ "cmd", "arg", ..., stdin = "text" | "pipe" | "ignore",
--                                         stdout =, stderr = "pipe" | "inherit" | "ignore",
--                                         env = { K = "v" }, cwd = "dir", timeout = seconds }
-- cmd is looked up in PATH. stdin = a string: written to the child, then stdin is closed. env adds
-- to (or, with false, removes from) the parent's environment. timeout: the child is killed
-- (SIGKILL) and reaped when it runs longer; 0 expires at once (the loop polls once first, as a
-- socket's timeout of 0), like Python's subprocess timeout=0; negative or NaN raises.
-- err: "not found", "permission denied", ...
function _M.spawn(opts)
    if type(opts) ~= "table" then error("moonlet.process.spawn: expected a table", 2) end
    if type(opts[1]) ~= "string" then error("moonlet.process.spawn: expected the command", 2) end
    local argv = {}
    for i = 1, #opts do
        local a = opts[i]
        if type(a) ~= "string" and type(a) ~= "number" then
            error("moonlet.process.spawn: arguments must be strings", 2)
        end
        argv[i] = tostring(a)
    end
    local bad = has_nul(argv) or (type(opts.cwd) == "string" and str_find(opts.cwd, "\0", 1, true))
    local stdin_data, stdin_mode = nil, "pipe"
    if type(opts.stdin) == "string" and opts.stdin ~= "pipe" and opts.stdin ~= "ignore"
        and opts.stdin ~= "inherit" then
        stdin_data = opts.stdin
    else
        stdin_mode = stdio_opt(opts.stdin, "stdin")
    end
    local env = opts.env
    if env ~= nil then
        if type(env) ~= "table" then error("moonlet.process.spawn: env must be a table", 2) end
        env = environment(env)
        bad = bad or has_nul(env)
    end
    if opts.cwd ~= nil and type(opts.cwd) ~= "string" then
        error("moonlet.process.spawn: cwd must be a string", 2)
    end
    local timeout = opts.timeout
    if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
        error("moonlet.process.spawn: timeout must be a number of seconds >= 0", 2) -- NaN too
    end
    -- a NUL would end the C string there: the child would get another argument, variable or
    -- directory than the one given (execve cannot pass one), so the spawn is refused
    if bad then return nil, "invalid argument" end
    local ud, pid = core_spawn(argv, env, opts.cwd, stdin_data, opts.timeout, stdin_mode,
        stdio_opt(opts.stdout, "stdout"), stdio_opt(opts.stderr, "stderr"))
    if not ud then return nil, pid end
    return setmetatable({
        _ud = ud,
        pid = pid,
        stdin = setmetatable({ _ud = ud, _fd = 0 }, writer_mt),
        stdout = setmetatable({ _ud = ud, _fd = 1 }, reader_mt),
        stderr = setmetatable({ _ud = ud, _fd = 2 }, reader_mt),
    }, mt)
end

return _M
