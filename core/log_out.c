/* core/log_out.c: buffered log outputs and the error log's file (the contract is in log_out.h). */
#include "log_out.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int open_append(const char *path) {
  int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  return fd < 0 ? -errno : fd;
}

int ml_log_out_open(ml_log_out_t **out, const char *path) {
  int to_stdout = !path || strcmp(path, "-") == 0;
  ml_log_out_t *o = malloc(sizeof *o);
  if (!o) return -ENOMEM;
  memset(o, 0, offsetof(ml_log_out_t, buf));
  o->fd = 1;
  if (!to_stdout) {
    o->path = strdup(path);
    int fd = o->path ? open_append(path) : -ENOMEM;
    if (fd < 0) {
      free(o->path);
      free(o);
      return fd;
    }
    o->fd = fd;
  }
  struct stat st;
  o->atomic = fstat(o->fd, &st) == 0 && S_ISREG(st.st_mode);
  *out = o;
  return 0;
}

int ml_log_write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w >= 0) {
      p += w;
      n -= (size_t)w;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      struct pollfd pf = {.fd = fd, .events = POLLOUT};
      if (poll(&pf, 1, 1000) == 0) return -EAGAIN; /* a reader that stopped reading */
    } else if (errno != EINTR) {
      return -errno;
    }
  }
  return 0;
}

void ml_log_out_flush(ml_log_out_t *out) {
  if (!out || out->len == 0) return;
  if (out->atomic) { /* a regular file: a failure drops the lines, there is nowhere to say so */
    ml_log_write_all(out->fd, out->buf, out->len);
    out->len = 0;
    return;
  }
  /* a pipe or a socket: pieces of whole lines, each at most PIPE_BUF bytes when it can be */
  const char *p = out->buf, *end = out->buf + out->len;
  while (p < end) {
    size_t n = (size_t)(end - p);
    if (n > PIPE_BUF) {
      const char *nl = memrchr(p, '\n', PIPE_BUF);            /* the last line that fits */
      if (!nl) nl = memchr(p + PIPE_BUF, '\n', n - PIPE_BUF); /* else one long line alone */
      if (nl) n = (size_t)(nl - p) + 1;
    }
    if (ml_log_write_all(out->fd, p, n) < 0) break; /* the rest is dropped, whole lines */
    p += n;
  }
  out->len = 0;
}

char *ml_log_out_tail(ml_log_out_t *out) {
  if (sizeof out->buf - out->len < ML_LOG_OUT_LINE) ml_log_out_flush(out);
  return out->buf + out->len;
}

void ml_log_out_commit(ml_log_out_t *out, size_t n) { out->len += n; }

int ml_log_out_reopen(ml_log_out_t *out) {
  if (!out || !out->path) return 0;
  ml_log_out_flush(out);
  int fd = open_append(out->path);
  if (fd < 0) return fd;
  close(out->fd);
  out->fd = fd;
  return 0;
}

void ml_log_out_free(ml_log_out_t *out) {
  if (!out) return;
  ml_log_out_flush(out);
  if (out->path) {
    close(out->fd);
    free(out->path);
  }
  free(out);
}

void ml_log_stamp(ml_log_stamp_t *st) {
  time_t now = time(NULL);
  if (now == st->at && st->local[0]) return;
  st->at = now;
  struct tm tm;
  localtime_r(&now, &tm);
  strftime(st->local, sizeof st->local, "%d/%b/%Y:%H:%M:%S %z", &tm);
  size_t n = strftime(st->iso, sizeof st->iso, "%Y-%m-%dT%H:%M:%S%z", &tm);
  /* ISO 8601 writes the offset as +00:00 (strftime's %z gives +0000) */
  if (n >= 5 && n + 2 <= sizeof st->iso) {
    memmove(st->iso + n - 1, st->iso + n - 2, 3);
    st->iso[n - 2] = ':';
  }
}

int ml_log_redirect_stderr(const char *path) {
  int fd = open_append(path);
  if (fd < 0) return fd;
  if (fd == 2) /* stderr was closed: the file took its number; children inherit it as stderr */
    return fcntl(2, F_SETFD, 0) < 0 ? -errno : 0;
  int r = 0;
  while (dup2(fd, 2) < 0) {
    if (errno != EINTR && errno != EBUSY) {
      r = -errno;
      break;
    }
  }
  close(fd);
  return r;
}
