"""Test helpers: private redis-server and mariadbd processes for one test run."""

from tests.support.servers import MariaDBServer, RedisServer, mariadb_server, redis_server

__all__ = ["MariaDBServer", "RedisServer", "mariadb_server", "redis_server"]
