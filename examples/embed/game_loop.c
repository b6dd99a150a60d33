/* examples/embed/game_loop.c: a game-like host of libmoonlet. A 60 Hz fixed-step simulation moves
 * entities in a 100 x 100 box; moonlet lives inside the frame loop: after each tick the frame's
 * leftover time goes to moonlet_step (mode 3 of core/moonlet.h), so serving clients happens in the
 * time the frame would have slept anyway. The Lua app next to this file (game_loop.lua) serves the
 * world as JSON (GET /world) and over a WebSocket (/live: the state pushed 10 times a second, spawn
 * commands taken as messages), and queues spawns (POST /spawn, or a /live message) through the host
 * module "game", which the C side applies at its next tick. A slow WebSocket client never stalls a
 * frame: the app drops it when it falls behind, and the send timeout below ends its connection.
 * At exit it prints the frame-time statistics.
 *
 *   game_loop [--port N] [--frames N] [--app FILE]
 *     --port 0 (the default) picks a free port; --frames 0 (the default) runs until SIGTERM/SIGINT;
 *     SIGHUP reloads the app (moonlet_reload): gameplay scripts change while the game runs.
 *
 * Ownership: the world is the host's (main's stack frame outlives the instance); Lua reaches it
 * through moonlet_userdata. Single-threaded: the signal handlers only set flags.
 */
#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../core/moonlet.h"

#ifndef EXAMPLES_DIR
#define EXAMPLES_DIR "examples/embed"
#endif

#define TICK_HZ 60
#define BOX 100.0
#define MAX_ENTITIES 1024
#define MAX_SPAWNS 64
/* frame periods in 0.05 ms steps, up to 50 ms; the last bucket holds the longer ones */
#define HIST_BUCKETS 1000
#define HIST_STEP 0.05e-3

typedef struct {
  int id;
  double x, y, vx, vy; /* box units, box units per second */
} entity_t;

typedef struct {
  entity_t e[MAX_ENTITIES];
  int n;
  entity_t spawns[MAX_SPAWNS]; /* queued by Lua (game.spawn), applied at the next tick */
  int nspawns;
  int next_id;
  uint64_t frame; /* ticks done */
  double time;    /* simulated seconds */
} world_t;

static volatile sig_atomic_t stop_flag, hup_flag;

static void on_signal(int sig) {
  if (sig == SIGHUP)
    hup_flag = 1;
  else
    stop_flag = 1;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* -- The simulation ---------------------------------------------------------------------------- */

static double clamp(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; }

static void world_tick(world_t *w, double dt) {
  for (int i = 0; i < w->nspawns && w->n < MAX_ENTITIES; i++)
    w->e[w->n++] = w->spawns[i];
  w->nspawns = 0;
  for (int i = 0; i < w->n; i++) {
    entity_t *e = &w->e[i];
    e->x += e->vx * dt;
    e->y += e->vy * dt;
    if (e->x < 0 || e->x > BOX) e->vx = -e->vx; /* bounce off the walls */
    if (e->y < 0 || e->y > BOX) e->vy = -e->vy;
    e->x = clamp(e->x, 0, BOX);
    e->y = clamp(e->y, 0, BOX);
  }
  w->frame++;
  w->time += dt;
}

/* -- The host module "game" -------------------------------------------------------------------- */

static world_t *world_of(lua_State *L) { return moonlet_userdata(moonlet_from_lua(L)); }

/* syntax: w = game.world() -- { frame, time, entities = { { id, x, y, vx, vy }, ... } } */
static int game_world(lua_State *L) {
  world_t *w = world_of(L);
  lua_createtable(L, 0, 3);
  lua_pushnumber(L, (double)w->frame);
  lua_setfield(L, -2, "frame");
  lua_pushnumber(L, w->time);
  lua_setfield(L, -2, "time");
  lua_createtable(L, w->n, 0);
  for (int i = 0; i < w->n; i++) {
    const entity_t *e = &w->e[i];
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, e->id);
    lua_setfield(L, -2, "id");
    lua_pushnumber(L, e->x);
    lua_setfield(L, -2, "x");
    lua_pushnumber(L, e->y);
    lua_setfield(L, -2, "y");
    lua_pushnumber(L, e->vx);
    lua_setfield(L, -2, "vx");
    lua_pushnumber(L, e->vy);
    lua_setfield(L, -2, "vy");
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "entities");
  return 1;
}

/* syntax: id, err = game.spawn(x, y, vx, vy) -- queued for the next tick; nil, "full" */
static int game_spawn(lua_State *L) {
  world_t *w = world_of(L);
  entity_t e = {0, clamp(luaL_checknumber(L, 1), 0, BOX), clamp(luaL_checknumber(L, 2), 0, BOX),
                luaL_optnumber(L, 3, 0), luaL_optnumber(L, 4, 0)};
  if (w->nspawns == MAX_SPAWNS || w->n + w->nspawns >= MAX_ENTITIES) {
    lua_pushnil(L);
    lua_pushliteral(L, "full");
    return 2;
  }
  e.id = ++w->next_id;
  w->spawns[w->nspawns++] = e;
  lua_pushinteger(L, e.id);
  return 1;
}

/* syntax: n = game.frame() */
static int game_frame(lua_State *L) {
  lua_pushnumber(L, (double)world_of(L)->frame);
  return 1;
}

static int luaopen_game(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"world", game_world}, {"spawn", game_spawn}, {"frame", game_frame}, {NULL, NULL}};
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  return 1;
}

/* -- Frame statistics -------------------------------------------------------------------------- */

typedef struct {
  unsigned hist[HIST_BUCKETS];
  double sum, min, max; /* frame periods, seconds */
  unsigned n;
  double work_sum, work_max; /* time of the tick itself */
  unsigned late;             /* frames that started more than 2 ms after their time */
} stats_t;

static void stats_period(stats_t *s, double p) {
  unsigned b = (unsigned)(p / HIST_STEP);
  s->hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1]++;
  if (s->n == 0 || p < s->min) s->min = p;
  if (p > s->max) s->max = p;
  s->sum += p;
  s->n++;
}

static double stats_p99(const stats_t *s) {
  unsigned want = s->n - s->n / 100, seen = 0;
  for (unsigned b = 0; b < HIST_BUCKETS; b++) {
    seen += s->hist[b];
    if (seen >= want) return (b + 1) * HIST_STEP;
  }
  return s->max;
}

/* -- Main -------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
  int port = 0;
  long frames = 0;
  const char *app = EXAMPLES_DIR "/game_loop.lua";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--port") == 0)
      port = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--frames") == 0)
      frames = atol(argv[i + 1]);
    else if (strcmp(argv[i], "--app") == 0)
      app = argv[i + 1];
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  signal(SIGPIPE, SIG_IGN); /* handle_signals is 0: the host's job */

  static world_t world; /* 40 KiB: static rather than on the stack */
  stats_t *st = calloc(1, sizeof *st);
  moonlet_config_t cfg;
  moonlet_config_default(&cfg);
  cfg.userdata = &world;
  cfg.limits.max_body = 4096; /* spawn commands are small */
  /* a client that reads nothing for 5 s is closed (60 s by default): a stalled /live client holds
   * its socket's buffers until then, never more (game_loop.lua bounds what is queued for it) */
  cfg.limits.send_timeout_ms = 5000;
  moonlet_t *m = st ? moonlet_new(&cfg) : NULL;
  if (!m) return 70;
  moonlet_register(m, "game", luaopen_game);
  int r = moonlet_load_file(m, app);
  if (r != 0) {
    fprintf(stderr, "game_loop: cannot load %s (%s)\n", app, r < 0 ? uv_strerror(r) : "no app");
    moonlet_free(m);
    free(st);
    return 1;
  }
  port = moonlet_listen(m, "127.0.0.1", port);
  if (port < 0) {
    fprintf(stderr, "game_loop: cannot listen: %s\n", uv_strerror(port));
    moonlet_free(m);
    free(st);
    return 1;
  }
  printf("game_loop: serving the world on http://127.0.0.1:%d (%d Hz), live on "
         "ws://127.0.0.1:%d/live\n",
         port, TICK_HZ, port);
  fflush(stdout);

  const double dt = 1.0 / TICK_HZ;
  double next = now_s(), last_start = 0;
  while (!stop_flag && (frames == 0 || (long)world.frame < frames)) {
    double start = now_s();
    if (world.frame > 0) stats_period(st, start - last_start);
    if (start - next > 0.002) st->late++;
    last_start = start;
    if (hup_flag) {
      hup_flag = 0;
      moonlet_reload(m);
    }
    world_tick(&world, dt);
    double work = now_s() - start;
    st->work_sum += work;
    if (work > st->work_max) st->work_max = work;
    next += dt;
    for (;;) { /* the frame's leftover time goes to moonlet */
      double left = next - now_s();
      if (left <= 0) break;
      if (left >= 1e-3) {
        moonlet_step(m, (int)(left * 1000.0));
      } else { /* under a millisecond: poll() cannot wait that precisely */
        moonlet_step(m, 0);
        struct timespec ts = {0, (long)(left * 1e9)};
        nanosleep(&ts, NULL);
        break;
      }
    }
    if (now_s() - next > 0.25)
      next = now_s(); /* suspended for a while: no burst of catch-up frames */
  }

  printf("game_loop: %llu frames at %d Hz; frame period ms: avg %.3f min %.3f max %.3f p99 %.3f; "
         "tick ms: avg %.4f max %.4f; late frames (> 2 ms): %u; entities: %d\n",
         (unsigned long long)world.frame, TICK_HZ, st->n ? st->sum / st->n * 1e3 : 0, st->min * 1e3,
         st->max * 1e3, stats_p99(st) * 1e3,
         world.frame ? st->work_sum / (double)world.frame * 1e3 : 0, st->work_max * 1e3, st->late,
         world.n);
  fflush(stdout);
  moonlet_stop(m); /* graceful: requests in flight finish, for at most 2 s */
  for (int i = 0; i < 200 && moonlet_step(m, 10); i++) {
  }
  moonlet_free(m);
  free(st);
  return 0;
}
