"""Test helpers: private redis-server and mariadbd processes, real twistd daemons."""

from tests.support.servers import MariaDBServer, RedisServer, free_port, mariadb_server, redis_server

__all__ = ["MariaDBServer", "RedisServer", "free_port", "mariadb_server", "redis_server"]
