/* spec/c/test_shdict.c: core/shm.c and core/shdict.c, the shared memory that moonlet.shared keeps
 * its dictionaries in: values, flags and the add/replace/incr rules; 20,000 random operations
 * against a plain model with the dictionary's lists and buddy blocks checked all along; eviction
 * within the budget under churn of mixed sizes; a heap whole again after a flush; two processes
 * counting in one dictionary, and a zone made after the fork found by the other; a heap cut up by
 * small entries taking a large value; a process killed while it holds a dictionary's lock (the next
 * owner empties the dictionary and goes on); an arena without room.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "../../core/shdict.h"
#include "../../core/shm.h"
#include "ctest.h"

static ml_shbuf_t buf;

static ml_shdict_t *open_dict(ml_shm_t *shm, const char *name, size_t size, int *created) {
  void *zone = NULL;
  int r = ml_shm_zone(shm, name, ml_shdict_zone_bytes(size), ml_shdict_init, &size, &zone, created);
  CHECK_INT(r, 0);
  return zone;
}

static int set_str(ml_shdict_t *d, int how, const char *k, const char *s, double exptime) {
  ml_shvalue_t v = {.type = ML_SHV_STRING, .str = s, .len = strlen(s)};
  int forcible;
  return ml_shdict_store(d, how, 0, k, strlen(k), &v, exptime, &forcible);
}

static int set_num(ml_shdict_t *d, const char *k, double n, uint32_t flags) {
  ml_shvalue_t v = {.type = ML_SHV_NUMBER, .number = n, .flags = flags};
  int forcible;
  return ml_shdict_store(d, ML_SHDICT_SET, 0, k, strlen(k), &v, 0, &forcible);
}

static int get(ml_shdict_t *d, const char *k, ml_shvalue_t *v) {
  int stale;
  return ml_shdict_get(d, k, strlen(k), 0, v, &buf, &stale);
}

static void test_values(ml_shm_t *shm) {
  ctest_section("strings, numbers, booleans and flags; add, replace, delete, incr, keys");
  int created;
  ml_shdict_t *d = open_dict(shm, "values", 4096, &created);
  CHECK_INT(created, 1);
  CHECK(open_dict(shm, "values", 1, &created) == d); /* found, its size kept */
  CHECK_INT(created, 0);
  CHECK_INT(ml_shdict_capacity(d), 4096);
  ml_shvalue_t v;
  CHECK_INT(set_str(d, ML_SHDICT_SET, "s", "text", 0), 0);
  CHECK_INT(set_num(d, "n", 42.5, 7), 0);
  ml_shvalue_t b = {.type = ML_SHV_BOOLEAN, .number = 0};
  int forcible;
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 0, "b", 1, &b, 0, &forcible), 0);
  if (CHECK_INT(get(d, "s", &v), 0)) {
    CHECK_INT(v.type, ML_SHV_STRING);
    CHECK(v.len == 4 && memcmp(v.str, "text", 4) == 0);
  }
  if (CHECK_INT(get(d, "n", &v), 0))
    CHECK(v.type == ML_SHV_NUMBER && v.number == 42.5 && v.flags == 7);
  if (CHECK_INT(get(d, "b", &v), 0)) CHECK(v.type == ML_SHV_BOOLEAN && v.number == 0);
  CHECK_INT(get(d, "none", &v), UV_ENOENT);
  CHECK_INT(set_str(d, ML_SHDICT_ADD, "s", "other", 0), UV_EEXIST);
  CHECK_INT(set_str(d, ML_SHDICT_REPLACE, "x", "other", 0), UV_ENOENT);
  CHECK_INT(set_str(d, ML_SHDICT_REPLACE, "s", "new", 0), 0);
  CHECK_INT(set_str(d, ML_SHDICT_ADD, "x", "1", 0), 0);
  CHECK_INT(ml_shdict_delete(d, "x", 1), 0);
  CHECK_INT(ml_shdict_delete(d, "x", 1), UV_ENOENT);
  double out;
  CHECK_INT(ml_shdict_incr(d, "c", 1, 1, 0, 0, 0, &out, &forcible), UV_ENOENT);
  CHECK_INT(ml_shdict_incr(d, "c", 1, 1, 1, 9, 0, &out, &forcible), 0);
  CHECK(out == 10);
  CHECK_INT(ml_shdict_incr(d, "c", 1, -3, 0, 0, 0, &out, &forcible), 0);
  CHECK(out == 7);
  CHECK_INT(ml_shdict_incr(d, "s", 1, 1, 0, 0, 0, &out, &forcible), UV_EINVAL);
  size_t count, len;
  CHECK_INT(ml_shdict_keys(d, 0, &buf, &count, &len), 0);
  CHECK_INT(count, 4); /* s n b c */
  CHECK_INT(ml_shdict_keys(d, 2, &buf, &count, &len), 0);
  CHECK_INT(count, 2);
  CHECK(ml_shdict_check(d) == NULL);
  ml_shdict_flush_all(d);
  CHECK_INT(ml_shdict_free_space(d), 4096);
  CHECK(ml_shdict_check(d) == NULL);
}

static void test_expiry(ml_shm_t *shm) {
  ctest_section("expiry: ttl, a stale read, dropped once met, flush_expired");
  int created;
  ml_shdict_t *d = open_dict(shm, "expiry", 4096, &created);
  CHECK_INT(set_str(d, ML_SHDICT_SET, "short", "v", 0.3), 0); /* (wide: a loaded machine pauses) */
  CHECK_INT(set_str(d, ML_SHDICT_SET, "other", "v", 0.3), 0);
  CHECK_INT(set_str(d, ML_SHDICT_SET, "ever", "v", 0), 0);
  double ttl;
  CHECK_INT(ml_shdict_ttl(d, "short", 5, &ttl), 0);
  CHECK(ttl > 0 && ttl <= 0.3);
  CHECK_INT(ml_shdict_ttl(d, "ever", 4, &ttl), 0);
  CHECK(ttl == 0);
  usleep(350 * 1000);
  ml_shvalue_t v;
  int stale = 0;
  CHECK_INT(ml_shdict_get(d, "short", 5, 1, &v, &buf, &stale), 0);
  CHECK_INT(stale, 1);
  CHECK_INT(get(d, "short", &v), UV_ENOENT);
  CHECK_INT(ml_shdict_get(d, "short", 5, 1, &v, &buf, &stale), UV_ENOENT);
  CHECK_INT(ml_shdict_flush_expired(d, 0), 1); /* "other" */
  CHECK_INT(ml_shdict_expire(d, "ever", 4, 60), 0);
  CHECK_INT(ml_shdict_ttl(d, "ever", 4, &ttl), 0);
  CHECK(ttl > 59 && ttl <= 60);
  CHECK(ml_shdict_check(d) == NULL);
}

/* the model: what each of KEYS keys holds, -1 for nothing */
#define KEYS 200
static int model_len[KEYS];
static char model_byte[KEYS];

static void test_random(ml_shm_t *shm) {
  ctest_section("20,000 random operations agree with a plain model; lists and blocks stay whole");
  int created;
  ml_shdict_t *d = open_dict(shm, "random", 1 << 20, &created); /* never full: nothing evicted */
  srand(12345);
  for (int i = 0; i < KEYS; i++)
    model_len[i] = -1;
  static char value[700];
  int agree = 1, whole = 1;
  for (int op = 0; op < 20000; op++) {
    int i = rand() % KEYS;
    char key[16];
    snprintf(key, sizeof key, "key%d", i);
    int len = rand() % 700, how = rand() % 5, forcible = 0, r;
    char byte = (char)('a' + rand() % 26);
    memset(value, byte, (size_t)len);
    ml_shvalue_t v = {.type = ML_SHV_STRING, .str = value, .len = (size_t)len};
    switch (how) {
    case 0:
    case 1: /* set or add */
      r = ml_shdict_store(d, how == 0 ? ML_SHDICT_SET : ML_SHDICT_ADD, 0, key, strlen(key), &v, 0,
                          &forcible);
      if (how == 1 && model_len[i] >= 0) {
        agree &= r == UV_EEXIST;
      } else {
        agree &= r == 0 && !forcible;
        model_len[i] = len;
        model_byte[i] = byte;
      }
      break;
    case 2: /* replace */
      r = ml_shdict_store(d, ML_SHDICT_REPLACE, 0, key, strlen(key), &v, 0, &forcible);
      agree &= r == (model_len[i] >= 0 ? 0 : UV_ENOENT);
      if (r == 0) model_len[i] = len, model_byte[i] = byte;
      break;
    case 3:
      agree &= ml_shdict_delete(d, key, strlen(key)) == (model_len[i] >= 0 ? 0 : UV_ENOENT);
      model_len[i] = -1;
      break;
    default: {
      ml_shvalue_t got;
      r = get(d, key, &got);
      if (model_len[i] < 0)
        agree &= r == UV_ENOENT;
      else
        agree &= r == 0 && got.len == (size_t)model_len[i] &&
                 (got.len == 0 ||
                  (got.str[0] == model_byte[i] && got.str[got.len - 1] == model_byte[i]));
    }
    }
    if (op % 500 == 0) whole &= ml_shdict_check(d) == NULL;
  }
  CHECK(agree);
  CHECK(whole);
  ml_shdict_flush_all(d);
  ctest_section("after a flush the heap is one again: the largest value the budget allows fits");
  size_t big = (1 << 20) - 1 - ML_SHDICT_ENTRY_OVERHEAD;
  char *huge = malloc(big);
  memset(huge, 'h', big);
  ml_shvalue_t hv = {.type = ML_SHV_STRING, .str = huge, .len = big};
  int forcible = 0;
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 0, "h", 1, &hv, 0, &forcible), 0);
  CHECK_INT(ml_shdict_free_space(d), 0);
  hv.len = big + 1;
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 0, "h", 1, &hv, 0, &forcible), UV_ENOMEM);
  free(huge);
  CHECK(ml_shdict_check(d) == NULL);
}

static void test_eviction(ml_shm_t *shm) {
  ctest_section("a full dictionary evicts the least recently used; churn of mixed sizes");
  int created;
  size_t size = 64 * 1024;
  ml_shdict_t *d = open_dict(shm, "evict", size, &created);
  static char value[3000];
  memset(value, 'v', sizeof value);
  int stored = 1, last_there = 1, whole = 1, any_forcible = 0;
  srand(777);
  for (int op = 0; op < 20000; op++) {
    char key[16];
    snprintf(key, sizeof key, "k%d", op);
    size_t len = (size_t)(rand() % 3) == 0 ? (size_t)(rand() % 3000) : (size_t)(rand() % 100);
    ml_shvalue_t v = {.type = ML_SHV_STRING, .str = value, .len = len};
    int forcible = 0;
    stored &= ml_shdict_store(d, ML_SHDICT_SET, 0, key, strlen(key), &v, 0, &forcible) == 0;
    any_forcible |= forcible;
    ml_shvalue_t got;
    last_there &= get(d, key, &got) == 0 && got.len == len;
    if (op % 250 == 0) whole &= ml_shdict_check(d) == NULL && ml_shdict_free_space(d) <= size;
  }
  CHECK(stored);
  CHECK(last_there);
  CHECK(whole);
  CHECK(any_forcible);
  ctest_section("safe_set refuses when only eviction would make room; expired entries go first");
  ml_shdict_flush_all(d);
  ml_shvalue_t v = {.type = ML_SHV_STRING, .str = value, .len = 3000};
  int forcible = 0, n = 0;
  char key[16];
  for (;; n++) {
    snprintf(key, sizeof key, "f%d", n);
    if (ml_shdict_store(d, ML_SHDICT_SET, 1, key, strlen(key), &v, n < 3 ? 0.3 : 0, &forcible))
      break;
  }
  CHECK(n > 15);
  int stale;
  CHECK_INT(ml_shdict_get(d, "f0", 2, 0, &v, &buf, &stale), 0); /* f0 is the newest now */
  usleep(350 * 1000);
  v.str = value;
  v.len = 3000;
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 1, "late", 4, &v, 0, &forcible),
            0); /* f1 or f2 went */
  CHECK_INT(forcible, 0);
  CHECK_INT(get(d, "f3", &v), 0);
  CHECK(ml_shdict_check(d) == NULL);
}

/* the reviewer's case: a 1 MiB budget full of small entries, every other one deleted, then a value
 * of 300 KiB, which needs a 512 KiB block; returns how many small entries it cost */
static int cut_up_then_big(ml_shm_t *shm, const char *name, unsigned heap_factor) {
  size_t size = 1 << 20;
  void *zone;
  int created, forcible = 0;
  CHECK_INT(ml_shm_zone(shm, name, ml_shdict_zone_bytes_with(size, heap_factor), ml_shdict_init,
                        &size, &zone, &created),
            0);
  ml_shdict_t *d = zone;
  char key[16];
  int n = 0;
  for (;; n++) { /* 8 + 9 + 64 = 81 budget bytes each, in a 128-byte block (48 + 8 + 9 = 65) */
    snprintf(key, sizeof key, "s%07d", n);
    ml_shvalue_t v = {.type = ML_SHV_STRING, .str = "123456789", .len = 9};
    if (ml_shdict_store(d, ML_SHDICT_SET, 1, key, strlen(key), &v, 0, &forcible)) break;
  }
  for (int i = 0; i < n; i += 2) {
    snprintf(key, sizeof key, "s%07d", i);
    ml_shdict_delete(d, key, strlen(key));
  }
  size_t big = 300 * 1024;
  char *value = calloc(1, big);
  ml_shvalue_t bv = {.type = ML_SHV_STRING, .str = value, .len = big};
  CHECK(ml_shdict_free_space(d) > big + 100);
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 0, "big", 3, &bv, 0, &forcible), 0);
  free(value);
  int lost = 0;
  ml_shvalue_t got;
  for (int i = 1; i < n; i += 2) {
    snprintf(key, sizeof key, "s%07d", i);
    lost += get(d, key, &got) != 0;
  }
  CHECK(ml_shdict_check(d) == NULL);
  return lost;
}

static void test_fragments(ml_shm_t *shm) {
  ctest_section("a heap cut up by small entries still takes a value the budget has room for");
  CHECK_INT(cut_up_then_big(shm, "cut4", 4), 0); /* the default heap: no entry lost */
  /* a heap of twice the budget has no free 512 KiB block: the region cheapest to empty goes (its
   * ~330 live entries, where evicting by age took ~2,050) */
  int lost = cut_up_then_big(shm, "cut2", 2);
  CHECK(lost > 0 && lost < 500);
}

static void test_processes(ml_shm_t *shm) {
  ctest_section("two processes count in one dictionary; a zone made after the fork is found");
  int created;
  ml_shdict_t *d = open_dict(shm, "count", 4096, &created);
  pid_t pid = fork();
  if (pid == 0) {
    double out;
    int forcible;
    for (int i = 0; i < 20000; i++)
      ml_shdict_incr(d, "n", 1, 1, 1, 0, 0, &out, &forcible);
    size_t size = 4096;
    void *zone;
    if (ml_shm_zone(shm, "late", ml_shdict_zone_bytes(size), ml_shdict_init, &size, &zone,
                    &created))
      _exit(2);
    set_str(zone, ML_SHDICT_SET, "from", "child", 0);
    _exit(0);
  }
  double out = 0;
  int forcible, status = -1;
  for (int i = 0; i < 20000; i++)
    ml_shdict_incr(d, "n", 1, 1, 1, 0, 0, &out, &forcible);
  waitpid(pid, &status, 0);
  CHECK_INT(status, 0);
  ml_shvalue_t v;
  if (CHECK_INT(get(d, "n", &v), 0)) CHECK_INT(v.number, 40000);
  ml_shdict_t *late = open_dict(shm, "late", 4096, &created);
  CHECK_INT(created, 0);
  if (CHECK_INT(get(late, "from", &v), 0)) CHECK(v.len == 5 && memcmp(v.str, "child", 5) == 0);

  ctest_section("a process killed while it holds the lock: the next owner empties it and goes on");
  CHECK_INT(set_str(d, ML_SHDICT_SET, "before", "x", 0), 0);
  pid = fork();
  if (pid == 0) {
    ml_shm_lock((pthread_mutex_t *)(void *)d); /* the lock is the dictionary's first member */
    kill(getpid(), SIGKILL);
  }
  waitpid(pid, &status, 0);
  CHECK(WIFSIGNALED(status));
  CHECK_INT(get(d, "before", &v), UV_ENOENT);
  CHECK_INT(set_str(d, ML_SHDICT_SET, "after", "y", 0), 0);
  CHECK_INT(get(d, "after", &v), 0);
  CHECK(ml_shdict_check(d) == NULL);
}

static void test_arena_limits(ml_shm_t *shm) {
  ctest_section("an arena without room, a size past the largest, a name too long");
  size_t size = 8 << 20; /* 32 MiB of zone, in an arena of 32 MiB that holds others already */
  void *zone;
  int created;
  CHECK_INT(
      ml_shm_zone(shm, "big", ml_shdict_zone_bytes(size), ml_shdict_init, &size, &zone, &created),
      UV_ENOSPC);
  size = ML_SHDICT_MAX_SIZE + 1;
  CHECK(ml_shdict_zone_bytes(size) == SIZE_MAX);
  CHECK_INT(
      ml_shm_zone(shm, "huge", ml_shdict_zone_bytes(size), ml_shdict_init, &size, &zone, &created),
      UV_ENOSPC);
  char name[ML_SHM_NAME_MAX + 2];
  memset(name, 'n', sizeof name - 1);
  name[sizeof name - 1] = 0;
  size = 4096;
  CHECK_INT(
      ml_shm_zone(shm, name, ml_shdict_zone_bytes(size), ml_shdict_init, &size, &zone, &created),
      UV_ENAMETOOLONG);
}

int main(void) {
  ml_shm_t *shm = NULL;
  if (!CHECK_INT(ml_shm_open(&shm, 32 << 20), 0)) return ctest_end();
  test_values(shm);
  test_expiry(shm);
  test_random(shm);
  test_eviction(shm);
  test_fragments(shm);
  test_processes(shm);
  test_arena_limits(shm);
  ml_shm_close(shm);
  free(buf.data);
  return ctest_end();
}
