/* core/moonlet.h: the public API of libmoonlet, the one header a host includes.
 *
 * An instance (moonlet_t) owns a LuaJIT state, its tasks and its listeners. There is no global state:
 * several instances may live in one process, each on its own loop or sharing the host's. Every call
 * is made on the thread that runs the instance's loop.
 *
 *   moonlet_config_t cfg;
 *   moonlet_config_default(&cfg);
 *   moonlet_t *m = moonlet_new(&cfg);               // NULL when out of memory
 *   moonlet_main(m, argc, argv);                    // what the `moonlet` command does with argv
 *   int code = moonlet_run(m);                      // runs the loop until everything is done
 *   moonlet_free(m);
 */
#ifndef MOONLET_H
#define MOONLET_H

#include <stddef.h>
#include <uv.h>

#define MOONLET_VERSION "0.1.0"

typedef struct moonlet_s moonlet_t;

typedef struct moonlet_config_s {
  uv_loop_t *loop;          /* the host's loop, or NULL: the instance creates and owns one */
  const char *lua_path;     /* extra package.path entries ("dir/?.lua;..."), or NULL */
  const char *lua_dir;      /* where the framework's lua/ lives; NULL: MOONLET_LUA_DIR */
  int log_level;            /* ML_LOG_* (0 error .. 3 debug); default 2 (info) */
  void (*log_sink)(void *ud, int level, const char *line); /* NULL: stderr */
  void *log_ud;
  int handle_signals;       /* 1: SIGINT/SIGTERM shut the servers down gracefully, SIGHUP reloads,
                               SIGPIPE is ignored. A host that leaves this 0 must ignore SIGPIPE
                               itself: libuv writes to sockets with write(2). */
} moonlet_config_t;

void moonlet_config_default(moonlet_config_t *cfg);
moonlet_t *moonlet_new(const moonlet_config_t *cfg);
/* Runs the command line of the `moonlet` program (script, app, `test`, flags) inside the instance:
 * the work starts now and goes on in moonlet_run. Returns 0, or non-zero after printing an error. */
int moonlet_main(moonlet_t *m, int argc, char **argv);
/* Runs the loop until no task, server or timer is left (or moonlet_stop). Returns the exit code:
 * 0, or 1 when the main script failed. */
int moonlet_run(moonlet_t *m);
/* Runs one loop iteration without blocking longer than timeout_ms (0: do not block). Returns
 * non-zero while there is more to do. */
int moonlet_step(moonlet_t *m, int timeout_ms);
/* Begins a graceful shutdown: servers stop accepting and finish in-flight requests. */
void moonlet_stop(moonlet_t *m);
/* Closes every handle and frees the instance. Call it after moonlet_run returned, or when the
 * host's loop has run the close callbacks (moonlet_free runs the loop until they have). */
void moonlet_free(moonlet_t *m);
uv_loop_t *moonlet_loop(moonlet_t *m);

#endif
