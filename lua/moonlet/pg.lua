-- lua/moonlet/pg.lua: moonlet.pg, PostgreSQL with libpq on the loop (bindings/pg.c): a pool of
-- connections with a maximum size and a wait timeout, statements prepared once per connection,
-- transactions bound to one connection, and LISTEN/NOTIFY subscriptions.
--
-- The pool: a connection is taken for one call (or one transaction) and given back at its end,
-- on every path: results, errors, a Lua error in a transaction, cancellation (pcall around each
-- use). Tasks that find every connection taken wait in FIFO order; a released connection goes
-- straight to the first of them. A connection whose query was cancelled drains in C (the server
-- is asked to cancel) and is waited for before its next use; one the server closed (a restart)
-- is noticed while idle (or when acquire probes it) and replaced; a call is never sent twice.
--
-- JSON: with the pool's json option each connection is made with moonlet.json.decode, which C
-- (bindings/pg_value.c) gives the json and jsonb values of results; pg.json(v) marks a parameter
-- to send as JSON text (encoded here, with moonlet.json.encode), alone or as an array element.
local core = require "moonlet.core"
local task = require "moonlet.task"

local check, park = task.check, task.park
local c_connect, c_exec, c_query = core.pg_connect, core.pg_exec, core.pg_query
local c_prepare, c_describe, c_execute = core.pg_prepare, core.pg_describe, core.pg_execute
local c_status, c_close, c_notification = core.pg_status, core.pg_close, core.pg_notification
local c_wait_ready, c_quote = core.pg_wait_ready, core.pg_escape_identifier
local running, unpark, now = core.running, core.unpark, core.now
local error, pcall, select, setmetatable, type, unpack, tostring = error, pcall, select,
    setmetatable, type, unpack, tostring
local remove, concat = table.remove, table.concat
local byte, format, gsub = string.byte, string.format, string.gsub
local floor, huge, tonumber = math.floor, math.huge, tonumber
local json = require "moonlet.json"
local null, json_decode, json_encode = json.null, json.decode, json.encode
local getmetatable = getmetatable

local _M = { _VERSION = "0.1.0", null = null }

-- A parameter marked by pg.json: { value }, sent as the JSON text of value.
local json_param_mt = { __name = "moonlet.pg.json" }

-- syntax: p = moonlet.pg.json(value) -- a parameter sent as value's JSON text (moonlet.json.encode),
-- for a json or jsonb parameter (or an element of a json[] or jsonb[] one); a table passed as it is
-- stays a PostgreSQL array
function _M.json(value)
    if value == nil then error("moonlet.pg.json: expected a value (moonlet.pg.null for JSON null)", 2) end
    return setmetatable({ value }, json_param_mt)
end

-- The JSON text of a pg.json parameter; raises (misuse) when moonlet.json.encode refuses it.
local function json_text(p)
    local s, err = json_encode(p[1])
    if not s then error("moonlet.pg.json: cannot encode the parameter: " .. tostring(err), 0) end
    return s
end

local MAX_PREPARED = 256 -- statements prepared per connection; more run unprepared

local pool_methods, tx_methods, sub_methods = {}, {}, {}
local pool_mt = { __name = "moonlet.pg.pool", __index = pool_methods }
local tx_mt = { __name = "moonlet.pg.tx", __index = tx_methods }
local sub_mt = { __name = "moonlet.pg.subscription", __index = sub_methods }

local function pack(...)
    return { n = select("#", ...), ... }
end

-- -- One connection: { c = core connection, stmts = { [sql] = { name, formats } }, nstmts }

local function conn_open(pool)
    local c, err = check(c_connect(pool.url, pool.connect_timeout, pool.big_numbers,
                                   pool.json and json_decode or nil))
    if not c then return nil, err end
    return { c = c, stmts = {}, nstmts = 0, pool = pool }
end

local function conn_dead(conn)
    local state = c_status(conn.c)
    return state == "broken" or state == "closed"
end

-- -- Arrays: a Lua table given as a parameter is written as an array literal ---------------

local function hex_byte(c) return format("%02x", byte(c)) end

-- Appends the array literal of t to out: elements quoted with their " and \ escaped (so commas,
-- braces, quotes, backslashes, "NULL" and "" stay what they are), null (moonlet.pg.null) as
-- NULL, nested tables as sub-arrays, a pg.json value as its JSON text; for a bytea[] parameter a
-- string is its bytes in hex ("\x00ff"), so every byte goes through whatever it holds.
local function write_array(out, t, bytea, depth)
    if depth > 6 then error("moonlet.pg: an array parameter nested deeper than 6", 0) end
    out[#out + 1] = "{"
    local n = #t
    for k in pairs(t) do
        if type(k) ~= "number" or k < 1 or k > n or k ~= floor(k) then
            error("moonlet.pg: an array parameter must be a sequence (moonlet.pg.null for NULL)", 0)
        end
    end
    for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        local v = t[i]
        local tv = type(v)
        if v == null then
            out[#out + 1] = "NULL"
        elseif tv == "table" and getmetatable(v) == json_param_mt then
            out[#out + 1] = '"' .. gsub(json_text(v), '[\\"]', "\\%0") .. '"'
        elseif tv == "table" then
            write_array(out, v, bytea, depth + 1)
        elseif tv == "string" then
            if bytea then
                out[#out + 1] = '"\\\\x' .. gsub(v, ".", hex_byte) .. '"'
            else
                out[#out + 1] = '"' .. gsub(v, '[\\"]', "\\%0") .. '"'
            end
        elseif tv == "boolean" then
            out[#out + 1] = v and "t" or "f"
        elseif tv == "number" then
            if v ~= v then
                out[#out + 1] = "NaN"
            elseif v == huge or v == -huge then
                out[#out + 1] = v > 0 and "Infinity" or "-Infinity"
            elseif v == floor(v) and v < 2^53 and v > -2^53 then
                out[#out + 1] = format("%d", v)
            else
                out[#out + 1] = format("%.17g", v)
            end
        elseif tv == "cdata" and tonumber(v) then -- 1LL, 2ULL: their digits
            out[#out + 1] = (gsub(tostring(v), "U?LL$", ""))
        else
            error("moonlet.pg: cannot send a " .. tv .. " in an array parameter", 0)
        end
    end
    out[#out + 1] = "}"
end

-- The parameters with each table written as an array literal (a pg.json one as its JSON text);
-- formats (core.pg_describe's) says which are bytea[] ("a").
local function arrays(formats, ...)
    local args = pack(...)
    for i = 1, args.n do
        local v = args[i]
        if type(v) == "table" and getmetatable(v) == json_param_mt then
            args[i] = json_text(v)
        elseif type(v) == "table" and v ~= null then
            local out = {}
            write_array(out, v, formats and byte(formats, i) == 97, 1)
            args[i] = concat(out)
        elseif v == null then
            args[i] = nil
        end
    end
    return unpack(args, 1, args.n)
end

-- Has any of the parameters a table (an array, a pg.json value, or moonlet.pg.null)?
local function has_table(...)
    for i = 1, select("#", ...) do
        if type((select(i, ...))) == "table" then return true end
    end
    return false
end

-- Prepares sql as the statement `name` and describes it: its formats for c_execute (false, or
-- which parameters are bytea: they go in binary format, byte for byte). nil, err, code on failure.
local function prepare(conn, name, timeout, sql)
    local ok, err, code = check(c_prepare(conn.c, name, timeout, sql))
    if not ok then return nil, err, code end
    if name ~= "" then conn.nstmts = conn.nstmts + 1 end
    return check(c_describe(conn.c, name, timeout))
end

-- Past MAX_PREPARED: unprepared, or, when a parameter is a string (it may be a bytea one), the
-- unnamed statement prepared and described each time.
local function run_unnamed(conn, timeout, sql, ...)
    for i = 1, select("#", ...) do
        local t = type((select(i, ...)))
        if t == "string" or t == "table" then
            local formats, err, code = prepare(conn, "", timeout, sql)
            if formats == nil then return nil, err, code end
            if has_table(...) then
                return check(c_execute(conn.c, "", timeout, formats, arrays(formats, ...)))
            end
            return check(c_execute(conn.c, "", timeout, formats, ...))
        end
    end
    return check(c_query(conn.c, sql, timeout, ...))
end

-- Runs sql with the parameters on conn: prepared (once per connection) when it has parameters,
-- the simple protocol (several statements allowed) when it has none and `simple`. Returns rows,
-- count and the command tag, or nil, err, code. A statement is described when it is prepared,
-- once: its bytea parameters are then always sent in binary format (in text format the server
-- would parse the backslashes of a string that happens to be UTF-8).
--
-- A cached statement can go stale: a schema change that changes its result type makes the server
-- refuse it ("cached plan must not change result type", 0A000), and one the server no longer has
-- (a DEALLOCATE ALL or DISCARD ALL sent by hand: 26000) fails by name. Either way it is dropped
-- from the cache (and deallocated when it still exists) and, outside a transaction block, the
-- statement prepared and run again, once: it did not run. Inside one the error is the caller's
-- (the transaction is aborted: retrying there cannot succeed), and the next use prepares it anew.
local function conn_run(conn, simple, sql, ...)
    local timeout = conn.pool.timeout
    if simple and select("#", ...) == 0 then
        return check(c_exec(conn.c, sql, timeout))
    end
    for attempt = 1, 2 do
        local stmt = conn.stmts[sql]
        if not stmt then
            if conn.nstmts >= MAX_PREPARED then return run_unnamed(conn, timeout, sql, ...) end
            -- a name is never used twice on a connection: a prepare that timed out or was
            -- cancelled may still have created its statement on the server
            conn.serial = (conn.serial or 0) + 1
            local name = "moonlet_" .. conn.serial
            local formats, err, code = prepare(conn, name, timeout, sql)
            if formats == nil then return nil, err, code end
            stmt = { name, formats }
            conn.stmts[sql] = stmt
        end
        local name = stmt[1]
        local rows, count, code, stale
        if has_table(...) then
            rows, count, code, stale = check(c_execute(conn.c, name, timeout, stmt[2],
                                                       arrays(stmt[2], ...)))
        else
            rows, count, code, stale = check(c_execute(conn.c, name, timeout, stmt[2], ...))
        end
        if rows ~= nil or not (stale or code == "26000") then return rows, count, code end
        conn.stmts[sql] = nil
        local _, tx = c_status(conn.c)
        if code == "26000" then
            conn.nstmts = conn.nstmts - 1 -- gone from the server already
        elseif tx == "idle" then
            -- the server still holds it: freed now (a failure leaves it counted, harmlessly)
            if check(c_exec(conn.c, "DEALLOCATE " .. name, timeout)) then
                conn.nstmts = conn.nstmts - 1
            end
        end
        if tx ~= "idle" or attempt == 2 then return nil, count, code end
    end
end

-- -- The pool -------------------------------------------------------------------------------

-- syntax: pool = moonlet.pg.pool{ url = "postgresql://user@host:port/db", size = 10 }
-- opts: url (or conninfo "host=... dbname=..."), size (most connections, default 10),
-- wait_timeout (seconds to wait for a free connection, default 5), connect_timeout (10),
-- timeout (seconds a query may run before it is cancelled on the server, default 30; false: none),
-- big_numbers (int8 and numeric values as "number", the default: beyond 2^53 or 15 digits they
-- lose some; "string": always their text, every digit; "auto": their text only when a number
-- would lose a digit), json (false, the default: json and jsonb values as their text; true: as
-- the Lua values moonlet.json.decode makes of them, json[] and jsonb[] as tables of those).
function _M.pool(opts)
    if type(opts) ~= "table" then error("moonlet.pg.pool: expected an options table", 2) end
    local url = opts.url or opts.conninfo
    if type(url) ~= "string" then error("moonlet.pg.pool: expected opts.url", 2) end
    local big = opts.big_numbers or "number"
    if big ~= "number" and big ~= "string" and big ~= "auto" then
        error('moonlet.pg.pool: big_numbers must be "number", "string" or "auto"', 2)
    end
    if opts.json ~= nil and type(opts.json) ~= "boolean" then
        error("moonlet.pg.pool: json must be true or false", 2)
    end
    local timeout = opts.timeout
    if timeout == nil then timeout = 30 end
    return setmetatable({
        url = url, size = opts.size or 10, wait_timeout = opts.wait_timeout or 5,
        connect_timeout = opts.connect_timeout or 10, timeout = timeout or nil, big_numbers = big,
        json = opts.json == true, idle = {}, open = 0, waiters = {}, closed = false,
    }, pool_mt)
end

-- Wakes the first waiter with `what`: a connection handed over, or true (a slot is free).
local function wake_one(pool, what)
    local waiters = pool.waiters
    while waiters[1] do
        local co = remove(waiters, 1)
        if unpark(co, what) then return true end
    end
    return false
end

local function discard(pool, conn)
    c_close(conn.c)
    pool.open = pool.open - 1
    wake_one(pool, true)
end

-- Gives conn back: to the first waiter (who makes it ready, as acquire does for an idle one: a
-- cancelled user may have left it draining or inside a transaction), else to the idle list; a dead
-- one is dropped.
local function release(pool, conn)
    if pool.closed or conn_dead(conn) then return discard(pool, conn) end
    if wake_one(pool, conn) then return end
    local idle = pool.idle
    idle[#idle + 1] = conn
end

-- Makes a connection from the idle list ready: waits for a drain, ends a transaction left open.
-- An idle one is probed first: one the server closed is seen now, before a query is sent on it.
local function ready(pool, conn)
    local state = c_status(conn.c, true)
    if state == "draining" then
        local ok = check(c_wait_ready(conn.c, pool.wait_timeout))
        if not ok then return nil end
    elseif state ~= "idle" then
        return nil
    end
    local _, tx = c_status(conn.c)
    if tx ~= "idle" then -- a transaction its last user could not end (cancelled mid-way)
        if not check(c_exec(conn.c, "ROLLBACK", pool.timeout)) then return nil end
    end
    return conn
end

-- syntax: conn, err = pool:acquire() -- a connection for the running task; give it back with
-- pool:release(conn). nil, "timeout" when none came free within wait_timeout.
function pool_methods:acquire()
    if self.closed then return nil, "closed" end
    local deadline
    while true do
        local idle = self.idle
        local conn = remove(idle)
        if conn then
            local ok, got = pcall(ready, self, conn)
            if not ok then discard(self, conn); error(got, 0) end
            if got then return got end
            discard(self, conn)
        elseif self.open < self.size then
            self.open = self.open + 1
            local ok, c, err = pcall(conn_open, self)
            if not ok or not c then
                self.open = self.open - 1
                wake_one(self, true)
                if not ok then error(c, 0) end
                return nil, err
            end
            return c
        else
            local co = running()
            if not co then error("moonlet.pg: waiting outside a moonlet task", 2) end
            deadline = deadline or now() + self.wait_timeout
            local left = deadline - now()
            if left <= 0 then return nil, "timeout" end
            local waiters = self.waiters
            waiters[#waiters + 1] = co
            local ok, got = pcall(park, left)
            if not ok or not got then
                for i = #waiters, 1, -1 do
                    if waiters[i] == co then remove(waiters, i) break end
                end
                if not ok then error(got, 0) end
                return nil, got == false and "closed" or "timeout"
            end
            if type(got) == "table" then -- handed over by release: made ready as an idle one is
                local ok2, r2 = true, nil
                if not conn_dead(got) then ok2, r2 = pcall(ready, self, got) end
                if ok2 and r2 then return r2 end
                discard(self, got)
                if not ok2 then error(r2, 0) end
            end
        end
    end
end

-- syntax: pool:release(conn)
function pool_methods:release(conn)
    release(self, conn)
end

-- Runs one statement on a pooled connection and gives it back on every path. It is sent once:
-- a connection that died while idle (the server restarted) is seen when it is taken (ready
-- probes it) and replaced; one that dies while the statement runs (pg_terminate_backend, a
-- crash) answers nil, err: the statement may have run, and one an administrator stopped must not
-- start again.
local function pooled(self, simple, sql, ...)
    if type(sql) ~= "string" then error("moonlet.pg: expected an SQL string", 3) end
    local conn, err = self:acquire()
    if not conn then return nil, err end
    local r = pack(pcall(conn_run, conn, simple, sql, ...))
    release(self, conn)
    if not r[1] then error(r[2], 0) end
    return unpack(r, 2, r.n)
end

-- syntax: rows, err = pool:query(sql, ...) -- $1, $2... bound to the values (never spliced):
-- an array of rows (column name = value: numbers, booleans, strings, arrays as tables with
-- moonlet.pg.null for a NULL element, NULL as nil); or nil, the server's message and the SQLSTATE code
function pool_methods:query(sql, ...)
    local rows, err, code = pooled(self, false, sql, ...)
    if rows == nil then return nil, err, code end
    return rows
end

-- syntax: count, err = pool:exec(sql, ...) -- the number of rows the statement affected; without
-- parameters sql may hold several statements
function pool_methods:exec(sql, ...)
    local rows, count, code = pooled(self, true, sql, ...)
    if rows == nil then return nil, count, code end
    return count
end

-- -- Transactions ----------------------------------------------------------------------------

-- What a transaction the server rolled back returns: nil, "transaction rolled back: " and the
-- first error of the transaction (the statement that aborted it, or COMMIT's own), its SQLSTATE.
local function rolled_back(err, code)
    if err == nil then return nil, "transaction rolled back" end
    return nil, "transaction rolled back: " .. tostring(err), code
end

-- syntax: ... = pool:transaction(function(tx) ... end)
-- BEGIN, fn(tx), COMMIT on one connection: returns fn's results (true when none). A Lua error in
-- fn rolls back and is re-raised; fn returning nil, err rolls back and returns nil, err. When the
-- server rolled back instead of committing (a statement in fn failed and fn went on, or COMMIT
-- itself failed: a deferred constraint, a serialization failure 40001), nil, "transaction rolled
-- back: " .. the first error, and its SQLSTATE. The connection goes back to the pool with no
-- transaction open on every path.
function pool_methods:transaction(fn)
    if type(fn) ~= "function" then error("moonlet.pg: transaction expects a function", 2) end
    local conn, err = self:acquire()
    if not conn then return nil, err end
    local ok, b1, b2 = pcall(conn_run, conn, true, "BEGIN")
    if not ok or not b1 then
        release(self, conn)
        if not ok then error(b1, 0) end
        return nil, b2
    end
    local tx = setmetatable({ _conn = conn }, tx_mt)
    local r = pack(pcall(fn, tx))
    tx._conn = nil
    local failed = not r[1] or (r[2] == nil and r.n >= 3 and r[3] ~= nil)
    local c1, c2, c3
    ok, c1, c2, c3 = pcall(conn_run, conn, true, failed and "ROLLBACK" or "COMMIT")
    -- the server answered (the connection is idle, the statement did not time out): the
    -- transaction is over either way
    local answered = c_status(conn.c) == "idle" and c2 ~= "timeout"
    -- a ROLLBACK that could not run (a cancelled query still draining) leaves the transaction
    -- open: the next acquire rolls it back
    release(self, conn)
    if not r[1] then error(r[2], 0) end
    if failed then return nil, r[3] end
    if not ok then error(c1, 0) end
    if not c1 then
        -- COMMIT failed on the server: rolled back; a timeout or a lost connection leaves the
        -- transaction's fate unknown, and says so
        if answered then return rolled_back(c2, c3) end
        return nil, c2, c3
    end
    -- an aborted transaction answers COMMIT with ROLLBACK
    if c3 == "ROLLBACK" then return rolled_back(tx._err, tx._code) end
    if r.n < 2 then return true end
    return unpack(r, 2, r.n)
end

-- Notes the first error of a statement in the transaction: what aborted it, if it was.
local function tx_failed(tx, err, code)
    if tx._err == nil then tx._err, tx._code = err, code end
    return nil, err, code
end

-- syntax: rows, err = tx:query(sql, ...)
function tx_methods:query(sql, ...)
    local conn = self._conn
    if not conn then return nil, "transaction ended" end
    local rows, err, code = conn_run(conn, false, sql, ...)
    if rows == nil then return tx_failed(self, err, code) end
    return rows
end

-- syntax: count, err = tx:exec(sql, ...)
function tx_methods:exec(sql, ...)
    local conn = self._conn
    if not conn then return nil, "transaction ended" end
    local rows, count, code = conn_run(conn, true, sql, ...)
    if rows == nil then return tx_failed(self, count, code) end
    return count
end

-- -- LISTEN / NOTIFY -------------------------------------------------------------------------

-- syntax: ok, err = pool:notify(channel, payload)
function pool_methods:notify(channel, payload)
    local rows, err = self:query("SELECT pg_notify($1, $2)", channel, payload or "")
    if not rows then return nil, err end
    return true
end

local function sub_connect(self)
    local conn, err = conn_open(self.pool)
    if not conn then return nil, err end
    for i = 1, #self.channels do
        local ok, e = check(c_exec(conn.c, "LISTEN " .. c_quote(conn.c, self.channels[i]),
                                   self.pool.timeout))
        if not ok then
            c_close(conn.c)
            return nil, e
        end
    end
    self.conn = conn
    return true
end

-- syntax: sub, err = pool:listen(channel, ...) -- a connection of its own (outside the pool's
-- size) that LISTENs to the channels; it reconnects (and listens again) when the server restarts
function pool_methods:listen(...)
    local channels = { ... }
    if #channels == 0 then error("moonlet.pg: listen expects a channel", 2) end
    for i = 1, #channels do channels[i] = tostring(channels[i]) end
    local sub = setmetatable({ pool = self, channels = channels }, sub_mt)
    local ok, err = sub_connect(sub)
    if not ok then return nil, err end
    return sub
end

-- syntax: channel, payload = sub:receive(timeout) -- the next notification; nil, "timeout", or
-- nil, "closed" after sub:close()
function sub_methods:receive(timeout)
    local deadline = timeout and now() + timeout
    while true do
        if self.closed then return nil, "closed" end
        local conn = self.conn
        if conn then
            local left = deadline and deadline - now()
            if left and left < 0 then left = 0 end
            local channel, payload = check(c_notification(conn.c, left))
            if channel then return channel, payload end
            if payload == "timeout" or self.closed then return nil, payload end
            c_close(conn.c) -- the connection died: listen again on a new one
            self.conn = nil
        else
            local ok = sub_connect(self)
            if not ok then
                if deadline and now() >= deadline then return nil, "timeout" end
                task.sleep(0.1)
            end
        end
    end
end

-- syntax: for channel, payload in sub:messages() do ... end -- ends when sub is closed
function sub_methods:messages(timeout)
    return function()
        local channel, payload = self:receive(timeout)
        if channel then return channel, payload end
        return nil
    end
end

-- syntax: sub:close()
function sub_methods:close()
    self.closed = true
    if self.conn then c_close(self.conn.c) end
    self.conn = nil
    return true
end

-- syntax: s = pool:stats() -- { open, idle, waiting, size }
function pool_methods:stats()
    return { open = self.open, idle = #self.idle, waiting = #self.waiters, size = self.size }
end

-- syntax: pool:close() -- closes the idle connections now, the others when they come back;
-- waiters get nil, "closed"
function pool_methods:close()
    self.closed = true
    local idle = self.idle
    self.idle = {}
    for i = 1, #idle do
        c_close(idle[i].c)
        self.open = self.open - 1
    end
    local waiters = self.waiters
    self.waiters = {}
    for i = 1, #waiters do unpark(waiters[i], false) end
    return true
end

return _M
