"""The emoncms server being imported: its MySQL/MariaDB database and, optionally, its Redis.

Columns are read by what each table has (``information_schema``), so the current schema
(``Modules/*/*_schema.php``) and older ones (emoncms.org's 2018 build: ``users`` without
``uuid``, ``feeds`` without ``unit``, ``time`` as DATETIME) read alike; a missing column
takes emoncms's default. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from emond.app.importer.plan import finite, unix_time
from emond.meta.db import Database
from emond.process.functions import EXTRA_STATE
from emond.redis import Redis

# The prefixes emoncms may have put before its Redis keys (phpredis OPT_PREFIX, literal:
# settings.ini's default "emoncms" makes "emoncmsfeed:5").
REDIS_PREFIXES = ("", "emoncms", "emoncms:")
PROBE = 50  # keys of each kind looked at to find the prefix


@dataclass(frozen=True)
class SourceUser:
    id: int
    username: str
    email: str
    password: str
    salt: str
    apikey_write: str
    apikey_read: str
    admin: int
    timezone: str
    name: str
    location: str
    language: str
    bio: str
    gravatar: str
    startingpage: str
    uuid: str
    lastlogin: int | None


@dataclass(frozen=True)
class SourceInput:
    id: int
    userid: int
    nodeid: str
    name: str
    description: str
    processlist: str
    time: int | None
    value: float | None


@dataclass(frozen=True)
class SourceFeed:
    id: int
    userid: int
    name: str
    tag: str
    datatype: int
    public: int
    engine: int
    unit: str


@dataclass(frozen=True)
class SourceData:
    users: tuple[SourceUser, ...]
    inputs: tuple[SourceInput, ...]
    feeds: tuple[SourceFeed, ...]
    missing_tables: tuple[str, ...]


def _text(value: Any, default: str = "") -> str:
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class EmoncmsDatabase:
    """The emoncms database at a ``mysql://USER:PASSWORD@HOST:PORT/DB`` url, read in the
    pool's threads (the reactor never waits on it)."""

    def __init__(self, url: str) -> None:
        self.db = Database.from_url(url)

    def open(self) -> None:
        self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def columns(self, table: str) -> frozenset[str]:
        rows = await self.db.query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?", table
        )
        return frozenset(_text(row[0]) for row in rows)

    async def _rows(self, table: str, wanted: Iterable[str]) -> tuple[list[dict[str, Any]], bool]:
        """Every row of ``table`` as {column: value} for the ``wanted`` columns it has, by id;
        (rows, whether the table exists)."""
        have = await self.columns(table)
        if not have:
            return [], False
        names = [c for c in wanted if c in have]
        listed = ", ".join(f"`{c}`" for c in names)  # names from our own lists only
        rows = await self.db.query(f"SELECT {listed} FROM `{table}` ORDER BY id")
        return [dict(zip(names, row)) for row in rows], True

    async def read(self) -> SourceData:
        missing: list[str] = []
        users, ok = await self._rows("users", (
            "id", "username", "email", "password", "salt", "apikey_write", "apikey_read", "admin", "timezone", "name",
            "location", "language", "bio", "gravatar", "startingpage", "uuid", "lastlogin",
        ))
        if not ok:
            missing.append("users")
        inputs, ok = await self._rows("input", ("id", "userid", "nodeid", "name", "description", "processList", "time", "value"))
        if not ok:
            missing.append("input")
        feeds, ok = await self._rows("feeds", ("id", "userid", "name", "tag", "datatype", "public", "engine", "unit"))
        if not ok:
            missing.append("feeds")
        return SourceData(
            tuple(_user(r) for r in users), tuple(_input(r) for r in inputs), tuple(_feed(r) for r in feeds), tuple(missing)
        )


def _user(r: Mapping[str, Any]) -> SourceUser:
    return SourceUser(
        id=_int(r["id"]),
        username=_text(r.get("username")),
        email=_text(r.get("email")),
        password=_text(r.get("password")),
        salt=_text(r.get("salt")),
        apikey_write=_text(r.get("apikey_write")),
        apikey_read=_text(r.get("apikey_read")),
        admin=_int(r.get("admin")),
        timezone=_text(r.get("timezone"), "UTC"),
        name=_text(r.get("name")),
        location=_text(r.get("location")),
        language=_text(r.get("language"), "en_EN") or "en_EN",
        bio=_text(r.get("bio")),
        gravatar=_text(r.get("gravatar")),
        startingpage=_text(r.get("startingpage"), "feed/list") or "feed/list",
        uuid=_text(r.get("uuid")),
        lastlogin=unix_time(r.get("lastlogin")),
    )


def _input(r: Mapping[str, Any]) -> SourceInput:
    return SourceInput(
        id=_int(r["id"]),
        userid=_int(r.get("userid")),
        nodeid=_text(r.get("nodeid")),
        name=_text(r.get("name")),
        description=_text(r.get("description")),
        processlist=_text(r.get("processList")),
        time=unix_time(r.get("time")),
        value=finite(r.get("value")),
    )


def _feed(r: Mapping[str, Any]) -> SourceFeed:
    return SourceFeed(
        id=_int(r["id"]),
        userid=_int(r.get("userid")),
        name=_text(r.get("name")),
        tag=_text(r.get("tag")),
        datatype=_int(r.get("datatype"), 1),
        public=1 if _int(r.get("public")) else 0,
        engine=_int(r.get("engine"), -1),
        unit=_text(r.get("unit")),
    )


# -- the old Redis -------------------------------------------------------------------------

Hash = dict[str, str]


def _hash(reply: Any) -> Hash:
    """An HGETALL reply as {field: text}."""
    if isinstance(reply, dict):
        pairs = list(reply.items())
    else:
        reply = list(reply or [])
        pairs = list(zip(reply[::2], reply[1::2]))
    return {_text(k): _text(v) for k, v in pairs}


def timevalue(fields: Hash) -> Hash | None:
    """A {time, value} hash of emoncms as emond stores it: unix seconds (emoncms.org kept
    feed times as local date strings) and the value as written; None if it has no time."""
    when = unix_time(fields.get("time"))
    if when is None:
        return None
    value = finite(fields.get("value"))
    return {"time": str(when), "value": "" if value is None else fields["value"].strip()}


class EmoncmsRedis:
    """The state the old server kept in Redis, under its key prefix (found by probing)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.prefix = ""

    async def find_prefix(self, inputids: list[int], feedids: list[int]) -> str:
        """The prefix under which most of the keys of these inputs and feeds are found."""
        probes = [f"input:lastvalue:{i}" for i in inputids[:PROBE]]
        probes += [f"feed:{i}" for i in feedids[:PROBE]] + [f"feed:lastvalue:{i}" for i in feedids[:PROBE]]
        best, hits = "", 0
        for prefix in REDIS_PREFIXES:
            if not probes:
                break
            found = sum(int(r) for r in await self.redis.pipeline([("EXISTS", prefix + k) for k in probes]))
            if found > hits:
                best, hits = prefix, found
        self.prefix = best
        return best

    async def hashes(self, names: list[str]) -> list[Hash]:
        if not names:
            return []
        replies = await self.redis.pipeline([("HGETALL", self.prefix + n) for n in names])
        return [_hash(r) for r in replies]

    async def input_lastvalues(self, inputids: list[int]) -> dict[int, Hash]:
        found = await self.hashes([f"input:lastvalue:{i}" for i in inputids])
        return {i: tv for i, h in zip(inputids, found) if (tv := timevalue(h)) is not None}

    async def feed_lastvalues(self, feedids: list[int]) -> dict[int, Hash]:
        """Current emoncms keeps a feed's last value in ``feed:<id>`` (time, value among its
        fields), emoncms.org in ``feed:lastvalue:<id>``; the first found is taken."""
        current = await self.hashes([f"feed:{i}" for i in feedids])
        org = await self.hashes([f"feed:lastvalue:{i}" for i in feedids])
        out: dict[int, Hash] = {}
        for feedid, a, b in zip(feedids, current, org):
            tv = timevalue(a) or timevalue(b)
            if tv is not None:
                out[feedid] = tv
        return out

    async def process_state(self, feedids: list[int]) -> dict[tuple[str, int], Hash]:
        """The {time, value} the stateful processes keep per feed (``process:<name>:<feed>``,
        the same names in emond)."""
        names = sorted(set(EXTRA_STATE.values()))
        wanted = [(name, f) for f in feedids for name in names]
        found = await self.hashes([f"process:{name}:{f}" for name, f in wanted])
        return {key: tv for key, h in zip(wanted, found) if (tv := timevalue(h)) is not None}
