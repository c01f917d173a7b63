"""Once a process serves, what it built to start is left out of the garbage collector's scans.

Under input load the objects of requests in flight outlive the young generations' collections
and reach the oldest one, which makes Python run a full collection every few seconds. A full
collection scans every tracked object, and most of them are the process's own: modules, the
service tree, Twisted, numpy. In a node that took 40–67 ms each time, the reactor held for
all of it: that was the p99 of ``input/post`` (``bench/ingest.py``, half load: 20–30 ms;
after ``gc.freeze()``, 5.5–7 ms). Freezing moves every object alive at that moment to the
permanent generation, never scanned again (nor freed if it became garbage: it is what the
process keeps anyway); what comes later is collected as before.
"""

from __future__ import annotations

import gc
from typing import Any, Awaitable, Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

READY_POLL = 0.5  # seconds between two looks at whether the process serves


class FreezeWhenReady(Service):
    """``gc.freeze()`` once ``ready`` says the process serves (asked every ``READY_POLL`` s)."""

    log = Logger()

    def __init__(self, ready: Callable[[], Awaitable[tuple[bool, str]]], reactor: Any) -> None:
        self._ready = ready
        self._reactor = reactor
        self._waiting: task.LoopingCall | None = None
        self.frozen = False

    def startService(self) -> None:
        super().startService()
        self._waiting = task.LoopingCall(self._check_ready)
        self._waiting.clock = self._reactor
        self._waiting.start(READY_POLL, now=False).addErrback(lambda f: self.log.failure("gc freeze: readiness check failed", f))

    def stopService(self) -> Any:
        if self._waiting is not None and self._waiting.running:
            self._waiting.stop()
        return super().stopService()

    def _check_ready(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._check())

    async def _check(self) -> None:
        ok, _why = await self._ready()
        if not ok or self.frozen or not self.running:
            return
        if self._waiting is not None and self._waiting.running:
            self._waiting.stop()
        gc.collect()  # garbage of the start goes first: frozen, it would stay for good
        gc.freeze()
        self.frozen = True
        self.log.info("serving: {count} objects of the start left out of garbage collection", count=gc.get_freeze_count())
