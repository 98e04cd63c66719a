/*
 * core.c - luaopen_luasmtp_core: the C module as one table.
 */
#include "luasmtp.h"

int luaopen_luasmtp_core(lua_State *L)
{
    lua_newtable(L);
    ls_open_loop(L);
    ls_open_socket(L);
    ls_open_tls(L);
    ls_open_dns(L);
    ls_open_http(L);
    ls_open_redis(L);
    ls_open_gzip(L);
    ls_open_psl(L);
    ls_open_crypto(L);
    ls_open_proto(L);
    ls_open_dkim(L);
    ls_open_fs(L);
    ls_open_guard(L);
    ls_open_sink(L);
    ls_open_errors(L);
    ls_open_sendbody(L);
    ls_open_proc(L);
    lua_pushliteral(L, LS_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
