"""Work on the reactor thread that must neither stop nor hold it: periodic loops that
outlive their own failures, and long computations run in slices.

A plain ``LoopingCall`` stops for good the first time its call fails: its
``start()`` Deferred errbacks and nothing runs again. One failed Redis
round trip (a ``FirstError(CancelledError)`` during a timeout) silenced the
queue monitor that way while ``/health`` kept saying ok. Every periodic job
in emond is a ``steady_loop`` instead: a failure is logged and the next run
happens on schedule.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()
T = TypeVar("T")
SLICE_SECONDS = 0.01  # the longest a sliced computation runs before the reactor gets a turn


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


async def cooperate(steps: Generator[Any, None, T], reactor: IReactorTime, budget: float = SLICE_SECONDS) -> T:
    """Run a generator that yields between pieces of work to its end (its return value),
    letting the reactor turn whenever it has run for ``budget`` seconds (a small job runs
    through without a pause)."""
    slicer = Slicer(reactor, budget)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await slicer.turn()


class Slicer:
    """For a loop on the reactor thread: ``await slicer.turn()`` between pieces of work
    gives the reactor a turn once ``budget`` seconds have gone since the last one."""

    def __init__(self, reactor: IReactorTime, budget: float = SLICE_SECONDS) -> None:
        self._reactor = reactor
        self._budget = budget
        self._began = time.perf_counter()

    async def turn(self) -> None:
        if time.perf_counter() - self._began > self._budget:
            await task.deferLater(self._reactor, 0, lambda: None)
            self._began = time.perf_counter()
