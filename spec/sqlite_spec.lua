-- spec/sqlite_spec.lua: moonlet.sqlite against real database files in a temporary directory:
-- typed results, bound parameters, errors, transactions, work off the loop thread, concurrent
-- writers, cancellation and timeouts, and that nothing is left behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local sqlite = require "moonlet.sqlite"

local function settle()
    moonlet.sleep(0)
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
    moonlet.sleep(0.01)
end

-- The first two results of a call: the value (or nil) and the error.
local function two(a, b) return { a, b } end

local dir
local function tmpdb(name)
    if not dir then
        dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. dir) == 0)
    end
    local path = dir .. "/" .. name .. ".db"
    os.remove(path)
    test.defer(function()
        os.remove(path)
        os.remove(path .. "-wal")
        os.remove(path .. "-shm")
    end)
    return path
end

local function open(name, opts)
    local db = assert(sqlite.open(name == ":memory:" and name or tmpdb(name), opts))
    test.defer(function() db:close() end)
    return db
end

-- A statement that keeps SQLite busy for seconds (a recursive count to n).
local SLOW = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) " ..
             "SELECT count(*) AS n FROM c"

describe("moonlet.sqlite", function()
    teardown(function()
        if dir then os.execute("rm -rf " .. dir) end
    end)

    it("is moonlet.sqlite and creates the file in WAL mode", function()
        assert.equal(sqlite, moonlet.sqlite)
        local path = tmpdb("create")
        local db = assert(sqlite.open(path))
        test.defer(function() db:close() end)
        assert.truthy(io.open(path)):close()
        assert.same({ { journal_mode = "wal" } }, db:query("PRAGMA journal_mode"))
        assert.same({ { foreign_keys = 1 } }, db:query("PRAGMA foreign_keys"))
    end)

    it("returns arrays of rows with typed values, NULL as nil", function()
        local db = open("typed")
        assert(db:exec("CREATE TABLE t(i INTEGER, r REAL, s TEXT, b BLOB, n INT)"))
        assert.same({ 1, 1 }, { db:exec("INSERT INTO t VALUES (42, 2.5, 'hi', x'00ff01', NULL)") })
        local rows, err = db:query("SELECT * FROM t")
        assert.is_nil(err)
        assert.same({ { i = 42, r = 2.5, s = "hi", b = "\0\255\1" } }, rows)
        assert.equal("number", type(rows[1].i))
        assert.is_nil(rows[1].n)
        assert.same({}, db:query("SELECT * FROM t WHERE i = ?", 7))
        assert.same({ { x = -9007199254740991, y = 1e300 } },
                    db:query("SELECT -9007199254740991 AS x, 1e300 AS y"))
    end)

    it("returns INTEGER values exactly as decimal strings with big_numbers = \"string\" or \"auto\"",
       function()
        local big = { "9007199254740993", "-9223372036854775808", "9223372036854775807",
                      "9007199254740992", "-9007199254740993", "42" }
        local function fill(db)
            assert(db:exec("CREATE TABLE n(id INTEGER PRIMARY KEY, i INTEGER, d TEXT)"))
            for k, v in ipairs(big) do
                -- a decimal string bound to an INTEGER column is stored as that integer, exactly
                assert(db:exec("INSERT INTO n(id, i) VALUES (?, ?)", k, v))
            end
            assert(db:exec("INSERT INTO n(id, d) VALUES (?, ?)", 7, "12345678901234567890.123456789"))
            -- last_insert_id: an INTEGER too
            local r = { db:exec("INSERT INTO n(id) VALUES (?)", "9223372036854775807") }
            assert(db:exec("DELETE FROM n WHERE id = ?", "9223372036854775807"))
            return r
        end
        -- the default: numbers, which round beyond 2^53 (a contract: unchanged)
        local db = open("big_default")
        assert.same({ 1, 9223372036854775807 }, fill(db))
        local rows = assert(db:query("SELECT i, typeof(i) AS t, CAST(i AS TEXT) AS s FROM n " ..
                                     "WHERE id <= 6 ORDER BY id"))
        for k, v in ipairs(big) do
            assert.same({ i = tonumber(v), t = "integer", s = v }, rows[k]) -- stored exactly
        end
        assert.equal("number", type(rows[1].i))
        -- "string": every INTEGER as its digits, last_insert_id too; TEXT keeps a decimal whole
        db = open("big_string", { big_numbers = "string" })
        assert.same({ 1, "9223372036854775807" }, fill(db))
        rows = assert(db:query("SELECT id, i, d FROM n ORDER BY id"))
        for k, v in ipairs(big) do assert.same({ id = tostring(k), i = v }, rows[k]) end
        assert.same({ id = "7", d = "12345678901234567890.123456789" }, rows[7])
        assert.same({ 1, "8" }, { db:exec("INSERT INTO n(id) VALUES (8)") })
        assert.same({ { id = "3" } }, db:query("SELECT id FROM n WHERE i = ?", "9223372036854775807"))
        assert.same({ { id = "1" } }, db:query("SELECT id FROM n WHERE i = ?", "9007199254740993"))
        assert.same({ { v = "-9223372036854775808", f = 1.5 } },
                    db:query("SELECT min(i) AS v, 1.5 AS f FROM n"))
        -- "auto": numbers up to 2^53, strings beyond
        db = open("big_auto", { big_numbers = "auto" })
        assert.same({ 1, "9223372036854775807" }, fill(db))
        rows = assert(db:query("SELECT i FROM n WHERE id <= 6 ORDER BY id"))
        assert.same({ { i = "9007199254740993" }, { i = "-9223372036854775808" },
                      { i = "9223372036854775807" }, { i = 9007199254740992 },
                      { i = "-9007199254740993" }, { i = 42 } }, rows)
        assert.same({ 1, 8 }, { db:exec("INSERT INTO n(id) VALUES (8)") })
        assert.has_error(function() sqlite.open(":memory:", { big_numbers = "exact" }) end,
                         'moonlet.sqlite.open: big_numbers must be "number", "string" or "auto"')
    end)

    it("binds LuaJIT's 64-bit integers (1LL, 2ULL) exactly, as INTEGER", function()
        local ffi = require "ffi"
        local above = ffi.new("int64_t", 2 ^ 53) + 1 -- 9007199254740993LL: no double holds it
        local lowest = -ffi.new("int64_t", 2 ^ 62) * 2
        local db = open("int64", { big_numbers = "string" })
        assert(db:exec("CREATE TABLE n(id INTEGER PRIMARY KEY, i INTEGER)"))
        assert.same({ 1, "9007199254740993" },
                    { db:exec("INSERT INTO n(id, i) VALUES (?, ?)", above, lowest) })
        assert.same({ { id = "9007199254740993", i = "-9223372036854775808", t = "integer" } },
                    db:query("SELECT id, i, typeof(i) AS t FROM n WHERE id = :id", { id = above }))
        assert.same({ { v = "5", t = "integer" } }, db:query("SELECT ? AS v, typeof(?) AS t",
                                                              ffi.new("uint64_t", 5), ffi.new("uint64_t", 5)))
        -- a uint64_t above int64's range has no INTEGER; other cdata are no parameters at all
        assert.error_matches(function() db:query("SELECT ?", ffi.new("uint64_t", 0) - 1) end,
            "moonlet.sqlite: 18446744073709551615ULL does not fit SQLite's 64-bit integers", 1, true)
        assert.error_matches(function() db:query("SELECT ?", ffi.new("int32_t", 3)) end,
            "moonlet.sqlite: cannot bind a cdata", 1, true)
    end)

    it("binds ? and :name parameters and never splices them into the SQL", function()
        local db = open("params")
        assert(db:exec("CREATE TABLE todo(id INTEGER PRIMARY KEY, title TEXT, done INT)"))
        local evil = "x'); DROP TABLE todo; --"
        assert.same({ 1, 1 }, { db:exec("INSERT INTO todo(title, done) VALUES (?, ?)", evil, false) })
        assert.same({ 1, 2 }, { db:exec("INSERT INTO todo(title, done) VALUES (:t, :d)",
                                        { t = "two", d = true }) })
        assert(db:exec("INSERT INTO todo(title, done) VALUES (?, ?)", nil, 0))
        assert.same({ { id = 1, title = evil, done = 0 }, { id = 3, done = 0 } },
                    db:query("SELECT * FROM todo WHERE done = ? ORDER BY id", 0))
        assert.same({ { title = "two" } }, db:query("SELECT title FROM todo WHERE id = :id", { id = 2 }))
        assert.same({ { v = 1.5, s = "7" } }, db:query("SELECT ? AS v, ? AS s", 1.5, "7"))
        assert.same({ { a = 1, b = "x" } }, db:query("SELECT @a AS a, $b AS b", { a = 1, b = "x" }))
        -- a named parameter missing from the table is NULL
        assert.same({ {} }, db:query("SELECT :nothing AS v", {}))
    end)

    it("binds an empty string as empty TEXT, never as NULL", function()
        local db = open("empty")
        assert(db:exec("CREATE TABLE e(x TEXT NOT NULL)"))
        assert.same({ 1, 1 }, { db:exec("INSERT INTO e VALUES (?)", "") })
        assert.same({ { x = "", t = "text" } }, db:query("SELECT x, typeof(x) AS t FROM e"))
        assert.same({ { a = "", b = "text", n = 0 } },
                    db:query("SELECT ? AS a, typeof(?) AS b, ? IS NULL AS n", "", "", ""))
        assert.same({ { a = "", b = "text" } }, db:query("SELECT :v AS a, typeof(:v) AS b", { v = "" }))
    end)

    it("reports errors as nil, SQLite's message; a constraint violation says which", function()
        local db = open("errors")
        assert(db:exec("CREATE TABLE u(id INTEGER PRIMARY KEY, email TEXT UNIQUE NOT NULL)"))
        assert(db:exec("INSERT INTO u(email) VALUES (?)", "a@x"))
        local ok, err = db:exec("INSERT INTO u(email) VALUES (?)", "a@x")
        assert.is_nil(ok)
        assert.equal("UNIQUE constraint failed: u.email", err)
        assert.same({ nil, "NOT NULL constraint failed: u.email" },
                    two(db:exec("INSERT INTO u(email) VALUES (NULL)")))
        local rows, e2 = db:query("SELEC nonsense")
        assert.is_nil(rows)
        assert.truthy(e2:find("syntax error", 1, true))
        assert.same({ nil, "no such table: nope" }, two(db:query("SELECT * FROM nope")))
        assert.same({ nil, "expected 1 parameters, got 2" }, two(db:query("SELECT ?", 1, 2)))
        assert.has_error(function() db:query("SELECT ?", {}, 2) end,
                         "moonlet.sqlite: cannot bind a table")
        -- the connection goes on after errors
        assert.same({ { n = 1 } }, db:query("SELECT count(*) AS n FROM u"))
    end)

    it("runs every statement of an exec, and a query returns the rows of the last one", function()
        local db = open("multi")
        assert(db:exec([[
            CREATE TABLE a(x INT);
            INSERT INTO a VALUES (1);
            INSERT INTO a VALUES (2);
        ]]))
        assert.same({ { s = 3 } }, db:query("SELECT 1; SELECT sum(x) AS s FROM a"))
    end)

    it("commits a transaction and returns what fn returned", function()
        local db = open("tx")
        db:exec("CREATE TABLE t(x INT)")
        local a, b = db:transaction(function(tx)
            assert(tx:exec("INSERT INTO t VALUES (?)", 1))
            assert(tx:exec("INSERT INTO t VALUES (?)", 2))
            return "done", 2
        end)
        assert.same({ "done", 2 }, { a, b })
        assert.is_true(db:transaction(function() end))
        assert.same({ { n = 2 } }, db:query("SELECT count(*) AS n FROM t"))
    end)

    it("rolls back on a Lua error and re-raises it", function()
        local db = open("rollback")
        db:exec("CREATE TABLE t(x INT)")
        db:exec("INSERT INTO t VALUES (0)")
        local ok, err = pcall(db.transaction, db, function(tx)
            tx:exec("INSERT INTO t VALUES (1)")
            tx:exec("UPDATE t SET x = x + 10")
            error("boom", 0)
        end)
        assert.same({ false, "boom" }, { ok, err })
        assert.same({ { x = 0 } }, db:query("SELECT x FROM t"))
        -- nil, err from fn rolls back too
        assert.same({ nil, "invalid" }, { db:transaction(function(tx)
            tx:exec("INSERT INTO t VALUES (5)")
            return nil, "invalid"
        end) })
        assert.same({ { n = 1 } }, db:query("SELECT count(*) AS n FROM t"))
        -- and the db is usable by everyone afterwards
        assert.same({ 1, 2 }, { db:exec("INSERT INTO t VALUES (2)") })
    end)

    it("rolls back a BEGIN that ran before its task was cancelled", function()
        -- in a script of its own, as a user would meet it: the worker runs BEGIN while the loop is
        -- held up, so the task is cancelled with the result on its way
        local path = tmpdb("cancelled_begin")
        local code, out = test.run_script(([[
            local moonlet = require "moonlet"
            local db = assert(require("moonlet.sqlite").open(%q))
            assert(db:exec("CREATE TABLE t(x)"))
            local t = moonlet.spawn(function()
                return db:transaction(function(tx) tx:exec("INSERT INTO t VALUES (1)") end)
            end)
            local s = os.clock()
            while os.clock() - s < 0.2 do end
            print("cancel", t:cancel())
            print("BEGIN", db:exec("BEGIN"))
        ]]):format(path))
        assert.same(0, code, out)
        if out:find("cancel\ttrue", 1, true) then -- the worker had BEGIN done, or at least started
            assert.falsy(out:find("within a transaction", 1, true), out)
        end
        assert.truthy(out:find("BEGIN\t", 1, true), out)
    end)

    it("nests transactions as savepoints", function()
        local db = open("savepoint")
        db:exec("CREATE TABLE t(x INT)")
        db:transaction(function(tx)
            tx:exec("INSERT INTO t VALUES (1)")
            assert.is_false(pcall(tx.transaction, tx, function(inner)
                inner:exec("INSERT INTO t VALUES (2)")
                error("inner fails")
            end))
            tx:transaction(function(inner) inner:exec("INSERT INTO t VALUES (3)") end)
        end)
        assert.same({ { x = 1 }, { x = 3 } }, db:query("SELECT x FROM t ORDER BY x"))
    end)

    it("binds the connection to the transaction's task: others wait until it ends", function()
        local db = open("owner")
        db:exec("CREATE TABLE log(who TEXT)")
        local in_tx = moonlet.event()
        local order = {}
        local t = moonlet.spawn(function()
            db:transaction(function(tx)
                tx:exec("INSERT INTO log VALUES ('tx1')")
                in_tx:set()
                moonlet.sleep(0.05)
                order[#order + 1] = "tx seen " .. #tx:query("SELECT * FROM log")
                tx:exec("INSERT INTO log VALUES ('tx2')")
            end)
        end)
        in_tx:wait(1)
        assert(db:exec("INSERT INTO log VALUES ('other')")) -- waits for the commit
        order[#order + 1] = "other"
        assert.is_true(t:join(1))
        assert.same({ "tx seen 1", "other" }, order)
        assert.same({ { who = "tx1" }, { who = "tx2" }, { who = "other" } },
                    db:query("SELECT who FROM log ORDER BY rowid"))
    end)

    it("times out a task waiting for another's transaction", function()
        local db = open("turn", { timeout = 0.1 })
        db:exec("CREATE TABLE t(x INT)")
        local t = moonlet.spawn(function()
            db:transaction(function() moonlet.sleep(0.4) end)
        end)
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, two(db:query("SELECT * FROM t")))
        assert.truthy(moonlet.now() - t0 < 0.35)
        assert.is_true(t:join(2))
        assert.same({}, db:query("SELECT * FROM t"))
    end)

    it("runs queries off the loop thread: a slow one does not stall other tasks", function()
        local db = open("slow")
        local ticks = 0
        local ticker = moonlet.spawn(function()
            for _ = 1, 1000 do
                moonlet.sleep(0.005)
                ticks = ticks + 1
            end
        end)
        test.defer(function() ticker:cancel() end)
        local t0 = moonlet.now()
        local rows = assert(db:query(SLOW, 1000000))
        local took = moonlet.now() - t0
        assert.same({ { n = 1000000 } }, rows)
        -- the loop ran all along: at least a third of the ticks a free loop would have made
        assert.truthy(ticks >= took / 0.005 / 3, ("%d ticks in %.2f s"):format(ticks, took))
    end)

    it("ends a statement past its timeout with nil, timeout and stays usable", function()
        local db = open("stmt_timeout", { timeout = 0.1 })
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, two(db:query(SLOW, 1e9)))
        assert.truthy(moonlet.now() - t0 < 1.5)
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
    end)

    it("cancels a task mid-query: the statement stops and the connection comes back clean", function()
        local db = open("cancel")
        db:exec("CREATE TABLE t(x INT)")
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, function()
            return db:query(SLOW, 1e9) -- minutes of work if nothing stopped it
        end) })
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
        assert.truthy(moonlet.now() - t0 < 2)
        -- cancelled inside a transaction: rolled back, the next task gets the connection
        local t = moonlet.spawn(function()
            db:transaction(function(tx)
                tx:exec("INSERT INTO t VALUES (1)")
                tx:query(SLOW, 1e9)
            end)
        end)
        moonlet.sleep(0.02)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join(1) })
        assert.same({}, db:query("SELECT * FROM t"))
        assert.same({ 1, 1 }, { db:exec("INSERT INTO t VALUES (2)") })
        -- cancelled while queued behind another statement
        local slow = moonlet.spawn(function() return db:query(SLOW, 300000) end)
        local queued = moonlet.spawn(function() return db:exec("INSERT INTO t VALUES (3)") end)
        assert.is_true(queued:cancel())
        assert.equal(300000, select(2, slow:join(5))[1].n)
        assert.same({ { x = 2 } }, db:query("SELECT x FROM t"))
    end)

    it("takes writes from many handlers at once without 'database is locked'", function()
        local db = open("writers")
        db:exec("CREATE TABLE hits(path TEXT, n INT)")
        local app = moonlet.app()
        app:post("/hit/:n", function(req)
            local n = tonumber(req.params.n)
            local ok, err = db:exec("INSERT INTO hits VALUES (?, ?)", req.path, n)
            if not ok then return { status = 500, body = err } end
            local ok2, err2 = db:transaction(function(tx)
                tx:exec("INSERT INTO hits VALUES ('tx', ?)", n)
                return tx:exec("UPDATE hits SET n = n + 1 WHERE path = 'tx' AND n = ?", n)
            end)
            if not ok2 then return { status = 500, body = err2 } end
            return "ok"
        end)
        local server, port = test.serve(app)
        test.defer(function() server:close() end)
        local fns = {}
        for i = 1, 100 do
            fns[i] = function() return test.request(port, "POST", "/hit/" .. i).status end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 100 do assert.equal(200, results[i]) end
        assert.same({ { n = 200 } }, db:query("SELECT count(*) AS n FROM hits"))
    end)

    it("lets two db objects on one file write at once (the busy timeout waits)", function()
        local path = tmpdb("two")
        local a = assert(sqlite.open(path))
        local b = assert(sqlite.open(path))
        test.defer(function() a:close(); b:close() end)
        a:exec("CREATE TABLE t(x INT)")
        local fns = {}
        for i = 1, 60 do
            local db = i % 2 == 0 and a or b
            fns[i] = function()
                return db:transaction(function(tx)
                    tx:exec("INSERT INTO t VALUES (?)", i)
                    moonlet.sleep(0)
                    return tx:exec("INSERT INTO t VALUES (?)", -i)
                end)
            end
        end
        local _, errors = moonlet.gather(fns)
        assert.same({}, errors)
        assert.same({ { n = 120, s = 0 } }, b:query("SELECT count(*) AS n, sum(x) AS s FROM t"))
    end)

    it("refuses calls after close, but finishes what was queued before", function()
        local db = assert(sqlite.open(":memory:"))
        db:exec("CREATE TABLE t(x INT)")
        local t = moonlet.spawn(function() return db:exec("INSERT INTO t VALUES (1)") end)
        assert.is_true(db:close())
        assert.same({ true, 1, 1 }, { t:join(1) })
        assert.same({ nil, "closed" }, two(db:query("SELECT 1")))
        assert.same({ nil, "closed" }, two(db:exec("SELECT 1")))
        assert.is_true(db:close())
    end)

    it("reports a file it cannot open", function()
        local db, err = sqlite.open("/nonexistent-dir/x/y.db")
        assert.is_nil(db)
        assert.equal("unable to open database file", err)
        assert.has_error(function() sqlite.open(42) end, "moonlet.sqlite.open: expected a path")
    end)


    -- Runs `moonlet script` with the given source; returns its exit code (nil: still running).
    local run_script = test.run_script

    it("does not keep a script alive once its statements are done", function()
        assert.same({ 0, "done\n" }, { run_script(([[
            local moonlet = require "moonlet"
            local db = assert(moonlet.sqlite.open(%q))
            assert(db:exec("CREATE TABLE IF NOT EXISTS t(x INT)"))
            assert(db:query("SELECT 1"))
            print("done")
        ]]):format(tmpdb("alive"))) })
    end)

    it("leaves no thread, handle, task or memory behind", function()
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for i = 1, 30 do
            local db = assert(sqlite.open(":memory:"))
            db:exec("CREATE TABLE t(x INT)")
            for j = 1, 20 do
                if j % 2 == 0 then
                    local t = moonlet.spawn(function() return db:query(SLOW, 1e9) end)
                    t:cancel()
                else
                    db:exec("INSERT INTO t VALUES (?)", j)
                end
            end
            assert.same({ { n = 10 } }, db:query("SELECT count(*) AS n FROM t"))
            if i % 2 == 0 then db:close() end -- the others are closed by __gc
            db = nil -- luacheck: ignore
        end
        test.wait_until(function()
            collectgarbage()
            local s = core.stats()
            return s.resources == before.resources and s.handles == before.handles
        end, 5)
        settle()
        test.assert_baseline(before, mem0, 512) -- KiB
    end)
end)
