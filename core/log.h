/* core/log.h: the per-instance logger. There is no global logger: every server and instance carries
 * an ml_log_t, whose sink a host may replace (moonlet_config_t.log_sink). The loop thread is the
 * only writer. The access log's lines are formatted by core/access_log.c and written through a
 * buffered output (core/log_out.h) unless a host's access_sink takes them.
 */
#ifndef ML_LOG_H
#define ML_LOG_H

#include <stdarg.h>
#include <stddef.h>

enum { ML_LOG_ERROR = 0, ML_LOG_WARN = 1, ML_LOG_INFO = 2, ML_LOG_DEBUG = 3 };

typedef void (*ml_log_sink_cb)(void *ud, int level, const char *line);

/* The access log's formats (`moonlet --access-log-format NAME`), a line each:
 * - moonlet: 127.0.0.1:40312 "GET /x HTTP/1.1" 200 13 "curl/8.0" 0.123ms
 * - combined, nginx's: 127.0.0.1 - - [28/Nov/2026:04:31:50 +0000] "GET /x HTTP/1.1" 200 13 "-" "ua"
 * - json: an object with nginx's names: time (ISO 8601), remote_addr, request (the line),
 *   request_method, request_uri,
 *   server_protocol, status, body_bytes_sent, request_time, http_referer, http_user_agent,
 *   request_id ("" when none).
 * moonlet adds " id=ID" when the request has an id (moonlet.request_id); combined is nginx's.
 * Text the client sent is escaped as nginx escapes it: in moonlet and combined `"`, `\` and bytes
 * below 0x20 or above 0x7E as \xHH; in json as JSON strings, a byte that is not UTF-8 as U+FFFD. */
enum { ML_ACCESS_MOONLET = 0, ML_ACCESS_COMBINED = 1, ML_ACCESS_JSON = 2 };

/* What an access-log line says of one request (strings are not NUL-terminated unless said). */
typedef struct ml_access_s {
  const char *peer;   /* "ip:port", "[ip6]:port" or "unix:", NUL-terminated */
  const char *method; /* NULL: refused before its request line was whole (see raw_line) */
  size_t method_len;
  const char *target;
  size_t target_len;
  int http_major, http_minor;
  int status;
  unsigned long long bytes; /* body bytes sent */
  const char *referer;      /* NULL: none */
  size_t referer_len;
  const char *ua; /* the User-Agent; NULL: none */
  size_t ua_len;
  double ms;              /* since the request began */
  const char *request_id; /* moonlet.request_id's, NUL-terminated; NULL: none */
  const char *raw_line;   /* method NULL: the request line's bytes as sent, up to its CR or LF */
  size_t raw_line_len;    /* (nginx's $request for a line it could not parse); NULL: none */
} ml_access_t;

struct ml_log_out_s;

typedef struct ml_log_s {
  int level;                       /* messages above this level are dropped */
  ml_log_sink_cb sink;             /* NULL: write to stderr */
  void *sink_ud;                   /* passed back to sink */
  int access;                      /* 1: the access log is on */
  ml_log_sink_cb access_sink;      /* NULL: access lines go to access_out */
  int access_format;               /* ML_ACCESS_* */
  struct ml_log_out_s *access_out; /* stdout or a file (owned by the instance); NULL: stdout,
                                      unbuffered */
} ml_log_t;

/* Formats one line and hands it to the sink (or stderr) with a timestamp and the level's name. */
void ml_log(const ml_log_t *log, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void ml_logv(const ml_log_t *log, int level, const char *fmt, va_list ap);
/* Whether a message of this level is written (so that one need not be made for nothing). */
static inline int ml_log_enabled(const ml_log_t *log, int level) {
  return !log || level <= log->level;
}
/* Writes one access-log line for a request when the access log is on (core/access_log.c). */
void ml_log_access(const ml_log_t *log, const ml_access_t *a);
int ml_log_access_format_parse(const char *name); /* ML_ACCESS_*, -1 when unknown */
/* The request line of a (nginx's $request, escaped as in the combined format) at buf, NUL-ended,
 * cut to cap bytes; returns its length (0: none). */
size_t ml_access_request_line(const ml_access_t *a, char *buf, size_t cap);
const char *ml_log_level_name(int level);
int ml_log_level_parse(const char *name); /* -1 when unknown */

#endif
