"""The cache_control breakpoint planner on real client APIs: client markers, limits, minimums,
rolling positions (turn N+1 reads what turn N wrote), undo."""

import copy
from typing import Any

import pytest

from affinity_addon.request.breakpoint_spec import (
    AddedMarker,
    CacheControlSpec,
    parse_cache_control,
)
from affinity_addon.request.breakpoints import plan_breakpoints, strip_added
from affinity_addon.request.prompt_slots import count_markers
from tests.breakpoint_helpers import (
    AGENT,
    BIG,
    CC,
    CC1H,
    FILL,
    MODEL,
    plan,
    positions,
    text,
    tool_round,
    tools,
    ttl_order_ok,
)

# ---------------------------------------------------------------------------------------------
# real client APIs


def claude_code_body(cc: dict[str, str]) -> dict[str, Any]:
    return {
        "model": "claude-opus-4-8",
        "tools": tools(24),
        "system": [text("x-anthropic-billing-header: cc_version=2.1.197.0df; cc_entrypoint=cli;"),
                   text("You are Claude Code.", cc), text(BIG, cc)],
        "messages": [
            {"role": "user", "content": [text("<system-reminder>Today's date is 2026-11-23"),
                                         text("hi")]},
            {"role": "system", "content": "Available agents: general, explore"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm",
                                               "signature": "sig"}, text("hello")]},
            {"role": "user", "content": [text("again", cc)]},
        ],
        "metadata": {"user_id": "{}"},
    }


def test_claude_code_left_alone_by_default() -> None:
    body = claude_code_body(CC)
    before = copy.deepcopy(body)
    assert plan(body, model="claude-opus-4-8") == []
    assert body == before


@pytest.mark.parametrize("cc, spec_ttl, ttl", [(CC, "5m", "5m"), (CC1H, "5m", "1h"),
                                               (CC1H, "1h", "1h")])
def test_claude_code_fill_uses_only_the_free_slot(cc: dict[str, str], spec_ttl: str,
                                                  ttl: str) -> None:
    body = claude_code_body(cc)
    before = copy.deepcopy(body)
    spec = parse_cache_control({"client_markers": "fill", "ttl": spec_ttl})
    added = plan(body, spec, model="claude-opus-4-8")
    # The only free slot goes to the last tool; a tool marker before 1h markers must be 1h too.
    assert added == [AddedMarker("tools[23]", ttl)]
    assert count_markers(body, "anthropic") == 4
    assert ttl_order_ok(body)
    assert body["messages"][1] == before["messages"][1]  # role: system content untouched
    strip_added(body, added)
    assert body == before


def test_opencode_fill_marks_last_tool() -> None:
    body = {
        "tools": tools(10),
        "system": [text(BIG, CC)],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": [text("hello", CC)]},
                     {"role": "user", "content": [text("again", CC)]}],
    }
    assert plan(copy.deepcopy(body)) == []
    added = plan(body, parse_cache_control({"client_markers": "fill", "ttl": "1h"}))
    assert added == [AddedMarker("tools[9]", "1h")]  # 1h before the client's 5m ones is valid
    assert ttl_order_ok(body)


def pi_body(rounds: int) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": [text("fix the bug")]}]
    for k in range(rounds):
        messages += tool_round(k, 1)
    messages[-1]["content"].append(text("continue", CC))
    t = tools(4, 600)
    t[-1]["cache_control"] = dict(CC)
    return {"tools": t, "system": [text(BIG, CC)], "messages": messages}


def test_pi_fill_adds_nothing_when_markers_cover_the_prompt() -> None:
    body = pi_body(rounds=3)
    before = copy.deepcopy(body)
    assert plan(body, FILL) == []
    assert body == before


def test_pi_fill_bridges_a_long_conversation() -> None:
    body = pi_body(rounds=20)  # ~42 blocks between system[0] and the last user text
    added = plan(body, FILL)
    assert len(added) == 1 and added[0].path.startswith("messages[")
    marks = positions(body, "anthropic")
    assert len(marks) == 4
    # The client's last marker now finds an entry within the lookback.
    assert 0 < marks[-1] - marks[-2] <= 20


def test_plain_sdk_anthropic_string_contents() -> None:
    body = {"model": MODEL, "max_tokens": 100, "system": BIG,
            "messages": [{"role": "user", "content": "What is 2+2?"}]}
    before = copy.deepcopy(body)
    added = plan(body)
    assert added == [AddedMarker("system[0]", "5m", True),
                     AddedMarker("messages[0].content[0]", "5m", True)]
    assert body["system"] == [{"type": "text", "text": BIG, "cache_control": CC}]
    assert body["messages"][0]["content"] == [text("What is 2+2?", CC)]
    assert plan(body) == []
    strip_added(body, added)
    assert body == before


def test_plain_sdk_openrouter_chat() -> None:
    body = {"model": "anthropic/claude-sonnet-4.5",
            "messages": [{"role": "system", "content": BIG},
                         {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "hi there"},
                         {"role": "user", "content": [{"type": "text", "text": "again"},
                                                      {"type": "image_url",
                                                       "image_url": {"url": "data:,"}}]}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d" * 9000}}]}
    before = copy.deepcopy(body)
    added = plan(body, api="openai-chat", model=body["model"])
    # No tool markers on chat bodies; the image part cannot carry one, its text part can.
    assert added == [AddedMarker("messages[0].content[0]", "5m", True),
                     AddedMarker("messages[3].content[0]", "5m", False)]
    strip_added(body, added)
    assert body == before


def test_openrouter_tool_messages() -> None:
    base = [{"role": "system", "content": BIG},
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "ls", "arguments": "{}"}}]}]
    as_string = {"messages": copy.deepcopy(base) + [{"role": "tool", "tool_call_id": "c1", "content": "a\nb"}]}
    added = plan(as_string, api="openai-chat", model="anthropic/claude-sonnet-4.5")
    # A string tool result becomes a one-part text list, so the rolling marker follows the
    # tool loop (an agent's newest message is usually a tool result, not a user turn).
    assert [m.path for m in added][-1] == "messages[3].content[0]"
    assert as_string["messages"][3]["content"] == [
        {"type": "text", "text": "a\nb", "cache_control": {"type": "ephemeral"}}]
    strip_added(as_string, added)
    assert as_string["messages"][3]["content"] == "a\nb"

    as_parts = {"messages": copy.deepcopy(base) + [
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "a\nb"}]}]}
    added = plan(as_parts, api="openai-chat", model="anthropic/claude-sonnet-4.5")
    assert added[-1] == AddedMarker("messages[3].content[0]", "5m")


def test_long_tool_loop_gets_an_intermediate_marker() -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "refactor everything"}]
    for k in range(22):
        messages += tool_round(k, 1)  # 44 tool_use/tool_result blocks
    body = {"tools": tools(12), "system": [text(BIG)], "messages": messages}
    added = plan(body)
    paths = [m.path for m in added]
    assert paths[:2] == ["tools[11]", "system[0]"] and paths[-1] == "messages[44].content[0]"
    assert len(added) == 4
    marks = positions(body, "anthropic")
    assert 0 < marks[3] - marks[2] <= 20  # the rolling marker reaches the intermediate
    assert marks[2] - marks[1] > 20  # which sits on a fixed grid, not right after system


def test_parallel_tool_calls_mark_the_previous_tail() -> None:
    messages = [{"role": "user", "content": "go"}] + tool_round(0, 2) + tool_round(1, 15)
    body = {"system": [text(BIG)], "messages": messages}
    added = plan(body)
    # Turn N's rolling marker sat on messages[2] (its last block); 30 blocks were appended since,
    # so that exact block is marked again, and the free slot bridges the 30 new blocks.
    assert [m.path for m in added] == ["system[0]", "messages[2].content[1]",
                                       "messages[3].content[14]", "messages[4].content[14]"]


def test_thinking_and_empty_text_are_never_marked() -> None:
    body = {"system": [text(BIG)], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "redacted_thinking", "data": "xx"},
                                          {"type": "tool_use", "id": "a", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "r"},
                                     text(""), text("   ")]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "redacted_thinking", "data": "yy"}]},
    ]}
    spec = parse_cache_control({"placements": [{"last_n": 3}], "min_tokens": 0})
    added = plan(body, spec)
    assert [m.path for m in added] == ["messages[1].content[2]", "messages[2].content[0]"]
    fresh = copy.deepcopy(body)
    strip_added(fresh, added)
    assert [m.path for m in plan(fresh)] == ["system[0]", "messages[2].content[0]"]


def test_below_minimum_places_nothing() -> None:
    body = {"tools": tools(2), "system": [text("short system")],
            "messages": [{"role": "user", "content": "hi"}]}
    before = copy.deepcopy(body)
    assert plan(body, model="claude-haiku-4-5") == []
    assert body == before
    assert len(plan(body, parse_cache_control({"min_tokens": 0}))) == 3


def test_only_markers_above_the_minimum_are_placed() -> None:
    body = {"tools": tools(2), "system": [text(BIG)],
            "messages": [{"role": "user", "content": "hi"}]}
    added = plan(body)  # the tools alone are ~200 tokens: below 1,024
    assert [m.path for m in added] == ["system[0]", "messages[0].content[0]"]


def test_auto_top_level() -> None:
    body = {"system": BIG, "messages": [{"role": "user", "content": "hi"}]}
    before = copy.deepcopy(body)
    added = plan(body, parse_cache_control("auto"))
    assert added == [AddedMarker("cache_control", "5m")]
    assert body["cache_control"] == CC and body["system"] == BIG
    assert plan(body, parse_cache_control({"placements": ["auto"], "client_markers": "fill"})) == []
    strip_added(body, added)
    assert body == before

    spec = parse_cache_control({"placements": ["tools", "system", "auto"], "ttl": "1h"})
    body = {"tools": tools(30), "system": BIG, "messages": [{"role": "user", "content": "hi"}]}
    assert plan(body, spec) == [AddedMarker("tools[29]", "1h"), AddedMarker("system[0]", "1h", True),
                                AddedMarker("cache_control", "1h")]
    assert count_markers(body, "anthropic") == 3


def test_client_top_level_marker_counts_and_blocks_the_last_block() -> None:
    body = {"system": [text(BIG)], "messages": [{"role": "user", "content": "hi"}],
            "cache_control": CC}
    added = plan(body, FILL)
    assert added == [AddedMarker("system[0]", "5m")]  # the last block is the automatic one's


def test_ttl_mix_keeps_1h_before_5m() -> None:
    body = {"tools": tools(30), "system": [text(BIG, CC)],
            "messages": [{"role": "user", "content": "hi"}]}
    spec = parse_cache_control({"client_markers": "fill", "ttl": "1h"})
    added = plan(body, spec)
    assert added == [AddedMarker("tools[29]", "1h"), AddedMarker("messages[0].content[0]", "5m",
                                                                  True)]
    assert ttl_order_ok(body)


def test_gemini_via_openrouter_gets_one_marker() -> None:
    messages = [{"role": "system", "content": BIG}]
    for k in range(5):
        messages += [{"role": "user", "content": f"q{k} " * 50},
                     {"role": "assistant", "content": f"a{k} " * 50}]
    messages.append({"role": "user", "content": "last"})
    body = {"model": "google/gemini-2.5-pro", "messages": messages}
    added = plan(copy.deepcopy(body), api="openai-chat", model=body["model"])
    assert added == [AddedMarker("messages[11].content[0]", "5m", True)]
    spec = parse_cache_control({"last_marker_only": False})
    assert len(plan(copy.deepcopy(body), spec, "openai-chat", body["model"])) == 2
    spec = parse_cache_control({"placements": ["system", {"last_n": 2}], "last_marker_only": True})
    assert [m.path for m in plan(body, spec, "openai-chat", "qwen3-max")] ==\
        ["messages[11].content[0]"]


def test_explicit_placements_in_priority_order() -> None:
    def body() -> dict[str, Any]:
        messages = [{"role": "user", "content": f"m{i}"} if i % 2 == 0 else
                    {"role": "assistant", "content": f"r{i}"} for i in range(6)]
        return {"tools": tools(30), "system": [text(BIG)], "messages": messages}

    spec = parse_cache_control({"placements": [{"last_n": 3}, "tools", "system", "last_user"]})
    # last_n takes 3 slots (newest first), tools the 4th; system and last_user find no room.
    assert [m.path for m in plan(body(), spec)] == [
        "tools[29]", "messages[3].content[0]", "messages[4].content[0]", "messages[5].content[0]"]
    spec = parse_cache_control({"placements": ["last_user"]})
    assert [m.path for m in plan(body(), spec)] == ["messages[4].content[0]"]


def test_deferred_tools_and_null_markers_are_not_marked() -> None:
    t = tools(12)
    t[-1]["defer_loading"] = True
    t[-2]["cache_control"] = None  # some SDKs serialize "unset" as null
    body = {"tools": t, "system": [text(BIG)], "messages": [{"role": "user", "content": "hi"}],
            "cache_control": None}
    before = copy.deepcopy(body)
    added = plan(body, parse_cache_control({"placements": ["tools", "auto"]}))
    assert added == [AddedMarker("tools[9]", "5m")]
    strip_added(body, added)
    assert body == before


def test_unsupported_apis_are_left_alone() -> None:
    body = {"input": [{"role": "user", "content": BIG}]}
    assert plan(body, api="openai-responses") == []
    assert plan(body, api="gemini") == []
    assert body == {"input": [{"role": "user", "content": BIG}]}


def test_strip_added_survives_a_changed_body() -> None:
    body = {"system": BIG, "messages": [{"role": "user", "content": "hi"}]}
    added = plan(body)
    del body["messages"]
    strip_added(body, added)  # logs, does not raise
    assert body["system"] == BIG


# ---------------------------------------------------------------------------------------------
# rolling markers: turn N+1 reads what turn N wrote


def _assert_rolls(api: str, model: str, spec: CacheControlSpec, first: dict[str, Any],
                  turns: list[list[dict[str, Any]]]) -> None:
    original = copy.deepcopy(first)
    prev_last: int | None = None
    for appended in turns:
        original["messages"] += copy.deepcopy(appended)
        body = copy.deepcopy(original)
        assert plan_breakpoints(body, api, model, spec)
        marks = positions(body, api)
        assert len(marks) <= 4 and ttl_order_ok(body)
        if prev_last is not None:
            assert any(prev_last <= m <= prev_last + 20 for m in marks), (prev_last, marks)
        prev_last = marks[-1]


@pytest.mark.parametrize("parallel", [[1, 1, 1, 1, 1], [1, 12, 2, 30, 1], [25, 25, 3, 1, 40]])
def test_rolling_anthropic(parallel: list[int]) -> None:
    first = {"tools": tools(8), "system": [text(BIG)],
             "messages": [{"role": "user", "content": "start"}]}
    turns = [[]] + [tool_round(k, n) for k, n in enumerate(parallel)]
    _assert_rolls("anthropic", MODEL, AGENT, first, turns)


def test_rolling_openrouter_chat() -> None:
    first = {"messages": [{"role": "system", "content": BIG}, {"role": "user", "content": "go"}]}
    turns: list[list[dict[str, Any]]] = [[]]
    for k in range(5):
        calls = [{"id": f"c{k}{j}", "type": "function",
                  "function": {"name": "ls", "arguments": "{}"}} for j in range(k * 6)]
        turn: list[dict[str, Any]] = [{"role": "assistant", "content": f"step {k}",
                                       "tool_calls": calls}]
        turn += [{"role": "tool", "tool_call_id": c["id"],
                  "content": [{"type": "text", "text": "out"}] if k % 2 else "out"} for c in calls]
        turn.append({"role": "user", "content": f"next {k}"})
        turns.append(turn)
    _assert_rolls("openai-chat", "anthropic/claude-sonnet-4.5", AGENT, first, turns)


def test_rolling_marker_is_exactly_the_previous_write() -> None:
    """When a turn appends more than the lookback, the previous rolling position is re-marked."""
    body = {"system": [text(BIG)], "messages": [{"role": "user", "content": "start"}]}
    first = copy.deepcopy(body)
    turn1 = plan(first)
    body["messages"] += tool_round(0, 30)
    second = copy.deepcopy(body)
    turn2 = plan(second)
    assert turn1[-1].path in [m.path for m in turn2]
