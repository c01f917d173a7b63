"""Cluster benchmark (issue 12 item 10): CPU cost per post at a front and per datapoint at a
shard, for several shard counts, and the time to move a user with 10 feeds x 1 year at 10 s.

Run: ``python bench/cluster.py [--shards 1,2] [--duration 10] [--users-per-shard 8] [--no-move]
[--instructions] [--keep]``. Prints figures; it is not a test. ``--instructions`` counts a
front's instructions per post under valgrind's callgrind instead of timing it (see
``instructions``): the figure that shows the front's cost flat over the shard count on a
shared machine.

For each shard count, a real local cluster (``emond.app.localcluster``, what ``bin/cluster up``
starts: MariaDB, a central Redis, per shard its own redis-server (AOF everysec), shard process
and emond-storage, two fronts and HAProxy, each "machine" on its own loopback address), with
``[input] rate_limit = 0`` (and ``[users] registrations_per_address`` raised). Users are registered through a front (placement spreads them over
the shards: no feeds, so fewest users first). Then two wrk runs against **one front
directly** (not HAProxy, so that one process takes all the load), each key in turn:

- ``GET input/post.json?apikey=KEY&node=bench&csv=<15 values>``;
- ``POST input/bulk.json`` with 100 frames of 15 values per request.

CPU is utime+stime from /proc/PID/stat (every thread of the process). Front cost = the front's
CPU seconds over the run / posts accepted (every answer must be 2xx, or the run stops). Shard
cost = the CPU seconds of every shard process from the start of the run until every shard's
input and storage queues are empty again / datapoints (values) processed. The inputs have no
process lists: a datapoint's cost at the shard is the input update (last value, input
created the first time), not a feed write (``bench/stream.py`` and ``bench/engines.py``
measure the storage side). The CPU of every Redis (the shards' and the central one) over the same interval is printed
per request too. The idle CPU of the front and of the shard processes (timers,
lease renewals) is measured for a few seconds before the load and printed beside.

The move (in the first cluster with 2 shards or more, after the load): a user is registered,
10 PHPFina feed files of one year at 10 s (3,153,600 slots, 12.6 MB each) are written with
emond's PHPFina engine into its shard's storage server's data directory, then the 10 feeds are
created through the API (PHPFina leaves existing files as they are; the feed ids are checked
to be the files' ones), and ``bin/emond-admin user move NAME OTHER`` is run and timed; its
summary's step timings are printed.

The machine has 2 cores: wrk, the front, every shard's Redis and process share them with
other engineers' runs. With 8 shards, 8 shard processes and 9 Redis servers share the 2 cores
with the front; each cluster takes 2-7 s to start here. The default, 1 and 2 shards plus the
move, takes ~2 minutes; ``--shards 1,2,4,8`` ~4 minutes (8 is left out of the default only to
keep a run short).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Harness, Redis, call, described, register  # noqa: E402
from ingest import ensure_program, ensure_wrk, run_wrk  # noqa: E402

from emond.app.localcluster import LocalCluster  # noqa: E402
from emond.phpfina import PHPFina  # noqa: E402

VALUES = 15  # per post: an emonTx-like packet
FRAMES = 100  # per input/bulk request
MOVE_FEEDS = 10
YEAR = 365 * 86400
INTERVAL = 10
DRAIN_TIMEOUT = 300.0
PACED_DELAY = 10.0  # ms between an answer and the next request in --instructions' paced window
TICK = os.sysconf("SC_CLK_TCK")
# No per-user rate limit (each user posts far more often than a device would) and room for
# the bench's registrations from one address.
SETTINGS = {"input": {"rate_limit": 0.0}, "users": {"registrations_per_address": 10_000}}


def cpu_split(pid: int) -> tuple[float, float]:
    """utime and stime of the process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # stat fields 14 and 15


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) so far."""
    return sum(cpu_split(pid))


def pin(summary: dict) -> None:
    """The measured front alone on CPU 0; every other process of the cluster (and wrk) on CPU 1:
    on 2 cores, the nearest this box gets to the front having its own machine."""
    front = summary["front_pids"][0]
    others = summary["front_pids"][1:] + [summary["haproxy_pid"], summary["database"]["pid"], summary["redis"]["pid"]]
    for shard in summary["shards"].values():
        others += [shard["redis_pid"], shard["shard_pid"], shard["storage_pid"]]
    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(front)], check=True, stdout=subprocess.DEVNULL)
    for pid in others:
        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(pid)], check=True, stdout=subprocess.DEVNULL)


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def split_url(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    return host, int(port)


def lua_keys(path: str, keys: list[str], bulk: bool, delay: float = 0.0) -> None:
    """A wrk script that takes the users' keys in turn: a GET input/post of 15 values, or a
    POST input/bulk of 100 frames of 15 values. ``delay``: ms each connection waits between
    its answer and its next request (a load of about connections x 1000 / (delay + latency)
    requests/s, the same whatever the shard count)."""
    csv = ",".join(str(100 + i) for i in range(VALUES))
    frames = json.dumps([[i, "bench", *range(100, 100 + VALUES)] for i in range(FRAMES)], separators=(",", ":"))
    with open(path, "w") as f:
        f.write("local keys = {" + ",".join(json.dumps(k) for k in keys) + "}\n")
        f.write("local i = 0\n")
        if bulk:
            from urllib.parse import quote

            f.write(f'local data = "data={quote(frames)}&time={int(time.time()) - 3600}&apikey="\n')
            f.write("request = function()\n  i = i % #keys + 1\n")
            f.write('  return wrk.format("POST", "/input/bulk.json", {["Content-Type"] = "application/x-www-form-urlencoded"}, data .. keys[i])\nend\n')
        else:
            f.write("request = function()\n  i = i % #keys + 1\n")
            f.write(f'  return wrk.format("GET", "/input/post.json?node=bench&csv={csv}&apikey=" .. keys[i])\nend\n')
        if delay:
            f.write(f"delay = function()\n  return {delay!r}\nend\n")


class ShardQueues:
    """The input and storage queue lengths of every shard's Redis."""

    def __init__(self, summary: dict) -> None:
        self.redis = []
        for shard in summary["shards"].values():
            host, port = split_url(shard["redis"].rsplit("/", 1)[0])
            self.redis.append((Redis(port, host), tuple(shard["storage"])))

    def appends(self) -> int:
        """XADD calls so far on every shard's Redis (the fronts' flushes, one per input queue)."""
        return sum(redis.calls("XADD") for redis, _ in self.redis)

    def queued(self) -> int:
        return sum(sum(redis.queue_lengths(storage)) for redis, storage in self.redis)

    def wait_empty(self, timeout: float = DRAIN_TIMEOUT) -> float:
        began = time.monotonic()
        while self.queued():
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"shard queues not empty after {timeout:.0f}s")
            time.sleep(0.05)
        return time.monotonic() - began

    def close(self) -> None:
        for redis, _ in self.redis:
            redis.close()


def admin(summary: dict, *args: str) -> dict:
    done = subprocess.run([*summary["admin"], *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"emond-admin {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(label: str, wrk: str, cpu: str, url: str, script: str, summary: dict, queues: ShardQueues, duration: float,
            connections: int, datapoints_per_request: int, profile: str | None = None, isolate: bool = False) -> dict[str, float]:
    """One wrk run against a front: CPU per request at the front, per datapoint at the shards.
    ``profile``: a file for py-spy's collapsed stacks of the front during the run. ``isolate``:
    the shard processes stopped (SIGSTOP) while wrk runs, continued after: the front shares the
    box with the Redis servers only; the shards then drain the backlog."""
    front = summary["front_pids"][0]
    shards = [s["shard_pid"] for s in summary["shards"].values()]
    redis = [s["redis_pid"] for s in summary["shards"].values()] + [summary["redis"]["pid"]]
    queues.wait_empty()
    appends0 = queues.appends()
    (user0, system0), shards0, redis0 = cpu_split(front), cpu_of(shards), cpu_of(redis)
    spy = None
    if profile:
        spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(front),
                                "--duration", str(int(duration)), "--rate", "1000", "--format", "raw", "--output", profile,
                                "--nonblocking", "--gil"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if isolate:
        for pid in shards:
            os.kill(pid, signal.SIGSTOP)
    try:
        result = run_wrk(wrk, cpu, url, duration, connections, script)
        user1, system1 = cpu_split(front)
    finally:
        if isolate:
            for pid in shards:
                os.kill(pid, signal.SIGCONT)
    front0, front1 = user0 + system0, user1 + system1
    if spy is not None:
        spy.wait(timeout=60)
    drained = queues.wait_empty()
    shards1, redis1 = cpu_of(shards), cpu_of(redis)
    appends = queues.appends() - appends0
    requests = result["requests"]  # every answer was 2xx (run_wrk refuses otherwise)
    datapoints = requests * datapoints_per_request
    figures = {
        "rps": result["rps"], "p50": result["p50"], "p99": result["p99"], "requests": requests,
        "front_cpu": front1 - front0, "front_us": 1e6 * (front1 - front0) / requests,
        "front_user_us": 1e6 * (user1 - user0) / requests, "front_system_us": 1e6 * (system1 - system0) / requests,
        "per_append": requests / max(appends, 1),
        "shard_cpu": shards1 - shards0, "shard_us": 1e6 * (shards1 - shards0) / datapoints, "drain": drained,
        "redis_us": 1e6 * (redis1 - redis0) / requests,
    }
    print(f"  {label:<6} {result['rps']:>8,.0f} req/s (p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms), {requests:,} accepted; "
          f"front {figures['front_cpu']:.2f} CPU s = {figures['front_us']:,.0f} us/request "
          f"(user {figures['front_user_us']:,.0f}, system {figures['front_system_us']:,.0f}; {figures['per_append']:.2f} requests per XADD); "
          f"shards {figures['shard_cpu']:.2f} CPU s = {figures['shard_us']:.2f} us/datapoint "
          f"({datapoints:,} datapoints, backlog drained {drained:.1f} s after the run); "
          f"Redis (every shard's and the central one) {figures['redis_us']:,.0f} us/request", flush=True)
    return figures


def idle(summary: dict, seconds: float = 5.0) -> tuple[float, float]:
    """CPU seconds per second of the idle front and of all shard processes together."""
    front = summary["front_pids"][0]
    shards = [s["shard_pid"] for s in summary["shards"].values()]
    f0, s0 = cpu_seconds(front), cpu_of(shards)
    time.sleep(seconds)  # measuring an idle interval
    return (cpu_seconds(front) - f0) / seconds, (cpu_of(shards) - s0) / seconds


def callgrind(pid: int, *args: str) -> str:
    done = subprocess.run([ensure_program("callgrind_control", "valgrind"), *args, str(pid)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid} failed: {done.stdout.strip()}")
    return done.stdout


def syscalls(pid: int) -> int:
    """read-like and write-like system calls of the process so far (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]) + int(fields["syscw"])


class Instructions:
    """Instructions a process executes (callgrind's Ir, every thread, user space only) over a
    window: zeroed at the start, dumped at the end. Unlike CPU time, not moved by what else
    runs on the box: the figure this VM can resolve 5 % with (it has no hardware counters)."""

    def __init__(self, pid: int, out: str) -> None:
        self.pid, self.out, self.dumps = pid, out, 0

    def start(self) -> None:
        callgrind(self.pid, "-z")
        self.began, self.syscalls = time.monotonic(), syscalls(self.pid)

    def stop(self) -> tuple[int, float, int]:
        """(instructions, seconds, system calls) since ``start``."""
        callgrind(self.pid, "-d")
        seconds, calls = time.monotonic() - self.began, syscalls(self.pid) - self.syscalls
        self.dumps += 1
        with open(f"{self.out}.{self.dumps}") as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1]), seconds, calls
        raise RuntimeError(f"no totals in {self.out}.{self.dumps}")


def instructions(cluster: LocalCluster, summary: dict, args: argparse.Namespace, wrk: str, directory: str, keys: list[str]) -> dict[str, float]:
    """Instructions per post at a front: front2 restarted under callgrind (collection switched on
    once warm), then two wrk runs of ``input/post`` against it of the same length, one as fast
    as it answers, one paced (``PACED_DELAY`` ms between an answer and the next request). A
    window's count is ``a`` per post plus ``b`` per second (timers, the queue monitor's samples
    of every shard, lease renewals: under callgrind the front answers ~50 times slower, so the
    per-second work would weigh ~50 times more per post than at full speed); the two windows
    give ``a`` and ``b`` exactly. ``--connections`` 1 (the default in this mode): every post
    its own reactor turn and its own append, so the count is the path's, not the batching's
    (with several connections a flush carries one shard's posts: more shards, more appends per
    turn). An idle window is measured too, as a check of ``b``."""
    out = os.path.join(directory, "callgrind.out")
    wrap = [ensure_program("valgrind"), "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    pid = cluster.restart("front2", timeout=600, wrap=wrap)["pid"]
    url = summary["fronts"][1]
    cpu = "1" if args.pin else "0,1"
    fast, paced = os.path.join(directory, "post-fast.lua"), os.path.join(directory, "post-paced.lua")
    lua_keys(fast, keys, bulk=False)
    lua_keys(paced, keys, bulk=False, delay=PACED_DELAY)
    run_wrk(wrk, cpu, url, 5, args.connections, fast)  # warm (valgrind's translations, key caches, inputs)
    callgrind(pid, "-i", "on")
    run_wrk(wrk, cpu, url, 5, args.connections, fast)  # warm again, instrumented (the translations redone)
    counter = Instructions(pid, out)
    windows = []
    for script in (fast, paced):
        counter.start()
        result = run_wrk(wrk, cpu, url, args.duration, args.connections, script)
        ir, seconds, calls = counter.stop()
        windows.append((result["requests"], seconds, ir, calls))
    counter.start()
    time.sleep(args.idle)  # an idle window: what the front runs without posts
    idle_ir, idle_seconds, _ = counter.stop()
    (n1, t1, i1, c1), (n2, t2, i2, c2) = windows
    det = n1 * t2 - n2 * t1
    per_post, per_second = (i1 * t2 - i2 * t1) / det, (n1 * i2 - n2 * i1) / det
    figures = {"requests": n1 + n2, "rps": n1 / t1, "paced_rps": n2 / t2, "ir_per_post": per_post, "ir_per_second": per_second,
               "idle_ir_s": idle_ir / idle_seconds, "syscalls_per_post": (c1 * t2 - c2 * t1) / det}
    print(f"  instructions: {n1:,} posts in {t1:.1f} s and {n2:,} paced in {t2:.1f} s under callgrind: {i1:,} and {i2:,} instructions "
          f"= {per_post:,.0f} per post + {per_second:,.0f} per second (idle window: {figures['idle_ir_s']:,.0f} per second); "
          f"{figures['syscalls_per_post']:.2f} read/write system calls per post", flush=True)
    return figures


def write_year(directory: str, feedids: list[int], now: int) -> float:
    """One year at 10 s of a slowly varying power figure per feed, with emond's PHPFina."""
    began = time.monotonic()
    engine = PHPFina(directory, sync=False)  # the move reads the files, not the page cache's state
    start = (now - YEAR) // INTERVAL * INTERVAL
    times = np.arange(start, start + YEAR, INTERVAL, dtype=np.int64)
    rng = np.random.default_rng(12)
    try:
        for feedid in feedids:
            engine.create(feedid, INTERVAL)
            values = (500 + 400 * np.sin(times / 86400 * 2 * np.pi) + rng.normal(0, 20, times.shape)).astype(np.float64)
            refused = engine.write(feedid, times, values)
            if refused:
                raise RuntimeError(f"PHPFina refused {len(refused)} batches of feed {feedid}")
    finally:
        engine.close()
    os.sync()
    return time.monotonic() - began


def move(summary: dict) -> dict:
    """A user with 10 feeds x 1 year at 10 s moved to another shard; the command's summary."""
    front_host, front_port = split_url(summary["fronts"][0])
    key = register(front_port, "mover", host=front_host)
    source = admin(summary, "user", "show", "mover")["shard"]
    target = next(name for name in summary["shards"] if name != source)
    directory = os.path.join(summary["dir"], f"shard-{source}", "storage", "phpfina")
    feedids = list(range(1, MOVE_FEEDS + 1))  # the cluster's first feeds (checked below)
    took = write_year(directory, feedids, int(time.time()))
    size = sum(os.path.getsize(os.path.join(directory, f"{i}.dat")) for i in feedids)
    print(f"  wrote {MOVE_FEEDS} PHPFina feeds of one year at {INTERVAL} s ({size:,} bytes) on shard {source} in {took:.1f} s", flush=True)
    for i in feedids:
        answer = call(front_port, "feed/create.json", host=front_host, apikey=key, name=f"power{i}", tag="bench",
                      datatype="1", engine="5", options=json.dumps({"interval": INTERVAL}))
        if not isinstance(answer, dict) or answer.get("feedid") != i:
            raise RuntimeError(f"feed/create.json answered {answer!r}, expected feed {i}")
    began = time.monotonic()
    summary_line = admin(summary, "user", "move", "mover", target)
    wall = time.monotonic() - began
    moved = admin(summary, "user", "show", "mover")
    if moved["shard"] != target:
        raise RuntimeError(f"after the move the user is on {moved['shard']}, not {target}")
    print(f"  emond-admin user move mover {target} (from {source}): {wall:.1f} s wall, the command included", flush=True)
    print(f"  steps: {json.dumps(summary_line.get('steps'))}", flush=True)
    feeds = summary_line.get("feeds", {})
    moved_bytes = sum(f.get("bytes", 0) for f in feeds.values()) if isinstance(feeds, dict) else 0
    print(f"  feeds copied: {len(feeds)}, {moved_bytes:,} bytes", flush=True)
    return {"wall": wall, "steps": summary_line.get("steps"), "bytes": moved_bytes}


def run(count: int, args: argparse.Namespace, wrk: str, harness: Harness, with_move: bool) -> dict:
    directory = harness.dir(f"c{count}")
    cluster = LocalCluster(directory, shards=count, settings=SETTINGS,
                           say=lambda text: print(f"    cluster: {text}", file=sys.stderr, flush=True) if args.verbose else None)
    began = time.monotonic()
    summary = cluster.up()
    print(f"\n{count} shard(s): cluster up in {time.monotonic() - began:.0f} s; front pid {summary['front_pids'][0]}, "
          f"shard pids {[s['shard_pid'] for s in summary['shards'].values()]}", flush=True)
    queues = ShardQueues(summary)
    figures: dict = {"shards": count}
    if args.pin:
        pin(summary)
    try:
        host, port = split_url(summary["fronts"][0])
        keys = [register(port, f"user{i}", host=host) for i in range(args.users_per_shard * count)]
        placed = admin(summary, "shards")
        print(f"  {len(keys)} users placed: {json.dumps({n: s['users'] for n, s in placed.items()})}", flush=True)
        post_script = os.path.join(directory, "post.lua")
        bulk_script = os.path.join(directory, "bulk.lua")
        lua_keys(post_script, keys, bulk=False, delay=args.delay)
        lua_keys(bulk_script, keys, bulk=True, delay=args.delay)
        url = summary["fronts"][0]
        cpu = "1" if args.pin else "0,1"
        run_wrk(wrk, cpu, url, 2, args.connections, post_script)  # warm-up: inputs created, caches filled
        run_wrk(wrk, cpu, url, 2, args.connections, bulk_script)
        queues.wait_empty()
        figures["idle_front"], figures["idle_shards"] = idle(summary)
        print(f"  idle: front {1000 * figures['idle_front']:.1f} ms CPU/s, the {count} shard process(es) "
              f"{1000 * figures['idle_shards']:.1f} ms CPU/s", flush=True)
        if args.instructions:
            figures["instructions"] = instructions(cluster, summary, args, wrk, directory, keys)
            return figures
        profile = os.path.join(args.profile, f"front-post-{count}.txt") if args.profile else None
        figures["post"] = measure("post", wrk, cpu, url, post_script, summary, queues, args.duration, args.connections, VALUES, profile, args.isolate)
        figures["bulk"] = measure("bulk", wrk, cpu, url, bulk_script, summary, queues, args.duration, args.connections, VALUES * FRAMES, None, args.isolate)
        if with_move:
            figures["move"] = move(summary)
    finally:
        queues.close()
        cluster.down()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shards", default="1,2", help="shard counts, comma-separated (1,2,4,8 takes ~4 minutes here)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=None, help="wrk's connections (16; 1 with --instructions)")
    parser.add_argument("--users-per-shard", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="ms between an answer and the next request on each connection: about the same load "
                             "whatever the shard count (0: as fast as the cluster answers)")
    parser.add_argument("--pin", action="store_true", help="the measured front alone on CPU 0, the rest of the cluster and wrk on CPU 1")
    parser.add_argument("--isolate", action="store_true",
                        help="stop the shard processes while wrk runs (the front's cost without theirs on the box); "
                             "the shard figure is then the drain of the backlog")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the front during each post run (collapsed stacks in DIR; "
                                                          "the sampling costs the front CPU: figures of such a run are not comparable)")
    parser.add_argument("--instructions", action="store_true",
                        help="count the instructions per post of a front under callgrind (valgrind) instead of its CPU time: "
                             "no CPU figures, no bulk, no move; --connections defaults to 1")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window subtracted in --instructions")
    parser.add_argument("--no-move", action="store_true", help="leave the move out")
    parser.add_argument("--verbose", action="store_true", help="the cluster's progress on stderr")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, data)")
    args = parser.parse_args()
    counts = [int(n) for n in args.shards.split(",")]
    if args.connections is None:
        args.connections = 1 if args.instructions else 16

    wrk = ensure_wrk()
    commit = described()
    print(f"emond {commit}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start; "
          f"wrk -t1 -c{args.connections}, {args.duration:.0f} s per run, against one front, delay {args.delay:g} ms{', front pinned to CPU 0, the rest to CPU 1' if args.pin else ''}{', shard processes stopped during the runs' if args.isolate else ''}; "
          f"{VALUES} values per post, {FRAMES} frames per bulk request", flush=True)
    harness = Harness("cluster")
    results = []
    move_at = next((n for n in counts if n >= 2), None) if not args.no_move else None
    try:
        for count in counts:
            results.append(run(count, args, wrk, harness, with_move=count == move_at))
    finally:
        harness.close(keep=args.keep)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end", flush=True)
    if args.instructions:
        print("\nshards | posts counted | instructions per post | read/write syscalls per post | instructions per second (idle window)")
        for r in results:
            i = r["instructions"]
            print(f"{r['shards']:>6} | {i['requests']:>13,} | {i['ir_per_post']:>21,.0f} | {i['syscalls_per_post']:>28.2f} | "
                  f"{i['ir_per_second']:,.0f} ({i['idle_ir_s']:,.0f})")
        costs = [r["instructions"]["ir_per_post"] for r in results]
        if len(costs) > 1:
            print(f"front instructions per post: max/min = {max(costs) / min(costs):.3f} (goal: within 5 %)")
        return
    print("\nshards | post req/s | front us/post (user + system) | requests/XADD | shard us/datapoint (post) | Redis us/post | bulk frames/s | front us/frame "
          "| shard us/datapoint (bulk) | Redis us/frame")
    for r in results:
        p, b = r["post"], r["bulk"]
        print(f"{r['shards']:>6} | {p['rps']:>10,.0f} | {p['front_us']:>6,.0f} ({p['front_user_us']:,.0f} + {p['front_system_us']:,.0f}) | {p['per_append']:.2f} | {p['shard_us']:>25.2f} | {p['redis_us']:>13,.0f} | "
              f"{b['rps'] * FRAMES:>13,.0f} | {b['front_us'] / FRAMES:>14.1f} | {b['shard_us']:>25.2f} | {b['redis_us'] / FRAMES:>14.1f}")
    if len(results) > 1:
        costs = [r["post"]["front_us"] for r in results]
        print(f"front cost per post: max/min = {max(costs) / min(costs):.3f} (goal: within 5 %), median {statistics.median(costs):,.0f} us")


if __name__ == "__main__":
    main()
