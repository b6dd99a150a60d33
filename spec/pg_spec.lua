-- spec/pg_spec.lua: moonlet.pg against a private PostgreSQL server (initdb in a temporary
-- directory, a free loopback port): typed results, errors, transactions, the pool's limits,
-- cancellation and timeouts that stop the query on the server, reconnecting after a restart,
-- many tasks at once, LISTEN/NOTIFY, json and jsonb as text or (the json option) as Lua values,
-- and that nothing is left behind.
local moonlet = require "moonlet"
local core = require "moonlet.core"
local test = require "moonlet.test"
local pg = require "moonlet.pg"
local servers = require "support.servers"

local function two(a, b) return { a, b } end

local function settle()
    moonlet.sleep(0)
    moonlet.sleep(0)
    collectgarbage()
    collectgarbage()
    moonlet.sleep(0.01)
end

describe("moonlet.pg", function()
    if not servers.pg_bin() then
        it("needs the PostgreSQL server binaries (Debian postgresql)", function()
            pending("postgresql server binaries not installed")
        end)
        return
    end

    local srv
    setup(function()
        local err
        srv, err = servers.postgres()
        assert(srv, err)
    end)
    teardown(function()
        if srv then srv:stop() end
    end)

    local function pool(opts)
        opts = opts or {}
        opts.url = opts.url or srv.url
        local p = pg.pool(opts)
        test.defer(function() p:close() end)
        return p
    end

    it("makes a connection handed to a waiter ready: a cancelled transaction does not reach it", function()
        -- in a script of its own (a fresh pool and loop, as a user would meet it)
        local code, out = test.run_script(([[
            local moonlet = require "moonlet"
            local core = require "moonlet.core"
            local pool = moonlet.pg.pool{ url = %q, size = 1 }
            assert(pool:exec("CREATE TEMP TABLE IF NOT EXISTS h(x int)"))
            local a = moonlet.spawn(function()
                return pool:transaction(function(tx)
                    assert(tx:exec("INSERT INTO h VALUES (1)"))
                    return tx:query("SELECT pg_sleep(2)")
                end)
            end)
            local b = moonlet.spawn(function()
                local c = assert(pool:acquire())
                print("B", core.pg_status(c.c))
                pool:release(c)
            end)
            local c = moonlet.spawn(function() print("C", pool:query("SELECT 1 AS one")) end)
            moonlet.sleep(0.2)
            a:cancel()
            b:join(10); c:join(10)
            pool:close()
        ]]):format(srv.url), 20)
        assert.same(0, code, out)
        assert.truthy(out:find("B\tidle\tidle", 1, true), out) -- drained, rolled back first
        assert.falsy(out:find("aborted", 1, true), out)
    end)

    it("is moonlet.pg and answers typed values, NULL as nil", function()
        assert.equal(pg, moonlet.pg)
        local db = pool()
        local rows, err = db:query([[SELECT 1::int2 AS a, 2::int4 AS b, 9007199254740991::int8 AS c,
            1.5::float4 AS d, 2.25::float8 AS e, 12.5::numeric AS f, true AS g, false AS h,
            'txt'::text AS i, 'vc'::varchar AS j, '{"k": [1, 2]}'::json AS k,
            '{"k": 1}'::jsonb AS l, NULL::int AS m, '2024-01-02'::date AS n]])
        assert.is_nil(err)
        assert.same({ { a = 1, b = 2, c = 9007199254740991, d = 1.5, e = 2.25, f = 12.5, g = true,
                        h = false, i = "txt", j = "vc", k = '{"k": [1, 2]}', l = '{"k": 1}',
                        n = "2024-01-02" } }, rows)
        assert.same({}, db:query("SELECT 1 WHERE false"))
    end)

    it("returns int8 and numeric with every digit as strings with big_numbers = \"string\" or \"auto\"",
       function()
        local sql = [[SELECT 9007199254740993::int8 AS a, '-9223372036854775808'::int8 AS b,
            9223372036854775807::int8 AS c, 9007199254740992::int8 AS d, 42::int8 AS e,
            numeric '12345678901234567890.123456789' AS f, 12.5::numeric AS g, 0.001::numeric AS h,
            1234567890.12345678::numeric AS i, 7::int4 AS j, 1.5::float8 AS k]]
        -- the default: numbers, which round beyond 2^53 (a contract: unchanged)
        assert.same({ { a = 9007199254740992, b = -9223372036854775808, c = 9223372036854775807,
                        d = 9007199254740992, e = 42, f = 12345678901234567890.123456789,
                        g = 12.5, h = 0.001, i = 1234567890.12345678, j = 7, k = 1.5 } },
                    pool({ size = 1 }):query(sql))
        local exact = pool({ size = 1, big_numbers = "string" })
        assert.same({ { a = "9007199254740993", b = "-9223372036854775808", c = "9223372036854775807",
                        d = "9007199254740992", e = "42", f = "12345678901234567890.123456789",
                        g = "12.5", h = "0.001", i = "1234567890.12345678", j = 7, k = 1.5 } },
                    exact:query(sql))
        -- "auto": a number when it keeps every digit (within 2^53, or 15 significant digits)
        assert.same({ { a = "9007199254740993", b = "-9223372036854775808", c = "9223372036854775807",
                        d = 9007199254740992, e = 42, f = "12345678901234567890.123456789",
                        g = 12.5, h = 0.001, i = "1234567890.12345678", j = 7, k = 1.5 } },
                    pool({ size = 1, big_numbers = "auto" }):query(sql))
        -- in: a decimal string bound to int8 or numeric keeps its digits, in WHERE too
        assert(exact:exec("DROP TABLE IF EXISTS big; CREATE TABLE big(id int8 PRIMARY KEY, n numeric)"))
        local ids = { "9007199254740993", "-9223372036854775808", "9223372036854775807" }
        for _, id in ipairs(ids) do
            assert.same(1, exact:exec("INSERT INTO big VALUES ($1, $2)", id,
                                      "12345678901234567890.123456789"))
        end
        for _, id in ipairs(ids) do
            assert.same({ { id = id, n = "12345678901234567890.123456789", t = id } },
                        exact:query("SELECT id, n, id::text AS t FROM big WHERE id = $1", id))
        end
        assert.same({ { id = "9007199254740993" } }, exact:query(
            "SELECT id FROM big WHERE id = $1::int8 + 1", "9007199254740992"))
        assert.same({ { s = "-9223372036854775808" } }, exact:query("SELECT min(id) AS s FROM big"))
        assert.has_error(function() pg.pool({ url = srv.url, big_numbers = true }) end,
                         'moonlet.pg.pool: big_numbers must be "number", "string" or "auto"')
    end)

    it("sends LuaJIT's 64-bit integers (1LL, 2ULL) with every digit", function()
        local ffi = require "ffi"
        local exact = pool({ size = 1, big_numbers = "string" })
        local above = ffi.new("int64_t", 2 ^ 53) + 1 -- 9007199254740993LL: no double holds it
        assert.same({ { a = "9007199254740993", b = "-9223372036854775808", c = "18446744073709551615" } },
                    exact:query("SELECT $1::int8 AS a, $2::int8 AS b, $3::numeric AS c", above,
                                -ffi.new("int64_t", 2 ^ 62) * 2, ffi.new("uint64_t", 0) - 1))
        assert.same({ { n = "9007199254740994" } }, exact:query("SELECT $1::int8 + 1 AS n", above))
        assert.error_matches(function() exact:query("SELECT $1", ffi.new("int32_t", 3)) end,
                             "moonlet.pg: cannot send a cdata as a parameter", 1, true)
    end)

    it("connects over the server's Unix domain socket (libpq's host=/directory)", function()
        local db = pool({ url = ("host=%s port=%d user=postgres dbname=postgres"):format(srv.dir, srv.port) })
        local rows = assert(db:query("SELECT inet_server_addr() IS NULL AS unix, 7 AS n"))
        assert.same({ { unix = true, n = 7 } }, rows) -- (inet_server_addr is NULL over a socket)
    end)

    it("binds $n parameters (never spliced) and returns affected counts from exec", function()
        local db = pool()
        assert.same(0, db:exec([[DROP TABLE IF EXISTS todo;
            CREATE TABLE todo(id serial PRIMARY KEY, title text NOT NULL UNIQUE, done boolean,
                              n float8)]]))
        local evil = "x'); DROP TABLE todo; --"
        assert.same(1, db:exec("INSERT INTO todo(title, done, n) VALUES ($1, $2, $3)", evil, true,
                               0.5))
        assert.same(1, db:exec("INSERT INTO todo(title, done, n) VALUES ($1, $2, $3)", "b", nil,
                               7))
        assert.same({ { id = 1, title = evil, done = true, n = 0.5 } },
                    db:query("SELECT * FROM todo WHERE title = $1", evil))
        assert.same({ { id = 2, title = "b", n = 7 } }, db:query("SELECT * FROM todo WHERE id = $1", 2))
        assert.same(2, db:exec("UPDATE todo SET done = $1", false))
        assert.same({ { id = 1 } }, db:query("SELECT id FROM todo WHERE id = $1", 1))
    end)

    it("prepares a statement once per connection", function()
        local db = pool({ size = 1 })
        for i = 1, 5 do assert.same({ { v = i } }, db:query("SELECT $1::int AS v", i)) end
        assert.same({ { n = 2 } }, db:query(
            "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name LIKE $1", "moonlet%"))
    end)

    it("reports errors with the server's message and SQLSTATE; a constraint names itself", function()
        local db = pool()
        assert(db:exec("DROP TABLE IF EXISTS u; CREATE TABLE u(email text UNIQUE NOT NULL)"))
        assert(db:exec("INSERT INTO u VALUES ($1)", "a@x"))
        assert.same({ nil, 'duplicate key value violates unique constraint "u_email_key"', "23505" },
                    { db:exec("INSERT INTO u VALUES ($1)", "a@x") })
        assert.same({ nil, 'relation "nope" does not exist', "42P01" },
                    { db:query("SELECT * FROM nope") })
        local rows, err = db:query("SELEC 1")
        assert.is_nil(rows)
        assert.truthy(err:find("syntax error", 1, true))
        assert.has_error(function() db:query("SELECT $1", print) end,
                         "moonlet.pg: cannot send a function as a parameter")
        assert.same({ { n = 1 } }, db:query("SELECT count(*)::int AS n FROM u"))
    end)

    it("reports a server it cannot reach, and keeps nothing of the attempt", function()
        settle()
        local before = test.settled_stats()
        local db = pool({ url = ("postgresql://postgres@127.0.0.1:%d/postgres")
            :format(servers.free_port()) })
        local rows, err = db:query("SELECT 1")
        assert.is_nil(rows)
        assert.truthy(err:find("refused", 1, true), err)
        assert.same({ open = 0, idle = 0, waiting = 0, size = 10 }, db:stats())
        assert.has_error(function() pg.pool({ size = 1 }) end, "moonlet.pg.pool: expected opts.url")
        settle()
        -- at or below: what an earlier spec left closing may finish meanwhile (test.assert_baseline)
        test.assert_baseline(before)
    end)

    it("commits transactions on one connection and rolls back on a Lua error", function()
        local db = pool({ size = 3 })
        assert(db:exec("DROP TABLE IF EXISTS t; CREATE TABLE t(x int)"))
        assert.same({ "ok", 2 }, { db:transaction(function(tx)
            assert(tx:exec("INSERT INTO t VALUES ($1)", 1))
            assert(tx:exec("INSERT INTO t VALUES ($1)", 2))
            -- not committed yet: other connections do not see it
            assert.same({ { n = 0 } }, db:query("SELECT count(*)::int AS n FROM t"))
            return "ok", #tx:query("SELECT * FROM t")
        end) })
        local ok, err = pcall(db.transaction, db, function(tx)
            tx:exec("INSERT INTO t VALUES (3)")
            error("boom", 0)
        end)
        assert.same({ false, "boom" }, { ok, err })
        assert.same({ nil, "nope" }, { db:transaction(function(tx)
            tx:exec("INSERT INTO t VALUES (4)")
            return nil, "nope"
        end) })
        -- an SQL error inside: the transaction is aborted, the connection comes back clean
        assert.same({ nil, "current transaction is aborted, commands ignored until end of " ..
                     "transaction block" }, two(db:transaction(function(tx)
            tx:exec("INSERT INTO t VALUES ('x')")
            return tx:exec("INSERT INTO t VALUES (5)")
        end)))
        assert.same({ { s = 3 } }, db:query("SELECT sum(x)::int AS s FROM t"))
        assert.same(2, db:stats().open) -- the transaction's and the one query's beside it
    end)

    it("returns nil, err when PostgreSQL rolled the transaction back: a statement in it failed", function()
        local db = pool({ size = 1 })
        local other = pool({ size = 1 })
        assert(db:exec("DROP TABLE IF EXISTS k; CREATE TABLE k(x int PRIMARY KEY)"))
        assert(db:exec("INSERT INTO k VALUES (1)"))
        local pid = db:query("SELECT pg_backend_pid() AS pid")[1].pid
        -- fn does not raise (the failed statement returned nil, err): COMMIT answers ROLLBACK
        assert.same({ nil, 'transaction rolled back: duplicate key value violates unique ' ..
                     'constraint "k_pkey"', "23505" }, { db:transaction(function(tx)
            assert(tx:exec("INSERT INTO k VALUES (10)"))
            tx:exec("INSERT INTO k VALUES (1)")
            return "ok", 2
        end) })
        assert.same({ { x = 1 } }, db:query("SELECT x FROM k ORDER BY x"))
        -- a savepoint undid the failure: the transaction commits
        assert.same({ true }, { db:transaction(function(tx)
            assert(tx:exec("INSERT INTO k VALUES (10)"))
            assert(tx:exec("SAVEPOINT s"))
            tx:exec("INSERT INTO k VALUES (1)")
            assert(tx:exec("ROLLBACK TO SAVEPOINT s"))
        end) })
        assert.same({ { x = 1 }, { x = 10 } }, db:query("SELECT x FROM k ORDER BY x"))
        -- COMMIT itself fails (a deferred constraint): rolled back, with the server's SQLSTATE
        assert(db:exec([[DROP TABLE IF EXISTS kd;
            CREATE TABLE kd(x int UNIQUE DEFERRABLE INITIALLY DEFERRED)]]))
        assert.same({ nil, 'transaction rolled back: duplicate key value violates unique ' ..
                     'constraint "kd_x_key"', "23505" }, { db:transaction(function(tx)
            assert(tx:exec("INSERT INTO kd VALUES (1), (1)"))
            return true
        end) })
        assert.same({}, db:query("SELECT x FROM kd"))
        -- fn raises after a failed statement: rolled back, re-raised
        assert.same({ false, "boom" }, { pcall(db.transaction, db, function(tx)
            tx:exec("INSERT INTO k VALUES (1)")
            error("boom", 0)
        end) })
        -- every case left the connection clean: no transaction open on the server
        assert.same({ open = 1, idle = 1, waiting = 0, size = 1 }, db:stats())
        assert.same({ "idle", "idle" }, { core.pg_status(db.idle[1].c) })
        assert.same({ { state = "idle" } }, other:query(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", pid))
    end)

    it("returns nil, err, \"40001\" when COMMIT fails to serialize; the connections come back clean",
       function()
        local db = pool({ size = 2 })
        assert(db:exec([[DROP TABLE IF EXISTS ser; CREATE TABLE ser(class int, v int);
            INSERT INTO ser VALUES (1, 10), (2, 20)]]))
        local b_ready, a_done = moonlet.event(), moonlet.event()
        local function skew(mine, theirs, before_commit)
            return function(tx)
                assert(tx:exec("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
                local s = assert(tx:query("SELECT sum(v)::int AS s FROM ser WHERE class = $1", mine))
                assert(tx:exec("INSERT INTO ser VALUES ($1, $2)", theirs, s[1].s))
                before_commit()
                return true
            end
        end
        local a = moonlet.spawn(function()
            return db:transaction(skew(1, 2, function() b_ready:wait(5) end))
        end)
        local b = moonlet.spawn(function()
            return db:transaction(skew(2, 1, function() b_ready:set(); a_done:wait(5) end))
        end)
        assert.same({ true, true }, { a:join(5) })
        a_done:set()
        assert.same({ true, nil, "transaction rolled back: could not serialize access due to " ..
                     "read/write dependencies among transactions", "40001" }, { b:join(5) })
        assert.same({ { n = 3 } }, db:query("SELECT count(*)::int AS n FROM ser"))
        assert.same(2, #db.idle)
        for _, conn in ipairs(db.idle) do assert.same({ "idle", "idle" }, { core.pg_status(conn.c) }) end
    end)

    it("sends a string with a NUL or bytes not UTF-8 as binary: bytea keeps them, text refuses",
       function()
        local db = pool({ size = 1 })
        assert(db:exec("DROP TABLE IF EXISTS b; CREATE TABLE b(id int, v bytea, t text)"))
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local all = table.concat(bytes)
        local values = { "ab\0cd", "\1\255", all, "plain", "", "h\195\169" }
        for i, v in ipairs(values) do
            assert.same(1, db:exec("INSERT INTO b(id, v) VALUES ($1, $2)", i, v))
        end
        local rows = assert(db:query("SELECT id, v, length(v)::int AS n FROM b ORDER BY id"))
        for i, v in ipairs(values) do assert.same({ id = i, v = v, n = #v }, rows[i]) end
        -- text: a clear error from the server, never a string cut at the NUL
        assert.same({ nil, 'invalid byte sequence for encoding "UTF8": 0x00', "22021" },
                    { db:exec("INSERT INTO b(id, t) VALUES (9, $1)", "ab\0cd") })
        assert.same({ nil, 'invalid byte sequence for encoding "UTF8": 0xff', "22021" },
                    { db:query("SELECT $1::text AS t", "a\255") })
        assert.same({ { n = 0 } }, db:query("SELECT count(*)::int AS n FROM b WHERE t IS NOT NULL"))
        -- UTF-8 text and numbers go as before
        assert.same({ { t = "h\195\169llo \226\156\147 \240\159\152\128", n = 3 } },
                    db:query("SELECT $1::text AS t, $2::int AS n",
                             "h\195\169llo \226\156\147 \240\159\152\128", 3))
        -- bytea results decoded: hex output (the default) and escape output, simple protocol too
        assert.same({ { v = "\1\255A" } }, db:query("SELECT '\\x01ff41'::bytea AS v"))
        assert(db:exec("SET bytea_output = 'escape'"))
        assert.same({ { v = "\\\0\255A\1" } },
                    db:query("SELECT '\\x5c00ff4101'::bytea AS v"))
        assert.same({ { v = all } }, db:query("SELECT v FROM b WHERE id = 3"))
        assert(db:exec("RESET bytea_output"))
    end)

    it("sends a bytea parameter byte for byte even when it is valid UTF-8 (backslashes unparsed)",
       function()
        local db = pool({ size = 1 })
        assert(db:exec("DROP TABLE IF EXISTS bt; CREATE TABLE bt(id int, v bytea, t text)"))
        -- in text format bytea's input would read "\x41" as "A" and "a\\b" as "a\b", refuse "\"
        local values = { "\\x41", "a\\\\b", "\\\\000", "abc", "a\\b", "\\", "\\x", "\\001",
                         "ab\0\255", "\0", "", "h\195\169" }
        local function check_all()
            assert(db:exec("DELETE FROM bt"))
            for i, v in ipairs(values) do
                assert.same(1, db:exec("INSERT INTO bt(id, v, t) VALUES ($1, $2, $3)", i, v,
                                       v:find("[%z\128-\255]") and "x" or v))
            end
            local rows = assert(db:query("SELECT id, v, length(v)::int AS n FROM bt ORDER BY id"))
            assert.equal(#values, #rows)
            for i, v in ipairs(values) do assert.same({ id = i, v = v, n = #v }, rows[i]) end
            for i, v in ipairs(values) do -- the same bytes in a WHERE clause find their row
                assert.same({ { id = i } }, db:query("SELECT id FROM bt WHERE v = $1", v))
                assert.same({ { v = v } }, db:query("SELECT $1::bytea AS v", v))
            end
            -- text parameters go as before: the same strings stay text, unparsed
            assert.same({ { id = 1 } }, db:query("SELECT id FROM bt WHERE t = $1", "\\x41"))
            assert.same({ { t = "a\\\\b", n = 5 } },
                        db:query("SELECT $1::text AS t, $2::int AS n", "a\\\\b", 5))
        end
        check_all()
        -- each statement was prepared (and described) once: one per SQL text, this one included
        assert.same({ { n = 7 } }, db:query(
            "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name LIKE $1", "moonlet%"))
        -- past the 256 statements a connection keeps prepared: the unnamed statement, described
        for k = 1, 256 do assert(db:query("SELECT $1::int + " .. k .. " AS v", k)) end
        check_all()
        assert.same({ { v = 3 } }, db:query("SELECT $1::int + $2::int AS v", 1, 2))
    end)

    it("sends a table as an array: quotes, NULLs, nesting, and bytea[] byte for byte", function()
        local db = pool({ size = 1 })
        local all = {}
        for i = 0, 255 do all[#all + 1] = string.char(i) end
        all = table.concat(all)
        local texts = { 'a,b', 'q"u', "b\\s", "{}", "", "NULL", pg.null, " x ", "\195\169" }
        assert.same({ { a = '{"a,b","q\\"u","b\\\\s","{}","","NULL",NULL," x ",é}',
                        n = 9, nulls = 1, third = "b\\s", six = "NULL", seven = true } },
                    db:query([[SELECT $1::text[]::text AS a, cardinality($1::text[]) AS n,
                               array_position($1::text[], NULL) IS NOT NULL AS seven,
                               (SELECT count(*) FROM unnest($1::text[]) x WHERE x IS NULL) AS nulls,
                               ($1::text[])[3] AS third, ($1::text[])[6] AS six]], texts))
        local bytes = { "ab\0cd", "\1\255", all, "\\x41", "", pg.null }
        local rows = assert(db:query([[SELECT i, b FROM unnest($1::bytea[]) WITH ORDINALITY AS u(b, i)
                                       ORDER BY i]], bytes))
        assert.equal(6, #rows)
        for i = 1, 5 do assert.equal(bytes[i], rows[i].b) end
        assert.is_nil(rows[6].b)
        assert.same({ { a = "{{1,2},{3,NULL}}", b = "{t,f,NULL}", c = "{NaN,Infinity,-Infinity,0.1}",
                        d = "{9007199254740993,-1}", e = "{}" } },
                    db:query("SELECT $1::int8[]::text AS a, $2::bool[]::text AS b, $3::float8[]::text AS c, "
                             .. "$4::int8[]::text AS d, $5::int[]::text AS e", { { 1, 2 }, { 3, pg.null } },
                             { true, false, pg.null }, { 0 / 0, math.huge, -math.huge, 0.1 },
                             { 9007199254740993LL, -1 }, {}))
        assert.has_error(function() db:query("SELECT $1::int[]", { 1, nil, 3, x = 1 }) end,
                         "moonlet.pg: an array parameter must be a sequence (moonlet.pg.null for NULL)")
    end)

    it("returns an array column as a table of its elements, each decoded as its type's scalar is", function()
        local db = pool({ size = 1 })
        local rows = assert(db:query([[SELECT ARRAY[1, -2]::int2[] AS i2, ARRAY[3, 4]::int4[] AS i4,
            ARRAY[9007199254740991, -5]::int8[] AS i8, ARRAY[1.5, -0.25]::float4[] AS f4,
            '{2.25,NaN,Infinity,-Infinity}'::float8[] AS f8, ARRAY[12.5, 0.001]::numeric[] AS n,
            ARRAY[true, false]::bool[] AS b, ARRAY['a', 'b c']::text[] AS t,
            ARRAY['v', 'w,x']::varchar[] AS vc, ARRAY['ab', 'c']::char(3)[] AS bp,
            ARRAY['pg_class', 'x y']::name[] AS nm, ARRAY[26, 4294967295]::oid[] AS o,
            ARRAY['\x01ff41'::bytea, '', '\x5c7b2c227d']::bytea[] AS by,
            ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[] AS u,
            ARRAY['2024-01-02']::date[] AS d, ARRAY['2024-01-02 03:04:05']::timestamp[] AS ts,
            ARRAY['1 day 02:00:00']::interval[] AS iv, ARRAY['x', 'y']::"char"[] AS ch]]))
        local r = rows[1]
        assert.same({ 1, -2 }, r.i2)
        assert.same({ 3, 4 }, r.i4)
        assert.same({ 9007199254740991, -5 }, r.i8)
        assert.same({ 1.5, -0.25 }, r.f4)
        assert.equal(2.25, r.f8[1])
        assert.is_true(r.f8[2] ~= r.f8[2]) -- NaN
        assert.same({ math.huge, -math.huge }, { r.f8[3], r.f8[4] })
        assert.same({ 12.5, 0.001 }, r.n)
        assert.same({ true, false }, r.b)
        assert.same({ "a", "b c" }, r.t)
        assert.same({ "v", "w,x" }, r.vc)
        assert.same({ "ab ", "c  " }, r.bp)
        assert.same({ "pg_class", "x y" }, r.nm)
        assert.same({ 26, 4294967295 }, r.o)
        assert.same({ "\1\255A", "", '\\{,"}' }, r.by)
        assert.same({ "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" }, r.u)
        assert.same({ "2024-01-02" }, r.d)
        assert.same({ "2024-01-02 03:04:05" }, r.ts)
        assert.same({ "1 day 02:00:00" }, r.iv)
        assert.same({ "x", "y" }, r.ch)
        -- the date and time types: each element the text its scalar has
        local from = " FROM (SELECT '2024-01-02 03:04:05+00'::timestamptz AS x) s"
        local one = assert(db:query([[SELECT x::date AS d, x::timestamp AS ts, x::timestamptz AS tz,
            x::time AS t, x::timetz AS ttz, interval '1 day 02:00:00' AS iv]] .. from))[1]
        local arrays = assert(db:query([[SELECT ARRAY[x::date] AS d, ARRAY[x::timestamp] AS ts,
            ARRAY[x::timestamptz] AS tz, ARRAY[x::time] AS t, ARRAY[x::timetz] AS ttz,
            ARRAY[interval '1 day 02:00:00'] AS iv]] .. from))[1]
        for k, v in pairs(one) do assert.same({ k, { v } }, { k, arrays[k] }) end
        -- bytea's escape output format, inside an array too
        assert(db:exec("SET bytea_output = 'escape'"))
        assert.same({ { b = { "\\\0\255A\1", "ab" } } },
                    db:query([[SELECT ARRAY['\x5c00ff4101', '\x6162']::bytea[] AS b]]))
        assert(db:exec("RESET bytea_output"))
        -- int8 and numeric elements follow big_numbers as their scalars do
        local sql = [[SELECT ARRAY[9007199254740993, 42]::int8[] AS a,
                             ARRAY[numeric '12345678901234567890.5', 12.5]::numeric[] AS b]]
        assert.same({ { a = { "9007199254740993", "42" }, b = { "12345678901234567890.5", "12.5" } } },
                    pool({ size = 1, big_numbers = "string" }):query(sql))
        assert.same({ { a = { "9007199254740993", 42 }, b = { "12345678901234567890.5", 12.5 } } },
                    pool({ size = 1, big_numbers = "auto" }):query(sql))
        -- the simple protocol (no parameters, exec's path) decodes them too
        assert.same({ { a = { 1, 2 } } }, db:query("SELECT '{1,2}'::int[] AS a"))
    end)

    it("returns NULL elements as moonlet.pg.null and a quoted \"NULL\" as the string", function()
        local db = pool({ size = 1 })
        local r = assert(db:query([[SELECT ARRAY[1, NULL, 3] AS i, ARRAY['NULL', NULL, 'null', 'Null', '']
            AS t, ARRAY[NULL, true] AS b, '{NULL,null,"NULL",nuLL}'::text[] AS lit,
            ARRAY[NULL, '\x00'::bytea] AS by, NULL::int[] AS absent]]))[1]
        assert.equal(pg.null, r.i[2])
        assert.same({ 1, pg.null, 3 }, r.i)
        assert.same({ "NULL", pg.null, "null", "Null", "" }, r.t)
        assert.same({ pg.null, true }, r.b)
        assert.same({ pg.null, pg.null, "NULL", pg.null }, r.lit)
        assert.same({ pg.null, "\0" }, r.by)
        assert.is_nil(r.absent)
        assert.equal(require("moonlet.json").null, pg.null)
    end)

    it("returns quotes, backslashes, commas, braces and spaces in text elements as they are", function()
        local db = pool({ size = 1 })
        local texts = { 'q"u', "b\\s", "a,b", "{x}", "}", "{", " lead", "trail ", "", "\\", '"', "a;b",
                        "\195\169\226\156\147", "tab\tnl\n", "\\\"\\\"" }
        assert.same({ { a = texts } }, db:query([[SELECT ARRAY['q"u', 'b\s', 'a,b', '{x}', '}', '{',
            ' lead', 'trail ', '', '\', '"', 'a;b', 'é✓', E'tab\tnl\n', '\"\"'] AS a]]))
    end)

    it("returns a multidimensional array as nested tables, an empty one as {}, any lower bound as 1",
       function()
        local db = pool({ size = 1 })
        local r = assert(db:query([=[SELECT ARRAY[[1, 2], [3, 4]] AS m,
            '{{{1,2},{3,4}},{{5,6},{7,NULL}}}'::int[] AS cube, '{{"a,b","}"},{NULL,"NULL"}}'::text[] AS tm,
            '{}'::int[] AS e, ARRAY[]::text[] AS et, '[0:2]={10,20,30}'::int[] AS lb,
            '[-1:0][3:4]={{1,2},{3,4}}'::int[] AS lb2, '[5:5]={"x,y"}'::text[] AS lb3,
            array_length('[0:2]={10,20,30}'::int[], 1) AS len]=]))[1]
        assert.same({ { 1, 2 }, { 3, 4 } }, r.m)
        assert.same({ { { 1, 2 }, { 3, 4 } }, { { 5, 6 }, { 7, pg.null } } }, r.cube)
        assert.same({ { "a,b", "}" }, { pg.null, "NULL" } }, r.tm)
        assert.same({}, r.e)
        assert.same({}, r.et)
        assert.same({ 10, 20, 30 }, r.lb)
        assert.is_nil(r.lb[0])
        assert.same({ { 1, 2 }, { 3, 4 } }, r.lb2)
        assert.same({ "x,y" }, r.lb3)
        assert.equal(3, r.len)
    end)

    it("returns a 100000-element array whole", function()
        local db = pool({ size = 1 })
        local r = assert(db:query([[SELECT array_agg(i ORDER BY i) AS ints,
            array_agg(CASE WHEN i % 10 = 0 THEN NULL ELSE 'e"' || i END ORDER BY i) AS texts,
            array_agg(i::float8 / 4 ORDER BY i) AS halves
            FROM generate_series(1, 100000) i]]))[1]
        assert.equal(100000, #r.ints)
        assert.equal(100000, #r.texts)
        assert.equal(100000, #r.halves)
        for i = 1, 100000 do
            if r.ints[i] ~= i then error("ints[" .. i .. "] = " .. tostring(r.ints[i])) end
            local want = i % 10 == 0 and pg.null or 'e"' .. i
            if r.texts[i] ~= want then error("texts[" .. i .. "] = " .. tostring(r.texts[i])) end
            if r.halves[i] ~= i / 4 then error("halves[" .. i .. "]") end
        end
    end)

    it("gives back a table sent as an array parameter equal to it", function()
        local db = pool({ size = 1 })
        local all = {}
        for i = 0, 255 do all[#all + 1] = string.char(i) end
        all = table.concat(all)
        local texts = { 'a,b', 'q"u', "b\\s", "{}", "}", "", "NULL", "null", pg.null, " x ", "\195\169",
                        '\\"', "{{", "a b" }
        local nested = { { "x", pg.null }, { "NULL", '"}' } }
        local bytes = { "ab\0cd", "\1\255", all, "\\x41", "", pg.null, '"{,}\\' }
        local r = assert(db:query([[SELECT $1::text[] AS t, $2::text[] AS n, $3::bytea[] AS b,
            $4::int8[] AS i8, $5::bool[] AS bo, $6::float8[] AS f, $7::int[] AS e, $8::varchar[] AS v,
            $9::numeric[] AS nu]], texts, nested, bytes, { { 1, 2 }, { 3, pg.null } },
            { true, false, pg.null }, { 0.1, -2.5, math.huge }, {}, { "x", pg.null },
            { 1.5, pg.null, 2 }))[1]
        assert.same(texts, r.t)
        assert.same(nested, r.n)
        assert.equal(#bytes, #r.b)
        for i = 1, #bytes do assert.equal(bytes[i], r.b[i]) end
        assert.same({ { 1, 2 }, { 3, pg.null } }, r.i8)
        assert.same({ true, false, pg.null }, r.bo)
        assert.same({ 0.1, -2.5, math.huge }, r.f)
        assert.same({}, r.e)
        assert.same({ "x", pg.null }, r.v)
        assert.same({ 1.5, pg.null, 2 }, r.nu)
        -- through a table column too
        assert(db:exec("DROP TABLE IF EXISTS arr; CREATE TABLE arr(id int, t text[], b bytea[])"))
        assert.same(1, db:exec("INSERT INTO arr VALUES (1, $1, $2)", texts, bytes))
        local row = assert(db:query("SELECT t, b FROM arr WHERE id = 1"))[1]
        assert.same(texts, row.t)
        assert.same(bytes, row.b)
    end)

    it("keeps the text of an array whose element type it does not decode (json[], box[], inet[])",
       function()
        local db = pool({ size = 1 })
        assert.same({ { j = [[{"{\"a\": 1}",NULL}]], jb = [[{"{\"a\": [1, 2]}"}]],
                        bx = "{(1,1),(0,0);(3,3),(2,2)}", ip = "{127.0.0.1,::1}", i = { 1 } } },
                    db:query([[SELECT ARRAY['{"a": 1}'::json, NULL] AS j, ARRAY['{"a": [1,2]}'::jsonb] AS jb,
                        ARRAY[box '((0,0),(1,1))', box '((2,2),(3,3))'] AS bx,
                        ARRAY['127.0.0.1'::inet, '::1'] AS ip, ARRAY[1] AS i]]))
    end)

    it("prepares a cached statement again after a schema change changed its result type", function()
        local db = pool({ size = 1 })
        assert(db:exec("DROP TABLE IF EXISTS s2; CREATE TABLE s2(a int); INSERT INTO s2 VALUES (1)"))
        assert.same({ { a = 1 } }, db:query("SELECT * FROM s2 WHERE a = $1", 1))
        assert(db:exec("ALTER TABLE s2 ADD COLUMN b int DEFAULT 2"))
        assert.same({ { a = 1, b = 2 } }, db:query("SELECT * FROM s2 WHERE a = $1", 1))
        -- the stale statement was deallocated, not left on the server
        assert.same({ { n = 1 } }, db:query(
            "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement LIKE $1",
            "SELECT * FROM s2%"))
        -- a cache out of sync (DEALLOCATE ALL run by hand): prepared again
        assert(db:exec("DEALLOCATE ALL"))
        assert.same({ { a = 1, b = 2 } }, db:query("SELECT * FROM s2 WHERE a = $1", 1))
        -- inside a transaction the error comes back (the transaction is aborted), and the
        -- statement is prepared again once it has ended
        assert(db:exec("ALTER TABLE s2 ADD COLUMN c int DEFAULT 3"))
        local rows, err, code
        assert.same({ nil, "transaction rolled back: cached plan must not change result type",
                      "0A000" }, { db:transaction(function(tx)
            rows, err, code = tx:query("SELECT * FROM s2 WHERE a = $1", 1)
            return true
        end) })
        assert.same({ nil, "cached plan must not change result type", "0A000" }, { rows, err, code })
        assert.same({ { a = 1, b = 2, c = 3 } }, db:query("SELECT * FROM s2 WHERE a = $1", 1))
    end)

    it("waits for a free connection, in order, and times out when none comes", function()
        local db = pool({ size = 2, wait_timeout = 0.2 })
        local hold = moonlet.event()
        local holders = {}
        for i = 1, 2 do
            holders[i] = moonlet.spawn(function()
                return db:transaction(function() hold:wait(5) end)
            end)
        end
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, two(db:query("SELECT 1")))
        assert.truthy(moonlet.now() - t0 >= 0.15)
        local order = {}
        local waiters = {}
        for i = 1, 3 do
            waiters[i] = moonlet.spawn(function()
                local conn = assert(db:acquire())
                order[#order + 1] = i
                moonlet.sleep(0.01)
                db:release(conn)
            end)
        end
        assert.same(3, db:stats().waiting)
        hold:set()
        for i = 1, 2 do assert.is_true(holders[i]:join(2)) end
        for i = 1, 3 do assert.is_true(waiters[i]:join(2)) end
        assert.same({ 1, 2, 3 }, order)
        assert.same({ open = 2, idle = 2, waiting = 0, size = 2 }, db:stats())
    end)

    it("cancels a query mid-way on the server and gets the connection back clean", function()
        local db = pool({ size = 1 })
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.1, function()
            return db:query("SELECT pg_sleep(30)")
        end) })
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
        assert.truthy(moonlet.now() - t0 < 3)
        local other = pool({ size = 1 })
        assert.same({ { n = 0 } }, other:query(
            "SELECT count(*)::int AS n FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'"))
        -- cancelled inside a transaction: rolled back before the connection is used again
        assert(db:exec("DROP TABLE IF EXISTS c; CREATE TABLE c(x int)"))
        local t = moonlet.spawn(function()
            db:transaction(function(tx)
                tx:exec("INSERT INTO c VALUES (1)")
                tx:query("SELECT pg_sleep(30)")
            end)
        end)
        moonlet.sleep(0.1)
        assert.is_true(t:cancel())
        assert.same({ false, "cancelled" }, { t:join(1) })
        assert.same({}, db:query("SELECT * FROM c"))
        assert.same(1, db:exec("INSERT INTO c VALUES (2)"))
        assert.same({ { x = 2 } }, other:query("SELECT x FROM c"))
    end)

    it("cancels a query past its timeout on the server", function()
        local db = pool({ size = 1, timeout = 0.2 })
        local t0 = moonlet.now()
        assert.same({ nil, "timeout" }, two(db:query("SELECT pg_sleep(30)")))
        assert.truthy(moonlet.now() - t0 < 3)
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
    end)

    -- Holds every thread of libuv's pool (each opening a FIFO nobody writes yet), so that a cancel
    -- request (PQcancel runs there) waits; returns the function that lets them go.
    local function hold_thread_pool()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir " .. dir) == 0)
        test.defer(function() os.execute("rm -rf " .. dir) end)
        -- libuv's own reading of UV_THREADPOOL_SIZE: at least 1 (bindings/work.c does the same)
        local threads = math.max(1, math.min(1024, tonumber(os.getenv("UV_THREADPOOL_SIZE")) or 4))
        local holders = {}
        for i = 1, threads do
            local fifo = dir .. "/f" .. i
            assert(os.execute("mkfifo " .. fifo) == 0)
            -- a write to a FIFO with no reader waits in open() on its pool thread (docs/work_fs.md;
            -- fs.read refuses FIFOs: it cannot hold a thread)
            holders[i] = { fifo = fifo, task = moonlet.spawn(moonlet.fs.write, fifo, "x") }
        end
        local function release()
            for _, h in ipairs(holders) do
                if not h.released then
                    h.released = true
                    -- a reader at last (read-write: this open never waits, nor blocks the loop
                    -- that the writer's write goes through)
                    h.f = assert(io.open(h.fifo, "r+"))
                end
            end
            for _, h in ipairs(holders) do
                if h.f then
                    assert.same({ true, true }, { h.task:join(5) })
                    assert.same("x", h.f:read(1))
                    h.f:close()
                    h.f = nil
                end
            end
        end
        test.defer(release)
        moonlet.sleep(0.05) -- the reads hold the threads
        return release
    end

    it("keeps a connection from its next user until the cancel request of its last query is done", function()
        -- The cancelled query ends on its own while its cancel request waits for a thread. A
        -- connection handed on at that point would get its next query cancelled by the late
        -- request; it must wait for the request instead.
        local db = pool({ size = 1 })
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one")) -- connected before the pool fills
        local release = hold_thread_pool()
        assert.same({ nil, "timeout" }, { moonlet.timeout(0.05, function()
            return db:query("SELECT pg_sleep(0.2)")
        end) })
        local next_user = moonlet.spawn(function() return db:query("SELECT pg_sleep(1), 42 AS n") end)
        moonlet.sleep(0.4) -- the first query ended; the second waits, or runs on the old code
        release() -- the cancel request runs now
        local ok, rows, err = next_user:join(5)
        assert.is_true(ok)
        assert.is_nil(err)
        assert.same(42, rows[1].n)
    end)

    it("ends a transaction whose query timed out at once, while its cancel request waits", function()
        -- The query's waiter is answered when the connection can take the ROLLBACK (not while the
        -- cancel request still waits for a thread, when it would find the connection busy and
        -- leave the transaction open, with its locks, until the connection's next use).
        local db = pool({ size = 1, timeout = 0.2 }) -- every statement's: room for a slow CI
        local other = pool({ size = 1 })
        assert(other:exec("DROP TABLE IF EXISTS tx_cancel; CREATE TABLE tx_cancel(x int)"))
        test.defer(function() other:exec("DROP TABLE IF EXISTS tx_cancel") end)
        local pid = db:query("SELECT pg_backend_pid() AS pid")[1].pid
        local release = hold_thread_pool()
        local done = moonlet.spawn(function()
            return db:transaction(function(tx)
                assert(tx:exec("INSERT INTO tx_cancel VALUES (1)"))
                return tx:query("SELECT pg_sleep(0.6)")
            end)
        end)
        moonlet.sleep(0.9) -- the query ended by itself; its cancel request still waits
        release()
        local ok, rows, err = done:join(5)
        assert.is_true(ok)
        assert.same({ nil, "timeout" }, { rows, err })
        assert.same({ { state = "idle" } }, other:query(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", pid))
        assert.same({}, other:query("SELECT * FROM tx_cancel"))
    end)

    it("reconnects after the server restarts while the pool is idle", function()
        local db = pool({ size = 2 })
        local sub = assert(db:listen("restart"))
        test.defer(function() sub:close() end)
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
        local pid = db:query("SELECT pg_backend_pid() AS pid")[1].pid
        assert.is_true(srv:restart(), srv:log())
        local rows, err = db:query("SELECT pg_backend_pid() AS pid")
        assert.is_nil(err)
        assert.are_not.equal(pid, rows[1].pid)
        -- the subscription listens again on a new connection
        assert.truthy(test.wait_until(function()
            db:notify("restart", "again")
            local ch, payload = sub:receive(0.2)
            return ch == "restart" and payload == "again"
        end, 5))
    end)

    it("answers nil, err when the server ends the connection mid-query, never sending it again", function()
        local db = pool({ size = 1 })
        local admin = pool({ size = 1 })
        assert(admin:exec("DROP SEQUENCE IF EXISTS runs; CREATE SEQUENCE runs"))
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one")) -- a connection used before
        local t = moonlet.spawn(function()
            return db:query("SELECT nextval('runs') AS n, pg_sleep(30) AS killed_mid_query")
        end)
        -- terminate whatever runs it until the task ends: a statement sent again is killed too
        assert.truthy(test.wait_until(function()
            assert(admin:query([[SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                 WHERE query LIKE '%killed_mid%' AND pid <> pg_backend_pid()]]))
            return t:is_done()
        end, 20))
        local ok, rows, err, code = t:join(1)
        assert.same({ true, nil }, { ok, rows })
        assert.truthy(err:find("terminat", 1, true), err)
        assert.truthy(code == "57P01" or code == "closed", code)
        assert.same({ { last_value = 1 } }, admin:query("SELECT last_value FROM runs"))
        -- the pool opens a new connection for the next call
        assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
        assert.same({ open = 1, idle = 1, waiting = 0, size = 1 }, db:stats())
    end)

    -- -- JSON: the json option ------------------------------------------------------------------

    it("keeps json and jsonb values and arrays as their text by default (json = false too)", function()
        local sql = [[SELECT '{"a": [1, null]}'::json AS j, '{"a": [1, null]}'::jsonb AS jb,
            'null'::jsonb AS jn, ARRAY['{"x": 1}'::jsonb, NULL] AS ja, ARRAY['1'::json] AS jj]]
        local want = { { j = '{"a": [1, null]}', jb = '{"a": [1, null]}', jn = "null",
                         ja = [[{"{\"x\": 1}",NULL}]], jj = "{1}" } }
        assert.same(want, pool({ size = 1 }):query(sql))
        assert.same(want, pool({ size = 1, json = false }):query(sql))
    end)

    it("decodes json and jsonb columns into Lua values with json = true: objects, arrays, nested",
       function()
        local db = pool({ size = 1, json = true })
        assert.same({ { o = { a = 1, b = "two", c = true, d = false },
                        a = { 1, 2.5, -3e3, "x", { 4, { 5 } } },
                        n = { user = { name = "ann", tags = { "a", "b" }, address = { zip = "75001" } },
                              list = { { id = 1 }, { id = 2 } } },
                        s = "just a string", num = 42, t = true, e = {}, eo = {}, txt = "[1]" } },
                    db:query([=[SELECT '{"a": 1, "b": "two", "c": true, "d": false}'::json AS o,
                        '[1, 2.5, -3e3, "x", [4, [5]]]'::jsonb AS a,
                        '{"user": {"name": "ann", "tags": ["a", "b"], "address": {"zip": "75001"}},
                          "list": [{"id": 1}, {"id": 2}]}'::jsonb AS n,
                        '"just a string"'::json AS s, '42'::jsonb AS num, 'true'::json AS t,
                        '[]'::json AS e, '{}'::jsonb AS eo, '[1]'::text AS txt]=]))
        -- a table column, read back through a prepared statement
        assert(db:exec("DROP TABLE IF EXISTS docs; CREATE TABLE docs(id int, j json, jb jsonb)"))
        assert(db:exec([[INSERT INTO docs VALUES (1, '{"k": [1, {"z": null}]}', '{"k": [1, {"z": null}]}')]]))
        local row = assert(db:query("SELECT j, jb FROM docs WHERE id = $1", 1))[1]
        assert.same({ k = { 1, { z = pg.null } } }, row.j)
        assert.same(row.j, row.jb)
    end)

    it("gives JSON null as moonlet.pg.null and SQL NULL as nil", function()
        local db = pool({ size = 1, json = true })
        local r = assert(db:query([[SELECT 'null'::json AS jn, 'null'::jsonb AS jbn, NULL::json AS sn,
            NULL::jsonb AS sbn, '{"a": null, "b": [null, 1]}'::jsonb AS inner_null]]))[1]
        assert.equal(pg.null, r.jn)
        assert.equal(pg.null, r.jbn)
        assert.is_nil(r.sn)
        assert.is_nil(r.sbn)
        assert.same({ a = pg.null, b = { pg.null, 1 } }, r.inner_null)
        assert.equal(require("moonlet.json").null, r.jn)
    end)

    it("decodes json as written and jsonb as the server normalized it", function()
        local db = pool({ size = 1, json = true })
        -- json keeps its text (spaces, key order, a duplicate key: the decoder keeps the last);
        -- jsonb keeps the last duplicate too: both give the same Lua value
        local r = assert(db:query([[SELECT '{ "b" : 1,  "a" : [ 1 , 2 ], "b": 3 }'::json AS j,
            '{ "b" : 1,  "a" : [ 1 , 2 ], "b": 3 }'::jsonb AS jb,
            '{ "b" : 1,  "a" : [ 1 , 2 ], "b": 3 }'::jsonb::text AS jb_text]]))[1]
        assert.same({ a = { 1, 2 }, b = 3 }, r.j)
        assert.same({ a = { 1, 2 }, b = 3 }, r.jb)
        assert.equal('{"a": [1, 2], "b": 3}', r.jb_text) -- a cast to text still gives the text
        -- numbers are doubles, as moonlet.json's: big_numbers does not reach inside a document
        local n = assert(pool({ size = 1, json = true, big_numbers = "string" }):query(
            [[SELECT '{"big": 9007199254740993, "d": 0.5}'::jsonb AS j, 7::int8 AS i]]))[1]
        assert.same({ j = { big = 9007199254740992, d = 0.5 }, i = "7" }, n)
    end)

    it("decodes json[] and jsonb[] into arrays of values, SQL NULL elements as moonlet.pg.null",
       function()
        local db = pool({ size = 1, json = true })
        local r = assert(db:query([=[SELECT ARRAY['{"a": 1}'::json, NULL, 'null', '[1, "x"]'] AS j,
            ARRAY['{"q": "a \"quoted\", {braced} \\ value"}'::jsonb, NULL, '"NULL"', '2'] AS jb,
            ARRAY[ARRAY['1'::jsonb, '{"b": [2]}'], ARRAY[NULL, 'true']::jsonb[]] AS two_d,
            '{}'::jsonb[] AS empty, '[0:1]={"1","\"x\""}'::json[] AS bounded,
            NULL::jsonb[] AS absent]=]))[1]
        assert.same({ { a = 1 }, pg.null, pg.null, { 1, "x" } }, r.j)
        assert.same({ { q = 'a "quoted", {braced} \\ value' }, pg.null, "NULL", 2 }, r.jb)
        assert.same({ { 1, { b = { 2 } } }, { pg.null, true } }, r.two_d)
        assert.same({}, r.empty)
        assert.same({ 1, "x" }, r.bounded)
        assert.is_nil(r.absent)
        -- other arrays are as they were
        assert.same({ { i = { 1, pg.null }, t = { "{}" } } },
                    db:query([[SELECT ARRAY[1, NULL] AS i, ARRAY['{}'::text] AS t]]))
    end)

    it("decodes unicode: escapes in json, UTF-8 as it is in jsonb", function()
        local db = pool({ size = 1, json = true })
        local r = assert(db:query([[SELECT
            '{"s": "\u00e9\u20ac\ud83d\ude00", "e": "a\"b\\c\nd\/"}'::json AS j,
            '{"s": "é€😀", "k€y": "ü"}'::jsonb AS jb, ARRAY['"ñ, {ø}"'::jsonb] AS ja]]))[1]
        assert.same({ s = "\195\169\226\130\172\240\159\152\128", e = 'a"b\\c\nd/' }, r.j)
        assert.same({ s = "\195\169\226\130\172\240\159\152\128", ["k\226\130\172y"] = "\195\188" }, r.jb)
        assert.same({ "\195\177, {\195\184}" }, r.ja)
    end)

    it("decodes JSON inside a transaction and through prepared statements", function()
        local db = pool({ size = 1, json = true })
        assert(db:exec("DROP TABLE IF EXISTS jdocs; CREATE TABLE jdocs(id int, doc jsonb)"))
        local got = { db:transaction(function(tx)
            assert(tx:exec("INSERT INTO jdocs VALUES ($1, $2)", 1, '{"n": 1, "tags": ["a"]}'))
            assert(tx:exec("INSERT INTO jdocs VALUES ($1, $2)", 2, '{"n": 2, "tags": []}'))
            local rows = assert(tx:query("SELECT id, doc FROM jdocs WHERE id >= $1 ORDER BY id", 1))
            return rows, tx:query("SELECT doc->'tags' AS tags FROM jdocs WHERE id = $1", 1)
        end) }
        assert.same({ { { id = 1, doc = { n = 1, tags = { "a" } } }, { id = 2, doc = { n = 2, tags = {} } } },
                      { { tags = { "a" } } } }, got)
        -- the same statement again: prepared once on the connection, decoded every time
        local sql = "SELECT doc FROM jdocs WHERE id = $1"
        for id = 1, 2 do
            assert.same({ { doc = { n = id, tags = id == 1 and { "a" } or {} } } }, db:query(sql, id))
        end
        assert.same({ { doc = { n = 1, tags = { "a" } } } }, db:query(sql, 1))
        assert.same({ { n = 1 } }, db:query(
            "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement = $1", sql))
    end)

    it("answers nil, err for a value the decoder refuses (deeper than 1000), and goes on", function()
        local db = pool({ size = 1, json = true })
        local deep = "SELECT (repeat('[', 1001) || repeat(']', 1001))::jsonb AS deep"
        local rows, err, code = db:query(deep)
        assert.is_nil(rows)
        assert.equal("cannot decode json: ", err:sub(1, 20))
        assert.is_nil(code)
        assert.same({ nil, err }, { db:query(
            "SELECT ARRAY[(repeat('[', 1001) || repeat(']', 1001))::json] AS deep") })
        -- the statement ran: its text is there with a cast, and the connection serves the next call
        assert.equal(2002, #db:query("SELECT (" .. deep:sub(8, -9) .. ")::text AS t")[1].t)
        local v, depth = db:query("SELECT (repeat('[', 1000) || repeat(']', 1000))::jsonb AS ok")[1].ok, 0
        while type(v) == "table" do v, depth = v[1], depth + 1 end
        assert.equal(1000, depth) -- 1000 levels decode
        -- a lone UTF-16 surrogate escape: the json type keeps it as written, the decoder refuses it
        -- (there is no UTF-8 for it); the pair decodes
        local lone = "SELECT '\"\\ud800\"'::json AS lone"
        local lr, lerr = db:query(lone)
        assert.is_nil(lr)
        assert.matches("^cannot decode json: .*unicode escape", lerr)
        assert.same({ { pair = "\240\159\152\128" } },
                    db:query("SELECT '\"\\ud83d\\ude00\"'::json AS pair"))
        -- inside a transaction: the call's nil, err; the transaction commits what it did
        assert(db:exec("DROP TABLE IF EXISTS jd; CREATE TABLE jd(x int)"))
        local res = { db:transaction(function(tx)
            assert(tx:exec("INSERT INTO jd VALUES (1)"))
            local r, e = tx:query(deep)
            assert.is_nil(r)
            return e
        end) }
        assert.same({ err }, res)
        assert.same({ { n = 1 } }, db:query("SELECT count(*)::int AS n FROM jd"))
        assert.same({ open = 1, idle = 1, waiting = 0, size = 1 }, db:stats())
    end)

    it("sends moonlet.pg.json(value) as JSON text; a plain table is still an array", function()
        local db = pool({ size = 1, json = true })
        local doc = { name = 'q"uo\\te', list = { 1, 2, { x = pg.null } }, ["é"] = "ü" }
        assert.same({ { d = doc, t = { "a", "b" } } },
                    db:query("SELECT $1::jsonb AS d, $2::text[] AS t", pg.json(doc), { "a", "b" }))
        -- as elements of a jsonb[] parameter, beside SQL NULL
        assert.same({ { a = { { 1 }, pg.null, "x,}", pg.null } } },
                    db:query("SELECT $1::jsonb[] AS a", { pg.json({ 1 }), pg.null, pg.json("x,}"),
                                                          pg.json(pg.null) }))
        -- JSON null is not SQL NULL
        assert.same({ { is_null = false, j = pg.null } },
                    db:query("SELECT $1::json IS NULL AS is_null, $1::json AS j", pg.json(pg.null)))
        -- without the option, the text comes back
        assert.same({ { d = '{"k": [1]}' } },
                    pool({ size = 1 }):query("SELECT $1::jsonb AS d", pg.json({ k = { 1 } })))
    end)

    it("raises for a json option or a pg.json value it cannot use", function()
        assert.has_error(function() pg.pool({ url = srv.url, json = "yes" }) end,
                         "moonlet.pg.pool: json must be true or false")
        assert.has_error(function() pg.json(nil) end,
                         "moonlet.pg.json: expected a value (moonlet.pg.null for JSON null)")
        local db = pool({ size = 1 })
        assert.has_error(function() db:query("SELECT $1::json", pg.json({ f = print })) end)
    end)

    it("serves 200 tasks hammering one pool of 10", function()
        local db = pool({ size = 10, wait_timeout = 10 })
        local fns = {}
        for i = 1, 200 do
            fns[i] = function()
                local sum = 0
                for j = 1, 5 do
                    local rows, err = db:query("SELECT $1::int + $2::int AS s", i, j)
                    if not rows then error(err) end
                    sum = sum + rows[1].s
                end
                return sum
            end
        end
        local results, errors = moonlet.gather(fns)
        assert.same({}, errors)
        for i = 1, 200 do assert.equal(5 * i + 15, results[i]) end
        assert.truthy(db:stats().open <= 10)
    end)

    it("delivers NOTIFY to a LISTEN subscription", function()
        local db = pool()
        local sub = assert(db:listen("news", "other"))
        test.defer(function() sub:close() end)
        local got = {}
        local reader = moonlet.spawn(function()
            for channel, msg in sub:messages() do
                got[#got + 1] = channel .. ":" .. msg
                if #got == 3 then break end
            end
        end)
        assert.is_true(db:notify("news", "one"))
        assert.is_true(db:notify("other", "two"))
        assert.is_true(db:notify("ignored", "x"))
        assert(db:exec("NOTIFY news, 'three'"))
        assert.is_true(reader:join(2))
        assert.same({ "news:one", "other:two", "news:three" }, got)
        assert.same({ nil, "timeout" }, { sub:receive(0.05) })
        local waiting = moonlet.spawn(function() return sub:receive() end)
        sub:close()
        assert.same({ true, nil, "closed" }, { waiting:join(1) })
    end)


    -- Runs `moonlet script` with the given source; returns its exit code (nil: still running).
    local run_script = test.run_script

    it("does not keep a script alive with idle connections in the pool", function()
        assert.same({ 0, "1\n" }, { run_script(([[
            local moonlet = require "moonlet"
            local pg = moonlet.pg.pool{ url = %q }
            print(assert(pg:query("SELECT 1 AS one"))[1].one)
        ]]):format(srv.url)) })
    end)

    it("leaves no connection, handle, task or memory behind", function()
        settle()
        local before = test.settled_stats()
        local mem0 = collectgarbage("count")
        for _ = 1, 5 do
            local db = pg.pool({ url = srv.url, size = 3 })
            local fns = {}
            for i = 1, 20 do
                fns[i] = function()
                    if i % 4 == 0 then
                        return moonlet.timeout(0.01, function()
                            return db:query("SELECT pg_sleep(1)")
                        end)
                    end
                    return db:query("SELECT $1::int AS i", i)
                end
            end
            moonlet.gather(fns)
            assert.same({ { ok = true } }, db:query("SELECT true AS ok"))
            db:close()
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
