/* core/workers.c: the supervisor of `moonlet --workers N`. Plain POSIX and Linux calls, no libuv:
 * the supervisor runs no loop. It blocks SIGCHLD, SIGINT, SIGTERM and SIGHUP, reads them from a
 * signalfd, and polls it together with the "ready" pipe the workers write their id to once they
 * serve.
 *
 * Invariants: a slot's pid is non-zero exactly while that worker is alive and not yet reaped; a
 * worker is reaped only here (waitpid on SIGCHLD); each worker gets the signal the supervisor got,
 * once per signal; a worker is started again only when it had served, the supervisor is not
 * stopping, and at least RESTART_DELAY_MS passed since its last start.
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

typedef struct {
  pid_t pid;           /* 0: not running */
  int ready;           /* it said it serves (since its last start) */
  int done;            /* exited on its own, with 0, or the supervisor is stopping: not restarted */
  uint64_t started;    /* ms, monotonic */
  uint64_t restart_at; /* ms; 0: no restart pending */
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
    sigprocmask(SIG_SETMASK, &s->old_mask, NULL);
    w->id = i;
    w->count = s->n;
    w->ready_fd = s->pipe_w;
    return 1;
  }
  s->slots[i] = (slot_t){.pid = pid, .started = now_ms()};
  return 0;
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

int ml_workers_run(int n, const ml_log_t *log, ml_worker_info_t *w, int *exit_code) {
  sup_t s = {.n = n, .log = log, .supervisor = getpid()};
  int pfd[2];
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  s.slots = calloc((size_t)n, sizeof *s.slots);
  if (!s.slots) return -ENOMEM;
  if (pipe2(pfd, O_CLOEXEC) < 0) {
    int e = -errno;
    free(s.slots);
    return e;
  }
  s.pipe_r = pfd[0];
  s.pipe_w = pfd[1];
  sigprocmask(SIG_BLOCK, &set, &s.old_mask);
  s.sfd = signalfd(-1, &set, SFD_CLOEXEC);
  int code = 0, stopping = 0, first_err = 0;
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
    }
  }
  ml_log(log, ML_LOG_INFO, "workers: %d started (supervisor pid %d)", n, (int)s.supervisor);
  for (;;) {
    uint64_t t = now_ms(), next = 0;
    int alive = 0;
    for (int i = 0; i < n; i++) {
      slot_t *sl = &s.slots[i];
      if (sl->pid > 0) alive++;
      if (sl->restart_at && !stopping) {
        if (sl->restart_at <= t) {
          sl->restart_at = 0;
          int r = start_worker(&s, i, w);
          if (r == 1) return 1;
          if (r < 0) {
            ml_log(log, ML_LOG_ERROR, "workers: cannot start worker %d: %s", i, strerror(-r));
            sl->restart_at = t + RESTART_DELAY_MS;
          } else {
            alive++;
          }
        }
        if (sl->restart_at && (!next || sl->restart_at < next)) next = sl->restart_at;
      }
    }
    if (alive == 0 && (stopping || next == 0)) break;
    struct pollfd p[2] = {{.fd = s.sfd, .events = POLLIN}, {.fd = s.pipe_r, .events = POLLIN}};
    int timeout = next ? (int)(next > t ? next - t : 0) : -1;
    if (poll(p, 2, timeout) < 0 && errno != EINTR) {
      ml_log(log, ML_LOG_ERROR, "workers: poll: %s", strerror(errno));
      break;
    }
    if (p[1].revents & POLLIN) {
      unsigned char ids[64];
      ssize_t got = read(s.pipe_r, ids, sizeof ids);
      for (ssize_t k = 0; k < got; k++)
        if (ids[k] < n) s.slots[ids[k]].ready = 1;
    }
    if (!(p[0].revents & POLLIN)) continue;
    struct signalfd_siginfo si;
    if (read(s.sfd, &si, sizeof si) != (ssize_t)sizeof si) continue;
    int sig = (int)si.ssi_signo;
    if (sig == SIGINT || sig == SIGTERM) {
      if (!stopping) ml_log(log, ML_LOG_INFO, "workers: stopping (signal %d)", sig);
      stopping = 1;
      signal_all(&s, sig); /* a second one is passed on too: the workers close at once then */
      continue;
    }
    if (sig == SIGHUP) {
      signal_all(&s, SIGHUP);
      continue;
    }
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      int i = 0;
      while (i < n && s.slots[i].pid != pid)
        i++;
      if (i == n) continue; /* not a worker (cannot happen: the supervisor has no other child) */
      slot_t *sl = &s.slots[i];
      char how[48];
      describe(status, how, sizeof how);
      sl->pid = 0;
      int st = exit_status(status);
      if (stopping) {
        if (st && !code) code = st;
      } else if (!sl->ready) {
        if (st == 0) { /* a script that serves nothing ran to its end */
          sl->done = 1;
          continue;
        }
        ml_log(log, ML_LOG_ERROR, "workers: worker %d (pid %d) %s before it served; stopping", i,
               (int)pid, how);
        code = st;
        stopping = 1;
        signal_all(&s, SIGTERM);
      } else if (st == 0) {
        ml_log(log, ML_LOG_INFO, "workers: worker %d (pid %d) exited", i, (int)pid);
        sl->done = 1;
      } else {
        uint64_t t2 = now_ms(), due = sl->started + RESTART_DELAY_MS;
        ml_log(log, ML_LOG_WARN, "workers: worker %d (pid %d) %s; starting it again", i, (int)pid,
               how);
        sl->ready = 0;
        sl->restart_at = due > t2 ? due : t2;
      }
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

void ml_workers_ready(const ml_worker_info_t *w) {
  unsigned char id = (unsigned char)w->id;
  if (w->ready_fd >= 0) {
    ssize_t r = write(w->ready_fd, &id, 1);
    (void)r;
  }
}
