/* crypto.c - placeholder, filled in by the SASL work. */
#include "luasmtp.h"

int ls_open_crypto(lua_State *L)
{
    (void)L;
    return 0;
}
