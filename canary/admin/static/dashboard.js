// canary dashboard: polls the admin API of the canary that served this page and draws what
// it reads as SVG. No dependencies, no build step, no request to any other host.
//
// The test harness reads what the page shows from data- attributes (#detail[data-phase],
// [data-metric][data-lower] ...) and the errors it met from window.__errors.
"use strict";

(() => {
  const API = "/api/v1/rollouts";
  const TOKEN_KEY = "canary.adminToken";
  const SVGNS = "http://www.w3.org/2000/svg";
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.min(60, Math.max(0.25, Number(params.get("poll")) || 1.5)) * 1000;
  const MAX_POINTS = 2500; // per rollout, client side: older points are thinned beyond it
  const MAX_ERRORS = 50; // window.__errors keeps the newest
  const FULL_HISTORY_EVERY = 30; // polls between full history reads (the store thins it)
  const DIST_EVERY = 3; // polls between distribution reads
  const ACTIONS = (document.body.dataset.actions || "pause resume promote rollback")
    .split(/\s+/)
    .filter(Boolean);
  const TOKEN_REQUIRED = document.body.dataset.tokenRequired === "true";
  const CONFIRM = {
    promote: (n) => `Promote ${n}: send 100% of the traffic to the candidate now?`,
    rollback: (n) => `Roll back ${n}: send 100% of the traffic to production now?`,
    retry: (n) => `Retry ${n}: start again from step 1 with the same candidate?`,
    approve: (n) => `Approve ${n}: open the gate its next step or promotion waits at?`,
  };
  const ENABLED = {
    pause: (p) => p === "running" || p === "holding",
    resume: (p) => p === "paused" || p === "holding",
    advance: (p) => !terminal(p),
    promote: (p) => !terminal(p),
    rollback: (p) => p !== "rolled_back",
    retry: (p) => p === "rolled_back",
    approve: (p, d) => !terminal(p) && !!(d.gate && d.gate.waiting), // a transition waits at a gate
  };
  const PHASE_ICON = {
    running: "\u25B6", paused: "\u23F8", holding: "\u23F8", promoted: "\u2713", rolled_back: "\u21A9",
  };
  const VERDICT_ICON = { OK: "\u2713", WORSE: "\u2717", UNKNOWN: "?" };

  window.__errors = window.__errors || [];

  const state = {
    selected: decodeURIComponent(location.hash.slice(1)) || null,
    list: [],
    detail: null,
    dist: null,
    series: new Map(), // rollout -> {points (its history), polls, phase}
    ticks: 0,
    timer: 0,
    busy: false,
    again: false,
    view: null, // the detail skeleton of the selected rollout
  };

  // -- small DOM helpers (text only: nothing read from the API becomes markup) ----------------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) e.append(c);
    return e;
  }

  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function $(sel, root) {
    return (root || document).querySelector(sel);
  }

  function terminal(phase) {
    return phase === "promoted" || phase === "rolled_back";
  }

  // -- errors ---------------------------------------------------------------------------------

  function report(message) {
    const text = String(message);
    window.__errors.push(text);
    if (window.__errors.length > MAX_ERRORS) window.__errors.splice(0, window.__errors.length - MAX_ERRORS);
    const box = $("#errors");
    const line = el("p", { "data-error": "" }, `${clock(Date.now() / 1000)} ${text}`);
    box.prepend(line);
    while (box.childElementCount > 3) box.lastElementChild.remove();
    box.hidden = false;
  }

  function clearErrors() {
    const box = $("#errors");
    box.replaceChildren();
    box.hidden = true;
  }

  window.addEventListener("error", (e) => report(`script error: ${e.message}`));
  window.addEventListener("unhandledrejection", (e) => report(`script error: ${e.reason}`));
  document.addEventListener("securitypolicyviolation", (e) =>
    report(`blocked by the page's Content-Security-Policy: ${e.violatedDirective} ${e.blockedURI}`));

  // -- formatting -----------------------------------------------------------------------------

  function clock(at, zone) {
    const opts = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
    if (zone) opts.timeZoneName = "short";
    return new Date(at * 1000).toLocaleTimeString([], opts);
  }

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "\u2013";
    s = Math.max(0, s);
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  function seconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "\u2013";
    const a = Math.abs(s);
    if (a >= 1) return `${sig(s)} s`;
    if (a >= 1e-3) return `${sig(s * 1e3)} ms`;
    return `${sig(s * 1e6)} \u00B5s`;
  }

  function sig(x, digits = 3) {
    if (x === null || x === undefined || !isFinite(x)) return "\u2013";
    if (x === 0) return "0";
    return Number(x.toPrecision(digits)).toLocaleString([], { maximumFractionDigits: 6 });
  }

  function count(n) {
    return n === null || n === undefined ? "\u2013" : Number(n).toLocaleString();
  }

  // How a metric's values read: relative tests compare a ratio (shown as a % change),
  // absolute rate tests a difference of shares (shown in percentage points).
  function scaleOf(m) {
    if (m.relative) return { base: 1, f: (v) => (v - 1) * 100, unit: "%" };
    if (m.kind === "error_rate" || m.kind === "rate") return { base: 0, f: (v) => v * 100, unit: "pp" };
    return { base: 0, f: (v) => v, unit: "" };
  }

  function signed(x, unit) {
    if (x === null || x === undefined || !isFinite(x)) return x > 0 ? "+\u221E" : x < 0 ? "\u2212\u221E" : "\u2013";
    return `${x > 0 ? "+" : ""}${sig(x)}${unit}`;
  }

  function badge(kind, value, text) {
    return el("span", { class: `badge ${kind}-${value}`, "data-badge": value }, text);
  }

  function phaseBadge(phase) {
    return badge("phase", phase, `${PHASE_ICON[phase] || ""} ${phase.replace("_", " ")}`);
  }

  function verdictBadge(verdict) {
    const v = String(verdict || "UNKNOWN").toUpperCase();
    return badge("verdict", v, `${VERDICT_ICON[v] || "?"} ${v}`);
  }

  // -- the API --------------------------------------------------------------------------------

  async function api(path, options) {
    const method = (options && options.method) || "GET";
    let r;
    try {
      r = await fetch(path, { cache: "no-store", credentials: "same-origin", ...options });
    } catch (e) {
      const err = new Error(`${method} ${path}: no answer (${e.message})`);
      err.status = 0;
      throw err;
    }
    const type = r.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await r.json().catch(() => null) : (await r.text(), null);
    if (!r.ok) {
      const why = data && data.error ? data.error : r.statusText;
      const err = new Error(`${method} ${path}: ${r.status} ${why}`);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function setToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      report(`cannot keep the token in this browser's session storage: ${e.message}`);
    }
    showTokenState();
  }

  function showTokenState() {
    const t = token();
    $("#token").value = "";
    $("#token-state").textContent = t
      ? "token set (this tab only)"
      : TOKEN_REQUIRED
        ? "commands need the admin token"
        : "no token needed";
    $("#token-form").dataset.token = t ? "set" : "unset";
  }

  // -- history: GET /history, read whole at first, then only what is new ------------------

  // A point of GET /history (short keys: see canary/controller/history.py) as the charts use it.
  function metricPoints(metrics) {
    const out = {};
    for (const m of metrics || []) {
      out[m.k] = { estimate: m.e, lower: m.l, upper: m.u, tolerance: m.tol, verdict: String(m.v).toUpperCase() };
    }
    return out;
  }

  function normalPoint(p) {
    return {
      at: Number(p.t),
      phase: p.ph,
      step: p.st,
      cand: Array.isArray(p.w) ? Number(p.w[1]) : null,
      metrics: metricPoints(p.m),
      action: p.a ?? null,
    };
  }

  function seriesOf(name) {
    let s = state.series.get(name);
    if (!s) {
      s = { points: [], polls: 0, phase: null };
      state.series.set(name, s);
    }
    return s;
  }

  function bound(points) {
    // Drop every other point of the older half: recent time keeps full resolution.
    while (points.length > MAX_POINTS) {
      const half = Math.floor(points.length / 2);
      points.splice(0, half, ...points.slice(0, half).filter((_, i) => i % 2 === 0));
    }
  }

  async function loadHistory(name, phase) {
    // Whole every FULL_HISTORY_EVERY polls (the store thins old points) and when the phase
    // changed (a retry starts the history afresh); else only the points after the last one.
    const s = seriesOf(name);
    const enc = encodeURIComponent(name);
    const last = s.points.length ? s.points[s.points.length - 1].at : null;
    const full = last === null || s.polls % FULL_HISTORY_EVERY === 0 || phase !== s.phase;
    const answer = await api(full ? `${API}/${enc}/history` : `${API}/${enc}/history?since=${last}`);
    const pts = (answer.points || []).map(normalPoint).filter((p) => isFinite(p.at));
    if (full) s.points = pts;
    else for (const p of pts) if (p.at > last) s.points.push(p);
    bound(s.points);
    s.polls++;
    s.phase = phase;
  }

  // -- polling --------------------------------------------------------------------------------

  async function tick() {
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    clearTimeout(state.timer);
    try {
      const list = (await api(API)).rollouts || [];
      state.list = list;
      const names = list.map((r) => r.name);
      if (!names.includes(state.selected)) state.selected = names.length ? names[0] : null;
      for (const k of state.series.keys()) if (!names.includes(k)) state.series.delete(k);
      renderList();
      const name = state.selected;
      if (name !== null) {
        const enc = encodeURIComponent(name);
        const wantDist = state.ticks % DIST_EVERY === 0 || !state.dist || state.dist.name !== name;
        const phase = list.find((r) => r.name === name).phase;
        const [detail, , dist] = await Promise.all([
          api(`${API}/${enc}`),
          loadHistory(name, phase).catch((e) => report(`history: ${e.message}`)),
          wantDist
            ? api(`${API}/${enc}/distributions`).catch((e) => {
                report(`latency distributions: ${e.message}`);
                return null;
              })
            : null,
        ]);
        if (name === state.selected) {
          state.detail = detail;
          if (dist) state.dist = dist;
          renderDetail();
        }
      } else {
        $("#detail").hidden = true;
      }
      setConn("live", `live \u00B7 updated ${clock(Date.now() / 1000, true)} \u00B7 every ${POLL_MS / 1000}s`);
    } catch (e) {
      setConn("error", `not updating: ${e.message}`);
      report(`cannot read the admin API: ${e.message}`);
    } finally {
      state.busy = false;
      state.ticks++;
      state.timer = setTimeout(tick, state.again ? 0 : POLL_MS);
      state.again = false;
    }
  }

  function setConn(kind, text) {
    const c = $("#conn");
    c.dataset.state = kind;
    c.textContent = text;
  }

  // -- the list of rollouts -------------------------------------------------------------------

  function stepText(r) {
    const what = r.step_kind === "shadow" ? "shadow" : `${sig(r.weights.candidate)}%`;
    return `${r.step}/${r.steps} (${what})`;
  }

  function renderList() {
    const tbody = $("#rollouts tbody");
    if (!state.list.length) {
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no rollouts configured")));
      return;
    }
    tbody.replaceChildren(
      ...state.list.map((r) => {
        const last = r.last_decision;
        return el(
          "tr",
          {
            "data-rollout-row": r.name,
            "data-phase": r.phase,
            "aria-selected": r.name === state.selected ? "true" : "false",
          },
          el("td", {}, el("a", { href: `#${encodeURIComponent(r.name)}` }, r.name)),
          el("td", {}, phaseBadge(r.phase)),
          el("td", { class: "num" }, stepText(r)),
          el("td", { class: "num" }, `${sig(r.weights.candidate)}%`),
          el("td", { class: "num" }, `${count(r.samples.production)} / ${count(r.samples.candidate)}`),
          el("td", {}, r.status || ""),
          el("td", {}, last ? `${last.action} \u00B7 ${clock(last.at)}` : "\u2013"),
        );
      }),
    );
  }

  // -- the selected rollout -------------------------------------------------------------------

  function skeleton(name) {
    const actions = el("div", { class: "actions", role: "group", "aria-label": "Operator commands" });
    const reason = el("input", { id: "reason", type: "text", placeholder: "reason (optional)", maxlength: 500 });
    actions.append(reason);
    for (const a of ACTIONS) {
      const cls = a === "rollback" ? "danger" : a === "promote" ? "primary" : "";
      actions.append(el("button", { type: "button", "data-action": a, class: cls }, a));
    }
    const notice = el("span", { id: "notice", class: "notice", role: "status" });
    actions.append(notice);
    actions.addEventListener("click", (e) => {
      const b = e.target.closest("button[data-action]");
      if (b && !b.disabled) act(b.dataset.action);
    });
    const v = {
      name,
      title: el("h2", {}, name),
      phase: el("span"),
      status: el("p", { class: "status" }),
      progress: el("div", { class: "progress" }),
      actions,
      notice,
      weights: svg("svg", { class: "chart small", role: "img", "aria-label": "candidate weight over time" }),
      weightsNow: el("span", { class: "num" }),
      metrics: el("div", { class: "metrics" }),
      metricEls: new Map(),
      dist: el("div"),
      log: el("tbody"),
      ratio: el("div"),
      inputs: el("div"),
    };
    const card = (title, ...body) => el("section", { class: "card" }, el("h3", {}, title), ...body);
    const detail = $("#detail");
    detail.replaceChildren(
      el("div", { class: "detail-head" }, v.title, v.phase, v.status, actions),
      v.progress,
      el("div", { class: "cards" },
        el("section", { class: "card wide" }, el("h3", {}, "Metrics: each interval against its tolerance"),
          el("div", { class: "legend" },
            el("span", {}, el("span", { class: "swatch tol" }), "tolerance"),
            el("span", {}, "band: interval, coloured by verdict; line: estimate"),
          ),
          v.metrics),
        card("Traffic to the candidate", el("div", { class: "legend" }, el("span", {}, el("span", { class: "swatch cand" }), "candidate weight"), v.weightsNow), v.weights),
        card("Latency distributions", v.dist),
        card("Sample ratio and endpoints", v.ratio),
        card("Input health", v.inputs),
        el("section", { class: "card wide" }, el("h3", {}, "Decisions"),
          el("div", { class: "log" }, el("table", { class: "small-table" },
            el("thead", {}, el("tr", {}, ["Time", "Decision", "Reason", "Step", "Weight"].map((h) => el("th", {}, h)))),
            v.log))),
      ),
    );
    detail.hidden = false;
    return v;
  }

  function renderDetail() {
    const d = state.detail;
    if (!state.view || state.view.name !== d.name) state.view = skeleton(d.name);
    const v = state.view;
    const detail = $("#detail");
    Object.assign(detail.dataset, {
      rollout: d.name,
      phase: d.phase,
      step: d.step,
      steps: d.steps,
      weightCandidate: d.weights.candidate,
      weightProduction: d.weights.production,
    });
    v.phase.replaceChildren(phaseBadge(d.phase));
    v.status.textContent = d.status || "";
    renderProgress(v, d);
    for (const b of v.actions.querySelectorAll("button[data-action]")) {
      const ok = ENABLED[b.dataset.action];
      b.disabled = ok ? !ok(d.phase, d) : false;
    }
    const pts = seriesOf(d.name).points;
    renderWeights(v, d, pts);
    renderMetrics(v, d, pts);
    renderDist(v);
    renderRatio(v, d);
    renderInputs(v, d);
    renderLog(v, d);
  }

  function bar(done, of) {
    const share = of > 0 ? Math.min(1, done / of) : 1;
    const inner = el("span");
    inner.style.width = `${(share * 100).toFixed(1)}%`;
    return el("span", { class: "bar", role: "progressbar", "aria-valuenow": Math.round(share * 100), "aria-valuemin": 0, "aria-valuemax": 100 }, inner);
  }

  function renderProgress(v, d) {
    const parts = [
      el("span", {}, `Step ${d.step}/${d.steps} \u00B7 `, el("strong", {}, d.step_kind === "shadow" ? "shadow" : `candidate ${sig(d.weights.candidate)}%`)),
    ];
    if (!terminal(d.phase)) {
      parts.push(el("span", { class: "num" }, "requests ", bar(d.step_samples, d.step_required), ` ${count(d.step_samples)} / ${count(d.step_required)}`));
      if (d.step_min_duration > 0) {
        parts.push(el("span", { class: "num" }, "time ", bar(d.step_elapsed, d.step_min_duration), ` ${duration(d.step_elapsed)} / ${duration(d.step_min_duration)}`));
      }
      parts.push(el("span", { class: "num muted" }, `deadline in ${duration(d.deadline_in)}`));
    }
    parts.push(el("span", { class: "num muted" }, `running ${duration(d.elapsed)}`));
    if (!d.store_ok) parts.push(el("strong", { class: "verdict-WORSE badge" }, "\u2717 state store unreachable"));
    v.progress.replaceChildren(...parts);
  }

  // -- charts ---------------------------------------------------------------------------------

  function niceStep(span, n) {
    const raw = span / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
    return 10 * mag;
  }

  function ticks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const step = niceStep(hi - lo, n);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }

  function timeTicks(lo, hi, n) {
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
    const want = (hi - lo) / Math.max(1, n);
    const step = steps.find((s) => s >= want) || 86400 * Math.ceil(want / 86400);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) out.push(t);
    return out;
  }

  // One chart frame: axes, grid and labels; returns scales for the caller to draw with.
  function frame(node, o) {
    const w = Math.max(200, node.clientWidth || node.getBoundingClientRect().width || 500);
    const h = Math.max(100, node.clientHeight || node.getBoundingClientRect().height || 160);
    const m = { l: 52, r: 12, t: 8, b: 20 };
    node.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const [x0, x1] = o.x;
    const [y0, y1] = o.y;
    const lx = o.logX ? Math.log : (x) => x;
    const X = (x) => m.l + ((lx(x) - lx(x0)) / (lx(x1) - lx(x0) || 1)) * (w - m.l - m.r);
    const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0 || 1)) * (h - m.t - m.b);
    const kids = [];
    for (const t of o.yTicks || ticks(y0, y1, Math.max(2, Math.floor(h / 40)))) {
      kids.push(svg("line", { class: "grid", x1: m.l, x2: w - m.r, y1: Y(t), y2: Y(t) }));
      kids.push(svg("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end", text: o.yFmt(t) }));
    }
    const xt = o.xTicks || timeTicks(x0, x1, Math.max(2, Math.floor(w / 110)));
    for (const t of xt) {
      kids.push(svg("line", { class: "axis", x1: X(t), x2: X(t), y1: h - m.b, y2: h - m.b + 4 }));
      // labels at the edges align inward, so none is cut off
      const x = X(t);
      const anchor = x > w - m.r - 30 ? "end" : x < m.l + 20 ? "start" : "middle";
      kids.push(svg("text", { x, y: h - 4, "text-anchor": anchor, text: o.xFmt(t) }));
    }
    kids.push(svg("line", { class: "axis", x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b }));
    node.replaceChildren(...kids);
    return { X, Y, w, h, m, add: (...e) => node.append(...e) };
  }

  function pathOf(pts) {
    return pts.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
  }

  function timeRange(pts, d) {
    const now = Date.now() / 1000;
    let lo = pts.length ? pts[0].at : now - 60;
    let hi = pts.length ? Math.max(pts[pts.length - 1].at, lo + 10) : now;
    if (hi - lo < 10) hi = lo + 10;
    return [lo, hi];
  }

  function decisionMarks(f, d, lo, hi) {
    for (const e of d.decisions || []) {
      if (e.at < lo || e.at > hi || e.action === "START") continue;
      const x = f.X(e.at);
      f.add(svg("line", { class: "mark", x1: x, x2: x, y1: f.m.t, y2: f.h - f.m.b }, svg("title", { text: `${e.action}: ${e.reason}` })));
    }
  }

  function renderWeights(v, d, pts) {
    v.weightsNow.textContent = `now ${sig(d.weights.candidate)}% candidate, ${sig(d.weights.production)}% production`;
    setAttrs(v.weights, {
      "data-chart": "weights",
      "data-points": pts.length,
      "data-weights": [...new Set(pts.map((p) => p.cand))].join(" "),
    });
    const [lo, hi] = timeRange(pts, d);
    const f = frame(v.weights, { x: [lo, hi], y: [0, 100], yTicks: [0, 25, 50, 75, 100], yFmt: (t) => `${t}%`, xFmt: (t) => clock(t) });
    const line = [];
    for (const p of pts) {
      if (p.cand === null) continue;
      if (line.length) line.push([f.X(p.at), line[line.length - 1][1]]); // a step: weights jump
      line.push([f.X(p.at), f.Y(p.cand)]);
    }
    if (line.length) {
      const area = [[line[0][0], f.Y(0)], ...line, [line[line.length - 1][0], f.Y(0)]];
      f.add(svg("path", { class: "cand-area", d: `${pathOf(area)}Z` }), svg("path", { class: "cand", d: pathOf(line) }));
    }
    decisionMarks(f, d, lo, hi);
  }

  function renderMetrics(v, d, pts) {
    const seen = new Set();
    for (const m of d.metrics || []) {
      seen.add(m.name);
      let e = v.metricEls.get(m.name);
      if (!e) {
        e = {
          root: el("article", { class: "metric" }),
          head: el("div", { class: "metric-head" }),
          nums: el("div", { class: "metric-nums num" }),
          chart: svg("svg", { class: "chart", role: "img", "aria-label": `${m.name} interval over time` }),
          explain: el("p", { class: "explain" }),
        };
        e.root.append(e.head, e.nums, e.chart, e.explain);
        v.metrics.append(e.root);
        v.metricEls.set(m.name, e);
      }
      const verdict = String(m.verdict).toUpperCase();
      setAttrs(e.root, {
        "data-metric": m.name,
        "data-verdict": verdict,
        "data-estimate": m.estimate === null ? "" : m.estimate,
        "data-lower": m.lower === null ? "" : m.lower,
        "data-upper": m.upper === null ? "" : m.upper,
        "data-tolerance": m.tolerance === null ? "" : m.tolerance,
      });
      const sc = scaleOf(m);
      const val = (x, inf) => (x === null ? inf : sc.f(x));
      e.head.replaceChildren(el("h3", {}, m.name, el("span", { class: "muted" }, ` ${m.kind}`)), verdictBadge(verdict));
      e.nums.replaceChildren(
        `${m.relative ? "change" : "difference"} `,
        el("strong", {}, signed(val(m.estimate, NaN), sc.unit)),
        ` [${signed(val(m.lower, -Infinity), sc.unit)}, ${signed(val(m.upper, Infinity), sc.unit)}]`,
        el("span", { class: "muted" }, ` \u00B7 tolerance ${signed(val(m.tolerance, NaN), sc.unit)} \u00B7 n ${count(m.n_production)} / ${count(m.n_candidate)}`),
      );
      e.explain.textContent = m.explain || "";
      metricChart(e.chart, m, sc, pts, d);
    }
    for (const [name, e] of v.metricEls) {
      if (!seen.has(name)) {
        e.root.remove();
        v.metricEls.delete(name);
      }
    }
    if (!v.metrics.childElementCount) v.metrics.replaceChildren(el("p", { class: "muted" }, "no metric results yet (the first analysis has not run)"));
    else for (const p of v.metrics.querySelectorAll(":scope > p")) p.remove();
  }

  function metricChart(node, m, sc, pts, d) {
    const rows = [];
    for (const p of pts) {
      const r = p.metrics[m.name];
      if (r) rows.push({ at: p.at, est: r.estimate, lo: r.lower, hi: r.upper, tol: r.tolerance, verdict: r.verdict });
    }
    const base = sc.f(sc.base);
    const tol = m.tolerance === null ? null : sc.f(m.tolerance);
    const reach = Math.abs((tol === null ? base + 1 : tol) - base) || 1;
    // Show the tolerance and what the intervals reach, but no more than 4x the tolerance's
    // distance: an interval still wide at the start would flatten everything else.
    let ylo = Math.min(base, tol ?? base);
    let yhi = Math.max(base, tol ?? base);
    for (const r of rows) {
      for (const x of [r.est, r.lo, r.hi]) {
        if (x === null || !isFinite(x)) continue;
        ylo = Math.min(ylo, sc.f(x));
        yhi = Math.max(yhi, sc.f(x));
      }
    }
    const floor = Math.min(base, tol ?? base) - 4 * reach;
    const ceil = Math.max(base, tol ?? base) + 4 * reach;
    ylo = Math.max(ylo, floor);
    yhi = Math.min(yhi, ceil);
    const pad = (yhi - ylo) * 0.08 || reach * 0.1;
    ylo -= pad;
    yhi += pad;
    const [t0, t1] = timeRange(pts, d);
    const f = frame(node, { x: [t0, t1], y: [ylo, yhi], yFmt: (t) => signed(t, sc.unit), xFmt: (t) => clock(t) });
    const clip = (y) => Math.min(f.h - f.m.b, Math.max(f.m.t, y));
    const yOf = (x, inf) => clip(x === null || !isFinite(x) ? f.Y(inf) : f.Y(sc.f(x)));
    // The interval as bands, one per run of the same verdict: the segment from one point to
    // the next takes the newer point's verdict (colour, and a title that says it).
    const runs = [];
    rows.forEach((r, i) => {
      const last = runs[runs.length - 1];
      if (last && last.verdict === r.verdict) last.rows.push(r);
      else runs.push({ verdict: r.verdict, rows: i ? [rows[i - 1], r] : [r] });
    });
    for (const run of runs) {
      const top = run.rows.map((r) => [f.X(r.at), yOf(r.hi, yhi + 1)]);
      const bottom = run.rows.map((r) => [f.X(r.at), yOf(r.lo, ylo - 1)]).reverse();
      if (run.rows.length === 1) {
        top.push([top[0][0] + 3, top[0][1]]);
        bottom.unshift([bottom[0][0] + 3, bottom[0][1]]);
      }
      const band = svg("path", { class: `band-${run.verdict}`, d: `${pathOf([...top, ...bottom])}Z` });
      band.append(svg("title", { text: run.verdict }));
      f.add(band);
    }
    const est = rows.filter((r) => r.est !== null).map((r) => [f.X(r.at), yOf(r.est, 0)]);
    if (est.length) f.add(svg("path", { class: "est", d: pathOf(est) }));
    f.add(svg("line", { class: "base", x1: f.m.l, x2: f.w - f.m.r, y1: clip(f.Y(base)), y2: clip(f.Y(base)) }));
    if (tol !== null) {
      const y = clip(f.Y(tol));
      f.add(
        svg("line", { class: "tol", x1: f.m.l, x2: f.w - f.m.r, y1: y, y2: y }),
        svg("text", { class: "tol-label", x: f.w - f.m.r - 4, y: y - 4, "text-anchor": "end", text: `tolerance ${signed(tol, sc.unit)}` }),
      );
    }
    decisionMarks(f, d, t0, t1);
    if (!rows.length) f.add(svg("text", { x: f.w / 2, y: f.h / 2, "text-anchor": "middle", text: "collecting\u2026" }));
  }

  function renderDist(v) {
    const dist = state.dist && state.dist.name === state.selected ? state.dist : null;
    const all = dist ? dist.signals || {} : {};
    const signals = Object.entries(all).filter(([k]) => !(k === "ttft" && echoes(all.ttft, all.latency)));
    if (!signals.length) {
      v.dist.replaceChildren(el("p", { class: "muted" }, "no latency recorded yet"));
      return;
    }
    const blocks = [];
    const charts = [];
    for (const [signal, s] of signals) {
      const chart = svg("svg", { class: "chart small", role: "img", "aria-label": `${signal} distribution per arm` });
      // One unit per table (the larger median's), so the columns stay narrow.
      const medians = Object.values(s.arms).map((a) => a.quantiles.p50 || 0);
      const [unit, k] = Math.max(...medians) >= 1 ? ["s", 1] : ["ms", 1e3];
      const num = (x) => (x === null || x === undefined ? "\u2013" : sig(x * k));
      const table = el("table", { class: "small-table num" },
        el("thead", {}, el("tr", {}, ["arm", "n", "mean", "p50", "p90", "p95", "p99"].map((h, i) => el("th", {}, i > 1 ? `${h} (${unit})` : h)))),
        el("tbody", {}, Object.entries(s.arms).map(([arm, a]) => el("tr", { "data-dist-arm": arm, "data-signal": signal },
          el("td", {}, el("span", { class: `swatch ${arm === "candidate" ? "cand" : "prod"}` }), arm),
          el("td", {}, count(a.n)), el("td", {}, num(a.mean)),
          ["p50", "p90", "p95", "p99"].map((q) => el("td", {}, num(a.quantiles[q]))),
        ))),
      );
      blocks.push(el("h3", {}, signal === "ttft" ? "ttft (time to first token or byte)" : signal), chart, table);
      charts.push([chart, s]);
    }
    v.dist.replaceChildren(...blocks); // in the document first: a chart needs its width
    for (const [chart, s] of charts) distChart(chart, s);
  }

  // ttft of responses that are not streamed only repeats latency (the first byte comes with
  // the last): not worth a second chart.
  function echoes(ttft, latency) {
    if (!latency) return false;
    return Object.entries(ttft.arms).every(([arm, a]) => {
      const l = latency.arms[arm];
      return l && a.quantiles.p50 !== null && l.quantiles.p50 !== null && a.quantiles.p50 >= 0.95 * l.quantiles.p50;
    });
  }

  function distChart(node, s) {
    const edges = s.edges;
    const lo = edges[0];
    const hi = edges[edges.length - 1];
    let top = 0;
    const shares = {};
    for (const [arm, a] of Object.entries(s.arms)) {
      const total = a.counts.reduce((x, y) => x + y, 0) || 1;
      shares[arm] = a.counts.map((c) => (100 * c) / total);
      top = Math.max(top, ...shares[arm]);
    }
    const xt = [];
    for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
      for (const m of [1, 2, 5]) {
        const t = m * Math.pow(10, k);
        if (t >= lo && t <= hi) xt.push(t);
      }
    }
    if (xt.length < 2) xt.splice(0, xt.length, lo, Math.sqrt(lo * hi), hi);
    const f = frame(node, { x: [lo, hi], y: [0, top * 1.1 || 1], logX: true, xTicks: xt, xFmt: seconds, yFmt: (t) => `${sig(t, 2)}%` });
    for (const [arm, sh] of Object.entries(shares)) {
      const line = [];
      sh.forEach((y, i) => {
        line.push([f.X(edges[i]), f.Y(y)], [f.X(edges[i + 1]), f.Y(y)]);
      });
      f.add(svg("path", { class: arm === "candidate" ? "cand" : "prod", d: pathOf(line) }, svg("title", { text: arm })));
      const p95 = s.arms[arm].quantiles.p95;
      if (p95) {
        const x = f.X(Math.min(hi, Math.max(lo, p95)));
        f.add(svg("line", { class: arm === "candidate" ? "cand" : "prod", x1: x, x2: x, y1: f.m.t, y2: f.m.t + 10 }, svg("title", { text: `${arm} p95 ${seconds(p95)}` })));
      }
    }
  }

  function renderRatio(v, d) {
    const srm = (d.guards || []).find((g) => g.kind === "srm");
    const total = d.samples.production + d.samples.candidate;
    const share = total ? (100 * d.samples.candidate) / total : null;
    const items = [
      ["samples", `${count(d.samples.production)} production / ${count(d.samples.candidate)} candidate`],
      ["candidate share", share === null ? "\u2013" : `${sig(share)}% of requests (weight now ${sig(d.weights.candidate)}%)`],
      ["sample ratio check", srm ? verdictBadge(srm.verdict) : el("span", { class: "muted" }, "after the first analysis")],
    ];
    if (srm) items.push(["", el("span", { class: "explain" }, srm.explain)]);
    const healthy = d.healthy_endpoints || {};
    for (const arm of ["production", "candidate"]) {
      const eps = (d.endpoints && d.endpoints[arm]) || [];
      items.push([`${arm} endpoints`, `${count(healthy[arm] ?? eps.length)} of ${eps.length} healthy`]);
    }
    if (d.net_value) items.push(["net value", el("span", {}, verdictBadge(d.net_value.verdict), " ", d.net_value.explain)]);
    v.ratio.replaceChildren(el("dl", { class: "kv" }, items.map(([k, val]) => [el("dt", {}, k), el("dd", {}, val)])));
    setAttrs(v.ratio, { "data-srm": srm ? String(srm.verdict).toUpperCase() : "" });
  }

  function renderInputs(v, d) {
    const h = d.inputs;
    if (!h) {
      v.inputs.replaceChildren(el("p", { class: "muted" }, "not watched (no inputs: in this rollout's file)"));
      return;
    }
    const drifted = h.drifted || [];
    const req = Object.entries(h.requests || {}).map(([k, n]) => `${k} ${count(n)}`).join(", ");
    const base = h.baseline || {};
    const head = el("dl", { class: "kv" },
      el("dt", {}, "state"), el("dd", {}, h.state === "learning" ? `learning the baseline (${count(base.requests)} / ${count(base.target)})` : `monitoring (${base.source} baseline)`),
      el("dt", {}, "drift"), el("dd", {}, drifted.length ? verdictBadge("WORSE") : verdictBadge(h.state === "learning" ? "UNKNOWN" : "OK"), " ", drifted.length ? `on ${drifted.join(", ")} (on_drift: ${h.on_drift})` : "none shown"),
      el("dt", {}, "requests"), el("dd", {}, req),
    );
    const rows = (h.fields || []).map((f) => {
      const cur = f.current || {};
      const b = f.baseline || {};
      const flagged = (f.checks || []).filter((c) => c.drifted).map((c) => c.explain).join("; ");
      return el("tr", { "data-field": f.field, "data-drifted": f.drifted ? "true" : "false" },
        el("td", {}, f.field),
        el("td", {}, f.drifted ? "\u2717 drifted" : "\u2713"),
        el("td", {}, `${sig(b.mean)} \u2192 ${sig(cur.mean)}`),
        el("td", {}, `${sig(100 * (b.null_rate ?? NaN), 2)}% \u2192 ${sig(100 * (cur.null_rate ?? NaN), 2)}%`),
        el("td", { class: "explain" }, flagged),
      );
    });
    v.inputs.replaceChildren(head, el("table", { class: "small-table num" },
      el("thead", {}, el("tr", {}, ["field", "", "mean", "null rate", "flagged"].map((x) => el("th", {}, x)))),
      el("tbody", {}, rows)));
  }

  function renderLog(v, d) {
    const rows = [...(d.decisions || [])].reverse().map((e) =>
      el("tr", { "data-decision": e.action },
        el("td", { class: "num" }, clock(e.at, true)),
        el("td", {}, e.action, e.manual ? el("span", { class: "muted" }, " (operator)") : null),
        el("td", {}, e.reason),
        el("td", { class: "num" }, e.step ? `${e.step}/${e.steps}` : ""),
        el("td", { class: "num" }, e.weights ? `${sig(e.weights.candidate)}%` : ""),
      ));
    v.log.replaceChildren(...rows);
  }

  // -- operator commands ----------------------------------------------------------------------

  async function act(action) {
    const name = state.selected;
    if (name === null) return;
    const ask = CONFIRM[action];
    if (ask && !window.confirm(ask(name))) return;
    const v = state.view;
    const reason = $("#reason").value.trim();
    const headers = { "Content-Type": "application/json" };
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    v.notice.textContent = `${action}\u2026`;
    try {
      const answer = await api(`${API}/${encodeURIComponent(name)}/${action}`, {
        method: "POST",
        headers,
        body: JSON.stringify(reason ? { reason } : {}),
      });
      v.notice.textContent = `${action}: done${answer && answer.phase ? `, now ${answer.phase.replace("_", " ")}` : ""}`;
      $("#reason").value = "";
      clearErrors();
    } catch (e) {
      v.notice.textContent = "";
      const hint = e.status === 401
        ? (t ? " (the admin token given is wrong: enter it again at the top)" : " (enter the admin token at the top)")
        : "";
      report(`${action} ${name}: ${e.message}${hint}`);
    }
    tick();
  }

  // -- start ----------------------------------------------------------------------------------

  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setToken($("#token").value.trim());
  });
  $("#token-forget").addEventListener("click", () => setToken(""));
  window.addEventListener("hashchange", () => {
    state.selected = decodeURIComponent(location.hash.slice(1)) || null;
    tick();
  });
  $("#rollouts tbody").addEventListener("click", (e) => {
    const row = e.target.closest("tr[data-rollout-row]");
    if (row && !e.target.closest("a")) location.hash = encodeURIComponent(row.dataset.rolloutRow);
  });
  let resized = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resized);
    resized = setTimeout(() => state.detail && renderDetail(), 150);
  });
  showTokenState();
  tick();
})();
