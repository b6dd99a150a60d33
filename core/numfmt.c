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

char *ml_numfmt_uint(char *p, uint64_t v) {
  char tmp[20];
  int n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n)
    *p++ = tmp[--n];
  return p;
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
  int E;
  double f = frexp(a, &E);             /* a = f * 2^E, 0.5 <= f < 1 */
  uint64_t m = (uint64_t)ldexp(f, 53); /* exact: f has 53 bits */
  int k = E - 53;
  int e = (int)floor((E - 1) * 0.30102999566398120); /* e or e - 1 of the true exponent */
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
