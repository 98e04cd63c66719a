/*
 * socket.c - TCP and UNIX-domain sockets and listeners as Lua userdata.
 *
 * Calls look synchronous: a call that cannot complete at once waits
 * through ls_wait() (the task yields; the main chunk runs the loop).
 * A socket has one reader slot and one writer slot, so a reading task
 * and a writing task never wait on each other.
 *
 * Input is read into a capped buffer; every receive form has a limit.
 * Output is appended to a buffer and flushed before the loop blocks, so
 * replies produced in one scheduler pass leave in one syscall; past the
 * send-buffer limit send() waits for the peer (backpressure).
 *
 * The transport is plain (recv/send) or TLS (tls.c): only fill() and
 * write_some() know the difference. Message bodies go from the input
 * buffer through the DATA decoder (lib/proto.c) into a body sink
 * (lib/sink.c), both called as library code.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pwd.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "luasmtp.h"
#include "proto.h"

#define SOCKET_MT "luasmtp.socket"
#define LISTENER_MT "luasmtp.listener"

#define DEFAULT_TIMEOUT 60.0
#define DEFAULT_MAXLINE 8192
#define DEFAULT_SNDLIMIT (256 * 1024)
/* One TLS record at most: without read-ahead, a TLS read of this size
 * leaves no decrypted data behind in OpenSSL, so waiting for the fd to be
 * readable is always right. */
#define READ_CHUNK 16384

enum read_op { OP_LINE, OP_EXACT, OP_UNTIL, OP_ANY };

typedef struct ls_socket {
    int fd;
    ls_loop *loop;
    ls_buf rbuf, wbuf;
    SSL *ssl;
    ls_waitref reader, writer;  /* the waits of the tasks using this socket */
    int handshaking;            /* a starttls wait: no other reader or writer meanwhile */
    double t_connect, t_read, t_write;
    double rdeadline, wdeadline;
    size_t maxline, sndlimit;
    int eof;                    /* the peer closed its side */
    int skipline;               /* discard input up to the next CRLF */
    int waitreply;              /* option: a read after queued output waits first */
    const char *rerr, *werr;    /* sticky error tokens */
    char *rerr_detail, *werr_detail; /* their details (malloc'd; NULL: none) */
    struct smtp_data_decoder dec; /* receivebody: one at a time (the reader slot) */
    double body_deadline;       /* receivebody: the whole body's, kept across steps */
    ev_io wio;                  /* background flush when no task writes */
    int wio_counted;
    ls_flushable fl;
} ls_socket;

size_t ls_socket_buffer_bytes;

#define UNIX_PATH_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

typedef struct ls_listener {
    int fd;
    ls_loop *loop;
    ls_waitref acceptor;
    /* UNIX-domain listener: the socket file it made, removed at close
     * when it is still that file (same device and inode) */
    int unix_path;
    dev_t dev;
    ino_t ino;
    char path[UNIX_PATH_MAX + 1];
} ls_listener;

/* ------------------------------------------------------------------ */
/* Helpers */

static ls_socket *check_socket(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, SOCKET_MT);
}

static ls_listener *check_listener(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, LISTENER_MT);
}

/* Parse a numeric address (IPv4, IPv6, optionally in [brackets]). */
static int parse_addr(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    char buf[INET6_ADDRSTRLEN + 2];
    size_t n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        if (n - 2 >= sizeof buf)
            return -1;
        memcpy(buf, host + 1, n - 2);
        buf[n - 2] = '\0';
        host = buf;
    }
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
        return 0;
    }
    return -1;
}

/* A UNIX-domain address for path: 0, or -1 when the path is empty or
 * does not fit in sun_path. */
static int unix_addr(const char *path, size_t n, struct sockaddr_un *sun, socklen_t *len)
{
    if (n == 0 || n > UNIX_PATH_MAX || memchr(path, '\0', n) != NULL)
        return -1;
    memset(sun, 0, sizeof *sun);
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, path, n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 0;
}

/* Push address, port of a sockaddr of len bytes; returns 2. A UNIX-domain
 * address is "unix:PATH" ("unix:" for an unnamed peer, "unix:@NAME" in
 * the abstract namespace) with a nil port. */
static int push_sockaddr(lua_State *L, const struct sockaddr_storage *ss, socklen_t len)
{
    char buf[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in4->sin_addr, buf, sizeof buf);
        lua_pushstring(L, buf);
        lua_pushinteger(L, ntohs(in4->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof buf);
        lua_pushstring(L, buf);
        lua_pushinteger(L, ntohs(in6->sin6_port));
    } else if (ss->ss_family == AF_UNIX) {
        const struct sockaddr_un *sun = (const struct sockaddr_un *)ss;
        size_t off = offsetof(struct sockaddr_un, sun_path);
        size_t n = len > off ? (size_t)len - off : 0;
        if (n > sizeof sun->sun_path)
            n = sizeof sun->sun_path;
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        luaL_addstring(&b, "unix:");
        if (n > 0 && sun->sun_path[0] == '\0') {
            luaL_addchar(&b, '@');
            luaL_addlstring(&b, sun->sun_path + 1, n - 1);
        } else {
            luaL_addlstring(&b, sun->sun_path, strnlen(sun->sun_path, n));
        }
        luaL_pushresult(&b);
        lua_pushnil(L);
    } else {
        lua_pushstring(L, "unknown");
        lua_pushnil(L);
    }
    return 2;
}

static double opt_timeout(lua_State *L, int idx, double dflt)
{
    if (lua_isnoneornil(L, idx))
        return dflt;
    double t = luaL_checknumber(L, idx);
    luaL_argcheck(L, t >= 0, idx, "negative timeout");
    return t;
}

static double deadline_of(ls_loop *loop, double timeout)
{
    return ls_now(loop) + timeout;
}

/* ------------------------------------------------------------------ */
/* Transport: read into rbuf, write from wbuf. */

/* The socket's transport right now: plain, or TLS once started. */
static ls_transport transport_of(const ls_socket *s)
{
    ls_transport t = {s->ssl ? &ls_tls_ops : &ls_plain_ops, s->fd, s->ssl};
    return t;
}

/* Read once. LS_IO_OK: got data; LS_IO_EOF; LS_IO_WANT*; LS_IO_ERROR. */
static int fill(ls_socket *s, ls_ioerr *err)
{
    ls_transport t = transport_of(s);
    return ls_io_fill(&t, &s->rbuf, READ_CHUNK, err);
}

/* Write as much of wbuf as the transport takes. LS_IO_OK when wbuf is
 * empty, LS_IO_WANT* when data remains, LS_IO_ERROR. */
static int write_some(ls_socket *s, ls_ioerr *err)
{
    ls_transport t = transport_of(s);
    return ls_io_drain(&t, &s->wbuf, err);
}

/* Record a sticky error: its token and a copy of its detail (kept off
 * the socket struct, which every idle connection holds). */
static void set_sticky(const char **token, char **detail, const ls_ioerr *err)
{
    *token = err->token;
    free(*detail);
    *detail = strdup(err->detail); /* NULL (out of memory): no detail */
}

static void set_werr(ls_socket *s, const ls_ioerr *err)
{
    set_sticky(&s->werr, &s->werr_detail, err);
}

static void wio_stop(ls_socket *s)
{
    if (ev_is_active(&s->wio))
        ev_io_stop(ls_evloop(s->loop), &s->wio);
    if (s->wio_counted) {
        s->wio_counted = 0;
        ls_live[LS_COUNT_WATCHERS]--;
    }
}

/* Background flush step: used before the loop blocks and when the fd
 * becomes writable while no task is waiting to write. */
static void background_flush(ls_socket *s)
{
    if (s->fd < 0 || s->werr)
        return;
    ls_ioerr err = {0};
    int rc = write_some(s, &err);
    if (rc == LS_IO_OK) {
        wio_stop(s);
        /* All sent and a task waits for input: the socket is idle, its
         * output buffer goes until the next send. */
        if (ls_waitref_busy(&s->reader)) {
            ls_buf_shrink(&s->wbuf);
            ls_tls_release_buffers(s->ssl);
        }
        ls_wake_ref(s->loop, &s->writer, LS_WAKE_READY);
        return;
    }
    if (rc == LS_IO_ERROR) {
        set_werr(s, &err);
        wio_stop(s);
        ls_wake_ref(s->loop, &s->writer, LS_WAKE_READY);
        return;
    }
    int ev = rc == LS_IO_WANTREAD ? EV_READ : EV_WRITE;
    if (ev_is_active(&s->wio) && (s->wio.events & (EV_READ | EV_WRITE)) == ev)
        return;
    if (ev_is_active(&s->wio))
        ev_io_stop(ls_evloop(s->loop), &s->wio);
    ev_io_set(&s->wio, s->fd, ev);
    ev_io_start(ls_evloop(s->loop), &s->wio);
    if (!s->wio_counted) {
        s->wio_counted = 1;
        ls_live[LS_COUNT_WATCHERS]++;
    }
}

static void wio_cb(struct ev_loop *ev, ev_io *w, int revents)
{
    (void)ev;
    (void)revents;
    ls_socket *s = (ls_socket *)((char *)w - offsetof(ls_socket, wio));
    background_flush(s);
}

static void fl_cb(ls_flushable *f)
{
    ls_socket *s = (ls_socket *)((char *)f - offsetof(ls_socket, fl));
    background_flush(s);
}

/* ------------------------------------------------------------------ */
/* Lifetime */

static ls_socket *new_socket(lua_State *L, ls_loop *loop)
{
    ls_socket *s = lua_newuserdatauv(L, sizeof *s, 1);
    memset(s, 0, sizeof *s);
    s->fd = -1;
    luaL_setmetatable(L, SOCKET_MT);
    s->loop = loop;
    s->t_connect = s->t_read = s->t_write = DEFAULT_TIMEOUT;
    s->maxline = DEFAULT_MAXLINE;
    s->sndlimit = DEFAULT_SNDLIMIT;
    ev_init(&s->wio, wio_cb);
    s->fl.flush = fl_cb;
    ls_buf_account(&s->rbuf, &ls_socket_buffer_bytes);
    ls_buf_account(&s->wbuf, &ls_socket_buffer_bytes);
    return s;
}

static void attach_fd(ls_socket *s, int fd)
{
    s->fd = fd;
    ls_live[LS_COUNT_SOCKETS]++;
}

/* The one destroy: close, __close and __gc. Never calls Lua. */
static void socket_destroy(ls_socket *s)
{
    if (s->fd < 0)
        return;
    wio_stop(s);
    ls_flush_dequeue(s->loop, &s->fl);
    if (s->wbuf.len > 0 && !s->werr) {
        ls_ioerr err = {0};
        write_some(s, &err); /* best effort, never waits */
    }
    if (s->ssl) {
        if (!s->werr && !s->rerr)
            ls_tls_shutdown(s->ssl);
        ls_tls_free(s->ssl);
        s->ssl = NULL;
    }
    ls_fd_closing(s->loop, s->fd);
    close(s->fd);
    s->fd = -1;
    ls_buf_free(&s->rbuf);
    ls_buf_free(&s->wbuf);
    free(s->rerr_detail);
    free(s->werr_detail);
    s->rerr_detail = s->werr_detail = NULL;
    ls_live[LS_COUNT_SOCKETS]--;
    ls_wake_ref(s->loop, &s->reader, LS_WAKE_CLOSED);
    ls_wake_ref(s->loop, &s->writer, LS_WAKE_CLOSED);
}

static int l_sock_close(lua_State *L)
{
    socket_destroy(check_socket(L, 1));
    lua_pushboolean(L, 1);
    return 1;
}

static int l_sock_gc(lua_State *L)
{
    socket_destroy(lua_touserdata(L, 1));
    return 0;
}

static int l_sock_tostring(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0)
        lua_pushliteral(L, "luasmtp.socket (closed)");
    else
        lua_pushfstring(L, "luasmtp.socket (fd %d%s)", s->fd, s->ssl ? ", tls" : "");
    return 1;
}

/* ------------------------------------------------------------------ */
/* Reading */

/* Find the first CRLF within the first `limit` bytes. */
static size_t find_crlf(const ls_buf *b, size_t limit)
{
    const char *h = ls_buf_head(b);
    size_t n = b->len < limit ? b->len : limit;
    for (size_t i = 0; i + 1 < n; i++) {
        const char *p = memchr(h + i, '\r', n - 1 - i);
        if (p == NULL)
            return (size_t)-1;
        i = (size_t)(p - h);
        if (h[i + 1] == '\n')
            return i;
    }
    return (size_t)-1;
}

/* Drop input up to and including the next CRLF (after an over-long
 * line). Returns 1 when the end of the line was found. */
static int skip_line(ls_socket *s)
{
    size_t p = ls_buf_find(&s->rbuf, 0, "\r\n", 2);
    if (p != (size_t)-1) {
        ls_buf_consume(&s->rbuf, p + 2);
        s->skipline = 0;
        return 1;
    }
    /* keep a trailing CR: its LF may come next */
    size_t keep = (s->rbuf.len > 0 && ls_buf_head(&s->rbuf)[s->rbuf.len - 1] == '\r') ? 1 : 0;
    ls_buf_consume(&s->rbuf, s->rbuf.len - keep);
    return 0;
}

/* Try to satisfy a read from the buffer. Returns the number of Lua
 * results pushed, or -1 when more input is needed. Arguments are on the
 * Lua stack at 2 (and 3): see the receive* functions. */
static int extract(lua_State *L, ls_socket *s, int op)
{
    ls_buf *b = &s->rbuf;
    const char *h;
    switch (op) {
    case OP_LINE: {
        size_t max = (size_t)luaL_optinteger(L, 2, (lua_Integer)s->maxline);
        if (s->skipline && !skip_line(s))
            return -1;
        size_t p = find_crlf(b, max + 2);
        h = ls_buf_head(b);
        if (p == (size_t)-1) {
            if (b->len >= max + 2 || (b->len == max + 1 && h[max] != '\r')) {
                s->skipline = 1;
                skip_line(s);
                return ls_pusherror(L, LS_ELIMIT, "line too long");
            }
            return -1;
        }
        lua_pushlstring(L, h, p);
        /* CRLF is the only line ending; a CR or LF inside the line is
         * bare and the caller learns it. */
        if (memchr(h, '\n', p))
            lua_pushliteral(L, "barelf");
        else if (memchr(h, '\r', p))
            lua_pushliteral(L, "barecr");
        else
            lua_pushnil(L);
        ls_buf_consume(b, p + 2);
        return 2;
    }
    case OP_EXACT: {
        size_t n = (size_t)luaL_checkinteger(L, 2);
        if (b->len < n)
            return -1;
        lua_pushlstring(L, ls_buf_head(b), n);
        ls_buf_consume(b, n);
        return 1;
    }
    case OP_UNTIL: {
        size_t dlen;
        const char *d = luaL_checklstring(L, 2, &dlen);
        size_t max = (size_t)luaL_optinteger(L, 3, (lua_Integer)s->maxline);
        size_t p = ls_buf_find(b, 0, d, dlen);
        if (p != (size_t)-1 && p <= max) {
            lua_pushlstring(L, ls_buf_head(b), p);
            ls_buf_consume(b, p + dlen);
            return 1;
        }
        if (b->len >= max + dlen)
            return ls_pusherror(L, LS_ELIMIT, "delimiter not found within the limit");
        return -1;
    }
    default: { /* OP_ANY */
        size_t max = (size_t)luaL_optinteger(L, 2, READ_CHUNK);
        if (b->len == 0)
            return -1;
        size_t n = b->len < max ? b->len : max;
        lua_pushlstring(L, ls_buf_head(b), n);
        ls_buf_consume(b, n);
        return 1;
    }
    }
}

static int push_partial_error(lua_State *L, ls_socket *s, const char *token)
{
    lua_pushnil(L);
    lua_pushstring(L, token);
    if (s->fd >= 0 && s->rbuf.len > 0)
        lua_pushlstring(L, ls_buf_head(&s->rbuf), s->rbuf.len);
    else
        lua_pushnil(L);
    return 3;
}

/* How a reader's wait ended: 0 to go on reading, else the number of Lua
 * results pushed (closed or timeout; with_partial adds the buffered
 * data as the third value). */
static int after_read_wait(lua_State *L, ls_socket *s, int r, int with_partial)
{
    ls_waitref_clear(&s->reader);
    if (r == LS_WAKE_CLOSED || s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    if (r == LS_WAKE_TIMEOUT)
        return with_partial ? push_partial_error(L, s, LS_ETIMEOUT) : ls_pusherror(L, LS_ETIMEOUT, NULL);
    return 0;
}

/* Get more input into rbuf, waiting (until s->rdeadline) if none is
 * there. Returns 0 to go on reading, else the number of Lua results
 * pushed. In a task it may yield: Lua then calls k(ctx), which must
 * start with after_read_wait(). */
static int read_more(lua_State *L, ls_socket *s, int with_partial, lua_KContext ctx, lua_KFunction k)
{
    if (s->rerr)
        return ls_pusherror(L, s->rerr, s->rerr_detail ? s->rerr_detail : "");
    if (s->eof)
        return with_partial ? push_partial_error(L, s, LS_ECLOSED) : ls_pusherror(L, LS_ECLOSED, NULL);
    ls_ioerr err = {0};
    /* "waitreply": with output queued and not yet sent (plaintext), what
     * is read next is the answer to it, which cannot have come yet: wait
     * for it rather than try a read that would only fail. */
    int rc = s->waitreply && s->fl.queued && s->ssl == NULL ? LS_IO_WANTREAD : fill(s, &err);
    if (rc == LS_IO_OK)
        return 0;
    if (rc == LS_IO_EOF) {
        s->eof = 1;
        return 0;
    }
    if (rc == LS_IO_ERROR) {
        set_sticky(&s->rerr, &s->rerr_detail, &err);
        return ls_pusherror(L, s->rerr, err.detail);
    }
    ls_task *t = ls_current(L, s->loop);
    /* The socket waits for its peer, perhaps for long: its input buffer
     * holds no more than what has arrived meanwhile, an empty output
     * buffer goes (one with data stays as it is until it is sent). */
    ls_buf_shrink(&s->rbuf);
    if (s->wbuf.len == 0)
        ls_buf_shrink(&s->wbuf);
    ls_tls_release_buffers(s->ssl);
    int r = ls_wait(L, s->loop, t, s->fd, rc == LS_IO_WANTWRITE ? EV_WRITE : EV_READ, s->rdeadline,
                    &s->reader, ctx, k);
    return after_read_wait(L, s, r, with_partial);
}

static int recv_k(lua_State *L, int status, lua_KContext ctx)
{
    ls_socket *s = lua_touserdata(L, 1);
    int op = (int)ctx;
    if (status == LUA_YIELD) {
        int n = after_read_wait(L, s, ls_wait_result(L), 1);
        if (n)
            return n;
    }
    for (;;) {
        int n = extract(L, s, op);
        if (n >= 0)
            return n;
        n = read_more(L, s, 1, ctx, recv_k);
        if (n)
            return n;
    }
}

/* A read may start: no other task reads (or shakes hands) meanwhile. */
static void check_reader_free(lua_State *L, ls_socket *s)
{
    if (ls_waitref_busy(&s->reader) || s->handshaking)
        luaL_error(L, "luasmtp: socket busy: another task is reading from it");
}

static int start_read(lua_State *L, int op, int timeout_idx)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    check_reader_free(L, s);
    s->rdeadline = deadline_of(s->loop, opt_timeout(L, timeout_idx, s->t_read));
    lua_settop(L, timeout_idx);
    return recv_k(L, LUA_OK, op);
}

/* sock:receiveline([max [, timeout]]) -> line, bad | nil, err, partial
 * A line ends with CRLF only. The line is returned without it; `bad` is
 * nil, or "barelf"/"barecr" when the line holds a bare LF or CR. A line
 * longer than max (default: the "maxline" option) gives nil, "limit";
 * the rest of that line is then skipped by the next call.
 *   local line, bad = sock:receiveline() */
static int l_receiveline(lua_State *L)
{
    if (!lua_isnoneornil(L, 2))
        luaL_argcheck(L, luaL_checkinteger(L, 2) > 0, 2, "limit must be positive");
    return start_read(L, OP_LINE, 3);
}

/* sock:receive(n [, timeout]) -> data | nil, err, partial: exactly n bytes. */
static int l_receive(lua_State *L)
{
    luaL_argcheck(L, luaL_checkinteger(L, 2) >= 0, 2, "negative size");
    return start_read(L, OP_EXACT, 3);
}

/* sock:receiveuntil(delim [, max [, timeout]]) -> data | nil, err, partial
 * Data up to (not including) delim, which is consumed. */
static int l_receiveuntil(lua_State *L)
{
    size_t dlen;
    luaL_checklstring(L, 2, &dlen);
    luaL_argcheck(L, dlen > 0, 2, "empty delimiter");
    return start_read(L, OP_UNTIL, 4);
}

/* sock:receiveany([max [, timeout]]) -> data | nil, err: whatever has
 * arrived (at least one byte, at most max). */
static int l_receiveany(lua_State *L)
{
    if (!lua_isnoneornil(L, 2))
        luaL_argcheck(L, luaL_checkinteger(L, 2) > 0, 2, "size must be positive");
    return start_read(L, OP_ANY, 3);
}

/* sock:buffered() -> n: bytes received but not yet read. */
static int l_buffered(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    lua_pushinteger(L, s->fd < 0 ? 0 : (lua_Integer)s->rbuf.len);
    return 1;
}


/* ------------------------------------------------------------------ */
/* Bodies into a sink (core.sink): DATA through the decoder, BDAT chunks
 * as they are. The body goes from the input buffer to the sink (memory
 * or spool file) without becoming Lua strings. A sink that refuses
 * (too big, spool write failed) does not stop the reading: the body is
 * consumed to its end so the session stays in step, and the result says
 * what went wrong. */

static int sink_out(void *ctx, const char *p, size_t n)
{
    ls_sink_write(ctx, p, n); /* a failure is sticky in the sink: reported at the end */
    return 0;
}

static void set_field_bool(lua_State *L, const char *name, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, name);
}

/* Push token, detail of the sink's failure and return 2, or return 0
 * when it took everything. */
static int push_sink_failure(lua_State *L, const ls_sink *k)
{
    if (k->too_big) {
        lua_pushliteral(L, LS_ELIMIT);
        lua_pushliteral(L, "message too big");
        return 2;
    }
    if (k->err) {
        lua_pushliteral(L, LS_EIO);
        lua_pushfstring(L, "spool write: %s", strerror(k->err));
        return 2;
    }
    return 0;
}

/* The sink's failure, if any, as error, detail fields of the table on top. */
static void set_sink_error(lua_State *L, const ls_sink *k)
{
    if (push_sink_failure(L, k)) {
        lua_setfield(L, -3, "detail");
        lua_setfield(L, -2, "error");
    }
}

/* A step of receivebody ends: "more", bytes added, header block ended. */
static int push_step(lua_State *L, const ls_sink *k)
{
    lua_pushliteral(L, "more");
    lua_pushinteger(L, (lua_Integer)(ls_sink_size(k) - (uint64_t)lua_tointeger(L, 6)));
    lua_pushboolean(L, k->hstate < 0);
    return 3;
}

/* stack: 1 sock, 2 sink, 3 idle timeout, 4 step (0: none), 5 eoh (return
 * when the header block ends in this call), 6 sink size at the call */
static int recvbody_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)ctx;
    ls_socket *s = lua_touserdata(L, 1);
    ls_sink *k = ls_checksink(L, 2);
    if (status == LUA_YIELD) {
        int n = after_read_wait(L, s, ls_wait_result(L), 0);
        if (n)
            return n;
    }
    uint64_t step = (uint64_t)lua_tointeger(L, 4);
    uint64_t start = (uint64_t)lua_tointeger(L, 6);
    int eoh = lua_toboolean(L, 5);
    for (;;) {
        if (s->rbuf.len > 0) {
            int done = 0;
            size_t used = smtp_data_feed(&s->dec, ls_buf_head(&s->rbuf), s->rbuf.len, sink_out, k,
                                         &done);
            ls_buf_consume(&s->rbuf, used);
            if (done) {
                const struct smtp_data_decoder *d = &s->dec;
                lua_createtable(L, 0, 9);
                lua_pushinteger(L, (lua_Integer)d->size);
                lua_setfield(L, -2, "size");
                lua_pushinteger(L, (lua_Integer)(ls_sink_size(k) - start));
                lua_setfield(L, -2, "added");
                set_field_bool(L, "too_big", d->too_big || k->too_big);
                set_field_bool(L, "bare_lf", d->bare_lf);
                set_field_bool(L, "bare_cr", d->bare_cr);
                set_field_bool(L, "long_line", d->long_line);
                set_field_bool(L, "rejected", smtp_data_rejected(d));
                set_sink_error(L, k);
                return 1;
            }
            if ((step && ls_sink_size(k) - start >= step) || (eoh && k->hstate < 0))
                return push_step(L, k);
            /* One idle period per block of input. */
            double idle = ls_now(s->loop) + lua_tonumber(L, 3);
            s->rdeadline = idle < s->body_deadline ? idle : s->body_deadline;
        }
        int n = read_more(L, s, 0, 0, recvbody_k);
        if (n)
            return n;
    }
}

/* sock:receivebody(sink [, opts]) -> info | nil, err, detail
 * Read an SMTP DATA body (up to CRLF.CRLF, dot-stuffing undone) into
 * sink (core.sink). opts: max_size (bytes, 0 = none), max_line (998, 0 =
 * no check), bare ("reject" | "normalise"), idle_timeout (each wait for
 * input; default the read timeout), total_timeout (the whole body).
 * info = { size =, too_big =, bare_lf =, bare_cr =, long_line =,
 * rejected =, added =, error =, detail = }: error ("limit" or "io") when
 * the sink refused some of it; the body is read to its end all the same.
 * Input after the end stays buffered for the next receiveline.
 * Streaming: with step = n the call returns "more", added, eoh once it
 * added at least n bytes to the sink (added: the bytes of this call; eoh:
 * the sink's header block has ended), and with eoh = true also when the
 * header block ends in this call. The next call with resume = true goes
 * on where it stopped (decoder state and total deadline are the
 * socket's; the other limits are the first call's) and may name another
 * sink (to discard the rest).
 *   local info = sock:receivebody(sink, { max_size = 50e6, total_timeout = 600 }) */
static int l_receivebody(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    ls_sink *k = ls_checksink(L, 2);
    double idle = s->t_read, total = -1;
    lua_Integer max_size = 0, max_line = SMTP_DEFAULT_MAX_LINE, step = 0;
    int bare = SMTP_BARE_REJECT, eoh = 0, resume = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "max_size");
        max_size = luaL_optinteger(L, -1, 0);
        lua_getfield(L, 3, "max_line");
        max_line = luaL_optinteger(L, -1, max_line);
        lua_getfield(L, 3, "bare");
        const char *m = luaL_optstring(L, -1, "reject");
        if (strcmp(m, "normalise") == 0 || strcmp(m, "normalize") == 0)
            bare = SMTP_BARE_NORMALISE;
        else if (strcmp(m, "reject") != 0)
            return luaL_argerror(L, 3, "bare must be \"reject\" or \"normalise\"");
        lua_getfield(L, 3, "idle_timeout");
        idle = opt_timeout(L, -1, idle);
        lua_getfield(L, 3, "total_timeout");
        total = opt_timeout(L, -1, -1);
        lua_getfield(L, 3, "step");
        step = luaL_optinteger(L, -1, 0);
        lua_getfield(L, 3, "eoh");
        eoh = lua_toboolean(L, -1);
        lua_getfield(L, 3, "resume");
        resume = lua_toboolean(L, -1);
        lua_pop(L, 7);
        luaL_argcheck(L, max_size >= 0 && max_line >= 0 && step >= 0, 3, "negative limit");
    }
    if (total < 0)
        total = idle;
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    check_reader_free(L, s);
    double now = ls_now(s->loop);
    if (!resume) {
        smtp_data_decoder_init(&s->dec, (uint64_t)max_size, (size_t)max_line, bare);
        s->body_deadline = now + total;
    }
    lua_settop(L, 2);
    lua_pushnumber(L, idle);                               /* 3 */
    lua_pushinteger(L, step);                              /* 4 */
    lua_pushboolean(L, eoh && k->hstate >= 0);             /* 5: not ended yet */
    lua_pushinteger(L, (lua_Integer)ls_sink_size(k));      /* 6 */
    s->rdeadline = now + idle < s->body_deadline ? now + idle : s->body_deadline;
    return recvbody_k(L, LUA_OK, 0);
}

/* stack: 1 sock, 2 sink, 3 bytes left, 4 idle timeout */
static int recvchunk_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)ctx;
    ls_socket *s = lua_touserdata(L, 1);
    ls_sink *k = ls_checksink(L, 2);
    if (status == LUA_YIELD) {
        int n = after_read_wait(L, s, ls_wait_result(L), 0);
        if (n)
            return n;
    }
    for (;;) {
        lua_Integer left = lua_tointeger(L, 3);
        if (s->rbuf.len > 0 && left > 0) {
            size_t n = s->rbuf.len < (size_t)left ? s->rbuf.len : (size_t)left;
            ls_sink_write(k, ls_buf_head(&s->rbuf), n); /* failure: sticky, see below */
            ls_buf_consume(&s->rbuf, n);
            left -= (lua_Integer)n;
            lua_pushinteger(L, left);
            lua_replace(L, 3);
            s->rdeadline = ls_now(s->loop) + lua_tonumber(L, 4);
        }
        if (left == 0) {
            lua_pushnil(L);
            if (push_sink_failure(L, k))
                return 3;
            lua_pop(L, 1);
            lua_pushboolean(L, 1);
            return 1;
        }
        int n = read_more(L, s, 0, 0, recvchunk_k);
        if (n)
            return n;
    }
}

/* sock:receivechunk(sink, n [, timeout]) -> true | nil, err, detail
 * Move exactly n bytes of input (a BDAT chunk) into sink. timeout bounds
 * each wait for input (default: the read timeout). When the sink refuses
 * them ("limit": past its max_size; "io": the spool file failed) the n
 * bytes are consumed all the same, so the next command is read in step. */
static int l_receivechunk(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    ls_checksink(L, 2);
    lua_Integer n = luaL_checkinteger(L, 3);
    luaL_argcheck(L, n >= 0, 3, "negative size");
    double idle = opt_timeout(L, 4, s->t_read);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    check_reader_free(L, s);
    lua_settop(L, 3);
    lua_pushnumber(L, idle); /* 4 */
    s->rdeadline = ls_now(s->loop) + idle;
    return recvchunk_k(L, LUA_OK, 0);
}

/* ------------------------------------------------------------------ */
/* Writing */

/* Wait until wbuf holds at most `target` bytes. ctx = target. */
static int drain_k(lua_State *L, int status, lua_KContext ctx)
{
    ls_socket *s = lua_touserdata(L, 1);
    size_t target = (size_t)ctx;
    if (status == LUA_YIELD) {
        ls_waitref_clear(&s->writer);
        int r = ls_wait_result(L);
        if (r == LS_WAKE_CLOSED || s->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT)
            return ls_pusherror(L, LS_ETIMEOUT, NULL);
    }
    for (;;) {
        if (s->werr)
            return ls_pusherror(L, s->werr, s->werr_detail ? s->werr_detail : "");
        ls_ioerr err = {0};
        int rc = write_some(s, &err);
        if (rc == LS_IO_ERROR) {
            set_werr(s, &err);
            continue;
        }
        if (s->wbuf.len <= target) {
            size_t dlen;
            const char *data = lua_tolstring(L, 2, &dlen);
            if (data && ls_buf_append(&s->wbuf, data, dlen) < 0)
                return ls_pusherror(L, LS_ELIMIT, "out of memory");
            if (s->wbuf.len > 0)
                ls_flush_queue(s->loop, &s->fl);
            else
                wio_stop(s);
            lua_pushinteger(L, lua_tointeger(L, 3));
            return 1;
        }
        ls_task *t = ls_current(L, s->loop);
        int r = ls_wait(L, s->loop, t, s->fd, rc == LS_IO_WANTREAD ? EV_READ : EV_WRITE,
                        s->wdeadline, &s->writer, ctx, drain_k);
        ls_waitref_clear(&s->writer);
        if (r == LS_WAKE_CLOSED || s->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT)
            return ls_pusherror(L, LS_ETIMEOUT, NULL);
    }
}

static int start_drain(lua_State *L, ls_socket *s, size_t target, int timeout_idx, lua_Integer ret)
{
    if (ls_waitref_busy(&s->writer) || s->handshaking)
        return luaL_error(L, "luasmtp: socket busy: another task is writing to it");
    s->wdeadline = deadline_of(s->loop, opt_timeout(L, timeout_idx, s->t_write));
    lua_settop(L, 2); /* index 2: data to queue once drained, or nil */
    lua_pushinteger(L, ret); /* index 3: value returned on success */
    return drain_k(L, LUA_OK, (lua_KContext)target);
}

/* sock:send(data [, timeout]) -> bytes | nil, err, detail
 * Queue data for sending. It leaves before the loop next waits (small
 * writes made together go out in one syscall). When the data would take
 * the pending output past the "sendbuffer" option, send first waits
 * until the peer has taken enough (backpressure); if that wait times
 * out, nothing of this call was queued. An error of an earlier
 * background write is reported here. */
static int l_send(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    if (s->werr)
        return ls_pusherror(L, s->werr, s->werr_detail ? s->werr_detail : "");
    if (s->handshaking)
        return luaL_error(L, "luasmtp: socket busy: the TLS handshake is in progress");
    if (s->wbuf.len + len <= s->sndlimit || s->wbuf.len == 0) {
        if (ls_buf_append(&s->wbuf, data, len) < 0)
            return ls_pusherror(L, LS_ELIMIT, "out of memory");
        ls_flush_queue(s->loop, &s->fl);
        lua_pushinteger(L, (lua_Integer)len);
        return 1;
    }
    /* Wait for room first: on timeout nothing of this call is queued. */
    return start_drain(L, s, len >= s->sndlimit ? 0 : s->sndlimit - len, 3, (lua_Integer)len);
}

/* flush(self, timeout) -> (self, nil, timeout): no data to queue */
static void start_drain_args(lua_State *L)
{
    lua_settop(L, 2);
    lua_pushnil(L);
    lua_insert(L, 2);
}

/* sock:flush([timeout]) -> true | nil, err: wait until all queued
 * output has been handed to the kernel. */
static int l_flush(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    start_drain_args(L);
    return start_drain(L, s, 0, 3, 1);
}

/* sock:shutdown([how]) -> true | nil, err. how: "send" (default), "receive", "both". */
static int l_shutdown(lua_State *L)
{
    static const char *const hows[] = {"send", "receive", "both", NULL};
    static const int codes[] = {SHUT_WR, SHUT_RD, SHUT_RDWR};
    ls_socket *s = check_socket(L, 1);
    int how = codes[luaL_checkoption(L, 2, "send", hows)];
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    if (how != SHUT_RD && s->wbuf.len > 0) {
        ls_ioerr err = {0};
        write_some(s, &err);
    }
    if (s->ssl && how != SHUT_RD)
        ls_tls_shutdown(s->ssl);
    if (shutdown(s->fd, how) < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    lua_pushboolean(L, 1);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Options and addresses */

/* sock:settimeouts(connect, read, write): seconds, nil keeps a value. */
static int l_settimeouts(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    s->t_connect = opt_timeout(L, 2, s->t_connect);
    s->t_read = opt_timeout(L, 3, s->t_read);
    s->t_write = opt_timeout(L, 4, s->t_write);
    lua_settop(L, 1);
    return 1;
}

/* sock:settimeout(seconds): all three at once. */
static int l_settimeout(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    double t = opt_timeout(L, 2, DEFAULT_TIMEOUT);
    s->t_connect = s->t_read = s->t_write = t;
    lua_settop(L, 1);
    return 1;
}

static int l_gettimeouts(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    lua_pushnumber(L, s->t_connect);
    lua_pushnumber(L, s->t_read);
    lua_pushnumber(L, s->t_write);
    return 3;
}

/* sock:setoption(name, value) -> true | nil, err
 * "maxline" (bytes), "sendbuffer" (bytes pending before send waits),
 * "nodelay", "keepalive", "waitreply" (booleans; waitreply: a read
 * right after output that is queued and not yet sent waits for the peer
 * instead of trying first, for request/reply peers such as a client). */
static int l_setoption(lua_State *L)
{
    static const char *const names[] = {"maxline", "sendbuffer", "nodelay", "keepalive", "waitreply", NULL};
    ls_socket *s = check_socket(L, 1);
    int opt = luaL_checkoption(L, 2, NULL, names);
    if (opt <= 1) {
        lua_Integer v = luaL_checkinteger(L, 3);
        luaL_argcheck(L, v > 0 && v <= 1 << 30, 3, "out of range");
        if (opt == 0)
            s->maxline = (size_t)v;
        else
            s->sndlimit = (size_t)v;
    } else if (opt == 4) {
        s->waitreply = lua_toboolean(L, 3);
    } else {
        if (s->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        int on = lua_toboolean(L, 3);
        int rc = opt == 2 ? setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on)
                          : setsockopt(s->fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
        if (rc < 0)
            return ls_pusherror(L, LS_EIO, strerror(errno));
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int push_name(lua_State *L, int fd, int peer)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    memset(&ss, 0, sizeof ss);
    int rc = peer ? getpeername(fd, (struct sockaddr *)&ss, &len)
                  : getsockname(fd, (struct sockaddr *)&ss, &len);
    if (rc < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    return push_sockaddr(L, &ss, len);
}

/* sock:getpeername() -> address, port */
static int l_getpeername(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    return push_name(L, s->fd, 1);
}

/* sock:getsockname() -> address, port */
static int l_getsockname(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    return push_name(L, s->fd, 0);
}

/* sock:peercred() -> {pid=, uid=, gid=} | nil, err, detail
 * The process at the other end of a UNIX-domain socket (SO_PEERCRED: as
 * it was when it connected). */
static int l_peercred(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(s->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return ls_pusherror(L, LS_EIO, strerror(errno));
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, cred.pid);
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, cred.uid);
    lua_setfield(L, -2, "uid");
    lua_pushinteger(L, cred.gid);
    lua_setfield(L, -2, "gid");
    return 1;
}

static int l_getfd(lua_State *L)
{
    lua_pushinteger(L, check_socket(L, 1)->fd);
    return 1;
}

/* ------------------------------------------------------------------ */
/* TLS */

enum { TLS_FLUSH, TLS_HANDSHAKE };

static int tls_fail(lua_State *L, ls_socket *s, const char *token, const char *detail)
{
    lua_pushnil(L);
    lua_pushstring(L, token);
    lua_pushstring(L, detail);
    /* A failed handshake leaves the stream in an unknown state. */
    socket_destroy(s);
    return 3;
}

static int starttls_k(lua_State *L, int status, lua_KContext ctx)
{
    ls_socket *s = lua_touserdata(L, 1);
    int stage = (int)ctx;
    if (status == LUA_YIELD) {
        ls_waitref_clear(&s->reader);
        s->handshaking = 0;
        int r = ls_wait_result(L);
        if (r == LS_WAKE_CLOSED || s->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT)
            return tls_fail(L, s, LS_ETIMEOUT, "TLS handshake timed out");
    }
    for (;;) {
        ls_ioerr err = {0};
        int rc;
        if (stage == TLS_FLUSH) {
            /* Plaintext queued before STARTTLS (e.g. the 220 reply)
             * must leave before the handshake starts. */
            rc = write_some(s, &err);
            if (rc == LS_IO_ERROR)
                return tls_fail(L, s, err.token, err.detail);
            if (rc == LS_IO_OK) {
                SSL_CTX *c = ls_tls_ctx_from_lua(L, 2);
                if (!ls_tls_ctx_is_server(c) && s->rbuf.len > 0)
                    return tls_fail(L, s, LS_ETLS,
                                    "data received before the TLS handshake (injection attempt)");
                /* Server: whatever the client sent before the
                 * handshake is discarded, never read as TLS data. */
                ls_buf_consume(&s->rbuf, s->rbuf.len);
                s->skipline = 0;
                const char *sni = lua_tostring(L, 3);
                s->ssl = ls_tls_new(c, s->fd, sni, lua_toboolean(L, 4), &err);
                if (s->ssl == NULL)
                    return tls_fail(L, s, LS_ETLS, err.detail);
                if (lua_istable(L, 5) && ls_tls_dane_apply(L, 5, s->ssl, &err) != LS_IO_OK)
                    return tls_fail(L, s, err.token, err.detail);
                stage = TLS_HANDSHAKE;
                ctx = stage;
                continue;
            }
        } else {
            rc = ls_tls_handshake(s->ssl, &err);
            if (rc == LS_IO_OK) {
                lua_pushboolean(L, 1);
                return 1;
            }
            if (rc == LS_IO_EOF)
                return tls_fail(L, s, LS_ETLS, "connection closed during the TLS handshake");
            if (rc == LS_IO_ERROR)
                return tls_fail(L, s, err.token, err.detail);
        }
        /* The handshake's wait is the reader slot; the writer slot stays
         * empty (s->handshaking keeps other readers and writers out
         * meanwhile), so the flush of the plaintext queued before it
         * cannot end this wait. */
        ls_task *t = ls_current(L, s->loop);
        s->handshaking = 1;
        int r = ls_wait(L, s->loop, t, s->fd, rc == LS_IO_WANTREAD ? EV_READ : EV_WRITE,
                        s->rdeadline, &s->reader, ctx, starttls_k);
        ls_waitref_clear(&s->reader);
        s->handshaking = 0;
        if (r == LS_WAKE_CLOSED || s->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT)
            return tls_fail(L, s, LS_ETIMEOUT, "TLS handshake timed out");
    }
}

/* sock:starttls(ctx [, opts]) -> true | nil, err, detail
 * Upgrade the connection to TLS in place (also used for implicit TLS
 * right after connect/accept). opts: servername (client: SNI and the
 * name the certificate must match), verify_host (default true),
 * timeout (default: the read timeout), dane (client: { base_domain,
 * tlsa, names }, see ls_tls_dane_check: the peer is authenticated by
 * its TLSA records instead of PKIX; SNI defaults to the base domain).
 * Client side: input already received and not read is an error (response
 * injection). Server side: it is discarded. On failure the socket is
 * closed. */
static int l_starttls(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    ls_tls_ctx_from_lua(L, 2);
    const char *sni = NULL;
    int verify_host = 1;
    double timeout = s->t_read;
    int dane = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "servername");
        sni = luaL_optstring(L, -1, NULL);
        lua_getfield(L, 3, "verify_host");
        if (!lua_isnil(L, -1))
            verify_host = lua_toboolean(L, -1);
        lua_getfield(L, 3, "timeout");
        timeout = opt_timeout(L, -1, timeout);
        lua_pop(L, 3);
        if (lua_getfield(L, 3, "dane") != LUA_TNIL) {
            ls_tls_dane_check(L, -1, 2);
            dane = lua_gettop(L); /* kept below for starttls_k */
            /* The names come from opts.dane; SNI is the base domain. */
            verify_host = 0;
            if (sni == NULL) {
                lua_getfield(L, -1, "base_domain");
                sni = lua_tostring(L, -1);
                lua_replace(L, 3); /* opts is no longer needed: keeps sni alive */
            }
        }
    }
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    if (s->ssl)
        return luaL_error(L, "luasmtp: TLS is already active on this socket");
    if (!ls_tls_ctx_is_server(ls_tls_ctx_from_lua(L, 2)) && !dane && verify_host && sni == NULL)
        return luaL_error(L, "luasmtp: starttls needs opts.servername to verify the server "
                             "(or verify_host = false)");
    if (ls_waitref_busy(&s->reader) || ls_waitref_busy(&s->writer) || s->handshaking)
        return luaL_error(L, "luasmtp: socket busy: cannot start TLS while another task uses it");
    s->rdeadline = deadline_of(s->loop, timeout);
    /* Stack for starttls_k: sock, ctx, sni, verify_host, dane table. */
    if (sni)
        lua_pushstring(L, sni);
    else
        lua_pushnil(L);
    lua_pushboolean(L, verify_host);
    if (dane)
        lua_pushvalue(L, dane);
    else
        lua_pushnil(L);
    int top = lua_gettop(L);
    for (int i = 0; i < 3; i++)
        lua_copy(L, top - 2 + i, 3 + i);
    lua_settop(L, 5);
    return starttls_k(L, LUA_OK, TLS_FLUSH);
}

/* sock:tlsinfo() -> table | nil: see README "TLS information". */
static int l_tlsinfo(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    if (s->fd < 0 || s->ssl == NULL) {
        lua_pushnil(L);
        return 1;
    }
    return ls_tls_pushinfo(L, s->ssl);
}

/* sock:channel_binding([type]) -> bytes | nil, err, detail
 * type: "tls-exporter" (TLS 1.3) or "tls-unique" (TLS 1.2). */
static int l_channel_binding(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    const char *type = luaL_optstring(L, 2, NULL);
    if (s->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    if (s->ssl == NULL)
        return ls_pusherror(L, LS_ETLS, "TLS is not active");
    return ls_tls_pushbinding(L, s->ssl, type);
}

static int l_istls(lua_State *L)
{
    ls_socket *s = check_socket(L, 1);
    lua_pushboolean(L, s->fd >= 0 && s->ssl != NULL);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Connecting */

static int connect_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)ctx;
    ls_socket *s = lua_touserdata(L, 4);
    if (status == LUA_YIELD) {
        ls_waitref_clear(&s->writer);
        int r = ls_wait_result(L);
        if (r == LS_WAKE_CLOSED || s->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT) {
            socket_destroy(s);
            return ls_pusherror(L, LS_ETIMEOUT, "connect timed out");
        }
    }
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        soerr = errno;
    if (soerr != 0) {
        socket_destroy(s);
        return ls_pusherror(L, ls_errno_token(soerr), strerror(soerr));
    }
    return 1;
}

static int start_connect(lua_State *L, ls_loop *loop, ls_socket *s, const struct sockaddr *sa,
                         socklen_t salen, double timeout);

/* connect(address, port [, opts]) -> socket | nil, err, detail
 * address must be numeric (IPv4/IPv6); luasmtp.connect resolves names.
 * opts: timeout (seconds), bind (local numeric address), pending (a
 * table: while the connect waits, pending.socket is the socket, so
 * another task can abandon the attempt with pending.socket:close(),
 * which makes this call return nil, "closed"). */
static int l_connect(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    luaL_argcheck(L, port > 0 && port < 65536, 2, "port out of range");
    double timeout = DEFAULT_TIMEOUT;
    const char *bindaddr = NULL;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "timeout");
        timeout = opt_timeout(L, -1, timeout);
        lua_getfield(L, 3, "bind");
        bindaddr = luaL_optstring(L, -1, NULL);
        lua_pop(L, 2);
    }
    struct sockaddr_storage ss;
    socklen_t sslen;
    if (parse_addr(host, (int)port, &ss, &sslen) < 0)
        return luaL_argerror(L, 1, "not a numeric IPv4 or IPv6 address");
    ls_loop *loop = ls_getloop(L);
    lua_settop(L, 3);
    ls_socket *s = new_socket(L, loop); /* index 4 */
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    attach_fd(s, fd);
    s->t_connect = timeout;
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    if (bindaddr) {
        struct sockaddr_storage bs;
        socklen_t blen;
        if (parse_addr(bindaddr, 0, &bs, &blen) < 0 ||
            bind(fd, (struct sockaddr *)&bs, blen) < 0) {
            int e = errno;
            socket_destroy(s);
            return ls_pusherror(L, LS_EIO, e ? strerror(e) : "bad bind address");
        }
    }
    return start_connect(L, loop, s, (struct sockaddr *)&ss, sslen, timeout);
}

/* Connect s (its userdata at index 4) to sa and wait for the result. */
static int start_connect(lua_State *L, ls_loop *loop, ls_socket *s, const struct sockaddr *sa,
                         socklen_t salen, double timeout)
{
    if (connect(s->fd, sa, salen) == 0)
        return 1;
    if (errno != EINPROGRESS) {
        int e = errno;
        socket_destroy(s);
        if (sa->sa_family == AF_UNIX && e == ENOENT) /* no socket file: nobody listens */
            return ls_pusherror(L, LS_EREFUSED, strerror(e));
        if (sa->sa_family == AF_UNIX && e == EAGAIN) /* its listen queue is full */
            return ls_pusherror(L, LS_EREFUSED, "the server's listen queue is full");
        return ls_pusherror(L, ls_errno_token(e), strerror(e));
    }
    if (lua_istable(L, 3) && lua_getfield(L, 3, "pending") == LUA_TTABLE) {
        lua_pushvalue(L, 4);
        lua_setfield(L, -2, "socket");
    }
    lua_settop(L, 4);
    ls_task *t = ls_current(L, loop);
    int r = ls_wait(L, loop, t, s->fd, EV_WRITE, deadline_of(loop, timeout), &s->writer, 0, connect_k);
    (void)r;
    return connect_k(L, LUA_YIELD, 0);
}

/* connect_unix(path [, opts]) -> socket | nil, err, detail
 * A UNIX-domain stream socket connected to path. opts: timeout (seconds).
 * A missing socket file or a full listen queue is "refused". */
static int l_connect_unix(lua_State *L)
{
    size_t n;
    const char *path = luaL_checklstring(L, 1, &n);
    double timeout = DEFAULT_TIMEOUT;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "timeout");
        timeout = opt_timeout(L, -1, timeout);
        lua_pop(L, 1);
    }
    struct sockaddr_un sun;
    socklen_t sunlen;
    if (unix_addr(path, n, &sun, &sunlen) < 0)
        return ls_pusherror(L, LS_EIO, "UNIX socket path empty or too long");
    ls_loop *loop = ls_getloop(L);
    lua_settop(L, 3);
    ls_socket *s = new_socket(L, loop); /* index 4 */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    attach_fd(s, fd);
    s->t_connect = timeout;
    return start_connect(L, loop, s, (struct sockaddr *)&sun, sunlen, timeout);
}

/* socketpair() -> sock1, sock2: a connected local pair (for tests). */
static int l_socketpair(lua_State *L)
{
    ls_loop *loop = ls_getloop(L);
    ls_socket *a = new_socket(L, loop);
    ls_socket *b = new_socket(L, loop);
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    attach_fd(a, fds[0]);
    attach_fd(b, fds[1]);
    return 2;
}

/* An inherited descriptor made non-blocking and close-on-exec; -1 with
 * errno set when fd is not an open socket of that kind. */
static int adopt_fd(lua_Integer fd, int want_listening)
{
    if (fd < 0 || fd > 65535) {
        errno = EBADF;
        return -1;
    }
    int type = 0, acc = 0;
    socklen_t len = sizeof type;
    if (getsockopt((int)fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return -1;
    len = sizeof acc;
    if (type != SOCK_STREAM || getsockopt((int)fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) < 0 ||
        !acc != !want_listening) {
        errno = EINVAL;
        return -1;
    }
    int fl = fcntl((int)fd, F_GETFL);
    if (fl < 0 || fcntl((int)fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        fcntl((int)fd, F_SETFD, FD_CLOEXEC) < 0)
        return -1;
    return (int)fd;
}

/* socket_fromfd(fd) -> socket | nil, err, detail: a connected stream
 * socket this process inherited (e.g. a supervisor channel). */
static int l_socket_fromfd(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    ls_socket *s = new_socket(L, ls_getloop(L));
    int fd = adopt_fd(n, 0);
    if (fd < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    attach_fd(s, fd);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Listening */

static void listener_destroy(ls_listener *l)
{
    if (l->fd < 0)
        return;
    ls_fd_closing(l->loop, l->fd);
    close(l->fd);
    l->fd = -1;
    ls_live[LS_COUNT_LISTENERS]--;
    if (l->unix_path) {
        /* only the file this listener made: not one another process put
         * there since */
        struct stat st;
        if (lstat(l->path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == l->dev &&
            st.st_ino == l->ino)
            unlink(l->path);
        l->unix_path = 0;
    }
    ls_wake_ref(l->loop, &l->acceptor, LS_WAKE_CLOSED);
}

static ls_listener *new_listener(lua_State *L)
{
    ls_listener *l = lua_newuserdatauv(L, sizeof *l, 0);
    memset(l, 0, sizeof *l);
    l->fd = -1;
    luaL_setmetatable(L, LISTENER_MT);
    l->loop = ls_getloop(L);
    return l;
}

/* listen(address, port [, opts]) -> listener | nil, err, detail
 * address numeric ("0.0.0.0", "::", "127.0.0.1", "[::1]"); port 0 picks
 * a free port (see listener:getsockname()). opts: backlog (default 511),
 * reuseport (SO_REUSEPORT: several sockets of one user share the port).
 * IPv6 listeners are IPv6-only so "::" and "0.0.0.0" can coexist. */
static int l_listen(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    luaL_argcheck(L, port >= 0 && port < 65536, 2, "port out of range");
    int backlog = 511, reuseport = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "backlog");
        backlog = (int)luaL_optinteger(L, -1, backlog);
        lua_getfield(L, 3, "reuseport");
        reuseport = lua_toboolean(L, -1);
        lua_pop(L, 2);
    }
    struct sockaddr_storage ss;
    socklen_t sslen;
    if (parse_addr(host, (int)port, &ss, &sslen) < 0)
        return luaL_argerror(L, 1, "not a numeric IPv4 or IPv6 address");
    ls_listener *l = new_listener(L);
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    l->fd = fd;
    ls_live[LS_COUNT_LISTENERS]++;
    int on = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on);
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) < 0) {
        int e = errno;
        listener_destroy(l);
        return ls_pusherror(L, ls_errno_token(e), strerror(e));
    }
    if (bind(fd, (struct sockaddr *)&ss, sslen) < 0 || listen(fd, backlog) < 0) {
        int e = errno;
        listener_destroy(l);
        return ls_pusherror(L, e == EADDRINUSE ? LS_EIO : ls_errno_token(e), strerror(e));
    }
    return 1;
}

/* listen_fromfd(fd) -> listener | nil, err, detail: a listening socket
 * this process inherited (from a supervisor; like systemd's socket
 * activation). Closing it never removes a UNIX socket file. */
static int l_listen_fromfd(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    ls_listener *l = new_listener(L);
    int fd = adopt_fd(n, 1);
    if (fd < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    l->fd = fd;
    ls_live[LS_COUNT_LISTENERS]++;
    return 1;
}

/* A uid or gid from opts[field]: a number, or a user or group name.
 * Returns 0 and sets *id, 1 when the field is absent, -1 when unknown. */
static int opt_owner(lua_State *L, int opts, const char *field, int group, unsigned *id)
{
    int rc = 1;
    lua_getfield(L, opts, field);
    if (lua_isinteger(L, -1)) {
        lua_Integer v = lua_tointeger(L, -1);
        luaL_argcheck(L, v >= 0 && v < 0x7fffffff, opts, "uid or gid out of range");
        *id = (unsigned)v;
        rc = 0;
    } else if (lua_type(L, -1) == LUA_TSTRING) {
        /* at start-up only: NSS may block */
        char buf[16384];
        const char *name = lua_tostring(L, -1);
        rc = -1;
        if (group) {
            struct group gr, *res = NULL;
            if (getgrnam_r(name, &gr, buf, sizeof buf, &res) == 0 && res) {
                *id = (unsigned)gr.gr_gid;
                rc = 0;
            }
        } else {
            struct passwd pw, *res = NULL;
            if (getpwnam_r(name, &pw, buf, sizeof buf, &res) == 0 && res) {
                *id = (unsigned)pw.pw_uid;
                rc = 0;
            }
        }
    } else if (!lua_isnil(L, -1)) {
        luaL_argerror(L, opts, "owner and group must be names or numbers");
    }
    lua_pop(L, 1);
    return rc;
}

/* What is at a UNIX socket path that bind found in use. */
enum unix_existing { UNIX_STALE, UNIX_LIVE, UNIX_NOT_SOCKET };

/* A socket file nothing accepts on (a connect is refused) was left by a
 * process that is gone: UNIX_STALE. */
static enum unix_existing unix_existing(const struct sockaddr_un *sun, socklen_t len)
{
    struct stat st;
    if (lstat(sun->sun_path, &st) < 0 || !S_ISSOCK(st.st_mode))
        return UNIX_NOT_SOCKET;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return UNIX_LIVE;
    int stale = connect(fd, (const struct sockaddr *)sun, len) < 0 && errno == ECONNREFUSED;
    close(fd);
    return stale ? UNIX_STALE : UNIX_LIVE;
}

static int listen_unix_fail(lua_State *L, ls_listener *l, const char *token, const char *why,
                            const char *path)
{
    listener_destroy(l);
    lua_pushnil(L);
    lua_pushstring(L, token);
    lua_pushfstring(L, "%s: %s", path, why);
    return 3;
}

/* listen_unix(path [, opts]) -> listener | nil, err, detail
 * A UNIX-domain stream listener. The socket file is made with mode 0600
 * (no window with wider permissions), then given opts.owner / opts.group
 * (names or numbers) and opts.mode (an integer such as tonumber("660", 8)).
 * A socket file left by a process that is gone (connect refused) is
 * replaced; one that something accepts on, or a file that is not a
 * socket, is an error. The file is removed when the listener closes.
 * opts: backlog (default 511), mode, owner, group. */
static int l_listen_unix(lua_State *L)
{
    size_t n;
    const char *path = luaL_checklstring(L, 1, &n);
    int backlog = 511, mode = -1;
    unsigned uid = (unsigned)-1, gid = (unsigned)-1;
    int has_uid = 1, has_gid = 1;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "backlog");
        backlog = (int)luaL_optinteger(L, -1, backlog);
        lua_getfield(L, 2, "mode");
        if (!lua_isnil(L, -1)) {
            lua_Integer m = luaL_checkinteger(L, -1);
            luaL_argcheck(L, m >= 0 && m <= 0777, 2, "mode must be within 0 and 0777 (octal)");
            mode = (int)m;
        }
        lua_pop(L, 2);
        has_uid = opt_owner(L, 2, "owner", 0, &uid);
        has_gid = opt_owner(L, 2, "group", 1, &gid);
        if (has_uid < 0)
            return ls_pusherror(L, LS_EIO, "unknown owner");
        if (has_gid < 0)
            return ls_pusherror(L, LS_EIO, "unknown group");
    }
    struct sockaddr_un sun;
    socklen_t sunlen;
    if (unix_addr(path, n, &sun, &sunlen) < 0)
        return ls_pusherror(L, LS_EIO, "UNIX socket path empty or too long");
    lua_settop(L, 2);
    ls_listener *l = new_listener(L);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ls_pusherror(L, ls_errno_token(errno), strerror(errno));
    l->fd = fd;
    ls_live[LS_COUNT_LISTENERS]++;
    int rc, e = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        mode_t old = umask(0177);
        rc = bind(fd, (struct sockaddr *)&sun, sunlen);
        e = errno;
        umask(old);
        if (rc == 0 || e != EADDRINUSE || attempt > 0)
            break;
        enum unix_existing what = unix_existing(&sun, sunlen);
        if (what == UNIX_LIVE)
            return listen_unix_fail(L, l, LS_EIO, "in use: another listener accepts on it", path);
        if (what == UNIX_NOT_SOCKET)
            return listen_unix_fail(L, l, LS_EIO, "exists and is not a socket", path);
        unlink(sun.sun_path); /* stale: left by a process that is gone */
    }
    if (rc < 0)
        return listen_unix_fail(L, l, ls_errno_token(e), strerror(e), path);
    struct stat st;
    if (lstat(sun.sun_path, &st) < 0)
        return listen_unix_fail(L, l, LS_EIO, strerror(errno), path);
    memcpy(l->path, sun.sun_path, n + 1);
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    l->unix_path = 1; /* from here on, closing removes it */
    if ((has_uid == 0 || has_gid == 0) && chown(l->path, uid, gid) < 0)
        return listen_unix_fail(L, l, LS_EIO, strerror(errno), path);
    if (mode >= 0 && chmod(l->path, (mode_t)mode) < 0)
        return listen_unix_fail(L, l, LS_EIO, strerror(errno), path);
    if (listen(fd, backlog) < 0)
        return listen_unix_fail(L, l, ls_errno_token(errno), strerror(errno), path);
    return 1;
}

static int accept_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)ctx;
    ls_listener *l = lua_touserdata(L, 1);
    if (status == LUA_YIELD) {
        ls_waitref_clear(&l->acceptor);
        int r = ls_wait_result(L);
        if (r == LS_WAKE_CLOSED || l->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT)
            return ls_pusherror(L, LS_ETIMEOUT, NULL);
    }
    for (;;) {
        if (l->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            ls_socket *s = new_socket(L, l->loop);
            attach_fd(s, fd);
            int on = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
            return 1;
        }
        int e = errno;
        if (e == EINTR || e == ECONNABORTED)
            continue;
        if (e != EAGAIN && e != EWOULDBLOCK)
            return ls_pusherror(L, ls_errno_token(e), strerror(e));
        ls_task *t = ls_current(L, l->loop);
        double deadline = lua_isnil(L, 2) ? -1 : deadline_of(l->loop, lua_tonumber(L, 2));
        int r = ls_wait(L, l->loop, t, l->fd, EV_READ, deadline, &l->acceptor, 0, accept_k);
        ls_waitref_clear(&l->acceptor);
        if (r == LS_WAKE_CLOSED || l->fd < 0)
            return ls_pusherror(L, LS_ECLOSED, NULL);
        if (r == LS_WAKE_TIMEOUT)
            return ls_pusherror(L, LS_ETIMEOUT, NULL);
    }
}

/* listener:accept([timeout]) -> socket | nil, err, detail
 * Waits for a connection (no timeout by default). When the process runs
 * out of descriptors the error is "io" with the reason; the caller should
 * pause before trying again. */
static int l_accept(lua_State *L)
{
    ls_listener *l = check_listener(L, 1);
    if (!lua_isnoneornil(L, 2))
        opt_timeout(L, 2, 0);
    lua_settop(L, 2);
    if (l->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    if (ls_waitref_busy(&l->acceptor))
        return luaL_error(L, "luasmtp: listener busy: another task is accepting");
    return accept_k(L, LUA_OK, 0);
}

static int l_listener_close(lua_State *L)
{
    listener_destroy(check_listener(L, 1));
    lua_pushboolean(L, 1);
    return 1;
}

static int l_listener_gc(lua_State *L)
{
    listener_destroy(lua_touserdata(L, 1));
    return 0;
}

static int l_listener_getsockname(lua_State *L)
{
    ls_listener *l = check_listener(L, 1);
    if (l->fd < 0)
        return ls_pusherror(L, LS_ECLOSED, NULL);
    return push_name(L, l->fd, 0);
}

static int l_listener_getfd(lua_State *L)
{
    lua_pushinteger(L, check_listener(L, 1)->fd);
    return 1;
}

static int l_listener_tostring(lua_State *L)
{
    ls_listener *l = check_listener(L, 1);
    lua_pushfstring(L, "luasmtp.listener (%s)", l->fd < 0 ? "closed" : "open");
    return 1;
}

/* ------------------------------------------------------------------ */

int ls_open_socket(lua_State *L)
{
    static const luaL_Reg sock_methods[] = {
        {"receiveline", l_receiveline},
        {"receive", l_receive},
        {"receiveuntil", l_receiveuntil},
        {"receiveany", l_receiveany},
        {"buffered", l_buffered},
        {"receivebody", l_receivebody},
        {"receivechunk", l_receivechunk},
        {"send", l_send},
        {"flush", l_flush},
        {"shutdown", l_shutdown},
        {"close", l_sock_close},
        {"settimeouts", l_settimeouts},
        {"settimeout", l_settimeout},
        {"gettimeouts", l_gettimeouts},
        {"setoption", l_setoption},
        {"getpeername", l_getpeername},
        {"getsockname", l_getsockname},
        {"getfd", l_getfd},
        {"peercred", l_peercred},
        {"starttls", l_starttls},
        {"tlsinfo", l_tlsinfo},
        {"channel_binding", l_channel_binding},
        {"istls", l_istls},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, SOCKET_MT)) {
        luaL_newlib(L, sock_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_sock_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_sock_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, l_sock_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    static const luaL_Reg listener_methods[] = {
        {"accept", l_accept},
        {"close", l_listener_close},
        {"getsockname", l_listener_getsockname},
        {"getfd", l_listener_getfd},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, LISTENER_MT)) {
        luaL_newlib(L, listener_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_listener_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_listener_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, l_listener_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    static const luaL_Reg funcs[] = {
        {"connect", l_connect},
        {"connect_unix", l_connect_unix},
        {"listen", l_listen},
        {"listen_unix", l_listen_unix},
        {"socketpair", l_socketpair},
        {"socket_fromfd", l_socket_fromfd},
        {"listen_fromfd", l_listen_fromfd},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
