/* bindings/time.c: moonlet.now() and moonlet.time(). moonlet.sleep is a park with a timeout and
 * lives in task.c with the other waits on time.
 */
#include <stdint.h>

#include "mlua.h"

/* moonlet.now() itself (lua/moonlet.lua) calls this through the FFI: a JIT trace calls it in place,
 * where a call of l_now would end the trace (LuaJIT stitches around C functions) */
static double now_seconds(void) { return (double)uv_hrtime() / 1e9; }

/* syntax: t = core.now() -- seconds, with sub-millisecond precision, from a monotonic clock */
static int l_now(lua_State *L) {
  lua_pushnumber(L, now_seconds());
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
  lua_pushlightuserdata(L, (void *)(uintptr_t)now_seconds); /* core.now_fn: double (*)(void) */
  lua_setfield(L, -2, "now_fn");
}
