/*
 * syncpool.h - fsync off the event loop (src/lib: no Lua).
 *
 * fsync blocks the calling thread until the disk has the data; an event
 * loop that calls it stalls every session for that time, and its fsyncs
 * run one after the other. A batch hands a list of paths to a small pool
 * of worker threads, which open each (file or directory), fsync it and
 * close it, several at once: the file system's journal commits
 * concurrent fsyncs together. When the last one is done the batch's
 * eventfd becomes readable, which the loop waits for like any socket.
 *
 * The workers start on first use and stay for the life of the process;
 * a forked child starts its own (a batch submitted before the fork is
 * never finished in the child).
 */
#ifndef LS_SYNCPOOL_H
#define LS_SYNCPOOL_H

#include <stddef.h>

/* Worker threads at most. */
#define LS_SYNC_THREADS 8

typedef struct ls_syncbatch ls_syncbatch;

/* Queue fsyncs (fdatasyncs with datasync) of paths[0..n) (n >= 1). NULL
 * with errno on failure. */
ls_syncbatch *ls_sync_submit(const char *const *paths, size_t n, int datasync);
/* Readable (an eventfd) once every fsync of the batch has run. */
int ls_sync_fd(const ls_syncbatch *b);
/* After the fd became readable: 0 when every path was synced, else the
 * errno of the first failure, with *failed set to its index. */
int ls_sync_result(ls_syncbatch *b, size_t *failed);
/* The caller is done with the batch (finished or not: an unfinished
 * batch is freed by the last worker to touch it). */
void ls_sync_release(ls_syncbatch *b);

#endif
