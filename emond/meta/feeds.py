"""Feeds: their metadata (database) and last values (Redis)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from emond import keys
from emond.meta.db import Database, is_duplicate
from emond.errors import Invalid, LimitReached
from emond.numbers import MAX_INTEGER, php_number
from emond.names import valid_feed_name
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES
from emond.redis import Redis

COLUMNS = "id, userid, name, tag, datatype, public, engine, server, feed_interval, unit"
ENGINE_UNAVAILABLE: Mapping[int, str] = MappingProxyType({
    0: "mysql feed engine is not available",
    1: "timestore feed engine is not available",
    3: "graphite feed engine is not available",
    4: "phptimestore feed engine is not available",
    6: "PHPFiwa feed engine is not available",
})
MAX_NAME = 64
MAX_UNIT = 16
DATATYPES = (1, 2)  # realtime, daily (emoncms.org refuses histogram, 3)

# Set a feed's last value only if it is not older than the one stored, so a
# back-filled datapoint never replaces a newer last value.
_ADVANCE = """
local t = redis.call('HGET', KEYS[1], 'time')
if t and tonumber(t) and tonumber(t) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'time', ARGV[1], 'value', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Feed:
    id: int
    userid: int
    name: str
    tag: str
    datatype: int
    public: int
    engine: int
    server: int
    interval: int
    unit: str

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> "Feed":
        i, userid, name, tag, datatype, public, engine, server, interval, unit = row
        return cls(int(i), int(userid), name, tag, int(datatype), int(public), int(engine), int(server), int(interval), unit)


async def feed_by_id(db: Database, feedid: int) -> Feed | None:
    row = await db.one(f"SELECT {COLUMNS} FROM feeds WHERE id = ?", feedid)
    return Feed.from_row(row) if row else None


def check_name(name: str, what: str = "feed name") -> None:
    if len(name) > MAX_NAME:
        raise Invalid(f"{what} must be {MAX_NAME} characters or less")
    if not valid_feed_name(name):
        raise Invalid(f"invalid characters in {what}")


def check_unit(unit: str) -> None:
    if len(unit) > MAX_UNIT:
        raise Invalid(f"unit must be {MAX_UNIT} characters or less")
    if any(ord(c) < 32 or ord(c) == 127 for c in unit):
        raise Invalid("invalid characters in unit")


def check_engine(engine: int) -> None:
    if engine in ENGINE_UNAVAILABLE:
        raise Invalid(ENGINE_UNAVAILABLE[engine])
    if engine not in (ENGINE_PHPFINA, ENGINE_PHPTIMESERIES):
        raise Invalid("Engine id not valid")


def public_flag(value: Any) -> int:
    """``public`` of ``feed/set``: emoncms's ``(int)`` of a JSON number or numeric string, any
    nonzero value is 1. NaN, ±inf, huge numbers, words and non-ASCII digits are refused."""
    number: int | float | None = None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        number = php_number(value)
    elif isinstance(value, int):
        number = value  # compared as an int below: a huge one never becomes a float
    elif isinstance(value, float) and math.isfinite(value):
        number = value
    if number is None or abs(number) > MAX_INTEGER:
        raise Invalid("public must be 0 or 1")
    return 1 if int(number) else 0


class Feeds:
    def __init__(self, db: Database, redis: Redis, max_feeds: int = 1000) -> None:
        self.db = db
        self.redis = redis
        self.max_feeds = max_feeds  # per user ([users] max_feeds)

    async def create(
        self, userid: int, name: str, tag: str, datatype: int, engine: int, interval: int, server: int, unit: str = ""
    ) -> Feed:
        check_name(name)
        check_name(tag, "feed tag")
        check_unit(unit)
        if datatype not in DATATYPES:
            raise Invalid("missing datatype: 1: realtime, 2: daily")
        check_engine(engine)
        lock = " FOR UPDATE" if self.db.dialect == "mysql" else ""  # SQLite: one connection, serial

        def insert(txn: Any) -> int:
            # The user's row is locked so that concurrent creates count one after another.
            txn.query(f"SELECT id FROM users WHERE id = ?{lock}", userid)
            if txn.query("SELECT id FROM feeds WHERE userid = ? AND tag = ? AND name = ?", userid, tag, name):
                raise Invalid("feed already exists")
            if txn.query("SELECT COUNT(*) FROM feeds WHERE userid = ?", userid)[0][0] >= self.max_feeds:
                raise LimitReached(f"Feed limit reached: at most {self.max_feeds} feeds per user")
            return txn.insert(
                "INSERT INTO feeds (userid, name, tag, datatype, public, engine, server, feed_interval, unit, created) "
                "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                userid, name, tag, datatype, engine, server, interval, unit, int(time.time()),
            )

        try:
            feedid = await self.db.transaction(insert)
        except (Invalid, LimitReached):
            raise
        except Exception as e:  # the unique index, when two creates race
            if is_duplicate(e):
                raise Invalid("feed already exists")
            raise
        return Feed(feedid, userid, name, tag, datatype, 0, engine, server, interval, unit)

    async def get(self, feedid: int) -> Feed | None:
        return await feed_by_id(self.db, feedid)

    async def get_many(self, feedids: Iterable[int]) -> dict[int, Feed]:
        """The feeds of ``feedids`` that exist, by id (one query)."""
        wanted = sorted(set(feedids))
        if not wanted:
            return {}
        marks = ", ".join("?" for _ in wanted)
        rows = await self.db.query(f"SELECT {COLUMNS} FROM feeds WHERE id IN ({marks})", *wanted)
        return {feed.id: feed for feed in map(Feed.from_row, rows)}

    async def list(self, userid: int, public_only: bool = False) -> list[Feed]:
        where = "userid = ? AND public = 1" if public_only else "userid = ?"
        rows = await self.db.query(f"SELECT {COLUMNS} FROM feeds WHERE {where} ORDER BY id", userid)
        return [Feed.from_row(row) for row in rows]

    async def update(self, feed: Feed, fields: dict[str, Any]) -> Feed:
        """Set name, tag, public and unit (other fields are ignored, as emoncms)."""
        changes: dict[str, Any] = {}
        if "name" in fields:
            changes["name"] = str(fields["name"])
            check_name(changes["name"])
        if "tag" in fields:
            changes["tag"] = str(fields["tag"])
            check_name(changes["tag"], "feed tag")
        if "public" in fields:
            changes["public"] = public_flag(fields["public"])
        if "unit" in fields:
            changes["unit"] = str(fields["unit"])
            check_unit(changes["unit"])
        if not changes:
            raise Invalid("Field could not be updated")
        assignments = ", ".join(f"{name} = ?" for name in changes)  # fixed names above
        name, tag = changes.get("name", feed.name), changes.get("tag", feed.tag)

        def update(txn: Any) -> None:
            if (name, tag) != (feed.name, feed.tag) and txn.query(
                "SELECT id FROM feeds WHERE userid = ? AND tag = ? AND name = ? AND id <> ?", feed.userid, tag, name, feed.id
            ):
                raise Invalid("fields tag:name must be unique")
            txn.execute(f"UPDATE feeds SET {assignments} WHERE id = ?", *changes.values(), feed.id)

        await self.db.transaction(update)
        return replace(feed, **changes)

    async def delete(self, feed: Feed) -> None:
        await self.db.execute("DELETE FROM feeds WHERE id = ?", feed.id)
        # the last value accepted, and the last one the storage sender put on disk
        await self.redis.call("DEL", keys.feed_lastvalue(feed.id), keys.feed_disk(feed.id))

    async def lastvalues(self, feedids: list[int]) -> dict[int, tuple[int, float] | None]:
        """The last accepted (time, value) of each feed (what was queued, not what is on disk)."""
        replies = await self.redis.pipeline([("HMGET", keys.feed_lastvalue(i), "time", "value") for i in feedids])
        out: dict[int, tuple[int, float] | None] = {}
        for feedid, reply in zip(feedids, replies):
            out[feedid] = _timevalue(reply)
        return out

    async def timevalues(
        self, feedids: list[int]
    ) -> dict[int, tuple[tuple[int, float] | None, tuple[int, float] | None]]:
        """(last accepted, last applied to disk by the storage sender) of each feed, one pipeline."""
        commands: list[tuple[Any, ...]] = []
        for i in feedids:
            commands += [("HMGET", keys.feed_lastvalue(i), "time", "value"), ("HMGET", keys.feed_disk(i), "time", "value")]
        replies = await self.redis.pipeline(commands)
        return {
            feedid: (_timevalue(replies[2 * n]), _timevalue(replies[2 * n + 1])) for n, feedid in enumerate(feedids)
        }

    async def set_lastvalue(self, feedid: int, when: int, value: float) -> None:
        await self.redis.call("HSET", keys.feed_lastvalue(feedid), "time", str(int(when)), "value", repr(float(value)))

    async def advance_lastvalue(self, feedid: int, when: int, value: float) -> bool:
        """Set the last value unless the stored one is newer (atomic); True if set."""
        done = await self.redis.call("EVAL", _ADVANCE, 1, keys.feed_lastvalue(feedid), str(int(when)), repr(float(value)))
        return bool(int(done))


def _timevalue(reply: Any) -> tuple[int, float] | None:
    """(time, value) from an HMGET reply; None if unset or unreadable."""
    try:
        t, v = reply
        if t is None or v is None:
            return None
        when, value = int(float(t)), float(v)
    except (TypeError, ValueError):
        return None
    return (when, value) if math.isfinite(value) else None
