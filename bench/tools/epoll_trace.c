/* bench/tools/epoll_trace.c: an LD_PRELOAD library that records every epoll_wait of a server (when
 * it was called, when it returned, how many events) for a window of its run, then writes one line
 * per call to $EPT_OUT.<pid>: "call_ns return_ns events". bench/tools/epoll_trace.py reads them: how
 * many events each wait returned (a server in lockstep with wrk's 64 connections gets ~64 at once, a
 * server answering each request as it comes gets 1 or 2) and how long it worked between two waits.
 * That is what the saturated hello's p99 depends on (README, Benchmark). Any server that calls
 * libc's epoll_wait or epoll_pwait can be traced, nginx's workers included (they run as another
 * user: make $EPT_OUT's directory writable for them).
 *   cc -O2 -shared -fPIC -o /tmp/epoll_trace.so bench/tools/epoll_trace.c -ldl
 *   LD_PRELOAD=/tmp/epoll_trace.so EPT_OUT=/tmp/ept/moonlet EPT_START=2.2 EPT_DUR=2 build/moonlet app.lua
 * EPT_START: seconds after the first epoll_wait when recording starts (3); EPT_DUR: how long (2).
 * The file is written at the first epoll_wait after the window, or at exit. Not thread-safe: for
 * servers with one event loop thread. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define MAX_RECORDS (1 << 21)

static struct {
  long long call, ret;
  int events;
} records[MAX_RECORDS];
static unsigned long count;
static long long t_start, t_end;
static int written;
static char out_prefix[200] = "/tmp/epoll_trace";
static double start_s = 3, dur_s = 2;

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void write_records(void) {
  if (written || !count) return;
  written = 1;
  char path[256];
  snprintf(path, sizeof path, "%s.%d", out_prefix, (int)getpid());
  FILE *f = fopen(path, "w");
  if (!f) return;
  for (unsigned long i = 0; i < count && i < MAX_RECORDS; i++)
    fprintf(f, "%lld %lld %d\n", records[i].call, records[i].ret, records[i].events);
  fclose(f);
}

static void record(long long call, int events) {
  long long t = now_ns();
  if (!t_start) {
    t_start = t + (long long)(start_s * 1e9);
    t_end = t_start + (long long)(dur_s * 1e9);
  }
  if (call >= t_start && t <= t_end && count < MAX_RECORDS) {
    records[count].call = call;
    records[count].ret = t;
    records[count].events = events;
    count++;
  } else if (t > t_end) {
    write_records();
  }
}

/* the environment is read before the program runs: nginx clears its workers' environment */
__attribute__((constructor)) static void init(void) {
  const char *v = getenv("EPT_OUT");
  if (v) snprintf(out_prefix, sizeof out_prefix, "%s", v);
  if ((v = getenv("EPT_START"))) start_s = atof(v);
  if ((v = getenv("EPT_DUR"))) dur_s = atof(v);
}

__attribute__((destructor)) static void fini(void) { write_records(); }

int epoll_wait(int fd, struct epoll_event *ev, int max, int timeout) {
  static int (*real)(int, struct epoll_event *, int, int);
  if (!real) *(void **)&real = dlsym(RTLD_NEXT, "epoll_wait");
  long long call = now_ns();
  int r = real(fd, ev, max, timeout);
  record(call, r);
  return r;
}

int epoll_pwait(int fd, struct epoll_event *ev, int max, int timeout, const sigset_t *ss) {
  static int (*real)(int, struct epoll_event *, int, int, const sigset_t *);
  if (!real) *(void **)&real = dlsym(RTLD_NEXT, "epoll_pwait");
  long long call = now_ns();
  int r = real(fd, ev, max, timeout, ss);
  record(call, r);
  return r;
}
