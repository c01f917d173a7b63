"""The metadata database: MariaDB/MySQL (pymysql) or SQLite, through ``adbapi``.

SQL is written once with ``?`` placeholders and always parameterised; the
MySQL driver's ``%s`` style is produced here. SQLite runs with WAL, a busy
timeout and a single connection (one writer). Schema changes are versioned
migrations (``emond.meta.schema``) applied at start.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, Sequence
from urllib.parse import SplitResult, unquote, urlsplit

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from emond.inflight import InFlight

Row = tuple[Any, ...]


class Database:
    """One connection pool and the dialect it speaks. The pool (its threads and connections)
    exists between ``open()`` and ``close()``: a service opens it in ``startService``."""

    log = Logger()

    def __init__(self, dialect: str, make_pool: Callable[[], adbapi.ConnectionPool]) -> None:
        self.dialect = dialect  # "sqlite" or "mysql"
        self._make_pool = make_pool
        self._pool: adbapi.ConnectionPool | None = None
        self._busy = InFlight()  # statements in progress: a close lets them end first
        self._closed: defer.Deferred[None] | None = None

    @classmethod
    def from_url(cls, url: str, sqlite_path: str | None = None) -> "Database":
        """``sqlite:///relative/or//absolute.db`` or ``mysql://user:pw@host:port/db``, not open yet."""
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            path = sqlite_path or parts.path[1:]
            return cls("sqlite", lambda: _sqlite_pool(path))
        if parts.scheme == "mysql":
            return cls("mysql", lambda: _mysql_pool(parts))
        raise ValueError(f"unsupported database url: {url!r}")

    @classmethod
    def connect(cls, url: str, sqlite_path: str | None = None) -> "Database":
        """``from_url``, opened now (tools and tests)."""
        db = cls.from_url(url, sqlite_path)
        db.open()
        return db

    def open(self) -> None:
        """Create the pool (its threads start with the reactor). Opening an open pool does nothing."""
        if self._pool is None:
            self._pool = self._make_pool()
            self._closed = None

    def close(self) -> defer.Deferred[None]:
        """Take no more statements, let those in progress end, then close the connections and
        stop the pool's threads. Closing a closed pool does nothing."""
        if self._pool is None:
            return self._closed or defer.succeed(None)
        pool, self._pool = self._pool, None
        # The threads are idle by then: stopping them (a join) does not hold up the reactor.
        self._closed = self._busy.drained().addCallback(lambda _: pool.close())
        return self._closed

    def _run(self, method: str, *args: Any) -> defer.Deferred[Any]:
        """``pool.<method>(*args)`` (runQuery, runInteraction), counted while in progress."""
        if self._pool is None:
            return defer.fail(DatabaseClosed("the database is not open (not started, or stopping)"))
        return self._busy.track(getattr(self._pool, method)(*args).addErrback(_unavailable))

    def sql(self, statement: str) -> str:
        """The statement in this driver's placeholder style."""
        if self.dialect == "mysql":
            return statement.replace("%", "%%").replace("?", "%s")
        return statement

    def query(self, statement: str, *args: Any) -> defer.Deferred[list[Row]]:
        return self._run("runQuery", self.sql(statement), args)

    async def one(self, statement: str, *args: Any) -> Row | None:
        rows = await self.query(statement, *args)
        return rows[0] if rows else None

    def execute(self, statement: str, *args: Any) -> defer.Deferred[int]:
        """Run a write; fires with the number of rows it changed."""
        return self._run("runInteraction", _execute, self.sql(statement), args)

    def insert(self, statement: str, *args: Any) -> defer.Deferred[int]:
        """Run an INSERT; fires with the new row's id."""
        return self._run("runInteraction", _insert, self.sql(statement), args)

    def transaction(self, work: Callable[["Transaction"], Any]) -> defer.Deferred[Any]:
        """Run ``work(Transaction)`` in one database transaction, in a thread."""
        return self._run("runInteraction", lambda cursor: work(Transaction(self, cursor)))


class DatabaseClosed(Exception):
    """A statement when the pool is not open."""


class DatabaseUnavailable(Exception):
    """The database server did not answer the statement: gone, the connection lost, too many
    connections, a lock waited for too long. A client may try again (the API answers 503);
    anything else the driver raises is a fault and stays as it is."""


# MariaDB's "try again" codes: too many connections, lock wait timeout, can't connect, server
# gone away, connection lost during a query, lost connection.
UNAVAILABLE_CODES = frozenset({1040, 1205, 2003, 2006, 2013, 2055})


def _unavailable(failure: Failure) -> Failure:
    """A failure of the server or the connection, as DatabaseUnavailable."""
    error = failure.value
    if isinstance(error, (adbapi.ConnectionLost, pymysql.err.InterfaceError)) or (
        isinstance(error, pymysql.err.OperationalError) and error.args and error.args[0] in UNAVAILABLE_CODES
    ):
        return Failure(DatabaseUnavailable(f"database: {error!r}"))
    return failure


class Transaction:
    """A cursor inside ``Database.transaction`` (runs in the pool's thread)."""

    def __init__(self, db: Database, cursor: Any) -> None:
        self._db = db
        self._cursor = cursor

    def query(self, statement: str, *args: Any) -> list[Row]:
        self._cursor.execute(self._db.sql(statement), args)
        return list(self._cursor.fetchall())

    def execute(self, statement: str, *args: Any) -> int:
        self._cursor.execute(self._db.sql(statement), args)
        return self._cursor.rowcount

    def insert(self, statement: str, *args: Any) -> int:
        self._cursor.execute(self._db.sql(statement), args)
        return int(self._cursor.lastrowid)

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(self._db.sql(statement), rows)


def is_duplicate(error: Exception) -> bool:
    """Did a write fail on a unique index (SQLite's IntegrityError or MariaDB's 1062)?"""
    text = str(error).upper()
    return "UNIQUE" in text or "DUPLICATE" in text


def _sqlite_pool(path: str) -> adbapi.ConnectionPool:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return adbapi.ConnectionPool(
        "sqlite3",
        path,
        timeout=10.0,  # busy timeout, seconds
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=_sqlite_open,
    )


def _mysql_pool(parts: SplitResult) -> adbapi.ConnectionPool:
    return adbapi.ConnectionPool(
        "pymysql",
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=parts.path.lstrip("/"),
        charset="utf8mb4",
        cp_min=1,
        cp_max=8,
        cp_reconnect=True,
    )


def _sqlite_open(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=10000")


def _execute(cursor: Any, statement: str, args: Sequence[Any]) -> int:
    cursor.execute(statement, args)
    return cursor.rowcount


def _insert(cursor: Any, statement: str, args: Sequence[Any]) -> int:
    cursor.execute(statement, args)
    return int(cursor.lastrowid)
