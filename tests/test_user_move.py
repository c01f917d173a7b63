"""``emond.cluster.move.Mover``: a user's state, parked packets and feed files go from one
shard to another, and a move cut short resumes where it stopped — over a real MariaDB,
real Redis databases (one per shard, and the central one) and real storage engines.

The shards' consumers are not running here: nothing is queued on the source, so the drain
step has nothing to wait for; the target's consumer is tested in tests/test_user_hold.py.
"""

from __future__ import annotations

import os
import struct

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond import keys
from emond.cluster import move as move_module
from emond.cluster.move import MoveParts, Mover
from emond.config import load_node_config
from emond.errors import Invalid
from emond.meta.db import Database
from emond.meta.feeds import Feeds
from emond.meta.inputs import Inputs
from emond.meta.moves import Moves
from emond.meta.schema import migrate
from emond.queue import QueueLayout, decode_groups, encode_groups, read_head
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES
from emond.redis import Redis, RedisUnavailable
from emond.storage.feedstore import FeedStore
from emond.storage.location import StorageLocationService
from tests.support.servers import mariadb_server, redis_server

T0 = 1_700_000_000
DBS = {"a": 8, "b": 9, "central": 10}


class UserMoveTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.patch(move_module, "GRACE_SECONDS", 0.0)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        maria = mariadb_server()
        redis_url = f"redis://127.0.0.1:{redis_server().port}"
        path = os.path.join(base, "node.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\nstorage = [1, 2]\nshard = "a"\ndatadir = "data"\n[redis]\nurl = "{redis_url}/{DBS["central"]}"\n'
                f'[database]\nurl = "{maria.url}{maria.create_database()}"\n[input]\nqueues = 4\n[feeds]\ndefault_server = 1\n'
                f'[shards.a]\nredis = "{redis_url}/{DBS["a"]}"\nstorage = [1]\n'
                f'[shards.b]\nredis = "{redis_url}/{DBS["b"]}"\nstorage = [2]\n'
            )
        self.config = load_node_config(path)
        self.db = Database.connect(self.config.database.url)
        self.addCleanup(self.db.close)
        yield defer.ensureDeferred(migrate(self.db))
        self.redis = {name: Redis.connect(f"{redis_url}/{n}", 5.0, reactor) for name, n in DBS.items()}
        for client in self.redis.values():
            self.addCleanup(client.disconnect)
            yield defer.ensureDeferred(client.call("FLUSHDB"))
        services = {}
        self.engines = {}
        for sid in (1, 2):
            services[sid] = StorageLocationService(sid, os.path.join(base, f"storage{sid}"), self.config.engines, reactor)
            services[sid].startService()
            self.addCleanup(services[sid].stopService)
            self.engines[sid] = yield services[sid].opened
        self.dirs = {sid: os.path.join(base, f"storage{sid}") for sid in (1, 2)}
        self.store = FeedStore(services, reactor)
        self.feeds, self.inputs = Feeds(self.db, self.redis["a"]), Inputs(self.db, self.redis["a"])
        self.parts = MoveParts(self.config, Moves(self.db), self.inputs, self.feeds, self.redis["central"], self.redis.__getitem__, self.store, reactor)
        yield self.make_user()

    @defer.inlineCallbacks
    def make_user(self):
        self.userid = yield self.db.insert(
            "INSERT INTO users (username, username_key, email, password, apikey_write, apikey_read, apikey_write_hash, "
            "apikey_read_hash, uuid, created, shard) VALUES ('Mover', 'mover', '', 'x', 'w', 'r', 'wh', 'rh', 'u', 0, 'a')"
        )
        self.input = yield defer.ensureDeferred(self.inputs.create(self.userid, "tx", "p"))
        self.fina = yield defer.ensureDeferred(self.feeds.create(self.userid, "kwh", "t", 1, ENGINE_PHPFINA, 10, 1))
        self.series = yield defer.ensureDeferred(self.feeds.create(self.userid, "power", "t", 1, ENGINE_PHPTIMESERIES, 0, 1))
        here = self.engines[1]
        here.phpfina.create(self.fina.id, 10)
        here.phpfina.write(self.fina.id, [T0, T0 + 10, T0 + 30], [1.0, 1.5, 2.5])
        here.phptimeseries.create(self.series.id)
        here.phptimeseries.write(self.series.id, [T0 + 1, T0 + 31], [100.0, 200.0])
        a = self.redis["a"]
        yield defer.ensureDeferred(a.pipeline([
            ("HSET", keys.input_lastvalue(self.input.id), "time", T0 + 31, "value", "200"),
            ("HSET", keys.feed_lastvalue(self.fina.id), "time", T0 + 30, "value", "2.5"),
            ("HSET", keys.feed_disk(self.fina.id), "time", T0 + 30, "value", "2.5"),
            ("HSET", keys.process_state("kwhtokwhd", self.fina.id), "time", T0 + 30, "value", "7.25"),
            ("HSET", keys.step_times(self.input.id), "0:4", T0 + 31),
            ("HSET", keys.refused_counts(self.userid), "time_too_old", 3),
        ]))

    def file(self, sid, *parts):
        path = os.path.join(self.dirs[sid], *parts)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def move(self, target="b"):
        return defer.ensureDeferred(Mover(self.parts).move("mover", target))

    @defer.inlineCallbacks
    def parked(self, shard, stream):
        entries = yield defer.ensureDeferred(read_head(self.redis[shard], stream, None, 1000))
        return [g for _id, fields in entries for g in decode_groups(fields[b"p"])]

    @defer.inlineCallbacks
    def test_state_files_and_parked_packets_go_to_the_target(self):
        fina_dat = self.file(1, "phpfina", f"{self.fina.id}.dat")
        self.assertEqual(fina_dat, struct.pack("<4f", 1.0, 1.5, float("nan"), 2.5))
        myd = self.file(1, "phptimeseries", f"feed_{self.series.id}.MYD")
        before = yield defer.ensureDeferred(self.redis["a"].pipeline([("DUMP", k) for k in self.state_keys()]))
        # a packet a front sent to the source before it heard of the move, parked there
        late = [self.userid, T0 + 40.5, T0 + 40, [[0, "tx", {"p": 300.0}]]]
        yield defer.ensureDeferred(self.redis["a"].call("XADD", keys.user_held(self.userid), "*", "p", encode_groups([late])))
        listened = []
        subscription = yield self.subscribe(listened)

        summary = yield self.move()

        self.assertEqual((summary["from"], summary["to"], summary["parked_on_source"]), ("a", "b", 1))
        self.assertEqual(set(summary["steps"]), {"hold", "drain", "state", "files", "transfer", "release", "cleanup"})
        rows = yield self.db.query("SELECT shard FROM users WHERE id = ?", self.userid)
        self.assertEqual(rows[0][0], "b")
        self.assertEqual(listened, [str(self.userid).encode()])  # fronts heard of it
        subscription.transport.loseConnection()
        # state: byte for byte at the target, gone from the source
        after = yield defer.ensureDeferred(self.redis["b"].pipeline([("DUMP", k) for k in self.state_keys()]))
        self.assertEqual(after, before)
        gone = yield defer.ensureDeferred(self.redis["a"].pipeline([("EXISTS", k) for k in self.state_keys()]))
        self.assertEqual(gone, [0] * len(gone))
        # files: on storage server 2, identical; the feeds point there; the source's are deleted
        self.assertEqual(self.file(2, "phpfina", f"{self.fina.id}.dat"), fina_dat)
        self.assertEqual(self.file(2, "phpfina", f"{self.fina.id}.meta"), struct.pack("<IIII", 0, 0, 10, T0))
        self.assertEqual(self.file(2, "phptimeseries", f"feed_{self.series.id}.MYD"), myd)
        self.assertIsNone(self.file(1, "phpfina", f"{self.fina.id}.dat"))
        self.assertIsNone(self.file(1, "phptimeseries", f"feed_{self.series.id}.MYD"))
        servers = yield self.db.query("SELECT server FROM feeds WHERE userid = ? ORDER BY id", self.userid)
        self.assertEqual([r[0] for r in servers], [2, 2])
        # the hold: lifted at the target, whose consumer gets a pass and the parked packet;
        # kept (for a day) at the source
        queue = keys.input_stream(QueueLayout.from_config(self.config.input).queue_for(self.userid))
        b_hold, a_ttl = yield defer.ensureDeferred(defer.gatherResults([
            defer.ensureDeferred(self.redis["b"].call("EXISTS", keys.user_hold(self.userid))),
            defer.ensureDeferred(self.redis["a"].call("TTL", keys.user_hold(self.userid))),
        ]))
        self.assertEqual(b_hold, 0)
        self.assertTrue(0 < a_ttl <= move_module.SOURCE_HOLD_SECONDS)
        self.assertEqual((yield self.parked("b", keys.user_held(self.userid))), [late])
        self.assertEqual((yield self.parked("b", queue)), [[self.userid, 0.0, 0, []]])
        self.assertEqual((yield self.parked("a", keys.user_held(self.userid))), [])

    @defer.inlineCallbacks
    def test_a_move_cut_short_resumes_where_it_stopped(self):
        real_copy = self.store.copy
        calls = []

        async def copy_then_die(feed, target):
            calls.append(feed.id)
            if len(calls) == 2:
                raise OSError("the admin process was killed")  # the first feed is across
            return await real_copy(feed, target)

        self.store.copy = copy_then_die
        yield self.assertFailure(self.move(), OSError)
        step = yield self.db.query("SELECT step, target FROM user_moves WHERE userid = ?", self.userid)
        self.assertEqual(tuple(step[0]), ("files", "b"))
        servers = yield self.db.query("SELECT id, server FROM feeds WHERE userid = ? ORDER BY id", self.userid)
        self.assertEqual([tuple(r) for r in servers], [(self.fina.id, 2), (self.series.id, 1)])
        # another move of the user cannot start meanwhile
        yield self.assertFailure(self.move("a"), Invalid)

        self.store.copy = real_copy
        summary = yield self.move()
        self.assertEqual(list(summary["steps"]), ["files", "transfer", "release", "cleanup"])  # resumed at files
        self.assertEqual(sorted(summary["feeds"]), sorted([str(self.fina.id), str(self.series.id)]))
        servers = yield self.db.query("SELECT server FROM feeds WHERE userid = ? ORDER BY id", self.userid)
        self.assertEqual([r[0] for r in servers], [2, 2])
        again = yield self.move()  # done: nothing more to do
        self.assertTrue(again["already_there"])

    @defer.inlineCallbacks
    def test_what_the_source_parked_goes_before_what_the_target_parked_even_after_a_crash(self):
        self.patch(move_module, "TRANSFER_CHUNK", 1)
        # The source's queue still held two packets at the hold (its consumer slow, or down):
        # parked there. The target parked a later one, posted once the user pointed at it.
        older = [[self.userid, T0 + 40.5 + i, T0 + 40 + i, [[0, "tx", {"p": 300.0 + i}]]] for i in range(2)]
        newer = [self.userid, T0 + 42.5, T0 + 42, [[0, "tx", {"p": 302.0}]]]
        for group in older:
            yield defer.ensureDeferred(self.redis["a"].call("XADD", keys.user_held(self.userid), "*", "p", encode_groups([group])))
        yield defer.ensureDeferred(self.redis["b"].call("XADD", keys.user_held(self.userid), "*", "p", encode_groups([newer])))
        # The command dies once the first packet is on the target, before it leaves the source.
        source, call = self.redis["a"], self.redis["a"].call

        async def dies_at_the_first_removal(command, *args):
            if command == "XDEL":
                del source.call
                raise RedisUnavailable("the admin process was killed")
            return await call(command, *args)

        source.call = dies_at_the_first_removal
        yield self.assertFailure(self.move(), RedisUnavailable)
        step = yield self.db.query("SELECT step FROM user_moves WHERE userid = ?", self.userid)
        self.assertEqual(step[0][0], "transfer")

        summary = yield self.move()
        self.assertEqual(summary["parked_on_source"], 2)
        self.assertEqual((yield self.parked("b", keys.user_held(self.userid))), [*older, newer])  # each once, in order
        self.assertEqual((yield self.parked("a", keys.user_held(self.userid))), [])

    @defer.inlineCallbacks
    def test_reads_from_the_target_find_the_state_from_the_hold_on(self):
        """From the hold on the user's shard is the target, where reads of last values go:
        the state is there already during the drain (copied again, exactly, at the state step)."""
        before = yield defer.ensureDeferred(self.redis["a"].pipeline([("DUMP", k) for k in self.state_keys()]))
        seen = []
        drain = Mover._drain

        async def look_then_drain(mover, record):
            seen.append(await self.redis["b"].pipeline([("DUMP", k) for k in self.state_keys()]))
            await drain(mover, record)

        self.patch(Mover, "_drain", look_then_drain)
        yield self.move()
        self.assertEqual(seen, [before])
        lastvalue = yield defer.ensureDeferred(self.redis["b"].call("HGETALL", keys.input_lastvalue(self.input.id)))
        self.assertEqual(lastvalue, [b"time", str(T0 + 31).encode(), b"value", b"200"])

    def test_unknown_users_and_shards_are_refused(self):
        self.assertFailure(self.move("c"), Invalid)
        return self.assertFailure(defer.ensureDeferred(Mover(self.parts).move("nobody", "b")), Invalid)

    def state_keys(self):
        return [
            keys.input_lastvalue(self.input.id), keys.feed_lastvalue(self.fina.id), keys.feed_disk(self.fina.id),
            keys.process_state("kwhtokwhd", self.fina.id), keys.step_times(self.input.id), keys.refused_counts(self.userid),
        ]

    @defer.inlineCallbacks
    def subscribe(self, into):
        from txredisapi import SubscriberFactory, SubscriberProtocol
        from twisted.internet.endpoints import TCP4ClientEndpoint

        class Listener(SubscriberProtocol):
            def messageReceived(self, pattern, channel, message):
                into.append(message if isinstance(message, bytes) else str(message).encode())

        factory = SubscriberFactory()
        factory.protocol = Listener
        factory.continueTrying = False
        protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", redis_server().port).connect(factory)
        yield protocol.select(DBS["central"])
        yield protocol.subscribe(keys.USER_MOVED)
        return protocol
