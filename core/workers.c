/* core/workers.c: the supervisor of `moonlet --workers N`. Plain POSIX and Linux calls, no libuv:
 * the supervisor runs no loop. It blocks SIGCHLD, SIGINT, SIGTERM, SIGHUP and SIGUSR1, reads them
 * from a signalfd, and polls it together with the "ready" pipe the workers write their id to once
 * they serve.
 *
 * Invariants: a slot's pid is non-zero exactly while that worker is alive and not yet reaped; a
 * worker is reaped only here (waitpid on SIGCHLD, whose disposition is made the default first: an
 * inherited SIG_IGN would reap them unseen); the ready pipe is drained before exits are looked at,
 * so a worker that said it serves is never taken for one that failed to start; each worker gets
 * the signal the supervisor got, once per signal; a worker is started again only when the
 * supervisor is not stopping, and at least its delay after its last start: RESTART_DELAY_MS,
 * doubled (up to MAX_DELAY_MS) each time it fails to start again or dies within STABLE_MS of
 * saying it serves (a worker that crashes on every start, or on the first request it takes, is
 * not started again every second forever), back to RESTART_DELAY_MS once it served that long.
 */
#include "workers.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RESTART_DELAY_MS 1000
#define MAX_DELAY_MS 30000
#define STABLE_MS 10000

typedef struct {
  pid_t pid;           /* 0: not running */
  int ready;           /* it said it serves, since its last start */
  uint64_t ready_at;   /* ms, monotonic: when it said so */
  uint64_t started;    /* ms, monotonic */
  uint64_t restart_at; /* ms; 0: no restart pending */
  uint64_t delay;      /* ms from its last start to the next */
} slot_t;

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

typedef struct {
  int n;
  slot_t *slots;
  const ml_log_t *log;
  sigset_t old_mask;
  int sfd;
  int pipe_r, pipe_w;
  pid_t supervisor;
  int served; /* some worker has served: from then on a failure to start is retried */
  void (*on_stop)(void *ud); /* run once when a stop begins (ml_workers_run), then NULL */
  void (*on_reopen)(void *ud);
  void *hooks_ud;
} sup_t;

/* Forks worker i. Returns 1 in the worker (w filled in), 0 in the supervisor, <0 when fork failed.
 */
static int start_worker(sup_t *s, int i, ml_worker_info_t *w) {
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) return -errno;
  if (pid == 0) {
    close(s->sfd);
    close(s->pipe_r);
    free(s->slots);
    /* a group of its own: a terminal's ^C reaches the supervisor alone, which passes it on
     * once (a worker that got it twice would take the second for "close everything now") */
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != s->supervisor) _exit(1); /* it died before the line above */
    w->id = i;
    w->count = s->n;
    w->ready_fd = s->pipe_w;
    w->old_mask = s->old_mask; /* the signals stay blocked: see workers.h */
    return 1;
  }
  slot_t *sl = &s->slots[i];
  sl->pid = pid;
  sl->ready = 0;
  sl->started = now_ms();
  if (!sl->delay) sl->delay = RESTART_DELAY_MS;
  return 0;
}

/* Marks the workers whose ids came through the ready pipe (non-blocking: read until empty). */
static void drain_ready(sup_t *s) {
  unsigned char ids[64];
  ssize_t got;
  while ((got = read(s->pipe_r, ids, sizeof ids)) > 0) {
    for (ssize_t k = 0; k < got; k++) {
      if (ids[k] >= s->n) continue;
      s->slots[ids[k]].ready = 1;
      s->slots[ids[k]].ready_at = now_ms();
      s->served = 1;
    }
  }
}

static void signal_all(sup_t *s, int sig) {
  for (int i = 0; i < s->n; i++)
    if (s->slots[i].pid > 0) kill(s->slots[i].pid, sig);
}

static void describe(int status, char *buf, size_t len) {
  if (WIFSIGNALED(status))
    snprintf(buf, len, "was killed by signal %d", WTERMSIG(status));
  else
    snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
}

static int exit_status(int status) {
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* A worker exited (reaped): decides what follows. Returns a new exit code, or 0. */
/* The stop begins: on_stop, once. */
static void stop_begins(sup_t *s) {
  void (*fn)(void *) = s->on_stop;
  s->on_stop = NULL;
  if (fn) fn(s->hooks_ud);
}

static int worker_exited(sup_t *s, int i, int status, int *stopping) {
  slot_t *sl = &s->slots[i];
  pid_t pid = sl->pid;
  char how[48];
  describe(status, how, sizeof how);
  sl->pid = 0;
  int st = exit_status(status);
  if (*stopping) return st;
  if (st == 0) { /* it ended on its own (moonlet.stop(), a script that ran to its end) */
    ml_log(s->log, ML_LOG_INFO, "workers: worker %d (pid %d) exited", i, (int)pid);
    return 0;
  }
  if (!sl->ready && !s->served) { /* the app cannot start: restarting would not help */
    stop_begins(s);
    ml_log(s->log, ML_LOG_ERROR, "workers: worker %d (pid %d) %s before it served; stopping", i,
           (int)pid, how);
    *stopping = 1;
    signal_all(s, SIGTERM);
    return st;
  }
  uint64_t t = now_ms();
  if (!sl->ready || t - sl->ready_at < STABLE_MS) /* it failed to start again, or died soon */
    sl->delay = sl->delay * 2 > MAX_DELAY_MS ? MAX_DELAY_MS : sl->delay * 2;
  else
    sl->delay = RESTART_DELAY_MS; /* it served a while: its back-off is over */
  uint64_t due = sl->started + sl->delay;
  sl->restart_at = due > t ? due : t;
  ml_log(s->log, ML_LOG_WARN,
         "workers: worker %d (pid %d) %s; starting it again in %.1f s (%.0f s after its start)", i,
         (int)pid, how, (double)(sl->restart_at - t) / 1000, (double)sl->delay / 1000);
  return 0;
}

int ml_workers_run(int n, const ml_log_t *log, ml_worker_info_t *w, int *exit_code,
                   const ml_workers_hooks_t *hooks) {
  sup_t s = {.n = n, .log = log, .supervisor = getpid(), .sfd = -1};
  if (hooks) {
    s.on_stop = hooks->on_stop;
    s.on_reopen = hooks->on_reopen;
    s.hooks_ud = hooks->ud;
  }
  int pfd[2];
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGUSR1);
  s.slots = calloc((size_t)n, sizeof *s.slots);
  if (!s.slots) return -ENOMEM;
  if (pipe2(pfd, O_CLOEXEC | O_NONBLOCK) < 0) {
    int e = -errno;
    free(s.slots);
    return e;
  }
  s.pipe_r = pfd[0];
  s.pipe_w = pfd[1];
  signal(SIGCHLD, SIG_DFL);
  sigprocmask(SIG_BLOCK, &set, &s.old_mask);
  s.sfd = signalfd(-1, &set, SFD_CLOEXEC);
  int code = 0, stopping = 0, first_err = 0, started = 0;
  if (s.sfd < 0) {
    first_err = -errno;
    goto out;
  }
  for (int i = 0; i < n; i++) {
    int r = start_worker(&s, i, w);
    if (r == 1) return 1;
    if (r < 0) {
      ml_log(log, ML_LOG_ERROR, "workers: cannot start worker %d: %s", i, strerror(-r));
      if (i == 0) {
        first_err = r;
        goto out;
      }
      s.slots[i].restart_at = now_ms() + RESTART_DELAY_MS;
    } else {
      started++;
    }
  }
  ml_log(log, ML_LOG_INFO, "workers: %d of %d started (supervisor pid %d)", started, n,
         (int)s.supervisor);
  for (;;) {
    uint64_t t = now_ms(), next = 0;
    int alive = 0;
    for (int i = 0; i < n; i++) {
      slot_t *sl = &s.slots[i];
      if (sl->restart_at && !stopping && sl->restart_at <= t) {
        sl->restart_at = 0;
        int r = start_worker(&s, i, w);
        if (r == 1) return 1;
        if (r < 0) {
          ml_log(log, ML_LOG_ERROR, "workers: cannot start worker %d: %s", i, strerror(-r));
          sl->restart_at = t + RESTART_DELAY_MS;
        }
      }
      if (sl->pid > 0) alive++;
      if (sl->restart_at && !stopping && (!next || sl->restart_at < next)) next = sl->restart_at;
    }
    if (alive == 0 && (stopping || next == 0)) break;
    struct pollfd p[2] = {{.fd = s.sfd, .events = POLLIN}, {.fd = s.pipe_r, .events = POLLIN}};
    int timeout = next ? (int)(next > t ? next - t : 0) : -1;
    if (poll(p, 2, timeout) < 0 && errno != EINTR) {
      ml_log(log, ML_LOG_ERROR, "workers: poll: %s; stopping", strerror(errno));
      stop_begins(&s);
      signal_all(&s, SIGTERM);
      code = 1;
      break;
    }
    drain_ready(&s);
    if (!(p[0].revents & POLLIN)) continue;
    struct signalfd_siginfo si;
    if (read(s.sfd, &si, sizeof si) != (ssize_t)sizeof si) continue;
    int sig = (int)si.ssi_signo;
    if (sig == SIGINT || sig == SIGTERM) {
      if (!stopping) ml_log(log, ML_LOG_INFO, "workers: stopping (signal %d)", sig);
      stopping = 1;
      stop_begins(&s);
      signal_all(&s, sig); /* a second one is passed on too: the workers close at once then */
      continue;
    }
    if (sig == SIGHUP) {
      signal_all(&s, SIGHUP);
      continue;
    }
    if (sig == SIGUSR1) {
      if (s.on_reopen) s.on_reopen(s.hooks_ud);
      signal_all(&s, SIGUSR1);
      continue;
    }
    int status;
    pid_t pid;
    drain_ready(&s); /* a ready byte written just before an exit counts */
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      int i = 0;
      while (i < n && s.slots[i].pid != pid)
        i++;
      if (i == n) continue; /* not a worker (cannot happen: the supervisor has no other child) */
      int st = worker_exited(&s, i, status, &stopping);
      if (st && !code) code = st;
    }
  }
  *exit_code = code;
out:
  if (s.sfd >= 0) close(s.sfd);
  close(s.pipe_r);
  close(s.pipe_w);
  free(s.slots);
  sigprocmask(SIG_SETMASK, &s.old_mask, NULL);
  return first_err;
}

void ml_workers_ready(ml_worker_info_t *w) {
  unsigned char id = (unsigned char)w->id;
  if (w->ready_fd < 0) return;
  ssize_t r = write(w->ready_fd, &id, 1);
  (void)r;
  close(w->ready_fd);
  w->ready_fd = -1;
}
