/* bindings/fswatch.c: core.fswatch, the Lua face of core/fswatch.c, used by lua/moonlet/reload.lua
 * to hear about changes to an app's files.
 *
 *   w = core.fswatch(fn, debounce_seconds)   fn() runs in a new task after each burst of changes
 *   ok, err = w:set({ path, ... })           the files watched from now on (replaces the set)
 *   files, dirs = w:count()
 *   w:close()                                no call of fn after this; __gc and moonlet_free close
 * too
 *
 * Ownership: a watch_t is C memory, a resource of the instance (moonlet_free closes it); the Lua
 * userdata holds a pointer to it that is NULLed when it closes. fn is pinned by a registry ref
 * until the close. The core watcher frees itself once its handles are closed; the watch_t goes at
 * once, because the core never calls back after ml_fswatch_close.
 */
#include <stdlib.h>

#include "../core/fswatch.h"
#include "mlua.h"

#define FSWATCH_MT "moonlet.fswatch"

typedef struct watch_s {
  mlua_res_t res;
  moonlet_t *m;
  ml_fswatch_t *fw;
  int fn_ref;           /* the Lua function run on each change */
  struct watch_s **box; /* the Lua box pointing at us, NULLed at the close */
} watch_t;

static void watch_close(watch_t *w) {
  mlua_res_unlink(w->m, &w->res); /* a no-op when moonlet_free unlinked it already */
  ml_fswatch_close(w->fw);
  luaL_unref(w->m->L, LUA_REGISTRYINDEX, w->fn_ref);
  if (w->box) *w->box = NULL;
  free(w);
}

static void watch_res_close(mlua_res_t *r) { watch_close((watch_t *)r); }

/* A burst of changes is over: fn runs in a task of its own (its errors are logged by the
 * scheduler); it may set the files anew or close the watcher. */
static void on_change(ml_fswatch_t *fw, void *ud) {
  watch_t *w = ud;
  (void)fw;
  mlua_task_t *t = mlua_task_new(w->m);
  if (!t) { /* out of memory (the host's budget): this change is dropped, the next one runs */
    ml_log(&w->m->log, ML_LOG_ERROR, "fswatch: out of memory: a change dropped");
    return;
  }
  lua_rawgeti(t->co, LUA_REGISTRYINDEX, w->fn_ref); /* (allocates nothing) */
  mlua_task_start(t, 0);
}

/* syntax: w = core.fswatch(fn, debounce_seconds) */
static int l_fswatch(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  double secs = luaL_optnumber(L, 2, 0.05);
  if (secs < 0) return luaL_argerror(L, 2, "debounce must be >= 0");
  watch_t **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  luaL_getmetatable(L, FSWATCH_MT);
  lua_setmetatable(L, -2);
  watch_t *w = calloc(1, sizeof *w);
  if (!w) return luaL_error(L, "moonlet: out of memory");
  w->fw = ml_fswatch_new(m->loop, mlua_ms(secs), on_change, w);
  if (!w->fw) {
    free(w);
    return luaL_error(L, "moonlet: out of memory");
  }
  w->m = m;
  lua_pushvalue(L, 1);
  w->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  w->box = box;
  *box = w;
  mlua_res_link(m, &w->res, watch_res_close);
  return 1;
}

static watch_t *check_watch(lua_State *L) {
  watch_t **box = luaL_checkudata(L, 1, FSWATCH_MT);
  return *box;
}

/* syntax: ok, err = w:set({ path, ... }) -- nil, err when a path could not be watched (the others
 * are) */
static int w_set(lua_State *L) {
  watch_t *w = check_watch(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (!w) return mlua_push_error(L, UV_EPIPE);
  size_t n = lua_objlen(L, 2);
  const char **paths = calloc(n ? n : 1, sizeof *paths);
  if (!paths) return luaL_error(L, "moonlet: out of memory");
  for (size_t i = 0; i < n; i++) { /* the strings stay in the table, alive during the call */
    lua_rawgeti(L, 2, (int)i + 1);
    paths[i] = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (!paths[i]) {
      free(paths);
      return luaL_argerror(L, 2, "paths must be strings");
    }
  }
  int r = ml_fswatch_set(w->fw, paths, n);
  free(paths);
  if (r < 0) return mlua_push_error(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: files, dirs = w:count() */
static int w_count(lua_State *L) {
  watch_t *w = check_watch(L);
  size_t dirs = 0, files = w ? ml_fswatch_count(w->fw, &dirs) : 0;
  lua_pushinteger(L, (lua_Integer)files);
  lua_pushinteger(L, (lua_Integer)dirs);
  return 2;
}

/* syntax: w:close() */
static int w_close(lua_State *L) {
  watch_t *w = check_watch(L);
  if (w) watch_close(w);
  return 0;
}

static int w_gc(lua_State *L) {
  watch_t **box = luaL_checkudata(L, 1, FSWATCH_MT);
  if (*box) watch_close(*box);
  return 0;
}

void mlua_open_fswatch(lua_State *L, moonlet_t *m) {
  static const luaL_Reg wm[] = {
      {"set", w_set}, {"count", w_count}, {"close", w_close}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"fswatch", l_fswatch}, {NULL, NULL}};
  luaL_newmetatable(L, FSWATCH_MT);
  lua_pushliteral(L, FSWATCH_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, wm);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, w_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
