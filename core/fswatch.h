/* core/fswatch.h: a debounced watcher of a set of files, for hot reload. It knows nothing of Lua:
 * bindings/fswatch.c turns its callback into a Lua task.
 *
 * A watcher watches the directories that hold its files, not the files themselves: an editor that
 * saves by writing a new file and renaming it over the old one replaces the file's inode, and a
 * watch on the old inode would go silent; a watch on the directory sees the rename (and every later
 * write), so it never needs re-arming. Events on other names in those directories are ignored.
 * A burst of events (truncate, write, write, close, or a rename) ends in one callback, debounce_ms
 * after the last event of the burst.
 *
 * Ownership: the watcher owns its handles (one uv_fs_event_t per directory, one timer) and frees
 * them and itself from their close callbacks after ml_fswatch_close. Its handles are unref'd: a
 * watcher alone does not keep the loop alive. Everything runs on the loop thread.
 */
#ifndef ML_FSWATCH_H
#define ML_FSWATCH_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct ml_fswatch_s ml_fswatch_t;

/* Runs once per burst of changes to the watched files, on the loop thread. */
typedef void (*ml_fswatch_cb)(ml_fswatch_t *w, void *ud);

/* Creates a watcher with no file yet. Returns NULL when out of memory. */
ml_fswatch_t *ml_fswatch_new(uv_loop_t *loop, uint64_t debounce_ms, ml_fswatch_cb cb, void *ud);

/* Replaces the watched set with paths[0..n-1] (files; their directories must exist). Directories no
 * longer needed are closed, new ones are watched. Returns 0, or a negative UV_E* code (UV_ENOENT:
 * a directory is missing, UV_ENOMEM, UV_EINVAL: a path without a file name); on an error the
 * watched set is whatever could be watched, the other paths are skipped. */
int ml_fswatch_set(ml_fswatch_t *w, const char *const *paths, size_t n);

/* Number of files and of directories watched now. */
size_t ml_fswatch_count(const ml_fswatch_t *w, size_t *ndirs);

/* Stops watching: the callback never runs again. The memory goes when the close callbacks ran. */
void ml_fswatch_close(ml_fswatch_t *w);

#endif
