"""Periodic work that outlives its own failures.

A plain ``LoopingCall`` stops for good the first time its call fails: its
``start()`` Deferred errbacks and nothing runs again. One failed Redis
round trip (a ``FirstError(CancelledError)`` during a timeout) silenced the
queue monitor that way while ``/health`` kept saying ok. Every periodic job
in emond is a ``steady_loop`` instead: a failure is logged and the next run
happens on schedule.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def steady_loop(call: Callable[[], Any], clock: IReactorTime, what: str, timeout: float | None = None) -> task.LoopingCall:
    """A LoopingCall of ``call`` (plain, Deferred-returning or ``async def``) that logs a
    failed run and keeps its schedule. With ``timeout``, a run that has not finished
    after that many seconds is cancelled (and logged) so a hung call cannot stop the loop."""

    def failed(failure: Failure) -> None:
        log.failure("{what} failed; it runs again on schedule", failure, what=what)

    def once() -> defer.Deferred[Any]:
        d = defer.maybeDeferred(call)
        if timeout is not None:
            d.addTimeout(timeout, clock)
        return d.addErrback(failed)

    loop = task.LoopingCall(once)
    loop.clock = clock
    return loop
