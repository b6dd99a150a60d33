/* core/openssl_api.c: opens OpenSSL on its first use and fills ml_openssl (core/openssl_api.h,
 * core/dynlib.h): written once, inside pthread_once, before any caller reads it; read-only after,
 * shared by every instance and by the thread pool. */
#define ML_OPENSSL_DIRECT
#include "openssl_api.h"

ML_DYNLIB_DEFINE(ml_openssl, ml_openssl_t, ML_OPENSSL_FUNCS, ML_OPENSSL_SONAME,
                 "OpenSSL is not installed (" ML_OPENSSL_SONAME ")",
                 "OpenSSL is too old (" ML_OPENSSL_SONAME ")")
