/*
 * dkim_lua.c - Lua bindings of the DKIM building blocks in src/lib/dkim.c.
 *
 * Functions on the core table:
 *   dkim_tags(s) -> { name = value, ... } | nil, "syntax"|"duplicate"|"too many"
 *   dkim_canon_header(relaxed, field) -> canonical field (CRLF ended)
 *   dkim_strip_b(field) -> field with b= emptied | nil
 *   dkim_body(relaxed, "sha256"|"sha1", limit|nil) -> body hasher
 *     hasher:update(chunk); hasher:final() -> digest, canonical length
 *   dkim_pubkey("rsa"|"ed25519", der) -> key | nil
 *   dkim_privkey(pem) -> key | nil
 *     key:kind() -> "rsa"|"ed25519"; key:bits(); key:public() -> p= bytes
 *     key:verify("sha256"|"sha1", data, sig) -> bool
 *     key:sign("sha256"|"sha1", data) -> signature
 *
 * The hasher and the key are userdata made zeroed with their metatable
 * before the OpenSSL object is made; close/__gc share one idempotent
 * destroy. Bad argument types raise; hostile input gives nil. Outputs
 * are never longer than their input plus a CRLF, so a field of any
 * length is canonicalised without a cap of its own (the caller caps
 * what it accepts).
 */
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509.h>

#include "dkim.h"
#include "luasmtp.h"

#define BODY_MT "luasmtp.dkim_body"
#define KEY_MT "luasmtp.dkim_key"

typedef struct {
    dkim_body body;
    int open;
} body_ud;

typedef struct {
    EVP_PKEY *key;
} key_ud;

static enum dkim_hash check_hash(lua_State *L, int arg)
{
    static const char *const names[] = {"sha256", "sha1", NULL};
    return luaL_checkoption(L, arg, NULL, names) == 0 ? DKIM_SHA256 : DKIM_SHA1;
}

/* dkim_tags(s) -> table | nil, reason                         [-0, +1|2, m] */
static int l_tags(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    dkim_tag tags[DKIM_TAGS_MAX];
    int count = dkim_tags_parse(s, n, tags, DKIM_TAGS_MAX);
    if (count < 0) {
        lua_pushnil(L);
        lua_pushstring(L, count == DKIM_TAGS_DUPLICATE ? "duplicate"
                          : count == DKIM_TAGS_TOO_MANY ? "too many" : "syntax");
        return 2;
    }
    lua_createtable(L, 0, count);
    for (int i = 0; i < count; i++) {
        lua_pushlstring(L, tags[i].name, tags[i].name_len);
        lua_pushlstring(L, tags[i].value, tags[i].value_len);
        lua_rawset(L, -3);
    }
    return 1;
}

/* dkim_canon_header(relaxed, field) -> string                   [-0, +1, m] */
static int l_canon_header(lua_State *L)
{
    int relaxed = lua_toboolean(L, 1);
    size_t n;
    const char *f = luaL_checklstring(L, 2, &n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, n + 2);
    luaL_pushresultsize(&b, dkim_canon_header(relaxed, f, n, out));
    return 1;
}

/* dkim_strip_b(field) -> string | nil                           [-0, +1, m] */
static int l_strip_b(lua_State *L)
{
    size_t n;
    const char *f = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, n + 1);
    size_t len = dkim_strip_b(f, n, out);
    if (len == (size_t)-1) {
        luaL_pushresultsize(&b, 0);
        lua_pop(L, 1);
        lua_pushnil(L);
        return 1;
    }
    luaL_pushresultsize(&b, len);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Body hasher */

static body_ud *check_body(lua_State *L)
{
    body_ud *u = luaL_checkudata(L, 1, BODY_MT);
    if (!u->open)
        luaL_error(L, "dkim body hasher already finished");
    return u;
}

/* dkim_body(relaxed, hash, limit|nil) -> hasher                 [-0, +1, m] */
static int l_body(lua_State *L)
{
    int relaxed = lua_toboolean(L, 1);
    enum dkim_hash h = check_hash(L, 2);
    lua_Integer limit = luaL_optinteger(L, 3, -1);
    luaL_argcheck(L, limit >= -1, 3, "limit must be >= 0");
    body_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
    memset(u, 0, sizeof *u);
    luaL_setmetatable(L, BODY_MT);
    if (dkim_body_init(&u->body, relaxed, h == DKIM_SHA1 ? EVP_sha1() : EVP_sha256(), limit) != 0)
        return luaL_error(L, "dkim_body: OpenSSL failed");
    u->open = 1;
    return 1;
}

/* hasher:update(chunk)                                          [-0, +0, v] */
static int l_body_update(lua_State *L)
{
    body_ud *u = check_body(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (dkim_body_update(&u->body, p, n) != 0)
        return luaL_error(L, "dkim body hash: OpenSSL failed");
    return 0;
}

/* hasher:final() -> digest, canonical length                    [-0, +2, v] */
static int l_body_final(lua_State *L)
{
    body_ud *u = check_body(L);
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned dlen = 0;
    u->open = 0;
    if (dkim_body_final(&u->body, d, &dlen) != 0)
        return luaL_error(L, "dkim body hash: OpenSSL failed");
    lua_pushlstring(L, (const char *)d, dlen);
    lua_pushinteger(L, (lua_Integer)u->body.total);
    return 2;
}

static int l_body_gc(lua_State *L)
{
    body_ud *u = luaL_checkudata(L, 1, BODY_MT);
    dkim_body_free(&u->body);
    u->open = 0;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Keys */

static key_ud *check_key(lua_State *L)
{
    key_ud *u = luaL_checkudata(L, 1, KEY_MT);
    if (u->key == NULL)
        luaL_error(L, "dkim key closed");
    return u;
}

static key_ud *new_key(lua_State *L)
{
    key_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
    u->key = NULL;
    luaL_setmetatable(L, KEY_MT);
    return u;
}

/* dkim_pubkey("rsa"|"ed25519", bytes) -> key | nil              [-0, +1, m] */
static int l_pubkey(lua_State *L)
{
    static const char *const kinds[] = {"rsa", "ed25519", NULL};
    int ed = luaL_checkoption(L, 1, NULL, kinds);
    size_t n;
    const unsigned char *p = (const unsigned char *)luaL_checklstring(L, 2, &n);
    key_ud *u = new_key(L);
    u->key = dkim_pubkey(ed, p, n);
    ERR_clear_error();
    if (u->key == NULL)
        lua_pushnil(L);
    return 1;
}

/* dkim_privkey(pem) -> key | nil                                [-0, +1, m] */
static int l_privkey(lua_State *L)
{
    size_t n;
    const char *pem = luaL_checklstring(L, 1, &n);
    key_ud *u = new_key(L);
    u->key = dkim_privkey_pem(pem, n);
    ERR_clear_error();
    if (u->key == NULL)
        lua_pushnil(L);
    return 1;
}

static int l_key_kind(lua_State *L)
{
    key_ud *u = check_key(L);
    lua_pushstring(L, dkim_key_kind(u->key) == 1 ? "ed25519" : "rsa");
    return 1;
}

static int l_key_bits(lua_State *L)
{
    key_ud *u = check_key(L);
    lua_pushinteger(L, EVP_PKEY_get_bits(u->key));
    return 1;
}

/* key:public() -> the p= bytes (DER SubjectPublicKeyInfo for RSA, the
 * raw 32 bytes for Ed25519)                                      [-0, +1, m] */
static int l_key_public(lua_State *L)
{
    key_ud *u = check_key(L);
    if (dkim_key_kind(u->key) == 1) {
        unsigned char raw[32];
        size_t len = sizeof raw;
        if (EVP_PKEY_get_raw_public_key(u->key, raw, &len) != 1)
            return luaL_error(L, "dkim key: no public key");
        lua_pushlstring(L, (const char *)raw, len);
        return 1;
    }
    unsigned char *der = NULL;
    int len = i2d_PUBKEY(u->key, &der);
    if (len <= 0)
        return luaL_error(L, "dkim key: no public key");
    lua_pushlstring(L, (const char *)der, (size_t)len);
    OPENSSL_free(der);
    return 1;
}

/* key:verify(hash, data, sig) -> bool                           [-0, +1, m] */
static int l_key_verify(lua_State *L)
{
    key_ud *u = check_key(L);
    enum dkim_hash h = check_hash(L, 2);
    size_t n, slen;
    const unsigned char *data = (const unsigned char *)luaL_checklstring(L, 3, &n);
    const unsigned char *sig = (const unsigned char *)luaL_checklstring(L, 4, &slen);
    int r = dkim_verify(u->key, h, data, n, sig, slen);
    ERR_clear_error();
    lua_pushboolean(L, r == 1);
    return 1;
}

/* key:sign(hash, data) -> signature                             [-0, +1, v] */
static int l_key_sign(lua_State *L)
{
    key_ud *u = check_key(L);
    enum dkim_hash h = check_hash(L, 2);
    size_t n;
    const unsigned char *data = (const unsigned char *)luaL_checklstring(L, 3, &n);
    int size = EVP_PKEY_get_size(u->key);
    if (size <= 0)
        return luaL_error(L, "dkim key: cannot sign");
    luaL_Buffer b;
    unsigned char *sig = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)size);
    size_t slen = (size_t)size;
    if (dkim_sign(u->key, h, data, n, sig, &slen) != 0) {
        ERR_clear_error();
        return luaL_error(L, "dkim key: signing failed (not a private key?)");
    }
    luaL_pushresultsize(&b, slen);
    return 1;
}

static int l_key_gc(lua_State *L)
{
    key_ud *u = luaL_checkudata(L, 1, KEY_MT);
    EVP_PKEY_free(u->key);
    u->key = NULL;
    return 0;
}

int ls_open_dkim(lua_State *L)
{
    static const luaL_Reg body_methods[] = {
        {"update", l_body_update}, {"final", l_body_final}, {NULL, NULL}};
    static const luaL_Reg key_methods[] = {
        {"kind", l_key_kind},     {"bits", l_key_bits}, {"public", l_key_public},
        {"verify", l_key_verify}, {"sign", l_key_sign}, {NULL, NULL}};
    static const luaL_Reg funcs[] = {
        {"dkim_tags", l_tags},       {"dkim_canon_header", l_canon_header},
        {"dkim_strip_b", l_strip_b}, {"dkim_body", l_body},
        {"dkim_pubkey", l_pubkey},   {"dkim_privkey", l_privkey},
        {NULL, NULL}};
    luaL_newmetatable(L, BODY_MT);
    luaL_newlib(L, body_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_body_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, KEY_MT);
    luaL_newlib(L, key_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_key_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
