"""`ttl: auto` against the simulator on virtual time: two conversations of one agent, either
fast or slow, plain Anthropic SDK bodies and OpenRouter Claude, no client markers.

The addons run in-process so that each flow can start at a simulated time (the tracker's rhythm
reads `timestamp_start`), and the simulator serves each request at the same time (`x-sim-time`),
so its cache entries expire 5 minutes or 1 hour after their last use as the providers document.
Cost is computed from the simulator's usage and the TTL of the markers the request carried:
uncached 1x, reads 0.1x, writes 1.25x (5m) or 2x (1h) of the base input price
(https://platform.claude.com/docs/en/build-with-claude/prompt-caching).
The first conversation of an agent starts on 5m (nothing is known); the second starts on what
the first one's pauses say (the prompt family's prior).
"""

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.record.schema import META
from tests.conversations import big_prompt
from tests.driver import Affinity
from tests.sim import SimClock, Simulator

T0 = 1_800_000_000.0
FAST = [30.0] * 9  # seconds between turns
SLOW = [m * 60.0 for m in (8, 12, 20, 9, 15, 18, 10, 14, 11)]
BETWEEN = 1800.0  # from the first conversation's last turn to the second's first
APIS = {
    "anthropic": ("api.anthropic.com", "/v1/messages", "anthropic"),
    "openrouter": ("openrouter.ai", "/api/v1/chat/completions", "openrouter"),
}


def rules_with_ttl(tmp: Path, ttl: str) -> Path:
    doc = yaml.safe_load(DEFAULT_RULES.read_text())
    for rule in doc["rules"]:
        if rule.get("cache_control"):
            rule["cache_control"]["ttl"] = ttl
    path = tmp / f"rules-{ttl}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def body(api: str, system: str, turns: int, task: int = 0) -> dict[str, Any]:
    history: list[dict[str, Any]] = []
    for i in range(turns):
        if i:
            history.append({"role": "assistant", "content": f"Done with step {i}. " * 60})
        opening = f"Task {task}. " if i == 0 else ""  # another task: another conversation
        history.append({"role": "user",
                        "content": opening + f"Step {i + 1}: go on with the plan. " * 60})
    if api == "anthropic":
        return {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": system,
                "messages": history}
    return {"model": "anthropic/claude-sonnet-4.5",
            "messages": [{"role": "system", "content": system}, *history]}


def usage_cost(usage: dict[str, Any], api: str, ttl: str) -> tuple[float, int, int]:
    """(cost in token-equivalents, read, written) of one simulator response."""
    if api == "anthropic":
        read = usage.get("cache_read_input_tokens", 0)
        write = usage.get("cache_creation_input_tokens", 0)
        total = usage["input_tokens"] + read + write
    else:
        total = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details") or {}
        read, write = details.get("cached_tokens", 0), details.get("cache_write_tokens", 0)
    rate = 2.0 if ttl == "1h" else 1.25
    return total - read - write + 0.1 * read + rate * write, read, write


def agent_costs(tmp: Path, api: str, policy: str, gaps: list[float],
                conversations: int = 2) -> list[tuple[float, list[str]]]:
    """(cost, TTL per turn) of each of an agent's conversations, one after the other through one
    proxy: same model, system prompt and rhythm, another task each."""
    host, path, provider = APIS[api]
    system = big_prompt(f"ttl {api} {policy} {len(gaps)}", tokens=8000)
    sim = Simulator(replicas=1, clock=SimClock(T0), seed=0)
    a = Affinity()
    out = []
    with sim, taddons.context(*a.addons) as tctx, httpx2.Client(timeout=30) as h:
        tctx.configure(a.bundle, affinity_rules=str(rules_with_ttl(tmp, policy)),
                       affinity_summary=False, affinity_key="ttl-test-key-0123456789")
        start = T0
        for task in range(conversations):
            cost, ttls = 0.0, []
            if task:
                start += BETWEEN
            for turn in range(len(gaps) + 1):
                if turn:
                    start += gaps[turn - 1]
                f = tflow.tflow(req=tutils.treq(
                    method=b"POST", host=host, port=443, scheme=b"https", authority=b"",
                    path=path.encode(),
                    content=json.dumps(body(api, system, turn + 1, task)).encode(),
                    headers=http.Headers(content_type="application/json",
                                         authorization="Bearer sk-test")))
                f.request.timestamp_start = start
                a.request(f)
                markers = f.metadata[META]["added"]["markers"]
                ttl = "1h" if any(m["ttl"] == "1h" for m in markers) else "5m"
                headers = {k: v for k, v in f.request.headers.items()
                           if k.lower() != "content-length"}
                r = h.post(f"{sim.url}/p/{provider}{path}", content=f.request.content,
                           headers={**headers, "x-sim-time": str(start)})
                assert r.status_code == 200, r.text
                c, _, _ = usage_cost(r.json()["usage"], api, ttl)
                cost += c
                ttls.append(ttl)
                f.response = tutils.tresp(headers=http.Headers(content_type="application/json"),
                                          content=r.content)
                f.response.timestamp_end = start + 1
                a.responseheaders(f)
                a.response(f)
            out.append((cost, ttls))
    return out


@pytest.mark.parametrize("api", list(APIS))
def test_auto_ttl_follows_the_rhythm(tmp_path: Path, api: str) -> None:
    results = {}
    for name, gaps in (("fast", FAST), ("slow", SLOW)):
        runs = {p: agent_costs(tmp_path, api, p, gaps) for p in ("5m", "1h", "auto")}
        results[name] = runs
        for i in (0, 1):
            line = " · ".join(f"{p} {r[i][0]:,.0f}" for p, r in runs.items())
            print(f"\n{api} {name} conversation {i + 1} (10 turns, ~8k-token prompt): {line}; "
                  f"auto TTLs {''.join('L' if t == '1h' else 's' for t in runs['auto'][i][1])}",
                  end="")
    fast, slow = results["fast"], results["slow"]
    first = {p: r[0] for p, r in slow.items()}
    # Fast turns: auto never leaves 5m, so it costs what all-5m costs, and so does the second
    # conversation: the family's pauses are short, its first write stays on 5m. (All-1h is
    # cheaper for that one conversation alone: its first turn reads the system prompt the first
    # conversation left in a 1h entry 30 minutes earlier, which that conversation paid for.)
    assert fast["auto"][0][0] <= min(fast["5m"][0][0], fast["1h"][0][0]) * 1.05
    for i in (0, 1):
        assert fast["auto"][i][1] == ["5m"] * 10
        assert fast["auto"][i][0] <= fast["5m"][i][0] * 1.05
    # Slow turns, first conversation: after the first long pause every write is 1h.
    assert first["auto"][1][:2] == ["5m", "1h"] and set(first["auto"][1][2:]) == {"1h"}
    assert first["auto"][0] <= 0.70 * first["5m"][0]  # at least 30% cheaper than all-5m
    # Against all-1h, a conversation that starts on 5m pays its first pause once: turn 2 writes
    # the whole prefix again. That is the whole gap between auto and hindsight.
    assert first["auto"][0] <= first["1h"][0] + 1.2 * (8000 + 1000) * 1.25
    # The second slow conversation starts on 1h, as its family's pauses call for: within 5% of
    # all-1h, and at least 30% cheaper than all-5m.
    second = {p: r[1] for p, r in slow.items()}
    assert second["auto"][1] == ["1h"] * 10
    assert second["auto"][0] <= 1.05 * second["1h"][0]
    assert second["auto"][0] <= 0.70 * second["5m"][0]
