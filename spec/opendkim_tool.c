/*
 * opendkim_tool.c - libopendkim as a test peer and benchmark partner,
 * keys from a file instead of DNS (DKIM_QUERY_FILE).
 *
 *   opendkim_tool verify KEYS MESSAGE [COUNT]
 *       prints "pass" or "fail <error>" per signature (of the last round);
 *       COUNT rounds for the benchmark
 *   opendkim_tool sign KEY.pem DOMAIN SELECTOR ALGO CANON MESSAGE [COUNT]
 *       prints the DKIM-Signature field (CRLF line ends)
 *
 * KEYS: lines "selector._domainkey.domain record". MESSAGE: CRLF lines.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <opendkim/dkim.h>

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        exit(2);
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf != NULL && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
    }
    fclose(f);
    if (buf == NULL)
        exit(2);
    buf[n] = '\0';
    *len = n;
    return buf;
}

static void die(const char *what, DKIM_STAT st)
{
    fprintf(stderr, "opendkim_tool: %s: %s\n", what, dkim_getresultstr(st));
    exit(1);
}

/* Feed the message: each header field without its final CRLF, then the
 * body. */
static void feed(DKIM *d, char *msg, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (len - i >= 2 && msg[i] == '\r' && msg[i + 1] == '\n') {
            i += 2;
            break;
        }
        size_t start = i;
        for (;;) {
            char *e = memchr(msg + i, '\n', len - i);
            if (e == NULL) {
                i = len;
                break;
            }
            i = (size_t)(e - msg) + 1;
            if (i >= len || (msg[i] != ' ' && msg[i] != '\t'))
                break;
        }
        size_t flen = i - start;
        while (flen > 0 && (msg[start + flen - 1] == '\n' || msg[start + flen - 1] == '\r'))
            flen--;
        DKIM_STAT st = dkim_header(d, (u_char *)msg + start, flen);
        if (st != DKIM_STAT_OK)
            die("dkim_header", st);
    }
    DKIM_STAT st = dkim_eoh(d);
    if (st != DKIM_STAT_OK && st != DKIM_STAT_NOSIG)
        die("dkim_eoh", st);
    if (i < len && (st = dkim_body(d, (u_char *)msg + i, len - i)) != DKIM_STAT_OK)
        die("dkim_body", st);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: see opendkim_tool.c\n");
        return 2;
    }
    DKIM_LIB *lib = dkim_init(NULL, NULL);
    if (lib == NULL)
        return 2;
    DKIM_STAT st;
    if (strcmp(argv[1], "verify") == 0) {
        int method = DKIM_QUERY_FILE;
        dkim_options(lib, DKIM_OP_SETOPT, DKIM_OPTS_QUERYMETHOD, &method, sizeof method);
        dkim_options(lib, DKIM_OP_SETOPT, DKIM_OPTS_QUERYINFO, argv[2], strlen(argv[2]));
        size_t len;
        char *msg = slurp(argv[3], &len);
        long count = argc > 4 ? atol(argv[4]) : 1;
        for (long round = 0; round < count; round++) {
            DKIM *d = dkim_verify(lib, (const u_char *)"t", NULL, &st);
            if (d == NULL)
                die("dkim_verify", st);
            feed(d, msg, len);
            dkim_eom(d, NULL);
            if (round == count - 1) {
                DKIM_SIGINFO **sigs;
                int nsigs = 0;
                if (dkim_getsiglist(d, &sigs, &nsigs) == DKIM_STAT_OK) {
                    for (int k = 0; k < nsigs; k++) {
                        if (DKIM_SIG_CHECK(sigs[k]))
                            printf("pass\n");
                        else
                            printf("fail %s\n", dkim_sig_geterrorstr(dkim_sig_geterror(sigs[k])));
                    }
                }
            }
            dkim_free(d);
        }
        free(msg);
    } else if (strcmp(argv[1], "sign") == 0 && argc >= 8) {
        size_t klen, len;
        char *key = slurp(argv[2], &klen);
        char *msg = slurp(argv[7], &len);
        dkim_alg_t alg = strcmp(argv[5], "ed25519-sha256") == 0 ? DKIM_SIGN_ED25519SHA256
                         : strcmp(argv[5], "rsa-sha1") == 0   ? DKIM_SIGN_RSASHA1
                                                              : DKIM_SIGN_RSASHA256;
        dkim_canon_t hc = strncmp(argv[6], "relaxed/", 8) == 0 ? DKIM_CANON_RELAXED : DKIM_CANON_SIMPLE;
        const char *slash = strchr(argv[6], '/');
        dkim_canon_t bc = slash && strcmp(slash + 1, "relaxed") == 0 ? DKIM_CANON_RELAXED
                                                                      : DKIM_CANON_SIMPLE;
        long count = argc > 8 ? atol(argv[8]) : 1;
        for (long round = 0; round < count; round++) {
            DKIM *d = dkim_sign(lib, (const u_char *)"t", NULL, (dkim_sigkey_t)key,
                                (const u_char *)argv[4], (const u_char *)argv[3], hc, bc, alg, -1, &st);
            if (d == NULL)
                die("dkim_sign", st);
            feed(d, msg, len);
            if ((st = dkim_eom(d, NULL)) != DKIM_STAT_OK)
                die("dkim_eom", st);
            if (round == count - 1) {
                u_char *hdr;
                size_t hlen;
                if ((st = dkim_getsighdr_d(d, strlen(DKIM_SIGNHEADER) + 2, &hdr, &hlen)) != DKIM_STAT_OK)
                    die("dkim_getsighdr_d", st);
                printf("%s: %.*s\r\n", DKIM_SIGNHEADER, (int)hlen, (const char *)hdr);
            }
            dkim_free(d);
        }
        free(key);
        free(msg);
    } else {
        fprintf(stderr, "usage: see opendkim_tool.c\n");
        return 2;
    }
    dkim_close(lib);
    return 0;
}
