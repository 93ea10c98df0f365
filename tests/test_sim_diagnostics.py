"""The simulator's cache diagnostics, talked to directly (no proxy): each documented answer of
Anthropic's and OpenAI's, JSON and SSE, parsed by the official SDKs (tests/sim/diagnostics.py
says which doc each comes from)."""

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.sim import SimClock, Simulator
from tests.test_simulator import BIG, post, sse_events

pytestmark = pytest.mark.slow  # a simulator server per test


@pytest.fixture
def sim():
    with Simulator(replicas=1, clock=SimClock(), seed=0) as s:
        yield s


def claude(sim: Simulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sim.url + "/p/anthropic", api_key="sk-ant-test",
                               max_retries=0)


def gpt(sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/p/openai/v1", api_key="sk-test", max_retries=0)


TOOLS = [{"name": f"tool{i}", "description": f"does {i}", "input_schema": {"type": "object"}}
         for i in range(3)]


def turn(n: int, *, system: str = BIG, tools: list[dict[str, Any]] = TOOLS,
         edit: int | None = None) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    for i in range(n + 1):
        msgs.append({"role": "user", "content": f"question {i}" + (" edited" if i == edit
                                                                   else "")})
        if i < n:
            msgs.append({"role": "assistant", "content": f"answer {i}"})
    return {"model": "claude-sonnet-4-6", "max_tokens": 16, "tools": tools,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": msgs}


def reason(message: Any) -> str | None:
    d = message.diagnostics
    if d is None:
        return None
    return "pending" if d.cache_miss_reason is None else d.cache_miss_reason.type


def test_anthropic_each_documented_answer(sim: Simulator) -> None:
    c = claude(sim)
    first = c.messages.create(**turn(0), diagnostics={"previous_message_id": None})
    assert first.diagnostics is None  # an opt-in compares nothing
    prev = first.id
    cases = [
        (turn(1), None),  # only appended: nothing diverged
        (turn(2, tools=TOOLS[::-1]), "tools_changed"),
        (turn(3, tools=TOOLS[::-1], system=BIG + " v2"), "system_changed"),
        ({**turn(4, tools=TOOLS[::-1], system=BIG + " v2"), "model": "claude-opus-4-8"},
         "model_changed"),
        ({**turn(5, tools=TOOLS[::-1], system=BIG + " v2"), "model": "claude-opus-4-8",
          "speed": "fast"}, "model_changed"),  # "model or speed"
        ({**turn(6, tools=TOOLS[::-1], system=BIG + " v2", edit=1), "model": "claude-opus-4-8",
          "speed": "fast"}, "messages_changed"),
        ({**turn(7, tools=TOOLS[::-1], system=BIG + " v2", edit=1), "model": "claude-opus-4-8",
          "speed": "fast", "tool_choice": {"type": "any"}}, "unavailable"),
    ]
    for body, expected in cases:
        msg = c.messages.create(**body, diagnostics={"previous_message_id": prev})
        assert reason(msg) == expected, body.get("model")
        if expected not in (None, "unavailable"):
            assert msg.diagnostics.cache_miss_reason.cache_missed_input_tokens > 0
        prev = msg.id
    gone = c.messages.create(**turn(1), diagnostics={"previous_message_id": "msg_unknown"})
    assert reason(gone) == "previous_message_not_found"


def test_anthropic_stores_only_requests_that_opt_in(sim: Simulator) -> None:
    c = claude(sim)
    plain = c.messages.create(**turn(0))
    assert plain.diagnostics is None
    msg = c.messages.create(**turn(1), diagnostics={"previous_message_id": plain.id})
    assert reason(msg) == "previous_message_not_found"
    # Another workspace's response is not found either.
    other = anthropic.Anthropic(base_url=sim.url + "/p/anthropic", api_key="sk-ant-other",
                                max_retries=0)
    assert reason(other.messages.create(**turn(2), diagnostics={
        "previous_message_id": msg.id})) == "previous_message_not_found"


def test_anthropic_diagnostics_on_message_start_only(sim: Simulator) -> None:
    c = claude(sim)
    first = c.messages.create(**turn(0), diagnostics={"previous_message_id": None})
    body = {**turn(1, tools=TOOLS[1:]), "stream": True,
            "diagnostics": {"previous_message_id": first.id}}
    status, _, data = post(sim, "/p/anthropic/v1/messages", body, {"x-api-key": "sk-ant-test"})
    events = [(e, json.loads(d)) for e, d in sse_events(data)]
    assert status == 200 and events[0][0] == "message_start"
    assert events[0][1]["message"]["diagnostics"]["cache_miss_reason"]["type"] == "tools_changed"
    assert all("diagnostics" not in d for _, d in events[1:])
    with c.messages.stream(**turn(1), diagnostics={"previous_message_id": first.id}) as s:
        final = s.get_final_message()
    assert final.diagnostics is None  # parsed by the SDK from message_start


@pytest.mark.parametrize("fault, expected", [
    ("diagnosis=pending", "pending"), ("diagnosis=tools_changed", "tools_changed"),
    ("diagnosis=cache_evicted", "cache_evicted")])
def test_anthropic_knobs(sim: Simulator, fault: str, expected: str) -> None:
    c = claude(sim)
    first = c.messages.create(**turn(0), diagnostics={"previous_message_id": None})
    msg = c.messages.create(**turn(1), diagnostics={"previous_message_id": first.id},
                            extra_headers={"x-sim-fault": fault})
    assert reason(msg) == expected


def test_anthropic_reject_knob_names_the_field(sim: Simulator) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(sim).messages.create(**turn(0), diagnostics={"previous_message_id": None},
                                    extra_headers={"x-sim-fault": "reject-diagnostics"})
    assert "diagnostics" in str(e.value)
    # Without the field the knob changes nothing.
    claude(sim).messages.create(**turn(0), extra_headers={"x-sim-fault": "reject-diagnostics"})


def responses(n: int, *, model: str = "gpt-5.6", **extra: Any) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for i in range(n + 1):
        items.append({"role": "user", "content": f"question {i}"})
        if i < n:
            items.append({"role": "assistant", "content": f"answer {i}"})
    return {"model": model, "instructions": BIG, "input": items, **extra}


def diag(r: Any) -> str | None:
    d = r.prompt_cache_diagnostics
    if d is None:
        return None
    return d.reason if d.type == "cache_miss" else d.type


def test_openai_each_documented_answer(sim: Simulator) -> None:
    c = gpt(sim)
    first = c.responses.create(**responses(0))
    assert first.prompt_cache_diagnostics is None
    prev = first.id
    cases = [
        (responses(1), "cache_hit"),
        (responses(2, reasoning={"effort": "high"}), "reasoning_effort_changed"),
        (responses(3, reasoning={"effort": "high"}, tools=[
            {"type": "function", "name": "get_time", "parameters": {"type": "object"}}]),
         "tools_changed"),
        (responses(4, reasoning={"effort": "high"}, tools=[
            {"type": "function", "name": "get_date", "parameters": {"type": "object"}}]),
         "tools_changed"),
        ({**responses(5, reasoning={"effort": "high"}), "instructions": BIG + " v2"},
         "tools_changed"),
        ({**responses(6, reasoning={"effort": "high"}), "instructions": BIG + " v2"},
         "cache_hit"),
        ({**responses(7, reasoning={"effort": "high"}), "instructions": BIG + " v3"},
         "input_changed"),
        (responses(8, model="gpt-5.6-mini", reasoning={"effort": "high"},
                   instructions=BIG + " v3"), "model_changed"),
        (responses(9, model="gpt-5.6-mini", reasoning={"effort": "high"},
                   instructions=BIG + " v3", prompt_cache_key="k2"), "prompt_cache_key_changed"),
    ]
    for body, expected in cases:
        r = c.responses.create(**body, prompt_cache_options={"comparison_response_id": prev})
        assert diag(r) == expected, body
        assert r.prompt_cache_options is not None
        assert r.prompt_cache_options.comparison_response_id == prev
        if expected != "cache_hit":
            assert r.prompt_cache_diagnostics.cache_missed_tokens > 0
        prev = r.id
    gone = c.responses.create(**responses(1), prompt_cache_options={
        "comparison_response_id": "resp_unknown"})
    assert diag(gone) == "comparison_response_not_found"
    old = c.responses.create(**responses(1, model="gpt-5.5"), prompt_cache_options={
        "comparison_response_id": first.id})
    assert diag(old) == "unavailable"  # model unsupported


def test_openai_diagnosis_in_response_completed(sim: Simulator) -> None:
    c = gpt(sim)
    first = c.responses.create(**responses(0))
    stream = c.responses.create(**responses(1, tools=[
        {"type": "function", "name": "f", "parameters": {"type": "object"}}]),
        prompt_cache_options={"comparison_response_id": first.id}, stream=True)
    events = list(stream)
    created = next(e for e in events if e.type == "response.created")
    done = next(e for e in events if e.type == "response.completed")
    assert created.response.prompt_cache_diagnostics is None
    assert diag(done.response) == "tools_changed"
