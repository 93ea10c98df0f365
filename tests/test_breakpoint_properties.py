"""The breakpoint planner's invariants over generated Anthropic and OpenAI-chat bodies: limits,
TTL order, eligible blocks only, exact undo."""

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affinity_addon.request.breakpoint_spec import parse_cache_control
from affinity_addon.request.breakpoints import plan_breakpoints, strip_added
from affinity_addon.request.prompt_slots import count_markers
from tests.breakpoint_helpers import (
    CC,
    CC1H,
    MODEL,
    resolve,
    text,
    tools,
    ttl_order_ok,
    walk_markers,
)

# ---------------------------------------------------------------------------------------------
# properties over generated bodies

TEXTS = st.one_of(st.sampled_from(["", "  ", "ok", "hello world"]),
                  st.integers(1, 6000).map(lambda n: "y" * n))
SPECS = st.fixed_dictionaries({}, optional={
    "strategy": st.just("agent"),
    "ttl": st.sampled_from(["5m", "1h"]),
    "client_markers": st.sampled_from(["skip", "fill", "fill"]),
    "lookback": st.sampled_from([1, 3, 20]),
    "min_tokens": st.sampled_from(["auto", 0, 0, 300]),
    "last_marker_only": st.booleans(),
}) | st.fixed_dictionaries({
    "placements": st.lists(st.one_of(st.sampled_from(["tools", "system", "last_user", "auto"]),
                                     st.integers(1, 4).map(lambda k: {"last_n": k})),
                           min_size=1, max_size=5),
}, optional={
    "ttl": st.sampled_from(["5m", "1h"]),
    "client_markers": st.sampled_from(["skip", "fill", "fill"]),
    "min_tokens": st.sampled_from(["auto", 0, 0]),
    "last_marker_only": st.booleans(),
})
MODELS = st.sampled_from([MODEL, "claude-haiku-4-5", "anthropic/claude-opus-4.5",
                          "google/gemini-2.5-pro", "qwen3-coder-plus", None])


@st.composite
def anthropic_blocks(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["text", "text", "thinking", "redacted", "tool_use",
                                 "tool_result", "image"]))
    if kind == "text":
        return text(draw(TEXTS))
    if kind == "thinking":
        return {"type": "thinking", "thinking": draw(TEXTS), "signature": "s"}
    if kind == "redacted":
        return {"type": "redacted_thinking", "data": "zz"}
    if kind == "tool_use":
        return {"type": "tool_use", "id": "tu", "name": "f", "input": {"q": draw(TEXTS)}}
    if kind == "image":
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": "AAAA"}}
    content = draw(st.one_of(TEXTS, st.lists(st.builds(text, TEXTS), max_size=3)))
    return {"type": "tool_result", "tool_use_id": "tu", "content": content}


@st.composite
def chat_parts(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 3)) == 0:
        return {"type": "image_url", "image_url": {"url": "data:,"}}
    return text(draw(TEXTS))


def holders(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dict a client could put a marker on, in hash order (top level last)."""
    out = [t for t in body.get("tools", [])]
    if isinstance(body.get("system"), list):
        out += body["system"]
    for msg in body["messages"]:
        if isinstance(msg.get("content"), list):
            for block in msg["content"]:
                out.append(block)
                if isinstance(block.get("content"), list):
                    out += block["content"]
        out.append(msg)
    out.append(body)
    return out


def add_client_markers(draw: st.DrawFn, body: dict[str, Any]) -> None:
    spots = holders(body)
    if draw(st.booleans()):
        return
    chosen = sorted(draw(st.sets(st.integers(0, len(spots) - 1), min_size=1, max_size=4)))
    boundary = draw(st.integers(0, len(chosen)))  # the first `boundary` get 1h: a valid order
    for n, i in enumerate(chosen):
        spots[i]["cache_control"] = dict(CC1H if n < boundary else CC)


@st.composite
def anthropic_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": []}
    n_tools = draw(st.integers(0, 5))
    if n_tools:
        body["tools"] = tools(n_tools, draw(st.sampled_from([10, 2000])))
    body["system"] = draw(st.one_of(st.none(), TEXTS, st.lists(st.builds(text, TEXTS),
                                                               max_size=3)))
    if body["system"] is None:
        del body["system"]
    for i in range(draw(st.integers(0, 12))):
        role = draw(st.sampled_from(["system"])) if draw(st.integers(0, 9)) == 0\
            else ("user" if i % 2 == 0 else "assistant")
        content = draw(st.one_of(TEXTS, st.lists(anthropic_blocks(), max_size=6)))
        body["messages"].append({"role": role, "content": content})
    add_client_markers(draw, body)
    return body


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": []}
    if draw(st.booleans()):
        body["tools"] = [{"type": "function", "function": {"name": "f", "description": "d" * 3000}}]
    for _ in range(draw(st.integers(0, 3))):
        body["messages"].append({"role": draw(st.sampled_from(["system", "developer"])),
                                 "content": draw(TEXTS)})
    for _ in range(draw(st.integers(0, 12))):
        role = draw(st.sampled_from(["user", "assistant", "tool", "system"]))
        if role == "assistant" and draw(st.booleans()):
            body["messages"].append({"role": role, "content": None, "tool_calls": []})
            continue
        content = draw(st.one_of(TEXTS, st.lists(chat_parts(), max_size=4)))
        body["messages"].append({"role": role, "content": content})
    add_client_markers(draw, body)
    return body


def check_plan(body: dict[str, Any], api: str, model: str | None, raw: dict[str, Any]) -> None:
    spec = parse_cache_control(raw)
    original = copy.deepcopy(body)
    client = walk_markers(body)
    added = plan_breakpoints(body, api, model, spec)

    assert count_markers(body, api) <= 4
    assert len(added) <= 4 - len(client)
    assert ttl_order_ok(body)
    if client and spec.client_markers == "skip":
        assert added == []
    if spec.last_marker_only or (spec.last_marker_only is None and model and "gemini" in model):
        assert len(added) <= 1
    after = dict(walk_markers(body))
    for path, value in client:  # client markers: same places, same values
        assert after[path] == value
    assert set(after) == {p for p, _ in client} | {m.path for m in added}
    for m in added:
        if m.path == "cache_control":
            continue
        block = resolve(body, m.path)
        assert block["cache_control"] == (CC1H if m.ttl == "1h" else CC)
        assert block.get("type") not in ("thinking", "redacted_thinking")
        if block.get("type") == "text":
            assert block["text"].strip()
        if api == "openai-chat":
            assert m.path.startswith("messages[") and block["type"] == "text"

    again = copy.deepcopy(body)  # idempotent
    assert plan_breakpoints(again, api, model, spec) == []
    assert again == body

    strip_added(body, added)  # exact inverse
    assert body == original


PROPERTY = settings(derandomize=True, max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(anthropic_bodies(), MODELS, SPECS)
def test_properties_anthropic(body: dict[str, Any], model: str | None,
                              raw: dict[str, Any]) -> None:
    check_plan(body, "anthropic", model, raw)


@PROPERTY
@given(chat_bodies(), MODELS, SPECS)
def test_properties_openai_chat(body: dict[str, Any], model: str | None,
                                raw: dict[str, Any]) -> None:
    check_plan(body, "openai-chat", model, raw)
