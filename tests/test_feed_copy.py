"""Copying a feed's files to another storage server (a user moving to another shard):
``FeedStore.copy`` over the real mutual-TLS stream, both ways between a hosted location and
a storage server, verified with SHA-256 at the source, in transit and at the target.

Expected bytes are the file formats' (emoncms): a PHPFina ``.dat`` is little-endian float32
per slot (NaN for a missing one) and its ``.meta`` is four uint32 (0, 0, interval,
start_time); a PHPTimeSeries ``.MYD`` record is the byte 249, uint32 time, float32 value (``pack("CIf", 249, ...)``).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct

import numpy as np
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.config import EnginesSection, RemoteServer, TLSSection
from emond.engine import FeedError
from emond.errors import Unavailable
from emond.meta.feeds import Feed
from emond.meta.refusals import Refusals
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES
from emond.redis import Redis
from emond.storage.feedstore import FeedStore
from emond.storage.location import StorageLocationService
from emond.storage.remote import LinkMetrics, RemoteLink
from emond.storage.sender import RefusalRecorder
from tests.support import redis_server
from tests.support.storage import start_storage

T0 = 1_700_000_000


def fina_bytes(values: list[float]) -> bytes:
    return b"".join(struct.pack("<f", v) for v in values)


def myd_bytes(points: list[tuple[int, float]]) -> bytes:
    return b"".join(struct.pack("<BIf", 249, t, v) for t, v in points)


class FeedCopyTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        storage = yield start_storage(self)
        port, tls, self.remote_dir, self.remote = storage.port, storage.tls, storage.datadir, storage.engines
        base = os.path.abspath(self.mktemp())
        self.local_dir = os.path.join(base, "local")
        location = StorageLocationService(0, self.local_dir, EnginesSection(), reactor)
        location.startService()
        self.addCleanup(location.stopService)
        self.local = yield location.opened

        url = f"redis://127.0.0.1:{redis_server().port}/7"
        redis, blocking = Redis.connect(url, 5.0, reactor), Redis.connect(url, 6.0, reactor, poolsize=1)
        self.addCleanup(redis.disconnect)
        self.addCleanup(blocking.disconnect)
        recorder = RefusalRecorder(Refusals(redis, CollectorRegistry()), lambda feeds: defer.succeed({}))
        link = RemoteLink(
            1, RemoteServer(endpoint=f"tcp:127.0.0.1:{port}", name="storage1"),
            TLSSection(ca=os.path.join(tls, "ca.pem"), cert=os.path.join(tls, "node0.pem")),
            "node0", redis, blocking, recorder, LinkMetrics(CollectorRegistry()), reactor,
        )
        link.startService()
        self.addCleanup(link.stopService)
        yield defer.ensureDeferred(link.ready())
        self.store = FeedStore({0: location}, reactor)
        self.store.remotes[1] = link

    def feed(self, feedid: int, engine: int, server: int, interval: int = 10) -> Feed:
        return Feed(feedid, 1, f"f{feedid}", "", 1, 0, engine, server, interval, "")

    def read(self, *parts: str) -> bytes:
        with open(os.path.join(*parts), "rb") as f:
            return f.read()

    @defer.inlineCallbacks
    def test_a_phpfina_feed_goes_to_a_remote_server_byte_for_byte(self):
        self.local.phpfina.create(5, 10)
        self.local.phpfina.write(5, [T0, T0 + 20, T0 + 30], [1.5, 2.25, -7.0])  # slot T0+10 missing
        expected = fina_bytes([1.5, math.nan, 2.25, -7.0])
        report = yield defer.ensureDeferred(self.store.copy(self.feed(5, ENGINE_PHPFINA, 0), 1))
        self.assertEqual(report, (16, hashlib.sha256(expected).hexdigest()))
        self.assertEqual(self.read(self.remote_dir, "phpfina", "5.dat"), expected)
        self.assertEqual(self.read(self.remote_dir, "phpfina", "5.meta"), struct.pack("<IIII", 0, 0, 10, T0))
        self.assertFalse(os.path.exists(os.path.join(self.remote_dir, "phpfina", "5.dat.incoming")))
        # the copy reads and takes writes like any feed there
        moved = self.feed(5, ENGINE_PHPFINA, 1)
        last = yield defer.ensureDeferred(self.store.lastvalue(moved))
        self.assertEqual(last, (T0 + 30, -7.0))
        self.remote.phpfina.write(5, [T0 + 40], [8.0])
        self.assertEqual(self.read(self.remote_dir, "phpfina", "5.dat"), expected + fina_bytes([8.0]))

    @defer.inlineCallbacks
    def test_a_phptimeseries_feed_comes_back_from_a_remote_server(self):
        points = [(T0 + 3, 1.0), (T0 + 17, 2.5), (T0 + 400, -1.25)]
        self.remote.phptimeseries.create(6)
        self.remote.phptimeseries.write(6, [t for t, _ in points], [v for _, v in points])
        report = yield defer.ensureDeferred(self.store.copy(self.feed(6, ENGINE_PHPTIMESERIES, 1), 0))
        expected = myd_bytes(points)
        self.assertEqual(report, (len(expected), hashlib.sha256(expected).hexdigest()))
        self.assertEqual(self.read(self.local_dir, "phptimeseries", "feed_6.MYD"), expected)

    @defer.inlineCallbacks
    def test_a_year_of_ten_second_data_crosses_in_many_chunks(self):
        n = 3_153_600  # one year at 10 s: 12.6 MB, many read requests and receive windows
        values = (np.arange(n) % 1000).astype("<f4")
        self.local.phpfina.create(7, 10)
        self.local.phpfina.write(7, T0 + 10 * np.arange(n), values)
        report = yield defer.ensureDeferred(self.store.copy(self.feed(7, ENGINE_PHPFINA, 0), 1))
        self.assertEqual(report.size, 4 * n)
        self.assertEqual(self.read(self.remote_dir, "phpfina", "7.dat"), values.tobytes())

    @defer.inlineCallbacks
    def test_running_a_copy_again_replaces_what_an_interrupted_one_left(self):
        self.local.phpfina.create(8, 10)
        self.local.phpfina.write(8, [T0, T0 + 10], [1.0, 2.0])
        self.remote.phpfina.receive(8, 0, b"\x00" * 4000)  # an earlier attempt, cut short
        self.remote.phpfina.receive(8, 4000, b"\x01" * 4000)
        yield defer.ensureDeferred(self.store.copy(self.feed(8, ENGINE_PHPFINA, 0), 1))
        self.assertEqual(self.read(self.remote_dir, "phpfina", "8.dat"), fina_bytes([1.0, 2.0]))
        yield defer.ensureDeferred(self.store.copy(self.feed(8, ENGINE_PHPFINA, 0), 1))  # and again: the same
        self.assertEqual(self.read(self.remote_dir, "phpfina", "8.dat"), fina_bytes([1.0, 2.0]))

    @defer.inlineCallbacks
    def test_a_copy_whose_target_is_lost_fails_saying_so(self):
        n = 100_000  # 400 kB: the first piece alone, then windows of pieces at once
        self.local.phpfina.create(10, 10)
        self.local.phpfina.write(10, T0 + 10 * np.arange(n), np.ones(n, dtype="<f4"))
        link, receive = self.store.remotes[1], self.store._receive

        async def receive_then_lose(feed, offset, data):
            await receive(feed, offset, data)
            if link.protocol is not None:  # the storage server gone after the first piece
                link.protocol.transport.abortConnection()

        self.store._receive = receive_then_lose
        error = yield self.assertFailure(defer.ensureDeferred(self.store.copy(self.feed(10, ENGINE_PHPFINA, 0), 1)), Unavailable)
        self.assertIn("storage server 1", str(error))
        self.assertFalse(os.path.exists(os.path.join(self.remote_dir, "phpfina", "10.dat")))

    def test_a_garbled_or_short_copy_is_never_installed(self):
        engine = self.remote.phpfina
        engine.create(9, 10)
        engine.write(9, [T0], [4.0])
        good = fina_bytes([1.0, 2.0])
        engine.receive(9, 0, good[:4])  # short
        error = self.assertRaises(FeedError, engine.adopt, 9, 8, hashlib.sha256(good).hexdigest(), [10, T0])
        self.assertIn("is not the one sent", str(error))
        engine.receive(9, 0, fina_bytes([1.0, 3.0]))  # garbled
        self.assertRaises(FeedError, engine.adopt, 9, 8, hashlib.sha256(good).hexdigest(), [10, T0])
        self.assertRaises(FeedError, engine.adopt, 9, 8, hashlib.sha256(good).hexdigest(), [10, T0])  # nothing left to adopt
        # the feed there is untouched
        self.assertEqual(self.read(self.remote_dir, "phpfina", "9.dat"), fina_bytes([4.0]))
        self.assertEqual(engine.lastvalue(9), (T0, 4.0))

    @defer.inlineCallbacks
    def test_bad_receive_requests_are_refused_over_the_stream(self):
        link = self.store.remotes[1]
        for args, message in (
            ([-1, ""], "offset must be a whole number"),
            ([0, "not base64!"], "not valid base64"),
            ([0, "A" * 60_004], "at most 45000 bytes"),
        ):
            error = yield self.assertFailure(defer.ensureDeferred(link.request("receive", 3, ENGINE_PHPFINA, *args, timeout=10)), Exception)
            self.assertIn(message, str(error))

    @defer.inlineCallbacks
    def test_a_feed_with_no_file_is_not_found(self):
        yield self.assertFailure(defer.ensureDeferred(self.store.copy(self.feed(99, ENGINE_PHPFINA, 0), 1)), FeedError)
