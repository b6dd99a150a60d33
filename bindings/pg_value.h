/* bindings/pg_value.h: a PostgreSQL value's text (libpq's text result format) turned into its Lua
 * value, for bindings/pg.c's results: scalars by type OID and the arrays of the element types it
 * decodes, as (nested) tables. Runs on the loop thread, on the stack of the task that gets the
 * rows.
 */
#ifndef MLUA_PG_VALUE_H
#define MLUA_PG_VALUE_H

#include <stddef.h>

#include <lua.h>

enum { B_NUMBER = 0, B_STRING, B_AUTO }; /* big_numbers: how int8 and numeric reach Lua */

/* Room to unescape an array element into: a userdata kept at stack slot `slot` (which holds nil
 * until the first element that needs it) and grown by replacing it, so that one result set takes
 * a few allocations however many elements it has; the garbage collector frees it, on an error too.
 */
typedef struct {
  int slot;
  char *buf;
  size_t cap;
} mlua_pg_scratch_t;

/* Pushes the value whose text is v[0..len) (NUL-terminated at v[len], as PQgetvalue's) of the type
 * with OID `type`: int2/4/8, oid, float4/8 and numeric as numbers (int8 and numeric as their text
 * when `big` says so), bool as a boolean, bytea as its raw bytes, the arrays of these and of the
 * text-like types (text, varchar, bpchar, name, "char", uuid, date, time, timestamp, interval) as
 * tables, everything else as its text. */
void mlua_pg_push_value(lua_State *L, const char *v, size_t len, unsigned type, int big,
                        mlua_pg_scratch_t *s);

#endif
