"""``emond-admin feed show|verify``, ``queues`` and ``links`` against real processes: a node
(``twistd emond``) hosting storage server 0 and sending to storage server 1 (``twistd
emond-storage``) over mutual TLS, and a private Redis. Feeds get known points through the
API; the expected files are built here from the formats (PHPFina: a 16-byte meta ``<IIII`` 0,
0, interval, start_time and float32 slots, NaN where missing; PHPTimeSeries: 9-byte records
``<BIf`` 249, time, value), never read from emond."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import time

import numpy as np
import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.keys import CONSUMERS, dead_letters, input_stream, lease, storage_stream
from emond.redis import Redis
from tests.support import free_port, redis_server
from tests.support.admin import run_admin
from tests.support.daemon import remote_node_config, remote_storage_config, started
from tests.support.node import NodeHarness
from tests.support.poll import until

LEASE_MS = 1500
INTERVAL = 10
T0 = (int(time.time()) // 86400 - 1) * 86400  # yesterday, 00:00 UTC: a multiple of every interval used here
FINA = [(T0, 1.5), (T0 + 10, 2.25), (T0 + 30, -3.0)]  # the slot of T0 + 20 stays missing
SERIES = [(T0 + 1, 10.5), (T0 + 7, 11.25), (T0 + 100, 12.0)]
WINDOW = 8  # batches a node's link to a storage server sends before one is acknowledged (RemoteLink)


def fina_files(feedid: int, points: list[tuple[int, float]], interval: int = INTERVAL) -> dict[str, bytes]:
    start = points[0][0]
    slots = np.full((points[-1][0] - start) // interval + 1, np.nan, dtype="<f4")
    for when, value in points:
        slots[(when - start) // interval] = value
    return {f"{feedid}.meta": struct.pack("<IIII", 0, 0, interval, start), f"{feedid}.dat": slots.tobytes()}


def series_files(feedid: int, points: list[tuple[int, float]]) -> dict[str, bytes]:
    return {f"feed_{feedid}.MYD": b"".join(struct.pack("<BIf", 249, when, value) for when, value in points)}


class StorageAdminTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        redis_server().flushall()
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.stream_port, self.storage_http, self.http = free_port(), free_port(), free_port()
        self.storage_config = remote_storage_config(self.base, self.stream_port, self.storage_http)
        self.redis_url = f"redis://127.0.0.1:{redis_server().port}/5"
        self.node_config = remote_node_config(
            self.base, self.http, self.stream_port, self.redis_url,
            f"[input]\nqueues = 2\nlease_ms = {LEASE_MS}\nrate_limit = 0.0\n[feeds]\ndefault_server = 1\nread_timeout = 5.0\n",
        )
        self.redis = Redis.connect(self.redis_url, 5.0, reactor)
        self.addCleanup(self.redis.disconnect)
        self.storage = yield self.start_storage()
        self.node = yield started(self, "emond", self.node_config, self.base, "node API ready")
        yield self.node.logged("stream to storage 1 up")
        keys = yield self.call("user/register.json", username="owner", password="secret1", email="o@example.org")
        self.userid, self.key = keys["userid"], keys["apikey_write"]
        self.feeds = {}
        for name, engine, server in (("lfina", 5, 0), ("rfina", 5, 1), ("lts", 2, 0), ("rts", 2, 1)):
            created = yield self.call("feed/create.json", name=name, tag="t", engine=str(engine), datatype="1",
                                      options=json.dumps({"interval": INTERVAL}), server=str(server))
            self.feeds[name] = created["feedid"]
        for name, points in (("lfina", FINA), ("rfina", FINA), ("lts", SERIES), ("rts", SERIES)):
            for when, value in points:
                yield self.call("feed/insert.json", id=str(self.feeds[name]), time=str(when), value=str(value))
        yield self.stored()

    def start_storage(self):
        return started(self, "emond-storage", self.storage_config, self.base, "storage 1 open on", "Site starting on")

    def admin(self, *args: str):
        return run_admin("--config", self.node_config, *args)

    @defer.inlineCallbacks
    def call(self, path, **params):
        params.setdefault("apikey", getattr(self, "key", ""))
        response = yield treq.post(f"http://127.0.0.1:{self.http}/{path}", params=params, persistent=False)
        body = yield response.content()
        self.assertEqual(response.code, 200, (path, body))
        return json.loads(body)

    def stored(self):
        """Every storage queue empty: the points are in the files (remote ones acknowledged)."""
        async def empty() -> bool:
            lengths = await self.redis.pipeline([("XLEN", storage_stream(s)) for s in (0, 1)])
            return not any(int(n) for n in lengths)

        return defer.ensureDeferred(until(empty, 30, "the storage queues drained"))

    def expected(self, name: str) -> dict[str, bytes]:
        feedid = self.feeds[name]
        return fina_files(feedid, FINA) if "fina" in name else series_files(feedid, SERIES)

    def path(self, name: str, filename: str) -> str:
        where = "local" if name.startswith("l") else "remote"
        return os.path.join(self.base, where, "phpfina" if "fina" in name else "phptimeseries", filename)

    def row(self, name: str) -> dict:
        fina = "fina" in name
        return {
            "id": self.feeds[name], "userid": self.userid, "name": name, "tag": "t", "engine": 5 if fina else 2,
            "interval": INTERVAL if fina else 0, "datatype": 1, "public": False, "unit": "",
            "server": 0 if name.startswith("l") else 1, "storage": "hosted" if name.startswith("l") else "remote",
        }

    @defer.inlineCallbacks
    def test_feed_show(self):
        for name in ("lfina", "rfina", "lts", "rts"):
            status, out, err = yield self.admin("feed", "show", str(self.feeds[name]))
            self.assertEqual((status, err), (0, None), name)
            files = {filename: {"size": len(data)} for filename, data in self.expected(name).items()}
            if "fina" in name:
                meta = {"interval": INTERVAL, "start_time": T0, "npoints": 4, "end_time": T0 + 30}
                last = list(FINA[-1])
            else:
                meta = {"npoints": 3, "start_time": SERIES[0][0], "end_time": SERIES[-1][0]}
                last = list(SERIES[-1])
            self.assertEqual(out, {**self.row(name), "files": files, "meta": meta, "last": last}, name)

    @defer.inlineCallbacks
    def test_feed_verify(self):
        for name in ("lfina", "rfina", "lts", "rts"):
            status, out, err = yield self.admin("feed", "verify", str(self.feeds[name]))
            self.assertEqual((status, err), (0, None), name)
            files = {f: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for f, data in self.expected(name).items()}
            self.assertEqual((out["ok"], out["files"], out["problems"]), (True, files, []), name)
        # a torn write on the node's own storage: the data file no longer a whole number of slots
        lfina = self.feeds["lfina"]
        os.truncate(self.path("lfina", f"{lfina}.dat"), 4 * 4 - 2)
        status, out, err = yield self.admin("feed", "verify", str(lfina))
        self.assertEqual((status, out), (1, None))
        problem = f"{lfina}.dat: 14 bytes, not a whole number of 4-byte values (2 bytes over)"
        self.assertEqual((err["ok"], err["problems"]), (False, [problem]))
        self.assertEqual(err["error"], f"feed {lfina}: not consistent: {problem}")
        self.assertEqual(err["files"][f"{lfina}.dat"], {"size": 14, "sha256": hashlib.sha256(self.expected("lfina")[f"{lfina}.dat"][:14]).hexdigest()})
        # on the remote storage server: a meta whose interval disagrees with the database's
        rfina = self.feeds["rfina"]
        with open(self.path("rfina", f"{rfina}.meta"), "r+b") as f:
            f.seek(8)
            f.write(struct.pack("<I", 20))
        status, _, err = yield self.admin("feed", "verify", str(rfina))
        self.assertEqual((status, err["storage"], err["problems"]), (1, "remote", ["the meta's interval is 20 s, the database's 10 s"]))
        # ... and a PHPTimeSeries file with a torn last record and a record out of order
        rts = self.feeds["rts"]
        records = [SERIES[0], SERIES[2], SERIES[1]]
        with open(self.path("rts", f"feed_{rts}.MYD"), "wb") as f:
            f.write(series_files(rts, records)[f"feed_{rts}.MYD"] + b"\xf9\x01\x02")
        status, _, err = yield self.admin("feed", "verify", str(rts))
        self.assertEqual(status, 1)
        self.assertEqual(err["problems"], [
            f"feed_{rts}.MYD: 30 bytes, not a whole number of 9-byte records (3 bytes over: a torn append)",
            f"feed_{rts}.MYD: 1 records not after the one before (the first: record 2, time {SERIES[1][0]} after {SERIES[2][0]})",
        ])

    @defer.inlineCallbacks
    def test_feed_errors(self):
        status, out, err = yield self.admin("feed", "show", "9999")
        self.assertEqual((status, out, err), (1, None, {"error": "no feed 9999"}))
        # a config that does not reach storage server 1
        local_only = os.path.join(self.base, "local-only.toml")
        with open(self.node_config) as f:
            text = f.read()
        with open(local_only, "w") as f:
            f.write(text.split("[storage.servers]")[0].replace("default_server = 1", "default_server = 0"))
        rfina = self.feeds["rfina"]
        status, _, err = yield run_admin("--config", local_only, "feed", "show", str(rfina))
        self.assertEqual((status, err["error"]), (1, f"feed {rfina} is on storage server 1, which this config neither hosts ([node] storage) nor reaches ([storage.servers])"))
        # storage server 1 down: within [feeds] read_timeout (5 s)
        self.storage.signal(signal.SIGKILL)
        yield self.storage.ended
        began = time.monotonic()
        status, _, err = yield self.admin("feed", "show", str(rfina))
        self.assertEqual((status, err["error"]), (1, "storage servers [1]: no stream within 5 s"))
        self.assertLess(time.monotonic() - began, 15)

    @defer.inlineCallbacks
    def test_queues_of_a_running_node(self):
        status, out, err = yield self.admin("queues")
        self.assertEqual((status, err), (0, None))
        shard = out["default"]
        holders = set()
        for kind, labels in (("input", ["0", "1"]), ("storage", ["0", "1"])):
            self.assertEqual(sorted(shard[kind]), labels)
            for label, queue in shard[kind].items():
                self.assertEqual((queue["length"], queue["lag"], queue["dead"]), (0, 0.0, 0), (kind, label))
                held = queue["lease"]
                self.assertTrue(held["holder"].startswith("node0-"), held)  # [node] name
                self.assertTrue(held["token"] >= 1 and 0 < held["ttl"] <= LEASE_MS / 1000, held)
                if kind == "input":
                    holders.add(held["holder"])
        # the one live consumer holds both input queues
        self.assertEqual([c["name"] for c in shard["consumers"]], sorted(holders))
        self.assertTrue(0 < shard["consumers"][0]["expires_in"] <= LEASE_MS / 1000, shard["consumers"])

    @defer.inlineCallbacks
    def test_links(self):
        node_url = f"http://127.0.0.1:{self.http}/"

        @defer.inlineCallbacks
        def links(*more):
            status, out, err = yield self.admin("links", *more)
            self.assertEqual((status, err), (0, None))
            return out

        out = yield links()
        self.assertEqual((out["node"], out["source"], out["process"], out["status"]), (node_url, "node", "emond", "ok"))
        link = out["links"]["1"]
        self.assertIsInstance(link.pop("rtt"), float)  # batches were acknowledged: a round trip measured
        self.assertEqual(out["links"], {"1": {
            "state": "connected", "role": "sender", "window": WINDOW, "unacked": 0, "holding_queue": True, "ok": True, "error": None,
        }})
        # a frozen storage server: the batch sent stays unacknowledged
        os.kill(self.storage.transport.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(self.storage.transport.pid, signal.SIGCONT) if not self.storage.ended.called else None)
        yield self.call("feed/insert.json", id=str(self.feeds["rfina"]), time=str(T0 + 40), value="4")
        seen = {}

        async def waiting() -> bool:
            seen.update((await links())["links"]["1"])
            return seen["unacked"] == 1

        yield defer.ensureDeferred(until(waiting, 30, "one batch unacknowledged"))
        self.assertEqual((seen["state"], seen["ok"]), ("connected", False))  # connected, but not answering
        os.kill(self.storage.transport.pid, signal.SIGCONT)
        yield self.stored()
        # the storage server gone: the node's link is down; this config's own links say so too
        self.storage.signal(signal.SIGKILL)
        yield self.storage.ended

        async def down() -> bool:
            return (await links())["links"]["1"]["state"] == "disconnected"

        yield defer.ensureDeferred(until(down, 30, "the link down"))
        out = yield links("--own", "--timeout", "1")
        self.assertEqual(out["source"], "own")
        self.assertEqual(out["links"]["1"]["state"], "disconnected")
        self.storage = yield self.start_storage()
        out = yield links("--own")
        own = out["links"]["1"]
        self.assertEqual((own["state"], own["server"]["ok"], own["window"], own["unacked"]), ("connected", True, None, None))
        self.assertIsInstance(own["rtt"], float)
        # no node answering
        self.node.signal(signal.SIGTERM)
        yield self.node.ended
        status, out, err = yield self.admin("links")
        self.assertEqual((status, out), (1, None))
        self.assertTrue(err["error"].startswith(f"{node_url}health: no answer"), err)


class QueuesTests(unittest.TestCase):
    """``queues`` on a shard whose queues hold what the test put there (no process reads them)."""

    OLD = 90.0  # seconds: the age of the oldest element of input queue 0

    @defer.inlineCallbacks
    def test_queues(self):
        node = yield NodeHarness.start(self, "sqlite", "[input]\nconsume = false\nqueues = 2\n")
        yield node.stop()  # nothing reads or leases the queues from here on
        redis = Redis.connect(node.config.redis.url, 5.0, reactor)
        self.addCleanup(redis.disconnect)
        began = time.time()
        now_ms = int(began * 1000)
        commands = [
            ("XADD", input_stream(0), f"{now_ms - int(self.OLD * 1000)}-1", "p", "x"),
            ("XADD", input_stream(0), "*", "p", "x"),
            ("XADD", input_stream(1), "*", "p", "x"),
            ("XADD", storage_stream(0), "*", "b", "x"),
            ("XADD", dead_letters(input_stream(1)), "*", "p", "x", "error", "bad"),
            ("XADD", dead_letters(input_stream(1)), "*", "p", "y", "error", "bad"),
            ("SET", lease("in:0"), "node7-abcd:42", "PX", 60_000),
            ("ZADD", CONSUMERS, now_ms + 30_000, "node7-abcd", now_ms - 1000, "node8-gone"),
        ]
        yield defer.ensureDeferred(redis.pipeline(commands))
        status, out, err = yield run_admin("--config", node.config_path, "queues")
        took = time.time() - began
        self.assertEqual((status, err), (0, None))
        shard = out["default"]
        lags = {(kind, q): shard[kind][q].pop("lag") for kind in ("input", "storage") for q in shard[kind]}
        ttl = shard["input"]["0"]["lease"].pop("ttl")
        expires = shard["consumers"][0].pop("expires_in")
        self.assertEqual(shard, {
            "input": {
                "0": {"length": 2, "dead": 0, "lease": {"holder": "node7-abcd", "token": 42}},
                "1": {"length": 1, "dead": 2, "lease": None},
            },
            "storage": {"0": {"length": 1, "dead": 0, "lease": None}},
            "consumers": [{"name": "node7-abcd"}],  # the one whose announcement has not expired
        })
        self.assertTrue(self.OLD - 0.01 <= lags[("input", "0")] <= self.OLD + took + 0.01, lags)
        for key in (("input", "1"), ("storage", "0")):
            self.assertTrue(0 <= lags[key] <= took + 0.01, lags)
        self.assertTrue(60 - took - 0.01 <= ttl <= 60, ttl)
        self.assertTrue(30 - took - 0.01 <= expires <= 30, expires)
