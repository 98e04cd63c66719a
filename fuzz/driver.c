/*
 * driver.c - a main() for the harnesses when libFuzzer is not at hand
 * (gcc with ASan/UBSan): replays files and directories given as
 * arguments, then, with -n N, runs N random inputs (seed with -s S) built
 * from an SMTP-flavoured alphabet and mutations of the replayed files.
 *
 *   fuzz_data-standalone corpus/data -n 200000 -s 1
 */
#include <dirent.h>
#include <sys/stat.h>

#include "common.h"

#define DRIVER_MAX_INPUT 8192

static unsigned char *seeds[256];
static size_t seed_len[256];
static size_t nseeds;

static void run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return;
    unsigned char *buf = malloc(DRIVER_MAX_INPUT);
    size_t n = buf ? fread(buf, 1, DRIVER_MAX_INPUT, f) : 0;
    fclose(f);
    if (buf == NULL)
        return;
    LLVMFuzzerTestOneInput(buf, n);
    if (nseeds < 256) {
        seeds[nseeds] = buf;
        seed_len[nseeds++] = n;
    } else {
        free(buf);
    }
}

static void run_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return;
    if (!S_ISDIR(st.st_mode)) {
        run_file(path);
        return;
    }
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char full[4096];
        if ((size_t)snprintf(full, sizeof full, "%s/%s", path, e->d_name) < sizeof full)
            run_path(full);
    }
    if (d)
        closedir(d);
}

/* A random input: mutated seed, or tokens from an SMTP-ish alphabet. */
static size_t make_input(uint32_t *rng, unsigned char *buf)
{
    static const char *const tokens[] = {
        "\r\n", "\r", "\n", ".", "..", "\r\n.\r\n", "<", ">", "@", ":", " ", "=", "+", "\"",
        "\\", "[", "]", "MAIL FROM:", "RCPT TO:", "SIZE=", "NOTIFY=", "ORCPT=rfc822;", "PROXY ",
        "TCP4 ", "TCP6 ", "1.2.3.4", "::1", "250-", "250 ", "2.0.0 ", "a", "b.example", "\0",
        "\xc3\xa9", "\xff", "\r\n\r\n\0\r\nQUIT\n", "\x21\x11\x00\x0c", "-", ";", ",",
    };
    size_t n = 0;
    if (nseeds > 0 && fz_next(rng) % 2 == 0) {
        size_t k = fz_next(rng) % nseeds;
        n = seed_len[k];
        memcpy(buf, seeds[k], n);
        for (uint32_t m = fz_next(rng) % 8; m > 0 && n > 0; m--)
            buf[fz_next(rng) % n] = (unsigned char)fz_next(rng);
        return n;
    }
    size_t want = fz_next(rng) % 400;
    while (n < want) {
        const char *t = tokens[fz_next(rng) % (sizeof tokens / sizeof tokens[0])];
        size_t tl = t[0] == '\0' ? 1 : strlen(t);
        if (n + tl > DRIVER_MAX_INPUT)
            break;
        memcpy(buf + n, t, tl);
        n += tl;
    }
    return n;
}

int main(int argc, char **argv)
{
    long runs = 0;
    uint32_t rng = 1;
    size_t files = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-n") == 0 && i + 1 < argc)
            runs = atol(argv[++i]);
        else if (strcmp(argv[i], "-s") == 0 && i + 1 < argc)
            rng = (uint32_t)strtoul(argv[++i], NULL, 10);
        else {
            run_path(argv[i]);
            files++;
        }
    }
    unsigned char *buf = malloc(DRIVER_MAX_INPUT);
    if (buf == NULL)
        return 1;
    for (long r = 0; r < runs; r++) {
        size_t n = make_input(&rng, buf);
        unsigned char *copy = malloc(n ? n : 1); /* exact size: ASan sees overreads */
        if (copy == NULL)
            return 1;
        memcpy(copy, buf, n);
        LLVMFuzzerTestOneInput(copy, n);
        free(copy);
    }
    fprintf(stderr, "driver: %zu paths replayed, %ld random inputs, no failure\n", files, runs);
    free(buf);
    for (size_t i = 0; i < nseeds; i++)
        free(seeds[i]);
    return 0;
}
