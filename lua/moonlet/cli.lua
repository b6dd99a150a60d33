-- lua/moonlet/cli.lua: the `moonlet` command line, run by moonlet_main inside the instance's main
-- task (so a script's top level may wait: moonlet.sleep works there).
--   moonlet [flags] script.lua [args]   runs the script; if it returns an app, serves it (SIGHUP
--                                       reloads it; --reload also reloads on each change of its files)
--   moonlet test [dirs or files] [busted flags]   runs busted specs inside moonlet's runtime
local core = require "moonlet.core"

local _M = {}

local USAGE = [[
usage: moonlet [flags] script.lua [script args]
       moonlet test [spec dirs or files] [busted flags]

A script that returns an app (moonlet.app()) is served; any other script runs inside the event loop
until it and every task it spawned are done.

flags:
  --host HOST             address to listen on (127.0.0.1)
  --port N                port (env PORT, else 8080); 0 picks a free one
  --unix PATH             listen on this Unix domain socket instead (also --host unix:PATH)
  --unix-mode MODE        its permissions, octal ("660": nginx's group may connect; the umask's)
  --access-log            one line per request on stdout
  --access-log=FILE       ... appended to FILE instead (also --access-log-file FILE); SIGUSR1
                          reopens it (logrotate)
  --access-log-format F   moonlet (default), combined (nginx's) or json
  --error-log FILE        the error log (stderr) appended to FILE; SIGUSR1 reopens it
  --pid-file FILE         this process's id (the supervisor's with --workers), removed at exit
  --reload                reload the app when its file or a module next to it changes
  --log-level LEVEL       error, warn, info (default) or debug
  --warn-blocking S       log a task that runs S seconds without yielding (the loop serves nobody
                          meanwhile), with where it yielded; off by default
  --max-body BYTES        request body limit, else 413 (1048576)
  --max-uri BYTES         request-target limit, else 414 (8192)
  --max-header-bytes N    header section limit, else 431 (32768)
  --max-headers N         header count limit, else 431 (100)
  --header-timeout S      seconds to receive the headers, else 408 (60)
  --body-timeout S        seconds between two body reads, else 408 (60)
  --keepalive-timeout S   idle keep-alive connections are closed after S seconds (75)
  --send-timeout S        a client that reads nothing for S seconds is dropped (60)
  --max-conns N           connections beyond N are refused (10240)
  --shutdown-grace S      SIGINT/SIGTERM wait this long for in-flight requests (10)
  --workers N             N processes serve the app on the same port (SO_REUSEPORT), watched by
                          this one, which restarts any that dies; "auto": one per CPU (1)
  --shared-memory SIZE    address space for moonlet.shared's dictionaries, shared by the
                          workers ("1g"; each takes 4 times its size; only what entries use is
                          memory)
  --tls-cert FILE         serve HTTPS with this PEM certificate (chain) ...
  --tls-key FILE          ... and this PEM private key
  --tls-client-ca FILE    ask clients for a certificate signed by one of these PEM CAs (mTLS)
  --tls-verify-client on|optional
                          on: a client without a valid certificate is refused (the default
                          with --tls-client-ca); optional: one without any gets through
  -h, --help              this text
  -v, --version           the version
]]

local value_flags = {
    ["--host"] = "host", ["--port"] = "port", ["--log-level"] = "log_level",
    ["--max-body"] = "max_body", ["--max-uri"] = "max_uri",
    ["--max-header-bytes"] = "max_header_bytes", ["--max-headers"] = "max_headers",
    ["--header-timeout"] = "header_timeout", ["--body-timeout"] = "body_timeout",
    ["--keepalive-timeout"] = "keepalive_timeout", ["--max-conns"] = "max_conns",
    ["--shutdown-grace"] = "shutdown_grace", ["--send-timeout"] = "send_timeout",
    ["--tls-cert"] = "tls_cert", ["--tls-key"] = "tls_key", ["--workers"] = "workers",
    ["--tls-client-ca"] = "tls_client_ca", ["--tls-verify-client"] = "tls_verify_client",
    ["--shared-memory"] = "shared_memory", ["--unix"] = "unix", ["--unix-mode"] = "unix_mode",
    ["--access-log-file"] = "access_log", ["--access-log-format"] = "access_log_format",
    ["--error-log"] = "error_log", ["--pid-file"] = "pid_file", ["--warn-blocking"] = "warn_blocking",
}
local numeric = {
    port = true, max_body = true, max_uri = true, max_header_bytes = true, max_headers = true,
    header_timeout = true, body_timeout = true, keepalive_timeout = true, max_conns = true,
    shutdown_grace = true, send_timeout = true, warn_blocking = true,
}

-- what the command line holds that is not an app:listen option
local CLI_ONLY = { log_level = true, access_log = true, reload = true, tls_cert = true, tls_key = true,
                   tls_client_ca = true, tls_verify_client = true,
                   help = true, version = true, workers = true, shared_memory = true,
                   access_log_format = true, error_log = true, pid_file = true,
                   warn_blocking = true, _script_args_only = true }
local ACCESS_FORMATS = { moonlet = true, combined = true, json = true }
local LOG_LEVELS = { error = true, warn = true, info = true, debug = true }

-- A flag's number as written in decimal ("8080", "0.5", "1e6"), or nil: tonumber alone takes
-- "0x50", "inf" and "nan" too, which no limit means (nan and 1e30 were undefined in C's casts).
local function decimal(s)
    if type(s) ~= "string" then return nil end
    if not (s:match("^%d+%.?%d*$") or s:match("^%.%d+$") or s:match("^%d+%.?%d*[eE]%+?%d+$")) then
        return nil
    end
    local v = tonumber(s)
    return v and v < math.huge and v or nil
end

-- A failure to start, told on stderr, and on the terminal too when --error-log took stderr
local function report(msg)
    io.stderr:write(msg)
    io.stderr:flush()
    core.console(msg)
end

local function die(msg)
    report("moonlet: " .. msg .. "\n")
    core.set_exit_code(2)
    return nil
end

-- Parses argv (argv[1..]); returns opts, positional or nil after an error.
function _M.parse(argv)
    local opts, pos = {}, {}
    local i, n = 1, #argv
    while i <= n do
        local a = argv[i]
        if #pos > 0 and opts._script_args_only then
            pos[#pos + 1] = a
        elseif a == "--" then
            opts._script_args_only = true
        elseif a == "-h" or a == "--help" then
            opts.help = true
        elseif a == "-v" or a == "--version" then
            opts.version = true
        elseif a == "--access-log" then
            local nxt = argv[i + 1]
            if nxt and #pos == 0 and nxt:match("%.log$") then -- `--access-log FILE`: not a script
                return die("--access-log takes its file after '=': --access-log=" .. nxt)
            end
            opts.access_log = true
        elseif a:match("^%-%-access%-log=") then
            opts.access_log = a:sub(#"--access-log=" + 1)
        elseif a == "--reload" then
            opts.reload = true
        elseif a:match("^%-%-[%w-]+=") then
            local k, v = a:match("^(%-%-[%w-]+)=(.*)$")
            local key = value_flags[k]
            if key then
                opts[key] = v
            elseif #pos == 0 then
                return die("unknown flag " .. k .. " (see --help)")
            else -- after the script, or `test`: the script's own --name=value, or busted's
                pos[#pos + 1] = a
            end
        elseif value_flags[a] then
            if i == n then return die(a .. " needs a value") end
            opts[value_flags[a]] = argv[i + 1]
            i = i + 1
        elseif a:sub(1, 1) == "-" and a ~= "-" and (#pos == 0 or pos[1] ~= "test") then
            if #pos == 0 then return die("unknown flag " .. a .. " (see --help)") end
            pos[#pos + 1] = a -- after the script: the script's own flag
        else
            pos[#pos + 1] = a
        end
        i = i + 1
    end
    for k in pairs(numeric) do
        if opts[k] ~= nil then
            local v = decimal(opts[k])
            if not v then return die("--" .. k:gsub("_", "-") .. " wants a number") end
            opts[k] = v
        end
    end
    if opts.workers == "auto" then
        opts.workers = math.min(core.cpus(), 255)
    elseif opts.workers ~= nil then
        local w = decimal(opts.workers)
        if not w or w ~= math.floor(w) or w < 1 or w > 255 then
            return die("--workers wants a number from 1 to 255, or auto")
        end
        opts.workers = w
    end
    if opts.shared_memory ~= nil then
        local bytes = require("moonlet.shared").parse_size(opts.shared_memory)
        if not bytes or bytes < 4096 or bytes > 2 ^ 40 then
            return die("--shared-memory wants a size such as 64m or 1g (4k to 1024g)")
        end
        opts.shared_memory = bytes
    end
    if opts.host and opts.host:sub(1, 5) == "unix:" then opts.unix, opts.host = opts.host:sub(6), nil end
    if opts.unix == "" then return die("--unix wants a socket path") end
    if opts.unix_mode ~= nil then
        local ok, mode = pcall(require("moonlet.tcp").unix_mode, opts.unix_mode)
        if not ok then return die("--unix-mode wants an octal mode such as 660") end
        opts.unix_mode = mode
    end
    if opts.log_level ~= nil and not LOG_LEVELS[opts.log_level:lower()] then
        return die("--log-level is error, warn, info or debug")
    end
    if opts.access_log == "" then return die("--access-log= wants a file") end
    if opts.error_log == "" then return die("--error-log wants a file") end
    if opts.pid_file == "" then return die("--pid-file wants a file") end
    if opts.access_log_format ~= nil then
        if not ACCESS_FORMATS[opts.access_log_format:lower()] then
            return die("--access-log-format is moonlet, combined or json")
        end
        opts.access_log = opts.access_log or true
    end
    if (opts.tls_cert == nil) ~= (opts.tls_key == nil) then
        return die("--tls-cert and --tls-key go together")
    end
    if opts.tls_verify_client ~= nil and opts.tls_verify_client ~= "on"
        and opts.tls_verify_client ~= "optional" then
        return die("--tls-verify-client is on or optional")
    end
    if (opts.tls_client_ca or opts.tls_verify_client) and not opts.tls_cert then
        return die("--tls-client-ca and --tls-verify-client need --tls-cert and --tls-key")
    end
    if opts.tls_verify_client and not opts.tls_client_ca then
        return die("--tls-verify-client needs --tls-client-ca")
    end
    if opts.tls_client_ca == "" then return die("--tls-client-ca wants a file") end
    if opts.tls_cert then
        opts.tls = { cert = opts.tls_cert, key = opts.tls_key, client_ca = opts.tls_client_ca,
                     verify_client = opts.tls_verify_client }
    end
    if opts.port == nil and os.getenv("PORT") then
        opts.port = decimal(os.getenv("PORT"))
        if not opts.port then return die("PORT is not a number") end
    end
    if opts.port and (opts.port ~= math.floor(opts.port) or opts.port < 0 or opts.port > 65535) then
        return die("the port is a number from 0 to 65535")
    end
    return opts, pos
end

local function run_tests(pos)
    local argv = { [0] = "moonlet test" }
    for i = 2, #pos do argv[#argv + 1] = pos[i] end
    if not argv[1] and not core.stat("spec") and not core.stat(".busted") then
        -- (busted's own report of a missing ./spec fails inside its gtest output)
        io.stderr:write("moonlet test: no spec directory here: moonlet test DIR_OR_FILE ...\n")
        io.stdout:write("tests: 0 passed, 1 failed\n")
        core.set_exit_code(1)
        core.halt()
        return
    end
    _G.arg = argv
    local out = require "moonlet.busted_output"
    local ok, err = pcall(require("busted.runner"), { standalone = false, output = "moonlet.busted_output" })
    if not ok and err ~= nil then io.stderr:write("moonlet test: ", tostring(err), "\n") end
    local failed = out.results.failed
    core.set_exit_code(((not ok and err ~= nil) or failed > 0) and 1 or 0)
    core.halt()
end

-- --workers N: this process becomes the supervisor of N forked ones (bindings/workers.c), each of
-- which returns here to load the script and serve it on the port reserved for them all. A syntax
-- error is told once, before the fork. Returns true in a worker; false in the supervisor, once the
-- workers are gone (its exit code set), or when they could not start.
local function fork_workers(script, opts)
    local ok, err = loadfile(script)
    if not ok then
        report("moonlet: " .. tostring(err) .. "\n")
        core.set_exit_code(1)
        return false
    end
    local role, a, b = core.fork_workers(opts.workers, opts.host, opts.port, opts.unix, opts.unix_mode,
                                         opts.pid_file)
    if role == "worker" then
        opts.port = b
        return true
    end
    if role == nil then report("moonlet: " .. a .. "\n") end
    core.set_exit_code(role and a or b or 1)
    core.halt()
    return false
end

function _M.main(argv)
    local opts, pos = _M.parse(argv)
    if not opts then return end
    if opts.help then io.stdout:write(USAGE); return end
    if opts.version then io.stdout:write("moonlet ", core.version, "\n"); return end
    if opts.error_log then
        local ok, err = core.set_error_log(opts.error_log)
        if not ok then return die("--error-log " .. opts.error_log .. ": " .. err) end
    end
    if opts.log_level or opts.access_log then
        local file = type(opts.access_log) == "string" and opts.access_log or nil
        local ok, done, err = pcall(core.set_log, opts.log_level, opts.access_log and true or nil, file,
                                    opts.access_log_format)
        if not ok then return die(done) end
        if not done then return die("--access-log " .. file .. ": " .. err) end
    end
    if opts.access_log or opts.pid_file then -- a script that calls os.exit: lines written, pid file gone
        local exit = os.exit
        os.exit = function(...) -- luacheck: ignore 122
            core.before_exit()
            return exit(...)
        end
    end
    if opts.warn_blocking then core.set_warn_blocking(opts.warn_blocking) end
    if pos[1] == "test" then return run_tests(pos) end
    local script = pos[1]
    -- the pid file: alone, once listening; with --workers, the supervisor's, written by
    -- core.fork_workers once the port (or the socket) is bound, before the fork
    local function pid_file()
        if not opts.pid_file then return true end
        local ok, err = core.set_pid_file(opts.pid_file)
        if not ok then die("--pid-file " .. opts.pid_file .. ": " .. err) end
        return ok
    end
    if not script then
        io.stderr:write(USAGE)
        core.set_exit_code(2)
        return
    end
    if opts.shared_memory then assert(core.shared_memory(opts.shared_memory)) end
    local args = { [0] = script }
    for i = 2, #pos do args[i - 1] = pos[i] end
    _G.arg = args
    opts.host = opts.host or "127.0.0.1"
    opts.port = opts.port or 8080
    if opts.workers and opts.workers > 1 then
        if not fork_workers(script, opts) then return end
    end
    -- The script runs through a reload host (lua/moonlet/reload.lua), so that an app it returns can
    -- be reloaded later (SIGHUP, --reload) the way it was loaded now.
    local reload = require "moonlet.reload"
    local host = reload.new({ path = script, args = args })
    local app, kind, err = host:load()
    if not app then
        if kind == "noapp" then -- a plain script: done, or its tasks go on in the loop
            if opts.reload then core.log(1, "--reload: " .. script .. " returned no app") end
            return
        end
        host:close()
        -- a broken script, not a bad command line: 1, as for an error when it runs; and the end,
        -- though what it opened before the error (a listener, a socket) would keep the loop going
        report("moonlet: " .. tostring(err) .. "\n")
        core.set_exit_code(1)
        core.halt()
        return
    end
    local listen = {} -- the options that are app:listen's (the others are the command's own)
    for k, v in pairs(opts) do if not CLI_ONLY[k] then listen[k] = v end end
    local server, port = host:listen(listen)
    if not server then
        host:close()
        report("moonlet: " .. port .. "\n")
        core.set_exit_code(1)
        core.halt()
        return
    end
    if not (opts.workers and opts.workers > 1) and not pid_file() then -- (a worker has none)
        server:close()
        host:close()
        return
    end
    reload.set_current(host)
    local shown = opts.host:find(":", 1, true) and "[" .. opts.host .. "]" or opts.host
    local scheme = opts.tls and "https" or "http"
    if opts.unix then
        core.log(2, ("moonlet %s serving %s on unix:%s (%s)"):format(core.version, script, opts.unix,
                                                                      scheme))
    else
        core.log(2, ("moonlet %s serving %s on %s://%s:%d"):format(core.version, script, scheme, shown,
                                                                     port))
    end
    if opts.reload then
        local ok, werr = host:watch()
        if ok then
            core.log(2, ("reload: watching %d file%s"):format(#host:watched(),
                                                              #host:watched() == 1 and "" or "s"))
        else
            core.log(1, "reload: cannot watch every file: " .. tostring(werr))
        end
    end
end

return _M
