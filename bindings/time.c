/* bindings/time.c: moonlet.now() and moonlet.sleep(seconds).
 *
 * A sleep is a wait (see sched.c): a malloc'd struct with a timer, linked in the instance's
 * resources. The timer callback resumes the task and closes the timer; the struct is freed in the
 * close callback. If the instance is freed while a task sleeps, the timer is closed and the task is
 * never resumed (its coroutine goes with the Lua state).
 */
#include <stdlib.h>

#include "mlua.h"

typedef struct {
  mlua_res_t res;
  uv_timer_t timer;
  mlua_task_t *task; /* the sleeping task, NULL once woken */
  moonlet_t *m;
} sleep_t;

static void sleep_closed(uv_handle_t *h) { free(h->data); }

static void sleep_close(mlua_res_t *r) {
  sleep_t *s = (sleep_t *)r;
  s->task = NULL;
  uv_close((uv_handle_t *)&s->timer, sleep_closed);
}

static void sleep_cb(uv_timer_t *h) {
  sleep_t *s = h->data;
  mlua_task_t *t = s->task;
  s->task = NULL;
  mlua_res_unlink(s->m, &s->res);
  uv_close((uv_handle_t *)&s->timer, sleep_closed);
  if (t) mlua_task_resume(t, 0);
}

/* syntax: moonlet.sleep(seconds) -- yields; other tasks run meanwhile */
static int l_sleep(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  double secs = luaL_checknumber(L, 1);
  if (secs < 0) secs = 0;
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  sleep_t *s = malloc(sizeof *s);
  if (!s) return luaL_error(L, "moonlet: out of memory");
  s->task = t;
  s->m = m;
  uv_timer_init(m->loop, &s->timer);
  s->timer.data = s;
  uv_update_time(m->loop); /* the loop's clock is from the start of this iteration */
  uv_timer_start(&s->timer, sleep_cb, (uint64_t)(secs * 1000.0 + 0.5), 0);
  mlua_res_link(m, &s->res, sleep_close);
  return lua_yield(L, 0);
}

/* syntax: t = moonlet.now() -- seconds, with sub-millisecond precision, from a monotonic clock */
static int l_now(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

/* syntax: t = moonlet.time() -- wall-clock seconds since the epoch */
static int l_time(lua_State *L) {
  uv_timeval64_t tv;
  uv_gettimeofday(&tv);
  lua_pushnumber(L, (double)tv.tv_sec + (double)tv.tv_usec / 1e6);
  return 1;
}

void mlua_open_time(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"sleep", l_sleep}, {"now", l_now}, {"time", l_time}, {NULL, NULL}};
  mlua_register(L, m, fns);
}
