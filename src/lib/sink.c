/*
 * sink.c - the body sink (see sink.h). Plain C, no Lua.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "sink.h"

/* This process's spool files: LS_SINK_PREFIX<pid>.<token>.<n>. The token
 * tells our files from those a crashed process with the same pid left
 * (a server that is pid 1 in a container has the same pid every time). */
static unsigned long long proc_token;
static unsigned long spool_serial;

static unsigned long long token(void)
{
    while (proc_token == 0) {
        unsigned long long t = 0;
        if (getrandom(&t, sizeof t, 0) != (ssize_t)sizeof t)
            t = (unsigned long long)getpid() * 2654435761u ^ (unsigned long long)time(NULL);
        proc_token = t;
    }
    return proc_token;
}

int ls_sink_init(ls_sink *s, const char *dir, size_t threshold, uint64_t max_size,
                 size_t header_max)
{
    memset(s, 0, sizeof *s);
    s->fd = -1;
    s->use_tmpfile = 1;
    s->threshold = threshold;
    s->max_size = max_size;
    s->header_max = header_max;
    s->hstate = 2; /* the content starts as if after a CRLF: an empty first line ends an empty header */
    if (dir != NULL) {
        s->dir = strdup(dir);
        if (s->dir == NULL)
            return -1;
    }
    return 0;
}

static int fail(ls_sink *s, int err)
{
    if (s->err == 0)
        s->err = err;
    errno = err;
    return -1;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Write the staged tail and then p[0..n) to the spool file. */
static int spool_out(ls_sink *s, const char *p, size_t n)
{
    struct iovec iov[2];
    iov[0].iov_base = (void *)ls_buf_head(&s->mem);
    iov[0].iov_len = s->mem.len;
    iov[1].iov_base = (void *)p;
    iov[1].iov_len = n;
    int i = iov[0].iov_len ? 0 : 1;
    while (i < 2) {
        ssize_t w = writev(s->fd, iov + i, 2 - i);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return fail(s, errno);
        }
        s->flushed += (uint64_t)w;
        while (i < 2 && (size_t)w >= iov[i].iov_len) {
            w -= (ssize_t)iov[i].iov_len;
            iov[i].iov_len = 0;
            i++;
        }
        if (i < 2) {
            iov[i].iov_base = (char *)iov[i].iov_base + w;
            iov[i].iov_len -= (size_t)w;
        }
    }
    ls_buf_consume(&s->mem, s->mem.len);
    return 0;
}

static int flush_mem(ls_sink *s) { return s->mem.len ? spool_out(s, NULL, 0) : 0; }

static int path_join(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

/* Open the spool file in s->dir: unnamed if the file system can. */
static int open_spool(ls_sink *s)
{
    if (s->use_tmpfile) {
        int fd = open(s->dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (fd >= 0) {
            s->fd = fd;
            s->unnamed = 1;
            return 0;
        }
        if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
            return -1;
    }
    for (int tries = 0; tries < 100; tries++) {
        char path[4096];
        snprintf(s->name, sizeof s->name, LS_SINK_PREFIX "%ld.%llx.%lu", (long)getpid(), token(),
                 ++spool_serial);
        if (path_join(path, sizeof path, s->dir, s->name) < 0)
            return -1;
        int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd >= 0) {
            s->fd = fd;
            return 0;
        }
        if (errno != EEXIST)
            break;
    }
    s->name[0] = '\0';
    return -1;
}

/* Follow the first header block: up to and including its empty line.
 * The block is kept up to header_max bytes (plus the empty line); past
 * that the search stops. */
static void scan_header(ls_sink *s, const char *p, size_t n)
{
    static const char end[4] = {'\r', '\n', '\r', '\n'};
    size_t room = s->header_max + 2 - s->header.len;
    size_t limit = n < room ? n : room, i = 0;
    int st = s->hstate;
    while (i < limit) {
        if (st == 0) { /* skip to the next CR */
            const char *cr = memchr(p + i, '\r', limit - i);
            if (cr == NULL) {
                i = limit;
                break;
            }
            i = (size_t)(cr - p);
        }
        char c = p[i++];
        st = c == end[st] ? st + 1 : c == '\r';
        if (st == 4)
            break;
    }
    if (ls_buf_append(&s->header, p, i) < 0) {
        s->hoverflow = 1;
        s->hstate = -2;
        return;
    }
    if (st == 4) {
        /* keep the fields with their CRLF, not the empty line */
        s->header.len -= 2;
        s->body_offset = s->size + i;
        s->hstate = -1;
    } else if (i < n) {
        s->hoverflow = 1; /* too long: stop looking */
        s->hstate = -2;
    } else {
        s->hstate = st;
    }
}

int ls_sink_write(ls_sink *s, const char *p, size_t n)
{
    if (s->err)
        return fail(s, s->err);
    if (s->max_size && (s->size + n > s->max_size || s->size + n < s->size)) {
        s->too_big = 1;
        errno = EFBIG;
        return -1;
    }
    if (n == 0)
        return 0;
    if (s->hstate >= 0)
        scan_header(s, p, n);
    if (s->fd < 0) {
        if (s->mem.len + n <= s->threshold) {
            if (ls_buf_append(&s->mem, p, n) < 0)
                return fail(s, ENOMEM);
            s->size += n;
            return 0;
        }
        if (s->dir == NULL) {
            s->too_big = 1;
            errno = EFBIG;
            return -1;
        }
        if (open_spool(s) < 0)
            return fail(s, errno);
    }
    if (s->mem.len + n < LS_SINK_BLOCK) {
        if (ls_buf_append(&s->mem, p, n) < 0)
            return fail(s, ENOMEM);
    } else if (spool_out(s, p, n) < 0) {
        return -1;
    }
    s->size += n;
    return 0;
}

int ls_sink_read(ls_sink *s, uint64_t off, char *buf, size_t len, size_t *got)
{
    *got = 0;
    if (off >= s->size || len == 0)
        return 0;
    if (len > s->size - off)
        len = (size_t)(s->size - off);
    uint64_t mem_start = s->fd >= 0 ? s->flushed : 0;
    if (off < mem_start) {
        size_t want = len;
        if (want > mem_start - off)
            want = (size_t)(mem_start - off);
        for (;;) {
            ssize_t r = pread(s->fd, buf, want, (off_t)off);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0)
                return -1;
            *got = (size_t)r;
            return 0;
        }
    }
    memcpy(buf, ls_buf_head(&s->mem) + (off - mem_start), len);
    *got = len;
    return 0;
}

/* fsync the directory holding path. */
static int sync_parent(const char *path)
{
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        memcpy(dir, ".", 2);
    } else {
        size_t n = slash == path ? 1 : (size_t)(slash - path);
        if (n >= sizeof dir) {
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* A sink still in memory: write path directly (fsynced with sync). */
static int commit_mem(ls_sink *s, const char *path, int sync)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    if (write_all(fd, ls_buf_head(&s->mem), s->mem.len) < 0 || (sync && fsync(fd) < 0)) {
        int e = errno;
        close(fd);
        unlink(path);
        errno = e;
        return -1;
    }
    if (close(fd) < 0) {
        int e = errno;
        unlink(path);
        errno = e;
        return -1;
    }
    return 0;
}

/* Give the spool file its first name. */
static int commit_spool(ls_sink *s, const char *path, int sync)
{
    if (flush_mem(s) < 0 || (sync && fsync(s->fd) < 0))
        return -1;
    if (s->unnamed) {
        if (linkat(s->fd, "", AT_FDCWD, path, AT_EMPTY_PATH) == 0)
            return 0;
        /* AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; /proc does not. */
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", s->fd);
        return linkat(AT_FDCWD, proc, AT_FDCWD, path, AT_SYMLINK_FOLLOW);
    }
    char from[4096];
    if (path_join(from, sizeof from, s->dir, s->name) < 0)
        return -1;
    /* link, not rename: path must not exist, as for the other forms */
    if (link(from, path) < 0)
        return -1;
    unlink(from);
    s->name[0] = '\0';
    return 0;
}

static int commit(ls_sink *s, const char *path, int sync)
{
    if (s->err) {
        errno = s->err;
        return -1;
    }
    int rc;
    if (s->committed)
        rc = link(s->committed, path);
    else if (s->fd < 0)
        rc = commit_mem(s, path, sync);
    else
        rc = commit_spool(s, path, sync);
    if (rc < 0)
        return -1;
    if (s->committed == NULL) {
        s->committed = strdup(path);
        if (s->committed == NULL)
            return -1;
    }
    return sync ? sync_parent(path) : 0;
}

int ls_sink_commit(ls_sink *s, const char *path) { return commit(s, path, 1); }

int ls_sink_link(ls_sink *s, const char *path) { return commit(s, path, 0); }

static void drop_spool(ls_sink *s)
{
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
    if (s->name[0] && s->dir) {
        char path[4096];
        if (path_join(path, sizeof path, s->dir, s->name) == 0)
            unlink(path);
    }
    s->name[0] = '\0';
    s->unnamed = 0;
}

void ls_sink_discard(ls_sink *s)
{
    drop_spool(s);
    ls_buf_free(&s->mem);
    ls_buf_free(&s->header);
    free(s->committed);
    s->committed = NULL;
    s->size = s->flushed = 0;
    s->err = s->too_big = s->hoverflow = 0;
    s->hstate = 2;
    s->body_offset = 0;
}

void ls_sink_free(ls_sink *s)
{
    if (s->closed)
        return;
    s->closed = 1;
    ls_sink_discard(s);
    free(s->dir);
    s->dir = NULL;
}

int ls_sink_cleanup(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    int removed = 0;
    size_t plen = strlen(LS_SINK_PREFIX);
    unsigned long long mine = token();
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, LS_SINK_PREFIX, plen) != 0)
            continue;
        char *end;
        long pid = strtol(e->d_name + plen, &end, 10);
        if (end == e->d_name + plen || *end != '.' || pid <= 0)
            continue;
        unsigned long long tok = strtoull(end + 1, NULL, 16);
        int dead;
        if (pid == (long)getpid())
            dead = tok != mine; /* an earlier process with our pid */
        else
            dead = kill((pid_t)pid, 0) < 0 && errno == ESRCH;
        if (!dead)
            continue;
        if (unlinkat(dirfd(d), e->d_name, 0) == 0)
            removed++;
    }
    closedir(d);
    return removed;
}
