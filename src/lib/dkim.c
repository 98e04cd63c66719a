/*
 * dkim.c - DKIM canonicalisation, tag lists and signatures, no Lua.
 *
 * Everything a sender controls arrives here: a signature field, a key
 * record, the body. Lengths are checked before each read, no buffer
 * grows with the input (the body is hashed through a fixed buffer; held
 * back empty lines are a counter), and all output sizes are bounded by
 * the input size the caller allocates for.
 */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "dkim.h"

static int is_wsp(int c)
{
    return c == ' ' || c == '\t';
}

/* Whitespace in a tag list: WSP and the CR LF of folding. */
static int is_fws(int c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static int is_alpha(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static int is_alnumpunc(int c)
{
    return is_alpha(c) || (c >= '0' && c <= '9') || c == '_';
}

/* VALCHAR of RFC 6376 3.2: %x21-3A / %x3C-7E */
static int is_valchar(int c)
{
    return c >= 0x21 && c <= 0x7e && c != ';';
}

/* ------------------------------------------------------------------ */
/* Tag lists */

int dkim_tags_parse(const char *s, size_t n, dkim_tag *tags, size_t max)
{
    size_t i = 0;
    int count = 0;
    while (i < n) {
        while (i < n && is_fws((unsigned char)s[i]))
            i++;
        if (i == n)
            break; /* trailing ";" followed by whitespace */
        if (!is_alpha((unsigned char)s[i]))
            return DKIM_TAGS_SYNTAX;
        size_t name = i;
        while (i < n && is_alnumpunc((unsigned char)s[i]))
            i++;
        size_t name_len = i - name;
        while (i < n && is_fws((unsigned char)s[i]))
            i++;
        if (i == n || s[i] != '=')
            return DKIM_TAGS_SYNTAX;
        i++;
        while (i < n && is_fws((unsigned char)s[i]))
            i++;
        size_t value = i, value_end = i;
        while (i < n && s[i] != ';') {
            int c = (unsigned char)s[i];
            if (is_valchar(c))
                value_end = i + 1;
            else if (!is_fws(c))
                return DKIM_TAGS_SYNTAX;
            i++;
        }
        for (int k = 0; k < count; k++)
            if (tags[k].name_len == name_len && memcmp(tags[k].name, s + name, name_len) == 0)
                return DKIM_TAGS_DUPLICATE;
        if ((size_t)count >= max)
            return DKIM_TAGS_TOO_MANY;
        tags[count].name = s + name;
        tags[count].name_len = name_len;
        tags[count].value = s + value;
        tags[count].value_len = value_end - value;
        count++;
        if (i < n)
            i++; /* the ';' */
    }
    return count;
}

/* ------------------------------------------------------------------ */
/* Header fields */

size_t dkim_canon_header(int relaxed, const char *f, size_t n, char *out)
{
    size_t o = 0;
    if (n >= 2 && f[n - 2] == '\r' && f[n - 1] == '\n')
        n -= 2;
    if (!relaxed) {
        memcpy(out, f, n);
        o = n;
    } else {
        size_t i = 0;
        /* the name, lowercased; whitespace before the colon dropped */
        while (i < n && f[i] != ':') {
            int c = (unsigned char)f[i++];
            if (is_fws(c))
                continue;
            out[o++] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
        if (i < n) {
            out[o++] = ':';
            i++;
        }
        /* the value: unfolded, whitespace runs as one SP, none at the
         * start or the end */
        int space = 0, started = 0;
        for (; i < n; i++) {
            int c = (unsigned char)f[i];
            if (c == '\r' || c == '\n') {
                /* unfold: CRLF of folding removed; a stray CR or LF
                 * counts as whitespace so words stay apart */
                space = started;
                continue;
            }
            if (is_wsp(c)) {
                space = started;
                continue;
            }
            if (space)
                out[o++] = ' ';
            space = 0;
            started = 1;
            out[o++] = (char)c;
        }
    }
    out[o++] = '\r';
    out[o++] = '\n';
    return o;
}

size_t dkim_strip_b(const char *f, size_t n, char *out)
{
    size_t end = n;
    if (end >= 2 && f[end - 2] == '\r' && f[end - 1] == '\n')
        end -= 2;
    const char *colon = memchr(f, ':', end);
    if (colon == NULL)
        return (size_t)-1;
    size_t i = (size_t)(colon - f) + 1;
    while (i < end) {
        while (i < end && is_fws((unsigned char)f[i]))
            i++;
        size_t name = i;
        while (i < end && is_alnumpunc((unsigned char)f[i]))
            i++;
        size_t name_len = i - name;
        while (i < end && is_fws((unsigned char)f[i]))
            i++;
        if (name_len == 1 && f[name] == 'b' && i < end && f[i] == '=') {
            size_t keep = i + 1, after = keep;
            while (after < end && f[after] != ';')
                after++;
            memcpy(out, f, keep);
            memcpy(out + keep, f + after, n - after);
            return keep + (n - after);
        }
        while (i < end && f[i] != ';')
            i++;
        if (i < end)
            i++;
    }
    return (size_t)-1;
}

/* ------------------------------------------------------------------ */
/* Body */

int dkim_body_init(dkim_body *b, int relaxed, const EVP_MD *md, int64_t limit)
{
    memset(b, 0, sizeof *b);
    b->relaxed = relaxed;
    b->limit = limit;
    b->md = EVP_MD_CTX_new();
    if (b->md == NULL)
        return -1;
    if (EVP_DigestInit_ex(b->md, md, NULL) != 1) {
        dkim_body_free(b);
        return -1;
    }
    return 0;
}

void dkim_body_free(dkim_body *b)
{
    EVP_MD_CTX_free(b->md);
    b->md = NULL;
}

static int flush(dkim_body *b)
{
    if (b->nbuf == 0)
        return 0;
    int ok = EVP_DigestUpdate(b->md, b->buf, b->nbuf);
    b->nbuf = 0;
    return ok == 1 ? 0 : -1;
}

/* One canonical byte: counted, and hashed while under the limit. */
static int emit(dkim_body *b, unsigned char c)
{
    b->total++;
    if (b->limit >= 0 && b->hashed >= (uint64_t)b->limit)
        return 0;
    b->hashed++;
    b->buf[b->nbuf++] = c;
    if (b->nbuf == sizeof b->buf)
        return flush(b);
    return 0;
}

static int emit_crlf(dkim_body *b)
{
    if (emit(b, '\r') != 0)
        return -1;
    return emit(b, '\n');
}

/* A content byte of the current line (not CR LF, not held whitespace). */
static int content(dkim_body *b, unsigned char c)
{
    if (!b->in_line) {
        for (; b->empty_lines > 0; b->empty_lines--)
            if (emit_crlf(b) != 0)
                return -1;
        b->in_line = 1;
    }
    if (b->wsp) {
        b->wsp = 0;
        if (emit(b, ' ') != 0)
            return -1;
    }
    return emit(b, c);
}

static int end_of_line(dkim_body *b)
{
    b->wsp = 0; /* relaxed: whitespace at the end of a line goes */
    if (!b->in_line) {
        b->empty_lines++;
        return 0;
    }
    b->in_line = 0;
    return emit_crlf(b);
}

/* A run of n content bytes inside a line, with nothing held back. */
static int emit_run(dkim_body *b, const unsigned char *p, size_t n)
{
    b->total += n;
    if (b->limit >= 0) {
        uint64_t room = b->hashed >= (uint64_t)b->limit ? 0 : (uint64_t)b->limit - b->hashed;
        if (n > room)
            n = (size_t)room;
    }
    b->hashed += n;
    while (n > 0) {
        size_t k = sizeof b->buf - b->nbuf;
        if (k > n)
            k = n;
        memcpy(b->buf + b->nbuf, p, k);
        b->nbuf += k;
        p += k;
        n -= k;
        if (b->nbuf == sizeof b->buf && flush(b) != 0)
            return -1;
    }
    return 0;
}

/* Length of the run at p[0, n) that needs no per-byte care: no CR, and
 * for relaxed no SP or HTAB. */
static size_t plain_run(const dkim_body *b, const unsigned char *p, size_t n)
{
    size_t i = 0;
    if (b->relaxed) {
        while (i < n && p[i] != '\r' && p[i] != ' ' && p[i] != '\t')
            i++;
    } else {
        const unsigned char *cr = memchr(p, '\r', n);
        i = cr ? (size_t)(cr - p) : n;
    }
    return i;
}

int dkim_body_update(dkim_body *b, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (b->in_line && !b->wsp && !b->cr) {
            size_t run = plain_run(b, (const unsigned char *)p + i, n - i);
            if (run > 0) {
                if (emit_run(b, (const unsigned char *)p + i, run) != 0)
                    return -1;
                i += run;
                if (i == n)
                    break;
            }
        }
        unsigned char c = (unsigned char)p[i];
        if (b->cr) {
            b->cr = 0;
            if (c == '\n') {
                if (end_of_line(b) != 0)
                    return -1;
                continue;
            }
            if (content(b, '\r') != 0) /* a bare CR is line content */
                return -1;
        }
        if (c == '\r') {
            b->cr = 1;
        } else if (b->relaxed && is_wsp(c)) {
            /* whitespace runs become one SP, emitted before the next
             * content byte of the line (so also at its start); a line
             * of only whitespace stays an empty line */
            b->wsp = 1;
        } else if (content(b, c) != 0) {
            return -1;
        }
    }
    return 0;
}

int dkim_body_final(dkim_body *b, unsigned char *out, unsigned *outlen)
{
    if (b->md == NULL)
        return -1;
    if (b->cr) {
        b->cr = 0;
        if (content(b, '\r') != 0)
            return -1;
    }
    /* an incomplete last line gets its CRLF; held empty lines go */
    if (b->in_line && end_of_line(b) != 0)
        return -1;
    /* simple: an empty body is one CRLF (RFC 6376 3.4.3); relaxed: it
     * stays empty (3.4.4) */
    if (!b->relaxed && b->total == 0 && emit_crlf(b) != 0)
        return -1;
    if (flush(b) != 0 || EVP_DigestFinal_ex(b->md, out, outlen) != 1)
        return -1;
    dkim_body_free(b);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Keys and signatures */

EVP_PKEY *dkim_pubkey(int ed25519, const unsigned char *p, size_t n)
{
    if (n == 0 || n > 16384)
        return NULL;
    if (ed25519)
        return n == 32 ? EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, p, n) : NULL;
    const unsigned char *q = p;
    EVP_PKEY *k = d2i_PUBKEY(NULL, &q, (long)n);
    if (k == NULL || q != p + n) {
        EVP_PKEY_free(k);
        q = p;
        k = d2i_PublicKey(EVP_PKEY_RSA, NULL, &q, (long)n);
        if (k != NULL && q != p + n) {
            EVP_PKEY_free(k);
            k = NULL;
        }
    }
    if (k != NULL && EVP_PKEY_get_base_id(k) != EVP_PKEY_RSA) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    return k;
}

EVP_PKEY *dkim_privkey_pem(const char *pem, size_t n)
{
    if (n > 1 << 20)
        return NULL;
    BIO *bio = BIO_new_mem_buf(pem, (int)n);
    if (bio == NULL)
        return NULL;
    EVP_PKEY *k = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (k != NULL && dkim_key_kind(k) < 0) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    return k;
}

int dkim_key_kind(EVP_PKEY *k)
{
    switch (EVP_PKEY_get_base_id(k)) {
    case EVP_PKEY_ED25519:
        return 1;
    case EVP_PKEY_RSA:
        return 0;
    default:
        return -1;
    }
}

/* Ed25519 signs the SHA-256 of the data (RFC 8463 3). */
static int sha256(const unsigned char *data, size_t n, unsigned char *out)
{
    unsigned len = 0;
    return EVP_Digest(data, n, out, &len, EVP_sha256(), NULL) == 1 ? 0 : -1;
}

/* What is signed and with which digest: RSA signs data with the hash;
 * Ed25519 signs the SHA-256 of data with no digest of its own. */
static int prepare(EVP_PKEY *key, enum dkim_hash h, const unsigned char **data, size_t *n,
                   unsigned char digest[32], const EVP_MD **md)
{
    if (dkim_key_kind(key) == 1) {
        if (h != DKIM_SHA256 || sha256(*data, *n, digest) != 0)
            return -1;
        *data = digest;
        *n = 32;
        *md = NULL;
    } else {
        *md = h == DKIM_SHA1 ? EVP_sha1() : EVP_sha256();
    }
    return 0;
}

int dkim_verify(EVP_PKEY *key, enum dkim_hash h, const unsigned char *data, size_t n,
                const unsigned char *sig, size_t siglen)
{
    unsigned char digest[32];
    const EVP_MD *md;
    if (prepare(key, h, &data, &n, digest, &md) != 0)
        return -1;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return -1;
    int r = -1;
    if (EVP_DigestVerifyInit(ctx, NULL, md, NULL, key) == 1)
        r = EVP_DigestVerify(ctx, sig, siglen, data, n) == 1 ? 1 : 0;
    EVP_MD_CTX_free(ctx);
    return r;
}

int dkim_sign(EVP_PKEY *key, enum dkim_hash h, const unsigned char *data, size_t n,
              unsigned char *sig, size_t *siglen)
{
    unsigned char digest[32];
    const EVP_MD *md;
    if (prepare(key, h, &data, &n, digest, &md) != 0)
        return -1;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return -1;
    int r = -1;
    if (EVP_DigestSignInit(ctx, NULL, md, NULL, key) == 1 &&
        EVP_DigestSign(ctx, sig, siglen, data, n) == 1)
        r = 0;
    EVP_MD_CTX_free(ctx);
    return r;
}
