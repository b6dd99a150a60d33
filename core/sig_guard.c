/* core/sig_guard.c: see sig_guard.h. The handler only reads and writes sig_atomic_t flags, calls
 * write(2), signal(2), raise(3) and libuv's own handler: all async-signal-safe. */
#include "sig_guard.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

/* libuv's handlers of SIGINT and SIGTERM, which ours runs after counting */
static struct sigaction uv_int, uv_term;
/* a SIGINT or SIGTERM came that no loop took yet */
static volatile sig_atomic_t unheard;

static void guard(int signum) {
  if (unheard) {
    static const char msg[] =
        "moonlet: a second signal and the loop is busy (a handler that does not "
        "yield?): exiting now\n";
    ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)w;
    signal(signum, SIG_DFL);
    raise(signum); /* blocked while this handler runs (libuv's mask): delivered when it returns */
    return;
  }
  unheard = 1;
  struct sigaction *uv = signum == SIGINT ? &uv_int : &uv_term;
  if (uv->sa_handler != SIG_DFL && uv->sa_handler != SIG_IGN && uv->sa_handler != guard)
    uv->sa_handler(signum);
}

int ml_sig_guard_install(int signum) {
  if (signum != SIGINT && signum != SIGTERM) return -EINVAL;
  struct sigaction cur;
  if (sigaction(signum, NULL, &cur) < 0) return -errno;
  if (cur.sa_handler == guard || (cur.sa_flags & SA_SIGINFO) || cur.sa_handler == SIG_DFL ||
      cur.sa_handler == SIG_IGN)
    return 0; /* wrapped already, or no libuv handler to wrap */
  *(signum == SIGINT ? &uv_int : &uv_term) = cur;
  struct sigaction sa = cur;
  sa.sa_handler = guard;
  if (sigaction(signum, &sa, NULL) < 0) return -errno;
  return 0;
}

void ml_sig_guard_heard(void) { unheard = 0; }
