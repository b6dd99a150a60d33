-- spec/fs_spec.lua: moonlet.fs, files on the thread pool: round trips, stat, list, mkdir, remove,
-- rename, errors as nil, err, a 20 MB file, many reads at once, the loop serving meanwhile, and
-- cancellation leaving no request, file descriptor or Lua memory behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local fs = moonlet.fs

-- The number of file descriptors this process has open (/dev/fd is /proc/self/fd).
local function fd_count()
    local names = assert(fs.list("/dev/fd"))
    return #names
end

local function settle(resources)
    assert.truthy(test.wait_until(function() return core.stats().resources == resources end, 10))
    collectgarbage()
    collectgarbage()
end

local function is_root()
    local p = io.popen("id -u")
    local uid = p:read("*l")
    p:close()
    return uid == "0"
end

describe("moonlet.fs", function()
    local dir
    before_each(function()
        dir = os.tmpname()
        os.remove(dir)
        assert.is_true(fs.mkdir(dir))
    end)
    after_each(function()
        os.execute("chmod -R u+rwx " .. dir .. " 2>/dev/null; rm -rf " .. dir)
    end)

    it("writes, reads back, appends and truncates", function()
        local p = dir .. "/a.txt"
        assert.is_true(fs.write(p, "hello"))
        assert.same("hello", fs.read(p))
        assert.is_true(fs.append(p, ", world"))
        assert.same("hello, world", fs.read(p))
        assert.is_true(fs.write(p, "x")) -- write truncates
        assert.same("x", fs.read(p))
        assert.is_true(fs.append(dir .. "/new.txt", "created by append"))
        assert.same("created by append", fs.read(dir .. "/new.txt"))
        assert.is_true(fs.write(p, ""))
        assert.same("", fs.read(p))
    end)

    it("keeps every byte value, NUL included", function()
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local s = table.concat(bytes):rep(17) .. "\0\r\n"
        assert.is_true(fs.write(dir .. "/bin", s))
        assert.same(s, fs.read(dir .. "/bin"))
        local f = io.open(dir .. "/bin", "rb") -- the bytes on disk, read another way
        assert.same(s, f:read("*a"))
        f:close()
    end)

    it("reads files whose size stat does not know (/proc)", function()
        local s = assert(fs.read("/proc/self/status"))
        assert.truthy(s:find("Name:", 1, true))
    end)

    it("stats files, directories and links", function()
        local p = dir .. "/f"
        assert.is_true(fs.write(p, "12345"))
        os.execute("chmod 640 " .. p)
        local st = assert(fs.stat(p))
        assert.same("file", st.type)
        assert.same(5, st.size)
        assert.same(tonumber("640", 8), st.mode)
        assert.truthy(math.abs(st.mtime - os.time()) < 60, st.mtime)
        local d = assert(fs.stat(dir))
        assert.same("directory", d.type)
        assert.truthy(os.execute("ln -s f " .. dir .. "/l") == 0)
        assert.same("link", fs.stat(dir .. "/l").type)
        local followed = assert(fs.stat(dir .. "/l", { follow = true }))
        assert.same({ "file", 5 }, { followed.type, followed.size })
        assert.same("other", fs.stat("/dev/null").type)
    end)

    it("lists a directory, sorted, without . and ..", function()
        assert.same({}, fs.list(dir))
        for _, name in ipairs({ "b", "a", "c.txt", ".hidden" }) do
            assert.is_true(fs.write(dir .. "/" .. name, name))
        end
        assert.is_true(fs.mkdir(dir .. "/sub"))
        assert.same({ ".hidden", "a", "b", "c.txt", "sub" }, fs.list(dir))
    end)

    it("makes, renames and removes files and directories", function()
        assert.is_true(fs.mkdir(dir .. "/d", tonumber("700", 8)))
        assert.same(tonumber("700", 8), fs.stat(dir .. "/d").mode)
        assert.is_true(fs.write(dir .. "/d/x", "x"))
        assert.is_true(fs.rename(dir .. "/d/x", dir .. "/y"))
        assert.same({ nil, "not found", "ENOENT" }, { fs.read(dir .. "/d/x") })
        assert.same("x", fs.read(dir .. "/y"))
        assert.is_true(fs.write(dir .. "/z", "z"))
        assert.is_true(fs.rename(dir .. "/z", dir .. "/y")) -- replaces a file
        assert.same("z", fs.read(dir .. "/y"))
        assert.is_true(fs.remove(dir .. "/y"))
        assert.is_true(fs.remove(dir .. "/d")) -- an empty directory
        assert.same({}, fs.list(dir))
    end)

    it("returns nil, err with short stable messages", function()
        local missing = dir .. "/missing"
        assert.same({ nil, "not found", "ENOENT" }, { fs.read(missing) })
        assert.same({ nil, "not found", "ENOENT" }, { fs.stat(missing) })
        assert.same({ nil, "not found", "ENOENT" }, { fs.list(missing) })
        assert.same({ nil, "not found", "ENOENT" }, { fs.remove(missing) })
        assert.same({ nil, "not found", "ENOENT" }, { fs.rename(missing, dir .. "/x") })
        assert.same({ nil, "not found", "ENOENT" }, { fs.write(missing .. "/x", "data") })
        assert.same({ nil, "not found", "ENOENT" }, { fs.mkdir(missing .. "/x") })
        assert.same({ nil, "file already exists", "EEXIST" }, { fs.mkdir(dir) })
        assert.is_true(fs.write(dir .. "/file", "f"))
        assert.same({ nil, "not a directory", "ENOTDIR" }, { fs.list(dir .. "/file") })
        assert.same({ nil, "not a directory", "ENOTDIR" }, { fs.read(dir .. "/file/x") })
        assert.same({ nil, "illegal operation on a directory", "EISDIR" }, { fs.read(dir) })
        assert.same({ nil, "directory not empty", "ENOTEMPTY" }, { fs.remove(dir) })
    end)

    it("refuses a path with a NUL byte instead of using the part before it", function()
        local p = dir .. "/a.txt"
        assert.is_true(fs.write(p, "secret"))
        local bad = p .. "\0.png"
        local einval = { nil, "invalid argument", "EINVAL" }
        assert.same(einval, { fs.read(bad) })
        assert.same(einval, { fs.write(dir .. "/b.txt\0.png", "x") })
        assert.same(einval, { fs.append(bad, "x") })
        assert.same(einval, { fs.stat(bad) })
        assert.same(einval, { fs.list(dir .. "\0") })
        assert.same(einval, { fs.mkdir(dir .. "/d\0x") })
        assert.same(einval, { fs.remove(bad) })
        assert.same(einval, { fs.rename(bad, dir .. "/c.txt") })
        assert.same(einval, { fs.rename(p, dir .. "/c.txt\0") })
        assert.same({ "a.txt" }, fs.list(dir))
        assert.same({ "secret" }, { fs.read(p) })
    end)

    it("returns nil, permission denied", function()
        local p = dir .. "/secret"
        assert.is_true(fs.write(p, "s"))
        os.execute("chmod 000 " .. p)
        if is_root() then p = "/proc/1/mem" end -- root reads any mode; not another process's memory
        assert.same({ nil, "permission denied", "EACCES" }, { fs.read(p) })
    end)

    it("raises on misuse with a message naming the function and the argument", function()
        assert.has_error(function() fs.read(nil) end,
            "moonlet.fs.read: bad argument #1 (path must be a string, got nil)")
        assert.has_error(function() fs.write(dir .. "/x", nil) end,
            "moonlet.fs.write: bad argument #2 (data must be a string, got nil)")
        assert.has_error(function() fs.append(dir .. "/x", 1) end,
            "moonlet.fs.append: bad argument #2 (data must be a string, got number)")
        assert.has_error(function() fs.rename("a", 1) end,
            "moonlet.fs.rename: bad argument #2 (target must be a string, got number)")
        assert.has_error(function() fs.mkdir(dir .. "/m", "755") end,
            "moonlet.fs.mkdir: bad argument #2 (mode must be a number or nil, got string)")
        assert.has_error(function() fs.list({}) end,
            "moonlet.fs.list: bad argument #1 (path must be a string, got table)")
        assert.has_error(function() fs.remove(false) end,
            "moonlet.fs.remove: bad argument #1 (path must be a string, got boolean)")
        -- stat(path, opts): opts is a table ({ follow = true }), not a flag
        assert.has_error(function() fs.stat(dir, true) end,
            "moonlet.fs.stat: bad argument #2 (opts must be a table or nil, got boolean)")
        assert.has_error(function() fs.stat(dir, "follow") end,
            "moonlet.fs.stat: bad argument #2 (opts must be a table or nil, got string)")
        assert.equal("directory", fs.stat(dir, { follow = true }).type)
        assert.equal("directory", fs.stat(dir, nil).type)
    end)

    it("refuses to read a FIFO or a device instead of holding a pool thread in open or read", function()
        local fifo = dir .. "/fifo"
        assert.equal(0, os.execute("mkfifo " .. fifo))
        -- a read that did block in open(2) (no writer) is released by an open for read and write
        test.defer(function() os.execute("sh -c ': <>" .. fifo .. "'") end)
        local r0 = core.stats().resources
        local fd0 = fd_count()
        local not_regular = { nil, "not a regular file", "EFTYPE" }
        assert.same(not_regular, { moonlet.timeout(10, fs.read, fifo) })
        assert.same(not_regular, { fs.read("/dev/null") })
        settle(r0)
        assert.equal(fd0, fd_count()) -- the file opened to check it was closed
        assert.is_true(fs.write(dir .. "/f", "x")) -- the pool still serves
        assert.same({ "x" }, { fs.read(dir .. "/f") })
    end)

    it("returns nil, \"not enough memory\" for a file Lua cannot hold, without a panic", function()
        if test.binary():find("asan", 1, true) then
            return pending("ASan reserves terabytes of address space: ulimit -v cannot apply")
        end
        -- a 400 MB sparse file, read by a moonlet whose address space (ulimit -v) holds the C
        -- buffer or the Lua string but not both: the string's allocation fails in the read's
        -- callback, outside any Lua call that could catch it
        local big = dir .. "/big"
        local f = assert(io.open(big, "wb"))
        f:seek("set", 400 * 1024 * 1024 - 1)
        f:write("x")
        f:close()
        local script = dir .. "/read.lua"
        f = assert(io.open(script, "wb"))
        f:write(("local d, err = require('moonlet').fs.read(%q)\n"):format(big),
            "io.write('result: ', tostring(d and #d), ' ', tostring(err), '\\n')\n")
        f:close()
        local p = io.popen(("ulimit -v 700000; %s %s 2>&1; echo \"exit: $?\""):format(test.binary(),
            script))
        local out = p:read("*a")
        p:close()
        assert.equal("result: nil not enough memory\nexit: 0\n", out)
    end)

    it("writes and reads a 20 MB file while the loop keeps ticking", function()
        local chunk = {}
        for i = 1, 1024 do chunk[i] = string.char(i % 251) end
        local big = table.concat(chunk):rep(20 * 1024) -- 20 MiB
        local ticks = 0
        local ticker = moonlet.spawn(function()
            while true do
                moonlet.sleep(0.001)
                ticks = ticks + 1
            end
        end)
        finally(function() ticker:cancel() end)
        local p = dir .. "/big"
        assert.is_true(fs.write(p, big))
        assert.same(#big, fs.stat(p).size)
        local back = assert(fs.read(p))
        assert.same(#big, #back)
        assert.is_true(back == big)
        assert.truthy(ticks >= 1, ticks) -- the ticker ran while the task waited on the disk
    end)

    it("serves many reads at once", function()
        for i = 1, 20 do assert.is_true(fs.write(dir .. "/f" .. i, ("%d "):format(i):rep(i * 100))) end
        local fns = {}
        for i = 1, 200 do
            local n = (i - 1) % 20 + 1
            fns[i] = function() return fs.read(dir .. "/f" .. n) end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 200 do
            local n = (i - 1) % 20 + 1
            assert.same(("%d "):format(n):rep(n * 100), results[i])
        end
    end)

    it("waits on files from an HTTP handler without blocking other requests", function()
        local p = dir .. "/page.html"
        assert.is_true(fs.write(p, "<h1>moonlet</h1>"))
        local app = moonlet.app()
        app:get("/page", function() return assert(fs.read(p)) end)
        local server, port = test.serve(app)
        finally(function() server:close() end)
        local results = moonlet.gather({
            function() return test.request(port, "GET", "/page").body end,
            function() return test.request(port, "GET", "/page").body end,
        })
        assert.same({ "<h1>moonlet</h1>", "<h1>moonlet</h1>" }, results)
    end)

    describe("cancellation", function()
        it("cancels a read: the caller gets CANCELLED and the request ends by itself", function()
            local p = dir .. "/c"
            assert.is_true(fs.write(p, string.rep("c", 1024 * 1024)))
            settle(core.stats().resources)
            local resources, fds = core.stats().resources, fd_count()
            local t = moonlet.spawn(fs.read, p)
            assert.same(resources + 1, core.stats().resources) -- the read is in flight
            assert.is_true(t:cancel())
            assert.same({ false, "cancelled" }, { t:join() })
            settle(resources)
            assert.same(fds, fd_count())
        end)

        it("cancels reads and writes midway, with the file open, without leaking it", function()
            local big = string.rep("w", 32 * 1024 * 1024)
            settle(core.stats().resources)
            local resources, fds = core.stats().resources, fd_count()
            local caught = 0
            for i = 1, 6 do
                local t = i % 2 == 0 and moonlet.spawn(fs.read, dir .. "/w" .. (i - 1))
                    or moonlet.spawn(fs.write, dir .. "/w" .. i, big)
                while not t:is_done() do -- cancel once the file is open: past the open step
                    if fd_count() > fds then
                        if t:cancel() then caught = caught + 1 end
                        break
                    end
                    moonlet.sleep(0)
                end
                t:join()
            end
            settle(resources)
            assert.same(fds, fd_count())
            assert.truthy(caught > 0) -- at least one was cancelled with its file open
        end)

        it("times out through moonlet.timeout", function()
            local r = { moonlet.timeout(0, fs.read, "/proc/self/status") }
            assert.truthy(r[1] == nil and r[2] == "timeout" or type(r[1]) == "string")
        end)

        it("leaves no request, descriptor, task or Lua memory behind", function()
            local p = dir .. "/leak"
            assert.is_true(fs.write(p, string.rep("l", 64 * 1024)))
            for _ = 1, 10 do fs.read(p) end -- warm up
            settle(core.stats().resources)
            local before = test.settled_stats()
            local fds = fd_count()
            local mem0 = collectgarbage("count")
            local ops = {
                function() return fs.read(p) end,
                function() return fs.stat(p) end,
                function() return fs.list(dir) end,
                function() return fs.write(dir .. "/tmp", "t") end,
                function() return fs.mkdir(dir .. "/sub") end,
                function() return fs.remove(dir .. "/sub") end,
                function() return fs.read(dir .. "/missing") end,
            }
            for i = 1, 1400 do
                local op = ops[i % #ops + 1]
                if i % 2 == 0 then
                    op()
                else
                    local t = moonlet.spawn(op)
                    if i % 4 == 1 then moonlet.sleep(0) end
                    t:cancel()
                end
            end
            settle(before.resources)
            test.assert_baseline(before)
            assert.same(fds, fd_count())
            assert.truthy(collectgarbage("count") - mem0 < 256) -- KiB: no growth with the count
        end)
    end)
end)
