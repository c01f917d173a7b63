"""A node and a remote storage server as real processes over real mutual TLS.

Writes reach the remote files byte-identically; every kind of read gives the
same answer as for the same data on a local feed; the storage server killed
with SIGKILL mid-stream and restarted loses nothing acknowledged; while it is
down the node keeps answering posts and its queue drains when it returns.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess

import numpy as np
import treq
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.config import RemoteServer, TLSSection
from emond.keys import input_stream, storage_stream
from emond.queue import read_head
from emond.records import RECORD
from emond.redis import Redis
from emond.storage.remote import CLOSE_TIMEOUT, LinkMetrics, StreamLink
from tests.support import free_port, redis_server
from tests.support.daemon import ROOT, remote_node_config, remote_storage_config, start_daemon, started
from tests.support.poll import until

T0 = 1_700_000_000
QUEUES = 2


class RemoteStorageTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        redis_server().flushall()
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.stream_port, self.storage_http, self.http = free_port(), free_port(), free_port()
        self.storage_config = remote_storage_config(self.base, self.stream_port, self.storage_http)
        self.node_config = remote_node_config(
            self.base, self.http, self.stream_port, f"redis://127.0.0.1:{redis_server().port}/4",
            f"[input]\nqueues = {QUEUES}\nlease_ms = 1500\nrate_limit = 0.0\n[feeds]\ndefault_server = 1\n",
        )
        self.redis = Redis.connect(f"redis://127.0.0.1:{redis_server().port}/4", 5.0, reactor)
        self.addCleanup(self.redis.disconnect)

    def start_storage(self):
        return started(self, "emond-storage", self.storage_config, self.base, "storage 1 open on", "Site starting on")

    def start_node(self):
        return started(self, "emond", self.node_config, self.base, "node API ready")

    @defer.inlineCallbacks
    def call(self, path, method="POST", raw=False, **params):
        response = yield treq.request(method, f"http://127.0.0.1:{self.http}/{path}", params=params, persistent=False)
        body = yield response.content()
        self.assertEqual(response.code, 200, (path, body))
        return body if raw else (json.loads(body) if body != b"ok" else body)

    @defer.inlineCallbacks
    def drained(self, node, servers=(0, 1)):
        streams = [input_stream(q) for q in range(QUEUES)] + [storage_stream(s) for s in servers]
        while True:
            offset = len(node.output)
            lengths = yield defer.ensureDeferred(self.redis.pipeline([("XLEN", s) for s in streams]))
            if not any(int(n) for n in lengths):
                return
            yield node.logged_after("drained", offset)

    @defer.inlineCallbacks
    def read_requests(self):
        """Read requests the node has sent to storage server 1, by op (its /metrics)."""
        response = yield treq.get(f"http://127.0.0.1:{self.http}/metrics", persistent=False)
        text = (yield response.content()).decode()
        counts = {}
        for line in text.splitlines():
            if line.startswith("emond_stream_read_requests_total{") and 'server="1"' in line:
                op = line.split('op="', 1)[1].split('"', 1)[0]
                counts[op] = float(line.rsplit(" ", 1)[1])
        return counts

    @defer.inlineCallbacks
    def setup_feeds(self, node):
        keys = yield self.call("user/register.json", username="remote", password="secret1", email="r@example.org")
        self.key = keys["apikey_write"]
        self.feeds = {}
        for name, engine, server in (("rfina", 5, 1), ("lfina", 5, 0), ("rts", 2, 1), ("lts", 2, 0)):
            created = yield self.call("feed/create.json", apikey=self.key, name=name, engine=str(engine), options='{"interval":10}', server=str(server))
            self.feeds[name] = created["feedid"]
        yield self.call("input/post.json", apikey=self.key, node="n", csv="0", time=str(T0 - 1000))
        yield self.drained(node)
        inputs = yield self.call("input/list.json", apikey=self.key)
        steps = ",".join(f"1:{self.feeds[n]}" for n in ("rfina", "lfina", "rts", "lts"))
        yield self.call(f"input/process/set.json?inputid={inputs[0]['id']}", apikey=self.key, processlist=steps)

    def post_bulk(self, b):
        frames = [[10 * (10 * b + i) + (i % 3), "n", round(100 + (b * 10 + i) * 1.5, 1)] for i in range(10)]
        return self.call("input/bulk.json", apikey=self.key, data=json.dumps(frames), time=str(T0))

    def files(self, feed, engine, where):
        names = [f"{feed}.meta", f"{feed}.dat"] if engine == 5 else [f"feed_{feed}.MYD"]
        folder = "phpfina" if engine == 5 else "phptimeseries"
        out = {}
        for name in names:
            with open(os.path.join(self.base, where, folder, name), "rb") as f:
                out[name] = f.read()
        return out

    def assertRemoteEqualsLocal(self):
        """The remote feeds' files are byte-identical to the local ones written from the same packets."""
        for remote, local, engine in (("rfina", "lfina", 5), ("rts", "lts", 2)):
            ours = list(self.files(self.feeds[remote], engine, "remote").values())
            theirs = list(self.files(self.feeds[local], engine, "local").values())
            self.assertEqual(ours, theirs, remote)

    @defer.inlineCallbacks
    def test_remote_writes_and_reads_match_local(self):
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.setup_feeds(node)
        for b in range(20):
            yield self.post_bulk(b)
        yield self.drained(node)
        self.assertRemoteEqualsLocal()
        start, end = (T0 - 100) * 1000, (T0 + 2100) * 1000
        days = dict(start=T0 - 86400 * 40, end=T0 + 86400 * 3, timezone="Europe/London")
        reads = [
            ("feed/data.json", dict(start=start, end=end, interval=30)),
            ("feed/data.json", dict(start=start, end=end, interval=10, skipmissing=1, timeformat="unix")),
            ("feed/data.json", dict(start=T0 - 100, end=T0 + 2100, interval=60, average=1, dp=1)),
            ("feed/data.json", dict(start=T0 - 100, end=T0 + 2100, interval=60, delta=1, limitinterval=1)),
            ("feed/data.json", dict(start=T0, end=T0 + 600, interval=10, csv=1, timeformat="excel")),
            ("feed/average.json", dict(start=start, end=end, interval=60)),
            ("feed/value.json", {}),
            ("feed/value.json", dict(time=T0 + 505)),
            ("feed/timevalue.json", {}),
            ("feed/getmeta.json", {}),
            ("feed/export.json", dict(start=0)),
        ]
        for interval in ("daily", "weekly", "monthly", "annual"):
            reads += [("feed/data.json", dict(interval=interval, **days)), ("feed/average.json", dict(interval=interval, **days))]
        for remote, local in (("rfina", "lfina"), ("rts", "lts")):
            r, lo = self.feeds[remote], self.feeds[local]
            for path, params in reads:
                a = yield self.call(path, "GET", raw=True, id=str(r), apikey=self.key, **params)
                b = yield self.call(path, "GET", raw=True, id=str(lo), apikey=self.key, **params)
                self.assertEqual(a, b, (remote, path, params))
        # refusals found by the storage server read the same as local ones (a DMY read past the row cap)
        refusals = []
        for feed in (self.feeds["rfina"], self.feeds["lfina"]):
            response = yield treq.get(
                f"http://127.0.0.1:{self.http}/feed/data.json",
                params=dict(id=str(feed), apikey=self.key, start="0", end=str(2**35), interval="daily"),
                persistent=False,
            )
            body = yield response.json()
            self.assertEqual(response.code, 400)
            self.assertTrue(body["message"].startswith("request datapoint limit reached (20000)"), body)
            refusals.append(body)
        self.assertEqual(refusals[0], refusals[1])
        split = dict(interval="daily", split="[0,6,12.5]", **days)
        a = yield self.call("feed/data.json", "GET", raw=True, id=str(self.feeds["rfina"]), apikey=self.key, **split)
        b = yield self.call("feed/data.json", "GET", raw=True, id=str(self.feeds["lfina"]), apikey=self.key, **split)
        self.assertEqual(a, b)
        both = yield self.call("feed/data.json", "GET", ids=f"{self.feeds['rfina']},{self.feeds['lfina']}", apikey=self.key, start=start, end=end, interval=30)
        self.assertEqual(both[0]["data"], both[1]["data"])
        listed = yield self.call("feed/list.json", "GET", apikey=self.key)
        by_id = {int(f["id"]): f for f in listed}
        for remote, local in (("rfina", "lfina"), ("rts", "lts")):
            ours, theirs = by_id[self.feeds[remote]], by_id[self.feeds[local]]
            self.assertEqual({k: ours[k] for k in ("size", "time", "value", "disk_time", "disk_value")}, {k: theirs[k] for k in ("size", "time", "value", "disk_time", "disk_value")})
        # ONE stream request per API read, whatever the read: a year of days, averaged, is one query
        rfina = str(self.feeds["rfina"])
        year = dict(start=T0 - 86400 * 365, end=T0 + 86400, timezone="Europe/London")
        for path, params, op in (
            ("feed/data.json", dict(interval="daily", **year), "query"),
            ("feed/average.json", dict(interval="daily", **year), "query"),
            ("feed/data.json", dict(interval="weekly", split="[0,7,13]", **year), "query"),
            ("feed/data.json", dict(interval="daily", delta=1, **year), "query"),
            ("feed/data.json", dict(start=T0, end=T0 + 86400 * 2, interval=10, csv=1), "query"),
            ("feed/value.json", dict(time=T0 + 505), "value_at"),
            ("feed/list.json", {}, "summaries"),
        ):
            before = yield self.read_requests()
            yield self.call(path, "GET", raw=True, id=rfina, apikey=self.key, **params)
            after = yield self.read_requests()
            self.assertEqual({k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}, {op: 1}, (path, params))
        health = yield treq.get(f"http://127.0.0.1:{self.storage_http}/health", persistent=False)
        self.assertEqual(health.code, 200)
        yield treq.content(health)
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_reads_time_out_and_fail_clearly(self):
        """A storage server that does not answer a read is a 504 after [feeds] read_timeout;
        one that is not connected a 503; neither holds the node up."""
        with open(self.node_config) as f:
            text = f.read()
        with open(self.node_config, "w") as f:
            f.write(text.replace("default_server = 1\n", "default_server = 1\nread_timeout = 1.0\n"))
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.setup_feeds(node)
        yield self.post_bulk(0)
        yield self.drained(node)
        rfina = str(self.feeds["rfina"])
        params = dict(id=rfina, apikey=self.key, start=str(T0 - 100), end=str(T0 + 200), interval="10")
        storage.transport.signalProcess(signal.SIGSTOP)  # alive, connected, silent
        try:
            response = yield treq.get(f"http://127.0.0.1:{self.http}/feed/data.json", params=params, persistent=False)
            body = yield response.json()
            self.assertEqual((response.code, body), (504, {"success": False, "message": "storage server 1 did not answer in 1 s"}))
            # the local feed is still served meanwhile
            local = yield self.call("feed/data.json", "GET", **{**params, "id": str(self.feeds["lfina"])})
            self.assertEqual(len(local), 31)
        finally:
            storage.transport.signalProcess(signal.SIGCONT)
        answer = yield self.call("feed/data.json", "GET", **params)  # answered again once it runs
        self.assertEqual(len(answer), 31)
        offset = len(node.output)
        yield storage.signal(signal.SIGKILL)
        yield node.logged_after("stream to storage 1 down", offset)
        response = yield treq.get(f"http://127.0.0.1:{self.http}/feed/data.json", params=params, persistent=False)
        body = yield response.json()
        self.assertEqual((response.code, body), (503, {"success": False, "message": "storage server 1 is not connected"}))
        yield node.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_a_link_stops_even_while_its_server_hangs(self):
        """A TLS connection closes once the server answers the close: a server that hangs
        (frozen here) must not hold the link's stop, and with it a node's shutdown or
        emond-admin's exit, for ever."""
        storage = yield self.start_storage()
        link = StreamLink(
            1, RemoteServer(endpoint=f"tcp:127.0.0.1:{self.stream_port}", name="storage1"),
            TLSSection(ca=os.path.join(self.base, "tls", "ca.pem"), cert=os.path.join(self.base, "tls", "node0.pem")),
            "node0", LinkMetrics(CollectorRegistry()), reactor,
        )
        link.startService()
        yield defer.ensureDeferred(until(lambda: link.protocol is not None, 30, "the stream up"))
        storage.transport.signalProcess(signal.SIGSTOP)  # alive, connected, silent
        self.addCleanup(storage.transport.signalProcess, signal.SIGCONT)
        began = reactor.seconds()
        yield defer.ensureDeferred(link.stopService()).addTimeout(CLOSE_TIMEOUT + 10, reactor)
        self.assertLess(reactor.seconds() - began, CLOSE_TIMEOUT + 2)

    @defer.inlineCallbacks
    def test_storage_killed_and_down_loses_nothing(self):
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.setup_feeds(node)
        for b in range(10):
            yield self.post_bulk(b)
        yield storage.signal(signal.SIGKILL)  # mid-stream: batches may be in flight
        # the node keeps answering posts while its storage server is down; that queue grows
        for b in range(10, 20):
            answer = yield self.post_bulk(b)
            self.assertEqual(answer, b"ok")
        # Wait for the input queues to empty, following "drained" lines logged after now
        # (an offset of 0 matched the lines of the set-up and waited for nothing).
        yield self.drained(node, servers=())
        # Every record of bulks 10..19 for the two remote feeds waits in storage queue 1,
        # exactly as posted: time T0 + 10 * (10b + i) + i % 3, value 100 + 1.5 (10b + i).
        entries = yield defer.ensureDeferred(read_head(self.redis, storage_stream(1), None, 100_000))
        records = np.concatenate([np.frombuffer(fields[b"b"], dtype=RECORD) for _, fields in entries])
        late = records[records["time"] >= T0 + 1000]  # bulks 0..9 may still be there too, unacknowledged
        expected = [
            (self.feeds[name], T0 + 10 * (10 * b + i) + i % 3, 100 + 1.5 * (10 * b + i), engine)
            for b in range(10, 20) for i in range(10) for name, engine in (("rfina", 5), ("rts", 2))
        ]
        got = list(zip(late["feed"].tolist(), late["time"].tolist(), late["value"].tolist(), late["engine"].tolist()))
        self.assertEqual(sorted(got), sorted(expected))
        storage = yield self.start_storage()
        yield self.drained(node)
        self.assertRemoteEqualsLocal()
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_full_disk_acknowledges_nothing_and_recovers(self):
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.setup_feeds(node)
        for b in range(5):
            yield self.post_bulk(b)
        yield self.drained(node)
        # The storage process may no longer grow any file past 64 bytes: appends fail with EFBIG.
        pid = str(storage.transport.pid)
        subprocess.run(["prlimit", "--pid", pid, "--fsize=64:unlimited"], check=True)
        offset = len(storage.output)
        for b in range(5, 10):
            answer = yield self.post_bulk(b)
            self.assertEqual(answer, b"ok")
        yield storage.logged_after("not applied", offset)
        health = yield treq.get(f"http://127.0.0.1:{self.storage_http}/health", persistent=False)
        body = yield health.json()
        self.assertEqual(health.code, 503)
        self.assertTrue(body["stream"]["disk_error"])
        waiting = yield defer.ensureDeferred(self.redis.call("XLEN", storage_stream(1)))
        self.assertGreater(int(waiting), 0)  # nothing acknowledged: still queued
        subprocess.run(["prlimit", "--pid", pid, "--fsize=unlimited:unlimited"], check=True)
        yield self.drained(node)
        self.assertRemoteEqualsLocal()
        health = yield treq.get(f"http://127.0.0.1:{self.storage_http}/health", persistent=False)
        self.assertEqual(health.code, 200)
        yield treq.content(health)
        yield node.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_sending_node_killed_another_takes_over(self):
        storage = yield self.start_storage()
        node = yield self.start_node()
        yield node.logged("stream to storage 1 up")
        yield self.setup_feeds(node)
        # a second node, hosting no storage, sharing Redis, the database and the remote server
        with open(self.node_config) as f:
            text = f.read()
        second_http = free_port()
        text = text.replace(f"tcp:{self.http}:", f"tcp:{second_http}:").replace("storage = [0]", "storage = []")
        second_config = os.path.join(self.base, "node2.toml")
        with open(second_config, "w") as f:
            f.write(text)
        second = start_daemon("emond", second_config, self.base)
        self.addCleanup(second.signal, signal.SIGKILL)
        yield second.logged("node API ready")
        yield second.logged("stream to storage 1 up")
        posted = []
        for b in range(20):
            frames = [[10 * (10 * b + i) + (i % 3), "n", round(100 + (b * 10 + i) * 1.5, 1)] for i in range(10)]
            posted += [(T0 + t, v) for t, _, v in frames]
            yield self.call("input/bulk.json", apikey=self.key, data=json.dumps(frames), time=str(T0))
            if b == 9:
                yield node.signal(signal.SIGKILL)  # the sender holding the storage queue dies mid-stream
                self.http = second_http  # posts go to the survivor from now on
        yield self.drained(second, servers=(1,))  # server 0 died with the first node
        # the remote files hold every posted point, in order, in emoncms's formats (worked by hand):
        # point n = 10b + i is at T0 + 10n + i % 3 with value 100 + 1.5n; PHPFina (interval 10,
        # start T0) puts it in slot n as a float32; PHPTimeSeries appends a <BIf record, marker 249.
        self.assertEqual([(t, v) for t, v in posted], [(T0 + 10 * n + n % 10 % 3, 100 + 1.5 * n) for n in range(200)])
        fina = {
            f"{self.feeds['rfina']}.meta": struct.pack("<IIII", 0, 0, 10, T0),
            f"{self.feeds['rfina']}.dat": struct.pack("<200f", *[100 + 1.5 * n for n in range(200)]),
        }
        myd = b"".join(struct.pack("<BIf", 249, T0 + 10 * n + n % 10 % 3, 100 + 1.5 * n) for n in range(200))
        self.assertEqual(self.files(self.feeds["rfina"], 5, "remote"), fina)
        self.assertEqual(self.files(self.feeds["rts"], 2, "remote"), {f"feed_{self.feeds['rts']}.MYD": myd})
        yield second.signal(signal.SIGTERM)
        yield storage.signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_storage_process_refuses_strangers_before_any_frame(self):
        """Against the real storage process: another CA, a name not on allow, plain TCP."""
        from twisted.internet import endpoints
        from twisted.internet.protocol import Factory

        from emond.stream import HELLO, batch_frame, client_tls, encode_json
        from emond.records import make_records
        from tests.support.streamclient import Client

        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), os.path.join(self.base, "tls"), "intruder"], check=True, capture_output=True)
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), os.path.join(self.base, "rogue"), "node0"], check=True, capture_output=True)
        storage = yield self.start_storage()
        for folder, name in (("rogue", "node0"), ("tls", "intruder"), (None, None)):
            client = Client()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.stream_port)
            if folder is not None:
                tls = os.path.join(self.base, folder)
                endpoint = endpoints.wrapClientTLS(client_tls(os.path.join(tls, "ca.pem"), os.path.join(tls, f"{name}.pem"), "storage1"), endpoint)
            try:
                yield endpoint.connect(Factory.forProtocol(lambda: client))
            except Exception:
                continue  # refused during the handshake
            client.send(encode_json(HELLO, {"version": 1, "name": name or "plain"}))
            client.send(batch_frame(1, 1, make_records(1, [T0], [1.0]).tobytes()))
            yield client.lost
            self.assertEqual(client.frames, [], folder)  # not even the hello was answered
        response = yield treq.get(f"http://127.0.0.1:{self.storage_http}/metrics", persistent=False)
        text = (yield response.content()).decode()
        self.assertIn("emond_stream_batches_applied_total 0.0", text)
        refused = [line for line in text.splitlines() if line.startswith("emond_stream_tls_refused_total")]
        self.assertGreaterEqual(float(refused[0].split()[1]), 2.0)  # the other-CA client may fail before the server counts
        yield storage.signal(signal.SIGTERM)
