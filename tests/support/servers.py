"""Private redis-server and mariadbd processes for the tests.

Each server is started lazily on first request, once per process, and shared by
every test in the run; it lives in its own temp dir on a free 127.0.0.1 port and
never touches a system service. Everything is stopped and removed at exit.

Readiness is detected by reading the server's own output for its ready line
(select() with a deadline), never by sleeping and hoping.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from twisted.python import log

from emond.app import programs
from emond.app.programs import MissingProgram, require_program, tail as _tail

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds for a server to print its ready line
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL at exit
PORT_ATTEMPTS = 3  # the free port can be taken between probe and bind
T = TypeVar("T")


@dataclass(frozen=True)
class ServerTLS:
    """TLS of a test redis-server or sentinel (``make_certs`` files): it presents ``pem`` (its
    certificate followed by its key; Redis reads both from the one file) and requires of
    every client a certificate signed by ``ca``."""

    ca: str
    pem: str

    def lines(self, port: int) -> list[tuple[str, str]]:
        """Its settings, for the command line or a config file: TLS only, on ``port``."""
        ca, pem = os.path.abspath(self.ca), os.path.abspath(self.pem)  # redis-server changes to its dir
        return [
            ("port", "0"), ("tls-port", str(port)), ("tls-cert-file", pem), ("tls-key-file", pem),
            ("tls-ca-cert-file", ca), ("tls-auth-clients", "yes"),
        ]


def make_certs(directory: str, *names: str) -> str:
    """``etc/make-certs``: a test CA (``ca.pem``) and ``NAME.pem`` per name (its CN and DNS
    name) in ``directory``, which is returned."""
    subprocess.run([os.path.join(programs.ROOT, "etc", "make-certs"), directory, *names], check=True, capture_output=True)
    return directory


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int
    dir: str
    log: str  # the server's output, for debugging
    startup_seconds: float
    tls: bool = False  # only TLS on ``port`` (``private_redis(tls=...)``)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def flushall(self) -> None:
        """Empty every database, synchronously (raw RESP; no reactor needed). Not over TLS."""
        if self.tls:
            raise RuntimeError("flushall: a TLS server's (start a private one instead)")
        with socket.create_connection((self.host, self.port), timeout=10) as s:
            s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
        if reply != b"+OK\r\n":
            raise RuntimeError(f"redis FLUSHALL failed: {reply!r}")


@dataclass(frozen=True)
class MariaDBServer:
    host: str
    port: int
    socket: str
    dir: str
    log: str
    startup_seconds: float  # includes mariadb-install-db
    user: str = "root"

    @property
    def url(self) -> str:
        return f"mysql://{self.user}@{self.host}:{self.port}/"

    def create_database(self) -> str:
        """Create a fresh, uniquely named database and return its name."""
        import pymysql  # only tests that use MariaDB need it

        name = f"test_{next(_db_numbers)}"
        conn = pymysql.connect(host=self.host, port=self.port, user=self.user)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
        return name


_db_numbers = itertools.count(1)  # the server is private, so a counter is unique
_lock = threading.Lock()
_started: dict[str, object] = {}  # name -> server, or the exception to re-raise
_processes: list[_Process] = []
_dirs: list[str] = []


def redis_server() -> RedisServer:
    """The run's redis-server, started on first call."""
    return _once("redis", _start_redis)


def mariadb_server() -> MariaDBServer:
    """The run's mariadbd, started on first call."""
    return _once("mariadb", _start_mariadb)


def _once(name: str, start: Callable[[], T]) -> T:
    with _lock:
        if name not in _started:
            try:
                _started[name] = start()
            except Exception as e:  # MissingProgram included; not KeyboardInterrupt
                # Remember a failure so later tests do not each wait out
                # another deadline (each of them errors with it).
                _started[name] = e
        value = _started[name]
    if isinstance(value, Exception):
        raise value
    return value  # type: ignore[return-value]


def _start_redis(*extra: str, tls: ServerTLS | None = None) -> RedisServer:
    exe = require_program("redis-server")
    began = time.monotonic()
    d = _tempdir("redis")
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        argv = [exe, *programs.redis_args(d, port=port, bind=HOST, durable=False)]
        if tls is not None:  # later arguments win: --port 0 among them
            argv += [arg for key, value in tls.lines(port) for arg in (f"--{key}", value)]
        argv += extra
        try:
            proc = _Process("redis-server", argv, d, programs.REDIS_READY)
            break
        except _StartError as e:
            if not e.port_in_use or attempt == PORT_ATTEMPTS - 1:
                raise
    took = time.monotonic() - began
    log.msg(f"test redis-server ready on {HOST}:{port} in {took:.2f}s")
    return RedisServer(HOST, port, d, proc.log_path, took, tls is not None)


def _start_mariadb() -> MariaDBServer:
    require_program("mariadbd", "mysqld")  # before the install: name the missing package first
    began = time.monotonic()
    d = _tempdir("mariadb")
    data, sock = os.path.join(d, "data"), os.path.join(d, "sock")
    programs.mariadb_install(data, d, READY_TIMEOUT)
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        argv = programs.mariadb_argv(data, sock, port, HOST)
        try:
            # With --no-defaults and no --log-error, mariadbd logs to stderr.
            proc = _Process("mariadbd", argv, d, programs.MARIADB_READY)
            break
        except _StartError as e:
            if not e.port_in_use or attempt == PORT_ATTEMPTS - 1:
                raise
    took = time.monotonic() - began
    log.msg(f"test mariadbd ready on {HOST}:{port} in {took:.2f}s")
    return MariaDBServer(HOST, port, sock, d, proc.log_path, took)


class _StartError(RuntimeError):
    def __init__(self, message: str, output: bytes) -> None:
        super().__init__(f"{message}; last output:\n{_tail(output)}")
        self.port_in_use = b"in use" in output


class _Process:
    """A server process whose stdout+stderr is watched until its ready line."""

    def __init__(self, name: str, argv: list[str], cwd: str, ready: bytes) -> None:
        self.name = name
        self.argv, self.cwd, self.ready = argv, cwd, ready  # to start it again (PrivateServer)
        self.log_path = os.path.join(cwd, f"{name}.log")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to the tests; atexit stops us
            preexec_fn=_die_with_parent(),
        )
        _processes.append(self)
        try:
            output = self._wait_for(ready)
        except BaseException:
            self.stop()
            raise
        # Keep draining the pipe into the log file so the server never blocks
        # on a full pipe; the thread ends when the server exits.
        threading.Thread(target=self._drain, args=(output,), daemon=True).start()

    def _wait_for(self, ready: bytes) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + READY_TIMEOUT
        output = b""
        while ready not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _StartError(f"{self.name} not ready after {READY_TIMEOUT:.0f}s", output)
            if not select.select([fd], [], [], remaining)[0]:
                continue  # timed out; the loop head raises
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the server closed its output, i.e. exited
                code = self.proc.wait(timeout=STOP_TIMEOUT)
                raise _StartError(f"{self.name} exited with code {code} before ready", output)
            output += chunk
        return output

    def _drain(self, output: bytes) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with open(self.log_path, "ab") as f:
            f.write(output)
            while chunk := os.read(fd, 65536):
                f.write(chunk)
                f.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen (SIGSTOP) server would not act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PrivateServer(Generic[T]):
    """A server of one test's own, never the run's shared one: the test may stop it, freeze
    it (SIGSTOP) and start it again on the same port and data. Stopped at exit in any case."""

    def __init__(self, start: Callable[[], T]) -> None:
        self.server = start()
        self._process = _processes[-1]  # the one ``start`` just made ready

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung host)."""
        self._process.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._process.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self._process.stop()

    def start(self) -> None:
        """Start it again (after ``stop``) on the same port and data directory."""
        old = self._process
        if old.proc.poll() is None:
            raise RuntimeError(f"{old.name} is still running")
        self._process = _Process(old.name, old.argv, old.cwd, old.ready)


def private_redis(*extra: str, tls: ServerTLS | None = None) -> PrivateServer[RedisServer]:
    """A new redis-server for one test (``.server`` has its url); ``extra``: more arguments
    (``"--replicaof", host, port`` makes it a replica); ``tls``: it takes only TLS
    connections, from clients with a certificate of the CA (its url is ``rediss://``)."""
    return PrivateServer(lambda: _start_redis(*extra, tls=tls))


def private_sentinel(
    master_port: int, service: str, down_after_ms: int = 1000, password: str = "", tls: ServerTLS | None = None
) -> PrivateServer[RedisServer]:
    """A Redis Sentinel of one test watching the master on ``master_port`` as ``service``
    (quorum 1: this sentinel alone decides a failover, ``down_after_ms`` after the master
    stops answering). ``password``: its own ``requirepass``; ``tls``: it takes only TLS
    connections, and reaches the master over TLS (with its certificate), as a master
    started with the same ``tls`` wants."""
    return PrivateServer(lambda: _start_sentinel(master_port, service, down_after_ms, password, tls))


def _start_sentinel(master_port: int, service: str, down_after_ms: int, password: str, tls: ServerTLS | None) -> RedisServer:
    exe = require_program("redis-server")
    began = time.monotonic()
    d = _tempdir("sentinel")
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        conf = os.path.join(d, "sentinel.conf")  # the sentinel rewrites it: its own, writable
        with open(conf, "w") as f:
            f.write(f"port {port}\n")
            if tls is not None:  # later lines win: port 0 among them
                f.write("".join(f"{key} {value}\n" for key, value in tls.lines(port)) + "tls-replication yes\n")
            if password:
                f.write(f"requirepass {password}\n")
            f.write(
                f"bind {HOST}\ndir {d}\n"
                f"sentinel monitor {service} {HOST} {master_port} 1\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} 10000\n"
            )
        try:
            proc = _Process("redis-sentinel", [exe, conf, "--sentinel"], d, b"+monitor master")
            break
        except _StartError as e:
            if not e.port_in_use or attempt == PORT_ATTEMPTS - 1:
                raise
    took = time.monotonic() - began
    log.msg(f"test redis sentinel ready on {HOST}:{port} in {took:.2f}s")
    return RedisServer(HOST, port, d, proc.log_path, took, tls is not None)


def private_mariadb() -> PrivateServer[MariaDBServer]:
    """A new mariadbd for one test."""
    return PrivateServer(_start_mariadb)


def free_port(host: str = HOST) -> int:
    return programs.free_port(host)


def _tempdir(name: str) -> str:
    # Short names: the MariaDB unix socket path must fit in ~107 bytes.
    d = tempfile.mkdtemp(prefix=f"emond-{name}-")
    _dirs.append(d)
    return d


try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except (OSError, TypeError):  # no dlopen(NULL), e.g. Windows
    _libc = None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the server get SIGTERM if we die unexpectedly.

    Covers SIGKILL/SIGTERM of the test process, where atexit does not run.
    Linux only. PR_SET_PDEATHSIG fires when the *forking thread* exits, so it
    is only used from the main thread. libc is loaded beforehand because the
    child of a threaded process must not dlopen.
    """
    if _libc is None or not hasattr(_libc, "prctl"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = _libc.prctl

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # 1 == PR_SET_PDEATHSIG

    return preexec


@atexit.register
def _stop_all() -> None:
    for p in reversed(_processes):
        p.stop()
    for d in _dirs:
        shutil.rmtree(d, ignore_errors=True)
