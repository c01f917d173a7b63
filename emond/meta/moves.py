"""The record of user moves between shards (the SQL of ``emond.cluster.move``).

A move's ``step`` is the next one to run and ``marks`` (JSON) what its steps noted for
the ones after (queue positions, where each feed's files were), so that running the move
again after any crash continues it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from emond.meta.db import Database, Transaction


@dataclass
class MoveRecord:
    userid: int
    source: str
    target: str
    step: str
    marks: dict[str, Any] = field(default_factory=dict)


class Moves:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def begin(self, userid: int, source: str, target: str, first_step: str) -> MoveRecord:
        """The user's move in progress, or a new one from its shard to ``target``."""

        def work(txn: Transaction) -> MoveRecord:
            rows = txn.query("SELECT source, target, step, marks FROM user_moves WHERE userid = ?", userid)
            if rows and rows[0][2] != "done":
                src, dst, step, marks = rows[0]
                return MoveRecord(userid, src, dst, step, json.loads(marks))
            now = int(time.time())
            txn.execute("DELETE FROM user_moves WHERE userid = ?", userid)
            txn.execute(
                "INSERT INTO user_moves (userid, source, target, step, marks, started, updated) VALUES (?, ?, ?, ?, '{}', ?, ?)",
                userid, source, target, first_step, now, now,
            )
            return MoveRecord(userid, source, target, first_step)

        return await self.db.transaction(work)

    async def advance(self, move: MoveRecord, step: str) -> None:
        """The steps before ``step`` are done (with what they noted in ``marks``)."""
        await self.db.execute(
            "UPDATE user_moves SET step = ?, marks = ?, updated = ? WHERE userid = ?",
            step, json.dumps(move.marks, sort_keys=True), int(time.time()), move.userid,
        )
        move.step = step

    async def set_shard(self, userid: int, shard: str) -> None:
        await self.db.execute("UPDATE users SET shard = ? WHERE id = ?", shard, userid)

    async def set_feed_server(self, feedid: int, server: int) -> None:
        await self.db.execute("UPDATE feeds SET server = ? WHERE id = ?", server, feedid)

    async def user(self, username: str) -> tuple[int, str] | None:
        """(id, shard) of a user by name (any case, as at login)."""
        rows = await self.db.query("SELECT id, shard FROM users WHERE username_key = ? OR username = ? ORDER BY id", username.lower(), username)
        return (int(rows[0][0]), str(rows[0][1])) if rows else None
