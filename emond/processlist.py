"""Input processing: emoncms.org's process table, and process lists (parse, format, check).

The table is the one of emoncms.org (compat spec §2.2): ids 1..34, the ones
still offered and the ones marked "Deleted". A deleted process cannot be added
to a list any more, but lists that already hold one keep running (as on
emoncms.org), so the parser accepts every id of the table.

A process list is stored as text, ``id:arg,id:arg`` (the empty string is no
processing). ``parse_processlist`` turns it into ``Step``s, with the argument
typed by the process's argument type (a float for VALUE, an id for FEEDID and
INPUTID, 0 for NONE); ``format_processlist`` writes the canonical text back.

``check_steps`` holds the rules for changing a list; it only judges the steps
a change brings in (a step already in the list is kept as it is), so that
removing or moving steps always works, even in a list emoncms.org let go bad.

This module is plain data and pure functions (no SQL, no Redis): the
metadata layer (``emond.meta.inputs``) loads what a user owns and judges a change
with ``check_steps``; the functions that run each process are in
``emond.process.functions``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from emond.errors import Invalid
from emond.numbers import MAX_ID, php_number
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES

# Argument types (emoncms ProcessArg)
VALUE, INPUTID, FEEDID, NONE = 0, 1, 2, 3
# Data types of the feed a process writes (emoncms DataType)
UNDEFINED, REALTIME, DAILY, HISTOGRAM = 0, 1, 2, 3

MAX_STEPS = 50  # emoncms.org runs nothing of a longer list
MAX_ITEMS = 1000  # items parsed from one request at most: bounded work (a legacy list may exceed MAX_STEPS)

FINA, TS = ENGINE_PHPFINA, ENGINE_PHPTIMESERIES

# Messages (emoncms.org's texts where it has one)
MSG_FORMAT = "Invalid process list format"
MSG_UNKNOWN = "This process does not exist"
MSG_DELETED = "This process is not supported on this server"
MSG_VALUE = "Argument must be a valid number greater or less than 0."
MSG_FEED = "Feed does not exist!"
MSG_INPUT = "Input does not exist!"
MSG_WRITTEN = "Feed is already being written to, select create new"
MSG_TOO_MANY = f"Too many processes, a process list holds at most {MAX_STEPS}"


@dataclass(frozen=True)
class Process:
    id: int
    function: str  # emoncms.org's function name
    label: str  # the human name emoncms shows
    short: str  # the badge text of current emoncms
    argtype: int  # VALUE, INPUTID, FEEDID or NONE
    group: str  # "Deleted": still runs in existing lists, cannot be added
    description: str
    writes: bool = False  # writes to the feed of its argument
    datatype: int = UNDEFINED  # of the feed it writes
    engines: tuple[int, ...] = ()  # engines a feed it writes may use, preferred first
    unit: str = ""

    @property
    def deleted(self) -> bool:
        return self.group == "Deleted"

    def as_json(self) -> dict[str, object]:
        """The entry of ``input/getallprocesses.json`` (current emoncms's field names)."""
        return {
            "id_num": self.id,
            "name": self.label,
            "short": self.short,
            "function": self.function,
            "argtype": self.argtype,
            "datatype": self.datatype,
            "unit": self.unit,
            "group": self.group,
            "engines": list(self.engines),
            "writes": self.writes,
            "deleted": self.deleted,
            "description": self.description,
        }


def _p(*args: object, **kwargs: object) -> Process:
    return Process(*args, **kwargs)  # type: ignore[arg-type]


_TABLE = (
    _p(1, "log_to_feed", "Log to feed", "log", FEEDID, "Main",
       "Writes the value to the feed at the packet's time; passes the value on.",
       writes=True, datatype=REALTIME, engines=(FINA, TS)),
    _p(2, "scale", "x", "x", VALUE, "Calibration", "Multiplies the value by the argument."),
    _p(3, "offset", "+", "+", VALUE, "Calibration", "Adds the argument to the value."),
    _p(4, "power_to_kwh", "Power to kWh", "kwh", FEEDID, "Main",
       "Integrates power (W) into a cumulative energy feed (kWh); gaps of two hours or more add nothing. "
       "Passes the power on.",
       writes=True, datatype=REALTIME, engines=(FINA, TS), unit="kWh"),
    _p(5, "power_to_kwhd", "Power to kWh/d", "kwhd", FEEDID, "Daily",
       "Integrates power (W) into energy per day (kWh), one point per day at the start of the user's day. "
       "Passes the power on.",
       writes=True, datatype=DAILY, engines=(TS,), unit="kWhd"),
    _p(6, "times_input", "x input", "x inp", INPUTID, "Input",
       "Multiplies the value by the last value of another input."),
    _p(7, "input_ontime", "Input on-time", "ontime", FEEDID, "Deleted",
       "Seconds per day during which the value was above zero.",
       writes=True, datatype=DAILY, engines=(TS,)),
    _p(8, "kwhinc_to_kwhd", "Wh increments to kWh/d", "whinckwhd", FEEDID, "Deleted",
       "Adds Wh increments into energy per day (kWh).",
       writes=True, datatype=DAILY, engines=(TS,), unit="kWhd"),
    _p(9, "kwh_to_kwhd_old", "kWh to kWh/d (OLD)", "kwhkwhdold", FEEDID, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on.",
       datatype=DAILY, engines=(TS,)),
    _p(10, "update_feed_data", "update feed @time", "update", FEEDID, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on."),
    _p(11, "add_input", "+ input", "+ inp", INPUTID, "Input", "Adds the last value of another input."),
    _p(12, "divide_input", "/ input", "/ inp", INPUTID, "Input",
       "Divides the value by the last value of another input; no value when that is not above zero."),
    _p(13, "phaseshift", "Phaseshift", "phaseshift", VALUE, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on."),
    _p(14, "accumulator", "Accumulator", "accumulate", FEEDID, "Misc",
       "Adds the value to the feed's last value, writes the total and passes it on.",
       writes=True, datatype=REALTIME, engines=(FINA, TS)),
    _p(15, "ratechange", "Rate of change", "rate", FEEDID, "Deleted",
       "Writes the difference from the previous value; passes no value on.",
       writes=True, datatype=REALTIME, engines=(FINA, TS)),
    _p(16, "histogram", "Histogram", "hist", FEEDID, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on.", datatype=HISTOGRAM),
    _p(17, "average", "Daily Average", "mean", FEEDID, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on.", datatype=HISTOGRAM, engines=(TS,)),
    _p(18, "heat_flux", "Heat flux", "flux", FEEDID, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on.",
       datatype=REALTIME, engines=(FINA, TS)),
    _p(19, "power_acc_to_kwhd", "Power gained to kWh/d", "pwrgain", FEEDID, "Deleted",
       "Does nothing (removed on emoncms.org); passes the value on.", datatype=DAILY, engines=(TS,)),
    _p(20, "pulse_diff", "Total pulse count to pulse increment", "pulsdiff", FEEDID, "Deleted",
       "Writes the pulse count to the feed and passes on the increment since the previous count.",
       writes=True, datatype=REALTIME, engines=(FINA, TS)),
    _p(21, "kwh_to_power", "kWh to Power", "kwhpwr", FEEDID, "Deleted",
       "Writes the power (W) implied by successive cumulative kWh values, and passes it on.",
       writes=True, datatype=REALTIME, engines=(FINA, TS), unit="W"),
    _p(22, "subtract_input", "- input", "- inp", INPUTID, "Input", "Subtracts the last value of another input."),
    _p(23, "kwh_to_kwhd", "kWh to kWh/d", "kwhkwhd", FEEDID, "Deleted",
       "Turns a cumulative kWh value into energy per day (kWh); decreases are ignored.",
       writes=True, datatype=DAILY, engines=(TS,), unit="kWhd"),
    _p(24, "allowpositive", "Allow positive", "> 0", NONE, "Limits", "Negative values become 0."),
    _p(25, "allownegative", "Allow negative", "< 0", NONE, "Limits", "Positive values become 0."),
    _p(26, "signed2unsigned", "Signed to unsigned", "unsign", NONE, "Misc",
       "Adds 65536 to a negative value (a 16-bit counter sent as signed)."),
    _p(27, "max_value", "Max value", "max", FEEDID, "Daily",
       "Writes the day's largest value, one point per day at the start of the user's day.",
       writes=True, datatype=DAILY, engines=(TS,)),
    _p(28, "min_value", "Min value", "min", FEEDID, "Daily",
       "Writes the day's smallest value, one point per day at the start of the user's day.",
       writes=True, datatype=DAILY, engines=(TS,)),
    _p(29, "add_feed", "+ feed", "+ feed", FEEDID, "Feed", "Adds the last value of a feed."),
    _p(30, "sub_feed", "- feed", "- feed", FEEDID, "Feed", "Subtracts the last value of a feed."),
    _p(31, "multiply_by_feed", "* feed", "x feed", FEEDID, "Feed", "Multiplies by the last value of a feed."),
    _p(32, "divide_by_feed", "/ feed", "/ feed", FEEDID, "Feed",
       "Divides by the last value of a feed; 0 when that is 0."),
    _p(33, "reset2zero", "Reset to ZERO", "0", NONE, "Misc", "The value becomes 0."),
    _p(34, "wh_accumulator", "Wh Accumulator", "whacc", FEEDID, "Main",
       "Keeps a total of the positive increments of a cumulative Wh count (a counter reset does not reset "
       "the total; an increment implying more than 25 kW is dropped as an error); writes and passes on the total.",
       writes=True, datatype=REALTIME, engines=(FINA, TS), unit="Wh"),
)

PROCESSES: Mapping[int, Process] = MappingProxyType({p.id: p for p in _TABLE})
# current emoncms's names where they differ from emoncms.org's (the same process, the same id)
RENAMED: Mapping[str, int] = MappingProxyType({"whinc_to_kwhd": 8})
BY_FUNCTION: Mapping[str, int] = MappingProxyType({**RENAMED, **{p.function: p.id for p in _TABLE}})


def processes_json() -> dict[str, dict[str, object]]:
    """``input/getallprocesses.json``: id → entry."""
    return {str(p.id): p.as_json() for p in _TABLE}


class Step(NamedTuple):
    process: int
    arg: float | int  # VALUE: a float; FEEDID/INPUTID: an id; NONE: 0


class ProcessListError(Invalid):
    """A process list, or one step of it, that cannot be accepted."""


_DIGITS = re.compile(r"[0-9]{1,12}")
_SIGNED_DIGITS = re.compile(r"[+-]*+[0-9]++")  # a number, but not a process id: "unknown", not "format"


def _ident(text: str) -> int | None:
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if 0 < value <= MAX_ID else None


def process_id(text: str) -> int:
    """A process key: a numeric id, or current emoncms's ``process__<function>``."""
    key = text.strip()
    if key.lower().startswith("process__"):
        found = BY_FUNCTION.get(key[len("process__"):].lower())
        if found is None:
            raise ProcessListError(MSG_UNKNOWN)
        return found
    if not _DIGITS.fullmatch(key):
        raise ProcessListError(MSG_UNKNOWN if _SIGNED_DIGITS.fullmatch(key) else MSG_FORMAT)
    number = int(key)
    if number not in PROCESSES:
        raise ProcessListError(MSG_UNKNOWN)
    return number


def make_step(process: int, arg: str | None) -> Step:
    """The step for a known process id and the text of its argument."""
    proc = PROCESSES.get(process)
    if proc is None:
        raise ProcessListError(MSG_UNKNOWN)
    text = (arg or "").strip()
    if proc.argtype == VALUE:
        number = php_number(text)  # emoncms's is_numeric: ASCII digits; and finite here
        if number is None:
            raise ProcessListError(MSG_VALUE)
        return Step(process, number)
    if proc.argtype in (FEEDID, INPUTID):
        ident = _ident(text)
        if ident is None:
            raise ProcessListError(MSG_FEED if proc.argtype == FEEDID else MSG_INPUT)
        return Step(process, ident)
    return Step(process, 0)  # NONE: whatever was given is ignored, as emoncms does


def parse_processlist(text: str) -> list[Step]:
    """``id:arg,id:arg`` → steps. Empty items (``1:5,``) are skipped; a NONE step may omit its arg.

    Raises ``ProcessListError`` with the message of the first step that is wrong.
    Does not judge anything but the text (see ``check_steps``): deleted ids parse.
    """
    items = text.split(",", MAX_ITEMS)
    if len(items) > MAX_ITEMS:
        raise ProcessListError(MSG_TOO_MANY)
    steps: list[Step] = []
    for item in items:
        if not item.strip():
            continue
        parts = item.split(":")
        if len(parts) > 2:
            raise ProcessListError(MSG_FORMAT)
        steps.append(make_step(process_id(parts[0]), parts[1] if len(parts) == 2 else None))
    return steps


MSG_NOT_ARRAY = "Process list must be an array"


def parse_processlist_json(value: Any) -> list[Step]:
    """Current emoncms's JSON form, ``[{"fn": "process__log_to_feed", "args": [5]}, ...]``
    (already decoded), → steps. ``fn`` is a process key or id; ``args`` holds the one argument
    (none or one for a NONE process). Messages are emoncms's."""
    if not isinstance(value, list):
        raise ProcessListError(MSG_NOT_ARRAY)
    if len(value) > MAX_ITEMS:
        raise ProcessListError(MSG_TOO_MANY)
    steps: list[Step] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or "fn" not in item:
            raise ProcessListError(f"Missing process key in process list at index {index}")
        args = item.get("args")
        if not isinstance(args, list):
            raise ProcessListError(f"Invalid or missing args in process list at index {index}")
        key = item["fn"]
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str):
            raise ProcessListError(MSG_UNKNOWN)
        process = process_id(key)
        if len(args) != 1 and not (PROCESSES[process].argtype == NONE and not args):
            raise ProcessListError(f"Invalid number of arguments for process: {key[:64]}")
        steps.append(make_step(process, _json_arg(args[0]) if args else None))
    return steps


def _json_arg(arg: Any) -> str | None:
    """A JSON argument as the text ``make_step`` judges (numbers and strings only)."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return None  # judged like a missing argument
    return repr(arg) if isinstance(arg, float) else str(arg)


def parse_lenient(text: str | None) -> list[Step]:
    """The steps of a stored list that parse (for judging changes against it)."""
    steps: list[Step] = []
    for item in (text or "").split(","):
        try:
            steps.extend(parse_processlist(item))
        except ProcessListError:
            continue
    return steps


def format_value(number: float) -> str:
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def format_step(step: Step) -> str:
    proc = PROCESSES[step.process]
    if proc.argtype == VALUE:
        return f"{step.process}:{format_value(float(step.arg))}"
    return f"{step.process}:{int(step.arg)}"


def format_processlist(steps: Iterable[Step]) -> str:
    return ",".join(format_step(step) for step in steps)


@dataclass(frozen=True)
class Owned:
    """What a user owns, as the rules need it."""

    feeds: frozenset[int]
    inputs: frozenset[int]
    writers: Mapping[int, int]  # feed id → an input (other than the one being changed) whose list writes it


def check_steps(steps: Sequence[Step], owned: Owned, previous: Sequence[Step] = ()) -> None:
    """Judge a new list for an input whose list was ``previous``.

    Only steps the change brings in are judged (a step equal to one of
    ``previous`` is kept as it is): they must not be deleted processes, their
    feed or input must be the user's, and a feed they write must not be
    written by another step, of this input or any other. A list may not grow
    beyond ``MAX_STEPS``.
    """
    if len(steps) > MAX_STEPS and len(steps) > len(previous):
        raise ProcessListError(MSG_TOO_MANY)
    kept = Counter(previous)
    written: dict[int, bool] = {}  # feed → whether a new step writes it
    for step in steps:
        proc = PROCESSES.get(step.process)
        if proc is None:
            raise ProcessListError(MSG_UNKNOWN)
        new = kept[step] <= 0
        if not new:
            kept[step] -= 1
        if new:
            if proc.deleted:
                raise ProcessListError(MSG_DELETED)
            if proc.argtype == FEEDID and step.arg not in owned.feeds:
                raise ProcessListError(MSG_FEED)
            if proc.argtype == INPUTID and step.arg not in owned.inputs:
                raise ProcessListError(MSG_INPUT)
        if proc.writes:
            feed = int(step.arg)
            if feed in written and (new or written[feed]):
                raise ProcessListError(MSG_WRITTEN)
            if new and feed in owned.writers:
                raise ProcessListError(MSG_WRITTEN)
            written[feed] = written.get(feed, False) or new


__all__ = [
    "VALUE", "INPUTID", "FEEDID", "NONE", "UNDEFINED", "REALTIME", "DAILY", "HISTOGRAM", "MAX_STEPS",
    "Process", "PROCESSES", "BY_FUNCTION", "Step", "ProcessListError", "Owned", "processes_json",
    "process_id", "make_step", "parse_processlist", "parse_processlist_json", "parse_lenient", "format_processlist", "format_step",
    "check_steps",
]
