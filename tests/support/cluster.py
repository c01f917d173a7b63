"""A real local cluster (``bin/cluster up``) for one test, and a user on it whose device keeps
posting through the entry point while ``emond-admin user move`` moves the user to the other
shard (issue 12 item 6: tests/test_cluster_move.py and tests/test_move_kills.py).

The user's one input logs power (3600 W, one packet per second of device time, posted every
100 ms) to a PHPTimeSeries feed and turns it into kWh in another: power_to_kwh adds
W * dt / 3.6e6 for the seconds dt since the kWh feed's last point (emoncms's rule), so every
kWh point is exactly 0.001 kWh per second above the one before it, across the move.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable

import numpy as np
import treq
from twisted.internet import defer, task, utils

from emond.cluster.move import STEPS
from emond.meta.db import Database
from tests.support.daemon import ROOT, Daemon, start_program
from tests.support.node import Answer
from tests.support.poll import until

CLUSTER = os.path.join(ROOT, "bin", "cluster")
WATTS = 3600
POST_EVERY = 0.1  # seconds between two posts of the device
POST_TIMEOUT = 10.0  # a post not answered by then counts as not acknowledged
SERIES = np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")])  # a PHPTimeSeries record: byte 249, uint32 time, float32 value


def run_cluster(*args: str):
    """``bin/cluster ARGS``; fires with (exit code, stdout, stderr)."""
    d = utils.getProcessOutputAndValue(CLUSTER, args, env=dict(os.environ))
    return d.addCallback(lambda result: (result[2], result[0].decode(), result[1].decode()))


@defer.inlineCallbacks
def fetch(method: str, url: str, **kwargs: Any):
    response = yield treq.request(method, url, persistent=False, **kwargs)
    body = yield response.content()
    return Answer(response.code, response.headers, body)


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    return text[text.rindex(")") + 2] != "Z"


class Cluster:
    """``bin/cluster up`` in a temporary folder, ``down`` at the end of the test."""

    def __init__(self, directory: str, summary: dict[str, Any]) -> None:
        self.dir = directory
        self.summary = summary
        self.entry = summary["entry"].rstrip("/")

    @classmethod
    async def up(cls, test: Any) -> "Cluster":
        directory = tempfile.mkdtemp(prefix="emond-move-")  # short: MariaDB's socket lives under it
        test.addCleanup(shutil.rmtree, directory, True)
        code, out, err = await run_cluster("up", directory)
        test.assertEqual(code, 0, err)
        test.addCleanup(run_cluster, "down", directory)
        cluster = cls(directory, json.loads(out))
        cluster.db = Database.connect(cluster.summary["database"]["url"])
        test.addCleanup(lambda: cluster.db.close())  # the pool of the moment (see reconnect_database)
        return cluster

    async def reconnect_database(self) -> None:
        """A new pool for ``db`` (after the cluster's MariaDB was started again: the old pool's
        connections died with the old server)."""
        old, self.db = self.db, Database.connect(self.summary["database"]["url"])
        await old.close()

    def pid(self, name: str) -> int:
        """The pid of the cluster's process ``name`` now (DIR/run/NAME.pid)."""
        with open(os.path.join(self.dir, "run", f"{name}.pid")) as f:
            return int(f.read())

    async def kill(self, name: str) -> int:
        """SIGKILL the process ``name``; fires with its pid once it is gone."""
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        await until(lambda: not alive(pid), 10, f"{name} (pid {pid}) gone after SIGKILL")
        return pid

    async def restart(self, name: str) -> int:
        """``bin/cluster restart DIR NAME``: the process started again as ``up`` started it;
        fires with its new pid once it answers."""
        code, out, err = await run_cluster("restart", self.dir, name)
        if code != 0:
            raise AssertionError(f"bin/cluster restart {name}: exit {code}: {err[-2000:]}")
        return int(json.loads(out)["pid"])

    def admin(self, *args: str):
        """``emond-admin ARGS`` as the cluster's admin; fires with (exit code, stdout, stderr)."""
        argv = self.summary["admin"]
        d = utils.getProcessOutputAndValue(argv[0], [*argv[1:], *args], env=dict(os.environ))
        return d.addCallback(lambda r: (r[2], r[0].decode(), r[1].decode()))

    def admin_started(self, *args: str) -> Daemon:
        """``emond-admin ARGS`` in the background: its output and ``ended`` (the exit code)."""
        argv = self.summary["admin"]
        return start_program([*argv, *args], ROOT)

    def series(self, shard: str, feedid: int) -> list[tuple[int, float]]:
        """(time, value) of a feed's PHPTimeSeries file on the shard's storage server."""
        path = os.path.join(self.dir, f"shard-{shard}", "storage", "phptimeseries", f"feed_{feedid}.MYD")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            data = f.read()
        records = np.frombuffer(data[: len(data) - len(data) % SERIES.itemsize], dtype=SERIES)
        return [(int(t), float(v)) for t, v in zip(records["t"], records["v"])]


class Device:
    """Posts ``{"p": WATTS}`` every POST_EVERY seconds, each one second of device time after
    the one before, through ``post``; remembers which got ``ok`` (``acked``) and which got
    anything else or nothing in POST_TIMEOUT (``refused``). It never resends."""

    def __init__(self, post: Callable[[int], Any], t0: int) -> None:
        self.post = post
        self.t0 = t0
        self.sent: list[int] = []
        self.acked: list[int] = []
        self.refused: list[int] = []
        self.answered: dict[int, int] = {}  # refused packet -> the HTTP status it got (none: no answer)
        self.last_refusal = ""
        self.loop = task.LoopingCall(self._one)
        self.stopped: defer.Deferred[Any] | None = None

    def __repr__(self) -> str:
        return f"<Device sent {len(self.sent)}, acked {len(self.acked)}, refused {self.refused[:10]} (the last: {self.last_refusal}), running {self.loop.running}>"

    def start(self) -> None:
        self.stopped = self.loop.start(POST_EVERY)

    def stop(self) -> defer.Deferred[Any]:
        """Stop posting; fires once the post in flight has its answer."""
        assert self.stopped is not None
        self.loop.stop()
        return self.stopped

    @defer.inlineCallbacks
    def _one(self):
        when = self.t0 + len(self.sent) + 1
        self.sent.append(when)
        try:
            answer = yield self.post(when)
        except Exception as e:  # connection reset, timeout: no `ok`
            self.refused.append(when)
            self.last_refusal = repr(e)
            return
        if answer.code == 200:  # `{"success": true}` to a fulljson post
            self.acked.append(when)
        else:
            self.refused.append(when)
            self.answered[when] = answer.code
            self.last_refusal = repr(answer)


class MovingUser:
    """A user registered through the entry, with a device posting power logged to a feed and
    integrated into kWh in another, and the checks of a move of that user."""

    name = "mover"

    def __init__(self, test: Any, cluster: Cluster) -> None:
        self.test = test
        self.cluster = cluster

    @classmethod
    async def make(cls, test: Any, cluster: Cluster) -> "MovingUser":
        user = cls(test, cluster)
        answer = await user.api("user/register.json", data={"username": cls.name, "password": "secret1", "email": "m@example.org"})
        test.assertEqual(answer.code, 200, answer)
        user.key = answer.json()["apikey_write"]
        user.id = json.loads((await user.show())[1])["id"]
        user.log = (await user.call("feed/create.json", name="power", tag="t", engine="2", datatype="1")).json()["feedid"]
        user.kwh = (await user.call("feed/create.json", name="kwh", tag="t", engine="2", datatype="1")).json()["feedid"]
        user.t0 = int(time.time()) - 3600
        first = await user.call("input/post.json", node="tx", fulljson=json.dumps({"p": WATTS}), time=str(user.t0))
        test.assertEqual(first.code, 200, first)
        inputs: list[Any] = []

        async def created() -> bool:  # the shard's consumer creates the input
            nonlocal inputs
            inputs = (await user.call("input/list.json")).json()
            return bool(inputs)

        await until(created, 30, "the input created")
        answer = await user.api("input/process/set.json", data={"processlist": f"1:{user.log},4:{user.kwh}"}, apikey=user.key, inputid=inputs[0]["id"])
        test.assertEqual(answer.code, 200, answer)
        user.device = Device(user._post, user.t0)
        test.addCleanup(lambda: user.device.stop() if user.device.loop.running else None)
        return user

    def api(self, path: str, data: Any = None, **params: Any):
        return fetch("POST", f"{self.cluster.entry}/{path}", params=params, data=data)

    def call(self, path: str, **params: Any):
        return self.api(path, apikey=self.key, **params)

    def _post(self, when: int):
        params = {"apikey": self.key, "node": "tx", "fulljson": json.dumps({"p": WATTS}), "time": str(when)}
        return fetch("POST", f"{self.cluster.entry}/input/post.json", params=params, timeout=POST_TIMEOUT)

    def show(self):
        return self.cluster.admin("user", "show", self.name)

    async def shard(self) -> str:
        code, out, err = await self.show()
        self.test.assertEqual(code, 0, err)
        return str(json.loads(out)["shard"])

    async def move_row(self) -> tuple[str, dict[str, Any]] | None:
        """(step, marks) of the user's move recorded in the database (None before it starts)."""
        rows = await self.cluster.db.query("SELECT step, marks FROM user_moves WHERE userid = ?", self.id)
        return (str(rows[0][0]), json.loads(rows[0][1])) if rows else None

    async def reached(self, step: str, *also: Callable[[dict[str, Any]], bool]) -> str:
        """Wait until the recorded move is at ``step`` or past it (the steps before it done)
        and its marks satisfy each of ``also``; fires with the step it is at."""
        at = ""

        async def there() -> bool:
            nonlocal at
            row = await self.move_row()
            if row is None:
                return False
            at = row[0]
            return STEPS.index(at) >= STEPS.index(step) and all(check(row[1]) for check in also)

        await until(there, 60, f"the move at step {step}")
        return at

    def start_move(self, target: str) -> Daemon:
        """``emond-admin user move`` in the background (killed at the end of the test if it
        still runs)."""
        move = self.cluster.admin_started("user", "move", self.name, target)
        self.test.addCleanup(move.signal, signal.SIGKILL)
        return move

    async def move(self, target: str) -> dict[str, Any]:
        """``emond-admin user move`` to its end, which must be a success; its summary."""
        code, out, err = await self.cluster.admin("user", "move", self.name, target)
        self.test.assertEqual(code, 0, err)
        return dict(json.loads(out))

    async def check_moved(self, source: str, target: str) -> None:
        """After the move: on ``target``, the device goes on for one more second, then every
        point it got ``ok`` for is on the target's storage server once, in order (points it
        got no ``ok`` for may be there too: a front killed after queueing one), the kWh feed
        climbs exactly 0.001 kWh per second of device time, and the source keeps nothing."""
        test, device = self.test, self.device
        test.assertEqual(await self.shard(), target)
        acked_then = len(device.acked)
        await until(lambda: len(device.acked) >= acked_then + 10, 30, f"the device acknowledged after the move ({device})")
        await device.stop()
        expected = set(device.acked)
        try:
            await until(
                lambda: expected <= {t for t, _ in self.cluster.series(target, self.log)}
                and expected <= {t for t, _ in self.cluster.series(target, self.kwh)},
                60, "every acknowledged point on the target's storage",
            )
        except AssertionError as e:
            missing = {
                feed: [t - self.t0 for t in sorted(expected - {t for t, _ in self.cluster.series(target, feed)})]
                for feed in (self.log, self.kwh)
            }
            raise AssertionError(f"{e}: of {len(expected)}, missing (seconds after t0) in feed: {missing}") from None
        points = self.cluster.series(target, self.log)
        times = [t for t, _ in points]
        # Each once. (The file is in time order whatever order its points came in: the order
        # the packets were processed in shows in the kWh feed, which takes no older packet.)
        test.assertEqual(times, sorted(set(times)))
        test.assertLessEqual(set(times), set(device.sent))  # nothing the device did not send
        test.assertEqual({v for _, v in points}, {float(WATTS)})
        kwh = self.cluster.series(target, self.kwh)
        test.assertEqual([t for t, _ in kwh], times)
        # 0 at the first logged packet (the kWh feed had no point before), then W * dt each.
        test.assertEqual(kwh[0][1], 0.0)
        steps, expected_steps = np.diff([v for _, v in kwh]), WATTS * np.diff(times) / 3.6e6
        test.assertTrue(np.allclose(steps, expected_steps, atol=1e-6), [(t, s) for t, s, e in zip(times[1:], steps, expected_steps) if abs(s - e) > 1e-6])
        for feed in (self.log, self.kwh):
            test.assertEqual(self.cluster.series(source, feed), [])
        row = await self.move_row()
        test.assertEqual(row[0] if row else None, "done")
