/* bindings/tcp.c: TCP sockets in the cosocket style (lua-nginx-module), client and server side:
 * core.tcp_connect(ip, port, timeout), core.tcp_listen(host, port, backlog, fn, timeout), their
 * Unix domain socket twins core.unix_connect(path, timeout) and core.unix_listen(path, backlog, fn,
 * timeout) (a uv_pipe_t in the same union: every method works on either), and the
 * socket methods send, receive(n | "*l" | "*a"), receive_any, receiveuntil's reader, tls (the
 * handshake; afterwards send and receive encrypt transparently through core/tls.c), settimeout(s),
 * getpeername, getsockname, close, reusable (for keep-alive pools: moonlet.ngx), poolable and
 * closed_cleanly (moonlet.http's pool and close-delimited bodies). Each call that
 * waits yields its task. lua/moonlet/tcp.lua wraps these (name resolution, check() of every wait)
 * as moonlet.tcp.
 *
 * Ownership:
 * - A socket (sock_t) is C memory; the Lua userdata holds a pointer to it, NULLed when the socket
 *   closes, after which every method returns nil, "closed". The struct is linked in the instance's
 *   resources and freed from the close callback of its last handle (tcp + two timers), after every
 *   write request's callback has run (libuv calls them, with UV_ECANCELED, before the close
 *   callback).
 * - One reader and one writer may wait at once (full duplex; a second one gets nil, "socket busy").
 *   A read or TLS handshake waits with the read timer, a connect or write with the write timer;
 *   whichever of I/O, timer, close or cancel comes first takes the waiter (take_reader,
 *   take_writer: from then on the task cannot be cancelled there), stops the other sources and
 *   resumes it. Resumes come last in a callback and one task at a time: the Lua that runs may close
 *   the socket or cancel the other waiter.
 * - Pinned in the registry: the box during connect (wref), the string or array of a plain write in
 *   flight (wref; a write nobody waits for, from a coroutine of the user's own, pins its own and
 *   frees itself: queued_write_t). TLS ciphertext goes out in malloc'd write requests freed by
 *   their callbacks. A task that cannot yield where it sends is refused before a byte goes out.
 * - A connect, write or handshake that times out or is cancelled cannot be taken back: the socket
 *   is closed. A read that times out or is cancelled just stops reading; the socket stays usable.
 * - A TLS close whose close_notify the socket did not take at once (closing_tls) keeps the stream
 *   and the read timer open, and the socket linked in the resources, until that write is done or
 *   TLS_CLOSE_MS passed (sock_close); the Lua side sees it closed from the start.
 * - The read timer is armed lazily (a receive is the most frequent wait there is): a wait sets its
 *   deadline (rdeadline) and starts the timer only when it is not armed already to fire before
 *   that; the end of a wait leaves it armed. A timer that fires for a wait that ended does nothing
 *   (or re-arms for the deadline of the wait in progress). It is ref'd only while a reader waits.
 *   This saves a timer heap insert and removal per receive.
 * - A listening server (server_t) is C memory owned by the instance's resources: it keeps serving
 *   when Lua drops its object, until server:close() or moonlet_free. Each accepted connection runs
 *   the Lua function fn(sock) in a task of its own.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <sys/socket.h>
#include <sys/un.h>

#include "../core/listen.h"
#include "../core/tls.h"
#include "mlua.h"
#include "readbuf.h"

/* nil, short message: the code name (mlua_push_error's third value) stays out of the way of
 * `assert.same({ nil, "timeout" }, { sock:receive(1) })`. Returns 2. */
static int push_err(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, mlua_err_string(e));
  return 2;
}

#define SOCK_MT "moonlet.tcp"
#define SERVER_MT "moonlet.tcp.server"
#define TLS_CTX_MT "moonlet.tls.context"
#define CBUF_SIZE 65536 /* TLS: ciphertext read buffer */

enum { W_NONE = 0, W_CONNECT, W_READ, W_WRITE, W_HANDSHAKE };

/* The stream under a socket or a listener: TCP, or a Unix domain socket ("unix:/path"). */
typedef union {
  uv_tcp_t tcp;
  uv_pipe_t pipe;
} stream_u;

typedef struct sock_s {
  mlua_res_t res;
  stream_u io;
  int is_unix;       /* io is a uv_pipe_t */
  uv_timer_t rtimer; /* read and handshake waits */
  uv_timer_t wtimer; /* connect and write waits */
  uv_connect_t creq;
  uv_write_t wreq; /* the plain write of the send that waits */
  moonlet_t *m;
  struct sock_s **box; /* the Lua box, NULLed at close */
  mlua_task_t *rtask;  /* the parked reader (or handshaker), or NULL */
  mlua_task_t *wtask;  /* the parked writer (or connecter), or NULL */
  int rwait, wwait;    /* W_* */
  int rmode;           /* R_* of the read that waits */
  size_t rwant;        /* R_BYTES: bytes wanted; R_ANY, R_UNTIL: at most (0: all) */
  char *pat;           /* R_UNTIL: the pattern (malloc'd) */
  size_t patlen;
  int wref;          /* registry ref: the box during connect, the data of a plain write */
  mlua_readbuf_t rb; /* plaintext received, not yet returned */
  char *cbuf;        /* TLS: ciphertext read buffer */
  int eof, err;      /* the peer closed / a read or TLS error (UV_E*) */
  int reading, closed, handles, accepted;
  int closing_tls;                      /* closed, io open until close_notify went out (below) */
  int cut;                              /* a write was given up: no close_notify */
  int64_t connect_ms, send_ms, read_ms; /* < 0: no timeout */
  uint64_t rdeadline;                   /* the waiting reader's deadline (loop ms), 0: none */
  uint64_t rtimer_due;                  /* when the read timer fires, while it is active */
  ml_tls_t *tls;                        /* NULL: plain TCP */
  int tls_up;                           /* the handshake is complete */
  int tls_notified;                     /* the peer's close_notify came: its data ended whole */
} sock_t;

/* push_err on a waiter a callback (or a close) wakes, another task than the running one: through
 * mlua_push_fail, protected under a host's allocator. */
static int fail(sock_t *s, mlua_task_t *t, int e) {
  return mlua_push_fail(s->m, t->co, mlua_err_string(e), NULL);
}

/* A write of TLS ciphertext (or of a handshake message): the bytes live in the request. */
typedef struct {
  uv_write_t req;
  sock_t *s;
  int notify; /* W_NOTIFY: the end of the send the writer waits for; W_CLOSE: of close_notify */
  char data[];
} wbuf_t;

enum { W_QUIET = 0, W_NOTIFY = 1, W_CLOSE = 2 };
#define TLS_CLOSE_MS 3000 /* close_notify the socket did not take at once: nginx's 3 s at most */

typedef struct server_s {
  mlua_res_t res;
  stream_u io;
  int is_unix;     /* io is a uv_pipe_t */
  char *path;      /* a Unix socket's path (malloc'd), its file removed at the close ... */
  ml_unix_id_t id; /* ... if it is still this one (core/listen.h) */
  moonlet_t *m;
  struct server_s **box; /* the Lua box, NULLed at close */
  int fn_ref;            /* fn(sock), run in a new task per connection */
  int64_t timeout_ms;    /* the accepted sockets' timeouts */
  int closed;
} server_t;

/* -- Life cycle ------------------------------------------------------------------------------- */

static void sock_closed(uv_handle_t *h) {
  sock_t *s = h->data;
  if (--s->handles == 0) {
    ml_tls_free(s->tls);
    free(s->rb.buf);
    free(s->cbuf);
    free(s->pat);
    free(s);
  }
}

#define READ_AHEAD_MAX (256 * 1024) /* reading pauses while this much waits for a receive */
#define MAX_RECEIVE 1e12            /* a byte count beyond this is a mistake: raised as one */

static void stop_reading(sock_t *s) {
  uv_timer_stop(&s->rtimer);
  s->rdeadline = 0;
  if (s->reading) {
    uv_read_stop((uv_stream_t *)&s->io);
    s->reading = 0;
  }
}

/* Takes the parked reader out of its wait; NULL when there is none. Reading goes on (what comes
 * is buffered for the next receive, up to READ_AHEAD_MAX, and an EOF is seen at once): stopping and
 * restarting it for every receive costs two epoll_ctl calls. */
static mlua_task_t *take_reader(sock_t *s) {
  mlua_task_t *t = s->rtask;
  s->rtask = NULL;
  s->rwait = W_NONE;
  mlua_task_unwait(t); /* Lua may run before the resume (on_wtimeout's close wakes the reader) */
  s->rdeadline = 0;    /* the read timer stays armed (lazy): see the top */
  uv_unref((uv_handle_t *)&s->rtimer);
  uv_unref((uv_handle_t *)&s->io); /* reading ahead keeps no script alive */
  return t;
}

static mlua_task_t *take_writer(sock_t *s) {
  mlua_task_t *t = s->wtask;
  s->wtask = NULL;
  s->wwait = W_NONE;
  mlua_task_unwait(t);
  uv_timer_stop(&s->wtimer);
  return t;
}

static int tls_send_pending(sock_t *s, int notify);

/* -- Closing ---------------------------------------------------------------------------------- */

/* The end of a close that waited for its close_notify (closing_tls): the write went out or failed
 * (on_tls_write), the wait is over (on_close_timeout) or the instance goes (sock_res_close). The
 * stream and the read timer close now; the write timer closed with the socket. */
static void close_tls_done(sock_t *s) {
  if (!s->closing_tls) return;
  s->closing_tls = 0;
  mlua_res_unlink(s->m, &s->res);
  uv_close((uv_handle_t *)&s->io, sock_closed); /* (cancels the write if it is still queued) */
  uv_close((uv_handle_t *)&s->rtimer, sock_closed);
}

static void on_close_timeout(uv_timer_t *h) { close_tls_done(h->data); }

/* Closes the socket once: the box forgets it, the handles close (the struct goes with the last
 * close callback), a waiting reader and then a waiting writer wake with nil, "closed".
 * A TLS socket says close_notify first, unless it failed or a send waits or was given up (its
 * data would be cut: a close_notify must not pass it off as whole). What the socket does not take
 * at once (its buffer is full: the peer reads slowly) is written behind whatever is queued, and the
 * stream closes when that write is done (W_CLOSE) or after TLS_CLOSE_MS (the read timer's),
 * whichever comes first; until then the socket stays an instance resource, so that moonlet_free
 * closes it. Dropping it instead would leave the peer a connection cut without one. The wait is
 * not the socket's send timeout: nobody waits for a close, which returns at once. */
static void sock_close(sock_t *s) {
  if (s->closed) return;
  int wait_tls = 0;
  if (s->tls && s->tls_up && !s->err && !s->cut && s->wwait != W_WRITE) {
    ml_tls_shutdown(s->tls);
    wait_tls = tls_send_pending(s, W_CLOSE) == 1;
  }
  s->closed = 1;
  if (s->box) *s->box = NULL;
  s->box = NULL;
  mlua_task_t *r = take_reader(s), *w = NULL;
  if (wait_tls) {
    s->closing_tls = 1;
    stop_reading(s); /* (and the read timer, free for the wait) */
    uv_ref((uv_handle_t *)&s->rtimer);
    uv_timer_start(&s->rtimer, on_close_timeout, TLS_CLOSE_MS, 0);
  } else {
    mlua_res_unlink(s->m, &s->res);
    uv_close((uv_handle_t *)&s->io, sock_closed);
    uv_close((uv_handle_t *)&s->rtimer, sock_closed);
  }
  uv_close((uv_handle_t *)&s->wtimer, sock_closed);
  if (r) mlua_task_resume(r, fail(s, r, UV_EPIPE));
  if (s->wtask) w = take_writer(s); /* after the reader ran: it may have cancelled the writer */
  if (w) mlua_task_resume(w, fail(s, w, UV_EPIPE));
}

static void sock_res_close(mlua_res_t *r) {
  sock_t *s = (sock_t *)((char *)r - offsetof(sock_t, res));
  s->rtask = s->wtask = NULL; /* the instance is going away: nobody is resumed */
  s->rwait = s->wwait = W_NONE;
  s->tls_up = 0; /* and nothing more is written */
  if (s->closed)
    close_tls_done(s); /* a close waiting for its close_notify ends now */
  else
    sock_close(s);
}

/* A cancelled wait. A read is simply stopped; a connect, write or handshake in flight cannot be
 * taken back, so the socket is closed (which wakes the other direction's waiter, not this one). */
static void sock_cancel(mlua_task_t *t, void *wait) {
  sock_t *s = wait;
  if (t == s->rtask) {
    int w = s->rwait;
    take_reader(s);
    if (w == W_HANDSHAKE) sock_close(s);
  } else if (t == s->wtask) {
    take_writer(s);
    s->cut = 1;
    sock_close(s);
  }
}

static sock_t *sock_new(moonlet_t *m, int64_t timeout_ms, int is_unix) {
  sock_t *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->m = m;
  s->wref = LUA_NOREF;
  s->connect_ms = s->send_ms = s->read_ms = timeout_ms;
  s->is_unix = is_unix;
  ml_stream_init(m->loop, &s->io, is_unix);
  uv_timer_init(m->loop, &s->rtimer);
  uv_timer_init(m->loop, &s->wtimer);
  s->io.tcp.data = s->rtimer.data = s->wtimer.data = s->creq.data = s->wreq.data = s;
  s->handles = 3;
  mlua_res_link(m, &s->res, sock_res_close);
  return s;
}

static sock_t **push_box(lua_State *L, sock_t *s) {
  sock_t **box = lua_newuserdata(L, sizeof *box);
  *box = s;
  s->box = box;
  luaL_getmetatable(L, SOCK_MT);
  lua_setmetatable(L, -2);
  return box;
}

static sock_t *check_sock(lua_State *L) {
  sock_t **box = mlua_check_object(L, 1, SOCK_MT);
  return *box;
}

/* Pushes nil, message, detail for the socket's error e: TLS failures have their own words. */
static int push_sock_error(lua_State *L, sock_t *s, int e) {
  if (e == UV_EPROTO && s && s->tls && ml_tls_error(s->tls)) {
    lua_pushnil(L);
    lua_pushstring(L, ml_tls_error(s->tls));
    lua_pushstring(L, ml_tls_detail(s->tls));
    return 3;
  }
  return push_err(L, e);
}

/* push_sock_error so */
static int sock_fail(sock_t *s, mlua_task_t *t, int e) {
  if (e == UV_EPROTO && s->tls && ml_tls_error(s->tls))
    return mlua_push_fail(s->m, t->co, ml_tls_error(s->tls), ml_tls_detail(s->tls));
  return fail(s, t, e);
}

static int64_t to_ms(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  double secs = luaL_checknumber(L, idx);
  return secs <= 0 ? 0 : (int64_t)mlua_ms(secs);
}

static void on_rtimeout(uv_timer_t *h);
static void on_wtimeout(uv_timer_t *h);

static void start_write_timer(sock_t *s, int64_t ms) {
  if (ms < 0) return;
  uv_update_time(s->m->loop);
  uv_timer_start(&s->wtimer, on_wtimeout, mlua_wait_ms((uint64_t)ms), 0);
}

/* Arms the read timer for a wait of ms (< 0: none) starting now, unless it fires before anyway. */
static void arm_read_timer(sock_t *s, int64_t ms) {
  if (ms < 0) return;
  uv_update_time(s->m->loop);
  ms = (int64_t)mlua_wait_ms((uint64_t)ms);
  s->rdeadline = uv_now(s->m->loop) + (uint64_t)ms;
  uv_ref((uv_handle_t *)&s->rtimer);
  if (uv_is_active((uv_handle_t *)&s->rtimer) && s->rtimer_due <= s->rdeadline) return;
  s->rtimer_due = s->rdeadline;
  uv_timer_start(&s->rtimer, on_rtimeout, (uint64_t)ms, 0);
}

static void on_rtimeout(uv_timer_t *h) {
  sock_t *s = h->data;
  if (!s->rtask || !s->rdeadline) return; /* armed for a wait that ended */
  uint64_t now = uv_now(s->m->loop);
  if (now < s->rdeadline) { /* armed for an earlier wait: this one has time left */
    s->rtimer_due = s->rdeadline;
    uv_timer_start(&s->rtimer, on_rtimeout, s->rdeadline - now, 0);
    return;
  }
  int w = s->rwait;
  mlua_task_t *t = take_reader(s);
  if (!t) return;
  if (w == W_HANDSHAKE) sock_close(s); /* half a handshake cannot be resumed */
  mlua_task_resume(t, fail(s, t, UV_ETIMEDOUT));
}

static void on_wtimeout(uv_timer_t *h) {
  sock_t *s = h->data;
  mlua_task_t *t = take_writer(s);
  if (!t) return;
  s->cut = 1;
  sock_close(s); /* a connect or a write cannot be taken back */
  mlua_task_resume(t, fail(s, t, UV_ETIMEDOUT));
}

/* -- Connect -------------------------------------------------------------------------------------
 */

static void on_connect(uv_connect_t *req, int status) {
  sock_t *s = req->data;
  lua_State *L = s->m->L;
  if (s->wwait != W_CONNECT) { /* timed out, cancelled or closed: already answered */
    luaL_unref(L, LUA_REGISTRYINDEX, s->wref);
    s->wref = LUA_NOREF;
    return;
  }
  mlua_task_t *t = take_writer(s);
  if (status < 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, s->wref);
    s->wref = LUA_NOREF;
    sock_close(s);
    mlua_task_resume(t, fail(s, t, status));
    return;
  }
  if (!s->is_unix) uv_tcp_nodelay(&s->io.tcp, 1);
  lua_rawgeti(t->co, LUA_REGISTRYINDEX, s->wref); /* the box, pinned during connect */
  luaL_unref(L, LUA_REGISTRYINDEX, s->wref);
  s->wref = LUA_NOREF;
  mlua_task_resume(t, 1);
}

/* The connect of s, begun, waits: the box on top of L is pinned until on_connect. */
static int wait_connect(lua_State *L, mlua_task_t *t, sock_t *s) {
  s->wref = luaL_ref(L, LUA_REGISTRYINDEX);
  s->wtask = t;
  s->wwait = W_CONNECT;
  start_write_timer(s, s->connect_ms);
  return mlua_task_wait(L, t, sock_cancel, s);
}

/* syntax: sock, err = core.tcp_connect(ip, port, timeout_seconds)
 * ip is an address literal ("localhost" is taken as 127.0.0.1); timeout defaults to 60 s and is
 * also the socket's send and read timeout. */
static int l_connect(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  int64_t ms = lua_isnoneornil(L, 3) ? 60000 : to_ms(L, 3);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (port < 0 || port > 65535) return luaL_argerror(L, 2, "port out of range");
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  struct sockaddr_storage addr;
  int r = strchr(host, ':') ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr)
                            : uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
  if (r < 0) return push_err(L, r);
  sock_t *s = sock_new(m, ms, 0);
  if (!s) return luaL_error(L, "moonlet: out of memory");
  push_box(L, s);
  r = uv_tcp_connect(&s->creq, &s->io.tcp, (struct sockaddr *)&addr, on_connect);
  if (r < 0) {
    sock_close(s);
    return push_err(L, r);
  }
  return wait_connect(L, t, s);
}

/* syntax: sock, err = core.unix_connect(path, timeout_seconds) -- a Unix domain socket; the same
 * socket methods as core.tcp_connect's (TLS included) */
static int l_connect_unix(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  int64_t ms = lua_isnoneornil(L, 2) ? 60000 : to_ms(L, 2);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (len == 0 || strlen(path) != len) return luaL_argerror(L, 1, "not a socket path");
  if (len >= sizeof((struct sockaddr_un *)0)->sun_path) return push_err(L, UV_ENAMETOOLONG);
  sock_t *s = sock_new(m, ms, 1);
  if (!s) return luaL_error(L, "moonlet: out of memory");
  push_box(L, s);
  uv_pipe_connect(&s->creq, &s->io.pipe, path, on_connect); /* errors come to on_connect */
  return wait_connect(L, t, s);
}

/* syntax: to = core.tcp_move(to, from) -- the connection of the socket object from goes into to,
 * whose own is closed (an empty box), or into a new object when to is nil; from is left closed.
 * sock:connect on a moonlet.tcp.connect socket reconnects the object the user holds this way, and
 * moves a pooled connection out of it first (lua/moonlet/tcp.lua). Only an idle connection moves:
 * no task waits on it (a parked task holds the struct, not the box, but its wait belongs to the
 * object it was called on). */
static int l_move(lua_State *L) {
  sock_t **from = mlua_check_object(L, 2, SOCK_MT);
  sock_t **to;
  if (lua_isnil(L, 1)) {
    to = lua_newuserdata(L, sizeof *to);
    *to = NULL;
    luaL_getmetatable(L, SOCK_MT);
    lua_setmetatable(L, -2);
  } else {
    to = mlua_check_object(L, 1, SOCK_MT);
    lua_settop(L, 1);
  }
  sock_t *s = *from;
  if (*to) return luaL_error(L, "moonlet.tcp: moving a connection into an open socket");
  if (!s || s->rtask || s->wtask)
    return luaL_error(L, "moonlet.tcp: only an idle connection moves");
  *from = NULL;
  *to = s;
  s->box = to;
  return 1;
}

/* -- Send -------------------------------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
  sock_t *s = req->data;
  luaL_unref(s->m->L, LUA_REGISTRYINDEX, s->wref);
  s->wref = LUA_NOREF;
  if (s->wwait != W_WRITE) return;
  mlua_task_t *t = take_writer(s);
  if (status < 0) {
    mlua_task_resume(t, fail(s, t, status));
    return;
  }
  lua_pushboolean(t->co, 1);
  mlua_task_resume(t, 1);
}

/* A write that nobody waits for (sock:send from a coroutine of the user's own, which cannot
 * yield): it pins its bytes itself, and frees itself when libuv is done with it (on success, error,
 * or the socket's close, which cancels it). */
typedef struct {
  uv_write_t req;
  moonlet_t *m;
  int ref;
} queued_write_t;

static void on_queued_write(uv_write_t *req, int status) {
  queued_write_t *q = (queued_write_t *)req;
  (void)status; /* an error shows on the socket's next read or write */
  luaL_unref(q->m->L, LUA_REGISTRYINDEX, q->ref);
  free(q);
}

static void on_tls_write(uv_write_t *req, int status) {
  wbuf_t *w = req->data;
  sock_t *s = w->s;
  int notify = w->notify;
  free(w);
  if (notify == W_CLOSE) { /* close_notify is out (or failed, or the stream closed): the end */
    close_tls_done(s);
    return;
  }
  if (notify != W_NOTIFY || s->wwait != W_WRITE) return;
  mlua_task_t *t = take_writer(s);
  if (status < 0) {
    mlua_task_resume(t, fail(s, t, status));
    return;
  }
  lua_pushboolean(t->co, 1);
  mlua_task_resume(t, 1);
}

/* Sends the pending TLS ciphertext: what the socket takes now, the rest in a write request.
 * Returns 1 when a request is queued (its callback notifies as notify says: W_*), 0 when all went
 * out now, or a negative error. */
static int tls_send_pending(sock_t *s, int notify) {
  size_t n = ml_tls_pending(s->tls);
  if (n == 0 || s->closed) return 0;
  wbuf_t *w = malloc(sizeof *w + n);
  if (!w) return UV_ENOMEM;
  n = ml_tls_take(s->tls, w->data, n);
  uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
  int r = uv_try_write((uv_stream_t *)&s->io, &b, 1);
  if (r == (int)n || (r < 0 && r != UV_EAGAIN)) {
    free(w);
    return r < 0 ? r : 0;
  }
  if (r < 0) r = 0;
  b = uv_buf_init(w->data + r, (unsigned)(n - (size_t)r));
  w->req.data = w;
  w->s = s;
  w->notify = notify;
  r = uv_write(&w->req, (uv_stream_t *)&s->io, &b, 1, on_tls_write);
  if (r < 0) {
    free(w);
    return r;
  }
  return 1;
}

/* Handshake messages, alerts and session tickets: sent without anybody waiting for them. */
static void tls_flush(sock_t *s) {
  if (s->tls) tls_send_pending(s, W_QUIET);
}

/* Collects the data argument (a string, or an array of strings and numbers) as buffers. For an
 * array, pushes a table that pins the strings; returns the buffer count, 0 for nothing to send. */
static int collect_bufs(lua_State *L, uv_buf_t **bufs, uv_buf_t *one, size_t *total) {
  *total = 0;
  if (lua_type(L, 2) == LUA_TSTRING || lua_type(L, 2) == LUA_TNUMBER) {
    size_t len;
    const char *p = lua_tolstring(L, 2, &len);
    *one = uv_buf_init((char *)p, (unsigned)len);
    *bufs = one;
    *total = len;
    lua_pushvalue(L, 2);
    return len ? 1 : 0;
  }
  if (lua_type(L, 2) != LUA_TTABLE)
    return luaL_argerror(L, 2, "expected a string or an array of strings");
  int n = (int)lua_objlen(L, 2);
  lua_createtable(L, n, 0);
  uv_buf_t *bs = lua_newuserdata(L, sizeof *bs * (size_t)(n ? n : 1)); /* freed by the GC */
  lua_rawseti(L, -2, n + 1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    int ty = lua_type(L, -1);
    if (ty != LUA_TSTRING && ty != LUA_TNUMBER)
      return luaL_argerror(L, 2, "expected an array of strings");
    size_t len;
    const char *p = lua_tolstring(L, -1, &len);
    bs[i - 1] = uv_buf_init((char *)p, (unsigned)len);
    *total += len;
    lua_rawseti(L, -2, i);
  }
  *bufs = bs;
  return *total ? n : 0;
}

/* syntax: ok, err = sock:send(data) -- data: a string or an array of strings; true once the
 * socket took every byte (it may still be in the kernel's buffer) */
static int s_send(lua_State *L) {
  sock_t *s = check_sock(L);
  uv_buf_t one, *bufs = NULL;
  size_t total;
  int nb = collect_bufs(L, &bufs, &one, &total); /* pushes the pin */
  if (!s) return push_err(L, UV_EPIPE);
  if (s->wwait || s->rwait == W_HANDSHAKE) {
    lua_pushnil(L);
    lua_pushliteral(L, "socket busy");
    return 2;
  }
  if (s->err && s->err != UV_EOF) return push_sock_error(L, s, s->err);
  if (nb == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  mlua_task_t *t = mlua_task_current(L);
  if (t) mlua_check_yieldable(L, t); /* raises before a byte goes out */
  if (s->tls) {
    for (int i = 0; i < nb; i++) {
      int r = ml_tls_write(s->tls, bufs[i].base, bufs[i].len);
      if (r < 0) {
        s->err = r;
        return push_sock_error(L, s, r);
      }
    }
    int r = tls_send_pending(s, t ? W_NOTIFY : W_QUIET);
    if (r < 0) return push_err(L, r);
    if (r == 0 || !t) { /* sent, or queued for a caller that cannot wait */
      lua_pushboolean(L, 1);
      return 1;
    }
    s->wtask = t;
    s->wwait = W_WRITE;
    start_write_timer(s, s->send_ms);
    return mlua_task_wait(L, t, sock_cancel, s);
  }
  int w = uv_try_write((uv_stream_t *)&s->io, bufs, (unsigned)nb);
  if (w == (int)total) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (w < 0 && w != UV_EAGAIN) return push_err(L, w);
  if (w < 0) w = 0;
  size_t skip = (size_t)w; /* drop the buffers (and the part) try_write took */
  int first = 0;
  while (skip >= bufs[first].len)
    skip -= bufs[first++].len;
  bufs[first].base += skip;
  bufs[first].len -= skip;
  if (!t) { /* the caller cannot wait: the rest goes out behind it, whole and in order */
    queued_write_t *q = malloc(sizeof *q);
    if (!q) return luaL_error(L, "moonlet: out of memory");
    q->m = s->m;
    int r = uv_write(&q->req, (uv_stream_t *)&s->io, bufs + first, (unsigned)(nb - first),
                     on_queued_write);
    if (r < 0) {
      free(q);
      return push_err(L, r);
    }
    q->ref = luaL_ref(L, LUA_REGISTRYINDEX); /* the bytes uv_write reads */
    lua_pushboolean(L, 1);
    return 1;
  }
  int r = uv_write(&s->wreq, (uv_stream_t *)&s->io, bufs + first, (unsigned)(nb - first), on_write);
  if (r < 0) return push_err(L, r);
  s->wref = luaL_ref(L, LUA_REGISTRYINDEX); /* the bytes uv_write reads */
  s->wtask = t;
  s->wwait = W_WRITE;
  start_write_timer(s, s->send_ms);
  return mlua_task_wait(L, t, sock_cancel, s);
}

/* -- Receive ----------------------------------------------------------------------------------- */

static void *find(const char *hay, size_t hlen, const char *pat, size_t plen) {
  if (plen == 0 || hlen < plen) return NULL;
  for (const char *p = hay, *end = hay + hlen - plen; p <= end; p++) {
    p = memchr(p, pat[0], (size_t)(end - p) + 1);
    if (!p) return NULL;
    if (memcmp(p, pat, plen) == 0) return (void *)p;
  }
  return NULL;
}

/* Pushes the result of the pending read if it can be answered now; returns the count or 0. */
static int try_answer(lua_State *L, sock_t *s) {
  char *data = s->rb.buf + s->rb.off;
  if (mlua_readbuf_answer(L, &s->rb, s->rmode, s->rwant, s->eof)) return 1;
  if (s->rmode == R_UNTIL) {
    char *at = find(data, s->rb.len, s->pat, s->patlen);
    size_t n = at ? (size_t)(at - data) : 0;
    if (at && !s->rwant) { /* the whole part */
      lua_pushlstring(L, data, n);
      mlua_readbuf_consume(&s->rb, n + s->patlen);
      return 1;
    }
    if (at && n == 0) { /* streaming, at the pattern: consumed, and nil says the part ended */
      mlua_readbuf_consume(&s->rb, s->patlen);
      lua_pushnil(L);
      return 1;
    }
    /* streaming: at most rwant bytes that cannot be the start of the pattern (no match starts
     * before the last patlen - 1 bytes) */
    if (!at && s->rwant && s->rb.len >= s->patlen) n = s->rb.len - s->patlen + 1;
    if (n) {
      if (n > s->rwant) n = s->rwant;
      lua_pushlstring(L, data, n);
      mlua_readbuf_consume(&s->rb, n);
      return 1;
    }
  }
  if (s->eof || s->err) {
    int n = push_sock_error(L, s, s->eof ? UV_EOF : s->err);
    if (n == 3) lua_pop(L, 1);
    lua_pushlstring(L, data, s->rb.len); /* the partial data */
    mlua_readbuf_consume(&s->rb, s->rb.len);
    return 3;
  }
  return 0;
}

/* try_answer for mlua_push_protected: the read callback pushes outside any Lua frame, where a
 * string too large for memory must become nil, "not enough memory" (the data stays buffered). */
static int push_answer(lua_State *L, void *ud) { return try_answer(L, ud); }

/* Room for at least `room` more bytes after the buffered data. Returns 0 or UV_ENOMEM. */
static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  sock_t *s = h->data;
  (void)suggested;
  if (s->tls) {
    *buf = uv_buf_init(s->cbuf, CBUF_SIZE);
    return;
  }
  size_t want = 65536;
  if (s->rmode == R_BYTES && s->rwant > s->rb.len && s->rwant - s->rb.len > want)
    want = s->rwant - s->rb.len; /* a large read: one buffer for all of it */
  if (mlua_readbuf_reserve(&s->rb, want < 16384 ? 16384 : want) < 0 &&
      mlua_readbuf_reserve(&s->rb, 4096) < 0) {
    *buf = uv_buf_init(NULL, 0); /* on_read gets UV_ENOBUFS */
    return;
  }
  *buf =
      uv_buf_init(s->rb.buf + s->rb.off + s->rb.len, (unsigned)(s->rb.cap - s->rb.off - s->rb.len));
}

/* TLS: runs the handshake or decrypts what was fed, then sends what OpenSSL has to say. */
static void tls_pump(sock_t *s) {
  if (!s->tls_up) {
    int r = ml_tls_handshake(s->tls);
    if (r < 0) s->err = r;
    if (r == 1) s->tls_up = 1;
  }
  while (s->tls_up && !s->err && !s->eof) {
    if (mlua_readbuf_reserve(&s->rb, 16384) < 0) {
      s->err = UV_ENOMEM;
      break;
    }
    int n =
        ml_tls_read(s->tls, s->rb.buf + s->rb.off + s->rb.len, s->rb.cap - s->rb.off - s->rb.len);
    if (n > 0)
      s->rb.len += (size_t)n;
    else if (n == UV_EOF)
      s->eof = s->tls_notified = 1;
    else if (n < 0)
      s->err = n;
    else
      break;
  }
  tls_flush(s);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  sock_t *s = st->data;
  if (n == 0) return;
  if (n > 0 && s->tls) {
    if (ml_tls_feed(s->tls, buf->base, (size_t)n) < 0)
      s->err = UV_ENOMEM;
    else
      tls_pump(s);
  } else if (n > 0) {
    s->rb.len += (size_t)n;
  } else if (n == UV_EOF) {
    s->eof = 1;
  } else {
    s->err = (int)n;
  }
  if (s->rwait == W_HANDSHAKE) {
    if (s->tls_up) {
      mlua_task_t *t = take_reader(s);
      lua_pushboolean(t->co, 1);
      mlua_task_resume(t, 1);
    } else if (s->err || s->eof) {
      mlua_task_t *t = take_reader(s);
      int nres = s->err ? sock_fail(s, t, s->err) /* the peer closed during the handshake: */
                        : mlua_push_fail(s->m, t->co, "tls: handshake failed", "closed");
      sock_close(s);
      mlua_task_resume(t, nres);
    }
    return;
  }
  if (s->rwait != W_READ) {
    if (s->rwait == W_NONE && (s->rb.len >= READ_AHEAD_MAX || s->err || s->eof)) stop_reading(s);
    return;
  }
  /* a short answer is pushed directly (a pcall per read) but under a host's allocator, whose
   * budget may run out */
  int nres = s->rb.len < 65536 && !s->m->cfg.alloc
                 ? try_answer(s->rtask->co, s)
                 : mlua_push_protected(s->m, s->rtask->co, push_answer, s);
  if (nres == 0) return;
  mlua_task_t *t = take_reader(s);
  mlua_task_resume(t, nres);
}

static int start_read_wait(lua_State *L, sock_t *s, int wait) {
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (!s->reading) {
    int r = uv_read_start((uv_stream_t *)&s->io, alloc_cb, on_read);
    if (r < 0) return push_err(L, r);
    s->reading = 1;
  }
  uv_ref((uv_handle_t *)&s->io); /* a waiting reader keeps the loop running */
  s->rtask = t;
  s->rwait = wait;
  arm_read_timer(s, s->read_ms);
  return mlua_task_wait(L, t, sock_cancel, s);
}

static int busy(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "socket busy");
  return 2;
}

/* syntax: data, err, partial = sock:receive(n | "*l" | "*a")
 * n bytes; a line without its CR LF (the default); everything until the peer closes. On failure:
 * nil, "closed" | "timeout" | ..., and the partial data received. */
static int s_receive(lua_State *L) {
  sock_t *s = check_sock(L);
  int mode;
  size_t want = 0;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    lua_Number v = lua_tonumber(L, 2);
    if (!(v >= 0) || v > MAX_RECEIVE) return luaL_argerror(L, 2, "size out of range");
    mode = R_BYTES;
    want = (size_t)v;
  } else {
    const char *p = luaL_optstring(L, 2, "*l");
    if (strcmp(p, "*l") == 0 || strcmp(p, "l") == 0)
      mode = R_LINE;
    else if (strcmp(p, "*a") == 0 || strcmp(p, "a") == 0)
      mode = R_ALL;
    else
      return luaL_argerror(L, 2, "expected a byte count, \"*l\" or \"*a\"");
  }
  if (!s) return push_err(L, UV_EPIPE);
  if (s->rwait) return busy(L);
  if (mode == R_BYTES && want == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  s->rmode = mode;
  s->rwant = want;
  int n = try_answer(L, s);
  if (n) return n;
  return start_read_wait(L, s, W_READ);
}

/* syntax: data, err = sock:receive_any(max) -- whatever is there (waits for something), at most
 * max bytes */
static int s_receive_any(lua_State *L) {
  sock_t *s = check_sock(L);
  lua_Number max = luaL_checknumber(L, 2);
  if (!(max >= 1) || max > MAX_RECEIVE) return luaL_argerror(L, 2, "expected a positive size");
  if (!s) return push_err(L, UV_EPIPE);
  if (s->rwait) return busy(L);
  s->rmode = R_ANY;
  s->rwant = (size_t)max;
  int n = try_answer(L, s);
  if (n) return n;
  return start_read_wait(L, s, W_READ);
}

/* syntax: data, err, partial = core.tcp_receive_until(sock, pattern, size) -- the data before the
 * next occurrence of pattern, which is consumed (receiveuntil's reader in lua/moonlet/tcp.lua).
 * With a size (streaming, OpenResty's reader(size)): at most size bytes of that data, and a lone
 * nil once the pattern is reached (it is consumed then). */
static int s_receive_until(lua_State *L) {
  sock_t *s = check_sock(L);
  size_t plen;
  const char *pat = luaL_checklstring(L, 2, &plen);
  if (plen == 0) return luaL_argerror(L, 2, "empty pattern");
  lua_Integer size = luaL_optinteger(L, 3, 0);
  if (size < 0) return luaL_argerror(L, 3, "size must be positive");
  if (!s) return push_err(L, UV_EPIPE);
  if (s->rwait) return busy(L);
  if (s->patlen != plen || memcmp(s->pat, pat, plen) != 0) {
    char *p = realloc(s->pat, plen);
    if (!p) return luaL_error(L, "moonlet: out of memory");
    memcpy(p, pat, plen);
    s->pat = p;
    s->patlen = plen;
  }
  s->rmode = R_UNTIL;
  s->rwant = (size_t)size;
  int n = try_answer(L, s);
  if (n) return n;
  return start_read_wait(L, s, W_READ);
}

/* -- TLS ----------------------------------------------------------------------------------------
 */

static ml_tls_ctx_t *check_ctx(lua_State *L, int idx) {
  ml_tls_ctx_t **box = luaL_checkudata(L, idx, TLS_CTX_MT);
  return *box;
}

/* syntax: ctx, err = core.tls_context(server, verify, cafile, cert, key, alpn, client_ca)
 * verify: a boolean, or "optional" (a server: a client certificate is asked for, not required) */
static int l_tls_context(lua_State *L) {
  ml_tls_ctx_opts_t o;
  o.server = lua_toboolean(L, 1);
  o.verify = lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "optional") == 0
                 ? ML_TLS_VERIFY_OPTIONAL
                 : lua_toboolean(L, 2);
  o.client_ca = luaL_optstring(L, 7, NULL);
  o.cafile = luaL_optstring(L, 3, NULL);
  o.cert = luaL_optstring(L, 4, NULL);
  o.key = luaL_optstring(L, 5, NULL);
  o.alpn = luaL_optstring(L, 6, NULL);
  ml_tls_ctx_t **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  luaL_getmetatable(L, TLS_CTX_MT);
  lua_setmetatable(L, -2);
  const char *err;
  if (ml_tls_ctx_new(box, &o, &err) < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}

static int ctx_gc(lua_State *L) {
  ml_tls_ctx_t **box = luaL_checkudata(L, 1, TLS_CTX_MT);
  ml_tls_ctx_free(*box);
  *box = NULL;
  return 0;
}

/* syntax: ok, err, detail = core.tcp_tls(sock, ctx, server_name)
 * Runs the TLS handshake (client or server side, after the context) on the connected socket;
 * from then on send and receive carry plaintext. Bytes received before and not yet read are taken
 * as the start of the handshake. On failure the socket is closed. */
static int s_tls(lua_State *L) {
  sock_t *s = check_sock(L);
  ml_tls_ctx_t *ctx = check_ctx(L, 2);
  const char *name = luaL_optstring(L, 3, NULL);
  if (!s) return push_err(L, UV_EPIPE);
  if (s->tls) return luaL_error(L, "moonlet: the socket speaks TLS already");
  if (s->rwait || s->wwait) return busy(L);
  if (!ctx) return luaL_argerror(L, 2, "freed TLS context");
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  s->cbuf = malloc(CBUF_SIZE);
  if (!s->cbuf) return luaL_error(L, "moonlet: out of memory");
  int r = ml_tls_new(&s->tls, ctx, name);
  if (r < 0) {
    free(s->cbuf);
    s->cbuf = NULL;
    if (r == UV_EINVAL) return luaL_argerror(L, 3, "invalid server name");
    return luaL_error(L, "moonlet: out of memory");
  }
  if (s->rb.len > 0) { /* early ciphertext read as plaintext */
    r = ml_tls_feed(s->tls, s->rb.buf + s->rb.off, s->rb.len);
    mlua_readbuf_consume(&s->rb, s->rb.len);
    if (r < 0) s->err = r;
  }
  if (s->eof && !s->err) {
    sock_close(s);
    lua_pushnil(L);
    lua_pushliteral(L, "tls: handshake failed");
    lua_pushliteral(L, "closed");
    return 3;
  }
  if (!s->err) tls_pump(s);
  if (s->err) {
    int n = push_sock_error(L, s, s->err);
    sock_close(s);
    return n;
  }
  if (s->tls_up) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return start_read_wait(L, s, W_HANDSHAKE);
}

/* Pushes the table of the peer's certificate (core/tls.h): { client_verified = boolean,
 * client_subject =, client_issuer = (RFC 2253 lines), client_cert = PEM } (no strings when it
 * sent none). Made on each call: a connection keeps nothing for it. Raises when memory runs out. */
int mlua_push_tls_peer(lua_State *L, const struct ml_tls_s *t) {
  static const struct {
    const char *field;
    int what;
  } texts[] = {{"client_subject", ML_TLS_PEER_SUBJECT},
               {"client_issuer", ML_TLS_PEER_ISSUER},
               {"client_cert", ML_TLS_PEER_PEM}};
  lua_createtable(L, 0, 4);
  lua_pushboolean(L, ml_tls_peer_verified(t));
  lua_setfield(L, -2, "client_verified");
  for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
    char *text;
    int n = ml_tls_peer_text(t, texts[i].what, &text);
    if (n < 0) return luaL_error(L, "moonlet: out of memory");
    if (!text) break; /* no certificate */
    lua_pushlstring(L, text, (size_t)n);
    free(text);
    lua_setfield(L, -2, texts[i].field);
  }
  return 1;
}

/* syntax: t, err = sock:peer_certificate() -- the peer's certificate (mlua_push_tls_peer) once
 * the handshake is done; nil, "closed" | "no tls" */
static int s_peer_certificate(lua_State *L) {
  sock_t *s = check_sock(L);
  if (!s) return push_err(L, UV_EPIPE);
  if (!s->tls || !s->tls_up) {
    lua_pushnil(L);
    lua_pushliteral(L, "no tls");
    return 2;
  }
  return mlua_push_tls_peer(L, s->tls);
}

/* -- Settings and names ------------------------------------------------------------------------ */

/* syntax: sock:settimeout(seconds) -- for every later wait; nil: none */
static int s_settimeout(lua_State *L) {
  sock_t *s = check_sock(L);
  int64_t ms = to_ms(L, 2);
  if (s) s->connect_ms = s->send_ms = s->read_ms = ms;
  return 0;
}

/* syntax: sock:settimeouts(connect, send, read) -- seconds each; nil: none */
static int s_settimeouts(lua_State *L) {
  sock_t *s = check_sock(L);
  int64_t c = to_ms(L, 2), w = to_ms(L, 3), r = to_ms(L, 4);
  if (s) {
    s->connect_ms = c;
    s->send_ms = w;
    s->read_ms = r;
  }
  return 0;
}

/* syntax: host, port = sock:getpeername() / sock:getsockname() */
static int sock_name(lua_State *L, int peer) {
  sock_t *s = check_sock(L);
  if (!s) return push_err(L, UV_EPIPE);
  if (s->is_unix) { /* the path: the one connected to, or the one this end is bound to ("") */
    char path[256] = "";
    size_t n = sizeof path;
    int r = peer ? uv_pipe_getpeername(&s->io.pipe, path, &n)
                 : uv_pipe_getsockname(&s->io.pipe, path, &n);
    if (r < 0) return push_err(L, r);
    lua_pushliteral(L, "unix:");
    lua_pushlstring(L, path, strnlen(path, n < sizeof path ? n : sizeof path)); /* "": unnamed */
    lua_concat(L, 2);
    return 1;
  }
  struct sockaddr_storage ss;
  int len = sizeof ss;
  int r = peer ? uv_tcp_getpeername(&s->io.tcp, (struct sockaddr *)&ss, &len)
               : uv_tcp_getsockname(&s->io.tcp, (struct sockaddr *)&ss, &len);
  if (r < 0) return push_err(L, r);
  return mlua_push_sockaddr(L, (const struct sockaddr *)&ss);
}

static int s_getpeername(lua_State *L) { return sock_name(L, 1); }
static int s_getsockname(lua_State *L) { return sock_name(L, 0); }

/* syntax: ok = sock:close() -- waiters wake with nil, "closed"; closing twice is harmless */
static int s_close(lua_State *L) {
  sock_t *s = check_sock(L);
  if (!s) return push_err(L, UV_EPIPE);
  sock_close(s);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: ok = sock:reusable() -- true when the socket could go to a keep-alive pool: open, no
 * waiter, no error, nothing received and unread (buffered here or in the kernel: a non-blocking
 * MSG_PEEK also tells whether the peer closed). moonlet.ngx's setkeepalive and connect use it. */
/* Open, no waiter, no error or EOF seen, nothing buffered unread. */
static int idle_clean(const sock_t *s) {
  return s && !s->rwait && !s->wwait && !s->eof && !s->err && s->rb.len == 0 &&
         (!s->tls || s->tls_up);
}

static int s_reusable(lua_State *L) {
  sock_t *s = check_sock(L);
  int ok = idle_clean(s);
  if (ok) {
    uv_os_fd_t fd;
    char c;
    ok = uv_fileno((uv_handle_t *)&s->io, &fd) == 0 &&
         recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* syntax: ok = sock:poolable() -- sock:reusable() without the MSG_PEEK: what the loop has seen
 * (a socket reads ahead while idle, so a peer's close or stray bytes that came in an earlier loop
 * iteration are known). moonlet.http checks it when it takes a connection from its pool. */
static int s_poolable(lua_State *L) {
  lua_pushboolean(L, idle_clean(check_sock(L)));
  return 1;
}

/* syntax: ok = sock:closed_cleanly() -- the peer ended its side with a FIN (EOF) and no error was
 * seen: what tells a body delimited by the close from one cut by a reset (both read as "closed").
 * Over TLS, only its close_notify does: a FIN without it may be an attacker's (a truncation). */
static int s_closed_cleanly(lua_State *L) {
  sock_t *s = check_sock(L);
  lua_pushboolean(L, s && s->eof && !s->err && (!s->tls || s->tls_notified));
  return 1;
}

static int s_tostring(lua_State *L) {
  sock_t *s = check_sock(L);
  lua_pushfstring(L, "moonlet.tcp (%s)", s ? (s->tls ? "tls" : "open") : "closed");
  return 1;
}

static int s_gc(lua_State *L) {
  sock_t **box = luaL_checkudata(L, 1, SOCK_MT);
  if (*box) sock_close(*box);
  return 0;
}

/* -- Listen ------------------------------------------------------------------------------------ */

static void server_closed(uv_handle_t *h) {
  server_t *srv = h->data;
  free(srv->path);
  free(srv);
}

static void server_close(server_t *srv) {
  if (srv->closed) return;
  srv->closed = 1;
  if (srv->box) *srv->box = NULL;
  srv->box = NULL;
  luaL_unref(srv->m->L, LUA_REGISTRYINDEX, srv->fn_ref);
  srv->fn_ref = LUA_NOREF;
  ml_listen_unix_unlink(srv->path, &srv->id); /* if it is still the file this server made */
  uv_close((uv_handle_t *)&srv->io, server_closed);
}

static void server_res_close(mlua_res_t *r) {
  server_t *srv = (server_t *)r;
  server_close(srv); /* moonlet_free unlinked it */
}

typedef struct {
  server_t *srv;
  sock_t *s;
} accepted_t;

/* mlua_task_push's push for an accepted connection: the server's function and the socket's box. */
static int push_accepted(lua_State *co, void *ud) {
  accepted_t *a = ud;
  lua_rawgeti(co, LUA_REGISTRYINDEX, a->srv->fn_ref);
  push_box(co, a->s);
  return 2;
}

static void on_connection(uv_stream_t *ls, int status) {
  server_t *srv = ls->data;
  moonlet_t *m = srv->m;
  if (status < 0) {
    ml_log(&m->log, ML_LOG_WARN, "tcp server: accept failed: %s", uv_strerror(status));
    return;
  }
  sock_t *s = sock_new(m, srv->timeout_ms, srv->is_unix);
  if (!s) return;
  int r = uv_accept(ls, (uv_stream_t *)&s->io);
  if (r < 0) {
    sock_close(s);
    return;
  }
  s->accepted = 1;
  if (!s->is_unix) uv_tcp_nodelay(&s->io.tcp, 1);
  accepted_t a = {srv, s};
  mlua_task_t *t = mlua_task_new(m);
  if (!t || mlua_task_push(t, push_accepted, &a) < 0) { /* out of memory: the connection closes */
    if (t) mlua_task_drop(t);
    ml_log(&m->log, ML_LOG_ERROR, "tcp server: out of memory: a connection closed");
    sock_close(s); /* (a box the push made is NULLed: its __gc finds nothing to close) */
    return;
  }
  mlua_task_start(t, 1);
}

static server_t *server_new(moonlet_t *m, int64_t timeout_ms, int is_unix) {
  server_t *srv = calloc(1, sizeof *srv);
  if (!srv) return NULL;
  srv->m = m;
  srv->timeout_ms = timeout_ms;
  srv->fn_ref = LUA_NOREF;
  srv->is_unix = is_unix;
  ml_stream_init(m->loop, &srv->io, is_unix);
  srv->io.tcp.data = srv;
  return srv;
}

/* The listen of srv returned r: on success the server is linked to the instance, runs the function
 * at stack index fn per connection, and its box is returned; on failure it is closed. */
static int server_start(lua_State *L, server_t *srv, int r, int fn) {
  moonlet_t *m = srv->m;
  if (r < 0) {
    srv->closed = 1;
    uv_close((uv_handle_t *)&srv->io, server_closed);
    return push_err(L, r);
  }
  lua_pushvalue(L, fn);
  srv->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  mlua_res_link(m, &srv->res, server_res_close);
  mlua_worker_listening(m);
  server_t **box = lua_newuserdata(L, sizeof *box);
  *box = srv;
  srv->box = box;
  luaL_getmetatable(L, SERVER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* syntax: server, err = core.tcp_listen(ip, port, backlog, fn, timeout)
 * Listens on ip:port (port 0: a free one); each connection runs fn(sock) in a new task, the
 * socket's timeouts set to `timeout` seconds (nil: none). */
static int l_listen(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  int backlog = (int)luaL_optinteger(L, 3, 511);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  int64_t ms = to_ms(L, 5);
  if (port < 0 || port > 65535) return luaL_argerror(L, 2, "port out of range");
  struct sockaddr_storage addr;
  int r = strchr(host, ':') ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr)
                            : uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
  if (r < 0) return push_err(L, r);
  server_t *srv = server_new(m, ms, 0);
  if (!srv) return luaL_error(L, "moonlet: out of memory");
  r = ml_listen_tcp(&srv->io.tcp, (struct sockaddr *)&addr, m->worker.count > 1, backlog,
                    on_connection);
  return server_start(L, srv, r, 4);
}

/* syntax: server, err = core.unix_listen(path, backlog, fn, timeout, mode) -- core.tcp_listen on a
 * Unix domain socket, its permissions mode (nil: the umask's); a stale socket file at path is
 * replaced, and the file is removed at close */
static int l_listen_unix(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  int backlog = (int)luaL_optinteger(L, 2, 511);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  int64_t ms = to_ms(L, 4);
  lua_Integer mode = luaL_optinteger(L, 5, -1);
  if (mode > 07777) return luaL_argerror(L, 5, "not a permission mode");
  if (len == 0 || strlen(path) != len) return luaL_argerror(L, 1, "not a socket path");
  if (m->worker.count > 1) /* each worker would replace the others' socket file */
    return luaL_error(L, "moonlet: moonlet.tcp.listen on a Unix socket is not for --workers");
  server_t *srv = server_new(m, ms, 1);
  if (!srv) return luaL_error(L, "moonlet: out of memory");
  int r = (srv->path = strdup(path))
              ? ml_listen_unix(&srv->io.pipe, path, backlog, (int)mode, on_connection, &srv->id)
              : UV_ENOMEM;
  return server_start(L, srv, r, 3);
}

static server_t *check_server(lua_State *L) {
  server_t **box = luaL_checkudata(L, 1, SERVER_MT);
  return *box;
}

/* syntax: port = server:port() */
static int srv_port(lua_State *L) {
  server_t *srv = check_server(L);
  if (!srv) return push_err(L, UV_EPIPE);
  if (srv->is_unix) {
    lua_pushfstring(L, "unix:%s", srv->path);
    return 1;
  }
  struct sockaddr_storage ss;
  int len = sizeof ss;
  int r = uv_tcp_getsockname(&srv->io.tcp, (struct sockaddr *)&ss, &len);
  if (r < 0) return push_err(L, r);
  mlua_push_sockaddr(L, (const struct sockaddr *)&ss);
  lua_remove(L, -2);
  return 1;
}

/* tostring(server): "moonlet.tcp.server (port 7000)", "(unix:/path)", or "(closed)" */
static int srv_tostring(lua_State *L) {
  server_t *srv = check_server(L);
  if (!srv) {
    lua_pushliteral(L, "moonlet.tcp.server (closed)");
    return 1;
  }
  if (srv_port(L) != 1) {
    lua_pushliteral(L, "moonlet.tcp.server");
    return 1;
  }
  lua_pushfstring(L, srv->is_unix ? "moonlet.tcp.server (%s)" : "moonlet.tcp.server (port %s)",
                  lua_tostring(L, -1));
  return 1;
}

/* The server's box is collected: the server goes on listening (it is the instance's until
 * server:close() or moonlet_free), but must no longer write through a pointer to the freed box. */
static int srv_gc(lua_State *L) {
  server_t **box = luaL_checkudata(L, 1, SERVER_MT);
  if (*box) (*box)->box = NULL;
  *box = NULL;
  return 0;
}

/* syntax: server:close() -- stops accepting; connections being served go on */
static int srv_close(lua_State *L) {
  server_t *srv = check_server(L);
  if (srv) {
    mlua_res_unlink(srv->m, &srv->res);
    server_close(srv);
  }
  lua_pushboolean(L, 1);
  return 1;
}

void mlua_open_tcp(lua_State *L, moonlet_t *m) {
  static const luaL_Reg sm[] = {{"send", s_send},
                                {"receive", s_receive},
                                {"receive_any", s_receive_any},
                                {"receive_until", s_receive_until},
                                {"tls", s_tls},
                                {"peer_certificate", s_peer_certificate},
                                {"settimeout", s_settimeout},
                                {"settimeouts", s_settimeouts},
                                {"getpeername", s_getpeername},
                                {"getsockname", s_getsockname},
                                {"close", s_close},
                                {"reusable", s_reusable},
                                {"poolable", s_poolable},
                                {"closed_cleanly", s_closed_cleanly},
                                {NULL, NULL}};
  static const luaL_Reg srvm[] = {{"port", srv_port}, {"close", srv_close}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"tcp_connect", l_connect},
                                 {"tcp_listen", l_listen},
                                 {"unix_connect", l_connect_unix},
                                 {"unix_listen", l_listen_unix},
                                 {"tls_context", l_tls_context},
                                 {"tcp_move", l_move},
                                 {NULL, NULL}};
  luaL_newmetatable(L, SOCK_MT);
  lua_pushliteral(L, SOCK_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register_methods(L, m, sm, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, -4, "tcp_raw"); /* core.tcp_raw: the C methods, which tcp.lua wraps */
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, s_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, s_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_setfield(L, -2, "tcp_mt"); /* core.tcp_mt: tcp.lua sets its __index to the wrapped methods */

  luaL_newmetatable(L, SERVER_MT);
  lua_pushliteral(L, SERVER_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, srvm);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, srv_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, srv_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);

  luaL_newmetatable(L, TLS_CTX_MT);
  lua_pushliteral(L, TLS_CTX_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, ctx_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
