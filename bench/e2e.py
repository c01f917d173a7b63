"""End-to-end benchmark: datapoints/s from ``input/bulk`` posts to values in PHPFina files, all verified.

Run: ``python bench/e2e.py [--feeds 20] [--points 1000000] [--clients 8] [--shape single|split|split-store|two] [--profile]``.
Prints figures; it is not a test.

One node on this machine (nothing pinned): a private redis-server (free
port, temp dir, no persistence: ``--save '' --appendonly no``) and a real
``twistd -n emond`` (temp config: free port, temp datadir, SQLite,
``[input] rate_limit = 0.0``, engines' ``sync = true`` as by default). A user
gets F PHPFina feeds (interval 10 s) and F inputs "1".."F" on node "e2e",
input i logging to feed i (process list ``1:<feedid>``). Then K concurrent
treq clients post bulk bodies of 100 frames × F values, consecutive 10 s
times in the past week, until ``--points`` datapoints are accepted. The
clock runs from the first post until every input queue ``emond:in:<q>`` and
the storage queue ``emond:st:0`` are empty (Redis polled every 20 ms); then
every feed's ``.dat`` is read with numpy and every value compared with what
was posted (exact: the values are multiples of 0.25 below 2^18, exact in
float32).

``--shape`` chooses how the work is spread over processes (nothing pinned: the
two cores are the kernel's to share):

- ``single``: the one node accepts, consumes and stores (the shape of the
  figures before issue 14);
- ``split``: a front node that only accepts (``[input] consume = false``) and
  hosts the storage (``[node] storage = [0]``: its sender writes the files),
  and a consumer-only ``twistd emond`` (``storage = []``), as ``bench/ingest.py --split``;
- ``split-store``: the front only accepts (``storage = []``); the consumer
  process also hosts the storage (feeds are created through its API);
- ``two``: two whole nodes on one port (``[node] reuse_port = true``: the
  kernel spreads the clients' connections), both accepting and consuming
  (one user: one input queue, so one of them holds it at a time); the first
  hosts the storage. The default: what the two cores do best (bench/README.md,
  "Issue 14: end to end").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import struct
import sys
import time
import urllib.parse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    HOST, QUEUES, Harness, Redis, call, cpu_seconds, described, free_port, register, report, start_profile, stop_profile,
    wait_drained,
)
from emond.keys import input_queue, lease  # noqa: E402

TARGET = 250_000  # datapoints/s, end to end on 2 cores (issue 14; the first target was 50,000)
INTERVAL = 10
NODE = "e2e"


def value(feed: int, slot: np.ndarray) -> np.ndarray:
    """The value posted for feed index ``feed`` (0-based) at slot ``slot``: exact in float32."""
    return ((slot * 7919 + feed * 104729) % (1 << 20)) / 4.0


def bodies(key: str, feeds: int, frames: int, requests: int, t0: int) -> list[bytes]:
    """Request bodies: request r carries slots r*frames .. r*frames+frames-1 of every feed."""
    out = []
    for r in range(requests):
        slots = np.arange(r * frames, (r + 1) * frames)
        columns = [value(f, slots).tolist() for f in range(feeds)]
        data = [[i * INTERVAL, NODE, *(columns[f][i] for f in range(feeds))] for i in range(frames)]
        text = json.dumps(data, separators=(",", ":"))
        out.append(urllib.parse.urlencode({"data": text, "time": str(t0 + r * frames * INTERVAL), "apikey": key}).encode())
    return out


def post_all(port: int, payloads: list[bytes], clients: int) -> tuple[float, float, int]:
    """Post every payload with ``clients`` concurrent treq clients; (start, all acknowledged, bad answers)."""
    import treq
    from twisted.internet import defer
    from twisted.python.failure import Failure
    from twisted.web.client import HTTPConnectionPool

    url = f"http://{HOST}:{port}/input/bulk.json".encode()
    times: dict[str, float] = {}
    bad: list[str] = []

    async def worker(reactor: object, pool: HTTPConnectionPool, work: "list[bytes]") -> None:
        while work and not bad:
            body = work.pop()
            response = await treq.post(url, data=body, headers={b"Content-Type": [b"application/x-www-form-urlencoded"]}, pool=pool)
            answer = await response.content()
            if response.code != 200 or answer != b"ok":
                bad.append(f"{response.code} {answer[:300]!r}")

    async def run(reactor: object) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = clients
        work = list(reversed(payloads))  # pop() from the end: in time order
        times["start"] = time.monotonic()
        await defer.gatherResults([defer.ensureDeferred(worker(reactor, pool, work)) for _ in range(clients)], consumeErrors=True)
        times["acked"] = time.monotonic()
        await pool.closeCachedConnections()

    from twisted.internet import reactor

    outcome: list[object] = []
    d = defer.ensureDeferred(run(reactor))
    d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]  (not task.react: it calls sys.exit)
    if outcome and isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    if bad:
        raise SystemExit(f"FAIL: {len(bad)} bulk posts not answered 200 'ok', e.g. {bad[0]}")
    return times["start"], times["acked"], len(bad)


def wait_shared(redis: Redis, consumers: int, timeout: float = 60.0) -> float:
    """Wait until the input queues' leases are spread evenly over ``consumers`` readers (a
    reader joining takes its share within two lease renewals); the seconds it took."""
    began = time.monotonic()
    while True:
        holders = redis.pipeline([("GET", lease(input_queue(q))) for q in range(QUEUES)])
        owners = collections.Counter(h.rsplit(b":", 1)[0] for h in holders if h is not None)
        if sum(owners.values()) == QUEUES and len(owners) == consumers and max(owners.values()) == -(-QUEUES // consumers):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise SystemExit(f"the input queues' leases did not settle over {consumers} consumers: {dict(owners)}")
        time.sleep(0.1)




def verify(datadir: str, feedids: list[int], slots: int, t0: int) -> tuple[int, list[str]]:
    """Every value of every feed against what was posted: (values checked, problems)."""
    problems: list[str] = []
    checked = 0
    for f, feedid in enumerate(feedids):
        path = os.path.join(datadir, "phpfina", f"{feedid}")
        try:
            with open(path + ".meta", "rb") as m:
                _, _, interval, start = struct.unpack("<IIII", m.read(16).ljust(16, b"\0"))
            data = np.fromfile(path + ".dat", dtype="<f4")
        except OSError as e:
            problems.append(f"feed {feedid}: {e}")
            continue
        if interval != INTERVAL:
            problems.append(f"feed {feedid}: interval {interval}, not {INTERVAL}")
            continue
        nans = int(np.isnan(data).sum())
        if nans:
            problems.append(f"feed {feedid}: {nans} NaN slots")
        first = (t0 - start) // INTERVAL  # index of the first posted slot in the file
        if start != t0 or data.shape[0] != slots:
            problems.append(f"feed {feedid}: start {start} and {data.shape[0]} slots, expected {t0} and {slots}")
        lo, hi = max(first, 0), min(first + slots, data.shape[0])
        if hi - lo < slots:
            problems.append(f"feed {feedid}: {slots - max(0, hi - lo)} posted slots missing from the file")
        if hi > lo:
            got = data[lo:hi]
            want = value(f, np.arange(lo - first, hi - first)).astype("<f4")
            wrong = int(np.count_nonzero(got != want))
            checked += hi - lo
            if wrong:
                at = int(np.flatnonzero(got != want)[0])
                problems.append(f"feed {feedid}: {wrong} values differ, first at slot {lo + at}: {got[at]} != {want[at]}")
    return checked, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--feeds", type=int, default=20)
    parser.add_argument("--points", type=int, default=1_000_000, help="datapoints to post (rounded up to whole requests)")
    parser.add_argument("--frames", type=int, default=100, help="frames per bulk request")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--shape", choices=("single", "split", "split-store", "two"), default="two",
                        help="processes: one node; a front + a consumer (storage in the front, or in the consumer); two whole nodes")
    parser.add_argument("--profile", action="store_true", help="py-spy record emond from the first post until drained")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, raw profiles)")
    args = parser.parse_args()
    feeds, frames = args.feeds, args.frames
    requests = -(-args.points // (feeds * frames))
    slots = requests * frames
    total = slots * feeds
    now = int(time.time())
    t0 = (now - 7 * 86400) // INTERVAL * INTERVAL
    if t0 + slots * INTERVAL > now:
        t0 = (now - slots * INTERVAL - 86400) // INTERVAL * INTERVAL
    commit = described()
    print(f"emond {commit}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)

    harness = Harness("e2e")
    redis = None
    try:
        redis_server, redis_port = harness.redis()
        shape = args.shape
        front_storage = "[]" if shape == "split-store" else "[0]"
        shared = "reuse_port = true\n" if shape == "two" else ""
        node, port, datadir = harness.emond(redis_port, extra="consume = false\n" if shape.startswith("split") else "",
                                            storage=front_storage, port=free_port(), node_extra=shared)
        processes = [("emond", node)]  # (role, server) of every twistd, for the profile
        api = port  # where feeds are created: the process hosting storage 0

        def second() -> None:
            nonlocal processes, api, datadir
            other, other_port, other_datadir = harness.emond(redis_port, consumer_of=datadir,
                                                             storage="[0]" if shape == "split-store" else "[]",
                                                             port=port if shape == "two" else None, node_extra=shared)
            processes = [("front" if shape != "two" else "node 1", node), ("consumer" if shape != "two" else "node 2", other)]
            if shape == "split-store":
                api, datadir = other_port, other_datadir

        if shape.startswith("split"):
            second()
        redis = Redis(redis_port)
        key = register(port)
        feedids = []
        for f in range(feeds):
            answer = call(api, "feed/create.json", apikey=key, name=f"e2e{f + 1}", engine="5", options='{"interval":10}')
            if not isinstance(answer, dict) or not answer.get("success"):
                raise SystemExit(f"feed/create.json failed: {answer!r}")
            feedids.append(int(answer["feedid"]))
        answer = call(port, "input/post.json", apikey=key, node=NODE, csv=",".join(str(f + 1) for f in range(feeds)))
        if answer != b"ok":
            raise SystemExit(f"input/post.json failed: {answer!r}")
        deadline = time.monotonic() + 60
        while True:
            inputs = {i["name"]: int(i["id"]) for i in call(port, "input/list.json", apikey=key) if i["nodeid"] == NODE}
            if len(inputs) == feeds:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the inputs did not appear: {sorted(inputs)}")
            time.sleep(0.1)
        for f in range(feeds):
            answer = call(port, f"input/process/set.json?inputid={inputs[str(f + 1)]}", apikey=key, processlist=f"1:{feedids[f]}")
            if not isinstance(answer, dict) or not answer.get("success"):
                raise SystemExit(f"input/process/set.json failed: {answer!r}")
        wait_drained(redis, 60)
        if shape == "two":  # now: on the shared port, feed/create could reach the node without storage
            second()
            wait_drained(redis, 60)
            print(f"two: the input queues' leases settled over both nodes in {wait_shared(redis, 2):.1f} s", flush=True)
        built = time.monotonic()
        payloads = bodies(key, feeds, frames, requests, t0)
        print(f"{shape}: " + ", ".join(f"{role} pid {server.pid}" for role, server in processes) + f" on :{port}; {feeds} feeds; {requests} bulk requests of {frames} frames x {feeds} values "
              f"({sum(map(len, payloads)) / len(payloads):,.0f} bytes each, built in {time.monotonic() - built:.1f} s); "
              f"{total:,} datapoints, {args.clients} clients", flush=True)

        spies = [(role, start_profile(server.pid, os.path.join(harness.base, f"profile-{n}.txt")), os.path.join(harness.base, f"profile-{n}.txt"))
                 for n, (role, server) in enumerate(processes)] if args.profile else []
        counted = [*processes, ("redis-server", redis_server)]
        cpu_before = [cpu_seconds(server.pid) for _role, server in counted] + [cpu_seconds()]
        began, acked, _ = post_all(port, payloads, args.clients)
        drained_after = wait_drained(redis, 1800, poll=0.02)
        done = time.monotonic()
        cpu = [after - before for after, before in zip([cpu_seconds(server.pid) for _role, server in counted] + [cpu_seconds()], cpu_before)]
        summaries = [(role, stop_profile(spy, out)) for role, spy, out in spies]

        checked, problems = verify(datadir, feedids, slots, t0)
        accepted_rate = total / (acked - began)
        e2e_rate = total / (done - began)
        print("\nRESULTS")
        print(f"  accepted      {total:,} datapoints in {acked - began:.2f} s = {accepted_rate:,.0f} datapoints/s "
              f"({requests / (acked - began):,.0f} requests/s, {slots / (acked - began):,.0f} frames/s)")
        print(f"  on disk       all queues empty {drained_after:.2f} s after the last acknowledgement")
        verdict = "target met" if e2e_rate >= TARGET else "MISSES the target"
        print(f"  END TO END    {total:,} datapoints in {done - began:.2f} s = {e2e_rate:,.0f} datapoints/s   (target >= {TARGET:,}: {verdict})")
        if problems:
            print(f"  VERIFICATION FAILED: {len(problems)} problems; {checked:,} values compared")
            for p in problems[:20]:
                print(f"    {p}")
        else:
            print(f"  verification  OK: all {checked:,} values in {feeds} feeds equal what was posted, no NaN, no extra slot")
        print("  CPU, first post until drained: " + ", ".join(
            f"{role} {seconds:.2f} s ({seconds * 1e6 / total:.2f} µs/datapoint)"
            for (role, _server), seconds in zip([*counted, ("bench client", None)], cpu)) +
            f"; all {sum(cpu):.2f} s of {2 * (done - began):.2f} core-seconds")
        print(f"  load average {os.getloadavg()[0]:.2f} at the end (the machine is shared)", flush=True)
        report(f"end to end, bulk posts to values on disk, all verified ({shape})", e2e_rate, "datapoints/s", TARGET, "goal",
               note=f"{os.cpu_count()} cores shared with Redis and the client; CPU {sum(cpu) * 1e6 / total:.1f} µs/datapoint")
        for role, summary in summaries:
            print(f"\nPROFILE {role}, first post until drained (py-spy record)\n{summary}", flush=True)
        if problems:
            sys.exit(1)
    finally:
        if redis is not None:
            redis.close()
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
