/* core/shm.h: an arena of memory shared by a process and every process it forks after making it
 * (`moonlet --workers N`: made before the workers are forked, so that each finds the same zones at
 * the same address). The arena hands out named zones: the first process to ask for a name makes
 * the zone, the others (and the same process later, after a reload) find it. moonlet.shared keeps
 * its dictionaries in such zones (core/shdict.c).
 *
 * Invariants: the mapping is MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE: its pages cost memory
 * only once touched, and a zone is never given back (the arena lives as long as the instance that
 * made it; each process unmaps its own view with ml_shm_close). Zones are found by name under the
 * arena's lock, a robust process-shared mutex: a process killed while holding it does not block the
 * others (ml_shm_lock tells the next owner, who repairs what the lock guards). No global state: one
 * arena per instance.
 */
#ifndef ML_SHM_H
#define ML_SHM_H

#include <pthread.h>
#include <stddef.h>

typedef struct ml_shm_s ml_shm_t;

#define ML_SHM_NAME_MAX 127 /* bytes of a zone's name */

/* Maps an arena of `bytes` bytes (rounded up to pages). 0 or a negative libuv error. */
int ml_shm_open(ml_shm_t **out, size_t bytes);
/* Unmaps this process's view; the zones live on in the processes that still map them. */
void ml_shm_close(ml_shm_t *shm);
size_t ml_shm_size(const ml_shm_t *shm);

/* Called once, under the arena's lock, on a zone just made (zeroed): sets it up. */
typedef void (*ml_shm_init_fn)(void *zone, size_t bytes, void *ud);
/* Finds the zone called name, or makes one of `bytes` bytes and calls init on it. *zone is set;
 * *created is 1 when it was made now. UV_ENOSPC when the arena has no room left for it,
 * UV_ENAMETOOLONG for a name past ML_SHM_NAME_MAX bytes. */
int ml_shm_zone(ml_shm_t *shm, const char *name, size_t bytes, ml_shm_init_fn init, void *ud,
                void **zone, int *created);

/* The lock kept in shared memory by the arena and by every zone that needs one. */
void ml_shm_lock_init(pthread_mutex_t *mu);
/* Takes the lock. 1 when its last owner died holding it: the caller makes what it guards whole
 * again, then calls ml_shm_lock_repaired; 0 otherwise. */
int ml_shm_lock(pthread_mutex_t *mu);
void ml_shm_lock_repaired(pthread_mutex_t *mu);
void ml_shm_unlock(pthread_mutex_t *mu);

#endif
