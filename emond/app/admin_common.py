"""What every ``emond-admin`` command shares: its errors and how they are said, the database
and the central Redis as the node configured by ``--config`` reaches them, and links to the
storage servers over the stream.

An answer is one JSON line on stdout (exit 0); an error is ``{"error": "...", ...}`` on stderr
(exit 1; argparse's usage errors exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Awaitable, Callable, NoReturn, TypeVar

from prometheus_client import CollectorRegistry
from twisted.internet import task

from emond.app.redisproc import embedded_redis_url
from emond.config import NodeConfig
from emond.meta.db import Database
from emond.storage.remote import LinkMetrics, StreamLink

T = TypeVar("T")


class AdminError(Exception):
    """What the command could not do, said to the operator; ``details`` go into the error's
    JSON beside ``"error"`` (e.g. the problems a check found)."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


def fail(message: str, status: int = 1, **details: Any) -> NoReturn:
    print(json.dumps({"error": message, **details}), file=sys.stderr)
    raise SystemExit(status)  # task.react exits with it


def answer(payload: Any) -> None:
    print(json.dumps(payload))


Handler = Callable[[Any, NodeConfig, argparse.Namespace], Awaitable[None]]


def command(work: Callable[[Any, NodeConfig, argparse.Namespace], Awaitable[Any]]) -> Handler:
    """An ``emond-admin`` handler (``set_defaults(handler=...)``) of ``work(reactor, config,
    args)``: its result printed as the answer, its AdminError as the error."""

    async def handler(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> None:
        try:
            result = await work(reactor, config, args)
        except AdminError as e:
            fail(str(e), **e.details)
        answer(result)

    return handler


def open_database(config: NodeConfig) -> Database:
    path = config.sqlite_path
    if path is not None and not os.path.exists(path):
        raise AdminError(f"database: no such file: {path} (a node creates it at its first start)")
    return Database.connect(config.database.url, path)


async def from_database(work: Awaitable[T]) -> T:
    """``work``'s result; a database error becomes an AdminError naming it."""
    try:
        return await work
    except AdminError:
        raise
    except Exception as e:
        raise AdminError(f"database: {e}") from e


async def with_database(config: NodeConfig, work: Callable[[Database], Awaitable[T]]) -> T:
    """``work(db)`` on the config's database, closed after."""
    db = open_database(config)
    try:
        return await work(db)
    finally:
        await db.close()


def central_url(config: NodeConfig) -> str:
    """The central Redis: the node's [redis], else its private redis-server (a single node)."""
    return config.redis.url or embedded_redis_url(config.node.datadir)


def stream_links(config: NodeConfig, reactor: Any, servers: list[int] | None = None) -> dict[int, StreamLink]:
    """Links (reads only) to the storage servers of ``[storage.servers]`` (or those of
    ``servers`` among them), not started."""
    if config.tls is None:
        return {}
    metrics = LinkMetrics(CollectorRegistry())
    return {
        sid: StreamLink(sid, remote, config.tls, config.node.name, metrics, reactor)
        for sid, remote in config.storage_servers.items()
        if servers is None or sid in servers
    }


async def connected(links: dict[int, StreamLink], timeout: float, reactor: Any) -> None:
    """Wait until every link's stream is up; an AdminError naming those that are not."""
    deadline = reactor.seconds() + timeout
    while True:
        down = sorted(sid for sid, link in links.items() if link.protocol is None)
        if not down:
            return
        if reactor.seconds() > deadline:
            raise AdminError(f"storage servers {down}: no stream within {timeout:g} s")
        await task.deferLater(reactor, 0.1, lambda: None)
