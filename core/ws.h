/* core/ws.h: the WebSocket protocol (RFC 6455) and permessage-deflate (RFC 7692) without any I/O:
 * an incremental frame parser that reassembles messages, frame encoding, the opening handshake's
 * keys, a UTF-8 validator and zlib compression. It knows nothing of Lua or sockets: the server side
 * (bindings/ws.c over an upgraded ml_conn_t) and the client side (bindings/ws.c over its own
 * uv_tcp_t) feed it bytes and write what it encodes.
 *
 * Ownership: a parser owns its message buffers and, once ml_ws_parser_set_deflate was called, the
 * deflate context; ml_ws_parser_free releases both. Event data points into the parser and is valid
 * until the next ml_ws_parse call. Everything runs on the loop thread; nothing here is shared.
 */
#ifndef ML_WS_H
#define ML_WS_H

#include <stddef.h>
#include <stdint.h>

#define ML_WS_MAX_MESSAGE_DEFAULT (1024 * 1024) /* reassembled and inflated, else close 1009 */

enum { /* opcodes */
       ML_WS_OP_CONT = 0x0,
       ML_WS_OP_TEXT = 0x1,
       ML_WS_OP_BINARY = 0x2,
       ML_WS_OP_CLOSE = 0x8,
       ML_WS_OP_PING = 0x9,
       ML_WS_OP_PONG = 0xA
};

enum { /* close status codes used by moonlet */
       ML_WS_CLOSE_NORMAL = 1000,
       ML_WS_CLOSE_GOING_AWAY = 1001,
       ML_WS_CLOSE_PROTOCOL = 1002,
       ML_WS_CLOSE_NO_STATUS = 1005, /* never sent: a close frame without a code */
       ML_WS_CLOSE_ABNORMAL = 1006,  /* never sent: the connection dropped without a close frame */
       ML_WS_CLOSE_INVALID_DATA = 1007,
       ML_WS_CLOSE_POLICY = 1008,
       ML_WS_CLOSE_TOO_BIG = 1009,
       ML_WS_CLOSE_INTERNAL = 1011
};

enum {                    /* what ml_ws_parse found */
       ML_WS_EV_NONE = 0, /* the input is used up; nothing complete yet */
       ML_WS_EV_MESSAGE,  /* a whole text or binary message (reassembled, inflated, validated) */
       ML_WS_EV_PING,
       ML_WS_EV_PONG,
       ML_WS_EV_CLOSE, /* the peer's close frame: code (1005 when none) and reason */
       ML_WS_EV_ERROR  /* the peer broke the protocol: close with `code`; the parser is dead */
};

typedef struct ml_ws_event_s {
  int type;         /* ML_WS_EV_* */
  int opcode;       /* MESSAGE: ML_WS_OP_TEXT or ML_WS_OP_BINARY */
  const char *data; /* MESSAGE, PING, PONG: the payload; CLOSE: the reason; ERROR: why (static) */
  size_t len;
  int code; /* CLOSE: the peer's status; ERROR: the status to close with */
} ml_ws_event_t;

typedef struct ml_ws_buf_s {
  char *p;
  size_t len, cap;
} ml_ws_buf_t;

/* permessage-deflate parameters (RFC 7692 section 7), as offered or as agreed. */
typedef struct ml_ws_pmd_s {
  int server_no_context_takeover;
  int client_no_context_takeover;
  int server_max_window_bits; /* 9..15 (8 is declined: zlib's raw deflate cannot do it) */
  int client_max_window_bits; /* 8..15 */
} ml_ws_pmd_t;

typedef struct ml_ws_deflate_s ml_ws_deflate_t;

typedef struct ml_ws_parser_s {
  /* settings (read-only once parsing started) */
  int server; /* 1: frames come from clients and must be masked; 0: must not be */
  size_t max_message;
  ml_ws_deflate_t *pmd; /* owned; NULL unless permessage-deflate was agreed */
  /* private: the frame being read */
  int state;
  uint8_t hdr[14];
  size_t hdr_len, hdr_need;
  int fin, rsv1, opcode, masked;
  uint8_t mask[4];
  uint64_t payload_len, payload_got;
  /* private: the message being reassembled */
  int msg_opcode; /* 0: no message in progress */
  int msg_compressed;
  uint32_t utf8;        /* streaming validator state of an uncompressed text message */
  ml_ws_buf_t msg, out; /* payload bytes; inflated message */
  char ctl[128];        /* control frame payload */
  size_t ctl_len;
  int error_code; /* once failed */
  const char *error_reason;
} ml_ws_parser_t;

/* -- Parsing -------------------------------------------------------------------------------- */

void ml_ws_parser_init(ml_ws_parser_t *p, int server, size_t max_message);
/* Frees the buffers and the deflate context. The parser may be initialised again. */
void ml_ws_parser_free(ml_ws_parser_t *p);
/* Gives the parser the deflate context of an agreed permessage-deflate (it takes ownership). */
void ml_ws_parser_set_deflate(ml_ws_parser_t *p, ml_ws_deflate_t *d);
/* Consumes data[0..len) up to the end of the first complete event, which it describes in *ev, and
 * returns how many bytes it used; ev->type is ML_WS_EV_NONE when it used everything and nothing is
 * complete yet. Call it again with the rest. After ML_WS_EV_ERROR every call returns the same error
 * (using all the input). Event data stays valid until the next call. Drops buffers larger than
 * 64 KiB between messages, so an idle connection holds little. */
size_t ml_ws_parse(ml_ws_parser_t *p, const char *data, size_t len, ml_ws_event_t *ev);
/* Whether a status code may appear in a close frame on the wire (RFC 6455 7.4). */
int ml_ws_close_code_valid(int code);

/* -- Encoding ------------------------------------------------------------------------------- */

/* Writes a frame head into out (2 to 14 bytes) and returns its length. mask: the 4-byte masking
 * key (a client's frames), or NULL. */
size_t ml_ws_frame_head(uint8_t out[14], int fin, int rsv1, int opcode, uint64_t len,
                        const uint8_t *mask);
/* XORs p[0..n) with the masking key, starting at byte `offset` of the payload. */
void ml_ws_mask(char *p, size_t n, const uint8_t mask[4], size_t offset);
/* Appends a whole frame (head and payload, masked when mask is not NULL) to out. Returns 0 or
 * UV_ENOMEM (as a negative number). */
int ml_ws_encode(ml_ws_buf_t *out, int opcode, int rsv1, const char *data, size_t len,
                 const uint8_t *mask);
/* Formats a close frame payload (code in network order, then the reason, cut to 123 bytes at a
 * UTF-8 boundary) into out[125]; returns its length (0 when code is 0). */
size_t ml_ws_close_payload(char out[125], int code, const char *reason, size_t rlen);

int ml_ws_buf_reserve(ml_ws_buf_t *b, size_t n); /* room for n more bytes: 0 or UV_ENOMEM */
void ml_ws_buf_free(ml_ws_buf_t *b);

/* -- Handshake ------------------------------------------------------------------------------ */

/* Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64(SHA-1(key + GUID)), 28 chars + NUL; ""
 * when OpenSSL cannot be opened (core/openssl_api.h). */
void ml_ws_accept_key(const char *key, size_t klen, char out[29]);
/* Whether a Sec-WebSocket-Key is the base64 of 16 bytes (24 chars, "==" at the end). */
int ml_ws_key_valid(const char *key, size_t klen);
/* A fresh random Sec-WebSocket-Key (24 chars + NUL). Returns 0, or a negative error when the
 * system's random source fails. */
int ml_ws_make_key(char out[25]);
/* Fills n random bytes (masking keys). Returns 0 or a negative error. */
int ml_ws_random(uint8_t *p, size_t n);

/* -- UTF-8 ---------------------------------------------------------------------------------- */

/* Validates s[0..n) as a continuation of the text whose state is *state (0 at the start).
 * Returns 0 when valid so far, -1 at the first invalid byte. The text is complete and valid when
 * the last call returned 0 and *state is 0. Refuses overlongs, surrogates and code points past
 * U+10FFFF. */
int ml_utf8_check(uint32_t *state, const uint8_t *s, size_t n);

/* -- permessage-deflate --------------------------------------------------------------------- */

/* Server: looks through a Sec-WebSocket-Extensions header for a permessage-deflate offer it can
 * take (the first acceptable one wins), merging in the server's own wishes in `want` (its
 * no_context_takeover flags, max window bits: 0 = no wish). Returns 1 with *agreed and the response
 * header value in resp (NUL-terminated), or 0 when nothing was acceptable. */
int ml_ws_pmd_negotiate(const char *offers, size_t len, const ml_ws_pmd_t *want,
                        ml_ws_pmd_t *agreed, char *resp, size_t rlen);
/* Client: formats the offer for want into out; returns its length. */
size_t ml_ws_pmd_offer(const ml_ws_pmd_t *want, char *out, size_t olen);
/* Client: checks the server's Sec-WebSocket-Extensions answer to our offer. Returns 1 when
 * permessage-deflate was accepted (*agreed filled), 0 when the header names no extension, or
 * UV_EPROTO when it is not an answer we can take. */
int ml_ws_pmd_response(const char *resp, size_t len, const ml_ws_pmd_t *offered,
                       ml_ws_pmd_t *agreed);
/* A compression context for one connection; `server` tells which side we are. NULL on failure. */
ml_ws_deflate_t *ml_ws_deflate_new(const ml_ws_pmd_t *agreed, int server);
void ml_ws_deflate_free(ml_ws_deflate_t *d);
/* Compresses one message into out (replacing its content). Returns 0 or a negative error. */
int ml_ws_deflate_message(ml_ws_deflate_t *d, const char *in, size_t len, ml_ws_buf_t *out);

#endif
