"""HTTP ingest benchmark: ``input/post`` against a bare twisted.web server, and ``input/bulk``.

Run: ``python bench/ingest.py [--duration 10] [--rounds 3] [--profile]``. Prints figures;
it is not a test.

Starts a private redis-server (free port, temp dir, no persistence:
``--save '' --appendonly no``), a real ``twistd -n emond`` (temp config:
free port, temp datadir, SQLite, ``[input] rate_limit = 0.0``) and a bare
twisted.web server (one leaf Resource answering ``ok``). The servers
(emond, its redis-server and the bare server) are pinned to one core
(``taskset -c 0``), wrk to the other (``taskset -c 1``). Then, alternating,
``wrk -t1 -c32 --latency`` for 10 s per run against emond's
``GET /input/post.json?apikey=KEY&node=bench&csv=1,2,3`` and against the bare
server, 3 rounds each; then, 3 rounds each, emond's input/post at half load (each
connection waits before each request, a wrk Lua ``delay()``, so that all together post
about half the median rate just measured; p50/p99) and the bare server at the same pace;
then 3 runs of ``POST /input/bulk.json`` with 100 frames per request (a wrk Lua script).

Before each run the emond input queues are waited empty: the node process
also consumes what it accepted (the consumer runs in the same process, on
the same pinned core), and a backlog left by one run would otherwise eat the
next run's CPU — including the bare server's. The time that drain takes is
printed too. ``--split`` runs emond with ``[input] consume = false`` and a
second, consumer-only ``twistd emond`` (same Redis and database) on wrk's
core. ``--profile`` adds one more run of each emond load with
``py-spy record`` attached to the twistd process and prints the hot spots.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import HOST, Harness, Redis, cpu_seconds, described, profile, register, report, wait_drained  # noqa: E402

POST_TARGET, POST_GOAL = 0.5, 0.75  # emond input/post requests/s over the bare server's
HALF_P99_GOAL = 5.0  # ms: input/post's p99 at half the measured maximum rate (issue 14)
BULK_TARGET = 100_000  # frames/s (the first target)
BULK_GOAL = 200_000  # frames/s accepted per core (issue 14)
DRAIN_TIMEOUT = 900.0


def ensure_program(name: str, package: str | None = None) -> str:
    """The path of program ``name``, installed with apt-get (Debian package ``package``, or
    ``name``) if missing."""
    found = shutil.which(name)
    if found:
        return found
    package = package or name
    print(f"{name} is missing: apt-get install -y {package}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=True)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} could not be installed")
    return found


def ensure_wrk() -> str:
    return ensure_program("wrk")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p50/p99 latency (ms), request count, non-2xx and socket errors of one wrk run."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"could not parse wrk's output:\n{output}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "p50": _ms(*p50.groups()),
        "p99": _ms(*p99.groups()),
        "requests": int(total.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
    }




def run_wrk(wrk: str, cpu: str, url: str, duration: float, connections: int, script: str | None = None,
            pid: int | None = None) -> dict[str, float]:
    """One wrk run; with ``pid``, also the CPU time that server process used per request
    (``cpu_us``): unlike requests/s, hardly moved by other processes sharing the core."""
    argv = ["taskset", "-c", cpu, wrk, "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency"]
    if script:
        argv += ["-s", script]
    before = cpu_seconds(pid) if pid else 0.0
    done = subprocess.run(argv + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60)
    used = cpu_seconds(pid) - before if pid else 0.0
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{output}")
    result = parse_wrk(output)
    result["cpu_us"] = 1e6 * used / result["requests"] if pid and result["requests"] else float("nan")
    if result["non2xx"]:
        raise RuntimeError(f"{url}: {result['non2xx']} answers were not 2xx: the figures would be meaningless\n{output}")
    return result


def fetch(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def expect_ok(what: str, url: str, body: bytes | None = None) -> None:
    code, answer = fetch(url, body)
    if code != 200 or answer != b"ok":
        raise SystemExit(f"FAIL: {what} answered {code} {answer[:300]!r}, expected 200 'ok'; not measuring")


def counters(port: int) -> dict[str, float]:
    """emond's frames accepted and packets processed, from /metrics."""
    _, text = fetch(f"http://{HOST}:{port}/metrics")
    found = {}
    for name in ("emond_input_frames_accepted_total", "emond_packets_processed_total"):
        m = re.search(rf"^{name} ([\d.e+]+)$", text.decode(), re.M)
        found[name] = float(m.group(1)) if m else float("nan")
    return found


def bulk_body(key: str, frames: int, now: int) -> str:
    data = json.dumps([[i, "bench", 1, 2, 3] for i in range(frames)], separators=(",", ":"))
    return urllib.parse.urlencode({"data": data, "time": str(now - 3600), "apikey": key})


def lua_post(path: str, body: str) -> None:
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write('wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n')
        f.write(f"wrk.body = {json.dumps(body)}\n")  # a JSON string literal is a valid Lua one here (ASCII, no \\u)


def lua_paced(path: str, rate: float, connections: int) -> float:
    """A wrk script that waits before each request of a connection so that ``connections``
    connections together post about ``rate`` requests/s (less by the answers' own time);
    the delay in ms."""
    delay = max(1, round(1000.0 * connections / rate))
    with open(path, "w") as f:
        f.write(f"function delay()\n  return {delay}\nend\n")
    return delay


def emonhub_body(frames: int) -> bytes:
    """What emonhub sends: the frames' JSON, zlib-compressed, as the raw body (``cb=1``)."""
    return zlib.compress(json.dumps([[i, "bench", 1, 2, 3] for i in range(frames)], separators=(",", ":")).encode())


def lua_post_binary(path: str, body: bytes, key: str) -> None:
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        f.write('wrk.body = "' + "".join(f"\\{b}" for b in body) + '"\n')  # Lua decimal escapes: binary-safe


def line(label: str, r: dict[str, float], extra: str = "") -> str:
    errors = f", {int(r['socket_errors'])} socket errors" if r["socket_errors"] else ""
    cpu = f"   CPU {r['cpu_us']:6.0f} us/req" if r.get("cpu_us", float("nan")) == r.get("cpu_us") else ""
    return f"  {label:<22} {r['rps']:>10,.0f} req/s   p50 {r['p50']:7.2f} ms   p99 {r['p99']:7.2f} ms{cpu}{errors}{extra}"


def drain(redis: Redis, port: int) -> tuple[str, float]:
    """Wait until the queues are empty: a line saying how big the backlog was, and the seconds."""
    before = counters(port)["emond_packets_processed_total"]
    took = wait_drained(redis, DRAIN_TIMEOUT)
    processed = counters(port)["emond_packets_processed_total"] - before
    if processed > 0 and took > 0.1:
        return f"backlog {processed:,.0f} packets drained in {took:.1f} s ({processed / took:,.0f} packets/s)", took
    return f"backlog {processed:,.0f} packets drained in {took:.1f} s", took


def bulk_rounds(label: str, url: str, script: str, args: argparse.Namespace, wrk: str, redis: Redis, metrics_port: int,
                pid: int | None = None) -> dict[str, float]:
    """``args.rounds`` wrk runs of a bulk load, each followed by its drain; the medians. Besides
    wrk's figures, "processed" is the frames/s of the whole job: every frame accepted in the
    run, over the run plus the time its backlog took to process."""
    runs = []
    wait_drained(redis, DRAIN_TIMEOUT)
    for r in range(1, args.rounds + 1):
        result = run_wrk(wrk, args.wrk_cpu, url, args.duration, args.connections, script, pid)
        accepted = result["rps"] * args.frames
        result["per_cpu"] = 1e6 * args.frames / result["cpu_us"]
        print(line(f"round {r} {label}", result, f"   {accepted:,.0f} frames/s, {result['per_cpu']:,.0f} frames per CPU-second"), flush=True)
        text, took = drain(redis, metrics_port)
        result["processed"] = accepted * args.duration / (args.duration + took)
        print(f"    {text}; accepted and processed: {result['processed']:,.0f} frames/s", flush=True)
        runs.append(result)
    return {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "processed", "per_cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--frames", type=int, default=100, help="frames per input/bulk request")
    parser.add_argument("--server-cpu", default="0", help="core of emond, its redis-server and the bare server")
    parser.add_argument("--redis-cpu", help="core of the redis-server if not --server-cpu's (with --split: where the "
                                            "consumer's Redis work, reads and commits, then runs: with the consumer)")
    parser.add_argument("--wrk-cpu", default="1")
    parser.add_argument("--split", action="store_true",
                        help="emond only accepts ([input] consume = false); a second twistd emond on the wrk core consumes")
    parser.add_argument("--profile", action="store_true", help="one more run per load with py-spy on emond")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, raw profiles)")
    args = parser.parse_args()

    wrk = ensure_wrk()
    commit = described()
    print(f"emond {commit}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    harness = Harness("ingest")
    redis = None
    try:
        redis_cpu = args.redis_cpu or args.server_cpu
        redis_server, redis_port = harness.redis(cpu=redis_cpu)
        node, port, datadir = harness.emond(redis_port, cpu=args.server_cpu, extra="consume = false\n" if args.split else "")
        metrics_port = port  # where emond_packets_processed_total is counted
        if args.split:
            consumer, metrics_port, _ = harness.emond(redis_port, cpu=args.wrk_cpu, consumer_of=datadir)
            print(f"--split: emond pid {node.pid} only accepts; consumer pid {consumer.pid} on core {args.wrk_cpu} consumes", flush=True)
        bare, bare_port = harness.bare(cpu=args.server_cpu)
        redis = Redis(redis_port)
        key = register(port)
        post_url = f"http://{HOST}:{port}/input/post.json?apikey={key}&node=bench&csv=1,2,3"
        bulk_url = f"http://{HOST}:{port}/input/bulk.json"
        bare_url = f"http://{HOST}:{bare_port}/"
        body = bulk_body(key, args.frames, int(time.time()))
        script = os.path.join(harness.base, "bulk.lua")
        lua_post(script, body)
        print(f"emond pid {node.pid} on :{port}, bare pid {bare.pid} on :{bare_port}, redis-server pid {redis_server.pid} "
              f"(emond and bare on core {args.server_cpu}, redis-server on core {redis_cpu}); wrk on core {args.wrk_cpu}; "
              f"bulk body {len(body):,} bytes", flush=True)
        expect_ok("emond input/post", post_url)
        expect_ok("bare server GET", bare_url)
        expect_ok("bare server POST", bare_url, b"x=1")
        expect_ok("emond input/bulk", bulk_url, body.encode())
        wait_drained(redis, DRAIN_TIMEOUT)  # the first packets create the inputs

        # warm-up (not counted): connections, caches, the first flushes
        run_wrk(wrk, args.wrk_cpu, post_url, 2, args.connections)
        run_wrk(wrk, args.wrk_cpu, bare_url, 2, args.connections)
        wait_drained(redis, DRAIN_TIMEOUT)

        print(f"\ninput/post vs bare twisted.web: wrk -t1 -c{args.connections} --latency, {args.duration:.0f} s per run", flush=True)
        emond_runs, bare_runs = [], []
        for r in range(1, args.rounds + 1):
            appends = redis.calls("XADD")
            e = run_wrk(wrk, args.wrk_cpu, post_url, args.duration, args.connections, pid=node.pid)
            per_append = e["requests"] / max(redis.calls("XADD") - appends, 1)
            print(line(f"round {r} emond post", e, f"   {per_append:.2f} requests per XADD"), flush=True)
            print(f"    {drain(redis, metrics_port)[0]}", flush=True)
            b = run_wrk(wrk, args.wrk_cpu, bare_url, args.duration, args.connections, pid=bare.pid)
            print(line(f"round {r} bare", b, f"   ratio {e['rps'] / b['rps']:.2f}, by CPU per request {b['cpu_us'] / e['cpu_us']:.2f}"), flush=True)
            emond_runs.append(e)
            bare_runs.append(b)
        expect_ok("emond input/post after the runs", post_url)
        med = {k: statistics.median(r[k] for r in emond_runs) for k in ("rps", "p50", "p99", "cpu_us")}
        bmed = {k: statistics.median(r[k] for r in bare_runs) for k in ("rps", "p50", "p99", "cpu_us")}
        ratio = med["rps"] / bmed["rps"]
        cpu_ratio = bmed["cpu_us"] / med["cpu_us"]

        # Half load: the latency a device sees when the node is not saturated (the goal's p99).
        paced = os.path.join(harness.base, "paced.lua")
        delay = lua_paced(paced, med["rps"] / 2, args.connections)
        print(f"\ninput/post at half load: wrk -t1 -c{args.connections}, each connection waiting {delay} ms before each request "
              f"(about {med['rps'] / 2:,.0f} req/s, half the median above); the bare server at the same pace", flush=True)
        half_runs, bare_half_runs = [], []
        for r in range(1, args.rounds + 1):
            wait_drained(redis, DRAIN_TIMEOUT)
            e = run_wrk(wrk, args.wrk_cpu, post_url, args.duration, args.connections, paced)
            print(line(f"round {r} emond half", e), flush=True)
            b = run_wrk(wrk, args.wrk_cpu, bare_url, args.duration, args.connections, paced)
            print(line(f"round {r} bare same pace", b), flush=True)
            half_runs.append(e)
            bare_half_runs.append(b)
        half = {k: statistics.median(r[k] for r in half_runs) for k in ("rps", "p50", "p99")}
        bare_half = {k: statistics.median(r[k] for r in bare_half_runs) for k in ("rps", "p50", "p99")}

        print(f"\ninput/bulk, {args.frames} frames per request: wrk -t1 -c{args.connections} --latency, {args.duration:.0f} s per run", flush=True)
        bulk_med = bulk_rounds("emond bulk", bulk_url, script, args, wrk, redis, metrics_port, node.pid)
        expect_ok("emond input/bulk after the runs", bulk_url, body.encode())
        frames = bulk_med["rps"] * args.frames

        # The same frames as emonhub sends them: a zlib body (cb=1), sentat, a Bearer key.
        hub_url = f"http://{HOST}:{port}/input/bulk.json?sentat={args.frames}&cb=1"
        hub_script = os.path.join(harness.base, "emonhub.lua")
        hub_body = emonhub_body(args.frames)
        lua_post_binary(hub_script, hub_body, key)
        expect_ok("emonhub-style input/bulk", hub_url + f"&apikey={key}", hub_body)
        print(f"\ninput/bulk as emonhub sends it (cb=1, {len(hub_body):,}-byte zlib body, Bearer key), {args.frames} frames per request", flush=True)
        hub_med = bulk_rounds("emonhub bulk", hub_url, hub_script, args, wrk, redis, metrics_port, node.pid)
        hub_frames = hub_med["rps"] * args.frames

        print("\nSUMMARY (medians of rounds)")
        print(f"  emond input/post   {med['rps']:>10,.0f} req/s     p50 {med['p50']:.2f} ms  p99 {med['p99']:.2f} ms")
        print(f"  bare twisted.web   {bmed['rps']:>10,.0f} req/s     p50 {bmed['p50']:.2f} ms  p99 {bmed['p99']:.2f} ms")
        verdict = "goal met" if ratio >= POST_GOAL else ("target met" if ratio >= POST_TARGET else "MISSES the target")
        print(f"  RATIO emond/bare   {ratio:.2f}   (target >= {POST_TARGET}, goal {POST_GOAL}: {verdict})")
        print(f"  by CPU time per request: emond {med['cpu_us']:.0f} us, bare {bmed['cpu_us']:.0f} us: ratio {cpu_ratio:.2f} "
              f"(what one core would give each; emond's includes its consumer unless --split)")
        verdict = "goal met" if half["p99"] <= HALF_P99_GOAL else "MISSES the goal"
        print(f"  emond post, half load {half['rps']:>7,.0f} req/s     p50 {half['p50']:.2f} ms  p99 {half['p99']:.2f} ms   "
              f"(goal p99 <= {HALF_P99_GOAL:g} ms: {verdict}); bare at the same pace: p50 {bare_half['p50']:.2f} ms  "
              f"p99 {bare_half['p99']:.2f} ms")
        verdict = "target met" if frames >= BULK_TARGET else "MISSES the target"
        print(f"  emond input/bulk   {bulk_med['rps']:>10,.0f} req/s  =  {frames:,.0f} frames/s   p50 {bulk_med['p50']:.2f} ms  "
              f"p99 {bulk_med['p99']:.2f} ms   (target >= {BULK_TARGET:,}: {verdict})")
        verdict = "target met" if hub_frames >= BULK_TARGET else "MISSES the target"
        print(f"  emonhub-style bulk {hub_med['rps']:>10,.0f} req/s  =  {hub_frames:,.0f} frames/s   p50 {hub_med['p50']:.2f} ms  "
              f"p99 {hub_med['p99']:.2f} ms   (target >= {BULK_TARGET:,}: {verdict})")
        where = f"with the consumer process on core {args.wrk_cpu}" if args.split else "on the one core"
        print(f"  frames per CPU-second of the accepting process (median): form bulk {bulk_med['per_cpu']:,.0f}, "
              f"emonhub-style {hub_med['per_cpu']:,.0f}" + ("" if args.split else " (its consumer included)"))
        print(f"  accepted and processed {where} (run + drain): form bulk {bulk_med['processed']:,.0f} frames/s, "
              f"emonhub-style {hub_med['processed']:,.0f} frames/s")
        print(f"  load average {os.getloadavg()[0]:.2f} at the end (the machine is shared)", flush=True)
        shape = "accepting process; its consumer on the other core" if args.split else "consumer in the same process"
        if redis_cpu != args.server_cpu:
            shape += f", Redis on core {redis_cpu}"
        report("input/post req/s, emond vs bare twisted.web on the same core", med["rps"], "req/s", bmed["rps"], "bare twisted.web",
               goal=POST_GOAL, note=f"{shape}; by CPU time per request {cpu_ratio:.2f}")
        report("input/post p99 at half load", half["p99"], "ms", HALF_P99_GOAL, "goal", "lower",
               note=f"{half['rps']:,.0f} req/s; bare twisted.web at the same pace p99 {bare_half['p99']:.2f} ms")
        for label, figures in (("form body", bulk_med), ("as emonhub sends it", hub_med)):
            report(f"input/bulk frames/s accepted on one core, {label}", figures["rps"] * args.frames, "frames/s", BULK_GOAL, "goal",
                   note=f"{shape}; {figures['per_cpu']:,.0f} frames per CPU-second")

        if args.profile:
            for label, url, lua in (("input/post", post_url, None), ("input/bulk", bulk_url, script), ("emonhub bulk", hub_url, hub_script)):
                wait_drained(redis, DRAIN_TIMEOUT)
                print(f"\nPROFILE emond during {label} (py-spy record, {args.duration:.0f} s, on core {args.wrk_cpu} with wrk)", flush=True)
                out = os.path.join(harness.base, f"profile-{label.replace('/', '-')}.txt")
                summary: list[str] = []
                spy = threading.Thread(target=lambda: summary.append(profile(node.pid, args.duration, out, cpu=args.wrk_cpu)))
                spy.start()
                time.sleep(0.5)
                r = run_wrk(wrk, args.wrk_cpu, url, args.duration, args.connections, lua)
                spy.join()
                print(line(f"{label} (profiled)", r))
                print(summary[0] if summary else "py-spy gave nothing", flush=True)
    finally:
        if redis is not None:
            redis.close()
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
