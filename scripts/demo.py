"""See what the addon does in about 20 seconds: the same coding-agent session, twice.

    scripts/demo [--agent grok|openrouter-claude|openai-team] [--no-live]

Starts a simulated provider (4 replicas, each with its own prompt cache) behind each of two
proxies, a bare mitmdump and a mitmdump with the addon, all on 127.0.0.1 ephemeral ports. Then it
plays one agent session (a big system prompt, tools, tool calls and their results appended turn
after turn) through both proxies with the official `openai` SDK, and shows per turn what the
provider cached, with and without the addon, next to the addon's own log verdict.

Each proxy gets its own simulator so that neither session can warm the other's cache. Nothing
leaves the machine: the proxies run in reverse mode and `--map-remote` sends the provider's host
to the simulator, like the end-to-end tests do.

`--agent openai-team` is issue 11's OpenAI case instead: a solo agent (6 conversations one after
another, ~3 RPM) and a team (24 agents at once, ~70 RPM for 10 minutes) sharing one ~8k-token
prompt, through three mitmdumps (without the addon, one `prompt_cache_key` per conversation as
the old default, the shipped `{family_key}`) against a simulator of OpenAI's routing (8
machines). The traffic runs on virtual time: every request carries `x-sim-time`, which the
simulator serves it at and `tests/sim/clock_addon.py` makes the flow's start time, so ten minutes
of a team take seconds. It prints the token-weighted hit ratio over all turns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent
# The simulator and the process helpers are dev tools in tests/, not part of the wheel.
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, listening_port  # noqa: E402
from tests.sim.workload import SOLO, TEAM, HttpUpstream, Result, Workload, run  # noqa: E402

ADDON = ROOT / "affinity_addon" / "addon.py"
CLOCK = ROOT / "tests" / "sim" / "clock_addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
EVENT_DELAY = 0.05  # seconds between SSE events: a short stream, long enough to see buffering


@dataclass(frozen=True)
class Agent:
    title: str
    host: str  # the provider host the agent talks to
    provider: str  # the simulator provider that plays it
    base_path: str  # the SDK's base URL path
    model: str
    what: str  # what the addon adds for this provider


AGENTS = {
    "grok": Agent("a Grok coding agent on xAI", "api.x.ai", "xai", "/v1", "grok-4",
                  "x-grok-conv-id header: every turn lands on the server that holds its cache"),
    "openrouter-claude": Agent(
        "a Claude coding agent via OpenRouter", "openrouter.ai", "openrouter", "/api/v1",
        "anthropic/claude-sonnet-4.5",
        "cache_control breakpoints (Claude caches nothing unmarked) and a session_id"),
}


# --- the agent session -------------------------------------------------------------------------
# A plausible coding-agent transcript: the same requests an agent loop would send, with the
# model's tool calls scripted (the simulator answers every request with a short "ok").

SYSTEM_PROMPT = "\n".join([
    "You are Forge, an autonomous coding agent working inside the user's git repository.",
    "Work in small verified steps: search, read, edit, then run the tests.",
    *[f"Rule {i}: " + line for i, line in enumerate([
        "Never edit files outside the repository root; ask before deleting anything.",
        "Prefer the project's own helpers over new dependencies; match the surrounding style.",
        "Read a file before editing it, and edit the smallest region that fixes the problem.",
        "Run the narrowest relevant tests first, then the whole suite before you finish.",
        "Explain a non-obvious change in one short comment that says why, not what.",
        "When a tool fails, read its error output carefully before trying again.",
        "Keep secrets out of logs, commits and messages; never print environment variables.",
        "Summarize what you changed and how you verified it in at most five lines.",
    ] * 12, 1)],
    "Repository conventions: Python 3.12, pytest, ruff with line length 100, type hints on "
    "every public function, docstrings on modules and classes.",
    "Environment: cwd=/home/dev/shop, shell=bash, os=linux, git branch=main, tests=pytest -q.",
])

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": props,
                       "required": list(props)[:1]}}}
    for name, desc, props in [
        ("grep", "Search the repository for a regular expression; returns path:line:text.",
         {"pattern": {"type": "string", "description": "Python regular expression"},
          "path": {"type": "string", "description": "directory to search, default ."}}),
        ("read_file", "Read a UTF-8 text file; returns its content with line numbers.",
         {"path": {"type": "string", "description": "file path relative to the root"}}),
        ("edit_file", "Replace an exact, unique snippet of a file with new text.",
         {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}),
        ("run", "Run a shell command in the repository; returns exit status and output.",
         {"command": {"type": "string", "description": "the command line"},
          "timeout": {"type": "integer", "description": "seconds, default 120"}}),
    ]
]

PRICING_PY = "\n".join(
    f"{i + 1:4d}  {line}" for i, line in enumerate([
        '"""Cart totals: subtotal, coupons, shipping and tax."""',
        "from decimal import Decimal",
        "",
        "def subtotal(items):",
        "    return sum(i.price * i.qty for i in items)",
        "",
        "def apply_coupon(total, coupon):",
        "    if coupon.kind == 'percent':",
        "        return total * coupon.value / 100  # BUG: the discount, not the new total",
        "    return max(total - coupon.value, Decimal(0))",
        "",
        "def cart_total(items, coupon=None, shipping=Decimal(0)):",
        "    total = subtotal(items)",
        "    if coupon:",
        "        total = apply_coupon(total, coupon)",
        "    return total + shipping",
    ] * 6))

# (what the agent's previous step was, for the table; the assistant message; the tool result)
STEPS: list[tuple[str, dict[str, Any], str]] = [
    ("grep apply_coupon", {"name": "grep", "arguments": {"pattern": "apply_coupon"}},
     "src/cart/pricing.py:7:def apply_coupon(total, coupon):\n"
     "src/cart/pricing.py:15:        total = apply_coupon(total, coupon)\n"
     "tests/test_pricing.py:12:    assert apply_coupon(Decimal(100), pct(10)) == Decimal(90)"),
    ("read src/cart/pricing.py", {"name": "read_file",
                                  "arguments": {"path": "src/cart/pricing.py"}}, PRICING_PY),
    ("run the coupon tests", {"name": "run",
                              "arguments": {"command": "pytest -q tests/test_pricing.py"}},
     "F.\nFAILED tests/test_pricing.py::test_percent_coupon - assert Decimal('10') == "
     "Decimal('90')\n1 failed, 1 passed in 0.04s"),
    ("edit apply_coupon", {"name": "edit_file", "arguments": {
        "path": "src/cart/pricing.py",
        "old": "return total * coupon.value / 100",
        "new": "return total - total * coupon.value / 100"}}, "ok: 1 replacement"),
    ("re-run the coupon tests", {"name": "run",
                                 "arguments": {"command": "pytest -q tests/test_pricing.py"}},
     "..\n2 passed in 0.03s"),
    ("run the whole suite", {"name": "run", "arguments": {"command": "pytest -q"}},
     "........................................\n40 passed in 0.61s"),
    ("git diff", {"name": "run", "arguments": {"command": "git diff --stat"}},
     " src/cart/pricing.py | 2 +-\n 1 file changed, 1 insertion(+), 1 deletion(-)"),
]
FIRST_USER = ("The checkout page shows the wrong total when a percent coupon is applied. "
              "Find the bug, fix it, and make sure the tests pass.")


def transcript(turn: int) -> list[dict[str, Any]]:
    """The messages of request `turn` (0-based): each turn appends a tool call and its result."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": FIRST_USER}]
    for i, (_, call, result) in enumerate(STEPS[:turn]):
        call_id = f"call_{i:02d}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
    return messages


# --- processes ---------------------------------------------------------------------------------

class Processes:
    """Everything this script starts; `stop_all` ends each by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, env=env, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            if proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, output: Path | None = None,
              timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
                continue
        break
    tail = output.read_text(errors="replace")[-2000:] if output and output.exists() else ""
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port}\n{tail}")


def start_simulator(procs: Processes, err: Path, replicas: int = 4, seed: int = 0,
                    event_delay: float = EVENT_DELAY) -> subprocess.Popen[bytes]:
    with err.open("wb") as f:
        return procs.start([sys.executable, "-m", "tests.sim", "--port", "0",
                            "--replicas", str(replicas), "--seed", str(seed),
                            "--event-delay", str(event_delay)],
                           stdout=subprocess.PIPE, stderr=f, cwd=ROOT)


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    log: Path | None


def start_proxy(procs: Processes, d: Path, name: str, agent: Agent, sim_port: int,
                addon: bool, scripts: tuple[Path, ...] = (),
                options: dict[str, str] | None = None) -> Proxy:
    """`scripts` load before the addon; `options` are more `--set`s."""
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [str(MITMDUMP), "--set", f"confdir={d / 'confdir'}",
            "--set", "connection_strategy=lazy", "--set", "upstream_cert=false",
            "--set", "termlog_verbosity=warn", "--set", "flow_detail=0",
            "--mode", f"reverse:https://{agent.host}@127.0.0.1:{port}",
            "--map-remote",
            f"#^https?://{re.escape(agent.host)}(:443)?/#http://127.0.0.1:{sim_port}/p/{agent.provider}/"]
    for script in scripts:
        args += ["-s", str(script)]
    log = None
    if addon:
        log = d / "affinity.jsonl"
        args += ["-s", str(ADDON), "--set", f"affinity_log={log}",
                 "--set", "affinity_summary=false"]
    for k, v in (options or {}).items():
        args += ["--set", f"{k}={v}"]
    output = d / f"{name}-output.txt"
    with output.open("wb") as f:
        proc = procs.start(args, stdout=f, stderr=subprocess.STDOUT, cwd=d)
    return Proxy(name, proc, port, output, log)


# --- one request -------------------------------------------------------------------------------

@dataclass
class Turn:
    tokens_in: int = 0
    cache_read: int = 0
    first_token_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.cache_read / self.tokens_in if self.tokens_in else 0.0


def ask(client: Any, agent: Agent, messages: list[dict[str, Any]]) -> Turn:
    """One streamed agent request, the way agents send them; returns the provider's usage."""
    t0 = time.perf_counter()
    first = None
    turn = Turn()
    stream = client.chat.completions.create(
        model=agent.model, messages=messages, tools=TOOLS, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            turn.tokens_in = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            turn.cache_read = (details.cached_tokens or 0) if details else 0
    turn.first_token_s = first or 0.0
    return turn


def record_for(proxy: Proxy, n: int, timeout: float = 3.0) -> dict[str, Any] | None:
    """The addon's n-th JSONL record (1-based); it lands right after the stream ends."""
    assert proxy.log is not None
    deadline = time.monotonic() + timeout
    while True:
        if proxy.log.exists():
            lines = [ln for ln in proxy.log.read_text().splitlines() if ln.strip()]
            if len(lines) >= n:
                return json.loads(lines[n - 1])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


# --- display -----------------------------------------------------------------------------------

VERDICT_STYLE = {"hit": "green", "first-write": "cyan", "prefix-changed": "yellow",
                 "ttl-expired": "yellow", "routed-away": "red", "below-minimum": "yellow"}


@dataclass
class Row:
    step: str
    bare: Turn | None = None
    addon: Turn | None = None
    affinity_id: str | None = None
    verdict: str | None = None


@dataclass
class State:
    agent: Agent
    rows: list[Row] = field(default_factory=list)
    status: str = ""


def pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def ratio_style(x: float) -> str:
    return "green" if x >= 0.8 else "yellow" if x >= 0.4 else "red"


def turn2_ratio(rows: list[Row], which: str) -> float:
    turns = [getattr(r, which) for r in rows[1:] if getattr(r, which) is not None]
    read = sum(t.cache_read for t in turns)
    total = sum(t.tokens_in for t in turns)
    return read / total if total else 0.0


def render_table(state: State) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title_justify="left", expand=False,
              title=f"[bold]{state.agent.title}[/], model {state.agent.model}: "
                    "the same requests through both proxies")
    t.add_column("turn", justify="right")
    t.add_column("after", no_wrap=True)
    t.add_column("tokens in", justify="right")
    t.add_column("cache read\nwithout", justify="right")
    t.add_column("cache read\nwith addon", justify="right")
    t.add_column("hit ratio\nwithout", justify="right")
    t.add_column("hit ratio\nwith addon", justify="right")
    t.add_column("affinity ID", no_wrap=True)
    t.add_column("addon verdict", no_wrap=True)
    for i, r in enumerate(state.rows, 1):
        b, a = r.bare, r.addon
        t.add_row(
            str(i), r.step,
            f"{(a or b).tokens_in:,}" if (a or b) else "…",
            f"{b.cache_read:,}" if b else "…",
            f"{a.cache_read:,}" if a else "…",
            Text(pct(b.ratio), style=ratio_style(b.ratio)) if b else Text("…"),
            Text(pct(a.ratio), style=ratio_style(a.ratio)) if a else Text("…"),
            (r.affinity_id[:12] + "…") if r.affinity_id else "",
            Text(r.verdict or "", style=VERDICT_STYLE.get(r.verdict or "", "")),
        )
    return t


def render(state: State) -> Group:
    return Group(render_table(state), Text(state.status, style="dim"))


# A 5-row block font for the final numbers.
_FONT = {
    "0": ["███", "█ █", "█ █", "█ █", "███"], "1": [" █ ", "██ ", " █ ", " █ ", "███"],
    "2": ["███", "  █", "███", "█  ", "███"], "3": ["███", "  █", "███", "  █", "███"],
    "4": ["█ █", "█ █", "███", "  █", "  █"], "5": ["███", "█  ", "███", "  █", "███"],
    "6": ["███", "█  ", "███", "█ █", "███"], "7": ["███", "  █", "  █", "  █", "  █"],
    "8": ["███", "█ █", "███", "█ █", "███"], "9": ["███", "█ █", "███", "  █", "███"],
    "%": ["█  █", "  █ ", " █  ", "█   ", "   █"], " ": ["  "] * 5,
    ">": ["█   ", " █  ", "  █ ", " █  ", "█   "],
}


def big(text: str) -> list[str]:
    return ["  ".join(_FONT[c][row] for c in text) for row in range(5)]


def big_result(before: float, after: float) -> Panel:
    left, mid, right = big(f"{before:.0%}"), big(">"), big(f"{after:.0%}")
    labels = ("without the addon", "with the addon")
    wl = max(len(left[0]), len(labels[0]))
    gap = " " * 4
    rows = [Text.assemble((labels[0].ljust(wl), "bold"), gap, " " * len(mid[0]), gap,
                          (labels[1], "bold"))]
    for lrow, mrow, rrow in zip(left, mid, right, strict=True):
        rows.append(Text.assemble((lrow.ljust(wl), f"bold {ratio_style(before)}"), gap,
                                  (mrow, "dim"), gap, (rrow, f"bold {ratio_style(after)}")))
    return Panel(Text("\n").join(rows), title="prompt-cache hit ratio, turns 2+", expand=False,
                 padding=(1, 3))


# --- main --------------------------------------------------------------------------------------

NEXT_STEPS = """Try it with your own agent:
  scripts/run                                   # proxy on 127.0.0.1:8080 with rules/default.yaml
  scripts/run --mode reverse:https://api.x.ai   # no CA needed: OPENAI_BASE_URL=http://127.0.0.1:8080/v1
  scripts/run --web                             # the same in mitmweb, every flow annotated
  .venv/bin/affinity report {log}
                                                # this demo's log: hit ratios, verdicts, cost"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", choices=sorted([*AGENTS, "openai-team"]), default="grok",
                   help="which agent to play (default grok); openai-team: issue 11's solo "
                        "agent and team on OpenAI, three key strategies")
    p.add_argument("--no-live", action="store_true",
                   help="plain line-by-line output, no live table (for CI and logs)")
    p.add_argument("--turns", type=int, default=len(STEPS) + 1,
                   help=f"requests per session, 2..{len(STEPS) + 1} (default {len(STEPS) + 1})")
    args = p.parse_args(argv)
    args.turns = min(max(args.turns, 2), len(STEPS) + 1)
    live_mode = not args.no_live
    # Plain mode: no colours and no wrapping, one line per turn for CI logs.
    console = Console(highlight=False) if live_mode else Console(
        highlight=False, no_color=True, soft_wrap=True)
    if live_mode and not console.is_terminal:
        live_mode = False
    if args.agent == "openai-team":
        return openai_team(console, plain=not live_mode)
    agent = AGENTS[args.agent]

    # SIGTERM unwinds through the finally below like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for k in [k for k in os.environ if k.lower().endswith("_proxy")]:
        del os.environ[k]  # the SDK must talk to our loopback proxies, not the caller's proxy
    tmp = Path(tempfile.mkdtemp(prefix="affinity-demo-"))
    procs = Processes()
    log_keep: Path | None = None
    try:
        console.print(f"[bold]affinity demo[/]: {agent.title}. The addon adds the "
                      f"{agent.what}.")
        sims = [start_simulator(procs, tmp / f"sim-{i}.err") for i in range(2)]
        ports = [listening_port(s) for s in sims]
        bare = start_proxy(procs, tmp / "bare", "bare", agent, ports[0], addon=False)
        addon = start_proxy(procs, tmp / "addon", "addon", agent, ports[1], addon=True)
        for proxy in (bare, addon):
            wait_port(proxy.port, proxy.proc, f"mitmdump ({proxy.name})", proxy.output)
        console.print(f"started: 2 simulated providers (4 replicas each, pids "
                      f"{sims[0].pid}, {sims[1].pid}), bare mitmdump :{bare.port} "
                      f"(pid {bare.proc.pid}), mitmdump + addon :{addon.port} "
                      f"(pid {addon.proc.pid})")
        rc = play(console, live_mode, agent, bare, addon, args.turns)
        if addon.log and addon.log.exists():
            # Keep the addon's log for `affinity report`; everything else goes.
            log_keep = Path(tempfile.gettempdir()) / f"{tmp.name}.jsonl"
            shutil.copyfile(addon.log, log_keep)
        console.print(NEXT_STEPS.format(log=log_keep or "affinity.jsonl"))
        return rc
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def play(console: Console, live_mode: bool, agent: Agent, bare: Proxy, addon: Proxy,
         turns: int) -> int:
    import openai

    clients = {
        name: openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.port}{agent.base_path}",
                            api_key="sk-demo-not-a-real-key", max_retries=0, timeout=30)
        for name, proxy in (("bare", bare), ("addon", addon))}
    state = State(agent)
    pace = 0.9 if live_mode else 0.0  # seconds per turn on screen, so the table can be followed

    def one_turn(i: int, update: Any) -> None:
        t0 = time.monotonic()
        row = Row("first request" if i == 0 else STEPS[i - 1][0])
        state.rows.append(row)
        messages = transcript(i)
        state.status = f"turn {i + 1}: {len(messages)} messages, sending through bare mitmdump…"
        update()
        row.bare = ask(clients["bare"], agent, messages)
        state.status = f"turn {i + 1}: sending through mitmdump + addon…"
        update()
        row.addon = ask(clients["addon"], agent, messages)
        rec = record_for(addon, i + 1)
        if rec:
            row.affinity_id, row.verdict = rec.get("affinity_id"), rec.get("miss_reason")
        state.status = ""
        update()
        if not live_mode:
            b, a = row.bare, row.addon
            console.print(f"turn {i + 1} ({row.step}): {a.tokens_in:,} tokens in; cache read "
                          f"without {b.cache_read:,} ({b.ratio:.0%}), with addon "
                          f"{a.cache_read:,} ({a.ratio:.0%}); affinity ID "
                          f"{(row.affinity_id or '-')[:12]}; verdict {row.verdict or '-'}")
        time.sleep(max(pace - (time.monotonic() - t0), 0))

    if live_mode:
        with Live(render(state), console=console, refresh_per_second=12) as live:
            for i in range(turns):
                one_turn(i, lambda: live.update(render(state)))
    else:
        for i in range(turns):
            one_turn(i, lambda: None)

    before, after = turn2_ratio(state.rows, "bare"), turn2_ratio(state.rows, "addon")
    ttft = {w: statistics.median(getattr(r, w).first_token_s for r in state.rows)
            for w in ("bare", "addon")}
    if live_mode:
        console.print(big_result(before, after))
    console.print(f"Turn-2+ prompt-cache hit ratio: without the addon {before:.0%}, with the "
                  f"addon {after:.0%}.")
    console.print(f"First token (median): {ttft['bare'] * 1e3:.0f} ms through bare mitmdump, "
                  "which holds a stream back until it ends; "
                  f"{ttft['addon'] * 1e3:.0f} ms with the addon, which streams it through.")
    return 0 if after > before else 1


# --- openai-team: key strategies for a solo agent and a team (issue 11) ------------------------

OPENAI = Agent("OpenAI agents on api.openai.com", "api.openai.com", "openai", "/v1", "gpt-5.5",
               "prompt_cache_key")
TEAM_DEMO = Workload("team", agents=TEAM.agents, rpm=TEAM.rpm, turns=TEAM.turns, duration=600.0)
FAMILY = 'prompt_cache_key: "{family_key}"'
# (row, proxy, prompt_cache_key of the openai rule; None: the shipped rules as they are)
STRATEGIES = (("without addon", "bare", None),
              ("key per conversation (old default)", "conversation", '"{affinity_id}"'),
              ("{family_key} (shipped default)", "shipped", None))


def _health(sim_port: int) -> dict[str, Any]:
    """The simulator's control endpoint: its request and overflow counts."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", sim_port, timeout=10)
    try:
        conn.request("GET", "/_sim/health")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def _reset(sim_port: int) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", sim_port, timeout=10)
    try:
        conn.request("POST", "/_sim/reset")
        conn.getresponse().read()
    finally:
        conn.close()


def _buckets(proxy: Proxy, skip: int) -> str:
    """The most `{family_key}` buckets the addon used in its records after the first `skip`."""
    if proxy.log is None or not proxy.log.exists():
        return ""
    lines = [ln for ln in proxy.log.read_text().splitlines() if ln.strip()][skip:]
    counts = [(json.loads(ln).get("key") or {}).get("buckets") for ln in lines]
    return str(max((c for c in counts if isinstance(c, int)), default="")) or ""


def openai_team(console: Console, plain: bool) -> int:
    """Both workloads through the three proxies; a table each (plain: one line per row)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for k in [k for k in os.environ if k.lower().endswith("_proxy")]:
        del os.environ[k]  # loopback only, never the caller's proxy
    tmp = Path(tempfile.mkdtemp(prefix="affinity-demo-"))
    procs = Processes()
    try:
        console.print("[bold]affinity demo[/]: OpenAI's prompt_cache_key for a solo agent and a "
                      "team sharing one ~8k-token prompt (8 simulated machines; a prefix+key "
                      "pair above ~15 RPM overflows to other machines).")
        sim = start_simulator(procs, tmp / "sim.err", replicas=TEAM.replicas, seed=TEAM.seed,
                              event_delay=0.0)
        sim_port = listening_port(sim)
        shipped = (ROOT / "rules" / "default.yaml").read_text()
        proxies: dict[str, Proxy] = {}
        for _, name, key in STRATEGIES:
            options: dict[str, str] = {}
            if key is not None:
                rules = tmp / f"{name}.yaml"
                rules.write_text(shipped.replace(FAMILY, f"prompt_cache_key: {key}"))
                options["affinity_rules"] = str(rules)
            proxies[name] = start_proxy(procs, tmp / name, name, OPENAI, sim_port,
                                        addon=name != "bare", scripts=(CLOCK,), options=options)
        for proxy in proxies.values():
            wait_port(proxy.port, proxy.proc, f"mitmdump ({proxy.name})", proxy.output)
        console.print(f"started: simulator (pid {sim.pid}), "
                      + ", ".join(f"mitmdump {n} :{p.port} (pid {p.proc.pid})"
                                  for n, p in proxies.items()))
        ok = True
        for epoch, w in enumerate((SOLO, TEAM_DEMO)):
            results: list[tuple[str, Result, float, str]] = []
            for row, name, _ in STRATEGIES:
                proxy = proxies[name]
                _reset(sim_port)
                skip = len(proxy.log.read_text().splitlines()) \
                    if proxy.log and proxy.log.exists() else 0
                # A day between the workloads: no rate window of a proxy spans both.
                up = HttpUpstream(f"http://127.0.0.1:{proxy.port}",
                                  lambda: int(_health(sim_port)["overflowed"]),
                                  epoch=86_400.0 * epoch)
                t0 = time.perf_counter()
                with console.status(f"{w.name}: {row}…"):
                    try:
                        r = run(w, "none", upstream=up)
                    finally:
                        up.close()
                wall = time.perf_counter() - t0
                time.sleep(0.2)  # the addon writes its last record right after the response
                results.append((row, r, wall, _buckets(proxy, skip)))
            if plain:
                console.print(f"{w.name}: {team_title(w)}")
                for row, r, wall, buckets in results:
                    console.print(f"  {row:<36} all turns {r.ratio:.2f}   first turns "
                                  f"{r.first_ratio:.2f}   requests {r.requests:>4}   overflowed "
                                  f"{r.overflowed:>4}   buckets {buckets or '-':>2}   "
                                  f"wall {wall:.1f} s")
            else:
                console.print(team_table(w, results))
            bare, family = results[0][1], results[-1][1]
            ok = ok and family.ratio >= bare.ratio
        console.print("Token-weighted hit ratio over all turns, first turns included. One key "
                      "per conversation sends every turn 1 to a machine that never saw the "
                      "shared prompt; no key puts a whole team on one machine, where most "
                      "requests overflow. {family_key} keeps a solo agent on one machine and "
                      "shards a team into buckets under the limit (`affinity report` shows them). "
                      "Which bucket a conversation gets follows the addon's key, random per "
                      "confdir: the team's ratio moves by about 0.01 from one run to the next.")
        return 0 if ok else 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def team_title(w: Workload) -> str:
    what = f"{w.conversations} conversations one after another" if w.conversations else \
        f"{w.duration / 60:.0f} minutes"
    return f"{w.agents} agent(s), ~{w.rpm:g} RPM, {what}"


def team_table(w: Workload, results: list[tuple[str, Result, float, str]]) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title_justify="left",
              title=f"[bold]{w.name}[/]: {team_title(w)}")
    for col in ("prompt_cache_key", "hit ratio\nall turns", "hit ratio\nfirst turns",
                "requests", "overflowed", "buckets", "wall"):
        t.add_column(col, justify="left" if col == "prompt_cache_key" else "right",
                     no_wrap=col == "prompt_cache_key")
    for row, r, wall, buckets in results:
        t.add_row(row, Text(f"{r.ratio:.2f}", style=ratio_style(r.ratio)),
                  f"{r.first_ratio:.2f}", str(r.requests), str(r.overflowed), buckets,
                  f"{wall:.1f} s")
    return t


if __name__ == "__main__":
    sys.exit(main())
