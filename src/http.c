/*
 * http.c - an HTTP(S) client: libcurl's multi interface on the libev loop.
 *
 * One CURLM per loop (per Lua state), created on first use and kept in a
 * registry userdata whose __gc ends every request still open. libcurl
 * says through CURLMOPT_SOCKETFUNCTION which sockets to watch (each gets
 * an ev_io, attached to curl's socket with curl_multi_assign) and through
 * CURLMOPT_TIMERFUNCTION when to call it back (one ev_timer). These are
 * weak watchers (loop.c): the deadline timer of the waiting task is what
 * keeps the loop alive.
 *
 * A request is a malloc'ed http_req owning its easy handle. The libev
 * callbacks (curl_multi_socket_action, then curl_multi_info_read) never
 * call Lua: a finished transfer is taken out of the multi handle, marked
 * done and its task woken. The task's continuation turns the result into
 * Lua values and frees the request. libcurl enforces the total timeout
 * itself (CURLOPT_TIMEOUT_MS); the task also waits with a deadline a
 * little later, as a safety net: should it pass first, the continuation
 * removes the transfer from the multi handle and frees it on the spot,
 * so a request never outlives the wait that owns it.
 *
 * Limits: the body is capped at max_size (CURLOPT_MAXFILESIZE_LARGE for
 * an announced length, the write callback for the rest), the response
 * header block at MAX_HEADER_BYTES; protocols are http and https only,
 * for redirects too; redirects are not followed unless asked for, and
 * then at most MAX_REDIRECTS_CAP of them; TLS 1.2 minimum, peer and host
 * name verified unless verify = false; the environment's proxy variables
 * are ignored.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "luasmtp.h"

#define HTTP_KEY "luasmtp.http"        /* registry: the loop's multi handle */
#define HTTP_MT "luasmtp.http.multi"
#define WHO "http.request" /* in messages about options */

#define DEFAULT_TIMEOUT 30.0
#define MAX_TIMEOUT 86400.0
#define DEFAULT_MAX_SIZE (1024 * 1024)
#define MAX_HEADER_BYTES (64 * 1024)   /* one response's header block */
#define DEFAULT_REDIRECTS 5            /* follow_redirects = true */
#define MAX_REDIRECTS_CAP 20
#define MAX_URL 8192
#define MAX_RESOLVE 16                 /* resolve overrides per request */
#define DEADLINE_SLACK 1.0             /* task deadline after curl's own */

/* ------------------------------------------------------------------ */
/* Types */

typedef struct http_multi http_multi;
typedef struct http_req http_req;

typedef struct http_sock {
    ev_io io;
    http_multi *m;
} http_sock;

struct http_multi {
    CURLM *multi;  /* NULL once destroyed */
    ls_loop *loop;
    ev_timer timer;
    http_req *reqs; /* every request not yet freed */
};

struct http_req {
    http_req *next, *prev;
    http_multi *m;
    ls_loop *loop;
    ls_task *task;
    ls_waitref wait;    /* its wait for the transfer */
    CURL *easy;
    int added;          /* in the multi handle */
    int done;           /* the transfer ended: result is set */
    CURLcode result;
    int body_over;      /* the body passed max_size */
    int head_over;      /* the header block passed MAX_HEADER_BYTES */
    curl_off_t max_size;
    double timeout;
    ls_buf body;
    ls_buf head;        /* header lines of the last response */
    struct curl_slist *headers, *connect_to;
    char errbuf[CURL_ERROR_SIZE];
};

/* ------------------------------------------------------------------ */
/* Library initialisation: once per process. */

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static CURLcode lib_status = CURLE_FAILED_INIT;

static void lib_init(void) { lib_status = curl_global_init(CURL_GLOBAL_DEFAULT); }

/* ------------------------------------------------------------------ */
/* libev integration (weak watchers: see ls_weak_io_start). */

/* Take finished transfers out of the multi handle and wake their tasks.
 * Called after every curl_multi_socket_action(). Never calls Lua. */
static void collect_done(http_multi *m)
{
    CURLMsg *msg;
    int left;
    while (m->multi != NULL && (msg = curl_multi_info_read(m->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result; /* msg is invalid after the removal */
        char *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        http_req *req = (http_req *)(void *)priv;
        curl_multi_remove_handle(m->multi, easy);
        if (req == NULL)
            continue;
        req->added = 0;
        req->result = rc;
        req->done = 1;
        ls_wake_ref(req->loop, &req->wait, LS_WAKE_READY);
    }
}

static void sock_io_cb(struct ev_loop *ev, ev_io *w, int revents)
{
    (void)ev;
    http_sock *s = (http_sock *)((char *)w - offsetof(http_sock, io));
    http_multi *m = s->m;
    if (m->multi == NULL)
        return;
    int flags = ((revents & EV_READ) ? CURL_CSELECT_IN : 0) |
                ((revents & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    int running;
    /* s may be freed inside: curl closes sockets as it goes. */
    curl_multi_socket_action(m->multi, w->fd, flags, &running);
    collect_done(m);
}

static void timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)ev;
    (void)revents;
    http_multi *m = (http_multi *)((char *)w - offsetof(http_multi, timer));
    ls_weak_timer_fired(m->loop);
    if (m->multi == NULL)
        return;
    int running;
    curl_multi_socket_action(m->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    collect_done(m);
}

/* CURLMOPT_SOCKETFUNCTION: start, change or stop watching a socket. */
static int socket_fn(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)easy;
    http_multi *m = userp;
    http_sock *s = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            ls_weak_io_stop(m->loop, &s->io);
            free(s);
        }
        return 0;
    }
    int events = ((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL)
            return -1; /* curl fails the transfer */
        s->m = m;
        ev_io_init(&s->io, sock_io_cb, fd, events);
        if (curl_multi_assign(m->multi, fd, s) != CURLM_OK) {
            free(s);
            return -1;
        }
    } else {
        ls_weak_io_stop(m->loop, &s->io);
        ev_io_set(&s->io, fd, events);
    }
    if (events != 0)
        ls_weak_io_start(m->loop, &s->io);
    return 0;
}

/* CURLMOPT_TIMERFUNCTION: call curl back after timeout_ms (-1: never).
 * libcurl must not be called from here: the timer fires from the loop. */
static int timer_fn(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    http_multi *m = userp;
    if (timeout_ms < 0)
        ls_weak_timer_stop(m->loop, &m->timer);
    else
        ls_weak_timer_start(m->loop, &m->timer, (double)timeout_ms / 1000.);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Requests */

static void req_link(http_multi *m, http_req *req)
{
    req->m = m;
    req->prev = NULL;
    req->next = m->reqs;
    if (m->reqs != NULL)
        m->reqs->prev = req;
    m->reqs = req;
}

/* Free a request in any state (in the multi handle or not). Never calls
 * Lua; curl may call socket_fn/timer_fn while removing the transfer. */
static void req_free(http_req *req)
{
    http_multi *m = req->m;
    if (req->easy != NULL) {
        if (req->added && m->multi != NULL)
            curl_multi_remove_handle(m->multi, req->easy);
        curl_easy_cleanup(req->easy);
    }
    curl_slist_free_all(req->headers);
    curl_slist_free_all(req->connect_to);
    ls_buf_free(&req->body);
    ls_buf_free(&req->head);
    if (req->prev != NULL)
        req->prev->next = req->next;
    else
        m->reqs = req->next;
    if (req->next != NULL)
        req->next->prev = req->prev;
    ls_live[LS_COUNT_HTTP_REQUESTS]--;
    free(req);
}

static void req_release(void *p) { req_free(p); }

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    http_req *req = userp;
    size_t n = size * nmemb; /* curl guarantees size == 1 */
    if ((curl_off_t)(req->body.len + n) > req->max_size) {
        req->body_over = 1;
        return 0; /* aborts with CURLE_WRITE_ERROR */
    }
    if (ls_buf_append(&req->body, data, n) < 0)
        return 0;
    return n;
}

/* One header line (with its CRLF) at a time, for every response of the
 * transfer (1xx, redirects): a status line starts a new header block. */
static size_t header_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    http_req *req = userp;
    size_t n = size * nmemb;
    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        ls_buf_consume(&req->head, req->head.len);
        return n;
    }
    if (req->head.len + n > MAX_HEADER_BYTES) {
        req->head_over = 1;
        return 0;
    }
    if (ls_buf_append(&req->head, data, n) < 0)
        return 0;
    return n;
}

/* ------------------------------------------------------------------ */
/* Multi handle */

static void multi_destroy(http_multi *m)
{
    if (m->multi == NULL)
        return;
    /* Lua state closing: the waiting tasks will never run again. */
    while (m->reqs != NULL)
        req_free(m->reqs);
    curl_multi_cleanup(m->multi); /* closes the cached connections */
    m->multi = NULL;
    ls_weak_timer_stop(m->loop, &m->timer);
}

static int multi_gc(lua_State *L)
{
    http_multi *m = luaL_checkudata(L, 1, HTTP_MT);
    multi_destroy(m);
    return 0;
}

/* The loop's multi handle, created on first use; NULL on failure. */
static http_multi *multi_get(lua_State *L, ls_loop *loop)
{
    lua_getfield(L, LUA_REGISTRYINDEX, HTTP_KEY);
    http_multi *m = luaL_testudata(L, -1, HTTP_MT);
    lua_pop(L, 1);
    if (m != NULL && m->multi != NULL)
        return m;
    pthread_once(&lib_once, lib_init);
    if (lib_status != CURLE_OK)
        return NULL;
    m = lua_newuserdatauv(L, sizeof *m, 0);
    memset(m, 0, sizeof *m);
    luaL_setmetatable(L, HTTP_MT);
    m->loop = loop;
    ev_init(&m->timer, timer_cb);
    m->multi = curl_multi_init();
    if (m->multi == NULL) {
        lua_pop(L, 1);
        return NULL;
    }
    curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, socket_fn);
    curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, m);
    curl_multi_setopt(m->multi, CURLMOPT_TIMERFUNCTION, timer_fn);
    curl_multi_setopt(m->multi, CURLMOPT_TIMERDATA, m);
    lua_setfield(L, LUA_REGISTRYINDEX, HTTP_KEY);
    return m;
}

/* ------------------------------------------------------------------ */
/* Results to Lua */

/* Map a failed transfer to a token of the closed set. */
static const char *error_token(const http_req *req)
{
    switch (req->result) {
    case CURLE_OPERATION_TIMEDOUT:
        return LS_ETIMEOUT;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return LS_EDNS;
    case CURLE_COULDNT_CONNECT: {
        long oserr = 0;
        curl_easy_getinfo(req->easy, CURLINFO_OS_ERRNO, &oserr);
        return oserr != 0 ? ls_errno_token((int)oserr) : LS_EUNREACH;
    }
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED:
        return LS_ETLS;
    case CURLE_FILESIZE_EXCEEDED:
    case CURLE_TOO_MANY_REDIRECTS:
        return LS_ELIMIT;
    case CURLE_WRITE_ERROR:
        return req->body_over || req->head_over ? LS_ELIMIT : LS_EIO;
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        return LS_ECLOSED;
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
        return LS_ERESET;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_BAD_CONTENT_ENCODING:
    case CURLE_RANGE_ERROR:
        return LS_EPROTOCOL;
    default:
        return LS_EIO;
    }
}

static int push_failure(lua_State *L, const http_req *req)
{
    const char *token = error_token(req);
    lua_pushnil(L);
    lua_pushstring(L, token);
    if (req->body_over || req->result == CURLE_FILESIZE_EXCEEDED)
        lua_pushfstring(L, "response body larger than max_size (%I bytes)",
                        (lua_Integer)req->max_size);
    else if (req->head_over)
        lua_pushfstring(L, "response header block larger than %d bytes", MAX_HEADER_BYTES);
    else if (req->errbuf[0] != '\0')
        lua_pushstring(L, req->errbuf);
    else
        lua_pushstring(L, curl_easy_strerror(req->result));
    return 3;
}

static int is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int is_ows(char c) { return c == ' ' || c == '\t'; }

/* Store the field whose name and value are on top of the stack into the
 * headers table at idx: t[name] joins repeated fields with ", ", the
 * array part lists every field as {name =, value =}. Pops both. */
static void store_field(lua_State *L, int idx)
{
    int name = lua_gettop(L) - 1, value = name + 1;
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, name);
    lua_setfield(L, -2, "name");
    lua_pushvalue(L, value);
    lua_setfield(L, -2, "value");
    lua_rawseti(L, idx, (lua_Integer)lua_rawlen(L, idx) + 1);
    lua_pushvalue(L, name);
    if (lua_rawget(L, idx) == LUA_TSTRING) {
        lua_pushliteral(L, ", ");
        lua_pushvalue(L, value);
        lua_concat(L, 3);
    } else {
        lua_pop(L, 1);
        lua_pushvalue(L, value);
    }
    lua_pushvalue(L, name);
    lua_insert(L, -2);
    lua_rawset(L, idx);
    lua_pop(L, 2);
}

/* Push the header table parsed from the raw block: names lowercased,
 * values without surrounding whitespace, obsolete line folding joined
 * with one space, lines that are not "name: value" skipped. */
static void push_headers(lua_State *L, const ls_buf *head)
{
    lua_newtable(L);
    int idx = lua_gettop(L);
    int pending = 0; /* a name and value are on the stack */
    if (head->len == 0)
        return;
    const char *p = ls_buf_head(head), *end = p + head->len;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *next = eol != NULL ? eol + 1 : end;
        const char *le = eol != NULL ? eol : end;
        if (le > p && le[-1] == '\r')
            le--;
        if (p == le) { /* the blank line ending the block */
            p = next;
            continue;
        }
        if (is_ows(*p)) { /* obs-fold: continues the previous value */
            const char *v = p, *ve = le;
            while (v < ve && is_ows(*v))
                v++;
            while (ve > v && is_ows(ve[-1]))
                ve--;
            if (pending && ve > v) {
                lua_pushliteral(L, " ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            }
            p = next;
            continue;
        }
        if (pending) {
            store_field(L, idx);
            pending = 0;
        }
        const char *colon = memchr(p, ':', (size_t)(le - p));
        const char *q = p;
        while (q < le && is_tchar((unsigned char)*q))
            q++;
        if (colon == NULL || q != colon || colon == p) {
            p = next;
            continue;
        }
        luaL_Buffer b;
        char *lower = luaL_buffinitsize(L, &b, (size_t)(colon - p));
        for (const char *c = p; c < colon; c++)
            lower[c - p] = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
        luaL_pushresultsize(&b, (size_t)(colon - p));
        const char *v = colon + 1, *ve = le;
        while (v < ve && is_ows(*v))
            v++;
        while (ve > v && is_ows(ve[-1]))
            ve--;
        lua_pushlstring(L, v, (size_t)(ve - v));
        pending = 1;
        p = next;
    }
    if (pending)
        store_field(L, idx);
}

/* Protected: push status, headers, body (or the failure) of a finished
 * request (arg 1). */
static int push_result(lua_State *L)
{
    const http_req *req = lua_touserdata(L, 1);
    if (req->result != CURLE_OK)
        return push_failure(L, req);
    long status = 0;
    curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
    lua_pushinteger(L, status);
    push_headers(L, &req->head);
    lua_pushlstring(L, req->body.len > 0 ? ls_buf_head(&req->body) : "", req->body.len);
    return 3;
}

static int req_finish(lua_State *L, http_req *req)
{
    return ls_push_release(L, push_result, req, req_release);
}

/* ------------------------------------------------------------------ */
/* Waiting */

static int req_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    http_req *req = (http_req *)ctx;
    if (req->done) /* an answer wins over a deadline that came with it */
        return req_finish(L, req);
    double timeout = req->timeout;
    req_free(req);
    lua_pushnil(L);
    lua_pushstring(L, LS_ETIMEOUT);
    lua_pushfstring(L, "HTTP request timed out after %f s", timeout);
    return 3;
}

static void req_abandon(lua_KContext ctx) { req_free((http_req *)ctx); }

static int req_wait(lua_State *L, http_req *req)
{
    double deadline = ls_now(req->loop) + req->timeout + DEADLINE_SLACK;
    return ls_wait_k(L, req->loop, req->task, deadline, &req->wait, (lua_KContext)req, req_k,
                     req_abandon);
}

/* ------------------------------------------------------------------ */
/* Options */

typedef struct req_opts {
    const char *method;
    const char *url;
    const char *body;
    size_t body_len;
    int has_body;
    double timeout;
    double connect_timeout;
    lua_Integer max_size;
    long redirects; /* 0: not followed */
    const char *cafile, *capath;
    int verify;
    int header_list; /* stack index of the "Name: value" lines */
    int resolve_list;/* stack index of the CONNECT_TO lines */
} req_opts;

/* Header values: visible characters, spaces and tabs (no CR, LF, NUL). */
static int valid_field_value(const char *v, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)v[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return 0;
    }
    return 1;
}

/* opts.headers {name = value}: push an array of "Name: value" lines. */
static void opt_headers(lua_State *L, req_opts *o)
{
    lua_newtable(L);
    o->header_list = lua_gettop(L);
    int seen_ct = 0, seen_expect = 0;
    lua_Integer n = 0;
    if (lua_getfield(L, 1, "headers") != LUA_TNIL) {
        if (!lua_istable(L, -1))
            luaL_error(L, "http.request: headers must be a table of name = value");
        int h = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, h) != 0) {
            size_t nlen, vlen;
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "http.request: header names must be strings");
            const char *name = lua_tolstring(L, -2, &nlen);
            if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
                luaL_error(L, "http.request: header %s: value must be a string", name);
            int ok = nlen > 0 && nlen <= 256;
            for (size_t i = 0; ok && i < nlen; i++)
                ok = is_tchar((unsigned char)name[i]);
            if (!ok)
                luaL_error(L, "http.request: invalid header name");
            lua_pushvalue(L, -1);
            const char *value = lua_tolstring(L, -1, &vlen);
            if (!valid_field_value(value, vlen) || vlen > 8192)
                luaL_error(L, "http.request: header %s: value contains a control character "
                              "or is too long", name);
            if (strcasecmp(name, "content-type") == 0)
                seen_ct = 1;
            if (strcasecmp(name, "expect") == 0)
                seen_expect = 1;
            /* curl sends "Name:" with an empty value as a removal, and
             * "Name;" as an empty header. */
            if (vlen == 0)
                lua_pushfstring(L, "%s;", name);
            else
                lua_pushfstring(L, "%s: %s", name, value);
            lua_rawseti(L, o->header_list, ++n);
            lua_pop(L, 2);
        }
        if (n > 100)
            luaL_error(L, "http.request: too many headers");
    }
    lua_pop(L, 1);
    /* No curl defaults behind the caller's back: no form content type
     * for a body, no "Expect: 100-continue" round trip. */
    if (!seen_ct) {
        lua_pushliteral(L, "Content-Type:");
        lua_rawseti(L, o->header_list, ++n);
    }
    if (!seen_expect) {
        lua_pushliteral(L, "Expect:");
        lua_rawseti(L, o->header_list, ++n);
    }
}

/* opts.resolve {"host:port:address", ...}: connect to address instead of
 * resolving host, for this request only (CURLOPT_CONNECT_TO, so the
 * multi handle's DNS cache is not touched). Pushes the CONNECT_TO lines. */
static void opt_resolve(lua_State *L, req_opts *o)
{
    lua_newtable(L);
    o->resolve_list = lua_gettop(L);
    if (lua_getfield(L, 1, "resolve") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    if (!lua_istable(L, -1))
        luaL_error(L, "http.request: resolve must be an array of \"host:port:address\"");
    int r = lua_gettop(L);
    lua_Integer n = (lua_Integer)lua_rawlen(L, r);
    if (n > MAX_RESOLVE)
        luaL_error(L, "http.request: at most %d resolve entries", MAX_RESOLVE);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, r, i);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        const char *c1 = s ? memchr(s, ':', len) : NULL;
        const char *c2 = c1 ? memchr(c1 + 1, ':', len - (size_t)(c1 + 1 - s)) : NULL;
        int ok = lua_type(L, -1) == LUA_TSTRING && len < 512 && strlen(s) == len && c1 != NULL &&
                 c2 != NULL && c1 > s && c2 > c1 + 1 && c2[1] != '\0' &&
                 valid_field_value(s, len) && strchr(s, ' ') == NULL && strchr(s, ',') == NULL;
        for (const char *d = c1 ? c1 + 1 : s; ok && d < c2; d++)
            ok = *d >= '0' && *d <= '9';
        if (!ok)
            luaL_error(L, "http.request: resolve entries must be \"host:port:address\"");
        /* host:port:address:port; an IPv6 address goes in brackets. */
        const char *addr = c2 + 1;
        int v6 = strchr(addr, ':') != NULL && addr[0] != '[';
        lua_pushlstring(L, s, (size_t)(c2 + 1 - s));
        lua_pushstring(L, v6 ? "[" : "");
        lua_pushstring(L, addr);
        lua_pushstring(L, v6 ? "]:" : ":");
        lua_pushlstring(L, c1 + 1, (size_t)(c2 - c1 - 1));
        lua_concat(L, 5);
        lua_rawseti(L, o->resolve_list, i);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void read_opts(lua_State *L, req_opts *o)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    memset(o, 0, sizeof *o);
    o->url = ls_opt_string(L, 1, WHO, "url", MAX_URL);
    if (o->url == NULL)
        luaL_error(L, "http.request: url is required");
    if (lua_getfield(L, 1, "body") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "http.request: body must be a string");
        o->body = lua_tolstring(L, -1, &o->body_len);
        o->has_body = 1;
    }
    lua_pop(L, 1);
    o->method = ls_opt_string(L, 1, WHO, "method", 16);
    if (o->method == NULL)
        o->method = o->has_body ? "POST" : "GET";
    for (const char *c = o->method; *c; c++)
        if (*c < 'A' || *c > 'Z')
            luaL_error(L, "http.request: method must be upper-case letters (\"GET\", \"POST\", ...)");
    o->timeout = ls_opt_seconds(L, 1, WHO, "timeout", DEFAULT_TIMEOUT, MAX_TIMEOUT);
    o->connect_timeout =
        ls_opt_seconds(L, 1, WHO, "connect_timeout", o->timeout, MAX_TIMEOUT);
    if (o->connect_timeout > o->timeout)
        o->connect_timeout = o->timeout;
    o->max_size = DEFAULT_MAX_SIZE;
    if (lua_getfield(L, 1, "max_size") != LUA_TNIL) {
        int ok;
        o->max_size = lua_tointegerx(L, -1, &ok);
        if (!ok || o->max_size < 0 || o->max_size > ((lua_Integer)1 << 40))
            luaL_error(L, "http.request: max_size must be an integer >= 0 (bytes)");
    }
    lua_pop(L, 1);
    switch (lua_getfield(L, 1, "follow_redirects")) {
    case LUA_TNIL:
        break;
    case LUA_TBOOLEAN:
        o->redirects = lua_toboolean(L, -1) ? DEFAULT_REDIRECTS : 0;
        break;
    default: {
        int ok;
        lua_Integer n = lua_tointegerx(L, -1, &ok);
        if (!ok || n < 0 || n > MAX_REDIRECTS_CAP)
            luaL_error(L, "http.request: follow_redirects must be a boolean or a count in "
                          "[0, %d]", MAX_REDIRECTS_CAP);
        o->redirects = (long)n;
    }
    }
    lua_pop(L, 1);
    o->cafile = ls_opt_string(L, 1, WHO, "cafile", 4096);
    o->capath = ls_opt_string(L, 1, WHO, "capath", 4096);
    o->verify = 1;
    if (lua_getfield(L, 1, "verify") != LUA_TNIL) {
        if (!lua_isboolean(L, -1))
            luaL_error(L, "http.request: verify must be a boolean");
        o->verify = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    opt_headers(L, o);
    opt_resolve(L, o);
}

/* Build a curl_slist from the array of strings at idx; 0 on ENOMEM. */
static int build_slist(lua_State *L, int idx, struct curl_slist **out)
{
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        struct curl_slist *l = curl_slist_append(*out, lua_tostring(L, -1));
        lua_pop(L, 1);
        if (l == NULL)
            return 0;
        *out = l;
    }
    return 1;
}

/* Set the easy options; CURLE_OK or the first failure. */
static CURLcode setup_easy(http_req *req, const req_opts *o)
{
    CURL *e = req->easy;
    CURLcode rc = CURLE_OK;
#define SET(opt, val)                                                                              \
    do {                                                                                           \
        if (rc == CURLE_OK)                                                                        \
            rc = curl_easy_setopt(e, opt, val);                                                    \
    } while (0)
    SET(CURLOPT_PRIVATE, (void *)req);
    SET(CURLOPT_ERRORBUFFER, req->errbuf);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_URL, o->url);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, o->redirects > 0 ? 1L : 0L);
    SET(CURLOPT_MAXREDIRS, o->redirects);
    SET(CURLOPT_TIMEOUT_MS, (long)ceil(o->timeout * 1000.));
    SET(CURLOPT_CONNECTTIMEOUT_MS, (long)ceil(o->connect_timeout * 1000.));
    SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)o->max_size);
    SET(CURLOPT_WRITEFUNCTION, write_cb);
    SET(CURLOPT_WRITEDATA, (void *)req);
    SET(CURLOPT_HEADERFUNCTION, header_cb);
    SET(CURLOPT_HEADERDATA, (void *)req);
    SET(CURLOPT_PROXY, "");
    SET(CURLOPT_USERAGENT, "luasmtp/" LS_VERSION);
    SET(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    SET(CURLOPT_SSL_VERIFYPEER, o->verify ? 1L : 0L);
    SET(CURLOPT_SSL_VERIFYHOST, o->verify ? 2L : 0L);
    if (o->cafile != NULL)
        SET(CURLOPT_CAINFO, o->cafile);
    if (o->capath != NULL)
        SET(CURLOPT_CAPATH, o->capath);
    if (req->headers != NULL)
        SET(CURLOPT_HTTPHEADER, req->headers);
    if (req->connect_to != NULL)
        SET(CURLOPT_CONNECT_TO, req->connect_to);
    if (strcmp(o->method, "HEAD") == 0) {
        SET(CURLOPT_NOBODY, 1L);
    } else {
        if (o->has_body) {
            SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
            SET(CURLOPT_COPYPOSTFIELDS, o->body);
        }
        if (strcmp(o->method, "POST") != 0 && (o->has_body || strcmp(o->method, "GET") != 0))
            SET(CURLOPT_CUSTOMREQUEST, o->method);
    }
#undef SET
    return rc;
}

/* ------------------------------------------------------------------ */
/* Lua API */

/* http_request{ method =, url =, headers =, body =, timeout =, connect_timeout =,
 *               max_size =, follow_redirects =, cafile =, capath =, verify =,
 *               resolve = }
 *   -> status, headers, body | nil, token, detail
 * [-1, +3, e]  Waits (yields the task; in the main chunk runs the loop).
 *   url               http:// or https:// (other schemes: nil, "protocol")
 *   method            "GET" (default; "POST" when a body is given), "HEAD", ...
 *   headers           {["Content-Type"] = "text/plain", ...}
 *   body              request body (string)
 *   timeout           whole request, seconds (30)
 *   connect_timeout   connection set-up, seconds (timeout)
 *   max_size          response body cap in bytes (1 MiB): nil, "limit"
 *   follow_redirects  false (default), true (at most 5) or a count
 *   cafile, capath    trust anchors (default: the system's)
 *   verify            false turns certificate checks off (tests only)
 *   resolve           {"host:port:address", ...}: connect there instead
 * headers in the result: h["content-type"] (lowercase names; repeated
 * fields joined with ", "), and h[i] = {name =, value =} for each field
 * in the order received.
 *   local status, h, body = luasmtp.http.request{ url = "https://example.org/" } */
static int l_http_request(lua_State *L)
{
    req_opts o;
    read_opts(L, &o);
    ls_loop *loop = ls_getloop(L);
    ls_task *t = ls_current(L, loop); /* raises where waiting is impossible */
    http_multi *m = multi_get(L, loop);
    if (m == NULL)
        return ls_pusherror(L, LS_EIO, "libcurl could not be initialised");
    /* Nothing below raises until the request is in the multi handle. */
    http_req *req = calloc(1, sizeof *req);
    if (req == NULL)
        return ls_pusherror(L, LS_EIO, "out of memory");
    ls_live[LS_COUNT_HTTP_REQUESTS]++;
    req_link(m, req);
    req->loop = loop;
    req->task = t;
    req->max_size = (curl_off_t)o.max_size;
    req->timeout = o.timeout;
    ls_buf_init(&req->body);
    ls_buf_init(&req->head);
    req->easy = curl_easy_init();
    if (req->easy == NULL || !build_slist(L, o.header_list, &req->headers) ||
        !build_slist(L, o.resolve_list, &req->connect_to)) {
        req_free(req);
        return ls_pusherror(L, LS_EIO, "out of memory");
    }
    CURLcode rc = setup_easy(req, &o);
    if (rc != CURLE_OK) {
        req_free(req);
        lua_pushnil(L);
        lua_pushstring(L, rc == CURLE_UNSUPPORTED_PROTOCOL ? LS_EPROTOCOL : LS_EIO);
        lua_pushstring(L, curl_easy_strerror(rc));
        return 3;
    }
    if (curl_multi_add_handle(m->multi, req->easy) != CURLM_OK) {
        req_free(req);
        return ls_pusherror(L, LS_EIO, "cannot start the HTTP transfer");
    }
    req->added = 1;
    return req_wait(L, req);
}

int ls_open_http(lua_State *L)
{
    if (luaL_newmetatable(L, HTTP_MT)) {
        lua_pushcfunction(L, multi_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    static const luaL_Reg funcs[] = {
        {"http_request", l_http_request},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
