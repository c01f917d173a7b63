"""Run ``twistd emond`` / ``twistd emond-storage`` as real processes from a trial test.

Progress is followed through the daemon's own log lines (``twistd -n`` logs
to stdout), never by sleeping: ``logged(text)`` fires when a line containing
``text`` has appeared.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from emond.app.programs import ROOT, checkout_env, haproxy_argv, twistd_argv


class Daemon(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self._waiting: list[tuple[bytes, defer.Deferred[None], int]] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        still = []
        for text, d, offset in self._waiting:
            if text in self.output[offset:]:
                d.callback(None)
            else:
                still.append((text, d, offset))
        self._waiting = still

    errReceived = outReceived

    def logged(self, text: str, timeout: float = 30) -> defer.Deferred[None]:
        """Fires once ``text`` is in the output; fails if the process ends first."""
        needle = text.encode()
        if needle in self.output:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((needle, d, 0))
        return d.addTimeout(timeout, reactor)

    def logged_after(self, text: str, offset: int, timeout: float = 60) -> defer.Deferred[None]:
        """Fires once ``text`` appears in the output past byte ``offset``."""
        needle = text.encode()
        if needle in self.output[offset:]:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((needle, d, offset))
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason: Failure) -> None:
        for text, d, _ in self._waiting:
            d.errback(RuntimeError(f"daemon ended before logging {text!r}:\n{self.output.decode(errors='replace')[-3000:]}"))
        self._waiting = []
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif reason.check(ProcessTerminated):
            self.ended.callback(reason.value.exitCode if reason.value.exitCode is not None else -reason.value.signal)
        else:
            self.ended.errback(reason)

    def signal(self, sig: int = signal.SIGTERM) -> defer.Deferred[int | None]:
        """Send ``sig``; fires with the exit code (negative: killed by a signal)."""
        if not self.ended.called:
            self.transport.signalProcess(sig)
        return self.ended


def start_daemon(plugin: str, config: str, cwd: str, prefix: list[str] | None = None, env: dict[str, str] | None = None) -> Daemon:
    """Start ``twistd -n <plugin> --config <config>`` with this checkout's code; ``prefix``
    is a command that execs it (e.g. ``setsid``: a process group of its own); ``env``: more
    environment variables (e.g. systemd's ``NOTIFY_SOCKET``)."""
    return start_program([*(prefix or []), *twistd_argv(plugin, config)], cwd, {**checkout_env(), **(env or {})})


@defer.inlineCallbacks
def started(test: Any, plugin: str, config: str, cwd: str, *ready: str, env: dict[str, str] | None = None):
    """``start_daemon`` for a test: killed at its end; fires once each of ``ready`` is logged."""
    daemon = start_daemon(plugin, config, cwd, env=env)
    test.addCleanup(daemon.signal, signal.SIGKILL)
    for line in ready:
        yield daemon.logged(line)
    return daemon


def stop_private_redis(datadir: str) -> None:
    """End the private redis-server of a node whose ``[node] datadir`` is ``datadir``, if it
    runs: a node killed by a test's cleanup (SIGKILL) leaves it running, in its own session."""
    try:
        with open(os.path.join(datadir, "redis", "redis.pid")) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"redis-server" not in f.read():
                return
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return  # none left (it removes its pid file when it ends)


def remote_storage_config(base: str, stream_port: int, http_port: int, http_host: str = "127.0.0.1", extra: str = "") -> str:
    """Certificates for node0 and storage1 under ``base/tls`` and ``base/storage.toml``: storage
    server 1 listening on ``stream_port`` for node0, data in ``base/remote``; its path."""
    subprocess.run([os.path.join(ROOT, "etc", "make-certs"), os.path.join(base, "tls"), "node0", "storage1"], check=True, capture_output=True)
    path = os.path.join(base, "storage.toml")
    with open(path, "w") as f:
        f.write(
            f'[storage]\nid = 1\nlisten = "tcp:{stream_port}:interface=127.0.0.1"\n'
            f'http = "tcp:{http_port}:interface={http_host}"\ndatadir = "remote"\nallow = ["node0"]\n'
            f'{extra}[tls]\nca = "tls/ca.pem"\ncert = "tls/storage1.pem"\n'
        )
    return path


def remote_node_config(base: str, http_port: int, stream_port: int, redis_url: str, extra: str = "") -> str:
    """``base/node.toml``: node0 answering HTTP on ``http_port``, hosting storage 0 in
    ``base/local``, SQLite, and storage server 1 over the stream on ``stream_port`` with the
    certificates ``remote_storage_config`` made; ``extra``: more sections ([input], [feeds],
    [engines], ...). Its path."""
    path = os.path.join(base, "node.toml")
    with open(path, "w") as f:
        f.write(
            f'[node]\nhttp = "tcp:{http_port}:interface=127.0.0.1"\ndatadir = "local"\nstorage = [0]\n'
            f'[redis]\nurl = "{redis_url}"\n[database]\nurl = "sqlite:///emond.db"\n{extra}'
            f'[storage.servers]\n1 = {{ endpoint = "tcp:127.0.0.1:{stream_port}", name = "storage1" }}\n'
            f'[tls]\nca = "tls/ca.pem"\ncert = "tls/node0.pem"\n'
        )
    return path


def start_haproxy(config: str, cwd: str) -> Daemon:
    """``haproxy -W -db -f <config>``; ``logged(HAPROXY_READY)`` fires once it serves, and its
    output says when a server goes down or up (``Server <backend>/<name> is DOWN``)."""
    return start_program(haproxy_argv(config), cwd)


def start_program(argv: list[str], cwd: str, env: dict[str, str] | None = None) -> Daemon:
    """Start ``argv`` as a child of the test's reactor, its output followed by a ``Daemon``."""
    daemon = Daemon()
    reactor.spawnProcess(daemon, argv[0], argv, env=env if env is not None else dict(os.environ), path=cwd)
    return daemon
