"""`affinity report LOG.jsonl ...`: the command line of the report (views/report.py builds it)."""

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from affinity_addon.views.console import output_console
from affinity_addon.views.pricing import PriceTable
from affinity_addon.views.report import (
    RecordFilter,
    build_report,
    parse_since,
    render_report,
    report_document,
)


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
    p.add_argument("--prices", metavar="YAML",
                   help="price file to use instead of the built-in catalog/prices.yaml (host "
                        "map, overrides; prices otherwise come from genai-prices)")
    p.add_argument("--width", type=_count, default=None, metavar="COLUMNS",
                   help="table width (default: the terminal's; as wide as needed when the "
                        "output is a file or a pipe)")
    p.add_argument("--plain", action="store_true",
                   help="no colours or styles, for logs and CI output")
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
        console = console or output_console(width=getattr(args, "width", None),
                                            plain=getattr(args, "plain", False))
        render_report(report, console, top=args.top)
        if args.html:
            console.print(f"HTML report written to {args.html}")
    if report.stats.malformed:
        err(f"skipped {report.stats.malformed} malformed line(s), first at "
            f"{report.stats.malformed_at[0]}")
    for error in report.stats.errors:
        err(error)
    return 1 if report.stats.errors else 0
