/* core/http_file.c: file bodies. A transfer reads 64 KiB at a time on libuv's thread pool and
 * writes each piece with uv_write from its own buffer, so a large file never passes through Lua nor
 * sits whole in memory; the next read starts when the socket has taken the previous piece
 * (backpressure for free).
 *
 * Lifetime: the transfer owns its buffer and is freed when `cb` has run. While it is in flight the
 * connection counts it in pending_ops and is not freed, so the callbacks always find it; when the
 * connection closes meanwhile, the transfer ends with UV_ECANCELED before on_close runs.
 */
#include <stdlib.h>

#include "http_internal.h"

#define PIECE (64 * 1024)

typedef struct {
  uv_fs_t fs;
  uv_write_t wr;
  ml_conn_t *conn;
  uv_file fd;
  int64_t offset, left;
  size_t piece; /* bytes in the write in flight */
  char *cipher; /* HTTPS: the write in flight's ciphertext (malloc'd), NULL otherwise */
  ml_conn_file_cb cb;
  void *ud;
  char buf[PIECE];
} transfer_t;

static void transfer_end(transfer_t *t, int status) {
  ml_conn_t *c = t->conn;
  ml_conn_file_cb cb = t->cb;
  void *ud = t->ud;
  free(t);
  c->pending_ops--;
  if (status == 0 && c->closing) status = UV_ECANCELED;
  if (status == 0) c->resp_done = 1;
  cb(c, status, ud);
  if (c->closing) ml__conn_maybe_free(c);
}

static void read_next(transfer_t *t);

static void write_done(uv_write_t *req, int status) {
  transfer_t *t = req->data;
  ml_conn_t *c = t->conn;
  c->write_queue -= t->piece;
  t->piece = 0;
  free(t->cipher);
  t->cipher = NULL;
  if (status < 0 || c->closing) {
    transfer_end(t, status < 0 ? status : UV_ECANCELED);
    return;
  }
  c->activity = uv_now(c->srv->loop);
  if (t->left == 0) {
    transfer_end(t, 0);
    return;
  }
  read_next(t);
}

static void read_done(uv_fs_t *req) {
  transfer_t *t = req->data;
  ml_conn_t *c = t->conn;
  ssize_t n = req->result;
  if (c->closing) {
    uv_fs_req_cleanup(req);
    transfer_end(t, UV_ECANCELED);
    return;
  }
  if (n <= 0) { /* an error, or the file shrank: the promised length cannot be sent */
    uv_fs_req_cleanup(req);
    ml_conn_close(c, 0);
    transfer_end(t, n < 0 ? (int)n : UV_EOF);
    return;
  }
  uv_fs_req_cleanup(req);
  t->offset += n;
  t->left -= n;
  ml__conn_flush(c); /* the head and anything staged go first */
  if (c->closing) {
    transfer_end(t, UV_ECANCELED);
    return;
  }
  uv_buf_t b = uv_buf_init(t->buf, (unsigned)n);
  if (c->tls) { /* HTTPS: the piece's ciphertext goes instead, in a block of its own */
    int r = ml_tls_write(c->tls, t->buf, (size_t)n);
    size_t clen = 0;
    t->cipher = r < 0 ? NULL : ml__conn_tls_take(c, &clen);
    if (!t->cipher) {
      ml_conn_close(c, 0);
      transfer_end(t, r < 0 ? r : UV_ENOMEM);
      return;
    }
    b = uv_buf_init(t->cipher, (unsigned)clen);
    n = (ssize_t)clen;
  }
  t->wr.data = t;
  int r = uv_write(&t->wr, (uv_stream_t *)&c->tcp, &b, 1, write_done);
  if (r < 0) {
    free(t->cipher);
    ml_conn_close(c, 0);
    transfer_end(t, r);
    return;
  }
  t->piece = (size_t)n;
  c->write_queue += (size_t)n;
  ml__conn_arm_timer(c);
}

static void read_next(transfer_t *t) {
  size_t want = t->left < PIECE ? (size_t)t->left : PIECE;
  uv_buf_t b = uv_buf_init(t->buf, (unsigned)want);
  t->fs.data = t;
  int r = uv_fs_read(t->conn->srv->loop, &t->fs, t->fd, &b, 1, t->offset, read_done);
  if (r < 0) {
    ml_conn_close(t->conn, 0);
    transfer_end(t, r);
  }
}

int ml_conn_send_file(ml_conn_t *c, uv_file fd, int64_t offset, int64_t len, ml_conn_file_cb cb,
                      void *ud) {
  if (c->closing) return UV_EPIPE;
  if (!c->resp_started || c->resp_done) return UV_EINVAL;
  if (len <= 0 || c->resp_no_body) {
    c->resp_done = 1;
    return UV_EALREADY; /* nothing to send: the caller goes on without waiting */
  }
  transfer_t *t = malloc(sizeof *t);
  if (!t) return UV_ENOMEM;
  t->conn = c;
  t->fd = fd;
  t->offset = offset;
  t->left = len;
  t->cb = cb;
  t->piece = 0;
  t->cipher = NULL;
  t->ud = ud;
  c->stream_left = -1;
  c->pending_ops++;
  size_t want = len < PIECE ? (size_t)len : PIECE;
  uv_buf_t b = uv_buf_init(t->buf, (unsigned)want);
  t->fs.data = t;
  int r = uv_fs_read(c->srv->loop, &t->fs, fd, &b, 1, offset, read_done);
  if (r < 0) {
    c->pending_ops--;
    free(t);
    return r;
  }
  return 0;
}
