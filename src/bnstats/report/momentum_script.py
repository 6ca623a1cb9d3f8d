"""The script of the report's momentum slider (see :mod:`bnstats.report.momentum`): plain
JavaScript drawing inline SVG from the page's own JSON; it loads nothing."""

SCRIPT = r"""
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("momentum-data").textContent);
  const slider = document.getElementById("momentum-slider");
  const shown = document.getElementById("momentum-value");
  const SVG = "http://www.w3.org/2000/svg";
  // Drawing units are CSS pixels at the width the page's style gives each chart (see
  // bnstats.report.html.STYLE), so the 13-unit text reads at 11 px or more from a 400 px
  // window up. Every chart: a title row on top, tick labels left of the plot, never inside.
  const W = 360, H = 144, PAD = 52, TOP = 30, BOTTOM = 12;
  const AW = 380, AH = 200, ABOTTOM = 26;
  const T = data.count.length;

  function ema(stat, unit, m, debias) {
    const values = data.batch[stat][unit], out = new Array(T);
    let running = debias ? 0 : (stat === "var" ? 1 : 0);
    for (let t = 1; t <= T; t++) {
      const n = data.count[t - 1];
      const x = stat === "var" ? values[t - 1] * (n / (n - 1)) : values[t - 1];
      const w = !debias ? m : (t === 1 ? 1 : m / (1 - Math.pow(1 - m, t)));
      running = (1 - w) * running + w * x;
      out[t - 1] = running;
    }
    return out;
  }

  function node(tag, attrs, parent) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (parent) parent.appendChild(el);
    return el;
  }

  function scale(lo, hi, a, b) {
    const span = hi - lo || 1;
    return v => a + (v - lo) / span * (b - a);
  }

  const panels = [];
  for (const stat of ["mean", "var"]) {
    data.units.forEach((unit, i) => {
      const dots = data.batch[stat][i].map((v, t) =>
        stat === "var" ? v * (data.count[t] / (data.count[t] - 1)) : v);
      const target = data.population[stat][i];
      const start = stat === "var" ? 1 : 0;
      const lo = Math.min(start, target, ...dots), hi = Math.max(start, target, ...dots);
      const x = scale(1, Math.max(T, 2), PAD, W - 8), y = scale(lo, hi, H - BOTTOM, TOP);
      const svg = node("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", class: "panel small",
        "aria-label": `${data.symbols[stat]} of unit ${unit}`});
      node("text", {x: 4, y: 15, class: "tick title"}, svg).textContent =
        `${data.symbols[stat]}, unit ${unit}`;
      for (const v of [lo, hi]) {
        node("text", {x: PAD - 6, y: y(v) + 4, class: "tick", "text-anchor": "end"},
          svg).textContent = v.toPrecision(3);
      }
      const g = node("g", {fill: "#8c8c8c"}, svg);
      dots.forEach((v, t) => node("circle", {cx: x(t + 1).toFixed(1), cy: y(v).toFixed(1),
        r: 1.2}, g));
      node("line", {x1: PAD, x2: W - 8, y1: y(target), y2: y(target), stroke: "black",
        "stroke-dasharray": "5 3", class: "population"}, svg);
      const lines = {};
      for (const name of ["ema", "ema_debiased"]) {
        lines[name] = node("polyline", {fill: "none", stroke: data.colors[name],
          "stroke-width": name === "ema" ? 2 : 1, class: name}, svg);
      }
      panels.push({stat, i, unit, target, x, y, lines});
      document.getElementById("momentum-panels").appendChild(svg);
    });
  }

  // The accuracy axis spans the measured accuracies with a margin, on round ticks
  // (0.85-0.98 fills the chart instead of a sliver of 0-1).
  function accuracyAxis(values) {
    let lo = Math.min(...values), hi = Math.max(...values);
    const margin = Math.max(0.1 * (hi - lo), 0.01);
    lo = Math.max(0, lo - margin);
    hi = Math.min(1, hi + margin);
    const step = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5].find(s => (hi - lo) / s <= 6);
    lo = Math.max(0, Math.floor(lo / step + 1e-9) * step);
    hi = Math.min(1, Math.ceil(hi / step - 1e-9) * step);
    const ticks = [];
    for (let k = Math.round(lo / step); k * step <= hi + 1e-9; k++) ticks.push(k * step);
    const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    return {lo, hi, ticks, label: v => v.toFixed(digits + (step === 0.005 ? 1 : 0))};
  }

  const acc = (() => {
    const axis = accuracyAxis(Object.values(data.accuracy).flat());
    const top = TOP + 4, bottom = AH - ABOTTOM;
    const x = scale(-3, 0, PAD, AW - 14), y = scale(axis.lo, axis.hi, bottom, top);
    const svg = node("svg", {viewBox: `0 0 ${AW} ${AH}`, role: "img", class: "panel",
      "aria-label": "test accuracy against momentum"});
    node("text", {x: 4, y: 15, class: "tick title"}, svg).textContent = "test accuracy";
    for (const v of axis.ticks) {
      node("text", {x: PAD - 6, y: y(v) + 4, class: "tick", "text-anchor": "end"},
        svg).textContent = axis.label(v);
      node("line", {x1: PAD, x2: AW - 14, y1: y(v), y2: y(v), stroke: "#ddd"}, svg);
    }
    for (const e of [-3, -2, -1, 0]) {
      node("text", {x: x(e), y: AH - 6, class: "tick", "text-anchor": "middle"},
        svg).textContent = 10 ** e;
    }
    node("line", {x1: x(Math.log10(data.momentum)), x2: x(Math.log10(data.momentum)),
      y1: top, y2: bottom, stroke: "#8c8c8c", "stroke-dasharray": "3 3"}, svg);
    for (const [name, values] of Object.entries(data.accuracy)) {
      const pts = data.grid.map((m, k) => `${x(Math.log10(m)).toFixed(1)},` +
        `${y(values[k]).toFixed(1)}`);
      node("polyline", {points: pts.join(" "), fill: "none", stroke: data.colors[name],
        "stroke-width": name === "ema" ? 2 : 1}, svg);
      data.grid.forEach((m, k) => node("circle", {cx: x(Math.log10(m)).toFixed(1),
        cy: y(values[k]).toFixed(1), r: 2.5, fill: data.colors[name]}, svg));
    }
    const mark = node("line", {y1: top, y2: bottom, stroke: "black", id: "momentum-mark"}, svg);
    document.getElementById("momentum-accuracy").appendChild(svg);
    return m => {
      const at = x(Math.log10(m)).toFixed(1);
      mark.setAttribute("x1", at);
      mark.setAttribute("x2", at);
    };
  })();

  function number(value) {
    const el = document.createElement("span");
    el.className = "num";
    el.dataset.value = String(value);
    el.textContent = Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3)
      ? value.toExponential(3) : value.toPrecision(4);
    return el;
  }

  function redraw(m) {
    shown.textContent = m.toPrecision(3);
    shown.dataset.momentum = String(m);
    const rows = [];
    for (const p of panels) {
      const finals = {};
      for (const [name, line] of Object.entries(p.lines)) {
        const trace = ema(p.stat, p.i, m, name === "ema_debiased");
        line.setAttribute("points",
          trace.map((v, t) => `${p.x(t + 1).toFixed(1)},${p.y(v).toFixed(1)}`).join(" "));
        finals[name] = trace[T - 1];
      }
      rows.push([p, finals]);
    }
    const table = document.createElement("table");
    const head = table.insertRow();
    for (const h of ["", "EMA", "from population", "debiased EMA", "from population",
      "population"]) head.appendChild(document.createElement("th")).textContent = h;
    for (const [p, f] of rows) {
      const row = table.insertRow();
      row.dataset.stat = p.stat;
      row.dataset.unit = String(p.unit);
      row.insertCell().textContent = `${data.symbols[p.stat]}, unit ${p.unit}`;
      for (const v of [f.ema, Math.abs(f.ema - p.target), f.ema_debiased,
        Math.abs(f.ema_debiased - p.target), p.target]) row.insertCell().appendChild(number(v));
    }
    const step = data.virtual ? "updates" : "steps";
    const info = document.createElement("p");
    info.append(`effective window 1/momentum: `, number(1 / m), ` ${step}; weight still on `
      + `the start after ${T} ${step}, (1 − momentum)^${T}: `, number(Math.pow(1 - m, T)));
    info.id = "momentum-window";
    document.getElementById("momentum-numbers").replaceChildren(info, table);
    acc(m);
  }

  const lo = Math.log10(0.001), hi = 0;
  slider.addEventListener("input", () => {
    redraw(Math.pow(10, lo + (hi - lo) * Number(slider.value) / Number(slider.max)));
  });
  redraw(data.momentum);
})();
"""
