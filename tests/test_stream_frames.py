"""The sender's joined batch frames, as pure units: how queue entries are grouped into frames,
how many entries the window lets the reader take, the frames' decoding, and the fast
``last_per_feed`` (each feed's latest stored value after an acknowledgement) against the
plain sort it replaced, on many inputs.

What is expected comes from the stream's promises (emond/stream.py, emond/storage/remote.py):
entries keep their queue order, a frame holds whole entries, at most ``frame_bytes`` of them
unless one entry alone is larger; a feed's disk value is its latest time's last accepted record.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond import keys
from emond.config import RemoteServer, TLSSection
from emond.queue import APPEND_SEQ, Scripts
from emond.records import RECORD, Refusal, make_records
from emond.redis import Redis
from emond.storage.remote import FRAME_BYTES, FrameWindow, LinkMetrics, RemoteLink, frames_of
from emond.storage.sender import last_per_feed
from emond.stream import BATCH, FRAME_LENGTH, MAX_FRAME, FrameProtocol, batch_frame, batch_parts, decode_batch
from tests.support import redis_server
from tests.support.storage import start_storage
from tests.support.poll import until

T0 = int(time.time()) // 10 * 10 - 86400  # within the engines' time window
FEED_A, FEED_B, NO_FEED = 7, 8, 9


def reference_last_per_feed(batch: np.ndarray, refused: set[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """The plain version: drop the refused, then per feed the record with the latest time,
    the last one of that time in the batch."""
    best: dict[int, tuple[int, int, float]] = {}
    for i, (f, t, v) in enumerate(zip(batch["feed"].tolist(), batch["time"].tolist(), batch["value"].tolist())):
        if (f, t) in refused:
            continue
        if f not in best or t >= best[f][0]:
            best[f] = (t, i, v)
    return [(f, t, v) for f, (t, _i, v) in sorted(best.items())]


def entry(n: int, records: int) -> tuple[bytes, dict[bytes, bytes]]:
    return (f"1-{n}".encode(), {b"s": str(n).encode(), b"b": bytes(records * RECORD.itemsize)})


class LastPerFeedTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        feeds=st.lists(st.sampled_from([1, 2, 3, 70, 71, 65_000, 2**20, 2**32 - 1]), min_size=0, max_size=60),
        data=st.data(),
    )
    def test_matches_the_plain_version(self, feeds, data):
        n = len(feeds)
        times = data.draw(st.lists(st.integers(0, 2**32 - 1) | st.sampled_from([100, 110, 120]), min_size=n, max_size=n))
        values = np.arange(n, dtype=np.float32)  # each record's value tells which it is
        batch = make_records(np.array(feeds, dtype=np.uint32), np.array(times, dtype=np.uint32), values)
        pairs = list(zip(feeds, times))
        refused = set(data.draw(st.lists(st.sampled_from(pairs), max_size=5))) if pairs else set()
        self.assertEqual(last_per_feed(batch, refused), reference_last_per_feed(batch, refused))

    def test_many_feeds_far_apart_and_close_together(self):
        rng = np.random.default_rng(14)
        for feeds in (rng.integers(1, 2000, 50_000), rng.integers(1, 2**32, 5_000), np.tile(np.arange(1, 1001), 50)):
            batch = make_records(feeds.astype(np.uint32), rng.integers(0, 50, feeds.shape[0]), rng.random(feeds.shape[0]))
            refused = {(int(f), int(t)) for f, t in zip(batch["feed"][:30], batch["time"][:30])}
            self.assertEqual(last_per_feed(batch, set()), reference_last_per_feed(batch, set()))
            self.assertEqual(last_per_feed(batch, refused), reference_last_per_feed(batch, refused))


class FrameTests(unittest.TestCase):
    def test_entries_are_joined_in_order_up_to_the_frame_size(self):
        entries = [entry(n, size) for n, size in enumerate([3, 3, 3, 10, 1, 1, 20, 2], start=1)]
        groups = frames_of(entries, 7 * RECORD.itemsize)
        # whole entries, in queue order; one larger than a frame goes alone
        self.assertEqual([[int(fields[b"s"]) for _id, fields in group] for group in groups], [[1, 2], [3], [4], [5, 6], [7], [8]])
        self.assertEqual(frames_of([], 100), [])

    def test_the_window_lets_the_reader_take_about_one_frame(self):
        window = FrameWindow(2, 1000, 64)
        self.assertEqual(window.room(), 1)  # nothing seen yet: one entry
        window.seen([100, 90])
        self.assertEqual(window.room(), 10)  # a frame's worth of entries like the largest just read
        window.seen([500])
        self.assertEqual(window.room(), 2)
        window.seen([])
        self.assertEqual(window.room(), 2)
        window.seen([1])
        self.assertEqual(window.room(), 64)  # at most ``entries``
        window.pending.update({1: None, 2: None})
        self.assertEqual((window.frames(), window.room()), (0, 0))  # full: the reader waits

    def test_a_drained_queue_keeps_two_frames_in_flight_a_backlog_the_whole_window(self):
        window = FrameWindow(4, 1000, 64)
        window.pending.update({1: None})
        self.assertEqual(window.room(), 1)
        window.seen([10])  # got what it asked for: more may be queued
        self.assertEqual(window.frames(), 3)
        self.assertEqual(window.room(), 64)
        window.seen([10] * 5)  # fewer than asked: the queue is drained
        self.assertEqual(window.frames(), 1)
        window.pending.update({2: None})
        self.assertEqual((window.frames(), window.room()), (0, 0))  # the next entries wait for an ack, and go out joined
        del window.pending[1]
        self.assertEqual(window.room(), 64)
        window.seen([10] * 64)
        window.pending.update({3: None, 4: None})
        self.assertEqual(window.frames(), 1)  # a backlog: up to the whole window

    def test_a_joined_frame_is_the_frame_of_its_records_together(self):
        a = make_records(7, [100, 110], [1.0, 2.0]).tobytes()
        b = make_records(8, [100], [3.0]).tobytes()

        class Transport:
            written: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.written.append(data)

        protocol = FrameProtocol()
        protocol.transport = Transport()
        data = protocol.send_parts(batch_parts(9, 4, [a, b]))
        self.assertEqual(Transport.written, [data])
        self.assertEqual(data, struct.pack("!I", len(data) - 4) + batch_frame(9, 4, a + b))
        seq, token, records = decode_batch(data[FRAME_LENGTH.size :])
        self.assertEqual((data[4:5], seq, token), (BATCH, 9, 4))
        self.assertEqual(records.tolist(), np.frombuffer(a + b, dtype=RECORD).tolist())
        self.assertLess(FRAME_BYTES + 64, MAX_FRAME)  # a frame of joined entries is never one the server refuses


def wait_for(condition, what: str) -> defer.Deferred:
    return defer.ensureDeferred(until(condition, 30, what))


class Collected:
    """A refusal recorder that keeps what it is given."""

    def __init__(self) -> None:
        self.refusals: list[Refusal] = []

    async def record(self, refusals: list[Refusal]) -> None:
        self.refusals += refusals


class JoinedFramesTests(unittest.TestCase):
    """A link whose queue holds several entries when it reads: they go out joined in fewer frames
    than entries to a real storage server (real mutual TLS, engines on disk), and each entry's
    records land and leave the queue as if sent alone: values on disk in order, the feeds'
    disk values, refusals from a middle entry recorded and left out of the disk values."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        redis_server().flushall()
        self.redis = Redis.connect(redis_server().url, 5.0, reactor)
        self.addCleanup(self.redis.disconnect)
        storage = yield start_storage(self)
        self.tls, self.port, self.datadir, self.engines = storage.tls, storage.port, storage.datadir, storage.engines
        for feed in (FEED_A, FEED_B):
            self.engines.phpfina.create(feed, 10)

    def link(self, registry: CollectorRegistry, recorder: Collected) -> RemoteLink:
        blocking = Redis.connect(redis_server().url, 5.0, reactor, poolsize=1)
        return RemoteLink(
            1, RemoteServer(endpoint=f"tcp:127.0.0.1:{self.port}", name="storage1"),
            TLSSection(ca=os.path.join(self.tls, "ca.pem"), cert=os.path.join(self.tls, "node0.pem")),
            "node0", self.redis, blocking, recorder, LinkMetrics(registry), reactor, block_ms=100,
        )

    @defer.inlineCallbacks
    def test_entries_joined_in_frames_land_as_if_sent_alone(self):
        scripts = Scripts(self.redis)
        entries = [
            make_records([FEED_A, FEED_B], [T0, T0], [1.0, 10.0]),
            make_records([FEED_A, NO_FEED, FEED_B], [T0 + 10, T0 + 10, T0 + 10], [2.0, 99.0, 20.0]),
            make_records([FEED_A], [T0 + 20], [3.0]),
            make_records([FEED_A, FEED_B], [T0 + 10, T0 + 30], [2.5, 40.0]),  # rewrites a slot of entry 2
        ]
        for batch in entries:
            yield defer.ensureDeferred(scripts.run(APPEND_SEQ, [keys.storage_stream(1), keys.storage_seq(1)], [batch.tobytes()]))
        registry = CollectorRegistry()
        recorder = Collected()
        link = self.link(registry, recorder)
        link.window.seen([RECORD.itemsize])  # as after a read of small entries: the next read takes them all
        link.startService()
        self.addCleanup(lambda: link.stopService() if link.running else None)
        yield link.idle()
        yield link.stopService()

        frames = registry.get_sample_value("emond_stream_batches_sent_total", {"server": "1"})
        self.assertEqual(frames, 1.0)  # the four entries in one frame
        self.assertEqual(registry.get_sample_value("emond_stream_points_sent_total", {"server": "1"}), 8.0)
        self.assertEqual(int((yield defer.ensureDeferred(self.redis.call("XLEN", keys.storage_stream(1))))), 0)
        self.assertEqual(self.values(FEED_A), [1.0, 2.5, 3.0])  # the later record of a slot wins
        self.assertEqual(self.values(FEED_B), [10.0, 20.0, None, 40.0])
        self.assertEqual(recorder.refusals, [Refusal(NO_FEED, T0 + 10, "no_feed")])
        for feed, (when, value) in ((FEED_A, (T0 + 20, 3.0)), (FEED_B, (T0 + 30, 40.0))):
            disk = yield defer.ensureDeferred(self.redis.call("HMGET", keys.feed_disk(feed), "time", "value"))
            self.assertEqual((int(disk[0]), float(disk[1])), (when, value))
        self.assertFalse((yield defer.ensureDeferred(self.redis.call("EXISTS", keys.feed_disk(NO_FEED)))))

    def values(self, feed: int) -> list[float | None]:
        data = np.fromfile(os.path.join(self.datadir, "phpfina", f"{feed}.dat"), dtype="<f4")
        return [None if np.isnan(v) else float(v) for v in data]

    @defer.inlineCallbacks
    def test_a_connection_lost_while_the_window_is_full_resends_everything(self):
        """The sender waits for room (two frames unacknowledged: the queue drained each time);
        the connection goes: the sender, woken by the window's reset, waits for the next
        connection (it used to find the old one's readiness and loop without yielding, the
        node's reactor stuck), then sends everything again from the head of the queue."""
        engines = self.engines
        gate = threading.Event()
        real = engines.apply_batch

        def held(*args, **kwargs):
            gate.wait(30)  # the server's write thread: nothing is acknowledged until the gate opens
            return real(*args, **kwargs)

        engines.apply_batch = held
        self.addCleanup(gate.set)
        scripts = Scripts(self.redis)
        link = self.link(CollectorRegistry(), Collected())
        link.startService()
        self.addCleanup(lambda: link.stopService() if link.running else None)
        for n in range(3):
            batch = make_records(FEED_A, [T0 + 10 * n], [float(n)])
            yield defer.ensureDeferred(scripts.run(APPEND_SEQ, [keys.storage_stream(1), keys.storage_seq(1)], [batch.tobytes()]))
            if n < 2:
                yield wait_for(lambda: len(link.unacked) == n + 1, f"{n + 1} frames unacknowledged")
        yield wait_for(lambda: link.reader._paused is not None, "the sender waiting for room")
        link.protocol.transport.abortConnection()
        yield wait_for(lambda: link.protocol is None, "the link down")
        gate.set()
        yield wait_for(lambda: link.protocol is not None, "the link up again")
        yield link.idle()
        self.assertEqual(self.values(FEED_A), [0.0, 1.0, 2.0])
        self.assertEqual(int((yield defer.ensureDeferred(self.redis.call("XLEN", keys.storage_stream(1))))), 0)
