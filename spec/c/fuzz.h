/* spec/c/fuzz.h: the driver of the fuzz tests (spec/c/test_fuzz_*.c), header only.
 *
 * A fuzz test defines fuzz_one(data, len), which feeds one input to the code under test and checks
 * what must hold for any input with FUZZ_CHECK (which counts failures only: a whole run is one
 * check of ctest.h, passed when no input failed), and a table of seeds (valid inputs). Two ways to
 * run it:
 * - In `make test` its main calls fuzz_main(): FUZZ_N inputs (env ML_FUZZ_N, else the test's
 *   default), each a seed changed by 1 to 4 random mutations (bit flips, interesting bytes, tokens
 *   of the test's dictionary inserted, ranges deleted or repeated, another seed spliced in), from a
 *   fixed PRNG seed (env ML_FUZZ_SEED), so that a run makes the same inputs every time and a
 *   failure can be replayed (where a test's outcome also hangs on timing, such as where a socket's
 *   reads end, a replay may not fail the same way). The first input that fails a check is written
 * to fuzz-failure-<name>.bin and the run stops there; `ML_FUZZ_REPLAY=file` runs one input from a
 * file; `ML_FUZZ_SEEDS_DIR=dir` only writes the seeds into dir (libFuzzer's first corpus).
 * - Built with -DML_LIBFUZZER (`make fuzz`, clang), the same fuzz_one is libFuzzer's
 *   LLVMFuzzerTestOneInput: coverage guides the search, and a failed check aborts so that
 *   libFuzzer keeps the input.
 */
#ifndef ML_FUZZ_H
#define ML_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctest.h"

#define FUZZ_MAX_INPUT 4096

typedef struct fuzz_seed_s {
  const char *data;
  size_t len; /* 0: strlen(data) */
} fuzz_seed_t;

static void fuzz_one(const uint8_t *data, size_t len);

static int fuzz_failed;    /* FUZZ_CHECKs that failed */
static int fuzz_seed = -1; /* the index of the seed being run as it is, -1 for any other input */

#define FUZZ_CHECK(cond) fuzz_check(!!(cond), #cond, __FILE__, __LINE__)

static inline int fuzz_check(int ok, const char *what, const char *file, int line) {
  if (!ok && fuzz_failed++ < 20) {
    printf("%s:%d: FUZZ_CHECK(%s) failed\n", file, line, what);
    fflush(stdout);
  }
  return ok;
}

#ifdef ML_LIBFUZZER

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
  if (len > FUZZ_MAX_INPUT) return 0;
  fuzz_one(data, len);
  if (fuzz_failed) abort();
  return 0;
}

#else

static uint64_t fuzz_rng; /* xorshift64* */

static uint32_t fuzz_rand(uint32_t n) {
  fuzz_rng ^= fuzz_rng >> 12;
  fuzz_rng ^= fuzz_rng << 25;
  fuzz_rng ^= fuzz_rng >> 27;
  return n ? (uint32_t)((fuzz_rng * 2685821657736338717ull) >> 32) % n : 0;
}

static size_t seed_len(const fuzz_seed_t *s) { return s->len ? s->len : strlen(s->data); }

static const uint8_t fuzz_bytes[] = {0,   1,   '\t', '\n', '\r', ' ',  '"', '%',
                                     ',', '-', '/',  '0',  '9',  ':',  ';', '=',
                                     'F', 'a', 'f',  0x7f, 0x80, 0xc0, 0xff};

/* Changes buf[0..*len) in place (room for FUZZ_MAX_INPUT bytes) by one random mutation. */
static void fuzz_mutate(uint8_t *buf, size_t *len, const fuzz_seed_t *seeds, size_t nseeds,
                        const char *const *dict, size_t ndict) {
  size_t n = *len, pos = n ? fuzz_rand((uint32_t)n) : 0;
  switch (fuzz_rand(7)) {
  case 0: /* flip a bit */
    if (n) buf[pos] ^= (uint8_t)(1u << fuzz_rand(8));
    break;
  case 1: /* an interesting byte */
    if (n) buf[pos] = fuzz_bytes[fuzz_rand(sizeof fuzz_bytes)];
    break;
  case 2: { /* a token of the dictionary, inserted or written over */
    const char *t = dict[fuzz_rand((uint32_t)ndict)];
    size_t tl = strlen(t);
    if (n + tl > FUZZ_MAX_INPUT) break;
    if (fuzz_rand(2)) {
      memmove(buf + pos + tl, buf + pos, n - pos);
      *len = n + tl;
    } else if (pos + tl > n) {
      *len = pos + tl;
    }
    memcpy(buf + pos, t, tl);
    break;
  }
  case 3: { /* delete a range */
    size_t k = 1 + fuzz_rand(16);
    if (pos + k > n) k = n - pos;
    memmove(buf + pos, buf + pos + k, n - pos - k);
    *len = n - k;
    break;
  }
  case 4: { /* repeat a range */
    size_t k = 1 + fuzz_rand(64);
    if (pos + k > n) k = n - pos;
    if (n + k > FUZZ_MAX_INPUT) break;
    memmove(buf + pos + k, buf + pos, n - pos);
    *len = n + k;
    break;
  }
  case 5: { /* splice in a piece of another seed */
    const fuzz_seed_t *s = &seeds[fuzz_rand((uint32_t)nseeds)];
    size_t sl = seed_len(s), from = fuzz_rand((uint32_t)sl), k = sl - from;
    if (pos + k > FUZZ_MAX_INPUT) k = FUZZ_MAX_INPUT - pos;
    memcpy(buf + pos, s->data + from, k);
    *len = pos + k;
    break;
  }
  default: /* cut the end */ *len = pos; break;
  }
}

static void fuzz_save(const char *name, const uint8_t *data, size_t len) {
  char path[128];
  snprintf(path, sizeof path, "fuzz-failure-%s.bin", name);
  FILE *f = fopen(path, "wb");
  if (f) {
    fwrite(data, 1, len, f);
    fclose(f);
  }
  printf("    the failing input is in %s (replay: ML_FUZZ_REPLAY=%s)\n", path, path);
}

static unsigned long fuzz_env(const char *name, unsigned long dflt) {
  const char *v = getenv(name);
  return v && *v ? strtoul(v, NULL, 0) : dflt;
}

/* Runs the seeds as they are, then n_default mutated inputs (or ML_FUZZ_N). Returns after the
 * first input that failed a check. */
static void fuzz_main(const char *name, const fuzz_seed_t *seeds, size_t nseeds,
                      const char *const *dict, size_t ndict, unsigned long n_default) {
  static uint8_t buf[FUZZ_MAX_INPUT];
  const char *dir = getenv("ML_FUZZ_SEEDS_DIR");
  if (dir && *dir) { /* `make fuzz`: the seeds become libFuzzer's first corpus */
    for (size_t i = 0; i < nseeds; i++) {
      char path[512];
      snprintf(path, sizeof path, "%s/seed-%s-%zu", dir, name, i);
      FILE *f = fopen(path, "wb");
      if (!CHECK(f != NULL)) return;
      fwrite(seeds[i].data, 1, seed_len(&seeds[i]), f);
      fclose(f);
    }
    exit(0);
  }
  const char *replay = getenv("ML_FUZZ_REPLAY");
  if (replay && *replay) {
    FILE *f = fopen(replay, "rb");
    if (!CHECK(f != NULL)) return;
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    fuzz_one(buf, len);
    CHECK_INT(fuzz_failed, 0);
    return;
  }
  unsigned long n = fuzz_env("ML_FUZZ_N", n_default);
  fuzz_rng = fuzz_env("ML_FUZZ_SEED", 0x6d6f6f6e6c6574ull) | 1;
  for (size_t i = 0; i < nseeds; i++) {
    size_t len = seed_len(&seeds[i]);
    memcpy(buf, seeds[i].data, len);
    fuzz_seed = (int)i; /* a test may hold its seeds to more than what holds for any input */
    fuzz_one(buf, len);
    fuzz_seed = -1;
    if (fuzz_failed) {
      printf("    seed %zu failed\n", i);
      fuzz_save(name, buf, len);
      CHECK_INT(fuzz_failed, 0);
      return;
    }
  }
  for (unsigned long i = 0; i < n; i++) {
    const fuzz_seed_t *s = &seeds[fuzz_rand((uint32_t)nseeds)];
    size_t len = seed_len(s);
    memcpy(buf, s->data, len);
    for (uint32_t k = 1 + fuzz_rand(4); k > 0; k--)
      fuzz_mutate(buf, &len, seeds, nseeds, dict, ndict);
    fuzz_one(buf, len);
    if (fuzz_failed) {
      printf("    mutated input %lu failed\n", i);
      fuzz_save(name, buf, len);
      CHECK_INT(fuzz_failed, 0);
      return;
    }
  }
  printf("    %zu seeds and %lu mutated inputs, none failed\n", nseeds, n);
  CHECK_INT(fuzz_failed, 0);
}

#endif /* ML_LIBFUZZER */
#endif
