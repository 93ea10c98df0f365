"""`ttl: auto` against the simulator on virtual time: a fast and a slow conversation, plain
Anthropic SDK bodies and OpenRouter Claude, no client markers.

The addons run in-process so that each flow can start at a simulated time (the tracker's rhythm
reads `timestamp_start`), and the simulator serves each request at the same time (`x-sim-time`),
so its cache entries expire 5 minutes or 1 hour after their last use as the providers document.
Cost is computed from the simulator's usage and the TTL of the markers the request carried:
uncached 1x, reads 0.1x, writes 1.25x (5m) or 2x (1h) of the base input price (providers.md §1).
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
SHAPES = {
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


def body(shape: str, system: str, turns: int) -> dict[str, Any]:
    history: list[dict[str, Any]] = []
    for i in range(turns):
        if i:
            history.append({"role": "assistant", "content": f"Done with step {i}. " * 60})
        history.append({"role": "user", "content": f"Step {i + 1}: go on with the plan. " * 60})
    if shape == "anthropic":
        return {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": system,
                "messages": history}
    return {"model": "anthropic/claude-sonnet-4.5",
            "messages": [{"role": "system", "content": system}, *history]}


def usage_cost(usage: dict[str, Any], shape: str, ttl: str) -> tuple[float, int, int]:
    """(cost in token-equivalents, read, written) of one simulator response."""
    if shape == "anthropic":
        read = usage.get("cache_read_input_tokens", 0)
        write = usage.get("cache_creation_input_tokens", 0)
        total = usage["input_tokens"] + read + write
    else:
        total = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details") or {}
        read, write = details.get("cached_tokens", 0), details.get("cache_write_tokens", 0)
    rate = 2.0 if ttl == "1h" else 1.25
    return total - read - write + 0.1 * read + rate * write, read, write


def conversation_cost(tmp: Path, shape: str, policy: str, gaps: list[float]) -> tuple[float, list[str]]:
    host, path, provider = SHAPES[shape]
    system = big_prompt(f"ttl {shape} {policy} {len(gaps)}", tokens=8000)
    sim = Simulator(replicas=1, clock=SimClock(T0), seed=0)
    a = Affinity()
    cost, ttls = 0.0, []
    with sim, taddons.context(*a.addons) as tctx, httpx2.Client(timeout=30) as h:
        tctx.configure(a.config, affinity_rules=str(rules_with_ttl(tmp, policy)),
                       affinity_summary=False, affinity_key="ttl-test-key-0123456789")
        start = T0
        for turn in range(len(gaps) + 1):
            if turn:
                start += gaps[turn - 1]
            f = tflow.tflow(req=tutils.treq(
                method=b"POST", host=host, port=443, scheme=b"https", authority=b"",
                path=path.encode(), content=json.dumps(body(shape, system, turn + 1)).encode(),
                headers=http.Headers(content_type="application/json",
                                     authorization="Bearer sk-test")))
            f.request.timestamp_start = start
            a.request(f)
            markers = f.metadata[META]["added"]["markers"]
            ttl = "1h" if any(m["ttl"] == "1h" for m in markers) else "5m"
            headers = {k: v for k, v in f.request.headers.items() if k.lower() != "content-length"}
            r = h.post(f"{sim.url}/p/{provider}{path}", content=f.request.content,
                       headers={**headers, "x-sim-time": str(start)})
            assert r.status_code == 200, r.text
            c, _, _ = usage_cost(r.json()["usage"], shape, ttl)
            cost += c
            ttls.append(ttl)
            f.response = tutils.tresp(headers=http.Headers(content_type="application/json"),
                                      content=r.content)
            f.response.timestamp_end = start + 1
            a.responseheaders(f)
            a.response(f)
    return cost, ttls


@pytest.mark.parametrize("shape", list(SHAPES))
def test_auto_ttl_follows_the_rhythm(tmp_path: Path, shape: str) -> None:
    results = {}
    for name, gaps in (("fast", FAST), ("slow", SLOW)):
        costs = {p: conversation_cost(tmp_path, shape, p, gaps) for p in ("5m", "1h", "auto")}
        results[name] = costs
        line = " · ".join(f"{p} {c:,.0f}" for p, (c, _) in costs.items())
        print(f"\n{shape} {name} (10 turns, ~8k-token prompt): {line}; auto TTLs "
              f"{''.join('L' if t == '1h' else 's' for t in costs['auto'][1])}", end="")
    fast, slow = results["fast"], results["slow"]
    # Fast turns: auto never leaves 5m, so it costs exactly what all-5m costs.
    assert fast["auto"][1] == ["5m"] * 10
    assert fast["auto"][0] <= min(fast["5m"][0], fast["1h"][0]) * 1.05
    # Slow turns: after the first long pause every write is 1h.
    assert slow["auto"][1][:2] == ["5m", "1h"] and set(slow["auto"][1][2:]) == {"1h"}
    assert slow["auto"][0] <= 0.70 * slow["5m"][0]  # at least 30% cheaper than all-5m
    # Against all-1h, a conversation that starts on 5m pays its first pause once: turn 2 writes
    # the whole prefix again. That is the whole gap between auto and hindsight.
    assert slow["auto"][0] <= slow["1h"][0] + 1.2 * (8000 + 1000) * 1.25
