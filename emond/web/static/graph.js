// /graph?feeds=ID[,ID...]&start=&end= — a time-series graph of feeds, drawn with Dygraphs.
//
// The view (feeds, start, end in unix seconds; the last 24 h by default) is read from the URL
// and written back with history.replaceState. Each view is one feed/data.json request for all
// its feeds at an interval giving ~800 points; drag to zoom (refetches at the new resolution),
// double-click to zoom out, range presets end at now, "Follow" moves the window to now every 10 s.
//
// Hooks for browser tests:
//   #graph                the container (Dygraph draws its canvases inside)
//   button[data-range]    presets: hour, day, week, month, year
//   #average, #follow     checkboxes
//   #legend               hover readout: time, then each feed's name and value
//   #graph-error          the message when a request fails (or the charting library is missing)
//   #graph-note           names the feeds of the URL left out (gone, or not readable)
//   body[data-graph-state] "loading" | "drawn" | "error" | "empty" (no feed chosen);
//   body[data-points]      rows drawn by the last draw; performance mark "graph-drawn" at each draw
//   body[data-draws]       draws so far: wait for it to grow after an action (a local fetch can
//                          be drawn before the test looks, so "drawn" alone may be the old draw)
//   #feed-add (select), #graph-feeds li[data-feedid] button.remove-feed: the feed picker

import { $, api, button, el, ENGINES, every, fmtTime, fmtValue, groupByTag, now, showMessage } from "./common.js";

const POINTS = 800; // rows wanted per view
const FOLLOW_MS = 10000;
const RANGES = { hour: 3600, day: 86400, week: 7 * 86400, month: 30 * 86400, year: 365 * 86400 };
const MIN_SPAN = 60; // seconds: a narrower zoom is widened to this
const CACHE = "emond.feedIntervals"; // feed intervals seen in feed/list, see knownIntervals()

const view = readUrl();
const intervals = knownIntervals(); // feed id -> its own interval (seconds; 1 for PHPTimeSeries)
const names = new Map(); // feed id -> name, from feed/list
const timeseries = new Set(); // ids of PHPTimeSeries feeds (irregular records, no interval)
let graph = null; // the Dygraph, made at the first draw
let request = 0; // number of the latest data request: only the latest one draws
let early = null; // the data request made before feed/list answered, if any

if (typeof Dygraph === "undefined") {
  // /lib/dygraphs/dygraph.min.js did not load (the request failed, or libjs-dygraphs is not installed)
  fail(new Error("The graph cannot be drawn: its charting library (Dygraphs) did not load. Reload the page; if this stays, the server lacks libjs-dygraphs."));
} else {
  start();
}

function start() {
  // Dygraph's legend plugin writes style="" attributes (in HTML and with setAttribute), which
  // the page's CSP (style-src 'self') refuses; the legend is drawn here instead (showLegend).
  Dygraph.PLUGINS = Dygraph.PLUGINS.filter((p) => p !== Dygraph.Plugins.Legend);
  // Start the data request before anything else when the feeds' intervals are already known
  // (remembered from an earlier feed/list): the list is then fetched alongside, not before it.
  early = view.ids.length && view.ids.every((id) => intervals.has(id)) ? load() : null;
  const listing = api("feed/list.json");
  setup();
  listing.then(listed, fail);
}

function readUrl() {
  const q = new URLSearchParams(location.search);
  const ids = (q.get("feeds") || "").split(",").filter((s) => /^[0-9]+$/.test(s));
  const seconds = (text) => {
    const n = Number.parseInt(text, 10);
    return n > 1e11 ? Math.floor(n / 1000) : n; // milliseconds, as feed/data.json also takes
  };
  let end = seconds(q.get("end"));
  let start = seconds(q.get("start"));
  if (!Number.isFinite(end)) end = now();
  if (!Number.isFinite(start) || start >= end) start = end - RANGES.day;
  return { ids: [...new Set(ids)], start, end, average: q.get("average") === "1" };
}

function writeUrl() {
  const q = new URLSearchParams({ feeds: view.ids.join(","), start: view.start, end: view.end });
  if (view.average) q.set("average", "1");
  history.replaceState(null, "", `${location.pathname}?${q.toString().replace(/%2C/g, ",")}`);
}

function knownIntervals() {
  try {
    return new Map(Object.entries(JSON.parse(localStorage.getItem(CACHE)) || {}));
  } catch {
    return new Map();
  }
}

function ownInterval(feed) {
  return Math.max(Number.parseInt(feed.interval, 10) || 1, 1);
}

async function listed(feeds) {
  const listedIntervals = {};
  for (const f of feeds) {
    intervals.set(f.id, ownInterval(f));
    listedIntervals[f.id] = ownInterval(f);
    names.set(f.id, f.name);
    if (ENGINES[f.engine]?.fixed === false) timeseries.add(f.id);
  }
  localStorage.setItem(CACHE, JSON.stringify(listedIntervals)); // the user's feeds: a deleted one leaves
  // A feed of the URL that is not in the list: another user's public feed (its meta says its
  // interval), or one that is gone or not readable, left out (one would fail the whole request).
  const metas = await Promise.all(view.ids.filter((id) => !names.has(id)).map((id) =>
    api("feed/getmeta.json", { id }).then((meta) => [id, meta], () => [id, null])));
  const missing = [];
  for (const [id, meta] of metas) {
    if (meta) intervals.set(id, Math.max(Number.parseInt(meta.interval, 10) || 1, 1));
    else missing.push(id);
  }
  if (missing.length) {
    view.ids = view.ids.filter((id) => !missing.includes(id));
    const which = missing.length === 1 ? `Feed ${missing[0]} is` : `Feeds ${missing.join(", ")} are`;
    showMessage($("graph-note"), `${which} left out: not found (deleted?) or not yours to read.`, "note");
  }
  fillPicker(feeds);
  if (missing.length || !early || early.interval !== autoInterval()) { // load() rewrites the URL
    load();
  } else if (graph) {
    graph.updateOptions(seriesOptions()); // drawn before the names were known
    showLegend();
  } // else: on its way at the right interval, and drawn with the names
}

function setup() {
  for (const preset of document.querySelectorAll("button[data-range]")) {
    preset.addEventListener("click", () => {
      view.end = now();
      view.start = view.end - RANGES[preset.dataset.range];
      load();
    });
  }
  const average = $("average");
  average.checked = view.average;
  average.addEventListener("change", () => {
    view.average = average.checked;
    load();
  });
  const follow = $("follow");
  const following = every(FOLLOW_MS, () => {
    if (!follow.checked || !view.ids.length) return undefined;
    const span = view.end - view.start;
    view.end = now();
    view.start = view.end - span;
    return load(); // the next move waits for this one's data
  });
  follow.addEventListener("change", () => following.run());
  $("feed-add").addEventListener("change", (event) => {
    const id = event.target.value;
    event.target.value = "";
    if (id && !view.ids.includes(id)) {
      view.ids.push(id);
      fillPicker();
      load();
    }
  });
}

// The interval: ceil(span / 800) rounded up to a multiple of every feed's own interval, so
// each row falls on a stored slot of each feed and all feeds share their row times.
function autoInterval() {
  const step = view.ids.reduce((m, id) => lcm(m, intervals.get(id) || 1), 1);
  const wanted = Math.max(Math.ceil((view.end - view.start) / POINTS), 1);
  return Math.ceil(wanted / step) * step;
}

function lcm(a, b) {
  let [x, y] = [a, b];
  while (y) [x, y] = [y, x % y];
  return (a / x) * b;
}

// Fetch the view's data (one request for all feeds) and draw it. Returns the promise, with
// the interval asked for as .interval (listed() compares it once the feeds are known).
function load() {
  writeUrl();
  const number = ++request;
  if (!view.ids.length) {
    showEmpty();
    return Object.assign(Promise.resolve(), { interval: 0 });
  }
  setState("loading");
  const interval = autoInterval();
  const start = Math.floor(view.start / interval) * interval; // rows on the feeds' slots
  const params = {
    ids: view.ids.join(","),
    start,
    end: view.end,
    interval,
    average: view.average ? 1 : 0,
    skipmissing: 0,
    timeformat: "unixms",
  };
  const done = api("feed/data.json", params).then(
    (answer) => number === request && draw(answer),
    (error) => number === request && fail(error),
  );
  return Object.assign(done, { interval });
}

// [{feedid, data: [[ms, value], ...]}, ...] -> Dygraph's rows [Date, v1, v2, ...], by time.
function rows(answer) {
  const byTime = new Map();
  answer.forEach((series, i) => {
    for (const [ms, value] of series.data) {
      let row = byTime.get(ms);
      if (!row) {
        row = new Array(answer.length + 1).fill(null);
        row[0] = ms;
        byTime.set(ms, row);
      }
      row[i + 1] = value;
    }
  });
  const out = [...byTime.values()].sort((a, b) => a[0] - b[0]);
  for (const row of out) row[0] = new Date(row[0]);
  return out;
}

// Labels (the feeds' names) and per-series options: a PHPTimeSeries feed has records at
// irregular times, most rows are empty for it, so its points are joined across them.
function seriesOptions() {
  const labels = ["time"];
  const series = {};
  for (const id of view.ids) {
    let name = names.get(id) || `feed ${id}`;
    if (labels.includes(name)) name = `${name} (${id})`; // Dygraph needs distinct labels
    labels.push(name);
    series[name] = { connectSeparatedPoints: timeseries.has(id) };
  }
  return { labels, series };
}

function draw(answer) {
  const file = rows(answer);
  showMessage($("graph-error"), "");
  $("graph-empty").hidden = file.some((row) => row.some((v, i) => i > 0 && v !== null));
  const data = file.length ? file : [[new Date(view.start * 1000), ...view.ids.map(() => null)]];
  const options = {
    ...seriesOptions(),
    dateWindow: [view.start * 1000, view.end * 1000], // the asked range, even where no data is yet
  };
  if (graph) {
    graph.updateOptions({ ...options, file: data });
  } else {
    graph = new Dygraph($("graph"), data, {
      ...options,
      connectSeparatedPoints: false, // null values are gaps (PHPFina)
      strokeWidth: 1.5,
      labelsKMB: true,
      animatedZooms: false, // one zoomCallback, at once
      highlightCallback: (event, x, points) => showLegend(x, points),
      unhighlightCallback: () => showLegend(),
      zoomCallback: zoomed,
      interactionModel: { ...Dygraph.defaultInteractionModel, dblclick: zoomOut },
    });
  }
  showLegend();
  document.body.dataset.points = String(file.length);
  document.body.dataset.draws = String(Number(document.body.dataset.draws || 0) + 1);
  performance.mark("graph-drawn"); // for measuring the time to the first graph
  setState("drawn");
}

// A drag zoomed the graph to [min, max] ms: fetch that range at its own resolution.
function zoomed(min, max) {
  const start = Math.floor(min / 1000);
  const end = Math.ceil(max / 1000);
  if (start === view.start && end === view.end) return; // a vertical (value) zoom
  const middle = (start + end) / 2;
  const span = Math.max(end - start, MIN_SPAN);
  view.start = Math.round(middle - span / 2);
  view.end = view.start + span;
  $("follow").checked = false; // a past range was chosen
  load();
}

function zoomOut(event) {
  event.preventDefault();
  const span = (view.end - view.start) * 2;
  view.end = Math.min(Math.round(view.end + span / 4), now());
  view.start = Math.round(view.end - span);
  load();
}

// The hover readout: the time, then each feed's name and value (without a hover, the names).
function showLegend(x, points = []) {
  const legend = $("legend");
  legend.replaceChildren();
  if (!graph) return;
  const colors = graph.getColors();
  const values = new Map(points.map((p) => [p.name, p.yval]));
  if (x !== undefined) legend.append(el("span", { class: "legend-time", text: fmtTime(x / 1000) }));
  graph.getLabels().slice(1).forEach((name, i) => {
    const swatch = el("span", { class: "legend-swatch" });
    swatch.style.backgroundColor = colors[i]; // CSSOM: allowed by the CSP, unlike style=""
    const item = el("span", { class: "legend-item" }, swatch, el("span", { class: "legend-name", text: name }));
    if (x !== undefined) {
      const v = values.get(name);
      item.append(el("span", { class: "legend-value", text: fmtValue(Number.isFinite(v) ? v : null) }));
    }
    legend.append(item);
  });
}

function fillPicker(feeds) {
  if (feeds) fillPicker.feeds = feeds;
  const all = fillPicker.feeds || [];
  const select = $("feed-add");
  const groups = groupByTag(all.filter((f) => !view.ids.includes(f.id))).map(([tag, list]) =>
    el("optgroup", { label: tag || "(no tag)" }, ...list.map((f) => el("option", { value: f.id, text: f.name }))),
  );
  select.replaceChildren(el("option", { value: "", text: "Add a feed…" }), ...groups);
  $("graph-feeds").replaceChildren(
    ...view.ids.map((id) =>
      el(
        "li",
        { "data-feedid": id },
        el("span", { text: names.get(id) || `feed ${id}` }),
        button("remove-feed", "×", () => remove(id), { title: "Remove from the graph" }),
      ),
    ),
  );
}

function remove(id) {
  view.ids = view.ids.filter((i) => i !== id);
  fillPicker();
  load();
}

function showEmpty() {
  if (graph) {
    graph.destroy();
    graph = null;
  }
  $("legend").replaceChildren();
  $("graph-empty").hidden = false;
  document.body.dataset.points = "0";
  setState("empty");
}

function fail(error) {
  showMessage($("graph-error"), error);
  setState("error");
}

function setState(state) {
  document.body.dataset.graphState = state;
}
