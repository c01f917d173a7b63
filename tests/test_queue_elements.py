"""Input queue elements: the current form round-trips, and elements written by earlier
versions (still queued across an upgrade) decode to the same groups."""

from __future__ import annotations

import json
import zlib

import msgpack
from twisted.trial import unittest

from emond.queue import decode_groups, encode_groups


class QueueElementTests(unittest.TestCase):
    def test_groups_round_trip(self) -> None:
        groups = [[7, 1700000000.25, 1700000000, [[0, "emontx", 1, 2.5], [10, 12, {"temp": 21.5}]]]]
        self.assertEqual(decode_groups(encode_groups(groups)), groups)

    def test_elements_of_earlier_versions(self) -> None:
        packets = [[7, 1700000000, "emontx", {"1": 1.0}, 1700000000.5], [8, 1700000010, "n", {"a": 2.0}, 1700000011.0]]
        expected = [[7, 1700000000.5, 1700000000, [[0, "emontx", {"1": 1.0}]]], [8, 1700000011.0, 1700000010, [[0, "n", {"a": 2.0}]]]]
        for payload in (b"m" + msgpack.packb(packets), b"j" + json.dumps(packets).encode(), b"z" + zlib.compress(json.dumps(packets).encode())):
            self.assertEqual(decode_groups(payload), expected, payload[:1])
