/* bindings/task.c: spawning tasks and the park/unpark primitive the Lua side builds joins, events
 * and queues on.
 *
 * core.spawn(fn, ...) runs fn in a new task at once, until it first waits; its errors are logged by
 * the scheduler. core.park() parks the running task until core.unpark(co, ...) wakes it with those
 * values: unpark resumes only a task that is parked (rule 1 of sched.c), and returns false for any
 * other, so a stale wake-up is harmless.
 */
#include "mlua.h"

static char parked_key; /* registry[&parked_key] = { [coroutine] = true } while parked */

static void push_parked(lua_State *L) {
  lua_pushlightuserdata(L, &parked_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* syntax: core.spawn(fn, ...) */
static int l_spawn(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  int n = lua_gettop(L);
  mlua_task_t *t = mlua_task_new(m);
  lua_xmove(L, t->co, n);
  mlua_task_start(t, n - 1);
  return 0;
}

/* syntax: ... = core.park() -- returns what core.unpark passes */
static int l_park(lua_State *L) {
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  push_parked(L);
  lua_pushthread(L);
  lua_pushboolean(L, 1);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  return lua_yield(L, 0);
}

/* syntax: ok = core.unpark(co, ...) */
static int l_unpark(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  lua_State *co = lua_tothread(L, 1);
  push_parked(L);
  lua_pushvalue(L, 1);
  lua_rawget(L, -2);
  int parked = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (!parked) {
    lua_pop(L, 1);
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushvalue(L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  mlua_task_t *t = mlua_task_at(L, 1);
  if (!t) return luaL_error(L, "moonlet: unpark of a coroutine that is no task");
  int n = lua_gettop(L) - 1;
  lua_xmove(L, co, n);
  mlua_task_resume(t, n);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: co = core.running() -- the running task's coroutine, or nil outside a task */
static int l_running(lua_State *L) {
  if (!mlua_task_current(L)) return 0;
  lua_pushthread(L);
  return 1;
}

void mlua_open_task(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {
      {"spawn", l_spawn}, {"park", l_park}, {"unpark", l_unpark}, {"running", l_running},
      {NULL, NULL}};
  mlua_register(L, m, fns);
  lua_pushlightuserdata(L, &parked_key);
  lua_newtable(L);
  lua_rawset(L, LUA_REGISTRYINDEX);
}
