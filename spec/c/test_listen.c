/* spec/c/test_listen.c: core/listen.c's Unix domain sockets when several processes start on one
 * stale socket file at the same instant: exactly one of them gets the path, the others
 * UV_EADDRINUSE, and the file at the path is the winner's (a client that connects reaches it), for
 * stream and datagram sockets alike; the path's lock file is gone afterwards.
 *
 * How: K forked children wait on a pipe each; a round writes one byte to every pipe, so that they
 * call ml_listen_unix_fd (or ml_unix_dgram_fd) together, and they report the result and their
 * socket file's identity on a shared pipe (writes smaller than PIPE_BUF are atomic). The winner
 * then closes its socket without removing the file, which leaves the next round a stale file.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../core/listen.h"
#include "ctest.h"

#define KIDS 4
#define ROUNDS 1000

typedef struct {
  int kid;  /* which child */
  int r;    /* the fd (>= 0: it won) or the error */
  int done; /* 1: the report that it closed its socket */
  unsigned long dev, ino;
} report_t;

static int readn(int fd, void *buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t k = read(fd, (char *)buf + got, n - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    got += (size_t)k;
  }
  return 0;
}

/* A child: per round, waits for its byte ('s' stream, 'd' datagram, 'q' quit), binds, reports,
 * waits for the next byte ('c'), closes (the file stays: stale), reports again. */
static void kid_main(int kid, int go, int out, const char *path) {
  for (;;) {
    char c;
    if (readn(go, &c, 1) < 0 || c == 'q') _exit(0);
    ml_unix_id_t id = {0, 0};
    report_t rep = {kid, 0, 0, 0, 0};
    rep.r = c == 's' ? ml_listen_unix_fd(path, 8, -1, &id) : ml_unix_dgram_fd(path, -1, &id);
    rep.dev = id.dev;
    rep.ino = id.ino;
    if (write(out, &rep, sizeof rep) != (ssize_t)sizeof rep) _exit(1);
    if (readn(go, &c, 1) < 0) _exit(1);
    if (rep.r >= 0) close(rep.r); /* no unlink: the file is left stale, as a killed server's */
    rep.done = 1;
    if (write(out, &rep, sizeof rep) != (ssize_t)sizeof rep) _exit(1);
  }
}

/* Whether a socket of type connects to path (a live server there). */
static int connects(const char *path, int type) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int fd = socket(AF_UNIX, type, 0);
  int ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
  if (fd >= 0) close(fd);
  return ok;
}

static void test_race(void) {
  ctest_section("servers binding one stale socket file at one instant: one wins, the rest in use");
  char dir[] = "/tmp/moonlet-listen-XXXXXX", path[96], lock[128];
  if (!CHECK(mkdtemp(dir) != NULL)) return;
  snprintf(path, sizeof path, "%s/race.sock", dir);
  snprintf(lock, sizeof lock, "%s.lock", path);
  int out[2], go[KIDS][2];
  pid_t pids[KIDS];
  if (!CHECK(pipe(out) == 0)) return;
  for (int i = 0; i < KIDS; i++) {
    if (!CHECK(pipe(go[i]) == 0)) return;
    pids[i] = fork();
    if (pids[i] == 0) {
      close(out[0]);
      kid_main(i, go[i][0], out[1], path);
    }
    close(go[i][0]);
  }
  close(out[1]);
  int bad_rounds = 0, wins = 0, in_use = 0, other = 0;
  for (int round = 0; round < ROUNDS; round++) {
    int type = round % 2 ? SOCK_DGRAM : SOCK_STREAM;
    char start = type == SOCK_STREAM ? 's' : 'd', close_c = 'c';
    for (int i = 0; i < KIDS; i++)
      if (write(go[i][1], &start, 1) != 1) other++;
    report_t reps[KIDS];
    int winner = -1, winners = 0;
    for (int i = 0; i < KIDS; i++) {
      if (readn(out[0], &reps[i], sizeof reps[i]) < 0) {
        other++;
        break;
      }
      if (reps[i].r >= 0) {
        winners++;
        winner = i;
      } else if (reps[i].r == UV_EADDRINUSE) {
        in_use++;
      } else {
        if (other++ < 5) printf("    round %d: %s\n", round, uv_err_name(reps[i].r));
      }
    }
    wins += winners;
    struct stat st;
    int reached = winner >= 0 && lstat(path, &st) == 0 &&
                  (unsigned long)st.st_ino == reps[winner].ino &&
                  (unsigned long)st.st_dev == reps[winner].dev && connects(path, type);
    if (winners != 1 || !reached) {
      if (bad_rounds++ < 5)
        printf("    round %d (%s): %d winners, the file %s the winner's\n", round,
               type == SOCK_STREAM ? "stream" : "datagram", winners, reached ? "is" : "is not");
    }
    for (int i = 0; i < KIDS; i++)
      if (write(go[i][1], &close_c, 1) != 1) other++;
    for (int i = 0; i < KIDS; i++) {
      report_t done;
      if (readn(out[0], &done, sizeof done) < 0) other++;
    }
  }
  CHECK_INT(bad_rounds, 0);
  CHECK_INT(wins, ROUNDS);
  CHECK_INT(in_use, ROUNDS * (KIDS - 1));
  CHECK_INT(other, 0);
  CHECK_INT(access(lock, F_OK), -1); /* the lock file is removed once the socket listens */
  char quit = 'q';
  for (int i = 0; i < KIDS; i++) {
    if (write(go[i][1], &quit, 1) != 1) other++;
    close(go[i][1]);
    int status = -1;
    waitpid(pids[i], &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  close(out[0]);
  unlink(path);
  CHECK_INT(rmdir(dir), 0);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  test_race();
  return ctest_end();
}
