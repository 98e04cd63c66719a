/*
 * tls.c - OpenSSL contexts as Lua values.
 *
 * Lua sees one constructor, core.tls_context(params), and the context
 * methods. Other bindings get a context's SSL_CTX from
 * ls_tls_ctx_from_lua (luasmtp.h), never from the userdata; sessions on
 * it are made and driven by the Lua-free TLS transport
 * (lib/tls_transport.c). This file also backs sock:tlsinfo(),
 * sock:channel_binding() and the opts.dane table of sock:starttls.
 *
 * Conventions:
 *  - The OpenSSL error queue is cleared before each call sequence and
 *    drained into one readable message after a failure
 *    (ls_tls_drain_errors).
 *  - Bad context parameters are programming errors and raise; I/O
 *    failures are values (LS_IO_ERROR with a token and a detail).
 *
 * Lifetime:
 *  - The context userdata holds one reference to its SSL_CTX; every SSL
 *    holds its own (SSL_new up-refs), so closing or collecting the Lua
 *    object while sessions live is safe.
 *  - Extra SNI certificates live in an sni_set that is reference
 *    counted (its ls_tls_hold, the SSL_CTX's app data): one reference
 *    from the userdata and one from each session made by ls_tls_new
 *    (dropped by ls_tls_free). The servername callback of the main
 *    SSL_CTX points at it, and only our sessions can run that callback,
 *    so the set outlives every use. (An SSL_CTX ex_data free callback
 *    would do the same but registers a function pointer in OpenSSL's
 *    process-wide table that dangles once core.so is unloaded while
 *    OpenSSL stays loaded; this design needs no global state.)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "luasmtp.h"
#include "tls_transport.h"

#define TLSCTX_MT "luasmtp.tls_context"
#define ERRPREFIX "luasmtp: tls_context: "

/* RFC 9266 */
#define EXPORTER_LABEL "EXPORTER-Channel-Binding"
#define EXPORTER_LEN 32

/* ------------------------------------------------------------------ */
/* Types */

typedef struct sni_cert {
    SSL_CTX *ctx;
    char **hosts;   /* explicit names (entry.hosts), or NULL: match the cert */
    size_t nhosts;
} sni_cert;

typedef struct sni_set {
    ls_tls_hold hold; /* first: the context userdata + each live session */
    size_t n;       /* entries filled in */
    sni_cert *certs;
} sni_set;

typedef struct ls_tlsctx {
    SSL_CTX *ctx;   /* NULL once destroyed */
    sni_set *sni;   /* extra server certificates, or NULL */
    int server;
    int dane;       /* client: SSL_CTX_dane_enable done */
} ls_tlsctx;



/* Raise "luasmtp: tls_context: <message>". Everything acquired so far
 * must already be owned by the context userdata. */
_Noreturn static void ctx_raise(lua_State *L, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
_Noreturn static void ctx_raise(lua_State *L, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    luaL_error(L, ERRPREFIX "%s", buf);
    abort(); /* not reached: luaL_error does not return */
}

/* The same, followed by ": " and the drained OpenSSL error queue. */
_Noreturn static void ctx_fail(lua_State *L, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
_Noreturn static void ctx_fail(lua_State *L, const char *fmt, ...)
{
    char buf[1024];
    ls_msgbuf m;
    ls_mb_init(&m, buf, sizeof buf);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    m.len = n < 0 ? 0 : ((size_t)n >= sizeof buf ? sizeof buf - 1 : (size_t)n);
    char errs[768];
    ls_msgbuf e;
    ls_mb_init(&e, errs, sizeof errs);
    if (ls_tls_drain_errors(&e) > 0)
        ls_mb_add(&m, ": %s", errs);
    ctx_raise(L, "%s", buf);
}

/* ------------------------------------------------------------------ */
/* SNI certificate sets */

static void sni_free(ls_tls_hold *hold)
{
    sni_set *set = (sni_set *)hold;
    for (size_t i = 0; i < set->n; i++) {
        SSL_CTX_free(set->certs[i].ctx);
        for (size_t j = 0; j < set->certs[i].nhosts; j++)
            free(set->certs[i].hosts[j]);
        free(set->certs[i].hosts);
    }
    free(set->certs);
    free(set);
}

/* ASCII case-insensitive equality (host names are ASCII / A-labels). */
static int host_eq(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        unsigned char x = (unsigned char)*a, y = (unsigned char)*b;
        if (x >= 'A' && x <= 'Z')
            x = (unsigned char)(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z')
            y = (unsigned char)(y - 'A' + 'a');
        if (x != y)
            return 0;
    }
    return *a == *b;
}

/* pattern: "name" or "*.domain" (the star covers exactly one label). */
static int host_match(const char *pattern, const char *name)
{
    if (pattern[0] == '*' && pattern[1] == '.') {
        const char *dot = strchr(name, '.');
        return dot != NULL && dot != name && host_eq(dot + 1, pattern + 2);
    }
    return host_eq(pattern, name);
}

static int sni_cert_matches(const sni_cert *c, const char *name)
{
    if (c->hosts) {
        for (size_t i = 0; i < c->nhosts; i++)
            if (host_match(c->hosts[i], name))
                return 1;
        return 0;
    }
    X509 *x = SSL_CTX_get0_certificate(c->ctx);
    return x != NULL
           && X509_check_host(x, name, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) == 1;
}

/* Servername callback of the main server SSL_CTX: switch to the first
 * extra certificate that matches the requested name; otherwise keep the
 * default certificate. Never refuses a handshake over SNI. */
static int servername_cb(SSL *ssl, int *alert, void *arg)
{
    sni_set *set = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (set == NULL || name == NULL || *name == '\0')
        return SSL_TLSEXT_ERR_OK;
    for (size_t i = 0; i < set->n; i++) {
        if (sni_cert_matches(&set->certs[i], name)) {
            if (SSL_set_SSL_CTX(ssl, set->certs[i].ctx) == NULL) {
                *alert = SSL_AD_INTERNAL_ERROR;
                return SSL_TLSEXT_ERR_ALERT_FATAL;
            }
            break;
        }
    }
    return SSL_TLSEXT_ERR_OK;
}

/* ------------------------------------------------------------------ */
/* Context construction */

enum verify_mode { VERIFY_OFF, VERIFY_ON, VERIFY_OPTIONAL };

typedef struct tls_params {
    int server;
    int verify;
    int min_version, max_version;
    int session_cache;
    int dane;
    const char *cafile, *capath;
    const char *ciphers, *ciphersuites;
} tls_params;

static const char *const known_fields[] = {
    "mode", "certificate", "certificate_pem", "key", "key_pem", "cafile",
    "capath", "verify", "min_version", "max_version", "ciphers",
    "ciphersuites", "certificates", "session_cache", "dane", NULL,
};

/* Key passphrases are not supported: never prompt on the terminal.
 * u, when set, points to a flag that records the attempt. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    if (u)
        *(int *)u = 1;
    return -1;
}


/* [-0, +1, e] Push field `name` of the table at idx; it must be nil or a
 * string. Returns the string (valid while it stays on the stack); its
 * length in *len, or, when len is NULL, refuses embedded NULs. */
static const char *get_string(lua_State *L, int idx, const char *name, const char *where,
                              size_t *len)
{
    int t = lua_getfield(L, idx, name);
    if (t == LUA_TNIL) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (t != LUA_TSTRING)
        ctx_raise(L, "%s%s must be a string, got %s", where, name,
                  luaL_typename(L, -1));
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    if (len)
        *len = n;
    else if (strlen(s) != n) /* used as a C string: a NUL would cut it */
        ctx_raise(L, "%s%s contains a NUL byte", where, name);
    return s;
}

static int parse_version(lua_State *L, const char *name, const char *s)
{
    static const struct { const char *name; int v; } versions[] = {
        {"tls1", TLS1_VERSION},
        {"tls1.0", TLS1_VERSION},
        {"tls1.1", TLS1_1_VERSION},
        {"tls1.2", TLS1_2_VERSION},
        {"tls1.3", TLS1_3_VERSION},
    };
    for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++)
        if (strcmp(s, versions[i].name) == 0)
            return versions[i].v;
    ctx_raise(L, "%s: unknown TLS version '%s' (expected \"tls1\", "
              "\"tls1.1\", \"tls1.2\" or \"tls1.3\")", name, s);
}

/* Read the top-level parameters (everything but the certificates).
 * Leaves the string values on the stack so the pointers stay valid. */
static void read_params(lua_State *L, tls_params *p)
{
    memset(p, 0, sizeof *p);
    /* Unknown fields are typos: refuse them. */
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            ctx_raise(L, "parameter names must be strings");
        const char *k = lua_tostring(L, -1);
        size_t i = 0;
        while (known_fields[i] && strcmp(known_fields[i], k) != 0)
            i++;
        if (known_fields[i] == NULL)
            ctx_raise(L, "unknown parameter '%s'", k);
    }

    const char *mode = get_string(L, 1, "mode", "", NULL);
    if (mode == NULL)
        ctx_raise(L, "mode is required (\"client\" or \"server\")");
    if (strcmp(mode, "server") == 0)
        p->server = 1;
    else if (strcmp(mode, "client") != 0)
        ctx_raise(L, "mode must be \"client\" or \"server\", got '%s'", mode);

    p->verify = p->server ? VERIFY_OFF : VERIFY_ON;
    int t = lua_getfield(L, 1, "verify");
    if (t == LUA_TBOOLEAN)
        p->verify = lua_toboolean(L, -1) ? VERIFY_ON : VERIFY_OFF;
    else if (t == LUA_TSTRING && strcmp(lua_tostring(L, -1), "optional") == 0) {
        if (!p->server)
            ctx_raise(L, "verify = \"optional\" is for servers only");
        p->verify = VERIFY_OPTIONAL;
    } else if (t != LUA_TNIL)
        ctx_raise(L, "verify must be a boolean or \"optional\"");
    lua_pop(L, 1);

    t = lua_getfield(L, 1, "session_cache");
    if (t != LUA_TNIL && t != LUA_TBOOLEAN)
        ctx_raise(L, "session_cache must be a boolean");
    /* Default: off on servers (one full handshake per connection keeps
     * tls-unique and client-certificate semantics simple). */
    p->session_cache = t == LUA_TNIL ? !p->server : lua_toboolean(L, -1);
    lua_pop(L, 1);

    t = lua_getfield(L, 1, "dane");
    if (t != LUA_TNIL && t != LUA_TBOOLEAN)
        ctx_raise(L, "dane must be a boolean");
    p->dane = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (p->dane && p->server)
        ctx_raise(L, "dane is for client contexts");

    const char *v = get_string(L, 1, "min_version", "", NULL);
    p->min_version = v ? parse_version(L, "min_version", v) : TLS1_2_VERSION;
    v = get_string(L, 1, "max_version", "", NULL);
    p->max_version = v ? parse_version(L, "max_version", v) : 0;
    if (p->max_version && p->max_version < p->min_version)
        ctx_raise(L, "max_version is below min_version");

    p->cafile = get_string(L, 1, "cafile", "", NULL);
    p->capath = get_string(L, 1, "capath", "", NULL);
    p->ciphers = get_string(L, 1, "ciphers", "", NULL);
    p->ciphersuites = get_string(L, 1, "ciphersuites", "", NULL);
}

/* Settings shared by the main context and the SNI contexts. */
static void configure_common(lua_State *L, SSL_CTX *ctx, const tls_params *p)
{
    ERR_clear_error();
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    if (!SSL_CTX_set_min_proto_version(ctx, p->min_version))
        ctx_fail(L, "cannot set min_version");
    if (!SSL_CTX_set_max_proto_version(ctx, p->max_version))
        ctx_fail(L, "cannot set max_version");
    if (p->ciphers && !SSL_CTX_set_cipher_list(ctx, p->ciphers))
        ctx_fail(L, "bad ciphers '%s'", p->ciphers);
    if (p->ciphersuites && !SSL_CTX_set_ciphersuites(ctx, p->ciphersuites))
        ctx_fail(L, "bad ciphersuites '%s'", p->ciphersuites);

    switch (p->verify) {
    case VERIFY_ON:
        SSL_CTX_set_verify(ctx, p->server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
                                          : SSL_VERIFY_PEER, NULL);
        break;
    case VERIFY_OPTIONAL:
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, ls_tls_verify_accept_all);
        break;
    default:
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        break;
    }

    if (p->server) {
        static const unsigned char sid_ctx[] = "luasmtp";
        if (!SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof sid_ctx - 1))
            ctx_fail(L, "cannot set the session id context");
    }
    if (!p->session_cache) {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        if (p->server)
            SSL_CTX_set_num_tickets(ctx, 0); /* no TLS 1.3 tickets either */
    }
}

/* Trust store of the main context: cafile/capath, or the system store.
 * Servers that do not ask for client certificates need none. */
static void load_trust(lua_State *L, SSL_CTX *ctx, const tls_params *p)
{
    if (p->server && p->verify == VERIFY_OFF && !p->cafile && !p->capath)
        return;
    ERR_clear_error();
    if (p->cafile && !SSL_CTX_load_verify_file(ctx, p->cafile))
        ctx_fail(L, "cannot load cafile '%s'", p->cafile);
    if (p->capath && !SSL_CTX_load_verify_dir(ctx, p->capath))
        ctx_fail(L, "cannot use capath '%s'", p->capath);
    if (!p->cafile && !p->capath && !SSL_CTX_set_default_verify_paths(ctx))
        ctx_fail(L, "cannot load the system trust store");
    if (p->server && p->verify != VERIFY_OFF && p->cafile) {
        /* Tell clients which CAs we accept. */
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(p->cafile);
        if (names)
            SSL_CTX_set_client_CA_list(ctx, names);
        ERR_clear_error();
    }
}

/* Use the certificate chain in pem (leaf first) for ctx. 0 on failure,
 * OpenSSL errors queued; nothing is leaked. */
static int use_chain_pem(SSL_CTX *ctx, const char *pem, size_t len)
{
    if (len > INT_MAX)
        return 0;
    BIO *b = BIO_new_mem_buf(pem, (int)len);
    if (b == NULL)
        return 0;
    int ok = 0;
    X509 *x = PEM_read_bio_X509(b, NULL, no_passphrase, NULL);
    if (x == NULL || !SSL_CTX_use_certificate(ctx, x))
        goto done;
    X509_free(x);
    x = NULL;
    if (!SSL_CTX_clear_chain_certs(ctx))
        goto done;
    while ((x = PEM_read_bio_X509(b, NULL, no_passphrase, NULL)) != NULL) {
        if (!SSL_CTX_add0_chain_cert(ctx, x))
            goto done;
        x = NULL; /* owned by ctx now */
    }
    /* The loop ends at the end of the data: that is not an error. */
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE)
        ERR_clear_error();
    else if (e != 0)
        goto done;
    ok = 1;
done:
    X509_free(x);
    BIO_free(b);
    return ok;
}

static int use_key_pem(SSL_CTX *ctx, const char *pem, size_t len, int *encrypted)
{
    if (len > INT_MAX)
        return 0;
    BIO *b = BIO_new_mem_buf(pem, (int)len);
    if (b == NULL)
        return 0;
    EVP_PKEY *k = PEM_read_bio_PrivateKey(b, NULL, no_passphrase, encrypted);
    int ok = k != NULL && SSL_CTX_use_PrivateKey(ctx, k);
    EVP_PKEY_free(k);
    BIO_free(b);
    return ok;
}

/* Load certificate (+ chain) and key given in the table at idx into ctx.
 * where: "" or "certificates[i]: " for messages. Returns 1 when loaded,
 * 0 when the table names neither (allowed unless required). Raises. */
static int load_identity(lua_State *L, int idx, SSL_CTX *ctx, const char *where, int required)
{
    int top = lua_gettop(L);
    size_t certlen, keylen;
    const char *certfile = get_string(L, idx, "certificate", where, NULL);
    const char *certpem = get_string(L, idx, "certificate_pem", where, &certlen);
    const char *keyfile = get_string(L, idx, "key", where, NULL);
    const char *keypem = get_string(L, idx, "key_pem", where, &keylen);

    if (certfile && certpem)
        ctx_raise(L, "%sgive certificate or certificate_pem, not both", where);
    if (keyfile && keypem)
        ctx_raise(L, "%sgive key or key_pem, not both", where);
    int has_cert = certfile || certpem, has_key = keyfile || keypem;
    if (!has_cert && !has_key) {
        if (required)
            ctx_raise(L, "%sa server needs a certificate (certificate or "
                      "certificate_pem) and a key (key or key_pem)", where);
        lua_settop(L, top);
        return 0;
    }
    if (!has_cert)
        ctx_raise(L, "%sa key was given without a certificate", where);
    if (!has_key)
        ctx_raise(L, "%sa certificate was given without its key (key or key_pem)",
                  where);

    ERR_clear_error();
    if (certfile) {
        if (!SSL_CTX_use_certificate_chain_file(ctx, certfile))
            ctx_fail(L, "%scannot load certificate file '%s'", where, certfile);
    } else if (!use_chain_pem(ctx, certpem, certlen)) {
        ctx_fail(L, "%scannot load certificate_pem", where);
    }
    int encrypted = 0;
    SSL_CTX_set_default_passwd_cb_userdata(ctx, &encrypted);
    int ok = keyfile ? SSL_CTX_use_PrivateKey_file(ctx, keyfile, SSL_FILETYPE_PEM)
                     : use_key_pem(ctx, keypem, keylen, &encrypted);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);
    if (!ok && encrypted) {
        ERR_clear_error();
        ctx_fail(L, "%scannot load %s%s%s: the key is encrypted (passphrases are not "
                 "supported)", where, keyfile ? "key file '" : "key_pem",
                 keyfile ? keyfile : "", keyfile ? "'" : "");
    }
    if (!ok) {
        /* OpenSSL checks the pair as it loads the key: say so plainly. */
        unsigned long e = ERR_peek_last_error();
        if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
            ERR_clear_error();
            ctx_fail(L, "%sthe private key (%s) does not match the certificate", where,
                     keyfile ? keyfile : "key_pem");
        }
        if (keyfile)
            ctx_fail(L, "%scannot load key file '%s'", where, keyfile);
        ctx_fail(L, "%scannot load key_pem", where);
    }
    if (!SSL_CTX_check_private_key(ctx))
        ctx_fail(L, "%sthe private key does not match the certificate", where);
    lua_settop(L, top);
    return 1;
}

/* entry.hosts: nil, a string, or an array of strings. */
static void load_hosts(lua_State *L, int idx, sni_cert *c, const char *where)
{
    int t = lua_getfield(L, idx, "hosts");
    if (t == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    if (t != LUA_TSTRING && t != LUA_TTABLE)
        ctx_raise(L, "%shosts must be a string or an array of strings", where);
    size_t n = t == LUA_TSTRING ? 1 : lua_rawlen(L, -1);
    if (n == 0)
        ctx_raise(L, "%shosts is empty", where);
    c->hosts = calloc(n, sizeof *c->hosts);
    if (c->hosts == NULL)
        ctx_raise(L, "out of memory");
    for (size_t i = 0; i < n; i++) {
        if (t == LUA_TTABLE && lua_rawgeti(L, -1, (lua_Integer)i + 1) != LUA_TSTRING)
            ctx_raise(L, "%shosts[%d] must be a string", where, (int)i + 1);
        const char *h = lua_tostring(L, -1);
        if (*h == '\0')
            ctx_raise(L, "%shosts contains an empty name", where);
        if ((c->hosts[i] = strdup(h)) == NULL)
            ctx_raise(L, "out of memory");
        c->nhosts = i + 1;
        if (t == LUA_TTABLE)
            lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* params.certificates: one SSL_CTX per entry, owned by c->sni as soon as
 * it exists (so a raise here leaks nothing). */
static void load_sni(lua_State *L, ls_tlsctx *c, const tls_params *p)
{
    int t = lua_getfield(L, 1, "certificates");
    if (t == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    if (!p->server)
        ctx_raise(L, "certificates (SNI) is for servers only");
    if (t != LUA_TTABLE)
        ctx_raise(L, "certificates must be an array of tables");
    size_t n = lua_rawlen(L, -1);
    if (n == 0) {
        lua_pop(L, 1);
        return;
    }
    c->sni = calloc(1, sizeof *c->sni);
    if (c->sni == NULL)
        ctx_raise(L, "out of memory");
    c->sni->hold.refs = 1;
    c->sni->hold.free = sni_free;
    c->sni->certs = calloc(n, sizeof *c->sni->certs);
    if (c->sni->certs == NULL)
        ctx_raise(L, "out of memory");

    X509_STORE *store = SSL_CTX_get_cert_store(c->ctx);
    STACK_OF(X509_NAME) *ca_names = SSL_CTX_get_client_CA_list(c->ctx);
    for (size_t i = 0; i < n; i++) {
        char where[48];
        snprintf(where, sizeof where, "certificates[%d]: ", (int)i + 1);
        if (lua_rawgeti(L, -1, (lua_Integer)i + 1) != LUA_TTABLE)
            ctx_raise(L, "certificates[%d] must be a table", (int)i + 1);
        int entry = lua_gettop(L);
        ERR_clear_error();
        SSL_CTX *x = SSL_CTX_new(TLS_server_method());
        if (x == NULL)
            ctx_fail(L, "cannot create an SSL_CTX");
        sni_cert *sc = &c->sni->certs[c->sni->n++];
        sc->ctx = x;
        configure_common(L, x, p);
        /* After the switch OpenSSL verifies client certificates with the
         * new context's store and CA list: share the main ones. */
        SSL_CTX_set1_cert_store(x, store);
        if (ca_names) {
            STACK_OF(X509_NAME) *dup = SSL_dup_CA_list(ca_names);
            if (dup == NULL)
                ctx_fail(L, "cannot copy the client CA list");
            SSL_CTX_set_client_CA_list(x, dup);
        }
        load_identity(L, entry, x, where, 1);
        load_hosts(L, entry, sc, where);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    SSL_CTX_set_tlsext_servername_callback(c->ctx, servername_cb);
    SSL_CTX_set_tlsext_servername_arg(c->ctx, c->sni);
    SSL_CTX_set_app_data(c->ctx, &c->sni->hold); /* sessions hold the set */
}

/* The one destroy: close, __close and __gc. Idempotent, never calls Lua.
 * Live sessions keep their own references to the SSL_CTX and the set. */
static void tlsctx_destroy(ls_tlsctx *c)
{
    if (c->ctx == NULL)
        return;
    SSL_CTX_free(c->ctx);
    c->ctx = NULL;
    ls_tls_hold_unref(c->sni ? &c->sni->hold : NULL);
    c->sni = NULL;
    ls_live[LS_COUNT_TLS_CONTEXTS]--;
}

/*
 * core.tls_context(params) -> context                       [-0, +1, e]
 *
 * Build an OpenSSL context. Bad parameters raise (with the OpenSSL
 * reasons); see README "TLS" for the fields:
 *   mode                  "client" | "server" (required)
 *   certificate / certificate_pem, key / key_pem
 *                         chain (leaf first) and key; required for servers
 *   cafile, capath        trust store (default: the system store)
 *   verify                client: true (default) | false;
 *                         server: false (default) | true (require a client
 *                         certificate) | "optional" (ask; never fail, see
 *                         tlsinfo().verified)
 *   min_version, max_version  "tls1", "tls1.1", "tls1.2" (default min), "tls1.3"
 *   ciphers, ciphersuites OpenSSL lists for TLS <= 1.2 and TLS 1.3
 *   certificates          servers: { {certificate=, key=, hosts=}, ... }
 *                         chosen by SNI (hosts default to the cert names)
 *   session_cache         false disables resumption (server default: off)
 *   dane                  client: true enables DANE (sock:starttls opts.dane)
 *
 * Example:
 *   local ctx = core.tls_context { mode = "server",
 *       certificate = "/etc/ssl/mx.pem", key = "/etc/ssl/mx.key" }
 */
static int l_tls_context(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    luaL_checkstack(L, 24, "tls_context");

    ls_tlsctx *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, TLSCTX_MT); /* the userdata stays at slot 2 */

    tls_params p;
    read_params(L, &p);

    ERR_clear_error();
    c->ctx = SSL_CTX_new(p.server ? TLS_server_method() : TLS_client_method());
    if (c->ctx == NULL)
        ctx_fail(L, "cannot create an SSL_CTX");
    c->server = p.server;
    ls_live[LS_COUNT_TLS_CONTEXTS]++;

    configure_common(L, c->ctx, &p);
    load_trust(L, c->ctx, &p);
    load_identity(L, 1, c->ctx, "", p.server);
    load_sni(L, c, &p);
    if (p.dane) {
        ERR_clear_error();
        if (SSL_CTX_dane_enable(c->ctx) <= 0)
            ctx_fail(L, "cannot enable DANE");
        /* RFC 7672 3.1.1: DANE-EE(3) binds the key to the service: the
         * names in the certificate do not matter. */
        SSL_CTX_dane_set_flags(c->ctx, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
        c->dane = 1;
    }

    lua_settop(L, 2);
    return 1;
}

static ls_tlsctx *check_ctx(lua_State *L, int idx)
{
    ls_tlsctx *c = luaL_checkudata(L, idx, TLSCTX_MT);
    if (c->ctx == NULL)
        luaL_argerror(L, idx, "TLS context is closed");
    return c;
}

SSL_CTX *ls_tls_ctx_from_lua(lua_State *L, int idx)
{
    return check_ctx(L, idx)->ctx;
}

/* ctx:mode() -> "client" | "server"                          [-0, +1, -]
 * Example: if ctx:mode() == "server" then ... end */
static int l_ctx_mode(lua_State *L)
{
    ls_tlsctx *c = check_ctx(L, 1);
    lua_pushstring(L, c->server ? "server" : "client");
    return 1;
}

/* ctx:close()                                                [-0, +0, -]
 * Drop the context now (also done by __close and __gc). Sessions already
 * made from it keep working. Closing twice is harmless. */
static int l_ctx_close(lua_State *L)
{
    tlsctx_destroy(luaL_checkudata(L, 1, TLSCTX_MT));
    return 0;
}

static int l_ctx_tostring(lua_State *L)
{
    ls_tlsctx *c = luaL_checkudata(L, 1, TLSCTX_MT);
    if (c->ctx == NULL)
        lua_pushstring(L, "luasmtp.tls_context (closed)");
    else
        lua_pushfstring(L, "luasmtp.tls_context (%s): %p", c->server ? "server" : "client",
                        (void *)c);
    return 1;
}


/* [-0, +0, -] Read record i of the array at idx without raising:
 * 1 with the fields filled in, 0 when the entry is not a well-formed
 * TLSA table. */
static int tlsa_fields(lua_State *L, int idx, lua_Integer i, lua_Integer f[3],
                       const unsigned char **data, size_t *dlen)
{
    static const char *const names[3] = {"usage", "selector", "mtype"};
    int ok = 1;
    if (lua_rawgeti(L, idx, i) != LUA_TTABLE) {
        lua_pop(L, 1);
        return 0;
    }
    for (int k = 0; k < 3; k++) {
        lua_pushstring(L, names[k]);
        int isint;
        f[k] = lua_rawget(L, -2) == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : (isint = 0);
        ok = ok && isint && f[k] >= 0 && f[k] <= 255;
        lua_pop(L, 1);
    }
    lua_pushliteral(L, "data");
    ok = lua_rawget(L, -2) == LUA_TSTRING && ok;
    /* The string stays referenced by the record table, which the caller
     * keeps on its stack. */
    *data = ok ? (const unsigned char *)lua_tolstring(L, -1, dlen) : NULL;
    lua_pop(L, 2);
    return ok;
}

/* [-0, +0, -] A string field of the table at idx, or NULL. */
static const char *raw_string(lua_State *L, int idx, const char *key)
{
    lua_pushstring(L, key);
    const char *v = lua_rawget(L, idx) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1); /* the table keeps the string alive */
    return v;
}

/*
 * Validate opts.dane of sock:starttls (the table at idx) for context c:
 *   { base_domain = "mx.example.org",
 *     tlsa = { {usage=, selector=, mtype=, data=}, ... } (dns.query answers),
 *     names = { "example.org", ... } (more names a DANE-TA certificate may carry) }
 * Bad arguments raise: they are programming errors.        [-0, +0, v]
 */
void ls_tls_dane_check(lua_State *L, int idx, int ctx_idx)
{
    const ls_tlsctx *c = check_ctx(L, ctx_idx);
    idx = lua_absindex(L, idx);
    if (!lua_istable(L, idx))
        luaL_error(L, "luasmtp: opts.dane must be a table");
    if (c->server || !c->dane)
        luaL_error(L, "luasmtp: opts.dane needs a client context made with dane = true");
    const char *base = raw_string(L, idx, "base_domain");
    if (base == NULL || *base == '\0' || strlen(base) > 253)
        luaL_error(L, "luasmtp: opts.dane.base_domain must be a host name");
    lua_pushliteral(L, "tlsa");
    if (lua_rawget(L, idx) != LUA_TTABLE)
        luaL_error(L, "luasmtp: opts.dane.tlsa must be an array of TLSA records");
    int list = lua_gettop(L);
    lua_Integer n = (lua_Integer)lua_rawlen(L, list);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_Integer f[3];
        const unsigned char *data;
        size_t dlen;
        if (!tlsa_fields(L, list, i, f, &data, &dlen))
            luaL_error(L, "luasmtp: opts.dane.tlsa[%d] must be {usage=, selector=, mtype= "
                          "(integers 0-255), data = string}", (int)i);
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "names");
    int t = lua_rawget(L, idx);
    if (t != LUA_TNIL) {
        if (t != LUA_TTABLE)
            luaL_error(L, "luasmtp: opts.dane.names must be an array of host names");
        lua_Integer k = (lua_Integer)lua_rawlen(L, -1);
        for (lua_Integer i = 1; i <= k; i++) {
            if (lua_rawgeti(L, -1, i) != LUA_TSTRING || lua_rawlen(L, -1) == 0)
                luaL_error(L, "luasmtp: opts.dane.names[%d] must be a host name", (int)i);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
}

/* Turn DANE on for ssl (a client session of a dane context, before the
 * handshake) with the table at idx, checked by ls_tls_dane_check. Never
 * raises: the table is read again as it is now. LS_IO_OK, or
 * LS_IO_ERROR with err filled in (no usable record among them). */
int ls_tls_dane_apply(lua_State *L, int idx, SSL *ssl, ls_ioerr *err)
{
    idx = lua_absindex(L, idx);
    const char *base = raw_string(L, idx, "base_domain");
    if (ls_tls_dane_enable(ssl, base, err) != LS_IO_OK)
        return LS_IO_ERROR;
    lua_pushliteral(L, "names");
    if (lua_rawget(L, idx) == LUA_TTABLE) {
        lua_Integer k = (lua_Integer)lua_rawlen(L, -1);
        for (lua_Integer i = 1; i <= k; i++) {
            if (lua_rawgeti(L, -1, i) == LUA_TSTRING
                && !ls_tls_dane_add_name(ssl, lua_tostring(L, -1))) {
                lua_pop(L, 2);
                err->token = LS_ETLS;
                snprintf(err->detail, sizeof err->detail,
                         "DANE: cannot add the reference name %d", (int)i);
                return LS_IO_ERROR;
            }
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "tlsa");
    lua_Integer n = 0;
    if (lua_rawget(L, idx) == LUA_TTABLE) {
        int list = lua_gettop(L);
        n = (lua_Integer)lua_rawlen(L, list);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_Integer f[3];
            const unsigned char *data;
            size_t dlen;
            lua_rawgeti(L, list, i); /* keeps data alive below */
            if (tlsa_fields(L, list, i, f, &data, &dlen))
                ls_tls_dane_add_tlsa(ssl, (long)f[0], (long)f[1], (long)f[2], data, dlen);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    if (ls_tls_dane_records(ssl) <= 0) {
        err->token = LS_ETLS;
        snprintf(err->detail, sizeof err->detail,
                 "DANE: none of the %d TLSA record%s of %s is usable "
                 "(RFC 7672: usages 2 and 3, selectors 0 and 1, matching types 0-2)",
                 (int)n, n == 1 ? "" : "s", base);
        return LS_IO_ERROR;
    }
    return LS_IO_OK;
}

/* luasmtp.tls.dane_usable(tlsa) -> n, total                  [-0, +2, e]
 * How many of the records (dns.query "TLSA" answers) DANE would use for
 * SMTP: with none, sock:starttls with opts.dane fails, so a caller
 * checks first and decides (RFC 7672 2.2: mandatory unauthenticated TLS).
 *   local n = luasmtp.tls.dane_usable(res.answers) */
static int l_dane_usable(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer n = (lua_Integer)lua_rawlen(L, 1), usable = 0;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_Integer f[3];
        const unsigned char *data;
        size_t dlen;
        lua_rawgeti(L, 1, i);
        if (tlsa_fields(L, 1, i, f, &data, &dlen) && ls_tls_tlsa_usable(f[0], f[1], f[2], data, dlen))
            usable++;
        lua_pop(L, 1);
    }
    lua_pushinteger(L, usable);
    lua_pushinteger(L, n);
    return 2;
}

/* [-0, +0, m] info.dane = { matched = {usage, selector, mtype}, depth,
 * usable, peername } when DANE authenticated the peer. */
static void push_dane(lua_State *L, int t, SSL *ssl)
{
    int usable = ls_tls_dane_records(ssl);
    uint8_t usage, selector, mtype;
    const unsigned char *data;
    size_t dlen;
    if (usable < 0 || !SSL_is_init_finished(ssl)
        || SSL_get_verify_result(ssl) != X509_V_OK)
        return;
    int depth = SSL_get0_dane_tlsa(ssl, &usage, &selector, &mtype, &data, &dlen);
    if (depth < 0)
        return;
    lua_createtable(L, 0, 4);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, usage);
    lua_setfield(L, -2, "usage");
    lua_pushinteger(L, selector);
    lua_setfield(L, -2, "selector");
    lua_pushinteger(L, mtype);
    lua_setfield(L, -2, "mtype");
    lua_setfield(L, -2, "matched");
    lua_pushinteger(L, depth);
    lua_setfield(L, -2, "depth");
    lua_pushinteger(L, usable);
    lua_setfield(L, -2, "usable");
    const char *peername = SSL_get0_peername(ssl);
    if (peername) {
        lua_pushstring(L, peername);
        lua_setfield(L, -2, "peername");
    }
    lua_setfield(L, t, "dane");
}

/* ------------------------------------------------------------------ */
/* Session information */

/* [-0, +0, m] t[key] = the UTF-8 form of an ASN.1 string (if any). */
static void set_asn1_string(lua_State *L, int t, const char *key, const ASN1_STRING *str)
{
    unsigned char *utf8 = NULL;
    int len = ASN1_STRING_to_UTF8(&utf8, str);
    if (len >= 0) {
        lua_pushlstring(L, (const char *)utf8, (size_t)len);
        OPENSSL_free(utf8);
        lua_setfield(L, t, key);
    }
}

/* [-0, +1, m] An RFC 2253 one-line name (UTF-8 kept as is). */
static void push_name(lua_State *L, const X509_NAME *name)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *p;
    long len;
    if (b && X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) >= 0
        && (len = BIO_get_mem_data(b, &p)) >= 0)
        lua_pushlstring(L, p, (size_t)len);
    else
        lua_pushnil(L);
    BIO_free(b);
}

/* [-0, +1, m] "YYYY-MM-DDTHH:MM:SSZ" */
static void push_time(lua_State *L, const ASN1_TIME *t)
{
    struct tm tm;
    char buf[32];
    if (t && ASN1_TIME_to_tm(t, &tm) && strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) > 0)
        lua_pushstring(L, buf);
    else
        lua_pushnil(L);
}

/* [-0, +1, m] sans = { dns = {...}, ip = {...}, email = {...} } */
static void push_sans(lua_State *L, X509 *x)
{
    lua_createtable(L, 0, 3);
    lua_newtable(L); /* dns */
    lua_newtable(L); /* ip */
    lua_newtable(L); /* email */
    int sans = lua_absindex(L, -4);
    GENERAL_NAMES *names = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    lua_Integer ndns = 0, nip = 0, nemail = 0;
    int count = names ? sk_GENERAL_NAME_num(names) : 0;
    for (int i = 0; i < count; i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(names, i);
        int type;
        void *value = GENERAL_NAME_get0_value(g, &type);
        if (type != GEN_DNS && type != GEN_EMAIL && type != GEN_IPADD)
            continue; /* not an ASN1_STRING: other name forms are skipped */
        const ASN1_STRING *str = value;
        const unsigned char *d = ASN1_STRING_get0_data(str);
        int len = ASN1_STRING_length(str);
        if (type == GEN_DNS) {
            lua_pushlstring(L, (const char *)d, (size_t)len);
            lua_rawseti(L, sans + 1, ++ndns);
        } else if (type == GEN_EMAIL) {
            lua_pushlstring(L, (const char *)d, (size_t)len);
            lua_rawseti(L, sans + 3, ++nemail);
        } else if (len == 4 || len == 16) {
            char ip[INET6_ADDRSTRLEN];
            if (inet_ntop(len == 4 ? AF_INET : AF_INET6, d, ip, sizeof ip)) {
                lua_pushstring(L, ip);
                lua_rawseti(L, sans + 2, ++nip);
            }
        }
    }
    GENERAL_NAMES_free(names);
    lua_setfield(L, sans, "email");
    lua_setfield(L, sans, "ip");
    lua_setfield(L, sans, "dns");
}

/* [-0, +1, m] The peer table of tlsinfo(). */
static void push_peer(lua_State *L, X509 *x)
{
    lua_createtable(L, 0, 10);
    int t = lua_gettop(L);

    const X509_NAME *subject = X509_get_subject_name(x);
    push_name(L, subject);
    lua_setfield(L, t, "subject");
    push_name(L, X509_get_issuer_name(x));
    lua_setfield(L, t, "issuer");
    /* The last CN is the most specific one. */
    int idx = -1, i;
    while ((i = X509_NAME_get_index_by_NID(subject, NID_commonName, idx)) >= 0)
        idx = i;
    if (idx >= 0) {
        const X509_NAME_ENTRY *ne = X509_NAME_get_entry(subject, idx);
        set_asn1_string(L, t, "common_name", X509_NAME_ENTRY_get_data(ne));
    }
    push_sans(L, x);
    lua_setfield(L, t, "sans");

    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (X509_digest(x, EVP_sha256(), md, &mdlen)) {
        static const char hex[] = "0123456789ABCDEF";
        char fp[7 + 3 * EVP_MAX_MD_SIZE + 1];
        size_t o = 0;
        for (const char *q = "sha256:"; *q; q++)
            fp[o++] = *q;
        for (unsigned int k = 0; k < mdlen; k++) {
            if (k > 0)
                fp[o++] = ':';
            fp[o++] = hex[md[k] >> 4];
            fp[o++] = hex[md[k] & 15];
        }
        lua_pushlstring(L, fp, o);
        lua_setfield(L, t, "fingerprint");
    }

    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *serial = bn ? BN_bn2hex(bn) : NULL;
    BN_free(bn);
    if (serial) {
        lua_pushstring(L, serial);
        OPENSSL_free(serial);
        lua_setfield(L, t, "serial");
    }

    push_time(L, X509_get0_notBefore(x));
    lua_setfield(L, t, "not_before");
    push_time(L, X509_get0_notAfter(x));
    lua_setfield(L, t, "not_after");

    BIO *b = BIO_new(BIO_s_mem());
    char *p;
    long len;
    if (b && PEM_write_bio_X509(b, x) && (len = BIO_get_mem_data(b, &p)) > 0) {
        lua_pushlstring(L, p, (size_t)len);
        lua_setfield(L, t, "pem");
    }
    BIO_free(b);
    ERR_clear_error();
}

/*
 * Backs sock:tlsinfo() -> table                              [-0, +1, m]
 *   { version = "TLSv1.3", cipher = "TLS_AES_256_GCM_SHA384", bits = 256,
 *     servername = "mx.example.com" (SNI received / sent) or nil,
 *     verified = bool (chain, and host name when one was requested, ok),
 *     verify_error = "certificate has expired" or nil,
 *     session_reused = bool, alpn = nil,
 *     peer = nil | { subject, issuer, common_name,
 *                    sans = { dns = {}, ip = {}, email = {} },
 *                    fingerprint = "sha256:AB:CD:...", serial = "1000",
 *                    not_before = "2026-01-01T00:00:00Z", not_after, pem } }
 * Example: local info = sock:tlsinfo(); print(info.version, info.peer.subject)
 */
int ls_tls_pushinfo(lua_State *L, SSL *ssl)
{
    ERR_clear_error();
    lua_createtable(L, 0, 8);
    int t = lua_gettop(L);
    lua_pushstring(L, SSL_get_version(ssl));
    lua_setfield(L, t, "version");
    const SSL_CIPHER *cipher = SSL_get_current_cipher(ssl);
    if (cipher) {
        lua_pushstring(L, SSL_CIPHER_get_name(cipher));
        lua_setfield(L, t, "cipher");
        lua_pushinteger(L, SSL_CIPHER_get_bits(cipher, NULL));
        lua_setfield(L, t, "bits");
    }
    const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (sni) {
        lua_pushstring(L, sni);
        lua_setfield(L, t, "servername");
    }
    X509 *peer = SSL_get0_peer_certificate(ssl);
    long vr = SSL_get_verify_result(ssl);
    lua_pushboolean(L, peer != NULL && vr == X509_V_OK && SSL_is_init_finished(ssl));
    lua_setfield(L, t, "verified");
    if (vr != X509_V_OK) {
        lua_pushstring(L, X509_verify_cert_error_string(vr));
        lua_setfield(L, t, "verify_error");
    }
    lua_pushboolean(L, SSL_session_reused(ssl));
    lua_setfield(L, t, "session_reused");
    if (peer) {
        push_peer(L, peer);
        lua_setfield(L, t, "peer");
    }
    push_dane(L, t, ssl);
    ERR_clear_error();
    return 1;
}

/*
 * Backs sock:channel_binding([type]) -> bytes | nil, "tls", detail
 *                                                      [-0, +1|3, m|v]
 * type: "tls-exporter" (RFC 9266, TLS 1.3: 32 bytes exported with label
 * "EXPORTER-Channel-Binding", no context), "tls-unique" (RFC 5929,
 * TLS <= 1.2: the first Finished message of the handshake), or nil for
 * the one that fits the negotiated version. An unknown type raises (it is
 * argument 2 of the calling method).
 * Example: local cb = assert(sock:channel_binding()) -- for SCRAM-*-PLUS
 */
int ls_tls_pushbinding(lua_State *L, SSL *ssl, const char *type)
{
    enum { CB_EXPORTER, CB_UNIQUE } kind;
    int tls13 = SSL_version(ssl) == TLS1_3_VERSION;
    if (type == NULL)
        kind = tls13 ? CB_EXPORTER : CB_UNIQUE;
    else if (strcmp(type, "tls-exporter") == 0)
        kind = CB_EXPORTER;
    else if (strcmp(type, "tls-unique") == 0)
        kind = CB_UNIQUE;
    else
        return luaL_argerror(L, 2, lua_pushfstring(L, "unknown channel binding type '%s' "
                             "(expected \"tls-exporter\" or \"tls-unique\")", type));

    if (!SSL_is_init_finished(ssl))
        return ls_pusherror(L, LS_ETLS, "the TLS handshake is not complete");

    ERR_clear_error();
    if (kind == CB_EXPORTER) {
        if (!tls13)
            return ls_pusherror(L, LS_ETLS, "tls-exporter requires TLS 1.3");
        unsigned char out[EXPORTER_LEN];
        if (SSL_export_keying_material(ssl, out, sizeof out, EXPORTER_LABEL,
                                       sizeof EXPORTER_LABEL - 1, NULL, 0, 0) != 1) {
            char buf[200];
            ls_msgbuf m;
            ls_mb_init(&m, buf, sizeof buf);
            ls_mb_add(&m, "tls-exporter failed: ");
            ls_tls_drain_errors(&m);
            return ls_pusherror(L, LS_ETLS, buf);
        }
        lua_pushlstring(L, (const char *)out, sizeof out);
        return 1;
    }

    if (tls13)
        return ls_pusherror(L, LS_ETLS, "tls-unique is not defined for TLS 1.3 (RFC 9266)");
    /* Without the extended master secret tls-unique is open to the
     * triple handshake attack (RFC 7627): refuse it. */
    if (SSL_get_extms_support(ssl) != 1)
        return ls_pusherror(L, LS_ETLS, "tls-unique requires the extended master secret "
                                        "(RFC 7627)");
    /* The first Finished of the handshake: the client's in a full
     * handshake, the server's in an abbreviated (resumed) one. */
    int client = !SSL_is_server(ssl);
    int ours = client != (SSL_session_reused(ssl) != 0);
    unsigned char fin[EVP_MAX_MD_SIZE];
    size_t len = ours ? SSL_get_finished(ssl, fin, sizeof fin)
                      : SSL_get_peer_finished(ssl, fin, sizeof fin);
    if (len == 0 || len > sizeof fin)
        return ls_pusherror(L, LS_ETLS, "tls-unique: no Finished message");
    lua_pushlstring(L, (const char *)fin, len);
    return 1;
}

/* ------------------------------------------------------------------ */

int ls_open_tls(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"mode", l_ctx_mode},
        {"close", l_ctx_close},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, TLSCTX_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_ctx_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_ctx_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, l_ctx_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_tls_context);
    lua_setfield(L, -2, "tls_context");
    lua_pushcfunction(L, l_dane_usable);
    lua_setfield(L, -2, "dane_usable");
    return 0;
}
