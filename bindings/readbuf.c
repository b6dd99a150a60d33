/* bindings/readbuf.c: the receive buffer shared by sockets and pipes (see readbuf.h). */
#include "readbuf.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

int mlua_readbuf_reserve(mlua_readbuf_t *b, size_t room) {
  if (b->cap - b->off - b->len >= room) return 0;
  if (b->off > 0) {
    memmove(b->buf, b->buf + b->off, b->len);
    b->off = 0;
    if (b->cap - b->len >= room) return 0;
  }
  if (room > SIZE_MAX / 4 - b->len) return UV_ENOMEM; /* the doubling below would overflow */
  size_t cap = b->cap ? b->cap : 16384;
  while (cap - b->len < room)
    cap *= 2;
  char *p = realloc(b->buf, cap);
  if (!p) return UV_ENOMEM;
  b->buf = p;
  b->cap = cap;
  return 0;
}

void mlua_readbuf_consume(mlua_readbuf_t *b, size_t n) {
  b->off += n;
  b->len -= n;
  if (b->len == 0) b->off = 0;
}

int mlua_readbuf_answer(lua_State *L, mlua_readbuf_t *b, int mode, size_t want, int eof) {
  char *data = b->buf + b->off;
  switch (mode) {
  case R_BYTES:
    if (b->len < want) return 0;
    lua_pushlstring(L, data, want);
    mlua_readbuf_consume(b, want);
    return 1;
  case R_ANY: {
    if (b->len == 0) return 0;
    size_t n = b->len < want ? b->len : want;
    lua_pushlstring(L, data, n);
    mlua_readbuf_consume(b, n);
    return 1;
  }
  case R_LINE: {
    char *nl = b->len ? memchr(data, '\n', b->len) : NULL;
    if (!nl) return 0;
    size_t n = (size_t)(nl - data), skip = n + 1;
    if (n > 0 && data[n - 1] == '\r') n--;
    lua_pushlstring(L, data, n);
    mlua_readbuf_consume(b, skip);
    return 1;
  }
  case R_ALL:
    if (!eof) return 0;
    lua_pushlstring(L, data, b->len);
    mlua_readbuf_consume(b, b->len);
    return 1;
  default: return 0;
  }
}
