/*
 * core.c - luaopen_luasmtp_core: the C module as one table.
 */
#include <errno.h>
#include <string.h>

#include "luasmtp.h"

int ls_pusherror(lua_State *L, const char *token, const char *detail)
{
    lua_pushnil(L);
    lua_pushstring(L, token);
    if (detail == NULL)
        return 2;
    lua_pushstring(L, detail);
    return 3;
}

const char *ls_errno_token(int err)
{
    switch (err) {
    case ETIMEDOUT:
        return LS_ETIMEOUT;
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED:
        return LS_ERESET;
    case ECONNREFUSED:
        return LS_EREFUSED;
    case ENETUNREACH:
    case EHOSTUNREACH:
    case ENETDOWN:
    case EHOSTDOWN:
    case EADDRNOTAVAIL:
        return LS_EUNREACH;
    default:
        return LS_EIO;
    }
}

int luaopen_luasmtp_core(lua_State *L)
{
    lua_newtable(L);
    ls_open_loop(L);
    ls_open_socket(L);
    ls_open_tls(L);
    ls_open_dns(L);
    ls_open_http(L);
    ls_open_gzip(L);
    ls_open_crypto(L);
    ls_open_proto(L);
    ls_open_fs(L);
    ls_open_sendbody(L);
    lua_pushliteral(L, LS_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
