/* bindings/sqlite.c: moonlet.sqlite's C side: one SQLite connection per database, driven by a
 * thread of its own, so that a slow query never stalls the loop. lua/moonlet/sqlite.lua wraps
 * these functions (core.sqlite_*) into db objects with transactions.
 *
 * Threads and ownership (the rule of this file):
 * 1. THE WORKER THREAD NEVER TOUCHES LUA OR THE LOOP. It touches only the sqlite3 connection, its
 *    statement cache, and the jobs it takes from the queue (their SQL, parameters and result
 *    buffers). Its one contact with libuv is uv_async_send, the thread-safe wake-up of the loop.
 * 2. The loop thread builds a job completely (SQL and parameters copied into C memory, so nothing
 *    Lua owns is lent to the worker) before queueing it; it converts results into Lua values and
 *    resumes the waiting task only in the async callback. Jobs are freed on the loop thread only.
 * 3. db->mu guards the queue, the done list, each job's `state`, `quit` and `exited`. A job is
 *    QUEUED (in the queue), RUNNING (the worker has it), or DONE (in the done list). The worker
 *    reads a job's `cancelled` flag without the lock (an atomic), from SQLite's progress handler.
 * 4. Jobs run one at a time in FIFO order, so one connection is one writer: concurrent handlers
 *    never see "database is locked" from each other (other processes and other db objects on the
 *    same file are waited for by the busy timeout).
 * 5. A cancelled wait: a QUEUED job leaves the queue and is freed at once; a RUNNING one gets its
 *    `cancelled` flag (the progress handler interrupts its statement, only that one) and its
 *    results are dropped on delivery; a DONE one is just not resumed. The connection stays clean
 *    and nobody is resumed by a cancelled job.
 * 6. Closing (db:close, __gc, moonlet_free) sets `quit`: the worker drains the jobs queued before
 *    it, closes the connection and sets `exited`; the async callback then joins the thread and
 *    closes the async handle, whose close callback frees the db struct. moonlet_free cannot wait
 *    for the loop: it interrupts, joins the worker in place and frees what is left.
 * 7. The Lua box holds a pointer to the db, NULLed when it closes: later calls get nil, "closed".
 *    An open db is an instance resource (core.stats counts it) until its thread is joined.
 * 8. INTEGER values (and last_insert_id) come to Lua as numbers, or as decimal strings as the
 *    db's big_numbers mode says (B_*): always, or only beyond 2^53, where a double loses digits.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mlua.h"
#include "sqlite_api.h"

#define DB_MT "moonlet.sqlite"
#define CACHE_MAX 64        /* prepared statements kept per connection */
#define PROGRESS_STEPS 1000 /* VM instructions between checks for cancel and timeout */

enum { J_QUEUED = 0, J_RUNNING, J_DONE };
enum { K_EXEC = 0, K_QUERY };
enum { V_NULL = 0, V_INT, V_REAL, V_TEXT, V_BLOB };
enum { B_NUMBER = 0, B_STRING, B_AUTO }; /* big_numbers: how INTEGER values reach Lua (rule 8) */

/* -- Buffers ------------------------------------------------------------------------------------
 */

typedef struct {
  char *p;
  size_t len, cap;
  int oom;
} buf_t;

static void buf_put(buf_t *b, const void *data, size_t n) {
  if (b->oom) return;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + n)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->len, data, n);
  b->len += n;
}

static void buf_free(buf_t *b) {
  free(b->p);
  memset(b, 0, sizeof *b);
}

/* -- Jobs ---------------------------------------------------------------------------------------
 */

typedef struct {
  int type; /* V_* */
  int64_t i;
  double d;
  size_t off, len;   /* V_TEXT: the bytes at job->pbuf.p + off */
  size_t noff, nlen; /* named binding: the name (without its prefix) in pbuf; nlen 0: positional */
} param_t;

typedef struct job_s job_t;
typedef struct db_s db_t;

struct job_s {
  job_t *next; /* the queue or the done list */
  db_t *db;
  mlua_task_t *task;    /* loop thread: the waiting task; NULL when nobody waits */
  int state;            /* J_*, under db->mu */
  atomic_int cancelled; /* set by the loop thread, read by the worker's progress handler */
  int kind;             /* K_* */
  int big;              /* B_*: the db's big_numbers mode, for the loop thread's conversion */
  uint64_t deadline;    /* uv_hrtime() past which the job fails with "timeout"; 0: none */
  /* input, built by the loop thread before queueing: */
  char *sql;
  size_t sqllen;
  int nparams, named;
  param_t *params;
  buf_t pbuf; /* parameter strings and names */
  /* output, written by the worker: */
  int rc;    /* SQLite result code; SQLITE_OK on success */
  char *err; /* error message (malloc'd) when rc != SQLITE_OK */
  int timed_out;
  buf_t out; /* K_QUERY: names, then rows of tagged values */
  int ncols;
  size_t nrows;
  int64_t changes, last_id;
};

typedef struct {
  char *sql;
  size_t len;
  uint32_t hash;
  sqlite3_stmt *st;
  uint64_t used; /* LRU clock */
} centry_t;

struct db_s {
  /* loop thread only: */
  mlua_res_t res;
  uv_async_t async;
  moonlet_t *m;
  db_t **box;   /* the Lua box, NULLed at close */
  int closing;  /* close requested (box already NULLed) */
  int linked;   /* in the instance's resources */
  int inflight; /* jobs submitted and not yet delivered or dropped */
  int big;      /* B_*: big_numbers (rule 8) */
  uv_thread_t thread;
  /* under mu: */
  uv_mutex_t mu;
  uv_cond_t cv;
  job_t *qhead, *qtail; /* waiting for the worker */
  job_t *dhead, *dtail; /* finished, waiting for the async callback */
  job_t *running;       /* the job the worker has */
  int quit;             /* the worker ends once the queue is empty */
  int exited;           /* the worker is done with everything */
  /* worker thread only (after the thread starts): */
  sqlite3 *conn;
  job_t *cur; /* the job running, for the progress handler */
  centry_t cache[CACHE_MAX];
  int ncache;
  uint64_t clock;
};

static void job_free(job_t *j) {
  free(j->sql);
  free(j->params);
  free(j->err);
  buf_free(&j->pbuf);
  buf_free(&j->out);
  free(j);
}

/* -- On the worker thread -----------------------------------------------------------------------
 */

static uint32_t hash_sql(const char *s, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++)
    h = (h ^ (unsigned char)s[i]) * 16777619u;
  return h;
}

static int only_space(const char *p, const char *end) {
  for (; p < end; p++) {
    if (*p != ' ' && *p != '\n' && *p != '\t' && *p != '\r' && *p != ';') return 0;
  }
  return 1;
}

/* The cached statement for the whole of sql, or NULL. */
static sqlite3_stmt *cache_get(db_t *db, const char *sql, size_t len, uint32_t h) {
  for (int i = 0; i < db->ncache; i++) {
    centry_t *e = &db->cache[i];
    if (e->hash == h && e->len == len && memcmp(e->sql, sql, len) == 0) {
      e->used = ++db->clock;
      return e->st;
    }
  }
  return NULL;
}

/* Keeps st for later; evicts the least recently used entry when full. Returns 0 when st was not
 * kept (out of memory): the caller finalizes it then. */
static int cache_put(db_t *db, const char *sql, size_t len, uint32_t h, sqlite3_stmt *st) {
  char *copy = malloc(len ? len : 1);
  if (!copy) return 0;
  memcpy(copy, sql, len);
  centry_t *e;
  if (db->ncache < CACHE_MAX) {
    e = &db->cache[db->ncache++];
  } else {
    e = &db->cache[0];
    for (int i = 1; i < CACHE_MAX; i++) {
      if (db->cache[i].used < e->used) e = &db->cache[i];
    }
    sqlite3_finalize(e->st);
    free(e->sql);
  }
  e->sql = copy;
  e->len = len;
  e->hash = h;
  e->st = st;
  e->used = ++db->clock;
  return 1;
}

static void cache_clear(db_t *db) {
  for (int i = 0; i < db->ncache; i++) {
    sqlite3_finalize(db->cache[i].st);
    free(db->cache[i].sql);
  }
  db->ncache = 0;
}

/* Interrupts the running statement when its job was cancelled or ran out of time. */
static int on_progress(void *ud) {
  db_t *db = ud;
  job_t *j = db->cur;
  if (!j) return 0;
  if (atomic_load(&j->cancelled)) return 1;
  if (j->deadline && uv_hrtime() > j->deadline) {
    j->timed_out = 1;
    return 1;
  }
  return 0;
}

static void job_fail(job_t *j, int rc, const char *msg) {
  j->rc = rc;
  free(j->err);
  j->err = strdup(msg ? msg : sqlite3_errstr(rc));
}

static void fail_db(job_t *j, db_t *db, int rc) {
  if (j->timed_out || (rc == SQLITE_INTERRUPT && j->deadline && uv_hrtime() > j->deadline)) {
    j->timed_out = 1;
    job_fail(j, rc, "timeout");
    return;
  }
  job_fail(j, rc, sqlite3_errmsg(db->conn));
}

/* Binds the job's parameters to st (positional, or by name when j->named). Returns SQLITE_OK or
 * fails the job. */
static int bind_params(job_t *j, db_t *db, sqlite3_stmt *st) {
  int want = sqlite3_bind_parameter_count(st);
  char msg[160];
  if (!j->named && j->nparams != want) {
    snprintf(msg, sizeof msg, "expected %d parameters, got %d", want, j->nparams);
    job_fail(j, SQLITE_RANGE, msg);
    return SQLITE_RANGE;
  }
  for (int idx = 1; idx <= want; idx++) {
    const param_t *p = NULL;
    if (j->named) {
      const char *name = sqlite3_bind_parameter_name(st, idx);
      if (!name || !name[0] || !name[1]) {
        job_fail(j, SQLITE_RANGE, "named parameters given, but the statement has a '?'");
        return SQLITE_RANGE;
      }
      size_t nlen = strlen(name + 1);
      for (int k = 0; k < j->nparams; k++) {
        const param_t *q = &j->params[k];
        if (q->nlen == nlen && memcmp(j->pbuf.p + q->noff, name + 1, nlen) == 0) {
          p = q;
          break;
        }
      }
      if (!p) continue; /* absent from the table: NULL */
    } else {
      p = &j->params[idx - 1];
    }
    int rc;
    switch (p->type) {
    case V_INT: rc = sqlite3_bind_int64(st, idx, p->i); break;
    case V_REAL: rc = sqlite3_bind_double(st, idx, p->d); break;
    case V_TEXT: {
      /* an empty string may have put nothing in pbuf, whose p is then NULL: SQLite binds a NULL
       * pointer as NULL, never as '' */
      const char *text = p->len ? j->pbuf.p + p->off : "";
      rc = sqlite3_bind_text64(st, idx, text, p->len, SQLITE_STATIC, SQLITE_UTF8);
      break;
    }
    default: rc = sqlite3_bind_null(st, idx); break;
    }
    if (rc != SQLITE_OK) {
      fail_db(j, db, rc);
      return rc;
    }
  }
  return SQLITE_OK;
}

/* Appends the current row of st to j->out: one tag byte per column and its payload. */
static void put_row(job_t *j, sqlite3_stmt *st) {
  for (int c = 0; c < j->ncols; c++) {
    unsigned char tag;
    switch (sqlite3_column_type(st, c)) {
    case SQLITE_INTEGER: {
      tag = V_INT;
      int64_t v = sqlite3_column_int64(st, c);
      buf_put(&j->out, &tag, 1);
      buf_put(&j->out, &v, sizeof v);
      break;
    }
    case SQLITE_FLOAT: {
      tag = V_REAL;
      double v = sqlite3_column_double(st, c);
      buf_put(&j->out, &tag, 1);
      buf_put(&j->out, &v, sizeof v);
      break;
    }
    case SQLITE_TEXT:
    case SQLITE_BLOB: {
      tag = V_TEXT;
      const void *p = sqlite3_column_type(st, c) == SQLITE_TEXT
                          ? (const void *)sqlite3_column_text(st, c)
                          : sqlite3_column_blob(st, c);
      size_t n = (size_t)sqlite3_column_bytes(st, c);
      buf_put(&j->out, &tag, 1);
      buf_put(&j->out, &n, sizeof n);
      buf_put(&j->out, p, n);
      break;
    }
    default:
      tag = V_NULL;
      buf_put(&j->out, &tag, 1);
      break;
    }
  }
  j->nrows++;
}

/* Steps st to the end; a K_QUERY job keeps its rows (those of the last statement with columns). */
static int step_all(job_t *j, db_t *db, sqlite3_stmt *st) {
  int ncols = sqlite3_column_count(st);
  if (j->kind == K_QUERY && ncols > 0) {
    buf_free(&j->out);
    j->nrows = 0;
    j->ncols = ncols;
    for (int c = 0; c < ncols; c++) {
      const char *name = sqlite3_column_name(st, c);
      size_t n = name ? strlen(name) : 0;
      buf_put(&j->out, &n, sizeof n);
      buf_put(&j->out, name, n);
    }
  }
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (j->kind == K_QUERY && ncols > 0) put_row(j, st);
  }
  if (rc != SQLITE_DONE) {
    fail_db(j, db, rc);
    return rc;
  }
  if (j->out.oom) {
    job_fail(j, SQLITE_NOMEM, "out of memory");
    return SQLITE_NOMEM;
  }
  return SQLITE_OK;
}

/* Runs every statement of the job's SQL in turn. A statement that is the whole SQL comes from (and
 * goes back to) the cache; the others are prepared and finalized here. */
static void run_job(db_t *db, job_t *j) {
  if (j->deadline && uv_hrtime() > j->deadline) { /* it waited its whole time in the queue */
    j->timed_out = 1;
    job_fail(j, SQLITE_INTERRUPT, "timeout");
    return;
  }
  db->cur = j;
  const char *sql = j->sql, *end = j->sql + j->sqllen;
  uint32_t h = hash_sql(sql, j->sqllen);
  sqlite3_stmt *st = cache_get(db, sql, j->sqllen, h);
  int rc = SQLITE_OK;
  if (st) {
    rc = bind_params(j, db, st);
    if (rc == SQLITE_OK) step_all(j, db, st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
  } else {
    int first = 1;
    while (sql < end && !only_space(sql, end)) {
      const char *tail = NULL;
      rc = sqlite3_prepare_v3(db->conn, sql, (int)(end - sql), SQLITE_PREPARE_PERSISTENT, &st,
                              &tail);
      if (rc != SQLITE_OK) {
        fail_db(j, db, rc);
        break;
      }
      if (!st) break; /* a comment or white space only */
      int whole = first && only_space(tail, end);
      rc = bind_params(j, db, st);
      if (rc == SQLITE_OK) rc = step_all(j, db, st);
      if (whole) {
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        if (!cache_put(db, j->sql, j->sqllen, h, st)) sqlite3_finalize(st);
      } else {
        sqlite3_finalize(st);
      }
      if (rc != SQLITE_OK) break;
      first = 0;
      sql = tail;
    }
  }
  db->cur = NULL;
  if (j->rc == SQLITE_OK) {
    j->changes = sqlite3_changes64(db->conn);
    j->last_id = sqlite3_last_insert_rowid(db->conn);
  }
}

static void worker_main(void *arg) {
  db_t *db = arg;
  for (;;) {
    uv_mutex_lock(&db->mu);
    while (!db->qhead && !db->quit)
      uv_cond_wait(&db->cv, &db->mu);
    job_t *j = db->qhead;
    if (!j) {
      uv_mutex_unlock(&db->mu);
      break;
    }
    db->qhead = j->next;
    if (!db->qhead) db->qtail = NULL;
    j->next = NULL;
    j->state = J_RUNNING;
    db->running = j;
    uv_mutex_unlock(&db->mu);
    if (atomic_load(&j->cancelled))
      job_fail(j, SQLITE_INTERRUPT, "cancelled");
    else
      run_job(db, j);
    uv_mutex_lock(&db->mu);
    j->state = J_DONE;
    db->running = NULL;
    if (db->dtail)
      db->dtail->next = j;
    else
      db->dhead = j;
    db->dtail = j;
    uv_mutex_unlock(&db->mu);
    uv_async_send(&db->async);
  }
  cache_clear(db);
  sqlite3_close_v2(db->conn);
  db->conn = NULL;
  uv_mutex_lock(&db->mu);
  db->exited = 1;
  uv_mutex_unlock(&db->mu);
  uv_async_send(&db->async);
}

/* -- Back on the loop thread --------------------------------------------------------------------
 */

/* Pushes an INTEGER value as big says (rule 8): a number, or its decimal digits when the mode is
 * B_STRING, or B_AUTO and the value is beyond +-2^53 (a double would round it). */
static void push_int(lua_State *L, int big, int64_t v) {
  const int64_t exact = (int64_t)1 << 53;
  if (big == B_STRING || (big == B_AUTO && (v > exact || v < -exact))) {
    char s[24];
    lua_pushlstring(L, s, (size_t)snprintf(s, sizeof s, "%lld", (long long)v));
  } else {
    lua_pushnumber(L, (lua_Number)v);
  }
}

/* Pushes the results of a finished job on co and returns their count. Runs under
 * mlua_push_protected, on the main state (rows of any size, from a callback: memory running out
 * gives the query nil, "not enough memory" instead of LuaJIT's panic). */
static int push_results(lua_State *co, void *ud) {
  job_t *j = ud;
  if (j->rc != SQLITE_OK) {
    lua_pushnil(co);
    lua_pushstring(co, j->err ? j->err : "error");
    lua_pushstring(co, j->timed_out ? "timeout" : sqlite3_errstr(j->rc));
    return 3;
  }
  if (j->kind == K_EXEC) {
    lua_pushnumber(co, (lua_Number)j->changes);
    push_int(co, j->big, j->last_id);
    return 2;
  }
  lua_checkstack(co, j->ncols + 8);
  lua_createtable(co, (int)j->nrows, 0);
  int rows = lua_gettop(co);
  const char *p = j->out.p;
  for (int c = 0; c < j->ncols; c++) { /* the names, interned once, at rows + 1 + c */
    size_t n;
    memcpy(&n, p, sizeof n);
    p += sizeof n;
    lua_pushlstring(co, p, n);
    p += n;
  }
  for (size_t r = 0; r < j->nrows; r++) {
    lua_createtable(co, 0, j->ncols);
    for (int c = 0; c < j->ncols; c++) {
      unsigned char tag = (unsigned char)*p++;
      if (tag == V_NULL) continue;
      lua_pushvalue(co, rows + 1 + c);
      if (tag == V_INT) {
        int64_t v;
        memcpy(&v, p, sizeof v);
        p += sizeof v;
        push_int(co, j->big, v);
      } else if (tag == V_REAL) {
        double v;
        memcpy(&v, p, sizeof v);
        p += sizeof v;
        lua_pushnumber(co, v);
      } else {
        size_t n;
        memcpy(&n, p, sizeof n);
        p += sizeof n;
        lua_pushlstring(co, p, n);
        p += n;
      }
      lua_rawset(co, -3);
    }
    lua_rawseti(co, rows, (int)r + 1);
  }
  lua_settop(co, rows);
  return 1;
}

static void db_closed(uv_handle_t *h) {
  db_t *db = h->data;
  uv_mutex_destroy(&db->mu);
  uv_cond_destroy(&db->cv);
  free(db);
}

/* The async handle keeps the loop alive only while jobs are in flight (or the db closes): an idle
 * database does not stop a script from ending. */
static void hold(db_t *db, int delta) {
  db->inflight += delta;
  if (db->closing) return;
  if (db->inflight == delta && delta > 0) uv_ref((uv_handle_t *)&db->async);
  if (db->inflight == 0) uv_unref((uv_handle_t *)&db->async);
}

/* The async callback: delivers every finished job, one resume at a time (the Lua that runs may
 * queue, cancel or close), then, once the worker has exited, joins it and closes the handle. */
static void on_async(uv_async_t *h) {
  db_t *db = h->data;
  for (;;) {
    uv_mutex_lock(&db->mu);
    job_t *j = db->dhead;
    if (j) {
      db->dhead = j->next;
      if (!db->dhead) db->dtail = NULL;
    }
    int exited = db->exited;
    uv_mutex_unlock(&db->mu);
    if (!j) {
      if (exited && !uv_is_closing((uv_handle_t *)&db->async)) {
        uv_thread_join(&db->thread);
        if (db->linked) mlua_res_unlink(db->m, &db->res);
        db->linked = 0;
        uv_close((uv_handle_t *)&db->async, db_closed);
      }
      return;
    }
    mlua_task_t *t = j->task;
    j->task = NULL;
    int n = t ? mlua_push_protected(db->m, t->co, push_results, j) : 0;
    job_free(j);
    hold(db, -1);
    if (t) mlua_task_resume(t, n);
  }
}

/* Asks the worker to finish: the jobs queued so far still run. */
static void db_close(db_t *db) {
  if (db->closing) return;
  db->closing = 1;
  uv_ref((uv_handle_t *)&db->async); /* until the worker is joined */
  if (db->box) *db->box = NULL;
  db->box = NULL;
  uv_mutex_lock(&db->mu);
  db->quit = 1;
  uv_cond_signal(&db->cv);
  uv_mutex_unlock(&db->mu);
}

/* A cancelled wait (rule 5): undoes it without resuming anybody. */
static void job_cancel(mlua_task_t *t, void *wait) {
  job_t *j = wait;
  db_t *db = j->db;
  (void)t;
  j->task = NULL;
  uv_mutex_lock(&db->mu);
  if (j->state == J_QUEUED) {
    job_t **pp = &db->qhead, *prev = NULL;
    while (*pp && *pp != j) {
      prev = *pp;
      pp = &(*pp)->next;
    }
    if (*pp) {
      *pp = j->next;
      if (db->qtail == j) db->qtail = prev;
      uv_mutex_unlock(&db->mu);
      job_free(j);
      hold(db, -1);
      return;
    }
  } else if (j->state == J_RUNNING) {
    atomic_store(&j->cancelled, 1);
  }
  uv_mutex_unlock(&db->mu);
}

/* moonlet_free: nothing may be resumed and the loop will not run the async callback for us, so the
 * worker is stopped and joined here. */
static void db_res_close(mlua_res_t *r) {
  db_t *db = (db_t *)r;
  db->linked = 0;
  if (db->box) *db->box = NULL;
  db->box = NULL;
  db->closing = 1;
  uv_mutex_lock(&db->mu);
  for (job_t *j = db->qhead; j; j = j->next) {
    j->task = NULL;
    atomic_store(&j->cancelled, 1);
  }
  if (db->running) atomic_store(&db->running->cancelled, 1);
  db->quit = 1;
  uv_cond_signal(&db->cv);
  uv_mutex_unlock(&db->mu);
  uv_thread_join(&db->thread);
  while (db->dhead) {
    job_t *j = db->dhead;
    db->dhead = j->next;
    job_free(j);
  }
  db->dtail = NULL;
  if (!uv_is_closing((uv_handle_t *)&db->async)) uv_close((uv_handle_t *)&db->async, db_closed);
}

/* -- Lua API ------------------------------------------------------------------------------------
 */

static db_t *check_db(lua_State *L, int idx) {
  db_t **box = luaL_checkudata(L, idx, DB_MT);
  return *box;
}

static int db_gc(lua_State *L) {
  db_t **box = luaL_checkudata(L, 1, DB_MT);
  if (*box) db_close(*box);
  return 0;
}

/* Runs a PRAGMA (or any statement) at open, on the calling thread: the worker does not exist yet.
 */
static int open_exec(sqlite3 *conn, const char *sql) {
  return sqlite3_exec(conn, sql, NULL, NULL, NULL);
}

/* syntax: db, err = core.sqlite_open(path, busy_timeout_seconds, big_numbers)
 * big_numbers: "number" (the default), "string" or "auto" (rule 8). Opens (creating it if missing)
 * the database at path, in WAL mode (except in-memory databases), with synchronous=NORMAL, foreign
 * keys on and the busy timeout, then starts its worker thread. Opening is quick file work done on
 * the calling thread, so it never yields: a module may open its database when it is required. */
static int l_open(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *path = luaL_checkstring(L, 1);
  double busy = luaL_optnumber(L, 2, 5);
  static const char *const bigs[] = {"number", "string", "auto", NULL};
  int big = luaL_checkoption(L, 3, "number", bigs);
  const char *missing = ml_sqlite_load();
  if (missing) return luaL_error(L, "%s", missing);
  sqlite3 *conn = NULL;
  int rc = sqlite3_open_v2(
      path, &conn,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_URI, NULL);
  if (rc != SQLITE_OK) {
    lua_pushnil(L);
    lua_pushstring(L, conn ? sqlite3_errmsg(conn) : sqlite3_errstr(rc));
    sqlite3_close_v2(conn);
    return 2;
  }
  sqlite3_extended_result_codes(conn, 0);
  sqlite3_busy_timeout(conn, busy <= 0 ? 0 : busy >= 2e6 ? 2000000000 : (int)(busy * 1000.0 + 0.5));
  int memory = strcmp(path, ":memory:") == 0 || path[0] == '\0';
  rc = open_exec(conn, "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL");
  if (rc == SQLITE_OK && !memory) rc = open_exec(conn, "PRAGMA journal_mode = WAL");
  if (rc != SQLITE_OK) {
    lua_pushnil(L);
    lua_pushstring(L, sqlite3_errmsg(conn));
    sqlite3_close_v2(conn);
    return 2;
  }
  db_t *db = calloc(1, sizeof *db);
  if (!db) {
    sqlite3_close_v2(conn);
    return luaL_error(L, "moonlet: out of memory");
  }
  db->m = m;
  db->conn = conn;
  db->big = big;
  sqlite3_progress_handler(conn, PROGRESS_STEPS, on_progress, db);
  uv_mutex_init(&db->mu);
  uv_cond_init(&db->cv);
  uv_async_init(m->loop, &db->async, on_async);
  uv_unref((uv_handle_t *)&db->async);
  db->async.data = db;
  if (uv_thread_create(&db->thread, worker_main, db) != 0) {
    sqlite3_close_v2(conn);
    uv_close((uv_handle_t *)&db->async, db_closed);
    lua_pushnil(L);
    lua_pushliteral(L, "cannot start the database thread");
    return 2;
  }
  mlua_res_link(m, &db->res, db_res_close);
  db->linked = 1;
  db_t **box = lua_newuserdata(L, sizeof *box);
  *box = db;
  db->box = box;
  luaL_getmetatable(L, DB_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* Copies the value at idx into p (strings into j->pbuf; LuaJIT's 1LL and 2ULL as integers,
 * exactly). Raises on a value SQLite cannot hold. */
static void take_param(lua_State *L, job_t *j, param_t *p, int idx) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL: p->type = V_NULL; break;
  case LUA_TBOOLEAN:
    p->type = V_INT;
    p->i = lua_toboolean(L, idx);
    break;
  case LUA_TNUMBER: {
    double d = lua_tonumber(L, idx);
    if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
      p->type = V_INT;
      p->i = (int64_t)d;
    } else {
      p->type = V_REAL;
      p->d = d;
    }
    break;
  }
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    p->type = V_TEXT;
    p->off = j->pbuf.len;
    p->len = n;
    buf_put(&j->pbuf, s, n);
    break;
  }
  default: {
    char text[24];
    int is_unsigned;
    if (mlua_int64_text(L, idx, text, &is_unsigned)) { /* 1LL, 2ULL: exactly, as INTEGER */
      unsigned long long u = is_unsigned ? strtoull(text, NULL, 10) : 0;
      if (is_unsigned && u > INT64_MAX) {
        job_free(j);
        luaL_error(L, "moonlet.sqlite: %sULL does not fit SQLite's 64-bit integers", text);
      }
      p->type = V_INT;
      p->i = is_unsigned ? (int64_t)u : (int64_t)strtoll(text, NULL, 10);
      break;
    }
    job_free(j);
    luaL_error(L, "moonlet.sqlite: cannot bind a %s", luaL_typename(L, idx));
  }
  }
}

/* Builds a job from (db, sql, timeout, params...) at 1.. of L: positional parameters from index 4
 * on, or, when the only parameter is a table, named ones from its string keys. Raises on misuse. */
static job_t *build_job(lua_State *L, db_t *db, int kind) {
  size_t sqllen;
  const char *sql = luaL_checklstring(L, 2, &sqllen);
  double timeout = luaL_optnumber(L, 3, 0);
  int top = lua_gettop(L);
  job_t *j = calloc(1, sizeof *j);
  if (!j) luaL_error(L, "moonlet: out of memory");
  j->db = db;
  j->kind = kind;
  j->big = db->big;
  if (timeout > 0) j->deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
  j->sql = malloc(sqllen + 1);
  if (!j->sql) {
    job_free(j);
    luaL_error(L, "moonlet: out of memory");
  }
  memcpy(j->sql, sql, sqllen + 1);
  j->sqllen = sqllen;
  if (top == 4 && lua_type(L, 4) == LUA_TTABLE) {
    j->named = 1;
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, 4)) {
      if (lua_type(L, -2) == LUA_TSTRING) n++;
      lua_pop(L, 1);
    }
    j->params = calloc((size_t)(n ? n : 1), sizeof *j->params);
    if (!j->params) {
      job_free(j);
      luaL_error(L, "moonlet: out of memory");
    }
    lua_pushnil(L);
    while (lua_next(L, 4)) {
      if (lua_type(L, -2) == LUA_TSTRING) {
        param_t *p = &j->params[j->nparams++];
        size_t nlen;
        const char *name = lua_tolstring(L, -2, &nlen);
        take_param(L, j, p, lua_gettop(L));
        p->noff = j->pbuf.len;
        p->nlen = nlen;
        buf_put(&j->pbuf, name, nlen);
      }
      lua_pop(L, 1);
    }
  } else if (top > 3) {
    j->nparams = top - 3;
    j->params = calloc((size_t)j->nparams, sizeof *j->params);
    if (!j->params) {
      job_free(j);
      luaL_error(L, "moonlet: out of memory");
    }
    for (int i = 0; i < j->nparams; i++)
      take_param(L, j, &j->params[i], 4 + i);
  }
  if (j->pbuf.oom) {
    job_free(j);
    luaL_error(L, "moonlet: out of memory");
  }
  return j;
}

static void submit(db_t *db, job_t *j) {
  hold(db, 1);
  uv_mutex_lock(&db->mu);
  j->state = J_QUEUED;
  if (db->qtail)
    db->qtail->next = j;
  else
    db->qhead = j;
  db->qtail = j;
  uv_cond_signal(&db->cv);
  uv_mutex_unlock(&db->mu);
}

static int run(lua_State *L, int kind) {
  db_t *db = check_db(L, 1);
  if (!db) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  job_t *j = build_job(L, db, kind);
  j->task = t;
  submit(db, j);
  return mlua_task_wait(L, t, job_cancel, j);
}

/* syntax: changes, last_insert_id = core.sqlite_exec(db, sql, timeout, ...) -- or nil, err */
static int l_exec(lua_State *L) { return run(L, K_EXEC); }

/* syntax: rows = core.sqlite_query(db, sql, timeout, ...) -- or nil, err; rows of name = value */
static int l_query(lua_State *L) { return run(L, K_QUERY); }

/* syntax: ok = core.sqlite_detach(db, sql) -- queues sql with nobody waiting for it (a rollback
 * on an error path: it runs before anything queued later, whatever happens to the caller) */
static int l_detach(lua_State *L) {
  db_t *db = check_db(L, 1);
  if (!db) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  lua_settop(L, 2);
  job_t *j = build_job(L, db, K_EXEC);
  submit(db, j);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: core.sqlite_libversion() -- a call, not a field set at start: an idle server never
 * touches SQLite's pages */
static int l_libversion(lua_State *L) {
  const char *missing = ml_sqlite_load();
  if (missing) return luaL_error(L, "%s", missing);
  lua_pushstring(L, sqlite3_libversion());
  return 1;
}

/* syntax: core.sqlite_close(db) -- statements queued before still run; later calls: "closed" */
static int l_close(lua_State *L) {
  db_t *db = check_db(L, 1);
  if (db) db_close(db);
  lua_pushboolean(L, 1);
  return 1;
}

static int db_tostring(lua_State *L) {
  db_t *db = check_db(L, 1);
  lua_pushstring(L, db ? "moonlet.sqlite (open)" : "moonlet.sqlite (closed)");
  return 1;
}

void mlua_open_sqlite(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"sqlite_open", l_open},
                                 {"sqlite_exec", l_exec},
                                 {"sqlite_query", l_query},
                                 {"sqlite_detach", l_detach},
                                 {"sqlite_close", l_close},
                                 {"sqlite_libversion", l_libversion},
                                 {NULL, NULL}};
  luaL_newmetatable(L, DB_MT);
  lua_pushliteral(L, DB_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, db_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, db_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
