/*
 * tls_transport.c - the TLS transport over OpenSSL (src/lib: no Lua).
 *
 * A session (SSL) is made from an SSL_CTX and a non-blocking fd the
 * caller owns; its handshake, read and write steps return the ls_io
 * results of transport.h, and ls_tls_ops plugs it into the buffer code.
 * Contexts (certificates, options, SNI sets) are built by the Lua
 * binding, src/tls.c.
 *
 * Conventions:
 *  - The OpenSSL error queue is cleared before each call sequence and
 *    drained into one readable message after a failure.
 *  - WANT_READ / WANT_WRITE are reported as the direction OpenSSL asks
 *    for, whatever the caller was doing (a read may need to write).
 *  - Each session has a small ls_session struct (the transport BIO's
 *    data and the SSL's app data), owned by ls_tls_new / ls_tls_free.
 *    It holds a reference to the SSL_CTX's ls_tls_hold (its app data),
 *    when the context has one.
 *
 * Transport: a minimal socket BIO that uses recv() and
 * send(MSG_NOSIGNAL), so writing to a connection the peer has reset
 * gives EPIPE, never SIGPIPE, without touching process signal state.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "errors.h"
#include "tls_transport.h"

long ls_tls_live_sessions;

int ls_tls_ctx_is_server(const SSL_CTX *ctx)
{
    return SSL_CTX_get_ssl_method(ctx) == TLS_server_method();
}

void ls_tls_hold_unref(ls_tls_hold *h)
{
    if (h != NULL && --h->refs == 0)
        h->free(h);
}

/* Per-session state: the BIO's data and the SSL's app data. */
typedef struct ls_session {
    int fd;
    int eof;        /* recv() returned 0 */
    int sys_errno;  /* errno of the last failed recv()/send() */
    int failed;     /* a fatal error happened: no close_notify */
    int first_verify_error; /* verify = "optional": the first failure */
    ls_tls_hold *hold; /* reference held by this session, or NULL */
    int dane;       /* DANE enabled for this session */
    int dane_usable; /* TLSA records OpenSSL accepted */
} ls_session;

enum tls_op { OP_HANDSHAKE, OP_READ, OP_WRITE };

/* ------------------------------------------------------------------ */
/* Messages */

void ls_mb_init(ls_msgbuf *m, char *p, size_t size)
{
    m->p = p;
    m->size = size;
    m->len = 0;
    if (size > 0)
        p[0] = '\0';
}

__attribute__((format(printf, 2, 3)))
void ls_mb_add(ls_msgbuf *m, const char *fmt, ...)
{
    if (m->len + 1 >= m->size)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(m->p + m->len, m->size - m->len, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    m->len += (size_t)n;
    if (m->len >= m->size)
        m->len = m->size - 1; /* truncated */
}

/* Drain the whole OpenSSL error queue into m as "reason (data); ...",
 * skipping repeats. Returns the number of errors seen. */
int ls_tls_drain_errors(ls_msgbuf *m)
{
    const char *data, *prev_reason = NULL, *prev_data = NULL;
    int flags, count = 0, shown = 0;
    unsigned long e;
    while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
        count++;
        const char *reason = ERR_SYSTEM_ERROR(e) ? strerror((int)ERR_GET_REASON(e))
                                                 : ERR_reason_error_string(e);
        if (!(flags & ERR_TXT_STRING) || data == NULL || *data == '\0')
            data = NULL;
        if (reason && prev_reason && strcmp(reason, prev_reason) == 0
            && (data == NULL || (prev_data && strcmp(data, prev_data) == 0)))
            continue;
        /* "system lib" follows the real system error: no news. */
        if (reason && shown > 0 && data == NULL && strcmp(reason, "system lib") == 0)
            continue;
        ls_mb_add(m, "%s", shown++ ? "; " : "");
        if (reason)
            ls_mb_add(m, "%s", reason);
        else
            ls_mb_add(m, "error:%08lX", e);
        if (data)
            ls_mb_add(m, " (%s)", data);
        prev_reason = reason;
        prev_data = data;
    }
    return count;
}

static int set_err(ls_ioerr *err, const char *token, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int set_err(ls_ioerr *err, const char *token, const char *fmt, ...)
{
    err->token = token;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->detail, sizeof err->detail, fmt, ap);
    va_end(ap);
    return LS_IO_ERROR;
}


/* ------------------------------------------------------------------ */
/* Transport BIO: recv() / send(MSG_NOSIGNAL) on a non-blocking fd. */

static BIO_METHOD *bio_method;
static pthread_once_t bio_once = PTHREAD_ONCE_INIT;

static int sbio_write(BIO *b, const char *in, int len)
{
    ls_session *s = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (s == NULL || len <= 0)
        return 0;
    for (;;) {
        ssize_t n = send(s->fd, in, (size_t)len, MSG_NOSIGNAL);
        if (n >= 0)
            return (int)n;
        if (errno == EINTR)
            continue;
        s->sys_errno = errno;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_write(b);
        return -1;
    }
}

static int sbio_read(BIO *b, char *out, int len)
{
    ls_session *s = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (s == NULL || len <= 0)
        return 0;
    for (;;) {
        ssize_t n = recv(s->fd, out, (size_t)len, 0);
        if (n > 0)
            return (int)n;
        if (n == 0) {
            s->eof = 1; /* seen by BIO_eof(): OpenSSL's "unexpected EOF" */
            return 0;
        }
        if (errno == EINTR)
            continue;
        s->sys_errno = errno;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_read(b);
        return -1;
    }
}

static int sbio_puts(BIO *b, const char *str)
{
    return sbio_write(b, str, (int)strlen(str));
}

static long sbio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num;
    ls_session *s = BIO_get_data(b);
    switch (cmd) {
    case BIO_C_GET_FD:
        if (s == NULL)
            return -1;
        if (ptr)
            *(int *)ptr = s->fd;
        return s->fd;
    case BIO_CTRL_EOF:
        return s != NULL && s->eof;
    case BIO_CTRL_GET_CLOSE:
        return BIO_NOCLOSE; /* the socket layer owns the fd */
    case BIO_CTRL_SET_CLOSE:
    case BIO_CTRL_FLUSH:
    case BIO_CTRL_DUP:
        return 1;
    default:
        return 0;
    }
}

static void bio_init_once(void)
{
    int type = BIO_get_new_index();
    if (type == -1)
        return;
    BIO_METHOD *m = BIO_meth_new(type | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                                 "luasmtp socket");
    if (m == NULL)
        return;
    if (!BIO_meth_set_write(m, sbio_write) || !BIO_meth_set_read(m, sbio_read)
        || !BIO_meth_set_puts(m, sbio_puts) || !BIO_meth_set_ctrl(m, sbio_ctrl)) {
        BIO_meth_free(m);
        return;
    }
    bio_method = m; /* process lifetime */
}

static BIO *session_bio(ls_session *s)
{
    pthread_once(&bio_once, bio_init_once);
    if (bio_method == NULL)
        return NULL;
    BIO *b = BIO_new(bio_method);
    if (b == NULL)
        return NULL;
    BIO_set_data(b, s);
    BIO_set_init(b, 1);
    return b;
}

/* "optional" client certificates: ask, record the verification result
 * (tlsinfo().verified / verify_error), never fail the handshake. Going
 * on after an error would leave the last error as the result ("unable to
 * verify the first certificate"); keep the first, the real reason. */
int ls_tls_verify_accept_all(int preverify_ok, X509_STORE_CTX *x)
{
    if (!preverify_ok) {
        SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
        ls_session *s = ssl ? SSL_get_app_data(ssl) : NULL;
        if (s) {
            if (s->first_verify_error == X509_V_OK)
                s->first_verify_error = X509_STORE_CTX_get_error(x);
            X509_STORE_CTX_set_error(x, s->first_verify_error);
        }
    }
    return 1;
}


/* ------------------------------------------------------------------ */
/* Sessions */

static int is_ip_literal(const char *s)
{
    unsigned char addr[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, s, addr) == 1 || inet_pton(AF_INET6, s, addr) == 1;
}

SSL *ls_tls_new(SSL_CTX *ctx, int fd, const char *servername, int verify_host, ls_ioerr *err)
{
    char name[256];
    ls_msgbuf m;
    SSL *ssl = NULL;

    ERR_clear_error();
    ls_session *s = calloc(1, sizeof *s);
    if (s == NULL) {
        set_err(err, LS_ETLS, "out of memory");
        return NULL;
    }
    s->fd = fd;
    if (ctx == NULL) {
        set_err(err, LS_ETLS, "TLS context is closed");
        goto fail_nossl;
    }
    if ((ssl = SSL_new(ctx)) == NULL)
        goto fail;
    BIO *bio = session_bio(s);
    if (bio == NULL)
        goto fail;
    SSL_set_bio(ssl, bio, bio); /* ssl owns the one reference */
    SSL_set_app_data(ssl, s);

    if (ls_tls_ctx_is_server(ctx)) {
        SSL_set_accept_state(ssl);
    } else {
        SSL_set_connect_state(ssl);
        if (servername && *servername) {
            /* A trailing dot (absolute DNS name) is not part of SNI. */
            size_t len = strlen(servername);
            if (servername[len - 1] == '.')
                len--;
            if (len == 0 || len >= sizeof name) {
                set_err(err, LS_ETLS, "invalid server name");
                goto fail_set;
            }
            memcpy(name, servername, len);
            name[len] = '\0';
            int ip = is_ip_literal(name);
            if (!ip && !SSL_set_tlsext_host_name(ssl, name))
                goto fail;
            /* Also when verify is off: then only tlsinfo().verified
             * depends on it. */
            if (verify_host) {
                if (ip) {
                    if (!X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name))
                        goto fail;
                } else {
                    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                    if (!SSL_set1_host(ssl, name))
                        goto fail;
                }
            }
        }
    }
    if ((s->hold = SSL_CTX_get_app_data(ctx)) != NULL)
        s->hold->refs++;
    ls_tls_live_sessions++;
    return ssl;

fail:
    err->token = LS_ETLS;
    ls_mb_init(&m, err->detail, sizeof err->detail);
    ls_mb_add(&m, "cannot set up the TLS session");
    if (ERR_peek_error() != 0) {
        ls_mb_add(&m, ": ");
        ls_tls_drain_errors(&m);
    }
fail_set:
    ERR_clear_error();
    SSL_free(ssl); /* frees the BIO, not s */
fail_nossl:
    free(s);
    return NULL;
}

void ls_tls_free(SSL *ssl)
{
    if (ssl == NULL)
        return;
    ls_session *s = SSL_get_app_data(ssl);
    SSL_free(ssl);
    ERR_clear_error();
    if (s) {
        ls_tls_hold_unref(s->hold);
        free(s);
    }
    ls_tls_live_sessions--;
}

/* Why the certificate check failed, or 0 when it did not. */
static int verify_failure(SSL *ssl, ls_ioerr *err)
{
    long vr = SSL_get_verify_result(ssl);
    unsigned long e = ERR_peek_error();
    if (vr == X509_V_OK || ERR_GET_LIB(e) != ERR_LIB_SSL
        || ERR_GET_REASON(e) != SSL_R_CERTIFICATE_VERIFY_FAILED)
        return 0;
    ls_msgbuf m;
    err->token = LS_ETLS;
    ls_mb_init(&m, err->detail, sizeof err->detail);
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    ls_session *s = SSL_get_app_data(ssl);
    if (s != NULL && s->dane) {
        /* The first reference name is the TLSA base domain. */
        const char *base = X509_VERIFY_PARAM_get0_host(param, 0);
        if (vr == X509_V_ERR_DANE_NO_MATCH)
            ls_mb_add(&m, "DANE: no TLSA record of %s matches the certificate chain "
                   "(%d usable record%s)", base ? base : "?", s->dane_usable,
                   s->dane_usable == 1 ? "" : "s");
        else if (vr == X509_V_ERR_HOSTNAME_MISMATCH)
            ls_mb_add(&m, "DANE: the certificate matches a DANE-TA record but names "
                   "neither %s nor another allowed name (RFC 7672 3.2.3)", base ? base : "?");
        else
            ls_mb_add(&m, "DANE: certificate verify failed: %s",
                   X509_verify_cert_error_string(vr));
        return 1;
    }
    ls_mb_add(&m, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
    if (vr == X509_V_ERR_HOSTNAME_MISMATCH) {
        const char *host = X509_VERIFY_PARAM_get0_host(param, 0);
        if (host)
            ls_mb_add(&m, " (expected %s)", host);
    } else if (vr == X509_V_ERR_IP_ADDRESS_MISMATCH) {
        char *ip = X509_VERIFY_PARAM_get1_ip_asc(param);
        if (ip)
            ls_mb_add(&m, " (expected %s)", ip);
        OPENSSL_free(ip);
    }
    return 1;
}

/* Map the result `ret` of an SSL call to LS_IO_*. */
static int io_result(SSL *ssl, int ret, enum tls_op op, ls_ioerr *err)
{
    ls_session *s = SSL_get_app_data(ssl);
    int e = SSL_get_error(ssl, ret);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        return LS_IO_WANTREAD;
    case SSL_ERROR_WANT_WRITE:
        return LS_IO_WANTWRITE;
    case SSL_ERROR_ZERO_RETURN: /* close_notify */
        ERR_clear_error();
        if (op == OP_HANDSHAKE)
            return set_err(err, LS_ETLS, "connection closed during handshake");
        return LS_IO_EOF;
    case SSL_ERROR_SYSCALL:
        if (ERR_peek_error() != 0)
            break; /* errors queued: report them like SSL_ERROR_SSL */
        if (s)
            s->failed = 1;
        if (s && s->sys_errno != 0)
            return set_err(err, ls_errno_token(s->sys_errno), "%s%s",
                           op == OP_HANDSHAKE ? "TLS handshake: " : "",
                           strerror(s->sys_errno));
        /* No errno: EOF without close_notify (the pre-3.0 report). */
        if (op == OP_HANDSHAKE)
            return set_err(err, LS_ETLS, "connection closed during handshake");
        return LS_IO_EOF;
    case SSL_ERROR_SSL:
        break;
    default:
        ERR_clear_error();
        if (s)
            s->failed = 1;
        return set_err(err, LS_ETLS, "unexpected SSL_get_error() result %d", e);
    }

    /* SSL_ERROR_SSL (or SYSCALL with queued errors): fatal. */
    if (s)
        s->failed = 1;
    unsigned long first = ERR_peek_error();
    if (ERR_GET_LIB(first) == ERR_LIB_SSL
        && ERR_GET_REASON(first) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        if (op == OP_HANDSHAKE)
            return set_err(err, LS_ETLS, "connection closed during handshake");
        /* EOF without close_notify. SMTP frames its own data (replies,
         * the final "." of DATA), so truncation is detected by the
         * protocol: report an ordinary EOF, as most MTAs expect. */
        return LS_IO_EOF;
    }
    if (op == OP_HANDSHAKE && verify_failure(ssl, err)) {
        ERR_clear_error();
        return LS_IO_ERROR;
    }
    if (first == 0 && s && s->sys_errno != 0)
        return set_err(err, ls_errno_token(s->sys_errno), "%s", strerror(s->sys_errno));
    err->token = LS_ETLS;
    ls_msgbuf m;
    ls_mb_init(&m, err->detail, sizeof err->detail);
    if (ls_tls_drain_errors(&m) == 0)
        ls_mb_add(&m, "TLS error");
    return LS_IO_ERROR;
}

static void io_begin(SSL *ssl)
{
    ERR_clear_error();
    ls_session *s = SSL_get_app_data(ssl);
    if (s)
        s->sys_errno = 0;
}

int ls_tls_handshake(SSL *ssl, ls_ioerr *err)
{
    io_begin(ssl);
    int ret = SSL_do_handshake(ssl);
    if (ret == 1)
        return LS_IO_OK;
    return io_result(ssl, ret, OP_HANDSHAKE, err);
}

int ls_tls_read(SSL *ssl, char *buf, size_t len, size_t *n, ls_ioerr *err)
{
    *n = 0;
    if (len == 0)
        return LS_IO_OK;
    io_begin(ssl);
    int ret = SSL_read_ex(ssl, buf, len, n);
    if (ret == 1)
        return LS_IO_OK;
    *n = 0;
    return io_result(ssl, ret, OP_READ, err);
}

int ls_tls_write(SSL *ssl, const char *buf, size_t len, size_t *n, ls_ioerr *err)
{
    *n = 0;
    if (len == 0)
        return LS_IO_OK;
    io_begin(ssl);
    int ret = SSL_write_ex(ssl, buf, len, n);
    if (ret == 1)
        return LS_IO_OK;
    *n = 0;
    return io_result(ssl, ret, OP_WRITE, err);
}

void ls_tls_shutdown(SSL *ssl)
{
    if (ssl == NULL)
        return;
    ls_session *s = SSL_get_app_data(ssl);
    ERR_clear_error();
    /* Not after a fatal error (OpenSSL forbids it), not mid-handshake,
     * and only once. */
    if ((s == NULL || !s->failed) && SSL_is_init_finished(ssl)
        && !(SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN))
        (void)SSL_shutdown(ssl);
    ERR_clear_error();
}

void ls_tls_release_buffers(SSL *ssl)
{
    if (ssl != NULL && SSL_is_init_finished(ssl))
        (void)SSL_free_buffers(ssl); /* 0: a buffer holds data, kept */
}

/* The TLS transport (lib/transport.h): t->impl is the SSL. */
static int tls_read_op(const ls_transport *t, char *buf, size_t len, size_t *n, ls_ioerr *err)
{
    return ls_tls_read(t->impl, buf, len, n, err);
}

static int tls_write_op(const ls_transport *t, const char *buf, size_t len, size_t *n,
                        ls_ioerr *err)
{
    return ls_tls_write(t->impl, buf, len, n, err);
}

const ls_transport_ops ls_tls_ops = {tls_read_op, tls_write_op};

/* ------------------------------------------------------------------ */
/* DANE (RFC 6698, RFC 7671, RFC 7672) through OpenSSL's DANE API */

/* DANE-TA(2) and DANE-EE(3) only: RFC 7672 3.1.3 makes PKIX-TA(0) and
 * PKIX-EE(1) unusable for SMTP. Selectors 0 and 1, matching types 0, 1
 * and 2 with the digest length they imply; full data must parse. */
int ls_tls_tlsa_usable(long usage, long selector, long mtype, const unsigned char *data, size_t dlen)
{
    if ((usage != 2 && usage != 3) || (selector != 0 && selector != 1) || dlen == 0)
        return 0;
    if (mtype == 1)
        return dlen == 32;
    if (mtype == 2)
        return dlen == 64;
    if (mtype != 0 || dlen > LONG_MAX)
        return 0;
    const unsigned char *p = data;
    int ok;
    if (selector == 0) {
        X509 *x = d2i_X509(NULL, &p, (long)dlen);
        ok = x != NULL && p == data + dlen;
        X509_free(x);
    } else {
        EVP_PKEY *k = d2i_PUBKEY(NULL, &p, (long)dlen);
        ok = k != NULL && p == data + dlen;
        EVP_PKEY_free(k);
    }
    ERR_clear_error();
    return ok;
}

int ls_tls_dane_enable(SSL *ssl, const char *base, ls_ioerr *err)
{
    ls_session *s = SSL_get_app_data(ssl);
    ERR_clear_error();
    if (s == NULL || base == NULL || SSL_dane_enable(ssl, base) <= 0) {
        ls_msgbuf m;
        err->token = LS_ETLS;
        ls_mb_init(&m, err->detail, sizeof err->detail);
        ls_mb_add(&m, "DANE: cannot enable DANE for %s: ", base ? base : "(no base domain)");
        ls_tls_drain_errors(&m);
        return LS_IO_ERROR;
    }
    s->dane = 1;
    s->dane_usable = 0;
    /* RFC 7672 3.2.3: names a DANE-TA certificate may carry; a wildcard
     * only as a whole first label. */
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    /* Verification must decide the handshake whatever the context's
     * verify setting: DANE replaces PKIX here, it is not optional. */
    SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
    return LS_IO_OK;
}

int ls_tls_dane_add_name(SSL *ssl, const char *name)
{
    int ok = SSL_add1_host(ssl, name);
    ERR_clear_error();
    return ok == 1;
}

int ls_tls_dane_add_tlsa(SSL *ssl, long usage, long selector, long mtype,
                         const unsigned char *data, size_t dlen)
{
    ls_session *s = SSL_get_app_data(ssl);
    int ok = s != NULL && s->dane && ls_tls_tlsa_usable(usage, selector, mtype, data, dlen)
             && SSL_dane_tlsa_add(ssl, (uint8_t)usage, (uint8_t)selector, (uint8_t)mtype, data,
                                  dlen) > 0;
    ERR_clear_error();
    if (ok)
        s->dane_usable++;
    return ok;
}

int ls_tls_dane_records(const SSL *ssl)
{
    const ls_session *s = SSL_get_app_data(ssl);
    return s != NULL && s->dane ? s->dane_usable : -1;
}
