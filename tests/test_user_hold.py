"""A user held while it moves onto a shard (``emond.process.consumer``): its packets are
accepted (`ok`) and parked, unprocessed, while ``keys.user_hold`` is set; once the hold is
lifted they go through once each, in the order accepted, before any newer packet — over a
real node, real Redis and real HTTP.

Expected figures from emoncms's power_to_kwh rule (kWh += W * dt / 3.6e6, dt the seconds
since the last counted packet): a packet processed out of order (older than the last
counted) adds nothing, so a wrong order shows as a smaller total.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from emond import keys
from emond.process import consumer as consumer_module
from emond.queue import QueueLayout, decode_groups, encode_groups, read_head
from tests.support.node import NodeHarness, pipeline
from tests.support.user import UserSteps

T0 = 1_700_000_000
CONFIG = "[engines]\nwindow_past = 2000000000\n[input]\nlastvalue_save_interval = 0.2\nrate_limit = 0.0\n"


class UserHoldTests(UserSteps, unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite", CONFIG)
        answer = yield self.node.post("user/register.json", data={"username": "mover", "password": "secret1", "email": "m@example.org"})
        self.keys = answer.json()
        self.userid = self.keys["userid"] if "userid" in self.keys else (yield self.userid_of())
        self.redis = self.node.ctx.redis
        self.kwh = yield self.feed("kwh", engine=2)  # PHPTimeSeries: one record per counted packet
        self.log = yield self.feed("power", engine=2)
        yield self.post(T0, p=0)
        yield self.settle()
        yield self.set_list("p", f"1:{self.log},4:{self.kwh}")

    @defer.inlineCallbacks
    def userid_of(self):
        rows = yield defer.ensureDeferred(self.node.ctx.db.query("SELECT id FROM users WHERE username = ?", "mover"))
        return int(rows[0][0])

    @defer.inlineCallbacks
    def release(self):
        """What the move does at its end: lift the hold and ask the consumer for a pass."""
        layout = QueueLayout.from_config(self.node.config.input)
        yield defer.ensureDeferred(self.redis.pipeline([
            ("DEL", keys.user_hold(self.userid)),
            ("XADD", keys.input_stream(layout.queue_for(self.userid)), "*", "p", encode_groups([[self.userid, 0.0, 0, []]])),
        ]))

    @defer.inlineCallbacks
    def held(self):
        """Packets parked (a pass parks what it holds of the user as one element)."""
        entries = yield defer.ensureDeferred(read_head(self.redis, keys.user_held(self.userid), None, 1000))
        return sum(len(group[3]) for _id, fields in entries for group in decode_groups(fields[b"p"]))

    @defer.inlineCallbacks
    def test_held_packets_wait_then_go_through_in_order_once(self):
        yield defer.ensureDeferred(self.redis.call("SET", keys.user_hold(self.userid), "1"))
        watts = [3600, 7200, 3600, 1800, 0, 3600]
        for i, w in enumerate(watts, start=1):
            yield self.post(T0 + 10 * i, p=w)  # one element each: accepted
        yield pipeline(self.node, "consumer").idle()
        self.assertEqual((yield self.held()), len(watts))  # parked, unprocessed
        self.assertEqual(self.series(self.log), [])  # (the packet at T0 came before the list)
        self.assertEqual((yield self.inputs())[("tx", "p")]["value"], 0)

        yield self.release()
        yield self.post(T0 + 70, p=7200)  # newer than every parked one
        yield self.settle()
        self.assertEqual((yield self.held()), 0)
        times = [T0 + 10 * i for i in range(1, 8)]
        self.assertEqual(self.series(self.log), list(zip(times, [3600.0, 7200.0, 3600.0, 1800.0, 0.0, 3600.0, 7200.0])))
        # kWh at each packet: the first has no last one (0), then + 10 s * W / 3.6e6 W s per kWh
        expected_kwh = [0.0, 0.02, 0.03, 0.035, 0.035, 0.045, 0.065]
        self.assertEqual(self.series(self.kwh), list(zip(times, expected_kwh)))

    @defer.inlineCallbacks
    def test_a_long_backlog_goes_through_a_chunk_per_pass_newer_packets_behind_it(self):
        self.patch(consumer_module, "HELD_CHUNK", 2)
        yield defer.ensureDeferred(self.redis.call("SET", keys.user_hold(self.userid), "1"))
        for i in range(1, 8):
            yield self.post(T0 + 10 * i, p=3600)
        yield pipeline(self.node, "consumer").idle()
        self.assertEqual((yield self.held()), 7)
        yield self.release()
        for i in range(8, 11):  # arrive while the backlog is let through, two per pass
            yield self.post(T0 + 10 * i, p=3600)
        yield self.settle()
        self.assertEqual((yield self.held()), 0)
        times = [T0 + 10 * i for i in range(1, 11)]
        self.assertEqual([t for t, _ in self.series(self.log)], times)
        # 3600 W for 10 s = 0.01 kWh per packet after the first
        self.assertEqual(self.series(self.kwh), list(zip(times, [round(0.01 * i, 4) for i in range(10)])))

    @defer.inlineCallbacks
    def test_other_users_are_not_held(self):
        other = yield self.node.post("user/register.json", data={"username": "stays", "password": "secret1", "email": "s@example.org"})
        yield defer.ensureDeferred(self.redis.call("SET", keys.user_hold(self.userid), "1"))
        answer = yield self.node.request("POST", "input/post.json", params={"apikey": other.json()["apikey_write"], "node": "n", "csv": "5"})
        self.assertEqual(answer.code, 200)
        yield self.post(T0 + 10, p=3600)
        yield self.settle()
        listed = yield self.node.request("POST", "input/list.json", params={"apikey": other.json()["apikey_write"]})
        self.assertEqual([(i["nodeid"], i["name"], i["value"]) for i in listed.json()], [("n", "1", 5)])
        self.assertEqual((yield self.held()), 1)
