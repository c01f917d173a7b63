"""The test-server harness works over real sockets."""

from __future__ import annotations

from typing import Any, Generator

import txredisapi
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.trial import unittest

from tests.support import mariadb_server, redis_server


class RedisServerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = redis_server()
        self.server.flushall()

    def test_shared_instance(self) -> None:
        self.assertIs(redis_server(), self.server)
        self.assertEqual(self.server.url, f"redis://127.0.0.1:{self.server.port}/0")

    @defer.inlineCallbacks
    def _connect(self) -> Generator[defer.Deferred[Any], Any, Any]:
        conn = yield txredisapi.Connection(
            self.server.host, self.server.port, reconnect=False, charset=None, convertNumbers=False
        )
        self.addCleanup(conn.disconnect)
        return conn

    @defer.inlineCallbacks
    def test_ping_set_get(self) -> Generator[defer.Deferred[Any], Any, None]:
        conn = yield self._connect()
        self.assertIn((yield conn.ping()), ("PONG", b"PONG"))
        yield conn.set(b"emond:test", b"\x00\xffvalue")
        self.assertEqual((yield conn.get(b"emond:test")), b"\x00\xffvalue")

    @defer.inlineCallbacks
    def test_flushall(self) -> Generator[defer.Deferred[Any], Any, None]:
        conn = yield self._connect()
        yield conn.set(b"emond:gone", b"1")
        self.server.flushall()
        self.assertIsNone((yield conn.get(b"emond:gone")))


class MariaDBServerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = mariadb_server()

    def test_shared_instance(self) -> None:
        self.assertIs(mariadb_server(), self.server)
        self.assertEqual(self.server.url, f"mysql://root@127.0.0.1:{self.server.port}/")

    def test_unique_databases(self) -> None:
        self.assertNotEqual(self.server.create_database(), self.server.create_database())

    @defer.inlineCallbacks
    def test_create_insert_select(self) -> Generator[defer.Deferred[Any], Any, None]:
        name = self.server.create_database()
        pool = adbapi.ConnectionPool(
            "pymysql",
            host=self.server.host,
            port=self.server.port,
            user=self.server.user,
            database=name,
            cp_min=1,
            cp_max=2,
        )
        self.addCleanup(pool.close)
        yield pool.runOperation("CREATE TABLE feeds (id INT PRIMARY KEY, name VARCHAR(64))")
        yield pool.runOperation("INSERT INTO feeds VALUES (%s, %s), (%s, %s)", (1, "power", 2, "temp"))
        rows = yield pool.runQuery("SELECT id, name FROM feeds ORDER BY id")
        self.assertEqual([tuple(r) for r in rows], [(1, "power"), (2, "temp")])
        self.assertEqual((yield pool.runQuery("SELECT DATABASE()")), ((name,),))
