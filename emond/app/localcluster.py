"""A local cluster for trying and testing (issue 12, architecture §7): ``bin/cluster up DIR``.

On this one machine, each "machine" on its own loopback address (so nothing may assume one
host): MariaDB and the central Redis (sessions, throttles, the key cache), two shards (or
``--shards N``: a, b, c, ...; each its own ``redis-server``, one shard process ``twistd emond``
with ``[node] front = false`` and one ``twistd emond-storage``), two fronts (``[node] shard = ""``) and HAProxy, configured from
``etc/haproxy.cfg``, in front of them. Everything lives under DIR: configs, certificates
(``etc/make-certs``), data, a log and a pid per process, and ``cluster.json``, the record of
what ``up`` started, which ``down`` stops, exactly that (a pid is signalled only while it is
still the process ``up`` started), and which makes a second ``up`` refuse.

``up`` prints one JSON line: ``{"entry": URL, "fronts": [URL, ...], "admin": [argv...],
"shards": {NAME: {"redis_pid": PID, ...}}, ...}``. The ports are chosen free on the first
``up`` and kept for the next (``layout.json``), so the URLs stay the same after ``down``/``up``.

``bin/cluster restart DIR NAME`` starts one process again (``shard-a``, ``storage-b``,
``front1``, ``redis-a``, ``haproxy``, ...: the names of DIR/run) with the command, folder and
environment ``up`` recorded for it, stopping it first if it still runs, as an operator or
systemd would after a crash, and prints ``{"name": NAME, "pid": PID, ...}`` once it answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from emond.app import programs

SHARDS = ("a", "b")
FRONTS = ("front1", "front2")
# The "machines": one loopback address each.
DB_HOST = "127.0.0.11"  # MariaDB and the central Redis
SHARD_HOSTS = MappingProxyType({"a": "127.0.0.12", "b": "127.0.0.13"})  # a shard's Redis, its process, its storage server
EXTRA_SHARD_HOSTS = "127.0.0.{}"  # the third shard on: 127.0.0.22, .23, ... (bench/cluster.py runs up to 8)
MAX_SHARDS = 26  # named a, b, ... z
FRONT_HOSTS = MappingProxyType({"front1": "127.0.0.14", "front2": "127.0.0.15"})
ENTRY_HOST = "127.0.0.16"  # HAProxy
DATABASE = "emond"
READY_TIMEOUT = 120.0  # seconds for the whole cluster to answer (MariaDB's first start is slow)
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL (emond drains for up to 10 s)
POLL = 0.1  # seconds between two readiness probes of a process that is starting
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (MariaDB's socket lives under DIR)


class ClusterError(Exception):
    """``bin/cluster`` refused or failed; the message says why and what to do."""


def shard_names(count: int) -> tuple[str, ...]:
    """The shards of a cluster of ``count`` shards: "a", "b", ..."""
    if not 1 <= count <= MAX_SHARDS:
        raise ClusterError(f"a local cluster has 1 to {MAX_SHARDS} shards, not {count}")
    return tuple(chr(ord("a") + i) for i in range(count))


def shard_host(name: str) -> str:
    """The loopback address of a shard's "machine"."""
    return SHARD_HOSTS.get(name) or EXTRA_SHARD_HOSTS.format(20 + ord(name) - ord("a"))


# -- the entry point's config ---------------------------------------------------------


def entry_config(
    template: str,
    bind: str,
    servers: list[tuple[str, str]],
    *,
    proxy_protocol: bool = True,
    source: str | None = None,
    tls_cert: str | None = None,
    log: str | None = None,
) -> str:
    """``etc/haproxy.cfg`` (``template``) with its own addresses: the frontend's ``bind``
    (with ``tls_cert``: TLS terminated there), one ``server NAME HOST:PORT`` per front, and
    HAProxy's ``source`` address towards the fronts. ``proxy_protocol=False``: the fronts
    get ``X-Forwarded-For`` (``option forwardfor``) instead of the PROXY header. ``log``:
    where the log goes instead of syslog (e.g. ``stdout format raw local0``)."""
    out: list[str] = []
    seen = {"bind": False, "server": False, "default-server": False}
    for line in template.splitlines():
        words = line.split()
        keyword = words[0] if words else ""
        indent = line[: len(line) - len(line.lstrip())]
        if keyword == "bind":
            if not seen["bind"]:
                out.append(f"{indent}bind {bind}" + (f" ssl crt {tls_cert}" if tls_cert else ""))
            seen["bind"] = True
        elif keyword == "server":
            if not seen["server"]:
                out.extend(f"{indent}server {name} {address}" for name, address in servers)
            seen["server"] = True
        elif keyword == "log" and words[1:2] != ["global"] and log:
            out.append(f"{indent}log {log}")
        elif keyword == "default-server":
            seen["default-server"] = True
            if not proxy_protocol:
                words = [w for w in words if w != "send-proxy-v2"]
                out.append(f"{indent}option forwardfor")
            if source:
                words += ["source", source]
            out.append(indent + " ".join(words))
        else:
            out.append(line)
    missing = [k for k, found in seen.items() if not found]
    if missing:
        raise ValueError(f"the HAProxy template has no {', '.join(missing)} line")
    return "\n".join(out) + "\n"


# -- where everything is ----------------------------------------------------------------


@dataclass
class Layout:
    """The ports of the cluster's processes, each on its machine's address: chosen free on
    the first ``up`` and kept in DIR/layout.json, so the URLs stay the same."""

    mariadb: int
    redis: int  # the central Redis
    shards: dict[str, dict[str, int]]  # shard -> "redis", "http" (its process), "stream" and "storage_http" (its storage server)
    fronts: dict[str, int]  # front -> its HTTP port
    entry: int

    @classmethod
    def choose(cls, shards: tuple[str, ...] = SHARDS) -> Layout:
        taken: set[tuple[str, int]] = set()

        def free(host: str) -> int:
            # Below the kernel's ephemeral range (32768-60999 by default): a port there cannot
            # be taken by some program's outgoing connection between this choice and the bind.
            while True:
                port = _random.randrange(*PORT_RANGE)
                if (host, port) not in taken and _can_listen(host, port):
                    taken.add((host, port))
                    return port

        return cls(
            mariadb=free(DB_HOST),
            redis=free(DB_HOST),
            shards={name: {key: free(shard_host(name)) for key in SHARD_PORTS} for name in shards},
            fronts={name: free(host) for name, host in FRONT_HOSTS.items()},
            entry=free(ENTRY_HOST),
        )

    def addresses(self) -> list[tuple[str, int]]:
        """Every (address, port) the cluster listens on."""
        found = [(DB_HOST, self.mariadb), (DB_HOST, self.redis), (ENTRY_HOST, self.entry)]
        for name, ports in self.shards.items():
            found += [(shard_host(name), port) for port in ports.values()]
        found += [(FRONT_HOSTS[name], port) for name, port in self.fronts.items()]
        return found

    @property
    def database_url(self) -> str:
        return f"mysql://root@{DB_HOST}:{self.mariadb}/{DATABASE}"

    def redis_url(self, shard: str = "") -> str:
        """The shard's Redis, or the central one."""
        if not shard:
            return f"redis://{DB_HOST}:{self.redis}/0"
        return f"redis://{shard_host(shard)}:{self.shards[shard]['redis']}/0"

    def shard_http(self, shard: str, key: str = "http") -> tuple[str, int]:
        """(address, port) of the shard process's HTTP (``http``) or its storage server's
        (``storage_http``), or its storage server's stream (``stream``)."""
        return shard_host(shard), self.shards[shard][key]

    def front_http(self, front: str) -> tuple[str, int]:
        return FRONT_HOSTS[front], self.fronts[front]


SHARD_PORTS = ("redis", "http", "stream", "storage_http")
PORT_RANGE = (20000, 32768)
_random = random.SystemRandom()  # from the OS: two clusters started at once draw apart


def _url(address: tuple[str, int]) -> str:
    return f"http://{address[0]}:{address[1]}/"


@dataclass
class Started:
    """One process ``up`` started: ``down`` signals ``pid`` only while it is still this
    process (the same start time in /proc), never a later process that got the number;
    ``restart`` starts ``argv`` again in ``cwd``."""

    name: str
    pid: int
    started: int  # clock ticks after boot, from /proc/PID/stat
    tier: int  # stopped in decreasing tiers: the entry first, the database last
    log: str
    argv: list[str] = field(default_factory=list)  # empty in a record of an older bin/cluster
    cwd: str = ""
    checkout_env: bool = False  # run with programs.checkout_env() (emond's own programs)


# Tiers: started in this order (2-4 together), stopped in the reverse one, so that a
# process stops before what it writes to.
DATABASE_TIER, REDIS_TIER, STORAGE_TIER, SHARD_TIER, FRONT_TIER, ENTRY_TIER = range(6)


@dataclass
class _Child:
    started: Started
    proc: subprocess.Popen[bytes]


@dataclass
class Record:
    """DIR/cluster.json: what ``up`` started, written as each process starts (so ``down``
    stops it even after ``up`` itself was killed)."""

    processes: list[Started] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# -- the cluster -------------------------------------------------------------------------


class LocalCluster:
    """``up`` and ``down`` of the cluster under ``directory``."""

    def __init__(
        self, directory: str, say: Callable[[str], None] = lambda text: None, shards: int = len(SHARDS),
        settings: Mapping[str, Mapping[str, Any]] = MappingProxyType({}),
    ) -> None:
        """``shards``: how many (a, b, ...); ``settings``: keys of the nodes' ``[input]`` and
        ``[users]`` other than the defaults (bench/cluster.py lifts the rate limits)."""
        self.dir = os.path.abspath(directory)
        self.shards = shard_names(shards)
        unknown = set(settings) - set(NODE_SETTINGS)
        if unknown:
            raise ClusterError(f"settings of {', '.join(sorted(unknown))}: only {', '.join(NODE_SETTINGS)} can be set")
        self.settings = settings
        self.say = say  # progress, for a human (stderr)
        self.record_path = os.path.join(self.dir, "cluster.json")
        self.layout_path = os.path.join(self.dir, "layout.json")

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    # -- up ------------------------------------------------------------------------

    def up(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Start everything and wait until it answers; the summary (the JSON line). On a
        failure, what was started is stopped again and ClusterError says what failed."""
        self._check_machine()
        os.makedirs(self.dir, exist_ok=True)
        try:
            # Exclusive: of two `up`s in one DIR, one refuses.
            os.close(os.open(self.record_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise ClusterError(f"a cluster is already up in {self.dir} ({self.record_path} exists): `bin/cluster down {self.dir}` first")
        record = Record()
        try:
            self._save(record)
            layout = self._layout()
            self._write_files(layout)
            deadline = time.monotonic() + timeout
            self._start_databases(layout, record, deadline)
            self._start_emond(layout, record, deadline)
            self._start_entry(layout, record, deadline)
            record.summary = self._summary(layout, record)
            self._save(record)
        except BaseException:
            self._stop(record)
            os.unlink(self.record_path)
            raise
        return record.summary

    def _check_machine(self) -> None:
        for names in (("redis-server",), ("mariadbd", "mysqld"), ("haproxy",), ("openssl",)):
            try:
                programs.require_program(*names)
            except programs.MissingProgram as e:
                raise ClusterError(str(e))
        socket_path = self.path("db", "mysqld.sock")
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise ClusterError(f"{self.dir} is too long a path for MariaDB's socket ({socket_path}): use a shorter DIR")

    def _layout(self) -> Layout:
        try:
            with open(self.layout_path) as f:
                layout = Layout(**json.load(f))
        except FileNotFoundError:
            layout = Layout.choose(self.shards)
            _write_json(self.layout_path, asdict(layout))
            return layout
        if tuple(layout.shards) != self.shards:
            raise ClusterError(f"{self.dir} holds a cluster of {len(layout.shards)} shards, not {len(self.shards)}: use another DIR")
        for host, port in layout.addresses():
            if not _can_listen(host, port):
                raise ClusterError(f"port {port} on {host} is taken by another program: stop it, or remove {self.layout_path} to choose new ports")
        return layout

    def _start_databases(self, layout: Layout, record: Record, deadline: float) -> None:
        """The database machine (MariaDB, its data directory made on the first up, and the
        central Redis) and each shard's Redis."""
        data = self.path("db", "data")
        if not os.path.isdir(data):
            self.say("making MariaDB's data directory")
            try:
                programs.mariadb_install(data, self.path("db"), timeout=max(1.0, deadline - time.monotonic()))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                shutil.rmtree(data, ignore_errors=True)  # the next up makes it again
                raise ClusterError(str(e))
        argv = programs.mariadb_argv(data, self.path("db", "mysqld.sock"), layout.mariadb, DB_HOST)
        mariadb = self._spawn(record, "mariadb", DATABASE_TIER, argv, self.path("db"))
        redis = [self._spawn_redis(record, "redis", self.path("db", "redis"), DB_HOST, layout.redis)]
        for name in self.shards:
            host, port = layout.shard_http(name, "redis")
            redis.append(self._spawn_redis(record, f"redis-{name}", self.path(f"shard-{name}", "redis"), host, port))
        self._wait(mariadb, deadline, _answers(layout, "mariadb"))
        _create_database(DB_HOST, layout.mariadb, DATABASE)
        for child in redis:
            self._wait(child, deadline, _answers(layout, child.started.name))

    def _start_emond(self, layout: Layout, record: Record, deadline: float) -> None:
        """Storage servers, shard processes and fronts, together (the links and the schema
        migration wait for each other); each is up once its /health answers 200."""
        waiting = []
        for name in self.shards:
            config = self.path(f"shard-{name}", "storage.toml")
            waiting.append(self._spawn_twistd(record, f"storage-{name}", STORAGE_TIER, "emond-storage", config))
        for name in self.shards:
            waiting.append(self._spawn_twistd(record, f"shard-{name}", SHARD_TIER, "emond", self.path(f"shard-{name}", "emond.toml")))
        for name in FRONTS:
            waiting.append(self._spawn_twistd(record, name, FRONT_TIER, "emond", self.path(name, "emond.toml")))
        for child in waiting:
            self._wait(child, deadline, _answers(layout, child.started.name))

    def _start_entry(self, layout: Layout, record: Record, deadline: float) -> None:
        argv = programs.haproxy_argv(self.path("entry", "haproxy.cfg"))
        haproxy = self._spawn(record, "haproxy", ENTRY_TIER, argv, self.path("entry"))
        self._wait(haproxy, deadline, _answers(layout, "haproxy"))

    def _summary(self, layout: Layout, record: Record) -> dict[str, Any]:
        """The JSON line: the issue's four keys first, then where the rest is."""
        pids = {p.name: p.pid for p in record.processes}
        shards = {}
        for i, name in enumerate(layout.shards):
            shards[name] = {
                "redis": layout.redis_url(name),
                "redis_pid": pids[f"redis-{name}"],
                "shard_pid": pids[f"shard-{name}"],
                "shard_url": _url(layout.shard_http(name)),
                "storage_pid": pids[f"storage-{name}"],
                "storage_url": _url(layout.shard_http(name, "storage_http")),
                "storage": [i + 1],
            }
        return {
            "entry": _url((ENTRY_HOST, layout.entry)),
            "fronts": [_url(layout.front_http(name)) for name in FRONTS],
            "admin": [os.path.join(programs.ROOT, "bin", "emond-admin"), "--config", self.path("admin", "emond.toml")],
            "shards": shards,
            "database": {"url": layout.database_url, "pid": pids["mariadb"]},
            "redis": {"url": layout.redis_url(), "pid": pids["redis"]},
            "front_pids": [pids[name] for name in FRONTS],
            "haproxy_pid": pids["haproxy"],
            "dir": self.dir,
        }

    # -- the files under DIR ---------------------------------------------------------

    def _write_files(self, layout: Layout) -> None:
        """Certificates (kept if there), and every process's config (written anew)."""
        names = [f"storage-{n}" for n in self.shards] + [f"shard-{n}" for n in self.shards] + list(FRONTS) + ["admin"]
        done = subprocess.run(
            [os.path.join(programs.ROOT, "etc", "make-certs"), self.path("tls"), *names],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        if done.returncode != 0:
            raise ClusterError("etc/make-certs failed: " + programs.tail(done.stdout))
        clients = [n for n in names if not n.startswith("storage-")]
        for i, name in enumerate(self.shards):
            _write(self.path(f"shard-{name}", "storage.toml"), _storage_config(layout, i + 1, name, clients))
            _write(self.path(f"shard-{name}", "emond.toml"), _node_config(layout, f"shard-{name}", layout.shard_http(name), shard=name, settings=self.settings))
        for name in FRONTS:
            _write(self.path(name, "emond.toml"), _node_config(layout, name, layout.front_http(name), shard="", settings=self.settings))
        # emond-admin's view of the cluster: a front's (it never listens).
        _write(self.path("admin", "emond.toml"), _node_config(layout, "admin", (DB_HOST, 0), shard=""))
        _write(self.path("entry", "haproxy.cfg"), _entry_config(layout))
        os.makedirs(self.path("db"), exist_ok=True)

    # -- processes -----------------------------------------------------------------

    def _spawn_redis(self, record: Record, name: str, directory: str, host: str, port: int) -> _Child:
        os.makedirs(directory, exist_ok=True)
        argv = [programs.require_program("redis-server"), *programs.redis_args(directory, port=port, bind=host, durable=True)]
        return self._spawn(record, name, REDIS_TIER, argv, directory)

    def _spawn_twistd(self, record: Record, name: str, tier: int, plugin: str, config: str) -> _Child:
        argv = programs.twistd_argv(plugin, config)
        return self._spawn(record, name, tier, argv, os.path.dirname(config), checkout_env=True)

    def _spawn(
        self, record: Record, name: str, tier: int, argv: list[str], cwd: str, checkout_env: bool = False
    ) -> _Child:
        """Start ``argv`` in a session of its own (it outlives ``up``, and a Ctrl-C of ``up``
        does not reach it), its output appended to DIR/log/NAME.log, its pid in
        DIR/run/NAME.pid and in the record."""
        log_path = self.path("log", f"{name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        os.makedirs(self.path("run"), exist_ok=True)
        env = programs.checkout_env() if checkout_env else None
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        started = Started(name, proc.pid, _start_time(proc.pid) or 0, tier, log_path, list(argv), cwd, checkout_env)
        record.processes.append(started)
        self._save(record)
        with open(self.path("run", f"{name}.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        return _Child(started, proc)

    def _wait(self, child: _Child, deadline: float, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` (a probe of what clients use); ClusterError with the end of its
        log if the process exits first or the deadline passes.

        A probe, not the program's ready line as tests/support reads it from a pipe: these
        processes must outlive ``up``, so their output goes to a file, not to a pipe that
        someone has to keep reading."""
        began = time.monotonic()
        while not ready():
            code = child.proc.poll()
            if code is not None:
                raise ClusterError(f"{child.started.name} exited with code {code} before it answered; {_log_tail(child.started)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{child.started.name} did not answer in time; {_log_tail(child.started)}")
            time.sleep(POLL)  # a command waiting for another process: nothing to wake it sooner
        self.say(f"{child.started.name} (pid {child.started.pid}) ready in {time.monotonic() - began:.1f}s")

    # -- down ----------------------------------------------------------------------

    def down(self) -> dict[str, Any]:
        """Stop what ``up`` started (those still running), entry first, database last."""
        record = self._load()
        stopped = self._stop(record)
        os.unlink(self.record_path)
        return {"stopped": stopped}

    # -- restart -------------------------------------------------------------------

    def restart(self, name: str, timeout: float = READY_TIMEOUT, wrap: Sequence[str] = ()) -> dict[str, Any]:
        """Start the process ``name`` (as in DIR/run: ``shard-a``, ``storage-b``, ``front1``,
        ...) again the way ``up`` started it, with the same argv, folder and environment, as
        an operator or systemd restarts a service: stopped first if it still runs (SIGTERM,
        as ``down``), then started and waited for until it answers. The new pid goes to the
        record (``down`` stops it), DIR/run/NAME.pid and the summary; fires with
        ``{"name": NAME, "pid": NEW, "was": OLD, "was_running": BOOL}``. ``wrap``: a command
        the argv is run under (``valgrind --tool=callgrind``: bench/cluster.py counts a
        front's instructions that way); it stays in the record."""
        record = self._load()
        old = next((p for p in record.processes if p.name == name), None)
        if old is None:
            raise ClusterError(f"no process {name!r} in the cluster in {self.dir}: one of {', '.join(p.name for p in record.processes)}")
        if not old.argv:
            raise ClusterError(f"{name} was started by an older bin/cluster that did not record its command: down and up again")
        with open(self.layout_path) as f:
            layout = Layout(**json.load(f))
        running = _alive(old)
        self._stop(Record([old]))
        record.processes.remove(old)
        deadline = time.monotonic() + timeout
        child = self._spawn(record, name, old.tier, [*wrap, *old.argv], old.cwd, checkout_env=old.checkout_env)
        if record.summary:  # after a failed `up` there is none to keep current
            record.summary = self._summary(layout, record)
            self._save(record)
        self._wait(child, deadline, _answers(layout, name))
        return {"name": name, "pid": child.started.pid, "was": old.pid, "was_running": running}

    def _load(self) -> Record:
        try:
            with open(self.record_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ClusterError(f"no cluster is up in {self.dir} (no {self.record_path})")
        return Record([Started(**p) for p in data.get("processes", [])], data.get("summary", {}))

    def _stop(self, record: Record) -> dict[str, int]:
        """SIGTERM tier by tier, each tier waited for (SIGKILL after STOP_TIMEOUT): a shard
        process drains into its Redis before that Redis stops. Fires with what was stopped."""
        stopped: dict[str, int] = {}
        for tier in sorted({p.tier for p in record.processes}, reverse=True):
            group = [p for p in record.processes if p.tier == tier and _alive(p)]
            for p in group:
                _signal(p, signal.SIGCONT)  # a frozen (SIGSTOP) process would not act on SIGTERM
                _signal(p, signal.SIGTERM)
            for p in _wait_gone(group, STOP_TIMEOUT):
                self.say(f"{p.name} (pid {p.pid}) still running {STOP_TIMEOUT:.0f}s after SIGTERM: SIGKILL")
                _signal(p, signal.SIGKILL)
            left = _wait_gone(group, STOP_TIMEOUT)
            if left:
                raise ClusterError(f"could not stop {', '.join(f'{p.name} (pid {p.pid})' for p in left)}")
            for p in group:
                stopped[p.name] = p.pid
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path("run", f"{p.name}.pid"))
                self.say(f"{p.name} (pid {p.pid}) stopped")
        return stopped

    def _save(self, record: Record) -> None:
        _write_json(self.record_path, asdict(record))


# -- configs -------------------------------------------------------------------------------


def _node_config(
    layout: Layout, name: str, http: tuple[str, int], shard: str, settings: Mapping[str, Mapping[str, Any]] = MappingProxyType({})
) -> str:
    """A ``twistd emond`` of the cluster: a shard process (``shard`` names it: consumes, not
    a front) or a front (``shard = ""``: accepts any user's requests, consumes nothing)."""
    front = not shard
    host, port = http
    lines = [
        "# Written by bin/cluster up (emond/app/localcluster.py), anew at each up.",
        "[node]",
        f"name = {_q(name)}                # its certificate on the storage stream",
        f"http = {_q(f'tcp:{port}:interface={host}')}",
        'datadir = "var"',
        "storage = []                      # the storage servers are emond-storage processes",
        f"front = {_toml(front)}",
        f"shard = {_q(shard)}",
        "[redis]                           # the central Redis: sessions, throttles, the key cache",
        f"url = {_q(layout.redis_url())}",
        "[database]",
        f"url = {_q(layout.database_url)}",
        "[input]",
        f"consume = {_toml(not front)}",
        *_settings(settings, "input"),
        "[feeds]",
        "default_server = 1",
        "[users]",
        # A front believes X-Forwarded-For from HAProxy only.
        f"trusted_proxies = [{_q(ENTRY_HOST) if front else ''}]",
        *_settings(settings, "users"),
    ]
    for i, shard_name in enumerate(layout.shards):
        lines += [f"[shards.{shard_name}]", f"redis = {_q(layout.redis_url(shard_name))}", f"storage = [{i + 1}]"]
    lines.append("[storage.servers]")
    for i, shard_name in enumerate(layout.shards):
        endpoint = "tcp:{}:{}".format(*layout.shard_http(shard_name, "stream"))
        lines.append(f"{i + 1} = {{ endpoint = {_q(endpoint)}, name = {_q(f'storage-{shard_name}')} }}")
    lines += ["[tls]", 'ca = "../tls/ca.pem"', f"cert = {_q(f'../tls/{name}.pem')}"]
    return "\n".join(lines) + "\n"


def _storage_config(layout: Layout, server_id: int, shard: str, clients: list[str]) -> str:
    listen = "tcp:{1}:interface={0}".format(*layout.shard_http(shard, "stream"))
    http = "tcp:{1}:interface={0}".format(*layout.shard_http(shard, "storage_http"))
    return "\n".join([
        "# Written by bin/cluster up (emond/app/localcluster.py), anew at each up.",
        "[storage]",
        f"id = {server_id}",
        f"listen = {_q(listen)}",
        f"http = {_q(http)}",
        'datadir = "storage"',
        f"allow = [{', '.join(_q(c) for c in clients)}]",
        "[tls]",
        'ca = "../tls/ca.pem"',
        f"cert = {_q(f'../tls/storage-{shard}.pem')}",
    ]) + "\n"


def _entry_config(layout: Layout) -> str:
    """etc/haproxy.cfg with the cluster's addresses. X-Forwarded-For, not the PROXY protocol:
    the fronts stay reachable directly too (the "fronts" URLs), believing HAProxy's address
    only ([users] trusted_proxies)."""
    with open(os.path.join(programs.ROOT, "etc", "haproxy.cfg")) as f:
        template = f.read()
    fronts = [(name, "{}:{}".format(*layout.front_http(name))) for name in FRONTS]
    return entry_config(
        template, f"{ENTRY_HOST}:{layout.entry}", fronts, proxy_protocol=False, source=ENTRY_HOST,
        log="stdout format raw local0",  # into DIR/log/haproxy.log, beside its notices
    )


NODE_SETTINGS = ("input", "users")  # the sections whose keys LocalCluster(settings=...) may set


def _settings(settings: Mapping[str, Mapping[str, Any]], section: str) -> list[str]:
    """``key = value`` lines (JSON's strings, numbers and booleans are TOML's)."""
    return [f"{key} = {json.dumps(value)}" for key, value in settings.get(section, {}).items()]


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


def _toml(value: bool) -> str:
    return "true" if value else "false"


# -- small parts ---------------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _write_json(path: str, value: Any) -> None:
    """Whole or not at all: ``down`` after a crash of ``up`` reads it."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(temporary, path)


def _log_tail(process: Started) -> str:
    with open(process.log, "rb") as f:
        return f"the end of {process.log}:\n" + programs.tail(f.read(), 20)


def _can_listen(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: starttime


def _alive(process: Started) -> bool:
    """Still the process ``up`` started, and not a zombie (exited, not yet reaped)."""
    fields = _stat(process.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == process.started


def _signal(process: Started, sig: int) -> None:
    if _alive(process):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)


def _wait_gone(processes: list[Started], timeout: float) -> list[Started]:
    """Those still alive after ``timeout`` seconds (no wait() to block on: after ``up``
    exited they are not our children)."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(POLL)
    return [p for p in processes if _alive(p)]


def _redis_answers(host: str, port: int) -> bool:
    """PING answered PONG (not LOADING: an append-only file still being read)."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _mariadb_answers(host: str, port: int) -> bool:
    import pymysql

    try:
        pymysql.connect(host=host, port=port, user="root", connect_timeout=2).close()
    except pymysql.err.OperationalError:
        return False
    return True


def _create_database(host: str, port: int, name: str) -> None:
    import pymysql

    conn = pymysql.connect(host=host, port=port, user="root", connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()


def _answers(layout: Layout, name: str) -> Callable[[], bool]:
    """The readiness probe of the cluster's process ``name``: what its clients use."""
    if name == "mariadb":
        return lambda: _mariadb_answers(DB_HOST, layout.mariadb)
    if name == "redis":
        return lambda: _redis_answers(DB_HOST, layout.redis)
    if name == "haproxy":
        return lambda: _health_ok(ENTRY_HOST, layout.entry)
    if name in FRONT_HOSTS:
        return lambda: _health_ok(*layout.front_http(name))
    kind, _, shard = name.partition("-")  # redis-a, shard-a, storage-a
    if shard in layout.shards and kind == "redis":
        return lambda: _redis_answers(*layout.shard_http(shard, "redis"))
    if shard in layout.shards and kind in ("shard", "storage"):
        return lambda: _health_ok(*layout.shard_http(shard, "http" if kind == "shard" else "storage_http"))
    raise ClusterError(f"no process {name!r} in a local cluster")


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy from the environment


def _health_ok(host: str, port: int) -> bool:
    try:
        with _NO_PROXY.open(f"http://{host}:{port}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):  # an HTTPError (503) included
        return False


def main(argv: list[str] | None = None) -> int:
    """``bin/cluster up DIR`` | ``bin/cluster down DIR`` | ``bin/cluster restart DIR NAME``:
    one JSON line on stdout, progress on stderr; an error as ``{"error": ...}`` on stderr
    with exit status 1."""
    import argparse

    parser = argparse.ArgumentParser(prog="bin/cluster", description="A local emond cluster for trying and testing.")
    parser.add_argument("command", choices=["up", "down", "restart"])
    parser.add_argument("dir", help="the folder of the cluster's configs, data, logs and pids")
    parser.add_argument("name", nargs="?", help="restart: the process, as named in DIR/run (shard-a, storage-b, front1, haproxy, ...)")
    parser.add_argument("--shards", type=int, default=len(SHARDS), help="shards started by up (default 2: a, b)")
    args = parser.parse_args(argv)
    if (args.name is None) != (args.command != "restart"):
        parser.error("restart takes DIR NAME; up and down take DIR only")
    say = lambda text: print(f"cluster: {text}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        cluster = LocalCluster(args.dir, say=say, shards=args.shards)
    except ClusterError as e:
        print(json.dumps({"error": str(e)}), file=sys.stderr)
        return 1
    try:
        if args.command == "restart":
            result = cluster.restart(args.name)
        else:
            result = cluster.up() if args.command == "up" else cluster.down()
    except (ClusterError, programs.MissingProgram, OSError) as e:
        print(json.dumps({"error": str(e)}), file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
