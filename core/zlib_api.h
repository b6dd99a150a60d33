/* core/zlib_api.h: zlib, opened on first use (core/dynlib.h): core/ws.c calls ml_zlib_load() in
 * ml_ws_deflate_new, bindings/zlib.c when it makes a stream; every other call takes a stream made
 * there. zlib.h's own macros (deflateInit2, inflateInit2) expand to the _ names listed here.
 * ML_ZLIB_DIRECT before the include keeps the real names.
 */
#ifndef ML_ZLIB_API_H
#define ML_ZLIB_API_H

#include "dynlib.h"

#include <zlib.h>

#ifndef ML_ZLIB_SONAME
#define ML_ZLIB_SONAME "libz.so.1"
#endif

#define ML_ZLIB_FUNCS(X)                                                                           \
  X(deflate)                                                                                       \
  X(deflateEnd)                                                                                    \
  X(deflateInit2_)                                                                                 \
  X(deflateReset)                                                                                  \
  X(inflate)                                                                                       \
  X(inflateEnd)                                                                                    \
  X(inflateInit2_)                                                                                 \
  X(inflateReset)

typedef struct ml_zlib_s {
  ML_ZLIB_FUNCS(ML_DYNLIB_SLOT)
} ml_zlib_t;

extern ml_zlib_t ml_zlib; /* valid once ml_zlib_load() returned NULL */
/* NULL once zlib is usable, else why not ("zlib is not installed (libz.so.1)"). */
const char *ml_zlib_load(void);
int ml_zlib_linked(ml_zlib_t *t); /* static builds: cli/static_libs.c */

#ifndef ML_ZLIB_DIRECT
#define deflate ml_zlib.deflate
#define deflateEnd ml_zlib.deflateEnd
#define deflateInit2_ ml_zlib.deflateInit2_
#define deflateReset ml_zlib.deflateReset
#define inflate ml_zlib.inflate
#define inflateEnd ml_zlib.inflateEnd
#define inflateInit2_ ml_zlib.inflateInit2_
#define inflateReset ml_zlib.inflateReset
#endif

#endif
