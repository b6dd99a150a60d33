/* core/fswatch.c: the debounced file watcher of core/fswatch.h: one uv_fs_event_t per directory
 * that holds a watched file, a list of the watched base names in each, one debounce timer.
 *
 * Ownership: a dir_t is owned by its watcher's list until it is closed; then by its handle, and it
 * is freed in the handle's close callback. The watcher is freed by the last close callback after
 * ml_fswatch_close (w->closing counts the handles still closing). Loop thread only.
 */
#include "fswatch.h"

#include <stdlib.h>
#include <string.h>

typedef struct dir_s {
  uv_fs_event_t h;    /* watches `path`; h.data is this dir_t */
  struct dir_s *next; /* the watcher's list */
  ml_fswatch_t *w;
  char *path;   /* the directory, as given */
  char **names; /* base names of the watched files in it */
  size_t nnames, cap;
  int keep; /* set by ml_fswatch_set when a path still needs this directory */
} dir_t;

struct ml_fswatch_s {
  uv_loop_t *loop;
  uv_timer_t timer; /* the debounce timer; timer.data is the watcher */
  uint64_t debounce_ms;
  ml_fswatch_cb cb;
  void *ud;
  dir_t *dirs;
  unsigned closing; /* handles closed whose close callback has not run yet */
  int closed;       /* ml_fswatch_close was called: no callback any more */
};

static void maybe_free(ml_fswatch_t *w) {
  if (w->closed && w->closing == 0) free(w);
}

static void dir_names_free(dir_t *d) {
  for (size_t i = 0; i < d->nnames; i++)
    free(d->names[i]);
  d->nnames = 0;
}

static void dir_closed(uv_handle_t *h) {
  dir_t *d = h->data;
  ml_fswatch_t *w = d->w;
  dir_names_free(d);
  free(d->names);
  free(d->path);
  free(d);
  w->closing--;
  maybe_free(w);
}

static void timer_closed(uv_handle_t *h) {
  ml_fswatch_t *w = h->data;
  w->closing--;
  maybe_free(w);
}

static void dir_close(dir_t *d) {
  d->w->closing++;
  uv_close((uv_handle_t *)&d->h, dir_closed);
}

static void on_timer(uv_timer_t *t) {
  ml_fswatch_t *w = t->data;
  if (!w->closed) w->cb(w, w->ud);
}

/* An event in a watched directory: one of our names (or an event without a name, which may be
 * ours) restarts the debounce timer, so the callback runs once the burst is over. */
static void on_event(uv_fs_event_t *h, const char *filename, int events, int status) {
  dir_t *d = h->data;
  ml_fswatch_t *w = d->w;
  (void)events;
  if (w->closed || status < 0) return;
  int ours = filename == NULL;
  for (size_t i = 0; !ours && i < d->nnames; i++)
    ours = strcmp(d->names[i], filename) == 0;
  if (ours) uv_timer_start(&w->timer, on_timer, w->debounce_ms, 0);
}

ml_fswatch_t *ml_fswatch_new(uv_loop_t *loop, uint64_t debounce_ms, ml_fswatch_cb cb, void *ud) {
  ml_fswatch_t *w = calloc(1, sizeof *w);
  if (!w) return NULL;
  w->loop = loop;
  w->debounce_ms = debounce_ms;
  w->cb = cb;
  w->ud = ud;
  uv_timer_init(loop, &w->timer);
  w->timer.data = w;
  uv_unref((uv_handle_t *)&w->timer);
  return w;
}

static int dir_add_name(dir_t *d, const char *name) {
  for (size_t i = 0; i < d->nnames; i++)
    if (strcmp(d->names[i], name) == 0) return 0;
  if (d->nnames == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 4;
    char **p = realloc(d->names, cap * sizeof *p);
    if (!p) return UV_ENOMEM;
    d->names = p;
    d->cap = cap;
  }
  char *copy = strdup(name);
  if (!copy) return UV_ENOMEM;
  d->names[d->nnames++] = copy;
  return 0;
}

/* The watched directory `dir` (len bytes), made and started when it is new. Sets *err on failure.
 */
static dir_t *dir_get(ml_fswatch_t *w, const char *dir, size_t len, int *err) {
  for (dir_t *d = w->dirs; d; d = d->next)
    if (strlen(d->path) == len && memcmp(d->path, dir, len) == 0) return d;
  dir_t *d = calloc(1, sizeof *d);
  if (!d || !(d->path = strndup(dir, len))) {
    free(d);
    *err = UV_ENOMEM;
    return NULL;
  }
  d->w = w;
  uv_fs_event_init(w->loop, &d->h);
  d->h.data = d;
  int r = uv_fs_event_start(&d->h, on_event, d->path, 0);
  if (r < 0) {
    dir_close(d); /* an initialised handle is freed through its close callback */
    *err = r;
    return NULL;
  }
  uv_unref((uv_handle_t *)&d->h);
  d->next = w->dirs;
  w->dirs = d;
  return d;
}

int ml_fswatch_set(ml_fswatch_t *w, const char *const *paths, size_t n) {
  int err = 0;
  if (w->closed) return UV_EINVAL;
  for (dir_t *d = w->dirs; d; d = d->next) {
    d->keep = 0;
    dir_names_free(d);
  }
  for (size_t i = 0; i < n; i++) {
    const char *p = paths[i];
    const char *slash = strrchr(p, '/');
    const char *base = slash ? slash + 1 : p;
    if (*base == '\0') {
      err = UV_EINVAL;
      continue;
    }
    const char *dir = slash ? (slash == p ? "/" : p) : ".";
    size_t dlen = slash ? (slash == p ? 1 : (size_t)(slash - p)) : 1;
    dir_t *d = dir_get(w, dir, dlen, &err);
    if (!d) continue;
    int r = dir_add_name(d, base);
    if (r < 0) err = r;
    d->keep = 1;
  }
  for (dir_t **pp = &w->dirs; *pp;) {
    dir_t *d = *pp;
    if (d->keep) {
      pp = &d->next;
      continue;
    }
    *pp = d->next;
    dir_close(d);
  }
  return err;
}

size_t ml_fswatch_count(const ml_fswatch_t *w, size_t *ndirs) {
  size_t files = 0, dirs = 0;
  for (const dir_t *d = w->dirs; d; d = d->next) {
    files += d->nnames;
    dirs++;
  }
  if (ndirs) *ndirs = dirs;
  return files;
}

void ml_fswatch_close(ml_fswatch_t *w) {
  if (w->closed) return;
  w->closed = 1;
  while (w->dirs) {
    dir_t *d = w->dirs;
    w->dirs = d->next;
    dir_close(d);
  }
  w->closing++;
  uv_close((uv_handle_t *)&w->timer, timer_closed);
}
