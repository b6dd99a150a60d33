/* bindings/pcre2_api.c: opens PCRE2 on its first use and fills ml_pcre2 (bindings/pcre2_api.h,
 * core/dynlib.h): written once, inside pthread_once, read-only after. */
#define ML_PCRE2_DIRECT
#include "pcre2_api.h"

ML_DYNLIB_DEFINE(ml_pcre2, ml_pcre2_t, ML_PCRE2_FUNCS, ML_PCRE2_SONAME,
                 "PCRE2 is not installed (" ML_PCRE2_SONAME ")",
                 "PCRE2 is too old (" ML_PCRE2_SONAME ")")
