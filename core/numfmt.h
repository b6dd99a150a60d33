/* core/numfmt.h: a number as Lua's tostring writes it ("%.14g", ties rounded away from zero, as
 * LuaJIT does), without a Lua string: for number-valued response headers (X-Response-Time, counts),
 * formatted straight into the response head. Exact (integer arithmetic, 128-bit), and limited to
 * the numbers that arithmetic covers; the caller formats the others itself.
 */
#ifndef ML_NUMFMT_H
#define ML_NUMFMT_H

#include <stddef.h>

#define ML_NUMFMT_MAX 24 /* "-1.2345678901234e-100" and a NUL fit */

/* Writes n as "%.14g" into buf (ML_NUMFMT_MAX bytes) and returns its length; or returns 0 and
 * writes nothing for a number it does not cover: NaN, infinities, -0, magnitudes below 1e-14 or
 * above 1e14 that are not integers. */
size_t ml_numfmt_g14(double n, char *buf);

#endif
