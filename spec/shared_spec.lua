-- spec/shared_spec.lua: moonlet.shared (OpenResty's lua_shared_dict) and ngx.shared: values and
-- flags, add/replace/delete, expiry (ttl, expire, get_stale, flush_expired), incr, the size bound
-- with least-recently-used eviction (forcible, safe_set's "no memory"), sizes as "8k", names and
-- sizes refused, the shared memory's lists whole under churn, bad keys and values, a handler
-- counting its hits through ngx.shared over real sockets (spec/workers_spec.lua: across workers);
-- lists (lpush, rpush, lpop, rpop, llen) with OpenResty's answers, their expiry and budget, and one
-- queue that both workers of `--workers 2` push to and pop from.
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

    it("keeps lists: lpush, rpush, lpop, rpop and llen answer as OpenResty's", function()
        local d = fresh()
        assert.same({ 1 }, { d:lpush("q", "b") })
        assert.same({ 2 }, { d:lpush("q", "a") })
        assert.same({ 3 }, { d:rpush("q", 3.5) })
        assert.same({ 3 }, { d:llen("q") })
        assert.same({ 0 }, { d:llen("none") })
        assert.same({ nil, "value is a list" }, { d:get("q") })
        assert.same({ nil, "value is a list" }, { d:get_stale("q") })
        assert.same({ nil, "not a number" }, { d:incr("q", 1) })
        assert.same({ false, "exists", false }, { d:add("q", 1) })
        assert.same({ "q" }, d:get_keys())
        assert.same({ "a" }, { d:lpop("q") })
        assert.same({ 3.5 }, { d:rpop("q") })
        assert.same({ "b" }, { d:rpop("q") })
        assert.same({ nil }, { d:lpop("q") }) -- the last value took the key with it
        assert.same({ 0 }, { d:llen("q") })
        assert.same({}, d:get_keys())
        for i = 1, 3 do assert.same(i, d:lpush("order", i)) end
        assert.same({ 3, 2, 1 }, { d:lpop("order"), d:lpop("order"), d:lpop("order") })
        for i = 1, 3 do assert.same(i, d:rpush("order", i)) end
        assert.same({ 3, 2, 1 }, { d:rpop("order"), d:rpop("order"), d:rpop("order") })
        -- a key that holds a value: the list methods leave it be
        assert(d:set("s", "text"))
        for _, m in ipairs({ "lpush", "rpush" }) do
            assert.same({ nil, "value not a list" }, { d[m](d, "s", "x") })
        end
        for _, m in ipairs({ "lpop", "rpop", "llen" }) do
            assert.same({ nil, "value not a list" }, { d[m](d, "s") })
        end
        assert.same("text", d:get("s"))
        -- values other than numbers and strings are refused with OpenResty's words; keys as ever
        for _, bad in ipairs({ {}, true, false }) do
            assert.same({ nil, "bad value type" }, { d:rpush("l", bad) })
        end
        assert.same({ nil, "bad value type" }, { d:rpush("l", nil) })
        assert.same({ 0 }, { d:llen("l") })
        assert.has_error(function() d:lpush("", 1) end, "moonlet.shared: the key is not empty")
        assert.has_error(function() d:llen({}) end, "moonlet.shared: the key is a string")
        -- set, replace and delete take a list as any value
        assert(d:rpush("l", 1))
        assert.same({ true, nil, false }, { d:replace("l", "now a string") })
        assert.same("now a string", d:get("l"))
        assert(d:rpush("m", 1))
        assert.is_true(d:delete("m"))
        assert.same({ nil }, { d:lpop("m") })
        assert(d:rpush("n", 1))
        assert(d:set("n", 2))
        assert.same(2, d:get("n"))
        assert.is_nil(d:_check())
    end)

    it("expires a list whole; a push onto an expired key starts a new list", function()
        local d = fresh()
        assert(d:rpush("l", 1))
        assert(d:rpush("l", 2))
        assert.same(0, d:ttl("l"))
        assert(d:expire("l", 0.6)) -- (wide: a loaded machine pauses)
        assert.same(3, d:rpush("l", 3)) -- a push keeps the list's expiry
        assert.is_true(d:ttl("l") > 0)
        assert(d:rpush("gone", 1))
        assert(d:expire("gone", 0.6))
        assert(d:rpush("ever", 1))
        assert(d:set("s", "v", 0.6))
        moonlet.sleep(0.7)
        assert.same({ 1 }, { d:lpush("l", "new") }) -- a new list, not the expired one
        assert.same({ "new", nil }, { d:rpop("l"), d:rpop("l") })
        assert.same({ 1 }, { d:rpush("s", 1) }) -- the expired string gave way to a list
        assert.same(1, d:flush_expired()) -- "gone"
        assert.same({ 0, nil }, { d:llen("gone"), d:lpop("gone") })
        assert.same(1, d:llen("ever"))
        d:flush_all()
        assert.same({ 0, d:capacity() }, { d:llen("ever"), d:free_space() })
        assert.is_nil(d:_check())
    end)

    it("counts each value of a list in its size; a push never evicts, a set evicts a list", function()
        local d = fresh({ size = 4096 })
        assert.same(1, d:rpush("q", "abc"))
        assert.same(4096 - (1 + 64) - (3 + 64), d:free_space()) -- the list's key, then the value
        assert.same(2, d:rpush("q", 1))
        assert.same(4096 - (1 + 64) - (3 + 64) - (8 + 64), d:free_space())
        assert.same("abc", d:lpop("q"))
        assert.same(1, d:lpop("q"))
        assert.same(4096, d:free_space())
        assert(d:set("k", 1))
        local pushed = 0
        while true do
            local len, err = d:rpush("q", pushed)
            if not len then
                assert.same({ false, "no memory" }, { len, err }) -- false, as OpenResty's
                break
            end
            pushed = len
        end
        assert.same(math.floor((4096 - (1 + 64 + 8) - (1 + 64)) / (8 + 64)), pushed)
        assert.same({ false, "no memory" }, { d:lpush("other", "x") })
        assert.same({ 0, 1 }, { d:llen("other"), d:get("k") }) -- nothing evicted for a push
        assert.same(pushed, d:llen("q"))
        assert.same({ true, nil, true }, { d:set("big", ("x"):rep(4096 - 64 - 3 - 100)) })
        assert.same({ 0, nil }, { d:llen("q"), d:get("k") }) -- the list went whole, k too
        assert.is_nil(d:_check())
    end)

    it("is one queue for both workers of --workers 2: what one pushes the other pops", function()
        local dir = test.make_dir()
        test.defer(function() test.remove_dir(dir) end)
        local path = dir .. "/queue.lua"
        assert(moonlet.fs.write(path, [[
local moonlet = require "moonlet"
local q = moonlet.shared("queue", { size = "64k" })
local app = moonlet.app()
app:get("/push/:v", function(req)
    return moonlet.worker.id() .. " " .. assert(q:rpush("jobs", req.params.v))
end)
app:get("/pop", function() return moonlet.worker.id() .. " " .. tostring(q:lpop("jobs")) end)
return app
]]))
        local p = test.start_process("--workers 2 --port 0 " .. path)
        test.defer(function() p:kill() end)
        local port = p:port()
        local pushers, poppers, lens, got = {}, {}, {}, {}
        for i = 1, 100 do -- (a connection each: both workers serve some)
            local id, len = test.request(port, "GET", "/push/" .. i).body:match("^(%d) (%d+)$")
            pushers[id] = true
            lens[i] = tonumber(len)
        end
        for i = 1, 100 do
            local id, v = test.request(port, "GET", "/pop").body:match("^(%d) (.*)$")
            poppers[id] = true
            got[i] = tonumber(v)
        end
        local want = {}
        for i = 1, 100 do want[i] = i end
        assert.same({ ["0"] = true, ["1"] = true }, pushers)
        assert.same({ ["0"] = true, ["1"] = true }, poppers)
        assert.same(want, lens) -- one list: each push made it one longer
        assert.same(want, got)  -- popped in the order pushed, whoever pushed
        assert.same("nil", test.request(port, "GET", "/pop").body:match("^%d (.*)$"))
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
