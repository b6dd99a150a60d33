/* bindings/pg_value.h: a PostgreSQL value's text (libpq's text result format) turned into its Lua
 * value, for bindings/pg.c's results: scalars by type OID and the arrays of the element types it
 * decodes, as (nested) tables; json and jsonb (and their arrays) through a JSON decoder when the
 * connection asks for it. Runs on the loop thread, under mlua_push_protected on the main state.
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

/* How one result's values are decoded: set up once per result by bindings/pg.c's push_rows. */
typedef struct {
  int big;                   /* B_*: how int8 and numeric come */
  int json;                  /* stack slot of the JSON decoder (the T_JSON* columns), or 0 */
  mlua_pg_scratch_t scratch; /* where array elements are unescaped */
} mlua_pg_decode_t;

/* The type a column of type OID `type` is decoded as when its connection decodes JSON: json and
 * jsonb become T_JSON, json[] and jsonb[] T_JSON_ARRAY, pseudo OIDs no column has (pg_type's
 * built-in rows start at 16, bool; user types at 16384), the others stay themselves. The caller
 * maps each column's type once per result, so a connection that does not decode JSON pays no test
 * per value (one per array element): json and jsonb then come as their text, as any other type
 * without a decoder. */
enum { T_JSON = 1, T_JSON_ARRAY = 2 };
unsigned mlua_pg_json_type(unsigned type);

/* Pushes the value whose text is v[0..len) (NUL-terminated at v[len], as PQgetvalue's) of the type
 * with OID `type`: int2/4/8, oid, float4/8 and numeric as numbers (int8 and numeric as their text
 * when d->big says so), bool as a boolean, bytea as its raw bytes, the arrays of these and of the
 * text-like types (text, varchar, bpchar, name, "char", uuid, date, time, timestamp, interval) as
 * tables, everything else as its text. T_JSON (mlua_pg_json_type) is what the decoder at stack slot
 * d->json returns for the text (moonlet.json.decode: JSON null is moonlet.pg.null), T_JSON_ARRAY a
 * table of such values (a NULL element as moonlet.pg.null). A JSON text the decoder refuses
 * (nesting deeper than cjson's 1000 levels) raises "cannot decode json: " and the decoder's
 * message: push_rows' caller turns that into the query's nil, err. */
void mlua_pg_push_value(lua_State *L, const char *v, size_t len, unsigned type,
                        mlua_pg_decode_t *d);

#endif
