"""Decoding ``input/post`` and ``input/bulk`` exactly as emoncms accepts them.

Pure functions, no I/O: the web layer calls them and queues what they
return. A request that cannot be parsed at all raises ``ApiError`` (400,
emoncms's message); in a bulk that parses, a malformed frame is refused
alone and returned as a refusal, never silently dropped.
"""

from __future__ import annotations

import datetime
import json
import re
import zlib
from dataclasses import dataclass
from math import isfinite
from itertools import chain, count
from operator import itemgetter
from typing import Any, Callable, Iterable, NamedTuple

from emond.api import ApiError
from emond.inputs import MAX_NAME, MAX_NODE
from emond.names import valid_input_name

POSITIONS = [str(i) for i in range(256)]  # CSV position names, made once
MAX_POSITION = len(POSITIONS)
_POSITION_NAMES = tuple(POSITIONS[1:])  # the names of positional values, in order
NUMERIC = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
REASON_MALFORMED_FRAME = "malformed_frame"
REASON_TIME_RANGE = "time_out_of_range"
MAX_TIME = 2**32 - 1  # times are stored as unsigned 32-bit seconds
PLAIN_LIMIT = 1e15  # values below it in magnitude are finite and pack as 64-bit integers
_LIST, _INT, _NUMBERS = {list}, {int}, frozenset((int, float))
_OFFSET, _NODE, _VALUES = itemgetter(0), itemgetter(1), itemgetter(slice(2, None))


class TimeOutOfRange(ValueError):
    pass


class Packet(NamedTuple):
    """One node's values at one time: what a device sent in one post or bulk frame."""

    time: int
    node: str
    values: dict[str, float]  # in the order sent (CSV positions are names "1", "2", ...)


@dataclass(frozen=True)
class FrameRefusal:
    time: int
    node: str
    reason: str


def numeric(value: Any) -> float | None:
    """A finite number from a JSON number or a numeric string; None for null/empty; else ValueError."""
    kind = type(value)  # exact types first: the common case, and bool is not a number here
    if kind is float:
        if isfinite(value):
            return value
        raise ValueError("not finite")
    if kind is int:
        return float(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("not numeric")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        if value == "" or value == "null":
            return None
        if not NUMERIC.match(value):
            raise ValueError("not numeric")
        number = float(value)
    else:
        raise ValueError("not numeric")
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return number


def node_name(raw: Any) -> str:
    node = "0" if raw is None or raw == "" else str(raw)
    if not valid_input_name(node):
        raise ApiError("Error: invalid node name")
    if len(node) > MAX_NODE:
        raise ApiError(f"Error: node name must be {MAX_NODE} characters or less")
    return node


def input_name(name: str) -> str:
    if name == "" or not valid_input_name(name):
        raise ApiError("Error: Format error, json key missing or invalid character")
    if len(name) > MAX_NAME:
        raise ApiError(f"Error: input name must be {MAX_NAME} characters or less")
    return name


def parse_time(raw: str) -> int:
    """``time=``: unix seconds, or an ISO 8601 date-time (with offset; UTC if none)."""
    if NUMERIC.match(raw):
        number = float(raw)
        if not isfinite(number):
            raise ApiError("Error: time out of range")
        return int(number)
    try:
        when = datetime.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ApiError("Error: time is not a unix timestamp or an ISO 8601 date-time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


def parse_post(params: dict[str, str], subactions: list[str], now: int) -> tuple[Packet, bool]:
    """An ``input/post`` request: the packet, and whether ``fulljson`` was used."""
    node = node_name(params["node"] if "node" in params else (subactions[0] if subactions else None))
    when = parse_time(params["time"]) if params.get("time") else None
    for key in ("json", "fulljson", "csv", "data"):
        if key in params:
            source, text = key, params[key]
            break
    else:
        source, text = "", ""
    if text == "":
        raise ApiError("Request contains no data via csv, json or data tag")
    if source == "fulljson":
        values, json_time = _full_json(text)
        if when is None and json_time is not None:
            when = json_time
    else:
        values = _legacy(text)
    when = now if when is None else when
    if not 0 <= when <= MAX_TIME:
        raise ApiError("Error: time out of range")
    return Packet(when, node, values), source == "fulljson"


def _full_json(text: str) -> tuple[dict[str, float], int | None]:
    try:
        data = json.loads(text)
    except ValueError:
        raise ApiError("Error decoding JSON string (invalid or too deeply nested)")
    if not isinstance(data, dict):
        raise ApiError("Input must be a JSON object")
    values: dict[str, float] = {}
    json_time = None
    for name, value in data.items():
        if isinstance(value, (dict, list)):
            raise ApiError("Error decoding JSON string (invalid or too deeply nested)")
        if name.lower() == "time":
            json_time = parse_time(str(value)) if value is not None else None
            continue
        try:
            number = numeric(value)
        except ValueError:
            raise ApiError("Format error, json value is not numeric")
        if number is not None:
            values[input_name(name)] = number
    return values, json_time


def _legacy(text: str) -> dict[str, float]:
    """``json``/``csv``/``data``: emoncms's lenient parser (braces and quotes dropped)."""
    cleaned = "".join(c for c in text if c.isalnum() or c.isspace() or c in "_-.:,")
    values: dict[str, float] = {}
    position = 0
    for item in cleaned.split(","):
        if ":" in item:
            name, _, raw = item.partition(":")
            name = name.strip()
            if name == "":
                raise ApiError("Format error, json key missing or invalid character")
            try:
                number = numeric(raw.strip())
            except ValueError:
                raise ApiError("Format error, json value is not numeric")
            if number is not None:
                values[input_name(name)] = number
        else:
            position += 1
            try:
                number = numeric(item.strip())
            except ValueError:
                raise ApiError("Format error: csv value is not numeric")
            if number is not None:
                values[str(position)] = number
    return values


def inflate(data: bytes, limit: int) -> bytes:
    """A zlib or gzip stream, refused when it would inflate beyond ``limit`` bytes."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: zlib or gzip header, detected
    try:
        out = inflater.decompress(data, limit)
    except zlib.error:
        raise ApiError("Format error, compressed data not valid")
    if inflater.unconsumed_tail:
        raise ApiError(f"Compressed data inflates beyond {limit} bytes", 413)
    if not inflater.eof:
        raise ApiError("Format error, compressed data not valid")
    return out


def bulk_text(params: dict[str, str], body: Callable[[], bytes], limit: int) -> str:
    """The JSON text of a bulk request: ``data``, a compressed body (``cb``) or compressed hex (``c``)."""
    if "cb" in params:
        raw = inflate(body(), limit)
    elif "c" in params:
        try:
            packed = bytes.fromhex(params.get("data", ""))
        except ValueError:
            raise ApiError("Format error, compressed hex not valid")
        raw = inflate(packed, limit)
    else:
        return params.get("data", "")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("Format error, json string supplied is not valid")


class Bulk(NamedTuple):
    """An ``input/bulk`` request, decoded: what goes to the queue, and the frames refused alone.

    ``frames`` are queue-ready: each frame's time is ``time_ref + frame[0]``, its node
    ``frame[1]`` (a string, or an int named by its digits), then either the numbers sent
    (positional values, named "1", "2", ...) or one ``{name: number}`` object.
    """

    time_ref: int
    frames: list[list[Any]]
    refused: list[FrameRefusal]


def parse_bulk(params: dict[str, str], text: str, now: int) -> Bulk:
    """An ``input/bulk`` request: its frames, and the frames refused alone."""
    try:
        frames = json.loads(text) if text else None
    except ValueError:
        frames = None
    if not isinstance(frames, list) or not frames:
        raise ApiError("Format error, json string supplied is not valid")
    last = frames[-1]
    if not isinstance(last, list) or not last:
        raise ApiError("Format error, last item in bulk data does not contain any data")
    time_ref = _time_reference(params, last[0], now)
    if _plain(frames, time_ref):
        return Bulk(time_ref, frames, [])  # as sent: no per-frame work on the request path
    accepted: list[list[Any]] = []
    refused: list[FrameRefusal] = []
    nodes: dict[Any, str] = {}  # a bulk repeats few node names: check each once
    for frame in frames:
        try:
            offset, node, values = _frame(frame, time_ref, nodes)
        except (ApiError, ValueError, TypeError, OverflowError) as e:
            when = _frame_time(frame, time_ref)
            node = str(frame[1])[:MAX_NODE] if isinstance(frame, list) and len(frame) > 1 and not isinstance(frame[1], (dict, list)) else ""
            reason = REASON_TIME_RANGE if isinstance(e, TimeOutOfRange) else REASON_MALFORMED_FRAME
            refused.append(FrameRefusal(when, node, reason))
            continue
        if values:
            accepted.append([offset, node, values])
    return Bulk(time_ref, accepted, refused)


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


def _plain(frames: list[Any], time_ref: int) -> bool:
    """Whether every frame is ``[int offset, node, number, ...]`` with a valid node, a time
    in range and moderate values: what devices send. Checked by passes that run in C
    (map, set, min, max) instead of Python per frame; anything else takes the careful path."""
    if set(map(type, frames)) != _LIST or min(map(len, frames)) < 3:
        return False
    offsets = list(map(_OFFSET, frames))
    if set(map(type, offsets)) != _INT or time_ref + min(offsets) < 0 or time_ref + max(offsets) > MAX_TIME:
        return False
    try:
        nodes = set(map(_NODE, frames))
    except TypeError:  # an object or a list as the node
        return False
    for raw in nodes:
        kind = type(raw)
        if not (kind is str or kind is int) or raw == "" or not valid_input_name(str(raw)) or len(str(raw)) > MAX_NODE:
            return False
    values = list(chain.from_iterable(map(_VALUES, frames)))
    return set(map(type, values)) <= _NUMBERS and -PLAIN_LIMIT < min(values) and max(values) < PLAIN_LIMIT


def _time_reference(params: dict[str, str], last_offset: Any, now: int) -> int:
    for key, relative in (("sentat", True), ("offset", True), ("time", False)):
        if key in params:
            raw = params[key]
            number = float(raw) if NUMERIC.match(raw) else float("nan")
            if not isfinite(number):
                raise ApiError(f"Error: {key} must be a number")
            value = int(number)
            return now - value if relative else value
    try:
        return now - int(numeric(last_offset) or 0)
    except ValueError:
        raise ApiError("Format error, last item in bulk data does not contain any data")


def _frame_time(frame: Any, time_ref: int) -> int:
    try:
        return time_ref + int(numeric(frame[0]) or 0)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError):
        return 0


def _frame(frame: Any, time_ref: int, nodes: dict[Any, str]) -> tuple[int, str, dict[str, float]]:
    """One frame checked value by value: its offset, node and values by name."""
    if type(frame) is not list or len(frame) < 3:
        raise ValueError("a frame is [time, node, value, ...]")
    offset = frame[0]
    if type(offset) is not int:
        offset = numeric(offset)
        if offset is None:
            raise ValueError("frame time missing")
        offset = int(offset)
    if not 0 <= time_ref + offset <= MAX_TIME:
        raise TimeOutOfRange()
    raw = frame[1]
    if type(raw) is dict or type(raw) is list:
        raise ValueError("Format error, node must not be an object")
    node = nodes.get(raw)
    if node is None:
        node = nodes[raw] = node_name(raw if type(raw) is not float else int(raw))
    values: dict[str, float] = {}
    position = 0
    for i in range(2, len(frame)):
        item = frame[i]
        if type(item) is dict:
            for name, value in item.items():
                number = numeric(value)
                if number is not None:
                    values[input_name(str(name))] = number
            continue
        position += 1  # empty values still use up a positional name
        number = numeric(item)
        if number is not None:
            values[POSITIONS[position] if position < MAX_POSITION else str(position)] = number
    return offset, node, values
