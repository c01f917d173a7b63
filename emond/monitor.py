"""Queue lengths and lag, sampled periodically for ``/health`` and ``/metrics``.

The lag of a queue is the age of its oldest element: a stream id starts with
the millisecond time Redis appended it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond.queue import input_stream, storage_stream
from emond.redis import Redis, RedisUnavailable


class QueueMonitor(Service):
    log = Logger()

    def __init__(
        self, redis: Redis, input_queues: int, storage_servers: list[int], registry: CollectorRegistry, reactor: IReactorTime, every: float = 5.0
    ) -> None:
        self.redis = redis
        self.streams = {input_stream(q): ("input", str(q)) for q in range(input_queues)}
        self.streams.update({storage_stream(s): ("storage", str(s)) for s in storage_servers})
        self.reactor = reactor
        self.length = Gauge("emond_queue_length", "Elements waiting in a queue", ["kind", "queue"], registry=registry)
        self.lag = Gauge("emond_queue_lag_seconds", "Age of the oldest element of a queue", ["kind", "queue"], registry=registry)
        self.last: dict[str, Any] = {"ok": False, "error": "not sampled yet"}
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self.sample()))
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._loop.start(5.0, now=True).addErrback(lambda f: self.log.failure("queue monitor failed", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    async def sample(self) -> dict[str, Any]:
        names = list(self.streams)
        commands: list[tuple[Any, ...]] = []
        for name in names:
            commands += [("XLEN", name), ("XRANGE", name, "-", "+", "COUNT", 1)]
        try:
            replies = await self.redis.pipeline(commands)
        except RedisUnavailable as e:
            self.last = {"ok": False, "error": str(e)}
            return self.last
        now_ms = self.reactor.seconds() * 1000
        totals = {"input": {"length": 0, "lag": 0.0}, "storage": {}}
        for i, name in enumerate(names):
            kind, queue = self.streams[name]
            length, head = int(replies[2 * i]), replies[2 * i + 1]
            lag = max(0.0, (now_ms - int(head[0][0].split(b"-")[0])) / 1000) if head else 0.0
            self.length.labels(kind, queue).set(length)
            self.lag.labels(kind, queue).set(lag)
            if kind == "input":
                totals["input"]["length"] += length
                totals["input"]["lag"] = max(totals["input"]["lag"], lag)
            else:
                totals["storage"][queue] = {"length": length, "lag": round(lag, 3)}
        totals["input"]["lag"] = round(totals["input"]["lag"], 3)
        self.last = {"ok": True, **totals}
        return self.last

    def status(self) -> dict[str, Any]:
        return self.last
