"""Several ``twistd emond`` processes on one HTTP port (``[node] reuse_port``): ``input/post`` req/s with 1 and 2.

Run: ``python bench/processes.py [--duration 10] [--rounds 2] [--keep]``. Prints figures; it is not a test.

A private redis-server (no persistence) and a real ``twistd -n emond`` (temp config, SQLite,
``rate_limit = 0.0``, ``[node] reuse_port = true``) on a free port; a user registered.
Then, alternating, ``wrk -t1 -c32`` for 10 s against ``GET /input/post.json`` with that one
process listening, and with a second ``twistd emond`` (same Redis and database, the same
port, ``reuse_port = true``) started beside it, which is stopped again before the next
round. Nothing is pinned: the two processes, Redis and wrk share the machine's cores (two
on the project machine), and each process also consumes (the input queues' leases share
the consumption). Each process's CPU seconds during a run (``/proc/PID/stat``) show how
the kernel spread the connections. The queues are waited empty before each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import HOST, Harness, Redis, cpu_seconds, described, free_port, register, report, wait_drained  # noqa: E402
from ingest import ensure_wrk, expect_ok, line, run_wrk  # noqa: E402

DRAIN_TIMEOUT = 300.0
ALL_CORES = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))




def measured(wrk: str, url: str, args: argparse.Namespace, pids: list[int]) -> tuple[dict[str, float], list[float]]:
    before = [cpu_seconds(p) for p in pids]
    result = run_wrk(wrk, ALL_CORES, url, args.duration, args.connections)
    return result, [cpu_seconds(p) - b for p, b in zip(pids, before)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args()

    wrk = ensure_wrk()
    commit = described()
    print(f"emond {commit}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    harness = Harness("processes")
    redis = None
    try:
        _, redis_port = harness.redis()
        port = free_port()
        first, _, datadir = harness.emond(redis_port, port=port, node_extra="reuse_port = true\n")
        redis = Redis(redis_port)
        key = register(port)
        url = f"http://{HOST}:{port}/input/post.json?apikey={key}&node=bench&csv=1,2,3"
        expect_ok("emond input/post", url)
        wait_drained(redis, DRAIN_TIMEOUT)
        run_wrk(wrk, ALL_CORES, url, 2, args.connections)  # warm-up
        print(f"\ninput/post on :{port}: wrk -t1 -c{args.connections} --latency, {args.duration:.0f} s per run, nothing pinned", flush=True)
        one, two = [], []
        for r in range(1, args.rounds + 1):
            wait_drained(redis, DRAIN_TIMEOUT)
            result, cpu = measured(wrk, url, args, [first.pid])
            print(line(f"round {r} 1 process", result, f"   CPU {cpu[0]:.1f} s"), flush=True)
            one.append(result)
            second, _, _ = harness.emond(redis_port, port=port, node_extra="reuse_port = true\n", consumer_of=datadir,
                                         name=f"second-{r}")
            try:
                wait_drained(redis, DRAIN_TIMEOUT)
                run_wrk(wrk, ALL_CORES, url, 2, args.connections)  # the second process's caches
                wait_drained(redis, DRAIN_TIMEOUT)
                result, cpu = measured(wrk, url, args, [first.pid, second.pid])
                print(line(f"round {r} 2 processes", result, f"   CPU {cpu[0]:.1f} + {cpu[1]:.1f} s"), flush=True)
                two.append(result)
            finally:
                second.stop()
                harness.servers.remove(second)
        expect_ok("emond input/post after the runs", url)
        m1 = {k: statistics.median(r[k] for r in one) for k in ("rps", "p50", "p99")}
        m2 = {k: statistics.median(r[k] for r in two) for k in ("rps", "p50", "p99")}
        print("\nSUMMARY (medians of rounds)")
        print(f"  1 process    {m1['rps']:>10,.0f} req/s   p50 {m1['p50']:.2f} ms  p99 {m1['p99']:.2f} ms")
        print(f"  2 processes  {m2['rps']:>10,.0f} req/s   p50 {m2['p50']:.2f} ms  p99 {m2['p99']:.2f} ms   "
              f"({m2['rps'] / m1['rps']:.2f} x)")
        print(f"  load average {os.getloadavg()[0]:.2f} at the end (the machine is shared)", flush=True)
        report("input/post req/s, 2 processes on one port (SO_REUSEPORT)", m2["rps"], "req/s", m1["rps"], "1 process",
               goal=None, note=f"{os.cpu_count()} cores shared with Redis and wrk")
    finally:
        if redis is not None:
            redis.close()
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
