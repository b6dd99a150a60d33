/* core/http_internal.h: the structs behind core/http.h, shared by the files of the HTTP server
 * (http_server.c: listeners, output staging, timers, shutdown; http_conn.c: parsing and the request
 * lifecycle; http_response.c: response heads and bodies; http_file.c: file bodies). Nothing outside
 * core/http_*.c includes this.
 */
#ifndef ML_HTTP_INTERNAL_H
#define ML_HTTP_INTERNAL_H

#include <llhttp.h>

#include "http.h"
#include "listen.h"

#define ML_READ_BUF_SIZE (64 * 1024)    /* the server's one read buffer */
#define ML_BODY_HIGH_WATER (256 * 1024) /* reading pauses while this much body is unread */
#define ML_WRITE_LOW_WATER (64 * 1024)  /* on_writable fires below this */
#define ML_OUT_FLUSH_AT (256 * 1024)    /* staged output is written out past this */
#define ML_STASH_MAX (64 * 1024)        /* reading pauses while this much input waits its turn */
#define ML_LINGER_MS 2000               /* reading after a graceful close, to avoid a RST */
#define ML_TLS_CLOSE_MS 3000 /* an idle close's close_notify the socket did not take at once */
#define ML_MAX_LISTENERS 8

/* A request buffer: the copied request line and headers of one request. Pooled per server, so an
 * idle connection holds none and a busy one allocates none. */
typedef struct ml_reqbuf_s {
  struct ml_reqbuf_s *next; /* free-list link */
  size_t len, cap;          /* bytes used / capacity of data */
  ml_header_t *headers;     /* max_headers entries, stored before data */
  char *data;
} ml_reqbuf_t;

enum {                   /* where a connection is in its request cycle */
       ML_CONN_IDLE = 0, /* between requests */
       ML_CONN_HEADERS,  /* a message began; headers incomplete */
       ML_CONN_BODY,     /* headers complete; body still arriving */
       ML_CONN_DONE_READ /* the whole message is in */
};

/* A listener: a TCP socket, or a Unix domain socket whose file it removes when it closes (if it is
 * still the one it made: close_listeners). The handle's data is the server. */
typedef struct {
  union {
    uv_tcp_t tcp;
    uv_pipe_t pipe; /* tcp.type tells which */
  };
  char *path;      /* the Unix socket file this listener made (owned), or NULL */
  ml_unix_id_t id; /* ... and which file it is */
} ml_listener_t;

struct ml_conn_s {
  union {           /* owned; closed once in conn_close_handles */
    uv_tcp_t tcp;   /* a TCP connection, */
    uv_pipe_t pipe; /* or one of a Unix domain socket: every stream call takes either (&c->tcp) */
  };
  uv_timer_t timer; /* the one timer of the connection (see conn_timer_cb) */
  llhttp_t parser;
  ml_server_t *srv;
  ml_conn_t *prev, *next; /* the server's list of connections */
  void *data;             /* upper layer's pointer */

  /* request state (reset in conn_request_reset) */
  ml_reqbuf_t *rb; /* from the pool while a message is parsed or handled */
  ml_request_t req;
  ml_header_t *cur; /* header being parsed */
  unsigned host_count;
  int error_status; /* status for an HPE_USER error (413, 414, 431) */
  char *body;       /* unread body bytes (malloc), body_len of body_cap */
  size_t body_len, body_cap;
  uint64_t body_total;     /* body bytes received for this request */
  union {                  /* one at a time, by the connection's state: */
    uint64_t header_start; /* a head is read (ML_CONN_HEADERS): uv_now at its message's begin */
    uint64_t probe_at;     /* probing (a FIN while the handler runs): the next look for a reset */
  };
  uint64_t activity; /* uv_now at the last read or write progress */

  /* unparsed input kept while the current request is handled (pipelining) */
  char *stash;
  size_t stash_len, stash_off;
  size_t feed_rest; /* bytes conn_feed still holds behind the request it dispatched */

  size_t write_queue;  /* bytes in uv_write requests */
  int64_t stream_left; /* bytes still due in a streamed response with Content-Length, or -1 */
  unsigned nrequests;  /* requests finished on this connection */
  int pending_ops;     /* file transfers in flight; the conn is not freed before they end */
  int open_handles;    /* tcp + timer until their close callbacks ran */

  uint8_t state;              /* ML_CONN_* */
  const char *feed_start;     /* the data of the llhttp_execute in progress (obs-fold checks) */
  const char *bad_line;       /* while ml__conn_error runs for a line llhttp refused: its bytes */
  size_t bad_line_len;        /* as sent, for the access log (see raw_request_line) */
  char last_byte;             /* the last byte given to llhttp_execute */
  uint8_t pause;              /* why llhttp paused: PAUSE_HEADERS or PAUSE_MESSAGE (http_conn.c) */
  uint8_t probe_step;         /* probing: the looks so far (each waits twice the one before) */
  unsigned req_active : 1;    /* on_request ran, ml_conn_finish not yet */
  unsigned resp_started : 1;  /* a response head was written */
  unsigned resp_done : 1;     /* the response body is complete */
  unsigned resp_chunked : 1;  /* streaming with chunked encoding */
  unsigned resp_no_body : 1;  /* HEAD, 204, 304: the body is not sent */
  unsigned close_after : 1;   /* close when this response is out */
  unsigned continue_sent : 1; /* 100 Continue went out */
  unsigned body_error : 1;    /* the body could not be read (see body_errno) */
  unsigned body_event : 1;    /* body bytes or its end arrived since the last on_body */
  unsigned want_writable : 1; /* on_writable is wanted */
  unsigned reading : 1;       /* uv_read_start is in effect */
  unsigned read_eof : 1;      /* the client shut its side */
  unsigned in_feed : 1;       /* conn_feed is on the stack */
  unsigned on_ready : 1;      /* in the server's ready list */
  unsigned upgraded : 1;      /* taken over (ml_conn_upgrade) or after CONNECT: no more HTTP */
  unsigned closing : 1;       /* ml_conn_close was called */
  unsigned lingering : 1;     /* graceful close: shut down, discarding input until EOF */
  unsigned tls_closing : 1;   /* an idle close waits for its close_notify to go out, no linger */
  unsigned counted : 1;       /* counted in srv->nconns */
  unsigned notified : 1;      /* on_close ran */
  unsigned skip_complete : 1; /* the next on_message_complete belongs to a body-less request */
  unsigned line_done : 1;     /* the request line was parsed whole (on_version_complete) */
  unsigned probing : 1;       /* a FIN while the handler runs: looking for a reset (probe_at) */
  unsigned own_headers : 2;   /* ML_OWN_*: the next head's headers hold these (http_response.c) */
  ml_conn_t *ready_next;      /* the server's ready list: finished requests with stashed input */

  /* after ml_conn_upgrade: a raw byte stream owned by the upper layer (http_conn.c) */
  const ml_conn_raw_cb_t *raw_cb; /* non-NULL once upgraded */
  void *raw_ud;
  uint64_t raw_deadline;   /* uv_now when on_deadline runs, or 0 */
  unsigned raw_paused : 1; /* ml_conn_raw_read(c, 0) */
  unsigned raw_eof : 1;    /* on_data got its n < 0 */

  /* HTTPS (ml_server_set_tls): the connection's TLS session, owned, freed with the connection.
   * Every byte read goes through it before the parser, every byte written after it (write_direct,
   * and http_file.c's pieces); ciphertext is taken out right after each write, so it leaves in the
   * order its plaintext was written. */
  ml_tls_t *tls;
  unsigned tls_ready : 1; /* the handshake completed */
  unsigned tls_fed : 1;   /* bytes came: the first read was checked for plain HTTP (tls_input) */
  /* the peer's name ("ip:port"), made on first use (ml_conn_peer_name: the access log, req.peer),
   * owned; a getpeername a request otherwise */
  char *peer_name;
};

struct ml_server_s {
  uv_loop_t *loop;
  ml_http_limits_t lim;
  const ml_log_t *log;
  ml_http_callbacks_t cb;
  void *ud;
  llhttp_settings_t settings;

  ml_listener_t *listeners[ML_MAX_LISTENERS];
  int nlisteners;
  uv_prepare_t prepare;   /* flushes staged output and runs the ready list before each poll */
  uv_timer_t grace_timer; /* shutdown grace */
  ml_conn_t *conns;       /* every open connection */
  unsigned nconns;        /* counted connections (max_conns) */
  uint64_t accepted, handled, requests; /* since the start (ml_server_stats_add) */
  int open_handles; /* listeners + prepare + grace timer + connections still open */

  char *out; /* staged output of out_owner */
  size_t out_len, out_cap;
  ml_conn_t *out_owner;

  ml_conn_t *ready;     /* connections whose next request is stashed */
  ml_reqbuf_t *free_rb; /* request-buffer pool */
  unsigned free_rb_count;

  char date[48]; /* "Date: ...\r\n" */
  size_t date_len;
  uint64_t date_tick; /* uv_now()/1000 of the cached date */

  int draining; /* ml_server_shutdown was called */
  int closing;  /* ml_server_close was called */
  void (*done_cb)(ml_server_t *, void *);
  void *done_ud;
  ml_tls_ctx_t *tls; /* HTTPS: owned (ml_server_set_tls), NULL for plain HTTP */
  int reuseport;     /* listeners share their port (ml_server_set_reuseport) */
  char *tls_out;     /* HTTPS: ciphertext on its way to raw_write (ML_READ_BUF_SIZE, lazily) */
  char rbuf[ML_READ_BUF_SIZE]; /* the read buffer, used by one read callback at a time */
};

/* http_server.c */
char *ml__out_reserve(ml_server_t *s, ml_conn_t *c, size_t n);
void ml__out_commit(ml_server_t *s, size_t n);
void ml__out_append(ml_server_t *s, ml_conn_t *c, const char *p, size_t n);
void ml__conn_flush(ml_conn_t *c);
void ml__conn_close_idle(ml_conn_t *c);
int ml__conn_write_direct(ml_conn_t *c, const char *p, size_t n);
/* HTTPS: the ciphertext the TLS session has for the peer, taken out into one malloc'd block
 * (*len bytes; NULL and 0 when there is none, or out of memory: then *len is (size_t)-1). */
char *ml__conn_tls_take(ml_conn_t *c, size_t *len);
void ml__conn_arm_timer(ml_conn_t *c);
void ml__conn_update_reading(ml_conn_t *c);
void ml__conn_maybe_free(ml_conn_t *c);
void ml__server_ready(ml_server_t *s, ml_conn_t *c);
ml_reqbuf_t *ml__reqbuf_get(ml_server_t *s);
void ml__reqbuf_put(ml_server_t *s, ml_reqbuf_t *rb);
const char *ml__date_header(ml_server_t *s, size_t *len);
void ml__server_conn_gone(ml_server_t *s, ml_conn_t *c);

/* http_conn.c */
void ml__conn_init_settings(llhttp_settings_t *st);
void ml__conn_start(ml_conn_t *c);
void ml__conn_feed(ml_conn_t *c, const char *data, size_t len);
void ml__conn_run_stash(ml_conn_t *c);
void ml__conn_stash_input(ml_conn_t *c, const char *data, size_t len);
void ml__conn_on_eof(ml_conn_t *c);
void ml__conn_error(ml_conn_t *c, int status, const char *why);
/* The same with text (under 96 bytes) for the body instead of "400 Bad Request\n". */
void ml__conn_error_body(ml_conn_t *c, int status, const char *why, const char *text);
void ml__conn_timeout(ml_conn_t *c);
void ml__conn_probe(ml_conn_t *c);
void ml__conn_raw_data(ml_conn_t *c, const char *data, ssize_t n);

#endif
