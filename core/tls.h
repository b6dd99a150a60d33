/* core/tls.h: a TLS engine over memory buffers (OpenSSL). It owns no socket: the caller feeds the
 * ciphertext it received, takes the ciphertext to send, and reads and writes plaintext. The same
 * engine serves client and server sides; the binding that owns a socket (bindings/tcp.c) moves
 * the bytes. Pure C, loop thread only; no Lua here.
 *
 * Errors are negative UV_E* codes: UV_EPROTO for anything TLS refused, with a short stable message
 * from ml_tls_error ("tls: certificate verify failed", "tls: handshake failed", ...) and a longer
 * detail from ml_tls_detail (OpenSSL's own words: "hostname mismatch", "wrong version number").
 */
#ifndef ML_TLS_H
#define ML_TLS_H

#include <stddef.h>

typedef struct ml_tls_ctx_s ml_tls_ctx_t; /* shared settings: CA store, certificate, key */
typedef struct ml_tls_s ml_tls_t;         /* one connection's TLS state */

enum { ML_TLS_VERIFY_OFF = 0, ML_TLS_VERIFY_ON = 1, ML_TLS_VERIFY_OPTIONAL = 2 };

typedef struct {
  int server; /* 1: accept side (needs cert and key) */
  /* client: verify the server (on by default). server: ask each client for a certificate and
   * verify it: ML_TLS_VERIFY_ON fails the handshake of a client that sends none,
   * ML_TLS_VERIFY_OPTIONAL lets it through (client_verified false); a certificate that does not
   * verify fails the handshake either way */
  int verify;
  const char *cafile; /* PEM bundle of trusted CAs; NULL: the system store */
  /* server: the PEM bundle of the CAs client certificates are verified against (nginx's
   * ssl_client_certificate), named in the certificate request; given, it replaces cafile */
  const char *client_ca;
  const char *cert; /* PEM certificate chain file (optional for a client) */
  const char *key;  /* PEM private key file (one with a passphrase is refused, never prompted) */
  /* ALPN, one protocol name ("http/1.1") or NULL: a client offers it, a server selects it when the
   * client offers it (and answers without ALPN otherwise, so an "h2"-only client is not told yes)
   */
  const char *alpn;
} ml_tls_ctx_opts_t;

/* Creates a context. Returns 0 and *out, or UV_EINVAL with *err set to a short message
 * ("tls: cannot load certificate", "tls: cannot load key", "tls: key needs a passphrase",
 * "tls: certificate and key do not match", "tls: cannot load CA file",
 * "tls: cannot load client CA file"), or
 * UV_ENOSYS when OpenSSL cannot be opened ("OpenSSL is not installed (libssl.so.3)"). The
 * context is reference counted: ml_tls_ctx_free drops the caller's reference, each connection made
 * from it holds its own. */
int ml_tls_ctx_new(ml_tls_ctx_t **out, const ml_tls_ctx_opts_t *o, const char **err);
void ml_tls_ctx_free(ml_tls_ctx_t *c);
int ml_tls_ctx_is_server(const ml_tls_ctx_t *c);

/* Creates a connection's engine. server_name (client side; may be NULL) is sent as SNI when it is
 * a host name and is checked against the certificate (name or IP address) when verifying. Returns
 * 0 or UV_ENOMEM / UV_EINVAL. */
int ml_tls_new(ml_tls_t **out, ml_tls_ctx_t *c, const char *server_name);
void ml_tls_free(ml_tls_t *t);

/* Gives the engine ciphertext received from the peer. Returns 0 or UV_ENOMEM. */
int ml_tls_feed(ml_tls_t *t, const char *data, size_t len);
/* Advances the handshake with what was fed. Returns 1 when it is complete, 0 when it needs more
 * input (send ml_tls_pending bytes first), UV_EPROTO on failure (see ml_tls_error). */
int ml_tls_handshake(ml_tls_t *t);
/* Decrypts into buf. Returns the byte count (> 0), 0 when it needs more input, UV_EOF when the peer
 * sent close_notify, UV_EPROTO on failure. */
int ml_tls_read(ml_tls_t *t, char *buf, size_t cap);
/* Encrypts len bytes; all of them become pending ciphertext. Returns 0 or UV_EPROTO. */
int ml_tls_write(ml_tls_t *t, const char *data, size_t len);
/* Queues close_notify (pending ciphertext afterwards). */
void ml_tls_shutdown(ml_tls_t *t);

/* Ciphertext waiting to be sent, and taking it: ml_tls_take copies up to cap bytes into buf and
 * returns the count. */
size_t ml_tls_pending(const ml_tls_t *t);
size_t ml_tls_take(ml_tls_t *t, char *buf, size_t cap);

/* The peer's certificate, once the handshake is complete (nginx's $ssl_client_verify, _s_dn,
 * _i_dn, _cert). ml_tls_peer_verified: 1 when the peer sent one and it verified, else 0.
 * ml_tls_peer_text: the subject or issuer name as one RFC 2253 line ("CN=alice,O=Example"), or
 * the certificate as PEM, in *out (malloc'ed, NUL-terminated, the caller frees it); returns its
 * length, 0 with *out NULL when the peer sent no certificate, or UV_ENOMEM. Computed on each
 * call: nothing is kept per connection for a caller that never asks. */
enum { ML_TLS_PEER_SUBJECT, ML_TLS_PEER_ISSUER, ML_TLS_PEER_PEM };
int ml_tls_peer_verified(const ml_tls_t *t);
int ml_tls_peer_text(const ml_tls_t *t, int what, char **out);

const char *ml_tls_error(const ml_tls_t *t);  /* short message of the failure, or NULL */
const char *ml_tls_detail(const ml_tls_t *t); /* OpenSSL's reason, or "" */

#endif
