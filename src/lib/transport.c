/*
 * transport.c - plain socket I/O and the buffer loops over any transport
 * (see transport.h). Plain C, no Lua.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "errors.h"
#include "transport.h"

static int io_errno(ls_ioerr *err, int e)
{
    err->token = ls_errno_token(e);
    snprintf(err->detail, sizeof err->detail, "%s", strerror(e));
    return LS_IO_ERROR;
}

static int plain_read(const ls_transport *t, char *buf, size_t len, size_t *n, ls_ioerr *err)
{
    for (;;) {
        ssize_t r = recv(t->fd, buf, len, 0);
        if (r > 0) {
            *n = (size_t)r;
            return LS_IO_OK;
        }
        if (r == 0)
            return LS_IO_EOF;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return LS_IO_WANTREAD;
        return io_errno(err, errno);
    }
}

static int plain_write(const ls_transport *t, const char *buf, size_t len, size_t *n,
                       ls_ioerr *err)
{
    for (;;) {
        ssize_t w = send(t->fd, buf, len, MSG_NOSIGNAL);
        if (w >= 0) {
            *n = (size_t)w;
            return LS_IO_OK;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return LS_IO_WANTWRITE;
        return io_errno(err, errno);
    }
}

const ls_transport_ops ls_plain_ops = {plain_read, plain_write};

int ls_io_fill(const ls_transport *t, ls_buf *b, size_t chunk, ls_ioerr *err)
{
    char *p = ls_buf_reserve(b, chunk);
    if (p == NULL) {
        err->token = LS_ELIMIT;
        snprintf(err->detail, sizeof err->detail, "out of memory");
        return LS_IO_ERROR;
    }
    size_t n = 0;
    int rc = t->ops->read(t, p, chunk, &n, err);
    if (rc == LS_IO_OK)
        ls_buf_commit(b, n);
    return rc;
}

int ls_io_drain(const ls_transport *t, ls_buf *b, ls_ioerr *err)
{
    while (b->len > 0) {
        size_t n = 0;
        int rc = t->ops->write(t, ls_buf_head(b), b->len, &n, err);
        if (rc == LS_IO_EOF) {
            err->token = LS_ECLOSED;
            snprintf(err->detail, sizeof err->detail, "connection closed");
            return LS_IO_ERROR;
        }
        if (rc != LS_IO_OK)
            return rc;
        ls_buf_consume(b, n);
    }
    return LS_IO_OK;
}
