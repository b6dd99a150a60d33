/* core/block_cache.c: small freed blocks kept per size class and handed out again (the contract is
 * in block_cache.h). Under AddressSanitizer a cached block is poisoned, so that a write into a
 * block after it was freed is still reported, as it would be with plain malloc.
 */
#include "block_cache.h"

#include <stdlib.h>

#if defined(__SANITIZE_ADDRESS__)
#define ML_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ML_ASAN 1
#endif
#endif
#ifdef ML_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* sizes 1..16 are class 0, 17..32 class 1, ...; a class's blocks are (class + 1) * 16 bytes */
static inline size_t class_of(size_t size) { return (size - 1) >> 4; }
static inline size_t class_size(size_t k) { return (k + 1) << 4; }

void ml_bcache_init(ml_bcache_t *c, size_t max_bytes) {
  for (size_t k = 0; k < ML_BCACHE_CLASSES; k++)
    c->free[k] = NULL;
  c->cached_bytes = 0;
  c->max_bytes = max_bytes;
}

static void *take(ml_bcache_t *c, size_t size) {
  if (size > ML_BCACHE_MAX_SIZE) return malloc(size);
  size_t k = class_of(size);
  void *b = c->free[k];
  if (!b) return malloc(class_size(k));
  UNPOISON(b, class_size(k));
  c->free[k] = *(void **)b;
  c->cached_bytes -= class_size(k);
  return b;
}

static void give_back(ml_bcache_t *c, void *b, size_t size) {
  if (size - 1 < ML_BCACHE_MAX_SIZE) { /* 1..512 (a size 0, never given, wraps and goes to free) */
    size_t k = class_of(size);
    if (c->cached_bytes + class_size(k) <= c->max_bytes) {
      *(void **)b = c->free[k];
      c->free[k] = b;
      c->cached_bytes += class_size(k);
      POISON(b, class_size(k));
      return;
    }
  }
  free(b);
}

void *ml_bcache_alloc(void *cache, void *ptr, size_t osize, size_t nsize) {
  ml_bcache_t *c = cache;
  if (nsize == 0) {
    if (ptr) give_back(c, ptr, osize);
    return NULL;
  }
  if (!ptr) return take(c, nsize);
  if (osize <= ML_BCACHE_MAX_SIZE && nsize <= ML_BCACHE_MAX_SIZE &&
      class_of(osize) == class_of(nsize))
    return ptr; /* the block has room already */
  /* a block that becomes small is made its class's size, so that it can be cached when freed */
  return realloc(ptr, nsize <= ML_BCACHE_MAX_SIZE ? class_size(class_of(nsize)) : nsize);
}

void ml_bcache_drain(ml_bcache_t *c) {
  for (size_t k = 0; k < ML_BCACHE_CLASSES; k++) {
    void *b = c->free[k];
    while (b) {
      UNPOISON(b, class_size(k));
      void *next = *(void **)b;
      free(b);
      b = next;
    }
    c->free[k] = NULL;
  }
  c->cached_bytes = 0;
}
