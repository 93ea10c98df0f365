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

`--agent openai-team` plays OpenAI instead, where the `prompt_cache_key` decides what a shared
prompt costs: OpenAI picks a machine by the prompt's first ~256 tokens and the key, and above
about 15 requests a minute per prefix and key the rest overflows to other machines
(https://developers.openai.com/api/docs/guides/prompt-caching). It plays a solo agent (6
conversations one after another, ~3 RPM) and a team (24 agents at once, ~70 RPM for 10 minutes)
sharing one ~8k-token prompt, through three mitmdumps (without the addon, one `prompt_cache_key`
per conversation as the old default, the shipped `{family_key}`) against a simulator of OpenAI's
routing (8 machines). The traffic runs on virtual time: every request carries `x-sim-time`, which
the simulator serves it at and `tests/sim/clock_addon.py` makes the flow's start time, so ten
minutes of a team take seconds. It prints the token-weighted hit ratio over all turns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

# demolib lives next to this file; a loader by path (importlib) does not put this directory on
# sys.path the way `python scripts/demo.py` does.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demolib.display import Row, State, big_result, render, turn2_ratio  # noqa: E402
from demolib.proxies import Processes, Proxy, start_proxy, start_simulator, wait_port  # noqa: E402
from demolib.session import AGENTS, STEPS, Agent, ask, record_for, transcript  # noqa: E402
from demolib.team import openai_team  # noqa: E402

from tests.procs import listening_port  # noqa: E402

NEXT_STEPS = """Try it with your own agent:
  scripts/run                                   # proxy on 127.0.0.1:8080 with rules/default.yaml
  scripts/run --mode reverse:https://api.x.ai   # no CA needed: OPENAI_BASE_URL=http://127.0.0.1:8080/v1
  scripts/run --web                             # the same in mitmweb, every flow annotated
  .venv/bin/affinity report {log}
                                                # this demo's log: hit ratios, verdicts, cost"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", choices=sorted([*AGENTS, "openai-team"]), default="grok",
                   help="which agent to play (default grok); openai-team: a solo agent "
                        "and a team on OpenAI, three key strategies")
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


if __name__ == "__main__":
    sys.exit(main())
