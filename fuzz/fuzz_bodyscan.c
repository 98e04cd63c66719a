/*
 * fuzz_bodyscan.c - the body scanner (src/lib/bodyscan.c).
 *
 * Input: bytes 0-3 the seed of the chunking, the rest the body, fed in
 * random pieces (empty pieces too). The result must equal what a
 * reference finds over the whole body octet by octet: the size, one
 * octet of growth per CR not followed by LF and per LF not preceded by
 * CR, 8-bit when an octet is above 127, NUL when one is 0, and whether
 * the body ends in a line-end octet.
 */
#include "common.h"
#include "bodyscan.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    uint32_t seed = (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 |
                    (uint32_t)data[3] << 24;
    const char *d = (const char *)data + 4;
    size_t n = size - 4;

    uint64_t growth = 0;
    int has_8bit = 0, has_nul = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)d[i];
        if (c == '\r' && (i + 1 == n || d[i + 1] != '\n'))
            growth++;
        if (c == '\n' && (i == 0 || d[i - 1] != '\r'))
            growth++;
        has_8bit |= c > 127;
        has_nul |= c == 0;
    }

    struct body_scan s;
    body_scan_init(&s);
    for (size_t off = 0; off <= n;) {
        size_t piece = fz_next(&seed) % 70; /* 0: an empty piece */
        if (piece > n - off)
            piece = n - off;
        body_scan_feed(&s, d + off, piece);
        off += piece;
        if (off == n && piece == 0)
            break;
    }
    int eol = s.eol;
    body_scan_finish(&s);

    CHECK(s.size == n);
    CHECK(s.growth == growth);
    CHECK(s.has_8bit == has_8bit);
    CHECK(s.has_nul == has_nul);
    if (n > 0)
        CHECK(eol == (d[n - 1] == '\n' || d[n - 1] == '\r'));
    return 0;
}
