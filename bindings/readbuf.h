/* bindings/readbuf.h: the receive buffer behind receive(n | "*l" | "*a") and receive_any(max),
 * shared by TCP sockets (tcp.c) and process pipes (process.c). Bytes received and not yet returned
 * are buf[off, off + len); the owner frees buf when its stream is freed.
 */
#ifndef MLUA_READBUF_H
#define MLUA_READBUF_H

#include <stddef.h>

#include <lua.h>

typedef struct mlua_readbuf_s {
  char *buf;
  size_t off, len, cap;
} mlua_readbuf_t;

enum { R_BYTES = 0, R_LINE, R_ALL, R_ANY, R_UNTIL }; /* what a pending receive wants */

/* Makes room for `room` more bytes after the data (compacting first); 0 or UV_ENOMEM. */
int mlua_readbuf_reserve(mlua_readbuf_t *b, size_t room);
/* Drops the first n bytes of the data. */
void mlua_readbuf_consume(mlua_readbuf_t *b, size_t n);
/* Answers a receive of `mode` (R_BYTES, R_ANY with `want` bytes at most, R_LINE without its CR LF,
 * R_ALL once `eof`) from the data when it can: pushes the string and returns 1, else returns 0. */
int mlua_readbuf_answer(lua_State *L, mlua_readbuf_t *b, int mode, size_t want, int eof);

#endif
