/* bindings/pg.c: PostgreSQL connections on the loop, with libpq in non-blocking mode:
 * PQconnectStart/PQconnectPoll to connect, PQsendQuery* to send, and the socket watched by a
 * uv_poll so that a task waiting for its result yields. lua/moonlet/pg.lua builds the pool,
 * prepared-statement cache, transactions and LISTEN subscriptions on these core.pg_* functions.
 *
 * Ownership and rules:
 * 1. A connection (pgc_t) is C memory; the Lua box holds a pointer NULLed at close, after which
 *    every call returns nil, "closed". An open connection is an instance resource (core.stats
 *    counts it). Its timer and its poll handle close with it; the struct is freed by the close
 *    callback of the last of them. The poll handle is malloc'd on its own: libpq may change the
 *    socket while connecting, and the old handle is closed before the new one starts.
 * 2. One waiter at a time (a connect, a query, a wait for notifications or for the end of a
 *    drain); a second one gets nil, "busy". Whichever of I/O, timer, close or cancel comes first
 *    takes the waiter (take_waiter) and stops the timer; the resume comes last in each callback.
 * 3. A query's waiter that is cancelled (or whose timeout runs out) cannot take the query back:
 *    the server is asked to cancel it (PQcancel, which blocks, so it runs on libuv's thread pool
 *    with a PGcancel of its own) and the connection DRAINS: its results are read and dropped until
 *    the query ends. It is idle again only once the cancel request is done too (CANCELLING until
 *    then): a request still on its way (the thread pool busy) would cancel the next user's query.
 *    A drain that does not end within DRAIN_MS closes the connection (the drain timer, which no
 *    waiter's timeout replaces). The cancel request points at its connection (c->cancelling,
 *    k->c) until it is done or the connection is freed, whichever comes first.
 * 4. While idle the socket stays watched for reading: notifications are queued (for
 *    core.pg_notification) and a connection the server closed (a restart) is seen at once and
 *    marked broken, so that the pool does not hand it out.
 * 5. Results are converted to Lua values on the loop thread when the query ends (pg_value.c):
 *    int2/4/8, oid, float4/8 and numeric as numbers, bool as booleans, bytea as its raw bytes,
 *    NULL as nil, the arrays of these and of text-like types as tables (a NULL element as
 *    moonlet.pg.null), everything else (text, varchar, json, dates, ...) as its text. int8 and
 *    numeric come as their text instead when the connection's big_numbers mode (B_*) says so:
 *    always, or only when a double would lose a digit of them. A connection made with a JSON
 *    decoder (the pool's json option: moonlet.json.decode, pinned by a registry ref until the
 *    connection closes) gives it json and jsonb values and the elements of json[] and jsonb[]; the
 *    columns it applies to are found once per result (mlua_pg_json_type), so one without pays
 *    no test per value (one per array element). A value the decoder refuses makes the query's
 *    answer nil, err.
 * 6. Parameters go in text format, except a string holding a NUL or bytes that are not UTF-8:
 *    that one goes in binary format (its bytes as they are), so that bytea gets them whole and
 *    text gets the server's encoding error instead of a string cut at the NUL. A parameter that
 *    a prepared statement's description (core.pg_describe, once per statement) says is bytea
 *    always goes in binary format: in text format bytea's input would parse a valid UTF-8
 *    string's backslashes ("\\x41" would be stored as "A").
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/ws.h"
#include "mlua.h"
#include "pg_value.h"
#include "pq_api.h"

#define CONN_MT "moonlet.pg"
#define DRAIN_MS 5000 /* a cancelled query must end within this, else the connection closes */
#define MAX_PARAMS 256

enum { W_NONE = 0, W_CONNECT, W_QUERY, W_NOTIFY, W_READY };
enum { Q_SIMPLE = 0, Q_PARAMS, Q_PREPARE, Q_PREPARED, Q_DESCRIBE }; /* what a query sends */
/* S_CANCELLING: the cancelled query ended, its cancel request has not (rule 3) */
enum { S_CONNECTING = 0, S_IDLE, S_BUSY, S_DRAINING, S_BROKEN, S_CANCELLING };

typedef struct pgc_s pgc_t;

/* A cancel request on the thread pool (rule 3): its PGcancel is the only thing the thread
 * touches. */
typedef struct {
  uv_work_t req;
  PGcancel *cancel;
  pgc_t *c; /* the connection, NULL once freed (touched on the loop thread only) */
} cancel_t;

typedef struct {
  uv_poll_t h;
  pgc_t *c; /* NULL once closed */
} pollh_t;

typedef struct note_s {
  struct note_s *next;
  char *channel, *payload;
} note_t;

struct pgc_s {
  mlua_res_t res;
  uv_timer_t timer;       /* the waiter's timeout (rule 2) */
  uv_timer_t drain_timer; /* bounds DRAINING and CANCELLING (rule 3) */
  pollh_t *poll;          /* watches PQsocket; NULL when there is no socket */
  int fd;                 /* the socket poll watches */
  int events;             /* UV_READABLE | UV_WRITABLE it watches */
  PGconn *conn;           /* NULL once finished */
  moonlet_t *m;
  pgc_t **box; /* the Lua box, NULLed at close */
  int handles; /* open handles (timers, poll); the struct goes with the last */
  int ref;     /* registry ref: the box, pinned while connecting */
  int state;   /* S_* */
  int big;     /* B_* (rule 5) */
  int json;    /* registry ref of the JSON decoder (rule 5), or LUA_NOREF: json as its text */
  int linked, closed;
  mlua_task_t *task;     /* the waiter (rule 2) */
  int wait;              /* W_* of the waiter */
  int mode;              /* Q_* of the last query sent */
  int timed_out;         /* the query's timer ran out: a cancel was sent */
  int flushing;          /* libpq has output to send */
  PGresult *result;      /* the query's last result */
  PGresult *error;       /* the query's first error result */
  char *broken_msg;      /* why the connection broke */
  cancel_t *cancelling;  /* the cancel request in flight, or NULL (rule 3) */
  note_t *nhead, *ntail; /* notifications not yet taken */
};

/* -- Life cycle ------------------------------------------------------------------------------- */

static void maybe_free(pgc_t *c) {
  if (c->handles > 0) return;
  if (c->cancelling) c->cancelling->c = NULL; /* it finishes on its own and frees itself */
  while (c->nhead) {
    note_t *n = c->nhead;
    c->nhead = n->next;
    free(n->channel);
    free(n->payload);
    free(n);
  }
  free(c->broken_msg);
  free(c);
}

static void poll_closed(uv_handle_t *h) {
  pollh_t *p = (pollh_t *)h;
  pgc_t *c = h->data;
  free(p);
  c->handles--;
  maybe_free(c);
}

static void timer_closed(uv_handle_t *h) {
  pgc_t *c = h->data;
  c->handles--;
  maybe_free(c);
}

static void poll_stop(pgc_t *c) {
  if (!c->poll) return;
  c->poll->c = NULL;
  uv_close((uv_handle_t *)&c->poll->h, poll_closed);
  c->poll = NULL;
  c->fd = -1;
  c->events = 0;
}

static void clear_results(pgc_t *c) {
  if (c->result) PQclear(c->result);
  if (c->error) PQclear(c->error);
  c->result = c->error = NULL;
}

/* The poll handle keeps the loop alive only while somebody waits or a query runs or drains: an
 * idle pooled connection does not stop a script from ending. */
static void update_ref(pgc_t *c) {
  if (!c->poll) return;
  if (c->task || c->state != S_IDLE)
    uv_ref((uv_handle_t *)&c->poll->h);
  else
    uv_unref((uv_handle_t *)&c->poll->h);
}

static mlua_task_t *take_waiter(pgc_t *c) {
  mlua_task_t *t = c->task;
  c->task = NULL;
  c->wait = W_NONE;
  uv_timer_stop(&c->timer);
  update_ref(c);
  return t;
}

/* The connection is unusable from now on: its socket is closed (the poll handle first) and the
 * reason is kept for the calls that come. */
static void set_broken(pgc_t *c, const char *why) {
  if (c->state == S_BROKEN) return;
  if (!c->broken_msg) {
    const char *msg = why ? why : (c->conn ? PQerrorMessage(c->conn) : "closed");
    const char *nl = strchr(msg, '\n'); /* the first line says it; the rest is libpq's advice */
    size_t n = nl ? (size_t)(nl - msg) : strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
      n--;
    c->broken_msg = malloc(n + 1);
    if (c->broken_msg) {
      memcpy(c->broken_msg, msg, n);
      c->broken_msg[n] = '\0';
    }
  }
  c->state = S_BROKEN;
  uv_timer_stop(&c->drain_timer);
  poll_stop(c);
  if (c->conn) PQfinish(c->conn);
  c->conn = NULL;
  clear_results(c);
}

static int push_broken(lua_State *L, pgc_t *c) {
  lua_pushnil(L);
  lua_pushstring(L, c->broken_msg && c->broken_msg[0] ? c->broken_msg : "closed");
  lua_pushliteral(L, "closed");
  return 3;
}

/* Closes once: the box forgets it, the handles close, a waiter wakes with nil, "closed". */
static void unpin(pgc_t *c) {
  if (c->ref == LUA_NOREF) return;
  luaL_unref(c->m->L, LUA_REGISTRYINDEX, c->ref);
  c->ref = LUA_NOREF;
}

static void pgc_close(pgc_t *c) {
  if (c->closed) return;
  c->closed = 1;
  unpin(c);
  if (c->json != LUA_NOREF) luaL_unref(c->m->L, LUA_REGISTRYINDEX, c->json);
  c->json = LUA_NOREF;
  if (c->box) *c->box = NULL;
  c->box = NULL;
  if (c->linked) mlua_res_unlink(c->m, &c->res);
  c->linked = 0;
  mlua_task_t *t = take_waiter(c);
  set_broken(c, "closed");
  uv_close((uv_handle_t *)&c->timer, timer_closed);
  uv_close((uv_handle_t *)&c->drain_timer, timer_closed);
  if (t) mlua_task_resume(t, mlua_push_error_to(c->m, t->co, UV_EPIPE));
}

static void pgc_res_close(mlua_res_t *r) {
  pgc_t *c = (pgc_t *)r;
  c->linked = 0;
  c->task = NULL; /* the instance is going away: nobody is resumed */
  c->wait = W_NONE;
  pgc_close(c);
}

/* -- Cancel requests on the thread pool ----------------------------------------------------------
 */

static void drain_over(pgc_t *c);

static void cancel_run(uv_work_t *req) {
  cancel_t *k = req->data;
  char err[256];
  PQcancel(k->cancel, err, sizeof err); /* the query ends with an error, or was over already */
}

static void cancel_done(uv_work_t *req, int status) {
  cancel_t *k = req->data;
  pgc_t *c = k->c;
  (void)status;
  PQfreeCancel(k->cancel);
  free(k);
  if (!c) return;
  c->cancelling = NULL;
  if (c->state == S_CANCELLING) drain_over(c); /* the query ended before: idle now */
}

/* Asks the server to cancel the running query, from a thread-pool thread (PQcancel connects and
 * waits). Best effort: the drain timer closes the connection if the query does not end. */
static void send_cancel(pgc_t *c) {
  if (!c->conn || c->cancelling) return;
  cancel_t *k = malloc(sizeof *k);
  if (!k) return;
  k->cancel = PQgetCancel(c->conn);
  if (!k->cancel) {
    free(k);
    return;
  }
  k->req.data = k;
  k->c = c;
  c->cancelling = k;
  uv_queue_work(c->m->loop, &k->req, cancel_run, cancel_done);
}

/* -- Socket watching ------------------------------------------------------------------------------
 */

static void on_poll(uv_poll_t *h, int status, int events);
static void on_timer(uv_timer_t *h);
static void on_drain_timer(uv_timer_t *h);

/* Watches the connection's current socket for `events`, replacing the handle when libpq changed
 * the socket. Returns 0 or a negative UV error. */
static int watch(pgc_t *c, int events) {
  int fd = c->conn ? PQsocket(c->conn) : -1;
  if (fd < 0) return UV_EBADF;
  if (c->poll && c->fd != fd) poll_stop(c);
  if (!c->poll) {
    pollh_t *p = malloc(sizeof *p);
    if (!p) return UV_ENOMEM;
    int r = uv_poll_init_socket(c->m->loop, &p->h, fd);
    if (r < 0) {
      free(p);
      return r;
    }
    p->c = c;
    p->h.data = c;
    c->poll = p;
    c->fd = fd;
    c->events = 0;
    c->handles++;
  }
  if (events != c->events) {
    int r = uv_poll_start(&c->poll->h, events, on_poll);
    if (r < 0) return r;
    c->events = events;
  }
  update_ref(c);
  return 0;
}

static void start_timer(pgc_t *c, int64_t ms) {
  if (ms < 0) return;
  uv_update_time(c->m->loop);
  uv_timer_start(&c->timer, on_timer, mlua_wait_ms((uint64_t)ms), 0);
}

/* Bounds a drain (rule 3) unless a bound runs already. */
static void start_drain(pgc_t *c) {
  if (uv_is_active((uv_handle_t *)&c->drain_timer)) return;
  uv_update_time(c->m->loop);
  uv_timer_start(&c->drain_timer, on_drain_timer, DRAIN_MS, 0);
}

/* -- Results ---------------------------------------------------------------------------------- */

/* The type column f of res is decoded as: its OID, or the pseudo type of a JSON column when the
 * connection decodes JSON (pg_value.h). */
static unsigned column_type(const PGresult *res, int f, int json) {
  Oid t = PQftype(res, f);
  return json ? mlua_pg_json_type(t) : t;
}

/* Pushes rows (an array of name = value tables), the affected row count and the command tag
 * ("COMMIT", or "ROLLBACK" when the server rolled an aborted transaction back instead). Raises
 * when the JSON decoder (json: its registry ref, or LUA_NOREF) refuses a value (pg_value.h). */
static int push_rows(lua_State *L, const PGresult *res, int big, int json) {
  int nrows = res ? PQntuples(res) : 0, nf = res ? PQnfields(res) : 0;
  lua_checkstack(L, nf + 8 + LUA_MINSTACK); /* a bytea's luaL_Buffer takes a few slots */
  lua_createtable(L, nrows, 0);
  int rows = lua_gettop(L);
  int decode = json != LUA_NOREF && nrows > 0;
  unsigned types[64];
  for (int f = 0; f < nf; f++) {
    lua_pushstring(L, PQfname(res, f));
    if (f < 64) types[f] = column_type(res, f, decode);
  }
  lua_pushnil(L); /* the arrays' scratch (pg_value.h), made when an element needs it */
  mlua_pg_decode_t d = {big, 0, {lua_gettop(L), NULL, 0}};
  if (decode) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, json);
    d.json = lua_gettop(L);
  }
  for (int r = 0; r < nrows; r++) {
    lua_createtable(L, 0, nf);
    for (int f = 0; f < nf; f++) {
      if (PQgetisnull(res, r, f)) continue;
      lua_pushvalue(L, rows + 1 + f);
      mlua_pg_push_value(L, PQgetvalue(res, r, f), (size_t)PQgetlength(res, r, f),
                         f < 64 ? types[f] : column_type(res, f, decode), &d);
      lua_rawset(L, -3);
    }
    lua_rawseti(L, rows, r + 1);
  }
  lua_settop(L, rows);
  const char *n = res ? PQcmdTuples((PGresult *)res) : "";
  lua_pushnumber(L, n[0] ? strtod(n, NULL) : nrows);
  lua_pushstring(L, res ? PQcmdStatus((PGresult *)res) : "");
  return 3;
}

/* Pushes nil, the server's primary message (it names the constraint that failed), SQLSTATE, and
 * true when the error says a prepared statement went stale (its result type changed with the
 * schema: "cached plan must not change result type", raised by RevalidateCachedQuery), which
 * lua/moonlet/pg.lua answers by preparing it again. */
static int push_result_error(lua_State *L, const PGresult *res) {
  const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  lua_pushnil(L);
  if (msg) {
    lua_pushstring(L, msg);
  } else {
    const char *m = PQresultErrorMessage(res);
    size_t n = strlen(m);
    while (n > 0 && (m[n - 1] == '\n' || m[n - 1] == ' '))
      n--;
    lua_pushlstring(L, m, n);
  }
  lua_pushstring(L, state ? state : "");
  const char *fn = PQresultErrorField(res, PG_DIAG_SOURCE_FUNCTION);
  if (state && strcmp(state, "0A000") == 0 && fn && strcmp(fn, "RevalidateCachedQuery") == 0) {
    lua_pushboolean(L, 1);
    return 4;
  }
  return 3;
}

/* Pushes what core.pg_describe answers for the statement described by res: a string of one
 * letter per parameter, "b" for a bytea one (always sent in binary format, rule 6), "a" for a
 * bytea[] one (pg.lua writes a table given for it with hex elements) and "t" for the others; or
 * false when none is bytea or bytea[], the common case, which costs each query nothing. */
static int push_formats(lua_State *L, const PGresult *res) {
  int n = res ? PQnparams(res) : 0, any = 0;
  for (int i = 0; i < n && !any; i++)
    any = PQparamtype(res, i) == 17 || PQparamtype(res, i) == 1001;
  if (!any) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_checkstack(L, LUA_MINSTACK);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (int i = 0; i < n; i++)
    luaL_addchar(&b, PQparamtype(res, i) == 17 ? 'b' : PQparamtype(res, i) == 1001 ? 'a' : 't');
  luaL_pushresult(&b);
  return 1;
}

/* -- Progress --------------------------------------------------------------------------------- */

static void queue_notifies(pgc_t *c) {
  PGnotify *n;
  while (c->conn && (n = PQnotifies(c->conn)) != NULL) {
    note_t *e = calloc(1, sizeof *e);
    if (e) {
      e->channel = strdup(n->relname);
      e->payload = strdup(n->extra ? n->extra : "");
      if (!e->channel || !e->payload) {
        free(e->channel);
        free(e->payload);
        free(e);
        e = NULL;
      }
    }
    PQfreemem(n);
    if (!e) continue;
    if (c->ntail)
      c->ntail->next = e;
    else
      c->nhead = e;
    c->ntail = e;
  }
}

static int push_notify(lua_State *L, void *ud) {
  note_t *e = ud;
  lua_pushstring(L, e->channel);
  lua_pushstring(L, e->payload);
  return 2;
}

/* push_broken on a waiter from a callback (mlua_push_result: the message may be new). */
static int push_broken_cb(lua_State *L, void *ud) { return push_broken(L, ud); }

/* Pushes the oldest notification (channel, payload) on L; 0 when there is none. From a callback
 * (cb) it is pushed on the waiter through mlua_push_result, and stays queued when memory ran out
 * (the waiter gets nil, "not enough memory"). */
static int pop_notify(lua_State *L, pgc_t *c, int cb) {
  note_t *e = c->nhead;
  if (!e) return 0;
  int n = cb ? mlua_push_result(c->m, L, push_notify, e) : push_notify(L, e);
  if (lua_isnil(L, -n)) return n;
  c->nhead = e->next;
  if (!c->nhead) c->ntail = NULL;
  free(e->channel);
  free(e->payload);
  free(e);
  return 2;
}

/* The connection broke while somebody waited: they get the reason. */
static void fail_waiter(pgc_t *c) {
  if (!c->task) return;
  mlua_task_t *t = take_waiter(c);
  mlua_task_resume(t, mlua_push_result(c->m, t->co, push_broken_cb, c));
}

/* How the query ended, for mlua_push_protected (rows of any size, pushed from a callback). */
static int push_answer(lua_State *L, void *ud) {
  pgc_t *c = ud;
  if (c->state == S_BROKEN) return push_broken(L, c);
  if (c->timed_out) return mlua_push_error(L, UV_ETIMEDOUT);
  if (c->error) return push_result_error(L, c->error);
  if (c->mode == Q_DESCRIBE) return push_formats(L, c->result);
  return push_rows(L, c->result, c->big, c->json);
}

/* Answers the query's waiter with how the query ended (the connection is idle or broken now). */
static void answer_query(pgc_t *c) {
  mlua_task_t *t = take_waiter(c);
  int n = mlua_push_protected(c->m, t->co, push_answer, c);
  clear_results(c);
  c->timed_out = 0;
  mlua_task_resume(t, n);
}

/* A drained connection (its query ended, its cancel request is done) is idle again: the task
 * waiting for that query (past its timeout) or for the drain (core.pg_wait_ready) goes on. */
static void drain_over(pgc_t *c) {
  c->state = S_IDLE;
  uv_timer_stop(&c->drain_timer);
  update_ref(c);
  if (c->wait == W_QUERY) {
    answer_query(c);
    return;
  }
  clear_results(c);
  c->timed_out = 0;
  if (c->wait == W_READY) {
    mlua_task_t *t = take_waiter(c);
    lua_pushboolean(t->co, 1);
    mlua_task_resume(t, 1);
  }
}

/* The query (or drain) ended: the connection is idle again, watched for reading only; or, while
 * its cancel request is still on its way, CANCELLING until that is done (rule 3), and the
 * query's waiter (its timeout ran out) is answered then, so that what it does next (a ROLLBACK)
 * finds the connection idle. */
static void query_ended(pgc_t *c) {
  int draining = c->state == S_DRAINING;
  c->flushing = 0;
  if (c->cancelling) {
    c->state = S_CANCELLING;
    start_drain(c);
  } else {
    c->state = S_IDLE;
  }
  if (watch(c, UV_READABLE) < 0) set_broken(c, "cannot watch the socket");
  if (c->state == S_BROKEN) {
    if (c->wait == W_QUERY)
      answer_query(c);
    else
      fail_waiter(c);
    return;
  }
  if (c->state == S_CANCELLING) { /* drain_over answers; the drain timer bounds the wait now */
    if (c->wait == W_QUERY) uv_timer_stop(&c->timer);
    return;
  }
  if (c->wait == W_QUERY) {
    answer_query(c);
    return;
  }
  if (draining) {
    drain_over(c);
  } else {
    clear_results(c);
    c->timed_out = 0;
  }
}

/* Reads what the server sent and collects results; ends the query when libpq has no more. */
static void read_results(pgc_t *c) {
  if (!PQconsumeInput(c->conn)) {
    set_broken(c, NULL);
    fail_waiter(c);
    return;
  }
  queue_notifies(c);
  if (c->state == S_BUSY || c->state == S_DRAINING) {
    while (!PQisBusy(c->conn)) {
      PGresult *res = PQgetResult(c->conn);
      if (!res) {
        query_ended(c);
        return;
      }
      ExecStatusType st = PQresultStatus(res);
      if (st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE || st == PGRES_NONFATAL_ERROR) {
        if (!c->error && st != PGRES_NONFATAL_ERROR)
          c->error = res;
        else
          PQclear(res);
      } else if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
        PQclear(res);
        set_broken(c, "COPY is not supported");
        fail_waiter(c);
        return;
      } else {
        if (c->result) PQclear(c->result);
        c->result = res;
      }
    }
    return;
  }
  if (PQstatus(c->conn) == CONNECTION_BAD) {
    set_broken(c, NULL);
    fail_waiter(c);
    return;
  }
  if (c->wait == W_NOTIFY && c->nhead) {
    mlua_task_t *t = take_waiter(c);
    mlua_task_resume(t, pop_notify(t->co, c, 1));
  }
}

/* One step of PQconnectPoll; resumes the connecter when it is over. */
static void connect_step(pgc_t *c) {
  PostgresPollingStatusType st = PQconnectPoll(c->conn);
  int r = 0;
  switch (st) {
  case PGRES_POLLING_READING: r = watch(c, UV_READABLE); break;
  case PGRES_POLLING_WRITING: r = watch(c, UV_WRITABLE); break;
  case PGRES_POLLING_OK: {
    PQsetnonblocking(c->conn, 1);
    c->state = S_IDLE;
    r = watch(c, UV_READABLE);
    if (r < 0) break;
    mlua_task_t *t = take_waiter(c);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, c->ref); /* the box */
    unpin(c);
    mlua_task_resume(t, 1);
    return;
  }
  default: r = UV_ECONNREFUSED; break;
  }
  if (r == 0) return;
  /* failed: the connection goes with the attempt, the connecter gets libpq's reason */
  mlua_task_t *t = take_waiter(c);
  set_broken(c, NULL);
  int n = mlua_push_result(c->m, t->co, push_broken_cb, c);
  pgc_close(c);
  mlua_task_resume(t, n);
}

static void on_poll(uv_poll_t *h, int status, int events) {
  pgc_t *c = h->data;
  if (((pollh_t *)h)->c != c || c->state == S_BROKEN) return;
  if (c->state == S_CONNECTING) {
    connect_step(c);
    return;
  }
  if (status < 0) { /* libuv stopped the handle (POLLERR): let libpq find out, then re-arm */
    c->events = 0;
    events = UV_READABLE;
  }
  if ((events & UV_WRITABLE) && c->flushing) {
    int r = PQflush(c->conn);
    if (r < 0) {
      set_broken(c, NULL);
      fail_waiter(c);
      return;
    }
    if (r == 0) {
      c->flushing = 0;
      if (watch(c, UV_READABLE) < 0) {
        set_broken(c, "cannot watch the socket");
        fail_waiter(c);
        return;
      }
    }
  }
  if (events & UV_READABLE) read_results(c);
  if (c->state != S_BROKEN && c->poll && c->events == 0 &&
      watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0)) < 0) {
    set_broken(c, "cannot watch the socket");
    fail_waiter(c);
  }
}

static void on_timer(uv_timer_t *h) {
  pgc_t *c = h->data;
  switch (c->wait) {
  case W_QUERY:
    if (!c->timed_out) { /* ask the server to stop, then wait for the query to end */
      c->timed_out = 1;
      send_cancel(c);
      start_timer(c, DRAIN_MS);
      return;
    }
    set_broken(c, "timeout"); /* the server did not stop in time: drop the connection */
    {
      mlua_task_t *t = take_waiter(c);
      mlua_task_resume(t, mlua_push_error_to(c->m, t->co, UV_ETIMEDOUT));
    }
    return;
  case W_CONNECT: {
    mlua_task_t *t = take_waiter(c);
    pgc_close(c);
    mlua_task_resume(t, mlua_push_error_to(c->m, t->co, UV_ETIMEDOUT));
    return;
  }
  case W_NOTIFY:
  case W_READY: {
    mlua_task_t *t = take_waiter(c);
    mlua_task_resume(t, mlua_push_error_to(c->m, t->co, UV_ETIMEDOUT));
    return;
  }
  default: return;
  }
}

static void on_drain_timer(uv_timer_t *h) {
  pgc_t *c = h->data;
  if (c->state == S_DRAINING)
    set_broken(c, "a cancelled query did not end");
  else if (c->state == S_CANCELLING)
    set_broken(c, "a cancel request did not finish");
  else
    return;
  fail_waiter(c);
}

/* A cancelled wait (sched.c rule 6): undone without resuming. A query goes on draining (rule 3);
 * a connect is abandoned with its connection. */
static void pgc_cancel(mlua_task_t *t, void *wait) {
  pgc_t *c = wait;
  (void)t;
  int w = c->wait;
  take_waiter(c);
  if (w == W_QUERY && c->state == S_BUSY) {
    c->state = S_DRAINING;
    if (!c->timed_out) send_cancel(c);
    c->timed_out = 0;
    start_drain(c);
  } else if (w == W_CONNECT) {
    pgc_close(c);
  }
}

/* -- Lua API ------------------------------------------------------------------------------------
 */

static pgc_t *check_conn(lua_State *L) {
  pgc_t **box = luaL_checkudata(L, 1, CONN_MT);
  return *box;
}

static int64_t to_ms(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  double secs = luaL_checknumber(L, idx);
  return secs <= 0 ? 0 : (int64_t)mlua_ms(secs);
}

static int busy(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "busy");
  return 2;
}

static void quiet_notice(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

/* syntax: conn, err = core.pg_connect(conninfo, timeout, big_numbers, json_decoder) -- conninfo:
 * "postgresql://..." or "host=... port=... dbname=..."; big_numbers: "number" (the default),
 * "string" or "auto" (rule 5); json_decoder: nil (json as its text) or a function(text) that
 * returns the value, or nil, err (moonlet.json.decode), given the json and jsonb values (rule 5) */
static int l_connect(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *info = luaL_checkstring(L, 1);
  int64_t ms = lua_isnoneornil(L, 2) ? 10000 : to_ms(L, 2);
  static const char *const bigs[] = {"number", "string", "auto", NULL};
  int big = luaL_checkoption(L, 3, "number", bigs);
  if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TFUNCTION);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  const char *why = ml_pq_load();
  if (why) return luaL_error(L, "moonlet.pg: %s", why);
  PGconn *conn = PQconnectStart(info);
  if (!conn) return luaL_error(L, "moonlet: out of memory");
  if (PQstatus(conn) == CONNECTION_BAD) {
    lua_pushnil(L);
    const char *msg = PQerrorMessage(conn);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
      n--;
    lua_pushlstring(L, msg, n);
    PQfinish(conn);
    return 2;
  }
  PQsetNoticeProcessor(conn, quiet_notice, NULL); /* notices are not errors: not on stderr */
  pgc_t *c = calloc(1, sizeof *c);
  if (!c) {
    PQfinish(conn);
    return luaL_error(L, "moonlet: out of memory");
  }
  c->m = m;
  c->conn = conn;
  c->big = big;
  c->json = LUA_NOREF;
  if (!lua_isnoneornil(L, 4)) {
    lua_pushvalue(L, 4);
    c->json = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  c->fd = -1;
  c->ref = LUA_NOREF;
  c->state = S_CONNECTING;
  uv_timer_init(m->loop, &c->timer);
  c->timer.data = c;
  uv_timer_init(m->loop, &c->drain_timer);
  c->drain_timer.data = c;
  c->handles = 2;
  mlua_res_link(m, &c->res, pgc_res_close);
  c->linked = 1;
  pgc_t **box = lua_newuserdata(L, sizeof *box);
  *box = c;
  c->box = box;
  luaL_getmetatable(L, CONN_MT);
  lua_setmetatable(L, -2);
  int r = watch(c, UV_WRITABLE); /* PQconnectPoll starts as if it had said "writing" */
  if (r < 0) {
    pgc_close(c);
    return mlua_push_error(L, r);
  }
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX); /* the box, until the connect ends */
  c->task = t;
  update_ref(c);
  c->wait = W_CONNECT;
  start_timer(c, ms);
  return mlua_task_wait(L, t, pgc_cancel, c);
}

/* Is s[0..n) text libpq can send in text format: no NUL, well-formed UTF-8 (no overlong forms,
 * no surrogates, nothing past U+10FFFF: core/ws.c's validator, which takes ASCII eight bytes at a
 * time: the common case's whole cost)? */
static int plain_text(const char *s, size_t n) {
  uint32_t st = 0;
  return memchr(s, 0, n) == NULL && ml_utf8_check(&st, (const uint8_t *)s, n) == 0 && st == 0;
}

/* Formats the Lua value at idx as a text parameter into buf (numbers, booleans) or returns the
 * string itself; NULL for nil. LuaJIT's 64-bit integers (1LL, 2ULL) go as their digits. *binary,
 * set already for a bytea parameter, is set for a string that is not plain text (rule 6). Raises on
 * a value with no text form. */
static const char *param_text(lua_State *L, int idx, char *buf, size_t size, int *len,
                              int *binary) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL: return NULL;
  case LUA_TBOOLEAN: *len = 1; return lua_toboolean(L, idx) ? "t" : "f";
  case LUA_TNUMBER: {
    double d = lua_tonumber(L, idx);
    if (isnan(d))
      *len = snprintf(buf, size, "NaN");
    else if (isinf(d))
      *len = snprintf(buf, size, d > 0 ? "Infinity" : "-Infinity");
    else if (d == floor(d) && fabs(d) < 9007199254740992.0)
      *len = snprintf(buf, size, "%lld", (long long)d);
    else
      *len = snprintf(buf, size, "%.17g", d);
    return buf;
  }
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    if (n > INT_MAX) luaL_error(L, "moonlet.pg: a parameter is too long");
    *len = (int)n;
    if (!*binary) *binary = !plain_text(s, n); /* a bytea one needs no scan */
    return s;
  }
  default: {
    int is_unsigned;
    size_t n = size >= 24 ? mlua_int64_text(L, idx, buf, &is_unsigned) : 0;
    if (n) { /* 1LL, 2ULL: the server parses their digits into int8 or numeric exactly */
      *len = (int)n;
      return buf;
    }
    luaL_error(L, "moonlet.pg: cannot send a %s as a parameter", luaL_typename(L, idx));
    return NULL;
  }
  }
}

/* The common part of every query: (conn, text, timeout, params...) where text is SQL or a
 * statement name; Q_PREPARE takes the SQL before the parameters, Q_PREPARED the statement's
 * formats (what core.pg_describe answered). Sends it (libpq copies the parameters into its buffer
 * at once, so nothing is pinned), then waits for the end of the results. */
static int send_query(lua_State *L, int mode) {
  pgc_t *c = check_conn(L);
  const char *text = luaL_checkstring(L, 2);
  int64_t ms = to_ms(L, 3);
  const char *sql = mode == Q_PREPARE ? luaL_checkstring(L, 4) : NULL;
  size_t nbin = 0; /* Q_PREPARED: "b" for each parameter that goes in binary format (rule 6) */
  const char *bin =
      mode == Q_PREPARED && lua_type(L, 4) == LUA_TSTRING ? lua_tolstring(L, 4, &nbin) : NULL;
  int first = mode == Q_PREPARE || mode == Q_PREPARED ? 5 : 4;
  int n = mode == Q_DESCRIBE ? 0 : lua_gettop(L) - first + 1;
  if (n < 0) n = 0;
  if (n > MAX_PARAMS) return luaL_error(L, "moonlet.pg: more than %d parameters", MAX_PARAMS);
  if (!c) return mlua_push_error(L, UV_EPIPE);
  if (c->state == S_BROKEN) return push_broken(L, c);
  if (c->task || c->state != S_IDLE) return busy(L);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  const char *values[MAX_PARAMS];
  int lengths[MAX_PARAMS];
  int formats[MAX_PARAMS];
  char nums[MAX_PARAMS][32];
  int binary = 0; /* any parameter in binary format: formats is passed only then */
  for (int i = 0; i < n; i++) {
    formats[i] = bin && (size_t)i < nbin && bin[i] == 'b'; /* bytea: byte for byte */
    values[i] = param_text(L, first + i, nums[i], sizeof nums[i], &lengths[i], &formats[i]);
    binary |= formats[i];
  }
  const int *fmts = binary ? formats : NULL;
  int ok;
  switch (mode) {
  case Q_SIMPLE: ok = PQsendQuery(c->conn, text); break;
  case Q_PARAMS: ok = PQsendQueryParams(c->conn, text, n, NULL, values, lengths, fmts, 0); break;
  case Q_PREPARE: ok = PQsendPrepare(c->conn, text, sql, 0, NULL); break;
  case Q_DESCRIBE: ok = PQsendDescribePrepared(c->conn, text); break;
  default: ok = PQsendQueryPrepared(c->conn, text, n, values, lengths, fmts, 0); break;
  }
  if (!ok) {
    if (PQstatus(c->conn) == CONNECTION_BAD) {
      set_broken(c, NULL);
      return push_broken(L, c);
    }
    lua_pushnil(L);
    const char *msg = PQerrorMessage(c->conn);
    size_t len = strlen(msg);
    while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' '))
      len--;
    lua_pushlstring(L, msg, len);
    return 2;
  }
  c->state = S_BUSY;
  c->mode = mode;
  c->timed_out = 0;
  int f = PQflush(c->conn);
  if (f < 0) {
    set_broken(c, NULL);
    return push_broken(L, c);
  }
  c->flushing = f == 1;
  int r = watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
  if (r < 0) {
    set_broken(c, "cannot watch the socket");
    return push_broken(L, c);
  }
  c->task = t;
  update_ref(c);
  c->wait = W_QUERY;
  start_timer(c, ms);
  return mlua_task_wait(L, t, pgc_cancel, c);
}

/* syntax: rows, count, tag = core.pg_exec(conn, sql, timeout) -- the simple protocol: several
 * statements may be given; rows, count and command tag of the last; or nil, message, sqlstate
 * (and true when a prepared statement went stale, see push_result_error) */
static int l_exec(lua_State *L) { return send_query(L, Q_SIMPLE); }

/* syntax: rows, count = core.pg_query(conn, sql, timeout, ...) -- $1.. bound to the values */
static int l_query(lua_State *L) { return send_query(L, Q_PARAMS); }

/* syntax: ok, err = core.pg_prepare(conn, name, timeout, sql) */
static int l_prepare(lua_State *L) { return send_query(L, Q_PREPARE); }

/* syntax: formats, err = core.pg_describe(conn, name, timeout) -- the prepared statement's
 * parameters: false when none is bytea, else a string with "b" for each bytea one and "t" for the
 * others, for core.pg_execute (rule 6) */
static int l_describe(lua_State *L) { return send_query(L, Q_DESCRIBE); }

/* syntax: rows, count = core.pg_execute(conn, name, timeout, formats, ...) -- a prepared
 * statement; formats: what core.pg_describe answered for it (false or nil: none is bytea) */
static int l_execute(lua_State *L) { return send_query(L, Q_PREPARED); }

/* syntax: channel, payload = core.pg_notification(conn, timeout) -- the next NOTIFY of a channel
 * this connection LISTENs to; nil, "timeout" | "closed" */
static int l_notification(lua_State *L) {
  pgc_t *c = check_conn(L);
  int64_t ms = to_ms(L, 2);
  if (!c) return mlua_push_error(L, UV_EPIPE);
  int n = pop_notify(L, c, 0);
  if (n) return n;
  if (c->state == S_BROKEN) return push_broken(L, c);
  if (c->task) return busy(L);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  c->task = t;
  update_ref(c);
  c->wait = W_NOTIFY;
  start_timer(c, ms);
  return mlua_task_wait(L, t, pgc_cancel, c);
}

/* syntax: ok, err = core.pg_wait_ready(conn, timeout) -- waits for a cancelled query to drain */
static int l_wait_ready(lua_State *L) {
  pgc_t *c = check_conn(L);
  int64_t ms = to_ms(L, 2);
  if (!c) return mlua_push_error(L, UV_EPIPE);
  if (c->state == S_BROKEN) return push_broken(L, c);
  if (c->state == S_IDLE) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (c->task) return busy(L);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  c->task = t;
  update_ref(c);
  c->wait = W_READY;
  start_timer(c, ms);
  return mlua_task_wait(L, t, pgc_cancel, c);
}

/* syntax: state, tx = core.pg_status(conn, probe) -- state: "idle" | "busy" | "draining" |
 * "broken" | "closed" | "connecting"; tx: "idle" | "intrans" | "inerror" | "active" | "unknown".
 * With probe, an idle connection nobody waits on first reads what the server sent (no wait). */
static int l_status(lua_State *L) {
  pgc_t *c = check_conn(L);
  if (c && c->state == S_IDLE && !c->task && lua_toboolean(L, 2)) {
    /* probe: read what is pending without blocking. A server that closed the connection since
     * the idle watch last ran (a restart, pg_terminate_backend) has left its goodbye (a FATAL
     * message, which libpq reads as a notice while idle) and its EOF in the socket: two reads
     * take both, since one that got data returns without looking for the EOF behind it. The
     * connection is then seen broken before a query is sent on it. */
    int alive = PQconsumeInput(c->conn) && PQconsumeInput(c->conn);
    if (alive) PQisBusy(c->conn); /* parses what came: notifications, the goodbye */
    if (!alive || PQstatus(c->conn) == CONNECTION_BAD)
      set_broken(c, NULL);
    else
      queue_notifies(c);
  }
  static const char *names[] = {"connecting", "idle", "busy", "draining", "broken", "draining"};
  lua_pushstring(L, c ? names[c->state] : "closed");
  const char *tx = "unknown";
  if (c && c->conn && c->state != S_CONNECTING) {
    switch (PQtransactionStatus(c->conn)) {
    case PQTRANS_IDLE: tx = "idle"; break;
    case PQTRANS_INTRANS: tx = "intrans"; break;
    case PQTRANS_INERROR: tx = "inerror"; break;
    case PQTRANS_ACTIVE: tx = "active"; break;
    default: break;
    }
  }
  lua_pushstring(L, tx);
  return 2;
}

/* syntax: pid = core.pg_backend_pid(conn) -- the server process serving the connection */
static int l_backend_pid(lua_State *L) {
  pgc_t *c = check_conn(L);
  if (!c || !c->conn) return mlua_push_error(L, UV_EPIPE);
  lua_pushinteger(L, PQbackendPID(c->conn));
  return 1;
}

/* syntax: s = core.pg_escape_identifier(conn, name) -- "name", quoted for SQL */
static int l_escape_identifier(lua_State *L) {
  pgc_t *c = check_conn(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  if (!c || !c->conn) return mlua_push_error(L, UV_EPIPE);
  char *e = PQescapeIdentifier(c->conn, s, n);
  if (!e) return luaL_error(L, "moonlet.pg: cannot quote that identifier");
  lua_pushstring(L, e);
  PQfreemem(e);
  return 1;
}

/* syntax: core.pg_close(conn) -- a waiter wakes with nil, "closed"; closing twice is harmless */
static int l_close(lua_State *L) {
  pgc_t *c = check_conn(L);
  if (c) pgc_close(c);
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_gc(lua_State *L) {
  pgc_t **box = luaL_checkudata(L, 1, CONN_MT);
  if (*box) pgc_close(*box);
  return 0;
}

static int conn_tostring(lua_State *L) {
  pgc_t *c = check_conn(L);
  lua_pushfstring(L, "moonlet.pg (%s)", c ? (c->state == S_BROKEN ? "broken" : "open") : "closed");
  return 1;
}

void mlua_open_pg(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"pg_connect", l_connect},
                                 {"pg_exec", l_exec},
                                 {"pg_query", l_query},
                                 {"pg_prepare", l_prepare},
                                 {"pg_describe", l_describe},
                                 {"pg_execute", l_execute},
                                 {"pg_notification", l_notification},
                                 {"pg_wait_ready", l_wait_ready},
                                 {"pg_status", l_status},
                                 {"pg_backend_pid", l_backend_pid},
                                 {"pg_escape_identifier", l_escape_identifier},
                                 {"pg_close", l_close},
                                 {NULL, NULL}};
  luaL_newmetatable(L, CONN_MT);
  lua_pushliteral(L, CONN_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, conn_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, conn_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
