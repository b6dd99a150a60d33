/* bindings/fs.c: the file system for Lua, two ways.
 * - Synchronous core.stat, core.realpath and core.open_file: what the framework needs at start-up
 *   and for static files (local disk, like nginx's open and fstat). core.open_file's handle
 *   ("moonlet.file") owns its descriptor until it is closed, collected, or given to x:send_file
 *   (bindings/http_server.c, mlua_file_take), which then owns it.
 * - moonlet.fs (lua/moonlet/fs.lua): core.fs_read, fs_write, fs_stat, fs_list, fs_mkdir,
 *   fs_remove, fs_rename on libuv's thread pool (uv_fs_* with a callback); the calling task yields.
 *
 * Ownership of the asynchronous calls: each call is one fsop_t, C memory, a resource of the
 * instance from its start to its last callback (core.stats() counts it). It owns everything the
 * thread pool sees: the paths (libuv copies them), the data to write (copied, so that no Lua
 * string is read off the loop thread and nothing in Lua must outlive the request) and the buffer a
 * read fills. A call may chain several requests (open, fstat, read..., close) through the one
 * uv_fs_t; every callback first checks that its task still waits. Cancelling (a task cancelled,
 * moonlet_free) forgets the task and uv_cancels the request in flight: when the thread pool has
 * not started it, its callback comes with UV_ECANCELED; otherwise it completes. Either way the
 * chain stops there, closes the file it opened (a close is never cancelled, so no fd leaks), frees
 * the op and resumes nobody. Only the loop thread touches an op outside libuv's own work.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlua.h"

#define FILE_MT "moonlet.file"

typedef struct {
  int fd; /* -1 once closed or taken */
} file_t;

static void push_sys_stat(lua_State *L, const struct stat *st) {
  lua_createtable(L, 0, 6);
  lua_pushnumber(L, (double)st->st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (double)st->st_mtime);
  lua_setfield(L, -2, "mtime");
  lua_pushnumber(L, (double)st->st_ino);
  lua_setfield(L, -2, "ino");
  lua_pushnumber(L, (double)st->st_ctim.tv_sec);
  lua_setfield(L, -2, "ctime");
  lua_pushnumber(L, (double)st->st_ctim.tv_nsec);
  lua_setfield(L, -2, "ctime_nsec");
  lua_pushstring(L, S_ISREG(st->st_mode) ? "file" : S_ISDIR(st->st_mode) ? "directory" : "other");
  lua_setfield(L, -2, "type");
}

/* syntax: info, err = core.stat(path) -- { size, mtime, type = "file"|"directory"|"other", ino,
 * ctime, ctime_nsec }: the inode change time changes with every write of the file and cannot be set
 * back (mtime can: touch -r, cp -p), so a cache of what a file holds checks it too */
static int l_stat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct stat st;
  if (stat(path, &st) != 0) return mlua_push_error(L, uv_translate_sys_error(errno));
  push_sys_stat(L, &st);
  return 1;
}

/* syntax: file, info = core.open_file(path) -- the file opened for reading and what fstat says of
 * that open file (core.stat's fields); nil, err. A static file's headers are made from info and its
 * bytes read from file, so a file renamed over or replaced meanwhile cannot send other bytes than
 * the headers describe (nginx's open + fstat). The descriptor is closed by file:close(), by the
 * collector, or by the transfer that x:send_file(file, ...) starts with it. */
static int l_open_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  file_t *f = lua_newuserdata(L, sizeof *f); /* first: a raise here leaks no descriptor */
  f->fd = -1;
  luaL_getmetatable(L, FILE_MT);
  lua_setmetatable(L, -2);
  /* O_NONBLOCK: a FIFO put in the file's place since it was stat'ed must not stop the loop in
   * open; for a regular file it changes nothing */
  f->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (f->fd < 0) return mlua_push_error(L, uv_translate_sys_error(errno));
  struct stat st;
  if (fstat(f->fd, &st) != 0) {
    int err = uv_translate_sys_error(errno);
    close(f->fd);
    f->fd = -1;
    return mlua_push_error(L, err);
  }
  push_sys_stat(L, &st);
  return 2;
}

/* syntax: file:close() -- at most once; later calls do nothing */
static int file_close(lua_State *L) {
  file_t *f = luaL_checkudata(L, 1, FILE_MT);
  if (f->fd >= 0) close(f->fd);
  f->fd = -1;
  return 0;
}

int mlua_file_take(lua_State *L, int idx) {
  file_t *f = luaL_checkudata(L, idx, FILE_MT);
  int fd = f->fd;
  f->fd = -1;
  return fd;
}

/* syntax: resolved, err = core.realpath(path) -- symlinks and dots resolved */
static int l_realpath(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char buf[PATH_MAX];
  if (!realpath(path, buf)) return mlua_push_error(L, uv_translate_sys_error(errno));
  lua_pushstring(L, buf);
  return 1;
}

/* -- Asynchronous calls on the thread pool ----------------------------------------------------- */

#define READ_MAX ((size_t)1 << 30)  /* a larger file is "too large" for one Lua string */
#define CHUNK_MAX ((size_t)1 << 30) /* bytes per read or write request */

enum { OP_READ, OP_WRITE, OP_STAT, OP_LIST, OP_MKDIR, OP_REMOVE, OP_RENAME };

typedef struct {
  mlua_res_t res;
  uv_fs_t req; /* one request at a time: the chain's current step */
  uv_loop_t *loop;
  moonlet_t *m;      /* only while linked */
  mlua_task_t *task; /* the waiting task; NULL once cancelled or detached */
  int kind;          /* OP_* */
  int linked;        /* in the instance's resources */
  int closing;       /* the close of fd is in flight: never cancelled */
  uv_file fd;        /* the file a read or write opened, or -1 */
  int err;           /* what to report once fd is closed */
  char *buf;         /* read: the bytes so far; write: a copy of the data */
  size_t len, cap;   /* read: bytes read, capacity; write: bytes to write */
  size_t off;        /* write: bytes written */
  char *path;        /* remove: the path again, for the rmdir after a failed unlink */
} fsop_t;

static void fsop_free(fsop_t *op) {
  uv_fs_req_cleanup(&op->req);
  free(op->buf);
  free(op->path);
  free(op);
}

static void push_stat(lua_State *L, const uv_stat_t *st) {
  lua_createtable(L, 0, 6);
  lua_pushnumber(L, (double)st->st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (double)st->st_mtim.tv_sec + (double)st->st_mtim.tv_nsec / 1e9);
  lua_setfield(L, -2, "mtime");
  uint64_t fmt = st->st_mode & S_IFMT;
  lua_pushstring(L, fmt == S_IFREG   ? "file"
                    : fmt == S_IFDIR ? "directory"
                    : fmt == S_IFLNK ? "link"
                                     : "other");
  lua_setfield(L, -2, "type");
  lua_pushinteger(L, (lua_Integer)(st->st_mode & 07777));
  lua_setfield(L, -2, "mode");
}

/* The results of a call that succeeded, pushed on L (mlua_push_protected: a file's bytes or a long
 * listing may not fit in memory, and the error is caught there). Returns 1. */
static int push_result(lua_State *L, void *ud) {
  fsop_t *op = ud;
  if (op->kind == OP_READ) {
    lua_pushlstring(L, op->buf ? op->buf : "", op->len);
  } else if (op->kind == OP_STAT) {
    push_stat(L, &op->req.statbuf);
  } else if (op->kind == OP_LIST) {
    uv_dirent_t ent;
    lua_createtable(L, (int)op->req.result, 0);
    for (int i = 1; uv_fs_scandir_next(&op->req, &ent) == 0; i++) {
      lua_pushstring(L, ent.name);
      lua_rawseti(L, -2, i);
    }
  } else {
    lua_pushboolean(L, 1);
  }
  return 1;
}

/* Ends the call: unlinks it, pushes its results (status < 0: nil, err, code; out of memory: nil,
 * "not enough memory") on the task, frees the op, then resumes the task, unless the call was
 * cancelled: then it only frees. op->req may still hold the last step's results (stat, scandir);
 * they are read before the cleanup. */
static void complete(fsop_t *op, int status) {
  if (op->linked) mlua_res_unlink(op->m, &op->res);
  op->linked = 0;
  mlua_task_t *t = op->task;
  int n = 0;
  if (t) {
    if (status < 0)
      n = mlua_push_error_to(op->m, t->co, status);
    else
      n = mlua_push_protected(op->m, t->co, push_result, op);
  }
  fsop_free(op);
  if (t) mlua_task_resume(t, n);
}

static void on_closed(uv_fs_t *req) {
  fsop_t *op = req->data;
  if (op->err >= 0 && req->result < 0) op->err = (int)req->result; /* a write may fail at close */
  op->fd = -1;
  op->closing = 0;
  uv_fs_req_cleanup(req);
  complete(op, op->err);
}

/* Ends a read or write chain: closes the file when one is open, then completes with status. */
static void finish(fsop_t *op, int status) {
  uv_fs_req_cleanup(&op->req);
  if (op->fd < 0) {
    complete(op, status);
    return;
  }
  op->err = status;
  op->closing = 1;
  uv_fs_close(op->loop, &op->req, op->fd, on_closed);
}

/* Whether the chain stops after a step: its error, or UV_ECANCELED when the task is gone; 0 to go
 * on. A stopped chain goes through finish. */
static int stop_status(fsop_t *op) {
  if (op->req.result < 0) return (int)op->req.result;
  return op->task ? 0 : UV_ECANCELED;
}

static void read_more(fsop_t *op);

static void on_read(uv_fs_t *req) {
  fsop_t *op = req->data;
  ssize_t r = req->result;
  int stop = stop_status(op);
  if (stop || r == 0) { /* an error, cancelled, or the end of the file */
    finish(op, stop);
    return;
  }
  uv_fs_req_cleanup(req);
  op->len += (size_t)r;
  if (op->len == op->cap) { /* the file grew, or its size was unknown (0 for /proc files) */
    if (op->cap >= READ_MAX) {
      finish(op, UV_E2BIG);
      return;
    }
    size_t cap = op->cap * 2;
    char *buf = realloc(op->buf, cap);
    if (!buf) {
      finish(op, UV_ENOMEM);
      return;
    }
    op->buf = buf;
    op->cap = cap;
  }
  read_more(op);
}

static void read_more(fsop_t *op) {
  size_t room = op->cap - op->len;
  uv_buf_t b = uv_buf_init(op->buf + op->len, (unsigned)(room < CHUNK_MAX ? room : CHUNK_MAX));
  uv_fs_read(op->loop, &op->req, op->fd, &b, 1, -1, on_read);
}

static void on_read_fstat(uv_fs_t *req) {
  fsop_t *op = req->data;
  int stop = stop_status(op);
  if (stop) {
    finish(op, stop);
    return;
  }
  uint64_t fmt = req->statbuf.st_mode & S_IFMT;
  if (fmt == S_IFDIR) {
    finish(op, UV_EISDIR);
    return;
  }
  if (fmt != S_IFREG) { /* a FIFO, socket or device: its reads may wait forever (see l_fs_read) */
    finish(op, UV_EFTYPE);
    return;
  }
  uint64_t size = req->statbuf.st_size;
  if (size >= READ_MAX) {
    finish(op, UV_E2BIG);
    return;
  }
  op->cap = size ? (size_t)size + 1 : 4096; /* + 1: the read that finds the end needs room */
  op->buf = malloc(op->cap);
  if (!op->buf) {
    finish(op, UV_ENOMEM);
    return;
  }
  uv_fs_req_cleanup(req);
  read_more(op);
}

static void on_read_open(uv_fs_t *req) {
  fsop_t *op = req->data;
  if (req->result >= 0) op->fd = (uv_file)req->result;
  int stop = stop_status(op);
  if (stop) {
    finish(op, stop);
    return;
  }
  uv_fs_req_cleanup(req);
  uv_fs_fstat(op->loop, req, op->fd, on_read_fstat);
}

static void write_more(fsop_t *op);

static void on_write(uv_fs_t *req) {
  fsop_t *op = req->data;
  int stop = stop_status(op);
  if (stop) {
    finish(op, stop);
    return;
  }
  op->off += (size_t)req->result;
  uv_fs_req_cleanup(req);
  write_more(op);
}

static void write_more(fsop_t *op) {
  if (op->off >= op->len) {
    finish(op, 0);
    return;
  }
  size_t left = op->len - op->off;
  uv_buf_t b = uv_buf_init(op->buf + op->off, (unsigned)(left < CHUNK_MAX ? left : CHUNK_MAX));
  uv_fs_write(op->loop, &op->req, op->fd, &b, 1, -1, on_write);
}

static void on_write_open(uv_fs_t *req) {
  fsop_t *op = req->data;
  if (req->result >= 0) op->fd = (uv_file)req->result;
  int stop = stop_status(op);
  if (stop) {
    finish(op, stop);
    return;
  }
  uv_fs_req_cleanup(req);
  write_more(op);
}

/* One-request calls: stat, list, mkdir, rename. */
static void on_done(uv_fs_t *req) {
  fsop_t *op = req->data;
  complete(op, (int)req->result);
}

/* remove, second step: a path that is no directory either reports the unlink's error. */
static void on_rmdir(uv_fs_t *req) {
  fsop_t *op = req->data;
  int r = (int)req->result;
  complete(op, r == UV_ENOTDIR ? op->err : r);
}

/* remove, first step: unlink; a directory (EISDIR on Linux, EPERM elsewhere) is rmdir'ed. */
static void on_unlink(uv_fs_t *req) {
  fsop_t *op = req->data;
  int r = (int)req->result;
  if ((r != UV_EISDIR && r != UV_EPERM) || !op->task) {
    complete(op, r);
    return;
  }
  op->err = r;
  uv_fs_req_cleanup(req);
  uv_fs_rmdir(op->loop, req, op->path, on_rmdir);
}

/* The task is cancelled: forget it and take back the request when the pool has not started it. */
static void fsop_cancel(mlua_task_t *t, void *wait) {
  fsop_t *op = wait;
  (void)t;
  op->task = NULL;
  if (!op->closing) uv_cancel((uv_req_t *)&op->req);
}

/* moonlet_free: the op is detached from its task and the instance (already unlinked); its chain
 * ends alone. */
static void fsop_res_close(mlua_res_t *r) {
  fsop_t *op = (fsop_t *)r;
  op->linked = 0;
  op->task = NULL;
  if (!op->closing) uv_cancel((uv_req_t *)&op->req);
}

/* Starts a call of `kind` for the running task: returns the op (linked, the task recorded) or
 * raises outside a task or when out of memory. */
static fsop_t *fsop_new(lua_State *L, int kind, mlua_task_t **tp) {
  moonlet_t *m = mlua_instance(L);
  mlua_task_t *t = mlua_task_current(L);
  mlua_check_yieldable(L, t);
  fsop_t *op = calloc(1, sizeof *op);
  if (!op) luaL_error(L, "moonlet.fs: out of memory");
  op->req.data = op;
  op->loop = m->loop;
  op->m = m;
  op->task = t;
  op->kind = kind;
  op->fd = -1;
  *tp = t;
  return op;
}

/* The request of op was submitted with result r: a submission error completes at once (without
 * yielding: the callback never comes), else the op is linked and the task parks. */
static int fsop_wait(lua_State *L, fsop_t *op, mlua_task_t *t, int r) {
  if (r < 0) {
    fsop_free(op);
    return mlua_push_error(L, r);
  }
  mlua_res_link(op->m, &op->res, fsop_res_close);
  op->linked = 1;
  return mlua_task_wait(L, t, fsop_cancel, op);
}

/* syntax: data, err = core.fs_read(path)
 * Regular files only: a FIFO, socket or device is refused with UV_EFTYPE ("not a regular file")
 * once opened. The open is O_NONBLOCK, so that a FIFO without a writer does not hold a thread of
 * the pool in open(2) (Node's readFile blocks there); a thread blocked in a read could not be
 * cancelled or timed out either (uv_cancel cannot take back a request that runs). */
static int l_fs_read(lua_State *L) {
  const char *path = mlua_cstring_arg(L, 1);
  if (!path) return mlua_push_error(L, UV_EINVAL);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_READ, &t);
  int r = uv_fs_open(op->loop, &op->req, path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0, on_read_open);
  return fsop_wait(L, op, t, r);
}

/* syntax: ok, err = core.fs_write(path, data, append) -- creates; truncates unless append */
static int l_fs_write(lua_State *L) {
  const char *path = mlua_cstring_arg(L, 1);
  if (!path) return mlua_push_error(L, UV_EINVAL);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (lua_toboolean(L, 3) ? O_APPEND : O_TRUNC);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_WRITE, &t);
  if (len) {
    op->buf = malloc(len);
    if (!op->buf) {
      fsop_free(op);
      return mlua_push_error(L, UV_ENOMEM);
    }
    memcpy(op->buf, data, len);
  }
  op->len = len;
  int r = uv_fs_open(op->loop, &op->req, path, flags, 0666, on_write_open);
  return fsop_wait(L, op, t, r);
}

/* syntax: info, err = core.fs_stat(path, follow) -- follow: stat, else lstat */
static int l_fs_stat(lua_State *L) {
  const char *path = mlua_cstring_arg(L, 1);
  if (!path) return mlua_push_error(L, UV_EINVAL);
  int follow = lua_toboolean(L, 2);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_STAT, &t);
  int r = follow ? uv_fs_stat(op->loop, &op->req, path, on_done)
                 : uv_fs_lstat(op->loop, &op->req, path, on_done);
  return fsop_wait(L, op, t, r);
}

/* syntax: names, err = core.fs_list(dir) -- unsorted, without "." and ".." */
static int l_fs_list(lua_State *L) {
  const char *path = mlua_cstring_arg(L, 1);
  if (!path) return mlua_push_error(L, UV_EINVAL);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_LIST, &t);
  return fsop_wait(L, op, t, uv_fs_scandir(op->loop, &op->req, path, 0, on_done));
}

/* syntax: ok, err = core.fs_mkdir(path, mode) */
static int l_fs_mkdir(lua_State *L) {
  const char *path = mlua_cstring_arg(L, 1);
  if (!path) return mlua_push_error(L, UV_EINVAL);
  int mode = (int)luaL_optinteger(L, 2, 0777);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_MKDIR, &t);
  return fsop_wait(L, op, t, uv_fs_mkdir(op->loop, &op->req, path, mode, on_done));
}

/* syntax: ok, err = core.fs_remove(path) -- a file, a link or an empty directory */
static int l_fs_remove(lua_State *L) {
  const char *path = mlua_cstring_arg(L, 1);
  if (!path) return mlua_push_error(L, UV_EINVAL);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_REMOVE, &t);
  op->path = strdup(path);
  if (!op->path) {
    fsop_free(op);
    return mlua_push_error(L, UV_ENOMEM);
  }
  return fsop_wait(L, op, t, uv_fs_unlink(op->loop, &op->req, path, on_unlink));
}

/* syntax: ok, err = core.fs_rename(from, to) */
static int l_fs_rename(lua_State *L) {
  const char *from = mlua_cstring_arg(L, 1);
  const char *to = mlua_cstring_arg(L, 2);
  if (!from || !to) return mlua_push_error(L, UV_EINVAL);
  mlua_task_t *t;
  fsop_t *op = fsop_new(L, OP_RENAME, &t);
  return fsop_wait(L, op, t, uv_fs_rename(op->loop, &op->req, from, to, on_done));
}

void mlua_open_fs(lua_State *L, moonlet_t *m) {
  static const luaL_Reg fns[] = {{"stat", l_stat},
                                 {"realpath", l_realpath},
                                 {"fs_read", l_fs_read},
                                 {"fs_write", l_fs_write},
                                 {"fs_stat", l_fs_stat},
                                 {"fs_list", l_fs_list},
                                 {"fs_mkdir", l_fs_mkdir},
                                 {"fs_remove", l_fs_remove},
                                 {"fs_rename", l_fs_rename},
                                 {"open_file", l_open_file},
                                 {NULL, NULL}};
  static const luaL_Reg file_methods[] = {{"close", file_close}, {NULL, NULL}};
  luaL_newmetatable(L, FILE_MT);
  lua_pushliteral(L, FILE_MT);
  lua_setfield(L, -2, "__name");
  lua_newtable(L);
  luaL_register(L, NULL, file_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, file_close);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  mlua_register(L, m, fns);
}
