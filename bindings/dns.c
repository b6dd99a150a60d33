/* bindings/dns.c: name resolution through the loop: core.dns_resolve(name, family, timeout) runs
 * getaddrinfo on libuv's thread pool (uv_getaddrinfo) and yields the task until the answer, the
 * timeout or a cancellation. lua/moonlet/dns.lua wraps it as moonlet.dns.resolve.
 *
 * Ownership: a lookup (lookup_t) is C memory owned by itself. It holds a request (uv_getaddrinfo_t)
 * and, with a timeout, a timer; it is freed once both are over: the request's callback has run and
 * the timer's close callback has run. A lookup is a resource of the instance from its start until
 * its request's callback, so core.stats().resources counts lookups still on the thread pool.
 * Exactly one of answer, timeout, cancel and instance teardown takes the waiting task; the timeout
 * and cancel paths try uv_cancel: when the work is already running on a worker thread it cannot be
 * cancelled, and then its callback only frees the lookup and resumes nobody. Worker threads touch
 * nothing here: only the callback on the loop thread reads the result.
 */
#include <stdlib.h>
#include <string.h>

#include "mlua.h"

/* nil, short message: the code name (mlua_push_error's third value) stays out of the way of
 * `assert.same({ nil, "timeout" }, { sock:receive(1) })`. Returns 2. */
static int push_err(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, mlua_err_string(e));
  return 2;
}

typedef struct {
  mlua_res_t res;
  uv_getaddrinfo_t req;
  uv_timer_t timer;
  moonlet_t *m;
  mlua_task_t *task; /* the waiting task; NULL once answered, timed out or cancelled */
  int in_flight;     /* the request's callback has not run yet */
  int timer_open;    /* the timer was initialised and its close callback has not run */
  int linked;        /* in the instance's resources */
} lookup_t;

static void lookup_maybe_free(lookup_t *d) {
  if (!d->in_flight && !d->timer_open) free(d);
}

static void timer_closed(uv_handle_t *h) {
  lookup_t *d = h->data;
  d->timer_open = 0;
  lookup_maybe_free(d);
}

/* Stops waiting: forgets the task, closes the timer, asks the thread pool to drop the work. The
 * request's callback still runs (with UV_EAI_CANCELED when the cancel worked) and frees. */
static void lookup_abandon(lookup_t *d) {
  d->task = NULL;
  if (d->timer_open && !uv_is_closing((uv_handle_t *)&d->timer))
    uv_close((uv_handle_t *)&d->timer, timer_closed);
  if (d->in_flight) uv_cancel((uv_req_t *)&d->req);
}

static void lookup_res_close(mlua_res_t *r) {
  lookup_t *d = (lookup_t *)r;
  d->linked = 0; /* moonlet_free unlinked it */
  lookup_abandon(d);
}

static void lookup_cancel(mlua_task_t *t, void *wait) {
  (void)t;
  lookup_abandon(wait);
}

static void on_timeout(uv_timer_t *h) {
  lookup_t *d = h->data;
  mlua_task_t *t = d->task;
  lookup_abandon(d);
  if (t) mlua_task_resume(t, mlua_push_fail(d->m, t->co, mlua_err_string(UV_ETIMEDOUT), NULL));
}

static int addr_string(const struct sockaddr *sa, char *buf, size_t len) {
  if (sa->sa_family == AF_INET) return uv_ip4_name((const struct sockaddr_in *)sa, buf, len);
  if (sa->sa_family == AF_INET6) return uv_ip6_name((const struct sockaddr_in6 *)sa, buf, len);
  return UV_EAFNOSUPPORT;
}

/* Pushes nil, err for a getaddrinfo failure: "not found" when the name has no address. */
static int push_eai_error(lua_State *L, int status) {
  switch (status) {
  case UV_EAI_NONAME:
  case UV_EAI_NODATA:
  case UV_EAI_ADDRFAMILY:
  case UV_EAI_FAIL: return push_err(L, UV_ENOENT);
  case UV_EAI_AGAIN:
    lua_pushnil(L);
    lua_pushliteral(L, "temporary failure");
    return 2;
  default: return push_err(L, status);
  }
}

typedef struct {
  int status;
  struct addrinfo *res;
} answer_t;

/* A lookup's answer for mlua_push_result: the list of addresses, or nil, err. */
static int push_answer(lua_State *L, void *ud) {
  answer_t *a = ud;
  if (a->status < 0) return push_eai_error(L, a->status);
  lua_newtable(L);
  int count = 0;
  for (struct addrinfo *ai = a->res; ai; ai = ai->ai_next) {
    char buf[64];
    if (addr_string(ai->ai_addr, buf, sizeof buf) < 0) continue;
    int dup = 0; /* one entry per address, whatever the socket types */
    for (int i = 1; i <= count && !dup; i++) {
      lua_rawgeti(L, -1, i);
      dup = strcmp(lua_tostring(L, -1), buf) == 0;
      lua_pop(L, 1);
    }
    if (dup) continue;
    lua_pushstring(L, buf);
    lua_rawseti(L, -2, ++count);
  }
  if (count > 0) return 1;
  lua_pop(L, 1);
  return push_err(L, UV_ENOENT);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  lookup_t *d = req->data;
  mlua_task_t *t = d->task;
  d->in_flight = 0;
  if (d->linked) {
    mlua_res_unlink(d->m, &d->res);
    d->linked = 0;
  }
  lookup_abandon(d);
  int n = 0;
  if (t) {
    answer_t a = {status, res};
    n = mlua_push_result(d->m, t->co, push_answer, &a);
  }
  if (res) uv_freeaddrinfo(res);
  lookup_maybe_free(d);
  if (t) mlua_task_resume(t, n);
}

/* syntax: addrs, err = core.dns_resolve(name, family, timeout)
 * family: "inet", "inet6" or nil (both); timeout: seconds, nil for none. Returns an array of
 * address strings, or nil, "not found" | "timeout" | "invalid argument" (a name with a NUL byte) |
 * other short error. An address literal is answered at once without the thread pool. */
static int l_resolve(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *name = mlua_cstring_arg(L, 1);
  const char *fam = luaL_optstring(L, 2, NULL);
  double timeout = lua_isnoneornil(L, 3) ? -1 : luaL_checknumber(L, 3);
  if (timeout != timeout || (timeout < 0 && !lua_isnoneornil(L, 3)))
    return luaL_argerror(L, 3, "timeout must be a number of seconds >= 0");
  if (timeout > 1e9) timeout = -1; /* as good as none: milliseconds of more would overflow */
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (fam && strcmp(fam, "inet") == 0)
    hints.ai_family = AF_INET;
  else if (fam && strcmp(fam, "inet6") == 0)
    hints.ai_family = AF_INET6;
  else if (fam)
    return luaL_argerror(L, 2, "expected \"inet\", \"inet6\" or nil");
  if (!name) return push_err(L, UV_EINVAL); /* a NUL inside: getaddrinfo would see less */
  unsigned char bin[16];
  int is4 = uv_inet_pton(AF_INET, name, bin) == 0,
      is6 = !is4 && uv_inet_pton(AF_INET6, name, bin) == 0;
  if (is4 || is6) {
    if ((is4 && hints.ai_family == AF_INET6) || (is6 && hints.ai_family == AF_INET))
      return push_err(L, UV_ENOENT);
    lua_createtable(L, 1, 0);
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 1);
    return 1;
  }
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  lookup_t *d = calloc(1, sizeof *d);
  if (!d) return luaL_error(L, "moonlet: out of memory");
  d->m = m;
  d->req.data = d;
  int r = uv_getaddrinfo(m->loop, &d->req, on_resolved, name, NULL, &hints);
  if (r < 0) {
    free(d);
    return push_eai_error(L, r);
  }
  d->in_flight = 1;
  d->task = t;
  mlua_res_link(m, &d->res, lookup_res_close);
  d->linked = 1;
  if (timeout >= 0) {
    uv_timer_init(m->loop, &d->timer);
    d->timer.data = d;
    d->timer_open = 1;
    uv_update_time(m->loop);
    uv_timer_start(&d->timer, on_timeout, mlua_ms(timeout), 0);
  }
  return mlua_task_wait(L, t, lookup_cancel, d);
}

void mlua_open_dns(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"dns_resolve", l_resolve}, {NULL, NULL}};
  mlua_register(L, m, fns);
}
