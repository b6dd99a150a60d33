/* spec/c/loop_wait.h: how the C tests wait, header only: one uv loop (`loop`, which the test
 * initialises along with `deadline`: uv_timer_init(&loop, &deadline)) and run_until(), which turns
 * it until a condition holds or WAIT_MS (defined by the test before the include) pass, so that
 * every wait is bounded and nothing sleeps to synchronise. */
#ifndef ML_LOOP_WAIT_H
#define ML_LOOP_WAIT_H

#include <uv.h>

static uv_loop_t loop;
static uv_timer_t deadline; /* the timeout of the wait in progress */
static int deadline_hit;

static void deadline_cb(uv_timer_t *t) {
  (void)t;
  deadline_hit = 1;
}

/* Runs the loop until cond(arg) holds or WAIT_MS pass. Returns 1 when cond held. The deadline
 * timer keeps the loop alive, so UV_RUN_ONCE never blocks past it. */
static int run_until(int (*cond)(void *), void *arg) {
  deadline_hit = 0;
  uv_timer_start(&deadline, deadline_cb, WAIT_MS, 0);
  while (!cond(arg) && !deadline_hit)
    uv_run(&loop, UV_RUN_ONCE);
  uv_timer_stop(&deadline);
  return cond(arg);
}

#endif
