"""Shards (architecture §7, issue 12): the user -> shard map, placement of new users, and a
real cluster in this reactor (a shared MariaDB, one redis-server per shard, two storage
servers over mutual TLS, one shard process per shard and two fronts) routing posts and
reads to each user's shard."""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond import keys
from emond.cluster.placement import choose_shard, place_new_user
from emond.cluster.shardmap import ShardMap, announce_moved
from emond.config import NodeConfig, ShardSection, load_node_config
from emond.errors import NotFound
from emond.meta.db import Database
from emond.meta.schema import migrate
from emond.redis import Redis
from tests.support.servers import mariadb_server, private_redis


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


@defer.inlineCallbacks
def shared_database(test: unittest.TestCase):
    """A fresh database on the run's MariaDB, migrated, open for ``test``."""
    server = mariadb_server()
    db = Database.connect(f"mysql://root@127.0.0.1:{server.port}/{server.create_database()}")
    test.addCleanup(db.close)
    yield wait(migrate(db))
    return db


def add_user(db: Database, name: str, shard: str):
    return db.insert(
        "INSERT INTO users (username, username_key, email, password, apikey_write, apikey_read, apikey_write_hash, "
        "apikey_read_hash, uuid, created, shard) VALUES (?, ?, 'x@example.org', 'x', ?, ?, ?, ?, ?, 0, ?)",
        name, name, name.ljust(32, "w"), name.ljust(32, "r"), name.ljust(64, "w"), name.ljust(64, "r"), name, shard,
    )


def add_feeds(db: Database, userid: int, n: int):
    return defer.gatherResults([
        db.insert("INSERT INTO feeds (userid, name, engine, created) VALUES (?, ?, 5, 0)", userid, f"f{i}") for i in range(n)
    ])


class ShardMapTests(unittest.TestCase):
    """The map over the central database, kept current by ``emond:user-moved`` on a real Redis."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.db = yield shared_database(self)
        self.redis_server = private_redis()
        self.addCleanup(self.redis_server.stop)
        self.central = Redis.connect(self.redis_server.server.url, 5.0, reactor)
        self.addCleanup(self.central.disconnect)
        self.map = ShardMap(self.db, ["a", "b"])
        subscription = self.map.listen(self.redis_server.server.url, 5.0, reactor)
        subscribed = self.map.next_change()
        subscription.open()
        self.addCleanup(subscription.disconnect)
        self.assertEqual((yield subscribed), "subscribed")
        self.alice = yield add_user(self.db, "alice", "a")
        self.bob = yield add_user(self.db, "bob", "b")

    @defer.inlineCallbacks
    def test_users_shards_from_the_database_then_the_cache(self):
        self.assertEqual((yield wait(self.map.shard_of(self.alice))), "a")
        self.assertEqual((yield wait(self.map.shard_of(self.bob))), "b")
        self.assertEqual(self.map.cached(self.alice), "a")
        yield self.assertFailure(wait(self.map.shard_of(999_999)), NotFound)

    @defer.inlineCallbacks
    def test_a_move_announced_is_forgotten_by_every_map(self):
        other = ShardMap(self.db, ["a", "b"])
        subscription = other.listen(self.redis_server.server.url, 5.0, reactor)
        subscribed = other.next_change()
        subscription.open()
        self.addCleanup(subscription.disconnect)
        yield subscribed
        for shard_map in (self.map, other):
            self.assertEqual((yield wait(shard_map.shard_of(self.alice))), "a")
        yield self.db.execute("UPDATE users SET shard = 'b' WHERE id = ?", self.alice)
        self.assertEqual((yield wait(self.map.shard_of(self.alice))), "a")  # cached until announced
        changes = [self.map.next_change(), other.next_change()]
        yield wait(announce_moved(self.central, self.alice))
        self.assertEqual((yield defer.gatherResults(changes)), ["moved", "moved"])
        for shard_map in (self.map, other):
            self.assertIsNone(shard_map.cached(self.alice))
            self.assertEqual((yield wait(shard_map.shard_of(self.alice))), "b")
        self.assertEqual(self.map.cached(self.bob), None)  # never asked
        self.assertEqual((yield wait(self.map.shard_of(self.bob))), "b")

    @defer.inlineCallbacks
    def test_a_lost_subscription_drops_and_bypasses_the_cache_until_resubscribed(self):
        """A message published while the subscription is down is never received: the cache
        is dropped when it goes, not used meanwhile, and dropped again when it is back."""
        yield wait(self.map.shard_of(self.alice))
        lost, back = self.map.next_change(), None
        killed = yield wait(self.central.call("CLIENT", "KILL", "TYPE", "pubsub"))
        self.assertEqual(killed, 1)
        self.assertEqual((yield lost), "lost")
        back = self.map.next_change()
        self.assertIsNone(self.map.cached(self.alice))
        yield self.db.execute("UPDATE users SET shard = 'b' WHERE id = ?", self.alice)
        yield wait(announce_moved(self.central, self.alice))  # nobody hears it
        self.assertEqual((yield wait(self.map.shard_of(self.alice))), "b")
        self.assertIsNone(self.map.cached(self.alice))  # not cached while unsubscribed
        self.assertEqual((yield back), "subscribed")
        self.assertEqual((yield wait(self.map.shard_of(self.alice))), "b")
        self.assertEqual(self.map.cached(self.alice), "b")

    @defer.inlineCallbacks
    def test_the_cache_is_bounded(self):
        small = ShardMap(self.db, ["a", "b"], size=1)
        small._live = True  # as if subscribed: this test is about the bound alone
        yield wait(small.shard_of(self.alice))
        yield wait(small.shard_of(self.bob))
        self.assertIsNone(small.cached(self.alice))
        self.assertEqual(small.cached(self.bob), "b")

    @defer.inlineCallbacks
    def test_one_shard_needs_no_lookup(self):
        only = ShardMap(self.db, ["default"])
        self.assertEqual((yield wait(only.shard_of(self.bob))), "default")
        self.assertEqual((yield wait(only.shard_of(424242))), "default")


def config_file(test: unittest.TestCase, text: str) -> NodeConfig:
    path = os.path.join(os.path.abspath(test.mktemp()), "emond.toml")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(text)
    return load_node_config(path)


class PlacementTests(unittest.TestCase):
    """New users go to the shard with the fewest feeds per weight; ties to fewest users, then name."""

    def test_fewest_feeds_per_weight(self):
        self.assertEqual(choose_shard({"a": 1.0, "b": 1.0}, {"a": (1, 10), "b": (5, 9)}), "b")
        # b has twice the hardware: 19 feeds on weight 2 is less than 10 on weight 1
        self.assertEqual(choose_shard({"a": 1.0, "b": 2.0}, {"a": (1, 10), "b": (5, 19)}), "b")
        self.assertEqual(choose_shard({"a": 1.0, "b": 2.0}, {"a": (1, 10), "b": (5, 21)}), "a")

    def test_ties_go_to_fewest_users_then_by_name(self):
        self.assertEqual(choose_shard({"a": 1.0, "b": 1.0}, {}), "a")
        self.assertEqual(choose_shard({"a": 1.0, "b": 1.0}, {"a": (1, 0)}), "b")
        self.assertEqual(choose_shard({"a": 1.0, "b": 1.0}, {"a": (2, 3), "b": (1, 3)}), "b")
        self.assertEqual(choose_shard({"b": 1.0, "a": 1.0}, {"a": (1, 3), "b": (1, 3)}), "a")

    def two_shards(self, b_weight: float = 1.0) -> NodeConfig:
        """A node's config with shards a and b (replaced after loading: placement reads only
        their names and weights, and a real two-shard file needs storage servers and TLS)."""
        config = config_file(self, "[node]\nstorage = [1, 2]\n[feeds]\ndefault_server = 1\n")
        shards = {"a": ShardSection(storage=(1,)), "b": ShardSection(storage=(2,), weight=b_weight)}
        return dataclasses.replace(config, shards=MappingProxyType(shards))

    @defer.inlineCallbacks
    def test_counts_from_the_database(self):
        db = yield shared_database(self)
        config = self.two_shards()
        self.assertEqual((yield wait(place_new_user(db, config))), "a")
        first = yield add_user(db, "first", "a")
        self.assertEqual((yield wait(place_new_user(db, config))), "b")
        second = yield add_user(db, "second", "b")
        yield add_feeds(db, second, 3)
        self.assertEqual((yield wait(place_new_user(db, config))), "a")
        yield add_feeds(db, first, 4)
        self.assertEqual((yield wait(place_new_user(db, config))), "b")
        yield add_user(db, "third", "b")  # a user without feeds adds no load
        self.assertEqual((yield wait(place_new_user(db, config))), "b")
        yield add_user(db, "elsewhere", "gone")  # users of a shard not configured do not count
        self.assertEqual((yield wait(place_new_user(db, self.two_shards(b_weight=0.5)))), "a")
