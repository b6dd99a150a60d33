-- lua/moonlet/sqlite.lua: moonlet.sqlite, the embedded default database. Each db object owns one
-- SQLite connection driven by a thread of its own (bindings/sqlite.c): statements queue there in
-- order and the calling task yields until its result comes back, so the loop serves everything
-- else meanwhile. WAL mode, a prepared-statement cache and a busy timeout are set at open.
--
-- Transactions: db:transaction(fn) makes the calling task the owner of the connection until fn
-- ends; statements of other tasks wait (in Lua, here) until then, while the owner's go straight
-- to the queue. A Lua error in fn rolls back and is re-raised; a ROLLBACK is queued with nobody
-- waiting for it, so it runs before anything queued later even when the owner was cancelled.
local core = require "moonlet.core"
local task = require "moonlet.task"

local check, park = task.check, task.park
local c_open, c_exec, c_query = core.sqlite_open, core.sqlite_exec, core.sqlite_query
local c_detach, c_close = core.sqlite_detach, core.sqlite_close
local running, unpark, now = core.running, core.unpark, core.now
local error, pcall, select, setmetatable, type, unpack = error, pcall, select, setmetatable, type,
    unpack
local remove = table.remove

local _M = { _VERSION = "0.1.0", sqlite_version = core.sqlite_libversion() }

local db_methods, tx_methods = {}, {}
local db_mt = { __name = "moonlet.sqlite.db", __index = db_methods }
local tx_mt = { __name = "moonlet.sqlite.tx", __index = tx_methods }

db_mt.__tostring = function(self) return "moonlet.sqlite.db (" .. self.path .. ")" end

-- syntax: db, err = moonlet.sqlite.open(path, opts)
-- path: a file (created if missing) or ":memory:". opts.timeout: seconds a statement may take,
-- queue wait included, and a task may wait for another's transaction (default 30; false: none);
-- opts.busy_timeout: seconds to wait for another connection's write lock (default 5);
-- opts.big_numbers: INTEGER values (and last_insert_id) as "number" (the default: beyond 2^53 they
-- lose digits), "string" (always their decimal digits) or "auto" (a string only beyond 2^53).
function _M.open(path, opts)
    if type(path) ~= "string" then error("moonlet.sqlite.open: expected a path", 2) end
    opts = opts or {}
    local big = opts.big_numbers or "number"
    if big ~= "number" and big ~= "string" and big ~= "auto" then
        error('moonlet.sqlite.open: big_numbers must be "number", "string" or "auto"', 2)
    end
    local c, err = c_open(path, opts.busy_timeout or 5, big)
    if not c then return nil, err end
    local timeout = opts.timeout
    if timeout == nil then timeout = 30 end
    return setmetatable({ _c = c, path = path, _timeout = timeout or 0, _owner = nil,
                          _waiters = {}, _depth = 0 }, db_mt)
end

-- Parks the running task until no other task owns the connection: true, or nil, "timeout".
local function wait_turn(self, co)
    local limit = self._timeout
    local deadline = limit > 0 and now() + limit or nil
    while self._owner and self._owner ~= co do
        local waiters = self._waiters
        waiters[#waiters + 1] = co
        local left = deadline and deadline - now()
        if left and left < 0 then left = 0 end
        local ok, r1 = pcall(park, left)
        if not ok or not r1 then
            for i = #waiters, 1, -1 do
                if waiters[i] == co then remove(waiters, i) break end
            end
            if not ok then error(r1, 0) end -- cancelled
            return nil, "timeout"
        end
    end
    return true
end

local function release(self)
    self._owner = nil
    local waiters = self._waiters
    if waiters[1] then
        self._waiters = {}
        for i = 1, #waiters do unpark(waiters[i], true) end
    end
end

local function my_turn(self)
    local owner = self._owner
    if not owner then return true end
    local co = running()
    if owner == co then return true end
    if not co then error("moonlet.sqlite: waiting outside a moonlet task", 3) end
    return wait_turn(self, co)
end

-- syntax: changes, last_insert_id = db:exec(sql, ...) -- or nil, err
-- Runs every statement of sql (parameters: `?` values in order, or one table for `:name`s).
function db_methods:exec(sql, ...)
    local ok, err = my_turn(self)
    if not ok then return nil, err end
    return check(c_exec(self._c, sql, self._timeout, ...))
end

-- syntax: rows, err = db:query(sql, ...) -- an array of rows, each a table column name = value:
-- integers and reals are numbers (integers may be strings: opts.big_numbers), text and blobs
-- strings, NULL is nil (absent)
function db_methods:query(sql, ...)
    local ok, err = my_turn(self)
    if not ok then return nil, err end
    return check(c_query(self._c, sql, self._timeout, ...))
end

local function pack(...)
    return { n = select("#", ...), ... }
end

-- Runs sql for the owner without waiting for the turn; cancellation raises.
local function own_exec(self, sql)
    return check(c_exec(self._c, sql, self._timeout))
end

-- Ends a transaction or savepoint after fn's results r (from pcall): commit (or release) on
-- success, rollback on an error (re-raised) or on fn returning nil, err.
local function finish(self, r, commit_sql, rollback_sql, done)
    if not r[1] then
        c_detach(self._c, rollback_sql)
        done()
        error(r[2], 0)
    end
    if r[2] == nil and r.n >= 3 and r[3] ~= nil then -- fn returned nil, err
        c_detach(self._c, rollback_sql)
        done()
        return nil, r[3]
    end
    local ok, c1, c2 = pcall(own_exec, self, commit_sql)
    if not ok or not c1 then
        c_detach(self._c, rollback_sql)
        done()
        if not ok then error(c1, 0) end
        return nil, c2
    end
    done()
    if r.n < 2 then return true end
    return unpack(r, 2, r.n)
end

-- A savepoint inside the owner's transaction (db:transaction called again from within fn).
local function savepoint(self, fn)
    local depth = self._depth + 1
    local name = "moonlet_sp" .. depth
    local ok, r1, r2 = pcall(own_exec, self, "SAVEPOINT " .. name)
    if not ok then -- cancelled while the worker ran it: it may stand, and nobody would release it
        c_detach(self._c, "ROLLBACK TO " .. name .. "; RELEASE " .. name)
        error(r1, 0)
    end
    if not r1 then return nil, r2 end
    self._depth = depth
    local tx = setmetatable({ _db = self }, tx_mt)
    local r = pack(pcall(fn, tx))
    tx._db = nil
    return finish(self, r, "RELEASE " .. name,
                  "ROLLBACK TO " .. name .. "; RELEASE " .. name,
                  function() self._depth = depth - 1 end)
end

-- syntax: ... = db:transaction(function(tx) ... end)
-- BEGIN IMMEDIATE, fn(tx), COMMIT: returns fn's results (true when it returned none). A Lua error
-- in fn rolls back and is re-raised; fn returning nil, err rolls back and returns nil, err. Other
-- tasks' statements on db wait until it ends. Called again inside fn: a savepoint.
function db_methods:transaction(fn)
    if type(fn) ~= "function" then error("moonlet.sqlite: transaction expects a function", 2) end
    local co = running()
    if not co then error("moonlet.sqlite: transaction outside a moonlet task", 2) end
    if self._owner == co then return savepoint(self, fn) end
    if self._owner then
        local ok, err = wait_turn(self, co)
        if not ok then return nil, err end
    end
    self._owner = co
    local ok, r1, r2 = pcall(own_exec, self, "BEGIN IMMEDIATE")
    if not ok or not r1 then
        -- cancelled while the worker ran BEGIN: it may have begun, and nobody would end it
        if not ok then c_detach(self._c, "ROLLBACK") end
        release(self)
        if not ok then error(r1, 0) end
        return nil, r2
    end
    local tx = setmetatable({ _db = self }, tx_mt)
    local r = pack(pcall(fn, tx))
    tx._db = nil
    return finish(self, r, "COMMIT", "ROLLBACK", function() release(self) end)
end

-- syntax: ok = db:close() -- statements queued before still run; afterwards calls return
-- nil, "closed"
function db_methods:close()
    return c_close(self._c)
end

-- tx: the transaction's handle; its statements go to the connection without waiting.

-- syntax: changes, last_insert_id = tx:exec(sql, ...)
function tx_methods:exec(sql, ...)
    local db = self._db
    if not db then return nil, "transaction ended" end
    return check(c_exec(db._c, sql, db._timeout, ...))
end

-- syntax: rows, err = tx:query(sql, ...)
function tx_methods:query(sql, ...)
    local db = self._db
    if not db then return nil, "transaction ended" end
    return check(c_query(db._c, sql, db._timeout, ...))
end

-- syntax: ... = tx:transaction(fn) -- a savepoint
function tx_methods:transaction(fn)
    local db = self._db
    if not db then return nil, "transaction ended" end
    return db:transaction(fn)
end

return _M
