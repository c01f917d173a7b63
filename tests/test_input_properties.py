"""Property-based tests of every input-path decoder (hypothesis).

For any input, each decoder either refuses clearly (an ``emond.errors`` error the API answers 4xx,
``FormError`` for form bodies) or returns what can be stored: finite float32
values, times in the accepted window, frames msgpack can pack. Never another
exception. And its time is linear in the input's length: decoding a hostile
shape repeated 4n times costs about 4 times what n costs (measured generously:
quadratic work, as ``\\d+\\.?\\d*`` was, costs 16 times).

Pure functions, no reactor: bounded ``max_examples`` keep the suite fast.
"""

from __future__ import annotations

import gzip
import json
import math
import time
import zlib
from typing import Any, Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from emond.api.http import error_answer
from emond.errors import EmondError
from emond.inputparse import (
    FLOAT32_LIMIT,
    REASON_MALFORMED_FRAME,
    REASON_NOT_NUMERIC,
    REASON_VALUE_RANGE,
    Bulk,
    Limits,
    bulk_text,
    frame_node,
    frame_values,
    parse_bulk,
    parse_post,
    parse_time,
)
from emond.queue import decode_groups, encode_groups
from emond.records import REASON_TOO_NEW, REASON_TOO_OLD
from emond.web import FormError, form_args, multipart_args

NOW = 1_764_000_000
LIMITS = Limits(max_frames=200, max_values=2000, past=5 * 365 * 86400, future=86400)
REASONS = {REASON_MALFORMED_FRAME, REASON_NOT_NUMERIC, REASON_VALUE_RANGE, REASON_TOO_OLD, REASON_TOO_NEW}
EARLIEST, LATEST = LIMITS.window(NOW)
PROPERTY = settings(max_examples=150, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.integers(-10**40, 10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.from_regex(r"\A[ \t]?[+-]?[0-9]{0,6}(\.[0-9]{0,4})?([eE][+-]?[0-9]{1,4})?[ \t]?\Z"),
    st.sampled_from(["", "null", "nan", "inf", "-Infinity", "1_000", "٣", "１２", "²", "0x1A", "1e", ".", "+.5", "5.", " 7 "]),
)
JSON_SCALAR = st.one_of(
    st.none(), st.booleans(),
    st.integers(-10**40, 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    NUMBER_TEXT,
    st.text(max_size=8),
)
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
NAME = st.one_of(st.from_regex(r"\A[A-Za-z0-9_.\- ]{1,12}\Z"), st.text(max_size=20))
LEGACY_TEXT = st.one_of(
    st.lists(st.one_of(NUMBER_TEXT, st.tuples(NAME, NUMBER_TEXT).map(":".join)), max_size=12).map(",".join),
    st.text(alphabet=st.sampled_from(list("0123456789.,:-+eE {}\"'abc٣_\t\n")), max_size=60),
)
TIME_TEXT = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.integers(NOW - 10**9, NOW + 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    NUMBER_TEXT,
    st.sampled_from(["2025-11-24T16:00:00Z", "2025-11-24 16:00:00+02:00", "٣", "1" * 400 + "x", "9999-12-31T23:59:59"]),
)
OFFSET = st.one_of(st.integers(-2**70, 2**70), st.integers(-1000, 1000), st.floats(allow_nan=True, allow_infinity=True), NUMBER_TEXT, st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
NODE = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True), NAME, st.none(), st.sampled_from(["emontx", "", "a/b", "x" * 17]), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
FRAME = st.one_of(
    st.tuples(OFFSET, NODE, st.lists(JSON_VALUE, max_size=6)).map(lambda t: [t[0], t[1], *t[2]]),
    st.tuples(st.integers(-100, 100), st.sampled_from(["emontx", 5]), st.lists(st.one_of(st.integers(-10**16, 10**16), st.floats()), min_size=1, max_size=5)).map(lambda t: [t[0], t[1], *t[2]]),
    JSON_VALUE,
)
# frames as devices send them, now and then with a value that cannot be stored
DEVICE_VALUE = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6),
                         st.sampled_from([math.nan, math.inf, -math.inf, 2e15, -2e15, 3.4e38, 3.5e38, -3.5e39, 10**39]))
DEVICE_FRAMES = st.lists(st.tuples(st.integers(-100, 100), st.sampled_from(["emontx", 7, "emonpi"]), st.lists(DEVICE_VALUE, min_size=1, max_size=6)),
                         min_size=1, max_size=20).map(lambda frames: [[t, node, *values] for t, node, values in frames])
BULK_TEXT = st.one_of(
    st.lists(FRAME, max_size=12).map(lambda frames: json.dumps(frames, allow_nan=True)),
    DEVICE_FRAMES.map(lambda frames: json.dumps(frames, allow_nan=True)),
    st.text(alphabet=st.sampled_from(list('[]{},:"0123456789.-eE nNaIfty')), max_size=80),
)
TIME_PARAMS = st.dictionaries(st.sampled_from(["sentat", "offset", "time"]), TIME_TEXT, max_size=2)


# -- checks ----------------------------------------------------------------------------------------

def storable(test: unittest.TestCase, value: float) -> None:
    test.assertIs(type(value), float)
    test.assertTrue(math.isfinite(value) and abs(value) < FLOAT32_LIMIT, value)
    test.assertTrue(np.isfinite(np.float32(value)), value)


def refused_clearly(test: unittest.TestCase, decode: Callable[[], Any]) -> Any:
    """The decoder's result, or None when it refused with an error answered 4xx (never another exception)."""
    try:
        return decode()
    except EmondError as e:
        test.assertTrue(400 <= error_answer(e).code < 500, (error_answer(e).code, e.message))
        test.assertTrue(e.message)
        return None


def check_bulk(test: unittest.TestCase, bulk: Bulk) -> None:
    test.assertTrue(-2**33 <= bulk.time_ref <= 2**34, bulk.time_ref)
    for frame in bulk.frames:
        test.assertTrue(EARLIEST <= bulk.time_ref + frame[0] <= LATEST)
        test.assertTrue(frame_node(frame))
        for name, value in frame_values(frame):
            test.assertTrue(name)
            storable(test, value)
    test.assertTrue({r.reason for r in bulk.refused} <= REASONS, bulk.refused)
    # what the queue gets packs and reads back (msgpack refused 65-bit ints once)
    group = [1, 0.0, bulk.time_ref, bulk.frames]
    test.assertEqual(decode_groups(encode_groups([group])), [group])


class PostProperties(unittest.TestCase):
    @PROPERTY
    @given(LEGACY_TEXT, st.sampled_from(["json", "csv", "data"]), st.one_of(st.none(), TIME_TEXT))
    def test_legacy_forms(self, text: str, key: str, when: str | None) -> None:
        params = {"node": "n", key: text, **({"time": when} if when is not None else {})}
        post = refused_clearly(self, lambda: parse_post(params, [], NOW, LIMITS))
        if post is None:
            return
        self.assertTrue(EARLIEST <= post.packet.time <= LATEST)
        for value in post.packet.values.values():
            storable(self, value)
        self.assertTrue({r.reason for r in post.refused} <= {REASON_VALUE_RANGE})

    @PROPERTY
    @given(st.one_of(st.dictionaries(NAME, JSON_VALUE, max_size=8).map(lambda d: json.dumps(d, allow_nan=True)), JSON_VALUE.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=40)))
    def test_fulljson(self, text: str) -> None:
        post = refused_clearly(self, lambda: parse_post({"node": "n", "fulljson": text}, [], NOW, LIMITS))
        if post is None:
            return
        self.assertTrue(post.fulljson)
        for value in post.packet.values.values():
            storable(self, value)
        self.assertTrue({r.reason for r in post.refused} <= {REASON_NOT_NUMERIC, REASON_VALUE_RANGE})
        sent = json.loads(text)
        for name, value in post.packet.values.items():  # a number, a numeric string or a boolean, as sent
            self.assertEqual(value, float(sent[name]))

    @PROPERTY
    @given(TIME_TEXT)
    def test_time(self, text: str) -> None:
        when = refused_clearly(self, lambda: parse_time(text))
        if when is not None:
            self.assertIs(type(when), int)


class BulkProperties(unittest.TestCase):
    @PROPERTY
    @given(BULK_TEXT, TIME_PARAMS)
    def test_frames_and_times(self, text: str, params: dict[str, str]) -> None:
        bulk = refused_clearly(self, lambda: parse_bulk(params, text, NOW, LIMITS))
        if bulk is not None:
            check_bulk(self, bulk)

    @PROPERTY
    @given(DEVICE_FRAMES)
    def test_pieces_give_what_one_decode_gives(self, frames: list[list[Any]]) -> None:
        """Decoded in pieces (patched small) or at once, the same frames and refusals."""
        from emond import inputparse

        text = json.dumps(frames, allow_nan=True)
        whole = parse_bulk({"time": str(NOW)}, text, NOW, LIMITS)
        self.patch(inputparse, "PIECE", 16)
        pieces = parse_bulk({"time": str(NOW)}, text, NOW, LIMITS)
        self.assertEqual(repr(pieces), repr(whole))  # repr: NaN compares unequal to itself
        check_bulk(self, pieces)


class CompressedBodyProperties(unittest.TestCase):
    @PROPERTY
    @given(st.lists(st.tuples(st.binary(max_size=60), st.sampled_from(["zlib", "gzip"])), min_size=1, max_size=4), st.sampled_from(["cb", "c"]), st.sampled_from(["", "truncate", "garbage"]))
    def test_members(self, members: list[tuple[bytes, str]], form: str, damage: str) -> None:
        body = b"".join(zlib.compress(data) if kind == "zlib" else gzip.compress(data, mtime=0) for data, kind in members)
        if damage == "truncate":
            body = body[:-3]
        elif damage == "garbage":
            body += b"\x00garbage"
        params = {"cb": "1"} if form == "cb" else {"c": "1", "data": body.hex()}
        text = refused_clearly(self, lambda: bulk_text(params, lambda: body, 1 << 16))
        if damage:
            self.assertIsNone(text)
            return
        sent = b"".join(data for data, _ in members)
        try:
            expected = sent.decode("utf-8")
        except UnicodeDecodeError:
            self.assertIsNone(text)
            return
        self.assertEqual(text, expected)  # every member, in order

    @PROPERTY
    @given(st.binary(max_size=200), st.sampled_from(["cb", "c"]))
    def test_any_bytes(self, body: bytes, form: str) -> None:
        params = {"cb": "1"} if form == "cb" else {"c": "1", "data": body.hex()}
        text = refused_clearly(self, lambda: bulk_text(params, lambda: body, 1 << 16))
        if text is not None:
            bulk = refused_clearly(self, lambda: parse_bulk({}, text, NOW, LIMITS))
            if bulk is not None:
                check_bulk(self, bulk)

    @PROPERTY
    @given(st.text(alphabet=st.sampled_from(list("c0123456789abcdefABCDEFxyz%")), max_size=40))
    def test_hex(self, data: str) -> None:
        refused_clearly(self, lambda: bulk_text({"c": "1", "data": data}, lambda: b"", 1 << 16))


class FormProperties(unittest.TestCase):
    @PROPERTY
    @given(st.binary(max_size=200), st.binary(min_size=1, max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b and b'"' not in b))
    def test_bodies(self, body: bytes, boundary: bytes) -> None:
        for decode in (lambda: form_args(body), lambda: multipart_args(b"--" + boundary + b"\r\n" + body, b"multipart/form-data; boundary=" + boundary)):
            try:
                fields = decode()
            except FormError as e:
                self.assertTrue(400 <= e.code < 500 and e.message)
                continue
            self.assertTrue(all(type(k) is bytes and all(type(v) is bytes for v in vs) for k, vs in fields.items()))


# -- linear time ------------------------------------------------------------------------------------

def seconds(decode: Callable[[], Any], repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs (what the code costs, less the machine's noise); one
    run when it takes over 0.5 s (then noise hardly matters, and quadratic code ends sooner)."""
    best = math.inf
    for _ in range(repeat):
        began = time.perf_counter()
        try:
            decode()
        except (EmondError, FormError):
            pass
        best = min(best, time.perf_counter() - began)
        if best > 0.5:
            break
    return best


UNBOUNDED = Limits(max_frames=10**9, max_values=10**9)
# Decoders and the text each gets: shape(n) is a hostile input of about n units.
SHAPES: dict[str, tuple[Callable[[str], Any], Callable[[int], str]]] = {
    "csv digits then x": (lambda text: parse_post({"node": "n", "csv": text}, [], NOW, UNBOUNDED), lambda n: "1" * n + "x"),
    "json a:digits then x": (lambda text: parse_post({"node": "n", "json": text}, [], NOW, UNBOUNDED), lambda n: "a:" + "1" * n + "x"),
    "time digits then x": (lambda text: parse_time(text), lambda n: "1" * n + "x"),
    "sentat digits then x": (lambda text: parse_bulk({"sentat": text}, '[[0,"n",1]]', NOW, UNBOUNDED), lambda n: "1" * n + "x"),
    "offset digits then x": (lambda text: parse_bulk({"offset": text}, '[[0,"n",1]]', NOW, UNBOUNDED), lambda n: "1" * n + ".5e"),
    "frame value digits then x": (lambda text: parse_bulk({"time": str(NOW)}, text, NOW, UNBOUNDED), lambda n: '[[0,"n","' + "1" * n + 'x"]]'),
    "frames with '],[' in strings": (lambda text: parse_bulk({"time": str(NOW)}, text, NOW, UNBOUNDED), lambda n: "[" + ",".join(['[0,"],[0,\\"x\\",1],[",1]'] * (n // 20)) + "]"),
    "whitespace runs": (lambda text: parse_bulk({"time": str(NOW)}, text, NOW, UNBOUNDED), lambda n: "[" + " " * n + '[0,"n",1]' + " " * n + "]"),
    "fulljson members": (lambda text: parse_post({"node": "n", "fulljson": text}, [], NOW, UNBOUNDED), lambda n: "{" + ",".join(f'"k{i}":"x"' for i in range(n // 8)) + "}"),
    "fulljson commas in strings": (lambda text: parse_post({"node": "n", "fulljson": text}, [], NOW, UNBOUNDED), lambda n: '{"a":"' + ', "' * (n // 3) + '"}'),
    "legacy braces": (lambda text: parse_post({"node": "n", "json": text}, [], NOW, UNBOUNDED), lambda n: "{" * n + "a:1"),
}


class LinearTimeTests(unittest.TestCase):
    """n and 4n: linear work costs ~4x, quadratic ~16x. The bound, 10x plus 1 ms, leaves room
    for a loaded 2-core box; each figure is the fastest of 5 runs. (n = 10,000 units: the
    quadratic number pattern this replaced took ~2 s for n, ~30 s for 4n.)"""

    N = 10_000

    def assertLinear(self, name: str, decode: Callable[[Any], Any], shape: Callable[[int], Any]) -> None:
        small, large = shape(self.N), shape(4 * self.N)
        t1 = seconds(lambda: decode(small))
        t4 = seconds(lambda: decode(large))
        self.assertLess(t4, 10 * t1 + 0.001, f"{name}: {t1 * 1000:.2f} ms for n, {t4 * 1000:.2f} ms for 4n")

    def test_text_decoders(self) -> None:
        for name, (decode, shape) in SHAPES.items():
            self.assertLinear(name, decode, shape)

    def test_compressed_members(self) -> None:
        member = gzip.compress(b"", mtime=0)
        self.assertLinear("empty gzip members", lambda body: bulk_text({"cb": "1"}, lambda: body, 1 << 20),
                          lambda n: member * (n // 50))  # capped at 1000 members: a 400 past them

    def test_form_decoders(self) -> None:
        self.assertLinear("form of % escapes", form_args, lambda n: b"a=" + b"%41" * n + b"%")
        self.assertLinear("multipart lines", lambda body: multipart_args(body, b"multipart/form-data; boundary=XYZ"),
                          lambda n: b"--XYZ\r\nContent-Disposition: form-data; name=\"d\"\r\n\r\n" + b"x\n" * n + b"\r\n--XYZ--\r\n")

    @settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(alphabet=st.sampled_from(list('0123456789.eE+-,:[]{}" x٣%')), min_size=1, max_size=6))
    def test_any_repeated_unit(self, unit: str) -> None:
        """Whatever short text is repeated, each decoder's time grows linearly with it."""
        for name, decode in (("csv", SHAPES["csv digits then x"][0]), ("bulk", SHAPES["whitespace runs"][0]), ("time", parse_time),
                             ("fulljson", SHAPES["fulljson members"][0])):
            self.assertLinear(f"{name} of {unit!r} repeated", decode, lambda k: unit * (k // len(unit)))
