/* bindings/crypto.c: message digests and HMAC for Lua (core.digest, core.hmac), random bytes from
 * OpenSSL's CSPRNG (core.random_bytes), a comparison in constant time (core.equal), base64 in both
 * alphabets (core.base64_encode/decode), and core.getpid. lua/moonlet/crypto.lua makes them public
 * (moonlet.crypto, signed values and sessions); moonlet.ngx builds ngx.md5/sha1_bin/hmac_sha1 and
 * ngx.encode_base64 on them. They are C calls into OpenSSL rather than LuaJIT FFI calls because the
 * static executable of `make static` has no dynamic symbol table for ffi.C to search. Pure
 * functions: nothing here waits or holds a handle; output is built on the caller's Lua stack.
 * OpenSSL is opened by the first call that needs it (core/openssl_api.h): need_openssl. */
#include "../core/openssl_api.h"
#include "mlua.h"

#include <lauxlib.h>
#include <string.h>

/* Raises when OpenSSL cannot be opened (not installed on this machine). */
static void need_openssl(lua_State *L) {
  const char *why = ml_openssl_load();
  if (why) luaL_error(L, "%s", why);
}

static const EVP_MD *check_md(lua_State *L, int arg) {
  const char *name = luaL_checkstring(L, arg);
  need_openssl(L);
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

/* core.random_bytes(n) -> n bytes from OpenSSL's CSPRNG (keys, session ids, nonces) */
static int l_random_bytes(lua_State *L) {
  lua_Number want = luaL_checknumber(L, 1);
  luaL_argcheck(L, want >= 0 && want <= 65536 && want == (lua_Integer)want, 1,
                "a whole number of bytes, 0 to 65536");
  lua_Integer n = (lua_Integer)want;
  need_openssl(L);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  unsigned char *p = (unsigned char *)luaL_prepbuffer(&b); /* LUAL_BUFFERSIZE bytes at a time */
  for (lua_Integer left = n; left > 0;) {
    int k = left < LUAL_BUFFERSIZE ? (int)left : LUAL_BUFFERSIZE;
    if (RAND_bytes(p, k) != 1) return luaL_error(L, "random_bytes: OpenSSL's generator failed");
    luaL_addsize(&b, (size_t)k);
    left -= k;
    if (left > 0) p = (unsigned char *)luaL_prepbuffer(&b);
  }
  luaL_pushresult(&b);
  return 1;
}

/* core.equal(a, b) -> whether two strings are the same, in a time that depends on their lengths
 * only (a MAC check must not tell an attacker how many of its first bytes were right) */
static int l_equal(lua_State *L) {
  size_t na, nb;
  luaL_checktype(L, 1, LUA_TSTRING); /* strings only: 1 and "1" are not the same secret */
  luaL_checktype(L, 2, LUA_TSTRING);
  const char *a = lua_tolstring(L, 1, &na);
  const char *b = lua_tolstring(L, 2, &nb);
  need_openssl(L);
  lua_pushboolean(L, na == nb && CRYPTO_memcmp(a, b, na) == 0);
  return 1;
}

static const char B64_STD[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char B64_URL[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* core.base64_encode(s, url) -> base64 of s: RFC 4648 section 4 with padding, or with url true the
 * URL and file name alphabet of section 5 without padding (cookies, tokens) */
static int l_base64_encode(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  int url = lua_toboolean(L, 2);
  const char *abc = url ? B64_URL : B64_STD;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
    char q[4] = {abc[v >> 18], abc[(v >> 12) & 63], abc[(v >> 6) & 63], abc[v & 63]};
    luaL_addlstring(&b, q, 4);
  }
  if (i < n) {
    unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
    char q[4] = {abc[v >> 18], abc[(v >> 12) & 63], i + 1 < n ? abc[(v >> 6) & 63] : '=', '='};
    size_t len = 4;
    if (url) len = i + 1 < n ? 3 : 2;
    luaL_addlstring(&b, q, len);
  }
  luaL_pushresult(&b);
  return 1;
}

/* core.base64_decode(s, url) -> the bytes, or nil when s is not base64 of that alphabet (padding
 * optional; no white space) */
static int l_base64_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  const char *abc = lua_toboolean(L, 2) ? B64_URL : B64_STD;
  signed char val[256];
  memset(val, -1, sizeof val);
  for (int k = 0; k < 64; k++)
    val[(unsigned char)abc[k]] = (signed char)k;
  size_t full = n;
  while (n > 0 && s[n - 1] == '=')
    n--; /* padding: at most two, at the end */
  if (full - n > 2 || n % 4 == 1) goto bad;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  unsigned v = 0;
  int bits = 0;
  for (size_t i = 0; i < n; i++) {
    int d = val[(unsigned char)s[i]];
    if (d < 0) goto bad;
    v = (v << 6 | (unsigned)d) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      luaL_addchar(&b, (char)((v >> bits) & 0xff));
    }
  }
  luaL_pushresult(&b);
  return 1;
bad:
  lua_settop(L, 0);
  lua_pushnil(L);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 1;
}

void mlua_open_crypto(lua_State *L, moonlet_t *m) {
  const luaL_Reg fns[] = {{"digest", l_digest},
                          {"hmac", l_hmac},
                          {"random_bytes", l_random_bytes},
                          {"equal", l_equal},
                          {"base64_encode", l_base64_encode},
                          {"base64_decode", l_base64_decode},
                          {"getpid", l_getpid},
                          {NULL, NULL}};
  mlua_register(L, m, fns);
}
