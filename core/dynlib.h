/* core/dynlib.h: libraries opened on their first use (dlopen) instead of linked. A process that
 * never makes a TLS connection, a WebSocket handshake or a digest then maps no OpenSSL (its
 * relocations alone kept 1.7 MB resident in every idle server), one that opens no SQLite database
 * no SQLite, one that compiles no regex no PCRE2, one that compresses nothing no zlib, one that
 * talks to no PostgreSQL no libpq (and the GnuTLS, Kerberos and LDAP it pulls in); start-up is
 * shorter too.
 *
 * Each such library has a header with an X-macro list of the entry points moonlet calls, a table
 * of pointers to them (ML_DYNLIB_SLOT), and, after the table, one #define per entry point that
 * sends its calls through the table (the library's own macros included). Its .c file expands
 * ML_DYNLIB_DEFINE: the loader fills the table once per process (pthread_once) and never changes
 * it after, so every instance and thread shares it without it being mutable state. Callers call
 * the loader before their first call into the library on every path. A static executable links
 * the library instead and fills the table with the linked functions (ML_DYNLIB_LINK, in a strong
 * NAME_linked: cli/static_libs.c). libpq (bindings/pq_api.c) has no strong one: every build opens
 * it.
 */
#ifndef ML_DYNLIB_H
#define ML_DYNLIB_H

#include <dlfcn.h>
#include <pthread.h>

/* One member of a table: a pointer typed like the function it holds. */
#define ML_DYNLIB_SLOT(f) __typeof__(f) *f;
/* Fills t->f from the library handle lib; the enclosing function returns f's name when lib lacks
 * it (an older library than the headers). */
#define ML_DYNLIB_LOOKUP(f)                                                                        \
  if (!(*(void **)&t->f = dlsym(lib, #f))) return #f;
/* Fills t->f with the function linked into this executable. */
#define ML_DYNLIB_LINK(f) t->f = f;

/* Defines the table NAME (of type TYPE, entry points FUNCS), the loader `const char *NAME_load
 * (void)` (NULL once the table is usable, else MISSING when SONAME cannot be opened or OLD when it
 * lacks an entry point; the same answer every time, from any thread), and a weak NAME_linked that
 * returns 0 (a static build's strong one fills the table and returns 1). */
#define ML_DYNLIB_DEFINE(NAME, TYPE, FUNCS, SONAME, MISSING, OLD)                                  \
  TYPE NAME;                                                                                       \
  static const char *NAME##_error;                                                                 \
  static pthread_once_t NAME##_once = PTHREAD_ONCE_INIT;                                           \
  __attribute__((weak)) int NAME##_linked(TYPE *t) {                                               \
    (void)t;                                                                                       \
    return 0;                                                                                      \
  }                                                                                                \
  static const char *NAME##_lookup(void *lib, TYPE *t) {                                           \
    FUNCS(ML_DYNLIB_LOOKUP)                                                                        \
    return NULL;                                                                                   \
  }                                                                                                \
  static void NAME##_open(void) {                                                                  \
    if (NAME##_linked(&NAME)) return;                                                              \
    void *lib = dlopen(SONAME, RTLD_NOW | RTLD_LOCAL);                                             \
    if (!lib)                                                                                      \
      NAME##_error = MISSING;                                                                      \
    else if (NAME##_lookup(lib, &NAME))                                                            \
      NAME##_error = OLD;                                                                          \
  }                                                                                                \
  const char *NAME##_load(void) {                                                                  \
    pthread_once(&NAME##_once, NAME##_open);                                                       \
    return NAME##_error;                                                                           \
  }

#endif
