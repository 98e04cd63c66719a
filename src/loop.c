/*
 * loop.c - one libev loop per Lua state, and the task scheduler.
 *
 * Tasks are coroutines. A task that must wait registers what it waits on
 * (an fd, a deadline, a condition) together with a generation number and
 * yields; libev callbacks never call Lua: they only move the task to the
 * ready queue. The scheduler resumes ready tasks from the main thread,
 * checking the generation so that a stale wake-up can never resume a task
 * that has moved on to wait for something else.
 *
 * When a waiting call is made from the main chunk (outside any task) the
 * loop is run right there until that call's wait ends, so a plain script
 * reads top to bottom.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <signal.h>

#include "luasmtp.h"

#define LS_MAX_SIGNAL 32

#define LOOP_KEY "luasmtp.loop"
#define TASK_MT "luasmtp.task"
#define COND_MT "luasmtp.cond"

enum task_state { T_NEW, T_READY, T_RUNNING, T_WAITING, T_DEAD };

typedef struct ls_cond {
    ls_task *head, *tail; /* waiting tasks, FIFO */
    ls_loop *loop;
    int closed;
} ls_cond;

struct ls_task {
    lua_State *co; /* NULL for the main chunk's pseudo-task */
    ls_loop *loop;
    unsigned gen;    /* bumped at every wait: identifies the wait */
    int state;
    int nargs;       /* values to pass at the first resume */
    int result;      /* how the last wait ended (enum ls_wake) */
    long id;
    int ref;         /* registry anchor of the task userdata while alive */
    int joined;      /* join() was called: its error goes to the joiner */
    ev_io io;
    unsigned long io_closes; /* loop->fd_closes when io was last set */
    unsigned io_fdgen;       /* the closes of io's fd number then */
    ev_timer timer;
    ls_cond *cond;   /* condition waited on, if any */
    ls_task *cnext, *cprev;
    ls_cond joiners; /* tasks waiting in join() */
    double cap;      /* latest end of any wait (ev_now clock), when capped */
    int capped;      /* a guarded call runs: cap applies (guard.c) */
};

typedef struct rq_entry {
    ls_task *task;
    unsigned gen;
} rq_entry;

struct ls_loop {
    struct ev_loop *ev;
    ls_task main_task;
    ls_task *current;
    rq_entry *rq;
    size_t rq_len, rq_cap;
    long ntasks;  /* tasks not yet finished */
    unsigned long fd_closes; /* closes not counted per number (no memory) */
    unsigned *fd_gen;        /* closes so far, per descriptor number */
    size_t fd_gen_cap;
    long next_id;
    int in_handler;
    ev_prepare prepare;
    /* Active while a task is ready (or the main chunk was woken): it
     * makes the next poll return at once, so no ready task waits while
     * the loop blocks, whoever made it ready (an I/O callback, a timer,
     * the flush before the poll, another task). */
    ev_idle ready;
    ls_flushable flushq; /* list head */
    /* Signals: caught once a task has waited for them, counted while
     * nobody waits, delivered to waiters in wait_signal(). */
    ev_signal sigw[LS_MAX_SIGNAL];
    unsigned sigpending[LS_MAX_SIGNAL];
    int sigref; /* the signal watchers keep the loop alive */
    ls_cond sigwaiters;
};

long ls_live[LS_COUNT_MAX];

/* ------------------------------------------------------------------ */
/* Access */

ls_loop *ls_getloop(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, LOOP_KEY);
    ls_loop *loop = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (loop == NULL || loop->ev == NULL)
        luaL_error(L, "luasmtp: event loop is not available");
    return loop;
}

struct ev_loop *ls_evloop(ls_loop *loop) { return loop->ev; }

double ls_now(ls_loop *loop) { return ev_now(loop->ev); }

/* ------------------------------------------------------------------ */
/* Waking */

static void stop_watchers(ls_task *t)
{
    if (ev_is_active(&t->io)) {
        ev_io_stop(t->loop->ev, &t->io);
        ls_live[LS_COUNT_WATCHERS]--;
    }
    if (ev_is_active(&t->timer)) {
        ev_timer_stop(t->loop->ev, &t->timer);
        ls_live[LS_COUNT_WATCHERS]--;
    }
}

static void cond_unlink(ls_task *t)
{
    ls_cond *c = t->cond;
    if (c == NULL)
        return;
    if (t->cprev)
        t->cprev->cnext = t->cnext;
    else
        c->head = t->cnext;
    if (t->cnext)
        t->cnext->cprev = t->cprev;
    else
        c->tail = t->cprev;
    t->cnext = t->cprev = NULL;
    t->cond = NULL;
}

/* The loop must not block: something is ready to run. */
static void ready_on(ls_loop *loop)
{
    if (!ev_is_active(&loop->ready))
        ev_idle_start(loop->ev, &loop->ready);
}

/* Nothing is ready any more: the loop may block again. */
static void ready_off(ls_loop *loop)
{
    if (ev_is_active(&loop->ready))
        ev_idle_stop(loop->ev, &loop->ready);
}

static void ready_cb(struct ev_loop *ev, ev_idle *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_loop *loop = (ls_loop *)((char *)w - offsetof(ls_loop, ready));
    /* The poll that follows a wake of the main chunk returned at once;
     * with no task queued, later polls may block again. */
    if (loop->rq_len == 0)
        ready_off(loop);
}

static void rq_push(ls_loop *loop, ls_task *t)
{
    if (loop->rq_len == loop->rq_cap) {
        size_t ncap = loop->rq_cap ? loop->rq_cap * 2 : 64;
        rq_entry *n = realloc(loop->rq, ncap * sizeof *n);
        if (n == NULL) {
            /* Cannot queue: leave the task waiting on a zero timer so
             * it is retried on the next iteration instead of lost. */
            t->state = T_WAITING;
            ev_timer_set(&t->timer, 0.001, 0.);
            ev_timer_start(loop->ev, &t->timer);
            ls_live[LS_COUNT_WATCHERS]++;
            return;
        }
        loop->rq = n;
        loop->rq_cap = ncap;
    }
    loop->rq[loop->rq_len].task = t;
    loop->rq[loop->rq_len].gen = t->gen;
    loop->rq_len++;
    ready_on(loop);
}

void ls_wake(ls_loop *loop, ls_task *t, int result)
{
    if (t == NULL || t->state != T_WAITING)
        return; /* stale or repeated wake */
    stop_watchers(t);
    cond_unlink(t);
    t->result = result;
    if (t == &loop->main_task) {
        t->state = T_RUNNING;
        ready_on(loop); /* woken before the poll: run_until must see it */
        return;
    }
    t->state = T_READY;
    rq_push(loop, t);
}

void ls_wake_ref(ls_loop *loop, const ls_waitref *ref, int result)
{
    ls_task *t = ref->task;
    if (t != NULL && t->state == T_WAITING && t->gen == ref->gen)
        ls_wake(loop, t, result);
}

static void io_cb(struct ev_loop *ev, ev_io *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_task *t = (ls_task *)((char *)w - offsetof(ls_task, io));
    ls_wake(t->loop, t, LS_WAKE_READY);
}

static void timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_task *t = (ls_task *)((char *)w - offsetof(ls_task, timer));
    ls_live[LS_COUNT_WATCHERS]--; /* a one-shot timer stops by itself */
    ls_wake(t->loop, t, LS_WAKE_TIMEOUT);
}

static void task_init(ls_task *t, ls_loop *loop)
{
    memset(t, 0, sizeof *t);
    t->loop = loop;
    t->ref = LUA_NOREF;
    t->joiners.loop = loop;
    ev_init(&t->io, io_cb);
    ev_init(&t->timer, timer_cb);
}

/* Wait caps (guard.c): every wait of the task ends by `cap` at the
 * latest; capped = 0 lifts it. Returns the previous cap in *prev. */
void ls_task_cap(ls_task *t, int capped, double cap, int *prev_capped, double *prev_cap)
{
    if (prev_capped)
        *prev_capped = t->capped;
    if (prev_cap)
        *prev_cap = t->cap;
    t->capped = capped;
    t->cap = cap;
}

/* ------------------------------------------------------------------ */
/* Weak watchers: unref'd while active, so the loop is ref'd again
 * before one is stopped (and when a one-shot timer has fired). */

void ls_weak_io_start(ls_loop *loop, ev_io *w)
{
    if (loop->ev == NULL || ev_is_active(w))
        return;
    ev_io_start(loop->ev, w);
    ev_unref(loop->ev);
}

void ls_weak_io_stop(ls_loop *loop, ev_io *w)
{
    if (loop->ev == NULL || !ev_is_active(w))
        return;
    ev_ref(loop->ev);
    ev_io_stop(loop->ev, w);
}

void ls_weak_timer_start(ls_loop *loop, ev_timer *w, double after)
{
    if (loop->ev == NULL)
        return;
    ls_weak_timer_stop(loop, w);
    ev_timer_set(w, after, 0.);
    ev_timer_start(loop->ev, w);
    ev_unref(loop->ev);
}

void ls_weak_timer_stop(ls_loop *loop, ev_timer *w)
{
    if (loop->ev == NULL || !ev_is_active(w))
        return;
    ev_ref(loop->ev);
    ev_timer_stop(loop->ev, w);
}

void ls_weak_timer_fired(ls_loop *loop)
{
    if (loop->ev != NULL)
        ev_ref(loop->ev);
}

void ls_fd_closing(ls_loop *loop, int fd)
{
    if (fd < 0)
        return;
    if ((size_t)fd >= loop->fd_gen_cap) {
        size_t cap = loop->fd_gen_cap ? loop->fd_gen_cap : 256;
        while (cap <= (size_t)fd)
            cap *= 2;
        unsigned *g = realloc(loop->fd_gen, cap * sizeof *g);
        if (g == NULL) {
            loop->fd_closes++; /* every watcher is set afresh instead */
            return;
        }
        memset(g + loop->fd_gen_cap, 0, (cap - loop->fd_gen_cap) * sizeof *g);
        loop->fd_gen = g;
        loop->fd_gen_cap = cap;
    }
    loop->fd_gen[fd]++;
}

static unsigned fd_gen_of(const ls_loop *loop, int fd)
{
    return (size_t)fd < loop->fd_gen_cap ? loop->fd_gen[fd] : 0;
}

/* ------------------------------------------------------------------ */
/* Flush queue: run before the loop blocks. */

void ls_flush_queue(ls_loop *loop, ls_flushable *f)
{
    if (f->queued)
        return;
    f->next = loop->flushq.next;
    f->prev = &loop->flushq;
    loop->flushq.next->prev = f;
    loop->flushq.next = f;
    f->queued = 1;
}

void ls_flush_dequeue(ls_loop *loop, ls_flushable *f)
{
    (void)loop;
    if (!f->queued)
        return;
    f->prev->next = f->next;
    f->next->prev = f->prev;
    f->next = f->prev = NULL;
    f->queued = 0;
}

static void prepare_cb(struct ev_loop *ev, ev_prepare *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_loop *loop = (ls_loop *)((char *)w - offsetof(ls_loop, prepare));
    while (loop->flushq.next != &loop->flushq) {
        ls_flushable *f = loop->flushq.next;
        ls_flush_dequeue(loop, f);
        f->flush(f);
    }
}

/* ------------------------------------------------------------------ */
/* Running tasks */

static void report_error(lua_State *L, ls_loop *loop, ls_task *t, int tidx)
{
    /* stack: ... message(with traceback) */
    lua_getfield(L, LUA_REGISTRYINDEX, "luasmtp.errhandler");
    if (lua_isfunction(L, -1)) {
        lua_pushvalue(L, -2);
        lua_pushvalue(L, tidx);
        loop->in_handler = 1;
        if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
            fprintf(stderr, "luasmtp: error handler failed: %s\n",
                    lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
            lua_pop(L, 1);
        }
        loop->in_handler = 0;
    } else {
        lua_pop(L, 1);
        fprintf(stderr, "luasmtp: task %ld failed: %s\n", t->id,
                lua_tostring(L, -1) ? lua_tostring(L, -1) : "(error object)");
    }
}

static void task_finish(lua_State *L, ls_loop *loop, ls_task *t, int ok, int nres)
{
    /* stack of co: results (ok) or error object (not ok) */
    lua_State *co = t->co;
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref); /* task userdata */
    int tidx = lua_gettop(L);
    lua_createtable(L, nres + 1, 1);          /* results */
    lua_pushboolean(L, ok);
    lua_rawseti(L, -2, 1);
    if (ok) {
        lua_xmove(co, L, nres);
        for (int i = nres; i >= 1; i--)
            lua_rawseti(L, -1 - i, i + 1);
        lua_pushinteger(L, nres + 1);
    } else {
        lua_xmove(co, L, 1);
        if (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER) {
            luaL_traceback(L, co, lua_tostring(L, -1), 0);
            lua_remove(L, -2);
        }
        lua_rawseti(L, -2, 2);
        lua_pushinteger(L, 2);
    }
    lua_setfield(L, -2, "n");
    /* The results take the coroutine's place (which can be collected). */
    lua_setiuservalue(L, tidx, 1);
    t->state = T_DEAD;
    loop->ntasks--;
    ls_live[LS_COUNT_TASKS]--;
    /* Wake joiners before reporting so a join sees the result. */
    while (t->joiners.head)
        ls_wake(loop, t->joiners.head, LS_WAKE_READY);
    if (!ok && !t->joined) {
        lua_getiuservalue(L, tidx, 1);
        lua_rawgeti(L, -1, 2);
        lua_remove(L, -2);
        report_error(L, loop, t, tidx);
        lua_pop(L, 1);
    }
    luaL_unref(L, LUA_REGISTRYINDEX, t->ref);
    t->ref = LUA_NOREF;
    t->co = NULL;
    lua_settop(L, tidx - 1);
}

static void resume_task(lua_State *L, ls_loop *loop, ls_task *t, unsigned gen)
{
    if (t->state != T_READY || t->gen != gen)
        return; /* stale entry */
    int nargs = t->nargs, nres = 0;
    t->nargs = 0;
    t->state = T_RUNNING;
    loop->current = t;
    int st = lua_resume(t->co, L, nargs, &nres);
    loop->current = &loop->main_task;
    if (st == LUA_YIELD) {
        if (t->state == T_RUNNING) {
            /* A plain coroutine.yield(): give others a turn. */
            lua_pop(t->co, nres);
            t->gen++;
            t->state = T_READY;
            rq_push(loop, t);
        }
        return;
    }
    task_finish(L, loop, t, st == LUA_OK, st == LUA_OK ? nres : 1);
}

/* Resume the tasks that were ready when the pass began. Tasks made ready
 * during the pass wait for the next one, after the loop has polled, so a
 * task that keeps yielding cannot starve I/O. */
static void drain(lua_State *L, ls_loop *loop)
{
    size_t n = loop->rq_len;
    for (size_t i = 0; i < n; i++) {
        rq_entry e = loop->rq[i];
        resume_task(L, loop, e.task, e.gen);
    }
    if (loop->rq_len > n)
        memmove(loop->rq, loop->rq + n, (loop->rq_len - n) * sizeof *loop->rq);
    loop->rq_len -= n;
    if (loop->rq_len == 0)
        ready_off(loop);
}

/* Run the scheduler until *flag becomes false (flag != NULL) or until no
 * task is left (flag == NULL). Returns 0, or -1 when nothing can ever
 * happen again (no ready task and no active watcher). */
static int run_until(lua_State *L, ls_loop *loop, int *waiting)
{
    for (;;) {
        drain(L, loop);
        if (waiting)
            *waiting = loop->main_task.state == T_WAITING;
        if (waiting ? !*waiting : loop->ntasks == 0)
            return 0;
        /* ev_run() tells whether any watcher is still active; with
         * none and nothing ready, nothing can happen any more. */
        if (!ev_run(loop->ev, loop->rq_len ? EVRUN_NOWAIT : EVRUN_ONCE) && loop->rq_len == 0) {
            drain(L, loop);
            if (waiting)
                *waiting = loop->main_task.state == T_WAITING;
            if (waiting ? !*waiting : loop->ntasks == 0)
                return 0;
            return -1;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Waiting */

ls_task *ls_current(lua_State *L, ls_loop *loop)
{
    if (loop->in_handler)
        luaL_error(L, "luasmtp: cannot wait inside the task error handler");
    ls_task *t = loop->current;
    if (t == &loop->main_task) {
        if (t->state == T_WAITING)
            luaL_error(L, "luasmtp: cannot wait here: the main chunk is already waiting");
        return t;
    }
    if (L != t->co)
        luaL_error(L, "luasmtp: cannot wait in a coroutine that is not a luasmtp task "
                      "(start it with luasmtp.spawn)");
    if (!lua_isyieldable(L))
        luaL_error(L, "luasmtp: cannot wait across a C-call boundary (inside a table.sort "
                      "comparator, a string.gsub callback, a metamethod such as __gc, or "
                      "require); move the waiting call out of it");
    return t;
}

static void arm(ls_loop *loop, ls_task *t, int fd, int events, double deadline)
{
    /* A task running a guarded call waits no longer than its budget. */
    if (t->capped && (deadline < 0 || t->cap < deadline))
        deadline = t->cap;
    t->gen++;
    t->result = LS_WAKE_NONE;
    t->state = T_WAITING;
    if (fd >= 0) {
        /* The same fd and events as the task's last wait, and that fd
         * number not closed since (so it is still that file): start the
         * watcher as it is. Stopped and started again within a pass, it
         * leaves libev nothing to tell the kernel; ev_io_set would make
         * libev add the fd to epoll again (an epoll_ctl failing with
         * EEXIST on every wait). After a close of that number it may
         * name a new file, which libev must register: then it is set
         * afresh. Closes are counted per number, so closing one socket
         * does not make every other task's watcher register again. */
        unsigned fdgen = fd_gen_of(loop, fd);
        if (t->io.fd != fd || (t->io.events & (EV_READ | EV_WRITE)) != events ||
            t->io_closes != loop->fd_closes || t->io_fdgen != fdgen) {
            ev_io_set(&t->io, fd, events);
            t->io_closes = loop->fd_closes;
            t->io_fdgen = fdgen;
        }
        ev_io_start(loop->ev, &t->io);
        ls_live[LS_COUNT_WATCHERS]++;
    }
    if (deadline >= 0) {
        double d = deadline - ev_now(loop->ev);
        ev_timer_set(&t->timer, d > 0 ? d : 0., 0.);
        ev_timer_start(loop->ev, &t->timer);
        ls_live[LS_COUNT_WATCHERS]++;
    }
}

int ls_wait(lua_State *L, ls_loop *loop, ls_task *t, int fd, int events,
            double deadline, ls_waitref *slot, lua_KContext ctx, lua_KFunction k)
{
    arm(loop, t, fd, events, deadline);
    if (slot) {
        slot->task = t;
        slot->gen = t->gen;
    }
    if (t != &loop->main_task)
        return lua_yieldk(L, 0, ctx, k);
    /* The pseudo-task leaves T_WAITING when woken. */
    int waiting = 1;
    if (run_until(L, loop, &waiting) < 0 && t->state == T_WAITING) {
        stop_watchers(t);
        cond_unlink(t);
        t->state = T_RUNNING;
        luaL_error(L, "luasmtp: deadlock: the main chunk waits for an event that nothing "
                      "can trigger");
    }
    return t->result;
}

/* Protected part of a main-chunk ls_wait_k: args loop, task, deadline, slot. */
static int main_wait(lua_State *L)
{
    ls_loop *loop = lua_touserdata(L, 1);
    ls_task *t = lua_touserdata(L, 2);
    ls_wait(L, loop, t, -1, 0, lua_tonumber(L, 3), lua_touserdata(L, 4), 0, NULL);
    return 0;
}

int ls_wait_k(lua_State *L, ls_loop *loop, ls_task *t, double deadline, ls_waitref *slot,
              lua_KContext ctx, lua_KFunction k, void (*abandon)(lua_KContext ctx))
{
    if (t != &loop->main_task) {
        ls_wait(L, loop, t, -1, 0, deadline, slot, ctx, k); /* yields: k runs on resume */
        return k(L, LUA_OK, ctx);
    }
    lua_pushcfunction(L, main_wait);
    lua_pushlightuserdata(L, loop);
    lua_pushlightuserdata(L, t);
    lua_pushnumber(L, deadline);
    lua_pushlightuserdata(L, slot);
    if (lua_pcall(L, 4, 0, 0) != LUA_OK) {
        abandon(ctx);
        return lua_error(L);
    }
    return k(L, LUA_OK, ctx);
}

int ls_wait_result(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    return loop->current->result;
}

/* ------------------------------------------------------------------ */
/* Lua API: tasks */

static ls_task *check_task(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, TASK_MT);
}

/* spawn(fn, ...) -> task
 * Start fn(...) as a new task; it first runs at the next scheduler pass. */
static int l_spawn(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    ls_loop *loop = ls_getloop(L);
    int nargs = lua_gettop(L) - 1;
    /* user value 1: the coroutine while the task lives, its results
     * table ({ok, values..., n =}) once it has finished */
    ls_task *t = lua_newuserdatauv(L, sizeof *t, 1);
    task_init(t, loop);
    luaL_setmetatable(L, TASK_MT);
    lua_State *co = lua_newthread(L);
    lua_setiuservalue(L, -2, 1);
    /* move fn and args to the coroutine */
    for (int i = 1; i <= nargs + 1; i++)
        lua_pushvalue(L, i);
    lua_xmove(L, co, nargs + 1);
    t->co = co;
    t->nargs = nargs;
    t->id = ++loop->next_id;
    lua_pushvalue(L, -1);
    t->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    loop->ntasks++;
    ls_live[LS_COUNT_TASKS]++;
    t->state = T_READY;
    rq_push(loop, t);
    return 1;
}

/* run() -> true | nil, "deadlock", n
 * Run tasks until none is left. Must be called outside any task. */
static int l_run(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    if (loop->current != &loop->main_task || loop->main_task.state == T_WAITING)
        return luaL_error(L, "luasmtp: run() cannot be called from inside a task");
    if (run_until(L, loop, NULL) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, "deadlock");
        lua_pushinteger(L, loop->ntasks);
        return 3;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* step([timeout]) -> number of ready tasks run
 * One scheduler pass: run the ready tasks, then poll once (waiting at
 * most timeout seconds, default 0). For embedding in another loop. */
static void step_timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)ev; (void)w; (void)revents;
}

static int l_step(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    double timeout = luaL_optnumber(L, 1, 0.);
    if (loop->current != &loop->main_task || loop->main_task.state == T_WAITING)
        return luaL_error(L, "luasmtp: step() cannot be called from inside a task");
    size_t n = loop->rq_len;
    drain(L, loop);
    if (timeout > 0 && loop->rq_len == 0) {
        ev_timer tm;
        ev_timer_init(&tm, step_timer_cb, timeout, 0.);
        ev_timer_start(loop->ev, &tm);
        ev_run(loop->ev, EVRUN_ONCE);
        ev_timer_stop(loop->ev, &tm);
    } else {
        ev_run(loop->ev, EVRUN_NOWAIT);
    }
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
}

static int sleep_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    (void)L;
    return 0;
}

/* sleep(seconds) : wait; sleep(0) lets other ready tasks run first. */
static int l_sleep(lua_State *L)
{
    double s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s >= 0, 1, "negative duration");
    ls_loop *loop = ls_getloop(L);
    ls_task *t = ls_current(L, loop);
    ls_wait(L, loop, t, -1, 0, ev_now(loop->ev) + s, NULL, 0, sleep_k);
    return 0;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, ev_now(ls_getloop(L)->ev));
    return 1;
}

static int l_update_now(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    ev_now_update(loop->ev);
    lua_pushnumber(L, ev_now(loop->ev));
    return 1;
}

static int l_time(lua_State *L)
{
    lua_pushnumber(L, ev_time());
    return 1;
}

/* current() -> task | nil: the running task. */
static int l_current(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    if (loop->current == &loop->main_task || loop->current->co != L) {
        lua_pushnil(L);
        return 1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, loop->current->ref);
    return 1;
}

/* on_error(fn(message, task)) : replace the handler of task errors.
 * The message carries the traceback. Returns the previous handler. */
static int l_on_error(lua_State *L)
{
    if (!lua_isnoneornil(L, 1))
        luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, "luasmtp.errhandler");
    lua_pushvalue(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "luasmtp.errhandler");
    return 1;
}

static int push_results(lua_State *L, int uvidx)
{
    lua_getiuservalue(L, uvidx, 1); /* the results of a finished task */
    int r = lua_gettop(L);
    lua_getfield(L, r, "n");
    lua_Integer n = lua_tointeger(L, -1);
    lua_pop(L, 1);
    luaL_checkstack(L, (int)n, "too many results");
    for (lua_Integer i = 1; i <= n; i++)
        lua_rawgeti(L, r, i);
    return (int)n;
}

static int join_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    ls_task *t = check_task(L, 1);
    if (t->state != T_DEAD)
        return ls_pusherror(L, LS_ETIMEOUT, NULL);
    return push_results(L, 1);
}

/* task:join([timeout]) -> true, results... | false, err | nil, "timeout"
 * Wait for the task to finish. A task that is joined does not report its
 * error through the error handler: the joiner gets it. */
static int l_task_join(lua_State *L)
{
    ls_task *t = check_task(L, 1);
    double timeout = luaL_optnumber(L, 2, -1);
    t->joined = 1;
    if (t->state == T_DEAD)
        return push_results(L, 1);
    ls_loop *loop = t->loop;
    ls_task *me = ls_current(L, loop);
    if (me == t)
        return luaL_error(L, "luasmtp: a task cannot join itself");
    /* link into t's joiners, then wait */
    me->cond = &t->joiners;
    me->cprev = t->joiners.tail;
    me->cnext = NULL;
    if (t->joiners.tail)
        t->joiners.tail->cnext = me;
    else
        t->joiners.head = me;
    t->joiners.tail = me;
    ls_wait(L, loop, me, -1, 0, timeout >= 0 ? ev_now(loop->ev) + timeout : -1, NULL, 0, join_k);
    return join_k(L, LUA_OK, 0);
}

static int l_task_status(lua_State *L)
{
    static const char *const names[] = {"new", "ready", "running", "waiting", "dead"};
    ls_task *t = check_task(L, 1);
    lua_pushstring(L, names[t->state]);
    return 1;
}

static int l_task_id(lua_State *L)
{
    lua_pushinteger(L, check_task(L, 1)->id);
    return 1;
}

static int l_task_tostring(lua_State *L)
{
    ls_task *t = check_task(L, 1);
    lua_pushfstring(L, "luasmtp.task %d", (int)t->id);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Lua API: conditions, for coordinating tasks */

static ls_cond *check_cond(lua_State *L, int idx) { return luaL_checkudata(L, idx, COND_MT); }

static int l_cond(lua_State *L)
{
    ls_cond *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    c->loop = ls_getloop(L);
    luaL_setmetatable(L, COND_MT);
    return 1;
}

static int cond_wait_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    switch (ls_wait_result(L)) {
    case LS_WAKE_READY:
        lua_pushboolean(L, 1);
        return 1;
    case LS_WAKE_CLOSED:
        return ls_pusherror(L, LS_ECLOSED, NULL);
    default:
        return ls_pusherror(L, LS_ETIMEOUT, NULL);
    }
}

/* cond:wait([timeout]) -> true | nil, "timeout" | nil, "closed" */
static int l_cond_wait(lua_State *L)
{
    ls_cond *c = check_cond(L, 1);
    double timeout = luaL_optnumber(L, 2, -1);
    if (c->closed)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    ls_loop *loop = c->loop;
    ls_task *me = ls_current(L, loop);
    me->cond = c;
    me->cprev = c->tail;
    me->cnext = NULL;
    if (c->tail)
        c->tail->cnext = me;
    else
        c->head = me;
    c->tail = me;
    ls_wait(L, loop, me, -1, 0, timeout >= 0 ? ev_now(loop->ev) + timeout : -1, NULL, 0, cond_wait_k);
    return cond_wait_k(L, LUA_OK, 0);
}

/* cond:signal() -> woke (bool): wake the longest-waiting task. */
static int l_cond_signal(lua_State *L)
{
    ls_cond *c = check_cond(L, 1);
    int woke = c->head != NULL;
    if (woke)
        ls_wake(c->loop, c->head, LS_WAKE_READY);
    lua_pushboolean(L, woke);
    return 1;
}

/* cond:broadcast() -> n: wake every waiting task. */
static int l_cond_broadcast(lua_State *L)
{
    ls_cond *c = check_cond(L, 1);
    lua_Integer n = 0;
    while (c->head) {
        ls_wake(c->loop, c->head, LS_WAKE_READY);
        n++;
    }
    lua_pushinteger(L, n);
    return 1;
}

/* cond:close(): waiters get nil, "closed"; later waits too. */
static int l_cond_close(lua_State *L)
{
    ls_cond *c = check_cond(L, 1);
    c->closed = 1;
    while (c->head)
        ls_wake(c->loop, c->head, LS_WAKE_CLOSED);
    return 0;
}


/* ------------------------------------------------------------------ */
/* Signals */

/* Every signal name luasmtp knows, "SIG" prefix optional. catchable: a
 * task may wait for it (KILL cannot be caught; "0" only probes a pid). */
static const struct {
    const char *name;
    int num;
    int catchable;
} signames[] = {
    {"TERM", SIGTERM, 1}, {"INT", SIGINT, 1},   {"HUP", SIGHUP, 1},   {"USR1", SIGUSR1, 1},
    {"USR2", SIGUSR2, 1}, {"QUIT", SIGQUIT, 1}, {"PIPE", SIGPIPE, 1}, {"CHLD", SIGCHLD, 1},
    {"KILL", SIGKILL, 0}, {"0", 0, 0},
};

const char *ls_signame(int sig)
{
    for (size_t i = 0; i < sizeof signames / sizeof signames[0]; i++)
        if (signames[i].num == sig)
            return signames[i].name;
    return NULL;
}

int ls_checksignal(lua_State *L, int idx, int catchable_only)
{
    const char *name = luaL_checkstring(L, idx);
    if (strncmp(name, "SIG", 3) == 0)
        name += 3;
    for (size_t i = 0; i < sizeof signames / sizeof signames[0]; i++)
        if (strcmp(name, signames[i].name) == 0 && (signames[i].catchable || !catchable_only))
            return signames[i].num;
    return luaL_argerror(L, idx, "unknown signal name");
}

static void set_sigref(ls_loop *loop, int want)
{
    int have = 0;
    for (int i = 0; i < LS_MAX_SIGNAL; i++)
        have |= ev_is_active(&loop->sigw[i]);
    if (!have)
        return;
    /* Active signal watchers hold one loop reference per watcher; keep
     * them only while a task waits, so a caught signal alone does not
     * keep run() from returning. */
    for (int i = 0; i < LS_MAX_SIGNAL; i++) {
        if (!ev_is_active(&loop->sigw[i]))
            continue;
        if (want && !loop->sigref)
            ev_ref(loop->ev);
        else if (!want && loop->sigref)
            ev_unref(loop->ev);
    }
    loop->sigref = want;
}

static void signal_cb(struct ev_loop *ev, ev_signal *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_loop *loop = w->data;
    loop->sigpending[w->signum]++;
    while (loop->sigwaiters.head)
        ls_wake(loop, loop->sigwaiters.head, LS_WAKE_READY);
}

/* First pending signal among the names at stack 1..n; pushes its name. */
static int take_signal(lua_State *L, ls_loop *loop, int n)
{
    for (int i = 1; i <= n; i++) {
        int sig = ls_checksignal(L, i, 1);
        if (loop->sigpending[sig] > 0) {
            loop->sigpending[sig]--;
            lua_pushstring(L, ls_signame(sig));
            return 1;
        }
    }
    return 0;
}

static int wait_signal_k(lua_State *L, int status, lua_KContext ctx);

static int wait_signal_loop(lua_State *L, ls_loop *loop, int n, double deadline)
{
    for (;;) {
        if (take_signal(L, loop, n))
            return 1;
        ls_task *me = ls_current(L, loop);
        me->cond = &loop->sigwaiters;
        me->cprev = loop->sigwaiters.tail;
        me->cnext = NULL;
        if (loop->sigwaiters.tail)
            loop->sigwaiters.tail->cnext = me;
        else
            loop->sigwaiters.head = me;
        loop->sigwaiters.tail = me;
        set_sigref(loop, 1);
        int r = ls_wait(L, loop, me, -1, 0, deadline, NULL, (lua_KContext)n, wait_signal_k);
        if (loop->sigwaiters.head == NULL)
            set_sigref(loop, 0);
        if (r == LS_WAKE_TIMEOUT)
            return take_signal(L, loop, n) ? 1 : ls_pusherror(L, LS_ETIMEOUT, NULL);
    }
}

static int wait_signal_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    ls_loop *loop = ls_getloop(L);
    if (loop->sigwaiters.head == NULL)
        set_sigref(loop, 0);
    if (ls_wait_result(L) == LS_WAKE_TIMEOUT)
        return take_signal(L, loop, (int)ctx) ? 1 : ls_pusherror(L, LS_ETIMEOUT, NULL);
    lua_Number deadline = lua_tonumber(L, (int)ctx + 1);
    return wait_signal_loop(L, loop, (int)ctx, deadline);
}

/* wait_signal(name, ... [, timeout]) -> name | nil, "timeout"
 * Wait for one of the signals ("TERM", "INT", "HUP", "USR1", "USR2",
 * "QUIT", "PIPE", "CHLD"). From the first call on, the signals named are
 * caught for good (their default action no longer applies) and counted
 * while no task waits, so none is lost between two waits.
 *   local sig = luasmtp.wait_signal("TERM", "INT") */
static int l_wait_signal(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    int n = lua_gettop(L);
    double deadline = -1;
    if (n > 0 && lua_type(L, n) == LUA_TNUMBER) {
        double t = lua_tonumber(L, n);
        luaL_argcheck(L, t >= 0, n, "negative timeout");
        deadline = ev_now(loop->ev) + t;
        lua_pop(L, 1);
        n--;
    }
    luaL_argcheck(L, n > 0, 1, "signal name expected");
    for (int i = 1; i <= n; i++) {
        int sig = ls_checksignal(L, i, 1);
        if (sig >= LS_MAX_SIGNAL)
            return luaL_argerror(L, i, "signal number out of range");
        if (!ev_is_active(&loop->sigw[sig])) {
            ev_signal_init(&loop->sigw[sig], signal_cb, sig);
            loop->sigw[sig].data = loop;
            ev_signal_start(loop->ev, &loop->sigw[sig]);
            if (!loop->sigref)
                ev_unref(loop->ev);
        }
    }
    lua_settop(L, n);
    lua_pushnumber(L, deadline); /* n + 1 */
    return wait_signal_loop(L, loop, n, deadline);
}

/* ------------------------------------------------------------------ */
/* Loop lifetime */

static int l_loop_gc(lua_State *L)
{
    ls_loop *loop = lua_touserdata(L, 1);
    if (loop->ev) {
        for (int i = 0; i < LS_MAX_SIGNAL; i++) {
            if (ev_is_active(&loop->sigw[i])) {
                if (!loop->sigref)
                    ev_ref(loop->ev);
                ev_signal_stop(loop->ev, &loop->sigw[i]);
            }
        }
        if (ev_is_active(&loop->prepare)) {
            ev_ref(loop->ev);
            ev_prepare_stop(loop->ev, &loop->prepare);
        }
        ready_off(loop);
        ev_loop_destroy(loop->ev);
        loop->ev = NULL;
    }
    free(loop->rq);
    free(loop->fd_gen);
    loop->rq = NULL;
    return 0;
}

static int l_stats(lua_State *L)
{
    static const char *const names[LS_COUNT_MAX] = {
        "tasks", "sockets", "listeners", "tls_contexts", "tls_sessions", "watchers", "dns_queries",
        "http_requests", "redis_requests",
    };
    lua_createtable(L, 0, LS_COUNT_MAX + 3);
    long total = 0;
    ls_live[LS_COUNT_TLS_SESSIONS] = ls_tls_live_sessions; /* lib/tls_transport.c */
    for (int i = 0; i < LS_COUNT_MAX; i++) {
        lua_pushinteger(L, ls_live[i]);
        lua_setfield(L, -2, names[i]);
        total += ls_live[i];
    }
    lua_pushinteger(L, total);
    lua_setfield(L, -2, "total");
    /* Memory, in bytes (not part of the total of live objects). */
    lua_pushinteger(L, (lua_Integer)ls_socket_buffer_bytes);
    lua_setfield(L, -2, "buffer_bytes");
    lua_pushinteger(L, (lua_Integer)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + lua_gc(L, LUA_GCCOUNTB, 0));
    lua_setfield(L, -2, "lua_heap");
    return 1;
}

int ls_open_loop(lua_State *L)
{
    /* One loop per Lua state, created on first open. */
    if (lua_getfield(L, LUA_REGISTRYINDEX, LOOP_KEY) == LUA_TNIL) {
        lua_pop(L, 1);
        ls_loop *loop = lua_newuserdatauv(L, sizeof *loop, 0);
        memset(loop, 0, sizeof *loop);
        lua_createtable(L, 0, 2);
        lua_pushcfunction(L, l_loop_gc);
        lua_setfield(L, -2, "__gc");
        lua_setmetatable(L, -2);
        loop->ev = ev_loop_new(EVFLAG_AUTO);
        if (loop->ev == NULL)
            return luaL_error(L, "luasmtp: cannot create the event loop");
        task_init(&loop->main_task, loop);
        loop->sigwaiters.loop = loop;
        loop->main_task.state = T_RUNNING;
        loop->current = &loop->main_task;
        loop->flushq.next = loop->flushq.prev = &loop->flushq;
        ev_idle_init(&loop->ready, ready_cb);
        ev_prepare_init(&loop->prepare, prepare_cb);
        ev_prepare_start(loop->ev, &loop->prepare);
        ev_unref(loop->ev); /* the prepare watcher alone keeps nothing alive */
        lua_setfield(L, LUA_REGISTRYINDEX, LOOP_KEY);
    } else {
        lua_pop(L, 1);
    }

    static const luaL_Reg task_methods[] = {
        {"join", l_task_join},
        {"status", l_task_status},
        {"id", l_task_id},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, TASK_MT)) {
        luaL_newlib(L, task_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_task_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    static const luaL_Reg cond_methods[] = {
        {"wait", l_cond_wait},
        {"signal", l_cond_signal},
        {"broadcast", l_cond_broadcast},
        {"close", l_cond_close},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, COND_MT)) {
        luaL_newlib(L, cond_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);

    static const luaL_Reg funcs[] = {
        {"spawn", l_spawn},
        {"run", l_run},
        {"step", l_step},
        {"sleep", l_sleep},
        {"now", l_now},
        {"update_now", l_update_now},
        {"time", l_time},
        {"current", l_current},
        {"on_error", l_on_error},
        {"cond", l_cond},
        {"wait_signal", l_wait_signal},
        {"stats", l_stats},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
