/*
 * sink_lua.c - Lua binding of the body sink (src/lib/sink.c).
 *
 * A core.sink() userdata is a bare ls_sink, so the socket layer can
 * write a body into it with the library's calls (sock:receivebody,
 * sock:receivechunk) without going through this file.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "luasmtp.h"

#define SINK_MT "luasmtp.sink"
#define DEFAULT_THRESHOLD (1024 * 1024)
#define DEFAULT_HEADER_MAX (64 * 1024)
#define DEFAULT_CHUNK 65536

static int push_sink_errno(lua_State *L, ls_sink *k, const char *what, int err)
{
    if (err == EFBIG && k->too_big)
        return ls_pusherror(L, LS_ELIMIT, "message too big");
    char detail[512];
    snprintf(detail, sizeof detail, "%s: %s", what, strerror(err));
    return ls_pusherror(L, LS_EIO, detail);
}

static lua_Integer opt_field(lua_State *L, const char *name, lua_Integer dflt)
{
    lua_getfield(L, 1, name);
    lua_Integer v = lua_isnil(L, -1) ? dflt : luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    if (v < 0)
        luaL_error(L, "sink option '%s' must not be negative", name);
    return v;
}

/* sink{ dir =, threshold =, max_size =, header_max =, tmpfile = } -> sink
 * A message body on its way in. Up to threshold bytes (default 1 MiB)
 * stay in memory; past it the content goes to a spool file in dir
 * (unnamed with O_TMPFILE where possible, else a file named
 * "luasmtp-spool.*" that sink_cleanup(dir) removes after a crash).
 * Without dir the content may not pass threshold. max_size: writes past
 * it fail with "limit" (0: no limit). header_max: the first header block
 * is kept up to this size (default 64 KiB). tmpfile = false always uses a
 * named file.
 *   local sink = core.sink{ dir = maildir .. "/tmp", max_size = 50e6 }  [-0, +1, m] */
static int l_sink(lua_State *L)
{
    if (lua_isnoneornil(L, 1))
        lua_newtable(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_getfield(L, 1, "dir");
    const char *dir = luaL_optstring(L, -1, NULL);
    lua_Integer threshold = opt_field(L, "threshold", DEFAULT_THRESHOLD);
    lua_Integer max_size = opt_field(L, "max_size", 0);
    lua_Integer header_max = opt_field(L, "header_max", DEFAULT_HEADER_MAX);
    lua_getfield(L, 1, "tmpfile");
    int tmpfile = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_pop(L, 1);
    ls_sink *k = lua_newuserdatauv(L, sizeof *k, 0);
    memset(k, 0, sizeof *k);
    k->closed = 1; /* until init succeeded: __gc has nothing to free */
    luaL_setmetatable(L, SINK_MT);
    if (ls_sink_init(k, dir, (size_t)threshold, (uint64_t)max_size, (size_t)header_max) < 0)
        return luaL_error(L, "luasmtp: out of memory");
    k->use_tmpfile = tmpfile;
    return 1;
}

ls_sink *ls_checksink(lua_State *L, int idx)
{
    ls_sink *k = luaL_checkudata(L, idx, SINK_MT);
    if (k->closed)
        luaL_argerror(L, idx, "sink is closed");
    return k;
}

static ls_sink *check_sink(lua_State *L) { return ls_checksink(L, 1); }

/* sink:write(data) -> true | nil, "limit" | nil, "io", detail   [-0, +1|3, -] */
static int l_write(lua_State *L)
{
    ls_sink *k = check_sink(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (ls_sink_write(k, p, n) < 0)
        return push_sink_errno(L, k, "spool write", errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* sink:size() -> bytes written */
static int l_size(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ls_sink_size(check_sink(L)));
    return 1;
}

/* sink:spooled() -> true when the content is in a spool file */
static int l_spooled(lua_State *L)
{
    lua_pushboolean(L, ls_sink_spooled(check_sink(L)));
    return 1;
}

/* sink:header() -> header, body_offset | header, nil | nil, "limit"
 * The first header block (the fields with their CRLFs, without the empty
 * line) and the offset where the body starts. Before the empty line has
 * arrived (or when the content has none) body_offset is nil and header
 * is what there is so far. nil, "limit" when the block passed header_max. */
static int l_header(lua_State *L)
{
    ls_sink *k = check_sink(L);
    if (k->hoverflow)
        return ls_pusherror(L, LS_ELIMIT, "header block too long");
    lua_pushlstring(L, k->header.len ? ls_buf_head(&k->header) : "", k->header.len);
    if (k->hstate == -1)
        lua_pushinteger(L, (lua_Integer)k->body_offset);
    else
        lua_pushnil(L);
    return 2;
}

/* Push up to n bytes from offset *off, advance it; pushes nil at the end.
 * Raises on a read error (the spool file failing is not a peer's doing). */
static int push_piece(lua_State *L, ls_sink *k, lua_Integer *off, size_t n)
{
    if (k->closed)
        return luaL_error(L, "luasmtp: sink is closed");
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, n);
    size_t got = 0;
    if (ls_sink_read(k, (uint64_t)*off, p, n, &got) < 0)
        return luaL_error(L, "luasmtp: spool read: %s", strerror(errno));
    if (got == 0) {
        lua_pushnil(L);
        return 1;
    }
    luaL_pushresultsize(&b, got);
    *off += (lua_Integer)got;
    return 1;
}

/* upvalues: sink, offset */
static int reader_read(lua_State *L)
{
    ls_sink *k = lua_touserdata(L, lua_upvalueindex(1));
    lua_Integer off = lua_tointeger(L, lua_upvalueindex(2));
    lua_Integer n = luaL_optinteger(L, 1, DEFAULT_CHUNK);
    luaL_argcheck(L, n > 0, 1, "size must be positive");
    push_piece(L, k, &off, (size_t)n);
    lua_pushinteger(L, off);
    lua_replace(L, lua_upvalueindex(2));
    return 1;
}

/* sink:reader([offset]) -> read(n): read(n) returns the next (up to) n
 * bytes of the content from offset on (default 0), nil at the end. */
static int l_reader(lua_State *L)
{
    check_sink(L);
    lua_Integer off = luaL_optinteger(L, 2, 0);
    luaL_argcheck(L, off >= 0, 2, "negative offset");
    lua_settop(L, 1);
    lua_pushinteger(L, off);
    lua_pushcclosure(L, reader_read, 2);
    return 1;
}

/* upvalues: sink, offset, size */
static int chunks_next(lua_State *L)
{
    ls_sink *k = lua_touserdata(L, lua_upvalueindex(1));
    lua_Integer off = lua_tointeger(L, lua_upvalueindex(2));
    size_t n = (size_t)lua_tointeger(L, lua_upvalueindex(3));
    push_piece(L, k, &off, n);
    lua_pushinteger(L, off);
    lua_replace(L, lua_upvalueindex(2));
    return 1;
}

/* sink:chunks([size [, offset]]) -> iterator over the content in pieces
 * of at most size bytes (default 64 KiB), from memory or the spool file.
 *   for piece in sink:chunks() do f:write(piece) end */
static int l_chunks(lua_State *L)
{
    check_sink(L);
    lua_Integer n = luaL_optinteger(L, 2, DEFAULT_CHUNK);
    luaL_argcheck(L, n > 0, 2, "size must be positive");
    lua_Integer off = luaL_optinteger(L, 3, 0);
    luaL_argcheck(L, off >= 0, 3, "negative offset");
    lua_settop(L, 1);
    lua_pushinteger(L, off);
    lua_pushinteger(L, n);
    lua_pushcclosure(L, chunks_next, 3);
    return 1;
}

/* sink:commit(path [, sync]) -> true | nil, "io", detail
 * Make the content the new file path (it must not exist) durably: fsync
 * the file, link it into place (same file system as dir: never a copy),
 * fsync the directory of path. Can be called again for more paths (one
 * hard link each). With sync false nothing is fsynced: the caller does
 * that (several files at once, core.fsync_paths). */
static int l_commit(lua_State *L)
{
    ls_sink *k = check_sink(L);
    const char *path = luaL_checkstring(L, 2);
    int sync = lua_isnoneornil(L, 3) || lua_toboolean(L, 3);
    if ((sync ? ls_sink_commit(k, path) : ls_sink_link(k, path)) < 0)
        return push_sink_errno(L, k, path, errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* sink:discard() -> true: drop the content (and the spool file); the
 * sink is empty and usable again. */
static int l_discard(lua_State *L)
{
    ls_sink_discard(check_sink(L));
    lua_pushboolean(L, 1);
    return 1;
}

/* sink:close(), __close, __gc: release memory and spool file. */
static int l_close(lua_State *L)
{
    ls_sink *k = luaL_checkudata(L, 1, SINK_MT);
    ls_sink_free(k);
    return 0;
}

static int l_tostring(lua_State *L)
{
    ls_sink *k = luaL_checkudata(L, 1, SINK_MT);
    if (k->closed)
        lua_pushliteral(L, "luasmtp.sink (closed)");
    else
        lua_pushfstring(L, "luasmtp.sink (%d bytes, %s)", (int)k->size,
                        k->fd >= 0 ? "spooled" : "in memory");
    return 1;
}

/* sink_cleanup(dir) -> n | nil, "io", detail
 * Remove the named spool files that processes no longer running left in
 * dir (after a crash). Call it at start for every spool directory. */
static int l_sink_cleanup(lua_State *L)
{
    const char *dir = luaL_checkstring(L, 1);
    int n = ls_sink_cleanup(dir);
    if (n < 0) {
        char detail[512];
        snprintf(detail, sizeof detail, "%s: %s", dir, strerror(errno));
        return ls_pusherror(L, LS_EIO, detail);
    }
    lua_pushinteger(L, n);
    return 1;
}

int ls_open_sink(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"write", l_write},     {"size", l_size},       {"spooled", l_spooled},
        {"header", l_header},   {"reader", l_reader},   {"chunks", l_chunks},
        {"commit", l_commit},   {"discard", l_discard}, {"close", l_close},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, SINK_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, l_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    static const luaL_Reg funcs[] = {
        {"sink", l_sink},
        {"sink_cleanup", l_sink_cleanup},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
