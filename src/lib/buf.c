/*
 * buf.c - byte buffer used for socket input and output.
 *
 * Plain C, no Lua. Data lives in data[off .. off+len). Space at the front
 * is reclaimed by moving the data down before growing, so a long-lived
 * connection reuses one allocation.
 */
#include <stdlib.h>
#include <string.h>

#include "buf.h"

void ls_buf_init(ls_buf *b) { memset(b, 0, sizeof *b); }

void ls_buf_account(ls_buf *b, size_t *account) { b->account = account; }

/* The allocation is now ncap bytes at p (NULL, 0: none). */
static void set_alloc(ls_buf *b, char *p, size_t ncap)
{
    if (b->account)
        *b->account = *b->account - b->cap + ncap;
    b->data = p;
    b->cap = ncap;
}

void ls_buf_free(ls_buf *b)
{
    free(b->data);
    set_alloc(b, NULL, 0);
    b->off = 0;
    b->len = 0;
}

char *ls_buf_reserve(ls_buf *b, size_t need)
{
    if (b->cap - b->off - b->len >= need)
        return b->data + b->off + b->len;
    if (b->off > 0) { /* reclaim the consumed front first */
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
        if (b->cap - b->len >= need)
            return b->data + b->len;
    }
    if (need > ((size_t)-1) / 2 - b->len)
        return NULL;
    size_t ncap = b->cap > 4096 ? b->cap : 4096;
    while (ncap - b->len < need)
        ncap *= 2;
    char *p = realloc(b->data, ncap);
    if (p == NULL)
        return NULL;
    set_alloc(b, p, ncap);
    return b->data + b->len;
}

void ls_buf_commit(ls_buf *b, size_t n) { b->len += n; }

int ls_buf_append(ls_buf *b, const char *p, size_t n)
{
    char *dst = ls_buf_reserve(b, n);
    if (dst == NULL)
        return -1;
    memcpy(dst, p, n);
    b->len += n;
    return 0;
}

void ls_buf_consume(ls_buf *b, size_t n)
{
    if (n >= b->len) {
        b->off = 0;
        b->len = 0;
        /* Give back large buffers once they are drained. */
        if (b->cap > 256 * 1024)
            ls_buf_free(b);
        return;
    }
    b->off += n;
    b->len -= n;
}

void ls_buf_shrink(ls_buf *b)
{
    if (b->len == 0) {
        ls_buf_free(b);
        return;
    }
    if (b->cap - b->len < 1024)
        return; /* little to gain */
    memmove(b->data, b->data + b->off, b->len);
    b->off = 0;
    char *p = realloc(b->data, b->len);
    if (p != NULL) /* else the old, larger block stays: still valid */
        set_alloc(b, p, b->len);
}

size_t ls_buf_find(const ls_buf *b, size_t from, const char *delim, size_t dlen)
{
    if (dlen == 0 || from >= b->len || b->len - from < dlen)
        return (size_t)-1;
    const char *head = b->data + b->off;
    const char *p = memmem(head + from, b->len - from, delim, dlen);
    return p ? (size_t)(p - head) : (size_t)-1;
}
