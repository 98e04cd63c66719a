/*
 * luasmtp.h - shared declarations of the C core.
 *
 * Layers (see README "Architecture"):
 *   lib/               the Lua-free library (no Lua header, no lua_ call; the
 *                      Makefile compiles it without the Lua include path):
 *                      buf, errors, proto (codecs), sink, transport (plain I/O
 *                      and the transport interface), tls_transport (TLS
 *                      sessions over OpenSSL), syncpool (fsync in worker
 *                      threads), dnsmsg, dkim (canonicalisation,
 *                      body hash, signatures), bodyscan (client bodies),
 *                      proc (spawn, privilege drop)
 *   loop.c             libev loop and coroutine task scheduler
 *   socket.c           TCP sockets and listeners as Lua userdata
 *   tls.c              OpenSSL contexts as Lua userdata, session info
 *   dns.c              c-ares resolver on the libev loop
 *   http.c             libcurl multi interface on the libev loop (HTTP client)
 *   redis.c            hiredis's async API on the libev loop (Redis client)
 *   opts.c             fields of the options tables the bindings take
 *   fs.c               durable file writes (fsync) for mail storage
 *   crypto.c           hashes, HMAC, PBKDF2, random, base64, crypt(3)
 *   gzip.c             gzip compression over zlib
 *   psl.c              the Public Suffix List over libpsl (DMARC)
 *   dkim_lua.c         Lua bindings of lib/dkim.c
 *   proto_lua.c        Lua bindings of lib/proto.c
 *   sink_lua.c         Lua binding of the body sink (lib/sink.c)
 *   error.c            ls_pusherror, core.errors (lib/errors.c: the tokens)
 *   sendbody.c         Lua binding of the client body scanner (lib/bodyscan.c)
 *   proc.c             worker processes for the supervisor (lib/proc.c: spawn
 *                      with inherited descriptors, privilege drop), exit status
 *   core.c             luaopen_luasmtp_core: ties the pieces together
 *
 * Rule: each binding owns its userdata (metatable name and struct are
 * private to its .c file). Another binding that takes such a value
 * asks the owner through a C function declared here (ls_tls_ctx_from_lua,
 * ls_checksink), which checks it and returns the library object inside
 * (SSL_CTX, ls_sink); it then works through src/lib. spec/layout_spec.lua
 * checks both rules.
 */
#ifndef LUASMTP_H
#define LUASMTP_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>

#include <ev.h>
#include <lua.h>
#include <lauxlib.h>

#include "buf.h"
#include "errors.h"
#include "sink.h"
#include "tls_transport.h"
#include "transport.h"

#define LS_VERSION "0.1.0"

/* ------------------------------------------------------------------ */
/* Live-object counters, read by tests through core.stats().           */
enum ls_counter {
    LS_COUNT_TASKS,
    LS_COUNT_SOCKETS,
    LS_COUNT_LISTENERS,
    LS_COUNT_TLS_CONTEXTS,
    LS_COUNT_TLS_SESSIONS,
    LS_COUNT_WATCHERS,
    LS_COUNT_DNS_QUERIES,
    LS_COUNT_HTTP_REQUESTS,
    LS_COUNT_REDIS_REQUESTS,
    LS_COUNT_MAX
};
extern long ls_live[LS_COUNT_MAX];

/* ------------------------------------------------------------------ */
/* error.c: I/O failures as `nil, token, detail`; the tokens and their
 * registry are in lib/errors.h. */
/* Push nil, token, detail (detail may be NULL: then nil, token). Returns 3. */
int ls_pusherror(lua_State *L, const char *token, const char *detail);
/* Run push(L) with p as its one light userdata argument, protected, then
 * release(p) whatever happened; raise push's error after the release.
 * Returns the number of values push left. For results built from a
 * request that must be freed even when building them fails. */
int ls_push_release(lua_State *L, lua_CFunction push, void *p, void (*release)(void *));
int ls_open_errors(lua_State *L); /* core.errors */

/* ------------------------------------------------------------------ */
/* loop.c: the event loop and the task scheduler.
 *
 * A task is a coroutine run by the scheduler. A C function that must wait
 * calls ls_wait(); inside a task it yields (and never returns: Lua calls
 * the continuation k when the task is woken); outside any task (the main
 * chunk) it runs the loop until the wait ends and returns the result.
 * Either way the wait result is then in ls_wait_result(L). */
typedef struct ls_loop ls_loop;
typedef struct ls_task ls_task;

enum ls_wake {
    LS_WAKE_NONE = 0,
    LS_WAKE_READY,   /* the fd is ready / the event happened */
    LS_WAKE_TIMEOUT, /* the deadline passed */
    LS_WAKE_CLOSED,  /* the object waited on was closed */
};

ls_loop *ls_getloop(lua_State *L);
struct ev_loop *ls_evloop(ls_loop *loop);
double ls_now(ls_loop *loop);

/* The task that is running now (the pseudo-task of the main chunk when
 * no task runs). Raises a Lua error with a clear message when waiting is
 * not possible here (C-call boundary, foreign coroutine, error handler). */
ls_task *ls_current(lua_State *L, ls_loop *loop);

/* One wait of one task: an object that wakes waiters (a socket's reader
 * and writer slots, a listener) keeps one per slot. A wake-up through it
 * reaches that wait only: once the task has moved on to another wait
 * (with its own deadline) the generation differs and the wake-up is
 * refused. */
typedef struct ls_waitref {
    ls_task *task; /* NULL: no wait registered */
    unsigned gen;
} ls_waitref;

/* Wait until fd (if >= 0) is ready for `events` (EV_READ/EV_WRITE), or
 * the task is woken by ls_wake()/ls_wake_ref(), or the deadline
 * (absolute, ls_now() time; < 0 for none) passes. `t` must be
 * ls_current(L, loop). The wait owns its timer: only its own deadline,
 * its own fd or a wake-up meant for it ends it. When slot is not NULL it
 * is set to this wait before the task yields; the caller clears it with
 * ls_waitref_clear() once the wait is over. */
int ls_wait(lua_State *L, ls_loop *loop, ls_task *t, int fd, int events,
            double deadline, ls_waitref *slot, lua_KContext ctx, lua_KFunction k);
/* Wait until the task is woken (through slot, by ls_wake_ref from some
 * library callback) or the deadline passes, then return k(L, LUA_OK,
 * ctx) -- in a task (k runs when the task is resumed) and in the main
 * chunk alike. Should the main chunk's wait raise (a deadlock),
 * abandon(ctx) is called before the error goes on, so nothing keeps
 * pointing at the main pseudo-task. */
int ls_wait_k(lua_State *L, ls_loop *loop, ls_task *t, double deadline, ls_waitref *slot,
              lua_KContext ctx, lua_KFunction k, void (*abandon)(lua_KContext ctx));
/* A descriptor that tasks may have waited on (a socket, a listener)
 * is being closed: call before close(), so no task's watcher takes the
 * number for the file it watched before. */
void ls_fd_closing(ls_loop *loop, int fd);
/* The result of the last wait of the task running on L. */
int ls_wait_result(lua_State *L);
/* Wake a waiting task (stale or repeated wakes are ignored). For waits
 * kept in a list that the wake-up unlinks (conditions, joiners, signal
 * waiters), or the task's own watchers. */
void ls_wake(ls_loop *loop, ls_task *t, int result);
/* Wake the wait recorded in ref, if that task still waits in it. */
void ls_wake_ref(ls_loop *loop, const ls_waitref *ref, int result);
static inline int ls_waitref_busy(const ls_waitref *ref) { return ref->task != NULL; }
static inline void ls_waitref_clear(ls_waitref *ref) { ref->task = NULL; }

/* Weak watchers: those of a library (c-ares, libcurl) that must not keep
 * the loop alive by themselves (the deadline timer of the waiting task
 * does). Not counted in ls_live[LS_COUNT_WATCHERS]. They do nothing once
 * the loop is gone (the Lua state is closing). A weak one-shot timer's
 * callback calls ls_weak_timer_fired() first. */
void ls_weak_io_start(ls_loop *loop, ev_io *w);
void ls_weak_io_stop(ls_loop *loop, ev_io *w);
void ls_weak_timer_start(ls_loop *loop, ev_timer *w, double after);
void ls_weak_timer_stop(ls_loop *loop, ev_timer *w);
void ls_weak_timer_fired(ls_loop *loop);

/* The number of a signal named at idx ("TERM" or "SIGTERM", ...);
 * catchable_only refuses KILL and "0" (a task cannot wait for them). */
int ls_checksignal(lua_State *L, int idx, int catchable_only);
/* The name of signal sig without "SIG", or NULL for one not in the list. */
const char *ls_signame(int sig);

/* Deferred flushing: sockets with pending output register here and are
 * flushed before the loop blocks (so writes made in one pass of the
 * scheduler leave in one syscall). */
typedef struct ls_flushable {
    struct ls_flushable *next, *prev;
    void (*flush)(struct ls_flushable *self);
    int queued;
} ls_flushable;
void ls_flush_queue(ls_loop *loop, ls_flushable *f);
void ls_flush_dequeue(ls_loop *loop, ls_flushable *f);

/* ------------------------------------------------------------------ */
/* tls.c: OpenSSL contexts as Lua values; the sessions made from them
 * (ls_tls_new, handshake, read, write, shutdown) are in
 * lib/tls_transport.h. */
/* The SSL_CTX of the tls_context at idx; raises unless it is an open
 * one. The context value keeps it: use it while that value is held
 * (a session made from it holds its own references).       [-0, +0, v] */
SSL_CTX *ls_tls_ctx_from_lua(lua_State *L, int idx);
/* DANE: check opts.dane at idx for the context at ctx_idx (raises on
 * bad arguments), then apply it to a new client session before its
 * handshake (LS_IO_OK or LS_IO_ERROR). */
void ls_tls_dane_check(lua_State *L, int idx, int ctx_idx);
int ls_tls_dane_apply(lua_State *L, int idx, SSL *ssl, ls_ioerr *err);
/* Push a table describing the session (version, cipher, peer cert...). */
int ls_tls_pushinfo(lua_State *L, SSL *ssl);
/* Push channel-binding data: type "tls-exporter" or "tls-unique". */
int ls_tls_pushbinding(lua_State *L, SSL *ssl, const char *type);
int ls_open_tls(lua_State *L); /* adds tls functions to the table on top */

/* ------------------------------------------------------------------ */
/* dns.c: c-ares. */
/* Resolve host (numeric or name) to a list of addresses: pushes a Lua
 * array of {family=, address=} tables, or nil, "dns", detail. Waits. */
int ls_open_dns(lua_State *L); /* adds dns functions to the table on top */

/* http.c: libcurl's multi interface: http_request{...} */
int ls_open_http(lua_State *L);

/* opts.c: fields of the options table at idx; each raises "who: name
 * must be ..." on a bad value, and returns def (NULL) when absent. A
 * string stays valid while the table holds it.              [-0, +0, v] */
const char *ls_opt_string(lua_State *L, int idx, const char *who, const char *name, size_t max);
double ls_opt_seconds(lua_State *L, int idx, const char *who, const char *name, double def,
                      double max);
lua_Integer ls_opt_integer(lua_State *L, int idx, const char *who, const char *name,
                           lua_Integer def, lua_Integer min, lua_Integer max);

/* redis.c: hiredis's async API: redis_connect{...} */
int ls_open_redis(lua_State *L);

/* gzip.c: gzip/gunzip over zlib */
int ls_open_gzip(lua_State *L);

/* psl.c: organizational domains from the Public Suffix List (libpsl) */
int ls_open_psl(lua_State *L);

/* crypto.c: hashes, HMAC, PBKDF2, random, base64, crypt(3) */
int ls_open_crypto(lua_State *L); /* adds crypto functions to the table on top */

/* proto.c + proto_lua.c: SMTP protocol codecs (no I/O) */
int ls_open_proto(lua_State *L); /* adds protocol functions to the table on top */

/* sink_lua.c: core.sink(), the body sink (src/lib/sink.c). The socket
 * layer writes bodies into the ls_sink of a sink value through the
 * library; it gets it here, never from the userdata itself. Raises
 * unless idx is an open sink.                               [-0, +0, v] */
ls_sink *ls_checksink(lua_State *L, int idx);
int ls_open_sink(lua_State *L);

/* dkim.c + dkim_lua.c: DKIM canonicalisation, body hash, keys */
int ls_open_dkim(lua_State *L); /* adds dkim functions to the table on top */

/* fs.c: durable file writes for mail storage */
int ls_open_fs(lua_State *L);
int ls_open_guard(lua_State *L);
/* loop.c, for guard.c: every wait of task t ends by cap (ev_now clock)
 * at the latest while capped; the previous setting goes to prev_*. */
void ls_task_cap(ls_task *t, int capped, double cap, int *prev_capped, double *prev_cap);

/* sendbody.c: body_scan (bodyscan.c) */
int ls_open_sendbody(lua_State *L);

/* proc.c: proc_spawn, proc_reap, proc_kill, proc_drop, proc_ids, proc_exe */
int ls_open_proc(lua_State *L);

/* loop.c */
int ls_open_loop(lua_State *L); /* adds loop/task functions to the table on top */

/* socket.c */
int ls_open_socket(lua_State *L); /* adds socket functions to the table on top */
/* Bytes allocated for the input and output buffers of all sockets. */
extern size_t ls_socket_buffer_bytes;

#endif
