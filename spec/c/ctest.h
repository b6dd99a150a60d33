/* spec/c/ctest.h: the harness of the C tests in spec/c, header only (one test program per file).
 *
 *   CHECK(cond)              counts a pass, or prints "file:line: CHECK(cond) failed" and counts a
 *                            failure; its value is !!cond, so `if (CHECK(p != NULL)) use(p);` works
 *   CHECK_INT(a, b)          a == b as long long; a failure prints both values
 *   CHECK_STR(a, b)          equal NUL-terminated strings (NULL never equals anything)
 *   CHECK_HAS(hay, needle)   strstr(hay, needle) != NULL; a failure prints both strings
 *   CHECK_LACKS(hay, needle) strstr(hay, needle) == NULL
 *   ctest_section("name")    prints "-- name", so that a failure can be placed in the output
 *   return ctest_end();      prints the closing line "ctests: N passed, M failed" that spec/run.sh
 *                            reads, and returns the exit code: 0, or 1 when a check failed
 *
 * Checks never abort: a test goes on after a failure so that one run reports every failure, which
 * is why code after a CHECK must not rely on the condition having held. Single-threaded only.
 */
#ifndef ML_CTEST_H
#define ML_CTEST_H

#include <stdio.h>
#include <string.h>

static int ctest_passed, ctest_failed;

/* Counts one check; `what` is the text printed on failure. Returns ok. */
static inline int ctest_check(int ok, const char *what, const char *file, int line) {
  if (ok) {
    ctest_passed++;
  } else {
    ctest_failed++;
    printf("%s:%d: %s failed\n", file, line, what);
    fflush(stdout);
  }
  return ok;
}

static inline int ctest_check_int(long long a, long long b, const char *what, const char *file,
                                  int line) {
  int ok = ctest_check(a == b, what, file, line);
  if (!ok) printf("    got %lld, expected %lld\n", a, b);
  return ok;
}

/* want_has: -1 equal strings, 1 b occurs in a, 0 b does not occur in a. */
static inline int ctest_check_str(const char *a, const char *b, int want_has, const char *what,
                                  const char *file, int line) {
  int ok;
  if (want_has < 0) {
    ok = a && b && strcmp(a, b) == 0;
  } else {
    ok = a && b && (strstr(a, b) != NULL) == want_has;
  }
  ctest_check(ok, what, file, line);
  if (!ok) printf("    first:  \"%s\"\n    second: \"%s\"\n", a ? a : "(null)", b ? b : "(null)");
  return ok;
}

#define CHECK(cond) ctest_check(!!(cond), "CHECK(" #cond ")", __FILE__, __LINE__)
#define CHECK_INT(a, b)                                                                            \
  ctest_check_int((long long)(a), (long long)(b), "CHECK_INT(" #a ", " #b ")", __FILE__, __LINE__)
#define CHECK_STR(a, b)                                                                            \
  ctest_check_str((a), (b), -1, "CHECK_STR(" #a ", " #b ")", __FILE__, __LINE__)
#define CHECK_HAS(hay, needle)                                                                     \
  ctest_check_str((hay), (needle), 1, "CHECK_HAS(" #hay ", " #needle ")", __FILE__, __LINE__)
#define CHECK_LACKS(hay, needle)                                                                   \
  ctest_check_str((hay), (needle), 0, "CHECK_LACKS(" #hay ", " #needle ")", __FILE__, __LINE__)

static inline void ctest_section(const char *name) {
  printf("-- %s\n", name);
  fflush(stdout);
}

static inline int ctest_end(void) {
  printf("ctests: %d passed, %d failed\n", ctest_passed, ctest_failed);
  fflush(stdout);
  return ctest_failed ? 1 : 0;
}

#endif
