"""The cache_control breakpoint planner: limits, client markers, rolling positions, undo."""

import copy
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affinity_addon.catalog.minimums import parse_minimums
from affinity_addon.models import normalize_model
from affinity_addon.request.breakpoint_spec import (
    AddedMarker,
    CacheControlSpec,
    Placement,
    min_tokens_for,
    parse_cache_control,
)
from affinity_addon.request.breakpoints import plan_breakpoints, strip_added
from affinity_addon.request.prompt import iter_segments
from affinity_addon.request.prompt_slots import count_markers

CC = {"type": "ephemeral"}
CC1H = {"type": "ephemeral", "ttl": "1h"}
AGENT = parse_cache_control(True)
FILL = parse_cache_control({"client_markers": "fill"})
BIG = "lorem ipsum dolor sit amet " * 400  # ~2,700 tokens by the estimate
MODEL = "claude-sonnet-4-5"


# ---------------------------------------------------------------------------------------------
# helpers, written independently of the module under test


def walk_markers(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(holder path, marker) in hash order; message-level after its blocks, top level last."""
    out: list[tuple[str, Any]] = []
    for section in ("tools", "system"):
        items = body.get(section)
        if isinstance(items, list):
            out += [(f"{section}[{i}]", it["cache_control"]) for i, it in enumerate(items)
                    if isinstance(it, dict) and "cache_control" in it]
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if isinstance(block, dict) and "cache_control" in block:
                    out.append((f"messages[{i}].content[{j}]", block["cache_control"]))
                inner = block.get("content") if isinstance(block, dict) else None
                if isinstance(inner, list):
                    out += [(f"messages[{i}].content[{j}].content[{k}]", p["cache_control"])
                            for k, p in enumerate(inner)
                            if isinstance(p, dict) and "cache_control" in p]
        if "cache_control" in msg:
            out.append((f"messages[{i}]", msg["cache_control"]))
    if "cache_control" in body:
        out.append(("cache_control", body["cache_control"]))
    return out


def ttl_order_ok(body: dict[str, Any]) -> bool:
    ttls = "".join("L" if v.get("ttl") == "1h" else "S" for _, v in walk_markers(body))
    return re.fullmatch("L*S*", ttls) is not None


def resolve(body: dict[str, Any], path: str) -> Any:
    obj: Any = body
    for name, idx in re.findall(r"([A-Za-z_]+)|\[(\d+)\]", path):
        obj = obj[int(idx)] if idx else obj[name]
    return obj


def positions(body: dict[str, Any], shape: str) -> list[int]:
    """Segment indices of the block markers in a body."""
    paths = {p for p, _ in walk_markers(body)}
    return [i for i, seg in enumerate(iter_segments(body, shape)) if seg.path in paths]


def tools(n: int, size: int = 400) -> list[dict[str, Any]]:
    return [{"name": f"tool{i}", "description": "d" * size,
             "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}
            for i in range(n)]


def text(t: str, cc: dict[str, str] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": t}
    if cc is not None:
        block["cache_control"] = dict(cc)
    return block


def plan(body: dict[str, Any], spec: CacheControlSpec = AGENT, shape: str = "anthropic",
         model: str | None = MODEL) -> list[AddedMarker]:
    return plan_breakpoints(body, shape, model, spec)


def tool_round(k: int, n: int) -> list[dict[str, Any]]:
    """An assistant turn with n parallel tool calls and the user turn with their results."""
    return [
        {"role": "assistant", "content": [{"type": "tool_use", "id": f"tu{k}_{j}", "name": "tool0",
                                           "input": {"x": j}} for j in range(n)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"tu{k}_{j}",
                                      "content": f"result {k}.{j} " * 20} for j in range(n)]},
    ]


# ---------------------------------------------------------------------------------------------
# parsing


def test_parse_forms() -> None:
    assert parse_cache_control(True) == CacheControlSpec()
    assert parse_cache_control("auto") == CacheControlSpec(strategy="explicit",
                                                           placements=(Placement("auto"),))
    spec = parse_cache_control({"placements": ["tools", "system", {"last_n": 2}, "auto"],
                                "ttl": "1h", "client_markers": "fill", "lookback": 10,
                                "min_tokens": 0, "last_marker_only": True})
    assert spec == CacheControlSpec("explicit", (Placement("tools"), Placement("system"),
                                                 Placement("last_n", 2), Placement("auto")),
                                    "1h", "fill", 10, 0, True)
    assert parse_cache_control({"min_tokens": "auto"}).min_tokens is None
    assert parse_cache_control({"strategy": "agent", "ttl": "1h"}).ttl == "1h"


@pytest.mark.parametrize("value, reason", [
    (False, "leave the key out"),
    ("sometimes", "expected true"),
    (3, "expected true"),
    ({"strategy": "clever"}, "strategy must be"),
    ({"strategy": "explicit"}, "needs a non-empty placements"),
    ({"strategy": "agent", "placements": ["tools"]}, "only apply to strategy: explicit"),
    ({"placements": ["everything"]}, "unknown placement"),
    ({"placements": [{"last_n": 0}]}, "last_n must be"),
    ({"placements": [{"last_n": True}]}, "last_n must be"),
    ({"placements": "tools"}, "must be a list"),
    ({"ttl": "10m"}, "ttl must be"),
    ({"client_markers": "replace"}, "client_markers must be"),
    ({"lookback": 0}, "lookback must be"),
    ({"min_tokens": -1}, "min_tokens must be"),
    ({"min_tokens": "lots"}, "min_tokens must be"),
    ({"last_marker_only": "yes"}, "last_marker_only must be"),
    ({"tll": "1h"}, "unknown key"),
])
def test_parse_errors(value: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_cache_control(value)


# ---------------------------------------------------------------------------------------------
# minimums table


@pytest.mark.parametrize("model, tokens", [
    ("claude-sonnet-4-5-20250929", 1024),
    ("anthropic/claude-sonnet-4.5", 1024),
    ("claude-haiku-4-5-20251001", 4096),
    ("anthropic/claude-haiku-4.5", 4096),
    ("anthropic/claude-opus-4.5", 4096),
    ("us.anthropic.claude-opus-4-6-v1:0", 4096),
    ("claude-opus-4-7", 2048),
    ("claude-opus-4-8[1m]", 1024),
    ("claude-opus-4-1-20250805", 1024),
    ("claude-opus-5", 512),
    ("claude-3-5-haiku-20241022", 2048),
    ("google/gemini-2.5-flash", 2048),
    ("google/gemini-3-flash-preview", 4096),
    ("qwen3-coder-plus", 1024),
    ("qwen/qwen3-max", 1024),
    ("gpt-5", 1024),
    (None, 1024),
])
def test_min_tokens_for(model: str | None, tokens: int) -> None:
    assert min_tokens_for(model) == tokens


def test_normalize_model() -> None:
    assert normalize_model("Anthropic/Claude-Sonnet-4.5") == "claude-sonnet-4-5"
    assert normalize_model("us.anthropic.claude-sonnet-4-5-v1:0") == "claude-sonnet-4-5-v1:0"
    assert normalize_model("qwen3.6-plus") == "qwen3-6-plus"


def test_parse_minimums_rejects_bad_tables() -> None:
    assert parse_minimums({"Claude-*": 5, "*": 0}) == (("claude-*", 5), ("*", 0))
    for bad in ([], {}, {"x": "many"}, {"x": -1}, {"x": True}):
        with pytest.raises(ValueError):
            parse_minimums(bad)


# ---------------------------------------------------------------------------------------------
# counting


def test_count_markers_everywhere() -> None:
    body = {
        "cache_control": CC,
        "tools": [{"name": "a", "cache_control": CC}, {"name": "b"}],
        "system": [text("s", CC)],
        "messages": [
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [text("r", CC)]},
                text("q", CC)]},
            {"role": "user", "content": "x", "cache_control": CC},
        ],
    }
    assert count_markers(body, "anthropic") == 6
    assert count_markers({"messages": "odd"}, "openai-chat") == 0


# ---------------------------------------------------------------------------------------------
# real client shapes


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
    added = plan(body, shape="openai-chat", model=body["model"])
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
    added = plan(as_string, shape="openai-chat", model="anthropic/claude-sonnet-4.5")
    # A string tool result becomes a one-part text list, so the rolling marker follows the
    # tool loop (an agent's newest message is usually a tool result, not a user turn).
    assert [m.path for m in added][-1] == "messages[3].content[0]"
    assert as_string["messages"][3]["content"] == [
        {"type": "text", "text": "a\nb", "cache_control": {"type": "ephemeral"}}]
    strip_added(as_string, added)
    assert as_string["messages"][3]["content"] == "a\nb"

    as_parts = {"messages": copy.deepcopy(base) + [
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "a\nb"}]}]}
    added = plan(as_parts, shape="openai-chat", model="anthropic/claude-sonnet-4.5")
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
    added = plan(copy.deepcopy(body), shape="openai-chat", model=body["model"])
    assert added == [AddedMarker("messages[11].content[0]", "5m", True)]
    spec = parse_cache_control({"last_marker_only": False})
    assert len(plan(copy.deepcopy(body), spec, "openai-chat", body["model"])) == 2
    spec = parse_cache_control({"placements": ["system", {"last_n": 2}], "last_marker_only": True})
    assert [m.path for m in plan(body, spec, "openai-chat", "qwen3-max")] == \
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


def test_unsupported_shapes_are_left_alone() -> None:
    body = {"input": [{"role": "user", "content": BIG}]}
    assert plan(body, shape="openai-responses") == []
    assert plan(body, shape="gemini") == []
    assert body == {"input": [{"role": "user", "content": BIG}]}


def test_strip_added_survives_a_changed_body() -> None:
    body = {"system": BIG, "messages": [{"role": "user", "content": "hi"}]}
    added = plan(body)
    del body["messages"]
    strip_added(body, added)  # logs, does not raise
    assert body["system"] == BIG


# ---------------------------------------------------------------------------------------------
# rolling markers: turn N+1 reads what turn N wrote


def _assert_rolls(shape: str, model: str, spec: CacheControlSpec, first: dict[str, Any],
                  turns: list[list[dict[str, Any]]]) -> None:
    original = copy.deepcopy(first)
    prev_last: int | None = None
    for appended in turns:
        original["messages"] += copy.deepcopy(appended)
        body = copy.deepcopy(original)
        assert plan_breakpoints(body, shape, model, spec)
        marks = positions(body, shape)
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
        role = draw(st.sampled_from(["system"])) if draw(st.integers(0, 9)) == 0 \
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


def check_plan(body: dict[str, Any], shape: str, model: str | None, raw: dict[str, Any]) -> None:
    spec = parse_cache_control(raw)
    original = copy.deepcopy(body)
    client = walk_markers(body)
    added = plan_breakpoints(body, shape, model, spec)

    assert count_markers(body, shape) <= 4
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
        if shape == "openai-chat":
            assert m.path.startswith("messages[") and block["type"] == "text"

    again = copy.deepcopy(body)  # idempotent
    assert plan_breakpoints(again, shape, model, spec) == []
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
