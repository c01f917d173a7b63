"""The SQL of shards: the topology recorded in the central database (table ``shards``: each
shard's name and its storage server ids as text, "1,2") and what each shard holds."""

from __future__ import annotations

from typing import Mapping

from emond.meta.db import Database, Transaction


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
