/* core/sig_guard.h: a second SIGINT or SIGTERM ends a process whose loop does not run.
 *
 * The loop hears a signal through libuv (uv_signal_t), so a loop kept busy by a handler that
 * never yields (`while true do end`, a compiled LuaJIT loop no hook reaches) hears none: Ctrl-C
 * did nothing. ml_sig_guard_install wraps libuv's handler of a signal: a signal that comes while
 * the one before it is still unheard by any loop (ml_sig_guard_heard resets that) ends the process
 * at once with the signal's default action, after a line on stderr. A loop that runs hears every
 * signal as before. A signal's disposition belongs to the process, so this is the one piece of
 * process-wide state in core/: it holds nothing of an instance.
 */
#ifndef ML_SIG_GUARD_H
#define ML_SIG_GUARD_H

/* After uv_signal_start(signum) (SIGINT or SIGTERM): 0, or a negative errno-style code. Wrapping
 * twice is harmless; libuv's handler, put back when its last watcher of signum stops and starts
 * again, is wrapped again by the next call. */
int ml_sig_guard_install(int signum);
/* A loop took a SIGINT or SIGTERM (its watcher's callback ran). */
void ml_sig_guard_heard(void);

#endif
