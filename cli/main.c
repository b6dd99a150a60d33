/* cli/main.c: the `moonlet` command, a thin host of libmoonlet: one instance on its own loop, with
 * signal handling on; everything else (flags, scripts, apps, `moonlet test`) is moonlet_main's.
 */
#include "../core/moonlet.h"

int main(int argc, char **argv) {
  moonlet_config_t cfg;
  moonlet_config_default(&cfg);
  cfg.handle_signals = 1;
  moonlet_t *m = moonlet_new(&cfg);
  if (!m) return 70;
  int code = moonlet_main(m, argc, argv);
  if (code == 0) code = moonlet_run(m);
  moonlet_free(m);
  return code;
}
