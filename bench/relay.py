#!/usr/bin/env python3
"""Relay throughput through a durable queue, fsync on: luasmtp against
Postfix configured as the same relay, in the same run (not a test).

    python3 bench/relay.py        (bench/queue.sh; N, SESSIONS, SIZE, CONNS, RUNS=2)

SESSIONS is a comma-separated list of client concurrencies (default
"8,32"): every row is measured at each.

For each relay: smtp-source (SESSIONS sessions, N messages of SIZE bytes,
one message per connection) -> the relay on a free loopback port -> its
queue (fsync on: luasmtp's queue, Postfix's default) -> its SMTP client,
at most CONNS connections -> smtp-sink, which counts what arrives.

- messages/s: from the first connect of smtp-source until the sink has
  counted all N messages (delivery included, not only acceptance).
- CPU per message: user + system time of every process of the relay,
  from /proc/PID/stat: the relay's process (luasmtp), or Postfix's
  master and all its children (smtpd, cleanup, qmgr, smtp, trivial-
  rewrite, anvil, postlogd...). A snapshot is the sum over the root and
  its live descendants of utime + stime, plus the cutime + cstime of each
  (the children they have reaped: a child that exited between two
  snapshots is in its parent's cutime at the second); CPU is the
  difference of two snapshots, the second taken once the queue is empty.
- Queue depth: "while submitting" relays as mail arrives; "queued first"
  holds everything (luasmtp: scheduler started on SIGUSR1; Postfix:
  smtpd puts mail on hold, then postsuper -H ALL and postqueue -f), then
  drains a queue N deep.

Both relays log one line per event to a file (Postfix through postlogd,
luasmtp's queue log through a line-buffered file). Postfix runs with
smtpd_peername_lookup = no (luasmtp does no reverse lookup either) and
smtp_destination_concurrency_limit = CONNS; everything else is Postfix's
default. Every process is started here and stopped by its pid; every
wait has a timeout.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from proctree import cpu_seconds, free_port, tree_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("N", "2000"))
SESSION_COUNTS = [int(n) for n in os.environ.get("SESSIONS", "8,32").split(",")]
SESSIONS = SESSION_COUNTS[0]
SIZE = int(os.environ.get("SIZE", "4096"))
CONNS = int(os.environ.get("CONNS", "8"))
RUNS = int(os.environ.get("RUNS", "2"))
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "300"))
MASTER = "/usr/lib/postfix/sbin/master"
IS_ROOT = os.geteuid() == 0


def wait_until(what, pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(0.005)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def stop_pid(proc, pid=None, timeout=15):
    """SIGTERM the process (by pid), wait, then SIGKILL."""
    pid = pid or proc.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout)


class Sink:
    """smtp-sink -c on a free port; counts the messages it has taken."""

    def __init__(self, workdir):
        self.port = free_port()
        user = ["-u", "postfix"] if IS_ROOT else []
        self.count, self.sessions, self.lock, self.reached = 0, 0, threading.Lock(), {}
        self.proc = subprocess.Popen(
            ["timeout", str(int(TIMEOUT * 4)), "smtp-sink", *user, "-c", f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "sink.err"), "wb"))
        threading.Thread(target=self._read, daemon=True).start()
        wait_until("smtp-sink", lambda: port_open(self.port), 15)
        # the probe connection counts as a session, not a message

    def _read(self):
        buf = b""
        while True:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                return
            buf += data
            *done, buf = buf.split(b"\r")
            for line in done:
                m = re.search(rb"mesg=(\d+)", line)
                sess = re.search(rb"sess=(\d+)", line)
                if sess:
                    self.sessions = int(sess.group(1))
                if m:
                    with self.lock:
                        self.count = int(m.group(1))
                        for target in self.reached:
                            if self.reached[target] is None and self.count >= target:
                                self.reached[target] = time.monotonic()

    def expect(self, target):
        with self.lock:
            self.reached[target] = time.monotonic() if self.count >= target else None

    def wait(self, target, timeout):
        wait_until(f"the sink to count {target} messages (has {self.count})",
                   lambda: self.reached.get(target) is not None, timeout)
        return self.reached[target]

    def stop(self):
        stop_pid(self.proc)


def smtp_source(port):
    subprocess.run(["smtp-source", "-s", str(SESSIONS), "-m", str(N), "-l", str(SIZE),
                    "-f", "a@bench.test", "-t", "b@sink.test", f"127.0.0.1:{port}"],
                   check=True, timeout=TIMEOUT, stdout=subprocess.DEVNULL)


class Luasmtp:
    name = "luasmtp"

    def __init__(self, workdir, sink_port, hold):
        self.dir = os.path.join(workdir, "q")
        self.port = free_port()
        env = dict(os.environ)
        env["LUA_PATH_5_4"] = f"{ROOT}/lua/?.lua;{ROOT}/lua/?/init.lua;;"
        env["LUA_CPATH_5_4"] = f"{ROOT}/build/?.so;;"
        args = ["lua5.4", f"{ROOT}/bench/queue_relay.lua", str(self.port), str(sink_port), self.dir, str(CONNS),
                "hold" if hold else "run", str(int(TIMEOUT * 2))]
        self.proc = subprocess.Popen(args, env=env, stderr=open(os.path.join(workdir, "relay.err"), "wb"))
        wait_until("the luasmtp relay", lambda: port_open(self.port), 15)
        self.root = self.proc.pid

    def release(self):
        os.kill(self.proc.pid, signal.SIGUSR1)

    def queued(self):
        """Entries queued and not yet removed, from the queue's log (read
        on from where the last call stopped)."""
        if not hasattr(self, "log"):
            self.log, self.counts, self.rest = open(self.dir + ".log", "rb"), [0, 0], b""
        data = self.rest + self.log.read()
        *lines, self.rest = data.split(b"\n")
        for line in lines:
            if b": queued from=<" in line:
                self.counts[0] += 1
            elif line.endswith(b": done, removed"):
                self.counts[1] += 1
        return self.counts[0] - self.counts[1]

    def stop(self):
        stop_pid(self.proc)


class Postfix:
    name = "Postfix"
    SERVICES = [
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "smtp unix - - n - - smtp",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "showq unix n - n - - showq",
        "scache unix - - n - 1 scache",
        "anvil unix - - n - 1 anvil",
        "postlog unix-dgram n - n - 1 postlogd",
    ]

    def __init__(self, workdir, sink_port, hold):
        d = os.path.join(workdir, "postfix")
        self.conf, self.queue = d + "/conf", d + "/queue"
        for sub in (self.conf, self.queue, d + "/data"):
            os.makedirs(sub)
        shutil.chown(d + "/data", "postfix")
        self.port = free_port()
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {d}/data",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = postfix.bench.test",
            "mydomain = bench.test",
            "mydestination =",
            "relay_domains =",
            "alias_maps =",
            "local_recipient_maps =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            f"relayhost = [127.0.0.1]:{sink_port}",
            "smtpd_recipient_restrictions = permit_mynetworks, reject",
            "smtpd_peername_lookup = no",
            f"smtp_destination_concurrency_limit = {CONNS}",
            f"maillog_file_prefixes = {d}",
            f"maillog_file = {d}/postfix.log",
            "biff = no",
        ]
        if hold:
            main.append("smtpd_end_of_data_restrictions = check_client_access static:HOLD")
        services = [f"127.0.0.1:{self.port} inet n - n - - smtpd"] + self.SERVICES
        for name, lines in (("main.cf", main), ("master.cf", services)):
            with open(f"{self.conf}/{name}", "w") as f:
                f.write("\n".join(lines) + "\n")
        self.log = d + "/postfix.log"
        subprocess.run(["postfix", "-c", self.conf, "check"], check=True, timeout=60)
        self.proc = subprocess.Popen(["timeout", str(int(TIMEOUT * 2)), MASTER, "-c", self.conf, "-d"],
                                     stderr=open(os.path.join(workdir, "master.err"), "wb"))
        self.root = None
        self.seen = set()

        def master_pid():
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                return None
            return int(kids[0]) if kids else None
        wait_until("Postfix's master", lambda: master_pid() is not None, 15)
        self.root = master_pid()
        wait_until("Postfix's smtpd port", lambda: port_open(self.port), 15)

    def postcmd(self, *args):
        subprocess.run(list(args), check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def release(self):
        self.postcmd("postsuper", "-c", self.conf, "-H", "ALL")
        self.postcmd("postqueue", "-c", self.conf, "-f")

    def queued(self):
        n = 0
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.queue, sub)):
                n += len(files)
        return n

    def remember(self):
        self.seen.update(tree_pids(self.root))

    def stop(self):
        self.remember()
        stop_pid(self.proc, self.root)
        # a daemon that outlived master: only ours (MAIL_CONFIG is our conf)
        for pid in self.seen - {self.root}:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    mine = f"MAIL_CONFIG={self.conf}".encode() in f.read().split(b"\0")
            except OSError:
                continue
            if mine:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def measure(kind, hold):
    """One run; returns {phase: (seconds, cpu seconds)}."""
    workdir = tempfile.mkdtemp(prefix="luasmtp-relaybench.")
    if IS_ROOT:
        os.chmod(workdir, 0o755)
    sink = relay = None
    try:
        sink = Sink(workdir)
        relay = kind(workdir, sink.port, hold)
        sink.expect(N)
        time.sleep(0.2)
        if isinstance(relay, Postfix):
            relay.remember()
        c0, t0 = cpu_seconds(relay.root), time.monotonic()
        smtp_source(relay.port)
        out = {}
        if hold:
            t1 = time.monotonic()
            wait_until("the queue to hold every message", lambda: relay.queued() >= N, TIMEOUT)
            c1 = cpu_seconds(relay.root)
            out["fill"] = (t1 - t0, c1 - c0)
            t0, c0 = time.monotonic(), c1
            relay.release()
        t2 = sink.wait(N, TIMEOUT)
        wait_until("the queue to empty", lambda: relay.queued() == 0, TIMEOUT)
        out["drain" if hold else "stream"] = (t2 - t0, cpu_seconds(relay.root) - c0)
        relay.stop()
        relay = None
        # sessions are counted as they end: the relay's pooled ones at its stop
        time.sleep(0.5)
        out["sessions"] = sink.sessions - 1  # less the probe
        return out
    except Exception:
        for log in ("relay.err", "master.err", "sink.err", "postfix/postfix.log"):
            path = os.path.join(workdir, log)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.read()[-2000:]
                if tail:
                    print(f"--- {log}:\n{tail}", file=sys.stderr)
        raise
    finally:
        if relay:
            relay.stop()
        if sink:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def best(kinds, hold):
    """{name: result}, the best of RUNS runs each (per phase, by time).
    The relays take turns, in the other order every second run: the file
    system keeps the cost of recently deleted inodes (ext4 without a
    journal scans past them for a while), so whoever runs next pays."""
    results = {}
    for run in range(RUNS):
        for kind in (kinds if run % 2 == 0 else kinds[::-1]):
            r = measure(kind, hold)
            old = results.get(kind.name)
            if old is None:
                results[kind.name] = r
            else:
                for k, v in r.items():
                    if k != "sessions" and v[0] < old[k][0]:
                        old[k] = v
    return results


def main():
    # a TERM (timeout(1) in bench/queue.sh) still stops what was started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    for tool in ("smtp-source", "smtp-sink", "lua5.4"):
        if not shutil.which(tool):
            print(f"{tool} not installed: relay benchmark skipped")
            return
    with_postfix = IS_ROOT and os.path.exists(MASTER)
    kinds = [Luasmtp] + ([Postfix] if with_postfix else [])
    global SESSIONS
    rows = []
    for sessions in SESSION_COUNTS:
        SESSIONS = sessions
        for hold in (False, True):
            res = best(kinds, hold)
            rows.extend([(sessions, phase, res) for phase in (("fill", "drain") if hold else ("stream",))])
    print(f"Relay through the queue, fsync on: smtp-source -s SESSIONS -m {N} -l {SIZE} -> relay "
          f"-> smtp-sink ({CONNS} connections), best of {RUNS}.")
    print("%-40s %10s %10s %7s %10s %10s" % ("workload", "luasmtp/s", "Postfix/s", "ratio", "cpu ms/msg", "Postfix"))
    labels = {"stream": "relay while submitting", "fill": f"{N} queued first: accept",
              "drain": f"{N} queued first: deliver"}
    for sessions, phase, res in rows:
        ours = res["luasmtp"][phase]
        theirs = res.get("Postfix", {}).get(phase)
        rate = N / ours[0]
        cells = ["%10.0f" % rate]
        if theirs:
            cells += ["%10.0f" % (N / theirs[0]), "%7.2f" % (theirs[0] / ours[0])]
        else:
            cells += ["%10s" % "-", "%7s" % "-"]
        cells += ["%10.2f" % (ours[1] * 1000 / N), "%10.2f" % (theirs[1] * 1000 / N) if theirs else "%10s" % "-"]
        print("%-40s %s" % (f"{labels[phase]}, {sessions} sessions", " ".join(cells)))
    for sessions, phase, res in rows:
        if phase == "stream":
            opened = ", ".join(f"{name} {res[name]['sessions']}" for name in res)
            print(f"(SMTP sessions the relays opened to the sink, relaying while submitting from {sessions}: {opened})")
    if not with_postfix:
        print("(Postfix not measured: needs root and /usr/lib/postfix/sbin/master)")


if __name__ == "__main__":
    main()
