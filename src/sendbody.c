/*
 * sendbody.c - Lua binding of bodyscan.c, for luasmtp.client.body.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "bodyscan.h"
#include "luasmtp.h"

#define SCAN_BLOCK (64 * 1024)

/* body_scan(body) -> size, growth, ends_with_line_end, kind
 *   | nil, "io", detail
 * body: a string, or an open file (read from where it is to its end;
 * the caller seeks back). size: octets; growth: octets that CRLF
 * normalisation adds (bare CRs and LFs); kind: "7bit", "8bitmime" (an
 * octet above 127) or "binarymime" (a NUL).                [-0, +4, m]
 * Example: local size, growth, eol, kind = core.body_scan(f) */
static int l_body_scan(lua_State *L)
{
    struct body_scan s;
    body_scan_init(&s);
    if (lua_type(L, 1) == LUA_TSTRING) {
        size_t len;
        const char *p = lua_tolstring(L, 1, &len);
        body_scan_feed(&s, p, len);
    } else {
        luaL_Stream *f = luaL_checkudata(L, 1, LUA_FILEHANDLE);
        if (f->closef == NULL)
            return luaL_argerror(L, 1, "attempt to use a closed file");
        char *block = malloc(SCAN_BLOCK);
        if (block == NULL)
            return ls_pusherror(L, LS_ELIMIT, "out of memory");
        size_t n;
        clearerr(f->f);
        while ((n = fread(block, 1, SCAN_BLOCK, f->f)) > 0)
            body_scan_feed(&s, block, n);
        int failed = ferror(f->f), err = errno;
        free(block);
        if (failed)
            return ls_pusherror(L, LS_EIO, strerror(err));
    }
    body_scan_finish(&s);
    lua_pushinteger(L, (lua_Integer)s.size);
    lua_pushinteger(L, (lua_Integer)s.growth);
    lua_pushboolean(L, s.eol);
    lua_pushstring(L, s.has_nul ? "binarymime" : s.has_8bit ? "8bitmime" : "7bit");
    return 4;
}

int ls_open_sendbody(lua_State *L)
{
    lua_pushcfunction(L, l_body_scan);
    lua_setfield(L, -2, "body_scan");
    return 0;
}
