/* bindings/pq_api.c: opens libpq on its first use and fills ml_pq (bindings/pq_api.h,
 * core/dynlib.h): written once, inside pthread_once, read-only after. */
#define ML_PQ_DIRECT
#include "pq_api.h"

ML_DYNLIB_DEFINE(ml_pq, ml_pq_t, ML_PQ_FUNCS, ML_PQ_SONAME,
                 "libpq is not installed (" ML_PQ_SONAME ")", "libpq is too old (" ML_PQ_SONAME ")")
