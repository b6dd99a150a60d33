/* spec/c/test_numfmt.c: core/numfmt.c writes every number it takes exactly as LuaJIT's tostring
 * does (the response head holds what `tostring(v)` would have given), on chosen edge cases (ties,
 * carries to the next power of ten, the ends of the range) and on a million pseudo-random numbers
 * of every magnitude; and it declines what it does not cover.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "../../core/numfmt.h"
#include "ctest.h"

static lua_State *L;
static int mismatches, covered;

/* Compares one number with tostring; counts (and prints the first few) mismatches. */
static void compare(double n) {
  char buf[ML_NUMFMT_MAX];
  size_t len = ml_numfmt_g14(n, buf);
  if (len == 0) return;
  covered++;
  lua_pushnumber(L, n);
  size_t want_len;
  const char *want = lua_tolstring(L, -1, &want_len);
  if (len != want_len || memcmp(buf, want, len) != 0) {
    if (mismatches++ < 10) printf("    %.17g: got %s, tostring gives %s\n", n, buf, want);
  }
  lua_pop(L, 1);
}

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static uint64_t next_rand(void) { /* xorshift64* */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return rng * 0x2545F4914F6CDD1DULL;
}

int main(void) {
  L = luaL_newstate();
  char buf[ML_NUMFMT_MAX];

  ctest_section("chosen numbers: integers, ties, carries, the ends of the range, signs");
  static const double edge[] = {
      0, 1, -1, 42, 0.5, -0.5, 0.1, 1.5, 2.5, 1e-5, 1.2345e-5, 3.0000000000000004, 1.0 / 3,
      2.0 / 3, 99999999999999.5, 9.99999999999995, 9.999999999999949, 0.000099999999999999,
      0.0001, 0.001, 1e-14, 1.0000000000000001e-14, 99999999999999.0, 12345678901234.5,
      123.456, -123.456, 0x1p-21, 0x1p-30, 0x1.8p-20, 1e13 + 0.5, 4.76837158203125e-07,
      0.30000000000000004, 1e-4 + 1e-18, 5e-324, 1e300, 1e14, 2e14, 1e15 + 0.5};
  for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++) compare(edge[i]);
  CHECK_INT(mismatches, 0);
  CHECK_INT(ml_numfmt_g14(0x1p-21, buf), 19);
  CHECK_STR(buf, "4.7683715820313e-07"); /* a tie, rounded away from zero as LuaJIT does */
  ml_numfmt_g14(99999999999999.5, buf);
  CHECK_STR(buf, "1e+14"); /* the carry reaches the next power of ten */
  ml_numfmt_g14(-0.000123, buf);
  CHECK_STR(buf, "-0.000123");

  ctest_section("declined: NaN, infinities, -0, beyond the exact range");
  CHECK_INT(ml_numfmt_g14(NAN, buf), 0);
  CHECK_INT(ml_numfmt_g14(INFINITY, buf), 0);
  CHECK_INT(ml_numfmt_g14(-INFINITY, buf), 0);
  CHECK_INT(ml_numfmt_g14(-0.0, buf), 0);
  CHECK_INT(ml_numfmt_g14(1e-15, buf), 0);
  CHECK_INT(ml_numfmt_g14(1e14, buf), 0);
  CHECK_INT(ml_numfmt_g14(123456789012345.5, buf), 0);

  ctest_section("ml_numfmt_uint: decimal integers, two digits at a time, as printf writes them");
  static const uint64_t ints[] = {0, 9, 10, 99, 100, 101, 999, 1000, 12345, 200, 1000000007ULL,
                                  18446744073709551615ULL};
  int int_bad = 0;
  for (size_t i = 0; i < sizeof ints / sizeof ints[0] + 100000; i++) {
    uint64_t v = i < sizeof ints / sizeof ints[0] ? ints[i] : next_rand() >> (next_rand() % 64);
    char want[24], got[24];
    snprintf(want, sizeof want, "%llu", (unsigned long long)v);
    *ml_numfmt_uint(got, v) = '\0';
    if (strcmp(want, got) != 0 && int_bad++ < 5) printf("    %s: got %s\n", want, got);
  }
  CHECK_INT(int_bad, 0);

  ctest_section("a million numbers of every magnitude: the same text as tostring");
  for (int i = 0; i < 1000000; i++) {
    uint64_t r = next_rand();
    double n;
    switch (i % 4) {
    case 0: /* any bit pattern: every exponent */
      memcpy(&n, &r, sizeof n);
      break;
    case 1: /* the covered range, spread over its magnitudes */
      n = ldexp((double)(r >> 11) / 9007199254740992.0, (int)(next_rand() % 94) - 47);
      break;
    case 2: /* short decimals such as timings and prices: 14-digit ties and near-ties */
      n = (double)(r % 100000000000000ULL) / pow(10, (double)(next_rand() % 20));
      break;
    default: /* small multiples of powers of two: exact ties */
      n = ldexp((double)(r % 4096), -(int)(next_rand() % 60));
      break;
    }
    if (r & 1) n = -n;
    compare(n);
  }
  CHECK_INT(mismatches, 0);
  CHECK(covered > 700000); /* most of them took the fast way */
  lua_close(L);
  return ctest_end();
}
