// The console's main loop: ask for keys when the server needs them, poll /console/state (models
// and devices) every 2 s and /console/traffic every few seconds, and render them.
import { ApiError, gib, h, json, keys, saveKeys } from "./api.js";
import { Charts } from "./charts.js";
import { Models } from "./models.js";
import { Playground } from "./playground.js";

const STATE_EVERY_MS = 2000;
let config = { auth: { api_key: false, admin_key: false }, traffic_interval_s: 5 };
let lastState = null;
const charts = new Charts(document.getElementById("charts"));
const playground = new Playground();
const models = new Models(document.getElementById("models"), () => refresh());
let asked = false; // the key field was focused for this refusal already

function setStatus(state, text) {
  const el = document.getElementById("status");
  el.dataset.state = state;
  el.textContent = text;
}

function needKeys(message) {
  document.getElementById("key-note").textContent = message;
  if (!asked) document.getElementById("api-key").focus(); // once: later polls leave focus alone
  asked = true;
}

function deviceBar(d, headroom) {
  const total = Math.max(1, d.total_bytes);
  const pending = Math.max(0, d.reserved_bytes - d.used_by_vramgate_bytes);
  const parts = [["others", d.used_by_others_bytes], ["ours", d.used_by_vramgate_bytes],
    ["reserved", pending], ["free", Math.max(0, d.free_bytes - pending)]];
  const bar = h("div", { class: "bar" }, parts.map(([cls, bytes]) => {
    const seg = h("div", { class: "seg " + cls, "data-bytes": bytes, title: `${cls}: ${gib(bytes)}` });
    seg.style.width = (100 * bytes) / total + "%";
    return seg;
  }));
  const limitAt = d.total_bytes - d.free_bytes + pending + d.available_bytes;
  if (limitAt < d.total_bytes) {
    const mark = h("div", { class: "limit", title: `placement limit: ${gib(Math.max(0, d.available_bytes))} available for new engines` });
    mark.style.left = Math.max(0, Math.min(100, (100 * limitAt) / total)) + "%";
    bar.append(mark);
  }
  const name = d.kind === "cpu" ? "CPU RAM" : `${d.id} · ${d.name}`;
  return h("div", { class: "device", "data-device": d.id },
    h("div", { class: "device-head" }, h("span", {}, name), h("span", {}, gib(d.total_bytes))),
    bar,
    h("div", { class: "figures" },
      `others ${gib(d.used_by_others_bytes)} · vramgate ${gib(d.used_by_vramgate_bytes)} · ` +
      `reserved ${gib(d.reserved_bytes)} · free ${gib(d.free_bytes)} · ` +
      `available ${gib(d.available_bytes)}${d.kind === "cuda" ? ` (headroom ${gib(headroom)})` : ""}` +
      (d.models.length ? ` · ${d.models.join(", ")}` : "")));
}

function render() {
  if (!lastState) return;
  // The admin buttons work with the admin key entered here, or with a key the server takes as admin.
  models.render(lastState.models, lastState.admin || Boolean(keys.admin));
  document.getElementById("devices").replaceChildren(
    ...lastState.devices.map((d) => deviceBar(d, lastState.headroom_bytes)));
  const gpus = lastState.devices.filter((d) => d.kind === "cuda").length;
  document.getElementById("devices-note").textContent = lastState.devices_error ||
    (gpus ? `${gpus} GPU${gpus > 1 ? "s" : ""} (read from ${lastState.source})` : "no GPU found: engines run on the CPU") +
    ` · placement ${lastState.policy}`;
  playground.setModels(lastState.models);
}

async function refresh() {
  try {
    lastState = await json("console/state");
    const status = document.getElementById("status");
    status.dataset.polls = String(Number(status.dataset.polls || 0) + 1); // for tests and the curious
    setStatus("ok", "connected" + (lastState.admin ? " · admin" : ""));
    document.getElementById("key-note").textContent = "";
    asked = false;
    render();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      setStatus("error", "needs a key");
      needKeys(err.message);
    } else {
      setStatus("error", "unreachable: " + err.message);
    }
  }
}

async function refreshTraffic() {
  try {
    charts.update(await json("console/traffic"));
  } catch (_) { /* refresh() shows why */ }
}

function loop(fn, ms) {
  const tick = async () => {
    await fn();
    setTimeout(tick, ms);
  };
  tick();
}

async function start() {
  try {
    config = await (await fetch(new URL("config.json", location.href))).json();
  } catch (_) { /* defaults */ }
  const form = document.getElementById("keys");
  document.getElementById("api-key").value = keys.api;
  document.getElementById("admin-key").value = keys.admin;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    saveKeys(document.getElementById("api-key").value, document.getElementById("admin-key").value);
    asked = true; // just typed: no need to pull focus back
    refresh();
    refreshTraffic();
  });
  if (!config.auth.api_key && !config.auth.admin_key) form.hidden = true;
  playground.start();
  if ((config.auth.api_key || config.auth.admin_key) && !keys.api && !keys.admin) {
    setStatus("error", "needs a key");
    needKeys("This server needs an API key; it is kept in this browser session only.");
  }
  const waitForKey = async (fn) => { if (!config.auth.api_key && !config.auth.admin_key || keys.api || keys.admin) await fn(); };
  loop(() => waitForKey(refresh), STATE_EVERY_MS);
  loop(() => waitForKey(refreshTraffic), Math.max(1000, config.traffic_interval_s * 1000));
}

start();
