"""Crash safety with real ``twistd emond`` processes over a real private Redis.

A node killed with SIGKILL while it consumes leaves every acknowledged
packet to the next one, and the files of a logged feed and of a kWh feed
come out byte-identical to a run without the crash. Two nodes sharing the
queues still process each user's packets in order.
"""

from __future__ import annotations

import json
import os
import signal
import struct

import treq
from twisted.internet import defer, reactor
from twisted.python import log
from twisted.trial import unittest

from emond.keys import input_stream, storage_stream
from emond.redis import Redis
from tests.support import free_port, redis_server
from tests.support.daemon import start_daemon

T0 = 1_700_000_000
QUEUES = 4


class Node:
    """One emond daemon on a shared data dir, database and Redis database."""

    def __init__(self, test: unittest.TestCase, base: str, redis_db: int, storage: bool = True, consume: bool = True) -> None:
        self.port = free_port()
        server = redis_server()
        text = (
            f'[node]\nhttp = "tcp:{self.port}:interface=127.0.0.1"\ndatadir = "var"\nstorage = {[0] if storage else []}\n'
            f'[redis]\nurl = "redis://127.0.0.1:{server.port}/{redis_db}"\n[database]\nurl = "sqlite:///emond.db"\n'
            f"[input]\nqueues = {QUEUES}\nlease_ms = 1500\nrate_limit = 0.0\nconsume = {str(consume).lower()}\n"
        )
        self.config = os.path.join(base, f"emond-{self.port}.toml")
        with open(self.config, "w") as f:
            f.write(text)
        self.base = base
        self.test = test
        self.daemon = None

    @defer.inlineCallbacks
    def start(self):
        self.daemon = start_daemon("emond", self.config, self.base)
        self.test.addCleanup(self.daemon.signal, signal.SIGKILL)
        yield self.daemon.logged("node API ready")
        yield self.daemon.logged("Site starting on")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    @defer.inlineCallbacks
    def call(self, path: str, **params):
        response = yield treq.post(self.url(path), params=params, persistent=False)
        body = yield response.content()
        self.test.assertEqual(response.code, 200, (path, body))
        return json.loads(body) if body not in (b"ok",) else body


class CrashTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        redis_server().flushall()
        self.redis_clients = []

    def redis(self, db: int) -> Redis:
        client = Redis.connect(f"redis://127.0.0.1:{redis_server().port}/{db}", 5.0, reactor)
        self.redis_clients.append(client)
        self.addCleanup(client.disconnect)
        return client

    @defer.inlineCallbacks
    def drained(self, node: Node, redis: Redis):
        """Wait until every queue is empty, following the daemon's 'drained' log lines."""
        streams = [input_stream(q) for q in range(QUEUES)] + [storage_stream(0)]
        while True:
            offset = len(node.daemon.output)
            lengths = yield defer.ensureDeferred(redis.pipeline([("XLEN", s) for s in streams]))
            if not any(int(n) for n in lengths):
                return
            yield node.daemon.logged_after("drained", offset)

    @defer.inlineCallbacks
    def scenario(self, name: str, redis_db: int, kill_after: int | None):
        """Register, make a logged and a kWh feed, post 40 bulks of 10 frames; maybe kill mid-run.

        The bulks go through a front node (it only accepts), so that the consuming node
        can be frozen (SIGSTOP) at whatever point it has reached, and killed there with
        the bulk just posted still queued: the kill certainly lands mid-run."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        redis = self.redis(redis_db)
        node = Node(self, base, redis_db)
        yield node.start()
        front = Node(self, base, redis_db, storage=False, consume=False)
        yield front.start()
        keys = yield node.call("user/register.json", username="crash", password="secret1", email="c@example.org")
        key = keys["apikey_write"]
        power = yield node.call("feed/create.json", apikey=key, name="power", engine="5", options='{"interval":10}')
        kwh = yield node.call("feed/create.json", apikey=key, name="kwh", engine="5", options='{"interval":10}')
        yield node.call("input/post.json", apikey=key, node="tx", csv="0", time=str(T0 - 10))
        yield self.drained(node, redis)
        inputs = yield node.call("input/list.json", apikey=key)
        processlist = f"1:{power['feedid']},4:{kwh['feedid']}"
        yield node.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=processlist)
        killed_with_work = None
        for b in range(40):
            frames = [[10 * (10 * b + i), "tx", 1000 + ((b * 10 + i) * 37) % 500] for i in range(10)]
            if b == kill_after:
                node.daemon.signal(signal.SIGSTOP)  # frozen wherever it is; it fires only when the process ends
            yield front.call("input/bulk.json", apikey=key, data=json.dumps(frames), time=str(T0))
            if b == kill_after:
                waiting = yield defer.ensureDeferred(redis.pipeline([("XLEN", input_stream(q)) for q in range(QUEUES)]))
                killed_with_work = sum(int(n) for n in waiting)
                yield node.daemon.signal(signal.SIGKILL)
                node = Node(self, base, redis_db)
                yield node.start()
        yield self.drained(node, redis)
        files = {}
        for feed in (power, kwh):
            for suffix in (".meta", ".dat"):
                with open(os.path.join(base, "var", "phpfina", f"{feed['feedid']}{suffix}"), "rb") as f:
                    files[f"{feed['feedid']}{suffix}"] = f.read()
        yield node.daemon.signal(signal.SIGTERM)
        yield front.daemon.signal(signal.SIGTERM)
        return files, killed_with_work

    @defer.inlineCallbacks
    def test_sigkill_mid_run_loses_nothing(self):
        reference, _ = yield self.scenario("reference", 1, None)
        crashed, waiting = yield self.scenario("crash", 2, 20)
        self.assertEqual(sorted(reference), sorted(crashed))
        for name in reference:
            self.assertEqual(reference[name], crashed[name], name)
        self.assertEqual(len(reference["1.dat"]), 400 * 4)  # 400 frames, no gap
        # the kill landed while packets were still queued: at least bulk 20's element,
        # which the frozen consumer could not take
        self.assertGreaterEqual(waiting, 1)
        log.msg(f"queued input elements at the kill: {waiting}")

    @defer.inlineCallbacks
    def test_a_front_node_only_accepts_and_another_process_consumes(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        redis = self.redis(4)
        front = Node(self, base, 4, consume=False)
        yield front.start()
        keys = yield front.call("user/register.json", username="front", password="secret1", email="f@example.org")
        key = keys["apikey_write"]
        feed = yield front.call("feed/create.json", apikey=key, name="p", engine="5", options='{"interval":10}')
        answer = yield front.call("input/post.json", apikey=key, node="n", csv="5", time=str(T0))
        self.assertEqual(answer, b"ok")
        queued = yield defer.ensureDeferred(redis.pipeline([("XLEN", input_stream(q)) for q in range(QUEUES)]))
        self.assertEqual(sum(int(n) for n in queued), 1)  # accepted and queued
        consumer = Node(self, base, 4, storage=False)
        yield consumer.start()
        yield self.drained(consumer, redis)  # its "input queues drained" (no storage work yet)
        inputs = yield front.call("input/list.json", apikey=key)
        self.assertEqual([(i["nodeid"], i["name"], i["value"]) for i in inputs], [("n", "1", 5.0)])
        yield front.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=f"1:{feed['feedid']}")
        yield front.call("input/post.json", apikey=key, node="n", csv="7.5", time=str(T0 + 10))
        yield self.drained(front, redis)  # its sender's "drained": the value is on disk
        with open(os.path.join(base, "var", "phpfina", f"{feed['feedid']}.dat"), "rb") as f:
            self.assertEqual(struct.unpack("<f", f.read()), (7.5,))
        self.assertNotIn(b"consuming input queue", front.daemon.output)

    @defer.inlineCallbacks
    def test_two_nodes_keep_each_users_order(self):
        """Two consumers share the queues (one is killed half-way); every user's packets stay in order."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        redis = self.redis(3)
        a = Node(self, base, 3)
        yield a.start()
        users = []
        for n in range(4):
            keys = yield a.call("user/register.json", username=f"user{n}", password="secret1", email=f"u{n}@example.org")
            feed = yield a.call("feed/create.json", apikey=keys["apikey_write"], name="last", engine="5", options='{"interval":10}')
            yield a.call("input/post.json", apikey=keys["apikey_write"], node="n", csv="0", time=str(T0 - 100))
            users.append((keys["apikey_write"], feed["feedid"]))
        yield self.drained(a, redis)
        for key, feedid in users:
            inputs = yield a.call("input/list.json", apikey=key)
            yield a.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=f"1:{feedid}")
        b = Node(self, base, 3, storage=False)
        yield b.start()
        yield b.daemon.logged("consuming input queue")  # the queues are shared now
        for i in range(1, 61):
            node = a if i % 2 else b
            for key, _ in users:
                # every packet of a user lands in the same slot: only the last processed one survives
                yield node.call("input/post.json", apikey=key, node="n", csv=str(i), time=str(T0))
            if i == 30:
                yield b.daemon.signal(signal.SIGKILL)
                b = a  # a carries on alone and takes b's queues when their leases lapse
        yield self.drained(a, redis)
        for key, feedid in users:
            with open(os.path.join(base, "var", "phpfina", f"{feedid}.dat"), "rb") as f:
                data = f.read()
            self.assertEqual(len(data), 4)
            self.assertEqual(struct.unpack("<f", data), (60.0,))
        yield a.daemon.signal(signal.SIGTERM)
