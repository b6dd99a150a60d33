/* core/listen.c: listening Unix domain sockets (a stale socket file replaced, a live one kept);
 * listening TCP sockets, with SO_REUSEPORT when several processes share a port
 * (`moonlet --workers N`), and the supervisor's reservation of that port. libuv 1.44 has no
 * UV_TCP_REUSEPORT, so the socket is made here, the option set, and the fd handed to libuv
 * (uv_tcp_open), which owns it from then on.
 */
#include "listen.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* Whether the socket file at path is stale: a connect of a socket of its type (SOCK_STREAM or
 * SOCK_DGRAM) is refused (nobody listens, nobody holds it: its process died). Anything else (it
 * connects, its backlog is full, another user's socket we may not use, a socket of the other type)
 * counts as alive: the file is not ours to remove. */
static int unix_stale(const char *path, int type) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  int stale = connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno == ECONNREFUSED;
  close(fd);
  return stale;
}

/* Makes path free for a new socket: nothing there, or a stale socket file removed. 0, or
 * UV_EADDRINUSE (a live server), UV_EEXIST (not a socket), UV_ENAMETOOLONG, -errno. Two servers
 * started at the same instant may both find one file stale; the second to bind then fails. */
static int unix_clear(const char *path, int type) {
  struct stat st;
  if (lstat(path, &st) < 0) return 0;
  if (!S_ISSOCK(st.st_mode)) return UV_EEXIST;
  if (!unix_stale(path, type)) return UV_EADDRINUSE;
  if (unlink(path) < 0 && errno != ENOENT) return -errno;
  return 0;
}

/* A socket of type bound to path (its file made free first), with the permissions mode, listening
 * (backlog) when it is a stream socket; *id its file. The fd, or a negative libuv error. */
static int unix_bind_fd(const char *path, int type, int backlog, int mode, ml_unix_id_t *id) {
  if (strlen(path) >= sizeof((struct sockaddr_un *)0)->sun_path) return UV_ENAMETOOLONG;
  int r = unix_clear(path, type);
  if (r < 0) return r;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    r = errno == EADDRINUSE ? UV_EADDRINUSE : -errno; /* (a server that came in between) */
    close(fd);
    return r;
  }
  struct stat st; /* the mode is set before the socket listens: no client connects before it */
  if ((mode >= 0 && chmod(path, (mode_t)mode) < 0) || lstat(path, &st) < 0 ||
      (type == SOCK_STREAM && listen(fd, backlog) < 0)) {
    r = -errno;
    unlink(path);
    close(fd);
    return r;
  }
  id->dev = (unsigned long)st.st_dev;
  id->ino = (unsigned long)st.st_ino;
  return fd;
}

int ml_listen_unix_fd(const char *path, int backlog, int mode, ml_unix_id_t *id) {
  return unix_bind_fd(path, SOCK_STREAM, backlog, mode, id);
}

int ml_unix_dgram_fd(const char *path, int mode, ml_unix_id_t *id) {
  if (path) return unix_bind_fd(path, SOCK_DGRAM, 0, mode, id);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
#ifdef __linux__ /* autobind: the kernel gives it a free abstract name, so that replies can come   \
                  */
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (bind(fd, (struct sockaddr *)&sa, sizeof(sa_family_t)) < 0) {
    int r = -errno;
    close(fd);
    return r;
  }
#endif
  return fd;
}

int ml_listen_unix(uv_pipe_t *p, const char *path, int backlog, int mode, uv_connection_cb cb,
                   ml_unix_id_t *id) {
  int fd = ml_listen_unix_fd(path, backlog, mode, id);
  if (fd < 0) return fd;
  int r = uv_pipe_open(p, fd); /* not uv_pipe_bind: libuv would unlink the path, ours or not */
  if (r < 0) {
    ml_listen_unix_unlink(path, id);
    close(fd);
    return r;
  }
  r = uv_listen((uv_stream_t *)p, backlog, cb); /* (p owns fd now: closed with it) */
  if (r < 0) ml_listen_unix_unlink(path, id);
  return r;
}

void ml_listen_unix_unlink(const char *path, const ml_unix_id_t *id) {
  struct stat st;
  if (path && lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) &&
      (unsigned long)st.st_ino == id->ino && (unsigned long)st.st_dev == id->dev)
    unlink(path);
}

int ml_listen_share_port(uv_os_sock_t fd) {
  int on = 1;
  return setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) < 0 ? -errno : 0;
}

static int reuse_socket(int family) {
  int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int on = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
      ml_listen_share_port(fd) < 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  return fd;
}

int ml_listen_tcp(uv_tcp_t *t, const struct sockaddr *addr, int reuseport, int backlog,
                  uv_connection_cb cb) {
  if (reuseport) {
    int fd = reuse_socket(addr->sa_family);
    if (fd < 0) return fd;
    int r = uv_tcp_open(t, (uv_os_sock_t)fd);
    if (r < 0) {
      close(fd);
      return r;
    }
  }
  int r = uv_tcp_bind(t, addr, 0);
  if (r == 0) r = uv_listen((uv_stream_t *)t, backlog > 0 ? backlog : 511, cb);
  return r;
}

int ml_listen_reserve(const char *host, int port, int *bound_port) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  char service[8];
  snprintf(service, sizeof service, "%d", port);
  int g = getaddrinfo(host, service, &hints, &res);
  if (g != 0) return g == EAI_NONAME ? UV_EAI_NONAME : UV_EAI_FAIL;
  int fd = reuse_socket(res->ai_family);
  if (fd >= 0 && res->ai_family == AF_INET6) { /* as uv_tcp_bind without UV_TCP_IPV6ONLY */
    int off = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  }
  if (fd >= 0 && bind(fd, res->ai_addr, res->ai_addrlen) < 0) {
    int e = -errno;
    close(fd);
    fd = e;
  }
  freeaddrinfo(res);
  if (fd < 0) return fd;
  struct sockaddr_storage a;
  socklen_t len = sizeof a;
  if (getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  *bound_port = ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port
                                              : ((struct sockaddr_in *)&a)->sin_port);
  return fd;
}
