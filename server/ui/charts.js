// The traffic charts: one small uPlot chart per figure, one line per model, from
// /console/traffic's columns (Unix seconds, then one list per model; null where none).
const FIGURES = [
  ["req_s", "requests/s"],
  ["ttft_p50_s", "TTFT p50 (s, streamed requests)"],
  ["tok_s", "output tokens/s"],
  ["queued", "queued"],
  ["rejections_s", "rejections/s"],
];
const COLOURS = ["#2b6cb0", "#dd6b20", "#2f855a", "#805ad5", "#c53030", "#319795"];

export class Charts {
  constructor(root) {
    this.root = root;
    this.plots = new Map(); // figure -> {plot, models}
    this.boxes = new Map();
    for (const [key, title] of FIGURES) {
      const box = document.createElement("div");
      box.className = "chart";
      box.dataset.figure = key;
      const head = document.createElement("h3");
      head.textContent = title;
      box.append(head);
      root.append(box);
      this.boxes.set(key, box);
    }
  }

  legend(models) {
    const key = models.join("\n");
    if (this.legendKey === key) return;
    this.legendKey = key;
    const legend = document.getElementById("chart-legend");
    legend.replaceChildren(...models.map((m, i) => {
      const item = document.createElement("span");
      item.className = "legend-item";
      const swatch = document.createElement("span");
      swatch.className = "sw";
      swatch.style.background = COLOURS[i % COLOURS.length];
      item.append(swatch, m);
      return item;
    }));
  }

  update(series) {
    if (typeof uPlot === "undefined") return;
    const models = Object.keys(series.models).sort();
    this.legend(models);
    const now = Date.now() / 1000;
    const t = series.t.length ? series.t : [now - series.window_s, now];
    for (const [key] of FIGURES) {
      const data = [t, ...models.map((m) => (series.t.length ? series.models[m][key] : [null, null]))];
      const known = this.plots.get(key);
      if (known && known.models.join("\n") === models.join("\n")) {
        known.plot.setData(data);
        continue;
      }
      if (known) known.plot.destroy();
      const box = this.boxes.get(key);
      const opts = {
        width: Math.max(240, box.clientWidth || 260),
        height: 120,
        legend: { show: false },
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
        axes: [{ space: 60, size: 28 }, { size: 52 }],
        series: [{}, ...models.map((m, i) => ({
          label: m, stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: false,
          // TTFT has points only where a stream started: show them, not just the lines between.
          points: { show: key === "ttft_p50_s", size: 5, fill: COLOURS[i % COLOURS.length] },
        }))],
      };
      this.plots.set(key, { plot: new uPlot(opts, data, box), models });
    }
  }
}
