/* spec/c/test_ws.c: the WebSocket protocol engine of core/ws.c without any socket: the UTF-8
 * validator on the classic edge cases, frames fed whole and one byte at a time, masks, fragments
 * with control frames between them, limits and protocol errors with their close codes, the
 * handshake key of RFC 6455's example, and permessage-deflate negotiation and round trips.
 */
#include <stdlib.h>
#include <string.h>

#include "../../core/ws.h"
#include "ctest.h"

static int utf8_ok(const char *s, size_t n) {
  uint32_t st = 0;
  return ml_utf8_check(&st, (const uint8_t *)s, n) == 0 && st == 0;
}

/* A client frame (masked with a fixed key unless mask is 0) appended to out. */
static void put_frame(ml_ws_buf_t *out, int fin, int rsv1, int op, const char *p, size_t n,
                      int mask) {
  static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
  ml_ws_buf_reserve(out, n + 14);
  size_t h = ml_ws_frame_head((uint8_t *)out->p + out->len, fin, rsv1, op, n, mask ? key : NULL);
  out->len += h;
  memcpy(out->p + out->len, p, n);
  if (mask) ml_ws_mask(out->p + out->len, n, key, 0);
  out->len += n;
}

typedef struct {
  int types[16], codes[16];
  char data[16][64];
  size_t lens[16];
  int n;
} events_t;

/* Feeds in[0..len) in pieces of `step` bytes (0: whole), collecting events. */
static void feed(ml_ws_parser_t *p, const char *in, size_t len, size_t step, events_t *ev) {
  memset(ev, 0, sizeof *ev);
  size_t off = 0;
  while (off < len) {
    size_t n = step && len - off > step ? step : len - off;
    const char *d = in + off;
    size_t left = n;
    while (left > 0) {
      ml_ws_event_t e;
      size_t used = ml_ws_parse(p, d, left, &e);
      d += used;
      left -= used;
      if (e.type != ML_WS_EV_NONE && ev->n < 16) {
        ev->types[ev->n] = e.type;
        ev->codes[ev->n] = e.type == ML_WS_EV_MESSAGE ? e.opcode : e.code;
        ev->lens[ev->n] = e.len;
        memcpy(ev->data[ev->n], e.data, e.len < 63 ? e.len : 63);
        ev->n++;
      }
      if (e.type == ML_WS_EV_ERROR) return;
    }
    off += n;
  }
}

static int parse_error(const char *in, size_t len, size_t max) {
  ml_ws_parser_t p;
  ml_ws_parser_init(&p, 1, max);
  events_t ev;
  feed(&p, in, len, 0, &ev);
  ml_ws_parser_free(&p);
  return ev.n && ev.types[ev.n - 1] == ML_WS_EV_ERROR ? ev.codes[ev.n - 1] : 0;
}

int main(void) {
  ctest_section("UTF-8: valid text, overlongs, surrogates, past U+10FFFF, truncation, split");
  CHECK(utf8_ok("", 0));
  CHECK(utf8_ok("plain ascii that is longer than eight bytes", 43));
  CHECK(utf8_ok("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9)); /* é € 😀 */
  CHECK(utf8_ok("\xf4\x8f\xbf\xbf", 4));                     /* U+10FFFF */
  CHECK(!utf8_ok("\xc0\x80", 2));                            /* overlong NUL */
  CHECK(!utf8_ok("\xe0\x80\xaf", 3));                        /* overlong / */
  CHECK(!utf8_ok("\xed\xa0\x80", 3));                        /* surrogate */
  CHECK(!utf8_ok("\xf4\x90\x80\x80", 4));                    /* past U+10FFFF */
  CHECK(!utf8_ok("\xff", 1));
  CHECK(!utf8_ok("\xe2\x82", 2)); /* truncated: valid so far, incomplete */
  uint32_t st = 0;
  CHECK_INT(ml_utf8_check(&st, (const uint8_t *)"\xe2", 1), 0);
  CHECK_INT(ml_utf8_check(&st, (const uint8_t *)"\x82\xac", 2), 0);
  CHECK_INT(st, 0);

  ctest_section("handshake: the accept key of RFC 6455 section 1.3, key checks, fresh keys");
  char acc[29];
  ml_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, acc);
  CHECK_STR(acc, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  CHECK(ml_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ==", 24));
  CHECK(!ml_ws_key_valid("dGhlIHNhbXBsZSBub25jZQ=", 23));
  CHECK(!ml_ws_key_valid("dGhlIHNhbXBsZSBub25jZ!==", 24));
  char k1[25], k2[25];
  CHECK_INT(ml_ws_make_key(k1), 0);
  CHECK_INT(ml_ws_make_key(k2), 0);
  CHECK(ml_ws_key_valid(k1, strlen(k1)) && strcmp(k1, k2) != 0);

  ctest_section("frames: whole and one byte at a time; fragments with a ping between");
  ml_ws_buf_t in = {0};
  put_frame(&in, 0, 0, ML_WS_OP_TEXT, "Hel", 3, 1);
  put_frame(&in, 1, 0, ML_WS_OP_PING, "pi", 2, 1);
  put_frame(&in, 0, 0, ML_WS_OP_CONT, "lo ", 3, 1);
  put_frame(&in, 1, 0, ML_WS_OP_CONT, "\xe2\x82\xac", 3, 1);
  put_frame(&in, 1, 0, ML_WS_OP_BINARY, "", 0, 1);
  put_frame(&in, 1, 0, ML_WS_OP_CLOSE,
            "\x03\xe8"
            "bye",
            5, 1);
  for (size_t step = 0; step <= 1; step++) {
    ml_ws_parser_t p;
    ml_ws_parser_init(&p, 1, 0);
    events_t ev;
    feed(&p, in.p, in.len, step, &ev);
    CHECK_INT(ev.n, 4);
    CHECK_INT(ev.types[0], ML_WS_EV_PING);
    CHECK_STR(ev.data[0], "pi");
    CHECK_INT(ev.types[1], ML_WS_EV_MESSAGE);
    CHECK_INT(ev.codes[1], ML_WS_OP_TEXT);
    CHECK_STR(ev.data[1], "Hello \xe2\x82\xac");
    CHECK_INT(ev.types[2], ML_WS_EV_MESSAGE);
    CHECK_INT(ev.lens[2], 0);
    CHECK_INT(ev.types[3], ML_WS_EV_CLOSE);
    CHECK_INT(ev.codes[3], 1000);
    CHECK_STR(ev.data[3], "bye");
    ml_ws_parser_free(&p);
  }
  ml_ws_buf_free(&in);

  ctest_section("frame heads: 7-, 16- and 64-bit lengths round trip");
  const uint64_t lens[] = {0, 125, 126, 65535, 65536, 1u << 20};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    size_t n = (size_t)lens[i];
    char *payload = malloc(n ? n : 1);
    memset(payload, 'a' + (int)i, n);
    ml_ws_buf_t f = {0};
    CHECK_INT(ml_ws_encode(&f, ML_WS_OP_BINARY, 0, payload, n, NULL), 0);
    ml_ws_parser_t p;
    ml_ws_parser_init(&p, 0, 2u << 20); /* a client reads unmasked frames */
    ml_ws_event_t e;
    size_t used = ml_ws_parse(&p, f.p, f.len, &e);
    CHECK_INT(used, f.len);
    CHECK_INT(e.type, ML_WS_EV_MESSAGE);
    CHECK_INT(e.len, n);
    CHECK(e.len == n && memcmp(e.data, payload, n) == 0);
    ml_ws_parser_free(&p);
    ml_ws_buf_free(&f);
    free(payload);
  }

  ctest_section("protocol errors and limits become close codes");
  ml_ws_buf_t b = {0};
  put_frame(&b, 1, 0, ML_WS_OP_TEXT, "x", 1, 0);
  CHECK_INT(parse_error(b.p, b.len, 0), 1002); /* unmasked from a client */
  b.len = 0;
  put_frame(&b, 1, 0, 3, "x", 1, 1);
  CHECK_INT(parse_error(b.p, b.len, 0), 1002); /* unknown opcode */
  b.len = 0;
  put_frame(&b, 1, 1, ML_WS_OP_TEXT, "x", 1, 1);
  CHECK_INT(parse_error(b.p, b.len, 0), 1002); /* RSV1 without deflate */
  b.len = 0;
  put_frame(&b, 0, 0, ML_WS_OP_PING, "x", 1, 1);
  CHECK_INT(parse_error(b.p, b.len, 0), 1002); /* fragmented control frame */
  b.len = 0;
  put_frame(&b, 1, 0, ML_WS_OP_CONT, "x", 1, 1);
  CHECK_INT(parse_error(b.p, b.len, 0), 1002); /* continuation without a message */
  b.len = 0;
  put_frame(&b, 1, 0, ML_WS_OP_CLOSE, "\x03\xed", 2, 1);
  CHECK_INT(parse_error(b.p, b.len, 0), 1002); /* close code 1005 may not be sent */
  b.len = 0;
  put_frame(&b, 1, 0, ML_WS_OP_TEXT, "\xc0\x80", 2, 1);
  CHECK_INT(parse_error(b.p, b.len, 0), 1007);
  b.len = 0;
  put_frame(&b, 1, 0, ML_WS_OP_BINARY, "0123456789", 10, 1);
  CHECK_INT(parse_error(b.p, b.len, 9), 1009);
  CHECK_INT(parse_error(b.p, b.len, 10), 0);
  ml_ws_buf_free(&b);
  CHECK(ml_ws_close_code_valid(1000) && ml_ws_close_code_valid(4999));
  CHECK(!ml_ws_close_code_valid(1006) && !ml_ws_close_code_valid(2000));

  ctest_section("permessage-deflate: negotiation and a compressed round trip");
  ml_ws_pmd_t want = {0}, agreed;
  char resp[256];
  const char *offer = "x-foo, permessage-deflate; server_max_window_bits=8, "
                      "permessage-deflate; client_max_window_bits; server_no_context_takeover";
  CHECK_INT(ml_ws_pmd_negotiate(offer, strlen(offer), &want, &agreed, resp, sizeof resp), 1);
  CHECK_STR(resp, "permessage-deflate; server_no_context_takeover");
  CHECK_INT(agreed.server_no_context_takeover, 1);
  const char *bad = "permessage-deflate; unknown_param";
  CHECK_INT(ml_ws_pmd_negotiate(bad, strlen(bad), &want, &agreed, resp, sizeof resp), 0);
  ml_ws_pmd_t cl;
  const char *answer = "permessage-deflate; client_max_window_bits=12";
  ml_ws_pmd_t offered = {0};
  CHECK_INT(ml_ws_pmd_response(answer, strlen(answer), &offered, &cl), 1);
  CHECK_INT(cl.client_max_window_bits, 12);
  ml_ws_deflate_t *sd = ml_ws_deflate_new(&agreed, 1);
  ml_ws_buf_t z = {0}, fr = {0};
  const char *text = "compress me compress me compress me compress me compress me";
  CHECK_INT(ml_ws_deflate_message(sd, text, strlen(text), &z), 0);
  CHECK(z.len < strlen(text));
  put_frame(&fr, 1, 1, ML_WS_OP_TEXT, z.p, z.len, 0);
  ml_ws_parser_t cp;
  ml_ws_parser_init(&cp, 0, 0);
  ml_ws_parser_set_deflate(&cp, ml_ws_deflate_new(&agreed, 0));
  ml_ws_event_t e;
  ml_ws_parse(&cp, fr.p, fr.len, &e);
  CHECK_INT(e.type, ML_WS_EV_MESSAGE);
  CHECK(e.len == strlen(text) && memcmp(e.data, text, e.len) == 0);
  ml_ws_parser_free(&cp);
  ml_ws_deflate_free(sd);
  ml_ws_buf_free(&z);
  ml_ws_buf_free(&fr);
  return ctest_end();
}
