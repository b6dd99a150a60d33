/* bindings/tcp.c: TCP client sockets in the cosocket style (lua-nginx-module): connect, send,
 * receive(n | "*l" | "*a"), settimeout, close. Each call that waits yields its task.
 *
 * Ownership: the socket struct is C memory; the Lua userdata holds a pointer to it, NULLed when the
 * socket closes. The struct is linked in the instance's resources and freed from the close callback
 * of its last handle (tcp + timer). One wait at a time ("socket busy"): the wait records the task,
 * starts the I/O and the timer; whichever of them fires first clears the record, stops the other
 * and resumes the task. The string given to uv_write is pinned by a registry ref until its callback.
 * close() and __gc wake a parked task with nil, "closed" before the handles close.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "mlua.h"

#define SOCK_MT "moonlet.tcp"

enum { W_NONE = 0, W_CONNECT, W_READ, W_WRITE };
enum { R_BYTES = 0, R_LINE, R_ALL };

typedef struct sock_s {
  mlua_res_t res;
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_connect_t creq;
  uv_write_t wreq;
  moonlet_t *m;
  struct sock_s **box;    /* the Lua box, NULLed at close */
  mlua_task_t *task;      /* the parked task, or NULL */
  int wait;               /* W_* */
  int rmode;              /* R_* of the read that waits */
  size_t rwant;           /* bytes wanted by an R_BYTES read */
  int wref;               /* pinned string of the write in flight */
  char *buf;              /* received, not yet returned */
  size_t len, cap;
  int eof, err;           /* the peer closed / a read error */
  int reading, closed, handles;
  uint64_t timeout_ms;    /* 0: no timeout */
} sock_t;

static void sock_closed(uv_handle_t *h) {
  sock_t *s = h->data;
  if (--s->handles == 0) {
    free(s->buf);
    free(s);
  }
}

/* Takes the parked task out of its wait: exactly one source (I/O, timer, close) gets it. */
static mlua_task_t *take_waiter(sock_t *s) {
  mlua_task_t *t = s->task;
  s->task = NULL;
  s->wait = W_NONE;
  uv_timer_stop(&s->timer);
  if (s->reading) {
    uv_read_stop((uv_stream_t *)&s->tcp);
    s->reading = 0;
  }
  return t;
}

static void sock_close(sock_t *s) {
  if (s->closed) return;
  s->closed = 1;
  if (s->box) *s->box = NULL;
  s->box = NULL;
  mlua_res_unlink(s->m, &s->res);
  mlua_task_t *t = s->task ? take_waiter(s) : NULL;
  uv_close((uv_handle_t *)&s->tcp, sock_closed);
  uv_close((uv_handle_t *)&s->timer, sock_closed);
  if (t) mlua_task_resume(t, mlua_push_error(t->co, UV_EPIPE));
}

/* A cancelled wait: a read is simply stopped; a connect or a write in flight cannot be taken back,
 * so the socket is closed (the cancelled task is not resumed by it). */
static void sock_cancel(mlua_task_t *t, void *wait) {
  sock_t *s = wait;
  (void)t;
  int w = s->wait;
  take_waiter(s);
  if (w == W_CONNECT || w == W_WRITE) sock_close(s);
}

static void sock_res_close(mlua_res_t *r) {
  sock_t *s = (sock_t *)((char *)r - offsetof(sock_t, res));
  s->task = NULL; /* the instance is going away: nobody is resumed */
  sock_close(s);
}

static sock_t *check_sock(lua_State *L) {
  sock_t **box = luaL_checkudata(L, 1, SOCK_MT);
  return *box;
}

static void on_timeout(uv_timer_t *h) {
  sock_t *s = h->data;
  int wait = s->wait;
  mlua_task_t *t = take_waiter(s);
  if (!t) return;
  if (wait == W_CONNECT || wait == W_WRITE) { /* the operation cannot be taken back: close */
    mlua_task_resume(t, mlua_push_error(t->co, UV_ETIMEDOUT));
    sock_close(s);
    return;
  }
  mlua_task_resume(t, mlua_push_error(t->co, UV_ETIMEDOUT));
}

static void start_timer(sock_t *s) {
  if (s->timeout_ms) uv_update_time(s->m->loop);
  if (s->timeout_ms) uv_timer_start(&s->timer, on_timeout, s->timeout_ms, 0);
}

/* -- Connect ------------------------------------------------------------------------------------- */

static void on_connect(uv_connect_t *req, int status) {
  sock_t *s = req->data;
  if (s->wait != W_CONNECT) { /* timed out or closed: already answered */
    luaL_unref(s->m->L, LUA_REGISTRYINDEX, s->wref);
    s->wref = LUA_NOREF;
    return;
  }
  mlua_task_t *t = take_waiter(s);
  if (status < 0) {
    mlua_task_resume(t, mlua_push_error(t->co, status));
    sock_close(s);
    return;
  }
  lua_rawgeti(t->co, LUA_REGISTRYINDEX, s->wref); /* the box, pinned during connect */
  luaL_unref(t->co, LUA_REGISTRYINDEX, s->wref);
  s->wref = LUA_NOREF;
  mlua_task_resume(t, 1);
}

/* syntax: sock, err = core.tcp_connect(host, port, timeout_seconds) */
static int l_connect(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  double timeout = luaL_optnumber(L, 3, 60);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  struct sockaddr_storage addr;
  int r = strchr(host, ':') ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr)
                            : uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
  if (r < 0) return mlua_push_error(L, r);
  sock_t *s = calloc(1, sizeof *s);
  if (!s) return luaL_error(L, "moonlet: out of memory");
  s->m = m;
  s->wref = LUA_NOREF;
  s->timeout_ms = (uint64_t)(timeout * 1000);
  uv_tcp_init(m->loop, &s->tcp);
  uv_timer_init(m->loop, &s->timer);
  s->tcp.data = s->timer.data = s->creq.data = s->wreq.data = s;
  s->handles = 2;
  mlua_res_link(m, &s->res, sock_res_close);
  sock_t **box = lua_newuserdata(L, sizeof *box);
  *box = s;
  s->box = box;
  luaL_getmetatable(L, SOCK_MT);
  lua_setmetatable(L, -2);
  r = uv_tcp_connect(&s->creq, &s->tcp, (struct sockaddr *)&addr, on_connect);
  if (r < 0) {
    sock_close(s);
    return mlua_push_error(L, r);
  }
  uv_tcp_nodelay(&s->tcp, 1);
  s->wref = luaL_ref(L, LUA_REGISTRYINDEX); /* pins the box until connected */
  s->task = t;
  s->wait = W_CONNECT;
  start_timer(s);
  return mlua_task_wait(L, t, sock_cancel, s);
}

/* -- Send -------------------------------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
  sock_t *s = req->data;
  luaL_unref(s->m->L, LUA_REGISTRYINDEX, s->wref);
  s->wref = LUA_NOREF;
  if (s->wait != W_WRITE) return;
  mlua_task_t *t = take_waiter(s);
  if (status < 0) {
    mlua_task_resume(t, mlua_push_error(t->co, status));
    return;
  }
  lua_pushboolean(t->co, 1);
  mlua_task_resume(t, 1);
}

/* syntax: ok, err = sock:send(data) */
static int s_send(lua_State *L) {
  sock_t *s = check_sock(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (!s) return mlua_push_error(L, UV_EPIPE);
  if (s->wait) return luaL_error(L, "moonlet: socket busy");
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  int w = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
  if (w == (int)len) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (w < 0 && w != UV_EAGAIN) return mlua_push_error(L, w);
  if (w < 0) w = 0;
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  b = uv_buf_init((char *)data + w, (unsigned)(len - (size_t)w));
  int r = uv_write(&s->wreq, (uv_stream_t *)&s->tcp, &b, 1, on_write);
  if (r < 0) return mlua_push_error(L, r);
  lua_pushvalue(L, 2);
  s->wref = luaL_ref(L, LUA_REGISTRYINDEX); /* the bytes uv_write reads */
  s->task = t;
  s->wait = W_WRITE;
  start_timer(s);
  return mlua_task_wait(L, t, sock_cancel, s);
}

/* -- Receive ----------------------------------------------------------------------------------- */

/* Pushes the result of the pending read if it can be answered now; returns the count or 0. */
static int try_answer(lua_State *L, sock_t *s) {
  if (s->rmode == R_BYTES && s->len >= s->rwant && s->rwant > 0) {
    lua_pushlstring(L, s->buf, s->rwant);
    memmove(s->buf, s->buf + s->rwant, s->len - s->rwant);
    s->len -= s->rwant;
    return 1;
  }
  if (s->rmode == R_LINE && s->len > 0) {
    char *nl = memchr(s->buf, '\n', s->len);
    if (nl) {
      size_t n = (size_t)(nl - s->buf), skip = n + 1;
      if (n > 0 && s->buf[n - 1] == '\r') n--;
      lua_pushlstring(L, s->buf, n);
      memmove(s->buf, s->buf + skip, s->len - skip);
      s->len -= skip;
      return 1;
    }
  }
  if (s->eof || s->err) {
    if (s->rmode == R_ALL) {
      lua_pushlstring(L, s->buf, s->len);
      s->len = 0;
      return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, "closed");
    lua_pushlstring(L, s->buf, s->len); /* the partial data */
    s->len = 0;
    return 3;
  }
  return 0;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  sock_t *s = h->data;
  (void)suggested;
  if (s->cap - s->len < 16384) {
    size_t cap = s->cap ? s->cap * 2 : 32768;
    char *p = realloc(s->buf, cap);
    if (!p) {
      *buf = uv_buf_init(NULL, 0);
      return;
    }
    s->buf = p;
    s->cap = cap;
  }
  *buf = uv_buf_init(s->buf + s->len, (unsigned)(s->cap - s->len));
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  sock_t *s = st->data;
  (void)buf;
  if (n == 0) return;
  if (n > 0) s->len += (size_t)n;
  else if (n == UV_EOF) s->eof = 1;
  else s->err = (int)n;
  if (s->wait != W_READ) return;
  int nres = try_answer(s->task->co, s);
  if (nres == 0) return;
  mlua_task_t *t = take_waiter(s);
  mlua_task_resume(t, nres);
}

/* syntax: data, err, partial = sock:receive(n | "*l" | "*a") */
static int s_receive(lua_State *L) {
  sock_t *s = check_sock(L);
  if (!s) return mlua_push_error(L, UV_EPIPE);
  if (s->wait) return luaL_error(L, "moonlet: socket busy");
  if (lua_type(L, 2) == LUA_TNUMBER) {
    s->rmode = R_BYTES;
    s->rwant = (size_t)lua_tointeger(L, 2);
  } else {
    const char *p = luaL_optstring(L, 2, "*l");
    if (strcmp(p, "*l") == 0) s->rmode = R_LINE;
    else if (strcmp(p, "*a") == 0) s->rmode = R_ALL;
    else return luaL_argerror(L, 2, "expected a byte count, \"*l\" or \"*a\"");
  }
  int n = try_answer(L, s);
  if (n) return n;
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  int r = uv_read_start((uv_stream_t *)&s->tcp, alloc_cb, on_read);
  if (r < 0) return mlua_push_error(L, r);
  s->reading = 1;
  s->task = t;
  s->wait = W_READ;
  start_timer(s);
  return mlua_task_wait(L, t, sock_cancel, s);
}

/* syntax: sock:settimeout(seconds) -- for every later wait; nil or 0: none */
static int s_settimeout(lua_State *L) {
  sock_t *s = check_sock(L);
  double secs = luaL_optnumber(L, 2, 0);
  if (s) s->timeout_ms = secs > 0 ? (uint64_t)(secs * 1000) : 0;
  return 0;
}

/* syntax: sock:close() */
static int s_close(lua_State *L) {
  sock_t *s = check_sock(L);
  if (s) sock_close(s);
  lua_pushboolean(L, 1);
  return 1;
}

static int s_gc(lua_State *L) {
  sock_t **box = luaL_checkudata(L, 1, SOCK_MT);
  if (*box) sock_close(*box);
  return 0;
}

void mlua_open_tcp(lua_State *L, moonlet_t *m) {
  static const luaL_Reg sm[] = {{"send", s_send}, {"receive", s_receive},
                                {"settimeout", s_settimeout}, {"close", s_close}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"tcp_connect", l_connect}, {NULL, NULL}};
  luaL_newmetatable(L, SOCK_MT);
  lua_pushliteral(L, SOCK_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, sm);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, s_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
