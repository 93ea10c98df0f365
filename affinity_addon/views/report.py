"""`affinity report`: read JSONL logs, filter, aggregate, print tables / JSON / an HTML page.

Logs are streamed line by line (one `json.loads` each), so a 100 MB log takes seconds and little
memory. Several proxy instances may write several files; they are simply read one after another.
A line that is not a JSON object (a torn write, a stray edit) is counted and skipped.
"""

import argparse
import fnmatch
import gzip
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from affinity_addon.views.aggregate import (
    Aggregator,
    Bucket,
    bucket_table,
    fmt_cost,
    fmt_ratio,
    fmt_tokens,
    reasons_table,
    top_buckets,
    totals_line,
)
from affinity_addon.views.pricing import TOKEN_EQUIVALENTS, PriceTable

logger = logging.getLogger(__name__)

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str) -> datetime:
    """An ISO-8601 time as an aware UTC datetime; naive times are taken as UTC (the log's zone)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO-8601 time: {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO time, or an age such as `30m`, `2h`, `7d`, `1w` before now."""
    m = _RELATIVE.match(text)
    if m:
        now = now or datetime.now(UTC)
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])
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
        return gzip.open(path, "rb")
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


def build_report(paths: Sequence[str | Path], flt: RecordFilter | None = None,
                 prices: PriceTable | None = None) -> Report:
    flt = flt or RecordFilter()
    stats = ReadStats()
    agg = Aggregator(prices)
    memo: dict[str, bool] = {}
    trivial = flt == RecordFilter()
    add = agg.add
    for record in iter_records(paths, stats):
        if trivial or flt.accepts(record, memo):
            add(record)
        else:
            stats.filtered_out += 1
    return Report(agg, stats, flt)


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
        "conversations": len(agg.by_conversation),
        "by_conversation": [b.to_dict(examples=False) for b in convs],
        "by_reason": [b.to_dict(examples=False) for b in top_buckets(agg.by_reason)],
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
    n_conv = len(agg.by_conversation)
    console.print(bucket_table(
        f"Top {min(top, n_conv) if top else n_conv} of {n_conv} conversations by prompt tokens",
        top_buckets(agg.by_conversation, top or None), "conversation", id_like=True,
        width=width))
    if agg.total.miss_reasons:
        console.print(reasons_table(agg.total, top=top or None))
    rows = dry_run_rows(agg)
    if rows:
        console.print(dry_run_table(rows, agg.total))
    console.print("[dim]Costs cover prompt tokens only: USD where the model's base price is known, "
                  "else input-token equivalents (teq). Hit tok = share of prompt tokens read from "
                  "cache; hit req = share of requests that read any.[/]")


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


# --- command line ---------------------------------------------------------------------------

def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="summarize JSONL logs: hit ratios, costs, miss reasons",
        description="Summarize one or more affinity JSONL logs (several proxy instances may "
                    "each have written one).")
    p.add_argument("logs", nargs="+", metavar="LOG.jsonl", help="log files (.gz is fine)")
    p.add_argument("--since", help="only records at or after this ISO time or age (30m, 2h, 7d)")
    p.add_argument("--model", help="only models matching this glob (case-insensitive)")
    p.add_argument("--session", help="only conversations whose affinity ID starts with this")
    p.add_argument("--top", type=_count, default=10, help="conversations to list (0: all)")
    p.add_argument("--json", action="store_true", help="print one JSON document, no tables")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument("--prices", metavar="YAML", help="price table to use instead of the built-in")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, *, console: Console | None = None,
        out: IO[str] | None = None) -> int:
    def err(message: str) -> None:
        print(f"affinity report: {message}", file=sys.stderr)

    try:
        since = parse_since(args.since) if args.since else None
        prices = PriceTable.load(args.prices) if args.prices else None
    except (ValueError, OSError) as e:
        err(str(e))
        return 2
    missing = [p for p in args.logs if not Path(p).is_file()]
    if missing:
        err(f"no such file: {', '.join(missing)}")
        return 2
    flt = RecordFilter(since=since, model=args.model, session=args.session)
    report = build_report(args.logs, flt, prices)
    if args.html:
        from affinity_addon.views.html import write_html

        write_html(report, args.html, top=args.top)
    if args.json:
        out = out or sys.stdout
        json.dump(report_document(report, top=args.top), out, indent=2)
        out.write("\n")
    else:
        render_report(report, console or Console(), top=args.top)
        if args.html:
            (console or Console()).print(f"HTML report written to {args.html}")
    if report.stats.malformed:
        err(f"skipped {report.stats.malformed} malformed line(s), first at "
            f"{report.stats.malformed_at[0]}")
    for error in report.stats.errors:
        err(error)
    return 1 if report.stats.errors else 0
