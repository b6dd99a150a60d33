/* spec/c/test_block_cache.c: core/block_cache.c, the small-block cache in front of malloc that every
 * instance's Lua state allocates through: blocks come back per size class, the cap holds, resizes
 * keep the bytes, a drained cache holds nothing, and a whole LuaJIT state lives and dies on one
 * (under `make test SANITIZE=1`, ASan also sees every block freed exactly once and cached blocks
 * poisoned).
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/block_cache.h"
#include "ctest.h"

static void *alloc(ml_bcache_t *c, size_t n) { return ml_bcache_alloc(c, NULL, 0, n); }
static void release(ml_bcache_t *c, void *p, size_t n) { ml_bcache_alloc(c, p, n, 0); }

static void test_classes(void) {
  ctest_section("a freed block comes back for any size of its 16-byte class, the last freed first");
  ml_bcache_t c;
  ml_bcache_init(&c, 1 << 20);
  char *a = alloc(&c, 17), *b = alloc(&c, 30);
  memset(a, 'a', 32); /* the whole class is the block's: 17..32 bytes are class 1 */
  memset(b, 'b', 32);
  release(&c, a, 17);
  release(&c, b, 30);
  CHECK_INT(c.cached_bytes, 64);
  CHECK(alloc(&c, 32) == b);
  CHECK(alloc(&c, 20) == a);
  CHECK_INT(c.cached_bytes, 0);
  char *d = alloc(&c, 16); /* class 0: never a class 1 block */
  CHECK(d != a && d != b);
  release(&c, d, 16);
  CHECK(alloc(&c, 1) == d);
  release(&c, d, 1);
  release(&c, a, 20);
  release(&c, b, 32);

  ctest_section("blocks past ML_BCACHE_MAX_SIZE go to malloc and free, never on a list");
  char *big = alloc(&c, ML_BCACHE_MAX_SIZE + 1);
  memset(big, 'x', ML_BCACHE_MAX_SIZE + 1);
  size_t before = c.cached_bytes;
  release(&c, big, ML_BCACHE_MAX_SIZE + 1);
  CHECK_INT(c.cached_bytes, before);
  char *top = alloc(&c, ML_BCACHE_MAX_SIZE);
  release(&c, top, ML_BCACHE_MAX_SIZE);
  CHECK_INT(c.cached_bytes, before + ML_BCACHE_MAX_SIZE);
  ml_bcache_drain(&c);
  CHECK_INT(c.cached_bytes, 0);
  CHECK(c.free[0] == NULL && c.free[ML_BCACHE_CLASSES - 1] == NULL);
}

static void test_cap(void) {
  ctest_section("the lists hold no more than max_bytes; the rest goes back to free()");
  ml_bcache_t c;
  ml_bcache_init(&c, 100);
  void *p[10];
  for (int i = 0; i < 10; i++) p[i] = alloc(&c, 32);
  for (int i = 0; i < 10; i++) release(&c, p[i], 32);
  CHECK_INT(c.cached_bytes, 96); /* three 32-byte blocks fit under 100 */
  ml_bcache_drain(&c);

  ctest_section("max_bytes 0 caches nothing");
  ml_bcache_init(&c, 0);
  void *q = alloc(&c, 8);
  release(&c, q, 8);
  CHECK_INT(c.cached_bytes, 0);
  CHECK(c.free[0] == NULL);
}

static void test_resize(void) {
  ctest_section("a resize within the class keeps the block; across classes it keeps the bytes");
  ml_bcache_t c;
  ml_bcache_init(&c, 1 << 20);
  char *p = alloc(&c, 40);
  memcpy(p, "0123456789012345678901234567890123456789", 40);
  CHECK(ml_bcache_alloc(&c, p, 40, 48) == p);
  char *q = ml_bcache_alloc(&c, p, 48, 200);
  if (CHECK(q != NULL)) CHECK(memcmp(q, "0123456789012345678901234567890123456789", 40) == 0);
  memset(q, 'q', 200);
  char *big = ml_bcache_alloc(&c, q, 200, 5000); /* small to large */
  if (CHECK(big != NULL)) CHECK(big[199] == 'q');
  memset(big, 'z', 5000);
  char *small = ml_bcache_alloc(&c, big, 5000, 24); /* large to small: made class 1's size */
  if (CHECK(small != NULL)) CHECK(small[23] == 'z');
  memset(small, 's', 32);
  release(&c, small, 24);
  CHECK(alloc(&c, 32) == small); /* it went on class 1's list like any of that class */
  release(&c, small, 32);
  ml_bcache_drain(&c);
}

static void test_lua_state(void) {
  ctest_section("a LuaJIT state allocates through the cache, makes garbage, closes; drained after");
  ml_bcache_t c;
  ml_bcache_init(&c, 1 << 20);
  lua_State *L = lua_newstate(ml_bcache_alloc, &c);
  if (!CHECK(L != NULL)) return; /* x64 LuaJIT without GC64 takes no allocator */
  luaL_openlibs(L);
  int r = luaL_dostring(L, "local t = {}\n"
                           "for i = 1, 20000 do t[i % 100] = { i, tostring(i), function() return i end } end\n"
                           "collectgarbage()\n"
                           "local s = {} for i = 1, 1000 do s[#s + 1] = ('x'):rep(i) end\n"
                           "return #table.concat(s)");
  CHECK_INT(r, 0);
  CHECK_INT(lua_tointeger(L, -1), 500500);
  CHECK(c.cached_bytes > 0); /* the collections' garbage waits on the lists */
  lua_close(L);
  ml_bcache_drain(&c);
  CHECK_INT(c.cached_bytes, 0);
}

int main(void) {
  test_classes();
  test_cap();
  test_resize();
  test_lua_state();
  return ctest_end();
}
