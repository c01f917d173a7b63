"""The input decoders' JSON (orjson first, json.loads for what orjson refuses) gives exactly
what json.loads gives, valid or not (hypothesis, and the edge cases by name)."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from emond.inputparse import _decode


def reference(text: str) -> Any:
    """What the decoders used before: json.loads, None for invalid JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 is not 1.0; NaN is NaN; -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**25), max_value=10**25)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)
# pieces that make texts valid, invalid or odd for one decoder and not the other
atoms = st.sampled_from([
    "[", "]", "{", "}", ",", ":", '"', "\\", "\\u", "d800", "dc00", "0", "1", "-", "+", ".", "e", "E", "400", "1e400",
    "NaN", "Infinity", "-Infinity", "true", "null", " ", "\t", "\n", "\r", "\x0b", "\x00", "\ufeff", "é", "\ud800",
    "18446744073709551616", "9223372036854775808", "123456789012345678", "00", "0.5", "1.0", "-0", "-0.0",
])


class DecodeTests(unittest.TestCase):
    def check(self, text: str) -> None:
        expected, got = reference(text), _decode(text)
        self.assertTrue(same(got, expected), (text, got, expected))

    def test_edge_cases(self):
        for text in [
            "1e400", "[-1e400]", "[NaN]", "[Infinity]", '["\\ud800"]', "[18446744073709551615]", "[18446744073709551616]",
            "[-9223372036854775808]", "[-9223372036854775809]", "[123456789012345678901234567890]", '{"a":1,"a":2}',
            "[1.7976931348623157e308]", "[5e-324]", "[2.2250738585072011e-308]", "[-0]", "[-0.0]", "[1E+2]", " [1] ",
            "[1]\x0b", "\ufeff[1]", '["a\x01"]', '["\\u0000"]', "[" * 5000 + "]" * 5000, "[" * 100 + "]" * 100, "",
            "[1,]", "[01]", "[.5]", "[1.]", '[0,"bench",1,2,3]', "[\ud800]", '["\ud800"]', "1" * 40, "0." + "1" * 40,
        ]:
            self.check(text)

    @settings(max_examples=3000, deadline=None)
    @given(json_values)
    def test_valid_json(self, value):
        self.check(json.dumps(value))
        self.check(json.dumps(value, ensure_ascii=False, indent=1))

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(atoms, max_size=12))
    def test_odd_texts(self, pieces):
        self.check("".join(pieces))
        self.check("[" + "".join(pieces) + "]")
