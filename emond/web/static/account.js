// /account: the user's name and email (user/get.json); the write and read API keys, masked, with
// Show, Copy and Regenerate (confirmed in the page, user/newapikeywrite.json / newapikeyread.json);
// the timezone (user/set.json data={"timezone":...}); a password change (user/changepassword.json).
//
// Hooks (stable, for tests):
//   #account-username, #account-email, #account-error.error (user/get.json failing)
//   div.apikey[data-key="write"|"read"] holding code.key-value (#apikey-write / #apikey-read, masked
//       until Show), button.show-key (aria-pressed), button.copy-key, button.regenerate-key,
//       div.confirm (hidden until Regenerate) with button.confirm-regenerate and button.cancel-regenerate,
//       p.key-message (.ok or .error)
//   #timezone-form: select#timezone, button#save-timezone, p#timezone-message (.ok or .error)
//   #password-form: #old-password, #new-password, #repeat-password, button#change-password,
//       p#password-message (.ok or .error)

import { api } from "./common.js";

const MASK = "•".repeat(32);
const AFTER_RELOAD = "emond-account-message"; // sessionStorage: a message to show after a reload

const keys = {}; // "write" | "read" → the key

function say(node, message, ok) {
  node.textContent = message;
  node.classList.toggle("ok", ok);
  node.classList.toggle("error", !ok);
  node.hidden = !message;
}

// ---- API keys ------------------------------------------------------------------------------

function setupKey(box) {
  const kind = box.dataset.key;
  const value = box.querySelector(".key-value");
  const show = box.querySelector(".show-key");
  const confirm = box.querySelector(".confirm");
  const message = box.querySelector(".key-message");
  const shown = () => show.getAttribute("aria-pressed") === "true";
  const render = () => {
    value.textContent = keys[kind] === undefined ? "—" : shown() ? keys[kind] : MASK;
    show.textContent = shown() ? "Hide" : "Show";
  };
  const reveal = (on) => {
    show.setAttribute("aria-pressed", String(on));
    render();
  };

  show.addEventListener("click", () => reveal(!shown()));

  box.querySelector(".copy-key").addEventListener("click", async () => {
    if (keys[kind] === undefined) return;
    try {
      await navigator.clipboard.writeText(keys[kind]); // only in a secure context, and when allowed
      say(message, "Copied to the clipboard.", true);
    } catch {
      // No clipboard (plain http, or refused): show the key selected, for Ctrl+C / the menu.
      reveal(true);
      const range = document.createRange();
      range.selectNodeContents(value);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      say(message, "The key is selected: copy it with Ctrl+C (⌘C).", true);
    }
  });

  box.querySelector(".regenerate-key").addEventListener("click", () => {
    confirm.hidden = false;
    confirm.querySelector(".cancel-regenerate").focus(); // the safe choice first
  });
  confirm.querySelector(".cancel-regenerate").addEventListener("click", () => {
    confirm.hidden = true;
  });
  const yes = confirm.querySelector(".confirm-regenerate");
  yes.addEventListener("click", async () => {
    yes.disabled = true;
    try {
      keys[kind] = await api(kind === "write" ? "user/newapikeywrite.json" : "user/newapikeyread.json", {}, { post: true });
      confirm.hidden = true;
      reveal(true); // a new key is there to be copied into the devices
      say(message, `New ${kind} key made; the old one no longer works.`, true);
    } catch (e) {
      say(message, e.message, false);
    } finally {
      yes.disabled = false;
    }
  });
  return render;
}

// ---- timezone ------------------------------------------------------------------------------

function fillTimezones(select, current) {
  let zones = [];
  try {
    zones = Intl.supportedValuesOf("timeZone");
  } catch {
    // an older browser: only the current zone is offered
  }
  // the browser's list may lack "UTC" or the stored zone (an alias): both are always offered
  const names = new Set(zones);
  names.add("UTC");
  if (current) names.add(current);
  select.replaceChildren(...[...names].sort().map((zone) => new Option(zone, zone)));
  select.value = current || "UTC";
}

function setupTimezone() {
  const form = document.getElementById("timezone-form");
  const select = document.getElementById("timezone");
  const message = document.getElementById("timezone-message");
  const button = document.getElementById("save-timezone");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      await api("user/set.json", { data: JSON.stringify({ timezone: select.value }) }, { post: true });
      say(message, `Timezone saved: ${select.value}.`, true);
    } catch (e) {
      say(message, e.message, false);
    } finally {
      button.disabled = false;
    }
  });
}

// ---- password ----------------------------------------------------------------------------

function setupPassword() {
  const form = document.getElementById("password-form");
  const old = document.getElementById("old-password");
  const fresh = document.getElementById("new-password");
  const repeat = document.getElementById("repeat-password");
  const message = document.getElementById("password-message");
  const button = document.getElementById("change-password");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!old.value || !fresh.value) return say(message, "Give the current and the new password.", false);
    if (fresh.value !== repeat.value) {
      repeat.focus();
      return say(message, "The new passwords do not match.", false);
    }
    button.disabled = true;
    try {
      await api("user/changepassword.json", { old: old.value, new: fresh.value }, { post: true });
      // The change ends every session and gives this one a new cookie, whose CSRF token differs
      // from the one in this page: a reload fetches the page with the new token.
      sessionStorage.setItem(AFTER_RELOAD, "Password changed. Other sessions have been logged out.");
      location.reload();
    } catch (e) {
      say(message, e.message, false);
      button.disabled = false;
    }
  });
  const after = sessionStorage.getItem(AFTER_RELOAD);
  if (after) {
    sessionStorage.removeItem(AFTER_RELOAD);
    say(message, after, true);
  }
}

// ---- start --------------------------------------------------------------------------------

async function start() {
  const renders = [...document.querySelectorAll(".apikey")].map(setupKey);
  setupTimezone();
  setupPassword();
  try {
    const user = await api("user/get.json");
    document.getElementById("account-username").textContent = user.username;
    document.getElementById("password-form-username").value = user.username;
    document.getElementById("account-email").textContent = user.email || "—";
    keys.write = user.apikey_write;
    keys.read = user.apikey_read;
    fillTimezones(document.getElementById("timezone"), user.timezone);
  } catch (e) {
    say(document.getElementById("account-error"), `Could not load the account: ${e.message}`, false);
  }
  renders.forEach((render) => render());
}

start();
