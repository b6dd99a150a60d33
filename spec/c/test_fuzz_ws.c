/* spec/c/test_fuzz_ws.c: fuzzes the WebSocket frame parser of core/ws.c (driver: spec/c/fuzz.h).
 *
 * An input is one configuration byte, one byte that picks how the bytes are cut, and the bytes a
 * peer sends. The configuration byte says which side parses (a server wants masked frames), whether
 * permessage-deflate was agreed (and with context takeover or not), and the message size limit.
 * The bytes are parsed three times, by three fresh parsers: whole, in pieces of 1 to 17 bytes, and
 * one byte at a time. What must hold for any input:
 * - the three parses report the same events, with the same payloads: where the input is cut never
 *   changes what it means (the parser keeps its state across calls);
 * - every call makes progress (uses bytes or reports an event), and after an error every call
 *   reports the same error;
 * - a text message is valid UTF-8, no message is longer than the limit, a close code is one that
 *   may be on the wire (or 1005: none), an error's close code is 1002, 1007 or 1009;
 * - nothing leaks or is touched out of bounds (SANITIZE=1).
 */
#include <stdlib.h>
#include <string.h>

#include "../../core/ws.h"
#include "fuzz.h"

#define MAX_EVENTS 64
#define SMALL_LIMIT 300

typedef struct {
  int type, code;
  size_t len;
  uint64_t hash; /* FNV-1a of the payload */
} event_t;

typedef struct {
  event_t ev[MAX_EVENTS];
  int n;
  int errored;
} events_t;

static uint64_t fnv1a(const char *p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++)
    h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
  return h;
}

static int utf8_ok(const char *s, size_t n) {
  uint32_t st = 0;
  return ml_utf8_check(&st, (const uint8_t *)s, n) == 0 && st == 0;
}

/* Checks one event on its own and appends it to evs. */
static void take_event(events_t *evs, const ml_ws_event_t *e, size_t limit) {
  FUZZ_CHECK(!evs->errored); /* nothing after an error but the same error */
  switch (e->type) {
  case ML_WS_EV_MESSAGE:
    FUZZ_CHECK(e->opcode == ML_WS_OP_TEXT || e->opcode == ML_WS_OP_BINARY);
    FUZZ_CHECK(e->len <= limit);
    if (e->opcode == ML_WS_OP_TEXT) FUZZ_CHECK(utf8_ok(e->data, e->len));
    break;
  case ML_WS_EV_PING:
  case ML_WS_EV_PONG: FUZZ_CHECK(e->len <= 125); break;
  case ML_WS_EV_CLOSE:
    FUZZ_CHECK(e->code == ML_WS_CLOSE_NO_STATUS || ml_ws_close_code_valid(e->code));
    FUZZ_CHECK(e->len <= 123 && utf8_ok(e->data, e->len));
    break;
  case ML_WS_EV_ERROR:
    FUZZ_CHECK(e->code == ML_WS_CLOSE_PROTOCOL || e->code == ML_WS_CLOSE_INVALID_DATA ||
               e->code == ML_WS_CLOSE_TOO_BIG);
    evs->errored = 1;
    break;
  default: FUZZ_CHECK(!"an unknown event type");
  }
  if (evs->n < MAX_EVENTS) {
    event_t *v = &evs->ev[evs->n++];
    v->type = e->type;
    v->code = e->type == ML_WS_EV_MESSAGE                              ? e->opcode
              : e->type == ML_WS_EV_CLOSE || e->type == ML_WS_EV_ERROR ? e->code
                                                                       : 0; /* else unset */
    v->len = e->len;
    v->hash = e->type == ML_WS_EV_ERROR ? 0 : fnv1a(e->data, e->len);
  }
}

/* Parses in[0..len) with a fresh parser, cut as `cut` says: 0 whole, 1 one byte at a time, else
 * pieces of 1 to 17 bytes from a small PRNG seeded with `cut`. */
static void parse_all(const uint8_t *cfg, const char *in, size_t len, unsigned cut, events_t *evs) {
  ml_ws_parser_t p;
  size_t limit = (cfg[0] & 4) ? SMALL_LIMIT : ML_WS_MAX_MESSAGE_DEFAULT;
  ml_ws_parser_init(&p, cfg[0] & 1, limit);
  if (cfg[0] & 2) {
    ml_ws_pmd_t agreed = {0, 0, 15, 15};
    agreed.server_no_context_takeover = agreed.client_no_context_takeover = (cfg[0] >> 3) & 1;
    ml_ws_deflate_t *d = ml_ws_deflate_new(&agreed, cfg[0] & 1);
    if (!FUZZ_CHECK(d != NULL)) return;
    ml_ws_parser_set_deflate(&p, d);
  }
  memset(evs, 0, sizeof *evs);
  uint32_t r = cut * 2654435761u + 1;
  size_t off = 0;
  while (off < len) {
    size_t n = len - off;
    if (cut == 1) {
      n = 1;
    } else if (cut > 1) {
      r = r * 1103515245u + 12345u;
      size_t k = 1 + (r >> 16) % 17;
      if (k < n) n = k;
    }
    const char *d = in + off;
    size_t left = n;
    while (left > 0) {
      ml_ws_event_t e;
      size_t used = ml_ws_parse(&p, d, left, &e);
      if (!FUZZ_CHECK(used <= left)) goto out;
      if (!FUZZ_CHECK(used > 0 || e.type != ML_WS_EV_NONE)) goto out; /* no progress */
      if (e.type == ML_WS_EV_NONE && !FUZZ_CHECK(used == left)) goto out;
      d += used;
      left -= used;
      if (e.type == ML_WS_EV_ERROR && evs->errored) {
        FUZZ_CHECK(left == 0); /* a dead parser uses all the input */
        continue;
      }
      if (e.type != ML_WS_EV_NONE) take_event(evs, &e, limit);
    }
    off += n;
  }
out:
  ml_ws_parser_free(&p);
}

static int events_equal(const events_t *a, const events_t *b) {
  if (a->n != b->n || a->errored != b->errored) return 0;
  for (int i = 0; i < a->n; i++)
    if (a->ev[i].type != b->ev[i].type || a->ev[i].code != b->ev[i].code ||
        a->ev[i].len != b->ev[i].len || a->ev[i].hash != b->ev[i].hash)
      return 0;
  return 1;
}

static void fuzz_one(const uint8_t *data, size_t len) {
  if (len < 2) return;
  const char *in = (const char *)data + 2;
  size_t n = len - 2;
  static events_t whole, pieces, bytes;
  parse_all(data, in, n, 0, &whole);
  parse_all(data, in, n, 2u + data[1], &pieces);
  parse_all(data, in, n, 1, &bytes);
  FUZZ_CHECK(events_equal(&whole, &pieces));
  FUZZ_CHECK(events_equal(&whole, &bytes));
}

#ifndef ML_LIBFUZZER

/* -- Seeds: frame sequences a peer may send ---------------------------------------------------- */

#define NSEEDS 8
static char seed_buf[NSEEDS][1024];
static fuzz_seed_t seeds[NSEEDS];

static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};

/* Appends a frame to seed i (after its two leading bytes). */
static void frame(int i, int fin, int rsv1, int op, const char *p, size_t n, int masked) {
  fuzz_seed_t *s = &seeds[i];
  char *b = seed_buf[i];
  size_t h = ml_ws_frame_head((uint8_t *)b + s->len, fin, rsv1, op, n, masked ? key : NULL);
  memcpy(b + s->len + h, p, n);
  if (masked) ml_ws_mask(b + s->len + h, n, key, 0);
  s->len += h + n;
}

/* A compressed message as the peer sends it: a client masks its frames. nct: no context takeover
 * was agreed. */
static void deflated(int i, const char *text, int masked, int nct) {
  ml_ws_pmd_t agreed = {nct, nct, 15, 15};
  ml_ws_deflate_t *d = ml_ws_deflate_new(&agreed, !masked);
  ml_ws_buf_t out = {0};
  if (CHECK(d != NULL) && CHECK_INT(ml_ws_deflate_message(d, text, strlen(text), &out), 0))
    frame(i, 1, 1, ML_WS_OP_TEXT, out.p, out.len, masked);
  ml_ws_buf_free(&out);
  if (d) ml_ws_deflate_free(d);
}

static void make_seeds(void) {
  static const char cfg[NSEEDS] = {1, 1, 1, 0, 3, 2, 5, 11};
  for (int i = 0; i < NSEEDS; i++) {
    seed_buf[i][0] = cfg[i];
    seed_buf[i][1] = (char)(i * 37);
    seeds[i].data = seed_buf[i];
    seeds[i].len = 2;
  }
  frame(0, 1, 0, ML_WS_OP_TEXT, "hello", 5, 1);
  frame(0, 1, 0, ML_WS_OP_CLOSE,
        "\x03\xe8"
        "bye",
        5, 1);
  frame(1, 0, 0, ML_WS_OP_TEXT, "fragm", 5, 1); /* fragments with a ping between them */
  frame(1, 1, 0, ML_WS_OP_PING, "p", 1, 1);
  frame(1, 1, 0, ML_WS_OP_CONT, "ented \xc3\xa9", 8, 1);
  frame(1, 1, 0, ML_WS_OP_BINARY, "\x00\xff\x80", 3, 1);
  static char big[700];
  memset(big, 'x', sizeof big);
  frame(2, 1, 0, ML_WS_OP_BINARY, big, 200, 1); /* 16-bit length */
  frame(2, 1, 0, ML_WS_OP_PONG, "", 0, 1);
  frame(3, 1, 0, ML_WS_OP_TEXT, "from a server", 13, 0); /* a client parses: unmasked */
  frame(3, 1, 0, ML_WS_OP_CLOSE, "", 0, 0);
  deflated(4, "compressed, compressed, compressed", 1, 0);
  frame(4, 1, 0, ML_WS_OP_TEXT, "plain", 5, 1);
  deflated(5, "from a server, compressed", 0, 0);
  frame(6, 1, 0, ML_WS_OP_BINARY, big, sizeof big, 1); /* over the small limit */
  deflated(7, "no context takeover", 1, 1);
  deflated(7, "no context takeover", 1, 1);
}

static const char *const dict[] = {
    "\x81\x85", "\x82\x7e\x01\x00", "\x88\x80",     "\x89\x80",        "\x80", "\xc1",
    "\x7f",     "\x03\xe8",         "\xed\xa0\x80", "\xf4\x90\x80\x80"};

int main(void) {
  ctest_section("WebSocket frame parser, fuzzed");
  make_seeds();
  fuzz_main("ws", seeds, NSEEDS, dict, sizeof dict / sizeof dict[0], 20000);
  return ctest_end();
}

#endif
