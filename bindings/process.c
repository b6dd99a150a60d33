/* bindings/process.c: child processes (uv_spawn) with pipes on their stdin, stdout and stderr:
 * core.process_spawn(...) and the methods of the process object (core.process_raw): wait(timeout),
 * kill(sig), receive(fd, n | "*l" | "*a"), receive_any(fd, max), write(data), close_stdin(),
 * settimeout(fd, secs), pid(), close(). Each call that waits yields its task;
 * lua/moonlet/process.lua wraps these (task.check of every wait) as moonlet.process.
 *
 * Ownership:
 * - A process (proc_t) is C memory linked in the instance's resources; the Lua userdata holds a
 *   pointer NULLed when the object is closed (close(), __gc), after which every method returns
 *   nil, "closed". The struct owns nine handles (the process, two timers, and a pipe and a timer
 *   per stdio stream), all initialised at spawn, each closed exactly once; the struct is freed by
 *   the close callback of the last one.
 * - The process handle is closed only after its exit callback ran (libuv reaped the child then):
 *   closing a process that still runs sends SIGKILL and waits for the exit callback. When the
 *   instance is freed, a child still running is killed and reaped with a blocking waitpid, so no
 *   zombie is left behind. The resource stays linked until the process handle is closed.
 * - One waiter per stream (a reader on stdout or stderr, a writer on stdin) and one waiter of the
 *   exit; a second one gets nil, "busy". A read or write waits with the stream's timer (none by
 *   default), wait(timeout) with the process's wait timer; whichever of I/O, timer, close or cancel
 *   comes first takes the waiter. A cancelled or timed-out read just stops reading; a cancelled or
 *   timed-out write cannot be taken back, so stdin is closed.
 * - Pinned in the registry: the data of a write in flight (wref of the stdin stream), including
 *   the `stdin = "string"` of spawn, which closes stdin once written.
 * - Process timeout (spawn's timeout option): the kill timer sends SIGKILL; the exit callback
 * reaps.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "mlua.h"
#include "readbuf.h"

#define PROC_MT "moonlet.process"
#define MAX_RECEIVE 1e12 /* a byte count beyond this (or NaN) is a mistake: raised, as by tcp.c */

enum { W_NONE = 0, W_READ, W_WRITE };

struct proc_s;

typedef struct {
  uv_pipe_t pipe;
  uv_timer_t timer; /* the timeout of the read or write that waits */
  struct proc_s *p;
  int used;          /* a pipe to the child (not inherited or ignored) */
  int open;          /* the pipe handle is not closed yet */
  mlua_task_t *task; /* the parked reader or writer */
  int wait;          /* W_* */
  int rmode;         /* R_* of the read that waits */
  size_t rwant;
  mlua_readbuf_t rb; /* received, not yet returned */
  int eof, err, reading;
  int64_t ms;      /* read/write timeout, < 0: none */
  uv_write_t wreq; /* the write in flight */
  int wref;        /* registry ref of its data */
  int writing;     /* a write is in flight */
  int close_after; /* close stdin once the write in flight is done */
} stream_t;

typedef struct proc_s {
  mlua_res_t res;
  uv_process_t proc;
  uv_timer_t wtimer; /* wait(timeout) */
  uv_timer_t ktimer; /* spawn's timeout: SIGKILL */
  stream_t io[3];
  moonlet_t *m;
  struct proc_s **box; /* the Lua box, NULLed at close */
  mlua_task_t *wtask;  /* the task waiting for the exit */
  int handles;         /* open or closing handles */
  int exited, closed, linked, proc_closing;
  int64_t exit_status;
  int term_signal;
  int timed_out; /* killed by spawn's timeout */
  int pid;
} proc_t;

static int push_err(lua_State *L, int e) {
  lua_pushnil(L);
  lua_pushstring(L, mlua_err_string(e));
  return 2;
}

static int push_str(lua_State *L, const char *s) {
  lua_pushnil(L);
  lua_pushstring(L, s);
  return 2;
}

/* push_err on another task, a waiter a callback (or a close) wakes: through mlua_push_fail,
 * protected under a host's allocator. Returns 2. */
static int fail(proc_t *p, mlua_task_t *t, int e) {
  return mlua_push_fail(p->m, t->co, mlua_err_string(e), NULL);
}

/* -- Life cycle ------------------------------------------------------------------------------- */

static void handle_closed(uv_handle_t *h) {
  proc_t *p = h->data;
  if (--p->handles == 0) {
    for (int i = 0; i < 3; i++)
      free(p->io[i].rb.buf);
    free(p);
  }
}

static void stream_handle_closed(uv_handle_t *h) {
  stream_t *s = h->data;
  h->data = s->p;
  handle_closed(h);
}

static mlua_task_t *take_stream(stream_t *s) {
  mlua_task_t *t = s->task;
  s->task = NULL;
  s->wait = W_NONE;
  mlua_task_unwait(t); /* Lua may run before its resume: proc_close wakes up to four in turn */
  uv_timer_stop(&s->timer);
  if (s->reading) {
    uv_read_stop((uv_stream_t *)&s->pipe);
    s->reading = 0;
  }
  return t;
}

/* Closes a stream's pipe once (its timer goes with the process); returns its waiter, if any. */
static mlua_task_t *stream_close(stream_t *s) {
  mlua_task_t *t = take_stream(s);
  if (s->open) {
    s->open = 0;
    uv_close((uv_handle_t *)&s->pipe, stream_handle_closed);
  }
  return t;
}

static mlua_task_t *take_waiter(proc_t *p) {
  mlua_task_t *t = p->wtask;
  p->wtask = NULL;
  mlua_task_unwait(t);
  uv_timer_stop(&p->wtimer);
  return t;
}

/* Closes the process handle (only once the child was reaped) and unlinks the resource. */
static void proc_handle_close(proc_t *p) {
  if (p->proc_closing) return;
  p->proc_closing = 1;
  if (p->linked) mlua_res_unlink(p->m, &p->res);
  p->linked = 0;
  uv_close((uv_handle_t *)&p->proc, handle_closed);
}

/* Closes the object once: the box forgets it, the pipes and timers close, a child still running is
 * sent SIGKILL (the exit callback reaps it and closes the process handle), and the waiters wake
 * with nil, "closed", one after the other. */
static void proc_close(proc_t *p) {
  if (p->closed) return;
  p->closed = 1;
  if (p->box) *p->box = NULL;
  p->box = NULL;
  if (!p->exited) uv_process_kill(&p->proc, SIGKILL);
  mlua_task_t *ts[4];
  for (int i = 0; i < 3; i++)
    ts[i] = stream_close(&p->io[i]);
  ts[3] = take_waiter(p);
  for (int i = 0; i < 3; i++)
    uv_close((uv_handle_t *)&p->io[i].timer, stream_handle_closed);
  uv_close((uv_handle_t *)&p->wtimer, handle_closed);
  uv_close((uv_handle_t *)&p->ktimer, handle_closed);
  if (p->exited) proc_handle_close(p);
  for (int i = 0; i < 4; i++)
    if (ts[i]) mlua_task_resume(ts[i], fail(p, ts[i], UV_EPIPE));
}

/* moonlet_free: nobody is resumed; a child still running is killed and reaped here. */
static void proc_res_close(mlua_res_t *r) {
  proc_t *p = (proc_t *)((char *)r - offsetof(proc_t, res));
  p->linked = 0; /* moonlet_free unlinked it */
  for (int i = 0; i < 3; i++) {
    p->io[i].task = NULL;
    p->io[i].wait = W_NONE;
  }
  p->wtask = NULL;
  if (!p->exited && p->pid > 0) {
    kill(p->pid, SIGKILL);
    while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR) {
    }
    p->exited = 1;
  }
  proc_close(p);
  proc_handle_close(p);
}

static void proc_cancel(mlua_task_t *t, void *wait) {
  proc_t *p = wait;
  if (t == p->wtask) {
    take_waiter(p);
    return;
  }
  for (int i = 0; i < 3; i++) {
    stream_t *s = &p->io[i];
    if (t != s->task) continue;
    int w = s->wait;
    take_stream(s);
    if (w == W_WRITE) stream_close(s); /* a write cannot be taken back */
  }
}

static proc_t *check_proc(lua_State *L) {
  proc_t **box = luaL_checkudata(L, 1, PROC_MT);
  return *box;
}

static int64_t to_ms(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  double secs = luaL_checknumber(L, idx);
  return secs <= 0 ? 0 : (int64_t)mlua_ms(secs);
}

static void start_timer(uv_timer_t *timer, uv_timer_cb cb, int64_t ms) {
  if (ms < 0) return;
  uv_update_time(timer->loop);
  uv_timer_start(timer, cb, mlua_wait_ms((uint64_t)ms), 0);
}

/* -- Exit and wait ---------------------------------------------------------------------------- */

static int push_status(lua_State *L, proc_t *p) {
  lua_pushinteger(L, p->term_signal ? 128 + p->term_signal : (lua_Integer)p->exit_status);
  lua_pushinteger(L, p->term_signal);
  return 2;
}

static void on_child_exit(uv_process_t *h, int64_t status, int term_signal) {
  proc_t *p = h->data;
  p->exited = 1;
  p->exit_status = status;
  p->term_signal = term_signal;
  uv_timer_stop(&p->ktimer);
  if (p->closed) {
    proc_handle_close(p);
    return;
  }
  mlua_task_t *t = take_waiter(p);
  if (t) mlua_task_resume(t, push_status(t->co, p)); /* (numbers: nothing to allocate) */
}

static void on_kill_timeout(uv_timer_t *h) {
  proc_t *p = h->data;
  if (p->exited) return;
  p->timed_out = 1;
  uv_process_kill(&p->proc, SIGKILL);
}

static void on_wait_timeout(uv_timer_t *h) {
  proc_t *p = h->data;
  mlua_task_t *t = take_waiter(p);
  if (t) mlua_task_resume(t, fail(p, t, UV_ETIMEDOUT));
}

/* syntax: code, signal = p:wait(timeout) -- code is 128 + signal for a child a signal ended;
 * nil, "timeout" when it still runs after timeout seconds (nil: no limit) */
static int p_wait(lua_State *L) {
  proc_t *p = check_proc(L);
  int64_t ms = to_ms(L, 2);
  if (!p) return push_err(L, UV_EPIPE);
  if (p->exited) return push_status(L, p);
  if (p->wtask) return push_str(L, "busy");
  if (ms == 0) return push_err(L, UV_ETIMEDOUT);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  p->wtask = t;
  start_timer(&p->wtimer, on_wait_timeout, ms);
  return mlua_task_wait(L, t, proc_cancel, p);
}

static int signal_number(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return SIGTERM;
  if (lua_type(L, idx) == LUA_TNUMBER) return (int)lua_tointeger(L, idx);
  const char *name = luaL_checkstring(L, idx);
  if (strncmp(name, "SIG", 3) == 0) name += 3;
  static const struct {
    const char *name;
    int sig;
  } sigs[] = {{"TERM", SIGTERM}, {"KILL", SIGKILL}, {"INT", SIGINT},   {"HUP", SIGHUP},
              {"QUIT", SIGQUIT}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"STOP", SIGSTOP},
              {"CONT", SIGCONT}, {"ALRM", SIGALRM}, {"PIPE", SIGPIPE}};
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
    if (strcmp(name, sigs[i].name) == 0) return sigs[i].sig;
  return luaL_argerror(L, idx, "unknown signal");
}

/* syntax: ok, err = p:kill(sig) -- sig: a number or a name ("TERM" (default), "KILL", "INT", ...);
 * nil, "exited" when the child has ended already */
static int p_kill(lua_State *L) {
  proc_t *p = check_proc(L);
  int sig = signal_number(L, 2);
  if (!p) return push_err(L, UV_EPIPE);
  if (p->exited) return push_str(L, "exited");
  int r = uv_process_kill(&p->proc, sig);
  if (r < 0) return push_err(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* syntax: pid = p:pid() */
static int p_pid(lua_State *L) {
  proc_t *p = check_proc(L);
  if (!p) return push_err(L, UV_EPIPE);
  lua_pushinteger(L, p->pid);
  return 1;
}

/* syntax: running, timed_out = p:status() -- whether the child still runs, and whether spawn's
 * timeout killed it */
static int p_status(lua_State *L) {
  proc_t *p = check_proc(L);
  if (!p) return push_err(L, UV_EPIPE);
  lua_pushboolean(L, !p->exited);
  lua_pushboolean(L, p->timed_out);
  return 2;
}

/* syntax: ok = p:close() -- kills a child still running (SIGKILL; it is reaped), closes the pipes;
 * waiters wake with nil, "closed" */
static int p_close(lua_State *L) {
  proc_t *p = check_proc(L);
  if (!p) return push_err(L, UV_EPIPE);
  proc_close(p);
  lua_pushboolean(L, 1);
  return 1;
}

static int p_gc(lua_State *L) {
  proc_t **box = luaL_checkudata(L, 1, PROC_MT);
  if (*box) proc_close(*box);
  return 0;
}

static int p_tostring(lua_State *L) {
  proc_t *p = check_proc(L);
  if (!p)
    lua_pushliteral(L, "moonlet.process (closed)");
  else
    lua_pushfstring(L, "moonlet.process (pid %d, %s)", p->pid, p->exited ? "exited" : "running");
  return 1;
}

/* -- Reads ------------------------------------------------------------------------------------ */

/* Pushes the result of the pending read if it can be answered now; returns the count or 0. */
static int try_answer(lua_State *L, stream_t *s) {
  char *data = s->rb.buf + s->rb.off;
  if (mlua_readbuf_answer(L, &s->rb, s->rmode, s->rwant, s->eof)) return 1;
  if (s->eof || s->err) {
    push_err(L, s->eof ? UV_EOF : s->err);
    lua_pushlstring(L, data, s->rb.len); /* the partial data */
    mlua_readbuf_consume(&s->rb, s->rb.len);
    return 3;
  }
  return 0;
}

/* try_answer for mlua_push_protected: on_read pushes from a callback, where a string too large
 * for memory must become nil, "not enough memory" (the data stays buffered), not a panic. */
static int push_answer(lua_State *L, void *ud) { return try_answer(L, ud); }

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  stream_t *s = h->data;
  (void)suggested;
  if (mlua_readbuf_reserve(&s->rb, 65536) < 0) {
    *buf = uv_buf_init(NULL, 0); /* on_read gets UV_ENOBUFS */
    return;
  }
  *buf =
      uv_buf_init(s->rb.buf + s->rb.off + s->rb.len, (unsigned)(s->rb.cap - s->rb.off - s->rb.len));
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  stream_t *s = st->data;
  (void)buf;
  if (n == 0) return;
  if (n > 0)
    s->rb.len += (size_t)n;
  else if (n == UV_EOF)
    s->eof = 1;
  else
    s->err = (int)n;
  if (s->wait != W_READ) {
    if (s->reading) uv_read_stop(st);
    s->reading = 0;
    return;
  }
  int nres = mlua_push_protected(s->p->m, s->task->co, push_answer, s);
  if (nres == 0) return;
  mlua_task_t *t = take_stream(s);
  mlua_task_resume(t, nres);
}

static void on_stream_timeout(uv_timer_t *h) {
  stream_t *s = h->data;
  int w = s->wait;
  mlua_task_t *t = take_stream(s);
  if (!t) return;
  if (w == W_WRITE) stream_close(s);
  mlua_task_resume(t, fail(s->p, t, UV_ETIMEDOUT));
}

static stream_t *check_fd(lua_State *L, proc_t *p, int idx) {
  int fd = (int)luaL_checkinteger(L, idx);
  if (fd < 0 || fd > 2) luaL_argerror(L, idx, "expected 0, 1 or 2");
  return p ? &p->io[fd] : NULL;
}

static int start_read(lua_State *L, proc_t *p, stream_t *s) {
  int n = try_answer(L, s);
  if (n) return n;
  if (!s->open) return push_err(L, UV_EPIPE);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  if (!s->reading) {
    int r = uv_read_start((uv_stream_t *)&s->pipe, alloc_cb, on_read);
    if (r < 0) return push_err(L, r);
    s->reading = 1;
  }
  s->task = t;
  s->wait = W_READ;
  start_timer(&s->timer, on_stream_timeout, s->ms);
  return mlua_task_wait(L, t, proc_cancel, p);
}

/* syntax: data, err, partial = core.process_raw.receive(p, fd, n | "*l" | "*a")
 * fd 1 (stdout) or 2 (stderr); the shapes of sock:receive: nil, "closed", partial at the end */
static int p_receive(lua_State *L) {
  proc_t *p = check_proc(L);
  stream_t *s = check_fd(L, p, 2);
  int mode;
  size_t want = 0;
  if (lua_type(L, 3) == LUA_TNUMBER) {
    lua_Number v = lua_tonumber(L, 3);
    if (!(v >= 0) || v > MAX_RECEIVE) return luaL_argerror(L, 3, "size out of range");
    mode = R_BYTES;
    want = (size_t)v;
  } else {
    const char *pat = luaL_optstring(L, 3, "*l");
    if (strcmp(pat, "*l") == 0 || strcmp(pat, "l") == 0)
      mode = R_LINE;
    else if (strcmp(pat, "*a") == 0 || strcmp(pat, "a") == 0)
      mode = R_ALL;
    else
      return luaL_argerror(L, 3, "expected a byte count, \"*l\" or \"*a\"");
  }
  if (!p) return push_err(L, UV_EPIPE);
  if (s == &p->io[0]) return luaL_argerror(L, 2, "stdin is not readable");
  if (!s->used) return push_err(L, UV_EPIPE);
  if (s->wait) return push_str(L, "busy");
  if (mode == R_BYTES && want == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  s->rmode = mode;
  s->rwant = want;
  return start_read(L, p, s);
}

/* syntax: data, err = core.process_raw.receive_any(p, fd, max) -- whatever is there, at most max */
static int p_receive_any(lua_State *L) {
  proc_t *p = check_proc(L);
  stream_t *s = check_fd(L, p, 2);
  lua_Number max = luaL_checknumber(L, 3);
  if (!(max >= 1) || max > MAX_RECEIVE) return luaL_argerror(L, 3, "expected a positive size");
  if (!p) return push_err(L, UV_EPIPE);
  if (s == &p->io[0]) return luaL_argerror(L, 2, "stdin is not readable");
  if (!s->used) return push_err(L, UV_EPIPE);
  if (s->wait) return push_str(L, "busy");
  s->rmode = R_ANY;
  s->rwant = (size_t)max;
  int n = start_read(L, p, s);
  if (n == 3) lua_pop(L, 1); /* no partial for receive_any */
  return n == 3 ? 2 : n;
}

/* syntax: core.process_raw.settimeout(p, fd, seconds) -- that stream's reads or writes; nil: none
 */
static int p_settimeout(lua_State *L) {
  proc_t *p = check_proc(L);
  stream_t *s = check_fd(L, p, 2);
  int64_t ms = to_ms(L, 3);
  if (s) s->ms = ms;
  return 0;
}

/* -- Writes ----------------------------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
  stream_t *s = req->data;
  proc_t *p = s->p;
  luaL_unref(p->m->L, LUA_REGISTRYINDEX, s->wref);
  s->wref = LUA_NOREF;
  s->writing = 0;
  if (s->close_after) {
    s->close_after = 0;
    stream_close(s); /* the stdin string of spawn: nobody waits for it */
    return;
  }
  if (s->wait != W_WRITE) return;
  mlua_task_t *t = take_stream(s);
  if (status < 0) {
    mlua_task_resume(t, fail(p, t, status));
    return;
  }
  lua_pushboolean(t->co, 1);
  mlua_task_resume(t, 1);
}

/* Starts writing the string at idx to stdin (pinned until the write callback). Returns 1 when a
 * write request is queued, 0 when all of it went out at once, or a negative error. */
static int write_start(lua_State *L, stream_t *s, int idx) {
  size_t len;
  const char *data = lua_tolstring(L, idx, &len);
  if (len == 0) return 0;
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  int w = uv_try_write((uv_stream_t *)&s->pipe, &b, 1);
  if (w == (int)len) return 0;
  if (w < 0 && w != UV_EAGAIN) return w;
  if (w > 0) b = uv_buf_init((char *)data + w, (unsigned)(len - (size_t)w));
  int r = uv_write(&s->wreq, (uv_stream_t *)&s->pipe, &b, 1, on_write);
  if (r < 0) return r;
  lua_pushvalue(L, idx);
  s->wref = luaL_ref(L, LUA_REGISTRYINDEX);
  s->writing = 1;
  return 1;
}

/* syntax: ok, err = p:write(data) -- true once the pipe took every byte */
static int p_write(lua_State *L) {
  proc_t *p = check_proc(L);
  luaL_checkstring(L, 2);
  if (!p) return push_err(L, UV_EPIPE);
  stream_t *s = &p->io[0];
  if (!s->open) return push_err(L, UV_EPIPE);
  if (s->wait || s->writing) return push_str(L, "busy");
  mlua_task_t *t = mlua_task_current(L);
  int r = write_start(L, s, 2);
  if (r < 0) return push_err(L, r);
  if (r == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  mlua_check_yieldable(L, t); /* the write stays queued; its callback unpins it */
  s->task = t;
  s->wait = W_WRITE;
  start_timer(&s->timer, on_stream_timeout, s->ms);
  return mlua_task_wait(L, t, proc_cancel, p);
}

/* syntax: ok = p:close_stdin() -- the child reads end-of-file */
static int p_close_stdin(lua_State *L) {
  proc_t *p = check_proc(L);
  if (!p) return push_err(L, UV_EPIPE);
  mlua_task_t *t = stream_close(&p->io[0]);
  if (t) mlua_task_resume(t, fail(p, t, UV_EPIPE));
  lua_pushboolean(L, 1);
  return 1;
}

/* -- Spawn ------------------------------------------------------------------------------------ */

/* The stdio mode string at idx: 0 pipe (default), 1 inherit, 2 ignore. */
static int stdio_mode(lua_State *L, int idx) {
  const char *s = luaL_optstring(L, idx, "pipe");
  if (strcmp(s, "pipe") == 0) return 0;
  if (strcmp(s, "inherit") == 0) return 1;
  if (strcmp(s, "ignore") == 0) return 2;
  return luaL_argerror(L, idx, "expected \"pipe\", \"inherit\" or \"ignore\"");
}

/* An array of strings at idx as a NULL-terminated char *[] (malloc'd; the strings stay on the Lua
 * stack's table). */
static char **string_array(lua_State *L, int idx) {
  int n = (int)lua_objlen(L, idx);
  char **v = calloc((size_t)n + 1, sizeof *v);
  if (!v) return NULL;
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, i);
    v[i - 1] = (char *)lua_tostring(L, -1); /* the table keeps the string alive */
    lua_pop(L, 1);
  }
  return v;
}

/* syntax: p, pid | nil, err = core.process_spawn(argv, env, cwd, stdin_string, timeout,
 *                                                stdin_mode, stdout_mode, stderr_mode)
 * argv: array of strings (argv[1] is the file, looked up in PATH); env: nil (the parent's) or an
 * array of "K=v" strings; stdin_string: written to stdin, which is then closed; timeout: seconds
 * after which the child is sent SIGKILL. err: "not found", "permission denied", ... */
static int l_spawn(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  const char *cwd = luaL_optstring(L, 3, NULL);
  if (!lua_isnoneornil(L, 4)) luaL_checkstring(L, 4);
  int64_t kill_ms = to_ms(L, 5);
  int modes[3] = {stdio_mode(L, 6), stdio_mode(L, 7), stdio_mode(L, 8)};
  if (lua_objlen(L, 1) < 1) return luaL_argerror(L, 1, "expected the command");
  if (!lua_isnoneornil(L, 4)) modes[0] = 0;
  char **args = string_array(L, 1);
  char **env = lua_isnil(L, 2) ? NULL : string_array(L, 2);
  proc_t *p = calloc(1, sizeof *p);
  if (!args || (!env && !lua_isnil(L, 2)) || !p) {
    free(args);
    free(env);
    free(p);
    return luaL_error(L, "moonlet: out of memory");
  }
  p->m = m;
  uv_stdio_container_t stdio[3];
  for (int i = 0; i < 3; i++) {
    stream_t *s = &p->io[i];
    s->p = p;
    s->wref = LUA_NOREF;
    s->ms = -1;
    uv_pipe_init(m->loop, &s->pipe, 0);
    uv_timer_init(m->loop, &s->timer);
    s->pipe.data = s->timer.data = s->wreq.data = s;
    s->open = 1;
    s->used = modes[i] == 0;
    if (modes[i] == 0) {
      stdio[i].flags = UV_CREATE_PIPE | (i == 0 ? UV_READABLE_PIPE : UV_WRITABLE_PIPE);
      stdio[i].data.stream = (uv_stream_t *)&s->pipe;
    } else if (modes[i] == 1) {
      stdio[i].flags = UV_INHERIT_FD;
      stdio[i].data.fd = i;
    } else {
      stdio[i].flags = UV_IGNORE;
    }
  }
  uv_timer_init(m->loop, &p->wtimer);
  uv_timer_init(m->loop, &p->ktimer);
  p->wtimer.data = p->ktimer.data = p->proc.data = p;
  p->handles = 9;
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.exit_cb = on_child_exit;
  o.file = args[0];
  o.args = args;
  o.env = env;
  o.cwd = cwd;
  o.stdio_count = 3;
  o.stdio = stdio;
  int r = uv_spawn(m->loop, &p->proc, &o);
  free(args);
  free(env);
  if (r < 0) { /* the handle is initialised all the same: close everything */
    p->exited = 1;
    p->closed = 1;
    for (int i = 0; i < 3; i++) {
      stream_close(&p->io[i]);
      uv_close((uv_handle_t *)&p->io[i].timer, stream_handle_closed);
    }
    uv_close((uv_handle_t *)&p->wtimer, handle_closed);
    uv_close((uv_handle_t *)&p->ktimer, handle_closed);
    proc_handle_close(p);
    return push_err(L, r);
  }
  p->pid = p->proc.pid;
  mlua_res_link(m, &p->res, proc_res_close);
  p->linked = 1;
  for (int i = 0; i < 3; i++)
    if (!p->io[i].used) stream_close(&p->io[i]);
  if (!lua_isnoneornil(L, 4)) {
    r = write_start(L, &p->io[0], 4);
    if (r == 1)
      p->io[0].close_after = 1;
    else
      stream_close(&p->io[0]); /* written at once, or failed (the child reads EOF) */
  }
  start_timer(&p->ktimer, on_kill_timeout, kill_ms);
  proc_t **box = lua_newuserdata(L, sizeof *box);
  *box = p;
  p->box = box;
  luaL_getmetatable(L, PROC_MT);
  lua_setmetatable(L, -2);
  lua_pushinteger(L, p->pid);
  return 2;
}

/* syntax: list = core.process_environ() -- the instance's environment as "K=v" strings */
static int l_environ(lua_State *L) {
  uv_env_item_t *items;
  int n;
  int r = uv_os_environ(&items, &n);
  if (r < 0) return push_err(L, r);
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushfstring(L, "%s=%s", items[i].name, items[i].value);
    lua_rawseti(L, -2, i + 1);
  }
  uv_os_free_environ(items, n);
  return 1;
}

void mlua_open_process(lua_State *L, moonlet_t *m) {
  static const luaL_Reg pm[] = {{"wait", p_wait},
                                {"kill", p_kill},
                                {"pid", p_pid},
                                {"status", p_status},
                                {"close", p_close},
                                {"receive", p_receive},
                                {"receive_any", p_receive_any},
                                {"settimeout", p_settimeout},
                                {"write", p_write},
                                {"close_stdin", p_close_stdin},
                                {NULL, NULL}};
  static const luaL_Reg fns[] = {
      {"process_spawn", l_spawn}, {"process_environ", l_environ}, {NULL, NULL}};
  luaL_newmetatable(L, PROC_MT);
  lua_pushliteral(L, PROC_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  mlua_register(L, m, pm);
  lua_pushvalue(L, -1);
  lua_setfield(L, -4, "process_raw"); /* core.process_raw: the C methods process.lua wraps */
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, p_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, p_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
