/* core/shm.c: the shared memory arena and its named zones (the contract is in shm.h). The arena
 * starts with its header; zones follow one after another, each behind a zone header that names it
 * and links the next, in the order they were made (a zone is never freed).
 */
#include "shm.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <uv.h>

#define ARENA_MAGIC 0x6d6c73686d303031ull /* "mlshm001" */
#define ALIGN 64                          /* zones start on a cache line */

typedef struct zone_s {
  size_t next;  /* offset of the next zone's header from the arena, 0: none */
  size_t bytes; /* the zone's own bytes, after this header */
  char name[ML_SHM_NAME_MAX + 1];
} zone_t;

struct ml_shm_s {
  uint64_t magic;
  size_t size;  /* bytes mapped */
  size_t used;  /* bytes handed out from the start, this header included */
  size_t first; /* offset of the first zone's header, 0: none */
  pthread_mutex_t lock;
};

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

int ml_shm_open(ml_shm_t **out, size_t bytes) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  if (bytes < sizeof(ml_shm_t)) bytes = sizeof(ml_shm_t);
  bytes = round_up(bytes, page);
  void *p =
      mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return uv_translate_sys_error(errno);
  ml_shm_t *shm = p;
  shm->magic = ARENA_MAGIC;
  shm->size = bytes;
  shm->used = round_up(sizeof(ml_shm_t), ALIGN);
  shm->first = 0;
  ml_shm_lock_init(&shm->lock);
  *out = shm;
  return 0;
}

void ml_shm_close(ml_shm_t *shm) {
  if (shm) munmap(shm, shm->size);
}

size_t ml_shm_size(const ml_shm_t *shm) { return shm->size; }

static zone_t *zone_at(ml_shm_t *shm, size_t off) { return (zone_t *)((char *)shm + off); }
static void *zone_data(zone_t *z) { return (char *)z + round_up(sizeof(zone_t), ALIGN); }

int ml_shm_zone(ml_shm_t *shm, const char *name, size_t bytes, ml_shm_init_fn init, void *ud,
                void **zone, int *created) {
  size_t name_len = strlen(name);
  if (name_len > ML_SHM_NAME_MAX) return UV_ENAMETOOLONG;
  *created = 0;
  /* a zone is linked only once whole (its header and init done): one whose maker died holding the
   * lock is either linked and whole or not linked at all, and the bump offset may only lose room */
  if (ml_shm_lock(&shm->lock)) ml_shm_lock_repaired(&shm->lock);
  size_t *link = &shm->first;
  while (*link) {
    zone_t *z = zone_at(shm, *link);
    if (strcmp(z->name, name) == 0) {
      *zone = zone_data(z);
      ml_shm_unlock(&shm->lock);
      return 0;
    }
    link = &z->next;
  }
  if (bytes > shm->size ||
      round_up(sizeof(zone_t), ALIGN) + round_up(bytes, ALIGN) > shm->size - shm->used) {
    ml_shm_unlock(&shm->lock);
    return UV_ENOSPC;
  }
  size_t off = shm->used;
  shm->used += round_up(sizeof(zone_t), ALIGN) + round_up(bytes, ALIGN);
  zone_t *z = zone_at(shm, off);
  z->next = 0;
  z->bytes = bytes;
  memcpy(z->name, name, name_len + 1);
  init(zone_data(z), bytes, ud);
  *link = off;
  *zone = zone_data(z);
  *created = 1;
  ml_shm_unlock(&shm->lock);
  return 0;
}

void ml_shm_lock_init(pthread_mutex_t *mu) {
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(mu, &a);
  pthread_mutexattr_destroy(&a);
}

int ml_shm_lock(pthread_mutex_t *mu) {
  int r = pthread_mutex_lock(mu);
  if (r == 0) return 0;
  if (r == EOWNERDEAD) return 1;
  /* ENOTRECOVERABLE: an owner told of a dead one did not repair; nothing can go on safely */
  fprintf(stderr, "moonlet: shared memory lock: %s\n", strerror(r));
  abort();
}

void ml_shm_lock_repaired(pthread_mutex_t *mu) { pthread_mutex_consistent(mu); }

void ml_shm_unlock(pthread_mutex_t *mu) { pthread_mutex_unlock(mu); }
