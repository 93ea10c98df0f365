"""`affinity report`: read JSONL logs, filter, aggregate, print tables / JSON / an HTML page.

Logs are streamed line by line (one `json.loads` each), so a 100 MB log takes seconds and little
memory. Several proxy instances may write several files; they are simply read one after another.
A line that is not a JSON object (a torn write, a stray edit) is counted and skipped.
"""

import fnmatch
import gzip
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from affinity_addon.buckets import OVERFLOW_RPM, TARGET_RPM
from affinity_addon.durations import parse_duration
from affinity_addon.views.aggregate import Aggregator, Bucket
from affinity_addon.views.agreement import Agreement
from affinity_addon.views.cache_key_rates import CacheKeyRates, short_key
from affinity_addon.views.console import bucket_table, reasons_table, totals_line
from affinity_addon.views.format import fmt_cost, fmt_ratio, fmt_tokens, short_id, top_buckets
from affinity_addon.views.pricing import TOKEN_EQUIVALENTS, PriceTable
from affinity_addon.views.ttl import (
    FIVE_MINUTES,
    POLICIES,
    TtlAdvice,
    TtlAdvisor,
    summary_line,
)

logger = logging.getLogger(__name__)



def parse_time(text: str) -> datetime:
    """An ISO-8601 time as an aware UTC datetime; naive times are taken as UTC (the log's zone)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO-8601 time: {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO time, or an age such as `30m`, `2h`, `7d`, `1w` before now."""
    try:
        age = parse_duration(text)
    except ValueError:
        pass
    else:
        return (now or datetime.now(UTC)) - timedelta(seconds=age)
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"--since wants an ISO time or an age like 30m, 2h, 7d: {text!r}") \
            from None


@dataclass(frozen=True, slots=True)
class RecordFilter:
    since: datetime | None = None
    model: str | None = None  # glob, case-insensitive
    session: str | None = None  # affinity ID prefix

    def accepts(self, record: Mapping[str, Any], _memo: dict[str, bool] | None = None) -> bool:
        if self.session is not None:
            aid = record.get("affinity_id")
            if not isinstance(aid, str) or not aid.startswith(self.session):
                return False
        if self.model is not None:
            model = record.get("model")
            if not isinstance(model, str):
                return False
            hit = None if _memo is None else _memo.get(model)
            if hit is None:
                hit = fnmatch.fnmatchcase(model.lower(), self.model.lower())
                if _memo is not None:
                    _memo[model] = hit
            if not hit:
                return False
        if self.since is not None:
            ts = record.get("ts")
            if not isinstance(ts, str):
                return False
            try:
                if parse_time(ts) < self.since:
                    return False
            except ValueError:
                return False
        return True

    def describe(self) -> dict[str, str | None]:
        return {"since": self.since.isoformat() if self.since else None,
                "model": self.model, "session": self.session}


@dataclass(slots=True)
class ReadStats:
    files: list[str] = field(default_factory=list)
    lines: int = 0
    blank: int = 0
    malformed: int = 0
    records: int = 0  # parsed JSON objects
    filtered_out: int = 0
    malformed_at: list[str] = field(default_factory=list)  # first few "file:line"
    errors: list[str] = field(default_factory=list)  # files that could not be read to the end

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "lines": self.lines, "blank": self.blank,
                "malformed": self.malformed, "malformed_at": self.malformed_at,
                "errors": self.errors,
                "records": self.records, "filtered_out": self.filtered_out,
                "used": self.records - self.filtered_out}


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]  # an IO[bytes] at runtime
    return open(path, "rb")


def _resync(line: bytes, attempts: int = 16) -> dict[str, Any] | None:
    """The whole record at the end of a line that starts with a torn one, if there is one."""
    pos = 0
    for _ in range(attempts):
        pos = line.find(b'{"', pos + 1)
        if pos < 0:
            return None
        try:
            record = json.loads(line[pos:])
        except (ValueError, RecursionError):
            continue
        return record if type(record) is dict else None
    return None


def iter_records(paths: Iterable[str | Path], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Every JSON object of every file, counting blank and malformed lines into `stats`."""
    loads = json.loads
    for path in map(Path, paths):
        stats.files.append(str(path))
        lineno = 0
        try:
            with _open(path) as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        record = loads(line)
                    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, deep nesting
                        record = _resync(line)
                        if record is not None:  # a torn line glued to a whole record
                            stats.malformed += 1
                            if len(stats.malformed_at) < 10:
                                stats.malformed_at.append(f"{path}:{lineno}")
                    if type(record) is not dict:
                        if not line.strip():
                            stats.blank += 1
                            continue
                        stats.malformed += 1
                        if len(stats.malformed_at) < 10:
                            stats.malformed_at.append(f"{path}:{lineno}")
                        continue
                    stats.records += 1
                    yield record
        except (OSError, EOFError) as e:  # unreadable file, truncated .gz: keep what was read
            stats.errors.append(f"{path}: {e}")
            logger.warning("reading %s stopped at line %d: %s", path, lineno, e)
        stats.lines += lineno


@dataclass(slots=True)
class Report:
    agg: Aggregator
    stats: ReadStats
    filter: RecordFilter
    ttl: TtlAdvice = field(default_factory=lambda: TtlAdvice([]))
    keys: CacheKeyRates = field(default_factory=CacheKeyRates)


def build_report(paths: Sequence[str | Path], flt: RecordFilter | None = None,
                 prices: PriceTable | None = None) -> Report:
    flt = flt or RecordFilter()
    stats = ReadStats()
    agg = Aggregator(prices)
    ttl = TtlAdvisor(prices)
    keys = CacheKeyRates()
    memo: dict[str, bool] = {}
    trivial = flt == RecordFilter()
    add = agg.add
    for record in iter_records(paths, stats):
        if trivial or flt.accepts(record, memo):
            add(record)
            ttl.add(record)
            keys.add(record)
        else:
            stats.filtered_out += 1
    return Report(agg, stats, flt, ttl.advice(), keys)


def dry_run_rows(agg: Aggregator) -> list[Bucket]:
    return [b for b in top_buckets(agg.by_rule) if b.dry_requests]


def report_document(report: Report, *, top: int = 10) -> dict[str, Any]:
    """The `--json` document; `top` limits conversations only (0: all)."""
    agg = report.agg
    convs = top_buckets(agg.by_conversation, top or None)
    return {
        "v": 1,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "input": report.stats.to_dict(),
        "filters": report.filter.describe(),
        "total": agg.total.to_dict(),
        "by_model": [b.to_dict(examples=False) for b in top_buckets(agg.by_model)],
        "by_rule": [b.to_dict(examples=False) for b in top_buckets(agg.by_rule)],
        "by_host": [b.to_dict(examples=False) for b in top_buckets(agg.by_host)],
        "conversations": len(agg.by_conversation),
        "by_conversation": [b.to_dict(examples=False) for b in convs],
        "by_reason": [b.to_dict(examples=False) for b in top_buckets(agg.by_reason)],
        # What the `cost_usd` objects were priced with, and the models nobody prices.
        "prices": {"table": agg.prices.version,
                   "unpriced": [{"model": m, "requests": n}
                                for m, n in agg.total.unpriced_models.most_common()]},
        "ttl": report.ttl.to_dict(top or 10),
        "key_rates": report.keys.to_dict(top or None),  # the report format keeps its name
        "provider_agreement": agg.agreement.to_dict(),
        "dry_run": {
            "total": agg.total.to_dict(examples=False).get("dry_run"),
            "by_rule": [{"rule": b.key, **b.to_dict(examples=False)["dry_run"]}
                        for b in dry_run_rows(agg)],
        },
    }


def render_report(report: Report, console: Console, *, top: int = 10) -> None:
    agg, stats = report.agg, report.stats
    head = [f"[bold]affinity report[/] · {len(stats.files)} file(s) · {stats.records} records"]
    if stats.malformed:
        head.append(f"[red]{stats.malformed} malformed line(s) skipped[/]")
    active = {k: v for k, v in report.filter.describe().items() if v}
    if active:
        head.append(f"{stats.filtered_out} filtered out by "
                    + escape(", ".join(f"{k}={v}" for k, v in active.items())))
    console.print(" · ".join(head))
    if not agg.total.requests:
        console.print("no matching records")
        return
    if agg.total.first_ts:
        console.print(f"{agg.total.first_ts} → {agg.total.last_ts}")
    console.print(totals_line(agg.total))
    width = console.width
    console.print(bucket_table("Per model", top_buckets(agg.by_model), "model", width=width))
    console.print(bucket_table("Per rule", top_buckets(agg.by_rule), "rule", width=width))
    console.print(bucket_table("Per host", top_buckets(agg.by_host), "host", width=width))
    n_conv = len(agg.by_conversation)
    console.print(bucket_table(
        f"Top {min(top, n_conv) if top else n_conv} of {n_conv} conversations by prompt tokens",
        top_buckets(agg.by_conversation, top or None), "conversation", id_like=True,
        width=width))
    if agg.total.miss_reasons:
        console.print(reasons_table(agg.total, top=top or None))
    if agg.agreement.compared:
        console.print(agreement_table(agg.agreement, top=top or None))
    rows = dry_run_rows(agg)
    if rows:
        console.print(dry_run_table(rows, agg.total))
    if report.ttl.conversations:
        console.print(ttl_table(report.ttl, top=top or None))
    if report.keys.keys:
        console.print(key_rate_table(report.keys, top=top or None))
    console.print(f"[dim]Costs in USD (prompt by kind of token, plus output) from "
                  f"{escape(agg.prices.version)}; input-token equivalents (teq) only where no "
                  "model is priced. Hit tok = share of prompt tokens read from cache; hit req = "
                  "share of requests that read any.[/]")


def agreement_table(a: Agreement, *, top: int | None = None) -> Table:
    """The provider's own answer next to our verdict, disagreements first: each is a blind
    spot of our diagnosis or a provider surprise worth a look."""
    table = Table(title="Provider diagnosis vs ours (disagreements first)", box=box.SIMPLE_HEAD,
                  title_justify="left", title_style="bold", caption=a.summary(),
                  caption_justify="left")
    for col in ("agrees", "provider said", "we said", "req", "examples (ts · conversation · "
                "compared to · our detail)"):
        table.add_column(col, justify="right" if col == "req" else "left", overflow="fold")
    marks = {False: "[red]no[/]", True: "[green]yes[/]", None: "[dim]-[/]"}
    for p in a.rows()[:top]:
        examples = "\n".join(f"{e.ts or '?'} · {short_id(e.affinity_id)} · "
                             f"{short_id(e.compared_to, 16)} · {e.miss_detail or '-'}"
                             for e in p.examples)
        table.add_row(marks[p.agrees], escape(f"{p.source}: {p.provider}"), escape(p.ours),
                      str(p.requests), escape(examples))
    return table


def dry_run_table(rows: list[Bucket], total: Bucket) -> Table:
    table = Table(title="Dry run: what the rules would have saved", box=box.SIMPLE_HEAD,
                  title_justify="left", title_style="bold")
    table.add_column("rule")
    for name in ("req", "prompt", "observed hit", "predicted hit", "est. saving"):
        table.add_column(name, justify="right")
    for b in [*rows, total] if len(rows) > 1 else rows:
        saving = fmt_cost(b.dry_saved_eq, TOKEN_EQUIVALENTS)
        if b.dry_saved_usd:
            saving = f"{saving} (${b.dry_saved_usd:,.2f} priced)"
        table.add_row("all rules" if b is total else escape(b.key), str(b.dry_requests),
                      fmt_tokens(b.dry_input_tokens), fmt_ratio(b.dry_observed_ratio()),
                      fmt_ratio(b.dry_predicted_ratio()), saving)
    return table


def ttl_table(advice: TtlAdvice, *, top: int | None = 10) -> Table:
    """What the cache TTL cost you: each policy's prompt cost, and the conversations where the
    other TTL would have been cheaper than the 5m default."""
    table = Table(title="What the TTL cost you (replayed: all-5m, all-1h, auto)",
                  box=box.SIMPLE_HEAD, title_justify="left", title_style="bold",
                  caption=escape(summary_line(advice) or ""), caption_justify="left")
    for col in ("conversation", "model", "req", "all-5m", "all-1h", "auto", "cheaper"):
        table.add_column(col, justify="left" if col in ("conversation", "model") else "right",
                         overflow="fold")
    ranked = sorted(advice.conversations,
                    key=lambda c: c.cost[c.cheapest] - c.cost[FIVE_MINUTES])[:top]
    for c in ranked:
        cost = c.cost
        table.add_row(escape(short_id(c.key)), escape(c.model or "-"), str(c.requests),
                      *(fmt_cost(cost[p] * c.scale, c.unit) for p in POLICIES),
                      c.cheapest)
    return table


def key_rate_table(rates: CacheKeyRates, *, top: int | None = 10) -> Table:
    """Busiest minute per prompt family and per prompt_cache_key, with the bucket count a
    family calls for and the keys above OpenAI's ~15 RPM per prefix+key (overflow likely)."""
    table = Table(title="Request rate per prompt_cache_key (busiest minute)", box=box.SIMPLE_HEAD,
                  title_justify="left", title_style="bold",
                  caption=f"OpenAI overflows a prefix+key above ~{OVERFLOW_RPM} RPM; {{family_key}} "
                          f"aims at {TARGET_RPM} per bucket. Keys the client sent itself are not "
                          "logged, so not counted.", caption_justify="left")
    for col in ("family / key", "req", "busiest RPM", "buckets", "note"):
        table.add_column(col, justify="left" if col in ("family / key", "note") else "right",
                         overflow="fold")
    fams, keys = rates.rows(top)
    for f in fams:
        used, rec = f["buckets_used"], f["buckets_recommended"]
        note = "" if used is None or used == rec else f"recommended {rec}"
        fam = f["family"]
        table.add_row(escape(f"family {fam[:8]}{'…' if len(fam) > 8 else ''}"), str(f["requests"]),
                      str(f["busiest_rpm"]), f"{used or '-'} -> {rec}", note)
    for k in keys:
        table.add_row(escape(short_key(k["key"])), str(k["requests"]), str(k["busiest_rpm"]), "",
                      "[red]overflow likely[/]" if k["overflow_likely"] else "")
    return table
