"""Property-based tests (hypothesis) of the API's decoders, as pure units: numbers, flags and
JSON parameters (``Call`` with a fake request), feed/set's ``public``, and process lists in
their text and JSON forms. Whatever the input, each gives a clear refusal (an ``emond.errors`` error the API answers 4xx)
or a finite value, never another exception, in time linear in the input's length.

Where a value is expected, it comes from a model of the format (emoncms's ``is_numeric``
grammar, PHP's ``json_decode``, the ``id:arg`` list), not from emond's output.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any, Callable

from hypothesis import assume, example, given
from hypothesis import strategies as st
from twisted.trial import unittest

from emond.api.http import MAX_INTEGER, Call, decode_json, error_answer
from emond.errors import EmondError
from emond.numbers import MAX_ID, php_number
from emond.api.inputs import processlist_steps
from emond.meta.feeds import public_flag
from emond.processlist import FEEDID, INPUTID, NONE, PROCESSES, VALUE, Step, parse_processlist
from tests.support.properties import DECODER, assert_linear

WHITESPACE = " \t\n\r\x0b\x0c"  # PHP's, around an is_numeric value
DIGITS = "0123456789"
# Characters that make numbers look plausible to Python but not to emoncms.
LOOKALIKES = "١٢٣٤٥٦٧٨٩٠１２３_\u00a0\u2007"
NUMBERISH = st.text(alphabet=DIGITS + "+-.eE" + WHITESPACE + LOOKALIKES + "infatyINFNAxX", max_size=40)
ANY_TEXT = st.one_of(st.text(max_size=80), NUMBERISH)


def call(**params: str) -> Call:
    """A Call as a handler sees it, without a request (the number methods read only params)."""
    return Call(None, "test", "test", [], "json", params, None)  # type: ignore[arg-type]


def outcome(test: unittest.TestCase, decode: Callable[[], Any]) -> Any:
    """The decoded value, or None after checking a refusal is a domain error answered 4xx.
    Any other exception propagates: hypothesis reports it with the input."""
    try:
        return decode()
    except EmondError as e:
        test.assertTrue(400 <= error_answer(e).code < 500, error_answer(e).code)
        test.assertTrue(e.message)
        return None


@st.composite
def php_numerics(draw: Any) -> tuple[str, Decimal]:
    """A string emoncms's is_numeric accepts, and its value built from the parts (the model)."""
    lead = draw(st.text(alphabet=WHITESPACE, max_size=2))
    trail = draw(st.text(alphabet=WHITESPACE, max_size=2))
    sign = draw(st.sampled_from(["", "+", "-"]))
    whole = draw(st.text(alphabet=DIGITS, max_size=25))
    frac = draw(st.none() | st.text(alphabet=DIGITS, max_size=25))
    assume(whole or frac)  # "." alone, or nothing, is not a number
    exponent = draw(st.none() | st.tuples(st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), st.text(alphabet=DIGITS, min_size=1, max_size=4)))
    text = sign + whole + ("" if frac is None else "." + frac)
    value = Decimal(sign + (whole or "0") + "." + (frac or "0"))
    if exponent is not None:
        e, esign, edigits = exponent
        text += e + esign + edigits
        value = value.scaleb(int(esign + edigits))
    return lead + text + trail, value


def finite_json(value: Any) -> bool:
    """Every number in a decoded JSON value is finite and every integer fits 64 bits (iterative)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
            return False
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return True


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


def php_json(value: Any) -> Any:
    """PHP's json_decode of ``json.dumps(value)``: an integer beyond 64 bits is a float (INF if
    beyond a double, which emond refuses: None here means "refused")."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        if len(str(abs(value))) <= 18:
            return value
        number = float(value) if abs(value) < 10**308 else math.inf
        return number if math.isfinite(number) else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        items = [php_json(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    out = {}
    for k, v in value.items():
        decoded = php_json(v)
        if decoded is None and v is not None:
            return None
        out[k] = decoded
    return out


class NumberTests(unittest.TestCase):
    @DECODER
    @given(php_numerics())
    def test_is_numeric_forms_are_their_value(self, case: tuple[str, Decimal]) -> None:
        text, value = case
        expected = float(value)
        if math.isfinite(expected):
            self.assertEqual(php_number(text), expected)
            self.assertEqual(call(x=text).number("x"), expected)
        else:
            self.assertIsNone(php_number(text))
            self.assertIsNone(outcome(self, lambda: call(x=text).number("x")))

    @DECODER
    @given(ANY_TEXT)
    @example("١٢")
    @example("１２")
    @example("1_000")
    @example("inf")
    @example("-Infinity")
    @example("nan")
    @example("1e999")
    @example("9" * 400)
    def test_number_is_finite_or_refused(self, text: str) -> None:
        number = outcome(self, lambda: call(x=text).number("x"))
        if number is not None:
            self.assertTrue(math.isfinite(number))
            self.assertTrue(text.isascii())  # never a non-ASCII digit read as a number
            self.assertNotIn("_", text)

    @DECODER
    @given(ANY_TEXT)
    @example("9" * 30)
    @example("1e300")
    @example(str(MAX_INTEGER + 1))
    @example(" -12 ")
    def test_integer_is_bounded_or_refused(self, text: str) -> None:
        number = outcome(self, lambda: call(x=text).integer("x"))
        if number is not None:
            self.assertIs(type(number), int)
            self.assertLessEqual(abs(number), MAX_INTEGER)
            self.assertTrue(text.isascii())

    @DECODER
    @given(st.integers(min_value=-MAX_INTEGER, max_value=MAX_INTEGER))
    def test_integer_reads_every_whole_number_in_range_exactly(self, number: int) -> None:
        self.assertEqual(call(x=str(number)).integer("x"), number)

    @DECODER
    @given(ANY_TEXT)
    @example("inf")
    @example("Infinity")
    @example("1e999")
    @example("0.5")
    def test_flag_is_a_bool_or_refused(self, text: str) -> None:
        flag = outcome(self, lambda: call(x=text).flag("x", True))
        if flag is not None:
            self.assertIs(type(flag), bool)
            # PHP's (int): on unless the number truncates to 0
            self.assertEqual(flag, text.strip() == "" or int(float(text)) != 0)

    def test_numbers_take_linear_time(self) -> None:
        for make in (
            lambda n: "9" * n + "x",
            lambda n: "1." + "0" * n + "x",
            lambda n: " " * n + "1 x",
            lambda n: "1e" + "9" * n,
            lambda n: "9" * n,
            lambda n: "+" * n,
            lambda n: "١" * n,
        ):
            for method in ("number", "integer"):
                assert_linear(self, lambda text: getattr(call(x=text), method)("x"), make)
            assert_linear(self, lambda text: call(x=text).flag("x", False), make)


class JsonParamTests(unittest.TestCase):
    @DECODER
    @given(ANY_TEXT)
    @example("NaN")
    @example("[Infinity]")
    @example('{"a": -Infinity}')
    @example("[1e400]")
    @example("[" * 5000)
    def test_any_text_is_finite_json_or_refused(self, text: str) -> None:
        value = outcome(self, lambda: call(x=text).json_param("x", "bad JSON"))
        if value is not None:
            self.assertTrue(finite_json(value))

    @DECODER
    @given(JSON_VALUES)
    def test_json_values_decode_as_php_would_or_are_refused(self, value: Any) -> None:
        text = json.dumps(value)  # Python writes NaN/Infinity for non-finite floats: not JSON
        decoded = outcome(self, lambda: call(x=text).json_param("x", "bad JSON"))
        expected = php_json(value)
        if expected is None and value is not None:
            self.assertIsNone(decoded)
        else:
            self.assertEqual(decoded, expected)

    def test_json_takes_linear_time(self) -> None:
        for make in (
            lambda n: "[" * n,
            lambda n: "[" * (n // 2) + "]" * (n // 2),
            lambda n: '{"a":' * (n // 5),
            lambda n: "9" * n,
            lambda n: '"' + "\\u0041" * (n // 6) + '"',
            lambda n: "[" + "1e5," * (n // 4) + "1]",
            lambda n: "[" + "1," * (n // 2) + "1]",
        ):
            assert_linear(self, lambda text: decode_json(text, "bad JSON"), make)


class PublicFlagTests(unittest.TestCase):
    @DECODER
    @given(JSON_VALUES | NUMBERISH)
    @example(math.inf)
    @example(math.nan)
    @example(10**400)
    @example("١")
    def test_public_is_0_or_1_or_refused(self, value: Any) -> None:
        public = outcome(self, lambda: public_flag(value))
        if public is not None:
            self.assertIn(public, (0, 1))


@st.composite
def steps(draw: Any) -> tuple[str, Any, Step]:
    """One valid step: the process key as text, its argument as sent, and the step it means."""
    process = PROCESSES[draw(st.sampled_from(sorted(PROCESSES)))]
    key = draw(st.sampled_from([str(process.id), f"process__{process.function}"]))
    if process.argtype == VALUE:
        number = draw(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**15), 10**15).map(float))
        return key, repr(number), Step(process.id, number)
    if process.argtype in (FEEDID, INPUTID):
        ident = draw(st.integers(1, MAX_ID))
        return key, str(ident), Step(process.id, ident)
    return key, draw(st.sampled_from(["", "0", "anything"])), Step(process.id, 0)


def valid_step(test: unittest.TestCase, step: Step) -> None:
    process = PROCESSES[step.process]
    if process.argtype == VALUE:
        test.assertIs(type(step.arg), float)
        test.assertTrue(math.isfinite(step.arg))
    elif process.argtype in (FEEDID, INPUTID):
        test.assertIs(type(step.arg), int)
        test.assertTrue(0 < step.arg <= MAX_ID)
    else:
        test.assertEqual((process.argtype, step.arg), (NONE, 0))


PROCESS_TEXT = st.one_of(
    ANY_TEXT,
    st.lists(st.tuples(NUMBERISH | st.sampled_from(["process__scale", "process__log_to_feed", "24"]), NUMBERISH), max_size=8).map(
        lambda items: ",".join(f"{k}:{v}" for k, v in items)
    ),
)


class ProcessListTests(unittest.TestCase):
    @DECODER
    @given(st.lists(steps(), max_size=60))
    def test_text_form_means_its_steps(self, items: list[tuple[str, Any, Step]]) -> None:
        text = ",".join(f"{key}:{arg}" for key, arg, _ in items)
        self.assertEqual(parse_processlist(text), [step for _, _, step in items])
        self.assertEqual(processlist_steps(text), [step for _, _, step in items])

    @DECODER
    @given(st.lists(steps(), max_size=60), st.booleans())
    def test_json_form_means_its_steps(self, items: list[tuple[str, Any, Step]], numbers: bool) -> None:
        def arg(step: Step, sent: str) -> Any:
            if not numbers or PROCESSES[step.process].argtype == NONE:
                return sent
            return step.arg  # a JSON number instead of a string

        text = json.dumps([{"fn": key, "args": [arg(step, sent)]} for key, sent, step in items])
        self.assertEqual(processlist_steps(text), [step for _, _, step in items])

    @DECODER
    @given(PROCESS_TEXT)
    @example("2:١٢")
    @example("2:1_000")
    @example("2:inf")
    @example("2:" + "9" * 400)
    @example("2:1e400")
    @example("٢:1")
    @example("1:" + "9" * 30)
    def test_any_text_is_valid_steps_or_refused(self, text: str) -> None:
        found = outcome(self, lambda: processlist_steps(text))
        for step in found or []:
            valid_step(self, step)

    @DECODER
    @given(JSON_VALUES | st.lists(st.dictionaries(st.sampled_from(["fn", "args", "x"]), JSON_VALUES | NUMBERISH, max_size=3), max_size=5))
    @example([{"fn": "process__scale", "args": [math.inf]}])
    @example([{"fn": "process__log_to_feed", "args": [10**400]}])
    @example([{"fn": True, "args": [1]}])
    @example([{"fn": "2", "args": [[[1]]]}])
    def test_any_json_is_valid_steps_or_refused(self, value: Any) -> None:
        found = outcome(self, lambda: processlist_steps(json.dumps(value)))
        for step in found or []:
            valid_step(self, step)

    def test_process_lists_take_linear_time(self) -> None:
        for make in (
            lambda n: "2:" + "9" * n + "x",
            lambda n: ",".join(["2:1.5"] * (n // 6)),
            lambda n: "1:5," * (n // 4),
            lambda n: "1:" * (n // 2),
            lambda n: "process__" + "a" * n,
            lambda n: ":" * n,
            lambda n: "," * n,
            lambda n: "[" * n,
            lambda n: "[" + '{"fn":"2","args":[1.5]},' * (n // 25) + '{"fn":"2","args":[1]}]',
        ):
            assert_linear(self, processlist_steps, make)
