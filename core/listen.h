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

/* Initialises h, a union of uv_tcp_t and uv_pipe_t, as the one is_unix says. */
static inline void ml_stream_init(uv_loop_t *loop, void *h, int is_unix) {
  if (is_unix)
    uv_pipe_init(loop, (uv_pipe_t *)h, 0);
  else
    uv_tcp_init(loop, (uv_tcp_t *)h);
}

/* The socket file a listener made: removed at the end only if it is still that one. */
typedef struct {
  unsigned long dev, ino;
} ml_unix_id_t;

/* A listening Unix domain socket at path (non-blocking, close-on-exec), *id its file, its
 * permissions mode (0660: the owner and its group may connect; < 0: what the umask leaves). A
 * socket file already there that nobody listens on (a connect is refused: its process died) is
 * removed first; one a server listens on gives UV_EADDRINUSE, a file that is not a socket UV_EEXIST
 * (neither is ever removed). The file is checked, replaced and bound under an flock of
 * path + ".lock" (made and removed here): of several servers started at once on a stale file, one
 * gets it and the others UV_EADDRINUSE. The fd, or a negative libuv error. The supervisor of
 * `moonlet --unix PATH --workers N` makes it before the fork, and every worker accepts on its copy.
 */
int ml_listen_unix_fd(const char *path, int backlog, int mode, ml_unix_id_t *id);

/* The same, listening through p (uv_pipe_init'ed), which owns the socket from then on: 0 or a
 * negative libuv error (p is the caller's to close either way). The caller removes the file with
 * ml_listen_unix_unlink when it closes p: libuv does not (the socket is not uv_pipe_bind's, whose
 * close would unlink the path by name, even a newer server's file). */
int ml_listen_unix(uv_pipe_t *p, const char *path, int backlog, int mode, uv_connection_cb cb,
                   ml_unix_id_t *id);

/* A datagram Unix domain socket (non-blocking, close-on-exec) bound to path under the same rules
 * (a stale file replaced, a live socket's kept: UV_EADDRINUSE; *id its file, mode as above); with
 * path NULL, bound to a free abstract name the kernel picks (Linux's autobind), so that the peers
 * it sends to can answer. The fd, or a negative libuv error. */
int ml_unix_dgram_fd(const char *path, int mode, ml_unix_id_t *id);

/* Removes the socket file at path if it is still the one id names (not a newer server's), under
 * the path's lock, so that a server replacing it at that instant keeps its own. */
void ml_listen_unix_unlink(const char *path, const ml_unix_id_t *id);

/* Lets the socket fd share its port with others that set it too (SO_REUSEPORT): 0 or -errno. */
int ml_listen_share_port(uv_os_sock_t fd);

/* A socket bound (not listening) with SO_REUSEPORT to host:port (host numeric or a name, resolved
 * here, blocking: for a process that runs no loop yet), which keeps the port for the workers that
 * will listen on it; *bound_port is the port (the one the kernel chose for port 0). The socket's
 * fd, close-on-exec, or a negative libuv error. */
int ml_listen_reserve(const char *host, int port, int *bound_port);

#endif
