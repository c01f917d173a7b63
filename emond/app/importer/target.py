"""emond's database as the import sees it: what is there already, and the rows it adds.

The import keeps emoncms's ids. An item already in emond with the same id *and* the same
identity (a user's username; a feed's user, tag and name; an input's user, node and name)
was imported by an earlier run and is left as it is (emond may have changed it since);
the same id with another identity is a conflict, reported. Everything the run adds is
also entered in the ``Index``, so a dry run judges later items as a real run would.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from emond.app.importer.source import SourceFeed, SourceInput, SourceUser
from emond.meta.db import Database, Transaction
from emond.meta.users import apikey_digest, username_key


class UserRow(NamedTuple):
    username: str
    shard: str


class FeedRow(NamedTuple):
    userid: int
    tag: str
    name: str
    engine: int
    server: int


class InputRow(NamedTuple):
    userid: int
    nodeid: str
    name: str


@dataclass
class Index:
    """emond's users, feeds and inputs by id and by what must be unique."""

    users: dict[int, UserRow] = field(default_factory=dict)
    username_keys: dict[str, int] = field(default_factory=dict)  # lowercased name -> the user holding it
    usernames: dict[str, int] = field(default_factory=dict)  # exact name -> user
    key_owners: dict[str, int] = field(default_factory=dict)  # API key digest -> user
    feeds: dict[int, FeedRow] = field(default_factory=dict)
    feed_names: dict[tuple[int, str, str], int] = field(default_factory=dict)
    inputs: dict[int, InputRow] = field(default_factory=dict)
    input_names: dict[tuple[int, str, str], int] = field(default_factory=dict)
    feeds_of: dict[int, set[int]] = field(default_factory=dict)  # user -> its feeds
    inputs_of: dict[int, set[int]] = field(default_factory=dict)  # user -> its inputs

    def add_user(self, userid: int, username: str, shard: str, holds_key: bool, digests: tuple[str, ...]) -> None:
        self.users[userid] = UserRow(username, shard)
        self.usernames[username] = userid
        if holds_key:
            self.username_keys.setdefault(username_key(username), userid)
        for d in digests:
            self.key_owners[d] = userid

    def add_feed(self, feedid: int, row: FeedRow) -> None:
        self.feeds[feedid] = row
        self.feed_names[(row.userid, row.tag, row.name)] = feedid
        self.feeds_of.setdefault(row.userid, set()).add(feedid)

    def add_input(self, inputid: int, row: InputRow) -> None:
        self.inputs[inputid] = row
        self.input_names[(row.userid, row.nodeid, row.name)] = inputid
        self.inputs_of.setdefault(row.userid, set()).add(inputid)


async def load_index(db: Database | None) -> Index:
    """What emond holds now (an emond database not created yet holds nothing)."""
    index = Index()
    if db is None:
        return index
    try:
        await db.query("SELECT version FROM schema_version")
    except Exception:
        return index  # no schema yet: a first start (or this import) makes it
    columns = "id, username, shard, apikey_write_hash, apikey_read_hash"
    try:
        users = await db.query(f"SELECT {columns}, username_key FROM users ORDER BY id")
    except Exception:  # a schema before shards / unique usernames: a dry run reads what is there
        users = [(*row, None) for row in await db.query("SELECT id, username, 'default', apikey_write_hash, apikey_read_hash FROM users ORDER BY id")]
    for userid, username, shard, write, read, key in users:
        index.add_user(int(userid), username, shard, key is not None, (write, read))
    for feedid, userid, tag, name, engine, server in await db.query("SELECT id, userid, tag, name, engine, server FROM feeds"):
        index.add_feed(int(feedid), FeedRow(int(userid), tag, name, int(engine), int(server)))
    for inputid, userid, nodeid, name in await db.query("SELECT id, userid, nodeid, name FROM inputs"):
        index.add_input(int(inputid), InputRow(int(userid), nodeid, name))
    return index


class NewUser(NamedTuple):
    """A user row as emond stores it (after plan's checks)."""

    source: SourceUser
    shard: str
    timezone: str
    apikey_write: str
    apikey_read: str
    holds_key: bool  # gets username_key (not a case twin of a user already holding it)


class Writer:
    """The rows an import adds to emond's database, each with its emoncms id."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert_feed(self, feed: SourceFeed, server: int, interval: int) -> None:
        await self.db.insert(
            "INSERT INTO feeds (id, userid, name, tag, datatype, public, engine, server, feed_interval, unit, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            feed.id, feed.userid, feed.name, feed.tag, feed.datatype, feed.public, feed.engine, server, interval,
            feed.unit, int(time.time()),
        )

    async def insert_inputs(self, rows: list[tuple[SourceInput, str, str]]) -> None:
        """(input, description, process list) rows, in one transaction."""

        def work(txn: Transaction) -> None:
            for inp, description, processlist in rows:
                txn.execute(
                    "INSERT INTO inputs (id, userid, nodeid, name, description, processList, time, value) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    inp.id, inp.userid, inp.nodeid, inp.name, description, processlist, inp.time, inp.value,
                )

        if rows:
            await self.db.transaction(work)

    async def insert_user(self, new: NewUser) -> None:
        u = new.source
        await self.db.insert(
            "INSERT INTO users (id, username, username_key, email, password, salt, apikey_write, apikey_read, "
            "apikey_write_hash, apikey_read_hash, uuid, admin, name, location, timezone, language, bio, gravatar, "
            "startingpage, lastlogin, created, shard) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            u.id, u.username, username_key(u.username) if new.holds_key else None, u.email, u.password, u.salt,
            new.apikey_write, new.apikey_read, apikey_digest(new.apikey_write), apikey_digest(new.apikey_read),
            u.uuid or str(uuid.uuid4()), u.admin, u.name, u.location, new.timezone, u.language[:5], u.bio, u.gravatar,
            u.startingpage, u.lastlogin, int(time.time()), new.shard,
        )


    async def reserve_ids(self, table: str, highest: int) -> None:
        """Make the next id ``table`` gives out larger than ``highest``: ids of emoncms items
        not imported (their steps kept in process lists, a fixed feed imported later) are
        never given to a new emond item. The counter only ever grows."""
        assert table in ("users", "inputs", "feeds")  # names from here only

        def work(txn: Transaction) -> None:
            if self.db.dialect == "sqlite":
                if txn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ? AND seq < ?", highest, table, highest) == 0:
                    if not txn.query("SELECT seq FROM sqlite_sequence WHERE name = ?", table):
                        txn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", table, highest)
                return
            found = txn.query(
                "SELECT AUTO_INCREMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?", table
            )
            if found and found[0][0] is not None and int(found[0][0]) > highest:
                return
            txn.execute(f"ALTER TABLE {table} AUTO_INCREMENT = {int(highest) + 1}")

        if highest > 0:
            await self.db.transaction(work)


def describe(error: Any) -> str:
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__
