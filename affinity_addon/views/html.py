"""`affinity report --html`: one self-contained page (inline CSS, JS and SVG; no network).

Tables are rendered here, so the page is readable with scripts off. Charts are drawn by the
page's script from a JSON blob at load time; when all are drawn it sets `data-rendered` on
<body> (the browser test checks it), or `data-render-error` if drawing failed.
"""

import html
import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from affinity_addon.views.aggregate import (
    NONE_KEY,
    Bucket,
    fmt_cost,
    fmt_ratio,
    fmt_tokens,
    short_id,
    top_buckets,
)
from affinity_addon.views.report import Report, dry_run_rows

logger = logging.getLogger(__name__)

MAX_SERIES = 8  # conversations drawn in the hit-ratio chart
MAX_POINTS = 400  # per line: enough for the eye, small enough for a big log's page
OVERALL_BINS = 60
_SLOT = re.compile(r"__(SPAN|META|KPIS|DRY_CHART|TABLES|EXPECTED|DATA)__")


def _ms(ts: str) -> int | None:
    try:
        return int(datetime.fromisoformat(ts).timestamp() * 1000)
    except ValueError:
        return None


def _thin(points: list[Any], limit: int) -> list[Any]:
    if len(points) <= limit:
        return points
    step = len(points) / limit
    return [points[int(i * step)] for i in range(limit - 1)] + [points[-1]]


def chart_data(report: Report) -> dict[str, Any]:
    """What the page script draws, kept small: a few conversations, thinned points."""
    agg = report.agg
    series = []
    for b in top_buckets(agg.by_conversation, MAX_SERIES):
        raw = agg.series.get(b.key)
        if not raw or b.key == NONE_KEY:
            continue
        pts = sorted((t, round(r, 4), n) for ts, r, n in raw if (t := _ms(ts)) is not None)
        if pts:
            series.append({"key": b.key, "label": short_id(b.key, 10),
                           "model": agg.conversation_model.get(b.key, ""),
                           "points": _thin(pts, MAX_POINTS)})
    overall = _overall(agg.series.values())
    return {
        "total": _bucket(agg.total),
        "models": [_bucket(b) for b in top_buckets(agg.by_model, 12)],
        "reasons": [{"reason": r, "requests": n, "tokens_lost": lost}
                    for r, n, lost in agg.total.top_reasons()],
        "series": series,
        "overall": overall,
        "dry": [{"rule": b.key, "observed": b.dry_observed_ratio(),
                 "predicted": b.dry_predicted_ratio(), "saved_teq": b.dry_saved_eq,
                 "saved_usd": b.dry_saved_usd, "requests": b.dry_requests}
                for b in dry_run_rows(agg)],
    }


def _bucket(b: Bucket) -> dict[str, Any]:
    return {"key": b.key, "requests": b.requests, "read": b.read_tokens,
            "write": b.write_tokens, "uncached": b.uncached_tokens, "hit": b.hit_ratio,
            "hit_req": b.request_hit_ratio}


def _overall(all_series: Iterable[list[tuple[str, float, int]]]) -> list[list[float]]:
    """Token-weighted hit ratio of all conversations in equal time bins."""
    points = [(t, r * n, n) for s in all_series for ts, r, n in s if (t := _ms(ts)) is not None]
    if not points:
        return []
    lo = min(p[0] for p in points)
    hi = max(p[0] for p in points)
    width = max((hi - lo) / OVERALL_BINS, 1)
    read = [0.0] * OVERALL_BINS
    total = [0] * OVERALL_BINS
    for t, r, n in points:
        i = min(int((t - lo) / width), OVERALL_BINS - 1)
        read[i] += r
        total[i] += n
    return [[lo + (i + 0.5) * width, round(read[i] / total[i], 4), total[i]]
            for i in range(OVERALL_BINS) if total[i]]


# --- server-side tables ---------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(text: str, sort: float | str | None = None, cls: str = "") -> str:
    attrs = f' data-v="{_e(sort)}"' if sort is not None else ""
    attrs += f' class="{cls}"' if cls else ""
    return f"<td{attrs}>{_e(text)}</td>"


def _ratio_cell(r: float | None) -> str:
    if r is None:
        return _cell("–", -1, "num")
    return (f'<td class="num" data-v="{r:.6f}"><span class="pct">{_e(fmt_ratio(r))}</span>'
            f'<span class="meter"><i style="width:{r * 100:.1f}%"></i></span></td>')


def bucket_rows_html(buckets: list[Bucket], label: str, *, id_like: bool = False,
                     models: dict[str, str] | None = None) -> str:
    head = ["req", "hit (tokens)", "hit (requests)", "read", "write", "uncached", "output",
            "cost", "saved", "top miss"]
    out = ['<table class="sortable"><thead><tr>', f"<th>{_e(label)}</th>"]
    out += [f'<th class="num">{_e(h)}</th>' if i < 9 else f"<th>{_e(h)}</th>"
            for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for b in buckets:
        cost = b.cost()
        top = b.top_reasons(1)
        name = short_id(b.key, 16) if id_like else b.key
        notes = [models.get(b.key, "")] if models else []
        if b.response_cache:
            notes.append(f"{b.response_cache} response-cache")
        if b.no_usage:
            notes.append(f"{b.no_usage} no usage")
        sub = f'<div class="sub">{_e(" · ".join(n for n in notes if n))}</div>' if notes else ""
        out.append("<tr>")
        out.append(f'<td data-v="{_e(b.key)}" title="{_e(b.key)}"><code>{_e(name)}</code>{sub}'
                   "</td>")
        out.append(_cell(str(b.requests), b.requests, "num"))
        out.append(_ratio_cell(b.hit_ratio))
        out.append(_ratio_cell(b.request_hit_ratio))
        for n in (b.read_tokens, b.write_tokens, b.uncached_tokens, b.output_tokens):
            out.append(_cell(fmt_tokens(n), n, "num"))
        out.append(f'<td class="num" data-v="{cost.with_cache}">'
                   f"{_e(fmt_cost(cost.with_cache, cost.unit))}<div class='sub'>uncached "
                   f"{_e(fmt_cost(cost.without_cache, cost.unit))}</div></td>")
        out.append(_cell(fmt_cost(cost.saved, cost.unit), cost.saved, "num good"))
        if top:
            out.append(f'<td data-v="{top[0][2]}"><span class="tag" data-reason="{_e(top[0][0])}">'
                       f"{_e(top[0][0])}</span> <span class='sub'>×{top[0][1]}</span></td>")
        else:
            out.append(_cell("", 0))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def reasons_html(b: Bucket) -> str:
    lost_total = sum(b.tokens_lost.values()) or 1
    out = ['<table class="sortable"><thead><tr><th>reason</th><th class="num">requests</th>'
           '<th class="num">tokens lost</th><th class="num">share</th><th>examples</th>'
           "</tr></thead><tbody>"]
    for reason, n, lost in b.top_reasons():
        ex = sorted(b.examples.get(reason, []), key=lambda e: -e.tokens_lost)
        items = "".join(
            f"<li><time>{_e(e.ts or '?')}</time> <code>{_e(short_id(e.affinity_id))}</code> "
            f"<span class='sub'>{_e(e.model or '?')} · {_e(fmt_tokens(e.tokens_lost))} lost"
            f"</span><br>{_e(e.miss_detail or '—')}</li>" for e in ex)
        out.append(f'<tr><td data-v="{_e(reason)}"><span class="tag" data-reason="{_e(reason)}">'
                   f"{_e(reason)}</span></td>{_cell(str(n), n, 'num')}"
                   f"{_cell(fmt_tokens(lost), lost, 'num')}"
                   f"{_cell(fmt_ratio(lost / lost_total), lost, 'num')}"
                   f'<td><ul class="examples">{items}</ul></td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def dry_html(rows: list[Bucket]) -> str:
    out = ['<table class="sortable"><thead><tr><th>rule</th><th class="num">requests</th>'
           '<th class="num">prompt tokens</th><th class="num">observed hit</th>'
           '<th class="num">predicted hit</th><th class="num">est. saving</th></tr></thead>'
           "<tbody>"]
    for b in rows:
        saving = f"{fmt_tokens(b.dry_saved_eq)} teq"
        if b.dry_saved_usd:
            saving += f" (${b.dry_saved_usd:,.2f})"
        out.append(f"<tr>{_cell(b.key)}{_cell(str(b.dry_requests), b.dry_requests, 'num')}"
                   f"{_cell(fmt_tokens(b.dry_input_tokens), b.dry_input_tokens, 'num')}"
                   f"{_ratio_cell(b.dry_observed_ratio())}{_ratio_cell(b.dry_predicted_ratio())}"
                   f"{_cell(saving, b.dry_saved_eq, 'num good')}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kpis(report: Report) -> str:
    t = report.agg.total
    cost = t.cost()
    saved = fmt_cost(cost.saved, cost.unit)
    saved_sub = "prompt cost avoided"
    if t.usd_requests and cost.unit != "usd":
        saved_sub = f"${t.usd_without - t.usd_with:,.2f} on {t.usd_requests} priced requests"
    top = t.top_reasons(1)
    cards = [
        ("Token hit ratio", fmt_ratio(t.hit_ratio), f"{fmt_tokens(t.read_tokens)} of "
         f"{fmt_tokens(t.input_tokens)} prompt tokens read from cache", "accent"),
        ("Request hit ratio", fmt_ratio(t.request_hit_ratio),
         f"{t.hit_requests} of {t.prompt_requests} requests read from cache", ""),
        ("Saved", saved, saved_sub, "good"),
        ("Requests", f"{t.requests:,}", f"{t.response_cache} response-cache · "
         f"{t.no_usage} without usage · {len(report.agg.by_conversation)} conversations", ""),
        ("Top miss reason", top[0][0] if top else "none",
         f"{top[0][1]} requests · {fmt_tokens(top[0][2])} tokens lost" if top else "no misses",
         "warn" if top else ""),
    ]
    return "".join(f'<div class="kpi {cls}"><div class="k">{_e(k)}</div>'
                   f'<div class="v">{_e(v)}</div><div class="sub">{_e(s)}</div></div>'
                   for k, v, s, cls in cards)


def _json_for_script(data: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a model name or detail would end the block.
    return (json.dumps(data, separators=(",", ":"), allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def render_html(report: Report, *, top: int = 10) -> str:
    agg, stats = report.agg, report.stats
    total = agg.total
    n_conv = len(agg.by_conversation)
    filters = ", ".join(f"{k} {v}" for k, v in report.filter.describe().items() if v)
    meta = [f"{len(stats.files)} log file(s)", f"{stats.records:,} records"]
    if stats.malformed:
        meta.append(f"{stats.malformed} malformed line(s) skipped")
    if filters:
        meta.append(f"filtered by {filters} ({stats.filtered_out:,} left out)")
    span = f"{total.first_ts} → {total.last_ts}" if total.first_ts else "no timestamps"
    dry_rows = dry_run_rows(agg)
    convs = top_buckets(agg.by_conversation, top or None)
    sections = [
        ("Per model", bucket_rows_html(top_buckets(agg.by_model), "model")),
        ("Per rule", bucket_rows_html(top_buckets(agg.by_rule), "rule")),
        (f"Top {len(convs)} of {n_conv} conversations by prompt tokens",
         bucket_rows_html(convs, "conversation", id_like=True, models=agg.conversation_model)),
    ]
    if total.miss_reasons:
        sections.append(("Miss reasons, with the costliest examples", reasons_html(total)))
    if dry_rows:
        sections.append(("Dry run: what the rules would have saved", dry_html(dry_rows)))
    tables = "".join(f'<section class="card"><h2>{_e(title)}</h2><div class="scroll">{body}'
                     "</div></section>" for title, body in sections)
    dry_chart = ('<section class="card"><h2>Dry run: predicted vs observed hit ratio</h2>'
                 '<div class="chart" id="chart-dry"></div></section>') if dry_rows else ""
    slots = {
        "SPAN": _e(span),
        "META": _e(" · ".join(meta)),
        "KPIS": _kpis(report),
        "DRY_CHART": dry_chart,
        "TABLES": tables,
        "EXPECTED": str(4 if dry_rows else 3),
        "DATA": _json_for_script(chart_data(report)),
    }
    # One pass, so a slot name inside log-derived text is never substituted again.
    return _SLOT.sub(lambda m: slots[m.group(1)], _TEMPLATE)


def write_html(report: Report, path: str | Path, *, top: int = 10) -> Path:
    path = Path(path)
    path.write_text(render_html(report, top=top), encoding="utf-8")
    return path


_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>affinity · prompt-cache report</title>
<style>
:root {
  --bg: #f4f6fb; --card: #ffffff; --ink: #1b2232; --muted: #6a7386; --line: #e3e7f0;
  --grid: #edf0f6; --accent: #5563f5; --good: #1f9d6c; --warn: #d9822b;
  --read: #2bb47f; --write: #f2a93b; --uncached: #e4606d; --shadow: 0 1px 2px rgba(20,30,60,.06), 0 4px 18px rgba(20,30,60,.06);
}
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f131c; --card: #171c28; --ink: #e6e9f2; --muted: #8d96aa; --line: #262d3d;
          --grid: #1f2533; --shadow: none; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 24px 60px; }
header h1 { margin: 0; font-size: 24px; letter-spacing: -.01em; }
header h1 span { color: var(--accent); }
header .meta { color: var(--muted); margin-top: 4px; }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 14px; margin: 22px 0; }
.kpi { background: var(--card); border-radius: 14px; padding: 16px 18px; box-shadow: var(--shadow);
       border-top: 3px solid var(--line); }
.kpi.accent { border-top-color: var(--accent); } .kpi.good { border-top-color: var(--good); }
.kpi.warn { border-top-color: var(--warn); }
.kpi .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .06em; }
.kpi .v { font-size: 28px; font-weight: 650; margin: 4px 0 2px; font-variant-numeric: tabular-nums; }
.kpi.accent .v { color: var(--accent); } .kpi.good .v { color: var(--good); }
.kpi.warn .v { color: var(--warn); font-size: 22px; }
.sub { color: var(--muted); font-size: 12px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 16px; }
.card { background: var(--card); border-radius: 14px; padding: 18px 20px; box-shadow: var(--shadow); margin-bottom: 16px; }
.card h2 { font-size: 15px; margin: 0 0 12px; font-weight: 620; }
.chart { position: relative; width: 100%; }
.chart svg { display: block; width: 100%; height: auto; overflow: visible; }
svg text { fill: var(--muted); font-size: 11px; font-family: inherit; }
svg .gridline { stroke: var(--grid); stroke-width: 1; }
svg .axis { stroke: var(--line); }
svg .label-strong { fill: var(--ink); font-size: 12px; }
svg .series-line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; opacity: .9; transition: opacity .15s; }
svg .series-line.overall { stroke-width: 3.5; stroke-dasharray: 6 4; opacity: 1; }
svg .muted-series { opacity: .12; }
svg .hidden { display: none; }
svg rect.bar-seg, svg rect.bar { transition: opacity .15s; }
svg rect.bar-seg:hover, svg rect.bar:hover { opacity: .8; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 8px; margin-top: 10px; }
.legend button { border: 1px solid var(--line); background: transparent; color: var(--ink); border-radius: 999px;
                 padding: 3px 10px 3px 8px; font: inherit; font-size: 12px; cursor: pointer; display: inline-flex; align-items: center; gap: 6px; }
.legend button.off { opacity: .4; }
.legend i { width: 10px; height: 10px; border-radius: 50%; display: inline-block; }
#tip { position: fixed; pointer-events: none; z-index: 10; background: rgba(20,24,36,.94); color: #fff;
       padding: 7px 10px; border-radius: 8px; font-size: 12px; line-height: 1.4; opacity: 0; transition: opacity .1s;
       max-width: 340px; white-space: pre-line; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
td:first-child code { white-space: nowrap; } td:first-child .sub { max-width: 260px; }
th, td { padding: 6px 8px; text-align: left; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); font-weight: 600;
     cursor: pointer; user-select: none; white-space: nowrap; }
th.sorted-asc::after { content: " ▲"; } th.sorted-desc::after { content: " ▼"; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.good { color: var(--good); font-weight: 600; }
tbody tr:hover { background: color-mix(in srgb, var(--accent) 5%, transparent); }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.meter { display: block; height: 4px; background: var(--grid); border-radius: 2px; margin-top: 3px; min-width: 40px; }
.meter i { display: block; height: 100%; background: var(--read); border-radius: 2px; }
.tag { display: inline-block; white-space: nowrap; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600;
       background: color-mix(in srgb, var(--warn) 18%, transparent); color: var(--warn); }
ul.examples { margin: 0; padding: 0; list-style: none; font-size: 12px; }
ul.examples li { margin-bottom: 6px; } ul.examples time { color: var(--muted); }
.note { color: var(--muted); font-size: 12px; margin-top: 18px; }
.empty { color: var(--muted); padding: 30px 0; text-align: center; }
</style>
</head>
<body>
<main>
<header>
  <h1><span>affinity</span> · prompt-cache report</h1>
  <div class="meta">__SPAN__ · __META__</div>
</header>
<noscript><p class="note">Charts need JavaScript; the tables below do not.</p></noscript>
<div class="kpis">__KPIS__</div>
<section class="card">
  <h2>Hit ratio over time, per conversation (dashed: all conversations, token-weighted)</h2>
  <div class="chart" id="chart-timeline"></div>
  <div class="legend" id="legend-timeline"></div>
</section>
<div class="grid2">
  <section class="card"><h2>Prompt tokens by category, per model</h2><div class="chart" id="chart-tokens"></div>
    <div class="legend" id="legend-tokens"></div></section>
  <section class="card"><h2>Miss reasons, by tokens lost (uncached + written)</h2><div class="chart" id="chart-reasons"></div></section>
</div>
__DRY_CHART__
__TABLES__
<p class="note">Costs cover prompt tokens only: USD where the model's base input price is known,
otherwise input-token equivalents (teq: tokens weighted by the provider's cache multipliers).
Response-cache hits and requests without usage are not counted as misses.</p>
</main>
<div id="tip"></div>
<script id="report-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#5563f5", "#2bb47f", "#f2a93b", "#e4606d", "#9b5de5", "#00a6c7", "#f15bb5", "#7d8597"];
  var REASON_COLORS = {"first-write": "#7d8597", "prefix-changed": "#e4606d", "partial": "#f4845f", "ttl-expired": "#f2a93b",
    "routed-away": "#9b5de5", "below-minimum": "#00a6c7", "lookback-exceeded": "#f15bb5", "unknown": "#5c677d"};
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var tip = document.getElementById("tip");

  function el(tag, attrs, parent) {
    var n = document.createElementNS(NS, tag);
    for (var k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) n.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(n);
    return n;
  }
  function text(parent, x, y, s, attrs) {
    var t = el("text", Object.assign({x: x, y: y}, attrs || {}), parent);
    t.textContent = s;
    return t;
  }
  function fmtTok(n) {
    var a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 1 : 2) + "G";
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 1 : 2) + "M";
    if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 1 : 2) + "k";
    return String(Math.round(n));
  }
  function pct(r) { return r === null || r === undefined ? "–" : (r * 100).toFixed(1) + "%"; }
  function svgFor(id, w, h) {
    var box = document.getElementById(id);
    var svg = el("svg", {viewBox: "0 0 " + w + " " + h, "class": "chart", role: "img"}, box);
    return svg;
  }
  function tipOn(node, s) { node.setAttribute("data-tip", s); }
  document.addEventListener("mousemove", function (ev) {
    var t = ev.target && ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (!t) { tip.style.opacity = 0; return; }
    tip.textContent = t.getAttribute("data-tip");
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + 340 > window.innerWidth) x = ev.clientX - 14 - tip.offsetWidth;
    tip.style.left = x + "px"; tip.style.top = y + "px"; tip.style.opacity = 1;
  });
  function empty(id, msg) {
    var d = document.createElement("div"); d.className = "empty"; d.textContent = msg;
    document.getElementById(id).appendChild(d);
  }

  function timeline() {
    var W = 1160, H = 340, L = 48, R = 16, T = 12, B = 34;
    var svg = svgFor("chart-timeline", W, H);
    var lines = data.series.slice();
    var all = [];
    lines.forEach(function (s) { s.points.forEach(function (p) { all.push(p[0]); }); });
    data.overall.forEach(function (p) { all.push(p[0]); });
    var lo = Math.min.apply(null, all), hi = Math.max.apply(null, all);
    if (!all.length) { lo = Date.now() - 3600e3; hi = Date.now(); }
    if (hi <= lo) { hi = lo + 60e3; }
    function x(t) { return L + (t - lo) / (hi - lo) * (W - L - R); }
    function y(r) { return T + (1 - r) * (H - T - B); }
    [0, .25, .5, .75, 1].forEach(function (r) {
      el("line", {x1: L, x2: W - R, y1: y(r), y2: y(r), "class": "gridline"}, svg);
      text(svg, L - 8, y(r) + 4, (r * 100) + "%", {"text-anchor": "end"});
    });
    var span = hi - lo, multiDay = span > 36 * 3600e3;
    for (var i = 0; i <= 6; i++) {
      var t = lo + span * i / 6, d = new Date(t);
      var lab = multiDay ? d.toISOString().slice(5, 10) + " " + d.toISOString().slice(11, 16)
                         : d.toISOString().slice(11, 16);
      text(svg, x(t), H - 10, lab, {"text-anchor": i === 0 ? "start" : i === 6 ? "end" : "middle"});
    }
    el("line", {x1: L, x2: W - R, y1: y(0), y2: y(0), "class": "axis"}, svg);
    var legend = document.getElementById("legend-timeline");
    var groups = [];
    function addLine(points, color, cls, name, detail) {
      var g = el("g", {"class": "series"}, svg);
      // A long pause is a gap in the line, not a slope across it.
      var d = points.map(function (p, i) {
        var gap = i && (p[0] - points[i - 1][0]) > span / 10;
        return (i && !gap ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1);
      }).join("");
      el("path", {d: d, style: "stroke:" + color, "class": "series-line " + cls}, g);
      if (points.length < 80) {
        points.forEach(function (p) {
          var c = el("circle", {cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 3.2, style: "fill:" + color, "class": "pt"}, g);
          tipOn(c, name + (detail ? " · " + detail : "") + "\n" + new Date(p[0]).toISOString().replace("T", " ").slice(0, 19)
                + "\nhit " + pct(p[1]) + " of " + fmtTok(p[2]) + " prompt tokens");
        });
      } else {
        tipOn(g, name + (detail ? " · " + detail : "") + "\n" + points.length + " requests");
      }
      var b = document.createElement("button");
      b.innerHTML = "<i></i>"; b.firstChild.style.background = color;
      b.appendChild(document.createTextNode(name + (detail ? " · " + detail : "")));
      b.addEventListener("click", function () { b.classList.toggle("off"); g.classList.toggle("hidden"); });
      b.addEventListener("mouseenter", function () { groups.forEach(function (o) { if (o !== g) o.classList.add("muted-series"); }); });
      b.addEventListener("mouseleave", function () { groups.forEach(function (o) { o.classList.remove("muted-series"); }); });
      legend.appendChild(b);
      groups.push(g);
    }
    lines.forEach(function (s, i) { addLine(s.points, PALETTE[i % PALETTE.length], "", s.label, s.model); });
    if (data.overall.length) addLine(data.overall, "var(--ink)", "overall", "all conversations", "");
    if (!lines.length && !data.overall.length) text(svg, W / 2, H / 2, "no requests with a prompt", {"text-anchor": "middle"});
  }

  function tokens() {
    var models = data.models;
    var rowH = 30, L = 190, R = 92, T = 6, W = 560, H = T + Math.max(models.length, 1) * rowH + 10;
    var svg = svgFor("chart-tokens", W, H);
    var cats = [["read", "var(--read)", "read from cache"], ["write", "var(--write)", "written to cache"],
                ["uncached", "var(--uncached)", "uncached"]];
    var max = 1;
    models.forEach(function (m) { max = Math.max(max, m.read + m.write + m.uncached); });
    models.forEach(function (m, i) {
      var y0 = T + i * rowH, x0 = L, total = m.read + m.write + m.uncached;
      var name = m.key.length > 28 ? m.key.slice(0, 27) + "…" : m.key;
      text(svg, L - 10, y0 + rowH / 2 + 4, name, {"text-anchor": "end", "class": "label-strong"});
      cats.forEach(function (c) {
        var w = m[c[0]] / max * (W - L - R);
        if (w <= 0) return;
        var r = el("rect", {x: x0.toFixed(1), y: y0 + 5, width: Math.max(w, 0.5).toFixed(1), height: rowH - 10,
                            style: "fill:" + c[1], "class": "bar-seg", "data-cat": c[0], rx: 2}, svg);
        tipOn(r, m.key + "\n" + c[2] + ": " + fmtTok(m[c[0]]) + " tokens (" + pct(total ? m[c[0]] / total : null) + ")");
        x0 += w;
      });
      text(svg, x0 + 8, y0 + rowH / 2 + 4, fmtTok(total) + " · " + pct(m.hit));
    });
    if (!models.length) text(svg, W / 2, 24, "no models", {"text-anchor": "middle"});
    var lg = document.getElementById("legend-tokens");
    cats.forEach(function (c) {
      var b = document.createElement("button"); b.innerHTML = "<i></i>"; b.firstChild.style.background = c[1];
      b.appendChild(document.createTextNode(c[2]));
      b.addEventListener("click", function () {
        b.classList.toggle("off");
        svg.querySelectorAll('[data-cat="' + c[0] + '"]').forEach(function (n) { n.classList.toggle("hidden"); });
      });
      lg.appendChild(b);
    });
  }

  function reasons() {
    var rs = data.reasons;
    var rowH = 32, L = 140, R = 150, T = 6, W = 560, H = T + Math.max(rs.length, 1) * rowH + 10;
    var svg = svgFor("chart-reasons", W, H);
    var max = 1;
    rs.forEach(function (r) { max = Math.max(max, r.tokens_lost); });
    rs.forEach(function (r, i) {
      var y0 = T + i * rowH, w = r.tokens_lost / max * (W - L - R);
      text(svg, L - 10, y0 + rowH / 2 + 4, r.reason, {"text-anchor": "end", "class": "label-strong"});
      var bar = el("rect", {x: L, y: y0 + 5, width: Math.max(w, 1).toFixed(1), height: rowH - 10, rx: 3,
                            fill: REASON_COLORS[r.reason] || "#7d8597", "class": "bar"}, svg);
      tipOn(bar, r.reason + "\n" + r.requests + " requests\n" + fmtTok(r.tokens_lost) + " tokens lost");
      text(svg, L + w + 8, y0 + rowH / 2 + 4, fmtTok(r.tokens_lost) + " lost · " + r.requests + " req");
    });
    if (!rs.length) text(svg, W / 2, 24, "no misses: every request with a prompt read from cache", {"text-anchor": "middle"});
  }

  function dry() {
    if (!document.getElementById("chart-dry")) return false;
    var rows = data.dry, groupH = 52, L = 150, R = 190, T = 6, W = 1160, H = T + Math.max(rows.length, 1) * groupH + 10;
    var svg = svgFor("chart-dry", W, H);
    rows.forEach(function (d, i) {
      var y0 = T + i * groupH, span = W - L - R;
      text(svg, L - 10, y0 + groupH / 2 + 2, d.rule, {"text-anchor": "end", "class": "label-strong"});
      [["observed", "#7d8597", d.observed], ["predicted", "var(--accent)", d.predicted]].forEach(function (b, j) {
        var w = (b[2] || 0) * span;
        var r = el("rect", {x: L, y: y0 + 6 + j * 20, width: Math.max(w, 1).toFixed(1), height: 16, rx: 3, style: "fill:" + b[1], "class": "bar"}, svg);
        tipOn(r, d.rule + "\n" + b[0] + " hit ratio " + pct(b[2]));
        text(svg, L + w + 8, y0 + 18 + j * 20, b[0] + " " + pct(b[2]));
      });
      text(svg, W - R + 40, y0 + groupH / 2 + 2, "saves ~" + fmtTok(d.saved_teq) + " teq" + (d.saved_usd ? " ($" + d.saved_usd.toFixed(2) + ")" : ""), {"class": "label-strong"});
    });
    return true;
  }

  function sortable() {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      table.querySelectorAll("th").forEach(function (th, col) {
        th.addEventListener("click", function () {
          var asc = !th.classList.contains("sorted-desc");
          table.querySelectorAll("th").forEach(function (o) { o.classList.remove("sorted-asc", "sorted-desc"); });
          th.classList.add(asc ? "sorted-desc" : "sorted-asc");
          var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
          rows.sort(function (a, b) {
            var va = a.cells[col].getAttribute("data-v"), vb = b.cells[col].getAttribute("data-v");
            var na = parseFloat(va), nb = parseFloat(vb), c;
            c = (!isNaN(na) && !isNaN(nb)) ? na - nb : String(va).localeCompare(String(vb));
            return asc ? -c : c;
          });
          rows.forEach(function (r) { body.appendChild(r); });
        });
      });
    });
  }

  try {
    timeline(); tokens(); reasons();
    var n = 3 + (dry() ? 1 : 0);
    sortable();
    document.body.setAttribute("data-rendered", String(n));
    document.body.setAttribute("data-expected", "__EXPECTED__");
  } catch (e) {
    document.body.setAttribute("data-render-error", String(e && e.stack || e));
    throw e;
  }
})();
</script>
</body>
</html>
"""
