"""GPT-5.6 breakpoints end to end: the official openai SDK -> a real mitmdump (bare, then with
the addon and the shipped rules) -> the simulator, which caches GPT-5.6+ at breakpoints as
OpenAI's guide describes (an implicit one on the latest message, explicit
`prompt_cache_breakpoint` ones on content parts, at most 4 writes, no lookback limit, a marker on
an unsupported part is a 400; https://developers.openai.com/api/docs/guides/prompt-caching).

The agent ends every request with OpenClaw's per-turn internal context (a user message added at
the end and removed next turn), so the implicit breakpoint always writes a prefix the next turn
does not have: without the addon it reads nothing. Token-weighted hit ratio over turns 2-8.
Run with `-s` to see the numbers (they are printed with the results anyway).
"""

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.conversations import (
    CHAT_TOOLS,
    OPENCLAW_TRAILER,
    RESPONSES_TOOLS,
    Usage,
    big_prompt,
    hit_ratio_after_first,
    record_usages,
    trailer_conversation,
)
from tests.harness import Proxy, hit_ratio
from tests.sim import RecordedRequest, Simulator

pytestmark = pytest.mark.slow

TURNS = 8
KEY = "sk-test-not-a-real-key"
BREAKPOINT = "prompt_cache_breakpoint"


def breakpoints_in(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dict in the body that carries an explicit breakpoint (written independently of the
    addon's own walk)."""
    found: list[dict[str, Any]] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if BREAKPOINT in v:
                found.append(v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(body)
    return found


def drive(monkeypatch: pytest.MonkeyPatch, sim: Simulator, proxy: Proxy, api: str, model: str,
          system: str) -> tuple[list[Usage], list[RecordedRequest]]:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    client = openai.OpenAI(base_url="https://api.openai.com/v1", api_key=KEY, max_retries=0)
    sim.reset()  # cold caches and the same routing seed for every run
    usages = trailer_conversation(client, api, model, system, TURNS,
                                  tools=CHAT_TOOLS if api == "chat" else RESPONSES_TOOLS)
    return usages, sim.requests


def show(model: str, api: str, bare: list[Usage], got: list[Usage]) -> None:
    """The numbers, turns 2-8 (what the breakpoints are for) and all turns (turn 1 included)."""
    print(f"\n{model} {api:<9} with OpenClaw's trailer, turns 2-{TURNS} / all turns read  "
          f"without addon {hit_ratio_after_first(bare):.3f} / {hit_ratio(bare):.3f}  "
          f"shipped rules {hit_ratio_after_first(got):.3f} / {hit_ratio(got):.3f}")


@pytest.fixture
def proxies(proxy_factory: Callable[..., Proxy]) -> dict[str, Proxy]:
    with ThreadPoolExecutor(2) as pool:  # mitmdump takes a second or two to start
        bare = pool.submit(proxy_factory, "bare", addon=False)
        addon = pool.submit(proxy_factory, "addon")
        return {"without addon": bare.result(), "shipped rules": addon.result()}


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_gpt_5_6_agent_with_a_volatile_trailer_reads_its_prompt(monkeypatch, sim, proxies, api):
    system = big_prompt(f"openclaw on {api}", 6000)
    runs = {name: drive(monkeypatch, sim, p, api, "gpt-5.6", system)
            for name, p in proxies.items()}
    (bare, bare_reqs), (got, reqs) = runs["without addon"], runs["shipped rules"]
    show("gpt-5.6", api, bare, got)
    assert len(reqs) == len(bare_reqs) == TURNS
    assert all(r.status == 200 for r in reqs + bare_reqs)  # no 400: every marker was accepted
    assert hit_ratio_after_first(bare) == 0.0  # the implicit breakpoint always ends at the trailer
    assert hit_ratio_after_first(got) >= 0.80
    for r in reqs:
        marked = breakpoints_in(r.body)
        # at most 4 writes a request, the implicit breakpoint included (never turned off; the
        # options may carry the provider's cache diagnostics' comparison_response_id)
        assert 1 <= len(marked) <= 3
        assert (r.body.get("prompt_cache_options") or {}).get("mode") in (None, "implicit")
        assert all(m[BREAKPOINT] == {"mode": "explicit"} for m in marked)
        assert not any(m.get("text") == OPENCLAW_TRAILER for m in marked)
        assert "cache_control" not in json.dumps(r.body)
    # what the SDK saw is what the addon recorded: reads and (1.25x-priced) writes
    recs = proxies["shipped rules"].wait_records(TURNS)
    assert record_usages(recs) == [
        {k: u[k] for k in ("input_tokens", "cache_read_tokens", "cache_write_tokens")}
        for u in got]
    assert recs[0]["usage"]["cache_write_tokens"] > 0
    for rec in recs:  # GPT-5.6 bills a write at 1.25x the input price, a read at 0.1x
        cost, u = rec["cost_usd"], rec["usage"]
        per_token = (cost["without_cache"] - cost["output"]) / u["input_tokens"]
        assert cost["cache_write_5m"] == pytest.approx(1.25 * per_token * u["cache_write_tokens"])
        assert cost["cache_read"] == pytest.approx(0.1 * per_token * u["cache_read_tokens"])
    assert all(m["ttl"] == "30m" for rec in recs for m in rec["added"]["markers"])
    assert all(rec["rule"] == "openai" and "openai-breakpoints" in rec["rules"] for rec in recs)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_gpt_5_5_gets_no_breakpoints(monkeypatch, sim, proxies, api):
    system = big_prompt(f"older model on {api}", 6000)
    runs = {name: drive(monkeypatch, sim, p, api, "gpt-5.5", system)
            for name, p in proxies.items()}
    (bare, _), (got, reqs) = runs["without addon"], runs["shipped rules"]
    show("gpt-5.5", api, bare, got)
    # automatic prefix caching: the trailer costs only itself, and nothing is added for it
    assert all(not breakpoints_in(r.body) for r in reqs)
    assert hit_ratio_after_first(got) >= hit_ratio_after_first(bare) >= 0.9
    recs = proxies["shipped rules"].wait_records(TURNS)
    assert all(rec["added"]["markers"] == [] for rec in recs)
