/* cli/static_libs.c: linked into the fully static executables of `make static` only. They link
 * OpenSSL, SQLite, PCRE2 and zlib from their archives instead of opening them on first use (a
 * static executable's dlopen would need the very glibc it was built with): these strong NAME_linked
 * replace the weak ones of core/dynlib.h's ML_DYNLIB_DEFINE and fill each table with the linked
 * functions. */
#define ML_OPENSSL_DIRECT
#define ML_SQLITE_DIRECT
#define ML_PCRE2_DIRECT
#define ML_ZLIB_DIRECT
#include "../bindings/pcre2_api.h"
#include "../bindings/sqlite_api.h"
#include "../core/openssl_api.h"
#include "../core/zlib_api.h"

int ml_openssl_linked(ml_openssl_t *t) {
  ML_OPENSSL_FUNCS(ML_DYNLIB_LINK)
  return 1;
}

int ml_sqlite_linked(ml_sqlite_t *t) {
  ML_SQLITE_FUNCS(ML_DYNLIB_LINK)
  return 1;
}

int ml_pcre2_linked(ml_pcre2_t *t) {
  ML_PCRE2_FUNCS(ML_DYNLIB_LINK)
  return 1;
}

int ml_zlib_linked(ml_zlib_t *t) {
  ML_ZLIB_FUNCS(ML_DYNLIB_LINK)
  return 1;
}
