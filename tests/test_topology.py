"""The topology (shards and their storage servers) checked against the central database at
start (architecture §7), and schema migration 5 that brought ``users.shard``: a real SQLite
file or a private MariaDB, and a real ``twistd emond`` that refuses to start."""

from __future__ import annotations

import os
import signal

from twisted.internet import defer
from twisted.trial import unittest

from emond.cluster.topology import TopologyMismatch, check_topology
from emond.config import NodeConfig, load_node_config
from emond.meta import schema
from emond.meta.db import Database
from emond.meta.schema import migrate
from tests.support import mariadb_server, redis_server
from tests.support.daemon import start_daemon

HINT = "(emond-admin shards shows the recorded topology)"
USER_COLUMNS = "username, password, apikey_write, apikey_read, apikey_write_hash, apikey_read_hash, uuid, created"


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


def add_user(db: Database, name: str, shard: str | None = None) -> defer.Deferred[int]:
    """A user row as registration writes it (the columns without defaults), on ``shard``
    or, without one, on the column's default."""
    columns, values = USER_COLUMNS, [name, "x", f"w{name}", f"r{name}", f"wh{name}", f"rh{name}", "u", 0]
    if shard is not None:
        columns, values = columns + ", shard", values + [shard]
    marks = ", ".join("?" * len(values))
    return db.insert(f"INSERT INTO users ({columns}) VALUES ({marks})", *values)


class TopologyMixin:
    database = "sqlite"

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        if self.database == "mysql":
            server = mariadb_server()
            self.db_url = f"mysql://root@127.0.0.1:{server.port}/{server.create_database()}"
        else:
            self.db_url = f"sqlite:///{self.dir}/emond.db"
        self.configs = 0

    def config(self, text: str) -> NodeConfig:
        """A node config of ``text`` (sections after [node]) on this test's database."""
        self.configs += 1
        path = os.path.join(self.dir, f"emond{self.configs}.toml")
        with open(path, "w") as f:
            f.write(f'{text}\n[database]\nurl = "{self.db_url}"\n')
        return load_node_config(path)

    def open_db(self) -> Database:
        db = Database.connect(self.db_url)
        self.addCleanup(db.close)
        return db

    @defer.inlineCallbacks
    def migrated_to_4_with_users(self, names: list[str]):
        """A database from before shards (schema version 4) holding ``names``."""
        db = Database.connect(self.db_url)
        patched = self.patch(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
        version = yield wait(migrate(db))
        self.assertEqual(version, 4)
        for name in names:
            yield add_user(db, name)
        patched.restore()
        yield db.close()

    # -- schema migration 5 ------------------------------------------------------

    @defer.inlineCallbacks
    def test_migration_puts_existing_users_on_the_default_shard(self):
        yield self.migrated_to_4_with_users(["alice", "bob"])
        db = self.open_db()
        version = yield wait(migrate(db))
        self.assertEqual(version, len(schema.MIGRATIONS))  # 5 and those after it
        rows = yield db.query("SELECT username, shard FROM users ORDER BY id")
        self.assertEqual([tuple(r) for r in rows], [("alice", "default"), ("bob", "default")])
        self.assertEqual(list((yield db.query("SELECT name, storage FROM shards"))), [])
        yield add_user(db, "carol")  # a user written without a shard is on the default one too
        row = yield wait(db.one("SELECT shard FROM users WHERE username = 'carol'"))
        self.assertEqual(row[0], "default")

    # -- the single-node default -------------------------------------------------

    @defer.inlineCallbacks
    def test_single_node_records_its_default_shard_and_starts_again(self):
        yield self.migrated_to_4_with_users(["alice"])
        db = self.open_db()
        yield wait(migrate(db))
        config = self.config("[node]\nstorage = [0, 2]\n")  # without [shards]: one default shard
        yield wait(check_topology(db, config))
        self.assertEqual(dict((yield db.query("SELECT name, storage FROM shards"))), {"default": "0,2"})
        yield wait(check_topology(db, config))  # the same again: starts
        self.assertEqual(dict((yield db.query("SELECT name, storage FROM shards"))), {"default": "0,2"})

    @defer.inlineCallbacks
    def test_without_shards_the_default_shard_gathers_every_processes_servers(self):
        """Processes without [shards] (one shard) host different storage servers, a front
        none: all of them are the default shard's, and each starts."""
        db = self.open_db()
        yield wait(migrate(db))
        for storage, recorded in (("[0]", "0"), ("[]", "0"), ("[0, 2]", "0,2"), ("[5]", "0,2,5")):
            server = storage.strip("[]").split(",")[0] or "0"
            yield wait(check_topology(db, self.config(f"[node]\nstorage = {storage}\n[feeds]\ndefault_server = {server}\n")))
            self.assertEqual(dict((yield db.query("SELECT name, storage FROM shards"))), {"default": recorded}, storage)

    @defer.inlineCallbacks
    def test_a_default_shard_section_with_other_servers_is_refused(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.config("[node]\nstorage = [0, 2]\n")))
        explicit = "[node]\nstorage = [0]\n[shards.default]\nredis = 'redis://127.0.0.1:6379/0'\nstorage = [0]\n"
        error = yield self.refused(db, self.config(explicit))
        self.assertEqual(
            str(error),
            f"topology mismatch: shard default has storage servers 0,2 in the database; this config gives it 0 {HINT}",
        )
        # the same servers as recorded: it starts
        yield wait(check_topology(db, self.config(explicit.replace("[0]", "[0, 2]"))))

    @defer.inlineCallbacks
    def refused(self, db: Database, config: NodeConfig):
        try:
            yield wait(check_topology(db, config))
        except TopologyMismatch as e:
            return e
        self.fail("the topology was accepted")


class TopologySQLiteTests(TopologyMixin, unittest.TestCase):
    database = "sqlite"


class TopologyMariaDBTests(TopologyMixin, unittest.TestCase):
    database = "mysql"

    SHARDS = {
        "a": "[shards.a]\nredis = 'redis://127.0.0.1:6379/0'\nstorage = [{a}]\n",
        "b": "[shards.b]\nredis = 'redis://127.0.0.1:6379/1'\nstorage = [{b}]\n",
        "c": "[shards.c]\nredis = 'redis://127.0.0.1:6379/2'\nstorage = [{c}]\n",
    }

    def shards(self, a: str = "1, 2", b: str = "3", c: str | None = None) -> NodeConfig:
        """A node config with shards a and b (and c), holding these storage servers."""
        servers = ", ".join(s for s in (a, b, c) if s)
        text = f"[node]\nstorage = [{servers}]\nshard = 'a'\n[feeds]\ndefault_server = 1\n"
        text += self.SHARDS["a"].format(a=a) + self.SHARDS["b"].format(b=b)
        if c is not None:
            text += self.SHARDS["c"].format(c=c)
        return self.config(text)

    @defer.inlineCallbacks
    def test_first_start_records_and_the_same_topology_starts(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards()))
        rows = yield db.query("SELECT name, storage FROM shards ORDER BY name")
        self.assertEqual([tuple(r) for r in rows], [("a", "1,2"), ("b", "3")])
        # the same shards (servers listed in another order) start, and change nothing
        yield wait(check_topology(db, self.shards(a="2, 1")))
        rows = yield db.query("SELECT name, storage FROM shards ORDER BY name")
        self.assertEqual([tuple(r) for r in rows], [("a", "1,2"), ("b", "3")])

    @defer.inlineCallbacks
    def test_a_shard_less_is_refused(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards(c="4")))
        error = yield self.refused(db, self.shards())
        self.assertEqual(str(error), f"topology mismatch: the database records shards a, b, c; this config has a, b {HINT}")

    @defer.inlineCallbacks
    def test_a_shard_more_is_refused(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards()))
        error = yield self.refused(db, self.shards(c="4"))
        self.assertEqual(str(error), f"topology mismatch: the database records shards a, b; this config has a, b, c {HINT}")

    @defer.inlineCallbacks
    def test_a_storage_server_moved_to_another_shard_is_refused(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards()))
        error = yield self.refused(db, self.shards(a="1", b="2, 3"))
        self.assertEqual(
            str(error),
            "topology mismatch: shard a has storage servers 1,2 in the database; this config gives it 1; "
            f"shard b has storage servers 3 in the database; this config gives it 2,3 {HINT}",
        )

    @defer.inlineCallbacks
    def test_users_on_a_shard_the_config_lacks_are_refused_and_nothing_is_recorded(self):
        """A single node's database (every user on the default shard) under a config whose
        shards are a and b: those users would be nobody's."""
        yield self.migrated_to_4_with_users(["alice"])
        db = self.open_db()
        yield wait(migrate(db))
        yield add_user(db, "bob", "b")
        error = yield self.refused(db, self.shards())
        self.assertEqual(str(error), f"topology mismatch: users are on shard default, which this config lacks {HINT}")
        self.assertEqual(list((yield db.query("SELECT name FROM shards"))), [])
        yield add_user(db, "carol", "z")
        error = yield self.refused(db, self.shards())
        self.assertEqual(str(error), f"topology mismatch: users are on shards default, z, which this config lacks {HINT}")

    @defer.inlineCallbacks
    def test_users_on_a_recorded_shard_missing_from_the_config(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards(c="4")))
        yield add_user(db, "alice", "c")
        error = yield self.refused(db, self.shards())
        self.assertEqual(
            str(error),
            "topology mismatch: the database records shards a, b, c; this config has a, b; "
            f"users are on shard c, which this config lacks {HINT}",
        )

    @defer.inlineCallbacks
    def test_a_node_with_another_topology_does_not_start(self):
        """``twistd emond`` with a config whose shards differ from those recorded: the
        reason in its log, and a failure status."""
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards(a="1", b="2", c="3")))
        redis = redis_server()
        redis.flushall()
        shards = "".join(
            f"[shards.{name}]\nredis = '{redis.url[:-1]}{n}'\nstorage = [{n + 1}]\n" for n, name in enumerate("ab")
        )
        path = os.path.join(self.dir, "node.toml")
        with open(path, "w") as f:
            f.write(
                '[node]\nhttp = "tcp:0:interface=127.0.0.1"\ndatadir = "var"\nstorage = [1, 2]\nshard = "a"\n'
                f'[feeds]\ndefault_server = 1\n[redis]\nurl = "{redis.url}"\n[database]\nurl = "{self.db_url}"\n{shards}'
            )
        daemon = start_daemon("emond", path, self.dir)
        self.addCleanup(daemon.signal, signal.SIGKILL)
        status = yield daemon.ended
        self.assertEqual(status, 1)
        self.assertIn(
            f"refusing to start: topology mismatch: the database records shards a, b, c; this config has a, b {HINT}".encode(),
            daemon.output,
        )
        self.assertNotIn(b"node API ready", daemon.output)
        self.assertIn(b"Server Shut Down.", daemon.output)  # stopped in order, not killed

    @defer.inlineCallbacks
    def test_a_config_without_shards_is_refused_by_a_sharded_database(self):
        db = self.open_db()
        yield wait(migrate(db))
        yield wait(check_topology(db, self.shards()))
        error = yield self.refused(db, self.config("[node]\nstorage = [1, 2, 3]\n[feeds]\ndefault_server = 1\n"))
        self.assertEqual(str(error), f"topology mismatch: the database records shards a, b; this config has default {HINT}")

    @defer.inlineCallbacks
    def test_processes_starting_together_record_once(self):
        """Several processes start at once on a database that records no topology yet, each on
        its own connections: the topology is recorded once and every one of them starts.
        (Several rounds on fresh databases: a race is not lost every time.)"""
        for _ in range(4):
            self.db_url = f"mysql://root@127.0.0.1:{mariadb_server().port}/{mariadb_server().create_database()}"
            config = self.shards()
            dbs = [self.open_db() for _ in range(8)]
            yield wait(migrate(dbs[0]))
            yield defer.gatherResults([db.query("SELECT 1") for db in dbs])  # each connected: they start together
            yield defer.gatherResults([wait(check_topology(db, config)) for db in dbs], consumeErrors=True)
            rows = yield dbs[0].query("SELECT name, storage FROM shards ORDER BY name")
            self.assertEqual([tuple(r) for r in rows], [("a", "1,2"), ("b", "3")])
