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


class SteadyLoop:
    """A LoopingCall of ``call`` (plain, Deferred-returning or ``async def``) that logs a
    failed run and keeps its schedule. With ``timeout``, a run that has not finished
    after that many seconds is cancelled (and logged) so a hung call cannot stop the loop.
    ``stop()`` fires once a run in progress has ended, so what it uses can be closed after."""

    def __init__(self, call: Callable[[], Any], clock: IReactorTime, what: str, timeout: float | None = None) -> None:
        self._call = call
        self._clock = clock
        self._what = what
        self._timeout = timeout
        self._loop = task.LoopingCall(self._once)
        self._loop.clock = clock
        self._ended: defer.Deferred[Any] = defer.succeed(None)

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self, interval: float, now: bool = True) -> None:
        self._ended = self._loop.start(interval, now)

    def stop(self) -> defer.Deferred[None]:
        if self._loop.running:
            self._loop.stop()
        ended, self._ended = self._ended, defer.succeed(None)
        return ended.addCallback(lambda _: None)

    def _once(self) -> defer.Deferred[Any]:
        d = defer.maybeDeferred(self._call)
        if self._timeout is not None:
            d.addTimeout(self._timeout, self._clock)
        return d.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        log.failure("{what} failed; it runs again on schedule", failure, what=self._what)


def steady_loop(call: Callable[[], Any], clock: IReactorTime, what: str, timeout: float | None = None) -> SteadyLoop:
    """A ``SteadyLoop`` (every periodic job in emond is one)."""
    return SteadyLoop(call, clock, what, timeout)


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
