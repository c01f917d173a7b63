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

import { $, api, showMessage } from "./common.js";

const MASK = "•".repeat(32);
const AFTER_RELOAD = "emond-account-message"; // sessionStorage: a message to show after a reload

const keys = {}; // "write" | "read" → the key

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
      showMessage(message, "Copied to the clipboard.", "ok");
    } catch {
      // No clipboard (plain http, or refused): show the key selected, for Ctrl+C / the menu.
      reveal(true);
      const range = document.createRange();
      range.selectNodeContents(value);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      showMessage(message, "The key is selected: copy it with Ctrl+C (⌘C).", "ok");
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
      showMessage(message, `New ${kind} key made; the old one no longer works.`, "ok");
    } catch (e) {
      showMessage(message, e.message);
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
  const form = $("timezone-form");
  const select = $("timezone");
  const message = $("timezone-message");
  const button = $("save-timezone");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      await api("user/set.json", { data: JSON.stringify({ timezone: select.value }) }, { post: true });
      showMessage(message, `Timezone saved: ${select.value}.`, "ok");
    } catch (e) {
      showMessage(message, e.message);
    } finally {
      button.disabled = false;
    }
  });
}

// ---- password ----------------------------------------------------------------------------

function setupPassword() {
  const form = $("password-form");
  const old = $("old-password");
  const fresh = $("new-password");
  const repeat = $("repeat-password");
  const message = $("password-message");
  const button = $("change-password");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!old.value || !fresh.value) return showMessage(message, "Give the current and the new password.");
    if (fresh.value !== repeat.value) {
      repeat.focus();
      return showMessage(message, "The new passwords do not match.");
    }
    button.disabled = true;
    try {
      await api("user/changepassword.json", { old: old.value, new: fresh.value }, { post: true });
      // The change ends every session and gives this one a new cookie, whose CSRF token differs
      // from the one in this page: a reload fetches the page with the new token.
      sessionStorage.setItem(AFTER_RELOAD, "Password changed. Other sessions have been logged out.");
      location.reload();
    } catch (e) {
      showMessage(message, e.message);
      button.disabled = false;
    }
  });
  const after = sessionStorage.getItem(AFTER_RELOAD);
  if (after) {
    sessionStorage.removeItem(AFTER_RELOAD);
    showMessage(message, after, "ok");
  }
}

// ---- start --------------------------------------------------------------------------------

async function start() {
  const renders = [...document.querySelectorAll(".apikey")].map(setupKey);
  setupTimezone();
  setupPassword();
  try {
    const user = await api("user/get.json");
    $("account-username").textContent = user.username;
    $("password-form-username").value = user.username;
    $("account-email").textContent = user.email || "—";
    keys.write = user.apikey_write;
    keys.read = user.apikey_read;
    fillTimezones($("timezone"), user.timezone);
  } catch (e) {
    showMessage($("account-error"), `Could not load the account: ${e.message}`);
  }
  renders.forEach((render) => render());
}

start();
