"""Hit ratios end to end: official SDKs -> real mitmdump (bare, then with the addon) -> simulator.

Every scenario runs the same multi-turn conversation twice against a fresh simulator (4
replicas): once through a bare mitmdump (what an agent gets today) and once through mitmdump
with the addon. The ratio is token-weighted over turns 2+ (turn 1 can only write), computed from
the usage the SDK returned and cross-checked against the addon's JSONL records. Run with `-s` to
see one line per scenario.
"""

import json
import ssl
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from mitmproxy.net import encoding

from tests.conversations import (
    ANTHROPIC_TOOLS,
    CHAT_TOOLS,
    RESPONSES_TOOLS,
    Usage,
    anthropic_conversation,
    big_prompt,
    chat_conversation,
    codex_conversation,
    hit_ratio_after_first,
    record_usages,
    responses_conversation,
)
from tests.harness import Proxy
from tests.sim import RecordedRequest, Simulator

pytestmark = pytest.mark.slow  # every test starts two mitmdump processes

TURNS = 6
KEY = "sk-test-not-a-real-key"


@dataclass
class Run:
    usages: list[Usage]
    requests: list[RecordedRequest]  # what the simulator received, in order

    @property
    def ratio(self) -> float:
        return hit_ratio_after_first(self.usages)


@dataclass
class Pair:
    without: Run
    with_: Run
    proxy: Proxy  # the one with the addon


def compare(name: str, sim: Simulator, proxy_factory: Callable[..., Proxy],
            drive: Callable[[Proxy], list[Usage]], *, minimum: float = 0.8,
            mode: str | None = None) -> Pair:
    """Run `drive` through a bare mitmdump, then through one with the addon, each against an
    empty simulator; print the line and check the addon's ratio and its JSONL records."""
    with ThreadPoolExecutor(2) as pool:  # mitmdump takes a second or two to start
        bare_f = pool.submit(proxy_factory, "bare", addon=False, mode=mode)
        addon_f = pool.submit(proxy_factory, "addon", mode=mode)
        bare, proxy = bare_f.result(), addon_f.result()
    runs = []
    for p in (bare, proxy):
        sim.reset()  # cold caches and the same routing seed for both runs
        usages = drive(p)
        runs.append(Run(usages, sim.requests))
    without, with_ = runs
    print(f"\n{name:<36} turn-2+ token-weighted hit ratio  without={without.ratio:.2f}  "
          f"with={with_.ratio:.2f}")
    assert len(with_.requests) == len(without.requests) == len(with_.usages) == TURNS
    assert all(r.status == 200 for r in with_.requests + without.requests)
    assert with_.ratio >= minimum, with_.usages
    assert with_.ratio >= without.ratio
    assert bare.records() == []  # the baseline really ran without the addon
    # The addon saw the same usage the SDK did, turn by turn.
    recs = proxy.wait_records(TURNS)
    assert len(recs) == TURNS
    assert record_usages(recs) == [
        {k: u[k] for k in ("input_tokens", "cache_read_tokens", "cache_write_tokens")}
        for u in with_.usages]
    assert hit_ratio_after_first(record_usages(recs)) == pytest.approx(with_.ratio)
    for rec, u in zip(recs, with_.usages, strict=True):
        assert rec["complete"] is True and rec["status"] == 200
        # The record rounds to 4 places.
        assert rec["hit_ratio"] == pytest.approx(u["cache_read_tokens"] / u["input_tokens"],
                                                 abs=1e-4)
    assert recs[0]["miss_reason"] == "first-write"
    assert all(r["miss_reason"] == "hit" for r in recs[1:]), [r["miss_reason"] for r in recs]
    return Pair(without, with_, proxy)


def via_proxy(monkeypatch: pytest.MonkeyPatch, proxy: Proxy) -> None:
    # How an agent is pointed at the proxy; the SDKs read both when the client is built.
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))


def openai_client(monkeypatch: pytest.MonkeyPatch, proxy: Proxy, base_url: str) -> openai.OpenAI:
    via_proxy(monkeypatch, proxy)
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)


def anthropic_client(monkeypatch: pytest.MonkeyPatch, proxy: Proxy) -> anthropic.Anthropic:
    via_proxy(monkeypatch, proxy)
    return anthropic.Anthropic(base_url="https://api.anthropic.com", api_key="sk-ant-test-000",
                               max_retries=0)


def one_value(requests: list[RecordedRequest], get: Callable[[RecordedRequest], Any]) -> Any:
    values = {get(r) for r in requests}
    assert len(values) == 1 and None not in values, values
    return values.pop()


# --- 1, 2: Grok ---------------------------------------------------------------------------------

def test_grok_direct_conv_id_pins_a_replica(monkeypatch, sim, proxy_factory):
    system = big_prompt("grok direct")

    def drive(p: Proxy) -> list[Usage]:
        client = openai_client(monkeypatch, p, "https://api.x.ai/v1")
        return chat_conversation(client, "grok-4", system, TURNS, tools=CHAT_TOOLS, stream=True)

    pair = compare("grok direct (api.x.ai, SSE)", sim, proxy_factory, drive)
    # Without the header xAI spreads the turns over its servers; with it, one server.
    assert all(r.header("x-grok-conv-id") is None for r in pair.without.requests)
    assert len({r.replica for r in pair.without.requests}) > 1
    conv = one_value(pair.with_.requests, lambda r: r.header("x-grok-conv-id"))
    one_value(pair.with_.requests, lambda r: r.replica)
    assert pair.without.ratio < 0.8
    recs = pair.proxy.records()
    assert all(r["stream"] is True and r["affinity_id"] == conv for r in recs)


def test_grok_via_openrouter(monkeypatch, sim, proxy_factory):
    system = big_prompt("grok via openrouter")

    def drive(p: Proxy) -> list[Usage]:
        client = openai_client(monkeypatch, p, "https://openrouter.ai/api/v1")
        return chat_conversation(client, "x-ai/grok-4", system, TURNS, tools=CHAT_TOOLS)

    pair = compare("grok via openrouter", sim, proxy_factory, drive)
    assert all(r.header("x-grok-conv-id") is None for r in pair.without.requests)
    conv = one_value(pair.with_.requests, lambda r: r.header("x-grok-conv-id"))
    assert one_value(pair.with_.requests, lambda r: r.body.get("session_id")) == conv
    assert pair.without.ratio < 0.8


# --- 3: OpenRouter Claude, plain strings, no markers: only a text part can carry a marker -----

def test_openrouter_claude_plain_strings_get_breakpoints(monkeypatch, sim, proxy_factory):
    system = big_prompt("openrouter claude")

    def drive(p: Proxy) -> list[Usage]:
        client = openai_client(monkeypatch, p, "https://openrouter.ai/api/v1")
        return chat_conversation(client, "anthropic/claude-sonnet-4.5", system, TURNS)

    pair = compare("openrouter claude (no markers)", sim, proxy_factory, drive, minimum=0.9)
    assert pair.without.ratio < 0.05
    assert sum(u["cache_read_tokens"] for u in pair.without.usages) == 0
    assert all("cache_control" not in json.dumps(r.body) for r in pair.without.requests)
    # The addon's markers reached the provider, at most 4 per request.
    for r in pair.with_.requests:
        assert 1 <= json.dumps(r.body).count('"cache_control"') <= 4


# --- 4, 5: OpenAI chat and Responses, regular and reverse mode ---------------------------------

@pytest.mark.parametrize("mode", [None, "reverse:https://api.openai.com"])
def test_openai_chat_prompt_cache_key(monkeypatch, sim, proxy_factory, mode):
    system = big_prompt("openai chat")

    def drive(p: Proxy) -> list[Usage]:
        if mode:  # reverse mode: no proxy settings, no CA; the base URL is the proxy
            monkeypatch.delenv("HTTPS_PROXY", raising=False)
            client = openai.OpenAI(base_url=p.url + "/v1", api_key=KEY, max_retries=0)
        else:
            client = openai_client(monkeypatch, p, "https://api.openai.com/v1")
        return chat_conversation(client, "gpt-5.6", system, TURNS, tools=CHAT_TOOLS)

    pair = compare(f"openai chat ({'reverse' if mode else 'regular'})", sim, proxy_factory,
                   drive, mode=mode)
    assert all("prompt_cache_key" not in r.body for r in pair.without.requests)
    key = one_value(pair.with_.requests, lambda r: r.body.get("prompt_cache_key"))
    # {family_key}: the prompt family's key; one conversation at this rate is one bucket
    assert key.startswith("fam-") and key.endswith("-0")
    recs = pair.proxy.records()
    assert len({rec["affinity_id"] for rec in recs}) == 1
    assert all(rec["cache_key_bucket"] == {"strategy": "family", "bucket": 0, "buckets": 1} for rec in recs)


@pytest.mark.parametrize("mode", [None, "reverse:https://api.openai.com"])
def test_openai_responses_prompt_cache_key(monkeypatch, sim, proxy_factory, mode):
    instructions = big_prompt("openai responses")

    def drive(p: Proxy) -> list[Usage]:
        if mode:
            monkeypatch.delenv("HTTPS_PROXY", raising=False)
            client = openai.OpenAI(base_url=p.url + "/v1", api_key=KEY, max_retries=0)
        else:
            client = openai_client(monkeypatch, p, "https://api.openai.com/v1")
        return responses_conversation(client, "gpt-5.6", instructions, TURNS,
                                      tools=RESPONSES_TOOLS)

    pair = compare(f"openai responses ({'reverse' if mode else 'regular'})", sim,
                   proxy_factory, drive, mode=mode)
    assert all(r.path == "/v1/responses" for r in pair.with_.requests)
    one_value(pair.with_.requests, lambda r: r.body.get("prompt_cache_key"))


# --- 6: Codex HTTP fallback, zstd body, session-id dropped by a relay ---------------------------

def test_codex_zstd_session_id_restored(sim, proxy_factory):
    developer = big_prompt("codex")
    cache_key = str(uuid.UUID(int=6))
    sent: dict[int, list[bytes]] = {}

    def drive(p: Proxy) -> list[Usage]:
        wires = sent.setdefault(p.port, [])
        with httpx2.Client(proxy=p.url, verify=ssl.create_default_context(cafile=str(p.ca)),
                           timeout=30) as h:
            return codex_conversation(h, developer, cache_key, TURNS, sent=wires)

    pair = compare("codex backend (zstd, SSE)", sim, proxy_factory, drive)
    assert all(r.header("session-id") is None for r in pair.without.requests)
    wires = sent[pair.proxy.port]
    for r, wire in zip(pair.with_.requests, wires, strict=True):
        # The body reached the backend byte for byte: valid zstd, never recompressed.
        assert r.header("content-encoding") == "zstd"
        assert r.raw_body == wire
        assert json.loads(encoding.decode(r.raw_body, "zstd")) == r.body
        assert r.body["prompt_cache_key"] == cache_key and r.body["stream"] is True
        assert "prompt_cache_retention" not in r.body
        # The header the relay dropped is back, equal to the body's cache key.
        assert r.header("session-id") == cache_key
    recs = pair.proxy.records()
    assert all(rec["stream"] is True and rec["affinity_id"] == cache_key for rec in recs)
    assert recs[0]["added"]["headers"]["session-id"] == cache_key


# --- 7, 8: Anthropic direct ---------------------------------------------------------------------

def test_anthropic_plain_sdk_script_gets_breakpoints(monkeypatch, sim, proxy_factory):
    system = big_prompt("anthropic plain")

    def drive(p: Proxy) -> list[Usage]:
        client = anthropic_client(monkeypatch, p)
        return anthropic_conversation(client, "claude-sonnet-4-6", system, TURNS,
                                      tools=ANTHROPIC_TOOLS)

    pair = compare("anthropic plain SDK (no markers)", sim, proxy_factory, drive)
    assert pair.without.ratio == 0.0
    assert all("cache_control" not in json.dumps(r.body) for r in pair.without.requests)
    recs = pair.proxy.records()
    assert all(rec["added"]["markers"] for rec in recs)


def test_anthropic_client_markers_left_exactly_as_sent(monkeypatch, sim, proxy_factory):
    # Claude Code's API: billing block, identity and big prompt in `system`, markers on
    # system[1], system[2] and the newest user message's last text block; always streamed.
    session = str(uuid.UUID(int=8))
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.0df; "
                                 "cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "You are Claude Code, a coding agent.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": big_prompt("claude code"), "cache_control": {"type": "ephemeral"}},
    ]
    headers = {"X-Claude-Code-Session-Id": session, "x-app": "cli"}
    metadata = {"user_id": json.dumps({"device_id": "d" * 64, "account_uuid": "",
                                       "session_id": session})}

    def drive(p: Proxy) -> list[Usage]:
        client = anthropic_client(monkeypatch, p)
        return anthropic_conversation(client, "claude-sonnet-4-6", system, TURNS,
                                      tools=ANTHROPIC_TOOLS, stream=True, mark_last_user=True,
                                      extra_headers=headers, metadata=metadata)

    pair = compare("anthropic claude-code markers (SSE)", sim, proxy_factory, drive)
    assert pair.with_.ratio == pytest.approx(pair.without.ratio)
    assert [u["cache_read_tokens"] for u in pair.with_.usages] ==\
        [u["cache_read_tokens"] for u in pair.without.usages]
    for w, wo in zip(pair.with_.requests, pair.without.requests, strict=True):
        # Byte for byte what the client sent (the bare proxy changes nothing), but for the
        # provider's cache diagnostics field spliced in first (README, "Provider-verified
        # verdicts").
        asked = json.dumps({"diagnostics": w.body["diagnostics"]}, separators=(",", ":"))
        assert w.raw_body == asked[:-1].encode() + b"," + wo.raw_body[1:]
        body = w.body
        marked = [i for i, b in enumerate(body["system"]) if "cache_control" in b]
        assert marked == [1, 2]
        assert "cache_control" in body["messages"][-1]["content"][-1]
        assert json.dumps(body).count('"cache_control"') == 3
    recs = pair.proxy.records()
    assert all(rec["stream"] is True and rec["added"]["markers"] == [] for rec in recs)
    assert all(rec["affinity_id"] == session for rec in recs)
