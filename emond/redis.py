"""The one place emond talks to Redis (txredisapi).

txredisapi's defaults decode bytes and turn ``"1"`` into ``1``, and a lazy
connection waits forever while Redis is down. Here replies stay bytes, and
every call has a timeout: a call that times out after it was sent has an
unknown outcome (``RedisUnavailable``), which callers must never report as
success.

A Redis is reached over TLS by a ``rediss://`` URL, or, with Sentinel, when the
client is given its ``RedisTLS`` (the sentinels and the master they name): Redis's
certificate must be signed by the cluster CA and carry the expected name, and the
client presents its own, as on the storage stream (``emond.stream.client_tls``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import txredisapi
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from emond.inflight import InFlight
from emond.stream import client_tls


class RedisUnavailable(Exception):
    """Redis did not answer in time, or the connection is down: outcome unknown."""


@dataclass(frozen=True)
class SentinelService:
    """A Redis found through Redis Sentinel: the sentinels' ``HOST:PORT``, the service (master)
    name they watch, the master's password and database number, and the sentinels' own
    password (their ``requirepass``, sent with AUTH to each)."""

    sentinels: tuple[str, ...]
    service: str
    password: str = ""
    db: int = 0
    sentinel_password: str = ""

    def describe(self) -> str:
        return f"sentinel://{','.join(self.sentinels)}/{self.service}"


@dataclass(frozen=True)
class RedisTLS:
    """TLS to Redis: its certificate must be signed by the CA in ``ca`` and carry ``name``
    ("": the host connected to: the URL's, a sentinel's, the master's), and the client
    presents ``cert`` (PEM: its certificate, then its key), for a Redis that requires
    client certificates (``tls-auth-clients yes``). A node's ``[tls]`` files."""

    ca: str
    cert: str
    name: str = ""

    def creator(self, host: str) -> Any:
        """The client TLS options for a connection to ``host`` (the files are read now)."""
        return client_tls(self.ca, self.cert, self.name or host)


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
    dropped, and a master that hangs, rather than closing its connections, is never left.)

    ``tls``: required by a ``rediss://`` URL; with ``sentinel``, the sentinels and the master
    they name are reached over TLS. (Not with a ``redis://`` or ``unix://`` URL: ask for TLS
    by the scheme.)"""

    log = Logger()

    def __init__(
        self,
        url: str,
        timeout: float,
        reactor: IReactorTime,
        poolsize: int = 4,
        sentinel: SentinelService | None = None,
        tls: RedisTLS | None = None,
    ) -> None:
        scheme = urlsplit(url).scheme
        if sentinel is None and scheme == "rediss" and tls is None:
            raise ValueError("redis: a rediss:// url needs TLS settings (RedisTLS)")
        if sentinel is None and scheme != "rediss" and tls is not None:
            raise ValueError(f"redis: TLS settings with a {scheme}:// url (TLS is asked for with rediss://)")
        self.url = url or (sentinel.describe() if sentinel else "")
        self.timeout = timeout
        self.poolsize = poolsize
        self.sentinel = sentinel
        self.tls = tls
        self.master: tuple[str, int] | None = None  # where the pool is connected (with sentinel)
        self._reactor = reactor
        self._pool: Any = None
        self._opened = False
        self._sentinels: list[tuple[str, Any]] = []  # (HOST:PORT, connection)
        self._resolving: defer.Deferred[None] | None = None
        self._retry: Any = None  # the next question to the sentinels while no master is known
        self._retired: list[defer.Deferred[Any]] = []  # pools of former masters, closing
        self._resolved: list[defer.Deferred[None]] = []
        self._busy = InFlight()  # calls in progress: a disconnect lets them end first
        self._closed: defer.Deferred[None] | None = None

    @classmethod
    def connect(cls, url: str, timeout: float, reactor: IReactorTime, poolsize: int = 4, tls: RedisTLS | None = None) -> "Redis":
        """A pool opened now (tools and tests; a service opens its own in ``startService``)."""
        redis = cls(url, timeout, reactor, poolsize, tls=tls)
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

    def _lazy_pool(self, host: str, port: int, db: int | None, password: str | None, options: dict[str, Any]) -> Any:
        """A lazy pool to ``host:port``, over TLS with ``self.tls``: built as txredisapi's
        ``lazyConnectionPool`` builds one, but over TLS with connections that wait for the
        handshake before their AUTH and SELECT (``_TLSConnection``), and without an unhandled
        error when the pool never completes (a failed AUTH or SELECT: txredisapi has logged
        it, and calls fail meanwhile)."""
        factory = txredisapi.RedisFactory(
            f"{host}:{port}",
            db,
            options["poolsize"],
            isLazy=True,
            charset=options["charset"],
            password=password,
            replyTimeout=options["replyTimeout"],
            convertNumbers=options["convertNumbers"],
        )
        factory.reconnect = options["reconnect"]
        factory.deferred.addErrback(lambda _: None)
        endpoint: Any = endpoints.HostnameEndpoint(self._reactor, host, port, timeout=options["connectTimeout"])
        if self.tls is not None:
            factory.protocol = _TLSConnection
            endpoint = endpoints.wrapClientTLS(self.tls.creator(host), endpoint)
        factory.startConnecting(endpoint)
        return factory.handler

    def open(self) -> None:
        """Start (re)connecting in the background; calls fail fast while Redis is down. Opening
        an open pool does nothing."""
        if self._opened:
            return
        self._opened = True
        self._closed = None
        if self.sentinel is not None:
            # One connection each, with txredisapi's defaults (lazyConnection's).
            options = dict(poolsize=1, reconnect=True, charset="utf-8", convertNumbers=True, connectTimeout=self.timeout, replyTimeout=None)
            for address in self.sentinel.sentinels:
                host, _, port = address.rpartition(":")
                # No SELECT on a sentinel (it has no databases): dbid None.
                connection = self._lazy_pool(host, int(port), None, self.sentinel.sentinel_password or None, options)
                self._sentinels.append((address, connection))
            self._suspect()
            return
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            self._pool = txredisapi.lazyUnixConnectionPool(parts.path, dbid=db, **self._options())
        else:
            db = int(parts.path.lstrip("/") or 0)
            self._pool = self._lazy_pool(parts.hostname or "127.0.0.1", parts.port or 6379, db, parts.password, self._options())

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
            self._pool = self._lazy_pool(address[0], address[1], self.sentinel.db, self.sentinel.password or None, self._options())
            if old is not None:  # calls still on it fail (RedisUnavailable): their outcome is unknown
                self._retired = [d for d in self._retired if not d.called] + [old.disconnect()]
        waiting, self._resolved = self._resolved, []
        for d in waiting:
            d.callback(None)

    async def _ask_sentinels(self) -> tuple[str, int] | None:
        """The master's address, from the first sentinel that names one in time."""
        assert self.sentinel is not None
        for address, sentinel in self._sentinels:
            d = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", self.sentinel.service)
            d.addTimeout(self.timeout, self._reactor)
            try:
                reply = await d
            except Exception as e:  # down, slow, refused (NOAUTH: its password), or not a sentinel: ask the next one
                self.log.warn("redis {service}: sentinel {sentinel} did not answer: {error}", service=self.sentinel.service, sentinel=address, error=repr(e))
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
            closing = [handler.disconnect() for handler in ([pool] if pool is not None else []) + [c for _, c in sentinels]]
            return defer.gatherResults(closing + retired + resolving, consumeErrors=True)

        self._closed = self._busy.drained().addCallback(close).addCallback(lambda _: None)
        return self._closed


@implementer(IHandshakeListener)
class _AfterHandshake:
    """Mixed into a txredisapi protocol for a connection over TLS.

    TLS starts the protocol (``connectionMade``) before its handshake, and txredisapi then
    sends AUTH and SELECT at once; a handshake that fails fails them, and txredisapi takes a
    failed AUTH or SELECT for a wrong password or database and stops reconnecting for good.
    Here the protocol starts once the handshake is done: a failed handshake (Redis's
    certificate not from the CA, or without the name) is a lost connection, tried again with
    txredisapi's backoff. (With TLS 1.3 the server checks the client's certificate after the
    client's side of the handshake is done: a refused certificate fails the AUTH or SELECT,
    as a wrong password does.) Either way the TLS failure is logged with its reason: once per
    pool (its factory) until a connection is usable again, not once per connection and retry."""

    log = Logger()

    def connectionMade(self) -> None:
        pass  # see handshakeCompleted

    def handshakeCompleted(self) -> Any:
        if self.transport.disconnecting:  # type: ignore[attr-defined]  # the name did not verify: aborted
            return None
        self.whenConnected().addCallback(self._usable)  # type: ignore[attr-defined]
        return super().connectionMade()  # type: ignore[misc]

    def _usable(self, _: Any) -> None:
        self.factory.tls_error = ""  # type: ignore[attr-defined]  # a later failure is news again

    def connectionLost(self, reason: Any) -> None:
        if reason.check(SSL.Error, VerificationError):
            error = reason.getErrorMessage()
            if error != getattr(self.factory, "tls_error", ""):  # type: ignore[attr-defined]
                self.factory.tls_error = error  # type: ignore[attr-defined]
                peer = self.transport.getPeer()  # type: ignore[attr-defined]
                self.log.warn("redis {host}:{port}: TLS failed: {error}", host=peer.host, port=peer.port, error=error)
        super().connectionLost(reason)  # type: ignore[misc]


class _TLSConnection(_AfterHandshake, txredisapi.RedisProtocol):
    """A connection of a pool over TLS."""


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


class _TLSSubscriber(_AfterHandshake, _Subscriber):
    """A subscribing connection over TLS."""


class Subscription:
    """A Redis pub/sub channel, subscribed from ``open()`` until ``disconnect()``, and again
    (with backoff) after every lost connection.

    ``on_subscribed()`` is called each time the subscription (re)starts, ``on_lost()``
    each time it ends: messages published in between were missed. ``on_message(payload)``
    (bytes) for each message. ``tls``: required by a ``rediss://`` URL.
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
        tls: RedisTLS | None = None,
    ) -> None:
        if (urlsplit(url).scheme == "rediss") != (tls is not None):
            raise ValueError("redis subscription: TLS settings go with a rediss:// url, and only with one")
        self.url = url
        self.tls = tls
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
        factory.protocol = _Subscriber if self.tls is None else _TLSSubscriber
        factory.charset, factory.convertNumbers = None, False
        factory.password = parts.password
        factory.maxDelay = 5  # seconds between attempts at most: the cache is bypassed meanwhile
        factory.subscription = self
        if parts.scheme == "unix":
            endpoint: Any = endpoints.UNIXClientEndpoint(self.reactor, parts.path, timeout=self.timeout)
        else:
            host = parts.hostname or "127.0.0.1"
            endpoint = endpoints.HostnameEndpoint(self.reactor, host, parts.port or 6379, timeout=self.timeout)
            if self.tls is not None:
                endpoint = endpoints.wrapClientTLS(self.tls.creator(host), endpoint)
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
