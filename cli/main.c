/* cli/main.c: the `moonlet` command, a thin host of libmoonlet: one instance on its own loop, with
 * signal handling on; everything else (flags, scripts, apps, `moonlet test`) is moonlet_main's.
 *
 * Under AddressSanitizer (`make test SANITIZE=1`) the Lua state allocates through malloc instead
 * of LuaJIT's own allocator, so that a C binding writing past a userdata, or into one the GC has
 * freed, is reported where it happens instead of corrupting LuaJIT's heap unseen.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "../core/moonlet.h"

#if defined(__SANITIZE_ADDRESS__)
static void *malloc_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  return realloc(ptr, nsize);
}
#endif

/* Started with stdin, stdout or stderr closed (`2>&-`, some daemonisers), the process would give
 * that number to the next file or socket it opens, and a log line would go to an HTTP client:
 * /dev/null holds the place instead, as nginx and most daemons do. */
static void hold_std_fds(void) {
  for (int fd = 0; fd <= 2; fd++)
    if (fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
      int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
      if (n >= 0 && n != fd) close(n); /* (the lowest free number: fd itself) */
    }
}

int main(int argc, char **argv) {
  hold_std_fds();
  moonlet_config_t cfg;
  moonlet_config_default(&cfg);
  cfg.handle_signals = 1;
#if defined(__SANITIZE_ADDRESS__)
  if (!getenv("MOONLET_LUAJIT_ALLOC")) cfg.alloc = malloc_alloc;
#endif
  moonlet_t *m = moonlet_new(&cfg);
  if (!m) return 70;
  int code = moonlet_main(m, argc, argv);
  if (code == 0) code = moonlet_run(m);
  moonlet_free(m);
  return code;
}
