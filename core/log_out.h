/* core/log_out.h: where the access log is written when no host sink takes its lines (stdout, or a
 * file of `moonlet --access-log=FILE`), and the error log's file (`--error-log FILE`).
 *
 * An output buffers whole lines and writes them with one write(2) when the buffer is full and
 * when ml_log_out_flush is called, which each HTTP server does once per loop iteration, last in
 * its prepare callback, before the loop waits (core/http_server.c): no line waits while the
 * process sleeps, and a busy server writes its lines in blocks instead of one system call a
 * request. What is left when the instance ends is written by ml_log_out_free. The workers of
 * `--workers N` share the output and never tear each other's lines: a file is opened with O_APPEND
 * and each write holds whole lines; a pipe or a socket (stdout under journald or `| tee`) is
 * written in pieces of at most PIPE_BUF bytes cut after a newline, which the kernel keeps whole (a
 * single line longer than PIPE_BUF, which only a huge request can make, goes alone). When a reader
 * stops reading for a second, the lines not yet written are dropped, whole. Reopening (SIGUSR1,
 * after logrotate moved the file) opens the path again; the lines buffered until then go to the old
 * file.
 *
 * The loop thread is the only user of an output.
 */
#ifndef ML_LOG_OUT_H
#define ML_LOG_OUT_H

#include <stddef.h>
#include <time.h>

#define ML_LOG_OUT_BUF (32 * 1024)
#define ML_LOG_OUT_LINE 8192 /* room a line may take; a longer one is cut */

/* The time of the last line, formatted, for the next lines of the same second. */
typedef struct ml_log_stamp_s {
  time_t at;
  char local[32]; /* "28/Nov/2026:04:31:50 +0000", as nginx's $time_local */
  char iso[32];   /* "2026-11-28T04:31:50+00:00", as $time_iso8601 */
} ml_log_stamp_t;

typedef struct ml_log_out_s {
  int fd;     /* 1 (stdout), or the file opened by ml_log_out_open */
  int atomic; /* 1: a regular file (O_APPEND: any write is whole); 0: a pipe or socket (PIPE_BUF) */
  char *path; /* the file's path (owned), for ml_log_out_reopen; NULL for stdout */
  size_t len; /* bytes in buf */
  ml_log_stamp_t stamp;
  char buf[ML_LOG_OUT_BUF];
} ml_log_out_t;

/* Makes an output to path (opened for appending, created 0644 when missing), or to stdout when path
 * is NULL or "-". Returns 0 and *out, or a negative libuv-style errno code (-ENOENT, -EACCES, ...)
 * when the file cannot be opened, or -ENOMEM. */
int ml_log_out_open(ml_log_out_t **out, const char *path);
/* A line of at least ML_LOG_OUT_LINE bytes to write into at ml_log_out_tail; ml_log_out_commit
 * then adds the n bytes written there (a newline included) to the buffer. */
char *ml_log_out_tail(ml_log_out_t *out);
void ml_log_out_commit(ml_log_out_t *out, size_t n);
/* Writes what is buffered. A write that fails (a full disk, a closed pipe) drops those lines. */
void ml_log_out_flush(ml_log_out_t *out);
/* Opens the file's path again (after logrotate moved it); the buffered lines go to the old file
 * first. 0, or a negative errno code (the output keeps writing to the old file then). A stdout
 * output has nothing to reopen: 0. */
int ml_log_out_reopen(ml_log_out_t *out);
/* Flushes, closes the file and frees the output (NULL: nothing). */
void ml_log_out_free(ml_log_out_t *out);
/* Sets *st to now when the second changed since it was last set (zeroed: never). */
void ml_log_stamp(ml_log_stamp_t *st);
/* Writes all of p to fd, waiting while a non-blocking pipe is full; 0 or a negative errno code. */
int ml_log_write_all(int fd, const char *p, size_t n);

/* The error log in a file: makes file descriptor 2 (stderr) the file at path (appending, created
 * 0644), as nginx's error_log does, so that what libraries and a crash print there goes to it too.
 * A process-wide change: for the command line, not for a host embedding moonlet. 0 or a negative
 * errno code (stderr unchanged then). Called again with the same path, it reopens the file. */
int ml_log_redirect_stderr(const char *path);

#endif
