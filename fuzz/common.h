/*
 * common.h - helpers shared by the fuzz harnesses (libFuzzer entry point
 * LLVMFuzzerTestOneInput; see driver.c for builds without libFuzzer).
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Abort with a message: the fuzzer records the input. */
#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

/* Small deterministic PRNG (xorshift32) for chunk boundaries. */
static inline uint32_t fz_next(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* A growable output sink for the streaming codecs. */
struct sink {
    char *p;
    size_t len, cap;
};

static inline int sink_out(void *ctx, const char *p, size_t n)
{
    struct sink *s = ctx;
    if (s->len + n > s->cap) {
        size_t cap = s->cap ? s->cap : 64;
        while (cap < s->len + n)
            cap *= 2;
        char *q = realloc(s->p, cap);
        if (q == NULL)
            return -1;
        s->p = q;
        s->cap = cap;
    }
    if (n > 0)
        memcpy(s->p + s->len, p, n);
    s->len += n;
    return 0;
}

/* memcmp that accepts NULL for empty ranges. */
static inline int same_bytes(const void *a, const void *b, size_t n)
{
    return n == 0 || memcmp(a, b, n) == 0;
}

static inline void sink_free(struct sink *s)
{
    free(s->p);
    memset(s, 0, sizeof *s);
}

#endif
