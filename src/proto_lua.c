/* proto_lua.c - placeholder, filled in by the protocol work. */
#include "luasmtp.h"

int ls_open_proto(lua_State *L)
{
    (void)L;
    return 0;
}
