/* core/log.h: the per-instance logger. There is no global logger: every server and instance carries
 * an ml_log_t, whose sink a host may replace (moonlet_config_t.log_sink). The loop thread is the
 * only writer.
 */
#ifndef ML_LOG_H
#define ML_LOG_H

#include <stdarg.h>

enum { ML_LOG_ERROR = 0, ML_LOG_WARN = 1, ML_LOG_INFO = 2, ML_LOG_DEBUG = 3 };

typedef void (*ml_log_sink_cb)(void *ud, int level, const char *line);

typedef struct ml_log_s {
  int level;                  /* messages above this level are dropped */
  ml_log_sink_cb sink;        /* NULL: write to stderr */
  void *sink_ud;              /* passed back to sink */
  int access;                 /* 1: the access log is on */
  ml_log_sink_cb access_sink; /* NULL: write access lines to stdout */
} ml_log_t;

/* Formats one line and hands it to the sink (or stderr) with a timestamp and the level's name. */
void ml_log(const ml_log_t *log, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void ml_logv(const ml_log_t *log, int level, const char *fmt, va_list ap);
/* Writes one access-log line (already formatted, no newline) when the access log is on. */
void ml_log_access(const ml_log_t *log, const char *line);
const char *ml_log_level_name(int level);
int ml_log_level_parse(const char *name); /* -1 when unknown */

#endif
