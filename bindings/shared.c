/* bindings/shared.c: moonlet.shared's dictionaries for Lua (lua/moonlet/shared.lua is the module):
 * core.shared_open(name, size) finds or makes the dictionary in the instance's shared memory arena
 * (core/shm.c, core/shdict.c) and returns it as a userdata whose methods are OpenResty's
 * lua_shared_dict's: get, get_stale, set, safe_set, add, safe_add, replace, delete, incr, lpush,
 * rpush, lpop, rpop, llen, ttl, expire, get_keys, flush_all, flush_expired, capacity, free_space.
 *
 * Invariants: the arena is made once per instance, on the first dictionary or before the workers
 * are forked (mlua_shared_arena, bindings/workers.c), and unmapped by moonlet_free after the Lua
 * state is closed, so no dictionary userdata outlives it. A method checks every argument and
 * raises before it calls into core/shdict.c, which takes and gives back the dictionary's lock
 * inside each call: no Lua error can leave the lock held. Strings come back through the instance's
 * buffer (m->shared_buf) and are pushed after the lock is given back.
 */
#include <stdlib.h>
#include <string.h>

#include "../core/shdict.h"
#include "../core/shm.h"
#include "mlua.h"

#define SHARED_MT "moonlet.shared"
/* address space, not memory: pages count once entries touch them */
#define DEFAULT_ARENA_BYTES (sizeof(void *) >= 8 ? (size_t)1 << 30 : (size_t)64 << 20)
#define BUF_KEEP                                                                                   \
  ((size_t)1 << 20) /* a larger copy-out buffer is freed once its value is pushed                  \
                     */

int mlua_shared_arena(moonlet_t *m) {
  if (m->shm) return 0;
  return ml_shm_open(&m->shm, m->shm_bytes ? m->shm_bytes : DEFAULT_ARENA_BYTES);
}

void mlua_shared_free(moonlet_t *m) {
  ml_shm_close(m->shm);
  m->shm = NULL;
  free(m->shared_buf.data);
  m->shared_buf.data = NULL;
  m->shared_buf.cap = 0;
}

/* after a value or keys were pushed: a buffer grown past BUF_KEEP goes back to malloc */
static void shrink_buf(moonlet_t *m) {
  if (m->shared_buf.cap <= BUF_KEEP) return;
  free(m->shared_buf.data);
  m->shared_buf.data = NULL;
  m->shared_buf.cap = 0;
}

static ml_shdict_t *check_dict(lua_State *L) {
  return *(ml_shdict_t **)mlua_check_object(L, 1, SHARED_MT);
}

static const char *check_key(lua_State *L, int idx, size_t *len) {
  int t = lua_type(L, idx);
  if (t != LUA_TSTRING && t != LUA_TNUMBER) luaL_error(L, "moonlet.shared: the key is a string");
  const char *key = lua_tolstring(L, idx, len); /* a number becomes its tostring() */
  if (*len == 0) luaL_error(L, "moonlet.shared: the key is not empty");
  return key;
}

static void check_value(lua_State *L, int idx, ml_shvalue_t *v) {
  memset(v, 0, sizeof *v);
  switch (lua_type(L, idx)) {
  case LUA_TNONE:
  case LUA_TNIL: v->type = ML_SHV_NIL; break;
  case LUA_TBOOLEAN:
    v->type = ML_SHV_BOOLEAN;
    v->number = lua_toboolean(L, idx);
    break;
  case LUA_TNUMBER:
    v->type = ML_SHV_NUMBER;
    v->number = lua_tonumber(L, idx);
    break;
  case LUA_TSTRING:
    v->type = ML_SHV_STRING;
    v->str = lua_tolstring(L, idx, &v->len);
    break;
  default: luaL_error(L, "moonlet.shared: a value is a string, a number, a boolean or nil");
  }
}

/* seconds >= 0 (nil: 0, for ever) */
static double check_seconds(lua_State *L, int idx, const char *what) {
  if (lua_isnoneornil(L, idx)) return 0;
  double s = lua_type(L, idx) == LUA_TNUMBER ? lua_tonumber(L, idx) : -1;
  if (!(s >= 0)) luaL_error(L, "moonlet.shared: %s is a number of seconds >= 0", what);
  return s;
}

static void push_value(lua_State *L, const ml_shvalue_t *v) {
  switch (v->type) {
  case ML_SHV_BOOLEAN: lua_pushboolean(L, v->number != 0); break;
  case ML_SHV_NUMBER: lua_pushnumber(L, v->number); break;
  case ML_SHV_STRING: lua_pushlstring(L, v->str, v->len); break;
  default: lua_pushnil(L);
  }
}

static const char *err_word(int r) {
  switch (r) {
  case UV_EEXIST: return "exists";
  case UV_ENOENT: return "not found";
  case UV_EINVAL: return "not a number";
  default: return "no memory";
  }
}

/* nil and the error's word (incr, ttl, expire): returns 2 */
static int push_fail(lua_State *L, int r) {
  lua_pushnil(L);
  lua_pushstring(L, err_word(r));
  return 2;
}

/* get and get_stale: pushes value, flags (get: only when set) and, for get_stale, stale */
static int read_entry(lua_State *L, int stale_too) {
  moonlet_t *m = mlua_instance(L);
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  ml_shvalue_t v;
  int stale;
  int r = ml_shdict_get(d, key, klen, stale_too, &v, &m->shared_buf, &stale);
  if (r == UV_ENOENT) {
    lua_pushnil(L);
    return 1;
  }
  if (r < 0) return luaL_error(L, "moonlet.shared: out of memory");
  if (v.type == ML_SHV_LIST) { /* OpenResty's words, get_stale's too */
    lua_pushnil(L);
    lua_pushliteral(L, "value is a list");
    return 2;
  }
  push_value(L, &v);
  shrink_buf(m);
  if (!stale_too && !v.flags) return 1;
  if (v.flags)
    lua_pushnumber(L, v.flags);
  else
    lua_pushnil(L);
  if (!stale_too) return 2;
  lua_pushboolean(L, stale);
  return 3;
}

/* syntax: value, flags = dict:get(key) -- nil when missing or expired; nil, "value is a list" */
static int d_get(lua_State *L) { return read_entry(L, 0); }

/* syntax: value, flags, stale = dict:get_stale(key) -- an expired value too (stale true), until
 * something drops it */
static int d_get_stale(lua_State *L) { return read_entry(L, 1); }

static int push_store_result(lua_State *L, int r, int forcible) {
  lua_pushboolean(L, r == 0);
  if (r == 0)
    lua_pushnil(L);
  else
    lua_pushstring(L, err_word(r));
  lua_pushboolean(L, forcible);
  return 3;
}

/* set, safe_set, add, safe_add and replace: dict:how(key, value, exptime, flags) */
static int store(lua_State *L, int how, int safe) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  ml_shvalue_t v;
  check_value(L, 3, &v);
  double exptime = check_seconds(L, 4, "exptime");
  if (!lua_isnoneornil(L, 5)) {
    lua_Number f = lua_type(L, 5) == LUA_TNUMBER ? lua_tonumber(L, 5) : -1;
    if (!(f >= 0 && f <= 4294967295.0 && f == (lua_Number)(uint32_t)f))
      return luaL_error(L, "moonlet.shared: flags is a whole number from 0 to 2^32 - 1");
    v.flags = (uint32_t)f;
  }
  if (how != ML_SHDICT_SET && v.type == ML_SHV_NIL) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "attempt to add or replace nil values"); /* OpenResty's words */
    lua_pushboolean(L, 0);
    return 3;
  }
  int forcible = 0;
  int r = ml_shdict_store(d, how, safe, key, klen, &v, exptime, &forcible);
  return push_store_result(L, r, forcible);
}

/* syntax: ok, err, forcible = dict:set(key, value, exptime, flags) -- exptime seconds (0: never);
 * forcible: other entries were evicted to make room; a nil value deletes */
static int d_set(lua_State *L) { return store(L, ML_SHDICT_SET, 0); }
/* syntax: ok, err = dict:safe_set(key, value, exptime, flags) -- false, "no memory" rather than
 * evict */
static int d_safe_set(lua_State *L) { return store(L, ML_SHDICT_SET, 1); }
/* syntax: ok, err, forcible = dict:add(key, value, exptime, flags) -- false, "exists" when present
 */
static int d_add(lua_State *L) { return store(L, ML_SHDICT_ADD, 0); }
static int d_safe_add(lua_State *L) { return store(L, ML_SHDICT_ADD, 1); }
/* syntax: ok, err, forcible = dict:replace(key, value, exptime, flags) -- false, "not found" */
static int d_replace(lua_State *L) { return store(L, ML_SHDICT_REPLACE, 0); }

/* syntax: ok = dict:delete(key) -- true (lua-resty-lock's unlock reads it) */
static int d_delete(lua_State *L) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  ml_shdict_delete(d, key, klen);
  return push_store_result(L, 0, 0);
}

/* syntax: new, err, forcible = dict:incr(key, step, init, init_ttl) -- nil, "not found" when absent
 * and no init; nil, "not a number" when the value is not one. The entry keeps its expiry. */
static int d_incr(lua_State *L) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  if (!lua_isnumber(L, 3)) return luaL_error(L, "moonlet.shared: incr's step is a number");
  double step = lua_tonumber(L, 3);
  int has_init = !lua_isnoneornil(L, 4);
  if (has_init && !lua_isnumber(L, 4))
    return luaL_error(L, "moonlet.shared: incr's init is a number");
  double init = has_init ? lua_tonumber(L, 4) : 0;
  if (!lua_isnoneornil(L, 5) && !has_init)
    return luaL_error(L, "moonlet.shared: incr's init_ttl goes with init");
  double init_ttl = check_seconds(L, 5, "init_ttl");
  double out = 0;
  int forcible = 0;
  int r = ml_shdict_incr(d, key, klen, step, has_init, init, init_ttl, &out, &forcible);
  if (r < 0) return push_fail(L, r);
  lua_pushnumber(L, out);
  lua_pushnil(L);
  lua_pushboolean(L, forcible);
  return 3;
}

/* lpush and rpush: dict:how(key, value) */
static int push(lua_State *L, int side) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  ml_shvalue_t v;
  memset(&v, 0, sizeof v);
  if (lua_type(L, 3) == LUA_TNUMBER) {
    v.type = ML_SHV_NUMBER;
    v.number = lua_tonumber(L, 3);
  } else if (lua_type(L, 3) == LUA_TSTRING) {
    v.type = ML_SHV_STRING;
    v.str = lua_tolstring(L, 3, &v.len);
  } else { /* OpenResty answers, rather than raise */
    lua_pushnil(L);
    lua_pushliteral(L, "bad value type");
    return 2;
  }
  size_t len = 0;
  int r = ml_shdict_push(d, side, key, klen, &v, &len);
  if (r == UV_EINVAL) {
    lua_pushnil(L);
    lua_pushliteral(L, "value not a list");
    return 2;
  }
  if (r < 0) { /* false, as OpenResty's push */
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "no memory");
    return 2;
  }
  lua_pushnumber(L, (lua_Number)len);
  return 1;
}

/* syntax: length, err = dict:lpush(key, value) -- value a number or a string, at the head of the
 * list under key (made when missing or expired; a list keeps its expiry): the list's new length;
 * nil, "value not a list"; nil, "bad value type"; false, "no memory" (a push never evicts) */
static int d_lpush(lua_State *L) { return push(L, ML_SHDICT_LEFT); }
/* syntax: length, err = dict:rpush(key, value) -- the same at the tail */
static int d_rpush(lua_State *L) { return push(L, ML_SHDICT_RIGHT); }

/* lpop and rpop: dict:how(key) */
static int pop(lua_State *L, int side) {
  moonlet_t *m = mlua_instance(L);
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  ml_shvalue_t v;
  int r = ml_shdict_pop(d, side, key, klen, &v, &m->shared_buf);
  if (r == UV_ENOENT) {
    lua_pushnil(L);
    return 1;
  }
  if (r == UV_EINVAL) {
    lua_pushnil(L);
    lua_pushliteral(L, "value not a list");
    return 2;
  }
  if (r < 0) return luaL_error(L, "moonlet.shared: out of memory");
  push_value(L, &v);
  shrink_buf(m);
  return 1;
}

/* syntax: value, err = dict:lpop(key) -- takes the head of the list: nil when missing or expired;
 * nil, "value not a list". The last value takes the key with it. */
static int d_lpop(lua_State *L) { return pop(L, ML_SHDICT_LEFT); }
/* syntax: value, err = dict:rpop(key) -- the same at the tail */
static int d_rpop(lua_State *L) { return pop(L, ML_SHDICT_RIGHT); }

/* syntax: length, err = dict:llen(key) -- 0 when missing or expired; nil, "value not a list" */
static int d_llen(lua_State *L) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  size_t len = 0;
  if (ml_shdict_llen(d, key, klen, &len) == UV_EINVAL) {
    lua_pushnil(L);
    lua_pushliteral(L, "value not a list");
    return 2;
  }
  lua_pushnumber(L, (lua_Number)len);
  return 1;
}

/* syntax: ttl, err = dict:ttl(key) -- seconds left, 0 for an entry that never expires; nil,
 * "not found" */
static int d_ttl(lua_State *L) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  double ttl;
  int r = ml_shdict_ttl(d, key, klen, &ttl);
  if (r < 0) return push_fail(L, r);
  lua_pushnumber(L, ttl);
  return 1;
}

/* syntax: ok, err = dict:expire(key, exptime) -- a new expiry (0: never); nil, "not found" */
static int d_expire(lua_State *L) {
  ml_shdict_t *d = check_dict(L);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  if (lua_isnoneornil(L, 3))
    return luaL_error(L, "moonlet.shared: exptime is a number of seconds >= 0");
  double exptime = check_seconds(L, 3, "exptime");
  int r = ml_shdict_expire(d, key, klen, exptime);
  if (r < 0) return push_fail(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: keys = dict:get_keys(max_count) -- at most max_count (1024 by default; 0: all) live
 * keys */
static int d_get_keys(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  ml_shdict_t *d = check_dict(L);
  lua_Integer max = luaL_optinteger(L, 2, 1024);
  size_t count, len;
  if (ml_shdict_keys(d, max > 0 ? (size_t)max : 0, &m->shared_buf, &count, &len) < 0)
    return luaL_error(L, "moonlet.shared: out of memory");
  lua_createtable(L, (int)count, 0);
  const char *p = m->shared_buf.data;
  for (size_t i = 1; i <= count; i++) {
    uint32_t klen;
    memcpy(&klen, p, sizeof klen);
    lua_pushlstring(L, p + sizeof klen, klen);
    lua_rawseti(L, -2, (int)i);
    p += sizeof klen + klen;
  }
  shrink_buf(m);
  return 1;
}

/* syntax: dict:flush_all() -- every entry goes */
static int d_flush_all(lua_State *L) {
  ml_shdict_flush_all(check_dict(L));
  return 0;
}

/* syntax: n = dict:flush_expired(max_count) -- drops expired entries (all, or at most max_count) */
static int d_flush_expired(lua_State *L) {
  ml_shdict_t *d = check_dict(L);
  lua_Integer max = luaL_optinteger(L, 2, 0);
  lua_pushinteger(L, (lua_Integer)ml_shdict_flush_expired(d, max > 0 ? (size_t)max : 0));
  return 1;
}

/* syntax: bytes = dict:capacity(), bytes = dict:free_space() */
static int d_capacity(lua_State *L) {
  lua_pushnumber(L, (lua_Number)ml_shdict_capacity(check_dict(L)));
  return 1;
}
static int d_free_space(lua_State *L) {
  lua_pushnumber(L, (lua_Number)ml_shdict_free_space(check_dict(L)));
  return 1;
}

/* syntax: problem = dict:_check() -- for tests (not a lua_shared_dict method): nil when its lists
 * and blocks agree, else what does not */
static int d_check(lua_State *L) {
  const char *bad = ml_shdict_check(check_dict(L));
  if (!bad) return 0;
  lua_pushstring(L, bad);
  return 1;
}

/* syntax: dict = core.shared_open(name, size) -- raises when the arena has no room */
static int l_shared_open(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t name_len;
  const char *name = luaL_checklstring(L, 1, &name_len);
  if (strlen(name) != name_len) return luaL_error(L, "moonlet.shared: a name holds no NUL byte");
  lua_Number size_n = luaL_checknumber(L, 2);
  if (!(size_n >= 1 && size_n <= (lua_Number)ML_SHDICT_MAX_SIZE))
    return luaL_error(L, "moonlet.shared: size is from 1 byte to 512 MiB");
  size_t size = (size_t)size_n;
  int r = mlua_shared_arena(m);
  if (r < 0) return luaL_error(L, "moonlet.shared: no shared memory: %s", mlua_err_string(r));
  void *zone;
  int created;
  r = ml_shm_zone(m->shm, name, ml_shdict_zone_bytes(size), ml_shdict_init, &size, &zone, &created);
  if (r == UV_ENAMETOOLONG)
    return luaL_error(L, "moonlet.shared: a name is at most %d bytes", ML_SHM_NAME_MAX);
  if (r < 0)
    return luaL_error(
        L,
        "moonlet.shared: no room for \"%s\" (%f bytes) in the shared memory "
        "(%d MiB, a dictionary takes 4 times its size: moonlet --shared-memory SIZE makes more)",
        name, size_n, (int)(ml_shm_size(m->shm) >> 20));
  ml_shdict_t **box = lua_newuserdata(L, sizeof *box);
  *box = zone;
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_setmetatable(L, -2);
  return 1;
}

/* syntax: ok, err = core.shared_memory(bytes) -- the arena's size, before it is made */
static int l_shared_memory(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  lua_Number bytes = luaL_checknumber(L, 1);
  if (m->shm) {
    lua_pushnil(L);
    lua_pushliteral(L, "the shared memory is made already");
    return 2;
  }
  if (!(bytes >= 4096 && bytes <= 1099511627776.0 && bytes <= (lua_Number)SIZE_MAX))
    return luaL_argerror(L, 1, "from 4 KiB to 1 TiB");
  m->shm_bytes = (size_t)bytes;
  lua_pushboolean(L, 1);
  return 1;
}

void mlua_open_shared(lua_State *L, moonlet_t *m) {
  static const luaL_Reg methods[] = {{"get", d_get},
                                     {"get_stale", d_get_stale},
                                     {"set", d_set},
                                     {"safe_set", d_safe_set},
                                     {"add", d_add},
                                     {"safe_add", d_safe_add},
                                     {"replace", d_replace},
                                     {"delete", d_delete},
                                     {"incr", d_incr},
                                     {"lpush", d_lpush},
                                     {"rpush", d_rpush},
                                     {"lpop", d_lpop},
                                     {"rpop", d_rpop},
                                     {"llen", d_llen},
                                     {"ttl", d_ttl},
                                     {"expire", d_expire},
                                     {"get_keys", d_get_keys},
                                     {"flush_all", d_flush_all},
                                     {"flush_expired", d_flush_expired},
                                     {"capacity", d_capacity},
                                     {"free_space", d_free_space},
                                     {"_check", d_check},
                                     {NULL, NULL}};
  static const luaL_Reg fns[] = {
      {"shared_open", l_shared_open}, {"shared_memory", l_shared_memory}, {NULL, NULL}};
  luaL_newmetatable(L, SHARED_MT);
  lua_pushliteral(L, SHARED_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register_methods(L, m, methods, -2);
  lua_setfield(L, -2, "__index");
  for (const luaL_Reg *f = fns; f->name; f++) { /* into core, with the metatable as upvalue 2 */
    lua_pushlightuserdata(L, m);
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, f->func, 2);
    lua_setfield(L, -3, f->name);
  }
  lua_pop(L, 1);
}
