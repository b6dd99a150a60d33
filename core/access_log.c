/* core/access_log.c: one access-log line for a request, in the format the log asks for (the formats
 * and their escaping are described in log.h), handed to the host's access_sink or appended to the
 * buffered output (log_out.h). A line is built in place, bounded: what the client sent is cut (the
 * target at 512 bytes, the User-Agent and the Referer at 200) before it is escaped, so that a line
 * always fits ML_LOG_OUT_LINE.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "log_out.h"
#include "numfmt.h"

#define MAX_TARGET 512
#define MAX_HEADER 200

typedef struct {
  char *p, *end; /* end: one byte is kept for the newline */
} line_t;

static void put(line_t *w, const char *s, size_t n) {
  size_t room = (size_t)(w->end - w->p);
  if (n > room) n = room;
  memcpy(w->p, s, n);
  w->p += n;
}

static void put_str(line_t *w, const char *s) { put(w, s, strlen(s)); }

/* snprintf's count as the bytes it wrote into a buffer of size bytes */
static size_t clamp(int n, size_t size) {
  return n < 0 ? 0 : (size_t)n >= size ? size - 1 : (size_t)n;
}

static void put_uint(line_t *w, unsigned long long v) {
  char num[24];
  put(w, num, (size_t)(ml_numfmt_uint(num, v) - num));
}

static const char hex[] = "0123456789ABCDEF";

/* nginx's escape=default: `"`, `\` and bytes outside 0x20..0x7E as \xHH */
static void put_escaped(line_t *w, const char *s, size_t n, size_t max) {
  if (n > max) n = max;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x20 || c > 0x7E || c == '"' || c == '\\') {
      char e[4] = {'\\', 'x', hex[c >> 4], hex[c & 15]};
      put(w, e, 4);
    } else {
      put(w, (const char *)&c, 1);
    }
  }
}

/* The length of the UTF-8 sequence at s (n bytes left), or 0 when it is not one (RFC 3629: no
 * overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < len; i++)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return len;
}

/* a JSON string's contents: `"` and `\\` escaped, control bytes as \u00XX, UTF-8 kept, any other
 * byte as U+FFFD. At most max bytes of s, and at most 3 * max bytes written (what max bytes of
 * U+FFFD take; control bytes, 6 each, end it sooner), so that the longest fields of a line fit. */
static void put_json(line_t *w, const char *s, size_t n, size_t max) {
  if (n > max) n = max;
  const unsigned char *u = (const unsigned char *)s;
  size_t left = 3 * max;
  for (size_t i = 0; i < n;) {
    unsigned char c = u[i];
    const char *e = s + i;
    char esc[6];
    size_t len = 1, out;
    if (c == '"' || c == '\\') {
      esc[0] = '\\';
      esc[1] = (char)c;
      e = esc;
      out = 2;
    } else if (c < 0x20 || c == 0x7F) {
      memcpy(esc, "\\u00", 4);
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      e = esc;
      out = 6;
    } else if ((len = utf8_seq(u + i, n - i)) != 0) {
      out = len;
    } else {
      e = "\xEF\xBF\xBD";
      len = 1;
      out = 3;
    }
    if (out > left) break;
    put(w, e, out);
    left -= out;
    i += len;
  }
}

/* $remote_addr: the peer without its port ("[::1]:5000" -> "::1"); "unix:" as it is */
static void put_addr(line_t *w, const char *peer) {
  size_t n = strlen(peer);
  if (peer[0] == '[') {
    const char *end = strchr(peer, ']');
    if (end) {
      put(w, peer + 1, (size_t)(end - peer - 1));
      return;
    }
  } else if (strcmp(peer, "unix:") != 0) {
    const char *colon = strrchr(peer, ':');
    if (colon) n = (size_t)(colon - peer);
  }
  put(w, peer, n);
}

/* " HTTP/1.1" */
static void put_protocol(line_t *w, const ml_access_t *a) {
  char proto[16];
  int n = snprintf(proto, sizeof proto, " HTTP/%d.%d", a->http_major, a->http_minor);
  put(w, proto, clamp(n, sizeof proto));
}

static void put_request_line(line_t *w, const ml_access_t *a) {
  put_escaped(w, a->method, a->method_len, MAX_HEADER);
  put(w, " ", 1);
  put_escaped(w, a->target, a->target_len, MAX_TARGET);
  put_protocol(w, a);
}

/* "value" of a header in moonlet's and nginx's formats; "-" when it was not sent */
static void put_quoted_header(line_t *w, const char *v, size_t n) {
  put(w, "\"", 1);
  if (v)
    put_escaped(w, v, n, MAX_HEADER);
  else
    put(w, "-", 1);
  put(w, "\"", 1);
}

/* "GET /x HTTP/1.1" 200 13, then a space. A request refused before its request line was whole
 * shows the line's bytes as sent ("\x16\x03\x01..." for a TLS hello), or "-" when none came. */
static void put_request_status(line_t *w, const ml_access_t *a) {
  put(w, "\"", 1);
  if (a->method)
    put_request_line(w, a);
  else if (a->raw_line && a->raw_line_len)
    put_escaped(w, a->raw_line, a->raw_line_len, MAX_TARGET);
  else
    put(w, "-", 1);
  put(w, "\" ", 2);
  put_uint(w, (unsigned)a->status);
  put(w, " ", 1);
  put_uint(w, a->bytes);
  put(w, " ", 1);
}

size_t ml_access_request_line(const ml_access_t *a, char *buf, size_t cap) {
  if (cap == 0) return 0;
  line_t w = {buf, buf + cap - 1};
  if (a->method)
    put_request_line(&w, a);
  else if (a->raw_line)
    put_escaped(&w, a->raw_line, a->raw_line_len, MAX_TARGET);
  *w.p = 0;
  return (size_t)(w.p - buf);
}

static void format_moonlet(line_t *w, const ml_access_t *a) {
  put_str(w, a->peer);
  put(w, " ", 1);
  put_request_status(w, a);
  put_quoted_header(w, a->ua, a->ua_len);
  char ms[40];
  int n = snprintf(ms, sizeof ms, " %.3fms", a->method ? a->ms : 0.0);
  put(w, ms, clamp(n, sizeof ms));
  if (a->request_id) {
    put(w, " id=", 4);
    put_escaped(w, a->request_id, strlen(a->request_id), MAX_HEADER);
  }
}

static void format_combined(line_t *w, const ml_access_t *a, const ml_log_stamp_t *st) {
  put_addr(w, a->peer);
  put(w, " - - [", 6);
  put_str(w, st->local);
  put(w, "] ", 2);
  put_request_status(w, a);
  put_quoted_header(w, a->referer, a->referer_len);
  put(w, " ", 1);
  put_quoted_header(w, a->ua, a->ua_len);
}

static void json_field(line_t *w, const char *name, const char *v, size_t n, size_t max) {
  put_str(w, name);
  put(w, "\"", 1);
  if (v) put_json(w, v, n, max);
  put(w, "\"", 1);
}

static void format_json(line_t *w, const ml_access_t *a, const ml_log_stamp_t *st) {
  put(w, "{\"time\":\"", 9);
  put_str(w, st->iso);
  put(w, "\",\"remote_addr\":\"", 17);
  put_addr(w, a->peer);            /* an address or "unix:": nothing to escape */
  put(w, "\",\"request\":\"", 13); /* nginx's $request: the whole line */
  if (a->method) {
    put_json(w, a->method, a->method_len, MAX_HEADER);
    put(w, " ", 1);
    put_json(w, a->target, a->target_len, MAX_TARGET);
    put_protocol(w, a);
  } else if (a->raw_line) {
    put_json(w, a->raw_line, a->raw_line_len, MAX_TARGET);
  }
  put(w, "\"", 1);
  json_field(w, ",\"request_method\":", a->method, a->method_len, MAX_HEADER);
  json_field(w, ",\"request_uri\":", a->target, a->method ? a->target_len : 0, MAX_TARGET);
  char num[64];
  int n = a->method ? snprintf(num, sizeof num, ",\"server_protocol\":\"HTTP/%d.%d\"",
                               a->http_major, a->http_minor)
                    : snprintf(num, sizeof num, ",\"server_protocol\":\"\"");
  put(w, num, clamp(n, sizeof num));
  put_str(w, ",\"status\":");
  put_uint(w, (unsigned)a->status);
  put_str(w, ",\"body_bytes_sent\":");
  put_uint(w, a->bytes);
  n = snprintf(num, sizeof num, ",\"request_time\":%.3f", a->method ? a->ms / 1000 : 0.0);
  put(w, num, clamp(n, sizeof num));
  json_field(w, ",\"http_referer\":", a->referer, a->referer_len, MAX_HEADER);
  json_field(w, ",\"http_user_agent\":", a->ua, a->ua_len, MAX_HEADER);
  json_field(w, ",\"request_id\":", a->request_id, a->request_id ? strlen(a->request_id) : 0,
             MAX_HEADER);
  put(w, "}", 1);
}

/* Formats the line at buf (ML_LOG_OUT_LINE bytes, the newline's included) and returns its length,
 * without the newline. */
static size_t format(const ml_log_t *log, const ml_access_t *a, ml_log_stamp_t *st, char *buf) {
  line_t w = {buf, buf + ML_LOG_OUT_LINE - 1};
  switch (log->access_format) {
  case ML_ACCESS_COMBINED:
    ml_log_stamp(st);
    format_combined(&w, a, st);
    break;
  case ML_ACCESS_JSON:
    ml_log_stamp(st);
    format_json(&w, a, st);
    break;
  default: format_moonlet(&w, a); break;
  }
  return (size_t)(w.p - buf);
}

void ml_log_access(const ml_log_t *log, const ml_access_t *a) {
  if (!log || !log->access) return;
  ml_log_out_t *out = log->access_out;
  if (out && !log->access_sink) { /* the common case: into the output's buffer, in place */
    char *tail = ml_log_out_tail(out);
    size_t n = format(log, a, &out->stamp, tail);
    tail[n] = '\n';
    ml_log_out_commit(out, n + 1);
    return;
  }
  char line[ML_LOG_OUT_LINE];
  ml_log_stamp_t st = {0};
  size_t n = format(log, a, &st, line);
  if (log->access_sink) {
    line[n] = 0;
    log->access_sink(log->sink_ud, ML_LOG_INFO, line);
  } else {
    line[n] = '\n';
    ml_log_write_all(1, line, n + 1);
  }
}

int ml_log_access_format_parse(const char *name) {
  static const char *const names[] = {"moonlet", "combined", "json"};
  for (int i = 0; i < 3; i++)
    if (strcasecmp(name, names[i]) == 0) return i;
  return -1;
}
