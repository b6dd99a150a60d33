/* core/zlib_api.c: opens zlib on its first use and fills ml_zlib (core/zlib_api.h, core/dynlib.h):
 * written once, inside pthread_once, read-only after. */
#define ML_ZLIB_DIRECT
#include "zlib_api.h"

ML_DYNLIB_DEFINE(ml_zlib, ml_zlib_t, ML_ZLIB_FUNCS, ML_ZLIB_SONAME,
                 "zlib is not installed (" ML_ZLIB_SONAME ")",
                 "zlib is too old (" ML_ZLIB_SONAME ")")
