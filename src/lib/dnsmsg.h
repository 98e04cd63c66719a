/*
 * dnsmsg.h - DNS messages (RFC 1035, RFC 6891) built and read by hand,
 * no Lua. Used by dns.c for queries whose DNSSEC status matters: the
 * query carries AD and an EDNS0 OPT record with DO, and the reply is
 * read from its raw bytes (rcode, AD, each resource record).
 *
 * Every offset and length taken from a reply is checked against the
 * message size before use; names are expanded with c-ares'
 * ares_expand_name (compression pointers, loops and lengths checked
 * there) and then copied into caller buffers of DNSMSG_NAME_MAX bytes.
 */
#ifndef LUASMTP_DNSMSG_H
#define LUASMTP_DNSMSG_H

#include <stddef.h>
#include <stdint.h>

enum {
    DNS_CLASS_IN = 1,
    DNS_T_A = 1,
    DNS_T_NS = 2,
    DNS_T_CNAME = 5,
    DNS_T_SOA = 6,
    DNS_T_MX = 15,
    DNS_T_TXT = 16,
    DNS_T_AAAA = 28,
    DNS_T_OPT = 41,
    DNS_T_TLSA = 52,
};

enum {
    DNS_RCODE_NOERROR = 0,
    DNS_RCODE_FORMERR = 1,
    DNS_RCODE_SERVFAIL = 2,
    DNS_RCODE_NXDOMAIN = 3,
    DNS_RCODE_NOTIMP = 4,
    DNS_RCODE_REFUSED = 5,
};

enum { DNS_SEC_ANSWER = 1, DNS_SEC_AUTHORITY = 2, DNS_SEC_ADDITIONAL = 3 };

/* Presentation form of a name (escapes included) plus the NUL. */
#define DNSMSG_NAME_MAX 1024
/* A query: header, a name of at most 255 bytes, type, class, OPT. */
#define DNSMSG_QUERY_MAX (12 + 255 + 4 + 11)

/* Build a query for name (presentation form without escapes, with or
 * without the final dot) and qtype: RD and AD set, one question, an
 * OPT record (UDP payload size udp_size, DO set) as the only
 * additional record. Returns the length, or 0 when the name is not
 * valid (empty label, label over 63 bytes, name over 255 bytes, a
 * backslash). */
size_t dnsmsg_build_query(unsigned char out[DNSMSG_QUERY_MAX], const char *name,
                          uint16_t qtype, uint16_t id, uint16_t udp_size);

typedef struct dnsmsg {
    const unsigned char *buf;
    size_t len;
    uint16_t id;
    int qr, opcode, aa, tc, rd, ra, ad, cd;
    int rcode;           /* 4-bit header rcode (extended bits from OPT ignored) */
    unsigned counts[4];  /* question, answer, authority, additional */
    size_t pos;          /* next resource record */
    int section;         /* section of the next record */
    unsigned left;       /* records left in that section */
} dnsmsg;

typedef struct dnsmsg_rr {
    char name[DNSMSG_NAME_MAX];
    int section;
    uint16_t type, rclass;
    uint32_t ttl;
    size_t rdata;   /* offset of the rdata in the message */
    size_t rdlen;
} dnsmsg_rr;

/* Read the header and skip the question section. 0 on success, -1
 * when the message is malformed. */
int dnsmsg_open(dnsmsg *m, const unsigned char *buf, size_t len);
/* The next resource record: 1, 0 at the end, -1 when malformed. */
int dnsmsg_next(dnsmsg *m, dnsmsg_rr *rr);

/* Rdata readers; all return 0 on success, -1 when the rdata is
 * malformed for its type (a name that runs past the rdata included). */
int dnsmsg_rd_name(const dnsmsg *m, const dnsmsg_rr *rr, char out[DNSMSG_NAME_MAX]);
int dnsmsg_rd_mx(const dnsmsg *m, const dnsmsg_rr *rr, unsigned *pref,
                 char out[DNSMSG_NAME_MAX]);
/* SOA: the two TTL bounds RFC 2308 takes the negative TTL from. */
int dnsmsg_rd_soa_minimum(const dnsmsg *m, const dnsmsg_rr *rr, uint32_t *minimum);
/* TLSA: usage, selector, matching type and the association data. */
int dnsmsg_rd_tlsa(const dnsmsg *m, const dnsmsg_rr *rr, unsigned *usage,
                   unsigned *selector, unsigned *mtype, const unsigned char **data,
                   size_t *dlen);
/* TXT: calls fn once per character-string, in order. */
int dnsmsg_rd_txt(const dnsmsg *m, const dnsmsg_rr *rr,
                  void (*fn)(void *arg, const unsigned char *s, size_t n), void *arg);

/* ASCII case-insensitive name equality, ignoring one final dot on
 * either side. */
int dnsmsg_name_eq(const char *a, const char *b);

#endif
