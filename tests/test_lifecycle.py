"""The node's service tree owns its connections: building it opens nothing, starting it opens
Redis, the database and the HTTP listener, and stopping it lets the work in progress finish
(HTTP first, then the pipeline, then the API's connections) before closing every one of them.

Real components throughout: a real node tree in the test's reactor, a private redis-server
(whose CLIENT LIST is the judge of the node's connections) and the run's MariaDB (whose
process list is, for the node's database)."""

from __future__ import annotations

import os
import threading

import treq
from twisted.internet import defer, error, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived

from emond.api.http import PUBLIC
from emond.redis import Redis
from tests.support.node import NodeHarness, drain
from tests.support.servers import mariadb_server, private_redis


def open_sockets() -> int:
    """Sockets this process holds (Linux: /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed meanwhile (listdir's own fd)
    return count


def own_threads() -> set[threading.Thread]:
    """Threads other than the reactor's shared pool (which trial and earlier tests may have started)."""
    return {t for t in threading.enumerate() if "twisted.internet.reactor" not in t.name}


def mysql_connections(database: str) -> int:
    """Connections the MariaDB server holds to ``database`` (its process list)."""
    import pymysql

    server = mariadb_server()
    conn = pymysql.connect(host=server.host, port=server.port, user=server.user)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s", (database,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


class LifecycleTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = private_redis()
        self.addCleanup(self.redis.stop)
        self.client = Redis.connect(self.redis.server.url, 5.0, reactor, poolsize=1)
        self.addCleanup(self.client.disconnect)
        self.client_id = yield self.client.call("CLIENT", "ID")  # its connection is up from here on

    @defer.inlineCallbacks
    def redis_clients(self):
        """The connections Redis serves other than the test's own."""
        listing = yield self.client.call("CLIENT", "LIST")
        return [line for line in listing.decode().splitlines() if not line.startswith(f"id={self.client_id} ")]

    def database_name(self, node: NodeHarness) -> str:
        return node.config.database.url.rsplit("/", 1)[1]

    @defer.inlineCallbacks
    def check_builds_without_opening(self, database: str):
        if database == "mysql":
            mariadb_server()  # the run's server (and its output reader thread) is up before counting
        threads, sockets = own_threads(), open_sockets()
        node = NodeHarness(self, database, redis=self.redis.server)
        self.addCleanup(node.stop)
        self.assertEqual(open_sockets(), sockets)  # no socket: no Redis, no database, no listener
        self.assertEqual(own_threads() - threads, set())  # no database pool thread
        self.assertEqual((yield self.redis_clients()), [])
        if database == "mysql":
            self.assertEqual(mysql_connections(self.database_name(node)), 0)
        yield self.assertFailure(treq.get(node.base + "health", persistent=False), error.ConnectionRefusedError)
        # Started, the same tree connects: the checks above do see connections.
        node.service.startService()
        yield node.app.prepared
        self.assertGreater(len((yield self.redis_clients())), 0)
        if database == "mysql":
            self.assertGreater(mysql_connections(self.database_name(node)), 0)

    def test_building_opens_nothing_sqlite(self):
        return self.check_builds_without_opening("sqlite")

    def test_building_opens_nothing_mysql(self):
        return self.check_builds_without_opening("mysql")

    @defer.inlineCallbacks
    def check_stop_closes_everything(self, database: str):
        if database == "mysql":
            mariadb_server()
        threads, sockets = own_threads(), open_sockets()
        node = yield NodeHarness.start(self, database, redis=self.redis.server)
        # Work that uses every connection: an account (database), posts (Redis, the
        # consumer's and the sender's blocking connections) written to disk, and a client
        # that keeps its HTTP connection open.
        answer = yield node.post("user/register.json", username="lifecycle", password="secret123", email="l@example.org")
        self.assertEqual(answer.code, 200, answer)
        login = yield node.post("user/auth.json", username="lifecycle", password="secret123")
        key = login.json()["apikey_write"]
        answer = yield node.post("input/post", node="emontx", fulljson='{"power": 100}', apikey=key)
        self.assertEqual(answer.code, 200, answer)
        yield drain(node)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        response = yield treq.get(node.base + "health", pool=pool)
        yield response.content()
        self.assertGreater(len((yield self.redis_clients())), 0)
        yield node.service.stopService()
        self.assertEqual((yield self.redis_clients()), [])
        if database == "mysql":
            self.assertEqual(mysql_connections(self.database_name(node)), 0)
        self.assertEqual(own_threads() - threads, set())  # the database pool's threads are gone
        self.assertEqual(node.service.getServiceNamed("http").site.open_connections(), 0)
        # Redis, database, listener, HTTP connections (both ends: the node closed the kept one)
        self.assertEqual(open_sockets(), sockets)
        yield self.assertFailure(treq.get(node.base + "health", persistent=False), error.ConnectionRefusedError)

    def test_stopped_tree_leaves_no_connection_sqlite(self):
        return self.check_stop_closes_everything("sqlite")

    def test_stopped_tree_leaves_no_connection_mysql(self):
        return self.check_stop_closes_everything("mysql")


class DrainTests(unittest.TestCase):
    """A request in a handler when the stop begins is answered, with the node's Redis and
    database still open, and only then does the stop finish."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, node_config: str = ""):
        self.node = yield NodeHarness.start(self, "sqlite", node_config=node_config)
        self.entered: defer.Deferred[None] = defer.Deferred()
        self.release: defer.Deferred[None] = defer.Deferred()

        async def held(call):
            self.entered.callback(None)
            await self.release
            # After the stop began: the API's connections must still be open.
            pong = await self.node.ctx.redis.ping()
            rows = await self.node.ctx.db.query("SELECT 41 + 1")
            return {"success": True, "redis": pong, "database": rows[0][0]}

        self.http = self.node.service.getServiceNamed("http")
        self.http.site.resource.router.add("test", "held", PUBLIC, held)

    def waiting_for_requests(self) -> defer.Deferred[None]:
        """Fires when the HTTP service logs that its stop waits for requests in progress."""
        logged: defer.Deferred[None] = defer.Deferred()

        def observe(event: dict) -> None:
            if event.get("log_format", "").startswith("HTTP stopping: waiting") and not logged.called:
                logged.callback(None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return logged

    @defer.inlineCallbacks
    def test_request_in_progress_is_answered_before_the_stop_ends(self):
        yield self.start()
        waiting = self.waiting_for_requests()
        answer = self.node.get("test/held.json")
        yield self.entered
        answered: list[bool] = []
        stopped = self.node.service.stopService()
        stopped.addCallback(lambda _: self.assertTrue(answered, "the stop ended before the answer arrived"))
        # The stop goes as far as it can: until it waits for the request (or, if it did not
        # wait, to its end, having closed what the handler is about to use).
        yield defer.DeferredList([waiting, stopped], fireOnOneCallback=True, fireOnOneErrback=True)
        self.assertFalse(stopped.called)
        self.assertTrue(self.node.service.getServiceNamed("pipeline").running)  # HTTP stops first
        self.assertTrue(self.node.service.getServiceNamed("api").running)
        self.release.callback(None)
        answer = yield answer
        answered.append(True)
        self.assertEqual(answer.code, 200, answer)
        self.assertEqual(answer.json(), {"success": True, "redis": True, "database": 42})
        yield stopped
        self.assertEqual(self.http.site.open_connections(), 0)

    @defer.inlineCallbacks
    def test_idle_keepalive_connection_is_closed_at_once(self):
        """A keep-alive connection with no request does not hold the stop (the drain timeout
        is an hour here: waiting for the client to go would time the test out)."""
        yield self.start("drain_timeout = 3600.0\n")
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        response = yield treq.get(self.node.base + "health", pool=pool)
        yield response.content()
        self.assertEqual(self.http.site.open_connections(), 1)  # kept alive, idle
        yield self.node.service.stopService()
        self.assertEqual(self.http.site.open_connections(), 0)
        # The stopped node answers nothing, not even on a connection the client kept.
        yield self.assertFailure(
            treq.get(self.node.base + "health", pool=pool), error.ConnectionRefusedError, ResponseNeverReceived
        )

    @defer.inlineCallbacks
    def test_request_that_never_ends_is_cut_after_the_drain_timeout(self):
        yield self.start("drain_timeout = 0.2\n")
        answer = self.node.get("test/held.json")
        yield self.entered
        yield self.node.service.stopService()  # ends although the handler still waits (for ever)
        self.assertEqual(self.http.site.open_connections(), 0)
        yield self.assertFailure(answer, ResponseFailed, ResponseNeverReceived)
