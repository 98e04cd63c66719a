/*
 * fuzz_command.c - command parser, domain check, xtext and EHLO lines.
 *
 * Input: byte 0 holds option bits (utf8, strict_space, max_params), the
 * rest is one command line. Invariants: results stay inside the line and
 * the documented limits; an accepted path re-parses to itself; xtext
 * round-trips.
 */
#include "common.h"

static int has_ctl(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] < 0x20 || (unsigned char)p[i] == 0x7f)
            return 1;
    return 0;
}

static int inside(const char *p, size_t n, const char *line, size_t len)
{
    return p >= line && n <= len && (size_t)(p - line) <= len - n;
}

static int same_keyword(const struct smtp_param *a, const struct smtp_param *b)
{
    if (a->name_len != b->name_len)
        return 0;
    for (size_t k = 0; k < a->name_len; k++)
        if ((a->name[k] | 0x20) != (b->name[k] | 0x20))
            return 0;
    return 1;
}

static void check_path(const struct smtp_cmd *c, const struct smtp_cmd_opts *o)
{
    const struct smtp_path *p = &c->path;
    CHECK(p->len <= SMTP_MAX_PATH && p->addr[p->len] == '\0');
    CHECK(p->local_len <= SMTP_MAX_LOCAL && p->local_len <= p->len);
    CHECK(p->domain_off <= p->len);
    CHECK(!p->null || (p->len == 0 && c->verb == SMTP_MAIL));
    CHECK(!p->postmaster || c->verb == SMTP_RCPT);
    if (c->verb == SMTP_RCPT && !o->utf8)
        CHECK(!p->utf8);
    CHECK(c->nparams <= SMTP_MAX_PARAMS && c->nunknown <= c->nparams);
    if (p->null || p->postmaster)
        return;
    /* the address without its route is a valid path of its own */
    char line[SMTP_MAX_PATH + 32];
    int n = snprintf(line, sizeof line, "MAIL FROM:<%s>%s", p->addr, p->utf8 ? " SMTPUTF8" : "");
    CHECK(n > 0 && (size_t)n < sizeof line);
    struct smtp_cmd *again = malloc(sizeof *again);
    CHECK(again != NULL);
    CHECK(smtp_parse_command(line, (size_t)n, again) == SMTP_OK);
    CHECK(again->path.len == p->len && memcmp(again->path.addr, p->addr, p->len) == 0);
    free(again);
}

static void check_command(const char *line, size_t len, const struct smtp_cmd_opts *o)
{
    struct smtp_cmd *c = malloc(sizeof *c);
    CHECK(c != NULL);
    enum smtp_status st = smtp_parse_command_ex(line, len, o, c);
    if (st != SMTP_OK) {
        CHECK(c->err.code == 500 || c->err.code == 501 || c->err.code == 553);
        CHECK(c->err.enhanced != NULL && c->err.text != NULL);
        free(c);
        return;
    }
    CHECK(len > 0 && len <= SMTP_MAX_COMMAND && !has_ctl(line, len));
    CHECK(inside(c->word, c->word_len, line, len) && inside(c->arg, c->arg_len, line, len));
    CHECK(c->verb == SMTP_UNKNOWN || c->err.code == 0);
    for (size_t i = 0; i < c->nparams; i++) {
        CHECK(inside(c->params[i].name, c->params[i].name_len, line, len));
        for (size_t j = 0; j < i; j++) /* a repeated keyword is kept once */
            CHECK(!same_keyword(&c->params[i], &c->params[j]));
        CHECK(c->params[i].value == NULL ||
              inside(c->params[i].value, c->params[i].value_len, line, len));
    }
    if (c->verb == SMTP_MAIL || c->verb == SMTP_RCPT)
        check_path(c, o);
    if (c->verb == SMTP_BDAT)
        CHECK(c->chunk_size <= SMTP_MAX_BDAT_CHUNK);
    if (c->verb == SMTP_AUTH)
        CHECK(c->mech_len > 0 && c->mech_len <= SMTP_MAX_MECH);
    if (c->verb == SMTP_EHLO || c->verb == SMTP_HELO || c->verb == SMTP_LHLO)
        CHECK(c->domain_len > 0 && c->domain_len <= SMTP_MAX_DOMAIN);
    CHECK(c->mp.envid_len <= SMTP_MAX_ENVID && c->mp.orcpt_len <= SMTP_MAX_ORCPT);
    free(c);
}

static void check_xtext(const char *in, size_t len)
{
    size_t need = smtp_xtext_encode(in, len, NULL, 0);
    CHECK(need >= len && need <= 3 * len);
    char *enc = malloc(need + 1), *dec = malloc(len + 1);
    CHECK(enc && dec);
    CHECK(smtp_xtext_encode(in, len, enc, need) == need);
    size_t outlen = 0;
    CHECK(smtp_xtext_decode(enc, need, dec, len, &outlen) == 0);
    CHECK(outlen == len && memcmp(dec, in, len) == 0);
    /* whatever decodes, encodes into something that decodes the same */
    if (smtp_xtext_decode(in, len, dec, len, &outlen) == 0) {
        char *enc2 = malloc(3 * outlen + 1), *dec2 = malloc(outlen + 1);
        CHECK(enc2 && dec2);
        size_t n2 = smtp_xtext_encode(dec, outlen, enc2, 3 * outlen);
        size_t out2 = 0;
        CHECK(smtp_xtext_decode(enc2, n2, dec2, outlen, &out2) == 0);
        CHECK(out2 == outlen && memcmp(dec2, dec, outlen) == 0);
        free(enc2);
        free(dec2);
    }
    free(enc);
    free(dec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    struct smtp_cmd_opts o = {data[0] & 1, (data[0] >> 1) & 1, (size_t)(data[0] >> 2) % 20};
    const char *line = (const char *)data + 1;
    size_t len = size - 1;
    check_command(line, len, &o);
    int literal = 0;
    if (smtp_check_domain(line, len, o.utf8, &literal) == 0)
        CHECK(len > 0 && len <= SMTP_MAX_DOMAIN && literal == (line[0] == '['));
    check_xtext(line, len);
    struct smtp_ehlo_line e;
    if (smtp_parse_ehlo_line(line, len, &e) == 0) {
        CHECK(e.keyword.len > 0 && e.nparams <= SMTP_EHLO_MAX_PARAMS);
        for (size_t i = 0; i < e.nparams; i++)
            CHECK(e.params[i].len > 0 && inside(e.params[i].p, e.params[i].len, line, len));
    }
    return 0;
}
