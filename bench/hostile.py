"""Hostile input benchmark: what one bad (or merely large) request costs a running node.

Run: ``python bench/hostile.py [--repeat 3] [--only NAME] [--keep]``. Prints figures;
it is not a test.

Starts a private redis-server and two real ``twistd -n emond`` processes
(``bench/_harness.py``: temp config, SQLite, no rate limit, the default input limits
otherwise): a front node with ``[input] consume = false`` that takes the requests
(and hosts the storage), and a consumer-only node beside it, so that what a request
costs the process that accepts it is measured apart from the processing of what it
carried. It registers a user, then sends each probe below ``--repeat`` times.

The stall is measured inside each node: a prelude run in the twistd process before
twistd starts adds a ``LoopingCall`` every 1 ms that notes the longest gap between
its calls (minus the 1 ms), and a side port on 127.0.0.1 that answers that worst gap
and resets it. The bench resets the front node's figure, sends the probe, reads the
figure once the answer is in: that is the reactor's worst turn while the request
was received, decoded and answered (time the process waited for a CPU included,
on this shared 2-core machine). Then it waits until every queue is empty and reads
the consumer node's figure: the processing's worst turn. RSS of the front node is
read from ``/proc/<pid>/status`` before the probe and after the drain (``VmRSS``),
with the process's peak so far (``VmHWM``).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import socket
import statistics
import sys
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import HOST, Harness, Redis, free_port, register, wait_drained  # noqa: E402

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DRAIN_TIMEOUT = 300.0


@dataclass
class Probe:
    name: str
    what: str
    make: Callable[[str, int], tuple[str, bytes, dict[str, str]]]  # (key, now) -> path, body, headers


def form(path: str, **params: str) -> Callable[[str, int], tuple[str, bytes, dict[str, str]]]:
    return lambda key, now: (path, urllib.parse.urlencode({"apikey": key, **params}).encode(), FORM)


def raw(path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[str, int], tuple[str, bytes, dict[str, str]]]:
    return lambda key, now: (path, body, {"Authorization": f"Bearer {key}", **(headers or {})})


def emonpi_frames(n: int, start: int, values: int = 15) -> list[list[object]]:
    return [[start + 10 * i, "emonpi", *[round(240.5 + (i * 7 + j) % 13 * 0.25, 2) for j in range(values)]] for i in range(n)]


def emonhub_bulk(n: int) -> Callable[[str, int], tuple[str, bytes, dict[str, str]]]:
    """n frames as emonhub sends them: a zlib body, sentat, a Bearer key."""
    def make(key: str, now: int) -> tuple[str, bytes, dict[str, str]]:
        body = zlib.compress(json.dumps(emonpi_frames(n, now - 10 * n)).encode())
        return f"input/bulk.json?sentat={now}&cb=1", body, {"Authorization": f"Bearer {key}"}
    return make


def form_bulk(n: int, values: int = 15, as_strings: bool = False) -> Callable[[str, int], tuple[str, bytes, dict[str, str]]]:
    def make(key: str, now: int) -> tuple[str, bytes, dict[str, str]]:
        frames = emonpi_frames(n, now - 10 * n, values)
        if as_strings:  # numeric strings: every value checked one by one
            frames = [[f[0], f[1], *map(str, f[2:])] for f in frames]
        body = urllib.parse.urlencode({"apikey": key, "data": json.dumps(frames), "sentat": str(now)}).encode()
        return "input/bulk.json", body, FORM
    return make


def probes() -> list[Probe]:
    bomb = zlib.compress(b"[" + b",".join([b'[0,"a",1]'] * 1_300_000) + b"]", 9)
    digits = "1" * 20_000 + "x"
    deep = "[" * 100_000 + "]" * 100_000
    members = b"".join(gzip.compress(b"", mtime=0) for _ in range(8_000_000 // 20))
    lines = b"x\n" * (4 << 20)
    multipart = b"--XYZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n" + lines[:-4096] + b"\r\n--XYZ--\r\n"
    in_strings = "[" + ",".join(f'[0,"n{i % 10}","],[0,\\"x\\",{i}]"]' for i in range(60_000)) + "]"
    return [
        Probe("emonhub-100", "emonhub-style bulk, 100 frames x 15 values (the common case)", emonhub_bulk(100)),
        Probe("emonhub-1000", "emonhub-style bulk, 1000 frames x 15 values (a catch-up batch)", emonhub_bulk(1000)),
        Probe("form-5000", "plain form bulk, 5000 frames x 15 values (the frame cap)", form_bulk(5000)),
        Probe("strings-5000", "form bulk, 5000 frames x 19 numeric strings (value by value, ~max_values)", form_bulk(5000, 19, True)),
        Probe("bomb", f"cb=1 body of {len(bomb):,} bytes inflating to 1.3 M frames", raw("input/bulk.json?sentat=0&cb=1", bomb)),
        Probe("gzip-members", f"cb=1 body of {len(members):,} bytes: 400,000 empty gzip members", raw("input/bulk.json?cb=1", members)),
        Probe("deep", "bulk data nested 100,000 deep", form("input/bulk.json", data=deep)),
        Probe("digits", "csv value of 20,000 digits and an x", form("input/post.json", node="n", csv=digits)),
        Probe("sentat-digits", "bulk sentat of 20,000 digits and an x", form("input/bulk.json", data='[[0,"n",1]]', sentat=digits)),
        Probe("poison", "bulk frame offset 2^64 (once lost the answers of a whole flush)", form("input/bulk.json", data='[[18446744073709551616,"n",1]]')),
        Probe("cut-in-strings", "bulk of 60,000 frames whose strings hold '],['", form("input/bulk.json", data=in_strings)),
        Probe("one-frame-100k", "one bulk frame of 99,990 values", form("input/bulk.json", data=json.dumps([[0, "n", *range(99_990)]]), sentat="0")),
        Probe("fulljson-100k", "fulljson of 99,990 names (beyond max_inputs: refused by the consumer)",
              lambda key, now: ("input/post.json", urllib.parse.urlencode({"apikey": key, "node": "f", "fulljson": json.dumps({f"k{i}": i for i in range(99_990)})}).encode(), FORM)),
        Probe("bad-escapes", "8 MiB form body of '%' (malformed escapes)", lambda key, now: (f"input/post.json?apikey={key}", b"csv=" + b"%" * ((8 << 20) - 8), FORM)),
        Probe("many-fields", "8 MiB form body of 2 M fields", lambda key, now: (f"input/post.json?apikey={key}", b"&".join([b"a=1"] * (2 << 20))[: (8 << 20) - 1], FORM)),
        Probe("multipart-lines", "8 MiB multipart body of short lines", lambda key, now: (f"input/post.json?apikey={key}&node=m", multipart, {"Content-Type": "multipart/form-data; boundary=XYZ"})),
    ]


HEARTBEAT = """
import time as _time
from twisted.internet import reactor as _reactor, task as _task
from twisted.internet.protocol import Factory as _Factory, Protocol as _Protocol
_worst, _last = [0.0], [0.0]
def _beat():
    now = _time.perf_counter()
    if _last[0]:
        _worst[0] = max(_worst[0], now - _last[0] - 0.001)
    _last[0] = now
class _Ask(_Protocol):
    def dataReceived(self, data):
        self.transport.write(b"%.6f\\n" % _worst[0])
        _worst[0] = 0.0
_task.LoopingCall(_beat).start(0.001, now=False)
_reactor.listenTCP({port}, _Factory.forProtocol(_Ask), interface="127.0.0.1")
"""


def worst_stall(port: int) -> float:
    """The node's longest reactor turn (seconds) since the last call; resets it."""
    with socket.create_connection((HOST, port), timeout=60) as s:
        s.sendall(b"?")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            reply += chunk
    return float(reply)


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def send(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    began = time.perf_counter()
    try:
        conn.request("POST", "/" + path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), time.perf_counter() - began
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="sends of each probe (figures: the worst and the median)")
    parser.add_argument("--only", action="append", help="run only the probes with these names")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args()

    harness = Harness("hostile")
    redis = None
    try:
        _, redis_port = harness.redis()
        front_stall, consumer_stall = free_port(), free_port()
        node, port, datadir = harness.emond(redis_port, extra="consume = false\n", prelude=HEARTBEAT.format(port=front_stall))
        consumer, _, _ = harness.emond(redis_port, consumer_of=datadir, prelude=HEARTBEAT.format(port=consumer_stall))
        redis = Redis(redis_port)
        key = register(port)
        worst_stall(front_stall)
        time.sleep(1.0)
        print(f"front emond pid {node.pid}, consumer emond pid {consumer.pid}; "
              f"worst turn of the idle front node over 1 s: {worst_stall(front_stall) * 1000:.1f} ms", flush=True)
        print(f"{'probe':<16} {'answer':<42} {'request s':>9} {'front stall ms':>15} {'consumer ms':>15} {'front RSS MB':>12}")
        print(f"{'':<16} {'':<42} {'':>9} {'worst / med':>15} {'worst / med':>15} {'+grow  peak':>12}")
        for probe in probes():
            if args.only and probe.name not in args.only:
                continue
            stalls, afters, grows, answers, took = [], [], [], [], []
            peak = 0
            for _ in range(args.repeat):
                path, body, headers = probe.make(key, int(time.time()))
                wait_drained(redis, DRAIN_TIMEOUT)
                before, _ = rss(node.pid)
                worst_stall(front_stall)
                worst_stall(consumer_stall)
                code, answer, seconds = send(port, path, body, headers)
                stall = worst_stall(front_stall)
                wait_drained(redis, DRAIN_TIMEOUT)
                after = worst_stall(consumer_stall)
                now_rss, hwm = rss(node.pid)
                stalls.append(stall)
                afters.append(after)
                grows.append((now_rss - before) / 1024)
                peak = max(peak, hwm)
                took.append(seconds)
                answers.append(f"{code} {answer[:60].decode('utf-8', 'replace')}")
            answer = answers[-1] if len(set(answers)) == 1 else " | ".join(sorted(set(answers)))
            print(f"{probe.name:<16} {answer[:42]:<42} {max(took):>9.3f} {max(stalls) * 1000:>7.0f} /{statistics.median(stalls) * 1000:>5.0f}"
                  f" {max(afters) * 1000:>7.0f} /{statistics.median(afters) * 1000:>5.0f} {max(grows):>+6.0f} {peak / 1024:>5.0f}", flush=True)
            print(f"{'':<16} {probe.what}", flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} at the end (the machine is shared)")
    finally:
        if redis is not None:
            redis.close()
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
