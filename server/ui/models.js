// The model cards. A card is rebuilt only when what it shows changes; the figures that move on
// every poll (idle time, load time, RAM) are updated in place, so a selection in an error, a
// scrolled log or a focused button survives the 2-second polls.
import { call, gib, h, json, seconds } from "./api.js";

const BIDI = /[\u202a-\u202e\u2066-\u2069]/g; // direction overrides: an engine log could reorder text

// Text from engines or errors, with bidi controls shown as escapes instead of obeyed.
export function visible(text) {
  return String(text).replace(BIDI, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

export class Models {
  // root: the cards' container; refresh(): poll the state again (after an action).
  constructor(root, refresh) {
    this.root = root;
    this.refresh = refresh;
    this.cards = new Map(); // model -> {sig, el}
    this.results = new Map(); // model -> {text, bad}: what its last load or unload did
    this.logs = new Map(); // model -> the log text fetched for it
    this.loads = new Map(); // model -> the AbortController of this page's own load call
  }

  render(models, admin) {
    for (const m of models) {
      const sig = JSON.stringify([stable(m), admin, this.results.get(m.id), this.logs.get(m.id)]);
      const known = this.cards.get(m.id);
      if (known && known.sig === sig) {
        live(known.el, m);
        continue;
      }
      const el = this.card(m, admin);
      if (known && known.el.isConnected) known.el.replaceWith(el);
      this.cards.set(m.id, { sig, el });
    }
    const ids = models.map((m) => m.id);
    for (const id of [...this.cards.keys()]) if (!ids.includes(id)) this.cards.delete(id);
    const shown = [...this.root.children].map((c) => c.dataset.model);
    if (shown.join("\n") !== ids.join("\n")) {
      this.root.replaceChildren(...ids.map((id) => this.cards.get(id).el));
      if (!ids.length) this.root.append(h("p", { class: "note" }, "No model is configured for this key."));
    }
  }

  async act(model, verb) {
    if (verb === "unload" && this.loads.has(model)) this.loads.get(model).abort(); // stop waiting first
    const ctl = new AbortController();
    if (verb === "load") this.loads.set(model, ctl);
    this.results.set(model, { text: `${verb}ing…`, bad: false });
    this.refresh();
    const began = performance.now();
    try {
      const out = await json(`admin/models/${encodeURIComponent(model)}/${verb}`,
        { method: "POST", admin: true, signal: ctl.signal });
      const took = ((performance.now() - began) / 1000).toFixed(1);
      this.results.set(model, { text: `${verb}ed in ${took} s: now ${out.state}`, bad: false });
    } catch (err) {
      const text = err.name === "AbortError" ? "load called off by the unload" : `${verb} failed: ${err.message}`;
      if (err.name !== "AbortError" || !this.results.get(model).text.startsWith("unload")) {
        this.results.set(model, { text, bad: err.name !== "AbortError" });
      }
    } finally {
      if (this.loads.get(model) === ctl) this.loads.delete(model);
    }
    await this.refresh();
  }

  async toggleLog(model) {
    if (this.logs.has(model)) {
      this.logs.delete(model);
    } else {
      try {
        this.logs.set(model, await (await call(`admin/models/${encodeURIComponent(model)}/logs?lines=40`,
          { admin: true })).text());
      } catch (err) {
        this.logs.set(model, `log not available: ${err.message}`);
      }
    }
    await this.refresh();
  }

  card(model, admin) {
    const running = ["ready", "loading", "sleeping"].includes(model.state);
    const result = this.results.get(model.id);
    const title = admin ? undefined : "needs the admin key";
    const log = this.logs.get(model.id);
    const head = h("div", { class: "model-head" },
      h("span", { class: "model-name" }, model.id),
      h("span", { class: "state", "data-state": model.state }, model.state),
      h("span", { class: "note" }, `${model.task} · ${model.device === "-" ? "not placed" : model.device} · ` +
        `queued ${model.queued ?? 0} · in flight ${model.in_flight ?? 0}`),
      h("span", { class: "actions" },
        h("button", { class: "load", disabled: !admin || running, title, onclick: () => this.act(model.id, "load") }, "load"),
        h("button", { class: "unload", disabled: !admin || model.state === "unloaded", title,
          onclick: () => this.act(model.id, "unload") }, "unload"),
        admin && (model.state === "failed" || log !== undefined) ? h("button", {
          class: "show-log", onclick: () => this.toggleLog(model.id) }, log === undefined ? "log" : "hide log") : null));
    return h("div", { class: "model", "data-model": model.id, "data-state": model.state }, head,
      model.aliases.length ? h("div", { class: "note" }, "aliases: " + model.aliases.join(", ")) : null,
      loadingLine(model),
      model.error ? h("div", { class: "error" }, visible(model.error)) : null,
      log !== undefined ? h("pre", { class: "error log" }, visible(log)) : null,
      result ? h("div", { class: "result-line" + (result.bad ? " bad" : "") }, visible(result.text)) : null,
      model.replicas.some((r) => r.placement) ? replicaRows(model) : null);
  }
}

// A model without the figures that change on every poll (they are updated by live()).
function stable(model) {
  return { ...model, replicas: model.replicas.map(({ idle_s, uptime_s, loading_s, ram_bytes, ...r }) => r) };
}

function live(card, model) {
  for (const r of model.replicas) {
    const idle = card.querySelector(`[data-live="idle-${r.index}"]`);
    if (idle) idle.textContent = r.state === "ready" ? seconds(r.idle_s) : "–";
    const ram = card.querySelector(`[data-live="ram-${r.index}"]`);
    if (ram && r.ram_bytes != null) ram.textContent = gib(r.ram_bytes) + " RAM";
  }
  const rep = model.replicas.find((r) => r.state === "loading");
  const elapsed = card.querySelector('[data-live="loading"]');
  if (rep && elapsed) elapsed.textContent = loadingText(rep);
}

function replicaRows(model) {
  const head = h("tr", {}, ["#", "state", "devices", "TP", "reserved", "measured", "estimated",
    "in flight", "idle"].map((t) => h("th", {}, t)));
  const rows = model.replicas.map((r) => {
    const p = r.placement || {};
    return h("tr", { class: "replica" },
      h("td", {}, r.index), h("td", {}, r.state), h("td", {}, (p.devices || []).join("+") || r.device),
      h("td", {}, p.tensor_parallel_size ?? "–"), h("td", {}, gib(p.reserved_bytes)),
      h("td", { "data-live": `ram-${r.index}`, title: r.ram_bytes != null ? "RAM of its processes (PSS)" : "NVML's figure" },
        r.ram_bytes != null ? gib(r.ram_bytes) + " RAM" : gib(p.measured_bytes)),
      h("td", {}, gib(p.estimated_bytes)),
      h("td", {}, r.in_flight), h("td", { "data-live": `idle-${r.index}` }, r.state === "ready" ? seconds(r.idle_s) : "–"));
  });
  return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, rows)));
}

function loadingText(rep) {
  const phase = rep.start_phase;
  const text = phase ? `step ${phase.step} of ${phase.steps}: ${phase.phase}` : "queued for placement";
  return `${text} · ${seconds(rep.loading_s)} elapsed`;
}

function loadingLine(model) {
  const rep = model.replicas.find((r) => r.state === "loading");
  if (!rep) return null;
  const phase = rep.start_phase;
  const pct = phase ? Math.round((100 * (phase.step - 1)) / phase.steps) : 0;
  const bar = h("div", { class: "progress" }, h("div", { class: "progress-fill" }));
  bar.firstChild.style.width = pct + "%";
  return h("div", { class: "loading", "data-step": phase ? phase.step : 0 }, bar,
    h("div", { class: "note", "data-live": "loading" }, loadingText(rep)));
}
