/* spec/c/test_shdict.c: core/shm.c and core/shdict.c, the shared memory that moonlet.shared keeps
 * its dictionaries in: values, flags and the add/replace/incr rules; lists (push and pop at both
 * ends, llen, their budget, expiry and eviction, a push that never evicts); 20,000 random
 * operations, list ones among them, against a plain model with the dictionary's lists, buddy blocks
 * and budget checked all along; eviction within the budget under churn of mixed sizes; a heap whole
 * again after a flush; two processes counting in one dictionary, and a zone made after the fork
 * found by the other; two processes each pushing values that the other pops; a heap cut up by small
 * entries, or by lists' nodes, taking a large value; a process killed while it holds a dictionary's
 * lock (the next owner empties the dictionary and goes on); an arena without room.
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

static int push_str(ml_shdict_t *d, int side, const char *k, const char *s, size_t *len) {
  ml_shvalue_t v = {.type = ML_SHV_STRING, .str = s, .len = strlen(s)};
  return ml_shdict_push(d, side, k, strlen(k), &v, len);
}

static int push_num(ml_shdict_t *d, int side, const char *k, double n, size_t *len) {
  ml_shvalue_t v = {.type = ML_SHV_NUMBER, .number = n};
  return ml_shdict_push(d, side, k, strlen(k), &v, len);
}

static int pop(ml_shdict_t *d, int side, const char *k, ml_shvalue_t *v) {
  return ml_shdict_pop(d, side, k, strlen(k), v, &buf);
}

static size_t llen(ml_shdict_t *d, const char *k, int *r) {
  size_t n = 99;
  *r = ml_shdict_llen(d, k, strlen(k), &n);
  return n;
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

static void test_lists(ml_shm_t *shm) {
  ctest_section("lists: push and pop at both ends, llen, and the other methods on a list");
  int created, r, forcible;
  size_t size = 4096, len = 0;
  ml_shdict_t *d = open_dict(shm, "lists", size, &created);
  ml_shvalue_t v;
  CHECK_INT(push_str(d, ML_SHDICT_RIGHT, "q", "b", &len), 0);
  CHECK_INT(len, 1);
  CHECK_INT(push_str(d, ML_SHDICT_LEFT, "q", "a", &len), 0);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "q", 3.5, &len), 0);
  CHECK_INT(len, 3);
  CHECK_INT(llen(d, "q", &r), 3);
  CHECK_INT(r, 0);
  CHECK_INT(llen(d, "none", &r), 0);
  CHECK_INT(r, 0);
  /* 3 nodes (1 + 1 + 8 value bytes) and the list's entry (its key): what they count for */
  CHECK_INT(ml_shdict_free_space(d),
            size - (1 + 1 + 8 + 3 * ML_SHDICT_ENTRY_OVERHEAD) - (1 + ML_SHDICT_ENTRY_OVERHEAD));
  if (CHECK_INT(get(d, "q", &v), 0)) CHECK_INT(v.type, ML_SHV_LIST);
  int stale = 1;
  if (CHECK_INT(ml_shdict_get(d, "q", 1, 1, &v, &buf, &stale), 0)) CHECK_INT(v.type, ML_SHV_LIST);
  double out;
  CHECK_INT(ml_shdict_incr(d, "q", 1, 1, 1, 0, 0, &out, &forcible), UV_EINVAL);
  CHECK_INT(set_str(d, ML_SHDICT_ADD, "q", "x", 0), UV_EEXIST);
  size_t count, klen;
  CHECK_INT(ml_shdict_keys(d, 0, &buf, &count, &klen), 0);
  CHECK_INT(count, 1);
  if (CHECK_INT(pop(d, ML_SHDICT_RIGHT, "q", &v), 0))
    CHECK(v.type == ML_SHV_NUMBER && v.number == 3.5);
  if (CHECK_INT(pop(d, ML_SHDICT_LEFT, "q", &v), 0))
    CHECK(v.type == ML_SHV_STRING && v.len == 1 && v.str[0] == 'a');
  if (CHECK_INT(pop(d, ML_SHDICT_LEFT, "q", &v), 0))
    CHECK(v.type == ML_SHV_STRING && v.len == 1 && v.str[0] == 'b');
  CHECK_INT(pop(d, ML_SHDICT_LEFT, "q", &v), UV_ENOENT); /* the last value took the key */
  CHECK_INT(get(d, "q", &v), UV_ENOENT);
  CHECK_INT(ml_shdict_free_space(d), size);

  CHECK_INT(set_str(d, ML_SHDICT_SET, "s", "text", 0), 0);
  CHECK_INT(push_str(d, ML_SHDICT_LEFT, "s", "x", &len), UV_EINVAL);
  CHECK_INT(pop(d, ML_SHDICT_RIGHT, "s", &v), UV_EINVAL);
  CHECK_INT(llen(d, "s", &r), 0);
  CHECK_INT(r, UV_EINVAL);
  if (CHECK_INT(get(d, "s", &v), 0)) CHECK(v.len == 4); /* untouched */
  CHECK_INT(push_num(d, ML_SHDICT_LEFT, "l", 1, &len), 0);
  CHECK_INT(push_num(d, ML_SHDICT_LEFT, "l", 2, &len), 0);
  CHECK_INT(set_str(d, ML_SHDICT_REPLACE, "l", "now a string", 0), 0); /* its nodes go */
  if (CHECK_INT(get(d, "l", &v), 0)) CHECK(v.type == ML_SHV_STRING && v.len == 12);
  CHECK_INT(push_num(d, ML_SHDICT_LEFT, "m", 1, &len), 0);
  CHECK_INT(ml_shdict_delete(d, "m", 1), 0);
  CHECK_INT(llen(d, "m", &r), 0);
  CHECK(ml_shdict_check(d) == NULL);

  ctest_section("lists: ttl and expire; an expired list or value gives way to a new list");
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "e", 1, &len), 0);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "e", 2, &len), 0);
  double ttl = -1;
  CHECK_INT(ml_shdict_ttl(d, "e", 1, &ttl), 0);
  CHECK(ttl == 0);
  CHECK_INT(ml_shdict_expire(d, "e", 1, 0.3), 0);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "e", 3, &len), 0); /* a push keeps the expiry */
  CHECK_INT(ml_shdict_ttl(d, "e", 1, &ttl), 0);
  CHECK(ttl > 0 && ttl <= 0.3);
  CHECK_INT(set_str(d, ML_SHDICT_SET, "t", "soon gone", 0.3), 0);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "gone", 1, &len), 0);
  CHECK_INT(ml_shdict_expire(d, "gone", 4, 0.3), 0);
  usleep(350 * 1000);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "e", 9, &len), 0);
  CHECK_INT(len, 1); /* a new list */
  if (CHECK_INT(pop(d, ML_SHDICT_LEFT, "e", &v), 0)) CHECK(v.number == 9);
  CHECK_INT(push_num(d, ML_SHDICT_LEFT, "t", 7, &len), 0); /* the expired string gave way */
  CHECK_INT(len, 1);
  CHECK_INT(llen(d, "gone", &r), 0);
  CHECK_INT(pop(d, ML_SHDICT_LEFT, "gone", &v), UV_ENOENT);
  ml_shdict_flush_all(d);
  CHECK_INT(ml_shdict_free_space(d), size);
  CHECK(ml_shdict_check(d) == NULL);

  ctest_section("lists: a push never evicts (no memory); a set evicts a list whole, nodes too");
  /* a key of 1 byte: 65 budget bytes for the list, 72 for each number in it */
  int pushed = 0;
  while (push_num(d, ML_SHDICT_RIGHT, "a", pushed, &len) == 0)
    pushed++;
  CHECK_INT(pushed, (size - 65) / 72);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "b", 0, &len), UV_ENOMEM);
  CHECK_INT(llen(d, "b", &r), 0); /* the list made for it went again */
  CHECK_INT(llen(d, "a", &r), pushed);
  CHECK_INT(ml_shdict_free_space(d), size - 65 - 72 * (size_t)pushed);
  static char big[4096 - 64 - 1];
  memset(big, 'z', sizeof big);
  ml_shvalue_t bv = {.type = ML_SHV_STRING, .str = big, .len = sizeof big};
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 0, "z", 1, &bv, 0, &forcible), 0);
  CHECK_INT(forcible, 1);
  CHECK_INT(llen(d, "a", &r), 0);
  CHECK_INT(ml_shdict_free_space(d), 0);
  CHECK(ml_shdict_check(d) == NULL);
  CHECK_INT(push_num(d, ML_SHDICT_RIGHT, "a", 1, &len), UV_ENOMEM);
  ml_shdict_flush_all(d);
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

/* the model: what each of KEYS keys holds: a string of model_len[i] bytes model_byte[i], nothing
 * (-1) or a list (-2) of model_count[i] items, left to right; an item n is the number n when even,
 * else a string of n % 25 bytes 'A' + n % 26 (what item() makes) */
#define KEYS 200
#define LIST_MAX 32 /* a push to a longer list is an llen instead: the budget is never short */
static int model_len[KEYS];
static char model_byte[KEYS];
static int model_items[KEYS][LIST_MAX];
static int model_count[KEYS];

static ml_shvalue_t item(int n, char *bytes) {
  ml_shvalue_t v = {.type = ML_SHV_NUMBER, .number = n};
  if (n % 2) {
    memset(bytes, 'A' + n % 26, (size_t)(n % 25));
    v = (ml_shvalue_t){.type = ML_SHV_STRING, .str = bytes, .len = (size_t)(n % 25)};
  }
  return v;
}

static int same_item(const ml_shvalue_t *got, int n) {
  char bytes[32];
  ml_shvalue_t want = item(n, bytes);
  if (got->type != want.type) return 0;
  if (want.type == ML_SHV_NUMBER) return got->number == want.number;
  return got->len == want.len && (want.len == 0 || memcmp(got->str, want.str, want.len) == 0);
}

/* the budget bytes the model's entries count for, by shdict.h's rule */
static size_t model_used(void) {
  size_t used = 0;
  for (int i = 0; i < KEYS; i++) {
    char key[16];
    size_t klen = (size_t)snprintf(key, sizeof key, "key%d", i);
    if (model_len[i] >= 0) used += klen + (size_t)model_len[i] + ML_SHDICT_ENTRY_OVERHEAD;
    if (model_len[i] != -2) continue;
    used += klen + ML_SHDICT_ENTRY_OVERHEAD;
    for (int j = 0; j < model_count[i]; j++) {
      int n = model_items[i][j];
      used += (n % 2 ? (size_t)(n % 25) : 8) + ML_SHDICT_ENTRY_OVERHEAD;
    }
  }
  return used;
}

static void test_random(ml_shm_t *shm) {
  ctest_section("20,000 random operations, lists among them, agree with a plain model; lists, "
                "blocks and the budget stay whole");
  int created;
  size_t size = 1 << 20;
  ml_shdict_t *d = open_dict(shm, "random", size, &created); /* never full: nothing evicted */
  srand(12345);
  for (int i = 0; i < KEYS; i++)
    model_len[i] = -1;
  static char value[700];
  int agree = 1, whole = 1, budget = 1, next_item = 0, lists_seen = 0;
  for (int op = 0; op < 20000; op++) {
    int i = rand() % KEYS;
    char key[16];
    snprintf(key, sizeof key, "key%d", i);
    int len = rand() % 700, how = rand() % 10, forcible = 0, r;
    char byte = (char)('a' + rand() % 26);
    memset(value, byte, (size_t)len);
    ml_shvalue_t v = {.type = ML_SHV_STRING, .str = value, .len = (size_t)len};
    int is_list = model_len[i] == -2, present = model_len[i] != -1;
    lists_seen += is_list;
    if ((how == 5 || how == 6) && is_list && model_count[i] == LIST_MAX) how = 9;
    switch (how) {
    case 0:
    case 1: /* set or add */
      r = ml_shdict_store(d, how == 0 ? ML_SHDICT_SET : ML_SHDICT_ADD, 0, key, strlen(key), &v, 0,
                          &forcible);
      if (how == 1 && present) {
        agree &= r == UV_EEXIST;
      } else {
        agree &= r == 0 && !forcible;
        model_len[i] = len;
        model_byte[i] = byte;
      }
      break;
    case 2: /* replace */
      r = ml_shdict_store(d, ML_SHDICT_REPLACE, 0, key, strlen(key), &v, 0, &forcible);
      agree &= r == (present ? 0 : UV_ENOENT);
      if (r == 0) model_len[i] = len, model_byte[i] = byte;
      break;
    case 3:
      agree &= ml_shdict_delete(d, key, strlen(key)) == (present ? 0 : UV_ENOENT);
      model_len[i] = -1;
      break;
    case 4: {
      ml_shvalue_t got;
      r = get(d, key, &got);
      if (!present)
        agree &= r == UV_ENOENT;
      else if (is_list)
        agree &= r == 0 && got.type == ML_SHV_LIST;
      else
        agree &= r == 0 && got.len == (size_t)model_len[i] &&
                 (got.len == 0 ||
                  (got.str[0] == model_byte[i] && got.str[got.len - 1] == model_byte[i]));
      break;
    }
    case 5:
    case 6: { /* lpush, rpush */
      char bytes[32];
      int n = next_item++;
      ml_shvalue_t iv = item(n, bytes);
      size_t new_len = 0;
      r = ml_shdict_push(d, how == 5 ? ML_SHDICT_LEFT : ML_SHDICT_RIGHT, key, strlen(key), &iv,
                         &new_len);
      if (present && !is_list) {
        agree &= r == UV_EINVAL;
        break;
      }
      if (!is_list) model_len[i] = -2, model_count[i] = 0;
      agree &= r == 0 && new_len == (size_t)model_count[i] + 1;
      if (how == 5) {
        memmove(&model_items[i][1], &model_items[i][0], sizeof(int) * (size_t)model_count[i]);
        model_items[i][0] = n;
      } else {
        model_items[i][model_count[i]] = n;
      }
      model_count[i]++;
      break;
    }
    case 7:
    case 8: { /* lpop, rpop */
      ml_shvalue_t got;
      r = pop(d, how == 7 ? ML_SHDICT_LEFT : ML_SHDICT_RIGHT, key, &got);
      if (!present) {
        agree &= r == UV_ENOENT;
      } else if (!is_list) {
        agree &= r == UV_EINVAL;
      } else {
        int at = how == 7 ? 0 : model_count[i] - 1;
        agree &= r == 0 && same_item(&got, model_items[i][at]);
        if (how == 7)
          memmove(&model_items[i][0], &model_items[i][1],
                  sizeof(int) * (size_t)(model_count[i] - 1));
        model_count[i]--;
        if (model_count[i] == 0) model_len[i] = -1;
      }
      break;
    }
    default: { /* llen */
      size_t n = 99;
      r = ml_shdict_llen(d, key, strlen(key), &n);
      if (present && !is_list)
        agree &= r == UV_EINVAL;
      else
        agree &= r == 0 && n == (size_t)(is_list ? model_count[i] : 0);
    }
    }
    if (op % 500 == 0 || op == 19999) {
      whole &= ml_shdict_check(d) == NULL;
      budget &= ml_shdict_free_space(d) == size - model_used();
    }
  }
  CHECK(lists_seen > 1000); /* (the mix did reach lists) */
  CHECK(budget);
  CHECK(agree);
  CHECK(whole);
  ml_shdict_flush_all(d);
  ctest_section("after a flush the heap is one again: the largest value the budget allows fits");
  size_t big = size - 1 - ML_SHDICT_ENTRY_OVERHEAD;
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
  for (;; n++) { /* 8 + 9 + 64 = 81 budget bytes each, in a 128-byte block (56 + 8 + 9 = 73) */
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

/* One side of the exchange: pushes 1..n onto `out` while it pops n values from `in`, which the
 * other process pushed in the same order (odd ones as strings, even ones as numbers). A full
 * dictionary (UV_ENOMEM) or an empty list (UV_ENOENT) only means "try again", for 10 s at most
 * without progress (a dictionary that leaks fails rather than hangs). Returns how many values came
 * out of order or of the wrong type, plus 1000 for any other failure; *sum: their sum. */
static int exchange(ml_shdict_t *d, const char *out, const char *in, int n, long long *sum) {
  int pushed = 0, popped = 0, wrong = 0, last = 0;
  uint64_t since = uv_hrtime();
  *sum = 0;
  while (pushed < n || popped < n) {
    if (pushed + popped != last) {
      last = pushed + popped;
      since = uv_hrtime();
    } else if (uv_hrtime() - since > 10 * (uint64_t)1000000000) {
      return wrong + 1000;
    }
    if (pushed < n) {
      int r;
      size_t len;
      char s[16];
      snprintf(s, sizeof s, "%d", pushed + 1);
      if ((pushed + 1) % 2)
        r = push_str(d, ML_SHDICT_RIGHT, out, s, &len);
      else
        r = push_num(d, ML_SHDICT_RIGHT, out, pushed + 1, &len);
      if (r == 0)
        pushed++;
      else if (r != UV_ENOMEM)
        return wrong + 1000;
    }
    if (popped < n) {
      ml_shvalue_t v;
      int r = pop(d, ML_SHDICT_LEFT, in, &v);
      if (r == UV_ENOENT) continue;
      if (r != 0) return wrong + 1000;
      popped++;
      char s[16] = ""; /* (a string comes back with its length, not NUL-terminated) */
      if (v.type == ML_SHV_STRING && v.len < sizeof s) memcpy(s, v.str, v.len);
      double got = v.type == ML_SHV_NUMBER ? v.number : v.type == ML_SHV_STRING ? atof(s) : -1;
      wrong += got != popped || (v.type == ML_SHV_STRING) != (popped % 2);
      *sum += (long long)got;
    }
  }
  return wrong;
}

static void test_list_processes(ml_shm_t *shm) {
  ctest_section("two processes each push 20,000 values that the other pops, in order");
  int created, n = 20000;
  size_t size = 64 * 1024; /* (it fills now and then: pushes wait for pops) */
  ml_shdict_t *d = open_dict(shm, "exchange", size, &created);
  pid_t pid = fork();
  if (pid == 0) {
    long long sum;
    int wrong = exchange(d, "to parent", "to child", n, &sum);
    _exit(wrong == 0 && sum == (long long)n * (n + 1) / 2 ? 0 : 1);
  }
  long long sum = -1;
  int status = -1;
  CHECK_INT(exchange(d, "to child", "to parent", n, &sum), 0);
  CHECK_INT(sum, (long long)n * (n + 1) / 2);
  waitpid(pid, &status, 0);
  CHECK_INT(status, 0);
  int r;
  CHECK_INT(llen(d, "to child", &r) + llen(d, "to parent", &r), 0);
  CHECK_INT(ml_shdict_free_space(d), size);
  CHECK(ml_shdict_check(d) == NULL);
}

static void test_list_fragments(ml_shm_t *shm) {
  ctest_section("a heap cut up by lists' nodes takes a large value: whole lists make room");
  size_t size = 1 << 20;
  void *zone;
  int created, forcible = 0;
  CHECK_INT(ml_shm_zone(shm, "cutlists", ml_shdict_zone_bytes_with(size, 2), ml_shdict_init, &size,
                        &zone, &created),
            0);
  ml_shdict_t *d = zone;
  /* 225-byte strings: 289 budget bytes in a 512-byte block each; pairs of lists pushed in turn,
   * 50 values each, so that deleting every "gap" list cuts the heap up evenly */
  static char value[225];
  ml_shvalue_t v = {.type = ML_SHV_STRING, .str = value, .len = sizeof value};
  char key[32];
  int groups = 0, full = 0;
  size_t len;
  for (; !full; groups++)
    for (int j = 0; j < 50 && !full; j++)
      for (int gap = 0; gap < 2 && !full; gap++) {
        snprintf(key, sizeof key, "%s%d", gap ? "gap" : "keep", groups);
        memset(value, 'a' + groups % 26, sizeof value);
        full = ml_shdict_push(d, ML_SHDICT_RIGHT, key, strlen(key), &v, &len) != 0;
      }
  CHECK(groups > 20);
  for (int g = 0; g < groups; g++) {
    snprintf(key, sizeof key, "gap%d", g);
    ml_shdict_delete(d, key, strlen(key));
  }
  size_t big = 300 * 1024;
  char *bigv = calloc(1, big);
  ml_shvalue_t bv = {.type = ML_SHV_STRING, .str = bigv, .len = big};
  CHECK(ml_shdict_free_space(d) > big + 100);
  CHECK_INT(ml_shdict_store(d, ML_SHDICT_SET, 0, "big", 3, &bv, 0, &forcible), 0);
  CHECK_INT(forcible, 1);
  free(bigv);
  CHECK(ml_shdict_check(d) == NULL);
  /* a list is there whole or not at all, its values in order */
  int lost = 0, whole = 1, last = groups - 1;
  for (int g = 0; g < groups; g++) {
    snprintf(key, sizeof key, "keep%d", g);
    int r;
    size_t n = llen(d, key, &r);
    if (n == 0) {
      lost++;
      continue;
    }
    whole &= g == last || n == 50;
    for (ml_shvalue_t got; pop(d, ML_SHDICT_LEFT, key, &got) == 0;)
      whole &= got.len == sizeof value && got.str[0] == 'a' + g % 26 &&
               got.str[sizeof value - 1] == 'a' + g % 26;
  }
  CHECK(whole);
  CHECK(lost > 0 && lost < groups / 2);
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
  test_lists(shm);
  test_expiry(shm);
  test_random(shm);
  test_eviction(shm);
  test_fragments(shm);
  test_processes(shm);
  test_list_processes(shm);
  test_list_fragments(shm);
  test_arena_limits(shm);
  ml_shm_close(shm);
  free(buf.data);
  return ctest_end();
}
