/* bindings/embed.c: the parts of core/moonlet.h a host uses beyond the life cycle (instance.c):
 * posting from other threads, host modules, calls into Lua, loading and serving an app, reloading.
 *
 * Ownership and threads:
 * - Everything here runs on the loop thread except moonlet_post, which only takes post_lock, links
 *   a node and calls uv_async_send (thread-safe). Nodes are malloc'ed by the poster and freed by
 *   the loop thread after their function ran.
 * - Calls into Lua run in tasks (bindings/sched.c): run_task starts one and, while it is still on
 *   the C stack, collects its results; if the task waits instead, its done callback is switched to
 *   one that only logs, because the caller's results are gone by the time it ends.
 * - The app, its servers and its source live in Lua, in the reload host of lua/moonlet/reload.lua
 *   (one per instance, since every instance has its own Lua state); this file only calls it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include "mlua.h"

typedef struct mlua_post_s {
  struct mlua_post_s *next;
  moonlet_post_fn fn;
  void *data;
} post_t;

/* -- Posting from any thread ------------------------------------------------------------------- */

/* Takes the whole queue and runs it in order. Posts made meanwhile (by the functions themselves or
 * by other threads) wait for the next wake-up, so a function that posts again cannot starve the
 * loop. Returns the number of functions run. */
static int run_posts(moonlet_t *m) {
  uv_mutex_lock(&m->post_lock);
  post_t *p = m->post_head;
  m->post_head = m->post_tail = NULL;
  uv_mutex_unlock(&m->post_lock);
  int n = 0;
  while (p) {
    post_t *next = p->next;
    p->fn(m, p->data);
    free(p);
    p = next;
    n++;
  }
  return n;
}

static void on_post(uv_async_t *h) { run_posts(h->data); }

int mlua_embed_init(moonlet_t *m) {
  if (uv_mutex_init(&m->post_lock) != 0) return UV_ENOMEM;
  int r = uv_async_init(m->loop, &m->post_async, on_post);
  if (r < 0) {
    uv_mutex_destroy(&m->post_lock);
    return r;
  }
  m->post_async.data = m;
  uv_unref((uv_handle_t *)&m->post_async); /* a host's posts do not keep moonlet_run going */
  m->embed_on = 1;
  return 0;
}

void mlua_embed_close(moonlet_t *m) {
  for (int i = 0; i < 1000 && run_posts(m) > 0; i++) {
  }
  uv_close((uv_handle_t *)&m->post_async, NULL); /* freed with m, after moonlet_free's loop run */
}

int moonlet_post(moonlet_t *m, moonlet_post_fn fn, void *data) {
  post_t *p = malloc(sizeof *p);
  if (!p) return UV_ENOMEM;
  p->next = NULL;
  p->fn = fn;
  p->data = data;
  uv_mutex_lock(&m->post_lock);
  if (m->post_tail)
    m->post_tail->next = p;
  else
    m->post_head = p;
  m->post_tail = p;
  uv_mutex_unlock(&m->post_lock);
  uv_async_send(&m->post_async); /* coalesces: one wake-up runs every node queued by then */
  return 0;
}

/* -- Host modules and the Lua state ------------------------------------------------------------ */

int moonlet_register(moonlet_t *m, const char *name, moonlet_open_fn open) {
  if (!name || !open) return UV_EINVAL;
  lua_State *L = m->L;
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, open);
  lua_setfield(L, -2, name);
  lua_pop(L, 2);
  return 0;
}

void *moonlet_userdata(moonlet_t *m) { return m->cfg.userdata; }

struct lua_State *moonlet_lua_state(moonlet_t *m) {
  return m->L;
}

/* -- Running Lua in a task --------------------------------------------------------------------- */

typedef struct run_s {
  int ended;        /* the task ended while run_task was on the stack */
  int ok;           /* ... without an error */
  const char *what; /* names the call in the log */
  void (*collect)(struct run_s *r, lua_State *co); /* reads the results, which start at index 1 */
  void *ctx;                                       /* for collect */
} run_t;

/* -- Modules whose loading failed ----------------------------------------------------------------
 */

/* Lua 5.1's require marks a module "being loaded" with a sentinel value in package.loaded and, when
 * the module raises (out of memory, say), leaves it there: every later require of the module fails
 * with "loop or previous error", and an instance could load no app again. The sentinel is private
 * to LuaJIT (its type even differs between builds), so it is read once, from inside a require. */
static char sentinel_key;
#define SENTINEL_PROBE "moonlet.embed.sentinel"

static int read_sentinel(lua_State *L) {
  lua_pushlightuserdata(L, &sentinel_key);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_getfield(L, -1, SENTINEL_PROBE); /* what require put there while this runs */
  lua_replace(L, -3);
  lua_pop(L, 1);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

void mlua_embed_read_sentinel(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, read_sentinel);
  lua_setfield(L, -2, SENTINEL_PROBE);
  lua_getglobal(L, "require");
  lua_pushliteral(L, SENTINEL_PROBE);
  lua_call(L, 1, 0);
  lua_pushnil(L);
  lua_setfield(L, -2, SENTINEL_PROBE);
  lua_getfield(L, -2, "loaded");
  lua_pushnil(L);
  lua_setfield(L, -2, SENTINEL_PROBE);
  lua_pop(L, 3);
}

/* Forgets the modules whose loading failed (their sentinel), so that a later require tries again.
 * Allocates nothing (the names are interned): safe right after a memory error. */
static void forget_failed_modules(lua_State *L) {
  int top = lua_gettop(L);
  lua_pushlightuserdata(L, &sentinel_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_getglobal(L, "package");
  if (!lua_isnil(L, top + 1) && lua_istable(L, -1)) {
    lua_getfield(L, -1, "loaded");
    if (lua_istable(L, -1)) {
      for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
        if (!lua_rawequal(L, -1, top + 1)) continue;
        lua_pushvalue(L, -2);
        lua_pushnil(L);
        lua_rawset(L, -5); /* clearing a field during lua_next is allowed */
      }
    }
  }
  lua_settop(L, top);
}

static void run_done(mlua_task_t *t, int ok, void *ud) {
  run_t *r = ud;
  r->ended = 1;
  r->ok = ok;
  if (!ok) forget_failed_modules(t->m->L);
  if (!ok)
    ml_log(&t->m->log, ML_LOG_ERROR, "%s: %s", r->what, lua_tostring(t->co, -1));
  else if (r->collect)
    r->collect(r, t->co);
}

static void late_done(mlua_task_t *t, int ok, void *ud) {
  (void)ud;
  if (!ok)
    ml_log(&t->m->log, ML_LOG_ERROR, "task started from C failed: %s", lua_tostring(t->co, -1));
}

/* Starts task t on the function and its nargs arguments already on t->co. Returns 1 when it ended
 * within this call (r->ok says how; collect has run), 0 when it waits and goes on in the loop. */
static int run_task(mlua_task_t *t, int nargs, run_t *r) {
  r->ended = 0;
  t->done = run_done;
  t->done_ud = r;
  mlua_task_start(t, nargs);
  if (r->ended) return 1; /* t is back in the pool: not to be touched */
  t->done = late_done;
  t->done_ud = NULL;
  return 0;
}

/* Whether require(name) would find a module without trying: loaded, preloaded, or a file on
 * package.path or package.cpath. (require() of a missing module raises, and in a static executable
 * the first raise reads the unwind tables into memory: some 300 KB of RSS for nothing.) */
static int module_known(lua_State *L, const char *name, size_t len) {
  int top = lua_gettop(L), known = 0;
  lua_getglobal(L, "package");
  if (lua_istable(L, -1)) {
    static const char *const tables[] = {"loaded", "preload"};
    for (int i = 0; i < 2 && !known; i++) {
      lua_getfield(L, top + 1, tables[i]);
      if (lua_istable(L, -1)) {
        lua_pushlstring(L, name, len);
        lua_rawget(L, -2);
        known = !lua_isnil(L, -1);
      }
      lua_settop(L, top + 1);
    }
    static const char *const paths[] = {"path", "cpath"};
    for (int i = 0; i < 2 && !known; i++) {
      lua_getfield(L, top + 1, "searchpath");
      lua_pushlstring(L, name, len);
      lua_getfield(L, top + 1, paths[i]);
      known = lua_isfunction(L, -3) && lua_isstring(L, -1) && lua_pcall(L, 2, 1, 0) == 0 &&
              lua_isstring(L, -1);
      lua_settop(L, top + 1);
    }
  }
  lua_settop(L, top);
  return known;
}

/* lua_CFunction: pushes the function that the dotted name at index 1 names, or nil. A global
 * first; else the longest prefix that require() loads, then fields. The prefixes that
 * module_known finds are tried first; then, for a module only a custom searcher finds, each one. */
static int resolve(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const char *dot = strchr(name, '.');
  size_t n = dot ? (size_t)(dot - name) : strlen(name);
  const char *rest = NULL;
  lua_pushlstring(L, name, n);
  lua_rawget(L, LUA_GLOBALSINDEX);
  if (!lua_isnil(L, -1)) {
    rest = dot ? dot + 1 : NULL;
  } else {
    lua_pop(L, 1);
    const char *end = name + strlen(name);
    while (end > name && !module_known(L, name, (size_t)(end - name))) {
      while (end > name && *--end != '.') {
      }
    }
    if (end == name) end = name + strlen(name);
    while (end > name) {
      lua_getglobal(L, "require");
      lua_pushlstring(L, name, (size_t)(end - name));
      if (lua_pcall(L, 1, 1, 0) == 0) {
        rest = *end ? end + 1 : NULL;
        break;
      }
      const char *err = lua_tostring(L, -1);
      if (err && !strstr(err, "' not found")) return lua_error(L); /* a module that is broken */
      lua_pop(L, 1);
      while (end > name && *--end != '.') {
      }
    }
    if (lua_gettop(L) == 1) return 0;
  }
  while (rest && *rest) {
    if (!lua_istable(L, -1)) return 0;
    dot = strchr(rest, '.');
    n = dot ? (size_t)(dot - rest) : strlen(rest);
    lua_pushlstring(L, rest, n);
    lua_gettable(L, -2);
    rest = dot ? dot + 1 : NULL;
  }
  return lua_isfunction(L, -1) ? 1 : 0;
}

/* Pushes the named function on L. Returns 0, UV_ENOENT (no such function), UV_ENOMEM (memory ran
 * out while it was looked up or its module loaded) or UV_ECANCELED (a module on the way raised an
 * error); both errors are logged. */
static int push_function(moonlet_t *m, lua_State *L, const char *name) {
  lua_pushcfunction(L, resolve);
  lua_pushstring(L, name);
  int st = lua_pcall(L, 1, 1, 0);
  if (st != 0) {
    const char *err = lua_tostring(L, -1);
    /* (resolve passes a require's memory error on as a runtime error with the same message) */
    int nomem = st == LUA_ERRMEM || (err && strcmp(err, "not enough memory") == 0);
    ml_log(&m->log, ML_LOG_ERROR, "%s: %s", name, err ? err : "(error object is not a string)");
    lua_pop(L, 1);
    forget_failed_modules(L);
    return nomem ? UV_ENOMEM : UV_ECANCELED;
  }
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    return UV_ENOENT;
  }
  return 0;
}

/* -- moonlet_call ------------------------------------------------------------------------------ */

#define MAX_RESULTS 16

typedef struct {
  const char *types; /* result letters */
  void *outs[MAX_RESULTS];
} results_t;

static void collect_results(run_t *r, lua_State *co) {
  results_t *res = r->ctx;
  for (int i = 0; res->types[i]; i++) {
    int idx = i + 1;
    int have = idx <= lua_gettop(co);
    switch (res->types[i]) {
    case 'i': *(int *)res->outs[i] = have ? (int)lua_tointeger(co, idx) : 0; break;
    case 'd': *(double *)res->outs[i] = have ? lua_tonumber(co, idx) : 0; break;
    case 'b': *(int *)res->outs[i] = have && lua_toboolean(co, idx); break;
    case 's': {
      size_t len;
      const char *s =
          have && lua_type(co, idx) == LUA_TSTRING ? lua_tolstring(co, idx, &len) : NULL;
      char *copy = NULL;
      if (s && (copy = malloc(len + 1))) {
        memcpy(copy, s, len);
        copy[len] = '\0';
      }
      *(char **)res->outs[i] = copy;
      break;
    }
    }
  }
}

typedef struct {
  moonlet_t *m;
  const char *name;
  const char *args; /* the argument letters */
  size_t nargs;
  va_list *ap;
} call_args_t;

/* mlua_task_push's push for moonlet_call: the function and the arguments, taken from *ap. Returns
 * their count, or push_function's error. */
static int push_call(lua_State *co, void *ud) {
  call_args_t *a = ud;
  int r = push_function(a->m, co, a->name);
  if (r < 0) return r;
  for (size_t i = 0; i < a->nargs; i++) {
    switch (a->args[i]) {
    case 'i': lua_pushinteger(co, va_arg(*a->ap, int)); break;
    case 'd': lua_pushnumber(co, va_arg(*a->ap, double)); break;
    case 'b': lua_pushboolean(co, va_arg(*a->ap, int)); break;
    case 's': {
      const char *s = va_arg(*a->ap, const char *);
      if (s)
        lua_pushstring(co, s);
      else
        lua_pushnil(co);
      break;
    }
    case 'n': lua_pushnil(co); break;
    }
  }
  return (int)a->nargs + 1;
}

int moonlet_call(moonlet_t *m, const char *name, const char *fmt, ...) {
  if (!name || !fmt) return UV_EINVAL;
  const char *args = fmt, *gt = strchr(fmt, '>');
  size_t nargs = gt ? (size_t)(gt - fmt) : strlen(fmt);
  results_t res = {gt ? gt + 1 : "", {0}};
  if (strlen(res.types) > MAX_RESULTS) return UV_EINVAL;
  for (size_t i = 0; i < nargs; i++)
    if (!strchr("idbsn", args[i])) return UV_EINVAL;
  for (const char *p = res.types; *p; p++)
    if (!strchr("idbs", *p)) return UV_EINVAL;
  mlua_task_t *t = mlua_task_new(m);
  if (!t) return UV_ENOMEM;
  va_list ap;
  va_start(ap, fmt);
  call_args_t ca = {m, name, args, nargs, &ap};
  /* under lua_pcall: a name or an argument string that memory cannot hold fails the call */
  int r = mlua_task_push(t, push_call, &ca);
  if (r < 0) {
    va_end(ap);
    mlua_task_drop(t);
    return r;
  }
  for (int i = 0; res.types[i]; i++)
    res.outs[i] = va_arg(ap, void *);
  va_end(ap);
  run_t run = {0, 0, name, collect_results, &res};
  if (!run_task(t, r - 1, &run)) return 1;
  return run.ok ? 0 : UV_ECANCELED;
}

/* -- Apps: load, listen, reload ---------------------------------------------------------------- */

typedef struct {
  char status[16]; /* first result: "app", "noapp", a port number... */
  char kind[16];   /* second result: "notfound", "error"... */
  char msg[160];   /* third result */
  int port;
} app_result_t;

static void copy_str(lua_State *co, int idx, char *dst, size_t cap) {
  const char *s = idx <= lua_gettop(co) ? lua_tostring(co, idx) : NULL;
  snprintf(dst, cap, "%s", s ? s : "");
}

static void collect_app(run_t *r, lua_State *co) {
  app_result_t *a = r->ctx;
  a->port = lua_gettop(co) >= 1 && lua_type(co, 1) == LUA_TNUMBER ? (int)lua_tointeger(co, 1) : 0;
  copy_str(co, 1, a->status, sizeof a->status);
  copy_str(co, 2, a->kind, sizeof a->kind);
  copy_str(co, 3, a->msg, sizeof a->msg);
}

/* Runs moonlet.reload's fn with the string arguments (NULL: nil). Returns 1 when it ended (a->...
 * set; a raised error leaves a->status empty), 0 when it waits, UV_E* when the framework is
 * missing. */
typedef struct {
  moonlet_t *m;
  const char *fn;
  const char *s[3]; /* NULL: nil */
  int r;            /* push_function's result */
} fn_args_t;

/* The function fn names and the three strings, pushed on the main state under mlua_push_protected
 * (then moved to the task): a script's source is one more string to allocate, and memory running
 * out there must fail the load, not reach LuaJIT's panic. */
static int push_fn_args(lua_State *L, void *ud) {
  fn_args_t *a = ud;
  a->r = push_function(a->m, L, a->fn);
  if (a->r < 0) return 0;
  for (int i = 0; i < 3; i++) {
    if (a->s[i])
      lua_pushstring(L, a->s[i]);
    else
      lua_pushnil(L);
  }
  return 4;
}

static int run_reload_fn3(moonlet_t *m, const char *fn, const char *a1, const char *a2,
                          const char *a3, app_result_t *a) {
  memset(a, 0, sizeof *a);
  mlua_task_t *t = mlua_task_new(m);
  if (!t) return UV_ENOMEM;
  lua_State *co = t->co;
  int top = lua_gettop(co);
  fn_args_t fa = {m, fn, {a1, a2, a3}, 0};
  int n = mlua_push_protected(m, co, push_fn_args, &fa);
  if (fa.r < 0 || n != 4) { /* (n == 2: nil, "not enough memory") */
    lua_settop(co, top);
    if (fa.r == UV_ENOENT) ml_log(&m->log, ML_LOG_ERROR, "%s: the framework is missing", fn);
    mlua_task_drop(t);
    return fa.r < 0 ? fa.r : UV_ENOMEM;
  }
  run_t run = {0, 0, fn, collect_app, a};
  return run_task(t, 3, &run);
}

static int run_reload_fn(moonlet_t *m, const char *fn, const char *a1, const char *a2,
                         app_result_t *a) {
  return run_reload_fn3(m, fn, a1, a2, NULL, a);
}

/* The code of a load or reload result. */
static int load_code(int ended, const app_result_t *a) {
  if (ended < 0) return ended;
  if (ended == 0) return 2;
  if (strcmp(a->status, "app") == 0) return 0;
  if (strcmp(a->status, "noapp") == 0) return 1;
  if (strcmp(a->kind, "busy") == 0) return 2; /* a load waits: this one runs after it */
  if (strcmp(a->kind, "notfound") == 0) return UV_ENOENT;
  return UV_EINVAL;
}

int moonlet_load_file(moonlet_t *m, const char *path) {
  app_result_t a;
  if (!path) return UV_EINVAL;
  return load_code(run_reload_fn(m, "moonlet.reload.instance_load_file", path, NULL, &a), &a);
}

int moonlet_load_string(moonlet_t *m, const char *name, const char *code) {
  app_result_t a;
  if (!code) return UV_EINVAL;
  return load_code(
      run_reload_fn(m, "moonlet.reload.instance_load_string", name ? name : "=string", code, &a),
      &a);
}

int moonlet_reload(moonlet_t *m) {
  app_result_t a;
  return load_code(run_reload_fn(m, "moonlet.reload.instance_reload", NULL, NULL, &a), &a);
}

/* The UV_E* code whose short message (mlua_err_string) ends msg, else UV_EINVAL. */
static int code_of_message(const char *msg) {
  static const int codes[] = {UV_EADDRINUSE,   UV_EACCES, UV_EADDRNOTAVAIL,
                              UV_EAFNOSUPPORT, UV_EMFILE, UV_ENFILE,
                              UV_ENOMEM,       UV_EEXIST, UV_ENOENT};
  size_t n = strlen(msg);
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    const char *s = mlua_err_string(codes[i]);
    size_t k = strlen(s);
    if (n >= k && strcmp(msg + n - k, s) == 0) return codes[i];
  }
  return UV_EINVAL;
}

/* moonlet_listen's work: mode (a Unix socket's permissions, or NULL: the umask's) goes to
 * app:listen as unix_mode. */
static int listen_app(moonlet_t *m, const char *host, int port, const char *mode) {
  app_result_t a;
  char portstr[16];
  if (port < 0 || port > 65535) return UV_EINVAL;
  if (m->stopping) return UV_ESHUTDOWN; /* moonlet_stop is final: a new server would outlive it */
  snprintf(portstr, sizeof portstr, "%d", port);
  int ended = run_reload_fn3(m, "moonlet.reload.instance_listen", host ? host : "127.0.0.1",
                             portstr, mode, &a);
  if (ended < 0) return ended;
  if (ended == 0) return UV_EINVAL;                            /* listening never waits */
  if (a.port > 0 || strcmp(a.status, "0") == 0) return a.port; /* 0: a Unix socket */
  if (a.kind[0] == '\0') return UV_EINVAL;                     /* it raised: logged */
  ml_log(&m->log, ML_LOG_ERROR, "moonlet_listen: %s", a.msg);
  return strcmp(a.kind, "noapp") == 0 ? UV_EINVAL : code_of_message(a.msg);
}

int moonlet_listen(moonlet_t *m, const char *host, int port) {
  return listen_app(m, host, port, NULL);
}

int moonlet_listen_unix(moonlet_t *m, const char *path, int mode) {
  char host[sizeof(((struct sockaddr_un *)0)->sun_path) + 8], modestr[16];
  if (!path || !*path || mode < -1 || mode > 07777) return UV_EINVAL;
  if (m->stopping) return UV_ESHUTDOWN;
  if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) return UV_ENAMETOOLONG;
  snprintf(host, sizeof host, "unix:%s", path);
  snprintf(modestr, sizeof modestr, "%o", (unsigned)mode);
  return listen_app(m, host, 0, mode >= 0 ? modestr : NULL);
}
