"""input/post and input/bulk decoding (pure): names, values, and the bulk timing modes."""

from __future__ import annotations

import json

from twisted.trial import unittest

from emond.errors import Invalid, TooLarge
from emond.inputparse import Bulk, FrameRefusal, Limits, Packet, TimeRefused, frame_node, frame_values, parse_bulk, parse_post

NOW = 1_700_000_600
FRAMES = json.dumps([[520, 16, 1137], [530, 17, 1437, 3164], [535, 19, 1412, 3077]])


def packets(bulk: Bulk) -> list[Packet]:
    """The packets a consumer reads from a bulk's queued frames."""
    return [Packet(bulk.time_ref + f[0], frame_node(f), dict(frame_values(f))) for f in bulk.frames]


def parse(params: dict, text: str) -> tuple[list[Packet], list]:
    bulk = parse_bulk(params, text, NOW)
    return packets(bulk), bulk.refused


class BulkTimingTests(unittest.TestCase):
    def times(self, params: dict) -> list[int]:
        packets, refused = parse(params, FRAMES)
        self.assertEqual(refused, [])
        self.assertEqual([p.node for p in packets], ["16", "17", "19"])
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
        packets, _ = parse({"time": "0"}, json.dumps([[1, "n", 1, "", 3, {"temp": 21.5}, None, 7]]))
        self.assertEqual(packets, [Packet(1, "n", {"1": 1.0, "3": 3.0, "temp": 21.5, "5": 7.0})])

    def test_not_json_or_empty_is_refused_whole(self) -> None:
        for text in ("", "[", "{}", "[]", "5"):
            self.assertRaises(Invalid, parse_bulk, {}, text, NOW)

    def test_malformed_frames_are_refused_alone(self) -> None:
        text = json.dumps([[0, "a", 1], [1, {"x": 1}, 2], [2, "b", "abc"], [3, "c"], [4, "d", 4]])
        packets, refused = parse({"time": "100"}, text)
        self.assertEqual([(p.node, p.time) for p in packets], [("a", 100), ("d", 104)])
        self.assertEqual([(r.time, r.reason) for r in refused], [(101, "malformed_frame"), (102, "malformed_frame"), (103, "malformed_frame")])


    def test_frames_as_devices_send_them_are_queued_as_sent(self) -> None:
        frames = [[0, "emontx", 1, 2.5, -3], [10, 7, 0.125, 1e14]]
        bulk = parse_bulk({"time": "1700000000"}, json.dumps(frames), NOW)
        self.assertIs(type(bulk.frames), list)
        self.assertEqual(bulk.frames, frames)  # no per-frame copy on the request path
        self.assertEqual(packets(bulk), [
            Packet(1700000000, "emontx", {"1": 1.0, "2": 2.5, "3": -3.0}),
            Packet(1700000010, "7", {"1": 0.125, "2": 1e14}),
        ])

    def test_careful_path_gives_what_the_plain_path_gives(self) -> None:
        # One odd frame sends the whole bulk through the value-by-value path; the other
        # frames must come out exactly as the plain path makes them.
        plain = [[0, "a", 1, 2.5], [5, 3, 4, 5], [9, "a", 1e3, -7]]
        odd = plain + [[12, "b", "12.5"]]
        self.assertEqual(packets(parse_bulk({"time": "100"}, json.dumps(odd), NOW))[:3], packets(parse_bulk({"time": "100"}, json.dumps(plain), NOW)))

    def test_values_that_take_the_careful_path(self) -> None:
        # large numbers, bools, strings, nulls, floats as node: not plain
        cases = [
            ([[0, "a", 1e30]], {"1": 1e30}),
            ([[0, "a", "5"]], {"1": 5.0}),
            ([[0, "a", None, 2]], {"2": 2.0}),
            ([[0, 12.0, 2]], {"1": 2.0}),
        ]
        for frames, values in cases:
            self.assertEqual(packets(parse_bulk({"time": "0"}, json.dumps(frames), NOW))[0].values, values, frames)
        for bad in ([[0, "a", True]], [[0, "", 1, 2, {"x": "y"}]], [[0, "a/b", 1]], [[0, "x" * 17, 1]]):
            bulk = parse_bulk({"time": "0"}, json.dumps(bad), NOW)
            self.assertEqual((bulk.frames, [r.reason for r in bulk.refused]), ([], ["malformed_frame"]), bad)
        # not finite in float32 (they would be inf on disk): that value alone (this behaviour
        # changed on purpose: such values used to refuse their whole frame, or 1e300 was kept)
        for bad in ([[0, "a", 1e300, 2]], [[0, "a", float("nan"), 2]], [[0, "a", float("-inf"), 2]], [[0, "a", 10**400, 2]]):
            bulk = parse_bulk({"time": "0"}, json.dumps(bad), NOW)
            self.assertEqual((packets(bulk), bulk.refused), ([Packet(0, "a", {"2": 2.0})], [FrameRefusal(0, "a", "value_out_of_range", "1")]), bad)

    def test_many_positional_values_keep_their_names(self) -> None:
        frame = [0, "n", *range(300)]
        values = packets(parse_bulk({"time": "0"}, json.dumps([frame]), NOW))[0].values
        self.assertEqual((len(values), values["1"], values["256"], values["300"]), (300, 0.0, 255.0, 299.0))

    def test_times_outside_unsigned_32_bits_are_refused_alone(self) -> None:
        # (the reasons were one "time_out_of_range"; now too old / too new, as the engines say)
        text = json.dumps([[-1, "a", 1], [0, "a", 2], [2**32 - 1, "a", 3], [2**32, "a", 4], [10**30, "a", 5]])
        bulk = parse_bulk({"time": "0"}, text, NOW)
        self.assertEqual([p.time for p in packets(bulk)], [0, 2**32 - 1])
        self.assertEqual([r.reason for r in bulk.refused], ["time_too_old", "time_too_new", "time_too_new"])
        for params in ({"time": "1e400"}, {"sentat": "-1e999"}, {"offset": "nan"}):
            self.assertRaises(Invalid, parse_bulk, params, "[[0,1,2]]", NOW)


class PostTests(unittest.TestCase):
    def test_values_beyond_max_values_are_refused(self) -> None:
        limits = Limits(max_values=5)
        self.assertEqual(len(parse_post({"node": "n", "csv": "1,2,3,4,5"}, [], NOW, limits).packet.values), 5)
        for params in ({"csv": "1,2,3,4,5,6"}, {"fulljson": '{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6}'}):
            with self.assertRaises(TooLarge) as refused:
                parse_post({"node": "n", **params}, [], NOW, limits)
            self.assertIn("more than 5", str(refused.exception.message))

    def test_csv_positions_and_named_pairs(self) -> None:
        packet, full, _ = parse_post({"node": "10", "json": "{power1:100,power2:200,17}"}, [], NOW)
        self.assertEqual((packet, full), (Packet(NOW, "10", {"power1": 100.0, "power2": 200.0, "1": 17.0}), False))

    def test_fulljson_time_key_and_nulls(self) -> None:
        packet, full, _ = parse_post({"node": "x", "fulljson": '{"a": 1, "TIME": 1700000000, "b": null}'}, [], NOW)
        self.assertEqual((packet, full), (Packet(1700000000, "x", {"a": 1.0}), True))

    def test_node_from_path_and_iso_time(self) -> None:
        packet, _, _ = parse_post({"csv": "1", "time": "2023-11-14T22:13:20Z"}, ["emontx"], NOW)
        self.assertEqual((packet.node, packet.time), ("emontx", 1700000000))

    def test_unicode_names_allowed_punctuation_not(self) -> None:
        packet, _, _ = parse_post({"node": "küche", "json": "température:1"}, [], NOW)
        self.assertEqual(packet.values, {"température": 1.0})
        self.assertRaises(Invalid, parse_post, {"node": "a/b", "csv": "1"}, [], NOW)

    def test_non_finite_values_refused(self) -> None:
        # "nan" and "inf" are not numeric for PHP's is_numeric: the request is refused
        for value in ("nan", "inf", "1_000", "٣"):
            self.assertRaises(Invalid, parse_post, {"node": "x", "csv": value}, [], NOW)
        # a numeric text beyond float32 is refused alone (it used to refuse the request)
        post = parse_post({"node": "x", "csv": "1e999,2,-3.5e38"}, [], NOW)
        self.assertEqual((post.packet.values, post.refused), ({"2": 2.0}, [FrameRefusal(NOW, "x", "value_out_of_range", "1"), FrameRefusal(NOW, "x", "value_out_of_range", "3")]))

    def test_times_outside_unsigned_32_bits_are_refused(self) -> None:
        for when in ("-1", "4294967296", "1e400", "1e30"):
            self.assertRaises(Invalid, parse_post, {"node": "x", "csv": "1", "time": when}, [], NOW)
        self.assertEqual(parse_post({"node": "x", "csv": "1", "time": "4294967295"}, [], NOW)[0].time, 2**32 - 1)

    def test_times_outside_the_window(self) -> None:
        limits = Limits(past=1000, future=60)
        self.assertEqual(parse_post({"node": "x", "csv": "1", "time": str(NOW + 60)}, [], NOW, limits).packet.time, NOW + 60)
        self.assertEqual(parse_post({"node": "x", "csv": "1", "time": str(NOW - 1000)}, [], NOW, limits).packet.time, NOW - 1000)
        for when, reason in ((NOW + 61, "time_too_new"), (2**32 - 1, "time_too_new"), (NOW - 1001, "time_too_old")):
            with self.assertRaises(TimeRefused) as raised:
                parse_post({"node": "x", "csv": "1", "time": str(when)}, [], NOW, limits)
            self.assertIsInstance(raised.exception, Invalid)  # answered 400 at the API's edge
            self.assertEqual(raised.exception.refusal, FrameRefusal(when, "x", reason))
