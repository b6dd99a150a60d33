-- lua/moonlet/fs.lua: moonlet.fs, files without blocking the loop. Every call runs on libuv's
-- thread pool (bindings/fs.c) while the calling task yields; failures are nil, err with a short
-- string ("not found", "permission denied", "file already exists", "not a directory", ...) and
-- the libuv code name third; a cancelled caller raises moonlet.CANCELLED.
local core = require "moonlet.core"
local check = require("moonlet.task").check

local type, error, sort = type, error, table.sort

local core_read, core_write, core_stat = core.fs_read, core.fs_write, core.fs_stat
local core_list, core_mkdir, core_remove, core_rename =
    core.fs_list, core.fs_mkdir, core.fs_remove, core.fs_rename

local _M = { _VERSION = "0.1.0" }

-- Misuse raises at the caller of the fs function (level: that many frames up from bad_arg), naming
-- the function, the argument's position and name, what it must be and what it was:
-- "moonlet.fs.stat: bad argument #2 (opts must be a table or nil, got boolean)". Extra arguments
-- are ignored, as by Lua's own functions.
local function bad_arg(level, fname, n, name, want, v)
    error(("moonlet.fs.%s: bad argument #%d (%s must be %s, got %s)"):format(fname, n, name, want,
        type(v)), level)
end

local function check_path(fname, path, n, what)
    if type(path) ~= "string" then bad_arg(4, fname, n or 1, what or "path", "a string", path) end
end

-- syntax: data, err = moonlet.fs.read(path) -- the whole file
function _M.read(path)
    check_path("read", path)
    return check(core_read(path))
end

-- syntax: ok, err = moonlet.fs.write(path, data) -- creates or truncates
function _M.write(path, data)
    check_path("write", path)
    check_path("write", data, 2, "data")
    return check(core_write(path, data, false))
end

-- syntax: ok, err = moonlet.fs.append(path, data) -- creates or appends
function _M.append(path, data)
    check_path("append", path)
    check_path("append", data, 2, "data")
    return check(core_write(path, data, true))
end

-- syntax: info, err = moonlet.fs.stat(path, { follow = true })
-- info = { size, mtime (seconds), type = "file"|"directory"|"link"|"other", mode (permissions) };
-- a symbolic link is reported as a "link" unless follow is set
function _M.stat(path, opts)
    check_path("stat", path)
    if opts ~= nil and type(opts) ~= "table" then
        bad_arg(3, "stat", 2, "opts", "a table or nil", opts)
    end
    return check(core_stat(path, opts ~= nil and opts.follow == true))
end

local function sorted(names, ...)
    if names then sort(names) end
    return names, ...
end

-- syntax: names, err = moonlet.fs.list(dir) -- the entries' names, sorted, without "." and ".."
function _M.list(dir)
    check_path("list", dir)
    return sorted(check(core_list(dir)))
end

-- syntax: ok, err = moonlet.fs.mkdir(path, mode) -- mode: permissions, 0777 (511) by default, less
-- the umask
function _M.mkdir(path, mode)
    check_path("mkdir", path)
    if mode ~= nil and type(mode) ~= "number" then
        bad_arg(3, "mkdir", 2, "mode", "a number or nil", mode)
    end
    return check(core_mkdir(path, mode))
end

-- syntax: ok, err = moonlet.fs.remove(path) -- a file, a link or an empty directory
function _M.remove(path)
    check_path("remove", path)
    return check(core_remove(path))
end

-- syntax: ok, err = moonlet.fs.rename(from, to) -- replaces `to` when it is a file
function _M.rename(from, to)
    check_path("rename", from)
    check_path("rename", to, 2, "target")
    return check(core_rename(from, to))
end

return _M
