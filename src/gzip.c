/*
 * gzip.c - gzip (RFC 1952) compression over zlib, for TLS reports
 * (application/tlsrpt+gzip) and anything else that must travel gzipped.
 *
 * The first half is plain C (byte buffers in, byte buffers out); the
 * Lua bindings follow. Decompression is capped: a small input can expand
 * a thousandfold, so the caller names the largest output it accepts.
 */
#include <limits.h>
#include <string.h>

#include <zlib.h>

#include "luasmtp.h"

#define DEFAULT_GUNZIP_MAX (16 * 1024 * 1024)
#define CHUNK 16384

enum gz_status { GZ_OK = 0, GZ_NOMEM, GZ_LIMIT, GZ_CORRUPT };

/* Compress in[0..len) into out as one gzip member; level 0..9 or -1. */
static int gz_compress(const char *in, size_t len, int level, ls_buf *out, const char **why)
{
    z_stream z;
    memset(&z, 0, sizeof z);
    /* 15 + 16: a gzip header and trailer instead of zlib's. */
    if (deflateInit2(&z, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
        *why = z.msg != NULL ? z.msg : "deflateInit2 failed";
        return GZ_NOMEM;
    }
    int st = GZ_OK;
    size_t off = 0;
    int flush = Z_NO_FLUSH;
    for (;;) {
        if (z.avail_in == 0 && flush == Z_NO_FLUSH) {
            size_t n = len - off > UINT_MAX ? UINT_MAX : len - off;
            z.next_in = (Bytef *)(uintptr_t)(in + off);
            z.avail_in = (uInt)n;
            off += n;
            if (off == len)
                flush = Z_FINISH;
        }
        char *dst = ls_buf_reserve(out, CHUNK);
        if (dst == NULL) {
            st = GZ_NOMEM;
            *why = "out of memory";
            break;
        }
        z.next_out = (Bytef *)dst;
        z.avail_out = CHUNK;
        int rc = deflate(&z, flush);
        ls_buf_commit(out, CHUNK - z.avail_out);
        if (rc == Z_STREAM_END)
            break;
        if (rc != Z_OK && rc != Z_BUF_ERROR) {
            st = GZ_CORRUPT;
            *why = z.msg != NULL ? z.msg : "deflate failed";
            break;
        }
    }
    deflateEnd(&z);
    return st;
}

/* Decompress one gzip member in[0..len) into out, at most max bytes.
 * Data after the member is an error. */
static int gz_decompress(const char *in, size_t len, size_t max, ls_buf *out, const char **why)
{
    z_stream z;
    memset(&z, 0, sizeof z);
    if (len > UINT_MAX) {
        *why = "input too large";
        return GZ_LIMIT;
    }
    if (inflateInit2(&z, 15 + 16) != Z_OK) {
        *why = z.msg != NULL ? z.msg : "inflateInit2 failed";
        return GZ_NOMEM;
    }
    z.next_in = (Bytef *)(uintptr_t)in;
    z.avail_in = (uInt)len;
    int st = GZ_OK;
    for (;;) {
        size_t room = max - out->len;
        if (room == 0)
            room = 1; /* one byte more tells "exactly max" from "more than max" */
        if (room > CHUNK)
            room = CHUNK;
        char *dst = ls_buf_reserve(out, room);
        if (dst == NULL) {
            st = GZ_NOMEM;
            *why = "out of memory";
            break;
        }
        z.next_out = (Bytef *)dst;
        z.avail_out = (uInt)room;
        int rc = inflate(&z, Z_NO_FLUSH);
        ls_buf_commit(out, room - z.avail_out);
        if (out->len > max) {
            st = GZ_LIMIT;
            *why = "decompressed data larger than the limit";
            break;
        }
        if (rc == Z_STREAM_END) {
            if (z.avail_in != 0) {
                st = GZ_CORRUPT;
                *why = "data after the end of the gzip stream";
            }
            break;
        }
        if (rc == Z_BUF_ERROR && z.avail_in == 0) {
            st = GZ_CORRUPT;
            *why = "truncated gzip stream";
            break;
        }
        if (rc != Z_OK && rc != Z_BUF_ERROR) {
            st = rc == Z_MEM_ERROR ? GZ_NOMEM : GZ_CORRUPT;
            *why = z.msg != NULL ? z.msg : "invalid gzip stream";
            break;
        }
    }
    inflateEnd(&z);
    return st;
}

/* ------------------------------------------------------------------ */
/* Lua API */

/* Protected: push the bytes of the ls_buf (arg 1) as a string. */
static int push_copy(lua_State *L)
{
    const ls_buf *b = lua_touserdata(L, 1);
    lua_pushlstring(L, ls_buf_head(b), b->len);
    return 1;
}

/* Push the result of gz_compress/gz_decompress and free out, whatever
 * happens (the copy into Lua may raise on memory exhaustion). */
static int push_result(lua_State *L, int st, ls_buf *out, const char *why)
{
    if (st != GZ_OK) {
        ls_buf_free(out);
        return ls_pusherror(L, st == GZ_LIMIT ? LS_ELIMIT : st == GZ_CORRUPT ? LS_EPROTOCOL : LS_EIO,
                            why);
    }
    lua_pushcfunction(L, push_copy);
    lua_pushlightuserdata(L, out);
    int rc = lua_pcall(L, 1, 1, 0);
    ls_buf_free(out);
    if (rc != LUA_OK)
        return lua_error(L);
    return 1;
}

/* gzip(data [, level]) -> string | nil, "io", detail
 * [-0, +1|3, m]  One gzip member; level 1..9 (default zlib's 6).
 *   local gz = luasmtp.gzip(json) */
static int l_gzip(lua_State *L)
{
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    lua_Integer level = luaL_optinteger(L, 2, Z_DEFAULT_COMPRESSION);
    luaL_argcheck(L, level == Z_DEFAULT_COMPRESSION || (level >= 0 && level <= 9), 2,
                  "level must be 0..9");
    ls_buf out;
    ls_buf_init(&out);
    const char *why = NULL;
    int st = gz_compress(data, len, (int)level, &out, &why);
    return push_result(L, st == GZ_OK ? GZ_OK : GZ_NOMEM, &out, why);
}

/* gunzip(data [, max_size]) -> string | nil, "limit"|"protocol"|"io", detail
 * [-0, +1|3, m]  One gzip member, at most max_size bytes out (16 MiB).
 *   local json = assert(luasmtp.gunzip(gz, 1024 * 1024)) */
static int l_gunzip(lua_State *L)
{
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    lua_Integer max = luaL_optinteger(L, 2, DEFAULT_GUNZIP_MAX);
    luaL_argcheck(L, max >= 0 && (lua_Unsigned)max < ((lua_Unsigned)1 << 40), 2,
                  "max_size must be an integer >= 0");
    ls_buf out;
    ls_buf_init(&out);
    const char *why = NULL;
    int st = gz_decompress(data, len, (size_t)max, &out, &why);
    return push_result(L, st, &out, why);
}

/* crc32(data [, crc]) -> integer
 * [-0, +1, -]  zlib's CRC-32 of data, continuing crc (default 0): the
 * check value of a queue segment's records. */
static int l_crc32(lua_State *L)
{
    size_t len;
    const unsigned char *data = (const unsigned char *)luaL_checklstring(L, 1, &len);
    uLong crc = (uLong)(luaL_optinteger(L, 2, 0) & 0xffffffff);
    while (len > 0) {
        uInt n = len > UINT_MAX ? UINT_MAX : (uInt)len;
        crc = crc32(crc, data, n);
        data += n;
        len -= n;
    }
    lua_pushinteger(L, (lua_Integer)crc);
    return 1;
}

int ls_open_gzip(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"gzip", l_gzip},
        {"gunzip", l_gunzip},
        {"crc32", l_crc32},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
