/*
 * crypto.c - hashes, HMAC, PBKDF2, random bytes, constant-time compare,
 * strict base64, XOR, crypt(3) and the CRAM-MD5 HMAC context; and the
 * file signature the credential stores use to notice a changed file.
 *
 * Everything here is a pure function of its arguments (no I/O, no
 * waiting). The hashing comes from OpenSSL; crypt(3) from libxcrypt.
 * Programming errors (unknown algorithm, lengths out of range) raise; a
 * failure of OpenSSL itself (out of memory, RNG failure) raises too, as
 * there is nothing sensible a caller could do with it. Only `crypt`
 * returns `nil, token, detail`, because its setting usually comes from a
 * credentials file and may be malformed.
 *
 * base64 decoding is implemented here rather than with EVP_DecodeBlock,
 * which accepts whitespace and non-canonical input: SASL must answer 501
 * to anything that is not exactly base64.
 */
#include <crypt.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/md5.h>
#include <openssl/rand.h>

#include "luasmtp.h"

#define RANDOM_MAX 4096
#define PBKDF2_MAX_ITERATIONS 10000000
#define PBKDF2_MAX_LENGTH 1024
#define CRAM_CONTEXT_LEN 32 /* bytes: outer and inner MD5 state */

/* ------------------------------------------------------------------ */
/* Helpers */

static const EVP_MD *check_md(lua_State *L, int arg)
{
    static const char *const names[] = {"md5", "sha1", "sha256", "sha512", NULL};
    switch (luaL_checkoption(L, arg, NULL, names)) {
    case 0:
        return EVP_md5();
    case 1:
        return EVP_sha1();
    case 2:
        return EVP_sha256();
    default:
        return EVP_sha512();
    }
}

/* Lowercase hex of n bytes into out (2n bytes, not terminated). */
static void to_hex(const unsigned char *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
}

static int hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* ------------------------------------------------------------------ */
/* Hashes */

/* digest(alg, data) -> bytes
 *   alg: "md5" | "sha1" | "sha256" | "sha512"
 *   e.g. digest("sha256", "abc") -> 32 raw bytes           [-0, +1, v] */
static int l_digest(lua_State *L)
{
    const EVP_MD *md = check_md(L, 1);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int outlen = 0;
    if (!EVP_Digest(data, len, out, &outlen, md, NULL))
        return luaL_error(L, "digest: OpenSSL failure");
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* hmac(alg, key, data) -> bytes
 *   HMAC (RFC 2104) with one of the digest algorithms; the key may be of
 *   any length, empty included.
 *   e.g. hmac("sha256", key, msg) -> 32 raw bytes           [-0, +1, v] */
static int l_hmac(lua_State *L)
{
    const EVP_MD *md = check_md(L, 1);
    size_t klen, dlen;
    const char *key = luaL_checklstring(L, 2, &klen);
    const char *data = luaL_checklstring(L, 3, &dlen);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int outlen = 0;
    if (klen > INT32_MAX)
        return luaL_argerror(L, 2, "key too long");
    if (HMAC(md, key, (int)klen, (const unsigned char *)data, dlen, out, &outlen) == NULL)
        return luaL_error(L, "hmac: OpenSSL failure");
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* pbkdf2(alg, password, salt, iterations, length) -> bytes
 *   PBKDF2-HMAC (RFC 8018); SCRAM's Hi() is pbkdf2(alg, p, s, i, hashlen).
 *   iterations: 1 .. 10,000,000; length: 1 .. 1024 bytes.
 *   A server must check counts received from a peer itself: the cap here
 *   only stops absurd values.                                [-0, +1, v] */
static int l_pbkdf2(lua_State *L)
{
    const EVP_MD *md = check_md(L, 1);
    size_t plen, slen;
    const char *pass = luaL_checklstring(L, 2, &plen);
    const char *salt = luaL_checklstring(L, 3, &slen);
    lua_Integer iter = luaL_checkinteger(L, 4);
    lua_Integer len = luaL_checkinteger(L, 5);
    luaL_argcheck(L, iter >= 1 && iter <= PBKDF2_MAX_ITERATIONS, 4,
                  "iterations must be in [1, 10000000]");
    luaL_argcheck(L, len >= 1 && len <= PBKDF2_MAX_LENGTH, 5, "length must be in [1, 1024]");
    luaL_argcheck(L, plen <= INT32_MAX, 2, "password too long");
    luaL_argcheck(L, slen <= INT32_MAX, 3, "salt too long");
    unsigned char out[PBKDF2_MAX_LENGTH];
    if (!PKCS5_PBKDF2_HMAC(pass, (int)plen, (const unsigned char *)salt, (int)slen, (int)iter,
                           md, (int)len, out))
        return luaL_error(L, "pbkdf2: OpenSSL failure");
    lua_pushlstring(L, (const char *)out, (size_t)len);
    OPENSSL_cleanse(out, sizeof out);
    return 1;
}

/* random(n) -> bytes
 *   n (1 .. 4096) bytes from OpenSSL's CSPRNG; raises if it fails.
 *                                                            [-0, +1, v] */
static int l_random(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 1 && n <= RANDOM_MAX, 1, "n must be in [1, 4096]");
    unsigned char out[RANDOM_MAX];
    if (RAND_bytes(out, (int)n) != 1)
        return luaL_error(L, "random: RAND_bytes failed");
    lua_pushlstring(L, (const char *)out, (size_t)n);
    return 1;
}

/* equal(a, b) -> boolean
 *   Constant-time comparison: the time depends on the lengths only, never
 *   on where the contents differ. Strings of different lengths are not
 *   equal.                                                   [-0, +1, v] */
static int l_equal(lua_State *L)
{
    size_t alen, blen;
    const char *a = luaL_checklstring(L, 1, &alen);
    const char *b = luaL_checklstring(L, 2, &blen);
    if (alen != blen) {
        /* same amount of work as a comparison of a, result discarded */
        volatile int sink = CRYPTO_memcmp(a, a, alen);
        (void)sink;
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pushboolean(L, CRYPTO_memcmp(a, b, alen) == 0);
    return 1;
}

/* xor(a, b) -> bytes
 *   Byte-wise exclusive or of two strings of the same length (SCRAM:
 *   ClientProof = ClientKey XOR ClientSignature).            [-0, +1, v] */
static int l_xor(lua_State *L)
{
    size_t alen, blen;
    const char *a = luaL_checklstring(L, 1, &alen);
    const char *b = luaL_checklstring(L, 2, &blen);
    luaL_argcheck(L, alen == blen, 2, "strings must have the same length");
    luaL_Buffer buf;
    char *out = luaL_buffinitsize(L, &buf, alen);
    for (size_t i = 0; i < alen; i++)
        out[i] = (char)(a[i] ^ b[i]);
    luaL_pushresultsize(&buf, alen);
    return 1;
}

/* ------------------------------------------------------------------ */
/* base64 (RFC 4648, standard alphabet, padded) */

static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* b64encode(s) -> string
 *   Standard alphabet with padding, on one line.             [-0, +1, v] */
static int l_b64encode(lua_State *L)
{
    size_t len;
    const unsigned char *in = (const unsigned char *)luaL_checklstring(L, 1, &len);
    luaL_argcheck(L, len <= (SIZE_MAX / 4) * 3 - 3, 1, "string too long");
    size_t outlen = (len + 2) / 3 * 4;
    luaL_Buffer buf;
    char *out = luaL_buffinitsize(L, &buf, outlen);
    size_t o = 0, i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64chars[v >> 18];
        out[o++] = b64chars[(v >> 12) & 63];
        out[o++] = b64chars[(v >> 6) & 63];
        out[o++] = b64chars[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = b64chars[v >> 18];
        out[o++] = b64chars[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = b64chars[v >> 18];
        out[o++] = b64chars[(v >> 12) & 63];
        out[o++] = b64chars[(v >> 6) & 63];
        out[o++] = '=';
    }
    luaL_pushresultsize(&buf, o);
    return 1;
}

/* Value of a base64 character, -1 for anything else ('=' included). */
static int b64value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Strict decode into out (room for len / 4 * 3 bytes). Returns the
 * decoded length, or -1 if the input is not canonical padded base64:
 * length not a multiple of 4, a character outside the alphabet
 * (whitespace included), '=' anywhere but as one or two final pad
 * characters, or non-zero bits in the unused part of the last group. */
static long b64decode(const unsigned char *in, size_t len, unsigned char *out)
{
    if (len % 4 != 0)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 4) {
        int last = (i + 4 == len);
        int pad = 0;
        if (last && in[i + 3] == '=') {
            pad = 1;
            if (in[i + 2] == '=')
                pad = 2;
        }
        int v[4];
        for (int k = 0; k < 4 - pad; k++) {
            v[k] = b64value(in[i + (size_t)k]);
            if (v[k] < 0)
                return -1;
        }
        if (pad == 2) {
            if (v[1] & 15)
                return -1;
            out[o++] = (unsigned char)(v[0] << 2 | v[1] >> 4);
        } else if (pad == 1) {
            if (v[2] & 3)
                return -1;
            out[o++] = (unsigned char)(v[0] << 2 | v[1] >> 4);
            out[o++] = (unsigned char)((v[1] & 15) << 4 | v[2] >> 2);
        } else {
            out[o++] = (unsigned char)(v[0] << 2 | v[1] >> 4);
            out[o++] = (unsigned char)((v[1] & 15) << 4 | v[2] >> 2);
            out[o++] = (unsigned char)((v[2] & 3) << 6 | v[3]);
        }
    }
    return (long)o;
}

/* b64decode(s) -> bytes | nil
 *   Strict: standard alphabet, length a multiple of 4, correct padding,
 *   canonical final bits, no whitespace. nil for any invalid input; ""
 *   decodes to "".                                           [-0, +1, v] */
static int l_b64decode(lua_State *L)
{
    size_t len;
    const unsigned char *in = (const unsigned char *)luaL_checklstring(L, 1, &len);
    if (len == 0) {
        lua_pushliteral(L, "");
        return 1;
    }
    if (len % 4 != 0 || len > (size_t)LONG_MAX / 3 * 4 - 4) {
        lua_pushnil(L);
        return 1;
    }
    luaL_Buffer buf;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &buf, len / 4 * 3);
    long n = b64decode(in, len, out);
    if (n < 0) {
        luaL_pushresultsize(&buf, 0);
        lua_pop(L, 1);
        lua_pushnil(L);
        return 1;
    }
    luaL_pushresultsize(&buf, (size_t)n);
    return 1;
}

/* ------------------------------------------------------------------ */
/* crypt(3) through libxcrypt */

/* crypt(password, setting) -> hash | nil, "invalid" | "io", detail
 *   Hash password with the method and salt in setting, which is either a
 *   setting from crypt_gensalt or a complete hash (to verify a password,
 *   compare crypt(password, hash) with hash using equal). Methods are
 *   those of the system's libxcrypt: "$y$" yescrypt, "$6$" SHA512-CRYPT,
 *   "$5$" SHA256-CRYPT, "$2b$"/"$2y$" bcrypt, "$1$" MD5-CRYPT, DES...
 *   "invalid": the setting is malformed or its method unsupported, or
 *   the password holds a NUL byte or is too long (512 bytes or more).
 *                                                            [-0, +1|3, v] */
static int l_crypt(lua_State *L)
{
    size_t plen, slen;
    const char *pass = luaL_checklstring(L, 1, &plen);
    const char *setting = luaL_checklstring(L, 2, &slen);
    if (strlen(pass) != plen)
        return ls_pusherror(L, "invalid", "password contains a NUL byte");
    if (strlen(setting) != slen)
        return ls_pusherror(L, "invalid", "setting contains a NUL byte");
    struct crypt_data *cd = calloc(1, sizeof *cd);
    if (cd == NULL)
        return ls_pusherror(L, LS_EIO, "out of memory");
    errno = 0;
    char *hash = crypt_rn(pass, setting, cd, (int)sizeof *cd);
    int err = errno;
    if (hash == NULL) {
        OPENSSL_cleanse(cd, sizeof *cd);
        free(cd);
        if (err == EINVAL || err == ERANGE || err == ENOSYS || err == 0)
            return ls_pusherror(L, "invalid",
                                err == ERANGE ? "password too long"
                                              : "invalid or unsupported setting");
        return ls_pusherror(L, LS_EIO, strerror(err));
    }
    /* Copy to a local buffer first: pushing may raise (memory) and must
     * not leak cd. */
    char out[CRYPT_OUTPUT_SIZE];
    size_t hlen = strnlen(hash, sizeof out - 1);
    memcpy(out, hash, hlen);
    OPENSSL_cleanse(cd, sizeof *cd);
    free(cd);
    lua_pushlstring(L, out, hlen);
    return 1;
}

/* crypt_gensalt(prefix [, rounds]) -> setting
 *   A new setting with a random salt for crypt: prefix "$y$", "$6$",
 *   "$5$", "$2b$", ...; rounds 0 or nil for the method's default (the
 *   meaning of rounds depends on the method: SHA-crypt iterations, bcrypt
 *   and yescrypt cost). Raises if the prefix is unsupported or the rounds
 *   out of range for the method.
 *   e.g. crypt(pw, crypt_gensalt("$6$")) -> "$6$...$..."    [-0, +1, v] */
static int l_crypt_gensalt(lua_State *L)
{
    const char *prefix = luaL_checkstring(L, 1);
    lua_Integer rounds = luaL_optinteger(L, 2, 0);
    luaL_argcheck(L, rounds >= 0 && rounds <= 999999999, 2, "rounds must be in [0, 999999999]");
    char out[CRYPT_GENSALT_OUTPUT_SIZE];
    errno = 0;
    /* NULL random bytes: libxcrypt reads them from the kernel itself. */
    if (crypt_gensalt_rn(prefix, (unsigned long)rounds, NULL, 0, out, (int)sizeof out) == NULL) {
        int err = errno;
        lua_pushfstring(L, "crypt_gensalt: %s", err == EINVAL ? "unsupported prefix or rounds"
                                                               : strerror(err));
        return luaL_argerror(L, 1, lua_tostring(L, -1));
    }
    lua_pushstring(L, out);
    return 1;
}

/* ------------------------------------------------------------------ */
/* CRAM-MD5 precomputed HMAC context (Dovecot's {CRAM-MD5} scheme)
 *
 * HMAC-MD5(K, m) = MD5(K^opad || MD5(K^ipad || m)). Dovecot stores the
 * MD5 chaining state after the first 64-byte block of each of the two
 * hashes: words A B C D of the outer (opad) state, then of the inner
 * (ipad) state, each word little-endian, 32 bytes, as hex. That needs the low-level
 * MD5 API (deprecated in OpenSSL 3 but present) to read and restore the
 * state words, which EVP does not expose. */

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif

static void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* State after one 64-byte block of key ^ pad into out (16 bytes). */
static int cram_state(const unsigned char *key, size_t klen, unsigned char pad, unsigned char *out)
{
    unsigned char block[64];
    MD5_CTX ctx;
    memset(block, pad, sizeof block);
    for (size_t i = 0; i < klen; i++)
        block[i] ^= key[i];
    int ok = MD5_Init(&ctx) && MD5_Update(&ctx, block, sizeof block);
    if (ok) {
        put_le32(out, ctx.A);
        put_le32(out + 4, ctx.B);
        put_le32(out + 8, ctx.C);
        put_le32(out + 12, ctx.D);
    }
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(&ctx, sizeof ctx);
    return ok;
}

/* Finish an MD5 whose first 64 bytes were hashed into state (16 bytes). */
static int cram_finish(const unsigned char *state, const unsigned char *data, size_t len,
                       unsigned char *out)
{
    MD5_CTX ctx;
    int ok = MD5_Init(&ctx);
    ctx.A = get_le32(state);
    ctx.B = get_le32(state + 4);
    ctx.C = get_le32(state + 8);
    ctx.D = get_le32(state + 12);
    ctx.Nl = 64 * 8; /* one block (bits) already processed */
    ctx.Nh = 0;
    ctx.num = 0;
    ok = ok && MD5_Update(&ctx, data, len) && MD5_Final(out, &ctx);
    OPENSSL_cleanse(&ctx, sizeof ctx);
    return ok;
}

/* cram_md5_context(password) -> hex
 *   The 64 hex digits Dovecot stores as {CRAM-MD5}: the HMAC-MD5 outer
 *   and inner states for key = password (hashed first if longer than 64
 *   bytes, as HMAC does).                                    [-0, +1, v] */
static int l_cram_md5_context(lua_State *L)
{
    size_t plen;
    const unsigned char *pass = (const unsigned char *)luaL_checklstring(L, 1, &plen);
    unsigned char key[MD5_DIGEST_LENGTH];
    if (plen > 64) {
        if (!EVP_Digest(pass, plen, key, NULL, EVP_md5(), NULL))
            return luaL_error(L, "cram_md5_context: OpenSSL failure");
        pass = key;
        plen = sizeof key;
    }
    unsigned char ctx[CRAM_CONTEXT_LEN];
    int ok = cram_state(pass, plen, 0x5c, ctx) && cram_state(pass, plen, 0x36, ctx + 16);
    OPENSSL_cleanse(key, sizeof key);
    if (!ok)
        return luaL_error(L, "cram_md5_context: OpenSSL failure");
    char hex[2 * CRAM_CONTEXT_LEN];
    to_hex(ctx, sizeof ctx, hex);
    OPENSSL_cleanse(ctx, sizeof ctx);
    lua_pushlstring(L, hex, sizeof hex);
    return 1;
}

/* cram_md5_response(context_hex, challenge) -> hex
 *   HMAC-MD5(password, challenge) as 32 lowercase hex digits, computed
 *   from a context made by cram_md5_context (or read from a {CRAM-MD5}
 *   entry): what a CRAM-MD5 client must send after its user name
 *   (RFC 2195). Raises if context_hex is not 64 hex digits.  [-0, +1, v] */
static int l_cram_md5_response(lua_State *L)
{
    size_t hlen, clen;
    const char *hex = luaL_checklstring(L, 1, &hlen);
    const unsigned char *chal = (const unsigned char *)luaL_checklstring(L, 2, &clen);
    luaL_argcheck(L, hlen == 2 * CRAM_CONTEXT_LEN, 1, "context must be 64 hex digits");
    unsigned char ctx[CRAM_CONTEXT_LEN];
    for (size_t i = 0; i < CRAM_CONTEXT_LEN; i++) {
        int hi = hex_value((unsigned char)hex[2 * i]);
        int lo = hex_value((unsigned char)hex[2 * i + 1]);
        luaL_argcheck(L, hi >= 0 && lo >= 0, 1, "context must be 64 hex digits");
        ctx[i] = (unsigned char)(hi << 4 | lo);
    }
    unsigned char inner[MD5_DIGEST_LENGTH], mac[MD5_DIGEST_LENGTH];
    int ok = cram_finish(ctx + 16, chal, clen, inner) && cram_finish(ctx, inner, sizeof inner, mac);
    OPENSSL_cleanse(ctx, sizeof ctx);
    if (!ok)
        return luaL_error(L, "cram_md5_response: OpenSSL failure");
    char out[2 * MD5_DIGEST_LENGTH];
    to_hex(mac, sizeof mac, out);
    lua_pushlstring(L, out, sizeof out);
    return 1;
}

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/* ------------------------------------------------------------------ */
/* File change detection for credential files (lua/luasmtp/credentials.lua
 * reloads a passwd-file when this changes). */

/* file_signature(path) -> string | nil, "io", detail
 *   "dev:inode:size:mtime_seconds:mtime_nanoseconds" of path (following
 *   symbolic links): different whenever the file is replaced, resized or
 *   rewritten.                                               [-0, +1|3, m] */
static int l_file_signature(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    struct stat st;
    if (stat(path, &st) != 0) {
        int err = errno;
        lua_pushfstring(L, "%s: %s", path, strerror(err));
        return ls_pusherror(L, LS_EIO, lua_tostring(L, -1));
    }
    lua_pushfstring(L, "%I:%I:%I:%I:%I", (lua_Integer)st.st_dev, (lua_Integer)st.st_ino,
                    (lua_Integer)st.st_size, (lua_Integer)st.st_mtim.tv_sec,
                    (lua_Integer)st.st_mtim.tv_nsec);
    return 1;
}

int ls_open_crypto(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"digest", l_digest},
        {"hmac", l_hmac},
        {"pbkdf2", l_pbkdf2},
        {"random", l_random},
        {"equal", l_equal},
        {"xor", l_xor},
        {"b64encode", l_b64encode},
        {"b64decode", l_b64decode},
        {"crypt", l_crypt},
        {"crypt_gensalt", l_crypt_gensalt},
        {"cram_md5_context", l_cram_md5_context},
        {"cram_md5_response", l_cram_md5_response},
        {"file_signature", l_file_signature},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
