/*
 * dns.c - the c-ares resolver on the libev loop.
 *
 * One c-ares channel per loop (per Lua state), created on first use and
 * kept in a registry userdata whose __gc destroys it. c-ares tells us
 * through its socket-state callback which sockets to watch: each gets an
 * ev_io; one ev_timer follows ares_timeout() and is re-armed after every
 * ares_process_fd(). These watchers are unref'd: they never keep the loop
 * alive by themselves (a waiting task's deadline timer does) and they are
 * not counted in ls_live[LS_COUNT_WATCHERS].
 *
 * A query is a malloc'ed dns_req owned by c-ares until its callback runs.
 * The callback (inside ares_process_fd, inside a libev callback) never
 * calls Lua: it stores the result in the request and wakes the task. The
 * task's continuation turns the result into Lua values and frees the
 * request. A task whose wait ends by timeout first marks the request
 * abandoned (req->task = NULL) before it returns: from then on the
 * callback frees the request and wakes nobody, so a late answer can never
 * wake a task that has moved on to another wait.
 *
 * Numeric hosts are answered at once, without c-ares.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include <ares.h>

#include "dnsmsg.h"
#include "luasmtp.h"

#define DNS_KEY "luasmtp.dns"          /* registry: the current channel */
#define DNS_RAW_KEY "luasmtp.dns.raw"  /* registry: the channel of query() */
#define DNS_MT "luasmtp.dns.channel"

#define DEFAULT_TIMEOUT 10.0
#define MAX_NAME 255                   /* longer names are refused */
#define EDNS_UDP_SIZE 1232             /* the DNS flag day 2020 value */
#define MAX_CNAME_HOPS 8               /* within one answer section */

/* From RFC 1035 (ares_nameser.h clashes with <arpa/nameser.h>). */
enum { QCLASS_IN = 1, QTYPE_MX = 15, QTYPE_TXT = 16 };

/* ------------------------------------------------------------------ */
/* Types */

typedef struct dns_chan dns_chan;

typedef struct dns_sock {
    ev_io io;
    int events;       /* EV_READ | EV_WRITE as c-ares asked */
    dns_chan *chan;
    struct dns_sock *next;
} dns_sock;

struct dns_chan {
    ares_channel channel; /* NULL once destroyed */
    ls_loop *loop;
    ev_timer timer;
    dns_sock *socks;      /* one ev_io per c-ares socket */
    int dying;            /* in __gc: free requests, wake nobody */
    int loopback;         /* every server is on a loopback address */
};

enum req_kind { REQ_ADDR, REQ_MX, REQ_TXT, REQ_RAW };

typedef struct dns_req {
    ls_loop *loop;
    ls_task *task;     /* the waiting task; NULL once abandoned */
    ls_waitref wait;   /* its wait for the answer */
    dns_chan *chan;
    int kind;
    int family;        /* REQ_ADDR: AF_UNSPEC, AF_INET or AF_INET6 */
    int localhost;     /* REQ_ADDR for "localhost": see lookup() */
    int issuing;       /* inside the ares_* call that starts the query */
    int done;          /* the callback ran; status and results are set */
    int status;        /* ares status */
    struct ares_addrinfo *ai;
    struct ares_mx_reply *mx;
    struct ares_txt_ext *txt;
    unsigned char *abuf; /* REQ_RAW: a copy of the reply */
    size_t alen;
    int qtype;           /* REQ_RAW */
    char name[];       /* the name asked for, for messages */
} dns_req;

/* ------------------------------------------------------------------ */
/* Library initialisation: once per process. */

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static int lib_status = ARES_ENOTINITIALIZED;

static void lib_init(void) { lib_status = ares_library_init(ARES_LIB_INIT_ALL); }

/* ------------------------------------------------------------------ */
/* libev integration: weak watchers (loop.c), so a pending c-ares query
 * alone does not keep the loop running; the waiting task's deadline is
 * what does. */

/* Follow ares_timeout(): the earliest moment c-ares must look at its
 * queries again (retries, timeouts). Call after every c-ares call. */
static void timer_rearm(dns_chan *c)
{
    ls_weak_timer_stop(c->loop, &c->timer);
    if (c->channel == NULL)
        return;
    struct timeval tv;
    if (ares_timeout(c->channel, NULL, &tv) == NULL)
        return; /* no query pending */
    double after = (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
    if (after < 0.001)
        after = 0.001; /* c-ares rounds to ms: do not spin on 0 */
    ls_weak_timer_start(c->loop, &c->timer, after);
}

static void timer_cb(struct ev_loop *ev, ev_timer *w, int revents)
{
    (void)revents;
    (void)ev;
    dns_chan *c = (dns_chan *)((char *)w - offsetof(dns_chan, timer));
    ls_weak_timer_fired(c->loop);
    if (c->channel == NULL)
        return;
    ares_process_fd(c->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    timer_rearm(c);
}

static void sock_io_cb(struct ev_loop *ev, ev_io *w, int revents)
{
    (void)ev;
    dns_sock *s = (dns_sock *)((char *)w - offsetof(dns_sock, io));
    dns_chan *c = s->chan;
    ares_socket_t fd = w->fd;
    if (c->channel == NULL)
        return;
    /* s may be freed inside: c-ares closes sockets as it goes. */
    ares_process_fd(c->channel, (revents & EV_READ) ? fd : ARES_SOCKET_BAD,
                    (revents & EV_WRITE) ? fd : ARES_SOCKET_BAD);
    timer_rearm(c);
}

/* c-ares: start, change or stop watching a socket. */
static void sock_state_cb(void *data, ares_socket_t fd, int readable, int writable)
{
    dns_chan *c = data;
    dns_sock **pp = &c->socks, *s;
    while ((s = *pp) != NULL && s->io.fd != fd)
        pp = &s->next;
    int events = (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0);
    if (events == 0) {
        if (s != NULL) {
            *pp = s->next;
            ls_weak_io_stop(c->loop, &s->io);
            free(s);
        }
        return;
    }
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL)
            return; /* the query then ends by c-ares' own timeout */
        s->chan = c;
        ev_io_init(&s->io, sock_io_cb, fd, events);
        s->next = c->socks;
        c->socks = s;
    } else if (s->events == events && ev_is_active(&s->io)) {
        return;
    } else {
        ls_weak_io_stop(c->loop, &s->io);
        ev_io_set(&s->io, fd, events);
    }
    s->events = events;
    ls_weak_io_start(c->loop, &s->io);
}

/* ------------------------------------------------------------------ */
/* Channel */

typedef struct chan_config {
    const char *servers; /* "ip:port,[ip6]:port" or NULL for resolv.conf */
    int timeout_ms;      /* per try; 0 = default */
    int tries;           /* 0 = default */
    int rotate;          /* -1 default, 0 no, 1 yes */
    int flags;           /* ARES_FLAG_* */
} chan_config;

/* 1 when every server of the channel is on 127.0.0.0/8 or ::1: only
 * then is the AD bit of its replies trusted by default (the path to
 * the validating resolver cannot be tampered with from outside). */
static int servers_loopback(ares_channel ch)
{
    struct ares_addr_port_node *list = NULL;
    if (ares_get_servers_ports(ch, &list) != ARES_SUCCESS)
        return 0;
    int all = list != NULL;
    for (const struct ares_addr_port_node *p = list; p != NULL; p = p->next) {
        if (p->family == AF_INET) {
            const unsigned char *a = (const unsigned char *)&p->addr.addr4;
            all = all && a[0] == 127;
        } else if (p->family == AF_INET6) {
            static const unsigned char lo6[16] = {[15] = 1};
            all = all && memcmp(&p->addr.addr6, lo6, 16) == 0;
        } else {
            all = 0;
        }
    }
    ares_free_data(list);
    return all;
}

static int chan_init(dns_chan *c, ls_loop *loop, const chan_config *cfg)
{
    pthread_once(&lib_once, lib_init);
    if (lib_status != ARES_SUCCESS)
        return lib_status;
    struct ares_options o;
    memset(&o, 0, sizeof o);
    int mask = ARES_OPT_SOCK_STATE_CB;
    o.sock_state_cb = sock_state_cb;
    o.sock_state_cb_data = c;
    if (cfg != NULL && cfg->timeout_ms > 0) {
        mask |= ARES_OPT_TIMEOUTMS;
        o.timeout = cfg->timeout_ms;
    }
    if (cfg != NULL && cfg->tries > 0) {
        mask |= ARES_OPT_TRIES;
        o.tries = cfg->tries;
    }
    if (cfg != NULL && cfg->rotate >= 0)
        mask |= cfg->rotate ? ARES_OPT_ROTATE : ARES_OPT_NOROTATE;
    if (cfg != NULL && cfg->flags != 0) {
        mask |= ARES_OPT_FLAGS;
        o.flags = cfg->flags;
    }
    c->loop = loop;
    ev_init(&c->timer, timer_cb);
    ares_channel ch = NULL;
    int st = ares_init_options(&ch, &o, mask);
    if (st != ARES_SUCCESS)
        return st;
    if (cfg != NULL && cfg->servers != NULL) {
        st = ares_set_servers_ports_csv(ch, cfg->servers);
        if (st != ARES_SUCCESS) {
            ares_destroy(ch);
            return st;
        }
    }
    c->channel = ch;
    c->loopback = servers_loopback(ch);
    return ARES_SUCCESS;
}

/* Destroy the channel (idempotent). Pending queries end with
 * ARES_EDESTRUCTION: when dying (__gc, the state is closing) their
 * requests are freed without waking anyone; otherwise their tasks are
 * woken with "resolver reconfigured". */
static void chan_destroy(dns_chan *c, int dying)
{
    if (c->channel == NULL)
        return;
    c->dying = dying;
    ares_destroy(c->channel); /* runs the callbacks, closes the sockets */
    c->channel = NULL;
    while (c->socks != NULL) { /* c-ares normally reported them closed */
        dns_sock *s = c->socks;
        c->socks = s->next;
        ls_weak_io_stop(c->loop, &s->io);
        free(s);
    }
    ls_weak_timer_stop(c->loop, &c->timer);
}

static int chan_gc(lua_State *L)
{
    dns_chan *c = luaL_checkudata(L, 1, DNS_MT);
    chan_destroy(c, 1);
    return 0;
}

/* Push a new zeroed channel userdata with its metatable (no channel yet). */
static dns_chan *chan_push(lua_State *L)
{
    dns_chan *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, DNS_MT);
    return c;
}

/* The loop's channel, created with system defaults on first use.
 * Returns NULL with *status set when c-ares cannot be initialised.
 * raw: the channel of query(), which has ARES_FLAG_NOCHECKRESP: a
 * SERVFAIL (what a validating resolver answers for a bogus signature)
 * or REFUSED reply reaches the callback as it is, instead of c-ares
 * quietly trying the next server. */
static dns_chan *chan_get(lua_State *L, ls_loop *loop, int *status, int raw)
{
    const char *key = raw ? DNS_RAW_KEY : DNS_KEY;
    lua_getfield(L, LUA_REGISTRYINDEX, key);
    dns_chan *c = luaL_testudata(L, -1, DNS_MT);
    lua_pop(L, 1);
    if (c != NULL && c->channel != NULL)
        return c;
    chan_config cfg = {NULL, 0, 0, -1, raw ? ARES_FLAG_NOCHECKRESP : 0};
    c = chan_push(L);
    *status = chan_init(c, loop, &cfg);
    if (*status != ARES_SUCCESS) {
        lua_pop(L, 1);
        return NULL;
    }
    lua_setfield(L, LUA_REGISTRYINDEX, key);
    return c;
}

/* ------------------------------------------------------------------ */
/* Requests */

static dns_req *req_new(ls_loop *loop, ls_task *t, dns_chan *c, int kind, const char *name,
                        size_t len)
{
    dns_req *req = malloc(sizeof *req + len + 1);
    if (req == NULL)
        return NULL;
    memset(req, 0, sizeof *req);
    req->loop = loop;
    req->task = t;
    req->chan = c;
    req->kind = kind;
    req->family = AF_UNSPEC;
    memcpy(req->name, name, len);
    req->name[len] = '\0';
    return req;
}

static void req_free(dns_req *req)
{
    if (req->ai != NULL)
        ares_freeaddrinfo(req->ai);
    if (req->mx != NULL)
        ares_free_data(req->mx);
    if (req->txt != NULL)
        ares_free_data(req->txt);
    free(req->abuf);
    free(req);
}

static void req_release(void *p) { req_free(p); }

/* Common end of the c-ares callbacks (results already stored). Never
 * calls Lua. */
static void req_complete(dns_req *req, int status)
{
    ls_live[LS_COUNT_DNS_QUERIES]--;
    if (req->task == NULL || req->chan->dying) {
        req_free(req); /* abandoned, or the Lua state is closing */
        return;
    }
    req->status = status;
    req->done = 1;
    if (!req->issuing) /* a synchronous answer: the issuer sees done */
        ls_wake_ref(req->loop, &req->wait, LS_WAKE_READY);
}

static void addr_cb(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    (void)timeouts;
    dns_req *req = arg;
    req->ai = res; /* freed with the request */
    req_complete(req, status);
}

static void mx_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    (void)timeouts;
    dns_req *req = arg;
    if (status == ARES_SUCCESS && req->task != NULL)
        status = ares_parse_mx_reply(abuf, alen, &req->mx);
    req_complete(req, status);
}

static void txt_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    (void)timeouts;
    dns_req *req = arg;
    if (status == ARES_SUCCESS && req->task != NULL)
        status = ares_parse_txt_reply_ext(abuf, alen, &req->txt);
    req_complete(req, status);
}

static void raw_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    (void)timeouts;
    dns_req *req = arg;
    if (status == ARES_SUCCESS && req->task != NULL) {
        /* abuf lives only during the callback: keep a copy. */
        if (abuf == NULL || alen <= 0) {
            status = ARES_EBADRESP;
        } else if ((req->abuf = malloc((size_t)alen)) == NULL) {
            status = ARES_ENOMEM;
        } else {
            memcpy(req->abuf, abuf, (size_t)alen);
            req->alen = (size_t)alen;
        }
    }
    req_complete(req, status);
}

/* ------------------------------------------------------------------ */
/* Results to Lua */

static int push_dns_error(lua_State *L, const char *name, int status)
{
    if (status == ARES_EDESTRUCTION)
        return ls_pusherror(L, LS_EDNS, "resolver reconfigured");
    lua_pushnil(L);
    lua_pushstring(L, LS_EDNS);
    lua_pushfstring(L, "%s: %s", name, ares_strerror(status));
    return 3;
}

/* Push {family=, address=} for a binary address. */
static void push_address(lua_State *L, int family, const void *addr)
{
    char buf[INET6_ADDRSTRLEN];
    inet_ntop(family, addr, buf, sizeof buf);
    lua_createtable(L, 0, 2);
    lua_pushstring(L, family == AF_INET ? "inet" : "inet6");
    lua_setfield(L, -2, "family");
    lua_pushstring(L, buf);
    lua_setfield(L, -2, "address");
}

static void push_addrinfo(lua_State *L, const dns_req *req)
{
    lua_newtable(L);
    int list = lua_gettop(L);
    lua_newtable(L); /* addresses seen, for de-duplication */
    int seen = list + 1;
    lua_Integer n = 0;
    for (const struct ares_addrinfo_node *p = req->ai ? req->ai->nodes : NULL; p != NULL;
         p = p->ai_next) {
        const void *addr;
        if (p->ai_family == AF_INET && p->ai_addr != NULL &&
            (size_t)p->ai_addrlen >= sizeof(struct sockaddr_in))
            addr = &((const struct sockaddr_in *)(const void *)p->ai_addr)->sin_addr;
        else if (p->ai_family == AF_INET6 && p->ai_addr != NULL &&
                 (size_t)p->ai_addrlen >= sizeof(struct sockaddr_in6))
            addr = &((const struct sockaddr_in6 *)(const void *)p->ai_addr)->sin6_addr;
        else
            continue;
        if (req->family != AF_UNSPEC && p->ai_family != req->family)
            continue;
        push_address(L, p->ai_family, addr);
        lua_getfield(L, -1, "address");
        if (lua_rawget(L, seen) != LUA_TNIL) {
            lua_pop(L, 2); /* duplicate */
            continue;
        }
        lua_pop(L, 1);
        lua_getfield(L, -1, "address");
        lua_pushboolean(L, 1);
        lua_rawset(L, seen);
        lua_rawseti(L, list, ++n);
    }
    lua_settop(L, list);
    if (n == 0 && req->localhost && req->family != AF_UNSPEC) {
        /* RFC 6761: localhost is the loopback address of each family. */
        static const unsigned char v4[4] = {127, 0, 0, 1};
        static const unsigned char v6[16] = {[15] = 1};
        push_address(L, req->family, req->family == AF_INET ? (const void *)v4 : v6);
        lua_rawseti(L, list, 1);
    }
}

typedef struct mx_item {
    const struct ares_mx_reply *mx;
    size_t index;
} mx_item;

static int mx_cmp(const void *a, const void *b)
{
    const mx_item *x = a, *y = b;
    if (x->mx->priority != y->mx->priority)
        return x->mx->priority < y->mx->priority ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index; /* stable */
}

static void push_mx(lua_State *L, const dns_req *req)
{
    size_t n = 0;
    for (const struct ares_mx_reply *p = req->mx; p != NULL; p = p->next)
        n++;
    lua_createtable(L, n > (size_t)INT_MAX ? 0 : (int)n, 0);
    if (n == 0)
        return;
    /* A Lua-owned scratch array: freed by the GC even if Lua raises. */
    mx_item *items = lua_newuserdatauv(L, n * sizeof *items, 0);
    size_t i = 0;
    for (const struct ares_mx_reply *p = req->mx; p != NULL; p = p->next, i++) {
        items[i].mx = p;
        items[i].index = i;
    }
    qsort(items, n, sizeof *items, mx_cmp);
    for (i = 0; i < n; i++) {
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, items[i].mx->priority);
        lua_setfield(L, -2, "preference");
        lua_pushstring(L, items[i].mx->host != NULL ? items[i].mx->host : "");
        lua_setfield(L, -2, "exchange");
        lua_rawseti(L, -3, (lua_Integer)i + 1);
    }
    lua_pop(L, 1); /* scratch */
}

static void push_txt(lua_State *L, const dns_req *req)
{
    lua_newtable(L);
    int list = lua_gettop(L);
    lua_Integer n = 0;
    const struct ares_txt_ext *p = req->txt;
    while (p != NULL) {
        /* One RR: its first string and the ones that continue it. */
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        do {
            luaL_addlstring(&b, (const char *)p->txt, p->length);
            p = p->next;
        } while (p != NULL && !p->record_start);
        luaL_pushresult(&b);
        lua_rawseti(L, list, ++n);
    }
}

/* ------------------------------------------------------------------ */
/* query(): raw replies */

static const struct {
    const char *name;
    int type;
} qtypes[] = {
    {"A", DNS_T_A},       {"AAAA", DNS_T_AAAA}, {"MX", DNS_T_MX},
    {"CNAME", DNS_T_CNAME}, {"TXT", DNS_T_TXT}, {"TLSA", DNS_T_TLSA},
    {"PTR", DNS_T_PTR},
};

static const char *qtype_name(int type)
{
    for (size_t i = 0; i < sizeof qtypes / sizeof qtypes[0]; i++)
        if (qtypes[i].type == type)
            return qtypes[i].name;
    return "?";
}

static const char *rcode_name(int rcode)
{
    switch (rcode) {
    case DNS_RCODE_FORMERR: return "FORMERR";
    case DNS_RCODE_SERVFAIL: return "SERVFAIL";
    case DNS_RCODE_NOTIMP: return "NOTIMP";
    case DNS_RCODE_REFUSED: return "REFUSED";
    default: return NULL;
    }
}

static int raw_error(lua_State *L, const dns_req *req, const char *what)
{
    lua_pushnil(L);
    lua_pushstring(L, LS_EDNS);
    lua_pushfstring(L, "%s %s: %s", req->name, qtype_name(req->qtype), what);
    return 3;
}

static void txt_piece(void *arg, const unsigned char *s, size_t n)
{
    luaL_addlstring((luaL_Buffer *)arg, (const char *)s, n);
}

/* [-0, +1, m] The Lua value of one answer record; 0 when malformed. */
static int push_answer(lua_State *L, const dnsmsg *m, const dnsmsg_rr *rr)
{
    char name[DNSMSG_NAME_MAX];
    char addr[INET6_ADDRSTRLEN];
    unsigned pref, usage, selector, mtype;
    const unsigned char *data;
    size_t dlen;
    switch (rr->type) {
    case DNS_T_A:
    case DNS_T_AAAA: {
        int family = rr->type == DNS_T_A ? AF_INET : AF_INET6;
        if (rr->rdlen != (family == AF_INET ? 4u : 16u)
            || inet_ntop(family, m->buf + rr->rdata, addr, sizeof addr) == NULL)
            return 0;
        lua_pushstring(L, addr);
        return 1;
    }
    case DNS_T_CNAME:
    case DNS_T_PTR:
        if (dnsmsg_rd_name(m, rr, name) != 0)
            return 0;
        lua_pushstring(L, name);
        return 1;
    case DNS_T_MX:
        if (dnsmsg_rd_mx(m, rr, &pref, name) != 0)
            return 0;
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, pref);
        lua_setfield(L, -2, "preference");
        lua_pushstring(L, name);
        lua_setfield(L, -2, "exchange");
        return 1;
    case DNS_T_TXT: {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        if (dnsmsg_rd_txt(m, rr, txt_piece, &b) != 0) {
            luaL_pushresult(&b);
            lua_pop(L, 1);
            return 0;
        }
        luaL_pushresult(&b);
        return 1;
    }
    case DNS_T_TLSA:
        if (dnsmsg_rd_tlsa(m, rr, &usage, &selector, &mtype, &data, &dlen) != 0)
            return 0;
        lua_createtable(L, 0, 4);
        lua_pushinteger(L, usage);
        lua_setfield(L, -2, "usage");
        lua_pushinteger(L, selector);
        lua_setfield(L, -2, "selector");
        lua_pushinteger(L, mtype);
        lua_setfield(L, -2, "mtype");
        lua_pushlstring(L, (const char *)data, dlen);
        lua_setfield(L, -2, "data");
        return 1;
    default:
        return 0;
    }
}

static uint32_t min_ttl(uint32_t a, uint32_t b) { return a < b ? a : b; }

/* Build the result of a raw query: see l_dns_query. */
static int push_raw(lua_State *L, const dns_req *req)
{
    dnsmsg m;
    dnsmsg_rr rr;
    if (dnsmsg_open(&m, req->abuf, req->alen) != 0 || !m.qr || m.opcode != 0)
        return raw_error(L, req, "malformed reply");
    const char *failure = rcode_name(m.rcode);
    if (failure != NULL)
        return raw_error(L, req, lua_pushfstring(L, "the server answered %s%s", failure,
                                                 m.rcode == DNS_RCODE_SERVFAIL
                                                     ? " (bogus DNSSEC data or an unreachable zone)"
                                                     : ""));
    if (m.rcode != DNS_RCODE_NOERROR && m.rcode != DNS_RCODE_NXDOMAIN)
        return raw_error(L, req, lua_pushfstring(L, "the server answered rcode %d", m.rcode));
    if (m.tc)
        return raw_error(L, req, "truncated reply");

    /* Follow the CNAME chain of the name asked within the answer
     * section (unless CNAME is what was asked). */
    char target[DNSMSG_NAME_MAX];
    size_t tlen = strlen(req->name);
    memcpy(target, req->name, tlen + 1);
    uint32_t ttl = UINT32_MAX;
    int aliased = 0;
    if (req->qtype != DNS_T_CNAME) {
        for (int hop = 0; hop <= MAX_CNAME_HOPS; hop++) {
            dnsmsg scan = m;
            int found = 0, r;
            while ((r = dnsmsg_next(&scan, &rr)) == 1) {
                if (rr.section != DNS_SEC_ANSWER || rr.type != DNS_T_CNAME
                    || rr.rclass != DNS_CLASS_IN || !dnsmsg_name_eq(rr.name, target))
                    continue;
                char next[DNSMSG_NAME_MAX];
                if (dnsmsg_rd_name(&m, &rr, next) != 0)
                    return raw_error(L, req, "malformed CNAME record");
                memcpy(target, next, strlen(next) + 1);
                ttl = min_ttl(ttl, rr.ttl);
                found = 1;
                break;
            }
            if (r < 0)
                return raw_error(L, req, "malformed reply");
            if (!found)
                break;
            if (hop == MAX_CNAME_HOPS)
                return raw_error(L, req, "CNAME chain too long or looping");
            aliased = 1;
        }
    }

    lua_createtable(L, 0, 8);
    int res = lua_gettop(L);
    lua_pushstring(L, req->name);
    lua_setfield(L, res, "name");
    lua_pushstring(L, qtype_name(req->qtype));
    lua_setfield(L, res, "qtype");
    lua_pushstring(L, m.rcode == DNS_RCODE_NXDOMAIN ? "NXDOMAIN" : "NOERROR");
    lua_setfield(L, res, "rcode");
    lua_pushboolean(L, m.ad);
    lua_setfield(L, res, "ad");
    lua_pushboolean(L, req->chan->loopback);
    lua_setfield(L, res, "loopback");
    if (aliased) {
        lua_pushstring(L, target);
        lua_setfield(L, res, "cname");
    }
    lua_newtable(L);
    int answers = lua_gettop(L);
    lua_Integer n = 0;
    uint32_t neg_ttl = 0;
    int have_soa = 0, r;
    dnsmsg scan = m;
    while ((r = dnsmsg_next(&scan, &rr)) == 1) {
        if (rr.rclass != DNS_CLASS_IN)
            continue;
        if (rr.section == DNS_SEC_ANSWER && rr.type == req->qtype
            && dnsmsg_name_eq(rr.name, target)) {
            if (!push_answer(L, &m, &rr))
                return raw_error(L, req, lua_pushfstring(L, "malformed %s record",
                                                         qtype_name(rr.type)));
            lua_rawseti(L, answers, ++n);
            ttl = min_ttl(ttl, rr.ttl);
        } else if (rr.section == DNS_SEC_AUTHORITY && rr.type == DNS_T_SOA && !have_soa) {
            uint32_t minimum;
            if (dnsmsg_rd_soa_minimum(&m, &rr, &minimum) != 0)
                return raw_error(L, req, "malformed SOA record");
            neg_ttl = min_ttl(rr.ttl, minimum); /* RFC 2308 5 */
            have_soa = 1;
        }
    }
    if (r < 0)
        return raw_error(L, req, "malformed reply");
    lua_setfield(L, res, "answers");
    /* Without records the TTL is the negative one (0 without a SOA:
     * not to be cached), bounded by the CNAMEs that led there. */
    if (n == 0)
        ttl = min_ttl(ttl, neg_ttl);
    lua_pushinteger(L, ttl == UINT32_MAX ? 0 : ttl);
    lua_setfield(L, res, "ttl");
    lua_settop(L, res);
    return 1;
}

/* Protected: build the Lua result of a finished request (arg 1). */
static int push_result(lua_State *L)
{
    const dns_req *req = lua_touserdata(L, 1);
    int status = req->status;
    if (req->kind == REQ_RAW) {
        if (status != ARES_SUCCESS)
            return raw_error(L, req, status == ARES_EDESTRUCTION ? "resolver reconfigured"
                                                                 : ares_strerror(status));
        return push_raw(L, req);
    }
    /* "No such record" for MX/TXT is an empty list, not an error: the
     * domain exists (NXDOMAIN stays an error). */
    if (req->kind != REQ_ADDR && status == ARES_ENODATA)
        status = ARES_SUCCESS;
    if (status != ARES_SUCCESS)
        return push_dns_error(L, req->name, status);
    switch (req->kind) {
    case REQ_ADDR:
        push_addrinfo(L, req);
        break;
    case REQ_MX:
        push_mx(L, req);
        break;
    default:
        push_txt(L, req);
        break;
    }
    return 1;
}

/* Push the results of a finished request and free it (even on error). */
static int req_finish(lua_State *L, dns_req *req)
{
    return ls_push_release(L, push_result, req, req_release);
}

/* ------------------------------------------------------------------ */
/* Waiting */

/* Continuation: the wait ended (answer, or timeout). */
static int req_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    dns_req *req = (dns_req *)ctx;
    if (req->done) /* an answer wins over a timeout that came with it */
        return req_finish(L, req);
    /* Abandon before anything here can raise: the callback frees it. */
    req->task = NULL;
    lua_pushnil(L);
    lua_pushstring(L, LS_ETIMEOUT);
    lua_pushfstring(L, "%s: DNS lookup timed out", req->name);
    return 3;
}

/* The main chunk's wait raised: the request must not keep pointing at
 * the main pseudo-task (its next wait would get a stale wake-up). */
static void req_abandon(lua_KContext ctx)
{
    dns_req *req = (dns_req *)ctx;
    if (req->done)
        req_free(req);
    else
        req->task = NULL; /* the c-ares callback frees it */
}

/* The query has been issued: wait for it and return its results. */
static int req_wait(lua_State *L, dns_req *req, double timeout)
{
    req->issuing = 0;
    timer_rearm(req->chan); /* c-ares has sent the query: follow its timeouts */
    if (req->done)
        return req_finish(L, req);
    double deadline = ls_now(req->loop) + timeout;
    return ls_wait_k(L, req->loop, req->task, deadline, &req->wait, (lua_KContext)req, req_k,
                     req_abandon);
}

/* ------------------------------------------------------------------ */
/* Argument helpers */

static const char *check_name(lua_State *L, int idx, size_t *len)
{
    const char *name = luaL_checklstring(L, idx, len);
    luaL_argcheck(L, strlen(name) == *len, idx, "name contains a zero byte");
    return name;
}

/* opts.timeout: seconds, finite and >= 0. */
static double opt_timeout(lua_State *L, int idx)
{
    double timeout = DEFAULT_TIMEOUT;
    if (lua_isnoneornil(L, idx))
        return timeout;
    luaL_checktype(L, idx, LUA_TTABLE);
    if (lua_getfield(L, idx, "timeout") != LUA_TNIL) {
        int ok;
        timeout = lua_tonumberx(L, -1, &ok);
        luaL_argcheck(L, ok && timeout >= 0 && isfinite(timeout), idx,
                      "timeout must be a finite number of seconds >= 0");
    }
    lua_pop(L, 1);
    return timeout;
}

static int opt_family(lua_State *L, int idx)
{
    int family = AF_UNSPEC;
    if (lua_isnoneornil(L, idx))
        return family;
    luaL_checktype(L, idx, LUA_TTABLE);
    if (lua_getfield(L, idx, "family") != LUA_TNIL) {
        const char *f = lua_tostring(L, -1);
        if (lua_type(L, -1) == LUA_TSTRING && strcmp(f, "inet") == 0)
            family = AF_INET;
        else if (lua_type(L, -1) == LUA_TSTRING && strcmp(f, "inet6") == 0)
            family = AF_INET6;
        else
            luaL_argerror(L, idx, "family must be \"inet\", \"inet6\" or nil");
    }
    lua_pop(L, 1);
    return family;
}

/* Numeric host: 1 (filled in), 0 (a name), -1 (looks like an address
 * literal but is not a valid one). Accepts "[...]" and the SMTP form
 * "[IPv6:...]". */
static int parse_numeric(const char *host, size_t len, int *family, unsigned char addr[16])
{
    char buf[INET6_ADDRSTRLEN + 8];
    int bracketed = len >= 2 && host[0] == '[' && host[len - 1] == ']';
    int v6tag = 0;
    if (bracketed) {
        host++;
        len -= 2;
        if (len >= 5 && strncasecmp(host, "IPv6:", 5) == 0) {
            host += 5;
            len -= 5;
            v6tag = 1;
        }
    }
    int looks = bracketed || memchr(host, ':', len) != NULL;
    if (len >= sizeof buf)
        return looks ? -1 : 0;
    memcpy(buf, host, len);
    buf[len] = '\0';
    if (!v6tag && inet_pton(AF_INET, buf, addr) == 1) {
        *family = AF_INET;
        return 1;
    }
    if (inet_pton(AF_INET6, buf, addr) == 1) {
        *family = AF_INET6;
        return 1;
    }
    return looks ? -1 : 0;
}

/* Issue the c-ares query of req. The callback may run before this
 * returns (hosts file, cached or invalid names): req->issuing keeps it
 * from waking the task, which then finds req->done set. */
static void start_query(dns_req *req, const struct ares_addrinfo_hints *hints)
{
    ls_live[LS_COUNT_DNS_QUERIES]++;
    req->issuing = 1;
    switch (req->kind) {
    case REQ_ADDR:
        ares_getaddrinfo(req->chan->channel, req->name, NULL, hints, addr_cb, req);
        break;
    case REQ_MX:
        ares_query(req->chan->channel, req->name, QCLASS_IN, QTYPE_MX, mx_cb, req);
        break;
    default:
        ares_query(req->chan->channel, req->name, QCLASS_IN, QTYPE_TXT, txt_cb, req);
        break;
    }
}

static int is_localhost(const char *name, size_t len)
{
    if (len == 10 && name[9] == '.')
        len = 9;
    return len == 9 && strncasecmp(name, "localhost", 9) == 0;
}

/* Common path of the three lookups. */
static int lookup(lua_State *L, int kind, const char *name, size_t len, int family,
                  double timeout)
{
    if (len == 0)
        return ls_pusherror(L, LS_EDNS, "empty name");
    if (len > MAX_NAME)
        return ls_pusherror(L, LS_EDNS, "name too long");
    ls_loop *loop = ls_getloop(L);
    ls_task *t = ls_current(L, loop); /* raises where waiting is impossible */
    int st = ARES_SUCCESS;
    dns_chan *c = chan_get(L, loop, &st, 0);
    if (c == NULL)
        return push_dns_error(L, name, st);
    int localhost = kind == REQ_ADDR && is_localhost(name, len);
    if (localhost) { /* c-ares special-cases only this exact spelling */
        name = "localhost";
        len = 9;
    }
    dns_req *req = req_new(loop, t, c, kind, name, len);
    if (req == NULL)
        return push_dns_error(L, name, ARES_ENOMEM);
    req->family = family;
    struct ares_addrinfo_hints hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = family;
    if (localhost) {
        /* c-ares 1.18.1 leaks a copy of the name when "localhost" is not
         * in /etc/hosts for the family asked (c-ares issue #439, fixed in
         * 1.19.0). Ask for both families, which the hosts file has one
         * of, filter, and supply the loopback address if it is missing,
         * as c-ares' own fallback would. */
        req->localhost = 1;
        hints.ai_family = AF_UNSPEC;
    }
    start_query(req, &hints);
    return req_wait(L, req, timeout);
}

/* ------------------------------------------------------------------ */
/* Lua API */

/* resolve(host [, opts]) -> list | nil, "dns", detail | nil, "timeout", detail
 * [-0, +1|3, e]  Waits (yields the task; in the main chunk runs the loop).
 *   host   a name ("mx.example.org", "localhost": /etc/hosts is read first)
 *          or a numeric address ("192.0.2.1", "::1", "[::1]",
 *          "[IPv6:::1]"), answered at once
 *   opts   family = "inet" | "inet6" | nil (both), timeout = seconds (10)
 * Returns an array of {family = "inet"|"inet6", address = "..."} in the
 * resolver's order (c-ares sorts per RFC 6724), without duplicates.
 *   local list = assert(luasmtp.resolve("localhost", {family = "inet"}))
 *   print(list[1].address) --> 127.0.0.1 */
static int l_resolve(lua_State *L)
{
    size_t len;
    const char *host = check_name(L, 1, &len);
    int family = opt_family(L, 2);
    double timeout = opt_timeout(L, 2);
    unsigned char addr[16];
    int afam = AF_UNSPEC;
    switch (parse_numeric(host, len, &afam, addr)) {
    case 1:
        if (family != AF_UNSPEC && family != afam) {
            lua_pushnil(L);
            lua_pushstring(L, LS_EDNS);
            lua_pushfstring(L, "%s: not an %s address", host,
                            family == AF_INET ? "inet" : "inet6");
            return 3;
        }
        lua_createtable(L, 1, 0);
        push_address(L, afam, addr);
        lua_rawseti(L, -2, 1);
        return 1;
    case -1:
        lua_pushnil(L);
        lua_pushstring(L, LS_EDNS);
        lua_pushfstring(L, "%s: invalid address literal", host);
        return 3;
    default:
        return lookup(L, REQ_ADDR, host, len, family, timeout);
    }
}

/* resolve_mx(domain [, opts]) -> list | nil, "dns", detail | nil, "timeout", detail
 * [-0, +1|3, e]  Waits. opts: timeout = seconds (10).
 * Returns an array of {preference = n, exchange = "host"} sorted by
 * preference (stable: equal preferences keep the resolver's order). A
 * domain without MX records gives an empty array (the caller falls back
 * to the implicit MX); a null MX (RFC 7505) has exchange "". The search
 * list is not applied: pass the domain as is.
 *   for _, mx in ipairs(assert(luasmtp.resolve_mx("example.org"))) do ... end */
static int l_resolve_mx(lua_State *L)
{
    size_t len;
    const char *name = check_name(L, 1, &len);
    double timeout = opt_timeout(L, 2);
    return lookup(L, REQ_MX, name, len, AF_UNSPEC, timeout);
}

/* resolve_txt(name [, opts]) -> list | nil, "dns", detail | nil, "timeout", detail
 * [-0, +1|3, e]  Waits. opts: timeout = seconds (10).
 * Returns an array of strings, one per TXT record (the character-strings
 * of one record joined without separator), empty when there is none.
 *   local txt = luasmtp.resolve_txt("example.org") -- {"v=spf1 -all"} */
static int l_resolve_txt(lua_State *L)
{
    size_t len;
    const char *name = check_name(L, 1, &len);
    double timeout = opt_timeout(L, 2);
    return lookup(L, REQ_TXT, name, len, AF_UNSPEC, timeout);
}

/* dns_query(name, qtype [, opts]) -> result | nil, "dns", detail | nil, "timeout", detail
 * [-0, +1|3, e]  Waits. The query is built here: RD and AD set, an
 * EDNS0 OPT record with DO (so a validating resolver reports the AD
 * bit), a random id; it goes to the channel with ARES_FLAG_NOCHECKRESP,
 * so a SERVFAIL is an answer (nil, "dns", "... SERVFAIL ...").
 *   name   the name as is (no search list), at most 253 bytes
 *   qtype  "A", "AAAA", "MX", "CNAME", "TXT", "TLSA" or "PTR"
 *   opts   timeout = seconds (10)
 * result = { name, qtype, rcode = "NOERROR" | "NXDOMAIN", ad = bool,
 *   loopback = bool (every server is on loopback), ttl = seconds
 *   (for no records: RFC 2308's negative TTL from the SOA, else 0),
 *   cname = the end of the CNAME chain when the name is an alias,
 *   answers = { ... } }: the records of that type at the (canonical)
 *   name: MX {preference, exchange ("" for a null MX)}, A/AAAA address
 *   strings, TXT strings (the character-strings of one record joined),
 *   CNAME and PTR targets, TLSA {usage, selector, mtype, data (binary)}.
 * luasmtp.dns (lua/luasmtp/dns.lua) turns ad into authentic and caches.
 *   local r = assert(core.dns_query("example.org", "MX")) */
static int l_dns_query(lua_State *L)
{
    size_t len;
    const char *name = check_name(L, 1, &len);
    const char *tname = luaL_checkstring(L, 2);
    double timeout = opt_timeout(L, 3);
    int qtype = -1;
    for (size_t i = 0; i < sizeof qtypes / sizeof qtypes[0]; i++)
        if (strcmp(tname, qtypes[i].name) == 0)
            qtype = qtypes[i].type;
    if (qtype < 0)
        return luaL_argerror(L, 2, "qtype must be \"A\", \"AAAA\", \"MX\", \"CNAME\", "
                                   "\"TXT\", \"TLSA\" or \"PTR\"");
    unsigned char q[DNSMSG_QUERY_MAX];
    uint16_t id;
    if (getrandom(&id, sizeof id, 0) != (ssize_t)sizeof id)
        return ls_pusherror(L, LS_EDNS, "no random query id (getrandom failed)");
    size_t qlen = len <= MAX_NAME ? dnsmsg_build_query(q, name, (uint16_t)qtype, id,
                                                       EDNS_UDP_SIZE)
                                  : 0;
    if (qlen == 0) {
        lua_pushnil(L);
        lua_pushstring(L, LS_EDNS);
        lua_pushfstring(L, "%s: invalid domain name", name);
        return 3;
    }
    ls_loop *loop = ls_getloop(L);
    ls_task *t = ls_current(L, loop);
    int st = ARES_SUCCESS;
    dns_chan *c = chan_get(L, loop, &st, 1);
    if (c == NULL)
        return push_dns_error(L, name, st);
    /* The name without its final dot: answers are compared to it. */
    if (name[len - 1] == '.')
        len--;
    dns_req *req = req_new(loop, t, c, REQ_RAW, name, len);
    if (req == NULL)
        return push_dns_error(L, name, ARES_ENOMEM);
    req->qtype = qtype;
    ls_live[LS_COUNT_DNS_QUERIES]++;
    req->issuing = 1;
    ares_send(c->channel, q, (int)qlen, raw_cb, req); /* copies q */
    return req_wait(L, req, timeout);
}

/* Append opts.servers (a string or an array of strings) as a c-ares CSV
 * list to b. */
static void add_servers(lua_State *L, int idx, luaL_Buffer *b)
{
    int ty = lua_type(L, idx);
    lua_Integer n = ty == LUA_TTABLE ? (lua_Integer)lua_rawlen(L, idx) : 1;
    if (ty != LUA_TTABLE && ty != LUA_TSTRING)
        luaL_argerror(L, 1, "servers must be a string or an array of strings");
    if (n == 0)
        luaL_argerror(L, 1, "servers must not be empty (omit it for the system servers)");
    for (lua_Integer i = 1; i <= n; i++) {
        if (i > 1)
            luaL_addchar(b, ','); /* before pushing: only addvalue takes an extra slot */
        if (ty == LUA_TTABLE)
            lua_rawgeti(L, idx, i);
        else
            lua_pushvalue(L, idx);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (lua_type(L, -1) != LUA_TSTRING || len == 0 || strlen(s) != len ||
            memchr(s, ',', len) != NULL || memchr(s, ' ', len) != NULL)
            luaL_argerror(L, 1, "servers: each must be \"ip\", \"ip:port\" or \"[ip6]:port\"");
        luaL_addvalue(b);
    }
}

/* dns_configure{servers =, timeout =, tries =, rotate =} -> true | nil, "dns", detail
 * [-0, +1|3, e]
 * (Re)creates the resolver channel of this loop. Queries pending on the
 * old channel fail with nil, "dns", "resolver reconfigured".
 *   servers  "ip:port" or an array of them ("127.0.0.1:5353", "[::1]:53");
 *            omitted: the system's (resolv.conf)
 *   timeout  seconds per try (c-ares default 5)
 *   tries    tries per server (c-ares default 4)
 *   rotate   true/false: spread queries over the servers
 * dns_configure{} goes back to the system defaults.
 *   luasmtp.dns_configure{servers = {"127.0.0.1:5353"}, timeout = 0.5, tries = 1} */
static int l_dns_configure(lua_State *L)
{
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    ls_loop *loop = ls_getloop(L);
    chan_config cfg = {NULL, 0, 0, -1, 0};

    if (lua_getfield(L, 1, "timeout") != LUA_TNIL) {
        int ok;
        double t = lua_tonumberx(L, -1, &ok);
        luaL_argcheck(L, ok && t > 0 && t <= 3600, 1, "timeout must be seconds in (0, 3600]");
        cfg.timeout_ms = (int)(t * 1000. + 0.999); /* round up, >= 1 ms */
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "tries") != LUA_TNIL) {
        int ok;
        lua_Integer n = lua_tointegerx(L, -1, &ok);
        luaL_argcheck(L, ok && n >= 1 && n <= 100, 1, "tries must be an integer in [1, 100]");
        cfg.tries = (int)n;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "rotate") != LUA_TNIL) {
        luaL_argcheck(L, lua_isboolean(L, -1), 1, "rotate must be a boolean");
        cfg.rotate = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "servers"); /* index 2 */
    if (!lua_isnil(L, 2)) {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        add_servers(L, 2, &b);
        luaL_pushresult(&b); /* index 3 */
        cfg.servers = lua_tostring(L, 3);
    }

    /* Two channels with the same servers: the one of resolve*() and
     * the one of dns_query() (ARES_FLAG_NOCHECKRESP, see chan_get).
     * Both are made before either is installed. */
    lua_settop(L, 3);
    dns_chan *chans[2];
    for (int raw = 0; raw < 2; raw++) {
        cfg.flags = raw ? ARES_FLAG_NOCHECKRESP : 0;
        chans[raw] = chan_push(L); /* index 4, 5 */
        int st = chan_init(chans[raw], loop, &cfg);
        if (st == ARES_EBADSTR)
            return luaL_argerror(L, 1, "servers: each must be \"ip\", \"ip:port\" or "
                                       "\"[ip6]:port\"");
        if (st != ARES_SUCCESS) {
            lua_pushnil(L);
            lua_pushstring(L, LS_EDNS);
            lua_pushfstring(L, "resolver configuration: %s", ares_strerror(st));
            return 3;
        }
    }
    /* Fail the old channels' queries, then install the new ones. */
    static const char *const keys[2] = {DNS_KEY, DNS_RAW_KEY};
    for (int raw = 1; raw >= 0; raw--) {
        lua_getfield(L, LUA_REGISTRYINDEX, keys[raw]);
        dns_chan *old = luaL_testudata(L, -1, DNS_MT);
        if (old != NULL)
            chan_destroy(old, 0);
        lua_pop(L, 1);
        lua_setfield(L, LUA_REGISTRYINDEX, keys[raw]); /* pops 5, then 4 */
    }
    lua_pushboolean(L, 1);
    return 1;
}

int ls_open_dns(lua_State *L)
{
    if (luaL_newmetatable(L, DNS_MT)) {
        lua_pushcfunction(L, chan_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    static const luaL_Reg funcs[] = {
        {"resolve", l_resolve},
        {"resolve_mx", l_resolve_mx},
        {"resolve_txt", l_resolve_txt},
        {"dns_configure", l_dns_configure},
        {"dns_query", l_dns_query},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
