/*
 * sink.h - the body sink: where a message body goes while it arrives
 * (src/lib: no Lua).
 *
 * DATA and BDAT both write into one sink. Up to `threshold` bytes the
 * content stays in memory; past it, everything goes to a spool file in
 * the directory the caller names (the store's own directory, so keeping
 * the message is fsync + link/rename, never a copy). The spool file is
 * unnamed (O_TMPFILE) where the file system allows it, so a crash leaves
 * nothing behind; elsewhere it is named LS_SINK_PREFIX<pid>.<n>.<rand>,
 * and ls_sink_cleanup() at start removes the files of dead processes.
 *
 * While the content arrives the sink also finds the end of the first
 * header block (the first empty line) and keeps that block, up to
 * header_max bytes, so the header can be parsed without reading the body
 * back.
 *
 * Every function returns 0 on success or -1 with errno set; a failed
 * write is sticky (sink->err).
 */
#ifndef LS_SINK_H
#define LS_SINK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"

#define LS_SINK_PREFIX "luasmtp-spool."
/* Output is staged in memory and written to the spool file in blocks. */
#define LS_SINK_BLOCK (64 * 1024)

typedef struct ls_sink {
    char *dir;           /* spool directory (NULL: memory only) */
    int fd;              /* spool file, -1 while in memory */
    int unnamed;         /* fd is an O_TMPFILE file */
    int use_tmpfile;     /* try O_TMPFILE first (default 1) */
    char name[96];       /* named spool file, relative to dir ("" if none) */
    char *committed;     /* path of the first commit */
    ls_buf mem;          /* the content (in memory) or the unwritten tail (spooled) */
    size_t threshold;    /* in memory up to this many bytes */
    uint64_t max_size;   /* refuse content past this (0: no limit) */
    uint64_t size;       /* bytes accepted */
    uint64_t flushed;    /* bytes in the spool file */
    int err;             /* sticky errno of a failed write, 0 */
    int too_big;         /* a write passed max_size */
    /* header block */
    size_t header_max;
    ls_buf header;       /* the first header block, without the empty line */
    int hstate;          /* bytes of CRLF CRLF matched (0..3), -1 done */
    int hoverflow;       /* the header block passed header_max */
    uint64_t body_offset;/* where the body starts, once hstate is -1 */
    int closed;          /* ls_sink_free() ran */
} ls_sink;

/* dir may be NULL: then the content may not pass threshold. */
int ls_sink_init(ls_sink *s, const char *dir, size_t threshold, uint64_t max_size,
                 size_t header_max);
/* Append n bytes. Past max_size: -1 with errno EFBIG and s->too_big set
 * (the content stays as it was). */
int ls_sink_write(ls_sink *s, const char *p, size_t n);
/* Bytes accepted so far. */
static inline uint64_t ls_sink_size(const ls_sink *s) { return s->size; }
static inline int ls_sink_spooled(const ls_sink *s) { return s->fd >= 0; }
/* Copy up to len bytes from offset off into buf; *got is 0 at the end. */
int ls_sink_read(ls_sink *s, uint64_t off, char *buf, size_t len, size_t *got);
/* Make the content the file `path` (which must not exist), durably:
 * write out, fsync the file, link or rename it into place (same file
 * system: never a copy), fsync the directory of path. A sink may be
 * committed to several paths (one link each). A sink still in memory is
 * written to path directly. */
int ls_sink_commit(ls_sink *s, const char *path);
/* The same without any fsync: the file `path` has the content, and the
 * caller makes it durable (fsync of the file and of its directory). */
int ls_sink_link(ls_sink *s, const char *path);
/* Drop the content and the spool file; the sink stays usable as empty. */
void ls_sink_discard(ls_sink *s);
/* Release everything (also the spool file if never committed); sets
 * s->closed. Idempotent. */
void ls_sink_free(ls_sink *s);
/* Remove the named spool files of processes that no longer run from dir.
 * Returns the number removed, or -1 with errno. */
int ls_sink_cleanup(const char *dir);

#endif
