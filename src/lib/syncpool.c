/*
 * syncpool.c - fsync in worker threads (see syncpool.h). Plain C, no Lua.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "syncpool.h"

struct ls_syncbatch {
    int efd;
    int refs;        /* the caller + each job not yet run */
    size_t left;     /* jobs not yet run */
    int err;         /* errno of the first failure */
    size_t failed;   /* its index */
    size_t n;
    char **paths;
    int datasync;    /* fdatasync: the data, and the metadata that reads it */
};

typedef struct job {
    struct job *next;
    ls_syncbatch *batch;
    size_t idx;
} job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t more = PTHREAD_COND_INITIALIZER;
static job *head, *tail;
static int threads, idle;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void batch_free(ls_syncbatch *b)
{
    for (size_t i = 0; i < b->n; i++)
        free(b->paths[i]);
    free(b->paths);
    if (b->efd >= 0)
        close(b->efd);
    free(b);
}

/* Drop one reference; mu held. Returns whether the batch was freed. */
static int unref_locked(ls_syncbatch *b)
{
    if (--b->refs > 0)
        return 0;
    batch_free(b);
    return 1;
}

static int sync_path(const char *path, int datasync)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int e = (datasync ? fdatasync(fd) : fsync(fd)) < 0 ? errno : 0;
    close(fd);
    return e;
}

static void *worker(void *arg)
{
    (void)arg;
    /* A batch thread (Linux: this thread only) does not preempt the
     * running one when it wakes: the event loop's thread that hands it a
     * job keeps its core, and the worker takes an idle one or the next
     * tick. Where this is refused the worker runs as it is. */
    struct sched_param sp = {0};
    (void)sched_setscheduler(0, SCHED_BATCH, &sp);
    pthread_mutex_lock(&mu);
    for (;;) {
        while (head == NULL) {
            idle++;
            pthread_cond_wait(&more, &mu);
            idle--;
        }
        job *j = head;
        head = j->next;
        if (head == NULL)
            tail = NULL;
        ls_syncbatch *b = j->batch;
        const char *path = b->paths[j->idx];
        pthread_mutex_unlock(&mu);
        int e = sync_path(path, b->datasync); /* b stays: this job holds a reference */
        pthread_mutex_lock(&mu);
        if (e != 0 && b->err == 0) {
            b->err = e;
            b->failed = j->idx;
        }
        if (--b->left == 0) {
            uint64_t one = 1;
            ssize_t w;
            do
                w = write(b->efd, &one, sizeof one);
            while (w < 0 && errno == EINTR);
        }
        unref_locked(b);
        free(j);
    }
    return NULL;
}

/* A forked child has none of the parent's threads: start afresh (the
 * queued jobs are forgotten; their batches never finish there). */
static void after_fork_child(void)
{
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&more, NULL);
    head = tail = NULL;
    threads = idle = 0;
}

/* The workers wait in this object's code and on its static condition
 * for the life of the process: keep it mapped when its loader lets go
 * (Lua's dlclose of the module at lua_close). */
static void pin_object(void)
{
    Dl_info info;
    if (dladdr((void *)worker, &info) && info.dli_fname)
        (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

static void once_init(void)
{
    pin_object();
    pthread_atfork(NULL, NULL, after_fork_child);
}

/* A submission that cannot go on: free what it made, fail with err. */
static ls_syncbatch *give_up(job **jobs, size_t n, ls_syncbatch *b, int err)
{
    if (jobs)
        for (size_t i = 0; i < n; i++)
            free(jobs[i]);
    free(jobs);
    if (b)
        batch_free(b);
    errno = err;
    return NULL;
}

ls_syncbatch *ls_sync_submit(const char *const *paths, size_t n, int datasync)
{
    if (n == 0) {
        errno = EINVAL;
        return NULL;
    }
    pthread_once(&init_once, once_init);
    ls_syncbatch *b = calloc(1, sizeof *b);
    job **jobs = calloc(n, sizeof *jobs);
    if (b == NULL || jobs == NULL)
        return give_up(jobs, n, b, ENOMEM);
    b->efd = -1;
    b->datasync = datasync;
    b->paths = calloc(n, sizeof *b->paths);
    if (b->paths == NULL)
        return give_up(jobs, n, b, ENOMEM);
    b->n = n;
    for (size_t i = 0; i < n; i++) {
        b->paths[i] = strdup(paths[i]);
        jobs[i] = malloc(sizeof *jobs[i]);
        if (b->paths[i] == NULL || jobs[i] == NULL)
            return give_up(jobs, n, b, ENOMEM);
    }
    b->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (b->efd < 0)
        return give_up(jobs, n, b, errno);
    b->refs = (int)n + 1;
    b->left = n;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < n; i++) {
        jobs[i]->batch = b;
        jobs[i]->idx = i;
        jobs[i]->next = NULL;
        if (tail)
            tail->next = jobs[i];
        else
            head = jobs[i];
        tail = jobs[i];
    }
    /* one more worker while there are more jobs than idle ones */
    size_t want = n > (size_t)idle ? n - (size_t)idle : 0;
    while (want > 0 && threads < LS_SYNC_THREADS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        int rc = pthread_create(&t, &attr, worker, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break;
        threads++;
        want--;
    }
    if (threads == 0) {
        /* no worker could start: take the jobs back */
        head = tail = NULL;
        pthread_mutex_unlock(&mu);
        return give_up(jobs, n, b, EAGAIN);
    }
    for (size_t i = 0; i < n; i++) /* a worker per job, not all of them */
        pthread_cond_signal(&more);
    pthread_mutex_unlock(&mu);
    free(jobs);
    return b;
}

int ls_sync_fd(const ls_syncbatch *b) { return b->efd; }

int ls_sync_result(ls_syncbatch *b, size_t *failed)
{
    pthread_mutex_lock(&mu);
    int e = b->left > 0 ? EINPROGRESS : b->err;
    if (e != 0 && failed)
        *failed = b->err ? b->failed : 0;
    pthread_mutex_unlock(&mu);
    return e;
}

void ls_sync_release(ls_syncbatch *b)
{
    pthread_mutex_lock(&mu);
    unref_locked(b);
    pthread_mutex_unlock(&mu);
}
