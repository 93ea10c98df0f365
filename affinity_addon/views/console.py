"""Rendering of aggregated records with `rich`: the live/shutdown summary and the report's tables.

Aggregation (counting, cost) lives in `aggregate.py`; this module only formats.
"""

import sys
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from affinity_addon.views.aggregate import Aggregator, Bucket
from affinity_addon.views.format import fmt_cost, fmt_ratio, fmt_tokens, short_id, top_buckets
from affinity_addon.views.pricing import USD

# Columns a narrow terminal drops first (the rest always stay): least useful first.
_DROP_ORDER = ("not counted", "output", "no cache", "cost", "write", "top miss", "hit req")


def bucket_table(title: str, buckets: Iterable[Bucket], label: str, *, id_like: bool = False,
                 compact: bool = False, width: int | None = None) -> Table:
    """One row per bucket. `compact` (the live summary) leaves out output and costs; `width`
    (the console's) drops the least useful columns rather than let rich squeeze numbers."""
    buckets = list(buckets)
    cols: dict[str, list[str]] = {label: [short_id(b.key) if id_like else b.key
                                          for b in buckets]}
    cols["req"] = [str(b.requests) for b in buckets]
    cols["hit tok"] = [fmt_ratio(b.hit_ratio) for b in buckets]
    cols["hit req"] = [fmt_ratio(b.request_hit_ratio) for b in buckets]
    cols["read"] = [fmt_tokens(b.read_tokens) for b in buckets]
    cols["write"] = [fmt_tokens(b.write_tokens) for b in buckets]
    cols["uncached"] = [fmt_tokens(b.uncached_tokens) for b in buckets]
    costs = [b.cost() for b in buckets]
    if not compact:
        cols["output"] = [fmt_tokens(b.output_tokens) for b in buckets]
        cols["cost"] = [fmt_cost(c.with_cache, c.unit) for c in costs]
        cols["no cache"] = [fmt_cost(c.without_cache, c.unit) for c in costs]
    cols["saved"] = [fmt_cost(c.saved, c.unit) for c in costs]
    tops = [b.top_reasons(1) for b in buckets]
    cols["top miss"] = [f"{t[0][0]} ×{t[0][1]}" if t else "" for t in tops]
    if any(b.response_cache or b.no_usage for b in buckets):  # requests not in the ratios
        cols["not counted"] = [", ".join(
            ([f"{b.response_cache} resp-cache"] if b.response_cache else [])
            + ([f"{b.no_usage} no usage"] if b.no_usage else [])) for b in buckets]

    label_cap = 200

    def natural(name: str) -> int:
        wide = max(map(len, cols[name]), default=1)
        wide = min(wide, label_cap if name == label else 40)
        return max(wide, len(name)) + 2  # + cell padding

    def fits() -> bool:
        return width is None or sum(map(natural, cols)) + 2 <= width  # + edge padding

    if not fits():
        label_cap = 24  # long names give way first (wrapped, never cut), then whole columns
        for name in _DROP_ORDER:
            if fits():
                break
            cols.pop(name, None)

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    for name in cols:
        # Names and reasons wrap onto a second line rather than lose their end: "x-ai/grok…"
        # or "first-writ" in a CI log says nothing.
        if name == label:
            table.add_column(name, overflow="fold", min_width=10, max_width=natural(name) - 2)
        elif name in ("top miss", "not counted"):
            table.add_column(name, overflow="fold",
                             style="dim" if name == "not counted" else None)
        else:
            table.add_column(name, justify="right", no_wrap=True, min_width=natural(name) - 2,
                             style="green" if name == "saved" else None)
    for row in zip(*cols.values(), strict=True):
        table.add_row(*map(escape, row))
    return table


def reasons_table(bucket: Bucket, *, top: int | None = None, examples: bool = True) -> Table:
    table = Table(title="Miss reasons", box=box.SIMPLE_HEAD,
                  title_justify="left", title_style="bold")
    table.add_column("reason", style="yellow")
    table.add_column("req", justify="right")
    table.add_column("tokens lost", justify="right")  # uncached + written
    table.add_column("share", justify="right")
    if examples:
        table.add_column("examples (ts · conversation · model · detail)", overflow="fold")
    lost_total = sum(bucket.tokens_lost.values()) or 1
    for reason, n, lost in bucket.top_reasons(top):
        row = [escape(reason), str(n), fmt_tokens(lost), fmt_ratio(lost / lost_total)]
        if examples:
            ex = sorted(bucket.examples.get(reason, []), key=lambda e: -e.tokens_lost)
            # Log-derived text is escaped: a "[" in a model name must not be read as markup.
            row.append(escape("\n".join(
                f"{e.ts or '?'} · {short_id(e.affinity_id)} · {e.model or '?'} · "
                f"{e.miss_detail or '-'}" for e in ex)))
        table.add_row(*row)
    return table


def totals_line(b: Bucket) -> str:
    cost = b.cost()
    parts = [
        f"[bold]{b.requests}[/] requests",
        f"hit ratio [bold]{fmt_ratio(b.hit_ratio)}[/] of tokens, "
        f"[bold]{fmt_ratio(b.request_hit_ratio)}[/] of requests",
        f"read {fmt_tokens(b.read_tokens)} / write {fmt_tokens(b.write_tokens)} / "
        f"uncached {fmt_tokens(b.uncached_tokens)}",
    ]
    if cost.unit == USD:
        parts.append(f"cost [bold]{fmt_cost(cost.with_cache, USD)}[/] (no cache "
                     f"{fmt_cost(cost.without_cache, USD)}, saved "
                     f"[green]{fmt_cost(cost.saved, USD)}[/])")
    else:
        parts.append(f"saved [green]{fmt_cost(cost.saved, cost.unit)}[/]")
    unpriced = unpriced_note(b)
    if unpriced:
        parts.append(f"[yellow]{escape(unpriced)}[/]")
    if b.response_cache:
        parts.append(f"{b.response_cache} response-cache hits")
    if b.no_usage:
        parts.append(f"{b.no_usage} without usage")
    return " · ".join(parts)


def unpriced_note(b: Bucket, n: int = 5) -> str | None:
    """`unpriced: 3 requests of my-finetune, kimi-for-coding` when some model has no price
    (plain text: the caller escapes it for rich)."""
    if not b.unpriced_requests:
        return None
    names = [m for m, _ in b.unpriced_models.most_common(n)]
    more = len(b.unpriced_models) - len(names)
    n = b.unpriced_requests
    return (f"unpriced: {n} request{'s' if n != 1 else ''} of {', '.join(names)}"
            + (f" and {more} more" if more > 0 else ""))


# Width for output that is not a terminal (a file, a pipe, a CI log): wide enough that no table
# needs to wrap or drop anything; tables still take only the width they need.
UNLIMITED_WIDTH = 1000


def output_console(file: Any = None, *, width: int | None = None, plain: bool = False) -> Console:
    """A console for `file` (stdout by default): the terminal's width on a terminal, else as wide
    as the tables need; `width` (>0) forces one; `plain`: no colours or styles (logs)."""
    kw: dict[str, Any] = {"file": file}
    if width:
        kw["width"] = width
    elif not _isatty(file if file is not None else sys.stdout):
        kw["width"] = UNLIMITED_WIDTH
    if plain:
        kw.update(color_system=None, no_color=True, highlight=False, emoji=False)
    return Console(**kw)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def render_summary(agg: Aggregator, console: Console, *, top: int = 10) -> None:
    """The compact summary: totals, per model, and the top miss reasons."""
    if not agg.total.requests:
        console.print("affinity: no LLM requests recorded")
        return
    console.print(f"[bold]affinity[/] · {totals_line(agg.total)}")
    console.print(bucket_table("Per model", top_buckets(agg.by_model, top), "model",
                               compact=True, width=console.width))
    if agg.total.miss_reasons:
        console.print(reasons_table(agg.total, top=min(top, 5), examples=False))
    if agg.agreement.compared:
        console.print(escape(f"provider diagnosis: {agg.agreement.summary()}"))
