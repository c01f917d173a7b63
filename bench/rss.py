"""A node's memory: RSS idle, and with 10,000 users posting, sampled over an hour.

Run: ``python bench/rss.py [--users 10000] [--every 10] [--duration 3600] [--warmup 300] [--keep]``.
Prints figures; it is not a test.

A private redis-server (no persistence) and a real ``twistd -n emond`` (temp config, SQLite,
the default input limits except ``rate_limit = 0.0``). One user is registered over HTTP
(that creates the database); the other users are written straight into its ``users``
table, each with its own API keys (registering 10,000 over HTTP would be 10,000 scrypt
hashes, ~17 minutes of CPU, and measure nothing this bench is about). Then wrk posts
``input/post.json?node=emontx&csv=...`` (5 values, a new connection each) for every user in turn, each user once
every ``--every`` seconds (10,000 users every 10 s: ~1,000 requests/s, each connection
pacing itself with wrk's ``delay()``), for ``--duration`` seconds. Each user's first post
creates its node and inputs. The node's ``VmRSS`` (``/proc/PID/status``) and Redis's are
sampled every 10 s. Figures: RSS at start (1 user), with every user in the database
before any posts, after the warm-up (every user has posted, every cache filled), the
highest, the last, and the growth from the end of the warm-up to the end with its slope
(least squares over the samples after the warm-up, MB per hour). Any answer that is not
2xx makes the run fail.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import HOST, Harness, Redis, described, register, report, wait_drained  # noqa: E402
from ingest import ensure_wrk, expect_ok, parse_wrk  # noqa: E402
from emond.meta.users import apikey_digest, new_apikey, username_key  # noqa: E402

CONNECTIONS = 200  # each waits delay() before a request: many, so that latency hardly slows the rate
SAMPLE = 10.0  # seconds between RSS samples


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def add_users(database: str, count: int) -> list[str]:
    """``count`` users in the node's database, the first registered user's password hash
    copied (nobody logs in); their write keys."""
    db = sqlite3.connect(database, timeout=30)
    with db:
        password, created = db.execute("SELECT password, created FROM users ORDER BY id LIMIT 1").fetchone()
        keys, rows = [], []
        for i in range(count):
            name = f"rss{i:05d}"
            write, read = new_apikey(), new_apikey()
            keys.append(write)
            rows.append((name, username_key(name), f"{name}@example.org", password, write, read, apikey_digest(write),
                         apikey_digest(read), str(uuid.uuid4()), created))
        db.executemany(
            "INSERT INTO users (username, username_key, email, password, salt, apikey_write, apikey_read, apikey_write_hash, "
            "apikey_read_hash, uuid, admin, timezone, bio, created) VALUES (?, ?, ?, ?, '', ?, ?, ?, ?, ?, 0, 'UTC', '', ?)",
            rows,
        )
    db.close()
    return keys


def lua_users(path: str, keys: list[str], delay_ms: float) -> None:
    """wrk script: each request the next user's post; each connection waits ``delay_ms`` first."""
    with open(path, "w") as f:
        f.write("local keys = {" + ",".join(f'"{k}"' for k in keys) + "}\n")
        f.write("local i = 0\n")
        f.write("math.randomseed(os.time())\n")
        f.write("request = function()\n  i = i % #keys + 1\n")
        f.write('  local v = math.random(100, 2000)\n')
        # a new connection per post, as a device that wakes, posts and sleeps makes it
        f.write('  return wrk.format("GET", "/input/post.json?node=emontx&csv=" .. v .. ",230.1,1.5," .. (v + 7) .. ",21.5&apikey=" .. keys[i], '
                '{["Connection"] = "close"})\nend\n')
        f.write(f"delay = function() return {delay_ms:.0f} end\n")


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in samples], [m for _, m in samples]).slope * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between two posts of one user")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of posting")
    parser.add_argument("--warmup", type=float, default=300.0, help="seconds before the growth is counted")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args()
    if args.warmup >= args.duration:
        raise SystemExit("--warmup must be shorter than --duration")

    wrk = ensure_wrk()
    commit = described()
    print(f"emond {commit}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    harness = Harness("rss")
    redis = None
    try:
        redis_server, redis_port = harness.redis()
        node, port, datadir = harness.emond(redis_port)
        redis = Redis(redis_port)
        first = register(port)
        expect_ok("emond input/post", f"http://{HOST}:{port}/input/post.json?apikey={first}&node=emontx&csv=1")
        wait_drained(redis, 60)
        started = rss_mb(node.pid)
        keys = add_users(os.path.join(os.path.dirname(datadir), "emond.db"), args.users - 1) + [first]
        time.sleep(SAMPLE)  # idle: nothing to synchronise with, the figure is what an idle process holds
        idle = rss_mb(node.pid)
        print(f"RSS at start (1 user) {started:.1f} MB; idle with {args.users:,} users in the database {idle:.1f} MB", flush=True)

        rate = args.users / args.every
        delay_ms = max(0.0, 1000.0 * CONNECTIONS / rate)
        script = os.path.join(harness.base, "users.lua")
        lua_users(script, keys, delay_ms)
        argv = [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{int(args.duration)}s", "--latency", "--timeout", "10s", "-s", script,
                f"http://{HOST}:{port}/"]
        print(f"posting: {args.users:,} users, each every {args.every:g} s (~{rate:,.0f} requests/s: wrk -c{CONNECTIONS}, "
              f"delay {delay_ms:.0f} ms per request), {args.duration:.0f} s; samples every {SAMPLE:.0f} s", flush=True)
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        began = time.monotonic()
        samples: list[tuple[float, float]] = []
        redis_samples: list[float] = []
        while load.poll() is None:
            time.sleep(SAMPLE)  # a sampling interval, not a synchronisation
            t = time.monotonic() - began
            samples.append((t, rss_mb(node.pid)))
            redis_samples.append(rss_mb(redis_server.pid))
            if len(samples) % 6 == 0:
                print(f"  {t:6.0f} s  emond {samples[-1][1]:7.1f} MB   redis {redis_samples[-1]:7.1f} MB", flush=True)
        output = load.stdout.read().decode(errors="replace") if load.stdout else ""
        if load.returncode != 0:
            raise RuntimeError(f"wrk failed ({load.returncode}):\n{output}")
        result = parse_wrk(output)
        if result["non2xx"] or result["socket_errors"]:
            raise RuntimeError(f"{result['non2xx']} answers not 2xx, {result['socket_errors']} socket errors:\n{output}")
        after = [(t, m) for t, m in samples if t >= args.warmup]
        warm = after[0][1] if after else float("nan")
        end = samples[-1][1]
        growth = end - warm
        slope = slope_per_hour(after)
        print("\nSUMMARY")
        print(f"  requests {result['requests']:,} ({result['rps']:,.0f}/s), p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms, all 2xx")
        print(f"  emond RSS: start {started:.1f} MB, idle with {args.users:,} users {idle:.1f} MB, after {args.warmup:.0f} s of posts "
              f"{warm:.1f} MB, highest {max(m for _, m in samples):.1f} MB, end {end:.1f} MB")
        print(f"  growth after the warm-up: {growth:+.1f} MB over {samples[-1][0] - args.warmup:.0f} s (slope {slope:+.2f} MB/hour)")
        print(f"  redis RSS: end {redis_samples[-1]:.1f} MB (highest {max(redis_samples):.1f} MB)")
        print(f"  load average {os.getloadavg()[0]:.2f} at the end (the machine is shared)", flush=True)
        report("node RSS idle", idle, "MB", None, "", "lower", None, f"{args.users:,} users in the database, before any post")
        report(f"node RSS with {args.users:,} users posting", end, "MB", warm, f"RSS after {args.warmup:.0f} s warm-up", "lower", 1.05,
               f"{samples[-1][0]:.0f} s of posts at {result['rps']:,.0f}/s; growth {growth:+.1f} MB ({slope:+.2f} MB/hour)")
    finally:
        if redis is not None:
            redis.close()
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
