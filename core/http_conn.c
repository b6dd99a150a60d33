/* core/http_conn.c: the request cycle of a connection: llhttp callbacks, limits, smuggling checks,
 * pipelining, request bodies and ml_conn_finish.
 *
 * Invariants:
 * - llhttp callbacks only copy and count; they never call the upper layer. The parser pauses at the
 *   end of the headers and at the end of the message, and conn_feed acts on those events after
 *   llhttp_execute has returned, so the upper layer never runs inside the parser.
 * - The request line and headers are copied once, into the connection's pooled request buffer; the
 *   ml_request_t the upper layer sees points there until ml_conn_finish.
 * - Once a message is complete and its handler still runs, the rest of the input is stashed (and
 *   what arrives meanwhile is appended, up to ML_STASH_MAX, then reading pauses): the next request
 *   is parsed only after ml_conn_finish, so responses stay in order. An EOF behind stashed requests
 *   waits until they have run.
 * - Lenient parsing is never enabled: llhttp's strict defaults refuse what request smuggling needs.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "http_internal.h"

enum { PAUSE_NONE = 0, PAUSE_HEADERS, PAUSE_MESSAGE };

static ml_conn_t *conn_of(llhttp_t *p) { return p->data; }

/* -- Copying the request ------------------------------------------------------------------- */

static int rb_append(ml_conn_t *c, const char *at, size_t len, int lower) {
  ml_reqbuf_t *rb = c->rb;
  if (rb->len + len + 1 > rb->cap) {
    c->error_status = 431;
    llhttp_set_error_reason(&c->parser, "request header section too large");
    return HPE_USER;
  }
  char *dst = rb->data + rb->len;
  if (lower) {
    for (size_t i = 0; i < len; i++) {
      unsigned char ch = (unsigned char)at[i];
      dst[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
    }
  } else {
    memcpy(dst, at, len);
  }
  rb->len += len;
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  ml_conn_t *c = conn_of(p);
  if (!c->rb) c->rb = ml__reqbuf_get(c->srv);
  if (!c->rb) return -1;
  c->rb->len = 0;
  memset(&c->req, 0, sizeof c->req);
  c->req.headers = c->rb->headers;
  c->req.content_length = -1;
  c->cur = NULL;
  c->host_count = 0;
  c->error_status = 0;
  c->body_total = 0;
  c->state = ML_CONN_HEADERS;
  c->line_done = 0;
  c->header_start = uv_now(c->srv->loop);
  c->srv->requests++; /* as nginx counts them: one refused for its head (400, 414, 431) too */
  return 0;
}

static int on_method(llhttp_t *p, const char *at, size_t len) {
  ml_conn_t *c = conn_of(p);
  if (c->req.method_len == 0) c->req.method = c->rb->data + c->rb->len;
  c->req.method_len += (uint32_t)len;
  return rb_append(c, at, len, 0);
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  ml_conn_t *c = conn_of(p);
  if (c->req.target_len == 0 && at - c->feed_start >= 2 && at[-2] == ' ') {
    llhttp_set_error_reason(p, "more than one space before the request-target");
    return HPE_USER;
  }
  if (c->req.target_len == 0) c->req.target = c->rb->data + c->rb->len;
  if (c->req.target_len + len > c->srv->lim.max_uri) {
    c->error_status = 414;
    llhttp_set_error_reason(p, "request-target too long");
    return HPE_USER;
  }
  c->req.target_len += (uint32_t)len;
  return rb_append(c, at, len, 0);
}

static int on_version_complete(llhttp_t *p) {
  conn_of(p)->line_done = 1;
  return 0;
}

/* Copies header bytes, refusing past max_header_bytes: it counts the request line (method and
 * target) and the header names and values, which is what the request buffer holds. */
static int header_append(ml_conn_t *c, const char *at, size_t len, int lower) {
  if (c->rb->len + len > c->srv->lim.max_header_bytes) {
    c->error_status = 431;
    llhttp_set_error_reason(&c->parser, "request header section too large");
    return HPE_USER;
  }
  return rb_append(c, at, len, lower);
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  ml_conn_t *c = conn_of(p);
  /* a trailer of a chunked body counts against the limit but never joins the headers, which the
   * handler may already have read (RFC 9110 6.5.1) */
  if (c->state != ML_CONN_HEADERS) return header_append(c, at, len, 0);
  if (!c->cur || c->cur->value) { /* a new header begins */
    if (c->req.nheaders >= c->srv->lim.max_headers) {
      c->error_status = 431;
      llhttp_set_error_reason(p, "too many headers");
      return HPE_USER;
    }
    c->cur = &c->req.headers[c->req.nheaders++];
    c->cur->name = c->rb->data + c->rb->len;
    c->cur->name_len = 0;
    c->cur->value = NULL;
    c->cur->value_len = 0;
  }
  c->cur->name_len += (uint32_t)len;
  return header_append(c, at, len, 1);
}

/* The byte before `at` in the input, or the last byte of the previous read when `at` starts it. */
static char byte_before(const ml_conn_t *c, const char *at) {
  return at > c->feed_start ? at[-1] : c->last_byte;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  ml_conn_t *c = conn_of(p);
  if (c->state != ML_CONN_HEADERS) return header_append(c, at, len, 0); /* a trailer */
  if (!c->cur) return -1;
  if (c->cur->value_len > 0 && byte_before(c, at) == '\n') {
    /* llhttp joins obs-fold continuation lines; RFC 9112 lets a server refuse them, and we do */
    llhttp_set_error_reason(p, "obsolete line folding");
    return HPE_USER;
  }
  if (!c->cur->value) c->cur->value = c->rb->data + c->rb->len;
  c->cur->value_len += (uint32_t)len;
  return header_append(c, at, len, 0);
}

static int name_is(const ml_header_t *h, const char *lit, size_t n) {
  return h->name_len == n && memcmp(h->name, lit, n) == 0;
}

static int value_has_token(const ml_header_t *h, const char *tok, size_t n) {
  const char *v = h->value, *end = h->value + h->value_len;
  while (v < end) {
    while (v < end && (*v == ' ' || *v == '\t' || *v == ','))
      v++;
    const char *s = v;
    while (v < end && *v != ',')
      v++;
    const char *e = v;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
      e--;
    if ((size_t)(e - s) == n) {
      size_t i = 0;
      while (i < n && (s[i] | 0x20) == tok[i])
        i++;
      if (i == n) return 1;
    }
  }
  return 0;
}

/* A Host value as nginx's ngx_http_validate_host takes it: not empty, no "..", no "/", no control
 * byte or space (a name, an IPv4 address or an [IPv6] literal, with a port or not). */
static int valid_host(const char *v, size_t n) {
  size_t host_len = n, dot = (size_t)-2;
  int rest = 0, literal = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)v[i];
    if (ch == '.') {
      if (dot + 1 == i) return 0;
      dot = i;
    } else if (ch == ':') {
      if (!rest && !literal) {
        host_len = i;
        rest = 1;
      }
    } else if (ch == '[') {
      if (i == 0) literal = 1;
    } else if (ch == ']') {
      if (literal && !rest) {
        host_len = i + 1;
        rest = 1;
        literal = 0;
      }
    } else if (ch == '/' || ch == '\\' || ch <= 0x20 || ch == 0x7f) {
      return 0;
    }
  }
  if (host_len && dot == host_len - 1) host_len--; /* "example.com." */
  return host_len > 0;
}

static int on_header_value_complete(llhttp_t *p) {
  ml_conn_t *c = conn_of(p);
  ml_header_t *h = c->cur;
  if (!h || c->state != ML_CONN_HEADERS) return 0;
  if (!h->value) h->value = c->rb->data + c->rb->len; /* empty value */
  while (h->value_len && (h->value[h->value_len - 1] == ' ' || h->value[h->value_len - 1] == '\t'))
    h->value_len--;
  if (name_is(h, "host", 4)) {
    if (!valid_host(h->value, h->value_len)) {
      llhttp_set_error_reason(p, "invalid Host header");
      return HPE_USER;
    }
    c->host_count++;
  }
  if (name_is(h, "expect", 6) && value_has_token(h, "100-continue", 12)) c->req.expect_continue = 1;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  ml_conn_t *c = conn_of(p);
  c->req.http_major = p->http_major;
  c->req.http_minor = p->http_minor;
  c->req.keep_alive = (uint8_t)llhttp_should_keep_alive(p);
  c->req.is_head = p->method == HTTP_HEAD;
  /* an HTTP/1.0 client's Expect: 100-continue is ignored (RFC 9110 10.1.1): it sends its body */
  if (p->http_major == 1 && p->http_minor == 0) c->req.expect_continue = 0;
  if (p->flags & F_CHUNKED) {
    c->req.has_body = 1;
  } else if (p->flags & F_CONTENT_LENGTH) {
    c->req.content_length = (int64_t)p->content_length;
    c->req.has_body = p->content_length > 0;
  }
  if (c->srv->log && c->srv->log->access) c->req.started_ns = uv_hrtime(); /* for the access log */
  /* Without a body the message is complete now; llhttp's on_message_complete for it comes with the
   * next execute (we paused here) and is skipped. */
  c->state = c->req.has_body ? ML_CONN_BODY : ML_CONN_DONE_READ;
  c->skip_complete = !c->req.has_body;
  c->pause = PAUSE_HEADERS;
  return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  ml_conn_t *c = conn_of(p);
  c->body_total += len;
  if (c->body_total > c->srv->lim.max_body) {
    c->error_status = 413;
    llhttp_set_error_reason(p, "request body too large");
    return HPE_USER;
  }
  if (!c->req_active) return 0; /* the handler is done: the rest of the body is dropped */
  if (c->body_len + len > c->body_cap) {
    size_t cap = c->body_cap ? c->body_cap : 16 * 1024;
    while (cap < c->body_len + len)
      cap *= 2;
    char *b = realloc(c->body, cap);
    if (!b) return -1;
    c->body = b;
    c->body_cap = cap;
  }
  memcpy(c->body + c->body_len, at, len);
  c->body_len += len;
  c->body_event = 1;
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  ml_conn_t *c = conn_of(p);
  if (c->skip_complete) {
    c->skip_complete = 0;
    return 0;
  }
  c->state = ML_CONN_DONE_READ;
  c->body_event = 1;
  c->pause = PAUSE_MESSAGE;
  return HPE_PAUSED;
}

void ml__conn_init_settings(llhttp_settings_t *st) {
  llhttp_settings_init(st);
  st->on_message_begin = on_message_begin;
  st->on_method = on_method;
  st->on_url = on_url;
  st->on_version_complete = on_version_complete;
  st->on_header_field = on_header_field;
  st->on_header_value = on_header_value;
  st->on_header_value_complete = on_header_value_complete;
  st->on_headers_complete = on_headers_complete;
  st->on_body = on_body;
  st->on_message_complete = on_message_complete;
}

void ml__conn_start(ml_conn_t *c) {
  llhttp_init(&c->parser, HTTP_REQUEST, &c->srv->settings);
  c->parser.data = c;
  c->stream_left = -1;
}

/* -- Request lifecycle --------------------------------------------------------------------- */

/* Frees what the finished request held and readies the connection for the next one. */
static void request_reset(ml_conn_t *c) {
  if (c->rb) {
    ml__reqbuf_put(c->srv, c->rb);
    c->rb = NULL;
  }
  free(c->body);
  c->body = NULL;
  c->body_len = c->body_cap = 0;
  c->cur = NULL;
  c->req.is_head = 0; /* an error answered before the next request begins has a body */
  c->resp_started = c->resp_done = c->resp_chunked = c->resp_no_body = 0;
  c->continue_sent = c->body_error = c->body_event = c->want_writable = 0;
  c->stream_left = -1;
  c->probing = 0; /* (before a next message's header_start takes probe_at's place) */
  c->state = ML_CONN_IDLE;
}

static void deliver_body(ml_conn_t *c) {
  if (c->body_event && c->req_active) {
    c->body_event = 0;
    c->srv->cb.on_body(c, c->srv->ud);
  }
}

/* Whether every Transfer-Encoding header of r says "chunked" alone (the one coding we decode). */
static int only_chunked(const ml_request_t *r) {
  for (unsigned i = 0; i < r->nheaders; i++) {
    const ml_header_t *h = &r->headers[i];
    if (!name_is(h, "transfer-encoding", 17)) continue;
    if (h->value_len != 7) return 0;
    for (size_t k = 0; k < 7; k++)
      if ((h->value[k] | 0x20) != "chunked"[k]) return 0;
  }
  return 1;
}

/* Takes the request whose headers just completed: refuses what must be refused, else hands it to
 * the upper layer. */
static void dispatch(ml_conn_t *c) {
  ml_request_t *r = &c->req;
  if (r->http_major != 1) { /* llhttp takes "GET /" as HTTP/0.9 and parses "HTTP/2.0" */
    ml__conn_error(c, r->http_major ? 505 : 400, "unsupported HTTP version");
    return;
  }
  if ((c->parser.flags & F_TRANSFER_ENCODING) &&
      (!(c->parser.flags & F_CHUNKED) || r->http_minor == 0)) {
    /* RFC 9112 6.3: without chunked last the body length is unknown (llhttp 8 takes "identity" as
     * no body); 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing */
    ml__conn_error(c, 400, "Transfer-Encoding without chunked, or in HTTP/1.0");
    return;
  }
  if ((c->parser.flags & F_TRANSFER_ENCODING) && !only_chunked(r)) {
    /* RFC 9112 6.1: a coding we do not decode (gzip, chunked) is 501, as nginx answers */
    ml__conn_error(c, 501, "unsupported transfer coding");
    return;
  }
  if (r->http_major == 1 && r->http_minor == 1 && c->host_count != 1) {
    ml__conn_error(c, 400, c->host_count ? "repeated Host header" : "missing Host header");
    return;
  }
  if (c->host_count > 1) {
    ml__conn_error(c, 400, "repeated Host header");
    return;
  }
  if (r->content_length > 0 && (uint64_t)r->content_length > c->srv->lim.max_body) {
    ml__conn_error(c, 413, "request body too large");
    return;
  }
  if (c->parser.method == HTTP_CONNECT) c->close_after = 1; /* what follows is a tunnel's */
  c->req_active = 1;
  c->srv->cb.on_request(c, c->srv->ud);
}

/* Keeps input for later: data inside the stash only moves the offset; other data is appended after
 * what the stash still holds (input read while a handler runs, behind the pipelined requests). */
static void stash(ml_conn_t *c, const char *data, size_t len) {
  if (len == 0) return;
  if (c->stash && data >= c->stash && data < c->stash + c->stash_len) { /* already ours */
    c->stash_off = (size_t)(data - c->stash);
    return;
  }
  size_t keep = c->stash ? c->stash_len - c->stash_off : 0;
  char *s = malloc(keep + len);
  if (!s) {
    ml_conn_close(c, 0);
    return;
  }
  if (keep) memcpy(s, c->stash + c->stash_off, keep);
  memcpy(s + keep, data, len);
  free(c->stash);
  c->stash = s;
  c->stash_len = keep + len;
  c->stash_off = 0;
}

void ml__conn_stash_input(ml_conn_t *c, const char *data, size_t len) { stash(c, data, len); }

static void stash_clear(ml_conn_t *c) {
  free(c->stash);
  c->stash = NULL;
  c->stash_len = c->stash_off = 0;
}

/* Line ends llhttp 8 lets through even in strict mode (llhttp 9 refuses them), and parsers that
 * disagree on line ends are how requests are smuggled: a bare LF (no CR before it) before or after
 * the request line, as the empty line that ends the header section or the trailers, and a folded
 * line (starting with SP or HTAB) after an empty header value. p[0..n) is what llhttp just consumed
 * and `before` the byte before it. Returns why the request is refused, or NULL. */
static const char *bad_line_end(ml_conn_t *c, int in_head, const char *p, size_t n, char before) {
  if (in_head) {
    const char *lf, *end = p + n;
    if (n && before == '\n' && (p[0] == ' ' || p[0] == '\t')) return "obsolete line folding";
    for (const char *q = p; (lf = memchr(q, '\n', (size_t)(end - q))) != NULL; q = lf + 1) {
      if ((lf > p ? lf[-1] : before) != '\r') return "bare LF in the request head";
      if (lf + 1 < end && (lf[1] == ' ' || lf[1] == '\t')) return "obsolete line folding";
    }
  } else if (c->pause == PAUSE_MESSAGE && c->req.content_length < 0 && n > 0) {
    if ((n >= 2 ? p[n - 2] : before) != '\r') return "bare LF ending the chunked body";
  }
  return NULL;
}

/* For the access log of a request whose line llhttp refused (an unknown method, a TLS hello on the
 * plain port, a URI too long): its bytes as sent, as nginx's $request shows them. They are those
 * of the line the error is in, from its start in this input (after the last LF before the error)
 * to the first CR or LF; a line begun in an earlier read shows its part in this one. */
static void raw_request_line(ml_conn_t *c, const char *data, size_t len, const char *err_pos) {
  if (!err_pos || err_pos < data || err_pos > data + len) return;
  const char *start = err_pos;
  while (start > data && start[-1] != '\n')
    start--;
  const char *end = start;
  while (end < data + len && *end != '\r' && *end != '\n')
    end++;
  c->bad_line = start;
  c->bad_line_len = (size_t)(end - start);
}

/* Whether a request line llhttp refused for its method is well-formed all the same, with a method
 * llhttp does not know: `token SP target SP HTTP/d.d` (RFC 9112 3). RFC 9110 9.1: a method the
 * server does not implement gets 501, not 400 (nginx would pass any token to its handlers; llhttp
 * knows a fixed set, WebDAV's and others' included). */
static int unknown_method_line(const char *p, size_t n) {
  static const char tchars[] = "!#$%&'*+-.^_`|~";        /* RFC 9110 5.6.2, with ALPHA, DIGIT */
  static const char uchars[] = "-._~!$&'()*+,;=:@/?%[]"; /* RFC 3986's, with ALPHA, DIGIT */
  size_t i = 0;
  while (i < n && (isalnum((unsigned char)p[i]) || (p[i] && strchr(tchars, p[i]))))
    i++;
  if (i == 0 || i == n || p[i] != ' ') return 0;
  size_t t = ++i;
  while (i < n && (isalnum((unsigned char)p[i]) || (p[i] && strchr(uchars, p[i]))))
    i++;
  if (i == t || n - i != 9 || p[i] != ' ') return 0;
  p += i + 1;
  return memcmp(p, "HTTP/", 5) == 0 && isdigit((unsigned char)p[5]) && p[6] == '.' &&
         isdigit((unsigned char)p[7]);
}

/* Parses data[0..len) as far as the request cycle allows; stashes the rest. */
void ml__conn_feed(ml_conn_t *c, const char *data, size_t len) {
  c->in_feed = 1;
  while (len > 0 && !c->closing && !c->upgraded) {
    if (c->req_active && c->state == ML_CONN_DONE_READ) { /* wait for the handler */
      stash(c, data, len);
      c->feed_rest = 0; /* the stash holds it now */
      c->in_feed = 0;
      return;
    }
    c->feed_start = data;
    char before = c->last_byte;
    int in_head = c->state == ML_CONN_IDLE || c->state == ML_CONN_HEADERS;
    enum llhttp_errno err = llhttp_execute(&c->parser, data, len);
    c->last_byte = data[len - 1];
    if (err == HPE_OK) {
      const char *why = bad_line_end(c, in_head, data, len, before);
      if (why) {
        ml__conn_error(c, 400, why);
        break;
      }
      len = 0;
      deliver_body(c);
      break;
    }
    if (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE) {
      const char *pos = llhttp_get_error_pos(&c->parser);
      size_t used = (size_t)(pos - data);
      c->last_byte = used ? pos[-1] : before; /* the rest is parsed again from pos */
      const char *why = bad_line_end(c, in_head, data, used, before);
      if (why) {
        ml__conn_error(c, 400, why);
        break;
      }
      data += used;
      len -= used;
      c->feed_rest = len; /* input behind this request: keep_alive must not take EOF for the end */
      int event = c->pause;
      c->pause = PAUSE_NONE;
      if (err == HPE_PAUSED_UPGRADE) {
        /* llhttp reports an Upgrade (or CONNECT) when it parses on past the request, which it
         * does only once the handler has finished (the loop above stashes input while a request
         * is active) and not taken the upgrade (ml_conn_upgrade stops this loop first). RFC 9110
         * 7.8: the connection goes on as HTTP/1.1. After CONNECT the bytes are a tunnel's: close
         * (its response said so: dispatch set close_after). */
        if (c->parser.method == HTTP_CONNECT) {
          c->upgraded = 1;
          ml_conn_close(c, 1);
        } else {
          llhttp_resume_after_upgrade(&c->parser);
        }
      } else {
        llhttp_resume(&c->parser);
      }
      if (event == PAUSE_HEADERS) {
        dispatch(c);
      } else if (event == PAUSE_MESSAGE) {
        if (c->req_active) {
          deliver_body(c); /* the body is complete */
        } else {           /* the handler finished before its body: the request ends here */
          request_reset(c);
          c->nrequests++;
          if (c->close_after || c->srv->draining) ml_conn_close(c, 1);
        }
      }
      continue;
    }
    /* a parse error or a limit */
    int status = err == HPE_USER && c->error_status ? c->error_status : 400;
    /* "HTTP/2.0", "HTTP/9.9": well-formed versions this server does not speak get 505, as nginx
     * answers them (llhttp's "Invalid HTTP version" comes once both digits were read);
     * "HTTP/9.x" and "HTTP/1.x" stay 400s */
    if (err == HPE_INVALID_VERSION && c->parser.http_major >= 2 &&
        strcmp(llhttp_get_error_reason(&c->parser), "Invalid HTTP version") == 0)
      status = 505;
    char why[160];
    snprintf(why, sizeof why, "%s: %s", llhttp_errno_name(err),
             llhttp_get_error_reason(&c->parser));
    if (in_head && !c->line_done) raw_request_line(c, data, len, llhttp_get_error_pos(&c->parser));
    if (err == HPE_INVALID_METHOD && c->bad_line &&
        unknown_method_line(c->bad_line, c->bad_line_len))
      status = 501;
    ml__conn_error(c, status, why);
    c->bad_line = NULL;
    break;
  }
  c->feed_rest = 0;
  if (c->upgraded && len > 0 && !c->closing)
    stash(c, data, len);
  else if (len == 0 && c->stash && !c->closing)
    stash_clear(c);
  c->in_feed = 0;
}

/* Runs the input stashed while the previous request was handled (called from the prepare phase);
 * on an upgraded connection, hands the bytes that followed the upgrade request to the upper layer.
 */
void ml__conn_run_stash(ml_conn_t *c) {
  if (c->raw_cb) {
    if (c->closing) return;
    if (c->stash_len > c->stash_off) {
      char *s = c->stash;
      size_t off = c->stash_off, len = c->stash_len;
      c->stash = NULL;
      c->stash_len = c->stash_off = 0;
      ml__conn_raw_data(c, s + off, (ssize_t)(len - off));
      free(s);
    }
    if (c->read_eof && !c->closing) ml__conn_raw_data(c, NULL, UV_EOF);
    ml__conn_update_reading(c);
    ml__conn_arm_timer(c);
    return;
  }
  if (c->closing || c->upgraded || c->req_active) return;
  if (c->stash_len > c->stash_off) {
    char *s = c->stash;
    size_t off = c->stash_off, len = c->stash_len;
    c->stash = NULL; /* the stash is parsed from a buffer we own until the end of feed */
    c->stash_len = c->stash_off = 0;
    ml__conn_feed(c, s + off, len - off);
    if (c->stash == NULL && c->stash_len == 0) {
      free(s);
    } else if (c->stash != s) {
      free(s);
    }
  }
  if (c->read_eof && !c->closing && c->stash_len <= c->stash_off)
    ml__conn_on_eof(c); /* the client had shut its side behind the requests just run */
  ml__conn_update_reading(c);
  ml__conn_arm_timer(c);
}

/* A FIN while the handler runs is either a half-close (HTTP allows a client that still reads its
 * answer to shut its sending side) or the client gone (it closed its socket: a browser tab
 * closed, a script that gave up). Only a write tells them apart: the kernel of a client that
 * closed answers it with a reset. An HTTP/1.1 client must take an interim 1xx it did not ask for
 * (RFC 9110 15.2), so the connection sends "100 Continue" and then looks for that reset (the
 * TCP state, client_reset) PROBE_FIRST_MS later, then at doubling waits up
 * to PROBE_MAX_MS, while the handler runs and has not begun its answer (that answer's own write
 * then finds the reset). A reset closes the connection, which cancels the handler where it waits,
 * children included (the server's on_close), as a reset during the request always did. HTTP/1.0
 * has no interim responses: a FIN stays a half-close there (check_client_abort decides). The
 * looks ride on the connection's one timer (conn_deadline gives probe_at while probing). */
#define PROBE_FIRST_MS 10
#define PROBE_MAX_MS 1000
#define PROBE_LAST_STEP 7 /* PROBE_FIRST_MS << 7 is past PROBE_MAX_MS */

static void probe_start(ml_conn_t *c) {
  if (c->req.http_major != 1 || c->req.http_minor < 1 || c->upgraded || c->raw_cb) return;
  static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
  ml__out_append(c->srv, c, cont, sizeof cont - 1);
  ml__conn_flush(c);
  if (c->closing) return;
  c->probing = 1;
  c->probe_step = 0;
  c->probe_at = uv_now(c->srv->loop) + PROBE_FIRST_MS;
  uv_timer_stop(&c->timer); /* (it may run for a later deadline: armed again for this one) */
  ml__conn_arm_timer(c);
}

/* Whether the client's kernel answered with a reset (the client closed its socket): the
 * connection's TCP state is CLOSE. (A recv cannot tell, once the FIN came it says 0 first; nor can
 * SO_ERROR, which also gives the soft error an ICMP unreachable leaves on a live connection.) A
 * Unix domain socket has no TCP_INFO: there the 100's own write fails (EPIPE) when the peer is
 * gone, and the write's error closes the connection. */
static int client_reset(ml_conn_t *c) {
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0) return 0;
  struct tcp_info ti;
  socklen_t len = sizeof ti;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return 0;
  return ti.tcpi_state == TCP_CLOSE;
}

/* The timer reached probe_at (see probe_start). */
void ml__conn_probe(ml_conn_t *c) {
  c->probing = 0;
  if (c->closing || !c->req_active || c->resp_started) {
    ml__conn_arm_timer(c);
    return;
  }
  if (client_reset(c)) {
    ml_conn_close(c, 0); /* gone: on_close cancels the handler (499) */
    return;
  }
  if (c->probe_step < PROBE_LAST_STEP) c->probe_step++;
  uint64_t wait = (uint64_t)PROBE_FIRST_MS << c->probe_step;
  c->probing = 1;
  c->probe_at = uv_now(c->srv->loop) + (wait < PROBE_MAX_MS ? wait : PROBE_MAX_MS);
  ml__conn_arm_timer(c);
}

void ml__conn_on_eof(ml_conn_t *c) {
  c->read_eof = 1;
  c->reading = 0;
  if (c->stash_len > c->stash_off) return; /* pipelined requests first: run_stash comes back here */
  if (c->req_active) {
    if (c->state != ML_CONN_DONE_READ) { /* the body will never be complete */
      if (!c->resp_started) {
        ml__conn_error(c, 400, "client closed mid-request"); /* as nginx */
        return;
      }
      c->body_error = 1; /* answering already: the handler may finish, then the close */
      c->body_event = 1;
      c->close_after = 1;
      deliver_body(c);
    } else {
      c->close_after = 1; /* answer, then close */
      if (c->srv->cb.on_hangup) c->srv->cb.on_hangup(c, c->srv->ud);
      if (!c->closing && c->req_active && !c->resp_started) probe_start(c);
    }
    return;
  }
  if (c->state == ML_CONN_HEADERS || c->state == ML_CONN_BODY) {
    ml__conn_error(c, 400, "client closed mid-request");
    return;
  }
  ml_conn_close(c, c->write_queue > 0);
}

/* The request line as the logs show it (nginx's $request): parsed, when it was whole; else the
 * bytes llhttp refused (raw_request_line), or none. */
static void request_line_of(const ml_conn_t *c, ml_access_t *a) {
  const ml_request_t *r = &c->req;
  if (!r->method_len || (c->state < ML_CONN_BODY && !c->line_done)) {
    if (c->state < ML_CONN_BODY) {
      a->raw_line = c->bad_line;
      a->raw_line_len = c->bad_line_len;
    }
    return;
  }
  a->method = r->method;
  a->method_len = r->method_len;
  a->target = r->target;
  a->target_len = r->target_len;
  /* refused for its headers: on_headers_complete did not copy the version yet */
  a->http_major = c->state < ML_CONN_BODY ? c->parser.http_major : r->http_major;
  a->http_minor = c->state < ML_CONN_BODY ? c->parser.http_minor : r->http_minor;
}

/* Answers `status` if no response was started, then closes (gracefully). */
void ml__conn_error(ml_conn_t *c, int status, const char *why) {
  ml__conn_error_body(c, status, why, NULL);
}

void ml__conn_error_body(ml_conn_t *c, int status, const char *why, const char *text) {
  if (ml_log_enabled(c->srv->log, status >= 500 ? ML_LOG_ERROR : ML_LOG_INFO)) {
    char peer[64], line[256];
    ml_conn_peer(c, peer, sizeof peer);
    ml_access_t a = {0};
    request_line_of(c, &a);
    int has_line = ml_access_request_line(&a, line, sizeof line) > 0;
    ml_log(c->srv->log, status >= 500 ? ML_LOG_ERROR : ML_LOG_INFO, "%d %s from %s: %s%s%s%s",
           status, ml_http_reason(status), peer, why, has_line ? ", request: \"" : "",
           has_line ? line : "", has_line ? "\"" : "");
  }
  if (c->req_active) { /* the handler still runs: it hears about it as a body error */
    c->body_error = 1;
    c->body_event = 1;
  }
  if (!c->resp_started) {
    char body[96];
    int n = text ? snprintf(body, sizeof body, "%s", text)
                 : snprintf(body, sizeof body, "%d %s\n", status, ml_http_reason(status));
    c->close_after = 1;
    static const char hdr[] = "Content-Type: text/plain; charset=utf-8\r\n";
    ml_conn_respond(c, status, hdr, sizeof hdr - 1, body, (size_t)n);
    /* no handler saw it: its access line is written here, as nginx's access log has its 400s */
    if (!c->req_active) ml_conn_log_access(c, status, (uint64_t)n, NULL);
  }
  c->close_after = 1;
  deliver_body(c);
  ml_conn_close(c, 1);
}

void ml__conn_timeout(ml_conn_t *c) {
  if (c->closing) {
    ml_conn_close(c, 0);
    return;
  }
  int raw_due = c->raw_cb && c->raw_deadline && c->raw_deadline <= uv_now(c->srv->loop);
  if (c->write_queue > 0 && !raw_due) {
    ml_log(c->srv->log, ML_LOG_INFO, "send timeout: closing");
    ml_conn_close(c, 0);
    return;
  }
  if (c->raw_cb) { /* the upper layer's deadline (conn_deadline), output backed up or not */
    c->raw_deadline = 0;
    c->raw_cb->on_deadline(c, c->raw_ud);
    return;
  }
  switch (c->state) {
  case ML_CONN_HEADERS: ml__conn_error(c, 408, "header read timeout"); break;
  case ML_CONN_BODY: ml__conn_error(c, 408, "body read timeout"); break;
  case ML_CONN_IDLE: /* keep-alive idle */
    if (!c->req_active) {
      ml__conn_close_idle(c);
      break;
    }
    /* fall through */
  default: ml_conn_close(c, 0); break;
  }
}

/* -- Public calls -------------------------------------------------------------------------- */

const ml_request_t *ml_conn_request(const ml_conn_t *c) { return &c->req; }
void ml_conn_log_access(ml_conn_t *c, int status, uint64_t bytes, const char *request_id) {
  const ml_log_t *log = c->srv->log;
  if (!log || !log->access) return;
  const ml_request_t *r = &c->req;
  ml_access_t a = {.peer = ml_conn_peer_name(c),
                   .status = status,
                   .bytes = (unsigned long long)bytes,
                   .request_id = request_id};
  request_line_of(c, &a);
  if (c->state >= ML_CONN_BODY && a.method) { /* its headers were whole */
    a.ms = (double)(uv_hrtime() - r->started_ns) / 1e6;
    for (unsigned i = 0; i < r->nheaders; i++) {
      const ml_header_t *h = &r->headers[i];
      if (h->name_len == 10 && memcmp(h->name, "user-agent", 10) == 0) {
        a.ua = h->value;
        a.ua_len = h->value_len;
      } else if (h->name_len == 7 && memcmp(h->name, "referer", 7) == 0) {
        a.referer = h->value;
        a.referer_len = h->value_len;
      }
    }
  }
  ml_log_access(log, &a);
}

void *ml_conn_data(const ml_conn_t *c) { return c->data; }
void ml_conn_set_data(ml_conn_t *c, void *data) { c->data = data; }

static int peer_of(const ml_conn_t *c, char *buf, size_t len) {
  struct sockaddr_storage ss;
  int sl = sizeof ss;
  buf[0] = 0;
  int r = uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl);
  if (r < 0) {
    snprintf(buf, len, "?");
    return r;
  }
  char ip[INET6_ADDRSTRLEN];
  if (ss.ss_family == AF_UNIX) { /* as nginx's $remote_addr on a Unix socket */
    snprintf(buf, len, "unix:");
  } else if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
    snprintf(buf, len, "[%s]:%d", ip, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
  } else {
    uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
    snprintf(buf, len, "%s:%d", ip, ntohs(((struct sockaddr_in *)&ss)->sin_port));
  }
  return 0;
}

const char *ml_conn_peer_name(ml_conn_t *c) {
  if (c->peer_name) return c->peer_name;
  char buf[INET6_ADDRSTRLEN + 16];
  if (peer_of(c, buf, sizeof buf) < 0) return "?";
  c->peer_name = strdup(buf); /* freed with the connection (ml__server_conn_gone) */
  return c->peer_name ? c->peer_name : "?";
}

int ml_conn_peer(ml_conn_t *c, char *buf, size_t len) {
  const char *name = ml_conn_peer_name(c);
  snprintf(buf, len, "%s", name);
  return name[0] == '?' ? UV_ENOTCONN : 0;
}

int ml_conn_body_state(ml_conn_t *c, const char **data, size_t *len) {
  *data = c->body;
  *len = c->body_len;
  if (c->body_error) return ML_BODY_ERROR;
  if (c->state != ML_CONN_BODY || !c->req.has_body) return ML_BODY_DONE;
  return ML_BODY_MORE;
}

void ml_conn_body_consume(ml_conn_t *c, size_t n) {
  if (n >= c->body_len) {
    c->body_len = 0;
  } else {
    memmove(c->body, c->body + n, c->body_len - n);
    c->body_len -= n;
  }
  ml__conn_update_reading(c);
  ml__conn_arm_timer(c);
}

void ml_conn_body_want(ml_conn_t *c) {
  if (c->req.expect_continue && !c->continue_sent && !c->resp_started && c->state == ML_CONN_BODY) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    c->continue_sent = 1;
    ml__out_append(c->srv, c, cont, sizeof cont - 1);
    ml__conn_flush(c);
  }
}

void ml_conn_set_close(ml_conn_t *c) { c->close_after = 1; }
void ml_conn_own_headers(ml_conn_t *c, unsigned flags) { c->own_headers = flags & 3; }

void ml_conn_finish(ml_conn_t *c) {
  if (!c->req_active) return;
  c->req_active = 0;
  if (c->closing) return;
  if (!c->resp_started) {
    ml__conn_error(c, 500, "handler finished without a response");
    return;
  }
  if (!c->resp_done) { /* a streamed response that never ended cannot be framed: close */
    c->close_after = 1;
    ml_conn_close(c, 1);
    return;
  }
  /* the client may still send the body we did not ask for */
  if (c->req.expect_continue && !c->continue_sent && c->state == ML_CONN_BODY && c->req.has_body)
    c->close_after = 1;
  if (c->close_after) {
    ml_conn_close(c, 1);
    return;
  }
  if (c->state != ML_CONN_DONE_READ) { /* the rest of the body is read and dropped */
    free(c->body);
    c->body = NULL;
    c->body_len = c->body_cap = 0;
    ml__conn_update_reading(c);
    return;
  }
  request_reset(c);
  c->nrequests++;
  if (c->srv->draining) {
    ml_conn_close(c, 1);
    return;
  }
  if (c->in_feed) return; /* conn_feed goes on with the rest of its buffer */
  if (c->stash_len > c->stash_off) {
    ml__server_ready(c->srv, c);
    return;
  }
  c->activity = uv_now(c->srv->loop);
  ml__conn_update_reading(c);
  ml__conn_arm_timer(c);
}

/* -- Upgrade: the connection as a raw byte stream (see core/http.h) ------------------------------
 */

int ml_conn_upgrade(ml_conn_t *c, const char *headers, size_t hlen, const ml_conn_raw_cb_t *cb,
                    void *ud) {
  if (c->closing || c->srv->draining) return UV_EPIPE;
  if (!c->req_active || c->raw_cb || c->resp_started || c->req.has_body ||
      c->state != ML_CONN_DONE_READ)
    return UV_EINVAL;
  ml_server_t *s = c->srv;
  static const char head[] = "HTTP/1.1 101 Switching Protocols\r\nServer: moonlet\r\n";
  size_t dlen;
  const char *date = ml__date_header(s, &dlen);
  size_t n = sizeof head - 1 + dlen + hlen + 2;
  char *p = ml__out_reserve(s, c, n);
  if (!p) return c->closing ? UV_EPIPE : UV_ENOMEM;
  memcpy(p, head, sizeof head - 1);
  memcpy(p + sizeof head - 1, date, dlen);
  if (hlen) memcpy(p + sizeof head - 1 + dlen, headers, hlen);
  memcpy(p + n - 2, "\r\n", 2);
  ml__out_commit(s, n);
  c->raw_cb = cb;
  c->raw_ud = ud;
  c->upgraded = 1; /* conn_feed parses no further and stashes what follows the request */
  c->req_active = 0;
  request_reset(c);
  c->nrequests++;
  c->activity = uv_now(s->loop);
  ml__server_ready(s, c); /* the stashed bytes go up from the prepare phase, then reading starts */
  ml__conn_update_reading(c);
  return 0;
}

void ml__conn_raw_data(ml_conn_t *c, const char *data, ssize_t n) {
  if (n < 0) {
    if (c->raw_eof) return;
    c->raw_eof = 1;
  }
  c->raw_cb->on_data(c, data, n, c->raw_ud);
}

int ml_conn_raw_write(ml_conn_t *c, const char *data, size_t len) {
  if (c->closing) return UV_EPIPE;
  if (len == 0) return 0;
  ml__out_append(c->srv, c, data, len);
  return c->closing ? UV_EPIPE : 0;
}

void ml_conn_raw_read(ml_conn_t *c, int on) {
  if (!c->raw_cb) return;
  c->raw_paused = !on;
  ml__conn_update_reading(c);
}

void ml_conn_raw_deadline(ml_conn_t *c, uint64_t ms) {
  if (!c->raw_cb || c->closing) return;
  uint64_t dl = ms ? uv_now(c->srv->loop) + ms : 0;
  int sooner = dl && (!c->raw_deadline || dl < c->raw_deadline);
  c->raw_deadline = dl;
  /* a later deadline leaves the timer as it is: it fires early and re-arms for the rest */
  if (sooner) uv_timer_stop(&c->timer);
  ml__conn_arm_timer(c);
}
