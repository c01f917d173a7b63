"""Processes for the HTTP benchmarks: a private redis-server, a real ``twistd -n emond``.

Shared by ``bench/ingest.py`` and ``bench/e2e.py``; plain blocking code (the
benchmarks are scripts, not trial tests). Servers write their output to a
log file in their temp dir (no pipe for the benchmark process to drain);
readiness is a poll of that file for the server's ready line. Everything
started here is stopped with SIGTERM (SIGKILL after a deadline) and its temp
dir removed by ``Harness.close``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from emond.keys import input_stream, storage_stream  # noqa: E402  (key names live in one place)

HOST = "127.0.0.1"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
QUEUES = 64  # [input] queues (the default)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pinned(cpu: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` under ``taskset -c cpu`` (taskset execs it: the pid stays the program's)."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", cpu, *argv]


class Server:
    """A child process whose stdout+stderr go to ``log``; ready once ``ready`` is in it."""

    def __init__(self, name: str, argv: list[str], cwd: str, ready: Sequence[bytes], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = os.path.join(cwd, f"{name}.log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            output = self.output()
            if all(r in output for r in ready):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not ready after {READY_TIMEOUT:.0f}s:\n{self.tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> bytes:
        with open(self.log, "rb") as f:
            return f.read()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().decode("utf-8", "replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, wait; SIGKILL after STOP_TIMEOUT. The exit code (negative: a signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} (pid {self.pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f}s: SIGKILL", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Redis:
    """Blocking RESP over one socket: enough to read queue lengths."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"redis: unexpected reply {line!r}")

    def pipeline(self, commands: list[Sequence[Any]]) -> list[Any]:
        out = []
        for command in commands:
            parts = [str(a).encode() if not isinstance(a, bytes) else a for a in command]
            out.append(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        self.sock.sendall(b"".join(out))
        return [self._reply() for _ in commands]

    def queue_lengths(self, storage_servers: Sequence[int] = (0,)) -> tuple[int, int]:
        """(elements in the input queues, elements in the storage queues)."""
        streams = [input_stream(q) for q in range(QUEUES)] + [storage_stream(s) for s in storage_servers]
        lengths = self.pipeline([("XLEN", s) for s in streams])
        return sum(lengths[:QUEUES]), sum(lengths[QUEUES:])

    def calls(self, command: str) -> int:
        """How many times this Redis has run ``command`` (``INFO commandstats``)."""
        info = self.pipeline([("INFO", "commandstats")])[0].decode()
        for line in info.splitlines():
            if line.startswith(f"cmdstat_{command.lower()}:"):
                return int(line.split("calls=", 1)[1].split(",", 1)[0])
        return 0

    def close(self) -> None:
        self.sock.close()


class Harness:
    """Temp dirs and processes of one benchmark run; ``close`` undoes all of it."""

    def __init__(self, prefix: str) -> None:
        self.base = tempfile.mkdtemp(prefix=f"emond-bench-{prefix}-")
        self.servers: list[Server] = []

    def dir(self, name: str) -> str:
        d = os.path.join(self.base, name)
        os.makedirs(d, exist_ok=True)
        return d

    def redis(self, cpu: str | None = None) -> tuple[Server, int]:
        """A private redis-server on a free port. No persistence (``--save '' --appendonly no``):
        emond's default is ``appendonly yes`` / ``appendfsync everysec``; this bench leaves
        the AOF write out."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (bin/setup installs it)")
        d = self.dir("redis")
        for attempt in range(3):
            port = free_port()
            argv = pinned(cpu, [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", d])
            try:
                server = Server(f"redis-{port}", argv, d, [b"Ready to accept connections"])
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            self.servers.append(server)
            return server, port
        raise AssertionError("unreachable")

    def emond(self, redis_port: int, cpu: str | None = None, extra: str = "", consumer_of: str | None = None,
              prelude: str = "", port: int | None = None, node_extra: str = "", name: str = "",
              storage: str | None = None) -> tuple[Server, int, str]:
        """A real ``twistd -n emond`` with a temp config: free port, temp datadir, SQLite, no rate limit.
        ``consumer_of``: the datadir of a node this one only consumes for (same database, no storage).
        ``prelude``: Python run in the twistd process before twistd starts (instrumentation).
        ``port``: this HTTP port instead of a free one; ``node_extra``: more ``[node]`` keys;
        ``name``: its folder (default ``node``, or ``consumer`` with ``consumer_of``);
        ``storage``: its ``[node] storage`` (default ``[0]``, or ``[]`` with ``consumer_of``)."""
        d = self.dir(name or ("consumer" if consumer_of else "node"))
        port = port or free_port()
        config = os.path.join(d, "emond.toml")
        database = os.path.join(os.path.dirname(consumer_of), "emond.db") if consumer_of else "emond.db"
        with open(config, "w") as f:
            f.write(
                f'[node]\nhttp = "tcp:{port}:interface={HOST}"\ndatadir = "var"\nstorage = {storage or ("[]" if consumer_of else "[0]")}\n{node_extra}'
                f'[redis]\nurl = "redis://{HOST}:{redis_port}/0"\n'
                f'[database]\nurl = "sqlite:///{database}"\n'
                f"[input]\nqueues = {QUEUES}\nrate_limit = 0.0\n{extra}"
            )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = pinned(cpu, [sys.executable, "-c", prelude + "\n" + TWISTD, "-n", "--pidfile=", "emond", "--config", config])
        server = Server("emond", argv, d, [b"node API ready", b"Site starting on"], env=env)
        self.servers.append(server)
        return server, port, os.path.join(d, "var")

    def bare(self, cpu: str | None = None) -> tuple[Server, int]:
        """A bare twisted.web server: one leaf Resource answering ``ok`` to GET and POST."""
        port = free_port()
        code = (
            "import sys\n"
            "from twisted.internet import reactor\n"
            "from twisted.web.resource import Resource\n"
            "from twisted.web.server import Site\n"
            "class Ok(Resource):\n"
            "    isLeaf = True\n"
            "    def render_GET(self, request):\n"
            "        return b'ok'\n"
            "    render_POST = render_GET\n"
            f"reactor.listenTCP({port}, Site(Ok()), interface='{HOST}')\n"
            "print('bare server listening', flush=True)\n"
            "reactor.run()\n"
        )
        server = Server("bare", pinned(cpu, [sys.executable, "-c", code]), self.dir("bare"), [b"bare server listening"])
        self.servers.append(server)
        return server, port

    def close(self, keep: bool = False) -> None:
        """Stop every server (SIGTERM, wait); remove the temp dir unless ``keep``."""
        for server in reversed(self.servers):
            code = server.stop()
            if server.name == "emond" and code not in (0, None, -signal.SIGTERM):  # twistd re-raises SIGTERM
                print(f"  emond exited with {code}; last output:\n{server.tail()}", file=sys.stderr)
        self.servers = []
        if keep:
            print(f"kept {self.base}", file=sys.stderr)
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def described() -> str:
    """The checkout being measured (``git describe --always --dirty``), for a bench's first line."""
    return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], stdout=subprocess.PIPE, text=True).stdout.strip()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (all its threads; ``/proc/PID/stat``); None: this one."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SUMMARY = "EMOND_BENCH_SUMMARY"  # bench/all sets it: a file each bench appends its figures to


def report(measure: str, figure: float, unit: str, anchor: float | None = None, anchor_is: str = "",
           better: str = "higher", goal: float | None = 1.0, note: str = "") -> None:
    """One figure for ``bench/all``'s table (a JSON line appended to ``$EMOND_BENCH_SUMMARY``;
    nothing without it). ``anchor``: what the figure is set against (a goal, or another
    server's figure; ``anchor_is`` says which); the ratio is figure / anchor, and ``goal`` the
    ratio to reach: at least it if ``better`` is "higher", at most it if "lower" (None: no goal)."""
    path = os.environ.get(SUMMARY)
    if not path:
        return
    row = {"measure": measure, "figure": figure, "unit": unit, "anchor": anchor, "anchor_is": anchor_is,
           "better": better, "goal": goal, "note": note}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def call(port: int, path: str, host: str = HOST, **params: str) -> Any:
    """POST a form to emond's API; the JSON answer (or the raw body if it is not JSON)."""
    body = urllib.parse.urlencode(params).encode()
    request = urllib.request.Request(f"http://{host}:{port}/{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def register(port: int, username: str = "bench", host: str = HOST) -> str:
    """Register a user; its write API key."""
    answer = call(port, "user/register.json", host=host, username=username, password="benchpass1", email=f"{username}@example.org")
    if not isinstance(answer, dict) or "apikey_write" not in answer:
        raise SystemExit(f"user/register.json failed: {answer!r}")
    return answer["apikey_write"]


def wait_drained(redis: Redis, timeout: float, poll: float = 0.05) -> float:
    """Poll until every input and storage queue is empty; the seconds it took."""
    began = time.monotonic()
    while True:
        inputs, storage = redis.queue_lengths()
        if inputs == 0 and storage == 0:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"queues not drained after {timeout:.0f}s: {inputs} input, {storage} storage elements left")
        time.sleep(poll)


def start_profile(pid: int, out: str, seconds: float | None = None, cpu: str | None = None) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` into ``out`` (raw collapsed stacks), for ``seconds`` or until
    ``stop_profile``. None if py-spy is not installed (``pip install py-spy``)."""
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    argv = [exe, "record", "-p", str(pid), "-r", "200", "--function", "--format", "raw", "-o", out, "--nonblocking"]
    if seconds is not None:
        argv += ["-d", str(int(seconds))]
    return subprocess.Popen(pinned(cpu, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_profile(spy: subprocess.Popen[bytes] | None, out: str, top: int = 15) -> str:
    """Stop (SIGINT) or wait for a ``start_profile``; a summary of the hottest functions.

    Self time is where a sample's innermost frame was; total time counts a
    function once per sample anywhere on the stack. Idle time (the reactor
    waiting in epoll) is not sampled.
    """
    if spy is None:
        return "py-spy is not installed (pip install py-spy): no profile"
    if spy.poll() is None and "-d" not in spy.args:
        spy.send_signal(signal.SIGINT)
    output, _ = spy.communicate(timeout=120)
    if not os.path.exists(out):
        return f"py-spy failed ({spy.returncode}): {output.decode(errors='replace')[-500:]}"
    return summarize(out, top)


def profile(pid: int, seconds: float, out: str, top: int = 15, cpu: str | None = None) -> str:
    """``py-spy record`` of ``pid`` for ``seconds``; the summary of ``stop_profile``."""
    return stop_profile(start_profile(pid, out, seconds, cpu), out, top)


def summarize(out: str, top: int = 15) -> str:
    """Self time by function and by file, and the time spent under each emond function."""
    selfs: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    totals: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [_short(fr) for fr in stack.split(";")]
            samples += n
            selfs[frames[-1]] += n
            files[frames[-1].rpartition(" (")[2].split(":")[0].rstrip(")")] += n
            for fr in set(frames):
                if "(emond/" in fr or "HTTPFactory.log" in fr or "FileLogObserver" in fr:
                    totals[fr] += n
    if not samples:
        return "py-spy recorded no samples"
    lines = [f"{samples} samples at 200/s (idle time not sampled); self time by function:"]
    lines += [f"  {100 * n / samples:5.1f}%  {fr}" for fr, n in selfs.most_common(top)]
    lines.append("self time by file:")
    lines += [f"  {100 * n / samples:5.1f}%  {fr}" for fr, n in files.most_common(12)]
    lines.append("total time under emond functions (and the access log):")
    lines += [f"  {100 * n / samples:5.1f}%  {fr}" for fr, n in totals.most_common(top + 5)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (path/to/file.py:line)`` → ``func (file.py:line)``, site-packages paths shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3.11/", ROOT + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"
