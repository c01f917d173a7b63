"""Feeds: their metadata (database) and last values (Redis)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from emond.api import ApiError
from emond.db import Database
from emond.names import valid_feed_name
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES
from emond.redis import Redis

COLUMNS = "id, userid, name, tag, datatype, public, engine, server, feed_interval, unit"
ENGINE_UNAVAILABLE = {
    0: "mysql feed engine is not available",
    1: "timestore feed engine is not available",
    3: "graphite feed engine is not available",
    4: "phptimestore feed engine is not available",
    6: "PHPFiwa feed engine is not available",
}
MAX_NAME = 64


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


def check_name(name: str, what: str = "feed name") -> None:
    if len(name) > MAX_NAME:
        raise ApiError(f"{what} must be {MAX_NAME} characters or less")
    if not valid_feed_name(name):
        raise ApiError(f"invalid characters in {what}")


def check_engine(engine: int) -> None:
    if engine in ENGINE_UNAVAILABLE:
        raise ApiError(ENGINE_UNAVAILABLE[engine])
    if engine not in (ENGINE_PHPFINA, ENGINE_PHPTIMESERIES):
        raise ApiError("Engine id not valid")


class Feeds:
    def __init__(self, db: Database, redis: Redis) -> None:
        self.db = db
        self.redis = redis

    async def create(
        self, userid: int, name: str, tag: str, datatype: int, engine: int, interval: int, server: int, unit: str = ""
    ) -> Feed:
        check_name(name)
        check_name(tag, "feed tag")
        check_engine(engine)
        if datatype not in (1, 2, 3):
            raise ApiError("missing datatype: 1: realtime, 2: daily")

        def insert(txn: Any) -> int:
            if txn.query("SELECT id FROM feeds WHERE userid = ? AND tag = ? AND name = ?", userid, tag, name):
                raise ApiError("feed already exists")
            return txn.insert(
                "INSERT INTO feeds (userid, name, tag, datatype, public, engine, server, feed_interval, unit, created) "
                "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                userid, name, tag, datatype, engine, server, interval, unit, int(time.time()),
            )

        feedid = await self.db.transaction(insert)
        return Feed(feedid, userid, name, tag, datatype, 0, engine, server, interval, unit)

    async def get(self, feedid: int) -> Feed | None:
        row = await self.db.one(f"SELECT {COLUMNS} FROM feeds WHERE id = ?", feedid)
        return Feed.from_row(row) if row else None

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
            try:
                changes["public"] = 1 if int(fields["public"]) else 0
            except (TypeError, ValueError):
                raise ApiError("public must be 0 or 1")
        if "unit" in fields:
            changes["unit"] = str(fields["unit"])
            if len(changes["unit"]) > 16:
                raise ApiError("unit must be 16 characters or less")
        if not changes:
            raise ApiError("Field could not be updated")
        assignments = ", ".join(f"{name} = ?" for name in changes)  # fixed names above
        await self.db.execute(f"UPDATE feeds SET {assignments} WHERE id = ?", *changes.values(), feed.id)
        return replace(feed, **changes)

    async def delete(self, feed: Feed) -> None:
        await self.db.execute("DELETE FROM feeds WHERE id = ?", feed.id)
        await self.redis.call("DEL", f"feed:lastvalue:{feed.id}")

    async def lastvalues(self, feedids: list[int]) -> dict[int, tuple[int, float] | None]:
        """The last accepted (time, value) of each feed (what was queued, not what is on disk)."""
        replies = await self.redis.pipeline([("HMGET", f"feed:lastvalue:{i}", "time", "value") for i in feedids])
        out: dict[int, tuple[int, float] | None] = {}
        for feedid, (t, v) in zip(feedids, replies):
            out[feedid] = (int(t), float(v)) if t is not None and v is not None else None
        return out

    async def set_lastvalue(self, feedid: int, when: int, value: float) -> None:
        await self.redis.call("HSET", f"feed:lastvalue:{feedid}", "time", str(int(when)), "value", repr(float(value)))
