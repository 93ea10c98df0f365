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
import contextlib
import gc
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The simulator and the process helpers are dev tools in tests/, not part of the wheel.
sys.path.insert(0, str(ROOT))

from tests.procs import clean_env, free_port, listening_port, wait_port  # noqa: E402

ADDON = ROOT / "affinity_addon" / "addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"

# Listener name -> (host the client believes it talks to, simulator provider that plays it).
ROUTES: dict[str, tuple[str, str]] = {
    "openai": ("api.openai.com", "openai"),
    "anthropic": ("api.anthropic.com", "anthropic"),
    "unlisted": ("llm.unlisted.test", "openai"),  # no rule names it: the addon must stay out
}
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
SSE_DELAY_MS = 200

# Targets (issue 12): ratios against bare mitmdump in the same run.
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


# --- processes ---------------------------------------------------------------------------------

class Processes:
    """Every child this script starts; `stop_all` ends them by PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.procs.append((name, proc))

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            self.stop(proc)




def start_simulator(procs: Processes, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    err = (tmp / "simulator.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sim", "--port", "0", "--replicas", "4"],
        stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT, env=clean_env())
    procs.add("simulator", proc)
    return proc, listening_port(proc)


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path | None
    output: Path
    options: dict[str, str] | None = None
    script: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_proxy(procs: Processes, tmp: Path, name: str, sim_port: int, *, addon: bool,
                options: dict[str, str] | None = None, script: Path | None = None) -> Proxy:
    d = tmp / name
    d.mkdir()
    ports = {route: free_port() for route in ROUTES}
    sim_url = f"http://127.0.0.1:{sim_port}"
    # flow_detail=0: no per-flow console line, so the proxies' own printing does not drown the
    # addon's cost; both proxies get exactly the same flags.
    args = [str(MITMDUMP), "--set", f"confdir={d / 'confdir'}",
            "--set", "connection_strategy=lazy", "--set", "upstream_cert=false",
            "--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]
    for route, (host, provider) in ROUTES.items():
        args += ["--mode", f"reverse:https://{host}@127.0.0.1:{ports[route]}",
                 "--map-remote", f"#^https?://{re.escape(host)}(:443)?/#{sim_url}/p/{provider}/"]
    log = None
    if addon:
        log = d / "affinity.jsonl"
        args += ["-s", str(script or ADDON), "--set", f"affinity_log={log}",
                 "--set", "affinity_summary=false"]
    for k, v in (options or {}).items():
        args += ["--set", f"{k}={v}"]
    output = d / "output.txt"
    with output.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=d, env=clean_env())
    procs.add(name, proc)
    return Proxy(name, proc, ports, log, output, options, script)


def wait_proxy(proxy: Proxy) -> None:
    try:
        for port in proxy.ports.values():
            wait_port(port, proxy.proc, proxy.name)
    except Exception as e:
        text = proxy.output.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{proxy.name} did not start: {e}\n{text}") from None


def restart_until_listening(procs: Processes, proxy: Proxy, tmp: Path, sim_port: int) -> Proxy:
    # Ports come from bind-to-0-and-release, so another process may take one before mitmdump
    # binds it (other test runs share this machine): start again on fresh ports then.
    for attempt in range(3):
        try:
            wait_proxy(proxy)
            return proxy
        except RuntimeError:
            Processes.stop(proxy.proc)
            if attempt == 2 or "address already in use" not in (
                    proxy.output.read_text(errors="replace").lower()):
                raise
            shutil.rmtree(tmp / proxy.name, ignore_errors=True)
            proxy = start_proxy(procs, tmp, proxy.name, sim_port, addon=proxy.log is not None,
                                options=proxy.options, script=proxy.script)
    raise AssertionError("unreachable")


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


# --- a minimal HTTP/1.1 keep-alive client ------------------------------------------------------
# Raw asyncio streams: the client shares two cores with the proxy and the simulator, so it must
# cost as little as possible and the same for both proxies.

class HttpError(Exception):
    pass


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def head(self, path: str, length: int, extra: str = "") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
                f"User-Agent: affinity-bench\r\n{extra}\r\n").encode()

    async def post(self, path: str, body: bytes) -> tuple[int, int]:
        """(status, response body bytes). Reconnects when the server closed the connection."""
        for attempt in (0, 1):
            if self.writer is None:
                await self._open()
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(self.head(path, len(body)) + body)
                await self.writer.drain()
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                self.close()
                if attempt:
                    raise HttpError(f"port {self.port}: {type(e).__name__}") from None
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, int]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        n = 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b""):
                        pass
                    break
                n += len(await self.reader.readexactly(size + 2)) - 2
        elif "content-length" in headers:
            n = len(await self.reader.readexactly(int(headers["content-length"])))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, n


async def sim_reset(sim_port: int) -> None:
    # The simulator records every request with its body: forget them now and then, or a long
    # run would grow the simulator to gigabytes and slow both proxies' upstream alike.
    c = Conn(sim_port)
    try:
        await c.post("/_sim/reset", b"")
    finally:
        c.close()


# --- request bodies ----------------------------------------------------------------------------
# Synthetic but agent-shaped: a long system prompt, tools, and many turns of tool calls with
# file-sized results. The text is random code-ish words (never anyone's real prompt).

_WORD_TEXT = ("def return self value index buffer request response token cache stream parse error "
          "config module import class async await yield lambda struct impl trait match none "
          "result option vector string bytes offset length header field path route client "
          "server socket timeout retry backoff session affinity prefix hash digest encode "
          "decode json yaml schema model usage input output read write flush close open")
_WORDS = tuple(_WORD_TEXT.split())


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def code_block(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        indent = "    " * rng.randrange(4)
        out.append(f"{indent}{words(rng, rng.randrange(3, 11))}  # {i}")
    return "\n".join(out)


STEP = "__STEP_000000__"  # fixed-width placeholder for the per-request varying part


def _tools_openai(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}_{rng.choice(_WORDS)}", "description": words(rng, 40),
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": words(rng, 12)},
            "content": {"type": "string", "description": words(rng, 12)}},
            "required": ["path"]}}} for i in range(n)]


def openai_body(size: int, seed: int = 1) -> bytes:
    """An OpenAI chat body of about `size` bytes with a STEP placeholder in the last message."""
    rng = random.Random(seed)
    big = size >= 100_000
    system = words(rng, 6000 if big else 120)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": words(rng, 30)}]
    body: dict[str, Any] = {"model": "gpt-5.6", "messages": messages,
                            "tools": _tools_openai(rng, 24 if big else 1)}
    turn = 0
    total = len(json.dumps(body))
    while total < size - 100:
        call_id = f"call_{turn:04d}"
        new = [{"role": "assistant", "content": None, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": "read_file",
                                 "arguments": json.dumps({"path": f"src/mod_{turn}.py"})}}]},
               {"role": "tool", "tool_call_id": call_id,
                "content": code_block(rng, rng.randrange(60, 160) if big else 2)}]
        messages += new
        total += len(json.dumps(new))
        turn += 1
    messages.append({"role": "user", "content": f"Now run the tests ({STEP})."})
    return json.dumps(body, separators=(",", ":")).encode()


def anthropic_body(size: int, seed: int = 2) -> bytes:
    """An Anthropic Messages body without any cache_control: the planner must add markers."""
    rng = random.Random(seed)
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5", "max_tokens": 4096,
        "system": [{"type": "text", "text": words(rng, 6000)}],
        "tools": [{"name": f"tool_{i}", "description": words(rng, 40),
                   "input_schema": {"type": "object", "properties": {
                       "path": {"type": "string", "description": words(rng, 12)}}}}
                  for i in range(24)],
        "messages": [{"role": "user", "content": [{"type": "text", "text": words(rng, 30)}]}]}
    messages = body["messages"]
    turn = 0
    total = len(json.dumps(body))
    while total < size - 200:
        tid = f"toolu_{turn:04d}"
        new = [{"role": "assistant", "content": [
                   {"type": "text", "text": words(rng, 12)},
                   {"type": "tool_use", "id": tid, "name": "read_file",
                    "input": {"path": f"src/mod_{turn}.py"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": tid,
                    "content": code_block(rng, rng.randrange(60, 160))}]}]
        messages += new
        total += len(json.dumps(new))
        turn += 1
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "Done."}]})
    messages.append({"role": "user", "content": [{"type": "text",
                                                  "text": f"Now run the tests ({STEP})."}]})
    return json.dumps(body, separators=(",", ":")).encode()


def stepped(template: bytes) -> Callable[[int], bytes]:
    placeholder = STEP.encode()
    assert template.count(placeholder) == 1
    head, tail = template.split(placeholder)
    return lambda i: head + f"__STEP_{i:06d}__".encode() + tail


_CONV_SYSTEM = "You are a coding agent working in a git repository. " * 8


def conversation_body(c: int, t: int) -> bytes:
    """Turn `t` of conversation `c`: small, and only appended to from turn to turn."""
    messages = [{"role": "system", "content": f"{_CONV_SYSTEM}Project #{c}."},
                {"role": "user", "content": f"Fix issue {c} in module {c % 97}."}]
    for j in range(t):
        messages += [{"role": "assistant", "content": f"Step {j} done."},
                     {"role": "user", "content": f"Continue with step {j + 1}."}]
    return json.dumps({"model": "gpt-5.6", "messages": messages},
                      separators=(",", ":")).encode()


# --- statistics --------------------------------------------------------------------------------

def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3,
            "p90_ms": quantile(xs, 0.9) * 1e3, "min_ms": min(xs) * 1e3}


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    # The client's own collector pauses would land in random samples of either proxy.
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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


TURNS = 10  # a conversation's turns before its agent starts a new session on the same prompt


def conversations_body(conversations: int) -> Callable[[int], bytes]:
    # Request k is the next turn of conversation c = k % C, every conversation stays in play, and
    # their turns are staggered (c starts at turn c % TURNS and wraps after the last): from the
    # first C requests on, the mix of conversation lengths, and so the addon's state for them, is
    # the same at every moment. Any RSS growth after that is a leak, not a longer history.
    def body(k: int) -> bytes:
        c = k % conversations
        return conversation_body(c, (k // conversations + c) % TURNS)

    return body


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, with its reaped children's (a live child, such
    as the ceiling's worker process, is counted by `children_cpu`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu(pid: int) -> float:
    total = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    total += proc_cpu(int(child))
    return total


def idle_seconds() -> float:
    """Idle CPU seconds of the whole machine so far (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[4]) / os.sysconf("SC_CLK_TCK")


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


# --- report ------------------------------------------------------------------------------------

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


# --- main --------------------------------------------------------------------------------------

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
    # The worker's records are the proof that it did the deferred work, verdicts included.
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


def write_out(args: argparse.Namespace, res: dict[str, Any], console: Any) -> None:
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        console.print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=150)  # logs: wide enough for the tables
    procs = Processes()
    # SIGTERM must unwind through the finally below exactly like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="affinity-bench-"))
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
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
