/*
 * proc.c - processes for the supervisor of `luasmtp serve --workers`:
 * starting workers with inherited descriptors (lib/proc.c), collecting
 * their exit status, signalling them, dropping privileges.
 *
 * Exits are learnt through SIGCHLD (core.wait_signal("CHLD")) and
 * collected with proc_reap(): libev's child watchers exist only on the
 * default loop, and each Lua state has a loop of its own.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "luasmtp.h"
#include "proc.h"

#define MAX_ARGS 256

/* proc_spawn(path, argv [, opts]) -> pid | nil, err, detail
 * Start path with the list argv (argv[1] is the program's name) in a new
 * process that inherits the environment. opts:
 *   fds        list of descriptors: fds[i] becomes descriptor 2 + i
 *   pdeathsig  signal name the child gets when this process dies
 * A failed exec is reported here (nil, "io", "exec PATH: reason").
 *   local pid = core.proc_spawn("/usr/bin/lua5.4", {"lua5.4", "w.lua"}, {fds = {l:getfd()}}) */
static int l_proc_spawn(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer argc = luaL_len(L, 2);
    luaL_argcheck(L, argc >= 1 && argc <= MAX_ARGS, 2, "1 to 256 arguments");
    int fds[LS_PROC_MAX_FDS];
    size_t nfds = 0;
    int pdeathsig = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        if (lua_getfield(L, 3, "fds") == LUA_TTABLE) {
            lua_Integer n = luaL_len(L, -1);
            luaL_argcheck(L, n <= LS_PROC_MAX_FDS, 3, "too many fds");
            for (lua_Integer i = 1; i <= n; i++) {
                lua_geti(L, -1, i);
                lua_Integer fd = luaL_checkinteger(L, -1);
                luaL_argcheck(L, fd >= 0 && fd <= 65535, 3, "fds: not a descriptor");
                fds[nfds++] = (int)fd;
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 3, "pdeathsig") != LUA_TNIL)
            pdeathsig = ls_checksignal(L, lua_gettop(L), 0);
        lua_pop(L, 1);
    }
    /* argv strings stay referenced by the table at 2 during the call */
    char *argv[MAX_ARGS + 1];
    for (lua_Integer i = 1; i <= argc; i++) {
        lua_geti(L, 2, i);
        argv[i - 1] = (char *)luaL_checkstring(L, -1);
        lua_pop(L, 1);
    }
    argv[argc] = NULL;
    pid_t pid;
    if (ls_proc_spawn(path, argv, fds, nfds, pdeathsig, &pid) < 0) {
        int e = errno;
        lua_pushfstring(L, "exec %s: %s", path, strerror(e));
        return ls_pusherror(L, ls_errno_token(e), lua_tostring(L, -1));
    }
    lua_pushinteger(L, pid);
    return 1;
}

/* proc_reap() -> list of {pid=, code=, signal=}: every child that has
 * ended since the last call (code: its exit status; signal: the name or
 * number of the signal that killed it). Never waits. */
static int l_proc_reap(lua_State *L)
{
    lua_newtable(L);
    lua_Integer n = 0;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0) /* none left (ECHILD) or none ended yet */
            break;
        lua_createtable(L, 0, 3);
        lua_pushinteger(L, pid);
        lua_setfield(L, -2, "pid");
        if (WIFEXITED(status)) {
            lua_pushinteger(L, WEXITSTATUS(status));
            lua_setfield(L, -2, "code");
        } else if (WIFSIGNALED(status)) {
            const char *name = ls_signame(WTERMSIG(status));
            if (name)
                lua_pushstring(L, name);
            else
                lua_pushinteger(L, WTERMSIG(status));
            lua_setfield(L, -2, "signal");
        } else {
            lua_pop(L, 1);
            continue;
        }
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

/* proc_kill(pid, signal) -> true | nil, err, detail */
static int l_proc_kill(lua_State *L)
{
    lua_Integer pid = luaL_checkinteger(L, 1);
    luaL_argcheck(L, pid > 0, 1, "pid must be positive");
    int sig = ls_checksignal(L, 2, 0);
    if (kill((pid_t)pid, sig) < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    lua_pushboolean(L, 1);
    return 1;
}

/* proc_drop(user [, group]) -> true | nil, "io", reason
 * Become user (and group, default the user's primary group) for good:
 * see lib/proc.h. user nil: change only the group. */
static int l_proc_drop(lua_State *L)
{
    const char *user = luaL_optstring(L, 1, NULL);
    const char *group = luaL_optstring(L, 2, NULL);
    luaL_argcheck(L, user || group, 1, "a user or a group");
    char err[256];
    if (ls_proc_drop(user, group, err, sizeof err) < 0)
        return ls_pusherror(L, LS_EIO, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* proc_ids() -> pid, uid, gid (real ids) */
static int l_proc_ids(lua_State *L)
{
    lua_pushinteger(L, getpid());
    lua_pushinteger(L, getuid());
    lua_pushinteger(L, getgid());
    return 3;
}

/* proc_exe() -> path of the running program | nil, err, detail */
static int l_proc_exe(lua_State *L)
{
    char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    if ((size_t)n >= sizeof buf - 1)
        return ls_pusherror(L, LS_ELIMIT, "program path too long");
    lua_pushlstring(L, buf, (size_t)n);
    return 1;
}

int ls_open_proc(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"proc_spawn", l_proc_spawn}, {"proc_reap", l_proc_reap}, {"proc_kill", l_proc_kill},
        {"proc_drop", l_proc_drop},   {"proc_ids", l_proc_ids},   {"proc_exe", l_proc_exe},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
