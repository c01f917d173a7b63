// What every page's script shares, one way each: API calls (with the session's CSRF token on
// writes), DOM building without innerHTML (no markup from data ever reaches the parser: el,
// button, $), message boxes (showMessage), the refresh loop (every), the feed engines
// (ENGINES), feeds sorted and grouped by tag, and formats (ago, fmtTime, fmtValue, now).

export class ApiError extends Error {}

const INVALID_CSRF = "Invalid CSRF token"; // the server's words (emond/api/http.py)
const TOKEN_RELOAD = "emond.tokenReload"; // sessionStorage: when the page last reloaded for a stale token

export function csrf() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

// The decoded JSON answer of an API route; ApiError with emoncms's message when it refuses
// ({"success": false, "message": ...}) or answers an HTTP error.
export async function api(path, params = {}, { post = false } = {}) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) query.append(name, String(value));
  }
  let response;
  if (post) {
    response = await fetch("/" + path, {
      method: "POST",
      headers: { "X-CSRF-Token": csrf(), "Content-Type": "application/x-www-form-urlencoded" },
      body: query,
    });
  } else {
    const search = query.toString();
    response = await fetch("/" + path + (search ? "?" + search : ""));
  }
  const text = await response.text();
  let answer;
  try {
    answer = JSON.parse(text);
  } catch {
    answer = text; // a few routes answer plain text ("ok", a number)
  }
  if (response.status === 401) {
    // The session ended (expired, logged out elsewhere, password changed): to the login page,
    // which leads back to this one after the login (as the server's redirect of a page does).
    location.assign(`/?next=${encodeURIComponent(location.pathname + location.search)}`);
  }
  if (response.status === 403 && answer && answer.message === INVALID_CSRF && reloadForToken()) {
    throw new ApiError("This page's session token is out of date (a new login or a password change): reloading the page…");
  }
  if (answer && typeof answer === "object" && answer.success === false) {
    throw new ApiError(answer.message || "Request refused");
  }
  if (!response.ok) {
    throw new ApiError(typeof answer === "string" && answer ? answer : `${response.status} ${response.statusText}`);
  }
  return answer;
}

// The page's CSRF token is refused when the session changed under it (the password was
// changed, or a new login happened, in another tab): a reload fetches the page with the
// session's token. Not twice within 10 s: then the token is not the cause, the request fails.
function reloadForToken() {
  try {
    if (Date.now() - Number(sessionStorage.getItem(TOKEN_RELOAD) || 0) < 10000) return false;
    sessionStorage.setItem(TOKEN_RELOAD, String(Date.now()));
  } catch {
    return false; // no sessionStorage: no way to tell a loop from a first time
  }
  location.reload();
  return true;
}

// el("button", {class: "x", text: "Save", on: {click: f}}, child, ...)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else if (name === "on") for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (id) => document.getElementById(id);

// A plain button: button("save", "Save", save, {"aria-label": ..., disabled: true}).
export function button(cls, text, click, attrs = {}) {
  return el("button", { type: "button", class: cls, text, ...attrs, on: { click } });
}

// The one way to say something in a message box: its text (a string or an Error), hidden
// when empty; kind "error" (default) or "ok" sets the class of that name, "note" neither.
export function showMessage(box, text, kind = "error") {
  const message = text instanceof Error ? text.message || String(text) : text ? String(text) : "";
  box.textContent = message;
  box.hidden = !message;
  box.classList.toggle("error", kind === "error");
  box.classList.toggle("ok", kind === "ok");
}

// The storage engines a feed may have (ENGINE_* of emond/records.py): feed/list's "engine" (text) or a number.
// fixed: values in slots of the feed's interval (PHPFina); else at any time (PHPTimeSeries).
export const ENGINES = {
  5: { name: "PHPFina", about: "fixed interval", fixed: true },
  2: { name: "PHPTimeSeries", about: "variable interval", fixed: false },
};

export function engineName(id) {
  return ENGINES[id] ? ENGINES[id].name : `engine ${id}`;
}

// Names as people sort them: "node2" before "node10".
export const byName = (a, b) => String(a ?? "").localeCompare(String(b ?? ""), undefined, { numeric: true });

// Feeds (of feed/list.json) by tag, then name.
export function sortFeeds(feeds) {
  return [...feeds].sort((a, b) => byName(a.tag, b.tag) || byName(a.name, b.name));
}

// [[tag, [feed, ...]], ...] by tag, each tag's feeds by name.
export function groupByTag(feeds) {
  const groups = new Map();
  for (const f of sortFeeds(feeds)) {
    const tag = f.tag || "";
    if (!groups.has(tag)) groups.set(tag, []);
    groups.get(tag).push(f);
  }
  return [...groups];
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

const pad = (n) => String(n).padStart(2, "0");

// Times are shown in the browser's timezone (here and on the graph's axis), not in the
// account's timezone setting (which the server uses for daily feeds): kept so on purpose.

export function fmtTime(unixSeconds) {
  if (!unixSeconds) return "—";
  const d = new Date(unixSeconds * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtValue(v) {
  if (v === null || v === undefined || v === "") return "—";
  const n = Number(v);
  if (!Number.isFinite(n)) return String(v);
  if (Number.isInteger(n)) return String(n);
  if (Math.abs(n) >= 1000) return String(Math.round(n * 100) / 100); // 1234.57
  return String(Number(n.toPrecision(4))); // 4 significant digits: 19.99, 0.1235, 1000 (999.99), 1e-7
}

// The clock in whole unix seconds.
export function now() {
  return Math.floor(Date.now() / 1000);
}

// Run fn now, then again ms after each run settles (a chain of timeouts, not an interval: a
// slow answer never overlaps the next request, and a late one never overwrites a newer one).
// While the tab is hidden the chain waits; it runs at once when the tab is shown again.
// The returned run() runs fn now (or right after the run under way, once however often it is
// asked meanwhile) and resolves when that run has settled.
export function every(ms, fn) {
  let timer = null;
  let running = null; // the run under way
  let queued = null; // the run asked for while one was under way
  const tick = () => {
    timer = null;
    if (!document.hidden) run();
  };
  const once = async () => {
    clearTimeout(timer);
    timer = null;
    try {
      await fn();
    } finally {
      running = null;
      if (!document.hidden) timer = setTimeout(tick, ms);
    }
  };
  const run = () => {
    if (!running) return (running = once());
    if (!queued) {
      queued = running.catch(() => {}).then(() => {
        queued = null;
        return run();
      });
    }
    return queued;
  };
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !running) run();
  });
  run();
  return { run };
}
