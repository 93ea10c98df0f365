"""The provider simulator, talked to directly (no proxy): routing, cache models, wire formats."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from mitmproxy.net import encoding

from tests.sim import SimClock, Simulator
from tests.sim.cache import anthropic_minimum

ROOT = Path(__file__).resolve().parents[1]
BIG = "The quick brown fox jumps over the lazy dog. " * 120  # ~1,350 tokens as one segment


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


@pytest.fixture
def sim(clock: SimClock):
    with Simulator(replicas=4, clock=clock, seed=0) as s:
        yield s


def post(sim: Simulator, path: str, body: Any, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data,
                     headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(sim: Simulator, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    status, _, data = post(sim, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
    return status, json.loads(data)


def sse_events(data: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        name, payload = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                payload.append(line[6:])
        events.append((name, "\n".join(payload)))
    return events


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    # Before GPT-5.6: automatic prefix caching in 128-token chunks (5.6+: breakpoints, below).
    return {"model": "gpt-5.5", "messages": messages, **extra}


def convo(n: int, system: str = BIG) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i in range(n):
        msgs.append({"role": "user", "content": f"question {i}"})
        msgs.append({"role": "assistant", "content": f"answer {i}"})
    msgs.append({"role": "user", "content": f"question {n}"})
    return msgs


# --- the basic slice: OpenAI chat and Anthropic through the official SDKs ---------------------

def test_openai_chat_sdk_json_and_stream(sim: Simulator) -> None:
    client = openai.OpenAI(base_url=sim.url + "/p/openai/v1", api_key="sk-test", max_retries=0)
    first = client.chat.completions.create(model="gpt-5.6", messages=convo(0),
                                           prompt_cache_key="conv-1")
    assert first.choices[0].message.content == "ok"
    assert first.id.startswith("chatcmpl-")
    assert first.usage.prompt_tokens > 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model="gpt-5.6", messages=convo(1),
                                            prompt_cache_key="conv-1")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 1024 <= cached < second.usage.prompt_tokens  # prompt_tokens includes cached tokens
    # GPT-5.6 reads at turn 1's implicit breakpoint (its whole prompt), not in 128-token steps
    assert cached == first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cache_write_tokens == first.usage.prompt_tokens
    stream = client.chat.completions.create(model="gpt-5.6", messages=convo(1), stream=True,
                                            prompt_cache_key="conv-1",
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    reqs = sim.requests
    assert [r.path for r in reqs] == ["/v1/chat/completions"] * 3
    assert {r.provider for r in reqs} == {"openai"} and len({r.replica for r in reqs}) == 1
    assert reqs[1].usage["prompt_tokens_details"]["cached_tokens"] == cached
    assert reqs[0].body["prompt_cache_key"] == "conv-1" and reqs[0].status == 200
    assert reqs[0].header("AUTHORIZATION") == "Bearer sk-test"
    assert json.loads(reqs[0].raw_body) == reqs[0].body


def test_openai_chat_stream_usage_only_when_requested(sim: Simulator) -> None:
    for include, expect_usage in ((None, False), (False, False), (True, True)):
        body = chat(convo(0), stream=True)
        if include is not None:
            body["stream_options"] = {"include_usage": include}
        status, headers, data = post(sim, "/p/openai/v1/chat/completions", body)
        assert status == 200 and headers["content-type"] == "text/event-stream"
        assert headers["transfer-encoding"] == "chunked"
        events = sse_events(data)
        assert events[-1] == (None, "[DONE]")
        chunks = [json.loads(d) for _, d in events[:-1]]
        usage_chunks = [c for c in chunks if c.get("usage")]
        if expect_usage:
            assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
            assert all(c["usage"] is None for c in chunks[:-1])
        else:
            assert usage_chunks == [] and all("usage" not in c for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_anthropic_sdk_json_and_stream(sim: Simulator) -> None:
    client = anthropic.Anthropic(base_url=sim.url + "/p/anthropic", api_key="sk-ant-test",
                                 max_retries=0)
    system = [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(model="claude-sonnet-4-6", max_tokens=16, system=system,
                                   messages=[{"role": "user", "content": "hi"}])
    assert first.id.startswith("msg_") and first.content[0].text == "ok"
    written = first.usage.cache_creation_input_tokens
    assert written > 1024 and first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == written
    assert first.usage.input_tokens == 1  # only the unmarked "hi" after the last marker
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=16, system=system,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == written
    assert final.usage.cache_creation_input_tokens == 0 and final.usage.input_tokens == 1
    assert [r.replica for r in sim.requests] == [0, 0]


def test_anthropic_sse_event_sequence(sim: Simulator) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": True,
            "system": [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral",
                                                                       "ttl": "1h"}}],
            "messages": [{"role": "user", "content": "hi"}]}
    status, headers, data = post(sim, "/p/anthropic/v1/messages", body)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_events(data)
    assert [e for e, _ in events] == ["message_start", "content_block_start", "ping",
                                      "content_block_delta", "content_block_stop",
                                      "message_delta", "message_stop"]
    start = json.loads(events[0][1])["message"]["usage"]
    delta = json.loads(events[5][1])["usage"]
    assert start["cache_creation"] == {"ephemeral_5m_input_tokens": 0,
                                       "ephemeral_1h_input_tokens":
                                           start["cache_creation_input_tokens"]}
    assert "cache_creation" not in delta
    assert delta["cache_creation_input_tokens"] == start["cache_creation_input_tokens"] > 1024
    assert json.loads(events[3][1])["delta"]["text"] == "ok"


# --- routing: each provider's affinity signal --------------------------------------------------

def hit_ratio(usage: dict[str, Any]) -> float:
    if "cache_read_input_tokens" in usage:  # Anthropic: input_tokens excludes cached tokens
        read = usage["cache_read_input_tokens"]
        return read / (usage["input_tokens"] + read + usage["cache_creation_input_tokens"])
    if "input_tokens" in usage:
        return usage["input_tokens_details"]["cached_tokens"] / usage["input_tokens"]
    return usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"]


def anthropic_turn(n: int, model: str = "claude-sonnet-4-6") -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    for i in range(n + 1):
        msgs.append({"role": "user", "content": [{"type": "text", "text": f"question {i}"}]})
        if i < n:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": f"a {i}"}]})
    msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": model, "max_tokens": 16, "messages": msgs,
            "system": [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral"}}]}


def responses_turn(n: int, **extra: Any) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"role": "developer", "content": BIG}]
    for i in range(n + 1):
        items.append({"role": "user", "content": [{"type": "input_text", "text": f"q {i}"}]})
    return {"model": "gpt-5.5-codex", "input": items, **extra}


# (name, path, body for turn n and key k, headers for key k)
ROUTES = [
    ("openai-chat", "/p/openai/v1/chat/completions",
     lambda n, k: chat(convo(n), prompt_cache_key=k), lambda k: {}),
    ("openai-responses", "/p/openai/v1/responses",
     lambda n, k: responses_turn(n, prompt_cache_key=k), lambda k: {}),
    ("xai-chat", "/p/xai/v1/chat/completions",
     lambda n, k: chat(convo(n)), lambda k: {"x-grok-conv-id": k}),
    ("xai-responses", "/p/xai/v1/responses",
     lambda n, k: responses_turn(n, prompt_cache_key=k), lambda k: {}),
    ("codex-header", "/p/codex/backend-api/codex/responses",
     lambda n, k: responses_turn(n, stream=True, store=False), lambda k: {"session-id": k}),
    ("codex-body", "/p/codex/backend-api/codex/responses",
     lambda n, k: responses_turn(n, stream=True, store=False, prompt_cache_key=k), lambda k: {}),
    ("fireworks", "/p/fireworks/inference/v1/chat/completions",
     lambda n, k: chat(convo(n)), lambda k: {"x-session-affinity": k}),
    ("proxy-session-id", "/p/proxy/v1/messages",
     lambda n, k: anthropic_turn(n), lambda k: {"X-Session-Id": k}),
    ("proxy-affinity", "/p/proxy/v1/messages",
     lambda n, k: anthropic_turn(n), lambda k: {"x-session-affinity": k}),
    ("openrouter-grok", "/p/openrouter/api/v1/chat/completions",
     lambda n, k: chat(convo(n), model="x-ai/grok-4"), lambda k: {"x-grok-conv-id": k}),
]


@pytest.mark.parametrize("name,path,body,headers", ROUTES, ids=[r[0] for r in ROUTES])
def test_affinity_signal_pins_a_replica(sim: Simulator, name, path, body, headers) -> None:
    for key in ("conv-a", "conv-b", "conv-c"):
        for n in range(5):
            status, _, data = post(sim, path, body(n, key), headers(key))
            assert status == 200, data
    reqs = sim.requests
    for i in range(3):
        conv = reqs[i * 5:(i + 1) * 5]
        assert len({r.replica for r in conv}) == 1
        assert all(hit_ratio(r.usage) > 0.8 for r in conv[1:]), [r.usage for r in conv]
    # three keys over 4 replicas: not all on one (sha256 of the key picks, not the order)
    assert len({r.replica for r in reqs}) > 1


@pytest.mark.parametrize("name,path,body,headers", [
    # xAI chat routes on the header only: a body prompt_cache_key does not help
    ("xai-chat", "/p/xai/v1/chat/completions",
     lambda n: chat(convo(n), prompt_cache_key="conv-a"), {}),
    ("proxy", "/p/proxy/v1/messages", lambda n: anthropic_turn(n), {}),
])
def test_without_signal_replicas_are_random_but_seeded(clock, name, path, body, headers) -> None:
    runs = []
    for _ in range(2):
        with Simulator(replicas=4, clock=clock, seed=7) as s:
            for n in range(12):
                assert post(s, path, body(n), headers)[0] == 200
            runs.append(s.requests)
    replicas = [r.replica for r in runs[0]]
    assert replicas == [r.replica for r in runs[1]]  # deterministic with the seed
    assert len(set(replicas)) > 1
    ratios = [hit_ratio(r.usage) for r in runs[0][1:]]
    # Each first visit to a cold replica misses outright; with a signal no turn after the
    # first ever does (test above).
    assert sum(1 for x in ratios if x == 0) >= 2, ratios


def test_openrouter_claude_sticky_on_conversation_root(sim: Simulator) -> None:
    def body(first_user: str, n: int) -> dict[str, Any]:
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": [{"type": "text", "text": BIG,
                                            "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": first_user}]
        for i in range(n):
            msgs += [{"role": "assistant", "content": f"a{i}"},
                     {"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}]
        return {"model": "anthropic/claude-sonnet-4.6", "messages": msgs}

    path = "/p/openrouter/api/v1/chat/completions"
    for first in ("alpha", "beta", "gamma", "delta"):
        for n in range(3):
            assert post(sim, path, body(first, n))[0] == 200
    reqs = sim.requests
    for i in range(4):
        assert len({r.replica for r in reqs[i * 3:(i + 1) * 3]}) == 1
    assert len({r.replica for r in reqs}) > 1
    # Claude marker semantics through an OpenAI-chat body: a write, then reads
    first, second = reqs[0].usage, reqs[1].usage
    assert first["prompt_tokens_details"]["cache_write_tokens"] > 1024
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == \
        first["prompt_tokens_details"]["cache_write_tokens"]
    assert first["cost"] > second["cost"] > 0


# --- OpenAI: machine = hash(first ~256 tokens, prompt_cache_key), ~15 RPM then overflow --------

OPENAI = "/p/openai/v1/chat/completions"


def first_turn(topic: str, user: str = "go", **extra: Any) -> dict[str, Any]:
    return chat([{"role": "system", "content": f"{topic}: " + BIG},
                 {"role": "user", "content": user}], **extra)


def at(t: float) -> dict[str, str]:
    return {"x-sim-time": str(t)}


def test_openai_without_key_one_machine_per_prefix(sim: Simulator) -> None:
    # Conversations that share their first 256 tokens share a machine, so turn 1 of a new
    # conversation reads the shared system prompt that the others wrote.
    for i in range(6):
        status, r = post_json(sim, OPENAI, first_turn("agent", f"task {i}"))
        assert status == 200
        if i:
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1280
    assert len({r.replica for r in sim.requests}) == 1
    # other prefixes land elsewhere (the hash picks, not the order)
    for topic in ("alpha", "beta", "gamma", "delta", "epsilon"):
        post_json(sim, OPENAI, first_turn(topic))
    assert len({r.replica for r in sim.requests}) > 1


def test_openai_key_is_combined_with_the_prefix(sim: Simulator) -> None:
    for i in range(8):
        status, r = post_json(sim, OPENAI, first_turn("agent", f"task {i}",
                                                      prompt_cache_key=f"conv-{i}"))
        assert status == 200
    reqs = sim.requests
    assert len({r.replica for r in reqs}) > 1  # one key per conversation spreads them
    cold = [r for r in reqs if r.usage["prompt_tokens_details"]["cached_tokens"] == 0]
    assert len(cold) >= 2  # a first turn on a machine that never saw the prefix misses
    # the same key with another prefix is another machine choice; the same pair is stable
    again = [post_json(sim, OPENAI, first_turn("agent", "task 0", prompt_cache_key="conv-0"))
             for _ in range(2)]
    assert all(status == 200 for status, _ in again)
    assert sim.requests[-1].replica == sim.requests[-2].replica == reqs[0].replica


@pytest.mark.parametrize("model", ["gpt-5.5", "gpt-5.6"])
def test_openai_prefix_overflows_above_15_rpm(sim: Simulator, model: str) -> None:
    body = first_turn("busy", model=model)
    for i in range(15):  # 15 within a minute: all at home
        assert post(sim, OPENAI, body, at(1000 + i))[0] == 200
    home = sim.requests[0].replica
    assert {r.replica for r in sim.requests} == {home} and sim.engine.overflowed == 0
    for i in range(5):  # the 16th to 20th overflow to other machines
        post(sim, OPENAI, body, at(1020 + i))
    assert all(r.replica != home for r in sim.requests[15:]) and sim.engine.overflowed == 5
    # a minute after the first ones the home machine takes requests again
    post(sim, OPENAI, body, at(1061))
    assert sim.requests[-1].replica == home
    # 12 RPM (one request every 5 s) never overflows
    sim.reset()
    for i in range(40):
        post(sim, OPENAI, first_turn("calm", model=model), at(5000 + 5 * i))
    assert sim.engine.overflowed == 0 and len({r.replica for r in sim.requests}) == 1


@pytest.mark.parametrize("model,overflow", [("gpt-5.5", False), ("gpt-5.6", True),
                                            ("gpt-6", True)])
def test_openai_gpt_5_6_counts_rpm_per_key_across_prefixes(sim: Simulator, model: str,
                                                           overflow: bool) -> None:
    # One key, two prefixes, 10 requests a minute each: only GPT-5.6+ adds them up (20 > 15).
    for i in range(10):
        for topic in ("one", "two"):
            post(sim, OPENAI, first_turn(topic, model=model, prompt_cache_key="k"), at(i))
    assert (sim.engine.overflowed > 0) is overflow


def test_sim_time_header_moves_ttls_not_the_clock(sim: Simulator, clock: SimClock) -> None:
    body = first_turn("timed", prompt_cache_key="k")
    post(sim, OPENAI, body, at(100))
    _, _, data = post(sim, OPENAI, body, at(650))
    assert json.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    _, _, data = post(sim, OPENAI, body, at(1251))  # 601 s idle: gone
    assert json.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert clock.now() == 0 and [r.ts for r in sim.requests] == [100, 650, 1251]
    status, _, data = post(sim, OPENAI, body, {"x-sim-time": "soon"})
    assert status == 400 and b"x-sim-time" in data


def test_openrouter_sticky_pin_expires_after_ten_idle_minutes(sim: Simulator) -> None:
    path = "/p/openrouter/api/v1/chat/completions"

    def body(topic: str, n: int) -> dict[str, Any]:
        msgs = [{"role": "system", "content": BIG}, {"role": "user", "content": topic}]
        for i in range(n):
            msgs += [{"role": "assistant", "content": f"a{i}"}, {"role": "user", "content": "q"}]
        return chat(msgs, model="openai/gpt-5.5")

    topics = [f"conversation {i}" for i in range(8)]
    for t in topics:
        for n in range(3):  # a minute apart: the pin holds
            post(sim, path, body(t, n), at(60 * n))
    first = [r.replica for r in sim.requests]
    for i in range(8):
        assert len(set(first[i * 3:(i + 1) * 3])) == 1
    for t in topics:  # 11 idle minutes later the pin is gone: load balanced afresh
        post(sim, path, body(t, 3), at(120 + 660))
    again = [r.replica for r in sim.requests[24:]]
    assert again != first[::3]


def test_shared_cache_providers_ignore_replicas(sim: Simulator) -> None:
    for path, body in (("/p/anthropic/v1/messages", anthropic_turn),
                       ("/p/deepseek/chat/completions", lambda n: chat(convo(n))),
                       ("/p/moonshot/v1/chat/completions", lambda n: chat(convo(n)))):
        for n in range(4):
            assert post(sim, path, body(n))[0] == 200
    assert {r.replica for r in sim.requests} == {0}


# --- automatic prefix caching ---------------------------------------------------------------

def sized(tokens: int) -> str:
    """A string whose canonical JSON (with quotes) estimates to exactly `tokens` tokens."""
    return "a" * (tokens * 4 - 2)


@pytest.mark.parametrize("tokens,cached", [(1023, 0), (1024, 1024), (1151, 1024), (1152, 1152),
                                           (3000, 2944)])
def test_automatic_cache_threshold_and_increments(sim: Simulator, tokens: int,
                                                  cached: int) -> None:
    body = chat([{"role": "user", "content": sized(tokens)}], prompt_cache_key="k")
    _, first = post_json(sim, "/p/openai/v1/chat/completions", body)
    _, second = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] == tokens
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_automatic_cache_counts_the_common_prefix_in_128_token_chunks(sim: Simulator) -> None:
    path = "/p/openai/v1/chat/completions"
    base = [{"role": "system", "content": sized(1500)}, {"role": "user", "content": sized(600)}]
    post_json(sim, path, chat(base, prompt_cache_key="k"))
    changed = [base[0], {"role": "user", "content": sized(600)[:-1] + "b"}]
    _, r = post_json(sim, path, chat(changed, prompt_cache_key="k"))
    # 1500 + 599 tokens in common, token by token, counted in whole 128-token chunks
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 2048
    changed_first = [{"role": "system", "content": "b" + sized(1500)[1:]}, base[1]]
    _, r = post_json(sim, path, chat(changed_first, prompt_cache_key="k"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # the same text under another role is another prompt
    as_user = [{"role": "user", "content": sized(1500)}, base[1]]
    _, r = post_json(sim, path, chat(as_user, prompt_cache_key="k"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_markers_and_string_parts_render_the_same_prompt(sim: Simulator) -> None:
    # A string and a one-part text list are the same prompt; a cache_control or
    # prompt_cache_breakpoint directive is not part of it.
    path = "/p/openai/v1/chat/completions"
    post_json(sim, path, chat([{"role": "system", "content": BIG},
                               {"role": "user", "content": "q"}], prompt_cache_key="k"))
    marked = [{"role": "system", "content": [
        {"type": "text", "text": BIG, "prompt_cache_breakpoint": {"mode": "explicit"}}]},
        {"role": "user", "content": [{"type": "text", "text": "q",
                                      "cache_control": {"type": "ephemeral"}}]}]
    _, r = post_json(sim, path, chat(marked, prompt_cache_key="k"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        r["usage"]["prompt_tokens"] // 128 * 128


def test_gpt_5_6_caches_at_breakpoints_only(sim: Simulator) -> None:
    def send(msgs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        status, r = post_json(sim, OPENAI, chat(msgs, model="gpt-5.6", prompt_cache_key="k",
                                                **extra))
        assert status == 200, r
        details = r["usage"]["prompt_tokens_details"]
        return {"prompt": r["usage"]["prompt_tokens"], "read": details["cached_tokens"],
                "write": details["cache_write_tokens"]}

    one = send(convo(0))
    assert one == {"prompt": one["prompt"], "read": 0, "write": one["prompt"]}
    two = send(convo(1))  # the implicit breakpoint on turn 1's latest message is read
    assert two["read"] == one["prompt"] and two["write"] == two["prompt"] - one["prompt"]
    # Another conversation with the same system prompt: thousands of shared tokens, but no
    # breakpoint ever ended there, so nothing is read (providers.md §3 pitfall)...
    other = [{"role": "system", "content": BIG}, {"role": "user", "content": "other"}]
    assert send(other)["read"] == 0
    # ...until a request marks the end of the stable prefix.
    marked = [{"role": "system", "content": [{"type": "text", "text": BIG,
                                              "prompt_cache_breakpoint": {"mode": "explicit"}}]},
              {"role": "user", "content": "third"}]
    send(marked)
    fourth = send([marked[0], {"role": "user", "content": "fourth"}])
    assert 1024 < fourth["read"] < fourth["prompt"]
    # explicit mode: no implicit breakpoint, so an unmarked prompt writes nothing
    assert send([{"role": "user", "content": BIG + "!"}],
                prompt_cache_options={"mode": "explicit"})["write"] == 0


def test_gpt_5_6_breakpoint_on_an_unsupported_part_is_a_400(sim: Simulator) -> None:
    # The guide: explicit breakpoints on Chat text, image_url, input_audio, file and refusal
    # parts, Responses input_text, input_image and input_file; anything else is rejected.
    mark = {"prompt_cache_breakpoint": {"mode": "explicit"}}
    ok_chat = [{"role": "system", "content": [{"type": "text", "text": BIG, **mark}]},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "no", **mark}]},
               {"role": "user", "content": [{"type": "image_url",
                                             "image_url": {"url": "data:,"}, **mark}]}]
    assert post_json(sim, OPENAI, chat(ok_chat, model="gpt-5.6"))[0] == 200
    for bad in ([{"role": "user", "content": "q", **mark}],  # on a message
                [{"role": "user", "content": [{"type": "text", "text": "q",
                                               "prompt_cache_breakpoint": {"mode": "auto"}}]}]):
        status, err = post_json(sim, OPENAI, chat(bad, model="gpt-5.6"))
        assert status == 400 and "prompt_cache_breakpoint" in err["error"]["message"], err
    tools = [{"type": "function", "function": {"name": "f"}, **mark}]
    assert post_json(sim, OPENAI, chat(convo(0), model="gpt-5.6", tools=tools))[0] == 400
    path = "/p/openai/v1/responses"
    ok = {"model": "gpt-5.6", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": BIG, **mark}]},
        {"type": "function_call_output", "call_id": "c",
         "output": [{"type": "input_text", "text": "out", **mark}]}]}
    assert post_json(sim, path, ok)[0] == 200
    replayed = {"model": "gpt-5.6", "input": [
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "a", **mark}]}]}
    assert post_json(sim, path, replayed)[0] == 400


def test_automatic_cache_idle_ttl(sim: Simulator, clock: SimClock) -> None:
    body = chat(convo(0), prompt_cache_key="k")
    path = "/p/openai/v1/chat/completions"
    post_json(sim, path, body)
    clock.advance(590)
    assert post_json(sim, path, body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    clock.advance(590)  # the hit above refreshed it
    assert post_json(sim, path, body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    clock.advance(601)
    assert post_json(sim, path, body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_auto_ttl_override(clock: SimClock) -> None:
    with Simulator(replicas=1, clock=clock, auto_ttl=30) as s:
        body = chat(convo(0))
        post_json(s, "/v1/chat/completions", body)
        clock.advance(31)
        _, r = post_json(s, "/v1/chat/completions", body)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- Anthropic marker caching ---------------------------------------------------------------

def messages_body(blocks: list[dict[str, Any]], model: str = "claude-sonnet-4-6",
                  **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": blocks}],
            **extra}


def text(t: str, ttl: str | None = None, mark: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": t}
    if ttl or mark:
        block["cache_control"] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return block


def anth(sim: Simulator, body: dict[str, Any]) -> tuple[int, Any]:
    return post_json(sim, "/p/anthropic/v1/messages", body)


def test_five_markers_rejected_with_anthropic_message(sim: Simulator) -> None:
    status, err = anth(sim, messages_body([text(f"b{i}", mark=True) for i in range(5)]))
    assert status == 400
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"] == \
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    assert err["request_id"].startswith("req_")
    # the top-level automatic marker takes one of the four slots
    body = messages_body([text(f"b{i}", mark=True) for i in range(4)],
                         cache_control={"type": "ephemeral"})
    status, err = anth(sim, body)
    assert status == 400 and err["error"]["message"].endswith("Found 5.")
    assert anth(sim, messages_body([text(f"b{i}", mark=True) for i in range(4)]))[0] == 200
    assert sim.requests[0].status == 400 and sim.requests[0].replica == -1
    assert sim.requests[0].usage is None


def test_1h_marker_after_5m_rejected(sim: Simulator) -> None:
    body = messages_body([text("x")], system=[text(BIG, mark=True), text("more", ttl="1h")])
    status, err = anth(sim, body)
    assert status == 400
    assert err["error"]["message"].startswith(
        "system.1.cache_control.ttl: a ttl='1h' cache_control block must not come after a "
        "ttl='5m' cache_control block.")
    ok = messages_body([text("q", mark=True)], system=[text(BIG, ttl="1h"), text("more")])
    status, r = anth(sim, ok)
    assert status == 200
    cc = r["usage"]["cache_creation"]
    assert cc["ephemeral_1h_input_tokens"] > 1024 and cc["ephemeral_5m_input_tokens"] > 0
    assert r["usage"]["cache_creation_input_tokens"] == sum(cc.values())


def test_below_model_minimum_is_silently_uncached(sim: Simulator) -> None:
    body = messages_body([text("q")], model="claude-haiku-4-5-20251001",
                         system=[text(BIG, mark=True)])
    for _ in range(2):
        status, r = anth(sim, body)
        assert status == 200
        u = r["usage"]
        assert u["cache_creation_input_tokens"] == 0 and u["cache_read_input_tokens"] == 0
        assert u["input_tokens"] > 1024
    # the same prompt on a 1024-minimum model is cached
    body["model"] = "claude-sonnet-4-5"
    assert anth(sim, body)[1]["usage"]["cache_creation_input_tokens"] > 1024


def test_anthropic_minimum_table() -> None:
    assert anthropic_minimum("claude-opus-4-6") == 4096
    assert anthropic_minimum("claude-haiku-4-5-20251001") == 4096
    assert anthropic_minimum("claude-sonnet-4-5-20250929") == 1024
    assert anthropic_minimum("anthropic/claude-sonnet-4.6") == 1024
    assert anthropic_minimum("claude-opus-4-8[1m]") == 1024
    assert anthropic_minimum("claude-sonnet-5") == 1024
    assert anthropic_minimum("claude-opus-5") == 512
    assert anthropic_minimum("claude-3-5-sonnet-20241022") == 1024
    assert anthropic_minimum("something-else") == 1024


def test_reads_only_at_prefixes_that_ended_at_a_marker(sim: Simulator) -> None:
    # turn 1 marks the end of the first user message: the system prefix alone is never written
    _, r1 = anth(sim, messages_body([text("question one", mark=True)], system=[text(BIG)]))
    assert r1["usage"]["cache_creation_input_tokens"] > 1024
    _, r2 = anth(sim, messages_body([text("question two", mark=True)], system=[text(BIG)]))
    assert r2["usage"]["cache_read_input_tokens"] == 0  # shares the system bytes, but no marker
    # marking the system block writes that prefix; a later request reads it
    anth(sim, messages_body([text("three")], system=[text(BIG, mark=True)]))
    _, r4 = anth(sim, messages_body([text("four", mark=True)], system=[text(BIG)]))
    assert r4["usage"]["cache_read_input_tokens"] > 1024
    # only the "four" block up to its marker is written; nothing after the last marker
    assert 0 < r4["usage"]["cache_creation_input_tokens"] < 20
    assert r4["usage"]["input_tokens"] == 0


@pytest.mark.parametrize("distance,hit", [(1, True), (19, True), (20, False), (25, False)])
def test_twenty_block_lookback(sim: Simulator, distance: int, hit: bool) -> None:
    blocks = [text(BIG)] + [text(f"block {i}") for i in range(30)]
    first = [dict(b) for b in blocks[:5]]
    first[-1] = text(first[-1]["text"], mark=True)
    _, r1 = anth(sim, messages_body(first))
    written = r1["usage"]["cache_creation_input_tokens"]
    assert written > 1024
    second = [dict(b) for b in blocks[:5 + distance]]
    second[-1] = text(second[-1]["text"], mark=True)
    _, r2 = anth(sim, messages_body(second))
    assert r2["usage"]["cache_read_input_tokens"] == (written if hit else 0)
    # an intermediate marker at the old position restores the hit
    second[4] = text(second[4]["text"], mark=True)
    _, r3 = anth(sim, messages_body(second))
    assert r3["usage"]["cache_read_input_tokens"] >= written


def test_marker_ttl_expiry_on_the_sim_clock(sim: Simulator, clock: SimClock) -> None:
    body5 = messages_body([text("q")], system=[text(BIG, mark=True)])
    written = anth(sim, body5)[1]["usage"]["cache_creation_input_tokens"]
    clock.advance(299)
    assert anth(sim, body5)[1]["usage"]["cache_read_input_tokens"] == written
    clock.advance(299)  # a hit refreshes the 5 minutes
    assert anth(sim, body5)[1]["usage"]["cache_read_input_tokens"] == written
    clock.advance(301)
    u = anth(sim, body5)[1]["usage"]
    assert u["cache_read_input_tokens"] == 0 and u["cache_creation_input_tokens"] == written

    body1h = messages_body([text("q")], system=[text(BIG + "!", ttl="1h")])
    anth(sim, body1h)
    clock.advance(3000)
    assert anth(sim, body1h)[1]["usage"]["cache_read_input_tokens"] > 0
    clock.advance(3601)
    assert anth(sim, body1h)[1]["usage"]["cache_read_input_tokens"] == 0


def test_top_level_automatic_marker_moves_forward(sim: Simulator) -> None:
    def body(n: int) -> dict[str, Any]:
        msgs = []
        for i in range(n + 1):
            msgs.append({"role": "user", "content": f"q{i}"})
            if i < n:
                msgs.append({"role": "assistant",
                             "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                         {"type": "text", "text": f"a{i}"}]})
        return {"model": "claude-sonnet-4-6", "max_tokens": 8, "system": BIG, "messages": msgs,
                "cache_control": {"type": "ephemeral"}}

    u1 = anth(sim, body(0))[1]["usage"]
    assert u1["cache_creation_input_tokens"] > 1024 and u1["input_tokens"] == 0
    u2 = anth(sim, body(1))[1]["usage"]
    assert u2["cache_read_input_tokens"] == u1["cache_creation_input_tokens"]
    assert u2["cache_creation_input_tokens"] > 0 and u2["input_tokens"] == 0


# --- usage fields per provider, JSON and SSE ---------------------------------------------------

def stream_chunks(sim: Simulator, path: str, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> list[Any]:
    status, h, data = post(sim, path, body, headers)
    assert status == 200 and h["content-type"] == "text/event-stream", data
    return [d if d == "[DONE]" else json.loads(d) for _, d in sse_events(data)]


def test_deepseek_usage(sim: Simulator) -> None:
    path = "/p/deepseek/chat/completions"
    post_json(sim, path, chat(convo(0), model="deepseek-chat"))
    _, r = post_json(sim, path, chat(convo(1), model="deepseek-chat"))
    u = r["usage"]
    assert u["prompt_cache_hit_tokens"] > 1024
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert "prompt_tokens_details" not in u
    chunks = stream_chunks(sim, path, chat(convo(1), model="deepseek-chat", stream=True,
                                           stream_options={"include_usage": True}))
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == []
    u = chunks[-2]["usage"]
    # identical resend: whole 64-token storage units (news0802)
    assert u["prompt_cache_hit_tokens"] == u["prompt_tokens"] // 64 * 64


def test_moonshot_usage(sim: Simulator) -> None:
    path = "/p/moonshot/v1/chat/completions"
    post_json(sim, path, chat(convo(0), model="kimi-k2.6"))
    _, r = post_json(sim, path, chat(convo(1), model="kimi-k2.6"))
    assert r["usage"]["cached_tokens"] > 1024 and "prompt_tokens_details" not in r["usage"]
    # streaming: usage sits in choices[0].usage of the finish chunk, even without include_usage
    chunks = stream_chunks(sim, path, chat(convo(1), model="kimi-k2.6", stream=True))
    assert chunks[-1] == "[DONE]"
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["usage"]["cached_tokens"] > 1024
    assert all("usage" not in c for c in chunks[:-1])


def test_openrouter_usage_always_streamed(sim: Simulator) -> None:
    path = "/p/openrouter/api/v1/chat/completions"
    _, r = post_json(sim, path, chat(convo(0), model="openai/gpt-5.5"))
    u = r["usage"]
    assert u["cost"] > 0 and u["cost_details"]["upstream_inference_cost"] == u["cost"]
    assert u["prompt_tokens_details"]["cache_write_tokens"] == 0  # free before GPT-5.6
    _, r = post_json(sim, path, chat(convo(0), model="openai/gpt-5.6"))
    assert r["usage"]["prompt_tokens_details"]["cache_write_tokens"] == r["usage"]["prompt_tokens"]
    chunks = stream_chunks(sim, path, chat(convo(0), model="openai/gpt-5.6", stream=True))
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["cost"] > 0


def test_xai_usage(sim: Simulator) -> None:
    path = "/p/xai/v1/chat/completions"
    for n in range(2):
        _, r = post_json(sim, path, chat(convo(n), model="grok-4"), x_grok_conv_id="c")
    details = r["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] > 1024 and "cache_write_tokens" not in details
    assert details["text_tokens"] == r["usage"]["prompt_tokens"]
    for n in range(2):
        _, r = post_json(sim, "/p/xai/v1/responses", responses_turn(n, prompt_cache_key="c"))
    assert r["object"] == "response" and r["id"].startswith("resp_")
    assert r["usage"]["input_tokens_details"] == {"cached_tokens": r["usage"]["input_tokens_details"]
                                                  ["cached_tokens"]}
    assert r["usage"]["input_tokens_details"]["cached_tokens"] > 1024


def test_openai_responses_sdk(sim: Simulator) -> None:
    client = openai.OpenAI(base_url=sim.url + "/p/openai/v1", api_key="sk-test", max_retries=0)
    first = client.responses.create(model="gpt-5.6", input=responses_turn(0)["input"],
                                    prompt_cache_key="r1")
    assert first.output_text == "ok" and first.usage.input_tokens_details.cached_tokens == 0
    events = list(client.responses.create(model="gpt-5.6", input=responses_turn(1)["input"],
                                          prompt_cache_key="r1", stream=True))
    assert events[0].type == "response.created" and events[0].response.usage is None
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.input_tokens_details.cached_tokens > 1024
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_codex_sse_and_constraints(sim: Simulator) -> None:
    path = "/p/codex/backend-api/codex/responses"
    chunks = stream_chunks(sim, path, responses_turn(0, stream=True, store=False,
                                                      prompt_cache_key="s"), {"session-id": "s"})
    names = [c["type"] for c in chunks]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert "response.output_text.delta" in names
    usage = chunks[-1]["response"]["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert chunks[-1]["response"]["prompt_cache_key"] == "s"

    status, err = post_json(sim, path, responses_turn(0, store=False))
    assert status == 400 and "stream" in err["detail"].lower()
    for extra in ({"prompt_cache_retention": "24h"},
                  {"prompt_cache_options": {"mode": "explicit"}}):
        status, err = post_json(sim, path, responses_turn(0, stream=True, **extra))
        assert status == 400 and next(iter(extra)) in err["detail"]
    nested = responses_turn(0, stream=True)
    nested["input"][1]["content"][0]["prompt_cache_breakpoint"] = {"mode": "explicit"}
    status, err = post_json(sim, path, nested)
    assert status == 400 and "prompt_cache_breakpoint" in err["detail"]


def test_codex_zstd_request_body(sim: Simulator) -> None:
    body = responses_turn(0, stream=True, store=False, prompt_cache_key="z")
    compressed = encoding.encode(json.dumps(body).encode(), "zstd")
    status, _, data = post(sim, "/p/codex/backend-api/codex/responses", None,
                           {"content-encoding": "zstd"}, raw=compressed)
    assert status == 200 and b"response.completed" in data
    req = sim.requests[-1]
    assert req.raw_body == compressed and req.body == body
    assert req.header("Content-Encoding") == "zstd"
    status, _, _ = post(sim, "/p/codex/backend-api/codex/responses", None,
                        {"content-encoding": "zstd"}, raw=b"not zstd at all")
    assert status == 400


def test_openai_rejects_retention_with_options_ttl(sim: Simulator) -> None:
    body = chat(convo(0), prompt_cache_retention="24h", prompt_cache_options={"ttl": "30m"})
    status, err = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert status == 400 and err["error"]["type"] == "invalid_request_error"


def test_gemini_native_usage(sim: Simulator) -> None:
    big = BIG * 2  # Gemini 2.5 caches from 2,048 tokens (providers.md §9)
    body = {"systemInstruction": {"parts": [{"text": big}]},
            "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    path = "/p/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    _, first = post_json(sim, path, body)
    meta = first["usageMetadata"]
    assert meta["promptTokenCount"] > 1024 and "cachedContentTokenCount" not in meta
    assert first["modelVersion"] == "gemini-2.5-flash"
    _, second = post_json(sim, path, body)
    assert second["usageMetadata"]["cachedContentTokenCount"] > 1024
    chunks = stream_chunks(sim, path.replace(":generateContent", ":streamGenerateContent") +
                           "?alt=sse", body)
    assert len(chunks) == 2 and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "cachedContentTokenCount" not in chunks[0]["usageMetadata"]
    assert chunks[-1]["usageMetadata"]["cachedContentTokenCount"] > 1024
    status, h, data = post(sim, path.replace(":generateContent", ":streamGenerateContent"), body)
    assert status == 200 and h["content-type"] == "application/json"
    assert isinstance(json.loads(data), list)
    assert sim.requests[-1].query == "" and sim.requests[-2].query == "alt=sse"


@pytest.mark.parametrize("model,tokens,cached", [
    ("gemini-2.5-flash", 2000, False), ("gemini-2.5-pro", 2100, True),
    ("gemini-3-flash", 4000, False), ("gemini-3.1-pro-preview", 4200, True)])
def test_gemini_minimum_per_model(sim: Simulator, model: str, tokens: int, cached: bool) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": sized(tokens)}]}]}
    path = f"/p/gemini/v1beta/models/{model}:generateContent"
    post_json(sim, path, body)
    meta = post_json(sim, path, body)[1]["usageMetadata"]
    assert ("cachedContentTokenCount" in meta) is cached, meta


def test_proxy_with_anthropic_sdk_headers(sim: Simulator) -> None:
    client = anthropic.Anthropic(base_url=sim.url + "/p/proxy", api_key="k", max_retries=0,
                                 default_headers={"X-Session-Id": "sess-1"})
    for n in range(3):
        body = anthropic_turn(n)
        client.messages.create(model=body["model"], max_tokens=8, system=body["system"],
                               messages=body["messages"])
    assert len({r.replica for r in sim.requests}) == 1
    assert all(r.provider == "proxy" for r in sim.requests)
    assert sim.requests[-1].usage["cache_read_input_tokens"] > 1024


# --- provider selection --------------------------------------------------------------------

def test_provider_by_prefix_host_or_default(sim: Simulator) -> None:
    post(sim, "/v1/chat/completions", chat(convo(0)), {"Host": "api.x.ai"})
    post(sim, "/v1/messages", anthropic_turn(0), {"Host": "api.anthropic.com:443"})
    post(sim, "/v1/chat/completions", chat(convo(0)), {"Host": "example.com"})
    status, _, _ = post(sim, "/p/nope/v1/chat/completions", chat(convo(0)))
    assert status == 404
    status, err = post_json(sim, "/p/anthropic/v1/complete", {"model": "claude"})
    assert status == 404 and err["error"]["type"] == "not_found_error"
    assert [r.provider for r in sim.requests] == ["xai", "anthropic", "openai", "nope",
                                                  "anthropic"]
    assert sim.requests[-1].path == "/v1/complete"
    with Simulator(default_provider="anthropic") as other:
        assert post(other, "/v1/messages", anthropic_turn(0))[0] == 200
        assert other.requests[0].provider == "anthropic"
    with pytest.raises(ValueError, match="unknown default provider"):
        Simulator(default_provider="nope")


def test_non_json_body_is_a_400(sim: Simulator) -> None:
    status, _, data = post(sim, "/p/openai/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and json.loads(data)["error"]["message"]
    assert sim.requests[0].body is None and sim.requests[0].raw_body == b"{not json"


# --- compression, delays, concurrency ------------------------------------------------------

@pytest.mark.parametrize("enc", ["gzip", "br", "zstd"])
def test_compressed_responses(sim: Simulator, enc: str) -> None:
    status, h, data = post(sim, "/p/anthropic/v1/messages", anthropic_turn(0),
                           {"x-sim-compress": enc})
    assert status == 200 and h["content-encoding"] == enc
    assert json.loads(encoding.decode(data, enc))["usage"]["cache_creation_input_tokens"] > 0
    body = anthropic_turn(0) | {"stream": True}
    status, h, data = post(sim, "/p/anthropic/v1/messages", body, {"x-sim-compress": enc})
    assert status == 200 and h["content-encoding"] == enc
    assert h["content-type"] == "text/event-stream"
    events = sse_events(encoding.decode(data, enc))
    assert [e for e, _ in events][-1] == "message_stop" and len(events) == 7


def test_compressed_sse_is_flushed_per_event(sim: Simulator) -> None:
    import zlib
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        body = json.dumps(anthropic_turn(0) | {"stream": True})
        start = time.monotonic()
        conn.request("POST", "/p/anthropic/v1/messages", body=body,
                     headers={"x-sim-compress": "gzip", "x-sim-event-delay-ms": "100"})
        resp = conn.getresponse()
        decoder = zlib.decompressobj(47)
        seen = b""
        while b"event: message_start" not in seen:
            chunk = resp.read1(65536)
            assert chunk, "stream ended before the first event decoded"
            seen += decoder.decompress(chunk)
        first_event_at = time.monotonic() - start
        rest = resp.read()
        total = time.monotonic() - start
        seen += decoder.decompress(rest) + decoder.flush()
    finally:
        conn.close()
    assert b"event: message_stop" in seen
    assert 0.09 < first_event_at < total - 0.4 and total > 0.65  # 7 events, 100 ms apart


def test_event_delay_sets_time_to_first_byte(clock: SimClock) -> None:
    with Simulator(replicas=1, clock=clock, event_delay=0.15) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        start = time.monotonic()
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps(chat(convo(0), stream=True)))
        resp = conn.getresponse()
        headers_at = time.monotonic() - start
        resp.read1(1)
        first_byte_at = time.monotonic() - start
        resp.read()
        conn.close()
    assert headers_at + 0.1 < first_byte_at and 0.14 < first_byte_at < 2


def test_keep_alive_connection_reused(sim: Simulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        for stream in (False, True, False):
            conn.request("POST", "/p/openai/v1/chat/completions",
                         body=json.dumps(chat(convo(0), stream=stream)))
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
            sock = conn.sock
            assert sock is not None
    finally:
        conn.close()
    assert len(sim.requests) == 3


def test_two_hundred_concurrent_streams(sim: Simulator) -> None:
    n = 200
    results: list[bytes | Exception] = [b""] * n
    barrier = threading.Barrier(n, timeout=20)

    def one(i: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
            body = json.dumps(anthropic_turn(0) | {"stream": True})
            barrier.wait()
            conn.request("POST", "/p/anthropic/v1/messages", body=body,
                         headers={"x-sim-event-delay-ms": "100"})
            results[i] = conn.getresponse().read()
            conn.close()
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert all(isinstance(r, bytes) and r.rstrip().endswith(b'{"type":"message_stop"}')
               for r in results)
    assert len(sim.requests) == n
    assert elapsed < 15  # 0.7 s of events each: they ran in parallel, not one after another


# --- control API and CLI -------------------------------------------------------------------

def control(url: str, method: str, path: str) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_control_api(sim: Simulator, clock: SimClock) -> None:
    status, health = control(sim.url, "GET", "/_sim/health")
    assert status == 200 and health["ok"] is True and health["replicas"] == 4
    assert health["overflowed"] == 0  # requests an RPM limit sent off their home machine
    body = chat(convo(0), prompt_cache_key="k")
    post(sim, "/p/openai/v1/chat/completions", body, {"Authorization": "Bearer sk-secret"})
    _, listed = control(sim.url, "GET", "/_sim/requests")
    assert len(listed) == 1 and "body" not in listed[0]
    entry = listed[0]
    assert entry["provider"] == "openai" and entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200 and entry["usage"]["prompt_tokens"] > 0
    assert ["Authorization", "<redacted>"] in entry["headers"]
    assert "sk-secret" not in json.dumps(listed)
    _, with_bodies = control(sim.url, "GET", "/_sim/requests?bodies=1")
    assert with_bodies[0]["body"] == body
    _, moved = control(sim.url, "POST", "/_sim/advance?seconds=42.5")
    assert moved["now"] == 42.5 == clock.now()
    _, cached = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert control(sim.url, "POST", "/_sim/reset") == (200, {"ok": True})
    assert sim.requests == [] and control(sim.url, "GET", "/_sim/requests")[1] == []
    _, fresh = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # caches forgotten
    assert control(sim.url, "POST", "/_sim/advance?seconds=-1")[0] == 400
    post(sim, "/p/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=AIza-secret",
         {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    _, listed = control(sim.url, "GET", "/_sim/requests")
    assert listed[-1]["query"] == "key=<redacted>" and listed[-1]["ts"] == 42.5
    assert sim.requests[-1].query == "key=AIza-secret"  # in-process records stay exact
    assert control(sim.url, "GET", "/_sim/nope")[0] == 404


def test_cli_subprocess() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.sim", "--port", "0",
                             "--replicas", "2", "--event-delay", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        status, health = control(url, "GET", "/_sim/health")
        assert status == 200 and health["replicas"] == 2
        client = openai.OpenAI(base_url=url + "/p/openai/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="m", messages=convo(0)).usage.prompt_tokens
        assert len(control(url, "GET", "/_sim/requests")[1]) == 1
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 0


def test_start_on_a_given_port(clock: SimClock) -> None:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sim = Simulator(replicas=1, clock=clock).start(port=port)
    try:
        assert sim.port == port and sim.url == f"http://127.0.0.1:{port}"
        assert control(sim.url, "GET", "/_sim/health")[0] == 200
    finally:
        sim.stop()
    sim.stop()  # idempotent


# --- independence: the simulator is an oracle for the addon, so it must not reuse its code ------

def test_simulator_imports_nothing_from_the_addon() -> None:
    # Every module of tests.sim, imported in a fresh interpreter: not one affinity_addon module
    # gets loaded (an AST scan would miss an import hidden behind another package).
    code = ("import pkgutil, importlib, sys, tests.sim as s\n"
            "for m in pkgutil.iter_modules(s.__path__):\n"
            "    importlib.import_module('tests.sim.' + m.name)\n"
            "print('\\n'.join(sorted(n for n in sys.modules if n.split('.')[0] == 'affinity_addon')))\n"
            "print('modules', sum(1 for n in sys.modules if n.startswith('tests.sim.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    *leaked, count = [line for line in r.stdout.splitlines() if line]
    assert leaked == [] and int(count.split()[1]) >= 9, r.stdout
    # and no source file imports it, even in a function-level import
    import ast
    for path in (ROOT / "tests" / "sim").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "affinity_addon" for n in names), path


# --- other providers' Anthropic-compatible endpoints (§20.3) -------------------------------------

BILLING_BLOCK = "x-anthropic-billing-header: cc_version=2.1.197.{}; cc_entrypoint=cli;"


def compat_body(suffix: str | None, question: str, *, marker: bool = False) -> dict[str, Any]:
    """Claude Code's shape: billing block, system prompt, tools, one user message."""
    system: list[dict[str, Any]] = [{"type": "text", "text": "Be careful. " * 400}]
    if suffix is not None:
        system.insert(0, {"type": "text", "text": BILLING_BLOCK.format(suffix)})
    if marker:
        system[-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": "claude-sonnet-4-5", "max_tokens": 8, "system": system,
            "tools": [{"name": "Read", "description": "reads a file " * 200,
                       "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": question}]}


@pytest.mark.parametrize("path", ["/p/deepseek/anthropic/v1/messages",
                                  "/p/deepseek/anthropic/messages",
                                  "/p/moonshot/anthropic/v1/messages",
                                  "/p/kimi/coding/v1/messages",
                                  "/p/zai/api/anthropic/v1/messages"])
def test_compatible_endpoints_cache_by_prefix_from_token_zero(sim: Simulator, path: str) -> None:
    """The billing block is prompt text at token 0: a new conversation reads nothing of the
    system prompt and tools the last one cached; without the block it reads them all. No
    writes are reported, and markers change nothing."""
    headers = {"x-session-id": "s1"}  # Z.ai: one node, as its routing header asks
    s, r = post_json(sim, path, compat_body("14a", "first question"), **headers)
    assert s == 200 and r["usage"]["cache_read_input_tokens"] == 0
    _, r = post_json(sim, path, compat_body("191", "second conversation"), **headers)
    assert r["usage"]["cache_read_input_tokens"] == 0  # a different block at token 0
    assert r["usage"]["cache_creation_input_tokens"] == 0
    post_json(sim, path, compat_body(None, "third conversation"), **headers)
    _, r = post_json(sim, path, compat_body(None, "fourth conversation", marker=True), **headers)
    u = r["usage"]
    total = u["input_tokens"] + u["cache_read_input_tokens"]
    assert u["cache_read_input_tokens"] / total > 0.9 and u["cache_creation_input_tokens"] == 0
    assert set(u) == {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                      "output_tokens"}


@pytest.mark.parametrize("path", ["/p/dashscope/apps/anthropic/v1/messages",
                                  "/p/minimax/anthropic/v1/messages"])
def test_explicit_markers_or_the_implicit_cache(sim: Simulator, path: str) -> None:
    _, r = post_json(sim, path, compat_body(None, "a", marker=True))
    assert r["usage"]["cache_creation_input_tokens"] > 0  # explicit: a write at the marker
    _, r = post_json(sim, path, compat_body(None, "b", marker=True))
    assert r["usage"]["cache_read_input_tokens"] > 0 == r["usage"]["cache_creation_input_tokens"]
    _, r = post_json(sim, path, compat_body(None, "c"))  # no marker: the implicit cache
    assert r["usage"]["cache_creation_input_tokens"] == 0


def test_zai_session_id_keeps_a_session_on_one_node(clock: SimClock) -> None:
    with Simulator(replicas=4, clock=clock, seed=1) as s:
        path = "/p/zai/api/anthropic/v1/messages"
        reads = [post_json(s, path, compat_body(None, "q"))[1]["usage"]["cache_read_input_tokens"]
                 for _ in range(12)]
        assert 0 in reads[1:]  # the load balancer's pick: some land on a cold node
        reads = [post_json(s, path, compat_body(None, "r"), x_session_id="conv-1")[1]["usage"]
                 ["cache_read_input_tokens"] for _ in range(6)]
        assert all(n > 0 for n in reads[1:])
