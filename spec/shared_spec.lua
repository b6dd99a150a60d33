-- spec/shared_spec.lua: moonlet.shared (OpenResty's lua_shared_dict) and ngx.shared: values and
-- flags, add/replace/delete, expiry (ttl, expire, get_stale, flush_expired), incr, the size bound
-- with least-recently-used eviction (forcible, safe_set's "no memory"), sizes as "8k", names and
-- sizes refused, the shared memory's lists whole under churn, bad keys and values, and a handler
-- counting its hits through ngx.shared over real sockets (spec/workers_spec.lua: across workers).
local moonlet = require "moonlet"
local test = require "moonlet.test"

local n = 0
local function fresh(opts) -- a dictionary of a name no other test used
    n = n + 1
    return moonlet.shared("spec" .. n, opts)
end

describe("moonlet.shared", function()
    it("keeps strings, numbers and booleans with their flags; add, replace, delete, keys", function()
        local d = fresh()
        assert.same(d, moonlet.shared("spec" .. n)) -- one dictionary per name
        assert.same({ true, nil, false }, { d:set("s", "text", 0, 7) })
        assert(d:set("n", 42.5))
        assert(d:set("b", false))
        assert.same({ "text", 7 }, { d:get("s") })
        assert.same({ 42.5, false }, { d:get("n"), d:get("b") })
        assert.is_nil(d:get("nothing"))
        assert.same({ false, "exists", false }, { d:add("s", "other") })
        assert.same({ false, "not found", false }, { d:replace("x", 1) })
        assert(d:replace("s", "new"))
        assert(d:add("x", 1))
        assert.same({ "new", 1 }, { d:get("s"), d:get("x") })
        assert.is_true(d:delete("x")) -- (lua-resty-lock's unlock reads it)
        assert.is_true(d:delete("x"))
        assert(d:set("n", nil)) -- set to nil deletes
        assert.same({ false, "attempt to add or replace nil values", false }, { d:add("y", nil) })
        assert.same({ false, "attempt to add or replace nil values", false }, { d:replace("s", nil) })
        assert(d:set("f0", "v", 0, 0))
        assert.same(1, select("#", d:get("f0"))) -- flags 0 are none: only the value comes back
        assert.same({ nil, nil }, { d:get("x"), d:get("n") })
        local keys = d:get_keys(0)
        table.sort(keys)
        assert.same({ "b", "f0", "s" }, keys)
        assert.same(1, #d:get_keys(1))
        d:flush_all()
        assert.same({ {}, d:capacity() }, { d:get_keys(), d:free_space() })
    end)

    it("expires entries: ttl, expire, get_stale, flush_expired", function()
        local d = fresh()
        assert(d:set("short", "v", 0.6)) -- (wide: a loaded machine pauses)
        assert(d:set("long", "v", 60))
        assert(d:set("ever", "v"))
        local ttl = d:ttl("short")
        assert.is_true(ttl > 0 and ttl <= 0.6)
        assert.same(0, d:ttl("ever"))
        assert.same({ nil, "not found" }, { d:ttl("none") })
        assert(d:expire("ever", 0.6))
        assert(d:expire("long", 0)) -- never, now
        moonlet.sleep(0.7)
        assert.same({ "v", nil, true }, { d:get_stale("short") })
        assert.is_nil(d:get("short"))           -- dropped once met
        assert.is_nil(d:get_stale("short"))
        assert.same(1, d:flush_expired())       -- "ever"
        assert.same({ "v", 0 }, { d:get("long"), d:ttl("long") })
        assert.same({ nil, "not found" }, { d:expire("short", 1) })
    end)

    it("increments numbers, from init when asked, keeping the entry's expiry", function()
        local d = fresh()
        assert.same({ nil, "not found" }, { d:incr("c", 1) })
        assert.same(10, d:incr("c", 1, 9))
        assert.same(7, d:incr("c", -3))
        assert(d:set("s", "text"))
        assert.same({ nil, "not a number" }, { d:incr("s", 1) })
        assert.same(9, d:incr("c", "2")) -- a number in a string, as OpenResty's
        assert.has_error(function() d:incr("u", 1, nil, 5) end,
                         "moonlet.shared: incr's init_ttl goes with init")
        assert.same(1, d:incr("t", 1, 0, 0.6)) -- (wide: a loaded machine pauses)
        assert.same(2, d:incr("t", 1))
        assert.is_true(d:ttl("t") > 0)
        moonlet.sleep(0.7)
        assert.is_nil(d:get("t"))
    end)

    it("stays within its size, the least recently used going first", function()
        local d = fresh({ size = 4 * (64 + 2 + 8) }) -- room for 4 numbers under 2-byte keys
        for i = 1, 4 do assert.same({ true, nil, false }, { d:set("k" .. i, i) }) end
        assert.same(0, d:free_space())
        assert.same(1, d:get("k1"))             -- k1 used last now: k2 is the oldest
        assert.same({ true, nil, true }, { d:set("k5", 5) }) -- forcible: k2 went
        assert.same({ 1, nil, 3, 5 }, { d:get("k1"), d:get("k2"), d:get("k3"), d:get("k5") })
        assert.same({ false, "no memory", false }, { d:safe_set("k6", 6) })
        assert.same({ false, "exists", false }, { d:safe_add("k1", 1) })
        assert.same({ false, "no memory", false }, { d:set("big", ("x"):rep(1000)) })
        assert.same(5, d:get("k5"))             -- a value that can never fit evicts nothing
        -- entries past their time make room before any live one is evicted, safe_set's included
        d:flush_all()
        for i = 1, 3 do assert(d:set("e" .. i, i, 0.05)) end
        assert(d:set("live", 1))
        moonlet.sleep(0.1)
        assert.same({ true, nil, false }, { d:safe_set("k7", 7) })
        assert.same({ true, nil, false }, { d:set("k8", 8) })
        assert.same({ 1, 7, 8 }, { d:get("live"), d:get("k7"), d:get("k8") })
    end)

    it("refuses keys that are not strings, empty keys and values of other types", function()
        local d = fresh()
        assert.has_error(function() d:get({}) end, "moonlet.shared: the key is a string")
        assert.has_error(function() d:set("", 1) end, "moonlet.shared: the key is not empty")
        assert.has_error(function() d:set("t", {}) end,
                         "moonlet.shared: a value is a string, a number, a boolean or nil")
        assert.has_error(function() d:set("t", 1, -1) end,
                         "moonlet.shared: exptime is a number of seconds >= 0")
        for _, bad in ipairs({ -1, 1.5, 2 ^ 32, "1" }) do
            assert.has_error(function() d:set("t", 1, 0, bad) end,
                             "moonlet.shared: flags is a whole number from 0 to 2^32 - 1")
        end
        assert(d:set("t", 1, 0, 2 ^ 32 - 1))
        assert.same({ 1, 2 ^ 32 - 1 }, { d:get("t") })
        assert(d:set(5, "number keys become strings"))
        assert.same("number keys become strings", d:get("5"))
    end)

    it("takes sizes as nginx writes them; refuses a size or a name it cannot hold", function()
        assert.same(8192, fresh({ size = "8k" }):capacity())
        assert.same(2 * 1024 * 1024, fresh({ size = "2m" }):capacity())
        assert.same(require("moonlet.shared").DEFAULT_SIZE, fresh():capacity())
        assert.has_error(function() fresh({ size = "lots" }) end, "moonlet.shared: size is a number of bytes")
        assert.has_error(function() moonlet.shared(("n"):rep(128)) end,
                         "moonlet.shared: a name is at most 127 bytes")
        assert.has_error(function() moonlet.shared("a\0b") end, "moonlet.shared: a name holds no NUL byte")
        assert.has_error(function() fresh({ size = "1g" }) end,
                         "moonlet.shared: size is from 1 byte to 512 MiB")
        local ok, err = pcall(fresh, { size = "512m" }) -- 2 GiB of heap: past the 1 GiB default
        assert.is_false(ok)
        assert.truthy(err:find("moonlet --shared-memory SIZE makes more", 1, true), err)
    end)

    it("lives in the shared memory that --shared-memory sizes; a bad size exits 2", function()
        local dir = test.make_dir()
        test.defer(function() test.remove_dir(dir) end)
        local path = dir .. "/big.lua"
        assert(moonlet.fs.write(path, [[
local d = require("moonlet").shared("big", { size = "1m" })
print("capacity " .. d:capacity())
]]))
        local function run(args) -- its exit code and output
            local p = test.start_process(args .. " " .. path)
            test.defer(function() p:kill() end)
            return p:wait(10), p:output()
        end
        local code, out = run("--shared-memory 1m") -- a 1m dictionary takes 4m of it
        assert.same(1, code)
        assert.truthy(out:find('no room for "big"', 1, true), out)
        code, out = run("--shared-memory=8m")
        assert.same(0, code)
        assert.truthy(out:find("capacity 1048576", 1, true), out)
        code, out = run("--shared-memory lots")
        assert.same(2, code)
        assert.truthy(out:find("--shared-memory wants a size", 1, true), out)
    end)

    it("keeps its lists and blocks whole under churn of mixed sizes", function()
        local d = fresh({ size = "32k" })
        local forcible_seen = false
        for i = 1, 3000 do
            local v = ("x"):rep((i * 7919) % (i % 3 == 0 and 2000 or 90))
            local short = i % 5 == 0 -- (these may expire before they are read)
            local ok, err, forcible = d:set("k" .. i, v, short and 0.001 or 0)
            assert.is_true(ok, err)
            forcible_seen = forcible_seen or forcible
            if not short then assert.same(v, d:get("k" .. i)) end
            if i % 100 == 0 then d:delete("k" .. (i - 50)) end
        end
        assert.is_true(forcible_seen)
        assert.is_nil(d:_check())
        assert.is_true(d:free_space() >= 0 and d:free_space() <= 32 * 1024)
        d:flush_all()
        assert.same(32 * 1024, d:free_space())
        assert.is_nil(d:_check())
    end)

    it("is ngx.shared.NAME in moonlet.ngx: a handler counts its hits there", function()
        local ngx = require("moonlet.ngx").get()
        assert.same(moonlet.shared("hits"), ngx.shared.hits)
        local app = moonlet.app():get("/hit", function()
            return tostring(ngx.shared.hits:incr("n", 1, 0))
        end)
        local port = test.serving(app)
        local got = {}
        for i = 1, 3 do got[i] = test.request(port, "GET", "/hit").body end
        assert.same({ "1", "2", "3" }, got)
    end)
end)
