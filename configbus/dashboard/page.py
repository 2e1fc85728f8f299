"""The dashboard's page: one self-contained HTML document, its CSS and JavaScript
inline, nothing loaded from anywhere else.

The document holds no data: its script opens ``/events`` (server-sent events), takes
the snapshot and the deltas, and builds the table and the latency chart with DOM
calls. Every value from Kafka reaches the page as a JSON string and is put in with
``textContent`` (or as an SVG attribute holding a number), never parsed as HTML, so a
``<script>`` in an actor's name shows as text. On top of that, `PAGE_CSP` (sent with
the page) lets only this inline script and style run, and connections go only back
to the dashboard itself.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

__all__ = ["PAGE", "PAGE_CSP", "SCRIPT", "STYLE"]

STYLE: Final = """
:root { --bg: #f6f7f9; --panel: #fff; --ink: #1d2430; --muted: #667085; --line: #e3e6eb;
  --ok: #17803d; --okbg: #e7f6ec; --warn: #a15c00; --warnbg: #fff4e0; --bad: #b42318;
  --badbg: #fdecea; --accent: #2f5bd3; --p95: #d9822b; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  background: var(--bg); color: var(--ink); }
header { display: flex; align-items: baseline; gap: 16px; padding: 14px 20px;
  background: #1d2430; color: #fff; }
header h1 { margin: 0; font-size: 16px; font-weight: 600; }
header .meta { color: #c9d1e0; font-size: 12px; }
#live { margin-left: auto; font-size: 12px; padding: 2px 8px; border-radius: 10px;
  background: #475467; }
#live.on { background: var(--ok); }
#live.off { background: var(--bad); }
#errors { margin: 10px 20px 0; color: var(--bad); }
main { padding: 12px 20px 20px; }
table { width: 100%; border-collapse: collapse; background: var(--panel);
  border: 1px solid var(--line); border-radius: 6px; }
th, td { text-align: left; vertical-align: top; padding: 7px 9px;
  border-bottom: 1px solid var(--line); }
th { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
  font-weight: 600; background: #fafbfc; }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #f3f6fd; }
tbody tr.selected { background: #eaf0fd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.c-stream { white-space: nowrap; }
.c-stream b { font-weight: 600; }
.c-version { font-weight: 600; white-space: nowrap; }
.small { display: block; color: var(--muted); font-size: 11px; font-weight: 400;
  overflow-wrap: anywhere; }
.pill { display: inline-block; padding: 1px 7px; border-radius: 9px; font-weight: 600;
  white-space: nowrap; }
.pill.ok { background: var(--okbg); color: var(--ok); }
.pill.warn { background: var(--warnbg); color: var(--warn); }
.pill.bad { background: var(--badbg); color: var(--bad); }
.pill.none { background: #eef0f3; color: var(--muted); }
ul { margin: 0; padding: 0; list-style: none; }
li { margin: 0 0 3px; }
.bad { color: var(--bad); }
.warn { color: var(--warn); }
.muted { color: var(--muted); }
section { margin-top: 16px; background: var(--panel); border: 1px solid var(--line);
  border-radius: 6px; padding: 12px 14px; }
section h2 { margin: 0 0 6px; font-size: 13px; font-weight: 600; }
.legend span { margin-right: 14px; font-size: 12px; }
.legend .p50 { color: var(--accent); }
.legend .p95 { color: var(--p95); }
#chart { display: block; width: 100%; max-width: 820px; height: 200px; }
#chart .axis { stroke: #c5cad3; stroke-width: 1; }
#chart text { font-size: 10px; fill: var(--muted); }
#chart .p50 { stroke: var(--accent); fill: none; stroke-width: 2; }
#chart .p95 { stroke: var(--p95); fill: none; stroke-width: 2; stroke-dasharray: 4 3; }
#chart circle.p50 { fill: var(--accent); stroke: none; }
#chart circle.p95 { fill: var(--p95); stroke: none; }
footer { padding: 0 20px 16px; color: var(--muted); font-size: 11px; }
"""

SCRIPT: Final = r"""
"use strict";
(() => {
  const COLUMNS = ["stream", "version", "changed", "actor", "reason", "instances",
    "p50", "p95", "p99", "refusals", "overrides", "rollout"];
  const NUMERIC = new Set(["p50", "p95", "p99"]);
  const SHOWN_PATHS = 3;  // changed paths shown in a row; the rest in its tooltip
  const SVG = "http://www.w3.org/2000/svg";
  const rows = new Map();   // key "tenant/env" -> the row's data
  const trs = new Map();    // key -> its <tr>
  let selected = null;
  let skew = 0;             // the server's clock minus ours (ms)
  const body = document.getElementById("streams");
  const live = document.getElementById("live");
  const meta = document.getElementById("meta");
  const errors = document.getElementById("errors");
  const status = { updates: 0, state: "connecting" };
  window.__dashboard = status;  // for tests and curious operators: read-only counters

  function node(tag, cls, value) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (value !== undefined && value !== null) e.textContent = String(value);
    return e;
  }
  function now() { return Date.now() + skew; }
  function ms(v) {
    if (v === null || v === undefined) return "\u2013";
    return (v < 10 ? v.toFixed(1) : String(Math.round(v))) + " ms";
  }
  function span(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60 ? (s % 60) + "s" : "");
    if (s < 86400) {
      return Math.floor(s / 3600) + "h" + (s % 3600 >= 60 ? Math.floor((s % 3600) / 60) + "m" : "");
    }
    const hours = Math.floor((s % 86400) / 3600);
    return Math.floor(s / 86400) + "d" + (hours ? hours + "h" : "");
  }
  function iso(t) { return new Date(t).toISOString().replace(/\.\d+Z$/, "Z"); }
  function clock(t) { return iso(t).slice(11, 19) + "Z"; }

  function cell(tr, name) { return tr.querySelector(".c-" + name); }

  function list(items) {
    const ul = node("ul");
    for (const item of items) {
      const li = node("li", item.cls || "");
      li.append(...item.parts.map((p) => typeof p === "string" ? document.createTextNode(p) : p));
      ul.append(li);
    }
    return ul;
  }

  function rowFor(key) {
    let tr = trs.get(key);
    if (tr) return tr;
    tr = node("tr");
    tr.dataset.stream = key;
    for (const c of COLUMNS) tr.append(node("td", "c-" + c + (NUMERIC.has(c) ? " num" : "")));
    tr.addEventListener("click", () => select(key));
    let before = null;
    for (const [other, otherTr] of trs) {
      if (other > key && (before === null || other < before.dataset.stream)) before = otherTr;
    }
    body.insertBefore(tr, before);
    trs.set(key, tr);
    return tr;
  }

  function render(key) {
    const r = rows.get(key);
    const tr = rowFor(key);
    const change = r.change || {};
    const fill = (name, ...children) => cell(tr, name).replaceChildren(...children);

    const stream = node("span");
    stream.append(node("b", "", r.tenant), document.createTextNode(" / " + r.env));
    fill("stream", stream);

    const version = node("span", "", "v" + r.version);
    const kind = change.kind && change.kind !== "snapshot" ? change.kind + " " : "";
    fill("version", version, node("span", "small", kind + (change.config_hash || "")));

    const changed = node("span", "ago", "\u2013");
    changed.dataset.at = change.issued_at || "";
    if (change.issued_at) changed.title = iso(change.issued_at);
    const when = change.issued_at ? iso(change.issued_at).slice(5).replace("T", " ") : "";
    fill("changed", changed, node("span", "small", when));

    fill("actor", node("span", "", change.actor || "\u2013"));
    const all = change.changed_paths || [];
    const hidden = all.length - SHOWN_PATHS + (change.more_paths || 0);
    const paths = node("span", "small", all.slice(0, SHOWN_PATHS).join(", ")
      + (hidden > 0 ? " (+" + hidden + " more)" : ""));
    paths.title = all.join("\n");
    fill("reason", node("span", "", change.reason || "\u2013"), paths);

    const inst = r.instances;
    const cls = inst.live === 0 ? "none" : (inst.at_target === inst.live ? "ok" : "warn");
    const behindMore = inst.behind_more ? " (+" + inst.behind_more + ")" : "";
    const behind = inst.behind.length ? "behind: " + inst.behind.join(", ") + behindMore : "";
    const unhealthy = inst.unhealthy.length ? "unhealthy: " + inst.unhealthy.join("; ") : "";
    fill("instances", node("span", "pill " + cls, inst.at_target + "/" + inst.live),
      node("span", "small", [behind, unhealthy].filter(Boolean).join(" \u00b7 ")));

    const acks = r.latency.samples ? r.latency.samples + " acks" : "";
    fill("p50", node("span", "", ms(r.latency.p50_ms)), node("span", "small", acks));
    fill("p95", node("span", "", ms(r.latency.p95_ms)));
    fill("p99", node("span", "", ms(r.latency.p99_ms)));

    const refused = r.refusals.instances.map((f) => ({ cls: "bad", parts: [
      f.instance + ": " + (f.channel === "override" ? "override " : "") + "v" + f.version,
      node("span", "small", f.reason)] }));
    if (r.refusals.more) refused.push({ cls: "bad", parts: ["+" + r.refusals.more + " more"] });
    if (r.refusals.unverified) {
      refused.push({ cls: "warn", parts: [r.refusals.unverified + " record(s) did not verify",
        node("span", "small", r.refusals.unverified_reason)] });
    }
    fill("refusals", refused.length ? list(refused) : node("span", "muted", "none"));

    const overrides = r.overrides.entries.map((o) => {
      const until = node("span", "until", "");
      until.dataset.until = o.expires_at;
      const who = "until " + clock(o.expires_at) + " by " + (o.actor || "?") + ": ";
      return { cls: "override", parts: [node("b", "", o.path), " ", until,
        node("span", "small", who + (o.reason || "\u2013"))] };
    });
    if (r.overrides.more) overrides.push({ parts: ["+" + r.overrides.more + " more"] });
    fill("overrides", overrides.length ? list(overrides) : node("span", "muted", "none"));

    const ro = r.rollout;
    if (ro) {
      const state = ro.state === "running" ? "warn" : (ro.state === "aborted" ? "bad" : "ok");
      const head = ro.state === "running"
        ? "step " + ro.step + "/" + ro.steps.length + " (" + ro.step_spec + ")"
        : ro.state;
      const bake = ro.bake_left_s !== null ? " \u00b7 bake " + span(ro.bake_left_s) + " left" : "";
      const plan = ro.strategy + " " + ro.steps.join(",") + " \u00b7 candidate v";
      fill("rollout", node("span", "pill " + state, head),
        node("span", "small", plan + ro.candidate_version + bake),
        node("span", "small", ro.note),
        ...ro.breaches.map((b) => node("span", "small bad", b)));
    } else {
      fill("rollout", node("span", "muted", "none"));
    }
    tick(tr);
    tr.classList.toggle("selected", key === selected);
  }

  function tick(scope) {
    for (const e of scope.querySelectorAll(".ago")) {
      if (e.dataset.at) e.textContent = span((now() - Number(e.dataset.at)) / 1000) + " ago";
    }
    for (const e of scope.querySelectorAll(".until")) {
      const left = (Number(e.dataset.until) - now()) / 1000;
      e.textContent = left > 0 ? "(" + span(left) + " left)" : "(expired)";
      e.classList.toggle("bad", left <= 0);
    }
  }

  function select(key) {
    selected = key;
    for (const [k, tr] of trs) tr.classList.toggle("selected", k === key);
    chart();
  }

  function svg(tag, attrs, parent) {
    const e = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) e.setAttribute(name, String(value));
    parent.append(e);
    return e;
  }

  function chart() {
    const box = document.getElementById("chart");
    const title = document.getElementById("chart-title");
    const note = document.getElementById("chart-note");
    box.replaceChildren();
    const r = selected !== null ? rows.get(selected) : undefined;
    if (!r) {
      title.textContent = "Propagation latency";
      note.textContent = "no stream yet";
      return;
    }
    title.textContent = "Propagation latency of " + r.key
      + ", recent versions (detected \u2192 applied)";
    const points = r.history.filter((h) => h.p50_ms !== null);
    note.textContent = points.length ? ""
      : "no samples yet: instances that got a version at start-up do not count";
    const W = 820, H = 200, L = 52, R = 12, T = 10, B = 28;
    const top = Math.max(1, ...points.map((h) => h.p95_ms));
    svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, box);
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, box);
    svg("text", { x: L - 6, y: T + 8, "text-anchor": "end" }, box).textContent = ms(top);
    svg("text", { x: L - 6, y: H - B, "text-anchor": "end" }, box).textContent = "0";
    const n = r.history.length;
    const x = (i) => L + (n <= 1 ? (W - L - R) / 2 : i * (W - L - R) / (n - 1));
    const y = (v) => H - B - (v / top) * (H - B - T);
    r.history.forEach((h, i) => {
      const label = svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle" }, box);
      label.textContent = "v" + h.version;
    });
    for (const q of ["p95", "p50"]) {
      const pts = r.history.map((h, i) => [i, h[q + "_ms"]]).filter(([, v]) => v !== null);
      if (pts.length > 1) {
        const line = pts.map(([i, v]) => x(i) + "," + y(v)).join(" ");
        svg("polyline", { points: line, class: q }, box);
      }
      for (const [i, v] of pts) {
        const h = r.history[i];
        const dot = svg("circle", { cx: x(i), cy: y(v), r: 3.5, class: q }, box);
        svg("title", {}, dot).textContent =
          "v" + h.version + " " + q + ": " + ms(v) + " (" + h.samples + " acks)";
      }
    }
  }

  function header(message) {
    const t = message.totals || {};
    const f = message.feed || {};
    const parts = [t.streams + " stream(s)", (f.records || 0) + " records read"];
    if (t.unverified) {
      parts.push(t.unverified + " did not verify (last: " + t.unverified_reason + ")");
    }
    if (t.dropped_streams || t.dropped_instances || t.dropped_acks) {
      parts.push("not shown: " + t.dropped_streams + " streams, " + t.dropped_instances
        + " instances, " + t.dropped_acks + " acks");
    }
    parts.push("updated " + clock(message.generated_at));
    meta.textContent = parts.join(" \u00b7 ");
    const errs = Object.entries(f.errors || {}).map(([k, v]) => k + ": " + v);
    errors.textContent = errs.join(" \u00b7 ");
  }

  function take(message, whole) {
    skew = message.generated_at - Date.now();
    if (whole) {
      rows.clear();
      trs.clear();
      body.replaceChildren();
    }
    for (const r of message.streams) { rows.set(r.key, r); render(r.key); }
    if (selected === null || !rows.has(selected)) {
      selected = rows.size ? rows.keys().next().value : null;
    }
    if (selected !== null) select(selected); else chart();
    header(message);
    status.updates += 1;
  }

  function connect() {
    const events = new EventSource("events");
    events.addEventListener("snapshot", (e) => take(JSON.parse(e.data), true));
    events.addEventListener("delta", (e) => take(JSON.parse(e.data), false));
    const show = (state, text, cls) => {
      status.state = state;
      live.textContent = text;
      live.className = cls;
    };
    events.onopen = () => show("live", "live", "on");
    events.onerror = () => show("reconnecting", "reconnecting\u2026", "off");
  }
  setInterval(() => tick(body), 1000);
  connect();
})();
"""


def _hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# Only the inline script and style above; the live stream and the state from here.
PAGE_CSP: Final = (
    "default-src 'none'; "
    f"script-src '{_hash(SCRIPT)}'; "
    f"style-src '{_hash(STYLE)}'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_COLUMNS: Final = (
    ("Stream", ""),
    ("Version", ""),
    ("Last change", ""),
    ("Actor", ""),
    ("Reason / changed", ""),
    ("At target / live", ""),
    ("p50", "num"),
    ("p95", "num"),
    ("p99", "num"),
    ("Refusals", ""),
    ("Overrides in effect", ""),
    ("Rollout", ""),
)

PAGE: Final = (
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>configbus dashboard</title>
<style>"""
    + STYLE
    + """</style>
</head>
<body>
<header><h1>configbus</h1><span class="meta" id="meta">connecting&hellip;</span>
<span id="live">connecting</span></header>
<div id="errors"></div>
<main>
<table>
<thead><tr>"""
    + "".join(
        f'<th class="{cls}">{name}</th>' if cls else f"<th>{name}</th>" for name, cls in _COLUMNS
    )
    + """</tr></thead>
<tbody id="streams"></tbody>
</table>
<section>
<h2 id="chart-title">Propagation latency</h2>
<div class="legend"><span class="p50">&#9632; p50</span><span class="p95">&#9632; p95</span>
<span class="muted" id="chart-note"></span></div>
<svg id="chart" viewBox="0 0 820 200" preserveAspectRatio="xMinYMin meet" role="img"
 aria-label="latency of recent versions"></svg>
</section>
</main>
<footer>Read-only. Every event shown was verified with the trust file; configs are never
shown. Click a row for its latency chart.</footer>
<script>"""
    + SCRIPT
    + """</script>
</body>
</html>
"""
).encode()
