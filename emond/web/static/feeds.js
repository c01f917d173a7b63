// /feeds — the user's feeds grouped by tag (feed/list.json): name, engine, interval, size, last
// value and its age, refreshed in place every 10 s. Per feed: rename and retag (inline edit,
// feed/set.json), public toggle, delete with an in-page confirmation (feed/delete.json), a CSV
// download link (feed/csvexport.json) and a link to its graph; checkboxes and "Graph selected".
//
// Hooks for browser tests:
//   tr[data-feedid]                  one row per feed (#feeds table, a tbody.feed-group per tag)
//   button.rename, button.retag      open the inline editor (input.edit, button.save, button.cancel)
//   button.public-toggle             aria-pressed="true" when the feed is public
//   button.delete -> button.confirm-delete (or button.cancel-delete)
//   a.csv, a.graph-link              per row; input.select (checkbox) and a#graph-selected
//   #feeds-error                     the message of a failed request

import { $, api, ago, button, el, ENGINES, engineName, every, fmtTime, fmtValue, groupByTag, now, showMessage } from "./common.js";

const REFRESH_MS = 10000;
const CSV_RANGES = { day: 86400, week: 7 * 86400, month: 30 * 86400, year: 365 * 86400 };
const CSV_ROWS = 1500000; // below the API's 25 MiB CSV limit (17 bytes a row)

const selected = new Set(); // feed ids ticked, kept across refreshes
let feeds = []; // the last feed/list.json answer
let rowsById = new Map(); // feed id -> {tr, and the elements a refresh changes}
let shown = ""; // what the drawn tables show (ids, names, tags, public): a change redraws them
let busy = 0; // editors and confirmations open: a redraw would lose them, so it waits

const refreshing = every(REFRESH_MS, refresh); // refreshing.run(): now, after an action
$("csv-range").addEventListener("change", () => rowsById.forEach((r, id) => updateCsv(r, byId(id))));

async function refresh() {
  try {
    feeds = await api("feed/list.json");
    showMessage($("feeds-error"), "");
  } catch (e) {
    showMessage($("feeds-error"), e);
    return;
  }
  const layout = JSON.stringify(feeds.map((f) => [f.id, f.name, f.tag, f.public]));
  if (layout !== shown && !busy) {
    render();
    shown = layout;
  }
  for (const f of feeds) {
    const r = rowsById.get(f.id);
    if (r) update(r, f);
  }
}

function byId(id) {
  return feeds.find((f) => f.id === id);
}

function render() {
  rowsById = new Map();
  for (const id of [...selected]) if (!byId(id)) selected.delete(id);
  // One table (its columns line up across tags), a tbody per tag headed by the tag's name.
  const head = ["", "Name", "Tag", "Engine", "Interval", "Size", "Value", "Updated", ""].map((t) => el("th", { text: t }));
  const bodies = groupByTag(feeds).map(([tag, list]) =>
    el(
      "tbody",
      { class: "feed-group" },
      el("tr", { class: "group-head" }, el("th", { colspan: head.length, scope: "rowgroup", text: tag || "(no tag)" })),
      ...list.map(row),
    ),
  );
  const table = el("table", { class: "feeds" }, el("thead", {}, el("tr", {}, ...head)), ...bodies);
  $("feeds").replaceChildren(...(feeds.length ? [table] : []));
  $("feeds-empty").hidden = feeds.length > 0;
  updateSelected();
}

function row(f) {
  const check = el("input", { type: "checkbox", class: "select", "aria-label": `Select ${f.name}` });
  check.checked = selected.has(f.id);
  check.addEventListener("change", () => {
    if (check.checked) selected.add(f.id);
    else selected.delete(f.id);
    updateSelected();
  });
  // Kept by reference: an open editor or delete question takes some of them out of the row
  // for a while, and a refresh still updates them for when they come back.
  const r = {
    name: el("span", { class: "name" }),
    tag: el("span", { class: "tag" }),
    size: el("td", { class: "size" }),
    value: el("td", { class: "value" }),
    time: el("td", { class: "time" }),
    toggle: button("public-toggle", "", () => togglePublic(tr)),
    csv: el("a", { class: "csv", text: "CSV", download: "" }),
  };
  const tr = el(
    "tr",
    { "data-feedid": f.id },
    el("td", {}, check),
    el("td", { class: "name-cell" }, r.name, button("rename", "Rename", () => edit(tr, "name"))),
    el("td", { class: "tag-cell" }, r.tag, button("retag", "Retag", () => edit(tr, "tag"))),
    el("td", { class: "engine", text: engineName(f.engine), title: ENGINES[f.engine]?.about }),
    el("td", { class: "interval", text: Number(f.interval) > 0 ? `${f.interval} s` : "—" }),
    r.size,
    r.value,
    r.time,
    el(
      "td",
      { class: "actions" },
      r.toggle,
      r.csv,
      el("a", { class: "graph-link", href: `/graph?feeds=${f.id}`, text: "Graph" }),
      button("delete", "Delete", () => confirmDelete(tr)),
      el("span", { class: "row-error", role: "alert" }),
    ),
  );
  r.tr = tr;
  rowsById.set(f.id, r);
  update(r, f);
  return tr;
}

// The cells a refresh changes.
function update(r, f) {
  r.name.textContent = f.name;
  r.tag.textContent = f.tag;
  r.size.textContent = f.size === null ? "—" : bytes(Number(f.size));
  r.value.textContent = f.value === null || !f.unit ? fmtValue(f.value) : `${fmtValue(f.value)} ${f.unit}`;
  r.time.textContent = f.time ? ago(now() - f.time) : "never";
  r.time.title = f.time ? fmtTime(f.time) : "";
  const pub = f.public === "1";
  r.toggle.textContent = pub ? "Public" : "Private";
  r.toggle.setAttribute("aria-pressed", String(pub));
  r.toggle.title = pub ? "Anyone can read this feed: click to make it private" : "Click to make this feed public";
  updateCsv(r, f);
}

// The CSV of the chosen range up to the last value, at the feed's own interval (widened so
// the file stays under the API's size limit; 60 s for a PHPTimeSeries feed, which has none).
function updateCsv(r, f) {
  if (!f) return;
  const end = Math.max(f.time || 0, 0) || now();
  const span = CSV_RANGES[$("csv-range").value] || CSV_RANGES.week;
  const own = Number(f.interval) > 0 ? Number(f.interval) : 60;
  const interval = Math.max(own, Math.ceil(span / CSV_ROWS / own) * own);
  const q = new URLSearchParams({ id: f.id, start: end - span, end, interval, timeformat: "unix" });
  r.csv.href = `/feed/csvexport.json?${q}`;
}

function updateSelected() {
  const link = $("graph-selected");
  link.href = `/graph?feeds=${[...selected].join(",")}`;
  link.classList.toggle("disabled", selected.size === 0);
  link.setAttribute("aria-disabled", String(selected.size === 0));
}

// Inline edit of the name or the tag: an input with Save and Cancel (Enter, Escape).
function edit(tr, field) {
  const cell = tr.querySelector(`.${field}-cell`);
  if (cell.querySelector("input")) return;
  const f = byId(tr.dataset.feedid);
  const input = el("input", { type: "text", class: "edit", value: f[field], "aria-label": field });
  const old = [...cell.childNodes];
  busy++;
  let closed = false;
  const close = () => {
    if (closed) return; // Escape, Cancel and a save's end may all come: one close
    closed = true;
    cell.replaceChildren(...old);
    busy--;
  };
  const saveButton = button("save", "Save", () => save());
  const cancelButton = button("cancel", "Cancel", close);
  const save = async () => {
    if (closed || saveButton.disabled) return; // one request at a time (double Enter, double click)
    saveButton.disabled = cancelButton.disabled = input.readOnly = true;
    try {
      await set(tr, { [field]: input.value.trim() });
      close();
      refreshing.run(); // a new name or tag may move the row
    } catch (e) {
      rowError(tr, e);
    } finally {
      saveButton.disabled = cancelButton.disabled = input.readOnly = false;
    }
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") save();
    if (event.key === "Escape" && !saveButton.disabled) close();
  });
  cell.replaceChildren(input, saveButton, cancelButton);
  input.focus();
  input.select();
}

async function togglePublic(tr) {
  const f = byId(tr.dataset.feedid);
  try {
    await set(tr, { public: f.public === "1" ? 0 : 1 });
    refreshing.run();
  } catch (e) {
    rowError(tr, e);
  }
}

function set(tr, fields) {
  rowError(tr, null);
  return api("feed/set.json", { id: tr.dataset.feedid, fields: JSON.stringify(fields) }, { post: true });
}

// Delete asks in the row itself (not window.confirm): the actions are swapped for a question.
function confirmDelete(tr) {
  const cell = tr.querySelector(".actions");
  if (cell.querySelector(".confirm-delete")) return;
  const f = byId(tr.dataset.feedid);
  const old = [...cell.childNodes];
  busy++;
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    cell.replaceChildren(...old);
    busy--;
  };
  const yes = button("confirm-delete", "Delete", () => remove());
  const no = button("cancel-delete", "Cancel", close);
  const remove = async () => {
    if (closed || yes.disabled) return; // one request (a double click)
    yes.disabled = no.disabled = true;
    try {
      rowError(tr, null);
      await api("feed/delete.json", { id: f.id }, { post: true });
      close();
      selected.delete(f.id);
      refreshing.run();
    } catch (e) {
      close();
      rowError(tr, e);
    }
  };
  cell.replaceChildren(el("span", { class: "question", text: `Delete “${f.name}” and its data?` }), yes, no);
  no.focus();
}

function rowError(tr, error) {
  const box = tr.querySelector(".row-error");
  if (box) showMessage(box, error);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
