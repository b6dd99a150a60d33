/* bindings/regex.c: Perl-compatible regular expressions for Lua over PCRE2 (8-bit), the library
 * and dialect of nginx and OpenResty, so that a lua-resty driver's patterns mean here what they
 * mean there. moonlet.ngx builds ngx.re on these; nothing else in moonlet needs them.
 *
 *   rx, err = core.regex(pattern, flags)                 a compiled regex object
 *   m, from, to, next = rx:match(subject, init, res, checked)
 *   mend, from, to = rx:find(subject, init, nth, checked)
 *   newstr, n = rx:gsub(subject, template, global)
 *   core.regex_match(subject, pattern, flags, init, res, checked)   the same, with no object
 *   core.regex_find(subject, pattern, flags, init, nth, checked)
 *   core.regex_gsub(subject, pattern, flags, template, global)
 *   entries, max, compiles = core.regex_cache(max)
 *
 * Offsets are 0-based bytes: `init` is where matching starts, `from`/`to` are the match's start
 * and end (end exclusive), `next` where a global match goes on (the end, or one character past
 * an empty match). Flags are OpenResty's letters (unknown ones raise). A bad pattern returns nil
 * and OpenResty's message (`pcre2_compile() failed: ... in "..."`), a failed match nil and
 * `pcre_exec() failed: <code>`.
 *
 * Ownership: a compiled regex (rx_t: the pcre2 code, its match data, its name table) is C memory
 * with a reference count. The instance's cache (m->regex, made on first use, linked in the
 * instance's resources so that moonlet_free frees it before the Lua state closes) holds one
 * reference on each regex it indexes, at most `max` (1024, as OpenResty's
 * lua_regex_cache_max_entries) of them, keyed by pattern and flags and evicted least recently
 * used first. Each regex object (a userdata holding a pointer) holds one more, dropped by its
 * __gc; each call holds one while it runs, so that a finalizer that runs ngx.re and evicts
 * cannot free the regex under it. A regex is freed when its count drops to 0. Memory is so
 * bounded by `max` plus the regexes that live objects hold. A match copies its offsets out of the
 * regex's (reused) match data before it makes any Lua value. No global state: everything hangs off
 * the instance, and only the loop thread calls these (thread-pool Lua states have no core).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mlua.h"
#include "pcre2_api.h"

#define REGEX_MT "moonlet.regex"
#define CACHE_MAX 1024              /* regexes the cache keeps by default */
#define CACHE_MAX_LIMIT 65536       /* the most core.regex_cache accepts */
#define NBUCKETS 2048               /* hash buckets (a power of 2) */
#define JIT_STACK_MIN (32 * 1024)   /* the JIT's stack starts this large ... */
#define JIT_STACK_MAX (1024 * 1024) /* ... and grows to this (PCRE2's own default is 32 KiB) */
#define DFA_WORKSPACE 1000          /* ints of pcre2_dfa_match's workspace */
#define OV_STACK 32                 /* captures whose offsets fit on the C stack */
#define NAME_MAX_LEN 32             /* PCRE2's longest group name */

typedef struct rx_s rx_t;
struct rx_s {
  pcre2_code *code;
  pcre2_match_data *md; /* reused by every match; results are copied out at once */
  uint32_t ncap;        /* capture groups */
  uint32_t namecount;   /* named groups: entries of the name table */
  uint32_t nameentry;   /* bytes per entry: 2 (group number) + the name, NUL-terminated */
  PCRE2_SPTR nametable; /* inside code */
  uint32_t opts;        /* compile options: with jit and the pattern, the cache key */
  unsigned jit : 1;     /* pcre2_jit_compile was asked for ("j") */
  unsigned utf : 1;     /* PCRE2_UTF ("u") */
  unsigned dup : 1;     /* PCRE2_DUPNAMES ("D"): named captures come as arrays */
  unsigned cached : 1;  /* indexed by the cache, which holds one reference */
  int refs;
  uint32_t hash;
  rx_t *hnext;       /* the hash bucket's chain */
  rx_t *prev, *next; /* the cache's recency list, most recent first */
  size_t plen;       /* the pattern's length */
  char pattern[];    /* the pattern, NUL-terminated */
};

struct mlua_regex_cache_s {
  mlua_res_t res; /* first: linked in the instance's resources, closed by moonlet_free */
  moonlet_t *m;
  rx_t *buckets[NBUCKETS];
  rx_t *head, *tail; /* recency list */
  unsigned count, max;
  double compiles;            /* patterns compiled so far (core.regex_cache) */
  pcre2_match_context *mctx;  /* NULL: PCRE2's defaults */
  pcre2_jit_stack *jit_stack; /* assigned to mctx; NULL: the JIT's 32 KiB */
};
typedef struct mlua_regex_cache_s cache_t;

typedef struct {
  uint32_t opts;
  int jit, dfa;
} flags_t;

/* The object: a pointer to its regex (NULL once collected), and the "d" flag, which is not part of
 * the compiled regex but of how it runs. */
typedef struct {
  rx_t *rx;
  int dfa;
} handle_t;

/* -- Regexes and the cache -------------------------------------------------------------------- */

static void rx_free(rx_t *rx) {
  pcre2_match_data_free(rx->md);
  pcre2_code_free(rx->code);
  free(rx);
}

static void rx_unref(rx_t *rx) {
  if (--rx->refs == 0) rx_free(rx);
}

static void list_unlink(cache_t *c, rx_t *rx) {
  if (rx->prev)
    rx->prev->next = rx->next;
  else
    c->head = rx->next;
  if (rx->next)
    rx->next->prev = rx->prev;
  else
    c->tail = rx->prev;
  rx->prev = rx->next = NULL;
}

static void list_push_front(cache_t *c, rx_t *rx) {
  rx->prev = NULL;
  rx->next = c->head;
  if (c->head) c->head->prev = rx;
  c->head = rx;
  if (!c->tail) c->tail = rx;
}

/* Takes rx out of the cache and drops the cache's reference (rx is freed unless in use). */
static void cache_drop(cache_t *c, rx_t *rx) {
  rx_t **pp = &c->buckets[rx->hash & (NBUCKETS - 1)];
  while (*pp != rx)
    pp = &(*pp)->hnext;
  *pp = rx->hnext;
  rx->hnext = NULL;
  list_unlink(c, rx);
  rx->cached = 0;
  c->count--;
  rx_unref(rx);
}

static void cache_trim(cache_t *c) {
  while (c->count > c->max)
    cache_drop(c, c->tail);
}

/* moonlet_free (the instance's resources): drops every cached regex (objects still alive free
 * theirs from __gc when the Lua state closes, which is after this) and the cache itself. */
static void cache_close(mlua_res_t *r) {
  cache_t *c = (cache_t *)r;
  c->m->regex = NULL;
  c->max = 0;
  cache_trim(c);
  if (c->mctx) pcre2_match_context_free(c->mctx);
  if (c->jit_stack) pcre2_jit_stack_free(c->jit_stack);
  free(c);
}

/* The instance's cache, made on first use; NULL once moonlet_free has begun (nothing may be linked
 * in its resources then) or when out of memory: regexes are then compiled for one use. */
static cache_t *cache_of(moonlet_t *m) {
  if (m->regex || m->tearing_down) return m->regex;
  cache_t *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->m = m;
  c->max = CACHE_MAX;
  c->mctx = pcre2_match_context_create(NULL);
  c->jit_stack = pcre2_jit_stack_create(JIT_STACK_MIN, JIT_STACK_MAX, NULL); /* NULL: no JIT */
  if (c->mctx && c->jit_stack) pcre2_jit_stack_assign(c->mctx, NULL, c->jit_stack);
  mlua_res_link(m, &c->res, cache_close);
  m->regex = c;
  return c;
}

static uint32_t key_hash(const char *p, size_t n, uint32_t opts, int jit) {
  uint32_t h = 2166136261u ^ opts ^ (jit ? 0x9e3779b9u : 0); /* FNV-1a */
  for (size_t i = 0; i < n; i++)
    h = (h ^ (unsigned char)p[i]) * 16777619u;
  return h;
}

static void push_compile_error(lua_State *L, const char *pat, size_t n, int code, size_t off) {
  PCRE2_UCHAR msg[128];
  if (pcre2_get_error_message(code, msg, sizeof msg) < 0) strcpy((char *)msg, "unknown error");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "pcre2_compile() failed: ");
  luaL_addstring(&b, (const char *)msg);
  luaL_addstring(&b, " in \"");
  luaL_addlstring(&b, pat, n);
  luaL_addchar(&b, '"');
  if (off < n) { /* nginx's form: where it stopped, to the end */
    luaL_addstring(&b, " at \"");
    luaL_addlstring(&b, pat + off, n - off);
    luaL_addchar(&b, '"');
  }
  luaL_pushresult(&b);
}

/* Compiles a new regex (refs 0, not cached). NULL with the error message pushed when the pattern
 * is bad or memory ran out. */
static rx_t *rx_compile(lua_State *L, const char *pat, size_t n, const flags_t *f, uint32_t hash) {
  int code;
  PCRE2_SIZE off;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, n, f->opts, &code, &off, NULL);
  if (!re) {
    push_compile_error(L, pat, n, code, off);
    return NULL;
  }
  if (f->jit) pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* an optimization: failure is fine */
  rx_t *rx = calloc(1, sizeof *rx + n + 1);
  pcre2_match_data *md = rx ? pcre2_match_data_create_from_pattern(re, NULL) : NULL;
  if (!md) {
    free(rx);
    pcre2_code_free(re);
    lua_pushliteral(L, "regex compilation failed: no memory");
    return NULL;
  }
  rx->code = re;
  rx->md = md;
  pcre2_pattern_info(re, PCRE2_INFO_CAPTURECOUNT, &rx->ncap);
  pcre2_pattern_info(re, PCRE2_INFO_NAMECOUNT, &rx->namecount);
  if (rx->namecount > 0) {
    pcre2_pattern_info(re, PCRE2_INFO_NAMEENTRYSIZE, &rx->nameentry);
    pcre2_pattern_info(re, PCRE2_INFO_NAMETABLE, &rx->nametable);
  }
  rx->opts = f->opts;
  rx->jit = f->jit != 0;
  rx->utf = (f->opts & PCRE2_UTF) != 0;
  rx->dup = (f->opts & PCRE2_DUPNAMES) != 0;
  rx->hash = hash;
  rx->plen = n;
  memcpy(rx->pattern, pat, n);
  return rx;
}

/* The regex for pattern and flags: the cached one (now the most recent), or a new one, cached
 * unless the cache is off. The caller takes a reference at once (rx->refs++) and drops it with
 * rx_unref. NULL with the error message pushed for a bad pattern. Raises when PCRE2 cannot be
 * opened: every call into PCRE2 follows this one. */
static rx_t *rx_get(lua_State *L, moonlet_t *m, const char *pat, size_t n, const flags_t *f) {
  const char *missing = ml_pcre2_load();
  if (missing) luaL_error(L, "%s", missing);
  cache_t *c = cache_of(m);
  uint32_t h = key_hash(pat, n, f->opts, f->jit);
  if (c) {
    for (rx_t *rx = c->buckets[h & (NBUCKETS - 1)]; rx; rx = rx->hnext) {
      if (rx->hash == h && rx->opts == f->opts && rx->jit == (f->jit != 0) && rx->plen == n &&
          memcmp(rx->pattern, pat, n) == 0) {
        if (c->head != rx) {
          list_unlink(c, rx);
          list_push_front(c, rx);
        }
        return rx;
      }
    }
  }
  rx_t *rx = rx_compile(L, pat, n, f, h);
  if (!rx || !c) return rx;
  c->compiles++;
  if (c->max == 0) return rx;
  rx->cached = 1;
  rx->refs = 1;
  rx->hnext = c->buckets[h & (NBUCKETS - 1)];
  c->buckets[h & (NBUCKETS - 1)] = rx;
  list_push_front(c, rx);
  c->count++;
  cache_trim(c); /* the new one is the most recent: never the one evicted */
  return rx;
}

/* OpenResty's option letters -> PCRE2 compile options and the run flags. "o" (compile once) is
 * what the cache does for every regex; "U" is "u" with the subject's UTF-8 still checked (PCRE2
 * on invalid UTF-8 without the check is undefined behaviour); "J" (PCRE1's JavaScript mode) is
 * what PCRE2 documents in its place: \u escapes, empty classes, unset back references. */
static void check_flags(lua_State *L, int idx, flags_t *f) {
  size_t n = 0;
  const char *s = lua_isnoneornil(L, idx) ? "" : luaL_checklstring(L, idx, &n);
  memset(f, 0, sizeof *f);
  for (size_t i = 0; i < n; i++) {
    switch (s[i]) {
    case 'o': break;
    case 'j': f->jit = 1; break;
    case 'i': f->opts |= PCRE2_CASELESS; break;
    case 's': f->opts |= PCRE2_DOTALL; break;
    case 'm': f->opts |= PCRE2_MULTILINE; break;
    case 'u':
    case 'U': f->opts |= PCRE2_UTF; break;
    case 'x': f->opts |= PCRE2_EXTENDED; break;
    case 'd': f->dfa = 1; break;
    case 'a': f->opts |= PCRE2_ANCHORED; break;
    case 'D': f->opts |= PCRE2_DUPNAMES; break;
    case 'J':
      f->opts |= PCRE2_ALT_BSUX | PCRE2_ALLOW_EMPTY_CLASS | PCRE2_MATCH_UNSET_BACKREF;
      break;
    default: luaL_error(L, "unknown flag \"%c\" (flags \"%s\")", s[i], s);
    }
  }
}

/* -- Matching ----------------------------------------------------------------------------------
 */

typedef struct {
  const char *s;
  size_t len;
  size_t init; /* where matching starts */
  int checked; /* a call on this subject already validated its UTF-8 (gmatch, gsub) */
} subject_t;

/* The subject at sidx and the offset at iidx (0 when absent, or when iidx is 0). */
static void check_subject(lua_State *L, int sidx, int iidx, subject_t *sj) {
  sj->s = luaL_checklstring(L, sidx, &sj->len);
  lua_Number init = iidx ? luaL_optnumber(L, iidx, 0) : 0;
  luaL_argcheck(L, init >= 0, iidx, "offset must not be negative");
  sj->init = init > (lua_Number)sj->len + 1 ? sj->len + 1 : (size_t)init; /* past the end: PCRE2 */
  sj->checked = 0;
}

/* Offsets of one match: pairs of (start, end) for the whole match and each group. */
typedef struct {
  PCRE2_SIZE *ov;
  uint32_t npairs; /* ncap + 1, or 1 for "d" (the longest match) */
  PCRE2_SIZE local[2 * OV_STACK];
} ovec_t;

/* Makes room for rx's offsets: on the C stack, or in a scratch userdata pushed now (before the
 * match, so that nothing allocates between a match and the copy of its offsets). */
static void ovec_init(lua_State *L, ovec_t *o, const rx_t *rx, int dfa) {
  o->npairs = dfa ? 1 : rx->ncap + 1;
  o->ov = o->npairs <= OV_STACK ? o->local
                                : lua_newuserdata(L, 2 * (size_t)o->npairs * sizeof(PCRE2_SIZE));
}

/* Runs rx on the subject from offset `at`. Returns PCRE2's code (> 0: matched, the offsets are in
 * o; PCRE2_ERROR_NOMATCH; or another negative error). */
static int rx_exec(moonlet_t *m, rx_t *rx, int dfa, const subject_t *sj, size_t at, ovec_t *o) {
  pcre2_match_context *mctx = m->regex ? m->regex->mctx : NULL;
  uint32_t mopts = 0;
  /* The first call validated the subject's UTF-8 (to its end); later ones start at a character
   * boundary (a match's end, or one character past an empty match) unless \C split one. */
  if (rx->utf && sj->checked && (at >= sj->len || ((unsigned char)sj->s[at] & 0xC0) != 0x80))
    mopts |= PCRE2_NO_UTF_CHECK;
  int rc;
  if (dfa) {
    int ws[DFA_WORKSPACE];
    rc = pcre2_dfa_match(rx->code, (PCRE2_SPTR)sj->s, sj->len, at, mopts, rx->md, mctx, ws,
                         DFA_WORKSPACE);
    if (rc == 0) rc = 1; /* more matches than pairs: the first, the longest, is there */
  } else {
    rc = pcre2_match(rx->code, (PCRE2_SPTR)sj->s, sj->len, at, mopts, rx->md, mctx);
  }
  if (rc > 0) {
    uint32_t n = pcre2_get_ovector_count(rx->md);
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(rx->md);
    for (uint32_t i = 0; i < o->npairs; i++) {
      o->ov[2 * i] = i < n ? ov[2 * i] : PCRE2_UNSET;
      o->ov[2 * i + 1] = i < n ? ov[2 * i + 1] : PCRE2_UNSET;
    }
  }
  return rc;
}

/* Where a global match goes on after a match [from, to): its end, or one character past an empty
 * match (one byte, or one UTF-8 character with "u"), as OpenResty's gmatch and gsub do. */
static size_t next_at(const rx_t *rx, const subject_t *sj, size_t from, size_t to) {
  if (to > from) return to;
  size_t p = from + 1;
  if (rx->utf)
    while (p < sj->len && ((unsigned char)sj->s[p] & 0xC0) == 0x80)
      p++;
  return p;
}

static int push_exec_error(lua_State *L, int rc) {
  lua_pushnil(L);
  lua_pushfstring(L, "pcre_exec() failed: %d", rc);
  return 2;
}

static int group_set(const ovec_t *o, uint32_t g) {
  return g < o->npairs && o->ov[2 * g] != PCRE2_UNSET && o->ov[2 * g + 1] >= o->ov[2 * g];
}

/* Group g's text, or false when it did not take part in the match. */
static void push_group(lua_State *L, const subject_t *sj, const ovec_t *o, uint32_t g) {
  if (g >= o->npairs || o->ov[2 * g] == PCRE2_UNSET)
    lua_pushboolean(L, 0);
  else if (!group_set(o, g))
    lua_pushliteral(L, ""); /* \K past the end */
  else
    lua_pushlstring(L, sj->s + o->ov[2 * g], o->ov[2 * g + 1] - o->ov[2 * g]);
}

/* Fills OpenResty's captures table (the one at res_idx, or a new one, left on the stack): [0] the
 * match, [1..ncap] the groups (false: unset), each named group also under its name; with "D" a
 * name holds the array of its groups that matched (no key when none did). */
static void push_captures(lua_State *L, const rx_t *rx, const subject_t *sj, const ovec_t *o,
                          int dfa, int res_idx) {
  uint32_t ncap = dfa ? 0 : rx->ncap;
  if (res_idx)
    lua_pushvalue(L, res_idx);
  else
    lua_createtable(L, (int)ncap, (int)(dfa ? 1 : rx->namecount + 1));
  for (uint32_t i = 0; i <= ncap; i++) {
    push_group(L, sj, o, i);
    lua_rawseti(L, -2, (int)i);
  }
  if (dfa) return;
  for (uint32_t k = 0; k < rx->namecount; k++) {
    PCRE2_SPTR e = rx->nametable + (size_t)k * rx->nameentry;
    uint32_t g = (uint32_t)e[0] << 8 | e[1];
    const char *name = (const char *)e + 2;
    if (!rx->dup) {
      push_group(L, sj, o, g);
      lua_setfield(L, -2, name);
      continue;
    }
    if (!group_set(o, g)) continue;
    lua_getfield(L, -1, name);
    if (!lua_istable(L, -1)) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_setfield(L, -3, name);
    }
    push_group(L, sj, o, g);
    lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
    lua_pop(L, 1);
  }
}

/* m, from, to, next | nil | nil, err. rx is held by the caller. */
static int op_match(lua_State *L, moonlet_t *m, rx_t *rx, int dfa, const subject_t *sj,
                    int res_idx) {
  ovec_t o;
  ovec_init(L, &o, rx, dfa);
  int rc = rx_exec(m, rx, dfa, sj, sj->init, &o);
  if (rc == PCRE2_ERROR_NOMATCH) {
    lua_pushnil(L);
    return 1;
  }
  if (rc < 0) return push_exec_error(L, rc);
  push_captures(L, rx, sj, &o, dfa, res_idx);
  lua_pushnumber(L, (lua_Number)o.ov[0]);
  lua_pushnumber(L, (lua_Number)o.ov[1]);
  lua_pushnumber(L, (lua_Number)next_at(rx, sj, o.ov[0], o.ov[1]));
  return 4;
}

/* mend, from, to (1-based, inclusive: group nth's; nil, nil when it is unset) | mend, false,
 * "nth out of bound" | nil | nil, err. */
static int op_find(lua_State *L, moonlet_t *m, rx_t *rx, int dfa, const subject_t *sj,
                   lua_Integer nth) {
  ovec_t o;
  ovec_init(L, &o, rx, dfa);
  int rc = rx_exec(m, rx, dfa, sj, sj->init, &o);
  if (rc == PCRE2_ERROR_NOMATCH) {
    lua_pushnil(L);
    return 1;
  }
  if (rc < 0) return push_exec_error(L, rc);
  lua_pushnumber(L, (lua_Number)o.ov[1]);
  if (nth < 0) nth = 0;
  if ((uint64_t)nth > (dfa ? 0 : rx->ncap)) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "nth out of bound");
    return 3;
  }
  if (!group_set(&o, (uint32_t)nth)) return 1;
  lua_pushnumber(L, (lua_Number)o.ov[2 * nth] + 1);
  lua_pushnumber(L, (lua_Number)o.ov[2 * nth + 1]);
  return 3;
}

/* -- Replacement templates ---------------------------------------------------------------------
 */

enum { TPL_TEXT, TPL_GROUP, TPL_NAME };

typedef struct {
  int kind;
  size_t off, len;        /* TPL_TEXT: the template's bytes */
  uint32_t group;         /* TPL_GROUP */
  PCRE2_SPTR first, last; /* TPL_NAME: its entries in the name table */
} tpl_op_t;

/* Parses a replacement template as OpenResty does: "$0".."$N" and "${N}" the match and its groups
 * ("" when unset or past the last group), "$$" a dollar, any other "$" an error; moonlet also
 * takes "$name" and "${name}" for a named group (OpenResty refuses them: "named captures not
 * supported yet"). ops has room for 2 * (dollars + 1) ops. Returns the number of ops, or -1. */
static int tpl_parse(const rx_t *rx, const char *t, size_t n, tpl_op_t *ops) {
  int k = 0;
  size_t i = 0;
  while (i < n) {
    if (t[i] != '$') {
      size_t j = i;
      while (j < n && t[j] != '$')
        j++;
      ops[k++] = (tpl_op_t){.kind = TPL_TEXT, .off = i, .len = j - i};
      i = j;
      continue;
    }
    if (++i == n) return -1;
    if (t[i] == '$') {
      ops[k++] = (tpl_op_t){.kind = TPL_TEXT, .off = i, .len = 1};
      i++;
      continue;
    }
    int bracket = t[i] == '{';
    if (bracket && ++i == n) return -1;
    size_t start = i;
    int num = t[i] >= '0' && t[i] <= '9';
    uint32_t g = 0;
    for (; i < n; i++) {
      char ch = t[i];
      if (num && ch >= '0' && ch <= '9') {
        if (g < 1000000) g = g * 10 + (uint32_t)(ch - '0');
      } else if (!num && ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
                          (ch >= '0' && ch <= '9') || ch == '_')) {
      } else {
        break;
      }
    }
    size_t len = i - start;
    if (bracket) {
      if (i == n || t[i] != '}') return -1;
      i++;
    }
    if (len == 0) return -1;
    if (num) {
      ops[k++] = (tpl_op_t){.kind = TPL_GROUP, .group = g};
      continue;
    }
    char name[NAME_MAX_LEN + 1];
    if (len > NAME_MAX_LEN) return -1;
    memcpy(name, t + start, len);
    name[len] = '\0';
    tpl_op_t op = {.kind = TPL_NAME};
    if (pcre2_substring_nametable_scan(rx->code, (PCRE2_SPTR)name, &op.first, &op.last) < 0)
      return -1;
    ops[k++] = op;
  }
  return k;
}

static void tpl_add_group(luaL_Buffer *b, const subject_t *sj, const ovec_t *o, uint32_t g) {
  if (group_set(o, g)) luaL_addlstring(b, sj->s + o->ov[2 * g], o->ov[2 * g + 1] - o->ov[2 * g]);
}

/* newstr, n | subject, 0 | nil, nil, err. The template is at tpl_idx. */
static int op_gsub(lua_State *L, moonlet_t *m, rx_t *rx, int dfa, subject_t *sj, int subj_idx,
                   int tpl_idx, int global) {
  size_t tn;
  const char *t = lua_tolstring(L, tpl_idx, &tn);
  size_t dollars = 0;
  for (size_t i = 0; i < tn; i++)
    dollars += t[i] == '$';
  tpl_op_t *ops = lua_newuserdata(L, (2 * dollars + 2) * sizeof *ops);
  int nops = tpl_parse(rx, t, tn, ops);
  if (nops < 0) {
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushliteral(L, "failed to compile the replacement template");
    return 3;
  }
  ovec_t o;
  ovec_init(L, &o, rx, dfa);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t at = sj->init, copied = 0;
  lua_Integer count = 0;
  for (;;) {
    int rc = rx_exec(m, rx, dfa, sj, at, &o);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      lua_pushnil(L);
      lua_pushnil(L);
      lua_pushfstring(L, "pcre_exec() failed: %d", rc);
      return 3;
    }
    sj->checked = 1;
    count++;
    size_t from = o.ov[0], to = o.ov[1];
    if (from > copied) luaL_addlstring(&b, sj->s + copied, from - copied);
    for (int k = 0; k < nops; k++) {
      const tpl_op_t *op = &ops[k];
      if (op->kind == TPL_TEXT) {
        luaL_addlstring(&b, t + op->off, op->len);
      } else if (op->kind == TPL_GROUP) {
        tpl_add_group(&b, sj, &o, op->group);
      } else { /* a name: its first group that matched (several with "D") */
        for (PCRE2_SPTR e = op->first; e <= op->last; e += rx->nameentry) {
          uint32_t g = (uint32_t)e[0] << 8 | e[1];
          if (!group_set(&o, g)) continue;
          tpl_add_group(&b, sj, &o, g);
          break;
        }
      }
    }
    if (to > copied) copied = to;
    at = next_at(rx, sj, from, to);
    if (!global || at > sj->len) break;
  }
  if (count == 0) {
    lua_pushvalue(L, subj_idx);
    lua_pushinteger(L, 0);
    return 2;
  }
  if (copied < sj->len) luaL_addlstring(&b, sj->s + copied, sj->len - copied);
  luaL_pushresult(&b);
  lua_pushinteger(L, count);
  return 2;
}

/* -- The regex object --------------------------------------------------------------------------
 */

static handle_t *check_handle(lua_State *L) {
  handle_t *h = mlua_check_object(L, 1, REGEX_MT);
  if (!h->rx) luaL_error(L, "moonlet.regex: the regex is gone");
  return h;
}

/* Runs an op with rx held, so that Lua code that a finalizer runs meanwhile cannot free it. */
#define HOLD(rx, call)                                                                             \
  do {                                                                                             \
    (rx)->refs++;                                                                                  \
    int n_ = (call);                                                                               \
    rx_unref(rx);                                                                                  \
    return n_;                                                                                     \
  } while (0)

/* syntax: rx, err = core.regex(pattern, flags) -- nil, "pcre2_compile() failed: ..." */
static int l_regex(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t n;
  const char *pat = luaL_checklstring(L, 1, &n);
  flags_t f;
  check_flags(L, 2, &f);
  handle_t *h = lua_newuserdata(L, sizeof *h);
  h->rx = NULL;
  h->dfa = f.dfa;
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_setmetatable(L, -2);
  rx_t *rx = rx_get(L, m, pat, n, &f);
  if (!rx) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  rx->refs++;
  h->rx = rx;
  return 1;
}

/* syntax: m, from, to, next = rx:match(subject, init, res, checked) */
static int rx_match(lua_State *L) {
  handle_t *h = check_handle(L);
  subject_t sj;
  check_subject(L, 2, 3, &sj);
  int res_idx = lua_istable(L, 4) ? 4 : 0;
  sj.checked = lua_toboolean(L, 5);
  HOLD(h->rx, op_match(L, mlua_instance(L), h->rx, h->dfa, &sj, res_idx));
}

/* syntax: mend, from, to = rx:find(subject, init, nth, checked) */
static int rx_find(lua_State *L) {
  handle_t *h = check_handle(L);
  subject_t sj;
  check_subject(L, 2, 3, &sj);
  lua_Integer nth = luaL_optinteger(L, 4, 0);
  sj.checked = lua_toboolean(L, 5);
  HOLD(h->rx, op_find(L, mlua_instance(L), h->rx, h->dfa, &sj, nth));
}

/* syntax: newstr, n = rx:gsub(subject, template, global) -- nil, nil, err */
static int rx_gsub(lua_State *L) {
  handle_t *h = check_handle(L);
  subject_t sj;
  check_subject(L, 2, 0, &sj);
  luaL_checkstring(L, 3);
  HOLD(h->rx, op_gsub(L, mlua_instance(L), h->rx, h->dfa, &sj, 2, 3, lua_toboolean(L, 4)));
}

/* syntax: n = rx:ncaptures() */
static int rx_ncaptures(lua_State *L) {
  handle_t *h = check_handle(L);
  lua_pushinteger(L, (lua_Integer)h->rx->ncap);
  return 1;
}

static int rx_tostring(lua_State *L) {
  handle_t *h = luaL_checkudata(L, 1, REGEX_MT);
  if (h->rx)
    lua_pushfstring(L, REGEX_MT ": %s", h->rx->pattern);
  else
    lua_pushliteral(L, REGEX_MT ": gone");
  return 1;
}

static int rx_gc(lua_State *L) {
  handle_t *h = luaL_checkudata(L, 1, REGEX_MT);
  if (h->rx) rx_unref(h->rx);
  h->rx = NULL;
  return 0;
}

/* -- One-shot calls (no object: the cache's regex is used in place) -------------------------- */

/* The cached regex for the pattern and flags at idx, idx + 1; NULL with nil, err pushed. */
static rx_t *oneshot_rx(lua_State *L, int idx, flags_t *f) {
  size_t n;
  const char *pat = luaL_checklstring(L, idx, &n);
  check_flags(L, idx + 1, f);
  rx_t *rx = rx_get(L, mlua_instance(L), pat, n, f);
  if (!rx) {
    lua_pushnil(L);
    lua_insert(L, -2);
  }
  return rx;
}

/* syntax: m, from, to, next = core.regex_match(subject, pattern, flags, init, res, checked) */
static int l_regex_match(lua_State *L) {
  subject_t sj;
  check_subject(L, 1, 4, &sj);
  int res_idx = lua_istable(L, 5) ? 5 : 0;
  sj.checked = lua_toboolean(L, 6);
  flags_t f;
  rx_t *rx = oneshot_rx(L, 2, &f);
  if (!rx) return 2;
  HOLD(rx, op_match(L, mlua_instance(L), rx, f.dfa, &sj, res_idx));
}

/* syntax: mend, from, to = core.regex_find(subject, pattern, flags, init, nth, checked) */
static int l_regex_find(lua_State *L) {
  subject_t sj;
  check_subject(L, 1, 4, &sj);
  lua_Integer nth = luaL_optinteger(L, 5, 0);
  sj.checked = lua_toboolean(L, 6);
  flags_t f;
  rx_t *rx = oneshot_rx(L, 2, &f);
  if (!rx) return 2;
  HOLD(rx, op_find(L, mlua_instance(L), rx, f.dfa, &sj, nth));
}

/* syntax: newstr, n = core.regex_gsub(subject, pattern, flags, template, global) -- nil, nil, err
 */
static int l_regex_gsub(lua_State *L) {
  subject_t sj;
  check_subject(L, 1, 0, &sj);
  luaL_checkstring(L, 4);
  flags_t f;
  rx_t *rx = oneshot_rx(L, 2, &f);
  if (!rx) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 3;
  }
  HOLD(rx, op_gsub(L, mlua_instance(L), rx, f.dfa, &sj, 1, 4, lua_toboolean(L, 5)));
}

/* syntax: entries, max, compiles = core.regex_cache(max) -- max (0..65536) sets how many regexes
 * the cache keeps (0: none: each call compiles its own), evicting the least recently used */
static int l_regex_cache(lua_State *L) {
  cache_t *c = cache_of(mlua_instance(L));
  if (!lua_isnoneornil(L, 1)) {
    lua_Integer max = luaL_checkinteger(L, 1);
    luaL_argcheck(L, max >= 0 && max <= CACHE_MAX_LIMIT, 1, "0 to 65536 expected");
    if (c) {
      c->max = (unsigned)max;
      cache_trim(c);
    }
  }
  lua_pushinteger(L, c ? (lua_Integer)c->count : 0);
  lua_pushinteger(L, c ? (lua_Integer)c->max : 0);
  lua_pushnumber(L, c ? c->compiles : 0);
  return 3;
}

void mlua_open_regex(lua_State *L, moonlet_t *m) {
  static const luaL_Reg methods[] = {{"match", rx_match},
                                     {"find", rx_find},
                                     {"gsub", rx_gsub},
                                     {"ncaptures", rx_ncaptures},
                                     {NULL, NULL}};
  static const luaL_Reg fns[] = {{"regex_match", l_regex_match},
                                 {"regex_find", l_regex_find},
                                 {"regex_gsub", l_regex_gsub},
                                 {"regex_cache", l_regex_cache},
                                 {NULL, NULL}};
  luaL_newmetatable(L, REGEX_MT);
  lua_pushliteral(L, REGEX_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, rx_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, rx_gc);
  lua_setfield(L, -2, "__gc");
  lua_newtable(L);
  mlua_register_methods(L, m, methods, -2);
  lua_setfield(L, -2, "__index");
  /* core.regex makes objects with this metatable: upvalues m and the metatable */
  lua_pushlightuserdata(L, m);
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, l_regex, 2);
  lua_setfield(L, -3, "regex");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
