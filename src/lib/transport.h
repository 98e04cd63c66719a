/*
 * transport.h - byte transport for sockets: plain (recv/send) or TLS
 * behind one small interface, so the buffer code does not care which
 * (src/lib: no Lua).
 */
#ifndef LS_TRANSPORT_H
#define LS_TRANSPORT_H

#include <stddef.h>

#include "buf.h"

/* Results of the transport calls. */
enum ls_io {
    LS_IO_OK = 0,        /* > 0 bytes moved (count in *n) / handshake done */
    LS_IO_EOF = -1,      /* orderly close by the peer */
    LS_IO_WANTREAD = -2, /* wait for EV_READ, then call again */
    LS_IO_WANTWRITE = -3,/* wait for EV_WRITE, then call again */
    LS_IO_ERROR = -4,    /* failure: token and detail filled in */
};

typedef struct ls_ioerr {
    const char *token;  /* one of the LS_E* tokens */
    char detail[256];
} ls_ioerr;

typedef struct ls_transport ls_transport;

typedef struct ls_transport_ops {
    /* Move up to len bytes; LS_IO_OK with *n > 0, or another ls_io. */
    int (*read)(const ls_transport *t, char *buf, size_t len, size_t *n, ls_ioerr *err);
    int (*write)(const ls_transport *t, const char *buf, size_t len, size_t *n, ls_ioerr *err);
} ls_transport_ops;

struct ls_transport {
    const ls_transport_ops *ops;
    int fd;
    void *impl; /* the TLS object of a TLS transport */
};

/* recv/send on t->fd. */
extern const ls_transport_ops ls_plain_ops;

/* Read once into b (at most chunk bytes): LS_IO_OK (data), LS_IO_EOF,
 * LS_IO_WANT*, LS_IO_ERROR ("limit" when b cannot grow). */
int ls_io_fill(const ls_transport *t, ls_buf *b, size_t chunk, ls_ioerr *err);
/* Write b out as far as the transport takes it: LS_IO_OK once b is
 * empty, LS_IO_WANT* while data remains, LS_IO_ERROR. */
int ls_io_drain(const ls_transport *t, ls_buf *b, ls_ioerr *err);

#endif
