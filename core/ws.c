/* core/ws.c: the WebSocket protocol without I/O (see core/ws.h): the incremental frame parser and
 * message reassembly, frame encoding, handshake keys (SHA-1 and base64 from libcrypto), the UTF-8
 * validator, and permessage-deflate (zlib).
 *
 * Invariants:
 * - The parser never allocates more than max_message (+ the 4-byte deflate tail) for one message:
 *   a frame whose length would pass it is refused from its head (1009), before its payload.
 * - A protocol error is final: the parser answers every later call with the same error, so a
 *   caller that goes on feeding it bytes cannot be tricked into reading a frame after a bad one.
 * - Event data points into the parser's buffers until the next ml_ws_parse call.
 */
#include "ws.h"

#include "openssl_api.h"
#include "zlib_api.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define KEEP_BUF_MAX (64 * 1024) /* message buffers above this are freed between messages */

enum { ST_HEAD = 0, ST_PAYLOAD, ST_FAILED };

struct ml_ws_deflate_s {
  z_stream def, inf;
  int def_ok, inf_ok;
  int def_reset; /* our side takes no context over between messages */
  int inf_reset; /* neither does the peer's: its messages start with an empty window */
};

/* -- Buffers ---------------------------------------------------------------------------------- */

int ml_ws_buf_reserve(ml_ws_buf_t *b, size_t n) {
  if (b->len + n <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + n)
    cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) return UV_ENOMEM;
  b->p = p;
  b->cap = cap;
  return 0;
}

void ml_ws_buf_free(ml_ws_buf_t *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

static void buf_trim(ml_ws_buf_t *b) {
  b->len = 0;
  if (b->cap > KEEP_BUF_MAX) ml_ws_buf_free(b);
}

/* -- UTF-8 ------------------------------------------------------------------------------------ */

/* The state packs what the next bytes must be: bits 16..17 how many continuation bytes are due,
 * bits 8..15 the lowest and bits 0..7 the highest value the next one may take. */
#define U8(need, lo, hi) ((uint32_t)(need) << 16 | (uint32_t)(lo) << 8 | (uint32_t)(hi))

int ml_utf8_check(uint32_t *state, const uint8_t *s, size_t n) {
  uint32_t st = *state;
  size_t i = 0;
  while (i < n) {
    if (st == 0) {
      while (i + 8 <= n) { /* ASCII runs, eight bytes at a time */
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ULL) break;
        i += 8;
      }
      if (i >= n) break;
      uint8_t b = s[i++];
      if (b < 0x80) continue;
      if (b >= 0xC2 && b <= 0xDF)
        st = U8(1, 0x80, 0xBF);
      else if (b == 0xE0)
        st = U8(2, 0xA0, 0xBF);
      else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF)
        st = U8(2, 0x80, 0xBF);
      else if (b == 0xED)
        st = U8(2, 0x80, 0x9F); /* no surrogates */
      else if (b == 0xF0)
        st = U8(3, 0x90, 0xBF);
      else if (b >= 0xF1 && b <= 0xF3)
        st = U8(3, 0x80, 0xBF);
      else if (b == 0xF4)
        st = U8(3, 0x80, 0x8F); /* nothing past U+10FFFF */
      else {
        *state = st;
        return -1;
      }
    } else {
      uint8_t b = s[i++];
      if (b < ((st >> 8) & 0xFF) || b > (st & 0xFF)) {
        *state = st;
        return -1;
      }
      uint32_t need = (st >> 16) - 1;
      st = need ? U8(need, 0x80, 0xBF) : 0;
    }
  }
  *state = st;
  return 0;
}

/* -- Parsing ------------------------------------------------------------------------------------
 */

void ml_ws_parser_init(ml_ws_parser_t *p, int server, size_t max_message) {
  memset(p, 0, sizeof *p);
  p->server = server;
  p->max_message = max_message ? max_message : ML_WS_MAX_MESSAGE_DEFAULT;
  p->hdr_need = 2;
}

void ml_ws_parser_free(ml_ws_parser_t *p) {
  ml_ws_buf_free(&p->msg);
  ml_ws_buf_free(&p->out);
  ml_ws_deflate_free(p->pmd);
  p->pmd = NULL;
}

void ml_ws_parser_set_deflate(ml_ws_parser_t *p, ml_ws_deflate_t *d) {
  ml_ws_deflate_free(p->pmd);
  p->pmd = d;
}

int ml_ws_close_code_valid(int code) {
  if (code >= 3000 && code <= 4999) return 1;
  switch (code) {
  case 1000:
  case 1001:
  case 1002:
  case 1003:
  case 1007:
  case 1008:
  case 1009:
  case 1010:
  case 1011:
  case 1012:
  case 1013:
  case 1014: return 1;
  default: return 0;
  }
}

static int fail(ml_ws_parser_t *p, ml_ws_event_t *ev, int code, const char *why) {
  p->state = ST_FAILED;
  p->error_code = code;
  p->error_reason = why;
  ev->type = ML_WS_EV_ERROR;
  ev->code = code;
  ev->data = why;
  ev->len = strlen(why);
  return ML_WS_EV_ERROR;
}

/* Checks a complete frame head; returns 0 or the error event. */
static int head_done(ml_ws_parser_t *p, ml_ws_event_t *ev) {
  const uint8_t *h = p->hdr;
  p->fin = h[0] >> 7;
  p->rsv1 = (h[0] >> 6) & 1;
  p->opcode = h[0] & 0x0F;
  p->masked = h[1] >> 7;
  uint64_t len = h[1] & 0x7F;
  size_t at = 2;
  if (len == 126) {
    len = (uint64_t)h[2] << 8 | h[3];
    at = 4;
  } else if (len == 127) {
    len = 0;
    for (int i = 0; i < 8; i++)
      len = len << 8 | h[2 + i];
    at = 10;
    if (len >> 63) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "frame length has the top bit set");
  }
  if (p->masked) memcpy(p->mask, h + at, 4);
  p->payload_len = len;
  p->payload_got = 0;
  if (h[0] & 0x30) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "reserved bits set");
  if (p->masked != p->server)
    return fail(p, ev, ML_WS_CLOSE_PROTOCOL,
                p->server ? "unmasked frame from a client" : "masked frame from a server");
  if (p->opcode >= 8) {
    if (p->opcode > ML_WS_OP_PONG) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "unknown opcode");
    if (!p->fin) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "fragmented control frame");
    if (len > 125) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "control frame longer than 125");
    if (p->rsv1) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "reserved bits set");
    p->ctl_len = 0;
    return 0;
  }
  if (p->opcode > ML_WS_OP_BINARY) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "unknown opcode");
  if (p->opcode == ML_WS_OP_CONT) {
    if (!p->msg_opcode) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "continuation without a message");
    if (p->rsv1) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "reserved bits set");
  } else {
    if (p->msg_opcode)
      return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "new message inside a fragmented one");
    if (p->rsv1 && !p->pmd) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "reserved bits set");
    p->msg_opcode = p->opcode;
    p->msg_compressed = p->rsv1;
    p->utf8 = 0;
    buf_trim(&p->msg);
  }
  if (len > p->max_message || p->msg.len + len > p->max_message)
    return fail(p, ev, ML_WS_CLOSE_TOO_BIG, "message too big");
  if (ml_ws_buf_reserve(&p->msg, (size_t)len + (p->fin && p->msg_compressed ? 4 : 0)) < 0)
    return fail(p, ev, ML_WS_CLOSE_INTERNAL, "out of memory");
  return 0;
}

static int inflate_message(ml_ws_parser_t *p, ml_ws_event_t *ev);

/* A frame's payload is complete: returns the event it makes, if any. */
static int payload_done(ml_ws_parser_t *p, ml_ws_event_t *ev) {
  p->state = ST_HEAD;
  p->hdr_len = 0;
  p->hdr_need = 2;
  if (p->opcode >= 8) {
    ev->data = p->ctl;
    ev->len = p->ctl_len;
    if (p->opcode == ML_WS_OP_PING) return ev->type = ML_WS_EV_PING;
    if (p->opcode == ML_WS_OP_PONG) return ev->type = ML_WS_EV_PONG;
    /* close */
    if (p->ctl_len == 1) return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "close frame of one byte");
    ev->code = ML_WS_CLOSE_NO_STATUS;
    ev->len = 0;
    if (p->ctl_len >= 2) {
      int code = (uint8_t)p->ctl[0] << 8 | (uint8_t)p->ctl[1];
      if (!ml_ws_close_code_valid(code))
        return fail(p, ev, ML_WS_CLOSE_PROTOCOL, "invalid close code");
      uint32_t st = 0;
      if (ml_utf8_check(&st, (const uint8_t *)p->ctl + 2, p->ctl_len - 2) < 0 || st != 0)
        return fail(p, ev, ML_WS_CLOSE_INVALID_DATA, "close reason is not UTF-8");
      ev->code = code;
      ev->data = p->ctl + 2;
      ev->len = p->ctl_len - 2;
    }
    return ev->type = ML_WS_EV_CLOSE;
  }
  if (!p->fin) return ML_WS_EV_NONE;
  int opcode = p->msg_opcode;
  p->msg_opcode = 0;
  if (p->msg_compressed) {
    if (inflate_message(p, ev) != 0) return ML_WS_EV_ERROR;
    if (opcode == ML_WS_OP_TEXT) {
      uint32_t st = 0;
      if (ml_utf8_check(&st, (const uint8_t *)p->out.p, p->out.len) < 0 || st != 0)
        return fail(p, ev, ML_WS_CLOSE_INVALID_DATA, "text message is not UTF-8");
    }
    ev->data = p->out.p ? p->out.p : "";
    ev->len = p->out.len;
  } else {
    if (opcode == ML_WS_OP_TEXT && p->utf8 != 0)
      return fail(p, ev, ML_WS_CLOSE_INVALID_DATA, "text message is not UTF-8");
    ev->data = p->msg.p ? p->msg.p : "";
    ev->len = p->msg.len;
  }
  ev->opcode = opcode;
  return ev->type = ML_WS_EV_MESSAGE;
}

size_t ml_ws_parse(ml_ws_parser_t *p, const char *data, size_t len, ml_ws_event_t *ev) {
  size_t used = 0;
  ev->type = ML_WS_EV_NONE;
  if (p->state == ST_FAILED) {
    fail(p, ev, p->error_code, p->error_reason);
    return len;
  }
  if (p->state == ST_HEAD && p->hdr_len == 0 && !p->msg_opcode) {
    buf_trim(&p->msg); /* the previous message was delivered */
    buf_trim(&p->out);
  }
  while (used < len) {
    if (p->state == ST_HEAD) {
      while (used < len && p->hdr_len < p->hdr_need)
        p->hdr[p->hdr_len++] = (uint8_t)data[used++];
      if (p->hdr_len < p->hdr_need) break;
      if (p->hdr_need == 2) { /* now the whole head's length is known */
        uint8_t l7 = p->hdr[1] & 0x7F;
        p->hdr_need = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((p->hdr[1] & 0x80) ? 4 : 0);
        if (p->hdr_len < p->hdr_need) continue;
      }
      if (head_done(p, ev)) return len;
      p->state = ST_PAYLOAD;
      if (p->payload_len == 0) {
        if (payload_done(p, ev)) return ev->type == ML_WS_EV_ERROR ? len : used;
      }
      continue;
    }
    /* ST_PAYLOAD */
    size_t n = len - used;
    uint64_t left = p->payload_len - p->payload_got;
    if (n > left) n = (size_t)left;
    char *dst;
    if (p->opcode >= 8) {
      dst = p->ctl + p->ctl_len;
      p->ctl_len += n;
    } else {
      dst = p->msg.p + p->msg.len;
      p->msg.len += n;
    }
    memcpy(dst, data + used, n);
    if (p->masked) ml_ws_mask(dst, n, p->mask, (size_t)p->payload_got);
    p->payload_got += n;
    used += n;
    if (p->opcode < 8 && p->msg_opcode == ML_WS_OP_TEXT && !p->msg_compressed &&
        ml_utf8_check(&p->utf8, (const uint8_t *)dst, n) < 0) { /* fail fast */
      fail(p, ev, ML_WS_CLOSE_INVALID_DATA, "text message is not UTF-8");
      return len;
    }
    if (p->payload_got == p->payload_len) {
      if (payload_done(p, ev)) return ev->type == ML_WS_EV_ERROR ? len : used;
    }
  }
  return used;
}

/* -- Encoding ---------------------------------------------------------------------------------- */

size_t ml_ws_frame_head(uint8_t out[14], int fin, int rsv1, int opcode, uint64_t len,
                        const uint8_t *mask) {
  size_t n = 2;
  out[0] = (uint8_t)((fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | (opcode & 0x0F));
  uint8_t m = mask ? 0x80 : 0;
  if (len < 126) {
    out[1] = (uint8_t)(m | len);
  } else if (len <= 0xFFFF) {
    out[1] = m | 126;
    out[2] = (uint8_t)(len >> 8);
    out[3] = (uint8_t)len;
    n = 4;
  } else {
    out[1] = m | 127;
    for (int i = 0; i < 8; i++)
      out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    n = 10;
  }
  if (mask) {
    memcpy(out + n, mask, 4);
    n += 4;
  }
  return n;
}

void ml_ws_mask(char *p, size_t n, const uint8_t mask[4], size_t offset) {
  size_t i = 0;
  if ((offset & 3) == 0 && n >= 8) {
    uint32_t k;
    memcpy(&k, mask, 4);
    uint64_t k8 = (uint64_t)k << 32 | k;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      memcpy(&w, p + i, 8);
      w ^= k8;
      memcpy(p + i, &w, 8);
    }
  }
  for (; i < n; i++)
    p[i] ^= (char)mask[(offset + i) & 3];
}

int ml_ws_encode(ml_ws_buf_t *out, int opcode, int rsv1, const char *data, size_t len,
                 const uint8_t *mask) {
  if (ml_ws_buf_reserve(out, 14 + len) < 0) return UV_ENOMEM;
  size_t h = ml_ws_frame_head((uint8_t *)out->p + out->len, 1, rsv1, opcode, len, mask);
  out->len += h;
  if (len) memcpy(out->p + out->len, data, len);
  if (mask && len) ml_ws_mask(out->p + out->len, len, mask, 0);
  out->len += len;
  return 0;
}

size_t ml_ws_close_payload(char out[125], int code, const char *reason, size_t rlen) {
  if (code <= 0) return 0;
  out[0] = (char)(code >> 8);
  out[1] = (char)code;
  if (rlen > 123) { /* cut at a character boundary */
    rlen = 123;
    while (rlen > 0 && ((uint8_t)reason[rlen] & 0xC0) == 0x80)
      rlen--;
  }
  if (rlen) memcpy(out + 2, reason, rlen);
  return 2 + rlen;
}

/* -- Handshake ------------------------------------------------------------------------------- */

static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

void ml_ws_accept_key(const char *key, size_t klen, char out[29]) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  if (ml_openssl_load()) {
    out[0] = 0;
    return;
  }
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) && EVP_DigestUpdate(ctx, key, klen) &&
           EVP_DigestUpdate(ctx, GUID, sizeof GUID - 1) && EVP_DigestFinal_ex(ctx, md, &mdlen);
  EVP_MD_CTX_free(ctx);
  if (!ok || mdlen != 20) {
    out[0] = 0;
    return;
  }
  EVP_EncodeBlock((unsigned char *)out, md, 20); /* 28 chars and a NUL */
}

int ml_ws_key_valid(const char *key, size_t klen) {
  if (klen != 24 || key[22] != '=' || key[23] != '=') return 0;
  for (size_t i = 0; i < 22; i++) {
    char ch = key[i];
    if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
          ch == '+' || ch == '/'))
      return 0;
  }
  return 1;
}

int ml_ws_random(uint8_t *p, size_t n) {
  if (ml_openssl_load()) return UV_ENOSYS;
  return RAND_bytes(p, (int)n) == 1 ? 0 : UV_EIO;
}

int ml_ws_make_key(char out[25]) {
  uint8_t raw[16];
  if (ml_ws_random(raw, sizeof raw) < 0) return UV_EIO;
  EVP_EncodeBlock((unsigned char *)out, raw, 16);
  return 0;
}

/* -- permessage-deflate: negotiation ------------------------------------------------------------
 */

typedef struct {
  const char *s, *end;
} cursor_t;

static void skip_ws(cursor_t *c) {
  while (c->s < c->end && (*c->s == ' ' || *c->s == '\t'))
    c->s++;
}

/* Reads a token (or a quoted string) into out; returns its length, or -1 when there is none. */
static int read_token(cursor_t *c, char *out, size_t olen) {
  skip_ws(c);
  size_t n = 0;
  if (c->s < c->end && *c->s == '"') {
    c->s++;
    while (c->s < c->end && *c->s != '"') {
      if (n + 1 < olen) out[n++] = *c->s;
      c->s++;
    }
    if (c->s < c->end) c->s++;
  } else {
    while (c->s < c->end && *c->s != ';' && *c->s != ',' && *c->s != '=' && *c->s != ' ' &&
           *c->s != '\t') {
      if (n + 1 < olen) out[n++] = *c->s;
      c->s++;
    }
  }
  out[n] = 0;
  skip_ws(c);
  return n ? (int)n : -1;
}

static int parse_bits(const char *v, int *out) {
  if (!v[0] || !v[1] || v[2] || v[0] < '0' || v[0] > '9' || v[1] < '0' || v[1] > '9') {
    if (v[0] >= '8' && v[0] <= '9' && !v[1]) {
      *out = v[0] - '0';
      return 0;
    }
    return -1;
  }
  int b = (v[0] - '0') * 10 + (v[1] - '0');
  if (b < 8 || b > 15) return -1;
  *out = b;
  return 0;
}

/* Parses one extension of a list: its name, then its parameters up to ',' or the end. Returns 1
 * for a well-formed permessage-deflate with *o filled (bits 0 = absent, -1 = given without a
 * value), 0 for another or a malformed extension (skipped), -1 at the end of the list. */
static int next_extension(cursor_t *c, ml_ws_pmd_t *o) {
  char name[64], pname[64], val[32];
  skip_ws(c);
  while (c->s < c->end && *c->s == ',') {
    c->s++;
    skip_ws(c);
  }
  if (c->s >= c->end) return -1;
  int ok = read_token(c, name, sizeof name) > 0 && strcmp(name, "permessage-deflate") == 0;
  memset(o, 0, sizeof *o);
  int seen[4] = {0, 0, 0, 0};
  while (c->s < c->end && *c->s == ';') {
    c->s++;
    if (read_token(c, pname, sizeof pname) < 0) {
      ok = 0;
      break;
    }
    val[0] = 0;
    int has_val = 0;
    if (c->s < c->end && *c->s == '=') {
      c->s++;
      has_val = read_token(c, val, sizeof val) > 0;
      if (!has_val) ok = 0;
    }
    int idx = -1;
    if (strcmp(pname, "server_no_context_takeover") == 0) {
      idx = 0;
      if (has_val) ok = 0;
      o->server_no_context_takeover = 1;
    } else if (strcmp(pname, "client_no_context_takeover") == 0) {
      idx = 1;
      if (has_val) ok = 0;
      o->client_no_context_takeover = 1;
    } else if (strcmp(pname, "server_max_window_bits") == 0) {
      idx = 2;
      if (!has_val || parse_bits(val, &o->server_max_window_bits) < 0) ok = 0;
    } else if (strcmp(pname, "client_max_window_bits") == 0) {
      idx = 3;
      if (!has_val)
        o->client_max_window_bits = -1;
      else if (parse_bits(val, &o->client_max_window_bits) < 0)
        ok = 0;
    } else {
      ok = 0; /* an unknown parameter: the offer is declined */
    }
    if (idx >= 0 && seen[idx]++) ok = 0;
  }
  while (c->s < c->end && *c->s != ',') { /* garbage up to the next extension */
    c->s++;
    ok = 0;
  }
  return ok;
}

int ml_ws_pmd_negotiate(const char *offers, size_t len, const ml_ws_pmd_t *want,
                        ml_ws_pmd_t *agreed, char *resp, size_t rlen) {
  cursor_t c = {offers, offers + len};
  ml_ws_pmd_t o;
  int r;
  while ((r = next_extension(&c, &o)) >= 0) {
    if (r == 0) continue;
    ml_ws_pmd_t a;
    a.server_no_context_takeover = o.server_no_context_takeover || want->server_no_context_takeover;
    a.client_no_context_takeover = o.client_no_context_takeover || want->client_no_context_takeover;
    a.server_max_window_bits = o.server_max_window_bits ? o.server_max_window_bits : 15;
    if (want->server_max_window_bits && want->server_max_window_bits < a.server_max_window_bits)
      a.server_max_window_bits = want->server_max_window_bits;
    if (a.server_max_window_bits < 9) continue; /* zlib's raw deflate has no 256-byte window */
    a.client_max_window_bits = 15;
    int send_client_bits = 0;
    if (o.client_max_window_bits) { /* the client may take a limit from us */
      if (o.client_max_window_bits > 0) a.client_max_window_bits = o.client_max_window_bits;
      if (want->client_max_window_bits && want->client_max_window_bits < a.client_max_window_bits)
        a.client_max_window_bits = want->client_max_window_bits;
      send_client_bits = want->client_max_window_bits || o.client_max_window_bits > 0;
    }
    int n = snprintf(resp, rlen, "permessage-deflate%s%s",
                     a.server_no_context_takeover ? "; server_no_context_takeover" : "",
                     a.client_no_context_takeover ? "; client_no_context_takeover" : "");
    if (o.server_max_window_bits || a.server_max_window_bits < 15)
      n += snprintf(resp + n, rlen - (size_t)n, "; server_max_window_bits=%d",
                    a.server_max_window_bits);
    if (send_client_bits)
      n += snprintf(resp + n, rlen - (size_t)n, "; client_max_window_bits=%d",
                    a.client_max_window_bits);
    if ((size_t)n >= rlen) return 0;
    *agreed = a;
    return 1;
  }
  return 0;
}

size_t ml_ws_pmd_offer(const ml_ws_pmd_t *want, char *out, size_t olen) {
  int n = snprintf(out, olen, "permessage-deflate%s%s; client_max_window_bits",
                   want->server_no_context_takeover ? "; server_no_context_takeover" : "",
                   want->client_no_context_takeover ? "; client_no_context_takeover" : "");
  if (want->server_max_window_bits && n > 0 && (size_t)n < olen)
    n += snprintf(out + n, olen - (size_t)n, "; server_max_window_bits=%d",
                  want->server_max_window_bits);
  return n > 0 && (size_t)n < olen ? (size_t)n : 0;
}

int ml_ws_pmd_response(const char *resp, size_t len, const ml_ws_pmd_t *offered,
                       ml_ws_pmd_t *agreed) {
  cursor_t c = {resp, resp + len};
  ml_ws_pmd_t o, extra;
  int r = next_extension(&c, &o);
  if (r < 0) return 0;
  if (r == 0 || next_extension(&c, &extra) != -1) return UV_EPROTO; /* ours, and only ours */
  if (o.client_max_window_bits < 0) return UV_EPROTO;               /* a server must give a value */
  if (offered->server_no_context_takeover && !o.server_no_context_takeover) return UV_EPROTO;
  if (offered->server_max_window_bits &&
      (!o.server_max_window_bits || o.server_max_window_bits > offered->server_max_window_bits))
    return UV_EPROTO;
  agreed->server_no_context_takeover = o.server_no_context_takeover;
  agreed->client_no_context_takeover = o.client_no_context_takeover;
  agreed->server_max_window_bits = o.server_max_window_bits ? o.server_max_window_bits : 15;
  agreed->client_max_window_bits = o.client_max_window_bits ? o.client_max_window_bits : 15;
  if (agreed->client_max_window_bits < 9) return UV_EPROTO; /* we cannot deflate that small */
  return 1;
}

/* -- permessage-deflate: compression ------------------------------------------------------------
 */

ml_ws_deflate_t *ml_ws_deflate_new(const ml_ws_pmd_t *a, int server) {
  if (ml_zlib_load()) return NULL; /* (the connection goes on uncompressed) */
  ml_ws_deflate_t *d = calloc(1, sizeof *d);
  if (!d) return NULL;
  int our_bits = server ? a->server_max_window_bits : a->client_max_window_bits;
  if (our_bits < 9) our_bits = 9;
  if (our_bits > 15) our_bits = 15;
  d->def_reset = server ? a->server_no_context_takeover : a->client_no_context_takeover;
  d->inf_reset = server ? a->client_no_context_takeover : a->server_no_context_takeover;
  if (deflateInit2(&d->def, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -our_bits, 8, Z_DEFAULT_STRATEGY) !=
      Z_OK) {
    free(d);
    return NULL;
  }
  d->def_ok = 1;
  if (inflateInit2(&d->inf, -15) != Z_OK) { /* a 32 KiB window reads any smaller one */
    deflateEnd(&d->def);
    free(d);
    return NULL;
  }
  d->inf_ok = 1;
  return d;
}

void ml_ws_deflate_free(ml_ws_deflate_t *d) {
  if (!d) return;
  if (d->def_ok) deflateEnd(&d->def);
  if (d->inf_ok) inflateEnd(&d->inf);
  free(d);
}

int ml_ws_deflate_message(ml_ws_deflate_t *d, const char *in, size_t len, ml_ws_buf_t *out) {
  out->len = 0;
  d->def.next_in = (Bytef *)in;
  d->def.avail_in = (uInt)len;
  do {
    if (ml_ws_buf_reserve(out, len / 2 + 64) < 0) return UV_ENOMEM;
    d->def.next_out = (Bytef *)out->p + out->len;
    d->def.avail_out = (uInt)(out->cap - out->len);
    int r = deflate(&d->def, Z_SYNC_FLUSH);
    if (r != Z_OK && r != Z_BUF_ERROR) return UV_EIO;
    out->len = out->cap - d->def.avail_out;
  } while (d->def.avail_in > 0 || d->def.avail_out == 0);
  /* a sync flush ends with 00 00 ff ff, which the wire format leaves out */
  if (out->len >= 4 && memcmp(out->p + out->len - 4, "\0\0\xff\xff", 4) == 0) out->len -= 4;
  if (d->def_reset) deflateReset(&d->def);
  return 0;
}

/* Inflates the reassembled message (msg) into out, refusing past max_message. */
static int inflate_message(ml_ws_parser_t *p, ml_ws_event_t *ev) {
  ml_ws_deflate_t *d = p->pmd;
  memcpy(p->msg.p + p->msg.len, "\0\0\xff\xff", 4); /* room reserved by head_done */
  d->inf.next_in = (Bytef *)p->msg.p;
  d->inf.avail_in = (uInt)(p->msg.len + 4);
  p->out.len = 0;
  for (;;) {
    size_t room = p->msg.len * 2 + 256;
    if (p->out.len + room > p->max_message + 1) room = p->max_message + 1 - p->out.len;
    if (room == 0) return fail(p, ev, ML_WS_CLOSE_TOO_BIG, "message too big");
    if (ml_ws_buf_reserve(&p->out, room) < 0)
      return fail(p, ev, ML_WS_CLOSE_INTERNAL, "out of memory");
    d->inf.next_out = (Bytef *)p->out.p + p->out.len;
    d->inf.avail_out = (uInt)room;
    int r = inflate(&d->inf, Z_SYNC_FLUSH);
    p->out.len += room - d->inf.avail_out;
    if (p->out.len > p->max_message) return fail(p, ev, ML_WS_CLOSE_TOO_BIG, "message too big");
    if (r == Z_STREAM_END) { /* a final block: legal; the next message starts a new stream */
      inflateReset(&d->inf);
      break;
    }
    if (r != Z_OK && r != Z_BUF_ERROR)
      return fail(p, ev, ML_WS_CLOSE_INVALID_DATA, "compressed data is corrupt");
    if (d->inf.avail_in == 0 && d->inf.avail_out > 0) break;
  }
  if (d->inf_reset) inflateReset(&d->inf);
  return 0;
}
