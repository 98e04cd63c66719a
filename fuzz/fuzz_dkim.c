/*
 * fuzz_dkim.c - the DKIM building blocks of src/lib/dkim.c on hostile bytes.
 *
 * The input is used whole as a tag list, a header field and a body:
 * - tags point inside the input, names are never empty, values have no
 *   leading or trailing whitespace;
 * - header canonicalisation fits the documented room, ends with CRLF,
 *   and relaxed canonicalisation is idempotent;
 * - b= stripping never grows the field;
 * - the body hash and canonical length do not depend on how the body is
 *   cut into chunks, and l= caps what is hashed.
 */
#include "common.h"
#include "dkim.h"

static void check_tags(const uint8_t *data, size_t size)
{
    dkim_tag tags[DKIM_TAGS_MAX];
    const char *s = (const char *)data;
    int n = dkim_tags_parse(s, size, tags, DKIM_TAGS_MAX);
    CHECK(n >= DKIM_TAGS_TOO_MANY && n <= DKIM_TAGS_MAX);
    for (int i = 0; i < n; i++) {
        CHECK(tags[i].name >= s && tags[i].name + tags[i].name_len <= s + size);
        CHECK(tags[i].value >= s && tags[i].value + tags[i].value_len <= s + size);
        CHECK(tags[i].name_len > 0);
        if (tags[i].value_len > 0) {
            CHECK(tags[i].value[0] > ' ' && tags[i].value[tags[i].value_len - 1] > ' ');
        }
    }
}

static void check_header(const uint8_t *data, size_t size)
{
    char *out = malloc(size + 2), *again = malloc(size + 4);
    CHECK(out != NULL && again != NULL);
    for (int relaxed = 0; relaxed <= 1; relaxed++) {
        size_t n = dkim_canon_header(relaxed, (const char *)data, size, out);
        CHECK(n >= 2 && n <= size + 2);
        CHECK(out[n - 2] == '\r' && out[n - 1] == '\n');
        if (relaxed) {
            size_t m = dkim_canon_header(1, out, n, again);
            CHECK(m == n && memcmp(out, again, n) == 0);
        }
    }
    size_t n = dkim_strip_b((const char *)data, size, out);
    CHECK(n == (size_t)-1 || n <= size);
    free(out);
    free(again);
}

static void body_hash(int relaxed, int64_t limit, const uint8_t *data, size_t size, uint32_t seed,
                      unsigned char *digest, unsigned *dlen, uint64_t *total, uint64_t *hashed)
{
    dkim_body b;
    CHECK(dkim_body_init(&b, relaxed, EVP_sha256(), limit) == 0);
    size_t pos = 0;
    while (pos < size) {
        size_t n = seed ? 1 + fz_next(&seed) % 97 : size - pos;
        if (n > size - pos)
            n = size - pos;
        CHECK(dkim_body_update(&b, (const char *)data + pos, n) == 0);
        pos += n;
    }
    CHECK(dkim_body_final(&b, digest, dlen) == 0);
    *total = b.total;
    *hashed = b.hashed;
    dkim_body_free(&b);
}

static void check_body(const uint8_t *data, size_t size)
{
    for (int relaxed = 0; relaxed <= 1; relaxed++) {
        unsigned char d1[EVP_MAX_MD_SIZE], d2[EVP_MAX_MD_SIZE];
        unsigned l1 = 0, l2 = 0;
        uint64_t t1, t2, h1, h2;
        body_hash(relaxed, -1, data, size, 0, d1, &l1, &t1, &h1);
        body_hash(relaxed, -1, data, size, (uint32_t)size * 2654435761u + 1, d2, &l2, &t2, &h2);
        CHECK(l1 == 32 && l1 == l2 && memcmp(d1, d2, l1) == 0);
        CHECK(t1 == t2 && h1 == t1);
        /* the canonical body is at most the input plus the final CRLF */
        CHECK(t1 <= size + 2);
        int64_t limit = (int64_t)(size / 2);
        body_hash(relaxed, limit, data, size, 7, d2, &l2, &t2, &h2);
        CHECK(t2 == t1 && h2 == (t1 < (uint64_t)limit ? t1 : (uint64_t)limit));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_tags(data, size);
    check_header(data, size);
    check_body(data, size);
    return 0;
}
