"""What the benchmark scripts share: a free loopback port, a process and
its descendants from /proc, and the CPU time of such a tree."""
import os
import socket

HZ = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_pids(root):
    """root and its live descendants, from the parent ids in /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def cpu_seconds(root):
    """User + system CPU seconds of a process tree: all threads of each
    process, and the children each has waited for (cutime, cstime), so
    that a short-lived child is counted after it is gone."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += sum(int(x) for x in fields[11:15])
    return total / HZ
