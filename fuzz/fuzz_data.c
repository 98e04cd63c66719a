/*
 * fuzz_data.c - DATA decoder and dot-stuffing encoder.
 *
 * Input: byte 0 mode (bit 0: normalise), byte 1 size limit (0: none,
 * else 4 * value), byte 2 line limit (0: none), bytes 3-6 the seed of the
 * chunking; the rest is the stream after DATA's CRLF.
 *
 * The decoder, fed in random chunks, must agree with a reference model
 * written the obvious way: the message ends at the first "\r\n.\r\n" of
 * "\r\n" + stream; dots after CRLF are removed; in normalise mode bare CR
 * and LF become CRLF. Then the stream is taken as a message body:
 * encoder (random chunks) then decoder must give it back normalised.
 */
#include "common.h"

/* End of the message in d: bytes consumed (0: no end) and content length. */
static size_t ref_end(const char *d, size_t n, size_t *content)
{
    if (n >= 3 && memcmp(d, ".\r\n", 3) == 0) {
        *content = 0;
        return 3;
    }
    for (size_t i = 0; i + 5 <= n; i++) {
        if (memcmp(d + i, "\r\n.\r\n", 5) == 0) {
            *content = i + 2;
            return i + 5;
        }
    }
    return 0;
}

struct ref {
    struct sink out;
    int bare_cr, bare_lf;
};

/* Un-stuff and (optionally) normalise d[0, n) into r. */
static void ref_decode(const char *d, size_t n, int normalise, struct ref *r)
{
    for (size_t i = 0; i < n; i++) {
        int bol = i == 0 || (i >= 2 && d[i - 2] == '\r' && d[i - 1] == '\n');
        if (bol && d[i] == '.')
            continue;
        if (d[i] == '\r' && i + 1 < n && d[i + 1] == '\n') {
            CHECK(sink_out(&r->out, "\r\n", 2) == 0);
            i++;
        } else if (d[i] == '\r' || d[i] == '\n') {
            if (d[i] == '\r')
                r->bare_cr = 1;
            else
                r->bare_lf = 1;
            CHECK(sink_out(&r->out, normalise ? "\r\n" : d + i, normalise ? 2 : 1) == 0);
        } else {
            CHECK(sink_out(&r->out, d + i, 1) == 0);
        }
    }
}

static size_t longest_line(const char *p, size_t n)
{
    size_t best = 0, start = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        if (p[i] == '\r' && p[i + 1] == '\n') {
            if (i - start > best)
                best = i - start;
            start = i + 2;
            i++;
        }
    }
    return n - start > best ? n - start : best;
}

/* Feed d[0, n) in random chunks; returns bytes consumed. */
static size_t feed_chunks(struct smtp_data_decoder *dec, const char *d, size_t n, uint32_t *rng,
                          struct sink *out, int *done)
{
    size_t pos = 0;
    *done = 0;
    while (pos < n && !*done) {
        size_t left = n - pos;
        size_t k = (fz_next(rng) % 4 == 0) ? left : 1 + fz_next(rng) % (left < 16 ? left : 16);
        size_t used = smtp_data_feed(dec, d + pos, k, sink_out, out, done);
        CHECK(used <= k);
        CHECK(*done || used == k);
        pos += used;
    }
    if (pos < n && *done) /* after the end nothing more is taken */
        CHECK(smtp_data_feed(dec, d + pos, n - pos, sink_out, out, done) == 0);
    return pos;
}

static void check_decoder(const char *d, size_t n, int normalise, uint64_t max_size,
                          size_t max_line, uint32_t seed)
{
    struct smtp_data_decoder dec;
    struct sink out = {0};
    struct ref ref = {{0}, 0, 0};
    uint32_t rng = seed;
    int done;
    smtp_data_decoder_init(&dec, max_size, max_line,
                           normalise ? SMTP_BARE_NORMALISE : SMTP_BARE_REJECT);
    size_t consumed = feed_chunks(&dec, d, n, &rng, &out, &done);
    size_t content = 0, end = ref_end(d, n, &content);
    CHECK(!dec.failed);
    if (end == 0) {
        CHECK(!done && consumed == n);
        ref_decode(d, n, normalise, &ref);
        CHECK(out.len <= ref.out.len && same_bytes(out.p, ref.out.p, out.len));
        if (max_size == 0)
            CHECK(ref.out.len - out.len <= 2); /* a pending CR, a pending dot */
    } else {
        CHECK(done && consumed == end);
        ref_decode(d, content, normalise, &ref);
        CHECK(dec.size == ref.out.len);
        CHECK(dec.too_big == (max_size > 0 && ref.out.len > max_size));
        CHECK(out.len <= ref.out.len && same_bytes(out.p, ref.out.p, out.len));
        if (!dec.too_big)
            CHECK(out.len == ref.out.len);
        else
            CHECK(out.len <= max_size);
        CHECK(dec.bare_cr == ref.bare_cr && dec.bare_lf == ref.bare_lf);
        CHECK(smtp_data_rejected(&dec) == (!normalise && (ref.bare_cr || ref.bare_lf)));
        CHECK(dec.long_line == (max_line > 0 && longest_line(ref.out.p, ref.out.len) > max_line));
    }
    sink_free(&out);
    sink_free(&ref.out);
}

/* Encode msg in random chunks, decode the result: msg comes back normalised. */
static void check_roundtrip(const char *msg, size_t n, uint32_t seed)
{
    struct smtp_data_encoder enc;
    struct sink wire = {0}, back = {0};
    struct ref expect = {{0}, 0, 0};
    uint32_t rng = seed ^ 0x5bd1e995u;
    smtp_data_encoder_init(&enc);
    for (size_t pos = 0; pos < n;) {
        size_t left = n - pos, k = 1 + fz_next(&rng) % left;
        CHECK(smtp_data_encode(&enc, msg + pos, k, sink_out, &wire) == 0);
        pos += k;
    }
    CHECK(smtp_data_encode_finish(&enc, sink_out, &wire) == 0);
    CHECK(wire.len >= 3 && memcmp(wire.p + wire.len - 3, ".\r\n", 3) == 0);
    CHECK(wire.len == 3 || (wire.len >= 5 && memcmp(wire.p + wire.len - 5, "\r\n", 2) == 0));
    size_t wire_len = wire.len;
    CHECK(sink_out(&wire, "QUIT\r\n", 6) == 0); /* pipelined after the end */
    struct smtp_data_decoder dec;
    smtp_data_decoder_init(&dec, 0, 0, SMTP_BARE_REJECT);
    int done;
    size_t consumed = feed_chunks(&dec, wire.p, wire.len, &rng, &back, &done);
    CHECK(done && consumed == wire_len);
    CHECK(!dec.bare_cr && !dec.bare_lf && !smtp_data_rejected(&dec));
    /* expected: msg with every line end made CRLF, ending with one */
    for (size_t i = 0; i < n; i++) {
        if (msg[i] == '\r' && i + 1 < n && msg[i + 1] == '\n')
            i++;
        if (msg[i] == '\r' || msg[i] == '\n')
            CHECK(sink_out(&expect.out, "\r\n", 2) == 0);
        else
            CHECK(sink_out(&expect.out, msg + i, 1) == 0);
    }
    if (expect.out.len > 0 &&
        !(expect.out.len >= 2 && memcmp(expect.out.p + expect.out.len - 2, "\r\n", 2) == 0))
        CHECK(sink_out(&expect.out, "\r\n", 2) == 0);
    CHECK(back.len == expect.out.len && same_bytes(back.p, expect.out.p, back.len));
    CHECK(dec.size == expect.out.len);
    sink_free(&wire);
    sink_free(&back);
    sink_free(&expect.out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 7)
        return 0;
    int normalise = data[0] & 1;
    uint64_t max_size = (uint64_t)data[1] * 4;
    size_t max_line = data[2];
    uint32_t seed = (uint32_t)data[3] | (uint32_t)data[4] << 8 | (uint32_t)data[5] << 16 |
                    (uint32_t)data[6] << 24;
    const char *d = (const char *)data + 7;
    size_t n = size - 7;
    check_decoder(d, n, normalise, max_size, max_line, seed);
    check_decoder(d, n, !normalise, 0, 998, seed + 1);
    check_roundtrip(d, n, seed);
    return 0;
}
