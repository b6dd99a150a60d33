/* bindings/http_client.c: the C half of moonlet.http (lua/moonlet/http_client.lua): parsing an
 * HTTP/1.1 response head, and a whole chunked body, out of the Lua string the client buffers
 * (what sock:receive_any brought). Usually one receive brings the whole response, and one call of
 * each function here turns it into status, headers and body: no Lua string is cut per line.
 *
 * core.http_parse_head(buf, pos, head)   the status line and header section at buf[pos..]
 * core.http_headers(buf, pos)            the header table of that head, made when asked for
 * core.http_dechunk(buf, pos)            a chunked body at buf[pos..], when all of it is there
 *
 * All three are pure functions of their arguments: no handle, no wait, nothing kept between calls,
 * so they need no lifetime rules; the client keeps the buffer, the connection and the waits (each
 * socket wait goes through moonlet.tcp's C methods, bindings/tcp.c). They answer false when the
 * bytes end before what they parse does (the client reads more and calls again from the same pos)
 * and nil, "bad response" for anything malformed, after which the client closes the connection.
 *
 * The grammar is the client's (it was Lua before, and its specs pin it): lines end in CRLF; a head
 * that ends in a bare-LF empty line is read line by line with LF endings (a CR before the LF
 * dropped), while in a head that ends in CRLF CRLF a bare LF is an error. Header names are
 * lower-cased, repeated fields are joined with ", ", an obs-fold line continues the field before it
 * (joined with a space). Limits: 200 header lines, 64 KiB of head, 16 KiB per chunk-size line,
 * 64 KiB of trailers (dropped). llhttp is not used here: its strict mode refuses bare-LF heads,
 * which this client has always read, and its lenient flags are banned (STYLE.md).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "../core/numfmt.h"
#include "header_lines.h"
#include "mlua.h"

#define MAX_LINE 16384   /* a chunk-size or trailer line */
#define MAX_HEAD 65536   /* the whole header section; the trailers too */
#define MAX_HEADERS 200  /* header lines (continuations included) */
#define MAX_CHUNK_HEX 12 /* hex digits of a chunk size */
#define NAME_BUF 256     /* header names up to this long are lower-cased on the stack */

/* Body framing, as the client numbers it (NONE, LENGTH, CHUNKED, CLOSE in http_client.lua). */
enum { F_NONE = 0, F_LENGTH = 1, F_CHUNKED = 2, F_CLOSE = 3 };

static int bad(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "bad response");
  return 2;
}

static int is_ws(char c) { return c == ' ' || c == '\t'; }

static int ascii_lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* Position (1-based) argument: pos within [1, len + 1]; raises otherwise. */
static size_t check_pos(lua_State *L, int idx, size_t len) {
  lua_Integer pos = luaL_checkinteger(L, idx);
  if (pos < 1 || (size_t)pos > len + 1) luaL_argerror(L, idx, "position out of range");
  return (size_t)pos - 1;
}

/* -- Head ------------------------------------------------------------------------------------- */

/* The status line s[0, n): pushes reason and version and returns the status, or 0 (nothing
 * pushed) when the line is not "HTTP/d.d ddd[ reason]" with a status of 100 to 999. */
static int status_line(lua_State *L, const char *s, size_t n) {
  if (n < 12 || memcmp(s, "HTTP/", 5) != 0 || s[6] != '.' || s[8] != ' ') return 0;
  if (s[5] < '0' || s[5] > '9' || s[7] < '0' || s[7] > '9') return 0;
  int status = 0;
  for (int i = 9; i < 12; i++) {
    if (s[i] < '0' || s[i] > '9') return 0;
    status = status * 10 + (s[i] - '0');
  }
  if (status < 100) return 0;
  if (n > 12 && s[12] != ' ') return 0;
  /* the usual reason and versions are interned once, as upvalues 2, 3 and 4 of l_parse_head */
  if (n == 15 && s[13] == 'O' && s[14] == 'K')
    lua_pushvalue(L, lua_upvalueindex(2));
  else if (n > 13)
    lua_pushlstring(L, s + 13, n - 13);
  else
    lua_pushliteral(L, "");
  if (s[5] == '1' && (s[7] == '1' || s[7] == '0'))
    lua_pushvalue(L, lua_upvalueindex(s[7] == '1' ? 3 : 4));
  else
    lua_pushlstring(L, s + 5, 3); /* "1.1" */
  return status;
}

/* The fields framing needs, when each came once and unfolded: value spans (NULL: absent). */
typedef struct {
  const char *v[3];
  size_t n[3];
  int complex; /* one of them repeated, or an obs-fold line somewhere: read them from the table */
} frame_fields_t;

enum { FF_CONNECTION = 0, FF_TE, FF_CL };
static const char *const ff_names[3] = {"connection", "transfer-encoding", "content-length"};
static const char *const ff_titles[3] = {"Connection", "Transfer-Encoding", "Content-Length"};

/* s[0, n) equals the lower-case name lname[0, ln) but for the case of its letters. `title` (may be
 * NULL) is the name as servers usually spell it ("Content-Length"), tried first at memcmp speed. */
static int name_is(const char *s, size_t n, const char *lname, size_t ln, const char *title) {
  if (n != ln) return 0;
  if (title && memcmp(s, title, n) == 0) return 1;
  for (size_t i = 0; i < n; i++)
    if (ascii_lower((unsigned char)s[i]) != lname[i]) return 0;
  return 1;
}

/* Checks the header line s[0, n) (no line end) and, when hidx is not 0, adds it to the table at
 * hidx, leaving the field's name in stack slot `last` for an obs-fold line after it (a line that
 * starts with SP or HT continues the field before it, joined with a space). ff (may be NULL) gets
 * the spans of the fields framing needs. Returns 0, or -1 when the line is malformed. */
static int header_line(lua_State *L, int hidx, int last, const char *s, size_t n, int *seen,
                       frame_fields_t *ff) {
  if (n > 0 && is_ws(s[0])) { /* obs-fold (RFC 7230 3.2.4) */
    if (!*seen) return -1;
    if (ff) ff->complex = 1;
    if (!hidx) return 0;
    size_t i = 0;
    while (i < n && is_ws(s[i]))
      i++;
    lua_pushvalue(L, last);
    lua_pushvalue(L, last);
    lua_rawget(L, hidx);
    lua_pushliteral(L, " ");
    lua_pushlstring(L, s + i, n - i);
    lua_concat(L, 3);
    lua_rawset(L, hidx);
    return 0;
  }
  const char *colon = memchr(s, ':', n);
  if (!colon || colon == s || is_ws(colon[-1])) return -1; /* "Name : value" is refused too */
  *seen = 1;
  size_t nlen = (size_t)(colon - s);
  const char *v = colon + 1, *e = s + n;
  if (ff) { /* one of the framing fields? (told apart by length first) */
    int k = nlen == 10 ? FF_CONNECTION : nlen == 17 ? FF_TE : nlen == 14 ? FF_CL : -1;
    if (k >= 0 && name_is(s, nlen, ff_names[k], nlen, ff_titles[k])) {
      while (v < e && is_ws(*v))
        v++;
      while (e > v && is_ws(e[-1]))
        e--;
      if (ff->v[k]) ff->complex = 1;
      ff->v[k] = v;
      ff->n[k] = (size_t)(e - v);
    }
  }
  if (!hidx) return 0;
  while (v < e && is_ws(*v))
    v++;
  while (e > v && is_ws(e[-1]))
    e--;
  if (nlen <= NAME_BUF) {
    char name[NAME_BUF];
    for (size_t i = 0; i < nlen; i++)
      name[i] = (char)ascii_lower((unsigned char)s[i]);
    lua_pushlstring(L, name, nlen);
  } else {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < nlen; i++)
      luaL_addchar(&b, (char)ascii_lower((unsigned char)s[i]));
    luaL_pushresult(&b);
  }
  lua_replace(L, last);
  lua_pushvalue(L, last);
  lua_pushvalue(L, last);
  lua_rawget(L, hidx);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushlstring(L, v, (size_t)(e - v));
  } else { /* a repeated field: joined with a comma; Set-Cookie lines with a newline, since a
            * cookie's Expires date holds a comma and no header value holds a newline */
    if (name_is(s, nlen, "set-cookie", 10, "Set-Cookie"))
      lua_pushliteral(L, "\n");
    else
      lua_pushliteral(L, ", ");
    lua_pushlstring(L, v, (size_t)(e - v));
    lua_concat(L, 3);
  }
  lua_rawset(L, hidx);
  return 0;
}

/* Where the parts of a head are (scan_head). */
typedef struct {
  const char *status_end; /* the end of the status line, its line end excluded */
  const char *stop;       /* the empty line */
  const char *after;      /* the first byte after the head */
} head_spans_t;

/* The head at s[0, end) in one pass: each line is found once, each header line checked (and, when
 * hidx is not 0, added to the table at hidx: see header_line) and the framing fields collected
 * into ff (may be NULL) as it comes, until the empty line: LF LF, or LF CR LF. Returns 1 with *hd
 * set, 0 when the bytes end before the empty line, -1 when the head is complete and malformed: a
 * bad line, more than MAX_HEADERS, or a bare LF in a head that ends in CRLF CRLF (a "strict"
 * head: whether a bare LF is allowed is known only at the end, so a line is judged once the head
 * is all there; a head that ends in a bare-LF empty line is read with LF line ends, a CR before
 * an LF dropped). */
static int scan_head(lua_State *L, int hidx, int last, const char *s, const char *end,
                     head_spans_t *hd, frame_fields_t *ff) {
  const char *nl = memchr(s, '\n', (size_t)(end - s));
  if (!nl) return 0;
  int bare = !(nl > s && nl[-1] == '\r'), bad = 0, count = 0, seen = 0;
  hd->status_end = bare ? nl : nl - 1;
  for (;;) {
    const char *q = nl + 1; /* the next line */
    if (q >= end) return 0;
    if (*q == '\n' || *q == '\r') {
      if (*q == '\n' || (q + 1 < end && q[1] == '\n')) { /* the empty line */
        hd->stop = q;
        hd->after = q + (*q == '\n' ? 1 : 2);
        int strict = nl > s && nl[-1] == '\r' && *q == '\r';
        return bad || (strict && bare) ? -1 : 1;
      }
      if (q + 1 >= end) return 0; /* the next byte may complete it */
    }
    nl = memchr(q, '\n', (size_t)(end - q));
    if (!nl) return 0;
    const char *le = nl;
    if (le > q && le[-1] == '\r')
      le--;
    else
      bare = 1;
    if (!bad &&
        (++count > MAX_HEADERS || header_line(L, hidx, last, q, (size_t)(le - q), &seen, ff) < 0))
      bad = 1;
  }
}

/* Content-Length: digits, optionally repeated as a comma-separated list of the same number ("5, 5",
 * what joining repeated fields gives); blanks only around the commas ("1 0" is malformed), no sign
 * (RFC 9110 8.6). A value over 2^53 is malformed too: a Lua number holds it only approximately, and
 * a length read wrong frames the next response out of this one's body. Returns 0 with *n set, or
 * -1. */
static int content_length(const char *s, size_t len, double *n) {
  const uint64_t max = (uint64_t)1 << 53;
  const char *p = s, *end = s + len;
  int have = 0;
  uint64_t val = 0;
  for (;;) {
    while (p < end && is_ws(*p))
      p++;
    const char *d = p;
    uint64_t cur = 0;
    while (p < end && *p >= '0' && *p <= '9') {
      unsigned digit = (unsigned)(*p++ - '0');
      if (cur > (max - digit) / 10) return -1;
      cur = cur * 10 + digit;
    }
    int digits = p > d;
    while (p < end && is_ws(*p))
      p++;
    if (p < end && *p != ',') return -1;
    if (digits) {
      if (have && cur != val) return -1;
      val = cur;
      have = 1;
    }
    if (p == end) break;
    p++; /* the comma */
  }
  if (!have) return -1;
  *n = (double)val;
  return 0;
}

/* The next element of the comma-separated list at *p (which ends at end), trimmed of white space:
 * its start, and its length in *w (0 for an empty element); *p moves past its comma, to NULL after
 * the last element. NULL once the list has ended. */
static const char *next_item(const char **p, const char *end, size_t *w) {
  if (*p == NULL) return NULL;
  const char *comma = memchr(*p, ',', (size_t)(end - *p));
  const char *e = comma ? comma : end, *b = *p;
  while (b < e && is_ws(*b))
    b++;
  while (e > b && is_ws(e[-1]))
    e--;
  *p = comma ? comma + 1 : NULL;
  *w = (size_t)(e - b);
  return b;
}

/* Is word (lower case) one of the comma-separated tokens of s[0, n), compared without case? */
static int has_token(const char *s, size_t n, const char *word) {
  size_t len = strlen(word), w;
  const char *p = s, *b;
  while ((b = next_item(&p, s + n, &w)))
    if (name_is(b, w, word, len, NULL)) return 1;
  return 0;
}

/* The transfer codings of a response's Transfer-Encoding s[0, n) (RFC 9112 6.1): 1 when the last
 * one is chunked (then the body is framed by it), 0 when it is not (the body ends when the server
 * closes), -1 when the list holds a coding this client cannot remove. It removes chunked (last,
 * once) and one compression, gzip, x-gzip or deflate, applied before it (*coded is set then): a
 * transfer coding belongs to the connection, so a body is never handed on still wrapped in one,
 * and one that cannot be unwrapped (br, compress, two compressions) is a bad response, as curl
 * fails on an unknown coding. Empty list elements are skipped (RFC 9110 5.6.1). */
static int transfer_codings(const char *s, size_t n, int *coded) {
  const char *p = s, *b;
  size_t w;
  int chunked = 0;
  *coded = 0;
  while ((b = next_item(&p, s + n, &w))) {
    if (w == 0) continue;
    if (chunked) return -1; /* a coding after chunked */
    if (name_is(b, w, "chunked", 7, NULL))
      chunked = 1;
    else if (!*coded && (name_is(b, w, "gzip", 4, NULL) || name_is(b, w, "x-gzip", 6, NULL) ||
                         name_is(b, w, "deflate", 7, NULL)))
      *coded = 1;
    else
      return -1;
  }
  return chunked;
}

/* Framing of the body (RFC 9112 6.3) from the fields in ff: pushes mode, length, whether the
 * response lets the connection be reused, and whether a compression transfer coding is to be
 * removed from the body; returns 4, or 0 for a bad Content-Length or Transfer-Encoding. */
static int framing(lua_State *L, const frame_fields_t *ff, int status, int http11, int head) {
  const char *c = ff->v[FF_CONNECTION], *te = ff->v[FF_TE], *cl = ff->v[FF_CL];
  size_t clen = ff->n[FF_CONNECTION], tlen = ff->n[FF_TE];
  int keep = 1, mode = F_NONE, coded = 0;
  double n = 0;
  int ka = c && name_is(c, clen, "keep-alive", 10, "keep-alive"); /* the usual value: no search */
  if (c && !ka && has_token(c, clen, "close")) keep = 0;
  if (!http11) keep = keep && c && (ka || has_token(c, clen, "keep-alive"));
  if (head || status == 204 || status == 304 || status < 200) {
    mode = F_NONE;
  } else if (te) {
    int chunked = transfer_codings(te, tlen, &coded);
    if (chunked < 0) return 0;
    if (chunked) {
      mode = F_CHUNKED;
      keep = keep && !cl;
    } else {
      mode = F_CLOSE;
      keep = 0;
    }
  } else if (cl) {
    if (content_length(cl, ff->n[FF_CL], &n) < 0) return 0;
    mode = n > 0 ? F_LENGTH : F_NONE;
  } else {
    mode = F_CLOSE;
    keep = 0;
  }
  lua_pushinteger(L, mode);
  lua_pushnumber(L, n);
  lua_pushboolean(L, keep);
  lua_pushboolean(L, coded);
  return 4;
}

/* The framing fields as the table at hidx has them (joined and unfolded). */
static void fields_from_table(lua_State *L, int hidx, frame_fields_t *ff) {
  for (int k = 0; k < 3; k++) {
    lua_getfield(L, hidx, ff_names[k]);
    ff->v[k] = lua_tolstring(L, -1, &ff->n[k]); /* the table keeps the string alive */
    lua_pop(L, 1);
  }
}

/* syntax: status, reason, version, headers, next, mode, length, keep, coded =
 *           core.http_parse_head(buf, pos, head)
 * Parses the response head at buf[pos..]: next is the position after it, mode the framing of the
 * body (0 none, 1 Content-Length of `length` bytes, 2 chunked, 3 until the server closes), keep
 * whether the response allows the connection to be reused, coded whether a gzip or deflate
 * transfer coding wraps the body (the client inflates it). `head`: the request was HEAD (no
 * body). headers is false when the head was only checked: core.http_headers(buf, pos) makes the
 * table when it is asked for (most callers never look; an unusual head, with a repeated framing
 * field or an obs-fold line, has its table made at once). Returns false while the head is
 * incomplete, nil, "bad response" when it is malformed or too large (a bad Content-Length too, or
 * a transfer coding the client cannot remove). */
static int l_parse_head(lua_State *L) {
  size_t len;
  const char *buf = luaL_checklstring(L, 1, &len);
  size_t pos = check_pos(L, 2, len);
  int head = lua_toboolean(L, 3);
  const char *s = buf + pos;
  head_spans_t hd;
  frame_fields_t ff = {{NULL, NULL, NULL}, {0, 0, 0}, 0};
  int found = scan_head(L, 0, 0, s, buf + len, &hd, &ff);
  if (!found) {
    size_t have = len - pos;
    if (have >= 5 && memcmp(s, "HTTP/", 5) != 0) return bad(L);
    if (have > MAX_HEAD) return bad(L);
    lua_pushboolean(L, 0);
    return 1;
  }
  if ((size_t)(hd.stop - s) > MAX_HEAD + 4 || found < 0) return bad(L);
  lua_settop(L, 3);
  int status = status_line(L, s, (size_t)(hd.status_end - s)); /* pushes reason (4), version (5) */
  if (!status) return bad(L);
  int http11 = s[5] == '1' && s[7] == '1';
  if (ff.complex) {           /* the table now, and framing from its joined values */
    lua_createtable(L, 0, 8); /* 6 */
    lua_pushnil(L);           /* 7: the last field's name */
    scan_head(L, 6, 7, s, buf + len, &hd, NULL);
    lua_pop(L, 1);
    fields_from_table(L, 6, &ff);
  } else {
    lua_pushboolean(L, 0); /* 6 */
  }
  lua_pushinteger(L, status);
  lua_replace(L, 3); /* status, reason, version, headers */
  lua_pushinteger(L, (lua_Integer)(hd.after - buf) + 1);
  if (!framing(L, &ff, status, http11, head)) return bad(L);
  return 9;
}

/* syntax: headers = core.http_headers(buf, pos)
 * The header table of the head at buf[pos..], which core.http_parse_head checked: lower-case
 * names, repeated fields joined with ", " (Set-Cookie lines with "\n"). nil, "bad response" if it
 * is not a complete head. */
static int l_headers(lua_State *L) {
  size_t len;
  const char *buf = luaL_checklstring(L, 1, &len);
  size_t pos = check_pos(L, 2, len);
  head_spans_t hd;
  lua_settop(L, 2);
  lua_createtable(L, 0, 8); /* 3 */
  lua_pushnil(L);           /* 4 */
  if (scan_head(L, 3, 4, buf + pos, buf + len, &hd, NULL) != 1) return bad(L);
  lua_pop(L, 1);
  return 1;
}

/* -- Chunked body ------------------------------------------------------------------------------ */

/* The line at s[0, end): its end (CR before LF dropped) in *le and the start of the next in *next.
 * Returns 1, 0 when no LF is there yet, -1 when the line is over MAX_LINE already. */
static int line_at(const char *s, const char *end, const char **le, const char **next) {
  const char *nl = memchr(s, '\n', (size_t)(end - s));
  if (!nl) return end - s >= MAX_LINE ? -1 : 0;
  if (nl - s > MAX_LINE) return -1;
  *next = nl + 1;
  *le = nl > s && nl[-1] == '\r' ? nl - 1 : nl;
  return 1;
}

/* syntax: body, next = core.http_dechunk(buf, pos)
 * Decodes the chunked body at buf[pos..] when the whole of it (last chunk and trailers included)
 * is in buf: its data joined, and the position after it; chunk extensions and trailers are dropped.
 * false when more bytes are needed (nothing is consumed: the client goes on chunk by chunk),
 * nil, "bad response" when it is malformed. */
static int l_dechunk(lua_State *L) {
  size_t len;
  const char *buf = luaL_checklstring(L, 1, &len);
  size_t pos = check_pos(L, 2, len);
  const char *p = buf + pos, *end = buf + len, *le, *next;
  const char *one = NULL; /* the only chunk's data so far: no copy needed */
  size_t one_len = 0;
  int pieces = 0, top = lua_gettop(L);
  luaL_Buffer b;
  for (;;) {
    int r = line_at(p, end, &le, &next);
    if (r < 0) goto malformed;
    if (r == 0) goto more;
    const char *h = p;
    double size = 0;
    while (h < le && h - p < MAX_CHUNK_HEX + 1) {
      int c = ascii_lower((unsigned char)*h), d;
      if (c >= '0' && c <= '9')
        d = c - '0';
      else if (c >= 'a' && c <= 'f')
        d = c - 'a' + 10;
      else
        break;
      size = size * 16 + d;
      h++;
    }
    if (h == p || h - p > MAX_CHUNK_HEX) goto malformed;
    while (h < le && is_ws(*h))
      h++;
    if (h < le && *h != ';') goto malformed; /* only an extension may follow (after BWS) */
    p = next;
    if (size == 0) { /* the last chunk: trailers (dropped) until an empty line */
      size_t total = 0;
      for (;;) {
        r = line_at(p, end, &le, &next);
        if (r < 0) goto malformed;
        if (r == 0) goto more;
        int empty = le == p;
        total += (size_t)(le - p);
        if (total > MAX_HEAD) goto malformed;
        p = next;
        if (empty) break;
      }
      break;
    }
    if ((double)(size_t)(end - p) < size) goto more;
    size_t n = (size_t)size;
    if (pieces == 0) {
      one = p;
      one_len = n;
    } else {
      if (pieces == 1) {
        luaL_buffinit(L, &b);
        luaL_addlstring(&b, one, one_len);
      }
      luaL_addlstring(&b, p, n);
    }
    pieces++;
    p += n;
    r = line_at(p, end, &le, &next); /* the CRLF after the data */
    if (r < 0) goto malformed;
    if (r == 0) goto more;
    if (le != p) goto malformed;
    p = next;
  }
  if (pieces <= 1)
    lua_pushlstring(L, one ? one : "", one_len);
  else
    luaL_pushresult(&b);
  lua_pushinteger(L, (lua_Integer)(p - buf) + 1);
  return 2;
more:
  lua_settop(L, top); /* drops what the buffer holds */
  lua_pushboolean(L, 0);
  return 1;
malformed:
  lua_settop(L, top);
  return bad(L);
}

/* -- Request headers -------------------------------------------------------------------------- */
/* A caller's header table: names are strings, each value a string or a number (or a list of them:
 * the field is sent once for each). A value of any other type, or a number that has a metatable,
 * becomes text through tostring, which may call a metamethod: these functions leave such a table
 * to the client's Lua code (they answer so), and take the usual one in a single call, no Lua loop
 * (a loop aborts the JIT trace it is met in, and the request that built the table then ran in the
 * interpreter up to its first wait). Fields come in the order lua_next gives, pairs()'s order. */

/* Each value of a field, as the client sends it. */
enum { V_OK = 0, V_BAD = 1, V_LUA = 2 };

/* The text of the value at idx (a string, or a number as tostring writes it) in *s, *n (num: room
 * for a number's text); V_LUA when the client is to make it itself. */
static int value_text(lua_State *L, int idx, char num[ML_NUMFMT_MAX], const char **s, size_t *n) {
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) {
    *s = lua_tolstring(L, idx, n);
    return V_OK;
  }
  if (t != LUA_TNUMBER) return V_LUA;
  if (lua_getmetatable(L, idx)) { /* debug.setmetatable gave numbers a __tostring, maybe */
    lua_pop(L, 1);
    return V_LUA;
  }
  *n = ml_numfmt_g14(lua_tonumber(L, idx), num);
  *s = num;
  return *n ? V_OK : V_LUA;
}

/* The value at idx (absolute), or each item of a list there: V_OK, V_BAD (a control character),
 * or V_LUA. */
static int check_value(lua_State *L, int idx) {
  char num[ML_NUMFMT_MAX];
  const char *s;
  size_t n;
  if (!lua_istable(L, idx)) {
    int r = value_text(L, idx, num, &s, &n);
    return r != V_OK ? r : mlua_valid_value(s, n) ? V_OK : V_BAD;
  }
  for (int i = 1;; i++) { /* (ipairs: up to the first nil) */
    lua_rawgeti(L, idx, i);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      return V_OK;
    }
    int r = value_text(L, lua_gettop(L), num, &s, &n);
    if (r == V_OK && !mlua_valid_value(s, n)) r = V_BAD;
    lua_pop(L, 1);
    if (r != V_OK) return r;
  }
}

/* syntax: kind, name = core.http_check_headers(headers)
 * Nothing when every name of the table is a token and every value holds no control character but
 * HT; else the first field that is not so: 1, name (a name that is not a token, or not a string),
 * 2, name (a value), or 3 when a value is to be made text by tostring (the client checks the
 * table in Lua). */
static int l_check_headers(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, 1)) { /* key 2, value 3 */
    size_t n = 0;
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &n) : NULL;
    int kind = 0, r;
    if (!k || !mlua_valid_token(k, n))
      kind = 1;
    else if ((r = check_value(L, 3)) != V_OK)
      kind = r == V_BAD ? 2 : 3;
    lua_pop(L, 1);
    if (kind) {
      lua_pushinteger(L, kind);
      lua_insert(L, 2);
      return 2;
    }
  }
  return 0;
}

/* The lower-case names build_request looks for, and the bit each one sets. */
static const struct {
  const char *name;
  size_t len;
} known_fields[] = {{"host", 4},
                    {"user-agent", 10},
                    {"content-length", 14},
                    {"transfer-encoding", 17},
                    {"accept-encoding", 15},
                    {"connection", 10},
                    {"authorization", 13},
                    {"proxy-authorization", 19}};
enum { K_HOST = 0, K_UA, K_CL, K_TE, K_AE, K_CONN, K_AUTH, K_PAUTH, K_COUNT };

/* Appends the lines of the field name k (kn bytes) whose value is at idx (absolute): V_OK, or
 * V_LUA (nothing appended then); -1 when out of memory. */
static int add_field(lua_State *L, mlua_lines_t *b, const char *k, size_t kn, int idx) {
  char num[ML_NUMFMT_MAX];
  const char *s;
  size_t n;
  if (!lua_istable(L, idx)) {
    int r = value_text(L, idx, num, &s, &n);
    return r != V_OK ? r : mlua_lines_add(b, k, kn, s, n);
  }
  size_t mark = b->len;
  for (int i = 1;; i++) {
    lua_rawgeti(L, idx, i);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      return V_OK;
    }
    int r = value_text(L, lua_gettop(L), num, &s, &n);
    if (r == V_OK) r = mlua_lines_add(b, k, kn, s, n);
    lua_pop(L, 1);
    if (r != V_OK) {
      b->len = mark;
      return r;
    }
  }
}

/* syntax: lines, cl, host, ua, te, ae, conn, auth, pauth, own_id =
 *           core.http_format_headers(headers, id_name)
 * The "Name: value\r\n" lines of a checked header table (names as the caller spelled them, a list
 * once per item), what the head must not add again (whether it has a Host, User-Agent,
 * Transfer-Encoding, Accept-Encoding, Connection, Authorization or Proxy-Authorization field, in
 * any letter case), the value of its Content-Length field (as the table holds it; nil: none) and
 * whether it has a field named id_name (lower case; may be nil). nil when a value is to be made
 * text by tostring: the client formats that table in Lua. Raises when out of memory. */
static int l_format_headers(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t idn = 0;
  const char *id = lua_isnoneornil(L, 2) ? NULL : luaL_checklstring(L, 2, &idn);
  lua_settop(L, 2);
  lua_pushnil(L); /* 3: the Content-Length value */
  mlua_lines_t b;
  mlua_lines_init(&b);
  int has[K_COUNT] = {0}, own_id = 0, r = V_OK;
  lua_pushnil(L);
  while (lua_next(L, 1)) { /* key 4, value 5 */
    size_t kn;
    const char *k = lua_tolstring(L, 4, &kn); /* a string: the table was checked */
    for (int f = 0; f < K_COUNT; f++)
      if (kn == known_fields[f].len && strncasecmp(k, known_fields[f].name, kn) == 0) {
        has[f] = 1;
        if (f == K_CL) {
          lua_pushvalue(L, 5);
          lua_replace(L, 3);
        }
        break;
      }
    if (id && kn == idn && strncasecmp(k, id, kn) == 0) own_id = 1;
    r = add_field(L, &b, k, kn, 5);
    lua_pop(L, 1);
    if (r != V_OK) break;
  }
  if (r == V_OK) lua_pushlstring(L, b.p, b.len);
  mlua_lines_free(&b);
  if (r == V_LUA) return 0;
  if (r < 0) return luaL_error(L, "moonlet.http: out of memory");
  lua_pushvalue(L, 3);
  for (int f = 0; f < K_COUNT; f++)
    if (f != K_CL) lua_pushboolean(L, has[f]);
  lua_pushboolean(L, own_id);
  return 10;
}

/* syntax: value = core.http_header_named(headers, lname)
 * The value of the first field (pairs()'s order) of a checked header table whose name is lname
 * (lower case) in any letter case; nil when there is none. */
static int l_header_named(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t ln;
  const char *lname = luaL_checklstring(L, 2, &ln);
  lua_settop(L, 2);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    size_t kn;
    if (lua_type(L, 3) == LUA_TSTRING) {
      const char *k = lua_tolstring(L, 3, &kn);
      if (kn == ln && strncasecmp(k, lname, kn) == 0) return 1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

void mlua_open_http_client(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"http_headers", l_headers},
                                 {"http_dechunk", l_dechunk},
                                 {"http_check_headers", l_check_headers},
                                 {"http_format_headers", l_format_headers},
                                 {"http_header_named", l_header_named},
                                 {NULL, NULL}};
  mlua_register(L, m, fns);
  lua_pushlightuserdata(L, m);
  lua_pushliteral(L, "OK");
  lua_pushliteral(L, "1.1");
  lua_pushliteral(L, "1.0");
  lua_pushcclosure(L, l_parse_head, 4);
  lua_setfield(L, -2, "http_parse_head");
}
