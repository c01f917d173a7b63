"""Storage that never answers stalls nothing else on the node (real processes, real mutual TLS).

A node hosts storage location 0 and reaches storage server 1 (a real
``twistd emond-storage``) over the stream. Then storage stops answering, two
ways at once:

- server 1 is frozen (SIGSTOP): connected, silent;
- location 0's disk hangs for one feed: its PHPTimeSeries file is a FIFO
  nobody writes to, so opening it blocks, as on a hung mount, holding the
  PHPTimeSeries engine's lock.

With reads of both pending (and held open), ``input/post`` and
``user/login`` answer at once, and the writes to a PHPFina feed of location 0
go on (its write thread is not its read threads); a read beyond location
0's read threads and read queue is refused at once (503). When storage
answers again, every pending read is answered. A storage server's own full
read queue is a 503 at the node, at once, as well.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import treq
from twisted.internet import defer
from twisted.trial import unittest

from tests.support import free_port, redis_server
from tests.support.daemon import remote_node_config, remote_storage_config, started

T0 = 1_700_000_000
QUICK = 1.0  # seconds: a generous bound for an answer that waits on nothing
READS = 12  # pending reads of each frozen storage: more than the 10 threads of Twisted's default pool
READ_THREADS, READ_QUEUE = 4, 8  # location 0: 4 + 8 = 12 reads in hand, the 13th refused


class StalledStorageTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        redis_server().flushall()
        self.writers: list[int] = []  # FIFO descriptors held open, closed last
        self.addCleanup(lambda: [os.close(fd) for fd in self.writers])
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        stream_port, self.storage_http, self.http = free_port(), free_port(), free_port()
        self.storage_config = remote_storage_config(self.base, stream_port, self.storage_http)
        self.node_config = remote_node_config(
            self.base, self.http, stream_port, f"redis://127.0.0.1:{redis_server().port}/5",
            f"[input]\nqueues = 1\nrate_limit = 0.0\n"
            f"[feeds]\nread_timeout = 120.0\n"  # the frozen reads stay pending
            f"[engines]\nwindow_past = 2000000000\nread_threads = {READ_THREADS}\nread_queue = {READ_QUEUE}\n",
        )

    def start(self, plugin, config, *ready):
        return started(self, plugin, config, self.base, *ready)

    @defer.inlineCallbacks
    def request(self, path, method="POST", timeout=None, **params):
        """(status, JSON body, seconds to answer)."""
        began = time.monotonic()
        url = f"http://127.0.0.1:{self.http}/{path}"
        response = yield treq.request(method, url, params=params, persistent=False, timeout=timeout)
        body = yield response.content()
        took = time.monotonic() - began
        return response.code, (json.loads(body) if body not in (b"ok", b"") else body), took

    @defer.inlineCallbacks
    def call(self, path, **params):
        code, body, _ = yield self.request(path, **params)
        self.assertEqual(code, 200, (path, body))
        return body

    @defer.inlineCallbacks
    def quick(self, path, method="POST", **params):
        """An answer that must come at once: 200, within QUICK seconds (no answer in 10 s fails)."""
        code, body, took = yield self.request(path, method, timeout=10, **params)
        self.assertEqual(code, 200, (path, body))
        self.assertLess(took, QUICK, (path, took))
        return body

    @defer.inlineCallbacks
    def metric(self, name, port=None, **labels):
        response = yield treq.get(f"http://127.0.0.1:{port or self.http}/metrics", persistent=False)
        text = (yield response.content()).decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            if line.startswith(name + "{") and all(part in line for part in wanted):
                return float(line.rsplit(" ", 1)[1])
        return None

    @defer.inlineCallbacks
    def until_metric(self, value, name, port=None, **labels):
        """Ask /metrics (the node's, or ``port``'s) again until ``name`` reads ``value``
        (each ask is one round trip)."""
        deadline = time.monotonic() + 30
        while (yield self.metric(name, port, **labels)) != value:
            self.assertLess(time.monotonic(), deadline, f"{name} {labels} never reached {value}")

    @defer.inlineCallbacks
    def test_frozen_storage_delays_neither_posts_nor_logins_nor_writes(self):
        storage = yield self.start("emond-storage", self.storage_config, "storage 1 open on", "Site starting on")
        node = yield self.start("emond", self.node_config, "node API ready", "stream to storage 1 up", "storage 0 open on")
        keys = yield self.call("user/register.json", username="stall", password="secret1", email="s@example.org")
        self.key = keys["apikey_write"]
        feeds = {}
        for name, engine, server in (("hung", 2, 0), ("remote", 5, 1), ("kept", 5, 0)):
            created = yield self.call("feed/create.json", apikey=self.key, name=name, engine=str(engine), options='{"interval":10}', server=str(server))
            feeds[name] = created["feedid"]
        yield self.call("input/post.json", apikey=self.key, node="n", csv="1", time=str(T0))
        yield node.logged("input queues drained")
        inputs = yield self.call("input/list.json", apikey=self.key)
        yield self.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=self.key, processlist=f"1:{feeds['kept']}")
        yield self.call("input/post.json", apikey=self.key, node="n", csv="1", time=str(T0 + 10))
        yield self.until_metric(1, "emond_points_written_total", server="0")

        # Location 0's disk hangs for one feed: its file becomes a FIFO that nobody writes to.
        fifo = os.path.join(self.base, "local", "phptimeseries", f"feed_{feeds['hung']}.MYD")
        os.remove(fifo)
        os.mkfifo(fifo)
        self.addCleanup(self.unblock, fifo)
        storage.transport.signalProcess(signal.SIGSTOP)
        self.addCleanup(lambda: storage.ended.called or storage.transport.signalProcess(signal.SIGCONT))
        window = dict(apikey=self.key, start=str(T0 - 100), end=str(T0 + 1000), interval="10")
        pending = [
            self.request("feed/data.json", "GET", id=str(feeds[name]), **window) for name in ("hung", "remote") for _ in range(READS)
        ]
        # Every frozen read is in hand: the remote ones sent over the stream, the hosted ones
        # held by location 0 (one blocked opening the FIFO, three on the engine's lock, 8 waiting).
        yield self.until_metric(READS, "emond_stream_read_requests_total", server="1", op="query")
        yield self.until_metric(READ_THREADS, "emond_pool_busy", pool="storage0-read")
        yield self.until_metric(READ_QUEUE, "emond_pool_queued", pool="storage0-read")

        for i in range(5):
            answer = yield self.quick("input/post.json", apikey=self.key, node="n", csv=str(i), time=str(T0 + 20 + 10 * i))
            self.assertEqual(answer, b"ok")
        login = yield self.quick("user/login.json", username="stall", password="secret1")
        self.assertTrue(login["success"], login)
        began = time.monotonic()
        yield self.until_metric(6, "emond_points_written_total", server="0")  # the posts reach the disk
        self.assertLess(time.monotonic() - began, 10.0)
        # A read beyond location 0's threads and queue is refused at once.
        code, body, took = yield self.request("feed/data.json", "GET", id=str(feeds["kept"]), **window)
        self.assertEqual((code, body), (503, {"success": False, "message": "storage server 0 is busy, try again shortly"}))
        self.assertLess(took, QUICK)
        self.assertFalse(any(d.called for d in pending))  # every frozen read still waits

        # Storage answers again: every pending read is answered, and the writes made meanwhile are there.
        storage.transport.signalProcess(signal.SIGCONT)
        self.unblock(fifo)
        answers = yield defer.gatherResults(pending)
        self.assertEqual([code for code, _, _ in answers], [200] * (2 * READS), answers)
        code, rows, _ = yield self.request("feed/data.json", "GET", id=str(feeds["kept"]), apikey=self.key, start=str(T0 + 10), end=str(T0 + 60), interval="10")
        self.assertEqual((code, rows[0]), (200, [(T0 + 10) * 1000, 1]), rows)
        self.assertEqual(rows, [[(T0 + 10 * k) * 1000, v] for k, v in zip(range(1, 7), [1, 0, 1, 2, 3, 4])])
        self.assertIn((yield node.signal(signal.SIGTERM)), (0, -signal.SIGTERM))  # pools joined: a clean stop
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_a_remote_servers_full_read_queue_is_a_503_at_once(self):
        """Storage server 1 runs one read at a time and queues none: while its disk hangs on a
        read, the next read is refused by the server and answered 503 by the node at once."""
        with open(self.storage_config, "a") as f:
            f.write("[engines]\nread_threads = 1\nread_queue = 0\n")
        storage = yield self.start("emond-storage", self.storage_config, "storage 1 open on", "Site starting on")
        yield self.start("emond", self.node_config, "node API ready", "stream to storage 1 up")
        keys = yield self.call("user/register.json", username="busy", password="secret1", email="b@example.org")
        self.key = keys["apikey_write"]
        created = yield self.call("feed/create.json", apikey=self.key, name="hung", engine="2", server="1")
        fifo = os.path.join(self.base, "remote", "phptimeseries", f"feed_{created['feedid']}.MYD")
        os.remove(fifo)
        os.mkfifo(fifo)
        self.addCleanup(self.unblock, fifo)
        window = dict(apikey=self.key, id=str(created["feedid"]), start=str(T0), end=str(T0 + 100), interval="10")
        held = self.request("feed/data.json", "GET", **window)
        yield self.until_metric(1, "emond_pool_busy", port=self.storage_http, pool="storage1-read")
        code, body, took = yield self.request("feed/data.json", "GET", **window)
        self.assertEqual((code, body), (503, {"success": False, "message": "storage server 1 is busy, try again shortly"}))
        self.assertLess(took, QUICK)
        self.assertEqual((yield self.metric("emond_pool_refused_total", self.storage_http, pool="storage1-read")), 1.0)
        self.assertFalse(held.called)
        self.unblock(fifo)
        code, _, _ = yield held
        self.assertEqual(code, 200)
        yield storage.signal(signal.SIGTERM)

    def unblock(self, fifo: str) -> None:
        """Opening the FIFO read-write never blocks and makes this process its writer while it
        holds it open: every open of it, pending or to come, returns (an empty file)."""
        if not self.writers and stat.S_ISFIFO(os.stat(fifo).st_mode):
            self.writers.append(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
