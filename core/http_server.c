/* core/http_server.c: listeners, accepting, the output staging buffer, connection timers, reading,
 * shutdown and freeing. The request cycle itself is in http_conn.c.
 *
 * Invariants:
 * - A connection is freed only in conn_finalize, after the close callbacks of its tcp and timer
 *   handles have both run and no file transfer is in flight; on_close runs just before that.
 * - The staged output (s->out) belongs to one connection at a time (s->out_owner); handing it to
 *   another writes it out first, and so do closing, the prepare phase, ml_server_flush, the end of
 *   a read (every response its pipelined requests answered at once goes out in one write), and a
 *   response that ends outside its connection's feed (http_response.c: its handler was resumed by
 *   a timer or another socket, so no pipelined response can join it, and waiting for the prepare
 *   phase would only delay it behind the rest of the loop's batch).
 * - The timer of a connection is started only when idle; when it fires it works out the deadline of
 *   the connection's current state and re-arms for the rest, so a request costs no timer operation.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "http_internal.h"
#include "listen.h"
#include "log_out.h"

void ml_http_limits_default(ml_http_limits_t *lim) {
  lim->max_uri = 8 * 1024;
  lim->max_header_bytes = 32 * 1024;
  lim->max_headers = 100;
  lim->max_body = 1024 * 1024;
  lim->header_timeout_ms = 60000;
  lim->body_timeout_ms = 60000;
  lim->keepalive_timeout_ms = 75000;
  lim->send_timeout_ms = 60000;
  lim->max_conns = 10240;
  lim->keepalive_requests = 0;
  lim->shutdown_grace_ms = 10000;
}

/* -- Request-buffer pool ------------------------------------------------------------------------
 */

ml_reqbuf_t *ml__reqbuf_get(ml_server_t *s) {
  ml_reqbuf_t *rb = s->free_rb;
  if (rb) {
    s->free_rb = rb->next;
    s->free_rb_count--;
  } else {
    size_t nh = s->lim.max_headers + 1;
    size_t cap = s->lim.max_uri + s->lim.max_header_bytes + 64;
    rb = malloc(sizeof *rb + nh * sizeof(ml_header_t) + cap);
    if (!rb) return NULL;
    rb->headers = (ml_header_t *)(rb + 1);
    rb->data = (char *)(rb->headers + nh);
    rb->cap = cap;
  }
  rb->len = 0;
  rb->next = NULL;
  return rb;
}

void ml__reqbuf_put(ml_server_t *s, ml_reqbuf_t *rb) {
  if (s->free_rb_count >= 64) {
    free(rb);
    return;
  }
  rb->next = s->free_rb;
  s->free_rb = rb;
  s->free_rb_count++;
}

/* -- Date header ----------------------------------------------------------------------------------
 */

const char *ml__date_header(ml_server_t *s, size_t *len) {
  uint64_t tick = uv_now(s->loop) / 1000;
  if (tick != s->date_tick || s->date_len == 0) {
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    s->date_len = strftime(s->date, sizeof s->date, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
    s->date_tick = tick;
  }
  *len = s->date_len;
  return s->date;
}

/* -- Output
 * ------------------------------------------------------------------------------------------ */

typedef struct {
  uv_write_t req;
  ml_conn_t *conn;
  size_t len;
  char data[];
} write_req_t;

static void write_cb(uv_write_t *req, int status) {
  write_req_t *wr = (write_req_t *)req;
  ml_conn_t *c = wr->conn;
  c->write_queue -= wr->len;
  free(wr);
  if (status < 0) {
    ml_conn_close(c, 0);
    return;
  }
  c->activity = uv_now(c->srv->loop);
  if (c->want_writable && c->write_queue < ML_WRITE_LOW_WATER && !c->closing) {
    c->want_writable = 0;
    if (c->raw_cb)
      c->raw_cb->on_writable(c, c->raw_ud);
    else
      c->srv->cb.on_writable(c, c->srv->ud);
  }
}

/* Writes p[0..n) to the socket after whatever is queued: what uv_try_write does not take is copied
 * into one write request. Returns 0 or a negative error (the connection is then closed). */
static int raw_write(ml_conn_t *c, const char *p, size_t n) {
  if (c->closing && !c->lingering) return UV_EPIPE;
  if (c->write_queue == 0) {
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    int w = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (w >= 0) {
      p += w;
      n -= (size_t)w;
      if (n == 0) {
        c->activity = uv_now(c->srv->loop);
        return 0;
      }
    } else if (w != UV_EAGAIN) {
      ml_conn_close(c, 0);
      return w;
    }
  }
  write_req_t *wr = malloc(sizeof *wr + n);
  if (!wr) {
    ml_conn_close(c, 0);
    return UV_ENOMEM;
  }
  memcpy(wr->data, p, n);
  wr->conn = c;
  wr->len = n;
  uv_buf_t b = uv_buf_init(wr->data, (unsigned)n);
  int r = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, write_cb);
  if (r < 0) {
    free(wr);
    ml_conn_close(c, 0);
    return r;
  }
  c->write_queue += n;
  ml__conn_arm_timer(c);
  return 0;
}

/* HTTPS: writes out the ciphertext the TLS session has for the peer, through the server's
 * tls_out buffer (raw_write copies what the socket does not take at once, so the buffer is free
 * again when it returns). */
static int tls_send(ml_conn_t *c) {
  ml_server_t *s = c->srv;
  while (ml_tls_pending(c->tls) > 0) {
    if (!s->tls_out && !(s->tls_out = malloc(ML_READ_BUF_SIZE))) {
      ml_conn_close(c, 0);
      return UV_ENOMEM;
    }
    size_t n = ml_tls_take(c->tls, s->tls_out, ML_READ_BUF_SIZE);
    int r = raw_write(c, s->tls_out, n);
    if (r < 0) return r;
  }
  return 0;
}

char *ml__conn_tls_take(ml_conn_t *c, size_t *len) {
  size_t n = ml_tls_pending(c->tls);
  *len = 0;
  if (n == 0) return NULL;
  char *buf = malloc(n);
  if (!buf) {
    *len = (size_t)-1;
    return NULL;
  }
  *len = ml_tls_take(c->tls, buf, n);
  return buf;
}

/* Writes p[0..n) to the client: as it is, or on HTTPS encrypted first. Returns 0 or a negative
 * error (the connection is then closed). */
int ml__conn_write_direct(ml_conn_t *c, const char *p, size_t n) {
  if (!c->tls) return raw_write(c, p, n);
  if (c->closing && !c->lingering) return UV_EPIPE;
  int r = ml_tls_write(c->tls, p, n);
  if (r < 0) {
    ml_conn_close(c, 0);
    return r;
  }
  return tls_send(c);
}

static void out_flush(ml_server_t *s) {
  ml_conn_t *c = s->out_owner;
  size_t n = s->out_len;
  s->out_owner = NULL;
  s->out_len = 0;
  if (c && n) ml__conn_write_direct(c, s->out, n);
}

void ml__conn_flush(ml_conn_t *c) {
  if (c->srv->out_owner == c) out_flush(c->srv);
}

void ml_server_flush(ml_server_t *s) { out_flush(s); }

/* Returns room for n bytes of c's output in the staging buffer (commit them with ml__out_commit),
 * or NULL when out of memory or when writing c's staged output out failed (c is closed then).
 * The buffer never belongs to a connection that is closed: it could be freed with it still the
 * owner, and the next flush would write through a dangling pointer. */
char *ml__out_reserve(ml_server_t *s, ml_conn_t *c, size_t n) {
  if (s->out_owner != c) {
    out_flush(s);
    s->out_owner = c;
  } else if (s->out_len + n > ML_OUT_FLUSH_AT && s->out_len) {
    out_flush(s);
    if (c->closing && !c->lingering) return NULL; /* the write failed: c is closed */
    s->out_owner = c;
  }
  if (s->out_len + n > s->out_cap) {
    size_t cap = s->out_cap ? s->out_cap : 16 * 1024;
    while (cap < s->out_len + n)
      cap *= 2;
    char *p = realloc(s->out, cap);
    if (!p) return NULL;
    s->out = p;
    s->out_cap = cap;
  }
  return s->out + s->out_len;
}

void ml__out_commit(ml_server_t *s, size_t n) { s->out_len += n; }

void ml__out_append(ml_server_t *s, ml_conn_t *c, const char *p, size_t n) {
  if (n > ML_OUT_FLUSH_AT) { /* large: no copy into the staging buffer */
    ml__conn_flush(c);
    if (s->out_owner) out_flush(s);
    ml__conn_write_direct(c, p, n);
    return;
  }
  char *dst = ml__out_reserve(s, c, n);
  if (!dst) {
    ml_conn_close(c, 0);
    return;
  }
  memcpy(dst, p, n);
  s->out_len += n;
}

/* -- Ready list and prepare phase ----------------------------------------------------------- */

void ml__server_ready(ml_server_t *s, ml_conn_t *c) {
  if (c->on_ready) return;
  c->on_ready = 1;
  c->ready_next = s->ready;
  s->ready = c;
}

static void prepare_cb(uv_prepare_t *h) {
  ml_server_t *s = h->data;
  while (s->ready) {
    ml_conn_t *c = s->ready;
    s->ready = c->ready_next;
    c->on_ready = 0;
    c->ready_next = NULL;
    ml__conn_run_stash(c);
  }
  out_flush(s);
  /* last: the access log's lines of this iteration, those of the requests just run included, are
   * written before the loop waits (log_out.h) */
  if (s->log && s->log->access) ml_log_out_flush(s->log->access_out);
}

/* -- Timers ---------------------------------------------------------------------------------------
 */

/* The deadline of c's current state in loop milliseconds, or 0 when nothing times out. */
static uint64_t state_deadline(ml_conn_t *c) {
  const ml_http_limits_t *lim = &c->srv->lim;
  uint64_t send_dl =
      c->write_queue > 0 && lim->send_timeout_ms ? c->activity + lim->send_timeout_ms : 0;
  if (c->tls_closing) { /* an idle close's close_notify: a short wait (ml__conn_close_idle) */
    uint64_t dl = c->activity + ML_TLS_CLOSE_MS;
    return send_dl && send_dl < dl ? send_dl : dl;
  }
  /* upgraded, output backed up: the upper layer's deadline (a WebSocket's close or ping timeout)
   * still runs, when it comes before the send timeout (ml__conn_timeout tells which it was) */
  if (c->raw_cb && !c->lingering && c->raw_deadline && (!send_dl || c->raw_deadline < send_dl))
    return c->raw_deadline;
  if (send_dl) return send_dl;
  if (c->lingering) return c->activity + ML_LINGER_MS;
  if (c->raw_cb) return c->raw_deadline; /* upgraded: the upper layer's idle or ping deadline */
  switch (c->state) {
  case ML_CONN_HEADERS:
    return lim->header_timeout_ms ? c->header_start + lim->header_timeout_ms : 0;
  case ML_CONN_BODY:
    if (c->req_active && c->body_len >= ML_BODY_HIGH_WATER) return 0; /* our reader is slow */
    return lim->body_timeout_ms ? c->activity + lim->body_timeout_ms : 0;
  case ML_CONN_IDLE:
    if (c->req_active || c->stash_len || c->upgraded) return 0;
    /* a new connection that has sent nothing yet waits as long as a request head may take (as
     * nginx's client_header_timeout), then is closed without a response; later, keep-alive */
    if (c->nrequests == 0 && lim->header_timeout_ms) /* with none set: keep-alive's, below */
      return c->activity + lim->header_timeout_ms;
    return lim->keepalive_timeout_ms ? c->activity + lim->keepalive_timeout_ms : 0;
  default: return 0; /* the handler runs: its own waits carry their timeouts */
  }
}

/* The state's deadline, or the next look for a half-closed client's reset when that comes first
 * (ml__conn_probe). */
static uint64_t conn_deadline(ml_conn_t *c) {
  uint64_t dl = state_deadline(c);
  if (c->probing && (!dl || c->probe_at < dl)) return c->probe_at;
  return dl;
}

/* The delay to arm for deadline dl, capped at the shortest configured timeout. The timer is left
 * running across state changes, and a state entered later has a deadline at least that far away, so
 * the timer never fires after it (a connection armed for the keep-alive timeout would otherwise get
 * its header timeout only then); firing early, it re-arms for the rest. */
static uint64_t conn_delay(ml_conn_t *c, uint64_t dl, uint64_t now) {
  const ml_http_limits_t *lim = &c->srv->lim;
  const uint64_t t[] = {lim->header_timeout_ms, lim->body_timeout_ms, lim->keepalive_timeout_ms,
                        lim->send_timeout_ms};
  uint64_t d = dl > now ? dl - now : 0;
  for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
    if (t[i] && t[i] < d) d = t[i];
  return d;
}

static void conn_timer_cb(uv_timer_t *t) {
  ml_conn_t *c = t->data;
  uint64_t now = uv_now(c->srv->loop);
  uint64_t dl = conn_deadline(c);
  if (dl == 0) return; /* re-armed by the next state change */
  if (dl > now) {
    uv_timer_start(t, conn_timer_cb, conn_delay(c, dl, now), 0);
    return;
  }
  if (c->probing && dl == c->probe_at) {
    ml__conn_probe(c);
    return;
  }
  ml__conn_timeout(c);
}

void ml__conn_arm_timer(ml_conn_t *c) {
  if (c->closing && !c->lingering) return;
  if (uv_is_active((uv_handle_t *)&c->timer)) return;
  uint64_t dl = conn_deadline(c);
  if (dl == 0) return;
  uint64_t now = uv_now(c->srv->loop);
  uv_timer_start(&c->timer, conn_timer_cb, conn_delay(c, dl, now), 0);
}

/* -- Reading --------------------------------------------------------------------------------- */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  ml_conn_t *c = h->data;
  *buf = uv_buf_init(c->srv->rbuf, sizeof c->srv->rbuf);
}

/* What the client sent, in plain text (n bytes at data), or the end of its input (n < 0). flush:
 * what its requests answered goes out now (HTTPS: once after all the records of one read). */
static void on_input(ml_conn_t *c, const char *data, ssize_t n, int flush) {
  if (c->raw_cb) {                     /* upgraded: the bytes go to the upper layer */
    if (c->stash_len > c->stash_off) { /* HTTPS: behind what run_stash has yet to hand up */
      if (n > 0) {
        ml__conn_stash_input(c, data, (size_t)n);
      } else {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
        c->read_eof = 1; /* run_stash reports it after the stash */
      }
      return;
    }
    if (n < 0) {
      uv_read_stop((uv_stream_t *)&c->tcp);
      c->reading = 0;
      c->read_eof = 1;
    }
    ml__conn_raw_data(c, data, n);
    ml__conn_update_reading(c);
    ml__conn_arm_timer(c);
    return;
  }
  if (n < 0) {
    if (n == UV_EOF) {
      ml__conn_on_eof(c);
    } else {
      ml_conn_close(c, 0);
    }
    return;
  }
  if (c->stash_len > c->stash_off || (c->req_active && c->state == ML_CONN_DONE_READ)) {
    ml__conn_stash_input(c, data, (size_t)n); /* behind the request being handled */
  } else {
    ml__conn_feed(c, data, (size_t)n);
  }
  /* what the input's requests answered at once goes out now, not when the next connection's
   * response takes the staging buffer: the client waits one request less (p99) */
  if (flush) ml__conn_flush(c);
  ml__conn_update_reading(c);
  ml__conn_arm_timer(c);
}

/* Whether the first bytes a client sent to the HTTPS port are a plain-HTTP request: a method token
 * (RFC 9110 5.6.2; a letter first, which no TLS record's type byte is) up to a space or the end of
 * this read. A TLS handshake record begins with 0x16. */
static int plain_http(const char *p, size_t n) {
  static const char tchars[] = "!#$%&'*+-.^_`|~";
  if (n == 0 || !isalpha((unsigned char)p[0])) return 0;
  size_t i = 1;
  while (i < n && i < 32 && (isalnum((unsigned char)p[i]) || (p[i] && strchr(tchars, p[i]))))
    i++;
  return i == n || p[i] == ' ';
}

/* A plain-HTTP request on the HTTPS port: answered as nginx answers it, a 400 "The plain HTTP
 * request was sent to HTTPS port", in plain text since the client speaks no TLS, and closed. The
 * connection's TLS session goes first, so the answer is written as it is. */
static void plain_on_tls(ml_conn_t *c, const char *buf, size_t n) {
  ml_tls_free(c->tls);
  c->tls = NULL;
  const char *end = buf;
  while (end < buf + n && *end != '\r' && *end != '\n')
    end++;
  c->bad_line = buf; /* the access log's request line, as for a line llhttp refused */
  c->bad_line_len = (size_t)(end - buf);
  ml__conn_error_body(c, 400, "plain HTTP request sent to HTTPS port",
                      "The plain HTTP request was sent to HTTPS port\n");
  c->bad_line = NULL;
}

/* HTTPS: n bytes of ciphertext in the read buffer. They go into the TLS session, which advances
 * the handshake and then gives the plain text, decrypted into the same buffer (the session holds
 * its own copy of the ciphertext): all of it, at once, so that none waits inside the session
 * while reading is paused. A failed handshake (a client that speaks no TLS, an untrusted
 * certificate on the client's side) closes the connection, logged at debug level (a client
 * certificate that does not verify: info); a plain-HTTP request is answered first
 * (plain_on_tls). */
static void tls_input(ml_conn_t *c, size_t n) {
  char *buf = c->srv->rbuf;
  if (!c->tls_fed) {
    c->tls_fed = 1;
    if ((unsigned char)buf[0] != 0x16 && plain_http(buf, n)) {
      plain_on_tls(c, buf, n);
      return;
    }
  }
  if (ml_tls_feed(c->tls, buf, n) < 0) {
    ml_conn_close(c, 0);
    return;
  }
  if (!c->tls_ready) {
    int r = ml_tls_handshake(c->tls);
    if (tls_send(c) < 0) return;
    if (r < 0) {
      char peer[64];
      ml_conn_peer(c, peer, sizeof peer);
      /* a client certificate that does not verify is the operator's business (nginx: info) */
      const char *e = ml_tls_error(c->tls);
      ml_log(c->srv->log, strcmp(e, "tls: certificate verify failed") ? ML_LOG_DEBUG : ML_LOG_INFO,
             "%s: %s (%s)", peer, e, ml_tls_detail(c->tls));
      ml_conn_close(c, 0);
      return;
    }
    if (r == 0) {
      ml__conn_arm_timer(c);
      return;
    }
    c->tls_ready = 1;
  }
  for (;;) {
    int m = ml_tls_read(c->tls, buf, ML_READ_BUF_SIZE);
    if (m == 0) break;
    if (m < 0 && m != UV_EOF) { /* a broken record: nothing after it can be trusted */
      tls_send(c);              /* the alert OpenSSL made of it, best effort */
      ml_conn_close(c, 0);
      return;
    }
    if (m > 0) c->activity = uv_now(c->srv->loop);
    if (m == UV_EOF && c->reading) { /* unlike a FIN, libuv would go on reading */
      uv_read_stop((uv_stream_t *)&c->tcp);
      c->reading = 0;
    }
    on_input(c, buf, m, 0); /* UV_EOF: the client's close_notify, an end of input like a FIN */
    if (c->closing) return; /* (a graceful close flushed what was staged) */
    if (m < 0) break;
  }
  ml__conn_flush(c);            /* the answers to every record of this read, in one TLS write */
  if (!c->closing) tls_send(c); /* what the session answers by itself (a TLS 1.3 key update) */
  if (!c->closing) ml__conn_arm_timer(c);
}

static void read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  ml_conn_t *c = st->data;
  (void)buf;
  if (n == 0) return;
  if (c->lingering) { /* input is dropped; the linger deadline does not move (see conn_deadline) */
    if (n < 0) ml_conn_close(c, 0);
    return;
  }
  if (c->tls && n > 0) { /* ciphertext alone (a handshake, a partial record) moves no deadline */
    tls_input(c, (size_t)n);
    return;
  }
  c->activity = uv_now(c->srv->loop);
  on_input(c, c->srv->rbuf, n, 1);
}

/* Reads while the connection can take input: not while a finished message waits for its handler,
 * not while too much body is unread, never after EOF or an upgrade. */
void ml__conn_update_reading(ml_conn_t *c) {
  int want;
  if (c->lingering) {
    want = !c->read_eof;
  } else if (c->raw_cb) {
    want = !c->closing && !c->read_eof && c->stash_len == 0 && !c->raw_paused;
  } else {
    /* Reading goes on while a handler runs (what arrives is stashed behind its request, up to
     * ML_STASH_MAX): stopping and restarting costs two epoll_ctl per request. */
    want = !c->closing && !c->read_eof && !c->upgraded &&
           c->stash_len - c->stash_off < ML_STASH_MAX &&
           !(c->req_active && c->body_len >= ML_BODY_HIGH_WATER);
  }
  if (want && !c->reading) {
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb) == 0) c->reading = 1;
  } else if (!want && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
}

/* -- Accepting -------------------------------------------------------------------------------- */

static void conn_handle_closed(uv_handle_t *h) {
  ml_conn_t *c = h->data;
  c->open_handles--;
  ml__conn_maybe_free(c);
}

/* Frees c once both handles are closed and no file transfer is in flight; on_close runs first. */
void ml__conn_maybe_free(ml_conn_t *c) {
  if (c->open_handles > 0 || c->pending_ops > 0) return;
  ml_server_t *s = c->srv;
  if (!c->notified) {
    c->notified = 1;
    if (c->raw_cb) {
      if (c->raw_cb->on_close) c->raw_cb->on_close(c, c->raw_ud);
    } else if (c->data && s->cb.on_close) {
      s->cb.on_close(c, s->ud);
    }
  }
  ml__server_conn_gone(s, c);
}

static void reject_closed(uv_handle_t *h) { free(h); }

static void on_connection(uv_stream_t *ls, int status) {
  ml_server_t *s = ls->data;
  if (status < 0) {
    ml_log(s->log, ML_LOG_WARN, "accept: %s", uv_strerror(status));
    return;
  }
  if (s->draining || s->closing) return;
  int is_unix = ls->type == UV_NAMED_PIPE;
  if (s->nconns >= s->lim.max_conns) {
    ml_listener_t *t = malloc(sizeof *t); /* (a union of both handle types) */
    if (!t) return;
    ml_stream_init(s->loop, t, is_unix);
    if (uv_accept(ls, (uv_stream_t *)t) == 0) {
      s->accepted++;
      ml_log(s->log, ML_LOG_WARN, "max_conns (%u) reached: connection refused", s->lim.max_conns);
    }
    uv_close((uv_handle_t *)t, reject_closed);
    return;
  }
  ml_conn_t *c = calloc(1, sizeof *c);
  if (!c) return;
  c->srv = s;
  ml_stream_init(s->loop, &c->tcp, is_unix);
  uv_timer_init(s->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  s->open_handles++;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
    ml_conn_close(c, 0);
    return;
  }
  s->accepted++;
  s->handled++;
  if (s->tls && ml_tls_new(&c->tls, s->tls, NULL) < 0) {
    ml_conn_close(c, 0);
    return;
  }
  c->counted = 1;
  s->nconns++;
  if (!is_unix) uv_tcp_nodelay(&c->tcp, 1);
  c->activity = uv_now(s->loop);
  ml__conn_start(c);
  ml__conn_update_reading(c);
  ml__conn_arm_timer(c);
}

/* -- Server ------------------------------------------------------------------------------------ */

ml_server_t *ml_server_new(uv_loop_t *loop, const ml_http_limits_t *lim, const ml_log_t *log,
                           const ml_http_callbacks_t *cb, void *ud) {
  ml_server_t *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->loop = loop;
  if (lim) {
    s->lim = *lim;
  } else {
    ml_http_limits_default(&s->lim);
  }
  s->log = log;
  s->cb = *cb;
  s->ud = ud;
  ml__conn_init_settings(&s->settings);
  uv_prepare_init(loop, &s->prepare);
  s->prepare.data = s;
  uv_prepare_start(&s->prepare, prepare_cb);
  uv_unref((uv_handle_t *)&s->prepare);
  uv_timer_init(loop, &s->grace_timer);
  s->grace_timer.data = s;
  uv_unref((uv_handle_t *)&s->grace_timer);
  s->open_handles = 2;
  return s;
}

ml_http_limits_t *ml_server_limits(ml_server_t *s) { return &s->lim; }

void ml_server_set_tls(ml_server_t *s, ml_tls_ctx_t *ctx) {
  ml_tls_ctx_free(s->tls);
  s->tls = ctx;
}

int ml_conn_is_tls(const ml_conn_t *c) { return c->tls != NULL; }

struct ml_tls_s *ml_conn_tls(const ml_conn_t *c) {
  return c->tls;
}
unsigned ml_server_conn_count(const ml_server_t *s) { return s->nconns; }

void ml_server_stats_add(const ml_server_t *s, ml_server_stats_t *st) {
  st->accepted += s->accepted;
  st->handled += s->handled;
  st->requests += s->requests;
  for (const ml_conn_t *c = s->conns; c; c = c->next) {
    if (!c->counted) continue;
    st->active++;
    if (c->state == ML_CONN_HEADERS && !c->req_active)
      st->reading++; /* a request head coming in */
    else if (c->state == ML_CONN_IDLE && !c->req_active && !c->upgraded && c->write_queue == 0)
      st->waiting++; /* idle keep-alive */
    else
      st->writing++; /* a request in progress, its body still coming in included */
  }
}

static void listener_closed(uv_handle_t *h) {
  ml_server_t *s = h->data;
  ml_listener_t *l = (ml_listener_t *)h;
  free(l->path);
  free(l);
  s->open_handles--;
  if (s->open_handles == 0 && s->done_cb) s->done_cb(s, s->done_ud);
}

int ml_server_listen(ml_server_t *s, const char *host, int port, int backlog) {
  struct sockaddr_storage addr;
  int r;
  if (s->nlisteners >= ML_MAX_LISTENERS) return UV_ENOSPC;
  if (strchr(host, ':')) {
    r = uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr);
  } else {
    r = uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
  }
  if (r < 0) return r;
  ml_listener_t *t = calloc(1, sizeof *t);
  if (!t) return UV_ENOMEM;
  uv_tcp_init(s->loop, &t->tcp);
  t->tcp.data = s;
  s->open_handles++;
  r = ml_listen_tcp(&t->tcp, (struct sockaddr *)&addr, s->reuseport, backlog, on_connection);
  if (r < 0) {
    uv_close((uv_handle_t *)t, listener_closed);
    return r;
  }
  s->listeners[s->nlisteners++] = t;
  return 0;
}

int ml_server_listen_unix(ml_server_t *s, const char *path, int backlog, int mode) {
  if (s->nlisteners >= ML_MAX_LISTENERS) return UV_ENOSPC;
  ml_listener_t *t = calloc(1, sizeof *t);
  if (!t) return UV_ENOMEM;
  if (!(t->path = strdup(path))) {
    free(t);
    return UV_ENOMEM;
  }
  uv_pipe_init(s->loop, &t->pipe, 0);
  t->pipe.data = s;
  s->open_handles++;
  int r = ml_listen_unix(&t->pipe, path, backlog, mode, on_connection, &t->id);
  if (r < 0) { /* (what ml_listen_unix made, it removed: t->id names no file) */
    uv_close((uv_handle_t *)t, listener_closed);
    return r;
  }
  s->listeners[s->nlisteners++] = t;
  return 0;
}

int ml_server_listen_unix_fd(ml_server_t *s, int fd) {
  if (s->nlisteners >= ML_MAX_LISTENERS) return UV_ENOSPC;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0); /* (a dup would leak into moonlet.process children) */
  if (copy < 0) return -errno;
  ml_listener_t *t = calloc(1, sizeof *t);
  if (!t) {
    close(copy);
    return UV_ENOMEM;
  }
  uv_pipe_init(s->loop, &t->pipe, 0);
  t->pipe.data = s;
  s->open_handles++;
  int r = uv_pipe_open(&t->pipe, copy); /* the handle owns copy from here (closed with it) */
  if (r < 0) close(copy);
  if (r == 0) r = uv_listen((uv_stream_t *)&t->pipe, 511, on_connection);
  if (r < 0) {
    uv_close((uv_handle_t *)t, listener_closed);
    return r;
  }
  s->listeners[s->nlisteners++] = t;
  return 0;
}

void ml_server_set_reuseport(ml_server_t *s, int on) { s->reuseport = on; }

int ml_server_port(const ml_server_t *s, int index) {
  if (index < 0 || index >= s->nlisteners) return UV_EINVAL;
  if (s->listeners[index]->tcp.type == UV_NAMED_PIPE) return 0;
  struct sockaddr_storage addr;
  int len = sizeof addr;
  int r = uv_tcp_getsockname(&s->listeners[index]->tcp, (struct sockaddr *)&addr, &len);
  if (r < 0) return r;
  if (addr.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);
  return ntohs(((struct sockaddr_in *)&addr)->sin_port);
}

static void server_handle_closed(uv_handle_t *h) {
  ml_server_t *s = h->data;
  s->open_handles--;
  if (s->open_handles == 0 && s->done_cb) s->done_cb(s, s->done_ud);
}

void ml__server_conn_gone(ml_server_t *s, ml_conn_t *c) {
  if (s->out_owner == c) { /* (ml__out_reserve keeps it from happening: never flush for c now) */
    s->out_owner = NULL;
    s->out_len = 0;
  }
  if (c->rb) ml__reqbuf_put(s, c->rb);
  ml_tls_free(c->tls);
  free(c->body);
  free(c->stash);
  free(c->peer_name);
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  if (c->counted) s->nconns--;
  free(c);
  s->open_handles--;
  if (s->draining && !s->closing && s->nconns == 0 && s->conns == NULL) {
    ml_server_close(s, s->done_cb, s->done_ud);
    return;
  }
  if (s->open_handles == 0 && s->done_cb) s->done_cb(s, s->done_ud);
}

static void close_listeners(ml_server_t *s) {
  for (int i = 0; i < s->nlisteners; i++) {
    ml_listener_t *l = s->listeners[i];
    ml_listen_unix_unlink(l->path, &l->id); /* at once: a new server may take the path now */
    uv_close((uv_handle_t *)l, listener_closed);
  }
  s->nlisteners = 0;
}

void ml_server_close(ml_server_t *s, void (*done)(ml_server_t *, void *), void *ud) {
  if (s->closing) return;
  s->closing = 1;
  s->done_cb = done;
  s->done_ud = ud;
  out_flush(s);
  close_listeners(s);
  for (ml_conn_t *c = s->conns; c; c = c->next)
    ml_conn_close(c, 0);
  uv_close((uv_handle_t *)&s->prepare, server_handle_closed);
  uv_close((uv_handle_t *)&s->grace_timer, server_handle_closed);
}

static void grace_cb(uv_timer_t *t) {
  ml_server_t *s = t->data;
  if (s->nconns)
    ml_log(s->log, ML_LOG_WARN, "shutdown: grace time over, closing %u connection(s)", s->nconns);
  ml_server_close(s, s->done_cb, s->done_ud);
}

void ml_server_shutdown(ml_server_t *s, void (*done)(ml_server_t *, void *), void *ud) {
  s->done_cb = done;
  s->done_ud = ud;
  if (s->draining || s->closing) return;
  s->draining = 1;
  close_listeners(s);
  ml_conn_t *next;
  for (ml_conn_t *c = s->conns; c; c = next) {
    next = c->next;
    if (c->raw_cb) { /* upgraded: the upper layer closes it its own way (a close frame) */
      if (!c->closing && c->raw_cb->on_shutdown) c->raw_cb->on_shutdown(c, c->raw_ud);
    } else if (!c->req_active) {
      /* an idle keep-alive connection closes at once, as nginx's do: no lingering (which would
       * hold the exit up to ML_LINGER_MS for a client that keeps its side open), at the risk of a
       * reset for a request racing in; one with a request partly read, output not yet written or
       * a lingering close under way goes on as it is */
      int idle = c->state == ML_CONN_IDLE && !c->closing && c->stash_len == c->stash_off &&
                 c->write_queue == 0 && s->out_owner != c;
      if (idle)
        ml__conn_close_idle(c);
      else
        ml_conn_close(c, 1);
    } else {
      c->close_after = 1;
    }
  }
  if (s->nconns == 0 && s->conns == NULL) {
    ml_server_close(s, done, ud);
    return;
  }
  uv_ref((uv_handle_t *)&s->grace_timer);
  uv_timer_start(&s->grace_timer, grace_cb, s->lim.shutdown_grace_ms, 0);
}

void ml_server_free(ml_server_t *s) {
  while (s->free_rb) {
    ml_reqbuf_t *rb = s->free_rb;
    s->free_rb = rb->next;
    free(rb);
  }
  free(s->out);
  free(s->tls_out);
  ml_tls_ctx_free(s->tls);
  free(s);
}

/* -- Closing a connection ------------------------------------------------------------------ */

static void shutdown_cb(uv_shutdown_t *req, int status) {
  ml_conn_t *c = req->data;
  free(req);
  if (status < 0 || c->read_eof || c->tls_closing) { /* (an idle close does not linger) */
    ml_conn_close(c, 0);
    return;
  }
  c->activity = uv_now(c->srv->loop);
  ml__conn_update_reading(c);
  uv_timer_stop(&c->timer);
  ml__conn_arm_timer(c);
}

static void close_handles(ml_conn_t *c) {
  if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
  if (!uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
  if (!uv_is_closing((uv_handle_t *)&c->timer))
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
}

/* An HTTPS connection closed while idle (keep-alive timeout, a graceful stop) says close_notify
 * first. Nothing else is queued then, but the socket's buffer may be full (the client has not
 * read the last response yet): what the socket does not take at once is queued, and the
 * connection closes once it went out (uv_shutdown's callback), after ML_TLS_CLOSE_MS at most (as
 * nginx's ngx_ssl_shutdown waits 3 s), with no lingering read: a cut close_notify record would make
 * the client see a broken connection instead of a whole one. One closed on an error or in the
 * middle of a response says no close_notify: it would pass a cut response off as a whole one. */
void ml__conn_close_idle(ml_conn_t *c) {
  if (c->tls && c->tls_ready && !c->closing && c->write_queue == 0 &&
      c->stash_len == c->stash_off && c->srv->out_owner != c &&
      uv_is_writable((uv_stream_t *)&c->tcp)) {
    ml_tls_shutdown(c->tls);
    if (tls_send(c) < 0) return; /* (it closed c) */
    if (c->write_queue > 0) {
      c->tls_closing = 1;
      ml_conn_close(c, 1);
      return;
    }
  }
  ml_conn_close(c, 0);
}

void ml_conn_close(ml_conn_t *c, int graceful) {
  if (c->closing) {
    if (!graceful && c->lingering) {
      c->lingering = 0;
      close_handles(c);
    }
    return;
  }
  c->closing = 1;
  if (c->on_ready) { /* unlink from the ready list */
    ml_conn_t **pp = &c->srv->ready;
    while (*pp && *pp != c)
      pp = &(*pp)->ready_next;
    if (*pp) *pp = c->ready_next;
    c->on_ready = 0;
  }
  if (graceful && uv_is_writable((uv_stream_t *)&c->tcp)) {
    c->lingering = 1;
    ml__conn_flush(c);
    if (c->tls && c->lingering && c->tls_ready && !c->tls_closing) { /* HTTPS: close_notify */
      ml_tls_shutdown(c->tls);
      tls_send(c);
    }
    if (!c->closing || !c->lingering) return; /* the flush failed and closed it */
    uv_shutdown_t *req = malloc(sizeof *req);
    if (req) {
      req->data = c;
      if (uv_shutdown(req, (uv_stream_t *)&c->tcp, shutdown_cb) == 0) {
        uv_timer_stop(&c->timer);
        c->activity = uv_now(c->srv->loop);
        ml__conn_arm_timer(c);
        return;
      }
      free(req);
    }
    c->lingering = 0;
  } else if (c->srv->out_owner == c) {
    c->srv->out_owner = NULL;
    c->srv->out_len = 0;
  }
  c->lingering = 0;
  close_handles(c);
}

int ml_conn_is_closing(const ml_conn_t *c) { return c->closing; }
