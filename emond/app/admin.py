"""``emond-admin``: the operator's view of users and shards (architecture §7), from a node's config.

    emond-admin --config FILE user show NAME
        {"id": .., "username": .., "shard": .., "feeds": N, "inputs": N, "email": .., "disabled": false,
         "admin": .., "timezone": .., "created": SECONDS, "lastlogin": SECONDS | null}
    emond-admin --config FILE shards
        {"NAME": {"storage": [ids], "users": N, "feeds": N, "input_queued": N,
                  "storage_queued": N, "lag": SECONDS}, ...}
    emond-admin --config FILE user move NAME SHARD
        blocks until the user is on SHARD; {"user": .., "id": .., "from": .., "to": ..,
        "steps": {STEP: SECONDS}, "feeds": {ID: {"from", "to", "bytes", "sha256"}}, ...}
        (a move cut short, by anything, finishes when the command is run again)

It reads the central database and each shard's Redis as a node configured by FILE would. The
answer is one JSON line on stdout (exit 0); an error is ``{"error": "..."}`` on stderr (exit 1;
exit 2 for a usage error). A move reaches every storage server over the stream, so FILE must
list them all in [storage.servers], with a [tls] certificate they allow.

The other commands live in modules of their own, each registering its subcommands here:
``check-config`` (emond.app.checkconfig), ``user list|disable|enable|reset-password``
(emond.app.admin_users), ``feed show|verify`` (emond.app.admin_feeds), ``queues`` and
``links`` (emond.app.admin_queues). Their shared parts are in emond.app.admin_common.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from emond.app import admin_feeds, admin_queues, admin_users, checkconfig, importer
from emond.app.admin_common import (
    AdminError,
    central_url,
    connected as _connected,
    fail as _fail,
    from_database as _from_database,
    open_database as _open_database,
    stream_links,
)
from emond.app.monitor import sample_streams
from emond.app.node import central_redis, shard_redis
from emond.cluster.move import MoveParts, Mover
from emond.cluster.topology import configured_topology, storage_ids
from emond.config import ConfigError, NodeConfig, load_node_config
from emond.keys import input_stream, storage_stream
from emond.errors import EmondError
from emond.meta.db import Database, DatabaseUnavailable
from emond.meta.feeds import Feeds
from emond.meta.inputs import Inputs
from emond.meta.moves import Moves
from emond.meta.accounts import user_details
from emond.meta.shards import recorded_shards, shard_counts
from emond.redis import RedisUnavailable
from emond.storage.feedstore import FeedStore

__all__ = ["AdminError", "central_url", "main"]


def main(argv: list[str] | None = None) -> None:
    """The ``emond-admin`` console script."""
    args = _parser().parse_args(argv)
    if getattr(args, "offline", None) is not None:
        args.offline(args)  # needs neither a node's config nor a reactor (check-config)
        return
    try:
        config = load_node_config(args.config)
    except ConfigError as e:
        _fail(str(e))
    handler = getattr(args, "handler", _run)  # a command family in a module of its own sets its handler
    task.react(lambda reactor: defer.ensureDeferred(handler(reactor, config, args)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emond-admin", description="Users and shards of an emond cluster.")
    parser.add_argument("--config", "-c", default="etc/emond.toml", help="a node's TOML config (default: etc/emond.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    user = commands.add_parser("user", help="one user").add_subparsers(dest="action", required=True)
    user.add_parser("show", help="a user's id, shard, feeds and inputs").add_argument("name")
    move = user.add_parser("move", help="move a user to another shard, online (blocks; run again to finish one cut short)")
    move.add_argument("name")
    move.add_argument("shard")
    commands.add_parser("shards", help="users, feeds, queued elements and lag per shard")
    importer.add_parser(commands)
    # Each module adds its subcommands, with ``handler`` (async, given reactor, config and args;
    # it prints the answer) or ``offline`` (given args alone, before any config is read).
    admin_users.register(user)
    admin_feeds.register(commands)
    admin_queues.register(commands)
    checkconfig.register(commands)
    return parser


async def _run(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> None:
    try:
        db = _open_database(config)
        try:
            if args.command == "shards":
                answer: dict[str, Any] = await shards_report(db, config, reactor)
            elif args.action == "move":
                answer = await move_user(db, config, reactor, args.name, args.shard)
            else:
                answer = await user_report(db, args.name)
        finally:
            await db.close()
    except AdminError as e:
        _fail(str(e))
    print(json.dumps(answer))


async def user_report(db: Database, name: str) -> dict[str, Any]:
    """``user show NAME``: the user's id, name, shard and how many feeds and inputs they have,
    and email, disabled, admin, timezone, created and lastlogin (emond.meta.accounts)."""
    found = await _from_database(user_details(db, name))
    if found is None:
        raise AdminError(f"no user named {name!r}")
    return found


async def shards_report(db: Database, config: NodeConfig, reactor: IReactorTime) -> dict[str, dict[str, Any]]:
    """``shards``: per shard, its storage servers, users and feeds (from the database), the
    elements waiting in its input and storage queues and the age of the oldest (its Redis).

    The shards are those recorded in the database (the config's before any node started),
    and any shard users are on: a config that disagrees cannot hide them. A shard this config
    does not know has no Redis to ask: its queue figures are null."""
    recorded = await _from_database(recorded_shards(db))
    counts = await _from_database(shard_counts(db))
    topology = recorded or configured_topology(config)
    report = {}
    for name in sorted(set(topology) | set(counts)):
        storage = storage_ids(topology[name]) if name in topology else []
        queues: dict[str, Any] = {"input_queued": None, "storage_queued": None, "lag": None}
        if name in config.shards:
            queues = await _queues(config, name, storage, reactor)
        report[name] = {
            "storage": storage,
            "users": counts.get(name, {}).get("users", 0),
            "feeds": counts.get(name, {}).get("feeds", 0),
            **queues,
        }
    return report


async def _queues(config: NodeConfig, name: str, storage: list[int], reactor: IReactorTime) -> dict[str, Any]:
    """The shard's queued input and storage elements, and the lag over all its queues."""
    inputs = [input_stream(q) for q in range(config.input.queues)]
    stores = [storage_stream(sid) for sid in storage]
    redis = shard_redis(config, name, central_url(config)).client(reactor, poolsize=1)
    redis.open()
    try:
        samples = await sample_streams(redis, inputs + stores, reactor)
    except RedisUnavailable as e:
        raise AdminError(f"shard {name}: {e}") from e
    finally:
        await redis.disconnect()
    return {
        "input_queued": sum(samples[s][0] for s in inputs),
        "storage_queued": sum(samples[s][0] for s in stores),
        "lag": round(max(lag for _, lag in samples.values()), 3),
    }


async def move_user(db: Database, config: NodeConfig, reactor: Any, name: str, shard: str) -> dict[str, Any]:
    """``user move NAME SHARD``: run (or resume) the move (``emond.cluster.move``)."""
    hosted = [sid for s in config.shards.values() for sid in s.storage if sid not in config.storage_servers]
    if hosted or config.tls is None:
        raise AdminError(
            f"storage servers {hosted} are not in [storage.servers]: a move reaches every storage server over the stream"
        )
    central = central_redis(config, central_url(config)).client(reactor)
    central.open()
    redis = {s: shard_redis(config, s, central.url).client(reactor) for s in config.shards}
    links = stream_links(config, reactor)
    store = FeedStore({}, reactor, config.feeds.read_timeout)
    try:
        for client in redis.values():
            client.open()
        for sid, link in links.items():
            link.startService()
            store.remotes[sid] = link
        await _connected(links, config.feeds.read_timeout, reactor)
        parts = MoveParts(config, Moves(db), Inputs(db, central), Feeds(db, central), central, redis.__getitem__, store, reactor)
        return await Mover(parts).move(name, shard)
    except (EmondError, RedisUnavailable, DatabaseUnavailable, OSError) as e:
        raise AdminError(f"user move: {getattr(e, 'message', None) or e} (run the command again to go on)") from e
    finally:
        for link in links.values():
            await link.stopService()
        for client in [central, *redis.values()]:
            await client.disconnect()
