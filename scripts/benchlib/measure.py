"""The four measurements: latency, SSE time to first byte, throughput and memory under load."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .client import Conn, HttpError, sim_reset
from .proxies import Proxy
from .stats import children_cpu, idle_seconds, no_gc, proc_cpu, proc_memory, summary_ms
from .workloads import CHAT_PATH, conversations_body

SSE_DELAY_MS = 200  # between the simulator's events in the time-to-first-byte stream


# --- 1. latency --------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    route: str
    path: str
    body: Callable[[int], bytes]
    size: int
    target: float | None
    n: int
    warmup: int
    reset_every: int
    target_ms: float | None = None  # also passes when the overhead is at most this (ms)


async def measure_latency(sc: Scenario, bare: Proxy, addon: Proxy, sim_port: int,
                          rounds: int) -> dict[str, Any]:
    """Sequential requests, bare and addon interleaved (ABBA order) so that a neighbour's load
    spike hits both sides alike; several rounds, each with its own warm-up. With a second bare
    proxy as `addon` this is the A/A run that shows the noise floor."""
    conns = {"bare": Conn(bare.ports[sc.route]), "addon": Conn(addon.ports[sc.route])}
    pairs: list[float] = []
    samples: dict[str, list[float]] = {"bare": [], "addon": []}
    round_ratios = []
    statuses: dict[str, set[int]] = {"bare": set(), "addon": set()}
    i = 0
    try:
        for _ in range(rounds):
            rs: dict[str, list[float]] = {"bare": [], "addon": []}
            with no_gc():
                for k in range(sc.warmup + sc.n):
                    order = ("bare", "addon") if k % 2 == 0 else ("addon", "bare")
                    pair = {}
                    for which in order:
                        body = sc.body(i)
                        t0 = time.perf_counter()
                        status, _ = await conns[which].post(sc.path, body)
                        pair[which] = time.perf_counter() - t0
                        statuses[which].add(status)
                    if k >= sc.warmup:
                        for which, dt in pair.items():
                            rs[which].append(dt)
                        pairs.append(pair["addon"] / pair["bare"])
                    i += 1
                    if sc.reset_every and i % sc.reset_every == 0:
                        await sim_reset(sim_port)
            round_ratios.append(statistics.median(rs["addon"]) / statistics.median(rs["bare"]))
            for which in rs:
                samples[which] += rs[which]
    finally:
        for c in conns.values():
            c.close()
    await sim_reset(sim_port)
    b, a = summary_ms(samples["bare"]), summary_ms(samples["addon"])
    return {
        "name": sc.name, "route": sc.route, "body_bytes": sc.size, "target_ratio": sc.target,
        "target_ms": sc.target_ms,
        "bare": b, "addon": a,
        "ratio_median": a["median_ms"] / b["median_ms"], "ratio_p90": a["p90_ms"] / b["p90_ms"],
        "overhead_median_ms": a["median_ms"] - b["median_ms"],
        # Each pair ran back to back, so its ratio cancels slow drift of the machine's load.
        "paired_ratio_median": statistics.median(pairs),
        "round_ratios": round_ratios,
        "statuses": {k: sorted(v) for k, v in statuses.items()},
        "samples_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in samples.items()},
    }


# --- 2. time to first byte of a slow SSE stream --------------------------------------------------

def measure_ttfb(urls: dict[str, str], runs: int) -> dict[str, Any]:
    """First *body* byte with a raw streaming client (headers alone say nothing: a buffering
    proxy holds them back too). Paths take turns so drift hits all three alike."""
    import httpx2

    body = json.dumps({"model": "gpt-5.6", "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    headers = {"content-type": "application/json", "x-sim-event-delay-ms": str(SSE_DELAY_MS)}
    results: dict[str, dict[str, list[float]]] = {
        k: {"headers": [], "first_byte": [], "total": [], "chunks": []} for k in urls}
    clients = {k: httpx2.Client(timeout=30, trust_env=False) for k in urls}
    try:
        for run in range(runs + 1):  # run 0 is warm-up (connections, imports, first flow)
            order = list(urls)
            if run % 2:
                order.reverse()
            for k in order:
                t0 = time.perf_counter()
                first = None
                chunks = 0
                with clients[k].stream("POST", urls[k], content=body, headers=headers) as r:
                    th = time.perf_counter()
                    if r.status_code != 200:
                        raise RuntimeError(f"TTFB via {k}: HTTP {r.status_code}")
                    for chunk in r.iter_raw():
                        if chunk:
                            chunks += 1
                            if first is None:
                                first = time.perf_counter()
                total = time.perf_counter()
                if run and first is not None:
                    res = results[k]
                    res["headers"].append(th - t0)
                    res["first_byte"].append(first - t0)
                    res["total"].append(total - t0)
                    res["chunks"].append(chunks)
    finally:
        for c in clients.values():
            c.close()
    out: dict[str, Any] = {"event_delay_ms": SSE_DELAY_MS, "runs": runs}
    for k, res in results.items():
        out[k] = {
            "first_byte_median_ms": statistics.median(res["first_byte"]) * 1e3,
            "headers_median_ms": statistics.median(res["headers"]) * 1e3,
            # The stream's own delay, without the proxy hop's fixed cost: what the tap adds.
            "body_after_headers_median_ms": statistics.median(
                f - h for f, h in zip(res["first_byte"], res["headers"], strict=True)) * 1e3,
            "total_median_ms": statistics.median(res["total"]) * 1e3,
            "chunks_median": statistics.median(res["chunks"]),
            "first_byte_ms": [round(x * 1e3, 2) for x in res["first_byte"]],
        }
    out["addon_minus_direct_ms"] = (out["addon"]["first_byte_median_ms"]
                                    - out["direct"]["first_byte_median_ms"])
    out["tap_delay_ms"] = (out["addon"]["body_after_headers_median_ms"]
                           - out["direct"]["body_after_headers_median_ms"])
    return out


# --- 3./4. concurrent load ---------------------------------------------------------------------

@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    statuses: dict[int, int]
    series: list[dict[str, float]] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def run_load(port: int, path: str, total: int, concurrency: int,
                   body: Callable[[int], bytes], *, sim_port: int, reset_every: int,
                   pid: int | None = None, sample_every: int = 0,
                   label: str = "", progress: bool = False) -> LoadResult:
    """`total` requests over `concurrency` keep-alive connections; request k gets body(k)."""
    next_k = 0
    done = 0
    errors = 0
    statuses: dict[int, int] = {}
    series: list[dict[str, float]] = []
    resets: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()

    def sample() -> None:
        if pid is None:
            return
        rss, hwm = proc_memory(pid)
        series.append({"requests": done, "rss_mb": rss / 1024, "hwm_mb": hwm / 1024,
                       "seconds": time.perf_counter() - t0})
        if progress:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"  {label:<6} {done:>7} requests  RSS {rss / 1024:7.1f} MB  "
                  f"peak {hwm / 1024:7.1f} MB  {rate:6.0f} req/s", flush=True)

    async def worker() -> None:
        nonlocal next_k, done, errors
        conn = Conn(port)
        try:
            while next_k < total:
                k = next_k
                next_k += 1
                try:
                    status, _ = await conn.post(path, body(k))
                except HttpError:
                    errors += 1
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                done += 1
                if sample_every and done % sample_every == 0:
                    sample()
                if reset_every and done % reset_every == 0:
                    task = asyncio.create_task(sim_reset(sim_port))
                    resets.add(task)
                    task.add_done_callback(resets.discard)
        finally:
            conn.close()

    sample()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    if resets:
        await asyncio.gather(*resets)
    if sample_every and done % sample_every:
        sample()
    return LoadResult(done, seconds, errors, statuses, series)


async def measure_throughput(proxies: list[Proxy], sim_port: int, total: int,
                             concurrency: int, rounds: int) -> dict[str, Any]:
    """Each proxy in turn serves `total` requests from `concurrency` clients, `rounds` times,
    the order rotated every round so that no proxy always runs first or last. Ratios are to
    proxies[0] in the same round; CPU per request is read from /proc (the proxy, and any worker
    process it started), with the machine's idle cores over the run."""
    body = conversations_body(1000)
    names = [p.name for p in proxies]
    out: dict[str, Any] = {"requests": total, "concurrency": concurrency, "rounds": rounds,
                           "errors": 0, "non_200": 0, "baseline": names[0],
                           "runs": {n: [] for n in names}}
    # Warm all up (connections, imports, first flows) before anything is timed.
    for p in proxies:
        await run_load(p.ports["openai"], CHAT_PATH, concurrency * 4, concurrency, body,
                       sim_port=sim_port, reset_every=0)
    direct = await run_load(sim_port, "/p/openai" + CHAT_PATH, total, concurrency, body,
                            sim_port=sim_port, reset_every=2000)
    out["direct_rps"] = direct.rps
    await sim_reset(sim_port)
    for r in range(rounds):
        shift = r % len(proxies)
        for p in proxies[shift:] + proxies[:shift]:
            cpu0, kids0, idle0 = proc_cpu(p.pid), children_cpu(p.pid), idle_seconds()
            with no_gc():
                res = await run_load(p.ports["openai"], CHAT_PATH, total, concurrency, body,
                                     sim_port=sim_port, reset_every=2000)
            cpu1, kids1, idle1 = proc_cpu(p.pid), children_cpu(p.pid), idle_seconds()
            await sim_reset(sim_port)
            n = max(res.requests, 1)
            out["runs"][p.name].append({
                "rps": res.rps, "cpu_ms": (cpu1 - cpu0) / n * 1e3,
                "worker_cpu_ms": max(kids1 - kids0, 0.0) / n * 1e3,
                "idle_cores": (idle1 - idle0) / res.seconds})
            out["errors"] += res.errors
            out["non_200"] += sum(k for s, k in res.statuses.items() if s != 200)
    base = out["runs"][names[0]]
    out["summary"] = {}
    for name, runs in out["runs"].items():
        ratios = [x["rps"] / b["rps"] for x, b in zip(runs, base, strict=True)]
        out["summary"][name] = {
            "rps_median": statistics.median(x["rps"] for x in runs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "cpu_ms_median": statistics.median(x["cpu_ms"] for x in runs),
            "worker_cpu_ms_median": statistics.median(x["worker_cpu_ms"] for x in runs),
            "idle_cores_median": statistics.median(x["idle_cores"] for x in runs)}
    return out


async def measure_memory(proxy: Proxy, sim_port: int, total: int, conversations: int,
                         concurrency: int) -> dict[str, Any]:
    sample_every = max(total // 10, 1)
    res = await run_load(proxy.ports["openai"], CHAT_PATH, total, concurrency,
                         conversations_body(conversations), sim_port=sim_port,
                         reset_every=2000, pid=proxy.pid, sample_every=sample_every,
                         label=proxy.name, progress=True)
    await sim_reset(sim_port)
    series = res.series
    # Warm-up: every conversation has been seen at least twice (their state is all in place).
    warm_at = min(max(2 * conversations, 2 * sample_every), total)
    warm = next((s for s in series if s["requests"] >= warm_at), series[-1])
    end = series[-1]
    growth_mb = end["rss_mb"] - warm["rss_mb"]
    return {
        "requests": res.requests, "conversations": conversations, "concurrency": concurrency,
        "seconds": res.seconds, "rps": res.rps, "errors": res.errors,
        "non_200": sum(n for s, n in res.statuses.items() if s != 200),
        "series": series, "warm_at_requests": warm["requests"],
        "rss_warm_mb": warm["rss_mb"], "rss_end_mb": end["rss_mb"], "peak_mb": end["hwm_mb"],
        "growth_mb": growth_mb, "growth_ratio": growth_mb / warm["rss_mb"],
    }

