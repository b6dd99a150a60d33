/* spec/c/test_libs_missing.c: what moonlet does on a machine without the shared libraries it opens
 * on first use (core/dynlib.h): OpenSSL, SQLite, PCRE2, zlib, libpq. The Makefile builds this test
 * with its own copies of their loaders, whose sonames name no library, linked before libmoonlet.a,
 * so each first use fails as it would there: a TLS context, a WebSocket key, a digest, a database,
 * a regex, a zlib stream and a PostgreSQL connection each report it, permessage-deflate is not
 * agreed, and nothing else breaks (an instance still starts and runs Lua). */
#include "../../bindings/pcre2_api.h"
#include "../../bindings/pq_api.h"
#include "../../bindings/sqlite_api.h"
#include "../../core/moonlet.h"
#include "../../core/openssl_api.h"
#include "../../core/tls.h"
#include "../../core/ws.h"
#include "../../core/zlib_api.h"
#include "ctest.h"

#include <string.h>
#include <uv.h>

#define MISSING "OpenSSL is not installed (" ML_OPENSSL_SONAME ")"
#define NO_SQLITE "SQLite is not installed (" ML_SQLITE_SONAME ")"
#define NO_PCRE2 "PCRE2 is not installed (" ML_PCRE2_SONAME ")"
#define NO_ZLIB "zlib is not installed (" ML_ZLIB_SONAME ")"
#define NO_PQ "libpq is not installed (" ML_PQ_SONAME ")"

static char log_text[4096];
static size_t log_len;

static void log_sink(void *ud, int level, const char *line) {
  (void)ud;
  (void)level;
  int n = snprintf(log_text + log_len, sizeof log_text - log_len, "%s\n", line);
  if (n > 0 && log_len + (size_t)n < sizeof log_text) log_len += (size_t)n;
}

static void test_core(void) {
  ctest_section("core: a TLS context and the WebSocket keys report the missing library");
  CHECK_STR(ml_openssl_load(), MISSING);
  CHECK_STR(ml_openssl_load(), MISSING); /* the same answer every time, without a second dlopen */
  ml_tls_ctx_t *ctx = (ml_tls_ctx_t *)1;
  const char *err = NULL;
  ml_tls_ctx_opts_t o = {.verify = 1};
  CHECK_INT(ml_tls_ctx_new(&ctx, &o, &err), UV_ENOSYS);
  CHECK(ctx == NULL);
  CHECK_STR(err, MISSING);
  uint8_t mask[4];
  CHECK_INT(ml_ws_random(mask, sizeof mask), UV_ENOSYS);
  char key[25];
  CHECK(ml_ws_make_key(key) < 0);
  char accept[29] = "x";
  ml_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, accept);
  CHECK_STR(accept, "");
  ml_ws_pmd_t agreed = {.server_max_window_bits = 15, .client_max_window_bits = 15};
  CHECK(ml_ws_deflate_new(&agreed, 1) == NULL); /* the connection goes on uncompressed */
  CHECK_STR(ml_zlib_load(), NO_ZLIB);
}

/* The chunk raises (and moonlet_load_string fails) unless every check in it holds. */
static const char LUA_CHECKS[] =
    "local moonlet = require 'moonlet'\n"
    "local ok, err = pcall(moonlet.crypto.digest, 'sha256', 'x')\n"
    "assert(not ok and err:find('" MISSING "', 1, true), tostring(err))\n"
    "ok, err = pcall(moonlet.crypto.random, 16)\n"
    "assert(not ok and err:find('" MISSING "', 1, true), tostring(err))\n"
    "ok, err = pcall(require, 'moonlet.sqlite')\n"
    "assert(not ok and err:find('" NO_SQLITE "', 1, true), tostring(err))\n"
    "require 'moonlet.ngx'\n"
    "ok, err = pcall(ngx.re.match, 'abc', 'b')\n"
    "assert(not ok and err:find('" NO_PCRE2 "', 1, true), tostring(err))\n"
    "ok, err = pcall(require('moonlet.zlib').gzip, 'abc')\n"
    "assert(not ok and err:find('" NO_ZLIB "', 1, true), tostring(err))\n"
    "local pool = require('moonlet.pg').pool({ url = 'host=/nowhere' })\n"
    "local pg_ok, pg_err = pcall(pool.query, pool, 'select 1')\n"
    "assert(not pg_ok and tostring(pg_err):find('" NO_PQ "', 1, true), tostring(pg_err))\n"
    "assert(moonlet.crypto.base64_encode('hi') == 'aGk=')\n" /* no OpenSSL needed */
    "assert(moonlet.json.encode({ 1 }) == '[1]')\n";

static void test_lua(void) {
  ctest_section(
      "Lua: moonlet.crypto, moonlet.sqlite, ngx.re, moonlet.zlib and moonlet.pg raise the reason");
  moonlet_config_t cfg;
  moonlet_config_default(&cfg);
  cfg.log_sink = log_sink;
  moonlet_t *m = moonlet_new(&cfg);
  if (!CHECK(m != NULL)) return;
  CHECK_INT(moonlet_load_string(m, "checks", LUA_CHECKS), 1); /* 1: ran, returned no app */
  CHECK_LACKS(log_text, "checks:");
  CHECK_STR(ml_sqlite_load(), NO_SQLITE);
  CHECK_STR(ml_pcre2_load(), NO_PCRE2);
  CHECK_STR(ml_pq_load(), NO_PQ);
  moonlet_free(m);
}

int main(void) {
  test_core();
  test_lua();
  return ctest_end();
}
