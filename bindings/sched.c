/* bindings/sched.c: the coroutine scheduler. Every piece of Lua that may wait (a request handler, a
 * spawned function, the main script) runs as a task: a coroutine of the instance's main state.
 *
 * The rules (each binding that waits keeps them):
 * 1. A task is resumed only by the callback of the one wait it is parked in. A wait records the
 * task, starts its source (timer, read, write, thread-pool work) and then `return lua_yield(L, 0)`;
 * its callback clears the record, stops the other sources of the same wait (I/O or timeout: exactly
 *    one wins), pushes the results on t->co and calls mlua_task_resume. Results that allocate (a
 *    string, a table, a userdata) go through mlua_push_result or mlua_push_protected: a memory
 *    error raised on a parked coroutine would reach LuaJIT's panic.
 * 2. A task is pinned (registry ref on its coroutine) for the life of its struct; anything a wait
 *    lends to C (a string given to uv_write, the object it waits on) is pinned by that wait and
 *    unpinned on every path: success, error, timeout, cancel, close. Whoever starts a task may
 *    leave values under its function on its stack: they stay pinned until the task is released
 *    (after its `done` callback), out of the reach of its Lua code (the HTTP server pins each
 *    request's exchange so).
 * 3. A wait whose object closes wakes its task with nil, "closed": nothing is left parked forever.
 * 4. When a task ends (returned or raised) its `done` callback runs once, then the struct goes back
 *    to the pool. A coroutine that returned is reused for the next task (no allocation per
 *    request); one that raised is dead and is dropped.
 * 5. C that calls Lua code that may yield uses lua_resume through these functions, never lua_pcall.
 * 6. Every wait parks through mlua_task_wait with a cancel callback, so any parked task can be
 *    cancelled (moonlet task:cancel, timeout, any): the callback undoes the wait without resuming,
 *    then the task is resumed with CANCEL and its Lua wrapper raises moonlet.CANCELLED.
 * 7. A wait is armed only where its task can yield: mlua_check_yieldable refuses a call with a C
 *    function between it and the task (table.sort's comparator, require), before any source
 *    starts; mlua_task_wait undoes the wait through its cancel callback if one slips through.
 *    moonlet.gather and moonlet.any (lua/moonlet/task.lua) check the same before they park, and
 *    cancel the children they started when they cannot wait.
 * 8. No wait starts once moonlet_free has begun (m->tearing_down): mlua_check_yieldable, which
 *    every wait calls before it starts anything, raises.
 */
#include <stdlib.h>

#include "mlua.h"

static char tasks_key; /* registry[&tasks_key] = { [coroutine] = lightuserdata(task) } */
char mlua_cancel_key;

#define POOL_MAX 256

static void task_release(mlua_task_t *t, int reusable);

/* Runs under lua_pcall on a task's coroutine (mlua_task_push): calls the push function given as
 * light userdata and returns what it pushed. Made once (m->push_ref), so a call allocates nothing
 * of its own: lua_cpcall would make a closure per call. */
typedef struct {
  int (*push)(lua_State *co, void *ud);
  void *ud;
  int r; /* what push returned */
} task_push_t;

static int protected_push(lua_State *L);

static int task_push(lua_State *co) {
  task_push_t *a = lua_touserdata(co, 1);
  lua_pop(co, 1);
  a->r = a->push(co, a->ud);
  return a->r < 0 ? 0 : lua_gettop(co);
}

void mlua_sched_init(moonlet_t *m) {
  lua_State *L = m->L;
  lua_pushlightuserdata(L, &tasks_key);
  lua_newtable(L);
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_pushcfunction(L, task_push);
  m->push_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushcfunction(L, protected_push);
  m->protected_push_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

static void push_tasks(lua_State *L) {
  lua_pushlightuserdata(L, &tasks_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* Runs under lua_cpcall on the main state with the new task as light userdata: makes its coroutine,
 * pins it (t->co_ref) and records it in tasks. A memory error unwinds to that call; t->co_ref says
 * whether the pin was taken. */
static int new_coroutine(lua_State *L) {
  mlua_task_t *t = lua_touserdata(L, 1);
  lua_pop(L, 1);
  push_tasks(L);
  lua_State *co = lua_newthread(L);
  lua_pushvalue(L, -1);
  t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, t);
  lua_rawset(L, -3); /* tasks[co] = t */
  t->co = co;
  return 0;
}

/* A pooled task needs no allocation (the hot path: one per request). A new one is made under
 * lua_cpcall: it is called from libuv callbacks, where a memory error raised with no protected
 * call on the C stack would reach LuaJIT's panic and end the host. */
mlua_task_t *mlua_task_new(moonlet_t *m) {
  mlua_task_t *t = m->free_tasks;
  if (t) {
    m->free_tasks = t->next_free;
    m->free_task_count--;
  } else {
    lua_State *L = m->L;
    t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->m = m;
    t->co_ref = LUA_NOREF;
    int top = lua_gettop(L);
    if (lua_cpcall(L, new_coroutine, t) != 0) {
      lua_settop(L, top);
      if (t->co_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
      free(t);
      return NULL;
    }
  }
  t->done = NULL;
  t->done_ud = NULL;
  t->next_free = NULL;
  t->cancel = NULL;
  t->wait = NULL;
  t->request = m->running ? m->running->request : 0;
  m->live_tasks++;
  return t;
}

int mlua_task_push(mlua_task_t *t, int (*push)(lua_State *co, void *ud), void *ud) {
  lua_State *co = t->co;
  int top = lua_gettop(co);
  task_push_t a = {push, ud, 0};
  lua_rawgeti(co, LUA_REGISTRYINDEX, t->m->push_ref);
  lua_pushlightuserdata(co, &a);
  if (lua_pcall(co, 1, LUA_MULTRET, 0) != 0) {
    lua_settop(co, top);
    return UV_ENOMEM;
  }
  if (a.r < 0) lua_settop(co, top);
  return a.r;
}

void mlua_task_drop(mlua_task_t *t) { task_release(t, 1); }

mlua_task_t *mlua_task_at(lua_State *L, int idx) {
  if (idx < 0) idx = lua_gettop(L) + idx + 1;
  push_tasks(L);
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  mlua_task_t *t = lua_touserdata(L, -1);
  lua_pop(L, 2);
  return t;
}

/* The running task is the usual answer (every wait asks): m->running, when its coroutine is L. A
 * coroutine of the user's own inside a task is not one: the registry lookup says so. */
mlua_task_t *mlua_task_current(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  mlua_task_t *r = m ? m->running : NULL;
  if (r && r->co == L) return r;
  push_tasks(L);
  lua_pushthread(L);
  lua_rawget(L, -2);
  mlua_task_t *t = lua_touserdata(L, -1);
  lua_pop(L, 2);
  return t;
}

void mlua_task_unwait(mlua_task_t *t) {
  if (!t) return;
  t->cancel = NULL;
  t->wait = NULL;
}

void mlua_check_yieldable(lua_State *L, mlua_task_t *t) {
  if (!t)
    luaL_error(L, "moonlet: I/O outside a moonlet task (a coroutine of your own cannot wait)");
  if (!lua_isyieldable(L)) luaL_error(L, MLUA_NOT_YIELDABLE);
  /* moonlet_free has drained the instance's resources: a wait started now (by a handler its
   * connection's close woke) would outlive the instance on a host's loop (rule 8) */
  if (t->m->tearing_down) luaL_error(L, "moonlet: the instance is being freed: no new wait");
}

static void task_release(mlua_task_t *t, int reusable) {
  moonlet_t *m = t->m;
  m->live_tasks--;
  if (reusable && m->free_task_count < POOL_MAX) {
    lua_settop(t->co, 0);
    t->next_free = m->free_tasks;
    m->free_tasks = t;
    m->free_task_count++;
    return;
  }
  lua_State *L = m->L;
  push_tasks(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->co_ref);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
  free(t);
}

int mlua_task_wait(lua_State *L, mlua_task_t *t, mlua_cancel_cb cancel, void *wait) {
  if (!lua_isyieldable(L)) { /* the yield would raise and leave the wait armed: undo it first */
    if (cancel) cancel(t, wait);
    return luaL_error(L, MLUA_NOT_YIELDABLE);
  }
  t->cancel = cancel;
  t->wait = wait;
  return lua_yield(L, 0);
}

int mlua_task_cancel(mlua_task_t *t) {
  if (t->resuming || !t->cancel || t->m->tearing_down) return 0;
  mlua_cancel_cb cancel = t->cancel;
  void *wait = t->wait;
  t->cancel = NULL;
  t->wait = NULL;
  cancel(t, wait);
  lua_pushlightuserdata(t->co, &mlua_cancel_key);
  mlua_task_resume(t, 1);
  return 1;
}

/* Runs t until it waits or ends: 1 when it waits (t is still live), 0 when it ended (t may be
 * freed already). */
/* A run of ns nanoseconds without yielding, past the instance's warn_blocking: the loop served
 * nothing meanwhile. Logged with where the task yielded (the slow part is just before), or that it
 * ran to its end (asyncio's debug mode reports slow callbacks alike). */
static void warn_blocking(moonlet_t *m, lua_State *co, int st, uint64_t ns) {
  lua_State *L = m->L;
  if (st == LUA_YIELD)
    luaL_traceback(L, co, NULL, 0);
  else
    lua_pushliteral(L, "(it ran to its end)");
  ml_log(&m->log, ML_LOG_WARN,
         "a task ran %.3f s without yielding: the loop served nothing meanwhile (move CPU-bound "
         "work to moonlet.work); it yielded at:\n%s",
         (double)ns / 1e9, lua_tostring(L, -1));
  lua_pop(L, 1);
}

typedef struct {
  lua_State *co; /* a dead coroutine, its error on top */
  const char *msg;
} traceback_t;

/* Runs under lua_cpcall on the main state: pushes msg and co's traceback onto co. A memory error
 * here (a task that failed because memory ran out) unwinds to that call, not to LuaJIT's panic. */
static int push_traceback(lua_State *L) {
  traceback_t *a = lua_touserdata(L, 1);
  lua_pop(L, 1);
  luaL_traceback(L, a->co, a->msg ? a->msg : "(error object is not a string)", 0);
  lua_xmove(L, a->co, 1);
  return 0;
}

static int run(mlua_task_t *t, int nargs) {
  lua_State *co = t->co;
  if (t->m->freeing) return 0; /* the instance is being freed: nothing runs any more */
  t->cancel = NULL;
  t->wait = NULL;
  t->resuming = 1;
  moonlet_t *m = t->m;
  mlua_task_t *outer = m->running; /* a task may start or wake another: runs nest */
  m->running = t;
  m->running_request = t->request;
  m->runs++;
  /* the outermost run is timed when asked: nested runs are part of it */
  uint64_t t0 = m->warn_blocking_ns && !m->run_depth ? uv_hrtime() : 0;
  m->run_depth++;
  int st = lua_resume(co, nargs);
  m->run_depth--;
  if (t0) {
    uint64_t ns = uv_hrtime() - t0;
    if (ns >= m->warn_blocking_ns) warn_blocking(m, co, st, ns);
  }
  m->running = outer;
  m->running_request = outer ? outer->request : 0;
  t->resuming = 0;
  if (st == LUA_YIELD) return 1;
  int ok = st == 0;
  if (!ok) { /* message + traceback of the dead coroutine */
    traceback_t a = {co, lua_tostring(co, -1)};
    if (lua_cpcall(m->L, push_traceback, &a) != 0) { /* out of memory: the message alone */
      if (a.msg)
        lua_pop(m->L, 1);
      else
        lua_xmove(m->L, co, 1); /* the cpcall's error, interned already: nothing to allocate */
    }
  }
  if (t->done) {
    t->done(t, ok, t->done_ud);
  } else if (!ok) {
    ml_log(&t->m->log, ML_LOG_ERROR, "task failed: %s", lua_tostring(co, -1));
  }
  task_release(t, ok);
  return 0;
}

/* -- Results pushed from callbacks --------------------------------------------------------------
 */

typedef struct {
  lua_State *co;
  int (*push)(lua_State *L, void *ud);
  void *ud;
  int n; /* results moved to co */
} protected_push_t;

/* Runs under lua_pcall on the main state (made once, m->protected_push_ref: lua_cpcall would make
 * a closure per call): a memory error raised here unwinds to that call. */
static int protected_push(lua_State *L) {
  protected_push_t *a = lua_touserdata(L, 1);
  lua_pop(L, 1);
  int n = a->push(L, a->ud);
  /* lua_xmove does not grow the target's stack (a work job may return thousands of values); a
   * few fit without (LUA_MINSTACK, as when pushed on co directly) */
  if (n > LUA_MINSTACK && !lua_checkstack(a->co, n)) return luaL_error(L, "too many results");
  lua_xmove(L, a->co, n);
  a->n = n;
  return 0;
}

int mlua_push_protected(moonlet_t *m, lua_State *co, int (*push)(lua_State *L, void *ud),
                        void *ud) {
  protected_push_t a = {co, push, ud, 0};
  lua_State *L = m->L;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->protected_push_ref);
  lua_pushlightuserdata(L, &a);
  if (lua_pcall(L, 1, 0, 0) == 0) return a.n;
  /* the error object (LuaJIT's "not enough memory" for LUA_ERRMEM) is interned already */
  lua_pushnil(co);
  lua_xmove(L, co, 1);
  if (!lua_isstring(co, -1)) {
    lua_pop(co, 1);
    lua_pushliteral(co, "not enough memory");
  }
  lua_settop(L, top);
  return 2;
}

typedef struct {
  const char *msg, *detail;
} fail_t;

static int push_fail(lua_State *L, void *ud) {
  fail_t *a = ud;
  lua_pushnil(L);
  lua_pushstring(L, a->msg);
  if (!a->detail) return 2;
  lua_pushstring(L, a->detail);
  return 3;
}

int mlua_push_fail(moonlet_t *m, lua_State *co, const char *msg, const char *detail) {
  fail_t a = {msg, detail};
  return mlua_push_result(m, co, push_fail, &a);
}

int mlua_push_error_to(moonlet_t *m, lua_State *co, int e) {
  return mlua_push_fail(m, co, mlua_err_string(e), uv_err_name(e));
}

int mlua_task_start(mlua_task_t *t, int nargs) { return run(t, nargs); }

void mlua_task_resume(mlua_task_t *t, int nargs) { run(t, nargs); }

/* Takes every task struct, parked or pooled, out of the Lua state's reach: returns them in a
 * malloc'd array (NULL-terminated) that mlua_sched_free_list frees once the state is closed. From
 * here on no task is resumed (m->freeing): a __gc run by lua_close that would wake a parked task
 * (a socket closed by its finalizer) finds the struct still valid and does nothing. */
mlua_task_t **mlua_sched_detach(moonlet_t *m) {
  lua_State *L = m->L;
  size_t n = 0, cap = 64;
  mlua_task_t **list = malloc(cap * sizeof *list);
  m->freeing = 1;
  push_tasks(L);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (list && n + 1 >= cap) {
      mlua_task_t **more = realloc(list, (cap *= 2) * sizeof *list);
      if (!more) free(list);
      list = more;
    }
    if (list) list[n++] = lua_touserdata(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  if (list) list[n] = NULL;
  m->free_tasks = NULL;
  m->free_task_count = 0;
  return list;
}

void mlua_sched_free_list(mlua_task_t **list) {
  if (!list) return;
  for (mlua_task_t **t = list; *t; t++)
    free(*t);
  free(list);
}
