/*
 * proto_lua.c - Lua bindings of the SMTP codecs in proto.c.
 *
 * Stateless parsers are plain functions that return tables; the streaming
 * codecs (DATA decoder and encoder, reply accumulator) are userdata made
 * zeroed and with their metatable before anything else. They own no
 * resource outside their own memory, so close(), __close and __gc share
 * one idempotent destroy that only marks them closed; a closed object
 * answers nil, "closed".
 *
 * Protocol failures are values (nil, ...); wrong argument types and
 * impossible arguments (a reply code of 99) raise.
 */
#include <string.h>

#include "luasmtp.h"
#include "proto.h"

#define DECODER_MT "luasmtp.data_decoder"
#define ENCODER_MT "luasmtp.data_encoder"
#define REPLY_MT "luasmtp.reply_parser"

/* ------------------------------------------------------------------ */
/* Helpers */

static void set_str(lua_State *L, const char *k, const char *p, size_t n)
{
    lua_pushlstring(L, p, n);
    lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, lua_Integer v)
{
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}

static void set_bool(lua_State *L, const char *k, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

/* Push an upper-cased copy of p[0, n). */
static void push_upper(lua_State *L, const char *p, size_t n)
{
    luaL_Buffer b;
    char *o = luaL_buffinitsize(L, &b, n);
    for (size_t i = 0; i < n; i++)
        o[i] = (p[i] >= 'a' && p[i] <= 'z') ? (char)(p[i] - 32) : p[i];
    luaL_pushresultsize(&b, n);
}

static lua_Integer clamp_u64(uint64_t v)
{
    return v > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : (lua_Integer)v;
}

/* Optional field of an options table at idx. */
static int opt_bool(lua_State *L, int idx, const char *k, int dflt)
{
    if (lua_isnoneornil(L, idx))
        return dflt;
    lua_getfield(L, idx, k);
    int v = lua_isnil(L, -1) ? dflt : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

static lua_Integer opt_int(lua_State *L, int idx, const char *k, lua_Integer dflt)
{
    if (lua_isnoneornil(L, idx))
        return dflt;
    lua_getfield(L, idx, k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    int ok;
    lua_Integer v = lua_tointegerx(L, -1, &ok);
    if (!ok || v < 0)
        luaL_error(L, "option '%s' must be a non-negative integer", k);
    lua_pop(L, 1);
    return v;
}

/* luaL_Buffer as the output of the streaming codecs. */
static int buffer_out(void *ctx, const char *p, size_t n)
{
    luaL_addlstring((luaL_Buffer *)ctx, p, n);
    return 0;
}

static int closed_error(lua_State *L) { return ls_pusherror(L, LS_ECLOSED, NULL); }

/* ------------------------------------------------------------------ */
/* Commands */

static void push_path(lua_State *L, const struct smtp_path *p)
{
    set_str(L, "path", p->addr, p->len);
    if (!p->null) {
        set_str(L, "local_part", p->addr, p->local_len);
        if (p->domain_off < p->len)
            set_str(L, "domain", p->addr + p->domain_off, p->len - p->domain_off);
    }
    set_bool(L, "utf8", p->utf8);
    if (p->null)
        set_bool(L, "null", 1);
    if (p->postmaster)
        set_bool(L, "postmaster", 1);
    if (p->literal)
        set_bool(L, "literal", 1);
    if (p->quoted)
        set_bool(L, "quoted", 1);
    if (p->route)
        set_bool(L, "route", 1);
}

static void push_params(lua_State *L, const struct smtp_cmd *c)
{
    lua_createtable(L, (int)c->nparams, 0);
    for (size_t i = 0; i < c->nparams; i++) {
        const struct smtp_param *p = &c->params[i];
        lua_createtable(L, 0, 3);
        push_upper(L, p->name, p->name_len);
        lua_setfield(L, -2, "name");
        if (p->value)
            set_str(L, "value", p->value, p->value_len);
        set_bool(L, "known", !p->unknown);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "params");
    if (c->nunknown == 0)
        return;
    lua_createtable(L, (int)c->nunknown, 0);
    lua_Integer n = 0;
    for (size_t i = 0; i < c->nparams; i++) {
        if (c->params[i].unknown) {
            push_upper(L, c->params[i].name, c->params[i].name_len);
            lua_rawseti(L, -2, ++n);
        }
    }
    lua_setfield(L, -2, "unknown");
}

static void push_notify(lua_State *L, unsigned bits)
{
    lua_createtable(L, 0, 3);
    if (bits & SMTP_NOTIFY_NEVER)
        set_bool(L, "never", 1);
    if (bits & SMTP_NOTIFY_SUCCESS)
        set_bool(L, "success", 1);
    if (bits & SMTP_NOTIFY_FAILURE)
        set_bool(L, "failure", 1);
    if (bits & SMTP_NOTIFY_DELAY)
        set_bool(L, "delay", 1);
    lua_setfield(L, -2, "notify");
}

static void push_mailparams(lua_State *L, const struct smtp_mailparams *mp)
{
    static const char *const bodies[] = {NULL, "7BIT", "8BITMIME", "BINARYMIME"};
    static const char *const rets[] = {NULL, "FULL", "HDRS"};
    if (mp->has_size)
        set_int(L, "size", clamp_u64(mp->size));
    if (mp->body != SMTP_BODY_NONE) {
        lua_pushstring(L, bodies[mp->body]);
        lua_setfield(L, -2, "body");
    }
    if (mp->smtputf8)
        set_bool(L, "smtputf8", 1);
    if (mp->ret != SMTP_RET_NONE) {
        lua_pushstring(L, rets[mp->ret]);
        lua_setfield(L, -2, "ret");
    }
    if (mp->has_envid)
        set_str(L, "envid", mp->envid, mp->envid_len);
    if (mp->notify)
        push_notify(L, mp->notify);
    if (mp->has_orcpt) {
        lua_createtable(L, 0, 2);
        set_str(L, "type", mp->orcpt_type, mp->orcpt_type_len);
        set_str(L, "addr", mp->orcpt, mp->orcpt_len);
        lua_setfield(L, -2, "orcpt");
    }
    if (mp->has_auth) {
        if (mp->auth_null)
            lua_pushliteral(L, "<>");
        else
            lua_pushlstring(L, mp->auth, mp->auth_len);
        lua_setfield(L, -2, "auth");
    }
    if (mp->requiretls)
        set_bool(L, "requiretls", 1);
}

static void push_command(lua_State *L, const struct smtp_cmd *c)
{
    lua_createtable(L, 0, 8);
    lua_pushstring(L, smtp_verb_name(c->verb));
    lua_setfield(L, -2, "verb");
    set_str(L, "word", c->word, c->word_len);
    set_str(L, "arg", c->arg, c->arg_len);
    switch (c->verb) {
    case SMTP_MAIL:
    case SMTP_RCPT:
        push_path(L, &c->path);
        push_params(L, c);
        push_mailparams(L, &c->mp);
        break;
    case SMTP_EHLO:
    case SMTP_HELO:
    case SMTP_LHLO:
        set_str(L, "domain", c->domain, c->domain_len);
        set_bool(L, "literal", c->domain_literal);
        break;
    case SMTP_BDAT:
        set_int(L, "chunk_size", clamp_u64(c->chunk_size));
        set_bool(L, "last", c->last);
        break;
    case SMTP_AUTH:
        push_upper(L, c->mech, c->mech_len);
        lua_setfield(L, -2, "mechanism");
        if (c->initial)
            set_str(L, "initial", c->initial, c->initial_len);
        break;
    default:
        break;
    }
}

/* parse_command(line [, opts]) -> cmd | nil, code, enhanced, reason
 *   line: one command without its CRLF. opts: utf8 (RCPT: the MAIL of
 *   this transaction had SMTPUTF8, so non-ASCII paths are fine; EHLO:
 *   U-labels accepted; MAIL ignores it and needs its own SMTPUTF8
 *   parameter), strict_space (refuse "MAIL FROM: <a>"), max_params
 *   (<= 16).
 *   cmd: verb ("MAIL", ..., "UNKNOWN"), word (as written), arg; then
 *     MAIL/RCPT: path, local_part, domain, utf8, null, postmaster,
 *       literal, quoted, route, params = {{name=, value=, known=}...},
 *       unknown = {names} (answer 555), size, body, smtputf8, ret, envid,
 *       notify = {never|success|failure|delay = true}, orcpt = {type=,
 *       addr=}, auth, requiretls (xtext values decoded);
 *     EHLO/HELO/LHLO: domain, literal; BDAT: chunk_size, last;
 *     AUTH: mechanism (upper case), initial (raw, "=" for empty).
 *   e.g. parse_command("MAIL FROM:<a@b> SIZE=10").size -> 10  [-0, +1|4, m] */
static int l_parse_command(lua_State *L)
{
    size_t len;
    const char *line = luaL_checklstring(L, 1, &len);
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TTABLE);
    struct smtp_cmd_opts opts = {0};
    opts.utf8 = opt_bool(L, 2, "utf8", 0);
    opts.strict_space = opt_bool(L, 2, "strict_space", 0);
    opts.max_params = (size_t)opt_int(L, 2, "max_params", 0);
    struct smtp_cmd c; /* about 5 KB */
    if (smtp_parse_command_ex(line, len, &opts, &c) != SMTP_OK) {
        lua_pushnil(L);
        lua_pushinteger(L, c.err.code);
        lua_pushstring(L, c.err.enhanced);
        lua_pushstring(L, c.err.text);
        return 4;
    }
    push_command(L, &c);
    return 1;
}

/* check_domain(name [, utf8]) -> true, literal | false
 *   A domain or address literal as EHLO takes it.            [-0, +1|2, -] */
static int l_check_domain(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    int literal = 0;
    if (smtp_check_domain(s, len, lua_toboolean(L, 2), &literal) < 0) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pushboolean(L, 1);
    lua_pushboolean(L, literal);
    return 2;
}

/* ------------------------------------------------------------------ */
/* DATA decoder */

typedef struct {
    struct smtp_data_decoder d;
    int closed;
} l_decoder;

static l_decoder *check_decoder(lua_State *L) { return luaL_checkudata(L, 1, DECODER_MT); }

/* data_decoder([opts]) -> decoder
 *   opts: max_size (bytes, 0 = none; default 0), max_line (default 998,
 *   0 = no check), bare = "reject" (default) | "normalise".
 *   e.g. local dec = data_decoder{ max_size = 10e6 }        [-0, +1, m] */
static int l_data_decoder(lua_State *L)
{
    if (!lua_isnoneornil(L, 1))
        luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer max_size = opt_int(L, 1, "max_size", 0);
    lua_Integer max_line = opt_int(L, 1, "max_line", SMTP_DEFAULT_MAX_LINE);
    int mode = 0;
    if (!lua_isnoneornil(L, 1)) {
        lua_getfield(L, 1, "bare");
        const char *m = lua_tostring(L, -1);
        if (m != NULL && (strcmp(m, "normalise") == 0 || strcmp(m, "normalize") == 0))
            mode = 1;
        else if (!lua_isnil(L, -1) && (m == NULL || strcmp(m, "reject") != 0))
            return luaL_error(L, "option 'bare' must be \"reject\" or \"normalise\"");
        lua_pop(L, 1);
    }
    l_decoder *u = lua_newuserdatauv(L, sizeof *u, 0);
    memset(u, 0, sizeof *u);
    luaL_setmetatable(L, DECODER_MT);
    smtp_data_decoder_init(&u->d, (uint64_t)max_size, (size_t)max_line,
                           mode == 0 ? SMTP_BARE_REJECT : SMTP_BARE_NORMALISE);
    return 1;
}

/* dec:feed(chunk) -> out, consumed, done | nil, "closed"
 *   out: the decoded bytes of this chunk (nothing past max_size);
 *   consumed: bytes of chunk used, all of them unless done, when the rest
 *   (after the terminating CRLF.CRLF) belongs to the next command.
 *                                                            [-0, +3, m] */
static int l_decoder_feed(lua_State *L)
{
    l_decoder *u = check_decoder(L);
    size_t len;
    const char *in = luaL_checklstring(L, 2, &len);
    if (u->closed)
        return closed_error(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int done = 0;
    size_t used = smtp_data_feed(&u->d, in, len, buffer_out, &b, &done);
    luaL_pushresult(&b);
    lua_pushinteger(L, (lua_Integer)used);
    lua_pushboolean(L, done);
    return 3;
}

/* dec:result() -> {size=, too_big=, bare_lf=, bare_cr=, long_line=,
 *   rejected=, done=}: rejected is true when bare CR/LF was seen in
 *   "reject" mode.                                           [-0, +1, m] */
static int l_decoder_result(lua_State *L)
{
    l_decoder *u = check_decoder(L);
    if (u->closed)
        return closed_error(L);
    lua_createtable(L, 0, 7);
    set_int(L, "size", clamp_u64(u->d.size));
    set_bool(L, "too_big", u->d.too_big);
    set_bool(L, "bare_lf", u->d.bare_lf);
    set_bool(L, "bare_cr", u->d.bare_cr);
    set_bool(L, "long_line", u->d.long_line);
    set_bool(L, "rejected", smtp_data_rejected(&u->d));
    set_bool(L, "done", u->d.done);
    return 1;
}

/* dec:reset() -> dec: ready for the next message, same options. */
static int l_decoder_reset(lua_State *L)
{
    l_decoder *u = check_decoder(L);
    if (u->closed)
        return closed_error(L);
    smtp_data_decoder_reset(&u->d);
    lua_settop(L, 1);
    return 1;
}

static int l_decoder_close(lua_State *L)
{
    check_decoder(L)->closed = 1;
    lua_pushboolean(L, 1);
    return 1;
}

/* ------------------------------------------------------------------ */
/* DATA encoder */

typedef struct {
    struct smtp_data_encoder e;
    int closed;
} l_encoder;

static l_encoder *check_encoder(lua_State *L) { return luaL_checkudata(L, 1, ENCODER_MT); }

/* data_encoder() -> encoder: dot-stuffing, CRLF line ends.  [-0, +1, m] */
static int l_data_encoder(lua_State *L)
{
    l_encoder *u = lua_newuserdatauv(L, sizeof *u, 0);
    memset(u, 0, sizeof *u);
    luaL_setmetatable(L, ENCODER_MT);
    smtp_data_encoder_init(&u->e);
    return 1;
}

/* enc:feed(chunk) -> out: chunk with bare CR/LF made CRLF and leading
 *   dots doubled (a CR at the end of chunk waits for the next call).
 *                                                            [-0, +1, m] */
static int l_encoder_feed(lua_State *L)
{
    l_encoder *u = check_encoder(L);
    size_t len;
    const char *in = luaL_checklstring(L, 2, &len);
    if (u->closed)
        return closed_error(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    smtp_data_encode(&u->e, in, len, buffer_out, &b);
    luaL_pushresult(&b);
    return 1;
}

/* enc:finish() -> out: the end of the last line if needed and ".\r\n";
 *   the encoder is then ready for another message.           [-0, +1, m] */
static int l_encoder_finish(lua_State *L)
{
    l_encoder *u = check_encoder(L);
    if (u->closed)
        return closed_error(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    smtp_data_encode_finish(&u->e, buffer_out, &b);
    luaL_pushresult(&b);
    return 1;
}

static int l_encoder_reset(lua_State *L)
{
    l_encoder *u = check_encoder(L);
    if (u->closed)
        return closed_error(L);
    smtp_data_encoder_init(&u->e);
    lua_settop(L, 1);
    return 1;
}

static int l_encoder_close(lua_State *L)
{
    check_encoder(L)->closed = 1;
    lua_pushboolean(L, 1);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Replies */

static void push_reply_line(lua_State *L, const struct smtp_reply_line *r)
{
    lua_createtable(L, 0, 4);
    set_int(L, "code", r->code);
    if (r->enhanced)
        set_str(L, "enhanced", r->enhanced, r->enhanced_len);
    set_str(L, "text", r->text, r->text_len);
    set_bool(L, "last", r->last);
}

/* parse_reply_line(line) -> {code=, enhanced=, text=, last=} | nil, reason
 *   e.g. parse_reply_line("250-2.1.0 ok") -> {code=250, enhanced="2.1.0",
 *   text="ok", last=false}                                   [-0, +1|2, m] */
static int l_parse_reply_line(lua_State *L)
{
    size_t len;
    const char *line = luaL_checklstring(L, 1, &len);
    struct smtp_reply_line r;
    const char *why = NULL;
    if (smtp_parse_reply_line(line, len, &r, &why) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }
    push_reply_line(L, &r);
    return 1;
}

typedef struct {
    struct smtp_reply_parser p;
    int closed;
} l_reply;

static l_reply *check_reply(lua_State *L) { return luaL_checkudata(L, 1, REPLY_MT); }

/* reply_parser([opts]) -> parser
 *   opts: max_lines (default 100), max_line (default 2048, CRLF excluded).
 *   The parser keeps the lines of the reply in progress in its user
 *   value.                                                   [-0, +1, m] */
static int l_reply_parser(lua_State *L)
{
    if (!lua_isnoneornil(L, 1))
        luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer max_lines = opt_int(L, 1, "max_lines", 100);
    lua_Integer max_line = opt_int(L, 1, "max_line", 2048);
    l_reply *u = lua_newuserdatauv(L, sizeof *u, 1);
    memset(u, 0, sizeof *u);
    luaL_setmetatable(L, REPLY_MT);
    smtp_reply_parser_init(&u->p, (size_t)max_lines, (size_t)max_line);
    return 1;
}

/* parser:feed(line) -> reply | nil | nil, reason
 *   One line without CRLF. A reply table once its last line arrives:
 *   {code=, enhanced= (the first on any line), lines = {text...}, text = lines
 *   joined with "\n", permanent = 5xx, transient = 4xx}; nil while more
 *   lines are needed; nil, reason when malformed (the reply is dropped:
 *   the connection should be treated as broken).
 *   e.g. p:feed("250-a"); p:feed("250 b").lines -> {"a", "b"} [-0, +1|2, m] */
static int l_reply_feed(lua_State *L)
{
    l_reply *u = check_reply(L);
    size_t len;
    const char *line = luaL_checklstring(L, 2, &len);
    if (u->closed)
        return closed_error(L);
    struct smtp_reply_line r;
    const char *why = NULL;
    int rc = smtp_reply_feed(&u->p, line, len, &r, &why);
    if (rc == SMTP_REPLY_ERROR) {
        lua_pushnil(L);
        lua_setiuservalue(L, 1, 1);
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }
    if (u->p.nlines == 1) {
        lua_newtable(L);
        lua_setiuservalue(L, 1, 1);
    }
    lua_getiuservalue(L, 1, 1);
    int lines = lua_gettop(L);
    lua_pushlstring(L, r.text, r.text_len);
    lua_rawseti(L, lines, (lua_Integer)u->p.nlines);
    if (rc == SMTP_REPLY_MORE) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 1);
    lua_createtable(L, 0, 6);
    set_int(L, "code", u->p.code);
    if (u->p.enhanced[0]) {
        lua_pushstring(L, u->p.enhanced);
        lua_setfield(L, -2, "enhanced");
    }
    lua_pushvalue(L, lines);
    lua_setfield(L, -2, "lines");
    /* text: the lines joined with "\n" */
    luaL_Buffer b;
    int reply = lua_gettop(L);
    luaL_buffinit(L, &b);
    for (lua_Integer i = 1; i <= (lua_Integer)u->p.nlines; i++) {
        if (i > 1)
            luaL_addchar(&b, '\n');
        lua_rawgeti(L, lines, i);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    lua_setfield(L, reply, "text");
    set_bool(L, "permanent", u->p.code >= 500);
    set_bool(L, "transient", u->p.code >= 400 && u->p.code < 500);
    return 1;
}

/* parser:reset() -> parser: drop a reply in progress. */
static int l_reply_reset(lua_State *L)
{
    l_reply *u = check_reply(L);
    if (u->closed)
        return closed_error(L);
    smtp_reply_parser_init(&u->p, u->p.max_lines, u->p.max_line);
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 1);
    lua_settop(L, 1);
    return 1;
}

static int l_reply_close(lua_State *L)
{
    l_reply *u = check_reply(L);
    u->closed = 1;
    lua_pushboolean(L, 1);
    return 1;
}

/* format_reply(code, [enhanced], [text]) -> string
 *   The reply with CRLFs: text split into lines on CR, LF and CRLF, other
 *   control characters removed, long lines wrapped (512 octets with
 *   CRLF), code and enhanced code on every line. Raises for a code outside
 *   2xx-5xx or an enhanced code that is malformed or of another class.
 *   e.g. format_reply(250, "2.0.0", "a\nb") -> "250-2.0.0 a\r\n250 2.0.0 b\r\n"
 *                                                            [-0, +1, m] */
static int l_format_reply(lua_State *L)
{
    lua_Integer code = luaL_checkinteger(L, 1);
    const char *enh = NULL;
    if (!(lua_isnoneornil(L, 2) || (lua_type(L, 2) == LUA_TBOOLEAN && !lua_toboolean(L, 2))))
        enh = luaL_checkstring(L, 2);
    size_t tlen = 0;
    const char *text = luaL_optlstring(L, 3, "", &tlen);
    luaL_argcheck(L, code >= 200 && code <= 599, 1, "reply code must be 2xx to 5xx");
    size_t need = smtp_format_reply(NULL, 0, (int)code, enh, text, tlen);
    if (need == (size_t)-1)
        return luaL_argerror(L, enh ? 2 : 1, "invalid reply code or enhanced status code");
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, need);
    smtp_format_reply(out, need, (int)code, enh, text, tlen);
    luaL_pushresultsize(&b, need);
    return 1;
}

/* ------------------------------------------------------------------ */
/* PROXY protocol */

/* parse_proxy(bytes) -> info, consumed | nil, "need-more" | nil, "invalid", detail
 *   bytes: what the connection has received so far. info: {version=1|2,
 *   command = "proxy"|"local", family = "inet"|"inet6"|"unix"|"unspec",
 *   transport = "stream"|"dgram", src_address=, src_port=, dst_address=,
 *   dst_port= (absent for "local"), tlvs=, consumed=}.       [-0, +2|3, m] */
static int l_parse_proxy(lua_State *L)
{
    static const char *const families[] = {"unspec", "inet", "inet6", "unix"};
    size_t len;
    const char *buf = luaL_checklstring(L, 1, &len);
    struct smtp_proxy p;
    const char *why = NULL;
    int rc = smtp_parse_proxy(buf, len, &p, &why);
    if (rc == SMTP_PROXY_MORE)
        return ls_pusherror(L, "need-more", NULL);
    if (rc == SMTP_PROXY_INVALID)
        return ls_pusherror(L, "invalid", why);
    lua_createtable(L, 0, 10);
    set_int(L, "version", p.version);
    lua_pushstring(L, p.local ? "local" : "proxy");
    lua_setfield(L, -2, "command");
    lua_pushstring(L, families[p.family]);
    lua_setfield(L, -2, "family");
    lua_pushstring(L, p.dgram ? "dgram" : "stream");
    lua_setfield(L, -2, "transport");
    if (!p.local && (p.family == SMTP_PROXY_INET || p.family == SMTP_PROXY_INET6)) {
        lua_pushstring(L, p.src);
        lua_setfield(L, -2, "src_address");
        set_int(L, "src_port", p.src_port);
        lua_pushstring(L, p.dst);
        lua_setfield(L, -2, "dst_address");
        set_int(L, "dst_port", p.dst_port);
    }
    set_int(L, "tlvs", (lua_Integer)p.tlvs);
    set_int(L, "consumed", (lua_Integer)p.consumed);
    lua_pushinteger(L, (lua_Integer)p.consumed);
    return 2;
}

/* ------------------------------------------------------------------ */
/* xtext */

/* xtext_encode(s) -> xtext (RFC 3461)                        [-0, +1, m] */
static int l_xtext_encode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    luaL_argcheck(L, len <= ((size_t)-1) / 3, 1, "string too long");
    size_t need = smtp_xtext_encode(s, len, NULL, 0);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, need);
    smtp_xtext_encode(s, len, out, need);
    luaL_pushresultsize(&b, need);
    return 1;
}

/* xtext_decode(x) -> string | nil, "invalid xtext"           [-0, +1|2, m] */
static int l_xtext_decode(lua_State *L)
{
    size_t len, outlen = 0;
    const char *s = luaL_checklstring(L, 1, &len);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, len);
    if (smtp_xtext_decode(s, len, out, len, &outlen) < 0) {
        luaL_pushresultsize(&b, 0);
        lua_pushnil(L);
        lua_pushliteral(L, "invalid xtext");
        return 2;
    }
    luaL_pushresultsize(&b, outlen);
    return 1;
}

/* ------------------------------------------------------------------ */
/* EHLO */

/* Add one extension line to ext (at ext_idx) and order (at order_idx);
 * the first line of a keyword wins. Returns 0, or -1 when malformed. */
static int add_ehlo_line(lua_State *L, const char *s, size_t len, int ext_idx, int order_idx)
{
    struct smtp_ehlo_line e;
    if (smtp_parse_ehlo_line(s, len, &e) < 0)
        return -1;
    push_upper(L, e.keyword.p, e.keyword.len);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, ext_idx) != LUA_TNIL) {
        lua_pop(L, 2);
        return 0;
    }
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, order_idx, (lua_Integer)lua_rawlen(L, order_idx) + 1);
    lua_createtable(L, (int)e.nparams, 0);
    for (size_t i = 0; i < e.nparams; i++) {
        lua_pushlstring(L, e.params[i].p, e.params[i].len);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_rawset(L, ext_idx);
    return 0;
}

/* parse_ehlo(lines) -> {domain=, greeting=, ext = {KEYWORD = {params}},
 *   keywords = {in order}, invalid = {lines}}
 *   lines: the texts of an EHLO reply (as reply_parser gives them): the
 *   first holds the server's name, each other one an extension. Keywords
 *   are upper-cased; malformed lines go to invalid.
 *   e.g. parse_ehlo{"mx.example hi", "SIZE 1000"}.ext.SIZE[1] -> "1000"
 *                                                            [-0, +1, m] */
static int l_parse_ehlo(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer n = (lua_Integer)luaL_len(L, 1);
    lua_createtable(L, 0, 5);
    int res = lua_gettop(L);
    lua_newtable(L);
    int ext = lua_gettop(L);
    lua_newtable(L);
    int order = lua_gettop(L);
    lua_newtable(L);
    int invalid = lua_gettop(L);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, 1, i);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (s == NULL)
            return luaL_error(L, "parse_ehlo: line %d is not a string", (int)i);
        if (i == 1) {
            const char *sp = memchr(s, ' ', len);
            size_t dl = sp ? (size_t)(sp - s) : len;
            lua_pushlstring(L, s, dl);
            lua_setfield(L, res, "domain");
            lua_pushlstring(L, sp ? sp + 1 : s + len, sp ? len - dl - 1 : 0);
            lua_setfield(L, res, "greeting");
        } else if (add_ehlo_line(L, s, len, ext, order) < 0) {
            lua_pushvalue(L, -1);
            lua_rawseti(L, invalid, (lua_Integer)lua_rawlen(L, invalid) + 1);
        }
        lua_pop(L, 1);
    }
    lua_pushvalue(L, invalid);
    lua_setfield(L, res, "invalid");
    lua_pushvalue(L, order);
    lua_setfield(L, res, "keywords");
    lua_pushvalue(L, ext);
    lua_setfield(L, res, "ext");
    lua_settop(L, res);
    return 1;
}

/* ------------------------------------------------------------------ */

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                      lua_CFunction close)
{
    if (luaL_newmetatable(L, name)) {
        lua_newtable(L);
        luaL_setfuncs(L, methods, 0);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, close);
        lua_setfield(L, -2, "__close");
    }
    lua_pop(L, 1);
}

int ls_open_proto(lua_State *L)
{
    static const luaL_Reg decoder_methods[] = {
        {"feed", l_decoder_feed},   {"result", l_decoder_result},
        {"reset", l_decoder_reset}, {"close", l_decoder_close},
        {NULL, NULL},
    };
    static const luaL_Reg encoder_methods[] = {
        {"feed", l_encoder_feed},   {"finish", l_encoder_finish},
        {"reset", l_encoder_reset}, {"close", l_encoder_close},
        {NULL, NULL},
    };
    static const luaL_Reg reply_methods[] = {
        {"feed", l_reply_feed},
        {"reset", l_reply_reset},
        {"close", l_reply_close},
        {NULL, NULL},
    };
    new_class(L, DECODER_MT, decoder_methods, l_decoder_close);
    new_class(L, ENCODER_MT, encoder_methods, l_encoder_close);
    new_class(L, REPLY_MT, reply_methods, l_reply_close);
    static const luaL_Reg funcs[] = {
        {"parse_command", l_parse_command},
        {"check_domain", l_check_domain},
        {"data_decoder", l_data_decoder},
        {"data_encoder", l_data_encoder},
        {"parse_reply_line", l_parse_reply_line},
        {"reply_parser", l_reply_parser},
        {"format_reply", l_format_reply},
        {"parse_proxy", l_parse_proxy},
        {"xtext_encode", l_xtext_encode},
        {"xtext_decode", l_xtext_decode},
        {"parse_ehlo", l_parse_ehlo},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
