/*
 * fuzz_proxy.c - PROXY protocol v1/v2 parser.
 *
 * Invariants: a parsed header fits in the input and the size caps; a
 * verdict never changes when more bytes are appended (parsed stays
 * parsed with the same length, invalid stays invalid); a need-more input
 * is a proper prefix of something shorter than the caps; every proper
 * prefix of a parsed header asks for more.
 */
#include "common.h"

static int verdict(const uint8_t *d, size_t n, struct smtp_proxy *p)
{
    const char *why = NULL;
    int rc = smtp_parse_proxy((const char *)d, n, p, &why);
    CHECK(rc == SMTP_PROXY_OK || rc == SMTP_PROXY_MORE || rc == SMTP_PROXY_INVALID);
    if (rc == SMTP_PROXY_INVALID)
        CHECK(why != NULL);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct smtp_proxy p, q;
    int rc = verdict(data, size, &p);
    uint8_t *more = malloc(size + 1);
    CHECK(more != NULL);
    if (size > 0)
        memcpy(more, data, size);
    more[size] = 'X';
    int rc2 = verdict(more, size + 1, &q);
    if (rc == SMTP_PROXY_OK) {
        CHECK(p.version == 1 || p.version == 2);
        CHECK(p.consumed > 0 && p.consumed <= size);
        CHECK(p.version != 1 || p.consumed <= SMTP_PROXY_V1_MAX);
        CHECK(p.version != 2 || p.consumed <= 16 + SMTP_PROXY_V2_MAX);
        CHECK(memchr(p.src, '\0', sizeof p.src) && memchr(p.dst, '\0', sizeof p.dst));
        CHECK(p.src_port <= 65535 && p.dst_port <= 65535);
        CHECK(p.local || p.family != SMTP_PROXY_UNSPEC);
        CHECK(rc2 == SMTP_PROXY_OK && q.consumed == p.consumed);
        CHECK(strcmp(p.src, q.src) == 0 && p.src_port == q.src_port);
        /* every proper prefix asks for more (a few of them: cost) */
        size_t cuts[4] = {0, p.consumed / 2, p.consumed > 1 ? p.consumed - 1 : 0,
                          (size_t)data[size - 1] % p.consumed};
        for (int i = 0; i < 4; i++)
            CHECK(verdict(data, cuts[i], &q) == SMTP_PROXY_MORE);
    } else if (rc == SMTP_PROXY_INVALID) {
        CHECK(rc2 == SMTP_PROXY_INVALID);
    } else {
        CHECK(size < 16 + SMTP_PROXY_V2_MAX);
        CHECK(size == 0 || verdict(data, size - 1, &q) == SMTP_PROXY_MORE);
    }
    free(more);
    return 0;
}
