/* core/shdict.c: the shared dictionary (the contract is in shdict.h). A zone holds, in order: the
 * dictionary's header, its hash buckets (offsets of the first entry of each chain), and the heap:
 * a buddy allocator whose blocks of 2^k bytes (64 at least) each hold one entry or one node of a
 * list. An entry links into its bucket's chain and into the least-recently-used list (newest ...
 * oldest). A list is an entry (type ML_SHV_LIST, no value of its own) whose nodes, a block each,
 * link to their left and right neighbours and back to it; the entry alone is in the chains and the
 * LRU list, and whatever removes it (delete, set, expiry, eviction, a pop of the last value) frees
 * its nodes with it. Offsets are from the dictionary's start; 0 is none (the header sits there,
 * never an entry).
 *
 * The buddy heap is cut at start into aligned blocks of decreasing powers of two (4 * size is not
 * one itself); a block's buddy lies at its offset in the heap XOR its size, and is merged with it
 * only when it lies wholly in the heap, is free and of the same order: so the first blocks never
 * merge past their own size.
 */
#include "shdict.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "shm.h"

#define MIN_ORDER 6 /* 64-byte blocks at least */
#define ORDERS 32
#define COLD_SCAN 64 /* a store short of room looks this far into the cold end for expired ones */

#define NODE 0xff /* the type byte of a list's node: a block in use that is not an entry */

typedef struct entry_s {
  uint8_t order; /* the block's: 2^order bytes */
  uint8_t free;  /* 0: in use */
  uint8_t type;  /* ML_SHV_* (never NODE) */
  uint8_t pad;
  uint32_t hash;
  uint32_t hnext;        /* the next entry in the bucket's chain */
  uint32_t newer, older; /* the LRU list */
  uint32_t klen;
  uint32_t vlen; /* a string's bytes; a list's length (it has at least one node) */
  uint32_t flags;
  double expires; /* on the monotonic clock, seconds; 0: never */
  union {
    double number; /* a number's value; a boolean's 0 or 1 */
    struct {
      uint32_t first, last; /* the leftmost and rightmost nodes */
      uint32_t bytes;       /* the budget bytes its nodes take */
    } list;
  };
  char data[]; /* the key, then a string value */
} entry_t;

typedef struct node_s {
  uint8_t order;        /* the block's */
  uint8_t free;         /* 0 */
  uint8_t type;         /* NODE, where an entry has its type */
  uint8_t vtype;        /* ML_SHV_NUMBER or ML_SHV_STRING */
  uint32_t owner;       /* the list's entry */
  uint32_t left, right; /* its neighbours in the list; 0 at the ends */
  uint32_t vlen;
  double number;
  char data[]; /* a string value */
} node_t;

/* the budget's invariant (shdict.h): a block is at most twice what it counts for */
_Static_assert(sizeof(entry_t) <= ML_SHDICT_ENTRY_OVERHEAD, "an entry's header fits its overhead");
_Static_assert(sizeof(node_t) <= ML_SHDICT_ENTRY_OVERHEAD, "a node's header fits its overhead");

typedef struct free_block_s {
  uint8_t order;
  uint8_t free; /* 1 */
  uint8_t pad[2];
  uint32_t next, prev; /* the free list of its order */
} free_block_t;

struct ml_shdict_s {
  pthread_mutex_t lock;
  size_t size; /* the budget */
  size_t used; /* its bytes taken */
  uint32_t nbuckets, buckets;
  uint32_t heap, heap_len;
  uint32_t newest, oldest;
  uint32_t count;
  uint32_t max_order;
  uint32_t seed; /* of the hash, random per dictionary: keys cannot be chosen to share a chain */
  uint32_t free_list[ORDERS];
};

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
static size_t header_bytes(void) { return round_up(sizeof(ml_shdict_t), 64); }
static uint32_t buckets_for(size_t size) {
  uint32_t n = 8;
  while (n < (1u << 22) && (size_t)n * 256 < size)
    n <<= 1;
  return n;
}
static size_t heap_offset(size_t size) {
  return header_bytes() + round_up((size_t)buckets_for(size) * sizeof(uint32_t), 64);
}

size_t ml_shdict_zone_bytes_with(size_t size, unsigned heap_factor) {
  if (size < 1 || size > ML_SHDICT_MAX_SIZE || heap_factor < 2 || heap_factor > 4)
    return SIZE_MAX; /* (no arena has room for it) */
  return heap_offset(size) + round_up(heap_factor * size, 64);
}

size_t ml_shdict_zone_bytes(size_t size) { return ml_shdict_zone_bytes_with(size, 4); }

static double now(void) { return (double)uv_hrtime() / 1e9; }
static void *at(ml_shdict_t *d, uint32_t off) { return (char *)d + off; }
static entry_t *entry_at(ml_shdict_t *d, uint32_t off) { return at(d, off); }
static node_t *node_at(ml_shdict_t *d, uint32_t off) { return at(d, off); }
static free_block_t *block_at(ml_shdict_t *d, uint32_t off) { return at(d, off); }
static uint32_t *bucket_of(ml_shdict_t *d, uint32_t hash) {
  return (uint32_t *)at(d, d->buckets) + (hash & (d->nbuckets - 1));
}

/* FNV-1a from the dictionary's seed, then murmur3's finaliser, so that every bit of the key moves
 * the low bits that pick the bucket */
static uint32_t hash_key(const ml_shdict_t *d, const char *key, size_t klen) {
  uint32_t h = 2166136261u ^ d->seed;
  for (size_t i = 0; i < klen; i++)
    h = (h ^ (unsigned char)key[i]) * 16777619u;
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

/* ---- the buddy heap ---- */

static void free_push(ml_shdict_t *d, uint32_t off, unsigned k) {
  free_block_t *b = block_at(d, off);
  b->order = (uint8_t)k;
  b->free = 1;
  b->prev = 0;
  b->next = d->free_list[k];
  if (b->next) block_at(d, b->next)->prev = off;
  d->free_list[k] = off;
}

static void free_remove(ml_shdict_t *d, uint32_t off) {
  free_block_t *b = block_at(d, off);
  if (b->prev)
    block_at(d, b->prev)->next = b->next;
  else
    d->free_list[b->order] = b->next;
  if (b->next) block_at(d, b->next)->prev = b->prev;
  b->free = 0;
}

static unsigned order_for(size_t n) {
  unsigned k = MIN_ORDER;
  while (k < ORDERS - 1 && ((size_t)1 << k) < n)
    k++;
  return k;
}

/* a block of at least n bytes, or 0 */
static uint32_t block_alloc(ml_shdict_t *d, size_t n) {
  unsigned want = order_for(n), k = want;
  while (k <= d->max_order && !d->free_list[k])
    k++;
  if (k > d->max_order) return 0;
  uint32_t off = d->free_list[k];
  free_remove(d, off);
  while (k > want) { /* split: the upper halves go free */
    k--;
    free_push(d, off + (1u << k), k);
  }
  block_at(d, off)->order = (uint8_t)want;
  return off;
}

/* 1 when the buddy of the block at heap offset rel, of order k, is a free block of order k: its
 * heap offset in *brel */
static int buddy_free(ml_shdict_t *d, size_t rel, unsigned k, size_t *brel) {
  *brel = rel ^ ((size_t)1 << k);
  if (*brel + ((size_t)1 << k) > d->heap_len) return 0;
  free_block_t *b = block_at(d, (uint32_t)(d->heap + *brel));
  return b->free && b->order == k;
}

/* frees the block at off, merged with its free buddies */
static void block_free(ml_shdict_t *d, uint32_t off) {
  unsigned k = block_at(d, off)->order;
  size_t rel = off - d->heap, brel;
  while (k < d->max_order && buddy_free(d, rel, k, &brel)) {
    free_remove(d, (uint32_t)(d->heap + brel));
    if (brel < rel) rel = brel;
    k++;
  }
  free_push(d, (uint32_t)(d->heap + rel), k);
}

/* The heap offset of the block that holds heap offset rel. Blocks are aligned to their size, so
 * from the largest order down, the aligned start at each order is the start of a block (the block
 * that holds it is no larger, or it would hold rel and have been found already): only headers of
 * blocks are read, never stale bytes inside one. */
static size_t block_start(ml_shdict_t *d, size_t rel) {
  for (unsigned k = d->max_order; k > MIN_ORDER; k--) {
    size_t s = rel & ~(((size_t)1 << k) - 1);
    if (block_at(d, (uint32_t)(d->heap + s))->order == k) return s;
  }
  return rel & ~(((size_t)1 << MIN_ORDER) - 1);
}

static void heap_reset(ml_shdict_t *d) {
  memset(d->free_list, 0, sizeof d->free_list);
  size_t rel = 0;
  for (int k = (int)d->max_order; k >= MIN_ORDER; k--)
    if (rel + ((size_t)1 << k) <= d->heap_len) {
      free_push(d, (uint32_t)(d->heap + rel), (unsigned)k);
      rel += (size_t)1 << k;
    }
}

/* ---- entries ---- */

/* An entry's budget bytes: its key, its value (8 for a number or a boolean, none for a list, whose
 * nodes count on their own) and the overhead; a list's node: its value and the overhead. The
 * overhead is no smaller than either header, so a block is at most twice what it counts for. */
static size_t value_cost(int type, size_t vlen) {
  return type == ML_SHV_STRING ? vlen : type == ML_SHV_LIST ? 0 : 8;
}
static size_t cost(size_t klen, int type, size_t vlen) {
  return klen + value_cost(type, vlen) + ML_SHDICT_ENTRY_OVERHEAD;
}
static size_t entry_cost(const entry_t *e) { return cost(e->klen, e->type, e->vlen); }
static size_t node_cost(const node_t *n) {
  return value_cost(n->vtype, n->vlen) + ML_SHDICT_ENTRY_OVERHEAD;
}
/* the budget bytes that evicting the block in use at off gives back: its entry's, with every node
 * of a list */
static size_t evict_cost(ml_shdict_t *d, uint32_t off) {
  entry_t *e = entry_at(d, off);
  if (e->type == NODE) e = entry_at(d, node_at(d, off)->owner);
  return entry_cost(e) + (e->type == ML_SHV_LIST ? e->list.bytes : 0);
}
static int expired(const entry_t *e, double t) { return e->expires != 0 && e->expires <= t; }

static void lru_unlink(ml_shdict_t *d, entry_t *e) {
  if (e->newer)
    entry_at(d, e->newer)->older = e->older;
  else
    d->newest = e->older;
  if (e->older)
    entry_at(d, e->older)->newer = e->newer;
  else
    d->oldest = e->newer;
}

static void lru_push(ml_shdict_t *d, entry_t *e, uint32_t off) {
  e->newer = 0;
  e->older = d->newest;
  if (d->newest)
    entry_at(d, d->newest)->newer = off;
  else
    d->oldest = off;
  d->newest = off;
}

static void touch(ml_shdict_t *d, uint32_t off) {
  entry_t *e = entry_at(d, off);
  if (d->newest == off) return;
  lru_unlink(d, e);
  lru_push(d, e, off);
}

static uint32_t find(ml_shdict_t *d, const char *key, size_t klen, uint32_t hash) {
  for (uint32_t off = *bucket_of(d, hash); off; off = entry_at(d, off)->hnext) {
    entry_t *e = entry_at(d, off);
    if (e->hash == hash && e->klen == klen && memcmp(e->data, key, klen) == 0) return off;
  }
  return 0;
}

/* unlinks and frees an entry, a list with all its nodes */
static void remove_entry(ml_shdict_t *d, uint32_t off) {
  entry_t *e = entry_at(d, off);
  uint32_t *link = bucket_of(d, e->hash);
  while (*link != off)
    link = &entry_at(d, *link)->hnext;
  *link = e->hnext;
  lru_unlink(d, e);
  d->used -= entry_cost(e);
  d->count--;
  if (e->type == ML_SHV_LIST) {
    d->used -= e->list.bytes;
    for (uint32_t n = e->list.first, right; n; n = right) {
      right = node_at(d, n)->right;
      block_free(d, n);
    }
  }
  block_free(d, off);
}

/* the entry of key unless absent or expired (an expired one is dropped) */
static uint32_t live(ml_shdict_t *d, const char *key, size_t klen, uint32_t hash, double t) {
  uint32_t off = find(d, key, klen, hash);
  if (off && expired(entry_at(d, off), t)) {
    remove_entry(d, off);
    return 0;
  }
  return off;
}

/* drops expired entries from the cold end, looking at no more than `scan` (0: all) and dropping
 * no more than `max` (0: all) */
static size_t drop_expired(ml_shdict_t *d, double t, size_t scan, size_t max) {
  size_t n = 0, seen = 0;
  uint32_t off = d->oldest;
  while (off && (scan == 0 || seen++ < scan)) {
    entry_t *e = entry_at(d, off);
    uint32_t newer = e->newer;
    if (expired(e, t)) {
      remove_entry(d, off);
      if (++n == max) break;
    }
    off = newer;
  }
  return n;
}

/* The budget has room but the heap no free block of 2^want bytes (it is cut up by entries here and
 * there): evicts the entries of the aligned region of that size that costs the fewest budget bytes
 * (or the one entry of a block at least that large), so that it becomes one free block. A list's
 * node counts for its whole list, which goes with it (its other nodes may lie anywhere). Walks the
 * heap's blocks once: rare (a value far larger than most), and bounded by the heap. 0 when there is
 * no such region. */
static int empty_region(ml_shdict_t *d, unsigned want) {
  size_t span = (size_t)1 << want, limit = d->heap_len & ~(span - 1);
  size_t best = SIZE_MAX, best_rel = 0, rel = 0;
  while (rel < limit) { /* blocks tile the heap; one smaller than span never crosses a region */
    uint32_t off = (uint32_t)(d->heap + rel);
    free_block_t *b = block_at(d, off);
    if (((size_t)1 << b->order) >= span) {
      if (!b->free && evict_cost(d, off) < best) best = evict_cost(d, off), best_rel = rel;
      rel += (size_t)1 << b->order;
      continue;
    }
    size_t sum = 0, start = rel;
    for (; rel < start + span; rel += (size_t)1 << block_at(d, (uint32_t)(d->heap + rel))->order) {
      uint32_t x = (uint32_t)(d->heap + rel);
      if (!block_at(d, x)->free) sum += evict_cost(d, x);
    }
    if (sum < best) best = sum, best_rel = start;
  }
  if (best == SIZE_MAX) return 0;
  /* a removal frees blocks here and elsewhere (a list's nodes), merged with free neighbours: the
   * block that now holds rel is looked up again each time */
  for (rel = best_rel; rel < best_rel + span;) {
    rel = block_start(d, rel);
    uint32_t off = (uint32_t)(d->heap + rel);
    free_block_t *b = block_at(d, off);
    if (b->free)
      rel += (size_t)1 << b->order;
    else
      remove_entry(d, entry_at(d, off)->type == NODE ? node_at(d, off)->owner : off);
  }
  return 1;
}

static void reset(ml_shdict_t *d) {
  memset(at(d, d->buckets), 0, (size_t)d->nbuckets * sizeof(uint32_t));
  d->newest = d->oldest = 0;
  d->used = 0;
  d->count = 0;
  heap_reset(d);
}

void ml_shdict_init(void *zone, size_t bytes, void *ud) {
  ml_shdict_t *d = zone;
  size_t size = *(size_t *)ud;
  if (size > ML_SHDICT_MAX_SIZE) size = ML_SHDICT_MAX_SIZE; /* (zone_bytes refused it already) */
  ml_shm_lock_init(&d->lock);
  if (uv_random(NULL, NULL, &d->seed, sizeof d->seed, 0, NULL) < 0)
    d->seed = (uint32_t)uv_hrtime() * 2654435761u;
  d->size = size;
  d->nbuckets = buckets_for(size);
  d->buckets = (uint32_t)header_bytes();
  d->heap = (uint32_t)heap_offset(size);
  /* the rest of the zone, within 4 times the budget and 32-bit offsets */
  size_t heap_len = bytes > d->heap ? (bytes - d->heap) / 64 * 64 : 0;
  if (heap_len > round_up(4 * size, 64)) heap_len = round_up(4 * size, 64);
  if (heap_len > (UINT32_MAX - d->heap) / 64 * 64) heap_len = (UINT32_MAX - d->heap) / 64 * 64;
  d->heap_len = (uint32_t)heap_len;
  d->max_order = MIN_ORDER;
  while (d->max_order + 1 < ORDERS && ((size_t)1 << (d->max_order + 1)) <= d->heap_len)
    d->max_order++;
  reset(d);
}

/* a process that died holding the lock may have left any list half linked: start afresh */
static void lock(ml_shdict_t *d) {
  if (ml_shm_lock(&d->lock)) {
    reset(d);
    ml_shm_lock_repaired(&d->lock);
  }
}
static void unlock(ml_shdict_t *d) { ml_shm_unlock(&d->lock); }

/* fills *v with a value, a string copied into buf (grown as needed): 0 or UV_ENOMEM */
static int copy_value(int type, double number, uint32_t flags, const char *str, size_t len,
                      ml_shvalue_t *v, ml_shbuf_t *buf) {
  v->type = type;
  v->number = type == ML_SHV_LIST ? 0 : number;
  v->flags = flags;
  v->str = NULL;
  v->len = 0;
  if (type != ML_SHV_STRING) return 0;
  if (buf->cap < len || !buf->data) {
    size_t cap = len > 64 ? len : 64;
    char *p = realloc(buf->data, cap);
    if (!p) return UV_ENOMEM;
    buf->data = p;
    buf->cap = cap;
  }
  memcpy(buf->data, str, len);
  v->str = buf->data;
  v->len = len;
  return 0;
}

static int copy_out(const entry_t *e, ml_shvalue_t *v, ml_shbuf_t *buf) {
  return copy_value(e->type, e->number, e->flags, e->data + e->klen, e->vlen, v, buf);
}

int ml_shdict_get(ml_shdict_t *d, const char *key, size_t klen, int stale, ml_shvalue_t *v,
                  ml_shbuf_t *buf, int *is_stale) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  int r = UV_ENOENT;
  lock(d);
  uint32_t off = find(d, key, klen, hash);
  if (off) {
    entry_t *e = entry_at(d, off);
    *is_stale = expired(e, t);
    if (*is_stale && !stale) {
      remove_entry(d, off);
    } else {
      if (!stale) touch(d, off);
      r = copy_out(e, v, buf);
    }
  }
  unlock(d);
  return r;
}

/* A block of need bytes for what counts c budget bytes, under the lock: 0 and *off, or UV_ENOMEM.
 * Short of room, it drops expired entries at the cold end, then (unless safe) evicts live ones,
 * *forcible 1. With safe, what is live at t stays: a list being pushed to is not dropped. */
static int make_room(ml_shdict_t *d, int safe, size_t need, size_t c, double t, int *forcible,
                     uint32_t *off) {
  if (c > d->size) return UV_ENOMEM;
  int dropped = 0;
  for (;;) {
    int room = d->used + c <= d->size;
    if (room && (*off = block_alloc(d, need))) return 0;
    if (!dropped) { /* expired entries at the cold end first, then (unless safe) live ones */
      dropped = 1;
      if (drop_expired(d, t, COLD_SCAN, 0)) continue;
    }
    if (safe) return UV_ENOMEM;
    if (room) { /* the budget has room, the heap no block that large */
      if (!empty_region(d, order_for(need))) return UV_ENOMEM;
    } else { /* the least recently used */
      if (!d->oldest) return UV_ENOMEM;
      remove_entry(d, d->oldest);
    }
    *forcible = 1;
  }
}

/* links a new entry at off into its chain and at the head of the LRU list, and counts it */
static void link_entry(ml_shdict_t *d, uint32_t off, const char *key, size_t klen, uint32_t hash) {
  entry_t *e = entry_at(d, off);
  e->free = 0;
  e->hash = hash;
  e->klen = (uint32_t)klen;
  memcpy(e->data, key, klen);
  uint32_t *head = bucket_of(d, hash);
  e->hnext = *head;
  *head = off;
  lru_push(d, e, off);
  d->used += entry_cost(e);
  d->count++;
}

/* the store, under the lock */
static int store(ml_shdict_t *d, int safe, const char *key, size_t klen, uint32_t hash,
                 const ml_shvalue_t *v, double exptime, double t, int *forcible) {
  uint32_t old = find(d, key, klen, hash);
  if (v->type == ML_SHV_NIL) {
    if (old) remove_entry(d, old);
    return 0;
  }
  size_t vlen = v->type == ML_SHV_STRING ? v->len : 0;
  size_t c = cost(klen, v->type, vlen);
  if (c > d->size) return UV_ENOMEM;
  if (old) remove_entry(d, old);
  uint32_t off;
  int r = make_room(d, safe, sizeof(entry_t) + klen + vlen, c, t, forcible, &off);
  if (r < 0) return r;
  entry_t *e = entry_at(d, off);
  e->type = (uint8_t)v->type;
  e->vlen = (uint32_t)vlen;
  e->flags = v->flags;
  e->expires = exptime > 0 ? t + exptime : 0;
  e->number = v->type == ML_SHV_STRING ? 0 : v->number;
  if (vlen) memcpy(e->data + klen, v->str, vlen);
  link_entry(d, off, key, klen, hash);
  return 0;
}

int ml_shdict_store(ml_shdict_t *d, int how, int safe, const char *key, size_t klen,
                    const ml_shvalue_t *v, double exptime, int *forcible) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  int r = 0;
  *forcible = 0;
  lock(d);
  if (how != ML_SHDICT_SET) {
    int present = live(d, key, klen, hash, t) != 0;
    if (how == ML_SHDICT_ADD && present) r = UV_EEXIST;
    if (how == ML_SHDICT_REPLACE && !present) r = UV_ENOENT;
  }
  if (r == 0) r = store(d, safe, key, klen, hash, v, exptime, t, forcible);
  unlock(d);
  return r;
}

int ml_shdict_delete(ml_shdict_t *d, const char *key, size_t klen) {
  uint32_t hash = hash_key(d, key, klen);
  lock(d);
  uint32_t off = find(d, key, klen, hash);
  if (off) remove_entry(d, off);
  unlock(d);
  return off ? 0 : UV_ENOENT;
}

int ml_shdict_incr(ml_shdict_t *d, const char *key, size_t klen, double step, int has_init,
                   double init, double init_ttl, double *out, int *forcible) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  int r = 0;
  *forcible = 0;
  lock(d);
  uint32_t off = live(d, key, klen, hash, t);
  if (!off) {
    if (has_init) {
      ml_shvalue_t v = {.type = ML_SHV_NUMBER, .number = init + step};
      r = store(d, 0, key, klen, hash, &v, init_ttl, t, forcible);
      *out = v.number;
    } else {
      r = UV_ENOENT;
    }
  } else {
    entry_t *e = entry_at(d, off);
    if (e->type != ML_SHV_NUMBER) {
      r = UV_EINVAL;
    } else {
      e->number += step;
      *out = e->number;
      touch(d, off);
    }
  }
  unlock(d);
  return r;
}

int ml_shdict_ttl(ml_shdict_t *d, const char *key, size_t klen, double *ttl) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  lock(d);
  uint32_t off = live(d, key, klen, hash, t);
  if (off) {
    entry_t *e = entry_at(d, off);
    *ttl = e->expires ? e->expires - t : 0;
  }
  unlock(d);
  return off ? 0 : UV_ENOENT;
}

int ml_shdict_expire(ml_shdict_t *d, const char *key, size_t klen, double exptime) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  lock(d);
  uint32_t off = live(d, key, klen, hash, t);
  if (off) entry_at(d, off)->expires = exptime > 0 ? t + exptime : 0;
  unlock(d);
  return off ? 0 : UV_ENOENT;
}

/* ---- lists ---- */

int ml_shdict_push(ml_shdict_t *d, int side, const char *key, size_t klen, const ml_shvalue_t *v,
                   size_t *len) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  size_t vlen = v->type == ML_SHV_STRING ? v->len : 0;
  int r = 0, forcible = 0, made = 0;
  uint32_t off, n;
  lock(d);
  off = live(d, key, klen, hash, t); /* an expired entry, a list or not, is gone */
  if (off && entry_at(d, off)->type != ML_SHV_LIST) {
    r = UV_EINVAL;
    goto done;
  }
  if (!off) { /* a new list; it stays empty only until its first node is linked below */
    r = make_room(d, 1, sizeof(entry_t) + klen, cost(klen, ML_SHV_LIST, 0), t, &forcible, &off);
    if (r < 0) goto done;
    entry_t *e = entry_at(d, off);
    e->type = ML_SHV_LIST;
    e->vlen = 0;
    e->flags = 0;
    e->expires = 0;
    e->list.first = e->list.last = e->list.bytes = 0;
    link_entry(d, off, key, klen, hash);
    made = 1;
  } else {
    touch(d, off);
  }
  /* safe: never evicts, as OpenResty's push; the list, live at t, is not dropped meanwhile */
  size_t c = value_cost(v->type, vlen) + ML_SHDICT_ENTRY_OVERHEAD;
  r = make_room(d, 1, sizeof(node_t) + vlen, c, t, &forcible, &n);
  if (r < 0) {
    if (made) remove_entry(d, off);
    goto done;
  }
  entry_t *e = entry_at(d, off);
  node_t *x = node_at(d, n);
  x->free = 0;
  x->type = NODE;
  x->vtype = (uint8_t)v->type;
  x->owner = off;
  x->vlen = (uint32_t)vlen;
  x->number = v->type == ML_SHV_STRING ? 0 : v->number;
  if (vlen) memcpy(x->data, v->str, vlen);
  if (side == ML_SHDICT_LEFT) {
    x->left = 0;
    x->right = e->list.first;
    if (x->right)
      node_at(d, x->right)->left = n;
    else
      e->list.last = n;
    e->list.first = n;
  } else {
    x->right = 0;
    x->left = e->list.last;
    if (x->left)
      node_at(d, x->left)->right = n;
    else
      e->list.first = n;
    e->list.last = n;
  }
  e->vlen++;
  e->list.bytes += (uint32_t)c;
  d->used += c;
  *len = e->vlen;
done:
  unlock(d);
  return r;
}

int ml_shdict_pop(ml_shdict_t *d, int side, const char *key, size_t klen, ml_shvalue_t *v,
                  ml_shbuf_t *buf) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  int r = 0;
  lock(d);
  uint32_t off = live(d, key, klen, hash, t);
  if (!off) {
    r = UV_ENOENT;
  } else if (entry_at(d, off)->type != ML_SHV_LIST) {
    r = UV_EINVAL;
  } else {
    entry_t *e = entry_at(d, off);
    uint32_t n = side == ML_SHDICT_LEFT ? e->list.first : e->list.last;
    node_t *x = node_at(d, n);
    r = copy_value(x->vtype, x->number, 0, x->data, x->vlen, v, buf);
    if (r == 0) { /* (a copy that failed pops nothing) */
      if (x->left)
        node_at(d, x->left)->right = x->right;
      else
        e->list.first = x->right;
      if (x->right)
        node_at(d, x->right)->left = x->left;
      else
        e->list.last = x->left;
      size_t c = node_cost(x);
      e->vlen--;
      e->list.bytes -= (uint32_t)c;
      d->used -= c;
      block_free(d, n);
      if (e->vlen == 0)
        remove_entry(d, off); /* the last value takes its key with it */
      else
        touch(d, off);
    }
  }
  unlock(d);
  return r;
}

int ml_shdict_llen(ml_shdict_t *d, const char *key, size_t klen, size_t *len) {
  uint32_t hash = hash_key(d, key, klen);
  double t = now();
  int r = 0;
  *len = 0;
  lock(d);
  uint32_t off = live(d, key, klen, hash, t);
  if (off && entry_at(d, off)->type != ML_SHV_LIST) {
    r = UV_EINVAL;
  } else if (off) {
    *len = entry_at(d, off)->vlen;
    touch(d, off);
  }
  unlock(d);
  return r;
}

int ml_shdict_keys(ml_shdict_t *d, size_t max, ml_shbuf_t *buf, size_t *count, size_t *len) {
  double t = now();
  int r = 0;
  *count = *len = 0;
  lock(d);
  uint32_t off = d->oldest;
  while (off && (max == 0 || *count < max)) {
    entry_t *e = entry_at(d, off);
    uint32_t newer = e->newer;
    if (expired(e, t)) {
      remove_entry(d, off);
    } else {
      size_t need = *len + sizeof(uint32_t) + e->klen;
      if (need > buf->cap || !buf->data) {
        size_t cap = need > 2 * buf->cap ? need : 2 * buf->cap;
        char *p = realloc(buf->data, cap);
        if (!p) {
          r = UV_ENOMEM;
          break;
        }
        buf->data = p;
        buf->cap = cap;
      }
      memcpy(buf->data + *len, &e->klen, sizeof(uint32_t));
      memcpy(buf->data + *len + sizeof(uint32_t), e->data, e->klen);
      *len = need;
      (*count)++;
    }
    off = newer;
  }
  unlock(d);
  return r;
}

void ml_shdict_flush_all(ml_shdict_t *d) {
  lock(d);
  reset(d);
  unlock(d);
}

size_t ml_shdict_flush_expired(ml_shdict_t *d, size_t max) {
  double t = now();
  lock(d);
  size_t n = drop_expired(d, t, 0, max);
  unlock(d);
  return n;
}

size_t ml_shdict_capacity(ml_shdict_t *d) { return d->size; }

size_t ml_shdict_free_space(ml_shdict_t *d) {
  lock(d);
  size_t n = d->size - d->used;
  unlock(d);
  return n;
}

static int in_heap(ml_shdict_t *d, uint32_t off) {
  return off >= d->heap && (size_t)(off - d->heap) + 64 <= d->heap_len && (off - d->heap) % 64 == 0;
}

/* for the check: off is the start of a block in use inside the heap, an entry (node 0) or a list's
 * node (node 1) */
static int is_used(ml_shdict_t *d, uint32_t off, int node) {
  if (!in_heap(d, off)) return 0;
  free_block_t *b = block_at(d, off);
  return !b->free && b->order >= MIN_ORDER && b->order <= d->max_order &&
         (off - d->heap) % ((size_t)1 << b->order) == 0 && (entry_at(d, off)->type == NODE) == node;
}

/* for the check: the nodes of the list at off link both ways, back to it, as many as it says and
 * costing what it says; *nodes adds them. NULL or what is wrong. */
static const char *check_list(ml_shdict_t *d, uint32_t off, size_t max_steps, size_t *nodes) {
  entry_t *e = entry_at(d, off);
  size_t count = 0, bytes = 0;
  uint32_t left = 0;
  for (uint32_t n = e->list.first; n; left = n, n = node_at(d, n)->right) {
    node_t *x = node_at(d, n);
    if (++count > max_steps || !is_used(d, n, 1) || x->owner != off || x->left != left ||
        (x->vtype != ML_SHV_NUMBER && x->vtype != ML_SHV_STRING))
      return "a list's nodes are broken";
    bytes += node_cost(x);
  }
  if (left != e->list.last || count != e->vlen || count == 0)
    return "a list does not end at its last node or has not its length";
  if (bytes != e->list.bytes) return "a list's bytes are not its nodes' sum";
  *nodes += count;
  return NULL;
}

const char *ml_shdict_check(ml_shdict_t *d) {
  const char *bad = NULL;
  lock(d);
  size_t brel, used_blocks = 0, node_blocks = 0, free_blocks = 0, listed_free = 0, costs = 0,
               in_lru = 0, in_lists = 0, chained = 0, rel = 0;
  while (rel < d->heap_len && !bad) { /* the blocks tile the heap */
    free_block_t *b = block_at(d, (uint32_t)(d->heap + rel));
    entry_t *e = (entry_t *)b;
    if (b->order < MIN_ORDER || b->order > d->max_order || rel % ((size_t)1 << b->order))
      bad = "a block of a bad order or misaligned";
    else if (b->free && b->order < d->max_order && buddy_free(d, rel, b->order, &brel))
      bad = "two free buddies not merged";
    else if (b->free)
      free_blocks++;
    else if (e->type == NODE)
      node_blocks++, costs += node_cost((node_t *)b);
    else if (e->type < ML_SHV_BOOLEAN || e->type > ML_SHV_LIST)
      bad = "an entry of a bad type";
    else
      used_blocks++, costs += entry_cost(e);
    if (bad) break;
    rel += (size_t)1 << b->order;
  }
  if (!bad && rel != d->heap_len) bad = "the blocks run past the heap";
  /* every walk below stops after more steps than there are blocks: a cycle is reported */
  size_t max_steps = d->heap_len / 64 + 1, steps;
  for (unsigned k = 0; k < ORDERS && !bad; k++) {
    steps = 0;
    for (uint32_t off = d->free_list[k], prev = 0; off && !bad;
         prev = off, off = bad ? 0 : block_at(d, off)->next) {
      free_block_t *b = in_heap(d, off) ? block_at(d, off) : NULL;
      if (!b || ++steps > max_steps || !b->free || b->order != k || b->prev != prev)
        bad = "a free list is broken";
      listed_free++;
    }
  }
  uint32_t newer = 0;
  steps = 0;
  for (uint32_t off = d->newest; off && !bad;
       newer = off, off = bad ? 0 : entry_at(d, off)->older) {
    if (++steps > max_steps || !is_used(d, off, 0) || entry_at(d, off)->newer != newer)
      bad = "the LRU list is broken";
    else if (entry_at(d, off)->type == ML_SHV_LIST)
      bad = check_list(d, off, max_steps, &in_lists);
    in_lru++;
  }
  if (!bad && newer != d->oldest) bad = "the LRU list does not end at the oldest";
  for (uint32_t i = 0; i < d->nbuckets && !bad; i++) {
    steps = 0;
    for (uint32_t off = ((uint32_t *)at(d, d->buckets))[i]; off && !bad;
         off = bad ? 0 : entry_at(d, off)->hnext) {
      if (++steps > max_steps || !is_used(d, off, 0))
        bad = "a chain is broken";
      else if ((entry_at(d, off)->hash & (d->nbuckets - 1)) != i)
        bad = "an entry in the wrong bucket";
      chained++;
    }
  }
  if (!bad && (free_blocks != listed_free)) bad = "free blocks off their lists";
  if (!bad && (used_blocks != d->count || in_lru != d->count || chained != d->count))
    bad = "entries, LRU list and chains disagree";
  if (!bad && node_blocks != in_lists) bad = "nodes in use that no list holds";
  if (!bad && costs != d->used) bad = "the budget used is not the entries' sum";
  unlock(d);
  return bad;
}
