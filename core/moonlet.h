/* core/moonlet.h: the public API of libmoonlet, the one header a host includes (docs/embedding.md
 * explains it line by line).
 *
 * An instance (moonlet_t) owns a LuaJIT state, its tasks, its listeners and, unless the host lends
 * one, its libuv loop. There is no global state: several instances may live in one process, on one
 * thread (sharing the host's loop, or each on its own) or on several threads (one instance per
 * thread). Every call is made on the thread that runs the instance's loop, except moonlet_post,
 * which any thread may call; a call from another thread is not detected (undefined behaviour).
 * A NULL instance is accepted by moonlet_free only.
 *
 *   moonlet_config_t cfg;
 *   moonlet_config_default(&cfg);                   // then set what differs
 *   moonlet_t *m = moonlet_new(&cfg);               // NULL when out of memory
 *   moonlet_load_file(m, "app.lua");                // or moonlet_load_string(m, "app", code)
 *   int port = moonlet_listen(m, "127.0.0.1", 0);   // the bound port, or a negative UV_E* code
 *   moonlet_run(m);                                 // or moonlet_step(m, ms) from the host's loop
 *   moonlet_free(m);
 *
 * Errors are negative libuv codes (UV_ENOENT, UV_EINVAL, ...; uv_strerror names them); functions
 * that log do so through cfg.log_sink.
 */
#ifndef MOONLET_H
#define MOONLET_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define MOONLET_VERSION "0.1.0"

typedef struct moonlet_s moonlet_t; /* an instance; opaque */
struct lua_State;                   /* LuaJIT's state (lua.h), for the functions that take one */

/* Log levels of cfg.log_level and of the log sink. */
enum { MOONLET_LOG_ERROR = 0, MOONLET_LOG_WARN = 1, MOONLET_LOG_INFO = 2, MOONLET_LOG_DEBUG = 3 };

/* A Lua allocator (lua_Alloc): nsize 0 frees ptr and returns NULL; otherwise it returns a block of
 * nsize bytes holding the first min(osize, nsize) bytes of ptr, or NULL when it cannot: a memory
 * error is raised in Lua then, which fails the request, task, load or call that ran into it (and
 * moonlet_new returns NULL); the C side of moonlet protects its own set-up, but a few of its
 * allocations remain unprotected (making a task), where it is LuaJIT's panic: keep a margin.
 */
typedef void *(*moonlet_alloc_fn)(void *ud, void *ptr, size_t osize, size_t nsize);
/* Receives each log line (timestamp and level included, no newline) on the loop thread. */
typedef void (*moonlet_log_fn)(void *ud, int level, const char *line);
/* Runs on the loop thread with the data given to moonlet_post. */
typedef void (*moonlet_post_fn)(moonlet_t *m, void *data);
/* Opens a host module: pushes the module's value (usually a table) and returns 1 (lua_CFunction).
 */
typedef int (*moonlet_open_fn)(struct lua_State *L);

/* Limits of the HTTP servers the instance starts: defaults for every server (moonlet_listen, and
 * app:listen from Lua, where a field of the opts table wins). 0 keeps moonlet's default. */
typedef struct moonlet_limits_s {
  uint64_t max_body;           /* request body bytes, else 413 (default 1 MiB) */
  size_t max_uri;              /* request-target bytes, else 414 (8 KiB) */
  size_t max_header_bytes;     /* request line + header bytes, else 431 (32 KiB) */
  unsigned max_headers;        /* header lines, else 431 (100) */
  unsigned max_conns;          /* open connections; more are refused at accept (10240) */
  unsigned keepalive_requests; /* requests on one connection before Connection: close (no limit) */
  unsigned header_timeout_ms;  /* to receive the whole header section, else 408 (60 s) */
  unsigned body_timeout_ms;    /* between two body reads, else 408 (60 s) */
  unsigned keepalive_timeout_ms; /* an idle keep-alive connection is closed after it (75 s) */
  unsigned send_timeout_ms;      /* a client that reads nothing for this long is closed (60 s) */
  unsigned shutdown_grace_ms;    /* moonlet_stop waits this long for requests in flight (10 s) */
} moonlet_limits_t;

typedef struct moonlet_config_s {
  uv_loop_t *loop;         /* the host's loop, or NULL: the instance creates and owns one */
  const char *lua_path;    /* extra package.path entries ("dir/?.lua;..."), or NULL */
  const char *lua_dir;     /* where the framework's lua/ lives; NULL: env MOONLET_LUA_DIR, else the
                              build's lua/ directory (MOONLET_LUA_DIR at compile time) */
  int log_level;           /* MOONLET_LOG_*: lines above it are dropped; default INFO */
  moonlet_log_fn log_sink; /* NULL: lines go to stderr */
  void *log_ud;            /* passed to log_sink */
  int handle_signals;      /* 1: SIGINT/SIGTERM shut the servers down gracefully, SIGHUP reloads
                              the app (moonlet_reload), SIGUSR1 reopens the log files, SIGPIPE is
                              ignored; the host's handlers of these are replaced, and after
                              moonlet_free the four are SIG_DFL (libuv's doing), SIGPIPE stays
                              ignored. 0: moonlet installs no signal handler at all; the host
                              must then ignore SIGPIPE itself: libuv writes to sockets (write(2)). */
  moonlet_alloc_fn alloc;  /* NULL: malloc with a cache of small blocks in front (env
                              MOONLET_LUAJIT_ALLOC=1: LuaJIT's own); else every Lua object is
                              allocated with it (lua_newstate). moonlet_new returns NULL when the
                              LuaJIT in use refuses custom allocators (x64 without GC64: see the
                              docs). */
  void *alloc_ud;          /* passed to alloc */
  moonlet_limits_t limits; /* server limits; all 0: moonlet's defaults */
  void *userdata;          /* the host's pointer, returned by moonlet_userdata */
  size_t shared_memory;    /* address space of the memory moonlet.shared's dictionaries live in,
                              mapped on first use (a dictionary takes 4 times its size; pages count
                              only once entries touch them); 0: 1 GiB (64 MiB on 32-bit) */
} moonlet_config_t;

/* -- Life cycle -------------------------------------------------------------------------------- */

/* Fills cfg with the defaults: everything 0 or NULL but log_level (INFO). */
void moonlet_config_default(moonlet_config_t *cfg);
/* Creates an instance (cfg NULL: the defaults; cfg is copied, its strings are used during the call
 * only). Returns NULL when out of memory (cfg.alloc's too: the Lua state is set up under a
 * protected call), when the loop cannot be made, or when cfg.alloc is set and LuaJIT refuses it;
 * nothing is left behind then (no handle on a lent loop). The environment it reads:
 * MOONLET_LUA_DIR (when cfg.lua_dir is NULL) and MOONLET_LUAJIT_ALLOC (when cfg.alloc is NULL);
 * package.path includes ./?.lua (the process's working directory). PORT and the other variables
 * of the command line are read by moonlet_main only. */
moonlet_t *moonlet_new(const moonlet_config_t *cfg);
/* Runs the command line of the `moonlet` program (script, app, `test`, flags) inside the instance:
 * the work starts now and goes on in moonlet_run. Returns 0, or non-zero after printing an error.
 */
int moonlet_main(moonlet_t *m, int argc, char **argv);
/* Begins a graceful shutdown: servers stop accepting and finish in-flight requests (at most
 * limits.shutdown_grace_ms); then uv_stop ends the loop's uv_run (the host's, on a lent loop).
 * Final: moonlet_listen and moonlet_listen_unix return UV_ESHUTDOWN from now on. A second call
 * is a no-op. moonlet_free need not follow a stop: it closes everything itself. */
void moonlet_stop(moonlet_t *m);
/* Runs the posted functions still queued, closes every handle the instance opened (servers,
 * connections, timers, watchers), runs the loop until their close callbacks have run, closes the
 * Lua state and frees the instance. On an owned loop, the loop is closed too (uv_loop_close; a
 * handle left over is logged as an error). On a lent loop, only the instance's handles are closed
 * and the loop is the host's to close. Threads that call moonlet_post must have stopped. Call it
 * once (a second call is a use after free), outside uv_run and outside any moonlet callback (a
 * post, a host module's function). NULL: a no-op. */
void moonlet_free(moonlet_t *m);

/* -- Who runs the loop ------------------------------------------------------------------------- */

/* Mode 1, moonlet's own loop: runs it until no server, task or timer is left (or moonlet_stop).
 * Returns the exit code: 0, or 1 when the main script (moonlet_main) failed. */
int moonlet_run(moonlet_t *m);
/* Mode 2, the host's libuv loop: set cfg.loop and run that loop as usual (uv_run); nothing else.
 * moonlet_loop returns the loop the instance runs on (its own or the host's). */
uv_loop_t *moonlet_loop(moonlet_t *m);
/* Mode 3, a host with its own main loop (a game's frame loop): waits at most timeout_ms (and no
 * longer than the instance's next timer) for something to happen, then runs one loop iteration,
 * which handles whatever is ready: I/O, due timers, posts. 0: no wait. It returns early when
 * something happened, so a frame calls it until its leftover time is spent. Returns non-zero while
 * the loop has active handles or requests (a server, a timer, a task waiting). With nothing to do
 * it returns at once for 0, and waits the whole timeout_ms otherwise (the frame's time to spend).
 * Lua code runs on the host's thread inside the step: a handler that runs 300 ms without yielding
 * makes a 300 ms step (moonlet.warn_blocking(seconds) logs such tasks). */
int moonlet_step(moonlet_t *m, int timeout_ms);
/* Mode 4, a host that polls (poll, epoll, select): the file descriptor that becomes readable when
 * the instance has work (an epoll fd on Linux; add it with POLLIN / EPOLLIN), and the longest time
 * in ms the host may wait before calling moonlet_step(m, 0) even when the fd stays quiet: -1 for no
 * limit (no timer, or nothing active: only the fd, a post, can wake it), 0 for "step now". Ask for
 * the timeout again after every step: handles started during a step are only added to the fd's
 * set by the next step, so the timeout is 0 until then (libuv issue #1565). */
int moonlet_backend_fd(moonlet_t *m);
int moonlet_backend_timeout(moonlet_t *m);

/* -- Scripts and apps -------------------------------------------------------------------------- */

/* Runs the script at path in a task of the instance (its top level may wait). A script that
 * returns an app (moonlet.app()) makes it the instance's app: the one moonlet_listen serves and
 * moonlet_reload reloads; when the instance already serves an app, the new one replaces it between
 * requests, as a reload does. Returns 0 (an app was installed), 1 (the script returned no app),
 * 2 (the top level is still waiting; an app it returns is installed when it ends), UV_ENOENT (no
 * such file), UV_EINVAL (a syntax error or an error at the top level, logged with file and line; a
 * previous app goes on serving), UV_ECANCELED (moonlet's own Lua modules failed to load, e.g.
 * out of memory: logged; a later load tries them again), UV_ENOMEM (memory ran out before the
 * script could start: nothing changed). */
int moonlet_load_file(moonlet_t *m, const char *path);
/* The same for Lua source code in a string (firmware without a file system); name appears in error
 * messages and tracebacks ("name:line: ..."). */
int moonlet_load_string(moonlet_t *m, const char *name, const char *code);
/* Serves the instance's app on host:port (host NULL: 127.0.0.1; port 0: a free port), or on a Unix
 * domain socket when host is "unix:/path" (port ignored; returns 0). May be called several times,
 * for several addresses. Returns the bound port (> 0), UV_EINVAL when no app is loaded or host is
 * not an address, UV_ESHUTDOWN after moonlet_stop, or the listen error (UV_EADDRINUSE, UV_EACCES,
 * ...; nothing is left open then). */
int moonlet_listen(moonlet_t *m, const char *host, int port);
/* Serves the instance's app on the Unix domain socket at path, whose permissions are mode (0660:
 * the owner and its group may connect, a proxy's user among them; -1: what the umask leaves, as
 * moonlet_listen(m, "unix:/path", 0) does). The mode is set before the socket listens: no client
 * connects before it. A stale socket file there (nobody listens) is replaced; a live server's is
 * not (UV_EADDRINUSE), nor a file that is not a socket (UV_EEXIST). The file goes when the server
 * closes. Returns 0, UV_EINVAL (no app loaded, no path, mode neither -1 nor within 0..07777),
 * UV_ENAMETOOLONG, UV_ESHUTDOWN (after moonlet_stop), or the listen error (UV_EADDRINUSE,
 * UV_EACCES, ...). */
int moonlet_listen_unix(moonlet_t *m, const char *path, int mode);
/* Reloads the app from its file (moonlet_load_file, or the script of moonlet_main): the new code
 * is loaded into a fresh app; only if it loads and its top level runs does it replace the old one
 * between requests (requests in flight finish on the old code). Returns 0 (replaced), 2 (its top
 * level waits; it replaces the old app when it ends), UV_EINVAL (the new code failed: logged with
 * file and line, the old code goes on serving), UV_ENOENT (no app loaded from a file). */
int moonlet_reload(moonlet_t *m);

/* -- Host functions, calls into Lua ------------------------------------------------------------ */

/* Makes the host module `name` available to Lua: require(name) calls open (package.preload) the
 * first time and returns what it pushed. Register before loading the scripts that require it.
 * Inside open and the functions it registers, moonlet_from_lua(L) gives the instance and
 * moonlet_userdata(m) the host's pointer. Returns 0, or UV_EINVAL for a NULL name or open. */
int moonlet_register(moonlet_t *m, const char *name, moonlet_open_fn open);
/* The instance a Lua state (or one of its coroutines) belongs to. */
moonlet_t *moonlet_from_lua(struct lua_State *L);
/* cfg.userdata of the instance. */
void *moonlet_userdata(moonlet_t *m);
/* Calls a Lua function in a new task (so it may wait) and returns when it ends or first waits.
 * name: "fn" (a global), "tbl.fn" (a field of a global table) or "mod.fn" / "mod.sub.fn" (a field
 * of the module require("mod") or require("mod.sub") returns: the longest name that loads wins).
 * fmt: one letter per argument, then optionally '>' and one letter per result:
 *   arguments  i int, d double, b int (as a boolean), s const char * (NULL: nil), n nothing (nil)
 *   results    i int *, d double *, b int *, s char ** (a malloc'ed copy the caller frees; NULL for
 *              a nil or non-string result)
 * Results are stored only when the function returned without waiting. Returns 0 (it returned),
 * 1 (it waits; it goes on in the loop and its results are dropped), UV_ENOENT (name is not a
 * function), UV_EINVAL (bad fmt), UV_ECANCELED (it raised an error: logged with its traceback),
 * UV_ENOMEM (cfg.alloc refused memory before the function could start: the task, the name or an
 * argument; nothing ran). */
int moonlet_call(moonlet_t *m, const char *name, const char *fmt, ...);
/* The instance's main Lua state, for what moonlet_call cannot do. The rules: use it on the loop
 * thread, between loop callbacks or inside a function Lua called; leave its stack as you found it;
 * call Lua with lua_pcall (code called so cannot wait: moonlet.sleep and I/O raise "outside a
 * moonlet task"; use moonlet_call for that); never lua_close it. */
struct lua_State *moonlet_lua_state(moonlet_t *m);

/* -- Other threads ----------------------------------------------------------------------------- */

/* Queues fn(m, data) to run on the loop thread, in the order posted, and wakes the loop. Any thread
 * may call it, as often as it likes: posts made before the loop thread wakes run in one batch. fn
 * may call any moonlet_* function but moonlet_free (it runs on the loop thread); data stays the
 * host's. A post does
 * not keep moonlet_run going (moonlet_step runs posts even when nothing else is active), and the
 * functions still queued at moonlet_free run there, first. Returns 0, or UV_ENOMEM. */
int moonlet_post(moonlet_t *m, moonlet_post_fn fn, void *data);

#endif
