/* bindings/time.c: moonlet.now() and moonlet.time(). moonlet.sleep is a park with a timeout and
 * lives in task.c with the other waits on time.
 */
#include "mlua.h"

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
  static const luaL_Reg fns[] = {{"now", l_now}, {"time", l_time}, {NULL, NULL}};
  mlua_register(L, m, fns);
}
