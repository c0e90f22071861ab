// The evaluation report's renderer: one script for the static report (the response is
// embedded in #rdv-report) and the live dashboard (it fetches the same JSON from the
// evaluator every few seconds). Charts are plain SVG drawn here; no library, no network
// access beyond the dashboard's own API, no innerHTML (model names are data, not markup).
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Chart geometry in SVG user units; the SVG scales to its container's width.
  const WIDTH = 560;
  const HEIGHT = 250;
  const MARGIN = { top: 14, right: 30, bottom: 38, left: 58 };
  const PLOT_W = WIDTH - MARGIN.left - MARGIN.right;
  const PLOT_H = HEIGHT - MARGIN.top - MARGIN.bottom;
  const TICKS = 5;
  const POINT_RADIUS = 2.5;
  const ALARM_RADIUS = 4.5;
  // Series colours live in the stylesheet as .s0 ... .s7; more models reuse them.
  const SERIES_CLASSES = 8;
  // The fastest latency drawn on the log axis: a 0 s quantile cannot be placed on it.
  const MIN_LATENCY_S = 1e-4;
  // Y headroom above the largest value so the top line does not touch the frame.
  const HEADROOM = 1.1;
  // Time axis steps in seconds, from 1 s to a day: ticks fall on round clock times.
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    21600, 43200, 86400];
  const MINUTE = 60;
  const DAY = 86400;
  // Significant digits of the figures in the header and the table.
  const DIGITS = 3;

  const ROLE_ORDER = {
    MODEL_ROLE_INCUMBENT: 0,
    MODEL_ROLE_CANARY: 1,
    MODEL_ROLE_CHALLENGER: 2,
    MODEL_ROLE_DECOY: 3,
  };
  const VERDICTS = {
    COMPARISON_VERDICT_BETTER: ["better", "good"],
    COMPARISON_VERDICT_WORSE: ["worse", "bad"],
    COMPARISON_VERDICT_INCONCLUSIVE: ["inconclusive", "neutral"],
    COMPARISON_VERDICT_UNSPECIFIED: ["too few pairs", "neutral"],
  };

  // ----------------------------------------------------------------------------------
  // Reading the protobuf JSON (MessageToDict): NaN/Infinity are strings, int64 may be a
  // string, durations are "0.012s", timestamps RFC 3339, enums their names.
  // ----------------------------------------------------------------------------------

  function num(value) {
    if (value === undefined || value === null || value === "") return NaN;
    if (typeof value === "number") return value;
    if (value === "NaN") return NaN;
    if (value === "Infinity") return Infinity;
    if (value === "-Infinity") return -Infinity;
    return Number(value);
  }

  function seconds(duration) {
    if (typeof duration !== "string" || !duration.endsWith("s")) return NaN;
    return Number(duration.slice(0, -1));
  }

  function epoch(timestamp) {
    if (typeof timestamp !== "string") return NaN;
    return Date.parse(timestamp) / 1000;
  }

  function roleName(role) {
    return String(role || "MODEL_ROLE_UNSPECIFIED").replace("MODEL_ROLE_", "").toLowerCase();
  }

  function byRole(a, b) {
    const ra = ROLE_ORDER[a.role] ?? 9;
    const rb = ROLE_ORDER[b.role] ?? 9;
    return ra - rb || String(a.model).localeCompare(String(b.model));
  }

  // ----------------------------------------------------------------------------------
  // Formatting
  // ----------------------------------------------------------------------------------

  const DASH = "–";

  function fmtNumber(value, digits) {
    const v = num(value);
    if (!Number.isFinite(v)) return DASH;
    return v.toFixed(digits);
  }

  // Three significant digits, no trailing zeros, no exponent below a million.
  function fmtFigure(value) {
    const v = num(value);
    if (!Number.isFinite(v)) return DASH;
    if (v === 0) return "0";
    return Math.abs(v) >= 1000 ? v.toFixed(0) : String(+v.toPrecision(DIGITS));
  }

  function fmtCount(value) {
    const v = num(value);
    return Number.isFinite(v) ? v.toLocaleString("en-US") : DASH;
  }

  function fmtShare(value) {
    const v = num(value);
    return Number.isFinite(v) ? (100 * v).toFixed(1) + " %" : DASH;
  }

  function fmtLatency(secs) {
    if (!Number.isFinite(secs)) return DASH;
    if (secs < 1e-3) return (secs * 1e6).toFixed(0) + " µs";
    if (secs < 1) return (secs * 1e3).toPrecision(3).replace(/\.?0+$/, "") + " ms";
    return secs.toPrecision(3) + " s";
  }

  function fmtTime(epochSeconds) {
    if (!Number.isFinite(epochSeconds)) return DASH;
    return new Date(epochSeconds * 1000).toISOString().slice(11, 19);
  }

  // A tick label as precise as the step: seconds only when ticks are seconds apart, the
  // date only when the axis spans days.
  function timeTickFormat(step, span) {
    return (t) => {
      const iso = new Date(t * 1000).toISOString();
      if (span >= DAY) return iso.slice(5, 10) + " " + iso.slice(11, 16);
      return step < MINUTE ? iso.slice(11, 19) : iso.slice(11, 16);
    };
  }

  function fmtDateTime(epochSeconds) {
    if (!Number.isFinite(epochSeconds)) return DASH;
    return new Date(epochSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function fmtSpan(secs) {
    if (!Number.isFinite(secs)) return DASH;
    const units = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
    for (const [unit, size] of units) {
      if (secs >= size) return (secs / size).toPrecision(3).replace(/\.?0+$/, "") + " " + unit;
    }
    return secs.toFixed(1) + " s";
  }

  function fmtError(error, targetKind) {
    if (!error) return DASH;
    if (error.regression) {
      return "MAE " + fmtFigure(error.regression.mae) + " · RMSE " +
        fmtFigure(error.regression.rmse);
    }
    if (error.classification) {
      return "accuracy " + fmtShare(error.classification.accuracy) + " · log loss " +
        fmtFigure(error.classification.log_loss);
    }
    return targetKind === "TARGET_KIND_UNSPECIFIED" ? "no ground truth yet" : DASH;
  }

  // ----------------------------------------------------------------------------------
  // DOM helpers: elements are built with textContent, never parsed from strings.
  // ----------------------------------------------------------------------------------

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children || []) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function tooltip(node, text) {
    node.append(svg("title", {}, text));
    return node;
  }

  // ----------------------------------------------------------------------------------
  // Scales and axes
  // ----------------------------------------------------------------------------------

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const fraction = raw / power;
    const nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
    return nice * power;
  }

  function linearTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const step = niceStep(hi - lo, count);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
    return ticks;
  }

  function timeTicks(lo, hi) {
    const step = TIME_STEPS.find((s) => (hi - lo) / s <= TICKS) || niceStep(hi - lo, TICKS);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) ticks.push(t);
    return { ticks, format: timeTickFormat(step, hi - lo) };
  }

  function logTicks(lo, hi) {
    const ticks = [];
    for (let p = Math.floor(Math.log10(lo)); p <= Math.ceil(Math.log10(hi)); p++) {
      for (const m of [1, 2, 5]) {
        const t = m * Math.pow(10, p);
        if (t >= lo && t <= hi) ticks.push(t);
      }
    }
    return ticks;
  }

  function scale(domain, range, log) {
    const f = log ? Math.log10 : (v) => v;
    const d0 = f(domain[0]);
    const d1 = f(domain[1]);
    const span = d1 - d0 || 1;
    return (v) => range[0] + ((f(v) - d0) / span) * (range[1] - range[0]);
  }

  // A frame with axes: returns the SVG and the x/y mappings into plot coordinates.
  function frame(spec) {
    const root = svg("svg", {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      class: "plot",
      role: "img",
      "aria-label": spec.title,
    });
    const x = scale(spec.x.domain, [MARGIN.left, MARGIN.left + PLOT_W], spec.x.log);
    const y = scale(spec.y.domain, [MARGIN.top + PLOT_H, MARGIN.top], false);
    const axes = svg("g", { class: "axes" });
    let xTicks = spec.x.log
      ? logTicks(spec.x.domain[0], spec.x.domain[1])
      : linearTicks(spec.x.domain[0], spec.x.domain[1], TICKS);
    let xFormat = spec.x.format;
    if (spec.x.time) ({ ticks: xTicks, format: xFormat } = timeTicks(...spec.x.domain));
    for (const t of xTicks) {
      const px = x(t).toFixed(1);
      axes.append(svg("line", { class: "grid", x1: px, x2: px, y1: MARGIN.top,
        y2: MARGIN.top + PLOT_H }));
      axes.append(svg("text", { class: "tick", x: px, y: MARGIN.top + PLOT_H + 14,
        "text-anchor": "middle" }, xFormat(t)));
    }
    for (const t of linearTicks(spec.y.domain[0], spec.y.domain[1], TICKS)) {
      const py = y(t).toFixed(1);
      axes.append(svg("line", { class: "grid", x1: MARGIN.left, x2: MARGIN.left + PLOT_W,
        y1: py, y2: py }));
      axes.append(svg("text", { class: "tick", x: MARGIN.left - 6, y: py,
        "text-anchor": "end", "dominant-baseline": "middle" }, spec.y.format(t)));
    }
    axes.append(svg("rect", { class: "frame", x: MARGIN.left, y: MARGIN.top, width: PLOT_W,
      height: PLOT_H }));
    axes.append(svg("text", { class: "label", x: MARGIN.left + PLOT_W / 2, y: HEIGHT - 4,
      "text-anchor": "middle" }, spec.x.label));
    axes.append(svg("text", { class: "label", x: 12, y: MARGIN.top + PLOT_H / 2,
      "text-anchor": "middle", transform: `rotate(-90 12 ${MARGIN.top + PLOT_H / 2})` },
      spec.y.label));
    root.append(axes);
    return { root, x, y };
  }

  function extent(values) {
    const finite = values.filter(Number.isFinite);
    if (finite.length === 0) return [NaN, NaN];
    return [Math.min(...finite), Math.max(...finite)];
  }

  function padDomain(lo, hi) {
    return hi > lo ? [lo, hi] : [lo - 1, lo + 1];
  }

  // ----------------------------------------------------------------------------------
  // Chart containers: a figure with a caption, the SVG or a "no data" note, a legend.
  // ----------------------------------------------------------------------------------

  function figure(name, title, note) {
    const fig = el("figure", { class: "chart", "data-chart": name });
    fig.append(el("figcaption", {}, [el("h3", {}, [title]), el("p", { class: "note" }, [note])]));
    return fig;
  }

  function noData(fig, why) {
    fig.classList.add("empty");
    fig.append(el("p", { class: "no-data" }, ["No data: " + why]));
    return fig;
  }

  function legend(entries) {
    const list = el("ul", { class: "legend" });
    for (const entry of entries) {
      list.append(el("li", {}, [el("span", { class: "swatch " + entry.cls }), entry.name]));
    }
    return list;
  }

  // Line series: finite points are joined; an undefined point breaks the line, and every
  // point also gets a dot, so a point between two gaps stays visible.
  function drawLines(plot, series, pointText) {
    for (const s of series) {
      let d = "";
      let pen = "M";
      const group = svg("g", { class: "series-group " + s.cls, "data-model": s.name });
      for (const [px, py] of s.points) {
        if (!Number.isFinite(px) || !Number.isFinite(py)) {
          pen = "M";
          continue;
        }
        d += `${pen}${plot.x(px).toFixed(1)},${plot.y(py).toFixed(1)}`;
        pen = "L";
        group.append(tooltip(svg("circle", { class: "point", cx: plot.x(px).toFixed(1),
          cy: plot.y(py).toFixed(1), r: POINT_RADIUS }), `${s.name}: ${pointText(px, py)}`));
      }
      if (!d) continue; // a series with no point draws nothing (its legend entry stays)
      group.prepend(svg("path", { class: "series" + (s.dashed ? " dashed" : ""), d }));
      plot.root.append(group);
    }
  }

  function hasPoints(series) {
    return series.some((s) => s.points.some(([px, py]) => Number.isFinite(px) &&
      Number.isFinite(py)));
  }

  // ----------------------------------------------------------------------------------
  // The five charts
  // ----------------------------------------------------------------------------------

  function latencyChart(report, colours) {
    const fig = figure("latency", "Latency distribution",
      "Share of predictions arrived within a time after the request (CDF, log scale).");
    const series = (report.distributions || []).slice().sort(byRole).map((dist) => ({
      name: dist.model,
      cls: colours(dist.model),
      points: (dist.latency || [])
        .map((q) => [Math.max(MIN_LATENCY_S, seconds(q.latency)), num(q.quantile)])
        .filter(([lx, qy]) => Number.isFinite(lx) && Number.isFinite(qy))
        .sort((a, b) => a[1] - b[1]),
    }));
    if (!hasPoints(series)) return noData(fig, "no latency quantiles in this window.");
    let [lo, hi] = extent(series.flatMap((s) => s.points.map((p) => p[0])));
    if (!(hi > lo)) [lo, hi] = [lo / 2, lo * 2];
    const plot = frame({
      title: "latency CDF",
      x: { domain: [lo, hi], log: true, format: fmtLatency, label: "latency" },
      y: { domain: [0, 1], format: (t) => Math.round(t * 100) + "%", label: "quantile" },
    });
    drawLines(plot, series, (lx, qy) => `p${+(qy * 100).toFixed(2)} ${fmtLatency(lx)}`);
    fig.append(plot.root, legend(series));
    return fig;
  }

  function bucketTimes(report) {
    return (report.timeline || []).map((b) => epoch(b.start) + seconds(b.width) / 2);
  }

  function timeAxis(times) {
    const [lo, hi] = padDomain(...extent(times));
    return { domain: [lo, hi], log: false, time: true, format: fmtTime, label: "time (UTC)" };
  }

  function timelineModels(report) {
    const names = new Map();
    for (const model of report.models || []) names.set(model.model, model);
    for (const bucket of report.timeline || []) {
      for (const m of bucket.models || []) {
        if (!names.has(m.model)) names.set(m.model, { model: m.model });
      }
    }
    return [...names.values()].sort(byRole).map((m) => m.model);
  }

  function perModelSeries(report, colours, field) {
    const times = bucketTimes(report);
    return timelineModels(report).map((name) => ({
      name,
      cls: colours(name),
      points: (report.timeline || []).map((bucket, i) => {
        const figures = (bucket.models || []).find((m) => m.model === name);
        if (!figures) return [times[i], NaN];
        if (field === "mean_error" && !(num(figures.labelled) > 0)) return [times[i], NaN];
        return [times[i], num(figures[field])];
      }),
    }));
  }

  function winShareChart(report, colours) {
    const fig = figure("win-share", "Win share over time",
      "Share of each slice's requests a model answered; dashed: answered by the default.");
    const times = bucketTimes(report);
    const series = perModelSeries(report, colours, "win_share");
    series.push({
      name: "default",
      cls: "default",
      dashed: true,
      points: (report.timeline || []).map((bucket, i) => {
        const requests = num(bucket.requests);
        return [times[i], requests > 0 ? num(bucket.default_answers) / requests : NaN];
      }),
    });
    if (!hasPoints(series)) return noData(fig, "no requests in this window.");
    const plot = frame({
      title: "win share over time",
      x: timeAxis(times),
      y: { domain: [0, 1], format: (t) => Math.round(t * 100) + "%", label: "share" },
    });
    drawLines(plot, series, (t, share) => `${fmtTime(t)} ${fmtShare(share)}`);
    fig.append(plot.root, legend(series));
    return fig;
  }

  function errorChart(report, colours) {
    const measure = (report.models || []).map((m) => m.versus_incumbent &&
      m.versus_incumbent.error_measure).find(Boolean) ||
      (report.target_kind === "TARGET_KIND_CLASSIFICATION" ? "log_loss" : "absolute_error");
    const fig = figure("error", "Mean error over time",
      `Mean ${measure.replace("_", " ")} against the ground truth per slice (labelled requests).`);
    const times = bucketTimes(report);
    const series = perModelSeries(report, colours, "mean_error");
    if (!hasPoints(series)) return noData(fig, "no labelled requests in this window.");
    const [, hi] = extent(series.flatMap((s) => s.points.map((p) => p[1])));
    const plot = frame({
      title: "mean error over time",
      x: timeAxis(times),
      y: { domain: [0, hi > 0 ? hi * HEADROOM : 1], format: (t) => +t.toPrecision(3),
        label: measure.replace("_", " ") },
    });
    drawLines(plot, series, (t, e) => `${fmtTime(t)} ${fmtNumber(e, 3)}`);
    fig.append(plot.root, legend(series));
    return fig;
  }

  function scoreChart(report, colours) {
    const fig = figure("scores", "Score distributions",
      "Share of each model's scores per bin: incumbent, canary and challengers side by side.");
    const edges = (report.score_bin_edges || []).map(num);
    const bins = edges.length - 1;
    const models = (report.distributions || []).slice().sort(byRole)
      .map((dist) => {
        const counts = (dist.score_counts || []).map(num).slice(0, Math.max(0, bins));
        const total = counts.reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
        return { name: dist.model, cls: colours(dist.model), counts, total };
      })
      .filter((m) => m.total > 0);
    if (bins < 1 || models.length === 0) return noData(fig, "no scores in this window.");
    const top = Math.max(...models.flatMap((m) => m.counts.map((c) => c / m.total)));
    const plot = frame({
      title: "score histograms",
      x: { domain: [edges[0], edges[bins]], log: false, format: (t) => +t.toPrecision(3),
        label: "score" },
      y: { domain: [0, top * HEADROOM], format: (t) => Math.round(t * 100) + "%",
        label: "share of scores" },
    });
    const bars = svg("g", { class: "bars" });
    for (let bin = 0; bin < bins; bin++) {
      const left = plot.x(edges[bin]);
      const slot = (plot.x(edges[bin + 1]) - left) / models.length;
      models.forEach((m, k) => {
        const share = (m.counts[bin] || 0) / m.total;
        const yTop = plot.y(share);
        bars.append(tooltip(svg("rect", {
          class: "bar " + m.cls,
          "data-model": m.name,
          x: (left + k * slot).toFixed(1),
          y: yTop.toFixed(1),
          width: Math.max(0.5, slot - 0.5).toFixed(1),
          height: Math.max(0, plot.y(0) - yTop).toFixed(1),
        }), `${m.name}: [${+edges[bin].toPrecision(4)}, ${+edges[bin + 1].toPrecision(4)}) ` +
          `${fmtCount(m.counts[bin] || 0)} scores (${fmtShare(share)})`));
      });
    }
    plot.root.append(bars);
    fig.append(plot.root, legend(models));
    return fig;
  }

  function driftChart(report) {
    const drift = report.canary_drift;
    const name = drift ? (drift.statistic_name || "drift").toUpperCase() : "drift";
    const fig = figure("drift", "Canary drift over time",
      drift ? `${name} of the canary ${drift.model}'s recent scores against its reference ` +
        "window; dashed: the alarm threshold." : "The objective has no canary.");
    const points = (report.drift_timeline || []).map((p) => ({
      t: epoch(p.end), value: num(p.statistic), alarm: Boolean(p.alarm),
      recent: num(p.recent_count),
    }));
    const series = [{ name: drift ? drift.model : "canary", cls: "drift",
      points: points.map((p) => [p.t, p.value]) }];
    if (!hasPoints(series)) return noData(fig, drift ?
      "too few canary scores in this window for a drift figure." :
      "the objective has no canary.");
    const threshold = drift ? num(drift.threshold) : NaN;
    const [, hi] = extent(points.map((p) => p.value).concat([threshold]));
    const plot = frame({
      title: "canary drift over time",
      x: timeAxis(points.map((p) => p.t)),
      y: { domain: [0, hi > 0 ? hi * HEADROOM : 1], format: (t) => +t.toPrecision(3),
        label: name },
    });
    if (Number.isFinite(threshold)) {
      const py = plot.y(threshold).toFixed(1);
      plot.root.append(tooltip(svg("line", { class: "threshold", x1: MARGIN.left,
        x2: MARGIN.left + PLOT_W, y1: py, y2: py }), `threshold ${threshold}`));
    }
    drawLines(plot, series, (t, v) => `${fmtTime(t)} ${name} ${fmtNumber(v, 3)}`);
    for (const p of points.filter((q) => q.alarm && Number.isFinite(q.value))) {
      plot.root.append(tooltip(svg("circle", { class: "alarm", cx: plot.x(p.t).toFixed(1),
        cy: plot.y(p.value).toFixed(1), r: ALARM_RADIUS }),
        `alarm at ${fmtTime(p.t)}: ${name} ${fmtNumber(p.value, 3)} ` +
        `(${fmtCount(p.recent)} recent scores)`));
    }
    const entries = [{ name: `${name}`, cls: "drift" }, { name: "threshold", cls: "threshold" }];
    if (points.some((p) => p.alarm)) entries.push({ name: "alarm", cls: "alarm" });
    fig.append(plot.root, legend(entries));
    return fig;
  }

  // ----------------------------------------------------------------------------------
  // Header and table
  // ----------------------------------------------------------------------------------

  function driftBadge(drift) {
    if (!drift) return el("span", { class: "badge neutral", "data-drift": "none" }, ["no canary"]);
    const name = (drift.statistic_name || "drift").toUpperCase();
    if (!Number.isFinite(num(drift.statistic))) {
      // The evaluator computes no PSI below its minimum of scores (sampling noise).
      return el("span", { class: "badge neutral", "data-drift": "too-few" },
        [`too few scores yet (${fmtCount(drift.recent_count)} recent, ` +
          `${fmtCount(drift.reference_count)} reference)`]);
    }
    const text = `${name} ${fmtNumber(drift.statistic, 3)} / ${fmtNumber(drift.threshold, 3)}`;
    return drift.alarm
      ? el("span", { class: "badge bad", "data-drift": "alarm" }, ["drift alarm · " + text])
      : el("span", { class: "badge good", "data-drift": "ok" }, ["no drift · " + text]);
  }

  function renderHeader(target, report) {
    const start = epoch(report.start_time);
    const end = epoch(report.end_time);
    const items = [
      ["Objective", report.objective || DASH],
      ["Window", `${fmtDateTime(start)} → ${fmtTime(end)} (${fmtSpan(end - start)})`],
      ["Requests", fmtCount(report.requests)],
      ["Default share", `${fmtShare(report.default_share)} (${fmtCount(report.default_answers)})`],
      ["Labelled requests", fmtCount(report.labelled_requests)],
      ["Target", String(report.target_kind || "TARGET_KIND_UNSPECIFIED")
        .replace("TARGET_KIND_", "").toLowerCase()],
      ["Answered error", fmtError(report.answered_error, report.target_kind)],
      ["Pending feedback", fmtCount(report.pending_feedback)],
    ];
    const list = el("dl", { class: "facts" });
    for (const [key, value] of items) {
      list.append(el("div", {}, [el("dt", {}, [key]), el("dd", {}, [value])]));
    }
    list.append(el("div", {}, [el("dt", {}, ["Canary drift"]),
      el("dd", {}, [driftBadge(report.canary_drift)])]));
    target.replaceChildren(list);
  }

  const COLUMNS = [
    ["Model", ""], ["Role", ""], ["Predictions", "num"], ["Win share", "num"],
    ["Error share", "num"], ["Late share", "num"], ["p50", "num"], ["p90", "num"],
    ["p99", "num"], ["p99.9", "num"], ["Mean |Δ| to incumbent", "num"], ["Spearman", "num"],
    ["Pairs", "num"], ["Error (labelled)", "num"],
    ["Δ error vs incumbent [CI] · pairs · verdict", "num"],
  ];

  // Negative differences mean a lower error than the incumbent's (see PairedComparison).
  function comparisonCell(model) {
    const cmp = model.versus_incumbent;
    if (!cmp) {
      return el("td", { class: "num cmp" }, [model.role === "MODEL_ROLE_INCUMBENT" ?
        "baseline" : DASH]);
    }
    const level = Math.round(num(cmp.confidence) * 100);
    const interval = `${fmtFigure(cmp.mean_difference)} [${fmtFigure(cmp.ci_low)}, ` +
      `${fmtFigure(cmp.ci_high)}]`;
    const detail = (Number.isFinite(level) ? `${level}% · ` : "") + `${fmtCount(cmp.pairs)} pairs `;
    const [verdict, tone] = VERDICTS[cmp.verdict] || VERDICTS.COMPARISON_VERDICT_UNSPECIFIED;
    // Two lines (the interval, then its level, pairs and verdict) keep the table narrow.
    return el("td", { class: "num cmp", title: cmp.method || "" }, [interval, el("br"),
      el("small", {}, [detail]),
      el("span", { class: "badge " + tone, "data-verdict": verdict }, [verdict])]);
  }

  function renderTable(table, report, colours) {
    const head = el("tr", {}, COLUMNS.map(([name, cls]) => el("th", { class: cls, scope: "col" },
      [name])));
    const body = el("tbody");
    const models = (report.models || []).slice().sort(byRole);
    for (const m of models) {
      const row = el("tr", { "data-model": m.model, "data-role": roleName(m.role) });
      const cells = [
        el("th", { scope: "row" }, [el("span", { class: "swatch " + colours(m.model) }),
          m.model, m.model_version ? el("small", {}, [" " + m.model_version]) : ""]),
        el("td", {}, [roleName(m.role)]),
        el("td", { class: "num" }, [fmtCount(m.predictions)]),
        el("td", { class: "num" }, [fmtShare(m.win_share)]),
        el("td", { class: "num" }, [fmtShare(m.error_share)]),
        el("td", { class: "num" }, [fmtShare(m.late_share)]),
        el("td", { class: "num" }, [fmtLatency(seconds(m.latency_p50))]),
        el("td", { class: "num" }, [fmtLatency(seconds(m.latency_p90))]),
        el("td", { class: "num" }, [fmtLatency(seconds(m.latency_p99))]),
        el("td", { class: "num" }, [fmtLatency(seconds(m.latency_p999))]),
        el("td", { class: "num" }, [fmtFigure(m.agreement_with_incumbent)]),
        el("td", { class: "num" }, [fmtNumber(m.rank_correlation_with_incumbent, 2)]),
        el("td", { class: "num" }, [fmtCount(m.incumbent_pairs)]),
        el("td", { class: "num" }, [fmtError(m.error, report.target_kind), el("br"),
          el("small", {}, [`${fmtCount(m.error ? m.error.labelled : 0)} labelled`])]),
        comparisonCell(m),
      ];
      row.append(...cells);
      body.append(row);
    }
    if (models.length === 0) {
      body.append(el("tr", { class: "empty" }, [el("td", { colspan: COLUMNS.length,
        class: "no-data" }, ["No data: no model scored a request in this window."])]));
    }
    table.replaceChildren(el("thead", {}, [head]), body);
  }

  // ----------------------------------------------------------------------------------
  // The whole page
  // ----------------------------------------------------------------------------------

  // Colours follow the role order, so the incumbent is always the first colour.
  function colourMap(report) {
    const names = [];
    const add = (name) => { if (name !== undefined && !names.includes(name)) names.push(name); };
    (report.models || []).slice().sort(byRole).forEach((m) => add(m.model));
    (report.distributions || []).slice().sort(byRole).forEach((d) => add(d.model));
    return (name) => {
      add(name);
      return "s" + (names.indexOf(name) % SERIES_CLASSES);
    };
  }

  function render(report) {
    const colours = colourMap(report);
    renderHeader(document.getElementById("rdv-header"), report);
    renderTable(document.getElementById("rdv-models"), report, colours);
    document.getElementById("rdv-charts").replaceChildren(
      latencyChart(report, colours),
      winShareChart(report, colours),
      errorChart(report, colours),
      scoreChart(report, colours),
      driftChart(report),
    );
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  }

  function setStatus(text, isError) {
    const status = document.getElementById("rdv-status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function controls(config) {
    const form = el("form", { method: "get", action: config.page_path });
    const objective = el("select", { name: "objective", "aria-label": "objective" });
    for (const name of config.objectives) {
      const option = el("option", { value: name }, [name]);
      if (name === config.objective) option.selected = true;
      objective.append(option);
    }
    const windowSelect = el("select", { name: "window_s", "aria-label": "window" });
    const choices = config.window_choices.slice();
    if (!choices.includes(config.window_s)) choices.push(config.window_s);
    for (const choice of choices.sort((a, b) => a - b)) {
      const option = el("option", { value: String(choice) }, ["last " + fmtSpan(choice)]);
      if (choice === config.window_s) option.selected = true;
      windowSelect.append(option);
    }
    form.append(el("label", {}, ["Objective ", objective]), el("label", {}, ["Window ",
      windowSelect]), el("button", { type: "submit" }, ["Show"]));
    return form;
  }

  function live(config) {
    document.getElementById("rdv-controls").replaceChildren(controls(config));
    const refreshMs = config.refresh_s * 1000;
    if (!config.objective) {
      setStatus("No objectives yet: this page reloads until the evaluator knows one.");
      render({});
      setTimeout(() => window.location.reload(), refreshMs);
      return;
    }
    const url = `${config.api_path}?objective=${encodeURIComponent(config.objective)}` +
      `&window_s=${encodeURIComponent(config.window_s)}`;
    const tick = async () => {
      try {
        const response = await fetch(url, { cache: "no-store" });
        const body = await response.json();
        if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
        render(body);
        setStatus(`Updated ${fmtTime(Date.now() / 1000)} UTC · refreshes every ` +
          `${fmtSpan(config.refresh_s)}`);
      } catch (error) {
        // Keep the last rendering: a missed refresh should not blank the dashboard.
        setStatus(`Refresh failed (${error.message}); retrying in ${fmtSpan(config.refresh_s)}`,
          true);
      }
      setTimeout(tick, refreshMs);
    };
    render({});
    tick();
  }

  function main() {
    const config = JSON.parse(document.getElementById("rdv-config").textContent);
    if (config.mode === "live") {
      live(config);
      return;
    }
    render(JSON.parse(document.getElementById("rdv-report").textContent) || {});
    setStatus(config.generated ? `Generated ${config.generated}` : "");
  }

  main();
})();
