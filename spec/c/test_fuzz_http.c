/* spec/c/test_fuzz_http.c: fuzzes the HTTP/1.1 server of the core (core/http_*.c) over a real
 * loopback socket (driver: spec/c/fuzz.h). No Lua.
 *
 * An input is the bytes a client sends on one connection. They go out in up to four pieces, cut at
 * places drawn from a hash of the input, with loop turns between them so that the server reads
 * them apart; then the client shuts its side and reads until the server closes. The server's
 * handler reads every request's whole body and answers 200 with the request-target, a newline and
 * the body. The same bytes are parsed on the side by a plain llhttp request parser (strict, as the
 * core's): the reference. What must hold for any input:
 * - the requests the server handled are the first requests of the reference, with the same method
 *   and target, in order (it may refuse more than llhttp alone: smuggling forms, limits);
 * - what comes back parses as HTTP/1.1 responses (llhttp, response mode): 100s, then 200s that each
 *   carry the target and body of their request, at most one error (400, 413, 414, 431, 501, 505)
 *   and nothing after it; an error's body is whole or, for HEAD, absent; without an error the
 *   server ends the connection with a FIN, never a reset;
 * - nothing is lost: when no error came back, every request the reference read whole got its 200,
 *   up to the first that did not keep the connection (Connection: close, HTTP/1.0); the valid seeds
 *   (all but the last two, which hit limits) are answered whole, with no error;
 * - the server closes the connection and holds none afterwards (no hang: every wait is bounded),
 *   leaks nothing and touches nothing out of bounds (SANITIZE=1); after the last input a clean
 *   request is still answered.
 * Limits are set low (URI 200 B, head 1500 B, 12 headers, body 1000 B) so that mutations reach
 * them.
 */
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <uv.h>

#include "../../core/http.h"
#include "fuzz.h"
#include "llhttp.h"

#define WAIT_MS 3000 /* only reached when the server hangs */
#define MAX_REQ 256  /* requests per input: more than FUZZ_MAX_INPUT bytes can hold */
#define MAX_TEXT 8192

#include "loop_wait.h"

typedef struct {
  char method[24], target[256];
  size_t method_len, target_len;
  char body[1024];
  size_t body_len;
  int complete, keep_alive, head;
} req_t;

static ml_server_t *srv;
static int port;

/* per input */
static req_t ref[MAX_REQ], got[MAX_REQ]; /* the reference's requests; the server's */
static int n_ref;       /* the reference's whole requests (the index of the one it reads) */
static int ref_in_body; /* the headers of the request it reads are complete */
static int n_got;
static int n_conns, n_closed; /* connections with state, and their on_close */
static int n_valid_seeds;     /* fuzz_seed below this: a valid request stream, answered whole */

/* -- The server ------------------------------------------------------------------------------ */

typedef struct {
  int index; /* in got[] (or MAX_REQ: not remembered) */
  char body[1024];
  size_t body_len;
  int too_long;
} conn_st_t;

static void copy_text(char *dst, size_t cap, size_t *dlen, const char *src, size_t n) {
  size_t k = *dlen + n > cap ? cap - *dlen : n;
  memcpy(dst + *dlen, src, k);
  *dlen += k;
}

static void read_body(ml_conn_t *c) {
  conn_st_t *st = ml_conn_data(c);
  const char *d;
  size_t n;
  int state = ml_conn_body_state(c, &d, &n);
  if (n) {
    if (st->body_len + n > sizeof st->body) st->too_long = 1;
    copy_text(st->body, sizeof st->body, &st->body_len, d, n);
    ml_conn_body_consume(c, n);
  }
  if (state == ML_BODY_MORE) return;
  if (state == ML_BODY_DONE) {
    static char out[MAX_TEXT];
    const ml_request_t *r = ml_conn_request(c);
    size_t len = 0;
    copy_text(out, sizeof out, &len, r->target, r->target_len);
    copy_text(out, sizeof out, &len, "\n", 1);
    copy_text(out, sizeof out, &len, st->body, st->body_len);
    FUZZ_CHECK(!st->too_long); /* the body limit (1000) holds */
    FUZZ_CHECK(ml_conn_respond(c, 200, NULL, 0, out, len) == 0);
  }
  ml_conn_finish(c); /* after an error the core answered or the client is gone */
}

static void on_request(ml_conn_t *c, void *ud) {
  (void)ud;
  conn_st_t *st = ml_conn_data(c);
  if (!st) {
    st = calloc(1, sizeof *st);
    ml_conn_set_data(c, st);
    n_conns++;
  }
  const ml_request_t *r = ml_conn_request(c);
  st->index = n_got < MAX_REQ ? n_got : MAX_REQ;
  st->body_len = 0;
  st->too_long = 0;
  if (n_got < MAX_REQ) {
    req_t *g = &got[n_got];
    memset(g, 0, sizeof *g);
    copy_text(g->method, sizeof g->method, &g->method_len, r->method, r->method_len);
    copy_text(g->target, sizeof g->target, &g->target_len, r->target, r->target_len);
    g->head = r->is_head;
  }
  n_got++;
  ml_conn_body_want(c);
  read_body(c);
}

static void on_body(ml_conn_t *c, void *ud) {
  (void)ud;
  if (ml_conn_data(c)) read_body(c);
}

static void on_writable(ml_conn_t *c, void *ud) {
  (void)c;
  (void)ud;
}

static void on_close(ml_conn_t *c, void *ud) {
  (void)ud;
  conn_st_t *st = ml_conn_data(c);
  if (st) {
    n_closed++;
    free(st);
    ml_conn_set_data(c, NULL);
  }
}

/* -- The reference parser -------------------------------------------------------------------- */

static req_t *ref_cur(void) { return n_ref < MAX_REQ ? &ref[n_ref] : NULL; }

static int ref_on_method(llhttp_t *p, const char *at, size_t n) {
  (void)p;
  req_t *r = ref_cur();
  if (r) copy_text(r->method, sizeof r->method, &r->method_len, at, n);
  return 0;
}

static int ref_on_url(llhttp_t *p, const char *at, size_t n) {
  (void)p;
  req_t *r = ref_cur();
  if (r) copy_text(r->target, sizeof r->target, &r->target_len, at, n);
  return 0;
}

static int ref_on_headers_complete(llhttp_t *p) {
  req_t *r = ref_cur();
  if (r) r->head = p->method == HTTP_HEAD;
  ref_in_body = 1;
  return 0;
}

static int ref_on_body(llhttp_t *p, const char *at, size_t n) {
  (void)p;
  req_t *r = ref_cur();
  if (r) copy_text(r->body, sizeof r->body, &r->body_len, at, n);
  return 0;
}

static int ref_on_message_complete(llhttp_t *p) {
  req_t *r = ref_cur();
  if (r) {
    r->complete = 1;
    r->keep_alive = llhttp_should_keep_alive(p);
  }
  n_ref++;
  ref_in_body = 0;
  return 0;
}

static int ref_on_message_begin(llhttp_t *p) {
  (void)p;
  req_t *r = ref_cur();
  if (r) memset(r, 0, sizeof *r);
  ref_in_body = 0;
  return 0;
}

static void reference_parse(const uint8_t *data, size_t len) {
  llhttp_settings_t st;
  llhttp_settings_init(&st);
  st.on_message_begin = ref_on_message_begin;
  st.on_method = ref_on_method;
  st.on_url = ref_on_url;
  st.on_headers_complete = ref_on_headers_complete;
  st.on_body = ref_on_body;
  st.on_message_complete = ref_on_message_complete;
  llhttp_t p;
  llhttp_init(&p, HTTP_REQUEST, &st);
  n_ref = ref_in_body = 0;
  memset(ref, 0, sizeof ref);
  const char *at = (const char *)data, *end = at + len;
  /* an Upgrade nobody takes: the server goes on as HTTP/1.1 (RFC 9110 7.8), except after CONNECT */
  while (llhttp_execute(&p, at, (size_t)(end - at)) == HPE_PAUSED_UPGRADE &&
         p.method != HTTP_CONNECT) {
    at = llhttp_get_error_pos(&p);
    llhttp_resume_after_upgrade(&p);
  }
}

/* -- The client ------------------------------------------------------------------------------ */

typedef struct {
  uv_tcp_t tcp;
  uv_connect_t creq;
  uv_shutdown_t sreq;
  char *buf;
  size_t len, cap;
  int connected, eof, read_status, closed;
} client_t;

static void client_closed(uv_handle_t *h) { ((client_t *)h->data)->closed = 1; }

static void client_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  client_t *cl = h->data;
  (void)suggested;
  if (cl->cap - cl->len < 16384) {
    cl->cap = cl->cap ? cl->cap * 2 : 65536;
    cl->buf = realloc(cl->buf, cl->cap);
  }
  *b = uv_buf_init(cl->buf + cl->len, (unsigned)(cl->cap - cl->len));
}

/* After the server's EOF the socket is closed with a reset (SO_LINGER 0): everything was read, and
 * no TIME_WAIT is left per input to use up the loopback ports. */
static void client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  client_t *cl = s->data;
  (void)b;
  if (n > 0) {
    cl->len += (size_t)n;
    return;
  }
  if (n == 0) return;
  cl->eof = 1;
  cl->read_status = (int)n;
  uv_os_fd_t fd;
  struct linger lg = {1, 0};
  if (uv_fileno((uv_handle_t *)&cl->tcp, &fd) == 0)
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  uv_close((uv_handle_t *)&cl->tcp, client_closed);
}

static void client_connected(uv_connect_t *req, int status) {
  client_t *cl = req->data;
  cl->connected = status < 0 ? status : 1;
  if (status < 0)
    uv_close((uv_handle_t *)&cl->tcp, client_closed);
  else
    uv_read_start((uv_stream_t *)&cl->tcp, client_alloc, client_read);
}

static void client_written(uv_write_t *req, int status) {
  (void)status; /* a server that refused the request closes before the rest is written */
  free(req);
}

static void client_send(client_t *cl, const uint8_t *data, size_t len) {
  if (cl->connected != 1 || uv_is_closing((uv_handle_t *)&cl->tcp) || len == 0) return;
  uv_write_t *req = malloc(sizeof *req + len);
  memcpy(req + 1, data, len);
  uv_buf_t b = uv_buf_init((char *)(req + 1), (unsigned)len);
  if (uv_write(req, (uv_stream_t *)&cl->tcp, &b, 1, client_written) < 0) free(req);
}

static void client_shut(uv_shutdown_t *req, int status) {
  (void)req;
  (void)status;
}

/* -- Waiting --------------------------------------------------------------------------------- */

static int cond_connected(void *a) { return ((client_t *)a)->connected != 0; }

static int cond_all_closed(void *a) {
  client_t *cl = a;
  return cl->closed && ml_server_conn_count(srv) == 0 && n_closed == n_conns;
}

/* -- Checking the responses ------------------------------------------------------------------ */

typedef struct {
  int status, n_final, n_ok, error_status, head;
  char body[MAX_TEXT];
  size_t body_len;
  const char *error_at; /* where the body of the error response starts */
} resp_check_t;

static int resp_on_headers_complete(llhttp_t *p) {
  resp_check_t *k = p->data;
  k->status = llhttp_get_status_code(p);
  k->body_len = 0;
  if (k->status < 200) return 0; /* llhttp reads no body after a 1xx */
  if (k->status != 200) {
    k->error_status = k->status;
    return HPE_PAUSED; /* checked by hand: its body or none, then the end */
  }
  k->head = k->n_final < MAX_REQ && k->n_final < n_got && got[k->n_final].head;
  return k->head ? 1 : 0;
}

static int resp_on_body(llhttp_t *p, const char *at, size_t n) {
  resp_check_t *k = p->data;
  copy_text(k->body, sizeof k->body, &k->body_len, at, n);
  return 0;
}

/* A 200 answers the request of its rank: its body is that request's target, "\n", its body. */
static int resp_on_message_complete(llhttp_t *p) {
  resp_check_t *k = p->data;
  if (k->status < 200) {
    FUZZ_CHECK(k->status == 100);
    return 0;
  }
  int i = k->n_final++;
  k->n_ok++;
  if (!FUZZ_CHECK(i < n_got) || i >= MAX_REQ) return 0;
  const req_t *r = &ref[i];
  if (got[i].head) {
    FUZZ_CHECK(k->body_len == 0);
    return 0;
  }
  size_t tl = r->target_len;
  FUZZ_CHECK(k->body_len == tl + 1 + r->body_len);
  FUZZ_CHECK(k->body_len >= tl + 1 && memcmp(k->body, r->target, tl) == 0 && k->body[tl] == '\n');
  if (k->body_len == tl + 1 + r->body_len)
    FUZZ_CHECK(memcmp(k->body + tl + 1, r->body, r->body_len) == 0);
  return 0;
}

static void check_responses(const client_t *cl) {
  llhttp_settings_t st;
  llhttp_settings_init(&st);
  st.on_headers_complete = resp_on_headers_complete;
  st.on_body = resp_on_body;
  st.on_message_complete = resp_on_message_complete;
  static resp_check_t k;
  memset(&k, 0, sizeof k);
  llhttp_t p;
  llhttp_init(&p, HTTP_RESPONSE, &st);
  p.data = &k;
  enum llhttp_errno e = cl->len ? llhttp_execute(&p, cl->buf, cl->len) : HPE_OK;
  int clean_eof = cl->read_status == UV_EOF;
  if (e == HPE_PAUSED) { /* an error response: its body, whole, or none (HEAD), and nothing after */
    const char *at = llhttp_get_error_pos(&p);
    size_t rest = (size_t)(cl->buf + cl->len - at);
    int s = k.error_status, head = k.n_final < n_ref + ref_in_body && ref[k.n_final].head;
    FUZZ_CHECK(fuzz_seed < 0 || fuzz_seed >= n_valid_seeds); /* a valid seed gets no error */
    if (!FUZZ_CHECK(s == 400 || s == 413 || s == 414 || s == 431 || s == 501 || s == 505))
      printf("    status %d\n", s);
    /* a body unless the request was a HEAD the server read whole; whether it did, the reference
     * cannot tell (a bare LF before it is refused first): for a HEAD either */
    if (clean_eof) FUZZ_CHECK(rest == p.content_length || (head && rest == 0));
    FUZZ_CHECK(k.n_final <= n_got);
  } else {
    if (!FUZZ_CHECK(e == HPE_OK))
      printf("    %s: %s at byte %ld of the responses\n", llhttp_errno_name(e),
             llhttp_get_error_reason(&p), (long)(llhttp_get_error_pos(&p) - cl->buf));
    FUZZ_CHECK(clean_eof); /* without an error the server closes only after our FIN: no reset */
    if (clean_eof) FUZZ_CHECK(llhttp_finish(&p) == HPE_OK); /* no response cut short */
  }
  /* nothing lost: without an error, every whole request up to the first that does not keep the
   * connection was answered (a valid seed: all of them) */
  if (fuzz_seed >= 0 && fuzz_seed < n_valid_seeds) FUZZ_CHECK(n_ref > 0 && n_got == n_ref);
  if (e == HPE_OK && clean_eof) {
    int want = 0;
    while (want < n_ref && want < MAX_REQ) {
      want++;
      if (!ref[want - 1].keep_alive) break;
    }
    FUZZ_CHECK(k.n_ok == want);
  }
}

/* -- One input ------------------------------------------------------------------------------- */

static uint32_t hash32(const uint8_t *d, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++)
    h = (h ^ d[i]) * 16777619u;
  return h;
}

static void fuzz_one(const uint8_t *data, size_t len) {
  reference_parse(data, len);
  n_got = n_conns = n_closed = 0;
  static client_t cl;
  memset(&cl, 0, sizeof cl);
  uv_tcp_init(&loop, &cl.tcp);
  cl.tcp.data = &cl;
  cl.creq.data = &cl;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  if (uv_tcp_connect(&cl.creq, &cl.tcp, (const struct sockaddr *)&addr, client_connected) < 0) {
    cl.connected = -1;
    uv_close((uv_handle_t *)&cl.tcp, client_closed);
  }
  run_until(cond_connected, &cl);
  FUZZ_CHECK(cl.connected == 1);
  /* up to four pieces, each sent in a turn of the loop of its own */
  uint32_t h = hash32(data, len);
  size_t off = 0;
  for (int piece = 0; piece < 4 && off < len; piece++) {
    size_t n =
        piece == 3 || len - off < 2 ? len - off : 1 + (h >> (piece * 8) & 0xff) % (len - off);
    client_send(&cl, data + off, n);
    off += n;
    for (int t = 0; t < 3; t++)
      uv_run(&loop, UV_RUN_NOWAIT);
  }
  if (cl.connected == 1 && !uv_is_closing((uv_handle_t *)&cl.tcp))
    uv_shutdown(&cl.sreq, (uv_stream_t *)&cl.tcp, client_shut);
  if (!FUZZ_CHECK(run_until(cond_all_closed, &cl))) { /* a hang: say where, then clean up */
    printf("    server holds %u connections; client closed %d, eof %d\n", ml_server_conn_count(srv),
           cl.closed, cl.eof);
    if (!uv_is_closing((uv_handle_t *)&cl.tcp)) uv_close((uv_handle_t *)&cl.tcp, client_closed);
    while (!cl.closed)
      uv_run(&loop, UV_RUN_ONCE);
  }
  /* the server's requests are the reference's first ones */
  FUZZ_CHECK(n_got <= n_ref + ref_in_body && n_got <= MAX_REQ);
  for (int i = 0; i < n_got && i < MAX_REQ; i++) {
    FUZZ_CHECK(got[i].method_len == ref[i].method_len &&
               memcmp(got[i].method, ref[i].method, got[i].method_len) == 0);
    FUZZ_CHECK(got[i].target_len == ref[i].target_len &&
               memcmp(got[i].target, ref[i].target, got[i].target_len) == 0);
  }
  check_responses(&cl);
  free(cl.buf);
}

/* -- Setup, seeds and the run ---------------------------------------------------------------- */

static void log_sink(void *ud, int level, const char *line) {
  (void)ud;
  (void)level;
  (void)line;
}

static void server_start(void) {
  static ml_log_t log;
  log.level = ML_LOG_ERROR;
  log.sink = log_sink;
  ml_http_limits_t lim;
  ml_http_limits_default(&lim);
  lim.max_uri = 200;
  lim.max_header_bytes = 1500;
  lim.max_headers = 12;
  lim.max_body = 1000;
  ml_http_callbacks_t cb = {on_request, on_body, on_writable, on_close, NULL};
  uv_loop_init(&loop);
  uv_timer_init(&loop, &deadline);
  srv = ml_server_new(&loop, &lim, &log, &cb, NULL);
  if (!srv || ml_server_listen(srv, "127.0.0.1", 0, 128) < 0) {
    printf("cannot start the server\n");
    exit(1);
  }
  port = ml_server_port(srv, 0);
  signal(SIGPIPE, SIG_IGN);
}

#ifdef ML_LIBFUZZER
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  server_start();
  return 0;
}
#else

#define HOST "Host: x\r\n"
#define N_LIMIT_SEEDS 2
static const fuzz_seed_t seeds[] = {
    {"GET / HTTP/1.1\r\n" HOST "\r\n", 0},
    {"GET /a?b=c%20d HTTP/1.1\r\n" HOST "User-Agent: fuzz\r\nAccept: */*\r\n\r\n"
     "HEAD /h HTTP/1.1\r\n" HOST "\r\n"
     "GET /last HTTP/1.1\r\n" HOST "Connection: close\r\n\r\n",
     0},
    {"POST /p HTTP/1.1\r\n" HOST "Content-Length: 5\r\n\r\nhello"
     "PUT /q HTTP/1.1\r\n" HOST "Content-Length: 3\r\n\r\nabc",
     0},
    {"POST /c HTTP/1.1\r\n" HOST "Transfer-Encoding: chunked\r\n\r\n"
     "5;ext=1\r\nhello\r\n3\r\n, w\r\n0\r\nTrailer: t\r\n\r\n"
     "GET /after HTTP/1.1\r\n" HOST "\r\n",
     0},
    {"POST /e HTTP/1.1\r\n" HOST "Expect: 100-continue\r\nContent-Length: 4\r\n\r\nbody", 0},
    {"GET /ten HTTP/1.0\r\n\r\nGET /not HTTP/1.0\r\n\r\n", 0},
    {"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /two HTTP/1.1\r\n" HOST "\r\n", 0},
    {"OPTIONS * HTTP/1.1\r\n" HOST "\r\nDELETE /d HTTP/1.1\r\n" HOST "Content-Length: 0\r\n\r\n",
     0},
    {"GET / HTTP/1.1\r\n" HOST "A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\nF: 6\r\nG: 7\r\nH: 8\r\n"
     "I: 9\r\nJ: 10\r\nK: 11\r\n\r\n",
     0},
    {"GET /up HTTP/1.1\r\n" HOST "Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
     "GET /after-upgrade HTTP/1.1\r\n" HOST "\r\n",
     0},
    /* the last N_LIMIT_SEEDS hit a limit or end early: an error is their answer */
    {"GET /"
     "0123456789012345678901234567890123456789012345678901234567890123456789"
     "0123456789012345678901234567890123456789012345678901234567890123456789"
     "01234567890123456789012345678901234567890123456789 HTTP/1.1\r\n" HOST "\r\n",
     0},
    {"POST /big HTTP/1.1\r\n" HOST "Content-Length: 999\r\n\r\n", 0},
};

static const char *const dict[] = {"\r\n",
                                   "\r\n\r\n",
                                   "HTTP/1.1",
                                   "HTTP/1.0",
                                   "Host: y\r\n",
                                   "Content-Length: ",
                                   "chunked",
                                   "Transfer-Encoding: ",
                                   "Connection: close\r\n",
                                   "Connection: keep-alive\r\n",
                                   "Expect: 100-continue\r\n",
                                   "0\r\n\r\n",
                                   "ffffffffffffffff",
                                   "\n",
                                   " \t",
                                   "%00",
                                   "%2e%2e/",
                                   "GET ",
                                   "HEAD ",
                                   "POST ",
                                   "99999999999999999999"};

int main(void) {
  ctest_section("HTTP server core, fuzzed over loopback");
  server_start();
  n_valid_seeds = (int)(sizeof seeds / sizeof seeds[0]) - N_LIMIT_SEEDS;
  fuzz_main("http", seeds, sizeof seeds / sizeof seeds[0], dict, sizeof dict / sizeof dict[0],
            3000);
  /* the server still serves */
  static const char ok[] = "GET /still HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  fuzz_one((const uint8_t *)ok, sizeof ok - 1);
  CHECK_INT(n_got, 1);
  CHECK_INT(fuzz_failed, 0);
  ml_server_close(srv, NULL, NULL);
  uv_close((uv_handle_t *)&deadline, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  ml_server_free(srv);
  CHECK_INT(uv_loop_close(&loop), 0);
  return ctest_end();
}
#endif
