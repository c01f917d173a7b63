"""State that survives the loss of Redis's data, over a real node, real Redis and real HTTP.

Each test posts readings, lets them reach the files, then empties the test
Redis (FLUSHALL: what a lost disk or a promoted empty replica leaves) and
restarts the node (its consumer's cached state goes too, as after a crash).
What comes after must continue from what is on disk and in the database.

The expected numbers are worked out by hand in the comments from emoncms's
rules (kWh += W * dt / 3.6e6, dt the seconds since the last counted packet,
nothing after a gap of 7200 s or more) and the rebuild rules of
``emond.process.state``: a PHPTimeSeries point carries its packet's time; a PHPFina
point stands for its whole slot, so the next increment counts from the
slot's last second; a daily point tells the day only, so the first packet
after the loss sets the baseline.
"""

from __future__ import annotations

import os
import signal

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.app.service import make_node_service
from tests.support.node import NodeHarness
from tests.support.user import UserSteps
from tests.support.servers import redis_server
from tests import test_remote  # the module, not its class: trial would run its tests here too

T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC, a multiple of 10
DAY = 1_699_920_000  # 2023-11-14 00:00:00 UTC: the users' timezone is UTC
# Tests post at fixed past times: let the engines take them.
CONFIG = "[engines]\nwindow_past = 2000000000\n[input]\nlastvalue_save_interval = 0.2\n"


class RedisLossTests(UserSteps, unittest.TestCase):
    timeout = 90
    database = "sqlite"

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, self.database, CONFIG)
        answer = yield self.node.post("user/register.json", data={"username": "dev", "password": "secret1", "email": "d@example.org"})
        self.keys = answer.json()

    @defer.inlineCallbacks
    def lose_redis(self):
        """Redis loses everything; the node restarts (a new process: nothing cached)."""
        yield self.settle()
        node = self.node
        old = node.service
        yield old.stopService()
        for child in list(old):  # stopped once: the cleanup NodeHarness registered stops nothing
            old.removeService(child)
        redis_server().flushall()
        node.service = make_node_service(node.config, reactor)
        node.app = node.service.getServiceNamed("api")
        node.service.startService()
        self.addCleanup(node.service.stopService)
        yield node.app.prepared
        for location in node.service.getServiceNamed("storage"):
            yield location.opened

    # -- tests -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_power_to_kwh_continues_from_disk(self):
        fina = yield self.feed("kwh_fina")
        ts = yield self.feed("kwh_ts", engine=2)
        yield self.post(T0 - 100, p=0)
        yield self.settle()
        yield self.set_list("p", f"4:{fina},4:{ts}")
        for when, watts in ((T0 + 3, 3600), (T0 + 13, 7200), (T0 + 23, 3600)):
            yield self.post(when, p=watts)
        yield self.settle()
        # first packet: no last value, 0 kWh; then + 10 s * 7200 W = 0.02; + 10 s * 3600 W = 0.01
        self.assertEqual(self.series(ts), [(T0 + 3, 0.0), (T0 + 13, 0.02), (T0 + 23, 0.03)])
        self.assertEqual(self.fina(fina), (T0, [0.0, 0.02, 0.03]))

        yield self.lose_redis()
        for when, watts in ((T0 + 33, 3600), (T0 + 43, 7200)):
            yield self.post(when, p=watts)
        yield self.settle()
        # PHPTimeSeries: from (T0+23, 0.03): + 10 s * 3600 W = 0.01 -> 0.04; + 10 s * 7200 W = 0.02 -> 0.06
        self.assertEqual(self.series(ts)[3:], [(T0 + 33, 0.04), (T0 + 43, 0.06)])
        # PHPFina: the slot T0+20 holds 0.03 and stands for T0+20..T0+29: from T0+29,
        # + 4 s * 3600 W = 0.004 -> 0.034; + 10 s * 7200 W = 0.02 -> 0.054
        self.assertEqual(self.fina(fina), (T0, [0.0, 0.02, 0.03, 0.034, 0.054]))

    @defer.inlineCallbacks
    def test_a_packet_sent_again_after_the_loss_counts_once(self):
        kwh = yield self.feed("kwh", engine=2)
        total = yield self.feed("total", engine=2)
        fina = yield self.feed("total_fina")
        yield self.post(T0 - 100, n=0, m=0)
        yield self.settle()
        yield self.set_list("n", f"4:{kwh},14:{total}")
        yield self.set_list("m", f"14:{fina}")
        for when, value in ((T0, 3600), (T0 + 10, 3600), (T0 + 20, 1800)):
            yield self.post(when, n=value, m=value)
        yield self.settle()
        yield self.lose_redis()
        # the device did not get the answer to its last post and sends it again
        yield self.post(T0 + 20, n=1800, m=1800)
        yield self.settle()
        # kWh: 0; + 10 s * 3600 W = 0.01; + 10 s * 1800 W = 0.005: unchanged by the repeat
        self.assertEqual(self.series(kwh), [(T0, 0.0), (T0 + 10, 0.01), (T0 + 20, 0.015)])
        # accumulator: 3600, 7200, 9000: unchanged by the repeat
        self.assertEqual(self.series(total), [(T0, 3600.0), (T0 + 10, 7200.0), (T0 + 20, 9000.0)])
        self.assertEqual(self.fina(fina), (T0, [3600.0, 7200.0, 9000.0]))
        yield self.post(T0 + 30, n=1800, m=1800)
        yield self.settle()
        # then counting goes on: + 10 s * 1800 W = 0.005; 9000 + 1800
        self.assertEqual(self.series(kwh)[3:], [(T0 + 30, 0.02)])
        self.assertEqual(self.series(total)[3:], [(T0 + 30, 10800.0)])
        self.assertEqual(self.fina(fina), (T0, [3600.0, 7200.0, 9000.0, 10800.0]))

    @defer.inlineCallbacks
    def test_accumulators_keep_their_totals(self):
        total = yield self.feed("total")
        wh = yield self.feed("wh")
        yield self.post(T0 - 100, a=0, w=0)
        yield self.settle()
        yield self.set_list("a", f"14:{total}")
        yield self.set_list("w", f"34:{wh}")
        for i, (a, w) in enumerate(((1, 1000), (2, 1010), (3, 1030))):
            yield self.post(T0 + 10 * i, a=a, w=w)
        yield self.settle()
        # accumulator: 1, 3, 6; Wh accumulator: the first reading is the reference, then +10, +20
        self.assertEqual(self.fina(total), (T0, [1.0, 3.0, 6.0]))
        self.assertEqual(self.fina(wh), (T0 + 10, [10.0, 30.0]))

        yield self.lose_redis()
        for i, (a, w) in enumerate(((4, 1045), (5, 1050)), start=3):
            yield self.post(T0 + 10 * i, a=a, w=w)
        yield self.settle()
        # accumulator: 6 + 4 = 10, + 5 = 15
        self.assertEqual(self.fina(total), (T0, [1.0, 3.0, 6.0, 10.0, 15.0]))
        # Wh accumulator: its reference reading was lost with Redis: 1045 becomes the
        # reference (nothing written), the total 30 is kept: 1050 - 1045 = 5 -> 35 at T0+40,
        # the slot between joined linearly: 30 + (35 - 30) / 2 = 32.5
        self.assertEqual(self.fina(wh), (T0 + 10, [10.0, 30.0, 32.5, 35.0]))

    @defer.inlineCallbacks
    def test_daily_kwh_continues_the_day(self):
        kwhd = yield self.feed("kwhd", engine=2, datatype=2)
        yield self.post(DAY - 3600, p=0)
        yield self.settle()
        yield self.set_list("p", f"5:{kwhd}")
        for when, watts in ((DAY + 600, 3600), (DAY + 660, 3600), (DAY + 720, 7200)):
            yield self.post(when, p=watts)
        yield self.settle()
        # the day's point at its start: 0 (no last value); + 60 s * 3600 W = 0.06; + 60 s * 7200 W = 0.12
        self.assertEqual(self.series(kwhd), [(DAY, 0.18)])

        yield self.lose_redis()
        # the last packet again (counts nothing), then the next ones
        for when, watts in ((DAY + 720, 7200), (DAY + 780, 3600), (DAY + 840, 3600)):
            yield self.post(when, p=watts)
        yield self.settle()
        # disk says 0.18 for the day, not when its last packet came: the repeat at DAY+720 adds
        # nothing and is the baseline (not midnight: 720 s * 7200 W would add 1.44 kWh);
        # + 60 s * 3600 W = 0.06 -> 0.24; + 0.06 -> 0.30
        self.assertEqual(self.series(kwhd), [(DAY, 0.3)])

    @defer.inlineCallbacks
    def test_input_last_values_come_back_from_the_database(self):
        out = yield self.feed("out", engine=2)
        yield self.post(T0, a=5, b=2)
        yield self.post(T0 + 10, node="other", c=-1.5)
        yield self.lose_redis()
        listed = yield self.inputs()
        self.assertEqual(
            {key: (i["time"], i["value"]) for key, i in listed.items()},
            {("tx", "a"): (T0, 5), ("tx", "b"): (T0, 2), ("other", "c"): (T0 + 10, -1.5)},
        )
        got = yield self.call("input/get.json")
        self.assertEqual(got.json()["tx"]["a"], {"time": T0, "value": 5, "processList": ""})
        # a step reading another input uses the value the database kept: 3 * 5
        yield self.set_list("b", f"6:{listed[('tx', 'a')]['id']},1:{out}")
        yield self.post(T0 + 20, b=3)
        yield self.settle()
        self.assertEqual(self.series(out), [(T0 + 20, 15.0)])
        listed = yield self.inputs()
        self.assertEqual((listed[("tx", "b")]["time"], listed[("tx", "b")]["value"]), (T0 + 20, 3))

    @defer.inlineCallbacks
    def test_values_a_feed_cannot_hold_are_refused_and_counted(self):
        big = yield self.feed("big")
        after = yield self.feed("after", engine=2)
        inf = yield self.feed("inf", engine=2)
        yield self.post(T0 - 100, x=0, y=0)
        yield self.settle()
        yield self.set_list("x", f"2:1e30,1:{big},3:1,1:{after}")
        yield self.set_list("y", f"2:1e300,2:1e300,1:{inf}")
        # 2 * 1e30 fits a float32 (max 3.4e38); 1e10 * 1e30 = 1e40 does not; 1 * 1e300 * 1e300 is inf
        yield self.post(T0, x=2, y=1)
        yield self.post(T0 + 10, x=1e10, y=1)
        yield self.post(T0 + 20, x=3, y=0)
        yield self.settle()
        self.assertEqual(self.fina(big), (T0, [float(np.float32(2e30)), None, float(np.float32(3e30))]))
        # the step after the refused write got nothing: only T0 and T0 + 20 (+ 1 is lost in 2e30)
        self.assertEqual(self.series(after), [(T0, float(np.float32(2e30))), (T0 + 20, float(np.float32(3e30)))])
        self.assertEqual(self.series(inf), [(T0 + 20, 0.0)])
        rejected = yield self.call("input/rejected.json")
        body = rejected.json()
        # x at T0+10 (1e40 for a feed), y at T0 and T0+10 (inf after the second scale)
        self.assertEqual(body["counts"], {"value_out_of_range": 3})
        self.assertEqual(
            sorted((r["time"], r["node"], r["input"], r["reason"]) for r in body["last"]),
            [(T0, "tx", "y", "value_out_of_range"), (T0 + 10, "tx", "x", "value_out_of_range"),
             (T0 + 10, "tx", "y", "value_out_of_range")],
        )
        data = yield self.call("feed/data.json", id=str(big), start=str(T0 * 1000), end=str((T0 + 30) * 1000), interval="10")
        self.assertEqual(data.code, 200, data)


class InputLastValuesMariaDBTests(unittest.TestCase):
    """Input last values over MariaDB (its UPDATE evaluates SET left to right, unlike SQLite)."""

    timeout = 90
    database = "mysql"
    setUp = RedisLossTests.setUp
    call = RedisLossTests.call
    feed = RedisLossTests.feed
    post = RedisLossTests.post
    inputs = RedisLossTests.inputs
    set_list = RedisLossTests.set_list
    settle = RedisLossTests.settle
    lose_redis = RedisLossTests.lose_redis
    series = RedisLossTests.series
    test_input_last_values_come_back_from_the_database = RedisLossTests.test_input_last_values_come_back_from_the_database

    @defer.inlineCallbacks
    def test_an_older_value_does_not_replace_a_newer_one(self):
        yield self.post(T0 + 10, a=7)
        yield self.settle()
        inputs = self.node.ctx.inputs
        inputid = int((yield self.inputs())[("tx", "a")]["id"])
        # a consumer that held the queue before writes late what it had: the database keeps the newer
        yield defer.ensureDeferred(inputs.save_lastvalues({inputid: (T0, 1.0)}))
        stored = yield defer.ensureDeferred(inputs.stored_lastvalues([inputid]))
        self.assertEqual(stored, {inputid: (T0 + 10, 7.0)})
        yield defer.ensureDeferred(inputs.save_lastvalues({inputid: (T0 + 20, 8.5)}))
        stored = yield defer.ensureDeferred(inputs.stored_lastvalues([inputid]))
        self.assertEqual(stored, {inputid: (T0 + 20, 8.5)})


class RemoteStorageRedisLossTests(unittest.TestCase):
    """The last points come over the stream from a remote storage server (real processes, mutual TLS)."""

    timeout = 180
    setUp = test_remote.RemoteStorageTests.setUp
    start_storage = test_remote.RemoteStorageTests.start_storage
    start_node = test_remote.RemoteStorageTests.start_node
    call = test_remote.RemoteStorageTests.call
    drained = test_remote.RemoteStorageTests.drained

    def series(self, feedid):
        with open(os.path.join(self.base, "remote", "phptimeseries", f"feed_{feedid}.MYD"), "rb") as f:
            raw = f.read()
        records = np.frombuffer(raw, dtype=np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")]))
        return [(int(t), round(float(v), 4)) for t, v in zip(records["t"], records["v"])]

    @defer.inlineCallbacks
    def post(self, when, watts):
        yield self.call("input/post.json", apikey=self.key, node="n", csv=str(watts), time=str(when))

    @defer.inlineCallbacks
    def test_power_to_kwh_on_a_remote_server_continues_from_its_disk(self):
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        keys = yield self.call("user/register.json", username="remote", password="secret1", email="r@example.org")
        self.key = keys["apikey_write"]
        kwh = (yield self.call("feed/create.json", apikey=self.key, name="kwh", engine="2", server="1"))["feedid"]
        yield self.post(T0 - 100, 0)
        yield self.drained(node)
        inputs = yield self.call("input/list.json", apikey=self.key)
        yield self.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=self.key, processlist=f"4:{kwh}")
        for when, watts in ((T0 + 3, 3600), (T0 + 13, 7200), (T0 + 23, 3600)):
            yield self.post(when, watts)
        yield self.drained(node)
        self.assertEqual(self.series(kwh), [(T0 + 3, 0.0), (T0 + 13, 0.02), (T0 + 23, 0.03)])
        yield node.signal(signal.SIGTERM)
        redis_server().flushall()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.post(T0 + 33, 3600)
        yield self.drained(node)
        # from (T0+23, 0.03) read over the stream: + 10 s * 3600 W / 3.6e6 = 0.01
        self.assertEqual(self.series(kwh)[3:], [(T0 + 33, 0.04)])
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_a_server_that_saw_newer_fencing_tokens_takes_batches_after_the_loss(self):
        """The storage server keeps the newest fencing token on its disk; Redis's counter
        restarts after the loss, so the next sender's token is older than the server's: it
        must catch up, not have every batch refused as stale forever."""
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        keys = yield self.call("user/register.json", username="fenced", password="secret1", email="f@example.org")
        self.key = keys["apikey_write"]
        feed = (yield self.call("feed/create.json", apikey=self.key, name="log", engine="2", server="1"))["feedid"]
        yield self.post(T0 - 100, 0)
        yield self.drained(node)
        inputs = yield self.call("input/list.json", apikey=self.key)
        yield self.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=self.key, processlist=f"1:{feed}")
        yield self.post(T0, 1)
        yield self.drained(node)
        # a second tenure of the storage queue: the server now holds token 2
        yield node.signal(signal.SIGTERM)
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.post(T0 + 10, 2)
        yield self.drained(node)
        yield node.signal(signal.SIGTERM)
        redis_server().flushall()  # the fence counter starts again from 1
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.post(T0 + 20, 3)
        yield self.drained(node)
        self.assertEqual(self.series(feed), [(T0, 1.0), (T0 + 10, 2.0), (T0 + 20, 3.0)])
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)
