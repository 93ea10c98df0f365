"""The bench's targets, the tables and verdicts it prints, and the JSON it writes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .proxies import ROUTES, Proxy

# Targets, each a ratio to bare mitmdump measured in the same run: a machine that is slow or
# busy today slows both sides alike, where a budget in ms would measure the machine. Close to
# free where the addon only splices a field, more where the breakpoint planner re-encodes a
# 1 MB body, and out of the way of the hosts no rule names.
TARGET_MATCHED_SMALL = 1.05
TARGET_MATCHED_SMALL_MS = 0.25  # ... or at most this many ms more: either passes
TARGET_MATCHED_1MB = 1.15
TARGET_PLANNER_1MB = 1.35
TARGET_UNMATCHED = 1.02
TARGET_TTFB_MS = 5.0
TARGET_THROUGHPUT = 0.90
# "Flat" memory: RSS may grow at most this much from the end of warm-up to the end of the load.
TARGET_RSS_GROWTH = 0.05
RSS_GROWTH_FLOOR_MB = 4.0  # below this the allocator's noise dominates any percentage


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from mitmproxy.version import VERSION

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "mitmproxy": VERSION,
            "platform": platform.platform(), "loadavg": [round(x, 2) for x in load]}


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "[dim]info[/]"
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def check_addon_log(proxy: Proxy) -> dict[str, Any]:
    """Proof that the addon really did its work in the measured path (not a silent no-op)."""
    recs = []
    if proxy.log and proxy.log.exists():
        with proxy.log.open() as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    recs.append(json.loads(line))
    by_rule: dict[str, int] = {}
    spliced = markers = usage = streamed = unmatched = judged = 0
    for r in recs:
        by_rule[r.get("rule") or "?"] = by_rule.get(r.get("rule") or "?", 0) + 1
        added = r.get("added") or {}
        spliced += "prompt_cache_key" in (added.get("fields") or {})
        markers += bool(added.get("markers"))
        usage += r.get("usage") is not None
        streamed += bool(r.get("stream") and r.get("usage"))
        unmatched += r.get("host") == ROUTES["unlisted"][0]
        judged += r.get("miss_reason") is not None
    return {"records": len(recs), "by_rule": by_rule, "prompt_cache_key_added": spliced,
            "markers_added": markers, "with_usage": usage, "streams_with_usage": streamed,
            "unmatched_records": unmatched, "with_verdict": judged}


def throughput_table(th: dict[str, Any], title: str) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(title=f"{title}: {th['concurrency']} concurrent keep-alive clients, "
                    f"{th['requests']} small matched requests per run, {th['rounds']} round(s), "
                    f"order rotated; ratio: to {th['baseline']} in the same round, median "
                    f"(min-max); CPU from /proc; simulator direct {th['direct_rps']:.0f} req/s",
              box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    for col in ("proxy", "req/s", "ratio", "min-max", "proxy CPU ms/req", "worker CPU ms/req",
                "idle cores"):
        t.add_column(col, justify="left" if col == "proxy" else "right", no_wrap=True)
    for name, v in th["summary"].items():
        t.add_row(name, f"{v['rps_median']:.0f}", f"{v['ratio_median']:.3f}x",
                  f"{v['ratio_min']:.3f}-{v['ratio_max']:.3f}", f"{v['cpu_ms_median']:.2f}",
                  f"{v['worker_cpu_ms_median']:.2f}" if v["worker_cpu_ms_median"] else "-",
                  f"{v['idle_cores_median']:.2f}")
    return t


def print_report(console: Any, res: dict[str, Any]) -> list[dict[str, Any]]:
    from rich import box
    from rich.table import Table

    def new_table(title: str) -> Table:
        return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")

    lat = new_table("1. Per-request latency in ms, medians unless p90 (sequential requests, "
                    "bare and addon interleaved; paired: median of back-to-back ratios; A/A: "
                    "two bare proxies, the noise floor)")
    rounds = len(res["latency"][0]["round_ratios"]) if res["latency"] else 0
    cols = ["scenario", "bare", "addon", "ratio", "+ms", "paired", "bare p90", "addon p90",
            "ratio p90"]
    if rounds > 1:
        cols.append("ratio per round")
    for col in cols:
        lat.add_column(col, justify="left" if col in ("scenario", "ratio per round") else "right",
                       no_wrap=True)
    for i, r in enumerate(res["latency"] + res["noise"]):
        cells = [r["name"], f"{r['bare']['median_ms']:.2f}", f"{r['addon']['median_ms']:.2f}",
                 f"{r['ratio_median']:.3f}x", f"{r['overhead_median_ms']:+.2f}",
                 f"{r['paired_ratio_median']:.3f}x",
                 f"{r['bare']['p90_ms']:.2f}", f"{r['addon']['p90_ms']:.2f}",
                 f"{r['ratio_p90']:.3f}x"]
        if rounds > 1:
            cells.append(" ".join(f"{x:.3f}" for x in r["round_ratios"]))
        lat.add_row(*cells, end_section=i == len(res["latency"]) - 1)
    console.print(lat)

    t = res["ttfb"]
    tt = new_table(f"2. Slow SSE stream ({t['event_delay_ms']} ms between events), "
                     f"median of {t['runs']} runs")
    for col in ("path", "first body byte", "headers", "body after headers", "whole stream",
                "chunks"):
        tt.add_column(col, justify="left" if col == "path" else "right")
    for k in ("direct", "bare", "addon"):
        v = t[k]
        tt.add_row(k, f"{v['first_byte_median_ms']:.1f} ms", f"{v['headers_median_ms']:.1f} ms",
                   f"{v['body_after_headers_median_ms']:.1f} ms",
                   f"{v['total_median_ms']:.1f} ms", f"{v['chunks_median']:.0f}")
    console.print(tt)

    th = res["throughput"]
    console.print(throughput_table(th, "3. Throughput"))
    tp = th["summary"]

    mt = new_table("4. RSS under load (MB), one sample every "
                     f"{max(res['memory']['addon']['requests'] // 10, 1)} requests")
    mt.add_column("requests", justify="right")
    mt.add_column("bare RSS", justify="right")
    mt.add_column("addon RSS", justify="right")
    mt.add_column("addon peak", justify="right")
    bare_s, add_s = res["memory"]["bare"]["series"], res["memory"]["addon"]["series"]
    for i, s in enumerate(add_s):
        b = bare_s[i]["rss_mb"] if i < len(bare_s) else float("nan")
        mt.add_row(str(s["requests"]), f"{b:.1f}", f"{s['rss_mb']:.1f}", f"{s['hwm_mb']:.1f}")
    console.print(mt)

    rows: list[dict[str, Any]] = []

    def row(check: str, target: str, measured: str, ok: bool | None, noise: str = "") -> None:
        rows.append({"check": check, "target": target, "measured": measured, "noise": noise,
                     "result": "info" if ok is None else ("PASS" if ok else "MISS")})

    aa = {r["body_bytes"] >= 100_000: r["ratio_median"] for r in res["noise"]}
    for r in res["latency"]:
        tgt, tgt_ms = r["target_ratio"], r.get("target_ms")
        noise = aa.get(r["body_bytes"] >= 100_000)
        target = "-" if not tgt else f"<= {tgt:.2f}x" + (f" or +{tgt_ms:.2f} ms" if tgt_ms else "")
        ok = None if tgt is None else (r["ratio_median"] <= tgt or (
            tgt_ms is not None and r["overhead_median_ms"] <= tgt_ms))
        row(f"latency {r['name']}, addon/bare median", target,
            f"{r['ratio_median']:.3f}x ({r['overhead_median_ms']:+.2f} ms)", ok,
            f"{noise:.3f}x" if noise is not None else "")
    row("SSE first byte, addon - direct", f"<= {TARGET_TTFB_MS:.0f} ms",
        f"{t['addon_minus_direct_ms']:+.1f} ms", t["addon_minus_direct_ms"] <= TARGET_TTFB_MS)
    row("SSE body after headers, addon - direct (the tap alone)", "-",
        f"{t['tap_delay_ms']:+.1f} ms", None)
    row("SSE first byte, bare mitmdump (buffers)", "-",
        f"{t['bare']['first_byte_median_ms']:.0f} ms", None)
    ratio = tp["addon"]["ratio_median"]
    row(f"throughput {th['concurrency']} clients, addon/bare", f">= {TARGET_THROUGHPUT:.2f}x",
        f"{ratio:.3f}x ({tp['addon']['ratio_min']:.3f}-{tp['addon']['ratio_max']:.3f})",
        ratio >= TARGET_THROUGHPUT, f"{tp['bare2']['ratio_median']:.3f}x")
    m = res["memory"]["addon"]
    mb = res["memory"]["bare"]
    limit = max(TARGET_RSS_GROWTH * m["rss_warm_mb"], RSS_GROWTH_FLOOR_MB)
    row(f"addon RSS growth after warm-up ({m['warm_at_requests']} -> {m['requests']} req)",
        f"<= {limit:.1f} MB", f"{m['growth_mb']:+.1f} MB (bare {mb['growth_mb']:+.1f} MB)",
        m["growth_mb"] <= limit)
    row("addon peak RSS (bare peak)", "-", f"{m['peak_mb']:.0f} MB ({mb['peak_mb']:.0f} MB)", None)
    errs = res["errors"]
    row("errors / non-200 responses", "0", str(errs), errs == 0)

    final = new_table("Targets (A/A: the same statistic between two bare proxies; a MISS within "
                      "its distance from 1.000x is noise, not the addon)")
    for col in ("check", "target", "measured", "A/A", "result"):
        final.add_column(col, no_wrap=col != "check")
    for r in rows:
        final.add_row(r["check"], r["target"], r["measured"], r["noise"],
                      verdict(None if r["result"] == "info" else r["result"] == "PASS"))
    console.print(final)
    return rows


def write_out(args: argparse.Namespace, res: dict[str, Any], console: Any) -> None:
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")  # paths as text
        console.print(f"wrote {args.out}")
