/*
 * fs.c - the few file-system calls mail storage needs that Lua's io
 * library lacks: durable writes (fsync of file and directory), exclusive
 * creation, a lock file that says one process owns a directory, fsyncs
 * run by worker threads while the loop goes on (lib/syncpool.c), and
 * process facts for unique file names.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "luasmtp.h"
#include "syncpool.h"

static int push_errno(lua_State *L, const char *what, int err)
{
    char detail[512];
    snprintf(detail, sizeof detail, "%s: %s", what, strerror(err));
    lua_pushnil(L);
    lua_pushstring(L, LS_EIO);
    lua_pushstring(L, detail);
    lua_pushstring(L, err == ENOSPC || err == EDQUOT ? "full" : err == EACCES || err == EPERM || err == EROFS ? "denied" : "other");
    return 4;
}

/* Write all of data[0..len) to fd; 0 or an errno value. */
static int write_all(int fd, const char *data, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        off += (size_t)n;
    }
    return 0;
}

/* Write the data argument at idx to fd: a string, or a function called
 * until it returns nil, each call giving the next string (it must not
 * wait). Returns 0, an errno value, or -1 when the function raised (its
 * error is then on the stack). */
static int write_source(lua_State *L, int idx, int fd)
{
    size_t len;
    if (lua_type(L, idx) == LUA_TSTRING) {
        const char *data = lua_tolstring(L, idx, &len);
        return write_all(fd, data, len);
    }
    for (;;) {
        lua_pushvalue(L, idx);
        if (lua_pcall(L, 0, 1, 0) != LUA_OK)
            return -1;
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            return 0;
        }
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pushliteral(L, "data function must return strings or nil");
            return -1;
        }
        const char *data = lua_tolstring(L, -1, &len);
        int e = write_all(fd, data, len);
        lua_pop(L, 1);
        if (e != 0)
            return e;
    }
}

static void check_source(lua_State *L, int idx)
{
    int t = lua_type(L, idx);
    luaL_argexpected(L, t == LUA_TSTRING || t == LUA_TFUNCTION, idx, "string or function");
}

/* write_file_sync(path, data [, mode]) -> true | nil, "io", detail, kind
 * Create path (it must not exist), write data, fsync and close. data is
 * a string or a function returning the next piece (nil at the end), so a
 * large message is written without being one string. On any failure the
 * file is removed, so nothing half-written stays behind (an error raised
 * by the data function is raised again after that). kind is "full"
 * (ENOSPC, EDQUOT), "denied" or "other". */
static int l_write_file_sync(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    check_source(L, 2);
    int mode = (int)luaL_optinteger(L, 3, 0600);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0)
        return push_errno(L, path, errno);
    int e = write_source(L, 2, fd);
    if (e == 0 && fsync(fd) < 0)
        e = errno;
    if (e != 0) {
        close(fd);
        unlink(path);
        if (e < 0)
            return lua_error(L);
        return push_errno(L, path, e);
    }
    if (close(fd) < 0) {
        e = errno;
        unlink(path);
        return push_errno(L, path, e);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* Open path with flags, fsync and close it: true | nil, "io", detail. */
static int fsync_opened(lua_State *L, int flags)
{
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        return push_errno(L, path, errno);
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    if (rc < 0)
        return push_errno(L, path, e);
    lua_pushboolean(L, 1);
    return 1;
}

/* fsync_dir(path) -> true | nil, "io", detail: make a rename durable. */
static int l_fsync_dir(lua_State *L)
{
    return fsync_opened(L, O_RDONLY | O_DIRECTORY);
}

/* A batch of fsyncs in flight, held by the waiting call (its __gc lets
 * go of a batch whose waiter was abandoned). */
#define SYNCBATCH_MT "luasmtp.syncbatch"
typedef struct {
    ls_syncbatch *b;
    ls_loop *loop; /* finalized after this value: created before it */
} syncref;

/* Let go of the batch; its eventfd is closed with it (now, or by the
 * last worker), so the loop must not take that number for the same file
 * in a task's next wait. */
static void syncref_release(syncref *r)
{
    if (r->b) {
        ls_fd_closing(r->loop, ls_sync_fd(r->b));
        ls_sync_release(r->b);
        r->b = NULL;
    }
}

static int syncref_gc(lua_State *L)
{
    syncref_release(luaL_checkudata(L, 1, SYNCBATCH_MT));
    return 0;
}

/* The wait is over: stack 1 is the list of paths, 3 the syncref. */
static int fsync_paths_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    syncref *r = luaL_checkudata(L, 3, SYNCBATCH_MT);
    int woke = ls_wait_result(L);
    size_t failed = 0;
    int e = ls_sync_result(r->b, &failed);
    syncref_release(r);
    if (e == EINPROGRESS)
        return ls_pusherror(L, woke == LS_WAKE_TIMEOUT ? LS_ETIMEOUT : LS_EIO, "fsync did not finish");
    if (e != 0) {
        lua_geti(L, 1, (lua_Integer)failed + 1);
        return push_errno(L, lua_tostring(L, -1), e);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* fsync_paths({path, ...} [, timeout [, datasync]]) -> true | nil, token, detail, kind
 * fsync every file or directory named, several at once in worker
 * threads, while other tasks run; waits (at most timeout seconds,
 * default 60) until all are done. With datasync, fdatasync (a file's
 * data and what reading it needs, not its times). An error names the
 * first path that failed ("io", kind as for write_file_sync); "timeout"
 * when the disk took longer (the fsyncs still finish in the
 * background). */
static int l_fsync_paths(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    double timeout = luaL_optnumber(L, 2, 60);
    int datasync = lua_toboolean(L, 3);
    lua_settop(L, 2);
    size_t n = (size_t)luaL_len(L, 1);
    luaL_argcheck(L, n > 0 && n <= 4096, 1, "1 to 4096 paths");
    const char **paths = lua_newuserdatauv(L, n * sizeof *paths, 0); /* freed by the GC */
    lua_replace(L, 2); /* the timeout is read; keep the array anchored at 2 */
    for (size_t i = 0; i < n; i++) {
        if (lua_geti(L, 1, (lua_Integer)i + 1) != LUA_TSTRING)
            return luaL_argerror(L, 1, "paths must be strings");
        paths[i] = lua_tostring(L, -1);
        lua_pop(L, 1); /* the string stays: the table holds it */
    }
    ls_loop *loop = ls_getloop(L);
    ls_task *t = ls_current(L, loop);
    syncref *r = lua_newuserdatauv(L, sizeof *r, 0);
    r->b = NULL;
    r->loop = loop;
    luaL_setmetatable(L, SYNCBATCH_MT);
    r->b = ls_sync_submit(paths, n, datasync);
    if (r->b == NULL)
        return push_errno(L, "fsync workers", errno);
    ls_wait(L, loop, t, ls_sync_fd(r->b), EV_READ, ls_now(loop) + timeout, NULL, 0, fsync_paths_k);
    return fsync_paths_k(L, LUA_OK, 0);
}

#define RECORD_PARTS 8

/* Write all of iov[0..n) at offset (iov is used up): 0 or an errno. */
static int pwrite_all(int fd, struct iovec *iov, int n, off_t offset)
{
    int i = 0;
    while (i < n) {
        ssize_t w = pwritev(fd, iov + i, n - i, offset);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        offset += w;
        while (i < n && (size_t)w >= iov[i].iov_len) {
            w -= (ssize_t)iov[i].iov_len;
            i++;
        }
        if (i < n) {
            iov[i].iov_base = (char *)iov[i].iov_base + w;
            iov[i].iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* A file this module holds open: a record file, a lock (-1 once
 * closed). */
typedef struct {
    int fd;
} ls_heldfd;

/* An existing file kept open for write_record (a queue segment takes
 * many records: no open and close each time). */
#define RECFILE_MT "luasmtp.recordfile"

/* open_record_file(path) -> file | nil, "io", detail, kind */
static int l_open_record_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    ls_heldfd *f = lua_newuserdatauv(L, sizeof *f, 1);
    f->fd = -1;
    luaL_setmetatable(L, RECFILE_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1); /* its path, for error messages */
    f->fd = open(path, O_WRONLY | O_CLOEXEC);
    if (f->fd < 0)
        return push_errno(L, path, errno);
    return 1;
}

/* Close a held descriptor once (the close methods of the types here). */
static void close_held(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* file:close(), __close, __gc (idempotent). */
static int l_recfile_close(lua_State *L)
{
    close_held(&((ls_heldfd *)luaL_checkudata(L, 1, RECFILE_MT))->fd);
    return 0;
}

/* write_record(path | file, offset, s1 [, s2 ...]) -> true | nil, "io", detail, kind, dirty
 * Write the strings (at most 8), one after the other, at offset of an
 * existing file only this process writes (a queue segment), without
 * fsync: a path is opened and closed for the write, a file from
 * open_record_file stays open. On a failure what the write may have put
 * there is overwritten with zeros (the owner's next open cuts them off);
 * dirty is true when even that failed (the file must take no more
 * records). */
static int l_write_record(lua_State *L)
{
    ls_heldfd *file = luaL_testudata(L, 1, RECFILE_MT);
    if (file) {
        lua_getiuservalue(L, 1, 1);
        lua_replace(L, 1);
        luaL_argcheck(L, file->fd >= 0, 1, "record file is closed");
    }
    const char *path = luaL_checkstring(L, 1);
    lua_Integer offset = luaL_checkinteger(L, 2);
    luaL_argcheck(L, offset >= 0, 2, "offset must not be negative");
    int top = lua_gettop(L);
    luaL_argcheck(L, top >= 3 && top - 2 <= RECORD_PARTS, 3, "1 to 8 strings");
    struct iovec iov[RECORD_PARTS];
    int n = 0;
    size_t total = 0;
    for (int i = 3; i <= top; i++, n++) {
        iov[n].iov_base = (void *)luaL_checklstring(L, i, &iov[n].iov_len);
        total += iov[n].iov_len;
    }
    int fd = file ? file->fd : open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return push_errno(L, path, errno);
    int e = pwrite_all(fd, iov, n, (off_t)offset);
    int dirty = 0;
    struct stat st;
    if (e != 0 && fstat(fd, &st) < 0) {
        dirty = 1;
    } else if (e != 0 && st.st_size > (off_t)offset) {
        /* zeros over what this write may have put there (up to the end
         * of the file): a reader stops at them */
        static const char zeros[4096];
        size_t upto = (size_t)(st.st_size - (off_t)offset);
        size_t len = total < upto ? total : upto;
        for (size_t off = 0; off < len && !dirty;) {
            size_t k = len - off < sizeof zeros ? len - off : sizeof zeros;
            ssize_t w = pwrite(fd, zeros, k, (off_t)offset + (off_t)off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                dirty = 1;
            else
                off += (size_t)w;
        }
    }
    if (!file)
        close(fd);
    if (e != 0) {
        push_errno(L, path, e);
        lua_pushboolean(L, dirty);
        return 5;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* truncate(path, size) -> true | nil, "io", detail, kind */
static int l_truncate(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Integer size = luaL_checkinteger(L, 2);
    luaL_argcheck(L, size >= 0, 2, "size must not be negative");
    if (truncate(path, (off_t)size) < 0)
        return push_errno(L, path, errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* mkdir(path [, mode]) -> true | nil, "io", detail (an existing directory is fine). */
static int l_mkdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int mode = (int)luaL_optinteger(L, 2, 0700);
    if (mkdir(path, (mode_t)mode) < 0 && errno != EEXIST)
        return push_errno(L, path, errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* append_file_sync(path, data) -> true | nil, "io", detail, kind
 * Append under an exclusive lock (mbox), fsync; on failure the file is
 * truncated back to its old size. data: a string or a function, as for
 * write_file_sync. */
static int l_append_file_sync(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    check_source(L, 2);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return push_errno(L, path, errno);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(fd, F_SETLKW, &fl) < 0) {
        int e = errno;
        close(fd);
        return push_errno(L, path, e);
    }
    off_t start = lseek(fd, 0, SEEK_END);
    int e = write_source(L, 2, fd);
    if (e == 0 && fsync(fd) < 0)
        e = errno;
    if (e != 0 && start >= 0 && ftruncate(fd, start) < 0) {
        /* nothing more can be done; the error below reports the cause */
    }
    close(fd);
    if (e < 0)
        return lua_error(L);
    if (e != 0)
        return push_errno(L, path, e);
    lua_pushboolean(L, 1);
    return 1;
}

/* fsync_path(path) -> true | nil, "io", detail, kind
 * fsync a file written with Lua's io library (open it again, fsync,
 * close): its data and size reach the disk. */
static int l_fsync_path(lua_State *L)
{
    return fsync_opened(L, O_RDONLY);
}

/* listdir(path) -> { name, ... } | nil, "io", detail, kind
 * The entries of a directory without "." and "..", in no order. */
static int l_listdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (d == NULL)
        return push_errno(L, path, errno);
    lua_newtable(L);
    lua_Integer n = 0;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        lua_pushstring(L, de->d_name);
        lua_rawseti(L, -2, ++n);
    }
    int e = errno;
    closedir(d);
    if (e != 0)
        return push_errno(L, path, e);
    return 1;
}

static int l_getpid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

static int l_gethostname(lua_State *L)
{
    char buf[256];
    if (gethostname(buf, sizeof buf - 1) < 0)
        return push_errno(L, "gethostname", errno);
    buf[sizeof buf - 1] = '\0';
    lua_pushstring(L, buf);
    return 1;
}

/* A held lock file. */
#define LOCK_MT "luasmtp.lockfile"

/* lock_file(path) -> lock | nil, token, detail
 * Take an exclusive flock(2) on path (created with mode 0600 when
 * missing; a symbolic link there is refused) without waiting, and write
 * our pid into it. token "busy":
 * another open file (this process or another) holds it; detail then
 * names the pid written there. "io" for any other failure. The lock
 * lasts until lock:close(), the lock's collection or the end of the
 * process (the kernel drops it, after kill -9 too); the descriptor is
 * close-on-exec, so programs started meanwhile do not hold it.
 *   local lock, token, detail = core.lock_file(dir .. "/lock")
 */
static int l_lock_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    ls_heldfd *k = lua_newuserdatauv(L, sizeof *k, 0);
    k->fd = -1;
    luaL_setmetatable(L, LOCK_MT);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return push_errno(L, path, errno);
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        if (e != EWOULDBLOCK) {
            close(fd);
            return push_errno(L, path, e);
        }
        char holder[32];
        ssize_t n = pread(fd, holder, sizeof holder - 1, 0);
        close(fd);
        holder[n > 0 ? (size_t)n : 0] = '\0';
        holder[strcspn(holder, "\r\n")] = '\0';
        for (char *c = holder; *c; c++)
            if (*c < '0' || *c > '9')
                *c = '?';
        lua_pushnil(L);
        lua_pushliteral(L, "busy");
        lua_pushfstring(L, "%s is held by another process%s%s", path, holder[0] ? ": pid " : "", holder);
        return 3;
    }
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, (size_t)len, 0) != len) {
        int e = errno;
        close(fd);
        return push_errno(L, path, e);
    }
    k->fd = fd;
    return 1;
}

/* lock:close(), __close, __gc: release the lock (idempotent). */
static int l_lock_close(lua_State *L)
{
    close_held(&((ls_heldfd *)luaL_checkudata(L, 1, LOCK_MT))->fd);
    return 0;
}

/* A metatable for a type whose only method is close (also __gc, __close). */
static void closable_metatable(lua_State *L, const char *name, lua_CFunction close_fn)
{
    if (luaL_newmetatable(L, name)) {
        const luaL_Reg methods[] = {{"close", close_fn}, {NULL, NULL}};
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, close_fn);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, close_fn);
        lua_setfield(L, -2, "__close");
    }
    lua_pop(L, 1);
}

int ls_open_fs(lua_State *L)
{
    closable_metatable(L, LOCK_MT, l_lock_close);
    closable_metatable(L, RECFILE_MT, l_recfile_close);
    static const luaL_Reg funcs[] = {
        {"write_file_sync", l_write_file_sync},
        {"open_record_file", l_open_record_file},
        {"append_file_sync", l_append_file_sync},
        {"write_record", l_write_record},
        {"truncate", l_truncate},
        {"fsync_dir", l_fsync_dir},
        {"mkdir", l_mkdir},
        {"fsync_path", l_fsync_path},
        {"fsync_paths", l_fsync_paths},
        {"listdir", l_listdir},
        {"getpid", l_getpid},
        {"gethostname", l_gethostname},
        {"lock_file", l_lock_file},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, SYNCBATCH_MT)) {
        lua_pushcfunction(L, syncref_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
