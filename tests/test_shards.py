"""Shards (architecture §7, issue 12): the user -> shard map, placement of new users, and a
real cluster in this reactor (a shared MariaDB, one redis-server per shard, two storage
servers over mutual TLS, one shard process per shard and two fronts) routing posts and
reads to each user's shard."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import time
from types import MappingProxyType

import numpy as np

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond import keys
from emond.cluster.placement import choose_shard, place_new_user
from emond.cluster.shardmap import ShardMap, announce_moved
from emond.config import NodeConfig, ShardSection, load_node_config
from emond.errors import NotFound
from emond.meta.db import Database
from emond.meta.schema import migrate
from emond.keys import input_stream
from emond.redis import Redis
from tests.support.daemon import ROOT
from tests.support.node import NodeHarness, drain, drain_shard
from tests.support.servers import mariadb_server, private_redis, private_sentinel, redis_server
from tests.support.streamclient import StorageServerHarness


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


T0 = 1_700_000_000
SHARDS = ("a", "b")
SHARD_TIMEOUT = 1.0  # seconds a shard's Redis has to answer (then 503 for its users)
NODES = ("front1", "front2", "sharda", "shardb")  # node names: certificates and hellos


def stream_entries_added(replies: list) -> int:
    """The ``entries-added`` of an ``XINFO STREAM`` reply (a flat list of fields)."""
    fields = dict(zip(replies[::2], replies[1::2]))
    return int(fields[b"entries-added"])


class Cluster:
    """A local cluster in this reactor, over real sockets: the run's MariaDB (a fresh
    database) and Redis (the central one), one private redis-server per shard, two storage
    servers (1 for shard a, 2 for shard b) over mutual TLS, one shard process per shard
    (front = false) and two fronts (shard = "")."""

    QUEUES = 2

    @classmethod
    @defer.inlineCallbacks
    def start(cls, test: unittest.TestCase):
        self = cls()
        self.test = test
        base = os.path.abspath(test.mktemp())
        os.makedirs(base)
        tls = os.path.join(base, "tls")
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), tls, *NODES], check=True, capture_output=True)
        self.storage = {}
        for sid in (1, 2):
            self.storage[sid] = yield StorageServerHarness.start(test, (f"storage{sid}",), server_id=sid, tls=tls, allow=NODES)
        self.redis = {}
        for name in SHARDS:
            self.redis[name] = private_redis()
            test.addCleanup(self.redis[name].stop)
            test.addCleanup(self.redis[name].thaw)  # a frozen server would not stop
        self.clients = {name: Redis.connect(self.redis[name].server.url, 5.0, reactor) for name in SHARDS}
        for client in self.clients.values():
            test.addCleanup(client.disconnect)
        mariadb = mariadb_server()
        database_url = f"mysql://root@127.0.0.1:{mariadb.port}/{mariadb.create_database()}"
        redis_server().flushall()
        common = (
            f"[input]\nqueues = {self.QUEUES}\nrate_limit = 0.0\nlease_ms = 2000\n[feeds]\ndefault_server = 1\n"
            "[engines]\nwindow_past = 2000000000\n"
            + "".join(
                f'[shards.{name}]\nredis = "{self.redis[name].server.url}"\ntimeout = {SHARD_TIMEOUT}\nstorage = [{sid}]\n'
                for name, sid in zip(SHARDS, (1, 2))
            )
            + "[storage.servers]\n"
            + "".join(f'{sid} = {{ endpoint = "tcp:127.0.0.1:{s.port}", name = "storage{sid}" }}\n' for sid, s in self.storage.items())
            + f'[tls]\nca = "{tls}/ca.pem"\n'
        )
        self.shards, self.fronts = {}, []
        roles = [(f"shard{name}", f'front = false\nshard = "{name}"\n') for name in SHARDS]
        roles += [(name, 'shard = ""\n') for name in ("front1", "front2")]
        for name, role in roles:
            node = yield NodeHarness.start(
                test,
                "mysql",
                extra_config=common + f'cert = "{tls}/{name}.pem"\n',
                database_url=database_url,
                flush_redis=False,
                node_config=f'name = "{name}"\nstorage = []\n{role}',
            )
            if name.startswith("shard"):
                self.shards[name[len("shard"):]] = node
            else:
                self.fronts.append(node)
        return self

    @defer.inlineCallbacks
    def register(self, front: NodeHarness, username: str):
        answer = yield front.post("user/register.json", data={"username": username, "password": "secret1", "email": f"{username}@example.org"})
        self.test.assertEqual(answer.code, 200, answer)
        return answer.json()

    @defer.inlineCallbacks
    def shard_of(self, userid: int):
        row = yield self.fronts[0].ctx.db.one("SELECT shard FROM users WHERE id = ?", userid)
        return row[0]

    @defer.inlineCallbacks
    def entries_added(self, shard: str):
        """Elements ever appended to the shard's input queues (consumed ones included)."""
        total = 0
        for q in range(self.QUEUES):
            exists = yield wait(self.clients[shard].call("EXISTS", input_stream(q)))
            if int(exists):
                total += stream_entries_added((yield wait(self.clients[shard].call("XINFO", "STREAM", input_stream(q)))))
        return total

    @defer.inlineCallbacks
    def all_entries_added(self):
        counts = {}
        for shard in SHARDS:
            counts[shard] = yield self.entries_added(shard)
        return counts

    def drain(self, shard: str):
        return drain_shard(self.shards[shard])


class ClusterTests(unittest.TestCase):
    """Posts and reads through either front for users of both shards."""

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = yield Cluster.start(self)

    @defer.inlineCallbacks
    def call(self, front: NodeHarness, path: str, **params):
        answer = yield front.post(path, **params)
        self.assertEqual(answer.code, 200, (path, answer))
        return answer.body if answer.body == b"ok" else answer.json()

    @defer.inlineCallbacks
    def test_users_land_on_both_shards_and_any_front_serves_them(self):
        cluster = self.cluster
        front1, front2 = cluster.fronts
        # Placement: an empty cluster fills its shards in turn (fewest users, then name).
        alice = yield cluster.register(front1, "alice")
        bob = yield cluster.register(front2, "bob")
        self.assertEqual((yield cluster.shard_of(alice["userid"])), "a")
        self.assertEqual((yield cluster.shard_of(bob["userid"])), "b")
        users = {"a": alice, "b": bob}
        # A new feed goes to a storage server of its owner's shard.
        feeds = {}
        for shard, front in (("a", front2), ("b", front1)):
            created = yield self.call(front, "feed/create.json", apikey=users[shard]["apikey_write"], name="power", engine="5", options='{"interval":10}')
            feeds[shard] = created["feedid"]
        listed = yield self.call(front1, "feed/list.json", apikey=bob["apikey_read"])
        self.assertEqual([f["server"] for f in listed], ["2"])
        refused = yield front1.post("feed/create.json", apikey=bob["apikey_write"], name="other", engine="5", options='{"interval":10}', server="1")
        self.assertEqual((refused.code, refused.json()["message"]), (400, "server must be 2"))
        # A post through either front lands in its owner's shard's Redis only.
        for shard, front in (("a", front2), ("b", front1)):
            before = yield cluster.all_entries_added()
            answer = yield self.call(front, "input/post.json", apikey=users[shard]["apikey_write"], node="n", fulljson='{"p":1}', time=str(T0))
            self.assertEqual(answer, {"success": True})
            after = yield cluster.all_entries_added()
            self.assertEqual({name: after[name] - before[name] for name in SHARDS}, {name: int(name == shard) for name in SHARDS})
            yield cluster.drain(shard)
        # ... is processed by that shard's process: log the input to the feed, and post more.
        for shard in SHARDS:
            key = users[shard]["apikey_write"]
            inputs = yield self.call(front1, "input/list.json", apikey=key)
            self.assertEqual([(i["nodeid"], i["name"]) for i in inputs], [("n", "p")])
            yield self.call(front2, f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=f"1:{feeds[shard]}")
        # Not float32 numbers: a last value (Redis, as accepted) differs from the point on disk.
        values = {"a": [10.1, 11.1, 12.1], "b": [20.1, 21.1, 22.1]}
        for i in range(3):
            for shard in SHARDS:
                front = cluster.fronts[i % 2]
                yield self.call(front, "input/post.json", apikey=users[shard]["apikey_write"], node="n", fulljson=f'{{"p":{values[shard][i]}}}', time=str(T0 + 10 * (i + 1)))
        for shard in SHARDS:
            yield cluster.drain(shard)
        # Read back through either front: feed data (from the feed's storage server), last values.
        for front in cluster.fronts:
            for shard in SHARDS:
                key = users[shard]["apikey_read"]
                data = yield self.call(front, "feed/data.json", apikey=key, id=str(feeds[shard]), start=str(T0 + 10), end=str(T0 + 30), interval="10")
                self.assertEqual(data, [[(T0 + 10 * (i + 1)) * 1000, float(np.float32(values[shard][i]))] for i in range(3)])
                listed = yield self.call(front, "feed/list.json", apikey=key)
                self.assertEqual([(f["id"], f["time"], f["value"]) for f in listed], [(str(feeds[shard]), T0 + 30, values[shard][2])])
                inputs = yield self.call(front, "input/list.json", apikey=key)
                self.assertEqual([(i["time"], i["value"]) for i in inputs], [(T0 + 30, values[shard][2])])
        # Anyone reads a public feed: its last value comes from its owner's shard, whichever
        # shard the caller is on (a front's calls without a user are served on shard a).
        yield self.call(front1, "feed/set.json", apikey=bob["apikey_write"], id=str(feeds["b"]), fields='{"public":1}')
        for front in cluster.fronts:
            value = yield self.call(front, "feed/value.json", apikey=alice["apikey_read"], id=str(feeds["b"]))
            self.assertEqual(value, values["b"][2])
            public = yield front.get("feed/list.json", userid=str(bob["userid"]))
            self.assertEqual([(f["id"], f["value"], f["disk_value"]) for f in public.json()], [(str(feeds["b"]), values["b"][2], float(np.float32(values["b"][2])))])
            fetched = yield front.get("feed/fetch.json", ids=str(feeds["b"]))
            self.assertEqual(fetched.json(), [values["b"][2]])
        # A shard process (front = false) answers /health and /metrics, and nothing else.
        for shard, node in cluster.shards.items():
            health = yield node.get("health")
            self.assertEqual((health.code, health.json()["shard_redis"]), (200, {"ok": True, "shards": {shard: {"ok": True}}}), health)
            self.assertEqual((yield node.get("metrics")).code, 200)
            for path in ("feed/list.json", "input/post.json"):
                self.assertEqual((yield node.get(path, apikey=users[shard]["apikey_read"])).code, 404)
        health = yield front1.get("health")
        self.assertEqual(health.json()["shard_redis"], {"ok": True, "shards": {"a": {"ok": True}, "b": {"ok": True}}})
        # Nothing of a user's is in the other shard's Redis.
        for shard, other in (("a", "b"), ("b", "a")):
            found = yield wait(cluster.clients[other].call("EXISTS", keys.feed_lastvalue(feeds[shard])))
            self.assertEqual(int(found), 0)

    @defer.inlineCallbacks
    def logging_user(self, front: NodeHarness, username: str):
        """A user whose input ``n:p`` logs to a feed ``power`` (interval 10): (keys, feed id)."""
        user = yield self.cluster.register(front, username)
        key = user["apikey_write"]
        feedid = (yield self.call(front, "feed/create.json", apikey=key, name="power", engine="5", options='{"interval":10}'))["feedid"]
        yield self.call(front, "input/post.json", apikey=key, node="n", csv="0", time=str(T0))
        yield self.cluster.drain((yield self.cluster.shard_of(user["userid"])))
        inputs = yield self.call(front, "input/list.json", apikey=key)
        yield self.call(front, f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=f"1:{feedid}")
        return user, feedid

    @defer.inlineCallbacks
    def timed_post(self, front: NodeHarness, user: dict, when: int, value: float):
        """(answer, seconds it took)."""
        began = time.monotonic()
        answer = yield front.post("input/post.json", apikey=user["apikey_write"], node="n", csv=str(value), time=str(when))
        return answer, time.monotonic() - began

    @defer.inlineCallbacks
    def on_disk(self, front: NodeHarness, user: dict, feedid: int, start: int, end: int):
        """time -> value of the feed's points between start and end (nulls left out)."""
        data = yield self.call(front, "feed/data.json", apikey=user["apikey_read"], id=str(feedid), start=str(start), end=str(end), interval="10")
        return {t // 1000: v for t, v in data if v is not None}

    @defer.inlineCallbacks
    def test_a_frozen_shard_redis_holds_up_only_its_users(self):
        cluster = self.cluster
        front1, front2 = cluster.fronts
        alice, alice_feed = yield self.logging_user(front1, "alice")  # shard a
        bob, bob_feed = yield self.logging_user(front2, "bob")  # shard b
        self.assertEqual((yield cluster.shard_of(alice["userid"])), "a")
        self.assertEqual((yield cluster.shard_of(bob["userid"])), "b")
        acked: dict[str, dict[int, float]] = {"alice": {}, "bob": {}}
        clock = iter(range(T0 + 10, T0 + 100_000, 10))

        @defer.inlineCallbacks
        def bob_posts(n=None, until=None):
            took = []
            while (n is not None and len(took) < n) or (until is not None and not until.called):
                when = next(clock)
                answer, seconds = yield self.timed_post(front1, bob, when, when % 1000)
                self.assertEqual(answer.body, b"ok", answer)
                acked["bob"][when] = when % 1000
                took.append(seconds)
            return took

        before = yield bob_posts(n=20)
        cluster.redis["a"].freeze()
        frozen_at = next(clock)
        alice_post = self.timed_post(front2, alice, frozen_at, 1.0)
        during = yield bob_posts(until=alice_post)
        answer, took = yield alice_post
        # Alice's shard does not answer: 503 within its timeout, and she sends again later.
        self.assertEqual((answer.code, answer.json()), (503, {"success": False, "message": "Service temporarily unavailable"}))
        self.assertLess(took, SHARD_TIMEOUT + 0.5)
        # Bob's shard answers as before, as fast as before, all the while.
        self.assertGreaterEqual(len(during), 5)
        self.assertLess(statistics.median(during), 2 * statistics.median(before) + 0.01, (before, during))
        # The fronts stay in their load balancer: /health is ok, naming the shard that is not.
        health = yield front1.get("health")
        self.assertEqual((health.code, health.json()["shard_redis"]), (200, {"ok": True, "shards": {"a": {"ok": False}, "b": {"ok": True}}}))
        cluster.redis["a"].thaw()
        for front in cluster.fronts:
            when = next(clock)
            answer, _ = yield self.timed_post(front, alice, when, 2.0)
            self.assertEqual(answer.body, b"ok", answer)
            acked["alice"][when] = 2.0
        yield cluster.drain("a")
        yield cluster.drain("b")
        # Nothing acknowledged is lost.
        end = next(clock)
        for name, user, feedid in (("alice", alice, alice_feed), ("bob", bob, bob_feed)):
            stored = yield self.on_disk(front1, user, feedid, T0 + 10, end)
            self.assertEqual({t: stored.get(t) for t in acked[name]}, acked[name], name)


class ReplicaWaitTests(unittest.TestCase):
    """``wait_replicas``: a post is ``ok`` only once that many replicas of its shard's Redis
    hold it (Redis WAIT); otherwise 503 after ``wait_timeout``, and the device sends again."""

    timeout = 60
    WAIT_TIMEOUT = 2.0  # a replica under a loaded test machine has taken more than 0.5 s to acknowledge

    @defer.inlineCallbacks
    def test_ok_only_once_a_replica_holds_the_post(self):
        master = private_redis()
        self.addCleanup(master.stop)
        shard = f'[shards.main]\nredis = "{master.server.url}"\nwait_replicas = 1\nwait_timeout = {self.WAIT_TIMEOUT}\nstorage = [0]\n'
        node = yield NodeHarness.start(self, extra_config=shard, node_config='shard = "main"\n')
        user = (yield node.post("user/register.json", data={"username": "waits", "password": "secret1", "email": "w@example.org"})).json()
        began = time.monotonic()
        answer = yield node.post("input/post.json", apikey=user["apikey_write"], node="n", csv="1", time=str(T0))
        took = time.monotonic() - began
        # No replica: Redis has the post, but no replica confirmed it; never a false ok.
        self.assertEqual((answer.code, answer.json()["message"]), (503, "Not stored on enough replicas in time, send again"))
        self.assertGreaterEqual(took, self.WAIT_TIMEOUT)
        self.assertLess(took, self.WAIT_TIMEOUT + SHARD_TIMEOUT)
        replica = private_redis("--replicaof", "127.0.0.1", str(master.server.port))
        self.addCleanup(replica.stop)
        primary = Redis.connect(master.server.url, 30.0, reactor)
        self.addCleanup(primary.disconnect)
        self.assertEqual((yield wait(primary.call("WAIT", 1, 20_000))), 1)  # the replica is in sync
        answer = yield node.post("input/post.json", apikey=user["apikey_write"], node="n", csv="2", time=str(T0 + 10))
        self.assertEqual(answer.body, b"ok", answer)
        # What the device was told is stored is on the replica.
        copy = Redis.connect(replica.server.url, 5.0, reactor)
        self.addCleanup(copy.disconnect)
        queue = input_stream(node.app.layout.queue_for(user["userid"]))
        counts = []
        for client in (primary, copy):
            counts.append(stream_entries_added((yield wait(client.call("XINFO", "STREAM", queue)))))
        self.assertEqual(counts, [2, 2])


class SentinelFailoverTests(unittest.TestCase):
    """A shard's Redis found through Redis Sentinel, with ``wait_replicas = 1``: its master
    killed, the sentinel promotes a replica, the node follows it, and every post that was
    answered ``ok`` (before, during and after) is processed and on disk."""

    timeout = 120
    SERVICE = "shard-s"

    @defer.inlineCallbacks
    def test_no_acked_point_is_lost_in_a_failover(self):
        master = private_redis()
        self.addCleanup(master.stop)
        port = str(master.server.port)
        replicas = [private_redis("--replicaof", "127.0.0.1", port) for _ in range(2)]
        for replica in replicas:
            self.addCleanup(replica.stop)
        primary = Redis.connect(master.server.url, 30.0, reactor)
        self.addCleanup(primary.disconnect)
        self.assertEqual((yield wait(primary.call("WAIT", 2, 20_000))), 2)  # both replicas in sync
        sentinel = private_sentinel(master.server.port, self.SERVICE)
        self.addCleanup(sentinel.stop)
        shard = (
            f'[shards.s]\nsentinels = ["127.0.0.1:{sentinel.server.port}"]\nservice = "{self.SERVICE}"\n'
            f"timeout = {SHARD_TIMEOUT}\nwait_replicas = 1\nwait_timeout = 1.0\nstorage = [0]\n"
        )
        node = yield NodeHarness.start(self, extra_config=shard + "[input]\nrate_limit = 0.0\n", node_config='shard = "s"\n')
        shard_redis = node.ctx.redis
        self.assertEqual(shard_redis.master, ("127.0.0.1", master.server.port))  # asked of the sentinel
        user = (yield node.post("user/register.json", data={"username": "failover", "password": "secret1", "email": "f@example.org"})).json()
        key = user["apikey_write"]
        feedid = (yield node.post("feed/create.json", apikey=key, name="power", engine="5", options='{"interval":10}')).json()["feedid"]
        self.assertEqual((yield node.post("input/post.json", apikey=key, node="n", csv="0", time=str(T0))).body, b"ok")
        yield drain(node)
        inputs = (yield node.post("input/list.json", apikey=key)).json()
        yield node.post(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=key, processlist=f"1:{feedid}")
        acked: dict[int, float] = {}
        refused = 0
        clock = iter(range(T0 + 10, T0 + 100_000, 10))

        @defer.inlineCallbacks
        def post():
            when = next(clock)
            answer = yield node.post("input/post.json", apikey=key, node="n", csv=str(when % 1000), time=str(when))
            if answer.code == 200:
                self.assertEqual(answer.body, b"ok")
                acked[when] = float(when % 1000)
            else:  # the device sends again later (a new point here)
                self.assertEqual(answer.code, 503, answer)
            return answer.code == 200

        for _ in range(10):
            self.assertTrue((yield post()))
        master.stop()
        # The device keeps posting; the node follows the sentinel to the promoted replica.
        after = 0
        for _ in range(200):
            ok = yield post()
            refused += not ok
            moved = shard_redis.master not in (None, ("127.0.0.1", master.server.port))
            after += ok and moved
            if after >= 10:
                break
        self.assertEqual(after, 10, (refused, shard_redis.master))
        self.assertIn(shard_redis.master, [("127.0.0.1", r.server.port) for r in replicas])
        yield drain(node)
        data = (yield node.post("feed/data.json", apikey=user["apikey_read"], id=str(feedid), start=str(T0 + 10), end=str(next(clock)), interval="10")).json()
        stored = {t // 1000: v for t, v in data if v is not None}
        self.assertEqual({t: stored.get(t) for t in acked}, acked)
