"""The one place emond talks to Redis (txredisapi).

txredisapi's defaults decode bytes and turn ``"1"`` into ``1``, and a lazy
connection waits forever while Redis is down. Here replies stay bytes, and
every call has a timeout: a call that times out after it was sent has an
unknown outcome (``RedisUnavailable``), which callers must never report as
success.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import txredisapi
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond.inflight import InFlight


class RedisUnavailable(Exception):
    """Redis did not answer in time, or the connection is down: outcome unknown."""


class Redis:
    """One pool of connections to Redis, opened by ``open()`` (a service's ``startService``)
    and closed by ``disconnect()``; until it is open, or once it is closing, calls fail with
    ``RedisUnavailable`` at once."""

    log = Logger()

    def __init__(self, url: str, timeout: float, reactor: IReactorTime, poolsize: int = 4) -> None:
        self.url = url
        self.timeout = timeout
        self.poolsize = poolsize
        self._reactor = reactor
        self._pool: Any = None
        self._busy = InFlight()  # calls in progress: a disconnect lets them end first
        self._closed: defer.Deferred[None] | None = None

    @classmethod
    def connect(cls, url: str, timeout: float, reactor: IReactorTime, poolsize: int = 4) -> "Redis":
        """A pool opened now (tools and tests; a service opens its own in ``startService``)."""
        redis = cls(url, timeout, reactor, poolsize)
        redis.open()
        return redis

    def open(self) -> None:
        """Start (re)connecting in the background; calls fail fast while Redis is down. Opening
        an open pool does nothing."""
        if self._pool is not None:
            return
        parts = urlsplit(self.url)
        common = dict(
            poolsize=self.poolsize,
            reconnect=True,
            charset=None,
            convertNumbers=False,
            connectTimeout=self.timeout,
            replyTimeout=None,  # enforced per call instead, see call()
        )
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            self._pool = txredisapi.lazyUnixConnectionPool(parts.path, dbid=db, **common)
        else:
            db = int(parts.path.lstrip("/") or 0)
            self._pool = txredisapi.lazyConnectionPool(
                parts.hostname or "127.0.0.1", parts.port or 6379, dbid=db, password=parts.password, **common
            )
        self._closed = None

    def _open_pool(self, what: str) -> Any:
        if self._pool is None:
            raise RedisUnavailable(f"redis {what}: not connected (not started, or stopping)")
        return self._pool

    async def call(self, command: str, *args: Any) -> Any:
        """Run one command with the timeout."""
        return await self._within_timeout(command, self._open_pool(command).execute_command(command, *args))

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (MULTI/EXEC is not implied).

        The timeout covers the whole: waiting for a pool connection (none while
        Redis is down) as well as the replies."""
        if not commands:
            return []
        return await self._within_timeout("pipeline", defer.ensureDeferred(self._pipeline(self._open_pool("pipeline"), commands)))

    async def _within_timeout(self, what: str, d: defer.Deferred[Any]) -> Any:
        """``d``'s result, or RedisUnavailable when it times out or the connection fails."""
        d.addTimeout(self.timeout, self._reactor)
        self._busy.enter()
        try:
            try:
                return await d
            except defer.FirstError as e:
                # A pipeline's replies are awaited as a DeferredList: a timeout (cancel) or a
                # lost connection arrives wrapped, as FirstError(CancelledError) and the like.
                raise e.subFailure.value from e
        except (defer.TimeoutError, defer.CancelledError) as e:
            raise RedisUnavailable(f"redis {what}: no reply within {self.timeout}s") from e
        except (txredisapi.ConnectionError, error.ConnectionLost, error.ConnectionDone) as e:
            raise RedisUnavailable(f"redis {what}: {e}") from e
        finally:
            self._busy.leave()

    async def _pipeline(self, pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = await pool.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute_pipeline())

    async def ping(self) -> bool:
        try:
            return await self.call("PING") in (b"PONG", "PONG")
        except RedisUnavailable:
            return False

    def disconnect(self) -> defer.Deferred[None]:
        """Take no more calls, let those in progress end (each within its timeout), then close
        every connection and stop reconnecting; fires when the connections are closed. Closing
        a closed pool does nothing."""
        if self._pool is None:
            return self._closed or defer.succeed(None)
        pool, self._pool = self._pool, None
        self._closed = self._busy.drained().addCallback(lambda _: pool.disconnect()).addCallback(lambda _: None)
        return self._closed
