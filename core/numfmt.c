/* core/numfmt.c: integers in decimal, and "%.14g" the way LuaJIT's tostring writes it (the
 * contracts are in numfmt.h).
 *
 * A finite n is m * 2^k exactly (m < 2^53). For the 14 significant digits, N = round(|n| * 10^q)
 * with q = 13 - e, e the decimal exponent of |n|: |n| * 10^q = m * 5^q * 2^(q + k), an integer
 * product (m * 5^q < 2^116 for q <= 27) shifted right, so the digits and the rounding (half away
 * from zero, as LuaJIT) are exact. Then %g's layout: fixed notation for -4 <= e < 14, trailing
 * zeros dropped, else d.ddde+XX.
 */
#include "numfmt.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define E14 100000000000000ULL
#define E13 10000000000000ULL

/* "00" to "99": two digits per division */
static const char pairs[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233"
    "34353637383940414243444546474849505152535455565758596061626364656667"
    "6869707172737475767778798081828384858687888990919293949596979899";

char *ml_numfmt_uint(char *p, uint64_t v) {
  char tmp[20];
  int i = 20;
  while (v >= 100) {
    unsigned d = (unsigned)(v % 100) * 2;
    v /= 100;
    tmp[--i] = pairs[d + 1];
    tmp[--i] = pairs[d];
  }
  if (v >= 10) {
    tmp[--i] = pairs[v * 2 + 1];
    tmp[--i] = pairs[v * 2];
  } else {
    tmp[--i] = (char)('0' + v);
  }
  memcpy(p, tmp + i, (size_t)(20 - i));
  return p + (20 - i);
}

#ifdef __SIZEOF_INT128__
static const uint64_t pow5[28] = {1ULL,
                                  5ULL,
                                  25ULL,
                                  125ULL,
                                  625ULL,
                                  3125ULL,
                                  15625ULL,
                                  78125ULL,
                                  390625ULL,
                                  1953125ULL,
                                  9765625ULL,
                                  48828125ULL,
                                  244140625ULL,
                                  1220703125ULL,
                                  6103515625ULL,
                                  30517578125ULL,
                                  152587890625ULL,
                                  762939453125ULL,
                                  3814697265625ULL,
                                  19073486328125ULL,
                                  95367431640625ULL,
                                  476837158203125ULL,
                                  2384185791015625ULL,
                                  11920928955078125ULL,
                                  59604644775390625ULL,
                                  298023223876953125ULL,
                                  1490116119384765625ULL,
                                  7450580596923828125ULL};

/* N = round(m * 2^k * 10^q), half away from zero; 0 when out of the exact range. floor_n gets the
 * unrounded integer part, which says whether e was right. */
static uint64_t scaled(uint64_t m, int k, int q, uint64_t *floor_n) {
  if (q < 0 || q > 27) return 0;
  unsigned __int128 p = (unsigned __int128)m * pow5[q];
  int s = -(q + k); /* |n| * 10^q = p / 2^s */
  if (s <= 0 || s >= 120) return 0;
  unsigned __int128 fl = p >> s;
  unsigned __int128 rem = p - (fl << s);
  unsigned __int128 half = (unsigned __int128)1 << (s - 1);
  if (fl >= E14 * 10) return 0;
  *floor_n = (uint64_t)fl;
  return (uint64_t)fl + (rem >= half);
}
#endif

size_t ml_numfmt_g14(double n, char *buf) {
  if (!isfinite(n) || (n == 0 && signbit(n))) return 0;
  char *p = buf;
  double a = fabs(n);
  if (a < 1e14 && (double)(uint64_t)a == a) { /* an integer: its digits, at most 14 */
    if (n < 0) *p++ = '-';
    p = ml_numfmt_uint(p, (uint64_t)a);
    *p = '\0';
    return (size_t)(p - buf);
  }
#ifdef __SIZEOF_INT128__
  if (a < 1e-14 || a >= 1e14) return 0;
  uint64_t bits;
  memcpy(&bits, &a, sizeof bits);   /* a normal double here: 1e-14 <= a < 1e14 */
  int k = (int)(bits >> 52) - 1075; /* a = m * 2^k exactly */
  uint64_t m = (bits & ((1ULL << 52) - 1)) | (1ULL << 52);
  /* 2^l2 <= a < 2^(l2 + 1); e = floor(l2 * log10(2)) is the decimal exponent or one below it
   * (78913 / 2^18 is log10(2) to within 2^-18, which is exact enough for |l2| < 1650) */
  int l2 = k + 52;
  int e = l2 >= 0 ? (l2 * 78913) >> 18 : -((-l2 * 78913 + (1 << 18) - 1) >> 18);
  uint64_t fl = 0, N = 0;
  for (int tries = 0; tries < 3; tries++) {
    N = scaled(m, k, 13 - e, &fl);
    if (N == 0) return 0;
    if (fl < E13) {
      e--;
    } else if (fl >= E14) {
      e++;
    } else {
      break;
    }
    N = 0;
  }
  if (N == 0) return 0;
  if (N == E14) { /* 9.99999999999995 rounds to 10 */
    N = E13;
    e++;
  }
  char d[14];
  ml_numfmt_uint(d, N); /* 14 digits: E13 <= N < E14 */
  int nd = 14;
  while (nd > 1 && d[nd - 1] == '0')
    nd--;
  if (n < 0) *p++ = '-';
  if (e < -4 || e >= 14) {
    *p++ = d[0];
    if (nd > 1) {
      *p++ = '.';
      memcpy(p, d + 1, (size_t)nd - 1);
      p += nd - 1;
    }
    *p++ = 'e';
    *p++ = e < 0 ? '-' : '+';
    int x = e < 0 ? -e : e;
    if (x < 10) *p++ = '0';
    p = ml_numfmt_uint(p, (uint64_t)x);
  } else if (e >= 0) { /* ddd or ddd.ddd (d holds all 14 digits, zeros included) */
    memcpy(p, d, (size_t)e + 1);
    p += e + 1;
    if (nd > e + 1) {
      *p++ = '.';
      memcpy(p, d + e + 1, (size_t)(nd - e - 1));
      p += nd - e - 1;
    }
  } else { /* 0.000ddd */
    *p++ = '0';
    *p++ = '.';
    for (int i = 0; i < -e - 1; i++)
      *p++ = '0';
    memcpy(p, d, (size_t)nd);
    p += nd;
  }
  *p = '\0';
  return (size_t)(p - buf);
#else
  return 0;
#endif
}
