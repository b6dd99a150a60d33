/* bindings/ws.c: WebSocket connections as Lua sees them ("moonlet.ws" userdata, wrapped by
 * lua/moonlet/ws.lua). The server side is made by core.ws_accept from a request's exchange once
 * app.lua has validated the handshake: the HTTP connection is handed over (ml_conn_upgrade) and
 * becomes the transport. The client side, core.ws_connect, runs over a uv_tcp_t of its own, with
 * core/tls.c for wss:// (a client certificate too). Both sides share the frame code of core/ws.c,
 * the received-message queue, the waits, keep-alive and the close handshake. A client whose
 * handshake is answered without 101 reads that answer's body too (PH_REFUSED, bounded) and gives
 * the connecter the whole answer. core.ws_accept_raw makes a server-side ws in raw mode: the
 * upgraded connection's bytes as they come, no frames (moonlet.proxy's upgrade tunnel).
 *
 * Ownership:
 * - A ws_t is C memory, counted by `refs`: one for the Lua box (dropped by __gc), one for the
 *   server connection while attached (dropped by on_close), one per uv handle of its own (dropped
 *   by the close callback), one for a getaddrinfo in flight. It is freed when the count reaches 0,
 *   so the box's pointer is always valid and a closed ws still answers close_code and its queue.
 * - It is an instance resource (mlua_res_t): moonlet_free closes its transport and timers and from
 *   then on nobody is resumed (`dead`).
 * - Received messages are copied into a queue (or straight onto a waiting reader's stack). Reading
 *   pauses while more than RQ_HIGH bytes or RQ_MAX messages are queued and unread: a slow reader
 *   pushes back on the peer through TCP. Sending yields while more than WQ_HIGH bytes are unsent.
 * - Output goes to the transport frame by frame while it holds at most WQ_HIGH; the frames past
 *   that wait in the ws's out list (copies, owned by the ws, freed when sent, cut or freed), so
 *   a pong can go out between two frames of a long message, never inside one.
 * - Waits (mlua_task_wait): one reader, one pinger, one connecter, any number of writers. Each is
 *   resumed only by a callback (data, pong, writable, timer, connection gone) and has a cancel
 *   callback that undoes it without resuming. Receive and ping timeouts share one timer made on
 *   first use; keep-alive and the close handshake use the transport's deadline (the server
 *   connection's timer through ml_conn_raw_deadline, or the client's own timer).
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>

#include "../core/listen.h"
#include "../core/tls.h"
#include "../core/ws.h"
#include "mlua.h"

#define WS_MT "moonlet.ws"
#define WQ_HIGH (256 * 1024)  /* send yields above this much unsent */
#define WQ_LOW (64 * 1024)    /* client: writers wake below this */
#define RQ_HIGH (1024 * 1024) /* reading pauses above this much received and unread */
#define RQ_MAX 4096           /* ... or this many messages */
#define CLIENT_RBUF (64 * 1024)
#define HEAD_MAX (16 * 1024)      /* a client's handshake response head */
#define REFUSAL_MAX (1024 * 1024) /* the body of a handshake answered without 101 */
#define KEEP_BUF (64 * 1024)      /* scratch buffers above this are freed after use */

/* PH_REFUSED: the server answered the handshake with another status than 101; its body is read
 * (to its framing's end, REFUSAL_MAX bytes at most) so that the caller gets the whole answer. */
enum { PH_RESOLVE = 1, PH_CONNECT, PH_TLS, PH_HANDSHAKE, PH_OPEN, PH_REFUSED };
enum { RB_NONE = 1, RB_LENGTH, RB_CHUNKED, RB_CLOSE }; /* how a refusal's body ends */
enum { WK_READ = 1, WK_PING, WK_WRITE, WK_CONNECT };

typedef struct msg_s {
  struct msg_s *next;
  int binary;
  size_t len;
  char data[];
} msg_t;

/* Output not handed to the transport yet (see pump): the frames of a fragmented message past the
 * first WQ_HIGH bytes, the messages sent after it, and our close frame behind them. */
typedef struct out_s {
  struct out_s *next;
  int opcode;      /* of the first frame (ML_WS_OP_CLOSE: a close frame) */
  int rsv1;        /* the message is compressed: its first frame carries RSV1 */
  size_t len, off; /* payload bytes, and how many already went out */
  char data[];     /* the payload, compressed but not masked */
} out_t;

typedef struct ws_s ws_t;

typedef struct wait_s {
  struct wait_s *next, *prev; /* writers' list */
  ws_t *ws;
  mlua_task_t *task; /* NULL: nobody waits */
  int kind;          /* WK_* */
  uint64_t deadline; /* loop ms of a reader's or pinger's timeout, 0: none */
  uint64_t started;  /* pinger: when the ping left (hrtime) */
  unsigned gen;      /* writer: the wake-up round it parked in */
} wait_t;

typedef struct {
  uv_write_t req;
  ws_t *ws;
  size_t len;
  char data[];
} cwrite_t;

/* The client side's transport, allocated for clients only. */
typedef struct ws_io_s {
  int port;
  int handles_closing; /* tcp and timer were given to uv_close */
  int reading;
  ml_tls_ctx_t *tls_ctx;
  ml_tls_t *tls;
  char *server_name; /* SNI and certificate name */
  char *rbuf;        /* read buffer */
  ml_ws_buf_t head;  /* the request to send, then the response head as it comes */
  size_t wq;         /* bytes in uv_write requests */
  char key[25];
  ml_ws_pmd_t offer;
  int offered_deflate;
  wait_t connecter;
  int refused;      /* PH_REFUSED: the answer's status */
  int rmode;        /* ... RB_*: how its body ends */
  size_t hlen;      /* ... its head's bytes in `head` (the body follows) */
  size_t rlen;      /* ... RB_LENGTH: its Content-Length */
  union {           /* every stream call takes either (&io->tcp) */
    uv_tcp_t tcp;   /* a TCP connection, */
    uv_pipe_t pipe; /* or one to a Unix domain socket (opts.unix) */
  };
  int is_unix;
  uv_timer_t timer; /* connect timeout, then keep-alive and close deadlines */
  uv_connect_t creq;
  uv_getaddrinfo_t gai;
  uv_shutdown_t sreq;
} ws_io_t;

struct ws_s {
  mlua_res_t res;
  moonlet_t *m;
  int refs;
  int linked; /* in m->resources */
  int dead;   /* moonlet_free: resume nobody */
  int client;
  int raw; /* a raw upgraded connection (core.ws_accept's opts.raw): bytes, no frames, no close
              handshake, no keep-alive; what is received comes as "binary" messages */
  /* server transport */
  ml_conn_t *c; /* NULL once gone */
  int phase;    /* PH_* (a server-side ws is PH_OPEN from the start) */
  /* protocol */
  ml_ws_parser_t parser;  /* owns the deflate context when permessage-deflate was agreed */
  ml_ws_buf_t obuf, zbuf; /* scratch: a masked frame, a compressed message */
  msg_t *qhead, *qtail;
  size_t qbytes;
  unsigned qcount;
  int paused; /* reading stopped: the queue is full */
  wait_t reader, pinger;
  wait_t *writers;
  unsigned wgen;        /* writers' wake-up round */
  out_t *ohead, *otail; /* frames waiting for the transport to drain (see pump) */
  size_t obytes;        /* their payload bytes */
  int pong_due;         /* the latest ping is not answered yet: its payload is in pong_data */
  unsigned char pong_data[125];
  size_t pong_len;
  uv_timer_t *wtimer; /* receive and ping timeouts (made on first use) */
  int close_sent, close_recv, failed, gone, closing_transport;
  int close_code;     /* 0 while open */
  char *close_reason; /* malloc'd when the close begins */
  size_t close_reason_len;
  uint64_t last_rx, close_deadline;
  int pinged;                   /* a keep-alive ping left since last_rx */
  unsigned char ping_data[125]; /* the payload of ws:ping's ping: its pong must echo it */
  size_t ping_len;
  /* settings */
  uint64_t ping_interval, idle_timeout, close_timeout; /* ms, 0: off */
  size_t fragment; /* outgoing data frames carry at most this much, 0: one frame */
  ws_io_t *io; /* client side only: its transport (a server-side ws has none: small when idle) */
};

static void ws_input(ws_t *ws, const char *data, size_t len);
static void drained(ws_t *ws);
static void transport_close(ws_t *ws, int graceful);
static void ka_arm(ws_t *ws);
static void wtimer_arm(ws_t *ws);

/* nil and the short message of a UV_E* code ("closed", "timeout", ...): returns 2 */
static int push_err(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, e == UV_EAI_NONAME ? "host not found" : mlua_err_string(e));
  return 2;
}

/* nil, msg (or push_err's message for e) on a waiter a callback (or a close) wakes, another task
 * than the running one: through mlua_push_fail, protected under a host's allocator. Returns 2. */
static int fail_waiter(moonlet_t *m, mlua_task_t *t, int e, const char *msg) {
  if (!msg) msg = e == UV_EAI_NONAME ? "host not found" : mlua_err_string(e);
  return mlua_push_fail(m, t->co, msg, NULL);
}

/* -- Life cycle -------------------------------------------------------------------------------- */

static void drop_output(ws_t *ws) {
  while (ws->ohead) {
    out_t *o = ws->ohead;
    ws->ohead = o->next;
    free(o);
  }
  ws->otail = NULL;
  ws->obytes = 0;
}

static void ws_free(ws_t *ws) {
  drop_output(ws);
  while (ws->qhead) {
    msg_t *m = ws->qhead;
    ws->qhead = m->next;
    free(m);
  }
  ml_ws_parser_free(&ws->parser);
  free(ws->close_reason);
  ml_ws_buf_free(&ws->obuf);
  ml_ws_buf_free(&ws->zbuf);
  if (ws->client) {
    ml_ws_buf_free(&ws->io->head);
    if (ws->io->tls) ml_tls_free(ws->io->tls);
    if (ws->io->tls_ctx) ml_tls_ctx_free(ws->io->tls_ctx);
    free(ws->io->server_name);
    free(ws->io->rbuf);
    free(ws->io);
  }
  if (ws->linked) mlua_res_unlink(ws->m, &ws->res);
  free(ws);
}

static void ws_unref(ws_t *ws) {
  if (--ws->refs == 0) ws_free(ws);
}

static void handle_closed(uv_handle_t *h) {
  ws_t *ws = h->data;
  if (h == (uv_handle_t *)ws->wtimer) {
    free(ws->wtimer);
    ws->wtimer = NULL;
  }
  ws_unref(ws);
}

static void close_wtimer(ws_t *ws) {
  if (ws->wtimer && !uv_is_closing((uv_handle_t *)ws->wtimer))
    uv_close((uv_handle_t *)ws->wtimer, handle_closed);
}

static ws_t *ws_new(moonlet_t *m, int client) {
  ws_t *ws = calloc(1, sizeof *ws);
  if (!ws) return NULL;
  if (client && !(ws->io = calloc(1, sizeof *ws->io))) {
    free(ws);
    return NULL;
  }
  ws->m = m;
  ws->client = client;
  ws->reader.ws = ws->pinger.ws = ws;
  ws->reader.kind = WK_READ;
  ws->pinger.kind = WK_PING;
  if (client) {
    ws->io->connecter.ws = ws;
    ws->io->connecter.kind = WK_CONNECT;
  }
  ws->last_rx = uv_now(m->loop);
  return ws;
}

/* -- Waits ----------------------------------------------------------------------------------- */

/* Takes the task out of wait w (exactly one source resumes it), or returns NULL. */
static mlua_task_t *take(wait_t *w) {
  mlua_task_t *t = w->task;
  w->task = NULL;
  w->deadline = 0;
  if (w->kind == WK_WRITE && t) {
    ws_t *ws = w->ws;
    if (w->prev)
      w->prev->next = w->next;
    else
      ws->writers = w->next;
    if (w->next) w->next->prev = w->prev;
  }
  return t;
}

static void wait_cancel(mlua_task_t *t, void *wait) {
  wait_t *w = wait;
  (void)t;
  ws_t *ws = w->ws;
  int kind = w->kind;
  take(w);
  if (kind == WK_WRITE)
    free(w);
  else if (kind == WK_CONNECT)
    transport_close(ws, 0); /* a half-made connection is dropped */
  else
    wtimer_arm(ws);
}

static void resume_error(ws_t *ws, wait_t *w, int err, const char *msg) {
  mlua_task_t *t = take(w);
  if (!t || ws->dead) return;
  if (w->kind == WK_WRITE) free(w);
  mlua_task_resume(t, fail_waiter(ws->m, t, err, msg));
}

/* Resumes the writers parked before this call (true, or nil, "closed" when !ok); a writer that
 * parks again while they run waits for the next round. */
static void wake_writers(ws_t *ws, int ok) {
  unsigned round = ++ws->wgen;
  for (;;) {
    wait_t *w = ws->writers;
    while (w && w->gen == round)
      w = w->next;
    if (!w) return;
    mlua_task_t *t = take(w);
    free(w);
    if (!t || ws->dead) continue;
    if (ok) {
      lua_pushboolean(t->co, 1);
      mlua_task_resume(t, 1);
    } else {
      mlua_task_resume(t, fail_waiter(ws->m, t, UV_EPIPE, NULL));
    }
  }
}

static void wtimer_cb(uv_timer_t *h) {
  ws_t *ws = h->data;
  uint64_t now = uv_now(ws->m->loop);
  if (ws->reader.task && ws->reader.deadline && ws->reader.deadline <= now)
    resume_error(ws, &ws->reader, UV_ETIMEDOUT, NULL);
  if (ws->pinger.task && ws->pinger.deadline && ws->pinger.deadline <= now)
    resume_error(ws, &ws->pinger, UV_ETIMEDOUT, NULL);
  wtimer_arm(ws);
}

/* Arms the shared timer for the earliest reader or pinger deadline. */
static void wtimer_arm(ws_t *ws) {
  uint64_t dl = 0;
  if (ws->reader.task && ws->reader.deadline) dl = ws->reader.deadline;
  if (ws->pinger.task && ws->pinger.deadline && (!dl || ws->pinger.deadline < dl))
    dl = ws->pinger.deadline;
  if (!ws->wtimer) {
    if (!dl) return;
    ws->wtimer = malloc(sizeof *ws->wtimer);
    if (!ws->wtimer) return;
    uv_timer_init(ws->m->loop, ws->wtimer);
    ws->wtimer->data = ws;
    ws->refs++;
  }
  if (uv_is_closing((uv_handle_t *)ws->wtimer)) return;
  if (!dl) {
    uv_timer_stop(ws->wtimer);
    return;
  }
  uint64_t now = uv_now(ws->m->loop);
  uv_timer_start(ws->wtimer, wtimer_cb, mlua_wait_ms(dl > now ? dl - now : 0), 0);
}

/* -- Transport -------------------------------------------------------------------------------- */

static void client_write_cb(uv_write_t *req, int status) {
  cwrite_t *w = (cwrite_t *)req;
  ws_t *ws = w->ws;
  ws->io->wq -= w->len;
  free(w);
  if (status < 0) {
    transport_close(ws, 0);
    return;
  }
  if (ws->io->wq < WQ_LOW) drained(ws);
}

/* Sends bytes as they are (ciphertext with TLS) after whatever is queued. */
static int client_send_raw(ws_t *ws, const char *p, size_t n) {
  if (ws->io->wq == 0) {
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    int w = uv_try_write((uv_stream_t *)&ws->io->tcp, &b, 1);
    if (w >= 0) {
      p += w;
      n -= (size_t)w;
      if (n == 0) return 0;
    } else if (w != UV_EAGAIN) {
      return w;
    }
  }
  cwrite_t *w = malloc(sizeof *w + n);
  if (!w) return UV_ENOMEM;
  memcpy(w->data, p, n);
  w->ws = ws;
  w->len = n;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
  int r = uv_write(&w->req, (uv_stream_t *)&ws->io->tcp, &b, 1, client_write_cb);
  if (r < 0) {
    free(w);
    return r;
  }
  ws->io->wq += n;
  return 0;
}

static int client_flush_tls(ws_t *ws) {
  char buf[16384];
  while (ml_tls_pending(ws->io->tls) > 0) {
    size_t k = ml_tls_take(ws->io->tls, buf, sizeof buf);
    if (k == 0) break;
    int r = client_send_raw(ws, buf, k);
    if (r < 0) return r;
  }
  return 0;
}

static int t_write(ws_t *ws, const char *p, size_t n) {
  if (ws->gone || ws->closing_transport) return UV_EPIPE;
  if (!ws->client) return ws->c ? ml_conn_raw_write(ws->c, p, n) : UV_EPIPE;
  int r;
  if (ws->io->tls) {
    r = ml_tls_write(ws->io->tls, p, n);
    if (r == 0) r = client_flush_tls(ws);
  } else {
    r = client_send_raw(ws, p, n);
  }
  if (r < 0) transport_close(ws, 0);
  return r;
}

/* Bytes the transport holds unsent. */
static size_t t_raw_queued(ws_t *ws) {
  if (!ws->client) return ws->c ? ml_conn_write_queue(ws->c) : 0;
  return ws->io->wq;
}

/* Bytes unsent, ours included: what a writer's backpressure counts. */
static size_t t_queued(ws_t *ws) { return t_raw_queued(ws) + ws->obytes; }

static void client_read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *buf);

static void client_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  ws_t *ws = h->data;
  (void)suggested;
  *buf = uv_buf_init(ws->io->rbuf, CLIENT_RBUF);
}

static void t_read(ws_t *ws, int on) {
  if (!ws->client) {
    if (ws->c) ml_conn_raw_read(ws->c, on);
    return;
  }
  if (ws->io->handles_closing) return;
  if (on && !ws->io->reading) {
    if (uv_read_start((uv_stream_t *)&ws->io->tcp, client_alloc, client_read_cb) == 0)
      ws->io->reading = 1;
  } else if (!on && ws->io->reading) {
    uv_read_stop((uv_stream_t *)&ws->io->tcp);
    ws->io->reading = 0;
  }
}

static void client_timer_cb(uv_timer_t *h);

static void t_deadline(ws_t *ws, uint64_t ms) {
  if (!ws->client) {
    if (ws->c) ml_conn_raw_deadline(ws->c, ms);
    return;
  }
  if (ws->io->handles_closing) return;
  if (ms)
    uv_timer_start(&ws->io->timer, client_timer_cb, ms, 0);
  else
    uv_timer_stop(&ws->io->timer);
}

/* The transport is gone (server: on_close; client: its socket closed): wakes every waiter with
 * "closed" and sets close_code to what happened. Runs once. */
static void transport_gone(ws_t *ws) {
  if (ws->gone) return;
  ws->gone = 1;
  drop_output(ws);
  if (ws->linked) { /* nothing left for moonlet_free to close but the wait timer, closing now */
    mlua_res_unlink(ws->m, &ws->res);
    ws->linked = 0;
  }
  if (!ws->close_code) ws->close_code = ML_WS_CLOSE_ABNORMAL;
  close_wtimer(ws);
  if (ws->client && ws->io->connecter.task) resume_error(ws, &ws->io->connecter, UV_EPIPE, NULL);
  if (ws->reader.task && !ws->qhead) resume_error(ws, &ws->reader, UV_EPIPE, NULL);
  if (ws->pinger.task) resume_error(ws, &ws->pinger, UV_EPIPE, NULL);
  if (ws->writers) wake_writers(ws, 0);
}

static void client_tcp_closed(uv_handle_t *h) {
  ws_t *ws = h->data;
  transport_gone(ws);
  ws_unref(ws);
}

static void client_close_handles(ws_t *ws) {
  if (ws->io->handles_closing) return;
  ws->io->handles_closing = 1;
  if (ws->phase == PH_RESOLVE) uv_cancel((uv_req_t *)&ws->io->gai); /* on_resolved still runs */
  ws->io->reading = 0;
  uv_close((uv_handle_t *)&ws->io->tcp, client_tcp_closed);
  uv_close((uv_handle_t *)&ws->io->timer, handle_closed);
}

static void client_shutdown_cb(uv_shutdown_t *req, int status) {
  ws_t *ws = req->data;
  (void)status;
  client_close_handles(ws);
}

/* Closes the transport: graceful writes out what is queued first (the close frame). */
static void transport_close(ws_t *ws, int graceful) {
  if (!ws->client) {
    if (ws->c) ml_conn_close(ws->c, graceful);
    ws->closing_transport = 1;
    return;
  }
  if (ws->io->handles_closing) return;
  if (graceful && !ws->closing_transport && ws->phase == PH_OPEN) {
    ws->closing_transport = 1;
    if (ws->io->tls) {
      ml_tls_shutdown(ws->io->tls);
      client_flush_tls(ws);
    }
    ws->io->sreq.data = ws;
    if (uv_shutdown(&ws->io->sreq, (uv_stream_t *)&ws->io->tcp, client_shutdown_cb) == 0) {
      if (!ws->close_deadline) ws->close_deadline = uv_now(ws->m->loop) + ws->close_timeout;
      ka_arm(ws);
      return;
    }
  }
  ws->closing_transport = 1;
  client_close_handles(ws);
}

/* -- Sending -------------------------------------------------------------------------------- */

/* Writes one frame to the transport: masked (through obuf) on the client side. */
static int write_frame(ws_t *ws, int fin, int rsv1, int opcode, const char *data, size_t n) {
  uint8_t head[14], mask[4];
  int r;
  if (ws->raw) return opcode < 8 ? t_write(ws, data, n) : 0; /* (the bytes as they are) */
  if (ws->client) {
    if ((r = ml_ws_random(mask, 4)) < 0) return r;
    ws->obuf.len = 0;
    if ((r = ml_ws_buf_reserve(&ws->obuf, 14 + n)) < 0) return r;
    size_t hl = ml_ws_frame_head((uint8_t *)ws->obuf.p, fin, rsv1, opcode, n, mask);
    if (n) memcpy(ws->obuf.p + hl, data, n);
    ml_ws_mask(ws->obuf.p + hl, n, mask, 0);
    r = t_write(ws, ws->obuf.p, hl + n);
    if (ws->obuf.cap > KEEP_BUF) ml_ws_buf_free(&ws->obuf);
    return r;
  }
  size_t hl = ml_ws_frame_head(head, fin, rsv1, opcode, n, NULL);
  r = t_write(ws, (const char *)head, hl);
  if (r == 0 && n) r = t_write(ws, data, n);
  return r;
}

/* Writes the next frame of the oldest waiting output and drops that output once it is all out. */
static int write_next(ws_t *ws) {
  out_t *o = ws->ohead;
  size_t n = o->len - o->off;
  if (o->opcode < 8 && ws->fragment && n > ws->fragment) n = ws->fragment;
  int first = o->off == 0;
  int r = write_frame(ws, o->off + n == o->len, first && o->rsv1, first ? o->opcode : ML_WS_OP_CONT,
                      o->data + o->off, n);
  if (r < 0) return r;
  o->off += n;
  ws->obytes -= n;
  if (o->off == o->len) {
    ws->ohead = o->next;
    if (!ws->ohead) ws->otail = NULL;
    free(o);
  }
  return 0;
}

/* Hands waiting output to the transport, one frame at a time, while it holds at most WQ_HIGH.
 * Between two frames of a message the transport may carry a control frame (a pong, a ping): so
 * a fragmented message that takes long to go out does not hold our pongs back (RFC 6455 5.4);
 * frames never mix, since every frame is written whole in one call. Returns 1 when output still
 * waits (drained() runs once the transport drains), 0 when all went out, or a negative error. */
static int pump(ws_t *ws) {
  for (;;) {
    while (ws->ohead && t_raw_queued(ws) <= WQ_HIGH) {
      int r = write_next(ws);
      if (r < 0) return r;
    }
    if (!ws->ohead) return 0;
    if (ws->client) return 1; /* client_write_cb calls drained() below WQ_LOW */
    int r = ws->c ? ml_conn_wants_writable(ws->c) : UV_EPIPE;
    if (r != 0) return r; /* 1: on_writable will come; 0: it drained meanwhile, go on */
  }
}

static int enqueue(ws_t *ws, int opcode, int rsv1, const char *data, size_t len, size_t off) {
  out_t *o = malloc(sizeof *o + (len - off));
  if (!o) return UV_ENOMEM;
  o->next = NULL;
  o->opcode = off ? ML_WS_OP_CONT : opcode;
  o->rsv1 = off ? 0 : rsv1;
  o->len = len - off;
  o->off = 0;
  if (o->len) memcpy(o->data, data + off, o->len);
  if (ws->otail)
    ws->otail->next = o;
  else
    ws->ohead = o;
  ws->otail = o;
  ws->obytes += o->len;
  return 0;
}

/* Sends one message (or control frame): compressed when permessage-deflate is on, split into
 * frames of ws->fragment bytes when set, masked on the client side. Pings and pongs go out at
 * once, between two frames of a message at most. A data message goes out at once while the
 * transport holds at most WQ_HIGH and nothing waits before it; the rest waits in order (a copy,
 * compressed in send order) and pump() sends it as the peer reads. A close frame waits behind the
 * messages sent before it. */
static int send_message(ws_t *ws, int opcode, const char *data, size_t len) {
  int rsv1 = 0;
  if (opcode < 8 && ws->parser.pmd) {
    int r = ml_ws_deflate_message(ws->parser.pmd, data, len, &ws->zbuf);
    if (r < 0) return r;
    data = ws->zbuf.p ? ws->zbuf.p : "";
    len = ws->zbuf.len;
    rsv1 = 1;
  }
  int r = 0;
  if (opcode == ML_WS_OP_PING || opcode == ML_WS_OP_PONG) {
    r = write_frame(ws, 1, 0, opcode, data, len);
  } else if (ws->ohead) {
    r = enqueue(ws, opcode, rsv1, data, len, 0);
    if (r == 0) r = pump(ws);
  } else {
    size_t frag = opcode < 8 && ws->fragment ? ws->fragment : len, off = 0;
    do {
      size_t n = len - off < frag ? len - off : frag;
      r = write_frame(ws, off + n == len, off == 0 && rsv1, off ? ML_WS_OP_CONT : opcode,
                      data + off, n);
      off += n;
    } while (r == 0 && off < len && t_raw_queued(ws) <= WQ_HIGH);
    if (r == 0 && off < len) {
      r = enqueue(ws, opcode, rsv1, data, len, off);
      if (r == 0) r = pump(ws);
    }
  }
  if (ws->zbuf.cap > KEEP_BUF) ml_ws_buf_free(&ws->zbuf);
  return r < 0 ? r : 0;
}

/* Answers the latest ping. RFC 6455 5.5.3 lets an endpoint answer only the latest of several
 * pings: while the transport holds more than WQ_HIGH (a peer that pings without reading), the
 * pong waits in pong_data, each ping replacing the one before, and goes out from drained(); so
 * a ping flood cannot grow the queue, yet the last ping is always answered. */
static void answer_ping(ws_t *ws, const char *data, size_t len) {
  if (ws->close_sent) return;
  if (t_raw_queued(ws) <= WQ_HIGH) {
    ws->pong_due = 0;
    send_message(ws, ML_WS_OP_PONG, data, len);
    return;
  }
  memcpy(ws->pong_data, data, len);
  ws->pong_len = len;
  if (!ws->pong_due && !ws->client && ws->c && ml_conn_wants_writable(ws->c) == 0) {
    send_message(ws, ML_WS_OP_PONG, data, len);
    return;
  }
  ws->pong_due = 1;
}

/* The transport drained below its low-water mark: the due pong first, then waiting output, then
 * the writers when the backlog is small again. */
static void drained(ws_t *ws) {
  if (ws->gone) return;
  if (ws->pong_due && !ws->close_sent) {
    ws->pong_due = 0;
    if (send_message(ws, ML_WS_OP_PONG, (const char *)ws->pong_data, ws->pong_len) < 0) return;
  }
  ws->pong_due = 0;
  if (ws->ohead && pump(ws) < 0) return;
  /* while output still waits, pump() asked for the next drain: the writers wait for it */
  if (ws->writers && t_queued(ws) <= WQ_HIGH) wake_writers(ws, 1);
}

/* Drops the output that waits (the rest of a message may be cut: the connection is ending); a
 * close frame of ours waiting behind it goes out now, as control frames may between fragments. */
static void cut_output(ws_t *ws) {
  out_t *last = ws->otail;
  if (last && last->opcode == ML_WS_OP_CLOSE && last->off == 0) {
    ws->otail = NULL; /* taken out of the list before the list is dropped */
    out_t **pp = &ws->ohead;
    while (*pp != last)
      pp = &(*pp)->next;
    *pp = NULL;
    drop_output(ws);
    write_frame(ws, 1, 0, ML_WS_OP_CLOSE, last->data, last->len);
    free(last);
    return;
  }
  drop_output(ws);
}

static void set_reason(ws_t *ws, const char *reason, size_t len) {
  if (len > 123) len = 123;
  char *r = realloc(ws->close_reason, len + 1);
  if (!r) return;
  memcpy(r, reason, len);
  r[len] = 0;
  ws->close_reason = r;
  ws->close_reason_len = len;
}

/* Sends our close frame once. code 0 or 1005: a close frame without a status. */
static void send_close(ws_t *ws, int code, const char *reason, size_t rlen) {
  if (ws->close_sent) return;
  ws->close_sent = 1;
  char pl[125];
  size_t n =
      code && code != ML_WS_CLOSE_NO_STATUS ? ml_ws_close_payload(pl, code, reason, rlen) : 0;
  send_message(ws, ML_WS_OP_CLOSE, pl, n);
  ws->close_deadline = uv_now(ws->m->loop) + ws->close_timeout;
  ka_arm(ws);
}

/* The peer broke the protocol (or went idle): close with `code` and drop the connection. */
static void fail(ws_t *ws, int code, const char *why) {
  if (ws->failed) return;
  ws->failed = 1;
  cut_output(ws); /* a close frame may come between two frames of a message (RFC 6455 5.4) */
  if (!ws->close_recv) {
    ws->close_code = code;
    set_reason(ws, why, strlen(why));
  }
  send_close(ws, code, why, strlen(why));
  transport_close(ws, 1);
}

/* -- Keep-alive and the close deadline ------------------------------------------------------ */

static void ka_arm(ws_t *ws) {
  if (ws->gone || ws->dead) return;
  uint64_t now = uv_now(ws->m->loop), dl = 0;
  if (ws->close_sent || ws->close_recv || ws->closing_transport) {
    dl = ws->close_deadline;
  } else if (!ws->paused) { /* paused, we do not read: the peer's silence proves nothing */
    if (ws->ping_interval && !ws->pinged) dl = ws->last_rx + ws->ping_interval;
    if (ws->idle_timeout) {
      uint64_t d = ws->last_rx + ws->idle_timeout;
      if (!dl || d < dl) dl = d;
    }
  }
  t_deadline(ws, dl ? (dl > now ? dl - now : 1) : 0);
}

static void ka_fire(ws_t *ws) {
  uint64_t now = uv_now(ws->m->loop);
  if (ws->close_sent || ws->close_recv || ws->closing_transport) {
    if (ws->close_deadline && now >= ws->close_deadline) {
      transport_close(ws, 0); /* the peer did not finish the close handshake in time */
      return;
    }
  } else if (!ws->paused) {
    if (ws->idle_timeout && now >= ws->last_rx + ws->idle_timeout) {
      fail(ws, ML_WS_CLOSE_GOING_AWAY, "idle timeout");
      return;
    }
    if (ws->ping_interval && !ws->pinged && now >= ws->last_rx + ws->ping_interval) {
      ws->pinged = 1;
      send_message(ws, ML_WS_OP_PING, "", 0);
    }
  }
  ka_arm(ws);
}

/* -- Receiving ------------------------------------------------------------------------------ */

static int input_ended(const ws_t *ws) { return ws->close_recv || ws->failed || ws->gone; }

static void push_kind(lua_State *L, int binary) {
  if (binary)
    lua_pushliteral(L, "binary");
  else
    lua_pushliteral(L, "text");
}

typedef struct {
  const char *data;
  size_t len;
  int binary;
} message_t;

static int push_message(lua_State *L, void *ud) {
  message_t *a = ud;
  lua_pushlstring(L, a->data, a->len);
  push_kind(L, a->binary);
  return 2;
}

/* Pushes a message (data, kind) on a reader's coroutine from a callback: under a host's allocator
 * (or for a large message) through mlua_push_protected, so that memory running out gives the
 * reader nil, "not enough memory" instead of LuaJIT's panic; a small one directly (the hot path:
 * a pcall per message otherwise). Returns the count, negated when memory ran out. */
static int deliver(ws_t *ws, lua_State *co, const char *data, size_t len, int binary) {
  message_t a = {data, len, binary};
  if (!ws->m->cfg.alloc && len < 65536) return push_message(co, &a);
  int n = mlua_push_protected(ws->m, co, push_message, &a);
  return lua_isnil(co, -n) ? -n : n;
}

/* Pops the oldest queued message onto L (data, kind); resumes reading below the low mark. From a
 * callback (cb: L is a parked reader) it is pushed through deliver, and stays queued when memory
 * ran out (the reader gets nil, "not enough memory"). */
static int pop_message(lua_State *L, ws_t *ws, int cb) {
  msg_t *m = ws->qhead;
  message_t a = {m->data, m->len, m->binary};
  int n = cb ? deliver(ws, L, m->data, m->len, m->binary) : push_message(L, &a);
  if (n < 0) return -n; /* (nil, "not enough memory") */
  ws->qhead = m->next;
  if (!ws->qhead) ws->qtail = NULL;
  ws->qbytes -= m->len;
  ws->qcount--;
  free(m);
  if (ws->paused && ws->qbytes < RQ_HIGH / 2 && ws->qcount < RQ_MAX / 2) {
    ws->paused = 0;
    if (!input_ended(ws)) {
      t_read(ws, 1);
      ws->last_rx = uv_now(ws->m->loop); /* the idle and ping clocks start again from here */
      ka_arm(ws);
    }
  }
  return 2;
}

static void on_peer_close(ws_t *ws, const ml_ws_event_t *ev) {
  ws->close_recv = 1;
  ws->close_code = ev->code;
  set_reason(ws, ev->data, ev->len);
  cut_output(ws); /* RFC 6455 5.5.1: the rest of a message may go out first, or not */
  if (!ws->close_sent) send_close(ws, ev->code, ev->data, ev->len); /* echo status and reason */
  if (!ws->client) {
    transport_close(ws, 1); /* the server closes the TCP connection first */
  } else {
    if (!ws->close_deadline) ws->close_deadline = uv_now(ws->m->loop) + ws->close_timeout;
    ka_arm(ws);
  }
}

/* Feeds received bytes to the parser and acts on each event; then resumes a reader or pinger
 * that can go on. Runs from a read callback only. */
static void ws_input(ws_t *ws, const char *data, size_t len) {
  int got_message = 0, got_pong = 0, ndirect = 0;
  mlua_task_t *direct = NULL; /* the reader whose message (or nil, err) is already on its stack */
  ws->last_rx = uv_now(ws->m->loop);
  ws->pinged = 0;
  while (len > 0 && !ws->close_recv && !ws->failed && !ws->gone) {
    ml_ws_event_t ev = {0};
    size_t used = len;
    if (ws->raw) { /* every read is a message of its own */
      ev.type = ML_WS_EV_MESSAGE;
      ev.opcode = ML_WS_OP_BINARY;
      ev.data = data;
      ev.len = len;
    } else {
      used = ml_ws_parse(&ws->parser, data, len, &ev);
    }
    data += used;
    len -= used;
    switch (ev.type) {
    case ML_WS_EV_MESSAGE:
      got_message = 1;
      if (ws->reader.task && !ws->qhead && !direct && !ws->dead) {
        direct = take(&ws->reader);
        ndirect = deliver(ws, direct->co, ev.data, ev.len, ev.opcode == ML_WS_OP_BINARY);
        if (ndirect > 0) break;
        ndirect = -ndirect; /* memory ran out: the reader gets nil, "not enough memory", the
                               message queues for its next receive */
      }
      msg_t *m = malloc(sizeof *m + ev.len);
      if (!m) {
        fail(ws, ML_WS_CLOSE_INTERNAL, "out of memory");
        break;
      }
      m->next = NULL;
      m->binary = ev.opcode == ML_WS_OP_BINARY;
      m->len = ev.len;
      memcpy(m->data, ev.data, ev.len);
      if (ws->qtail)
        ws->qtail->next = m;
      else
        ws->qhead = m;
      ws->qtail = m;
      ws->qbytes += ev.len;
      ws->qcount++;
      break;
    case ML_WS_EV_PING: answer_ping(ws, ev.data, ev.len); break;
    case ML_WS_EV_PONG: /* ws:ping's answer echoes its data; other pongs prove nothing */
      if (ev.len == ws->ping_len && (!ev.len || memcmp(ev.data, ws->ping_data, ev.len) == 0))
        got_pong = 1;
      break;
    case ML_WS_EV_CLOSE: on_peer_close(ws, &ev); break;
    case ML_WS_EV_ERROR: fail(ws, ev.code, ev.data); break;
    default: break;
    }
  }
  if (!ws->paused && !input_ended(ws) && (ws->qbytes > RQ_HIGH || ws->qcount > RQ_MAX)) {
    ws->paused = 1; /* the reader is slow: let TCP push back on the peer */
    t_read(ws, 0);
  }
  ka_arm(ws);
  if (direct) {
    wtimer_arm(ws);
    mlua_task_resume(direct, ndirect);
  }
  if (ws->dead) return;
  if (ws->reader.task && (ws->qhead || input_ended(ws))) {
    mlua_task_t *t = take(&ws->reader);
    wtimer_arm(ws);
    if (ws->qhead) {
      mlua_task_resume(t, pop_message(t->co, ws, 1));
    } else {
      mlua_task_resume(t, fail_waiter(ws->m, t, UV_EPIPE, NULL));
    }
  }
  (void)got_message;
  if (got_pong && ws->pinger.task && !ws->dead) {
    mlua_task_t *t = take(&ws->pinger);
    uint64_t rtt = uv_hrtime() - ws->pinger.started;
    wtimer_arm(ws);
    lua_pushnumber(t->co, (double)rtt / 1e9);
    mlua_task_resume(t, 1);
  }
  if (ws->pinger.task && input_ended(ws) && !ws->dead)
    resume_error(ws, &ws->pinger, UV_EPIPE, NULL);
}

/* The peer closed its side, or reading failed. */
static void peer_eof(ws_t *ws) {
  if (!ws->close_recv && !ws->failed && !ws->close_code) ws->close_code = ML_WS_CLOSE_ABNORMAL;
  transport_close(ws, 0);
}

/* -- Server side: the upgraded connection ---------------------------------------------------- */

static void srv_on_data(ml_conn_t *c, const char *data, ssize_t n, void *ud) {
  (void)c;
  ws_t *ws = ud;
  if (n < 0) {
    peer_eof(ws);
    return;
  }
  ws_input(ws, data, (size_t)n);
}

static void srv_on_writable(ml_conn_t *c, void *ud) {
  (void)c;
  drained(ud);
}

static void srv_on_deadline(ml_conn_t *c, void *ud) {
  (void)c;
  ka_fire(ud);
}

static void srv_on_shutdown(ml_conn_t *c, void *ud) {
  (void)c;
  ws_t *ws = ud;
  static const char why[] = "server shutting down";
  if (!ws->close_code) {
    ws->close_code = ML_WS_CLOSE_GOING_AWAY;
    set_reason(ws, why, sizeof why - 1);
  }
  if (ws->raw) { /* no close frame: the connection ends once its output is out */
    ws->close_sent = 1;
    transport_close(ws, 1);
    return;
  }
  send_close(ws, ML_WS_CLOSE_GOING_AWAY, why, sizeof why - 1);
}

static void srv_on_close(ml_conn_t *c, void *ud) {
  (void)c;
  ws_t *ws = ud;
  ws->c = NULL;
  transport_gone(ws);
  ws_unref(ws);
}

static const ml_conn_raw_cb_t srv_callbacks = {srv_on_data, srv_on_writable, srv_on_deadline,
                                               srv_on_shutdown, srv_on_close};

/* -- Resources ------------------------------------------------------------------------------ */

/* moonlet_free: closes what is open; nobody is resumed from now on. */
static void ws_res_close(mlua_res_t *r) {
  ws_t *ws = (ws_t *)r;
  ws->linked = 0;
  ws->dead = 1;
  ws->reader.task = ws->pinger.task = NULL;
  if (ws->client) ws->io->connecter.task = NULL;
  while (ws->writers) {
    wait_t *w = ws->writers;
    ws->writers = w->next;
    free(w);
  }
  close_wtimer(ws);
  if (ws->client) {
    client_close_handles(ws);
  } else if (ws->c) {
    ml_conn_close(ws->c, 0);
  }
}

static void read_settings(lua_State *L, int idx, ws_t *ws) {
  size_t max_message = ML_WS_MAX_MESSAGE_DEFAULT;
  double ping = 30, idle = 75, close_to = 3;
  if (idx && lua_istable(L, idx)) { /* (idx 0: the defaults) */
    lua_getfield(L, idx, "max_message");
    if (!lua_isnil(L, -1)) max_message = (size_t)luaL_checknumber(L, -1);
    lua_getfield(L, idx, "ping_interval");
    if (!lua_isnil(L, -1)) ping = luaL_checknumber(L, -1);
    lua_getfield(L, idx, "idle_timeout");
    if (!lua_isnil(L, -1)) idle = luaL_checknumber(L, -1);
    lua_getfield(L, idx, "close_timeout");
    if (!lua_isnil(L, -1)) close_to = luaL_checknumber(L, -1);
    lua_getfield(L, idx, "fragment_size");
    if (!lua_isnil(L, -1)) ws->fragment = (size_t)luaL_checknumber(L, -1);
    lua_pop(L, 5);
  }
  ml_ws_parser_init(&ws->parser, !ws->client, max_message);
  ws->ping_interval = ping > 0 ? mlua_ms(ping) : 0;
  ws->idle_timeout = idle > 0 ? mlua_ms(idle) : 0;
  ws->close_timeout = close_to > 0 ? mlua_ms(close_to) : 1;
}

/* The deflate wishes of opts.deflate (true or a table), or 0 when it is off. */
static int read_deflate(lua_State *L, int idx, ml_ws_pmd_t *want) {
  memset(want, 0, sizeof *want);
  if (!lua_istable(L, idx)) return 0;
  lua_getfield(L, idx, "deflate");
  int on = 0;
  if (lua_istable(L, -1)) {
    on = 1;
    int t = lua_gettop(L);
    lua_getfield(L, t, "server_no_context_takeover");
    want->server_no_context_takeover = lua_toboolean(L, -1);
    lua_getfield(L, t, "client_no_context_takeover");
    want->client_no_context_takeover = lua_toboolean(L, -1);
    lua_getfield(L, t, "server_max_window_bits");
    want->server_max_window_bits = (int)luaL_optinteger(L, -1, 0);
    lua_getfield(L, t, "client_max_window_bits");
    want->client_max_window_bits = (int)luaL_optinteger(L, -1, 0);
    lua_pop(L, 4);
    if ((want->server_max_window_bits &&
         (want->server_max_window_bits < 9 || want->server_max_window_bits > 15)) ||
        (want->client_max_window_bits &&
         (want->client_max_window_bits < 9 || want->client_max_window_bits > 15)))
      luaL_error(L, "moonlet: deflate window bits must be 9..15");
  } else {
    on = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  return on;
}

static void push_box(lua_State *L, ws_t *ws) {
  ws_t **box = lua_newuserdata(L, sizeof *box);
  *box = ws;
  ws->refs++;
  luaL_getmetatable(L, WS_MT);
  lua_setmetatable(L, -2);
}

static int valid_header_value(const char *s) {
  for (; *s; s++)
    if ((unsigned char)*s < 32 || *s == 127) return 0;
  return 1;
}

/* Answers the request of exchange x (stack slot 1) with the 101 head[0, len) and takes its
 * connection over for ws, which is open from then on: pushes its box and returns 1, or frees ws,
 * pushes nil, err and returns 0 when the exchange cannot upgrade. */
static int upgrade(lua_State *L, moonlet_t *m, ws_t *ws, const char *head, size_t len) {
  int err = 0;
  ml_conn_t *c = mlua_exchange_upgrade(L, 1, head, len, &srv_callbacks, ws, &err);
  if (!c) {
    ws_free(ws);
    push_err(L, err);
    return 0;
  }
  ws->c = c;
  ws->refs++; /* the connection's */
  mlua_res_link(m, &ws->res, ws_res_close);
  ws->linked = 1;
  ws->phase = PH_OPEN;
  push_box(L, ws);
  return 1;
}

/* syntax: ws, extensions = core.ws_accept(x, key, protocol, offer, opts, extra) -- answers 101 and
 * turns the request's connection into a WebSocket; protocol: the chosen subprotocol or nil; offer:
 * the Sec-WebSocket-Extensions header or nil; opts: max_message, ping_interval, idle_timeout,
 * close_timeout, fragment_size, deflate; extra: more header lines for the 101, each ending in CRLF,
 * or nil (ws.lua formats and checks them) */
static int l_accept(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t klen, olen = 0;
  const char *key = luaL_checklstring(L, 2, &klen);
  const char *protocol = luaL_optstring(L, 3, NULL);
  const char *offer = lua_isnoneornil(L, 4) ? NULL : luaL_checklstring(L, 4, &olen);
  if (protocol && (!valid_header_value(protocol) || strlen(protocol) > 256))
    return luaL_argerror(L, 3, "a subprotocol is a short token without control characters");
  char accept[29];
  ml_ws_accept_key(key, klen, accept);
  if (!accept[0]) /* (the handler fails: a 500, logged) */
    return luaL_error(L, "moonlet.ws: no SHA-1 for the handshake (OpenSSL is not installed)");
  ws_t *ws = ws_new(m, 0);
  if (!ws) return luaL_error(L, "moonlet: out of memory");
  read_settings(L, 5, ws);
  ml_ws_pmd_t want, agreed;
  char ext[256] = "";
  if (offer && read_deflate(L, 5, &want) &&
      ml_ws_pmd_negotiate(offer, olen, &want, &agreed, ext, sizeof ext)) {
    ml_ws_deflate_t *d = ml_ws_deflate_new(&agreed, 1);
    if (d)
      ml_ws_parser_set_deflate(&ws->parser, d);
    else
      ext[0] = 0;
  }
  char hdrs[640]; /* formatted on the stack: a handshake leaves no garbage behind */
  int hlen = snprintf(hdrs, sizeof hdrs,
                      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                      "%s%s%s%s%s%s",
                      accept, protocol ? "Sec-WebSocket-Protocol: " : "", protocol ? protocol : "",
                      protocol ? "\r\n" : "", ext[0] ? "Sec-WebSocket-Extensions: " : "", ext,
                      ext[0] ? "\r\n" : "");
  const char *head = hdrs;
  size_t headlen = (size_t)hlen;
  if (lua_type(L, 6) == LUA_TSTRING) { /* the extra lines: the 101 is then a Lua string */
    lua_pushlstring(L, hdrs, headlen);
    lua_pushvalue(L, 6);
    lua_concat(L, 2);
    head = lua_tolstring(L, -1, &headlen); /* (stays on the stack until we return) */
  }
  if (!upgrade(L, m, ws, head, headlen)) return 2; /* nil, err */
  if (ext[0])
    lua_pushstring(L, ext);
  else
    lua_pushnil(L);
  ka_arm(ws);
  return 2;
}

/* syntax: conn = core.ws_accept_raw(x, header_lines) -- answers the request of exchange x with a
 * 101 of header_lines (each "Name: value\r\n", Upgrade and Connection among them) and hands its
 * connection over as a raw byte stream (another protocol than WebSocket: moonlet.proxy's upgrade
 * tunnel). The object is a ws in raw mode: receive gives the bytes as they come ("binary"), send
 * writes bytes (yielding while more than WQ_HIGH are unsent), close ends the connection once its
 * output is out; no frames, pings or close handshake. nil, err when the exchange cannot upgrade. */
static int l_accept_raw(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  size_t hlen;
  const char *head = luaL_checklstring(L, 2, &hlen);
  ws_t *ws = ws_new(m, 0);
  if (!ws) return luaL_error(L, "moonlet: out of memory");
  read_settings(L, 0, ws);
  ws->raw = 1;
  ws->ping_interval = ws->idle_timeout = 0;
  if (!upgrade(L, m, ws, head, hlen)) return 2; /* nil, err */
  return 1;
}

/* -- Client side ------------------------------------------------------------------------------ */

static void connect_fail(ws_t *ws, int err, const char *msg) {
  mlua_task_t *t = ws->io->connecter.task;
  take(&ws->io->connecter);
  transport_close(ws, 0);
  if (!t || ws->dead) return;
  mlua_task_resume(t, fail_waiter(ws->m, t, err, msg));
}

static int header_is(const char *name, size_t nlen, const char *lit) {
  return strlen(lit) == nlen && strncasecmp(name, lit, nlen) == 0;
}

static int has_token(const char *v, size_t n, const char *tok) {
  size_t tl = strlen(tok);
  const char *end = v + n;
  while (v < end) {
    while (v < end && (*v == ' ' || *v == '\t' || *v == ','))
      v++;
    const char *s = v;
    while (v < end && *v != ',')
      v++;
    const char *e = v;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
      e--;
    if ((size_t)(e - s) == tl && strncasecmp(s, tok, tl) == 0) return 1;
  }
  return 0;
}

/* The next header line of a response head: *line (advanced past it) up to `end`. Returns 1 with
 * its name (*name, *nl bytes) and its value without the blanks around it (*v, *vl bytes), 0 for a
 * line without a colon, -1 at the end. */
static int next_header(const char **line, const char *end, const char **name, size_t *nl,
                       const char **v, size_t *vl) {
  const char *l = *line;
  if (l >= end) return -1;
  const char *le = memchr(l, '\n', (size_t)(end - l));
  if (!le) le = end;
  *line = le + 1;
  const char *lend = le > l && le[-1] == '\r' ? le - 1 : le;
  const char *colon = memchr(l, ':', (size_t)(lend - l));
  if (!colon) return 0;
  const char *b = colon + 1;
  while (b < lend && (*b == ' ' || *b == '\t'))
    b++;
  const char *e = lend;
  while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
    e--;
  *name = l;
  *nl = (size_t)(colon - l);
  *v = b;
  *vl = (size_t)(e - b);
  return 1;
}

/* The connecter's results, for mlua_push_result: the box and a table of the response headers
 * (names in lower case) of the head in ws->io->head (hlen bytes, to its blank line). The box is
 * made last: once it is, nothing else can fail. */
typedef struct {
  ws_t *ws;
  size_t hlen;
} handshake_t;

/* Pushes a table of the header lines of the response head p (hlen bytes). */
static void push_head_headers(lua_State *L, const char *p, size_t hlen) {
  const char *end = p + hlen;
  const char *line = memchr(p, '\n', hlen), *hn, *v;
  size_t nl, vl;
  int r;
  lua_newtable(L);
  for (line = line ? line + 1 : end; (r = next_header(&line, end, &hn, &nl, &v, &vl)) >= 0;) {
    if (r == 0) continue;
    char name[64];
    size_t k = nl < sizeof name ? nl : sizeof name - 1;
    for (size_t i = 0; i < k; i++)
      name[i] = (char)((hn[i] >= 'A' && hn[i] <= 'Z') ? hn[i] + 32 : hn[i]);
    lua_pushlstring(L, name, k);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);
    if (lua_isstring(L, -1)) { /* a repeat: old, separator, new */
      lua_pushstring(L, header_is(name, k, "set-cookie") ? "\n" : ", ");
      lua_pushlstring(L, v, vl);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, v, vl);
    }
    lua_rawset(L, -3);
  }
}

static int push_handshake(lua_State *L, void *ud) {
  handshake_t *a = ud;
  push_head_headers(L, a->ws->io->head.p, a->hlen);
  push_box(L, a->ws);
  lua_insert(L, -2); /* box, headers */
  return 2;
}

/* -- A handshake answered without 101 ----------------------------------------------------------
 * Not an error of the transport: the server said no (401, 403, 404, a redirect), and a proxy must
 * pass its answer on whole. Its body is read as an HTTP/1.1 client would (RFC 9112 6.3: none for
 * 1xx, 204 and 304; chunked when the last transfer coding is; Content-Length; else to the close),
 * bounded by REFUSAL_MAX and by the connect timeout that still runs, then the connecter gets nil,
 * "handshake failed: status N" and { status =, headers =, body = }. */

/* Scans the chunked body at p (n bytes); out (room for n bytes, or NULL) gets its data. Returns
 * the bytes it takes up to the end of its trailers, 0 when it is not all there yet, -1 when it is
 * malformed; *outlen the data's length. */
static long dechunk(const char *p, size_t n, char *out, size_t *outlen) {
  size_t i = 0, o = 0;
  for (;;) {
    const char *le = memchr(p + i, '\n', n - i);
    if (!le) return n - i > 1024 ? -1 : 0;
    size_t size = 0, digits = 0;
    for (const char *q = p + i; q < le && digits <= 12; q++, digits++) {
      int c = *q, d = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                             : -1;
      if (d < 0) break;
      size = size * 16 + (size_t)d;
    }
    if (digits == 0 || digits > 12) return -1;
    i = (size_t)(le - p) + 1;
    if (size == 0) { /* trailers (dropped) to an empty line */
      for (;;) {
        le = memchr(p + i, '\n', n - i);
        if (!le) return n - i > 16384 ? -1 : 0;
        size_t ll = (size_t)(le - (p + i));
        i = (size_t)(le - p) + 1;
        if (ll == 0 || (ll == 1 && p[i - 2] == '\r')) {
          *outlen = o;
          return (long)i;
        }
      }
    }
    if (n - i < size + 2) return size > REFUSAL_MAX ? -1 : 0;
    if (out) memcpy(out + o, p + i, size);
    o += size;
    i += size;
    if (p[i] == '\r') i++;
    if (p[i] != '\n') return -1;
    i++;
  }
}

typedef struct {
  ws_t *ws;
  const char *body;
  size_t blen;
} refusal_t;

static int push_refusal(lua_State *L, void *ud) {
  refusal_t *a = ud;
  char msg[64];
  snprintf(msg, sizeof msg, "handshake failed: status %d", a->ws->io->refused);
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, a->ws->io->refused);
  lua_setfield(L, -2, "status");
  push_head_headers(L, a->ws->io->head.p, a->ws->io->hlen);
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, a->body, a->blen);
  lua_setfield(L, -2, "body");
  return 3;
}

/* The refusal's answer is complete when its body is (eof: the server closed its side): resumes
 * the connecter with it and closes the transport; fails it when the body broke off. */
static void refusal_check(ws_t *ws, int eof) {
  ws_io_t *io = ws->io;
  const char *b = io->head.p + io->hlen;
  size_t have = io->head.len - io->hlen, blen = 0;
  char *decoded = NULL;
  if (io->rmode == RB_LENGTH) {
    if (have < io->rlen) {
      if (eof) connect_fail(ws, UV_EPIPE, NULL);
      return;
    }
    blen = io->rlen;
  } else if (io->rmode == RB_CHUNKED) {
    size_t dlen = 0;
    long r = dechunk(b, have, NULL, &dlen);
    if (r == 0 && !eof) return;
    if (r <= 0 || !(decoded = malloc(dlen + 1))) {
      connect_fail(ws, r == 0 ? UV_EPIPE : 0, r < 0 ? "bad response" : NULL);
      return;
    }
    dechunk(b, have, decoded, &dlen);
    b = decoded;
    blen = dlen;
  } else if (io->rmode == RB_CLOSE) {
    if (!eof) return;
    blen = have;
  }
  mlua_task_t *t = io->connecter.task;
  take(&io->connecter);
  refusal_t a = {ws, b, blen};
  int n = t && !ws->dead ? mlua_push_result(ws->m, t->co, push_refusal, &a) : 0;
  free(decoded);
  transport_close(ws, 0);
  if (n) mlua_task_resume(t, n);
}

/* The head in io->head (hlen bytes) has status `status`, not 101: reads the body that follows. */
static void refusal_start(ws_t *ws, int status, size_t hlen) {
  ws_io_t *io = ws->io;
  const char *p = io->head.p, *line = memchr(p, '\n', hlen) + 1, *hn, *v;
  size_t nl, vl;
  int r, chunked = -1, length = 0;
  size_t cl = 0;
  while ((r = next_header(&line, p + hlen, &hn, &nl, &v, &vl)) >= 0) {
    if (r == 0) continue;
    if (header_is(hn, nl, "transfer-encoding")) { /* the last coding decides */
      while (vl && (v[vl - 1] == ',' || v[vl - 1] == ' ' || v[vl - 1] == '\t'))
        vl--;
      chunked = vl >= 7 && strncasecmp(v + vl - 7, "chunked", 7) == 0 &&
                (vl == 7 || v[vl - 8] == ',' || v[vl - 8] == ' ' || v[vl - 8] == '\t');
    } else if (header_is(hn, nl, "content-length")) {
      size_t n = 0, i = 0;
      while (i < vl && v[i] >= '0' && v[i] <= '9' && i < 16)
        n = n * 10 + (size_t)(v[i++] - '0');
      if (i == 0 || i != vl || (length && n != cl)) {
        connect_fail(ws, 0, "bad response");
        return;
      }
      cl = n;
      length = 1;
    }
  }
  io->refused = status;
  io->hlen = hlen;
  io->rmode = status < 200 || status == 204 || status == 304 ? RB_NONE
              : chunked >= 0                                 ? (chunked ? RB_CHUNKED : RB_CLOSE)
              : length                                       ? RB_LENGTH
                                                             : RB_CLOSE;
  io->rlen = cl;
  if (io->rmode == RB_LENGTH && cl > REFUSAL_MAX) {
    connect_fail(ws, 0, "handshake failed: answer too large");
    return;
  }
  ws->phase = PH_REFUSED;
  refusal_check(ws, 0);
}

/* The response head is in ws->io->head (up to its blank line, `hlen` bytes): checks it and resumes
 * the connecter with the box and a table of the response headers (lower-case names; a repeated
 * header's values joined with ", ", set-cookie's with "\n", as the HTTP client's), or fails. */
static void handshake_done(ws_t *ws, size_t hlen) {
  const char *p = ws->io->head.p, *end = p + hlen;
  const char *eol = memchr(p, '\n', hlen);
  int status = 0;
  if (eol && hlen > 12 && memcmp(p, "HTTP/1.1 ", 9) == 0) status = atoi(p + 9);
  if (status != 101) {
    char msg[64];
    snprintf(msg, sizeof msg, "handshake failed: status %d", status);
    if (status >= 200 && status <= 999)
      refusal_start(ws, status, hlen);
    else
      connect_fail(ws, 0, msg);
    return;
  }
  mlua_task_t *t = ws->io->connecter.task;
  lua_State *co = t ? t->co : NULL;
  int ok_upgrade = 0, ok_conn = 0, ok_accept = 0, ext_state = 0;
  char expect[29];
  ml_ws_accept_key(ws->io->key, 24, expect);
  const char *line = eol + 1, *hn, *v;
  size_t nl, vl;
  int r;
  while ((r = next_header(&line, end, &hn, &nl, &v, &vl)) >= 0) {
    if (r == 0) continue;
    if (header_is(hn, nl, "upgrade"))
      ok_upgrade = vl == 9 && strncasecmp(v, "websocket", 9) == 0;
    else if (header_is(hn, nl, "connection"))
      ok_conn = has_token(v, vl, "upgrade");
    else if (header_is(hn, nl, "sec-websocket-accept"))
      ok_accept = vl == 28 && memcmp(v, expect, 28) == 0;
    else if (header_is(hn, nl, "sec-websocket-extensions")) {
      ml_ws_pmd_t agreed;
      int x =
          ws->io->offered_deflate ? ml_ws_pmd_response(v, vl, &ws->io->offer, &agreed) : UV_EPROTO;
      if (x < 0)
        ext_state = -1;
      else if (x == 1 && ext_state == 0) {
        ml_ws_deflate_t *d = ml_ws_deflate_new(&agreed, 0);
        if (d) ml_ws_parser_set_deflate(&ws->parser, d);
        ext_state = d ? 1 : -1;
      }
    }
  }
  const char *why = !ok_upgrade     ? "handshake failed: no Upgrade: websocket"
                    : !ok_conn      ? "handshake failed: no Connection: upgrade"
                    : !ok_accept    ? "handshake failed: wrong Sec-WebSocket-Accept"
                    : ext_state < 0 ? "handshake failed: extension not offered"
                                    : NULL;
  if (why) {
    connect_fail(ws, 0, why);
    return;
  }
  handshake_t hs = {ws, hlen};
  int n = co ? mlua_push_result(ws->m, co, push_handshake, &hs) : 0;
  if (co && lua_isnil(co, -n)) { /* memory ran out: co has nil, "not enough memory" */
    lua_pop(co, n);
    connect_fail(ws, 0, "not enough memory");
    return;
  }
  ws->phase = PH_OPEN;
  size_t rest = ws->io->head.len - hlen;
  char *tail = NULL;
  if (rest) { /* frames that came with the head */
    tail = malloc(rest);
    if (tail) memcpy(tail, ws->io->head.p + hlen, rest);
  }
  ml_ws_buf_free(&ws->io->head);
  take(&ws->io->connecter);
  uv_timer_stop(&ws->io->timer);
  ws->last_rx = uv_now(ws->m->loop);
  if (!co || ws->dead) {
    free(tail);
    return;
  }
  if (tail) {
    ws_input(ws, tail, rest); /* nobody reads yet: the messages queue */
    free(tail);
  }
  ka_arm(ws);
  mlua_task_resume(t, 2);
}

/* Plaintext from the server: the handshake response, then frames. */
static void client_plain(ws_t *ws, const char *data, size_t n) {
  if (ws->phase == PH_OPEN) {
    ws_input(ws, data, n);
    return;
  }
  if (ws->phase == PH_REFUSED) {
    if (ws->io->head.len - ws->io->hlen + n > REFUSAL_MAX + 16384) { /* (chunk framing) */
      connect_fail(ws, 0, "handshake failed: answer too large");
      return;
    }
    if (ml_ws_buf_reserve(&ws->io->head, n) < 0) {
      connect_fail(ws, UV_ENOMEM, NULL);
      return;
    }
    memcpy(ws->io->head.p + ws->io->head.len, data, n);
    ws->io->head.len += n;
    refusal_check(ws, 0);
    return;
  }
  if (ws->phase != PH_HANDSHAKE) return;
  size_t before = ws->io->head.len;
  if (ml_ws_buf_reserve(&ws->io->head, n) < 0) {
    connect_fail(ws, UV_ENOMEM, NULL);
    return;
  }
  memcpy(ws->io->head.p + ws->io->head.len, data, n);
  ws->io->head.len += n;
  size_t from = before > 3 ? before - 3 : 0;
  for (size_t i = from; i + 4 <= ws->io->head.len; i++) {
    if (memcmp(ws->io->head.p + i, "\r\n\r\n", 4) == 0) {
      handshake_done(ws, i + 4);
      return;
    }
  }
  if (ws->io->head.len > HEAD_MAX) connect_fail(ws, 0, "handshake failed: response head too large");
}

static void send_request(ws_t *ws) {
  ws->phase = PH_HANDSHAKE;
  ml_ws_buf_t req = ws->io->head;
  memset(&ws->io->head, 0, sizeof ws->io->head);
  int r = t_write(ws, req.p, req.len);
  ml_ws_buf_free(&req);
  if (r < 0) connect_fail(ws, r, NULL);
}

/* Advances the TLS handshake; sends the request once it is done. */
static void tls_step(ws_t *ws) {
  int r = ml_tls_handshake(ws->io->tls);
  if (client_flush_tls(ws) < 0) {
    connect_fail(ws, UV_EPIPE, NULL);
    return;
  }
  if (r < 0) {
    const char *e = ml_tls_error(ws->io->tls);
    connect_fail(ws, 0, e ? e : "tls: handshake failed");
    return;
  }
  if (r == 1) send_request(ws);
}

static void client_read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  ws_t *ws = st->data;
  (void)buf;
  if (n == 0) return;
  if (n < 0) {
    uv_read_stop(st);
    ws->io->reading = 0;
    if (ws->phase == PH_REFUSED && n == UV_EOF)
      refusal_check(ws, 1);
    else if (ws->phase != PH_OPEN)
      connect_fail(ws, n == UV_EOF ? UV_EPIPE : (int)n, NULL);
    else
      peer_eof(ws);
    return;
  }
  if (!ws->io->tls) {
    client_plain(ws, ws->io->rbuf, (size_t)n);
    return;
  }
  if (ml_tls_feed(ws->io->tls, ws->io->rbuf, (size_t)n) < 0) {
    transport_close(ws, 0);
    return;
  }
  if (ws->phase == PH_TLS) {
    tls_step(ws);
    if (ws->phase != PH_HANDSHAKE) return;
  }
  char plain[16384];
  while (!ws->io->handles_closing) {
    int k = ml_tls_read(ws->io->tls, plain, sizeof plain);
    if (k > 0) {
      client_plain(ws, plain, (size_t)k);
      continue;
    }
    if (k == 0) break;
    if (ws->phase == PH_REFUSED && !ml_tls_error(ws->io->tls))
      refusal_check(ws, 1);
    else if (ws->phase != PH_OPEN)
      connect_fail(ws, 0, ml_tls_error(ws->io->tls) ? ml_tls_error(ws->io->tls) : "closed");
    else
      peer_eof(ws);
    break;
  }
  client_flush_tls(ws); /* post-handshake messages (session tickets, key updates) */
}

static void client_timer_cb(uv_timer_t *h) {
  ws_t *ws = h->data;
  if (ws->phase != PH_OPEN) {
    connect_fail(ws, UV_ETIMEDOUT, NULL);
    return;
  }
  ka_fire(ws);
}

static void on_connect(uv_connect_t *req, int status) {
  ws_t *ws = req->data;
  if (ws->io->handles_closing) return;
  if (status < 0) {
    connect_fail(ws, status, NULL);
    return;
  }
  if (!ws->io->is_unix) uv_tcp_nodelay(&ws->io->tcp, 1);
  ws->io->rbuf = malloc(CLIENT_RBUF);
  if (!ws->io->rbuf) {
    connect_fail(ws, UV_ENOMEM, NULL);
    return;
  }
  t_read(ws, 1);
  if (ws->io->tls_ctx) {
    if (ml_tls_new(&ws->io->tls, ws->io->tls_ctx, ws->io->server_name) < 0) {
      connect_fail(ws, 0, "tls: cannot start");
      return;
    }
    ws->phase = PH_TLS;
    tls_step(ws);
    return;
  }
  send_request(ws);
}

static int start_connect(ws_t *ws, const struct sockaddr *addr) {
  ws->phase = PH_CONNECT;
  ws->io->creq.data = ws;
  return uv_tcp_connect(&ws->io->creq, &ws->io->tcp, addr, on_connect);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  ws_t *ws = req->data;
  if (status == 0 && !ws->io->handles_closing && res) {
    struct sockaddr_storage ss;
    memcpy(&ss, res->ai_addr, res->ai_addrlen);
    if (ss.ss_family == AF_INET)
      ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)ws->io->port);
    else
      ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)ws->io->port);
    uv_freeaddrinfo(res);
    int r = start_connect(ws, (struct sockaddr *)&ss);
    if (r < 0) connect_fail(ws, r, NULL);
  } else {
    if (res) uv_freeaddrinfo(res);
    if (!ws->io->handles_closing)
      connect_fail(ws, 0, status == UV_ECANCELED ? "closed" : "host not found");
  }
  ws_unref(ws); /* the request's */
}

/* syntax: ws, headers = core.ws_connect(host, port, request_head, opts) -- request_head: the
 * request line and headers without the key, the extension offer and the blank line; opts:
 * timeout, tls, server_name, verify, cafile, cert and key (a client certificate for wss://),
 * deflate, unix (the path of a Unix domain socket to connect to instead of host:port) and the
 * settings of core.ws_accept */
static int l_connect(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  size_t rlen;
  const char *reqhead = luaL_checklstring(L, 3, &rlen);
  int oi = 4;
  double timeout = 60;
  int use_tls = 0, verify = 1;
  const char *cafile = NULL, *sni = NULL, *unix_path = NULL, *cert = NULL, *key = NULL;
  if (lua_istable(L, oi)) {
    lua_getfield(L, oi, "unix");
    unix_path = lua_tostring(L, -1);
    lua_pop(L, 1); /* (the string stays alive in opts) */
    lua_getfield(L, oi, "timeout");
    if (!lua_isnil(L, -1)) timeout = luaL_checknumber(L, -1);
    lua_getfield(L, oi, "tls");
    use_tls = lua_toboolean(L, -1);
    lua_getfield(L, oi, "verify");
    if (!lua_isnil(L, -1)) verify = lua_toboolean(L, -1);
    lua_getfield(L, oi, "cafile");
    cafile = lua_tostring(L, -1);
    lua_getfield(L, oi, "server_name");
    sni = lua_tostring(L, -1);
    lua_getfield(L, oi, "cert");
    cert = lua_tostring(L, -1);
    lua_getfield(L, oi, "key");
    key = lua_tostring(L, -1);
    lua_pop(L, 7); /* the strings stay alive in opts */
  }
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  ws_t *ws = ws_new(m, 1);
  if (!ws) return luaL_error(L, "moonlet: out of memory");
  read_settings(L, oi, ws);
  ws->io->port = port;
  ws->io->offered_deflate = read_deflate(L, oi, &ws->io->offer);
  if (use_tls) {
    ml_tls_ctx_opts_t o = {
        .verify = verify, .cafile = cafile, .cert = cert, .key = key, .alpn = "http/1.1"};
    const char *err = NULL;
    if (ml_tls_ctx_new(&ws->io->tls_ctx, &o, &err) < 0) {
      ws_free(ws);
      lua_pushnil(L);
      lua_pushstring(L, err ? err : "tls: cannot start");
      return 2;
    }
    ws->io->server_name = strdup(sni ? sni : host);
  }
  /* the request: head, key, offer, blank line */
  char offer[160];
  if (ml_ws_make_key(ws->io->key) < 0 || ml_ws_buf_reserve(&ws->io->head, rlen + 512) < 0) {
    ws_free(ws);
    return luaL_error(L, "moonlet: cannot make a handshake key");
  }
  memcpy(ws->io->head.p, reqhead, rlen);
  ws->io->head.len = rlen;
  ws->io->head.len += (size_t)snprintf(ws->io->head.p + ws->io->head.len, 64,
                                       "Sec-WebSocket-Key: %s\r\n", ws->io->key);
  if (ws->io->offered_deflate && ml_ws_pmd_offer(&ws->io->offer, offer, sizeof offer))
    ws->io->head.len += (size_t)snprintf(ws->io->head.p + ws->io->head.len, 200,
                                         "Sec-WebSocket-Extensions: %s\r\n", offer);
  memcpy(ws->io->head.p + ws->io->head.len, "\r\n", 2);
  ws->io->head.len += 2;
  ws->io->is_unix = unix_path != NULL;
  ml_stream_init(m->loop, &ws->io->tcp, unix_path != NULL);
  uv_timer_init(m->loop, &ws->io->timer);
  ws->io->tcp.data = ws->io->timer.data = ws;
  ws->refs += 2;
  mlua_res_link(m, &ws->res, ws_res_close);
  ws->linked = 1;
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  struct sockaddr_storage addr;
  int r = strchr(host, ':') ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr)
                            : uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
  if (unix_path) {
    ws->phase = PH_CONNECT;
    ws->io->creq.data = ws;
    r = strlen(unix_path) < sizeof((struct sockaddr_un *)0)->sun_path ? 0 : UV_ENAMETOOLONG;
    if (r == 0) uv_pipe_connect(&ws->io->creq, &ws->io->pipe, unix_path, on_connect);
  } else if (r == 0) {
    r = start_connect(ws, (struct sockaddr *)&addr);
  } else {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    ws->phase = PH_RESOLVE;
    ws->io->gai.data = ws;
    r = uv_getaddrinfo(m->loop, &ws->io->gai, on_resolved, host, NULL, &hints);
    if (r == 0) ws->refs++; /* the request's, dropped by on_resolved */
  }
  if (r < 0) { /* no callback will come: fail here, resuming nobody */
    ws->phase = 0;
    transport_close(ws, 0);
    return push_err(L, r);
  }
  if (timeout > 0) {
    uv_update_time(m->loop);
    uv_timer_start(&ws->io->timer, client_timer_cb, mlua_ms(timeout), 0);
  }
  ws->io->connecter.task = t;
  return mlua_task_wait(L, t, wait_cancel, &ws->io->connecter);
}

/* -- Methods -------------------------------------------------------------------------------- */

static ws_t *check_ws(lua_State *L) { return *(ws_t **)luaL_checkudata(L, 1, WS_MT); }

static int push_closed(lua_State *L) { return push_err(L, UV_EPIPE); }

/* syntax: data, kind = ws:receive(timeout) -- kind "text" or "binary"; nil, "closed" once the
 * peer closed (ws:close_info() tells why); nil, "timeout" */
static int w_receive(lua_State *L) {
  ws_t *ws = check_ws(L);
  double timeout = luaL_optnumber(L, 2, -1);
  if (ws->reader.task) {
    lua_pushnil(L);
    lua_pushliteral(L, "socket busy reading");
    return 2;
  }
  if (ws->qhead) return pop_message(L, ws, 0);
  if (input_ended(ws) || ws->phase != PH_OPEN) return push_closed(L);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (timeout == 0) return push_err(L, UV_ETIMEDOUT);
  ws->reader.task = t;
  if (timeout > 0) {
    uv_update_time(ws->m->loop);
    ws->reader.deadline = uv_now(ws->m->loop) + mlua_ms(timeout);
    if (!ws->reader.deadline) ws->reader.deadline = 1;
    wtimer_arm(ws);
  }
  return mlua_task_wait(L, t, wait_cancel, &ws->reader);
}

static int kind_of(lua_State *L, int idx) {
  const char *k = luaL_optstring(L, idx, "text");
  if (strcmp(k, "text") == 0) return ML_WS_OP_TEXT;
  if (strcmp(k, "binary") == 0) return ML_WS_OP_BINARY;
  return luaL_argerror(L, idx, "kind must be \"text\" or \"binary\"");
}

/* syntax: ok, err = ws:send(data, kind) -- kind "text" (default) or "binary"; yields while more
 * than 256 KiB are unsent */
static int w_send(lua_State *L) {
  ws_t *ws = check_ws(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int op = kind_of(L, 3);
  if (ws->gone || ws->close_sent || ws->closing_transport || ws->phase != PH_OPEN)
    return push_closed(L);
  if (op == ML_WS_OP_TEXT) {
    uint32_t st = 0;
    if (ml_utf8_check(&st, (const uint8_t *)data, len) < 0 || st != 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "invalid utf-8");
      return 2;
    }
  }
  mlua_task_t *t = NULL;
  if (t_queued(ws) + len + 14 > WQ_HIGH) { /* this send will wait: only a task may (rule 7) */
    t = mlua_task_current(L);
    mlua_check_yieldable(L, t);
  }
  int r = send_message(ws, op, data, len);
  if (r < 0) return push_err(L, r);
  if (t_queued(ws) > WQ_HIGH) {
    if (t) {
      if (!ws->client) {
        r = ml_conn_wants_writable(ws->c);
        if (r < 0) return push_err(L, r);
      } else {
        r = 1;
      }
      if (r == 1) {
        wait_t *w = calloc(1, sizeof *w);
        if (!w) return luaL_error(L, "moonlet: out of memory");
        w->ws = ws;
        w->kind = WK_WRITE;
        w->task = t;
        w->gen = ws->wgen; /* wake_writers skips those parked while it runs */
        w->next = ws->writers;
        if (ws->writers) ws->writers->prev = w;
        ws->writers = w;
        return mlua_task_wait(L, t, wait_cancel, w);
      }
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: rtt, err = ws:ping(data, timeout) -- sends a ping; with a timeout, waits for a pong
 * and returns the round trip in seconds (else true at once) */
static int w_ping(lua_State *L) {
  ws_t *ws = check_ws(L);
  size_t len = 0;
  const char *data = luaL_optlstring(L, 2, "", &len);
  double timeout = luaL_optnumber(L, 3, -1);
  if (len > 125) return luaL_argerror(L, 2, "a ping carries at most 125 bytes");
  if (ws->gone || ws->close_sent || ws->closing_transport || ws->phase != PH_OPEN)
    return push_closed(L);
  mlua_task_t *t = NULL;
  if (timeout >= 0) {
    if (ws->pinger.task) {
      lua_pushnil(L);
      lua_pushliteral(L, "ping busy");
      return 2;
    }
    t = mlua_task_current(L);
    mlua_check_yieldable(L, t);
  }
  uint64_t started = uv_hrtime(); /* the round trip includes the send: taken before it */
  int r = send_message(ws, ML_WS_OP_PING, data, len);
  if (r < 0) return push_err(L, r);
  if (!t) {
    lua_pushboolean(L, 1);
    return 1;
  }
  memcpy(ws->ping_data, data, len);
  ws->ping_len = len;
  uv_update_time(ws->m->loop);
  ws->pinger.task = t;
  ws->pinger.started = started;
  ws->pinger.deadline = uv_now(ws->m->loop) + mlua_ms(timeout);
  wtimer_arm(ws);
  return mlua_task_wait(L, t, wait_cancel, &ws->pinger);
}

/* syntax: ok = ws:close(code, reason) -- starts the close handshake (code 1000 by default; 1005
 * without a reason: a close frame with no status, as a proxy passes on a peer's empty one); the
 * connection closes when the peer answers or after close_timeout; true when already closed */
static int w_close(lua_State *L) {
  ws_t *ws = check_ws(L);
  int code = (int)luaL_optinteger(L, 2, ML_WS_CLOSE_NORMAL);
  size_t rlen = 0;
  const char *reason = luaL_optlstring(L, 3, "", &rlen);
  if (code == ML_WS_CLOSE_NO_STATUS) {
    if (rlen) return luaL_argerror(L, 3, "a close frame without a code has no reason");
  } else if (!ml_ws_close_code_valid(code)) {
    return luaL_argerror(L, 2, "close code must be 1000..1003, 1005, 1007..1014 or 3000..4999");
  }
  if (rlen > 123) return luaL_argerror(L, 3, "a close reason is at most 123 bytes");
  if (ws->raw) { /* no close frame: the connection ends once its output is out */
    if (!ws->close_code) ws->close_code = code;
    ws->close_sent = 1;
    transport_close(ws, 1);
  } else if (!ws->gone && !ws->close_sent && ws->phase == PH_OPEN && !ws->closing_transport) {
    if (!ws->close_code) {
      ws->close_code = code;
      set_reason(ws, reason, rlen);
    }
    send_close(ws, code, reason, rlen);
    if (ws->close_recv) transport_close(ws, 1);
  } else if (ws->phase != PH_OPEN && !ws->gone) {
    transport_close(ws, 0);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: code, reason = ws:close_info() -- nil while open; 1005: the peer gave no code;
 * 1006: the connection dropped without a close frame */
static int w_close_info(lua_State *L) {
  ws_t *ws = check_ws(L);
  if (!ws->close_code || !(ws->close_recv || ws->close_sent || ws->failed || ws->gone)) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushinteger(L, ws->close_code);
  lua_pushlstring(L, ws->close_reason ? ws->close_reason : "", ws->close_reason_len);
  return 2;
}

/* syntax: state = ws:state() -- "open", "closing" (a close frame went either way) or "closed" */
static int w_state(lua_State *L) {
  ws_t *ws = check_ws(L);
  if (ws->gone)
    lua_pushliteral(L, "closed");
  else if (ws->close_sent || ws->close_recv || ws->failed || ws->closing_transport)
    lua_pushliteral(L, "closing");
  else
    lua_pushliteral(L, "open");
  return 1;
}

/* syntax: t = ws:tls() -- a server-side ws over HTTPS: the client's certificate
 * (mlua_push_tls_peer), for req.tls once the request's exchange is gone (lua/moonlet/ws.lua
 * accept); nil on plain HTTP, on the client side, or once the connection is gone. Made on each
 * call. */
static int w_tls(lua_State *L) {
  ws_t *ws = check_ws(L);
  struct ml_tls_s *t = ws->c ? ml_conn_tls(ws->c) : NULL;
  if (!t) return 0;
  return mlua_push_tls_peer(L, t);
}

/* syntax: n, bytes = ws:queued() -- received messages not read yet */
static int w_queued(lua_State *L) {
  ws_t *ws = check_ws(L);
  lua_pushinteger(L, (lua_Integer)ws->qcount);
  lua_pushinteger(L, (lua_Integer)ws->qbytes);
  return 2;
}

static int w_gc(lua_State *L) {
  ws_t **box = luaL_checkudata(L, 1, WS_MT);
  ws_t *ws = *box;
  if (!ws) return 0;
  *box = NULL;
  if (!ws->dead && !ws->gone) { /* dropped while open: say goodbye */
    if (ws->phase == PH_OPEN && !ws->close_sent && !ws->closing_transport) {
      send_close(ws, ML_WS_CLOSE_GOING_AWAY, NULL, 0);
      if (ws->close_recv) transport_close(ws, 1);
    } else if (ws->phase != PH_OPEN) {
      transport_close(ws, 0);
    }
  }
  ws_unref(ws);
  return 0;
}

static int w_tostring(lua_State *L) {
  ws_t *ws = check_ws(L);
  lua_pushfstring(L, "moonlet.ws (%s, %s)", ws->client ? "client" : "server",
                  ws->gone ? "closed" : "open");
  return 1;
}

/* syntax: ok = core.utf8_valid(s) -- whether s is well-formed UTF-8 (RFC 3629: no overlong
 * forms, no surrogates), as a text message must be: moonlet.ws.valid_utf8 */
static int l_utf8_valid(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  uint32_t st = 0;
  lua_pushboolean(L, ml_utf8_check(&st, (const uint8_t *)s, n) == 0 && st == 0);
  return 1;
}

void mlua_open_ws(lua_State *L, moonlet_t *m) {
  static const luaL_Reg wm[] = {{"receive", w_receive},
                                {"send", w_send},
                                {"ping", w_ping},
                                {"close", w_close},
                                {"close_info", w_close_info},
                                {"state", w_state},
                                {"queued", w_queued},
                                {"tls", w_tls},
                                {NULL, NULL}};
  static const luaL_Reg fns[] = {{"ws_accept", l_accept},
                                 {"ws_accept_raw", l_accept_raw},
                                 {"ws_connect", l_connect},
                                 {"utf8_valid", l_utf8_valid},
                                 {NULL, NULL}};
  luaL_newmetatable(L, WS_MT);
  lua_pushliteral(L, WS_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, wm);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, w_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, w_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
