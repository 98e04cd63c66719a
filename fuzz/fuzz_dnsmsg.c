/*
 * fuzz_dnsmsg.c - the DNS reply reader of src/dnsmsg.c (used for queries
 * with DNSSEC status) on hostile bytes.
 *
 * Input: a DNS message. Every record the reader returns must lie inside
 * the message and every rdata reader must either succeed with values
 * inside the rdata or refuse. A query built from a name taken from the
 * input must read back as one question with AD, RD and an OPT record.
 */
#include "common.h"
#include "dnsmsg.h"

static size_t txt_total;

static void txt_piece(void *arg, const unsigned char *s, size_t n)
{
    (void)arg;
    (void)s;
    txt_total += n + 1;
}

static void check_reply(const uint8_t *data, size_t size)
{
    dnsmsg m;
    dnsmsg_rr rr;
    if (dnsmsg_open(&m, data, size) != 0)
        return;
    CHECK(m.pos <= size);
    int r, n = 0;
    while ((r = dnsmsg_next(&m, &rr)) == 1) {
        n++;
        CHECK(rr.rdata <= size && rr.rdlen <= size - rr.rdata);
        CHECK(strlen(rr.name) < DNSMSG_NAME_MAX);
        CHECK(rr.section >= DNS_SEC_ANSWER && rr.section <= DNS_SEC_ADDITIONAL);
        CHECK(rr.ttl <= 0x7fffffffu);
        char name[DNSMSG_NAME_MAX];
        unsigned a, b, c;
        uint32_t minimum;
        const unsigned char *d;
        size_t dlen;
        if (dnsmsg_rd_name(&m, &rr, name) == 0)
            CHECK(strlen(name) < DNSMSG_NAME_MAX);
        if (dnsmsg_rd_mx(&m, &rr, &a, name) == 0)
            CHECK(a <= 65535 && rr.rdlen >= 3);
        (void)dnsmsg_rd_soa_minimum(&m, &rr, &minimum);
        if (dnsmsg_rd_tlsa(&m, &rr, &a, &b, &c, &d, &dlen) == 0)
            CHECK(d == data + rr.rdata + 3 && dlen == rr.rdlen - 3 && a < 256 && b < 256 && c < 256);
        txt_total = 0;
        if (dnsmsg_rd_txt(&m, &rr, txt_piece, NULL) == 0)
            CHECK(txt_total == rr.rdlen);
    }
    CHECK(r == 0 || r == -1);
    CHECK(n <= 65535 * 3);
}

static void check_query(const uint8_t *data, size_t size)
{
    char name[300];
    size_t n = size < sizeof name - 1 ? size : sizeof name - 1;
    memcpy(name, data, n);
    name[n] = '\0';
    unsigned char q[DNSMSG_QUERY_MAX];
    size_t len = dnsmsg_build_query(q, name, DNS_T_TLSA, 0x1234, 1232);
    if (len == 0)
        return;
    CHECK(len <= DNSMSG_QUERY_MAX);
    dnsmsg m;
    dnsmsg_rr rr;
    CHECK(dnsmsg_open(&m, q, len) == 0);
    CHECK(m.id == 0x1234 && m.rd && m.ad && !m.qr && m.counts[0] == 1 && m.counts[3] == 1);
    CHECK(dnsmsg_next(&m, &rr) == 1);
    CHECK(rr.type == DNS_T_OPT && rr.rclass == 1232 && rr.ttl == 0x8000 && rr.rdlen == 0);
    CHECK(dnsmsg_next(&m, &rr) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_reply(data, size);
    check_query(data, size);
    return 0;
}
