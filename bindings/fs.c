/* bindings/fs.c: the file-system calls the framework needs at start-up and for static files:
 * stat, realpath and whole-file reads. They are synchronous (local disk, like nginx's open and
 * stat); the asynchronous moonlet.fs of the async-I/O issue runs on the thread pool instead.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "mlua.h"

/* syntax: info, err = core.stat(path) -- { size, mtime, type = "file"|"directory"|"other", ino } */
static int l_stat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct stat st;
  if (stat(path, &st) != 0) return mlua_push_error(L, uv_translate_sys_error(errno));
  lua_createtable(L, 0, 4);
  lua_pushnumber(L, (double)st.st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (double)st.st_mtime);
  lua_setfield(L, -2, "mtime");
  lua_pushnumber(L, (double)st.st_ino);
  lua_setfield(L, -2, "ino");
  lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "directory" : "other");
  lua_setfield(L, -2, "type");
  return 1;
}

/* syntax: resolved, err = core.realpath(path) -- symlinks and dots resolved */
static int l_realpath(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char buf[PATH_MAX];
  if (!realpath(path, buf)) return mlua_push_error(L, uv_translate_sys_error(errno));
  lua_pushstring(L, buf);
  return 1;
}

void mlua_open_fs(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"stat", l_stat}, {"realpath", l_realpath}, {NULL, NULL}};
  mlua_register(L, m, fns);
}
