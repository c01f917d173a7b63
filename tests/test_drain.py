"""SIGTERM is a graceful drain within ``[node] drain_timeout``, and exit status 0.

A real ``twistd emond`` (its private Redis, SQLite, a PHPTimeSeries feed) takes a constant
load of posts from several clients, some on kept-alive connections, when it gets SIGTERM: it
must end within the budget with status 0, having logged no error, and every point a device
was told ``ok`` for must be in the feed's file once the node has run again (what the stop
left in Redis is processed then). A node whose Redis is frozen cannot finish its drain (its
queue readers cannot give their leases up): it still ends within the budget with status 0 and
says what it abandoned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time

import numpy as np
import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.support import free_port, require_program
from tests.support.daemon import started, stop_private_redis
from tests.support.node import NodeClient
from tests.support.poll import until
from tests.support.servers import private_redis

BUDGET = 6.0  # [node] drain_timeout of these tests
EXIT_SLACK = 2.0  # seconds of interpreter exit after the stop has ended
CLIENTS = 6  # posting at once: half on kept-alive connections, half on a new one per post
ERRORS = re.compile(rb"#(error|critical)\]|Traceback|Unhandled")


def series(path: str) -> set[tuple[int, float]]:
    """The (time, value) records of a PHPTimeSeries file (9 bytes each: flag, uint32 time,
    float32 value, little-endian)."""
    with open(path, "rb") as f:
        raw = f.read()
    records = np.frombuffer(raw[: len(raw) // 9 * 9], dtype=np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")]))
    return {(int(t), float(v)) for t, v in zip(records["t"], records["v"])}


class Load:
    """Clients posting ``input/post`` without pause, each point a new time; what was
    answered ``ok`` (acknowledged), and how the rest ended."""

    def __init__(self, base: str, key: str, start: int) -> None:
        self.base = base
        self.key = key
        self.next_time = start
        self.acked: set[tuple[int, float]] = set()
        self.other: dict[str, int] = {}
        self.running = True
        self.pool = HTTPConnectionPool(reactor, persistent=True)

    async def client(self, kept_alive: bool) -> None:
        while self.running:
            when = self.next_time
            self.next_time += 1
            value = float(when % 100_000)
            url = f"{self.base}input/post.json?node=load&time={when}&fulljson=" + json.dumps({"p": value}) + f"&apikey={self.key}"
            try:
                response = await (treq.post(url, pool=self.pool) if kept_alive else treq.post(url, persistent=False))
                body = await response.content()
            except Exception as e:  # refused once the port is closed, or a connection closed under it
                self.count(type(e).__name__)
                if "ConnectionRefused" in type(e).__name__:
                    return
                continue
            if response.code == 200 and body == b'{"success": true}':
                self.acked.add((when, value))
            else:
                self.count(f"{response.code} {body[:60]!r}")

    def count(self, what: str) -> None:
        self.other[what] = self.other.get(what, 0) + 1


class DrainTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        require_program("redis-server")
        # A short folder: the private Redis's socket path must fit a Unix socket.
        self.dir = tempfile.mkdtemp(prefix="emond-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(stop_private_redis, os.path.join(self.dir, "var"))
        self.port = free_port()
        self.node = NodeClient(f"http://127.0.0.1:{self.port}/")

    def config(self, extra: str = "") -> str:
        path = os.path.join(self.dir, "emond.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\nhttp = "tcp:{self.port}:interface=127.0.0.1"\ndatadir = "var"\ndrain_timeout = {BUDGET}\n'
                f'[database]\nurl = "sqlite:///var/emond.db"\n[input]\nrate_limit = 0.0\n{extra}'
            )
        return path

    def start(self, path: str):
        return started(self, "emond", path, self.dir, "node API ready", "Site starting on")

    @defer.inlineCallbacks
    def call(self, path: str, **params):
        answer = yield self.node.post(path, **params)
        self.assertEqual(answer.code, 200, answer)
        return answer.json() if answer.body not in (b"ok",) else answer.body

    @defer.inlineCallbacks
    def user_with_feed(self, first: int):
        """A user whose input load:p is logged to a PHPTimeSeries feed: (write key, feed id)."""
        keys = yield self.call("user/register.json", username="loaded", password="secret123", email="l@example.org")
        key = keys["apikey_write"]
        feed = (yield self.call("feed/create.json", apikey=key, name="p", tag="load", engine="2"))["feedid"]
        yield self.call("input/post.json", apikey=key, node="load", fulljson='{"p": 0}', time=str(first - 1))
        inputs: list = []

        async def created() -> bool:  # once the consumer has processed that post
            inputs[:] = await self.call("input/list.json", apikey=key)
            return bool(inputs)

        yield until(created, 30, "the input created")
        yield self.call("input/process/set.json", apikey=key, inputid=str(inputs[0]["id"]), processlist=f"1:{feed}")
        return key, feed

    @defer.inlineCallbacks
    def test_sigterm_under_load_loses_no_acknowledged_point(self):
        path = self.config()
        daemon = yield self.start(path)
        first = int(time.time()) - 30 * 86400
        key, feed = yield self.user_with_feed(first)
        load = Load(self.node.base, key, first)
        self.addCleanup(load.pool.closeCachedConnections)
        clients = [defer.ensureDeferred(load.client(kept_alive=i % 2 == 0)) for i in range(CLIENTS)]
        yield until(lambda: len(load.acked) >= 300, 60, "300 points acknowledged")
        logged_before = len(daemon.output)
        signalled = time.monotonic()
        status = yield daemon.signal(signal.SIGTERM)
        took = time.monotonic() - signalled
        load.running = False
        yield defer.gatherResults(clients)
        during = daemon.output[logged_before:]
        self.assertEqual(status, 0, daemon.output[-3000:].decode(errors="replace"))
        self.assertLess(took, BUDGET + EXIT_SLACK)
        self.assertIn(b"stopped in", during)  # the stop ended within its budget
        self.assertNotIn(b"abandoned", during)
        self.assertIsNone(ERRORS.search(daemon.output), daemon.output[-5000:].decode(errors="replace"))
        self.assertIn("ConnectionRefusedError", load.other)  # the load ran until the port closed
        # What was not answered ok got no answer (its connection closed: the device sends
        # again), or a clean 503; never another error.
        self.assertEqual([k for k in load.other if k[:1].isdigit() and not k.startswith("503 ")], [], load.other)
        # Started again, the node processes what the stop left queued: every acknowledged point
        # is in the feed's file.
        acked = set(load.acked)
        again = yield self.start(path)
        file = os.path.join(self.dir, "var", "phptimeseries", f"feed_{feed}.MYD")
        yield until(lambda: acked <= series(file), 60, f"the {len(acked)} acknowledged points on disk")
        self.assertIsNone(ERRORS.search(again.output))
        self.assertEqual((yield again.signal(signal.SIGTERM)), 0)

    @defer.inlineCallbacks
    def test_drain_that_cannot_end_is_abandoned_within_the_budget(self):
        redis = private_redis()
        self.addCleanup(redis.stop)
        self.addCleanup(redis.thaw)
        daemon = yield self.start(self.config(f'[redis]\nurl = "{redis.server.url}"\ntimeout = 30.0\n'))
        redis.freeze()  # SIGSTOP: every call to Redis now waits (up to its 30 s timeout)
        signalled = time.monotonic()
        status = yield daemon.signal(signal.SIGTERM)
        took = time.monotonic() - signalled
        self.assertEqual(status, 0)
        self.assertLess(took, BUDGET + EXIT_SLACK)
        self.assertGreater(took, BUDGET - 0.5)  # it did wait for the drain
        line = [ln for ln in daemon.output.decode(errors="replace").splitlines() if "abandoned:" in ln]
        self.assertEqual(len(line), 1, daemon.output[-4000:].decode(errors="replace"))
        self.assertIn(f"did not end within its drain_timeout of {BUDGET:g} s", line[0])
        self.assertIn("pipeline", line[0])  # where the stop was: the pipeline waits for Redis
        self.assertIn("nothing acknowledged is lost", line[0])
        self.assertIn("not stopped: ", line[0])  # what comes after the pipeline: the API, storage
