"""The provider simulator's routing, talked to directly (no proxy): each provider's affinity
signal pins a replica, OpenAI's prefix+key machines and their RPM overflow, sticky pins."""

import json
from typing import Any

import pytest

from tests.sim import SimClock, Simulator
from tests.sim_client import (
    BIG,
    OPENAI,
    anthropic_turn,
    chat,
    convo,
    post,
    post_json,
    responses_turn,
)


@pytest.fixture
def clock() -> SimClock:
    """Virtual time from 0 (conftest's starts at 1e6): times below are absolute."""
    return SimClock()


# --- routing: each provider's affinity signal --------------------------------------------------

def hit_ratio(usage: dict[str, Any]) -> float:
    if "cache_read_input_tokens" in usage:  # Anthropic: input_tokens excludes cached tokens
        read = usage["cache_read_input_tokens"]
        return read / (usage["input_tokens"] + read + usage["cache_creation_input_tokens"])
    if "input_tokens" in usage:
        return usage["input_tokens_details"]["cached_tokens"] / usage["input_tokens"]
    return usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"]








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
