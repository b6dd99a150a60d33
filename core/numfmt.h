/* core/numfmt.h: numbers into text without snprintf, for the response head. ml_numfmt_g14: a
 * number as Lua's tostring writes it ("%.14g", ties rounded away from zero, as LuaJIT does) without
 * a Lua string, for number-valued headers (X-Response-Time, counts): exact (integer arithmetic,
 * 128-bit), and limited to the numbers that arithmetic covers; the caller formats the others.
 */
#ifndef ML_NUMFMT_H
#define ML_NUMFMT_H

#include <stddef.h>
#include <stdint.h>

#define ML_NUMFMT_MAX 24 /* "-1.2345678901234e-100" and a NUL fit */

/* Writes n as "%.14g" into buf (ML_NUMFMT_MAX bytes) and returns its length; or returns 0 and
 * writes nothing for a number it does not cover: NaN, infinities, -0, magnitudes below 1e-14 or
 * above 1e14 that are not integers. */
size_t ml_numfmt_g14(double n, char *buf);
/* Writes v in decimal at p (at most 20 bytes, no NUL) and returns the end: the hot paths' snprintf
 * of an integer (status codes, Content-Length, chunk sizes). */
char *ml_numfmt_uint(char *p, uint64_t v);

#endif
