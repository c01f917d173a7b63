"""Every benchmark, one after the other, and one table of their figures.

Run: ``bench/all [--quick] [--only NAME ...] [--rss-duration 3600] [--log FILE]``. Prints figures;
it is not a test.

Each bench runs as its own script, as one would run it by hand (the arguments are listed
below, ``--quick`` gives shorter runs for trying this script, not for quoting). Their output
goes to the log file (default: a temp file, named at the end); each bench appends its
headline figures to a summary file (``_harness.report``), which the table is made of:
measure, figure, anchor (a goal, or the figure it is compared with), ratio and whether the
goal is met. The figures of one run on a shared 2-core machine move by ±10–40 % from run
to run (see bench/README.md): the table says what one run measured, not a precise cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import ROOT, SUMMARY, described  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# name: (full arguments, --quick arguments)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # --split: the accepting process on its own core, its consumer on the other (with wrk), the
    # shape the README recommends for a busy entry point ([input] consume = false); --redis-cpu 1:
    # the Redis server with the consumer, whose reads and commits are most of its work, so the
    # accepting process has its core to itself, as the bare server has.
    "ingest": (["ingest.py", "--split", "--redis-cpu", "1"], ["ingest.py", "--split", "--redis-cpu", "1", "--rounds", "1", "--duration", "3"]),
    "e2e": (["e2e.py"], ["e2e.py", "--points", "200000"]),
    "engines": (["engines.py"], ["engines.py"]),
    "stream": (["stream.py", "--batches", "60"], ["stream.py", "--batches", "5"]),
    "processes": (["processes.py"], ["processes.py", "--rounds", "1", "--duration", "3"]),
    "rss": (["rss.py"], ["rss.py", "--users", "2000", "--duration", "60", "--warmup", "30"]),
}


def number(value: float, unit: str) -> str:
    if unit in ("ms", "MB") or abs(value) < 100:
        return f"{value:,.2f} {unit}" if abs(value) < 10 else f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def table(rows: list[dict]) -> str:
    out = ["| measure | figure | anchor | ratio | goal |", "|---|---|---|---|---|"]
    for r in rows:
        anchor, goal = r["anchor"], r["goal"]
        anchor_text = f"{number(anchor, r['unit'])} ({r['anchor_is']})" if anchor is not None else "—"
        ratio = r["figure"] / anchor if anchor else None
        if ratio is None or goal is None:
            verdict = "—"
        else:
            met = ratio >= goal if r["better"] == "higher" else ratio <= goal
            verdict = f"{'≥' if r['better'] == 'higher' else '≤'} {goal:g}: {'met' if met else 'MISSED'}"
        note = f" ({r['note']})" if r["note"] else ""
        out.append(f"| {r['measure']}{note} | {number(r['figure'], r['unit'])} | {anchor_text} | "
                   f"{'—' if ratio is None else f'{ratio:.2f}'} | {verdict} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short runs: to try the script, not to quote")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="these benches only")
    parser.add_argument("--rss-duration", type=float, help="seconds of posting in bench/rss.py (default its own, an hour)")
    parser.add_argument("--log", help="where the benches' own output goes (default: a temp file)")
    args = parser.parse_args()

    log = args.log or tempfile.mkstemp(prefix="emond-bench-all-", suffix=".log")[1]
    summary = tempfile.mkstemp(prefix="emond-bench-summary-", suffix=".jsonl")[1]
    env = dict(os.environ, **{SUMMARY: summary})
    commit = described()
    print(f"emond {commit}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start; benches' output in {log}", flush=True)
    failed = []
    with open(log, "ab") as out:
        for name in args.only or list(BENCHES):
            argv = list(BENCHES[name][1 if args.quick else 0])
            if name == "rss" and args.rss_duration:
                argv += ["--duration", str(args.rss_duration)]
            began = time.monotonic()
            print(f"  {name}: {' '.join(argv)} ...", end="", flush=True)
            out.write(f"\n===== bench/{' '.join(argv)}\n".encode())
            out.flush()
            done = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, cwd=ROOT)
            took = time.monotonic() - began
            print(f" {'done' if done.returncode == 0 else f'FAILED ({done.returncode})'} in {took:.0f} s", flush=True)
            if done.returncode != 0:
                failed.append(name)
    with open(summary) as f:
        rows = [json.loads(row) for row in f if row.strip()]
    os.unlink(summary)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    print(table(rows))
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (their output: {log})")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
