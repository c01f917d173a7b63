"""First paint of ``/graph`` over a year of 10 s data (issue 15's goal: ≤ 1 s), in headless Chromium.

Run: ``python bench/graph_paint.py [--loads 5] [--days 365] [--average] [--keep]``. Prints figures; it is not a test.

A private redis-server and a real ``twistd -n emond`` (``_harness``: temp config, SQLite); a
user registered, a PHPFina feed at 10 s made through the API. The node is stopped, the
feed's files are written in the emoncms format (``<id>.meta`` ``<IIII`` 0, 0, interval,
start_time; ``<id>.dat`` float32 LE, one slot per 10 s: 3,153,600 values, 12.6 MB, a
daily curve with noise, ending now) and the node started again on them (its engine caches a
feed's meta once opened). Debian's Chromium, headless, at 1280x800 (tests/support/browser.py's
``new_driver``), logs in through the form, then loads
``/graph?feeds=ID&start=<now - 1 year>&end=<now>`` ``--loads`` times, in two ways:

- cold: the HTTP cache and the page's localStorage emptied before the load (graph.js then
  learns the feed's interval from ``feed/list.json`` before it asks for the data);
- warm: straight after another load (static files revalidated by ETag, the interval known).

Per load: first paint and first contentful paint (``performance.getEntriesByType("paint")``),
the time the page set ``body[data-graph-state="drawn"]`` (a MutationObserver injected before
the page's scripts, through the DevTools protocol: the page's CSP does not apply to it), the
``feed/data.json`` request's duration (Resource Timing), and the rows drawn. All are
milliseconds from the navigation's start. The medians are the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import HOST, ROOT, Harness, call, described, free_port, register, report  # noqa: E402

sys.path.insert(0, ROOT)
from tests.support.browser import new_driver, require  # noqa: E402

INTERVAL = 10
PASSWORD = "benchpass1"  # _harness.register's
GOAL_MS = 1000.0

OBSERVER = """
window.__drawnAt = null;
new MutationObserver(() => {
  if (document.body && document.body.dataset.graphState === "drawn" && window.__drawnAt === null) {
    window.__drawnAt = performance.now();
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-graph-state"]});
"""

TIMINGS = """
const paint = Object.fromEntries(performance.getEntriesByType("paint").map((e) => [e.name, e.startTime]));
const data = performance.getEntriesByType("resource").filter((e) => e.name.includes("/feed/data.json"));
const nav = performance.getEntriesByType("navigation")[0];
return {
  first_paint: paint["first-paint"] ?? null,
  first_contentful_paint: paint["first-contentful-paint"] ?? null,
  drawn: window.__drawnAt,
  data_ms: data.length ? data[data.length - 1].duration : null,
  data_requests: data.length,
  html_ms: nav ? nav.responseEnd - nav.startTime : null,
  rows: Number(document.body.dataset.points || 0),
  state: document.body.dataset.graphState,
};
"""


def write_feed(datadir: str, feedid: int, days: int, now: int) -> tuple[int, int]:
    """The feed's files in the emoncms format: ``days`` of 10 s slots ending at ``now``; (start, slots)."""
    import numpy as np

    slots = days * 86400 // INTERVAL
    end = now // INTERVAL * INTERVAL
    start = end - (slots - 1) * INTERVAL
    t = start + np.arange(slots, dtype=np.float64) * INTERVAL
    rng = np.random.default_rng(15)
    day = 2 * np.pi * (t % 86400) / 86400
    season = 2 * np.pi * (t % (365 * 86400)) / (365 * 86400)
    values = 400 + 300 * np.sin(day - 2) + 150 * np.cos(season) + rng.normal(0, 40, slots)
    folder = os.path.join(datadir, "phpfina")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{feedid}.dat"), "wb") as f:
        f.write(values.astype("<f4").tobytes())
    with open(os.path.join(folder, f"{feedid}.meta"), "wb") as f:
        f.write(struct.pack("<IIII", 0, 0, INTERVAL, start))
    return start, slots


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)
    except Exception as e:
        raise SystemExit(f"{what}: not within {timeout:g} s at {driver.current_url} ({e.__class__.__name__}); "
                         f"console: {driver.get_log('browser')}") from None


def load(driver, url: str, cold: bool) -> dict:
    if cold:
        driver.execute_script("localStorage.clear()")
        driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    driver.get("about:blank")
    driver.get(url)
    wait_for(driver, lambda d: d.execute_script("return window.__drawnAt !== null || document.body.dataset.graphState === 'error'"),
             60, "the graph drawn")
    timings = driver.execute_script(TIMINGS)
    if timings["state"] != "drawn":
        raise SystemExit(f"the graph failed: {timings}; console: {driver.get_log('browser')}")
    severe = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    if severe:
        print(f"  console errors: {severe}", file=sys.stderr)
    return timings


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--loads", type=int, default=5, help="loads of each kind (cold, warm)")
    parser.add_argument("--days", type=int, default=365, help="days of 10 s data")
    parser.add_argument("--average", action="store_true", help="with the page's Average ticked (average=1)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args()
    require()

    print(f"emond {described()}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    harness = Harness("graphpaint")
    driver = None
    try:
        _, redis_port = harness.redis()
        server, port, datadir = harness.emond(redis_port)
        key = register(port)
        created = call(port, "feed/create.json", apikey=key, name="power", tag="house", engine="5", options='{"interval":10}')
        feedid = int(created["feedid"])
        server.stop()
        harness.servers.remove(server)
        now = int(time.time())
        start, slots = write_feed(datadir, feedid, args.days, now)
        print(f"feed {feedid}: {slots:,} slots of {INTERVAL} s from {start} ({slots * 4 / 1e6:.1f} MB)", flush=True)
        port = free_port()
        harness.emond(redis_port, port=port)  # the same folder: its database and datadir
        base = f"http://{HOST}:{port}"
        meta = call(port, f"feed/getmeta.json?id={feedid}&apikey={key}")
        if (meta.get("interval"), meta.get("start_time"), meta.get("npoints")) != (INTERVAL, start, slots):
            raise SystemExit(f"the node does not see the feed written: {meta}")

        driver = new_driver(harness.dir("chromium"))  # its temporary files: removed with the harness's
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": OBSERVER})
        driver.get(base + "/")
        driver.find_element("id", "login-username").send_keys("bench")
        driver.find_element("id", "login-password").send_keys(PASSWORD)
        driver.find_element("id", "login").click()
        wait_for(driver, lambda d: d.current_url.endswith("/inputs"), 30, "the inputs page after logging in")
        span = args.days * 86400
        end = now
        url = f"{base}/graph?feeds={feedid}&start={end - span}&end={end}" + ("&average=1" if args.average else "")
        load(driver, url, cold=False)  # the first load of all (the browser's own warm-up): not counted
        rows = {"cold": [], "warm": []}
        for _ in range(args.loads):  # alternating, so that a slow moment of the machine hits both
            for kind in ("cold", "warm"):
                rows[kind].append(load(driver, url, cold=kind == "cold"))
        average = "&average=1" if args.average else ""
        print(f"/graph?feeds={feedid}&start=<now-{args.days} d>&end=<now>{average}: {rows['warm'][0]['rows']} rows drawn, "
              "ms from navigation start")
        print(f"  {'load':<6} {'first paint':>12} {'FCP':>8} {'drawn':>8} {'data.json':>10} {'HTML':>6}")
        for kind in ("cold", "warm"):
            for r in rows[kind]:
                print(f"  {kind:<6} {r['first_paint']:>12.0f} {r['first_contentful_paint']:>8.0f} {r['drawn']:>8.0f} "
                      f"{r['data_ms']:>10.0f} {r['html_ms']:>6.0f}")
        for kind in ("cold", "warm"):
            fp, fcp, drawn, data = (median(rows[kind], k) for k in ("first_paint", "first_contentful_paint", "drawn", "data_ms"))
            verdict = "met" if drawn <= GOAL_MS else "MISSED"
            print(f"median of {args.loads} {kind}: first paint {fp:.0f} ms, first contentful paint {fcp:.0f} ms, "
                  f"graph drawn {drawn:.0f} ms (feed/data.json {data:.0f} ms); drawn <= {GOAL_MS:.0f} ms: {verdict}")
        cold_fp = median(rows["cold"], "first_paint")
        cold_drawn = median(rows["cold"], "drawn")
        how = ", average=1" if args.average else ""
        report(f"/graph first paint, a year of 10 s data (cold cache{how})", cold_fp, "ms", GOAL_MS, "goal", better="lower")
        report(f"/graph drawn, a year of 10 s data (cold cache{how})", cold_drawn, "ms", GOAL_MS, "goal", better="lower")
    finally:
        if driver is not None:
            driver.quit()
        harness.close(keep=args.keep)


if __name__ == "__main__":
    main()
