// The console's main loop: ask for keys when the server needs them, poll /console/state (models
// and devices) every 2 s and /console/traffic every few seconds, and render them.
import { ApiError, call, gib, h, json, keys, saveKeys, seconds } from "./api.js";
import { Charts } from "./charts.js";
import { Playground } from "./playground.js";

const STATE_EVERY_MS = 2000;
const results = new Map(); // model -> {text, bad}: what its last load or unload did
let config = { auth: { api_key: false, admin_key: false }, traffic_interval_s: 5 };
let lastState = null;
const charts = new Charts(document.getElementById("charts"));
const playground = new Playground();

function setStatus(state, text) {
  const el = document.getElementById("status");
  el.dataset.state = state;
  el.textContent = text;
}

function needKeys(message) {
  document.getElementById("key-note").textContent = message;
  document.getElementById("api-key").focus();
}

function replicaRows(model) {
  const head = h("tr", {}, ["#", "state", "devices", "TP", "reserved", "measured", "estimated",
    "in flight", "idle"].map((t) => h("th", {}, t)));
  const rows = model.replicas.map((r) => {
    const p = r.placement || {};
    return h("tr", { class: "replica" },
      h("td", {}, r.index), h("td", {}, r.state), h("td", {}, (p.devices || []).join("+") || r.device),
      h("td", {}, p.tensor_parallel_size ?? "–"), h("td", {}, gib(p.reserved_bytes)),
      h("td", { title: r.ram_bytes != null ? "RAM of its processes (PSS)" : "NVML's figure" },
        r.ram_bytes != null ? gib(r.ram_bytes) + " RAM" : gib(p.measured_bytes)),
      h("td", {}, gib(p.estimated_bytes)),
      h("td", {}, r.in_flight), h("td", {}, r.state === "ready" ? seconds(r.idle_s) : "–"));
  });
  return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, rows)));
}

function loadingLine(model) {
  const rep = model.replicas.find((r) => r.state === "loading");
  if (!rep) return null;
  const phase = rep.start_phase;
  const pct = phase ? Math.round((100 * (phase.step - 1)) / phase.steps) : 0;
  const bar = h("div", { class: "progress" }, h("div", { class: "progress-fill" }));
  bar.firstChild.style.width = pct + "%";
  const text = phase ? `step ${phase.step} of ${phase.steps}: ${phase.phase}` : "queued for placement";
  return h("div", { class: "loading", "data-step": phase ? phase.step : 0 }, bar,
    h("div", { class: "note" }, `${text} · ${seconds(rep.loading_s)} elapsed`));
}

async function act(model, verb) {
  results.set(model, { text: `${verb}ing…`, bad: false });
  render();
  const began = performance.now();
  try {
    const out = await json(`admin/models/${encodeURIComponent(model)}/${verb}`, { method: "POST", admin: true });
    const took = ((performance.now() - began) / 1000).toFixed(1);
    results.set(model, { text: `${verb}ed in ${took} s: now ${out.state}`, bad: false });
  } catch (err) {
    results.set(model, { text: `${verb} failed: ${err.message}`, bad: true });
  }
  await refresh();
}

async function showLog(model, box) {
  try {
    box.textContent = await (await call(`admin/models/${encodeURIComponent(model)}/logs?lines=40`,
      { admin: true })).text();
  } catch (err) {
    box.textContent = `log not available: ${err.message}`;
  }
}

function modelCard(model, admin) {
  const running = ["ready", "loading", "sleeping"].includes(model.state);
  const result = results.get(model.id);
  const logBox = h("pre", { class: "error log", hidden: true });
  const title = admin ? undefined : "needs the admin key";
  const head = h("div", { class: "model-head" },
    h("span", { class: "model-name" }, model.id),
    h("span", { class: "state", "data-state": model.state }, model.state),
    h("span", { class: "note" }, `${model.task} · ${model.device === "-" ? "not placed" : model.device} · queued ${model.queued ?? 0} · in flight ${model.in_flight ?? 0}`),
    h("span", { class: "actions" },
      h("button", { class: "load", disabled: !admin || running, title, onclick: () => act(model.id, "load") }, "load"),
      h("button", { class: "unload", disabled: !admin || model.state === "unloaded", title,
        onclick: () => act(model.id, "unload") }, "unload"),
      admin && model.state === "failed" ? h("button", { class: "show-log", onclick: () => {
        logBox.hidden = false; showLog(model.id, logBox);
      } }, "log") : null));
  return h("div", { class: "model", "data-model": model.id, "data-state": model.state }, head,
    model.aliases.length ? h("div", { class: "note" }, "aliases: " + model.aliases.join(", ")) : null,
    loadingLine(model),
    model.error ? h("div", { class: "error" }, model.error) : null,
    logBox,
    result ? h("div", { class: "result-line" + (result.bad ? " bad" : "") }, result.text) : null,
    model.replicas.some((r) => r.placement) ? replicaRows(model) : null);
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
  const models = document.getElementById("models");
  // The admin buttons work with the admin key entered here, or with a key the server takes as admin.
  const admin = lastState.admin || Boolean(keys.admin);
  models.replaceChildren(...lastState.models.map((m) => modelCard(m, admin)));
  if (!lastState.models.length) models.append(h("p", { class: "note" }, "No model is configured for this key."));
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
    setStatus("ok", "connected" + (lastState.admin ? " · admin" : ""));
    document.getElementById("key-note").textContent = "";
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
