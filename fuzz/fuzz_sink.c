/*
 * fuzz_sink.c - the body sink (src/lib/sink.c).
 *
 * Input: byte 0 the spool threshold (bit 7 set: spool to a file in
 * $TMPDIR or /tmp past (byte & 127) * 64 bytes; clear: memory only),
 * byte 1 header_max, bytes 2-5 the seed of the chunking; the rest is the
 * content, written in random chunks.
 *
 * The content must read back whole, in random pieces, and the header
 * block must be what a reference finds the obvious way: the first
 * "\r\n\r\n" of "\r\n" + content.
 */
#include "common.h"
#include "sink.h"

/* First i such that ("\r\n" + d)[i, i + 4) is CRLF CRLF, or -1. */
static long ref_header_end(const char *d, size_t n)
{
    for (size_t i = 0; i + 2 <= n; i++) {
        int crlf_before = i == 0 || (i >= 2 && d[i - 2] == '\r' && d[i - 1] == '\n');
        if (crlf_before && d[i] == '\r' && d[i + 1] == '\n')
            return (long)i;
    }
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 6)
        return 0;
    int spool = data[0] & 0x80;
    size_t threshold = spool ? (size_t)(data[0] & 0x7f) * 64 : (size_t)-1;
    size_t header_max = data[1];
    uint32_t seed = (uint32_t)data[2] | (uint32_t)data[3] << 8 | (uint32_t)data[4] << 16 |
                    (uint32_t)data[5] << 24;
    const char *d = (const char *)data + 6;
    size_t n = size - 6;
    const char *dir = getenv("TMPDIR");

    ls_sink k;
    CHECK(ls_sink_init(&k, spool ? (dir ? dir : "/tmp") : NULL, threshold, 0, header_max) == 0);
    for (size_t off = 0; off < n;) {
        size_t chunk = 1 + fz_next(&seed) % 300;
        if (chunk > n - off)
            chunk = n - off;
        CHECK(ls_sink_write(&k, d + off, chunk) == 0);
        off += chunk;
    }
    CHECK(ls_sink_size(&k) == n);
    CHECK(!ls_sink_spooled(&k) || spool);

    char *back = malloc(n + 1);
    CHECK(back != NULL);
    size_t got = 0;
    while (got < n) {
        size_t piece = 1 + fz_next(&seed) % 500, r = 0;
        CHECK(ls_sink_read(&k, got, back + got, piece < n - got ? piece : n - got, &r) == 0);
        CHECK(r > 0);
        got += r;
    }
    size_t r = 1;
    CHECK(ls_sink_read(&k, n, back, 1, &r) == 0 && r == 0);
    CHECK(same_bytes(back, d, n));
    free(back);

    long end = ref_header_end(d, n);
    if (end >= 0) {
        if ((size_t)end > header_max) {
            CHECK(k.hoverflow);
        } else {
            CHECK(!k.hoverflow && k.hstate == -1);
            CHECK(k.header.len == (size_t)end);
            CHECK(same_bytes(ls_buf_head(&k.header), d, (size_t)end));
            CHECK(k.body_offset == (uint64_t)end + 2);
        }
    } else if (n > header_max + 2) {
        CHECK(k.hoverflow);
    } else {
        CHECK(!k.hoverflow && k.hstate != -1);
        CHECK(k.header.len == n && same_bytes(ls_buf_head(&k.header), d, n));
    }
    ls_sink_free(&k);
    return 0;
}
