"""A node's API: its contexts (database, Redis, models; one per shard) built from config,
and the service that opens their connections at start (then checks each shard's queue
layout, migrates the schema and checks the shards against those recorded) and closes them
at stop. Building either opens nothing."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from emond.api.http import ApiResource, Call, Router
from emond.api.feeds import FEED_ROUTES
from emond.api.inputs import INPUT_ROUTES
from emond.api.users import USER_ROUTES
from emond.cluster.shardmap import ShardMap
from emond.cluster.topology import TopologyMismatch, check_topology
from emond.meta.auth import Authenticator
from emond.config import DEFAULT_SHARD, NodeConfig
from emond.api.context import NodeContext, ShardContexts
from emond.meta.db import Database
from emond.meta.feeds import Feeds
from emond.storage.feedstore import FeedStore
from emond.api.health import HealthCheck, HealthResource, MetricsPage, OperatorAccess, OperatorOnly
from emond.meta.inputs import Inputs
from emond.pools import BoundedPool
from emond.queue import QueueLayout, QueueLayoutError
from emond.redis import Redis, RedisTLS, RedisUnavailable, SentinelService, Subscription
from emond.meta.refusals import Refusals
from emond.meta.schema import migrate
from emond.storage.location import StorageLocationService
from emond.storage.sender import QueueWriter
from emond.meta.users import Users
from emond.web import INPUT_PATH_ROUTES, InputAppender, InputMetrics, InputPath, UserRateLimit
from emond.web.pages import PagesResource


@dataclass(frozen=True)
class ShardRedis:
    """Where a shard's Redis (or the central one) is (a URL, or a Sentinel service), how long
    it has to answer, and its TLS (a ``rediss://`` URL, sentinels with ``tls``)."""

    url: str
    timeout: float
    sentinel: SentinelService | None = None
    tls: RedisTLS | None = None

    def client(self, reactor: Any, poolsize: int = 4, longer: float = 0.0) -> Redis:
        """A client, not open yet; ``longer``: seconds added to the timeout (blocking reads)."""
        return Redis(self.url, self.timeout + longer, reactor, poolsize, self.sentinel, self.tls)


def _redis_tls(config: NodeConfig, name: str) -> RedisTLS:
    """The node's [tls] files, for a Redis whose certificate carries ``name``."""
    assert config.tls is not None  # required by the config wherever a Redis is reached over TLS
    return RedisTLS(config.tls.ca, config.tls.cert, name)


def central_redis(config: NodeConfig, url: str) -> ShardRedis:
    """The central Redis at ``url``: ``[redis] url``, or the private redis-server's."""
    tls = _redis_tls(config, config.redis.tls_name) if config.redis.uses_tls else None
    return ShardRedis(url, config.redis.timeout, tls=tls)


def shard_redis(config: NodeConfig, shard: str, central_url: str) -> ShardRedis:
    """The Redis of ``shard``: its own (by URL or through its sentinels), or, for a shard
    whose ``redis`` is "" without sentinels (the one shard of a node without [shards]), the
    central one, ``[redis]``, with its timeout."""
    section = config.shards[shard]
    tls = _redis_tls(config, section.tls_name) if section.uses_tls else None
    if section.sentinels:
        sentinel = SentinelService(section.sentinels, section.service, section.password, section.db, section.sentinel_password)
        return ShardRedis("", section.timeout, sentinel, tls)
    if not section.redis:
        return central_redis(config, central_url)
    return ShardRedis(section.redis, section.timeout, tls=tls)


def on_central(config: NodeConfig, shard: str) -> bool:
    """Whether the shard's Redis is the central one (the same client serves both)."""
    section = config.shards[shard]
    return not section.redis and not section.sentinels


def process_shards(config: NodeConfig) -> list[str]:
    """The shards this process works with: every shard for a front (any user may call it),
    else the one whose queues it consumes."""
    return list(config.shards) if config.node.front else [config.node.shard]


def make_contexts(
    config: NodeConfig, central_url: str, locations: dict[int, StorageLocationService], reactor: Any
) -> ShardContexts:
    """The node's models over its database, its central Redis and each shard's Redis, none
    open yet (``NodeAppService`` opens them). A shard on the central Redis shares its client."""
    db = Database.from_url(config.database.url, config.sqlite_path)
    central = central_redis(config, central_url).client(reactor)
    # Pools of their own (emond.pools), started and stopped by a PoolsService in the tree.
    users = Users(db, BoundedPool("kdf", config.users.kdf_threads, config.users.kdf_queue, reactor))
    render = BoundedPool("render", config.feeds.render_threads, config.feeds.render_queue, reactor)
    registry = CollectorRegistry()
    auth = Authenticator(users, central, config.users.session_days * 86400, config.users.trusted_proxies)
    store = FeedStore(locations, reactor, config.feeds.read_timeout)
    refusals: Refusals | None = None
    contexts: dict[str, NodeContext] = {}
    for name in process_shards(config):
        where = shard_redis(config, name, central_url)
        redis = central if on_central(config, name) else where.client(reactor)
        refusals = Refusals(redis, registry) if refusals is None else refusals.sharing(redis)
        contexts[name] = NodeContext(
            config=config,
            db=db,
            redis=redis,
            users=users,
            auth=auth,
            feeds=Feeds(db, redis, config.users.max_feeds),
            inputs=Inputs(db, redis),
            store=store,
            render=render,
            writer=QueueWriter(redis, config.engines),
            refusals=refusals,
            registry=registry,
            shard=name,
        )
    return ShardContexts(contexts, _default_shard(config, contexts), ShardMap(db, list(config.shards)))


def _default_shard(config: NodeConfig, contexts: dict[str, NodeContext]) -> str:
    """The context of calls without a user: the process's own shard, else "default", else the first."""
    for name in (config.node.shard, DEFAULT_SHARD):
        if name in contexts:
            return name
    return next(iter(contexts))


def exit_after_stop(reactor: Any, status: int) -> None:
    """Stop the reactor (the services stop in order) and end the process with ``status`` once
    twistd has cleaned up: twistd itself ends with 0 whatever stopped its reactor, and an
    exit handler is the only place left after it."""

    def exit_now() -> None:
        sys.stdout.flush()  # the log (twistd -n logs to stdout)
        sys.stderr.flush()
        os._exit(status)

    atexit.register(exit_now)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping (a signal came first)


class NodeAppService(Service):
    """Opens the contexts' Redis clients and database at start, checks the queue layout in
    each shard's Redis, migrates the schema and checks the topology (the API answers 503
    until that is done; a mismatch stops the process); at stop, once the services after it
    have stopped, lets the work in progress on them end and closes them.

    The process's own shard (``[node] shard``) is checked before the API is ready, as its
    consumer needs it. Every other shard's Redis (a front's) is checked in the background,
    again every second while it does not answer: a shard down at start holds up only its
    own users' posts (``shard_ready``)."""

    log = Logger()

    def __init__(
        self, contexts: ShardContexts, layout: QueueLayout, reactor: Any, subscription: Subscription | None = None
    ) -> None:
        """``subscription``: what keeps the contexts' shard map current (a node with shards)."""
        self.contexts = contexts
        self.ctx = contexts.default
        self.layout = layout
        self.reactor = reactor
        self.subscription = subscription
        self.role = self.ctx.config.node.shard
        self.ready = False
        self.prepared: defer.Deferred[None] = defer.Deferred()  # fires when the API can answer
        self.checked: set[str] = set()  # shards whose queue layout agrees with this process's
        self._error: str | None = None
        self._preparing: defer.Deferred[None] | None = None
        self._retry: Any = None  # the next attempt while Redis does not answer
        self._shard_checks: dict[str, defer.Deferred[None]] = {}
        self._shard_retries: dict[str, Any] = {}
        self._shard_waiters: dict[str, list[defer.Deferred[None]]] = {}
        self.input_paths: list[InputPath] = []  # the input endpoint's, one per shard (make_api)

    @property
    def central(self) -> Redis:
        return self.ctx.auth.redis

    def _clients(self) -> list[Redis]:
        """Every Redis client of the contexts, each once (a shard may share the central one)."""
        clients = {id(self.central): self.central}
        for ctx in self.contexts:
            clients.setdefault(id(ctx.redis), ctx.redis)
        return list(clients.values())

    def startService(self) -> None:
        super().startService()
        for redis in self._clients():
            redis.open()
        self.ctx.db.open()
        if self.subscription is not None:
            self.subscription.open()
        for ctx in self.contexts:
            if ctx.shard != self.role:
                self._check_shard(ctx.shard)
        self._attempt()

    def shard_ready(self, shard: str) -> bool:
        """Whether the shard's Redis has answered and agrees on the queue layout."""
        return shard in self.checked

    def shard_checked(self, shard: str) -> defer.Deferred[None]:
        """Fires once ``shard_ready(shard)`` (tests, tools)."""
        if shard in self.checked:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._shard_waiters.setdefault(shard, []).append(d)
        return d

    def _checked(self, shard: str) -> None:
        self.checked.add(shard)
        for d in self._shard_waiters.pop(shard, []):
            d.callback(None)

    def _attempt(self) -> None:
        self._retry = None
        self._preparing = defer.ensureDeferred(self._prepare())
        self._preparing.addErrback(lambda failure: self.log.failure("preparing the node API failed", failure))

    async def _prepare(self) -> None:
        if self.role:
            try:
                await self.layout.check(self.contexts[self.role].redis)
            except QueueLayoutError as e:
                self._refuse(e)
                return
            except RedisUnavailable as e:
                self.log.warn("Redis not answering yet ({error}); trying again", error=str(e))
                self._retry = self.reactor.callLater(1.0, self._attempt)
                return
            self._checked(self.role)
        try:
            version = await migrate(self.ctx.db)
            await check_topology(self.ctx.db, self.ctx.config)
        except TopologyMismatch as e:
            self._refuse(e)
            return
        except Exception as e:
            self._error = f"database: {e}"
            self.log.failure("cannot prepare the database")
            self.prepared.errback(e)
            self.prepared.addErrback(lambda _: None)  # reported in the log and /health
            return
        self.ready = True
        self.log.info("node API ready (schema version {version})", version=version)
        self.prepared.callback(None)

    def _check_shard(self, shard: str) -> None:
        self._shard_retries.pop(shard, None)
        self._shard_checks[shard] = defer.ensureDeferred(self._check(shard))

    async def _check(self, shard: str) -> None:
        try:
            await self.layout.check(self.contexts[shard].redis)
        except QueueLayoutError as e:
            self._refuse(QueueLayoutError(f"shard {shard}: {e}"))
            return
        except RedisUnavailable as e:
            if self.running:
                self.log.warn("shard {shard}'s Redis not answering yet ({error}); trying again", shard=shard, error=str(e))
                self._shard_retries[shard] = self.reactor.callLater(1.0, self._check_shard, shard)
            return
        self._checked(shard)

    def _refuse(self, error: Exception) -> None:
        """This process must not run with this config (its queue layout or shards disagree with
        what the others recorded): say why, stop, and end with status 1."""
        self.log.critical("refusing to start: {error}", error=str(error))
        self._error = str(error)
        if not self.prepared.called:  # (another shard's layout may be found wrong later)
            self.prepared.errback(error)
            self.prepared.addErrback(lambda _: None)  # reported in the log
        exit_after_stop(self.reactor, 1)

    async def database_status(self) -> dict[str, object]:
        if not self.ready:
            return {"ok": False, "error": self._error or "starting"}
        try:
            await self.ctx.db.query("SELECT 1")
        except Exception as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "dialect": self.ctx.db.dialect}

    async def redis_status(self) -> dict[str, object]:
        return {"ok": await self.central.ping()}

    async def shards_status(self) -> dict[str, object]:
        """Whether each shard's Redis answers. Only the process's own shard decides ``ok``: a
        front stays in its load balancer while one shard is down (it answers that shard's
        users 503 and every other user as before)."""
        contexts = list(self.contexts)
        answers = await defer.gatherResults([defer.ensureDeferred(ctx.redis.ping()) for ctx in contexts])
        shards = {ctx.shard: {"ok": bool(up)} for ctx, up in zip(contexts, answers)}
        own = shards.get(self.role, {"ok": True})["ok"]
        return {"ok": own, "shards": shards}

    def reconfigure(self, config: NodeConfig) -> None:
        """Serve with ``config`` from now on: a reload's, which differs from the running one
        only in settings read per request or applied here (limits, trusted proxies)."""
        for ctx in self.contexts:
            ctx.config = config
            ctx.feeds.max_feeds = config.users.max_feeds
        self.ctx.auth.reconfigure(config.users.session_days * 86400, config.users.trusted_proxies)
        self.ctx.store.read_timeout = config.feeds.read_timeout
        for path in self.input_paths:
            path.reconfigure()

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log)."""
        return [f"shard {path.ctx.shard}: {part}" for path in self.input_paths for part in path.appender.unfinished()]

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        for call in [self._retry, *self._shard_retries.values()]:
            if call is not None and call.active():
                call.cancel()
        self._retry = None
        self._shard_retries.clear()
        if self._preparing is not None:
            await self._preparing  # a migration is not cut in the middle
        await defer.gatherResults(list(self._shard_checks.values()), consumeErrors=True)
        self.ready = False
        closing = [self.ctx.db.close(), *(redis.disconnect() for redis in self._clients())]
        if self.subscription is not None:
            closing.append(self.subscription.disconnect())
        await defer.gatherResults(closing, consumeErrors=True)


def make_api(app: NodeAppService, checks: dict[str, HealthCheck], reactor: Any) -> ApiResource:
    """The JSON API and the input endpoint; a call is served with the context of its
    caller's shard (with one shard, always the same one)."""
    contexts = app.contexts
    ctx = contexts.default
    router = Router()
    settings = ctx.config.input
    limiter = UserRateLimit(settings.rate_limit, settings.rate_burst)  # a user is on one shard at a time
    metrics = InputMetrics(ctx.registry)
    paths = {c.shard: InputPath(c, _appender(c, app, reactor), limiter, metrics) for c in contexts}
    app.input_paths = list(paths.values())
    if len(contexts) == 1:
        router.add_routes(INPUT_PATH_ROUTES, paths[ctx.shard])
        for routes in (USER_ROUTES, FEED_ROUTES, INPUT_ROUTES):
            router.add_routes(routes, ctx)
    else:

        async def input_path(call: Call) -> InputPath:
            return paths[(await contexts.of_call(call)).shard]

        router.add_routes(INPUT_PATH_ROUTES, paths[ctx.shard], input_path)
        for routes in (USER_ROUTES, FEED_ROUTES, INPUT_ROUTES):
            router.add_routes(routes, ctx, contexts.of_call)
    checks = {**checks, "database": app.database_status, "redis_client": app.redis_status}
    if any(c.redis is not app.central for c in contexts):
        checks["shard_redis"] = app.shards_status
    health = ctx.config.health
    access = OperatorAccess(health, ctx.auth.client)  # X-Forwarded-For only from a trusted proxy
    extra = {
        b"health": HealthResource("emond", checks, access, health.check_timeout, reactor),
        b"metrics": OperatorOnly(MetricsPage(ctx.registry), access),
    }
    pages = PagesResource(ctx)  # sessions and accounts are the default (central) context's
    return ApiResource(router, ctx.auth, extra, ready=lambda: app.ready, registry=ctx.registry, csrf=ctx.auth.csrf_valid, pages=pages)


def _appender(ctx: NodeContext, app: NodeAppService, reactor: Any) -> InputAppender:
    """The input appender of a shard: its Redis, its replicas to wait for."""
    section = ctx.config.shards[ctx.shard]
    ready = partial(app.shard_ready, ctx.shard)
    return InputAppender(ctx.redis, app.layout, reactor, section.wait_replicas, section.wait_timeout, ready)
