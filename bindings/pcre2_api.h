/* bindings/pcre2_api.h: PCRE2 (8-bit), opened on first use (core/dynlib.h): bindings/regex.c calls
 * ml_pcre2_load() before it compiles a pattern, the call every other one follows. The entry points
 * are the _8 names that pcre2.h's own macros (pcre2_compile, ...) expand to. ML_PCRE2_DIRECT before
 * the include keeps the real names.
 */
#ifndef MLUA_PCRE2_API_H
#define MLUA_PCRE2_API_H

#include "../core/dynlib.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#ifndef ML_PCRE2_SONAME
#define ML_PCRE2_SONAME "libpcre2-8.so.0"
#endif

#define ML_PCRE2_FUNCS(X)                                                                          \
  X(pcre2_code_free_8)                                                                             \
  X(pcre2_compile_8)                                                                               \
  X(pcre2_dfa_match_8)                                                                             \
  X(pcre2_get_error_message_8)                                                                     \
  X(pcre2_get_ovector_count_8)                                                                     \
  X(pcre2_get_ovector_pointer_8)                                                                   \
  X(pcre2_jit_compile_8)                                                                           \
  X(pcre2_jit_stack_assign_8)                                                                      \
  X(pcre2_jit_stack_create_8)                                                                      \
  X(pcre2_jit_stack_free_8)                                                                        \
  X(pcre2_match_8)                                                                                 \
  X(pcre2_match_context_create_8)                                                                  \
  X(pcre2_match_context_free_8)                                                                    \
  X(pcre2_match_data_create_from_pattern_8)                                                        \
  X(pcre2_match_data_free_8)                                                                       \
  X(pcre2_pattern_info_8)                                                                          \
  X(pcre2_substring_nametable_scan_8)

typedef struct ml_pcre2_s {
  ML_PCRE2_FUNCS(ML_DYNLIB_SLOT)
} ml_pcre2_t;

extern ml_pcre2_t ml_pcre2; /* valid once ml_pcre2_load() returned NULL */
/* NULL once PCRE2 is usable, else why not ("PCRE2 is not installed (libpcre2-8.so.0)"). */
const char *ml_pcre2_load(void);
int ml_pcre2_linked(ml_pcre2_t *t); /* static builds: cli/static_libs.c */

#ifndef ML_PCRE2_DIRECT
#define pcre2_code_free_8 ml_pcre2.pcre2_code_free_8
#define pcre2_compile_8 ml_pcre2.pcre2_compile_8
#define pcre2_dfa_match_8 ml_pcre2.pcre2_dfa_match_8
#define pcre2_get_error_message_8 ml_pcre2.pcre2_get_error_message_8
#define pcre2_get_ovector_count_8 ml_pcre2.pcre2_get_ovector_count_8
#define pcre2_get_ovector_pointer_8 ml_pcre2.pcre2_get_ovector_pointer_8
#define pcre2_jit_compile_8 ml_pcre2.pcre2_jit_compile_8
#define pcre2_jit_stack_assign_8 ml_pcre2.pcre2_jit_stack_assign_8
#define pcre2_jit_stack_create_8 ml_pcre2.pcre2_jit_stack_create_8
#define pcre2_jit_stack_free_8 ml_pcre2.pcre2_jit_stack_free_8
#define pcre2_match_8 ml_pcre2.pcre2_match_8
#define pcre2_match_context_create_8 ml_pcre2.pcre2_match_context_create_8
#define pcre2_match_context_free_8 ml_pcre2.pcre2_match_context_free_8
#define pcre2_match_data_create_from_pattern_8 ml_pcre2.pcre2_match_data_create_from_pattern_8
#define pcre2_match_data_free_8 ml_pcre2.pcre2_match_data_free_8
#define pcre2_pattern_info_8 ml_pcre2.pcre2_pattern_info_8
#define pcre2_substring_nametable_scan_8 ml_pcre2.pcre2_substring_nametable_scan_8
#endif

#endif
