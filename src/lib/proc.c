/*
 * proc.c - start worker processes and drop privileges (see proc.h).
 *
 * Between fork and exec the child calls only async-signal-safe functions:
 * everything it needs (argv, the descriptor list) is ready before fork.
 * An exec failure travels back over a close-on-exec pipe, so the caller
 * learns it synchronously instead of from a mysterious exit status.
 */
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* In the child: report errno on the pipe and end. */
static void child_fail(int pipefd)
{
    int e = errno;
    ssize_t w = write(pipefd, &e, sizeof e);
    (void)w;
    _exit(127);
}

static void child(const char *path, char *const argv[], const int *fds, size_t nfds, int pdeathsig,
                  pid_t parent, int pipefd)
{
    if (pdeathsig > 0) {
        if (prctl(PR_SET_PDEATHSIG, pdeathsig) < 0)
            child_fail(pipefd);
        if (getppid() != parent) /* the parent died before prctl */
            _exit(1);
    }
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
        child_fail(pipefd);
    /* Move the inherited descriptors out of the way first, then into
     * place: a source may sit where another one must go. */
    int tmp[LS_PROC_MAX_FDS];
    int floor = 3 + (int)nfds;
    if (pipefd >= floor)
        floor = pipefd + 1;
    for (size_t i = 0; i < nfds; i++) {
        tmp[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, floor);
        if (tmp[i] < 0)
            child_fail(pipefd);
    }
    for (size_t i = 0; i < nfds; i++) {
        int target = 3 + (int)i;
        if (target == pipefd) { /* keep the pipe: move it above first */
            int moved = fcntl(pipefd, F_DUPFD_CLOEXEC, floor);
            if (moved < 0)
                child_fail(pipefd);
            pipefd = moved;
        }
        if (dup2(tmp[i], target) < 0) /* dup2 clears close-on-exec */
            child_fail(pipefd);
    }
    /* Whatever else is open (a library's descriptor without O_CLOEXEC)
     * does not reach the new program. Old kernels lack the call: then
     * the descriptors of this project are close-on-exec anyway. */
    (void)syscall(SYS_close_range, (unsigned)(3 + nfds), ~0U, CLOSE_RANGE_CLOEXEC);
    execv(path, argv);
    child_fail(pipefd);
}

int ls_proc_spawn(const char *path, char *const argv[], const int *fds, size_t nfds,
                  int pdeathsig, pid_t *pid)
{
    if (nfds > LS_PROC_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    pid_t parent = getpid();
    pid_t c = fork();
    if (c < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        errno = e;
        return -1;
    }
    if (c == 0) {
        close(p[0]);
        child(path, argv, fds, nfds, pdeathsig, parent, p[1]);
    }
    close(p[1]);
    int e = 0;
    ssize_t n;
    do {
        n = read(p[0], &e, sizeof e);
    } while (n < 0 && errno == EINTR);
    close(p[0]);
    if (n == (ssize_t)sizeof e) { /* the exec failed: collect the child */
        while (waitpid(c, NULL, 0) < 0 && errno == EINTR)
            ;
        errno = e;
        return -1;
    }
    *pid = c;
    return 0;
}

/* 1 and the number in *out when s is all digits (a uid or gid), else 0. */
static int numeric_id(const char *s, unsigned long *out)
{
    if (*s == '\0')
        return 0;
    for (const char *c = s; *c; c++)
        if (*c < '0' || *c > '9')
            return 0;
    errno = 0;
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || v >= 0xffffffffUL)
        return 0;
    *out = v;
    return 1;
}

int ls_proc_drop(const char *user, const char *group, char *err, size_t errlen)
{
    uid_t uid = getuid();
    gid_t gid = getgid();
    char name[256] = "";
    unsigned long num;
    if (user) {
        struct passwd *pw = numeric_id(user, &num) ? getpwuid((uid_t)num) : getpwnam(user);
        if (!pw) {
            snprintf(err, errlen, "unknown user %s", user);
            return -1;
        }
        uid = pw->pw_uid;
        gid = pw->pw_gid;
        snprintf(name, sizeof name, "%s", pw->pw_name);
    }
    if (group) {
        struct group *gr = numeric_id(group, &num) ? getgrgid((gid_t)num) : getgrnam(group);
        if (!gr) {
            snprintf(err, errlen, "unknown group %s", group);
            return -1;
        }
        gid = gr->gr_gid;
    }
    /* supplementary groups: the user's (plus gid), or gid alone */
    int r = user ? initgroups(name, gid) : setgroups(1, &gid);
    if (r < 0) {
        snprintf(err, errlen, "setting the supplementary groups: %s", strerror(errno));
        return -1;
    }
    if (setresgid(gid, gid, gid) < 0) {
        snprintf(err, errlen, "setgid %lu: %s", (unsigned long)gid, strerror(errno));
        return -1;
    }
    if (setresuid(uid, uid, uid) < 0) {
        snprintf(err, errlen, "setuid %lu: %s", (unsigned long)uid, strerror(errno));
        return -1;
    }
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0 || ru != uid || eu != uid ||
        su != uid || rg != gid || eg != gid || sg != gid) {
        snprintf(err, errlen, "the ids did not change as asked");
        return -1;
    }
    if (uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)) {
        snprintf(err, errlen, "root could be regained after setuid");
        return -1;
    }
    if (uid != 0 && gid != 0 && setgid(0) == 0) {
        snprintf(err, errlen, "group 0 could be regained after setgid");
        return -1;
    }
    return 0;
}
