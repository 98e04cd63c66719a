/*
 * opts.c - fields of an options table, for the bindings that take one
 * (http_request{...}, redis_connect{...}): one check and one message
 * per kind of field. Each raises "who: name must be ..." on a bad
 * value and returns the default when the field is absent.
 */
#include <string.h>

#include "luasmtp.h"

const char *ls_opt_string(lua_State *L, int idx, const char *who, const char *name, size_t max)
{
    const char *s = NULL;
    if (lua_getfield(L, idx, name) != LUA_TNIL) {
        size_t len;
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: %s must be a string", who, name);
        s = lua_tolstring(L, -1, &len);
        if (strlen(s) != len || len == 0 || len > max)
            luaL_error(L, "%s: %s must be a non-empty string of at most %d bytes "
                          "without zero bytes", who, name, (int)max);
    }
    lua_pop(L, 1); /* the string stays alive: it is a field of the table */
    return s;
}

double ls_opt_seconds(lua_State *L, int idx, const char *who, const char *name, double def,
                      double max)
{
    double v = def;
    if (lua_getfield(L, idx, name) != LUA_TNIL) {
        int ok;
        v = lua_tonumberx(L, -1, &ok);
        if (!ok || !(v > 0) || v > max)
            luaL_error(L, "%s: %s must be seconds in (0, %d]", who, name, (int)max);
    }
    lua_pop(L, 1);
    return v;
}

lua_Integer ls_opt_integer(lua_State *L, int idx, const char *who, const char *name,
                           lua_Integer def, lua_Integer min, lua_Integer max)
{
    lua_Integer v = def;
    if (lua_getfield(L, idx, name) != LUA_TNIL) {
        int ok;
        v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < min || v > max)
            luaL_error(L, "%s: %s must be an integer in [%I, %I]", who, name, (LUAI_UACINT)min,
                       (LUAI_UACINT)max);
    }
    lua_pop(L, 1);
    return v;
}
