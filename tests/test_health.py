"""A truthful /health: periodic work survives its failures; /health goes degraded (503)
fast when Redis, the database or a storage link is lost (frozen or stopped, on real
private servers) and ok again after recovery; queue limits come from [health]; only
the operator sees details and /metrics; no answer names the server software."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import treq
from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from emond.config import NodeHealthSection, load_node_config, load_storage_config
from emond.loops import steady_loop
from emond.app.monitor import QueueMonitor
from emond.keys import input_stream, storage_stream
from emond.redis import Redis
from prometheus_client import CollectorRegistry
from tests.test_config import ConfigCase
from tests.support.node import Answer, NodeHarness, bound_client, drain, pipeline
from tests.support.servers import free_port, private_mariadb, private_redis

T0 = 1_700_000_000
TOKEN = "s3cret-admin-token-0123456789"


class HealthConfigTests(ConfigCase):
    """[health] in both processes' configs: defaults, and values refused at start."""

    def test_defaults(self):
        node = load_node_config(self.write(""))
        self.assertEqual(
            (node.health.admin_token, node.health.localhost, node.health.check_timeout, node.health.max_input_lag, node.health.max_storage_lag),
            ("", True, 2.0, 60.0, 300.0),
        )
        self.assertEqual((node.health.max_input_length, node.health.max_storage_length), (0, 0))

    def test_refused(self):
        for text, message in (
            ('[health]\nadmin_token = "short"\n', '[health] admin_token: at least 16 characters (or "" for none)'),
            ("[health]\ncheck_timeout = 0\n", "[health] check_timeout: must be more than 0, got 0.0"),
            ("[health]\nmax_input_lag = -1\n", "[health] max_input_lag: must be more than 0, got -1.0"),
            ("[health]\nmax_storage_length = -1\n", "[health] max_storage_length: must be 0 (no limit) or more, got -1"),
            ("[health]\nlocalhost = 1\n", "[health] localhost: expected true or false, got 1"),
        ):
            self.assertEqual(self.refused(load_node_config, text), message)

    def test_storage_server_has_no_queue_limits(self):
        tls = os.path.abspath(self.mktemp())
        self.certs(tls, "storage1")
        text = f'[storage]\nid = 1\n[tls]\nca = "{tls}/ca.pem"\ncert = "{tls}/storage1.pem"\n[health]\n'
        config = load_storage_config(self.write(text + f'admin_token = "{TOKEN}"\n', "storage.toml"))
        self.assertEqual(config.health.admin_token, TOKEN)
        self.assertEqual(self.refused(load_storage_config, text + "max_input_lag = 5.0\n"), "[health] max_input_lag: unknown key")


class SteadyLoopTests(unittest.TestCase):
    """Pure unit tests of the loop helper, on a task.Clock."""

    def test_a_failing_run_keeps_the_schedule(self):
        clock = task.Clock()
        runs = []

        def call():
            runs.append(clock.seconds())
            if len(runs) in (1, 3):
                # what a Redis timeout inside a txredisapi pipeline raises
                raise defer.FirstError(Failure(defer.CancelledError()), 0)

        loop = steady_loop(call, clock, "test loop")
        loop.start(5.0, now=True)
        self.addCleanup(loop.stop)
        for _ in range(4):
            clock.advance(5.0)
        self.assertEqual(runs, [0.0, 5.0, 10.0, 15.0, 20.0])
        self.assertTrue(loop.running)
        self.assertEqual(len(self.flushLoggedErrors(defer.FirstError)), 2)

    def test_a_failing_coroutine_keeps_the_schedule(self):
        clock = task.Clock()
        runs = []

        async def call():
            runs.append(clock.seconds())
            if len(runs) == 1:
                raise ValueError("first run fails")

        loop = steady_loop(call, clock, "test loop")
        loop.start(1.0, now=True)
        self.addCleanup(loop.stop)
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(runs, [0.0, 1.0, 2.0])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_a_hung_run_is_cancelled_and_the_loop_goes_on(self):
        clock = task.Clock()
        calls = []

        def call():
            d = defer.Deferred()  # never fires by itself
            calls.append(d)
            return d

        loop = steady_loop(call, clock, "test loop", timeout=3.0)
        loop.start(5.0, now=True)
        self.addCleanup(lambda: [loop.stop(), clock.advance(3.0), self.flushLoggedErrors(defer.TimeoutError)])
        clock.advance(3.0)
        self.assertEqual(len(self.flushLoggedErrors(defer.TimeoutError)), 1)
        clock.advance(2.0)
        self.assertEqual(len(calls), 2)

    def test_stop_fires_once_the_run_in_progress_has_ended(self):
        """What a run uses (Redis, the database) may be closed once stop() has fired."""
        clock = task.Clock()
        runs: list[defer.Deferred[None]] = []

        def call():
            runs.append(defer.Deferred())
            return runs[-1]

        loop = steady_loop(call, clock, "test loop")
        loop.start(5.0, now=True)
        stopped = loop.stop()
        self.assertFalse(stopped.called)  # the first run is still going
        runs[0].callback(None)
        self.assertTrue(stopped.called)
        self.assertFalse(loop.running)
        self.assertTrue(loop.stop().called)  # stopping a stopped loop: at once

    def test_queue_monitor_survives_a_failed_sample(self):
        """The failure seen in production: the sample's pipeline raised FirstError(CancelledError)."""
        clock = task.Clock()

        class Flaky:  # a Redis whose first pipeline fails the way txredisapi's did
            timeout = 5.0
            calls = 0

            async def pipeline(self, commands):
                Flaky.calls += 1
                if Flaky.calls == 1:
                    raise defer.FirstError(Failure(defer.CancelledError()), 0)
                return [0, []] * (len(commands) // 2)

        monitor = QueueMonitor(Flaky(), 1, [0], CollectorRegistry(), clock)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.assertFalse(monitor.status()["ok"])
        self.assertEqual(len(self.flushLoggedErrors(defer.FirstError)), 1)
        clock.advance(monitor.every)
        self.assertTrue(monitor.status()["ok"], monitor.status())
        self.assertEqual(Flaky.calls, 2)

    def test_an_overdue_sample_is_not_ok(self):
        clock = task.Clock()

        class Hung:
            timeout = 5.0

            def pipeline(self, commands):
                return defer.Deferred()

        monitor = QueueMonitor(Hung(), 1, [], CollectorRegistry(), clock, every=5.0)
        monitor.sampled_at, monitor.last = 0.0, {"ok": True}
        monitor.started_at = 0.0
        clock.advance(monitor.overdue + 1)
        status = monitor.status()
        self.assertFalse(status["ok"])
        self.assertIn("not sampled for 16s", status["error"])


@defer.inlineCallbacks
def fetch(client, url, headers=None):
    response = yield client.get(url, headers=headers or {})
    body = yield response.content()
    return Answer(response.code, response.headers, body)


class NodeHealthTests(unittest.TestCase):
    timeout = 60

    def private_redis(self):
        redis = private_redis()
        self.addCleanup(redis.stop)
        return redis

    @defer.inlineCallbacks
    def timed_health(self, node):
        began = time.monotonic()
        answer = yield node.get("health")
        return answer, time.monotonic() - began

    @defer.inlineCallbacks
    def test_frozen_redis_is_degraded_fast_and_recovers(self):
        redis = self.private_redis()
        # Redis's own timeout is long: only the check's time limit can answer fast.
        node = yield NodeHarness.start(self, redis_timeout=30.0, redis=redis.server, extra_config="[health]\ncheck_timeout = 1.0\n")
        yield pipeline(node, "monitor").next_sample()
        answer, _ = yield self.timed_health(node)
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)
        redis.freeze()
        self.addCleanup(redis.thaw)
        answer, took = yield self.timed_health(node)
        self.assertEqual((answer.code, answer.json()["status"]), (503, "degraded"), answer)
        self.assertLess(took, 10.0)
        self.assertEqual(answer.json()["redis_client"], {"ok": False, "error": "no answer within 1s (waiting for 1s)"})
        self.assertTrue(answer.json()["database"]["ok"])  # only the part that is unwell
        redis.thaw()
        answer = yield node.get("health")
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)

    @defer.inlineCallbacks
    def test_stopped_redis_is_degraded_and_recovers(self):
        redis = self.private_redis()
        node = yield NodeHarness.start(self, redis_timeout=1.0, redis=redis.server)
        monitor = pipeline(node, "monitor")
        yield monitor.next_sample()
        redis.stop()
        answer, took = yield self.timed_health(node)
        self.assertEqual(answer.code, 503, answer)
        self.assertLess(took, 10.0)
        self.assertFalse(answer.json()["redis_client"]["ok"])
        sample = yield monitor.next_sample()
        self.assertFalse(sample["ok"])
        answer = yield node.get("health")
        self.assertIn("queues not sampled", answer.json()["queues"]["error"])
        redis.start()
        # Each connection reconnects on its own backoff (at most 10 s apart): wait until the
        # pipeline has worked again and the monitor has sampled since.
        yield drain(node)
        while not (yield monitor.next_sample())["ok"]:
            pass
        answer = yield node.get("health")
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer.json())

    @defer.inlineCallbacks
    def test_consumer_keeps_its_queues_after_redis_timeouts(self):
        """Redis frozen for longer than its timeout: the consumer's lease loop used to die
        there (FirstError(CancelledError)), its leases lapsed and nothing was consumed again."""
        redis = self.private_redis()
        node = yield NodeHarness.start(self, redis_timeout=0.5, redis=redis.server, extra_config="[input]\nlease_ms = 1500\n")
        keys = (yield node.post("user/register.json", data={"username": "lease", "password": "secret1", "email": "l@example.org"})).json()
        yield drain(node)
        consumer = pipeline(node, "consumer")
        monitor = pipeline(node, "monitor")
        redis.freeze()
        self.addCleanup(redis.thaw)
        yield monitor.next_sample()  # fails after the Redis timeout; the lease loop's renewals too
        yield monitor.next_sample()
        redis.thaw()
        answer = yield node.post("input/post.json", apikey=keys["apikey_write"], node="n", csv="1.5", time=str(T0))
        self.assertEqual(answer.body, b"ok")
        yield drain(node)
        self.assertTrue(consumer.tenures)
        inputs = yield defer.ensureDeferred(node.ctx.inputs.list(keys["userid"]))
        self.assertEqual([(i.nodeid, i.name) for i in inputs], [("n", "1")])
        self.flushLoggedErrors()  # failed runs are logged (and survived)

    @defer.inlineCallbacks
    def test_frozen_database_is_degraded_fast_and_recovers(self):
        mariadb = private_mariadb()
        self.addCleanup(mariadb.stop)
        node = yield NodeHarness.start(self, "mysql", mariadb=mariadb.server, extra_config="[health]\ncheck_timeout = 1.0\n")
        yield pipeline(node, "monitor").next_sample()
        answer = yield node.get("health")
        self.assertEqual(answer.code, 200, answer)
        mariadb.freeze()
        self.addCleanup(mariadb.thaw)
        answers = []
        for _ in range(3):  # repeated: a hung query is not started again behind itself
            answer, took = yield self.timed_health(node)
            answers.append(answer)
            self.assertLess(took, 10.0)
        for answer in answers:
            self.assertEqual((answer.code, answer.json()["status"]), (503, "degraded"), answer)
            self.assertIn("no answer within 1s", answer.json()["database"]["error"])
        self.assertTrue(answers[-1].json()["redis_client"]["ok"])
        mariadb.thaw()
        answer = yield node.get("health")
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)

    @defer.inlineCallbacks
    def test_queue_length_over_its_limit_is_degraded(self):
        node = yield NodeHarness.start(self, extra_config="[input]\nconsume = false\nqueues = 1\n[health]\nmax_input_length = 1\n")
        keys = (yield node.post("user/register.json", data={"username": "qlen", "password": "secret1", "email": "q@example.org"})).json()
        monitor = pipeline(node, "monitor")
        for value in ("1", "2"):
            answer = yield node.post("input/post.json", apikey=keys["apikey_write"], node="n", csv=value)
            self.assertEqual(answer.body, b"ok")
            sample = yield monitor.next_sample()
        self.assertFalse(sample["ok"])
        answer = yield node.get("health")
        self.assertEqual(answer.code, 503, answer)
        self.assertEqual(answer.json()["queues"]["error"], "input queue 0: 2 elements (limit 1)")
        self.assertEqual(answer.json()["queues"]["input"]["length"], 2)

    @defer.inlineCallbacks
    def test_queue_lag_over_its_limit_is_degraded(self):
        """The lag is the age of a queue's oldest element (its stream id's time), measured
        here on a clock set 100 s after Redis appended it."""
        redis = self.private_redis()
        client = Redis.connect(redis.server.url, 5.0, reactor)
        self.addCleanup(client.disconnect)
        entry = yield defer.ensureDeferred(client.call("XADD", input_stream(1), "*", "p", "x"))
        appended = int(entry.split(b"-")[0]) / 1000
        clock = task.Clock()
        limits = NodeHealthSection(max_input_lag=60.0, max_storage_lag=300.0)
        monitor = QueueMonitor(client, 2, [0], CollectorRegistry(), clock, limits)
        clock.advance(appended + 59.0)
        sample = yield defer.ensureDeferred(monitor.sample())
        self.assertTrue(sample["ok"], sample)
        self.assertEqual(sample["input"]["lag"], 59.0)
        clock.advance(41.0)
        sample = yield defer.ensureDeferred(monitor.sample())
        self.assertFalse(sample["ok"])
        self.assertEqual(sample["error"], "input queue 1: oldest element 100.0s old (limit 60s)")
        yield defer.ensureDeferred(client.call("XADD", storage_stream(0), "*", "b", "x"))
        yield defer.ensureDeferred(client.call("DEL", input_stream(1)))
        sample = yield defer.ensureDeferred(monitor.sample())
        self.assertTrue(sample["ok"], sample)  # a new storage element: well under 300 s


class AccessTests(unittest.TestCase):
    """Who sees what: the node listens on 127.0.0.2; "remote" clients connect from 127.0.0.3."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(
            self, host="127.0.0.2", extra_config=f'[health]\nadmin_token = "{TOKEN}"\n[users]\ntrusted_proxies = ["127.0.0.4"]\n'
        )
        yield pipeline(self.node, "monitor").next_sample()
        self.remote = bound_client("127.0.0.3")
        self.local = bound_client("127.0.0.1")
        self.proxy = bound_client("127.0.0.4")

    @defer.inlineCallbacks
    def test_remote_client_sees_only_the_status(self):
        answer = yield fetch(self.remote, self.node.base + "health")
        self.assertEqual((answer.code, answer.json()), (200, {"status": "ok"}))
        answer = yield fetch(self.remote, self.node.base + "metrics")
        self.assertEqual(answer.code, 403)
        self.assertNotIn(b"emond_", answer.body)
        self.assertEqual(answer.json()["success"], False)
        for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN):
            answer = yield fetch(self.remote, self.node.base + "health", {"Authorization": header})
            self.assertEqual(answer.json(), {"status": "ok"}, header)
            answer = yield fetch(self.remote, self.node.base + "metrics", {"Authorization": header})
            self.assertEqual(answer.code, 403, header)

    @defer.inlineCallbacks
    def test_admin_token_and_localhost_see_details(self):
        for client, headers in ((self.remote, {"Authorization": f"Bearer {TOKEN}"}), (self.local, {})):
            answer = yield fetch(client, self.node.base + "health", headers)
            body = answer.json()
            self.assertEqual((answer.code, body["status"], body["process"]), (200, "ok", "emond"))
            self.assertEqual(body["version"], "0.1.0")
            self.assertIn("datadir", body["storage"]["locations"]["0"])
            answer = yield fetch(client, self.node.base + "metrics", headers)
            self.assertEqual(answer.code, 200)
            self.assertIn(b"emond_queue_length", answer.body)

    @defer.inlineCallbacks
    def test_forwarded_client_of_a_trusted_proxy_is_not_local(self):
        """A reverse proxy on 127.0.0.4, trusted: what counts is the client it names."""
        answer = yield fetch(self.proxy, self.node.base + "health", {"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(answer.json(), {"status": "ok"})
        answer = yield fetch(self.proxy, self.node.base + "metrics", {"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(answer.code, 403)
        # an untrusted peer cannot claim to be local
        answer = yield fetch(self.remote, self.node.base + "metrics", {"X-Forwarded-For": "127.0.0.1"})
        self.assertEqual(answer.code, 403)

    @defer.inlineCallbacks
    def test_no_server_header(self):
        keys = (yield self.node.post("user/register.json", data={"username": "hdr", "password": "secret1", "email": "h@example.org"})).json()
        for client, path in (
            (self.remote, "health"),
            (self.remote, "metrics"),
            (self.local, "metrics"),
            (self.remote, "nothing/here"),
            (self.remote, f"feed/list.json?apikey={keys['apikey_read']}"),
            (self.remote, "feed/list.json?apikey=wrong"),
        ):
            answer = yield fetch(client, self.node.base + path)
            self.assertIsNone(answer.headers.getRawHeaders(b"server"), (path, answer.code))
        answer = yield self.node.post("input/post.json", apikey=keys["apikey_write"], node="n", csv="1")
        self.assertEqual(answer.body, b"ok")
        self.assertIsNone(answer.headers.getRawHeaders(b"server"))


class ProcessTests(unittest.TestCase):
    """The two processes as real daemons: a storage link lost and back, a hosted disk error,
    the storage server's own /health and /metrics rules."""

    timeout = 120

    def setUp(self):
        from tests.support.daemon import remote_storage_config

        self.redis = private_redis()
        self.addCleanup(self.redis.stop)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.stream_port, self.storage_http, self.http = free_port(), free_port(), free_port()
        self.storage_config = remote_storage_config(
            self.base, self.stream_port, self.storage_http, http_host="127.0.0.2", extra=f'[health]\nadmin_token = "{TOKEN}"\n'
        )

    def node_config(self, remote: bool) -> str:
        """A node hosting storage 0, with storage 1 as a remote server if ``remote``."""
        path = os.path.join(self.base, "node.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\nhttp = "tcp:{self.http}:interface=127.0.0.1"\ndatadir = "local"\nstorage = [0]\n'
                f'[redis]\nurl = "{self.redis.server.url}"\ntimeout = 1.0\n[database]\nurl = "sqlite:///emond.db"\n'
                f"[input]\nqueues = 1\nrate_limit = 0.0\n[engines]\nwindow_past = 2000000000\n"
            )
            if remote:
                f.write(
                    f'[storage.servers]\n1 = {{ endpoint = "tcp:127.0.0.1:{self.stream_port}", name = "storage1" }}\n'
                    f'[tls]\nca = "tls/ca.pem"\ncert = "tls/node0.pem"\n'
                )
        return path

    def start(self, plugin, config, *ready):
        from tests.support.daemon import started

        return started(self, plugin, config, self.base, *ready)

    @defer.inlineCallbacks
    def health(self, port=None, host="127.0.0.1"):
        response = yield treq.get(f"http://{host}:{port or self.http}/health", persistent=False)
        body = yield response.content()
        return Answer(response.code, response.headers, body)

    @defer.inlineCallbacks
    def call(self, path, **params):
        response = yield treq.post(f"http://127.0.0.1:{self.http}/{path}", params=params, persistent=False)
        body = yield response.content()
        self.assertEqual(response.code, 200, (path, body))
        return json.loads(body) if body != b"ok" else body

    @defer.inlineCallbacks
    def test_storage_link_lost_is_degraded_and_recovers(self):
        storage = yield self.start("emond-storage", self.storage_config, "storage 1 open on", "Site starting on")
        node = yield self.start("emond", self.node_config(remote=True), "node API ready", "stream to storage 1 up")
        answer = yield self.health()
        self.assertEqual(answer.code, 200, answer)
        offset = len(node.output)
        killed = time.monotonic()
        yield storage.signal(signal.SIGKILL)
        yield node.logged_after("stream to storage 1 down", offset)
        answer = yield self.health()
        self.assertLess(time.monotonic() - killed, 10.0)
        self.assertEqual((answer.code, answer.json()["status"]), (503, "degraded"), answer)
        link = answer.json()["senders"]["locations"]["1"]
        self.assertEqual((link["ok"], link["connected"]), (False, False))
        self.assertTrue(answer.json()["senders"]["locations"]["0"]["ok"])
        offset = len(node.output)
        storage = yield self.start("emond-storage", self.storage_config, "storage 1 open on", "Site starting on")
        yield node.logged_after("stream to storage 1 up", offset)
        answer = yield self.health()
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_frozen_storage_server_is_degraded_and_recovers(self):
        """SIGSTOP: the connection stays open and nothing answers; only a ping can tell."""
        storage = yield self.start("emond-storage", self.storage_config, "storage 1 open on", "Site starting on")
        node = yield self.start("emond", self.node_config(remote=True), "node API ready", "stream to storage 1 up")
        answer = yield self.health()
        self.assertEqual(answer.code, 200, answer)
        os.kill(storage.transport.pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            answer = yield self.health()
            self.assertLess(time.monotonic() - frozen, 10.0)
            self.assertEqual((answer.code, answer.json()["status"]), (503, "degraded"), answer)
            link = answer.json()["senders"]["locations"]["1"]
            self.assertEqual((link["ok"], link["connected"]), (False, True))
            self.assertIn("no answer to a ping", link["error"])
        finally:
            os.kill(storage.transport.pid, signal.SIGCONT)
        answer = yield self.health()
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_hosted_disk_error_is_degraded_and_recovers(self):
        node = yield self.start("emond", self.node_config(remote=False), "node API ready", "storage 0 open on")
        keys = yield self.call("user/register.json", username="disk", password="secret1", email="d@example.org")
        key = keys["apikey_write"]
        feed = yield self.call("feed/create.json", apikey=key, name="f", engine="5", options='{"interval":10}', server="0")
        yield self.call("input/post.json", apikey=key, node="n", csv="0", time=str(T0))
        offset = len(node.output)
        yield node.logged_after("input queues drained", 0)
        inputs = yield self.call("input/list.json", apikey=key)
        yield self.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=f"1:{feed['feedid']}")
        # The feed's first slots: its file holds 21 (84 bytes) before the limit below.
        for when in (T0 + 10, T0 + 210):
            offset = len(node.output)
            yield self.call("input/post.json", apikey=key, node="n", csv="0.5", time=str(when))
            yield node.logged_after("storage queue 0 drained", offset)
        # From now on the node process may grow no file past 64 bytes: the feed's writes fail (EFBIG).
        pid = str(node.transport.pid)
        subprocess.run(["prlimit", "--pid", pid, "--fsize=64:unlimited"], check=True)
        self.addCleanup(subprocess.run, ["prlimit", "--pid", pid, "--fsize=unlimited:unlimited"])
        offset = len(node.output)
        yield self.call("input/post.json", apikey=key, node="n", csv="1", time=str(T0 + 1000))
        yield node.logged_after("applying a batch failed", offset)
        answer = yield self.health()
        self.assertEqual((answer.code, answer.json()["status"]), (503, "degraded"), answer)
        self.assertIn("File too large", answer.json()["senders"]["locations"]["0"]["error"])
        subprocess.run(["prlimit", "--pid", pid, "--fsize=unlimited:unlimited"], check=True)
        offset = len(node.output)
        yield node.logged_after("storage queue 0 drained", offset)
        answer = yield self.health()
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)
        yield node.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_storage_server_public_and_operator_answers(self):
        """The storage daemon listens on 127.0.0.2: the same rules as the node."""
        storage = yield self.start("emond-storage", self.storage_config, "storage 1 open on", "Site starting on")
        url = f"http://127.0.0.2:{self.storage_http}/"
        remote = bound_client("127.0.0.3")
        answer = yield fetch(remote, url + "health")
        self.assertEqual((answer.code, answer.json()), (200, {"status": "ok"}))
        self.assertIsNone(answer.headers.getRawHeaders(b"server"))
        answer = yield fetch(remote, url + "metrics")
        self.assertEqual(answer.code, 403)
        self.assertIsNone(answer.headers.getRawHeaders(b"server"))
        answer = yield fetch(remote, url + "nothing")
        self.assertEqual(answer.code, 404)
        self.assertIsNone(answer.headers.getRawHeaders(b"server"))
        for client, headers in ((remote, {"Authorization": f"Bearer {TOKEN}"}), (bound_client("127.0.0.1"), {})):
            answer = yield fetch(client, url + "health", headers)
            self.assertEqual((answer.json()["process"], answer.json()["stream"]["ok"]), ("emond-storage", True))
            self.assertIn("remote", answer.json()["storage"]["datadir"])
            answer = yield fetch(client, url + "metrics", headers)
            self.assertEqual(answer.code, 200)
            self.assertIn(b"emond_stream_batches_applied", answer.body)
            self.assertIsNone(answer.headers.getRawHeaders(b"server"))
        yield storage.signal(signal.SIGTERM)
