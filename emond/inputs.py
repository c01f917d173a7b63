"""Inputs: their metadata (database) and last values (Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emond.api import ApiError
from emond.db import Database
from emond.names import valid_input_name
from emond.redis import Redis

COLUMNS = "id, userid, nodeid, name, description, processList"
MAX_NODE = 16
MAX_NAME = 64


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
        raise ApiError("Error: invalid node name")
    if len(node) > MAX_NODE:
        raise ApiError(f"Error: node name must be {MAX_NODE} characters or less")


def check_input_name(name: str) -> None:
    if not name or not valid_input_name(name):
        raise ApiError("Error: Format error, json key missing or invalid character")
    if len(name) > MAX_NAME:
        raise ApiError(f"Error: input name must be {MAX_NAME} characters or less")


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
        return Input(inputid, userid, nodeid, name, "", "")

    async def get(self, inputid: int) -> Input | None:
        row = await self.db.one(f"SELECT {COLUMNS} FROM inputs WHERE id = ?", inputid)
        return Input.from_row(row) if row else None

    async def owned(self, userid: int, inputid: int) -> Input:
        found = await self.get(inputid)
        if found is None or found.userid != userid:
            raise ApiError("Input does not exist")
        return found

    async def list(self, userid: int) -> list[Input]:
        rows = await self.db.query(f"SELECT {COLUMNS} FROM inputs WHERE userid = ? ORDER BY id", userid)
        return [Input.from_row(row) for row in rows]

    async def set_description(self, inp: Input, description: str) -> None:
        if len(description) > 255:
            raise ApiError("description must be 255 characters or less")
        await self.db.execute("UPDATE inputs SET description = ? WHERE id = ?", description, inp.id)

    async def set_processlist(self, inp: Input, processlist: str) -> None:
        await self.db.execute("UPDATE inputs SET processList = ? WHERE id = ?", processlist, inp.id)

    async def delete(self, userid: int, inputids: list[int]) -> int:
        deleted = 0
        for inputid in inputids:
            deleted += await self.db.execute("DELETE FROM inputs WHERE id = ? AND userid = ?", inputid, userid)
        if inputids:
            await self.redis.call("DEL", *[f"input:lastvalue:{i}" for i in inputids])
        return deleted

    async def lastvalues(self, inputids: list[int]) -> dict[int, tuple[int, float | None] | None]:
        if not inputids:
            return {}
        replies = await self.redis.pipeline([("HMGET", f"input:lastvalue:{i}", "time", "value") for i in inputids])
        out: dict[int, tuple[int, float | None] | None] = {}
        for inputid, (t, v) in zip(inputids, replies):
            if t is None:
                out[inputid] = None
            else:
                out[inputid] = (int(t), None if v in (None, b"") else float(v))
        return out
