"""The input path end to end: HTTP post/bulk → Redis input queue → process lists → storage queue → files."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import zlib

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from emond.keys import user_version as user_version_key
from emond.engine import DataQuery
from emond.phpfina import PHPFina
from tests.support.node import NodeHarness, drain

T0 = 1_700_000_000 // 10 * 10


class InputPathTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite", "[engines]\nwindow_past = 2000000000\n")
        answer = yield self.node.post("user/register.json", data={"username": "dev", "password": "secret1", "email": "d@example.org"})
        self.keys = answer.json()
        self.userid = self.keys["userid"]
        self.ctx = self.node.ctx

    def post(self, path, **params):
        params.setdefault("apikey", self.keys["apikey_write"])
        return self.node.request("POST", path, params=params)

    @defer.inlineCallbacks
    def feed(self, name="f", interval=10, engine=5):
        feed = yield defer.ensureDeferred(self.ctx.feeds.create(self.userid, name, "", 1, engine, interval, 0))
        yield defer.ensureDeferred(self.ctx.store.create(feed))
        return feed

    @defer.inlineCallbacks
    def set_processlist(self, node, name, text):
        inputs = yield defer.ensureDeferred(self.ctx.inputs.list(self.userid))
        inp = [i for i in inputs if (i.nodeid, i.name) == (node, name)][0]
        yield defer.ensureDeferred(self.ctx.inputs.change_processlist(self.userid, inp.id, lambda current: (None, text)))
        yield defer.ensureDeferred(self.ctx.redis.call("INCR", user_version_key(self.userid)))
        return inp

    def slots(self, feed):
        engine = PHPFina(os.path.join(self.node.config.node.datadir, "phpfina"), sync=False)
        try:
            start, interval, data = engine.raw(feed.id)
        finally:
            engine.close()
        return start, [None if np.isnan(v) else round(float(v), 4) for v in data]

    @defer.inlineCallbacks
    def test_post_forms_create_inputs(self):
        answers = []
        answers.append((yield self.post("input/post.json", node="emontx", fulljson='{"power1":100,"power2":200.5}')))
        answers.append((yield self.post("input/post", node="emontx", json="{power3:1,temp:-2.5}")))
        answers.append((yield self.post("input/post/house", csv="10,20,30")))
        answers.append((yield self.post("input/post.json", node="5", data="a:1,b:2")))
        self.assertEqual([a.body for a in answers], [b'{"success": true}', b"ok", b"ok", b"ok"])
        self.assertEqual(answers[0].content_type, "application/json")
        yield drain(self.node)
        inputs = yield defer.ensureDeferred(self.ctx.inputs.list(self.userid))
        self.assertEqual(
            sorted((i.nodeid, i.name) for i in inputs),
            sorted([("emontx", "power1"), ("emontx", "power2"), ("emontx", "power3"), ("emontx", "temp"),
                    ("house", "1"), ("house", "2"), ("house", "3"), ("5", "a"), ("5", "b")]),
        )
        values = yield defer.ensureDeferred(self.ctx.inputs.lastvalues([i.id for i in inputs]))
        by_name = {(i.nodeid, i.name): values[i.id][1] for i in inputs}
        self.assertEqual(by_name[("emontx", "power2")], 200.5)
        self.assertEqual(by_name[("emontx", "temp")], -2.5)
        self.assertEqual(by_name[("house", "3")], 30.0)

    @defer.inlineCallbacks
    def test_errors(self):
        cases = [
            ({"node": "emontx"}, "Request contains no data via csv, json or data tag"),
            ({"node": "bad$node", "csv": "1"}, "Error: invalid node name"),
            ({"node": "n" * 17, "csv": "1"}, "Error: node name must be 16 characters or less"),
            ({"node": "x", "fulljson": "[1,2]"}, "Input must be a JSON object"),
            ({"node": "x", "fulljson": "{bad"}, "Error decoding JSON string (invalid or too deeply nested)"),
            # ({"node": "x", "fulljson": '{"a":"abc"}'} was refused whole; compat §A now refuses the value alone)
            ({"node": "x", "csv": "1,abc"}, "Format error: csv value is not numeric"),
            ({"node": "x", "json": "a:xyz"}, "Format error, json value is not numeric"),
        ]
        for params, message in cases:
            answer = yield self.post("input/post.json", **params)
            self.assertEqual((answer.code, answer.json()), (400, {"success": False, "message": message}), params)
        bad_key = yield self.node.post("input/post.json", apikey="f" * 32, csv="1")
        self.assertEqual((bad_key.code, bad_key.body), (401, b"Invalid API key"))
        read_key = yield self.node.post("input/post.json", apikey=self.keys["apikey_read"], csv="1")
        self.assertEqual(read_key.code, 403)

    @defer.inlineCallbacks
    def test_bulk_timing_modes_and_malformed_frames(self):
        feed = yield self.feed()
        now = 1_800_000_000

        # fix the clock the web layer stamps with: sentat/offset/legacy are relative to it
        data = json.dumps([[0, "n", 1], [10, "n", 2], [20, "n", 3]])
        answer = yield self.post("input/bulk.json", data=data, time=str(T0))
        self.assertEqual(answer.body, b"ok")
        yield drain(self.node)
        inp = yield self.set_processlist("n", "1", f"1:{feed.id}")
        answer = yield self.post("input/bulk.json", data=json.dumps([[30, "n", 4], [40, "n", 5], "garbage", [50, {"x": 1}, 6], [60, "n", None, 7]]), time=str(T0))
        self.assertEqual(answer.body, b"ok")  # the malformed frames are refused alone
        yield drain(self.node)
        start, values = self.slots(feed)
        self.assertEqual((start, values), (T0 + 30, [4.0, 5.0]))
        rejected = yield defer.ensureDeferred(self.ctx.refusals.for_user(self.userid))
        self.assertEqual(rejected["counts"], {"malformed_frame": 2})
        self.assertIsNotNone(inp)
        del now

    @defer.inlineCallbacks
    def test_times_outside_32_bits_are_refused_and_do_not_stop_the_queue(self):
        # Such a time cannot be stored (unsigned 32-bit seconds): it once reached the
        # consumer, failed there on every attempt and held up the user's queue.
        feed = yield self.feed()
        answer = yield self.post("input/bulk.json", data=json.dumps([[0, "n", 1]]), time=str(T0))
        self.assertEqual(answer.body, b"ok")
        yield drain(self.node)
        yield self.set_processlist("n", "1", f"1:{feed.id}")
        answer = yield self.post("input/bulk.json", data=json.dumps([[10, "n", 2], [2**32, "n", 3], [-T0 - 1, "n", 4], [20, "n", 5]]), time=str(T0))
        self.assertEqual(answer.body, b"ok")
        post = yield self.post("input/post.json", node="n", csv="6", time=str(2**40))
        message = "Error: time is too far in the future (more than 86400 s ahead of the server's clock)"
        self.assertEqual((post.code, post.json()), (400, {"success": False, "message": message}))
        yield drain(self.node)
        self.assertEqual(self.slots(feed), (T0 + 10, [2.0, 5.0]))
        rejected = yield defer.ensureDeferred(self.ctx.refusals.for_user(self.userid))
        # (one "time_out_of_range" reason before [input] time_future; now as the engines name them, the post counted too)
        self.assertEqual(rejected["counts"], {"time_too_new": 2, "time_too_old": 1})

    @defer.inlineCallbacks
    def test_elements_are_processed_in_bounded_passes_and_nothing_is_lost(self):
        from emond import queue
        from emond.process import consumer as consumer_module

        self.patch(consumer_module, "PASS_PACKETS", 3)  # several commits for one read
        feed = yield self.feed()
        answer = yield self.post("input/bulk.json", data=json.dumps([[0, "n", 0, 0]]), time=str(T0))
        self.assertEqual(answer.body, b"ok")
        yield drain(self.node)
        yield self.set_processlist("n", "2", f"1:{feed.id}")
        commits = []
        real = queue.Lease.commit
        self.patch(queue.Lease, "commit", lambda lease, stream, ids, commit: commits.append(len(ids)) or real(lease, stream, ids, commit))
        requests = [self.post("input/bulk.json", data=json.dumps([[10 * i, "n", i, i + 0.5]]), time=str(T0)) for i in range(1, 41)]
        answers = yield defer.gatherResults(requests)
        self.assertEqual({a.body for a in answers}, {b"ok"})
        yield drain(self.node)
        self.assertGreater(len(commits), 1)
        self.assertLessEqual(max(commits), 3)  # elements of at least one packet each: at most 3 per pass
        self.assertEqual(self.slots(feed), (T0 + 10, [i + 0.5 for i in range(1, 41)]))

    @defer.inlineCallbacks
    def test_compressed_bodies(self):
        feed = yield self.feed()
        yield self.post("input/post.json", node="z", csv="0", time=str(T0 - 100))
        yield drain(self.node)
        yield self.set_processlist("z", "1", f"1:{feed.id}")
        # one frame per form (zlib body, gzip body, hex of zlib), each its own time and value
        data = [json.dumps([[T0 + 10 * k, "z", value]]).encode() for k, value in enumerate((1.5, 2.5, 3.5))]
        for body in (zlib.compress(data[0]), gzip.compress(data[1])):
            answer = yield self.node.request("POST", f"input/bulk.json?cb=1&time=0&apikey={self.keys['apikey_write']}", data=body)
            self.assertEqual(answer.body, b"ok", answer)
        hexed = yield self.post("input/bulk.json", c="1", data=zlib.compress(data[2]).hex(), time="0")
        self.assertEqual(hexed.body, b"ok")
        yield drain(self.node)
        self.assertEqual(self.slots(feed), (T0, [1.5, 2.5, 3.5]))  # every form reached the feed file
        bomb = zlib.compress(b"[" + b" " * (20 << 20) + b"]")
        refused = yield self.node.request("POST", f"input/bulk.json?cb=1&apikey={self.keys['apikey_write']}", data=bomb)
        self.assertEqual(refused.code, 413)
        broken = yield self.node.request("POST", f"input/bulk.json?cb=1&apikey={self.keys['apikey_write']}", data=b"not zlib")
        self.assertEqual(broken.code, 400)

    @defer.inlineCallbacks
    def test_log_to_feed_and_kwh_through_real_posts(self):
        power = yield self.feed("power")
        kwh = yield self.feed("kwh")
        yield self.post("input/post.json", node="tx", fulljson='{"p":0}', time=str(T0 - 100))
        yield drain(self.node)
        yield self.set_processlist("tx", "p", f"1:{power.id},4:{kwh.id}")
        for i in range(6):
            answer = yield self.post("input/post.json", node="tx", fulljson=json.dumps({"p": 3600 * (i + 1)}), time=str(T0 + 10 * i))
            self.assertEqual(answer.code, 200)
        yield drain(self.node)
        self.assertEqual(self.slots(power), (T0, [3600.0, 7200.0, 10800.0, 14400.0, 18000.0, 21600.0]))
        # kWh: first packet starts at 0 (no last value), then + 10 s * P / 3.6e6
        self.assertEqual(self.slots(kwh), (T0, [0.0, 0.02, 0.05, 0.09, 0.14, 0.2]))
        # a device retry of the same packets changes nothing
        for i in range(6):
            yield self.post("input/post.json", node="tx", fulljson=json.dumps({"p": 3600 * (i + 1)}), time=str(T0 + 10 * i))
        yield drain(self.node)
        self.assertEqual(self.slots(kwh), (T0, [0.0, 0.02, 0.05, 0.09, 0.14, 0.2]))

    @defer.inlineCallbacks
    def test_oversized_body(self):
        answer = yield self.node.request("POST", f"input/post.json?apikey={self.keys['apikey_write']}", data={"csv": "1," * 600000})
        self.assertEqual(answer.code, 413)

    @defer.inlineCallbacks
    def test_redis_down_is_503(self):
        """Redis stopped (the real server frozen with SIGSTOP): never ``ok``, 503 instead."""
        node = yield NodeHarness.start(self, "sqlite", redis_timeout=0.5)
        keys = (yield node.post("user/register.json", data={"username": "frozen", "password": "secret1", "email": "f@example.org"})).json()
        params = {"apikey": keys["apikey_write"], "node": "x", "csv": "1"}
        before = yield node.request("POST", "input/post.json", params=params)
        self.assertEqual(before.body, b"ok")
        info = yield defer.ensureDeferred(node.ctx.redis.call("INFO", "server"))
        pid = int(re.search(rb"process_id:(\d+)", info).group(1))
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        try:
            during = yield node.request("POST", "input/post.json", params=params)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertEqual(during.code, 503)
        self.assertNotEqual(during.body, b"ok")
        self.assertEqual(during.json()["success"], False)
        after = yield node.request("POST", "input/post.json", params=params)
        self.assertEqual(after.body, b"ok")

class ConcurrencyTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_32_concurrent_clients_leave_no_empty_slot(self):
        node = yield NodeHarness.start(self, "sqlite", "[input]\nrate_limit = 0.0\n")
        keys = (yield node.post("user/register.json", data={"username": "many", "password": "secret1", "email": "m@example.org"})).json()
        key = keys["apikey_write"]
        ctx = node.ctx
        feed = yield defer.ensureDeferred(ctx.feeds.create(keys["userid"], "f", "", 1, 5, 10, 0))
        yield defer.ensureDeferred(ctx.store.create(feed))
        yield node.request("POST", "input/post.json", params={"apikey": key, "node": "n", "csv": "0", "time": str(T0 - 10)})
        yield drain(node)
        inputs = yield defer.ensureDeferred(ctx.inputs.list(keys["userid"]))
        yield defer.ensureDeferred(ctx.inputs.change_processlist(keys["userid"], inputs[0].id, lambda _: (None, f"1:{feed.id}")))
        yield defer.ensureDeferred(ctx.redis.call("INCR", user_version_key(keys["userid"])))

        @defer.inlineCallbacks
        def client(k):
            for j in range(10):
                slot = k + 32 * j
                answer = yield node.request(
                    "POST", "input/post.json", params={"apikey": key, "node": "n", "csv": str(slot), "time": str(T0 + 10 * slot)}
                )
                self.assertEqual(answer.body, b"ok")

        yield defer.gatherResults([client(k) for k in range(32)], consumeErrors=True)
        yield drain(node)
        engine = PHPFina(os.path.join(node.config.node.datadir, "phpfina"), sync=False)
        self.addCleanup(engine.close)
        start, interval, data = engine.raw(feed.id)
        self.assertEqual((start, len(data)), (T0, 320))
        self.assertEqual(data.tolist(), [float(i) for i in range(320)])  # every slot filled, none empty


class OpsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_health_and_metrics(self):
        node = yield NodeHarness.start(self, "sqlite")
        keys = (yield node.post("user/register.json", data={"username": "ops", "password": "secret1", "email": "o@example.org"})).json()
        yield node.request("POST", "input/post.json", params={"apikey": keys["apikey_write"], "node": "n", "csv": "1,2"})
        yield node.request("POST", "input/post.json", params={"apikey": keys["apikey_write"], "node": "bad$", "csv": "1"})
        yield drain(node)
        yield defer.ensureDeferred(node.service.getServiceNamed("pipeline").getServiceNamed("monitor").sample())
        health = yield node.get("health")
        self.assertEqual(health.code, 200, health)
        body = health.json()
        for part in ("redis_client", "database", "storage", "senders", "queues"):
            self.assertTrue(body[part]["ok"], (part, body))
        self.assertEqual(body["queues"]["input"]["length"], 0)
        self.assertIn("0", body["queues"]["storage"])
        metrics = yield node.get("metrics")
        text = metrics.body.decode()
        self.assertIn('emond_http_requests_total{code="200",route="input/post"} 1.0', text)
        self.assertIn('emond_http_requests_total{code="400",route="input/post"} 1.0', text)
        self.assertIn("emond_input_frames_accepted_total 1.0", text)
        self.assertIn("emond_packets_processed_total 1.0", text)
        self.assertIn('emond_queue_length{kind="input",queue="0"}', text)

    @defer.inlineCallbacks
    def test_input_limits_are_refused_and_counted(self):
        node = yield NodeHarness.start(self, "sqlite", "[input]\nmax_nodes = 2\nmax_inputs = 3\n")
        keys = (yield node.post("user/register.json", data={"username": "lim", "password": "secret1", "email": "l@example.org"})).json()
        key = keys["apikey_write"]
        for node_name, csv in (("a", "1,2"), ("b", "1"), ("c", "1"), ("a", "1,2,3")):
            answer = yield node.request("POST", "input/post.json", params={"apikey": key, "node": node_name, "csv": csv, "time": str(T0)})
            self.assertEqual(answer.body, b"ok")
        yield drain(node)
        inputs = yield defer.ensureDeferred(node.ctx.inputs.list(keys["userid"]))
        self.assertEqual(sorted((i.nodeid, i.name) for i in inputs), [("a", "1"), ("a", "2"), ("b", "1")])
        rejected = yield defer.ensureDeferred(node.ctx.refusals.for_user(keys["userid"]))
        self.assertEqual(rejected["counts"], {"node_limit": 1, "input_limit": 1})
        self.assertEqual(
            sorted((r["node"], r["input"], r["reason"]) for r in rejected["last"]),
            [("a", "3", "input_limit"), ("c", "1", "node_limit")],
        )

    @defer.inlineCallbacks
    def test_rate_limit_is_429_with_retry_after(self):
        node = yield NodeHarness.start(self, "sqlite", "[input]\nrate_limit = 0.5\nrate_burst = 2\n")
        keys = (yield node.post("user/register.json", data={"username": "ratelim", "password": "secret1", "email": "r@example.org"})).json()
        codes = []
        for _ in range(3):
            answer = yield node.request("POST", "input/post.json", params={"apikey": keys["apikey_write"], "node": "n", "csv": "1"})
            codes.append(answer.code)
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(answer.headers.getRawHeaders(b"retry-after"), [b"2"])
        self.assertEqual(answer.json()["success"], False)


class FeedThroughPostsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_posted_feed_reads_back_and_matches_engine_files(self):
        node = yield NodeHarness.start(self, "sqlite", "[input]\nrate_limit = 0.0\n")
        keys = (yield node.post("user/register.json", data={"username": "reader", "password": "secret1", "email": "r@example.org"})).json()
        key = keys["apikey_write"]
        created = yield node.request("POST", "feed/create.json", params={"apikey": key, "name": "power", "engine": "5", "options": '{"interval":10}', "server": "0"})
        feedid = created.json()["feedid"]
        yield node.request("POST", "input/post.json", params={"apikey": key, "node": "tx", "csv": "0", "time": str(T0 - 50)})
        yield drain(node)
        inputs = (yield node.request("GET", "input/list.json", params={"apikey": key})).json()
        answer = yield node.request("POST", f"input/process/set.json?inputid={inputs[0]['id']}", params={"apikey": key}, data={"processlist": f"1:{feedid}"})
        self.assertEqual(answer.json()["success"], True, answer)
        points = [(T0 + 10 * i + (i % 7), round(230 + (i * 13) % 17 * 0.7, 1)) for i in range(60) if i % 9 != 4]
        for t, v in points:
            yield node.request("POST", "input/post.json", params={"apikey": key, "node": "tx", "csv": str(v), "time": str(t)})
        yield drain(node)
        data = yield node.request("GET", "feed/data.json", params={"apikey": key, "id": str(feedid), "start": str(T0 * 1000), "end": str((T0 + 590) * 1000), "interval": "10", "skipmissing": "0"})
        expected_engine = PHPFina(self.mktemp(), clock=lambda: T0, sync=False)
        self.addCleanup(expected_engine.close)
        expected_engine.create(feedid, 10)
        expected_engine.write(feedid, [t for t, _ in points], [v for _, v in points])
        series = expected_engine.query(feedid, DataQuery(start=T0, end=T0 + 590, interval=10))
        expected = [[t * 1000, None if v != v else v] for t, v in zip(series.times.tolist(), series.values.tolist())]
        self.assertEqual(data.json(), expected)
        self.assertIn(None, [v for _, v in data.json()])  # the skipped posts are gaps
        for suffix in (".meta", ".dat"):
            with open(os.path.join(node.config.node.datadir, "phpfina", f"{feedid}{suffix}"), "rb") as a:
                with open(os.path.join(expected_engine.directory, f"{feedid}{suffix}"), "rb") as b:
                    self.assertEqual(a.read(), b.read(), suffix)


class PoisonTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_an_element_that_keeps_failing_is_set_aside_not_lost(self):
        node = yield NodeHarness.start(self, "sqlite")
        consumer = node.service.getServiceNamed("pipeline").getServiceNamed("consumer")
        from emond.keys import input_stream
        from emond.queue import encode_groups

        self.patch(consumer.reader, "poison_after", 2)
        self.patch(consumer.reader, "retry_delay", 0)  # retries happen at once in this test
        bad = b"j[[1, 1700000000, 42, 17]]"  # not a packet: the values are not an object
        good = encode_groups([[1, 0.0, T0, [[0, "n", {"a": 1.0}]]]])
        queue = consumer.layout.queue_for(1)
        before = encode_groups([[1, 0.0, T0 - 10, [[0, "n", {"b": 1.0}]]]])
        yield defer.ensureDeferred(node.ctx.redis.pipeline([
            ("XADD", input_stream(queue), "*", "p", before),  # read with the bad one: it must not be set aside
            ("XADD", input_stream(queue), "*", "p", bad),
            ("XADD", input_stream(queue), "*", "p", good),
        ]))
        yield drain(node)
        dead = yield defer.ensureDeferred(node.ctx.redis.call("XRANGE", f"emond:dead:{input_stream(queue)}", "-", "+"))
        self.assertEqual(len(dead), 1)
        self.assertEqual(dict(zip(dead[0][1][::2], dead[0][1][1::2]))[b"p"], bad)
        length = yield defer.ensureDeferred(node.ctx.redis.call("XLEN", input_stream(queue)))
        self.assertEqual(int(length), 0)  # the good element behind it was processed
        inputs = yield defer.ensureDeferred(node.ctx.inputs.list(1))
        self.assertEqual(sorted(i.name for i in inputs), ["a", "b"])
        # each failed attempt was logged: two alone, and one more if the first read held both
        self.assertIn(len(self.flushLoggedErrors(ValueError)), (2, 3))
