/* bindings/pg_value.c: PostgreSQL values from their text (libpq's text result format) to Lua, for
 * bindings/pg.c's rows (see pg_value.h). Nothing here is kept between calls: every string pushed
 * is a value of the result, and an array's escaped elements are unescaped into the caller's
 * scratch userdata (mlua_pg_scratch_t), so an array of any size makes no garbage per element.
 *
 * An array's text is array_out's: an optional "[lb:ub]...=" when a lower bound is not 1 (the
 * bounds are dropped: every level comes as a 1-based sequence), then "{...}" with the elements
 * separated by "," (the delimiter of every element type decoded here; box[] uses ";" and keeps its
 * text), a level of a multidimensional array being a nested "{...}". An element is quoted, with
 * its " and \ escaped by a \, when it is empty, holds a delimiter, a brace, a quote, a backslash
 * or a space, or spells NULL in any case; an unquoted NULL (any case) is SQL NULL, which becomes
 * moonlet.pg.null (cjson.null, the NULL light userdata: a sequence cannot hold nil). Text that does
 * not parse as an array is pushed as it is, as before.
 *
 * json and jsonb come as their text unless the connection decodes JSON (the pool's json option):
 * bindings/pg.c then maps those columns to the pseudo types T_JSON and T_JSON_ARRAY once per
 * result, and each value (each element of a json[] or jsonb[], once unescaped) is given to the
 * decoder, a Lua function (moonlet.json.decode) it keeps on the stack for the result. The decoder
 * is the only Lua code that runs here; it does not yield.
 */
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "pg_value.h"

#define MAX_DIMS 6 /* PostgreSQL's MAXDIM: a deeper array keeps its text */

static int numeric_oid(unsigned t) {
  return t == 20 || t == 21 || t == 23 || t == 26 || t == 700 || t == 701 || t == 1700;
}

static int hex_digit(unsigned char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  ch |= 0x20;
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  return -1;
}

/* Pushes a bytea value's raw bytes from PostgreSQL's text output of it: hex ("\x6162", the
 * default bytea_output) or escape ("ab\\\001"). Returns 0 (pushing nothing) when v is neither. */
static int push_bytea(lua_State *L, const char *v, size_t len) {
  const unsigned char *p = (const unsigned char *)v, *end = p + len;
  int hex = len >= 2 && p[0] == '\\' && p[1] == 'x';
  if (hex) {
    if (len % 2) return 0;
    for (const unsigned char *q = p + 2; q < end; q++)
      if (hex_digit(*q) < 0) return 0;
    p += 2;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  while (p < end) {
    char *out = luaL_prepbuffer(&b);
    size_t n = 0;
    if (hex) {
      for (; p < end && n < LUAL_BUFFERSIZE; p += 2)
        out[n++] = (char)(hex_digit(p[0]) << 4 | hex_digit(p[1]));
    } else {
      for (; p < end && n < LUAL_BUFFERSIZE; n++) {
        if (*p != '\\') {
          out[n] = (char)*p++;
        } else if (end - p >= 2 && p[1] == '\\') {
          out[n] = '\\';
          p += 2;
        } else if (end - p >= 4 && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' &&
                   p[3] >= '0' && p[3] <= '7') {
          out[n] = (char)((p[1] - '0') << 6 | (p[2] - '0') << 3 | (p[3] - '0'));
          p += 4;
        } else {
          out[n] = (char)*p++; /* not what byteaout writes: kept as it is */
        }
      }
    }
    luaL_addsize(&b, n);
  }
  luaL_pushresult(&b);
  return 1;
}

/* Does the decimal text v of an int8 or numeric (a sign, digits, maybe a fraction; or NaN,
 * Infinity) keep every digit as a double? It does when it is an integer within +-2^53, or has at
 * most 15 significant digits (DBL_DIG: the double prints back as the same decimal). */
static int fits_double(const char *v, size_t len) {
  const char *p = v, *end = v + len;
  if (p < end && (*p == '-' || *p == '+')) p++;
  while (p < end && *p == '0')
    p++;
  const char *digits = p;
  while (p < end && *p >= '0' && *p <= '9')
    p++;
  size_t nint = (size_t)(p - digits);
  if (p < end && *p != '.') return 1; /* NaN, Infinity */
  const char *frac = p < end ? p + 1 : end, *fend = end;
  while (fend > frac && fend[-1] == '0') /* 12.500 is 12.5 */
    fend--;
  if (fend == frac) /* an integer */
    return nint < 16 || (nint == 16 && memcmp(digits, "9007199254740992", 16) <= 0);
  if (nint == 0) /* 0.00012: the significant digits start at the 1 */
    while (frac < fend && *frac == '0')
      frac++;
  return nint + (size_t)(fend - frac) <= 15;
}
/* Pushes a scalar of the type with OID `type` from its text v[0..len), which is followed by a NUL
 * or by a character no number's text holds (an array's "," "}" or '"'), so strtod stops at its end.
 */
static void push_scalar(lua_State *L, const char *v, size_t len, unsigned type, int big) {
  if (type == 16) {
    lua_pushboolean(L, len > 0 && v[0] == 't');
  } else if (type == 17) {
    if (!push_bytea(L, v, len)) lua_pushlstring(L, v, len);
  } else if ((type == 20 || type == 1700) && big != B_NUMBER &&
             (big == B_STRING || !fits_double(v, len))) {
    lua_pushlstring(L, v, len); /* int8 or numeric, every digit */
  } else if (numeric_oid(type)) {
    char *end;
    double d = strtod(v, &end);
    if (end == v)
      lua_pushlstring(L, v, len); /* not a number after all */
    else
      lua_pushnumber(L, d);
  } else {
    lua_pushlstring(L, v, len);
  }
}

/* The element type of the array types that come as tables, or 0 for the others (their text). The
 * text-like elements (25) come as their text, as their scalars do. T_JSON is here too (its own
 * "element"), so that mlua_pg_push_value finds it in the branch arrays take, with no test of its
 * own for the other scalars. */
static unsigned array_elem(unsigned type) {
  switch (type) {
  case T_JSON:
  case T_JSON_ARRAY: return T_JSON;
  case 1000: return 16;   /* bool[] */
  case 1001: return 17;   /* bytea[] */
  case 1005: return 21;   /* int2[] */
  case 1007: return 23;   /* int4[] */
  case 1016: return 20;   /* int8[] */
  case 1021: return 700;  /* float4[] */
  case 1022: return 701;  /* float8[] */
  case 1028: return 26;   /* oid[] */
  case 1231: return 1700; /* numeric[] */
  case 1002:              /* "char"[] */
  case 1003:              /* name[] */
  case 1009:              /* text[] */
  case 1014:              /* bpchar[] */
  case 1015:              /* varchar[] */
  case 1115:              /* timestamp[] */
  case 1182:              /* date[] */
  case 1183:              /* time[] */
  case 1185:              /* timestamptz[] */
  case 1187:              /* interval[] */
  case 1270:              /* timetz[] */
  case 2951: return 25;   /* uuid[] */
  default: return 0;
  }
}

unsigned mlua_pg_json_type(unsigned type) {
  if (type == 114 || type == 3802) return T_JSON;       /* json, jsonb */
  if (type == 199 || type == 3807) return T_JSON_ARRAY; /* json[], jsonb[] */
  return type;
}

/* Pushes what the decoder at slot d->json makes of the JSON text v[0..len); raises "cannot decode
 * json: " and its message when it refuses the text (it returns nil, err: cjson.safe). */
static void push_json(lua_State *L, const char *v, size_t len, mlua_pg_decode_t *d) {
  lua_pushvalue(L, d->json);
  lua_pushlstring(L, v, len);
  lua_call(L, 1, 2);
  if (lua_isnil(L, -2)) {
    const char *err = lua_tostring(L, -1);
    lua_pushfstring(L, "cannot decode json: %s", err ? err : "?");
    lua_error(L);
  }
  lua_pop(L, 1);
}

/* The scratch, at least `need` bytes (pg_value.h). */
static char *scratch(lua_State *L, mlua_pg_scratch_t *s, size_t need) {
  if (need > s->cap) {
    size_t cap = s->cap * 2 > need ? s->cap * 2 : need < 256 ? 256 : need;
    s->buf = lua_newuserdata(L, cap);
    s->cap = cap;
    lua_replace(L, s->slot);
  }
  return s->buf;
}

/* Pushes the array element that starts at p (before end) and returns what follows it (past its
 * closing quote when quoted); NULL, pushing nothing, when there is no element there. */
static const char *push_element(lua_State *L, const char *p, const char *end, unsigned elem,
                                mlua_pg_decode_t *d) {
  int quoted = *p == '"', escaped = 0;
  if (quoted) p++;
  const char *start = p;
  for (; p < end; p++) {
    if (*p == '\\') { /* the next character as it is */
      escaped = 1;
      if (++p == end) return NULL;
    } else if (quoted ? *p == '"' : *p == ',' || *p == '}') {
      break;
    }
  }
  if (p == end) return NULL; /* no closing quote, or no "," or "}" after it */
  size_t n = (size_t)(p - start);
  if (!quoted) {
    if (n == 0) return NULL;
    if (n == 4 && !escaped && (start[0] | 0x20) == 'n' && (start[1] | 0x20) == 'u' &&
        (start[2] | 0x20) == 'l' && (start[3] | 0x20) == 'l') {
      lua_pushlightuserdata(L, NULL); /* moonlet.pg.null */
      return p;
    }
  }
  const char *v = start;
  if (escaped) { /* every \ in [start, p) has the character it escapes there too */
    char *b = scratch(L, &d->scratch, n + 1);
    size_t k = 0;
    for (const char *q = start; q < p; q++) {
      if (*q == '\\') q++;
      b[k++] = *q;
    }
    b[k] = '\0';
    v = b;
    n = k;
  }
  if (elem == T_JSON)
    push_json(L, v, n, d);
  else
    push_scalar(L, v, n, elem, d->big);
  return quoted ? p + 1 : p;
}

/* Pushes the array whose text is v[0..len) as a table of its elements (nested ones for more
 * dimensions); returns 0, pushing nothing, when v is not an array's text. One pass, each element
 * appended to its level's table: linear in len. */
static int push_array(lua_State *L, const char *v, size_t len, unsigned elem, mlua_pg_decode_t *d) {
  const char *p = v, *end = v + len;
  if (p < end && *p == '[') { /* "[0:2]={...}": the bounds are dropped */
    const char *eq = memchr(p, '=', len);
    if (!eq) return 0;
    p = eq + 1;
  }
  if (p == end || *p != '{') return 0;
  int top = lua_gettop(L);
  luaL_checkstack(L, MAX_DIMS + LUA_MINSTACK, "moonlet.pg: an array");
  int depth = 0, item = 1; /* item: at an element's place (after "{" or ",") */
  int count[MAX_DIMS];     /* the elements of each open level so far */
  while (p < end) {
    if (item && *p == '{') { /* a level opens */
      if (depth == MAX_DIMS) break;
      lua_newtable(L);
      count[depth++] = 0;
      p++;
      item = p == end || *p != '}'; /* "{}": empty */
    } else if (item) {
      p = push_element(L, p, end, elem, d);
      if (!p) break;
      lua_rawseti(L, -2, ++count[depth - 1]);
      item = 0;
    } else if (*p == ',') {
      p++;
      item = 1;
    } else if (*p == '}') { /* a level closes: into the level around it, or the whole array */
      p++;
      if (--depth == 0) {
        if (p == end) return 1;
        break;
      }
      lua_rawseti(L, -2, ++count[depth - 1]);
    } else {
      break;
    }
  }
  lua_settop(L, top); /* not an array's text after all */
  return 0;
}

void mlua_pg_push_value(lua_State *L, const char *v, size_t len, unsigned type,
                        mlua_pg_decode_t *d) {
  unsigned elem = array_elem(type);
  if (elem) {
    if (type == T_JSON) {
      push_json(L, v, len, d);
      return;
    }
    if (push_array(L, v, len, elem, d)) return;
  }
  push_scalar(L, v, len, type, d->big);
}
