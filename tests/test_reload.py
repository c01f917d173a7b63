"""SIGHUP reloads a running process: its config file again (the reloadable settings take
effect, a changed setting that needs a restart is refused with a log line naming it, a file
that does not load is refused whole and the process runs on), and its TLS certificates and
keys (connections made after the reload present the new certificate; those made before go
on). Real ``twistd`` processes, real mutual TLS; a certificate's serial number tells which
one a peer presented."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess

from cryptography import x509
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from emond.app.reload import NODE_RELOADABLE, STORAGE_RELOADABLE, changes, plan
from emond.config import load_node_config, load_storage_config
from emond.records import make_records
from emond.stream import ACK, HELLO, HELLO_OK, ClientTLS, ServerTLS, TLSFilesError, batch_frame, client_tls, encode_json, request_frame
from tests.support import free_port, redis_server
from tests.support.daemon import ROOT, remote_node_config, remote_storage_config, started
from tests.support.node import NodeClient
from tests.support.streamclient import Client

T0 = 1_700_000_000
FEED = 7


def serial(pem: str) -> int:
    """The serial number of the (first) certificate in a PEM file."""
    with open(pem, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def renew(tls: str, name: str) -> int:
    """A new certificate for ``name`` from the same CA (etc/make-certs), in place; its serial."""
    os.remove(os.path.join(tls, f"{name}.pem"))
    subprocess.run([os.path.join(ROOT, "etc", "make-certs"), tls, name], check=True, capture_output=True)
    return serial(os.path.join(tls, f"{name}.pem"))


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


class PlanTests(unittest.TestCase):
    """Which changes a reload applies, which it refuses, and the config it runs with."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "tls"))
        for name in ("ca.pem", "node0.pem"):
            write(os.path.join(self.dir, "tls", name), "")

    def node(self, text: str):
        return load_node_config(write(os.path.join(self.dir, "emond.toml"), text))

    def test_node(self):
        old = self.node('[node]\nhttp = "tcp:8080"\n[input]\nmax_values = 10\n[users]\ntrusted_proxies = []\n')
        new = self.node(
            '[node]\nhttp = "tcp:8081"\nlog_level = "warn"\n[input]\nmax_values = 5\nqueues = 8\n[users]\ntrusted_proxies = ["10.0.0.1"]\n'
            '[database]\nurl = "sqlite:///other.db"\n[storage.servers]\n1 = { endpoint = "tcp:127.0.0.1:7443" }\n'
            '[feeds]\ndefault_server = 0\n[tls]\nca = "tls/ca.pem"\ncert = "tls/node0.pem"\n'
        )
        done = plan(old, new, NODE_RELOADABLE)
        self.assertEqual(
            sorted(c.where for c in done.applied),
            ["[input] max_values", "[node] log_level", "[users] trusted_proxies"],
        )
        self.assertEqual(
            sorted(c.where for c in done.refused),
            ["[database] url", "[input] queues", "[node] http", "[shards.default] storage", "[storage.servers] 1", "[tls]"],
        )
        self.assertEqual((done.config.input.max_values, done.config.users.trusted_proxies), (5, ("10.0.0.1",)))
        self.assertEqual((done.config.node.http, done.config.input.queues, done.config.tls), ("tcp:8080", 64, None))
        self.assertEqual(done.config.database, old.database)
        self.assertEqual(changes(old, old), [])

    def test_storage(self):
        path = os.path.join(self.dir, "storage.toml")
        text = '[storage]\nid = 1\nallow = ["node0"]\n[tls]\nca = "tls/ca.pem"\ncert = "tls/node0.pem"\n'
        old = load_storage_config(write(path, text))
        new = load_storage_config(write(path, text.replace('["node0"]', '["node0", "node1"]').replace("id = 1", "id = 2")))
        done = plan(old, new, STORAGE_RELOADABLE)
        self.assertEqual([c.where for c in done.applied], ["[storage] allow"])
        self.assertEqual([c.where for c in done.refused], ["[storage] id"])
        self.assertEqual((done.config.storage.allow, done.config.storage.id), (("node0", "node1"), 1))


class ReloadableTLSTests(unittest.TestCase):
    """The stream's TLS reads its files again on ``load``; files that do not make a usable
    certificate and key are refused, and what was loaded before stays in use."""

    def setUp(self) -> None:
        self.tls = os.path.abspath(self.mktemp())
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), self.tls, "node0", "storage1"], check=True, capture_output=True)
        self.ca = os.path.join(self.tls, "ca.pem")

    def mismatched(self) -> str:
        """storage1's certificate with node0's key."""
        with open(os.path.join(self.tls, "storage1.pem")) as f:
            cert = f.read().split("-----BEGIN PRIVATE KEY-----")[0]
        with open(os.path.join(self.tls, "node0.pem")) as f:
            key = "-----BEGIN PRIVATE KEY-----" + f.read().split("-----BEGIN PRIVATE KEY-----")[1]
        return write(os.path.join(self.tls, "bad.pem"), cert + key)

    def test_a_bad_file_keeps_the_loaded_certificate(self):
        server = ServerTLS(self.ca, os.path.join(self.tls, "storage1.pem"))
        client = ClientTLS(self.ca, os.path.join(self.tls, "node0.pem"), "storage1")
        for tls in (server, client):
            before = tls._options
            self.assertRaises(TLSFilesError, tls.load, self.ca, self.mismatched())
            self.assertRaises(TLSFilesError, tls.load, self.ca, write(os.path.join(self.tls, "empty.pem"), ""))
            self.assertRaises(TLSFilesError, tls.load, self.ca, os.path.join(self.tls, "missing.pem"))
            self.assertIs(tls._options, before)
        new = renew(self.tls, "storage1")
        server.load(self.ca, os.path.join(self.tls, "storage1.pem"))
        self.assertEqual(server._options.certificate.get_serial_number(), new)  # the handshakes to come


class SettingsReloadTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_limits_take_effect_restart_only_keys_are_refused(self):
        redis_server().flushall()
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        port, other = free_port(), free_port()
        text = (
            f'[node]\nhttp = "tcp:{port}:interface=127.0.0.1"\ndatadir = "var"\n'
            f'[redis]\nurl = "redis://127.0.0.1:{redis_server().port}/5"\n[database]\nurl = "sqlite:///emond.db"\n'
            f"[input]\nmax_values = 10\nrate_limit = 0.0\n"
        )
        config = write(os.path.join(base, "emond.toml"), text)
        daemon = yield started(self, "emond", config, base, "node API ready", "Site starting on")
        node = NodeClient(f"http://127.0.0.1:{port}/")
        keys = (yield node.post("user/register.json", username="hup", password="secret123", email="h@example.org")).json()

        def post(n: int):
            return node.post("input/post.json", apikey=keys["apikey_write"], node="n", csv=",".join(["1"] * n))

        self.assertEqual((yield post(8)).code, 200)
        # Lower a limit (reloadable); change the port and the database (restart only).
        write(config, text.replace("max_values = 10", "max_values = 5").replace(f"tcp:{port}:", f"tcp:{other}:")
              .replace("sqlite:///emond.db", "sqlite:///elsewhere.db"))
        offset = len(daemon.output)
        daemon.transport.signalProcess(signal.SIGHUP)
        yield daemon.logged_after("SIGHUP: reloaded", offset)
        logged = daemon.output[offset:].decode()
        self.assertIn("SIGHUP: [node] http changed: needs a restart; refused, the running value stays", logged)
        self.assertIn("SIGHUP: [database] url changed: needs a restart; refused", logged)
        self.assertIn("changed [input] max_values; refused 2 (restart needed)", logged)
        refused = yield post(8)  # over the new limit
        self.assertEqual(refused.code, 413, refused)
        self.assertIn("Too many values in one request (more than 5)", refused.json()["message"])
        self.assertEqual((yield post(5)).code, 200)  # ... on the old port, with the old database
        self.assertFalse(os.path.exists(os.path.join(base, "elsewhere.db")))
        # A file that does not load is refused whole: the process runs on as it was.
        write(config, text.replace("max_values = 10", "max_values = 'many'"))
        offset = len(daemon.output)
        daemon.transport.signalProcess(signal.SIGHUP)
        yield daemon.logged_after("not reloaded", offset)
        self.assertIn("[input] max_values: expected an integer, got 'many'; running on as before", daemon.output[offset:].decode())
        self.assertEqual((yield post(8)).code, 413)
        self.assertEqual((yield post(5)).code, 200)
        self.assertEqual((yield daemon.signal(signal.SIGTERM)), 0)


class CertificateReloadTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.tls = os.path.join(self.base, "tls")
        self.stream, self.http = free_port(), free_port()
        self.storage_config = remote_storage_config(self.base, self.stream, self.http)

    def start_storage(self):
        return started(self, "emond-storage", self.storage_config, self.base, "storage 1 open on", "Site starting on")

    @defer.inlineCallbacks
    def connect(self, name: str = "node0"):
        """A stream client with ``name``'s certificate, greeted: (client, the serial of the
        certificate the server presented)."""
        client = Client()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.stream)
        options = client_tls(os.path.join(self.tls, "ca.pem"), os.path.join(self.tls, f"{name}.pem"), "storage1")
        yield endpoints.wrapClientTLS(options, endpoint).connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.send(encode_json(HELLO, {"version": 1, "name": name}))
        hello = yield client.frame(1)
        self.assertEqual(hello[:1], HELLO_OK)
        return client, client.transport.getPeerCertificate().get_serial_number()

    @defer.inlineCallbacks
    def acked(self, client, seq: int):
        """Send a batch for FEED (the server applies it) and check it is acknowledged."""
        client.send(batch_frame(seq, 1, make_records(FEED, [T0 + 10 * seq], [float(seq)]).tobytes()))
        frame = yield client.frame(len(client.frames) + 1)
        self.assertEqual((frame[:1], struct.unpack_from("<Q", frame, 1)[0], json.loads(frame[9:])), (ACK, seq, []))

    @defer.inlineCallbacks
    def test_storage_server_presents_the_new_certificate_to_new_connections(self):
        daemon = yield self.start_storage()
        old_serial = serial(os.path.join(self.tls, "storage1.pem"))
        old, presented = yield self.connect()
        self.assertEqual(presented, old_serial)
        old.send(request_frame(1, {"op": "create", "feed": FEED, "engine": 5, "args": [10]}))
        yield old.frame(2)
        yield self.acked(old, 1)
        # A certificate file that does not load (a key that is not its own) is refused: the
        # server presents the certificate it had.
        pem = os.path.join(self.tls, "storage1.pem")
        with open(pem) as f:
            kept = f.read()
        with open(os.path.join(self.tls, "node0.pem")) as f:
            wrong_key = "-----BEGIN PRIVATE KEY-----" + f.read().split("-----BEGIN PRIVATE KEY-----")[1]
        write(pem, kept.split("-----BEGIN PRIVATE KEY-----")[0] + wrong_key)
        offset = len(daemon.output)
        daemon.transport.signalProcess(signal.SIGHUP)
        yield daemon.logged_after("SIGHUP: reloaded", offset)
        self.assertIn(
            f"SIGHUP: TLS files {self.tls}/ca.pem and {pem} not loaded (Certificate public and private keys do not match.): "
            "the ones loaded before stay in use",
            daemon.output[offset:].decode(),
        )
        _, presented = yield self.connect()
        self.assertEqual(presented, old_serial)
        new_serial = renew(self.tls, "storage1")
        self.assertNotEqual(new_serial, old_serial)
        # node1 has a certificate from the CA but is not allowed, until the reload allows it.
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), self.tls, "node1"], check=True, capture_output=True)
        with open(self.storage_config) as f:
            text = f.read()
        write(self.storage_config, text.replace('allow = ["node0"]', 'allow = ["node0", "node1"]'))
        offset = len(daemon.output)
        daemon.transport.signalProcess(signal.SIGHUP)
        yield daemon.logged_after("SIGHUP: reloaded", offset)
        self.assertIn("changed [storage] allow", daemon.output[offset:].decode())
        new, presented = yield self.connect()
        self.assertEqual(presented, new_serial)
        yield self.acked(new, 2)
        # The connection made before the reload goes on, with the certificate it had.
        yield self.acked(old, 3)
        self.assertEqual(old.transport.getPeerCertificate().get_serial_number(), old_serial)
        _, presented = yield self.connect("node1")
        self.assertEqual(presented, new_serial)
        self.assertEqual((yield daemon.signal(signal.SIGTERM)), 0)

    @defer.inlineCallbacks
    def test_node_presents_its_new_certificate_on_its_next_connection(self):
        redis_server().flushall()
        port = free_port()
        node_config = remote_node_config(self.base, port, self.stream, f"redis://127.0.0.1:{redis_server().port}/6")
        storage = yield self.start_storage()
        node = yield started(self, "emond", node_config, self.base, "node API ready", "stream to storage 1 up")
        old_serial = serial(os.path.join(self.tls, "node0.pem"))
        yield storage.logged(f"stream: node0 connected (certificate serial {old_serial:x})")
        new_serial = renew(self.tls, "node0")
        offset = len(node.output)
        node.transport.signalProcess(signal.SIGHUP)
        yield node.logged_after("SIGHUP: reloaded", offset)
        # The open connection goes on; the next one (the storage server restarted) presents
        # the new certificate.
        self.assertEqual((yield storage.signal(signal.SIGTERM)), 0)
        offset = len(node.output)
        storage = yield self.start_storage()
        yield storage.logged(f"stream: node0 connected (certificate serial {new_serial:x})")
        yield node.logged_after("stream to storage 1 up", offset)
        self.assertNotIn(f"{old_serial:x}".encode(), storage.output)
