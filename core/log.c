/* core/log.c: formatting for the per-instance logger (see log.h). Lines are built on the stack, so
 * logging allocates nothing; a line longer than the buffer is cut.
 */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static const char *const level_names[] = {"error", "warn", "info", "debug"};

const char *ml_log_level_name(int level) {
  return level >= 0 && level <= ML_LOG_DEBUG ? level_names[level] : "?";
}

int ml_log_level_parse(const char *name) {
  for (int i = 0; i <= ML_LOG_DEBUG; i++)
    if (strcasecmp(name, level_names[i]) == 0) return i;
  return -1;
}

void ml_logv(const ml_log_t *log, int level, const char *fmt, va_list ap) {
  if (log && level > log->level) return;
  char line[4096];
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  size_t n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%SZ ", &tm);
  n += (size_t)snprintf(line + n, sizeof line - n, "[%s] ", ml_log_level_name(level));
  if (n < sizeof line) vsnprintf(line + n, sizeof line - n, fmt, ap);
  if (log && log->sink) {
    log->sink(log->sink_ud, level, line);
  } else {
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
  }
}

void ml_log(const ml_log_t *log, int level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  ml_logv(log, level, fmt, ap);
  va_end(ap);
}
