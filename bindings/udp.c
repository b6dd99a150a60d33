/* bindings/udp.c: UDP sockets: core.udp_bind(ip, port) and the methods sendto, recvfrom (yields
 * until a datagram, the timeout or close), setpeername (connects: send and receive then talk to
 * that peer only), settimeout, getsockname, close. lua/moonlet/udp.lua wraps them as moonlet.udp.
 *
 * Datagram Unix domain sockets too: core.udp_bind("unix:/path") (the file's rules are the stream
 * listeners', core/listen.c: a stale file replaced, a live one refused, removed at close only if it
 * is still ours), core.udp_bind("unix:") bound to a free abstract name (Linux's autobind) so that
 * a server can answer it. Their addresses are "unix:/path", or "unix:@name" for an abstract one
 * (the form ss and systemd print), "unix:" for a sender with no name. libuv 1.44 receives on them
 * (uv_udp_open), but sends only to a path's full-size address and connects only IP: a Unix
 * socket's datagrams go out with sendto/send on its fd here, at once or not at all (a full
 * receiver: nil, "resource temporarily unavailable", as OpenResty's send fails there).
 *
 * Ownership: the socket (udp_t) is C memory linked in the instance's resources; the Lua userdata
 * holds a pointer NULLed when it closes (methods then return nil, "closed"). It is freed from the
 * close callback of its last handle (udp + timer), after the callbacks of its sends in flight.
 * Sends never wait: what the kernel does not take at once goes out through a malloc'd request
 * freed by its callback. One receiver at a time ("socket busy"): it records the task, starts
 * receiving and the timer; the first datagram, the timer, close() or a cancel takes the waiter,
 * stops the other source and resumes it (a cancel resumes nobody). Datagrams are read only while
 * someone waits; the others wait in the kernel's buffer.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../core/listen.h"
#include "mlua.h"

/* nil, short message: the code name (mlua_push_error's third value) stays out of the way of
 * `assert.same({ nil, "timeout" }, { sock:receive(1) })`. Returns 2. */
static int push_err(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, mlua_err_string(e));
  return 2;
}

#define UDP_MT "moonlet.udp"

typedef struct udp_s {
  mlua_res_t res;
  uv_udp_t udp;
  uv_timer_t timer;
  moonlet_t *m;
  struct udp_s **box; /* the Lua box, NULLed at close */
  mlua_task_t *task;  /* the parked receiver, or NULL */
  int receiving, closed, handles, connected;
  int is_unix;        /* a datagram Unix domain socket (AF_UNIX) */
  char *path;         /* the socket file it made (owned), removed at close if still ours, or NULL */
  ml_unix_id_t id;    /* ... and which file it is */
  int64_t timeout_ms; /* recvfrom's default: < 0 none */
  char rbuf[65536];   /* one datagram */
} udp_t;

/* push_err's nil, message on a waiter from a callback (mlua_push_fail: protected under a host's
 * allocator). Returns 2. */
static int fail(udp_t *u, mlua_task_t *t, int e) {
  return mlua_push_fail(u->m, t->co, mlua_err_string(e), NULL);
}

typedef struct {
  uv_udp_send_t req;
  char data[];
} sendbuf_t;

static void udp_closed(uv_handle_t *h) {
  udp_t *u = h->data;
  if (--u->handles == 0) {
    free(u->path);
    free(u);
  }
}

static mlua_task_t *take_waiter(udp_t *u) {
  mlua_task_t *t = u->task;
  u->task = NULL;
  uv_timer_stop(&u->timer);
  if (u->receiving) {
    uv_udp_recv_stop(&u->udp);
    u->receiving = 0;
  }
  return t;
}

static void udp_close(udp_t *u) {
  if (u->closed) return;
  u->closed = 1;
  if (u->box) *u->box = NULL;
  u->box = NULL;
  mlua_res_unlink(u->m, &u->res);
  mlua_task_t *t = take_waiter(u);
  if (u->path) ml_listen_unix_unlink(u->path, &u->id);
  uv_close((uv_handle_t *)&u->udp, udp_closed);
  uv_close((uv_handle_t *)&u->timer, udp_closed);
  if (t) mlua_task_resume(t, fail(u, t, UV_EPIPE));
}

static void udp_res_close(mlua_res_t *r) {
  udp_t *u = (udp_t *)r;
  u->task = NULL; /* the instance is going away: nobody is resumed */
  udp_close(u);
}

static void udp_cancel(mlua_task_t *t, void *wait) {
  (void)t;
  take_waiter(wait);
}

static udp_t *check_udp(lua_State *L) {
  udp_t **box = luaL_checkudata(L, 1, UDP_MT);
  return *box;
}

/* "unix:/path" or "unix:@name" (abstract) as an address of *len bytes: 0 or a negative error */
static int parse_unix(const char *name, struct sockaddr_storage *addr, socklen_t *len) {
  struct sockaddr_un *sa = (struct sockaddr_un *)addr;
  size_t n = strlen(name);
  if (n == 0) return UV_EINVAL; /* "unix:": an unnamed socket cannot be sent to */
  if (n >= sizeof sa->sun_path) return UV_ENAMETOOLONG;
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  memcpy(sa->sun_path, name, n);
  if (name[0] == '@') sa->sun_path[0] = 0; /* an abstract name is its bytes, no NUL after */
  *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (name[0] == '@' ? 0 : 1));
  return 0;
}

/* An IP literal (or "localhost") and port, or a "unix:" address; *len its size */
static int parse_addr(const char *host, int port, struct sockaddr_storage *addr, socklen_t *len) {
  if (strncmp(host, "unix:", 5) == 0) return parse_unix(host + 5, addr, len);
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  if (port < 0 || port > 65535) return UV_EINVAL;
  int six = strchr(host, ':') != NULL;
  *len = six ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  return six ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)addr)
             : uv_ip4_addr(host, port, (struct sockaddr_in *)addr);
}

/* Pushes a Unix socket's address as a string: "unix:/path", "unix:@name", "unix:". Returns 1. */
static int push_unix_addr(lua_State *L, const struct sockaddr *addr) {
  const struct sockaddr_un *sa = (const struct sockaddr_un *)addr;
  lua_pushliteral(L, "unix:");
  if (addr && addr->sa_family == AF_UNIX) { /* (libuv zeroes the name an unnamed sender lacks) */
    const char *p = sa->sun_path;
    size_t max = sizeof sa->sun_path;
    if (p[0] == 0 && p[1] != 0) { /* abstract: "@" and its bytes up to a NUL */
      lua_pushliteral(L, "@");
      lua_pushlstring(L, p + 1, strnlen(p + 1, max - 1));
      lua_concat(L, 3);
      return 1;
    }
    lua_pushlstring(L, p, strnlen(p, max));
    lua_concat(L, 2);
  }
  return 1;
}

/* The address of a socket or of the sender of a datagram: ip, port or the "unix:" string */
static int push_addr(lua_State *L, const udp_t *u, const struct sockaddr *addr) {
  return u->is_unix ? push_unix_addr(L, addr) : mlua_push_sockaddr(L, addr);
}

/* A Unix socket's datagram, at once or not at all: 0 or a negative error (UV_EAGAIN when the
 * receiver's queue is full). addr NULL: to the connected peer. */
static int send_unix(udp_t *u, const char *data, size_t len, const struct sockaddr *addr,
                     socklen_t alen) {
  uv_os_fd_t fd;
  int r = uv_fileno((uv_handle_t *)&u->udp, &fd);
  if (r < 0) return r;
  ssize_t n;
  do {
    n = addr ? sendto(fd, data, len, MSG_NOSIGNAL, addr, alen) : send(fd, data, len, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  return n < 0 ? (errno == EWOULDBLOCK ? UV_EAGAIN : -errno) : 0;
}

/* Pushes the Lua object of u (whose pointer it holds until u closes). Returns 1. */
static int push_udp(lua_State *L, udp_t *u) {
  udp_t **box = lua_newuserdata(L, sizeof *box);
  *box = u;
  u->box = box;
  luaL_getmetatable(L, UDP_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* syntax: u, err = core.udp_bind("unix:/path" | "unix:") -- a datagram Unix domain socket */
static int bind_unix(lua_State *L, moonlet_t *m, const char *path) {
  udp_t *u = calloc(1, sizeof *u);
  if (!u) return luaL_error(L, "moonlet: out of memory");
  if (*path && !(u->path = strdup(path))) {
    free(u);
    return luaL_error(L, "moonlet: out of memory");
  }
  int fd = ml_unix_dgram_fd(*path ? path : NULL, -1, &u->id);
  if (fd < 0) {
    free(u->path);
    free(u);
    return push_err(L, fd);
  }
  u->m = m;
  u->timeout_ms = -1;
  u->is_unix = 1;
  uv_udp_init(m->loop, &u->udp);
  uv_timer_init(m->loop, &u->timer);
  u->udp.data = u->timer.data = u;
  u->handles = 2;
  mlua_res_link(m, &u->res, udp_res_close);
  int r = uv_udp_open(&u->udp, fd); /* which owns fd from here on */
  if (r < 0) {
    close(fd);
    udp_close(u);
    return push_err(L, r);
  }
  return push_udp(L, u);
}

/* syntax: u, err = core.udp_bind(ip, port), or core.udp_bind("unix:/path" | "unix:") */
static int l_bind(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *host = luaL_checkstring(L, 1);
  if (strncmp(host, "unix:", 5) == 0) return bind_unix(L, m, host + 5);
  int port = (int)luaL_checkinteger(L, 2);
  struct sockaddr_storage addr;
  socklen_t alen;
  int r = parse_addr(host, port, &addr, &alen);
  if (r < 0) return push_err(L, r);
  udp_t *u = calloc(1, sizeof *u);
  if (!u) return luaL_error(L, "moonlet: out of memory");
  u->m = m;
  u->timeout_ms = -1;
  /* under --workers, a port shared by every worker (SO_REUSEPORT: the kernel spreads the
   * datagrams by their source), as the TCP listeners' (core/listen.c) */
  int shared = m->worker.count > 1 && port != 0;
  r = shared ? uv_udp_init_ex(m->loop, &u->udp, addr.ss_family) : uv_udp_init(m->loop, &u->udp);
  if (r < 0) {
    free(u);
    return push_err(L, r);
  }
  uv_timer_init(m->loop, &u->timer);
  u->udp.data = u->timer.data = u;
  u->handles = 2;
  mlua_res_link(m, &u->res, udp_res_close);
  uv_os_fd_t fd;
  r = shared ? uv_fileno((uv_handle_t *)&u->udp, &fd) : 0;
  if (r == 0 && shared) r = ml_listen_share_port(fd);
  if (r == 0) r = uv_udp_bind(&u->udp, (struct sockaddr *)&addr, 0);
  if (r < 0) {
    udp_close(u);
    return push_err(L, r);
  }
  if (port != 0) mlua_worker_listening(m); /* a server's port: under --workers, this one serves */
  return push_udp(L, u);
}

/* syntax: u2, err = core.udp_dup(u) -- a second object on the socket of u, an IP one (hot reload's
 * hand-over, lua/moonlet/udp.lua): a duplicate of its descriptor in a handle of its own. Either
 * may close first; the socket stays bound until both have. Each reads only while someone waits on
 * it (see the top), so a datagram goes to one of them, never into a buffer nobody reads. */
static int l_dup(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  udp_t *o = check_udp(L);
  if (!o) return push_err(L, UV_EPIPE);
  if (o->is_unix) return luaL_argerror(L, 1, "an IP socket");
  uv_os_fd_t fd;
  int r = uv_fileno((uv_handle_t *)&o->udp, &fd);
  if (r < 0) return push_err(L, r);
  int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (nfd < 0) return push_err(L, -errno);
  udp_t *u = calloc(1, sizeof *u);
  if (!u) {
    close(nfd);
    return luaL_error(L, "moonlet: out of memory");
  }
  u->m = m;
  u->timeout_ms = -1;
  uv_udp_init(m->loop, &u->udp);
  uv_timer_init(m->loop, &u->timer);
  u->udp.data = u->timer.data = u;
  u->handles = 2;
  mlua_res_link(m, &u->res, udp_res_close);
  /* uv_udp_open sets SO_REUSEADDR (SO_REUSEPORT on some systems) on the socket, which is the
   * one o is bound with: any process could then bind its port too and take its datagrams. The
   * options go back to what they were. */
  int was[2] = {0, 0}, opt[2] = {SO_REUSEADDR, SO_REUSEPORT};
  for (int i = 0; i < 2; i++) {
    socklen_t len = sizeof was[i];
    if (getsockopt(nfd, SOL_SOCKET, opt[i], &was[i], &len) < 0) was[i] = -1;
  }
  r = uv_udp_open(&u->udp, nfd); /* which owns nfd from here on */
  if (r < 0) {
    close(nfd);
    udp_close(u);
    return push_err(L, r);
  }
  for (int i = 0; i < 2; i++)
    if (was[i] >= 0) setsockopt(nfd, SOL_SOCKET, opt[i], &was[i], sizeof was[i]);
  return push_udp(L, u);
}

static void on_sent(uv_udp_send_t *req, int status) {
  (void)status; /* datagrams are fire and forget */
  free(req->data);
}

/* Sends one datagram to addr of alen bytes (NULL: the connected peer). 0 or a negative error. */
static int send_datagram(udp_t *u, const char *data, size_t len, const struct sockaddr *addr,
                         socklen_t alen) {
  if (u->is_unix) return send_unix(u, data, len, addr, alen);
  if (addr && addr->sa_family == AF_UNIX) return UV_EAFNOSUPPORT; /* an IP socket */
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  int r = uv_udp_try_send(&u->udp, &b, 1, addr);
  if (r >= 0) return 0;
  if (r != UV_EAGAIN && r != UV_ENOSYS) return r;
  sendbuf_t *sb = malloc(sizeof *sb + len);
  if (!sb) return UV_ENOMEM;
  memcpy(sb->data, data, len);
  sb->req.data = sb;
  b = uv_buf_init(sb->data, (unsigned)len);
  r = uv_udp_send(&sb->req, &u->udp, &b, 1, addr, on_sent);
  if (r < 0) free(sb);
  return r;
}

/* syntax: ok, err = u:sendto(data, ip, port) -- or u:sendto(data, "unix:/path") */
static int u_sendto(lua_State *L) {
  udp_t *u = check_udp(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  const char *host = luaL_checkstring(L, 3);
  int port = (int)luaL_optinteger(L, 4, 0);
  if (!u) return push_err(L, UV_EPIPE);
  struct sockaddr_storage addr;
  socklen_t alen;
  int r = parse_addr(host, port, &addr, &alen);
  if (r == 0) r = send_datagram(u, data, len, (struct sockaddr *)&addr, alen);
  if (r < 0) return push_err(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: ok, err = u:send(data) -- to the peer of setpeername */
static int u_send(lua_State *L) {
  udp_t *u = check_udp(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (!u) return push_err(L, UV_EPIPE);
  if (!u->connected) return luaL_error(L, "moonlet: udp send without setpeername (use sendto)");
  int r = send_datagram(u, data, len, NULL, 0);
  if (r < 0) return push_err(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* A Unix socket connected to addr (libuv's uv_udp_connect takes only IP): 0 or a negative error */
static int connect_unix(udp_t *u, const struct sockaddr *addr, socklen_t alen) {
  uv_os_fd_t fd;
  int r = uv_fileno((uv_handle_t *)&u->udp, &fd);
  if (r < 0) return r;
  return connect(fd, addr, alen) < 0 ? -errno : 0;
}

/* syntax: ok, err = u:setpeername(ip, port) -- or u:setpeername("unix:/path") */
static int u_setpeername(lua_State *L) {
  udp_t *u = check_udp(L);
  const char *host = luaL_checkstring(L, 2);
  int port = (int)luaL_optinteger(L, 3, 0);
  if (!u) return push_err(L, UV_EPIPE);
  struct sockaddr_storage addr;
  socklen_t alen;
  int r = parse_addr(host, port, &addr, &alen);
  if (r == 0 && (addr.ss_family == AF_UNIX) != u->is_unix) r = UV_EAFNOSUPPORT;
  if (r == 0 && u->is_unix) {
    r = connect_unix(u, (struct sockaddr *)&addr, alen);
  } else {
    if (r == 0 && u->connected) r = uv_udp_connect(&u->udp, NULL);
    if (r == 0) r = uv_udp_connect(&u->udp, (struct sockaddr *)&addr);
  }
  if (r < 0) return push_err(L, r);
  u->connected = 1;
  lua_pushboolean(L, 1);
  return 1;
}

static void on_timeout(uv_timer_t *h) {
  udp_t *u = h->data;
  mlua_task_t *t = take_waiter(u);
  if (t) mlua_task_resume(t, fail(u, t, UV_ETIMEDOUT));
}

typedef struct {
  udp_t *u;
  const char *data;
  size_t len;
  const struct sockaddr *addr;
} datagram_t;

/* A datagram and its sender, for mlua_push_result: when memory runs out the datagram is dropped
 * and the receiver gets nil, "not enough memory". */
static int push_datagram(lua_State *L, void *ud) {
  datagram_t *d = ud;
  lua_pushlstring(L, d->data, d->len);
  return 1 + push_addr(L, d->u, d->addr);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  udp_t *u = h->data;
  (void)suggested;
  *buf = uv_buf_init(u->rbuf, sizeof u->rbuf);
}

static void on_recv(uv_udp_t *h, ssize_t n, const uv_buf_t *buf, const struct sockaddr *addr,
                    unsigned flags) {
  udp_t *u = h->data;
  (void)flags;                 /* UV_UDP_PARTIAL: a datagram over 64 KiB comes truncated */
  if (n == 0 && !addr) return; /* nothing more to read now */
  mlua_task_t *t = take_waiter(u);
  if (!t) return;
  if (n < 0) {
    mlua_task_resume(t, fail(u, t, (int)n));
    return;
  }
  datagram_t d = {u, buf->base, (size_t)n, addr};
  mlua_task_resume(t, mlua_push_result(u->m, t->co, push_datagram, &d));
}

/* syntax: data, host, port = u:recvfrom(timeout) -- or nil, "timeout" | "closed"; timeout in
 * seconds, nil: the socket's (settimeout), by default none */
static int u_recvfrom(lua_State *L) {
  udp_t *u = check_udp(L);
  int64_t ms = u ? u->timeout_ms : -1;
  if (!lua_isnoneornil(L, 2)) {
    double secs = luaL_checknumber(L, 2);
    ms = secs <= 0 ? 0 : (int64_t)mlua_ms(secs);
  }
  if (!u) return push_err(L, UV_EPIPE);
  if (u->task) {
    lua_pushnil(L);
    lua_pushliteral(L, "socket busy");
    return 2;
  }
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  int r = uv_udp_recv_start(&u->udp, alloc_cb, on_recv);
  if (r < 0) return push_err(L, r);
  u->receiving = 1;
  u->task = t;
  if (ms >= 0) {
    uv_update_time(u->m->loop);
    uv_timer_start(&u->timer, on_timeout, mlua_wait_ms((uint64_t)ms), 0);
  }
  return mlua_task_wait(L, t, udp_cancel, u);
}

/* syntax: u:settimeout(seconds) -- recvfrom's default; nil: none */
static int u_settimeout(lua_State *L) {
  udp_t *u = check_udp(L);
  int64_t ms = -1;
  if (!lua_isnoneornil(L, 2)) {
    double secs = luaL_checknumber(L, 2);
    ms = secs <= 0 ? 0 : (int64_t)mlua_ms(secs);
  }
  if (u) u->timeout_ms = ms;
  return 0;
}

/* syntax: host, port = u:getsockname() */
static int u_getsockname(lua_State *L) {
  udp_t *u = check_udp(L);
  if (!u) return push_err(L, UV_EPIPE);
  struct sockaddr_storage ss;
  int len = sizeof ss;
  memset(&ss, 0, sizeof ss);
  int r = uv_udp_getsockname(&u->udp, (struct sockaddr *)&ss, &len);
  if (r < 0) return push_err(L, r);
  return push_addr(L, u, (struct sockaddr *)&ss);
}

/* syntax: ok = u:close() -- a waiting recvfrom wakes with nil, "closed" */
static int u_close(lua_State *L) {
  udp_t *u = check_udp(L);
  if (!u) return push_err(L, UV_EPIPE);
  udp_close(u);
  lua_pushboolean(L, 1);
  return 1;
}

static int u_tostring(lua_State *L) {
  udp_t *u = check_udp(L);
  lua_pushstring(L, u ? "moonlet.udp (open)" : "moonlet.udp (closed)");
  return 1;
}

static int u_gc(lua_State *L) {
  udp_t **box = luaL_checkudata(L, 1, UDP_MT);
  if (*box) udp_close(*box);
  return 0;
}

void mlua_open_udp(lua_State *L, moonlet_t *m) {
  static const luaL_Reg um[] = {{"sendto", u_sendto},
                                {"send", u_send},
                                {"setpeername", u_setpeername},
                                {"recvfrom", u_recvfrom},
                                {"settimeout", u_settimeout},
                                {"getsockname", u_getsockname},
                                {"close", u_close},
                                {NULL, NULL}};
  static const luaL_Reg fns[] = {{"udp_bind", l_bind}, {"udp_dup", l_dup}, {NULL, NULL}};
  luaL_newmetatable(L, UDP_MT);
  lua_pushliteral(L, UDP_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, um);
  lua_pushvalue(L, -1);
  lua_setfield(L, -4, "udp_raw"); /* core.udp_raw: the C methods, which udp.lua wraps */
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, u_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, u_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_setfield(L, -2, "udp_mt"); /* core.udp_mt: udp.lua sets its __index to the wrapped methods */
  mlua_register(L, m, fns);
}
