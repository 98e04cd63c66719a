/*
 * psl.c - the Public Suffix List through libpsl: organizational domains
 * for DMARC (RFC 7489 section 3.2).
 *
 * The list is the newest of libpsl's built-in copy and the system's file
 * (Debian: /usr/share/publicsuffix, package publicsuffix), loaded once
 * per process by psl_latest() and shared, read-only, by every Lua state.
 */
#include <ctype.h>
#include <string.h>

#include <libpsl.h>

#include "luasmtp.h"

#define PSL_NAME_MAX 253

static const psl_ctx_t *psl_list(void)
{
    static const psl_ctx_t *list;
    static int tried;
    if (!tried) {
        tried = 1;
        list = psl_latest(NULL);
        if (list == NULL)
            list = psl_builtin();
    }
    return list;
}

/* The lowercased name without a trailing dot into out; -1 if it is not
 * an ASCII DNS name of 1..253 bytes. */
static int psl_normalize(const char *name, size_t len, char out[PSL_NAME_MAX + 1])
{
    if (len > 0 && name[len - 1] == '.')
        len--;
    if (len == 0 || len > PSL_NAME_MAX)
        return -1;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c <= 0x20 || c >= 0x7f)
            return -1;
        out[i] = (char)tolower(c);
    }
    out[len] = '\0';
    return 0;
}

/* psl_organizational_domain(name) -> domain | nil, why   [-1, +1|2, m]
 * name: an ASCII (A-label) domain name. Returns the registrable domain:
 * the public suffix plus one label ("mail.example.co.uk" ->
 * "example.co.uk"); nil, why for a public suffix itself or no list.
 *   core.psl_organizational_domain("a.b.example.org") --> "example.org" */
static int l_psl_organizational_domain(lua_State *L)
{
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    char norm[PSL_NAME_MAX + 1];
    if (psl_normalize(name, len, norm) != 0)
        return ls_pusherror(L, "invalid", "not a domain name");
    const psl_ctx_t *list = psl_list();
    if (list == NULL)
        return ls_pusherror(L, "invalid", "no public suffix list");
    const char *reg = psl_registrable_domain(list, norm);
    if (reg == NULL)
        return ls_pusherror(L, "invalid", "a public suffix");
    lua_pushstring(L, reg);
    return 1;
}

/* psl_is_public_suffix(name) -> boolean   [-1, +1, -]
 *   core.psl_is_public_suffix("co.uk") --> true */
static int l_psl_is_public_suffix(lua_State *L)
{
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    char norm[PSL_NAME_MAX + 1];
    const psl_ctx_t *list = psl_list();
    lua_pushboolean(L, psl_normalize(name, len, norm) == 0 && list != NULL
                           && psl_is_public_suffix2(list, norm, PSL_TYPE_ANY | PSL_TYPE_NO_STAR_RULE));
    return 1;
}

int ls_open_psl(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"psl_organizational_domain", l_psl_organizational_domain},
        {"psl_is_public_suffix", l_psl_is_public_suffix},
        {NULL, NULL},
    };
    luaL_setfuncs(L, fns, 0);
    return 0;
}
