"""A private ``redis-server`` for a single node that has no Redis configured.

It runs under ``<datadir>/redis`` on a Unix socket with ``appendonly yes``
and ``appendfsync everysec``, so datapoints acknowledged to devices survive
a crash of emond (and, within a second, of the machine).
"""

from __future__ import annotations

import os
import shutil
import signal

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from emond.app.programs import REDIS_READY, redis_args

READY = REDIS_READY.lower()  # redis-server has written it both ways
SOCKET = "redis.sock"  # in the server's directory
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (sun_path holds 108 with its NUL)


class _RedisProtocol(ProcessProtocol):
    log = Logger()

    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._seen = b""

    def outReceived(self, data: bytes) -> None:
        if not self.ready.called:
            self._seen = (self._seen + data)[-4096:]
            if READY in self._seen.lower():
                self.ready.callback(None)
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.log.info("redis-server: {line}", line=line)  # its own log, at its verbosity

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"redis-server exited before it was ready: {reason.value}"))
        self.ended.callback(None)


def embedded_redis_dir(datadir: str) -> str:
    """Where the private redis-server of a node with this ``[node] datadir`` lives."""
    return os.path.join(datadir, "redis")


def embedded_redis_url(datadir: str) -> str:
    """The URL of that redis-server (its Unix socket), for tools reaching a node's Redis."""
    return "unix://" + os.path.join(embedded_redis_dir(datadir), SOCKET)


class EmbeddedRedis(Service):
    """Runs ``redis-server`` as a child process; ``ready`` fires when it serves."""

    log = Logger()

    def __init__(self, directory: str, reactor: IReactorProcess) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, SOCKET)
        self.url = "unix://" + self.socket
        self._reactor = reactor
        self._pidfile = os.path.join(directory, "redis.pid")
        self._protocol: _RedisProtocol | None = None
        self._adopted: int | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no Redis configured ([redis] url) and no redis-server installed to start one")
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            # connect() would fail later with an obscure error, every time
            raise RuntimeError(
                f"the private Redis's socket path is {len(os.fsencode(self.socket))} bytes, over the "
                f"{MAX_SOCKET_PATH} a Unix socket allows: {self.socket}; use a shorter [node] datadir "
                "or configure [redis] url"
            )
        os.makedirs(self.directory, exist_ok=True)
        leftover = self._leftover_pid()
        if leftover is not None:
            # emond was killed but its redis lived on: one redis per directory, so use it.
            self._adopted = leftover
            self.log.warn("adopting private redis-server pid {pid} left by an earlier run", pid=leftover)
            self.ready.callback(None)
            return
        args = [binary, *redis_args(self.directory, unixsocket=self.socket, durable=True, pidfile=self._pidfile)]
        self._protocol = _RedisProtocol()
        self._protocol.ready.chainDeferred(self.ready)
        self.ready.addCallback(lambda _: self.log.info("private redis-server ready on {socket}", socket=self.socket))
        # In a session of its own: a signal to emond's whole process group (Ctrl-C in a
        # terminal, `timeout`, a service manager) must not stop Redis before emond has
        # drained into it; emond stops it last, in stopService. ``setsid`` execs in place
        # (the pid stays redis-server's) since a spawned child never leads its group.
        setsid = shutil.which("setsid")
        if setsid is not None:
            binary, args = setsid, [setsid, *args]
        self._reactor.spawnProcess(self._protocol, binary, args, env=None, path=self.directory)

    def _leftover_pid(self) -> int | None:
        try:
            with open(self._pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                running = b"redis-server" in f.read()
        except (OSError, ValueError):
            return None
        return pid if running and os.path.exists(self.socket) else None

    def status(self) -> dict[str, object]:
        if self._adopted is not None:
            return {"ok": os.path.exists(f"/proc/{self._adopted}"), "embedded": True, "socket": self.socket}
        up = self.ready.called and self._protocol is not None and not self._protocol.ended.called
        return {"ok": up, "embedded": True, "socket": self.socket}

    def abandon(self) -> defer.Deferred[None]:
        """emond's stop was cut short before it came to Redis: stop it now (it writes its AOF
        out), rather than leave it running in its own session; fires once it has ended."""
        return self.stopService() if self.running else defer.succeed(None)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._adopted is not None:
            try:
                os.kill(self._adopted, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return defer.succeed(None)
        protocol = self._protocol
        if protocol is None or protocol.ended.called:
            return defer.succeed(None)
        try:
            protocol.transport.signalProcess(signal.SIGTERM)  # redis flushes its AOF on SIGTERM
        except error.ProcessExitedAlready:
            return defer.succeed(None)
        return protocol.ended
