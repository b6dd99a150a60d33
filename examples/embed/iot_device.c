/* examples/embed/iot_device.c: a device-like host of libmoonlet. The device has its own select()
 * main loop, as firmware does; moonlet joins it through its backend fd and timeout (mode 4 of
 * core/moonlet.h): the fd goes in the read set, the timeout caps select's, and after every wake-up
 * the loop calls moonlet_step(m, 0). A C "sensor" produces a reading on each tick of the device's
 * own timer; the Lua app, compiled into the binary as a string (no file system needed), serves the
 * readings (GET /readings) and takes a new configuration (PUT /config) through the host module
 * "device".
 *
 *   iot_device [--port N]      0 (the default) picks a free port; SIGTERM/SIGINT end it
 *
 * Ownership: the device state is the host's; Lua reaches it through moonlet_userdata. One thread;
 * the signal handler only sets a flag (select returns EINTR).
 */
#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <time.h>

#include "../../core/moonlet.h"

#define RING 64 /* readings kept */

/* The app, compiled in. */
static const char APP[] =
    "local moonlet = require 'moonlet'\n"
    "local device = require 'device'\n"
    "local json = moonlet.json\n"
    "local app = moonlet.app()\n"
    "app:get('/readings', function()\n"
    "    return { readings = json.array(device.readings()), config = device.config() }\n"
    "end)\n"
    "app:get('/config', function() return device.config() end)\n"
    "app:put('/config', function(req)\n"
    "    local c = json.decode(req:body())\n"
    "    if type(c) ~= 'table' then\n"
    "        return 400, { error = 'the body is a JSON object: {\"interval_ms\": 100, \"offset\": "
    "0}' }\n"
    "    end\n"
    "    local cfg, err = device.configure(c.interval_ms, c.offset)\n"
    "    if not cfg then return 422, { error = err } end\n"
    "    return cfg\n"
    "end)\n"
    "return app\n";

typedef struct {
  unsigned seq; /* reading number, from 1 */
  double t;     /* seconds since the device started */
  double value; /* degrees Celsius */
} reading_t;

typedef struct {
  reading_t ring[RING];
  unsigned head, count; /* next slot, readings held */
  unsigned seq;
  unsigned interval_ms;   /* configuration: the sensor's period */
  double offset;          /* configuration: calibration added to each reading */
  double start, next_due; /* monotonic seconds */
  unsigned seed;
} device_t;

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
  (void)sig;
  stop_flag = 1;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The "sensor": a slow sine around 21 degrees plus a little noise, plus the calibration offset. */
static void sensor_sample(device_t *d, double now) {
  double t = now - d->start;
  double noise = ((double)(rand_r(&d->seed) % 1000) / 1000.0 - 0.5) * 0.2;
  reading_t *r = &d->ring[d->head];
  r->seq = ++d->seq;
  r->t = t;
  r->value = 21.0 + 2.0 * sin(t / 10.0) + noise + d->offset;
  d->head = (d->head + 1) % RING;
  if (d->count < RING) d->count++;
  d->next_due += d->interval_ms / 1000.0;
  if (d->next_due < now) d->next_due = now + d->interval_ms / 1000.0;
}

/* -- The host module "device" ------------------------------------------------------------------ */

static device_t *device_of(lua_State *L) { return moonlet_userdata(moonlet_from_lua(L)); }

static void push_config(lua_State *L, const device_t *d) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, d->interval_ms);
  lua_setfield(L, -2, "interval_ms");
  lua_pushnumber(L, d->offset);
  lua_setfield(L, -2, "offset");
}

/* syntax: list = device.readings() -- oldest first: { { seq, t, value }, ... } */
static int dev_readings(lua_State *L) {
  device_t *d = device_of(L);
  lua_createtable(L, (int)d->count, 0);
  for (unsigned i = 0; i < d->count; i++) {
    const reading_t *r = &d->ring[(d->head + RING - d->count + i) % RING];
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, r->seq);
    lua_setfield(L, -2, "seq");
    lua_pushnumber(L, r->t);
    lua_setfield(L, -2, "t");
    lua_pushnumber(L, r->value);
    lua_setfield(L, -2, "value");
    lua_rawseti(L, -2, (int)i + 1);
  }
  return 1;
}

/* syntax: cfg = device.config() -- { interval_ms, offset } */
static int dev_config(lua_State *L) {
  push_config(L, device_of(L));
  return 1;
}

/* syntax: cfg, err = device.configure(interval_ms, offset) -- nil keeps a value; takes effect at
 * the next reading */
static int dev_configure(lua_State *L) {
  device_t *d = device_of(L);
  if (!lua_isnil(L, 1)) {
    lua_Number ms = lua_tonumber(L, 1);
    if (!lua_isnumber(L, 1) || ms < 10 || ms > 60000) {
      lua_pushnil(L);
      lua_pushliteral(L, "interval_ms: a number from 10 to 60000");
      return 2;
    }
    d->interval_ms = (unsigned)ms;
    d->next_due = now_s() + d->interval_ms / 1000.0;
  }
  if (!lua_isnil(L, 2)) {
    if (!lua_isnumber(L, 2)) {
      lua_pushnil(L);
      lua_pushliteral(L, "offset: a number");
      return 2;
    }
    d->offset = lua_tonumber(L, 2);
  }
  push_config(L, d);
  return 1;
}

static int luaopen_device(lua_State *L) {
  static const luaL_Reg fns[] = {{"readings", dev_readings},
                                 {"config", dev_config},
                                 {"configure", dev_configure},
                                 {NULL, NULL}};
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  return 1;
}

/* -- Main loop --------------------------------------------------------------------------------- */

static long rss_kib(void) { /* resident set size now, from /proc/self/statm */
  long pages = 0, rss = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
    fclose(f);
  }
  return rss * 4;
}

int main(int argc, char **argv) {
  int port = 0;
  for (int i = 1; i + 1 < argc; i += 2)
    if (strcmp(argv[i], "--port") == 0) port = atoi(argv[i + 1]);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  static device_t dev;
  dev.interval_ms = 100;
  dev.seed = 42;
  dev.start = dev.next_due = now_s();
  moonlet_config_t cfg;
  moonlet_config_default(&cfg);
  cfg.userdata = &dev;
  cfg.limits.max_body = 1024;
  cfg.limits.max_conns = 16; /* a small device */
  moonlet_t *m = moonlet_new(&cfg);
  if (!m) return 70;
  moonlet_register(m, "device", luaopen_device);
  int r = moonlet_load_string(m, "iot_app", APP);
  int bound = r == 0 ? moonlet_listen(m, "127.0.0.1", port) : r;
  if (bound < 0) {
    fprintf(stderr, "iot_device: cannot start: %s\n", uv_strerror(bound));
    moonlet_free(m);
    return 1;
  }
  printf("iot_device: serving on http://127.0.0.1:%d (RSS %ld KiB)\n", bound, rss_kib());
  fflush(stdout);

  unsigned wakeups = 0;
  while (!stop_flag) {
    int fd = moonlet_backend_fd(m);
    fd_set rd;
    FD_ZERO(&rd);
    FD_SET(fd, &rd);
    double wait = dev.next_due - now_s(); /* the device's own timer */
    if (wait < 0) wait = 0;
    int mt = moonlet_backend_timeout(m); /* -1: moonlet has no timer */
    if (mt >= 0 && mt / 1000.0 < wait) wait = mt / 1000.0;
    struct timeval tv = {(time_t)wait, (suseconds_t)((wait - (double)(time_t)wait) * 1e6)};
    if (select(fd + 1, &rd, NULL, NULL, &tv) < 0 && errno != EINTR) break;
    double now = now_s();
    if (now >= dev.next_due) sensor_sample(&dev, now);
    moonlet_step(m, 0); /* whatever woke us: the fd, moonlet's timers, or the sensor's */
    wakeups++;
  }

  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("iot_device: %u readings, %u wake-ups, RSS now %ld KiB, peak %ld KiB\n", dev.seq, wakeups,
         rss_kib(), ru.ru_maxrss);
  fflush(stdout);
  moonlet_stop(m);
  for (int i = 0; i < 200 && moonlet_step(m, 10); i++) {
  }
  moonlet_free(m);
  return 0;
}
