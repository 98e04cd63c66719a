/*
 * dnsmsg.c - DNS messages built and read by hand (see dnsmsg.h). No Lua.
 */
#include <string.h>

#include <ares.h>

#include "dnsmsg.h"

#define HEADER_LEN 12

static void put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static unsigned get16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

size_t dnsmsg_build_query(unsigned char out[DNSMSG_QUERY_MAX], const char *name,
                          uint16_t qtype, uint16_t id, uint16_t udp_size)
{
    size_t nlen = strlen(name);
    if (nlen > 0 && name[nlen - 1] == '.')
        nlen--;
    if (nlen == 0 || nlen > 253 || memchr(name, '\\', nlen) != NULL)
        return 0;
    unsigned char *p = out;
    put16(p, id);
    p[2] = 0x01;          /* QR=0, opcode 0, RD */
    p[3] = 0x20;          /* AD: RFC 6840 5.7, ask for the AD bit */
    put16(p + 4, 1);      /* one question */
    put16(p + 6, 0);
    put16(p + 8, 0);
    put16(p + 10, 1);     /* the OPT record */
    p += HEADER_LEN;
    const char *label = name, *end = name + nlen;
    while (label <= end) {
        const char *dot = memchr(label, '.', (size_t)(end - label));
        if (dot == NULL)
            dot = end;
        size_t llen = (size_t)(dot - label);
        if (llen == 0 || llen > 63)
            return 0;
        *p++ = (unsigned char)llen;
        memcpy(p, label, llen);
        p += llen;
        label = dot + 1;
    }
    *p++ = 0;             /* root: at most 1 + 253 + 1 bytes so far */
    put16(p, qtype);
    put16(p + 2, DNS_CLASS_IN);
    p += 4;
    /* OPT (RFC 6891): root owner, type 41, class = UDP payload size,
     * TTL = extended rcode 0, version 0, flags with DO (RFC 3225). */
    *p++ = 0;
    put16(p, DNS_T_OPT);
    put16(p + 2, udp_size);
    p[4] = 0;
    p[5] = 0;
    put16(p + 6, 0x8000);
    put16(p + 8, 0);
    p += 10;
    return (size_t)(p - out);
}

/* Expand the name at off into out; *used is its length in the message
 * (a compressed name is shorter than its expansion). */
static int expand(const dnsmsg *m, size_t off, char out[DNSMSG_NAME_MAX], size_t *used)
{
    if (off >= m->len)
        return -1;
    char *s = NULL;
    long enclen = 0;
    if (ares_expand_name(m->buf + off, m->buf, (int)m->len, &s, &enclen) != ARES_SUCCESS)
        return -1;
    size_t n = strlen(s);
    int ok = n < DNSMSG_NAME_MAX && enclen > 0 && (size_t)enclen <= m->len - off;
    if (ok) {
        memcpy(out, s, n + 1);
        *used = (size_t)enclen;
    }
    ares_free_string(s);
    return ok ? 0 : -1;
}

int dnsmsg_open(dnsmsg *m, const unsigned char *buf, size_t len)
{
    memset(m, 0, sizeof *m);
    /* ares_expand_name takes an int length; DNS messages are < 64 KiB. */
    if (len < HEADER_LEN || len > 65535)
        return -1;
    m->buf = buf;
    m->len = len;
    m->id = (uint16_t)get16(buf);
    m->qr = buf[2] >> 7;
    m->opcode = (buf[2] >> 3) & 15;
    m->aa = (buf[2] >> 2) & 1;
    m->tc = (buf[2] >> 1) & 1;
    m->rd = buf[2] & 1;
    m->ra = buf[3] >> 7;
    m->ad = (buf[3] >> 5) & 1;
    m->cd = (buf[3] >> 4) & 1;
    m->rcode = buf[3] & 15;
    for (int i = 0; i < 4; i++)
        m->counts[i] = get16(buf + 4 + 2 * i);
    size_t pos = HEADER_LEN;
    char name[DNSMSG_NAME_MAX];
    for (unsigned q = 0; q < m->counts[0]; q++) {
        size_t used;
        if (expand(m, pos, name, &used) != 0 || m->len - pos - used < 4)
            return -1;
        pos += used + 4;
    }
    m->pos = pos;
    m->section = DNS_SEC_ANSWER;
    m->left = m->counts[1];
    return 0;
}

int dnsmsg_next(dnsmsg *m, dnsmsg_rr *rr)
{
    while (m->left == 0) {
        if (m->section >= DNS_SEC_ADDITIONAL)
            return 0;
        m->section++;
        m->left = m->counts[m->section];
    }
    size_t used;
    if (expand(m, m->pos, rr->name, &used) != 0)
        return -1;
    size_t p = m->pos + used;
    if (m->len - p < 10)
        return -1;
    rr->section = m->section;
    rr->type = (uint16_t)get16(m->buf + p);
    rr->rclass = (uint16_t)get16(m->buf + p + 2);
    rr->ttl = get32(m->buf + p + 4);
    if (rr->ttl > 0x7fffffffu) /* RFC 2181 8: treat as zero */
        rr->ttl = 0;
    rr->rdlen = get16(m->buf + p + 8);
    rr->rdata = p + 10;
    if (m->len - rr->rdata < rr->rdlen)
        return -1;
    m->pos = rr->rdata + rr->rdlen;
    m->left--;
    return 1;
}

/* A name inside the rdata at offset off; it must end within the rdata. */
static int rd_name_at(const dnsmsg *m, const dnsmsg_rr *rr, size_t off,
                      char out[DNSMSG_NAME_MAX], size_t *used)
{
    if (off >= rr->rdlen)
        return -1;
    if (expand(m, rr->rdata + off, out, used) != 0 || *used > rr->rdlen - off)
        return -1;
    return 0;
}

int dnsmsg_rd_name(const dnsmsg *m, const dnsmsg_rr *rr, char out[DNSMSG_NAME_MAX])
{
    size_t used;
    if (rd_name_at(m, rr, 0, out, &used) != 0 || used != rr->rdlen)
        return -1;
    return 0;
}

int dnsmsg_rd_mx(const dnsmsg *m, const dnsmsg_rr *rr, unsigned *pref,
                 char out[DNSMSG_NAME_MAX])
{
    size_t used;
    if (rr->rdlen < 3 || rd_name_at(m, rr, 2, out, &used) != 0 || used != rr->rdlen - 2)
        return -1;
    *pref = get16(m->buf + rr->rdata);
    return 0;
}

int dnsmsg_rd_soa_minimum(const dnsmsg *m, const dnsmsg_rr *rr, uint32_t *minimum)
{
    char name[DNSMSG_NAME_MAX];
    size_t used, off = 0;
    for (int i = 0; i < 2; i++) { /* MNAME, RNAME */
        if (rd_name_at(m, rr, off, name, &used) != 0)
            return -1;
        off += used;
    }
    if (rr->rdlen - off != 20) /* SERIAL REFRESH RETRY EXPIRE MINIMUM */
        return -1;
    *minimum = get32(m->buf + rr->rdata + off + 16);
    return 0;
}

int dnsmsg_rd_tlsa(const dnsmsg *m, const dnsmsg_rr *rr, unsigned *usage,
                   unsigned *selector, unsigned *mtype, const unsigned char **data,
                   size_t *dlen)
{
    if (rr->rdlen < 4) /* RFC 6698 2.1: at least one byte of data */
        return -1;
    const unsigned char *p = m->buf + rr->rdata;
    *usage = p[0];
    *selector = p[1];
    *mtype = p[2];
    *data = p + 3;
    *dlen = rr->rdlen - 3;
    return 0;
}

int dnsmsg_rd_txt(const dnsmsg *m, const dnsmsg_rr *rr,
                  void (*fn)(void *arg, const unsigned char *s, size_t n), void *arg)
{
    const unsigned char *p = m->buf + rr->rdata;
    size_t left = rr->rdlen;
    if (left == 0)
        return -1;
    while (left > 0) {
        size_t n = p[0];
        if (n + 1 > left)
            return -1;
        fn(arg, p + 1, n);
        p += n + 1;
        left -= n + 1;
    }
    return 0;
}

int dnsmsg_name_eq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 0 && a[la - 1] == '.')
        la--;
    if (lb > 0 && b[lb - 1] == '.')
        lb--;
    if (la != lb)
        return 0;
    for (size_t i = 0; i < la; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x >= 'A' && x <= 'Z')
            x = (unsigned char)(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z')
            y = (unsigned char)(y - 'A' + 'a');
        if (x != y)
            return 0;
    }
    return 1;
}
