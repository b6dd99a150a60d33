/* spec/c/test_access_log.c: core/access_log.c's three formats, field by field, through a sink that
 * keeps the last line: the escaping of what a client sends (nginx's \xHH in moonlet and combined;
 * JSON's escapes, UTF-8 kept and every malformed sequence of RFC 3629's table (overlong forms,
 * surrogates, beyond U+10FFFF, cut short) made U+FFFD), the peer's address without its port, a
 * request refused before its request line, and the bounds that keep a line within ML_LOG_OUT_LINE.
 * Then core/log_out.c's buffered file: lines in order across many flushes of a full buffer,
 * nothing written before a flush, and a reopen after the file was moved.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../core/log.h"
#include "../../core/log_out.h"
#include "ctest.h"

static char last[ML_LOG_OUT_LINE + 1];
static int lines;

static void keep_line(void *ud, int level, const char *line) {
  (void)ud;
  (void)level;
  snprintf(last, sizeof last, "%s", line);
  lines++;
}

static const char *format(int fmt, const ml_access_t *a) {
  ml_log_t log = {
      .level = ML_LOG_INFO, .access = 1, .access_sink = keep_line, .access_format = fmt};
  last[0] = 0;
  ml_log_access(&log, a);
  return last;
}

static ml_access_t request(const char *ua) {
  ml_access_t a = {.peer = "127.0.0.1:40312",
                   .method = "GET",
                   .method_len = 3,
                   .target = "/x?y=1",
                   .target_len = 6,
                   .http_major = 1,
                   .http_minor = 1,
                   .status = 200,
                   .bytes = 13,
                   .ms = 1.5};
  if (ua) {
    a.ua = ua;
    a.ua_len = strlen(ua);
  }
  return a;
}

/* the JSON line's http_user_agent for a User-Agent of ua */
static const char *json_ua(const char *ua) {
  ml_access_t a = request(ua);
  const char *line = format(ML_ACCESS_JSON, &a);
  static char v[1024];
  const char *p = strstr(line, "\"http_user_agent\":\"");
  const char *end = strstr(line, "\",\"request_id\":");
  v[0] = 0;
  if (!p || !end) return v;
  p += strlen("\"http_user_agent\":\"");
  snprintf(v, sizeof v, "%.*s", (int)(end - p), p);
  return v;
}

static void test_moonlet(void) {
  ctest_section("moonlet format");
  ml_access_t a = request("curl/8.0");
  CHECK_STR(format(ML_ACCESS_MOONLET, &a),
            "127.0.0.1:40312 \"GET /x?y=1 HTTP/1.1\" 200 13 \"curl/8.0\" 1.500ms");
  a = request(NULL);
  a.http_minor = 0;
  CHECK_STR(format(ML_ACCESS_MOONLET, &a),
            "127.0.0.1:40312 \"GET /x?y=1 HTTP/1.0\" 200 13 \"-\" 1.500ms");
  a = request("a \"b\" \\ \x01\x7f\xc3\xa9");
  CHECK_STR(
      format(ML_ACCESS_MOONLET, &a),
      "127.0.0.1:40312 \"GET /x?y=1 HTTP/1.1\" 200 13 \"a \\x22b\\x22 \\x5C \\x01\\x7F\\xC3\\xA9\" "
      "1.500ms");
  ml_access_t refused = {.peer = "127.0.0.1:1", .status = 400};
  CHECK_STR(format(ML_ACCESS_MOONLET, &refused), "127.0.0.1:1 \"-\" 400 0 \"-\" 0.000ms");
}

static void test_combined(void) {
  ctest_section("combined format");
  ml_access_t a = request("curl/8.0");
  a.referer = "http://r/";
  a.referer_len = 9;
  const char *line = format(ML_ACCESS_COMBINED, &a);
  CHECK(strncmp(line, "127.0.0.1 - - [", 15) == 0);
  /* [28/Nov/2026:04:31:50 +0000]: 26 characters between the brackets */
  const char *close = strchr(line, ']');
  CHECK(close && close - line - 15 == 26);
  CHECK_HAS(line, "] \"GET /x?y=1 HTTP/1.1\" 200 13 \"http://r/\" \"curl/8.0\"");
  CHECK(line[strlen(line) - 1] == '"');
  a.peer = "[::1]:5000";
  CHECK(strncmp(format(ML_ACCESS_COMBINED, &a), "::1 - - [", 9) == 0);
  a.peer = "unix:";
  CHECK(strncmp(format(ML_ACCESS_COMBINED, &a), "unix: - - [", 11) == 0);
  ml_access_t refused = {.peer = "10.0.0.2:9", .status = 400};
  CHECK_HAS(format(ML_ACCESS_COMBINED, &refused), "] \"-\" 400 0 \"-\" \"-\"");
  /* a line the parser refused: its bytes as sent, escaped, cut at 512 */
  refused.raw_line = "\x16\x03\x01 \"x\"";
  refused.raw_line_len = 7;
  CHECK_HAS(format(ML_ACCESS_COMBINED, &refused), "] \"\\x16\\x03\\x01 \\x22x\\x22\" 400 0 ");
  CHECK_STR(format(ML_ACCESS_MOONLET, &refused),
            "10.0.0.2:9 \"\\x16\\x03\\x01 \\x22x\\x22\" 400 0 \"-\" 0.000ms");
  CHECK_HAS(format(ML_ACCESS_JSON, &refused),
            "\"request\":\"\\u0016\\u0003\\u0001 \\\"x\\\"\",\"request_method\":\"\",");
  static char long_line[1000];
  memset(long_line, 'a', sizeof long_line);
  refused.raw_line = long_line;
  refused.raw_line_len = sizeof long_line;
  const char *cut = strstr(format(ML_ACCESS_COMBINED, &refused), "\"a");
  CHECK(cut && strspn(cut + 1, "a") == 512 && strncmp(cut + 513, "\" 400 ", 6) == 0);
}

static void test_json(void) {
  ctest_section("json format");
  ml_access_t a = request("curl/8.0");
  a.ms = 2.25;
  const char *line = format(ML_ACCESS_JSON, &a);
  CHECK(strncmp(line, "{\"time\":\"", 9) == 0);
  CHECK_HAS(
      line,
      "\",\"remote_addr\":\"127.0.0.1\",\"request\":\"GET /x?y=1 HTTP/1.1\","
      "\"request_method\":\"GET\",\"request_uri\":\"/x?y=1\","
      "\"server_protocol\":\"HTTP/1.1\",\"status\":200,\"body_bytes_sent\":13,"
      "\"request_time\":0.002,\"http_referer\":\"\",\"http_user_agent\":\"curl/8.0\","
      "\"request_id\":\"\"}");
  a.request_id = "r\"1";
  CHECK_HAS(format(ML_ACCESS_JSON, &a), ",\"request_id\":\"r\\\"1\"}");
  CHECK_STR(format(ML_ACCESS_MOONLET, &a),
            "127.0.0.1:40312 \"GET /x?y=1 HTTP/1.1\" 200 13 \"curl/8.0\" 2.250ms id=r\\x221");
  CHECK_STR(json_ua("q\"b\\s\n\t\x01\x7f"), "q\\\"b\\\\s\\u000A\\u0009\\u0001\\u007F");
  /* UTF-8 is kept, from 2 to 4 bytes, up to U+10FFFF */
  CHECK_STR(json_ua("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf"),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf");
  /* the rest is U+FFFD, a byte at a time */
  CHECK_STR(json_ua("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");                 /* overlong '/' */
  CHECK_STR(json_ua("\xe0\x80\xaf"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"); /* overlong */
  CHECK_STR(json_ua("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"); /* a surrogate */
  CHECK_STR(json_ua("\xf4\x90\x80\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  CHECK_STR(json_ua("\xf5\x80"), "\xef\xbf\xbd\xef\xbf\xbd");
  CHECK_STR(json_ua("a\xe2\x82"), "a\xef\xbf\xbd\xef\xbf\xbd"); /* cut short at the end */
  CHECK_STR(json_ua("\xff"), "\xef\xbf\xbd");
  ml_access_t refused = {.peer = "[2001:db8::1]:443", .status = 408};
  line = format(ML_ACCESS_JSON, &refused);
  CHECK_HAS(line,
            "\"remote_addr\":\"2001:db8::1\",\"request\":\"\",\"request_method\":\"\","
            "\"request_uri\":\"\","
            "\"server_protocol\":\"\",\"status\":408,\"body_bytes_sent\":0,\"request_time\":0.000");
}

static void test_bounds(void) {
  ctest_section("bounds");
  { /* the worst case of every JSON field at once: control bytes everywhere, 6 bytes each */
    static char ctl[20000];
    memset(ctl, 1, sizeof ctl - 1);
    ml_access_t w = request(ctl);
    w.method = w.target = w.referer = w.request_id = ctl;
    w.method_len = w.target_len = w.referer_len = strlen(ctl);
    const char *line = format(ML_ACCESS_JSON, &w);
    CHECK(strlen(line) < ML_LOG_OUT_LINE - 1 && line[strlen(line) - 1] == '}');
  }
  static char target[20000], ua[20000];
  memset(target, '"', sizeof target - 1); /* each byte escapes to 4 or 2 */
  memset(ua, 1, sizeof ua - 1);           /* \u0001: 6 each */
  ml_access_t a = request(ua);
  a.target = target;
  a.target_len = strlen(target);
  a.referer = ua;
  a.referer_len = strlen(ua);
  for (int fmt = 0; fmt < 3; fmt++) {
    const char *line = format(fmt, &a);
    CHECK(strlen(line) < ML_LOG_OUT_LINE);
    CHECK(line[strlen(line) - 1] == (fmt == ML_ACCESS_JSON       ? '}'
                                     : fmt == ML_ACCESS_COMBINED ? '"'
                                                                 : 's'));
  }
  /* the same longest lines into a buffered file, so that they land next to the buffer's end too */
  char dir[] = "/tmp/ml-bounds-XXXXXX", path[64];
  ml_log_out_t *out = NULL;
  if (CHECK(mkdtemp(dir) != NULL)) {
    snprintf(path, sizeof path, "%s/b.log", dir);
    if (CHECK_INT(ml_log_out_open(&out, path), 0)) {
      ml_log_t log = {.access = 1, .access_out = out, .access_format = ML_ACCESS_JSON};
      for (int i = 0; i < 40; i++) /* ~250 KB: the 32 KiB buffer fills at every offset it can */
        ml_log_access(&log, &a);
      ml_log_out_free(out);
      FILE *f = fopen(path, "rb");
      static char line[2 * ML_LOG_OUT_LINE];
      int n = 0, whole = 1;
      while (f && fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        n++;
        if (len >= ML_LOG_OUT_LINE || len < 2 || line[len - 1] != '\n' || line[len - 2] != '}')
          whole = 0;
      }
      if (f) fclose(f);
      CHECK_INT(n, 40);
      CHECK(whole);
      unlink(path);
    }
    rmdir(dir);
  }
  CHECK_INT(ml_log_access_format_parse("JSON"), ML_ACCESS_JSON);
  CHECK_INT(ml_log_access_format_parse("combined"), ML_ACCESS_COMBINED);
  CHECK_INT(ml_log_access_format_parse("moonlet"), ML_ACCESS_MOONLET);
  CHECK_INT(ml_log_access_format_parse("common"), -1);
  ml_log_t off = {.access = 0, .access_sink = keep_line};
  lines = 0;
  ml_log_access(&off, &a);
  CHECK_INT(lines, 0);
}

static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  static char buf[1 << 20];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = 0;
  fclose(f);
  return buf;
}

static void test_file(void) {
  ctest_section("buffered file");
  char dir[] = "/tmp/ml-access-XXXXXX";
  if (!CHECK(mkdtemp(dir) != NULL)) return;
  char path[128], moved[128];
  snprintf(path, sizeof path, "%s/a.log", dir);
  snprintf(moved, sizeof moved, "%s/a.log.1", dir);
  ml_log_out_t *out = NULL;
  if (!CHECK_INT(ml_log_out_open(&out, path), 0)) return;
  ml_log_t log = {.access = 1, .access_out = out, .access_format = ML_ACCESS_MOONLET};
  char target[32] = "/x?y=1";
  ml_access_t a = request("t");
  a.target = target;
  ml_log_access(&log, &a);
  CHECK_STR(slurp(path), "");      /* buffered until a flush */
  for (int i = 1; i < 3000; i++) { /* ~190 KB: the buffer fills and is written many times */
    a.target_len = (size_t)snprintf(target, sizeof target, "/%d", i);
    ml_log_access(&log, &a);
  }
  ml_log_out_flush(out);
  char *text = slurp(path);
  int n = 0, in_order = 1;
  for (char *p = text; p && *p; n++) {
    char want[64];
    snprintf(want, sizeof want, "\"GET /%s HTTP/1.1\"", n == 0 ? "x?y=1" : "");
    if (n > 0) snprintf(want, sizeof want, "\"GET /%d HTTP/1.1\"", n);
    char *nl = strchr(p, '\n');
    if (!nl) break;
    *nl = 0;
    if (!strstr(p, want)) in_order = 0;
    p = nl + 1;
  }
  CHECK_INT(n, 3000);
  CHECK(in_order);
  /* logrotate: moved, then reopened; buffered lines go to the old file */
  CHECK_INT(rename(path, moved), 0);
  a.target_len = (size_t)snprintf(target, sizeof target, "/before");
  ml_log_access(&log, &a);
  CHECK_INT(ml_log_out_reopen(out), 0);
  a.target_len = (size_t)snprintf(target, sizeof target, "/after");
  ml_log_access(&log, &a);
  ml_log_out_free(out); /* flushes */
  CHECK_HAS(slurp(moved), "/before HTTP");
  CHECK_LACKS(slurp(moved), "/after HTTP");
  text = slurp(path);
  CHECK_HAS(text, "/after HTTP");
  CHECK_LACKS(text, "/before HTTP");
  /* a path that cannot be opened */
  char bad[160];
  snprintf(bad, sizeof bad, "%s/no/such/dir/x.log", dir);
  out = NULL;
  CHECK(ml_log_out_open(&out, bad) < 0);
  CHECK(out == NULL);
  unlink(path);
  unlink(moved);
  rmdir(dir);
}

int main(void) {
  test_moonlet();
  test_combined();
  test_json();
  test_bounds();
  test_file();
  return ctest_end();
}
