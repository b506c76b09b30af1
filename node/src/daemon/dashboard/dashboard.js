// The node's dashboard: reads the node's own JSON API every few seconds and draws it.
// Plain DOM, no dependencies; text from the API only ever goes in as text.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "slmesh-token";
const pageErrors = [];

function showPageError(text) {
  pageErrors.push(text);
  const list = document.getElementById("error-list");
  list.appendChild(el("li", {}, text));
  document.getElementById("page-errors").hidden = false;
  document.body.dataset.pageErrors = String(pageErrors.length);
}
window.addEventListener("error", (e) => showPageError(String(e.message)));
window.addEventListener("unhandledrejection", (e) => showPageError(String(e.reason)));

// A node's token arrives once in the address's fragment (#token=..., never sent to the
// server), or from the form; it is kept for this tab only.
function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

class Unauthorized extends Error {}

async function api(path) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) throw new Unauthorized("the node wants its bearer token");
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return e;
}

function table(heads, rows, empty) {
  if (!rows.length) return el("p", { class: "empty" }, empty);
  const head = el("tr", {}, heads.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)));
  const body = rows.map((cells) =>
    el("tr", {}, cells.map((c, i) => el("td", { class: heads[i].num ? "num" : null }, c))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

const num = (label) => ({ label, num: true });
const dash = "–";
const fmtMs = (s) => (s === null || s === undefined ? dash : (s * 1000).toFixed(1) + " ms");
const fmtPct = (r) => (r === null || r === undefined ? dash : (r * 100).toFixed(1) + "%");
const fmtNum = (v, d = 1) => (v === null || v === undefined ? dash : Number(v).toFixed(d));
const fmtRatio = (v) => (v === null || v === undefined ? dash : v.toFixed(2) + "×");
const short = (id) => (id || "").slice(0, 12);

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? n + " B" : v.toFixed(1) + " " + units[u];
}

function fmtSecs(s) {
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmtTime(unix) {
  return new Date(unix * 1000).toLocaleString();
}

function replace(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat());
}

function drawNode(s) {
  const fact = (k, v) => el("div", {}, el("dt", {}, k), el("dd", {}, v));
  const tags = Object.entries(s.tags || {}).map(([k, v]) => k + "=" + v).join(" ") || dash;
  replace("node",
    fact("node", short(s.node_id)),
    fact("fleet", s.fleet || dash),
    fact("tags", tags),
    fact("serving", s.serving || "nothing yet"),
    fact("peers", String(s.peers.length)),
    fact("uploaded", fmtBytes(s.uploaded_bytes)),
    fact("downloaded", fmtBytes(s.downloaded_bytes)));
  document.title = "slmesh " + short(s.node_id) + (s.serving ? " · " + s.serving : "");
}

function drawFleet(versions) {
  const heads = ["version", num("active nodes"), num("reporting"), num("≈ fleet"), num("requests"),
    num("error rate"), num("p50 latency"), num("p95 latency"), num("p95 TTFT"), num("p50 tokens/s"),
    num("suite passed"), num("agreement")];
  const rows = versions.map((v) => [
    el("b", {}, v.model + "@" + v.version), v.nodes_active, v.nodes_reporting, v.nodes_estimated, v.requests,
    fmtPct(v.error_rate), fmtMs(v.p50_latency_secs), fmtMs(v.p95_latency_secs), fmtMs(v.p95_ttft_secs),
    fmtNum(v.p50_tokens_per_sec),
    v.nodes_evaluated ? fmtPct(v.median_eval_pass_rate) + " (" + v.nodes_evaluated + " nodes)" : dash,
    v.nodes_compared ? v.median_agreement.toFixed(2) + " (" + v.nodes_compared + " nodes)" : dash]);
  replace("fleet", table(heads, rows, "No version reported yet."));
}

function verdictBadge(r) {
  if (r.halted) return el("span", { class: "badge halted" }, "halted");
  if (r.waves_open >= r.waves) return el("span", { class: "badge pass", title: "every wave is open" }, "complete");
  const v = r.verdict.verdict;
  return el("span", { class: "badge " + v, title: r.verdict.reason || "" }, "gates " + v);
}

function drawWaves(r) {
  const waves = r.plan_waves.length ? r.plan_waves : Array.from({ length: r.waves }, () => null);
  return el("div", { class: "waves" }, waves.map((w, i) => {
    const open = i < r.waves_open;
    const mine = r.my_wave === i + 1;
    const cls = "wave" + (open ? " open" : "") + (mine ? " mine" : "");
    const known = r.known_per_wave[i];
    const progress = (r.per_wave || [])[i];
    return el("div", { class: cls, "data-wave": i + 1 },
      el("b", {}, "wave " + (i + 1) + (open ? " · open" : " · waiting")),
      w ? (w.fraction * 100).toFixed(0) + "% of the fleet, soak " + fmtSecs(w.soak_secs) : null,
      el("br"),
      known !== undefined ? known + " node(s) known" : null,
      progress ? el("br") : null,
      progress ? el("span", { class: "progress", title: "estimated from the metrics panels" },
        progress.staged + " staged · " + progress.serving + " serving") : null,
      open && r.opened_at[i] ? el("br") : null,
      open && r.opened_at[i] ? "opened " + fmtTime(r.opened_at[i]) : null,
      mine ? el("br") : null,
      mine ? "this node" : null);
  }));
}

// One row per gate: what it reads, the measured value, the limit, and whether it holds.
function drawGates(r) {
  const f = r.figures, g = r.gates, b = r.baseline;
  const check = (ok) => (ok === null ? el("span", { class: "unknown" }, "no data")
    : ok ? el("span", { class: "ok" }, "within") : el("span", { class: "bad" }, "beyond"));
  const has = (v) => v !== null && v !== undefined;
  // Too few figures is not a failure: the gates wait for more.
  const enough = (ok) => (ok ? el("span", { class: "ok" }, "enough") : el("span", { class: "unknown" }, "not yet"));
  const rows = [
    ["nodes measured", f.nodes_measured, "≥ " + g.min_reporting_nodes, enough(f.nodes_measured >= g.min_reporting_nodes)],
    ["requests", f.requests, "≥ " + g.min_samples, enough(f.requests >= g.min_samples)],
    ["error rate (median node)", fmtPct(f.median_error_rate), "≤ " + fmtPct(g.max_error_rate),
      check(has(f.median_error_rate) ? f.median_error_rate <= g.max_error_rate : null)],
  ];
  const ratio = (label, value, baseValue, fmt, r, limit, atMost) => [
    label, fmt(value) + (b ? " (v" + b.version + ": " + fmt(baseValue) + ", " + fmtRatio(r) + ")" : ""),
    (atMost ? "≤ " : "≥ ") + fmtRatio(limit) + " the baseline",
    check(!b || !has(r) ? null : atMost ? r <= limit : r >= limit)];
  if (g.min_eval_pass_rate !== null && g.min_eval_pass_rate !== undefined) {
    const rate = f.median_eval_pass_rate;
    rows.push(["evaluation suite passed (median node)",
      has(rate) ? fmtPct(rate) + " on " + f.nodes_evaluated + " node(s)" : dash,
      "≥ " + fmtPct(g.min_eval_pass_rate), check(has(rate) ? rate >= g.min_eval_pass_rate : null)]);
  }
  if (g.agreement) {
    const a = f.median_agreement;
    rows.push(["agreement with the previous version (median node, " + fmtPct(g.agreement.sample) + " compared)",
      has(a) ? a.toFixed(2) + " on " + f.nodes_compared + " node(s)" : dash,
      "≥ " + g.agreement.min.toFixed(2), check(has(a) ? a >= g.agreement.min : null)]);
  }
  const bf = b ? b.figures : {}, br = b ? b.ratios : {};
  rows.push(ratio("p95 latency (median node)", f.median_p95_latency_secs, bf.median_p95_latency_secs, fmtMs,
    br.p95_latency, g.max_p95_latency_ratio, true));
  rows.push(ratio("p95 TTFT (median node)", f.median_p95_ttft_secs, bf.median_p95_ttft_secs, fmtMs,
    br.p95_ttft, g.max_p95_ttft_ratio, true));
  rows.push(ratio("tokens/s (median node)", f.median_tokens_per_sec, bf.median_tokens_per_sec, fmtNum,
    br.tokens_per_sec, g.min_tokens_per_sec_ratio, false));
  return table(["gate", "measured", "limit", ""], rows, "");
}

function kindOf(e) {
  return typeof e.kind === "string" ? e.kind : Object.keys(e.kind)[0];
}

function drawRollouts(rollouts, events) {
  if (!rollouts.length) {
    replace("rollouts", el("p", { class: "empty" }, "No rollout in progress on this node."));
    return;
  }
  replace("rollouts", rollouts.map((r) => {
    const verdicts = events.filter((e) => e.model === r.model && e.version === r.version && kindOf(e) === "verdict");
    return el("div", { class: "rollout", "data-rollout": r.model + "@" + r.version },
      el("div", { class: "rollout-head" },
        el("h3", {}, r.model + "@" + r.version),
        verdictBadge(r),
        r.paused ? el("span", { class: "badge paused" }, "paused") : null,
        el("span", {}, r.waves_open + " of " + r.waves + " wave(s) open"),
        el("span", { class: "hint" }, "this node: " + r.decision)),
      r.halted ? el("p", { class: "bad" }, "Halted: " + r.halted) : null,
      r.verdict.reason ? el("p", { class: "hint" }, "Gates: " + r.verdict.reason) : null,
      r.activation_failures ? el("p", { class: "bad" },
        "Failed to load here " + r.activation_failures + " time(s): " + (r.activation_error || "")) : null,
      drawWaves(r),
      drawGates(r),
      el("h3", {}, "Verdict history"),
      verdicts.length
        ? el("ol", { class: "verdicts" }, verdicts.map((e) => el("li", {}, fmtTime(e.at) + " · " + e.text)))
        : el("p", { class: "empty" }, "No verdict yet."));
  }));
}

function drawModels(models) {
  const heads = ["model", num("active"), num("previous"), num("latest known"), "staged", "note"];
  const rows = models.map((m) => [m.name, m.active ?? dash, m.previous ?? dash, m.latest_known,
    m.staged.join(", ") || dash, m.note || (m.pinned ? "pinned to " + m.pinned : "")]);
  replace("models", table(heads, rows, "No model on this node yet."));
}

function drawFetches(fetches) {
  const heads = ["version", "file", "progress", num("rate"), "from"];
  const rows = fetches.map((f) => {
    const done = f.had + f.received;
    const pct = f.size ? (100 * done) / f.size : 100;
    const bar = el("span", { class: "bar" }, el("span", { style: "width:" + pct.toFixed(1) + "%" }));
    return [f.model + "@" + f.version, f.file,
      el("span", {}, bar, " " + fmtBytes(done) + " / " + fmtBytes(f.size) + " (" + pct.toFixed(0) + "%)"),
      f.secs > 0 ? fmtBytes(Math.round(f.received / f.secs)) + "/s" : dash, short(f.provider)];
  });
  replace("fetches", table(heads, rows, "Nothing being fetched."));
}

function drawPeers(peers) {
  const heads = ["node", "site", num("RTT"), "address"];
  const rows = peers.map((p) => [el("span", { class: "mono" }, short(p.node_id)), p.site || dash,
    p.rtt_ms === null || p.rtt_ms === undefined ? dash : p.rtt_ms.toFixed(2) + " ms", el("span", { class: "mono" }, p.addr)]);
  replace("peers", table(heads, rows, "No peer connected."));
}

function drawEvents(events) {
  const heads = ["time", "version", "event", "what happened"];
  const warn = new Set(["halted", "activation_failed", "rolled_back"]);
  const rows = events.slice().reverse().slice(0, 50).map((e) => {
    const k = kindOf(e);
    const failed = k === "verdict" && e.kind.verdict.outcome === "fail";
    return [fmtTime(e.at), e.model + "@" + e.version, k.replace(/_/g, " "),
      el("span", { class: warn.has(k) || failed ? "ev-warn" : null }, e.text)];
  });
  replace("events", table(heads, rows, "No rollout event on this node yet."));
}

async function refresh() {
  const state = document.getElementById("state");
  try {
    const [status, fleet, rollouts, events] = await Promise.all([
      api("/v1/status"), api("/v1/fleet"), api("/v1/rollouts"), api("/v1/events?limit=200")]);
    document.getElementById("token-form").hidden = true;
    drawNode(status);
    drawFleet(fleet.versions);
    drawRollouts(rollouts.rollouts, events.events);
    drawModels(status.models);
    drawFetches(status.fetches);
    drawPeers(status.peers);
    drawEvents(events.events);
    state.className = "state";
    state.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "1";
  } catch (e) {
    state.className = "state error";
    if (e instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      document.getElementById("token-form").hidden = false;
      state.textContent = "bearer token needed";
    } else {
      state.textContent = "cannot reach the node: " + e.message;
    }
  }
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
