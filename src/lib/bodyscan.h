/*
 * bodyscan.h - what a message body needs before it is sent (no Lua):
 * its size, the octets CRLF normalisation adds (one per bare CR or bare
 * LF), and its content class (7bit, 8bitmime: an octet above 127,
 * binarymime: a NUL). Fed in pieces; a CRLF split between two pieces is
 * seen as one line end.
 */
#ifndef LS_BODYSCAN_H
#define LS_BODYSCAN_H

#include <stddef.h>
#include <stdint.h>

struct body_scan {
    uint64_t size;   /* octets fed */
    uint64_t growth; /* bare CRs and bare LFs */
    int has_8bit;
    int has_nul;
    int cr;          /* the last octet fed was a CR */
    int eol;         /* the last octet fed was a CR or LF */
};

void body_scan_init(struct body_scan *s);
void body_scan_feed(struct body_scan *s, const char *p, size_t n);
/* Call once after the last piece: counts a trailing bare CR. */
void body_scan_finish(struct body_scan *s);

#endif
