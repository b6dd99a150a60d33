/* core/http.h: the HTTP/1.1 server of the core: listeners, connections, llhttp parsing, limits,
 * timeouts and response writing. It knows nothing of Lua: an upper layer (bindings/http_server.c)
 * receives requests through ml_http_callbacks_t and answers through the ml_conn_* calls.
 *
 * Ownership and lifetime (the rules every caller relies on):
 * - The server owns every connection. A connection's memory stays valid until its close callback
 * has run; the upper layer hears about it once, through on_close, and must drop its pointer there.
 * - A connection handles one request at a time. A request starts with on_request (headers complete)
 *   and ends when the upper layer calls ml_conn_finish; pipelined requests wait, parsed no further,
 *   until the one before has finished, so responses leave in request order.
 * - Callbacks into the upper layer never run inside llhttp_execute: the parser pauses at the end of
 *   the headers and of the message, and events are delivered after it returns. The upper layer may
 *   call any ml_conn_* function from a callback, including ml_conn_finish and ml_conn_close.
 * - Output goes into one staging buffer per server and is written with uv_try_write at the latest
 * in the loop's prepare phase (or earlier when another connection needs the buffer), so a batch of
 *   pipelined responses leaves in one write; what the socket does not take is copied into one write
 *   request. Nothing is allocated per request on the keep-alive path.
 * - Everything runs on the loop thread.
 */
#ifndef ML_HTTP_H
#define ML_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "log.h"
#include "tls.h"

typedef struct ml_server_s ml_server_t;
typedef struct ml_conn_s ml_conn_t;

/* Limits with nginx-like defaults (ml_http_limits_default). Times are in milliseconds; 0 disables.
 */
typedef struct ml_http_limits_s {
  size_t max_uri;                /* request-target bytes, else 414 (8 KiB) */
  size_t max_header_bytes;       /* request line + header bytes, else 431 (32 KiB) */
  unsigned max_headers;          /* header count, else 431 (100) */
  uint64_t max_body;             /* body bytes, else 413 (1 MiB) */
  uint64_t header_timeout_ms;    /* whole header section, else 408 + close (60 s) */
  uint64_t body_timeout_ms;      /* between two body reads, else 408 + close (60 s) */
  uint64_t keepalive_timeout_ms; /* idle keep-alive connection is closed (75 s) */
  uint64_t send_timeout_ms;      /* a client that reads nothing for this long is closed (60 s) */
  unsigned max_conns;            /* further connections are closed at accept (10240) */
  unsigned
      keepalive_requests; /* requests on one connection before Connection: close (0: no limit) */
  uint64_t shutdown_grace_ms; /* how long ml_server_shutdown waits for in-flight requests (10 s) */
} ml_http_limits_t;

void ml_http_limits_default(ml_http_limits_t *lim);

typedef struct ml_header_s {
  const char *name;  /* lower-cased copy, valid until ml_conn_finish */
  const char *value; /* surrounding white space trimmed */
  uint32_t name_len, value_len;
} ml_header_t;

/* The request being handled on a connection; valid from on_request until ml_conn_finish. */
typedef struct ml_request_s {
  const char *method;
  const char *target; /* the request-target as sent: path?query */
  uint32_t method_len, target_len;
  uint8_t http_major, http_minor;
  uint8_t keep_alive;      /* the client wants the connection kept */
  uint8_t expect_continue; /* Expect: 100-continue was sent */
  uint8_t is_head;
  uint8_t has_body;       /* Content-Length > 0 or chunked */
  int64_t content_length; /* -1 when absent */
  ml_header_t *headers;
  unsigned nheaders;
  uint64_t started_ns; /* uv_hrtime at the end of the headers (set when the access log is on) */
} ml_request_t;

typedef struct ml_http_callbacks_s {
  /* The headers of a request are complete. The upper layer starts its handler; it may answer and
   * call ml_conn_finish before returning. */
  void (*on_request)(ml_conn_t *c, void *ud);
  /* Body bytes arrived, the body ended, or reading it failed: look at ml_conn_body_state. */
  void (*on_body)(ml_conn_t *c, void *ud);
  /* The write queue fell below the low-water mark after ml_conn_wants_writable. */
  void (*on_writable)(ml_conn_t *c, void *ud);
  /* The connection is closing: the upper layer wakes whatever waits on it with "closed" and drops
   * every pointer to it. Runs once, from the close callback, never while the request is active in
   * a callback of ours. */
  void (*on_close)(ml_conn_t *c, void *ud);
  /* Optional (NULL: not told). The client shut its side (FIN) while a request's handler runs and
   * no request is pipelined behind it: it went away, or it half-closed and still reads. Either
   * way the connection closes after the response; the upper layer may give up on the request.
   * Runs outside the parser, at most once per connection. */
  void (*on_hangup)(ml_conn_t *c, void *ud);
} ml_http_callbacks_t;

/* -- Server --------------------------------------------------------------------------------- */

/* Creates a server on `loop` (not started). Returns NULL when out of memory. */
ml_server_t *ml_server_new(uv_loop_t *loop, const ml_http_limits_t *lim, const ml_log_t *log,
                           const ml_http_callbacks_t *cb, void *ud);
/* Binds and listens on host:port (port 0 picks one; read it back with ml_server_port). Returns 0 or
 * a negative UV_E* code. A server may listen on several addresses. */
int ml_server_listen(ml_server_t *s, const char *host, int port, int backlog);
/* Binds and listens on the Unix domain socket path (core/listen.h: a stale socket file is replaced,
 * a live one is not), permissions mode (< 0: the umask's); the file is removed when the listener
 * closes. 0 or a negative UV_E* code. */
int ml_server_listen_unix(ml_server_t *s, const char *path, int backlog, int mode);
/* Listens on a copy (dup) of fd, a listening Unix domain socket another process made (a worker of
 * `--unix PATH --workers N`): the file stays its maker's to remove. 0 or a negative UV_E* code. */
int ml_server_listen_unix_fd(ml_server_t *s, int fd);
/* Listeners made after this share their port with other processes' (SO_REUSEPORT; core/listen.h).
 */
void ml_server_set_reuseport(ml_server_t *s, int on);
int ml_server_port(const ml_server_t *s,
                   int index); /* bound port of the index-th listener (0: a Unix socket), or <0 */
/* Stops accepting, closes idle connections, lets active requests finish (Connection: close), and
 * closes whatever is still open after the grace time. `done` runs once everything is closed. */
void ml_server_shutdown(ml_server_t *s, void (*done)(ml_server_t *, void *), void *ud);
/* Closes every handle now; `done` runs from the last close callback, then the server may be freed
 * with ml_server_free. */
void ml_server_close(ml_server_t *s, void (*done)(ml_server_t *, void *), void *ud);
void ml_server_free(ml_server_t *s);
/* Makes the server speak HTTPS: every connection accepted from now on is a TLS server session of
 * ctx (a server context: core/tls.h), whose handshake runs before any HTTP is parsed. The server
 * owns ctx from here and frees it in ml_server_free. Called again (hot reload's certificate
 * rotation), it frees the context it had and uses ctx for the next connections (NULL: plain HTTP);
 * the connections accepted before keep their session, which holds its own reference on the
 * context it was made from (core/tls.c), so they finish with the old certificate. */
void ml_server_set_tls(ml_server_t *s, ml_tls_ctx_t *ctx);
unsigned ml_server_conn_count(const ml_server_t *s);
/* What nginx's stub_status tells: connections accepted, handled (accepted and not refused at
 * max_conns) and requests (begun, those refused for their head included) since the server started;
 * and now, of the open connections (active), those reading a request head, those with a request in
 * progress (its body coming in, a handler running, a response going out, an upgraded WebSocket:
 * "writing") and the idle keep-alive ones (waiting): reading + writing + waiting = active. */
typedef struct ml_server_stats_s {
  uint64_t accepted, handled, requests;
  unsigned active, reading, writing, waiting;
} ml_server_stats_t;
/* Adds s's figures to *st (so that an instance sums its servers'). Counts the connections: O(n). */
void ml_server_stats_add(const ml_server_t *s, ml_server_stats_t *st);
ml_http_limits_t *ml_server_limits(ml_server_t *s);
/* Writes out every connection's staged output now (the prepare phase does it too). */
void ml_server_flush(ml_server_t *s);

/* -- The request on a connection -------------------------------------------------------------- */

const ml_request_t *ml_conn_request(const ml_conn_t *c);
void *ml_conn_data(const ml_conn_t *c);
void ml_conn_set_data(ml_conn_t *c, void *data);
/* "ip:port", "[ip6]:port" or "unix:" of the client, made once per connection and kept with it;
 * "?" when it cannot be told (the connection was reset). */
const char *ml_conn_peer_name(ml_conn_t *c);
int ml_conn_peer(ml_conn_t *c, char *buf, size_t len); /* the same, copied into buf */
int ml_conn_is_tls(const ml_conn_t *c);                /* 1 on an HTTPS server */
struct ml_tls_s *ml_conn_tls(const ml_conn_t *c);      /* its TLS session (core/tls.h), or NULL */
/* Writes the access-log line of the request on c (when the access log is on): peer, request line
 * ("-" when its headers never came whole), status, body bytes, user agent, time since the headers.
 */
void ml_conn_log_access(ml_conn_t *c, int status, uint64_t bytes, const char *request_id);

enum { ML_BODY_MORE = 0, ML_BODY_DONE = 1, ML_BODY_ERROR = 2 };
/* Reports what is buffered of the request body (data and len; may be empty) and whether more is to
 * come, the body is complete, or it failed (client gone, timeout, limit). */
int ml_conn_body_state(ml_conn_t *c, const char **data, size_t *len);
/* Drops the first n buffered body bytes (the reader has copied them); reading resumes when the
 * buffer drains. */
void ml_conn_body_consume(ml_conn_t *c, size_t n);
/* Marks that the handler waits for body data: a 100 Continue is sent first when the client asked.
 */
void ml_conn_body_want(ml_conn_t *c);

/* -- Responses ----------------------------------------------------------------------------------
 */

/* Writes a whole response: status line, Date, Server, `headers` (preformatted "Name: value\r\n"
 * lines, may be NULL), Content-Length and the body (omitted for HEAD, 204 and 304). Returns 0, or
 * UV_EPIPE when the connection is closing, or UV_EALREADY when a response was already started. */
int ml_conn_respond(ml_conn_t *c, int status, const char *headers, size_t hlen, const char *body,
                    size_t blen);
/* Starts a streamed response: chunked for HTTP/1.1, close-delimited for HTTP/1.0. When
 * `content_length` >= 0 the body is sent as is and must add up to it. */
int ml_conn_stream_start(ml_conn_t *c, int status, const char *headers, size_t hlen,
                         int64_t content_length);
int ml_conn_stream_write(ml_conn_t *c, const char *data, size_t len);
int ml_conn_stream_end(ml_conn_t *c);
/* Bytes written but not yet taken by the socket. */
size_t ml_conn_write_queue(const ml_conn_t *c);
/* Writes out what is staged, then: returns 0 when the queue is already below the low-water mark,
 * 1 when on_writable will be called once it is, UV_EPIPE when the connection is closing (on_close
 * will come instead). on_writable is never called from inside this function. */
int ml_conn_wants_writable(ml_conn_t *c);
int ml_conn_response_started(const ml_conn_t *c);

/* Streams `len` bytes of the open file `fd` from `offset` after the response head already started
 * with ml_conn_stream_start (with a Content-Length). Reads go through the thread pool in 64 KiB
 * pieces and never pass through Lua. `cb` runs once with 0 or a negative error; the file descriptor
 * stays the caller's. Returns 0 or an error, in which case `cb` is never called. */
typedef void (*ml_conn_file_cb)(ml_conn_t *c, int status, void *ud);
int ml_conn_send_file(ml_conn_t *c, uv_file fd, int64_t offset, int64_t len, ml_conn_file_cb cb,
                      void *ud);

/* Ends the current request: the response must be complete (or the connection is closed). Parsing
 * goes on with the next pipelined request, or the connection waits for one, or closes. */
void ml_conn_finish(ml_conn_t *c);
/* Asks for Connection: close on the current response and a close after it. */
void ml_conn_set_close(ml_conn_t *c);
/* The next response head's headers (ml_conn_respond's, ml_conn_stream_start's) hold their own
 * Server (ML_OWN_SERVER) or Date (ML_OWN_DATE) line: the server's is left out. */
enum { ML_OWN_SERVER = 1, ML_OWN_DATE = 2 };
void ml_conn_own_headers(ml_conn_t *c, unsigned flags);
/* Closes the connection: graceful (pending output is written first) or at once. Idempotent. */
void ml_conn_close(ml_conn_t *c, int graceful);
int ml_conn_is_closing(const ml_conn_t *c);

/* -- Upgrade: handing the connection over to another protocol --------------------------------
 * An upgrade request (a WebSocket handshake) is answered with ml_conn_upgrade: the 101 head goes
 * out and the connection stops being HTTP. It becomes a raw byte stream owned by the upper layer,
 * which hears of it only through the ml_conn_raw_cb_t it passed (the server's callbacks and
 * ml_conn_data are no longer used for it). The bytes the client sent after the request head are
 * delivered first, from the loop's prepare phase, then reading goes on. Output uses the same
 * staging buffer and write queue as responses: ml_conn_write_queue and ml_conn_wants_writable work
 * as before, and the send timeout still closes a peer that reads nothing. The keep-alive, header
 * and body timeouts no longer apply: the upper layer sets its own deadline (idle, ping, close) with
 * ml_conn_raw_deadline; it runs while output is backed up too, when it comes before the send
 * timeout (so a close handshake's timeout closes a peer that reads nothing). ml_conn_close closes
 * the stream; on_close runs once, from the close callback, and the upper layer drops its pointer
 * there. */
typedef struct ml_conn_raw_cb_s {
  /* n > 0: bytes arrived (valid during the call only); n < 0: the peer closed its side (UV_EOF)
   * or reading failed. Reading stops after n < 0. */
  void (*on_data)(ml_conn_t *c, const char *data, ssize_t n, void *ud);
  /* The write queue fell below the low-water mark after ml_conn_wants_writable returned 1. */
  void (*on_writable)(ml_conn_t *c, void *ud);
  /* The deadline set with ml_conn_raw_deadline passed (it is cleared first). */
  void (*on_deadline)(ml_conn_t *c, void *ud);
  /* The server is shutting down: close soon (it closes what is left after its grace time). */
  void (*on_shutdown)(ml_conn_t *c, void *ud);
  /* The connection is gone (from its close callback): drop every pointer to it. */
  void (*on_close)(ml_conn_t *c, void *ud);
} ml_conn_raw_cb_t;

/* Answers the active request with "101 Switching Protocols", Server, Date and `headers`
 * (preformatted lines, e.g. Upgrade, Connection, Sec-WebSocket-Accept), ends the request and hands
 * the connection over (see above). The request must have no body and no response yet. `cb` must
 * stay valid while the connection lives. Returns 0, UV_EINVAL when the request cannot be upgraded,
 * or UV_EPIPE when the connection is closing. The request's headers are freed: copy them first. */
int ml_conn_upgrade(ml_conn_t *c, const char *headers, size_t hlen, const ml_conn_raw_cb_t *cb,
                    void *ud);
/* Writes bytes of an upgraded connection (staged; written in the prepare phase at the latest).
 * Returns 0 or UV_EPIPE when the connection is closing. */
int ml_conn_raw_write(ml_conn_t *c, const char *data, size_t len);
/* Stops (on = 0) or resumes (on = 1) reading an upgraded connection: the upper layer's
 * backpressure while its reader is slow. */
void ml_conn_raw_read(ml_conn_t *c, int on);
/* Sets the upgraded connection's deadline to `ms` from now (0: none); on_deadline runs then. */
void ml_conn_raw_deadline(ml_conn_t *c, uint64_t ms);

/* Reason phrase of a status code ("Not Found"), "Unknown" when not known. */
const char *ml_http_reason(int status);

#endif
