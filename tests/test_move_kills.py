"""A user's move between shards survives the SIGKILL of any process of the cluster (issue 12
item 6: "killing any process during a move and re-running the command finishes it").

On a real local cluster (``bin/cluster up``) with the user's device posting through the entry
point every 100 ms (tests/support/cluster.py), one process is SIGKILLed during
``emond-admin user move`` and started again as an operator or systemd would, with the same
command (``bin/cluster restart``); the command is run again if its first run failed. Then
the user is on the target, every point the device got ``ok`` for is on the target's storage
server once and in order, the kWh feed climbs without a jump and the source keeps nothing.
(tests/test_cluster_move.py kills the command itself.)

To kill a process at a chosen step rather than wherever a race puts it, a test holds the move
where it waits for a process: the source's shard process frozen (SIGSTOP) while the device
posts leaves packets in its input queue, so the move's drain step waits for them until the
process goes on (or is killed and started again); the recorded move (``user_moves``) says
where it is.
"""

from __future__ import annotations

import json
import os
import signal
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond import keys
from emond.config import load_node_config
from emond.queue import QueueLayout, encode_groups
from emond.redis import Redis

from tests.support.cluster import WATTS, Cluster, MovingUser
from tests.support.poll import until
from tests.support.daemon import Daemon

BACKLOG = 5  # packets the device gets `ok` for while the source's shard process is frozen


def ensure(coroutine):
    return defer.ensureDeferred(coroutine)


def position_noted(marks) -> bool:
    """The drain step noted the source's input queue position it waits for."""
    return marks.get("positions", {}).get("input") is not None


class MoveKillTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = yield ensure(Cluster.up(self))
        self.user = yield ensure(MovingUser.make(self, self.cluster))
        self.source = yield ensure(self.user.shard())
        self.target = "b" if self.source == "a" else "a"
        self.user.device.start()
        # Points on the source's storage server: the move has files to copy.
        yield ensure(until(lambda: len(self.cluster.series(self.source, self.user.log)) >= 10, 30, "points at the source"))

    @defer.inlineCallbacks
    def hold_at_drain(self) -> Daemon:
        """Start the move with packets waiting in the source's input queue, its shard process
        frozen: the move stops at its drain step until that process goes on; the running
        command."""
        os.kill(self.cluster.pid(f"shard-{self.source}"), signal.SIGSTOP)
        acked = len(self.user.device.acked)
        yield ensure(until(lambda: len(self.user.device.acked) >= acked + BACKLOG, 30, "packets queued at the frozen source"))
        move = self.user.start_move(self.target)
        step = yield ensure(self.user.reached("drain", position_noted))
        self.assertEqual(step, "drain")  # and it stays there: the frozen process passes nothing
        return move

    @defer.inlineCallbacks
    def ended(self, move: Daemon):
        """The exit code of the move command, and its last line (its JSON answer or error)."""
        code = yield move.ended
        lines = move.output.decode().strip().splitlines()
        return code, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else move.output.decode()

    @defer.inlineCallbacks
    def test_a_fronts_request_in_flight_at_the_hold_reaches_the_source_after_the_drain(self):
        """The device's post is in flight at the hold: a front looked the user up just before
        it and appends the packet to the source's input queue only after the move's drain step.
        The move waits out its grace period since the hold, and the source's consumer (which
        parks the packet), before it transfers what the source parked: the packet is processed
        on the target before the device's later ones, and the kWh feed has no hole (it skips a
        packet older than its last point)."""
        device = self.user.device
        yield device.stop()
        when = device.t0 + len(device.sent) + 1  # the packet in flight; the device waits for its answer
        device.sent.append(when)
        move = self.user.start_move(self.target)
        yield ensure(self.user.reached("transfer"))  # the steps before done; the grace not over yet
        config = load_node_config(os.path.join(self.cluster.dir, "front1", "emond.toml"))
        queue = keys.input_stream(QueueLayout.from_config(config.input).queue_for(self.user.id))
        source = Redis.connect(self.cluster.summary["shards"][self.source]["redis"], 5.0, reactor)
        try:
            group = [self.user.id, time.time(), when, [[0, "tx", {"p": float(WATTS)}]]]
            yield ensure(source.call("XADD", queue, "*", "p", encode_groups([group])))
        finally:
            yield source.disconnect()
        device.acked.append(when)  # the front's `ok`
        row = yield ensure(self.user.move_row())
        self.assertEqual(row[0], "transfer", "the move went past its transfer before the late packet (its grace period since the hold over: a box too slow for this test, or no grace before the transfer)")
        self.assertNotIn("input-after-grace", row[1].get("positions", {}), "the move looked at the source's queue before the late packet")
        device.start()  # its next packets go to the target, parked there until the release
        code, answer = yield self.ended(move)
        self.assertEqual(code, 0, answer)
        self.assertEqual(answer["parked_on_source"], 1)
        yield ensure(self.user.check_moved(self.source, self.target))
        self.assertEqual(device.refused, [])

    @defer.inlineCallbacks
    def test_the_source_shard_process_killed_while_the_move_drains_it(self):
        move = yield self.hold_at_drain()
        yield ensure(self.cluster.kill(f"shard-{self.source}"))
        yield ensure(self.cluster.restart(f"shard-{self.source}"))
        # The command waited for the restarted process (it takes over the input queue once the
        # dead one's lease ends) and finished: nothing to run again.
        code, answer = yield self.ended(move)
        self.assertEqual(code, 0, answer)
        self.assertEqual((answer["from"], answer["to"], list(answer["steps"])[:2]), (self.source, self.target, ["hold", "drain"]))
        yield ensure(self.user.check_moved(self.source, self.target))
        self.assertEqual(self.user.device.refused, [])

    @defer.inlineCallbacks
    def test_the_target_shard_process_killed_during_the_move(self):
        move = self.user.start_move(self.target)
        yield ensure(self.user.reached("drain"))  # held: the target parks the user's packets
        yield ensure(self.cluster.kill(f"shard-{self.target}"))
        self.assertFalse(move.ended.called)  # its transfer waits GRACE_SECONDS from the hold
        yield ensure(self.cluster.restart(f"shard-{self.target}"))
        code, answer = yield self.ended(move)
        self.assertEqual(code, 0, answer)  # the command needs the target's Redis, not its process
        yield ensure(self.user.check_moved(self.source, self.target))
        self.assertEqual(self.user.device.refused, [])

    @defer.inlineCallbacks
    def test_the_target_storage_server_killed_during_the_files_step(self):
        storage = f"storage-{self.target}"
        move = yield self.hold_at_drain()
        # The command's stream to every storage server is up (it connects before the hold).
        # The target's storage server frozen, the move goes on to the files step and waits there
        # for that server's answer to the first piece of a copy; killed then, it is lost mid-copy.
        os.kill(self.cluster.pid(storage), signal.SIGSTOP)
        os.kill(self.cluster.pid(f"shard-{self.source}"), signal.SIGCONT)
        step = yield ensure(self.user.reached("files"))
        self.assertEqual(step, "files")
        yield ensure(self.cluster.kill(storage))
        code, answer = yield self.ended(move)
        self.assertEqual(code, 1, answer)
        self.assertRegex(answer["error"], r"^user move: storage server \d+.*\(run the command again to go on\)$")
        row = yield ensure(self.user.move_row())
        self.assertEqual(row[0], "files")  # what was done stays done

        yield ensure(self.cluster.restart(storage))
        answer = yield ensure(self.user.move(self.target))
        self.assertEqual(list(answer["steps"]), ["files", "transfer", "release", "cleanup"])
        self.assertEqual(set(answer["feeds"]), {str(self.user.log), str(self.user.kwh)})
        yield ensure(self.user.check_moved(self.source, self.target))
        self.assertEqual(self.user.device.refused, [])

    @defer.inlineCallbacks
    def test_a_front_killed_during_the_move(self):
        move = self.user.start_move(self.target)
        yield ensure(self.user.reached("drain"))
        yield ensure(self.cluster.kill("front1"))
        self.assertFalse(move.ended.called)
        # HAProxy sends the device's posts to the other front (a post in flight at the killed
        # front gets no `ok`: the device does not count it).
        acked = len(self.user.device.acked)
        yield ensure(until(lambda: len(self.user.device.acked) >= acked + 10, 30, "posts acknowledged through front2"))
        yield ensure(self.cluster.restart("front1"))
        code, answer = yield self.ended(move)
        self.assertEqual(code, 0, answer)
        yield ensure(self.user.check_moved(self.source, self.target))

    @defer.inlineCallbacks
    def test_the_database_killed_during_the_move(self):
        move = yield self.hold_at_drain()
        # The command waits at its drain step (it reads Redis there); the database killed, its
        # next record of a step fails: a clear error, not a traceback, and what was done stays.
        yield ensure(self.cluster.kill("mariadb"))
        os.kill(self.cluster.pid(f"shard-{self.source}"), signal.SIGCONT)
        code, answer = yield self.ended(move)
        self.assertEqual(code, 1, answer)
        self.assertRegex(answer["error"], r"^user move: database: .*\(run the command again to go on\)$")

        yield ensure(self.cluster.restart("mariadb"))
        yield ensure(self.cluster.reconnect_database())
        answer = yield ensure(self.user.move(self.target))
        self.assertEqual(list(answer["steps"])[0], "drain")  # the hold was recorded before the database went
        yield ensure(self.user.check_moved(self.source, self.target))
        # While the database was down, a front asked for the user's shard (the move made it
        # forget it) answered 503: the device sends again; nothing else was refused.
        device = self.user.device
        self.assertEqual({when: device.answered.get(when) for when in device.refused}, {when: 503 for when in device.refused}, repr(device))

    @defer.inlineCallbacks
    def test_the_source_shard_process_gone_for_good_during_the_drain(self):
        move = yield self.hold_at_drain()
        yield ensure(self.cluster.kill(f"shard-{self.source}"))
        # Nothing will pass the queue: once no process has held its lease for two lease
        # periods, the command says so (instead of waiting out its drain timeout).
        code, answer = yield self.ended(move)
        self.assertEqual(code, 1, answer)
        self.assertRegex(answer["error"], r"^user move: emond:in:\d+ on shard '[ab]': no process has held its lease for 20 s: "
                                          r"is the shard's process running\? \(run the command again to go on\)$")
        row = yield ensure(self.user.move_row())
        self.assertEqual(row[0], "drain")

        yield ensure(self.cluster.restart(f"shard-{self.source}"))
        answer = yield ensure(self.user.move(self.target))
        self.assertEqual(list(answer["steps"])[0], "drain")
        yield ensure(self.user.check_moved(self.source, self.target))
        self.assertEqual(self.user.device.refused, [])
