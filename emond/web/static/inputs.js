// /inputs: the user's inputs grouped by node, each with its description, last value and age,
// refreshed in place every 5 s from input/list.json (text is updated, open editors are left alone),
// and a process-list editor per input: steps in order, add (input/getallprocesses.json; the argument
// is a value, an input, or a feed of feed/list.json or a new one made with feed/create.json when the
// step is added), move, remove, save (input/process/set.json, text form "pid:arg,pid:arg").
//
// Hooks (stable, for tests):
//   section.node[data-node]                       one per node, sorted by node name
//   div.input[data-node][data-input][data-inputid] one per input, holding .input-name, .input-description,
//       .input-value, .input-age, .process-summary (span.badge per step), button.open-processes
//   div.process-editor[data-inputid]              inside its div.input, below the row:
//       ol.steps > li.step[data-process][data-arg]: .step-process, .step-arg,
//           button.move-up, button.move-down, button.remove-step; after a refused save, the step it
//           is about gets class "refused" and a p.step-error.error (the message is in .save-error too)
//       select.process-select, then the argument: input.arg-value | select.input-select |
//           select.feed-select (option value "new" = "Create a new feed…" shows div.new-feed:
//           input.new-feed-name, input.new-feed-tag, select.new-feed-engine, select.new-feed-interval)
//       button.add-step, p.add-error.error (refusals of the step being added, feed/create's included)
//       button.save-processlist, button.close-editor, p.save-error.error, span.save-status
//       p.load-error.error (the feed list failing to load when the editor opens)
//   #inputs-error.error (the live refresh failing: cleared by the next refresh that works),
//   #processes-error.error (the process table failing to load), #no-inputs (shown when there is no input)
// Each message has its own box, cleared only by what it is about.

import { $, api, ago, button, byName, el, ENGINES, engineName, every, fmtTime, fmtValue, now, showMessage, sortFeeds } from "./common.js";

const REFRESH_MS = 5000;
const VALUE = 0, INPUTID = 1, FEEDID = 2, NONE = 3; // argument types (emond/processlist.py)
const INTERVALS = [10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600];
const NEW_FEED = "new";
// the server's own words (emond/processlist.py): said by the checks made here before asking it,
// and recognised in its refusals to find the step they are about
const MSG_VALUE = "Argument must be a valid number greater or less than 0.";
const MSG_WRITTEN = "Feed is already being written to, select create new";
const MSG_FEED = "Feed does not exist!";
const MSG_INPUT = "Input does not exist!";
const MSG_DELETED = "This process is not supported on this server";

const container = $("inputs");
const pageError = $("inputs-error");
const processesError = $("processes-error");
const noInputs = $("no-inputs");

let inputs = new Map(); // id → latest entry of input/list.json
let processes = {}; // id → entry of input/getallprocesses.json
let feeds = []; // feed/list.json, (re)loaded when an editor opens and after a feed is made
let feedsLoaded = false;
const rows = new Map(); // input id → {box, value, age, description, summary, button, processList, editor}
const sections = new Map(); // node → {section, list}
let refreshing = null; // every(REFRESH_MS, refresh), once the process table is known

// ---- process lists as text ----------------------------------------------------------------

// "1:5,2:0.1" → [{pid, arg}], arguments kept as the text the server gave (saved back unchanged)
function parseList(text) {
  return (text || "").split(",").filter((item) => item.trim() !== "").map((item) => {
    const [pid, arg = "0"] = item.split(":");
    return { pid: Number(pid), arg: arg.trim() };
  });
}

const formatList = (steps) => steps.map((s) => `${s.pid}:${s.arg}`).join(",");

function inputLabel(id) {
  const inp = inputs.get(String(id));
  return inp ? `${inp.nodeid}:${inp.name}` : `input ${id} (missing)`;
}

function feedLabel(id) {
  const feed = feeds.find((f) => String(f.id) === String(id));
  if (feed) return `${feed.tag ? feed.tag + ":" : ""}${feed.name}`;
  return feedsLoaded ? `feed ${id} (missing)` : `feed ${id}`;
}

function argText(proc, arg) {
  if (!proc) return arg;
  if (proc.argtype === VALUE) return arg;
  if (proc.argtype === INPUTID) return inputLabel(arg);
  if (proc.argtype === FEEDID) return feedLabel(arg);
  return "";
}

// Feeds written by the lists of other inputs: the server refuses a second writer of a feed.
function writtenElsewhere(inputid) {
  const written = new Map(); // feed id → "node:name" of the input writing it
  for (const inp of inputs.values()) {
    if (inp.id === inputid) continue;
    for (const step of parseList(inp.processList)) {
      if (processes[step.pid]?.writes) written.set(step.arg, `${inp.nodeid}:${inp.name}`);
    }
  }
  return written;
}

// ---- the list of inputs -------------------------------------------------------------------

function sectionFor(node) {
  let found = sections.get(node);
  if (found) return found;
  const list = el("div", { class: "node-inputs" });
  const section = el("section", { class: "node card", "data-node": node }, el("h2", { text: `Node ${node}` }), list);
  // sorted insert: before the first section whose node sorts after this one
  const after = [...sections.keys()].sort(byName).find((other) => byName(other, node) > 0);
  container.insertBefore(section, after === undefined ? null : sections.get(after).section);
  found = { section, list };
  sections.set(node, found);
  return found;
}

function addRow(inp) {
  const r = {
    name: el("span", { class: "input-name", text: inp.name }),
    description: el("span", { class: "input-description" }),
    value: el("span", { class: "input-value" }),
    age: el("span", { class: "input-age" }),
    summary: el("span", { class: "process-summary" }),
    processList: null,
    editor: null,
  };
  r.button = button("open-processes", "Processes", () => toggleEditor(inp.id),
    { "aria-expanded": "false", "aria-label": `Processes of ${inp.nodeid}:${inp.name}` });
  r.box = el("div", { class: "input", "data-node": inp.nodeid, "data-input": inp.name, "data-inputid": inp.id },
    el("div", { class: "input-row" }, r.name, r.description, r.value, r.age, r.summary, r.button));
  sectionFor(inp.nodeid).list.append(r.box); // input/list.json is in id order: new ones come last
  rows.set(inp.id, r);
  return r;
}

function fillRow(r, inp) {
  r.description.textContent = inp.description || "";
  r.value.textContent = fmtValue(inp.value);
  if (inp.time == null) {
    r.age.textContent = "—";
    r.age.removeAttribute("title");
  } else {
    const age = Math.max(0, Math.round(now() - inp.time)); // a clock ahead of ours: "0 s ago"
    r.age.textContent = ago(age);
    r.age.title = fmtTime(inp.time);
    r.box.classList.toggle("stale", age > 3600);
  }
  if (r.processList !== inp.processList) {
    r.processList = inp.processList;
    r.summary.replaceChildren(...parseList(inp.processList).map((s) => {
      const proc = processes[s.pid];
      return el("span", { class: "badge", title: proc ? `${proc.name} ${argText(proc, s.arg)}` : s.pid,
        text: proc ? proc.short : `?${s.pid}` });
    }));
  }
}

function update(list) {
  inputs = new Map(list.map((inp) => [String(inp.id), { ...inp, id: String(inp.id) }]));
  for (const inp of inputs.values()) fillRow(rows.get(inp.id) || addRow(inp), inp);
  for (const [id, r] of rows) {
    if (!inputs.has(id)) { // deleted (elsewhere): its editor goes with it
      r.box.remove();
      rows.delete(id);
    }
  }
  for (const [node, s] of sections) {
    if (!s.list.firstChild) {
      s.section.remove();
      sections.delete(node);
    }
  }
  noInputs.hidden = inputs.size > 0;
}

async function refresh() {
  try {
    update(await api("input/list.json"));
    showMessage(pageError, "");
  } catch (e) {
    showMessage(pageError, `Could not refresh the inputs: ${e.message}`);
  }
}

// ---- the process-list editor ----------------------------------------------------------------

async function loadFeeds() {
  feeds = sortFeeds(await api("feed/list.json"));
  feedsLoaded = true;
}

function toggleEditor(inputid) {
  const r = rows.get(inputid);
  if (r.editor) closeEditor(r);
  else openEditor(r, inputs.get(inputid));
}

function closeEditor(r) {
  r.editor.root.remove();
  r.editor = null;
  r.button.setAttribute("aria-expanded", "false");
}

async function openEditor(r, inp) {
  r.button.setAttribute("aria-expanded", "true");
  const ed = {
    inputid: inp.id, node: inp.nodeid, inputName: inp.name,
    steps: parseList(inp.processList), saved: formatList(parseList(inp.processList)),
  };
  r.editor = ed;
  ed.list = el("ol", { class: "steps" });
  ed.empty = el("p", { class: "no-steps", text: "No processing: this input is not recorded." });
  ed.processSelect = processSelect();
  ed.processSelect.addEventListener("change", () => renderArg(ed));
  ed.arg = el("span", { class: "arg" });
  ed.newFeed = el("div", { class: "new-feed" });
  ed.addButton = el("button", { type: "submit", class: "add-step", text: "Add step" });
  ed.addError = el("p", { class: "add-error error", role: "alert" });
  ed.saveButton = button("save-processlist", "Save", () => save(ed));
  ed.status = el("span", { class: "save-status", role: "status" });
  ed.saveError = el("p", { class: "save-error error", role: "alert" });
  ed.loadError = el("p", { class: "load-error error", role: "alert" });
  // novalidate: the refusals are said in the page (p.add-error), not in the browser's bubbles
  const form = el("form", { class: "add-form", novalidate: "", on: { submit: (event) => { event.preventDefault(); addStep(ed); } } },
    el("label", {}, "Process ", ed.processSelect), ed.arg, ed.addButton, ed.newFeed, ed.addError);
  ed.root = el("div", { class: "process-editor", "data-inputid": inp.id, role: "group", "aria-label": `Processes of ${inp.nodeid}:${inp.name}` },
    el("h3", { text: `Process list of ${inp.nodeid}:${inp.name}` }),
    ed.loadError, ed.list, ed.empty, form,
    el("div", { class: "editor-actions" }, ed.saveButton,
      button("close-editor", "Close", () => closeEditor(r)),
      ed.status),
    ed.saveError);
  showMessage(ed.addError, "");
  showMessage(ed.saveError, "");
  showMessage(ed.loadError, "");
  r.box.append(ed.root);
  renderSteps(ed);
  renderArg(ed);
  try {
    await loadFeeds(); // fresh: feeds may have been made on /feeds meanwhile
  } catch (e) {
    showMessage(ed.loadError, `Could not load the feeds: ${e.message}`);
    return;
  }
  if (r.editor === ed) { // still open: feed names in the steps, feeds in the select (choice kept)
    renderSteps(ed);
    if (ed.argField?.classList.contains("feed-select")) fillFeedSelect(ed.argField, processes[ed.processSelect.value]);
  }
}

function processSelect() {
  const select = el("select", { class: "process-select" });
  const groups = new Map();
  for (const proc of Object.values(processes)) {
    if (proc.deleted) continue; // still run in old lists, but cannot be added
    if (!groups.has(proc.group)) groups.set(proc.group, el("optgroup", { label: proc.group }));
    groups.get(proc.group).append(el("option", { value: String(proc.id_num), text: proc.name, title: proc.description }));
  }
  select.append(...groups.values());
  select.value = "1"; // Log to feed: what most inputs need first
  return select;
}

function renderSteps(ed) {
  const count = ed.steps.length;
  ed.list.replaceChildren(...ed.steps.map((step, i) => {
    const proc = processes[step.pid];
    const name = proc ? proc.name + (proc.deleted ? " (no longer offered)" : "") : `unknown process ${step.pid}`;
    const stepButton = (cls, text, label, action, disabled) =>
      button(cls, text, action, { "aria-label": `${label} step ${i + 1}`, disabled });
    const refused = ed.stepError?.index === i;
    return el("li", { class: refused ? "step refused" : "step", "data-process": String(step.pid), "data-arg": step.arg },
      el("span", { class: "step-process", text: name }),
      el("span", { class: "step-arg", text: argText(proc, step.arg) }),
      stepButton("move-up", "▲", "Move up", () => move(ed, i, -1), i === 0),
      stepButton("move-down", "▼", "Move down", () => move(ed, i, 1), i === count - 1),
      stepButton("remove-step", "Remove", "Remove", () => change(ed, () => ed.steps.splice(i, 1)), false),
      refused ? el("p", { class: "step-error error", role: "alert", text: ed.stepError.message }) : null);
  }));
  ed.empty.hidden = count > 0;
  const dirty = formatList(ed.steps) !== ed.saved;
  ed.status.textContent = dirty ? "Unsaved changes" : "";
  ed.root.classList.toggle("dirty", dirty);
}

function change(ed, edit) {
  edit();
  ed.stepError = null;
  showMessage(ed.saveError, "");
  renderSteps(ed);
}

function move(ed, i, by) {
  change(ed, () => {
    [ed.steps[i], ed.steps[i + by]] = [ed.steps[i + by], ed.steps[i]];
  });
}

// The argument field(s) of the chosen process.
function renderArg(ed) {
  const proc = processes[ed.processSelect.value];
  ed.argField = null;
  ed.newFeed.replaceChildren();
  ed.newFeed.hidden = true;
  showMessage(ed.addError, "");
  if (!proc) { // the process table did not load: nothing can be added
    ed.arg.replaceChildren();
  } else if (proc.argtype === VALUE) {
    ed.argField = el("input", { type: "number", step: "any", class: "arg-value" });
    ed.arg.replaceChildren(el("label", {}, "Value ", ed.argField));
  } else if (proc.argtype === INPUTID) {
    ed.argField = el("select", { class: "input-select" },
      ...[...inputs.values()].sort((a, b) => byName(a.nodeid, b.nodeid) || byName(a.name, b.name))
        .map((inp) => el("option", { value: inp.id, text: `${inp.nodeid}:${inp.name}` })));
    ed.arg.replaceChildren(el("label", {}, "Input ", ed.argField));
  } else if (proc.argtype === FEEDID) {
    ed.argField = el("select", { class: "feed-select" });
    fillFeedSelect(ed.argField, proc);
    ed.argField.addEventListener("change", () => showNewFeed(ed, proc));
    ed.arg.replaceChildren(el("label", {}, "Feed ", ed.argField));
    showNewFeed(ed, proc);
  } else {
    ed.arg.replaceChildren();
  }
}

function fillFeedSelect(select, proc) {
  const keep = select.value;
  const options = feeds.map((f) => el("option", { value: String(f.id), text: feedLabel(f.id) }));
  if (proc.writes) { // a process that writes may make its feed; one that reads needs an existing one
    options.unshift(el("option", { value: NEW_FEED, text: "Create a new feed…" }));
  }
  select.replaceChildren(...options);
  if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
}

// The inline fields of "Create a new feed…": name, tag, engine (those the process allows) and
// for PHPFina its interval.
function showNewFeed(ed, proc) {
  if (ed.argField.value !== NEW_FEED) {
    ed.newFeed.hidden = true;
    return;
  }
  if (ed.newFeed.firstChild) {
    ed.newFeed.hidden = false;
    return;
  }
  const name = el("input", { type: "text", class: "new-feed-name", value: ed.inputName });
  const tag = el("input", { type: "text", class: "new-feed-tag", value: ed.node });
  const engine = el("select", { class: "new-feed-engine" },
    ...proc.engines.map((id) => el("option", { value: String(id), text: engineName(id), title: ENGINES[id]?.about })));
  const interval = el("select", { class: "new-feed-interval" },
    ...INTERVALS.map((s) => el("option", { value: String(s), text: s < 60 ? `${s} s` : `${s / 60} min` })));
  const intervalLabel = el("label", {}, "Interval ", interval);
  const showInterval = () => { intervalLabel.hidden = !ENGINES[engine.value]?.fixed; };
  engine.addEventListener("change", showInterval);
  showInterval();
  ed.newFeed.append(el("label", {}, "Name ", name), el("label", {}, "Tag ", tag),
    el("label", {}, "Engine ", engine), intervalLabel);
  ed.feedFields = { name, tag, engine, interval };
  ed.newFeed.hidden = false;
}

// The argument of the step to add, as its text; makes the new feed if one is asked for.
async function argFor(ed, proc) {
  if (proc.argtype === NONE) return "0";
  const value = ed.argField.value.trim();
  if (proc.argtype === VALUE) {
    if (value === "" || !Number.isFinite(Number(value))) throw new Error(MSG_VALUE);
    return value;
  }
  if (value === "") throw new Error(proc.argtype === INPUTID ? "Choose an input" : "Choose a feed");
  if (proc.argtype === INPUTID || !proc.writes) return value;
  if (value !== NEW_FEED) {
    // one writer per feed: refused by the server at save, said here already
    if (ed.steps.some((s) => processes[s.pid]?.writes && s.arg === value)) throw new Error(MSG_WRITTEN);
    const other = writtenElsewhere(ed.inputid).get(value);
    if (other) throw new Error(`${MSG_WRITTEN} (written by ${other})`);
    return value;
  }
  const f = ed.feedFields;
  const name = f.name.value.trim();
  const tag = f.tag.value.trim();
  if (!name) throw new Error("The new feed needs a name");
  // said here rather than by a refused request (which the browser's console logs as an error)
  if (feeds.some((feed) => feed.name === name && feed.tag === tag)) throw new Error(`A feed ${tag}:${name} already exists`);
  const engine = Number(f.engine.value);
  const params = { name, tag, engine, datatype: proc.datatype || 1, unit: proc.unit || "" };
  if (ENGINES[engine]?.fixed) params.options = JSON.stringify({ interval: Number(f.interval.value) });
  const created = await api("feed/create.json", params, { post: true });
  await loadFeeds();
  for (const r of rows.values()) { // every open feed select offers the new feed
    if (r.editor?.argField?.classList.contains("feed-select")) {
      fillFeedSelect(r.editor.argField, processes[r.editor.processSelect.value]);
    }
  }
  return String(created.feedid);
}

async function addStep(ed) {
  const proc = processes[ed.processSelect.value];
  if (!proc) return;
  showMessage(ed.addError, "");
  ed.addButton.disabled = true; // one click, one feed
  try {
    const arg = await argFor(ed, proc);
    change(ed, () => ed.steps.push({ pid: proc.id_num, arg }));
    if (ed.argField?.value === NEW_FEED) { // the next new feed starts from the defaults again
      ed.newFeed.replaceChildren();
      showNewFeed(ed, proc);
    }
  } catch (e) {
    showMessage(ed.addError, e.message);
  } finally {
    ed.addButton.disabled = false;
  }
}

async function save(ed) {
  showMessage(ed.saveError, "");
  ed.saveButton.disabled = true;
  try {
    await api("input/process/set.json", { inputid: ed.inputid, processlist: formatList(ed.steps) }, { post: true });
    // the server's canonical text ("2:1.50" is stored "2:1.5")
    const stored = await api("input/process/get.json", { inputid: ed.inputid });
    ed.steps = parseList(stored);
    ed.saved = formatList(ed.steps);
    ed.stepError = null;
    const inp = inputs.get(ed.inputid);
    if (inp) {
      inp.processList = stored;
      const r = rows.get(ed.inputid);
      if (r) fillRow(r, inp);
    }
    renderSteps(ed);
    ed.status.textContent = "Saved";
  } catch (e) {
    showMessage(ed.saveError, e.message);
    // fresh feeds and lists (another tab, a device's other input), to find the step it is about
    await Promise.all([loadFeeds().catch(() => {}), refreshing.run()]);
    const index = culprit(ed, e.message);
    ed.stepError = index < 0 ? null : { index, message: e.message };
    renderSteps(ed);
  } finally {
    ed.saveButton.disabled = false;
  }
}

// The step a refusal of input/process/set.json is about (-1: none found). The server judges only
// the steps a change brings in (those not in the saved list) and says only why: the first new
// step the message fits is the one, as emond/processlist.py's check_steps goes through them.
function culprit(ed, message) {
  const kept = new Map(); // "pid:arg" of the saved list → how many times
  for (const s of parseList(ed.saved)) kept.set(`${s.pid}:${s.arg}`, (kept.get(`${s.pid}:${s.arg}`) || 0) + 1);
  const elsewhere = writtenElsewhere(ed.inputid);
  const written = new Set();
  for (const [i, step] of ed.steps.entries()) {
    const proc = processes[step.pid];
    const key = `${step.pid}:${step.arg}`;
    const isNew = !(kept.get(key) > 0);
    if (!isNew) kept.set(key, kept.get(key) - 1);
    if (proc?.writes) {
      if (isNew && message.startsWith(MSG_WRITTEN) && (written.has(step.arg) || elsewhere.has(step.arg))) return i;
      written.add(step.arg);
    }
    if (!isNew || !proc) continue;
    if (message === MSG_DELETED && proc.deleted) return i;
    if (message === MSG_FEED && proc.argtype === FEEDID && !feeds.some((f) => String(f.id) === step.arg)) return i;
    if (message === MSG_INPUT && proc.argtype === INPUTID && !inputs.has(step.arg)) return i;
  }
  return -1;
}

// ---- start -------------------------------------------------------------------------------------

async function start() {
  try {
    processes = await api("input/getallprocesses.json");
  } catch (e) {
    showMessage(processesError, `Could not load the process table: ${e.message}`);
  }
  refreshing = every(REFRESH_MS, refresh);
}

start();
