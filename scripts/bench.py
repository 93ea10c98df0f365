"""Benchmark the affinity addon against bare mitmdump, in one run on this machine.

    scripts/bench [--quick] [--requests N] [--out bench.json]
    scripts/bench --ceiling [--quick]   only the throughput, of the addon's variants

Starts the simulator, a bare mitmdump and a mitmdump with the addon (same binary, same flags,
the only difference is `-s affinity_addon/addon.py`), all on 127.0.0.1 ephemeral ports, and
measures:

1. per-request latency, sequential, for matched 2 KB / 1 MB OpenAI bodies (prompt_cache_key
   splice), a 1 MB Anthropic body without client markers (the breakpoint planner
   re-serializes) and unmatched 2 KB / 1 MB bodies to a host no rule names;
2. time to the first body byte of a slow SSE stream: direct, bare, addon;
3. throughput with 32 concurrent keep-alive clients;
4. RSS of both proxies under a long load over many conversations (flat after warm-up?).

Every addon/bare comparison is a ratio measured in this run, so a slow or busy machine slows
both sides alike; a second bare mitmdump measured against the first (A/A) shows how far apart
two identical proxies measure today. The proxies run in reverse mode (plain HTTP, no TLS in the
measurement) with one listener per upstream host and `--map-remote` to the simulator, as
tests/harness.py does. Exit status: 0 when every target passes, 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

# benchlib lives next to this file; a loader by path (importlib) does not put this directory on
# sys.path the way `python scripts/bench.py` does.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.proxies import Processes  # noqa: E402
from benchlib.report import print_report, throughput_table, write_out  # noqa: E402
from benchlib.runs import run, run_ceiling  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small counts everywhere: a smoke run in under a minute")
    p.add_argument("--requests", type=int, default=None,
                   help="requests of the memory run, per proxy (default 100000; quick 2000)")
    p.add_argument("--conversations", type=int, default=None,
                   help="conversations the memory run cycles through (default 10000; quick 200)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="concurrent keep-alive clients for throughput and memory (default 32)")
    p.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the processes' files (logs, proxy output) in this empty folder")
    p.add_argument("--ceiling", action="store_true",
                   help="only the throughput, for the addon's variants (diagnosis off, rewrite "
                        "only, deferred work in a worker process): what bounds it")
    p.add_argument("--tp-requests", type=int, default=None,
                   help="throughput requests per proxy and round (default 2000; quick 500)")
    p.add_argument("--tp-rounds", type=int, default=None,
                   help="throughput rounds (default 6; quick 2)")
    a = p.parse_args(argv)
    q = a.quick
    a.requests = a.requests or (2000 if q else 100_000)
    a.conversations = a.conversations or (200 if q else 10_000)
    a.rounds = 1 if q else 3
    a.small_n = 40 if q else 150
    a.big_n = 8 if q else 40
    a.ttfb_runs = 3 if q else 7
    a.tp_requests = a.tp_requests or (500 if q else 2000)
    a.tp_rounds = a.tp_rounds or (2 if q else 6)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=150)  # logs: wide enough for the tables
    procs = Processes()
    # SIGTERM must unwind through the finally below exactly like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="affinity-bench-"))
    try:
        if args.ceiling:
            res = asyncio.run(run_ceiling(args, procs, tmp, console))
            console.print(throughput_table(res["throughput"], "Throughput ceiling"))
            log = res["worker_log"]
            console.print(f"worker process log: {log['records']} records, "
                          f"{log['with_verdict']} with a verdict; errors / non-200 "
                          f"{res['errors']}; finished in {res['seconds']:.0f} s")
            write_out(args, res, console)
            return 0 if res["errors"] == 0 else 1
        res = asyncio.run(run(args, procs, tmp, console))
        rows = print_report(console, res)
        res["targets"] = rows
        log = res["addon_log"]
        console.print(f"addon log: {log['records']} records, prompt_cache_key spliced in "
                      f"{log['prompt_cache_key_added']}, markers added in "
                      f"{log['markers_added']}, streams with usage {log['streams_with_usage']}, "
                      f"records for the unmatched host {log['unmatched_records']} (must be 0)")
        console.print(f"finished in {res['seconds']:.0f} s ("
                      + ", ".join(f"{k} {v:.0f} s" for k, v in res["phases"].items()) + ")")
        write_out(args, res, console)
        return 0 if all(r["result"] != "MISS" for r in rows) else 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
