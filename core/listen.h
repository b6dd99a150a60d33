/* core/listen.h: listening TCP sockets and Unix domain sockets, optionally sharing their port with
 * SO_REUSEPORT (the processes of `moonlet --workers N` each listen on the same port; the kernel
 * spreads the new connections across them), and a port reserved before the workers exist.
 */
#ifndef ML_LISTEN_H
#define ML_LISTEN_H

#include <uv.h>

/* Binds t (uv_tcp_init'ed, no socket yet) to addr and listens. reuseport: share the port with
 * other sockets that set it too. 0 or a negative libuv error; t is the caller's to close either
 * way. */
int ml_listen_tcp(uv_tcp_t *t, const struct sockaddr *addr, int reuseport, int backlog,
                  uv_connection_cb cb);

/* Binds p (uv_pipe_init'ed) to the Unix domain socket path and listens. A socket file already at
 * path that nobody listens on (left by a process that died) is removed first; one a live server
 * listens on gives UV_EADDRINUSE, and so does a path that is not a socket (it is never removed).
 * 0 or a negative libuv error; p is the caller's to close either way, and closing it removes the
 * socket file it bound (libuv's uv__pipe_close unlinks it). */
int ml_listen_unix(uv_pipe_t *p, const char *path, int backlog, uv_connection_cb cb);

/* The same as a plain listening socket (non-blocking, close-on-exec) for processes that share it:
 * the supervisor of `moonlet --unix PATH --workers N` makes it before the fork, every worker
 * accepts on its copy. The fd, or a negative libuv error; *ino identifies the socket file for
 * ml_listen_unix_unlink, which removes it at the end unless another socket took the path since. */
int ml_listen_unix_fd(const char *path, int backlog, unsigned long *ino);
void ml_listen_unix_unlink(const char *path, unsigned long ino);

/* Lets the socket fd share its port with others that set it too (SO_REUSEPORT): 0 or -errno. */
int ml_listen_share_port(uv_os_sock_t fd);

/* A socket bound (not listening) with SO_REUSEPORT to host:port (host numeric or a name, resolved
 * here, blocking: for a process that runs no loop yet), which keeps the port for the workers that
 * will listen on it; *bound_port is the port (the one the kernel chose for port 0). The socket's
 * fd, close-on-exec, or a negative libuv error. */
int ml_listen_reserve(const char *host, int port, int *bound_port);

#endif
