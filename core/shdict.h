/* core/shdict.h: a dictionary in a zone of shared memory (core/shm.h), what moonlet.shared and
 * ngx.shared.NAME keep their entries in: OpenResty's lua_shared_dict, one dictionary that every
 * worker of `moonlet --workers N` reads and writes. Keys are byte strings; values are strings,
 * numbers or booleans with 32-bit flags and an expiry time on the monotonic clock, or lists of
 * strings and numbers (OpenResty's lpush, rpush, lpop, rpop, llen), which expire and are evicted
 * whole, as one entry.
 *
 * Its budget is `size` bytes, counted as moonlet.shared always counted them: each entry its key,
 * its value (8 for a number or a boolean, none for a list) and ML_SHDICT_ENTRY_OVERHEAD; each value
 * in a list its value (8 for a number) and ML_SHDICT_ENTRY_OVERHEAD too. A store that lacks room
 * drops expired entries at the cold end of the least-recently-used list, then evicts the least
 * recently used live ones (forcible), unless it is "safe". Under the budget lies a buddy allocator
 * over 4 * size bytes: a block is at most twice the bytes it holds, so what the budget holds takes
 * at most half the heap. When the heap is still too cut up for a large value, the entries of the
 * region cheapest to empty are evicted (forcible; "safe" refuses); the memory a process holds is
 * only the pages the entries touched.
 *
 * Invariants: every call takes the dictionary's lock (a robust process-shared mutex) and gives it
 * back before returning; nothing in here calls out while holding it (no Lua, no callbacks), and a
 * string handed back is a copy into the caller's buffer. When a process died holding the lock, the
 * next one to take it empties the dictionary (its lists may be half linked) and goes on. Entries
 * link by offsets from the dictionary's start, so the zone may sit at any address.
 */
#ifndef ML_SHDICT_H
#define ML_SHDICT_H

#include <stddef.h>
#include <stdint.h>

#define ML_SHDICT_ENTRY_OVERHEAD 64 /* budget bytes an entry costs besides its key and value */
#define ML_SHDICT_MAX_SIZE                                                                         \
  ((size_t)512 << 20) /* its heap, 4 times larger, keeps 32-bit offsets                            \
                       */

typedef struct ml_shdict_s ml_shdict_t;

/* ML_SHV_LIST: a list, which a get hands back as its type alone (no value) */
enum { ML_SHV_NIL = 0, ML_SHV_BOOLEAN, ML_SHV_NUMBER, ML_SHV_STRING, ML_SHV_LIST };

typedef struct ml_shvalue_s {
  int type;        /* ML_SHV_* */
  double number;   /* a number; a boolean as 0 or 1 */
  const char *str; /* a string: its bytes (the caller's buffer after a get) */
  size_t len;
  uint32_t flags;
} ml_shvalue_t;

/* The caller's buffer that strings are copied into (grown with realloc; freed by the caller). */
typedef struct ml_shbuf_s {
  char *data;
  size_t cap;
} ml_shbuf_t;

/* The zone bytes a dictionary of `size` budget bytes takes: its heap is heap_factor (2 to 4) times
 * the budget; ml_shdict_zone_bytes's is 4 times. SIZE_MAX for a size past ML_SHDICT_MAX_SIZE. */
size_t ml_shdict_zone_bytes(size_t size);
size_t ml_shdict_zone_bytes_with(size_t size, unsigned heap_factor);
/* Sets up a dictionary in a zeroed zone of ml_shdict_zone_bytes(size) bytes (an ml_shm_init_fn:
 * ud points to the size_t size); its heap is the rest of the zone. */
void ml_shdict_init(void *zone, size_t bytes, void *ud);

/* Looks key up. 0 and *v filled (strings copied into buf; a list: type ML_SHV_LIST only),
 * UV_ENOENT when absent or expired, or UV_ENOMEM when buf cannot grow. stale 0: an expired entry is
 * dropped, a found one becomes the most recently used; stale 1: an expired entry is handed back too
 * (*is_stale 1), and nothing moves. */
int ml_shdict_get(ml_shdict_t *d, const char *key, size_t klen, int stale, ml_shvalue_t *v,
                  ml_shbuf_t *buf, int *is_stale);

enum { ML_SHDICT_SET = 0, ML_SHDICT_ADD, ML_SHDICT_REPLACE };
/* Stores v under key for exptime seconds (0: for ever); v ML_SHV_NIL deletes (with SET only).
 * how: SET; ADD only when absent (else UV_EEXIST); REPLACE only when present (else UV_ENOENT).
 * safe: refuses (UV_ENOMEM) rather than evict a live entry. UV_ENOMEM also when the entry can
 * never fit. *forcible is 1 when live entries were evicted for it. */
int ml_shdict_store(ml_shdict_t *d, int how, int safe, const char *key, size_t klen,
                    const ml_shvalue_t *v, double exptime, int *forcible);
int ml_shdict_delete(ml_shdict_t *d, const char *key, size_t klen);
/* Adds step to a number: *out the sum. Absent: UV_ENOENT, or with has_init stores init + step for
 * init_ttl seconds (0: for ever). UV_EINVAL when the value is not a number; UV_ENOMEM. The entry
 * keeps its expiry. */
int ml_shdict_incr(ml_shdict_t *d, const char *key, size_t klen, double step, int has_init,
                   double init, double init_ttl, double *out, int *forcible);
/* *ttl: the seconds left, 0 for an entry that never expires. UV_ENOENT when absent. */
int ml_shdict_ttl(ml_shdict_t *d, const char *key, size_t klen, double *ttl);
/* A new expiry, exptime seconds from now (0: never). UV_ENOENT when absent. */
int ml_shdict_expire(ml_shdict_t *d, const char *key, size_t klen, double exptime);
enum { ML_SHDICT_LEFT = 0, ML_SHDICT_RIGHT };
/* Pushes v (a number or a string, without flags) at one end of the list under key, which a push
 * makes when the key is absent or expired (an expired list starts empty again); a list keeps its
 * expiry. *len: its new length. UV_EINVAL when key holds a live value that is not a list. UV_ENOMEM
 * when there is no room: as OpenResty's, a push drops expired entries but never evicts a live one
 * (other stores evict lists as any entry). */
int ml_shdict_push(ml_shdict_t *d, int side, const char *key, size_t klen, const ml_shvalue_t *v,
                   size_t *len);
/* Takes the value at one end of the list: 0 and *v (strings copied into buf); the last value takes
 * the key with it. UV_ENOENT when absent or expired, UV_EINVAL when not a list, UV_ENOMEM when buf
 * cannot grow (then nothing is taken). */
int ml_shdict_pop(ml_shdict_t *d, int side, const char *key, size_t klen, ml_shvalue_t *v,
                  ml_shbuf_t *buf);
/* *len: the list's length, 0 when absent or expired. UV_EINVAL when not a list. */
int ml_shdict_llen(ml_shdict_t *d, const char *key, size_t klen, size_t *len);
/* Copies at most max (0: all) live keys into buf, each as a uint32_t length then its bytes (not
 * aligned: read with memcpy); *count keys, *len bytes. Expired entries met are dropped. 0 or
 * UV_ENOMEM. */
int ml_shdict_keys(ml_shdict_t *d, size_t max, ml_shbuf_t *buf, size_t *count, size_t *len);
void ml_shdict_flush_all(ml_shdict_t *d);
/* Drops expired entries, at most max (0: all); returns how many. */
size_t ml_shdict_flush_expired(ml_shdict_t *d, size_t max);
size_t ml_shdict_capacity(ml_shdict_t *d);
size_t ml_shdict_free_space(ml_shdict_t *d);
/* For tests: walks every list (LRU, chains, free lists, the nodes of each list) and block; NULL
 * when all agree (the budget used is the sum of entries and nodes), else what does not. */
const char *ml_shdict_check(ml_shdict_t *d);

#endif
