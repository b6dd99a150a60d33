/* bindings/instance.c: moonlet_t, the instance behind core/moonlet.h: its Lua state, loop, signals
 * and life cycle (new, run, step, backend fd, stop, free), plus the helpers every binding file uses
 * (upvalue access, metatables, errors). The rest of the embedding API lives in bindings/embed.c.
 *
 * Ownership: the instance owns its Lua state and, unless the host passed one, its loop. Every
 * binding function gets the instance as upvalue 1, never from a global. moonlet_free closes every
 * handle the instance opened, runs the loop until their close callbacks have run, frees the task
 * structs and only then closes the Lua state (so no __gc runs against freed C memory).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../core/sig_guard.h"
#include "mlua.h"

#ifndef MOONLET_LUA_DIR
#define MOONLET_LUA_DIR "lua"
#endif

/* At most this much freed small memory of the Lua state waits in its block cache for reuse (a GC
 * cycle's garbage under load); the rest goes back to malloc. */
#define HEAP_CACHE_BYTES (4u << 20)

static char instance_key;

/* -- Helpers for binding files ---------------------------------------------------------------- */

moonlet_t *mlua_instance(lua_State *L) { return lua_touserdata(L, lua_upvalueindex(1)); }

void mlua_register(lua_State *L, moonlet_t *m, const luaL_Reg *fns) {
  for (; fns->name; fns++) {
    lua_pushlightuserdata(L, m);
    lua_pushcclosure(L, fns->func, 1);
    lua_setfield(L, -2, fns->name);
  }
}

void mlua_register_methods(lua_State *L, moonlet_t *m, const luaL_Reg *fns, int mt) {
  if (mt < 0) mt = lua_gettop(L) + mt + 1;
  for (; fns->name; fns++) {
    lua_pushlightuserdata(L, m);
    lua_pushvalue(L, mt);
    lua_pushcclosure(L, fns->func, 2);
    lua_setfield(L, -2, fns->name);
  }
}

/* Comparing the metatable with the method's upvalue costs a few loads; luaL_checkudata interns the
 * type name and looks it up in the registry on every call. An upvalue index past the function's
 * upvalues reads as nil in LuaJIT, so a function registered otherwise takes the slow check. */
void *mlua_check_object(lua_State *L, int idx, const char *tname) {
  void *p = lua_touserdata(L, idx);
  if (p && lua_getmetatable(L, idx)) {
    int same = lua_rawequal(L, -1, lua_upvalueindex(2));
    lua_pop(L, 1);
    if (same) return p;
  }
  return luaL_checkudata(L, idx, tname);
}

/* Pushes the address and port of sa (IPv4 or IPv6): returns 2. */
int mlua_push_sockaddr(lua_State *L, const struct sockaddr *sa) {
  char host[64];
  int port;
  if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
    uv_ip6_name(a, host, sizeof host);
    port = ntohs(a->sin6_port);
  } else {
    const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
    uv_ip4_name(a, host, sizeof host);
    port = ntohs(a->sin_port);
  }
  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  return 2;
}

const char *mlua_err_string(int e) {
  switch (e) {
  case UV_ETIMEDOUT: return "timeout";
  case UV_EPIPE:
  case UV_EOF:
  case UV_ECONNRESET:
  case UV_ENOTCONN:
  case UV_ECANCELED: return "closed";
  case UV_ECONNREFUSED: return "connection refused";
  case UV_EADDRINUSE: return "address in use";
  case UV_ENOENT: return "not found";
  case UV_EACCES: return "permission denied";
  case UV_EHOSTUNREACH: return "host unreachable";
  case UV_ENETUNREACH: return "network unreachable";
  case UV_E2BIG: return "too large";
  case UV_EFTYPE: return "not a regular file";
  default: return uv_strerror(e);
  }
}

int mlua_push_error(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, mlua_err_string(e));
  lua_pushstring(L, uv_err_name(e));
  return 3;
}

const char *mlua_cstring_arg(lua_State *L, int idx) {
  size_t n;
  const char *s = luaL_checklstring(L, idx, &n);
  return memchr(s, '\0', n) ? NULL : s;
}

void mlua_res_link(moonlet_t *m, mlua_res_t *r, void (*close)(mlua_res_t *)) {
  r->close = close;
  r->prev = NULL;
  r->next = m->resources;
  if (m->resources) m->resources->prev = r;
  m->resources = r;
}

void mlua_res_unlink(moonlet_t *m, mlua_res_t *r) {
  if (r->prev)
    r->prev->next = r->next;
  else if (m->resources == r)
    m->resources = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
}

/* -- The core module ------------------------------------------------------------------------ */

static int l_set_exit_code(lua_State *L) {
  mlua_instance(L)->exit_code = (int)luaL_checkinteger(L, 1);
  return 0;
}

/* syntax: core.set_warn_blocking(seconds) -- a task that runs this long without yielding is logged
 * (sched.c); 0 or nil: off */
static int l_set_warn_blocking(lua_State *L) {
  double secs = luaL_optnumber(L, 1, 0);
  if (!(secs >= 0)) return luaL_argerror(L, 1, "seconds must be 0 or more");
  mlua_instance(L)->warn_blocking_ns = (uint64_t)(secs * 1e9);
  return 0;
}

static int l_log(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  int level = (int)luaL_checkinteger(L, 1);
  const char *msg = luaL_checkstring(L, 2);
  ml_log(&m->log, level, "%s", msg);
  return 0;
}

/* syntax: core.set_log(level, access, access_path, access_format) -- level "error".."debug" (nil:
 * unchanged); access true/false turns the access log on or off (nil: unchanged), to access_path
 * (nil or "-": stdout) in access_format ("moonlet", "combined", "json"; nil: "moonlet"). Returns
 * true, or nil, err when the file cannot be opened (the log stays as it was). */
static int l_set_log(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  int lvl = -1, fmt = ML_ACCESS_MOONLET;
  if (!lua_isnil(L, 1)) {
    lvl = ml_log_level_parse(luaL_checkstring(L, 1));
    if (lvl < 0) return luaL_argerror(L, 1, "unknown log level (error, warn, info, debug)");
  }
  if (!lua_isnoneornil(L, 4)) {
    fmt = ml_log_access_format_parse(luaL_checkstring(L, 4));
    if (fmt < 0) return luaL_argerror(L, 4, "unknown access log format (moonlet, combined, json)");
  }
  if (!lua_isnoneornil(L, 2) && lua_toboolean(L, 2)) {
    ml_log_out_t *out;
    int r = ml_log_out_open(&out, luaL_optstring(L, 3, NULL));
    if (r < 0) return mlua_push_error(L, r);
    ml_log_out_free(m->log.access_out);
    m->log.access_out = out;
    m->log.access_format = fmt;
    m->log.access = 1;
    if (out->fd == 1) setvbuf(stdout, NULL, _IOLBF, 0); /* print()'s lines beside it stay whole */
  } else if (!lua_isnoneornil(L, 2)) {
    m->log.access = 0;
    ml_log_out_flush(m->log.access_out);
  }
  if (lvl >= 0) m->log.level = lvl;
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: core.set_error_log(path) -- stderr, and so the error log, goes to the file at path
 * (appending); SIGUSR1 reopens it. The process's stderr: for the command line only. The stderr it
 * had is kept for core.console (why a start failed goes to the terminal or journal too). Returns
 * true or nil, err. */
static int l_set_error_log(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *path = luaL_checkstring(L, 1);
  char *copy = strdup(path);
  if (!copy) return luaL_error(L, "not enough memory");
  int console = m->console_fd >= 0 ? m->console_fd : fcntl(2, F_DUPFD_CLOEXEC, 3);
  int r = ml_log_redirect_stderr(path);
  if (r < 0) {
    if (console != m->console_fd && console >= 0) close(console);
    free(copy);
    return mlua_push_error(L, r);
  }
  m->console_fd = console;
  free(m->error_log_path);
  m->error_log_path = copy;
  lua_pushboolean(L, 1);
  return 1;
}

/* The id in the pid file at path when it names another process that runs moonlet now; else 0. */
static int live_pid_in(const char *path) {
  FILE *f = fopen(path, "r");
  int pid = 0;
  if (!f) return 0;
  if (fscanf(f, "%d", &pid) != 1) pid = 0;
  fclose(f);
  if (pid <= 0 || pid == (int)getpid() || (kill(pid, 0) < 0 && errno != EPERM)) return 0;
  char comm_path[64], comm[32] = "";
  snprintf(comm_path, sizeof comm_path, "/proc/%d/comm", pid);
  f = fopen(comm_path, "r");
  if (f) {
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
  }
  return strncmp(comm, "moonlet", 7) == 0 ? pid : 0; /* (a stale file's id, reused by another) */
}

int mlua_pid_file_set(moonlet_t *m, const char *path, int *other) {
  *other = live_pid_in(path);
  if (*other) return 1;
  char *copy = strdup(path);
  if (!copy) return UV_ENOMEM;
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  char line[24];
  int n = snprintf(line, sizeof line, "%d\n", (int)getpid());
  if (fd < 0 || write(fd, line, (size_t)n) != n) {
    int e = -errno;
    if (fd >= 0) close(fd);
    free(copy);
    return e;
  }
  close(fd);
  free(m->pid_path);
  m->pid_path = copy;
  m->pid = getpid();
  return 0;
}

/* Pushes "in use by process N" or the error's message for mlua_pid_file_set's r (nonzero). */
void mlua_push_pid_file_error(lua_State *L, int r, int other) {
  if (r == 1)
    lua_pushfstring(L, "in use by process %d", other);
  else
    lua_pushstring(L, mlua_err_string(r));
}

/* syntax: core.set_pid_file(path) -- writes this process's id to the file at path (replacing it),
 * unless the file holds the id of a moonlet that runs now (nil, "in use by process N": a second
 * server started by mistake must not take the running one's file); the file is removed when the
 * instance ends in this same process (not in a forked worker, whose id is not the one written).
 * Returns true or nil, err. (`--workers N`: core.fork_workers writes it, once the port is bound.)
 */
static int l_set_pid_file(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *path = luaL_checkstring(L, 1);
  int other = 0, r = mlua_pid_file_set(m, path, &other);
  if (r) {
    lua_pushnil(L);
    mlua_push_pid_file_error(L, r, other);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* At the end: the pid file goes, if this is the process that wrote it and the file still holds its
 * id (a newer server started with the same --pid-file keeps its own). */
static void remove_pid_file(moonlet_t *m) {
  if (!m->pid_path || m->pid != getpid()) return;
  FILE *f = fopen(m->pid_path, "r");
  int pid = 0;
  if (f) {
    if (fscanf(f, "%d", &pid) != 1) pid = 0;
    fclose(f);
  }
  if (pid == (int)m->pid) unlink(m->pid_path);
}

/* syntax: core.console(text) -- writes text to the stderr the process had before --error-log took
 * it (nothing when it was not taken): a failure to start is seen where the command was run */
static int l_console(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t n;
  const char *text = luaL_checklstring(L, 1, &n);
  if (m->console_fd >= 0) ml_log_write_all(m->console_fd, text, n);
  return 0;
}

/* syntax: core.before_exit() -- what moonlet_free would do for the logs and the pid file, for a
 * script that ends the process with os.exit: the access log's buffered lines written, the pid file
 * removed */
static int l_before_exit(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  ml_log_out_flush(m->log.access_out);
  remove_pid_file(m);
  return 0;
}

void mlua_log_reopen(moonlet_t *m) {
  int r;
  if (m->error_log_path && (r = ml_log_redirect_stderr(m->error_log_path)) < 0)
    ml_log(&m->log, ML_LOG_ERROR, "cannot reopen the error log %s: %s", m->error_log_path,
           uv_strerror(r));
  ml_log_out_t *out = m->log.access_out;
  if (out && (r = ml_log_out_reopen(out)) < 0)
    ml_log(&m->log, ML_LOG_ERROR, "cannot reopen the access log %s: %s", out->path, uv_strerror(r));
  ml_log(&m->log, ML_LOG_INFO, "log files reopened");
}

/* syntax: core.stop() -- graceful: servers finish their requests, then the loop stops */
static int l_stop(lua_State *L) {
  moonlet_stop(mlua_instance(L));
  return 0;
}

/* syntax: core.on_stop(fn) -- fn runs in a task once a graceful stop has drained every server
 * (lua/moonlet/shutdown.lua: the shutdown hooks); it must end with core.halt(), which stops the
 * loop. A later call replaces fn. */
static int l_on_stop(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, m->stop_hook_ref);
  lua_settop(L, 1);
  m->stop_hook_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

void mlua_stop_drained(moonlet_t *m) {
  if (m->stop_hook_ref == LUA_NOREF || m->stop_hook_ran || m->tearing_down) {
    uv_stop(m->loop);
    return;
  }
  m->stop_hook_ran = 1; /* a server listened to by a hook and closed again: no second run */
  mlua_task_t *t = mlua_task_new(m);
  if (!t) { /* out of memory (the host's budget): the stop ends without its hooks */
    ml_log(&m->log, ML_LOG_ERROR, "out of memory: the shutdown hooks cannot run");
    uv_stop(m->loop);
    return;
  }
  lua_rawgeti(t->co, LUA_REGISTRYINDEX, m->stop_hook_ref); /* (allocates nothing) */
  mlua_task_start(t, 0);
}

static void count_walk(uv_handle_t *h, void *arg) {
  if (!uv_is_closing(h)) (*(int *)arg)++;
}

/* syntax: stats = core.stats() -- { handles, resources, tasks, pooled_tasks }: open libuv handles
 * of the loop, resources holding handles for Lua, live tasks, pooled coroutines (leak checks) */
static int l_stats(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  int handles = 0, resources = 0;
  uv_walk(m->loop, count_walk, &handles);
  for (mlua_res_t *r = m->resources; r; r = r->next)
    resources++;
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, handles);
  lua_setfield(L, -2, "handles");
  lua_pushinteger(L, resources);
  lua_setfield(L, -2, "resources");
  lua_pushinteger(L, (lua_Integer)m->live_tasks);
  lua_setfield(L, -2, "tasks");
  lua_pushinteger(L, (lua_Integer)m->free_task_count);
  lua_setfield(L, -2, "pooled_tasks");
  return 1;
}

/* syntax: core.halt() -- closes every server now and stops the loop (end of `moonlet test`) */
static int l_halt(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  mlua_http_servers_close(m);
  uv_stop(m->loop);
  return 0;
}

/* cfg.limits as the defaults of core.listen: upvalue 2 is the listen of http_server.c; a copy of
 * the opts table gets each limit the host set and the table leaves unset. */
static int l_listen_limits(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const moonlet_limits_t *lim = &m->cfg.limits;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 2);
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_newtable(L);
  for (lua_pushnil(L); lua_next(L, 1); lua_pop(L, 1)) {
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -2);
    lua_rawset(L, -5);
  }
  struct {
    const char *name;
    double v;
  } fields[] = {{"max_body", (double)lim->max_body},
                {"max_uri", (double)lim->max_uri},
                {"max_header_bytes", (double)lim->max_header_bytes},
                {"max_headers", lim->max_headers},
                {"max_conns", lim->max_conns},
                {"keepalive_requests", lim->keepalive_requests},
                {"header_timeout", lim->header_timeout_ms / 1000.0},
                {"body_timeout", lim->body_timeout_ms / 1000.0},
                {"keepalive_timeout", lim->keepalive_timeout_ms / 1000.0},
                {"send_timeout", lim->send_timeout_ms / 1000.0},
                {"shutdown_grace", lim->shutdown_grace_ms / 1000.0}};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    if (fields[i].v == 0) continue;
    lua_getfield(L, -1, fields[i].name);
    int unset = lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!unset) continue;
    lua_pushnumber(L, fields[i].v);
    lua_setfield(L, -2, fields[i].name);
  }
  lua_pushvalue(L, 2);
  lua_call(L, 2, LUA_MULTRET);
  return lua_gettop(L) - 2;
}

static void wrap_listen(lua_State *L, moonlet_t *m) {
  static const moonlet_limits_t none;
  if (memcmp(&m->cfg.limits, &none, sizeof none) == 0) return;
  lua_pushlightuserdata(L, m);
  lua_getfield(L, -2, "listen");
  lua_pushcclosure(L, l_listen_limits, 2);
  lua_setfield(L, -2, "listen");
}

int luaopen_moonlet_core(lua_State *L) {
  moonlet_t *m = lua_touserdata(L, lua_upvalueindex(1));
  static const luaL_Reg fns[] = {{"set_exit_code", l_set_exit_code},
                                 {"set_warn_blocking", l_set_warn_blocking},
                                 {"log", l_log},
                                 {"set_log", l_set_log},
                                 {"set_error_log", l_set_error_log},
                                 {"before_exit", l_before_exit},
                                 {"console", l_console},
                                 {"set_pid_file", l_set_pid_file},
                                 {"stop", l_stop},
                                 {"on_stop", l_on_stop},
                                 {"halt", l_halt},
                                 {"stats", l_stats},
                                 {NULL, NULL}};
  lua_newtable(L);
  mlua_register(L, m, fns);
  lua_pushstring(L, MOONLET_VERSION);
  lua_setfield(L, -2, "version");
  mlua_open_time(L, m);
  mlua_open_task(L, m);
  mlua_open_http_server(L, m);
  mlua_open_fs(L, m);
  mlua_open_work(L, m);
  mlua_open_tcp(L, m);
  mlua_open_ws(L, m);
  mlua_open_udp(L, m);
  mlua_open_dns(L, m);
  mlua_open_zlib(L, m);
  mlua_open_fswatch(L, m);
  mlua_open_sqlite(L, m);
  mlua_open_pg(L, m);
  mlua_open_process(L, m);
  mlua_open_http_client(L, m);
  mlua_open_crypto(L, m);
  mlua_open_regex(L, m);
  mlua_open_workers(L, m);
  mlua_open_shared(L, m);
  wrap_listen(L, m); /* last: it wraps the listen of mlua_open_http_server */
  return 1;
}

/* -- Signals ------------------------------------------------------------------------------------
 */

static void on_signal(uv_signal_t *h, int signum) {
  moonlet_t *m = h->data;
  if (m->tearing_down) { /* moonlet_free runs: everything is closing already */
    if (m->teardown_waiting && (signum == SIGINT || signum == SIGTERM)) {
      /* ... but waits for a thread-pool job (a work function that never returns): a second
       * signal ends the process there, as "closes everything at once" says */
      ml_log(&m->log, ML_LOG_WARN, "second signal: a thread-pool job still runs: exiting now");
      signal(signum, SIG_DFL);
      raise(signum);
    }
    return;
  }
  if (signum == SIGUSR1) { /* nginx's reopen: logrotate moved the files */
    mlua_log_reopen(m);
    return;
  }
  if (signum == SIGHUP) { /* the app's file again; reload.lua logs how it went */
    if (moonlet_reload(m) == UV_ENOENT)
      ml_log(&m->log, ML_LOG_WARN, "SIGHUP: no app loaded from a file, nothing to reload");
    return;
  }
  ml_sig_guard_heard(); /* this loop runs: a next SIGINT or SIGTERM comes here too */
  if (m->stopping) {
    ml_log(&m->log, ML_LOG_WARN, "second signal: closing now");
    mlua_http_servers_close(m);
    uv_stop(m->loop);
    return;
  }
  ml_log(&m->log, ML_LOG_INFO, "signal %d: shutting down gracefully", signum);
  moonlet_stop(m);
}

static void signals_start(moonlet_t *m) {
  signal(SIGPIPE, SIG_IGN); /* a write to a socket the peer closed is an EPIPE error, not a death */
  uv_signal_t *hs[] = {&m->sig_int, &m->sig_term, &m->sig_hup, &m->sig_usr1};
  int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1};
  for (int i = 0; i < 4; i++) {
    uv_signal_init(m->loop, hs[i]);
    hs[i]->data = m;
    uv_signal_start(hs[i], on_signal, sigs[i]);
    uv_unref((uv_handle_t *)hs[i]);
    if (sigs[i] == SIGINT || sigs[i] == SIGTERM) ml_sig_guard_install(sigs[i]); /* stuck loop */
  }
  m->signals_on = 1;
}

/* -- Life cycle ------------------------------------------------------------------------------- */

void moonlet_config_default(moonlet_config_t *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->log_level = ML_LOG_INFO;
}

static void set_path(lua_State *L, const moonlet_config_t *cfg) {
  const char *dir = cfg->lua_dir ? cfg->lua_dir : getenv("MOONLET_LUA_DIR");
  if (!dir) dir = MOONLET_LUA_DIR;
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;./?.lua;./?/init.lua;%s%s%s", dir, dir,
                  cfg->lua_path ? cfg->lua_path : "", cfg->lua_path ? ";" : "",
                  lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 2);
}

/* The panic function of a state made with the host's allocator (luaL_newstate installs its own):
 * an error outside any protected call cannot be recovered; LuaJIT exits after this returns. */
static int on_panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "moonlet: PANIC: unprotected error in call to Lua API (%s)\n",
          msg ? msg : "(not a string)");
  fflush(stderr);
  return 0;
}

moonlet_t *moonlet_from_lua(struct lua_State *L) {
  lua_pushlightuserdata(L, &instance_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  moonlet_t *m = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return m;
}

/* lua_CFunction, run by lua_cpcall with the instance as light userdata: the libraries, the paths,
 * the registry entries and package.preload["moonlet.core"]. Everything it allocates is the Lua
 * state's, so lua_close undoes a half-done run. */
static int init_state(lua_State *L) {
  moonlet_t *m = lua_touserdata(L, 1);
  lua_settop(L, 0);
  luaL_openlibs(L);
  mlua_preload_linked_modules(L);
  set_path(L, &m->cfg);
  lua_pushlightuserdata(L, &instance_key);
  lua_pushlightuserdata(L, m);
  lua_rawset(L, LUA_REGISTRYINDEX);
  mlua_sched_init(m);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushlightuserdata(L, m);
  lua_pushcclosure(L, luaopen_moonlet_core, 1);
  lua_setfield(L, -2, "moonlet.core");
  lua_pop(L, 2);
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  m->traceback_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  mlua_embed_read_sentinel(L);
  return 0;
}

moonlet_t *moonlet_new(const moonlet_config_t *cfg) {
  moonlet_config_t defaults;
  if (!cfg) {
    moonlet_config_default(&defaults);
    cfg = &defaults;
  }
  moonlet_t *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  m->cfg = *cfg;
  m->shm_bytes = cfg->shared_memory;
  m->worker = (ml_worker_info_t){.id = 0, .count = 1, .ready_fd = -1};
  m->worker_unix_fd = -1;
  m->console_fd = -1;
  if (cfg->loop) {
    m->loop = cfg->loop;
  } else {
    if (uv_loop_init(&m->own_loop) != 0) {
      free(m);
      return NULL;
    }
    m->loop = &m->own_loop;
    m->owns_loop = 1;
  }
  m->log.level = cfg->log_level;
  m->log.sink = cfg->log_sink;
  m->log.sink_ud = cfg->log_ud;
  if (cfg->alloc) { /* LuaJIT x64 without GC64 refuses (it needs memory below 2 GiB) */
    m->L = lua_newstate(cfg->alloc, cfg->alloc_ud);
    if (m->L)
      lua_atpanic(m->L, on_panic);
    else
      ml_log(&m->log, ML_LOG_ERROR,
             "moonlet_new: LuaJIT refused the host's allocator "
             "(a 64-bit build without GC64?); leave cfg.alloc NULL");
  } else if (!getenv("MOONLET_LUAJIT_ALLOC")) {
    /* malloc with a cache of small freed blocks in front (core/block_cache.h): a request's tables,
     * strings and closures come and go in a few instructions each, not LuaJIT's allocator's ~150 */
    ml_bcache_init(&m->heap_cache, HEAP_CACHE_BYTES);
    m->L = lua_newstate(ml_bcache_alloc, &m->heap_cache);
    if (m->L) lua_atpanic(m->L, on_panic);
  }
  if (!m->L && !cfg->alloc) m->L = luaL_newstate(); /* x64 LuaJIT without GC64 takes no allocator */
  /* The Lua side first, protected: an allocator that fails meanwhile is a NULL return, not a panic
   * that ends the host. No handle is open yet, so a failure has nothing on the loop to close. */
  if (!m->L || lua_cpcall(m->L, init_state, m) != 0 || mlua_embed_init(m) < 0) {
    if (m->L) lua_close(m->L);
    ml_bcache_drain(&m->heap_cache);
    if (m->owns_loop) uv_loop_close(&m->own_loop);
    free(m);
    return NULL;
  }
  m->dispatch_ref = LUA_NOREF;
  m->stop_hook_ref = LUA_NOREF;
  if (cfg->handle_signals) signals_start(m);
  return m;
}

uv_loop_t *moonlet_loop(moonlet_t *m) { return m->loop; }

static void main_done(mlua_task_t *t, int ok, void *ud) {
  moonlet_t *m = ud;
  if (!ok) {
    ml_log(&m->log, ML_LOG_ERROR, "%s", lua_tostring(t->co, -1));
    m->exit_code = 1;
  }
}

typedef struct {
  moonlet_t *m;
  int argc;
  char **argv;
} main_args_t;

/* mlua_task_push's push for moonlet_main: moonlet.cli's main and the table of the arguments. */
static int push_main(lua_State *co, void *ud) {
  main_args_t *a = ud;
  lua_getglobal(co, "require");
  lua_pushstring(co, "moonlet.cli");
  if (lua_pcall(co, 1, 1, 0) != 0) {
    ml_log(&a->m->log, ML_LOG_ERROR, "cannot load the framework: %s", lua_tostring(co, -1));
    return UV_EINVAL;
  }
  lua_getfield(co, -1, "main");
  lua_remove(co, -2);
  lua_newtable(co);
  for (int i = 0; i < a->argc; i++) {
    lua_pushstring(co, a->argv[i]);
    lua_rawseti(co, -2, i);
  }
  return 2;
}

int moonlet_main(moonlet_t *m, int argc, char **argv) {
  main_args_t a = {m, argc, argv};
  mlua_task_t *t = mlua_task_new(m);
  int r = t ? mlua_task_push(t, push_main, &a) : UV_ENOMEM;
  if (r < 0) {
    if (r == UV_ENOMEM) ml_log(&m->log, ML_LOG_ERROR, "cannot start: out of memory");
    if (t) mlua_task_drop(t);
    m->exit_code = 1;
    return 1;
  }
  t->done = main_done;
  t->done_ud = m;
  mlua_task_start(t, 1);
  return m->exit_code;
}

int moonlet_run(moonlet_t *m) {
  uv_run(m->loop, UV_RUN_DEFAULT);
  return m->exit_code;
}

/* 1 when handles started since libuv's last poll are not yet in the backend fd's set: libuv adds
 * them at the start of its next poll phase, and uv_backend_timeout does not count them (libuv issue
 * #1565), so a host that waited on the fd now could sleep through their events. This reads a
 * private field of uv_loop_t (uv/unix.h); its type changed in libuv 1.46. */
static int watchers_pending(const uv_loop_t *loop) {
#if UV_VERSION_MAJOR == 1 && UV_VERSION_MINOR < 46
  return loop->watcher_queue[0] != (void *)&loop->watcher_queue;
#else
  return loop->watcher_queue.next != &loop->watcher_queue;
#endif
}

int moonlet_backend_fd(moonlet_t *m) { return uv_backend_fd(m->loop); }

int moonlet_backend_timeout(moonlet_t *m) {
  if (watchers_pending(m->loop)) return 0;
  if (!uv_loop_alive(m->loop)) return -1; /* nothing to do: only the fd (a post) can wake us */
  uv_update_time(m->loop); /* timers are due relative to now, not to the last iteration */
  return uv_backend_timeout(m->loop);
}

/* One non-blocking iteration. The post handle is referenced meanwhile: uv_run does nothing on a
 * loop with no active handle, and a host that steps an instance with nothing else to do must still
 * get its posts run (and the wake-up drained, or the fd would stay readable). */
static void run_nowait(moonlet_t *m) {
  if (m->embed_on) uv_ref((uv_handle_t *)&m->post_async);
  uv_run(m->loop, UV_RUN_NOWAIT);
  if (m->embed_on) uv_unref((uv_handle_t *)&m->post_async);
}

/* Waits on the backend fd (poll) for at most timeout_ms and for no longer than the next timer,
 * then runs one non-blocking iteration, which handles whatever woke us. Handles started by the
 * previous iteration are first added to the fd's set by an extra iteration. */
int moonlet_step(moonlet_t *m, int timeout_ms) {
  uv_loop_t *loop = m->loop;
  if (timeout_ms > 0) {
    if (watchers_pending(loop)) run_nowait(m);
    int wait = moonlet_backend_timeout(m);
    if (wait < 0 || wait > timeout_ms) wait = timeout_ms;
    if (wait > 0) {
      struct pollfd p = {uv_backend_fd(loop), POLLIN, 0};
      (void)poll(&p, 1, wait); /* EINTR: a signal, the step just ends early */
    }
  }
  run_nowait(m);
  return uv_loop_alive(loop);
}

void moonlet_stop(moonlet_t *m) {
  if (m->stopping) return;
  m->stopping = 1;
  mlua_http_servers_stop(m);
}

static int is_signal_of(moonlet_t *m, uv_handle_t *h) {
  return m->signals_on && (h == (uv_handle_t *)&m->sig_int || h == (uv_handle_t *)&m->sig_term ||
                           h == (uv_handle_t *)&m->sig_hup || h == (uv_handle_t *)&m->sig_usr1);
}

static void close_walk(uv_handle_t *h, void *arg) {
  if (!uv_is_closing(h) && !is_signal_of(arg, h)) uv_close(h, NULL);
}

static void count_closing(uv_handle_t *h, void *arg) {
  if (uv_is_closing(h)) (*(int *)arg)++;
}

/* Handles closed whose close callback has not run yet (a handle leaves the loop's list just
 * before its close callback runs). */
static int closing_count(uv_loop_t *loop) {
  int n = 0;
  uv_walk(loop, count_closing, &n);
  return n;
}

void moonlet_free(moonlet_t *m) {
  if (!m) return;
  if (m->embed_on) mlua_embed_close(m); /* queued posts run first, with everything still up */
  /* From here no task is cancelled (mlua_task_cancel): the resources closed below free what a
   * parked task's cancel callback would touch, and a connection's on_close comes after them. */
  m->tearing_down = 1;
  mlua_http_servers_close(m);
  /* The signal handles close last (below): closed, libuv puts back SIG_DFL, and a second SIGTERM
   * while the rest is freed (a finalizer, the access log's last lines, the pid file) would end
   * the process there. Until then on_signal ignores what comes (tearing_down). */
  while (m->resources) { /* each unlinks itself and frees from its close callback */
    mlua_res_t *r = m->resources;
    mlua_res_unlink(m, r);
    r->close(r);
  }
  /* The close callbacks run, freeing what they own; one may close another handle (a server closes
   * its connections), hence the loop. On a lent loop this runs the host's handles' callbacks too;
   * it must not be called from inside the host's uv_run. */
  for (int i = 0; i < 1000 && (m->servers || closing_count(m->loop) > 0); i++)
    uv_run(m->loop, UV_RUN_NOWAIT);
  if (m->owns_loop) {
    uv_walk(m->loop, close_walk, m); /* what is left: timers of parked tasks, ...; signals stay */
    m->teardown_waiting = 1;
    for (int i = 0; i < 100 && uv_run(m->loop, UV_RUN_DEFAULT) != 0; i++) {
    } /* again when a close callback called uv_stop (a server of a stopping instance) */
    m->teardown_waiting = 0;
  }
  mlua_task_t **tasks = mlua_sched_detach(m);
  lua_close(m->L); /* finalizers may still look at task structs: they are freed after */
  ml_bcache_drain(&m->heap_cache);
  mlua_sched_free_list(tasks);
  mlua_shared_free(m);                /* no dictionary userdata is left to reach the arena */
  ml_log_out_free(m->log.access_out); /* its last lines are written */
  free(m->error_log_path);
  if (m->console_fd >= 0) close(m->console_fd);
  remove_pid_file(m);
  free(m->pid_path);
  if (m->embed_on) uv_mutex_destroy(&m->post_lock);
  if (m->signals_on) {
    uv_close((uv_handle_t *)&m->sig_int, NULL);
    uv_close((uv_handle_t *)&m->sig_term, NULL);
    uv_close((uv_handle_t *)&m->sig_hup, NULL);
    uv_close((uv_handle_t *)&m->sig_usr1, NULL);
    for (int i = 0; i < 1000 && closing_count(m->loop) > 0; i++)
      uv_run(m->loop, UV_RUN_NOWAIT);
  }
  if (m->owns_loop) {
    int r = uv_loop_close(&m->own_loop);
    if (r < 0)
      ml_log(&m->log, ML_LOG_ERROR, "moonlet_free: the loop still holds handles (%s)",
             uv_err_name(r));
  }
  free(m);
}
