"""Decoding ``input/post`` and ``input/bulk`` as emoncms accepts them, with bounded work.

Pure functions, no I/O: the web layer calls them and queues what they return.
The decoders are generators (``*_steps``) that yield between bounded slices of
work (a piece of JSON text, a few hundred values, a megabyte inflated), so
the web layer can let the reactor run between slices; ``parse_post``,
``parse_bulk`` and ``bulk_text`` run them to the end in one go.

A request that cannot be parsed at all raises ``Invalid`` (``TooLarge`` past a
size limit). What parses but cannot be stored is returned as refusals and the
rest is kept: in a bulk, a malformed frame or a frame whose time is outside
the accepted window; anywhere, a value that is not finite in float32 (NaN,
±inf, beyond ±3.4e38, which would be ±inf on disk); in ``fulljson``, a
value that is neither a number, a numeric string nor a boolean.

Numbers are recognised as PHP's ``is_numeric`` does (ASCII digits only:
Python's ``float()`` alone would accept ``"١٢"`` and ``"1_000"``), by a
pattern that cannot backtrack, so its time is linear in the text's length.
"""

from __future__ import annotations

import codecs
import datetime
import json
import re
import zlib
from dataclasses import dataclass
from itertools import chain, count
from math import isfinite
from operator import itemgetter
from typing import Any, Callable, Generator, Iterable, NamedTuple, TypeVar

import orjson

from emond.errors import Invalid, TooLarge
from emond.names import MAX_INPUT_NAME, MAX_NODE, valid_input_name
from emond.numbers import PHP_NUMERIC
from emond.records import REASON_TOO_NEW, REASON_TOO_OLD

T = TypeVar("T")
Steps = Generator[None, None, T]  # a decoder: yields between slices of work, returns its result

POSITIONS = tuple(str(i) for i in range(256))  # CSV position names, made once
MAX_POSITION = len(POSITIONS)
_POSITION_NAMES = POSITIONS[1:]  # the names of positional values, in order
NUMERIC = PHP_NUMERIC  # PHP is_numeric, ASCII only, linear time (emond.numbers)
_LEGACY_DROPPED = re.compile(r"[^\w\s.:,-]")  # emoncms strips all but [\p{N}\p{L}_\s\-.:,]
_LEGACY_DROPPED_ASCII = bytes(c for c in range(128) if not (chr(c).isalnum() or chr(c).isspace() or chr(c) in "_.:,-"))
# Where a piece of JSON may end (group 1) and the next begin (group 2). Each starts with a
# literal character, so a search tries few positions, and cannot backtrack: linear time.
_FRAME_SEPARATOR = re.compile(r"(\])[ \t\n\r]*+,[ \t\n\r]*+(\[)")  # between two frames
_MEMBER_SEPARATOR = re.compile(r"(),[ \t\n\r]*+(\")")  # between two object members

REASON_MALFORMED_FRAME = "malformed_frame"
REASON_NOT_NUMERIC = "not_numeric"
REASON_VALUE_RANGE = "value_out_of_range"
MAX_TIME = 2**32 - 1  # times are stored as unsigned 32-bit seconds
TIME_REF_LIMIT = 2**33  # |time reference| and |offset| beyond this can never give a storable time
FLOAT32_LIMIT = 2.0**128 - 2.0**103  # the smallest magnitude that float32 rounds to infinity
PLAIN_LIMIT = 1e15  # values below it in magnitude are finite in float32 and pack as 64-bit integers
PIECE = 128 * 1024  # characters of JSON (or of a legacy post) decoded in one slice
VALUES_PER_SLICE = 2048  # values checked one by one in one slice
INFLATE_SLICE = 1 << 20  # bytes inflated (and compressed bytes read) in one slice
MAX_MEMBERS = 1000  # zlib/gzip members in one compressed body
_LIST, _INT, _NUMBERS = frozenset((list,)), frozenset((int,)), frozenset((int, float))
_OFFSET, _NODE, _VALUES = itemgetter(0), itemgetter(1), itemgetter(slice(2, None))


@dataclass(frozen=True)
class Limits:
    """What one request may carry and which times are accepted (``[input]``, ``[engines]``)."""

    max_frames: int = 5000
    max_values: int = 100_000
    past: int = MAX_TIME  # seconds before the server's clock still accepted
    future: int = MAX_TIME  # seconds after it

    def window(self, now: int) -> tuple[int, int]:
        """The first and last accepted time, within what the engines can store."""
        return max(0, now - self.past), min(MAX_TIME, now + self.future)

    def max_items(self) -> int:
        """A bound on the JSON values (``,`` plus ``[`` plus ``{``) of a request within the limits:
        a frame ``[t, node, v1..vk]`` has one ``[`` and k + 2 commas with its separator."""
        return self.max_values + 3 * self.max_frames + 1


class Packet(NamedTuple):
    """One node's values at one time: what a device sent in one post or bulk frame."""

    time: int
    node: str
    values: dict[str, float]  # in the order sent (CSV positions are names "1", "2", ...)


@dataclass(frozen=True)
class FrameRefusal:
    """A frame, or one value of it (``input``), that parsed but cannot be stored."""

    time: int
    node: str
    reason: str
    input: str = ""


class Post(NamedTuple):
    packet: Packet
    fulljson: bool
    refused: list[FrameRefusal]


class Bulk(NamedTuple):
    """An ``input/bulk`` request, decoded: what goes to the queue, and what was refused alone.

    ``frames`` are queue-ready: each frame's time is ``time_ref + frame[0]``, its node
    ``frame[1]`` (a string, or an int named by its digits), then either the numbers sent
    (positional values, named "1", "2", ...) or one ``{name: number}`` object.
    """

    time_ref: int
    frames: list[list[Any]]
    refused: list[FrameRefusal]


class TimeRefused(Invalid):
    """A post whose time is outside the accepted window: refused, and counted."""

    def __init__(self, message: str, refusal: FrameRefusal) -> None:
        super().__init__(message)
        self.refusal = refusal


class NotNumeric(ValueError):
    pass


class OutOfRange(ValueError):
    pass


def run(steps: Steps[T]) -> T:
    """A decoder run to its end without pause."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def numeric(value: Any) -> float | None:
    """A number from a JSON number or a numeric string (PHP ``is_numeric``), None for
    null, ``""`` and ``"null"``. Raises NotNumeric, or OutOfRange for what is not finite
    in float32 (the comparisons are exact for ints and false for NaN)."""
    kind = type(value)  # exact types: JSON gives nothing else, and bool is not a number here
    if kind is float or kind is int:
        if -FLOAT32_LIMIT < value < FLOAT32_LIMIT:
            return float(value)
        raise OutOfRange("not finite in float32")
    if value is None:
        return None
    if kind is str:
        if value == "" or value == "null":
            return None
        if NUMERIC.fullmatch(value) is None:
            raise NotNumeric("not numeric")
        number = float(value)  # a numeric string too long for a double is inf: out of range
        if -FLOAT32_LIMIT < number < FLOAT32_LIMIT:
            return number
        raise OutOfRange("not finite in float32")
    raise NotNumeric("not numeric")


def fulljson_number(value: Any) -> float | None:
    """``fulljson``: a number as ``numeric``, and booleans as PHP's ``(float)`` casts them."""
    if value is True or value is False:
        return float(value)
    return numeric(value)


def node_name(raw: Any) -> str:
    node = "0" if raw is None or raw == "" else str(raw)
    # a long non-ASCII name is refused for its length before its characters are looked at
    # one by one (unicodedata per character: a megabyte of them would hold the reactor)
    if len(node) > MAX_NODE and (not node.isascii() or valid_input_name(node)):
        raise Invalid(f"Error: node name must be {MAX_NODE} characters or less")
    if not valid_input_name(node):
        raise Invalid("Error: invalid node name")
    return node


def input_name(name: str) -> str:
    if name == "":
        raise Invalid("Error: Format error, json key missing or invalid character")
    if len(name) > MAX_INPUT_NAME and (not name.isascii() or valid_input_name(name)):
        raise Invalid(f"Error: input name must be {MAX_INPUT_NAME} characters or less")
    if not valid_input_name(name):
        raise Invalid("Error: Format error, json key missing or invalid character")
    return name


def parse_time(raw: str) -> int:
    """``time=``: unix seconds, or an ISO 8601 date-time (with offset; UTC if none)."""
    if NUMERIC.fullmatch(raw):
        number = float(raw)
        if not isfinite(number):
            raise Invalid("Error: time out of range")
        return int(number)
    try:
        when = datetime.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise Invalid("Error: time is not a unix timestamp or an ISO 8601 date-time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


def time_refusal(when: int, limits: Limits, now: int) -> str | None:
    """The reason a time is not accepted (too old / too new), or None."""
    earliest, latest = limits.window(now)
    if when < earliest:
        return REASON_TOO_OLD
    if when > latest:
        return REASON_TOO_NEW
    return None


def _time_message(reason: str, limits: Limits) -> str:
    if reason == REASON_TOO_NEW:
        return f"Error: time is too far in the future (more than {limits.future} s ahead of the server's clock)"
    return f"Error: time is too old (more than {limits.past} s before the server's clock)"


def check_items(text: str, limits: Limits) -> None:
    """TooLarge if ``text`` may hold more JSON values than a request may carry (``count_items``)."""
    if len(text) > limits.max_items() and count_items(text, 0, len(text)) > limits.max_items():
        raise too_many_values(limits)


def count_items(text: str, start: int, end: int) -> int:
    """The JSON values ``text[start:end]`` can hold at most, counted in C: every value after
    the first of an array or object follows a ``,``; each first one follows a ``[`` or ``{``.
    What json.loads costs is in proportion to this and to the length."""
    return text.count(",", start, end) + text.count("[", start, end) + text.count("{", start, end)


def too_many_values(limits: Limits) -> TooLarge:
    return TooLarge(f"Too many values in one request (more than {limits.max_values}): send them in smaller requests")


def too_many_frames(limits: Limits) -> TooLarge:
    return TooLarge(f"Too many frames in one request (more than {limits.max_frames}): send them in requests of at most {limits.max_frames} frames")


# --- input/post ----------------------------------------------------------------------------

def parse_post(params: dict[str, str], subactions: list[str], now: int, limits: Limits = Limits()) -> Post:
    return run(post_steps(params, subactions, now, limits))


def post_steps(params: dict[str, str], subactions: list[str], now: int, limits: Limits = Limits()) -> Steps[Post]:
    """An ``input/post`` request: its packet, whether ``fulljson`` was used, the values refused alone."""
    node = node_name(params["node"] if "node" in params else (subactions[0] if subactions else None))
    when = parse_time(params["time"]) if params.get("time") else None
    for key in ("json", "fulljson", "csv", "data"):
        if key in params:
            source, text = key, params[key]
            break
    else:
        source, text = "", ""
    if text == "":
        raise Invalid("Request contains no data via csv, json or data tag")
    if len(text) > limits.max_values and text.count(",") > limits.max_values:
        raise too_many_values(limits)
    if source == "fulljson":
        values, refused_names, json_time = yield from _full_json(text, limits)
        if when is None and json_time is not None:
            when = json_time
    else:
        values, refused_names = yield from _legacy(text)
    if len(values) > limits.max_values:  # the comma count above is a cheap bound, not the count
        raise too_many_values(limits)
    when = now if when is None else when
    reason = time_refusal(when, limits, now)
    if reason is not None:
        raise TimeRefused(_time_message(reason, limits), FrameRefusal(when, node, reason))
    refused = [FrameRefusal(when, node, why, name) for name, why in refused_names]
    return Post(Packet(when, node, values), source == "fulljson", refused)


def _full_json(text: str, limits: Limits) -> Steps[tuple[dict[str, float], list[tuple[str, str]], int | None]]:
    invalid = "Error decoding JSON string (invalid or too deeply nested)"
    if text.lstrip(" \t\n\r")[:1] == "{":
        data: dict[str, Any] = {}
        for piece in (yield from _pieces(text, limits, "{}", _MEMBER_SEPARATOR, invalid)):
            data.update(piece)  # a name sent twice: the last value, as json.loads keeps it
    else:
        check_items(text, limits)
        if _decode(text) is None:
            raise Invalid(invalid)
        raise Invalid("Input must be a JSON object")
    values: dict[str, float] = {}
    refused: list[tuple[str, str]] = []
    json_time = None
    for i, (name, value) in enumerate(data.items()):
        if i % VALUES_PER_SLICE == VALUES_PER_SLICE - 1:
            yield
        if name.lower() == "time":
            json_time = parse_time(str(value)) if value is not None and not isinstance(value, (dict, list)) else None
            continue
        try:
            number = fulljson_number(value)
        except NotNumeric:  # text or a nested value: that value alone (never a made-up 0)
            refused.append((input_name(name), REASON_NOT_NUMERIC))
            continue
        except OutOfRange:
            refused.append((input_name(name), REASON_VALUE_RANGE))
            continue
        if number is not None:
            values[input_name(name)] = number
    return values, refused, json_time


def _legacy(text: str) -> Steps[tuple[dict[str, float], list[tuple[str, str]]]]:
    """``json``/``csv``/``data``: emoncms's lenient parser (braces and quotes dropped)."""
    cleaned = _legacy_clean(text) if len(text) <= PIECE else (yield from _legacy_cleaned(text))
    values: dict[str, float] = {}
    refused: list[tuple[str, str]] = []
    position = 0
    for i, item in enumerate(cleaned.split(",")):
        if i % VALUES_PER_SLICE == VALUES_PER_SLICE - 1:
            yield
        if ":" in item:
            name, _, raw = item.partition(":")
            name = name.strip()
            if name == "":
                raise Invalid("Format error, json key missing or invalid character")
            message = "Format error, json value is not numeric"
        else:
            position += 1
            name, raw = str(position), item
            message = "Format error: csv value is not numeric"
        try:
            number = numeric(raw.strip())
        except NotNumeric:
            raise Invalid(message)
        except OutOfRange:
            refused.append((input_name(name), REASON_VALUE_RANGE))
            continue
        if number is not None:
            values[input_name(name)] = number
    return values, refused


def _legacy_cleaned(text: str) -> Steps[str]:
    """``text`` without the characters emoncms's lenient parser drops, a slice at a time
    (each character is judged alone): ASCII slices by ``bytes.translate`` in C, others by a
    regex, which costs ~100 ns per character dropped (a megabyte of braces: 0.1 s)."""
    parts = []
    for start in range(0, len(text), PIECE):
        parts.append(_legacy_clean(text[start:start + PIECE]))
        yield
    return "".join(parts)


def _legacy_clean(text: str) -> str:
    if text.isascii():
        return text.encode("ascii").translate(None, _LEGACY_DROPPED_ASCII).decode("ascii")
    return _LEGACY_DROPPED.sub("", text)


# --- compressed bodies -----------------------------------------------------------------------

def inflate_steps(data: bytes, limit: int) -> Steps[bytes]:
    """Every member of a zlib or gzip body (members one after another, as ``gzip`` and
    ``pigz`` write them), inflated a slice at a time; TooLarge beyond ``limit`` bytes, Invalid
    for anything that is not a whole member (trailing bytes included) or for more than
    ``MAX_MEMBERS`` members. The input goes in by slices too: a member's ``unused_data``
    (the bytes after it) is then at most a slice, never the rest of an 8 MiB body."""
    view = memoryview(data)
    out: list[bytes] = []
    size = members = 0
    inflater = None
    pending = b""
    position = 0
    while pending or position < len(data):
        if not pending:
            pending, position = view[position:position + INFLATE_SLICE], position + INFLATE_SLICE
        if inflater is None:
            members += 1
            if members > MAX_MEMBERS:
                raise Invalid(f"Format error, compressed data not valid (more than {MAX_MEMBERS} members)")
            inflater = zlib.decompressobj(wbits=47)  # 32 + 15: zlib or gzip header, detected
        try:
            chunk = inflater.decompress(pending, min(INFLATE_SLICE, limit - size + 1))
        except zlib.error:
            raise Invalid("Format error, compressed data not valid")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"Compressed data inflates beyond {limit} bytes")
        out.append(chunk)
        if inflater.eof:
            pending, inflater = inflater.unused_data, None
        else:
            pending = inflater.unconsumed_tail
        yield
    if inflater is not None or members == 0:  # the last member ends early, or nothing at all
        raise Invalid("Format error, compressed data not valid")
    return b"".join(out)


def bulk_text_steps(params: dict[str, str], body: Callable[[], bytes], limit: int) -> Steps[str]:
    """The JSON text of a bulk request: ``data``, a compressed body (``cb``) or compressed hex (``c``)."""
    if "cb" in params:
        raw = yield from inflate_steps(body(), limit)
    elif "c" in params:
        try:
            packed = bytes.fromhex(params.get("data", ""))
        except ValueError:
            raise Invalid("Format error, compressed hex not valid")
        yield
        raw = yield from inflate_steps(packed, limit)
    else:
        return params.get("data", "")
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts = []
    try:
        for start in range(0, len(raw), INFLATE_SLICE):
            parts.append(decoder.decode(raw[start:start + INFLATE_SLICE]))
            yield
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise Invalid("Format error, json string supplied is not valid")
    return "".join(parts)


def bulk_text(params: dict[str, str], body: Callable[[], bytes], limit: int) -> str:
    return run(bulk_text_steps(params, body, limit))


# --- input/bulk ------------------------------------------------------------------------------

def parse_bulk(params: dict[str, str], text: str, now: int, limits: Limits = Limits()) -> Bulk:
    return run(bulk_steps(params, text, now, limits))


def bulk_steps(params: dict[str, str], text: str, now: int, limits: Limits = Limits()) -> Steps[Bulk]:
    """An ``input/bulk`` request: its frames, and what was refused alone.

    The JSON is decoded a piece at a time (``_frames``); frames as devices send them
    (``_plain``) go to the queue as decoded, anything else is checked value by value."""
    pieces = yield from _frames(text, limits)
    frames = pieces[0] if len(pieces) == 1 else list(chain.from_iterable(pieces))
    if not frames:
        raise Invalid("Format error, json string supplied is not valid")
    last = frames[-1]
    if not isinstance(last, list) or not last:
        raise Invalid("Format error, last item in bulk data does not contain any data")
    time_ref = _time_reference(params, last[0], now)
    earliest, latest = limits.window(now)
    plain = True
    for piece in pieces:  # the C-level checks, a piece at a time
        if not _plain(piece, earliest - time_ref, latest - time_ref):
            plain = False
            break
        yield
    if plain:
        return Bulk(time_ref, frames, [])  # as sent: no per-frame work on the request path
    return (yield from _careful(frames, time_ref, earliest, latest))


def _pieces(text: str, limits: Limits, brackets: str, separator: re.Pattern[str], invalid: str, max_elements: int | None = None) -> Steps[list[Any]]:
    """The elements of a JSON array (``brackets`` ``"[]"``) or the members of an object
    (``"{}"``), decoded in pieces of about ``PIECE`` characters: a list of lists, or of dicts.

    A piece ends where ``separator`` matches (between two frames, or two members: group 1
    ends the piece, group 2 starts the next). Such a cut may fall inside a string or a
    nested value instead; then the text before it is not a whole list of values and fails
    to decode (a string or a bracket left open), so a piece that decodes holds exactly
    what it seems to. When one fails the rest is decoded in one call: bounded as well, by
    ``check_items``. ``invalid`` is the message for text that is not such a JSON value;
    past ``max_elements`` elements decoding stops with TooLarge (``too_many_frames``)."""
    opening, closing = brackets
    if len(text) <= PIECE:  # the common case: one piece, decoded as it is
        check_items(text, limits)
        whole = _decode(text)
        if type(whole) is not (list if opening == "[" else dict):
            raise Invalid(invalid)
        if max_elements is not None and len(whole) > max_elements:
            raise too_many_frames(limits)
        return [whole] if whole else []
    start = len(text) - len(text.lstrip(" \t\n\r"))
    end = len(text.rstrip(" \t\n\r"))
    if end - start < 2 or text[start] != opening or text[end - 1] != closing:
        raise Invalid(invalid)
    start, end = start + 1, end - 1  # inside the outer brackets
    pieces: list[Any] = []
    items = elements = 0
    while start < end:
        cut = separator.search(text, start + PIECE, end) if end - start > PIECE else None
        stop = cut.end(1) if cut else end
        items += _count_items(text, limits, items, start, stop)
        piece = _decode(opening + text[start:stop] + closing)
        if piece is None and cut is not None:  # the cut was not between two elements
            items += _count_items(text, limits, items, stop, end)
            piece, cut = _decode(opening + text[start:end] + closing), None
        if piece is None:
            raise Invalid(invalid)
        elements += len(piece)
        if max_elements is not None and elements > max_elements:
            raise too_many_frames(limits)
        pieces.append(piece)
        start = cut.start(2) if cut else end
        yield
    return pieces


def _frames(text: str, limits: Limits) -> Steps[list[list[Any]]]:
    """The frames of a bulk, a piece at a time; TooLarge past ``max_frames``."""
    return (yield from _pieces(text, limits, "[]", _FRAME_SEPARATOR, "Format error, json string supplied is not valid", limits.max_frames))


def _count_items(text: str, limits: Limits, counted: int, start: int, end: int) -> int:
    items = count_items(text, start, end)
    if counted + items > limits.max_items():
        raise too_many_values(limits)
    return items


def _decode(text: str) -> Any:
    """The JSON value of ``text`` as ``json.loads`` gives it, or None if it is not valid JSON.

    orjson first (4-5x faster: it was half of a bulk request's decoding); whatever orjson
    refuses goes to ``json.loads``, which decides (NaN, Infinity, 1e400, lone surrogates,
    deep nesting: accepted or refused as before). The one value orjson reads otherwise is
    an integer beyond 64 bits (it makes it a float): a text with a run of 19 digits takes
    ``json.loads`` at once (found by mapping every digit to 0 in C and looking for 19 of
    them: a regex search cost twice orjson's decoding). A text with lone surrogates (not
    UTF-8) takes it too, and so does a text longer than ``ORJSON_MAX``: most requests devices
    send are shorter, and for long ones (a 5,000-member fulljson) orjson's time came near
    the linear-time bound of tests/test_input_properties.py on this box, where json.loads's
    stays well inside it (orjson's own time is bounded by the cap). tests/test_inputparse_orjson.py compares the two
    decoders on many inputs."""
    raw: bytes | None = None
    if len(text) <= ORJSON_MAX:
        try:
            raw = text.encode()
        except UnicodeEncodeError:
            pass
    if raw is not None and _NINETEEN_DIGITS not in raw.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None


# characters: a 100-frame bulk is ~2,200 (a longer text, e.g. emonhub's 1000 frames, ~22,000, takes
# json.loads); below the texts of the linear-time tests, so both their n and 4n use one decoder
ORJSON_MAX = 8192
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19


def frame_values(frame: list[Any]) -> Iterable[tuple[str, float]]:
    """The (name, value) pairs of a queued frame (see ``Bulk``)."""
    first = frame[2]
    if type(first) is dict:
        return first.items()
    names = _POSITION_NAMES if len(frame) <= MAX_POSITION + 1 else map(str, count(1))
    return zip(names, map(float, frame[2:]))


def frame_node(frame: list[Any]) -> str:
    node = frame[1]
    return node if type(node) is str else str(node)


def _plain(frames: list[Any], lowest: int, highest: int) -> bool:
    """Whether every frame is ``[int offset, node, number, ...]`` with a valid node, an offset
    in ``[lowest, highest]`` and moderate finite values: what devices send. Checked by passes
    that run in C (map, set, min, max, sum) instead of Python per frame; anything else takes
    the careful path."""
    if set(map(type, frames)) != _LIST or min(map(len, frames)) < 3:
        return False
    offsets = list(map(_OFFSET, frames))
    if set(map(type, offsets)) != _INT or min(offsets) < lowest or max(offsets) > highest:
        return False
    try:
        nodes = set(map(_NODE, frames))
    except TypeError:  # an object or a list as the node
        return False
    for raw in nodes:
        kind = type(raw)
        if not (kind is str or kind is int) or raw == "" or len(str(raw)) > MAX_NODE or not valid_input_name(str(raw)):
            return False
    values = list(chain.from_iterable(map(_VALUES, frames)))
    if not set(map(type, values)) <= _NUMBERS or not -PLAIN_LIMIT < min(values) or not max(values) < PLAIN_LIMIT:
        return False
    return isfinite(sum(values))  # min and max skip a NaN; a sum does not


def _number_param(params: dict[str, str], key: str) -> int:
    raw = params[key]
    number = float(raw) if NUMERIC.fullmatch(raw) else float("nan")
    if not isfinite(number):
        raise Invalid(f"Error: {key} must be a number")
    if abs(number) > TIME_REF_LIMIT:
        raise Invalid(f"Error: {key} out of range")
    return int(number)


def _time_reference(params: dict[str, str], last_offset: Any, now: int) -> int:
    for key, relative in (("sentat", True), ("offset", True), ("time", False)):
        if key in params:
            value = _number_param(params, key)
            return now - value if relative else value
    try:
        offset = _offset(last_offset)
    except NotNumeric:
        raise Invalid("Format error, last item in bulk data does not contain any data")
    if offset is None:
        return now
    if abs(offset) > TIME_REF_LIMIT:
        raise Invalid("Format error, the last frame's time is out of range")
    return now - offset


def _offset(raw: Any) -> int | None:
    """A frame's time offset as PHP's ``(int)`` reads a number or numeric string (an exact
    int for JSON ints, however large); None if null or empty; NotNumeric otherwise."""
    kind = type(raw)
    if kind is int:
        return raw
    if raw is None or raw == "":
        return None
    if kind is float or (kind is str and NUMERIC.fullmatch(raw)):
        number = float(raw)
        if number != number:
            raise NotNumeric("NaN")
        return int(max(-2.0**63, min(2.0**63, number)))  # ±inf: far out of range, not an error
    raise NotNumeric("not a number")


def _careful(frames: list[Any], time_ref: int, earliest: int, latest: int) -> Steps[Bulk]:
    """Every frame checked value by value, in slices; refusals for what cannot be stored."""
    accepted: list[list[Any]] = []
    refused: list[FrameRefusal] = []
    nodes: dict[Any, str] = {}  # a bulk repeats few node names: check each once
    work = 0
    for frame in frames:
        work += len(frame) if type(frame) is list else 1
        if work >= VALUES_PER_SLICE:
            work = 0
            yield
        try:
            when, node = _frame_head(frame, time_ref, earliest, latest, nodes)
        except _Refused as e:
            refused.append(FrameRefusal(e.when, _refusal_node(frame), e.reason))
            continue
        values: dict[str, float] = {}
        frame_refused: list[FrameRefusal] = []
        try:
            position = 0
            for i in range(2, len(frame)):
                item = frame[i]
                if i % VALUES_PER_SLICE == 0:
                    yield
                if type(item) is dict:
                    for name, value in item.items():
                        _add(values, frame_refused, when, node, input_name(str(name)), value)
                    continue
                position += 1  # empty values still use up a positional name
                _add(values, frame_refused, when, node, POSITIONS[position] if position < MAX_POSITION else str(position), item)
        except (Invalid, NotNumeric):  # a bad name or a value that is not a number: the frame
            refused.append(FrameRefusal(when, node, REASON_MALFORMED_FRAME))
            continue
        refused += frame_refused
        if values:
            accepted.append([when - time_ref, node, values])
    return Bulk(time_ref, accepted, refused)


class _Refused(Exception):
    def __init__(self, when: int, reason: str) -> None:
        self.when = when
        self.reason = reason


def _frame_head(frame: Any, time_ref: int, earliest: int, latest: int, nodes: dict[Any, str]) -> tuple[int, str]:
    """A frame's time (within the window) and node; _Refused otherwise."""
    if type(frame) is not list or len(frame) < 3:
        raise _Refused(_frame_time(frame, time_ref), REASON_MALFORMED_FRAME)
    try:
        offset = _offset(frame[0])
    except NotNumeric:
        offset = None
    if offset is None:
        raise _Refused(time_ref, REASON_MALFORMED_FRAME)
    when = time_ref + offset
    if when < earliest:
        raise _Refused(when, REASON_TOO_OLD)
    if when > latest:
        raise _Refused(when, REASON_TOO_NEW)
    raw = frame[1]
    if type(raw) is dict or type(raw) is list:
        raise _Refused(when, REASON_MALFORMED_FRAME)
    node = nodes.get(raw)
    if node is None:
        try:
            node = node_name(raw if type(raw) is not float else int(raw))
        except (Invalid, ValueError, OverflowError):
            node = ""  # remembered as refused
        nodes[raw] = node
    if not node:
        raise _Refused(when, REASON_MALFORMED_FRAME)
    return when, node


def _frame_time(frame: Any, time_ref: int) -> int:
    try:
        return time_ref + (_offset(frame[0]) or 0)
    except (NotNumeric, TypeError, IndexError, KeyError):
        return time_ref


def _refusal_node(frame: Any) -> str:
    """The node a refused frame names, as far as it names one."""
    if type(frame) is list and len(frame) > 1 and type(frame[1]) in (str, int, float):
        return str(frame[1])[:MAX_NODE]
    return ""


def _add(values: dict[str, float], refused: list[FrameRefusal], when: int, node: str, name: str, value: Any) -> None:
    try:
        number = numeric(value)
    except OutOfRange:
        refused.append(FrameRefusal(when, node, REASON_VALUE_RANGE, name))
        return
    if number is not None:
        values[name] = number
