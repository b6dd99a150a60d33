/* bindings/crypto.c: message digests and HMAC for Lua (core.digest, core.hmac), and core.getpid.
 * moonlet.ngx builds ngx.md5/sha1_bin/hmac_sha1 on these. They are C calls into OpenSSL rather than
 * LuaJIT FFI calls because the static executable of `make static` has no dynamic symbol table for
 * ffi.C to search. Pure functions: nothing here waits or holds a handle. */
#include "mlua.h"

#include <lauxlib.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>

static const EVP_MD *check_md(lua_State *L, int arg) {
  const char *name = luaL_checkstring(L, arg);
  if (strcmp(name, "md5") == 0) return EVP_md5();
  if (strcmp(name, "sha1") == 0) return EVP_sha1();
  if (strcmp(name, "sha256") == 0) return EVP_sha256();
  if (strcmp(name, "sha512") == 0) return EVP_sha512();
  luaL_argerror(L, arg, "md5, sha1, sha256 or sha512 expected");
  return NULL;
}

/* core.digest(alg, data) -> raw digest bytes */
static int l_digest(lua_State *L) {
  const EVP_MD *md = check_md(L, 1);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(s, n, out, &len, md, NULL) != 1) return luaL_error(L, "digest: OpenSSL failed");
  lua_pushlstring(L, (const char *)out, len);
  return 1;
}

/* core.hmac(alg, key, data) -> raw MAC bytes */
static int l_hmac(lua_State *L) {
  const EVP_MD *md = check_md(L, 1);
  size_t klen, n;
  const char *key = luaL_checklstring(L, 2, &klen);
  const char *s = luaL_checklstring(L, 3, &n);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(md, key, (int)klen, (const unsigned char *)s, n, out, &len))
    return luaL_error(L, "hmac: OpenSSL failed");
  lua_pushlstring(L, (const char *)out, len);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 1;
}

void mlua_open_crypto(lua_State *L, moonlet_t *m) {
  const luaL_Reg fns[] = {
      {"digest", l_digest}, {"hmac", l_hmac}, {"getpid", l_getpid}, {NULL, NULL}};
  mlua_register(L, m, fns);
}
