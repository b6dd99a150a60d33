/* spec/c/test_http_core.c: the C tests of the core HTTP server (core/http_*.c), with no Lua at all.
 * One uv loop runs both sides: servers made with ml_server_new() whose C callbacks answer with
 * ml_conn_respond or ml_conn_stream_*, and a small libuv TCP client that sends raw bytes over
 * loopback and splits what comes back into responses.
 *
 * How the tests wait: run_until() turns the loop until a condition holds or its deadline timer
 * fires, so every wait is bounded and nothing sleeps to synchronise. Each test closes the clients
 * it opened and waits until the server holds no connection. Every server callback is counted, and
 * the counts are asserted; at the end every server is closed and freed and uv_loop_close() must
 * return 0 (no handle left), so a leak or a forgotten handle fails the run (LeakSanitizer in
 * SANITIZE=1).
 *
 * The test reaches into core/http_internal.h for one thing only: the llhttp parser of a connection,
 * to assert that no lenient flag is ever set.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "../../core/http.h"
#include "../../core/http_internal.h"
#include "ctest.h"

#define WAIT_MS 5000         /* the deadline of one wait; only reached when a test fails */
#define MAX_RESP 8           /* responses a client keeps */
#define BIG_TOTAL (4u << 20) /* /big streams at least this much */
#define BIG_MAX (256u << 20) /* and at most this much */
#define BIG_PIECE (64u << 10)
#define BIG_PUSHBACKS 3 /* and until the socket pushed back this many times */

#include "loop_wait.h"

typedef struct {
  const int *var;
  int value;
} at_least_t;

static int cond_at_least(void *a) {
  at_least_t *w = a;
  return *w->var >= w->value;
}

/* Runs the loop until *var >= value; returns 1 when it got there in time. */
static int wait_count(const int *var, int value) {
  at_least_t w = {var, value};
  return run_until(cond_at_least, &w);
}

/* -- Server side ------------------------------------------------------------------------------- */

typedef struct srv_ctx_s {
  ml_server_t *s;
  int port;
  ml_log_t log;
  char last_log[512]; /* the last line the server logged */
  int n_log;
  /* callback counts */
  int n_request, n_body, n_writable, n_close, n_done, n_hangup;
  int n_body_error;      /* the handler saw ML_BODY_ERROR */
  int n_api_error;       /* an ml_conn_* call failed where it should not */
  int n_conn_data;       /* connections given a conn_st_t (each must see exactly one on_close) */
  unsigned lenient;      /* the OR of parser.lenient_flags over every request */
  int n_trailer_merged;  /* a request's headers changed while its body was read */
  uv_timer_t slow_timer; /* answers /slow 100 ms later */
  ml_conn_t *slow_conn;
  int slow_closed;
  size_t slow_queued; /* /slow: ml_conn_write_queue right after its response */
  size_t feed_queued; /* the default route: the same, answered inside the read */
} srv_ctx_t;

typedef struct conn_st_s {
  int echo;   /* the request is /echo: its body is read */
  char *body; /* the request body read so far */
  size_t body_len, body_cap;
  size_t big_sent;   /* /big: bytes streamed so far */
  int big_waits;     /* /big: times ml_conn_wants_writable returned 1 */
  unsigned nheaders; /* the request's header count at on_request */
} conn_st_t;

static const char text_plain[] = "Content-Type: text/plain\r\n";
#define TEXT_PLAIN text_plain, sizeof text_plain - 1

static void log_sink(void *ud, int level, const char *line) {
  srv_ctx_t *x = ud;
  (void)level;
  x->n_log++;
  snprintf(x->last_log, sizeof x->last_log, "%s", line);
}

static int target_is(const ml_request_t *r, const char *path) {
  size_t n = strlen(path);
  return r->target_len == n && memcmp(r->target, path, n) == 0;
}

static char big_byte(size_t i) { return (char)('a' + i % 23); }

static void api(srv_ctx_t *x, int r) {
  if (r < 0) {
    x->n_api_error++;
    printf("    ml_conn_* call failed: %s\n", uv_err_name(r));
  }
}

/* Reads what is buffered of an /echo body; answers with the whole body once it is complete. */
static void echo_read(srv_ctx_t *x, ml_conn_t *c) {
  conn_st_t *st = ml_conn_data(c);
  const char *d;
  size_t n;
  int state = ml_conn_body_state(c, &d, &n);
  if (n) {
    if (st->body_len + n > st->body_cap) {
      st->body_cap = (st->body_len + n) * 2;
      st->body = realloc(st->body, st->body_cap);
    }
    memcpy(st->body + st->body_len, d, n);
    st->body_len += n;
    ml_conn_body_consume(c, n);
  }
  if (state == ML_BODY_MORE) return;
  st->echo = 0;
  if (state == ML_BODY_ERROR) { /* the core answered (400/408/413) or the client left */
    x->n_body_error++;
    ml_conn_finish(c);
    return;
  }
  if (ml_conn_request(c)->nheaders != st->nheaders) x->n_trailer_merged++;
  api(x, ml_conn_respond(c, 200, TEXT_PLAIN, st->body, st->body_len));
  ml_conn_finish(c);
}

/* Streams /big in pieces while the write queue stays below the low-water mark, then waits for
 * on_writable: the backpressure loop an upper layer runs. The client shares the loop and reads
 * nothing while this runs, so the socket pushes back whatever the kernel's buffer sizes; the body
 * goes on until it has, BIG_PUSHBACKS times, and is a whole number of pieces. */
static void big_pump(srv_ctx_t *x, ml_conn_t *c) {
  conn_st_t *st = ml_conn_data(c);
  static char piece[BIG_PIECE];
  while (st->big_sent < BIG_MAX && (st->big_sent < BIG_TOTAL || st->big_waits < BIG_PUSHBACKS)) {
    for (size_t i = 0; i < BIG_PIECE; i++)
      piece[i] = big_byte(st->big_sent + i);
    api(x, ml_conn_stream_write(c, piece, BIG_PIECE));
    st->big_sent += BIG_PIECE;
    int r = ml_conn_wants_writable(c);
    if (r == 1) {
      st->big_waits++;
      return;
    }
    if (r < 0) {
      api(x, r);
      ml_conn_finish(c);
      return;
    }
  }
  api(x, ml_conn_stream_end(c));
  ml_conn_finish(c);
}

static void slow_cb(uv_timer_t *t) {
  srv_ctx_t *x = t->data;
  ml_conn_t *c = x->slow_conn;
  x->slow_conn = NULL;
  if (!c) return;
  api(x, ml_conn_respond(c, 200, TEXT_PLAIN, "slow done", 9));
  x->slow_queued = ml_conn_write_queue(c);
  ml_conn_finish(c);
}

/* Routes by request-target: /echo answers the request body, /stream and /streamlen stream three
 * pieces (chunked, or with a Content-Length), /big streams BIG_TOTAL bytes with backpressure, /slow
 * answers from a timer 100 ms later, /hold waits for the test to start that timer, and anything
 * else answers its own target as the body. */
static void on_request(ml_conn_t *c, void *ud) {
  srv_ctx_t *x = ud;
  x->n_request++;
  x->lenient |= c->parser.lenient_flags;
  conn_st_t *st = ml_conn_data(c);
  if (!st) {
    st = calloc(1, sizeof *st);
    x->n_conn_data++;
    ml_conn_set_data(c, st);
  }
  st->body_len = 0;
  st->big_sent = 0;
  st->big_waits = 0;
  const ml_request_t *r = ml_conn_request(c);
  st->nheaders = r->nheaders;
  if (target_is(r, "/echo")) {
    st->echo = 1;
    ml_conn_body_want(c);
    echo_read(x, c);
  } else if (target_is(r, "/stream") || target_is(r, "/streamlen")) {
    int64_t len = target_is(r, "/streamlen") ? 13 : -1;
    api(x, ml_conn_stream_start(c, 200, TEXT_PLAIN, len));
    api(x, ml_conn_stream_write(c, "one,", 4));
    api(x, ml_conn_stream_write(c, "two,", 4));
    api(x, ml_conn_stream_write(c, "three", 5));
    api(x, ml_conn_stream_end(c));
    ml_conn_finish(c);
  } else if (target_is(r, "/big")) {
    api(x, ml_conn_stream_start(c, 200, TEXT_PLAIN, -1));
    big_pump(x, c);
  } else if (target_is(r, "/slow")) {
    x->slow_conn = c;
    uv_timer_start(&x->slow_timer, slow_cb, 100, 0);
  } else if (target_is(r, "/hold")) {
    x->slow_conn = c;
  } else {
    api(x, ml_conn_respond(c, 200, TEXT_PLAIN, r->target, r->target_len));
    x->feed_queued = ml_conn_write_queue(c);
    ml_conn_finish(c);
  }
}

static void on_body(ml_conn_t *c, void *ud) {
  srv_ctx_t *x = ud;
  conn_st_t *st = ml_conn_data(c);
  x->n_body++;
  if (st && st->echo) echo_read(x, c);
}

static void on_writable(ml_conn_t *c, void *ud) {
  srv_ctx_t *x = ud;
  x->n_writable++;
  big_pump(x, c);
}

static void on_close(ml_conn_t *c, void *ud) {
  srv_ctx_t *x = ud;
  conn_st_t *st = ml_conn_data(c);
  x->n_close++;
  if (x->slow_conn == c) {
    uv_timer_stop(&x->slow_timer);
    x->slow_conn = NULL;
  }
  if (st) {
    free(st->body);
    free(st);
  }
  ml_conn_set_data(c, NULL);
}

static void on_hangup(ml_conn_t *c, void *ud) {
  srv_ctx_t *x = ud;
  (void)c;
  x->n_hangup++;
}

static void server_done(ml_server_t *s, void *ud) {
  srv_ctx_t *x = ud;
  (void)s;
  x->n_done++;
}

static void slow_timer_closed(uv_handle_t *h) {
  srv_ctx_t *x = h->data;
  x->slow_closed = 1;
}

/* Creates and starts a server on 127.0.0.1, port 0. lim NULL: the defaults. */
static void server_start(srv_ctx_t *x, const ml_http_limits_t *lim) {
  memset(x, 0, sizeof *x);
  x->log.level = ML_LOG_DEBUG;
  x->log.sink = log_sink;
  x->log.sink_ud = x;
  ml_http_callbacks_t cb = {on_request, on_body, on_writable, on_close, on_hangup};
  x->s = ml_server_new(&loop, lim, &x->log, &cb, x);
  uv_timer_init(&loop, &x->slow_timer);
  x->slow_timer.data = x;
  if (!CHECK(x->s != NULL)) exit(1);
  CHECK_INT(ml_server_listen(x->s, "127.0.0.1", 0, 0), 0);
  x->port = ml_server_port(x->s, 0);
  CHECK(x->port > 0);
  CHECK_INT(ml_server_port(x->s, 1), UV_EINVAL);
}

static int cond_server_idle(void *a) {
  srv_ctx_t *x = a;
  return ml_server_conn_count(x->s) == 0 && x->n_close == x->n_conn_data;
}

/* Waits until the server holds no connection and every connection that carried a request had its
 * on_close: the end of each test. */
static int wait_server_idle(srv_ctx_t *x) { return CHECK(run_until(cond_server_idle, x)); }

static int cond_server_closed(void *a) {
  srv_ctx_t *x = a;
  return x->n_done > 0 && x->slow_closed;
}

/* Closes the server unless it closed itself (shutdown), waits for `done`, checks the counts that
 * must hold for every server, and frees it. */
static void server_stop(srv_ctx_t *x) {
  if (x->n_done == 0) ml_server_close(x->s, server_done, x);
  uv_close((uv_handle_t *)&x->slow_timer, slow_timer_closed);
  CHECK(run_until(cond_server_closed, x));
  printf("    callbacks: on_request %d, on_body %d, on_writable %d, on_close %d, done %d\n",
         x->n_request, x->n_body, x->n_writable, x->n_close, x->n_done);
  CHECK_INT(x->n_done, 1);
  CHECK_INT(x->n_close, x->n_conn_data); /* on_close exactly once per connection with data */
  CHECK_INT(x->n_api_error, 0);
  CHECK_INT(x->lenient, 0);
  CHECK_INT(x->n_trailer_merged, 0); /* trailers never join the request headers (RFC 9110 6.5.1) */
  ml_server_free(x->s);
  x->s = NULL;
}

/* -- Client side ------------------------------------------------------------------------------- */

typedef struct resp_s {
  int status;
  char *head; /* status line and headers, NUL-terminated, "\r\n\r\n" included */
  char *body; /* the body, de-chunked, NUL-terminated */
  size_t body_len;
} resp_t;

typedef struct client_s {
  uv_tcp_t tcp;
  uv_connect_t creq;
  char *buf; /* everything received */
  size_t len, cap;
  size_t off; /* where the unparsed input starts */
  resp_t resp[MAX_RESP];
  int nresp;
  unsigned head_mask; /* bit i: response i answers a HEAD (no body) */
  int connected;      /* 1, or the connect error */
  int eof;            /* the server ended the connection; read_status says how */
  int read_status;
  int closed; /* our handle's close callback ran */
  int bad;    /* input that is no HTTP response */
  int want;   /* client_wait: responses wanted */
} client_t;

static const char *find(const char *p, const char *end, const char *lit) {
  size_t n = strlen(lit);
  for (; p + n <= end; p++)
    if (memcmp(p, lit, n) == 0) return p;
  return NULL;
}

/* Parses one response from p[0..n). Returns the bytes it spans, 0 when incomplete, -1 when it is
 * no HTTP/1.1 response. A response without Content-Length nor chunked ends at EOF. */
static long parse_response(const char *p, size_t n, int head, int eof, resp_t *out) {
  const char *end = p + n, *he = find(p, end, "\r\n\r\n");
  if (!he) return eof && n ? -1 : 0;
  size_t hlen = (size_t)(he + 4 - p);
  if (hlen < 16 || memcmp(p, "HTTP/1.1 ", 9) != 0) return -1;
  int status = atoi(p + 9);
  const char *body = he + 4, *cl = find(p, he + 2, "\r\nContent-Length: ");
  int chunked = find(p, he + 2, "\r\nTransfer-Encoding: chunked\r\n") != NULL;
  size_t blen = 0, total;
  if (head || status < 200 || status == 204 || status == 304) {
    total = hlen;
  } else if (chunked) {
    const char *q = body;
    for (;;) {
      const char *le = find(q, end, "\r\n");
      if (!le) return 0;
      char *xe;
      unsigned long sz = strtoul(q, &xe, 16);
      if (xe != le) return -1;
      q = le + 2;
      if (sz == 0) {
        if (end - q < 2) return 0;
        if (q[0] != '\r' || q[1] != '\n') return -1;
        q += 2;
        break;
      }
      if ((size_t)(end - q) < sz + 2) return 0;
      if (q[sz] != '\r' || q[sz + 1] != '\n') return -1;
      blen += sz;
      q += sz + 2;
    }
    total = (size_t)(q - p);
  } else if (cl) {
    blen = strtoull(cl + 18, NULL, 10);
    if (n - hlen < blen) return 0;
    total = hlen + blen;
  } else {
    if (!eof) return 0;
    blen = n - hlen;
    total = n;
  }
  if (!out) return (long)total;
  out->status = status;
  out->head = malloc(hlen + 1);
  memcpy(out->head, p, hlen);
  out->head[hlen] = 0;
  out->body = malloc(blen + 1);
  out->body_len = blen;
  if (chunked && blen) { /* de-chunk: the sizes were checked above */
    const char *q = body;
    size_t o = 0;
    for (;;) {
      char *le;
      unsigned long sz = strtoul(q, &le, 16);
      if (sz == 0) break;
      memcpy(out->body + o, le + 2, sz);
      o += sz;
      q = le + 2 + sz + 2;
    }
  } else if (blen) {
    memcpy(out->body, body, blen);
  }
  out->body[blen] = 0;
  return (long)total;
}

static void client_parse(client_t *cl) {
  while (cl->nresp < MAX_RESP && !cl->bad) {
    int head = (cl->head_mask >> cl->nresp) & 1;
    long used =
        parse_response(cl->buf + cl->off, cl->len - cl->off, head, cl->eof, &cl->resp[cl->nresp]);
    if (used < 0) cl->bad = 1;
    if (used <= 0) return;
    cl->nresp++;
    cl->off += (size_t)used;
  }
}

static void client_closed_cb(uv_handle_t *h) {
  client_t *cl = h->data;
  cl->closed = 1;
}

static void client_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  client_t *cl = h->data;
  (void)suggested;
  if (cl->cap - cl->len < 65536) {
    cl->cap = cl->cap ? cl->cap * 2 : 262144;
    cl->buf = realloc(cl->buf, cl->cap + 1);
  }
  *buf = uv_buf_init(cl->buf + cl->len, (unsigned)(cl->cap - cl->len));
}

static void client_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  client_t *cl = st->data;
  (void)buf;
  if (n > 0) {
    cl->len += (size_t)n;
    cl->buf[cl->len] = 0;
    client_parse(cl);
  } else if (n < 0) { /* EOF or a reset: either way the server is gone; close like a client */
    cl->eof = 1;
    cl->read_status = (int)n;
    if (cl->buf) client_parse(cl);
    uv_close((uv_handle_t *)&cl->tcp, client_closed_cb);
  }
}

static void client_connected(uv_connect_t *req, int status) {
  client_t *cl = req->data;
  if (status < 0) {
    cl->connected = status;
    uv_close((uv_handle_t *)&cl->tcp, client_closed_cb);
    return;
  }
  cl->connected = 1;
  uv_read_start((uv_stream_t *)&cl->tcp, client_alloc, client_read);
}

static int cond_connected(void *a) { return ((client_t *)a)->connected != 0; }

/* Connects to 127.0.0.1:port and waits for it; returns 1 or the connect error. */
static int client_open(client_t *cl, int port) {
  struct sockaddr_in addr;
  memset(cl, 0, sizeof *cl);
  uv_tcp_init(&loop, &cl->tcp);
  cl->tcp.data = cl;
  cl->creq.data = cl;
  uv_ip4_addr("127.0.0.1", port, &addr);
  int r = uv_tcp_connect(&cl->creq, &cl->tcp, (const struct sockaddr *)&addr, client_connected);
  if (r < 0) {
    cl->connected = r;
    uv_close((uv_handle_t *)&cl->tcp, client_closed_cb);
    return r;
  }
  run_until(cond_connected, cl);
  return cl->connected;
}

static void client_written(uv_write_t *req, int status) {
  (void)status; /* a write to a server that closed first fails: what was read tells the story */
  free(req);
}

static void client_send(client_t *cl, const char *data, size_t len) {
  if (cl->eof || cl->connected != 1 || uv_is_closing((uv_handle_t *)&cl->tcp)) return;
  uv_write_t *req = malloc(sizeof *req + len);
  char *copy = (char *)(req + 1);
  memcpy(copy, data, len);
  uv_buf_t b = uv_buf_init(copy, (unsigned)len);
  if (uv_write(req, (uv_stream_t *)&cl->tcp, &b, 1, client_written) < 0) free(req);
}

static void client_sends(client_t *cl, const char *s) { client_send(cl, s, strlen(s)); }

static int cond_want(void *a) {
  client_t *cl = a;
  return cl->nresp >= cl->want || cl->eof || cl->bad;
}

/* Waits until n responses are in (or the server closed); returns 1 when they are. */
static int client_wait(client_t *cl, int n) {
  cl->want = n;
  run_until(cond_want, cl);
  return cl->nresp >= n;
}

static int cond_eof(void *a) { return ((client_t *)a)->closed; }

/* Waits until the server ends the connection; returns 1 when it did. */
static int client_wait_eof(client_t *cl) { return run_until(cond_eof, cl) && cl->eof; }

/* Closes our side if the server did not, waits for the handle, frees what was received. */
static void client_close(client_t *cl) {
  if (!uv_is_closing((uv_handle_t *)&cl->tcp)) uv_close((uv_handle_t *)&cl->tcp, client_closed_cb);
  CHECK(run_until(cond_eof, cl));
  for (int i = 0; i < cl->nresp; i++) {
    free(cl->resp[i].head);
    free(cl->resp[i].body);
  }
  free(cl->buf);
  cl->buf = NULL;
  cl->nresp = 0;
}

/* The i-th response, or an empty one when it did not come (the checks on it then fail). */
static const resp_t *resp(const client_t *cl, int i) {
  static const resp_t none = {0, "", "", 0};
  return i < cl->nresp ? &cl->resp[i] : &none;
}

/* Checks a complete "200 OK" response whose body is `body`. */
static void check_ok(const client_t *cl, int i, const char *body) {
  const resp_t *r = resp(cl, i);
  CHECK_INT(r->status, 200);
  CHECK(strncmp(r->head, "HTTP/1.1 200 OK\r\n", 17) == 0);
  CHECK_STR(r->body, body);
}

/* Checks the interim "100 Continue" a FIN during a handler brings (ml__conn_on_eof's probe). */
static void check_continue(const client_t *cl, int i) {
  const resp_t *r = resp(cl, i);
  CHECK_INT(r->status, 100);
  CHECK_STR(r->head, "HTTP/1.1 100 Continue\r\n\r\n");
}

/* -- Tests ------------------------------------------------------------------------------------ */

static srv_ctx_t main_srv; /* the server most tests talk to */

static void test_simple_get(void) {
  ctest_section("a simple GET");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  int before = x->n_request;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /hello?a=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ctest\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  const resp_t *r = resp(&cl, 0);
  check_ok(&cl, 0, "/hello?a=1");
  CHECK_HAS(r->head, "\r\nServer: moonlet\r\n");
  CHECK_HAS(r->head, "\r\nDate: ");
  CHECK_HAS(r->head, " GMT\r\n");
  CHECK_HAS(r->head, "\r\nContent-Type: text/plain\r\n");
  CHECK_HAS(r->head, "\r\nContent-Length: 10\r\n");
  CHECK_LACKS(r->head, "Connection:");
  CHECK_INT(cl.len, strlen(r->head) + 10); /* nothing more than the response */
  CHECK(!cl.eof);                          /* HTTP/1.1 keeps the connection */
  CHECK_INT(x->n_request - before, 1);
  client_close(&cl);
  wait_server_idle(x);

  ctest_section("output: staged when answered inside the read, written at once from elsewhere");
  CHECK(x->feed_queued > 0); /* staged: a pipelined response behind it may join the same write */
  x->slow_queued = 1;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "slow done");
  CHECK_INT((int)x->slow_queued, 0); /* from a timer: out before the callback returned */
  client_close(&cl);
  wait_server_idle(x);
}

static void test_keepalive(void) {
  ctest_section("keep-alive: two sequential requests on one connection");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  int before = x->n_request, closes = x->n_close;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  CHECK(!cl.eof);
  client_sends(&cl, "GET /two HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 2));
  check_ok(&cl, 0, "/one");
  check_ok(&cl, 1, "/two");
  CHECK(!cl.eof);
  CHECK_INT(x->n_request - before, 2);
  CHECK_INT(x->n_close - closes, 0); /* one connection, still open */
  client_close(&cl);
  wait_server_idle(x);
  CHECK_INT(x->n_close - closes, 1);
}

static void test_pipelining(void) {
  ctest_section("pipelining: three requests in one write are answered in order");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  int before = x->n_request;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /p1 HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /p2 HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /p3 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 3));
  check_ok(&cl, 0, "/p1");
  check_ok(&cl, 1, "/p2");
  check_ok(&cl, 2, "/p3");
  CHECK_INT(x->n_request - before, 3);
  CHECK(!cl.eof);
  client_close(&cl);
  wait_server_idle(x);

  ctest_section("pipelining behind a slow handler and a request body keeps the order");
  before = x->n_request;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                    "GET /p3 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 3));
  check_ok(&cl, 0, "slow done");
  check_ok(&cl, 1, "hello");
  check_ok(&cl, 2, "/p3");
  CHECK_INT(x->n_request - before, 3);
  client_close(&cl);
  wait_server_idle(x);

  ctest_section("pipelining after a chunked body with a trailer, and after empty lines");
  before = x->n_request;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
                    "\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n"
                    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "2\r\nde\r\n0\r\n\r\n"
                    "GET /p4 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 4));
  check_ok(&cl, 0, "abc");
  check_ok(&cl, 1, "/p2");
  check_ok(&cl, 2, "de");
  check_ok(&cl, 3, "/p4");
  CHECK_INT(x->n_request - before, 4);
  CHECK(!cl.eof);
  client_close(&cl);
  wait_server_idle(x);

  ctest_section("pipelining then a half-close: every request is answered, the last one closes");
  before = x->n_request;
  int hangups = x->n_hangup;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /p2 HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
  uv_shutdown_t sreq; /* the client's write side ends right behind its requests */
  CHECK_INT(uv_shutdown(&sreq, (uv_stream_t *)&cl.tcp, NULL), 0);
  CHECK(client_wait(&cl, 4));
  check_ok(&cl, 0, "slow done");
  check_ok(&cl, 1, "/p2");
  check_continue(&cl, 2); /* the FIN came during the last one: is the client still there? */
  check_ok(&cl, 3, "slow done");
  CHECK_INT(x->n_request - before, 3);
  CHECK_INT(x->n_hangup - hangups, 1); /* told once, during the last request: none behind it */
  client_close(&cl);
  wait_server_idle(x);

  ctest_section("a FIN during a request's handler: on_hangup once, and the answer still goes out");
  hangups = x->n_hangup;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
  uv_shutdown_t sreq2;
  CHECK_INT(uv_shutdown(&sreq2, (uv_stream_t *)&cl.tcp, NULL), 0);
  CHECK(client_wait(&cl, 2));
  check_continue(&cl, 0); /* a half-close reads it, then its answer */
  check_ok(&cl, 1, "slow done");
  CHECK_INT(x->n_hangup - hangups, 1);
  client_close(&cl);
  wait_server_idle(x);
}

/* Sends s one byte per write, turning the loop without blocking in between, so that the server
 * mostly reads one byte at a time: whatever the reads are, the responses must not change. */
static void send_bytewise(client_t *cl, const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    client_send(cl, s + i, 1);
    uv_run(&loop, UV_RUN_NOWAIT);
  }
}

static void test_bytewise(void) {
  srv_ctx_t *x = &main_srv;
  client_t cl;
  static const char reqs[] = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
                             "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
                             "GET /last HTTP/1.1\r\nHost: x\r\nX-A: a b\r\n\r\n";
  static const char bad[] = "GET / HTTP/1.1\r\nHost: x\r\n\n";
  ctest_section("requests sent one byte at a time");
  CHECK_INT(client_open(&cl, x->port), 1);
  send_bytewise(&cl, reqs, sizeof reqs - 1);
  CHECK(client_wait(&cl, 3));
  check_ok(&cl, 0, "hello");
  check_ok(&cl, 1, "xyz");
  check_ok(&cl, 2, "/last");
  client_close(&cl);

  ctest_section("a bare LF sent on its own is still refused");
  CHECK_INT(client_open(&cl, x->port), 1);
  send_bytewise(&cl, bad, sizeof bad - 1);
  CHECK(client_wait_eof(&cl));
  CHECK_INT(resp(&cl, 0)->status, 400);
  client_close(&cl);
  wait_server_idle(x);
}

static void test_connection_close(void) {
  ctest_section("Connection: close closes after the response");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.nresp, 1);
  check_ok(&cl, 0, "/bye");
  CHECK_HAS(resp(&cl, 0)->head, "\r\nConnection: close\r\n");
  CHECK_INT(cl.read_status, UV_EOF); /* a clean close, no reset */
  client_close(&cl);
  wait_server_idle(x);
}

static void test_http10(void) {
  ctest_section("HTTP/1.0 without keep-alive closes after the response");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /old HTTP/1.0\r\n\r\n");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.nresp, 1);
  check_ok(&cl, 0, "/old");
  CHECK_HAS(resp(&cl, 0)->head, "\r\nConnection: close\r\n");
  CHECK_HAS(resp(&cl, 0)->head, "\r\nContent-Length: 4\r\n");
  client_close(&cl);

  ctest_section("HTTP/1.0 with Connection: keep-alive stays open");
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  client_sends(&cl, "GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK(client_wait(&cl, 2));
  check_ok(&cl, 0, "/a");
  check_ok(&cl, 1, "/b");
  CHECK_HAS(resp(&cl, 1)->head, "\r\nConnection: keep-alive\r\n");
  CHECK(!cl.eof);
  client_close(&cl);

  ctest_section("HTTP/1.0 streamed response: close-delimited");
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.nresp, 1);
  check_ok(&cl, 0, "one,two,three");
  CHECK_LACKS(resp(&cl, 0)->head, "Transfer-Encoding");
  CHECK_LACKS(resp(&cl, 0)->head, "Content-Length");
  CHECK_HAS(resp(&cl, 0)->head, "\r\nConnection: close\r\n");
  client_close(&cl);
  wait_server_idle(x);
}

static void test_head(void) {
  ctest_section("HEAD: Content-Length but no body");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  CHECK_INT(client_open(&cl, x->port), 1);
  cl.head_mask = 1 | 4; /* responses 0 and 2 answer HEAD */
  client_sends(&cl, "HEAD /headpath HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
                    "HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /last HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 4));
  const resp_t *r = resp(&cl, 0);
  CHECK_INT(r->status, 200);
  CHECK_HAS(r->head, "\r\nContent-Length: 9\r\n"); /* strlen("/headpath") */
  CHECK_INT(r->body_len, 0);
  check_ok(&cl, 1, "/after"); /* no body bytes came in between: the next response parses */
  CHECK_INT(resp(&cl, 2)->status, 200);
  CHECK_HAS(resp(&cl, 2)->head, "\r\nTransfer-Encoding: chunked\r\n");
  check_ok(&cl, 3, "/last"); /* not even the last chunk of a streamed one */
  CHECK_INT(cl.off, cl.len);
  client_close(&cl);
  wait_server_idle(x);
}

static void test_request_bodies(void) {
  srv_ctx_t *x = &main_srv;
  client_t cl;

  ctest_section("request body with Content-Length");
  int bodies = x->n_body;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world");
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "hello world");
  client_close(&cl);

  ctest_section("request body with chunked encoding, in two writes");
  CHECK_INT(client_open(&cl, x->port), 1);
  bodies = x->n_body;
  client_sends(&cl, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "5\r\nhello\r\n");
  CHECK(wait_count(&x->n_body, bodies + 1)); /* the first chunk was delivered: ML_BODY_MORE */
  CHECK_INT(cl.nresp, 0);
  client_sends(&cl, "6;ext=1\r\n world\r\n0\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "hello world");
  CHECK(x->n_body >= bodies + 2);
  CHECK(!cl.eof);
  client_close(&cl);

  ctest_section("Expect: 100-continue gets 100 Continue before the body is sent");
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                    "Content-Length: 4\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  CHECK_INT(resp(&cl, 0)->status, 100);
  CHECK_STR(resp(&cl, 0)->head, "HTTP/1.1 100 Continue\r\n\r\n");
  client_sends(&cl, "ping");
  CHECK(client_wait(&cl, 2));
  check_ok(&cl, 1, "ping");
  client_close(&cl);

  ctest_section("a 300 KiB body crosses reads and the high-water mark");
  size_t big = 300 * 1024;
  char *req = malloc(big + 128);
  int hl = sprintf(req, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n", big);
  for (size_t i = 0; i < big; i++)
    req[hl + i] = big_byte(i);
  CHECK_INT(client_open(&cl, x->port), 1);
  client_send(&cl, req, (size_t)hl + big);
  CHECK(client_wait(&cl, 1));
  CHECK_INT(resp(&cl, 0)->status, 200);
  CHECK_INT(resp(&cl, 0)->body_len, big);
  CHECK(resp(&cl, 0)->body_len == big && memcmp(resp(&cl, 0)->body, req + hl, big) == 0);
  free(req);
  client_close(&cl);
  wait_server_idle(x);
}

static void test_streamed(void) {
  srv_ctx_t *x = &main_srv;
  client_t cl;

  ctest_section("a streamed chunked response, then the connection goes on");
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "one,two,three");
  CHECK_HAS(resp(&cl, 0)->head, "\r\nTransfer-Encoding: chunked\r\n");
  CHECK_LACKS(resp(&cl, 0)->head, "Content-Length");
  CHECK(strstr(cl.buf, "\r\n\r\n4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n") != NULL);
  client_sends(&cl, "GET /streamlen HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 2));
  check_ok(&cl, 1, "one,two,three");
  CHECK_HAS(resp(&cl, 1)->head, "\r\nContent-Length: 13\r\n");
  CHECK_LACKS(resp(&cl, 1)->head, "Transfer-Encoding");
  CHECK(!cl.eof);
  client_close(&cl);

  ctest_section("a large streamed response with backpressure (on_writable)");
  int writable = x->n_writable;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  const resp_t *r = resp(&cl, 0);
  CHECK_INT(r->status, 200);
  CHECK(r->body_len >= BIG_TOTAL && r->body_len < BIG_MAX);
  CHECK_INT(r->body_len % BIG_PIECE, 0);
  int same = 1;
  for (size_t i = 0; same && i < r->body_len; i++)
    same = r->body[i] == big_byte(i);
  CHECK(same);
  CHECK_INT(x->n_writable - writable, BIG_PUSHBACKS);
  client_close(&cl);
  wait_server_idle(x);
}

/* Sends one raw request on a new connection and expects `status`, Connection: close and the
 * close; `handled` is how many requests reach on_request. */
static void expect_refused(const char *what, const char *raw, size_t len, int status, int handled) {
  srv_ctx_t *x = &main_srv;
  client_t cl;
  char label[160];
  snprintf(label, sizeof label, "%s -> %d", what, status);
  ctest_section(label);
  int before = x->n_request;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_send(&cl, raw, len);
  int closed = client_wait_eof(&cl);
  if (!CHECK_INT(resp(&cl, 0)->status, status)) printf("    %s: got \"%.200s\"\n", what, cl.buf);
  CHECK(closed);
  CHECK_INT(cl.nresp, 1);
  CHECK_HAS(resp(&cl, 0)->head, "\r\nConnection: close\r\n");
  CHECK_INT(x->n_request - before, handled);
  client_close(&cl);
  wait_server_idle(x);
}

#define REFUSE(what, raw, status, handled)                                                         \
  expect_refused(what, raw, sizeof raw - 1, status, handled)

static void test_bad_requests(void) {
  srv_ctx_t *x = &main_srv;
  int logs = x->n_log;

  REFUSE("malformed request line", "HELLO\r\n\r\n", 400, 0);
  CHECK(x->n_log > logs);
  CHECK_HAS(x->last_log, "400 Bad Request");
  CHECK_HAS(x->last_log, "HPE_"); /* the log names the llhttp error */
  REFUSE("request line without a version", "GET /x\r\nHost: x\r\n\r\n", 400, 0);
  REFUSE("invalid version", "GET / HTTP/1.x\r\nHost: x\r\n\r\n", 400, 0);
  REFUSE("HTTP/0.9", "GET / HTTP/0.9\r\nHost: x\r\n\r\n", 400, 0);
  REFUSE("HTTP/0.9 without a version and headers", "GET /\r\n\r\n", 400, 0);
  REFUSE("HTTP/2.0 in a request line", "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, 0);
  REFUSE("space in the request-target", "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400, 0);
  REFUSE("missing Host in HTTP/1.1", "GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, 0);
  CHECK_HAS(x->last_log, "missing Host header");
  REFUSE("two Host headers", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, 0);
  REFUSE("two Host headers in HTTP/1.0", "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400, 0);
  REFUSE("Content-Length with Transfer-Encoding",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
         "0\r\n\r\n",
         400, 0);
  REFUSE("Transfer-Encoding with Content-Length",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
         "0\r\n\r\n",
         400, 0);
  REFUSE("two different Content-Length",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
         400, 0);
  REFUSE("Content-Length list",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!", 400, 0);
  REFUSE("malformed Content-Length",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello", 400, 0);
  REFUSE("negative Content-Length", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
         400, 0);
  REFUSE("Content-Length with a space inside",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1 1\r\n\r\nhello world", 400, 0);
  REFUSE("Content-Length overflowing 64 bits",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400,
         0);
  REFUSE("Transfer-Encoding: identity",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", 400, 0);
  REFUSE("Transfer-Encoding in HTTP/1.0",
         "POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
         "0\r\n\r\n",
         400, 0);
  REFUSE("Transfer-Encoding not ending in chunked",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400,
         0);
  REFUSE("invalid chunk size",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n", 400,
         1);
  CHECK_INT(x->n_body_error, 1); /* the handler heard about it through ML_BODY_ERROR */
  REFUSE("obs-fold: a header line starting with a space",
         "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400, 0);
  REFUSE("obs-fold: a header line starting with a tab",
         "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n", 400, 0);
  REFUSE("obs-fold after an empty value", "GET / HTTP/1.1\r\nHost: x\r\nX-A:\r\n b\r\n\r\n", 400,
         0);
  REFUSE("a space before the first header", "GET / HTTP/1.1\r\n Host: x\r\n\r\n", 400, 0);
  REFUSE("a space before the colon", "GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, 0);
  REFUSE("bare LF line endings", "GET / HTTP/1.1\nHost: x\n\n", 400, 0);
  REFUSE("bare LF after the request line", "GET / HTTP/1.1\nHost: x\r\n\r\n", 400, 0);
  REFUSE("bare LF after a header", "GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400, 0);
  REFUSE("bare LF ending the header section", "GET / HTTP/1.1\r\nHost: x\r\n\n", 400, 0);
  REFUSE("bare LF before the request line", "\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, 0);
  REFUSE("bare LF ending the trailers",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\n",
         400, 1);
  REFUSE("bare LF ending a trailer section with a field",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
         "X-T: 1\r\n\n",
         400, 1);
  REFUSE("bare LF after a chunk", /* the CRLF that ends chunk data */
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\n0\r\n\r\n",
         400, 1);
  REFUSE("bare CR after the request line", "GET / HTTP/1.1\rHost: x\r\n\r\n", 400, 0);
  REFUSE("bare CR after a header", "GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400, 0);
  REFUSE("bare CR inside a header value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400, 0);
  REFUSE("NUL inside a header value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n", 400, 0);
  REFUSE("bare LF in a chunk size line",
         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         "5\nhello\r\n0\r\n\r\n",
         400, 1);

  /* limits of main_srv: max_uri 1024, max_header_bytes 4096, max_headers 20, max_body 512 KiB */
  char req[8192];
  int n = snprintf(req, sizeof req, "GET /");
  memset(req + n, 'u', 1100);
  n += 1100;
  n += snprintf(req + n, sizeof req - (size_t)n, " HTTP/1.1\r\nHost: x\r\n\r\n");
  expect_refused("request-target over max_uri", req, (size_t)n, 414, 0);
  CHECK_HAS(x->last_log, "request-target too long");

  n = snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: ");
  memset(req + n, 'h', 4200);
  n += 4200;
  n += snprintf(req + n, sizeof req - (size_t)n, "\r\n\r\n");
  expect_refused("header section over max_header_bytes (one big header)", req, (size_t)n, 431, 0);

  n = snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\n");
  for (int i = 0; i < 19; i++) /* 19 names and values of 220 bytes, under max_headers */
    n += snprintf(req + n, sizeof req - (size_t)n, "X-H%02d: %0215d\r\n", i, i);
  n += snprintf(req + n, sizeof req - (size_t)n, "\r\n");
  expect_refused("header section over max_header_bytes (many headers)", req, (size_t)n, 431, 0);

  n = snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\n");
  for (int i = 0; i < 25; i++)
    n += snprintf(req + n, sizeof req - (size_t)n, "X-N%d: v\r\n", i);
  n += snprintf(req + n, sizeof req - (size_t)n, "\r\n");
  expect_refused("too many headers", req, (size_t)n, 431, 0);
  CHECK_HAS(x->last_log, "too many headers");

  n = snprintf(req, sizeof req,
               "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               "1\r\na\r\n0\r\nX-Trailer: ");
  memset(req + n, 't', 4200);
  n += 4200;
  n += snprintf(req + n, sizeof req - (size_t)n, "\r\n\r\n");
  expect_refused("trailers over max_header_bytes", req, (size_t)n, 431, 1);

  REFUSE("Content-Length over max_body",
         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 600000\r\n\r\nabc", 413, 0);
  int errors = x->n_body_error;
  n = snprintf(req, sizeof req,
               "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               "80000\r\n"); /* a 512 KiB chunk, then one more byte */
  char *body = malloc(600 * 1024);
  memcpy(body, req, (size_t)n);
  memset(body + n, 'b', 0x80000);
  n += 0x80000;
  n += sprintf(body + n, "\r\n1\r\nb\r\n0\r\n\r\n");
  expect_refused("chunked body over max_body", body, (size_t)n, 413, 1);
  CHECK_INT(x->n_body_error, errors + 1);
  free(body);

  ctest_section("lenient flags stay off");
  CHECK_INT(x->lenient, 0);

  ctest_section("after the bad requests the server still serves");
  client_t cl;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /still-here HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "/still-here");
  client_close(&cl);
  wait_server_idle(x);
}

static void test_limits_accept(void) {
  srv_ctx_t *x = &main_srv;
  client_t cl;
  char req[8192];
  ctest_section("just under the limits is served");
  int n = snprintf(req, sizeof req, "GET /");
  memset(req + n, 'u', 1000);
  n += 1000;
  n += snprintf(req + n, sizeof req - (size_t)n, " HTTP/1.1\r\nHost: x\r\n");
  for (int i = 0; i < 19; i++)
    n += snprintf(req + n, sizeof req - (size_t)n, "X-N%d: v\r\n", i);
  n += snprintf(req + n, sizeof req - (size_t)n, "\r\n");
  CHECK_INT(client_open(&cl, x->port), 1);
  client_send(&cl, req, (size_t)n);
  CHECK(client_wait(&cl, 1));
  CHECK_INT(resp(&cl, 0)->status, 200);
  CHECK_INT(resp(&cl, 0)->body_len, 1001);
  client_close(&cl);
  wait_server_idle(x);
}

static void test_lenient_flags(void) {
  ctest_section("the parser of a connection has lenient_flags 0");
  srv_ctx_t *x = &main_srv;
  client_t cl;
  CHECK_INT(client_open(&cl, x->port), 1);
  client_sends(&cl, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(wait_count(&x->n_request, x->n_request + 1) && x->slow_conn != NULL);
  if (x->slow_conn) CHECK_INT(x->slow_conn->parser.lenient_flags, 0);
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "slow done");
  client_close(&cl);
  wait_server_idle(x);
  CHECK_INT(x->lenient, 0);
}

static void test_timeouts(void) {
  srv_ctx_t x;
  ml_http_limits_t lim;
  client_t cl;
  ml_http_limits_default(&lim);
  lim.header_timeout_ms = 200;
  lim.body_timeout_ms = 200;
  server_start(&x, &lim);

  ctest_section("header read timeout: half a request line gets 408, then close");
  CHECK_INT(client_open(&cl, x.port), 1);
  client_sends(&cl, "GET /hal");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.nresp, 1);
  CHECK_INT(resp(&cl, 0)->status, 408);
  CHECK_HAS(resp(&cl, 0)->head, "\r\nConnection: close\r\n");
  CHECK_INT(x.n_request, 0);
  client_close(&cl);

  ctest_section("header read timeout on a kept-alive connection");
  CHECK_INT(client_open(&cl, x.port), 1);
  client_sends(&cl, "GET /first HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  client_sends(&cl, "GET /second HTTP/1.1\r\nHost: x\r\n");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.nresp, 2);
  check_ok(&cl, 0, "/first");
  CHECK_INT(resp(&cl, 1)->status, 408);
  client_close(&cl);

  ctest_section("body read timeout: 408 and the handler sees ML_BODY_ERROR");
  CHECK_INT(client_open(&cl, x.port), 1);
  client_sends(&cl, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(resp(&cl, 0)->status, 408);
  CHECK_INT(x.n_body_error, 1);
  client_close(&cl);
  wait_server_idle(&x);
  server_stop(&x);

  lim.keepalive_timeout_ms = 200;
  server_start(&x, &lim);
  ctest_section("keep-alive idle timeout closes an idle connection");
  CHECK_INT(client_open(&cl, x.port), 1);
  client_sends(&cl, "GET /idle HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&cl, 1));
  check_ok(&cl, 0, "/idle");
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.nresp, 1); /* closed without another byte */
  CHECK_INT(cl.off, cl.len);
  client_close(&cl);
  ctest_section("an idle connection that never sent a byte is closed too");
  CHECK_INT(client_open(&cl, x.port), 1);
  CHECK(client_wait_eof(&cl));
  CHECK_INT(cl.len, 0);
  client_close(&cl);
  wait_server_idle(&x);
  server_stop(&x);
}

static void test_max_conns(void) {
  srv_ctx_t x;
  ml_http_limits_t lim;
  client_t a, b, c;
  ml_http_limits_default(&lim);
  lim.max_conns = 1;
  server_start(&x, &lim);

  ctest_section("max_conns=1: a second connection is closed at once, the first is served");
  CHECK_INT(client_open(&a, x.port), 1);
  client_sends(&a, "GET /a1 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&a, 1)); /* the server has accepted a */
  CHECK_INT(ml_server_conn_count(x.s), 1);
  CHECK_INT(client_open(&b, x.port), 1);
  CHECK(client_wait_eof(&b));
  CHECK_INT(b.len, 0);
  CHECK_HAS(x.last_log, "max_conns");
  client_sends(&a, "GET /a2 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&a, 2));
  check_ok(&a, 0, "/a1");
  check_ok(&a, 1, "/a2");
  CHECK(!a.eof);
  client_close(&b);
  client_close(&a);
  wait_server_idle(&x);

  ctest_section("max_conns=1: once the first is gone, a new one is served");
  CHECK_INT(client_open(&c, x.port), 1);
  client_sends(&c, "GET /c HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&c, 1));
  check_ok(&c, 0, "/c");
  client_close(&c);
  wait_server_idle(&x);
  CHECK_INT(x.n_request, 3);
  server_stop(&x);
}

static void test_shutdown(void) {
  srv_ctx_t x;
  client_t busy, idle, late;
  server_start(&x, NULL);

  ctest_section("ml_server_shutdown lets an in-flight request finish, then closes");
  CHECK_INT(client_open(&idle, x.port), 1);
  client_sends(&idle, "GET /idle HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(client_wait(&idle, 1));
  CHECK_INT(client_open(&busy, x.port), 1);
  client_sends(&busy, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(wait_count(&x.n_request, 2)); /* /hold is in flight */
  ml_server_shutdown(x.s, server_done, &x);
  CHECK(client_wait_eof(&idle)); /* the idle connection is closed at once */
  CHECK_INT(idle.nresp, 1);
  CHECK(client_open(&late, x.port) < 0); /* no more listener */
  CHECK(!busy.eof);
  CHECK_INT(busy.nresp, 0);
  CHECK_INT(x.n_done, 0);
  CHECK(x.slow_conn != NULL);
  uv_timer_start(&x.slow_timer, slow_cb, 100, 0); /* the handler answers 100 ms later */
  CHECK(client_wait_eof(&busy));
  CHECK_INT(busy.nresp, 1);
  check_ok(&busy, 0, "slow done");
  CHECK_HAS(resp(&busy, 0)->head, "\r\nConnection: close\r\n");
  CHECK(wait_count(&x.n_done, 1));
  CHECK_INT(x.n_close, 2);
  client_close(&late);
  client_close(&idle);
  client_close(&busy);
  server_stop(&x);

  ctest_section("ml_server_shutdown closes what is still open after the grace time");
  ml_http_limits_t lim;
  ml_http_limits_default(&lim);
  lim.shutdown_grace_ms = 200;
  server_start(&x, &lim);
  CHECK_INT(client_open(&busy, x.port), 1);
  client_sends(&busy, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(wait_count(&x.n_request, 1));
  ml_server_shutdown(x.s, server_done, &x);
  CHECK(client_wait_eof(&busy)); /* never answered: cut at the end of the grace time */
  CHECK_INT(busy.len, 0);
  CHECK(wait_count(&x.n_done, 1));
  CHECK_INT(x.n_close, 1);
  CHECK(x.slow_conn == NULL); /* on_close told the handler */
  CHECK(strstr(x.last_log, "grace time over") != NULL);
  client_close(&busy);
  server_stop(&x);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN); /* a write to a peer that reset must fail with EPIPE, not kill us */
  CHECK_INT(uv_loop_init(&loop), 0);
  uv_timer_init(&loop, &deadline);

  ml_http_limits_t lim;
  ml_http_limits_default(&lim);
  lim.max_uri = 1024;
  lim.max_header_bytes = 4096;
  lim.max_headers = 20;
  lim.max_body = 512 * 1024;
  server_start(&main_srv, &lim);

  test_simple_get();
  test_keepalive();
  test_pipelining();
  test_connection_close();
  test_http10();
  test_head();
  test_request_bodies();
  test_streamed();
  test_bad_requests();
  test_bytewise();
  test_limits_accept();
  test_lenient_flags();
  server_stop(&main_srv);

  test_timeouts();
  test_max_conns();
  test_shutdown();

  ctest_section("the loop closes with no handle left");
  uv_close((uv_handle_t *)&deadline, NULL);
  CHECK_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
  CHECK_INT(uv_loop_close(&loop), 0);
  return ctest_end();
}
