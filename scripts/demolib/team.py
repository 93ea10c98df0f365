"""`scripts/demo --agent openai-team`: OpenAI's prompt_cache_key for a solo agent and a team."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tests.procs import listening_port
from tests.sim.workload import SOLO, TEAM, HttpUpstream, Result, Workload, run

from . import ROOT
from .display import team_table, team_title
from .proxies import CLOCK, Processes, Proxy, start_proxy, start_simulator, wait_port
from .session import Agent

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
