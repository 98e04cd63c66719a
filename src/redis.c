/*
 * redis.c - a Redis client: hiredis's async API on the libev loop.
 *
 * One client is one connection to one Redis server, shared by every task
 * that uses the client: commands from many tasks are appended to the
 * same output buffer and leave together (pipelining); the replies come
 * back in order and hiredis hands each to the callback of its command.
 *
 * hiredis is attached to the loop through our own small adapter (the
 * ev.addRead/addWrite/... hooks of redisAsyncContext) rather than
 * hiredis's adapters/libev.h: its watchers are weak (loop.c), so an idle
 * connection does not keep the loop alive (the deadline timer of a
 * waiting task does), and they do nothing once the loop is gone.
 *
 * A command is a malloc'ed rd_req, the privdata of its hiredis callback.
 * hiredis calls that callback exactly once: with the reply, or with NULL
 * when the connection ends (error, timeout, close). The callback runs
 * inside a libev callback and never calls Lua: it copies the reply into
 * the request (a flat encoding, decoded later), marks it done and wakes
 * the waiting task through its ls_waitref, the same wait mechanism as
 * dns.c and http.c (a wake-up reaches that wait only). The task's
 * continuation turns the copy into Lua values and frees the request.
 *
 * Every command waits with a deadline (timeout). When it passes first,
 * the request is marked abandoned (the callback will free it) and the
 * connection is dropped: Redis answers in order, so every command behind
 * the stuck one would time out too, and their callbacks run at once with
 * the failure. A dropped or failed connection is made again after a
 * backoff (backoff_min doubling up to backoff_max); while there is no
 * connection, commands fail at once (nil, "closed", why). Connecting has
 * its own deadline (connect_timeout). AUTH and SELECT go first on every
 * new connection, before any command.
 *
 * Limits: a reply (all its elements together) is capped at max_reply
 * bytes, counted while hiredis builds it (wrapped reply functions) and
 * on the bytes buffered for a reply not yet complete; a reply for which
 * no command waits (a server that talks out of turn) fails the
 * connection; at most max_pending commands wait on one connection; a
 * command's arguments are capped at max_command bytes. The commands that
 * change the connection's protocol mode (SUBSCRIBE, MONITOR, ...) are
 * refused: this client is request/reply only.
 *
 * hiredis writes with write(2): a peer that has closed would raise
 * SIGPIPE, so SIGPIPE is blocked in this thread around hiredis's writes
 * and a SIGPIPE raised by them is consumed.
 *
 * Host names are not resolved here (hiredis would block in getaddrinfo):
 * host must be a numeric address; lua/luasmtp/redis.lua resolves names
 * with the loop's resolver first. hiredis 0.14 (Debian 12) has no TLS.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "luasmtp.h"

#define REDIS_MT "luasmtp.redis"
#define WHO "redis.connect" /* in messages about options */

#define DEFAULT_TIMEOUT 1.0
#define MAX_TIMEOUT 3600.0
#define DEFAULT_MAX_REPLY (8 * 1024 * 1024)
#define DEFAULT_MAX_COMMAND (8 * 1024 * 1024)
#define DEFAULT_MAX_PENDING 10000
#define DEFAULT_BACKOFF_MIN 0.1
#define DEFAULT_BACKOFF_MAX 5.0
#define MAX_ARGS 4096
#define MAX_HOST 255
#define MAX_PATH 107 /* sun_path */
#define MAX_SECRET 1024

typedef struct rd_client rd_client;

typedef struct rd_req {
    struct rd_req *next, *prev; /* the client's list of requests */
    rd_client *cl;
    ls_task *task;
    ls_waitref wait;
    int done;      /* the callback ran: reply or failure is set */
    int abandoned; /* nobody waits any more: the callback frees it */
    const char *err_token; /* failure (done, no reply) */
    char err[200];
    ls_buf reply;  /* the reply, encoded (see encode_reply) */
} rd_req;

struct rd_client {
    ls_loop *loop;
    redisAsyncContext *ac; /* NULL: no connection (backing off or closed) */
    int closed;
    int handshake_ok;      /* this connection answered AUTH/SELECT/PING */
    /* adapter */
    ev_io rio, wio;
    ev_timer connect_timer; /* weak: the connection attempt's deadline */
    ev_timer retry_timer;   /* weak: the next attempt after a backoff */
    double backoff;
    /* why the current or last connection failed; set once per connection */
    int fail_set;
    const char *fail_token;
    char fail[200];
    /* reply accounting (wrapped reply functions) */
    size_t reply_bytes;
    int over_limit, unexpected;
    long pending;          /* commands sent and not yet answered */
    rd_req *reqs;          /* every request not yet freed */
    /* options */
    char host[MAX_HOST + 1];
    int port;
    char path[MAX_PATH + 1];
    char *username, *password;
    lua_Integer db;
    double timeout, connect_timeout, backoff_min, backoff_max;
    size_t max_reply, max_command;
    long max_pending;
};

static char handshake_tag; /* privdata of the AUTH/SELECT commands */

/* ------------------------------------------------------------------ */
/* Reply functions: hiredis's defaults, with the size cap and the
 * out-of-turn check around them. */

static pthread_once_t fns_once = PTHREAD_ONCE_INIT;
static redisReplyObjectFunctions base_fns, capped_fns;
static int fns_ok;

/* Count n bytes against the reply being built; 0 to refuse (hiredis
 * then fails the connection with an out-of-memory error, which we
 * report as what it was). */
static int account(const redisReadTask *task, size_t n)
{
    rd_client *cl = task->privdata;
    if (cl == NULL)
        return 1;
    if (task->parent == NULL) {
        /* A new top-level reply: some command must be waiting for it. */
        if (cl->ac == NULL || cl->ac->replies.head == NULL) {
            cl->unexpected = 1;
            return 0;
        }
        cl->reply_bytes = 0;
    }
    cl->reply_bytes += n;
    if (cl->reply_bytes > cl->max_reply) {
        cl->over_limit = 1;
        return 0;
    }
    return 1;
}

static void *capped_string(const redisReadTask *task, char *s, size_t len)
{
    if (!account(task, len + sizeof(redisReply)))
        return NULL;
    return base_fns.createString(task, s, len);
}

static void *capped_array(const redisReadTask *task, int elements)
{
    size_t n = elements > 0 ? (size_t)elements : 0;
    if (!account(task, sizeof(redisReply) + n * sizeof(redisReply *)))
        return NULL;
    return base_fns.createArray(task, elements);
}

static void *capped_integer(const redisReadTask *task, long long value)
{
    if (!account(task, sizeof(redisReply)))
        return NULL;
    return base_fns.createInteger(task, value);
}

static void *capped_nil(const redisReadTask *task)
{
    if (!account(task, sizeof(redisReply)))
        return NULL;
    return base_fns.createNil(task);
}

static void fns_init(void)
{
    redisReader *r = redisReaderCreate();
    if (r == NULL || r->fn == NULL)
        return;
    base_fns = *r->fn;
    redisReaderFree(r);
    capped_fns = base_fns;
    capped_fns.createString = capped_string;
    capped_fns.createArray = capped_array;
    capped_fns.createInteger = capped_integer;
    capped_fns.createNil = capped_nil;
    fns_ok = base_fns.createString && base_fns.createArray && base_fns.createInteger &&
             base_fns.createNil && base_fns.freeObject;
}

/* ------------------------------------------------------------------ */
/* Reply copies: a flat encoding made in the callback (no Lua there),
 * decoded in the task. Tag byte, then: string/status/error: size_t
 * length and bytes; integer: long long; array: size_t count and the
 * elements; nil: nothing. hiredis nests at most 7 levels deep. */

static int encode_reply(ls_buf *b, const redisReply *r)
{
    char tag = (char)r->type;
    if (ls_buf_append(b, &tag, 1) < 0)
        return -1;
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR: {
        size_t len = r->len;
        if (ls_buf_append(b, (const char *)&len, sizeof len) < 0 ||
            ls_buf_append(b, r->str != NULL ? r->str : "", len) < 0)
            return -1;
        return 0;
    }
    case REDIS_REPLY_INTEGER: {
        long long v = r->integer;
        return ls_buf_append(b, (const char *)&v, sizeof v);
    }
    case REDIS_REPLY_ARRAY: {
        size_t n = r->elements;
        if (ls_buf_append(b, (const char *)&n, sizeof n) < 0)
            return -1;
        for (size_t i = 0; i < n; i++)
            if (encode_reply(b, r->element[i]) < 0)
                return -1;
        return 0;
    }
    default: /* REDIS_REPLY_NIL */
        return 0;
    }
}

/* Push the value encoded at *p; inside an array a nil becomes false and
 * an error reply {err = text} (an array keeps its length in field n).
 * Protected: may raise ENOMEM. */
static void decode_reply(lua_State *L, const char **p, int depth)
{
    luaL_checkstack(L, 4, "redis reply");
    char tag = **p;
    (*p)++;
    switch (tag) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR: {
        size_t len;
        memcpy(&len, *p, sizeof len);
        *p += sizeof len;
        lua_pushlstring(L, *p, len);
        *p += len;
        return;
    }
    case REDIS_REPLY_INTEGER: {
        long long v;
        memcpy(&v, *p, sizeof v);
        *p += sizeof v;
        lua_pushinteger(L, (lua_Integer)v);
        return;
    }
    case REDIS_REPLY_ARRAY: {
        size_t n;
        memcpy(&n, *p, sizeof n);
        *p += sizeof n;
        lua_createtable(L, n < 1024 ? (int)n : 1024, 1);
        for (size_t i = 0; i < n; i++) {
            if (**p == REDIS_REPLY_ERROR) {
                lua_createtable(L, 0, 1);
                decode_reply(L, p, depth + 1);
                lua_setfield(L, -2, "err");
            } else {
                decode_reply(L, p, depth + 1);
            }
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                lua_pushboolean(L, 0);
            }
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        lua_pushinteger(L, (lua_Integer)n);
        lua_setfield(L, -2, "n");
        return;
    }
    default:
        lua_pushnil(L);
        return;
    }
}

/* ------------------------------------------------------------------ */
/* Requests */

static void req_unlink(rd_req *req)
{
    rd_client *cl = req->cl;
    if (cl == NULL)
        return;
    if (req->prev != NULL)
        req->prev->next = req->next;
    else
        cl->reqs = req->next;
    if (req->next != NULL)
        req->next->prev = req->prev;
    req->next = req->prev = NULL;
    req->cl = NULL;
}

static void req_free(rd_req *req)
{
    req_unlink(req);
    ls_buf_free(&req->reply);
    ls_live[LS_COUNT_REDIS_REQUESTS]--;
    free(req);
}

static void req_release(void *p) { req_free(p); }

/* ------------------------------------------------------------------ */
/* Connection state */

static void schedule_retry(rd_client *cl);
static void start_connect(rd_client *cl);

/* Record why this connection fails (the first reason wins). */
static void set_fail(rd_client *cl, const char *token, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_fail(rd_client *cl, const char *token, const char *fmt, ...)
{
    if (cl->fail_set)
        return;
    cl->fail_set = 1;
    cl->fail_token = token;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cl->fail, sizeof cl->fail, fmt, ap);
    va_end(ap);
}

/* The failure hiredis reports for a connection it ends itself. */
static void fail_from_context(rd_client *cl, const redisAsyncContext *ac)
{
    if (cl->fail_set)
        return;
    if (cl->over_limit) {
        set_fail(cl, LS_ELIMIT, "redis reply larger than max_reply (%zu bytes)", cl->max_reply);
        return;
    }
    if (cl->unexpected) {
        set_fail(cl, LS_EPROTOCOL, "redis server sent a reply no command asked for");
        return;
    }
    const char *token = LS_EIO;
    switch (ac->c.err) {
    case REDIS_ERR_EOF:
        token = LS_ECLOSED;
        break;
    case REDIS_ERR_PROTOCOL:
    case REDIS_ERR_OTHER:
        token = LS_EPROTOCOL;
        break;
    case REDIS_ERR_IO:
        token = errno != 0 ? ls_errno_token(errno) : LS_EIO;
        break;
    default:
        break;
    }
    set_fail(cl, token, "redis: %s", ac->c.errstr[0] ? ac->c.errstr : "connection lost");
}

/* Drop the connection now (not from inside a hiredis callback): every
 * waiting command's callback runs with NULL. */
static void drop(rd_client *cl, const char *token, const char *why)
{
    if (cl->ac == NULL)
        return;
    set_fail(cl, token, "%s", why);
    redisAsyncFree(cl->ac); /* hook_cleanup clears cl->ac */
}

/* ------------------------------------------------------------------ */
/* The adapter: hiredis's event hooks on weak libev watchers. */

static void io_read_cb(struct ev_loop *ev, ev_io *w, int revents)
{
    (void)ev;
    (void)revents;
    rd_client *cl = (rd_client *)((char *)w - offsetof(rd_client, rio));
    if (cl->ac == NULL)
        return;
    redisAsyncHandleRead(cl->ac);
    /* A reply not complete yet sits in the reader's buffer. */
    if (cl->ac != NULL && cl->ac->c.reader != NULL) {
        const redisReader *r = cl->ac->c.reader;
        if (r->len > r->pos && r->len - r->pos > cl->max_reply + 64) {
            cl->over_limit = 1;
            fail_from_context(cl, cl->ac);
            drop(cl, LS_ELIMIT, "redis reply larger than max_reply");
        }
    }
}

static void io_write_cb(struct ev_loop *ev, ev_io *w, int revents)
{
    (void)ev;
    (void)revents;
    rd_client *cl = (rd_client *)((char *)w - offsetof(rd_client, wio));
    if (cl->ac == NULL)
        return;
    sigset_t pipe_set, old, pending;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    sigemptyset(&pending);
    sigpending(&pending);
    int was_pending = sigismember(&pending, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    redisAsyncHandleWrite(cl->ac);
    if (!was_pending) {
        sigemptyset(&pending);
        if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE)) {
            struct timespec zero = {0, 0};
            while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
            }
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void hook_add_read(void *data)
{
    rd_client *cl = data;
    ls_weak_io_start(cl->loop, &cl->rio);
}

static void hook_del_read(void *data)
{
    rd_client *cl = data;
    ls_weak_io_stop(cl->loop, &cl->rio);
}

static void hook_add_write(void *data)
{
    rd_client *cl = data;
    ls_weak_io_start(cl->loop, &cl->wio);
}

static void hook_del_write(void *data)
{
    rd_client *cl = data;
    ls_weak_io_stop(cl->loop, &cl->wio);
}

/* The connection is gone (hiredis frees it after this returns). */
static void hook_cleanup(void *data)
{
    rd_client *cl = data;
    if (cl->ac != NULL) /* why, when no command was waiting to hear it */
        fail_from_context(cl, cl->ac);
    ls_weak_io_stop(cl->loop, &cl->rio);
    ls_weak_io_stop(cl->loop, &cl->wio);
    ls_weak_timer_stop(cl->loop, &cl->connect_timer);
    cl->ac = NULL;
    cl->pending = 0;
    if (!cl->closed)
        schedule_retry(cl);
}

static void attach(rd_client *cl, redisAsyncContext *ac)
{
    ac->ev.data = cl;
    ac->ev.addRead = hook_add_read;
    ac->ev.delRead = hook_del_read;
    ac->ev.addWrite = hook_add_write;
    ac->ev.delWrite = hook_del_write;
    ac->ev.cleanup = hook_cleanup;
    ev_io_set(&cl->rio, ac->c.fd, EV_READ);
    ev_io_set(&cl->wio, ac->c.fd, EV_WRITE);
}

/* ------------------------------------------------------------------ */
/* Callbacks (inside libev callbacks: no Lua) */

static void reply_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    rd_client *cl = ac->ev.data;
    const redisReply *reply = r;
    if (cl != NULL && cl->pending > 0)
        cl->pending--;
    if (privdata == &handshake_tag) {
        if (cl == NULL || reply == NULL)
            return;
        if (reply->type == REDIS_REPLY_ERROR) {
            set_fail(cl, LS_EPROTOCOL, "redis refused the connection set-up: %.*s",
                     (int)(reply->len < 150 ? reply->len : 150), reply->str);
            redisAsyncFree(ac); /* deferred by hiredis until we return */
        } else {
            cl->handshake_ok = 1;
            cl->backoff = 0;
        }
        return;
    }
    rd_req *req = privdata;
    if (req->abandoned) {
        req_free(req);
        return;
    }
    req->done = 1;
    if (reply == NULL) {
        if (cl != NULL)
            fail_from_context(cl, ac);
        req->err_token = cl != NULL && cl->fail_set ? cl->fail_token : LS_ECLOSED;
        snprintf(req->err, sizeof req->err, "%s",
                 cl != NULL && cl->fail_set ? cl->fail : "redis connection closed");
    } else if (encode_reply(&req->reply, reply) < 0) {
        ls_buf_free(&req->reply);
        req->err_token = LS_EIO;
        snprintf(req->err, sizeof req->err, "out of memory");
    }
    if (req->task != NULL && cl != NULL)
        ls_wake_ref(cl->loop, &req->wait, LS_WAKE_READY);
}

static void connect_cb(const redisAsyncContext *ac, int status)
{
    rd_client *cl = ac->ev.data;
    if (cl == NULL)
        return;
    if (status == REDIS_OK) {
        ls_weak_timer_stop(cl->loop, &cl->connect_timer);
    } else {
        set_fail(cl, ac->c.err == REDIS_ERR_IO && errno != 0 ? ls_errno_token(errno) : LS_EIO,
                 "redis: cannot connect: %s", ac->c.errstr);
    }
}

static void connect_timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)ev;
    (void)revents;
    rd_client *cl = (rd_client *)((char *)w - offsetof(rd_client, connect_timer));
    ls_weak_timer_fired(cl->loop);
    if (cl->ac != NULL && !(cl->ac->c.flags & REDIS_CONNECTED))
        drop(cl, LS_ETIMEOUT, "redis: connect timed out");
}

static void retry_timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)ev;
    (void)revents;
    rd_client *cl = (rd_client *)((char *)w - offsetof(rd_client, retry_timer));
    ls_weak_timer_fired(cl->loop);
    if (!cl->closed && cl->ac == NULL)
        start_connect(cl);
}

static void schedule_retry(rd_client *cl)
{
    cl->backoff = cl->backoff <= 0 ? cl->backoff_min : cl->backoff * 2;
    if (cl->backoff > cl->backoff_max)
        cl->backoff = cl->backoff_max;
    ls_weak_timer_start(cl->loop, &cl->retry_timer, cl->backoff);
}

/* Queue a set-up command (AUTH, SELECT) ahead of every other. */
static int handshake_cmd(rd_client *cl, int argc, const char **argv)
{
    size_t lens[3];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    if (redisAsyncCommandArgv(cl->ac, reply_cb, &handshake_tag, argc, argv, lens) != REDIS_OK)
        return -1;
    cl->pending++;
    return 0;
}

/* Start a connection attempt. Never blocks: host is numeric. */
static void start_connect(rd_client *cl)
{
    if (cl->closed || cl->ac != NULL || !fns_ok)
        return;
    cl->fail_set = 0;
    cl->over_limit = cl->unexpected = 0;
    cl->handshake_ok = 0;
    cl->pending = 0;
    errno = 0;
    redisAsyncContext *ac = cl->path[0] ? redisAsyncConnectUnix(cl->path)
                                        : redisAsyncConnect(cl->host, cl->port);
    if (ac == NULL) {
        set_fail(cl, LS_EIO, "redis: out of memory");
        schedule_retry(cl);
        return;
    }
    if (ac->err) {
        set_fail(cl, ac->c.err == REDIS_ERR_IO && errno != 0 ? ls_errno_token(errno) : LS_EIO,
                 "redis: cannot connect: %s", ac->errstr);
        redisAsyncFree(ac); /* not attached: no cleanup hook runs */
        schedule_retry(cl);
        return;
    }
    cl->ac = ac;
    ac->c.reader->fn = &capped_fns;
    ac->c.reader->privdata = cl;
    attach(cl, ac);
    redisAsyncSetConnectCallback(ac, connect_cb);
    ls_weak_timer_start(cl->loop, &cl->connect_timer, cl->connect_timeout);
    int rc = 0;
    if (cl->password != NULL) {
        const char *argv[3] = {"AUTH", cl->username ? cl->username : cl->password, cl->password};
        rc = handshake_cmd(cl, cl->username ? 3 : 2, argv);
    }
    if (rc == 0 && cl->db != 0) {
        char db[32];
        snprintf(db, sizeof db, "%lld", (long long)cl->db);
        const char *argv[2] = {"SELECT", db};
        rc = handshake_cmd(cl, 2, argv);
    }
    if (rc == 0 && cl->password == NULL && cl->db == 0) {
        const char *argv[1] = {"PING"};
        rc = handshake_cmd(cl, 1, argv);
    }
    if (rc != 0)
        drop(cl, LS_EIO, "redis: cannot queue the connection set-up");
}

/* ------------------------------------------------------------------ */
/* Client object */

static rd_client *check_client(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, REDIS_MT);
}

/* Close the connection and stop every timer. Idempotent; never calls
 * Lua. With gc set (the value is being collected, or the Lua state
 * closes) every request left is freed: no task will resume for it. */
static void client_destroy(rd_client *cl, int gc)
{
    if (gc) /* wake nobody: the loop may be gone already */
        for (rd_req *req = cl->reqs; req != NULL; req = req->next)
            req->task = NULL;
    if (!cl->closed) {
        cl->closed = 1;
        ls_weak_timer_stop(cl->loop, &cl->retry_timer);
        ls_weak_timer_stop(cl->loop, &cl->connect_timer);
        drop(cl, LS_ECLOSED, "redis client closed");
    }
    if (gc)
        while (cl->reqs != NULL)
            req_free(cl->reqs);
    free(cl->username);
    free(cl->password);
    cl->username = cl->password = NULL;
}

/* r:close() : fail the waiting commands with "closed", drop the
 * connection, stop reconnecting. */
static int l_close(lua_State *L)
{
    client_destroy(check_client(L, 1), 0);
    return 0;
}

static int l_gc(lua_State *L)
{
    client_destroy(check_client(L, 1), 1);
    return 0;
}

/* r:status() -> {connected =, pending =, error =, backoff =} */
static int l_status(lua_State *L)
{
    rd_client *cl = check_client(L, 1);
    lua_createtable(L, 0, 4);
    lua_pushboolean(L, cl->ac != NULL && (cl->ac->c.flags & REDIS_CONNECTED) && cl->handshake_ok);
    lua_setfield(L, -2, "connected");
    lua_pushinteger(L, cl->pending);
    lua_setfield(L, -2, "pending");
    lua_pushboolean(L, cl->closed);
    lua_setfield(L, -2, "closed");
    if (cl->fail_set) {
        lua_pushstring(L, cl->fail);
        lua_setfield(L, -2, "error");
    }
    return 1;
}

/* Protected: push the reply of a finished request (arg 1). */
static int push_result(lua_State *L)
{
    const rd_req *req = lua_touserdata(L, 1);
    if (req->err_token != NULL)
        return ls_pusherror(L, req->err_token, req->err);
    const char *p = ls_buf_head(&req->reply);
    if (*p == REDIS_REPLY_ERROR) {
        lua_pushnil(L);
        decode_reply(L, &p, 0);
        return 2;
    }
    decode_reply(L, &p, 0);
    return 1;
}

static int command_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    rd_req *req = (rd_req *)ctx;
    if (req->done) { /* an answer wins over a deadline that came with it */
        return ls_push_release(L, push_result, req, req_release);
    }
    /* The deadline passed (or a guard's cap): the command is still in
     * hiredis's queue. Let its callback free it, and drop the
     * connection: every reply behind it would be as late. */
    rd_client *cl = req->cl;
    char why[96];
    snprintf(why, sizeof why, "redis command timed out after %g s", cl != NULL ? cl->timeout : 0.);
    req->abandoned = 1;
    req->task = NULL;
    if (cl != NULL)
        drop(cl, LS_ETIMEOUT, why); /* may free req */
    return ls_pusherror(L, LS_ETIMEOUT, why);
}

static void command_abandon(lua_KContext ctx)
{
    rd_req *req = (rd_req *)ctx;
    if (req->done) {
        req_free(req);
        return;
    }
    req->abandoned = 1;
    req->task = NULL;
}

/* The commands that put a connection into another protocol mode. */
static int refused_command(const char *name, size_t len)
{
    static const char *const modes[] = {
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
        "SUNSUBSCRIBE", "MONITOR", "SYNC", "PSYNC", "HELLO", "RESET", "QUIT",
        "CLIENT", NULL,
    };
    for (int i = 0; modes[i] != NULL; i++)
        if (strlen(modes[i]) == len && strncasecmp(modes[i], name, len) == 0)
            return 1;
    return 0;
}

/* r:command(name, arg...) -> reply | nil, text | nil, token, detail
 * [-n, +1..3, e]  Waits (yields the task; in the main chunk runs the loop).
 * Arguments are strings or numbers. The reply as Lua values: a status
 * (+OK) and a bulk string as strings, an integer as an integer, an array
 * as a table (nil elements as false, the length in field n), a nil reply
 * as nil. A Redis error reply gives nil and its text ("ERR ...",
 * "WRONGTYPE ..."); a failure gives nil, token (core.errors), detail.
 *   local v, err = r:command("GET", "greylist:1.2.3.4") */
static int l_command(lua_State *L)
{
    rd_client *cl = check_client(L, 1);
    int argc = lua_gettop(L) - 1;
    luaL_argcheck(L, argc >= 1, 2, "command name expected");
    luaL_argcheck(L, argc <= MAX_ARGS, MAX_ARGS + 1, "too many arguments");
    size_t total = 0;
    for (int i = 2; i <= argc + 1; i++) {
        int t = lua_type(L, i);
        if (t == LUA_TNUMBER) {
            /* Numbers as Redis reads them: integral floats as integers
             * (INCRBY refuses "1.0"), others with every digit. */
            lua_Number n = lua_tonumber(L, i);
            if (lua_isinteger(L, i))
                lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, i));
            else if (n >= -9.0e15 && n <= 9.0e15 && n == floor(n))
                lua_pushfstring(L, "%I", (LUAI_UACINT)(lua_Integer)n);
            else {
                char num[64];
                snprintf(num, sizeof num, "%.17g", (double)n);
                lua_pushstring(L, num);
            }
            lua_replace(L, i);
        } else if (t != LUA_TSTRING) {
            luaL_argerror(L, i, "string or number expected");
        }
        size_t len;
        lua_tolstring(L, i, &len);
        total += len;
    }
    size_t nlen;
    const char *name = lua_tolstring(L, 2, &nlen);
    if (refused_command(name, nlen))
        return luaL_argerror(L, 2, "this command changes the connection's mode and is not "
                                   "supported by luasmtp.redis");
    ls_loop *loop = cl->loop;
    ls_task *t = ls_current(L, loop); /* raises where waiting is impossible */
    if (cl->closed)
        return ls_pusherror(L, LS_ECLOSED, "redis client is closed");
    if (cl->ac == NULL)
        return ls_pusherror(L, cl->fail_set ? cl->fail_token : LS_ECLOSED,
                            cl->fail_set ? cl->fail : "redis: not connected");
    if (total > cl->max_command)
        return ls_pusherror(L, LS_ELIMIT, "redis command larger than max_command");
    if (cl->pending >= cl->max_pending)
        return ls_pusherror(L, LS_ELIMIT, "too many redis commands waiting (max_pending)");
    const char *argv_small[8];
    size_t lens_small[8];
    const char **argv = argv_small;
    size_t *lens = lens_small;
    if (argc > 8) {
        argv = malloc((size_t)argc * sizeof *argv);
        lens = malloc((size_t)argc * sizeof *lens);
        if (argv == NULL || lens == NULL) {
            free(argv);
            free(lens);
            return ls_pusherror(L, LS_EIO, "out of memory");
        }
    }
    for (int i = 0; i < argc; i++)
        argv[i] = lua_tolstring(L, i + 2, &lens[i]);
    rd_req *req = calloc(1, sizeof *req);
    int rc = REDIS_ERR;
    if (req != NULL) {
        ls_buf_init(&req->reply);
        rc = redisAsyncCommandArgv(cl->ac, reply_cb, req, argc, argv, lens);
    }
    if (argv != argv_small) {
        free(argv);
        free(lens);
    }
    if (req == NULL)
        return ls_pusherror(L, LS_EIO, "out of memory");
    if (rc != REDIS_OK) {
        free(req);
        return ls_pusherror(L, LS_ECLOSED, "redis connection is closing");
    }
    ls_live[LS_COUNT_REDIS_REQUESTS]++;
    cl->pending++;
    req->cl = cl;
    req->next = cl->reqs;
    if (cl->reqs != NULL)
        cl->reqs->prev = req;
    cl->reqs = req;
    req->task = t;
    double deadline = ls_now(loop) + cl->timeout;
    return ls_wait_k(L, loop, t, deadline, &req->wait, (lua_KContext)req, command_k,
                     command_abandon);
}

/* ------------------------------------------------------------------ */
/* Options */




static char *dup_secret(lua_State *L, const char *s)
{
    if (s == NULL)
        return NULL;
    char *d = strdup(s);
    if (d == NULL)
        luaL_error(L, "redis.connect: out of memory");
    return d;
}

/* redis_connect{ host =, port =, path =, username =, password =, db =, timeout =,
 *                connect_timeout =, backoff_min =, backoff_max =, max_reply =,
 *                max_command =, max_pending = } -> client
 * [-1, +1, e]  Does not wait: the connection is made in the background
 * (and made again after a failure); commands sent before it is up wait
 * for it, commands sent while it is down fail at once.
 *   host            numeric IPv4/IPv6 address (default 127.0.0.1)
 *   port            6379
 *   path            a UNIX socket instead of host/port
 *   username, password   AUTH (username needs Redis 6 ACLs)
 *   db              SELECT db (0)
 *   timeout         per command, seconds (1)
 *   connect_timeout seconds (timeout)
 *   backoff_min, backoff_max   reconnect delays, seconds (0.1, 5)
 *   max_reply, max_command     bytes (8 MiB each)
 *   max_pending     commands waiting on the connection (10000) */
static int l_redis_connect(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    if (lua_getfield(L, 1, "tls") != LUA_TNIL && lua_toboolean(L, -1))
        luaL_error(L, "redis.connect: tls is not supported (hiredis 0.14 has no TLS): use a "
                      "UNIX socket or loopback, or a TLS tunnel");
    lua_pop(L, 1);
    const char *host = ls_opt_string(L, 1, WHO, "host", MAX_HOST);
    const char *path = ls_opt_string(L, 1, WHO, "path", MAX_PATH);
    const char *username = ls_opt_string(L, 1, WHO, "username", MAX_SECRET);
    const char *password = ls_opt_string(L, 1, WHO, "password", MAX_SECRET);
    if (username != NULL && password == NULL)
        luaL_error(L, "redis.connect: username needs a password");
    if (host != NULL && path != NULL)
        luaL_error(L, "redis.connect: give host/port or path, not both");
    if (host != NULL) {
        unsigned char a[16];
        if (inet_pton(AF_INET, host, a) != 1 && inet_pton(AF_INET6, host, a) != 1)
            luaL_error(L, "redis.connect: host must be a numeric address here (%s)", host);
    }
    lua_Integer port = ls_opt_integer(L, 1, WHO, "port", 6379, 1, 65535);
    lua_Integer db = ls_opt_integer(L, 1, WHO, "db", 0, 0, 1 << 20);
#define SECONDS(name, def) ls_opt_seconds(L, 1, WHO, name, def, MAX_TIMEOUT)
#define BYTES(name, def) ls_opt_integer(L, 1, WHO, name, def, 64, (lua_Integer)1 << 32)
    double timeout = SECONDS("timeout", DEFAULT_TIMEOUT);
    double connect_timeout = SECONDS("connect_timeout", timeout);
    double backoff_min = SECONDS("backoff_min", DEFAULT_BACKOFF_MIN);
    double backoff_max = SECONDS("backoff_max", DEFAULT_BACKOFF_MAX);
    if (backoff_max < backoff_min)
        backoff_max = backoff_min;
    lua_Integer max_reply = BYTES("max_reply", DEFAULT_MAX_REPLY);
    lua_Integer max_command = BYTES("max_command", DEFAULT_MAX_COMMAND);
    lua_Integer max_pending = ls_opt_integer(L, 1, WHO, "max_pending", DEFAULT_MAX_PENDING, 1,
                                             1 << 24);
#undef SECONDS
#undef BYTES

    ls_loop *loop = ls_getloop(L);
    pthread_once(&fns_once, fns_init);
    if (!fns_ok)
        luaL_error(L, "redis.connect: hiredis could not be initialised");

    rd_client *cl = lua_newuserdatauv(L, sizeof *cl, 0);
    memset(cl, 0, sizeof *cl);
    cl->closed = 1; /* until set up: __gc does nothing */
    luaL_setmetatable(L, REDIS_MT);
    cl->loop = loop;
    ev_init(&cl->rio, io_read_cb);
    ev_init(&cl->wio, io_write_cb);
    ev_init(&cl->connect_timer, connect_timer_cb);
    ev_init(&cl->retry_timer, retry_timer_cb);
    snprintf(cl->host, sizeof cl->host, "%s", host != NULL ? host : "127.0.0.1");
    if (path != NULL)
        snprintf(cl->path, sizeof cl->path, "%s", path);
    cl->port = (int)port;
    cl->db = db;
    cl->timeout = timeout;
    cl->connect_timeout = connect_timeout;
    cl->backoff_min = backoff_min;
    cl->backoff_max = backoff_max;
    cl->max_reply = (size_t)max_reply;
    cl->max_command = (size_t)max_command;
    cl->max_pending = (long)max_pending;
    cl->username = dup_secret(L, username);
    cl->password = dup_secret(L, password);
    cl->closed = 0;
    start_connect(cl);
    return 1;
}

int ls_open_redis(lua_State *L)
{
    if (luaL_newmetatable(L, REDIS_MT)) {
        static const luaL_Reg methods[] = {
            {"command", l_command},
            {"close", l_close},
            {"status", l_status},
            {NULL, NULL},
        };
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_close);
        lua_setfield(L, -2, "__close");
        lua_pushliteral(L, "luasmtp.redis");
        lua_setfield(L, -2, "__name");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_redis_connect);
    lua_setfield(L, -2, "redis_connect");
    return 0;
}
