"""Work in progress, counted, so that a stop can wait for it to end before it closes what
that work uses (a connection pool, an HTTP connection)."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet import defer

T = TypeVar("T")


class InFlight:
    """A count of work in progress; ``drained()`` fires once none is left."""

    def __init__(self) -> None:
        self.count = 0
        self._waiting: list[defer.Deferred[None]] = []

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def track(self, work: defer.Deferred[T]) -> defer.Deferred[T]:
        """Count ``work`` until it fires; its result passes through."""
        self.enter()

        def done(result: Any) -> Any:
            self.leave()
            return result

        return work.addBoth(done)

    def drained(self) -> defer.Deferred[None]:
        """Fires when nothing is in progress (at once if nothing is)."""
        if self.count == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d
