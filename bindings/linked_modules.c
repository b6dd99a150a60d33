/* Lua C modules linked into the binary itself. A fully static moonlet (`make static`) cannot
 * dlopen a C module (a static executable exports no lua_* symbols to it), so the modules the
 * framework needs are linked in and registered in package.preload here. The references are weak:
 * in the dynamic build they stay NULL and `require "cjson"` loads Debian's cjson.so as usual. */
#include "mlua.h"

#include <lauxlib.h>

extern int luaopen_cjson(lua_State *L) __attribute__((weak));
extern int luaopen_cjson_safe(lua_State *L) __attribute__((weak));

void mlua_preload_linked_modules(lua_State *L) {
  const struct {
    const char *name;
    lua_CFunction open;
  } mods[] = {{"cjson", luaopen_cjson}, {"cjson.safe", luaopen_cjson_safe}};
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
    if (!mods[i].open) continue;
    lua_pushcfunction(L, mods[i].open);
    lua_setfield(L, -2, mods[i].name);
  }
  lua_pop(L, 2);
}
