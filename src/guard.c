/*
 * guard.c - calling Lua code under a deadline.
 *
 * guarded(timeout, fn, ...) runs fn(...) in the calling task like pcall,
 * but gives it a time budget. Past the deadline the call is interrupted
 * wherever it is:
 *   - waiting (socket, sleep, DNS, condition, join): the scheduler caps
 *     every wait of the task at the deadline (ls_task_cap), so the wait
 *     ends as timed out and the waiting C code cleans up the way it does
 *     for any timeout;
 *   - running Lua code (a busy loop): a count hook on the task's thread
 *     checks the clock every few thousand instructions. Until the
 *     deadline, a call that has kept the loop from polling for a time
 *     slice yields there, so other tasks, I/O and signals go on.
 * Either way, once the deadline has passed the hook raises an error at
 * every instruction until the error reaches the guard, so a pcall inside
 * fn cannot swallow it. To-be-closed variables of fn are closed on the
 * way out. Guards nest; each has its own deadline.
 *
 * Each thread that makes guarded calls gets one guard set (a userdata
 * kept in a weak registry table, reused by every call of that thread)
 * holding the stack of its active guards. No watcher of its own: the
 * deadline rides on the waits the call makes.
 */
#include <string.h>

#include "luasmtp.h"

#define GUARD_MT "luasmtp.guardset"
#define GUARD_SETS "luasmtp.guardsets" /* registry: thread -> guard set */

/* Instructions between two clock checks while a guard is active. */
#define GUARD_CHECK_COUNT 4096
/* A guarded call that has run this long (seconds) since the loop last
 * polled yields, so other tasks, I/O and signals are served meanwhile. */
#define GUARD_SLICE 0.05
/* Guarded calls nested in one thread at most. */
#define GUARD_MAX_DEPTH 16

/* One active guard (its task is the set's: a set belongs to one
 * thread, kept small as every session's task holds one). */
typedef struct ls_guard {
    double deadline; /* ev_time() clock */
    int expired;
    int prev_capped;  /* the task's wait cap before this guard */
    double prev_cap;
} ls_guard;

typedef struct ls_guardset {
    ls_guard g[GUARD_MAX_DEPTH];
    int depth;        /* active guards, innermost at g[depth - 1] */
    ls_loop *loop;
    lua_State *co;    /* the thread */
    ls_task *task;    /* the task running on it */
    lua_Hook old_hook; /* the thread's hook before the outermost guard */
    int old_mask, old_count;
} ls_guardset;

/* A unique value raised by the hook: the guard recognises it. */
static const char guard_sentinel = 0;
#define SENTINEL ((void *)&guard_sentinel)

/* The guard set of thread `th` (at index idx, or the running thread when
 * idx is 0); NULL when it has none. */
static ls_guardset *set_of(lua_State *L, int idx)
{
    lua_getfield(L, LUA_REGISTRYINDEX, GUARD_SETS);
    if (idx)
        lua_pushvalue(L, idx > 0 ? idx : idx - 1);
    else
        lua_pushthread(L);
    lua_rawget(L, -2);
    ls_guardset *set = lua_touserdata(L, -1);
    lua_pop(L, 2);
    return set;
}

static int any_expired(ls_guardset *set)
{
    double now = ev_time();
    for (int i = set->depth - 1; i >= 0; i--) {
        ls_guard *g = &set->g[i];
        if (!g->expired && now >= g->deadline)
            g->expired = 1;
        if (g->expired)
            return 1;
    }
    return 0;
}

static void guard_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    ls_guardset *set = set_of(L, 0);
    if (set == NULL || set->depth == 0)
        return;
    if (!any_expired(set)) {
        /* A long computation shares the loop: yield (a count hook may)
         * when the loop has not polled for a whole slice. */
        if (lua_isyieldable(L) && ev_time() - ls_now(set->loop) > GUARD_SLICE)
            lua_yield(L, 0);
        return;
    }
    /* From now on raise at every instruction until the guard catches it. */
    if (lua_gethookcount(L) != 1)
        lua_sethook(L, guard_hook, LUA_MASKCOUNT, 1);
    lua_pushlightuserdata(L, SENTINEL);
    lua_error(L);
}

/* Leave the innermost guard: restore the task's wait cap and the hook. */
static void guard_leave(lua_State *L, ls_guardset *set)
{
    ls_guard *g = &set->g[set->depth - 1];
    ls_task_cap(set->task, g->prev_capped, g->prev_cap, NULL, NULL);
    set->depth--;
    if (set->depth > 0)
        lua_sethook(L, guard_hook, LUA_MASKCOUNT, any_expired(set) ? 1 : GUARD_CHECK_COUNT);
    else
        lua_sethook(L, set->old_hook, set->old_mask, set->old_count);
}

/* Message handler: a traceback for errors of fn, the sentinel as is. */
static int guard_msgh(lua_State *L)
{
    if (lua_touserdata(L, 1) == SENTINEL)
        return 1;
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* After the guarded call: stack is [1] timeout [2] guard set (light) [3] msgh,
 * then results (ok) or the error object. */
static int guard_finish(lua_State *L, int status)
{
    ls_guardset *set = lua_touserdata(L, 2);
    ls_guard *top = &set->g[set->depth - 1];
    int expired = top->expired || ev_time() >= top->deadline;
    guard_leave(L, set);
    /* Past the deadline the call counts as timed out even when it ended
     * without running another instruction (a C function as fn). */
    if ((status == LUA_OK || status == LUA_YIELD) && !expired) {
        int nres = lua_gettop(L) - 3;
        lua_pushboolean(L, 1);
        lua_insert(L, 4);
        return nres + 1;
    }
    if (status == LUA_OK || status == LUA_YIELD) {
        lua_pushboolean(L, 0);
        lua_pushstring(L, LS_ETIMEOUT);
        return 2;
    }
    /* the error object is on top */
    if (lua_touserdata(L, -1) == SENTINEL || expired) {
        if (!expired) {
            /* an outer guard expired: let its error travel on */
            lua_error(L);
        }
        lua_pushboolean(L, 0);
        lua_pushstring(L, LS_ETIMEOUT);
        return 2;
    }
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
}

static int guard_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)ctx;
    return guard_finish(L, status);
}

/* guarded(timeout, fn, ...) -> true, results... | false, err
 *   Run fn(...) in the calling task with a budget of `timeout` seconds.
 *   err is "timeout" when the budget ran out (the call was interrupted
 *   in its wait or its loop), else the error of fn with its traceback.
 *   e.g. local ok, res = core.guarded(5, hook, session)   [-(n+2), +r, e] */
static int l_guarded(lua_State *L)
{
    double timeout = luaL_checknumber(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    int nargs = lua_gettop(L) - 2;
    /* upvalue 1: the table thread -> guard set (weak keys) */
    lua_pushthread(L);
    lua_rawget(L, lua_upvalueindex(1));
    ls_guardset *set = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (set == NULL) {
        /* first guarded call of this thread: its set, anchored by the
         * thread (weakly) */
        ls_loop *loop = ls_getloop(L);
        ls_task *t = ls_current(L, loop);
        lua_pushvalue(L, lua_upvalueindex(1));
        set = lua_newuserdatauv(L, sizeof *set, 0);
        memset(set, 0, sizeof *set);
        luaL_setmetatable(L, GUARD_MT);
        set->loop = loop;
        set->co = L;
        set->task = t;
        lua_pushthread(L);
        lua_insert(L, -2);
        lua_rawset(L, -3);
        lua_pop(L, 1);
    }
    ls_task *t = set->task;
    lua_pushlightuserdata(L, set); /* the set stays on the stack */
    if (set->depth == GUARD_MAX_DEPTH)
        return luaL_error(L, "luasmtp: guarded calls nested more than %d deep", GUARD_MAX_DEPTH);
    if (set->depth == 0) {
        set->old_hook = lua_gethook(L);
        set->old_mask = lua_gethookmask(L);
        set->old_count = lua_gethookcount(L);
    }
    ls_guard *g = &set->g[set->depth++];
    g->expired = 0;
    g->deadline = ev_time() + (timeout > 0 ? timeout : 0);
    /* every wait of the call ends by the deadline at the latest */
    int capped;
    double cap;
    ls_task_cap(t, 1, g->deadline, &capped, &cap);
    if (capped && cap < g->deadline)
        ls_task_cap(t, 1, cap, NULL, NULL);
    g->prev_capped = capped;
    g->prev_cap = cap;
    lua_sethook(L, guard_hook, LUA_MASKCOUNT, timeout > 0 ? GUARD_CHECK_COUNT : 1);

    /* stack: timeout fn args... set -> timeout set msgh fn args... */
    lua_insert(L, 2);                 /* timeout set fn args... */
    lua_pushcfunction(L, guard_msgh);
    lua_insert(L, 3);                 /* timeout set msgh fn args... */
    int st = lua_pcallk(L, nargs, LUA_MULTRET, 3, 0, guard_k);
    return guard_finish(L, st);
}

/* interrupt_guarded(thread) -> boolean
 *   End the guarded calls running in thread (a task's coroutine, from
 *   coroutine.running() inside it) as if their deadlines had passed: a
 *   server closing a busy session at its drain deadline. false when the
 *   thread runs no guarded call.   [-1, +1, -] */
static int l_interrupt_guarded(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTHREAD);
    lua_State *co = lua_tothread(L, 1);
    ls_guardset *set = set_of(L, 1);
    if (set == NULL || set->depth == 0 || co == L) {
        lua_pushboolean(L, 0);
        return 1;
    }
    for (int i = 0; i < set->depth; i++)
        set->g[i].expired = 1;
    lua_sethook(co, guard_hook, LUA_MASKCOUNT, 1);
    ls_task *t = set->task;
    ls_task_cap(t, 1, 0., NULL, NULL); /* any further wait ends at once */
    ls_wake(set->loop, t, LS_WAKE_TIMEOUT);
    lua_pushboolean(L, 1);
    return 1;
}

int ls_open_guard(lua_State *L)
{
    lua_newtable(L);
    lua_newtable(L);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, GUARD_SETS);

    luaL_newmetatable(L, GUARD_MT);
    lua_pop(L, 1);

    lua_getfield(L, LUA_REGISTRYINDEX, GUARD_SETS);
    lua_pushcclosure(L, l_guarded, 1);
    lua_setfield(L, -2, "guarded");
    lua_pushcfunction(L, l_interrupt_guarded);
    lua_setfield(L, -2, "interrupt_guarded");
    return 0;
}
