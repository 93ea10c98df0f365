"""The two runs of `scripts/bench`: every measurement against bare mitmdump, and --ceiling."""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from tests.procs import free_port

from . import ROOT
from .measure import Scenario, measure_latency, measure_memory, measure_throughput, measure_ttfb
from .proxies import Processes, restart_until_listening, start_proxy, start_simulator
from .report import (
    TARGET_MATCHED_1MB,
    TARGET_MATCHED_SMALL,
    TARGET_MATCHED_SMALL_MS,
    TARGET_PLANNER_1MB,
    TARGET_UNMATCHED,
    check_addon_log,
    machine_info,
)
from .workloads import CHAT_PATH, MESSAGES_PATH, anthropic_body, openai_body, stepped

VARIANTS = ROOT / "scripts" / "variants"


async def run_ceiling(args: argparse.Namespace, procs: Processes, tmp: Path,
                      console: Any) -> dict[str, Any]:
    """Throughput of the addon's variants against bare mitmdump: how much of the addon's cost
    under load is the rewrite (which must run on mitmproxy's loop) and how much the deferred
    work (which could move), and whether moving it to a second process wins it back."""
    info = machine_info()
    console.print(f"[bold]affinity bench --ceiling[/] CPU {info['cpu']}, {info['cores']} cores, "
                  f"Python {info['python']}, mitmproxy {info['mitmproxy']}")
    t_start = time.perf_counter()
    _, sim_port = start_simulator(procs, tmp)
    specs: list[tuple[str, bool, dict[str, str] | None, Path | None]] = [
        ("bare", False, None, None),
        ("bare (A/A)", False, None, None),
        ("addon", True, None, None),
        ("diagnosis off", True, {"affinity_diagnose": "false"}, None),
        ("rewrite only", True, None, VARIANTS / "rewrite_only.py"),
        ("worker process", True, None, VARIANTS / "worker_split.py"),
    ]
    proxies = []
    for name, addon, options, script in specs:
        proxies.append(start_proxy(procs, tmp, name.replace(" ", "-").replace("/", ""),
                                   sim_port, addon=addon, options=options, script=script))
    proxies = [restart_until_listening(procs, p, tmp, sim_port) for p in proxies]
    for p, (name, *_) in zip(proxies, specs, strict=True):
        p.name = name
    res: dict[str, Any] = {"machine": info, "config": {
        k: v for k, v in vars(args).items() if k != "out"}}
    res["throughput"] = await measure_throughput(proxies, sim_port, args.tp_requests,
                                                 args.concurrency, args.tp_rounds)
    res["errors"] = res["throughput"]["errors"] + res["throughput"]["non_200"]
    # The worker's records are the proof that it did the deferred work, verdicts included. They
    # trail the proxy (a pipe, then a process that needs ~0.5 s to import its modules), so a short
    # run read while the proxy runs found 0, 13 or 40 of 56. Read them once the proxy has stopped:
    # its shutdown hands the worker what is left and waits for it (at most 30 s).
    Processes.stop(proxies[-1].proc, timeout=40.0)
    res["worker_log"] = check_addon_log(proxies[-1])
    res["seconds"] = time.perf_counter() - t_start
    return res


async def run(args: argparse.Namespace, procs: Processes, tmp: Path, console: Any) -> dict[str, Any]:
    info = machine_info()
    console.print(f"[bold]affinity bench[/] {'(quick) ' if args.quick else ''}"
                  f"CPU {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
                  f"Python {info['python']}, mitmproxy {info['mitmproxy']}, "
                  f"load average {' '.join(map(str, info['loadavg']))}")
    t_start = time.perf_counter()
    _, sim_port = start_simulator(procs, tmp)
    bare = start_proxy(procs, tmp, "bare", sim_port, addon=False)
    addon = start_proxy(procs, tmp, "addon", sim_port, addon=True)
    # A second bare proxy: bare against bare shows how far apart two identical proxies measure
    # on this machine today, the yardstick for every small ratio below.
    bare2 = start_proxy(procs, tmp, "bare2", sim_port, addon=False)
    bare = restart_until_listening(procs, bare, tmp, sim_port)
    addon = restart_until_listening(procs, addon, tmp, sim_port)
    bare2 = restart_until_listening(procs, bare2, tmp, sim_port)
    # The addon again with every exporter on: /metrics and OTel spans to a collector that is
    # not there (the worst case: every export fails). Exporters must not slow the request path.
    exp_options = {"affinity_metrics": f"127.0.0.1:{free_port()}"}
    if importlib.util.find_spec("opentelemetry.sdk") is not None:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        exp_options["affinity_otel"] = "true"
    exporters = start_proxy(procs, tmp, "exporters", sim_port, addon=True, options=exp_options)
    exporters = restart_until_listening(procs, exporters, tmp, sim_port)
    console.print(f"simulator :{sim_port} (pid {procs.procs[0][1].pid}); "
                  f"bare mitmdump pid {bare.pid}, second bare pid {bare2.pid}, "
                  f"mitmdump+addon pid {addon.pid}; listeners (bare) {bare.ports}")

    small = openai_body(2000)
    big = openai_body(1_000_000)
    big_anthropic = anthropic_body(1_000_000)
    scenarios = [
        Scenario("matched openai 2 KB (splice)", "openai", CHAT_PATH, stepped(small),
                 len(small), TARGET_MATCHED_SMALL, args.small_n, 20, 200,
                 TARGET_MATCHED_SMALL_MS),
        Scenario("matched openai 1 MB (splice)", "openai", CHAT_PATH, stepped(big),
                 len(big), TARGET_MATCHED_1MB, args.big_n, 4, 10),
        Scenario("matched anthropic 1 MB (planner)", "anthropic", MESSAGES_PATH,
                 stepped(big_anthropic), len(big_anthropic), TARGET_PLANNER_1MB,
                 args.big_n, 4, 10),
        Scenario("unmatched 2 KB", "unlisted", CHAT_PATH, stepped(small), len(small),
                 TARGET_UNMATCHED, args.small_n, 20, 200),
        Scenario("unmatched 1 MB", "unlisted", CHAT_PATH, stepped(big), len(big),
                 TARGET_UNMATCHED, args.big_n, 4, 10),
    ]
    res: dict[str, Any] = {"machine": info, "config": {
        k: v for k, v in vars(args).items() if k != "out"}, "latency": []}
    phases: dict[str, float] = {"startup": time.perf_counter() - t_start}
    res["phases"] = phases
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    console.print("[bold]1. latency[/] ...")
    for sc in scenarios:
        r = await measure_latency(sc, bare, addon, sim_port, args.rounds)
        console.print(f"   {sc.name}: {r['ratio_median']:.3f}x "
                      f"({r['bare']['median_ms']:.2f} -> {r['addon']['median_ms']:.2f} ms)")
        res["latency"].append(r)
    res["noise"] = []
    for sc in (Scenario("A/A: bare vs bare, 2 KB", "unlisted", CHAT_PATH, stepped(small),
                        len(small), None, args.small_n, 20, 200),
               Scenario("A/A: bare vs bare, 1 MB", "unlisted", CHAT_PATH, stepped(big),
                        len(big), None, args.big_n, 4, 10)):
        r = await measure_latency(sc, bare, bare2, sim_port, args.rounds)
        console.print(f"   {sc.name}: {r['ratio_median']:.3f}x")
        res["noise"].append(r)
    res["exporters"] = []
    for sc in (Scenario("addon vs addon+exporters, matched 2 KB", "openai", CHAT_PATH,
                        stepped(small), len(small), None, args.small_n, 20, 200),):
        r = await measure_latency(sc, addon, exporters, sim_port, args.rounds)
        console.print(f"   {sc.name} ({', '.join(exp_options)}): {r['ratio_median']:.3f}x "
                      f"({r['bare']['median_ms']:.2f} -> {r['addon']['median_ms']:.2f} ms)")
        res["exporters"].append(r)
    phase("latency")

    console.print("[bold]2. SSE time to first byte[/] ...")
    urls = {"direct": f"http://127.0.0.1:{sim_port}/p/openai{CHAT_PATH}",
            "bare": f"http://127.0.0.1:{bare.ports['openai']}{CHAT_PATH}",
            "addon": f"http://127.0.0.1:{addon.ports['openai']}{CHAT_PATH}"}
    # Blocking on purpose: nothing else runs meanwhile, and Ctrl-C must not wait for a thread.
    res["ttfb"] = measure_ttfb(urls, args.ttfb_runs)
    phase("ttfb")

    console.print(f"[bold]3. throughput[/], {args.concurrency} clients ...")
    # The second bare proxy too: its ratio to the first is the A/A noise of this figure.
    res["throughput"] = await measure_throughput([bare, addon, bare2], sim_port,
                                                 args.tp_requests, args.concurrency,
                                                 args.tp_rounds)
    phase("throughput")

    console.print(f"[bold]4. memory[/]: {args.requests} requests over {args.conversations} "
                  f"conversations, {args.concurrency} clients, per proxy ...")
    res["memory"] = {}
    for p in (bare, addon):
        res["memory"][p.name] = await measure_memory(p, sim_port, args.requests,
                                                     args.conversations, args.concurrency)
    phase("memory")

    res["addon_log"] = check_addon_log(addon)
    lat_errors = sum(1 for r in res["latency"] + res["noise"] + res["exporters"]
                     for v in r["statuses"].values() if v != [200])
    res["errors"] = (lat_errors + res["throughput"]["errors"] + res["throughput"]["non_200"]
                     + sum(m["errors"] + m["non_200"] for m in res["memory"].values()))
    res["seconds"] = time.perf_counter() - t_start
    return res
