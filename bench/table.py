"""The benchmark table of `make bench`: luasmtp against other software in
the same run, on the same machine and load generators, reported as
ratios (absolute numbers on a shared machine are noise, ratios much less
so). Progress and the detail of each benchmark go to standard error; the
table goes to standard output and to build/bench/table.txt, and as
Markdown to build/bench/table.md.

Rows (ratio above 1: luasmtp is better):
  - server, smtp-source -s 20 -l 1024, a new connection per message and
    reused connections (-d): examples/sink.lua vs Postfix's smtp-sink,
    aiosmtpd, Haraka and Nodemailer's smtp-server, each a sink that
    accepts and discards; messages/s (best of RUNS alternating runs) and
    server CPU per message (user + system from /proc of the server's
    process tree, over all runs)
  - STARTTLS on every connection: bench/smtp_load.lua --starttls against
    luasmtp, aiosmtpd and smtp-server
  - latency from the final dot to the 250 at a fixed rate below
    saturation (bench/smtp_load.lua --rate): luasmtp, smtp-sink, aiosmtpd
  - 2 workers vs 1 (luasmtp serve --workers N), where serve has --workers
  - the client vs smtp-source (bench/client.sh)
  - memory: peak RSS growth for a 100 MB message (bench/memory.py) and
    per idle session (bench/idle_memory.py, where it exists), against
    their targets
  - a line echo server vs Python asyncio (bench/load.lua), DKIM sign and
    verify vs libopendkim (bench/dkim.sh)

Every server runs under timeout(1) in its own process group on a free
loopback port and is stopped by that group's id, also when a benchmark
fails; every wait is bounded.

Usage: python3 bench/table.py     (bench/run.sh, `make bench`, runs it)
Environment: RUNS (default 3), BENCH_QUICK=1 (small counts, one run),
BENCH_ONLY=servers,workers,client,memory,idle,echo,DKIM (some steps only),
BENCH_NODE_DIR (where bench/run.sh installed the npm packages).
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from proctree import cpu_seconds, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
RUNS = int(os.environ.get("RUNS") or (1 if QUICK else 3))
# Debian's interpreter: aiosmtpd is Debian's python3-aiosmtpd
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
NODE_DIR = os.environ.get("BENCH_NODE_DIR") or os.path.join(ROOT, "build", "bench", "node")
OUT_DIR = os.path.join(ROOT, "build", "bench")
LIFETIME = 3600            # no server outlives this, whatever happens here

PLAIN_MESSAGES = 1000 if QUICK else 10000   # per smtp-source run
TLS_MESSAGES = 300 if QUICK else 3000       # per smtp_load.lua --starttls run
# 100 sessions: smtp-server waits 100 ms before each greeting, which
# bounds it to 10 new connections per second per session
TLS_SESSIONS = 100
WARMUP_MESSAGES = 200 if QUICK else 1000    # per server, before the runs
LATENCY_SESSIONS = 10
LATENCY_RATE = 500                          # messages/s, all sessions together
LATENCY_SECONDS = 2 if QUICK else 10

os.environ["LUA_PATH_5_4"] = "%s/lua/?.lua;%s/lua/?/init.lua;;" % (ROOT, ROOT)
os.environ["LUA_CPATH_5_4"] = "%s/build/?.so;;" % ROOT


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Server:
    """A server under test: started in its own process group under
    timeout(1), on a free port that CMD gets as {port}."""
    running = []

    def __init__(self, name, cmd, env=None, prepare=None, start_timeout=60):
        self.name, self.cmd, self.env, self.prepare = name, cmd, env, prepare
        self.start_timeout = start_timeout
        self.proc = None
        self.port = None

    def start(self, logfile):
        self.port = free_port()
        if self.prepare:
            self.prepare(self.port)
        cmd = [a.format(port=self.port) for a in self.cmd]
        env = dict(os.environ, **(self.env or {}))
        logfile.write("== %s: %s\n" % (self.name, " ".join(cmd)))
        logfile.flush()
        self.proc = subprocess.Popen(["timeout", "-k", "5", str(LIFETIME)] + cmd, cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                     start_new_session=True)
        Server.running.append(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited at start (status %s), see %s" % (
                    self.name, self.proc.returncode, logfile.name))
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("%s did not open port %d in %d s" % (
                        self.name, self.port, self.start_timeout))
                time.sleep(0.05)

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        """SIGTERM to the process group, SIGKILL to what is left of it
        after 15 s."""
        if self.proc is None:
            return
        kill_group(self.proc)
        if self in Server.running:
            Server.running.remove(self)
        self.proc = None


def kill_group(proc):
    """End the process group that PROC leads (started with
    start_new_session), also what is left of it once PROC is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def stop_all():
    for s in list(Server.running):
        s.stop()


def run(cmd, timeout, env=None, check=True):
    """Run CMD in a process group of its own, so that a timeout or an
    interruption ends it and whatever it started (bench/client.sh starts
    an smtp-sink). Returns its standard output; raises with its error
    output if it fails. check=False: returns (status, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError("%s did not finish in %d s" % (" ".join(cmd), timeout))
    finally:
        kill_group(proc)
    if not check:
        return proc.returncode, out, err
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(cmd), proc.returncode, err.strip()[-500:]))
    return out


def timed(cmd, timeout):
    t0 = time.monotonic()
    run(cmd, timeout)
    return time.monotonic() - t0


def alternate(servers, measure):
    """RUNS rounds, each server once per round in turn, so that drifting
    load on a shared machine hits all alike. measure(server) -> dict with
    at least "seconds". Returns {name: {"runs": [...], "cpu": seconds}}."""
    out = {s.name: {"runs": [], "cpu": 0.0} for s in servers}
    for r in range(RUNS):
        for s in servers:
            c0 = s.cpu()
            res = measure(s)
            out[s.name]["cpu"] += s.cpu() - c0
            out[s.name]["runs"].append(res)
            log("  run %d/%d %-12s %s" % (r + 1, RUNS, s.name,
                                          " ".join("%s=%.4g" % kv for kv in res.items())))
    return out


# ---------------------------------------------------------------- rows

class Table:
    def __init__(self):
        self.rows = []
        self.failed = []

    def add(self, what, vs, ours, theirs, ratio, cpu=None, note=""):
        self.rows.append((what, vs, ours, theirs, ratio, cpu, note))

    def fail(self, what, err):
        log("FAILED: %s: %s" % (what, err))
        self.failed.append(what)
        self.add(what, "", "failed", "", None, note=str(err).splitlines()[0][:60] if str(err) else "")

    def text(self):
        head = ("benchmark", "vs", "luasmtp", "other", "ratio", "CPU us/msg", "CPU ratio")
        body = []
        for what, vs, ours, theirs, ratio, cpu, note in self.rows:
            c, cr = "", ""
            if cpu:
                c = "%s / %s" % (fmt_num(cpu[0], 1), fmt_num(cpu[1], 1))
                cr = "%.2f" % (cpu[1] / cpu[0]) if cpu[0] > 0 else ""
            body.append((what, vs, ours, theirs, "" if ratio is None else "%.2f" % ratio, c, cr, note))
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        lines = []
        for r in [head] + body:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + \
                    [r[i].rjust(widths[i]) for i in range(2, len(head))]
            line = "  ".join(cells)
            if len(r) > len(head) and r[len(head)]:
                line += "  " + r[len(head)]
            lines.append(line.rstrip())
        return "\n".join(lines) + "\n"

    def markdown(self):
        out = ["| benchmark | vs | luasmtp | other | ratio | CPU µs/msg (luasmtp / other) | CPU ratio | note |",
               "|---|---|---:|---:|---:|---:|---:|---|"]
        for what, vs, ours, theirs, ratio, cpu, note in self.rows:
            c, cr = "", ""
            if cpu:
                c = "%s / %s" % (fmt_num(cpu[0], 1), fmt_num(cpu[1], 1))
                cr = "%.2f" % (cpu[1] / cpu[0]) if cpu[0] > 0 else ""
            r = "" if ratio is None else "%.2f" % ratio
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (what, vs, ours, theirs, r, c, cr, note))
        return "\n".join(out) + "\n"


def fmt_num(x, digits=0):
    return "{:,.{}f}".format(x, digits)


def rate(x, unit="/s"):
    return fmt_num(x) + unit


# ------------------------------------------------------------- servers

def make_cert(d):
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"], 60)
    return cert, key


def luasmtp_sink(cert, key):
    return Server("luasmtp", ["lua5.4", "bin/luasmtp", "serve", "examples/sink.lua",
                              "--listen", "127.0.0.1:{port}", "--cert", cert, "--key", key])


def smtp_sink():
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    return Server("smtp-sink", ["smtp-sink"] + user + ["127.0.0.1:{port}", "1024"])


def aiosmtpd_sink(cert, key):
    return Server("aiosmtpd", [PYTHON, "bench/sink_aiosmtpd.py", "{port}", str(LIFETIME), cert, key])


def node_modules():
    return os.path.join(NODE_DIR, "node_modules")


def smtp_server_sink(cert, key):
    return Server("smtp-server", ["node", "bench/sink_smtp_server.js", "{port}", str(LIFETIME), cert, key],
                  env={"NODE_PATH": node_modules()})


def haraka_sink(tmp):
    """Haraka with its default configuration, but one process (nodes=0),
    errors-only logging and bench/haraka_sink.js as the only plugin."""
    home = os.path.join(tmp, "haraka")
    pkg = os.path.join(node_modules(), "Haraka")

    def prepare(port):
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(os.path.join(pkg, "config"), os.path.join(home, "config"))
        os.makedirs(os.path.join(home, "plugins"))
        shutil.copy(os.path.join(ROOT, "bench", "haraka_sink.js"), os.path.join(home, "plugins", "bench_sink.js"))
        files = {
            "plugins": "bench_sink\n",
            # public_ip given: Haraka would otherwise ask a STUN server
            "smtp.ini": "[main]\nlisten=127.0.0.1:%d\npublic_ip=127.0.0.1\nnodes=0\n" % port,
            "log.ini": "[main]\nlevel=error\n",
            "me": "haraka.localhost\n",
        }
        for name, text in files.items():
            with open(os.path.join(home, "config", name), "w") as f:
                f.write(text)
    return Server("Haraka", ["node", os.path.join(pkg, "bin", "haraka"), "-c", home], prepare=prepare)


def peer_available(name):
    """None when the peer can run, else why not."""
    need = {"smtp-sink": ["smtp-sink", "smtp-source"], "aiosmtpd": [], "Haraka": ["node"],
            "smtp-server": ["node"]}
    for cmd in need.get(name, []):
        if not shutil.which(cmd):
            return "%s not installed" % cmd
    if name == "aiosmtpd":
        if subprocess.run([PYTHON, "-c", "import aiosmtpd"], stderr=subprocess.DEVNULL, timeout=60).returncode:
            return "python3-aiosmtpd not installed"
    if name == "Haraka" and not os.path.isdir(os.path.join(node_modules(), "Haraka")):
        return "npm package Haraka not installed (bench/run.sh installs it)"
    if name == "smtp-server" and not os.path.isdir(os.path.join(node_modules(), "smtp-server")):
        return "npm package smtp-server not installed (bench/run.sh installs it)"
    return None


# ---------------------------------------------------------- benchmarks

# Peers that get fewer messages per run, so that a run takes seconds
# rather than minutes: (kind, name) -> divisor
FEWER = {("new", "smtp-server"): 5}


def smtp_source(n, reuse):
    def measure(s):
        count = n // FEWER.get(("reused" if reuse else "new", s.name), 1)
        cmd = ["smtp-source", "-s", "20", "-m", str(count), "-l", "1024"] + (["-d"] if reuse else []) + \
              ["127.0.0.1:%d" % s.port]
        return {"messages": count, "seconds": timed(cmd, 300)}
    return measure


def smtp_load(n, sessions, extra):
    def measure(s):
        out = run(["lua5.4", "bench/smtp_load.lua", "--port", str(s.port), "--messages", str(n),
                   "--sessions", str(sessions)] + extra, 300)
        res = dict((k, float(v)) for k, v in re.findall(r"(\w+)=([\d.]+)", out))
        if res.get("messages") != n:
            raise RuntimeError("smtp_load.lua: %s" % out.strip())
        return res
    return measure


# What a reader of a row must know about a peer.
NOTES = {("new", "smtp-server"): "waits 100 ms before each greeting: at most 200 connections/s over 20 sessions"}


def throughput_rows(table, label, servers, measure, kind=None):
    """Messages/s of the best run and CPU per message over all runs."""
    res = alternate(servers, measure)

    def best_rate(name):
        return max(r["messages"] / r["seconds"] for r in res[name]["runs"])

    def cpu_per_message(name):
        return res[name]["cpu"] * 1e6 / sum(r["messages"] for r in res[name]["runs"])
    ours, our_cpu = best_rate("luasmtp"), cpu_per_message("luasmtp")
    for s in servers[1:]:
        theirs = best_rate(s.name)
        table.add(label, s.name, rate(ours), rate(theirs), ours / theirs, (our_cpu, cpu_per_message(s.name)),
                  NOTES.get((kind, s.name), ""))
        label = ""


def server_benchmarks(table, tmp, logfile):
    cert, key = make_cert(tmp)
    servers = [luasmtp_sink(cert, key)]
    peers = {"smtp-sink": smtp_sink, "aiosmtpd": lambda: aiosmtpd_sink(cert, key),
             "Haraka": lambda: haraka_sink(tmp), "smtp-server": lambda: smtp_server_sink(cert, key)}
    for name, make in peers.items():
        why = peer_available(name)
        if why:
            table.add("server: %s" % name, name, "", "", None, note="not available: " + why)
            continue
        servers.append(make())
    try:
        for s in servers:
            s.start(logfile)
        by_name = {s.name: s for s in servers}
        plain = [s for s in servers]
        tls = [by_name[n] for n in ("luasmtp", "aiosmtpd", "smtp-server") if n in by_name]
        # Warm-up, not counted: code paths, caches and allocators, and
        # Node's JIT, are warm for every server when the runs start.
        log("warm-up: %d messages to each server, plain and with STARTTLS" % WARMUP_MESSAGES)
        for s in plain:
            smtp_source(WARMUP_MESSAGES, False)(s)
            smtp_source(WARMUP_MESSAGES, True)(s)
        for s in tls:
            smtp_load(WARMUP_MESSAGES // 5, 20, ["--starttls"])(s)
        for reuse in (False, True):
            label = "server, %s" % ("reused connections (-d)" if reuse else "new connection per message")
            log("%s: %d messages of 1 KiB per run" % (label, PLAIN_MESSAGES))
            try:
                throughput_rows(table, label, plain, smtp_source(PLAIN_MESSAGES, reuse),
                                "reused" if reuse else "new")
            except Exception as e:  # noqa: BLE001 - one failed row must not cost the others
                table.fail(label, e)

        label = "server, STARTTLS on every connection"
        log("%s: %d messages per run" % (label, TLS_MESSAGES))
        try:
            throughput_rows(table, label, tls, smtp_load(TLS_MESSAGES, TLS_SESSIONS, ["--starttls"]))
        except Exception as e:  # noqa: BLE001
            table.fail(label, e)

        lat = [by_name[n] for n in ("luasmtp", "smtp-sink", "aiosmtpd") if n in by_name]
        n = LATENCY_RATE * LATENCY_SECONDS
        label = "latency dot->250 at %d msg/s" % LATENCY_RATE
        log("%s: %d messages per run" % (label, n))
        try:
            res = alternate(lat, smtp_load(n, LATENCY_SESSIONS, ["--per-connection", str(n),
                                                                  "--rate", str(LATENCY_RATE)]))
            ours = res["luasmtp"]
            for q in ("p50", "p99"):
                key_ = q + "_ms"
                best = min(r[key_] for r in ours["runs"])
                first = True
                for s in lat[1:]:
                    theirs = min(r[key_] for r in res[s.name]["runs"])
                    cpu = None
                    if q == "p50":
                        cpu = (ours["cpu"] * 1e6 / (RUNS * n), res[s.name]["cpu"] * 1e6 / (RUNS * n))
                    table.add(label + ", " + q if first else "", s.name, "%.3f ms" % best,
                              "%.3f ms" % theirs, theirs / best, cpu)
                    first = False
        except Exception as e:  # noqa: BLE001
            table.fail(label, e)
    finally:
        stop_all()


def serve_has_workers():
    try:
        r = subprocess.run(["lua5.4", "bin/luasmtp", "serve", "--help"], cwd=ROOT, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30, text=True)
    except subprocess.TimeoutExpired:
        return False
    return "--workers" in r.stdout


def workers_sink(name, n):
    # the supervisor binds the address, the workers' server.new takes it
    return Server(name, ["lua5.4", "bin/luasmtp", "serve", "--workers", str(n), "--listen", "127.0.0.1:{port}",
                         "examples/sink.lua", "--listen", "127.0.0.1:{port}"])


def workers_benchmark(table, logfile):
    """examples/sink.lua under luasmtp serve --workers 2 and --workers 1;
    CPU per message is that of the whole process tree (supervisor and
    workers)."""
    label = "luasmtp serve --workers 2 vs 1"
    if not serve_has_workers():
        table.add(label, "", "", "", None, note="not available: luasmtp serve has no --workers")
        return
    if not shutil.which("smtp-source"):
        table.add(label, "", "", "", None, note="not available: smtp-source not installed")
        return
    servers = [workers_sink("luasmtp", 2), workers_sink("1 worker", 1)]
    try:
        for s in servers:
            s.start(logfile)
        for reuse in (False, True):
            what = "%s, %s" % (label, "reused (-d)" if reuse else "new connection per message")
            log("%s: %d messages per run" % (what, PLAIN_MESSAGES))
            try:
                throughput_rows(table, what, servers, smtp_source(PLAIN_MESSAGES, reuse))
            except Exception as e:  # noqa: BLE001
                table.fail(what, e)
    finally:
        stop_all()


def client_benchmark(table):
    """bench/client.sh: luasmtp.client vs smtp-source into smtp-sink."""
    env = {"RUNS": str(RUNS)}
    if QUICK:
        env.update(MESSAGES="2000", BIG_MB="20")
    messages = int(os.environ.get("MESSAGES") or env.get("MESSAGES", 20000))
    log("client: sh bench/client.sh (%s)" % " ".join("%s=%s" % kv for kv in env.items()))
    out = run(["sh", "bench/client.sh"], 3600, env)
    log(out.rstrip())
    lines = out.splitlines()
    num = r"([\d.]+)"
    for i, line in enumerate(lines):
        # the luasmtp row, then the smtp-source row ending in the ratio
        m = re.match(r"\s+smtp-source -d -s 20\s+%s\s+%s\s+\d+\s+%s/s\s+%s$" % (num, num, num, num), line)
        if m:
            ours = re.search(r"%s\s+%s\s+\d+\s+%s/s$" % (num, num, num), lines[i - 1])
            table.add("client, %d x 1 KiB, 20 sessions" % messages, "smtp-source -d",
                      rate(float(ours.group(3))), rate(float(m.group(3))), float(m.group(4)),
                      (float(ours.group(2)) * 1e6 / messages, float(m.group(2)) * 1e6 / messages))
        m = re.match(r"\s+smtp-source -m 1 -l \d+\s+%s\s+%s\s+(\d+)\s+%s MB/s\s+%s$" % (num, num, num, num), line)
        if m:
            ours = re.search(r"%s\s+%s\s+(\d+)\s+%s MB/s$" % (num, num, num), lines[i - 1])
            size = lines[i - 1].split(" MB")[0].strip()
            table.add("client, one %s MB file body" % size, "smtp-source -m 1",
                      "%s MB/s" % ours.group(4), "%s MB/s" % m.group(4), float(m.group(5)),
                      note="RSS %d / %d MB" % (int(ours.group(3)) // 1024, int(m.group(3)) // 1024))
    if not any(r[0].startswith("client,") for r in table.rows):
        raise RuntimeError("no ratio found in the output of bench/client.sh")


def memory_benchmark(table):
    """bench/memory.py: peak RSS growth while receiving 100 MB bodies."""
    log("memory: python3 bench/memory.py")
    _, out, err = run([PYTHON, "bench/memory.py"], 900, check=False)  # status 1: a target missed
    log(out.rstrip())
    found = False
    for line in out.splitlines():
        m = re.match(r"(100 MB message by (?:DATA|BDAT)).*?\s([\d.]+) MB\s+([\d.]+) MB", line)
        if m:
            found = True
            grown, target = float(m.group(2)), float(m.group(3))
            table.add("peak RSS growth, one %s" % m.group(1), "target", "%.1f MB" % grown, "%.1f MB" % target,
                      target / grown if grown > 0 else None)
    if not found:
        raise RuntimeError("bench/memory.py: %s" % (err.strip()[-300:] or "no result"))


def idle_memory_benchmark(table):
    """bench/idle_memory.py, where it exists: RSS per idle session."""
    label = "RSS per idle session after EHLO"
    script = os.path.join(ROOT, "bench", "idle_memory.py")
    if not os.path.exists(script):
        table.add(label, "", "", "", None, note="not available: bench/idle_memory.py does not exist")
        return
    args = ["--sessions", "500"] if QUICK else []
    log("idle sessions: python3 bench/idle_memory.py %s" % " ".join(args))
    _, out, err = run([PYTHON, script] + args, 900, check=False)  # status 1: a target missed
    log(out.rstrip())
    found = False
    for line in out.splitlines():
        # kind, sessions, RSS per session ... target, ok/OVER
        m = re.match(r"(plain|tls)\s+(\d+)\s+([\d.]+) B\b.*?\s(\d+) B\s+(?:ok|OVER)", line)
        if m:
            found = True
            per, target = float(m.group(3)), float(m.group(4))
            table.add("%s, %s, %s sessions" % (label, m.group(1), m.group(2)), "target",
                      "%.1f KiB" % (per / 1024), "%.1f KiB" % (target / 1024), target / per if per > 0 else None)
    if not found:
        raise RuntimeError("bench/idle_memory.py: %s" % (err.strip()[-300:] or "no result"))


def echo_benchmark(table, logfile):
    """A line echo server: luasmtp vs Python asyncio, one load generator."""
    servers = [Server("luasmtp", ["lua5.4", "bench/echo_server.lua", "{port}", str(LIFETIME)]),
               Server("asyncio", [PYTHON, "bench/echo_server.py", "{port}", str(LIFETIME)])]
    specs = [(1, 20000, 1), (50, 1000, 1), (50, 500, 10)]
    if QUICK:
        specs = [(c, r // 10, p) for c, r, p in specs]
    try:
        for s in servers:
            s.start(logfile)
        for conns, rounds, pipeline in specs:
            def measure(s):
                out = run(["lua5.4", "bench/load.lua", str(s.port), str(conns), str(rounds), str(pipeline)], 300)
                return {"per_s": float(out.strip())}
            log("echo: conns=%d rounds=%d pipeline=%d" % (conns, rounds, pipeline))
            res = alternate(servers, measure)
            ours = max(r["per_s"] for r in res["luasmtp"]["runs"])
            theirs = max(r["per_s"] for r in res["asyncio"]["runs"])
            table.add("line echo, %d conn%s, %d line%s in flight" % (
                conns, "s" if conns > 1 else "", pipeline, "s" if pipeline > 1 else ""),
                "asyncio", rate(ours), rate(theirs), ours / theirs)
    finally:
        stop_all()


def dkim_benchmark(table):
    if not os.path.exists("/usr/include/opendkim/dkim.h") or \
            subprocess.run([PYTHON, "-c", "import dkim"], stderr=subprocess.DEVNULL, timeout=60).returncode:
        table.add("DKIM", "", "", "", None, note="not available: libopendkim-dev or python3-dkim not installed")
        return
    env = {"COUNT": "1000", "PY_COUNT": "30"} if QUICK else {}
    log("DKIM: sh bench/dkim.sh")
    out = run(["sh", "bench/dkim.sh"], 1800, env)
    log(out.rstrip())
    first = out.splitlines()[0]
    count = re.search(r"(\d+) messages of (\d+ KB)", first)
    for line in out.splitlines():
        m = re.match(r"(verify|sign)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            table.add("DKIM %s, %s x %s, rsa-sha256" % (m.group(1), count.group(1), count.group(2)),
                      "libopendkim", rate(float(m.group(2))), rate(float(m.group(3))), float(m.group(5)))


def main():
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    os.makedirs(OUT_DIR, exist_ok=True)
    table = Table()
    tmp = tempfile.mkdtemp(prefix="luasmtp-bench-")
    t0 = time.monotonic()
    log("bench: RUNS=%d%s; server output in %s" % (RUNS, ", quick mode" if QUICK else "",
                                                  os.path.join(OUT_DIR, "servers.log")))
    try:
        with open(os.path.join(OUT_DIR, "servers.log"), "w") as logfile:
            steps = [("servers", lambda: server_benchmarks(table, tmp, logfile)),
                     ("workers", lambda: workers_benchmark(table, logfile)),
                     ("client", lambda: client_benchmark(table)),
                     ("memory", lambda: memory_benchmark(table)),
                     ("idle memory", lambda: idle_memory_benchmark(table)),
                     ("echo", lambda: echo_benchmark(table, logfile)),
                     ("DKIM", lambda: dkim_benchmark(table))]
            only = [w for w in os.environ.get("BENCH_ONLY", "").split(",") if w]
            for name, step in steps:
                if only and name.split()[0] not in only:
                    continue
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - report it as a row, go on
                    table.fail(name, e)
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    text = table.text()
    with open(os.path.join(OUT_DIR, "table.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(OUT_DIR, "table.md"), "w") as f:
        f.write(table.markdown())
    print()
    print("luasmtp benchmarks, %s, RUNS=%d%s, %.0f s. Ratio above 1: luasmtp is better (throughput" % (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), RUNS, ", quick mode" if QUICK else "",
        time.monotonic() - t0))
    print("luasmtp/other; time, latency, CPU and memory other/luasmtp). CPU: server (or client) user + system")
    print("time per message, luasmtp / other. Markdown: build/bench/table.md.")
    print()
    sys.stdout.write(text)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
