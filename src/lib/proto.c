/*
 * proto.c - SMTP protocol codecs: pure C, no Lua, no I/O, no allocation.
 * See proto.h for the contract of each function; the fuzzers in fuzz/
 * drive everything here directly.
 *
 * Parsing style: a parser walks an input span with an index, every read
 * is checked against the span's length first, and nothing is copied into
 * a fixed buffer before its length has been checked against the buffer.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>

#include "proto.h"

/* ------------------------------------------------------------------ */
/* Character classes (ASCII only: no locale) */

static int is_alpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static int is_alnum(unsigned char c) { return is_alpha(c) || is_digit(c); }
static int is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }
static unsigned char to_upper(unsigned char c) { return (c >= 'a' && c <= 'z') ? c - 32 : c; }

/* atext of RFC 5322 (the characters of a dot-atom). */
static int is_atext(unsigned char c)
{
    return is_alnum(c) || (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* p[0, n) equals the ASCII literal lit, ignoring case. */
static int ieq(const unsigned char *p, size_t n, const char *lit)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (lit[i] == '\0' || to_upper(p[i]) != to_upper((unsigned char)lit[i]))
            return 0;
    return lit[i] == '\0';
}

/* p[0, n) starts with lit, ignoring case. */
static int iprefix(const unsigned char *p, size_t n, const char *lit)
{
    size_t l = strlen(lit);
    return n >= l && ieq(p, l, lit);
}

/* Length of the well-formed UTF-8 sequence starting with a non-ASCII
 * byte at p (n bytes available); 0 when malformed (overlong forms,
 * surrogates and code points past U+10FFFF included). */
static size_t utf8_len(const unsigned char *p, size_t n)
{
    unsigned char c = p[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c >= 0xC2 && c <= 0xDF)
        need = 2;
    else if (c == 0xE0)
        need = 3, lo = 0xA0;
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
        need = 3;
    else if (c == 0xED)
        need = 3, hi = 0x9F;
    else if (c == 0xF0)
        need = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3)
        need = 4;
    else if (c == 0xF4)
        need = 4, hi = 0x8F;
    else
        return 0;
    if (n < need || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < need; i++)
        if (p[i] < 0x80 || p[i] > 0xBF)
            return 0;
    return need;
}

/* ------------------------------------------------------------------ */
/* Domains and address literals (RFC 5321 4.1.2, 4.1.3; RFC 6531) */

/* sub-domain *("." sub-domain) at s[*pos, n). Labels are letters,
 * digits and inner hyphens, or (U-labels) well-formed UTF-8, which sets
 * *utf8. Stops at the first byte that cannot continue the domain. */
static int parse_dotted_domain(const unsigned char *s, size_t n, size_t *pos, int *utf8)
{
    size_t start = *pos, i = start;
    for (;;) {
        size_t label = i;
        int hyphen_last = 0;
        while (i < n) {
            unsigned char c = s[i];
            if (is_alnum(c)) {
                i++;
                hyphen_last = 0;
            } else if (c == '-' && i > label) {
                i++;
                hyphen_last = 1;
            } else if (c >= 0x80) {
                size_t k = utf8_len(s + i, n - i);
                if (k == 0)
                    return -1;
                *utf8 = 1;
                i += k;
                hyphen_last = 0;
            } else {
                break;
            }
        }
        if (i == label || hyphen_last || i - label > SMTP_MAX_LABEL)
            return -1;
        if (i < n && s[i] == '.') {
            i++;
            continue;
        }
        break;
    }
    if (i - start > SMTP_MAX_DOMAIN)
        return -1;
    *pos = i;
    return 0;
}

/* Dotted quad, each part 1-3 digits and at most 255. */
static int check_ipv4(const unsigned char *p, size_t n)
{
    size_t i = 0;
    for (int part = 0; part < 4; part++) {
        if (part > 0) {
            if (i >= n || p[i] != '.')
                return -1;
            i++;
        }
        size_t digits = 0;
        unsigned v = 0;
        while (i < n && is_digit(p[i]) && digits < 4) {
            v = v * 10 + (unsigned)(p[i] - '0');
            i++;
            digits++;
        }
        if (digits == 0 || digits > 3 || v > 255)
            return -1;
    }
    return i == n ? 0 : -1;
}

/* Copy p[0, n) into a NUL-terminated buffer of size cap; -1 if too long. */
static int to_cstr(const unsigned char *p, size_t n, char *buf, size_t cap)
{
    if (n >= cap)
        return -1;
    memcpy(buf, p, n);
    buf[n] = '\0';
    return 0;
}

static int check_ipv6(const unsigned char *p, size_t n)
{
    char buf[INET6_ADDRSTRLEN + 1];
    struct in6_addr a;
    if (to_cstr(p, n, buf, sizeof buf) < 0)
        return -1;
    return inet_pton(AF_INET6, buf, &a) == 1 ? 0 : -1;
}

/* "[" (IPv4 / "IPv6:" IPv6) "]" at s[*pos, n). General address literals
 * (other tags) are refused: none is defined for use in SMTP. */
static int parse_literal(const unsigned char *s, size_t n, size_t *pos)
{
    size_t i = *pos, j;
    if (i >= n || s[i] != '[')
        return -1;
    for (j = i + 1; j < n && s[j] != ']'; j++) {
        unsigned char c = s[j];
        if (c < 33 || c > 126 || c == '[' || c == '\\')
            return -1;
    }
    if (j >= n || j + 1 - i > SMTP_MAX_DOMAIN)
        return -1;
    const unsigned char *body = s + i + 1;
    size_t blen = j - i - 1;
    int ok;
    if (iprefix(body, blen, "IPv6:"))
        ok = check_ipv6(body + 5, blen - 5);
    else if (memchr(body, ':', blen) != NULL)
        ok = -1;
    else
        ok = check_ipv4(body, blen);
    if (ok < 0)
        return -1;
    *pos = j + 1;
    return 0;
}

int smtp_check_domain(const char *p, size_t len, int allow_utf8, int *literal)
{
    const unsigned char *s = (const unsigned char *)p;
    size_t pos = 0;
    int utf8 = 0;
    *literal = 0;
    if (len > 0 && s[0] == '[') {
        *literal = 1;
        return parse_literal(s, len, &pos) == 0 && pos == len ? 0 : -1;
    }
    if (parse_dotted_domain(s, len, &pos, &utf8) < 0 || pos != len)
        return -1;
    return (utf8 && !allow_utf8) ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* Paths (RFC 5321 4.1.2) */

/* Local-part = Dot-string / Quoted-string, non-ASCII allowed as UTF-8
 * (sets *utf8; the caller decides whether SMTPUTF8 allows it). */
static int parse_local(const unsigned char *s, size_t n, size_t *pos, int *utf8, int *quoted)
{
    size_t i = *pos;
    if (i < n && s[i] == '"') {
        *quoted = 1;
        for (i++;;) {
            if (i >= n)
                return -1;
            unsigned char c = s[i];
            if (c == '"') {
                i++;
                break;
            }
            if (c == '\\') {
                if (i + 1 >= n || s[i + 1] < 32 || s[i + 1] > 126)
                    return -1;
                i += 2;
            } else if (c >= 32 && c <= 126) {
                i++;
            } else if (c >= 0x80) {
                size_t k = utf8_len(s + i, n - i);
                if (k == 0)
                    return -1;
                *utf8 = 1;
                i += k;
            } else {
                return -1;
            }
        }
    } else {
        for (;;) {
            size_t atom = i;
            while (i < n) {
                if (is_atext(s[i])) {
                    i++;
                } else if (s[i] >= 0x80) {
                    size_t k = utf8_len(s + i, n - i);
                    if (k == 0)
                        return -1;
                    *utf8 = 1;
                    i += k;
                } else {
                    break;
                }
            }
            if (i == atom)
                return -1;
            if (i < n && s[i] == '.') {
                i++;
                continue;
            }
            break;
        }
    }
    *pos = i;
    return 0;
}

/* A-d-l ":" : "@dom,@dom:" at s[*pos], validated and dropped. */
static int parse_route(const unsigned char *s, size_t n, size_t *pos, int *utf8)
{
    size_t i = *pos;
    for (;;) {
        if (i >= n || s[i] != '@')
            return -1;
        i++;
        if (parse_dotted_domain(s, n, &i, utf8) < 0)
            return -1;
        if (i < n && s[i] == ',') {
            i++;
            continue;
        }
        if (i < n && s[i] == ':') {
            *pos = i + 1;
            return 0;
        }
        return -1;
    }
}

/* Path at s[*pos, n) into path; *why on failure. */
static int parse_path(const unsigned char *s, size_t n, size_t *pos, int rcpt,
                      struct smtp_path *path, const char **why)
{
    size_t start = *pos, i = start, lstart, lend, dstart = 0, dend = 0;
    if (i >= n || s[i] != '<')
        return *why = "address must be in angle brackets", -1;
    i++;
    if (i < n && s[i] == '>') {
        if (rcpt)
            return *why = "null path is not a valid recipient", -1;
        path->null = 1;
        *pos = i + 1;
        return 0;
    }
    if (i < n && s[i] == '@') {
        if (parse_route(s, n, &i, &path->utf8) < 0)
            return *why = "invalid source route", -1;
        path->route = 1;
    }
    lstart = i;
    if (parse_local(s, n, &i, &path->utf8, &path->quoted) < 0)
        return *why = "invalid local part", -1;
    lend = i;
    if (lend - lstart > SMTP_MAX_LOCAL)
        return *why = "local part too long", -1;
    if (i < n && s[i] == '@') {
        dstart = ++i;
        int bad = (i < n && s[i] == '[')
                      ? (path->literal = 1, parse_literal(s, n, &i))
                      : parse_dotted_domain(s, n, &i, &path->utf8);
        if (bad < 0)
            return *why = path->literal ? "invalid address literal" : "invalid domain", -1;
        dend = i;
    } else if (rcpt && !path->route && !path->quoted && ieq(s + lstart, lend - lstart, "postmaster")) {
        path->postmaster = 1;
    } else {
        return *why = (i < n && s[i] == '>') ? "address must have a domain"
                                             : "invalid character in address", -1;
    }
    if (i >= n || s[i] != '>')
        return *why = (i >= n) ? "missing closing angle bracket"
                               : "invalid character in address", -1;
    i++;
    if (i - start > SMTP_MAX_PATH)
        return *why = "path too long", -1;
    /* fits: local + "@" + domain < the path checked just above */
    memcpy(path->addr, s + lstart, lend - lstart);
    path->local_len = lend - lstart;
    path->len = path->local_len;
    if (!path->postmaster) {
        path->addr[path->len++] = '@';
        path->domain_off = path->len;
        memcpy(path->addr + path->len, s + dstart, dend - dstart);
        path->len += dend - dstart;
    } else {
        path->domain_off = path->len;
    }
    path->addr[path->len] = '\0';
    *pos = i;
    return 0;
}

/* ------------------------------------------------------------------ */
/* ESMTP parameters */

struct pctx {
    struct smtp_cmd *cmd;
    int rcpt;
    const char *why;
};

static int param_fail(struct pctx *c, const char *why)
{
    c->why = why;
    return -1;
}

/* SIZE=1*20DIGIT, saturating. */
static int param_size(struct pctx *c, const unsigned char *v, size_t n)
{
    if (v == NULL || n == 0 || n > 20)
        return param_fail(c, "invalid SIZE value");
    uint64_t size = 0;
    for (size_t i = 0; i < n; i++) {
        if (!is_digit(v[i]))
            return param_fail(c, "invalid SIZE value");
        unsigned d = (unsigned)(v[i] - '0');
        size = (size > (UINT64_MAX - d) / 10) ? UINT64_MAX : size * 10 + d;
    }
    c->cmd->mp.has_size = 1;
    c->cmd->mp.size = size;
    return 0;
}

static int param_body(struct pctx *c, const unsigned char *v, size_t n)
{
    if (v && ieq(v, n, "7BIT"))
        c->cmd->mp.body = SMTP_BODY_7BIT;
    else if (v && ieq(v, n, "8BITMIME"))
        c->cmd->mp.body = SMTP_BODY_8BITMIME;
    else if (v && ieq(v, n, "BINARYMIME"))
        c->cmd->mp.body = SMTP_BODY_BINARYMIME;
    else
        return param_fail(c, "BODY must be 7BIT, 8BITMIME or BINARYMIME");
    return 0;
}

static int param_ret(struct pctx *c, const unsigned char *v, size_t n)
{
    if (v && ieq(v, n, "FULL"))
        c->cmd->mp.ret = SMTP_RET_FULL;
    else if (v && ieq(v, n, "HDRS"))
        c->cmd->mp.ret = SMTP_RET_HDRS;
    else
        return param_fail(c, "RET must be FULL or HDRS");
    return 0;
}

static int param_envid(struct pctx *c, const unsigned char *v, size_t n)
{
    struct smtp_mailparams *mp = &c->cmd->mp;
    if (v == NULL || n > SMTP_MAX_ENVID ||
        smtp_xtext_decode((const char *)v, n, mp->envid, SMTP_MAX_ENVID, &mp->envid_len) < 0)
        return param_fail(c, "invalid ENVID value");
    mp->envid[mp->envid_len] = '\0';
    mp->has_envid = 1;
    return 0;
}

static int param_auth(struct pctx *c, const unsigned char *v, size_t n)
{
    struct smtp_mailparams *mp = &c->cmd->mp;
    if (v != NULL && n == 2 && v[0] == '<' && v[1] == '>') {
        mp->auth_null = 1;
    } else if (v == NULL || smtp_xtext_decode((const char *)v, n, mp->auth, SMTP_MAX_AUTH_PARAM,
                                              &mp->auth_len) < 0 || mp->auth_len == 0) {
        return param_fail(c, "invalid AUTH value");
    }
    mp->auth[mp->auth_len] = '\0';
    mp->has_auth = 1;
    return 0;
}

/* NOTIFY=NEVER / NOTIFY=SUCCESS,FAILURE,DELAY (any non-empty subset). */
static int param_notify(struct pctx *c, const unsigned char *v, size_t n)
{
    if (v != NULL && ieq(v, n, "NEVER")) {
        c->cmd->mp.notify = SMTP_NOTIFY_NEVER;
        return 0;
    }
    unsigned bits = 0;
    size_t i = 0;
    while (v != NULL && i <= n) {
        size_t j = i;
        while (j < n && v[j] != ',')
            j++;
        unsigned bit = ieq(v + i, j - i, "SUCCESS")   ? SMTP_NOTIFY_SUCCESS
                       : ieq(v + i, j - i, "FAILURE") ? SMTP_NOTIFY_FAILURE
                       : ieq(v + i, j - i, "DELAY")   ? SMTP_NOTIFY_DELAY
                                                      : 0;
        if (bit == 0 || (bits & bit))
            return param_fail(c, "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY");
        bits |= bit;
        i = j + 1;
    }
    if (bits == 0)
        return param_fail(c, "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY");
    c->cmd->mp.notify = bits;
    return 0;
}

/* ORCPT=addr-type ";" xtext */
static int param_orcpt(struct pctx *c, const unsigned char *v, size_t n)
{
    struct smtp_mailparams *mp = &c->cmd->mp;
    const unsigned char *semi = v ? memchr(v, ';', n) : NULL;
    if (semi == NULL)
        return param_fail(c, "ORCPT must be addr-type;xtext");
    size_t tlen = (size_t)(semi - v);
    if (tlen == 0 || tlen > SMTP_MAX_ADDR_TYPE)
        return param_fail(c, "invalid ORCPT address type");
    for (size_t i = 0; i < tlen; i++)
        if (!is_atext(v[i]))
            return param_fail(c, "invalid ORCPT address type");
    if (smtp_xtext_decode((const char *)semi + 1, n - tlen - 1, mp->orcpt, SMTP_MAX_ORCPT,
                          &mp->orcpt_len) < 0 || mp->orcpt_len == 0)
        return param_fail(c, "invalid ORCPT address");
    memcpy(mp->orcpt_type, v, tlen);
    mp->orcpt_type[tlen] = '\0';
    mp->orcpt_type_len = tlen;
    mp->orcpt[mp->orcpt_len] = '\0';
    mp->has_orcpt = 1;
    return 0;
}

static int param_flag(struct pctx *c, const unsigned char *v, int *flag, const char *why)
{
    if (v != NULL)
        return param_fail(c, why);
    *flag = 1;
    return 0;
}

struct pdef {
    const char *name;
    enum smtp_pkey key;
    int rcpt; /* 0: MAIL, 1: RCPT */
};

static const struct pdef pdefs[] = {
    {"SIZE", SMTP_P_SIZE, 0},         {"BODY", SMTP_P_BODY, 0},
    {"SMTPUTF8", SMTP_P_SMTPUTF8, 0}, {"RET", SMTP_P_RET, 0},
    {"ENVID", SMTP_P_ENVID, 0},       {"AUTH", SMTP_P_AUTH, 0},
    {"REQUIRETLS", SMTP_P_REQUIRETLS, 0}, {"NOTIFY", SMTP_P_NOTIFY, 1},
    {"ORCPT", SMTP_P_ORCPT, 1},
};

/* Validate and decode a known parameter's value. */
static int param_value(struct pctx *c, enum smtp_pkey key, const unsigned char *v, size_t n)
{
    struct smtp_mailparams *mp = &c->cmd->mp;
    switch (key) {
    case SMTP_P_SIZE:
        return param_size(c, v, n);
    case SMTP_P_BODY:
        return param_body(c, v, n);
    case SMTP_P_SMTPUTF8:
        return param_flag(c, v, &mp->smtputf8, "SMTPUTF8 takes no value");
    case SMTP_P_RET:
        return param_ret(c, v, n);
    case SMTP_P_ENVID:
        return param_envid(c, v, n);
    case SMTP_P_AUTH:
        return param_auth(c, v, n);
    case SMTP_P_REQUIRETLS:
        return param_flag(c, v, &mp->requiretls, "REQUIRETLS takes no value");
    case SMTP_P_NOTIFY:
        return param_notify(c, v, n);
    case SMTP_P_ORCPT:
        return param_orcpt(c, v, n);
    default:
        return 0;
    }
}

/* Sort a parameter: known and valid for this verb, or unknown. */
static void param_classify(struct pctx *c, struct smtp_param *p)
{
    p->key = SMTP_P_OTHER;
    p->unknown = 1;
    for (size_t i = 0; i < sizeof pdefs / sizeof pdefs[0]; i++) {
        if (ieq((const unsigned char *)p->name, p->name_len, pdefs[i].name)) {
            p->key = pdefs[i].key;
            p->unknown = pdefs[i].rcpt != c->rcpt;
            break;
        }
    }
    if (p->unknown)
        c->cmd->nunknown++;
}

/* a[0, alen) and b[0, blen) are equal ignoring ASCII case. */
static int ieq_span(const char *a, size_t alen, const char *b, size_t blen)
{
    if (alen != blen)
        return 0;
    for (size_t k = 0; k < alen; k++)
        if (to_upper((unsigned char)a[k]) != to_upper((unsigned char)b[k]))
            return 0;
    return 1;
}

/* A keyword given before on this command: 0 when new, 1 when it repeats
 * the earlier one (a flag again, or the same value), -1 when the values
 * differ. Token values (SIZE, BODY, RET, NOTIFY) compare ignoring ASCII
 * case; xtext and unknown values compare octet for octet. Python's
 * smtplib sends "SMTPUTF8 SMTPUTF8" when the caller asks for SMTPUTF8
 * too; Postfix and Exim take such repeats as one. */
static int param_repeat(const struct smtp_cmd *cmd, const struct smtp_param *p)
{
    for (size_t i = 0; i < cmd->nparams; i++) {
        const struct smtp_param *q = &cmd->params[i];
        if (!ieq_span(q->name, q->name_len, p->name, p->name_len))
            continue;
        if ((q->value == NULL) != (p->value == NULL))
            return -1;
        if (q->value == NULL)
            return 1;
        int token = q->key == SMTP_P_SIZE || q->key == SMTP_P_BODY || q->key == SMTP_P_RET ||
                    q->key == SMTP_P_NOTIFY;
        if (token ? ieq_span(q->value, q->value_len, p->value, p->value_len)
                  : q->value_len == p->value_len && memcmp(q->value, p->value, p->value_len) == 0)
            return 1;
        return -1;
    }
    return 0;
}

/* esmtp-param = esmtp-keyword ["=" esmtp-value] at s[*pos, n). Values may
 * hold UTF-8 (RFC 6531), noted in *nonascii. */
static int parse_param(struct pctx *c, const unsigned char *s, size_t n, size_t *pos,
                       size_t max_params, int *nonascii)
{
    size_t i = *pos, kstart = i;
    struct smtp_param p = {0};
    if (i >= n || !is_alnum(s[i]))
        return param_fail(c, "invalid parameter syntax");
    while (i < n && (is_alnum(s[i]) || s[i] == '-'))
        i++;
    if (i - kstart > SMTP_MAX_KEYWORD)
        return param_fail(c, "parameter name too long");
    p.name = (const char *)s + kstart;
    p.name_len = i - kstart;
    if (i < n && s[i] == '=') {
        size_t vstart = ++i;
        while (i < n && s[i] != ' ') {
            unsigned char ch = s[i];
            if (ch == '=' || ch < 33 || ch == 127)
                return param_fail(c, "invalid parameter value");
            if (ch >= 0x80) {
                size_t k = utf8_len(s + i, n - i);
                if (k == 0)
                    return param_fail(c, "invalid parameter value");
                *nonascii = 1;
                i += k;
            } else {
                i++;
            }
        }
        if (i == vstart)
            return param_fail(c, "empty parameter value");
        if (i - vstart > SMTP_MAX_PARAM_VALUE)
            return param_fail(c, "parameter value too long");
        p.value = (const char *)s + vstart;
        p.value_len = i - vstart;
    } else if (i < n && s[i] != ' ') {
        return param_fail(c, "invalid parameter name");
    }
    int repeat = param_repeat(c->cmd, &p);
    if (repeat < 0)
        return param_fail(c, "duplicate parameter with a different value");
    if (repeat > 0) { /* the same again: taken as one */
        *pos = i;
        return 0;
    }
    if (c->cmd->nparams >= max_params)
        return param_fail(c, "too many parameters");
    param_classify(c, &p);
    if (!p.unknown &&
        param_value(c, p.key, (const unsigned char *)p.value, p.value_len) < 0)
        return -1;
    c->cmd->params[c->cmd->nparams++] = p;
    *pos = i;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Commands */

static const char *const verb_names[SMTP_VERB_COUNT] = {
    "UNKNOWN", "EHLO", "HELO", "LHLO", "MAIL", "RCPT",     "DATA", "BDAT",
    "RSET",    "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH",
};

const char *smtp_verb_name(enum smtp_verb v)
{
    return (unsigned)v < SMTP_VERB_COUNT ? verb_names[v] : "UNKNOWN";
}

static enum smtp_verb lookup_verb(const unsigned char *w, size_t n)
{
    if (n != 4 && n != 8)
        return SMTP_UNKNOWN;
    for (int v = 1; v < SMTP_VERB_COUNT; v++)
        if (ieq(w, n, verb_names[v]))
            return (enum smtp_verb)v;
    return SMTP_UNKNOWN;
}

static enum smtp_status fail(struct smtp_cmd *cmd, enum smtp_status st, const char *why)
{
    static const struct {
        int code;
        const char *enhanced;
    } replies[] = {
        [SMTP_OK] = {0, NULL},           [SMTP_E_LINE] = {500, "5.5.2"},
        [SMTP_E_SYNTAX] = {501, "5.5.4"}, [SMTP_E_PATH] = {501, "5.1.3"},
        [SMTP_E_PARAM] = {501, "5.5.4"},  [SMTP_E_UTF8] = {553, "5.6.7"},
    };
    cmd->err.code = replies[st].code;
    cmd->err.enhanced = replies[st].enhanced;
    if (st == SMTP_E_PATH && cmd->verb == SMTP_MAIL)
        cmd->err.enhanced = "5.1.7";
    cmd->err.text = why;
    return st;
}

/* MAIL FROM:<path> [SP params] / RCPT TO:<path> [SP params] */
static enum smtp_status parse_mailrcpt(struct smtp_cmd *cmd, const struct smtp_cmd_opts *opts)
{
    const unsigned char *s = (const unsigned char *)cmd->arg;
    size_t n = cmd->arg_len, i;
    int rcpt = cmd->verb == SMTP_RCPT;
    const char *kw = rcpt ? "TO:" : "FROM:";
    const char *why = NULL;
    if (!iprefix(s, n, kw))
        return fail(cmd, SMTP_E_SYNTAX, rcpt ? "syntax: RCPT TO:<address>"
                                             : "syntax: MAIL FROM:<address>");
    i = strlen(kw);
    while (!opts->strict_space && i < n && s[i] == ' ')
        i++;
    if (parse_path(s, n, &i, rcpt, &cmd->path, &why) < 0)
        return fail(cmd, SMTP_E_PATH, why);
    size_t max = opts->max_params == 0 || opts->max_params > SMTP_MAX_PARAMS
                     ? SMTP_MAX_PARAMS : opts->max_params;
    struct pctx c = {cmd, rcpt, NULL};
    int nonascii = 0;
    while (i < n) {
        if (s[i] != ' ')
            return fail(cmd, SMTP_E_SYNTAX, "unexpected characters after the address");
        i++;
        if (parse_param(&c, s, n, &i, max, &nonascii) < 0)
            return fail(cmd, SMTP_E_PARAM, c.why);
    }
    /* MAIL starts a transaction: only its own SMTPUTF8 parameter counts */
    int utf8_ok = rcpt ? opts->utf8 : cmd->mp.smtputf8;
    if (cmd->path.utf8 && !utf8_ok)
        return fail(cmd, SMTP_E_UTF8, "non-ASCII address requires SMTPUTF8");
    if (nonascii && !utf8_ok)
        return fail(cmd, SMTP_E_UTF8, "non-ASCII parameter requires SMTPUTF8");
    return SMTP_OK;
}

/* BDAT SP chunk-size [SP "LAST"] (RFC 3030) */
static enum smtp_status parse_bdat(struct smtp_cmd *cmd)
{
    const unsigned char *s = (const unsigned char *)cmd->arg;
    size_t n = cmd->arg_len, i = 0;
    uint64_t v = 0;
    while (i < n && is_digit(s[i])) {
        v = v * 10 + (uint64_t)(s[i] - '0'); /* v <= 2^53 before: no overflow */
        if (i >= 20 || v > SMTP_MAX_BDAT_CHUNK)
            return fail(cmd, SMTP_E_SYNTAX, "chunk size too large");
        i++;
    }
    if (i == 0)
        return fail(cmd, SMTP_E_SYNTAX, "syntax: BDAT size [LAST]");
    if (i < n) {
        if (s[i] != ' ' || !ieq(s + i + 1, n - i - 1, "LAST"))
            return fail(cmd, SMTP_E_SYNTAX, "syntax: BDAT size [LAST]");
        cmd->last = 1;
    }
    cmd->chunk_size = v;
    return SMTP_OK;
}

/* AUTH SP mechanism [SP initial-response] (RFC 4954) */
static enum smtp_status parse_auth(struct smtp_cmd *cmd)
{
    const unsigned char *s = (const unsigned char *)cmd->arg;
    size_t n = cmd->arg_len, i = 0;
    while (i < n && (is_alnum(s[i]) || s[i] == '-' || s[i] == '_'))
        i++;
    if (i == 0 || i > SMTP_MAX_MECH || (i < n && s[i] != ' '))
        return fail(cmd, SMTP_E_SYNTAX, "invalid mechanism name");
    cmd->mech = cmd->arg;
    cmd->mech_len = i;
    if (i == n)
        return SMTP_OK;
    const unsigned char *r = s + i + 1;
    size_t rlen = n - i - 1;
    if (rlen == 0)
        return fail(cmd, SMTP_E_SYNTAX, "empty initial response");
    if (!(rlen == 1 && r[0] == '=')) {
        for (size_t k = 0; k < rlen; k++)
            if (!(is_alnum(r[k]) || r[k] == '+' || r[k] == '/' || r[k] == '='))
                return fail(cmd, SMTP_E_SYNTAX, "initial response is not base64");
    }
    cmd->initial = (const char *)r;
    cmd->initial_len = rlen;
    return SMTP_OK;
}

static enum smtp_status parse_args(struct smtp_cmd *cmd, const struct smtp_cmd_opts *opts,
                                   int has_sp)
{
    switch (cmd->verb) {
    case SMTP_EHLO:
    case SMTP_HELO:
    case SMTP_LHLO:
        if (!has_sp || cmd->arg_len == 0)
            return fail(cmd, SMTP_E_SYNTAX, "a domain name is required");
        if (smtp_check_domain(cmd->arg, cmd->arg_len, opts->utf8, &cmd->domain_literal) < 0)
            return fail(cmd, SMTP_E_SYNTAX, "invalid domain name or address literal");
        cmd->domain = cmd->arg;
        cmd->domain_len = cmd->arg_len;
        return SMTP_OK;
    case SMTP_MAIL:
    case SMTP_RCPT:
        if (!has_sp)
            return fail(cmd, SMTP_E_SYNTAX, cmd->verb == SMTP_RCPT ? "syntax: RCPT TO:<address>"
                                                                   : "syntax: MAIL FROM:<address>");
        return parse_mailrcpt(cmd, opts);
    case SMTP_DATA:
    case SMTP_RSET:
    case SMTP_QUIT:
    case SMTP_STARTTLS:
        return has_sp ? fail(cmd, SMTP_E_SYNTAX, "no parameters allowed") : SMTP_OK;
    case SMTP_VRFY:
    case SMTP_EXPN:
        return (has_sp && cmd->arg_len > 0) ? SMTP_OK
                                            : fail(cmd, SMTP_E_SYNTAX, "an argument is required");
    case SMTP_BDAT:
        return has_sp ? parse_bdat(cmd) : fail(cmd, SMTP_E_SYNTAX, "syntax: BDAT size [LAST]");
    case SMTP_AUTH:
        return has_sp ? parse_auth(cmd) : fail(cmd, SMTP_E_SYNTAX, "syntax: AUTH mechanism");
    default: /* NOOP, HELP: any string; unknown verbs */
        return SMTP_OK;
    }
}

enum smtp_status smtp_parse_command_ex(const char *line, size_t len,
                                       const struct smtp_cmd_opts *opts, struct smtp_cmd *out)
{
    static const struct smtp_cmd_opts defaults = {0, 0, 0};
    const unsigned char *s = (const unsigned char *)line;
    /* clear all but the text buffers, which their lengths govern */
    memset(out, 0, offsetof(struct smtp_cmd, path));
    memset(&out->path, 0, offsetof(struct smtp_path, addr));
    out->path.addr[0] = '\0';
    memset(&out->mp, 0, offsetof(struct smtp_mailparams, envid));
    if (opts == NULL)
        opts = &defaults;
    out->arg = line;
    if (len == 0)
        return fail(out, SMTP_E_LINE, "empty command");
    if (len > SMTP_MAX_COMMAND)
        return fail(out, SMTP_E_LINE, "command line too long");
    for (size_t i = 0; i < len; i++)
        if (is_ctl(s[i]))
            return fail(out, SMTP_E_LINE, "invalid character in command");
    const unsigned char *sp = memchr(s, ' ', len);
    size_t wlen = sp ? (size_t)(sp - s) : len;
    if (wlen == 0)
        return fail(out, SMTP_E_LINE, "command must not start with a space");
    out->word = line;
    out->word_len = wlen;
    out->verb = lookup_verb(s, wlen);
    out->arg = line + wlen + (sp ? 1 : 0);
    out->arg_len = len - wlen - (sp ? 1 : 0);
    if (out->verb == SMTP_UNKNOWN) {
        fail(out, SMTP_OK, "command not recognized");
        out->err.code = 500;
        out->err.enhanced = "5.5.2";
        return SMTP_OK;
    }
    return parse_args(out, opts, sp != NULL);
}

enum smtp_status smtp_parse_command(const char *line, size_t len, struct smtp_cmd *out)
{
    return smtp_parse_command_ex(line, len, NULL, out);
}

/* ------------------------------------------------------------------ */
/* DATA decoder */

enum { D_BOL, D_DOT, D_DOT_CR, D_TEXT, D_CR, D_DONE };

void smtp_data_decoder_init(struct smtp_data_decoder *d, uint64_t max_size, size_t max_line,
                            enum smtp_bare_mode bare)
{
    memset(d, 0, sizeof *d);
    d->max_size = max_size;
    d->max_line = max_line;
    d->bare = bare;
    d->state = D_BOL;
}

void smtp_data_decoder_reset(struct smtp_data_decoder *d)
{
    smtp_data_decoder_init(d, d->max_size, d->max_line, d->bare);
}

int smtp_data_rejected(const struct smtp_data_decoder *d)
{
    return d->bare == SMTP_BARE_REJECT && (d->bare_cr || d->bare_lf);
}

/* Count n decoded bytes and pass them on while within the limit. */
static void d_emit(struct smtp_data_decoder *d, const char *p, size_t n, smtp_out_fn out,
                   void *ctx)
{
    d->size = (n > UINT64_MAX - d->size) ? UINT64_MAX : d->size + n;
    if (d->too_big || (d->max_size > 0 && d->size > d->max_size)) {
        d->too_big = 1;
        return;
    }
    if (out(ctx, p, n) != 0)
        d->failed = 1;
}

static void d_text(struct smtp_data_decoder *d, const char *p, size_t n, smtp_out_fn out,
                   void *ctx)
{
    d->line_len += n;
    if (d->max_line > 0 && d->line_len > d->max_line)
        d->long_line = 1;
    d_emit(d, p, n, out, ctx);
}

static void d_newline(struct smtp_data_decoder *d, smtp_out_fn out, void *ctx)
{
    d->line_len = 0;
    d_emit(d, "\r\n", 2, out, ctx);
}

/* A bare CR or LF: flagged; kept as is (reject mode) or made a CRLF. */
static void d_bare(struct smtp_data_decoder *d, char c, smtp_out_fn out, void *ctx)
{
    if (c == '\r')
        d->bare_cr = 1;
    else
        d->bare_lf = 1;
    if (d->bare == SMTP_BARE_NORMALISE)
        d_newline(d, out, ctx);
    else
        d_text(d, &c, 1, out, ctx);
}

/* Bytes up to the next CR or LF. */
static size_t text_span(const char *p, size_t n)
{
    size_t i = 0;
    while (i < n && p[i] != '\r' && p[i] != '\n')
        i++;
    return i;
}

size_t smtp_data_feed(struct smtp_data_decoder *d, const char *in, size_t len, smtp_out_fn out,
                      void *ctx, int *done)
{
    size_t i = 0;
    while (i < len && d->state != D_DONE && !d->failed) {
        char c = in[i];
        switch (d->state) {
        case D_BOL: /* after CRLF: a dot is stuffing or the terminator */
            if (c == '.') {
                d->state = D_DOT;
                i++;
            } else {
                d->state = D_TEXT;
            }
            break;
        case D_DOT:
            if (c == '\r') {
                d->state = D_DOT_CR;
                i++;
            } else {
                d->state = D_TEXT; /* the line has more: the dot goes */
            }
            break;
        case D_DOT_CR:
            if (c == '\n') {
                d->state = D_DONE;
                i++;
            } else {
                d_bare(d, '\r', out, ctx);
                d->state = D_TEXT;
            }
            break;
        case D_CR:
            if (c == '\n') {
                d_newline(d, out, ctx);
                d->state = D_BOL;
                i++;
            } else {
                d_bare(d, '\r', out, ctx);
                d->state = D_TEXT;
            }
            break;
        default: { /* D_TEXT */
            size_t k = text_span(in + i, len - i);
            if (k > 0) {
                d_text(d, in + i, k, out, ctx);
                i += k;
            } else if (c == '\r') {
                d->state = D_CR;
                i++;
            } else {
                d_bare(d, '\n', out, ctx);
                i++;
            }
            break;
        }
        }
    }
    d->done = d->state == D_DONE;
    if (done)
        *done = d->done;
    return i;
}

/* ------------------------------------------------------------------ */
/* DATA encoder */

void smtp_data_encoder_init(struct smtp_data_encoder *e)
{
    memset(e, 0, sizeof *e);
    e->bol = 1;
}

static int e_put(struct smtp_data_encoder *e, const char *p, size_t n, smtp_out_fn out, void *ctx)
{
    e->size += n;
    return out(ctx, p, n) == 0 ? 0 : -1;
}

static int e_newline(struct smtp_data_encoder *e, smtp_out_fn out, void *ctx)
{
    e->bol = 1;
    return e_put(e, "\r\n", 2, out, ctx);
}

int smtp_data_encode(struct smtp_data_encoder *e, const char *in, size_t len, smtp_out_fn out,
                     void *ctx)
{
    size_t i = 0;
    while (i < len) {
        char c = in[i];
        if (e->cr) { /* CRLF, or a bare CR: both end the line */
            e->cr = 0;
            if (e_newline(e, out, ctx) < 0)
                return -1;
            if (c == '\n')
                i++;
            continue;
        }
        if (c == '\r') {
            e->cr = 1;
            i++;
            continue;
        }
        if (c == '\n') {
            if (e_newline(e, out, ctx) < 0)
                return -1;
            i++;
            continue;
        }
        if (e->bol && c == '.' && e_put(e, ".", 1, out, ctx) < 0)
            return -1;
        size_t k = text_span(in + i, len - i);
        e->bol = 0;
        if (e_put(e, in + i, k, out, ctx) < 0)
            return -1;
        i += k;
    }
    return 0;
}

int smtp_data_encode_finish(struct smtp_data_encoder *e, smtp_out_fn out, void *ctx)
{
    if (e->cr || !e->bol) {
        e->cr = 0;
        if (e_newline(e, out, ctx) < 0)
            return -1;
    }
    int rc = e_put(e, ".\r\n", 3, out, ctx);
    smtp_data_encoder_init(e);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Replies */

static int is_reply_code(const unsigned char *p)
{
    return p[0] >= '2' && p[0] <= '5' && p[1] >= '0' && p[1] <= '5' && is_digit(p[2]);
}

/* Enhanced status code "c.s.d" (RFC 3463) of class cls at t[0, n); its
 * length, or 0. With `whole`, it must span all of t. */
static size_t enhanced_len(const unsigned char *t, size_t n, unsigned char cls, int whole)
{
    size_t i = 0;
    if (n < 5 || t[0] != cls || t[1] != '.')
        return 0;
    i = 2;
    for (int part = 0; part < 2; part++) {
        size_t d = 0;
        while (i < n && is_digit(t[i]) && d < 4) {
            i++;
            d++;
        }
        if (d == 0 || d > 3)
            return 0;
        if (part == 0) {
            if (i >= n || t[i] != '.')
                return 0;
            i++;
        }
    }
    if (whole ? i != n : (i < n && t[i] != ' '))
        return 0;
    return i;
}

int smtp_parse_reply_line(const char *line, size_t len, struct smtp_reply_line *out,
                          const char **reason)
{
    const unsigned char *s = (const unsigned char *)line;
    memset(out, 0, sizeof *out);
    if (len < 3 || !is_reply_code(s))
        return *reason = "invalid reply code", -1;
    out->code = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
    out->text = line + len;
    if (len == 3) {
        out->last = 1;
        return 0;
    }
    if (s[3] != ' ' && s[3] != '-')
        return *reason = "invalid separator after reply code", -1;
    out->last = s[3] == ' ';
    const unsigned char *t = s + 4;
    size_t n = len - 4;
    for (size_t i = 0; i < n; i++)
        if (t[i] != '\t' && is_ctl(t[i]))
            return *reason = "control character in reply", -1;
    size_t e = enhanced_len(t, n, s[0], 0);
    if (e > 0) {
        out->enhanced = (const char *)t;
        out->enhanced_len = e;
        t += e;
        n -= e;
        if (n > 0) { /* the space after it */
            t++;
            n--;
        }
    }
    out->text = (const char *)t;
    out->text_len = n;
    return 0;
}

void smtp_reply_parser_init(struct smtp_reply_parser *p, size_t max_lines, size_t max_line)
{
    memset(p, 0, sizeof *p);
    p->max_lines = max_lines ? max_lines : 100;
    p->max_line = max_line ? max_line : 2048;
}

static int reply_error(struct smtp_reply_parser *p, const char **reason, const char *why)
{
    p->complete = 1;
    *reason = why;
    return SMTP_REPLY_ERROR;
}

int smtp_reply_feed(struct smtp_reply_parser *p, const char *line, size_t len,
                    struct smtp_reply_line *out, const char **reason)
{
    if (p->complete) {
        p->complete = 0;
        p->nlines = 0;
        p->code = 0;
        p->enhanced[0] = '\0';
    }
    if (len > p->max_line)
        return reply_error(p, reason, "reply line too long");
    if (smtp_parse_reply_line(line, len, out, reason) < 0)
        return reply_error(p, reason, *reason);
    if (p->nlines == 0)
        p->code = out->code;
    else if (out->code != p->code)
        return reply_error(p, reason, "reply code changes within a multi-line reply");
    if (p->enhanced[0] == '\0' && out->enhanced && out->enhanced_len < sizeof p->enhanced) {
        memcpy(p->enhanced, out->enhanced, out->enhanced_len);
        p->enhanced[out->enhanced_len] = '\0';
    }
    p->nlines++;
    if (out->last) {
        p->complete = 1;
        return SMTP_REPLY_DONE;
    }
    if (p->nlines >= p->max_lines)
        return reply_error(p, reason, "too many reply lines");
    return SMTP_REPLY_MORE;
}

/* Formatting: output with a capacity, like snprintf without the NUL. */
struct writer {
    char *out;
    size_t cap, pos;
};

static void w_put(struct writer *w, const char *p, size_t n)
{
    if (w->pos < w->cap) {
        size_t k = w->cap - w->pos < n ? w->cap - w->pos : n;
        memcpy(w->out + w->pos, p, k);
    }
    w->pos = n > SIZE_MAX - w->pos ? SIZE_MAX : w->pos + n;
}

/* Kept in reply text: TAB, printable ASCII and any byte >= 0x80. */
static int reply_keep(unsigned char c) { return c == '\t' || !is_ctl(c); }

struct line_iter {
    const unsigned char *t;
    size_t len, pos;
    int first;
};

/* Next output line [*start, *end) of at most width kept bytes. */
static int next_line(struct line_iter *it, size_t width, size_t *start, size_t *end)
{
    const unsigned char *t = it->t;
    size_t i = it->pos, kept = 0;
    if (!it->first && i >= it->len)
        return 0;
    it->first = 0;
    *start = i;
    while (i < it->len && t[i] != '\r' && t[i] != '\n') {
        if (reply_keep(t[i])) {
            if (kept == width)
                break;
            kept++;
        }
        i++;
    }
    if (i < it->len && t[i] != '\r' && t[i] != '\n') {
        /* wrapped: do not cut a UTF-8 sequence */
        size_t j = i;
        while (j > *start + 1 && i - j < 3 && (t[j] & 0xC0) == 0x80)
            j--;
        if ((t[j] & 0xC0) != 0x80)
            i = j;
    }
    *end = i;
    if (i < it->len && t[i] == '\r')
        i++;
    if (i < it->len && t[i] == '\n' && (i == *end || t[i - 1] == '\r'))
        i++;
    it->pos = i;
    return 1;
}

static size_t kept_count(const unsigned char *t, size_t start, size_t end)
{
    size_t k = 0;
    for (size_t i = start; i < end; i++)
        k += reply_keep(t[i]) ? 1 : 0;
    return k;
}

size_t smtp_format_reply(char *out, size_t cap, int code, const char *enhanced,
                         const char *text, size_t text_len)
{
    char digits[3];
    size_t elen = enhanced ? strlen(enhanced) : 0;
    if (code < 200 || code > 599)
        return (size_t)-1;
    digits[0] = (char)('0' + code / 100);
    digits[1] = (char)('0' + code / 10 % 10);
    digits[2] = (char)('0' + code % 10);
    if (!is_reply_code((const unsigned char *)digits))
        return (size_t)-1;
    if (elen > 0 && enhanced_len((const unsigned char *)enhanced, elen,
                                 (unsigned char)digits[0], 1) != elen)
        return (size_t)-1;
    if (text == NULL)
        text_len = 0;
    size_t width = SMTP_MAX_REPLY_LINE - 2 - 4 - (elen ? elen + 1 : 0);
    struct line_iter it = {(const unsigned char *)text, text_len, 0, 1};
    size_t nlines = 0, start, end;
    while (next_line(&it, width, &start, &end))
        nlines++;
    struct writer w = {out, cap, 0};
    it = (struct line_iter){(const unsigned char *)text, text_len, 0, 1};
    for (size_t idx = 0; next_line(&it, width, &start, &end); idx++) {
        int last = idx + 1 == nlines;
        size_t kept = kept_count(it.t, start, end);
        w_put(&w, digits, 3);
        if (!last || elen > 0 || kept > 0)
            w_put(&w, last ? " " : "-", 1);
        if (elen > 0) {
            w_put(&w, enhanced, elen);
            if (kept > 0)
                w_put(&w, " ", 1);
        }
        for (size_t i = start; i < end;) {
            size_t j = i;
            while (j < end && reply_keep(it.t[j]))
                j++;
            w_put(&w, text + i, j - i);
            i = j < end ? j + 1 : j;
        }
        w_put(&w, "\r\n", 2);
    }
    return w.pos;
}

/* ------------------------------------------------------------------ */
/* PROXY protocol (HAProxy, "proxy-protocol.txt") */

static const unsigned char proxy_v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                               0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

static int proxy_fail(const char **reason, const char *why)
{
    *reason = why;
    return SMTP_PROXY_INVALID;
}

/* Next space-separated token of line[*pos, n): non-empty. */
static int v1_token(const unsigned char *s, size_t n, size_t *pos, const unsigned char **tok,
                    size_t *tlen)
{
    size_t i = *pos;
    while (i < n && s[i] != ' ')
        i++;
    if (i == *pos)
        return -1;
    *tok = s + *pos;
    *tlen = i - *pos;
    *pos = (i < n) ? i + 1 : i; /* past the single separator */
    return (i < n && i + 1 == n) ? -1 : 0; /* no trailing space */
}

static int v1_addr(const unsigned char *tok, size_t n, int af, char *out)
{
    char buf[INET6_ADDRSTRLEN + 1];
    unsigned char bin[sizeof(struct in6_addr)];
    if (to_cstr(tok, n, buf, sizeof buf) < 0 || inet_pton(af, buf, bin) != 1)
        return -1;
    return inet_ntop(af, bin, out, 46) ? 0 : -1;
}

static int v1_port(const unsigned char *tok, size_t n, unsigned *port)
{
    unsigned v = 0;
    if (n == 0 || n > 5 || (n > 1 && tok[0] == '0'))
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (!is_digit(tok[i]))
            return -1;
        v = v * 10 + (unsigned)(tok[i] - '0');
    }
    if (v > 65535)
        return -1;
    *port = v;
    return 0;
}

/* The fields of a complete v1 line (without CRLF). */
static int proxy_v1_fields(const unsigned char *s, size_t n, struct smtp_proxy *out,
                           const char **reason)
{
    size_t pos = 6; /* after "PROXY " */
    const unsigned char *tok;
    size_t tlen;
    if (n - pos >= 7 && memcmp(s + pos, "UNKNOWN", 7) == 0 && (n - pos == 7 || s[pos + 7] == ' ')) {
        out->local = 1;
        return SMTP_PROXY_OK;
    }
    if (v1_token(s, n, &pos, &tok, &tlen) < 0)
        return proxy_fail(reason, "invalid protocol");
    int af;
    if (tlen == 4 && memcmp(tok, "TCP4", 4) == 0) {
        af = AF_INET;
        out->family = SMTP_PROXY_INET;
    } else if (tlen == 4 && memcmp(tok, "TCP6", 4) == 0) {
        af = AF_INET6;
        out->family = SMTP_PROXY_INET6;
    } else {
        return proxy_fail(reason, "invalid protocol");
    }
    if (v1_token(s, n, &pos, &tok, &tlen) < 0 || v1_addr(tok, tlen, af, out->src) < 0)
        return proxy_fail(reason, "invalid source address");
    if (v1_token(s, n, &pos, &tok, &tlen) < 0 || v1_addr(tok, tlen, af, out->dst) < 0)
        return proxy_fail(reason, "invalid destination address");
    if (v1_token(s, n, &pos, &tok, &tlen) < 0 || v1_port(tok, tlen, &out->src_port) < 0)
        return proxy_fail(reason, "invalid source port");
    if (v1_token(s, n, &pos, &tok, &tlen) < 0 || v1_port(tok, tlen, &out->dst_port) < 0 ||
        pos != n)
        return proxy_fail(reason, "invalid destination port");
    return SMTP_PROXY_OK;
}

static int proxy_v1(const unsigned char *s, size_t len, struct smtp_proxy *out,
                    const char **reason)
{
    static const char prefix[] = "PROXY ";
    const size_t max_cr = SMTP_PROXY_V1_MAX - 2; /* the CR's last position */
    for (size_t i = 0; i < len && i <= max_cr; i++) {
        unsigned char c = s[i];
        if (i < 6 && c != (unsigned char)prefix[i])
            return proxy_fail(reason, "not a PROXY protocol header");
        if (c == '\r') {
            if (i + 1 >= len)
                return SMTP_PROXY_MORE;
            if (s[i + 1] != '\n')
                return proxy_fail(reason, "bare CR in PROXY header");
            out->version = 1;
            out->consumed = i + 2;
            return proxy_v1_fields(s, i, out, reason);
        }
        if (c < 0x20 || c > 0x7e)
            return proxy_fail(reason, "invalid character in PROXY header");
    }
    if (len > max_cr)
        return proxy_fail(reason, "PROXY header too long");
    return SMTP_PROXY_MORE;
}

/* TLVs of a v2 header at p[off, n): skipped, but each must fit. */
static int proxy_v2_tlvs(const unsigned char *p, size_t off, size_t n, struct smtp_proxy *out)
{
    while (off < n) {
        if (n - off < 3)
            return -1;
        size_t vlen = (size_t)p[off + 1] << 8 | p[off + 2];
        if (vlen > n - off - 3)
            return -1;
        off += 3 + vlen;
        out->tlvs++;
    }
    return 0;
}

static int proxy_v2(const unsigned char *s, size_t len, struct smtp_proxy *out,
                    const char **reason)
{
    if (memcmp(s, proxy_v2_sig, len < 12 ? len : 12) != 0)
        return proxy_fail(reason, "not a PROXY protocol header");
    if (len > 12 && (s[12] >> 4 != 2 || (s[12] & 15) > 1))
        return proxy_fail(reason, "unsupported PROXY version or command");
    if (len > 13 && (s[13] >> 4 > 3 || (s[13] & 15) > 2))
        return proxy_fail(reason, "unsupported address family or transport");
    if (len < 16)
        return SMTP_PROXY_MORE;
    size_t plen = (size_t)s[14] << 8 | s[15];
    if (plen > SMTP_PROXY_V2_MAX)
        return proxy_fail(reason, "PROXY header too long");
    if (len - 16 < plen)
        return SMTP_PROXY_MORE;
    int cmd = s[12] & 15, fam = s[13] >> 4, proto = s[13] & 15;
    const unsigned char *p = s + 16;
    out->version = 2;
    out->consumed = 16 + plen;
    out->dgram = proto == 2;
    if (cmd == 0 || fam == 0 || proto == 0) { /* LOCAL, or nothing to report */
        out->local = 1;
        return SMTP_PROXY_OK;
    }
    static const size_t addr_len[4] = {0, 12, 36, 216};
    if (plen < addr_len[fam])
        return proxy_fail(reason, "PROXY address block too short");
    if (fam == 1) {
        out->family = SMTP_PROXY_INET;
        inet_ntop(AF_INET, p, out->src, sizeof out->src);
        inet_ntop(AF_INET, p + 4, out->dst, sizeof out->dst);
        out->src_port = (unsigned)p[8] << 8 | p[9];
        out->dst_port = (unsigned)p[10] << 8 | p[11];
    } else if (fam == 2) {
        out->family = SMTP_PROXY_INET6;
        inet_ntop(AF_INET6, p, out->src, sizeof out->src);
        inet_ntop(AF_INET6, p + 16, out->dst, sizeof out->dst);
        out->src_port = (unsigned)p[32] << 8 | p[33];
        out->dst_port = (unsigned)p[34] << 8 | p[35];
    } else {
        out->family = SMTP_PROXY_UNIX;
    }
    if (proxy_v2_tlvs(p, addr_len[fam], plen, out) < 0)
        return proxy_fail(reason, "malformed PROXY TLV");
    return SMTP_PROXY_OK;
}

int smtp_parse_proxy(const char *buf, size_t len, struct smtp_proxy *out, const char **reason)
{
    const unsigned char *s = (const unsigned char *)buf;
    memset(out, 0, sizeof *out);
    if (len == 0)
        return SMTP_PROXY_MORE;
    if (s[0] == 'P')
        return proxy_v1(s, len, out, reason);
    if (s[0] == 0x0D)
        return proxy_v2(s, len, out, reason);
    return proxy_fail(reason, "not a PROXY protocol header");
}

/* ------------------------------------------------------------------ */
/* xtext */

static int xtext_plain(unsigned char c) { return c >= '!' && c <= '~' && c != '+' && c != '='; }

size_t smtp_xtext_encode(const char *in, size_t len, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    struct writer w = {out, cap, 0};
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        if (xtext_plain(c)) {
            w_put(&w, in + i, 1);
        } else {
            char esc[3] = {'+', hex[c >> 4], hex[c & 15]};
            w_put(&w, esc, 3);
        }
    }
    return w.pos;
}

int smtp_xtext_decode(const char *in, size_t len, char *out, size_t cap, size_t *outlen)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = s[i];
        if (c == '+') {
            if (len - i < 3)
                return -1;
            int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            c = (unsigned char)(hi << 4 | lo);
            i += 2;
        } else if (!xtext_plain(c)) {
            return -1;
        }
        if (o >= cap)
            return -1;
        out[o++] = (char)c;
    }
    *outlen = o;
    return 0;
}

/* ------------------------------------------------------------------ */
/* EHLO lines */

int smtp_parse_ehlo_line(const char *text, size_t len, struct smtp_ehlo_line *out)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    memset(out, 0, sizeof *out);
    for (size_t k = 0; k < len; k++)
        if (s[k] < 0x20 || s[k] > 0x7e)
            return -1;
    if (len == 0 || !is_alnum(s[0]))
        return -1;
    while (i < len && (is_alnum(s[i]) || s[i] == '-'))
        i++;
    if (i < len && s[i] != ' ')
        return -1;
    out->keyword = (struct smtp_span){text, i};
    for (;;) {
        while (i < len && s[i] == ' ')
            i++;
        if (i >= len)
            return 0;
        size_t start = i;
        while (i < len && s[i] != ' ')
            i++;
        if (out->nparams >= SMTP_EHLO_MAX_PARAMS)
            return -1;
        out->params[out->nparams++] = (struct smtp_span){text + start, i - start};
    }
}
