"""Redis over TLS (``rediss://``; sentinels with ``tls = true``) and the sentinels' own
password, against real redis-server and Sentinel processes (Debian's redis-server is built
with TLS) that take only TLS connections and require a client certificate of the CA."""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from emond.app.node import central_redis, shard_redis
from emond.config import load_node_config
from emond.redis import Redis, RedisTLS, RedisUnavailable, SentinelService, Subscription
from tests.support.node import NodeHarness, drain
from tests.support.servers import ServerTLS, make_certs, private_redis, private_sentinel
from tests.test_admin import admin

PASSWORD = "redis-Secret-1"  # the TLS server's requirepass: never in a log line
SENTINEL_PASSWORD = "sentinel-Secret-2"
SERVICE = "shard-t"
DEADLINE = 20.0  # seconds a condition polled for may take to come true


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


@defer.inlineCallbacks
def until(condition, what: str):
    """Poll ``condition()`` until it is true; fails after DEADLINE seconds."""
    deadline = reactor.seconds() + DEADLINE
    while True:
        value = yield defer.maybeDeferred(condition)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        yield task.deferLater(reactor, 0.05, lambda: None)


class TLSCase(unittest.TestCase):
    """Certificates of the cluster CA for ``redis`` (the servers) and ``node0`` (the client),
    and of another CA (``rogue``); every log event of the test, as text."""

    timeout = 90

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.certs = make_certs(os.path.join(base, "tls"), "redis", "node0")
        self.rogue = make_certs(os.path.join(base, "rogue"), "redis", "node0")
        self.server_tls = ServerTLS(self.file("ca.pem"), self.file("redis.pem"))
        self.events: list[str] = []

        def observe(event) -> None:
            self.events.append(formatEvent(event) if "log_format" in event else " ".join(map(str, event.get("message", ()))))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def file(self, name: str, certs: str = "") -> str:
        return os.path.join(certs or self.certs, name)

    def tls(self, name: str = "redis", cert: str = "", ca: str = "") -> RedisTLS:
        """The client's TLS: by default the node0 certificate, trusting the CA, for ``redis``."""
        return RedisTLS(ca or self.file("ca.pem"), cert or self.file("node0.pem"), name)

    def client(self, url: str, timeout: float = 5.0, tls: RedisTLS | None = None, sentinel: SentinelService | None = None) -> Redis:
        redis = Redis(url, timeout, reactor, sentinel=sentinel, tls=tls)
        redis.open()
        self.addCleanup(redis.disconnect)
        return redis

    def logged(self, *texts: str):
        """Fires once a log line holds every one of ``texts``; with that line."""
        return until(lambda: next((e for e in self.events if all(t in e for t in texts)), None), f"a log line with {texts}")

    def assertNoSecrets(self) -> None:
        for secret in (PASSWORD, SENTINEL_PASSWORD):
            self.assertEqual([e for e in self.events if secret in e], [])

    @defer.inlineCallbacks
    def assertUnavailable(self, redis: Redis):
        """A call fails with RedisUnavailable, within the client's timeout (and a margin)."""
        began = reactor.seconds()
        yield self.assertFailure(wait(redis.call("PING")), RedisUnavailable)
        self.assertLess(reactor.seconds() - began, redis.timeout + 2.0)


class RedisOverTLSTests(TLSCase):
    """A ``rediss://`` client of a TLS-only redis-server with a password."""

    def setUp(self) -> None:
        super().setUp()
        self.server = private_redis("--requirepass", PASSWORD, tls=self.server_tls)
        self.addCleanup(self.server.stop)
        self.url = f"rediss://:{PASSWORD}@127.0.0.1:{self.server.server.port}/0"

    @defer.inlineCallbacks
    def test_calls_and_a_pipeline(self):
        redis = self.client(self.url, tls=self.tls())
        yield wait(redis.call("SET", "emond:k", b"\x00v"))
        self.assertEqual((yield wait(redis.call("GET", "emond:k"))), b"\x00v")
        replies = yield wait(redis.pipeline([("INCR", "emond:n"), ("INCR", "emond:n"), ("GET", "emond:n")]))
        self.assertEqual(replies, [1, 2, b"2"])
        self.assertTrue((yield wait(redis.ping())))

    @defer.inlineCallbacks
    def test_a_subscription_receives_a_message(self):
        subscribed, received = defer.Deferred(), defer.Deferred()
        subscription = Subscription(
            self.url, "emond:tls-test", received.callback, lambda: subscribed.callback(None), lambda: None, 5.0, reactor, self.tls()
        )
        subscription.open()
        self.addCleanup(subscription.disconnect)
        yield subscribed
        self.assertTrue(subscription.live)
        redis = self.client(self.url, tls=self.tls())
        self.assertEqual((yield wait(redis.call("PUBLISH", "emond:tls-test", b"hello"))), 1)
        self.assertEqual((yield received), b"hello")

    @defer.inlineCallbacks
    def test_a_client_certificate_of_another_ca_is_refused(self):
        redis = self.client(self.url, timeout=2.0, tls=self.tls(cert=self.file("node0.pem", self.rogue)))
        yield self.assertUnavailable(redis)
        yield self.logged(f"redis 127.0.0.1:{self.server.server.port}: TLS failed: ", "alert")
        self.assertNoSecrets()

    @defer.inlineCallbacks
    def test_a_server_certificate_without_the_name_is_refused(self):
        redis = self.client(self.url, timeout=2.0, tls=self.tls(name="elsewhere"))
        yield self.assertUnavailable(redis)
        yield self.logged("TLS failed: ", "elsewhere")
        self.assertNoSecrets()

    @defer.inlineCallbacks
    def test_a_server_certificate_of_another_ca_is_refused(self):
        redis = self.client(self.url, timeout=2.0, tls=self.tls(ca=self.file("ca.pem", self.rogue)))
        yield self.assertUnavailable(redis)
        yield self.logged("TLS failed: ", "certificate verify failed")
        self.assertNoSecrets()

    @defer.inlineCallbacks
    def test_a_plain_url_to_the_tls_port_fails_cleanly(self):
        redis = self.client(f"redis://:{PASSWORD}@127.0.0.1:{self.server.server.port}/0", timeout=2.0)
        yield self.assertUnavailable(redis)
        yield self.assertUnavailable(redis)  # and again: nothing hangs
        self.assertNoSecrets()

    def test_tls_settings_go_with_rediss_only(self):
        self.assertRaises(ValueError, Redis, self.url, 1.0, reactor)
        self.assertRaises(ValueError, Redis, "redis://127.0.0.1:6379/0", 1.0, reactor, tls=self.tls())
        self.assertRaises(ValueError, Subscription, self.url, "c", print, print, print, 1.0, reactor)


class HandshakeRetryTests(TLSCase):
    """A failed handshake is a lost connection, tried again: not a failed AUTH, after which
    txredisapi would stop trying for good."""

    @defer.inlineCallbacks
    def test_a_server_whose_certificate_is_fixed_is_reached(self):
        served = os.path.join(os.path.dirname(self.certs), "served.pem")
        shutil.copy(self.file("redis.pem", self.rogue), served)  # first a certificate of another CA
        server = private_redis("--requirepass", PASSWORD, tls=ServerTLS(self.file("ca.pem"), served))
        self.addCleanup(server.stop)
        redis = self.client(f"rediss://:{PASSWORD}@127.0.0.1:{server.server.port}/0", timeout=1.0, tls=self.tls())
        yield self.assertUnavailable(redis)
        yield self.logged("TLS failed: ", "certificate verify failed")
        server.stop()
        shutil.copy(self.file("redis.pem"), served)
        server.start()
        yield until(redis.ping, "PING answered once the server has a certificate of the CA")
        self.assertNoSecrets()


class SentinelTests(TLSCase):
    """Sentinels with their own password (``sentinel_password``), and sentinels and a master
    reached over TLS (``tls = true``)."""

    def sentinel(self, port: int, password: str = "") -> SentinelService:
        return SentinelService((f"127.0.0.1:{port}",), SERVICE, sentinel_password=password)

    @defer.inlineCallbacks
    def test_a_sentinel_password(self):
        master = private_redis()
        self.addCleanup(master.stop)
        sentinel = private_sentinel(master.server.port, SERVICE, password=SENTINEL_PASSWORD)
        self.addCleanup(sentinel.stop)
        redis = Redis("", 5.0, reactor, sentinel=self.sentinel(sentinel.server.port, SENTINEL_PASSWORD))
        resolved = redis.resolved()
        redis.open()
        self.addCleanup(redis.disconnect)
        yield resolved
        self.assertEqual(redis.master, ("127.0.0.1", master.server.port))
        yield wait(redis.call("SET", "emond:k", b"v"))
        self.assertEqual((yield wait(redis.call("GET", "emond:k"))), b"v")
        # Without the password the sentinel refuses to name the master: nothing to call.
        refused = self.client("", sentinel=self.sentinel(sentinel.server.port))
        yield self.logged(f"redis {SERVICE}: sentinel 127.0.0.1:{sentinel.server.port} did not answer: ", "NOAUTH")
        self.assertIsNone(refused.master)
        yield self.assertUnavailable(refused)
        self.assertNoSecrets()

    @defer.inlineCallbacks
    def test_sentinels_and_their_master_over_tls(self):
        master = private_redis(tls=self.server_tls)
        self.addCleanup(master.stop)
        sentinel = private_sentinel(master.server.port, SERVICE, password=SENTINEL_PASSWORD, tls=self.server_tls)
        self.addCleanup(sentinel.stop)
        redis = Redis("", 5.0, reactor, sentinel=self.sentinel(sentinel.server.port, SENTINEL_PASSWORD), tls=self.tls())
        resolved = redis.resolved()
        redis.open()
        self.addCleanup(redis.disconnect)
        yield resolved
        self.assertEqual(redis.master, ("127.0.0.1", master.server.port))
        yield wait(redis.call("SET", "emond:k", b"v"))
        self.assertEqual((yield wait(redis.call("GET", "emond:k"))), b"v")
        self.assertEqual((yield wait(redis.pipeline([("GET", "emond:k")]))), [b"v"])
        self.assertNoSecrets()


class NodeOverTLSTests(TLSCase):
    """A node whose central Redis and whose shard's Redis are TLS-only servers, from its config."""

    def config(self, central: str, shard: str) -> Any:
        path = os.path.join(self.certs, "emond.toml")
        with open(path, "w") as f:
            f.write(
                f'[redis]\nurl = "{central}"\n[tls]\nca = "{self.file("ca.pem")}"\ncert = "{self.file("node0.pem")}"\n'
                f'[node]\nshard = "s"\n[shards.s]\n{shard}storage = [0]\n'
            )
        return load_node_config(path)

    def test_the_config_gives_each_redis_its_tls(self):
        config = self.config("rediss://127.0.0.1:1/0", 'redis = "rediss://10.0.0.1:2/0"\ntls_name = "redis"\n')
        self.assertEqual(central_redis(config, config.redis.url).tls, self.tls(name=""))  # "": the url's host
        self.assertEqual(shard_redis(config, "s", config.redis.url).tls, self.tls())
        config = self.config("redis://127.0.0.1:1/0", 'redis = "redis://10.0.0.1:2/0"\n')
        self.assertIsNone(central_redis(config, config.redis.url).tls)
        self.assertIsNone(shard_redis(config, "s", config.redis.url).tls)
        sentinels = 'sentinels = ["10.0.0.1:26379"]\nservice = "m"\nsentinel_password = "p"\ntls = true\n'
        where = shard_redis(self.config("redis://127.0.0.1:1/0", sentinels), "s", "redis://127.0.0.1:1/0")
        self.assertEqual((where.tls, where.sentinel.sentinel_password), (self.tls(name=""), "p"))

    @defer.inlineCallbacks
    def test_the_name_verified_is_the_urls_host_by_default(self):
        make_certs(self.certs, "localhost")
        server = private_redis(tls=ServerTLS(self.file("ca.pem"), self.file("localhost.pem")))
        self.addCleanup(server.stop)
        redis = self.client(f"rediss://localhost:{server.server.port}/0", tls=self.tls(name=""))
        self.assertTrue((yield wait(redis.ping())))
        by_address = self.client(f"rediss://127.0.0.1:{server.server.port}/0", timeout=1.0, tls=self.tls(name=""))
        yield self.assertUnavailable(by_address)  # the certificate names localhost, not 127.0.0.1

    @defer.inlineCallbacks
    def test_posts_go_through_and_the_admin_reads_the_queues(self):
        central = private_redis(tls=self.server_tls)
        self.addCleanup(central.stop)
        shard = private_redis(tls=self.server_tls)
        self.addCleanup(shard.stop)
        node = yield NodeHarness.start(
            self,
            "sqlite",
            f'[tls]\nca = "{self.file("ca.pem")}"\ncert = "{self.file("node0.pem")}"\n'
            f'[shards.s]\nredis = "{shard.server.url}"\ntls_name = "redis"\nstorage = [0]\n',
            redis=central.server,
            flush_redis=False,
            redis_config='tls_name = "redis"\n',
            node_config='shard = "s"\n',
        )
        self.assertEqual(node.ctx.redis.url, shard.server.url)
        user = (yield node.post("user/register.json", data={"username": "tls", "password": "secret1", "email": "t@example.org"})).json()
        self.assertEqual((yield node.post("input/post.json", apikey=user["apikey_write"], node="n", csv="42")).body, b"ok")
        yield drain(node)
        inputs = (yield node.post("input/list.json", apikey=user["apikey_write"])).json()
        self.assertEqual([(i["nodeid"], i["name"], float(i["value"])) for i in inputs], [("n", "1", 42.0)])
        status, out, err = yield admin(node.config_path, "shards")
        self.assertEqual((status, err), (0, None))
        self.assertEqual((out["s"]["input_queued"], out["s"]["users"]), (0, 1))
