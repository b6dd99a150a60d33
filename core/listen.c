/* core/listen.c: listening Unix domain sockets (a stale socket file replaced, a live one kept);
 * listening TCP sockets, with SO_REUSEPORT when several processes share a port
 * (`moonlet --workers N`), and the supervisor's reservation of that port. libuv 1.44 has no
 * UV_TCP_REUSEPORT, so the socket is made here, the option set, and the fd handed to libuv
 * (uv_tcp_open), which owns it from then on.
 *
 * A socket file's path is changed only under its lock: an flock(2) on the file path + ".lock" next
 * to it. Finding the file stale, removing it, binding the new socket and making it listen happen
 * under the lock, and so does removing a server's own file at close; so of two servers started at
 * the same instant on one stale file, the second finds the first's socket live (UV_EADDRINUSE)
 * instead of removing it (which would leave the first listening on a file nobody reaches). The
 * lock file is removed by its holder before it unlocks; a process that opened it meanwhile finds,
 * once it holds the lock, that the path names another file or none and starts again, so only the
 * lock of the file at the path counts. A lock file left by a process killed while it held the lock
 * holds no lock (the kernel releases flocks with the process); the next server uses and removes
 * it. Every process that binds through this file takes the lock (threads too: flocks of separate
 * open()s exclude each other); a foreign program that replaces the file does not.
 */
#include "listen.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
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

/* What is at path: 0 nothing, 1 a stale socket file (to remove), UV_EADDRINUSE (a live socket),
 * UV_EEXIST (not a socket), or -errno. */
static int unix_state(const char *path, int type) {
  struct stat st;
  if (lstat(path, &st) < 0) return errno == ENOENT ? 0 : -errno;
  if (!S_ISSOCK(st.st_mode)) return UV_EEXIST;
  return unix_stale(path, type) ? 1 : UV_EADDRINUSE;
}

/* -- The path's lock ------------------------------------------------------------------------- */

/* The name of path's lock file in buf (PATH_MAX): 0, or UV_ENAMETOOLONG. */
static int lock_name(const char *path, char *buf) {
  int n = snprintf(buf, PATH_MAX, "%s.lock", path);
  return n < 0 || n >= PATH_MAX ? UV_ENAMETOOLONG : 0;
}

/* Takes path's lock, waiting while another process holds it (a holder keeps it for a few system
 * calls, none of which waits). The lock file's fd, to give to path_unlock, or a negative libuv
 * error. The file is opened without O_CREAT when it exists (a lock file of another user in a
 * sticky directory such as /tmp cannot be opened with O_CREAT: fs.protected_regular), made with
 * O_EXCL when it does not, and never through a symbolic link. */
static int path_lock(const char *path) {
  char name[PATH_MAX];
  int r = lock_name(path, name);
  if (r < 0) return r;
  for (int tries = 0; tries < 1000; tries++) {
    int fd = open(name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
      fd = open(name, O_RDONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (fd < 0 && errno == EEXIST) continue; /* made by another in between: open that one */
    }
    if (fd < 0) return -errno;
    while ((r = flock(fd, LOCK_EX)) < 0 && errno == EINTR) {
    }
    if (r < 0) {
      r = -errno;
      close(fd);
      return r;
    }
    struct stat held, named; /* the lock counts only if its file is still the one named */
    if (fstat(fd, &held) == 0 && lstat(name, &named) == 0 && held.st_ino == named.st_ino &&
        held.st_dev == named.st_dev)
      return fd;
    close(fd); /* its holder removed it: the lock is the next file's */
  }
  return UV_EBUSY;
}

/* Removes path's lock file and releases the lock (fd from path_lock). The holder removes it, so
 * that no file stays beside the socket; the next process makes a new one. */
static void path_unlock(const char *path, int fd) {
  char name[PATH_MAX];
  if (lock_name(path, name) == 0) unlink(name);
  close(fd); /* (releases the flock) */
}

/* -- Unix domain sockets --------------------------------------------------------------------- */

/* A socket of type bound to path under path's lock, with the permissions mode, listening (backlog)
 * when it is a stream socket, a stale file at path removed first: the fd, or a negative libuv
 * error. */
static int unix_bind_locked(const char *path, int type, int backlog, int mode, ml_unix_id_t *id) {
  int r = unix_state(path, type); /* again, under the lock: it may have changed */
  if (r < 0) return r;
  if (r == 1 && unlink(path) < 0 && errno != ENOENT) return -errno;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    r = errno == EADDRINUSE ? UV_EADDRINUSE : -errno; /* (a program that takes no lock) */
    close(fd);
    return r;
  }
  /* The mode is set before the socket listens: no client connects before it. The socket listens
   * before the lock goes: a stream socket bound but not listening refuses connects, so the next
   * server would find it stale. */
  struct stat st;
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

/* A socket of type bound to path (its file made free first), with the permissions mode, listening
 * (backlog) when it is a stream socket; *id its file. The fd, or a negative libuv error. A live
 * socket or a file that is not a socket is said without taking the lock (one may not be able to
 * make the lock file where a live server's socket is, and need not). */
static int unix_bind_fd(const char *path, int type, int backlog, int mode, ml_unix_id_t *id) {
  if (strlen(path) >= sizeof((struct sockaddr_un *)0)->sun_path) return UV_ENAMETOOLONG;
  int r = unix_state(path, type);
  if (r < 0) return r;
  int lock = path_lock(path);
  if (lock < 0) return lock;
  r = unix_bind_locked(path, type, backlog, mode, id);
  path_unlock(path, lock);
  return r;
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
  if (!path || lstat(path, &st) < 0 || (unsigned long)st.st_ino != id->ino ||
      (unsigned long)st.st_dev != id->dev)
    return;                   /* (not ours already: no need for the lock) */
  int lock = path_lock(path); /* (< 0: removed all the same, as before there were locks) */
  if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) && (unsigned long)st.st_ino == id->ino &&
      (unsigned long)st.st_dev == id->dev)
    unlink(path);
  if (lock >= 0) path_unlock(path, lock);
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
