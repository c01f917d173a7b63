"""input/bulk time modes end to end: the stored time of every frame, read back from the
feed file, is what compat spec §1.3 says (``sentat``, ``offset``, ``time``, legacy).

Frame i carries ``t_i`` (its ``[t, node, value]`` first item); its time is ``time_ref + t_i``:
- ``sentat=S``: ``time_ref = now - S`` (the device's clock said S when it sent);
- ``offset=O``: ``time_ref = now - O``;
- ``time=T``: ``time_ref = T``;
- none of them (legacy): ``time_ref = now - t_last``, so the last frame is "now".

"now" is the node's clock when it parses the request: the test notes the clock before the
request and after the answer, and checks that one "now" in that window explains every stored
time. Times are read from a PHPTimeSeries file, which keeps each datapoint's exact second.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import NodeHarness, drain

T0 = 1_700_000_000


class BulkTimeModeTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite", "[engines]\nwindow_past = 2000000000\n")
        keys = (yield self.node.post("user/register.json", data={"username": "dev", "password": "secret1", "email": "d@example.org"})).json()
        self.key = keys["apikey_write"]
        created = yield self.node.post("feed/create.json", apikey=self.key, name="times", engine="2")
        self.assertEqual(created.code, 200, created)
        self.feed = created.json()["feedid"]
        # the input exists once it has been posted to; then it logs to the feed
        first = yield self.node.post("input/post.json", apikey=self.key, node="n", csv="0", time=str(T0 - 100))
        self.assertEqual(first.body, b"ok")
        yield drain(self.node)
        inputs = (yield self.node.get("input/list.json", apikey=self.key)).json()
        answer = yield self.node.post("input/process/set.json", apikey=self.key, inputid=inputs[0]["id"], processlist=f"1:{self.feed}")
        self.assertEqual(answer.code, 200, answer)

    @defer.inlineCallbacks
    def bulk(self, frames: list[list[Any]], **mode: str):
        """Post ``frames`` with the time mode ``mode``; fires with the node clock's window (before, after)."""
        before = int(time.time())
        answer = yield self.node.post("input/bulk.json", data={"data": json.dumps(frames)}, apikey=self.key, **mode)
        after = int(time.time())
        self.assertEqual((answer.code, answer.body), (200, b"ok"))
        yield drain(self.node)
        return before, after

    def stored(self) -> list[tuple[int, float]]:
        """The feed file's records, decoded from the format: 9-byte ``<BIf``, marker 249."""
        path = os.path.join(self.node.config.node.datadir, "phptimeseries", f"feed_{self.feed}.MYD")
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(len(data) % 9, 0)
        records = list(struct.iter_unpack("<BIf", data))
        self.assertEqual({marker for marker, _, _ in records}, {249})
        return [(t, v) for _, t, v in records]

    def assertRelativeToNow(self, window: tuple[int, int], expected: list[tuple[int, float]]) -> None:
        """``expected`` is [(seconds after "now", value)]: one "now" in the window explains every stored time."""
        stored = self.stored()
        self.assertEqual([v for _, v in stored], [v for _, v in expected])
        now = stored[-1][0] - expected[-1][0]
        self.assertLessEqual(window[0], now)
        self.assertLessEqual(now, window[1])
        self.assertEqual(stored, [(now + delta, v) for delta, v in expected])

    @defer.inlineCallbacks
    def test_time_is_absolute(self):
        yield self.bulk([[0, "n", 1], [10, "n", 2], [25, "n", 3]], time=str(T0))
        self.assertEqual(self.stored(), [(T0, 1.0), (T0 + 10, 2.0), (T0 + 25, 3.0)])

    @defer.inlineCallbacks
    def test_sentat_is_the_device_clock_when_it_sent(self):
        # The device's clock read 543 when it sent frames stamped 500, 520 and 540 by the same
        # clock: they are 43, 23 and 3 seconds old.
        window = yield self.bulk([[500, "n", 1], [520, "n", 2], [540, "n", 3]], sentat="543")
        self.assertRelativeToNow(window, [(-43, 1.0), (-23, 2.0), (-3, 3.0)])

    @defer.inlineCallbacks
    def test_offset_moves_the_reference_back(self):
        # time_ref = now - 100; frames at 0, 5 and 12 are 100, 95 and 88 seconds old.
        window = yield self.bulk([[0, "n", 1], [5, "n", 2], [12, "n", 3]], offset="100")
        self.assertRelativeToNow(window, [(-100, 1.0), (-95, 2.0), (-88, 3.0)])

    @defer.inlineCallbacks
    def test_legacy_makes_the_last_frame_now(self):
        # No time parameter: time_ref = now - 160 (the last frame's t), so 100, 130, 160
        # are 60 and 30 seconds old, and now.
        window = yield self.bulk([[100, "n", 1], [130, "n", 2], [160, "n", 3]])
        self.assertRelativeToNow(window, [(-60, 1.0), (-30, 2.0), (0, 3.0)])

    @defer.inlineCallbacks
    def test_legacy_with_negative_offsets(self):
        # emonhub-style relative frames: -20, -10, 0 seconds; the last one is now.
        window = yield self.bulk([[-20, "n", 1], [-10, "n", 2], [0, "n", 3]])
        self.assertRelativeToNow(window, [(-20, 1.0), (-10, 2.0), (0, 3.0)])

    @defer.inlineCallbacks
    def test_sentat_wins_over_offset_and_time(self):
        # §1.3 checks sentat first, then offset, then time.
        window = yield self.bulk([[90, "n", 1], [100, "n", 2]], sentat="100", offset="5000", time=str(T0))
        self.assertRelativeToNow(window, [(-10, 1.0), (0, 2.0)])

    @defer.inlineCallbacks
    def test_offset_wins_over_time(self):
        window = yield self.bulk([[0, "n", 1], [7, "n", 2]], offset="30", time=str(T0))
        self.assertRelativeToNow(window, [(-30, 1.0), (-23, 2.0)])
