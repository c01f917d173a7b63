"""``emond-admin queues`` and ``emond-admin links``: the queues of each shard, and the stream
links of a running node.

    queues   {SHARD: {"input": {"N": QUEUE, ...}, "storage": {"ID": QUEUE, ...},
                      "consumers": [{"name", "expires_in"}, ...]}, ...}
             QUEUE = {"length", "lag" (seconds the oldest element has waited), "dead" (elements
             set aside after failing), "lease": {"holder", "token", "ttl" (seconds)} | null}
             read from each shard's Redis, for the shards of the config.
    links    {"node": URL, "source": "node", "links": {"ID": {"state": "connected"|"disconnected",
              "role": "sender"|"reader", "window", "unacked", "holding_queue", "rtt", "ok", "error"}}}
             asked of a running node: its /health (the senders: window, unacked batches, lease)
             and its /metrics (every link's state, readers included); ``--url`` names the node
             (default: [node] http of the config), with [health] admin_token as the bearer
             token when set (else the node answers details only to its own machine).
    links --own
             this command opens its own links (reads only) to the config's [storage.servers]
             and pings each: {"source": "own", "links": {"ID": {"state", "rtt", "server": ...}}}
             (no window: such a link carries no batches); says whether this config can reach
             them (addresses, certificates).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import urljoin

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error as net_error, task
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from emond import keys
from emond.app.admin_common import AdminError, command, central_url, stream_links
from emond.app.monitor import sample_streams
from emond.app.node import shard_redis
from emond.config import NodeConfig
from emond.redis import RedisUnavailable
from emond.storage.remote import RemoteReadError, RemoteUnavailable

HTTP_TIMEOUT = 10.0  # seconds a node has to answer /health and /metrics
OWN_TIMEOUT = 5.0  # seconds --own waits for its links to come up


def register(commands: Any) -> None:
    """Add ``queues`` and ``links`` to emond-admin's subcommands."""
    commands.add_parser("queues", help="per shard: each queue's length, lag, dead letters and lease; the live consumers").set_defaults(
        handler=command(queues_report)
    )
    links = commands.add_parser("links", help="a running node's stream links to its storage servers: state, window, unacked")
    links.add_argument("--url", help="the node's HTTP root, e.g. http://127.0.0.1:8080/ (default: from [node] http)")
    links.add_argument("--own", action="store_true", help="open this command's own links to [storage.servers] and ping each, instead")
    links.add_argument("--timeout", type=float, default=OWN_TIMEOUT, help=f"with --own: seconds to wait for the links (default {OWN_TIMEOUT:g})")
    links.set_defaults(handler=command(links_report))


# -- queues --------------------------------------------------------------------------------


async def queues_report(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    return {name: await _shard_queues(reactor, config, name) for name in sorted(config.shards)}


async def _shard_queues(reactor: Any, config: NodeConfig, shard: str) -> dict[str, Any]:
    queues = {("input", str(q)): keys.input_queue(q) for q in range(config.input.queues)}
    queues.update({("storage", str(sid)): keys.storage_queue(sid) for sid in config.shards[shard].storage})
    redis = shard_redis(config, shard, central_url(config)).client(reactor, poolsize=1)
    redis.open()
    try:
        samples = await sample_streams(redis, [keys.stream(name) for name in queues.values()], reactor)
        commands: list[tuple[Any, ...]] = []
        for name in queues.values():
            commands += [("GET", keys.lease(name)), ("PTTL", keys.lease(name)), ("XLEN", keys.dead_letters(keys.stream(name)))]
        now_ms = int(reactor.seconds() * 1000)
        commands.append(("ZRANGEBYSCORE", keys.CONSUMERS, now_ms, "+inf", "WITHSCORES"))
        replies = await redis.pipeline(commands)
    except RedisUnavailable as e:
        raise AdminError(f"shard {shard}: {e}") from e
    finally:
        await redis.disconnect()
    report: dict[str, Any] = {"input": {}, "storage": {}}
    for i, ((kind, label), name) in enumerate(queues.items()):
        length, lag = samples[keys.stream(name)]
        holder, ttl_ms, dead = replies[3 * i : 3 * i + 3]
        report[kind][label] = {"length": length, "lag": round(lag, 3), "dead": int(dead), "lease": _lease(holder, int(ttl_ms))}
    members = replies[-1]
    report["consumers"] = [
        {"name": members[j].decode(), "expires_in": round((float(members[j + 1]) - now_ms) / 1000, 3)} for j in range(0, len(members), 2)
    ]
    return report


def _lease(value: bytes | None, ttl_ms: int) -> dict[str, Any] | None:
    """A lease ``owner:token`` (emond.queue.Lease) and the seconds it has left; None if free."""
    if value is None:
        return None
    owner, _, token = value.decode().rpartition(":")
    return {"holder": owner, "token": int(token) if token.isdigit() else None, "ttl": round(max(ttl_ms, 0) / 1000, 3)}


# -- links ---------------------------------------------------------------------------------


async def links_report(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    if args.own:
        return await _own_links(reactor, config, args.timeout)
    return await _node_links(reactor, config, args.url or node_url(config.node.http))


def node_url(description: str) -> str:
    """The HTTP root of a node listening on the Twisted endpoint ``description`` (tcp only)."""
    kind, *parts = description.split(":")
    if kind not in ("tcp", "tcp6"):
        raise AdminError(f"[node] http = {description!r}: cannot ask a node there without the PROXY protocol or TLS; give its address with --url")
    options = dict(p.split("=", 1) for p in parts if "=" in p)
    port = options.get("port") or next((p for p in parts if "=" not in p), "")
    host = options.get("interface", "127.0.0.1" if kind == "tcp" else "::1")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


async def _get(reactor: Any, url: str, token: str) -> tuple[int, bytes]:
    headers = Headers({b"Authorization": [f"Bearer {token}".encode()]} if token else {})
    try:
        response = await Agent(reactor).request(b"GET", url.encode(), headers).addTimeout(HTTP_TIMEOUT, reactor)
        return response.code, await readBody(response)
    except (net_error.ConnectError, defer.TimeoutError, net_error.ConnectionLost) as e:
        raise AdminError(f"{url}: no answer ({e.__class__.__name__}); is the node running? (--url names it, --own opens links from here)") from e


async def _node_links(reactor: Any, config: NodeConfig, base: str) -> dict[str, Any]:
    token = config.health.admin_token
    code, body = await _get(reactor, urljoin(base, "health"), token)
    health = json.loads(body) if body.startswith(b"{") else {}
    if "process" not in health:  # only {"status": ...}: this caller may not see the details
        raise AdminError(f"{urljoin(base, 'health')} ({code}) shows no details here: run on the node's machine, or set [health] admin_token")
    code, body = await _get(reactor, urljoin(base, "metrics"), token)
    if code != 200:
        raise AdminError(f"{urljoin(base, 'metrics')}: {code}")
    states: dict[int, bool] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "emond_stream_connected":
            states.update({int(s.labels["server"]): s.value == 1 for s in family.samples})
    senders = {
        int(sid): part
        for sid, part in health.get("senders", {}).get("locations", {}).items()
        if isinstance(part, dict) and "connected" in part  # a remote link (a hosted sender has none)
    }
    links = {}
    for sid in sorted(set(states) | set(senders)):
        sender = senders.get(sid)
        up = sender["connected"] if sender is not None else states.get(sid, False)
        entry: dict[str, Any] = {"state": "connected" if up else "disconnected", "role": "sender" if sender is not None else "reader"}
        if sender is not None:
            entry.update(
                window=sender.get("window"), unacked=sender.get("window_in_use"), holding_queue=sender.get("holding_queue"),
                rtt=sender.get("rtt"), ok=sender.get("ok"), error=sender.get("error"),
            )
        else:
            entry.update(window=None, unacked=None)
        links[str(sid)] = entry
    return {"node": base, "source": "node", "process": health.get("process"), "status": health.get("status"), "links": links}


async def _own_links(reactor: Any, config: NodeConfig, timeout: float) -> dict[str, Any]:
    links = stream_links(config, reactor)
    if not links:
        raise AdminError("this config reaches no storage server over the stream ([storage.servers] and [tls])")
    for link in links.values():
        link.startService()
    report: dict[str, Any] = {}
    try:
        deadline = reactor.seconds() + timeout
        while any(link.protocol is None for link in links.values()) and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        for sid, link in sorted(links.items()):
            if link.protocol is None:
                report[str(sid)] = {"state": "disconnected", "error": f"no stream within {timeout:g} s (refused, unreachable, or TLS not accepted)"}
                continue
            began = time.monotonic()
            try:
                server = await link.request("ping", 0, 0, timeout=timeout)
            except (RemoteUnavailable, RemoteReadError) as e:
                report[str(sid)] = {"state": "connected", "error": f"no answer to a ping: {e}"}
                continue
            report[str(sid)] = {"state": "connected", "rtt": round(time.monotonic() - began, 6), "server": server, "window": None, "unacked": None}
    finally:
        for link in links.values():
            await link.stopService()
    return {"source": "own", "links": report}

