"""``emond-admin check-config FILE`` on each kind of bad config: every error reported with its
line and key, the kind of config said; and the daemon refusing to start on the same errors,
with the same lines. The expected lines are those the test wrote each key on."""

from __future__ import annotations

import os
import signal
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from emond.app.programs import ROOT
from tests.support.admin import run_admin
from tests.support.daemon import start_daemon

TLS_FILES = "[tls]\nca = 'tls/ca.pem'\ncert = 'tls/node0.pem'\n"


def line_of(text: str, start: str, after: int = 0) -> int:
    """The number of the first line of ``text`` that starts with ``start`` (after line ``after``)."""
    for number, line in enumerate(text.splitlines(), 1):
        if number > after and line.startswith(start):
            return number
    raise AssertionError(f"no line starting with {start!r}")


class CheckConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, text: str, name: str = "emond.toml") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def certs(self, *names: str) -> None:
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), os.path.join(self.dir, "tls"), *names], check=True, capture_output=True)

    @defer.inlineCallbacks
    def refused(self, text: str, kind: str | None = "node", *more: str):
        """check-config on ``text``: it must fail; its error lines."""
        path = self.write(text)
        status, out, err = yield run_admin("check-config", path, *more)
        self.assertEqual((status, out), (1, None), err)
        count = len(err["errors"])
        what = f"checked as a {kind} config" if kind else "its kind could not be read"
        self.assertEqual(err["error"], f"{path}: {count} error{'s' if count != 1 else ''} ({what})")
        self.assertEqual((err["kind"], err["file"]), (kind, path))
        return path, err["errors"]

    @defer.inlineCallbacks
    def test_valid_configs_of_both_kinds(self):
        self.certs("node0", "storage1")
        node = self.write("[node]\nstorage = [0]\n[input]\nqueues = 4\n", "node.toml")
        status, out, err = yield run_admin("check-config", node)
        self.assertEqual((status, out, err), (0, {"ok": True, "kind": "node", "file": node}, None))
        storage = self.write("[storage]\nid = 1\nlisten = 'tcp:7443'\n" + TLS_FILES.replace("node0", "storage1"), "storage.toml")
        status, out, err = yield run_admin("check-config", storage)
        self.assertEqual((status, out, err), (0, {"ok": True, "kind": "storage", "file": storage}, None))
        # the examples in etc/ (with the certificates bin/setup made)
        for name, kind in (("emond.toml", "node"), ("emond-storage.toml", "storage")):
            status, out, _ = yield run_admin("check-config", os.path.join(ROOT, "etc", name))
            self.assertEqual((status, out["kind"]), (0, kind), name)

    @defer.inlineCallbacks
    def test_toml_syntax(self):
        text = "[node]\nname = 'node0'\n\n[input\nqueues = 4\n"
        path, errors = yield self.refused(text, None)
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(errors[0].startswith(f"{path}:4: not valid TOML: "), errors)
        self.assertIn("(at line 4, column", errors[0])

    @defer.inlineCallbacks
    def test_unknown_section_and_key(self):
        text = "[node]\nname = 'node0'\nnmae = 'x'\n\n[nodes]\nname = 'x'\n"
        path, errors = yield self.refused(text)
        self.assertEqual(errors, [f"{path}:3: [node] nmae: unknown key", f"{path}:5: [nodes]: unknown section"])

    @defer.inlineCallbacks
    def test_wrong_types(self):
        text = "[input]\nmapping = 'hash'\nqueues = 'many'\n[users]\nregistration = 1\n[node]\nstorage = [0, 'a']\n"
        path, errors = yield self.refused(text)
        self.assertEqual(errors, [
            f"{path}:3: [input] queues: expected an integer, got 'many'",
            f"{path}:5: [users] registration: expected true or false, got 1",
            f"{path}:7: [node] storage[1]: expected an integer, got 'a'",
        ])

    @defer.inlineCallbacks
    def test_numbers_out_of_range(self):
        text = "[input]\nqueues = 4\nmax_values = -3\n[feeds]\nmax_datapoints = 2000000\n[health]\ncheck_timeout = 0\n"
        path, errors = yield self.refused(text)
        self.assertEqual(errors, [
            f"{path}:3: [input] max_values: must be at least 1, got -3",
            f"{path}:5: [feeds] max_datapoints: must be between 1 and 1000000, got 2000000",
            f"{path}:7: [health] check_timeout: must be more than 0, got 0.0",
        ])

    @defer.inlineCallbacks
    def test_missing_files(self):
        # a storage server's certificate missing (its CA is there); a node's config missing
        self.certs("storage1")
        os.unlink(os.path.join(self.dir, "tls", "storage1.pem"))
        text = "[storage]\nid = 1\nallow = ['node0']\n" + TLS_FILES.replace("node0", "storage1")
        path, errors = yield self.refused(text, "storage")
        cert = os.path.join(self.dir, "tls", "storage1.pem")
        self.assertEqual(errors, [f"{path}:6: [tls] cert: file not found: {cert}"])
        missing = os.path.join(self.dir, "nothing.toml")
        status, _, err = yield run_admin("check-config", missing, "--kind", "node")
        self.assertEqual((status, err["errors"]), (1, [f"{missing}: config file not found"]))

    @defer.inlineCallbacks
    def test_inconsistent_shards(self):
        text = (
            "[node]\nstorage = [1, 2]\nshard = 'a'\n"
            "[database]\nurl = 'mysql://emond:pw@127.0.0.1:3306/emond'\n"
            "[feeds]\ndefault_server = 1\n"
            "[shards.a]\nredis = 'redis://127.0.0.1:6379/0'\nsentinels = ['127.0.0.1:26379']\nservice = 'a'\nstorage = [1]\n"
            "[shards.b]\nredis = 'redis://127.0.0.1:6379/1'\nstorage = [1]\n"
        )
        path, errors = yield self.refused(text)
        shard_a = line_of(text, "[shards.a]")
        shard_b = line_of(text, "[shards.b]")
        self.assertEqual(errors, [
            f"{path}:{shard_a}: [shards.a]: give redis or sentinels, not both",
            # storage server 2 is hosted ([node] storage) but no shard names it: on [shards]'s first line
            f"{path}:{shard_a}: [shards]: storage server 2 belongs to no shard",
            f"{path}:{line_of(text, 'storage', shard_b)}: [shards.b] storage: server 1 is also shard 'a''s",
        ])

    @defer.inlineCallbacks
    def test_storage_config_errors(self):
        text = "[storage]\nid = 'one'\nlisten = 'tcp:7443'\nbogus = 1\n[health]\nadmin_token = 'short'\n"
        path, errors = yield self.refused(text, "storage")
        self.assertEqual(errors, [
            f"{path}:2: [storage] id: expected an integer, got 'one'",
            f"{path}:4: [storage] bogus: unknown key",
            f"{path}:6: [health] admin_token: at least 16 characters (or \"\" for none)",
            f"{path}: [tls] ca: required key missing",  # no [tls] in the file: no line
            f"{path}: [tls] cert: required key missing",
        ])

    @defer.inlineCallbacks
    def test_several_errors_each_with_its_line(self):
        text = (
            "# a node\n"
            "[node]\n"
            "name = 'node0'\n"
            "http = 'bogus:1'\n"
            "\n"
            "[input]\n"
            "queues = 0\n"
            "mapping = 'modulo'\n"
            "\n"
            "[storage.servers]\n"
            "1 = { endpoint = 'tcp:127.0.0.1:7443', nam = 'storage1' }\n"
            "\n"
            "[users]\n"
            "trusted_proxies = ['localhost']\n"
            "[engines]\n"
            "read_threads = 0\n"
        )
        path, errors = yield self.refused(text)
        self.assertEqual(errors, [
            f"{path}:4: [node] http: not a server endpoint (Unknown endpoint type: 'bogus'): 'bogus:1'",
            f"{path}:7: [input] queues: must be at least 1, got 0",
            f"{path}:8: [input] mapping: expected \"hash\" or \"ranges\", got 'modulo'",
            f"{path}:11: [storage.servers.1] nam: unknown key",
            f"{path}:14: [users] trusted_proxies: not an address or network: 'localhost'",
            f"{path}:16: [engines] read_threads: must be at least 1, got 0",
            f"{path}: [tls] ca: required key missing",  # a remote storage server needs [tls]
            f"{path}: [tls] cert: required key missing",
        ])

    @defer.inlineCallbacks
    def test_the_daemons_refuse_to_start_on_the_same_errors(self):
        text = "[node]\nhttp = 'tcp:0:interface=127.0.0.1'\n[input]\nqueues = 'many'\nmax_values = -3\n[nodes]\n"
        path, errors = yield self.refused(text)
        self.assertEqual(len(errors), 3, errors)
        daemon = start_daemon("emond", path, self.dir)
        self.addCleanup(daemon.signal, signal.SIGKILL)
        status = yield daemon.ended
        self.assertNotEqual(status, 0)
        for line in errors:
            self.assertIn(line.encode(), daemon.output)
        storage = self.write("[storage]\nid = 1\nlisten = 'tcp:0'\nhttp = 'tcp:0'\ndatadir = 'var'\n", "storage.toml")
        status, _, err = yield run_admin("check-config", storage)
        self.assertEqual((status, err["kind"]), (1, "storage"))
        daemon = start_daemon("emond-storage", storage, self.dir)
        self.addCleanup(daemon.signal, signal.SIGKILL)
        status = yield daemon.ended
        self.assertNotEqual(status, 0)
        self.assertIn(b"refusing to start: the config has errors:", daemon.output)
        for line in err["errors"]:
            self.assertIn(line.encode(), daemon.output)
