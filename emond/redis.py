"""The one place emond talks to Redis (txredisapi).

txredisapi's defaults decode bytes and turn ``"1"`` into ``1``, and a lazy
connection waits forever while Redis is down. Here replies stay bytes, and
every call has a timeout: a call that times out after it was sent has an
unknown outcome (``RedisUnavailable``), which callers must never report as
success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import txredisapi
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond.inflight import InFlight


class RedisUnavailable(Exception):
    """Redis did not answer in time, or the connection is down: outcome unknown."""


@dataclass(frozen=True)
class SentinelService:
    """A Redis found through Redis Sentinel: the sentinels' ``HOST:PORT``, the service (master)
    name they watch, and the master's password and database number."""

    sentinels: tuple[str, ...]
    service: str
    password: str = ""
    db: int = 0

    def describe(self) -> str:
        return f"sentinel://{','.join(self.sentinels)}/{self.service}"


class Redis:
    """One pool of connections to Redis, opened by ``open()`` (a service's ``startService``)
    and closed by ``disconnect()``; until it is open, or once it is closing, calls fail with
    ``RedisUnavailable`` at once.

    With ``sentinel``, the master's address is asked of the sentinels (``SENTINEL
    get-master-addr-by-name``) when opening, and again after any call that failed for want
    of Redis (no answer in time, connection lost, or ``READONLY``: a former master demoted);
    when the sentinels name another master, the pool moves to it. Calls fail fast while no
    master is known. (txredisapi's own ``Sentinel`` is not used: its connections check
    ``ROLE`` against a ``str``, so with replies kept as bytes every connection would be
    dropped, and a master that hangs, rather than closing its connections, is never left.)"""

    log = Logger()

    def __init__(
        self, url: str, timeout: float, reactor: IReactorTime, poolsize: int = 4, sentinel: SentinelService | None = None
    ) -> None:
        self.url = url or (sentinel.describe() if sentinel else "")
        self.timeout = timeout
        self.poolsize = poolsize
        self.sentinel = sentinel
        self.master: tuple[str, int] | None = None  # where the pool is connected (with sentinel)
        self._reactor = reactor
        self._pool: Any = None
        self._opened = False
        self._sentinels: list[Any] = []
        self._resolving: defer.Deferred[None] | None = None
        self._retry: Any = None  # the next question to the sentinels while no master is known
        self._retired: list[defer.Deferred[Any]] = []  # pools of former masters, closing
        self._resolved: list[defer.Deferred[None]] = []
        self._busy = InFlight()  # calls in progress: a disconnect lets them end first
        self._closed: defer.Deferred[None] | None = None

    @classmethod
    def connect(cls, url: str, timeout: float, reactor: IReactorTime, poolsize: int = 4) -> "Redis":
        """A pool opened now (tools and tests; a service opens its own in ``startService``)."""
        redis = cls(url, timeout, reactor, poolsize)
        redis.open()
        return redis

    def _options(self) -> dict[str, Any]:
        return dict(
            poolsize=self.poolsize,
            reconnect=True,
            charset=None,
            convertNumbers=False,
            connectTimeout=self.timeout,
            replyTimeout=None,  # enforced per call instead, see call()
        )

    def open(self) -> None:
        """Start (re)connecting in the background; calls fail fast while Redis is down. Opening
        an open pool does nothing."""
        if self._opened:
            return
        self._opened = True
        self._closed = None
        if self.sentinel is not None:
            for address in self.sentinel.sentinels:
                host, _, port = address.rpartition(":")
                # No SELECT on a sentinel (it has no databases): dbid None.
                self._sentinels.append(txredisapi.lazyConnection(host, int(port), dbid=None, connectTimeout=self.timeout))
            self._suspect()
            return
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            self._pool = txredisapi.lazyUnixConnectionPool(parts.path, dbid=db, **self._options())
        else:
            db = int(parts.path.lstrip("/") or 0)
            self._pool = txredisapi.lazyConnectionPool(
                parts.hostname or "127.0.0.1", parts.port or 6379, dbid=db, password=parts.password, **self._options()
            )

    # -- Sentinel -------------------------------------------------------------------------

    def _suspect(self) -> None:
        """Ask the sentinels where the master is, unless that is under way."""
        self._retry = None
        if self.sentinel is None or not self._opened or self._resolving is not None:
            return
        self._resolving = defer.ensureDeferred(self._resolve())

    async def _resolve(self) -> None:
        try:
            address = await self._ask_sentinels()
        finally:
            self._resolving = None
        if not self._opened:
            return
        if address is None:
            if self._pool is None:  # no master known at all: keep asking
                self._retry = self._reactor.callLater(1.0, self._suspect)
            return
        if address != self.master:
            assert self.sentinel is not None
            old, self.master = self._pool, address
            self.log.info("redis {service}: master at {host}:{port}", service=self.sentinel.service, host=address[0], port=address[1])
            self._pool = txredisapi.lazyConnectionPool(
                address[0], address[1], dbid=self.sentinel.db, password=self.sentinel.password or None, **self._options()
            )
            if old is not None:  # calls still on it fail (RedisUnavailable): their outcome is unknown
                self._retired = [d for d in self._retired if not d.called] + [old.disconnect()]
        waiting, self._resolved = self._resolved, []
        for d in waiting:
            d.callback(None)

    async def _ask_sentinels(self) -> tuple[str, int] | None:
        """The master's address, from the first sentinel that names one in time."""
        assert self.sentinel is not None
        for sentinel in self._sentinels:
            d = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", self.sentinel.service)
            d.addTimeout(self.timeout, self._reactor)
            try:
                reply = await d
            except Exception as e:  # down, slow, or not a sentinel: ask the next one
                self.log.warn("redis {service}: sentinel {sentinel!r} did not answer: {error}", service=self.sentinel.service, sentinel=sentinel, error=repr(e))
                continue
            if isinstance(reply, (list, tuple)) and len(reply) == 2:
                host, port = reply
                return (host.decode() if isinstance(host, bytes) else str(host), int(port))
        return None

    def resolved(self) -> defer.Deferred[None]:
        """Fires after the next answer from the sentinels has been applied (tests, tools)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._resolved.append(d)
        return d

    def _open_pool(self, what: str) -> Any:
        if self._pool is None:
            if self._opened:  # with sentinel, before the master is known
                raise RedisUnavailable(f"redis {what}: the master of {self.url} is not known yet")
            raise RedisUnavailable(f"redis {what}: not connected (not started, or stopping)")
        return self._pool

    async def call(self, command: str, *args: Any) -> Any:
        """Run one command with the timeout."""
        return await self._within_timeout(command, self._open_pool(command).execute_command(command, *args))

    async def pipeline(self, commands: list[tuple[Any, ...]], longer: float = 0.0) -> list[Any]:
        """Several commands in one round trip (MULTI/EXEC is not implied).

        The timeout covers the whole: waiting for a pool connection (none while
        Redis is down) as well as the replies; ``longer``: seconds more, for
        commands that block on purpose (``WAIT``)."""
        if not commands:
            return []
        d = defer.ensureDeferred(self._pipeline(self._open_pool("pipeline"), commands))
        return await self._within_timeout("pipeline", d, self.timeout + longer)

    async def _within_timeout(self, what: str, d: defer.Deferred[Any], timeout: float | None = None) -> Any:
        """``d``'s result, or RedisUnavailable when it times out or the connection fails."""
        timeout = self.timeout if timeout is None else timeout
        d.addTimeout(timeout, self._reactor)
        self._busy.enter()
        try:
            try:
                return await d
            except defer.FirstError as e:
                # A pipeline's replies are awaited as a DeferredList: a timeout (cancel) or a
                # lost connection arrives wrapped, as FirstError(CancelledError) and the like.
                raise e.subFailure.value from e
        except (defer.TimeoutError, defer.CancelledError) as e:
            self._suspect()
            raise RedisUnavailable(f"redis {what}: no reply within {timeout}s") from e
        except (txredisapi.ConnectionError, error.ConnectionLost, error.ConnectionDone) as e:
            self._suspect()
            raise RedisUnavailable(f"redis {what}: {e}") from e
        except txredisapi.ResponseError as e:
            if self.sentinel is None or not str(e).startswith("READONLY"):
                raise
            self._suspect()  # a demoted master: nothing was written
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
        if not self._opened:
            return self._closed or defer.succeed(None)
        self._opened = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        pool, self._pool, self.master = self._pool, None, None
        sentinels, self._sentinels = self._sentinels, []
        retired, self._retired = self._retired, []
        resolving = [self._resolving] if self._resolving is not None else []

        def close(_: Any) -> defer.Deferred[Any]:
            closing = [handler.disconnect() for handler in ([pool] if pool is not None else []) + sentinels]
            return defer.gatherResults(closing + retired + resolving, consumeErrors=True)

        self._closed = self._busy.drained().addCallback(close).addCallback(lambda _: None)
        return self._closed


class _Subscriber(txredisapi.SubscriberProtocol):
    """One subscribing connection: once connected (and authenticated), it subscribes to its
    subscription's channel and tells it; every message and the loss of the connection too."""

    def connectionMade(self) -> Any:
        subscription: Subscription = self.factory.subscription
        d = defer.maybeDeferred(super().connectionMade)  # AUTH first, when the url has a password
        # (a connection made as the subscription closes, or whose AUTH failed, subscribes to nothing)
        d.addCallback(lambda _: self.subscribe(subscription.channel) if self.connected and subscription.channel else None)
        d.addCallbacks(lambda reply: subscription._subscribed() if reply is not None else None, self._failed)
        return d

    def _failed(self, failure: Any) -> None:
        self.factory.subscription.log.warn("redis subscribe failed: {error}", error=failure.getErrorMessage())
        self.transport.loseConnection()

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.subscription._message(message)

    def connectionLost(self, reason: Any) -> None:
        self.factory.subscription._lost()
        super().connectionLost(reason)


class Subscription:
    """A Redis pub/sub channel, subscribed from ``open()`` until ``disconnect()``, and again
    (with backoff) after every lost connection.

    ``on_subscribed()`` is called each time the subscription (re)starts, ``on_lost()``
    each time it ends: messages published in between were missed. ``on_message(payload)``
    (bytes) for each message.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        channel: str,
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[], None],
        on_lost: Callable[[], None],
        timeout: float,
        reactor: Any,
    ) -> None:
        self.url = url
        self.reactor = reactor
        self.channel = channel
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.on_lost = on_lost
        self.timeout = timeout
        self.live = False  # subscribed now
        self._factory: Any = None

    def open(self) -> None:
        if self._factory is not None:
            return
        parts = urlsplit(self.url)
        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = _Subscriber
        factory.charset, factory.convertNumbers = None, False
        factory.password = parts.password
        factory.maxDelay = 5  # seconds between attempts at most: the cache is bypassed meanwhile
        factory.subscription = self
        if parts.scheme == "unix":
            endpoint: Any = endpoints.UNIXClientEndpoint(self.reactor, parts.path, timeout=self.timeout)
        else:
            endpoint = endpoints.HostnameEndpoint(self.reactor, parts.hostname or "127.0.0.1", parts.port or 6379, timeout=self.timeout)
        factory.startConnecting(endpoint)
        self._factory = factory

    def disconnect(self) -> defer.Deferred[None]:
        """Stop subscribing and close the connection; fires once it is closed."""
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        factory.subscription = _Closed()
        if self.live:
            self._lost()
        return factory.disconnect().addCallback(lambda _: None)

    def _subscribed(self) -> None:
        self.live = True
        self.on_subscribed()

    def _lost(self) -> None:
        was, self.live = self.live, False
        if was:
            self.on_lost()

    def _message(self, payload: Any) -> None:
        self.on_message(payload if isinstance(payload, bytes) else str(payload).encode())


class _Closed:
    """What a closed subscription's last connection reports to: nothing listens any more."""

    channel = ""
    log = Logger()

    def _subscribed(self) -> None:
        pass

    def _lost(self) -> None:
        pass

    def _message(self, payload: Any) -> None:
        pass
