/* bindings/workers.c: `moonlet --workers N` for Lua (the command line, lua/moonlet/cli.lua, and
 * moonlet.worker). core.fork_workers(n, host, port) reserves the port, then forks the workers
 * (core/workers.c): it returns "worker", id, port in each of them, and "supervisor", exit_code in
 * the process that started them, once they are all gone.
 *
 * Invariants: it runs before the loop has run (the command line calls it before loading the
 * script), in an instance that owns its loop; a worker re-creates the loop's kernel state
 * (uv_loop_fork) before anything else touches the loop, and only then unblocks the signals (a
 * SIGTERM that came in between is delivered to the worker's own signal pipe, not lost). The
 * reserved port's socket stays open in the supervisor only (a worker closes its copy), so that a
 * worker started again finds it free; the reservation is a best effort (a script may serve on
 * other ports than the command line's: then its workers' own listen says what is wrong). A
 * worker's first listener that opens tells the supervisor it serves (mlua_worker_listening).
 * moonlet.shared's arena is mapped before the fork, so that every worker (and every worker started
 * again) maps the same dictionaries.
 */
#include <signal.h>
#include <unistd.h>

#include "../core/listen.h"
#include "mlua.h"

/* What the supervisor's hooks work on: the instance (SIGUSR1 reopens its log files) and the
 * `--unix PATH` socket, closed and its file removed when a stop begins (so that new clients fail at
 * once rather than wait at a socket no worker will accept on), or at the end.
 */
typedef struct {
  int fd; /* -1: none, or closed */
  const char *path;
  ml_unix_id_t id;
  moonlet_t *m;
} unix_sock_t;

static void unix_stop(void *ud) {
  unix_sock_t *us = ud;
  if (us->fd < 0) return;
  close(us->fd);
  us->fd = -1;
  ml_listen_unix_unlink(us->path, &us->id);
}

/* The supervisor's SIGUSR1: its own log files again (the workers reopen theirs). */
static void reopen_logs(void *ud) {
  unix_sock_t *us = ud;
  mlua_log_reopen(us->m);
}

/* syntax: role, a, b = core.fork_workers(n, host, port, unix_path, unix_mode, pid_path)
 * unix_path (optional): the workers serve on that Unix domain socket (permissions unix_mode), made
 * here, once, before the fork (a port is not reserved then); the supervisor closes its copy and
 * removes the file when a stop begins, or once the workers are gone (unix_stop). pid_path
 * (optional): the supervisor's id is written there once the port or the socket is bound, as
 * nginx's master writes its pid file after it opened its listening sockets; nil, err, 2 when it
 * cannot be (a running moonlet's file, a directory it may not write). */
static int l_fork_workers(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  int n = (int)luaL_checkinteger(L, 1);
  const char *host = luaL_checkstring(L, 2);
  int port = (int)luaL_checkinteger(L, 3);
  const char *unix_path = luaL_optstring(L, 4, NULL);
  lua_Integer unix_mode = luaL_optinteger(L, 5, -1);
  if (unix_mode > 07777) return luaL_argerror(L, 5, "not a permission mode");
  if (n < 2 || n > 255) return luaL_argerror(L, 1, "from 2 to 255 workers");
  if (!m->owns_loop || m->worker.count > 1)
    return luaL_error(L, "moonlet: workers are forked by the moonlet command, once");
  int r = mlua_shared_arena(m); /* before the fork: every worker maps the same one */
  if (r < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start the workers: shared memory: %s", mlua_err_string(r));
    return 2;
  }
  int bound = port, fd = -1, ufd = -1;
  ml_unix_id_t id = {0, 0};
  if (unix_path) {
    ufd = ml_listen_unix_fd(unix_path, 511, (int)unix_mode, &id);
    if (ufd < 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "listen on unix:%s: %s", unix_path, mlua_err_string(ufd));
      return 2;
    }
    lua_pushvalue(L, 4); /* the path string lives as long as the instance: the registry holds it */
    luaL_ref(L, LUA_REGISTRYINDEX);
  } else {
    fd = ml_listen_reserve(host, port, &bound);
    if (fd < 0 && port == 0) { /* no port to agree on */
      lua_pushnil(L);
      lua_pushfstring(L, "listen on %s:%d: %s", host, port, mlua_err_string(fd));
      return 2;
    }
  }
  const char *pid_path = luaL_optstring(L, 6, NULL);
  int other = 0;
  r = pid_path ? mlua_pid_file_set(m, pid_path, &other) : 0;
  if (r) {
    if (fd >= 0) close(fd);
    if (ufd >= 0) {
      close(ufd);
      ml_listen_unix_unlink(unix_path, &id);
    }
    lua_pushnil(L);
    lua_pushfstring(L, "--pid-file %s: ", pid_path);
    mlua_push_pid_file_error(L, r, other);
    lua_concat(L, 2);
    lua_pushinteger(L, 2); /* a bad command line, as when one process checks it */
    return 3;
  }
  int code = 0;
  ml_worker_info_t w;
  unix_sock_t us = {ufd, unix_path, id, m};
  ml_workers_hooks_t hooks = {unix_stop, reopen_logs, &us};
  r = ml_workers_run(n, &m->log, &w, &code, &hooks);
  if (r == 1) {
    if (fd >= 0) close(fd);
    m->worker = w;
    m->worker_unix_fd = ufd; /* (its copy in this worker: ufd stays open in the supervisor) */
    m->worker_unix_path = unix_path;
    r = uv_loop_fork(m->loop);
    if (r < 0) {
      ml_log(&m->log, ML_LOG_ERROR, "worker %d: uv_loop_fork: %s", w.id, uv_strerror(r));
      _exit(1);
    }
    sigprocmask(SIG_SETMASK, &w.old_mask, NULL);
    lua_pushliteral(L, "worker");
    lua_pushinteger(L, w.id);
    lua_pushinteger(L, bound);
    return 3;
  }
  if (fd >= 0) close(fd);
  unix_stop(&us); /* (once the workers are gone, if no stop began before) */
  if (r < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start the workers: %s", mlua_err_string(r));
    return 2;
  }
  lua_pushliteral(L, "supervisor");
  lua_pushinteger(L, code);
  return 2;
}

void mlua_worker_listening(moonlet_t *m) {
  if (m->worker.count > 1) ml_workers_ready(&m->worker);
}

/* syntax: n = core.cpus() -- the CPUs this process may run on (its affinity mask counted) */
static int l_cpus(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

/* syntax: id, count, pid = core.worker() */
static int l_worker(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  lua_pushinteger(L, m->worker.id);
  lua_pushinteger(L, m->worker.count);
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 3;
}

void mlua_open_workers(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {
      {"fork_workers", l_fork_workers}, {"worker", l_worker}, {"cpus", l_cpus}, {NULL, NULL}};
  mlua_register(L, m, fns);
}
