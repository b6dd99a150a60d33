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

/* Copies msg into dst (size > 0, NUL-terminated, cut to fit) so that it cannot forge a log line:
 * what a client sent reaches messages (a decoded path in a handler's error, a value a script
 * logs), and a CR, LF or an escape sequence in it could start a line that looks like the log's
 * own, or rewrite the terminal. So a control byte is written \xHH, as in the access log, and a
 * message's own line breaks (a traceback's) stay but the line after one starts with a tab:
 * an entry's first line alone starts with its timestamp. Bytes >= 0x80 pass (UTF-8 text). */
static void escape_into(char *dst, size_t size, const char *msg) {
  static const char hex[] = "0123456789ABCDEF";
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)msg; *p; p++) {
    unsigned char c = *p;
    size_t need = (c < 0x20 && c != '\t' && c != '\n') || c == 0x7f ? 4 : 1;
    int indent = c == '\n' && p[1] != '\t' && p[1] != '\0';
    if (o + need + (size_t)indent >= size) break;
    if (need == 4) {
      dst[o++] = '\\';
      dst[o++] = 'x';
      dst[o++] = hex[c >> 4];
      dst[o++] = hex[c & 15];
    } else {
      dst[o++] = (char)c;
      if (indent) dst[o++] = '\t';
    }
  }
  dst[o] = '\0';
}

void ml_logv(const ml_log_t *log, int level, const char *fmt, va_list ap) {
  if (log && level > log->level) return;
  char line[4096];
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  size_t n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%SZ ", &tm);
  n += (size_t)snprintf(line + n, sizeof line - n, "[%s] ", ml_log_level_name(level));
  if (n < sizeof line) {
    char msg[sizeof line];
    vsnprintf(msg, sizeof msg, fmt, ap);
    escape_into(line + n, sizeof line - n, msg);
  }
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
