"""A test client speaking the node's side of the storage stream, frame by frame."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory

from emond.stream import FrameProtocol, client_tls


class Client(FrameProtocol):
    """A test client speaking the node's side of the stream."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.waiting: list[tuple[int, defer.Deferred]] = []
        self.lost: defer.Deferred = defer.Deferred()

    def stringReceived(self, frame: bytes) -> None:
        self.frames.append(frame)
        ready = [(n, d) for n, d in self.waiting if len(self.frames) >= n]
        self.waiting = [(n, d) for n, d in self.waiting if len(self.frames) < n]
        for _, d in ready:
            d.callback(self.frames[-1])

    def frame(self, n: int) -> defer.Deferred:
        """The n-th frame received (1-based), once it is here."""
        if len(self.frames) >= n:
            return defer.succeed(self.frames[n - 1])
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((n, d))
        return d

    def connectionLost(self, reason=None) -> None:
        for _, d in self.waiting:
            d.errback(ConnectionError("lost"))
        self.waiting = []
        self.lost.callback(None)


class StorageServerHarness:
    """A storage server tree (``make_storage_service``) in this reactor on real loopback
    ports, with a test CA and certificates made by ``etc/make-certs``; clients connect
    over real mutual TLS. ``yield StorageServerHarness.start(self)`` in a test's setUp."""

    def __init__(
        self,
        test: Any,
        names: tuple[str, ...] = ("node0", "storage1"),
        server_id: int = 1,
        tls: str | None = None,
        allow: tuple[str, ...] = ("node0",),
    ) -> None:
        """``tls``: a certificate folder the test shares with other servers and nodes (one CA;
        ``names`` are added to it), else one of its own; the server's certificate is
        ``storage<server_id>``'s, and it lets in the nodes named in ``allow``."""
        from emond.config import load_storage_config
        from emond.app.service import make_storage_service
        from tests.support.daemon import ROOT
        from tests.support.servers import free_port

        self.test = test
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        self.tls = tls or os.path.join(self.dir, "tls")
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), self.tls, *names], check=True, capture_output=True)
        self.port, self.http = free_port(), free_port()
        path = os.path.join(self.dir, "storage.toml")
        with open(path, "w") as f:
            f.write(
                f'[storage]\nid = {server_id}\nlisten = "tcp:{self.port}:interface=127.0.0.1"\nhttp = "tcp:{self.http}:interface=127.0.0.1"\n'
                f'datadir = "data"\nallow = {list(allow)!r}\n[engines]\nsync = false\nwindow_past = 2000000000\n'
                f'[tls]\nca = "{self.tls}/ca.pem"\ncert = "{self.tls}/storage{server_id}.pem"\n'
            )
        self.config = load_storage_config(path)
        self.service = make_storage_service(self.config, reactor)
        self.server = self.service.getServiceNamed("stream")._server
        self.datadir = self.config.storage.datadir

    @classmethod
    @defer.inlineCallbacks
    def start(cls, test: Any, names: tuple[str, ...] = ("node0", "storage1"), **options: Any) -> Any:
        harness = cls(test, names, **options)
        harness.service.startService()
        test.addCleanup(harness.service.stopService)
        yield harness.service.getServiceNamed("storage").opened
        return harness

    @defer.inlineCallbacks
    def connect(self, name: str = "node0", server_name: str = "storage1") -> Any:
        """A ``Client`` connected over mutual TLS with ``name``'s certificate."""
        client = Client()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        options = client_tls(os.path.join(self.tls, "ca.pem"), os.path.join(self.tls, f"{name}.pem"), server_name)
        protocol = yield endpoints.wrapClientTLS(options, endpoint).connect(Factory.forProtocol(lambda: client))
        self.test.addCleanup(lambda: protocol.transport.abortConnection() if protocol.transport.connected else None)
        return client
