/* bindings/mlua.h: what the binding files share: the instance struct behind moonlet_t, the task
 * scheduler (sched.c) and small helpers. Only bindings/ includes this; core/ never sees Lua.
 */
#ifndef MLUA_H
#define MLUA_H

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "../core/block_cache.h"
#include "../core/http.h"
#include "../core/log.h"
#include "../core/log_out.h"
#include "../core/moonlet.h"
#include "../core/shdict.h"
#include "../core/shm.h"
#include "../core/workers.h"

typedef struct mlua_task_s mlua_task_t;
typedef struct mlua_server_s mlua_server_t;

/* Runs when a task's coroutine ends. ok = 1: it returned (results on t->co from index 1);
 * ok = 0: it raised (message with traceback at the top of t->co). */
typedef void (*mlua_task_done_cb)(mlua_task_t *t, int ok, void *ud);
/* Takes a parked task out of its wait without resuming it: stops the wait's sources, unpins what it
 * pinned, forgets the task. Called by mlua_task_cancel only. */
typedef void (*mlua_cancel_cb)(mlua_task_t *t, void *wait);

/* A task: one coroutine moonlet runs (a request handler, a spawned function, the main script).
 * Task structs and their coroutines are pooled: a coroutine that returned is reused. */
struct mlua_task_s {
  lua_State *co; /* the coroutine, pinned by co_ref for the life of the struct */
  int co_ref;
  moonlet_t *m;
  mlua_task_done_cb done; /* NULL: nothing to report */
  void *done_ud;
  int resuming;           /* lua_resume of this task is on the C stack */
  mlua_cancel_cb cancel;  /* how to take it out of the wait it is parked in (NULL: not parked) */
  void *wait;             /* that wait's object, for cancel */
  mlua_task_t *next_free; /* pool link */
  double request;         /* the HTTP request this task works for: its own (a handler's task), or
                             inherited from the task that started it; 0: none. moonlet.app lets a
                             middleware's next() run only from a task of its own request */
};

/* A resource that holds libuv handles on behalf of Lua (a sleep's timer, a socket): linked in the
 * instance so that moonlet_free can close each one with its own close callback. */
typedef struct mlua_res_s {
  struct mlua_res_s *prev, *next;
  void (*close)(struct mlua_res_s *r); /* closes the handles; frees from their close callbacks */
} mlua_res_t;

void mlua_res_link(moonlet_t *m, mlua_res_t *r, void (*close)(mlua_res_t *));
void mlua_res_unlink(moonlet_t *m, mlua_res_t *r);
/* instance.c: SIGUSR1's work: the error log's file and the access log's file opened again */
void mlua_log_reopen(moonlet_t *m);

struct moonlet_s {
  uv_loop_t *loop;
  uv_loop_t own_loop; /* used when the host gave none */
  int owns_loop;
  lua_State *L; /* the main state; tasks are its coroutines */
  /* L's small freed blocks, when L allocates through moonlet's block cache (the default) */
  ml_bcache_t heap_cache;
  ml_log_t log;
  moonlet_config_t cfg;
  mlua_task_t *free_tasks; /* the task pool */
  unsigned free_task_count;
  unsigned live_tasks;       /* tasks started and not yet ended */
  mlua_task_t *running;      /* the task whose coroutine runs now (sched.c run); NULL outside one */
  int run_depth;             /* runs nested on the C stack (a task that starts another runs it) */
  uint64_t warn_blocking_ns; /* a run this long without yielding is logged (sched.c); 0: off */
  mlua_server_t *servers;    /* every server this instance listens with */
  mlua_res_t *resources;     /* open resources (mlua_res_t) */
  uv_signal_t sig_int, sig_term, sig_hup, sig_usr1;
  int signals_on;
  char *error_log_path; /* `--error-log FILE` (owned): stderr is this file; SIGUSR1 reopens it */
  int console_fd;       /* the stderr the process had before --error-log (-1: none taken) */
  char *pid_path;       /* `--pid-file FILE` (owned), removed at the end by the process ... */
  pid_t pid;            /* ... that wrote it (this one's id then) */
  int freeing;          /* moonlet_free is closing the Lua state: no task is resumed */
  int tearing_down;     /* moonlet_free has begun: no task is cancelled (waits are being freed) */
  int teardown_waiting; /* moonlet_free runs its own loop until what the thread pool runs ends */
  int stopping;         /* moonlet_stop was called */
  int exit_code;
  int dispatch_ref;       /* registry ref of the framework's request dispatcher */
  int stop_hook_ref;      /* registry ref of the function core.on_stop set (LUA_NOREF: none) */
  int stop_hook_ran;      /* it was started, once per instance (mlua_stop_drained) */
  int traceback_ref;      /* registry ref of debug.traceback */
  int push_ref;           /* registry ref of mlua_task_push's protected function (sched.c) */
  int protected_push_ref; /* registry ref of mlua_push_protected's protected function (sched.c) */
  int exchange_mt_ref;    /* registry ref of the request exchanges' metatable (http_server.c) */
  double requests;        /* requests started: the last one's mlua_task_t.request */
  double running_request; /* m->running's request, 0 when none: app.lua reads it through the FFI
                             (core.running_request, a pointer to it) where a C call would end the
                             JIT trace */
  double runs;            /* tasks run or resumed so far (core.runs, read the same way by
                             task.lua's end_trace_if_waited) */
  /* embedding (bindings/embed.c): the only fields other threads touch are post_head/post_tail,
   * under post_lock */
  uv_async_t post_async; /* moonlet_post wakes the loop thread with it */
  uv_mutex_t post_lock;
  struct mlua_post_s *post_head, *post_tail; /* posted functions not run yet, oldest first */
  int embed_on;                              /* post_async and post_lock are initialised */
  /* `moonlet --workers N` (bindings/workers.c): this process's place among the workers; id 0 and
   * count 1 when it is the only one. count > 1 makes every listener share its port. */
  ml_worker_info_t worker;
  /* `--unix PATH --workers N`: the listening socket the supervisor made before the fork, which each
   * worker's server at that path listens on (a copy of it), and the path; -1 / NULL otherwise */
  int worker_unix_fd;
  const char *worker_unix_path; /* the Lua string's (pinned in the registry by the command line) */
  /* moonlet.shared (bindings/shared.c): the shared memory arena, made on first use or before the
   * workers are forked (NULL: not yet), its size (0: the default), and the buffer values are
   * copied out through */
  ml_shm_t *shm;
  size_t shm_bytes;
  ml_shbuf_t shared_buf;
  /* core.regex (bindings/regex.c): the compiled regexes, made on first use (NULL: not yet, or
   * freed by moonlet_free through the instance's resources) */
  struct mlua_regex_cache_s *regex;
  /* bindings/task.c: the parks of 0 s waiting for the next prepare phase (NULL: none made yet) */
  struct mlua_yield_s *yield;
};

/* sched.c */
/* A task to start, its coroutine's stack empty; NULL when memory ran out (the host's allocator
 * budget), with nothing taken. Safe to call outside any protected call (a libuv callback): a pooled
 * task allocates nothing, and a new coroutine is made under lua_cpcall. */
mlua_task_t *mlua_task_new(moonlet_t *m);
/* Pushes a task's function and arguments before mlua_task_start: push(co, ud) runs on t->co under
 * lua_pcall, so that a memory error raised while it allocates (a userdata, a string) unwinds to
 * here instead of LuaJIT's panic, which would end the host. push returns >= 0 and leaves its values
 * on co, or < 0 (an error of its own). Returns what push returned, or UV_ENOMEM when it raised; on
 * any failure co's stack is as it was. A callback whose pushes cannot allocate (a registry ref's
 * value, a light userdata) needs none of it. */
int mlua_task_push(mlua_task_t *t, int (*push)(lua_State *co, void *ud), void *ud);
/* Gives back a task mlua_task_new made that will not be started (its stack is cleared). Allocates
 * nothing: a failed start calls it. */
void mlua_task_drop(mlua_task_t *t);
/* Starts a task: the function and its nargs arguments are on t->co. Returns after the first
 * yield or the end of the task (then `done` has run and t is back in the pool). */
int mlua_task_start(mlua_task_t *t, int nargs); /* 1: it waits now, 0: it ended */
/* Resumes a task parked in a wait with nargs results pushed on t->co. Only the callback of the
 * wait the task is parked in may call this. */
void mlua_task_resume(mlua_task_t *t, int nargs);
/* Parks the running task t in a wait: records how to cancel it and yields. Use as
 * `return mlua_task_wait(L, t, cancel, wait);` once the wait's sources are started. */
int mlua_task_wait(lua_State *L, mlua_task_t *t, mlua_cancel_cb cancel, void *wait);
/* Cancels a parked task: its wait's cancel callback cleans up, then the task is resumed with the
 * single value CANCEL (a light userdata, core.CANCEL), which the Lua wrapper of the waiting call
 * turns into the error moonlet.CANCELLED. Returns 0 when t is not parked (running or done). */
int mlua_task_cancel(mlua_task_t *t);
extern char mlua_cancel_key; /* &mlua_cancel_key is the CANCEL value */
/* The task running on coroutine L, or NULL (the main state, a foreign coroutine). */
mlua_task_t *mlua_task_current(lua_State *L);
mlua_task_t *mlua_task_at(lua_State *L, int idx); /* the task whose coroutine is at idx, or NULL */
/* Raises unless L may yield to the scheduler. */
void mlua_check_yieldable(lua_State *L, mlua_task_t *t);
/* Takes t out of the wait it is parked in (NULL: nothing): from then on it cannot be cancelled
 * there. A callback calls it when it takes its waiter, before anything that may run Lua. */
void mlua_task_unwait(mlua_task_t *t);
/* Pushes a wait's results on co (a task parked in a wait, about to be resumed) from a libuv
 * callback. No Lua frame protects a parked coroutine: a memory error raised while pushing on it
 * (a 1 GiB string LuaJIT cannot allocate) cannot be caught and ends the process (the panic
 * handler). So push(L, ud) runs under lua_pcall on the main state, pushes its results there and
 * returns their count (it may raise); they are then moved to co, which needs no allocation but
 * co's stack growth for that many slots (a few: LUA_MINSTACK is there already). Returns the count;
 * when push raised, co gets nil, "not enough memory" (or the error's message) instead, and 2. */
int mlua_push_protected(moonlet_t *m, lua_State *co, int (*push)(lua_State *L, void *ud), void *ud);
/* What a libuv callback uses to push a wait's results on co: mlua_push_protected when the host
 * gave the instance an allocator (cfg.alloc: a budget that may run out, and a memory error there
 * would end the host), else push(co, ud) directly (malloc fails only when the system does, and the
 * protected call costs a pcall per message: the hot paths, a WebSocket message, a body chunk, go
 * without). push must raise nothing but memory errors. A result that failed is nil, "not enough
 * memory": a caller that must know tests for the nil at -n. */
static inline int mlua_push_result(moonlet_t *m, lua_State *co, int (*push)(lua_State *L, void *ud),
                                   void *ud) {
  return m->cfg.alloc ? mlua_push_protected(m, co, push, ud) : push(co, ud);
}
/* nil, msg (and detail when not NULL), pushed on co from a callback through mlua_push_result (the
 * strings may be new to the state). Returns 2 or 3. */
int mlua_push_fail(moonlet_t *m, lua_State *co, const char *msg, const char *detail);
/* mlua_push_error's nil, message, code name, pushed on co from a callback so. Returns 3 (2 when
 * memory ran out). */
int mlua_push_error_to(moonlet_t *m, lua_State *co, int e);
/* The timer delay of an I/O wait (a socket's receive, send or connect, a query, a pipe's
 * read) of ms milliseconds: at least 1. A 0 ms timer started in a timer callback is due at
 * once, and libuv (before 1.45) runs it in the same pass over the timers, before the loop polls: a
 * task that retries a receive with a timeout of 0 would then never see the data that came and keep
 * the loop from ever polling (signals included). Parks of 0 s take another way (task.c: the next
 * prepare phase). */
static inline uint64_t mlua_wait_ms(uint64_t ms) { return ms ? ms : 1; }
/* Seconds (a Lua number) as whole milliseconds, rounded: 0 for NaN and what rounds below 1; at
 * most 1e15 (31,000 years: a longer wait, math.huge's, is as good as never, and the cast of a
 * double beyond uint64_t's range is undefined: infinity became 0 on x86-64, a wait that ended at
 * once). */
static inline uint64_t mlua_ms(double secs) {
  double d = secs * 1000.0 + 0.5;
  return !(d >= 1.0) ? 0 : d < 1e15 ? (uint64_t)d : (uint64_t)1e15;
}
#define MLUA_NOT_YIELDABLE                                                                         \
  "moonlet: cannot wait here: a C function (such as table.sort's comparator or require) is "       \
  "between this call and the task"
void mlua_sched_init(moonlet_t *m);
mlua_task_t **mlua_sched_detach(moonlet_t *m);
void mlua_sched_free_list(mlua_task_t **list);

/* embed.c: the embedding API's state. init: 0 or a UV_E* code; close: runs the posts still
 * queued and closes the async handle (moonlet_free, before anything else is closed). */
int mlua_embed_init(moonlet_t *m);
/* Reads Lua's "module being loaded" value, for embed.c to clear after a failed require; called
 * protected, by moonlet_new. */
void mlua_embed_read_sentinel(lua_State *L);
void mlua_embed_close(moonlet_t *m);

/* instance.c */
/* A graceful stop (moonlet_stop) has no server left: the function of core.on_stop runs in a task
 * of its own, which stops the loop when it is done (core.halt); without one the loop stops now. */
void mlua_stop_drained(moonlet_t *m);
moonlet_t *mlua_instance(lua_State *L);                              /* the instance of upvalue 1 */
void mlua_register(lua_State *L, moonlet_t *m, const luaL_Reg *fns); /* fns with m as upvalue */
/* Methods of a userdata type: fns with upvalues m and the type's metatable (at stack index mt), so
 * that mlua_check_object checks their self by identity, not by the registry name. */
void mlua_register_methods(lua_State *L, moonlet_t *m, const luaL_Reg *fns, int mt);
void *mlua_check_object(lua_State *L, int idx, const char *tname); /* luaL_checkudata, faster */
int mlua_push_sockaddr(lua_State *L, const struct sockaddr *sa);   /* address, port: returns 2 */
int mlua_push_error(lua_State *L, int uv_err); /* nil, short message, code name: returns 3 */
/* The string at idx (luaL_checklstring: raises for a wrong type) as a C string, or NULL when it
 * holds a NUL byte: the C string would end there and name something else ("x.txt\0.png" is
 * "x.txt", "localhost\0.evil" is "localhost"), so the caller refuses it with nil, "invalid
 * argument" (UV_EINVAL) before anything starts. */
const char *mlua_cstring_arg(lua_State *L, int idx);
/* LuaJIT's int64_t and uint64_t cdata (1LL, 2ULL) at idx: the decimal text of its value in buf
 * and its length, with *is_unsigned set for a uint64_t; 0 for any other value (bindings/int64.c).
 */
size_t mlua_int64_text(lua_State *L, int idx, char buf[24], int *is_unsigned);
/* Pushes the table of a TLS peer's certificate: client_verified, client_subject, client_issuer,
 * client_cert (bindings/tcp.c; the HTTP server's req.tls too). Returns 1. */
struct ml_tls_s;
int mlua_push_tls_peer(lua_State *L, const struct ml_tls_s *t);
const char *mlua_err_string(int uv_err); /* "timeout", "closed", "connection refused", ... */
/* http_server.c: a header name is a token (RFC 9110 5.6.2), a value holds no control character
 * but HT (5.5); the server's response headers and the HTTP client's request headers alike */
int mlua_valid_token(const char *s, size_t n);
int mlua_valid_value(const char *s, size_t n);

/* Module openers, one per file. */
int luaopen_moonlet_core(lua_State *L);
void mlua_preload_linked_modules(lua_State *L); /* C modules linked in: cjson in `make static` */
void mlua_open_time(lua_State *L, moonlet_t *m);
int mlua_sleep(lua_State *L);
void mlua_open_task(lua_State *L, moonlet_t *m);
void mlua_open_http_server(lua_State *L, moonlet_t *m);
void mlua_open_fs(lua_State *L, moonlet_t *m);
/* fs.c: the descriptor of the moonlet.file at idx, which gives it up (-1 when closed already) */
int mlua_file_take(lua_State *L, int idx);
void mlua_open_work(lua_State *L, moonlet_t *m);
void mlua_open_tcp(lua_State *L, moonlet_t *m);
void mlua_open_udp(lua_State *L, moonlet_t *m);
void mlua_open_workers(lua_State *L, moonlet_t *m);
void mlua_open_shared(lua_State *L, moonlet_t *m);
/* Makes the instance's shared memory arena unless made: 0 or a UV_E* code. */
int mlua_shared_arena(moonlet_t *m);
void mlua_shared_free(moonlet_t *m); /* after the Lua state is closed */
/* A listener of this instance opened: under `moonlet --workers N`, the supervisor hears that this
 * worker serves (the first time; bindings/workers.c). */
void mlua_worker_listening(moonlet_t *m);
/* --pid-file: this process's id written to path, the file removed when the instance ends in this
 * process (bindings/instance.c). 0; 1 when a running moonlet's id is there (*other: its id, the
 * file untouched); or a negative error. mlua_push_pid_file_error pushes what went wrong. */
int mlua_pid_file_set(moonlet_t *m, const char *path, int *other);
void mlua_push_pid_file_error(lua_State *L, int r, int other);
void mlua_open_dns(lua_State *L, moonlet_t *m);
void mlua_open_zlib(lua_State *L, moonlet_t *m);
void mlua_open_fswatch(lua_State *L, moonlet_t *m);
void mlua_open_sqlite(lua_State *L, moonlet_t *m);
void mlua_open_pg(lua_State *L, moonlet_t *m);
void mlua_open_ws(lua_State *L, moonlet_t *m);
void mlua_open_process(lua_State *L, moonlet_t *m);
void mlua_open_http_client(lua_State *L, moonlet_t *m);
void mlua_open_crypto(lua_State *L, moonlet_t *m);
void mlua_open_regex(lua_State *L, moonlet_t *m);
/* http_server.c: hands the connection of the exchange at idx over to another protocol (ws.c):
 * logs the request as 101, calls ml_conn_upgrade(c, headers, hlen, cb, ud) and detaches the
 * exchange (its methods return nil, "closed" from then on; the handler task goes on). Returns the
 * connection, or NULL with *err set (UV_EPIPE: closed, UV_EBUSY: a wait is pending, UV_EINVAL). */
ml_conn_t *mlua_exchange_upgrade(lua_State *L, int idx, const char *headers, size_t hlen,
                                 const ml_conn_raw_cb_t *cb, void *ud, int *err);
void mlua_http_servers_stop(moonlet_t *m);
void mlua_http_servers_close(moonlet_t *m);

#endif
