/* core/tls.c: the TLS engine of core/tls.h: OpenSSL over two memory BIOs per connection. The rbio
 * holds ciphertext fed from the network, the wbio the ciphertext OpenSSL produced for the peer.
 *
 * Ownership: a context (SSL_CTX) is reference counted by OpenSSL; ml_tls_ctx_t is a thin wrapper
 * whose free drops one reference. A connection (ml_tls_t) owns its SSL, which owns both BIOs and
 * holds a reference on the SSL_CTX, so a context may be freed while connections made from it live.
 * OpenSSL keeps per-thread error queues: every call here clears the queue first so that a failure
 * is described by its own errors only. Loop thread only. OpenSSL is opened by the first context
 * (core/openssl_api.h); every other entry point takes a context or a connection made from one.
 * The peer's certificate (mutual TLS on a server) stays inside the SSL, which keeps it anyway:
 * its names and PEM are made only when asked for (ml_tls_peer_text).
 */
#include "tls.h"

#include "openssl_api.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

struct ml_tls_ctx_s {
  SSL_CTX *ctx;
  int server;
};

/* The ALPN protocol a server selects, in wire format (a length byte, the name). Static: the select
 * callback runs for connections that may outlive their ml_tls_ctx_t (they hold the SSL_CTX only).
 */
static const unsigned char alpn_http11[] = "\x08http/1.1";

struct ml_tls_s {
  SSL *ssl;
  BIO *rbio, *wbio;  /* owned by ssl */
  const char *error; /* static short message, NULL while fine */
  char detail[128];  /* OpenSSL's reason for the last failure */
};

/* -- Contexts -----------------------------------------------------------------------------------
 */

/* OpenSSL's default asks the terminal for a key's passphrase, which would block the loop: refuse it
 * and say so (u points at the caller's "asked" flag). */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
  (void)buf, (void)size, (void)rwflag;
  *(int *)u = 1;
  return 0;
}

/* Server side of ALPN: the context's protocol if the client offers it; else no ALPN in the answer
 * (the client then speaks its default, HTTP/1.1), never a protocol this server does not speak. */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg) {
  (void)ssl;
  const unsigned char *proto = arg;
  unsigned char *sel;
  if (SSL_select_next_proto(&sel, outlen, proto, proto[0] + 1u, in, inlen) !=
      OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;
  *out = sel;
  return SSL_TLSEXT_ERR_OK;
}

int ml_tls_ctx_new(ml_tls_ctx_t **out, const ml_tls_ctx_opts_t *o, const char **err) {
  *out = NULL;
  *err = ml_openssl_load();
  if (*err) return UV_ENOSYS;
  ml_tls_ctx_t *c = calloc(1, sizeof *c);
  if (!c) {
    *err = "tls: out of memory";
    return UV_ENOMEM;
  }
  c->server = o->server;
  c->ctx = SSL_CTX_new(o->server ? TLS_server_method() : TLS_client_method());
  if (!c->ctx) {
    *err = "tls: out of memory";
    goto fail;
  }
  SSL_CTX_set_min_proto_version(c->ctx, TLS1_2_VERSION);
  SSL_CTX_set_mode(c->ctx, SSL_MODE_RELEASE_BUFFERS);
  /* EOF without close_notify is the transport's business (the socket reports "closed") */
  SSL_CTX_set_options(c->ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
  if (o->alpn) { /* a server speaks http/1.1 only; a client may offer any one protocol */
    unsigned char wire[256];
    size_t n = strlen(o->alpn);
    if (n == 0 || n > 255 || (o->server && strcmp(o->alpn, "http/1.1") != 0)) {
      *err = "tls: unsupported alpn";
      goto fail;
    }
    wire[0] = (unsigned char)n;
    memcpy(wire + 1, o->alpn, n);
    if (o->server)
      SSL_CTX_set_alpn_select_cb(c->ctx, alpn_select, (void *)alpn_http11);
    else if (SSL_CTX_set_alpn_protos(c->ctx, wire, (unsigned)n + 1) != 0) { /* (0 is success) */
      *err = "tls: out of memory";
      goto fail;
    }
  }
  if (o->cert) {
    int asked = 0;
    SSL_CTX_set_default_passwd_cb(c->ctx, no_passphrase);
    SSL_CTX_set_default_passwd_cb_userdata(c->ctx, &asked);
    if (SSL_CTX_use_certificate_chain_file(c->ctx, o->cert) != 1) {
      *err = "tls: cannot load certificate";
      goto fail;
    }
    int loaded = SSL_CTX_use_PrivateKey_file(c->ctx, o->key ? o->key : o->cert, SSL_FILETYPE_PEM);
    SSL_CTX_set_default_passwd_cb_userdata(c->ctx, NULL); /* (asked dies here) */
    int why = ERR_GET_REASON(ERR_peek_last_error());      /* (a macro, no OpenSSL call) */
    if (loaded != 1 && (why == X509_R_KEY_VALUES_MISMATCH || why == X509_R_KEY_TYPE_MISMATCH)) {
      *err = "tls: certificate and key do not match"; /* OpenSSL 3 checks them as it loads */
      goto fail;
    }
    if (loaded != 1) {
      *err = asked ? "tls: key needs a passphrase" : "tls: cannot load key";
      goto fail;
    }
    if (SSL_CTX_check_private_key(c->ctx) != 1) {
      *err = "tls: certificate and key do not match";
      goto fail;
    }
  } else if (o->server) {
    *err = "tls: a server needs cert and key";
    goto fail;
  }
  if (o->server && o->client_ca) {
    /* the CAs named in the certificate request (a client with several certificates picks by
     * them); SSL_CTX_set_client_CA_list takes the list */
    STACK_OF(X509_NAME) *names = NULL;
    if (SSL_CTX_load_verify_locations(c->ctx, o->client_ca, NULL) != 1 ||
        !(names = SSL_load_client_CA_file(o->client_ca))) {
      *err = "tls: cannot load client CA file";
      goto fail;
    }
    SSL_CTX_set_client_CA_list(c->ctx, names);
  } else if (o->verify || o->cafile) {
    int ok = o->cafile ? SSL_CTX_load_verify_locations(c->ctx, o->cafile, NULL)
                       : SSL_CTX_set_default_verify_paths(c->ctx);
    if (ok != 1) {
      *err = o->cafile ? "tls: cannot load CA file" : "tls: cannot load the system CA store";
      goto fail;
    }
  }
  if (o->verify && o->server) {
    /* a resumed session keeps the client's certificate; OpenSSL refuses to resume one whose
     * verification it cannot tie to this context without an id (as nginx sets one) */
    static const unsigned char sid[] = "moonlet";
    SSL_CTX_set_session_id_context(c->ctx, sid, sizeof sid - 1);
    SSL_CTX_set_verify(c->ctx,
                       o->verify == ML_TLS_VERIFY_OPTIONAL
                           ? SSL_VERIFY_PEER
                           : SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                       NULL);
  } else {
    SSL_CTX_set_verify(c->ctx, o->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
  }
  ERR_clear_error();
  *out = c;
  return 0;
fail:
  ERR_clear_error();
  if (c->ctx) SSL_CTX_free(c->ctx);
  free(c);
  return *err && strstr(*err, "memory") ? UV_ENOMEM : UV_EINVAL;
}

void ml_tls_ctx_free(ml_tls_ctx_t *c) {
  if (!c) return;
  SSL_CTX_free(c->ctx);
  free(c);
}

int ml_tls_ctx_is_server(const ml_tls_ctx_t *c) { return c->server; }

/* -- Connections --------------------------------------------------------------------------------
 */

int ml_tls_new(ml_tls_t **out, ml_tls_ctx_t *c, const char *server_name) {
  *out = NULL;
  ml_tls_t *t = calloc(1, sizeof *t);
  if (!t) return UV_ENOMEM;
  t->ssl = SSL_new(c->ctx);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio) goto fail;
  BIO_set_mem_eof_return(t->rbio, -1); /* empty means "wait for more", not end of stream */
  BIO_set_mem_eof_return(t->wbio, -1);
  SSL_set_bio(t->ssl, t->rbio, t->wbio); /* the SSL owns them now */
  if (c->server) {
    SSL_set_accept_state(t->ssl);
  } else {
    SSL_set_connect_state(t->ssl);
    if (server_name && *server_name) {
      unsigned char bin[16];
      int is_ip = uv_inet_pton(AF_INET, server_name, bin) == 0 ||
                  uv_inet_pton(AF_INET6, server_name, bin) == 0;
      X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
      int ok;
      if (is_ip) {
        ok = X509_VERIFY_PARAM_set1_ip_asc(param, server_name);
      } else {
        ok = SSL_set_tlsext_host_name(t->ssl, server_name) == 1;
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        ok = ok && X509_VERIFY_PARAM_set1_host(param, server_name, 0) == 1;
      }
      if (!ok) {
        SSL_free(t->ssl);
        ERR_clear_error();
        free(t);
        return UV_EINVAL;
      }
    }
  }
  *out = t;
  return 0;
fail:
  if (t->ssl) {
    SSL_free(t->ssl);
  } else {
    BIO_free(t->rbio);
    BIO_free(t->wbio);
  }
  ERR_clear_error();
  free(t);
  return UV_ENOMEM;
}

void ml_tls_free(ml_tls_t *t) {
  if (!t) return;
  SSL_free(t->ssl);
  free(t);
}

int ml_tls_feed(ml_tls_t *t, const char *data, size_t len) {
  while (len > 0) {
    int chunk = len > (1u << 30) ? 1 << 30 : (int)len;
    int n = BIO_write(t->rbio, data, chunk);
    if (n <= 0) return UV_ENOMEM;
    data += n;
    len -= (size_t)n;
  }
  return 0;
}

/* Records why the last call failed: a verification failure has its own message, anything else in
 * the handshake is "handshake failed" and after it "tls: error". */
static int fail(ml_tls_t *t, int ret, int in_handshake) {
  int e = SSL_get_error(t->ssl, ret);
  unsigned long code = ERR_peek_last_error();
  long vr = SSL_get_verify_result(t->ssl);
  if (e == SSL_ERROR_SSL && vr != X509_V_OK) {
    t->error = "tls: certificate verify failed";
    snprintf(t->detail, sizeof t->detail, "%s", X509_verify_cert_error_string(vr));
  } else {
    t->error = in_handshake ? "tls: handshake failed" : "tls: error";
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    snprintf(t->detail, sizeof t->detail, "%s", reason ? reason : "protocol error");
  }
  ERR_clear_error();
  return UV_EPROTO;
}

int ml_tls_handshake(ml_tls_t *t) {
  if (t->error) return UV_EPROTO;
  ERR_clear_error();
  int r = SSL_do_handshake(t->ssl);
  if (r == 1) return 1;
  int e = SSL_get_error(t->ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
  return fail(t, r, 1);
}

int ml_tls_read(ml_tls_t *t, char *buf, size_t cap) {
  if (t->error) return UV_EPROTO;
  ERR_clear_error();
  int r = SSL_read(t->ssl, buf, cap > (1u << 30) ? 1 << 30 : (int)cap);
  if (r > 0) return r;
  int e = SSL_get_error(t->ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
  if (e == SSL_ERROR_ZERO_RETURN) return UV_EOF;
  return fail(t, r, !SSL_is_init_finished(t->ssl));
}

int ml_tls_write(ml_tls_t *t, const char *data, size_t len) {
  if (t->error) return UV_EPROTO;
  ERR_clear_error();
  while (len > 0) {
    int chunk = len > (1u << 30) ? 1 << 30 : (int)len;
    int r = SSL_write(t->ssl, data, chunk); /* a memory BIO takes it all */
    if (r <= 0) return fail(t, r, 0);
    data += r;
    len -= (size_t)r;
  }
  return 0;
}

void ml_tls_shutdown(ml_tls_t *t) {
  if (t->error || !SSL_is_init_finished(t->ssl)) return;
  ERR_clear_error();
  SSL_shutdown(t->ssl);
  ERR_clear_error();
}

size_t ml_tls_pending(const ml_tls_t *t) { return BIO_ctrl_pending(t->wbio); }

size_t ml_tls_take(ml_tls_t *t, char *buf, size_t cap) {
  size_t got = 0;
  while (got < cap) {
    size_t want = cap - got;
    int n = BIO_read(t->wbio, buf + got, want > (1u << 30) ? 1 << 30 : (int)want);
    if (n <= 0) break;
    got += (size_t)n;
  }
  return got;
}

/* -- The peer's certificate ---------------------------------------------------------------------
 */

int ml_tls_peer_verified(const ml_tls_t *t) {
  return SSL_is_init_finished(t->ssl) && SSL_get0_peer_certificate(t->ssl) &&
         SSL_get_verify_result(t->ssl) == X509_V_OK;
}

int ml_tls_peer_text(const ml_tls_t *t, int what, char **out) {
  *out = NULL;
  X509 *x = SSL_is_init_finished(t->ssl) ? SSL_get0_peer_certificate(t->ssl) : NULL;
  if (!x) return 0;
  ERR_clear_error();
  BIO *b = BIO_new(BIO_s_mem());
  if (!b) goto fail;
  int ok;
  if (what == ML_TLS_PEER_PEM)
    ok = PEM_write_bio_X509(b, x) == 1;
  else /* nginx's $ssl_client_s_dn: X509_NAME_print_ex with XN_FLAG_RFC2253 */
    ok = X509_NAME_print_ex(
             b, what == ML_TLS_PEER_ISSUER ? X509_get_issuer_name(x) : X509_get_subject_name(x), 0,
             XN_FLAG_RFC2253) >= 0;
  char *data = NULL;
  long n = ok ? BIO_get_mem_data(b, &data) : -1;
  if (n < 0 || n > (1L << 30) || !(*out = malloc((size_t)n + 1))) goto fail;
  memcpy(*out, data, (size_t)n);
  (*out)[n] = '\0';
  BIO_free(b);
  return (int)n;
fail:
  if (b) BIO_free(b);
  ERR_clear_error();
  return UV_ENOMEM;
}

const char *ml_tls_error(const ml_tls_t *t) { return t->error; }

const char *ml_tls_detail(const ml_tls_t *t) { return t->detail; }
