/*
 * error.c - pushing I/O failures to Lua, and core.errors (the registry
 * of error tokens in lib/errors.c). A leaf: it depends on nothing else
 * of the core.
 */
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

/* core.errors = { [token] = meaning, ... }: every error token there is. */
int ls_open_errors(lua_State *L)
{
    lua_createtable(L, 0, (int)ls_nerrtokens);
    for (size_t i = 0; i < ls_nerrtokens; i++) {
        lua_pushstring(L, ls_errtokens[i].meaning);
        lua_setfield(L, -2, ls_errtokens[i].token);
    }
    lua_setfield(L, -2, "errors");
    return 0;
}

int ls_push_release(lua_State *L, lua_CFunction push, void *p, void (*release)(void *))
{
    int top = lua_gettop(L);
    lua_pushcfunction(L, push);
    lua_pushlightuserdata(L, p);
    int st = lua_pcall(L, 1, LUA_MULTRET, 0);
    release(p);
    if (st != LUA_OK)
        return lua_error(L);
    return lua_gettop(L) - top;
}
