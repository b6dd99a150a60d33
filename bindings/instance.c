/* bindings/instance.c: moonlet_t, the instance behind core/moonlet.h: its Lua state, loop, signals
 * and life cycle, plus the helpers every binding file uses (upvalue access, metatables, errors).
 *
 * Ownership: the instance owns its Lua state and, unless the host passed one, its loop. Every
 * binding function gets the instance as upvalue 1, never from a global. moonlet_free closes every
 * handle the instance opened, runs the loop until their close callbacks have run, frees the task
 * structs and only then closes the Lua state (so no __gc runs against freed C memory).
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "mlua.h"

#ifndef MOONLET_LUA_DIR
#define MOONLET_LUA_DIR "lua"
#endif

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

void mlua_new_metatable(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
  moonlet_t *m = lua_touserdata(L, lua_upvalueindex(1));
  luaL_newmetatable(L, name);
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  if (m) {
    mlua_register(L, m, methods);
  } else {
    luaL_register(L, NULL, methods);
  }
  lua_setfield(L, -2, "__index");
  if (gc) {
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
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
  default: return uv_strerror(e);
  }
}

int mlua_push_error(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, mlua_err_string(e));
  lua_pushstring(L, uv_err_name(e));
  return 3;
}

void mlua_res_link(moonlet_t *m, mlua_res_t *r, void (*close)(mlua_res_t *)) {
  r->close = close;
  r->prev = NULL;
  r->next = m->resources;
  if (m->resources) m->resources->prev = r;
  m->resources = r;
}

void mlua_res_unlink(moonlet_t *m, mlua_res_t *r) {
  if (r->prev) r->prev->next = r->next;
  else if (m->resources == r) m->resources = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
}

/* -- The core module ------------------------------------------------------------------------ */

static int l_set_exit_code(lua_State *L) {
  mlua_instance(L)->exit_code = (int)luaL_checkinteger(L, 1);
  return 0;
}

static int l_log(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  int level = (int)luaL_checkinteger(L, 1);
  const char *msg = luaL_checkstring(L, 2);
  ml_log(&m->log, level, "%s", msg);
  return 0;
}

static int l_set_log(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  if (!lua_isnil(L, 1)) {
    int lvl = ml_log_level_parse(luaL_checkstring(L, 1));
    if (lvl < 0) return luaL_argerror(L, 1, "unknown log level (error, warn, info, debug)");
    m->log.level = lvl;
  }
  if (!lua_isnoneornil(L, 2)) {
    m->log.access = lua_toboolean(L, 2);
    if (m->log.access) setvbuf(stdout, NULL, _IOLBF, 0);
  }
  return 0;
}

/* syntax: core.stop() -- graceful: servers finish their requests, then the loop stops */
static int l_stop(lua_State *L) {
  moonlet_stop(mlua_instance(L));
  return 0;
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
  for (mlua_res_t *r = m->resources; r; r = r->next) resources++;
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

int luaopen_moonlet_core(lua_State *L) {
  moonlet_t *m = lua_touserdata(L, lua_upvalueindex(1));
  static const luaL_Reg fns[] = {
      {"set_exit_code", l_set_exit_code}, {"log", l_log}, {"set_log", l_set_log},
      {"stop", l_stop}, {"halt", l_halt}, {"stats", l_stats}, {NULL, NULL}};
  lua_newtable(L);
  mlua_register(L, m, fns);
  lua_pushstring(L, MOONLET_VERSION);
  lua_setfield(L, -2, "version");
  mlua_open_time(L, m);
  mlua_open_task(L, m);
  mlua_open_http_server(L, m);
  mlua_open_fs(L, m);
  mlua_open_tcp(L, m);
  return 1;
}

/* -- Signals ------------------------------------------------------------------------------------ */

static void on_signal(uv_signal_t *h, int signum) {
  moonlet_t *m = h->data;
  if (signum == SIGHUP) return; /* reload: see the hot-reload issue */
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
  uv_signal_t *hs[] = {&m->sig_int, &m->sig_term, &m->sig_hup};
  int sigs[] = {SIGINT, SIGTERM, SIGHUP};
  for (int i = 0; i < 3; i++) {
    uv_signal_init(m->loop, hs[i]);
    hs[i]->data = m;
    uv_signal_start(hs[i], on_signal, sigs[i]);
    uv_unref((uv_handle_t *)hs[i]);
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

moonlet_t *moonlet_new(const moonlet_config_t *cfg) {
  moonlet_config_t defaults;
  if (!cfg) {
    moonlet_config_default(&defaults);
    cfg = &defaults;
  }
  moonlet_t *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  m->cfg = *cfg;
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
  m->L = luaL_newstate();
  if (!m->L) {
    if (m->owns_loop) uv_loop_close(&m->own_loop);
    free(m);
    return NULL;
  }
  lua_State *L = m->L;
  luaL_openlibs(L);
  set_path(L, cfg);
  lua_pushlightuserdata(L, &instance_key);
  lua_pushlightuserdata(L, m);
  lua_rawset(L, LUA_REGISTRYINDEX);
  mlua_sched_init(m);
  /* package.preload["moonlet.core"] */
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
  m->dispatch_ref = LUA_NOREF;
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

int moonlet_main(moonlet_t *m, int argc, char **argv) {
  lua_State *L = m->L;
  mlua_task_t *t = mlua_task_new(m);
  lua_getglobal(t->co, "require");
  lua_pushstring(t->co, "moonlet.cli");
  if (lua_pcall(t->co, 1, 1, 0) != 0) {
    ml_log(&m->log, ML_LOG_ERROR, "cannot load the framework: %s", lua_tostring(t->co, -1));
    lua_settop(t->co, 0);
    m->live_tasks--; /* never started */
    m->exit_code = 1;
    (void)L;
    return 1;
  }
  lua_getfield(t->co, -1, "main");
  lua_remove(t->co, -2);
  lua_newtable(t->co);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(t->co, argv[i]);
    lua_rawseti(t->co, -2, i);
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

int moonlet_step(moonlet_t *m, int timeout_ms) {
  (void)timeout_ms; /* the embedding issue adds a bounded wait */
  return uv_run(m->loop, UV_RUN_NOWAIT);
}

void moonlet_stop(moonlet_t *m) {
  if (m->stopping) return;
  m->stopping = 1;
  mlua_http_servers_stop(m);
}

static void close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

void moonlet_free(moonlet_t *m) {
  if (!m) return;
  mlua_http_servers_close(m);
  if (m->signals_on) {
    uv_close((uv_handle_t *)&m->sig_int, NULL);
    uv_close((uv_handle_t *)&m->sig_term, NULL);
    uv_close((uv_handle_t *)&m->sig_hup, NULL);
  }
  while (m->resources) { /* each unlinks itself and frees from its close callback */
    mlua_res_t *r = m->resources;
    mlua_res_unlink(m, r);
    r->close(r);
  }
  uv_run(m->loop, UV_RUN_NOWAIT); /* the close callbacks run, freeing what they own */
  if (m->owns_loop) {
    uv_walk(m->loop, close_walk, NULL); /* what is left: timers of parked tasks, ... */
    uv_run(m->loop, UV_RUN_DEFAULT);
  }
  mlua_sched_free(m);
  lua_close(m->L);
  if (m->owns_loop) uv_loop_close(&m->own_loop);
  free(m);
}
