"""Moving a user between shards on a real local cluster (``bin/cluster up``: MariaDB, a Redis
per shard, shard processes, storage servers over the TLS stream, fronts, HAProxy) while a
device posts through the entry point every 100 ms, with the ``emond-admin user move``
command killed part way and run again (issue 12 item 6).

Afterwards every point the device got ``ok`` for is on the target's storage server once, in
order, and the kWh feed continues without a jump: power_to_kwh adds W * dt / 3.6e6 per
packet (emoncms's rule), so with 3600 W posted once per second of device time each point is
0.001 kWh above the one before it, across the move.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time

import numpy as np
from twisted.internet import defer, protocol, reactor, task, utils
from twisted.trial import unittest

from tests.test_localcluster import fetch, run_cluster

WATTS = 3600


class ClusterMoveTests(unittest.TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="emond-move-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        code, out, err = yield run_cluster("up", self.dir)
        self.assertEqual(code, 0, err)
        self.addCleanup(run_cluster, "down", self.dir)
        self.cluster = json.loads(out)
        self.entry = self.cluster["entry"].rstrip("/")
        answer = yield self.api("user/register.json", data={"username": "mover", "password": "secret1", "email": "m@example.org"})
        self.key = answer.json()["apikey_write"]

    def api(self, path, data=None, **params):
        return fetch("POST", f"{self.entry}/{path}", params=params, data=data)

    def call(self, path, **params):
        return self.api(path, apikey=self.key, **params)

    def admin(self, *args):
        argv = self.cluster["admin"]
        d = utils.getProcessOutputAndValue(argv[0], [*argv[1:], *args], env=dict(os.environ))
        return d.addCallback(lambda r: (r[2], r[0].decode(), r[1].decode()))

    @defer.inlineCallbacks
    def shard(self):
        code, out, err = yield self.admin("user", "show", "mover")
        self.assertEqual(code, 0, err)
        return json.loads(out)["shard"]

    def series(self, shard, feedid):
        """(time, value) of a PHPTimeSeries file, by its format: byte 249, uint32 time, float32 value."""
        path = os.path.join(self.dir, f"shard-{shard}", "storage", "phptimeseries", f"feed_{feedid}.MYD")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            records = np.frombuffer(f.read(), dtype=np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")]))
        return [(int(t), float(v)) for t, v in zip(records["t"], records["v"])]

    @defer.inlineCallbacks
    def test_a_user_moves_while_its_device_posts_and_the_command_is_killed_once(self):
        source = yield self.shard()
        target = "b" if source == "a" else "a"
        log = (yield self.call("feed/create.json", name="power", tag="t", engine="2", datatype="1")).json()["feedid"]
        kwh = (yield self.call("feed/create.json", name="kwh", tag="t", engine="2", datatype="1")).json()["feedid"]
        t0 = int(time.time()) - 3600
        first = yield self.call("input/post.json", node="tx", fulljson=json.dumps({"p": WATTS}), time=str(t0))
        self.assertEqual(first.code, 200)
        inputs = []
        for _ in range(100):  # the shard's consumer creates the input
            inputs = (yield self.call("input/list.json")).json()
            if inputs:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        answer = yield self.api("input/process/set.json", data={"processlist": f"1:{log},4:{kwh}"}, apikey=self.key, inputid=inputs[0]["id"])
        self.assertEqual(answer.code, 200, answer)

        # The device: one packet every 100 ms, one second of device time apart; `ok` counted.
        acked: list[int] = []
        refused: list[int] = []
        sent = [0]

        @defer.inlineCallbacks
        def post():
            sent[0] += 1
            when = t0 + sent[0]
            answer = yield self.call("input/post.json", node="tx", fulljson=json.dumps({"p": WATTS}), time=str(when))
            (acked if answer.code == 200 else refused).append(when)

        device = task.LoopingCall(post)
        device.start(0.1)

        # The move, killed once part way, then run again to its end.
        argv = self.cluster["admin"]
        killed = reactor.spawnProcess(_Ignore(), argv[0], [argv[0], *argv[1:], "user", "move", "mover", target], env=dict(os.environ))
        deadline = time.monotonic() + 60
        while (yield self.shard()) != target:  # the hold step is done: the move is under way
            self.assertLess(time.monotonic(), deadline, "the move did not start")
        os.kill(killed.pid, signal.SIGKILL)
        code, out, err = yield self.admin("user", "move", "mover", target)
        self.assertEqual(code, 0, err)
        summary = json.loads(out)
        self.assertEqual((summary["from"], summary["to"]), (source, target))
        self.assertNotIn("hold", summary["steps"])  # resumed where the killed command was
        self.assertEqual((yield self.shard()), target)
        yield task.deferLater(reactor, 1.0, lambda: None)  # the device goes on after the move
        device.stop()
        self.assertEqual(refused, [])
        self.assertGreater(len(acked), 10)

        # Every acked point on the target's storage, once, in order; none left at the source.
        expected = [t0] + acked  # the first packet came before the process list: not logged
        deadline = time.monotonic() + 60
        while [t for t, _ in self.series(target, log)] != expected[1:] and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.2, lambda: None)
        points = self.series(target, log)
        self.assertEqual([t for t, _ in points], acked)
        self.assertEqual({v for _, v in points}, {float(WATTS)})
        self.assertEqual(self.series(source, log), [])
        # kWh: 0 at the first logged packet (no last time for the feed), then + 3600 W * 1 s each
        kwh_points = self.series(target, kwh)
        self.assertEqual([t for t, _ in kwh_points], acked)
        steps = np.diff([v for _, v in kwh_points])
        self.assertTrue(np.allclose(steps, 0.001, atol=1e-6), steps)


class _Ignore(protocol.ProcessProtocol):
    """A process whose output nobody reads (the move that is killed)."""
