/*
 * fuzz_reply.c - reply parser (lines and multi-line) and reply formatter.
 *
 * Input: bytes 0-1 pick a reply code, byte 2 an enhanced code; the rest is
 * both a list of reply lines (split on LF, a CR before it dropped) for the
 * parser, and a hostile text for the formatter. The formatter's output
 * must be a well-formed reply that the parser reads back as one reply
 * with the same code, carrying exactly the text's printable bytes.
 */
#include "common.h"

static int keep(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

static void check_lines(const char *d, size_t n)
{
    struct smtp_reply_parser p;
    struct smtp_reply_line r;
    const char *why = NULL;
    smtp_reply_parser_init(&p, 5, 100);
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && d[i] != '\n')
            continue;
        size_t len = i - start;
        if (len > 0 && d[start + len - 1] == '\r')
            len--;
        int rc = smtp_reply_feed(&p, d + start, len, &r, &why);
        if (rc == SMTP_REPLY_ERROR) {
            CHECK(why != NULL);
        } else {
            CHECK(r.code >= 200 && r.code <= 559 && r.code == p.code);
            CHECK(r.text >= d + start && r.text + r.text_len <= d + start + len);
            CHECK(len <= 100 && p.nlines <= 5);
            CHECK(rc == (r.last ? SMTP_REPLY_DONE : SMTP_REPLY_MORE));
            if (r.enhanced)
                CHECK(r.enhanced_len >= 5 && r.enhanced_len <= 9 &&
                      r.enhanced[0] == d[start]);
            for (size_t k = 0; k < r.text_len; k++)
                CHECK(keep((unsigned char)r.text[k]));
        }
        start = i + 1;
    }
}

static void check_format(int code, const char *enh, const char *text, size_t n)
{
    size_t need = smtp_format_reply(NULL, 0, code, enh, text, n);
    int valid_code = code >= 200 && code <= 599 && code / 10 % 10 <= 5;
    if (need == (size_t)-1) {
        CHECK(!valid_code || (enh && enh[0] != (char)('0' + code / 100)));
        return;
    }
    CHECK(valid_code);
    char *out = malloc(need + 1);
    CHECK(out != NULL);
    CHECK(smtp_format_reply(out, need, code, enh, text, n) == need);
    size_t elen = enh ? strlen(enh) : 0;
    struct smtp_reply_parser p;
    struct smtp_reply_line r;
    const char *why = NULL;
    smtp_reply_parser_init(&p, (size_t)-1, SMTP_MAX_REPLY_LINE);
    struct sink got = {0};
    size_t start = 0;
    int rc = SMTP_REPLY_MORE;
    CHECK(need >= 5);
    for (size_t i = 0; i + 1 < need; i++) {
        if (out[i] != '\r')
            continue;
        CHECK(out[i + 1] == '\n'); /* CR only as part of CRLF */
        CHECK(rc == SMTP_REPLY_MORE); /* nothing after the last line */
        size_t len = i - start;
        CHECK(len + 2 <= SMTP_MAX_REPLY_LINE);
        for (size_t k = start; k < i; k++)
            CHECK(keep((unsigned char)out[k]));
        rc = smtp_reply_feed(&p, out + start, len, &r, &why);
        CHECK(rc != SMTP_REPLY_ERROR);
        CHECK(r.code == code);
        size_t prefix = 4 + (elen ? elen + 1 : 0);
        if (elen)
            CHECK(len >= 4 + elen && memcmp(out + start + 4, enh, elen) == 0);
        if (len > prefix)
            CHECK(sink_out(&got, out + start + prefix, len - prefix) == 0);
        start = i + 2;
        i++;
    }
    CHECK(rc == SMTP_REPLY_DONE && start == need);
    struct sink want = {0};
    for (size_t i = 0; i < n; i++)
        if (keep((unsigned char)text[i]))
            CHECK(sink_out(&want, text + i, 1) == 0);
    CHECK(got.len == want.len && same_bytes(got.p, want.p, got.len));
    sink_free(&got);
    sink_free(&want);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    int code = 200 + ((data[0] << 8 | data[1]) % 400);
    char enh[16];
    const char *e = NULL;
    if (data[2] != 0) {
        int cls = (data[2] & 0x80) ? code / 100 : 2 + data[2] % 4; /* sometimes wrong */
        snprintf(enh, sizeof enh, "%d.%d.%d", cls, data[2] % 10, data[2] % 123);
        e = enh;
    }
    const char *d = (const char *)data + 3;
    size_t n = size - 3;
    check_lines(d, n);
    check_format(code, e, d, n);
    return 0;
}
