/*
 * buf.h - a growable byte buffer with a hard cap (src/lib: no Lua).
 */
#ifndef LS_BUF_H
#define LS_BUF_H

#include <stddef.h>

typedef struct ls_buf {
    char *data;
    size_t off; /* first unread byte */
    size_t len; /* bytes after off */
    size_t cap; /* allocated size */
    size_t *account; /* when set: the allocated size is added here */
} ls_buf;

void ls_buf_init(ls_buf *b);
/* Count the buffer's allocation in *account (a total shared by several
 * buffers) from now on; the buffer must be empty and unallocated. */
void ls_buf_account(ls_buf *b, size_t *account);
void ls_buf_free(ls_buf *b);
/* Make room for at least `need` more bytes after the data; returns a
 * pointer to the free space or NULL on allocation failure. */
char *ls_buf_reserve(ls_buf *b, size_t need);
void ls_buf_commit(ls_buf *b, size_t n); /* n bytes were written at reserve() */
int ls_buf_append(ls_buf *b, const char *p, size_t n); /* 0 ok, -1 ENOMEM */
void ls_buf_consume(ls_buf *b, size_t n);
/* Give memory back while the buffer waits: an empty buffer frees its
 * allocation, a partly filled one shrinks to its data. The next
 * reserve() allocates again. For buffers of idle connections. */
void ls_buf_shrink(ls_buf *b);
/* The unread data; never NULL (an empty buffer may have no allocation). */
static inline const char *ls_buf_head(const ls_buf *b) { return b->data ? b->data + b->off : ""; }
/* Search for a delimiter in the buffered data starting at `from`;
 * returns its offset from the head or (size_t)-1. */
size_t ls_buf_find(const ls_buf *b, size_t from, const char *delim, size_t dlen);

#endif
