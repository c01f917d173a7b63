"""Moving a user between shards on a real local cluster (``bin/cluster up``: MariaDB, a Redis
per shard, shard processes, storage servers over the TLS stream, fronts, HAProxy) while a
device posts through the entry point every 100 ms, with the ``emond-admin user move``
command killed part way and run again (issue 12 item 6).

Afterwards every point the device got ``ok`` for is on the target's storage server once, in
order, and the kWh feed continues without a jump (tests/support/cluster.py says how).
tests/test_move_kills.py kills the cluster's other processes during a move.
"""

from __future__ import annotations

import signal

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.cluster import Cluster, MovingUser


class ClusterMoveTests(unittest.TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def test_a_user_moves_while_its_device_posts_and_the_command_is_killed_once(self):
        cluster = yield defer.ensureDeferred(Cluster.up(self))
        user = yield defer.ensureDeferred(MovingUser.make(self, cluster))
        source = yield defer.ensureDeferred(user.shard())
        target = "b" if source == "a" else "a"
        user.device.start()

        # The move, killed once part way (its hold done), then run again to its end.
        killed = user.start_move(target)
        yield defer.ensureDeferred(user.reached("drain"))
        killed.signal(signal.SIGKILL)
        summary = yield defer.ensureDeferred(user.move(target))
        self.assertEqual((summary["from"], summary["to"]), (source, target))
        self.assertNotIn("hold", summary["steps"])  # resumed where the killed command was

        yield defer.ensureDeferred(user.check_moved(source, target))
        self.assertEqual(user.device.refused, [])
