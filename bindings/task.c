/* bindings/task.c: spawning tasks, cancelling them, and the park/unpark primitive the Lua side
 * builds joins, events, queues and semaphores on.
 *
 * core.spawn(fn, ...) runs fn in a new task at once, until it first waits; its errors are logged by
 * the scheduler. core.park(timeout) parks the running task until core.unpark(co, ...) wakes it with
 * those values, or until the timeout (then it returns nil, "timeout"). unpark resumes only a task
 * that is parked through park (rule 1 of sched.c) and returns false for any other, so a stale
 * wake-up is harmless. A park is known by its wait: t->cancel is park_cancel, and t->wait is NULL
 * (no timeout: core.park(nil)) or a park_t that tells whether unpark may end it (a sleep's may
 * not). A park with a timeout owns a timer (park_t, a resource of the instance), closed on every
 * path: unpark, timeout, cancel, instance freed.
 *
 * A park of 0 seconds (moonlet.sleep(0), ngx.sleep(0), q:get(0)...) lets the loop poll for I/O
 * once before it ends: its timer starts only in the next prepare phase (yield_t below), just
 * before the poll. Started at once, a 0 ms timer made in a timer callback is due at once, and
 * libuv (before 1.45) runs it in the same pass over the timers: a task looping on sleep(0), or on
 * q:get(0) for what a socket brings, would then run forever without the loop ever polling.
 */
#include <stdlib.h>

#include "mlua.h"

/* how deep spawned tasks may nest on the C stack (each run is a lua_resume inside the last) */
#define MAX_NESTED_RUNS 200

typedef struct park_s {
  mlua_res_t res;
  uv_timer_t timer;
  mlua_task_t *task; /* NULL once woken or cancelled */
  moonlet_t *m;
  int wakeable;                /* core.park's (unpark may end it), not moonlet.sleep's */
  struct park_s *next, *prev;  /* a 0 s park waiting for the prepare phase (yield_t.head) */
  struct mlua_yield_s *queued; /* that yield_t while it waits there, else NULL */
} park_t;

/* The instance's 0 s parks whose timers start in the next prepare phase; made when core opens (the
 * instance's `yield`), freed with the instance through its resources. */
typedef struct mlua_yield_s {
  mlua_res_t res;
  uv_prepare_t prepare; /* active (and keeping the loop alive) while head is not NULL */
  moonlet_t *m;
  park_t *head;
} yield_t;

static void park_closed(uv_handle_t *h) { free(h->data); }

static void unqueue(park_t *p) {
  yield_t *y = p->queued;
  if (!y) return;
  if (p->prev)
    p->prev->next = p->next;
  else
    y->head = p->next;
  if (p->next) p->next->prev = p->prev;
  p->next = p->prev = NULL;
  p->queued = NULL;
  if (!y->head) uv_prepare_stop(&y->prepare);
}

/* Ends a timed park: unlinks and closes its timer; the struct goes in the close callback. */
static void park_end(park_t *p) {
  p->task = NULL;
  unqueue(p);
  mlua_res_unlink(p->m, &p->res);
  uv_close((uv_handle_t *)&p->timer, park_closed);
}

static void park_timeout(uv_timer_t *h);

/* The prepare phase, just before the loop polls: the queued 0 s parks' timers start, due at once,
 * so they end in the next pass over the timers, after this poll. */
static void yield_prepare(uv_prepare_t *h) {
  yield_t *y = h->data;
  while (y->head) {
    park_t *p = y->head;
    unqueue(p);
    uv_timer_start(&p->timer, park_timeout, 0, 0);
  }
}

static void yield_closed(uv_handle_t *h) { free(h->data); }

/* The instance is being freed: the queued parks (closed as resources of their own) forget it. */
static void yield_res_close(mlua_res_t *r) {
  yield_t *y = (yield_t *)r;
  while (y->head)
    unqueue(y->head);
  y->m->yield = NULL;
  uv_close((uv_handle_t *)&y->prepare, yield_closed);
}

/* The instance's yield_t, made when core opens (so that it is in every leak check's baseline of
 * core.stats(), not a resource and a handle more after the first 0 s park), else on first use.
 * Returns NULL when out of memory. */
static yield_t *yield_get(moonlet_t *m) {
  yield_t *y = m->yield;
  if (y) return y;
  y = calloc(1, sizeof *y);
  if (!y) return NULL;
  y->m = m;
  uv_prepare_init(m->loop, &y->prepare);
  y->prepare.data = y;
  mlua_res_link(m, &y->res, yield_res_close);
  m->yield = y;
  return y;
}

/* Queues p, a park of 0 s, for the next prepare phase. Returns 0 or UV_ENOMEM. */
static int queue_zero(park_t *p) {
  yield_t *y = yield_get(p->m);
  if (!y) return UV_ENOMEM;
  p->queued = y;
  p->prev = NULL;
  p->next = y->head;
  if (y->head) y->head->prev = p;
  y->head = p;
  uv_prepare_start(&y->prepare, yield_prepare);
  return 0;
}

/* The instance is being freed: the park goes, and its task (still parked: tasks may run during
 * teardown, and one may call core.unpark) forgets the wait, so nothing reaches the freed struct. */
static void park_res_close(mlua_res_t *r) {
  park_t *p = (park_t *)r;
  mlua_task_t *t = p->task;
  if (t && t->wait == p) mlua_task_unwait(t);
  p->task = NULL;
  unqueue(p);
  uv_close((uv_handle_t *)&p->timer, park_closed);
}

static void park_timeout(uv_timer_t *h) {
  park_t *p = h->data;
  mlua_task_t *t = p->task;
  park_end(p);
  mlua_task_resume(t, mlua_push_error_to(t->m, t->co, UV_ETIMEDOUT));
}

static void park_cancel(mlua_task_t *t, void *wait) {
  (void)t;
  if (wait) park_end(wait);
}

/* Parks t; with ms >= 0 a timer ends the park with nil, "timeout". `wakeable`: unpark may end it.
 */
static int park(lua_State *L, mlua_task_t *t, double secs, int wakeable) {
  moonlet_t *m = t->m;
  park_t *p = NULL;
  if (secs >= 0) {
    p = calloc(1, sizeof *p);
    if (!p) return luaL_error(L, "moonlet: out of memory");
    p->task = t;
    p->m = m;
    p->wakeable = wakeable;
    uv_timer_init(m->loop, &p->timer);
    p->timer.data = p;
    uint64_t ms = mlua_ms(secs); /* (math.huge: clamped, as good as never) */
    if (ms == 0 && queue_zero(p) == 0) {
      /* its timer starts in the prepare phase: the loop polls before the park ends (top) */
    } else {
      uv_update_time(m->loop); /* the loop's clock is from the start of this iteration */
      uv_timer_start(&p->timer, park_timeout, ms, 0);
    }
    mlua_res_link(m, &p->res, park_res_close);
  }
  return mlua_task_wait(L, t, park_cancel, p);
}

/* syntax: moonlet.sleep(seconds) -- yields; other tasks run meanwhile */
int mlua_sleep(lua_State *L) {
  double secs = luaL_checknumber(L, 1);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  return park(L, t, !(secs > 0) ? 0 : secs, 0); /* NaN too: a sleep always has its timer */
}

/* syntax: ... = core.park(timeout) -- what core.unpark passes, or nil, "timeout" */
static int l_park(lua_State *L) {
  double secs = lua_isnoneornil(L, 1) ? -1 : luaL_checknumber(L, 1);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  return park(L, t, secs < 0 && !lua_isnoneornil(L, 1) ? 0 : secs, 1);
}

/* syntax: ok = core.unpark(co, ...) */
static int l_unpark(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  mlua_task_t *t = mlua_task_at(L, 1);
  park_t *p = t && t->cancel == park_cancel ? t->wait : NULL;
  if (!t || t->cancel != park_cancel || (p && !p->wakeable)) { /* not in core.park (any more) */
    lua_pushboolean(L, 0);
    return 1;
  }
  mlua_task_unwait(t);
  if (p) park_end(p);
  int n = lua_gettop(L) - 1;
  lua_xmove(L, t->co, n);
  mlua_task_resume(t, n);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: co = core.spawn(fn, ...) -- runs fn(...) in a new task until it first waits; co is the
 * task's coroutine while it is still running (for core.cancel), nil when it ended already. A
 * coroutine that ended is reused by the next task: a caller that keeps co must forget it when the
 * task ends (the end of fn is where to do it). */
static int l_spawn(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  /* a spawned function runs at once, nested on the C stack: one that spawns itself without end
   * would overflow the C stack (a crash) long before Lua's stack check; it is an error instead */
  if (m->run_depth >= MAX_NESTED_RUNS)
    return luaL_error(L,
                      "moonlet.spawn: tasks started inside each other %d deep (a task that "
                      "starts itself without end?)",
                      MAX_NESTED_RUNS);
  int n = lua_gettop(L);
  mlua_task_t *t = mlua_task_new(m);
  if (!t) return luaL_error(L, "not enough memory");
  lua_State *co = t->co;
  lua_xmove(L, co, n);
  lua_pushthread(co); /* kept on our (now empty) stack: t may be freed when start returns */
  lua_xmove(co, L, 1);
  return mlua_task_start(t, n - 1); /* 1: co, still running; 0: nothing */
}

/* syntax: ok = core.cancel(co) -- false when the task is running or not parked */
static int l_cancel(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  mlua_task_t *t = mlua_task_at(L, 1);
  lua_pushboolean(L, t && mlua_task_cancel(t));
  return 1;
}

/* syntax: co = core.running() -- the running task's coroutine, or nil outside a task */
static int l_running(lua_State *L) {
  if (!mlua_task_current(L)) return 0;
  lua_pushthread(L);
  return 1;
}

/* syntax: ... = core.call_unrecorded(f, ...) -- f(...), called from C.
 * For LuaJIT's trace recorder this is a C function: a trace that reaches it stitches around it
 * instead of recording f. The framework calls the few functions LuaJIT cannot compile (making a
 * closure, FNEW) through it, so that they do not abort, and at last blacklist, the trace of a hot
 * path such as the request dispatcher. f runs to its end: it must not wait (a moonlet wait inside
 * raises "cannot wait here", rule 7 of sched.c, before it arms anything). */
static int l_call_unrecorded(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

void mlua_open_task(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"spawn", l_spawn},
                                 {"park", l_park},
                                 {"unpark", l_unpark},
                                 {"cancel", l_cancel},
                                 {"running", l_running},
                                 {"sleep", mlua_sleep},
                                 {"call_unrecorded", l_call_unrecorded},
                                 {NULL, NULL}};
  mlua_register(L, m, fns);
  yield_get(m); /* (out of memory: made on first use) */
  lua_pushlightuserdata(L, &mlua_cancel_key);
  lua_setfield(L, -2, "CANCEL");
  /* core.running_request: the address of a double, the HTTP request the running task works for
   * (mlua_task_t.request: a handler's task's own, inherited by every task started from it; 0:
   * none), for `ffi.cast("const double *", core.running_request)[0]` */
  lua_pushlightuserdata(L, &m->running_request);
  lua_setfield(L, -2, "running_request");
  lua_pushlightuserdata(L, &m->runs); /* core.runs: the address of m->runs, read the same way */
  lua_setfield(L, -2, "runs");
  lua_pushliteral(L, MLUA_NOT_YIELDABLE); /* task.lua's gather and any raise it too */
  lua_setfield(L, -2, "NOT_YIELDABLE");
}
