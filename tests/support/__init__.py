"""Test helpers: private redis-server and mariadbd processes, real twistd daemons."""

from tests.support.servers import (
    MariaDBServer,
    MissingProgram,
    RedisServer,
    free_port,
    mariadb_server,
    redis_server,
    require_program,
)

__all__ = ["MariaDBServer", "MissingProgram", "RedisServer", "free_port", "mariadb_server", "redis_server", "require_program"]
