/*
 * guard.c - calling Lua code under a deadline.
 *
 * guarded(timeout, fn, ...) runs fn(...) in the calling task like pcall,
 * but gives it a time budget. Past the deadline the call is interrupted
 * wherever it is:
 *   - waiting (socket, sleep, DNS, condition, join): a timer wakes the
 *     task as if that wait had timed out, so the waiting C code cleans up
 *     the way it does for any timeout;
 *   - running Lua code (a busy loop): a count hook on the task's thread
 *     checks the clock every few thousand instructions. Until the
 *     deadline, a call that has kept the loop from polling for a time
 *     slice yields there, so other tasks, I/O and signals go on.
 * Either way, once the deadline has passed the hook raises an error at
 * every instruction until the error reaches the guard, so a pcall inside
 * fn cannot swallow it. To-be-closed variables of fn are closed on the
 * way out. Guards nest; each has its own deadline.
 *
 * The only state is the guard record on the Lua stack of the call and a
 * per-thread chain of active guards; libev's timer callback only wakes
 * the task (no Lua from callbacks).
 */
#include <string.h>

#include "luasmtp.h"

#define GUARD_MT "luasmtp.guard"
#define GUARD_CHAIN "luasmtp.guards" /* registry: thread -> innermost guard */

/* Instructions between two clock checks while a guard is active. */
#define GUARD_CHECK_COUNT 4096
/* A guarded call that has run this long (seconds) since the loop last
 * polled yields, so other tasks, I/O and signals are served meanwhile. */
#define GUARD_SLICE 0.05

typedef struct ls_guard {
    ev_timer timer;
    ls_loop *loop;
    ls_task *task;
    lua_State *co;          /* the thread the guarded call runs on */
    struct ls_guard *outer; /* enclosing guard of the same thread */
    double deadline;        /* ev_time() clock */
    int expired;
    int active;
    lua_Hook old_hook;      /* the thread's hook before the outermost guard */
    int old_mask, old_count;
} ls_guard;

/* A unique value raised by the hook: the guard recognises it. */
static const char guard_sentinel = 0;
#define SENTINEL ((void *)&guard_sentinel)

static ls_guard *chain_get(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, GUARD_CHAIN);
    lua_pushthread(L);
    lua_rawget(L, -2);
    ls_guard *g = lua_touserdata(L, -1);
    lua_pop(L, 2);
    return g;
}

/* The guard record is anchored by the chain table (its userdata), so the
 * chain holds the full userdata, not a light one. idx: the guard userdata
 * or 0 to clear. */
static void chain_set(lua_State *L, int idx)
{
    idx = idx ? lua_absindex(L, idx) : 0;
    lua_getfield(L, LUA_REGISTRYINDEX, GUARD_CHAIN);
    lua_pushthread(L);
    if (idx)
        lua_pushvalue(L, idx);
    else
        lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

static int any_expired(ls_guard *g)
{
    double now = ev_time();
    for (; g; g = g->outer) {
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
    ls_guard *g = chain_get(L);
    if (g == NULL)
        return;
    if (!any_expired(g)) {
        /* A long computation shares the loop: yield (a count hook may)
         * when the loop has not polled for a whole slice. */
        if (lua_isyieldable(L) && ev_time() - ls_now(g->loop) > GUARD_SLICE)
            lua_yield(L, 0);
        return;
    }
    /* From now on raise at every instruction until the guard catches it. */
    if (lua_gethookcount(L) != 1)
        lua_sethook(L, guard_hook, LUA_MASKCOUNT, 1);
    lua_pushlightuserdata(L, SENTINEL);
    lua_error(L);
}

static void timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_guard *g = (ls_guard *)((char *)w - offsetof(ls_guard, timer));
    ls_live[LS_COUNT_WATCHERS]--; /* one-shot: stopped by libev */
    g->expired = 1;
    /* Raise at the next instruction the thread runs. */
    lua_sethook(g->co, guard_hook, LUA_MASKCOUNT, 1);
    /* The task waits for something else: end that wait as timed out.
     * A task that is not waiting (ready, running) meets the hook. */
    ls_wake(g->loop, g->task, LS_WAKE_TIMEOUT);
}

static void guard_stop(ls_guard *g)
{
    if (ev_is_active(&g->timer)) {
        ev_timer_stop(ls_evloop(g->loop), &g->timer);
        ls_live[LS_COUNT_WATCHERS]--;
    }
}

static int l_guard_gc(lua_State *L)
{
    ls_guard *g = luaL_checkudata(L, 1, GUARD_MT);
    if (g->loop)
        guard_stop(g);
    return 0;
}

/* Leave guard g (the innermost of its thread): stop its timer, restore
 * the chain and the hook. */
static void guard_leave(lua_State *L, ls_guard *g)
{
    guard_stop(g);
    g->active = 0;
    ls_guard *outer = g->outer;
    if (outer) {
        lua_getfield(L, LUA_REGISTRYINDEX, GUARD_CHAIN);
        lua_pushthread(L);
        lua_rawget(L, -2); /* g */
        lua_getiuservalue(L, -1, 1); /* outer userdata */
        lua_remove(L, -2);
        lua_pushthread(L);
        lua_insert(L, -2);
        lua_rawset(L, -3);
        lua_pop(L, 1);
        if (any_expired(outer))
            lua_sethook(L, guard_hook, LUA_MASKCOUNT, 1);
        else
            lua_sethook(L, guard_hook, LUA_MASKCOUNT, GUARD_CHECK_COUNT);
    } else {
        chain_set(L, 0);
        lua_sethook(L, g->old_hook, g->old_mask, g->old_count);
    }
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

/* After the guarded call: stack is [1] timeout [2] guard [3] msgh, then
 * results (ok) or the error object. */
static int guard_finish(lua_State *L, int status)
{
    ls_guard *g = luaL_checkudata(L, 2, GUARD_MT);
    int expired = g->expired;
    guard_leave(L, g);
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
    ls_loop *loop = ls_getloop(L);
    ls_task *t = ls_current(L, loop);
    int nargs = lua_gettop(L) - 2;

    ls_guard *g = lua_newuserdatauv(L, sizeof *g, 1);
    memset(g, 0, sizeof *g);
    luaL_setmetatable(L, GUARD_MT);
    g->loop = loop;
    g->task = t;
    g->co = L;
    g->deadline = ev_time() + (timeout > 0 ? timeout : 0);
    ev_init(&g->timer, timer_cb);

    ls_guard *outer = chain_get(L);
    if (outer) {
        g->outer = outer;
        /* keep the outer record reachable from this one */
        lua_getfield(L, LUA_REGISTRYINDEX, GUARD_CHAIN);
        lua_pushthread(L);
        lua_rawget(L, -2);
        lua_setiuservalue(L, -3, 1);
        lua_pop(L, 1);
    } else {
        g->old_hook = lua_gethook(L);
        g->old_mask = lua_gethookmask(L);
        g->old_count = lua_gethookcount(L);
    }
    chain_set(L, -1);
    g->active = 1;
    ev_timer_set(&g->timer, timeout > 0 ? timeout : 0., 0.);
    ev_timer_start(ls_evloop(loop), &g->timer);
    ls_live[LS_COUNT_WATCHERS]++;
    lua_sethook(L, guard_hook, LUA_MASKCOUNT, timeout > 0 ? GUARD_CHECK_COUNT : 1);

    /* stack: timeout fn args... guard -> timeout guard msgh fn args... */
    lua_insert(L, 2);                 /* timeout guard fn args... */
    lua_pushcfunction(L, guard_msgh);
    lua_insert(L, 3);                 /* timeout guard msgh fn args... */
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
    lua_getfield(L, LUA_REGISTRYINDEX, GUARD_CHAIN);
    lua_pushvalue(L, 1);
    lua_rawget(L, -2);
    ls_guard *g = lua_touserdata(L, -1);
    lua_pop(L, 2);
    if (g == NULL || !g->active || co == L) {
        lua_pushboolean(L, 0);
        return 1;
    }
    for (ls_guard *o = g; o; o = o->outer)
        o->expired = 1;
    lua_sethook(co, guard_hook, LUA_MASKCOUNT, 1);
    ls_wake(g->loop, g->task, LS_WAKE_TIMEOUT);
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
    lua_setfield(L, LUA_REGISTRYINDEX, GUARD_CHAIN);

    luaL_newmetatable(L, GUARD_MT);
    lua_pushcfunction(L, l_guard_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    lua_pushcfunction(L, l_guarded);
    lua_setfield(L, -2, "guarded");
    lua_pushcfunction(L, l_interrupt_guarded);
    lua_setfield(L, -2, "interrupt_guarded");
    return 0;
}
