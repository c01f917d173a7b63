"""A real node service tree in the test's reactor, over a private Redis and
SQLite or a private MariaDB, and an HTTP client that talks to it over a socket."""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import defer, endpoints, reactor, ssl
from twisted.trial import unittest
from twisted.web.client import Agent

from emond.config import load_node_config
from emond.app.service import make_node_service
from tests.support.servers import MariaDBServer, RedisServer, free_port, mariadb_server, redis_server


class Answer:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    @property
    def content_type(self) -> str | None:
        values = self.headers.getRawHeaders(b"content-type")
        return values[0].decode() if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Answer {self.code} {self.body[:200]!r}>"


class NodeClient:
    """HTTP calls to the node at ``base`` (``http://HOST:PORT/``): a ``NodeHarness``, or a
    ``twistd emond`` process."""

    def __init__(self, base: str) -> None:
        self.base = base

    @defer.inlineCallbacks
    def request(self, method: str, path: str, params: dict | None = None, data: Any = None, headers: dict | None = None, cookies: Any = None):
        url = self.base + path.lstrip("/")
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        kwargs: dict[str, Any] = {"persistent": False, "headers": headers or {}}
        if cookies is not None:
            kwargs["cookies"] = cookies
        if data is not None:
            kwargs["data"] = data
        response = yield treq.request(method, url, **kwargs)
        body = yield response.content()
        self.last_cookies = response.cookies()
        return Answer(response.code, response.headers, body)

    def get(self, path: str, **params: Any):
        return self.request("GET", path, params=params)

    @defer.inlineCallbacks
    def csrf(self, cookies: Any):
        """The CSRF token of the session in ``cookies``, read where a browser's script reads
        it: the ``csrf-token`` meta tag of a page served to that session."""
        page = yield self.request("GET", "account", cookies=cookies)
        found = re.search(rb'<meta name="csrf-token" content="([^"]+)">', page.body)
        if page.code != 200 or found is None:
            raise AssertionError(f"no CSRF token in /account: {page!r}")
        return found.group(1).decode()

    def post(self, path: str, data: Any = None, **params: Any):
        return self.request("POST", path, params=params, data=data)


class NodeHarness(NodeClient):
    """``yield NodeHarness.start(self, "sqlite")`` in an inlineCallbacks setUp."""

    def __init__(
        self,
        test: unittest.TestCase,
        database: str,
        extra_config: str = "",
        redis_timeout: float = 5.0,
        redis: RedisServer | None = None,
        mariadb: MariaDBServer | None = None,
        host: str = "127.0.0.1",
        node_config: str = "",
        http_prefix: str = "",
        database_url: str | None = None,
        flush_redis: bool = True,
        redis_config: str = "",
    ) -> None:
        """``redis``/``mariadb``: a test's private server instead of the run's shared one;
        ``host``: the address the node listens on; ``node_config``: more lines of ``[node]``;
        ``http_prefix``: before its endpoint (``"haproxy:"``: the PROXY protocol);
        ``database_url``: a database another node uses too (the processes of a cluster),
        ``flush_redis``: false for the second process of a cluster on the same Redis (and for a
        Redis over TLS); ``redis_config``: more lines of ``[redis]``.
        Builds the node's service tree (which opens nothing until started)."""
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        redis = redis or redis_server()
        if flush_redis:
            redis.flushall()
        if database_url is not None:
            db_url = database_url
        elif database == "mysql":
            server = mariadb or mariadb_server()
            db_url = f"mysql://root@127.0.0.1:{server.port}/{server.create_database()}"
        else:
            db_url = "sqlite:///emond.db"
        self.port = free_port(host)
        text = (
            f'[node]\nhttp = "{http_prefix}tcp:{self.port}:interface={host}"\ndatadir = "var"\n{node_config}'
            f'[redis]\nurl = "{redis.url}"\ntimeout = {redis_timeout}\n{redis_config}[database]\nurl = "{db_url}"\n{extra_config}'
        )
        self.config_path = os.path.join(self.dir, "emond.toml")
        with open(self.config_path, "w") as f:
            f.write(text)
        self.config = load_node_config(self.config_path)
        self.service = make_node_service(self.config, reactor)
        self.app = self.service.getServiceNamed("api")
        self.base = f"http://{host}:{self.port}/"

    @classmethod
    @defer.inlineCallbacks
    def start(cls, test: unittest.TestCase, database: str = "sqlite", extra_config: str = "", redis_timeout: float = 5.0, **servers: Any):
        harness = cls(test, database, extra_config, redis_timeout, **servers)
        yield harness.begin(test)
        return harness

    @defer.inlineCallbacks
    def begin(self, test: unittest.TestCase):
        """Start the tree the constructor built (a test may first put data where its config
        says: ``start`` builds and begins at once); fires once it serves."""
        self.service.startService()
        test.addCleanup(self.stop)
        yield self.app.prepared
        storage = self.service.getServiceNamed("storage")
        for location in storage:
            yield location.opened
        for ctx in self.app.contexts:  # a front's other shards are checked in the background
            yield self.app.shard_checked(ctx.shard)

    def stop(self) -> defer.Deferred[None]:
        """Stop the tree unless the test did already."""
        return self.service.stopService() if self.service.running else defer.succeed(None)

    @property
    def ctx(self):
        return self.app.ctx


def pipeline(harness: NodeHarness, name: str):
    return harness.service.getServiceNamed("pipeline").getServiceNamed(name)


@defer.inlineCallbacks
def drain(harness: NodeHarness):
    """Wait until every input queue and the storage queue of every hosted location has been
    seen empty."""
    yield pipeline(harness, "consumer").idle()
    for server_id in harness.config.node.storage:
        yield pipeline(harness, f"sender{server_id}").idle()


def bound_client(source: str, tls_ca: str | None = None, tls_name: str = "") -> treq.client.HTTPClient:
    """An HTTP client whose connections leave from ``source`` (another loopback address);
    ``https`` URLs are trusted if signed by ``tls_ca`` for the name ``tls_name`` (whatever
    address they are reached at)."""

    class FromSource:
        def endpointForURI(self, uri):
            endpoint = endpoints.TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port, bindAddress=(source, 0))
            if uri.scheme == b"https":
                assert tls_ca is not None, "an https URL needs tls_ca"
                with open(tls_ca, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
                endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(tls_name, trustRoot=trust), endpoint)
            return endpoint

    return treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, FromSource()))


@defer.inlineCallbacks
def drain_shard(harness: NodeHarness):
    """``drain``, and the storage queues of the shard's remote storage servers."""
    yield drain(harness)
    for server_id in harness.config.shards[harness.config.node.shard].storage:
        if server_id in harness.config.storage_servers:
            yield pipeline(harness, f"sender{server_id}").idle()
