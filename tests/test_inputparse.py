"""input/post and input/bulk decoding (pure): names, values, and the bulk timing modes."""

from __future__ import annotations

import json

from twisted.trial import unittest

from emond.api import ApiError
from emond.inputparse import Packet, parse_bulk, parse_post

NOW = 1_700_000_600
FRAMES = json.dumps([[520, 16, 1137], [530, 17, 1437, 3164], [535, 19, 1412, 3077]])


class BulkTimingTests(unittest.TestCase):
    def times(self, params: dict) -> list[int]:
        packets, refused = parse_bulk(params, FRAMES, NOW)
        self.assertEqual(refused, [])
        return [p.time for p in packets]

    def test_sentat(self) -> None:
        # time_ref = now - sentat: a frame's time is now - (sentat - t)
        self.assertEqual(self.times({"sentat": "543"}), [NOW - 23, NOW - 13, NOW - 8])

    def test_offset(self) -> None:
        self.assertEqual(self.times({"offset": "-10"}), [NOW + 10 + 520, NOW + 10 + 530, NOW + 10 + 535])

    def test_absolute_time(self) -> None:
        self.assertEqual(self.times({"time": "1387730127"}), [1387730127 + 520, 1387730127 + 530, 1387730127 + 535])

    def test_legacy_makes_the_last_frame_now(self) -> None:
        self.assertEqual(self.times({}), [NOW - 15, NOW - 5, NOW])

    def test_sentat_wins_over_offset_and_time(self) -> None:
        self.assertEqual(self.times({"sentat": "543", "offset": "0", "time": "5"}), [NOW - 23, NOW - 13, NOW - 8])

    def test_positional_and_named_values(self) -> None:
        # "" and null use up positions 2 and 4; a {name: value} object uses none
        packets, _ = parse_bulk({"time": "0"}, json.dumps([[1, "n", 1, "", 3, {"temp": 21.5}, None, 7]]), NOW)
        self.assertEqual(packets, [Packet(1, "n", {"1": 1.0, "3": 3.0, "temp": 21.5, "5": 7.0})])

    def test_not_json_or_empty_is_refused_whole(self) -> None:
        for text in ("", "[", "{}", "[]", "5"):
            self.assertRaises(ApiError, parse_bulk, {}, text, NOW)

    def test_malformed_frames_are_refused_alone(self) -> None:
        text = json.dumps([[0, "a", 1], [1, {"x": 1}, 2], [2, "b", "abc"], [3, "c"], [4, "d", 4]])
        packets, refused = parse_bulk({"time": "100"}, text, NOW)
        self.assertEqual([(p.node, p.time) for p in packets], [("a", 100), ("d", 104)])
        self.assertEqual([(r.time, r.reason) for r in refused], [(101, "malformed_frame"), (102, "malformed_frame"), (103, "malformed_frame")])


class PostTests(unittest.TestCase):
    def test_csv_positions_and_named_pairs(self) -> None:
        packet, full = parse_post({"node": "10", "json": "{power1:100,power2:200,17}"}, [], NOW)
        self.assertEqual((packet, full), (Packet(NOW, "10", {"power1": 100.0, "power2": 200.0, "1": 17.0}), False))

    def test_fulljson_time_key_and_nulls(self) -> None:
        packet, full = parse_post({"node": "x", "fulljson": '{"a": 1, "TIME": 1700000000, "b": null}'}, [], NOW)
        self.assertEqual((packet, full), (Packet(1700000000, "x", {"a": 1.0}), True))

    def test_node_from_path_and_iso_time(self) -> None:
        packet, _ = parse_post({"csv": "1", "time": "2023-11-14T22:13:20Z"}, ["emontx"], NOW)
        self.assertEqual((packet.node, packet.time), ("emontx", 1700000000))

    def test_unicode_names_allowed_punctuation_not(self) -> None:
        packet, _ = parse_post({"node": "küche", "json": "température:1"}, [], NOW)
        self.assertEqual(packet.values, {"température": 1.0})
        self.assertRaises(ApiError, parse_post, {"node": "a/b", "csv": "1"}, [], NOW)

    def test_non_finite_values_refused(self) -> None:
        for value in ("nan", "inf", "1e999"):
            self.assertRaises(ApiError, parse_post, {"node": "x", "csv": value}, [], NOW)
