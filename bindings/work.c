/* bindings/work.c: moonlet.work, CPU-bound Lua on libuv's thread pool. A job runs a function (sent
 * as bytecode) or module[fn] in a worker Lua state of its own while the caller's task waits and the
 * loop serves everything else.
 *
 * The rules (rule 7 of STYLE.md, and what follows from it):
 * 1. Worker threads touch neither the main lua_State nor the loop. A worker thread touches only its
 *    job's worker state and the job's `in`/`out` buffers; only the after-work callback, on the loop
 *    thread, resumes the waiting task.
 * 2. Values cross between states as bytes, never as Lua objects: the caller's arguments are encoded
 *    into C memory on the loop thread (misuse raises there, before anything is queued) and decoded
 *    in the worker; results go the other way. So a job owns all it hands to the thread pool, pins
 *    nothing in the main state and stays valid even after the instance is gone.
 * 3. A worker state belongs to the loop thread while idle and to one worker thread from
 *    uv_queue_work to the after-work callback, which gives it back to the pool. States are created
 *    lazily, reused, and number at most the thread pool size less one (one thread stays free for
 *    files and DNS); jobs beyond that wait in a FIFO, in C. They use LuaJIT's own allocator even
 *    when the host gave the instance one (cfg.alloc): a host allocator need not be thread-safe.
 * 4. A job is a resource of the instance from its submission to its after-work callback, so
 *    core.stats() counts jobs in flight and moonlet_free detaches them. Cancelling a waiting job
 *    removes it from the FIFO, or uv_cancels it when the thread pool has not started it, or else
 *    lets it finish and drops its results: the after-work callback resumes nobody then.
 * 5. The pool struct outlives the Lua state when jobs are still running at lua_close (an anchor
 *    userdata's __gc closes it): the last after-work callback frees it then.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mlua.h"

#define MAX_DEPTH 100      /* nesting of copied tables */
#define MAX_POOL_SIZE 1024 /* libuv's own bound on UV_THREADPOOL_SIZE */
#define IDLE_GC_KB 8192    /* a worker state above this after a job is collected at once */
#define MAX_RESULTS 4000   /* what the caller's stack takes (LuaJIT's limit is 8000 slots) */

enum { MODE_CLOSURE = 0, MODE_MODULE };
/* The encoding: a tag byte, then a double (T_NUM), a size_t length and the bytes (T_STR), or
 * key-value pairs up to T_END (T_TAB). */
enum {
  T_NIL = 'n',
  T_TRUE = 't',
  T_FALSE = 'f',
  T_NUM = 'd',
  T_STR = 's',
  T_TAB = '{',
  T_END = '}'
};
enum { C_OK = 0, C_TYPE, C_CYCLE, C_DEPTH, C_NOMEM, C_LARGE };
/* Values copied in one direction: a table shared many times without a cycle is copied each time
 * (2^n copies for n levels of {t, t}), so this bounds the work. */
#define MAX_VALUES 1000000

static char pool_key;   /* registry[&pool_key] = the pool's anchor userdata */
static char misuse_key; /* &misuse_key is core.WORK_MISUSE */

/* -- Copying values: encode into bytes, decode into another state ------------------------------ */

typedef struct {
  char *p;
  size_t len, cap;
} buf_t;

static int buf_put(buf_t *b, const void *data, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return C_NOMEM;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, data, n);
  b->len += n;
  return C_OK;
}

static int buf_tag(buf_t *b, char tag) { return buf_put(b, &tag, 1); }

static void buf_free(buf_t *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

static int put_string(buf_t *b, const char *s, size_t n) {
  int e = buf_tag(b, T_STR);
  if (!e) e = buf_put(b, &n, sizeof n);
  if (!e) e = buf_put(b, s, n);
  return e;
}

typedef struct {
  const void *path[MAX_DEPTH]; /* the tables being encoded, outermost first: a cycle is a repeat */
  int depth;
  const char *bad; /* C_TYPE: the type that cannot be copied */
  size_t values;   /* copied so far (MAX_VALUES) */
} enc_t;

/* Appends the value at idx of L to b. Returns C_OK or what went wrong (nothing is raised, so this
 * may run on a worker thread outside any protected call: it only reads L). */
static int encode(lua_State *L, int idx, buf_t *b, enc_t *enc) {
  if (idx < 0) idx = lua_gettop(L) + idx + 1;
  if (++enc->values > MAX_VALUES) return C_LARGE;
  switch (lua_type(L, idx)) {
  case LUA_TNIL: return buf_tag(b, T_NIL);
  case LUA_TBOOLEAN: return buf_tag(b, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
  case LUA_TNUMBER: {
    lua_Number n = lua_tonumber(L, idx);
    int e = buf_tag(b, T_NUM);
    return e ? e : buf_put(b, &n, sizeof n);
  }
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return put_string(b, s, n);
  }
  case LUA_TTABLE: break;
  default: enc->bad = lua_typename(L, lua_type(L, idx)); return C_TYPE;
  }
  const void *t = lua_topointer(L, idx);
  for (int i = 0; i < enc->depth; i++) {
    if (enc->path[i] == t) return C_CYCLE;
  }
  if (enc->depth == MAX_DEPTH) return C_DEPTH;
  if (!lua_checkstack(L, 3)) return C_DEPTH;
  enc->path[enc->depth++] = t;
  int e = buf_tag(b, T_TAB);
  lua_pushnil(L);
  while (!e && lua_next(L, idx)) {
    e = encode(L, -2, b, enc);
    if (!e) e = encode(L, -1, b, enc);
    lua_pop(L, 1);
  }
  if (e) {
    lua_pop(L, 1); /* the key lua_next left */
    return e;
  }
  enc->depth--;
  return buf_tag(b, T_END);
}

/* Pushes the message of a failed encode, as the Lua side shows it. */
static void push_encode_error(lua_State *L, int e, const enc_t *enc) {
  switch (e) {
  case C_TYPE: lua_pushfstring(L, "moonlet.work: cannot copy a %s", enc->bad); break;
  case C_CYCLE: lua_pushliteral(L, "moonlet.work: cannot copy a table with a cycle"); break;
  case C_DEPTH: lua_pushliteral(L, "moonlet.work: cannot copy tables nested that deep"); break;
  case C_LARGE: lua_pushliteral(L, "moonlet.work: cannot copy more than 1000000 values"); break;
  default: lua_pushliteral(L, "moonlet.work: out of memory"); break;
  }
}

/* Pushes the value encoded at *p on L and moves *p past it. The bytes come from encode, so they
 * are trusted; nesting is bounded by MAX_DEPTH, so the stack need only grow a little per table. */
static void decode(lua_State *L, const char **p) {
  char tag = *(*p)++;
  switch (tag) {
  case T_NIL: lua_pushnil(L); return;
  case T_TRUE: lua_pushboolean(L, 1); return;
  case T_FALSE: lua_pushboolean(L, 0); return;
  case T_NUM: {
    lua_Number n;
    memcpy(&n, *p, sizeof n);
    *p += sizeof n;
    lua_pushnumber(L, n);
    return;
  }
  case T_STR: {
    size_t n;
    memcpy(&n, *p, sizeof n);
    *p += sizeof n;
    lua_pushlstring(L, *p, n);
    *p += n;
    return;
  }
  default: /* T_TAB */
    lua_checkstack(L, 4);
    lua_newtable(L);
    while (**p != T_END) {
      decode(L, p);
      decode(L, p);
      lua_rawset(L, -3);
    }
    (*p)++;
    return;
  }
}

/* -- The pool and its jobs --------------------------------------------------------------------- */

typedef struct pool_s pool_t;

typedef struct job_s {
  mlua_res_t res;
  uv_work_t req;
  pool_t *pool;
  moonlet_t *m;
  mlua_task_t *task;         /* the waiting task; NULL once cancelled or detached */
  lua_State *W;              /* the worker state while on the thread pool */
  struct job_s *prev, *next; /* the FIFO, while waiting for a state */
  int linked;                /* in the instance's resources */
  int queued;                /* in the FIFO */
  /* worker thread only, between uv_queue_work and the after-work callback: */
  int mode; /* MODE_* */
  int nargs;
  buf_t in;  /* the code or module name + function name, then the arguments */
  buf_t out; /* the results, or the error message when `failed` */
  int nout;
  int failed;
} job_t;

struct pool_s {
  moonlet_t *m;
  lua_State **idle; /* idle worker states, a stack */
  int nidle;
  int states; /* created and not closed */
  int max_states;
  int busy;   /* jobs on the thread pool */
  int closed; /* the Lua state is gone: free states as they come back, then the pool */
  job_t *head, *tail;
  int queued;
};

static void job_free(job_t *j) {
  buf_free(&j->in);
  buf_free(&j->out);
  free(j);
}

static void fifo_remove(pool_t *p, job_t *j) {
  if (j->prev)
    j->prev->next = j->next;
  else
    p->head = j->next;
  if (j->next)
    j->next->prev = j->prev;
  else
    p->tail = j->prev;
  j->prev = j->next = NULL;
  j->queued = 0;
  p->queued--;
}

static void fifo_push(pool_t *p, job_t *j) {
  j->next = NULL;
  j->prev = p->tail;
  if (p->tail)
    p->tail->next = j;
  else
    p->head = j;
  p->tail = j;
  j->queued = 1;
  p->queued++;
}

static void pool_free(pool_t *p) {
  for (int i = 0; i < p->nidle; i++)
    lua_close(p->idle[i]);
  free(p->idle);
  free(p);
}

/* The worker's package.path and cpath follow the instance's, so modules resolve alike. */
static void sync_paths(lua_State *L, lua_State *W) {
  lua_getglobal(W, "package");
  if (!lua_istable(W, -1)) {
    lua_pop(W, 1);
    return;
  }
  lua_getglobal(L, "package");
  if (lua_istable(L, -1)) {
    const char *fields[] = {"path", "cpath"};
    for (int i = 0; i < 2; i++) {
      lua_getfield(L, -1, fields[i]);
      if (lua_isstring(L, -1)) {
        lua_pushstring(W, lua_tostring(L, -1));
        lua_setfield(W, -2, fields[i]);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  lua_pop(W, 1);
}

/* An idle state, a new one while there are fewer than max_states, or NULL. */
static lua_State *pool_take(pool_t *p) {
  if (p->nidle > 0) return p->idle[--p->nidle];
  if (p->states >= p->max_states) return NULL;
  lua_State *W = luaL_newstate();
  if (!W) return NULL;
  luaL_openlibs(W);
  mlua_preload_linked_modules(W);
  p->states++;
  return W;
}

static void work_run(uv_work_t *req);
static void work_done(uv_work_t *req, int status);

/* Starts FIFO jobs while states are free. Loop thread only. */
static void pool_dispatch(pool_t *p) {
  while (p->head) {
    lua_State *W = pool_take(p);
    if (!W) return;
    job_t *j = p->head;
    fifo_remove(p, j);
    sync_paths(p->m->L, W);
    j->W = W;
    j->req.data = j;
    uv_queue_work(p->m->loop, &j->req, work_run, work_done); /* cannot fail: both callbacks given */
    p->busy++;
  }
}

/* The anchor's __gc, at lua_close: idle states go now, busy ones when their jobs come back. */
static int pool_gc(lua_State *L) {
  pool_t **box = lua_touserdata(L, 1);
  pool_t *p = *box;
  *box = NULL;
  if (!p) return 0;
  p->closed = 1;
  p->m = NULL;
  while (p->head) { /* none: moonlet_free closed every queued job already */
    job_t *j = p->head;
    fifo_remove(p, j);
    job_free(j);
  }
  for (int i = 0; i < p->nidle; i++)
    lua_close(p->idle[i]);
  p->states -= p->nidle;
  p->nidle = 0;
  if (p->busy == 0) pool_free(p);
  return 0;
}

/* libuv's thread pool size: UV_THREADPOOL_SIZE as libuv reads it when the pool starts. */
static int pool_size(void) {
  const char *s = getenv("UV_THREADPOOL_SIZE");
  int n = s ? atoi(s) : 4;
  if (n < 1) n = 1;
  if (n > MAX_POOL_SIZE) n = MAX_POOL_SIZE;
  return n;
}

/* The instance's pool, created on first use, or NULL when out of memory. */
static pool_t *pool_get(lua_State *L, moonlet_t *m) {
  lua_pushlightuserdata(L, &pool_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  pool_t **box = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (box) return *box;
  pool_t *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  int n = pool_size();
  p->max_states = n > 1 ? n - 1 : 1;
  p->idle = calloc((size_t)p->max_states, sizeof *p->idle);
  if (!p->idle) {
    free(p);
    return NULL;
  }
  p->m = m;
  lua_pushlightuserdata(L, &pool_key);
  box = lua_newuserdata(L, sizeof *box);
  *box = p;
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, pool_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return p;
}

/* -- On a worker thread ------------------------------------------------------------------------ */

/* Runs in the worker state under lua_pcall: decodes the code (or requires the module), then the
 * arguments, calls, and encodes the results into j->out. Any failure, an uncopyable result
 * included, is raised, so the one error path of work_run reports it. */
static int job_entry(lua_State *W) {
  job_t *j = lua_touserdata(W, 1);
  lua_settop(W, 0);
  const char *p = j->in.p;
  if (j->mode == MODE_CLOSURE) {
    size_t n;
    memcpy(&n, p + 1, sizeof n); /* a T_STR: the bytecode, loaded from the buffer in place */
    if (luaL_loadbuffer(W, p + 1 + sizeof n, n, "=moonlet.work") != 0) return lua_error(W);
    p += 1 + sizeof n + n;
  } else {
    decode(W, &p); /* 1: module name */
    lua_getglobal(W, "require");
    lua_pushvalue(W, 1);
    lua_call(W, 1, 1); /* 2: the module */
    decode(W, &p);     /* 3: function name */
    if (lua_istable(W, 2)) {
      lua_pushvalue(W, 3);
      lua_gettable(W, 2);
    } else {
      lua_pushnil(W);
    }
    if (!lua_isfunction(W, -1)) {
      return luaL_error(W, "moonlet.work: module '%s' has no function '%s'", lua_tostring(W, 1),
                        lua_tostring(W, 3));
    }
    lua_replace(W, 1);
    lua_settop(W, 1);
  }
  luaL_checkstack(W, j->nargs + 4, "moonlet.work: too many arguments");
  for (int i = 0; i < j->nargs; i++)
    decode(W, &p);
  lua_call(W, j->nargs, LUA_MULTRET);
  int n = lua_gettop(W), e = C_OK;
  if (n > MAX_RESULTS) return luaL_error(W, "moonlet.work: more than %d results", MAX_RESULTS);
  enc_t enc = {.depth = 0};
  for (int i = 1; i <= n && !e; i++)
    e = encode(W, i, &j->out, &enc);
  if (e) {
    push_encode_error(W, e, &enc);
    return lua_error(W);
  }
  j->nout = n;
  return 0;
}

/* The thread-pool side of a job: only j->W and the job's buffers are touched here (rule 1). */
static void work_run(uv_work_t *req) {
  job_t *j = req->data;
  lua_State *W = j->W;
  lua_settop(W, 0);
  lua_pushcfunction(W, job_entry);
  lua_pushlightuserdata(W, j);
  if (lua_pcall(W, 1, 0, 0) != 0) {
    if (lua_type(W, -1) != LUA_TSTRING && lua_type(W, -1) != LUA_TNUMBER) {
      lua_pushfstring(W, "(error object is a %s value)", luaL_typename(W, -1));
    }
    size_t len;
    const char *msg = lua_tolstring(W, -1, &len);
    buf_free(&j->out);
    j->failed = 1;
    if (put_string(&j->out, msg, len) != C_OK) buf_free(&j->out); /* reported as out of memory */
  }
  buf_free(&j->in);
  lua_settop(W, 0);
  /* An idle state keeps its garbage until its next job allocates: drop a big one now. */
  if (lua_gc(W, LUA_GCCOUNT, 0) > IDLE_GC_KB) lua_gc(W, LUA_GCCOLLECT, 0);
}

/* -- Back on the loop thread ------------------------------------------------------------------- */

/* The job's results decoded on L (the main state under mlua_push_protected: results too large for
 * memory give nil, "not enough memory" rather than a panic): fn's values, or nil and the error
 * message when it failed. Returns their count. */
static int push_results(lua_State *L, void *ud) {
  job_t *j = ud;
  const char *s = j->out.p;
  if (j->failed) {
    lua_pushnil(L);
    if (s)
      decode(L, &s);
    else
      lua_pushliteral(L, "moonlet.work: out of memory");
    return 2;
  }
  luaL_checkstack(L, j->nout + 4, "moonlet.work: too many results");
  for (int i = 0; i < j->nout; i++)
    decode(L, &s);
  return j->nout;
}

/* The after-work callback: gives the state back (or closes it when the pool is closed), starts the
 * next queued jobs, then resumes the task with the results unless it was cancelled meanwhile. */
static void work_done(uv_work_t *req, int status) {
  job_t *j = req->data;
  pool_t *p = j->pool;
  p->busy--;
  if (p->closed) {
    lua_close(j->W);
    p->states--;
  } else {
    p->idle[p->nidle++] = j->W;
  }
  j->W = NULL;
  if (j->linked) mlua_res_unlink(j->m, &j->res);
  mlua_task_t *t = j->task;
  int n = 0;
  if (t) {
    lua_State *co = t->co;
    if (status != 0) {
      n = mlua_push_error_to(j->m, co, status);
    } else {
      n = mlua_push_protected(j->m, co, push_results, j);
    }
  }
  job_free(j);
  if (p->closed) {
    if (p->busy == 0) pool_free(p);
  } else {
    pool_dispatch(p);
  }
  if (t) mlua_task_resume(t, n);
}

/* The waiting task is cancelled: a queued job goes at once; one on the thread pool is uv_cancelled
 * if it has not started (its after-work callback comes with UV_ECANCELED), else it runs to the end
 * and its results are dropped. Either way the after-work callback resumes nobody. */
static void job_cancel(mlua_task_t *t, void *wait) {
  job_t *j = wait;
  (void)t;
  j->task = NULL;
  if (j->queued) {
    fifo_remove(j->pool, j);
    if (j->linked) mlua_res_unlink(j->m, &j->res);
    job_free(j);
    return;
  }
  uv_cancel((uv_req_t *)&j->req);
}

/* moonlet_free: the job is detached from its task and the instance (already unlinked). */
static void job_res_close(mlua_res_t *r) {
  job_t *j = (job_t *)r;
  j->linked = 0;
  j->task = NULL;
  if (j->queued) {
    fifo_remove(j->pool, j);
    job_free(j);
    return;
  }
  uv_cancel((uv_req_t *)&j->req);
}

/* -- Lua API ----------------------------------------------------------------------------------- */

static int dump_writer(lua_State *L, const void *data, size_t n, void *ud) {
  (void)L;
  return buf_put(ud, data, n);
}

/* Misuse: frees the job and returns WORK_MISUSE with the message on top of the stack, for the Lua
 * wrapper to raise at its caller. */
static int misuse(lua_State *L, job_t *j) {
  job_free(j);
  lua_pushlightuserdata(L, &misuse_key);
  lua_insert(L, -2);
  return 2;
}

/* Encodes the function (bytecode) or the module and function names into j->in; returns the index
 * of the first argument, or 0 with the message of a misuse pushed. */
static int encode_code(lua_State *L, job_t *j) {
  if (lua_type(L, 1) == LUA_TFUNCTION) {
    if (lua_iscfunction(L, 1)) {
      lua_pushliteral(L, "moonlet.work: cannot run a C function in a worker");
      return 0;
    }
    const char *up = lua_getupvalue(L, 1, 1);
    if (up) {
      lua_pop(L, 1);
      lua_pushfstring(L,
                      "moonlet.work: the function uses the upvalue '%s', but it runs in a Lua "
                      "state of its own: pass values as arguments and require modules inside",
                      up);
      return 0;
    }
    j->mode = MODE_CLOSURE;
    size_t zero = 0, at = j->in.len + 1;
    int e = buf_tag(&j->in, T_STR);
    if (!e) e = buf_put(&j->in, &zero, sizeof zero);
    lua_pushvalue(L, 1);
    if (!e && lua_dump(L, dump_writer, &j->in) != 0) e = C_NOMEM;
    lua_pop(L, 1);
    if (e) {
      lua_pushliteral(L, "moonlet.work: out of memory");
      return 0;
    }
    size_t n = j->in.len - at - sizeof n;
    memcpy(j->in.p + at, &n, sizeof n);
    return 2;
  }
  if (lua_type(L, 1) == LUA_TSTRING) {
    if (lua_type(L, 2) != LUA_TSTRING) {
      lua_pushliteral(L, "moonlet.work: expected a function name after the module name");
      return 0;
    }
    j->mode = MODE_MODULE;
    size_t n1, n2;
    const char *s1 = lua_tolstring(L, 1, &n1), *s2 = lua_tolstring(L, 2, &n2);
    if (put_string(&j->in, s1, n1) != C_OK || put_string(&j->in, s2, n2) != C_OK) {
      lua_pushliteral(L, "moonlet.work: out of memory");
      return 0;
    }
    return 3;
  }
  lua_pushfstring(L, "moonlet.work: expected a function or a module name, got %s",
                  luaL_typename(L, 1));
  return 0;
}

/* syntax: ... = core.work(fn, ...) or core.work("module.name", "fn", ...)
 * Queues a job and yields; the task is resumed with the results, with nil and the error message,
 * or with CANCEL. Misuse returns WORK_MISUSE and a message without yielding. */
static int l_work(lua_State *L) {
  moonlet_t *m = mlua_instance(L);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  int top = lua_gettop(L);
  job_t *j = calloc(1, sizeof *j);
  if (!j) return mlua_push_error(L, UV_ENOMEM);
  int first = encode_code(L, j);
  if (!first) return misuse(L, j);
  enc_t enc = {.depth = 0};
  int e = C_OK;
  for (int i = first; i <= top && !e; i++)
    e = encode(L, i, &j->in, &enc);
  if (e) {
    push_encode_error(L, e, &enc);
    return misuse(L, j);
  }
  j->nargs = top >= first ? top - first + 1 : 0;
  pool_t *p = pool_get(L, m);
  if (!p) {
    job_free(j);
    return mlua_push_error(L, UV_ENOMEM);
  }
  j->pool = p;
  j->m = m;
  j->task = t;
  fifo_push(p, j);
  pool_dispatch(p);
  if (j->queued && p->states == 0) { /* no state could be made, and none will come back */
    fifo_remove(p, j);
    job_free(j);
    return mlua_push_error(L, UV_ENOMEM);
  }
  mlua_res_link(m, &j->res, job_res_close);
  j->linked = 1;
  return mlua_task_wait(L, t, job_cancel, j);
}

/* syntax: s = core.work_stats() -- { states, idle, running, queued, max_states } */
static int l_work_stats(lua_State *L) {
  lua_pushlightuserdata(L, &pool_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  pool_t **box = lua_touserdata(L, -1);
  lua_pop(L, 1);
  pool_t *p = box ? *box : NULL;
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, p ? p->states : 0);
  lua_setfield(L, -2, "states");
  lua_pushinteger(L, p ? p->nidle : 0);
  lua_setfield(L, -2, "idle");
  lua_pushinteger(L, p ? p->busy : 0);
  lua_setfield(L, -2, "running");
  lua_pushinteger(L, p ? p->queued : 0);
  lua_setfield(L, -2, "queued");
  int n = pool_size();
  lua_pushinteger(L, p ? p->max_states : (n > 1 ? n - 1 : 1));
  lua_setfield(L, -2, "max_states");
  return 1;
}

void mlua_open_work(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"work", l_work}, {"work_stats", l_work_stats}, {NULL, NULL}};
  mlua_register(L, m, fns);
  lua_pushlightuserdata(L, &misuse_key);
  lua_setfield(L, -2, "WORK_MISUSE");
}
