"""Login benchmark: what a burst of logins costs a running node (RSS, and other requests' time).

Run: ``python bench/logins.py [--users 50] [--keep]``. Prints figures; it is not a test.

Starts a private redis-server and a real ``twistd -n emond`` (``bench/_harness.py``:
temp config, SQLite; the login and registration throttles raised so that only the
password KDF limits the burst), reads the node's RSS from ``/proc/<pid>/status`` (``VmRSS``, and the peak so
far, ``VmHWM``). Then, each step followed by the RSS:

1. one registration, then 10 logins in a row (one after another), then the other
   users' registrations, in a row;
2. 10 concurrent logins (10 client threads, different users);
3. ``--users`` concurrent logins, while one more client posts ``input/post`` in a
   loop: the answer codes of the logins, their times, and the worst post time;
4. one second later, nothing running: what is held.

A password hash is scrypt (n=2^14, r=8: 16 MiB of memory per hash while it runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import HOST, Harness, call  # noqa: E402

PASSWORD = "benchpass1"
LIMITS = (
    "[users]\nlogin_failures_per_client = 100000\nlogin_failures_per_address = 100000\n"
    "login_failures_per_user = 100000\nregistrations_per_address = 100000\n"
)


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def post(port: int, path: str, **params: str) -> tuple[int, float]:
    """(HTTP status, seconds) of one form POST."""
    body = urllib.parse.urlencode(params).encode()
    request = urllib.request.Request(f"http://{HOST}:{port}/{path}", data=body, method="POST")
    began = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            code = response.status
    except urllib.error.HTTPError as e:
        e.read()
        code = e.code
    return code, time.monotonic() - began


def register(port: int, username: str) -> str:
    return call(port, "user/register.json", username=username, password=PASSWORD, email=f"{username}@example.org")["apikey_write"]


def login(port: int, username: str) -> tuple[int, float]:
    return post(port, "user/login.json", username=username, password=PASSWORD)


def concurrently(port: int, usernames: list[str]) -> list[tuple[int, float]]:
    results: list[Any] = [None] * len(usernames)
    start = threading.Barrier(len(usernames))

    def one(i: int) -> None:
        start.wait()
        results[i] = login(port, usernames[i])

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(usernames))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def show(label: str, pid: int) -> None:
    now, peak = rss(pid)
    print(f"{label:<48} RSS {now:6.1f} MB (peak {peak:6.1f} MB)")


def codes(results: list[tuple[int, float]]) -> str:
    counted: dict[int, int] = {}
    for code, _ in results:
        counted[code] = counted.get(code, 0) + 1
    return ", ".join(f"{n} x {code}" for code, n in sorted(counted.items()))


def times(results: list[tuple[int, float]], code: int) -> str:
    took = sorted(t for c, t in results if c == code)
    if not took:
        return "-"
    return f"p50 {statistics.median(took) * 1000:.0f} ms, max {took[-1] * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    harness = Harness("logins")
    try:
        _, redis_port = harness.redis()
        node, port, _ = harness.emond(redis_port, extra=LIMITS)
        users = [f"bench{i}" for i in range(max(args.users, 10))]
        print(f"node pid {node.pid}")
        show("started", node.pid)
        keys = [register(port, users[0])]
        show("after one registration", node.pid)
        in_a_row = [login(port, users[0]) for _ in range(10)]
        show(f"after 10 logins in a row ({codes(in_a_row)})", node.pid)
        keys += [register(port, u) for u in users[1:]]
        show(f"after {len(users) - 1} more registrations, in a row", node.pid)
        together = concurrently(port, users[:10])
        show(f"after 10 concurrent logins ({codes(together)})", node.pid)
        print(f"  their times: {times(together, 200)}")
        posts: list[tuple[int, float]] = []
        stop = threading.Event()

        def poster() -> None:
            while not stop.is_set():
                posts.append(post(port, "input/post.json", apikey=keys[0], node="bench", csv="1,2,3"))

        side = threading.Thread(target=poster)
        side.start()
        burst = concurrently(port, users[: args.users])
        stop.set()
        side.join()
        show(f"after {args.users} concurrent logins", node.pid)
        print(f"  answers: {codes(burst)}; 200s {times(burst, 200)}; 503s {times(burst, 503)}")
        print(f"  input/post meanwhile: {len(posts)} answers ({codes(posts)}), {times(posts, 200)}")
        time.sleep(1.0)
        show("one second later, idle", node.pid)
    finally:
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
