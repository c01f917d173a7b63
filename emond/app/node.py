"""A node's API: its context (database, Redis, models) built from config, and the
service that opens its connections at start (then migrates the schema and checks the
shards against those recorded) and closes them at stop. Building either opens nothing."""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from emond.api.http import ApiResource, Router
from emond.api.feeds import FEED_ROUTES
from emond.api.inputs import INPUT_ROUTES
from emond.api.users import USER_ROUTES
from emond.cluster.topology import TopologyMismatch, check_topology
from emond.meta.auth import Authenticator
from emond.config import NodeConfig
from emond.api.context import NodeContext
from emond.meta.db import Database
from emond.meta.feeds import Feeds
from emond.storage.feedstore import FeedStore
from emond.api.health import HealthCheck, HealthResource, MetricsPage, OperatorAccess, OperatorOnly
from emond.meta.inputs import Inputs
from emond.pools import BoundedPool
from emond.queue import QueueLayout, QueueLayoutError
from emond.redis import Redis, RedisUnavailable
from emond.meta.refusals import Refusals
from emond.meta.schema import migrate
from emond.storage.location import StorageLocationService
from emond.storage.sender import QueueWriter
from emond.meta.users import Users
from emond.web import INPUT_PATH_ROUTES, InputAppender, InputMetrics, InputPath, UserRateLimit


def make_context(
    config: NodeConfig, redis_url: str, locations: dict[int, StorageLocationService], reactor: Any
) -> NodeContext:
    """The node's models over its database and Redis, neither open yet (``NodeAppService`` opens them)."""
    db = Database.from_url(config.database.url, config.sqlite_path)
    redis = Redis(redis_url, config.redis.timeout, reactor)
    # Pools of their own (emond.pools), started and stopped by a PoolsService in the tree.
    users = Users(db, BoundedPool("kdf", config.users.kdf_threads, config.users.kdf_queue, reactor))
    render = BoundedPool("render", config.feeds.render_threads, config.feeds.render_queue, reactor)
    registry = CollectorRegistry()
    return NodeContext(
        config=config,
        db=db,
        redis=redis,
        users=users,
        auth=Authenticator(users, redis, config.users.session_days * 86400, config.users.trusted_proxies),
        feeds=Feeds(db, redis, config.users.max_feeds),
        inputs=Inputs(db, redis),
        store=FeedStore(locations, reactor, config.feeds.read_timeout),
        render=render,
        writer=QueueWriter(redis, config.engines),
        refusals=Refusals(redis, registry),
        registry=registry,
    )


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
    """Opens the context's Redis and database at start, migrates the schema and checks the
    topology (the API answers 503 until that is done; a mismatch stops the process); at stop,
    once the services after it have stopped, lets the work in progress on them end and closes
    them."""

    log = Logger()

    def __init__(self, ctx: NodeContext, layout: QueueLayout, reactor: Any) -> None:
        self.ctx = ctx
        self.layout = layout
        self.reactor = reactor
        self.ready = False
        self.prepared: defer.Deferred[None] = defer.Deferred()  # fires when the API can answer
        self._error: str | None = None
        self._preparing: defer.Deferred[None] | None = None
        self._retry: Any = None  # the next attempt while Redis does not answer

    def startService(self) -> None:
        super().startService()
        self.ctx.redis.open()
        self.ctx.db.open()
        self._attempt()

    def _attempt(self) -> None:
        self._retry = None
        self._preparing = defer.ensureDeferred(self._prepare())
        self._preparing.addErrback(lambda failure: self.log.failure("preparing the node API failed", failure))

    async def _prepare(self) -> None:
        try:
            await self.layout.check(self.ctx.redis)
        except QueueLayoutError as e:
            self._refuse(e)
            return
        except RedisUnavailable as e:
            self.log.warn("Redis not answering yet ({error}); trying again", error=str(e))
            self._retry = self.reactor.callLater(1.0, self._attempt)
            return
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

    def _refuse(self, error: Exception) -> None:
        """This process must not run with this config (its queue layout or shards disagree with
        what the others recorded): say why, stop, and end with status 1."""
        self.log.critical("refusing to start: {error}", error=str(error))
        self._error = str(error)
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
        return {"ok": await self.ctx.redis.ping()}

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._preparing is not None:
            await self._preparing  # a migration is not cut in the middle
        self.ready = False
        await defer.gatherResults([self.ctx.db.close(), self.ctx.redis.disconnect()], consumeErrors=True)


def make_api(ctx: NodeContext, app: NodeAppService, checks: dict[str, HealthCheck], reactor: Any) -> ApiResource:
    router = Router()
    settings = ctx.config.input
    appender = InputAppender(ctx.redis, app.layout, reactor)
    limiter = UserRateLimit(settings.rate_limit, settings.rate_burst)
    router.add_routes(INPUT_PATH_ROUTES, InputPath(ctx, appender, limiter, InputMetrics(ctx.registry)))
    router.add_routes(USER_ROUTES, ctx)
    router.add_routes(FEED_ROUTES, ctx)
    router.add_routes(INPUT_ROUTES, ctx)
    checks = {**checks, "database": app.database_status, "redis_client": app.redis_status}
    health = ctx.config.health
    access = OperatorAccess(health, ctx.auth.client)  # X-Forwarded-For only from a trusted proxy
    extra = {
        b"health": HealthResource("emond", checks, access, health.check_timeout, reactor),
        b"metrics": OperatorOnly(MetricsPage(ctx.registry), access),
    }
    return ApiResource(router, ctx.auth, extra, ready=lambda: app.ready, registry=ctx.registry)
