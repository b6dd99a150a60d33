/* core/workers.h: the supervisor of `moonlet --workers N` (nginx's master process). It forks N
 * worker processes, each of which goes on to run the whole server on its own loop, and watches
 * them until they are all gone.
 */
#ifndef ML_WORKERS_H
#define ML_WORKERS_H

#include <signal.h>

#include "log.h"

typedef struct ml_worker_info_s {
  int id;            /* 0 .. count-1 */
  int count;         /* N */
  int ready_fd;      /* the pipe end ml_workers_ready writes to (close-on-exec); -1 once written */
  sigset_t old_mask; /* the signal mask to restore once the worker's loop is ready for signals */
} ml_worker_info_t;

/* Forks n workers and supervises them; log is the supervisor's logger. Returns twice over:
 *  - in each worker: 1, with *w filled in, and SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGCHLD still
 *    blocked: a signal that comes now stays pending until the worker's loop has its own signal
 *    pipe (uv_loop_fork) and restores w->old_mask. The worker then serves, and calls
 *    ml_workers_ready once it listens;
 *  - in the supervisor, once every worker has exited: 0, with *exit_code the command's exit
 *    status (0 after a stop whose workers all exited 0; a worker's failing status when one
 *    exited before any worker had served: an app that cannot start stops them all rather than
 *    being restarted forever; once one has served, a worker that fails to start again is retried
 *    with a growing delay, up to 30 s, as whatever failed may come back);
 *  - a negative libuv error when nothing could be forked.
 * The supervisor passes SIGINT, SIGTERM, SIGHUP and SIGUSR1 on to every worker, and starts again a
 * worker that dies (killed, crashed, a non-zero exit), one second after its last start at the
 * soonest (2, 4, ... 30 s while it fails to start again). A worker dies with SIGTERM when the
 * supervisor does (PR_SET_PDEATHSIG), and runs in a process group of its own, so that a terminal's
 * ^C reaches it once, through the supervisor (a service manager should likewise signal the
 * supervisor only: systemd's KillMode=mixed). stdio buffers are flushed first, and the signals
 * above are blocked in the supervisor while it runs. */
/* What the supervisor runs besides (each NULL: none), with ud:
 * - on_stop, once, when a stop begins (a signal, or the workers failing to start), before the stop
 *   is passed on: the `--unix PATH` socket is closed and its file removed there, so that new
 *   clients fail at once (a proxy tries its next server) instead of queueing at a socket no worker
 *   will accept on again;
 * - on_reopen, on each SIGUSR1 (nginx's "reopen the log files", after logrotate moved them),
 *   before the signal is passed on to the workers, which reopen theirs. */
typedef struct ml_workers_hooks_s {
  void (*on_stop)(void *ud);
  void (*on_reopen)(void *ud);
  void *ud;
} ml_workers_hooks_t;
int ml_workers_run(int n, const ml_log_t *log, ml_worker_info_t *w, int *exit_code,
                   const ml_workers_hooks_t *hooks);

/* A worker tells the supervisor it serves (its first listener is open): from then on an exit is a
 * death to recover from, not a failure to start. Once; later calls do nothing. */
void ml_workers_ready(ml_worker_info_t *w);

#endif
