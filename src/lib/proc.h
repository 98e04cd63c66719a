/*
 * proc.h - processes for the supervisor: start a program with chosen
 * inherited descriptors, and drop root privileges for good. No Lua here.
 */
#ifndef LS_PROC_H
#define LS_PROC_H

#include <stddef.h>
#include <sys/types.h>

/* The most descriptors one child may inherit (they become 3, 4, ...). */
#define LS_PROC_MAX_FDS 64

/* Start path with argv (NULL-terminated; environment inherited) in a new
 * process. fds[i] becomes descriptor 3 + i in it; every other
 * descriptor above 2 is closed on exec. The signal mask is cleared.
 * With pdeathsig > 0 the child gets that signal when this process dies
 * (and exits at once if it already has). Returns 0 and sets *pid, or
 * -1 with errno set (also when the exec itself failed: its errno). */
int ls_proc_spawn(const char *path, char *const argv[], const int *fds, size_t nfds,
                  int pdeathsig, pid_t *pid);

/* Become user (name or number; NULL: stay) and group (name or number;
 * NULL: the user's primary group): supplementary groups (the user's, or
 * only the group), gid, uid, each checked, then checked that root cannot
 * be regained. Returns 0, or -1 with a message in err. */
int ls_proc_drop(const char *user, const char *group, char *err, size_t errlen);

#endif
