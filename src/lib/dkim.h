/*
 * dkim.h - DKIM (RFC 6376, RFC 8463, RFC 8301) building blocks without
 * Lua: the tag-list parser, header and body canonicalisation (the body
 * streaming, hashed as it arrives), the b= blanking of a signature field
 * and the signature operations on OpenSSL EVP keys.
 *
 * Policy (which header fields, which results) is the caller's: these
 * functions only compute.
 */
#ifndef LUASMTP_DKIM_H
#define LUASMTP_DKIM_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

/* ------------------------------------------------------------------ */
/* Tag lists (RFC 6376 3.2): "v=1; a=rsa-sha256; ..." */

typedef struct dkim_tag {
    const char *name;
    size_t name_len;
    const char *value; /* leading and trailing FWS removed */
    size_t value_len;
} dkim_tag;

#define DKIM_TAGS_MAX 64

enum {
    DKIM_TAGS_SYNTAX = -1,    /* not a tag list */
    DKIM_TAGS_DUPLICATE = -2, /* a tag name twice (RFC 6376 3.2: invalid) */
    DKIM_TAGS_TOO_MANY = -3,  /* more than max tags */
};

/* Parse s[0, n) into tags[0, max). Returns the number of tags or one of
 * the negative codes above. The tags point into s. */
int dkim_tags_parse(const char *s, size_t n, dkim_tag *tags, size_t max);

/* ------------------------------------------------------------------ */
/* Header fields */

/* Canonicalise one header field f[0, n) ("Name: value\r\n", folding
 * included) into out, which has room for n + 2 bytes. relaxed: RFC 6376
 * 3.4.2, simple: 3.4.1. The result ends with CRLF (added if f lacks it).
 * Returns its length. */
size_t dkim_canon_header(int relaxed, const char *f, size_t n, char *out);

/* Copy the DKIM-Signature field f[0, n) into out (room for n bytes) with
 * the value of its b= tag removed (RFC 6376 3.7: "b=" and nothing up to
 * the next ';' or the end of the field; the final CRLF kept). Returns
 * the length, or (size_t)-1 if the field has no b= tag. */
size_t dkim_strip_b(const char *f, size_t n, char *out);

/* ------------------------------------------------------------------ */
/* Body: canonicalised (RFC 6376 3.4.3, 3.4.4) and hashed on the fly */

#define DKIM_BODY_BUF 4096

typedef struct dkim_body {
    EVP_MD_CTX *md;
    int relaxed;
    int64_t limit;         /* l= : bytes to hash, -1 for all */
    uint64_t hashed;       /* canonical bytes hashed */
    uint64_t total;        /* canonical length of the whole body */
    uint64_t empty_lines;  /* CRLFs held back (trailing empty lines) */
    int in_line;           /* the current line has content */
    int wsp;               /* relaxed: whitespace held back */
    int cr;                /* a CR was the last byte seen */
    size_t nbuf;
    unsigned char buf[DKIM_BODY_BUF];
} dkim_body;

/* 0 on success, -1 if OpenSSL fails. md: EVP_sha256() or EVP_sha1(). */
int dkim_body_init(dkim_body *b, int relaxed, const EVP_MD *md, int64_t limit);
/* Feed the next n body bytes (any split). 0 or -1 (OpenSSL failed). */
int dkim_body_update(dkim_body *b, const char *p, size_t n);
/* End of body: the digest into out (EVP_MAX_MD_SIZE bytes), its length
 * into *outlen. 0 or -1. After it, b->total is the canonical length. */
int dkim_body_final(dkim_body *b, unsigned char *out, unsigned *outlen);
/* Release the hash context (idempotent). */
void dkim_body_free(dkim_body *b);

/* ------------------------------------------------------------------ */
/* Keys and signatures */

enum dkim_hash { DKIM_SHA256 = 0, DKIM_SHA1 = 1 };

/* Public key from a key record's p= (decoded): for "rsa" a DER
 * SubjectPublicKeyInfo or a DER RSAPublicKey, for "ed25519" the 32 raw
 * bytes (RFC 8463 4.2). NULL if unusable. */
EVP_PKEY *dkim_pubkey(int ed25519, const unsigned char *p, size_t n);
/* Private key from PEM text (PKCS#8 or traditional RSA). NULL if not. */
EVP_PKEY *dkim_privkey_pem(const char *pem, size_t n);
/* 1 if the key is Ed25519, 0 if RSA, -1 otherwise. */
int dkim_key_kind(EVP_PKEY *k);

/* Verify sig over data with key (RSA PKCS#1 v1.5 with the hash, or for
 * Ed25519 PureEdDSA over the SHA-256 of data, RFC 8463 3). 1 valid, 0
 * not, -1 if OpenSSL failed otherwise. */
int dkim_verify(EVP_PKEY *key, enum dkim_hash h, const unsigned char *data, size_t n,
                const unsigned char *sig, size_t siglen);
/* Sign data; *siglen is the room in sig on entry (EVP_PKEY_get_size),
 * the length on return. 0 or -1. */
int dkim_sign(EVP_PKEY *key, enum dkim_hash h, const unsigned char *data, size_t n,
              unsigned char *sig, size_t *siglen);

#endif
