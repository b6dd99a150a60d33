/* bindings/sqlite_api.c: opens SQLite on its first use and fills ml_sqlite (bindings/sqlite_api.h,
 * core/dynlib.h): written once, inside pthread_once, read-only after. */
#define ML_SQLITE_DIRECT
#include "sqlite_api.h"

ML_DYNLIB_DEFINE(ml_sqlite, ml_sqlite_t, ML_SQLITE_FUNCS, ML_SQLITE_SONAME,
                 "SQLite is not installed (" ML_SQLITE_SONAME ")",
                 "SQLite is too old (" ML_SQLITE_SONAME ")")
