"""``emond-admin`` run as the operator runs it (its console script, a subprocess) against a real
database and real Redis servers, with a node config in a temp dir; its answers are checked
against what each test put there (users registered, feeds created, inputs posted)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.app.redisproc import EmbeddedRedis, embedded_redis_dir
from emond.cluster.topology import check_topology
from emond.config import load_node_config
from emond.keys import input_stream, storage_stream
from emond.meta.db import Database
from emond.meta.schema import migrate
from emond.redis import Redis
from tests.support import free_port, mariadb_server, redis_server, require_program
from tests.support.admin import run_admin
from tests.support.node import NodeHarness, drain
from tests.support.servers import private_redis

STILL = "[input]\nconsume = false\n"  # a front only: what is posted stays queued
OLD = 90.0  # seconds: the age given to the oldest element of a queue


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


def admin(config_path: str, *args: str, stdin: str | None = None):
    """Run ``emond-admin --config config_path args``: (exit status, stdout JSON, stderr JSON)."""
    return run_admin("--config", config_path, *args, stdin=stdin)


def old_id(seconds: float) -> str:
    """A stream id (ms time-seq) from ``seconds`` before now."""
    return f"{int((time.time() - seconds) * 1000)}-1"


class NodeTests(unittest.TestCase):
    """A single node (SQLite, the default shard on its [redis]) whose users came through its API."""

    @defer.inlineCallbacks
    def user(self, node: NodeHarness, name: str, feeds: int, posts: list[dict[str, float]]):
        """Register ``name``, create ``feeds`` feeds and post each of ``posts`` (one request each)."""
        answer = yield node.post("user/register.json", data={"username": name, "password": "secret1", "email": f"{name}@example.org"})
        keys = answer.json()
        for n in range(feeds):
            created = yield node.post("feed/create.json", apikey=keys["apikey_write"], name=f"f{n}", tag="t", engine="5",
                                      datatype="1", options=json.dumps({"interval": 10}))
            self.assertEqual(created.code, 200, created)
        for values in posts:
            posted = yield node.post("input/post", apikey=keys["apikey_write"], node="tx", fulljson=json.dumps(values))
            self.assertEqual((posted.code, posted.body), (200, b'{"success": true}'))  # fulljson's answer
        return keys["userid"]

    @defer.inlineCallbacks
    def test_user_show(self):
        node = yield NodeHarness.start(self, "sqlite")
        began = int(time.time())
        userid = yield self.user(node, "alice", 2, [{"power1": 1, "power2": 2}, {"power1": 3, "temp": 20}])
        yield self.user(node, "bob", 1, [{"power1": 1}])
        registered = int(time.time())
        yield drain(node)  # the consumer created alice's inputs power1, power2 and temp
        status, out, err = yield admin(node.config_path, "user", "show", "alice")
        self.assertEqual((status, err), (0, None))
        created = out.pop("created")
        self.assertTrue(began <= created <= registered, (began, created, registered))
        self.assertEqual(out, {
            "id": userid, "username": "alice", "shard": "default", "feeds": 2, "inputs": 3,
            # what else emond knows of the account: the first user registered is the admin
            "email": "alice@example.org", "disabled": False, "admin": True, "timezone": "UTC", "lastlogin": None,
        })
        login = yield node.post("user/login.json", data={"username": "alice", "password": "secret1"})
        self.assertEqual(login.code, 200, login)
        status, out, _ = yield admin(node.config_path, "user", "show", "alice")
        self.assertTrue(registered <= out["lastlogin"] <= int(time.time()), out)
        # as logging in, the name in any case
        status, out, _ = yield admin(node.config_path, "user", "show", "ALICE")
        self.assertEqual((status, out["id"]), (0, userid))

    @defer.inlineCallbacks
    def test_an_unknown_user_is_an_error(self):
        node = yield NodeHarness.start(self, "sqlite")
        status, out, err = yield admin(node.config_path, "user", "show", "nobody")
        self.assertEqual((status, out, err), (1, None, {"error": "no user named 'nobody'"}))

    @defer.inlineCallbacks
    def test_shards_of_a_single_node(self):
        node = yield NodeHarness.start(self, "sqlite", STILL + "queues = 4\n")
        yield self.user(node, "alice", 2, [{"a": 1}, {"a": 2}, {"a": 3}])
        yield self.user(node, "bob", 1, [{"b": 1}, {"b": 2}])
        yield node.stop()  # nothing drains the queues from here on
        redis = Redis.connect(node.config.redis.url, 5.0, reactor)
        self.addCleanup(redis.disconnect)
        began = time.time()
        for _ in range(2):  # two batches waiting for storage server 0, the oldest OLD seconds old
            yield wait(redis.call("XADD", storage_stream(0), old_id(OLD) if _ == 0 else "*", "b", "x"))
        status, out, err = yield admin(node.config_path, "shards")
        took = time.time() - began
        self.assertEqual((status, err), (0, None))
        lag = out["default"].pop("lag")
        self.assertEqual(out, {"default": {"storage": [0], "users": 2, "feeds": 3, "input_queued": 5, "storage_queued": 2}})
        self.assertTrue(OLD - 0.01 <= lag <= OLD + took + 0.01, lag)

    @defer.inlineCallbacks
    def test_a_redis_that_does_not_answer_is_an_error(self):
        node = yield NodeHarness.start(self, "sqlite")
        yield node.stop()
        path = os.path.join(node.dir, "down.toml")
        with open(node.config_path) as f:
            text = f.read().replace(redis_server().url, f"redis://127.0.0.1:{free_port()}/0")
        with open(path, "w") as f:
            f.write(text)
        status, out, err = yield admin(path, "shards")
        self.assertEqual((status, out), (1, None))
        self.assertTrue(err["error"].startswith("shard default: redis pipeline: "), err)

    @defer.inlineCallbacks
    def test_user_move_needs_every_storage_server_over_the_stream(self):
        node = yield NodeHarness.start(self, "sqlite")  # its storage is hosted in its process
        status, out, err = yield admin(node.config_path, "user", "move", "alice", "default")
        self.assertEqual((status, out), (1, None))
        self.assertEqual(err["error"], "storage servers [0] are not in [storage.servers]: a move reaches every storage server over the stream")


class EmbeddedRedisTests(unittest.TestCase):
    """A node without [redis] url: its shard's queues are in its private redis-server."""

    @defer.inlineCallbacks
    def test_shards_read_the_private_redis(self):
        require_program("redis-server")
        datadir = tempfile.mkdtemp(prefix="emond-")  # short: a Unix socket path must fit
        self.addCleanup(shutil.rmtree, datadir, True)
        path = os.path.join(datadir, "emond.toml")
        with open(path, "w") as f:
            f.write(f'[node]\ndatadir = "{datadir}"\n[database]\nurl = "sqlite:///{datadir}/emond.db"\n[input]\nqueues = 2\n')
        config = load_node_config(path)
        server = EmbeddedRedis(embedded_redis_dir(datadir), reactor)
        server.startService()
        self.addCleanup(server.stopService)
        yield server.ready
        db = Database.connect(config.database.url, config.sqlite_path)
        yield wait(migrate(db))
        yield wait(check_topology(db, config))
        yield db.close()
        redis = Redis.connect(server.url, 5.0, reactor)
        self.addCleanup(redis.disconnect)
        began = time.time()
        yield wait(redis.call("XADD", input_stream(1), old_id(OLD), "p", "x"))
        status, out, err = yield admin(path, "shards")
        took = time.time() - began
        self.assertEqual((status, err), (0, None))
        lag = out["default"].pop("lag")
        self.assertEqual(out, {"default": {"storage": [0], "users": 0, "feeds": 0, "input_queued": 1, "storage_queued": 0}})
        self.assertTrue(OLD - 0.01 <= lag <= OLD + took + 0.01, lag)


class ShardsTests(unittest.TestCase):
    """Two shards on the central MariaDB, each with its own redis-server."""

    @defer.inlineCallbacks
    def test_shards(self):
        server = mariadb_server()
        url = f"mysql://root@127.0.0.1:{server.port}/{server.create_database()}"
        a, b = redis_server(), private_redis()
        self.addCleanup(b.stop)
        a.flushall()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "emond.toml")
        with open(path, "w") as f:
            f.write(
                "[node]\nstorage = [1, 2, 3]\nshard = 'a'\n[feeds]\ndefault_server = 1\n[input]\nqueues = 3\n"
                f"[database]\nurl = '{url}'\n"
                f"[shards.a]\nredis = '{a.url}'\nstorage = [1, 2]\n[shards.b]\nredis = '{b.server.url}'\nstorage = [3]\n"
            )
        db = Database.connect(url)
        self.addCleanup(db.close)
        yield wait(migrate(db))
        yield wait(check_topology(db, load_node_config(path)))
        feeds = {"ann": 3, "amy": 0, "ben": 2}
        for name, shard in (("ann", "a"), ("amy", "a"), ("ben", "b")):
            userid = yield db.insert(
                "INSERT INTO users (username, password, apikey_write, apikey_read, apikey_write_hash, apikey_read_hash,"
                " uuid, created, shard) VALUES (?, 'x', ?, ?, ?, ?, 'u', 0, ?)",
                name, f"w{name}", f"r{name}", f"wh{name}", f"rh{name}", shard,
            )
            for n in range(feeds[name]):
                yield db.insert("INSERT INTO feeds (userid, name, engine, created) VALUES (?, ?, 5, 0)", userid, f"f{n}")
        on_a = Redis.connect(a.url, 5.0, reactor)
        on_b = Redis.connect(b.server.url, 5.0, reactor)
        self.addCleanup(on_a.disconnect)
        self.addCleanup(on_b.disconnect)
        began = time.time()
        # shard a: 2 + 1 input elements over two queues, 1 + 2 storage batches over its two
        # servers; the oldest waits OLD seconds. Shard b: 1 input element, 4 s old, nothing stored.
        for redis, stream, ids in (
            (on_a, input_stream(0), ["*", "*"]),
            (on_a, input_stream(2), ["*"]),
            (on_a, storage_stream(1), ["*"]),
            (on_a, storage_stream(2), [old_id(OLD), "*"]),
            (on_b, input_stream(1), [old_id(4)]),
        ):
            for element_id in ids:
                yield wait(redis.call("XADD", stream, element_id, "p", "x"))
        status, out, err = yield admin(path, "shards")
        took = time.time() - began
        self.assertEqual((status, err), (0, None))
        lags = {name: shard.pop("lag") for name, shard in out.items()}
        self.assertEqual(out, {
            "a": {"storage": [1, 2], "users": 2, "feeds": 3, "input_queued": 3, "storage_queued": 3},
            "b": {"storage": [3], "users": 1, "feeds": 2, "input_queued": 1, "storage_queued": 0},
        })
        self.assertTrue(OLD - 0.01 <= lags["a"] <= OLD + took + 0.01, lags)
        self.assertTrue(4 - 0.01 <= lags["b"] <= 4 + took + 0.01, lags)
        status, out, _ = yield admin(path, "user", "show", "ben")
        self.assertEqual((status, out["shard"], out["feeds"], out["inputs"]), (0, "b", 2, 0))
