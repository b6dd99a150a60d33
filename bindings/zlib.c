/* bindings/zlib.c: incremental inflate and deflate streams over zlib, for the HTTP client's
 * `decompress = true` (gzip responses) and for scripts that make or read gzip data.
 *
 *   z = core.zlib_inflater(window_bits)   out, done = z:inflate(data, limit)   z:close()
 *   z = core.zlib_deflater(level, window_bits)   out = z:deflate(data, flush)   z:close()
 *
 * Ownership: the z_stream lives inside the Lua userdata (no libuv handle, nothing in flight: these
 * calls never wait), and zlib's own state behind it is malloc'ed by zlib. It is released exactly
 * once, by close() or else by __gc (`open` says whether it still must be). Output is built in a
 * luaL_Buffer on the caller's stack, so an error (bad data, too large) leaks nothing. Any thread
 * of the instance may call these; nothing here touches the loop.
 */
#include <limits.h>
#include <string.h>

#include "../core/zlib_api.h"

#include "mlua.h"

#define INFLATE_MT "moonlet.zlib.inflate"
#define DEFLATE_MT "moonlet.zlib.deflate"
#define OUT_CHUNK 16384

typedef struct {
  z_stream z;
  int open;         /* inflateEnd/deflateEnd still due */
  int done;         /* inflate: the stream ended (Z_STREAM_END with no member after it) */
  int gzip;         /* inflate: gzip data accepted, so another gzip member may follow */
  double total_out; /* bytes produced so far */
} zs_t;

static zs_t *check_zs(lua_State *L, const char *mt) {
  zs_t *s = luaL_checkudata(L, 1, mt);
  if (!s->open) luaL_error(L, "moonlet.zlib: stream is closed");
  return s;
}

/* Window bits as zlib wants them; 0 or nil: 15 + 32 (zlib or gzip header, detected). */
static int opt_window_bits(lua_State *L, int idx, int dflt) {
  int wb = (int)luaL_optinteger(L, idx, dflt);
  int base = wb < 0 ? -wb : wb > 31 ? wb - 32 : wb > 15 ? wb - 16 : wb;
  if (base < 8 || base > 15) luaL_argerror(L, idx, "window bits out of range");
  return wb;
}

/* -- Inflate -------------------------------------------------------------------------------- */

/* Raises when zlib cannot be opened (not installed on this machine). */
static void need_zlib(lua_State *L) {
  const char *why = ml_zlib_load();
  if (why) luaL_error(L, "moonlet.zlib: %s", why);
}

/* syntax: z = core.zlib_inflater(window_bits) -- 15+32 by default: zlib or gzip data */
static int l_inflater(lua_State *L) {
  int wb = opt_window_bits(L, 1, 15 + 32);
  need_zlib(L);
  zs_t *s = lua_newuserdata(L, sizeof *s);
  memset(s, 0, sizeof *s);
  if (inflateInit2(&s->z, wb) != Z_OK) return luaL_error(L, "moonlet.zlib: out of memory");
  s->open = 1;
  s->gzip = wb > 15 + 16 || (wb > 15 && wb <= 31);
  luaL_getmetatable(L, INFLATE_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* syntax: out, done = z:inflate(data, limit) -- nil, "bad data" | nil, "too large"
 * Feeds data and returns every byte it decodes to (maybe ""); done is true once the compressed
 * stream has ended (data after the end is ignored unless it is another gzip member). limit caps
 * the total output of the stream (a decompression bomb stops there, not in memory). */
static int z_inflate(lua_State *L) {
  zs_t *s = check_zs(L, INFLATE_MT);
  size_t len;
  const char *in = luaL_checklstring(L, 2, &len);
  luaL_argcheck(L, len <= UINT_MAX, 2, "data too long for one call");
  double limit = luaL_optnumber(L, 3, -1);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  s->z.next_in = (Bytef *)in;
  s->z.avail_in = (uInt)len;
  while (!s->done) {
    char out[OUT_CHUNK];
    s->z.next_out = (Bytef *)out;
    s->z.avail_out = sizeof out;
    int r = inflate(&s->z, Z_NO_FLUSH);
    size_t got = sizeof out - s->z.avail_out;
    s->total_out += (double)got;
    if (limit >= 0 && s->total_out > limit) {
      lua_pushnil(L);
      lua_pushliteral(L, "too large");
      return 2;
    }
    luaL_addlstring(&b, out, got);
    if (r == Z_STREAM_END) {
      /* another gzip member may follow (RFC 1952 allows several); else the stream is over */
      if (s->gzip && s->z.avail_in > 0 && s->z.next_in[0] == 0x1f) {
        if (inflateReset(&s->z) != Z_OK) break;
        continue;
      }
      s->done = 1;
      break;
    }
    if (r == Z_BUF_ERROR || (r == Z_OK && s->z.avail_in == 0 && s->z.avail_out > 0)) break;
    if (r != Z_OK) {
      lua_pushnil(L);
      lua_pushliteral(L, "bad data");
      return 2;
    }
  }
  s->z.next_in = NULL;
  s->z.avail_in = 0;
  luaL_pushresult(&b);
  lua_pushboolean(L, s->done);
  return 2;
}

/* -- Deflate -------------------------------------------------------------------------------- */

/* syntax: z = core.zlib_deflater(level, window_bits) -- 31 (gzip) by default */
static int l_deflater(lua_State *L) {
  int level = (int)luaL_optinteger(L, 1, Z_DEFAULT_COMPRESSION);
  int wb = opt_window_bits(L, 2, 15 + 16);
  if (level < -1 || level > 9) return luaL_argerror(L, 1, "level is -1..9");
  if (wb > 31) return luaL_argerror(L, 2, "deflate needs explicit window bits");
  need_zlib(L);
  zs_t *s = lua_newuserdata(L, sizeof *s);
  memset(s, 0, sizeof *s);
  if (deflateInit2(&s->z, level, Z_DEFLATED, wb, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    return luaL_error(L, "moonlet.zlib: out of memory");
  s->open = 1;
  luaL_getmetatable(L, DEFLATE_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* syntax: out = z:deflate(data, flush) -- the compressed bytes ready so far. flush: nil or false
 * keeps what zlib holds back for a better ratio; "sync" pushes out everything given so far (a
 * reader can inflate it all, the stream goes on: a streamed response's res:write); true or
 * "finish" ends the stream (trailer included), and later calls raise */
static int z_deflate(lua_State *L) {
  zs_t *s = check_zs(L, DEFLATE_MT);
  size_t len;
  const char *in = luaL_optlstring(L, 2, "", &len);
  luaL_argcheck(L, len <= UINT_MAX, 2, "data too long for one call");
  int flush = Z_NO_FLUSH;
  if (lua_type(L, 3) == LUA_TSTRING) {
    static const char *const modes[] = {"none", "sync", "finish", NULL};
    static const int zmodes[] = {Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH};
    flush = zmodes[luaL_checkoption(L, 3, NULL, modes)];
  } else if (lua_toboolean(L, 3)) {
    flush = Z_FINISH;
  }
  if (s->done) return luaL_error(L, "moonlet.zlib: deflate stream already finished");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  s->z.next_in = (Bytef *)in;
  s->z.avail_in = (uInt)len;
  for (;;) {
    char out[OUT_CHUNK];
    s->z.next_out = (Bytef *)out;
    s->z.avail_out = sizeof out;
    int r = deflate(&s->z, flush);
    size_t got = sizeof out - s->z.avail_out;
    s->total_out += (double)got;
    luaL_addlstring(&b, out, got);
    if (r == Z_STREAM_END) {
      s->done = 1;
      break;
    }
    if (r != Z_OK && r != Z_BUF_ERROR) return luaL_error(L, "moonlet.zlib: deflate failed (%d)", r);
    if (s->z.avail_in == 0 && s->z.avail_out > 0) break; /* all consumed, all flushed */
  }
  s->z.next_in = NULL;
  s->z.avail_in = 0;
  luaL_pushresult(&b);
  return 1;
}

/* -- Common --------------------------------------------------------------------------------- */

static void zs_end(zs_t *s, int is_inflate) {
  if (!s->open) return;
  s->open = 0;
  if (is_inflate)
    inflateEnd(&s->z);
  else
    deflateEnd(&s->z);
}

/* syntax: z:close() -- frees zlib's state now (else __gc does); idempotent */
static int z_close_inflate(lua_State *L) {
  zs_end(luaL_checkudata(L, 1, INFLATE_MT), 1);
  return 0;
}

static int z_close_deflate(lua_State *L) {
  zs_end(luaL_checkudata(L, 1, DEFLATE_MT), 0);
  return 0;
}

/* syntax: n = z:total_out() -- bytes produced so far */
static int z_total_out_inflate(lua_State *L) {
  lua_pushnumber(L, ((zs_t *)luaL_checkudata(L, 1, INFLATE_MT))->total_out);
  return 1;
}

static int z_total_out_deflate(lua_State *L) {
  lua_pushnumber(L, ((zs_t *)luaL_checkudata(L, 1, DEFLATE_MT))->total_out);
  return 1;
}

void mlua_open_zlib(lua_State *L, moonlet_t *m) {
  static const luaL_Reg im[] = {{"inflate", z_inflate},
                                {"close", z_close_inflate},
                                {"total_out", z_total_out_inflate},
                                {NULL, NULL}};
  static const luaL_Reg dm[] = {{"deflate", z_deflate},
                                {"close", z_close_deflate},
                                {"total_out", z_total_out_deflate},
                                {NULL, NULL}};
  static const luaL_Reg fns[] = {
      {"zlib_inflater", l_inflater}, {"zlib_deflater", l_deflater}, {NULL, NULL}};
  luaL_newmetatable(L, INFLATE_MT);
  lua_pushliteral(L, INFLATE_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  luaL_register(L, NULL, im);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, z_close_inflate);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, DEFLATE_MT);
  lua_pushliteral(L, DEFLATE_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  luaL_register(L, NULL, dm);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, z_close_deflate);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
