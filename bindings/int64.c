/* bindings/int64.c: LuaJIT's 64-bit integers (`1LL`, `2ULL`, ffi.new("int64_t", ...): int64_t and
 * uint64_t cdata) as the databases' parameters take them. The Lua/C API has no accessor for a
 * cdata, so their value is read off the text tostring gives them ("-5LL",
 * "18446744073709551615ULL"), which no other cdata has (others print as "cdata<int>: 0x...").
 */
#include <string.h>

#include "mlua.h"

#define MLUA_TCDATA 10 /* lua_type of a cdata in LuaJIT (not named by its lua.h) */

size_t mlua_int64_text(lua_State *L, int idx, char buf[24], int *is_unsigned) {
  if (lua_type(L, idx) != MLUA_TCDATA) return 0;
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
  lua_getfield(L, LUA_GLOBALSINDEX, "tostring");
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != 0) { /* a tostring of the app's that raises: no integer then, and */
    lua_pop(L, 1);                  /* the caller's "cannot bind" (nothing it holds is lost) */
    return 0;
  }
  size_t n = 0, digits = 0;
  const char *s = lua_tolstring(L, -1, &n);
  if (s && n > 0 && s[0] == '-') digits = 1;
  while (s && digits < n && s[digits] >= '0' && s[digits] <= '9')
    digits++;
  size_t len = 0;
  *is_unsigned = s && n - digits == 3 && memcmp(s + digits, "ULL", 3) == 0;
  int is_signed = s && n - digits == 2 && memcmp(s + digits, "LL", 2) == 0;
  if ((*is_unsigned || is_signed) && digits > (s[0] == '-') && digits < 24) {
    memcpy(buf, s, digits);
    buf[digits] = '\0';
    len = digits;
  }
  lua_pop(L, 1);
  return len;
}
