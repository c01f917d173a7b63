"""The mutual-TLS stream: who may connect, and the frames once connected.

A storage server tree runs in this reactor on a real loopback port; clients
connect over real TLS with certificates made by ``etc/make-certs``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess

import numpy as np
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from emond.config import load_storage_config
from emond.engine import DataQuery, Series
from emond.phpfina import PHPFina
from emond.records import make_records
from emond.app.service import make_storage_service
from emond.stream import (
    ACK,
    HELLO,
    HELLO_OK,
    NACK,
    batch_frame,
    client_tls,
    encode_json,
    request_frame,
)
from tests.support import free_port
from tests.support.streamclient import Client
from tests.support.daemon import ROOT

NOW = 1_700_000_000


class StreamTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        tls = os.path.join(self.dir, "tls")
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), tls, "node0", "storage1", "intruder"], check=True, capture_output=True)
        rogue = os.path.join(self.dir, "rogue")
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), rogue, "node0"], check=True, capture_output=True)
        self.tls, self.rogue = tls, rogue
        self.port = free_port()
        path = os.path.join(self.dir, "storage.toml")
        with open(path, "w") as f:
            f.write(
                f'[storage]\nid = 1\nlisten = "tcp:{self.port}:interface=127.0.0.1"\nhttp = "tcp:{free_port()}:interface=127.0.0.1"\n'
                f'datadir = "data"\nallow = ["node0"]\n[engines]\nsync = false\nwindow_past = 2000000000\n'
                f'[tls]\nca = "tls/ca.pem"\ncert = "tls/storage1.pem"\n'
            )
        self.config = load_storage_config(path)
        self.service = make_storage_service(self.config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.server = self.service.getServiceNamed("stream")._server
        return self.service.getServiceNamed("storage").opened

    @defer.inlineCallbacks
    def connect(self, tls_dir: str | None, name: str = "node0", server_name: str = "storage1", cert_dir: str | None = None):
        """A client trusting ``tls_dir``'s CA, showing ``name``'s certificate from ``cert_dir`` (default the same)."""
        client = WatchedClient()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        if tls_dir is not None:
            options = client_tls(os.path.join(tls_dir, "ca.pem"), os.path.join(cert_dir or tls_dir, f"{name}.pem"), server_name)
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        protocol = yield endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: protocol.transport.abortConnection() if protocol.transport.connected else None)
        return client

    @defer.inlineCallbacks
    def hello(self, client: Client):
        client.send(encode_json(HELLO, {"version": 1, "name": "node0"}))
        frame = yield client.frame(1)
        self.assertEqual(frame[:1], HELLO_OK)
        self.assertEqual(json.loads(frame[1:]), {"version": 1, "server": 1, "token": 0})

    @defer.inlineCallbacks
    def test_batches_are_applied_then_acknowledged(self):
        client = yield self.connect(self.tls)
        yield self.hello(client)
        yield defer.ensureDeferred(self.server.read("create", 7, 5, [10]))
        batch = make_records(7, [NOW, NOW + 10, NOW + 20], [1.0, 2.0, 3.0])
        client.send(batch_frame(1, 5, batch.tobytes()))
        ack = yield client.frame(2)
        self.assertEqual(ack[:1], ACK)
        self.assertEqual(struct.unpack_from("<Q", ack, 1)[0], 1)
        self.assertEqual(json.loads(ack[9:]), [])
        # the files are what the engine writes for the same points
        reference = PHPFina(os.path.join(self.dir, "reference"), sync=False)
        self.addCleanup(reference.close)
        reference.create(7, 10)
        reference.apply_batch(batch)
        for suffix in (".meta", ".dat"):
            with open(os.path.join(self.dir, "data", "phpfina", f"7{suffix}"), "rb") as a, open(os.path.join(self.dir, "reference", f"7{suffix}"), "rb") as b:
                self.assertEqual(a.read(), b.read())
        # an older fencing token is refused: nothing applied
        client.send(batch_frame(2, 4, make_records(7, [NOW + 30], [4.0]).tobytes()))
        nack = yield client.frame(3)
        self.assertEqual(nack[:1], NACK)
        self.assertEqual(self.server.max_token, 5)
        # reads
        query = DataQuery(start=NOW, end=NOW + 20, interval=10).to_wire()
        client.send(request_frame(9, {"op": "query", "feed": 7, "engine": 5, "args": [query]}))
        answer = Series.from_bytes((yield client.frame(4))[6:])  # one packed answer
        self.assertEqual((answer.times.tolist(), answer.values.tolist()), ([NOW, NOW + 10, NOW + 20], [1.0, 2.0, 3.0]))
        client.send(request_frame(10, {"op": "export", "feed": 7, "engine": 5, "args": [0]}))
        exported = yield client.frame(5)
        self.assertEqual(np.frombuffer(exported[6:], dtype="<f4").tolist(), [1.0, 2.0, 3.0])

    @defer.inlineCallbacks
    def test_certificate_from_another_ca_is_refused(self):
        """The client trusts the server, but shows a certificate of another CA: the server's
        handshake refuses it with an "unknown ca" alert, before any frame is answered."""
        client = yield self.connect(self.tls, cert_dir=self.rogue)
        client.send(encode_json(HELLO, {"version": 1, "name": "node0"}))
        yield self.assertFailure(client.frame(1), ConnectionError)
        self.assertEqual(client.frames, [])
        self.assertIsInstance(client.reason.value, SSL.Error)
        self.assertIn("alert unknown ca", str(client.reason.value))
        self.assertEqual(self.server.refused_peers._value.get(), 1)
        self.assertEqual(self.server.batches._value.get(), 0)

    @defer.inlineCallbacks
    def test_name_not_on_allow_is_refused(self):
        client = yield self.connect(self.tls, name="intruder")
        client.send(encode_json(HELLO, {"version": 1, "name": "intruder"}))
        yield client.lost
        self.assertEqual(client.frames, [])
        self.assertEqual(self.server.refused_peers._value.get(), 1)

    @defer.inlineCallbacks
    def test_plain_tcp_is_refused(self):
        client = yield self.connect(None)
        client.send(encode_json(HELLO, {"version": 1, "name": "node0"}))
        yield client.lost
        self.assertEqual(client.frames, [])
        self.assertEqual(len(self.server.connections), 0)
        self.assertEqual(self.server.refused_peers._value.get(), 1)

    @defer.inlineCallbacks
    def test_wrong_server_name_is_refused_by_the_node(self):
        """The node checks the server's name: storage1's certificate does not name storage2,
        so the node drops the connection during the handshake, before any frame."""
        client = yield self.connect(self.tls, server_name="storage2")
        client.send(encode_json(HELLO, {"version": 1, "name": "node0"}))
        yield self.assertFailure(client.frame(1), ConnectionError)
        self.assertEqual(client.frames, [])
        self.assertIsInstance(client.reason.value, VerificationError)
        self.assertEqual([e.mismatched_id.hostname for e in client.reason.value.errors], [b"storage2"])
        self.assertEqual(self.server.batches._value.get(), 0)


class WatchedClient(Client):
    """A stream client that keeps why its connection was lost."""

    reason = None

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        super().connectionLost(reason)
