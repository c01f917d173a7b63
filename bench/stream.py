"""Stream benchmark: points/s from a node's storage queue over one TLS connection into files.

Run: ``python bench/stream.py [--batches 20] [--feeds 1000] [--points 100]``. Prints figures;
it is not a test.

Starts a private redis-server and a real ``twistd -n emond-storage`` (mutual
TLS, certificates from ``etc/make-certs``, sync on: one fsync pass per batch).
The node side runs in this process: the storage queue ``emond:st:1`` is
filled with ``--batches`` RECORD batches of ``--feeds`` × ``--points`` points
(what input consumers append), the feeds are created on the server over the
stream, then a ``RemoteLink`` (the node's real sender) is started and timed
until every batch is acknowledged and removed from the queue. The files are
then checked against what was sent. Each run also prints the CPU time of the
storage server, the node process and Redis per point (steadier than the rate
on a shared box); ``--profile DIR`` samples both ends with py-spy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _harness import HOST, ROOT, TWISTD, Harness, Server, cpu_seconds, free_port, report  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from emond.config import RemoteServer, TLSSection  # noqa: E402
from emond.keys import lease, storage_queue, storage_seq, storage_stream  # noqa: E402
from emond.queue import APPEND_SEQ, Scripts  # noqa: E402
from emond.records import make_records  # noqa: E402
from emond.redis import Redis  # noqa: E402
from emond.storage.remote import FRAME_BYTES, FRAME_ENTRIES, LinkMetrics, RemoteLink  # noqa: E402

NOW = int(time.time()) // 10 * 10
TARGET = 1_000_000  # the first target
GOAL = 3_000_000  # points/s (issue 14)


class NoRefusals:
    async def record(self, refusals):
        raise AssertionError(f"the storage server refused {len(refusals)} points")


async def run(reactor, args) -> None:
    harness = Harness("stream")
    try:
        redis_server, redis_port = harness.redis(cpu="1")
        tls = harness.dir("tls")
        subprocess.run([os.path.join(ROOT, "etc", "make-certs"), tls, "node0", "storage1"], check=True, capture_output=True)
        d = harness.dir("storage")
        port, http = free_port(), free_port()
        config = os.path.join(d, "storage.toml")
        with open(config, "w") as f:
            f.write(
                f'[storage]\nid = 1\nlisten = "tcp:{port}:interface={HOST}"\nhttp = "tcp:{http}:interface={HOST}"\n'
                f'datadir = "data"\nallow = ["node0"]\n[tls]\nca = "{tls}/ca.pem"\ncert = "{tls}/storage1.pem"\n'
            )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = ["taskset", "-c", "0", sys.executable, "-c", TWISTD, "-n", "--pidfile=", "emond-storage", "--config", config]
        server = Server("emond-storage", argv, d, [b"storage 1 open on", b"Site starting on"], env=env)
        harness.servers.append(server)

        url = f"redis://{HOST}:{redis_port}/0"
        redis = Redis.connect(url, 10.0, reactor)
        scripts = Scripts(redis)
        feeds = np.arange(1, args.feeds + 1)
        first = NOW - (args.batches + 1) * args.points * 10

        async def enqueue(batch) -> None:
            await scripts.run(APPEND_SEQ, [storage_stream(1), storage_seq(1)], [batch.tobytes()])

        # Each feed's first write is slower (its start is recorded crash-safely): not timed.
        await enqueue(make_records(feeds, np.full(args.feeds, first), np.zeros(args.feeds)))
        link = RemoteLink(
            1,
            RemoteServer(endpoint=f"tcp:{HOST}:{port}", name="storage1"),
            TLSSection(ca=f"{tls}/ca.pem", cert=f"{tls}/node0.pem"),
            "node0",
            redis,
            Redis.connect(url, 10.0, reactor, poolsize=1),
            NoRefusals(),
            LinkMetrics(CollectorRegistry()),
            reactor,
            window=args.window,
            batch=args.entries,
            frame_bytes=args.frame_bytes,
        )
        # Hold the sender back until the feeds exist: create them over the stream first.
        await redis.call("SET", lease(storage_queue(1)), "someone-else:999999", "PX", 60_000)
        link.startService()
        await link._ready
        for feedid in feeds.tolist():
            await link.request("create", feedid, 5, 10)
        warm = link.idle()
        await redis.call("DEL", lease(storage_queue(1)))
        await warm
        profilers = profile(args.profile, {"server": server.pid, "node": os.getpid()}) if args.profile else []
        if profilers:
            await task.deferLater(reactor, 2.0, lambda: None)  # py-spy attaches
        total = 0
        committed = [0]
        done: defer.Deferred[float] = defer.Deferred()
        commit = link._commit

        async def counted(ids, records, refusals) -> None:
            # The end of the timed part: the last batch acknowledged and removed from the queue
            # (``link.idle()`` fires only after the reader's next XREAD BLOCK times out).
            await commit(ids, records, refusals)
            committed[0] += len(ids) if isinstance(ids, list) else 1
            if committed[0] == args.batches:
                done.callback(time.perf_counter())

        link._commit = counted
        pids = {"storage server": server.pid, "node (sender and the appends)": os.getpid(), "redis": redis_server.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        for b in range(args.batches):
            times = first + (1 + b * args.points + np.arange(args.points)) * 10
            batch = make_records(np.tile(feeds, args.points), np.repeat(times, args.feeds), np.random.rand(args.feeds * args.points))
            await enqueue(batch)
            total += batch.shape[0]
        appended = time.perf_counter() - started
        last_batch = batch
        print(f"{args.batches} batches of {args.feeds:,} feeds x {args.points} points = {total:,} points; "
              f"window {args.window} batches, sync on; timed from the first append to the last batch acknowledged and removed from the queue", flush=True)
        elapsed = await done - started
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        for p in profilers:
            p.send_signal(signal.SIGINT)
            p.wait()
        rate = total / elapsed
        print(f"applied and acknowledged: {total:,} points in {elapsed:.2f} s = {rate:,.0f} points/s "
              f"(target >= {TARGET:,}); {total * 14 / elapsed / 1e6:.1f} MB/s of records over TLS; "
              f"the appends took {appended:.2f} s of it", flush=True)
        # CPU per point: less sensitive than the rate to other work on the box (the rate waits for a CPU).
        print("CPU over the timed part: " + "; ".join(f"{name} {c:.2f} s = {c / total * 1e9:,.0f} ns/point" for name, c in cpu.items()))
        # Check the last batch's values landed.
        data = np.fromfile(os.path.join(d, "data", "phpfina", f"{args.feeds}.dat"), dtype="<f4")
        expected = last_batch["value"][last_batch["feed"] == args.feeds]
        ok = np.array_equal(data[-args.points :], expected)
        print(f"last batch on disk: {'verified' if ok else 'MISMATCH'}; {data.shape[0]} slots in feed {args.feeds}")
        if not ok:
            raise SystemExit("FAIL: the last batch is not on disk as sent")
        report("stream over TLS, one connection, applied and acknowledged", rate, "points/s", GOAL, "goal",
               note=f"{args.batches} x {args.feeds * args.points:,} points, sync on; storage server "
                    f"{cpu['storage server'] / total * 1e9:,.0f} ns CPU/point")
        await link.idle()
        await link.stopService()
        await redis.disconnect()
    finally:
        harness.close()




def profile(directory: str, pids: dict[str, int]) -> list[subprocess.Popen]:
    """py-spy sampling each process (every thread, idle ones left out) into ``directory``/<name>.txt
    (collapsed stacks), until sent SIGINT."""
    os.makedirs(directory, exist_ok=True)
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return [
        subprocess.Popen([spy, "record", "--pid", str(pid), "--threads", "--nonblocking", "--rate", "200", "--format", "raw",
                          "--output", os.path.join(directory, f"{name}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, pid in pids.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--feeds", type=int, default=1000)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--window", type=int, default=4, help="batch frames unacknowledged at most")
    parser.add_argument("--entries", type=int, default=FRAME_ENTRIES, help="queue entries joined in one frame at most")
    parser.add_argument("--frame-bytes", type=int, default=FRAME_BYTES, help="bytes of records joined in one frame")
    parser.add_argument("--profile", metavar="DIR", help="sample both ends with py-spy (pip install py-spy) over the timed part")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
