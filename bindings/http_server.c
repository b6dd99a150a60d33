/* bindings/http_server.c: the HTTP server as Lua sees it: core.listen(opts, handler) and the
 * exchange object ("moonlet.exchange") through which lua/moonlet/app.lua reads a request and writes
 * its response.
 *
 * Ownership and waits:
 * - A server (mlua_server_t) is C memory owned by the instance's list, not by Lua: a listening
 * server keeps serving when Lua drops its object. The Lua box holds a pointer that is NULLed when
 * the server is freed.
 * - Each request runs its handler as a task: handler(exchange, method, target). The exchange is a
 *   userdata pinned from on_request until the task is released (after handler_done) by a copy in
 *   the first slot of the task's stack, under the handler's frame (sched.c, rule 2). When memory
 *   runs out before the handler starts, the request is answered 503 (refuse_request). x->c points
 *   to the connection while the request is active; it is NULLed when the task ends (ml_conn_finish)
 *   or the connection closes (on_close), whichever comes first. Every method on an exchange without
 *   a connection returns nil, "closed".
 * - An exchange waits for one thing at a time (x->wait: body, writable, file). The core callback of
 *   that thing (on_body, on_writable, the file callback) or on_close clears x->wait and resumes the
 *   task; nothing else resumes it.
 * - When the connection closes (reset, write error, server shutdown) while the handler task is
 *   parked in a wait of another object, on_close cancels the task (mlua_task_cancel: that wait's
 *   cancel callback undoes it first). A client's FIN alone may be a half-close: the handler goes on
 *   (the core asks an HTTP/1.1 client with a 100 Continue whether it closed its socket, and a reset
 *   closes the connection: on_close), unless the server was made with check_client_abort or the
 *   exchange asked for it (x:cancel_on_hangup, which res:sse does): on_hangup cancels it the same
 *   way.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "../core/numfmt.h"
#include "header_lines.h"
#include "mlua.h"

#define EXCHANGE_MT "moonlet.exchange"
#define SERVER_MT "moonlet.server"
#define SERVER_TLS_MT "moonlet.server_tls"
#define WRITE_HIGH_WATER (256 * 1024)

struct mlua_server_s {
  ml_server_t *srv;
  moonlet_t *m;
  int handler_ref;     /* the Lua function run for each request */
  mlua_server_t *next; /* the instance's list */
  mlua_server_t **box; /* the Lua box pointing at us, NULLed when we are freed */
  int stopping;
  int check_client_abort; /* a client's FIN during its request cancels the handler (on_hangup) */
};

enum { WAIT_NONE = 0, WAIT_BODY, WAIT_WRITABLE, WAIT_FILE };

typedef struct {
  ml_conn_t *c;       /* NULL once the request ended or the connection closed */
  mlua_task_t *task;  /* the handler task */
  moonlet_t *m;       /* the instance (not the server: it may be freed while a handler runs) */
  int wait;           /* WAIT_* */
  int status;         /* for the access log */
  uint64_t bytes;     /* body bytes sent */
  uv_file fd;         /* open file of a transfer in flight */
  int file_ref;       /* pins this userdata while a file transfer is in flight */
  char *request_id;   /* moonlet.request_id's (malloc'd), for the access log; freed when the task
                         ends (handler_done), after which none is taken */
  int hangup_cancels; /* x:cancel_on_hangup(): a FIN cancels the handler as check_client_abort */
} exchange_t;

static exchange_t *check_x(lua_State *L) { return mlua_check_object(L, 1, EXCHANGE_MT); }

/* -- Access log ------------------------------------------------------------------------------- */

static void access_log(exchange_t *x, ml_conn_t *c) {
  if (x->m->log.access) ml_conn_log_access(c, x->status, x->bytes, x->request_id);
}

/* -- Request start and end ------------------------------------------------------------------ */

static void exchange_end(exchange_t *x) {
  ml_conn_t *c = x->c;
  if (!c) return;
  access_log(x, c);
  x->c = NULL;
  ml_conn_set_data(c, NULL);
  ml_conn_finish(c);
}

static void handler_done(mlua_task_t *t, int ok, void *ud) {
  exchange_t *x = ud;
  moonlet_t *m = x->m;
  if (!ok) {
    ml_log(&m->log, ML_LOG_ERROR, "request handler failed: %s", lua_tostring(t->co, -1));
    if (x->c && !ml_conn_response_started(x->c)) {
      static const char hdr[] = "Content-Type: text/plain; charset=utf-8\r\n";
      static const char body[] = "500 Internal Server Error\n";
      ml_conn_set_close(x->c);
      ml_conn_respond(x->c, 500, hdr, sizeof hdr - 1, body, sizeof body - 1);
      x->status = 500;
    } else if (x->c) {
      ml_conn_close(x->c, 0); /* a broken stream cannot be framed */
    }
  }
  exchange_end(x);
  free(x->request_id);
  x->request_id = NULL;
  x->task = NULL; /* the task's stack lets go of x when the task is released, right after this */
}

typedef struct {
  mlua_server_t *s;
  const ml_request_t *r;
  exchange_t *x;
} request_start_t;

/* Pushes the exchange, the handler and its arguments but the coroutine on a request's task. */
static int push_request(lua_State *co, void *ud) {
  request_start_t *a = ud;
  moonlet_t *m = a->s->m;
  a->x = lua_newuserdata(co, sizeof *a->x);
  lua_rawgeti(co, LUA_REGISTRYINDEX, m->exchange_mt_ref); /* luaL_getmetatable without the name */
  lua_setmetatable(co, -2);
  lua_rawgeti(co, LUA_REGISTRYINDEX, a->s->handler_ref);
  lua_pushvalue(co, -2);
  lua_pushlstring(co, a->r->method, a->r->method_len);
  lua_pushlstring(co, a->r->target, a->r->target_len);
  return 5;
}

/* Memory ran out (the host's allocator budget) before the handler could start: the request is
 * answered 503 and the connection closed after it (or at once when even that fails), and the
 * server goes on. Nothing here allocates from Lua. */
static void refuse_request(moonlet_t *m, ml_conn_t *c) {
  static const char hdr[] = "Content-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n";
  static const char body[] = "503 Service Unavailable\n";
  ml_log(&m->log, ML_LOG_ERROR, "out of memory: a request answered 503");
  ml_conn_set_close(c);
  if (ml_conn_respond(c, 503, hdr, sizeof hdr - 1, body, sizeof body - 1) < 0) {
    ml_conn_close(c, 0);
  } else if (m->log.access) {
    ml_conn_log_access(c, 503, sizeof body - 1, NULL);
  }
  ml_conn_finish(c);
}

static void on_request(ml_conn_t *c, void *ud) {
  mlua_server_t *s = ud;
  moonlet_t *m = s->m;
  mlua_task_t *t = mlua_task_new(m); /* (a pooled task allocates nothing) */
  /* x is pinned while C points at it (the connection's data, x->c) by staying in the first slot of
   * its task's stack, under the handler's frame, where no Lua code can reach it: the task's
   * coroutine (pinned by its struct) keeps it from here until the task is released, which is after
   * handler_done has unlinked it. No registry ref to take and give back on every request.
   * The pushes allocate (the exchange, the target): with a host's allocator, whose budget may run
   * out, they run under mlua_task_push, since a memory error here would reach LuaJIT's panic and
   * end the host. That protected call costs about 5% of a small request's instructions, so the
   * default allocator (malloc, which does not fail short of the system running out) goes
   * without. */
  request_start_t a = {s, ml_conn_request(c), NULL};
  int r = !t             ? UV_ENOMEM
          : m->cfg.alloc ? mlua_task_push(t, push_request, &a)
                         : push_request(t->co, &a);
  if (r < 0) {
    if (t) mlua_task_drop(t);
    refuse_request(m, c);
    return;
  }
  exchange_t *x = a.x; /* stack: x (the pin), handler, x, method, target */
  lua_State *co = t->co;
  x->c = c;
  x->task = t;
  x->m = s->m;
  x->wait = WAIT_NONE;
  x->status = 0;
  x->bytes = 0;
  x->fd = -1;
  x->file_ref = LUA_NOREF;
  x->request_id = NULL;
  x->hangup_cancels = 0;
  /* The peer's address, read now while the socket is open: a client that resets the connection
   * is logged from on_close, after the handle closed. Once a connection (it is cached). */
  if (m->log.access) ml_conn_peer_name(c);
  ml_conn_set_data(c, x);
  t->request = ++m->requests; /* app.lua reads it as core.running_request while the task runs */
  lua_pushthread(co);         /* (no allocation: a slot of the stack the pushes left room for) */
  t->done = handler_done;
  t->done_ud = x;
  mlua_task_start(t, 4);
}

/* A cancelled wait: the exchange forgets it; a file transfer goes on and file_done, finding no
 * waiter, only closes the file. */
static void x_cancel(mlua_task_t *t, void *wait) {
  exchange_t *x = wait;
  (void)t;
  x->wait = WAIT_NONE;
}

/* -- Body ------------------------------------------------------------------------------------ */

/* Pushes what a body read returns: a chunk, nil at the end, or nil, err. The chunk is consumed
 * once it is pushed: a push that raised (memory) leaves it buffered. */
static int push_body(lua_State *L, exchange_t *x) {
  const char *data;
  size_t len;
  int st = ml_conn_body_state(x->c, &data, &len);
  if (len > 0) {
    lua_pushlstring(L, data, len);
    ml_conn_body_consume(x->c, len);
    return 1;
  }
  if (st == ML_BODY_DONE) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, "closed");
  return 2;
}

/* push_body for mlua_push_result: from on_body, on the reader's coroutine */
static int push_body_cb(lua_State *L, void *ud) { return push_body(L, ud); }

static void on_body(ml_conn_t *c, void *ud) {
  (void)ud;
  exchange_t *x = ml_conn_data(c);
  if (!x || x->wait != WAIT_BODY) return;
  x->wait = WAIT_NONE;
  mlua_task_resume(x->task, mlua_push_result(x->m, x->task->co, push_body_cb, x));
}

/* syntax: chunk, err = x:read() -- a body chunk; nil at the end; yields while none is buffered */
static int x_read(lua_State *L) {
  exchange_t *x = check_x(L);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  if (x->wait) return luaL_error(L, "moonlet: request busy (another read or write is waiting)");
  const char *data;
  size_t len;
  int st = ml_conn_body_state(x->c, &data, &len);
  if (len > 0 || st != ML_BODY_MORE) return push_body(L, x);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (t != x->task) return luaL_error(L, "moonlet: the body is read by the request's own task");
  ml_conn_body_want(x->c);
  x->wait = WAIT_BODY;
  return mlua_task_wait(L, t, x_cancel, x);
}

/* -- Responses ------------------------------------------------------------------------------ */

/* A response's header lines, and what the handler said in the headers the server owns: the
 * framing (Content-Length, Transfer-Encoding) and Connection are never copied (the server writes
 * its own: a handler's Content-Length sizes a stream, Connection: close closes after the response,
 * the rest is dropped); a handler's Server and Date replace the server's (ML_OWN_*). */
typedef struct {
  mlua_lines_t lines;
  int64_t content_length; /* the handler's Content-Length, or -1 */
  unsigned own;           /* ML_OWN_SERVER | ML_OWN_DATE: the handler gave these */
  int close;              /* the handler's Connection says close */
} hbuf_t;

/* Raises msg (with one %s: name) after freeing what the lines took from the heap. */
static void hb_fail(lua_State *L, hbuf_t *b, const char *msg, const char *name) {
  mlua_lines_free(&b->lines);
  luaL_error(L, msg, name);
}

/* RFC 9110's tchar: the bytes a header name (a token) may hold. */
static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1,  ['~'] = 1, ['0'] = 1,
    ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1,  ['7'] = 1, ['8'] = 1,
    ['9'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1,  ['F'] = 1, ['G'] = 1,
    ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1,  ['N'] = 1, ['O'] = 1,
    ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1,  ['V'] = 1, ['W'] = 1,
    ['X'] = 1, ['Y'] = 1, ['Z'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1,  ['d'] = 1, ['e'] = 1,
    ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1,  ['l'] = 1, ['m'] = 1,
    ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1,  ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

int mlua_valid_token(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++)
    if (!tchar[(unsigned char)s[i]]) return 0;
  return 1;
}

/* A header value may hold any byte but the controls other than HTAB (CR and LF above all). Eight
 * bytes at a time: has_less is the "word has a byte below n" test (n <= 128), so the loop looks at
 * single bytes only in a word that holds a control, a tab or DEL. */
#define ONES 0x0101010101010101ULL
#define has_less(x, n) (((x)-ONES * (n)) & ~(x) & (ONES * 0x80))
static int is_ctl(unsigned char ch) { return (ch < 32 && ch != '\t') || ch == 127; }

int mlua_valid_value(const char *s, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, s + i, 8);
    if (!has_less(w, 32) && !has_less(w ^ (ONES * 127), 1)) continue;
    for (size_t j = i; j < i + 8; j++)
      if (is_ctl((unsigned char)s[j])) return 0;
  }
  for (; i < n; i++)
    if (is_ctl((unsigned char)s[i])) return 0;
  return 1;
}

/* "name: value\r\n", the value at vidx (a string or a number); raises on a bad value. A number is
 * written as tostring writes it, straight from the double (core/numfmt.h) where it can be: no Lua
 * string made, no control byte to look for. */
static void hb_header(lua_State *L, hbuf_t *b, const char *name, size_t nlen, int vidx) {
  size_t vlen;
  const char *v;
  char num[ML_NUMFMT_MAX];
  if (lua_type(L, vidx) == LUA_TNUMBER && (vlen = ml_numfmt_g14(lua_tonumber(L, vidx), num))) {
    v = num;
  } else {
    v = lua_tolstring(L, vidx, &vlen);
    if (!v) hb_fail(L, b, "moonlet: header %s: value must be a string or a number", name);
    if (!mlua_valid_value(v, vlen))
      hb_fail(L, b, "moonlet: header %s: value holds CR, LF or a control", name);
  }
  if (mlua_lines_add(&b->lines, name, nlen, v, vlen) < 0)
    hb_fail(L, b, "moonlet: out of memory%s", "");
}

static int name_is(const char *name, size_t nlen, const char *lower, size_t n) {
  return nlen == n && strncasecmp(name, lower, n) == 0;
}

/* Whether the comma-separated list v holds the token (case-insensitive): Connection's "close" */
static int has_token(const char *v, size_t n, const char *tok, size_t tlen) {
  for (size_t i = 0; i < n;) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
      i++;
    size_t j = i;
    while (j < n && v[j] != ',' && v[j] != ' ' && v[j] != '\t')
      j++;
    if (j - i == tlen && strncasecmp(v + i, tok, tlen) == 0) return 1;
    i = j;
  }
  return 0;
}

/* A header the server owns (see hbuf_t), at vidx: noted in b instead of being written; 0 when the
 * header is an ordinary one. Raises on a Content-Length that is not a number of bytes. */
static int owned_header(lua_State *L, hbuf_t *b, const char *name, size_t nlen, int vidx) {
  switch (nlen) {
  case 4:
    if (!name_is(name, nlen, "date", 4)) return 0;
    b->own |= ML_OWN_DATE;
    return 0; /* written: it replaces the server's */
  case 6:
    if (!name_is(name, nlen, "server", 6)) return 0;
    b->own |= ML_OWN_SERVER;
    return 0;
  case 10: {
    if (!name_is(name, nlen, "connection", 10)) return 0;
    size_t n;
    const char *v = lua_tolstring(L, vidx, &n);
    if (v && has_token(v, n, "close", 5)) b->close = 1;
    return 1;
  }
  case 14: {
    if (!name_is(name, nlen, "content-length", 14)) return 0;
    size_t n;
    const char *v = lua_tolstring(L, vidx, &n);
    int64_t len = 0;
    size_t i = 0;
    while (v && i < n && v[i] >= '0' && v[i] <= '9' && len < ((int64_t)1 << 53))
      len = len * 10 + (v[i++] - '0');
    if (!v || n == 0 || i != n)
      hb_fail(L, b, "moonlet: header %s: value must be a number of bytes", "Content-Length");
    b->content_length = len;
    return 1;
  }
  case 17: return name_is(name, nlen, "transfer-encoding", 17); /* the server frames the body */
  default: return 0;
  }
}

/* Formats the content type (index ct, may be nil or false) and the headers table (index hi, may
 * be nil or false: lua/moonlet/response.lua's res has false in both fields until they are set; a
 * value may be an array for repeated headers) as "Name: value\r\n" lines; raises on bad input.
 * The headers the server owns are noted in b, not written (owned_header). */
static void format_headers(lua_State *L, hbuf_t *b, int ct, int hi) {
  mlua_lines_init(&b->lines);
  b->content_length = -1;
  b->own = 0;
  b->close = 0;
  if (lua_toboolean(L, ct)) hb_header(L, b, "Content-Type", 12, ct);
  if (!lua_toboolean(L, hi)) return;
  luaL_checktype(L, hi, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, hi)) {
    size_t nlen;
    if (lua_type(L, -2) != LUA_TSTRING) hb_fail(L, b, "moonlet: header names are strings%s", "");
    const char *name = lua_tolstring(L, -2, &nlen);
    if (!mlua_valid_token(name, nlen)) hb_fail(L, b, "moonlet: invalid header name %s", name);
    if (nlen >= 4 && nlen <= 17 && owned_header(L, b, name, nlen, lua_gettop(L))) {
      lua_pop(L, 1);
      continue;
    }
    if (lua_istable(L, -1)) {
      for (int i = 1;; i++) {
        lua_rawgeti(L, -1, i);
        if (lua_isnil(L, -1)) {
          lua_pop(L, 1);
          break;
        }
        hb_header(L, b, name, nlen, lua_gettop(L));
        lua_pop(L, 1);
      }
    } else {
      hb_header(L, b, name, nlen, lua_gettop(L));
    }
    lua_pop(L, 1);
  }
}

/* A second response on an exchange: the handler's mistake raises; but when the server answered on
 * its own (a 408 or 413 while the handler read the body), the handler hears nil, "closed", as when
 * the client is gone. */
static int already_answered(lua_State *L, exchange_t *x) {
  if (x->status) return luaL_error(L, "moonlet: the response was already started");
  return mlua_push_error(L, UV_EPIPE);
}

static int check_status(lua_State *L, int idx) {
  int status = (int)luaL_checkinteger(L, idx);
  if (status < 200 || status > 999) luaL_argerror(L, idx, "status must be 200..999");
  return status;
}

/* syntax: ok, err = x:respond(status, body, content_type, headers) */
static int x_respond(lua_State *L) {
  exchange_t *x = check_x(L);
  int status = check_status(L, 2);
  size_t blen = 0;
  const char *body = lua_isnoneornil(L, 3) ? "" : luaL_checklstring(L, 3, &blen);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  hbuf_t hb;
  format_headers(L, &hb, 4, 5);
  if (hb.close) ml_conn_set_close(x->c);
  ml_conn_own_headers(x->c, hb.own);
  int r;
  if (hb.content_length >= 0 && blen == 0 && ml_conn_request(x->c)->is_head) {
    /* a HEAD handler says how long the body would be: that length, and no body */
    r = ml_conn_stream_start(x->c, status, hb.lines.p, hb.lines.len, hb.content_length);
    if (r == 0) r = ml_conn_stream_end(x->c);
  } else { /* the length is the body's own */
    r = ml_conn_respond(x->c, status, hb.lines.p, hb.lines.len, body, blen);
  }
  mlua_lines_free(&hb.lines);
  if (r == UV_EALREADY) return already_answered(L, x);
  if (r < 0) return mlua_push_error(L, r);
  x->status = status;
  x->bytes += blen;
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: ok, err = x:start(status, content_type, headers, content_length) */
static int x_start(lua_State *L) {
  exchange_t *x = check_x(L);
  int status = check_status(L, 2);
  int64_t clen = lua_isnoneornil(L, 5) ? -1 : (int64_t)luaL_checknumber(L, 5);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  hbuf_t hb;
  format_headers(L, &hb, 3, 4);
  if (clen < 0) clen = hb.content_length; /* a handler's Content-Length: the stream's size */
  if (hb.close) ml_conn_set_close(x->c);
  ml_conn_own_headers(x->c, hb.own);
  int r = ml_conn_stream_start(x->c, status, hb.lines.p, hb.lines.len, clen);
  mlua_lines_free(&hb.lines);
  if (r == UV_EALREADY) return already_answered(L, x);
  if (r < 0) return mlua_push_error(L, r);
  x->status = status;
  lua_pushboolean(L, 1);
  return 1;
}

static void on_writable(ml_conn_t *c, void *ud) {
  (void)ud;
  exchange_t *x = ml_conn_data(c);
  if (!x || x->wait != WAIT_WRITABLE) return;
  x->wait = WAIT_NONE;
  lua_pushboolean(x->task->co, 1);
  mlua_task_resume(x->task, 1);
}

/* syntax: ok, err = x:write(data) -- yields while the client is more than 256 KiB behind */
static int x_write(lua_State *L) {
  exchange_t *x = check_x(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  if (x->wait) return luaL_error(L, "moonlet: request busy (another read or write is waiting)");
  int r = ml_conn_stream_write(x->c, data, len);
  if (r == UV_EINVAL) return luaL_error(L, "moonlet: write before start or after the end");
  if (r == UV_E2BIG) return luaL_error(L, "moonlet: write beyond the announced Content-Length");
  if (r < 0) return mlua_push_error(L, r);
  x->bytes += len;
  if (ml_conn_write_queue(x->c) > WRITE_HIGH_WATER) {
    mlua_task_t *t = mlua_task_current(L);
    if (t == x->task) {
      r = ml_conn_wants_writable(x->c);
      if (r < 0) return mlua_push_error(L, r);
      if (r == 1) {
        x->wait = WAIT_WRITABLE;
        return mlua_task_wait(L, t, x_cancel, x);
      }
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: ok, err = x:finish() -- ends a streamed response */
static int x_finish(lua_State *L) {
  exchange_t *x = check_x(L);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  int r = ml_conn_stream_end(x->c);
  if (r == UV_EINVAL) return luaL_error(L, "moonlet: finish without a started stream");
  if (r < 0) return mlua_push_error(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

static void file_done(ml_conn_t *c, int status, void *ud) {
  (void)c;
  exchange_t *x = ud;
  uv_fs_t req;
  uv_fs_close(NULL, &req, x->fd, NULL);
  uv_fs_req_cleanup(&req);
  x->fd = -1;
  lua_State *L = x->m->L;
  int ref = x->file_ref;
  x->file_ref = LUA_NOREF;
  if (x->wait != WAIT_FILE) { /* the wait was cancelled: nobody to resume */
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    return;
  }
  x->wait = WAIT_NONE;
  lua_State *co = x->task->co;
  int n = status < 0 ? mlua_push_error_to(x->m, co, status) : (lua_pushboolean(co, 1), 1);
  luaL_unref(L, LUA_REGISTRYINDEX, ref); /* x stays alive: the resumed task holds it */
  mlua_task_resume(x->task, n);
}

/* syntax: ok, err = x:send_file(file, offset, length) -- after x:start with a Content-Length;
 * file is a path or a core.open_file handle, whose descriptor the transfer then owns (closed in
 * file_done, or here when nothing is sent). The bytes go from the file to the socket without
 * passing through Lua; yields until sent */
static int x_send_file(lua_State *L) {
  exchange_t *x = check_x(L);
  int by_path = lua_type(L, 2) == LUA_TSTRING;
  const char *path = by_path ? lua_tostring(L, 2) : NULL;
  if (!by_path) luaL_checktype(L, 2, LUA_TUSERDATA);
  int64_t off = (int64_t)luaL_checknumber(L, 3);
  int64_t len = (int64_t)luaL_checknumber(L, 4);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  if (x->wait) return luaL_error(L, "moonlet: request busy (another read or write is waiting)");
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (t != x->task) return luaL_error(L, "moonlet: a file is sent by the request's own task");
  uv_fs_t req;
  int fd;
  if (by_path) {
    fd = uv_fs_open(NULL, &req, path, O_RDONLY, 0, NULL);
    uv_fs_req_cleanup(&req);
  } else {
    fd = mlua_file_take(L, 2); /* from here on, this function closes it */
    if (fd < 0) fd = UV_EBADF;
  }
  if (fd < 0) return mlua_push_error(L, fd);
  x->fd = fd;
  int r = ml_conn_send_file(x->c, fd, off, len, file_done, x);
  if (r < 0) {
    uv_fs_close(NULL, &req, fd, NULL);
    uv_fs_req_cleanup(&req);
    x->fd = -1;
    if (r == UV_EALREADY) {
      lua_pushboolean(L, 1);
      return 1;
    }
    return mlua_push_error(L, r);
  }
  x->bytes += (uint64_t)len;
  lua_pushvalue(L, 1);
  x->file_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  x->wait = WAIT_FILE;
  return mlua_task_wait(L, t, x_cancel, x);
}

/* -- Request data ------------------------------------------------------------------------ */

/* How repeated lines of a header join: ", ", but Cookie lines with "; ": they are one cookie list
 * (RFC 9113 8.2.3, nginx's $http_cookie), and a comma inside it would end up in a cookie's value.
 * The one rule for x:headers(), x:forward_headers() and x:header(). */
static const char *join_sep(const char *name, size_t n) {
  return n == 6 && memcmp(name, "cookie", 6) == 0 ? "; " : ", ";
}

/* Replaces the value on top of the stack (nil before the header's first line) with it joined with
 * line h's value. */
static void join_value(lua_State *L, const ml_header_t *h) {
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushlstring(L, h->value, h->value_len);
  } else {
    lua_pushstring(L, join_sep(h->name, h->name_len));
    lua_pushlstring(L, h->value, h->value_len);
    lua_concat(L, 3);
  }
}

/* syntax: headers = x:headers() -- lower-case names; repeated headers joined (join_sep) */
static int x_headers(lua_State *L) {
  exchange_t *x = check_x(L);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  const ml_request_t *r = ml_conn_request(x->c);
  lua_createtable(L, 0, (int)r->nheaders);
  for (unsigned i = 0; i < r->nheaders; i++) {
    const ml_header_t *h = &r->headers[i];
    lua_pushlstring(L, h->name, h->name_len);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);
    join_value(L, h);
    lua_rawset(L, -3);
  }
  return 1;
}

/* Is the field h hop-by-hop (RFC 9110 7.6.1), never forwarded by a proxy: Connection, Keep-Alive,
 * TE, Trailer, Transfer-Encoding, Upgrade, Expect (the server answers it itself), a Proxy-* field,
 * or one a Connection field of r lists (tokens between commas and white space, any letter case)?
 * lua/moonlet/proxy.lua's hop_by_hop, for names that are lower case already. */
static int is_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); } /* Lua's %s */

static int hop_by_hop(const ml_request_t *r, const ml_header_t *h) {
  static const char *const hop[] = {"connection",        "keep-alive", "te",    "trailer",
                                    "transfer-encoding", "upgrade",    "expect"};
  size_t n = h->name_len;
  for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
    if (strlen(hop[i]) == n && memcmp(h->name, hop[i], n) == 0) return 1;
  if (n >= 6 && memcmp(h->name, "proxy-", 6) == 0) return 1;
  for (unsigned i = 0; i < r->nheaders; i++) {
    const ml_header_t *c = &r->headers[i];
    if (c->name_len != 10 || memcmp(c->name, "connection", 10) != 0) continue;
    const char *v = c->value, *e = v + c->value_len;
    while (v < e) {
      while (v < e && (*v == ',' || is_space(*v)))
        v++;
      const char *t = v;
      while (v < e && *v != ',' && !is_space(*v))
        v++;
      if ((size_t)(v - t) == n && n && strncasecmp(t, h->name, n) == 0) return 1;
    }
  }
  return 0;
}

/* syntax: headers, upgrade, transfer_encoding, content_length = x:forward_headers()
 * What moonlet.proxy sends on of the request's headers (lua/moonlet/proxy.lua upstream_headers):
 * x:headers() without Host and the hop-by-hop fields (hop_by_hop), in one call rather than a
 * Lua loop over req.headers (which aborted the JIT trace of every proxied request); and the
 * Upgrade and Transfer-Encoding values it left out (nil: none), joined as x:headers() joins them;
 * and the Content-Length value, whether or not a Connection field named it (the body is there
 * all the same: it frames the request).
 */
static int x_forward_headers(lua_State *L) {
  exchange_t *x = check_x(L);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  const ml_request_t *r = ml_conn_request(x->c);
  lua_settop(L, 1);
  lua_createtable(L, 0, (int)r->nheaders + 3); /* 2 (room for X-Forwarded-*) */
  lua_pushnil(L);                              /* 3: Upgrade */
  lua_pushnil(L);                              /* 4: Transfer-Encoding */
  lua_pushnil(L);                              /* 5: Content-Length */
  for (unsigned i = 0; i < r->nheaders; i++) {
    const ml_header_t *h = &r->headers[i];
    int into = 2;
    if (h->name_len == 14 && memcmp(h->name, "content-length", 14) == 0) {
      lua_pushvalue(L, 5);
      join_value(L, h);
      lua_replace(L, 5);
    }
    if (h->name_len == 7 && memcmp(h->name, "upgrade", 7) == 0)
      into = 3;
    else if (h->name_len == 17 && memcmp(h->name, "transfer-encoding", 17) == 0)
      into = 4;
    else if ((h->name_len == 4 && memcmp(h->name, "host", 4) == 0) || hop_by_hop(r, h))
      continue;
    if (into == 2) {
      lua_pushlstring(L, h->name, h->name_len);
      lua_pushvalue(L, -1);
      lua_rawget(L, 2);
    } else {
      lua_pushvalue(L, into);
    }
    join_value(L, h);
    if (into == 2)
      lua_rawset(L, 2);
    else
      lua_replace(L, into);
  }
  return 4;
}

/* syntax: value = x:header(lowercase_name) -- every line of that header, joined as in x:headers()
 * (join_sep); nothing when there is none */
static int x_header(lua_State *L) {
  exchange_t *x = check_x(L);
  size_t n;
  const char *name = luaL_checklstring(L, 2, &n);
  const char *sep = join_sep(name, n);
  size_t seplen = 2;
  if (!x->c) return 0;
  const ml_request_t *r = ml_conn_request(x->c);
  int found = 0;
  for (unsigned i = 0; i < r->nheaders; i++) {
    const ml_header_t *h = &r->headers[i];
    if (h->name_len == n && memcmp(h->name, name, n) == 0) {
      if (found) lua_pushlstring(L, sep, seplen);
      lua_pushlstring(L, h->value, h->value_len);
      if (found) lua_concat(L, 3);
      found = 1;
    }
  }
  return found;
}

/* syntax: version, keep_alive, peer, content_length = x:info() */
static int x_info(lua_State *L) {
  exchange_t *x = check_x(L);
  if (!x->c) return mlua_push_error(L, UV_EPIPE);
  const ml_request_t *r = ml_conn_request(x->c);
  lua_pushfstring(L, "%d.%d", r->http_major, r->http_minor);
  lua_pushboolean(L, r->keep_alive);
  lua_pushstring(L, ml_conn_peer_name(x->c));
  if (r->content_length >= 0)
    lua_pushnumber(L, (double)r->content_length);
  else
    lua_pushnil(L);
  lua_pushstring(L, ml_conn_is_tls(x->c) ? "https" : "http");
  return 5;
}

/* syntax: t = x:tls() -- the client's certificate (mlua_push_tls_peer: client_verified,
 * client_subject, client_issuer, client_cert) on HTTPS; nil on plain HTTP or once the connection
 * is gone. Made on each call, for req.tls (request.lua asks once). */
static int x_tls(lua_State *L) {
  exchange_t *x = check_x(L);
  struct ml_tls_s *t = x->c ? ml_conn_tls(x->c) : NULL;
  if (!t) return 0;
  return mlua_push_tls_peer(L, t);
}

static int x_started(lua_State *L) {
  exchange_t *x = check_x(L);
  lua_pushboolean(L, x->c ? ml_conn_response_started(x->c) : 1);
  return 1;
}

static int x_is_open(lua_State *L) {
  exchange_t *x = check_x(L);
  lua_pushboolean(L, x->c != NULL);
  return 1;
}

/* syntax: x:set_request_id(id) -- the id the access log gives this request (moonlet.request_id);
 * nothing once the request's task has ended */
static int x_set_request_id(lua_State *L) {
  exchange_t *x = check_x(L);
  const char *id = luaL_checkstring(L, 2);
  if (!x->task) return 0;
  char *copy = strdup(id);
  if (!copy) return luaL_error(L, "not enough memory");
  free(x->request_id);
  x->request_id = copy;
  return 0;
}

/* syntax: x:set_close() -- Connection: close after this response */
static int x_set_close(lua_State *L) {
  exchange_t *x = check_x(L);
  if (x->c) ml_conn_set_close(x->c);
  return 0;
}

/* syntax: x:cancel_on_hangup() -- from now on a client's FIN cancels the handler where it waits, as
 * with the server's check_client_abort: for a response whose client never sends again once it
 * has asked (an SSE stream: EventSource's FIN means it has gone), so that a handler parked on a
 * queue with nothing to write learns it at once rather than at its next write. */
static int x_cancel_on_hangup(lua_State *L) {
  exchange_t *x = check_x(L);
  x->hangup_cancels = 1;
  return 0;
}

/* syntax: x:abort() -- closes the connection at once, with no (more) response: the client went
 * away. Logged as 499 (nginx's "client closed request"). on_close follows from the close callback;
 * the task's end (exchange_end) finds the connection closing and does nothing more. */
static int x_abort(lua_State *L) {
  exchange_t *x = check_x(L);
  if (x->c) {
    x->status = 499;
    ml_conn_close(x->c, 0);
  }
  return 0;
}

static void on_close(ml_conn_t *c, void *ud) {
  (void)ud;
  exchange_t *x = ml_conn_data(c);
  if (!x) return;
  /* The request's access-log line, now: exchange_end, when the task ends, finds x->c gone. 499
   * (nginx's "client closed request") when no response was started, else the status sent. */
  if (!x->status) x->status = 499;
  access_log(x, c);
  x->c = NULL;
  ml_conn_set_data(c, NULL);
  int wait = x->wait;
  x->wait = WAIT_NONE;
  if (wait && wait != WAIT_FILE) { /* a file wait ends through file_done, which ran already */
    mlua_task_resume(x->task, mlua_push_error_to(x->m, x->task->co, UV_EPIPE));
  } else if (!wait) {
    /* The client is gone while the handler waits on something else (an upstream, a query, a
     * sleep): nobody will read its answer, so the task is cancelled there (moonlet.CANCELLED,
     * and the children of its gathers with it). No-op when the task runs now, waits on nothing
     * cancellable, or moonlet_free has begun (mlua_task_cancel checks all three). */
    mlua_task_cancel(x->task);
  }
}

ml_conn_t *mlua_exchange_upgrade(lua_State *L, int idx, const char *headers, size_t hlen,
                                 const ml_conn_raw_cb_t *cb, void *ud, int *err) {
  exchange_t *x = luaL_checkudata(L, idx, EXCHANGE_MT);
  ml_conn_t *c = x->c;
  if (!c) {
    *err = UV_EPIPE;
    return NULL;
  }
  if (x->wait) {
    *err = UV_EBUSY;
    return NULL;
  }
  int status = x->status;
  x->status = 101;
  access_log(x, c); /* now: the request is freed by the upgrade */
  int r = ml_conn_upgrade(c, headers, hlen, cb, ud);
  if (r < 0) {
    x->status = status;
    *err = r;
    return NULL;
  }
  x->c = NULL; /* the handler task goes on without a request; exchange_end has nothing to do */
  ml_conn_set_data(c, NULL);
  return c;
}

static int x_tostring(lua_State *L) {
  exchange_t *x = check_x(L);
  lua_pushfstring(L, "moonlet.exchange (%s)", x->c ? "open" : "closed");
  return 1;
}

/* -- Servers ---------------------------------------------------------------------------------- */

/* The client half-closed during its request (FIN, nothing pipelined behind). With the server's
 * check_client_abort on, that counts as the client gone: the handler task is cancelled where it
 * waits, as in on_close (a wait on the exchange itself, to write, goes on: a half-closed client
 * may still read). */
static void on_hangup(ml_conn_t *c, void *ud) {
  mlua_server_t *s = ud;
  exchange_t *x = ml_conn_data(c);
  if (!x || !(s->check_client_abort || x->hangup_cancels) || x->wait) return;
  mlua_task_cancel(x->task);
}

static const ml_http_callbacks_t callbacks = {on_request, on_body, on_writable, on_close,
                                              on_hangup};

static void server_unlink(mlua_server_t *s) {
  moonlet_t *m = s->m;
  for (mlua_server_t **pp = &m->servers; *pp; pp = &(*pp)->next)
    if (*pp == s) {
      *pp = s->next;
      break;
    }
}

static void server_done(ml_server_t *srv, void *ud) {
  mlua_server_t *s = ud;
  moonlet_t *m = s->m;
  server_unlink(s);
  if (s->box) *s->box = NULL;
  luaL_unref(m->L, LUA_REGISTRYINDEX, s->handler_ref);
  ml_server_free(srv);
  free(s);
  if (m->stopping && !m->servers) mlua_stop_drained(m);
}

/* The longest timeout, in ms: core/http_server.c adds one to the loop's clock for a deadline, which
 * must not wrap (it would be in the past: every connection timed out at once). */
#define TIMEOUT_MS_MAX (UINT64_MAX / 4)

/* Reads limit `name` (times `scale`) into *dst, at most `max`: a larger value (math.huge too) is
 * `max`, since converting a double beyond the target type is undefined in C, and a cast of the
 * 64-bit result to a narrower field would wrap (2^32 connections became 0: every one refused).
 * A negative value or NaN raises. */
static void limit_u64(lua_State *L, int idx, const char *name, uint64_t *dst, double scale,
                      uint64_t max) {
  lua_getfield(L, idx, name);
  if (!lua_isnil(L, -1)) {
    double v = luaL_checknumber(L, -1) * scale;
    if (!(v >= 0)) luaL_error(L, "moonlet: %s must be a number >= 0", name);
    *dst = v >= (double)max ? max : (uint64_t)v; /* (double)max rounds up: still in range */
  }
  lua_pop(L, 1);
}

/* The limits in the table at idx over what lim holds. */
static void read_limit_fields(lua_State *L, int idx, ml_http_limits_t *lim) {
  uint64_t v;
#define SZ(name, field)                                                                            \
  v = lim->field;                                                                                  \
  limit_u64(L, idx, name, &v, 1, (__typeof__(lim->field))-1);                                      \
  lim->field = (__typeof__(lim->field))v;
  SZ("max_uri", max_uri)
  SZ("max_header_bytes", max_header_bytes)
  SZ("max_headers", max_headers)
  SZ("max_body", max_body)
  SZ("max_conns", max_conns)
  SZ("keepalive_requests", keepalive_requests)
#undef SZ
  limit_u64(L, idx, "header_timeout", &lim->header_timeout_ms, 1000, TIMEOUT_MS_MAX);
  limit_u64(L, idx, "body_timeout", &lim->body_timeout_ms, 1000, TIMEOUT_MS_MAX);
  limit_u64(L, idx, "keepalive_timeout", &lim->keepalive_timeout_ms, 1000, TIMEOUT_MS_MAX);
  limit_u64(L, idx, "send_timeout", &lim->send_timeout_ms, 1000, TIMEOUT_MS_MAX);
  limit_u64(L, idx, "shutdown_grace", &lim->shutdown_grace_ms, 1000, TIMEOUT_MS_MAX);
}

/* The limits of core.listen's opts (at idx, absolute): the built-in defaults, then opts.defaults
 * (an app's own, lua/moonlet/app.lua), then opts' own fields (listen's options, the command line,
 * an embedding host's cfg.limits). */
static void read_limits(lua_State *L, int idx, ml_http_limits_t *lim) {
  ml_http_limits_default(lim);
  lua_getfield(L, idx, "defaults");
  if (lua_istable(L, -1)) read_limit_fields(L, lua_gettop(L), lim);
  lua_pop(L, 1);
  read_limit_fields(L, idx, lim);
}

/* syntax: server, port = core.listen({ host =, port =, check_client_abort =, limits... }, handler)
 * opts.unix = "/path" listens on that Unix domain socket instead of host:port (port is then 0),
 * opts.unix_mode its permissions (a number: 0x1b0 is 0660; nil: the umask's).
 */
/* opts.tls of core.listen (table at 1): { cert = "server.pem", key = "server.key" } makes an HTTPS
 * server; client_ca = "ca.pem" asks every client for a certificate verified against those CAs,
 * verify_client says whether one is required (true or "on", the default with client_ca) or
 * "optional" (false or "off": none is asked for). Returns 0 with *out the context (NULL without
 * opts.tls), or -1 with nil and the error pushed (a file that does not load); raises on a
 * malformed opts.tls. */
static int listen_tls(lua_State *L, ml_tls_ctx_t **out) {
  static const char *const known[] = {"cert", "key", "client_ca", "verify_client", NULL};
  *out = NULL;
  lua_getfield(L, 1, "tls");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  if (!lua_istable(L, -1)) luaL_error(L, "moonlet: tls is a table { cert = file, key = file }");
  /* anything else (verify, cafile: a client's names) raises: ignored, an operator would believe
   * clients are checked when they are not */
  for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
    int i = 0;
    while (known[i] && strcmp(k, known[i]) != 0)
      i++;
    if (!known[i])
      luaL_error(L, "moonlet: tls option %s is not supported (cert, key, client_ca, verify_client)",
                 k);
  }
  lua_getfield(L, -1, "cert");
  lua_getfield(L, -2, "key");
  if (!lua_isstring(L, -2) || !lua_isstring(L, -1))
    luaL_error(L, "moonlet: tls needs cert and key, the paths of PEM files");
  lua_getfield(L, -3, "client_ca");
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "moonlet: tls client_ca is the path of a PEM file of CA certificates");
  const char *client_ca = lua_tostring(L, -1);
  lua_getfield(L, -4, "verify_client");
  int verify = client_ca ? ML_TLS_VERIFY_ON : ML_TLS_VERIFY_OFF;
  if (lua_isboolean(L, -1)) {
    verify = lua_toboolean(L, -1) ? ML_TLS_VERIFY_ON : ML_TLS_VERIFY_OFF;
  } else if (lua_type(L, -1) == LUA_TSTRING) {
    const char *v = lua_tostring(L, -1);
    verify = strcmp(v, "on") == 0         ? ML_TLS_VERIFY_ON
             : strcmp(v, "optional") == 0 ? ML_TLS_VERIFY_OPTIONAL
             : strcmp(v, "off") == 0      ? ML_TLS_VERIFY_OFF
                                          : -1;
  } else if (!lua_isnil(L, -1)) {
    verify = -1;
  }
  if (verify < 0) luaL_error(L, "moonlet: tls verify_client is true, false, \"optional\"");
  if (verify != ML_TLS_VERIFY_OFF && !client_ca)
    luaL_error(L, "moonlet: tls verify_client needs client_ca, the CAs to verify against");
  ml_tls_ctx_opts_t o = {.server = 1,
                         .verify = verify,
                         .client_ca = verify != ML_TLS_VERIFY_OFF ? client_ca : NULL,
                         .cert = lua_tostring(L, -4),
                         .key = lua_tostring(L, -3),
                         .alpn = "http/1.1"};
  const char *err = NULL;
  int r = ml_tls_ctx_new(out, &o, &err);
  lua_pop(L, 5);
  if (r < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err ? err : "tls: cannot make a context");
    return -1;
  }
  return 0;
}

/* syntax: ctx, err = core.server_tls(opts) -- the TLS context core.listen would make of opts.tls
 * (false without opts.tls; nil and the error when a file does not load, raises on a malformed
 * opts.tls), for server:set_tls. Hot reload makes it while the new code loads, so that a
 * certificate that does not load fails the load, and gives it to the server when the new code
 * serves. The userdata owns the context until server:set_tls takes it (its __gc frees it else). */
static int l_server_tls(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  ml_tls_ctx_t **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  luaL_getmetatable(L, SERVER_TLS_MT);
  lua_setmetatable(L, -2);
  if (listen_tls(L, box) < 0) return 2;
  if (!*box) lua_pushboolean(L, 0);
  return 1;
}

static int server_tls_gc(lua_State *L) {
  ml_tls_ctx_t **box = luaL_checkudata(L, 1, SERVER_TLS_MT);
  ml_tls_ctx_free(*box);
  *box = NULL;
  return 0;
}

static int l_listen(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_getfield(L, 1, "host");
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  lua_Integer port_arg = luaL_optinteger(L, -1, 8080);
  if (port_arg < 0 || port_arg > 65535) return luaL_error(L, "moonlet: port must be 0..65535");
  int port = (int)port_arg;
  lua_getfield(L, 1, "backlog");
  int backlog = (int)luaL_optinteger(L, -1, 511);
  lua_getfield(L, 1, "unix");
  const char *unix_path = luaL_optstring(L, -1, NULL);
  size_t ulen = 0;
  if (unix_path) lua_tolstring(L, -1, &ulen);
  lua_getfield(L, 1, "unix_mode");
  lua_Integer unix_mode = luaL_optinteger(L, -1, -1);
  if (unix_mode > 07777) return luaL_error(L, "moonlet: unix_mode is a permission mode (0660)");
  if (unix_path && (!*unix_path || strlen(unix_path) != ulen))
    return luaL_error(L, "moonlet: unix must be a socket path");
  /* under --workers, the socket the supervisor made for --unix (each worker binding its own would
   * replace the others' file) */
  int inherited = unix_path && m->worker.count > 1 && m->worker_unix_fd >= 0 &&
                  strcmp(unix_path, m->worker_unix_path) == 0;
  if (unix_path && m->worker.count > 1 && !inherited)
    return luaL_error(L, "moonlet: under --workers, a Unix socket is the command line's --unix");
  ml_http_limits_t lim;
  read_limits(L, 1, &lim);
  lua_getfield(L, 1, "check_client_abort");
  int check_client_abort = lua_toboolean(L, -1);
  ml_tls_ctx_t *tls = NULL;
  if (listen_tls(L, &tls) < 0) return 2; /* nil, "tls: cannot load certificate" */
  mlua_server_t *s = calloc(1, sizeof *s);
  if (!s) {
    ml_tls_ctx_free(tls);
    return luaL_error(L, "moonlet: out of memory");
  }
  s->m = m;
  s->check_client_abort = check_client_abort;
  s->srv = ml_server_new(m->loop, &lim, &m->log, &callbacks, s);
  if (!s->srv) {
    ml_tls_ctx_free(tls);
    free(s);
    return luaL_error(L, "moonlet: out of memory");
  }
  if (tls) ml_server_set_tls(s->srv, tls); /* the server owns it now */
  ml_server_set_reuseport(s->srv, m->worker.count > 1);
  int r = inherited   ? ml_server_listen_unix_fd(s->srv, m->worker_unix_fd)
          : unix_path ? ml_server_listen_unix(s->srv, unix_path, backlog, (int)unix_mode)
                      : ml_server_listen(s->srv, host, port, backlog);
  if (r < 0) {
    s->handler_ref = LUA_NOREF;
    s->next = m->servers;
    m->servers = s;
    ml_server_close(s->srv, server_done, s);
    lua_pushnil(L);
    if (unix_path)
      lua_pushfstring(L, "listen on unix:%s: %s", unix_path, mlua_err_string(r));
    else
      lua_pushfstring(L, "listen on %s:%d: %s", host, port, mlua_err_string(r));
    return 2;
  }
  if (inherited) { /* the listener has its own copy: the worker's stop closes the socket with it */
    close(m->worker_unix_fd);
    m->worker_unix_fd = -1;
  }
  lua_pushvalue(L, 2);
  s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  s->next = m->servers;
  m->servers = s;
  mlua_worker_listening(m);
  mlua_server_t **box = lua_newuserdata(L, sizeof *box);
  *box = s;
  s->box = box;
  luaL_getmetatable(L, SERVER_MT);
  lua_setmetatable(L, -2);
  lua_pushinteger(L, ml_server_port(s->srv, 0));
  return 2;
}

static mlua_server_t *check_server(lua_State *L) {
  mlua_server_t **box = luaL_checkudata(L, 1, SERVER_MT);
  return *box;
}

/* syntax: port, err = server:port() -- nil, "closed" once close or shutdown was called (hot
 * reload hands over only a server that still listens: lua/moonlet/app.lua listen_key_of) */
static int srv_port(lua_State *L) {
  mlua_server_t *s = check_server(L);
  if (!s || s->stopping) return mlua_push_error(L, UV_EPIPE);
  lua_pushinteger(L, ml_server_port(s->srv, 0));
  return 1;
}

/* syntax: server:set_handler(fn) -- requests from now on run fn; running ones finish on the old */
static int srv_set_handler(lua_State *L) {
  mlua_server_t *s = check_server(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (!s) return mlua_push_error(L, UV_EPIPE);
  lua_pushvalue(L, 2);
  lua_rawseti(L, LUA_REGISTRYINDEX, s->handler_ref);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: ok, err = server:set_tls(ctx) -- the connections accepted from now on speak TLS with
 * ctx (core.server_tls), or plain HTTP when ctx is false; those accepted before keep the session
 * they have (it holds a reference on its own context: core/tls.c). The server takes ctx (a second
 * server:set_tls of it raises); nil, "closed" on a closed server, which leaves ctx to its __gc. */
static int srv_set_tls(lua_State *L) {
  mlua_server_t *s = check_server(L);
  ml_tls_ctx_t **box = NULL;
  if (!(lua_type(L, 2) == LUA_TBOOLEAN && !lua_toboolean(L, 2))) {
    box = luaL_checkudata(L, 2, SERVER_TLS_MT);
    if (!*box) return luaL_error(L, "moonlet: this TLS context was given to a server already");
  }
  if (!s || s->stopping) return mlua_push_error(L, UV_EPIPE);
  ml_server_set_tls(s->srv, box ? *box : NULL);
  if (box) *box = NULL;
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: server:close() -- stops accepting and closes every connection now */
static int srv_close(lua_State *L) {
  mlua_server_t *s = check_server(L);
  if (s && !s->stopping) {
    s->stopping = 1;
    ml_server_close(s->srv, server_done, s);
  }
  return 0;
}

/* syntax: server:shutdown() -- stops accepting; in-flight requests finish (bounded grace) */
static int srv_shutdown(lua_State *L) {
  mlua_server_t *s = check_server(L);
  if (s && !s->stopping) {
    s->stopping = 1;
    ml_server_shutdown(s->srv, server_done, s);
  }
  return 0;
}

static int srv_gc(lua_State *L) {
  mlua_server_t **box = luaL_checkudata(L, 1, SERVER_MT);
  if (*box) (*box)->box = NULL; /* the server goes on; it just has no Lua object any more */
  return 0;
}

static int srv_connections(lua_State *L) {
  mlua_server_t *s = check_server(L);
  lua_pushinteger(L, s ? (lua_Integer)ml_server_conn_count(s->srv) : 0);
  return 1;
}

static void set_number(lua_State *L, const char *name, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, name);
}

/* syntax: stats = core.server_stats() -- nginx's stub_status figures summed over the instance's
 * servers (core/http.h ml_server_stats_t): { active, reading, writing, waiting, accepted, handled,
 * requests }; the counts since start include servers closed since only while they are listed. */
static int l_server_stats(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  ml_server_stats_t st = {0};
  for (mlua_server_t *s = m->servers; s; s = s->next)
    ml_server_stats_add(s->srv, &st);
  lua_createtable(L, 0, 7);
  set_number(L, "active", st.active);
  set_number(L, "reading", st.reading);
  set_number(L, "writing", st.writing);
  set_number(L, "waiting", st.waiting);
  set_number(L, "accepted", (double)st.accepted);
  set_number(L, "handled", (double)st.handled);
  set_number(L, "requests", (double)st.requests);
  return 1;
}

void mlua_http_servers_stop(moonlet_t *m) {
  if (!m->servers) {
    mlua_stop_drained(m);
    return;
  }
  for (mlua_server_t *s = m->servers, *next; s; s = next) {
    next = s->next;
    if (!s->stopping) {
      s->stopping = 1;
      ml_server_shutdown(s->srv, server_done, s);
    }
  }
}

void mlua_http_servers_close(moonlet_t *m) {
  for (mlua_server_t *s = m->servers, *next; s; s = next) {
    next = s->next;
    s->stopping = 1;
    ml_server_close(s->srv, server_done, s); /* a no-op when already closing */
  }
}

void mlua_open_http_server(lua_State *L, moonlet_t *m) {
  static const luaL_Reg xm[] = {{"read", x_read},
                                {"respond", x_respond},
                                {"start", x_start},
                                {"write", x_write},
                                {"finish", x_finish},
                                {"send_file", x_send_file},
                                {"headers", x_headers},
                                {"forward_headers", x_forward_headers},
                                {"header", x_header},
                                {"info", x_info},
                                {"tls", x_tls},
                                {"started", x_started},
                                {"is_open", x_is_open},
                                {"set_close", x_set_close},
                                {"abort", x_abort},
                                {"cancel_on_hangup", x_cancel_on_hangup},
                                {"set_request_id", x_set_request_id},
                                {NULL, NULL}};
  static const luaL_Reg sm[] = {{"port", srv_port},
                                {"set_handler", srv_set_handler},
                                {"close", srv_close},
                                {"shutdown", srv_shutdown},
                                {"connections", srv_connections},
                                {"set_tls", srv_set_tls},
                                {NULL, NULL}};
  static const luaL_Reg fns[] = {{"listen", l_listen},
                                 {"server_tls", l_server_tls},
                                 {"server_stats", l_server_stats},
                                 {NULL, NULL}};
  luaL_newmetatable(L, EXCHANGE_MT);
  lua_pushliteral(L, EXCHANGE_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register_methods(L, m, xm, -2);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, x_tostring);
  lua_setfield(L, -2, "__tostring");
  m->exchange_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  luaL_newmetatable(L, SERVER_MT);
  lua_pushliteral(L, SERVER_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, sm);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, srv_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, SERVER_TLS_MT);
  lua_pushliteral(L, SERVER_TLS_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, server_tls_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
