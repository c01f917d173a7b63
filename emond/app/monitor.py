"""Queue lengths and lag, sampled periodically for ``/health`` and ``/metrics``.

The lag of a queue is the age of its oldest element: a stream id starts with
the millisecond time Redis appended it. A queue longer or older than the
``[health]`` limits makes the node degraded; so does a failed sample, and a
sample that is overdue (the loop is stuck), so ``/health`` never reports an
old success.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond.config import NodeHealthSection
from emond.loops import steady_loop
from emond.keys import input_stream, storage_stream
from emond.redis import Redis, RedisUnavailable

MAX_PROBLEMS = 5  # queues named in the status; the rest are counted


async def sample_streams(redis: Redis, names: list[str], clock: IReactorTime) -> dict[str, tuple[int, float]]:
    """Each stream's length and lag (seconds its oldest element has waited; 0 when empty), in
    one round trip."""
    commands: list[tuple[Any, ...]] = []
    for name in names:
        commands += [("XLEN", name), ("XRANGE", name, "-", "+", "COUNT", 1)]
    replies = await redis.pipeline(commands)
    now_ms = clock.seconds() * 1000
    samples = {}
    for i, name in enumerate(names):
        length, head = int(replies[2 * i]), replies[2 * i + 1]
        samples[name] = (length, max(0.0, (now_ms - int(head[0][0].split(b"-")[0])) / 1000) if head else 0.0)
    return samples


class QueueMonitor(Service):
    log = Logger()

    def __init__(
        self,
        redis: Redis,
        input_queues: int,
        storage_servers: list[int],
        registry: CollectorRegistry,
        reactor: IReactorTime,
        limits: NodeHealthSection = NodeHealthSection(),
        every: float = 5.0,
    ) -> None:
        self.redis = redis
        self.streams = {input_stream(q): ("input", str(q)) for q in range(input_queues)}
        self.streams.update({storage_stream(s): ("storage", str(s)) for s in storage_servers})
        self.reactor = reactor
        self.limits = limits
        self.every = every
        # A sample takes at most the Redis timeout: later than this, the loop is stuck.
        self.overdue = 2 * every + redis.timeout
        self.length = Gauge("emond_queue_length", "Elements waiting in a queue", ["kind", "queue"], registry=registry)
        self.lag = Gauge("emond_queue_lag_seconds", "Age of the oldest element of a queue", ["kind", "queue"], registry=registry)
        self.last: dict[str, Any] = {"ok": False, "error": "not sampled yet"}
        self.sampled_at: float | None = None
        self.started_at: float | None = None
        self._waiting: list[defer.Deferred[dict[str, Any]]] = []
        self._loop = steady_loop(self.sample, reactor, "queue monitor", timeout=self.overdue)

    def startService(self) -> None:
        super().startService()
        self.started_at = self.reactor.seconds()
        self._loop.start(self.every, now=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._loop.stop()  # after the sample in progress: it finishes before Redis is closed

    def next_sample(self) -> defer.Deferred[dict[str, Any]]:
        """Fires with the outcome of the next sample to finish (tests, tools)."""
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting.append(d)
        return d

    async def sample(self) -> dict[str, Any]:
        try:
            self.last = await self._measure()
        except Exception as e:
            self.last = {"ok": False, "error": f"queues not sampled: {e}"}
            if not isinstance(e, RedisUnavailable):
                raise  # unexpected: the loop logs it (and runs again)
        finally:
            self.sampled_at = self.reactor.seconds()
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(self.last)
        return self.last

    async def _measure(self) -> dict[str, Any]:
        samples = await sample_streams(self.redis, list(self.streams), self.reactor)
        totals: dict[str, Any] = {"input": {"length": 0, "lag": 0.0}, "storage": {}}
        problems: list[str] = []
        for name, (length, lag) in samples.items():
            kind, queue = self.streams[name]
            self.length.labels(kind, queue).set(length)
            self.lag.labels(kind, queue).set(lag)
            problems += self._over_limits(kind, queue, length, lag)
            if kind == "input":
                totals["input"]["length"] += length
                totals["input"]["lag"] = max(totals["input"]["lag"], lag)
            else:
                totals["storage"][queue] = {"length": length, "lag": round(lag, 3)}
        totals["input"]["lag"] = round(totals["input"]["lag"], 3)
        status: dict[str, Any] = {"ok": not problems, **totals}
        if problems:
            more = len(problems) - MAX_PROBLEMS
            status["error"] = "; ".join(problems[:MAX_PROBLEMS]) + (f"; {more} more" if more > 0 else "")
        return status

    def _over_limits(self, kind: str, queue: str, length: int, lag: float) -> list[str]:
        limits = self.limits
        max_lag = limits.max_input_lag if kind == "input" else limits.max_storage_lag
        max_length = limits.max_input_length if kind == "input" else limits.max_storage_length
        problems = []
        if lag > max_lag:
            problems.append(f"{kind} queue {queue}: oldest element {lag:.1f}s old (limit {max_lag:g}s)")
        if max_length and length > max_length:
            problems.append(f"{kind} queue {queue}: {length} elements (limit {max_length})")
        return problems

    def status(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        since = self.sampled_at if self.sampled_at is not None else self.started_at
        if since is not None and now - since > self.overdue:
            return {**self.last, "ok": False, "error": f"queues not sampled for {now - since:.0f}s"}
        return self.last
