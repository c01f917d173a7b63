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


class RedisUnavailable(Exception):
    """Redis did not answer in time, or the connection is down: outcome unknown."""


class Redis:
    log = Logger()

    def __init__(self, pool: Any, timeout: float, reactor: IReactorTime) -> None:
        self._pool = pool
        self.timeout = timeout
        self._reactor = reactor

    @classmethod
    def connect(cls, url: str, timeout: float, reactor: IReactorTime, poolsize: int = 4) -> "Redis":
        """A pool that (re)connects in the background; calls fail fast while it is down."""
        parts = urlsplit(url)
        common = dict(
            poolsize=poolsize,
            reconnect=True,
            charset=None,
            convertNumbers=False,
            connectTimeout=timeout,
            replyTimeout=None,  # enforced per call instead, see call()
        )
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            pool = txredisapi.lazyUnixConnectionPool(parts.path, dbid=db, **common)
        else:
            db = int(parts.path.lstrip("/") or 0)
            pool = txredisapi.lazyConnectionPool(
                parts.hostname or "127.0.0.1", parts.port or 6379, dbid=db, password=parts.password, **common
            )
        return cls(pool, timeout, reactor)

    async def call(self, command: str, *args: Any) -> Any:
        """Run one command with the timeout."""
        d = self._pool.execute_command(command, *args)
        d.addTimeout(self.timeout, self._reactor)
        try:
            return await d
        except (defer.TimeoutError, defer.CancelledError) as e:
            raise RedisUnavailable(f"redis {command}: no reply within {self.timeout}s") from e
        except (txredisapi.ConnectionError, error.ConnectionLost, error.ConnectionDone) as e:
            raise RedisUnavailable(f"redis {command}: {e}") from e

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (MULTI/EXEC is not implied).

        The timeout covers the whole: waiting for a pool connection (none while
        Redis is down) as well as the replies."""
        if not commands:
            return []
        d = defer.ensureDeferred(self._pipeline(commands))
        d.addTimeout(self.timeout, self._reactor)
        try:
            try:
                return await d
            except defer.FirstError as e:
                # The replies are awaited as a DeferredList: a timeout (cancel) or a lost
                # connection arrives wrapped, as FirstError(CancelledError) and the like.
                raise e.subFailure.value from e
        except (defer.TimeoutError, defer.CancelledError) as e:
            raise RedisUnavailable(f"redis pipeline: no reply within {self.timeout}s") from e
        except (txredisapi.ConnectionError, error.ConnectionLost, error.ConnectionDone) as e:
            raise RedisUnavailable(f"redis pipeline: {e}") from e

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = await self._pool.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute_pipeline())

    async def ping(self) -> bool:
        try:
            return await self.call("PING") in (b"PONG", "PONG")
        except RedisUnavailable:
            return False

    def disconnect(self) -> defer.Deferred[None]:
        return self._pool.disconnect()
