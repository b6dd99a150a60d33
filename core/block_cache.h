/* core/block_cache.h: a cache of small freed blocks in front of malloc, for an allocator that
 * frees and makes many small blocks of a few sizes at a high rate (a Lua state: every request
 * makes and drops a few tables, strings and closures). Freed blocks of up to ML_BCACHE_MAX_SIZE
 * bytes wait on a list per 16-byte size class and are handed out again in a few instructions;
 * larger blocks, and blocks freed while the cache holds max_bytes already, go straight to malloc.
 *
 * Invariants: every block a cache hands out is a malloc block, of its class's size when small, so
 * any block may go back to free() or realloc() and a cache can be drained at any time. The caller
 * gives each block's size back when it frees or resizes it (as lua_Alloc's osize does), which picks
 * its class. One cache per instance (no global state), used from one thread.
 */
#ifndef ML_BLOCK_CACHE_H
#define ML_BLOCK_CACHE_H

#include <stddef.h>

#define ML_BCACHE_MAX_SIZE 512
#define ML_BCACHE_CLASSES (ML_BCACHE_MAX_SIZE / 16)

typedef struct ml_bcache_s {
  void *free[ML_BCACHE_CLASSES]; /* per class: a list of free blocks, linked by their first word */
  size_t cached_bytes;           /* bytes on the lists */
  size_t max_bytes;              /* the lists hold no more than this; 0: no caching at all */
} ml_bcache_t;

void ml_bcache_init(ml_bcache_t *c, size_t max_bytes);
/* The lua_Alloc contract: nsize 0 frees ptr (osize bytes) and returns NULL; ptr NULL makes a
 * block; otherwise resizes ptr from osize to nsize bytes. NULL when out of memory (ptr untouched).
 */
void *ml_bcache_alloc(void *cache, void *ptr, size_t osize, size_t nsize);
/* Gives every cached block back to free(). */
void ml_bcache_drain(ml_bcache_t *c);

#endif
