/* examples/embed/two_instances.c: two independent instances of libmoonlet in one process, each on
 * its own thread with its own loop (mode 1, moonlet_run), each serving the same counter app on its
 * own port. The counter is a Lua global, so the counts staying apart proves that the instances
 * share no state: not the Lua state, not the loop, not the listeners. The main thread waits for
 * SIGTERM/SIGINT and stops both through moonlet_post, the one call other threads may make.
 *
 *   two_instances [--port-a N] [--port-b N]    0 (the default) picks free ports
 *
 * Ownership: each instance is made, run and freed by its own thread; main only posts to it while
 * it runs. Signals are blocked in every thread and taken by main with sigwait.
 */
#include <lauxlib.h>
#include <lua.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/moonlet.h"

static const char APP[] =
    "local moonlet = require 'moonlet'\n"
    "local instance = require 'instance'\n"
    "hits = 0 -- a global on purpose: each instance has a Lua state of its own\n"
    "local app = moonlet.app()\n"
    "app:get('/count', function()\n"
    "    hits = hits + 1\n"
    "    return { instance = instance.name(), count = hits }\n"
    "end)\n"
    "return app\n";

typedef struct {
  const char *name;
  int want_port;
  moonlet_t *m;
  int port;       /* bound port, or a negative UV_E* code */
  uv_sem_t ready; /* posted once port is known */
  pthread_t thread;
} inst_t;

/* syntax: name = instance.name() -- "A" or "B" */
static int inst_name(lua_State *L) {
  inst_t *in = moonlet_userdata(moonlet_from_lua(L));
  lua_pushstring(L, in->name);
  return 1;
}

static int luaopen_instance(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, inst_name);
  lua_setfield(L, -2, "name");
  return 1;
}

static void *run_instance(void *arg) {
  inst_t *in = arg;
  moonlet_config_t cfg;
  moonlet_config_default(&cfg);
  cfg.userdata = in;
  in->m = moonlet_new(&cfg);
  if (!in->m) {
    in->port = UV_ENOMEM;
    uv_sem_post(&in->ready);
    return NULL;
  }
  moonlet_register(in->m, "instance", luaopen_instance);
  int r = moonlet_load_string(in->m, "counter_app", APP);
  in->port = r == 0 ? moonlet_listen(in->m, "127.0.0.1", in->want_port) : (r < 0 ? r : UV_EINVAL);
  uv_sem_post(&in->ready);
  if (in->port > 0) moonlet_run(in->m); /* until the stop posted by main */
  moonlet_free(in->m);
  return NULL;
}

static void stop_cb(moonlet_t *m, void *data) {
  (void)data;
  moonlet_stop(m);
}

int main(int argc, char **argv) {
  inst_t in[2] = {{.name = "A"}, {.name = "B"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--port-a") == 0)
      in[0].want_port = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--port-b") == 0)
      in[1].want_port = atoi(argv[i + 1]);
  }
  signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, NULL); /* the threads inherit the mask */

  int ok = 1;
  for (int i = 0; i < 2; i++) {
    uv_sem_init(&in[i].ready, 0);
    if (pthread_create(&in[i].thread, NULL, run_instance, &in[i]) != 0) return 70;
  }
  for (int i = 0; i < 2; i++) {
    uv_sem_wait(&in[i].ready);
    if (in[i].port < 0) {
      fprintf(stderr, "two_instances: %s cannot start: %s\n", in[i].name, uv_strerror(in[i].port));
      ok = 0;
    } else {
      printf("two_instances: %s serving on http://127.0.0.1:%d\n", in[i].name, in[i].port);
    }
  }
  fflush(stdout);
  if (ok) {
    int sig;
    sigwait(&set, &sig);
    for (int i = 0; i < 2; i++)
      moonlet_post(in[i].m, stop_cb, NULL);
  }
  for (int i = 0; i < 2; i++) {
    pthread_join(in[i].thread, NULL);
    uv_sem_destroy(&in[i].ready);
  }
  printf("two_instances: both stopped\n");
  return ok ? 0 : 1;
}
