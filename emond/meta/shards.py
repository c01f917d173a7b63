"""The SQL of shards: the topology recorded in the central database (table ``shards``: each
shard's name and its storage server ids as text, "1,2") and what each shard holds."""

from __future__ import annotations

from typing import Any, Mapping

from emond.meta.db import Database, Transaction
from emond.meta.users import username_key


def recorded_topology(txn: Transaction) -> dict[str, str]:
    """Shard name -> its storage server ids ("1,2"), as recorded; empty before the first start."""
    return {name: storage for name, storage in txn.query("SELECT name, storage FROM shards")}


def record_topology(txn: Transaction, topology: Mapping[str, str]) -> None:
    """Record ``topology`` in place of what was recorded."""
    txn.execute("DELETE FROM shards")
    txn.executemany("INSERT INTO shards (name, storage) VALUES (?, ?)", sorted(topology.items()))


def shards_of_users(txn: Transaction) -> set[str]:
    """The shards that hold at least one user."""
    return {name for (name,) in txn.query("SELECT DISTINCT shard FROM users")}


async def shard_counts(db: Database) -> dict[str, dict[str, int]]:
    """Shard name -> {"users": N, "feeds": N} for every shard that holds a user."""
    counts: dict[str, dict[str, int]] = {}
    for name, users in await db.query("SELECT shard, COUNT(*) FROM users GROUP BY shard"):
        counts[name] = {"users": int(users), "feeds": 0}
    rows = await db.query("SELECT u.shard, COUNT(*) FROM feeds f JOIN users u ON u.id = f.userid GROUP BY u.shard")
    for name, feeds in rows:
        counts[name]["feeds"] = int(feeds)
    return counts


async def recorded_shards(db: Database) -> dict[str, str]:
    return await db.transaction(recorded_topology)


async def user_placement(db: Database, username: str) -> dict[str, Any] | None:
    """``{"id", "username", "shard", "feeds", "inputs"}`` of the user of that exact name, else
    of the one holding it whatever its case (emond.meta.users: names are unique whatever their
    case; older twins keep their exact spelling); None when there is none."""
    statement = (
        "SELECT u.id, u.username, u.shard,"
        " (SELECT COUNT(*) FROM feeds f WHERE f.userid = u.id),"
        " (SELECT COUNT(*) FROM inputs i WHERE i.userid = u.id)"
        " FROM users u WHERE {where} ORDER BY u.id"
    )
    row = await db.one(statement.format(where="u.username = ?"), username)
    if row is None:
        row = await db.one(statement.format(where="u.username_key = ?"), username_key(username))
    if row is None:
        return None
    userid, name, shard, feeds, inputs = row
    return {"id": int(userid), "username": name, "shard": shard, "feeds": int(feeds), "inputs": int(inputs)}
