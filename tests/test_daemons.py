"""The two twistd plugins start as real processes, answer /health and stop cleanly on SIGTERM (status 0)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import treq
from twisted.internet import defer
from twisted.trial import unittest

from tests.support import free_port, require_program
from tests.support.daemon import ROOT, start_daemon

ETC = os.path.join(ROOT, "etc")
# SIGTERM is a graceful drain, then exit status 0 (emond.app.daemon: twistd alone would end
# the process by the signal).
STOPPED_CLEANLY = 0


class DaemonTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def config(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    @defer.inlineCallbacks
    def health(self, port: int):
        response = yield treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        body = yield response.json()
        return response.code, response.headers.getRawHeaders(b"content-type"), body

    @defer.inlineCallbacks
    def test_emond_node(self):
        require_program("redis-server")  # the node starts its own private one: an error if missing
        port = free_port()
        with open(os.path.join(ETC, "emond.toml")) as f:
            example = f.read()
        # The example as it is, but on a free port and in a temp data dir.
        text = example.replace('http = "tcp:8080:', f'http = "tcp:{port}:').replace('datadir = "../var"', 'datadir = "var"')
        text = text.replace('"sqlite:///../var/emond.db"', '"sqlite:///var/emond.db"')
        daemon = start_daemon("emond", self.config("emond.toml", text), self.dir)
        self.addCleanup(daemon.signal, signal.SIGKILL)
        yield daemon.logged("private redis-server ready")
        yield daemon.logged("storage 0 open on")
        yield daemon.logged("node API ready")
        yield daemon.logged("Site starting on")
        code, ctype, body = yield self.health(port)
        self.assertEqual((code, ctype), (200, [b"application/json"]))
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["process"], "emond")
        self.assertTrue(body["redis"]["ok"])
        self.assertTrue(os.path.isdir(os.path.join(self.dir, "var", "phpfina")))
        status = yield daemon.signal(signal.SIGTERM)
        self.assertEqual(status, STOPPED_CLEANLY)
        self.assertIn(b"Server Shut Down.", daemon.output)
        self.assertIn(b"Redis is now ready to exit", daemon.output)  # the private redis stopped too
        self.assertFalse(os.path.exists(os.path.join(self.dir, "var", "redis", "redis.sock")))

    @defer.inlineCallbacks
    def test_group_signal_stops_in_order(self):
        """Ctrl-C in a terminal, `timeout` or a service manager signal emond's whole process
        group: its private Redis must still outlive the pipeline's drain, not die with it."""
        require_program("redis-server")
        setsid = require_program("setsid")
        port = free_port()
        # A short data directory: the private Redis's socket path must fit a Unix socket.
        var = tempfile.mkdtemp(prefix="emond-")
        self.addCleanup(shutil.rmtree, var, True)
        text = f'[node]\nhttp = "tcp:{port}:interface=127.0.0.1"\ndatadir = "{var}"\n[database]\nurl = "sqlite:///{var}/emond.db"\n'
        daemon = start_daemon("emond", self.config("emond.toml", text), self.dir, prefix=[setsid])  # its own group
        self.addCleanup(daemon.signal, signal.SIGKILL)
        yield daemon.logged("node API ready")
        yield daemon.logged("Site starting on")
        pid = daemon.transport.pid
        self.assertEqual(os.getpgid(pid), pid)
        os.killpg(pid, signal.SIGTERM)
        status = yield daemon.ended
        self.assertEqual(status, STOPPED_CLEANLY)
        self.assertIn(b"Server Shut Down.", daemon.output)
        self.assertIn(b"Redis is now ready to exit", daemon.output)  # stopped by emond, last
        self.assertNotIn(b"Lost connection", daemon.output)  # nothing lost Redis while draining
        self.assertNotIn(b"no reply within", daemon.output)

    @defer.inlineCallbacks
    def test_emond_storage(self):
        stream, http = free_port(), free_port()
        subprocess.run([os.path.join(ETC, "make-certs"), os.path.join(self.dir, "tls"), "storage1"], check=True, capture_output=True)
        with open(os.path.join(ETC, "emond-storage.toml")) as f:
            text = f.read()
        text = text.replace('"tcp:7443:', f'"tcp:{stream}:').replace('"tcp:7480:', f'"tcp:{http}:')
        text = text.replace('"../var/storage1"', '"var/storage1"')
        daemon = start_daemon("emond-storage", self.config("emond-storage.toml", text), self.dir)
        self.addCleanup(daemon.signal, signal.SIGKILL)
        yield daemon.logged("storage 1 open on")
        yield daemon.logged("Site starting on")
        code, _, body = yield self.health(http)
        self.assertEqual(code, 200)
        self.assertEqual((body["status"], body["process"]), ("ok", "emond-storage"))
        self.assertTrue(os.path.isdir(os.path.join(self.dir, "var", "storage1", "phptimeseries")))
        status = yield daemon.signal(signal.SIGTERM)
        self.assertEqual(status, STOPPED_CLEANLY)
        self.assertIn(b"Server Shut Down.", daemon.output)

    @defer.inlineCallbacks
    def test_bad_config_is_refused_with_the_key(self):
        daemon = start_daemon("emond", self.config("emond.toml", "[input]\nqueues = 'many'\n"), self.dir)
        status = yield daemon.ended
        self.assertNotEqual(status, 0)
        self.assertIn(b"[input] queues: expected an integer, got 'many'", daemon.output)
