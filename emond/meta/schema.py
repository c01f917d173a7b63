"""The metadata schema as versioned migrations, the same meaning on MariaDB and SQLite.

Ids are never reused (AUTOINCREMENT / InnoDB's persistent AUTO_INCREMENT), so
a late write for a deleted feed can never land in a new one.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, TypeVar, Union

from twisted.logger import Logger

from emond.meta.db import Database, Transaction

log = Logger()
Step = Union[str, Callable[[Transaction], None]]
T = TypeVar("T")

_TYPES = MappingProxyType({
    "sqlite": MappingProxyType({"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "engine": ""}),
    "mysql": MappingProxyType({
        "pk": "INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY",
        "engine": " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    }),
})


def _report_username_twins(txn: Transaction) -> None:
    """Log the accounts whose names differ only in case (made before names were unique
    whatever their case): all are kept; the oldest holds the name, the others still log in
    by their exact spelling (emond.meta.users.Users.authenticate)."""
    kept = dict(txn.query("SELECT username_key, username FROM users WHERE username_key IS NOT NULL"))
    twins: dict[str, list[str]] = {}
    for (username,) in txn.query("SELECT username FROM users WHERE username_key IS NULL ORDER BY id"):
        twins.setdefault(username.lower(), []).append(username)
    for key, names in sorted(twins.items()):
        log.warn(
            "username twins: {kept!r} keeps the name; {twins!r} still log in by their exact spelling",
            kept=kept.get(key), twins=names,
        )


# Usernames are unique whatever their case (``ALICE`` and ``alice`` cannot both register): a
# unique index on ``username_key`` (the lowercased name; a function index would not work on
# MariaDB). Twins already in the database are kept: the oldest gets the key, the others none.
CASE_INSENSITIVE_USERNAMES: tuple[Step, ...] = (
    "ALTER TABLE users ADD COLUMN username_key VARCHAR(30)",
    # the derived table: MariaDB cannot read the table an UPDATE changes in its own subquery
    "UPDATE users SET username_key = LOWER(username) WHERE id IN "
    "(SELECT id FROM (SELECT MIN(id) AS id FROM users GROUP BY LOWER(username)) AS oldest)",
    "CREATE UNIQUE INDEX users_username_key ON users (username_key)",
    _report_username_twins,
)

# Each migration is a tuple of steps: SQL statements ({pk} and {engine} are filled per
# dialect) or functions of the transaction (for what SQL alone cannot do, e.g. reporting).
MIGRATIONS: tuple[tuple[Step, ...], ...] = (
    (
        """CREATE TABLE users (
            id {pk},
            username VARCHAR(30) NOT NULL,
            email VARCHAR(128) NOT NULL DEFAULT '',
            password VARCHAR(255) NOT NULL,
            salt VARCHAR(32) NOT NULL DEFAULT '',
            apikey_write CHAR(32) NOT NULL,
            apikey_read CHAR(32) NOT NULL,
            apikey_write_hash CHAR(64) NOT NULL,
            apikey_read_hash CHAR(64) NOT NULL,
            uuid CHAR(36) NOT NULL,
            admin INT NOT NULL DEFAULT 0,
            name VARCHAR(64) NOT NULL DEFAULT '',
            location VARCHAR(64) NOT NULL DEFAULT '',
            timezone VARCHAR(64) NOT NULL DEFAULT 'UTC',
            language VARCHAR(5) NOT NULL DEFAULT 'en_EN',
            bio TEXT,
            gravatar VARCHAR(64) NOT NULL DEFAULT '',
            startingpage VARCHAR(64) NOT NULL DEFAULT 'feed/list',
            lastlogin BIGINT,
            created BIGINT NOT NULL
        ){engine}""",
        "CREATE UNIQUE INDEX users_username ON users (username)",
        "CREATE UNIQUE INDEX users_apikey_write ON users (apikey_write_hash)",
        "CREATE UNIQUE INDEX users_apikey_read ON users (apikey_read_hash)",
        """CREATE TABLE inputs (
            id {pk},
            userid INT NOT NULL,
            nodeid VARCHAR(16) NOT NULL,
            name VARCHAR(64) NOT NULL,
            description VARCHAR(255) NOT NULL DEFAULT '',
            processList TEXT
        ){engine}""",
        "CREATE UNIQUE INDEX inputs_name ON inputs (userid, nodeid, name)",
        """CREATE TABLE feeds (
            id {pk},
            userid INT NOT NULL,
            name VARCHAR(64) NOT NULL,
            tag VARCHAR(64) NOT NULL DEFAULT '',
            datatype INT NOT NULL DEFAULT 1,
            public INT NOT NULL DEFAULT 0,
            engine INT NOT NULL,
            server INT NOT NULL DEFAULT 0,
            feed_interval INT NOT NULL DEFAULT 0,
            unit VARCHAR(16) NOT NULL DEFAULT '',
            created BIGINT NOT NULL
        ){engine}""",
        "CREATE INDEX feeds_user ON feeds (userid)",
    ),
    (
        # Two feed/create calls at the same moment must not make twins.
        "CREATE UNIQUE INDEX feeds_name ON feeds (userid, tag, name)",
    ),
    CASE_INSENSITIVE_USERNAMES,
    (
        # Input last values (as emoncms's input table): the consumer copies them here at a
        # bounded rate, so that they survive Redis losing its data.
        "ALTER TABLE inputs ADD COLUMN time BIGINT",
        "ALTER TABLE inputs ADD COLUMN value DOUBLE",
    ),
    (
        # Shards (architecture §7): each user's shard; users from before shards are all on
        # the default shard (the one shard of a node without [shards]).
        "ALTER TABLE users ADD COLUMN shard VARCHAR(32) NOT NULL DEFAULT 'default'",
        "CREATE INDEX users_shard ON users (shard)",
        # The topology the processes sharing this database were configured with, recorded
        # by the first to start: a process configured otherwise refuses to start.
        """CREATE TABLE shards (
            name VARCHAR(32) NOT NULL PRIMARY KEY,
            storage VARCHAR(255) NOT NULL
        ){engine}""",
    ),
    (
        # User moves between shards (emond.cluster.move): one row per move in progress or
        # done, its step recorded so that a move cut short resumes where it stopped.
        """CREATE TABLE user_moves (
            userid INT NOT NULL PRIMARY KEY,
            source VARCHAR(32) NOT NULL,
            target VARCHAR(32) NOT NULL,
            step VARCHAR(16) NOT NULL,
            marks TEXT NOT NULL,
            started BIGINT NOT NULL,
            updated BIGINT NOT NULL
        ){engine}""",
    ),
    (
        # An account an operator disabled (emond-admin user disable): its API keys and its
        # password are refused until it is enabled again; its data stays.
        "ALTER TABLE users ADD COLUMN disabled INT NOT NULL DEFAULT 0",
    ),
)


def _version(txn: Transaction) -> int:
    txn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL)")
    rows = txn.query("SELECT version FROM schema_version")
    if not rows:
        txn.execute("INSERT INTO schema_version (version) VALUES (0)")
        return 0
    return int(rows[0][0])


def _apply(txn: Transaction, dialect: str) -> int:
    current = _version(txn)
    for number, statements in enumerate(MIGRATIONS, start=1):
        if number <= current:
            continue
        for step in statements:
            if callable(step):
                step(txn)
            else:
                txn.execute(step.format(**_TYPES[dialect]))
        txn.execute("UPDATE schema_version SET version = ?", number)
        log.info("database schema migrated to version {version}", version=number)
    return len(MIGRATIONS)


def under_migration_lock(txn: Transaction, dialect: str, work: Callable[[Transaction], T]) -> T:
    """``work(txn)`` while this connection holds the database's migration lock: on MariaDB,
    processes starting together take turns (SQLite serves one node). What ``work`` did is
    committed before the lock is released, so the next holder reads it."""
    if dialect != "mysql":
        return work(txn)
    # The lock belongs to this connection, so it is held however long ``work`` takes.
    got = txn.query("SELECT GET_LOCK(CONCAT('emond_migrate_', DATABASE()), 60)")
    if not got or got[0][0] != 1:
        raise RuntimeError("could not take the schema migration lock")
    try:
        result = work(txn)
        # Released before its commit, the next holder could read around what this one wrote.
        txn.execute("COMMIT")
        return result
    finally:
        txn.query("SELECT RELEASE_LOCK(CONCAT('emond_migrate_', DATABASE()))")


async def migrate(db: Database) -> int:
    """Bring the schema up to date; fires with its version. Safe with several nodes."""
    return await db.transaction(lambda txn: under_migration_lock(txn, db.dialect, lambda t: _apply(t, db.dialect)))
