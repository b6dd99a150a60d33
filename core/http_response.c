/* core/http_response.c: response heads and bodies: whole responses, streamed ones (chunked for
 * HTTP/1.1, close-delimited for HTTP/1.0) and the keep-alive decision. Heads are formatted straight
 * into the server's staging buffer, so a response costs no allocation.
 */
#include <stdio.h>
#include <string.h>

#include "http_internal.h"
#include "numfmt.h"

const char *ml_http_reason(int status) {
  switch (status) { /* RFC 9110 and the IANA registry */
  case 100: return "Continue";
  case 101: return "Switching Protocols";
  case 102: return "Processing";
  case 103: return "Early Hints";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 203: return "Non-Authoritative Information";
  case 204: return "No Content";
  case 205: return "Reset Content";
  case 206: return "Partial Content";
  case 207: return "Multi-Status";
  case 208: return "Already Reported";
  case 226: return "IM Used";
  case 300: return "Multiple Choices";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 303: return "See Other";
  case 304: return "Not Modified";
  case 305: return "Use Proxy";
  case 307: return "Temporary Redirect";
  case 308: return "Permanent Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 402: return "Payment Required";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 406: return "Not Acceptable";
  case 407: return "Proxy Authentication Required";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 410: return "Gone";
  case 411: return "Length Required";
  case 412: return "Precondition Failed";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 415: return "Unsupported Media Type";
  case 416: return "Range Not Satisfiable";
  case 417: return "Expectation Failed";
  case 418: return "I'm a teapot";
  case 421: return "Misdirected Request";
  case 422: return "Unprocessable Content";
  case 423: return "Locked";
  case 424: return "Failed Dependency";
  case 425: return "Too Early";
  case 426: return "Upgrade Required";
  case 428: return "Precondition Required";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 451: return "Unavailable For Legal Reasons";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  case 506: return "Variant Also Negotiates";
  case 507: return "Insufficient Storage";
  case 508: return "Loop Detected";
  case 510: return "Not Extended";
  case 511: return "Network Authentication Required";
  default: return "Unknown";
  }
}

/* Whether the connection stays open after this response; sets close_after when it does not. A
 * client that waits for 100 Continue before its body, answered without it, may send that body or
 * not: the connection cannot go on, and the head says so (ml_conn_finish closes it). */
static int keep_alive(ml_conn_t *c) {
  const ml_http_limits_t *lim = &c->srv->lim;
  int eof = c->read_eof && c->stash_len <= c->stash_off && c->feed_rest == 0; /* none pipelined */
  if (c->req.expect_continue && !c->continue_sent && c->state == ML_CONN_BODY && c->req.has_body)
    c->close_after = 1;
  int keep = c->req.keep_alive && !c->close_after && !c->srv->draining && !eof && !c->upgraded &&
             !(lim->keepalive_requests && c->nrequests + 1 >= lim->keepalive_requests);
  if (!keep) c->close_after = 1;
  return keep;
}

static int no_body_status(int status) { return status == 204 || status == 304 || status < 200; }

enum { LEN_NONE = -1, LEN_CHUNKED = -2, LEN_EOF = -3 };

static char *put_lit(char *p, const char *s, size_t n) {
  memcpy(p, s, n);
  return p + n;
}
#define PUT_LIT(p, lit) put_lit(p, lit, sizeof lit - 1)

/* Formats the head into the staging buffer. `length` >= 0 is a Content-Length, else one of LEN_*.
 */
static int write_head(ml_conn_t *c, int status, const char *headers, size_t hlen, int64_t length) {
  ml_server_t *s = c->srv;
  size_t dlen;
  const char *date = ml__date_header(s, &dlen);
  const char *reason = ml_http_reason(status);
  int keep = keep_alive(c);
  size_t need = 64 + strlen(reason) + dlen + hlen + 64;
  char *p = ml__out_reserve(s, c, need), *start = p;
  if (!p) return c->closing ? UV_EPIPE : UV_ENOMEM;
  p = PUT_LIT(p, "HTTP/1.1 ");
  p = ml_numfmt_uint(p, (uint64_t)status);
  *p++ = ' ';
  p = put_lit(p, reason, strlen(reason));
  p = PUT_LIT(p, "\r\n");
  if (!(c->own_headers & ML_OWN_SERVER)) p = PUT_LIT(p, "Server: moonlet\r\n");
  if (!(c->own_headers & ML_OWN_DATE)) {
    memcpy(p, date, dlen);
    p += dlen;
  }
  c->own_headers = 0; /* (for this head only) */
  if (hlen) {
    memcpy(p, headers, hlen);
    p += hlen;
  }
  if (length >= 0) {
    p = PUT_LIT(p, "Content-Length: ");
    p = ml_numfmt_uint(p, (uint64_t)length);
    p = PUT_LIT(p, "\r\n");
  } else if (length == LEN_CHUNKED) {
    p = PUT_LIT(p, "Transfer-Encoding: chunked\r\n");
  }
  if (!keep) {
    p = PUT_LIT(p, "Connection: close\r\n\r\n");
  } else if (c->req.http_minor == 0) {
    p = PUT_LIT(p, "Connection: keep-alive\r\n\r\n");
  } else {
    *p++ = '\r';
    *p++ = '\n';
  }
  ml__out_commit(s, (size_t)(p - start));
  c->resp_started = 1;
  c->resp_no_body = c->req.is_head || no_body_status(status);
  return 0;
}

int ml_conn_respond(ml_conn_t *c, int status, const char *headers, size_t hlen, const char *body,
                    size_t blen) {
  if (c->closing) return UV_EPIPE;
  if (c->resp_started) return UV_EALREADY;
  int64_t length = no_body_status(status) ? LEN_NONE : (int64_t)blen;
  int r = write_head(c, status, headers, hlen, length);
  if (r < 0) return r;
  if (blen && !c->resp_no_body) ml__out_append(c->srv, c, body, blen);
  c->resp_done = 1;
  if (!c->in_feed) ml__conn_flush(c); /* nothing can join it: out now (http_server.c) */
  return 0;
}

int ml_conn_stream_start(ml_conn_t *c, int status, const char *headers, size_t hlen,
                         int64_t content_length) {
  if (c->closing) return UV_EPIPE;
  if (c->resp_started) return UV_EALREADY;
  int64_t length;
  if (no_body_status(status)) {
    length = LEN_NONE;
  } else if (content_length >= 0) {
    length = content_length;
  } else if (c->req.http_minor >= 1 && c->req.http_major == 1) {
    length = LEN_CHUNKED;
  } else {
    c->close_after = 1; /* HTTP/1.0: the end of the body is the end of the connection */
    length = LEN_EOF;
  }
  int r = write_head(c, status, headers, hlen, length);
  if (r < 0) return r;
  c->resp_chunked = length == LEN_CHUNKED;
  c->stream_left = content_length >= 0 ? content_length : -1;
  return 0;
}

int ml_conn_stream_write(ml_conn_t *c, const char *data, size_t len) {
  if (c->closing) return UV_EPIPE;
  if (!c->resp_started || c->resp_done) return UV_EINVAL;
  if (len == 0 || c->resp_no_body) return 0;
  if (c->stream_left >= 0) {
    if ((int64_t)len > c->stream_left) return UV_E2BIG;
    c->stream_left -= (int64_t)len;
  }
  if (c->resp_chunked) {
    char *p = ml__out_reserve(c->srv, c, 24);
    if (!p) return c->closing ? UV_EPIPE : UV_ENOMEM;
    ml__out_commit(c->srv, (size_t)snprintf(p, 24, "%zx\r\n", len));
    ml__out_append(c->srv, c, data, len);
    ml__out_append(c->srv, c, "\r\n", 2);
  } else {
    ml__out_append(c->srv, c, data, len);
  }
  return c->closing ? UV_EPIPE : 0;
}

int ml_conn_stream_end(ml_conn_t *c) {
  if (c->closing) return UV_EPIPE;
  if (!c->resp_started) return UV_EINVAL;
  if (c->resp_done) return 0; /* a file body ends itself */
  if (c->resp_chunked && !c->resp_no_body) ml__out_append(c->srv, c, "0\r\n\r\n", 5);
  if (c->stream_left > 0 && !c->resp_no_body) c->close_after = 1; /* short body: cannot keep it */
  c->resp_done = 1;
  if (!c->in_feed) ml__conn_flush(c);
  return 0;
}

size_t ml_conn_write_queue(const ml_conn_t *c) {
  size_t staged = c->srv->out_owner == c ? c->srv->out_len : 0;
  return c->write_queue + staged;
}

int ml_conn_wants_writable(ml_conn_t *c) {
  ml__conn_flush(c); /* what is staged must move for the queue to drain */
  if (c->closing) return UV_EPIPE;
  if (c->write_queue < ML_WRITE_LOW_WATER) return 0;
  c->want_writable = 1;
  return 1;
}

int ml_conn_response_started(const ml_conn_t *c) { return c->resp_started; }
