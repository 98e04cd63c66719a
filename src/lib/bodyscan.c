/*
 * bodyscan.c - size, line-end growth and content class of a message
 * body (see bodyscan.h). No Lua; bound in src/sendbody.c.
 */
#include "bodyscan.h"

#include <string.h>

void body_scan_init(struct body_scan *s) { memset(s, 0, sizeof *s); }

void body_scan_feed(struct body_scan *s, const char *p, size_t n)
{
    const unsigned char *u = (const unsigned char *)p;
    uint64_t growth = 0;
    unsigned char any = 0; /* OR of every octet: bit 7 set for 8-bit */
    int cr = s->cr, nul = s->has_nul;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = u[i];
        any |= c;
        if (cr) {
            cr = 0;
            if (c == '\n')
                continue; /* CRLF */
            growth++;     /* the CR before this octet was bare */
        }
        if (c > '\r')
            continue;
        if (c == '\n')
            growth++;
        else if (c == '\r')
            cr = 1;
        else if (c == 0)
            nul = 1;
    }
    if (n > 0) {
        unsigned char last = u[n - 1];
        s->eol = last == '\n' || last == '\r';
    }
    s->cr = cr;
    s->has_nul = nul;
    s->has_8bit |= (any & 0x80) != 0;
    s->growth += growth;
    s->size += n;
}

void body_scan_finish(struct body_scan *s)
{
    if (s->cr)
        s->growth++;
    s->cr = 0;
}
