"""The service trees of the two processes, built from their config.

``twistd emond`` runs a node, ``twistd emond-storage`` a storage server; the
twistd plugins only parse ``--config`` and call these.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.internet import StreamServerEndpointService
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.internet import defer, endpoints
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from emond.config import NodeConfig, StorageConfig
from emond.inflight import InFlight
from emond.api.health import HealthCheck, HealthResource, MetricsPage, OperatorAccess, OperatorOnly
from emond.process.consumer import InputConsumerService
from emond.app.monitor import QueueMonitor
from emond.app.node import NodeAppService, central_redis, make_api, make_contexts, shard_redis
from emond.pools import PoolsService, watch_pools
from emond.storage.remote import LinkMetrics, RemoteLink, StreamLink
from emond.storage.sender import LocalSenderService, RefusalRecorder, SenderMetrics
from emond.queue import QueueLayout
from emond.api.http import ApiResource
from emond.web import limited_request_factory
from emond.web.lean import Dates, LeanChannel
from emond.app.reuseport import server_endpoint
from emond.app.redisproc import EmbeddedRedis, embedded_redis_dir
from emond.storage.location import StorageLocationService, location_dir
from emond.storage.server import StreamServer, StreamServerFactory
from emond.stream import ServerTLS
from emond.app.tree import Listening, OrderedMultiService, ProcessTree


log = Logger()


class DrainingSite(Site):
    """A site that knows its connections and the requests in progress on each, so that a
    stop can let those requests finish, then close every connection: an idle keep-alive
    connection at once, a busy one when its last request has been answered, and whatever
    is left when the drain timeout has passed."""

    def __init__(
        self, resource: Resource, request_factory: type[Request], reactor: Any, access_log: bool = True, lean: ApiResource | None = None
    ) -> None:
        """``lean``: the API whose input routes ``emond.web.lean`` serves on this site's
        connections (None: twisted.web serves every request)."""
        super().__init__(resource, requestFactory=self._request, reactor=reactor)
        self._make_request = request_factory
        self._access_log = access_log
        self._lean = lean
        self.lean_served = 0  # requests the lean protocol answered (the tests check it is used)
        self._dates = Dates()
        self._connections: set[Any] = set()  # their transports
        self._busy: dict[Any, int] = {}  # a connection's transport -> its requests in progress
        self._open = InFlight()  # connections: drained() fires once all are closed
        self._draining = False

    def log(self, request: Any) -> None:
        if self._access_log:
            super().log(request)

    def reconfigure(self, max_body: int | None, access_log: bool) -> None:
        """Bodies of requests from now on limited to ``max_body`` (None: as they are); whether
        each request is logged."""
        if max_body is not None:
            self._make_request.max_body = max_body  # type: ignore[attr-defined]  # this site's own class
        self._access_log = access_log

    def buildProtocol(self, addr: Any) -> Any:
        if self._lean is None:
            return super().buildProtocol(addr)
        return LeanChannel(self, self._lean, self._dates)

    def plain_protocol(self, addr: Any) -> Any:
        """twisted.web's own channel, for a connection ``LeanChannel`` hands over."""
        return super().buildProtocol(addr)

    def access_logged(self) -> bool:
        return self._access_log

    def max_body(self) -> int:
        return self._make_request.max_body  # type: ignore[attr-defined,no-any-return]

    def request_began(self, transport: Any) -> None:
        """A request of ``LeanChannel`` in progress on that connection (as ``_request``)."""
        self._busy[transport] = self._busy.get(transport, 0) + 1
        self.lean_served += 1

    def request_ended(self, transport: Any) -> None:
        self._request_ended(None, transport)

    def open_connections(self) -> int:
        return len(self._connections)

    def in_progress(self) -> int:
        """Requests not answered yet."""
        return sum(self._busy.values())

    def connection_made(self, transport: Any) -> None:
        self._connections.add(transport)
        self._open.enter()

    def connection_lost(self, transport: Any) -> None:
        self._connections.discard(transport)
        self._busy.pop(transport, None)
        self._open.leave()

    def _request(self, channel: Any, *args: Any, **kwargs: Any) -> Request:
        """The request factory the channels use: counts each request until it has been
        answered or its client has gone."""
        request = self._make_request(channel, *args, **kwargs)
        transport = channel.transport
        self._busy[transport] = self._busy.get(transport, 0) + 1
        request.notifyFinish().addBoth(self._request_ended, transport)
        return request

    def _request_ended(self, _: Any, transport: Any) -> None:
        if transport not in self._connections:
            return  # the connection is gone (that ended the request)
        left = self._busy.get(transport, 1) - 1
        if left > 0:
            self._busy[transport] = left
            return
        self._busy.pop(transport, None)
        if self._draining:
            transport.loseConnection()  # after the answer has been written out

    async def drain(self, timeout: float) -> None:
        """Close every connection once its requests in progress are answered; after
        ``timeout`` seconds cut those that are left. Call it after listening has stopped."""
        self._draining = True
        for transport in list(self._connections):
            if not self._busy.get(transport):
                transport.loseConnection()
        busy = len(self._busy)
        if busy:
            log.info("HTTP stopping: waiting for the requests in progress on {busy} connections", busy=busy)
        cut = self.reactor.callLater(timeout, self._cut)
        try:
            await self._open.drained()
        finally:
            if cut.active():
                cut.cancel()
            self._draining = False

    def _cut(self) -> None:
        if self._connections:
            log.warn("{n} HTTP connections still busy after the drain timeout: closing them", n=len(self._connections))
        for transport in list(self._connections):
            transport.abortConnection()


class _WatchedConnections(WrappingFactory):
    """Tells the site of each connection that opens and closes."""

    def logPrefix(self) -> str:
        return self.wrappedFactory.logPrefix()  # "DrainingSite starting on <port>", as before

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.wrappedFactory.connection_made(p)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self.wrappedFactory.connection_lost(p)


class DrainingHTTPService(StreamServerEndpointService):
    """Listens from ``startService``; ``stopService`` stops listening, lets the requests in
    progress be answered (at most ``drain_timeout`` seconds) and closes every connection."""

    def __init__(self, endpoint: Any, site: DrainingSite, drain_timeout: float) -> None:
        self.listening = Listening(endpoint)
        super().__init__(self.listening, _WatchedConnections(site))
        self.site = site
        self.drain_timeout = drain_timeout

    def reconfigure(self, drain_timeout: float, max_body: int | None, access_log: bool) -> None:
        self.drain_timeout = drain_timeout
        self.site.reconfigure(max_body, access_log)

    def unfinished(self) -> list[str]:
        n = self.site.in_progress()
        return [f"{n} HTTP requests in progress (cut: their clients got no answer)"] if n else []

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await super().stopService()  # the port is closed: no new connection
        await self.site.drain(self.drain_timeout)


def anonymous_request_factory(max_body: int) -> type[Request]:
    """Requests whose bodies are limited to ``max_body`` and whose answers carry no
    ``Server`` header (twisted.web names itself and its version there, a gift to scanners)."""

    class AnonymousRequest(limited_request_factory(max_body)):  # type: ignore[misc]
        def write(self, data: bytes) -> None:
            if not self.startedWriting:  # the headers go out with the first write
                self.responseHeaders.removeHeader(b"server")
            super().write(data)

    return AnonymousRequest


def http_drain(drain_timeout: float) -> float:
    """The part of a stop's ``drain_timeout`` that HTTP requests in progress get: half (the
    pipeline's work in hand, and closing, get the rest)."""
    return drain_timeout / 2


def _http_service(
    reactor: Any,
    description: str,
    root: Resource,
    drain_timeout: float,
    max_body: int = 1 << 20,
    access_log: bool = True,
    reuse_port: bool = False,
    lean: ApiResource | None = None,
) -> DrainingHTTPService:
    site = DrainingSite(root, anonymous_request_factory(max_body), reactor, access_log, lean)
    site.displayTracebacks = False  # no stack trace reaches a client
    service = DrainingHTTPService(server_endpoint(reactor, description, reuse_port), site, http_drain(drain_timeout))
    service.setName("http")
    return service


def _foreign_storage(config: NodeConfig) -> None:
    """Warn about hosted storage servers of another shard than this process's: their queues
    (in that shard's Redis) are drained only by that shard's process, so here they serve
    reads and file management alone, and that process must host the same data directory."""
    for server_id in config.node.storage:
        owner = config.shard_of_server(server_id)
        if owner != config.node.shard:
            log.warn(
                "storage server {server} is hosted here but is shard {owner!r}'s: only a process with shard = "
                "\"{owner}\" drains its queue (it must host the same data directory); here it is read only",
                server=server_id, owner=owner,
            )


def make_node_service(config: NodeConfig, reactor: Any) -> ProcessTree:
    """The tree of a node: private Redis (if none configured), hosted storage, the API, the
    pipeline (consumer, senders, monitor), HTTP.

    What runs follows the process's roles ([node] front and shard): a front serves the
    input endpoint and the JSON API for the users of every shard, reading every storage
    server; a shard's process consumes that shard's input queues and drains its storage
    queues, in the shard's Redis. A process without the front role still answers /health
    and /metrics. The single node (no [shards]) holds both roles for its one shard.

    Building it opens nothing (no socket, no thread): each service opens its connections
    in ``startService``. Children start in this order and stop in the reverse one, each
    waiting for its work in progress: HTTP stops taking requests and answers those it
    has, the pipeline finishes its passes, then the API closes Redis and the database,
    and storage and Redis go away.
    """
    _foreign_storage(config)
    root = ProcessTree()
    checks: dict[str, HealthCheck] = {}
    redis_url = config.redis.url
    if not redis_url:
        redis = EmbeddedRedis(embedded_redis_dir(config.node.datadir), reactor)
        redis.setName("redis")
        redis.setServiceParent(root)
        checks["redis"] = redis.status
        redis_url = redis.url
    storage = MultiService()
    storage.setName("storage")
    storage.setServiceParent(root)
    locations = {}
    for i, server_id in enumerate(config.node.storage):
        location = StorageLocationService(
            server_id, location_dir(config.node.datadir, server_id, i == 0), config.engines, reactor
        )
        location.setName(str(server_id))
        location.setServiceParent(storage)
        locations[server_id] = location
    checks["storage"] = lambda: _all_ok({str(sid): loc.status() for sid, loc in locations.items()})
    contexts = make_contexts(config, redis_url, locations, reactor)
    ctx = contexts.default
    # The KDF and rendering pools stop (joined) after the API; each location stops its own.
    pools = PoolsService([ctx.users.kdf, ctx.render])
    pools.setName("pools")
    pools.setServiceParent(root)
    watch_pools(ctx.registry, [*pools.pools, *(p for location in locations.values() for p in location.pools)])
    layout = QueueLayout.from_config(config.input)
    # A front of several shards keeps its user -> shard cache current (emond.cluster.shardmap).
    subscription = None
    if len(config.shards) > 1 and config.node.front:
        central = central_redis(config, redis_url)
        subscription = contexts.shardmap.listen(central.url, central.timeout, reactor, central.tls)
    app = NodeAppService(contexts, layout, reactor, subscription)
    app.setName("api")
    app.setServiceParent(root)
    pipeline = OrderedMultiService()
    pipeline.setName("pipeline")
    pipeline.setServiceParent(root)
    senders: dict[str, Any] = {}
    link_metrics = LinkMetrics(ctx.registry)
    if config.node.shard:
        senders = _shard_pipeline(config, contexts[config.node.shard], layout, redis_url, locations, link_metrics, pipeline, checks, reactor)
    if config.node.front:
        # Reads of the storage servers whose queues another process drains.
        for server_id, remote in config.storage_servers.items():
            if str(server_id) not in senders:
                assert config.tls is not None  # required by the config when remotes exist
                link = StreamLink(server_id, remote, config.tls, config.node.name, link_metrics, reactor)
                link.setName(f"reader{server_id}")
                link.setServiceParent(pipeline)
                ctx.store.remotes[server_id] = link
        api = make_api(app, checks, reactor)
        health = api.child(b"health")
        web: Resource = api
    else:
        only = _health_only(app, checks, reactor)
        health, web = only.health, only
    assert isinstance(health, HealthResource)
    root.health = health
    # Ready to serve once its own parts answer, whatever its remote storage servers and queue
    # lags say: it is there to queue while a storage server is down or catching up.
    root.readiness = tuple(name for name in health.names if name not in ("senders", "queues"))
    # The input routes on the lean protocol (emond.web.lean), but for TLS endpoints: twisted.web
    # negotiates HTTP/2 there, and the lean protocol speaks HTTP/1.1 alone.
    lean = web if isinstance(web, ApiResource) and not any(k in config.node.http for k in ("ssl:", "tls:")) else None
    http = _http_service(
        reactor, config.node.http, web, config.node.drain_timeout, config.input.max_body, config.node.access_log,
        config.node.reuse_port, lean,
    )
    http.setServiceParent(root)
    root.listeners.append(http.listening)
    root.reloads.append(app.reconfigure)
    root.reloads.append(lambda c: http.reconfigure(http_drain(c.node.drain_timeout), c.input.max_body, c.node.access_log))
    for link in pipeline:
        if isinstance(link, StreamLink):
            root.reloads.append(lambda _c, link=link: link.reload_tls())
    return root


def _shard_pipeline(
    config: NodeConfig,
    ctx: Any,
    layout: QueueLayout,
    central_url: str,
    locations: dict[int, StorageLocationService],
    link_metrics: LinkMetrics,
    pipeline: MultiService,
    checks: dict[str, HealthCheck],
    reactor: Any,
) -> dict[str, Any]:
    """The shard role: the consumer of the shard's input queues, the senders of its storage
    servers (hosted here or remote) and the queue monitor, all on the shard's Redis; the
    senders by server id."""
    where = shard_redis(config, ctx.shard, central_url)
    # Blocking reads (XREAD BLOCK) get connections of their own, opened by their reader at start.
    blocking = partial(where.client, reactor, poolsize=1, longer=1.0)
    if config.input.consume:
        consumer = InputConsumerService(ctx, layout, blocking(), reactor, lease_ms=config.input.lease_ms)
        consumer.setName("consumer")
        consumer.setServiceParent(pipeline)
    servers = sorted(config.shards[ctx.shard].storage)
    senders: dict[str, Any] = {}
    recorder = RefusalRecorder(ctx.refusals, lambda feeds: defer.ensureDeferred(_owners(ctx, feeds)))
    sender_metrics = SenderMetrics(ctx.registry)
    for server_id, location in locations.items():
        if server_id not in servers:
            continue  # another shard's (see _foreign_storage)
        sender = LocalSenderService(
            server_id,
            location,
            ctx.redis,
            blocking(),
            recorder,
            reactor,
            config.node.name,
            sender_metrics,
            lease_ms=config.input.lease_ms,
        )
        sender.setName(f"sender{server_id}")
        sender.setServiceParent(pipeline)
        senders[str(server_id)] = sender
    for server_id, remote in config.storage_servers.items():
        if server_id not in servers:
            continue  # another shard's: its queue is in that shard's Redis
        assert config.tls is not None  # required by the config when remotes exist
        link = RemoteLink(
            server_id,
            remote,
            config.tls,
            config.node.name,
            ctx.redis,
            blocking(),
            recorder,
            link_metrics,
            reactor,
            lease_ms=config.input.lease_ms,
        )
        link.setName(f"sender{server_id}")
        link.setServiceParent(pipeline)
        senders[str(server_id)] = link
        ctx.store.remotes[server_id] = link
    health = config.health

    async def senders_check() -> dict[str, object]:
        # A remote link is asked whether its server answers now; half the check's time each.
        parts = {
            sid: await s.health(health.check_timeout / 2, health.max_ack_wait) if isinstance(s, RemoteLink) else s.status()
            for sid, s in senders.items()
        }
        return _all_ok(parts)

    checks["senders"] = senders_check
    monitor = QueueMonitor(ctx.redis, layout.queues, servers, ctx.registry, reactor, config.health)
    monitor.setName("monitor")
    monitor.setServiceParent(pipeline)
    checks["queues"] = monitor.status
    return senders


class HealthOnly(Resource):
    """The HTTP root of a process without the front role: /health and /metrics, nothing else."""

    def __init__(self, health: HealthResource, metrics: Resource) -> None:
        super().__init__()
        self.health = health
        self.putChild(b"health", health)
        self.putChild(b"metrics", metrics)


def _health_only(app: NodeAppService, checks: dict[str, HealthCheck], reactor: Any) -> HealthOnly:
    ctx = app.ctx
    checks = {**checks, "database": app.database_status, "redis_client": app.redis_status, "shard_redis": app.shards_status}
    access = OperatorAccess(ctx.config.health, ctx.auth.client)
    health = HealthResource("emond", checks, access, ctx.config.health.check_timeout, reactor)
    return HealthOnly(health, OperatorOnly(MetricsPage(ctx.registry), access))


async def _owners(ctx: Any, feedids: list[int]) -> dict[int, int]:
    owners = {}
    for feedid in feedids:
        feed = await ctx.feeds.get(feedid)
        if feed is not None:
            owners[feedid] = feed.userid
    return owners


def make_storage_service(config: StorageConfig, reactor: Any) -> ProcessTree:
    """The tree of a storage server: its storage location, the TLS stream listener, HTTP health."""
    root = ProcessTree()
    location = StorageLocationService(config.storage.id, config.storage.datadir, config.engines, reactor)
    location.setName("storage")
    location.setServiceParent(root)
    registry = CollectorRegistry()
    watch_pools(registry, location.pools)
    server = StreamServer(location, config.storage.allow, registry)
    # TLS is applied here, from [tls]: the ssl: endpoint string cannot require client
    # certificates. A reload reads the files again for the handshakes after it.
    tls = ServerTLS(config.tls.ca, config.tls.cert)
    factory = TLSMemoryBIOFactory(tls, False, StreamServerFactory(server, config.storage.id))
    listener = StreamServerDrainingService(
        endpoints.serverFromString(reactor, config.storage.listen), factory, server
    )
    listener.setName("stream")
    listener.setServiceParent(root)
    access = OperatorAccess(config.health)
    checks: dict[str, HealthCheck] = {"storage": location.status, "stream": server.status}
    root.health = HealthResource("emond-storage", checks, access, config.health.check_timeout, reactor)
    http = _http_service(reactor, config.storage.http, HealthOnly(root.health, OperatorOnly(MetricsPage(registry), access)), config.storage.drain_timeout)
    http.setServiceParent(root)
    root.listeners += [listener.listening, http.listening]
    root.reloads.append(lambda c: tls.load(c.tls.ca, c.tls.cert))
    root.reloads.append(lambda c: server.reconfigure(c.storage.allow))
    root.reloads.append(lambda c: http.reconfigure(http_drain(c.storage.drain_timeout), None, True))
    return root


class StreamServerDrainingService(StreamServerEndpointService):
    """Stops listening, then lets the batch in hand finish before connections close."""

    def __init__(self, endpoint: Any, factory: Any, server: StreamServer) -> None:
        self.listening = Listening(endpoint)
        super().__init__(self.listening, factory)
        self._server = server

    def unfinished(self) -> list[str]:
        return self._server.unfinished()

    def stopService(self) -> defer.Deferred[None]:
        stopped = super().stopService()
        return defer.gatherResults([stopped, defer.ensureDeferred(self._server.drain())]).addCallback(lambda _: None)


def _all_ok(parts: dict[str, dict[str, object]]) -> dict[str, object]:
    return {"ok": all(p.get("ok") for p in parts.values()), "locations": parts}
