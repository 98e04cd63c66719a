/*
 * tls_transport.h - TLS sessions over OpenSSL on a non-blocking fd:
 * set-up from an SSL_CTX, handshake / read / write steps as ls_io
 * results, close_notify, the OpenSSL error queue as one message, DANE
 * on a session (src/lib: no Lua; contexts are built by src/tls.c).
 */
#ifndef LS_TLS_TRANSPORT_H
#define LS_TLS_TRANSPORT_H

#include <stddef.h>

#include <openssl/ssl.h>

#include "transport.h"

/* The TLS transport for transport.h: t->impl is the SSL. */
extern const ls_transport_ops ls_tls_ops;

/* Sessions alive (ls_tls_new minus ls_tls_free), for core.stats(). */
extern long ls_tls_live_sessions;

/* A reference-counted object that sessions of an SSL_CTX keep alive,
 * found as the SSL_CTX's app data (SSL_CTX_set_app_data): the maker of
 * the context sets it (with refs = 1, its own reference), ls_tls_new
 * takes one reference per session, ls_tls_free drops it; free runs at
 * zero. */
typedef struct ls_tls_hold {
    long refs;
    void (*free)(struct ls_tls_hold *self);
} ls_tls_hold;
void ls_tls_hold_unref(ls_tls_hold *h); /* NULL is harmless */

/* Made with TLS_server_method(). */
int ls_tls_ctx_is_server(const SSL_CTX *ctx);

/* Create an SSL for fd; servername (client: SNI and host check, may be
 * NULL). NULL with err filled in on failure. */
SSL *ls_tls_new(SSL_CTX *ctx, int fd, const char *servername, int verify_host,
                ls_ioerr *err);
void ls_tls_free(SSL *ssl); /* NULL is harmless */
int ls_tls_handshake(SSL *ssl, ls_ioerr *err);
int ls_tls_read(SSL *ssl, char *buf, size_t len, size_t *n, ls_ioerr *err);
int ls_tls_write(SSL *ssl, const char *buf, size_t len, size_t *n, ls_ioerr *err);
/* One non-blocking attempt at close_notify. */
void ls_tls_shutdown(SSL *ssl);
/* The connection waits for its peer: free OpenSSL's record buffers
 * (about 17 KiB each way) unless they still hold data; OpenSSL
 * allocates them again at the next read or write. NULL is harmless. */
void ls_tls_release_buffers(SSL *ssl);

/* Verify callback of verify = "optional" contexts: records the first
 * failure for the session, never fails the handshake. */
int ls_tls_verify_accept_all(int preverify_ok, X509_STORE_CTX *x);

/* DANE for SMTP (RFC 7672): 1 when OpenSSL can use the TLSA record
 * (usages 2 and 3, selectors 0 and 1, matching types 0-2). */
int ls_tls_tlsa_usable(long usage, long selector, long mtype, const unsigned char *data,
                       size_t dlen);
/* Turn DANE on for ssl (a client session of a context with
 * SSL_CTX_dane_enable, before the handshake) with TLSA base domain base:
 * verification then decides the handshake. LS_IO_OK or LS_IO_ERROR. */
int ls_tls_dane_enable(SSL *ssl, const char *base, ls_ioerr *err);
/* Add one more name a DANE-TA certificate may carry: 1, or 0 on failure. */
int ls_tls_dane_add_name(SSL *ssl, const char *name);
/* Add a TLSA record when usable: 1 when OpenSSL took it, else 0. */
int ls_tls_dane_add_tlsa(SSL *ssl, long usage, long selector, long mtype,
                         const unsigned char *data, size_t dlen);
/* The number of TLSA records taken, or -1 when DANE is not on. */
int ls_tls_dane_records(const SSL *ssl);

/* A bounded message: ls_mb_add appends (printf format), truncating. */
typedef struct ls_msgbuf {
    char *p;
    size_t size, len;
} ls_msgbuf;
void ls_mb_init(ls_msgbuf *m, char *p, size_t size);
void ls_mb_add(ls_msgbuf *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drain the whole OpenSSL error queue into m as "reason (data); ...",
 * skipping repeats. Returns the number of errors seen. */
int ls_tls_drain_errors(ls_msgbuf *m);

#endif
