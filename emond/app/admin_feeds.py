"""``emond-admin feed show|verify ID``: a feed's metadata (the database) and its files (the
storage server that holds them).

    feed show ID     {"id", "userid", "name", "tag", "engine", "interval", "datatype", "public",
                      "unit", "server", "storage": "hosted"|"remote",
                      "files": {NAME: {"size": BYTES}}, "meta": {...}, "last": [TIME, VALUE]}
    feed verify ID   the same, each file with its "sha256", and "ok": true; when the files do
                     not fit their format or the database (sizes, meta, record order, the
                     interval), exit 1 with {"error": ..., "problems": [...], ...the rest}

The files are read where they are: in this process when the config's node hosts the feed's
storage server ([node] storage: its data directory, read only), else through the storage
server over the stream (the ``inspect`` read: it reads them in its own read threads), which
the config must reach ([storage.servers] and [tls]). ``meta`` is what the engine reads (PHPFina:
interval, start_time, npoints, end_time; PHPTimeSeries: npoints, start_time, end_time);
``last`` the last slot or record ([time, null] for a missing value; null for an empty feed).
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import threads

from emond.app.admin_common import AdminError, command, connected, from_database, stream_links, with_database
from emond.config import NodeConfig
from emond.meta.feeds import Feed, feed_by_id
from emond.records import ENGINE_PHPFINA
from emond.storage.inspect import inspect_feed
from emond.storage.location import location_dir
from emond.storage.remote import RemoteReadError, RemoteUnavailable

VERIFY_TIMEOUT = 600.0  # seconds a storage server may take to hash a feed's files (default of --timeout)


def register(commands: Any) -> None:
    """Add ``feed show|verify`` to emond-admin's subcommands."""
    feed = commands.add_parser("feed", help="one feed: its metadata and files").add_subparsers(dest="action", required=True)
    show = feed.add_parser("show", help="a feed's metadata, file sizes, meta and last point")
    show.add_argument("id", type=int)
    show.set_defaults(handler=command(feed_show))
    verify = feed.add_parser("verify", help="check a feed's files against their format and the database; SHA-256 of each (exit 1 if not consistent)")
    verify.add_argument("id", type=int)
    verify.add_argument("--timeout", type=float, default=VERIFY_TIMEOUT, help=f"seconds a remote storage server may take (default {VERIFY_TIMEOUT:g})")
    verify.set_defaults(handler=command(feed_verify))


async def feed_show(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    report = await feed_report(reactor, config, args.id, False, config.feeds.read_timeout)
    report.pop("problems")
    return report


async def feed_verify(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    report = await feed_report(reactor, config, args.id, True, args.timeout)
    problems = report["problems"]
    if problems:
        raise AdminError(f"feed {args.id}: not consistent: {'; '.join(problems)}", **report, ok=False)
    return {**report, "ok": True}


async def feed_report(reactor: Any, config: NodeConfig, feedid: int, verify: bool, timeout: float) -> dict[str, Any]:
    """The feed's row and what is on disk for it; ``problems``: what does not fit."""
    feed = await with_database(config, lambda db: from_database(feed_by_id(db, feedid)))
    if feed is None:
        raise AdminError(f"no feed {feedid}")
    storage, disk = await _inspect(reactor, config, feed, verify, timeout)
    problems = list(disk["problems"])
    meta = disk["meta"]
    if feed.engine == ENGINE_PHPFINA and meta is not None and feed.interval and meta["interval"] != feed.interval:
        problems.append(f"the meta's interval is {meta['interval']} s, the database's {feed.interval} s")
    return {
        "id": feed.id,
        "userid": feed.userid,
        "name": feed.name,
        "tag": feed.tag,
        "engine": feed.engine,
        "interval": feed.interval,
        "datatype": feed.datatype,
        "public": bool(feed.public),
        "unit": feed.unit,
        "server": feed.server,
        "storage": storage,
        "files": disk["files"],
        "meta": meta,
        "last": disk["last"],
        "problems": problems,
    }


async def _inspect(reactor: Any, config: NodeConfig, feed: Feed, verify: bool, timeout: float) -> tuple[str, dict[str, Any]]:
    """("hosted" or "remote", ``emond.storage.inspect.inspect_feed``'s answer) for the feed."""
    server = feed.server
    if server in config.node.storage:
        datadir = location_dir(config.node.datadir, server, config.node.storage.index(server) == 0)
        return "hosted", await threads.deferToThread(inspect_feed, datadir, feed.engine, feed.id, verify)
    if server not in config.storage_servers:
        raise AdminError(
            f"feed {feed.id} is on storage server {server}, which this config neither hosts ([node] storage) nor reaches ([storage.servers])"
        )
    links = stream_links(config, reactor, [server])
    link = links[server]
    link.startService()
    try:
        await connected(links, config.feeds.read_timeout, reactor)
        return "remote", await link.request("inspect", feed.id, feed.engine, verify, timeout=timeout)
    except (RemoteUnavailable, RemoteReadError) as e:
        raise AdminError(f"storage server {server}: {e}") from e
    finally:
        await link.stopService()
