/* bindings/sqlite_api.h: SQLite, opened on first use (core/dynlib.h): bindings/sqlite.c calls
 * ml_sqlite_load() in core.sqlite_open and core.sqlite_libversion, the calls every other one
 * follows (they take a connection). ML_SQLITE_DIRECT before the include keeps the real names.
 */
#ifndef MLUA_SQLITE_API_H
#define MLUA_SQLITE_API_H

#include "../core/dynlib.h"

#include <sqlite3.h>

#ifndef ML_SQLITE_SONAME
#define ML_SQLITE_SONAME "libsqlite3.so.0"
#endif

#define ML_SQLITE_FUNCS(X)                                                                         \
  X(sqlite3_bind_double)                                                                           \
  X(sqlite3_bind_int64)                                                                            \
  X(sqlite3_bind_null)                                                                             \
  X(sqlite3_bind_parameter_count)                                                                  \
  X(sqlite3_bind_parameter_name)                                                                   \
  X(sqlite3_bind_text64)                                                                           \
  X(sqlite3_busy_timeout)                                                                          \
  X(sqlite3_changes64)                                                                             \
  X(sqlite3_clear_bindings)                                                                        \
  X(sqlite3_close_v2)                                                                              \
  X(sqlite3_column_blob)                                                                           \
  X(sqlite3_column_bytes)                                                                          \
  X(sqlite3_column_count)                                                                          \
  X(sqlite3_column_double)                                                                         \
  X(sqlite3_column_int64)                                                                          \
  X(sqlite3_column_name)                                                                           \
  X(sqlite3_column_text)                                                                           \
  X(sqlite3_column_type)                                                                           \
  X(sqlite3_errmsg)                                                                                \
  X(sqlite3_errstr)                                                                                \
  X(sqlite3_exec)                                                                                  \
  X(sqlite3_extended_result_codes)                                                                 \
  X(sqlite3_finalize)                                                                              \
  X(sqlite3_last_insert_rowid)                                                                     \
  X(sqlite3_libversion)                                                                            \
  X(sqlite3_open_v2)                                                                               \
  X(sqlite3_prepare_v3)                                                                            \
  X(sqlite3_progress_handler)                                                                      \
  X(sqlite3_reset)                                                                                 \
  X(sqlite3_step)

typedef struct ml_sqlite_s {
  ML_SQLITE_FUNCS(ML_DYNLIB_SLOT)
} ml_sqlite_t;

extern ml_sqlite_t ml_sqlite; /* valid once ml_sqlite_load() returned NULL */
/* NULL once SQLite is usable, else why not ("SQLite is not installed (libsqlite3.so.0)"). */
const char *ml_sqlite_load(void);
int ml_sqlite_linked(ml_sqlite_t *t); /* static builds: cli/static_libs.c */

#ifndef ML_SQLITE_DIRECT
#define sqlite3_bind_double ml_sqlite.sqlite3_bind_double
#define sqlite3_bind_int64 ml_sqlite.sqlite3_bind_int64
#define sqlite3_bind_null ml_sqlite.sqlite3_bind_null
#define sqlite3_bind_parameter_count ml_sqlite.sqlite3_bind_parameter_count
#define sqlite3_bind_parameter_name ml_sqlite.sqlite3_bind_parameter_name
#define sqlite3_bind_text64 ml_sqlite.sqlite3_bind_text64
#define sqlite3_busy_timeout ml_sqlite.sqlite3_busy_timeout
#define sqlite3_changes64 ml_sqlite.sqlite3_changes64
#define sqlite3_clear_bindings ml_sqlite.sqlite3_clear_bindings
#define sqlite3_close_v2 ml_sqlite.sqlite3_close_v2
#define sqlite3_column_blob ml_sqlite.sqlite3_column_blob
#define sqlite3_column_bytes ml_sqlite.sqlite3_column_bytes
#define sqlite3_column_count ml_sqlite.sqlite3_column_count
#define sqlite3_column_double ml_sqlite.sqlite3_column_double
#define sqlite3_column_int64 ml_sqlite.sqlite3_column_int64
#define sqlite3_column_name ml_sqlite.sqlite3_column_name
#define sqlite3_column_text ml_sqlite.sqlite3_column_text
#define sqlite3_column_type ml_sqlite.sqlite3_column_type
#define sqlite3_errmsg ml_sqlite.sqlite3_errmsg
#define sqlite3_errstr ml_sqlite.sqlite3_errstr
#define sqlite3_exec ml_sqlite.sqlite3_exec
#define sqlite3_extended_result_codes ml_sqlite.sqlite3_extended_result_codes
#define sqlite3_finalize ml_sqlite.sqlite3_finalize
#define sqlite3_last_insert_rowid ml_sqlite.sqlite3_last_insert_rowid
#define sqlite3_libversion ml_sqlite.sqlite3_libversion
#define sqlite3_open_v2 ml_sqlite.sqlite3_open_v2
#define sqlite3_prepare_v3 ml_sqlite.sqlite3_prepare_v3
#define sqlite3_progress_handler ml_sqlite.sqlite3_progress_handler
#define sqlite3_reset ml_sqlite.sqlite3_reset
#define sqlite3_step ml_sqlite.sqlite3_step
#endif

#endif
