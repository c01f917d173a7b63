"""Inputs: their metadata (database) and last values (Redis, and the database as a backstop).

The consumer keeps input last values in Redis and copies them to the
database (``inputs.time``/``value``, as emoncms does) at a bounded rate;
where Redis has none (it lost its data), the database's are used.

The SQL behind process lists is here too: ``load_owned`` reads what a user
owns, and ``emond.processlist.check_steps`` (pure) judges a change against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from emond import keys
from emond.meta.db import Database, Transaction
from emond.errors import Invalid
from emond.names import MAX_INPUT_NAME, MAX_NODE, valid_input_name
from emond.numbers import MAX_ID
from emond.processlist import FEEDID, PROCESSES, Owned, Step, check_steps, parse_lenient, parse_processlist
from emond.redis import Redis

COLUMNS = "id, userid, nodeid, name, description, processList"
MAX_DESCRIPTION = 255
SAVE_CHUNK = 200  # inputs per UPDATE statement (7 parameters each, well under SQLite's limit)
READ_CHUNK = 500  # ids per SELECT ... IN (...)


@dataclass(frozen=True)
class Input:
    id: int
    userid: int
    nodeid: str
    name: str
    description: str
    processlist: str

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> "Input":
        i, userid, nodeid, name, description, processlist = row
        return cls(int(i), int(userid), nodeid, name, description or "", processlist or "")


def check_node(node: str) -> None:
    if not valid_input_name(node):
        raise Invalid("Error: invalid node name")
    if len(node) > MAX_NODE:
        raise Invalid(f"Error: node name must be {MAX_NODE} characters or less")


def check_input_name(name: str) -> None:
    if not name or not valid_input_name(name):
        raise Invalid("Error: Format error, json key missing or invalid character")
    if len(name) > MAX_INPUT_NAME:
        raise Invalid(f"Error: input name must be {MAX_INPUT_NAME} characters or less")


class Inputs:
    def __init__(self, db: Database, redis: Redis) -> None:
        self.db = db
        self.redis = redis

    async def create(self, userid: int, nodeid: str, name: str) -> Input:
        check_node(nodeid)
        check_input_name(name)
        inputid = await self.db.insert(
            "INSERT INTO inputs (userid, nodeid, name, description, processList) VALUES (?, ?, ?, '', '')",
            userid, nodeid, name,
        )
        # Other consumers that cached this user's inputs (a queue that moved and came back)
        # must see it, or they count the user's inputs short and pass [input] max_inputs.
        await self.changed(userid)
        return Input(inputid, userid, nodeid, name, "", "")

    async def get(self, inputid: int) -> Input | None:
        if not 0 < inputid <= MAX_ID:
            return None
        row = await self.db.one(f"SELECT {COLUMNS} FROM inputs WHERE id = ?", inputid)
        return Input.from_row(row) if row else None

    async def owned(self, userid: int, inputid: int) -> Input:
        found = await self.get(inputid)
        if found is None or found.userid != userid:
            raise Invalid("Input does not exist")
        return found

    async def list(self, userid: int) -> list[Input]:
        rows = await self.db.query(f"SELECT {COLUMNS} FROM inputs WHERE userid = ? ORDER BY id", userid)
        return [Input.from_row(row) for row in rows]

    async def set_description(self, inp: Input, description: str) -> None:
        if len(description) > MAX_DESCRIPTION:
            raise Invalid(f"description must be {MAX_DESCRIPTION} characters or less")
        if not valid_input_name(description):
            raise Invalid("invalid characters in input description")
        await self.db.execute("UPDATE inputs SET description = ? WHERE id = ?", description, inp.id)
        await self.changed(inp.userid)

    async def change_processlist(
        self, userid: int, inputid: int, change: Callable[[str], tuple[list[Step] | None, str]]
    ) -> str:
        """Replace the process list of the user's input, atomically; fires with the new text.

        ``change(current text)`` returns ``(steps, text)``: ``text`` is stored,
        and ``steps`` (the new list as steps) is judged first by ``check_steps``
        against the current list, which judges only the steps the change brings
        in; ``steps`` is None for changes that bring nothing in (reset, moving
        or deleting stored items). The user's input rows are locked (MariaDB)
        or the single SQLite connection is held, so concurrent changes neither
        lose each other nor let two lists write one feed.
        """
        lock = self.db.dialect == "mysql"

        def work(txn: Transaction) -> str:
            owned, current = load_owned(txn, userid, inputid, lock)
            if current is None:
                raise Invalid("Input does not exist")
            steps, text = change(current)
            if steps is not None:
                check_steps(steps, owned, parse_lenient(current))
            if text != current:
                txn.execute("UPDATE inputs SET processList = ? WHERE id = ? AND userid = ?", text, inputid, userid)
            return text

        text = await self.db.transaction(work)
        await self.changed(userid)  # also when unchanged: a retry after a lost bump must still bump
        return text

    async def validate_processlist(self, userid: int, inputid: int, text: str) -> list[Step]:
        """Parse and judge ``text`` as the new list of the user's input ``inputid`` (nothing is written).

        ``change_processlist`` does the same inside the transaction that
        writes the list; this is the check on its own.
        """
        steps = parse_processlist(text)

        def check(txn: Transaction) -> None:
            owned, current = load_owned(txn, userid, inputid)
            if current is None:
                raise Invalid("Input does not exist")
            check_steps(steps, owned, parse_lenient(current))

        await self.db.transaction(check)
        return steps

    async def forget_feed(self, userid: int, feedid: int) -> int:
        """Remove the steps that name feed ``feedid`` from all the user's lists (the feed is being
        deleted, as emoncms.org does); fires with the number of lists changed."""
        lock = self.db.dialect == "mysql"

        def work(txn: Transaction) -> int:
            suffix = " FOR UPDATE" if lock else ""
            rows = txn.query(f"SELECT id, processList FROM inputs WHERE userid = ? ORDER BY id{suffix}", userid)
            changed = 0
            for inputid, text in rows:
                items = (text or "").split(",") if text else []
                kept = [item for item in items if not names_feed(item, feedid)]
                if len(kept) != len(items):
                    txn.execute("UPDATE inputs SET processList = ? WHERE id = ?", ",".join(kept), inputid)
                    changed += 1
            return changed

        changed = await self.db.transaction(work)
        if changed:
            await self.changed(userid)
        return changed

    async def changed(self, userid: int) -> None:
        """Tell input consumers that the user's inputs changed (after the change is committed)."""
        await self.redis.call("INCR", keys.user_version(userid))

    async def delete(self, userid: int, inputids: list[int]) -> list[int]:
        """Delete those of ``inputids`` that are the user's; fires with the ids deleted."""
        wanted = sorted({i for i in inputids if 0 < i <= MAX_ID})
        if not wanted:
            return []

        def work(txn: Transaction) -> list[int]:
            deleted = []
            for inputid in wanted:
                if txn.execute("DELETE FROM inputs WHERE id = ? AND userid = ?", inputid, userid):
                    deleted.append(inputid)
            return deleted

        deleted = await self.db.transaction(work)
        if deleted:
            await self.redis.call("DEL", *[keys.input_lastvalue(i) for i in deleted])
            await self.changed(userid)
        return deleted

    async def lastvalues(self, inputids: list[int]) -> dict[int, tuple[int | None, float | None]]:
        """Each input's last (time, value): from Redis, or from the database for the inputs Redis
        has nothing for; None for what is missing or not a finite number."""
        if not inputids:
            return {}
        replies = await self.redis.pipeline([("HMGET", keys.input_lastvalue(i), "time", "value") for i in inputids])
        out: dict[int, tuple[int | None, float | None]] = {}
        absent: list[int] = []
        for inputid, reply in zip(inputids, replies):
            t, v = (list(reply) + [None, None])[:2] if isinstance(reply, (list, tuple)) else (None, None)
            if t is None and v is None:
                absent.append(inputid)
                continue
            when = _number(t)
            value = _number(v)
            out[inputid] = (None if when is None else int(when), value)
        if absent:
            out.update(await self.stored_lastvalues(absent))
        return out

    async def stored_lastvalues(self, inputids: list[int]) -> dict[int, tuple[int | None, float | None]]:
        """Each input's last (time, value) as the database keeps it; (None, None) when it has none."""
        out: dict[int, tuple[int | None, float | None]] = {i: (None, None) for i in inputids}
        wanted = sorted(set(inputids))
        for start in range(0, len(wanted), READ_CHUNK):
            chunk = wanted[start : start + READ_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.query(f"SELECT id, time, value FROM inputs WHERE id IN ({marks})", *chunk)
            for inputid, when, value in rows:
                out[int(inputid)] = (None if when is None else int(when), _number(value))
        return out

    async def save_lastvalues(self, values: Mapping[int, tuple[int, float | None]]) -> None:
        """Write input last values to the database, ``SAVE_CHUNK`` inputs per statement in one
        transaction; a stored value with a later time is kept (another consumer wrote it)."""
        items = sorted(values.items())

        def work(txn: Transaction) -> None:
            for start in range(0, len(items), SAVE_CHUNK):
                statement, args = _save_statement(items[start : start + SAVE_CHUNK])
                txn.execute(statement, *args)

        if items:
            await self.db.transaction(work)


def load_owned(txn: Transaction, userid: int, inputid: int, lock: bool = False) -> tuple[Owned, str | None]:
    """The user's feeds, inputs and feed writers (other than ``inputid``), and ``inputid``'s stored list.

    Runs in a transaction; ``lock`` (MariaDB) takes the user's input rows
    ``FOR UPDATE`` so that concurrent changes of the user's lists are serialised.
    """
    suffix = " FOR UPDATE" if lock else ""
    rows = txn.query(f"SELECT id, processList FROM inputs WHERE userid = ? ORDER BY id{suffix}", userid)
    feeds = frozenset(int(row[0]) for row in txn.query("SELECT id FROM feeds WHERE userid = ?", userid))
    writers: dict[int, int] = {}
    current: str | None = None
    for rowid, text in rows:
        if int(rowid) == inputid:
            current = text or ""
            continue
        for step in parse_lenient(text):
            if PROCESSES[step.process].writes:
                writers.setdefault(int(step.arg), int(rowid))
    return Owned(feeds, frozenset(int(row[0]) for row in rows), writers), current


def _save_statement(items: list[tuple[int, tuple[int, float | None]]]) -> tuple[str, list[Any]]:
    """One UPDATE for many inputs. The WHERE sees the stored times before the SET (MariaDB
    evaluates SET left to right with the new values; SQLite with the old ones)."""
    cases = " ".join("WHEN ? THEN ?" for _ in items)
    marks = ", ".join("?" for _ in items)
    statement = (
        f"UPDATE inputs SET value = CASE id {cases} END, time = CASE id {cases} END "
        f"WHERE id IN ({marks}) AND (time IS NULL OR time <= CASE id {cases} END)"
    )
    values: list[Any] = []
    times: list[Any] = []
    for inputid, (when, value) in items:
        values += [inputid, value if value is not None and math.isfinite(value) else None]
        times += [inputid, int(when)]
    return statement, values + times + [inputid for inputid, _ in items] + times


def names_feed(item: str, feedid: int) -> bool:
    """Whether one stored ``id:arg`` item is a step whose argument is feed ``feedid``."""
    steps = parse_lenient(item)
    return bool(steps) and PROCESSES[steps[0].process].argtype == FEEDID and steps[0].arg == feedid


def _number(raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        number = float(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return number if math.isfinite(number) else None
