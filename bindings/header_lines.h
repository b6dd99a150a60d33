/* bindings/header_lines.h: "Name: value\r\n" header lines written into a buffer that starts inside
 * the struct (on the caller's stack: the usual head fits) and moves to the heap once it outgrows
 * it. The HTTP server's response heads (http_server.c) and the HTTP client's request headers
 * (http_client.c) are written so. Ownership: whoever inits one calls mlua_lines_free on every way
 * out (raising included); nothing else frees p. */
#ifndef MLUA_HEADER_LINES_H
#define MLUA_HEADER_LINES_H

#include <stdlib.h>
#include <string.h>

typedef struct {
  char *p; /* stackbuf, or the heap's copy */
  size_t len, cap;
  char stackbuf[2048];
} mlua_lines_t;

static inline void mlua_lines_init(mlua_lines_t *b) {
  b->p = b->stackbuf;
  b->len = 0;
  b->cap = sizeof b->stackbuf;
}

static inline void mlua_lines_free(mlua_lines_t *b) {
  if (b->p != b->stackbuf) free(b->p);
  b->p = b->stackbuf;
}

/* Appends "k: v\r\n": 0, or -1 when out of memory (the lines written so far stay). */
static inline int mlua_lines_add(mlua_lines_t *b, const char *k, size_t kn, const char *v,
                                 size_t vn) {
  size_t need = b->len + kn + vn + 4;
  if (need > b->cap) {
    size_t cap = b->cap * 2;
    while (cap < need)
      cap *= 2;
    char *p = b->p == b->stackbuf ? malloc(cap) : realloc(b->p, cap);
    if (!p) return -1;
    if (b->p == b->stackbuf) memcpy(p, b->stackbuf, b->len);
    b->p = p;
    b->cap = cap;
  }
  char *p = b->p + b->len;
  memcpy(p, k, kn);
  p += kn;
  *p++ = ':';
  *p++ = ' ';
  memcpy(p, v, vn);
  p += vn;
  *p++ = '\r';
  *p++ = '\n';
  b->len = (size_t)(p - b->p);
  return 0;
}

#endif
