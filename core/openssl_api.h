/* core/openssl_api.h: OpenSSL (libssl and libcrypto), opened on first use (core/dynlib.h). Every
 * file that calls OpenSSL includes this header after OpenSSL's own, and calls ml_openssl_load()
 * before its first OpenSSL call on any path: the names below then go through ml_openssl's table,
 * OpenSSL's own macros (SSL_CTX_set_mode, BIO_get_mem_data, ...) included. ML_OPENSSL_DIRECT
 * before the include keeps the real names (the loader and static builds).
 */
#ifndef ML_OPENSSL_API_H
#define ML_OPENSSL_API_H

#include "dynlib.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* The shared object dlopen opens; the libcrypto symbols are found through its dependencies.
 * (spec/c/test_openssl_missing.c names one that does not exist.) */
#ifndef ML_OPENSSL_SONAME
#define ML_OPENSSL_SONAME "libssl.so.3"
#endif

#define ML_OPENSSL_FUNCS(X)                                                                        \
  X(BIO_ctrl)                                                                                      \
  X(BIO_ctrl_pending)                                                                              \
  X(BIO_free)                                                                                      \
  X(BIO_new)                                                                                       \
  X(BIO_read)                                                                                      \
  X(BIO_s_mem)                                                                                     \
  X(BIO_write)                                                                                     \
  X(CRYPTO_memcmp)                                                                                 \
  X(ERR_clear_error)                                                                               \
  X(ERR_peek_last_error)                                                                           \
  X(ERR_reason_error_string)                                                                       \
  X(EVP_Digest)                                                                                    \
  X(EVP_DigestFinal_ex)                                                                            \
  X(EVP_DigestInit_ex)                                                                             \
  X(EVP_DigestUpdate)                                                                              \
  X(EVP_EncodeBlock)                                                                               \
  X(EVP_MD_CTX_free)                                                                               \
  X(EVP_MD_CTX_new)                                                                                \
  X(EVP_md5)                                                                                       \
  X(EVP_sha1)                                                                                      \
  X(EVP_sha256)                                                                                    \
  X(EVP_sha512)                                                                                    \
  X(HMAC)                                                                                          \
  X(PEM_write_bio_X509)                                                                            \
  X(RAND_bytes)                                                                                    \
  X(SSL_CTX_check_private_key)                                                                     \
  X(SSL_CTX_ctrl)                                                                                  \
  X(SSL_CTX_free)                                                                                  \
  X(SSL_CTX_load_verify_locations)                                                                 \
  X(SSL_CTX_new)                                                                                   \
  X(SSL_CTX_set_alpn_protos)                                                                       \
  X(SSL_CTX_set_alpn_select_cb)                                                                    \
  X(SSL_CTX_set_client_CA_list)                                                                    \
  X(SSL_CTX_set_default_passwd_cb)                                                                 \
  X(SSL_CTX_set_default_passwd_cb_userdata)                                                        \
  X(SSL_CTX_set_default_verify_paths)                                                              \
  X(SSL_CTX_set_options)                                                                           \
  X(SSL_CTX_set_session_id_context)                                                                \
  X(SSL_CTX_set_verify)                                                                            \
  X(SSL_CTX_use_PrivateKey_file)                                                                   \
  X(SSL_CTX_use_certificate_chain_file)                                                            \
  X(SSL_ctrl)                                                                                      \
  X(SSL_do_handshake)                                                                              \
  X(SSL_free)                                                                                      \
  X(SSL_get0_param)                                                                                \
  X(SSL_get0_peer_certificate)                                                                     \
  X(SSL_get_error)                                                                                 \
  X(SSL_get_verify_result)                                                                         \
  X(SSL_is_init_finished)                                                                          \
  X(SSL_load_client_CA_file)                                                                       \
  X(SSL_new)                                                                                       \
  X(SSL_read)                                                                                      \
  X(SSL_select_next_proto)                                                                         \
  X(SSL_set_accept_state)                                                                          \
  X(SSL_set_bio)                                                                                   \
  X(SSL_set_connect_state)                                                                         \
  X(SSL_shutdown)                                                                                  \
  X(SSL_write)                                                                                     \
  X(TLS_client_method)                                                                             \
  X(TLS_server_method)                                                                             \
  X(X509_NAME_print_ex)                                                                            \
  X(X509_VERIFY_PARAM_set1_host)                                                                   \
  X(X509_VERIFY_PARAM_set1_ip_asc)                                                                 \
  X(X509_VERIFY_PARAM_set_hostflags)                                                               \
  X(X509_get_issuer_name)                                                                          \
  X(X509_get_subject_name)                                                                         \
  X(X509_verify_cert_error_string)

typedef struct ml_openssl_s {
  ML_OPENSSL_FUNCS(ML_DYNLIB_SLOT)
} ml_openssl_t;

/* The table; valid once ml_openssl_load() returned NULL. */
extern ml_openssl_t ml_openssl;

/* Opens OpenSSL the first time (any thread). NULL once it is usable, else why it is not
 * ("OpenSSL is not installed (libssl.so.3)"). */
const char *ml_openssl_load(void);

/* Static builds: fills t with the linked functions and returns 1 (cli/static_libs.c); the default
 * (a weak definition in core/openssl_api.c) returns 0 and the library is opened with dlopen. */
int ml_openssl_linked(ml_openssl_t *t);

#ifndef ML_OPENSSL_DIRECT
#define BIO_ctrl ml_openssl.BIO_ctrl
#define BIO_ctrl_pending ml_openssl.BIO_ctrl_pending
#define BIO_free ml_openssl.BIO_free
#define BIO_new ml_openssl.BIO_new
#define BIO_read ml_openssl.BIO_read
#define BIO_s_mem ml_openssl.BIO_s_mem
#define BIO_write ml_openssl.BIO_write
#define CRYPTO_memcmp ml_openssl.CRYPTO_memcmp
#define ERR_clear_error ml_openssl.ERR_clear_error
#define ERR_peek_last_error ml_openssl.ERR_peek_last_error
#define ERR_reason_error_string ml_openssl.ERR_reason_error_string
#define EVP_Digest ml_openssl.EVP_Digest
#define EVP_DigestFinal_ex ml_openssl.EVP_DigestFinal_ex
#define EVP_DigestInit_ex ml_openssl.EVP_DigestInit_ex
#define EVP_DigestUpdate ml_openssl.EVP_DigestUpdate
#define EVP_EncodeBlock ml_openssl.EVP_EncodeBlock
#define EVP_MD_CTX_free ml_openssl.EVP_MD_CTX_free
#define EVP_MD_CTX_new ml_openssl.EVP_MD_CTX_new
#define EVP_md5 ml_openssl.EVP_md5
#define EVP_sha1 ml_openssl.EVP_sha1
#define EVP_sha256 ml_openssl.EVP_sha256
#define EVP_sha512 ml_openssl.EVP_sha512
#define HMAC ml_openssl.HMAC
#define PEM_write_bio_X509 ml_openssl.PEM_write_bio_X509
#define RAND_bytes ml_openssl.RAND_bytes
#define SSL_CTX_check_private_key ml_openssl.SSL_CTX_check_private_key
#define SSL_CTX_ctrl ml_openssl.SSL_CTX_ctrl
#define SSL_CTX_free ml_openssl.SSL_CTX_free
#define SSL_CTX_load_verify_locations ml_openssl.SSL_CTX_load_verify_locations
#define SSL_CTX_new ml_openssl.SSL_CTX_new
#define SSL_CTX_set_alpn_protos ml_openssl.SSL_CTX_set_alpn_protos
#define SSL_CTX_set_alpn_select_cb ml_openssl.SSL_CTX_set_alpn_select_cb
#define SSL_CTX_set_client_CA_list ml_openssl.SSL_CTX_set_client_CA_list
#define SSL_CTX_set_default_passwd_cb ml_openssl.SSL_CTX_set_default_passwd_cb
#define SSL_CTX_set_default_passwd_cb_userdata ml_openssl.SSL_CTX_set_default_passwd_cb_userdata
#define SSL_CTX_set_default_verify_paths ml_openssl.SSL_CTX_set_default_verify_paths
#define SSL_CTX_set_options ml_openssl.SSL_CTX_set_options
#define SSL_CTX_set_session_id_context ml_openssl.SSL_CTX_set_session_id_context
#define SSL_CTX_set_verify ml_openssl.SSL_CTX_set_verify
#define SSL_CTX_use_PrivateKey_file ml_openssl.SSL_CTX_use_PrivateKey_file
#define SSL_CTX_use_certificate_chain_file ml_openssl.SSL_CTX_use_certificate_chain_file
#define SSL_ctrl ml_openssl.SSL_ctrl
#define SSL_do_handshake ml_openssl.SSL_do_handshake
#define SSL_free ml_openssl.SSL_free
#define SSL_get0_param ml_openssl.SSL_get0_param
#define SSL_get0_peer_certificate ml_openssl.SSL_get0_peer_certificate
#define SSL_get_error ml_openssl.SSL_get_error
#define SSL_get_verify_result ml_openssl.SSL_get_verify_result
#define SSL_is_init_finished ml_openssl.SSL_is_init_finished
#define SSL_load_client_CA_file ml_openssl.SSL_load_client_CA_file
#define SSL_new ml_openssl.SSL_new
#define SSL_read ml_openssl.SSL_read
#define SSL_select_next_proto ml_openssl.SSL_select_next_proto
#define SSL_set_accept_state ml_openssl.SSL_set_accept_state
#define SSL_set_bio ml_openssl.SSL_set_bio
#define SSL_set_connect_state ml_openssl.SSL_set_connect_state
#define SSL_shutdown ml_openssl.SSL_shutdown
#define SSL_write ml_openssl.SSL_write
#define TLS_client_method ml_openssl.TLS_client_method
#define TLS_server_method ml_openssl.TLS_server_method
#define X509_NAME_print_ex ml_openssl.X509_NAME_print_ex
#define X509_VERIFY_PARAM_set1_host ml_openssl.X509_VERIFY_PARAM_set1_host
#define X509_VERIFY_PARAM_set1_ip_asc ml_openssl.X509_VERIFY_PARAM_set1_ip_asc
#define X509_VERIFY_PARAM_set_hostflags ml_openssl.X509_VERIFY_PARAM_set_hostflags
#define X509_get_issuer_name ml_openssl.X509_get_issuer_name
#define X509_get_subject_name ml_openssl.X509_get_subject_name
#define X509_verify_cert_error_string ml_openssl.X509_verify_cert_error_string
#endif

#endif
