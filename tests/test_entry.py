"""The entry point (issue 12 item 7): a real HAProxy, configured from etc/haproxy.cfg, in front
of real nodes. The client address reaches emond through the PROXY protocol (v2) or a trusted
X-Forwarded-For, so per-address throttles count each device, not the balancer.

Addresses: HAProxy listens on 127.0.0.2 (and connects to the nodes from it); the nodes on
127.0.0.1; the "devices" connect from 127.0.0.21 and 127.0.0.22.
"""

from __future__ import annotations

import os
import signal
import subprocess

from twisted.internet import defer, utils
from twisted.trial import unittest

from emond.app.localcluster import entry_config
from emond.config import load_node_config
from emond.app.programs import HAPROXY_READY, require_program
from tests.support.daemon import ROOT, start_haproxy
from tests.support.node import Answer, NodeHarness, bound_client
from tests.support.servers import free_port, private_redis
from tests.test_config import ConfigCase

EXAMPLE = os.path.join(ROOT, "etc", "haproxy.cfg")
ENTRY = "127.0.0.2"
DEVICE, OTHER = "127.0.0.21", "127.0.0.22"
TOO_MANY = "Too many attempts, please try again later"


def example() -> str:
    with open(EXAMPLE) as f:
        return f.read()


class EndpointConfigTests(ConfigCase):
    def test_the_proxy_protocol_endpoint_is_accepted(self):
        config = load_node_config(self.write('[node]\nhttp = "haproxy:tcp:8080:interface=10.0.0.21"\n'))
        self.assertEqual(config.node.http, "haproxy:tcp:8080:interface=10.0.0.21")

    def test_a_bad_proxy_protocol_endpoint_is_refused(self):
        message = self.refused(load_node_config, '[node]\nhttp = "haproxy:tcp:port"\n')
        self.assertTrue(message.startswith("[node] http: not a server endpoint"), message)


class EntryMixin:
    """A test's own HAProxy in front of its nodes."""

    timeout = 60

    @defer.inlineCallbacks
    def start_entry(self, nodes, proxy_protocol=True, tls=False):
        """HAProxy on ENTRY from etc/haproxy.cfg, in front of ``nodes``; fires with its URL."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        port = free_port(ENTRY)
        cert = None
        if tls:
            subprocess.run([os.path.join(ROOT, "etc", "make-certs"), folder, "entry"], check=True, capture_output=True)
            cert = os.path.join(folder, "entry.pem")
        fronts = [(f"front{i + 1}", f"127.0.0.1:{node.port}") for i, node in enumerate(nodes)]
        text = entry_config(example(), f"{ENTRY}:{port}", fronts, proxy_protocol=proxy_protocol, source=ENTRY, tls_cert=cert)
        path = os.path.join(folder, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(text)
        self.haproxy = start_haproxy(path, folder)
        self.addCleanup(self.haproxy.signal, signal.SIGTERM)
        yield self.haproxy.logged(HAPROXY_READY.decode())
        self.ca = os.path.join(folder, "ca.pem")
        return f"{'https' if tls else 'http'}://{ENTRY}:{port}/"

    @defer.inlineCallbacks
    def call(self, source, method, path, data=None, headers=None, https=False):
        """A request from the device at ``source`` through the entry."""
        client = bound_client(source, self.ca if https else None, "entry")
        response = yield client.request(method, self.entry + path, data=data, headers=headers or {})
        body = yield response.content()
        self.last_cookies = response.headers.getRawHeaders(b"set-cookie") or []
        return Answer(response.code, response.headers, body)

    @defer.inlineCallbacks
    def register(self, source, username):
        answer = yield self.call(source, "POST", "user/register.json", {"username": username, "password": "secret1", "email": f"{username}@example.org"})
        self.assertEqual(answer.code, 200, answer)
        return answer.json()

    def login(self, source, username, password, headers=None, https=False):
        return self.call(source, "POST", "user/login.json", {"username": username, "password": password}, headers, https)

    def assertThrottled(self, answer, message=TOO_MANY):
        self.assertEqual((answer.code, answer.json()), (429, {"success": False, "message": message}), answer)

    @defer.inlineCallbacks
    def check_login_throttle_per_device(self, forged=None):
        """5 wrong passwords from DEVICE: its 6th attempt is refused; OTHER, behind the
        same balancer, still logs in. ``forged``: DEVICE sends its own X-Forwarded-For."""
        yield self.register(OTHER, "alice")
        for i in range(5):
            headers = {"X-Forwarded-For": f"198.51.100.{i + 1}"} if forged else None
            answer = yield self.login(DEVICE, "alice", "wrong!", headers)
            self.assertNotEqual(answer.code, 429, (i, answer))
        answer = yield self.login(DEVICE, "alice", "secret1", {"X-Forwarded-For": "198.51.100.99"} if forged else None)
        self.assertThrottled(answer)
        answer = yield self.login(OTHER, "alice", "secret1")
        self.assertEqual((answer.code, answer.json()["success"]), (200, True), answer)


class ProxyProtocolTests(EntryMixin, unittest.TestCase):
    """HAProxy → PROXY v2 → a node listening on ``haproxy:tcp:...``; HAProxy's own address is a
    trusted proxy (for X-Forwarded-Proto), the devices are not."""

    users = '[users]\ntrusted_proxies = ["127.0.0.2"]\nregistrations_per_address = 2\n'

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(
            self, extra_config=f"[input]\nrate_limit = 0.001\nrate_burst = 2\n{self.users}", http_prefix="haproxy:"
        )
        self.entry = yield self.start_entry([self.node])

    def test_login_throttle_counts_per_device(self):
        return self.check_login_throttle_per_device()

    def test_a_device_cannot_name_another_address(self):
        """The PROXY header names the device; its own X-Forwarded-For is not believed."""
        return self.check_login_throttle_per_device(forged=True)

    @defer.inlineCallbacks
    def test_registrations_count_per_device(self):
        yield self.register(DEVICE, "dev1")
        yield self.register(DEVICE, "dev2")
        answer = yield self.call(DEVICE, "POST", "user/register.json", {"username": "dev3", "password": "secret1", "email": "d3@example.org"})
        self.assertThrottled(answer, "Too many registrations from this address, please try again later")
        yield self.register(OTHER, "other1")

    @defer.inlineCallbacks
    def test_rate_limit_counts_per_device(self):
        """Two devices behind one balancer: one over its rate is refused, the other is not."""
        first = yield self.register(DEVICE, "dev1")
        second = yield self.register(OTHER, "dev2")
        for _ in range(2):  # the burst
            answer = yield self.call(DEVICE, "GET", f"input/post.json?node=1&json={{\"p\":1}}&apikey={first['apikey_write']}")
            self.assertEqual((answer.code, answer.body), (200, b"ok"), answer)
        answer = yield self.call(DEVICE, "GET", f"input/post.json?node=1&json={{\"p\":1}}&apikey={first['apikey_write']}")
        self.assertEqual(answer.code, 429, answer)
        answer = yield self.call(DEVICE, "GET", f"input/post.json?node=1&json={{\"p\":1}}&apikey={second['apikey_write']}")
        self.assertEqual((answer.code, answer.body), (200, b"ok"), answer)

    @defer.inlineCallbacks
    def test_session_cookie_not_secure_over_plain_http(self):
        yield self.register(DEVICE, "alice")
        answer = yield self.login(DEVICE, "alice", "secret1", {"X-Forwarded-Proto": "https"})  # HAProxy overwrites it
        self.assertEqual(answer.code, 200, answer)
        self.assertNotIn(b"Secure", b"".join(self.last_cookies))


class ProxyProtocolTLSTests(EntryMixin, unittest.TestCase):
    """TLS ends at HAProxy; emond learns it from X-Forwarded-Proto, believed because the
    connection (under its PROXY header) comes from HAProxy, a trusted proxy."""

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, extra_config='[users]\ntrusted_proxies = ["127.0.0.2"]\n', http_prefix="haproxy:")
        self.entry = yield self.start_entry([self.node], tls=True)

    @defer.inlineCallbacks
    def test_session_cookie_is_secure(self):
        yield self.call(OTHER, "POST", "user/register.json", {"username": "alice", "password": "secret1", "email": "a@example.org"}, https=True)
        answer = yield self.login(DEVICE, "alice", "secret1", https=True)
        self.assertEqual(answer.code, 200, answer)
        (cookie,) = self.last_cookies
        self.assertIn(b"Secure", cookie)
        self.assertIn(b"HttpOnly", cookie)

    @defer.inlineCallbacks
    def test_untrusted_balancer_is_not_believed(self):
        """Without HAProxy in trusted_proxies, X-Forwarded-Proto is ignored."""
        node = yield NodeHarness.start(self, http_prefix="haproxy:")
        self.entry = yield self.start_entry([node], tls=True)
        yield self.call(OTHER, "POST", "user/register.json", {"username": "bob", "password": "secret1", "email": "b@example.org"}, https=True)
        answer = yield self.login(DEVICE, "bob", "secret1", https=True)
        self.assertEqual(answer.code, 200, answer)
        self.assertNotIn(b"Secure", b"".join(self.last_cookies))


class ForwardedForTests(EntryMixin, unittest.TestCase):
    """HAProxy → ``option forwardfor`` → a node on plain ``tcp:`` trusting HAProxy's address."""

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, extra_config='[users]\ntrusted_proxies = ["127.0.0.2"]\n')
        self.entry = yield self.start_entry([self.node], proxy_protocol=False)

    def test_login_throttle_counts_per_device(self):
        return self.check_login_throttle_per_device()

    def test_a_device_cannot_name_another_address(self):
        """HAProxy appends the device's address; what the device wrote before it is not believed."""
        return self.check_login_throttle_per_device(forged=True)


class ExampleConfigTests(EntryMixin, unittest.TestCase):
    """etc/haproxy.cfg itself: valid, and it takes out a front whose /health is not 200."""

    @defer.inlineCallbacks
    def check(self, text):
        path = os.path.join(os.path.abspath(self.mktemp()))
        with open(path, "w") as f:
            f.write(text)
        out, err, code = yield utils.getProcessOutputAndValue(require_program("haproxy"), ["-c", "-f", path])
        return code, (out + err).decode()

    @defer.inlineCallbacks
    def test_valid(self):
        code, output = yield self.check(example())
        self.assertEqual(code, 0, output)
        self.assertIn("Configuration file is valid", output)
        for proxy_protocol in (True, False):
            text = entry_config(example(), "127.0.0.2:8080", [("front1", "127.0.0.1:1"), ("front2", "127.0.0.1:2")],
                                proxy_protocol=proxy_protocol, source="127.0.0.2")
            code, output = yield self.check(text)
            self.assertEqual(code, 0, output)

    @defer.inlineCallbacks
    def test_a_front_whose_health_fails_is_taken_out(self):
        healthy = yield NodeHarness.start(self, http_prefix="haproxy:")
        redis = private_redis()
        self.addCleanup(redis.stop)
        failing = yield NodeHarness.start(self, redis=redis.server, redis_timeout=1.0, http_prefix="haproxy:")
        self.entry = yield self.start_entry([healthy, failing])
        for _ in range(4):
            answer = yield self.call(DEVICE, "GET", "health")
            self.assertEqual(answer.code, 200, answer)
        redis.stop()  # the second front's /health: 503
        yield self.haproxy.logged("Server fronts/front2 is DOWN")
        down = self.haproxy.output[self.haproxy.output.index(b"Server fronts/front2 is DOWN"):].split(b"\n")[0]
        self.assertIn(b"Layer7 wrong status, code: 503", down)
        for _ in range(6):
            answer = yield self.call(DEVICE, "GET", "health")
            self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)
        self.assertNotIn(b"Server fronts/front1 is DOWN", self.haproxy.output)
