"""The one recorder of refused datapoints: per user and reason, the last few kept.

Every stage that refuses something a device sent (a malformed frame, a node
or input limit, a time outside the window, a storage refusal) records it
here. Users read their own with ``input/rejected.json``; operators see totals
by reason in ``/metrics`` (no per-user labels).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, NamedTuple

from prometheus_client import CollectorRegistry, Counter

from emond import keys
from emond.redis import Redis

KEEP = 20  # most recent refusals kept per user


class Refused(NamedTuple):
    time: int
    node: str
    input: str
    reason: str


class Refusals:
    def __init__(self, redis: Redis, registry: CollectorRegistry | None, total: Counter | None = None) -> None:
        self.redis = redis
        self.total = total or Counter("emond_refused", "Datapoints refused, by reason", ["reason"], registry=registry)

    def sharing(self, redis: Redis) -> "Refusals":
        """The recorder of another shard's users, in that shard's Redis, counted in the same metric."""
        return Refusals(redis, None, self.total)

    async def record(self, userid: int, refused: Iterable[Refused]) -> None:
        items = list(refused)
        if not items:
            return
        counts: dict[str, int] = {}
        for item in items:
            counts[item.reason] = counts.get(item.reason, 0) + 1
        commands: list[tuple[Any, ...]] = [("HINCRBY", keys.refused_counts(userid), r, n) for r, n in counts.items()]
        recent = [json.dumps(item._asdict(), separators=(",", ":")) for item in items[-KEEP:]]
        commands.append(("LPUSH", keys.refused_last(userid), *recent))
        commands.append(("LTRIM", keys.refused_last(userid), 0, KEEP - 1))
        await self.redis.pipeline(commands)
        for reason, n in counts.items():
            self.total.labels(reason).inc(n)

    async def for_user(self, userid: int) -> dict[str, Any]:
        counts, recent = await self.redis.pipeline(
            [("HGETALL", keys.refused_counts(userid)), ("LRANGE", keys.refused_last(userid), 0, KEEP - 1)]
        )
        if isinstance(counts, list):  # a flat [k, v, ...] reply
            counts = dict(zip(counts[::2], counts[1::2]))
        return {
            "counts": {k.decode(): int(v) for k, v in (counts or {}).items()},
            "last": [json.loads(item) for item in recent or []],
        }
