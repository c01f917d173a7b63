"""The sender's joined batch frames, as pure units: how queue entries are grouped into frames,
how many entries the window lets the reader take, the frames' decoding, and the fast
``last_per_feed`` (each feed's latest stored value after an acknowledgement) against the
plain sort it replaced, on many inputs.

What is expected comes from the stream's promises (emond/stream.py, emond/storage/remote.py):
entries keep their queue order, a frame holds whole entries, at most ``frame_bytes`` of them
unless one entry alone is larger; a feed's disk value is its latest time's last accepted record.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from emond.records import RECORD, make_records
from emond.storage.remote import FRAME_BYTES, FrameWindow, frames_of
from emond.storage.sender import last_per_feed
from emond.stream import BATCH, FRAME_LENGTH, MAX_FRAME, FrameProtocol, batch_frame, batch_parts, decode_batch


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
        self.assertEqual(window.room(), 2)  # the estimate falls by halves (1000 -> 500)...
        window.seen([100])
        window.seen([100])
        window.seen([100])
        self.assertEqual(window.room(), 10)  # ... down to the entries seen (100)
        window.seen([500])
        self.assertEqual(window.room(), 2)  # and rises at once
        for _ in range(10):
            window.seen([1])
        self.assertEqual(window.room(), 64)  # at most ``entries``
        window.pending.update({1: None, 2: None})
        self.assertEqual((window.frames(), window.room()), (0, 0))  # full: the reader waits

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
