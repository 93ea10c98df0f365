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
from functools import cache
from pathlib import Path
from typing import Any

from affinity_addon.views.aggregate import NONE_KEY, Bucket
from affinity_addon.views.agreement import Agreement
from affinity_addon.views.console import unpriced_note
from affinity_addon.views.format import fmt_cost, fmt_ratio, fmt_tokens, short_id, top_buckets
from affinity_addon.views.pricing import USD
from affinity_addon.views.report import Report, dry_run_rows
from affinity_addon.views.ttl import summary_line

logger = logging.getLogger(__name__)

# The page: inline CSS and script, with __SLOT__ placeholders filled by render_html.
TEMPLATE_FILE = Path(__file__).resolve().parent / "report.html"

MAX_SERIES = 8  # conversations drawn in the hit-ratio chart
MAX_POINTS = 400  # per line: enough for the eye, small enough for a big log's page
OVERALL_BINS = 60
_SLOT = re.compile(r"__(SPAN|META|KPIS|DRY_CHART|TABLES|EXPECTED|DATA)__")


@cache
def _template() -> str:
    return TEMPLATE_FILE.read_text(encoding="utf-8")


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
                   f"{_e(fmt_cost(cost.with_cache, cost.unit))}<div class='sub'>no cache "
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


def agreement_html(a: Agreement) -> str:
    """The provider's own diagnosis next to ours, disagreements first."""
    marks = {False: ("no", "bad"), True: ("yes", "good"), None: ("–", "")}
    out = [f'<p class="sub">{_e(a.summary())}</p>',
           '<table class="sortable"><thead><tr><th>agrees</th><th>provider said</th>'
           '<th>we said</th><th class="num">requests</th><th>examples</th></tr></thead><tbody>']
    for rank, p in enumerate(a.rows()):
        text, cls = marks[p.agrees]
        items = "".join(
            f"<li><time>{_e(e.ts or '?')}</time> <code>{_e(short_id(e.affinity_id))}</code> "
            f"<span class='sub'>{_e(e.model or '?')} · compared to "
            f"{_e(short_id(e.compared_to, 16))}</span><br>{_e(e.miss_detail or '—')}</li>"
            for e in p.examples)
        out.append(f"<tr>{_cell(text, rank, cls)}{_cell(f'{p.source}: {p.provider}')}"
                   f'<td><span class="tag" data-reason="{_e(p.ours)}">{_e(p.ours)}</span></td>'
                   f"{_cell(str(p.requests), p.requests, 'num')}"
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
    saved_sub = "avoided by the cache" if cost.unit == USD else "prompt cost avoided"
    prices = report.agg.prices.version
    unpriced = unpriced_note(t)
    if cost.unit == USD:
        spent = ("Cost", fmt_cost(cost.with_cache, USD),
                 f"{fmt_cost(cost.without_cache, USD)} without the cache · "
                 f"{t.usd_requests:,} priced requests · {prices}"
                 + (f" · {unpriced}" if unpriced else ""), "")
    else:
        spent = ("Cost", "unpriced", unpriced or "no model with a price", "warn")
    top = t.top_reasons(1)
    cards = [
        ("Token hit ratio", fmt_ratio(t.hit_ratio), f"{fmt_tokens(t.read_tokens)} of "
         f"{fmt_tokens(t.input_tokens)} prompt tokens read from cache", "accent"),
        ("Request hit ratio", fmt_ratio(t.request_hit_ratio),
         f"{t.hit_requests} of {t.prompt_requests} requests read from cache", ""),
        spent,
        ("Saved", saved, saved_sub, "good"),
        ("Requests", f"{t.requests:,}", f"{t.response_cache} response-cache · "
         f"{t.no_usage} without usage · {len(report.agg.by_conversation)} conversations", ""),
        *([("TTL", "replayed", summary_line(report.ttl) or "", "")]
          if report.ttl.conversations else []),
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
        ("Per host", bucket_rows_html(top_buckets(agg.by_host), "host")),
        (f"Top {len(convs)} of {n_conv} conversations by prompt tokens",
         bucket_rows_html(convs, "conversation", id_like=True, models=agg.conversation_model)),
    ]
    if total.miss_reasons:
        sections.append(("Miss reasons, with the costliest examples", reasons_html(total)))
    if agg.agreement.compared:
        sections.append(("Provider diagnosis vs ours, disagreements first",
                         agreement_html(agg.agreement)))
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
    return _SLOT.sub(lambda m: slots[m.group(1)], _template())


def write_html(report: Report, path: str | Path, *, top: int = 10) -> Path:
    path = Path(path)
    path.write_text(render_html(report, top=top), encoding="utf-8")
    return path
